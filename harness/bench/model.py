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


def cases(cfg: RootConfig, base: dict[str, Any], attns: list[str], modes: list[str],
          device: torch.device) -> list[ModelCase]:
    T, S = cfg.model.num_frames, cfg.model.img_size
    return [Case.of(base, model=replace(cfg.model, attention_type=attn), mode=mode, frames=T, img_size=S)
            for attn in attns for mode in modes]


def count(case: ModelCase, rec: BenchRecord) -> None:
    """FLOPs per clip of the case's step (counted on the meta device; before the memory window opens)."""
    rec.flops_per_clip = count_flops(case.model, batch=1, frames=case.frames, img_size=case.img_size, mode=case.mode)


def build(case: ModelCase, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> Callable[[], None]:
    """The step ``timesformer_harness.workload.synthetic_step`` gives for the case; fills params."""
    model, step = synthetic_step(case.model, device, dtype, mode=case.mode, batch=case.batch, frames=case.frames,
                                 img_size=case.img_size, channels_last=case.channels_last)
    rec.params = count_params(model)
    return step


def run(case: ModelCase, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """The FLOPs counted, then the step ``build`` makes, timed (``measure_step``)."""
    count(case, rec)
    measure_step(build, case, rec, device, dtype)
