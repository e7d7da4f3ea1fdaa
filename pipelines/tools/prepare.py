"""Dataset preparation: transcode, resize and re-key a manifest's videos so that decoding matches the sampling.

``python -m timesformer_harness.pipelines.tools.prepare MANIFEST --out DIR [--short-side 256] [--codec
vp9|mjpeg|h264|hevc|auto] [--gop N|intra] [--fps F] [--workers N]`` transcodes every video of MANIFEST
(``timesformer_harness.pipelines.tools.transcode``: PyAV decode, constant frame rate, short-side resize, keyframes
forced every ``--gop`` frames, output checked) into ``DIR/<same relative path>.<ext>``, and writes a new manifest
``DIR/<manifest name>`` with the same labels (Kinetics: ``path<sep>label`` relative to DIR; SSv2: the split JSON,
without failed ids, and the labels JSON as ``DIR/something-something-v2-labels.json``, the name ``data.root=DIR``
reads), and ``DIR/prepare.json`` (the spec, counts, failures; under
``manifests``, those of every manifest prepared into DIR).

A manifest entry may also name a folder of frames (``.jpg``/``.jpeg``/``.png`` images, one kind, in
``manifest.frame_images``' order, as the original's SSv2 frame lists): it becomes one video, its images read at
``--fps`` (default 30) frames per second (``transcode.open_source``). The loaders read folders of JPEG frames
themselves; PNG frames, or frames wanted at another size or rate, come through here.

Why: a clip of 8 frames at rate 32 spans ~256 source frames; with one keyframe per 10 s video the decoder decodes
~all of them to deliver 8 (``timesformer_harness.pipelines.tools.decode_cost``). A GOP of the sampling rate, or
intra-only MJPEG, cuts that, and DALI's CPU decoder reads only VP8/VP9/MJPEG anyway. ``--codec auto`` takes the
format with the most clips/s measured for the GPU generation (``--gpu``, else the visible GPU's) in the decode table
(``timesformer_harness.pipelines.decode_rates.recommend_format``), and VP9 when it has no figure for it.

This module is the resumable batch job around the engine. Safe to kill and re-run: an output gets its final name
only once it is complete and checked; each finished output is appended to ``DIR/prepare.jsonl`` with the spec key
and the source's size and mtime, and a re-run skips outputs whose record matches. Temporaries left by a killed run
are removed at start. A source that fails is reported with its reason; the others go on, and it is left out of the
new manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, TextIO

from timesformer_harness.common import (atomic_write_text, exit_on_sigterm, remove_stale_temporaries,
                                        setup_logging, try_lock)
from timesformer_harness.pipelines.decode_rates import Recommendation, load_rates, recommend_format, table_name
from timesformer_harness.pipelines.manifest import (SSV2_LABELS, SSV2_SPLITS, VideoEntry, add_manifest_arguments,
                                                    manifest_cli_hint, read_entries)
from timesformer_harness.pipelines.nvdec import NVDEC_CODECS, nvdec_problem
from timesformer_harness.pipelines.tools.transcode import (OUTPUT_CODECS, DestinationError, PrepareSpec,
                                                             encoder_options, output_size, source_stat, transcode)

logger = logging.getLogger(__name__)

JOURNAL = "prepare.jsonl"
SPEC_FILE = "prepare.json"


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


@dataclass(frozen=True)
class Job:
    src: str
    rel_out: str  # output path relative to the output folder


def _run_job(args: tuple[Job, str, PrepareSpec]) -> dict:
    """Worker: transcode one job; never raises for a bad source (the reason goes to ``error``)."""
    job, out_dir, spec = args
    t0 = time.perf_counter()
    try:
        if not os.path.exists(job.src):
            raise RuntimeError("missing: no such file or folder")
        src_size, src_mtime_ns = source_stat(job.src)  # before reading it: a source changed meanwhile is redone
        if src_size == 0:
            raise RuntimeError("empty file (0 bytes)")
        made = transcode(job.src, Path(out_dir) / job.rel_out, spec)
    except DestinationError as e:  # the run stops: every other video would fail the same way
        return {"src": job.src, "out": job.rel_out, "error": str(e), "destination": True}
    except Exception as e:
        reason = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        return {"src": job.src, "out": job.rel_out, "error": reason}
    return {"src": job.src, "out": job.rel_out, "error": "", "frames": made.frames, "rotation": made.rotation,
            "size": output_size(made.height, made.width, spec.short_side)[::-1],
            "bytes": os.path.getsize(Path(out_dir) / job.rel_out), "src_size": src_size,
            "src_mtime_ns": src_mtime_ns, "seconds": round(time.perf_counter() - t0, 3)}


def _ignore_stop_signals() -> None:
    """Worker initializer: Ctrl-C and SIGTERM (to the whole process group) are the main process's to handle: it lets
    the videos being encoded finish and journals them (a worker would die with a traceback, its video lost)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _nvdec_size_warning(codec: str, sizes: list[tuple[int, int]]) -> str:
    """Why NVDEC (DALI's GPU decoder, on the default generation) would refuse some of the output ``sizes``
    (width, height) of ``codec`` (``nvdec.nvdec_problem``: the limit and the fix), with how many ("" = none; MJPEG,
    which NVDEC does not decode at all, neither)."""
    if codec not in NVDEC_CODECS:
        return ""
    refused = [why for w, h in sizes if (why := nvdec_problem(SimpleNamespace(codec=codec, width=w, height=h)))]
    return f"{len(refused)} of {len(sizes)} outputs: NVDEC cannot decode them, e.g. {refused[0]}" if refused else ""


