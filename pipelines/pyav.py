"""The PyAV baseline loader (PySlowFast-style): seek, decode the needed frames, crop, resize, flip, normalise in
torch, in a torch DataLoader with workers. Same plans (``timesformer_harness.pipelines.base.ClipPlanner``) and contract
as DALI; also the fallback when DALI cannot decode a codec on this machine.

A clip that fails to decode comes back from its worker as a value (an exception raised in a worker reaches the main
process as a bare ``RuntimeError`` without the file's name), and its batch as a ``FailedBatch`` that
``ClipLoader`` completes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from timesformer_harness.common import cache_path
from timesformer_harness.pipelines.base import Batch, ClipLoader, ClipPlanner, stack_clips
from timesformer_harness.pipelines.packets import PACKET_CACHE, PacketIndex, PacketIndexCache, keyframe_segments
from timesformer_harness.pipelines.quarantine import BadVideo, FailedBatch, failure_reason
from timesformer_harness.pipelines.sampling import ClipPlan
from timesformer_harness.pipelines.transforms import crop_window, finish_clip

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
    frames are identified by pts (``index``: the file's ``PacketIndex``; indexed now when not given). Indices past the
    end of a shorter-than-declared video repeat its last frame.
    """
    index = index if index is not None else _INDEXES.get(path)
    wanted = sorted(set(int(i) for i in indices))
    wanted_set = set(wanted)
    display_of = {int(index.pts[d]): n for n, d in enumerate(index.display)}
    got: dict[int, np.ndarray] = {}
    decoded, pos, last, tail = 0, 0, None, None  # pos: the display index of the next frame the decoder outputs
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1  # parallelism comes from the DataLoader workers (one decode thread each)
        frames = container.decode(stream)
        for k, end in keyframe_segments(index.keyframes, wanted):
            if k > pos:  # decoding on from pos would cost more than restarting at k
                container.seek(int(index.pts[index.display[k]]), stream=stream, backward=True, any_frame=False)
                frames, pos = container.decode(stream), k
            for frame in frames:
                decoded += 1
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
        if len(got) < len(wanted):  # the stream ended early: repeat the last frame (as padding does)
            tail = last.to_ndarray(format="rgb24")
    return DecodedClip(np.stack([got.get(int(i), tail) for i in indices]), decoded)


def decode_frames(path: str, indices: Sequence[int] | np.ndarray, index: PacketIndex | None = None) -> np.ndarray:
    """Frames ``indices`` of ``path`` as (len(indices), H, W, 3) uint8 RGB (``decode_clip``)."""
    return decode_clip(path, indices, index).frames


class _PlanDataset(Dataset):
    """Map-style dataset whose "indices" are the ClipPlans themselves (the sampler yields them); an item is
    ``(plan, clip (3, T, S, S) or None, failure reason or "")``."""

    def __init__(self, crop: int, mean: list[float], std: list[float], indexes: PacketIndexCache | None = None):
        self.crop, self.mean, self.std = crop, mean, std
        self.indexes = indexes if indexes is not None else PacketIndexCache()

    def decode(self, plan: ClipPlan) -> torch.Tensor:
        """The clip of ``plan`` as (3, T, S, S) float32, normalised; raises when it cannot be decoded (or indexed)."""
        frames = decode_frames(plan.path, plan.frames, self.indexes.get(plan.path))
        return finish_clip(crop_window(frames, plan.window, plan.flip), self.crop, self.mean, self.std)

    def __getitem__(self, plan: ClipPlan) -> tuple[ClipPlan, torch.Tensor | None, str]:  # type: ignore[override]
        try:
            return plan, self.decode(plan), ""
        except Exception as e:  # noqa: BLE001 - whatever stops one clip's decode is that clip's verdict
            return plan, None, failure_reason(e)


def _collate(items: list[tuple[ClipPlan, torch.Tensor | None, str]]) -> Batch | FailedBatch:
    plans = [plan for plan, _, _ in items]
    errors = {s: why for s, (_, _, why) in enumerate(items) if why}
    if errors:
        return FailedBatch(plans, {s: x for s, (_, x, why) in enumerate(items) if not why}, errors,
                           cause=f"{len(errors)} clip(s) failed to decode")
    return Batch(stack_clips([x for _, x, _ in items]), torch.tensor([p.label for p in plans], dtype=torch.int64),
                 torch.tensor([p.index for p in plans], dtype=torch.int64))


class _Plans:
    """The sampler: the current epoch's plans, swapped in place so persistent workers survive across epochs."""

    def __init__(self) -> None:
        self.plans: list[ClipPlan] = []

    def __iter__(self) -> Iterator[ClipPlan]:
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


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
        self.loader = DataLoader(self.dataset, batch_size=self.cfg.batch_size,
                                 sampler=self.sampler, num_workers=workers, collate_fn=_collate,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=2 if workers else None)
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
        self.sampler.plans = plans
        for batch in self.loader:
            yield batch.to(self.device) if isinstance(batch, Batch) else batch

    def _decode_clip(self, plan: ClipPlan) -> torch.Tensor:
        return self.dataset.decode(plan)
