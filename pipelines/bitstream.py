"""Frame sizes read from compressed payloads, and the largest frame a decoder may be asked to allocate.

A container header states one frame size, but a VP8/VP9 keyframe or a JPEG image carries its own, and a decoder
allocates what the payload says. A stream whose frames grow far past the header (64x64, then one 8192x8192 frame)
passes a probe that decodes the first frame; ``coded_frame_sizes`` reads the sizes from the payloads' own headers
(bits of the VP8 frame tag, the VP9 uncompressed header of each frame of a superframe, the JPEG SOF segment), so the
packet index refuses such a file before any decoder, DALI's included, meets the frame.
"""

from __future__ import annotations

# 8K: the frame size assumed for a header that states none (and the largest first frame the probe decodes)
PROBE_DECODE_SIZE = (7680, 4320)
SIZED_CODECS = frozenset({"vp8", "vp9", "mjpeg"})  # those whose payloads ``coded_frame_sizes`` reads

_VP9_SYNC = 0x498342
_VP8_START = b"\x9d\x01\x2a"
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # markers without a length field


def frame_pixel_bound(width: int, height: int) -> int:
    """The most pixels a decoder may allocate for one frame of a stream whose header says ``width`` x ``height``:
    about twice that, with slack for a decoder's row alignment (up to 64 pixels each way) and for streams whose frame
    size varies a little; ``PROBE_DECODE_SIZE`` when the header states no size."""
    width, height = (width, height) if width > 0 and height > 0 else PROBE_DECODE_SIZE
    return 2 * (width + 128) * (height + 128)


def coded_frame_sizes(codec: str, payload: bytes) -> list[tuple[int, int]]:
    """The (width, height) of each frame whose size ``payload`` (one packet of ``codec``) states: a VP8 keyframe, a
    VP9 keyframe, intra-only frame or inter frame with an explicit size (every frame of a superframe), a JPEG image
    (its first SOF segment). Empty for frames that reuse a reference's size, for a header cut short, and for codecs
    not in ``SIZED_CODECS``."""
    if codec == "vp9":
        return [s for frame in _vp9_frames(payload) if (s := _vp9_size(frame)) is not None]
    reader = _SIZE_READERS.get(codec)
    size = reader(payload) if reader is not None else None
    return [size] if size is not None else []


class _Bits:
    """MSB-first bit reader over the first ``HEADER_BYTES`` of ``data`` (every field read here lies within them);
    reading past them raises IndexError."""

    HEADER_BYTES = 16

    def __init__(self, data: bytes) -> None:
        head = data[:self.HEADER_BYTES]
        self.value, self.size, self.pos = int.from_bytes(head, "big"), 8 * len(head), 0

    def read(self, n: int) -> int:
        self.pos += n
        if self.pos > self.size:
            raise IndexError("header cut short")
        return (self.value >> (self.size - self.pos)) & ((1 << n) - 1)


def _vp9_frames(payload: bytes) -> list[bytes]:
    """The frames of a VP9 packet: those its superframe index lists (Annex B of the VP9 bitstream specification),
    else the packet itself."""
    if not payload:
        return []
    marker = payload[-1]
    if marker & 0xE0 == 0xC0:
        count, mag = (marker & 7) + 1, ((marker >> 3) & 3) + 1
        index_size = 2 + mag * count
        if len(payload) >= index_size and payload[-index_size] == marker:
            frames, start, at = [], 0, len(payload) - index_size + 1
            for _ in range(count):
                size = int.from_bytes(payload[at:at + mag], "little")
                at += mag
                frames.append(payload[start:start + size])
                start += size
            return [f for f in frames if f]
    return [payload]


def _vp9_size(frame: bytes) -> tuple[int, int] | None:
    """The frame size a VP9 uncompressed header states (section 6.2 of the specification), or None."""
    bits = _Bits(frame)
    try:
        if bits.read(2) != 2:  # frame_marker
            return None
        profile = bits.read(1) | (bits.read(1) << 1)
        if profile == 3:
            bits.read(1)
        if bits.read(1):  # show_existing_frame: no new frame
            return None
        key_frame = bits.read(1) == 0
        show_frame, error_resilient = bits.read(1), bits.read(1)
        if key_frame:
            if bits.read(24) != _VP9_SYNC:
                return None
            _vp9_color_config(bits, profile)
            return bits.read(16) + 1, bits.read(16) + 1
        intra_only = 0 if show_frame else bits.read(1)
        if not error_resilient:
            bits.read(2)  # reset_frame_context
        if intra_only:
            if bits.read(24) != _VP9_SYNC:
                return None
            if profile > 0:
                _vp9_color_config(bits, profile)
            bits.read(8)  # refresh_frame_flags
            return bits.read(16) + 1, bits.read(16) + 1
        bits.read(8 + 3 * 4)  # refresh_frame_flags, three (ref_frame_idx, sign_bias)
        for _ in range(3):
            if bits.read(1):  # found_ref: the size of a reference frame, itself read before
                return None
        return bits.read(16) + 1, bits.read(16) + 1
    except IndexError:
        return None


def _vp9_color_config(bits: _Bits, profile: int) -> None:
    if profile >= 2:
        bits.read(1)  # ten_or_twelve_bit
    rgb = bits.read(3) == 7  # color_space CS_RGB
    if not rgb:
        bits.read(1)  # color_range
    if profile in (1, 3):
        bits.read(1 if rgb else 3)  # (subsampling_x, subsampling_y,) reserved_zero


def _vp8_size(payload: bytes) -> tuple[int, int] | None:
    """A VP8 keyframe's size (RFC 6386, section 9.1): 14 bits each after the 3-byte frame tag and start code."""
    if len(payload) < 10 or payload[0] & 1 or payload[3:6] != _VP8_START:
        return None
    return int.from_bytes(payload[6:8], "little") & 0x3FFF, int.from_bytes(payload[8:10], "little") & 0x3FFF


def _jpeg_size(payload: bytes) -> tuple[int, int] | None:
    """The size in a JPEG image's first SOF segment (ITU T.81, B.2.2), walking the marker segments before it."""
    at = 0
    while at + 4 <= len(payload):
        if payload[at] != 0xFF:
            return None
        marker = payload[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        if marker in _JPEG_SOF:
            if at + 9 > len(payload):
                return None
            return int.from_bytes(payload[at + 7:at + 9], "big"), int.from_bytes(payload[at + 5:at + 7], "big")
        at += 2 + int.from_bytes(payload[at + 2:at + 4], "big")
    return None


_SIZE_READERS = {"vp8": _vp8_size, "mjpeg": _jpeg_size}  # one size per packet (VP9 reads each frame of a superframe)
