"""DALI train/test pipelines: decode (GPU: NVDEC via ``device='mixed'``; CPU: libavcodec, VP8/VP9/MJPEG only) only
the frames each clip needs, crop, resize, flip, normalise, output ``(B, 3, T, H, W)`` float32.

All sampling decisions come from ``timesformer_harness.pipelines.base.ClipPlanner`` (Python, seeded per (seed, epoch,
rank)) and enter the graph through ``fn.external_source``: per clip a small stream of only the packets it needs
(``timesformer_harness.pipelines.packets``: from the keyframe at or before each wanted frame; DALI's decoder on
in-memory bytes never seeks, so it is given nothing it would decode in vain), the wanted frames' positions in that
stream (unique, ascending: ``fn.decoders.video(frames=)``), the order that expands them back to the clip's T frames
(``fn.sequence_rearrange``), the crop window (``fn.slice``: crop before resize) and the flip. Train and test differ
only in their plans, so one graph serves both, except that a val/test unit (``ClipPlanner.views_per_unit`` views of
one temporal clip) is one sample: decoded once, then sliced (and on the GPU resized and normalised) once per crop
window, the graph's S outputs stacked into the batch in view order. DALI's video readers drop bad files silently, so
here every file was validated first, and each epoch checks that DALI produced exactly the planned clips.

Where the work after decoding runs depends on the device:

* GPU: DALI resizes the windows (``fn.resize``) and flips and normalises them (``fn.crop_mirror_normalize``, in
  the frames' own FHWC layout: the loaders' ``channels_last_3d`` batch) on the GPU.
* CPU: DALI outputs the cropped uint8 windows and ``timesformer_harness.pipelines.transforms`` (the PyAV loader's
  transform) mirrors, resizes and normalises them in torch, whose uint8 resize and flip are faster than DALI's CPU
  ones (see that module).
* Intra-only JPEG video (MJPEG, ``jpeg_frames``): every frame is a JPEG image, so the source feeds the clip's frames
  as images, ``fn.decoders.image_slice`` decodes only each frame's crop window (a val/test unit's frames once, in
  the union of its views' windows, sliced per view) and the graph's batch is
  ``batch_size x T`` frames. On the CPU nvImageCodec decodes with libjpeg-turbo, many frames per batch in parallel
  (measured more than twice the clip rate of the video decoder on the same packets); on the GPU (``device="mixed"``)
  with nvJPEG, the hardware JPEG decoder where the GPU has one, and the frames are resized, flipped and normalised
  there as the video graph's are. NVDEC has no MJPEG, so only this path decodes MJPEG on a GPU.

A clip that cannot be fed or decoded does not end the epoch (``timesformer_harness.pipelines.quarantine``):

* its input cannot be made (the file cannot be indexed, read or remuxed): the source leaves the clip out of what it
  feeds DALI (an exception raised in the callback would surface one or two ``pipe.run()`` calls early, with the
  wrong batch) and records why; the loader yields that batch as a ``FailedBatch`` naming the slot, with the clips
  DALI did make.
* its stream is damaged: ``pipe.run()`` raises for the whole batch (``Failed to send packet to decoder``; the
  pipeline is then no longer valid, and the error does not name the file): the loader rebuilds the pipeline, feeds
  it from the next batch, and yields a ``FailedBatch`` in which every slot is a suspect.

``ClipLoader`` then decodes each suspect unit alone through a batch-1 pipeline of the same graph (``_decode_unit``:
the same clip stream, the same pixels) and quarantines the ones that fail again.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from timesformer_harness.common import cache_path
from timesformer_harness.pipelines.base import Batch, ClipLoader, ClipPlanner, empty_clips, plan_labels, to_device
from timesformer_harness.pipelines.packets import (JPEG_CODECS, PACKET_CACHE, PacketIndexCache, clip_stream,
                                                   count_stream_frames, feed_mode, jpeg_images, plan_packets,
                                                   remux_packets)
from timesformer_harness.pipelines.quarantine import BadVideo, ClipDecodeError, FailedBatch, failure_reason
from timesformer_harness.pipelines.sampling import ClipPlan
from timesformer_harness.pipelines.transforms import finish_clip, mirror

logger = logging.getLogger(__name__)

OPEN_FILES = 64  # file descriptors the source keeps open (LRU)


def _still_names(path: str, fd: int) -> bool:
    """``path`` still names the file (or frame folder) open as ``fd``, unchanged: the same inode, size and mtime."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    was = os.fstat(fd)
    return (was.st_dev, was.st_ino, was.st_size, was.st_mtime_ns) == (now.st_dev, now.st_ino, now.st_size,
                                                                      now.st_mtime_ns)


