"""The loader contract every pipeline honours and the per-epoch clip plan (``pipelines.factory`` builds loaders).

A loader is an iterable of ``Batch(video (B, 3, T, H, W) float32 normalised, label (B,) int64, index (B,) int64)``
on the requested device, with ``len()`` = batches per epoch on this rank, ``set_epoch(e)``, ``num_clips`` (clips per
epoch on this rank) and ``rejected`` ([(path, reason)] of the videos left out).

* train: every video once per epoch in an order from ``default_rng((data.seed, epoch))``, sharded ``[rank::world]``
  and cut to the same count on every rank; each clip's frames, crop window and flip come from
  ``default_rng((data.seed, epoch, rank))`` (``pipelines.sampling``); full batches only (drop_last, as the
  original). ``start_batch`` skips the first batches of the first epoch iterated (resume), deterministically.
* val/test: ``num_ensemble_views`` uniform clips x ``num_spatial_crops`` crops per video (``index`` = video index),
  the views sharded ``[rank::world]`` so that across ranks each is seen exactly once; the last batch may be short.
  (The original's val split used train-style random clips; ours evaluates val like test.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from pipelines import sampling
from pipelines.config import DataConfig


@dataclass
class Batch:
    """One batch: ``video (B, 3, T, H, W)`` float32 normalised, ``label (B,)`` int64, ``index (B,)`` video index."""

    video: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor


class Loader(Protocol):
    num_clips: int
    rejected: list[tuple[str, str]]

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


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
        self.cfg, self.split, self.videos, self.rank, self.world_size = cfg, split, videos, rank, world_size
        self.train = split == "train"
        self.segment = cfg.format == "ssv2"  # SSv2 segment sampling; Kinetics window + linspace otherwise
        if self.train:
            per_rank = len(videos) // world_size
            self.num_clips = per_rank // cfg.batch_size * cfg.batch_size
            self.num_batches = per_rank // cfg.batch_size
        else:
            views = len(videos) * cfg.num_ensemble_views * cfg.num_spatial_crops
            self.num_clips = len(range(rank, views, world_size))
            self.num_batches = math.ceil(self.num_clips / cfg.batch_size)

    def _frames(self, v: Video, rng: np.random.Generator | None, clip_idx: int, num_clips: int) -> np.ndarray:
        c = self.cfg
        if self.segment:
            return sampling.segment_frames(v.frames, c.num_frames, rng)
        return sampling.kinetics_frames(v.frames, v.fps or c.target_fps, c.num_frames, c.sampling_rate, c.target_fps,
                                        clip_idx, num_clips, rng)

    def plans(self, epoch: int) -> list[sampling.ClipPlan]:
        c = self.cfg
        out = []
        if self.train:
            order = np.random.default_rng((c.seed, epoch)).permutation(len(self.videos))
            mine = order[self.rank::self.world_size][:self.num_clips]
            rng = np.random.default_rng((c.seed, epoch, self.rank))
            for i in mine:
                v = self.videos[i]
                frames = self._frames(v, rng, -1, 1)
                window = sampling.train_window(v.height, v.width, c.train_jitter_scales, c.train_crop_size, rng,
                                               c.inv_uniform_sample)
                flip = bool(rng.random() < 0.5) and c.random_flip
                out.append(sampling.ClipPlan(v.index, v.path, v.label, frames, window, flip))
            return out
        views_per_video = c.num_ensemble_views * c.num_spatial_crops
        for k in range(self.rank, len(self.videos) * views_per_video, self.world_size):
            v = self.videos[k // views_per_video]
            view = k % views_per_video
            t, s = view // c.num_spatial_crops, view % c.num_spatial_crops
            spatial = s if c.num_spatial_crops == 3 else 1
            frames = self._frames(v, None, t, c.num_ensemble_views)
            out.append(sampling.ClipPlan(v.index, v.path, v.label, frames,
                                         sampling.test_window(v.height, v.width, c.test_crop_size, spatial)))
        return out


class ClipLoader:
    """Shared loader skeleton: epochs, lengths, resume offset; subclasses turn plans into batches (``_batches``)."""

    def __init__(self, planner: ClipPlanner, device: torch.device, start_batch: int = 0,
                 rejected: list[tuple[str, str]] | None = None):
        self.planner, self.cfg, self.device = planner, planner.cfg, torch.device(device)
        self.epoch, self.start_batch = 0, start_batch
        self.rejected = rejected or []
        self.num_clips = planner.num_clips
        self.crop = self.cfg.train_crop_size if planner.train else self.cfg.test_crop_size
        if start_batch > planner.num_batches:
            raise ValueError(f"start_batch={start_batch} is past the epoch's {planner.num_batches} batches")

    def __len__(self) -> int:
        return self.planner.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        plans = self.planner.plans(self.epoch)[:self.num_clips]
        skip, self.start_batch = self.start_batch, 0  # the resume offset applies to the first epoch iterated
        plans = plans[skip * self.cfg.batch_size:]
        return self._batches(plans)

    def _batches(self, plans: list[sampling.ClipPlan]) -> Iterator[Batch]:
        raise NotImplementedError
