"""A minimal Matroska writer for clip streams: the container around packets copied verbatim from a file.

``timesformer_harness.pipelines.packets.clip_stream`` cuts the codecs IVF cannot carry (HEVC, AV1, MPEG-4 Part 2,
H.264 whose NAL length prefixes are not 4 bytes) into Matroska with this module: an EBML header (DocType
``matroska``), a Segment of exact size holding Info (TimestampScale, Duration), Tracks (one video TrackEntry: the
codec's ID from ``MKV_CODECS``, CodecPrivate = the file's extradata, i.e. the hvcC / avcC / av1C record or MPEG-4's
VOL header as MP4 and Matroska store it, so length-prefixed NAL units need no rewriting) and Clusters of
SimpleBlocks, in decode order. One timestamp tick is one frame (TimestampScale = the frame duration in ns), so a
block's timestamp is the frame's display position in the stream, as IVF's pts are.

What libavformat's Matroska demuxer (the one DALI and PyAV open in-memory streams with) relies on here: a block's
timestamp is its cluster's Timestamp plus the block's signed 16-bit relative timestamp (a new cluster starts at each
keyframe run and before the relative value would leave int16), it becomes the packet's pts (Matroska has no dts), and
the SimpleBlock's keyframe flag (0x80) the packet's key flag. Every element size is written as an 8-byte EBML
varint (EBMLMaxSizeLength 8), so the block and cluster headers have fixed sizes and are laid out with numpy.
"""

from __future__ import annotations

import struct

import numpy as np

# FFmpeg's canonical codec name (``PacketIndex.codec``) -> Matroska CodecID (the Matroska codec mappings)
MKV_CODECS = {"hevc": "V_MPEGH/ISO/HEVC", "h264": "V_MPEG4/ISO/AVC", "av1": "V_AV1", "mpeg4": "V_MPEG4/ISO/ASP",
              "vp9": "V_VP9", "vp8": "V_VP8"}
# the first byte of the configuration record CodecPrivate must hold (hvcC, av1C: ISO/IEC 14496-15, AV1-ISOBMFF), where
# a file's extradata may be something else (Annex-B parameter sets, raw OBUs: raw streams, MPEG-TS)
RECORD_FIRST_BYTE = {"hevc": (0x01, "an hvcC record"), "av1": (0x81, "an av1C record")}
ID = {name: bytes.fromhex(h) for name, h in (  # element IDs (RFC 8794 EBML, RFC 9559 Matroska)
    ("EBML", "1a45dfa3"), ("EBMLVersion", "4286"), ("EBMLReadVersion", "42f7"), ("EBMLMaxIDLength", "42f2"),
    ("EBMLMaxSizeLength", "42f3"), ("DocType", "4282"), ("DocTypeVersion", "4287"), ("DocTypeReadVersion", "4285"),
    ("Segment", "18538067"), ("Info", "1549a966"), ("TimestampScale", "2ad7b1"), ("Duration", "4489"),
    ("MuxingApp", "4d80"), ("WritingApp", "5741"), ("Tracks", "1654ae6b"), ("TrackEntry", "ae"),
    ("TrackNumber", "d7"), ("TrackUID", "73c5"), ("TrackType", "83"), ("FlagLacing", "9c"), ("CodecID", "86"),
    ("CodecPrivate", "63a2"), ("DefaultDuration", "23e383"), ("Video", "e0"), ("PixelWidth", "b0"),
    ("PixelHeight", "ba"), ("Cluster", "1f43b675"), ("Timestamp", "e7"), ("SimpleBlock", "a3"))}
APP = b"timesformer_harness"
BLOCK_HEAD = np.dtype([("id", "u1"), ("size", ">u8"), ("track", "u1"), ("time", ">i2"), ("flags", "u1")])
CLUSTER_HEAD = np.dtype([("id", ">u4"), ("size", ">u8"), ("time_id", "u1"), ("time_size", "u1"), ("time", ">u8")])
SIZE8 = 1 << 56  # the marker bit of an 8-byte EBML varint
INT16 = (-(1 << 15), (1 << 15) - 1)


def _element(eid: bytes, body: bytes) -> bytes:
    return eid + (SIZE8 | len(body)).to_bytes(8, "big") + body


def _uint(eid: bytes, value: int) -> bytes:
    return _element(eid, int(value).to_bytes(8, "big"))


