"""``build_loader``: the loader ``data.loader`` asks for, after the pre-flight check of every video.

``auto`` picks DALI when ``nvidia.dali`` imports and its backend decodes every usable video, else PyAV (logging
why); ``resolve_backend`` maps ``data.backend`` to a DALI device. Each loader module is imported only when it is
chosen, so DALI is not loaded for a PyAV or synthetic loader.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from pipelines.base import ClipPlanner, Loader, Video
from pipelines.config import DataConfig
from pipelines.manifest import VideoEntry, read_manifest
from pipelines.quarantine import BadVideo, write_rejected
from pipelines.validate import DECODABLE_CODECS, DEFAULT_CACHE, check_videos, deep_check, judge

logger = logging.getLogger(__name__)


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


def build_loader(cfg: DataConfig, split: str, *, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1, start_batch: int = 0, run_dir: str | Path | None = None,
                 quarantine: Sequence[BadVideo | dict[str, Any]] = ()) -> Loader:
    """The loader ``data.loader`` asks for (auto: DALI when it can decode every video here, else PyAV, saying why).

    Every video is pre-flight checked (``pipelines.validate``, cached; ``data.validate: deep`` also decodes every
    packet); unusable ones raise (``data.on_bad_video: error``) or are left out, listed in ``loader.rejected`` and
    ``{run_dir}/rejected.csv`` (``skip``). Videos that fail while decoding go to ``loader.quarantine``, which starts
    from ``quarantine`` (a resumed run's entries, ``pipelines.quarantine``).
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

    def rejected_by(decoder: str) -> list[tuple[str, str]]:
        return judge(infos, decoder, cfg.num_frames, cfg.sampling_rate, cfg.target_fps, cfg.pad_short,
                     cfg.format == "ssv2")

    if loader_kind == "auto":
        why = dali_available()
        if not why:
            pyav_ok = {p for p, _ in rejected_by("pyav")}
            dali_only = [(p, r) for p, r in rejected_by(backend) if p not in pyav_ok]
            if dali_only:
                codecs = sorted({i.codec for i in infos if i.path in {p for p, _ in dali_only}})
                why = (f"{len(dali_only)} video(s) use codecs {codecs} that DALI's {backend} backend does not decode "
                       f"(it decodes {sorted(DECODABLE_CODECS[backend])}), e.g. {dali_only[0][0]}")
        loader_kind = "pyav" if why else "dali"
        if why:
            logger.warning("data.loader=auto: using the PyAV loader because %s", why)
        else:
            logger.info("data.loader=auto: using DALI (%s backend)", backend)
    if loader_kind == "dali" and (why := dali_available()):
        raise RuntimeError(f"data.loader=dali but {why}; use data.loader=pyav")
    rejected = rejected_by(backend if loader_kind == "dali" else "pyav")
    if cfg.validate == "deep":
        rejected += _deep_rejects([i.path for i in infos if i.path not in {p for p, _ in rejected}], cfg, cache)
    if rejected:
        what = f"{len(rejected)} of {len(entries)} videos in the {split} manifest cannot be used"
        listing = "\n".join(f"  {p}: {r}" for p, r in rejected[:10]) + ("\n  ..." if len(rejected) > 10 else "")
        if cfg.on_bad_video == "error":
            deep = " --deep" if cfg.validate == "deep" else ""
            raise ValueError(f"{what} (data.on_bad_video=error):\n{listing}\nfix or remove them (python -m "
                             f"pipelines.validate MANIFEST{deep} lists them all), or set data.on_bad_video=skip")
        logger.warning("%s; skipping them (data.on_bad_video=skip):\n%s", what, listing)
        if run_dir is not None and rank == 0:
            write_rejected(Path(run_dir) / f"rejected_{split}.csv" if split != "train" else
                           Path(run_dir) / "rejected.csv", rejected,
                           [e if isinstance(e, BadVideo) else BadVideo(**e) for e in quarantine])
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

        return DaliLoader(planner, device, backend=backend, start_batch=start_batch, rejected=rejected,
                          quarantine=quarantine)
    from pipelines.pyav import PyAVLoader

    return PyAVLoader(planner, device, start_batch=start_batch, rejected=rejected, quarantine=quarantine)


def _deep_rejects(paths: list[str], cfg: DataConfig, cache: str | Path | None) -> list[tuple[str, str]]:
    """``validate.deep_check`` of ``paths``; under torch.distributed each rank decodes its share and all ranks get
    every verdict (the same list everywhere, one decode per file)."""
    import torch.distributed as dist

    workers = max(1, cfg.num_workers)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return deep_check(paths, cache, workers)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, deep_check(paths[dist.get_rank()::dist.get_world_size()], cache, workers))
    bad = dict(r for part in parts for r in part)
    return [(p, bad[p]) for p in paths if p in bad]
