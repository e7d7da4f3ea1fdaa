"""Residual adds and row scaling with stochastic-depth scales, one kernel each way.

A pre-norm block adds a bf16 branch to the fp32 residual stream, often through a stochastic-depth mask. Written
with plain ops, autograd spends three kernels on the branch's gradient (the mask product, its scale, the cast back
to the branch's dtype); these functions write it in one (``torch.mul`` into a tensor of the branch's dtype).
``scale`` is the mask already divided by the keep probability (``draw_keep_scales``), broadcast against the branch,
or None when nothing is dropped. While ``torch.compile`` traces, the plain ops run instead (inductor fuses them).

The fused functions here and in ``layout.py`` mix fp32 and bf16 on purpose and run inside autocast: they use only
ops that autocast leaves alone (``out=`` variants; ops on none of its lists, which type promotion handles), so they
need no autocast-off context (tested against CUDA autocast's own op registrations).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


_REFERENCE = [False]


def use_fused() -> bool:
    """Whether the fused functions of ``kernels/`` run: in eager mode, except inside ``reference_ops()``; not while
    ``torch.compile`` traces (inductor fuses the plain ops itself)."""
    return not (_REFERENCE[0] or torch.compiler.is_compiling())


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Run the plain-op formulations instead of the fused functions (what the tests compare against)."""
    _REFERENCE[0] = True
    try:
        yield
    finally:
        _REFERENCE[0] = False


def mul_into(a: torch.Tensor, b: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``a * b`` (or ``a``) written once into a new tensor of ``shape`` and ``dtype``."""
    out = torch.empty(shape, dtype=dtype, device=a.device)
    if b is None:
        return out.copy_(a)
    return torch.mul(a, b, out=out)


class _ResidualAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(scale)
        ctx.branch = (branch.shape, branch.dtype)
        if scale is None:
            return torch.add(x, branch)
        return torch.addcmul(x, branch, scale, out=torch.empty_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        (scale,) = ctx.saved_tensors
        shape, dtype = ctx.branch
        return grad, mul_into(grad, scale, shape, dtype), None


class _ScaleRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(scale)
        return mul_into(x, scale, x.shape, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        (scale,) = ctx.saved_tensors
        return mul_into(grad, scale, grad.shape, grad.dtype), None


def residual_add(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x + branch * scale`` (``x + branch`` when ``scale`` is None), in ``x``'s dtype."""
    if not use_fused():
        return x + branch if scale is None else torch.addcmul(x, branch, scale)
    return _ResidualAdd.apply(x, branch, scale)


def scale_rows(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``x * scale`` in ``x``'s dtype (``x`` when ``scale`` is None): stochastic depth where no residual add follows."""
    if scale is None:
        return x
    if not use_fused():
        return (x * scale).to(x.dtype)
    return _ScaleRows.apply(x, scale)


def draw_keep_scales(shapes: list[tuple[int, ...]], drop_probs: list[float], device: torch.device,
                     keep_cache: dict | None = None) -> list[torch.Tensor]:
    """Stochastic-depth scales for several masks at once: for each ``shape``, 1/keep with probability keep =
    ``1 - drop_prob``, else 0, fp32 (two kernels for all of them). ``keep_cache`` keeps the per-element keep
    probabilities on the device between calls with the same shapes (a host-to-device copy otherwise)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    key = (tuple(shapes), tuple(drop_probs), str(device))
    keep = None if keep_cache is None or torch.compiler.is_compiling() else keep_cache.get(key)
    if keep is None:
        values = [1.0 - p for p, n in zip(drop_probs, sizes) for _ in range(n)]
        if torch.compiler.is_compiling():  # a constant of the compiled graph
            keep = torch.tensor(values, dtype=torch.float32, device=device)
        else:  # from page-locked memory without waiting (a copy from pageable memory waits for the device's queue)
            pinned = torch.tensor(values, dtype=torch.float32, pin_memory=device.type == "cuda")
            keep = pinned.to(device, non_blocking=True)
        if keep_cache is not None and not torch.compiler.is_compiling():
            keep_cache.clear()  # one batch shape at a time in practice
            keep_cache[key] = keep
    flat = torch.bernoulli(keep).div_(keep)
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]
