"""Write RGB frames to a video file with PyAV: the one encoder loop behind the toy dataset, the benchmark clips,
the GPU check's h264 clips and the test videos; and an MJPEG video as a frame folder of its own JPEG images."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

from timesformer_harness.common import atomic_path


@contextlib.contextmanager
def scheduling_kept() -> Iterator[None]:
    """Put the calling thread's scheduling policy and priority back as they were, whatever the code inside did.

    SVT-AV1 (``libsvtav1``) run as root switches the thread that opens it to ``SCHED_FIFO`` priority 99 and leaves
    it so; every thread and process started from it afterwards inherits real-time priority, and on a small machine
    a few of them busy-waiting starve the rest (a test run stalled that way)."""
    if not hasattr(os, "sched_getscheduler"):  # not Linux
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if (os.sched_getscheduler(0), os.sched_getparam(0)) != (policy, param):
            os.sched_setscheduler(0, policy, param)


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], codec: str, fps: int = 30,
                options: dict[str, str] | None = None, bitexact: bool = False, pix_fmt: str = "yuv420p") -> Path:
    """Encode (H, W, 3) uint8 RGB ``frames`` with ``codec`` (e.g. ``libvpx-vp9``, ``libx264``, ``mjpeg``) at
    ``fps`` into ``path`` (container from its extension), atomically
    (``timesformer_harness.common.atomic_path``, without fsync: these are regenerable files). ``bitexact``
    leaves out random container UIDs, so the same frames give the same bytes. ``pix_fmt`` is the encoded pixel format
    (e.g. ``yuv420p10le``, ``yuv444p``, ``yuvj420p`` for MJPEG). The calling thread's scheduling is kept
    (``scheduling_kept``)."""
    path = Path(path)
    with scheduling_kept(), atomic_path(path, fsync=False) as tmp:
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


def mjpeg_frame_folder(video: str | os.PathLike, folder: str | os.PathLike, image_name: str = "{:05d}.jpg") -> Path:
    """Write each frame of the MJPEG ``video`` into ``folder`` (made) as the JPEG image its packet is, the same
    bytes: a frame folder (``image_name.format(frame)``) that decodes to the video's very pixels."""
    from timesformer_harness.pipelines.packets import index_packets, jpeg_images

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = index_packets(video)
    with open(video, "rb") as f:
        for k, image in enumerate(jpeg_images(index, range(index.num_frames), f.fileno())):
            (folder / image_name.format(k)).write_bytes(image)
    return folder