def _relative_output(src: str, base: Path, ext: str) -> str:
    """``src`` relative to ``base`` (the manifest folder / path prefix) with the new extension; absolute paths
    outside ``base`` keep their full path under the output folder."""
    p = Path(os.path.abspath(src))
    try:
        rel = p.relative_to(os.path.abspath(base))
    except ValueError:
        rel = p.relative_to(p.anchor)
    return str(rel.with_suffix(ext))


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder ``out`` (``flock`` on its journal): a second prepare into it
    would remove this one's temporaries and write over its outputs. Raises ValueError when another process holds it."""
    f, held = try_lock(out / JOURNAL)
    with f:
        if not held:
            raise ValueError(f"--out {out} is being prepared by another process (it holds the lock on "
                             f"{out / JOURNAL}); wait for it to finish, or prepare into another folder")
        yield


def _claim(out: Path, jobs: list[Job], spec_key: str) -> None:
    """Journal each of ``jobs`` as claimed before any is sent to a worker: a run stopped after a worker renamed an
    output into place but before its ``done`` line leaves a file that is still known as prepare's own (a re-run
    redoes it; an unknown file is refused as another's)."""
    with open(out / JOURNAL, "a") as jf:
        jf.writelines(json.dumps({"out": j.rel_out, "src": os.path.abspath(j.src), "spec": spec_key,
                                  "claimed": True}) + "\n" for j in jobs)
        jf.flush()
        os.fsync(jf.fileno())


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


def _same_source(recorded: object, src: str) -> bool:
    """Whether the journal's ``recorded`` source is the file ``src`` names, however each is spelled (the journal
    holds absolute paths; older journals the path as the manifest gave it, from the folder prepare ran in)."""
    if not isinstance(recorded, str) or not recorded:
        return False
    if os.path.abspath(recorded) == os.path.abspath(src):
        return True
    try:
        return os.path.samefile(recorded, src)
    except OSError:
        return False


def _written_from_another(rec: dict | None, src: str) -> bool:
    """Whether the journal says an output was written from another source file that still exists (writing it again
    would replace a video another manifest lists; a source since moved or deleted is fair to replace)."""
    other = rec.get("src") if rec else None
    if not other or not os.path.exists(other):
        return False
    return not _same_source(other, src) and os.path.exists(src)  # a missing src fails as a source: nothing written


def _is_done(rec: dict | None, job: Job, out: Path, spec_key: str) -> bool:
    if rec is None or rec.get("spec") != spec_key or not _same_source(rec.get("src"), job.src):
        return False
    try:
        src = source_stat(job.src)
        size = os.path.getsize(out / job.rel_out)
    except (OSError, RuntimeError):
        return False
    return (*src, size) == (rec.get("src_size"), rec.get("src_mtime_ns"), rec.get("bytes"))


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


def _output_names(entries: list[VideoEntry], fmt: str, base: Path, ext: str) -> dict[str, str]:
    """Each source's output path relative to the output folder: SSv2 ``{id}<ext>``, else the source's path relative
    to ``base`` (``_relative_output``)."""
    return {e.path: (e.key + ext if fmt == "ssv2" else _relative_output(e.path, base, ext)) for e in entries}


