"""The transcode engine of dataset preparation: one source video (or folder of frames) -> one checked output file.

``transcode(src, dst, spec)`` decodes ``src`` with PyAV (a folder of frames as an image sequence: ``open_source``),
resamples it to a constant frame rate, resizes it (short side, aspect kept, even sizes), encodes it with a keyframe
forced every ``spec.gop`` frames, checks the result (opens, right codec, the frame count written, keyframe gaps <= GOP)
and only then renames it to ``dst`` (``timesformer_harness.common.atomic_path``); a folder of JPEG frames bound for
MJPEG at its own size is copied instead (``copied_jpeg_frames``). ``PrepareSpec`` holds everything that determines the
output's content; its ``key()`` marks finished outputs in ``timesformer_harness.pipelines.tools.prepare``'s journal.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

from timesformer_harness.common import atomic_path, is_temporary
from timesformer_harness.pipelines.manifest import FRAME_FOLDER_FPS, JPEG_SUFFIXES, frame_images
from timesformer_harness.pipelines.packets import PacketIndex, index_frame_folder, read_payloads

# part of every output's key: a new version redoes outputs made before (2: an odd side cropped, not squeezed; a
# full-range source converted to limited range, not contrast-stretched)
SPEC_VERSION = 2


@dataclass(frozen=True)
class OutputCodec:
    """How ``transcode`` writes one output codec."""

    encoder: str  # PyAV/FFmpeg encoder name
    ext: str  # container (by extension)
    pix_fmt: str
    decoded_name: str  # codec name a decoder reports for the output
    default_quality: int  # crf (vp9/h264/hevc) or qscale (mjpeg, 2 = best .. 31)
    quality_range: tuple[int, int]  # the values the encoder takes (a crf or qscale outside fails every video)


# Encoder settings per output codec (``--codec``). DALI decodes vp9 on CPU and GPU, mjpeg on CPU (on the GPU only as
# JPEG frames by nvJPEG: NVDEC has no MJPEG), h264/hevc on GPU only.
OUTPUT_CODECS = {
    "vp9": OutputCodec("libvpx-vp9", ".webm", "yuv420p", "vp9", 32, (0, 63)),
    "mjpeg": OutputCodec("mjpeg", ".avi", "yuvj420p", "mjpeg", 4, (2, 31)),
    "h264": OutputCodec("libx264", ".mp4", "yuv420p", "h264", 23, (0, 51)),
    "hevc": OutputCodec("libx265", ".mp4", "yuv420p", "hevc", 28, (0, 51)),
}


@dataclass(frozen=True)
class PrepareSpec:
    """Everything that determines an output's content (its key marks outputs as done in the journal)."""

    codec: str = "vp9"
    short_side: int = 256  # 0 = keep the source size (an odd side cropped by one pixel)
    gop: int | None = None  # keyframe every `gop` frames; 1 = intra-only; None = the encoder's default
    fps: float | None = None  # constant output frame rate; None = the source's average rate
    quality: int | None = None  # crf / qscale; None = the codec's default
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.codec not in OUTPUT_CODECS:
            raise ValueError(f"codec={self.codec!r}; choose from {sorted(OUTPUT_CODECS)}")
        if self.short_side < 0 or self.short_side % 2:
            raise ValueError(f"short_side={self.short_side} must be 0 (keep) or a positive even number (yuv420p)")
        if self.gop is not None and self.gop < 1:
            raise ValueError(f"gop={self.gop} must be >= 1 ('intra' = 1)")
        if self.codec == "mjpeg" and self.gop not in (None, 1):
            raise ValueError(f"mjpeg is intra-only (every frame a keyframe): drop --gop {self.gop} or use --gop intra")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps={self.fps} must be > 0")
        low, high = self.output_codec.quality_range
        if self.quality is not None and not low <= self.quality <= high:
            what = "qscale" if self.codec == "mjpeg" else "crf"
            raise ValueError(f"--quality {self.quality}: {self.codec}'s {what} goes from {low} to {high} (lower is "
                             f"better; default {self.output_codec.default_quality})")

    @property
    def output_codec(self) -> OutputCodec:
        return OUTPUT_CODECS[self.codec]

    @property
    def effective_gop(self) -> int | None:
        return 1 if self.codec == "mjpeg" else self.gop

    def key(self) -> str:
        d = asdict(self)
        d["gop"] = self.effective_gop
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Errors of writing, whatever the file: the disk or quota is full, the file too large, the filesystem read-only
DESTINATION_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class DestinationError(OSError):
    """The output could not be written (a full disk, a read-only or unwritable folder): no other video would fare
    better, unlike a broken source."""


