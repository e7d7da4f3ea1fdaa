"""Temporary stand-in for ``pipelines.build_loader`` (until the pipelines package lands): fixed random clips whose
label shifts their mean, sharded and shuffled like the real contract. ``python tests/_standin.py train|evaluate ARGS``
runs the entry point with it patched in (works under torchrun)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass
class Batch:
    video: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor


class StandInLoader:
    def __init__(self, cfg, split, rank=0, world_size=1, start_batch=0, num_videos=32, num_classes=4):
        self.cfg, self.split, self.rank, self.world_size, self.start_batch = cfg, split, rank, world_size, start_batch
        self.epoch, self.rejected, self.num_videos = 0, [], num_videos
        g = torch.Generator().manual_seed(123)
        T, S = cfg.num_frames, cfg.train_crop_size
        self.labels = torch.randint(0, num_classes, (num_videos,), generator=g)
        self.videos = torch.randn(num_videos, 3, T, S, S, generator=g) + self.labels[:, None, None, None, None] * 0.5
        self.views = 1 if split == "train" else cfg.num_ensemble_views * cfg.num_spatial_crops
        self.num_clips = num_videos // world_size * self.views

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_clips // self.cfg.batch_size

    def __iter__(self):
        if self.split == "train":
            order = np.random.default_rng((self.cfg.seed, self.epoch)).permutation(self.num_videos)
            order = order[self.rank::self.world_size]
        else:
            order = np.repeat(np.arange(self.num_videos)[self.rank::self.world_size], self.views)
        B = self.cfg.batch_size
        for b in range(self.start_batch if self.split == "train" else 0, len(self)):
            idx = torch.as_tensor(order[b * B:(b + 1) * B])
            yield Batch(self.videos[idx], self.labels[idx], idx)


def build_loader(cfg, split, *, device, rank=0, world_size=1, start_batch=0, run_dir=None):
    return StandInLoader(cfg, split, rank, world_size, start_batch)


def install() -> None:
    import pipelines

    pipelines.build_loader = build_loader


if __name__ == "__main__":
    install()
    if sys.argv[1] == "train":
        from harness.train import main
    else:
        from harness.evaluate import main
    sys.exit(main(sys.argv[2:]))