def _refuse_unsafe_outputs(rel_of: dict[str, str], out: Path, manifest: Path, labels: Path, fmt: str) -> None:
    """Raise ValueError, before anything is written, when two sources would share an output name, an output would
    overwrite its source, or the new manifest (SSv2: or labels) would replace the source's."""
    sources_of: dict[str, set[str]] = {}
    for src, rel in rel_of.items():
        sources_of.setdefault(rel, set()).add(src)
    clashes = {rel: srcs for rel, srcs in sources_of.items() if len(srcs) > 1}
    if clashes:
        rel, srcs = next(iter(clashes.items()))
        raise ValueError(f"{len(clashes)} output name(s) would be shared by different sources, e.g. {rel} <- "
                         f"{sorted(srcs)}; rename the sources so that they differ by more than their extension")
    # real paths: an --out that is (or passes through) a symlink to the sources' folder is that folder
    overwrite = [src for src, rel in rel_of.items() if os.path.realpath(out / rel) == os.path.realpath(src)]
    if overwrite:
        raise ValueError(f"--out {out} would overwrite {len(overwrite)} source(s) in place, e.g. {overwrite[0]}; "
                         f"choose another output folder")
    sources = [manifest, labels] if fmt == "ssv2" else [manifest]
    replaced = [p for p in ([out / manifest.name, out / SSV2_LABELS] if fmt == "ssv2" else [out / manifest.name])
                if any(os.path.realpath(p) == os.path.realpath(s) for s in sources)]
    if replaced:
        raise ValueError(f"--out {out} would replace the source manifest {replaced[0]} with the prepared one; "
                         "choose another output folder")