def is_destination_error(error: OSError, dst: Path) -> bool:
    """Whether ``error`` is about writing the output ``dst`` (its errno, or naming ``dst`` or its temporary), not
    about reading the source (which may lie in the same folder)."""
    if error.errno in DESTINATION_ERRNOS:
        return True
    name = error.filename
    if not isinstance(name, (str, os.PathLike)):
        return False
    path, dst = Path(os.path.abspath(name)), Path(os.path.abspath(dst))
    return path == dst or (path.parent == dst.parent and is_temporary(path) and path.name.startswith(f".{dst.stem}."))


def output_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) with the short side = ``short_side`` (0 = keep: an odd side loses its last pixel row or column, cut
    off by ``_encode``, not resampled), aspect kept, both even (rounded): 4:2:0 needs even sides."""
    if short_side == 0:
        return height - height % 2, width - width % 2
    if height <= width:
        return short_side, max(2, 2 * round(width * short_side / height / 2))
    return max(2, 2 * round(height * short_side / width / 2)), short_side


def encoder_options(spec: PrepareSpec) -> dict[str, str]:
    """The FFmpeg encoder options ``spec`` gives (quality, keyframe interval, speed)."""
    q = spec.quality if spec.quality is not None else spec.output_codec.default_quality
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


def _cropped(frames: Iterator, stream, height: int, width: int) -> Iterator:
    """``frames`` of ``stream`` cut to their top-left ``width x height`` pixels by FFmpeg's crop filter: the pixels
    kept are the source's, where a resize to one pixel less would resample the whole frame."""
    import av

    graph = av.filter.Graph()
    source, sink = graph.add_buffer(template=stream), graph.add("buffersink")
    crop = graph.add("crop", f"{width}:{height}:0:0")
    source.link_to(crop)
    crop.link_to(sink)
    graph.configure()
    for frame in frames:
        graph.push(frame)
        yield graph.pull()  # crop gives one frame for each


def _declared_seconds(container, stream) -> float | None:
    """The video's declared duration: the stream's when known, else the container's."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else None


def check_output(path: Path, spec: PrepareSpec, expected_frames: int) -> str:
    """Why the encoded file ``path`` is not what ``spec`` asked for ("" = good)."""
    import av

    from timesformer_harness.pipelines.tools.decode_cost import read_gop

    codec = spec.output_codec
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


def _color_range(frame) -> int:
    """A decoded frame's color range (``ColorRange``): its own when tagged, else full for the ``yuvj`` formats
    (JPEG, MJPEG) and limited for other YUV (RGB has none: swscale reads it as full whatever is given)."""
    from av.video.reformatter import ColorRange

    if frame.color_range != ColorRange.UNSPECIFIED:
        return frame.color_range
    return ColorRange.JPEG if frame.format.name.startswith("yuvj") else ColorRange.MPEG


def _encode(inp, dst: Path, spec: PrepareSpec) -> tuple[int, Fraction, tuple[int, int, int]]:
    """Decode the open source ``inp``'s first video stream into ``dst``; returns (frames written, output rate,
    ``_first_frame_view`` of the source's first frame)."""
    import av
    from av.video.frame import PictureType
    from av.video.reformatter import ColorRange

    codec = spec.output_codec
    if not inp.streams.video:
        raise RuntimeError("no video stream")
    ist = inp.streams.video[0]
    ist.thread_count = 1  # parallelism comes from the worker processes
    src_rate = Fraction(ist.average_rate or ist.guessed_rate or ist.base_rate or 30)
    rate = Fraction(spec.fps).limit_denominator(1001) if spec.fps else src_rate
    src_height, src_width = ist.codec_context.height, ist.codec_context.width
    height, width = output_size(src_height, src_width, spec.short_side)
    if height < 2 or width < 2:
        raise RuntimeError(f"source size {ist.codec_context.width}x{ist.codec_context.height} is unusable")
    written = 0
    with av.open(str(dst), "w", options={"fflags": "+bitexact"}) as out:
        ost = out.add_stream(codec.encoder, rate=rate)
        ost.width, ost.height, ost.pix_fmt = width, height, codec.pix_fmt
        # yuv420p is limited range (Y 16-235), MJPEG's yuvj420p full: a full-range source (MJPEG, JPEG frames)
        # converted as is would be contrast-stretched by every decoder; the stream says which range it holds
        out_range = ColorRange.JPEG if codec.pix_fmt.startswith("yuvj") else ColorRange.MPEG
        ost.codec_context.color_range = out_range
        ost.thread_count = 1
        ost.options = encoder_options(spec)
        if spec.codec == "mjpeg":
            q = spec.quality if spec.quality is not None else codec.default_quality
            ost.codec_context.qmin = ost.codec_context.qmax = q
        gop = spec.effective_gop
        decoded = inp.decode(ist)
        first = next(decoded, None)
        view = _first_frame_view(first)
        if first is not None:
            decoded = itertools.chain([first], decoded)
        if spec.short_side == 0 and (height, width) != (src_height, src_width):  # an odd side: crop, not squeeze
            decoded = _cropped(decoded, ist, height, width)
        frames = _resample(decoded, src_rate, rate, Fraction(ist.time_base) if ist.time_base else None)
        for frame in frames:
            f = frame.reformat(width=width, height=height, format=codec.pix_fmt, interpolation="BICUBIC",
                               src_color_range=_color_range(frame), dst_color_range=out_range)
            f.pts, f.time_base = written, 1 / rate  # the encoder's time base is 1 / rate
            # the source's picture types must not leak into the encoder (an I would force a keyframe)
            f.pict_type = PictureType.I if gop and written % gop == 0 else PictureType.NONE
            for packet in ost.encode(f):
                out.mux(packet)
            written += 1
        for packet in ost.encode():
            out.mux(packet)
    return written, rate, view


