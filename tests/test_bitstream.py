"""timesformer_harness.pipelines.bitstream: frame sizes read from real VP8, VP9, MJPEG, H.264 and HEVC payloads (encoded
here with PyAV, the size changing mid-stream) agree with what FFmpeg's decoders make of the same packets."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from conftest import encode_resizing
from timesformer_harness.pipelines.bitstream import (PROBE_DECODE_SIZE, coded_frame_sizes, frame_pixel_bound,
                                                     nal_length_size)

# (encoder, canonical codec name, pixel format): VP9 profile 0 (4:2:0) and 1 (4:4:4, another colour config)
CASES = [("libvpx", "vp8", "yuv420p"), ("libvpx-vp9", "vp9", "yuv420p"), ("libvpx-vp9", "vp9", "yuv444p"),
         ("mjpeg", "mjpeg", "yuvj420p")]
SIZES = [(96, 64)] * 5 + [(130, 66)] * 4  # (width, height); odd sizes: the fields are not rounded


def _packets(encoder: str, pix_fmt: str, sizes: list[tuple[int, int]]) -> list[tuple[bytes, bool, list]]:
    """Encode seeded frames of ``sizes`` (a new encoder, so a keyframe, where the size changes) into Matroska and
    demux it again: per packet (payload, keyframe flag, the sizes FFmpeg decodes from it)."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    options = {"deadline": "realtime", "lag-in-frames": "0"} if "vpx" in encoder else {}
    buf = encode_resizing(io.BytesIO(), encoder, frames, pix_fmt, options, fmt="matroska")
    buf.seek(0)
    with av.open(buf) as container:
        return [(bytes(p), bool(p.is_keyframe), [(f.width, f.height) for f in p.decode()])
                for p in container.demux(container.streams.video[0]) if p.size]


@pytest.mark.parametrize("encoder, codec, pix_fmt", CASES)
def test_sizes_read_from_payloads_are_the_decoded_sizes(encoder: str, codec: str, pix_fmt: str) -> None:
    packets = _packets(encoder, pix_fmt, SIZES)
    stated = [coded_frame_sizes(codec, payload) for payload, _, _ in packets]
    for (payload, key, decoded), sizes in zip(packets, stated):
        assert sizes == decoded[:len(sizes)], (sizes, decoded)  # what a packet states is what it decodes to
        assert sizes or not key, "every keyframe states its size"
    assert {s for sizes in stated for s in sizes} == set(SIZES)  # the change mid-stream is seen


def test_every_frame_of_a_vp9_superframe_is_read() -> None:
    """A superframe (several frames in one packet, an index at its end: Annex B of the VP9 specification), built
    from two real keyframes of different sizes, states both sizes; a 1-byte index stands for 1-byte frame sizes."""
    first = _packets("libvpx-vp9", "yuv420p", [(96, 64)])[0][0]
    second = _packets("libvpx-vp9", "yuv420p", [(130, 66)])[0][0]
    mag = 2 if max(len(first), len(second)) < 1 << 16 else 4
    marker = 0xC0 | ((mag - 1) << 3) | (2 - 1)
    index = bytes([marker]) + len(first).to_bytes(mag, "little") + len(second).to_bytes(mag, "little") + \
        bytes([marker])
    assert coded_frame_sizes("vp9", first + second + index) == [(96, 64), (130, 66)]


@pytest.mark.parametrize("encoder, codec, pix_fmt", CASES)
def test_a_header_cut_short_or_garbage_states_nothing(encoder: str, codec: str, pix_fmt: str) -> None:
    """The size is read from the header (the first few bytes; a JPEG's segments before its SOF), and every shorter
    prefix of the payload states nothing, without an exception."""
    payload = _packets(encoder, pix_fmt, [(96, 64)])[0][0]
    need = next(n for n in range(len(payload) + 1) if coded_frame_sizes(codec, payload[:n]))
    assert all(coded_frame_sizes(codec, payload[:n]) == [] for n in range(need))
    assert coded_frame_sizes(codec, payload[:need]) == [(96, 64)]
    assert need <= {"vp8": 10, "vp9": 10, "mjpeg": 1024}[codec] < len(payload), need
    junk = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert all(w * h <= 0xFFFF * 0xFFFF for w, h in coded_frame_sizes(codec, junk))  # no exception either
    assert coded_frame_sizes("av1", payload) == []  # a codec it does not read


def test_the_pixel_bound() -> None:
    assert frame_pixel_bound(64, 64) == 2 * 192 * 192  # a 512x512 frame is above it, a 128x128 one is not
    assert frame_pixel_bound(0, 0) == frame_pixel_bound(*PROBE_DECODE_SIZE)  # a header without a size


