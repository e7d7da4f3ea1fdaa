"""Pre-flight check of a video manifest with PyAV: every file exists, opens, has a codec the chosen decoder
handles, is complete and long enough for the clip span.

``python -m timesformer_harness.pipelines.validate MANIFEST [--backend cpu|gpu|pyav] [--frames T --sampling-rate R]
[--pad]`` prints each unusable file with its reason and a summary; exit status 0 when all are usable, 1 otherwise.

Probing a file (stat, open, demux every packet to count frames, decode the first frame, compare the demuxed length
with the container's declared duration to catch truncation) does not depend on the backend, so its result is
cached in SQLite by (path, size, mtime) and a large manifest is probed once; files are probed in parallel
processes. ``timesformer_harness.pipelines.factory.build_loader`` runs the same check (``data.on_bad_video: error |
skip``), because DALI's readers drop bad files silently and its decoder kills the pipeline on them.

``--backend gpu`` applies NVDEC's limits (``timesformer_harness.pipelines.nvdec``: codec per GPU generation, minimum and
maximum frame size, 8-bit 4:2:0) for the visible GPU's generation, else for ``--gpu-arch`` (default: Hopper).

``--deep`` (``data.validate: deep``) also decodes every packet of every file that passes (``deep_probe``), to find
damage inside the coded stream, which the probe cannot see and which stops a decoder mid-run; it costs about one
epoch of decoding, runs in parallel processes and is cached next to the probes (keyed also by the libavcodec
version, since the verdict is the decoder's).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from timesformer_harness.common import FileCache, cache_path
from timesformer_harness.pipelines.nvdec import DALI_CPU_CODECS, DEFAULT_GENERATION, NVDEC_CODECS, nvdec_problem

logger = logging.getLogger(__name__)

# The codecs DALI 2.4's video decoder handles per device (CPU: libavcodec's VP8/VP9/MJPEG; GPU: NVDEC, whose further
# limits are in timesformer_harness.pipelines.nvdec); None = PyAV, which decodes everything FFmpeg does.
DECODABLE_CODECS = {"cpu": set(DALI_CPU_CODECS), "gpu": set(NVDEC_CODECS), "pyav": None}
_CODEC_ALIASES = {"libvpx": "vp8", "libvpx-vp9": "vp9", "libdav1d": "av1", "libaom-av1": "av1", "h265": "hevc"}
DEFAULT_CACHE = cache_path("")  # the probe cache when data.validate_cache is unset
PROBE_VERSION = 2  # 2: pixel format, bit depth and chroma


@dataclass
class VideoInfo:
    """What a probe learnt about one file (``error`` set when it cannot be used by any decoder)."""

    path: str
    error: str = ""
    codec: str = ""
    frames: int = 0
    fps: float = 0.0
    height: int = 0
    width: int = 0
    pix_fmt: str = ""  # of the first decoded frame, e.g. yuv420p
    bit_depth: int = 0  # bits per sample
    chroma: str = ""  # chroma subsampling: 420 | 422 | 444 | 400 (gray) | rgb


def _chroma(fmt, width: int, height: int) -> str:
    """Chroma subsampling of a PyAV ``VideoFormat`` as ``420``/``422``/``444``, ``400`` (gray) or ``rgb``."""
    if fmt.is_rgb:
        return "rgb"
    if len(fmt.components) == 1:
        return "400"
    cw, ch = fmt.chroma_width(width), fmt.chroma_height(height)
    if cw == width:
        return "444" if ch == height else "440"
    if ch == height:
        return "422" if 2 * cw >= width else "411"
    return "420"


def probe_video(path: str) -> VideoInfo:
    """Open ``path`` with PyAV and measure it; never raises for a bad file (the reason goes to ``error``)."""
    import av

    info = VideoInfo(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        info.error = "missing: no such file"
        return info
    except OSError as e:
        info.error = f"unreadable: {e}"
        return info
    if size == 0:
        info.error = "empty file (0 bytes)"
        return info
    try:
        with av.open(path) as container:
            if not container.streams.video:
                info.error = "no video stream"
                return info
            stream = container.streams.video[0]
            if stream.codec_context is None:  # the header names a codec FFmpeg does not know (e.g. damaged)
                info.error = "unknown codec: the video stream's codec id is not one FFmpeg knows (damaged header?)"
                return info
            name = stream.codec_context.name
            info.codec = _CODEC_ALIASES.get(name, name)
            info.height, info.width = stream.codec_context.height, stream.codec_context.width
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            info.fps = float(rate) if rate else 0.0
            last_pts, first_pts = None, None
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                info.frames += 1
                if packet.pts is not None:
                    first_pts = packet.pts if first_pts is None else min(first_pts, packet.pts)
                    last_pts = packet.pts if last_pts is None else max(last_pts, packet.pts)
            declared = container.duration / 1e6 if container.duration else None  # microseconds -> s
            if info.frames == 0:
                info.error = "no video frames"
                return info
            if declared and info.fps and last_pts is not None and stream.time_base:
                present = float((last_pts - first_pts) * stream.time_base) + 1.0 / info.fps
                if present < 0.9 * declared - 2.0 / info.fps:
                    info.error = (f"truncated: the container declares {declared:.2f} s but frames cover only "
                                  f"{present:.2f} s")
                    return info
        with av.open(path) as container:  # decode the first frame
            frame = next(container.decode(video=0), None)
            if frame is None:
                info.error = "no decodable frame"
            else:
                info.pix_fmt = frame.format.name
                info.bit_depth = max(c.bits for c in frame.format.components)
                info.chroma = _chroma(frame.format, frame.width, frame.height)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as e:
        info.error = f"cannot open/decode: {type(e).__name__}: {e}"
    return info


def usable(info: VideoInfo, backend: str, min_frames: int, gpu_arch: str = DEFAULT_GENERATION) -> str:
    """Why ``info``'s video cannot be used by ``backend`` for clips of ``min_frames`` frames ("" = usable); on the
    gpu backend, by NVDEC on a ``gpu_arch`` GPU (``timesformer_harness.pipelines.nvdec.generation_of``)."""
    if info.error:
        return info.error
    allowed = DECODABLE_CODECS[backend]
    if backend == "gpu":
        if problem := nvdec_problem(info, gpu_arch):
            return problem
    elif allowed is not None and info.codec not in allowed:
        return (f"codec {info.codec} is not decodable by DALI's {backend} backend (it decodes {sorted(allowed)}); "
                f"re-encode (e.g. VP9) or use data.loader=pyav / a GPU")
    if info.frames < min_frames:
        return (f"too short: {info.frames} frames < {min_frames} needed by the clip span "
                f"(set data.pad_short=true to pad with the last frame)")
    return ""


def required_frames(info: VideoInfo, num_frames: int, sampling_rate: int, target_fps: float, pad: bool,
                    segment: bool = False) -> int:
    """Frames a video needs: the clip span at its fps (Kinetics), T (segment sampling), or 1 when padding."""
    if pad:
        return 1
    if segment:
        return num_frames
    fps = info.fps or target_fps
    return max(1, math.ceil(sampling_rate * num_frames / target_fps * fps - 1e-6))


class ProbeCache:
    """The probe's results, per file as it is now (``timesformer_harness.common.FileCache``, table ``probe``)."""

    def __init__(self, path: str | Path | None):
        self.store = FileCache(path, "probe", PROBE_VERSION)

    def get(self, path: str) -> VideoInfo | None:
        found = self.store.get(path)
        return VideoInfo(**{**json.loads(found[0]), "path": path}) if found is not None else None

    def put(self, infos: list[VideoInfo]) -> None:
        self.store.put((i.path, json.dumps(asdict(i)), None) for i in infos)


