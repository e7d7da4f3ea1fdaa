"""Decode cost: how many frames a decoder must decode to deliver one clip, from a file's keyframe positions.

A clip of T frames at sampling rate R spans ``R * T / target_fps * fps`` source frames
(``timesformer_harness.pipelines.sampling``; 256 frames for 8x32 at 30 fps). An inter-coded stream can only be decoded
forward from a keyframe, so delivering frame ``f`` costs every frame from the keyframe before ``f`` (or from where the
decoder already is) up to ``f``. The ratio decoded / delivered is what a long GOP costs and what re-keying buys
(``timesformer_harness.pipelines.tools.prepare``).

Three decoders are modelled, in presentation order (exact for codecs without B-frames: VP8/VP9/MJPEG; within a
few frames for H.264/HEVC with B-frames):

* ``keyframe``: for each wanted frame, decode from its keyframe unless that keyframe is at or before the frame the
  decoder is at (then decode on): the fewest frames any keyframe-seeking decoder can decode
  (``timesformer_harness.pipelines.packets.keyframe_segments``). The harness's loaders follow it: the DALI loader feeds
  ``fn.decoders.video`` exactly these packets per clip (``timesformer_harness.pipelines.packets.plan_packets``), and the
  PyAV loader seeks per segment (``timesformer_harness.pipelines.pyav.decode_clip``).
* ``seek``: DALI's ``FramesDecoderBase::SeekFrame`` rule, one decoder per clip starting at frame 0: a wanted frame
  more than 10 frames ahead (or behind) of the decoder's position makes it seek to the wanted frame's keyframe,
  unless that is the keyframe it is already decoding from; otherwise it decodes forward. Measured on DALI 2.4 CPU,
  ``fn.experimental.readers.video`` (the file reader) behaves like this: one frame deep in an MJPEG file costs the
  same as the first frame.
* ``from_start``: decode from frame 0 through the last wanted frame, whatever the keyframes. Measured on DALI 2.4
  CPU, ``fn.decoders.video`` given a whole file in memory behaves like this, with or without ``build_index``: its
  time per clip grows linearly with the last frame index for VP9 (long GOP and GOP 32) and MJPEG alike. The DALI
  loader falls back to it for files it cannot cut into clip streams
  (``timesformer_harness.pipelines.packets.feed_mode``).

``estimate`` gives the expected count per delivered clip: train = expectation over the clip's uniform random start
(exact: the frame indices are piecewise constant in the start, so the expectation is a finite weighted sum), test =
mean over the ``num_clips`` uniform test clips. ``count_decoded_frames`` decodes a clip with PyAV following the same
seeks and counts the frames that come out of the decoder: the measured figure to put beside the estimate.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from timesformer_harness.pipelines import sampling
from timesformer_harness.pipelines.packets import index_packets, keyframe_segments
from timesformer_harness.pipelines.progress import LOG_EVERY_S, Progress

logger = logging.getLogger(__name__)

STRATEGIES = ("keyframe", "seek", "from_start")
DALI_SEEK_LEAP = 10  # DALI's MINIMUM_SEEK_LEAP: a frame this close ahead is reached by decoding forward
MAX_STARTS = 4096  # above this many distinct train starts, integrate on a midpoint grid instead


@dataclass(frozen=True)
class GopInfo:
    """A video's frame count, frame rate and keyframe positions (presentation-order frame indices)."""

    path: str
    num_frames: int
    fps: float
    keyframes: tuple[int, ...]

    @property
    def max_gop(self) -> int:
        """Longest distance between consecutive keyframes (the end of the video closes the last GOP)."""
        bounds = list(self.keyframes) + [self.num_frames]
        return max(b - a for a, b in zip(bounds, bounds[1:]))


def read_gop(path: str | os.PathLike) -> GopInfo:
    """Keyframe positions of ``path``'s first video stream, read by demuxing (no decoding). Raises on a bad file."""
    index = index_packets(path, offsets=False)
    return GopInfo(str(path), index.num_frames, index.fps, tuple(index.keyframes))


def _last_keyframe(keyframes: Sequence[int], f: int) -> int:
    return keyframes[bisect.bisect_right(keyframes, f) - 1]