@dataclass
class ClipInput:
    """What the decoder is given for one clip: the encoded ``stream``, the wanted ``frames`` (unique ascending
    positions in it), the ``order`` expanding them to the clip, how it was fed (``mode``) and the frames the
    decoder decodes for it (``decoded``: the stream's frames up to the last wanted one). JPEG frames (``mode``
    ``images``): ``images`` holds the clip's T frames as JPEG images, and ``stream`` is empty."""

    stream: np.ndarray  # uint8
    frames: np.ndarray  # (U,) int32
    order: np.ndarray  # (T,) int32
    mode: str  # stream | remux | file (timesformer_harness.pipelines.packets.feed_mode) | images
    codec: str
    decoded: int
    images: list[np.ndarray] = field(default_factory=list)  # uint8, one JPEG per clip frame (mode images)


@dataclass
class MadeBatch:
    """One batch of plans with its clips' inputs as the source's worker made them: ``inputs`` and ``errors`` (why a
    clip's input could not be made) by slot, and the CPU seconds the making took (``cpu_s``)."""

    plans: list[ClipPlan]
    inputs: dict[int, ClipInput]
    errors: dict[int, str]
    cpu_s: float


@dataclass
class FedBatch:
    """One batch of plans as the source handed it to DALI: ``slots`` (positions in ``plans``) were fed, in that
    order; ``errors`` (slot -> reason) are the clips whose input could not be made. No slot fed: DALI never saw the
    batch."""

    plans: list[ClipPlan]
    slots: list[int]
    errors: dict[int, str] = field(default_factory=dict)


