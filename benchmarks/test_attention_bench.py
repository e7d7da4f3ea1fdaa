"""Attention-only forward+backward per block shape (temporal, spatial, joint) and backend, as pytest-benchmark cases."""

from __future__ import annotations

import pytest
import torch

from timesformer_harness.bench import attention_shape
from timesformer_harness.metrics import BenchRecord, synchronize
from timesformer_harness.model import load_preset
from timesformer_harness.runtime import device_name
from timesformer_harness.kernels.attention import BACKENDS, attention, available_backends

BATCH = 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["temporal", "spatial", "joint"])
def test_attention_fwd_bwd(benchmark, device, preset, shape, backend):
    benchmark.group = f"attention-{shape}-{preset}"
    cfg = load_preset(preset)
    nseq, H, L, hd = attention_shape(cfg, shape, BATCH, cfg.num_frames, cfg.img_size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if backend not in available_backends(device, dtype, hd):  # probed in the dtype the case runs in
        pytest.skip(f"backend {backend!r} cannot run on {device.type} in {dtype} here")
    q, k, v = (torch.randn(nseq, H, L, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def step() -> None:
        q.grad = k.grad = v.grad = None
        attention(q, k, v, backend=backend).backward(grad)
        synchronize(device)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    rec = BenchRecord(suite="attention", case=f"attention/{shape}/{backend}/train", preset=preset,
                      frames=cfg.num_frames, img_size=cfg.img_size, batch=BATCH, mode="train", backend=backend,
                      precision="bf16" if dtype == torch.bfloat16 else "fp32", device=device.type,
                      device_name=device_name(device),
                      flops_per_clip=3 * 4 * nseq * H * L * L * hd // BATCH,
                      extra={"shape": shape, "sequences": nseq, "heads": H, "seq_len": L, "head_dim": hd})
    if benchmark.stats is not None:
        rec.clips_per_s = BATCH / benchmark.stats.stats.median
        rec.achieved_flops = rec.flops_per_clip * rec.clips_per_s
    benchmark.extra_info.update(rec.extra_info())
    assert q.grad is not None and q.grad.shape == q.shape
