"""The embedded toy dataset: short VP9 clips of a dot that changes colour; the class is the order of the colours.

``python -m timesformer_harness.pipelines.tools.toy --out data/toy`` (``make data``) writes ``{train,val,test}/*.webm``,
Kinetics-format manifests ``train.csv``/``val.csv``/``test.csv`` (``path label``, space-separated, paths relative to the
CSV's folder), ``classes.txt`` and ``spec.json``. Re-running with the same spec does nothing.

Every clip shows one dot, at a random place on a random grey background, that changes colour twice, at random
frames: it shows each of red, green and blue for a while. The class is the order of the three colours (6 classes,
``red_green_blue`` ... ``blue_green_red``).

So one frame, taken alone, is consistent with every class (its colour, the dot's position and the background have
the same distribution in all classes), and so is the *set* of a clip's frames: every clip holds the three colours.
Only the frame order tells the class. A model that averages per-frame features (``space_only``) is at chance by
construction; one that models time (``divided_space_time``, ``joint_space_time``) can learn it. The dot stands
still: a moving one would show its middle colour in the middle of its path, which a frame-averaging model can read
(why motion is not the cue: docs/results/2026-11-24-toy-recipe.md).

The three colours' shares of the sampled frames are exchangeable (a uniformly random split of the 8 sampled frames,
>= 2 per colour), so even the share of each colour does not tell its place in the order. Defaults:
32x32 px, 24 frames at 30 fps: with ``num_frames: 8, sampling_rate: 3`` (configs/data/toy.yaml) the clip is the
whole video (no temporal jitter that would cut the first or last colour short); the splits are made for that
sampling (``clip_frames``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from timesformer_harness.common import setup_logging
from timesformer_harness.pipelines.sampling import temporal_indices
from timesformer_harness.pipelines.tools.encode import write_video

logger = logging.getLogger(__name__)

COLOUR_NAMES = ("red", "green", "blue")
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [50, 80, 230]], dtype=np.float32)
ORDERS = tuple(itertools.permutations(range(3)))  # class k shows COLOURS[ORDERS[k][0]], then [1], then [2]
CLASSES = tuple("_".join(COLOUR_NAMES[c] for c in order) for order in ORDERS)
SPEC_VERSION = 4


@dataclass(frozen=True)
class ToySpec:
    """Everything that determines the dataset's bytes (saved as spec.json; a match makes a re-run a no-op)."""

    seed: int = 0
    size: int = 32
    frames: int = 24
    fps: int = 30
    radius: float = 8.0  # px: at 32 px the dot spans half the frame, 2x2 to 3x3 of the toy model's 8-px patches
    clip_frames: int = 8  # frames a loader samples per clip (linspace over the whole video, configs/data/toy.yaml)
    min_per_colour: int = 2  # fewest of those sampled frames that show one colour
    train: int = 2048
    val: int = 200
    test: int = 200
    crf: int = 32
    gop: int = 1  # all keyframes: no inter-frame artefact (a trace of the previous colour) tells the order
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.size < 2 * (self.radius + 1):
            raise ValueError(f"a {self.size}-px toy frame cannot hold the dot (radius {self.radius:g} px) with a pixel "
                             f"to spare: use a size of at least {int(2 * (self.radius + 1))}")


def clip_params(spec: ToySpec, split: str, i: int) -> dict:
    """The random parameters of clip ``i`` of ``split`` (deterministic in (seed, split, i))."""
    split_id = ("train", "val", "test").index(split)
    rng = np.random.default_rng((spec.seed, split_id, i))
    label = int(i % len(CLASSES)) if split != "train" else int(rng.integers(len(CLASSES)))
    # How many of the clip_frames sampled frames show the first, middle and last colour: uniform over all splits
    # with >= min_per_colour each (stars and bars), so exchangeable; no colour's share of the clip tells its place.
    # Counted on the frames the loader samples (linspace over the video, truncated, as
    # timesformer_harness.pipelines.sampling): counted in source frames, the truncated grid's uneven gaps would leak the
    # order to a frame-averaging model.
    grid = temporal_indices(0, spec.frames - 1, spec.clip_frames, spec.frames)
    free = spec.clip_frames - 3 * spec.min_per_colour
    bars = np.sort(rng.choice(free + 2, 2, replace=False))
    first = spec.min_per_colour + int(bars[0])
    middle = spec.min_per_colour + int(bars[1] - bars[0] - 1)
    # each switch falls at a random source frame after the last sampled frame of one colour, up to the first of the next
    switches = [int(rng.integers(grid[k - 1] + 1, grid[k] + 1)) for k in (first, first + middle)]
    lo = spec.radius + 1
    return {"label": label, "colours": list(ORDERS[label]), "switches": switches,
            "centre": rng.uniform(lo, spec.size - lo, size=2).tolist(),
            "background": float(rng.uniform(30, 110))}