def probe_all(paths: list[str], cache: str | Path | None = DEFAULT_CACHE, workers: int = 0) -> list[VideoInfo]:
    """Probe every path (cached, in parallel: processes for many files, threads for a few)."""
    store = ProbeCache(cache)
    infos: list[VideoInfo | None] = [store.get(p) for p in paths]
    todo = [i for i, info in enumerate(infos) if info is None]
    if todo:
        workers = workers or os.cpu_count() or 1
        n = max(1, min(workers, len(todo)))
        if len(todo) > 64 and workers > 1:  # forkserver: the caller may already run DALI/CUDA threads
            pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("forkserver"))
        else:
            pool = ThreadPoolExecutor(n)
        with pool:
            fresh = list(pool.map(probe_video, [paths[i] for i in todo], chunksize=16))
        for i, info in zip(todo, fresh):
            infos[i] = info
        store.put(fresh)
        logger.info("probed %d videos (%d from cache)", len(todo), len(paths) - len(todo))
    return infos  # type: ignore[return-value]


def check_videos(paths: list[str], backend: str, num_frames: int, sampling_rate: int, target_fps: float = 30,
                 pad: bool = False, segment: bool = False, cache: str | Path | None = DEFAULT_CACHE,
                 workers: int = 0, gpu_arch: str = DEFAULT_GENERATION
                 ) -> tuple[list[VideoInfo], list[tuple[str, str]]]:
    """Probe ``paths`` and judge them for ``backend`` (gpu: NVDEC of a ``gpu_arch`` GPU). Returns (infos in order,
    [(path, reason)] of the unusable)."""
    if backend not in DECODABLE_CODECS:
        raise ValueError(f"backend={backend!r}; choose from {sorted(DECODABLE_CODECS)}")
    infos = probe_all(paths, cache, workers)
    return infos, judge(infos, backend, num_frames, sampling_rate, target_fps, pad, segment, gpu_arch)


