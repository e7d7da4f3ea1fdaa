"""Dataset preparation: transcode, resize and re-key a manifest's videos so that decoding matches the sampling.

``python -m pipelines.prepare MANIFEST --out DIR [--short-side 256] [--codec vp9|mjpeg|h264|hevc] [--gop N|intra]
[--fps F] [--workers N]`` decodes every video of MANIFEST with PyAV, resizes it (short side, aspect kept, even
sizes), resamples it to a constant frame rate (``--fps``, default the source's), re-encodes it with keyframes forced
every ``--gop`` frames, and writes ``DIR/<same relative path>.<ext>``, a new manifest ``DIR/<manifest name>`` with the
same labels (Kinetics: ``path<sep>label`` relative to DIR; SSv2: the split JSON, without failed ids, and the labels
JSON), and ``DIR/prepare.json`` (the spec, counts, failures).

Why: a clip of 8 frames at rate 32 spans ~256 source frames; with one keyframe per 10 s video the decoder decodes
~all of them to deliver 8 (``pipelines.decode_cost``). A GOP of the sampling rate, or intra-only MJPEG, cuts that,
and DALI's CPU decoder needs VP8/VP9/MJPEG anyway (research/dali.md).

Safe to kill and re-run: each output is encoded to a hidden ``.NAME.partial.EXT``, checked (opens, right codec,
the frame count written, keyframe gaps <= GOP) and only then renamed; each finished output is appended to
``DIR/prepare.jsonl`` with the spec key and the source's size and mtime, and a re-run skips outputs whose record
matches. Stale partial files are removed at start. A source that fails to decode is reported with its reason; the
others go on, and it is left out of the new manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

SPEC_VERSION = 1
JOURNAL = "prepare.jsonl"
SPEC_FILE = "prepare.json"
PARTIAL = ".partial"


@dataclass(frozen=True)
class Codec:
    encoder: str  # PyAV/FFmpeg encoder name
    ext: str  # container (by extension)
    pix_fmt: str
    decoded_name: str  # codec name a decoder reports for the output
    default_quality: int  # crf (vp9/h264/hevc) or qscale (mjpeg, 2 = best .. 31)


CODECS = {
    "vp9": Codec("libvpx-vp9", ".webm", "yuv420p", "vp9", 32),
    "mjpeg": Codec("mjpeg", ".avi", "yuvj420p", "mjpeg", 4),
    "h264": Codec("libx264", ".mp4", "yuv420p", "h264", 23),
    "hevc": Codec("libx265", ".mp4", "yuv420p", "hevc", 28),
}


@dataclass(frozen=True)
class PrepareSpec:
    """Everything that determines an output's content (its key marks outputs as done in the journal)."""

    codec: str = "vp9"
    short_side: int = 256  # 0 = keep the source size
    gop: int | None = None  # keyframe every `gop` frames; 1 = intra-only; None = the encoder's default
    fps: float | None = None  # constant output frame rate; None = the source's average rate
    quality: int | None = None  # crf / qscale; None = the codec's default
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec={self.codec!r}; choose from {sorted(CODECS)}")
        if self.short_side < 0 or self.short_side % 2:
            raise ValueError(f"short_side={self.short_side} must be 0 (keep) or a positive even number (yuv420p)")
        if self.gop is not None and self.gop < 1:
            raise ValueError(f"gop={self.gop} must be >= 1 ('intra' = 1)")
        if self.codec == "mjpeg" and self.gop not in (None, 1):
            raise ValueError(f"mjpeg is intra-only (every frame a keyframe): drop --gop {self.gop} or use --gop intra")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps={self.fps} must be > 0")

    @property
    def effective_gop(self) -> int | None:
        return 1 if self.codec == "mjpeg" else self.gop

    def key(self) -> str:
        d = asdict(self)
        d["gop"] = self.effective_gop
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_gop(text: str | None) -> int | None:
    """``--gop`` value: an integer >= 1, ``intra`` (= 1), or None/``default`` (the encoder's default)."""
    if text is None or text == "default":
        return None
    if text == "intra":
        return 1
    try:
        gop = int(text)
    except ValueError:
        raise ValueError(f"--gop {text!r}: expected a positive integer, 'intra' or 'default'") from None
    if gop < 1:
        raise ValueError(f"--gop {gop}: must be >= 1")
    return gop


