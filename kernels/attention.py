"""One attention entry point with a selectable backend, and the timm-style attention module.

Backends: ``auto`` (SDPA picks), ``flash``, ``efficient``, ``cudnn``, ``math`` (SDPA pinned to one kernel through
``torch.nn.attention.sdpa_kernel``) and ``naive``: the explicit ``softmax(q k^T * scale) v`` of the original code,
the reference every other backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

BACKENDS = ("auto", "flash", "efficient", "cudnn", "math", "naive")
_SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """The original's explicit attention: scale applied after the matmul, softmax over keys.

    Args:
        q, k, v: (B, heads, L, head_dim).
    """
    scale = q.size(-1) ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale  # (B, heads, L, L)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", dropout_p: float = 0.0
) -> torch.Tensor:
    """Scaled-dot-product attention on (B, heads, L, head_dim) tensors with the chosen backend.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the pinned SDPA backend cannot run these inputs on this device (SDPA's own message).
    """
    if backend == "naive":
        return naive_attention(q, k, v, dropout_p)
    if backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if backend not in _SDPA_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {list(BACKENDS)}")
    with sdpa_kernel([_SDPA_BACKENDS[backend]]):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
    """The backends that run a small (1, 2, 8, 64) attention on ``device`` in ``dtype`` here, in BACKENDS order."""
    q = torch.randn(1, 2, 8, 64, device=device, dtype=dtype)
    ok = []
    for name in BACKENDS:
        try:
            attention(q, q, q, backend=name)
            ok.append(name)
        except RuntimeError:
            pass
    return ok


class Attention(nn.Module):
    """Multi-head self-attention with the original parameter names (``qkv`` fused Linear, ``proj``).

    ``qkv`` output channels are ``[q | k | v]``, each split into heads contiguously, as in the original.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
        name: str = "attn",
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose from {list(BACKENDS)}")
        self.num_heads = num_heads
        self.backend = backend
        self.name = name  # record_function range, e.g. "attn/temporal"
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        B, L, D = x.shape
        with record_function(self.name):
            qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each (B, heads, L, head_dim)
            x = attention(q, k, v, self.backend, self.attn_drop if self.training else 0.0)
            x = x.transpose(1, 2).reshape(B, L, D)
        return self.proj_drop(self.proj(x))