# H.264 and HEVC: (encoder, codec, pixel format, encoder options, sizes). The size of the frames that follow is in
# each sequence parameter set (SPS), sent in-band by an encoder without global headers: odd sizes are cropped from
# whole macroblocks / coding blocks, interlaced H.264 codes field pairs, and the SPS may hold scaling lists, several
# temporal sub-layers, another chroma format.
NAL_SIZES = [(96, 64)] * 3 + [(130, 66)] * 2
NAL_CASES = [
    ("libx264", "h264", "yuv420p", {"tune": "zerolatency"}, NAL_SIZES),
    ("libx264", "h264", "yuv444p", {"tune": "zerolatency"}, NAL_SIZES),
    ("libx264", "h264", "gray", {"tune": "zerolatency"}, NAL_SIZES),
    ("libx264", "h264", "yuv420p", {"tune": "zerolatency", "x264-params": "cqm=jvt"}, NAL_SIZES),
    ("libx264", "h264", "yuv420p", {"x264-params": "tff=1:bframes=0"}, [(128, 68)] * 3 + [(200, 120)] * 2),
    ("libx265", "hevc", "yuv420p", {"x265-params": "log-level=error"}, NAL_SIZES),
    ("libx265", "hevc", "yuv422p", {"x265-params": "log-level=error"}, NAL_SIZES),
    ("libx265", "hevc", "yuv420p", {"x265-params": "log-level=error:temporal-layers=3:scaling-list=default"},
     NAL_SIZES),
]


def _annexb_packets(encoder: str, pix_fmt: str, options: dict, sizes: list[tuple[int, int]]
                    ) -> tuple[list[bytes], set[tuple[int, int]]]:
    """Seeded frames of ``sizes`` encoded without a container (a new encoder where the size changes; each puts its
    SPS in its first packet): the packets (Annex B) and the frame sizes FFmpeg's decoder makes of them."""
    rng = np.random.default_rng(0)
    packets, encoders = [], {}
    for i, (w, h) in enumerate(sizes):
        if (w, h) not in encoders:
            if encoders:
                packets += [bytes(p) for p in encoders[sizes[i - 1]].encode(None)]
            enc = encoders[(w, h)] = av.CodecContext.create(encoder, "w")
            enc.width, enc.height, enc.pix_fmt, enc.time_base, enc.options = w, h, pix_fmt, Fraction(1, 30), options
        frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), format="rgb24")
        frame.pts = i
        packets += [bytes(p) for p in encoders[(w, h)].encode(frame.reformat(format=pix_fmt))]
    packets += [bytes(p) for p in encoders[sizes[-1]].encode(None)]
    decoder = av.CodecContext.create(encoder.removeprefix("lib").replace("x264", "h264").replace("x265", "hevc"), "r")
    decoded = {(f.width, f.height) for p in [*packets, None] for f in decoder.decode(av.Packet(p) if p else None)}
    return packets, decoded


def _length_prefixed(packet: bytes, n: int) -> bytes:
    """An Annex-B packet as mp4/Matroska store it: each NAL unit after its ``n``-byte length."""
    units = [u for u in packet.split(b"\0\0\1") if u]
    return b"".join(len(u.rstrip(b"\0")).to_bytes(n, "big") + u.rstrip(b"\0") for u in units)


@pytest.mark.parametrize("encoder, codec, pix_fmt, options, sizes", NAL_CASES)
def test_sps_sizes_are_the_decoded_sizes(encoder: str, codec: str, pix_fmt: str, options: dict,
                                         sizes: list[tuple[int, int]]) -> None:
    """Each encoder's first packet states its frame size, in start-code form and length-prefixed alike; the other
    packets state nothing (they carry no SPS); what is stated is what FFmpeg decodes."""
    packets, decoded = _annexb_packets(encoder, pix_fmt, options, sizes)
    assert decoded == set(sizes)
    for n in (0, 4, 2):
        stated = [coded_frame_sizes(codec, p if n == 0 else _length_prefixed(p, n), n) for p in packets]
        assert [s for s in stated if s] == [[size] for size in dict.fromkeys(sizes)], (n, stated)


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_an_sps_cut_short_or_garbage_states_nothing(codec: str) -> None:
    encoder = {"h264": "libx264", "hevc": "libx265"}[codec]
    options = {"h264": {"tune": "zerolatency"}, "hevc": {"x265-params": "log-level=error"}}[codec]
    first = _annexb_packets(encoder, "yuv420p", options, [(130, 66)])[0][0]
    stated = [coded_frame_sizes(codec, first[:n]) for n in range(len(first) + 1)]
    assert all(s in ([], [(130, 66)]) for s in stated) and stated[-1] == [(130, 66)] and stated[0] == []
    junk = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for n in (0, 1, 2, 4):
        coded_frame_sizes(codec, junk, n)  # no exception
    sps_only = b"\0\0\1" + first.split(b"\0\0\1")[2 if codec == "hevc" else 1]  # HEVC: the VPS comes first
    assert coded_frame_sizes(codec, sps_only) == [(130, 66)]


def test_the_nal_length_size_comes_from_the_extradata() -> None:
    avcc = bytes([1, 100, 0, 10, 0xFF])  # configurationVersion 1, ..., lengthSizeMinusOne 3
    hvcc = bytes([1]) + bytes(20) + bytes([0xF1])  # lengthSizeMinusOne 1: 2-byte lengths
    assert nal_length_size("h264", avcc) == 4 and nal_length_size("hevc", hvcc) == 2
    assert nal_length_size("h264", b"\0\0\0\1\x67") == 0 and nal_length_size("h264", b"") == 0  # Annex B, none
    assert nal_length_size("vp9", avcc) == 0
