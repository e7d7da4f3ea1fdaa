"""The attention suite: one attention call (forward+backward, or forward only when only inference is asked for)
of each block shape the selected variants use (temporal, spatial, joint), per available backend."""

from __future__ import annotations

from dataclasses import replace

import torch

from timesformer_harness.bench.case import BenchCase, timed
from timesformer_harness.config import ModelConfig, RootConfig
from timesformer_harness.metrics import BenchRecord, fill_throughput, peak_memory, reset_peak_memory

# The attention shapes each variant runs.
VARIANT_SHAPES = {
    "divided_space_time": ("temporal", "spatial"),
    "joint_space_time": ("joint",),
    "space_only": ("spatial",),
}


def attention_shape(cfg: ModelConfig, shape: str, B: int, T: int, S: int) -> tuple[int, int, int, int]:
    """(sequences, heads, L, head_dim) of one attention call of ``shape`` inside a block."""
    N = (S // cfg.patch_size) ** 2
    hd = cfg.embed_dim // cfg.num_heads
    if shape == "temporal":
        return B * N, cfg.num_heads, T, hd  # one sequence per patch position
    if shape == "spatial":
        return B * T, cfg.num_heads, 1 + N, hd  # one sequence per frame, CLS included
    if shape == "joint":
        return B, cfg.num_heads, 1 + N * T, hd
    raise ValueError(f"attention shape {shape!r}; choose temporal, spatial or joint")


def cases(cfg: RootConfig, base: BenchCase, attns: list[str], modes: list[str],
          device: torch.device) -> list[BenchCase]:
    from timesformer_harness.kernels.attention import available_backends

    from timesformer_harness.runtime import resolve_precision

    T, S = cfg.model.num_frames, cfg.model.img_size
    shapes = [s for s in ("temporal", "spatial", "joint") if any(s in VARIANT_SHAPES[a] for a in attns)]
    mode = "train" if "train" in modes else "infer"
    out = []
    for shape in shapes:
        owner = next(a for a in attns if shape in VARIANT_SHAPES[a])  # the variant this shape belongs to
        # probed in the dtype the cases run in (flash and cuDNN take only fp16/bf16 on CUDA)
        for backend in available_backends(device, resolve_precision(cfg.bench.precision, device),
                                          cfg.model.embed_dim // cfg.model.num_heads):
            out.append(replace(base.with_model(attention_type=owner), suite="attention", shape=shape,
                               backend=backend, mode=mode, frames=T, img_size=S))
    return out


def run(case: BenchCase, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """Time ``timesformer_harness.kernels.attention.attention`` on random q, k, v of the block's shape with the case's
    backend."""
    from timesformer_harness.kernels.attention import attention

    B, T, S = case.batch, case.frames, case.img_size
    nseq, H, L, hd = attention_shape(case.model, case.shape, B, T, S)
    fwd_flops = 4 * nseq * H * L * L * hd  # QK^T and AV, 2 FLOPs per multiply-add
    rec.flops_per_clip = (3 * fwd_flops if case.mode == "train" else fwd_flops) // B
    rec.extra.update({"shape": case.shape, "sequences": nseq, "heads": H, "seq_len": L, "head_dim": hd})
    base = reset_peak_memory(device)
    q, k, v = (torch.randn(nseq, H, L, hd, device=device, dtype=dtype or torch.float32,
                           requires_grad=case.mode == "train") for _ in range(3))
    backend = case.backend
    if case.mode == "train":
        grad = torch.randn(nseq, H, L, hd, device=device, dtype=q.dtype)

        def step() -> None:
            q.grad = k.grad = v.grad = None
            attention(q, k, v, backend=backend).backward(grad)
    else:
        def step() -> None:
            with torch.inference_mode():
                attention(q, k, v, backend=backend)

    times = timed(step, rec, case, device)
    rec.peak_mem_bytes, rec.peak_mem_kind = peak_memory(device, base)
    fill_throughput(rec, times, clips_per_step=B, frames=T)