def probe_source(src: str | Path) -> tuple[int, int, int]:
    """(height, width, rotation) of ``src``'s first frame: the rotation in degrees a player applies (a phone
    video's display matrix; 0 for none, and for a frame folder). ``transcode`` writes the frames as stored, as the
    loaders read them, and reports the same figures of the source it decoded (``Transcoded``)."""
    with open_source(src) as container:
        frame = next(container.decode(video=0), None)
    return _first_frame_view(frame)


def _first_frame_view(frame) -> tuple[int, int, int]:
    """(height, width, rotation in degrees) of a decoded first frame; (0, 0, 0) for None (no frame)."""
    return (frame.height, frame.width, int(frame.rotation)) if frame is not None else (0, 0, 0)


def source_stat(src: str | Path) -> tuple[int, int]:
    """(bytes, newest modification in ns) of a source: a video file's own; a frame folder's images' total and
    newest (the folder's own mtime too: an image added or removed). Raises OSError or ``RuntimeError`` as
    ``frame_images``."""
    st = os.stat(src)
    if not Path(src).is_dir():
        return st.st_size, st.st_mtime_ns
    stats = [p.stat() for p in frame_images(src)]
    return sum(s.st_size for s in stats), max([st.st_mtime_ns, *(s.st_mtime_ns for s in stats)])


@contextlib.contextmanager
def open_source(src: str | Path, fps: float | None = None) -> Iterator[Any]:
    """``src`` opened with PyAV (a context: the input container): a video file, or a frame folder's images
    (``frame_images``, in its order) as one image sequence read at ``fps`` frames per second (default
    ``FRAME_FOLDER_FPS``). FFmpeg's image2 demuxer takes a sequence's files in the byte order of their names, so it
    reads a temporary folder of links to the images named in frame order (and no character of the folder's own name
    is read as a pattern)."""
    import av

    if not Path(src).is_dir():
        with av.open(str(src)) as container:
            yield container
        return
    images = frame_images(src)
    rate = str(Fraction(fps or FRAME_FOLDER_FPS).limit_denominator(1001))
    with tempfile.TemporaryDirectory(prefix="frames-") as links:
        for k, image in enumerate(images):
            os.symlink(image.resolve(), os.path.join(links, f"{k:08d}{image.suffix}"))
        pattern = os.path.join(links.replace("%", "%%"), f"%08d{images[0].suffix}")  # %% : a literal % in TMPDIR
        with av.open(pattern, format="image2", options={"framerate": rate, "pattern_type": "sequence"}) as container:
            yield container


