"""Pre-flight check of a video manifest with PyAV: every file exists, opens, has a codec the chosen decoder
handles, is complete and long enough for the clip span.

``python -m timesformer_harness.pipelines.validate MANIFEST [--backend cpu|gpu|pyav] [--frames T --sampling-rate R]
[--pad] [--max-frame-pixels N] [--cache PATH|none] [--log-every SECONDS]`` prints each unusable file with its reason
(whose fix names these flags) and a summary; exit status 0 when all are usable, 1 otherwise, 130 when interrupted
(Ctrl-C). ``python -m timesformer_harness.validate --config my.yaml`` runs the same check with a run's own settings
(``timesformer_harness.pipelines.factory.preflight``).

Probing a file (stat, the file-size checks of ``size_problem``, open, demux every packet of the first video stream
to count frames, decode the first frame, compare the demuxed length with the declared duration to catch truncation)
does not depend on the backend, so its result is cached in SQLite by (path, size, mtime) and a large manifest is
probed once; files are probed in parallel processes. Frames above ``data.max_frame_pixels`` (``--max-frame-pixels``)
are refused from the header by the judge (``usable``), so no frame of such a file is ever decoded.
``timesformer_harness.pipelines.factory.build_loader`` runs the same check (``data.on_bad_video: error | skip``),
because DALI's readers drop bad files silently and its decoder kills the pipeline on them.

A folder of JPEG frames is probed as the MJPEG video its images make (``probe_frame_folder``: every image's header
read, one frame size; ``deep_probe_folder``: every image decoded, none cut short).

``--backend gpu`` applies NVDEC's limits (``timesformer_harness.pipelines.nvdec``: codec per GPU generation, minimum and
maximum frame size, 8-bit 4:2:0) for the generation ``--gpu-arch`` names, else the visible GPU's, else Hopper's. A
set of MJPEG files only passes it: their frames are JPEG images, which the DALI loader decodes with nvJPEG.

``--deep`` (``data.validate: deep``) also decodes every packet of every file that passes (``deep_probe``), to find
damage inside the coded stream, which the probe cannot see and which stops a decoder mid-run; it costs about one
epoch of decoding, runs in parallel processes and is cached next to the probes (keyed also by the libavcodec
version, since the verdict is the decoder's).

The probe and the deep check store their results as they come in (``ChunkedPut``: every ``FLUSH_FILES`` files or
``FLUSH_S`` seconds), so a check interrupted by Ctrl-C (its workers stopped at once, exit status 130) resumes where it
stopped; they show their progress (``timesformer_harness.pipelines.progress``: a bar on a terminal, else a log line
every ``--log-every`` seconds). ``--cache`` reads as ``data.validate_cache`` does
(``timesformer_harness.common.cache_path``): unset, the node-local default; ``none`` (or ``''``), no cache.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import logging
import math
import multiprocessing
import os
import signal
import stat
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from timesformer_harness.common import ExitCode, FileCache, cache_path, file_key, report_error
from timesformer_harness.pipelines.bitstream import PROBE_DECODE_SIZE, frame_pixel_bound
from timesformer_harness.pipelines.config import SAMPLINGS, DataConfig, resolve_sampling
from timesformer_harness.pipelines.manifest import MANIFEST_CLI_HINTS
from timesformer_harness.pipelines.nvdec import DALI_CPU_CODECS, DEFAULT_GENERATION, NVDEC_CODECS, nvdec_problem
from timesformer_harness.pipelines.packets import JPEG_CODECS, index_frame_folder, read_payloads
from timesformer_harness.pipelines.progress import LOG_EVERY_S, Progress

logger = logging.getLogger(__name__)

# The codecs DALI 2.4's video decoder handles per device (CPU: libavcodec's VP8/VP9/MJPEG; GPU: NVDEC, whose further
# limits are in timesformer_harness.pipelines.nvdec); None = PyAV, which decodes everything FFmpeg does.
DECODABLE_CODECS = {"cpu": set(DALI_CPU_CODECS), "gpu": set(NVDEC_CODECS), "pyav": None}
_CODEC_ALIASES = {"libvpx": "vp8", "libvpx-vp9": "vp9", "libdav1d": "av1", "libaom-av1": "av1", "h265": "hevc"}
DEFAULT_CACHE = ""  # a ``cache`` argument: the probe cache of data.validate_cache unset (found when it is used)
UNREADABLE = "unreadable: "  # a verdict about the storage (permission, I/O error), not the file: never cached
READ_AGAIN = "check the file's permissions and storage; it is read again next time"
MIN_DECODER_PIXELS = 1 << 18  # bound_decoder's floor: 512x512 (a 32x32 MPEG-4 Part 2 file needs 53,760)
CUT_FILE = ("yet the file reads whole, so its content is likely cut or damaged (an unfinished copy or download?); "
            "it is read again next time")

# 2: pixel format, bit depth and chroma; 3: file-size checks, the first video stream's own length; 4: the first frame
# is the first packet's, and late-starting timestamps are not truncation; 5: a named pipe or device is named so (it was
# an "empty file"); 6: an AVI with fewer frames than its header counts is truncated; 7: that rule for AVI only (an MP4
# trimmed by its edit list had been refused), the decoder's pixel bound has a floor (a 32x32 MPEG-4 Part 2 file had
# been refused), an I/O error on a file that reads whole is not cached
PROBE_VERSION = 7
PLAUSIBLE_FPS = (1.0, 1000.0)  # a rate outside is broken timestamps (all frames at one time, a negative step)
MAX_FRAME_PIXELS = DataConfig.max_frame_pixels  # data.max_frame_pixels' default: 3840x2160
TAIL_BYTES = 1 << 20  # file-size checks: how many unbacked or unread bytes at a file's end are "beyond reason"
# The probe and the deep check store their results as they come, in transactions of at most FLUSH_FILES results or
# FLUSH_S seconds of work, so that an interrupted check keeps what it did (a rerun takes it from the cache).
FLUSH_FILES = 16
FLUSH_S = 5.0


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


def _special_file(mode: int) -> str:
    """What a path that is not a regular file is (a named pipe, a device, a socket); "" for a regular file."""
    for test, kind in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "" if stat.S_ISREG(mode) else "not a file"


def size_problem(path: str, st: os.stat_result) -> str:
    """Why a file's size cannot be its video's ("" = no reason to doubt it), from the inode and one read of its last
    ``TAIL_BYTES``, before the container is parsed: a demuxer looking for its next packet reads through whatever
    follows the last one, so a small video extended to gigabytes costs a probe minutes of reading, not milliseconds.

    Refused: a sparse file (more than half of it, and more than ``TAIL_BYTES``, not stored on disk: holes left by a
    copy or a download extended past its data) and a file whose last ``TAIL_BYTES`` are all zero (a preallocated
    download that stopped short; no container or codec ends in a megabyte of zeros). A filesystem that reports no
    blocks at all (``st_blocks == 0``, some FUSE mounts) says nothing, and is not judged by it."""
    size, stored = st.st_size, st.st_blocks * 512
    if 0 < stored and size - stored > max(TAIL_BYTES, size // 2):
        return (f"sparse file: only {stored} of its {size} bytes are stored on disk, the rest are holes (a copy or "
                f"download extended past its data); copy or download it again")
    if size > 2 * TAIL_BYTES:
        with open(path, "rb") as f:
            f.seek(size - TAIL_BYTES)
            tail = f.read(TAIL_BYTES)
        if tail.count(0) == len(tail):
            return (f"its last {TAIL_BYTES} bytes (of {size}) are all zero: a preallocated file whose data stopped "
                    f"short (an interrupted download?); download it again")
    return ""


def _span(packets: list[tuple[int, int]], time_base) -> float:
    """Seconds from the first packet's start to the last one's end; ``packets`` as (pts, duration)."""
    first = min(pts for pts, _ in packets)
    last = max(pts + max(duration, 0) for pts, duration in packets)
    return float((last - first) * time_base)


def _whole_file(container) -> tuple[float, int]:
    """(seconds the longest stream covers, the byte offset where the last packet of any stream ends): a second pass
    over every stream, for a file whose first video stream alone looks truncated or leaves much of the file unread."""
    container.seek(0)
    spans: dict[int, list[tuple[int, int]]] = {}
    data_end = 0
    for packet in container.demux():
        if packet.size == 0:
            continue
        if packet.pos is not None and packet.pos >= 0:
            data_end = max(data_end, packet.pos + packet.size)
        if packet.pts is not None and packet.stream.time_base:
            spans.setdefault(packet.stream.index, []).append((packet.pts, packet.duration or 0))
    covered = max((_span(v, container.streams[i].time_base) for i, v in spans.items()), default=0.0)
    return covered, data_end


def bound_decoder(stream: Any, width: int, height: int) -> None:
    """Make FFmpeg refuse, before allocating it, any frame of the PyAV video ``stream`` above
    ``bitstream.frame_pixel_bound(width, height)`` (a header that lies about the frame size, frames that grow
    mid-stream): the deep check and the PyAV loader call it. The packet index refuses such VP8/VP9/MJPEG files from
    their payloads' headers before; this bounds every codec's decoder. The bound is at least ``MIN_DECODER_PIXELS``:
    FFmpeg's MPEG-4 Part 2 decoder checks a buffer of a fixed size against it, whatever the frame size."""
    bound = max(frame_pixel_bound(width, height), MIN_DECODER_PIXELS)
    stream.codec_context.options = {**stream.codec_context.options, "max_pixels": str(bound)}


