"""Per-clip packet streams: decode only the frames a clip needs, whatever the decoder.

DALI 2.4's ``fn.decoders.video`` builds no frame index for in-memory input, so it never seeks (CPU and GPU): it
decodes from the first packet it is given up to the last frame asked for. So the DALI loader hands it, per clip,
a small stream of only the packets the clip needs, starting at a keyframe:

* ``index_packets(path)``: one demux pass (PyAV, no decoding): every video packet's payload byte range in the file,
  its pts and keyframe flag, in decode order, and the display order. ``PacketIndexCache`` keeps indexes in memory
  and in a small SQLite file beside the probe cache, keyed by (path, size, mtime, version).
* ``keyframe_segments(keyframes, wanted)``: for each wanted frame the run from its keyframe up to it, merged where
  decoding on is no dearer than restarting at a keyframe: the fewest frames any decoder that starts at keyframes
  can decode. The PyAV loader follows the same rule (``timesformer_harness.pipelines.pyav.decode_frames``) and
  ``timesformer_harness.pipelines.tools.decode_cost`` models it as ``keyframe``.
* ``plan_packets(index, frames)``: those segments as packets to copy, the unique ascending positions to ask the
  decoder for in the new stream (forward only: a repeated or backward index makes DALI restart from the stream's
  start) and the order that expands them back to the clip's frames (repeats allowed).
* ``clip_stream(index, plan, fd)``: those packets read from the file with one ``os.pread`` per keyframe run
  (``copy_payloads``), in the container ``stream_format`` picks; no PyAV container is opened per clip. IVF
  (``ivf_stream``): VP8/VP9, MJPEG (libavformat maps the fourcc MJPG through its AVI tag table) and, for the GPU
  decoder, H.264 as an Annex-B byte stream (fourcc H264: each 4-byte NAL length prefix of the avcC framing of MP4 and
  Matroska overwritten by a start code, the SPS/PPS from the extradata before each run, each frame's display
  position as its pts). Matroska (``matroska_stream``, written by ``timesformer_harness.pipelines.mkv``), for the GPU
  decoder: HEVC (libavformat's IVF demuxer has no HEVC fourcc, and a raw Annex-B stream has no timestamps, by which
  DALI's GPU decoder orders frames), AV1, MPEG-4 Part 2 and H.264 with NAL length prefixes of other sizes: the
  payloads verbatim, the extradata (hvcC, av1C, avcC, the VOL header) as CodecPrivate, each block's timestamp the
  frame's display position. ``remux_packets`` copies the packets with PyAV into Matroska (~5 ms a clip) for what
  neither cut serves: payloads that are not byte ranges of the file (e.g. MPEG-TS), H.264 whose extradata is
  neither an avcC record nor Annex-B, HEVC/AV1 whose extradata is not an hvcC/av1C record (raw streams), codecs
  without a Matroska CodecID in ``mkv.MKV_CODECS``.

Frames are counted in display order (pts); a packet is one frame (VP9 superframes and VP8 alt-ref frames are one
packet in WebM, as the pre-flight check's frame count assumes). For codecs with B-frames the plan assumes closed
GOPs (IDR keyframes).
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from timesformer_harness.common import FileCache, file_key
from timesformer_harness.pipelines import mkv
from timesformer_harness.pipelines.bitstream import SIZED_CODECS, coded_frame_sizes, frame_pixel_bound, nal_length_size
from timesformer_harness.pipelines.manifest import FRAME_FOLDER_FPS, JPEG_SUFFIXES, frame_images
from timesformer_harness.pipelines.nvdec import DALI_CPU_CODECS

logger = logging.getLogger(__name__)

# 2: the codec's extradata; 3: the codec's canonical name (av1, not the decoder's libdav1d); 4: coded frame sizes
# checked (an index stored before could hold a file that grows past its header); 5: H.264/HEVC ones too; 6: frame
# folders
INDEX_VERSION = 6
# codecs whose packets travel in IVF (libavformat's IVF demuxer maps the fourcc through its AVI tag table)
IVF_FOURCC = {"vp8": b"VP80", "vp9": b"VP90", "mjpeg": b"MJPG", "h264": b"H264"}
ANNEXB_CODECS = frozenset({"h264"})  # NAL-unit codecs whose clip streams are Annex-B byte streams (in IVF)
START_CODE = b"\0\0\0\1"
SPAN_SLACK = 1 << 16  # one pread per keyframe run unless it would read this many bytes more than the payloads
JPEG_CODECS = frozenset({"mjpeg"})  # intra-only codecs whose every packet is a JPEG image (``jpeg_images``)
OFFSET_SLACK = 64  # a payload starts at most this many bytes after the packet's position (container framing)
MAX_IMAGE_BYTES = 64 << 20  # a frame folder's image above this is refused (a 4K JPEG takes a few MB)
JPEG_HEADER_BYTES = 1 << 20  # a JPEG's frame header is looked for in its first MiB (after its EXIF/ICC segments)
JPEG_FIRST_READ = 1 << 16  # ... reading this much first: the header of a typical image lies in its first kilobytes


@dataclass(frozen=True, eq=False)
class PacketIndex:
    """A file's video packets in decode order (payload offset/size, pts, keyframe flag) and the display order."""

    path: str
    codec: str  # FFmpeg's canonical codec name: vp9, vp8, mjpeg, h264, hevc, av1, mpeg4, ...
    width: int
    height: int
    rate: tuple[int, int]  # frame rate (numerator, denominator)
    offset: np.ndarray  # (N,) int64 payload byte offset in the file; -1 where the payload is not stored verbatim
    size: np.ndarray  # (N,) int64 payload bytes
    pts: np.ndarray  # (N,) int64 presentation timestamps (decode positions when the file has none)
    key: np.ndarray  # (N,) bool: a decoder can start at this packet
    display: np.ndarray  # (N,) int64: display index -> decode position
    extradata: bytes = b""  # the codec's global header (e.g. H.264's avcC record in MP4 and Matroska)
    files: tuple[str, ...] = ()  # a frame folder's images by decode position (``path`` the folder); () for a video

    @property
    def num_frames(self) -> int:
        return len(self.display)

    @property
    def fps(self) -> float:
        return self.rate[0] / self.rate[1]

    @property
    def verbatim(self) -> bool:
        """Every payload is a byte range of the file (``os.pread`` can fetch it)."""
        return bool((self.offset >= 0).all())

    @property
    def keyframes(self) -> list[int]:
        """Display indices of the frames a decoder can start at (ascending; 0 always)."""
        return np.flatnonzero(self.key[self.display]).tolist()

    def to_row(self) -> tuple[str, bytes]:
        """(JSON header, packed arrays): what ``PacketIndexCache`` stores."""
        meta = {"codec": self.codec, "width": self.width, "height": self.height, "rate": list(self.rate),
                "n": self.num_frames, "extradata": self.extradata.hex(), "files": list(self.files)}
        arrays = b"".join(a.astype(np.int64).tobytes() for a in (self.offset, self.size, self.pts)) + \
            self.key.astype(np.uint8).tobytes()
        return json.dumps(meta), arrays

    @staticmethod
    def from_row(path: str, meta_json: str, arrays: bytes) -> PacketIndex:
        meta = json.loads(meta_json)
        n = meta["n"]
        offset, size, pts = np.frombuffer(arrays, np.int64, 3 * n).reshape(3, n).copy()
        key = np.frombuffer(arrays, np.uint8, n, offset=24 * n).astype(bool)
        return PacketIndex(path, meta["codec"], meta["width"], meta["height"], tuple(meta["rate"]), offset, size, pts,
                           key, np.argsort(pts, kind="stable"), bytes.fromhex(meta["extradata"]), tuple(meta["files"]))