def copied_jpeg_frames(src: str | Path, spec: PrepareSpec) -> PacketIndex | None:
    """The index of the frame folder ``src`` when ``spec`` keeps its JPEG images as they are (MJPEG output at their
    own size: ``short_side`` 0 or theirs, even sides; any ``fps``, the rate its images are read at), else None.
    Raises ValueError as ``packets.index_frame_folder`` for a folder it cannot index."""
    if spec.codec != "mjpeg" or not Path(src).is_dir() or frame_images(src)[0].suffix.lower() not in JPEG_SUFFIXES:
        return None
    index = index_frame_folder(src)
    if output_size(index.height, index.width, spec.short_side) != (index.height, index.width):
        return None
    return index


def _mux_jpeg_frames(index: PacketIndex, dst: Path, fps: float | None) -> int:
    """The frame folder ``index`` describes, its JPEG images as they are, one MJPEG packet (a keyframe) each, into
    ``dst`` at ``fps`` (default ``FRAME_FOLDER_FPS``); returns the frames written."""
    import av

    rate = Fraction(fps or FRAME_FOLDER_FPS).limit_denominator(1001)
    folder = os.open(index.path, os.O_RDONLY)
    try:
        with av.open(str(dst), "w", options={"fflags": "+bitexact"}) as out:
            ost = out.add_stream(OUTPUT_CODECS["mjpeg"].encoder, rate=rate)
            ost.width, ost.height, ost.pix_fmt = index.width, index.height, OUTPUT_CODECS["mjpeg"].pix_fmt
            for k in range(index.num_frames):
                packet = av.Packet(read_payloads(index, [k], folder)[0])
                packet.stream, packet.pts, packet.dts, packet.time_base = ost, k, k, 1 / rate
                packet.is_keyframe = True
                out.mux(packet)
    finally:
        os.close(folder)
    return index.num_frames


@dataclass(frozen=True)
class Transcoded:
    """What ``transcode`` did: the frames written, and the source's first frame as ``probe_source`` gives it."""

    frames: int
    height: int  # the source's, as stored
    width: int
    rotation: int  # degrees a player applies (display matrix); the output is written without it


def transcode(src: str | Path, dst: str | Path, spec: PrepareSpec) -> Transcoded:
    """Transcode ``src`` into ``dst`` as ``spec`` says, via a checked temporary file; returns the frames written
    and the source's size and rotation (read from the frames it decodes: no second open of the source).
    A folder of JPEG frames bound for MJPEG at its own size is copied, not re-encoded (``copied_jpeg_frames``: its
    images become the video's packets, bit for bit; ``spec.quality`` does not apply; its first image is then
    decoded once by ``probe_source`` for the size and rotation).

    Raises ``RuntimeError`` (with the reason) when the source cannot be decoded or the output fails its check, and
    ``DestinationError`` when the output cannot be written (``DESTINATION_ERRNOS``, or an error about its folder);
    ``dst`` is then left as it was.
    """
    import av

    try:
        copied = copied_jpeg_frames(src, spec)
    except ValueError as e:  # a frame folder that cannot be indexed
        raise RuntimeError(str(e).removeprefix(f"{src}: ")) from None
    try:
        with atomic_path(dst) as tmp:
            if copied is not None:
                written, view = _mux_jpeg_frames(copied, tmp, spec.fps), None  # no frame decoded: probed below
                if problem := check_output(tmp, spec, written):
                    raise RuntimeError(problem)
            else:
                with open_source(src, spec.fps) as inp:
                    written, rate, view = _encode(inp, tmp, spec)
                    declared = _declared_seconds(inp, inp.streams.video[0])
                if written == 0:
                    raise RuntimeError("no decodable frame in the source")
                if declared and written / rate < 0.9 * declared - 2 / rate:  # the same rule as pipelines/validate.py
                    raise RuntimeError(f"truncated source: it declares {declared:.2f} s but its frames cover only "
                                       f"{float(written / rate):.2f} s")
                problem = check_output(tmp, spec, written)
                if problem:
                    raise RuntimeError(problem)
    except (OSError, av.error.FFmpegError) as e:  # PyAV's errors from the system are OSErrors too
        if isinstance(e, OSError) and is_destination_error(e, Path(dst)):
            raise DestinationError(e.errno, f"cannot write {dst}: {e.strerror or e}") from None
        if isinstance(e, av.error.FFmpegError):
            raise RuntimeError(f"cannot decode/encode: {type(e).__name__}: {e}") from None
        raise
    return Transcoded(written, *(view if view is not None else probe_source(src)))
