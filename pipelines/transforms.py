"""The clip transform both CPU loaders end with, in torch: a crop window's uint8 frames, mirrored when the plan
flips (before the resize, on the smaller window: bilinear resizing commutes exactly with a mirror, tested) ->
bilinear resize to the crop size -> normalise to ``(3, T, S, S)`` float32, stored channels-last like the loaders'
batches (``timesformer_harness.pipelines.base.CLIP_FORMAT``): the pixels' order from the decoder on, so no step
transposes them, and normalising is a convert-copy and an ``addcmul`` over flat memory rather than a strided write
into ``(3, T, S, S)`` order.

The PyAV loader runs it in its workers; the DALI loader on the CPU runs it on the windows DALI decoded and cropped
(on the GPU DALI resizes, mirrors and normalises itself): torch's uint8 channels-last bilinear kernel is vectorised,
and DALI's CPU ``fn.resize`` was most of its graph's cost after decoding (the timings:
docs/results/2026-11-26-loader-torch-post-and-jpeg-frames.md). It runs on the frames' device: gpu-input's
PyNvVideoCodec row finishes NVDEC's frames with it on the GPU.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F


def crop_window(frames: np.ndarray, window: tuple[int, int, int, int], flip: bool = False) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> the ``window`` (y0, x0, h, w) of each, mirrored left-right when ``flip``, as a
    contiguous (T, h, w, 3) tensor. Raises ValueError for a window not inside the frames (numpy would cut it short)."""
    y0, x0, h, w = window
    if y0 < 0 or x0 < 0 or y0 + h > frames.shape[1] or x0 + w > frames.shape[2]:
        raise ValueError(f"crop window (y0 {y0}, x0 {x0}, {h}x{w}) is not inside {frames.shape[2]}x{frames.shape[1]} "
                         "frames")
    return mirror(torch.from_numpy(np.ascontiguousarray(frames[:, y0:y0 + h, x0:x0 + w])), flip)


def mirror(window: torch.Tensor, flip: bool) -> torch.Tensor:
    """(T, h, w, 3) uint8 mirrored left-right when ``flip`` (a copy: torch's flip, ~9x numpy's reversed copy)."""
    return window.flip(2) if flip else window


def resize_window(window: torch.Tensor, size: int) -> torch.Tensor:
    """(T, h, w, 3) uint8 -> (T, 3, size, size) uint8 (channels-last), bilinear without antialiasing (off the CPU:
    ``resize_in_float``)."""
    x = window.permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) == (size, size):
        return x
    x = x.contiguous(memory_format=torch.channels_last)
    if x.device.type != "cpu":
        return resize_in_float(x, size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def resize_in_float(x: torch.Tensor, size: int) -> torch.Tensor:
    """(T, 3, h, w) uint8 -> (T, 3, size, size) uint8, bilinear in float32 and rounded back: CUDA has no uint8
    bilinear kernel (within one level of the CPU's uint8 kernel, tested)."""
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def normalize(x: torch.Tensor, mean: list[float], std: list[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``(3, T, H, W)`` -> float32 ``(x - 255 mean) / (255 std)`` per channel, computed as
    ``x / (255 std) - mean / std`` (within an ulp of the formula), into ``out`` if given, else into a new clip in
    the loaders' layout. When ``x`` and ``out`` are both stored channels-last (as ``resize_window`` and
    ``empty_clips`` make them) it is a convert-copy and an ``addcmul`` over flat memory, the per-channel constants
    tiled along a row; any other strides take torch's broadcasting path (same values, several times slower)."""
    if out is None:
        out = torch.empty((*x.shape[1:], 3), dtype=torch.float32, device=x.device).permute(3, 0, 1, 2)
    pixels, out_pixels = x.permute(1, 2, 3, 0), out.permute(1, 2, 3, 0)  # (T, H, W, 3)
    if pixels.is_contiguous() and out_pixels.is_contiguous():
        tile = math.gcd(pixels.numel() // 3, 32)  # pixels per row of the flat view
        scale, shift = _affine(tuple(mean), tuple(std), tile, x.device)
        flat = out_pixels.view(-1, 3 * tile)
        flat.copy_(pixels.view(-1, 3 * tile))  # exact: uint8 -> float32 (two passes beat one mixed-dtype pass)
        torch.addcmul(shift, flat, scale, out=flat)
    else:
        scale, shift = _affine(tuple(mean), tuple(std), 1, x.device)
        torch.addcmul(shift.view(3, 1, 1, 1), x, scale.view(3, 1, 1, 1), out=out)
    return out


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], tile: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of ``normalize`` per channel, repeated ``tile`` times, on ``device``: ``1 / (255 std)``,
    ``-mean / std``."""
    scale = 1 / (torch.tensor(std, dtype=torch.float32) * 255)
    shift = -torch.tensor(mean, dtype=torch.float32) * 255 * scale
    scale, shift = scale.repeat(tile).to(device), shift.repeat(tile).to(device)
    if device.type == "cuda":  # cached for every thread and stream: the copies must be done before any reads them
        torch.cuda.synchronize(device)
    return scale, shift


def finish_clip(window: torch.Tensor, size: int, mean: list[float], std: list[float],
                out: torch.Tensor | None = None) -> torch.Tensor:
    """A clip's cropped (and mirrored) frames, (T, h, w, 3) uint8 -> (3, T, size, size) float32 in the loaders'
    layout: resize, normalise (into ``out``, e.g. the clip's slot in an ``empty_clips`` batch, when given)."""
    return normalize(resize_window(window, size).permute(1, 0, 2, 3), mean, std, out)