def output_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) with the short side = ``short_side`` (0 = keep), aspect kept, both even (rounded)."""
    if short_side == 0:
        return height - height % 2, width - width % 2
    if height <= width:
        return short_side, max(2, 2 * round(width * short_side / height / 2))
    return max(2, 2 * round(height * short_side / width / 2)), short_side


def _encoder_options(spec: PrepareSpec) -> dict[str, str]:
    q = spec.quality if spec.quality is not None else CODECS[spec.codec].default_quality
    gop = spec.effective_gop
    if spec.codec == "vp9":
        opts = {"deadline": "good", "cpu-used": "5", "row-mt": "1", "crf": str(q), "b": "0"}
        if gop:
            opts.update({"g": str(gop), "auto-alt-ref": "1" if gop > 1 else "0"})
        return opts
    if spec.codec == "h264":
        opts = {"preset": "fast", "crf": str(q)}
        if gop:
            opts.update({"g": str(gop), "keyint_min": str(gop)})
        return opts
    if spec.codec == "hevc":
        params = "log-level=error" + (f":keyint={gop}:min-keyint={gop}" if gop else "")
        return {"preset": "fast", "crf": str(q), "x265-params": params}
    return {}


def _resample(frames: Iterator, src_rate: Fraction, rate: Fraction, time_base: Fraction | None) -> Iterator:
    """Constant-rate stream: output frame ``k`` (at ``k / rate`` s) is the source frame on screen at that time.

    A source frame is taken to show from a quarter source frame before its timestamp (so millisecond-rounded
    timestamps do not drop or repeat frames) until the next one; the last lasts one source frame. Identity on a
    constant-rate source at its own rate; drops or repeats frames otherwise (and evens out VFR)."""
    lead = 1 / (4 * src_rate)
    prev, t0, k, n = None, None, 0, 0
    for frame in frames:
        if frame.pts is not None and time_base is not None:
            t0 = frame.pts if t0 is None else t0
            t = (frame.pts - t0) * time_base
        else:
            t = Fraction(n) / src_rate
        n += 1
        if prev is not None:
            while Fraction(k) / rate < t - lead:
                yield prev
                k += 1
        prev, prev_t = frame, t
    if prev is not None:
        while Fraction(k) / rate < prev_t + 1 / src_rate - lead:
            yield prev
            k += 1


def _declared_seconds(container, stream) -> float | None:
    """The video's declared duration: the stream's when known, else the container's."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else None


def partial_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.stem}{PARTIAL}{dst.suffix}")


def check_output(path: Path, spec: PrepareSpec, expected_frames: int) -> str:
    """Why the encoded file ``path`` is not what ``spec`` asked for ("" = good)."""
    import av

    from pipelines.decode_cost import read_gop

    codec = CODECS[spec.codec]
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            name = stream.codec_context.name
            if name != codec.decoded_name:
                return f"output codec is {name}, expected {codec.decoded_name}"
            if next(container.decode(stream), None) is None:
                return "output has no decodable frame"
        gop = read_gop(path)
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        return f"output does not open: {type(e).__name__}: {e}"
    if gop.num_frames != expected_frames:
        return f"output has {gop.num_frames} frames, {expected_frames} were encoded"
    if spec.effective_gop and gop.max_gop > spec.effective_gop:
        return f"output keyframes are up to {gop.max_gop} frames apart, --gop {spec.effective_gop} asked"
    return ""


