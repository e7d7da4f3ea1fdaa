"""Token-layout reshapes for divided space-time attention.

Inside a TimeSformer block the patch tokens of one clip are ordered ``(n t)``: patch-major, time-minor (token
index ``1 + n*T + t`` after the CLS token). Temporal attention runs over sequences of T tokens per patch,
spatial attention over sequences of N patches per frame.
"""

from __future__ import annotations

import torch
from einops import rearrange


def to_temporal(x: torch.Tensor, T: int) -> torch.Tensor:
    """(B, N*T, D) -> (B*N, T, D): one sequence per patch position."""
    return rearrange(x, "b (n t) d -> (b n) t d", t=T)


def from_temporal(x: torch.Tensor, B: int) -> torch.Tensor:
    """(B*N, T, D) -> (B, N*T, D)."""
    return rearrange(x, "(b n) t d -> b (n t) d", b=B)


def to_spatial(x: torch.Tensor, T: int) -> torch.Tensor:
    """(B, N*T, D) -> (B*T, N, D): one sequence per frame."""
    return rearrange(x, "b (n t) d -> (b t) n d", t=T)


def from_spatial(x: torch.Tensor, B: int) -> torch.Tensor:
    """(B*T, N, D) -> (B, N*T, D)."""
    return rearrange(x, "(b t) n d -> b (n t) d", b=B)
