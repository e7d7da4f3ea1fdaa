"""The embedded toy dataset: short VP9 clips of a moving dot whose class is only visible over time.

``python -m pipelines.toy --out data/toy`` writes ``{train,val,test}/*.webm``, Kinetics-format manifests
``train.csv``/``val.csv``/``test.csv`` (``path label``, space-separated, paths relative to the CSV's folder),
``classes.txt`` and ``spec.json``. Re-running with the same spec does nothing.

Every clip shows one dot (colour A = red or B = green) on a random grey background, moving at a constant speed
on a torus (it wraps around the edges, so its position in any frame is uniform whatever the class):

* classes 0-3 (``moves_left/right/up/down``): the dot keeps one colour (A or B, 50/50) and moves that way;
* classes 4-5 (``red_then_green``/``green_then_red``): the dot moves in a random one of the 4 directions and
  switches colour once, at a random frame in the middle of the clip.

So one frame (a dot of colour A or B somewhere) is consistent with every class: position, colour and background
have the same distribution in all classes; only the direction of motion or the order of colours tells the class.
Defaults: 64x64 px, 32 frames at 30 fps. With ``num_frames: 8, sampling_rate: 3`` (configs/data/toy.yaml) a clip
spans 24 source frames; any such window holds >= 2 sampled frames on each side of a colour switch (switch frame in
[12, 20]). Do not train with horizontal flips: a flip turns ``moves_left`` into ``moves_right``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

logger = logging.getLogger(__name__)

CLASSES = ("moves_left", "moves_right", "moves_up", "moves_down", "red_then_green", "green_then_red")
COLOURS = np.array([[220, 40, 40], [40, 200, 40]], dtype=np.float32)  # A = red, B = green
DIRECTIONS = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.float32)  # (dx, dy) for left/right/up/down
SPEC_VERSION = 2


@dataclass(frozen=True)
class ToySpec:
    """Everything that determines the dataset's bytes (saved as spec.json; a match makes a re-run a no-op)."""

    seed: int = 0
    size: int = 64
    frames: int = 32
    fps: int = 30
    radius: float = 6.0
    speed: tuple[float, float] = (1.0, 1.6)  # px per frame
    switch: tuple[int, int] = (12, 20)  # colour-switch frame range (inclusive) for classes 4-5
    train: int = 1000
    val: int = 200
    test: int = 200
    crf: int = 32
    gop: int = 16
    version: int = SPEC_VERSION


def clip_params(spec: ToySpec, split: str, i: int) -> dict:
    """The random parameters of clip ``i`` of ``split`` (deterministic in (seed, split, i))."""
    split_id = ("train", "val", "test").index(split)
    rng = np.random.default_rng((spec.seed, split_id, i))
    label = int(i % len(CLASSES)) if split != "train" else int(rng.integers(len(CLASSES)))
    if label < 4:
        direction, colours, switch = label, [int(rng.integers(2))] * 2, spec.frames
    else:
        direction = int(rng.integers(4))
        colours = [0, 1] if label == 4 else [1, 0]
        switch = int(rng.integers(spec.switch[0], spec.switch[1] + 1))
    return {"label": label, "direction": direction, "colours": colours, "switch": switch,
            "start": rng.uniform(0, spec.size, size=2).tolist(),
            "speed": float(rng.uniform(*spec.speed)),
            "background": float(rng.uniform(30, 110))}


def render_clip(spec: ToySpec, p: dict) -> np.ndarray:
    """Frames (F, S, S, 3) uint8 of one clip: an anti-aliased dot on a torus."""
    S, F = spec.size, spec.frames
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    out = np.empty((F, S, S, 3), dtype=np.uint8)
    step = DIRECTIONS[p["direction"]] * p["speed"]
    for t in range(F):
        cx, cy = (np.asarray(p["start"], dtype=np.float32) + step * t) % S
        dx = np.abs(xx - cx)
        dy = np.abs(yy - cy)
        dx, dy = np.minimum(dx, S - dx), np.minimum(dy, S - dy)  # torus distance
        alpha = np.clip(spec.radius + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)[..., None]
        colour = COLOURS[p["colours"][0] if t < p["switch"] else p["colours"][1]]
        out[t] = (alpha * colour + (1 - alpha) * p["background"]).round().astype(np.uint8)
    return out


def write_webm(path: Path, frames: np.ndarray, fps: int, crf: int = 32, gop: int = 16) -> None:
    """Encode (F, H, W, 3) uint8 RGB frames as VP9 in WebM (libvpx-vp9, realtime speed), atomically; same frames
    give the same bytes."""
    tmp = path.with_suffix(".tmp.webm")
    with av.open(str(tmp), "w", options={"fflags": "+bitexact"}) as container:  # no random UIDs: same bytes
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": str(crf), "b": "0", "g": str(gop)}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _make_one(args: tuple[ToySpec, str, int, str]) -> tuple[str, int]:
    spec, split, i, out = args
    p = clip_params(spec, split, i)
    rel = f"{split}/{split}_{i:05d}.webm"
    write_webm(Path(out) / rel, render_clip(spec, p), spec.fps, spec.crf, spec.gop)
    return rel, p["label"]


def _spec_json(spec: ToySpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True, indent=1)


def generate(out: str | Path, spec: ToySpec = ToySpec(), workers: int | None = None) -> bool:
    """Write the toy dataset into ``out``. Returns False when an identical one is already there (nothing done)."""
    out = Path(out)
    spec_file = out / "spec.json"
    if spec_file.is_file() and spec_file.read_text() == _spec_json(spec) and all(
            (out / f"{s}.csv").is_file() for s in ("train", "val", "test")):
        logger.info("%s already holds this toy dataset (spec.json matches): nothing to do", out)
        return False
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
    parser = argparse.ArgumentParser(prog="python -m pipelines.toy", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/toy", help="output folder (default data/toy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="frame width = height in px")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--train", type=int, default=1000, help="number of train clips")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="encoder processes (0 = one per CPU core)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.frames < 24 or args.size < 16:
        parser.error("--frames must be >= 24 (the colour switch lies in frames 12-20) and --size >= 16")
    spec = ToySpec(seed=args.seed, size=args.size, frames=args.frames, train=args.train, val=args.val,
                   test=args.test)
    generate(args.out, spec, workers=args.workers or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