class PlanSource:
    """``fn.external_source`` callback: one batch of plans per call as (stream bytes, frame positions, order, crop
    anchor, crop shape, flip); ``decode_only``: the first three; on the CPU no flip (done in torch). With
    ``views`` > 1 a sample is a unit of that many plans in a row (same video and frames): one stream, and an anchor
    and shape per view (anchor 0, shape 0, anchor 1, ...), the flip the unit's first view's. With
    ``jpeg_frames``: per clip frame (T per clip, in clip order) the JPEG image, crop anchor and crop shape;
    ``decode_only``: the images; on the GPU also each frame's flip (its clip's); with ``views`` > 1 the image's
    decode window first (the union of the unit's view windows: ``unit_windows``), then each view's window within
    it. Counts per epoch how each clip was fed.

    It never raises for a clip: a clip whose input cannot be made is left out of the batch it feeds (DALI takes
    batches of any size up to ``batch_size``, but not empty ones: a batch of which no clip can be fed is skipped),
    and ``queue`` records, batch by batch in order, what went to DALI and why the rest did not.

    DALI calls the source on the thread that calls ``pipe.run()``: the training thread. So the clips' inputs (index
    look-up, reads, the clip streams) are made by a worker thread of the source's own, ``prefetch`` batches ahead
    of DALI, and the callback only takes the next finished batch (``prefetch=0``: made in the callback, on the
    calling thread). One worker: its work is well under a millisecond a clip (measured), part of it in ``os.pread``,
    which releases the GIL. DALI's parallel external source (worker processes) was not used: its callback cannot
    tell the loader which clips it left out, and its workers would need each epoch's plans.
    """

    def __init__(self, batch_size: int, decode_only: bool = False, backend: str = "cpu",
                 indexes: PacketIndexCache | None = None, jpeg_frames: bool = False, prefetch: int = 2, views: int = 1):
        self.batch_size, self.decode_only, self.backend, self.views = batch_size, decode_only, backend, views
        self.jpeg_frames, self.prefetch = jpeg_frames, prefetch
        self.indexes = indexes if indexes is not None else PacketIndexCache()
        self.batches: list[list[ClipPlan]] = []
        self.pos = 0
        self.fds: OrderedDict[str, int] = OrderedDict()  # used by the worker only (or the caller of clip_input)
        self.fed: Counter = Counter()  # (codec, mode) -> clips this epoch
        self.decoded = 0  # frames decoded this epoch
        self.made_cpu_s = self.callback_s = 0.0  # this epoch: CPU seconds making inputs, seconds inside the callback
        self.whole_file: set[str] = set()  # files fed whole (logged once each)
        self.queue: deque[FedBatch] = deque()  # batches handed to DALI (or skipped) and not yet taken by the loader
        self.pending: deque[Future] = deque()  # the worker's batches, in order: (plans, inputs by slot, errors)
        self.worker: ThreadPoolExecutor | None = None  # started on the first prefetch

    def start(self, plans: list[ClipPlan]) -> None:
        self._drop_pending()
        per_batch = self.batch_size * self.views  # plans (views) per batch
        self.batches = [plans[i:i + per_batch] for i in range(0, len(plans), per_batch)]
        self.pos = 0
        self.fed, self.decoded = Counter(), 0
        self.made_cpu_s = self.callback_s = 0.0
        self.queue.clear()
        self._prefetch()

    def _prefetch(self) -> None:
        """Hand the worker batches until ``prefetch`` are pending."""
        while len(self.pending) < self.prefetch and self.pos < len(self.batches):
            if self.worker is None:
                self.worker = ThreadPoolExecutor(1, thread_name_prefix="clip-inputs")
            self.pending.append(self.worker.submit(self._make_batch, self.batches[self.pos]))
            self.pos += 1

    def _drop_pending(self) -> None:
        """Forget the batches handed to the worker (a restart): those not begun are cancelled, the one being made is
        waited for (the worker owns the open files until then)."""
        while self.pending:
            future = self.pending.popleft()
            if not future.cancel():
                future.exception()

    def _fd(self, path: str) -> int:
        """A descriptor of ``path``, kept open between clips (LRU); opened again when the path names another file now
        (replaced: its packet index is the new file's, so its clips must be cut from the new bytes)."""
        fd = self.fds.pop(path, None)
        if fd is not None and not _still_names(path, fd):
            os.close(fd)
            fd = None
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
        self.fds[path] = fd
        if len(self.fds) > OPEN_FILES:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def clip_input(self, plan: ClipPlan) -> ClipInput:
        """The decoder's input for ``plan``: its packets cut from the file (``stream``: ``clip_stream``, IVF or
        Matroska), copied by PyAV into Matroska (``remux``: what the cut cannot serve, on the GPU) or the whole file
        (``file``), per ``feed_mode``; with ``jpeg_frames`` its frames' JPEG images (``images``)."""
        index = self.indexes.get(plan.path, plan.video_frames, plan.video_size)
        if self.jpeg_frames:
            images = [np.frombuffer(p, np.uint8) for p in jpeg_images(index, plan.frames, self._fd(plan.path))]
            empty = np.zeros(0, np.int32)
            return ClipInput(np.zeros(0, np.uint8), empty, empty, "images", index.codec, len(images), images)
        packets = plan_packets(index, plan.frames)
        mode, why = feed_mode(index, packets, self.backend)
        if mode == "stream":
            data = clip_stream(index, packets, self._fd(plan.path))
        elif mode == "remux":
            data = np.frombuffer(remux_packets(index, packets), np.uint8)
        else:
            if plan.path not in self.whole_file:
                self.whole_file.add(plan.path)
                logger.info("%s: DALI decodes it from frame 0 (%s)", plan.path, why)
            wanted = np.minimum(np.asarray(plan.frames, dtype=np.int64), index.num_frames - 1)
            uniq, order = np.unique(wanted, return_inverse=True)
            return ClipInput(np.fromfile(plan.path, dtype=np.uint8), uniq.astype(np.int32),
                             order.reshape(-1).astype(np.int32), mode, index.codec, int(uniq[-1]) + 1)
        return ClipInput(data, packets.frames, packets.order, mode, index.codec, packets.decoded)

    def _make_batch(self, plans: list[ClipPlan]) -> MadeBatch:
        """The inputs of the clips of ``plans`` that can be made (one per unit, by its first view's slot), and why
        the others cannot (by view slot)."""
        t0 = time.thread_time()
        inputs: dict[int, ClipInput] = {}
        errors: dict[int, str] = {}
        for slot in range(0, len(plans), self.views):
            try:
                inputs[slot] = self.clip_input(plans[slot])
            except Exception as e:  # noqa: BLE001 - whatever stops one clip's input is that clip's verdict
                errors.update(dict.fromkeys(range(slot, slot + self.views), failure_reason(e)))
        return MadeBatch(plans, inputs, errors, time.thread_time() - t0)

    def _made_batches(self) -> Iterator[MadeBatch]:
        """The rest of the epoch's batches as made, in order: by the worker, or here when ``prefetch`` is 0."""
        while self.pending or self.pos < len(self.batches):
            if not self.pending:  # prefetch=0
                self.pos += 1
                yield self._make_batch(self.batches[self.pos - 1])
                continue
            made = self.pending.popleft().result()
            self._prefetch()
            yield made

    def _next_batch(self) -> tuple[list[ClipPlan], list[ClipInput]]:
        """The next batch with at least one clip fed: (its plans that were, their inputs: one per ``views`` plans);
        StopIteration at the end."""
        for made in self._made_batches():
            self.made_cpu_s += made.cpu_s
            slots = [s + v for s in made.inputs for v in range(self.views)]
            self.queue.append(FedBatch(made.plans, slots, made.errors))
            if made.inputs:
                return [made.plans[s] for s in slots], list(made.inputs.values())
        if self.fed:
            clips = sum(self.fed.values())
            logger.info("DALI fed %d clips: %s; %.1f frames decoded per clip; inputs made in %.2f CPU ms per clip %s, "
                        "%.2f ms per clip in DALI's callback", clips,
                        ", ".join(f"{c} {m} {n}" for (c, m), n in sorted(self.fed.items())), self.decoded / clips,
                        1e3 * self.made_cpu_s / clips, "by the source's worker" if self.prefetch else "in the callback",
                        1e3 * self.callback_s / clips)
            self.fed = Counter()
        raise StopIteration

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        t0 = time.perf_counter()
        try:
            return self._feed()
        finally:
            self.callback_s += time.perf_counter() - t0

    def _feed(self) -> tuple[list[np.ndarray], ...]:
        plans, inputs = self._next_batch()
        for x in inputs:
            self.fed[(x.codec, x.mode)] += 1
            self.decoded += x.decoded  # a stream, or a clip's images, once per unit
        flip = [np.array(int(p.flip), dtype=np.int32) for p in plans[::self.views]]
        if self.jpeg_frames:  # one sample per frame: T per clip
            images = [img for x in inputs for img in x.images]
            if self.decode_only:
                return (images,)
            per_frame = [len(x.images) for x in inputs]
            windows = unit_windows(plans, self.views) if self.views > 1 else _view_windows(plans, 1)
            frame_args = images, *(_repeat(w, per_frame) for w in windows)
            if self.backend != "gpu":
                return frame_args
            return (*frame_args, _repeat(flip, per_frame))
        enc, frames, order = [x.stream for x in inputs], [x.frames for x in inputs], [x.order for x in inputs]
        if self.decode_only:
            return enc, frames, order
        windows = _view_windows(plans, self.views)
        if self.backend != "gpu":  # the CPU graph ends at the window: mirrored in torch (to_clips)
            return enc, frames, order, *windows
        return enc, frames, order, *windows, flip

    def close(self) -> None:
        """Stop the worker (after the batch it is making) and close the open files."""
        self._drop_pending()
        if self.worker is not None:
            self.worker.shutdown(wait=False)  # idle now: nothing pending, nothing running
            self.worker = None
        while self.fds:
            os.close(self.fds.popitem()[1])

    def __del__(self) -> None:
        self.close()