def transcode(src: str | Path, dst: str | Path, spec: PrepareSpec) -> int:
    """Transcode ``src`` into ``dst`` as ``spec`` says, via a checked partial file; returns the frames written.

    Raises ``RuntimeError`` (with the reason) when the source cannot be decoded or the output fails its check.
    """
    import av
    from av.video.frame import PictureType

    src, dst = str(src), Path(dst)
    codec = CODECS[spec.codec]
    tmp = partial_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with av.open(src) as inp:
            if not inp.streams.video:
                raise RuntimeError("no video stream")
            ist = inp.streams.video[0]
            ist.thread_count = 1  # parallelism comes from the worker processes
            src_rate = Fraction(ist.average_rate or ist.guessed_rate or ist.base_rate or 30)
            rate = Fraction(spec.fps).limit_denominator(1001) if spec.fps else src_rate
            height, width = output_size(ist.codec_context.height, ist.codec_context.width, spec.short_side)
            if height < 2 or width < 2:
                raise RuntimeError(f"source size {ist.codec_context.width}x{ist.codec_context.height} is unusable")
            with av.open(str(tmp), "w", options={"fflags": "+bitexact"}) as out:
                ost = out.add_stream(codec.encoder, rate=rate)
                ost.width, ost.height, ost.pix_fmt = width, height, codec.pix_fmt
                ost.thread_count = 1
                ost.options = _encoder_options(spec)
                if spec.codec == "mjpeg":
                    q = spec.quality if spec.quality is not None else codec.default_quality
                    ost.codec_context.qmin = ost.codec_context.qmax = q
                gop = spec.effective_gop
                frames = _resample(inp.decode(ist), src_rate, rate,
                                   Fraction(ist.time_base) if ist.time_base else None)
                for frame in frames:
                    f = frame.reformat(width=width, height=height, format=codec.pix_fmt, interpolation="BICUBIC")
                    f.pts, f.time_base = written, 1 / rate  # the encoder's time base is 1 / rate
                    # the source's picture types must not leak into the encoder (an I would force a keyframe)
                    f.pict_type = PictureType.I if gop and written % gop == 0 else PictureType.NONE
                    for packet in ost.encode(f):
                        out.mux(packet)
                    written += 1
                for packet in ost.encode():
                    out.mux(packet)
            declared = _declared_seconds(inp, ist)
        if written == 0:
            raise RuntimeError("no decodable frame in the source")
        if declared and written / rate < 0.9 * declared - 2 / rate:  # the same rule as pipelines.validate
            raise RuntimeError(f"truncated source: it declares {declared:.2f} s but its frames cover only "
                               f"{float(written / rate):.2f} s")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        problem = check_output(tmp, spec, written)
        if problem:
            raise RuntimeError(problem)
        os.replace(tmp, dst)
    except av.error.FFmpegError as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"cannot decode/encode: {type(e).__name__}: {e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


@dataclass(frozen=True)
class Job:
    src: str
    rel_out: str  # output path relative to the output folder


def _run_job(args: tuple[Job, str, PrepareSpec]) -> dict:
    """Worker: transcode one job; never raises for a bad source (the reason goes to ``error``)."""
    job, out_dir, spec = args
    t0 = time.perf_counter()
    try:
        if not os.path.isfile(job.src):
            raise RuntimeError("missing: no such file")
        st = os.stat(job.src)  # before reading it: a source changed meanwhile is redone next time
        if st.st_size == 0:
            raise RuntimeError("empty file (0 bytes)")
        frames = transcode(job.src, Path(out_dir) / job.rel_out, spec)
    except Exception as e:
        reason = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        return {"src": job.src, "out": job.rel_out, "error": reason}
    return {"src": job.src, "out": job.rel_out, "error": "", "frames": frames,
            "bytes": os.path.getsize(Path(out_dir) / job.rel_out), "src_size": st.st_size,
            "src_mtime_ns": st.st_mtime_ns, "seconds": round(time.perf_counter() - t0, 3)}


@dataclass
class Entry:
    path: str  # resolved source path
    label: int
    key: str = ""  # SSv2 video id


def read_entries(manifest: Path, fmt: str, separator: str, path_prefix: str, ssv2_labels: str) -> list[Entry]:
    """The manifest's videos through ``pipelines.manifest`` (Kinetics ``path<sep>label``, CSV, SSv2 JSON)."""
    from pipelines.manifest import read_csv, read_kinetics, read_ssv2

    if fmt == "kinetics":
        return [Entry(e.path, e.label) for e in read_kinetics(manifest, separator, path_prefix)]
    if fmt == "csv":
        return [Entry(e.path, e.label) for e in read_csv(manifest, path_prefix)]
    labels = ssv2_labels or str(manifest.parent / "something-something-v2-labels.json")
    video_dir = path_prefix or str(manifest.parent)
    items = json.loads(manifest.read_text())
    entries = read_ssv2(manifest, labels, video_dir)
    return [Entry(e.path, e.label, str(item["id"])) for e, item in zip(entries, items)]


def _relative_output(src: str, base: Path, ext: str) -> str:
    """``src`` relative to ``base`` (the manifest folder / path prefix) with the new extension; absolute paths
    outside ``base`` keep their full path under the output folder."""
    p = Path(os.path.abspath(src))
    try:
        rel = p.relative_to(os.path.abspath(base))
    except ValueError:
        rel = p.relative_to(p.anchor)
    return str(rel.with_suffix(ext))