def index_packets(path: str | os.PathLike, offsets: bool = True) -> PacketIndex:
    """Demux ``path``'s first video stream (no decoding) into a ``PacketIndex``; ``offsets=False`` skips locating
    the payloads in the file (``offset`` all -1: enough for keyframe positions). Raises ValueError naming the file
    when it has no video stream or no video packet, or when a payload codes a frame far larger than the header's
    (``bitstream.frame_pixel_bound``: a decoder would allocate it), and PyAV's error when it cannot be opened.
    A folder is indexed as a frame folder (``index_frame_folder``)."""
    import av

    path = str(path)
    if os.path.isdir(path):
        return index_frame_folder(path)
    rows: list[tuple[int, int, int | None, bool]] = []
    with av.open(path) as container, open(path, "rb") as fh:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        cc = stream.codec_context
        extradata = bytes(cc.extradata or b"")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fd = fh.fileno()
        codec = cc.codec.canonical_name
        sized, bound = codec in SIZED_CODECS, frame_pixel_bound(cc.width, cc.height)
        length_size = nal_length_size(codec, extradata)
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            payload = bytes(packet) if sized or offsets else b""
            for width, height in coded_frame_sizes(codec, payload, length_size) if sized else ():
                if width * height > bound:
                    raise ValueError(f"{path}: packet {len(rows)} codes a {width}x{height} frame, far above the "
                                     f"{cc.width}x{cc.height} of the stream's header, and a decoder would allocate "
                                     f"it; re-encode the video at one frame size or leave it out of the manifest")
            offset = -1
            if offsets and packet.pos is not None and packet.pos >= 0:
                window = os.pread(fd, packet.size + OFFSET_SLACK, packet.pos)
                at = window.find(payload)
                offset = packet.pos + at if at >= 0 else -1
            rows.append((offset, packet.size, packet.pts, bool(packet.is_keyframe)))
    if not rows:
        raise ValueError(f"{path}: no video packets")
    offset, size, pts, key = (np.asarray(col) for col in zip(*rows))
    if any(p is None for p in pts):  # no timestamps: decode order is all there is
        pts = np.arange(len(rows))
    key = key.astype(bool)
    key[0] = True  # a decoder starts at the first packet whatever its flag says
    pts = pts.astype(np.int64)
    num, den = (rate.numerator, rate.denominator) if rate else (30, 1)
    return PacketIndex(path, codec, cc.width, cc.height, (num, den), offset.astype(np.int64),
                       size.astype(np.int64), pts, key, np.argsort(pts, kind="stable"), extradata)