def _repeat(items: list[np.ndarray], counts: list[int]) -> list[np.ndarray]:
    return [x for x, n in zip(items, counts) for _ in range(n)]


def _view_windows(plans: list[ClipPlan], views: int) -> list[list[np.ndarray]]:
    """Per view of a unit of ``views`` plans in a row: its crop anchors (y, x) and its crop shapes (h, w), one per
    unit (anchor 0, shape 0, anchor 1, ...)."""
    windows = []
    for v in range(views):
        windows += [[np.array(p.window[:2], dtype=np.int32) for p in plans[v::views]],
                    [np.array(p.window[2:], dtype=np.int32) for p in plans[v::views]]]
    return windows


def unit_windows(plans: list[ClipPlan], views: int) -> list[list[np.ndarray]]:
    """For units of ``views`` plans in a row (one clip's frames, several crop windows): the window a unit's images
    are decoded in, the union of its views' windows (anchors, shapes), then each view's anchors and shapes relative
    to that union, laid out as ``_view_windows``: the graph decodes each image once and slices it per view."""
    union_anchor, union_shape, relative = [], [], []
    for u in range(0, len(plans), views):
        boxes = np.array([p.window for p in plans[u:u + views]], dtype=np.int32)  # (views, 4): y, x, h, w
        top_left = boxes[:, :2].min(axis=0)
        union_anchor.append(top_left)
        union_shape.append((boxes[:, :2] + boxes[:, 2:]).max(axis=0) - top_left)
        relative.append(boxes - np.concatenate([top_left, [0, 0]]).astype(np.int32))
    windows = [union_anchor, union_shape]
    for v in range(views):
        windows += [[r[v, :2] for r in relative], [r[v, 2:] for r in relative]]
    return windows