def decode_plan(frames: Sequence[int], keyframes: Sequence[int], num_frames: int,
                strategy: str = "seek") -> list[tuple[int | None, int]]:
    """How ``strategy`` reaches ``frames``: a list of (keyframe to seek to first or None, frame to decode up to)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; choose from {list(STRATEGIES)}")
    wanted = sorted({min(max(int(f), 0), num_frames - 1) for f in frames})
    if not wanted:
        return []
    if strategy == "from_start":
        return [(None, wanted[-1])]
    if strategy == "keyframe":
        plan, pos = [], 0
        for k, end in keyframe_segments(keyframes, wanted):
            inside = [f for f in wanted if k <= f <= end]
            plan += [(k if k > pos else None, inside[0])] + [(None, f) for f in inside[1:]]
            pos = end + 1
        return plan
    plan, pos = [], 0  # pos = the next frame the decoder will output
    for f in wanted:
        seek = None
        if f < pos or f > pos + DALI_SEEK_LEAP:
            k = _last_keyframe(keyframes, f)
            if f < pos or pos >= num_frames or _last_keyframe(keyframes, pos) != k:
                seek = k
        plan.append((seek, f))
        pos = f + 1
    return plan


def decoded_frames(frames: Sequence[int], keyframes: Sequence[int], num_frames: int, strategy: str = "seek") -> int:
    """Frames ``strategy`` decodes to deliver ``frames`` (presentation indices) of a video with these keyframes."""
    total, pos = 0, 0
    for seek, f in decode_plan(frames, keyframes, num_frames, strategy):
        if seek is not None:
            pos = seek
        total += f - pos + 1
        pos = f + 1
    return total


def _train_starts(video_size: int, size: float, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Representative starts and their probabilities for a start uniform in ``[0, delta]``.

    Frame ``k`` of the clip is ``floor(start + k * d)`` with ``d = (size - 1) / (T - 1)``, so the indices change only
    where ``start + k * d`` crosses an integer: between those breakpoints any start (the midpoint) stands for all.
    """
    delta = max(video_size - size, 0.0)
    if delta <= 0:
        return np.zeros(1), np.ones(1)
    d = (size - 1) / (num_frames - 1) if num_frames > 1 else 0.0
    cuts = [0.0, delta]
    for k in range(num_frames):
        lo, hi = math.ceil(k * d), math.floor(delta + k * d)
        if hi - lo + 1 > MAX_STARTS:
            cuts = list(np.linspace(0.0, delta, MAX_STARTS + 1))
            break
        cuts.extend(j - k * d for j in range(lo, hi + 1))
    edges = np.unique(np.clip(np.asarray(cuts), 0.0, delta))
    widths = np.diff(edges)
    keep = widths > 0
    return (edges[:-1] + edges[1:])[keep] / 2, widths[keep] / delta


@dataclass(frozen=True)
class ClipCost:
    """Expected frames decoded per delivered clip of ``clip_frames`` frames."""

    train: float  # expectation over the random start of a train clip
    test: float  # mean over the uniform test clips
    clip_frames: int

    @property
    def train_per_frame(self) -> float:
        return self.train / self.clip_frames

    @property
    def test_per_frame(self) -> float:
        return self.test / self.clip_frames


def estimate(gop: GopInfo, frames: int, sampling_rate: int, target_fps: float, num_clips: int = 1,
             strategy: str = "seek") -> ClipCost:
    """Expected frames decoded per delivered clip of ``gop``'s video (Kinetics sampling,
    ``timesformer_harness.pipelines.sampling``)."""
    n, fps = gop.num_frames, gop.fps or target_fps
    size = sampling.clip_size(frames, sampling_rate, target_fps, fps)
    starts, probs = _train_starts(n, size, frames)
    train = sum(p * decoded_frames(sampling.temporal_indices(s, s + size - 1, frames, n), gop.keyframes, n, strategy)
                for s, p in zip(starts, probs))
    tests = [decoded_frames(sampling.kinetics_frames(n, fps, frames, sampling_rate, target_fps, i, num_clips),
                            gop.keyframes, n, strategy) for i in range(num_clips)]
    return ClipCost(float(train), float(np.mean(tests)), frames)


def _one(args: tuple[str, int, int, float, int, tuple[str, ...]]) -> tuple[str, dict[str, ClipCost] | None, str]:
    path, frames, rate, fps, clips, strategies = args
    try:
        gop = read_gop(path)
        return path, {s: estimate(gop, frames, rate, fps, clips, s) for s in strategies}, ""
    except Exception as e:  # a bad file is reported, not fatal (pipelines/validate.py says why in detail)
        return path, None, f"{type(e).__name__}: {e}"