def _make_output_folder(out: Path) -> None:
    """Create ``out`` (and its parents); ValueError when it, or a folder above it, is a file."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"--out {out} cannot be a folder: it, or a folder above it, is a file; choose another output "
                         "folder") from None


def _warn_other_specs(out: Path, manifest_name: str, prepared: dict[str, dict], spec_key: str) -> None:
    """Warn when ``out`` holds other manifests ``prepared`` with another spec than ``spec_key``."""
    other_specs = {name: m["spec_key"] for name, m in prepared.items() if name != manifest_name
                   and m.get("spec_key") != spec_key}
    if other_specs:
        logger.warning("%s also holds %s, prepared with another spec (%s), not this one's %s: their videos differ "
                       "(size, codec or keyframes); prepare every manifest of a dataset with the same options",
                       out, ", ".join(other_specs), ", ".join(sorted(set(other_specs.values()))), spec_key)


def _refuse_outputs_of_others(out: Path, jobs: list[Job], journal: dict[str, dict]) -> None:
    """Raise ValueError when an output name of ``jobs`` is taken in ``out``: written from another source that still
    exists (per the journal), or by a file prepare did not write."""
    taken = [(j, journal[j.rel_out]["src"]) for j in jobs if _written_from_another(journal.get(j.rel_out), j.src)]
    if taken:  # e.g. train's x.mp4 and val's x.webm, prepared one manifest at a time into one folder
        job, other = taken[0]
        raise ValueError(f"--out {out}: {len(taken)} output name(s) were written from other sources that still "
                         f"exist (another manifest prepared into this folder?), e.g. {job.rel_out} <- {other}, now "
                         f"asked from {job.src}; rename the sources so that they differ by more than their "
                         "extension, or prepare this manifest into another folder")
    foreign = [j.rel_out for j in jobs if j.rel_out not in journal and os.path.lexists(out / j.rel_out)]
    if foreign:  # e.g. clip.webm of another manifest, beside this one's clip.mp4 in the folder given as --out
        raise ValueError(f"--out {out}: {len(foreign)} output name(s) are taken by files prepare did not write "
                         f"(not in its {JOURNAL}), e.g. {out / foreign[0]}; move them away (delete them if a "
                         "killed prepare left them) or choose another output folder")


class _Results:
    """Takes the jobs' results as they come: journals each finished output at once (to the open journal ``jf``),
    counts it in ``report``, and notes the errors writing to --out (``stopped``: the run stops at the first)."""

    def __init__(self, jf: TextIO, spec_key: str, report: PrepareReport, bar: Any) -> None:
        self.jf, self.spec_key, self.report, self.bar = jf, spec_key, report, bar
        self.by_src: dict[str, dict] = {}
        self.stopped: list[str] = []

    def take(self, res: dict) -> None:
        """Take one job's result (``_run_job``'s)."""
        if res.get("destination"):
            self.stopped.append(res["error"])
            return
        self.by_src[res["src"]] = res
        self.bar.update(1)
        if res["error"]:
            logger.warning("%s: %s", res["src"], res["error"])
            return
        if res["rotation"]:
            logger.warning("%s: its frames carry a display rotation of %d degrees (a phone video?); the output "
                           "is written as stored, without it, as the harness's loaders read every video: to "
                           "have it upright, rotate the source first (ffmpeg -i IN OUT applies the "
                           "rotation, -autorotate being on by default; or -vf transpose=1) and prepare that",
                           res["src"], res["rotation"])
        report = self.report
        report.transcoded += 1
        report.frames += res["frames"]
        report.input_bytes += res["src_size"]
        report.output_bytes += res["bytes"]
        self.jf.write(json.dumps({**{k: res[k] for k in ("out", "src_size", "src_mtime_ns", "frames", "bytes",
                                                         "seconds")}, "src": os.path.abspath(res["src"]),
                                  "spec": self.spec_key}) + "\n")
        self.jf.flush()
        os.fsync(self.jf.fileno())


def _run_serially(jobs_args: list[tuple[Job, str, PrepareSpec]], results: _Results) -> None:
    """Run the jobs one after the other in this process, stopping at the first error writing to --out."""
    for a in jobs_args:
        results.take(_run_job(a))
        if results.stopped:
            break


def _run_in_pool(jobs_args: list[tuple[Job, str, PrepareSpec]], workers: int, results: _Results) -> None:
    """Run the jobs in ``workers`` processes. At the first error writing to --out no other job starts (those being
    encoded are still taken); on Ctrl-C or SIGTERM the running ones are finished and taken, then it re-raises."""
    ctx = multiprocessing.get_context("forkserver")  # forkserver: safe whatever threads the caller runs
    # The forkserver forks the workers; started with SIGTERM ignored (an ignored signal stays ignored across its
    # exec), a SIGTERM to the process group does not kill it, which broke the pool: a traceback, and workers left
    # encoding after the lock was gone. (Its resource tracker ignores SIGTERM of itself.)
    if threading.current_thread() is threading.main_thread():  # signal.signal works there only
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGTERM, previous)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_ignore_stop_signals) as pool:
        pending: set[Future] = set()
        try:  # a Ctrl-C while they are submitted cancels those submitted too
            for a in jobs_args:
                pending.add(pool.submit(_run_job, a))
            for fut in as_completed(set(pending)):
                if fut.cancelled():
                    continue
                results.take(fut.result())
                pending.discard(fut)  # after take(): a Ctrl-C inside it journals the result again
                if results.stopped:  # no other video is started; those being encoded are journaled when done
                    for f in pending:
                        f.cancel()
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM through common.exit_on_sigterm
            # the pool hands a worker's next job over ahead of time: that one cannot be cancelled, and is finished too
            logger.warning("interrupted: finishing the videos being encoded, starting no other")
            for fut in as_completed([f for f in pending if not f.cancel()]):  # running or finished
                results.take(fut.result())
            raise


def _run_jobs(out: Path, todo: list[Job], spec: PrepareSpec, spec_key: str, report: PrepareReport, workers: int,
              progress: bool) -> dict[str, dict]:
    """Transcode ``todo`` into ``out`` (``workers`` processes, 0 = one per CPU core), journaling each result as it
    comes; returns the results by source. Raises DestinationError when an output could not be written."""
    from tqdm import tqdm

    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(total=len(todo), unit="video", disable=not progress or not todo, desc="prepare")
    with open(out / JOURNAL, "a") as jf:
        results = _Results(jf, spec_key, report, bar)
        jobs_args = [(j, str(out), spec) for j in todo]
        if workers == 1:
            _run_serially(jobs_args, results)
        else:
            _run_in_pool(jobs_args, workers, results)
    bar.close()
    if results.stopped:  # the manifest is left as it was: a shrunken one would drop the videos not reached
        raise DestinationError(f"{results.stopped[0]}; the run stopped there: the videos finished are in "
                               f"{out / JOURNAL} (a re-run skips them) and the manifest was left as it was")
    return results.by_src


def _write_manifest(out: Path, manifest: Path, fmt: str, good: list[VideoEntry], rel_of: dict[str, str],
                    separator: str, labels: Path) -> None:
    """Write the new manifest ``out/<manifest name>`` of the ``good`` entries, in the source's format (SSv2: also
    the labels JSON)."""
    if fmt == "ssv2":
        keep = {e.key for e in good}
        items = [it for it in json.loads(manifest.read_text()) if str(it["id"]) in keep]
        atomic_write_text(out / manifest.name, json.dumps(items, indent=1) + "\n")
        # under the name data.ssv2_labels defaults to, whatever the source's: data.root=DIR then reads it
        atomic_write_text(out / SSV2_LABELS, labels.read_text())
        if manifest.name not in SSV2_SPLITS.values():
            logger.warning("%s is not a split file name data.root=%s looks for (%s): point data.train_manifest "
                           "(or data.val_manifest / data.test_manifest) at %s", manifest.name, out,
                           ", ".join(sorted(set(SSV2_SPLITS.values()))), out / manifest.name)
    elif fmt == "csv":  # quoted where a path holds a comma or a quote, as the reader (csv.reader) expects
        lines = io.StringIO()
        csv.writer(lines, lineterminator="\n").writerows((rel_of[e.path], e.label) for e in good)
        atomic_write_text(out / manifest.name, lines.getvalue())
    else:
        atomic_write_text(out / manifest.name, "".join(f"{rel_of[e.path]}{separator}{e.label}\n" for e in good))


def _write_spec_record(out: Path, manifest: Path, fmt: str, spec: PrepareSpec, spec_key: str, videos: int,
                       report: PrepareReport, prepared: dict[str, dict]) -> None:
    """Write ``out/prepare.json``: this run's spec, counts and failures, the encoder's versions, and under
    ``manifests`` the record of every manifest prepared into ``out`` (``prepared``, with this one's)."""
    import av

    this = {"spec": asdict(spec), "spec_key": spec_key, "source_manifest": str(manifest.resolve()), "format": fmt,
            "videos": videos, "failed": [{"path": p, "reason": r} for p, r in report.failed],
            "last_run": {"transcoded": report.transcoded, "skipped": report.skipped,
                         "seconds": round(report.seconds, 2)}}
    record = {**this, "encoder": spec.output_codec.encoder, "encoder_options": encoder_options(spec),
              "manifest": manifest.name, "pyav": av.__version__,
              "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
              "manifests": {**prepared, manifest.name: this}}  # the top level: this (the latest) manifest's
    atomic_write_text(out / SPEC_FILE, json.dumps(record, indent=1) + "\n")


def prepare(manifest: str | Path, out: str | Path, spec: PrepareSpec, *, fmt: str = "kinetics",
            separator: str = " ", path_prefix: str = "", ssv2_labels: str = "", ssv2_suffix: str = ".webm",
            workers: int = 0, progress: bool = True) -> PrepareReport:
    """Transcode every video of ``manifest`` into ``out`` (see the module docstring); returns the report."""
    t0 = time.perf_counter()
    manifest, out = Path(manifest), Path(out)
    entries = read_entries(manifest, fmt, separator=separator, path_prefix=path_prefix, ssv2_labels=ssv2_labels,
                           ssv2_suffix=ssv2_suffix)
    ext = spec.output_codec.ext
    if fmt == "ssv2" and ext != ".webm":
        logger.warning("the SSv2 videos written are {id}%s: read them with data.ssv2_suffix=%s (--ssv2-suffix %s)",
                       ext, ext, ext)
    rel_of = _output_names(entries, fmt, Path(path_prefix) if path_prefix else manifest.parent, ext)
    labels = Path(ssv2_labels or manifest.parent / SSV2_LABELS)
    _refuse_unsafe_outputs(rel_of, out, manifest, labels, fmt)
    _make_output_folder(out)
    with _exclusive(out):
        remove_stale_temporaries(out)  # left by a killed run
        spec_key = spec.key()
        prepared = _prepared_manifests(out)
        _warn_other_specs(out, manifest.name, prepared, spec_key)
        journal = _load_journal(out)
        jobs = [Job(src, rel) for src, rel in rel_of.items()]
        _refuse_outputs_of_others(out, jobs, journal)

        report = PrepareReport(str(out), str(out / manifest.name), total=len(jobs))
        todo = [j for j in jobs if not _is_done(journal.get(j.rel_out), j, out, spec_key)]
        _claim(out, todo, spec_key)
        report.skipped = len(jobs) - len(todo)
        logger.info("%d videos: %d to transcode, %d already done (spec %s)", len(jobs), len(todo), report.skipped,
                    spec_key)
        results = _run_jobs(out, todo, spec, spec_key, report, workers, progress)

        if warning := _nvdec_size_warning(spec.codec, [tuple(r["size"]) for r in results.values() if not r["error"]]):
            logger.warning("%s", warning)
        failed = {src: r["error"] for src, r in results.items() if r["error"]}
        report.failed = list(dict.fromkeys((e.path, failed[e.path]) for e in entries if e.path in failed))
        good = [e for e in entries if e.path not in failed]
        _write_manifest(out, manifest, fmt, good, rel_of, separator, labels)
        report.seconds = time.perf_counter() - t0
        _write_spec_record(out, manifest, fmt, spec, spec_key, len(good), report, prepared)
        return report


def _prepared_manifests(out: Path) -> dict[str, dict]:
    """The record of each manifest prepared into ``out`` before (``prepare.json``'s ``manifests``; a file written
    before it had them: its one manifest), by manifest name; {} when there is none or it cannot be read."""
    try:
        record = json.loads((out / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    if isinstance(record.get("manifests"), dict):
        return record["manifests"]
    keys = ("spec", "spec_key", "source_manifest", "format", "videos", "failed", "last_run")
    return {record["manifest"]: {k: record[k] for k in keys if k in record}} if record.get("manifest") else {}


def recommended(gpu: str | None, short_side: int, gop: int | None, rates: str = "") -> tuple[Recommendation, str]:
    """``--codec auto``'s format for the GPU generation ``gpu`` names (None: the visible GPU's, else the default) from
    the decode table ``rates`` names ("" = the shipped one), and where the generation came from."""
    from timesformer_harness.pipelines.nvdec import resolve_generation

    generation, source = resolve_generation(gpu, "--gpu")
    return recommend_format(load_rates(rates), generation, OUTPUT_CODECS, short_side, gop, table_name(rates)), source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.pipelines.tools.prepare",
                                     description=__doc__.split("\n")[0])
    add_manifest_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (videos, new manifest, prepare.json)")
    parser.add_argument("--short-side", type=int, default=256, help="resize the short side to this (0 = keep; an odd "
                        "width or height loses its last pixel column or row: 4:2:0 needs even sides)")
    parser.add_argument("--codec", choices=[*sorted(OUTPUT_CODECS), "auto"], default="vp9",
                        help="vp9 (.webm): DALI CPU and GPU; mjpeg (.avi): DALI CPU, or nvJPEG on a GPU (not NVDEC); "
                             "h264/hevc (.mp4): DALI GPU / PyAV only; auto: the format (and, without --gop, the GOP) "
                             "with the most clips/s measured for --gpu's generation in the decode table "
                             "(configs/measured/decode_rates.yaml), vp9 when it has no figure")
    parser.add_argument("--gop", default=None, help="keyframe every N frames, 'intra' (= 1), or omit for the "
                        "encoder's default; the sampling rate is a good N for 8xR clips")
    parser.add_argument("--gpu", default=None, help="--codec auto: the GPU generation to prepare for (hopper, "
                        "ampere_ga100, ... or a compute capability such as sm90; default: the visible GPU's, else "
                        "hopper)")
    parser.add_argument("--decode-rates", default="", help="--codec auto: the decode table to read (default: the "
                        "shipped configs/measured/decode_rates.yaml)")
    parser.add_argument("--fps", type=float, default=None, help="constant output frame rate (default: the source's)")
    parser.add_argument("--quality", type=int, default=None,
                        help="crf for vp9/h264/hevc (default 32/23/28), qscale 2-31 for mjpeg (default 4)")
    parser.add_argument("--workers", type=int, default=0, help="encoder processes (0 = one per CPU core)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    setup_logging()
    exit_on_sigterm()
    try:
        codec, gop, chose = args.codec, parse_gop(args.gop), ""
        if codec == "auto":
            rec, where = recommended(args.gpu, args.short_side, gop, args.decode_rates)
            codec, gop = rec.codec, rec.gop
            chose = f"--codec auto for {where}: {codec}, GOP {gop or 'the encoder default'}, because {rec.why}"
            logger.info("%s", chose)
        spec = PrepareSpec(codec=codec, short_side=args.short_side, gop=gop, fps=args.fps, quality=args.quality)
        report = prepare(args.manifest, args.out, spec, fmt=args.format, separator=args.separator,
                         path_prefix=args.path_prefix, ssv2_labels=args.ssv2_labels, ssv2_suffix=args.ssv2_suffix,
                         workers=args.workers, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {manifest_cli_hint(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # DestinationError (a full disk, ...), or writing the journal, manifest or prepare.json
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or SIGTERM through exit_on_sigterm
        print(f"error: interrupted: the videos finished are in {Path(args.out) / JOURNAL} (a re-run skips them); "
              "the manifest was not written", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    print(report.summary() + (f"\n  {chose}" if chose else ""))
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