def index_frame_folder(path: str | os.PathLike) -> PacketIndex:
    """A folder of JPEG frames (``manifest.frame_images``: its images in frame order) as a ``PacketIndex``: a packet
    per image, each a whole file (``files``, offset 0), every one a keyframe, at ``FRAME_FOLDER_FPS``. Every image's
    frame header is read. Raises ValueError naming the folder and the fix for a folder without images, of PNG frames
    (prepare makes a video of them), or with an image that is not a JPEG, is above ``MAX_IMAGE_BYTES``, or has
    another size than the first (a clip's frames have one size)."""
    path = str(path)
    try:
        images = frame_images(path)
    except RuntimeError as e:
        raise ValueError(f"{path}: {e}") from None
    if images[0].suffix.lower() not in JPEG_SUFFIXES:
        raise ValueError(f"{path}: a folder of {images[0].suffix} frames: the loaders read folders of JPEG frames "
                         f"({', '.join(sorted(JPEG_SUFFIXES))}); make a video of it with `python -m "
                         f"timesformer_harness.pipelines.tools.prepare MANIFEST --out DIR` and use DIR's manifest")
    sizes, first = [], (0, 0)
    for k, image in enumerate(images):
        with open(image, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_IMAGE_BYTES:
                raise ValueError(f"{path}: image {image.name} has {size} bytes, above the {MAX_IMAGE_BYTES} a frame "
                                 f"may have; replace it, or remove it")
            head = f.read(JPEG_FIRST_READ)
            dims = coded_frame_sizes("mjpeg", head)
            if not dims and len(head) == JPEG_FIRST_READ:  # large metadata segments first: read on
                dims = coded_frame_sizes("mjpeg", head + f.read(JPEG_HEADER_BYTES - JPEG_FIRST_READ))
        if not dims:
            raise ValueError(f"{path}: image {image.name} is not a JPEG image (no frame header); replace it, or "
                             f"remove it")
        if k == 0:
            first = dims[0]
        elif dims[0] != first:
            raise ValueError(f"{path}: image {image.name} is {dims[0][0]}x{dims[0][1]}, the folder's first frame "
                             f"{first[0]}x{first[1]}: a clip's frames have one size; resize it, or remove it")
        sizes.append(size)
    n = len(images)
    positions = np.arange(n, dtype=np.int64)
    return PacketIndex(path, "mjpeg", first[0], first[1], (FRAME_FOLDER_FPS, 1), np.zeros(n, np.int64),
                       np.asarray(sizes, np.int64), positions, np.ones(n, bool), positions.copy(),
                       files=tuple(p.name for p in images))


PACKET_CACHE = "packets.sqlite"  # beside the probe cache (timesformer_harness.common.cache_path)


class PacketIndexCache:
    """``PacketIndex`` per path: an in-memory LRU in front of a ``FileCache`` table (``store``: the SQLite file;
    None = memory only), so a file is demuxed once, not once per epoch or per process. Safe to use from several
    threads (a file is demuxed outside the lock: threads index different files at once), and in a process forked
    after it was used. ``offsets=False`` (memory only) indexes without payload offsets: every file is then fed whole,
    decoded from frame 0 (the baseline the benchmarks compare the clip streams with)."""

    def __init__(self, store: str | Path | None = None, size: int = 4096, offsets: bool = True):
        self.size, self.offsets = size, offsets
        self.store = FileCache(store if offsets else None, "packets", INDEX_VERSION)
        self.items: OrderedDict[tuple, PacketIndex] = OrderedDict()
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:  # for worker processes: the store's path travels, not its connection
        return {"store": self.store.path, "size": self.size, "offsets": self.offsets}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["store"], state["size"], state["offsets"])

    def get(self, path: str, frames: int = 0, size: tuple[int, int] = (0, 0)) -> PacketIndex:
        """The index of ``path`` (built and stored on first use). Raises RuntimeError naming the file when it
        cannot be indexed, when it has fewer than ``frames`` frames, or frames of another (height, width) than
        ``size`` (what the pre-flight check read: the file was cut or replaced since, and its clips would repeat its
        last frame, or be cut from the wrong place of the new frames)."""
        index = self._get(path)
        if frames and index.num_frames < frames:
            raise RuntimeError(f"{path}: {index.num_frames} frames now, {frames} when the pre-flight check counted "
                               "them: the file changed since (cut short or replaced); restore it, or leave it out")
        if size != (0, 0) and (index.height, index.width) != tuple(size):
            raise RuntimeError(f"{path}: {index.width}x{index.height} frames now, {size[1]}x{size[0]} when the "
                               "pre-flight check read them: the file changed since (replaced); restore it, or leave "
                               "it out")
        return index

    def _get(self, path: str) -> PacketIndex:
        key = file_key(path)
        if key is None:
            raise RuntimeError(f"{path}: cannot index its packets: it cannot be read (gone, or no permission)")
        with self.lock:
            index = self.items.get(key)
            if index is not None:
                self.items.move_to_end(key)
                return index
        found = self.store.get(path)
        if found is not None:
            index = PacketIndex.from_row(path, *found)
        else:
            try:
                index = index_packets(path, self.offsets)
            except Exception as e:  # named, with the fix: nothing fails anonymously inside DALI
                raise RuntimeError(f"{path}: cannot index its packets ({type(e).__name__}: {e}); run "
                                   f"`python -m timesformer_harness.pipelines.validate` on the manifest") from e
            self.store.put([(key, *index.to_row())])
        with self.lock:
            self.items[key] = index
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        return index