def decode_jpeg(data: bytes, width: int, height: int, name: str) -> Any:
    """One JPEG image, a frame folder's image ``name`` of that folder's ``width`` x ``height`` frames, decoded by
    FFmpeg's mjpeg decoder (bounded as ``bound_decoder`` bounds a stream) into a PyAV ``VideoFrame``. Raises
    RuntimeError naming the image when it does not decode to one frame of that size."""
    import av

    decoder = av.CodecContext.create("mjpeg", "r")
    decoder.thread_count = 1
    decoder.options = {"max_pixels": str(frame_pixel_bound(width, height))}
    try:
        frames = [*decoder.decode(av.Packet(data)), *decoder.decode(None)]
    except (av.error.FFmpegError, ValueError) as e:
        raise RuntimeError(f"image {name}: cannot decode: {type(e).__name__}: {e}") from None
    if not frames:
        raise RuntimeError(f"image {name}: no decodable frame")
    if (frames[0].width, frames[0].height) != (width, height):
        raise RuntimeError(f"image {name}: a {frames[0].width}x{frames[0].height} frame where the folder's are "
                           f"{width}x{height}")
    return frames[0]


def _frame_format(frame: Any, info: VideoInfo) -> None:
    """The decoded ``frame``'s pixel format, bit depth and chroma subsampling into ``info``."""
    info.pix_fmt = frame.format.name
    info.bit_depth = max(c.bits for c in frame.format.components)
    info.chroma = _chroma(frame.format, frame.width, frame.height)


