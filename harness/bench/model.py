"""The model suite: one train step (forward, backward, optimizer step) or one inference forward of the whole
model on synthetic input, per attention variant and mode, at the preset's frames and image size."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from timesformer_harness.bench.case import ModelCase, measure_step
from timesformer_harness.bench.record import BenchRecord
from timesformer_harness.config import RootConfig
from timesformer_harness.counting import count_flops, count_params
from timesformer_harness.workload import synthetic_step

Case = ModelCase


# The GPU batch sweep: doubling until a batch runs out of memory (the larger ones are then not run).
GPU_BATCHES = (2, 4, 8, 16, 32, 64, 128, 256)


def cases(cfg: RootConfig, base: dict[str, Any], attns: list[str], modes: list[str],
          device: torch.device) -> list[ModelCase]:
    """Every variant x mode x compile mode (``bench.compile``) x batch (``bench.batches``; default: the batch size
    on CPU, ``GPU_BATCHES`` on a GPU). A compiled case warms up at least 3 steps (CUDA graphs record on the
    second and third call)."""
    b = cfg.bench
    T, S = cfg.model.num_frames, cfg.model.img_size
    batches = suite_batches(cfg, device)
    return [Case.of(base, model=replace(cfg.model, attention_type=attn), mode=mode, frames=T, img_size=S,
                    batch=batch, sweep_batch=len(batches) > 1, compile=compile,
                    warmup=b.warmup if compile == "none" else max(b.warmup, 3))
            for attn in attns for mode in modes for compile in b.compile for batch in batches]


def suite_batches(cfg: RootConfig, device: torch.device) -> list[int]:
    """The batches the model suite measures: ``bench.batches``, else the batch size on CPU, ``GPU_BATCHES`` on a
    GPU."""
    return list(cfg.bench.batches) or (list(GPU_BATCHES) if device.type == "cuda" else [cfg.bench.batch_size])


def count(case: ModelCase, rec: BenchRecord) -> None:
    """FLOPs per clip of the case's step (counted on the meta device; before the memory window opens)."""
    rec.flops_per_clip = count_flops(case.model, batch=1, frames=case.frames, img_size=case.img_size, mode=case.mode)


def build(case: ModelCase, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> Callable[[], None]:
    """The step ``timesformer_harness.workload.synthetic_step`` gives for the case; fills params."""
    model, step = synthetic_step(case.model, device, dtype, mode=case.mode, batch=case.batch, frames=case.frames,
                                 img_size=case.img_size, channels_last=case.channels_last, compile=case.compile)
    rec.params = count_params(model)
    return step


def run(case: ModelCase, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """The FLOPs counted, then the step ``build`` makes, timed (``measure_step``)."""
    count(case, rec)
    measure_step(build, case, rec, device, dtype)