def keyframe_segments(keyframes: Sequence[int], wanted: Iterable[int]) -> list[tuple[int, int]]:
    """Display ranges ``[first, last]`` to decode, each starting at a keyframe, that deliver ``wanted`` (unique,
    ascending display indices) with the fewest decoded frames: a wanted frame whose keyframe is at or before the
    last frame already decoded is reached by decoding on, otherwise decoding restarts at its keyframe."""
    segments: list[list[int]] = []
    for f in wanted:
        k = keyframes[bisect.bisect_right(keyframes, f) - 1]
        if segments and k <= segments[-1][1]:
            segments[-1][1] = max(segments[-1][1], int(f))
        else:
            segments.append([int(k), int(f)])
    return [(a, b) for a, b in segments]


@dataclass(frozen=True)
class PacketPlan:
    """One clip's packets and what to ask the decoder for in the stream they make."""

    packets: np.ndarray  # decode positions to copy, in order (one run per segment, each from a keyframe)
    segments: tuple[int, ...]  # where each segment starts in ``packets``
    frames: np.ndarray  # (U,) int32 unique ascending positions of the wanted frames in the new stream
    order: np.ndarray  # (T,) int32 index into ``frames`` for each of the clip's frames (repeats allowed)
    decoded: int  # frames a decoder decodes to deliver them: the new stream's frames up to the last wanted one
    pts: np.ndarray  # (len(packets),) int64 each packet's display position in the new stream (its pts there)


def plan_packets(index: PacketIndex, frames: Sequence[int] | np.ndarray) -> PacketPlan:
    """The fewest packets from which a decoder starting at the first one delivers ``frames`` (display indices, any
    order, repeats allowed; indices past the end repeat the last frame, as the PyAV loader does)."""
    wanted = np.minimum(np.asarray(frames, dtype=np.int64), index.num_frames - 1)
    uniq, order = np.unique(wanted, return_inverse=True)
    runs: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    base = 0
    for a, b in keyframe_segments(index.keyframes, uniq.tolist()):
        # decode order: from the keyframe's packet to the last packet any frame in [a, b] needs (with B-frames a
        # frame displayed before b may be decoded after it), without the keyframe's leading pictures (decoded after
        # it, displayed before: an open GOP's may reference the previous GOP, and no later picture references them)
        seg = np.arange(int(index.display[a]), int(index.display[a:b + 1].max()) + 1)
        seg = seg[index.pts[seg] >= index.pts[index.display[a]]]
        rank = np.empty(len(seg), np.int64)
        rank[np.argsort(index.pts[seg], kind="stable")] = np.arange(len(seg))  # display order in the segment
        runs.append(seg)
        ranks.append(base + rank)
        base += len(seg)
    packets, pts = np.concatenate(runs), np.concatenate(ranks)
    stream_pos = np.empty(len(index.size), np.int64)
    stream_pos[packets] = pts
    pos = stream_pos[index.display[uniq]].astype(np.int32)
    starts = tuple(np.cumsum([0] + [len(seg) for seg in runs[:-1]]).tolist())
    return PacketPlan(packets, starts, pos, order.reshape(-1).astype(np.int32), int(pos.max()) + 1, pts)


