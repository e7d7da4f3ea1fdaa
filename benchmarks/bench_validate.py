"""Cost of the pre-flight check in files/s: the probe (``timesformer_harness.pipelines.validate.probe_all``) and the
deep check (``deep_check``: every packet decoded) on 1 and 2 processes, cold and from its cache; and what a damaged file
costs a DALI epoch without it (``--repair``: the batch that fails and is repaired vs the others).
``python -m timesformer_harness.benchmarks.bench_validate [--rounds 3] [--repair] [--out runs/bench/validate.json]``

Sets: the toy clips (``make data``: 32x32 VP9, 24 frames), and 320x240 clips of 300 frames (10 s at 30 fps) in VP9
(keyframe every 32 frames) and in MJPEG (every frame a keyframe, as ``timesformer_harness.pipelines.tools.prepare``
writes for DALI on CPU). Rounds interleave the cases, so that load from other processes hits them alike; reported: the
median. This module imports neither torch nor DALI: a worker process of the pools imports the main module first, so the
numbers are those of ``python -m timesformer_harness.pipelines.validate`` (from a training process, ``data.validate:
deep``, each worker first imports the training entry point: seconds, once per pool).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from timesformer_harness.config import REPO_ROOT
from timesformer_harness.common import setup_logging
from timesformer_harness.pipelines.tools.encode import write_video
from timesformer_harness.pipelines.validate import deep_check, probe_all

def textured(i: int, frames: int, height: int, width: int) -> Iterator[np.ndarray]:
    """Smooth moving (H, W, 3) uint8 frames of clip ``i``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for t in range(frames):
        yield np.stack([128 + 100 * np.sin(xx / (9 + 4 * c) + 0.2 * t + i) * np.cos(yy / (11 + c) - 0.1 * t)
                        for c in range(3)], -1).clip(0, 255).astype(np.uint8)


