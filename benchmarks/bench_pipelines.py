"""Input-pipeline throughput, the loader shoot-out (``timesformer_harness.bench.pipeline``) on the toy data and on
320x240 VP9 clips: our DALI loader (CPU, full graph and decode-only), the PyAV loader, torchcodec and decord when they
import. ``python -m timesformer_harness.benchmarks.bench_pipelines [--rounds 5] [--out runs/bench/pipelines.json]``

Each row is a loader built once; a round times one full epoch of it (from ``iter()`` to the last batch, so start-up
and prefetch are inside the timing), and rounds interleave the rows of both datasets (A B C A B C ...) so that load
from other processes on a shared machine hits them alike. Reported per row: median clips/s, CPU ms per clip, frames
decoded per clip, the ratio to decord and DALI's full graph over its decode-only rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from timesformer_harness.config import CONFIG_DIR, REPO_ROOT, load_config
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.common import setup_logging
from timesformer_harness.pipelines.tools.encode import write_video

logger = logging.getLogger(__name__)


def write_clips(folder: Path, name: str, num: int, frames_of: Callable[[int], Iterable[np.ndarray]], codec: str,
                options: dict[str, str], fps: int = 30) -> Path:
    """Encode clip ``i`` = ``frames_of(i)`` ((H, W, 3) uint8 RGB frames) for i < ``num`` into ``folder`` (atomically;
    existing files are kept) and write a ``path label`` manifest ``train.csv`` (labels ``i % 4``)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num):
        path = folder / name.format(i=i)
        lines.append(f"{path.name} {i % 4}")
        if path.exists():
            continue
        write_video(path, frames_of(i), codec, fps, options)
    manifest = folder / "train.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def make_vp9_clips(folder: Path, num: int, frames: int = 96, height: int = 240, width: int = 320) -> Path:
    """``num`` textured 320x240 VP9 clips (GOP 32, realtime encoder) and a ``path label`` manifest."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    def frames_of(i: int) -> Iterator[np.ndarray]:
        for t in range(frames):
            yield np.stack([128 + 100 * np.sin(xx / (9 + 4 * c) + 0.2 * t + i) * np.cos(yy / (11 + c) - 0.1 * t)
                            for c in range(3)], -1).clip(0, 255).astype(np.uint8)

    return write_clips(folder, "clip{i:03d}.webm", num, frames_of, "libvpx-vp9",
                       {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0", "g": "32"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.benchmarks.bench_pipelines",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--toy-clips", type=int, default=128, help="toy train clips per epoch")
    parser.add_argument("--vp9-clips", type=int, default=48, help="320x240 clips per epoch")
    parser.add_argument("--out", default="runs/bench/pipelines.json")
    parser.add_argument("--data", default=str(REPO_ROOT / "data/toy"), help="toy dataset (make data)")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    torch.set_num_threads(1)
    from timesformer_harness.bench.pipeline import format_shootout, run_shootout, shootout_contenders

    with tempfile.TemporaryDirectory() as tmp:
        toy = load_config(CONFIG_DIR / "data/toy.yaml").data
        lines = (Path(args.data) / "train.csv").read_text().splitlines()[:args.toy_clips]
        (Path(tmp) / "toy.csv").write_text("\n".join(f"{Path(args.data).resolve()}/{line}" for line in lines) + "\n")
        toy = replace(toy, train_manifest=str(Path(tmp) / "toy.csv"), validate_cache="none", num_workers=2)
        manifest = make_vp9_clips(Path(tmp) / "vp9", args.vp9_clips)
        big = DataConfig(root=str(Path(tmp) / "vp9"), train_manifest=str(manifest), num_frames=8, sampling_rate=8,
                         train_jitter_scales=[256, 320], train_crop_size=224, random_flip=True, batch_size=8,
                         num_workers=2, validate_cache="none")
        contenders = (shootout_contenders(toy, f"toy {toy.num_frames}x{toy.sampling_rate}, crop {toy.train_crop_size}")
                      + shootout_contenders(big, "VP9 320x240 GOP 32, 8x8, crop 224"))
        rows = run_shootout(contenders, args.rounds)
    print(format_shootout(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