REMUX_MIN_SAVING = 0.1  # PyAV remux (~5 ms of Python per clip) only when it saves this share of the frames


def stream_format(index: PacketIndex) -> tuple[str, str]:
    """The container ``clip_stream`` cuts ``index``'s packets into, and why none: ``ivf`` (``IVF_FOURCC``: VP8, VP9,
    MJPEG, and H.264 as Annex-B when its NAL length prefixes are 4 bytes or it is Annex-B already), ``matroska``
    (``mkv.MKV_CODECS``: HEVC, AV1, MPEG-4 Part 2, H.264 with other length prefixes) or "" (another codec, H.264
    whose extradata is neither an avcC record nor Annex-B, HEVC/AV1 whose extradata is not an hvcC/av1C record)."""
    if index.codec in ANNEXB_CODECS:
        try:
            _, length_size = nal_layout(index)
        except ValueError as e:
            return "", str(e)
        return ("ivf" if length_size in (0, 4) else "matroska"), ""
    if index.codec in IVF_FOURCC:
        return "ivf", ""
    if index.codec in mkv.MKV_CODECS:
        first, record = mkv.RECORD_FIRST_BYTE.get(index.codec, (None, ""))
        if first is not None and index.extradata[:1] != bytes([first]):
            return "", f"its {index.codec} extradata is not {record} (Matroska's CodecPrivate)"
        return "matroska", ""
    return "", f"no container for {index.codec} clip streams"


def feed_mode(index: PacketIndex, plan: PacketPlan, backend: str = "cpu") -> tuple[str, str]:
    """How to hand one clip to ``fn.decoders.video``, and why: ``stream`` (the plan's packets read from the file,
    ``clip_stream``: in IVF or Matroska per ``stream_format``, when every payload is a byte range of the file; on the
    CPU only the codecs DALI's CPU decoder has), ``remux`` (on the GPU, what ``clip_stream`` cannot serve: payloads
    that are not byte ranges of the file, e.g. MPEG-TS, or a codec ``stream_format`` has no container for, copied
    by PyAV into Matroska when that saves >= ``REMUX_MIN_SAVING`` of the frames decoding from frame 0 costs) or
    ``file`` (the whole file, decoded from frame 0)."""
    if backend != "gpu" and index.codec not in DALI_CPU_CODECS:
        return "file", f"no CPU decoder for {index.codec} in DALI (the pre-flight check rejects it)"
    fmt, why = stream_format(index)
    if fmt:
        if index.verbatim:
            return "stream", ""
        why = f"its {index.codec} payloads are not stored verbatim in the file (container framing)"
        if index.codec in DALI_CPU_CODECS:
            return "file", why
    if backend != "gpu":
        return "file", why
    from_start = int(plan.packets.max()) + 1  # decoding the whole file reaches the plan's last packet
    if plan.decoded <= (1 - REMUX_MIN_SAVING) * from_start:
        return "remux", why
    return "file", f"seeking saves under {REMUX_MIN_SAVING:.0%} of the frames decoded from frame 0"


def nal_layout(index: PacketIndex) -> tuple[bytes, int]:
    """(the SPS/PPS as Annex-B NAL units, the size of the payloads' NAL length prefixes; 0: the payloads are Annex-B
    already) of an H.264 file, read from its extradata: an avcC record (MP4, Matroska) or Annex-B NAL units
    (MPEG-TS, raw streams). Raises ValueError naming the file when it is neither."""
    ed = index.extradata
    if ed.startswith(b"\0\0\1") or ed.startswith(START_CODE):
        return ed, 0
    units: list[bytes] = []

    def take(at: int) -> int:  # one 16-bit-length-prefixed NAL unit at ``at``; returns where the next field starts
        n = int.from_bytes(ed[at:at + 2], "big")
        if at + 2 + n > len(ed):
            raise ValueError("a parameter set runs past the record")
        units.append(ed[at + 2:at + 2 + n])
        return at + 2 + n

    try:
        if not ed or ed[0] != 1:
            raise ValueError("neither an avcC record nor Annex-B NAL units")
        # avcC (ISO/IEC 14496-15 5.3.3): 4 bytes, the length size - 1, the SPS count and SPSs, the PPS count and PPSs
        length_size, at = (ed[4] & 3) + 1, 6
        for _ in range(ed[5] & 0x1F):
            at = take(at)
        count, at = ed[at], at + 1
        for _ in range(count):
            at = take(at)
    except (IndexError, ValueError) as e:
        raise ValueError(f"{index.path}: cannot read the {index.codec} parameter sets from its extradata "
                         f"({len(ed)} bytes): {e}") from None
    return b"".join(START_CODE + u for u in units), length_size


