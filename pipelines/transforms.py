"""The clip transform both CPU loaders end with, in torch: a crop window's uint8 frames, mirrored when the plan
flips (before the resize, on the smaller window: bilinear resizing commutes exactly with a mirror, tested) ->
bilinear resize to the crop size -> normalise to ``(3, T, S, S)`` float32.

The PyAV loader runs it in its workers; the DALI loader on the CPU runs it on the windows DALI decoded and cropped
(on the GPU DALI resizes, mirrors and normalises itself). torch's uint8 channels-last bilinear kernel is vectorised:
on the development CPU it resized 8 frames of 190x190 to 224x224 in 0.7 ms, where DALI's CPU ``fn.resize`` took
about 0.7 ms per frame, and it was most of the DALI graph's cost after decoding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def crop_window(frames: np.ndarray, window: tuple[int, int, int, int], flip: bool = False) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> the ``window`` (y0, x0, h, w) of each, mirrored left-right when ``flip``, as a
    contiguous (T, h, w, 3) tensor."""
    y0, x0, h, w = window
    return mirror(torch.from_numpy(np.ascontiguousarray(frames[:, y0:y0 + h, x0:x0 + w])), flip)


def mirror(window: torch.Tensor, flip: bool) -> torch.Tensor:
    """(T, h, w, 3) uint8 mirrored left-right when ``flip`` (a copy: torch's flip, ~9x numpy's reversed copy)."""
    return window.flip(2) if flip else window


def resize_window(window: torch.Tensor, size: int) -> torch.Tensor:
    """(T, h, w, 3) uint8 -> (T, 3, size, size) uint8 (channels-last), bilinear without antialiasing."""
    x = window.permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=False)
    return x


def normalize(x: torch.Tensor, mean: list[float], std: list[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (3, T, H, W) -> float32 ``(x - 255 mean) / (255 std)`` per channel, computed in one pass as
    ``x / (255 std) - mean / std`` (within an ulp of it), written into ``out`` if given."""
    scale = 1 / (torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1) * 255)
    shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1) * 255 * scale
    return torch.addcmul(shift, x, scale, out=out) if out is not None else torch.addcmul(shift, x, scale)


def finish_clip(window: torch.Tensor, size: int, mean: list[float], std: list[float],
                out: torch.Tensor | None = None) -> torch.Tensor:
    """A clip's cropped (and mirrored) frames, (T, h, w, 3) uint8 -> (3, T, size, size) float32: resize, normalise
    (into ``out``, e.g. the clip's slot in a batch, when given)."""
    return normalize(resize_window(window, size).permute(1, 0, 2, 3), mean, std, out)