def judge(infos: list[VideoInfo], backend: str, num_frames: int, sampling_rate: int, target_fps: float = 30,
          pad: bool = False, segment: bool = False, gpu_arch: str = DEFAULT_GENERATION) -> list[tuple[str, str]]:
    """[(path, reason)] of the probed videos that ``backend`` (gpu: NVDEC of a ``gpu_arch`` GPU) cannot use for
    these clips."""
    rejected = []
    for info in infos:
        reason = usable(info, backend, required_frames(info, num_frames, sampling_rate, target_fps, pad, segment),
                        gpu_arch)
        if reason:
            rejected.append((info.path, reason))
    return rejected


DEEP_VERSION = 1  # bump when deep_probe's verdicts change (cached verdicts of other versions are ignored)


def deep_probe(path: str) -> str:
    """Decode every packet of ``path``'s first video stream with PyAV; the reason it is unusable, or "".

    A file fails when the decoder raises (what stops both loaders), returns fewer frames than there are packets
    (the probe counted the packets, so a plan would ask for frames that never come: DALI returns black ones), when
    the frame size changes inside the stream (a damaged frame header: the clip's frames no longer stack), or when the
    demuxer reports an error (a damaged container, which a decoder may read differently from run to run). Decoder
    messages that do not stop decoding (H.264's ``mmco: unref short failure`` is common in healthy files) and gaps in
    the timestamps (a variable-frame-rate file has them too) do not fail a file: such damage decodes, with artifacts.
    Changes PyAV's global log level while it runs: call it from one thread (``deep_check`` runs it in processes).
    """
    import av
    import av.logging

    packets = frames = 0
    size = None
    size_changes = 0
    error = ""
    codec = ""
    old_level = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)  # PyAV's default (None) hands FFmpeg's messages to nobody
    try:
        with av.logging.Capture() as logs:
            try:
                with av.open(path) as container:
                    if not container.streams.video:
                        return "no video stream"
                    stream = container.streams.video[0]
                    if stream.codec_context is None:
                        return "unknown codec: the video stream's codec id is not one FFmpeg knows (damaged header?)"
                    codec = stream.codec_context.name
                    stream.thread_count = 1  # parallelism comes from one process per file
                    for packet in container.demux(stream):
                        packets += packet.size > 0
                        for frame in packet.decode():  # the final empty packet drains the decoder
                            frames += 1
                            if size is not None and (frame.width, frame.height) != size:
                                size_changes += 1
                            size = (frame.width, frame.height)
            except (av.error.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as e:
                error = f"decode error after {packets} packets, {frames} frames: {type(e).__name__}: {e}"
    finally:
        av.logging.set_level(old_level)
    if error:
        return error
    demux_errors = [f"{name}: {msg.strip()}" for level, name, msg in logs
                    if level <= av.logging.ERROR and name != codec]  # decoder lines carry the codec's name
    if packets == 0:
        return "no video packets"
    if frames < packets:
        return f"the decoder returned {frames} frames for {packets} packets (frames dropped)"
    if size_changes:
        return f"the frame size changes {size_changes} time(s) inside the stream (a damaged frame header)"
    if demux_errors:
        return f"damaged container: {demux_errors[0]}"
    return ""


def deep_check(paths: list[str], cache: str | Path | None = DEFAULT_CACHE, workers: int = 0
               ) -> list[tuple[str, str]]:
    """``deep_probe`` every path (cached; the others in ``workers`` processes, 0 = one per core). Returns
    [(path, reason)] of the files that fail, in the order of ``paths``."""
    import av

    lib = ".".join(map(str, av.library_versions.get("libavcodec", (0,))))
    store = FileCache(cache, "deep", f"{DEEP_VERSION}/libavcodec-{lib}")
    verdicts: list[str | None] = []
    for p in paths:
        found = store.get(p)
        verdicts.append(None if found is None else json.loads(found[0])["error"])
    todo = [i for i, v in enumerate(verdicts) if v is None]
    if todo:
        t0 = time.perf_counter()
        n = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        if n == 1:
            fresh = [deep_probe(paths[i]) for i in todo]
        else:  # forkserver: the caller may already run DALI/CUDA threads
            with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("forkserver")) as pool:
                fresh = list(pool.map(deep_probe, [paths[i] for i in todo], chunksize=4))
        for i, verdict in zip(todo, fresh):
            verdicts[i] = verdict
        store.put((paths[i], json.dumps({"error": v}), None) for i, v in zip(todo, fresh))
        seconds = time.perf_counter() - t0
        logger.info("deep-checked %d videos in %.1f s (%.1f files/s, %d processes; %d from cache)", len(todo),
                    seconds, len(todo) / max(seconds, 1e-9), n, len(paths) - len(todo))
    return [(p, f"deep check: {v}") for p, v in zip(paths, verdicts) if v]