def _load_journal(out: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    path = out / JOURNAL
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                records[rec["out"]] = rec
            except (ValueError, KeyError):
                continue  # a line cut by a kill: that output is simply redone
    return records


def _is_done(rec: dict | None, job: Job, out: Path, spec_key: str) -> bool:
    if rec is None or rec.get("spec") != spec_key or rec.get("src") != job.src:
        return False
    try:
        st = os.stat(job.src)
        size = os.path.getsize(out / job.rel_out)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns, size) == (rec.get("src_size"), rec.get("src_mtime_ns"), rec.get("bytes"))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{PARTIAL}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class PrepareReport:
    """What a run did."""

    out: str
    manifest: str
    total: int = 0
    transcoded: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    input_bytes: int = 0
    output_bytes: int = 0
    frames: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        ok = self.total - len(self.failed)
        lines = [f"prepared {ok}/{self.total} videos into {self.out} in {self.seconds:.1f} s: {self.transcoded} "
                 f"transcoded, {self.skipped} skipped (done before with the same spec), {len(self.failed)} failed"]
        if self.transcoded:
            lines.append(f"  transcoded {self.frames} frames ({self.frames / max(self.seconds, 1e-9):.0f} frames/s), "
                         f"{self.input_bytes / 1e6:.1f} MB in -> {self.output_bytes / 1e6:.1f} MB out")
        for path, reason in self.failed:
            lines.append(f"  FAILED {path}: {reason}")
        lines.append(f"  manifest: {self.manifest} ({ok} videos, labels as in the source manifest); "
                     f"spec: {Path(self.out) / SPEC_FILE}")
        return "\n".join(lines)


