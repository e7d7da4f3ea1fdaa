"""NVDEC with its decoder sessions kept across clips: PyNvVideoCodec's ``SimpleDecoder``, a candidate in ``make
gpu-input`` against DALI's per-clip streams (DALI builds a decoder for every clip's stream; here each thread keeps one
``SimpleDecoder`` and points it at the next clip's file with ``reconfigure_decoder``, which reuses a cached decoder
session of the same format, ``decoder_cache_size`` of them).

The clips are the planner's (the loaders' frames, crop windows and flips); each clip's frames are decoded to RGB in GPU
memory, taken with ``torch.from_dlpack``, cropped, mirrored and finished by the CPU loaders' own transform
(``timesformer_harness.pipelines.transforms.finish_clip``) into the batch on the GPU. Each thread has a CUDA stream of
its own, which its decoder and its torch work share (on the legacy default stream the decoder's per-frame
synchronisation would wait for every thread's work); the batch's stream waits for the threads' events before the
batch is handed on. A measurement, not a loader: DALI delivers the batches of a run; no quarantine, no resume offset.
NVDEC converts untagged files with BT.709 and PyAV with BT.601, so its clips differ from the loaders' by a few levels.

``SessionDecodedClips(planner, device, threads, nvc=module)`` takes any module with PyNvVideoCodec's ``SimpleDecoder``
and ``OutputColorType``; the tests give it one that decodes with PyAV on the CPU.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Iterator

import torch

from timesformer_harness.pipelines.base import Batch, ClipPlanner, empty_clips
from timesformer_harness.pipelines.sampling import ClipPlan
from timesformer_harness.pipelines.transforms import finish_clip, mirror


def import_pynvvideocodec() -> ModuleType:
    """PyNvVideoCodec (``pip install pynvvideocodec``; it needs the driver's NVDEC and NVENC libraries)."""
    import PyNvVideoCodec

    return PyNvVideoCodec


def cuda_context(device: torch.device) -> int:
    """The CUDA context torch runs ``device`` in (its primary context), as the handle ``SimpleDecoder`` takes: the
    decoder then writes frames where torch's stream and ``from_dlpack`` can use them."""
    with torch.cuda.device(device):
        torch.cuda.current_stream().synchronize()  # torch's context exists and is current on this thread
        ctx = ctypes.c_void_p()
        status = ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent(ctypes.byref(ctx))
    if status != 0 or not ctx.value:
        raise RuntimeError(f"cuCtxGetCurrent failed (CUresult {status}) after torch used {device}")
    return ctx.value


class SessionDecodedClips:
    """The planner's clips, decoded by one ``SimpleDecoder`` per thread (kept across clips), in batches on ``device``;
    iterated like a loader (``set_epoch``, then ``Batch`` es). ``sessions`` counts the decoders made and
    ``reconfigured`` the switches to another file."""

    kind = "pynvvideocodec"
    backend = "gpu"

    def __init__(self, planner: ClipPlanner, device: torch.device | str, threads: int, nvc: ModuleType | None = None,
                 cache_size: int = 8):
        self.planner, self.cfg, self.device = planner, planner.cfg, torch.device(device)
        self.nvc = nvc if nvc is not None else import_pynvvideocodec()
        self.cache_size = cache_size
        self.crop = self.cfg.train_crop_size if planner.train else self.cfg.test_crop_size
        self.context = cuda_context(self.device) if self.device.type == "cuda" else 0
        self.epoch = 0
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="nvc")
        self.local = threading.local()
        self.lock = threading.Lock()
        self.sessions = self.reconfigured = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        plans = self.planner.plans(self.epoch)[:self.planner.num_clips]
        B = self.planner.batch_views
        for start in range(0, len(plans), B):
            chunk = plans[start:start + B]
            video = empty_clips((len(chunk), 3, self.cfg.num_frames, self.crop, self.crop), self.device)
            ready = None
            if self.device.type == "cuda":  # the threads write the batch after what this stream did with its memory
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.device))
            for done in self.pool.map(self._finish, chunk, video, [ready] * len(chunk)):
                if done is not None:
                    torch.cuda.current_stream(self.device).wait_event(done)
            yield Batch(video, torch.tensor([p.label for p in chunk], dtype=torch.int64),
                        torch.tensor([p.index for p in chunk], dtype=torch.int64))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _decoder(self, path: str) -> Any:
        """This thread's decoder, pointed at ``path``."""
        current = getattr(self.local, "decoder", None)
        if current is None:
            stream = 0
            if self.device.type == "cuda":
                torch.cuda.set_stream(torch.cuda.Stream(self.device))  # this thread's current stream from now on
                stream = torch.cuda.current_stream(self.device).cuda_stream
            self.local.decoder = self.nvc.SimpleDecoder(
                path, gpu_id=self.device.index or 0, cuda_context=self.context, cuda_stream=stream,
                use_device_memory=self.device.type == "cuda",
                decoder_cache_size=self.cache_size, output_color_type=self.nvc.OutputColorType.RGB)
            self.local.path = path
            with self.lock:
                self.sessions += 1
        elif self.local.path != path:
            current.reconfigure_decoder(path)
            self.local.path = path
            with self.lock:
                self.reconfigured += 1
        return self.local.decoder

    def frames(self, plan: ClipPlan) -> torch.Tensor:
        """The plan's frames as (T, H, W, 3) uint8 on the decoder's device (a repeated index decoded once: the decoder
        returns each index of a request once)."""
        wanted = [int(i) for i in plan.frames]
        unique = sorted(set(wanted))
        got = self._decoder(plan.path).get_batch_frames_by_index(unique)
        if len(got) != len(unique):
            raise RuntimeError(f"{plan.path}: asked for frames {unique}, the decoder returned {len(got)}")
        by_index = {i: torch.from_dlpack(f) for i, f in zip(unique, got)}
        return torch.stack([by_index[i] for i in wanted])

    def _finish(self, plan: ClipPlan, out: torch.Tensor,
                ready: torch.cuda.Event | None = None) -> torch.cuda.Event | None:
        """The plan's clip into ``out``, after ``ready``; on a GPU, an event marking the end of its work."""
        y0, x0, h, w = plan.window
        window = mirror(self.frames(plan)[:, y0:y0 + h, x0:x0 + w], plan.flip)
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        finish_clip(window, self.crop, self.cfg.mean, self.cfg.std, out=out)
        if ready is None:
            return None
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done