def estimate_manifest_decode_cost(paths: Sequence[str], frames: int, sampling_rate: int, target_fps: float,
                                  num_clips: int = 1, strategies: Sequence[str] = STRATEGIES, workers: int = 0,
                                  max_files: int | None = None, show_progress: bool = False,
                                  progress_every_s: float = LOG_EVERY_S) -> dict:
    """Decode cost over a manifest's files: median and worst file, for train and test clips, per decoder model.

    Args:
        paths: video files.
        frames, sampling_rate, target_fps: the clip spec (data.num_frames, data.sampling_rate, data.target_fps).
        num_clips: test clips per video (data.num_ensemble_views).
        strategies: decoder models (``keyframe``, ``seek``, ``from_start``; see the module docstring).
        workers: parallel threads (demuxing releases the GIL); 0 = one per CPU core.
        max_files: estimate on this many evenly spaced files only (None = all).
        show_progress: files done, as a bar on a terminal or a log line every ``progress_every_s`` seconds
            (``timesformer_harness.pipelines.progress``).

    Returns:
        ``{"clip_frames", "files" (estimated), "unreadable": [(path, reason)], "strategies": {name: {"train": {...},
        "test": {...}}}}`` where each split holds ``median``, ``worst``, ``worst_path`` (frames decoded per delivered
        clip) and ``median_per_frame``, ``worst_per_frame`` (per delivered frame); ``strategies`` is empty when no
        file could be read.
    """
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"strategy={s!r}; choose from {list(STRATEGIES)}")
    paths = [str(p) for p in paths]
    if max_files is not None and len(paths) > max_files:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, max_files).round()]
    workers = workers or os.cpu_count() or 1
    jobs = [(p, frames, sampling_rate, target_fps, num_clips, tuple(strategies)) for p in paths]
    results = []
    with ThreadPoolExecutor(max(1, min(workers, len(jobs) or 1))) as pool, \
            Progress("decode cost", len(jobs), show=show_progress, interval=progress_every_s) as progress:
        for result in pool.map(_one, jobs):
            results.append(result)
            progress.update()
    costs = [(p, c) for p, c, _ in results if c is not None]
    out: dict = {"clip_frames": frames, "files": len(costs), "strategies": {},
                 "unreadable": [(p, why) for p, c, why in results if c is None]}
    if not costs:
        return out
    for strategy in strategies:
        per_split = {}
        for split in ("train", "test"):
            values = [getattr(c[strategy], split) for _, c in costs]
            worst = int(np.argmax(values))
            median = float(statistics.median(values))
            per_split[split] = {"median": median, "worst": values[worst], "worst_path": costs[worst][0],
                                "median_per_frame": median / frames, "worst_per_frame": values[worst] / frames}
        out["strategies"][strategy] = per_split
    return out


STRATEGY_NOTES = {"keyframe": "from each frame's keyframe (the harness's DALI and PyAV loaders)",
                  "seek": "DALI's seek rule (DALI readers.video)",
                  "from_start": "decoding from frame 0 (DALI decoders.video given a whole file)"}


def format_decode_cost(cost: dict) -> str:
    """One line per decoder model for a CLI: decoded frames per delivered train clip (and per delivered frame),
    median and worst file, and the test-clip median."""
    if not cost["strategies"]:
        return f"decode cost: no readable file ({len(cost['unreadable'])} unreadable)"
    T = cost["clip_frames"]
    lines = [f"decode cost, frames decoded per delivered {T}-frame clip over {cost['files']} file(s):"]
    for strategy, c in cost["strategies"].items():
        tr, te = c["train"], c["test"]
        lines.append(f"  {STRATEGY_NOTES.get(strategy, strategy)}: train sampling median {tr['median']:.0f} "
                     f"({tr['median_per_frame']:.1f} per frame), worst {tr['worst']:.0f} ({tr['worst_path']}); "
                     f"test sampling median {te['median']:.0f}")
    return "\n".join(lines)


def count_decoded_frames(path: str | os.PathLike, frames: Sequence[int], strategy: str = "seek",
                         gop: GopInfo | None = None) -> int:
    """Decode the clip ``frames`` of ``path`` with PyAV, seeking as ``strategy`` does; count the decoded frames.

    Frames are identified by their presentation timestamp, so a seek that lands anywhere but on the planned
    keyframe shows up in the count. ``gop`` (from ``read_gop``) saves a demux pass when given.
    """
    import av

    path = str(path)
    gop = gop or read_gop(path)
    index = index_packets(path, offsets=False)
    pts_list = [int(index.pts[d]) for d in index.display]
    index_of = {p: i for i, p in enumerate(pts_list)}
    count = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        decoder = container.decode(stream)
        for seek, f in decode_plan(frames, gop.keyframes, gop.num_frames, strategy):
            if seek is not None:
                container.seek(pts_list[seek], stream=stream, backward=True, any_frame=False)
                decoder = container.decode(stream)
            for frame in decoder:
                count += 1
                if index_of.get(frame.pts, -1) >= f:
                    break
            else:
                raise RuntimeError(f"{path}: the stream ended before frame {f}")
    return count


def measure_clips(clips: Sequence[tuple[str, Sequence[int]]], strategy: str, max_clips: int = 16) -> dict:
    """Frames decoded per clip for real clips (e.g. ``[(p.path, p.frames) for p in loader.planner.plans(0)]``):
    counted by decoding with PyAV (``count_decoded_frames``) and predicted by the model, over the first
    ``max_clips`` clips. Returns ``{"strategy", "clips", "delivered_frames", "counted_per_clip", "model_per_clip",
    "counted_per_delivered_frame"}``."""
    clips = list(clips)[:max_clips]
    if not clips:
        raise ValueError("no clips to measure")
    gops = {str(p): read_gop(p) for p in {str(p) for p, _ in clips}}
    counted = [count_decoded_frames(p, f, strategy, gops[str(p)]) for p, f in clips]
    model = [decoded_frames(f, gops[str(p)].keyframes, gops[str(p)].num_frames, strategy) for p, f in clips]
    delivered = float(np.mean([len(f) for _, f in clips]))
    return {"strategy": strategy, "clips": len(clips), "delivered_frames": delivered,
            "counted_per_clip": float(np.mean(counted)), "model_per_clip": float(np.mean(model)),
            "counted_per_delivered_frame": float(np.mean(counted)) / delivered}
