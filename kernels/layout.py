"""Token layout for divided space-time attention, as views.

Inside a TimeSformer block the patch tokens of one clip are ordered ``(n t)``: patch-major, time-minor (token
index ``1 + n*T + t`` after the CLS token). Temporal attention runs over the T consecutive tokens of each patch, so
it reads the tokens where they lie; spatial attention runs over the N patches of each frame, a strided view of the
same tokens. Neither view copies.
"""

from __future__ import annotations

import torch

from timesformer_harness.kernels.residual import use_fused


def patch_major(x: torch.Tensor, T: int) -> torch.Tensor:
    """(B, N*T, D) -> (B, N, T, D): one row of T frames per patch position (a view)."""
    B, NT, D = x.shape
    return x.view(B, NT // T, T, D)


def frame_major(x: torch.Tensor, T: int) -> torch.Tensor:
    """(B, N*T, D) -> (B, T, N, D): one row of N patches per frame (a strided view)."""
    return patch_major(x, T).transpose(1, 2)


# ------------------------------------------------------------------------- the divided block's two layout steps
#
# Between temporal and spatial attention the block moves tokens between the (n t) order and per-frame sequences
# with the CLS token in front of each. Written with slices and cats, autograd materialises a full-size zero tensor
# for every slice and adds them up; the two steps below write each gradient once instead. ``*_reference`` is the
# same step in plain ops: what ``torch.compile`` traces (inductor fuses it) and what the tests compare against.


def temporal_residual_and_frames_reference(x: torch.Tensor, update: torch.Tensor, T: int
                                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, 1+N*T, D), update (B, N*T, D) -> (x1, frames): x1 is x with ``update`` added to the patch tokens
    (the CLS token unchanged), frames (B, T, 1+N, D) is x1 as per-frame sequences, the CLS token first."""
    B, _, D = x.shape
    x1 = torch.cat([x[:, :1], x[:, 1:] + update], dim=1)
    frames = torch.cat([x1[:, :1].unsqueeze(1).expand(B, T, 1, D), frame_major(x1[:, 1:], T)], dim=2)
    return x1, frames


def frames_residual_reference(x1: torch.Tensor, res: torch.Tensor, scale: torch.Tensor | None, T: int) -> torch.Tensor:
    """x1 (B, 1+N*T, D) plus the spatial attention's output res (B, T, 1+N, D), rows scaled by ``scale`` (B, T, 1)
    when given: each patch token gets its frame's output, the CLS token the mean of its T outputs."""
    B, _, D = x1.shape
    res_cls, res_patches = res[:, :, 0], res[:, :, 1:].transpose(1, 2)  # (B, T, D), (B, N, T, D)
    if scale is not None:
        res_cls, res_patches = res_cls * scale, res_patches * scale.unsqueeze(1)
    cls = x1[:, :1] + res_cls.mean(dim=1, keepdim=True)
    return torch.cat([cls, (patch_major(x1[:, 1:], T) + res_patches).reshape(B, -1, D)], dim=1)


class _TemporalResidualAndFrames(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, update: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, D = x.shape
        ctx.T, ctx.update_dtype = T, update.dtype
        x1 = torch.empty_like(x)
        x1_cls, x1_patches = x1[:, :1], x1[:, 1:]
        x1_cls.copy_(x[:, :1])
        torch.add(x[:, 1:], update, out=x1_patches)
        frames = torch.cat([x1_cls.unsqueeze(1).expand(B, T, 1, D), frame_major(x1_patches, T)], dim=2)
        return x1, frames

    @staticmethod
    def backward(ctx, grad_x1: torch.Tensor, grad_frames: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        T = ctx.T
        grad_x = torch.empty_like(grad_x1)
        grad_patches = grad_x[:, 1:]
        torch.add(patch_major(grad_x1[:, 1:], T), grad_frames[:, :, 1:].transpose(1, 2),
                  out=patch_major(grad_patches, T))
        torch.add(grad_x1[:, :1], grad_frames[:, :, 0].sum(dim=1, keepdim=True), out=grad_x[:, :1])
        return grad_x, grad_patches.to(ctx.update_dtype), None


class _FramesResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1: torch.Tensor, res: torch.Tensor, scale: torch.Tensor | None, T: int) -> torch.Tensor:
        ctx.save_for_backward(scale)
        ctx.T, ctx.res = T, (res.shape, res.dtype)
        res_cls, res_patches = res[:, :, 0], res[:, :, 1:].transpose(1, 2)
        x2 = torch.empty_like(x1)
        x2_patches, x1_patches = patch_major(x2[:, 1:], T), patch_major(x1[:, 1:], T)
        if scale is None:
            torch.add(x1_patches, res_patches, out=x2_patches)
        else:  # scale (B, T, 1): per frame
            torch.addcmul(x1_patches, res_patches, scale.unsqueeze(1), out=x2_patches)
            res_cls = res_cls * scale
        torch.add(x1[:, :1], res_cls.mean(dim=1, keepdim=True), out=x2[:, :1])
        return x2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        (scale,) = ctx.saved_tensors
        T = ctx.T
        shape, dtype = ctx.res
        grad_res = torch.empty(shape, dtype=dtype, device=grad.device)
        grad_res_patches = grad_res[:, :, 1:].transpose(1, 2)
        grad_patches = patch_major(grad[:, 1:], T)
        grad_cls = grad[:, :1].expand(-1, T, -1)  # the mean's gradient: 1/T to each frame
        if scale is None:
            grad_res_patches.copy_(grad_patches)
            torch.div(grad_cls, T, out=grad_res[:, :, 0])
        else:
            torch.mul(grad_patches, scale.unsqueeze(1), out=grad_res_patches)
            torch.mul(grad_cls, scale / T, out=grad_res[:, :, 0])
        return grad, grad_res, None, None


def temporal_residual_and_frames(x: torch.Tensor, update: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``temporal_residual_and_frames_reference``; one fused step in eager mode."""
    if not use_fused():
        return temporal_residual_and_frames_reference(x, update, T)
    return _TemporalResidualAndFrames.apply(x, update, T)


def frames_residual(x1: torch.Tensor, res: torch.Tensor, scale: torch.Tensor | None, T: int) -> torch.Tensor:
    """See ``frames_residual_reference``; one fused step in eager mode."""
    if not use_fused():
        return frames_residual_reference(x1, res, scale, T)
    return _FramesResidual.apply(x1, res, scale, T)
