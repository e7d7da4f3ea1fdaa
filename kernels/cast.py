"""A module's matmul weights cast to the autocast dtype in one op, forward and backward.

Under ``torch.autocast`` every ``Linear``/``Conv`` call casts its fp32 weight and bias to bf16/fp16 on its own
(two kernels per layer forward, two more for their gradients in backward). ``call_with_cast_weights`` casts all of a
module's at once with ``torch._foreach_copy_`` (one multi-tensor kernel on CUDA), converts their gradients back the
same way, and runs the module with the copies in the parameters' places; autocast then finds them already in its
dtype and casts nothing. The values are the same: each element is rounded once, as autocast rounds it.
"""

from __future__ import annotations

import torch
from torch import nn

from timesformer_harness.kernels.residual import use_fused

_MATMUL_LAYERS = (nn.Linear, nn.Conv2d)
WeightSlot = tuple[nn.Module, str]  # a layer and the name of one of its parameters


class _CastWeights(torch.autograd.Function):
    """fp32 weights -> ``dtype`` copies; their gradients -> fp32 in the weights' own layout (so that autograd
    stores them as ``.grad`` without another copy). One foreach copy each way."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        ctx.weights = weights
        out = [torch.empty_like(w, dtype=dtype) for w in weights]
        torch._foreach_copy_(out, list(weights))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        present = [i for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if present:
            full = [torch.empty_like(ctx.weights[i]) for i in present]
            torch._foreach_copy_(full, [grads[i] for i in present])
            for i, g in zip(present, full):
                out[i] = g
        return (None, *out)


def matmul_weights(module: nn.Module) -> tuple[WeightSlot, ...]:
    """The weights and biases autocast would cast in ``module``: those of its ``Linear`` and ``Conv2d`` layers, as
    (layer, parameter name), the order of ``module.named_parameters``."""
    return tuple((layer, name) for layer in module.modules() if isinstance(layer, _MATMUL_LAYERS)
                 for name, _ in layer.named_parameters(recurse=False))


def lower_precision(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type`` (bf16/fp16), or None outside autocast (and on devices autocast
    does not know, such as ``meta``)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def call_with_cast_weights(module: nn.Module, weights: tuple[WeightSlot, ...], *args: object) -> object:
    """``module(*args)`` (the first argument a tensor) with the parameters ``weights`` (``matmul_weights``) cast to the
    active autocast dtype in one op (see the module docstring); a plain call outside autocast and where
    ``use_fused()`` says no (``torch.compile`` fuses the casts itself).

    The copies take the parameters' places in the layers' ``_parameters`` for the call, and the parameters are put
    back after it, also when it raises: what ``torch.func.functional_call`` does, which walks the whole module on
    every call (about 30 times the host time of this swap for a TimeSformer block)."""
    # use_fused() first: it is False while torch.compile traces, and torch 2.11's dynamo cannot trace the autocast query
    if not weights or not use_fused():
        return module(*args)
    dtype = lower_precision(args[0].device.type)  # type: ignore[attr-defined]
    if dtype is None:
        return module(*args)
    params = [layer._parameters[name] for layer, name in weights]
    try:
        for (layer, name), cast in zip(weights, _CastWeights.apply(dtype, *params)):
            layer._parameters[name] = cast
        return module(*args)
    finally:
        for (layer, name), param in zip(weights, params):
            layer._parameters[name] = param