def probe_frame_folder(path: str) -> VideoInfo:
    """``probe_video`` for a folder of JPEG frames: its index (``packets.index_frame_folder``: every image's header
    read, one frame size) and its first image decoded (``decode_jpeg``) when at most ``PROBE_DECODE_SIZE``."""
    info = VideoInfo(path)
    try:
        index = index_frame_folder(path)
    except (OSError, ValueError) as e:
        info.error = str(e).removeprefix(f"{path}: ")
        return info
    info.codec, info.frames, info.fps = index.codec, index.num_frames, index.fps
    info.width, info.height = index.width, index.height
    if info.width * info.height > PROBE_DECODE_SIZE[0] * PROBE_DECODE_SIZE[1]:
        return info
    try:
        with open(os.path.join(path, index.files[0]), "rb") as f:
            _frame_format(decode_jpeg(f.read(), info.width, info.height, index.files[0]), info)
    except (OSError, RuntimeError) as e:
        info.error = str(e)
    return info


def _storage_failed(path: str, e: OSError) -> bool:
    """Whether an OSError that PyAV raised on ``path`` looks like the storage's: FFmpeg reports a Matroska file cut
    short as an I/O error (EIO) too, so for EIO the file is read through with plain reads, and only a failing read
    blames the storage. Either way the verdict is not cached (an I/O error that passed would leave a good file
    marked bad): this chooses the advice."""
    if e.errno != errno.EIO:
        return True
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except OSError:
        return True
    return False


