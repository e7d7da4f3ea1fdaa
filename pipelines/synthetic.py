"""Random clips generated on the target device, for model-only benchmarks with no I/O in the timed loop."""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from timesformer_harness.pipelines.base import CLIP_FORMAT, Batch, to_device
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.quarantine import Quarantine, UnscoredView

logger = logging.getLogger(__name__)

POOL_BATCHES = 2  # distinct batches generated up front and cycled


class SyntheticLoader:
    """``data.synthetic_videos`` clips per epoch of shape (3, T, crop, crop), N(0, 1), labels uniform.

    A small pool of batches is generated on ``device`` at construction and cycled, so iterating costs nothing;
    labels and indices still follow the same contract (``index`` = clip number in the epoch).
    """

    kind, backend, planner, indexes, decode_note = "synthetic", "", None, None, ""  # it decodes nothing

    def __init__(self, cfg: DataConfig, split: str, *, device: torch.device, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0):
        self.cfg, self.device, self.epoch, self.start_batch = cfg, torch.device(device), 0, start_batch
        self.rejected: list[tuple[str, str]] = []
        self.quarantine = Quarantine(0)  # nothing is decoded, so nothing fails
        self.unscored: list[UnscoredView] = []
        crop = cfg.train_crop_size if split == "train" else cfg.test_crop_size
        per_rank = cfg.synthetic_videos // world_size
        self.num_batches = per_rank // cfg.batch_size if split == "train" else -(-per_rank // cfg.batch_size)
        if self.num_batches == 0:
            raise ValueError(f"data.synthetic_videos={cfg.synthetic_videos} over {world_size} rank(s) make no batch "
                             f"of data.batch_size={cfg.batch_size}")
        self.num_clips = per_rank if split != "train" else self.num_batches * cfg.batch_size
        self.rank = rank
        g = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + rank)
        shape = (cfg.batch_size, 3, cfg.num_frames, crop, crop)
        # in the real loaders' layout, so that the model is fed what they feed it
        self.pool = [torch.randn(shape, generator=g, device=self.device).contiguous(memory_format=CLIP_FORMAT)
                     for _ in range(POOL_BATCHES)]

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def decoded_frames(self, plans: list) -> list[int]:
        return [0] * len(plans)

    def __iter__(self) -> Iterator[Batch]:
        B = self.cfg.batch_size
        g = torch.Generator().manual_seed(hash((self.cfg.seed, self.epoch, self.rank)) & 0xFFFFFFFF)
        labels = torch.randint(0, self.cfg.synthetic_classes, (self.num_batches * B,), generator=g)
        skip, self.start_batch = self.start_batch, 0
        for b in range(skip, self.num_batches):
            n = min(B, self.num_clips - b * B)
            video = self.pool[b % POOL_BATCHES][:n]
            index = torch.arange(b * B, b * B + n) * 1 + self.rank * self.num_clips
            label_index = to_device(torch.stack([labels[b * B:b * B + n], index]), self.device)  # one copy
            yield Batch(video, label_index[0], label_index[1])


def check_synthetic_labels(cfg: DataConfig, num_classes: int) -> None:
    """The synthetic loader's labels (0..``data.synthetic_classes``-1) against ``num_classes`` (0 = not checked), as
    a manifest's are: ValueError naming both keys."""
    if cfg.loader == "synthetic" and num_classes and cfg.synthetic_classes > num_classes:
        raise ValueError(f"data.synthetic_classes={cfg.synthetic_classes} draws labels 0..{cfg.synthetic_classes - 1}, "
                         f"out of range for model.num_classes={num_classes}: set data.synthetic_classes={num_classes} "
                         f"(or fewer)")
