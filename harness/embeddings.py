"""Nearest-neighbour resizing of TimeSformer's position and time embeddings, part of its numerics contract.

The model resizes at run time when a clip's patch grid or frame count differs from construction's (as the
original does), and checkpoint loading resizes weights saved at another size; both call these two functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POS_RESIZE_MODES = ("2d", "1d")


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int, grid: tuple[int, int] | None = None,
                     mode: str = "2d") -> torch.Tensor:
    """Resize a (1, 1+N0, D) position embedding to (1, 1+num_patches, D) by nearest interpolation; CLS slot kept.

    Args:
        num_patches: patch tokens wanted (``Hp * Wp``).
        grid: ``(Hp, Wp)`` for ``2d``; default the square ``isqrt(num_patches)`` grid.
        mode: ``2d`` resizes the square patch grid (what the model does at run time, and the better choice for
            weights); ``1d`` interpolates the flattened sequence like the original ``load_pretrained``, which
            repeats raster tokens and scrambles the 2-D layout (224->448: new token j takes old token j // 4).
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    if mode == "1d":
        patch_pos = F.interpolate(patch_pos.transpose(1, 2), size=num_patches, mode="nearest").transpose(1, 2)
    elif mode == "2d":
        P = math.isqrt(patch_pos.size(1))
        assert P * P == patch_pos.size(1), f"pos_embed grid of {patch_pos.size(1)} tokens is not square"
        if grid is None:
            side = math.isqrt(num_patches)
            grid = (side, side)
        assert grid[0] * grid[1] == num_patches, f"grid {grid} does not hold {num_patches} patches"
        g = patch_pos.transpose(1, 2).reshape(1, -1, P, P)  # (1, D, P, P)
        patch_pos = F.interpolate(g, size=grid, mode="nearest").flatten(2).transpose(1, 2)
    else:
        raise ValueError(f"pos_resize={mode!r}; choose from {list(POS_RESIZE_MODES)}")
    return torch.cat([cls_pos, patch_pos], dim=1)


def resize_time_embed(time_embed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(1, T0, D) -> (1, num_frames, D) by 1-D nearest interpolation (as the original model and loaders do)."""
    return F.interpolate(time_embed.transpose(1, 2), size=num_frames, mode="nearest").transpose(1, 2)
