"""What re-keying buys, and the loader shoot-out on it: 10 s, 320x240 videos prepared three ways, read at the
original 8x32 sampling by every loader on the same clips.

``python -m timesformer_harness.benchmarks.bench_prepare [--videos 8] [--repeat 4] [--rounds 5] [--threads 2]
[--anchor-threads 1] [--scaling] [--whole-file] [--only mjpeg,gop] [--device cpu|cuda] [--data runs/bench/prepare_data]
[--out runs/bench/prepare.json]``

Sources: ``--videos`` generated 10 s, 30 fps, 320x240 H.264 clips (x264's default keyint 250, like typical web
video; a camera panning over a detailed texture, plus noise). ``timesformer_harness.pipelines.tools.prepare`` turns them
(size kept) into

* VP9, long GOP (keyframe every 250 frames: the source's structure, one GOP spans nearly the whole clip),
* VP9, GOP = sampling rate (32),
* MJPEG, intra-only,
* with ``--device cuda`` also H.264 with both GOPs (NVDEC decodes it; DALI's CPU decoder does not).

Each variant's train manifest lists every video ``--repeat`` times (an epoch of videos x repeat clips, batch 8,
crop 224, jitter 256-320). Printed: per variant the file size and the frames decoded per clip (the ``keyframe``
model both loaders follow, DALI's ``seek`` rule and decoding from frame 0, expectations over train starts; and
counted on this epoch's clips), then the shoot-out (``timesformer_harness.bench.pipeline``): our DALI loader (full graph
and decode-only), the PyAV loader, torchcodec and decord when they import, every row on the same clips, the variants
and rows interleaved round by round. ``--whole-file`` adds the DALI loader fed whole files (decoded from frame 0:
the baseline of the clip streams); ``--scaling`` adds it with 1 thread and with 2 pipelines of 1 thread. With
``--device cuda`` the DALI rows decode where ``data.backend=auto`` puts them (NVDEC, or DALI's CPU decoder for
MJPEG) and deliver clips on the GPU. Generated data is kept in ``--data`` and re-used (prepare is idempotent).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from timesformer_harness.benchmarks.bench_pipelines import write_clips
from timesformer_harness.config import REPO_ROOT
from timesformer_harness.metrics import Stopwatch
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.tools.encode import write_video
from timesformer_harness.common import setup_logging

logger = logging.getLogger(__name__)

SECONDS, FPS, HEIGHT, WIDTH = 10, 30, 240, 320
T, RATE, CROP, BATCH = 8, 32, 224, 8  # the original recipe: 8 frames at sampling rate 32 (a 256-frame span)


def variants(gpu: bool = False) -> dict:
    """The prepared variants by name; ``gpu`` adds H.264 ones (NVDEC decodes H.264, DALI's CPU decoder does not)."""
    from timesformer_harness.pipelines.tools.transcode import PrepareSpec

    out = {"VP9, long GOP (250)": PrepareSpec("vp9", 0, 250), f"VP9, GOP = rate ({RATE})": PrepareSpec("vp9", 0, RATE),
           "MJPEG, intra-only": PrepareSpec("mjpeg", 0, 1)}
    if gpu:
        out |= {"H.264, long GOP (250)": PrepareSpec("h264", 0, 250),
                f"H.264, GOP = rate ({RATE})": PrepareSpec("h264", 0, RATE)}
    return out


def source_frames(seed: int, height: int = HEIGHT, width: int = WIDTH) -> Iterator[np.ndarray]:
    """10 s of a camera panning over a detailed random texture, with sensor-like noise: (H, W, 3) uint8 frames."""
    rng = np.random.default_rng(seed)
    n = SECONDS * FPS
    vx, vy = 1.0 + 0.1 * (seed % 5), 0.4  # px per frame
    tex = rng.integers(0, 256, (height + int(vy * n) + 1, width + int(vx * n) + 1, 3)).astype(np.float32)
    for axis in (0, 1, 0, 1):  # two 3-tap box blurs per axis: detail at the scale of a few pixels
        tex = (tex + np.roll(tex, 1, axis) + np.roll(tex, -1, axis)) / 3
    tex = (tex - tex.mean()) * 3 + 128
    for t in range(n):
        y, x = int(vy * t), int(vx * t)
        img = tex[y:y + height, x:x + width] + rng.normal(0, 8, (height, width, 3))
        yield img.clip(0, 255).astype(np.uint8)


SOURCE_NAME, SOURCE_CODEC = "src{i:03d}.mp4", "libx264"
SOURCE_OPTIONS = {"preset": "veryfast", "crf": "23", "g": "250"}  # x264's default keyint, like typical web video


def _write_source(args: tuple[Path, int, int, int]) -> None:
    path, seed, height, width = args
    write_video(path, source_frames(seed, height, width), SOURCE_CODEC, FPS, SOURCE_OPTIONS)


def make_sources(folder: Path, num: int, height: int = HEIGHT, width: int = WIDTH, workers: int = 1) -> Path:
    """``num`` 10 s ``width`` x ``height`` 30 fps H.264 clips (keyint 250) and a ``path label`` manifest; existing
    files are kept. ``workers`` > 1 encodes the missing ones in that many processes."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [(folder / SOURCE_NAME.format(i=i), i, height, width) for i in range(num)
               if not (folder / SOURCE_NAME.format(i=i)).exists()]
    if workers > 1 and len(missing) > 1:
        ctx = multiprocessing.get_context("forkserver")  # safe whatever threads the caller runs
        with ProcessPoolExecutor(min(workers, len(missing)), mp_context=ctx) as pool:
            list(pool.map(_write_source, missing))
    return write_clips(folder, SOURCE_NAME, num, lambda i: source_frames(i, height, width), SOURCE_CODEC,
                       SOURCE_OPTIONS, fps=FPS)


def repeated_manifest(manifest: Path, repeat: int) -> Path:
    """The manifest with every line ``repeat`` times (``train_x{repeat}.csv`` beside it)."""
    lines = manifest.read_text().splitlines()
    out = manifest.with_name(f"train_x{repeat}.csv")
    out.write_text("".join(f"{line}\n" for _ in range(repeat) for line in lines))
    return out


def decode_costs(cfg: DataConfig, device: str = "cpu") -> dict:
    """Frames decoded per clip: the models' expectation over train starts (mean over files), and counted on the
    epoch's clips (the DALI loader's streams)."""
    from timesformer_harness.bench.pipeline import decoded_frames_per_clip
    from timesformer_harness.pipelines.factory import build_loader
    from timesformer_harness.pipelines.tools.decode_cost import STRATEGIES, estimate, read_gop

    loader = build_loader(cfg, "train", device=device)
    plans = loader.planner.plans(0)
    gops = {p: read_gop(p) for p in sorted({pl.path for pl in plans})}
    est = {s: statistics.mean(estimate(g, T, RATE, FPS, strategy=s).train for g in gops.values()) for s in STRATEGIES}
    return {"max_gop": max(g.max_gop for g in gops.values()),
            "mb_per_video": statistics.mean(Path(p).stat().st_size for p in gops) / 1e6,
            "estimate_per_clip": est,
            "counted_per_clip_dali": decoded_frames_per_clip(loader, len(plans))["counted_per_clip"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.benchmarks.bench_prepare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=8, help="generated source videos")
    parser.add_argument("--repeat", type=int, default=4, help="clips per video per epoch (manifest repeats)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (interleaved), after one warm-up round")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads / PyAV workers")
    parser.add_argument("--anchor-threads", type=int, default=1, help="threads for torchcodec and decord")
    parser.add_argument("--scaling", action="store_true", help="add DALI with 1 thread and 2 pipelines x 1 thread")
    parser.add_argument("--whole-file", action="store_true", help="add DALI fed whole files (the loader before)")
    parser.add_argument("--only", default="", help="comma list of variant names' first words (vp9 long, gop, mjpeg)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the DALI rows deliver")
    parser.add_argument("--data", default=str(REPO_ROOT / "runs/bench/prepare_data"))
    parser.add_argument("--out", default=str(REPO_ROOT / "runs/bench/prepare.json"))
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    import torch

    from timesformer_harness.runtime import retain_freed_memory

    from timesformer_harness.bench.pipeline import format_shootout, run_shootout, shootout_contenders
    from timesformer_harness.pipelines.tools.prepare import prepare

    torch.set_num_threads(1)
    retain_freed_memory()
    data = Path(args.data)
    clock = Stopwatch()
    manifest = make_sources(data / "source", args.videos)
    logger.warning("sources ready in %.0f s", clock.elapsed())
    gpu = args.device == "cuda"
    base = DataConfig(loader="dali", backend="auto" if gpu else "cpu", num_frames=T, sampling_rate=RATE, target_fps=FPS,
                      train_jitter_scales=[256, 320], train_crop_size=CROP, batch_size=BATCH,
                      num_workers=args.threads, validate_cache="none", pad_short=False)
    chosen = {name: spec for name, spec in variants(gpu).items()
              if not args.only or any(w.strip().lower() in name.lower() for w in args.only.split(","))}
    rows, contenders = [], []
    for i, (name, spec) in enumerate(variants(gpu).items()):
        if name not in chosen:
            continue
        out = data / f"variant{i}"
        clock = Stopwatch()
        report = prepare(manifest, out, spec, workers=0, progress=False)
        assert not report.failed, report.summary()
        cfg = replace(base, root=str(out), train_manifest=str(repeated_manifest(out / manifest.name, args.repeat)))
        rows.append({"variant": name, "spec": asdict(spec), "prepare_seconds": round(clock.elapsed(), 1),
                     **decode_costs(cfg, args.device)})
        contenders += shootout_contenders(cfg, name, args.anchor_threads, args.scaling, args.whole_file,
                                          device=args.device)
    shootout = run_shootout(contenders, args.rounds)
    clips = args.videos * args.repeat
    where = f"on {torch.cuda.get_device_name()}, " if gpu else ""
    print(f"{where}{args.videos} videos x 10 s, 320x240 @ 30 fps, each {args.repeat}x per epoch ({clips} clips); "
          f"{T}x{RATE} sampling (span {T * RATE} frames), crop {CROP}, batch {BATCH}; DALI {args.threads} threads, "
          f"PyAV {args.threads} workers; median of {args.rounds} interleaved rounds, each row in its own process\n")
    print("| variant | max GOP | MB / video | decoded / clip: keyframe model (counted, DALI streams) | DALI seek rule "
          "| from frame 0 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        e = r["estimate_per_clip"]
        print(f"| {r['variant']} | {r['max_gop']} | {r['mb_per_video']:.2f} | {e['keyframe']:.0f} "
              f"({r['counted_per_clip_dali']:.0f}) = {e['keyframe'] / T:.1f} per frame | {e['seek']:.0f} "
              f"| {e['from_start']:.0f} |")
    print()
    print(format_shootout(shootout))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"videos": args.videos, "repeat": args.repeat, "rounds": args.rounds,
                                          "threads": args.threads, "device": args.device,
                                          "anchor_threads": args.anchor_threads,
                                          "frames": T, "sampling_rate": RATE, "variants": rows,
                                          "shootout": [r.__dict__ for r in shootout]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
