"""Shared fixtures. Video fixtures are real encoded files, tiny, made once per test session."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # Triton's kernels run in its CPU interpreter; read when a kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from timesformer_harness.pipelines.tools.encode import write_video  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def encode_video(path: Path, frames: np.ndarray, codec: str = "libvpx-vp9", fps: int = 30,
                 bitexact: bool = False) -> Path:
    """Write (F, H, W, 3) uint8 RGB frames with PyAV (VP9 webm by default; ``libx264``/``mpeg4`` for mp4);
    ``bitexact``: the same frames give the same bytes (no random container UIDs)."""
    options = {"libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "12", "b": "0", "g": "8"},
               "libx264": {"preset": "ultrafast", "crf": "18", "g": "8"}}.get(codec, {})
    return write_video(path, frames, codec, fps, options, bitexact=bitexact)


def make_env() -> dict[str, str]:
    """The environment for a test's own ``make``, without what a parent make passes down: ``make test VENV=...``
    puts ``VENV=...`` into ``MAKEFLAGS`` and into the environment, where it would override the test's variables."""
    flags = os.environ.get("MAKEFLAGS", "")
    passed = set(re.findall(r"(?:^|\s)([A-Za-z_]\w*)=", flags.split(" -- ", 1)[1])) if " -- " in flags else set()
    dropped = passed | {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
    return {k: v for k, v in os.environ.items() if k not in dropped}


def make_dry_run(folder: Path, *args: str) -> str:
    """What ``make -n ARGS`` would run in ``folder`` with the repository's Makefile (``make_env``'s environment)."""
    return subprocess.run(["make", "-n", "-f", str(REPO / "Makefile"), "-C", str(folder), *args], capture_output=True,
                          text=True, timeout=60, check=True, env=make_env()).stdout


def _scheduling() -> tuple[int, int]:
    return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority


SCHEDULING = _scheduling() if hasattr(os, "sched_getscheduler") else None  # this process's, when it started


@pytest.fixture(autouse=True)
def scheduling_unchanged():
    """The process's scheduling stays what it was when it started, through every test and the fixtures it set up: a
    library that switches it to real-time priority (SVT-AV1 run as root does) would pass that on to every process the
    worker starts later, and on a small machine real-time threads that spin starve the rest (a run stalled so).
    ``pipelines.tools.encode.write_video`` keeps it. A change fails the test during which it was seen, and is undone."""
    yield
    if SCHEDULING is None or _scheduling() == SCHEDULING:
        return
    changed = _scheduling()
    os.sched_setscheduler(0, SCHEDULING[0], os.sched_param(SCHEDULING[1]))
    pytest.fail(f"this process's scheduling (policy, priority) changed from {SCHEDULING} to {changed} during this "
                f"test or a fixture it set up: wrap what changed it in pipelines.tools.encode.scheduling_kept()")


def encode_resizing(target: Path | BinaryIO, codec: str, frames: list[np.ndarray], pix_fmt: str = "yuv420p",
                    options: dict[str, str] | None = None, fmt: str | None = None) -> Path | BinaryIO:
    """Encode RGB ``frames`` whose sizes may differ with PyAV into one stream that declares the first frame's size:
    a frame of another size is encoded by an encoder of its own (each MJPEG frame stands alone; a VP8/VP9 one starts
    with a keyframe), so the stream's frame size changes there. ``target``: a path, or a buffer (``fmt`` names the
    container). ``options``: every encoder's."""
    height, width = frames[0].shape[:2]
    with av.open(target if not isinstance(target, Path) else str(target), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=30)
        stream.pix_fmt, stream.width, stream.height = pix_fmt, width, height
        stream.codec_context.options = options or {}
        encoders = {(height, width): stream.codec_context}
        for i, rgb in enumerate(frames):
            if rgb.shape[:2] not in encoders:
                enc = encoders[rgb.shape[:2]] = av.CodecContext.create(codec, "w")
                enc.height, enc.width = rgb.shape[:2]
                enc.pix_fmt, enc.time_base, enc.options = pix_fmt, Fraction(1, 30), options or {}
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
            frame.pts = i
            for packet in encoders[rgb.shape[:2]].encode(frame):
                packet.stream = stream
                out.mux(packet)
        for enc in encoders.values():
            for packet in enc.encode(None):
                packet.stream = stream
                out.mux(packet)
    return target


def textured_frames(num: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth, moving, frame-distinct content (compresses well, so decoders agree closely)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, size=3)
    out = np.empty((num, height, width, 3), dtype=np.uint8)
    for t in range(num):
        for c in range(3):
            v = 128 + 90 * np.sin(xx / (6 + 3 * c) + phase[c] + 0.3 * t) * np.cos(yy / (7 + 2 * c) - 0.2 * t)
            out[t, :, :, c] = np.clip(v, 0, 255)
        out[t, :4, :4] = (t * 8) % 256  # a frame-number patch in the top-left corner
    return out


@dataclass
class VideoSet:
    """Paths of the session's test videos."""

    root: Path
    good: list[Path] = field(default_factory=list)  # VP9, 48x64 (landscape), 24 frames, labels i % 3
    labels: list[int] = field(default_factory=list)
    portrait: Path | None = None  # VP9, 64x40, 24 frames
    short: Path | None = None  # VP9, 6 frames
    truncated: Path | None = None  # first half of a 40-frame VP9 webm
    empty: Path | None = None
    garbage: Path | None = None
    missing: Path | None = None
    h264: Path | None = None  # libx264 mp4 (mpeg4 when libx264 is absent)

    def manifest(self, name: str, paths: list[Path], labels: list[int] | None = None) -> Path:
        labels = labels or [0] * len(paths)
        out = self.root / name
        out.write_text("".join(f"{p.name} {lab}\n" for p, lab in zip(paths, labels)))
        return out


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> VideoSet:
    root = tmp_path_factory.mktemp("videos")
    vs = VideoSet(root)
    for i in range(6):
        vs.good.append(encode_video(root / f"good{i}.webm", textured_frames(24, 48, 64, seed=i)))
        vs.labels.append(i % 3)
    vs.portrait = encode_video(root / "portrait.webm", textured_frames(24, 64, 40, seed=10))
    vs.short = encode_video(root / "short.webm", textured_frames(6, 48, 64, seed=11))
    long = encode_video(root / "long.webm", textured_frames(40, 48, 64, seed=12))
    data = long.read_bytes()
    vs.truncated = root / "truncated.webm"
    vs.truncated.write_bytes(data[: len(data) // 2])
    vs.empty = root / "empty.webm"
    vs.empty.write_bytes(b"")
    vs.garbage = root / "garbage.webm"
    vs.garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    vs.missing = root / "missing.webm"
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    vs.h264 = encode_video(root / "h264.mp4", textured_frames(24, 48, 64, seed=13), codec=codec)
    return vs
