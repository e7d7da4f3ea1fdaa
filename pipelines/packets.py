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
* ``ivf_stream(index, payloads)``: VP8/VP9 and MJPEG packets in IVF (libavformat maps the fourcc MJPG through its
  AVI tag table), read by ``os.pread`` from the file; ``remux_packets`` copies them with PyAV into Matroska instead
  (H.264/HEVC for the GPU decoder).

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
from typing import Iterable, Sequence

import numpy as np

from timesformer_harness.common import FileCache, file_key

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
IVF_FOURCC = {"vp8": b"VP80", "vp9": b"VP90", "mjpeg": b"MJPG"}  # codecs whose packets travel in IVF
JPEG_CODECS = frozenset({"mjpeg"})  # intra-only codecs whose every packet is a JPEG image (``jpeg_images``)
OFFSET_SLACK = 64  # a payload starts at most this many bytes after the packet's position (container framing)


@dataclass(frozen=True, eq=False)
class PacketIndex:
    """A file's video packets in decode order (payload offset/size, pts, keyframe flag) and the display order."""

    path: str
    codec: str  # PyAV codec name: vp9, vp8, mjpeg, h264, hevc, ...
    width: int
    height: int
    rate: tuple[int, int]  # frame rate (numerator, denominator)
    offset: np.ndarray  # (N,) int64 payload byte offset in the file; -1 where the payload is not stored verbatim
    size: np.ndarray  # (N,) int64 payload bytes
    pts: np.ndarray  # (N,) int64 presentation timestamps (decode positions when the file has none)
    key: np.ndarray  # (N,) bool: a decoder can start at this packet
    display: np.ndarray  # (N,) int64: display index -> decode position

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
                "n": self.num_frames}
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
                           key, np.argsort(pts, kind="stable"))


def index_packets(path: str | os.PathLike, offsets: bool = True) -> PacketIndex:
    """Demux ``path``'s first video stream (no decoding) into a ``PacketIndex``; ``offsets=False`` skips locating
    the payloads in the file (``offset`` all -1: enough for keyframe positions). Raises ValueError naming the file
    when it has no video stream or no video packet, and PyAV's error when it cannot be opened."""
    import av

    path = str(path)
    rows: list[tuple[int, int, int | None, bool]] = []
    with av.open(path) as container, open(path, "rb") as fh:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        cc = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fd = fh.fileno()
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            offset = -1
            if offsets and packet.pos is not None and packet.pos >= 0:
                window = os.pread(fd, packet.size + OFFSET_SLACK, packet.pos)
                at = window.find(bytes(packet))
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
    return PacketIndex(path, cc.name, cc.width, cc.height, (num, den), offset.astype(np.int64), size.astype(np.int64),
                       pts, key, np.argsort(pts, kind="stable"))


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

    def get(self, path: str) -> PacketIndex:
        """The index of ``path`` (built and stored on first use). Raises RuntimeError naming the file when it
        cannot be indexed."""
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
            self.store.put([(path, *index.to_row())])
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


def plan_packets(index: PacketIndex, frames: Sequence[int] | np.ndarray) -> PacketPlan:
    """The fewest packets from which a decoder starting at the first one delivers ``frames`` (display indices, any
    order, repeats allowed; indices past the end repeat the last frame, as the PyAV loader does)."""
    wanted = np.minimum(np.asarray(frames, dtype=np.int64), index.num_frames - 1)
    uniq, order = np.unique(wanted, return_inverse=True)
    packets: list[np.ndarray] = []
    new_pos: dict[int, int] = {}
    base = 0
    for a, b in keyframe_segments(index.keyframes, uniq.tolist()):
        # decode order: from the keyframe's packet to the last packet any frame in [a, b] needs (with B-frames a
        # frame displayed before b may be decoded after it), without the keyframe's leading pictures (decoded after
        # it, displayed before: an open GOP's may reference the previous GOP, and no later picture references them)
        seg = np.arange(int(index.display[a]), int(index.display[a:b + 1].max()) + 1)
        seg = seg[index.pts[seg] >= index.pts[index.display[a]]]
        packets.append(seg)
        for rank, d in enumerate(seg[np.argsort(index.pts[seg], kind="stable")]):  # display order in the segment
            new_pos[int(d)] = base + rank
        base += len(seg)
    pos = np.array([new_pos[int(index.display[f])] for f in uniq], dtype=np.int32)
    starts = tuple(np.cumsum([0] + [len(seg) for seg in packets[:-1]]).tolist())
    return PacketPlan(np.concatenate(packets), starts, pos, order.reshape(-1).astype(np.int32), int(pos.max()) + 1)


REMUX_MIN_SAVING = 0.1  # PyAV remux (ms of Python per clip) only when it saves this share of the frames


def feed_mode(index: PacketIndex, plan: PacketPlan, backend: str = "cpu") -> tuple[str, str]:
    """How to hand one clip to ``fn.decoders.video``, and why: ``stream`` (the plan's packets read from the file in
    IVF: VP8/VP9/MJPEG whose payloads are byte ranges of the file), ``remux`` (the packets copied by PyAV into
    Matroska: other codecs on the GPU, when that saves >= ``REMUX_MIN_SAVING`` of the frames decoding from frame 0
    costs) or ``file`` (the whole file, decoded from frame 0)."""
    if index.codec in IVF_FOURCC:
        if index.verbatim:
            return "stream", ""
        return "file", f"its {index.codec} payloads are not stored verbatim in the file (container framing)"
    if backend != "gpu":
        return "file", f"no raw container for {index.codec} (and DALI's CPU decoder does not read it)"
    from_start = int(plan.packets.max()) + 1  # decoding the whole file reaches the plan's last packet
    if plan.decoded <= (1 - REMUX_MIN_SAVING) * from_start:
        return "remux", ""
    return "file", f"seeking saves under {REMUX_MIN_SAVING:.0%} of the frames decoded from frame 0"


def read_payloads(index: PacketIndex, packets: np.ndarray, fd: int) -> list[bytes]:
    """The payloads of ``packets`` (decode positions) read from the open file ``fd``."""
    return [os.pread(fd, int(index.size[d]), int(index.offset[d])) for d in packets]


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


def ivf_stream(index: PacketIndex, payloads: list[bytes]) -> bytes:
    """An IVF stream of ``payloads`` (VP8/VP9/MJPEG) with pts 0, 1, 2, ... at the file's frame rate."""
    num, den = index.rate
    parts = [struct.pack("<4sHH4sHHIIII", b"DKIF", 0, 32, IVF_FOURCC[index.codec], index.width, index.height, num,
                         den, len(payloads), 0)]
    for i, p in enumerate(payloads):
        parts += [struct.pack("<IQ", len(p), i), p]
    return b"".join(parts)


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
            copied = []
            for p in src.demux(s):
                if p.size > 0 and p.pts is not None and int(p.pts) in seg_pts:
                    copied.append(p)
                    if len(copied) == len(seg_pts):
                        break
            if len(copied) < len(seg_pts):
                raise RuntimeError(f"{index.path}: {len(seg_pts) - len(copied)} packets of a clip not found again "
                                   "after seeking (the file changed since it was indexed?)")
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