def main(argv: list[str] | None = None) -> int:
    from timesformer_harness.pipelines.config import DataConfig
    from timesformer_harness.common import setup_logging
    from timesformer_harness.pipelines.manifest import add_manifest_arguments, read_entries

    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.pipelines.validate",

                                     description=__doc__.split("\n")[0])
    add_manifest_arguments(parser)
    parser.add_argument("--backend", choices=sorted(DECODABLE_CODECS), default="cpu",
                        help="decoder the files must suit: DALI cpu (VP8/VP9/MJPEG), DALI gpu, or pyav (any)")
    parser.add_argument("--gpu-arch", default=None,
                        help="with --backend gpu: the GPU generation to judge NVDEC for (e.g. hopper, ampere_ga10x, "
                             "ada, or a compute capability such as sm86); default: the visible GPU's, else hopper")
    parser.add_argument("--frames", type=int, default=DataConfig.num_frames, help="T, frames per clip")
    parser.add_argument("--sampling-rate", type=int, default=DataConfig.sampling_rate)
    parser.add_argument("--target-fps", type=float, default=DataConfig.target_fps)
    parser.add_argument("--pad", action="store_true", help="accept videos shorter than the span (data.pad_short)")
    parser.add_argument("--num-classes", type=int, default=0,
                        help="labels must be below it (model.num_classes); 0 = labels not checked")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="SQLite probe cache ('' = none)")
    parser.add_argument("--workers", type=int, default=0, help="parallel probes (0 = one per CPU core)")
    parser.add_argument("--report", default=None, metavar="FILE",
                        help="also write the verdict as JSON: the backend, the GPU generation judged for, the counts "
                             "and every rejected file with its reason")
    parser.add_argument("--deep", action="store_true",
                        help="also decode every packet of each usable file (finds damage inside the stream; costs "
                             "about one epoch of decoding, cached)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        entries = read_entries(args.manifest, args.format, separator=args.separator, path_prefix=args.path_prefix,
                               ssv2_labels=args.ssv2_labels, num_classes=args.num_classes)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    gpu_arch, judged_for = DEFAULT_GENERATION, None
    if args.backend == "gpu":
        from timesformer_harness.pipelines.nvdec import resolve_generation

        try:
            gpu_arch, source = resolve_generation(args.gpu_arch)
        except ValueError as e:
            print(f"error: --gpu-arch: {e}", file=sys.stderr)
            return 1
        judged_for = source
        print(f"judging NVDEC decode for {source}")
    _, rejected = check_videos([e.path for e in entries], args.backend, args.frames, args.sampling_rate,
                               args.target_fps, args.pad, args.format == "ssv2", args.cache or None, args.workers,
                               gpu_arch)
    if args.deep:
        shallow = {p for p, _ in rejected}
        paths = [e.path for e in entries if e.path not in shallow]
        t0 = time.perf_counter()
        deep = deep_check(paths, args.cache or None, args.workers)
        seconds = time.perf_counter() - t0
        print(f"deep check: {len(paths)} videos decoded in {seconds:.1f} s ({len(paths) / max(seconds, 1e-9):.1f} "
              f"files/s, cached ones included); {len(deep)} fail")
        rejected += deep
    for path, reason in rejected:
        print(f"{path}: {reason}")
    print(f"{len(entries) - len(rejected)}/{len(entries)} videos usable by the {args.backend} backend "
          f"({len(rejected)} rejected)")
    if args.report:
        from timesformer_harness.common import atomic_write_text

        atomic_write_text(args.report, json.dumps({
            "manifest": str(args.manifest), "backend": args.backend, "gpu_arch": gpu_arch, "judged_for": judged_for,
            "deep": args.deep, "videos": len(entries), "usable": len(entries) - len(rejected),
            "rejected": [{"path": p, "reason": r} for p, r in rejected]}, indent=2) + "\n")
    bad = {p for p, _ in rejected}
    usable_paths = [e.path for e in entries if e.path not in bad]
    if usable_paths and args.format != "ssv2":  # frames decoded per clip, median and worst file (Kinetics sampling)
        from timesformer_harness.pipelines.tools.decode_cost import estimate_manifest_decode_cost, format_decode_cost

        print(format_decode_cost(estimate_manifest_decode_cost(usable_paths, args.frames, args.sampling_rate,
                                                               args.target_fps, workers=args.workers, max_files=1000)))
    return 1 if rejected else 0


if __name__ == "__main__":
    raise SystemExit(main())
