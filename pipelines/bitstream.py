"""Frame sizes read from compressed payloads, and the largest frame a decoder may be asked to allocate.

A container header states one frame size, but a VP8/VP9 keyframe, a JPEG image or an H.264/HEVC sequence parameter
set sent in-band carries its own, and a decoder allocates what the payload says. A stream whose frames grow far past
the header (64x64, then one 8192x8192 frame) passes a probe that decodes the first frame; ``coded_frame_sizes``
reads the sizes from the payloads' own headers (bits of the VP8 frame tag, the VP9 uncompressed header of each frame
of a superframe, the JPEG SOF segment, the SPS NAL units of an H.264 or HEVC packet), so the packet index refuses
such a file before any decoder, DALI's and NVDEC's included, meets the frame.
"""

from __future__ import annotations

# 8K: the frame size assumed for a header that states none (and the largest first frame the probe decodes)
PROBE_DECODE_SIZE = (7680, 4320)
SIZED_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc"})  # those whose payloads ``coded_frame_sizes`` reads

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


def coded_frame_sizes(codec: str, payload: bytes, nal_length_size: int = 0) -> list[tuple[int, int]]:
    """The (width, height) of each frame whose size ``payload`` (one packet of ``codec``) states: a VP8 keyframe, a
    VP9 keyframe, intra-only frame or inter frame with an explicit size (every frame of a superframe), a JPEG image
    (its first SOF segment), each H.264/HEVC sequence parameter set in the packet (the size of the frames that follow
    it, after cropping). Empty for frames that reuse a reference's size, for a header cut short, and for codecs not in
    ``SIZED_CODECS``. ``nal_length_size``: for H.264/HEVC, the bytes of each NAL unit's length prefix (``mp4``,
    Matroska: ``nal_length_size(codec, extradata)``), 0 for start codes (Annex B)."""
    if codec == "vp9":
        return [s for frame in _vp9_frames(payload) if (s := _vp9_size(frame)) is not None]
    if codec in _SPS_READERS:
        is_sps, read = _SPS_READERS[codec]
        return [s for nal in _nal_units(payload, nal_length_size) if is_sps(nal) and (s := read(nal)) is not None]
    reader = _SIZE_READERS.get(codec)
    size = reader(payload) if reader is not None else None
    return [size] if size is not None else []


def nal_length_size(codec: str, extradata: bytes) -> int:
    """The length-prefix size of the NAL units in an H.264/HEVC stream's packets, from its extradata: the avcC/hvcC
    record's ``lengthSizeMinusOne`` + 1; 0 (start codes) for Annex-B extradata, none, or another codec."""
    at = {"h264": 4, "hevc": 21}.get(codec)
    if at is None or len(extradata) <= at or extradata[0] != 1:
        return 0
    return (extradata[at] & 3) + 1


class _Bits:
    """MSB-first bit reader over the first ``limit`` bytes of ``data`` (every field read here lies within them);
    reading past them raises IndexError."""

    HEADER_BYTES = 16

    def __init__(self, data: bytes, limit: int = HEADER_BYTES) -> None:
        head = data[:limit]
        self.value, self.size, self.pos = int.from_bytes(head, "big"), 8 * len(head), 0

    def read(self, n: int) -> int:
        self.pos += n
        if self.pos > self.size:
            raise IndexError("header cut short")
        return (self.value >> (self.size - self.pos)) & ((1 << n) - 1)

    def ue(self) -> int:
        """An unsigned Exp-Golomb code (H.264/HEVC ``ue(v)``)."""
        zeros = 0
        while not self.read(1):
            zeros += 1
            if zeros > 31:
                raise IndexError("not an Exp-Golomb code")
        return (1 << zeros) - 1 + self.read(zeros)

    def se(self) -> int:
        """A signed Exp-Golomb code (``se(v)``)."""
        k = self.ue()
        return (k + 1) // 2 if k % 2 else -(k // 2)


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


def _nal_units(payload: bytes, length_size: int) -> list[memoryview]:
    """The NAL units of an H.264/HEVC packet (views, not copies): each after its ``length_size``-byte big-endian
    length, or, with 0, between Annex-B start codes (00 00 01; a unit keeps the next 4-byte code's leading zero
    byte, which no field read here reaches)."""
    view, units = memoryview(payload), []
    if length_size:
        at = 0
        while at + length_size <= len(payload):
            n = int.from_bytes(view[at:at + length_size], "big")
            units.append(view[at + length_size:at + length_size + n])
            at += length_size + n
        return units
    at = payload.find(b"\0\0\1")
    while at >= 0:
        end = payload.find(b"\0\0\1", at + 3)
        units.append(view[at + 3:end if end >= 0 else len(payload)])
        at = end
    return units


