"""The loader contract every pipeline honours, the per-epoch clip plan, and the ``build_loader`` factory.

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

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from harness.config import DataConfig
from pipelines import sampling
from pipelines.manifest import VideoEntry, read_manifest
from pipelines.validate import DEFAULT_CACHE, CODECS, VideoInfo, check_videos, usable, required_frames, write_rejected

logger = logging.getLogger(__name__)


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


def resolve_backend(cfg: DataConfig, device: torch.device) -> str:
    """DALI device for ``data.backend``: auto = gpu when the model's device is CUDA, else cpu."""
    if cfg.backend != "auto":
        if cfg.backend == "gpu" and not torch.cuda.is_available():
            raise ValueError("data.backend=gpu needs CUDA, and torch.cuda.is_available() is False; use data.backend=cpu")
        return cfg.backend
    return "gpu" if torch.device(device).type == "cuda" and torch.cuda.is_available() else "cpu"


def dali_available() -> str:
    """"" when nvidia.dali imports, else the reason."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"nvidia.dali is not importable ({e})"
    return ""


def _judge(infos: list[VideoInfo], cfg: DataConfig, backend: str) -> list[tuple[str, str]]:
    out = []
    for info in infos:
        need = required_frames(info, cfg.num_frames, cfg.sampling_rate, cfg.target_fps, cfg.pad_short,
                               cfg.format == "ssv2")
        reason = usable(info, backend, need)
        if reason:
            out.append((info.path, reason))
    return out


def build_loader(cfg: DataConfig, split: str, *, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1, start_batch: int = 0, run_dir: str | Path | None = None) -> Loader:
    """The loader ``data.loader`` asks for (auto: DALI when it can decode every video here, else PyAV, saying why).

    Every video is pre-flight checked (``pipelines.validate``, cached); unusable ones raise (``data.on_bad_video:
    error``) or are left out, listed in ``loader.rejected`` and ``{run_dir}/rejected.csv`` (``skip``).
    """
    device = torch.device(device)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r}; choose from ['train', 'val', 'test']")
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size={cfg.batch_size} must be >= 1")
    if cfg.loader == "synthetic":
        from pipelines.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, split, device=device, rank=rank, world_size=world_size, start_batch=start_batch)

    entries: list[VideoEntry] = read_manifest(cfg, split)
    cache = None if cfg.validate_cache == "none" else (cfg.validate_cache or DEFAULT_CACHE)
    infos, _ = check_videos([e.path for e in entries], "pyav", cfg.num_frames, cfg.sampling_rate, cfg.target_fps,
                            cfg.pad_short, cfg.format == "ssv2", cache=cache, workers=max(1, cfg.num_workers))
    loader_kind, backend = cfg.loader, resolve_backend(cfg, device)
    if loader_kind == "auto":
        why = dali_available()
        if not why:
            pyav_ok = {p for p, _ in _judge(infos, cfg, "pyav")}
            dali_only = [(p, r) for p, r in _judge(infos, cfg, backend) if p not in pyav_ok]
            if dali_only:
                codecs = sorted({i.codec for i in infos if i.path in {p for p, _ in dali_only}})
                why = (f"{len(dali_only)} video(s) use codecs {codecs} that DALI's {backend} backend does not decode "
                       f"(it decodes {sorted(CODECS[backend])}), e.g. {dali_only[0][0]}")
        loader_kind = "pyav" if why else "dali"
        if why:
            logger.warning("data.loader=auto: using the PyAV loader because %s", why)
        else:
            logger.info("data.loader=auto: using DALI (%s backend)", backend)
    if loader_kind == "dali" and (why := dali_available()):
        raise RuntimeError(f"data.loader=dali but {why}; use data.loader=pyav")
    rejected = _judge(infos, cfg, backend if loader_kind == "dali" else "pyav")
    if rejected:
        what = f"{len(rejected)} of {len(entries)} videos in the {split} manifest cannot be used"
        listing = "\n".join(f"  {p}: {r}" for p, r in rejected[:10]) + ("\n  ..." if len(rejected) > 10 else "")
        if cfg.on_bad_video == "error":
            raise ValueError(f"{what} (data.on_bad_video=error):\n{listing}\nfix or remove them (python -m "
                             f"pipelines.validate MANIFEST lists them all), or set data.on_bad_video=skip")
        logger.warning("%s; skipping them (data.on_bad_video=skip):\n%s", what, listing)
        if run_dir is not None and rank == 0:
            write_rejected(rejected, Path(run_dir) / f"rejected_{split}.csv" if split != "train" else
                           Path(run_dir) / "rejected.csv")
    bad = {p for p, _ in rejected}
    videos = [Video(i, e.path, e.label, info.frames, info.fps, info.height, info.width)
              for i, (e, info) in enumerate(zip(entries, infos)) if e.path not in bad]
    if not videos:
        raise ValueError(f"no usable videos left in the {split} manifest ({len(rejected)} rejected)")
    planner = ClipPlanner(cfg, split, videos, rank, world_size)
    if split == "train" and planner.num_batches == 0:
        raise ValueError(f"{len(videos)} train videos over {world_size} rank(s) make no full batch of "
                         f"data.batch_size={cfg.batch_size}; lower the batch size")
    if loader_kind == "dali":
        from pipelines.dali import DaliLoader

        return DaliLoader(planner, device, backend=backend, start_batch=start_batch, rejected=rejected)
    from pipelines.pyav import PyAVLoader

    return PyAVLoader(planner, device, start_batch=start_batch, rejected=rejected)