def probe_video(path: str) -> VideoInfo:
    """Open ``path`` with PyAV and measure it; never raises for a bad file (the reason goes to ``error``).

    Judged on the first video stream, the one both loaders decode: its packets are counted, and it is truncated when
    they cover less than 90% of its declared length (the stream's own duration, else the container's; the
    container's is its longest stream's, so a first video stream shorter than another stream is truncated only when no
    stream reaches the declared length), or when they number fewer than 90% of the frames its header counts (an AVI
    cut before its index, whose duration FFmpeg estimates from what is left). An I/O error from FFmpeg is not cached
    (the storage's, or, when the file reads whole, likely a cut Matroska file's, as FFmpeg reports those).
    ``size_problem`` refuses a sparse or zero-padded file before it is parsed, and a file whose packets end in its
    first half (more than ``TAIL_BYTES`` of data no stream holds) is refused after.
    The first frame is decoded only when the header's frame size is at most ``PROBE_DECODE_SIZE`` (the judge,
    ``usable``, refuses frames above ``data.max_frame_pixels`` from the header), and FFmpeg refuses a frame much
    larger than the header says before allocating it, so the probe's memory is bounded whatever the file holds.
    A folder is probed as a folder of JPEG frames (``probe_frame_folder``)."""
    import av

    if os.path.isdir(path):
        return probe_frame_folder(path)
    info = VideoInfo(path)
    try:
        st = os.stat(path)
        size = st.st_size
        if kind := _special_file(st.st_mode):  # never opened: reading a named pipe waits for a writer
            info.error = (f"not a regular file ({kind}): the loaders seek in each video, so it must be a file; point "
                          f"the manifest at the video file itself")
            return info
        if size == 0:
            info.error = "empty file (0 bytes)"
            return info
        if problem := size_problem(path, st):
            info.error = problem
            return info
    except FileNotFoundError:
        info.error = MISSING
        return info
    except OSError as e:
        info.error = f"{UNREADABLE}{e}"
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
            own = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
            declared = own or (container.duration / 1e6 if container.duration else None)  # microseconds -> s
            packets: list[tuple[int, int]] = []
            data_end = demuxed = 0
            for packet in container.demux(stream):
                demuxed += 1  # an AVI's empty (dropped-frame) chunks count in its header's frame count
                if packet.size == 0:
                    continue
                info.frames += 1
                if packet.pos is not None and packet.pos >= 0:
                    data_end = max(data_end, packet.pos + packet.size)
                if packet.pts is not None:
                    packets.append((packet.pts, 0))
            if info.frames == 0:
                info.error = "no video frames"
                return info
            # what the frames cover: from the first one, or from 0 where the timestamps start later (Matroska's
            # declared duration is the end time, with the offset in it)
            covered = max(_span(packets, stream.time_base), float(max(p for p, _ in packets) * stream.time_base)) \
                if packets and stream.time_base else 0.0
            short = bool(declared and info.fps and packets and stream.time_base
                         and covered + 1.0 / info.fps < 0.9 * declared - 2.0 / info.fps)
            unread = data_end > 0 and size - data_end > max(TAIL_BYTES, size // 2)
            if (short and not own and len(container.streams) > 1) or unread:  # other streams may explain it
                covered, data_end = _whole_file(container)
                short = short and (own is not None or covered < 0.9 * declared - 2.0 / info.fps)
                unread = data_end > 0 and size - data_end > max(TAIL_BYTES, size // 2)
            if short:
                present = _span(packets, stream.time_base) + 1.0 / info.fps
                info.error = (f"truncated: the container declares {declared:.2f} s but frames cover only "
                              f"{present:.2f} s")
                return info
            # an AVI without its index: FFmpeg estimates the duration from what is there, the header keeps the count
            # (an MP4's count is its samples', an edit list may show fewer: the duration check judges those)
            avi = "avi" in container.format.name.split(",")
            if avi and stream.frames and demuxed < 0.9 * stream.frames - 2:
                info.error = f"truncated: its header declares {stream.frames} frames, {info.frames} present"
                return info
            if unread:
                info.error = (f"its packets end at byte {data_end} of {size}: the other {size - data_end} bytes hold "
                              f"no stream's data (appended or padded past the video); copy or download it again")
                return info
        if info.width * info.height > PROBE_DECODE_SIZE[0] * PROBE_DECODE_SIZE[1]:
            return info  # measured from the header; usable() refuses it unless data.max_frame_pixels allows it
        with av.open(path) as container:  # decode the first frame
            stream = container.streams.video[0]
            bound_decoder(stream, info.width, info.height)
            frame = next(container.decode(stream), None)
            hidden = sum(1 for pts, _ in packets if frame is not None and frame.pts is not None and pts < frame.pts)
            if frame is None:
                info.error = "no decodable frame"
            elif hidden:
                info.error = (f"its first {hidden} frame(s) never come out of the decoder (an edit list hides them, "
                              "or the stream starts before its first keyframe): frames are numbered by packet, so "
                              "every clip would be shifted; re-encode it (python -m "
                              "timesformer_harness.pipelines.tools.prepare) or cut it at a keyframe")
            else:
                _frame_format(frame, info)
    except OSError as e:  # PyAV's errno errors (permission, I/O) are OSErrors: the storage's, or a cut file's
        info.error = f"{UNREADABLE}{type(e).__name__}: {e}; {READ_AGAIN if _storage_failed(path, e) else CUT_FILE}"
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as e:
        info.error = (f"cannot open/decode: {type(e).__name__}: {e}; a file that plays elsewhere can be re-encoded "
                      "(python -m timesformer_harness.pipelines.tools.prepare), else leave it out of the manifest")
    return info


def usable(info: VideoInfo, backend: str, min_frames: int, gpu_arch: str = DEFAULT_GENERATION,
           max_pixels: int = MAX_FRAME_PIXELS, nvjpeg: bool = False) -> str:
    """Why ``info``'s video cannot be used by ``backend`` for clips of ``min_frames`` frames ("" = usable); on the
    gpu backend, by NVDEC on a ``gpu_arch`` GPU (``timesformer_harness.pipelines.nvdec.generation_of``), or with
    ``nvjpeg`` (a set of intra-only JPEG videos) MJPEG by nvJPEG; frames above ``max_pixels``
    (``data.max_frame_pixels``) are refused from the header, before any is decoded."""
    if info.error:
        return info.error
    if info.width * info.height > max_pixels:
        rgb_mib = info.width * info.height * 3 / 2**20
        return (f"frame {info.width}x{info.height} ({info.width * info.height} pixels, {rgb_mib:.0f} MiB per RGB "
                f"frame) is above data.max_frame_pixels={max_pixels}; downscale it (python -m "
                f"timesformer_harness.pipelines.tools.prepare MANIFEST --out DIR --short-side 256) or raise "
                f"data.max_frame_pixels")
    allowed = DECODABLE_CODECS[backend]
    if backend == "gpu":
        if not (nvjpeg and info.codec in JPEG_CODECS) and (problem := nvdec_problem(info, gpu_arch)):
            return problem
    elif allowed is not None and info.codec not in allowed:
        return (f"codec {info.codec} is not decodable by DALI's {backend} backend (it decodes {sorted(allowed)}); "
                f"re-encode (e.g. VP9) or use data.loader=pyav / a GPU")
    if info.frames < min_frames:
        return (f"too short: {info.frames} frames < {min_frames} needed by the clip span "
                f"(set data.pad_short=true to pad it: window sampling repeats the last frame, segment sampling "
                f"spreads the repeats over the clip)")
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


def _store_path(cache: str | Path | None) -> Path | str | None:
    """The store a ``cache`` argument names: ``DEFAULT_CACHE`` is the default folder's probe cache (found now)."""
    return cache_path("") if cache == DEFAULT_CACHE else cache


class ProbeCache:
    """The probe's results, per file as it is now (``timesformer_harness.common.FileCache``, table ``probe``)."""

    def __init__(self, path: str | Path | None):
        self.store = FileCache(path, "probe", PROBE_VERSION)

    def get(self, path: str) -> VideoInfo | None:
        found = self.store.get(path)
        return VideoInfo(**{**json.loads(found[0]), "path": path}) if found is not None else None

    def put(self, results: list[tuple[tuple[str, int, int] | None, VideoInfo]]) -> None:
        """Store (file key taken before the probe, result) pairs; files that could not be read are not stored."""
        self.store.put((key, json.dumps(asdict(i)), None) for key, i in results if not i.error.startswith(UNREADABLE))


def _ignore_sigint() -> None:
    """A pool worker's initializer: Ctrl-C in a terminal signals the whole process group, and the parent, not each
    worker, decides what happens (it stops them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _each(fn: Callable[[str], Any], paths: list[str]) -> list[Any]:
    """``[fn(p) for p in paths]``: one task of ``each_completed``'s pool."""
    return [fn(p) for p in paths]


def each_completed(fn: Callable[[str], Any], paths: list[str], workers: int, processes: bool = True,
                   chunk: int = 1) -> Iterator[tuple[int, Any]]:
    """``(i, fn(paths[i]))`` for every path, as they finish: in this process when ``workers`` <= 1, else in a pool of
    ``workers`` processes (``processes``; forkserver: the caller may already run DALI/CUDA threads) or threads, in
    tasks of ``chunk`` paths (a task per file costs a small file's worth of inter-process traffic), at most
    ``4 * workers`` tasks queued at a time. An exception, an interrupt or the consumer closing the generator cancels
    the tasks not started and ends the worker processes at once (a thread finishes its task). Close it with
    ``contextlib.closing`` so that this happens before the exception is handled."""
    if workers <= 1:
        for i, path in enumerate(paths):
            yield i, fn(path)
        return
    before = set(multiprocessing.active_children())
    if processes:
        pool: ProcessPoolExecutor | ThreadPoolExecutor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("forkserver"), initializer=_ignore_sigint)
    else:
        pool = ThreadPoolExecutor(workers)
    tasks = ((i, paths[i:i + chunk]) for i in range(0, len(paths), chunk))
    pending: dict[Future, int] = {}
    try:
        for i, part in itertools.islice(tasks, 4 * workers):
            pending[pool.submit(_each, fn, part)] = i
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                for i, part in itertools.islice(tasks, 1):
                    pending[pool.submit(_each, fn, part)] = i
                first = pending.pop(future)
                for k, result in enumerate(future.result()):
                    yield first + k, result
    except BaseException as e:  # an error, KeyboardInterrupt, or GeneratorExit (the consumer stopped)
        if processes:  # the pool breaks, and fails its pending futures itself (cancelling them races with that)
            workers_of_pool = set(multiprocessing.active_children()) - before
            for process in workers_of_pool:
                process.terminate()
            for process in workers_of_pool:  # gone before the caller goes on
                process.join()
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(e, BrokenProcessPool):
            raise RuntimeError(f"a worker process of the {workers}-process check died: killed (out of memory?), or "
                               "it re-ran a script that has no `if __name__ == \"__main__\":` guard (each worker "
                               "imports the main script; put the script's work under that guard), or use 1 worker"
                               ) from e
        raise
    pool.shutdown()


class ChunkedPut:
    """Collect results and hand them to ``put`` (a cache's) every ``FLUSH_FILES`` results or ``FLUSH_S`` seconds,
    and at the end of the ``with`` block, whatever ended it."""

    def __init__(self, put: Callable[[list], None]):
        self.put, self.items, self.last = put, [], time.monotonic()

    def add(self, item: Any) -> None:
        self.items.append(item)
        if len(self.items) >= FLUSH_FILES or time.monotonic() - self.last >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.items:
            self.put(self.items)
        self.items, self.last = [], time.monotonic()

    def __enter__(self) -> ChunkedPut:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def probe_all(paths: list[str], cache: str | Path | None = DEFAULT_CACHE, workers: int = 0, *,
              progress: bool = True, desc: str = "probe", log_every: float = LOG_EVERY_S) -> list[VideoInfo]:
    """Probe every path (cached, in parallel: processes for many files, threads for a few). Results are stored as
    they come (``ChunkedPut``): an interrupted probe keeps what it did. ``progress``: a bar on a terminal, else a
    log line every ``log_every`` seconds (``timesformer_harness.pipelines.progress``)."""
    store = ProbeCache(_store_path(cache))
    infos: list[VideoInfo | None] = [store.get(p) for p in paths]
    todo = [i for i, info in enumerate(infos) if info is None]
    if todo:
        keys = [file_key(paths[i]) for i in todo]  # before the probe: what its results are stored under
        workers = workers or os.cpu_count() or 1
        n = max(1, min(workers, len(todo)))
        processes = len(todo) > 64 and workers > 1
        work = each_completed(probe_video, [paths[i] for i in todo], n, processes, chunk=16 if processes else 1)
        with Progress(desc, len(paths), cached=len(paths) - len(todo), show=progress, interval=log_every,
                      log=logger) as bar, ChunkedPut(store.put) as stored, contextlib.closing(work) as results:
            for k, info in results:
                infos[todo[k]] = info
                stored.add((keys[k], info))
                bar.update()
        logger.info("probed %d videos (%d from cache)", len(todo), len(paths) - len(todo))
    return infos  # type: ignore[return-value]


def check_videos(paths: list[str], backend: str, num_frames: int, sampling_rate: int, target_fps: float = 30,
                 pad: bool = False, segment: bool = False, cache: str | Path | None = DEFAULT_CACHE,
                 workers: int = 0, gpu_arch: str = DEFAULT_GENERATION, max_pixels: int = MAX_FRAME_PIXELS
                 ) -> tuple[list[VideoInfo], list[tuple[str, str]]]:
    """Probe ``paths`` and judge them for ``backend`` (gpu: NVDEC of a ``gpu_arch`` GPU; frames above
    ``max_pixels`` refused). Returns (infos in order, [(path, reason)] of the unusable)."""
    if backend not in DECODABLE_CODECS:
        raise ValueError(f"backend={backend!r}; choose from {sorted(DECODABLE_CODECS)}")
    infos = probe_all(paths, cache, workers)
    return infos, judge(infos, backend, num_frames, sampling_rate, target_fps, pad, segment, gpu_arch, max_pixels)


def judge(infos: list[VideoInfo], backend: str, num_frames: int, sampling_rate: int, target_fps: float = 30,
          pad: bool = False, segment: bool = False, gpu_arch: str = DEFAULT_GENERATION,
          max_pixels: int = MAX_FRAME_PIXELS) -> list[tuple[str, str]]:
    """[(path, reason)] of the probed videos that ``backend`` cannot use for these clips, or whose frames are above
    ``max_pixels``. On the gpu backend NVDEC of a ``gpu_arch`` GPU decodes them, except a set of MJPEG videos only,
    whose frames the DALI loader decodes as JPEG images with nvJPEG (NVDEC has no MJPEG)."""
    probed = [i for i in infos if not i.error]
    nvjpeg = backend == "gpu" and bool(probed) and all(i.codec in JPEG_CODECS for i in probed)
    rejected = []
    for info in infos:
        reason = usable(info, backend, required_frames(info, num_frames, sampling_rate, target_fps, pad, segment),
                        gpu_arch, max_pixels, nvjpeg)
        if not reason and not segment and info.fps and not PLAUSIBLE_FPS[0] <= info.fps <= PLAUSIBLE_FPS[1]:
            reason = (f"a frame rate of {info.fps:.3g} fps (its timestamps are broken?), which Kinetics-style "
                      "sampling turns into a clip span in frames; re-encode it at a fixed rate (python -m "
                      "timesformer_harness.pipelines.tools.prepare), else leave it out of the manifest")
        if reason:
            rejected.append((info.path, reason))
    return rejected


# bump when deep_probe's verdicts change (cached verdicts of other versions are ignored); 2: the file-size checks, the
# decoder bounded by the header's frame size; 3: that bound's floor (a 32x32 MPEG-4 Part 2 file had been refused)
DEEP_VERSION = 3


def deep_probe(path: str) -> str:
    """Decode every packet of ``path``'s first video stream with PyAV; the reason it is unusable, or "".

    A file ``size_problem`` refuses is not opened, and the decoder refuses (before allocating it) any frame much
    larger than the header's frame size, so a crafted file costs the check no more memory than its header declares;
    the files it is given passed the probe, whose judge refuses headers above ``data.max_frame_pixels``.
    A file fails when the decoder raises (what stops both loaders), returns fewer frames than there are packets
    (the probe counted the packets, so a plan would ask for frames that never come: DALI returns black ones), when
    the frame size changes inside the stream (a damaged frame header: the clip's frames no longer stack), or when the
    demuxer reports an error (a damaged container, which a decoder may read differently from run to run). Decoder
    messages that do not stop decoding (H.264's ``mmco: unref short failure`` is common in healthy files) and gaps in
    the timestamps (a variable-frame-rate file has them too) do not fail a file: such damage decodes, with artifacts.
    Changes PyAV's global log level while it runs: call it from one thread (``deep_check`` runs it in processes).
    A folder of JPEG frames: every image decoded (``deep_probe_folder``).
    """
    import av
    import av.logging

    if os.path.isdir(path):
        return deep_probe_folder(path)
    packets = frames = 0
    size = None
    size_changes = 0
    error = ""
    codec = ""
    try:
        if problem := size_problem(path, os.stat(path)):
            return problem
    except OSError as e:
        return f"{UNREADABLE}{e}"
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
                    bound_decoder(stream, stream.codec_context.width, stream.codec_context.height)
                    for packet in container.demux(stream):
                        packets += packet.size > 0
                        for frame in packet.decode():  # the final empty packet drains the decoder
                            frames += 1
                            if size is not None and (frame.width, frame.height) != size:
                                size_changes += 1
                            size = (frame.width, frame.height)
            except OSError as e:  # the storage's error (permission, I/O), or a cut file's
                error = f"{UNREADABLE}{type(e).__name__}: {e}; {READ_AGAIN if _storage_failed(path, e) else CUT_FILE}"
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


def deep_probe_folder(path: str) -> str:
    """``deep_probe`` for a folder of JPEG frames: every image read and decoded (``decode_jpeg``: one frame of the
    folder's size each) and ending in the end-of-image marker (zero bytes after it allowed): a JPEG cut short
    decodes without an error, its missing rows grey. The reason, naming the image, or ""."""
    try:
        index = index_frame_folder(path)
    except (OSError, ValueError) as e:
        return str(e).removeprefix(f"{path}: ")
    folder = os.open(path, os.O_RDONLY)
    try:
        for k, name in enumerate(index.files):
            try:
                data = read_payloads(index, [k], folder)[0]
                decode_jpeg(data, index.width, index.height, name)
            except (OSError, RuntimeError) as e:
                return f"frame {k} of {index.num_frames}: {e}"
            if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
                return (f"frame {k} of {index.num_frames}: image {name} is cut short (no end-of-image marker): an "
                        f"interrupted write or copy; extract or copy it again")
    finally:
        os.close(folder)
    return ""


def deep_check(paths: list[str], cache: str | Path | None = DEFAULT_CACHE, workers: int = 0, *,
               progress: bool = True, desc: str = "deep check", log_every: float = LOG_EVERY_S
               ) -> list[tuple[str, str]]:
    """``deep_probe`` every path (cached; the others in ``workers`` processes, 0 = one per core). Returns
    [(path, reason)] of the files that fail, in the order of ``paths``. Verdicts are stored as they come
    (``ChunkedPut``): an interrupted check keeps what it did. ``progress``: a bar on a terminal, else a log line every
    ``log_every`` seconds."""
    import av

    lib = ".".join(map(str, av.library_versions.get("libavcodec", (0,))))
    store = FileCache(_store_path(cache), "deep", f"{DEEP_VERSION}/libavcodec-{lib}")
    verdicts: list[str | None] = []
    for p in paths:
        found = store.get(p)
        verdicts.append(None if found is None else json.loads(found[0])["error"])
    todo = [i for i, v in enumerate(verdicts) if v is None]
    cached = len(paths) - len(todo)
    if todo:
        t0 = time.perf_counter()
        n = max(1, min(workers or os.cpu_count() or 1, len(todo)))

        keys = {i: file_key(paths[i]) for i in todo}  # before the check: what its verdicts are stored under

        def put(rows: list[tuple[int, str]]) -> None:
            store.put((keys[i], json.dumps({"error": v}), None) for i, v in rows if not v.startswith(UNREADABLE))

        work = each_completed(deep_probe, [paths[i] for i in todo], n, chunk=4)
        with Progress(desc, len(paths), cached=cached, show=progress, interval=log_every, log=logger) as bar, \
                ChunkedPut(put) as stored, contextlib.closing(work) as results:
            for k, verdict in results:
                verdicts[todo[k]] = verdict
                stored.add((todo[k], verdict))
                bar.update()
        seconds = time.perf_counter() - t0
        logger.info("deep-checked %d videos in %.1f s (%.1f files/s, %d processes; %d from cache)", len(todo),
                    seconds, len(todo) / max(seconds, 1e-9), n, cached)
    elif paths:
        logger.info("deep-checked 0 videos (%d from cache)", cached)
    return [(p, f"deep check: {v}") for p, v in zip(paths, verdicts) if v]


# What a reason's fix says in config keys (the loaders' language), and what this CLI's flags say instead: the CLI
# without a run config translates them, so a hint names a flag its user can pass.
CLI_HINTS = (*MANIFEST_CLI_HINTS, ("data.backend=cpu; data.backend=auto does so by itself", "--backend cpu"),
             ("data.pad_short=true", "--pad"), ("data.loader=pyav / a GPU", "--backend pyav / gpu"),
             ("data.loader=pyav", "--backend pyav"), ("data.max_frame_pixels=", "--max-frame-pixels "),
             ("data.max_frame_pixels", "--max-frame-pixels"), ("data.validate_cache=", "--cache "),
             ("data.validate_cache", "--cache"), ("classes (model.num_classes)", "classes (--num-classes)"),
             ("set model.num_classes", "pass another --num-classes"))


def as_cli_hint(reason: str) -> str:
    """``reason`` with the config keys its fix names replaced by this CLI's flags (``CLI_HINTS``)."""
    for key, flag in CLI_HINTS:
        reason = reason.replace(key, flag)
    return reason


MISSING = "missing: no such file"


def all_missing_hint(entries: list, rejected: list[tuple[str, str]]) -> str:
    """When no video of a manifest exists: how its paths are read (a wrong root, or paths written from another
    folder), else ""."""
    if not entries or len(rejected) < len(entries) or any(reason != MISSING for _, reason in rejected):
        return ""
    if entries[0].key:  # SSv2: the split JSON names ids, not paths
        return ("none of the split's videos exists: SSv2 videos are read as {folder}/{id}{suffix}, the folder "
                "data.path_prefix, else data.root (pipelines.validate: --path-prefix, else the split JSON's folder), "
                "the suffix data.ssv2_suffix (--ssv2-suffix; default .webm, \"\" for folders of frames); compare "
                "the paths listed with where the videos are")
    return ("none of the manifest's videos exists: a relative path in a manifest is read from the manifest's own "
            "folder (after data.path_prefix, --path-prefix), not from the current folder; compare the paths listed "
            "with where the videos are")


def print_verdict(entries: list, rejected: list[tuple[str, str]], judged: str, *, report: str | None = None,
                  facts: dict | None = None, clip: tuple[int, int, float] | None = None, workers: int = 0) -> int:
    """Print every rejected file with its reason and the summary (``N/M videos usable by the {judged}``); write the
    JSON ``report`` (``facts`` first) when asked; for Kinetics-style sampling (``clip`` = (T, rate, target fps)) the
    decode cost of the usable files. Returns the exit status: 1 when any file is rejected."""
    for path, reason in rejected:
        print(f"{path}: {reason}")
    print(f"{len(entries) - len(rejected)}/{len(entries)} videos usable by the {judged} ({len(rejected)} rejected)")
    if hint := all_missing_hint(entries, rejected):
        print(hint)
    if report:
        from timesformer_harness.common import atomic_write_text

        atomic_write_text(report, json.dumps({
            **(facts or {}), "videos": len(entries), "usable": len(entries) - len(rejected),
            "rejected": [{"path": p, "reason": r} for p, r in rejected]}, indent=2) + "\n")
    bad = {p for p, _ in rejected}
    usable_paths = [e.path for e in entries if e.path not in bad]
    if usable_paths and clip is not None:  # frames decoded per clip, median and worst file (Kinetics sampling)
        from timesformer_harness.pipelines.tools.decode_cost import estimate_manifest_decode_cost, format_decode_cost

        print(format_decode_cost(estimate_manifest_decode_cost(usable_paths, *clip, workers=workers, max_files=1000,
                                                               show_progress=True)))
    return 1 if rejected else 0


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--sampling", choices=SAMPLINGS, default=DataConfig.sampling,
                        help="data.sampling: segment (T frames across the whole video, SSv2's), window (every "
                             "--sampling-rate-th frame of one window), auto (segment for --format ssv2, else window)")
    parser.add_argument("--sampling-rate", type=int, default=DataConfig.sampling_rate)
    parser.add_argument("--target-fps", type=float, default=DataConfig.target_fps)
    parser.add_argument("--pad", action="store_true", help="accept videos shorter than the span (data.pad_short)")
    parser.add_argument("--num-classes", type=int, default=0,
                        help="labels must be below it (model.num_classes); 0 = labels not checked")
    parser.add_argument("--max-frame-pixels", type=int, default=DataConfig.max_frame_pixels,
                        help="refuse frames above this many pixels, width x height (data.max_frame_pixels; default "
                             "%(default)s = 3840x2160)")
    parser.add_argument("--cache", default=None,
                        help="the SQLite cache of probes and deep checks, as data.validate_cache: a path, or none "
                             "(also '') for no cache; default: the harness's node-local cache folder")
    parser.add_argument("--workers", type=int, default=0, help="parallel probes (0 = one per CPU core)")
    parser.add_argument("--log-every", type=float, default=LOG_EVERY_S, metavar="SECONDS",
                        help="when stderr is not a terminal, a progress line every SECONDS (default %(default)s); a "
                             "terminal gets a progress bar")
    parser.add_argument("--report", default=None, metavar="FILE",
                        help="also write the verdict as JSON: the backend, the GPU generation judged for, the counts "
                             "and every rejected file with its reason")
    parser.add_argument("--deep", action="store_true",
                        help="also decode every packet of each usable file (finds damage inside the stream; costs "
                             "about one epoch of decoding, cached)")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)  # answered below: it lives a layer up
    config = argparse.ArgumentParser(add_help=False)  # before the manifest is required: --config alone is the usual slip
    config.add_argument("--config", default=None)
    if (given := config.parse_known_args(argv)[0].config) is not None:
        print(f"error: a run's config is read by the harness, a layer above the pipelines: run python -m "
              f"timesformer_harness.validate --config {given} [--split train] to check with its settings",
              file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    for flag, value, least in (("--frames", args.frames, 1), ("--sampling-rate", args.sampling_rate, 1),
                               ("--max-frame-pixels", args.max_frame_pixels, 1), ("--workers", args.workers, 0),
                               ("--num-classes", args.num_classes, 0)):
        if value < least:
            parser.error(f"{flag} {value}: give {least} or more")
    if not (math.isfinite(args.target_fps) and args.target_fps > 0):
        parser.error(f"--target-fps {args.target_fps:g}: give a positive number of frames a second")
    if not (math.isfinite(args.log_every) and args.log_every >= 0):
        parser.error(f"--log-every {args.log_every:g}: give 0 or more seconds")
    setup_logging()
    try:
        cache = cache_path(None if args.cache is None else args.cache or "none")  # '': the older spelling of none
        entries = read_entries(args.manifest, args.format, separator=args.separator, path_prefix=args.path_prefix,
                               ssv2_labels=args.ssv2_labels, ssv2_suffix=args.ssv2_suffix,
                               num_classes=args.num_classes)
    except (ValueError, FileNotFoundError) as e:
        if Path(args.manifest).suffix.lower() in (".yaml", ".yml") and Path(args.manifest).is_file():
            print(f"error: {args.manifest} is a config, not a manifest: run python -m timesformer_harness.validate "
                  f"--config {args.manifest} [--split train] to check its videos with its settings", file=sys.stderr)
            return 1
        print(f"error: {as_cli_hint(str(e))}", file=sys.stderr)
        return 1
    try:
        return _check(args, entries, cache)
    except KeyboardInterrupt as e:
        kept = (f"what was checked is in {cache}: a rerun takes it from there" if cache is not None else
                "no cache (--cache none): a rerun starts over")
        return report_error(e, ExitCode.INTERRUPTED, message=f"interrupted; {kept}")


def _check(args: argparse.Namespace, entries: list, cache: Path | None) -> int:
    """The check ``main`` runs once the manifest is read; returns the exit status."""
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
    infos = probe_all([e.path for e in entries], cache, args.workers, log_every=args.log_every)
    segment = resolve_sampling(args.sampling, args.format) == "segment"
    rejected = judge(infos, args.backend, args.frames, args.sampling_rate, args.target_fps, args.pad,
                     segment, gpu_arch, args.max_frame_pixels)
    if args.deep:
        shallow = {p for p, _ in rejected}
        paths = [e.path for e in entries if e.path not in shallow]
        t0 = time.perf_counter()
        deep = deep_check(paths, cache, args.workers, log_every=args.log_every)
        seconds = time.perf_counter() - t0
        print(f"deep check: {len(paths)} videos decoded in {seconds:.1f} s ({len(paths) / max(seconds, 1e-9):.1f} "
              f"files/s, cached ones included); {len(deep)} fail")
        rejected += deep
    facts = {"manifest": str(args.manifest), "backend": args.backend, "gpu_arch": gpu_arch, "judged_for": judged_for,
             "deep": args.deep}
    return print_verdict(entries, [(p, as_cli_hint(r)) for p, r in rejected], f"{args.backend} backend",
                         report=args.report, facts=facts, workers=args.workers,
                         clip=None if segment else (args.frames, args.sampling_rate, args.target_fps))


if __name__ == "__main__":
    raise SystemExit(main())
