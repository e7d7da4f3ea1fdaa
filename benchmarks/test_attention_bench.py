"""Attention-only forward+backward per block shape (temporal, spatial, joint) and backend, as pytest-benchmark
cases: the bench's attention suite (``timesformer_harness.bench.attention``) builds the call and fills the record
from pytest-benchmark's own samples."""

from __future__ import annotations

import pytest
import torch

from timesformer_harness.bench import attention as attention_suite
from timesformer_harness.bench.record import fill_throughput
from timesformer_harness.kernels.attention import BACKENDS, available_backends
from timesformer_harness.metrics import synchronize
from timesformer_harness.model import load_preset
from timesformer_harness.runtime import precision_name
from timesformer_harness.variants import attention_shape

BATCH = 2
ROUNDS = 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["temporal", "spatial", "joint"])
def test_attention_fwd_bwd(benchmark, device, preset, shape, backend):
    benchmark.group = f"attention-{shape}-{preset}"
    cfg = load_preset(preset)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    head_dim = cfg.embed_dim // cfg.num_heads
    if backend not in available_backends(device, dtype, head_dim):  # probed in the dtype the case runs in
        pytest.skip(f"backend {backend!r} cannot run on {device.type} in {dtype or 'fp32'} here")
    case = attention_suite.Case(preset=preset, device=str(device), batch=BATCH, precision=precision_name(dtype),
                                warmup=1, steps=ROUNDS, model=cfg, mode="train", frames=cfg.num_frames,
                                img_size=cfg.img_size, shape=shape, attn_backend=backend)
    rec = case.record(device)
    step = attention_suite.build(case, rec, device, dtype)

    def synchronised_step() -> None:
        step()
        synchronize(device)

    benchmark.pedantic(synchronised_step, rounds=ROUNDS, warmup_rounds=case.warmup, iterations=1)
    if benchmark.stats is None:
        return
    fill_throughput(rec, list(benchmark.stats.stats.data), clips_per_step=BATCH, frames=case.frames)
    benchmark.extra_info.update(rec.flat())
    nseq, heads, length, hd = attention_shape(cfg, shape, BATCH, cfg.num_frames, cfg.img_size)
    assert rec.extra["sequences"] == nseq and rec.flops_per_clip == 3 * 4 * nseq * heads * length**2 * hd // BATCH
    assert rec.step_ms["median"] == pytest.approx(1e3 * benchmark.stats.stats.median)
