"""The attention suite: one attention call (forward+backward, or forward only when only inference is asked for)
of each block shape the selected variants use (temporal, spatial, joint), per available backend."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import torch

from timesformer_harness.bench.case import ModelCase, measure_step, single_mode
from timesformer_harness.bench.record import BenchRecord
from timesformer_harness.config import RootConfig
from timesformer_harness.variants import ATTENTION_CALLS, VARIANTS, attention_flops, attention_shape

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


def cases(cfg: RootConfig, base: dict[str, Any], attns: list[str], modes: list[str],
          device: torch.device) -> list[Case]:
    from timesformer_harness.kernels.attention import available_backends
    from timesformer_harness.runtime import resolve_precision

    T, S = cfg.model.num_frames, cfg.model.img_size
    shapes = [s for s in ATTENTION_CALLS if any(s in VARIANTS[a].attention_calls for a in attns)]
    mode = single_mode("attention", modes)
    out = []
    for shape in shapes:
        owner = next(a for a in attns if shape in VARIANTS[a].attention_calls)  # the variant it belongs to
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
    fwd_flops = attention_flops(case.model, case.shape, case.batch, case.frames, case.img_size)
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