def read_payloads(index: PacketIndex, packets: Sequence[int] | np.ndarray, fd: int) -> list[bytes]:
    """The payloads of ``packets`` (decode positions) read from the open file ``fd`` (a frame folder's: the open
    folder, ``read_image``)."""
    if index.files:
        return [read_image(index, int(d), fd) for d in packets]
    return [os.pread(fd, int(index.size[d]), int(index.offset[d])) for d in packets]


def read_image(index: PacketIndex, position: int, folder_fd: int) -> bytes:
    """A frame folder's image at decode ``position``, read whole through the open folder ``folder_fd``. Raises
    RuntimeError naming it when its size is not the indexed one (the index is kept per the folder's own size and
    time, which an image rewritten in place does not change), OSError when it is gone."""
    name, size = index.files[position], int(index.size[position])
    fd = os.open(name, os.O_RDONLY, dir_fd=folder_fd)
    try:
        data = os.read(fd, size + 1)
    finally:
        os.close(fd)
    if len(data) != size:
        raise RuntimeError(f"{index.path}: image {name} has changed since the folder was indexed ({size} bytes then); "
                           f"`touch` the folder so that it is indexed again")
    return data


def jpeg_images(index: PacketIndex, frames: Sequence[int] | np.ndarray, fd: int) -> list[bytes]:
    """Each of ``frames`` (display indices, any order, repeats allowed; past the end: the last frame) of an
    intra-only JPEG video (``JPEG_CODECS``) as its packet, a JPEG image, read from the open file ``fd`` (through
    PyAV's demuxer when the payloads are not byte ranges of the file). Packets without Huffman tables (Motion-JPEG
    as AVI1 stores it) are left as they are: libjpeg-turbo decodes them with the standard tables (tested).
    Raises ValueError naming the file for another codec."""
    if index.codec not in JPEG_CODECS:
        raise ValueError(f"{index.path}: codec {index.codec} is not intra-only JPEG ({sorted(JPEG_CODECS)})")
    wanted = np.minimum(np.asarray(frames, dtype=np.int64), index.num_frames - 1)
    positions = [int(index.display[f]) for f in wanted]
    if index.verbatim:
        unique = sorted(set(positions))
        payloads = dict(zip(unique, read_payloads(index, np.asarray(unique), fd)))
    else:
        payloads = _demuxed_payloads(index, set(positions))
    return [payloads[d] for d in positions]


def _demuxed_payloads(index: PacketIndex, positions: set[int]) -> dict[int, bytes]:
    """The payloads of the packets at decode ``positions``, demuxed by PyAV from the start of the file."""
    import av

    out: dict[int, bytes] = {}
    with av.open(index.path) as container:
        n = 0
        for packet in container.demux(container.streams.video[0]):
            if packet.size == 0:
                continue
            if n in positions:
                out[n] = bytes(packet)
                if len(out) == len(positions):
                    break
            n += 1
    if len(out) < len(positions):
        raise RuntimeError(f"{index.path}: {len(positions) - len(out)} packets not found (the file changed since it "
                           "was indexed?)")
    return out


def clip_stream(index: PacketIndex, plan: PacketPlan, fd: int, stats: dict[str, int] | None = None) -> np.ndarray:
    """The plan's packets as the stream DALI is fed (uint8), read from the open file ``fd`` without PyAV: in IVF
    (``ivf_stream``) or Matroska (``matroska_stream``) as ``stream_format`` says. ``stats`` (optional) counts
    ``preads`` and ``bytes_read``. Raises ValueError naming the file when neither serves its codec."""
    fmt, why = stream_format(index)
    if fmt == "ivf":
        return ivf_stream(index, plan, fd, stats)
    if fmt == "matroska":
        return matroska_stream(index, plan, fd, stats)
    raise ValueError(f"{index.path}: cannot cut a clip stream: {why}")


