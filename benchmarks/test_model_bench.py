"""Model-only train step and inference per attention variant (synthetic input), as pytest-benchmark cases: the
step of ``timesformer_harness.workload.synthetic_step``, the one ``make bench`` and ``make gate`` time."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from timesformer_harness.config import ATTENTION_TYPES
from timesformer_harness.counting import count_flops, count_params
from timesformer_harness.metrics import BenchRecord, gpu_peak_flops, synchronize
from timesformer_harness.model import load_preset
from timesformer_harness.runner import is_oom
from timesformer_harness.runtime import device_name, precision_name, resolve_precision, seed_everything
from timesformer_harness.workload import synthetic_step

BATCH = 2


@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_model_step(benchmark, device, preset, attention_type, mode):
    benchmark.group = f"model-{mode}-{preset}"
    seed_everything(0)
    dtype = resolve_precision("auto", device)
    cfg = replace(load_preset(preset), attention_type=attention_type)
    T, S = cfg.num_frames, cfg.img_size
    rec = BenchRecord(suite="model", case=f"model/{attention_type}/{mode}/{T}x{S}", attention_type=attention_type,
                      preset=preset, frames=T, img_size=S, batch=BATCH, precision=precision_name(dtype), mode=mode,
                      device=device.type, device_name=device_name(device))
    rec.flops_per_clip = count_flops(cfg, mode=mode)
    if device.type == "cuda":
        rec.peak_flops, rec.peak_flops_source = gpu_peak_flops(rec.device_name, rec.precision)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model, one_step = synthetic_step(cfg, device, dtype, mode=mode, batch=BATCH,
                                         channels_last=device.type == "cuda")
        rec.params = count_params(model)

        def step() -> None:
            one_step()
            synchronize(device)  # pytest-benchmark does not synchronise CUDA itself

        benchmark.pedantic(step, rounds=5, warmup_rounds=2, iterations=1)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        rec.status, rec.message = "oom", str(e).splitlines()[0][:300]
        benchmark.extra_info.update(rec.extra_info())
        pytest.skip(f"{rec.case}: out of memory")
    if benchmark.stats is not None:  # None under --benchmark-disable
        median_s = benchmark.stats.stats.median
        rec.step_ms = {"median": 1e3 * median_s, "p10": 1e3 * benchmark.stats.stats.min,
                       "p90": 1e3 * benchmark.stats.stats.max}
        rec.clips_per_s = BATCH / median_s
        rec.images_per_s = rec.clips_per_s * T
        rec.achieved_flops = rec.flops_per_clip * rec.clips_per_s
        rec.utilisation = rec.achieved_flops / rec.peak_flops if rec.peak_flops else None
    if device.type == "cuda":
        rec.peak_mem_bytes, rec.peak_mem_kind = torch.cuda.max_memory_allocated(device), "cuda_allocator"
    benchmark.extra_info.update(rec.extra_info())
    assert rec.params == count_params(model)
