"""The pipeline suite: clips/s of the DALI and the PyAV loader on the experiment's data (the toy set by default),
and the frames each decodes per delivered clip."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from harness.bench.case import BenchCase, SkipCase
from harness.config import REPO_ROOT, RootConfig, load_config
from harness.metrics import BenchRecord, fill_throughput, peak_memory, reset_peak_memory
from pipelines.config import DataConfig

LOADERS = ("dali", "pyav")
WARMUP_BATCHES = 2


def data_config_path(cfg: RootConfig) -> str:
    """``bench.data_config`` as an absolute path (relative paths are from the repository root)."""
    path = cfg.bench.data_config
    return path if os.path.isabs(path) else str(REPO_ROOT / path)


def cases(cfg: RootConfig, base: BenchCase, attns: list[str], modes: list[str],
          device: torch.device) -> list[BenchCase]:
    return [replace(base, suite="pipeline", backend=loader, data_config=data_config_path(cfg),
                    batches=cfg.bench.pipeline_batches) for loader in LOADERS]


def build_train_loader(case: BenchCase, device: torch.device, loader: str) -> tuple[Any, DataConfig]:
    """The train loader of the case's data config with ``data.loader = loader`` (the experiment's own batch size
    and crop), and that data config. Raises SkipCase when the data or the loader's packages are not here."""
    path = case.data_config
    data = load_config(path).data if Path(path).is_file() else RootConfig().data
    data = replace(data, loader=loader)
    root = Path(data.root) if os.path.isabs(data.root) else REPO_ROOT / data.root
    if not root.exists():
        raise SkipCase(f"no data at {root}: run `make data` (python -m pipelines.tools.toy --out data/toy)")
    try:
        from pipelines import build_loader

        return build_loader(data, "train", device=device), data
    except ImportError as e:
        raise SkipCase(f"the {loader} loader cannot be built here: {e}") from e


def run(case: BenchCase, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """Clips/s of one loader over ``case.batches`` timed batches after 2 warm-up batches (epochs restart as
    needed); the time of a batch is from asking for it to having it (on the device, synchronised)."""
    base = reset_peak_memory(device)
    loader, data = build_train_loader(case, device, case.backend)
    rec.frames, rec.img_size, rec.batch = data.num_frames, data.train_crop_size, data.batch_size
    times: list[float] = []
    clips = 0
    epoch = 0
    want = WARMUP_BATCHES + case.batches
    while len(times) < want:
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in loader:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            if len(times) > WARMUP_BATCHES:
                clips += batch.video.size(0)
            if len(times) >= want:
                break
            t0 = time.perf_counter()
        epoch += 1
        if epoch > 100:
            raise RuntimeError(f"loader {case.backend} yields no batches (len={len(loader)})")
    timed = times[WARMUP_BATCHES:]
    rec.peak_mem_bytes, rec.peak_mem_kind = peak_memory(device, base)
    fill_throughput(rec, timed, clips_per_step=rec.batch, frames=rec.frames)
    rec.clips_per_s = clips / sum(timed)  # the last batch of an epoch may be smaller
    rec.images_per_s = rec.clips_per_s * rec.frames
    rec.extra["rejected"] = len(getattr(loader, "rejected", []))
    rec.extra["decoded_frames"] = decoded_frames_per_clip(loader, case.backend)


def decoded_frames_per_clip(loader: Any, name: str, max_clips: int = 16) -> dict:
    """Frames decoded per delivered clip for the loader's first ``max_clips`` clips of epoch 0: counted by decoding
    with PyAV along the loader's decoder model, beside the model's estimate (``pipelines.tools.decode_cost``)."""
    from pipelines.tools.decode_cost import measure_clips, strategy_for

    strategy = strategy_for(name, getattr(loader, "backend", "cpu"))
    return measure_clips([(p.path, p.frames) for p in loader.planner.plans(0)], strategy, max_clips)