def make_clips(folder: Path, codec: str, num: int, frames: int = 300, height: int = 240,
               width: int = 320) -> list[str]:
    """``num`` textured clips: ``vp9`` (webm, keyframe every 32 frames, realtime encoder) or ``mjpeg`` (avi)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num):
        if codec == "vp9":
            path, args = folder / f"clip{i:03d}.webm", ("libvpx-vp9", 30, {"deadline": "realtime", "cpu-used": "8",
                                                                         "crf": "30", "b": "0", "g": "32"})
        else:
            path, args = folder / f"clip{i:03d}.avi", ("mjpeg", 30, {"q:v": "4"})
        if not path.exists():
            write_video(path, textured(i, frames, height, width), *args,
                        pix_fmt="yuvj420p" if codec == "mjpeg" else "yuv420p")
        paths.append(str(path))
    return paths


def damage_one_frame(src: str, dst: Path) -> Path:
    """A copy of ``src`` with the first 8 bytes of its middle coded frame overwritten (the container intact: the
    probe passes it, a decoder fails on it)."""
    import av

    data = bytearray(Path(src).read_bytes())
    with av.open(src) as container:
        payloads = [bytes(p) for p in container.demux(video=0) if p.size]
    at = data.find(payloads[len(payloads) // 2])
    data[at:at + 8] = np.random.default_rng(0).integers(0, 256, 8, dtype=np.uint8).tobytes()
    dst.write_bytes(data)
    return dst


def repair_cost(paths: list[str], tmp: Path, epochs: int) -> dict[str, float]:
    """Seconds per batch of DALI CPU train epochs (8 frames x rate 8, crop 224, batches of 8) over ``paths`` with the
    first one damaged: the batch that failed and was repaired, and the median of the others."""
    import torch  # loaders only here, so that the pool workers of the cases above stay light

    from timesformer_harness.metrics import timed_items
    from timesformer_harness.pipelines.factory import build_loader
    from timesformer_harness.pipelines.config import DataConfig

    bad = damage_one_frame(paths[0], tmp / "damaged.webm")
    manifest = tmp / "repair.csv"
    manifest.write_text("".join(f"{p} {i % 4}\n" for i, p in enumerate([str(bad), *paths[1:]])))
    cfg = DataConfig(loader="dali", backend="cpu", train_manifest=str(manifest), num_frames=8, sampling_rate=8,
                     train_jitter_scales=[256, 320], train_crop_size=224, batch_size=8, num_workers=2,
                     on_bad_video="skip", max_bad_fraction=1.0, validate_cache="none")
    loader = build_loader(cfg, "train")
    failed, others = [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        before = len(loader.quarantine.entries)
        for k, (_, seconds) in enumerate(timed_items(loader, torch.device("cpu"))):
            if len(loader.quarantine.entries) > before:
                failed.append(seconds)
                before = len(loader.quarantine.entries)
            elif k > 0:  # the first batch of an epoch also builds or resets the pipeline
                others.append(seconds)
    return {"failed_batch_s": statistics.median(failed) if failed else float("nan"),
            "other_batches_median_s": statistics.median(others), "failed_batches": len(failed)}


def rate(fn: Callable[[], object], files: int) -> float:
    """Files per second of ``fn``. Its own clock, not ``timesformer_harness.metrics``: that imports torch, and the
    probe's worker pools are to start from a process without it, as the validator's own do."""
    t0 = time.perf_counter()
    fn()
    return files / (time.perf_counter() - t0)


def bench_set(paths: list[str], rounds: int, tmp: Path) -> dict[str, float]:
    """Median files/s per case over ``rounds`` interleaved rounds (each cold case on a fresh cache file)."""
    cached = tmp / "warm.sqlite"
    deep_check(paths, cached, workers=2)  # fills the cache the "cached" case reads
    cases: dict[str, Callable[[int], object]] = {
        "probe, 2 processes": lambda r: probe_all(paths, cache=None, workers=2),
        "deep, 1 process": lambda r: deep_check(paths, tmp / f"cold1_{r}.sqlite", workers=1),
        "deep, 2 processes": lambda r: deep_check(paths, tmp / f"cold2_{r}.sqlite", workers=2),
        "deep, from the cache": lambda r: deep_check(paths, cached, workers=2),
    }
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(rounds):
        for name, fn in cases.items():
            rates[name].append(rate(lambda: fn(r), len(paths)))
    return {name: statistics.median(v) for name, v in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.benchmarks.bench_validate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--toy-files", type=int, default=256)
    parser.add_argument("--big-files", type=int, default=8, help="320x240x300 files per codec")
    parser.add_argument("--data", default=str(REPO_ROOT / "data/toy"), help="toy dataset (make data)")
    parser.add_argument("--repair", type=int, default=0, metavar="EPOCHS",
                        help="also time DALI epochs over 40 320x240x300 VP9 clips, one damaged (0 = skip)")
    parser.add_argument("--out", default="runs/bench/validate.json")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        toy = sorted(str(p) for p in (Path(args.data) / "train").glob("*.webm"))[:args.toy_files]
        if not toy:
            raise SystemExit(f"no toy clips in {args.data}/train: run make data")
        vp9 = make_clips(root / "vp9", "vp9", args.big_files)
        mjpeg = make_clips(root / "mjpeg", "mjpeg", args.big_files)
        sets = [(f"toy 32x32x24 VP9 ({len(toy)})", toy), (f"320x240x300 VP9 ({len(vp9)})", vp9),
                (f"320x240x300 MJPEG ({len(mjpeg)})", mjpeg)]
        for i, (name, paths) in enumerate(sets):
            results[name] = bench_set(paths, args.rounds, root / f"caches{i}")  # caches: created on first use
        if args.repair:
            clips = make_clips(root / "vp9", "vp9", 40)
            results["repair"] = repair_cost(clips, root, args.repair)
    repair = results.pop("repair", None)
    cases = list(next(iter(results.values())))
    print(f"{'files/s (median)':<28}" + "".join(f"{c:>22}" for c in cases))
    for name, r in results.items():
        print(f"{name:<28}" + "".join(f"{r[c]:22.1f}" for c in cases))
    if repair:
        print(f"DALI epochs with a damaged file: the batch that failed and was repaired "
              f"{repair['failed_batch_s']:.2f} s ({repair['failed_batches']} such batch(es)), the others "
              f"{repair['other_batches_median_s']:.2f} s (median)")
        results["repair"] = repair
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