_SPS_BYTES = 4096  # an SPS's fields up to its frame size and cropping lie within this (scaling lists included)


def _rbsp(nal: memoryview, header: int) -> _Bits:
    """A reader over a NAL unit's payload after its ``header`` bytes, emulation-prevention bytes removed."""
    return _Bits(bytes(nal[header:header + _SPS_BYTES]).replace(b"\0\0\3", b"\0\0"), _SPS_BYTES)


def _h264_size(nal: memoryview) -> tuple[int, int] | None:
    """The cropped frame size an H.264 sequence parameter set codes (ITU-T H.264, 7.3.2.1.1)."""
    try:
        bits = _rbsp(nal, 1)
        profile = bits.read(8)
        bits.read(16)  # constraint flags, level_idc
        bits.ue()  # seq_parameter_set_id
        chroma, separate_planes = 1, 0
        if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
            chroma = bits.ue()
            if chroma == 3:
                separate_planes = bits.read(1)
            bits.ue(), bits.ue()  # bit depths
            bits.read(1)  # qpprime_y_zero_transform_bypass_flag
            if bits.read(1):  # seq_scaling_matrix_present_flag
                for i in range(8 if chroma != 3 else 12):
                    if bits.read(1):
                        _skip_scaling_list(bits, 16 if i < 6 else 64)
        bits.ue()  # log2_max_frame_num_minus4
        poc_type = bits.ue()
        if poc_type == 0:
            bits.ue()
        elif poc_type == 1:
            bits.read(1), bits.se(), bits.se()
            for _ in range(bits.ue()):
                bits.se()
        bits.ue(), bits.read(1)  # max_num_ref_frames, gaps_in_frame_num_value_allowed_flag
        width_mbs, height_units = bits.ue() + 1, bits.ue() + 1
        frame_mbs_only = bits.read(1)
        if not frame_mbs_only:
            bits.read(1)  # mb_adaptive_frame_field_flag
        bits.read(1)  # direct_8x8_inference_flag
        width, height = 16 * width_mbs, 16 * height_units * (2 - frame_mbs_only)
        if bits.read(1):  # frame_cropping_flag
            left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
            sub_w, sub_h = (1, 1) if separate_planes or chroma == 0 else ((2, 2), (2, 1), (1, 1))[chroma - 1]
            unit_w, unit_h = sub_w, sub_h * (2 - frame_mbs_only)
            width, height = width - unit_w * (left + right), height - unit_h * (top + bottom)
        return width, height
    except IndexError:
        return None


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last = next_scale = 8
    for _ in range(size):
        if next_scale:
            next_scale = (last + bits.se() + 256) % 256
        last = next_scale or last


def _hevc_size(nal: memoryview) -> tuple[int, int] | None:
    """The cropped frame size an HEVC sequence parameter set codes (ITU-T H.265, 7.3.2.2.1)."""
    try:
        bits = _rbsp(nal, 2)
        bits.read(4)  # sps_video_parameter_set_id
        sub_layers = bits.read(3)  # sps_max_sub_layers_minus1
        bits.read(1)  # sps_temporal_id_nesting_flag
        bits.read(88), bits.read(8)  # profile_tier_level: the general profile, then general_level_idc
        present = [(bits.read(1), bits.read(1)) for _ in range(sub_layers)]
        if sub_layers:
            bits.read(2 * (8 - sub_layers))  # reserved_zero_2bits
        for profile_present, level_present in present:
            bits.read(88 * profile_present + 8 * level_present)
        bits.ue()  # sps_seq_parameter_set_id
        chroma = bits.ue()
        if chroma == 3:
            bits.read(1)  # separate_colour_plane_flag
        width, height = bits.ue(), bits.ue()
        if bits.read(1):  # conformance_window_flag
            left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
            sub_w, sub_h = (1, 1) if chroma in (0, 3) else ((2, 2), (2, 1))[chroma - 1]
            width, height = width - sub_w * (left + right), height - sub_h * (top + bottom)
        return width, height
    except IndexError:
        return None


_SIZE_READERS = {"vp8": _vp8_size, "mjpeg": _jpeg_size}  # one size per packet (VP9 reads each frame of a superframe)
# per codec: (is this NAL unit a sequence parameter set, its frame size)
_SPS_READERS = {"h264": (lambda nal: bool(nal) and nal[0] & 0x1F == 7, _h264_size),
                "hevc": (lambda nal: len(nal) > 1 and (nal[0] >> 1) & 0x3F == 33, _hevc_size)}