def prepare(manifest: str | Path, out: str | Path, spec: PrepareSpec, *, fmt: str = "kinetics",
            separator: str = " ", path_prefix: str = "", ssv2_labels: str = "", workers: int = 0,
            progress: bool = True) -> PrepareReport:
    """Transcode every video of ``manifest`` into ``out`` (see the module docstring); returns the report."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    manifest, out = Path(manifest), Path(out)
    if fmt not in ("kinetics", "csv", "ssv2"):
        raise ValueError(f"format={fmt!r}; choose from ['kinetics', 'csv', 'ssv2']")
    entries = read_entries(manifest, fmt, separator, path_prefix, ssv2_labels)
    if not entries:
        raise ValueError(f"manifest {manifest} lists no videos")
    codec = CODECS[spec.codec]
    if fmt == "ssv2" and codec.ext != ".webm":
        logger.warning("SSv2 manifests name videos {id}.webm; the %s outputs are {id}%s, which the SSv2 reader "
                       "(pipelines.manifest.read_ssv2) does not look for", spec.codec, codec.ext)
    base = Path(path_prefix) if path_prefix else manifest.parent
    rel_of = {e.path: (e.key + codec.ext if fmt == "ssv2" else _relative_output(e.path, base, codec.ext))
              for e in entries}
    sources_of: dict[str, set[str]] = {}
    for src, rel in rel_of.items():
        sources_of.setdefault(rel, set()).add(src)
    clashes = {rel: srcs for rel, srcs in sources_of.items() if len(srcs) > 1}
    if clashes:
        rel, srcs = next(iter(clashes.items()))
        raise ValueError(f"{len(clashes)} output name(s) would be shared by different sources, e.g. {rel} <- "
                         f"{sorted(srcs)}; rename the sources so that they differ by more than their extension")
    overwrite = [src for src, rel in rel_of.items() if os.path.abspath(out / rel) == os.path.abspath(src)]
    if overwrite:
        raise ValueError(f"--out {out} would overwrite {len(overwrite)} source(s) in place, e.g. {overwrite[0]}; "
                         f"choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(f".*{PARTIAL}*"):  # left by a killed run
        stale.unlink(missing_ok=True)

    spec_key = spec.key()
    journal = _load_journal(out)
    jobs = [Job(src, rel) for src, rel in rel_of.items()]
    report = PrepareReport(str(out), str(out / (manifest.name if fmt != "ssv2" else manifest.name)), total=len(jobs))
    todo = [j for j in jobs if not _is_done(journal.get(j.rel_out), j, out, spec_key)]
    report.skipped = len(jobs) - len(todo)
    results: dict[str, dict] = {}
    logger.info("%d videos: %d to transcode, %d already done (spec %s)", len(jobs), len(todo), report.skipped,
                spec_key)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(total=len(todo), unit="video", disable=not progress or not todo, desc="prepare")
    with open(out / JOURNAL, "a") as jf:
        def done(res: dict) -> None:
            results[res["src"]] = res
            bar.update(1)
            if res["error"]:
                logger.warning("%s: %s", res["src"], res["error"])
                return
            report.transcoded += 1
            report.frames += res["frames"]
            report.input_bytes += res["src_size"]
            report.output_bytes += res["bytes"]
            jf.write(json.dumps({**{k: res[k] for k in ("out", "src", "src_size", "src_mtime_ns", "frames",
                                                        "bytes", "seconds")}, "spec": spec_key}) + "\n")
            jf.flush()
            os.fsync(jf.fileno())

        jobs_args = [(j, str(out), spec) for j in todo]
        if workers == 1:
            for a in jobs_args:
                done(_run_job(a))
        else:  # forkserver: safe whatever threads the caller runs
            ctx = multiprocessing.get_context("forkserver")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                for fut in as_completed([pool.submit(_run_job, a) for a in jobs_args]):
                    done(fut.result())
    bar.close()

    failed = {src: r["error"] for src, r in results.items() if r["error"]}
    report.failed = [(e.path, failed[e.path]) for e in entries if e.path in failed]
    report.failed = list(dict.fromkeys(report.failed))
    good = [e for e in entries if e.path not in failed]
    if fmt == "ssv2":
        keep = {e.key for e in good}
        items = [it for it in json.loads(manifest.read_text()) if str(it["id"]) in keep]
        _write_atomic(out / manifest.name, json.dumps(items, indent=1) + "\n")
        labels = Path(ssv2_labels or manifest.parent / "something-something-v2-labels.json")
        _write_atomic(out / labels.name, labels.read_text())
    else:
        sep = "," if fmt == "csv" else separator
        _write_atomic(out / manifest.name, "".join(f"{rel_of[e.path]}{sep}{e.label}\n" for e in good))
    report.seconds = time.perf_counter() - t0
    import av

    record = {"spec": asdict(spec), "spec_key": spec_key, "encoder": codec.encoder,
              "encoder_options": _encoder_options(spec), "source_manifest": str(manifest.resolve()),
              "format": fmt, "manifest": manifest.name, "videos": len(good),
              "failed": [{"path": p, "reason": r} for p, r in report.failed],
              "last_run": {"transcoded": report.transcoded, "skipped": report.skipped,
                           "seconds": round(report.seconds, 2)},
              "pyav": av.__version__, "libavcodec": ".".join(map(str, av.library_versions["libavcodec"]))}
    _write_atomic(out / SPEC_FILE, json.dumps(record, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("manifest", help="Kinetics-style 'path label' list, plain CSV, or SSv2 split JSON")
    parser.add_argument("--out", required=True, help="output folder (videos, new manifest, prepare.json)")
    parser.add_argument("--format", choices=["kinetics", "csv", "ssv2"], default="kinetics")
    parser.add_argument("--short-side", type=int, default=256, help="resize the short side to this (0 = keep)")
    parser.add_argument("--codec", choices=sorted(CODECS), default="vp9",
                        help="vp9 (.webm) or mjpeg (.avi): DALI CPU+GPU; h264/hevc (.mp4): DALI GPU / PyAV only")
    parser.add_argument("--gop", default=None, help="keyframe every N frames, 'intra' (= 1), or omit for the "
                        "encoder's default; the sampling rate is a good N for 8xR clips")
    parser.add_argument("--fps", type=float, default=None, help="constant output frame rate (default: the source's)")
    parser.add_argument("--quality", type=int, default=None,
                        help="crf for vp9/h264/hevc (default 32/23/28), qscale 2-31 for mjpeg (default 4)")
    parser.add_argument("--workers", type=int, default=0, help="encoder processes (0 = one per CPU core)")
    parser.add_argument("--separator", default=" ", help="Kinetics manifest separator (data.separator)")
    parser.add_argument("--path-prefix", default="", help="joined before every manifest path (data.path_prefix)")
    parser.add_argument("--ssv2-labels", default="", help="SSv2 labels JSON (with --format ssv2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = PrepareSpec(codec=args.codec, short_side=args.short_side, gop=parse_gop(args.gop), fps=args.fps,
                           quality=args.quality)
        report = prepare(args.manifest, args.out, spec, fmt=args.format, separator=args.separator,
                         path_prefix=args.path_prefix, ssv2_labels=args.ssv2_labels, workers=args.workers,
                         progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
