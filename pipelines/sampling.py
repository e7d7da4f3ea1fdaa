"""Clip sampling shared by every loader: which frames, which crop window, flip or not.

All randomness lives here, drawn in Python from ``numpy.random.default_rng``, so that the DALI and PyAV loaders
produce the same clip for the same video, epoch and rank, and a resumed run can replay an epoch from any batch.
The recipe is the original TimeSformer's (PySlowFast's Kinetics and SSv2 samplers), re-expressed in source-pixel
coordinates so the crop happens before the resize:

* temporal, ``data.sampling`` window (Kinetics'): a window of ``sampling_rate * num_frames / target_fps * fps``
  source frames, start uniform in ``[0, delta]`` (train) or ``delta * clip_idx / num_clips`` (test), then
  ``linspace(start, end, T)`` clamped to the video and truncated (videos shorter than the window repeat their last
  frame): the original's whole-video path; where it seeks instead (a stream with a declared duration) its frames are
  ours or one later (docs/pipelines.md, Sampling);
* temporal, ``data.sampling`` segment (SSv2's): ``T`` segments of ``(L - 1) / T`` frames, a random frame per segment
  (train) or its middle;
* spatial (train): short side jittered to ``round(uniform(lo, hi))`` (or the inverse-uniform variant), a random
  ``crop x crop`` window in that resized frame, horizontal flip with p = 0.5; (test) short side resized to the crop
  size, then the left/centre/right (top/centre/bottom for portrait video) window.

The crop window is mapped back to the source frame and rounded to whole source pixels; loaders cut it out of the
decoded uint8 frames and resize that window to ``crop x crop`` (bilinear, half-pixel centres).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ClipPlan:
    """One clip to produce: the video, its frame indices and crop window (source pixels), and the flip."""

    index: int  # video index in the manifest
    path: str
    label: int
    frames: np.ndarray  # (T,) int64 frame indices into the decoded video
    window: tuple[int, int, int, int]  # (y0, x0, h, w) in source pixels
    flip: bool = False
    video_frames: int = 0  # the video's frames as the pre-flight check counted them (0: unknown)
    video_size: tuple[int, int] = (0, 0)  # its (height, width) as the pre-flight check read them ((0, 0): unknown)


def clip_size(num_frames: int, sampling_rate: int, target_fps: float, fps: float) -> float:
    """Source frames spanned by one clip: ``sampling_rate * num_frames`` frames at ``target_fps``, in ``fps`` frames."""
    return sampling_rate * num_frames / target_fps * fps


def get_start_end_idx(video_size: int, size: float, clip_idx: int, num_clips: int,
                      rng: np.random.Generator | None = None) -> tuple[float, float]:
    """The clip window ``[start, end]`` (floats): random when ``clip_idx == -1``, else clip ``clip_idx`` of
    ``num_clips`` uniform windows."""
    delta = max(video_size - size, 0.0)
    if clip_idx == -1:
        assert rng is not None, "a random clip needs an rng"
        start = rng.uniform(0, delta)
    else:
        start = delta * clip_idx / num_clips
    return start, start + size - 1


def temporal_indices(start: float, end: float, num_frames: int, video_size: int) -> np.ndarray:
    """``linspace(start, end, T)`` clamped to ``[0, video_size - 1]`` and truncated, as the original."""
    return temporal_indices_many([start], [end], num_frames, [video_size])[0]


def temporal_indices_many(starts: Sequence[float], ends: Sequence[float], num_frames: int,
                          video_sizes: Sequence[int]) -> np.ndarray:
    """``temporal_indices`` of many clips at once, (N, T) int64: ``np.linspace``'s own float operations (start + k *
    step, the last index ``end``) over a batch, so each row equals the per-clip ``linspace`` bit for bit, without its
    per-call cost (a train epoch plans every clip at its start)."""
    starts, ends = np.asarray(starts, np.float64), np.asarray(ends, np.float64)
    if num_frames == 1:
        idx = starts[:, None].copy()
    else:
        step = (ends - starts) / (num_frames - 1)
        idx = np.arange(num_frames, dtype=np.float64) * step[:, None] + starts[:, None]
        idx[:, -1] = ends
    return np.clip(idx, 0, np.asarray(video_sizes)[:, None] - 1).astype(np.int64)


def kinetics_frames(video_size: int, fps: float, num_frames: int, sampling_rate: int, target_fps: float,
                    clip_idx: int = -1, num_clips: int = 1, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices of one Kinetics-style clip (fps-aware window, linspace sampling)."""
    size = clip_size(num_frames, sampling_rate, target_fps, fps)
    start, end = get_start_end_idx(video_size, size, clip_idx, num_clips, rng)
    return temporal_indices(start, end, num_frames, video_size)