def headers(codec: str, extradata: bytes, width: int, height: int, rate: tuple[int, int], frames: int,
            body: int) -> bytes:
    """The EBML header, the Segment's ID and size, Info and Tracks of a stream of ``frames`` frames whose clusters
    take ``body`` bytes. One timestamp tick is one frame at ``rate`` (numerator, denominator)."""
    tick_ns = round(1e9 * rate[1] / rate[0])
    ebml = _element(ID["EBML"], _uint(ID["EBMLVersion"], 1) + _uint(ID["EBMLReadVersion"], 1)
                    + _uint(ID["EBMLMaxIDLength"], 4) + _uint(ID["EBMLMaxSizeLength"], 8)
                    + _element(ID["DocType"], b"matroska") + _uint(ID["DocTypeVersion"], 4)
                    + _uint(ID["DocTypeReadVersion"], 2))
    info = _element(ID["Info"], _uint(ID["TimestampScale"], tick_ns) + _element(ID["Duration"], struct.pack(
        ">d", frames)) + _element(ID["MuxingApp"], APP) + _element(ID["WritingApp"], APP))
    entry = (_uint(ID["TrackNumber"], 1) + _uint(ID["TrackUID"], 1) + _uint(ID["TrackType"], 1)
             + _uint(ID["FlagLacing"], 0) + _element(ID["CodecID"], MKV_CODECS[codec].encode())
             + (_element(ID["CodecPrivate"], extradata) if extradata else b"") + _uint(ID["DefaultDuration"], tick_ns)
             + _element(ID["Video"], _uint(ID["PixelWidth"], width) + _uint(ID["PixelHeight"], height)))
    segment = info + _element(ID["Tracks"], _element(ID["TrackEntry"], entry))
    return ebml + ID["Segment"] + (SIZE8 | (len(segment) + body)).to_bytes(8, "big") + segment


def cluster_firsts(pts: np.ndarray, runs: tuple[int, ...]) -> np.ndarray:
    """(N,) int: for each block the index of its cluster's first block. A cluster opens at each keyframe run's first
    block and at any block whose timestamp its cluster's first block cannot reach with a signed 16-bit offset."""
    blocks = np.arange(len(pts))
    starts = np.zeros(len(pts), bool)
    starts[list(runs)] = True
    while True:
        first = np.maximum.accumulate(np.where(starts, blocks, 0))
        rel = pts - pts[first]
        out = np.flatnonzero((rel < INT16[0]) | (rel > INT16[1]))
        if not len(out):
            return first
        starts[out[0]] = True


def layout(sizes: np.ndarray, pts: np.ndarray, keys: np.ndarray,
           runs: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The clusters: (their cluster and block headers as one uint8 array, where each of those bytes goes, where each
    payload goes, their total size), in bytes from the first cluster's start. ``sizes``, ``pts`` (display positions)
    and ``keys`` (keyframe flags) are per block in decode order; ``runs`` the keyframe runs' first blocks."""
    n = len(sizes)
    firsts = cluster_firsts(pts, runs)
    opens = firsts == np.arange(n)
    first = np.flatnonzero(opens)
    lead = BLOCK_HEAD.itemsize + CLUSTER_HEAD.itemsize * opens
    block_at = np.concatenate([[0], np.cumsum(lead + sizes)[:-1]])
    payload_at = block_at + lead
    end = int(payload_at[-1] + sizes[-1])
    cluster = np.empty(len(first), CLUSTER_HEAD)
    cluster["id"] = int.from_bytes(ID["Cluster"], "big")
    cluster["time_id"], cluster["time_size"] = ID["Timestamp"][0], 0x88  # an 8-byte unsigned integer
    cluster["time"] = pts[first]
    cluster["size"] = SIZE8 | (np.append(block_at[first[1:]], end) - block_at[first] - 12)  # after ID and size
    block = np.empty(n, BLOCK_HEAD)
    block["id"], block["track"] = ID["SimpleBlock"][0], 0x81  # track number 1 as a 1-byte varint
    block["size"] = SIZE8 | (4 + sizes)
    block["time"] = pts - pts[firsts]
    block["flags"] = np.where(keys, 0x80, 0)
    ch, bh = CLUSTER_HEAD.itemsize, BLOCK_HEAD.itemsize
    heads = np.concatenate([cluster.view(np.uint8), block.view(np.uint8)])
    where = np.concatenate([(block_at[first][:, None] + np.arange(ch)).ravel(),
                            ((payload_at - bh)[:, None] + np.arange(bh)).ravel()])
    return heads, where, payload_at, end