def ivf_stream(index: PacketIndex, plan: PacketPlan, fd: int, stats: dict[str, int] | None = None) -> np.ndarray:
    """The plan's packets as an IVF stream (fourcc ``IVF_FOURCC[codec]``), read by ``copy_payloads``. Each frame's
    pts is its display position in the stream (``plan.pts``: without a frame index DALI's GPU decoder outputs frames
    by pts). H.264 (``ANNEXB_CODECS``): an Annex-B byte stream, each 4-byte NAL length prefix overwritten by a start
    code and the SPS/PPS (``nal_layout``) put before each run's first packet."""
    params, length_size = nal_layout(index) if index.codec in ANNEXB_CODECS else (b"", 0)
    n = len(plan.packets)
    sizes = index.size[plan.packets]
    heads = np.zeros(n, np.int64)
    heads[list(plan.segments)] = len(params)
    frame_sizes = heads + sizes
    frame_at = 32 + np.concatenate([[0], np.cumsum(12 + frame_sizes)[:-1]])  # each frame's 12-byte header
    payload_at = frame_at + 12 + heads
    num, den = index.rate
    out = bytearray(int(frame_at[-1] + 12 + frame_sizes[-1]))
    out[:32] = struct.pack("<4sHH4sHHIIII", b"DKIF", 0, 32, IVF_FOURCC[index.codec], index.width, index.height, num,
                           den, n, 0)
    buf = np.frombuffer(out, np.uint8)
    header = np.empty(n, np.dtype([("size", "<u4"), ("pts", "<u8")]))  # packed: 12 bytes a frame
    header["size"], header["pts"] = frame_sizes, plan.pts
    buf[frame_at[:, None] + np.arange(12)] = header.view(np.uint8).reshape(n, 12)
    dst = payload_at.tolist()
    if params:
        for a in plan.segments:
            out[dst[a] - len(params):dst[a]] = params
    copy_payloads(index, plan, fd, out, dst, stats)
    if length_size:
        _start_codes(buf, payload_at, payload_at + sizes, index.path)
    return buf


def matroska_stream(index: PacketIndex, plan: PacketPlan, fd: int,
                    stats: dict[str, int] | None = None) -> np.ndarray:
    """The plan's packets as a Matroska stream (``timesformer_harness.pipelines.mkv``: CodecPrivate = the file's
    extradata, payloads verbatim, each block's timestamp its display position ``plan.pts``, a cluster per keyframe
    run), read by ``copy_payloads``. Any codec of ``mkv.MKV_CODECS`` whose payloads are byte ranges of the file."""
    sizes = index.size[plan.packets]
    keys = index.key[plan.packets].copy()
    keys[list(plan.segments)] = True
    heads, where, payload_at, body = mkv.layout(sizes, plan.pts, keys, plan.segments)
    top = mkv.headers(index.codec, index.extradata, index.width, index.height, index.rate, len(plan.packets), body)
    out = bytearray(len(top) + body)
    out[:len(top)] = top
    buf = np.frombuffer(out, np.uint8)
    buf[where + len(top)] = heads
    copy_payloads(index, plan, fd, out, (payload_at + len(top)).tolist(), stats)
    return buf


def copy_payloads(index: PacketIndex, plan: PacketPlan, fd: int, out: bytearray, dst: list[int],
                  stats: dict[str, int] | None = None) -> None:
    """Copy the payloads of the plan's packets from the open file ``fd`` into ``out`` at ``dst`` (per packet): one
    ``os.pread`` per keyframe run (per packet where a run's packets lie more than ``SPAN_SLACK`` bytes apart).
    ``stats`` (optional) counts ``preads`` and ``bytes_read``. A frame folder's images are read one by one
    (``read_image``; each read counted as a pread)."""
    n = len(plan.packets)
    if index.files:
        images = read_payloads(index, plan.packets, fd)
        for k, data in enumerate(images):
            out[dst[k]:dst[k] + len(data)] = data
        if stats is not None:
            stats["preads"] = stats.get("preads", 0) + n
            stats["bytes_read"] = stats.get("bytes_read", 0) + sum(map(len, images))
        return

    offsets, sizes = index.offset[plan.packets].tolist(), index.size[plan.packets].tolist()  # Python ints: fast loop
    for a, b in zip(plan.segments, [*plan.segments[1:], n]):
        first, end = offsets[a], offsets[b - 1] + sizes[b - 1]
        if end - first <= sum(sizes[a:b]) + SPAN_SLACK:
            reads = [(a, b, first, os.pread(fd, end - first, first))]
        else:  # far apart (interleaved audio?): a read per packet
            reads = [(k, k + 1, offsets[k], os.pread(fd, sizes[k], offsets[k])) for k in range(a, b)]
        for lo, hi, at, data in reads:
            if len(data) < offsets[hi - 1] + sizes[hi - 1] - at:
                raise RuntimeError(f"{index.path}: packets of a clip lie past the end of the file (the file changed "
                                   "since it was indexed?)")
            view = memoryview(data)
            for k in range(lo, hi):
                out[dst[k]:dst[k] + sizes[k]] = view[offsets[k] - at:offsets[k] - at + sizes[k]]
        if stats is not None:
            stats["preads"] = stats.get("preads", 0) + len(reads)
            stats["bytes_read"] = stats.get("bytes_read", 0) + sum(len(r[3]) for r in reads)


