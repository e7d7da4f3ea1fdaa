"""Model-only train step and inference per attention variant (synthetic input), as pytest-benchmark cases: the
bench's model suite (``timesformer_harness.bench.model``) builds the step and fills the record from
pytest-benchmark's own samples, so the two report the same measurement."""

from __future__ import annotations

from dataclasses import replace

import pytest

from timesformer_harness.bench import model as model_suite
from timesformer_harness.bench.record import fill_throughput
from timesformer_harness.config import BenchConfig
from timesformer_harness.variants import VARIANTS
from timesformer_harness.metrics import gpu_peak_flops, synchronize
from timesformer_harness.model import load_preset
from timesformer_harness.runner import is_oom
from timesformer_harness.runtime import environment_info, precision_name, resolve_precision, seed_everything

BATCH = 2
ROUNDS = 5


@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("attention_type", list(VARIANTS))
def test_model_step(benchmark, device, preset, attention_type, mode):
    benchmark.group = f"model-{mode}-{preset}"
    seed_everything(0)
    dtype = resolve_precision("auto", device)
    cfg = replace(load_preset(preset), attention_type=attention_type)
    case = model_suite.Case(preset=preset, device=str(device), batch=BATCH, precision=precision_name(dtype),
                            warmup=2, steps=ROUNDS, model=cfg, mode=mode, frames=cfg.num_frames,
                            img_size=cfg.img_size, channels_last=BenchConfig().channels_last)  # as the bench
    rec = case.record(device)
    rec.env = environment_info(device)
    if device.type == "cuda":
        rec.peak_flops, rec.peak_flops_source = gpu_peak_flops(rec.device_name, rec.precision)
    try:
        model_suite.count(case, rec)
        step = model_suite.build(case, rec, device, dtype)

        def synchronised_step() -> None:
            step()
            synchronize(device)  # pytest-benchmark does not synchronise CUDA itself

        benchmark.pedantic(synchronised_step, rounds=ROUNDS, warmup_rounds=case.warmup, iterations=1)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        rec.status, rec.message = "oom", str(e).splitlines()[0][:300]
        benchmark.extra_info.update(rec.flat())
        pytest.skip(f"{rec.case}: out of memory")
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing was timed
        return
    stats = benchmark.stats.stats
    fill_throughput(rec, list(stats.data), clips_per_step=BATCH, frames=case.frames)
    benchmark.extra_info.update(rec.flat())
    assert len(rec.samples_s) == ROUNDS and all(s > 0 for s in rec.samples_s)
    assert rec.step_ms["median"] == pytest.approx(1e3 * stats.median)
    assert rec.step_ms["p10"] <= rec.step_ms["median"] <= rec.step_ms["p90"] <= 1e3 * stats.max
    assert rec.params > 0 and rec.flops_per_clip > 0 and rec.images_per_s == pytest.approx(
        BATCH * case.frames / stats.median)