def build_video_pipeline(source: PlanSource, *, batch_size: int, crop: int, mean: list[float], std: list[float],
                         backend: str = "cpu", num_threads: int = 2, device_id: int | None = None,
                         decode_only: bool = False, prefetch: int = 2, frames_per_clip: int = 0,
                         decoder_device: str | None = None):
    """The DALI graph for ``batch_size`` clips (any batch size, e.g. 1 to decode one clip alone), or units of
    ``source.views`` views: each decoded once, then one output per view (the steps after the decode once per view's
    window, in the same order as for one view, so each view's pixels are those of its own decode):

    * GPU: clip stream -> decode(frames) -> slice(crop window) -> rearrange(order) -> resize -> normalise (FHWC).
    * CPU: clip stream -> decode(frames) -> slice(crop window) -> rearrange(order): per clip its (T, h, w, 3)
      uint8 windows, which ``to_clips`` mirrors, resizes and normalises in torch.
    * ``frames_per_clip`` = T > 0 (the source's ``jpeg_frames``): per frame its JPEG -> decode only the crop window
      (``decoders.image_slice``; a unit's: the union of its views' windows, then sliced per view), ``batch_size x T``
      frames a run, T consecutive ones per clip; on the GPU (nvJPEG) then resize -> flip and normalise (HWC) per
      frame, as the video graph.

    ``decode_only`` returns the decoded uint8 frames instead (FHWC per clip; per frame with ``frames_per_clip``),
    for the decode-rate benchmark and tests.

    ``decoder_device``: the decoders' DALI device, by default ``mixed`` (NVDEC, nvJPEG) for the GPU backend and
    ``cpu`` otherwise. ``backend="gpu", decoder_device="cpu"`` is the GPU graph's CPU twin: every step of the GPU
    graph but its decoders, on the CPU (the tests run it where no GPU is; ``device_id`` None).
    """
    from nvidia.dali import fn, pipeline_def, types

    decode_device = decoder_device or ("mixed" if backend == "gpu" else "cpu")
    slice_args = dict(axis_names="HW", normalized_anchor=False, normalized_shape=False)
    views = source.views
    num_outputs = 2 * views + (1 if backend == "gpu" else 0)  # (anchor, shape) per view, then the flip on the GPU
    union = bool(frames_per_clip) and views > 1  # each image decoded once in its unit's window, then sliced per view

    @pipeline_def(batch_size=batch_size * max(1, frames_per_clip), num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, exec_async=True, exec_pipelined=True)
    def video_pipe():
        if frames_per_clip:
            if decode_only:
                (images,) = fn.external_source(source=source, num_outputs=1, batch=True)
                return fn.decoders.image(images, device=decode_device, output_type=types.RGB)
            images, *args = fn.external_source(source=source, num_outputs=1 + num_outputs + 2 * union, batch=True)
            if union:  # the unit's window (union_anchor, union_shape), then each view's within it
                decoded = fn.decoders.image_slice(images, args[0], args[1], device=decode_device,
                                                  output_type=types.RGB, **slice_args)
                args = args[2:]
            outs = []
            for v in range(views):  # the image decoder decodes only the window
                if union:
                    frames = fn.slice(decoded, args[2 * v], args[2 * v + 1], **slice_args)
                else:
                    frames = fn.decoders.image_slice(images, args[2 * v], args[2 * v + 1], device=decode_device,
                                                     output_type=types.RGB, **slice_args)  # (h, w, 3) uint8
                if backend == "gpu":
                    frames = fn.resize(frames, size=[crop, crop], interp_type=types.INTERP_LINEAR, antialias=False)
                    frames = fn.crop_mirror_normalize(frames, dtype=types.FLOAT, output_layout="HWC", mirror=args[-1],
                                                      mean=[m * 255 for m in mean], std=[s * 255 for s in std])
                outs.append(frames)
            return tuple(outs)
        if decode_only:
            enc, frames, order = fn.external_source(source=source, num_outputs=3, batch=True)
            video = fn.decoders.video(enc, device=decode_device, frames=frames)
            return fn.sequence_rearrange(video, new_order=order)
        enc, frames, order, *args = fn.external_source(source=source, num_outputs=3 + num_outputs, batch=True)
        decoded = fn.decoders.video(enc, device=decode_device, frames=frames)  # (U, H, W, 3) uint8, U unique frames
        outs = []
        for v in range(views):
            # crop first (a cheap slice of whole pixels), then resize only the window: fn.resize(roi_start=,
            # roi_end=) resamples through the whole frame's geometry
            video = fn.slice(decoded, args[2 * v], args[2 * v + 1], **slice_args)
            video = fn.sequence_rearrange(video, new_order=order)  # (T, h, w, 3): repeats are copies
            if backend == "gpu":  # the CPU graph ends at the uint8 windows (to_clips does the rest in torch)
                video = fn.resize(video, size=[crop, crop], interp_type=types.INTERP_LINEAR, antialias=False)
                video = fn.crop_mirror_normalize(video, dtype=types.FLOAT, output_layout="FHWC", mirror=args[-1],
                                                 mean=[m * 255 for m in mean], std=[s * 255 for s in std])
            outs.append(video)
        return tuple(outs)

    return video_pipe()