def segment_frames(video_size: int, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """SSv2 segment sampling: one frame per segment, random within it (``rng`` given) or its middle."""
    seg = (video_size - 1) / num_frames
    out = np.empty(num_frames, dtype=np.int64)
    for i in range(num_frames):
        start, end = int(np.round(seg * i)), int(np.round(seg * (i + 1)))
        out[i] = rng.integers(start, end + 1) if rng is not None else (start + end) // 2
    return out


def _resized(h: int, w: int, short: int) -> tuple[int, int]:
    """Frame size after resizing the short side to ``short`` (long side floored, as the original)."""
    if w < h:
        return int(math.floor(h / w * short)), short
    return short, int(math.floor(w / h * short))


def _to_source(h: int, w: int, rh: int, rw: int, y: int, x: int, crop: int) -> tuple[int, int, int, int]:
    """Map a ``crop x crop`` window at (y, x) of an (rh, rw) resize back to whole source pixels of (h, w).

    One scale (the short side's) for both axes, so the source window is square."""
    s = h / rh if h <= w else w / rw
    ch, cw = max(1, min(h, round(crop * s))), max(1, min(w, round(crop * s)))
    y0, x0 = min(round(y * s), h - ch), min(round(x * s), w - cw)
    return max(0, y0), max(0, x0), ch, cw


def train_window(h: int, w: int, jitter: tuple[int, int] | list[int], crop: int, rng: np.random.Generator,
                 inv_uniform: bool = False) -> tuple[int, int, int, int]:
    """Random-scale, random-position crop window (source pixels) of an (h, w) video."""
    lo, hi = jitter
    if inv_uniform:
        short = int(round(1.0 / rng.uniform(1.0 / hi, 1.0 / lo)))
    else:
        short = int(round(rng.uniform(lo, hi)))
    rh, rw = _resized(h, w, short)
    y = int(rng.integers(0, rh - crop)) if rh > crop else 0
    x = int(rng.integers(0, rw - crop)) if rw > crop else 0
    return _to_source(h, w, rh, rw, y, x, crop)


def test_window(h: int, w: int, crop: int, spatial_idx: int) -> tuple[int, int, int, int]:
    """Window ``spatial_idx`` (0 left/top, 1 centre, 2 right/bottom) after resizing the short side to ``crop``."""
    assert spatial_idx in (0, 1, 2), f"spatial_idx={spatial_idx}"
    rh, rw = _resized(h, w, crop)
    y = int(math.ceil((rh - crop) / 2)) if rh > crop else 0
    x = int(math.ceil((rw - crop) / 2)) if rw > crop else 0
    if rh > rw:  # portrait: top / centre / bottom
        y = {0: 0, 1: y, 2: rh - crop}[spatial_idx]
    else:
        x = {0: 0, 1: x, 2: rw - crop}[spatial_idx]
    y0, x0, ch, cw = _to_source(h, w, rh, rw, y, x, crop)
    if spatial_idx == 2:  # flush with the bottom/right border (the long side's floor may leave a pixel)
        y0, x0 = (h - ch, x0) if rh > rw else (y0, w - cw)
    return y0, x0, ch, cw
