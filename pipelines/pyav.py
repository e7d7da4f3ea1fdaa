"""The PyAV baseline loader (PySlowFast-style): seek, decode the needed frames, crop, resize, flip, normalise in
torch, in a torch DataLoader with workers. Same plans (``timesformer_harness.pipelines.base.ClipPlanner``) and contract
as DALI; also the fallback when DALI cannot decode a codec on this machine.

Val/test views come in units (``ClipPlanner.views_per_unit`` plans of the same frames): a worker decodes a unit's
frames once and crops each view's window from them.

A clip that fails to decode comes back from its worker as a value (an exception raised in a worker reaches the main
process as a bare ``RuntimeError`` without the file's name), and its batch as a ``FailedBatch`` that
``ClipLoader`` completes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from timesformer_harness.common import cache_path
from timesformer_harness.pipelines.base import Batch, ClipLoader, ClipPlanner, stack_clips
from timesformer_harness.pipelines.packets import (PACKET_CACHE, PacketIndex, PacketIndexCache, jpeg_images,
                                                   keyframe_segments)
from timesformer_harness.pipelines.quarantine import BadVideo, FailedBatch, failure_reason
from timesformer_harness.pipelines.sampling import ClipPlan
from timesformer_harness.pipelines.transforms import crop_window, finish_clip
from timesformer_harness.pipelines.validate import bound_decoder, decode_jpeg

logger = logging.getLogger(__name__)

_INDEXES = PacketIndexCache()  # decode_frames without an index: per process, in memory


@dataclass
class DecodedClip:
    frames: np.ndarray  # (len(indices), H, W, 3) uint8 RGB
    decoded: int  # frames that came out of the decoder


def decode_clip(path: str, indices: Sequence[int] | np.ndarray, index: PacketIndex | None = None) -> DecodedClip:
    """Frames ``indices`` (presentation order, repeats allowed) of ``path``, decoded per GOP.

    For each wanted frame (ascending) decoding starts at its keyframe, unless that keyframe is at or before the frame
    the decoder is at (``timesformer_harness.pipelines.packets.keyframe_segments``: the fewest frames, one seek per
    segment): a seek per frame on intra-only files, one seek on long GOPs. Seeks go to the keyframe's exact pts and
    frames are identified by pts (``index``: the file's ``PacketIndex``; indexed now when not given); where a seek
    lands past its keyframe (MPEG-TS demuxers can), the clip is decoded from the file's start without seeking.
    Indices past the end of a shorter-than-declared video repeat its last frame; a wanted frame before it that the
    decoder never output raises RuntimeError naming the file (no other frame stands in for it). A frame folder's
    images are decoded one by one (``decode_images``).
    """
    index = index if index is not None else _INDEXES.get(path)
    if index.files:
        return decode_images(index, indices)
    wanted = sorted(set(int(i) for i in indices))
    wanted_set = set(wanted)
    display_of = {int(index.pts[d]): n for n, d in enumerate(index.display)}
    got: dict[int, np.ndarray] = {}
    decoded, pos, last, tail = 0, 0, None, None  # pos: the display index of the next frame the decoder outputs
    with contextlib.ExitStack() as files:
        container, stream = _open_decoder(files, path, index)
        frames: Iterator[Any] = container.decode(stream)
        seeks = True
        for k, end in keyframe_segments(index.keyframes, wanted):
            if k > pos and seeks:  # decoding on from pos would cost more than restarting at k
                container.seek(int(index.pts[index.display[k]]), stream=stream, backward=True, any_frame=False)
                frames, pos = container.decode(stream), k
                first = next(frames, None)
                if first is not None and display_of.get(first.pts, k) > k:  # landed past k: never seek again
                    files.close()
                    container, stream = _open_decoder(files, path, index)
                    frames, pos, seeks = container.decode(stream), 0, False
                elif first is not None:
                    frames = itertools.chain([first], frames)
            for frame in frames:
                decoded += 1
                if (frame.width, frame.height) != (index.width, index.height):  # the crop window is the header's
                    raise RuntimeError(f"{path}: a {frame.width}x{frame.height} frame in a stream whose header says "
                                       f"{index.width}x{index.height}: re-encode the video at one frame size or leave "
                                       "it out of the manifest")
                n = display_of.get(frame.pts, pos) if frame.pts is not None else pos
                pos, last = n + 1, frame
                if n in wanted_set:
                    got[n] = frame.to_ndarray(format="rgb24")
                if n >= end:
                    break
            else:  # the stream ended early
                break
        if last is None:
            raise RuntimeError(f"{path}: no frame decoded at or after index {wanted[0]}")
        skipped = [i for i in wanted if i not in got and i < pos]
        if skipped:
            raise RuntimeError(f"{path}: the decoder never output frame(s) {skipped[:8]} of the {index.num_frames} it "
                               "has packets for (an edit list hides them, or packets do not decode); re-encode it "
                               "(python -m timesformer_harness.pipelines.tools.prepare)")
        if len(got) < len(wanted):  # the stream ended early: repeat the last frame (as padding does)
            tail = last.to_ndarray(format="rgb24")
    return DecodedClip(np.stack([got.get(int(i), tail) for i in indices]), decoded)


def _open_decoder(files: contextlib.ExitStack, path: str, index: PacketIndex) -> tuple[Any, Any]:
    """``path`` opened (closed with ``files``) and its first video stream set up for ``decode_clip``."""
    container = files.enter_context(av.open(path))
    stream = container.streams.video[0]
    stream.thread_count = 1  # parallelism comes from the DataLoader workers (one decode thread each)
    bound_decoder(stream, index.width, index.height)  # a frame far above the indexed size is refused, not allocated
    return container, stream


def decode_images(index: PacketIndex, indices: Sequence[int] | np.ndarray) -> DecodedClip:
    """Frames ``indices`` (repeats allowed; past the end: the last) of the frame folder ``index`` describes: each
    wanted image read and decoded once (``validate.decode_jpeg``: the bytes DALI's loader is fed)."""
    wanted = np.minimum(np.asarray(indices, dtype=np.int64), index.num_frames - 1)
    unique = np.unique(wanted)
    folder = os.open(index.path, os.O_RDONLY)
    try:
        images = jpeg_images(index, unique, folder)
    finally:
        os.close(folder)
    rgb = {int(f): decode_jpeg(data, index.width, index.height, f"{index.path}/{index.files[index.display[f]]}")
           .to_ndarray(format="rgb24") for f, data in zip(unique, images)}
    return DecodedClip(np.stack([rgb[int(i)] for i in wanted]), len(unique))


def decode_frames(path: str, indices: Sequence[int] | np.ndarray, index: PacketIndex | None = None) -> np.ndarray:
    """Frames ``indices`` of ``path`` as (len(indices), H, W, 3) uint8 RGB (``decode_clip``)."""
    return decode_clip(path, indices, index).frames


class _PlanDataset(Dataset):
    """Map-style dataset whose "indices" are units of ClipPlans themselves (the sampler yields them: tuples of plans
    of the same video and frames); an item is ``(plans, clips [(3, T, S, S)] or None, failure reason or "")``."""

    def __init__(self, crop: int, mean: list[float], std: list[float], indexes: PacketIndexCache | None = None):
        self.crop, self.mean, self.std = crop, mean, std
        self.indexes = indexes if indexes is not None else PacketIndexCache()

    def decode(self, plans: Sequence[ClipPlan]) -> list[torch.Tensor]:
        """The clips of one unit's ``plans`` as (3, T, S, S) float32, normalised, from one decode of their frames;
        raises when it cannot be decoded (or indexed)."""
        plan = plans[0]
        frames = decode_frames(plan.path, plan.frames, self.indexes.get(plan.path, plan.video_frames, plan.video_size))
        return [finish_clip(crop_window(frames, p.window, p.flip), self.crop, self.mean, self.std) for p in plans]

    def __getitem__(self, plans: tuple[ClipPlan, ...]  # type: ignore[override]
                    ) -> tuple[tuple[ClipPlan, ...], list[torch.Tensor] | None, str]:
        try:
            return plans, self.decode(plans), ""
        except Exception as e:  # noqa: BLE001 - whatever stops one unit's decode is its clips' verdict
            return plans, None, failure_reason(e)


def _collate(items: list[tuple[tuple[ClipPlan, ...], list[torch.Tensor] | None, str]]) -> Batch | FailedBatch:
    """A batch of units -> one batch of their views, in order."""
    plans = [p for unit, _, _ in items for p in unit]
    clips = [x for unit, got, _ in items for x in (got if got is not None else [None] * len(unit))]
    reasons = [why for unit, _, why in items for _ in unit]
    errors = {s: why for s, why in enumerate(reasons) if why}
    if errors:
        return FailedBatch(plans, {s: x for s, x in enumerate(clips) if x is not None}, errors,
                           cause=f"{len(errors)} clip(s) failed to decode")
    return Batch(stack_clips(clips), torch.tensor([p.label for p in plans], dtype=torch.int64),
                 torch.tensor([p.index for p in plans], dtype=torch.int64))


class _Plans:
    """The sampler: the current epoch's units (tuples of ``views_per_unit`` plans), swapped in place so persistent
    workers survive across epochs."""

    def __init__(self) -> None:
        self.units: list[tuple[ClipPlan, ...]] = []

    def __iter__(self) -> Iterator[tuple[ClipPlan, ...]]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)


def _own_process_group(worker_id: int) -> None:
    """A DataLoader worker leaves its rank's process group: torchrun stops a rank by signalling that whole group
    (SIGTERM when a job is preempted), and Ctrl-C signals a terminal's, so a worker in it died while the rank was
    finishing its step to save a checkpoint, and that step failed. The worker still ends with the rank (the
    DataLoader's watchdog) and when the DataLoader stops it."""
    os.setpgrp()


class PyAVLoader(ClipLoader):
    """Batches of ``ClipPlanner`` plans decoded by PyAV in ``data.num_workers`` persistent DataLoader workers."""

    kind = "pyav"

    def __init__(self, planner: ClipPlanner, device: torch.device, start_batch: int = 0,
                 rejected: list[tuple[str, str]] | None = None,
                 quarantine: Sequence[BadVideo | dict[str, Any]] = ()):
        super().__init__(planner, device, start_batch, rejected, quarantine)
        self.sampler = _Plans()
        self.indexes = PacketIndexCache(cache_path(self.cfg.validate_cache, PACKET_CACHE))
        self.dataset = _PlanDataset(self.crop, self.cfg.mean, self.cfg.std, self.indexes)
        workers = self.cfg.num_workers
        self.loader = DataLoader(self.dataset, batch_size=planner.batch_views // planner.views_per_unit,
                                 sampler=self.sampler, num_workers=workers, collate_fn=_collate,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=2 if workers else None, worker_init_fn=_own_process_group)
        logger.info("PyAV loader: %d clips/epoch on this rank, %d batches, %d workers", self.num_clips, len(self),
                    workers)

    @classmethod
    def build(cls, planner: ClipPlanner, device: torch.device, *, decode_device: str, infos: list[Any],
              start_batch: int = 0, rejected: list[tuple[str, str]] | None = None,
              quarantine: Sequence[BadVideo | dict[str, Any]] = ()) -> PyAVLoader:
        """The factory's loader (PyAV decodes on the CPU whatever ``decode_device`` says)."""
        return cls(planner, device, start_batch=start_batch, rejected=rejected, quarantine=quarantine)

    def decoded_frames(self, plans: list[ClipPlan]) -> list[int]:
        """Frames decoded per clip, counted by ``decode_clip`` (the frames its decoder outputs)."""
        return [decode_clip(p.path, p.frames, self.indexes.get(p.path)).decoded for p in plans]

    def _batches(self, plans: list[ClipPlan]) -> Iterator[Batch | FailedBatch]:
        if not plans:
            return
        n = self.planner.views_per_unit
        self.sampler.units = [tuple(plans[i:i + n]) for i in range(0, len(plans), n)]
        for batch in self.loader:
            yield batch.to(self.device) if isinstance(batch, Batch) else batch

    def _decode_unit(self, plans: list[ClipPlan]) -> list[torch.Tensor]:
        return self.dataset.decode(plans)