def dali_reason(e: BaseException) -> str:
    """The informative line of a DALI pipeline error, e.g. ``Assert on "ret >= 0" failed: Failed to send packet to
    decoder: Invalid data found when processing input`` (the rest is DALI's traceback of the graph)."""
    text = str(e)
    tail = [line.strip() for line in text.split("encountered:")[-1].splitlines() if line.strip()]
    return f"DALI: {tail[0] if tail else text.strip()[:200]}"


def _to_torch(out, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (dense) -> torch tensor on ``device`` (GPU outputs are copied on the current stream)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = out.as_tensor()
    is_gpu = type(t).__name__ == "TensorGPU"
    dst = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device if is_gpu else "cpu")
    stream = torch.cuda.current_stream(device) if is_gpu else None
    feed_ndarray(t, dst, cuda_stream=stream)
    return dst


def to_clips(out, plans: list[ClipPlan], *, backend: str, decode_only: bool, frames_per_clip: int, crop: int,
             mean: list[float], std: list[float], device: torch.device) -> torch.Tensor:
    """The graph's output for ``plans`` (``build_video_pipeline``; a tuple of its outputs, one per view, for units of
    views: ``len(out)`` plans in a row per sample) as one tensor: ``(B, 3, T, S, S)`` float32 in the loaders' layout
    (``timesformer_harness.pipelines.base.CLIP_FORMAT``), view ``v`` of sample ``i`` at ``i * len(out) + v``, or
    with ``decode_only`` the decoded ``(B, T, H, W, 3)`` uint8 (clips of one frame size; each view of a unit its
    unit's frames). On the CPU the crop windows are mirrored, resized and normalised here
    (``timesformer_harness.pipelines.transforms``)."""
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    T = frames_per_clip
    samples = len(outs[0]) // T if T else len(outs[0])
    views = len(plans) // samples  # views per sample
    if decode_only:
        x = _to_torch(outs[0], device)
        x = x.view(samples, T, *x.shape[1:]) if T else x
        return x.repeat_interleave(views, 0) if views > 1 else x
    if backend == "gpu":  # (B, T, S, S, 3) -> (B, 3, T, S, S), a view; JPEG frames come as (B*T, S, S, 3)
        xs = [_to_torch(o, device) for o in outs]
        xs = [x.view(samples, T, *x.shape[1:]) if T else x for x in xs]
        x = xs[0] if views == 1 else torch.stack(xs, 1).flatten(0, 1)  # views of a sample in a row
        return x.permute(0, 4, 1, 2, 3)
    num_frames = T or len(plans[0].frames)
    clips = empty_clips((len(plans), 3, num_frames, crop, crop))
    for j, plan in enumerate(plans):
        i, view = j // views, outs[j % views]
        if T:
            window = torch.stack([torch.from_numpy(np.asarray(view[i * T + t])) for t in range(T)])
        else:
            window = torch.from_numpy(np.asarray(view[i]))
        finish_clip(mirror(window, plan.flip), crop, mean, std, out=clips[j])
    return clips


# DALI 2.x decodes JPEG images (MJPEG's frames, frame folders) through nvImageCodec, loaded when a pipeline is built:
# libjpeg-turbo's extension on the CPU, nvJPEG's for device="mixed" (without libnvjpeg that decoder decodes on the CPU
# instead, and says nothing). pip brings them with nvidia-dali-cuda120; a DALI copied onto a machine by hand may not.
JPEG_LIBRARIES = {"cpu": ("nvimgcodec/libnvimgcodec.so.0", "nvimgcodec/extensions/libjpeg_turbo_ext.so*"),
                  "gpu": ("nvimgcodec/extensions/libnvjpeg_ext.so*", "nvjpeg/lib/libnvjpeg.so.12")}
SYSTEM_CUDA_LIBS = Path("/usr/local/cuda/lib64")  # also on the RUNPATH of DALI's libraries and nvImageCodec's


def jpeg_libraries_missing(gpu: bool, nvidia_dir: Path | None = None) -> str | None:
    """What DALI's JPEG decoding lacks (``JPEG_LIBRARIES``; nvJPEG's too with ``gpu``) under ``nvidia_dir``, the
    folder holding the ``dali`` package (None: the installed one's); None when nothing is missing."""
    if nvidia_dir is None:
        spec = importlib.util.find_spec("nvidia.dali")
        if spec is None or spec.origin is None:
            return "DALI is not importable here"
        nvidia_dir = Path(spec.origin).parent.parent
    wanted = [*JPEG_LIBRARIES["cpu"], *(JPEG_LIBRARIES["gpu"] if gpu else ())]
    missing = [w for w in wanted if not any(nvidia_dir.glob(w)) and not any(SYSTEM_CUDA_LIBS.glob(Path(w).name))]
    if not missing:
        return None
    return (f"DALI's JPEG decoding needs nvImageCodec{' and nvJPEG' if gpu else ''}: {', '.join(missing)} missing "
            f"under {nvidia_dir} (pip install nvidia-nvimgcodec-cu12[all], or copy them there beside dali/)")


