"""The attention suite: one attention call (forward+backward, or forward only when only inference is asked for)
of each block shape the selected variants use (temporal, spatial, joint), per available backend."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import torch

from timesformer_harness.bench.case import ModelCase, measure_step
from timesformer_harness.bench.record import BenchRecord
from timesformer_harness.config import ModelConfig, RootConfig

# The attention shapes each variant runs.
VARIANT_SHAPES = {
    "divided_space_time": ("temporal", "spatial"),
    "joint_space_time": ("joint",),
    "space_only": ("spatial",),
}


@dataclass(kw_only=True)
class Case(ModelCase):
    """One block shape's attention call with one ``timesformer_harness.kernels.attention`` backend."""

    suite: ClassVar[str] = "attention"
    shape: str  # temporal | spatial | joint
    attn_backend: str

    @property
    def name(self) -> str:
        return f"attention/{self.shape}/{self.attn_backend}/{self.mode}"

    def record(self, device: torch.device) -> BenchRecord:
        rec = super().record(device)
        rec.attn_backend = self.attn_backend
        return rec


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


def cases(cfg: RootConfig, base: dict[str, Any], attns: list[str], modes: list[str],
          device: torch.device) -> list[Case]:
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
            out.append(Case.of(base, model=replace(cfg.model, attention_type=owner), shape=shape,
                               attn_backend=backend, mode=mode, frames=T, img_size=S))
    return out


def build(case: Case, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> Callable[[], None]:
    """One call of ``timesformer_harness.kernels.attention.attention`` on random q, k, v of the block's shape with the
    case's backend (and its backward in train mode); fills FLOPs per clip and the shape."""
    from timesformer_harness.kernels.attention import attention

    nseq, H, L, hd = attention_shape(case.model, case.shape, case.batch, case.frames, case.img_size)
    fwd_flops = 4 * nseq * H * L * L * hd  # QK^T and AV, 2 FLOPs per multiply-add
    rec.flops_per_clip = (3 * fwd_flops if case.mode == "train" else fwd_flops) // case.batch
    rec.extra.update({"shape": case.shape, "sequences": nseq, "heads": H, "seq_len": L, "head_dim": hd})
    q, k, v = (torch.randn(nseq, H, L, hd, device=device, dtype=dtype or torch.float32,
                           requires_grad=case.mode == "train") for _ in range(3))
    backend = case.attn_backend
    if case.mode == "train":
        grad = torch.randn(nseq, H, L, hd, device=device, dtype=q.dtype)

        def step() -> None:
            q.grad = k.grad = v.grad = None
            attention(q, k, v, backend=backend).backward(grad)
    else:
        def step() -> None:
            with torch.inference_mode():
                attention(q, k, v, backend=backend)
    return step


def run(case: Case, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """The step ``build`` makes, timed (``measure_step``)."""
    measure_step(build, case, rec, device, dtype)
