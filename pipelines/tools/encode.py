"""Write RGB frames to a video file with PyAV: the one encoder loop behind the toy dataset, the benchmark clips,
the GPU check's h264 clips and the test videos."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import av
import numpy as np

from timesformer_harness.common import atomic_path


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], codec: str, fps: int = 30,
                options: dict[str, str] | None = None, bitexact: bool = False, pix_fmt: str = "yuv420p") -> Path:
    """Encode (H, W, 3) uint8 RGB ``frames`` with ``codec`` (e.g. ``libvpx-vp9``, ``libx264``, ``mjpeg``) at
    ``fps`` into ``path`` (container from its extension), atomically
    (``timesformer_harness.common.atomic_path``, without fsync: these are regenerable files). ``bitexact``
    leaves out random container UIDs, so the same frames give the same bytes. ``pix_fmt`` is the encoded pixel format
    (e.g. ``yuv420p10le``, ``yuv444p``, ``yuvj420p`` for MJPEG)."""
    path = Path(path)
    with atomic_path(path, fsync=False) as tmp:
        with av.open(str(tmp), "w", options={"fflags": "+bitexact"} if bitexact else {}) as container:
            stream = None
            for img in frames:
                if stream is None:  # the first frame gives the size
                    stream = container.add_stream(codec, rate=fps)
                    stream.height, stream.width = img.shape[:2]
                    stream.pix_fmt, stream.options = pix_fmt, dict(options or {})
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            if stream is None:
                raise ValueError(f"{path}: no frames to write")
            for packet in stream.encode():
                container.mux(packet)
    return path