def _start_codes(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, path: str) -> None:
    """Overwrite the 4-byte big-endian NAL length prefixes of the payloads ``buf[starts:ends]`` with start codes (the
    same size: in place), the k-th NAL unit of every payload at once."""
    pos, ends, four = starts.astype(np.int64), ends.astype(np.int64), np.arange(4)
    while len(pos):
        at = pos[:, None] + four
        if (at[:, 3] >= ends).any():
            raise ValueError(f"{path}: a packet ends inside a NAL length prefix (not 4-byte length-prefixed NAL "
                             "units?)")
        b = buf[at].astype(np.int64)
        pos = pos + 4 + ((b[:, 0] << 24) | (b[:, 1] << 16) | (b[:, 2] << 8) | b[:, 3])
        if (pos > ends).any():
            raise ValueError(f"{path}: a NAL unit runs past its packet (not 4-byte length-prefixed NAL units?)")
        buf[at] = (0, 0, 0, 1)
        more = pos < ends
        pos, ends = pos[more], ends[more]


def _collect(packets: Iterable[Any], wanted_pts: set[int]) -> list[Any]:
    """The packets of ``packets`` whose pts is in ``wanted_pts``, stopping once all are found."""
    found = []
    for p in packets:
        if p.size > 0 and p.pts is not None and int(p.pts) in wanted_pts:
            found.append(p)
            if len(found) == len(wanted_pts):
                break
    return found


def remux_packets(index: PacketIndex, plan: PacketPlan, fmt: str = "matroska") -> bytes:
    """The plan's packets copied by PyAV (seek + demux + mux, no decoding) into ``fmt`` in memory: any codec,
    B-frames included. Each segment is re-timed to follow the previous one in display order (without an index
    DALI's GPU decoder outputs frames by pts) and in decode order (dts)."""
    import av

    step = int(np.median(np.diff(np.sort(index.pts)))) if index.num_frames > 1 else 1
    buf = io.BytesIO()
    with av.open(index.path) as src, av.open(buf, "w", format=fmt) as dst:
        s = src.streams.video[0]
        out = dst.add_stream_from_template(s)
        base, last_dts = 0, None
        for seg in np.split(plan.packets, plan.segments[1:]):
            seg_pts = {int(index.pts[d]) for d in seg}
            src.seek(int(index.pts[seg[0]]), stream=s, backward=True, any_frame=False)
            copied = _collect(src.demux(s), seg_pts)
            if len(copied) < len(seg_pts):  # the seek landed past them (MPEG-TS can): read from the file's start
                with av.open(index.path) as again:
                    copied = _collect(again.demux(again.streams.video[0]), seg_pts)
            if len(copied) < len(seg_pts):
                raise RuntimeError(f"{index.path}: {len(seg_pts) - len(copied)} packets of a clip not found again "
                                   "(the file changed since it was indexed?)")
            p0 = min(int(p.pts) for p in copied)
            shift = base - p0
            dts0 = copied[0].dts
            if last_dts is not None and dts0 is not None and dts0 + shift <= last_dts:
                shift = last_dts + 1 - dts0
            for p in copied:
                p.pts += shift
                if p.dts is not None:
                    p.dts += shift
                    last_dts = int(p.dts)
                p.stream = out
                dst.mux(p)
            base = max(int(p.pts) for p in copied) + step
    return buf.getvalue()


def count_stream_frames(data: bytes, upto: int) -> int:
    """Frames a decoder decodes from the start of the in-memory stream ``data`` to deliver its frame ``upto``
    (display position): the measured cost of a clip stream (PyAV decoding the very bytes DALI is fed)."""
    import av

    count = 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        for _ in container.decode(stream):
            count += 1
            if count > upto:
                break
    return count
