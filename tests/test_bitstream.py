"""timesformer_harness.pipelines.bitstream: frame sizes read from real VP8, VP9 and MJPEG payloads (encoded here with
PyAV, the size changing mid-stream) agree with what FFmpeg's decoders make of the same packets."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from conftest import encode_resizing
from timesformer_harness.pipelines.bitstream import PROBE_DECODE_SIZE, coded_frame_sizes, frame_pixel_bound

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
    assert coded_frame_sizes("h264", payload) == []  # a codec it does not read


def test_the_pixel_bound() -> None:
    assert frame_pixel_bound(64, 64) == 2 * 192 * 192  # a 512x512 frame is above it, a 128x128 one is not
    assert frame_pixel_bound(0, 0) == frame_pixel_bound(*PROBE_DECODE_SIZE)  # a header without a size