class DaliLoader(ClipLoader):
    """Batches of ``ClipPlanner`` plans produced by one DALI pipeline per process (this rank's shard).

    ``indexes``: the packet-index cache the clip streams are cut with (default: the one beside the probe cache);
    an index without payload offsets makes the source feed whole files (the loader shoot-out's comparison)."""

    kind = "dali"

    def __init__(self, planner: ClipPlanner, device: torch.device, backend: str = "cpu", start_batch: int = 0,
                 rejected: list[tuple[str, str]] | None = None, decode_only: bool = False,
                 quarantine: Sequence[BadVideo | dict[str, Any]] = (), jpeg_frames: bool = False,
                 indexes: PacketIndexCache | None = None):
        super().__init__(planner, device, start_batch, rejected, quarantine)
        self.backend, self.decode_only, self.jpeg_frames = backend, decode_only, jpeg_frames
        if backend == "gpu" and jpeg_frames and (missing := jpeg_libraries_missing(gpu=True)):
            logger.warning("JPEG frames to be decoded on the GPU, but %s; DALI decodes them on the CPU instead",
                           missing)
        if backend == "gpu":
            self.device_id = self.device.index if self.device.type == "cuda" and self.device.index is not None \
                else torch.cuda.current_device()
        else:
            self.device_id = None
        self.indexes = indexes or PacketIndexCache(cache_path(self.cfg.validate_cache, PACKET_CACHE))
        self.pipe = None
        self.source: PlanSource | None = None
        self._clean = False  # True when the pipeline finished its last epoch and can be reset and reused
        self._clip_pipe = None  # the batch-1 pipeline of _decode_unit, built on first use
        self._clip_source: PlanSource | None = None
        logger.info("DALI loader (%s%s): %d clips/epoch on this rank, %d batches, %d threads", backend,
                    ", MJPEG frames decoded as JPEG images" if jpeg_frames else "", self.num_clips, len(self),
                    self.cfg.num_workers)

    @classmethod
    def build(cls, planner: ClipPlanner, device: torch.device, *, decode_device: str, infos: list[Any],
              start_batch: int = 0, rejected: list[tuple[str, str]] | None = None,
              quarantine: Sequence[BadVideo | dict[str, Any]] = ()) -> DaliLoader:
        """The factory's loader for the probed usable videos ``infos``: an all-MJPEG set has its frames decoded as JPEG
        images (on the CPU faster than the video decoder; on the GPU by nvJPEG, as NVDEC has no MJPEG)."""
        jpeg = bool(infos) and all(info.codec in JPEG_CODECS for info in infos)
        return cls(planner, device, backend=decode_device, start_batch=start_batch, rejected=rejected,
                   quarantine=quarantine, jpeg_frames=jpeg)

    def decoded_frames(self, plans: list[ClipPlan]) -> list[int]:
        """Frames decoded per clip, counted: the very stream each clip is fed decoded again (PyAV) up to its last
        wanted frame, or the JPEG images it is fed (one decode each)."""
        return [len(x.images) if x.mode == "images" else count_stream_frames(x.stream.tobytes(), int(x.frames[-1]))
                for x in self.clip_inputs(plans)]

    def clip_inputs(self, plans: list[ClipPlan]) -> list[ClipInput]:
        """What the decoder is fed for ``plans``: the benchmark counts the frames decoded from these streams."""
        source = PlanSource(1, self.decode_only, self.backend, self.indexes, self.jpeg_frames)
        try:
            return [source.clip_input(p) for p in plans]
        finally:
            source.close()

    @property
    def _frames_per_clip(self) -> int:
        """The graph's ``frames_per_clip``: T when it decodes JPEG frames (a sample per frame), else 0."""
        return self.cfg.num_frames if self.jpeg_frames else 0

    def _build_pipe(self, batch_size: int, num_threads: int, prefetch: int = 2):
        """(source, built pipeline) of this loader's graph for ``batch_size`` clips (units) a run."""
        source = PlanSource(batch_size, self.decode_only, self.backend, self.indexes, self.jpeg_frames,
                            views=self.planner.views_per_unit)
        pipe = build_video_pipeline(source, batch_size=batch_size, crop=self.crop, mean=self.cfg.mean,
                                    std=self.cfg.std, backend=self.backend, num_threads=num_threads,
                                    device_id=self.device_id, decode_only=self.decode_only, prefetch=prefetch,
                                    frames_per_clip=self._frames_per_clip)
        pipe.build()
        return source, pipe

    def _clips(self, out, plans: list[ClipPlan]) -> torch.Tensor:
        """The graph's output for ``plans`` as a batch tensor (``to_clips``), on the CPU or this loader's GPU."""
        return to_clips(out, plans, backend=self.backend, decode_only=self.decode_only,
                        frames_per_clip=self._frames_per_clip, crop=self.crop,
                        mean=self.cfg.mean, std=self.cfg.std,
                        device=self.device if self.device.type == "cuda" else torch.device("cpu"))

    def _new_pipe(self) -> None:
        self.pipe = None  # drop the old pipeline first (a broken or half-consumed one is not reusable)
        if self.source is not None:
            self.source.close()  # its worker stops making batches no pipeline will take
        units = self.planner.batch_views // self.planner.views_per_unit
        self.source, self.pipe = self._build_pipe(units, max(1, self.cfg.num_workers))

    def _decode_unit(self, plans: list[ClipPlan]) -> list[torch.Tensor]:
        """One unit through a batch-1 pipeline of the same graph (kept between calls, rebuilt after a failure):
        the same clip stream and the same pixels the batch pipeline gives for it."""
        if self._clip_pipe is None:
            if self._clip_source is not None:
                self._clip_source.close()
            self._clip_source, self._clip_pipe = self._build_pipe(1, 1, prefetch=1)
        self._clip_source.start(plans)
        try:
            video = self._clip_pipe.run()
        except StopIteration:  # the source could not make the clip's input: nothing was fed
            self._clip_pipe = None
            (fed,) = self._clip_source.queue
            raise ClipDecodeError(fed.errors[0]) from None
        except RuntimeError as e:
            self._clip_pipe = None
            raise ClipDecodeError(dali_reason(e)) from e
        x = list(self._clips(video, plans))
        try:  # drain the end-of-data signal so the pipeline can be reset for the next clip
            self._clip_pipe.run()
        except StopIteration:
            self._clip_pipe.reset()
        return x

    def _unfed(self) -> Iterator[FailedBatch]:
        """The batches at the head of the source's queue of which no clip could be fed (DALI never saw them)."""
        while self.source.queue and not self.source.queue[0].slots:
            fed = self.source.queue.popleft()
            yield FailedBatch(fed.plans, errors=fed.errors, cause="no clip of the batch could be fed to DALI")

    def _batches(self, plans: list[ClipPlan]) -> Iterator[Batch | FailedBatch]:
        if not plans:
            return
        if self.pipe is None or not self._clean:
            self._new_pipe()
        else:
            self.pipe.reset()
        self._clean = False
        self.source.start(plans)
        T, made = self.cfg.num_frames, 0
        while made < len(plans):
            for item in self._unfed():
                made += len(item.plans)
                yield item
            if made >= len(plans):
                break
            failure = ""
            try:
                video = self.pipe.run()
            except StopIteration:
                if self.source.queue and not self.source.queue[0].slots:
                    continue  # the source ended after batches it could not feed
                break
            except RuntimeError as e:
                failure = dali_reason(e)
            for item in self._unfed():  # the source skipped them before the batch this run made
                made += len(item.plans)
                yield item
            fed = self.source.queue.popleft()  # the batch this run made (or failed to make)
            made += len(fed.plans)
            if failure:
                # a decode error ends the pipeline and does not say which clip: rebuild it, feed it from the next
                # batch, and let ClipLoader find the culprit among this batch's clips
                self._new_pipe()
                self.source.start(plans[made:])
                yield FailedBatch(fed.plans, errors=None, cause=failure)
                continue
            x = self._clips(video, [fed.plans[s] for s in fed.slots])
            if not self.decode_only and tuple(x.shape[1:3]) != (3, T):
                raise RuntimeError(f"DALI produced clips of shape {tuple(x.shape)}, expected (B, 3, {T}, H, W)")
            if x.shape[0] != len(fed.slots):
                raise RuntimeError(f"DALI produced {x.shape[0]} clips for a batch of {len(fed.slots)} fed ones")
            if fed.errors:  # some clips could not be fed: ClipLoader completes the batch
                yield FailedBatch(fed.plans, dict(zip(fed.slots, x)), fed.errors,
                                  cause=f"{len(fed.errors)} clip(s) could not be fed to DALI")
                continue
            yield Batch(to_device(x, self.device), *plan_labels(fed.plans, self.device))
        if made != len(plans):  # nothing may go missing silently
            raise RuntimeError(f"DALI produced {made} clips this epoch but {len(plans)} were planned")
        try:  # drain the end-of-data signal so the pipeline can be reset for the next epoch
            self.pipe.run()
        except StopIteration:
            self._clean = True
