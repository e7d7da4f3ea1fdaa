"""The model suite: one train step (forward, backward, optimizer step) or one inference forward of the whole
model on synthetic input, per attention variant and mode, at the preset's frames and image size."""

from __future__ import annotations

from dataclasses import replace

import torch

from timesformer_harness.bench.case import BenchCase, timed
from timesformer_harness.config import RootConfig
from timesformer_harness.counting import count_flops, count_params
from timesformer_harness.metrics import BenchRecord, fill_throughput, peak_memory, reset_peak_memory
from timesformer_harness.workload import synthetic_step


def cases(cfg: RootConfig, base: BenchCase, attns: list[str], modes: list[str],
          device: torch.device) -> list[BenchCase]:
    T, S = cfg.model.num_frames, cfg.model.img_size
    return [replace(base.with_model(attention_type=attn), suite="model", mode=mode, frames=T, img_size=S)
            for attn in attns for mode in modes]


def run(case: BenchCase, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """``timesformer_harness.workload.synthetic_step`` timed: params, FLOPs per clip, step times, peak memory."""
    T, S, B = case.frames, case.img_size, case.batch
    rec.flops_per_clip = count_flops(case.model, batch=1, frames=T, img_size=S, mode=case.mode)
    base = reset_peak_memory(device)
    model, step = synthetic_step(case.model, device, dtype, mode=case.mode, batch=B, frames=T, img_size=S,
                                 channels_last=case.channels_last)
    rec.params = count_params(model)
    times = timed(step, rec, case, device)
    rec.peak_mem_bytes, rec.peak_mem_kind = peak_memory(device, base)
    fill_throughput(rec, times, clips_per_step=B, frames=T)