def colour_at(p: dict, t: int) -> int:
    """The index into COLOURS of the dot's colour in frame ``t``."""
    return p["colours"][sum(t >= s for s in p["switches"])]


def render_clip(spec: ToySpec, p: dict) -> np.ndarray:
    """Frames (F, S, S, 3) uint8 of one clip: an anti-aliased dot."""
    S, F = spec.size, spec.frames
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    out = np.empty((F, S, S, 3), dtype=np.uint8)
    for t in range(F):
        cx, cy = p["centre"]
        dx, dy = xx - cx, yy - cy
        alpha = np.clip(spec.radius + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)[..., None]
        colour = COLOURS[colour_at(p, t)]
        out[t] = (alpha * colour + (1 - alpha) * p["background"]).round().astype(np.uint8)
    return out


def write_webm(path: Path, frames: np.ndarray, fps: int, crf: int = 32, gop: int = 16) -> None:
    """Encode (F, H, W, 3) uint8 RGB frames as VP9 in WebM (libvpx-vp9, realtime speed), atomically; same frames
    give the same bytes."""
    write_video(path, frames, "libvpx-vp9", fps, bitexact=True,
                options={"deadline": "realtime", "cpu-used": "8", "crf": str(crf), "b": "0", "g": str(gop)})


def _make_one(args: tuple[ToySpec, str, int, str]) -> tuple[str, int]:
    spec, split, i, out = args
    p = clip_params(spec, split, i)
    rel = f"{split}/{split}_{i:05d}.webm"
    write_webm(Path(out) / rel, render_clip(spec, p), spec.fps, spec.crf, spec.gop)
    return rel, p["label"]


def _spec_json(spec: ToySpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True, indent=1)


def _missing_videos(out: Path) -> list[str]:
    """The videos the dataset's CSVs list that are not there, or empty (a damaged copy)."""
    listed = [line.rsplit(" ", 1)[0] for s in ("train", "val", "test")
              for line in (out / f"{s}.csv").read_text().splitlines() if line.strip()]
    return [rel for rel in listed if not (out / rel).is_file() or (out / rel).stat().st_size == 0]


def generate(out: str | Path, spec: ToySpec = ToySpec(), workers: int | None = None) -> bool:
    """Write the toy dataset into ``out``. Returns False when an identical one is already there (nothing done)."""
    out = Path(out)
    spec_file = out / "spec.json"
    if spec_file.is_file() and spec_file.read_text() == _spec_json(spec) and all(
            (out / f"{s}.csv").is_file() for s in ("train", "val", "test")):
        missing = _missing_videos(out)
        if not missing:
            logger.info("%s already holds this toy dataset (spec.json matches): nothing to do", out)
            return False
        logger.warning("%s: %d listed video(s) missing or empty (%s): writing the dataset again", out, len(missing),
                       ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else ""))
    spec_file.unlink(missing_ok=True)  # written last: its presence marks a complete dataset
    jobs = []
    for split in ("train", "val", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
        jobs += [(spec, split, i, str(out)) for i in range(getattr(spec, split))]
    t0 = time.perf_counter()
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_make_one, jobs, chunksize=16))
    else:
        rows = [_make_one(j) for j in jobs]
    for split in ("train", "val", "test"):
        lines = [f"{rel} {label}" for rel, label in rows if rel.startswith(f"{split}/")]
        (out / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    spec_file.write_text(_spec_json(spec))
    logger.info("wrote %d toy clips (%dx%d px, %d frames) to %s in %.1f s", len(rows), spec.size, spec.size,
                spec.frames, out, time.perf_counter() - t0)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.pipelines.tools.toy",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/toy", help="output folder (default data/toy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="frame width = height in px")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--train", type=int, default=2048, help="number of train clips")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="encoder processes (0 = one per CPU core)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.frames < 24:
        parser.error("--frames must be >= 24 (configs/data/toy.yaml samples 8 frames at rate 3)")
    try:
        spec = ToySpec(seed=args.seed, size=args.size, frames=args.frames, train=args.train, val=args.val,
                       test=args.test)
    except ValueError as e:
        parser.error(f"--size {args.size}: {e}")
    generate(args.out, spec, workers=args.workers or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
