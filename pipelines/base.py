"""The loader contract every pipeline honours and the per-epoch clip plan (``timesformer_harness.pipelines.factory``
builds loaders).

A loader is an iterable of ``Batch(video (B, 3, T, H, W) float32 normalised, label (B,) int64, index (B,) int64)``
on the requested device, with ``len()`` = batches per epoch on this rank, ``set_epoch(e)``, ``num_clips`` (clips per
epoch on this rank), ``rejected`` ([(path, reason)] of the videos the pre-flight check left out), ``quarantine``
(the videos that failed while decoding, ``timesformer_harness.pipelines.quarantine.Quarantine``) and ``unscored`` (the
val/test views of the last pass that could not be decoded).

* train: every video once per epoch in an order from ``default_rng((data.seed, epoch))``, sharded ``[rank::world]``
  and cut to the same count on every rank; each clip's frames, crop window and flip come from
  ``default_rng((data.seed, epoch, rank))`` (``timesformer_harness.pipelines.sampling``); full batches only (drop_last,
  as the original). ``start_batch`` skips the first batches of the first epoch iterated (resume), deterministically.
* val/test: ``num_ensemble_views`` uniform clips x ``num_spatial_crops`` crops per video (``index`` = video index),
  each view seen exactly once across ranks; the last batch may be short. (The original's val split used train-style
  random clips; ours evaluates val like test.) The views are planned in decode units: a unit is one temporal clip of
  one video with its ``num_spatial_crops`` crop windows (same frames, same resize, only the window differs), which a
  loader decodes once and crops S times. The units are sharded ``[rank::world]`` (a unit's views stay on one rank)
  and a batch holds ``batch_size // S`` whole units, its views in view order: ``batch_size`` views when it is a
  multiple of S, fewer otherwise (``batch_size`` 7, S = 3: 6 views). A ``batch_size`` below S makes units of one view
  (``ClipPlanner.views_per_unit`` = 1: decoded per view, as train clips), so no batch holds more than
  ``batch_size`` views.

A video that fails while decoding (damage the pre-flight check cannot see) is quarantined
(``timesformer_harness.pipelines.quarantine``): ``ClipLoader`` re-decodes the suspects of a failed batch unit by
unit with the loader's own decoder, records the ones that fail again, and completes the batch: a train slot gets a
deterministic replacement clip (``ClipPlanner.replacements``), an evaluation view is dropped and listed in
``loader.unscored`` (a unit that fails drops all its views, each listed with its view number). Each epoch is planned
over the videos not quarantined before it, so ``len()`` can shrink at an epoch boundary, equally on every rank.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from timesformer_harness.common import host_memory_bytes
from timesformer_harness.pipelines import sampling
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.quarantine import (BadVideo, FailedBatch, Quarantine, TooManyBadVideos, UnscoredView,
                                                      failure_reason)

logger = logging.getLogger(__name__)

REPLACE = 7  # stream id of the replacement draws: default_rng((seed, epoch, rank, batch, slot, REPLACE))

# The memory layout of every loader's ``Batch.video``: (B, 3, T, H, W) stored as (B, T, H, W, 3), the pixels' own
# order from the decoder on; the model's patch embedding then reads each frame channels-last without a copy.
CLIP_FORMAT = torch.channels_last_3d


def memory_bytes(device: torch.device) -> int | None:
    """The memory tensors on ``device`` come from: the GPU's total memory, the machine's physical memory for the CPU;
    None where it cannot be read (and for a CUDA device where this torch has no CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory if torch.cuda.is_available() else None
    return host_memory_bytes() if device.type == "cpu" else None


def empty_clips(shape: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """An uninitialised float32 batch of clips of ``shape`` ``(B, 3, T, H, W)`` in the loaders' layout."""
    return torch.empty(shape, dtype=torch.float32, device=device, memory_format=CLIP_FORMAT)


def stack_clips(clips: list[torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
    """``(3, T, H, W)`` clips -> one batch in the loaders' layout, on ``device`` (default: the clips')."""
    out = empty_clips((len(clips), *clips[0].shape), device if device is not None else clips[0].device)
    for slot, clip in zip(out, clips):
        slot.copy_(clip)
    return out


@dataclass
class Batch:
    """One batch: ``video (B, 3, T, H, W)`` float32 normalised (stored ``CLIP_FORMAT``), ``label (B,)`` int64,
    ``index (B,)`` video index."""

    video: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (a ``DataLoader`` with ``pin_memory=True`` calls this)."""
        return Batch(self.video.pin_memory(), self.label.pin_memory(), self.index.pin_memory())

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (``to_device`` for each tensor: no wait for the device)."""
        return Batch(to_device(self.video, device), to_device(self.label, device), to_device(self.index, device))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor goes to a GPU from page-locked memory (pinned here when it is not) without
    waiting: a copy from pageable memory waits for the work queued on the device before it."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def plan_labels(plans: list[sampling.ClipPlan], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(label, index) of ``plans``, int64 (B,) each, on ``device`` in one copy that does not wait (``to_device``)."""
    both = to_device(torch.tensor([[p.label for p in plans], [p.index for p in plans]], dtype=torch.int64), device)
    return both[0], both[1]


class Loader(Protocol):
    """What every loader is. ``kind`` names its registered backend (``pipelines.loaders``); ``backend`` where it
    decodes (``cpu`` | ``gpu``; "" when it decodes nothing); ``planner`` and ``indexes`` (a ``PacketIndexCache``)
    are None for a loader that decodes no files; ``decode_note`` says why ``auto`` moved the decode off its first
    choice ("" when it did not)."""

    kind: str
    backend: str
    planner: ClipPlanner | None
    indexes: Any
    decode_note: str
    num_clips: int
    rejected: list[tuple[str, str]]
    quarantine: Quarantine
    unscored: list[UnscoredView]

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def decoded_frames(self, plans: list[sampling.ClipPlan]) -> list[int]:
        """Frames its decoder decodes for each of ``plans``, counted (the bench's decode-cost check)."""
        ...


def loader_facts(loader: Loader) -> dict[str, str]:
    """Which loader a run used, as records carry it: its backend (``kind``), where it decoded (``decode``: cpu | gpu;
    "" for none) and why ``auto`` moved the decode off its first choice (``note``; "" when it did not)."""
    return {"kind": loader.kind, "decode": loader.backend, "note": loader.decode_note}


def take_batches(loader: Loader, count: int, first_epoch: int = 0) -> Iterator[Batch]:
    """``count`` batches of ``loader``, epoch after epoch from ``first_epoch`` (each ``set_epoch``'d before it is
    iterated); ValueError when an epoch yields no batch."""
    epoch, left = first_epoch, count
    while left > 0:
        loader.set_epoch(epoch)
        yielded = 0
        for batch in loader:
            yield batch
            yielded += 1
            left -= 1
            if left == 0:
                return
        if not yielded:
            raise ValueError(f"epoch {epoch} of the loader yields no batch (len {len(loader)})")
        epoch += 1


@dataclass(frozen=True)
class Video:
    """A usable video: manifest entry plus probed facts."""

    index: int
    path: str
    label: int
    frames: int
    fps: float
    height: int
    width: int


class ClipPlanner:
    """The clips of one epoch on one rank (``plans(epoch)``); both the DALI and the PyAV loader consume it."""

    def __init__(self, cfg: DataConfig, split: str, videos: list[Video], rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:  # a rank outside the world would repeat another's clips
            raise ValueError(f"rank {rank} of world_size {world_size}: need world_size >= 1 and 0 <= rank < "
                             "world_size")
        self.cfg, self.split, self.videos, self.rank, self.world_size = cfg, split, videos, rank, world_size
        self.train = split == "train"
        self.segment = cfg.sampling == "segment"  # segment sampling (SSv2's); window + linspace otherwise
        # views decoded together (same frames, own crop window): a val/test unit's crops when a batch holds one
        self.views_per_unit = 1 if self.train or cfg.batch_size < cfg.num_spatial_crops else cfg.num_spatial_crops
        self.batch_views = cfg.batch_size // self.views_per_unit * self.views_per_unit  # plans per (full) batch
        if self.train:
            per_rank = len(videos) // world_size
            self.num_clips = per_rank // cfg.batch_size * cfg.batch_size
            self.num_batches = per_rank // cfg.batch_size
        else:
            units = len(videos) * cfg.num_ensemble_views * cfg.num_spatial_crops // self.views_per_unit
            self.num_clips = len(range(rank, units, world_size)) * self.views_per_unit
            self.num_batches = math.ceil(self.num_clips / self.batch_views)

    def _frames(self, v: Video, rng: np.random.Generator | None, clip_idx: int, num_clips: int) -> np.ndarray:
        c = self.cfg
        if self.segment:
            return sampling.segment_frames(v.frames, c.num_frames, rng)
        return sampling.kinetics_frames(v.frames, v.fps or c.target_fps, c.num_frames, c.sampling_rate, c.target_fps,
                                        clip_idx, num_clips, rng)

    def plan_clip(self, v: Video, rng: np.random.Generator) -> sampling.ClipPlan:
        """One random train clip of ``v``: frames, crop window and flip drawn from ``rng`` in that order."""
        return self.plan_clips([v], rng)[0]

    def plan_clips(self, videos: Sequence[Video], rng: np.random.Generator) -> list[sampling.ClipPlan]:
        """One random train clip of each of ``videos``, drawn from ``rng`` clip after clip as ``plan_clip`` draws
        them; Kinetics frame indices are computed for all the clips at once (``sampling.temporal_indices_many``)."""
        c = self.cfg
        draws = []
        for v in videos:
            if self.segment:
                where = sampling.segment_frames(v.frames, c.num_frames, rng)
            else:  # the clip's window [start, end]: its frame indices come after the loop
                size = sampling.clip_size(c.num_frames, c.sampling_rate, c.target_fps, v.fps or c.target_fps)
                where = sampling.get_start_end_idx(v.frames, size, -1, 1, rng)
            window = sampling.train_window(v.height, v.width, c.train_jitter_scales, c.train_crop_size, rng,
                                           c.inv_uniform_sample)
            draws.append((v, where, window, bool(rng.random() < 0.5) and c.random_flip))
        if self.segment or not draws:
            frames = [where for _, where, _, _ in draws]
        else:
            (starts, ends) = zip(*(where for _, where, _, _ in draws))
            frames = list(sampling.temporal_indices_many(starts, ends, c.num_frames, [v.frames for v, *_ in draws]))
        return [sampling.ClipPlan(v.index, v.path, v.label, f, window, flip, v.frames, (v.height, v.width))
                for (v, _, window, flip), f in zip(draws, frames)]

    def plans(self, epoch: int) -> list[sampling.ClipPlan]:
        """This rank's clips of ``epoch`` in batch order; val/test: its units' views, ``views_per_unit`` plans of the
        same frames in a row (one decode each run)."""
        c = self.cfg
        if self.train:
            order = np.random.default_rng((c.seed, epoch)).permutation(len(self.videos))
            mine = order[self.rank::self.world_size][:self.num_clips]
            rng = np.random.default_rng((c.seed, epoch, self.rank))
            return self.plan_clips([self.videos[i] for i in mine], rng)
        out = []
        n, views_per_video = self.views_per_unit, c.num_ensemble_views * c.num_spatial_crops
        for unit in range(self.rank, len(self.videos) * views_per_video // n, self.world_size):
            v = self.videos[unit * n // views_per_video]
            t = unit * n % views_per_video // c.num_spatial_crops
            frames = self._frames(v, None, t, c.num_ensemble_views)
            for k in range(unit * n, unit * n + n):
                s = k % c.num_spatial_crops
                spatial = s if c.num_spatial_crops == 3 else 1
                out.append(sampling.ClipPlan(v.index, v.path, v.label, frames,
                                             sampling.test_window(v.height, v.width, c.test_crop_size, spatial),
                                             video_frames=v.frames, video_size=(v.height, v.width)))
        return out

    def view_of(self, position: int) -> int:
        """The view number within its video (temporal clip * num_spatial_crops + crop) of val/test plan
        ``position`` of this rank."""
        n = self.views_per_unit
        unit = self.rank + self.world_size * (position // n)
        return (unit * n + position % n) % (self.cfg.num_ensemble_views * self.cfg.num_spatial_crops)

    def without(self, paths: set[str]) -> ClipPlanner:
        """The planner over this one's videos minus ``paths`` (same split, rank and world size)."""
        if not paths & {v.path for v in self.videos}:
            return self
        return ClipPlanner(self.cfg, self.split, [v for v in self.videos if v.path not in paths], self.rank,
                           self.world_size)

    def replacements(self, epoch: int, batch: int, slot: int) -> Iterator[sampling.ClipPlan]:
        """Stand-in train clips for ``slot`` of ``batch`` (this rank), in a fixed order: the videos permuted by
        ``default_rng((seed, epoch, rank, batch, slot, REPLACE))``, each clip drawn from that generator too. The
        caller takes the first that is not quarantined and decodes."""
        rng = np.random.default_rng((self.cfg.seed, epoch, self.rank, batch, slot, REPLACE))
        for i in rng.permutation(len(self.videos)):
            yield self.plan_clip(self.videos[int(i)], rng)


class ClipLoader:
    """Shared loader skeleton: epochs, lengths, resume offset, and the repair of batches a decoder could not make.

    Subclasses implement ``_batches(plans)`` (one ``Batch``, or a ``FailedBatch``, per ``planner.batch_views`` plans,
    in order, going on after a failure; each run of ``planner.views_per_unit`` plans decoded once) and
    ``_decode_unit(plans) -> [(3, T, S, S)]`` (one unit's clips, one decode with the same decoder, raising on
    failure).

    Args:
        planner: plans every epoch (over the usable videos).
        device: where batches go.
        start_batch: batches of the first epoch iterated to skip (resume).
        rejected: [(path, reason)] of the videos the pre-flight check left out.
        quarantine: videos known to fail at run time (a checkpoint's ``quarantine`` entries).
    """

    kind = ""  # the registered backend (pipelines.loaders)
    backend = "cpu"  # where it decodes

    def __init__(self, planner: ClipPlanner, device: torch.device, start_batch: int = 0,
                 rejected: list[tuple[str, str]] | None = None,
                 quarantine: Sequence[BadVideo | dict[str, Any]] = ()):
        self.planner, self.cfg, self.device = planner, planner.cfg, torch.device(device)
        self.epoch, self.start_batch = 0, start_batch
        self.rejected = rejected or []
        self.quarantine = Quarantine(len(planner.videos), rank=planner.rank, on_bad_video=self.cfg.on_bad_video,
                                     max_bad_fraction=self.cfg.max_bad_fraction if planner.train else None,
                                     entries=quarantine)
        self.unscored: list[UnscoredView] = []  # val/test views of the last pass that could not be decoded
        self.decode_note = ""  # why data.loader/backend=auto moved the decode off its first choice (the factory's)
        self.crop = self.cfg.train_crop_size if planner.train else self.cfg.test_crop_size
        if not 0 <= start_batch <= planner.num_batches:
            raise ValueError(f"start_batch={start_batch} is not within the epoch's {planner.num_batches} batches")

    def planner_for(self, epoch: int) -> ClipPlanner:
        """Epoch ``epoch``'s planner: train plans over the videos not quarantined before that epoch."""
        return self.planner.without(self.quarantine.excluded(epoch, -1)) if self.planner.train else self.planner

    @property
    def num_clips(self) -> int:
        return self.planner_for(self.epoch).num_clips

    def __len__(self) -> int:
        return self.planner_for(self.epoch).num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        planner = self.planner_for(self.epoch)
        plans = planner.plans(self.epoch)[:planner.num_clips]
        skip, self.start_batch = self.start_batch, 0  # the resume offset applies to the first epoch iterated
        if skip > planner.num_batches:
            raise ValueError(f"start_batch={skip} is past epoch {self.epoch}'s {planner.num_batches} batches")
        if not planner.train:
            self.unscored = []
        return self._repaired(planner, self.epoch, skip, plans[skip * planner.batch_views:])

    def _repaired(self, planner: ClipPlanner, epoch: int, skip: int,
                  plans: list[sampling.ClipPlan]) -> Iterator[Batch]:
        B = planner.batch_views
        for k, item in enumerate(self._batches(plans), start=skip):
            chunk = plans[(k - skip) * B:(k - skip + 1) * B]
            # a video this rank quarantined earlier in this epoch (e.g. as a failed replacement) is replaced
            # wherever it comes up again, decoded or not, so that a resumed run makes the same batch
            gone = self.quarantine.excluded(epoch, k - 1) if planner.train else set()
            stale = {s for s, p in enumerate(chunk) if p.path in gone}
            if isinstance(item, FailedBatch) or stale:
                item = self._repair(planner, epoch, k, chunk, item, stale)
                if item is None:
                    continue
            yield item

    def _decode_or_reason(self, plans: list[sampling.ClipPlan]) -> list[torch.Tensor] | str:
        try:
            return self._decode_unit(plans)
        except Exception as e:  # noqa: BLE001 - whatever stops one clip's decode is that clip's verdict
            return failure_reason(e)

    def _repair(self, planner: ClipPlanner, epoch: int, k: int, plans: list[sampling.ClipPlan],
                item: Batch | FailedBatch, stale: set[int]) -> Batch | None:
        """Batch ``k`` without its bad clips: each suspect unit is decoded again alone; what fails again is
        quarantined; train slots get replacements, val/test views are dropped and listed (all of a failed unit's)."""
        if isinstance(item, FailedBatch):
            clips, errors = dict(item.clips), item.errors
        else:
            clips, errors = {s: item.video[s] for s in range(len(plans)) if s not in stale}, {}
        suspects = [s for s in (range(len(plans)) if errors is None else sorted(errors)) if s not in stale]
        reasons: dict[int, str] = {}
        n = planner.views_per_unit  # a batch starts at a unit's first view
        # the decoder's own verdict, one unit at a time (DALI: which clip broke the batch)
        for unit in sorted({s // n for s in suspects}):
            views = range(unit * n, min(unit * n + n, len(plans)))
            got = self._decode_or_reason([plans[s] for s in views])
            for s in views:
                if isinstance(got, str):
                    reasons[s] = (errors or {}).get(s) or got
                else:
                    clips[s] = got[s - unit * n]
        if isinstance(item, FailedBatch) and not reasons:
            logger.warning("batch %d of epoch %d failed (%s) but each of its clips decodes alone; going on with "
                           "those", k, epoch + 1, item.cause or item.errors)
        for s in sorted(reasons):
            self.quarantine.add(BadVideo(plans[s].path, reasons[s], epoch, k, planner.rank))
        if not planner.train:
            for s in sorted(reasons):
                view = planner.view_of(k * planner.batch_views + s)
                self.unscored.append(UnscoredView(plans[s].index, plans[s].path, view, reasons[s]))
            keep = [s for s in range(len(plans)) if s not in reasons]
            return self._assemble([plans[s] for s in keep], [clips[s] for s in keep]) if keep else None
        plans = list(plans)
        for s in sorted(set(reasons) | stale):
            bad = plans[s].path
            plans[s], clips[s] = self._replacement(planner, epoch, k, s)
            logger.info("epoch %d batch %d slot %d: %s replaced by %s", epoch + 1, k, s, bad, plans[s].path)
        return self._assemble(plans, [clips[s] for s in range(len(plans))])

    def _replacement(self, planner: ClipPlanner, epoch: int, k: int, slot: int
                     ) -> tuple[sampling.ClipPlan, torch.Tensor]:
        """The first replacement candidate for ``slot`` of batch ``k`` that is not quarantined and decodes (the
        ones that fail are quarantined on the way)."""
        for plan in planner.replacements(epoch, k, slot):
            if plan.path in self.quarantine.excluded(epoch, k):
                continue
            got = self._decode_or_reason([plan])
            if not isinstance(got, str):
                return plan, got[0]
            self.quarantine.add(BadVideo(plan.path, got, epoch, k, planner.rank))
        raise TooManyBadVideos(f"no video of the {len(planner.videos)} planned in epoch {epoch + 1} decodes as a "
                               f"replacement for batch {k} slot {slot} (rank {planner.rank})")

    def _assemble(self, plans: list[sampling.ClipPlan], clips: list[torch.Tensor]) -> Batch:
        return Batch(stack_clips(clips, self.device), *plan_labels(plans, self.device))

    def _batches(self, plans: list[sampling.ClipPlan]) -> Iterator[Batch | FailedBatch]:
        raise NotImplementedError

    def _decode_unit(self, plans: list[sampling.ClipPlan]) -> list[torch.Tensor]:
        """The clips ``(3, T, S, S)`` of one unit (``plans``: the same video and frames, each its own window and
        flip), decoded once, alone, by this loader's decoder; raises when it cannot."""
        raise NotImplementedError
