"""What re-keying buys: DALI CPU clips/s at the original 8x32 sampling on 10 s, 320x240 videos prepared three ways.

``python -m benchmarks.bench_prepare [--videos 8] [--rounds 5] [--data runs/bench/prepare_data]
[--out runs/bench/prepare.json]``

Sources: ``--videos`` generated 10 s, 30 fps, 320x240 H.264 clips (x264's default keyint 250, like typical web
video; a camera panning over a detailed texture, plus noise). ``pipelines.tools.prepare`` turns them (size kept) into

* VP9, long GOP (keyframe every 250 frames: the source's structure, one GOP spans nearly the whole clip),
* VP9, GOP = sampling rate (32),
* MJPEG, intra-only.

For each: file size, the decode-cost estimate (``pipelines.tools.decode_cost``, DALI's seek model; expectation over train
starts), the frames PyAV actually decodes for this epoch's clips following the same seeks, and DALI CPU train clips/s
(full graph: decode + crop + resize 224 + normalise) and decode-only, each a median over interleaved epochs (A B C
A B C ...) so that load from other processes hits the variants alike. Generated data is kept in ``--data`` and
re-used (prepare is idempotent).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from benchmarks.bench_pipelines import epoch_rate, write_clips
from harness.config import REPO_ROOT
from pipelines import sampling
from pipelines.config import DataConfig
from pipelines.logs import setup_logging
from pipelines.tools.decode_cost import STRATEGIES, count_decoded_frames, estimate, read_gop
from pipelines.tools.prepare import prepare
from pipelines.tools.transcode import PrepareSpec

logger = logging.getLogger(__name__)

SECONDS, FPS, HEIGHT, WIDTH = 10, 30, 240, 320
T, RATE = 8, 32  # the original recipe: 8 frames at sampling rate 32 (a 256-frame span at 30 fps)
VARIANTS = {
    "VP9, long GOP (250)": PrepareSpec("vp9", 0, 250),
    f"VP9, GOP = rate ({RATE})": PrepareSpec("vp9", 0, RATE),
    "MJPEG, intra-only": PrepareSpec("mjpeg", 0, 1),
}


def source_frames(seed: int) -> Iterator[np.ndarray]:
    """10 s of a camera panning over a detailed random texture, with sensor-like noise: (H, W, 3) uint8 frames."""
    rng = np.random.default_rng(seed)
    n = SECONDS * FPS
    vx, vy = 1.0 + 0.1 * (seed % 5), 0.4  # px per frame
    tex = rng.integers(0, 256, (HEIGHT + int(vy * n) + 1, WIDTH + int(vx * n) + 1, 3)).astype(np.float32)
    for axis in (0, 1, 0, 1):  # two 3-tap box blurs per axis: detail at the scale of a few pixels
        tex = (tex + np.roll(tex, 1, axis) + np.roll(tex, -1, axis)) / 3
    tex = (tex - tex.mean()) * 3 + 128
    for t in range(n):
        y, x = int(vy * t), int(vx * t)
        img = tex[y:y + HEIGHT, x:x + WIDTH] + rng.normal(0, 8, (HEIGHT, WIDTH, 3))
        yield img.clip(0, 255).astype(np.uint8)


def make_sources(folder: Path, num: int) -> Path:
    """``num`` 10 s 320x240 30 fps H.264 clips (keyint 250) and a ``path label`` manifest; existing files are kept."""
    return write_clips(folder, "src{i:03d}.mp4", num, source_frames, "libx264",
                       {"preset": "veryfast", "crf": "23", "g": "250"}, fps=FPS)


class ReaderCase:
    """Decode-only with DALI's file reader (``fn.experimental.readers.video``, which seeks to keyframes), one
    ``file_list`` line per planned clip: its first frame, then T frames at a constant stride (the plan's linspace
    step rounded: 36 for 8x32 at 30 fps), so the frames match the loader's within a few."""

    PASSES = 8

    def __init__(self, plans, stride: int, batch_size: int, threads: int, folder: Path):
        from nvidia.dali import fn, pipeline_def

        self.batches = len(plans) // batch_size * self.PASSES  # the reader wraps around: several passes per epoch
        file_list = folder / "reader_clips.txt"
        starts = [int(p.frames[0]) for p in plans]
        file_list.write_text("".join(f"{p.path} {p.label} {s} {s + (T - 1) * stride + 1}\n"
                                     for p, s in zip(plans, starts)))

        # queue depth 1: at most one batch is decoded ahead, i.e. 1 / self.batches of a timed epoch comes free
        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, prefetch_queue_depth=1)
        def reader_pipe():
            video, _ = fn.experimental.readers.video(device="cpu", file_list=str(file_list), sequence_length=T,
                                                     stride=stride, file_list_format="frames",
                                                     file_list_include_end=False, name="Reader",
                                                     pad_mode="edge")  # else it wants T * stride frames in range
            return video

        self.pipe = reader_pipe()
        self.pipe.build()
        assert self.pipe.epoch_size("Reader") == len(plans), "the reader must make exactly one clip per line"
        self.num_clips = self.batches * batch_size
        assert self.batches >= 8, "too few batches per timed epoch for a queued batch not to matter"

    def epoch_rate(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.batches):
            self.pipe.run()
        return self.num_clips / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=8, help="generated source videos (clips per epoch)")
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per variant (interleaved)")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads")
    parser.add_argument("--data", default=str(REPO_ROOT / "runs/bench/prepare_data"))
    parser.add_argument("--out", default=str(REPO_ROOT / "runs/bench/prepare.json"))
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    import torch

    from benchmarks.bench_pipelines import decode_only_loader
    from pipelines import build_loader

    torch.set_num_threads(1)
    data = Path(args.data)
    t0 = time.perf_counter()
    manifest = make_sources(data / "source", args.videos)
    logger.warning("sources ready in %.0f s", time.perf_counter() - t0)
    base = DataConfig(loader="dali", backend="cpu", num_frames=T, sampling_rate=RATE, target_fps=FPS,
                      train_jitter_scales=[256, 320], train_crop_size=224, batch_size=min(4, args.videos),
                      num_workers=args.threads, validate_cache="none", pad_short=False)
    rows, cases = [], {}
    for i, (name, spec) in enumerate(VARIANTS.items()):
        out = data / f"variant{i}"
        t0 = time.perf_counter()
        report = prepare(manifest, out, spec, workers=0, progress=False)
        assert not report.failed, report.summary()
        cfg = replace(base, root=str(out), train_manifest=str(out / manifest.name))
        full = build_loader(cfg, "train", device="cpu")
        plans = full.planner.plans(0)
        gops = {p: read_gop(p) for p in sorted({pl.path for pl in plans})}
        est = {s: statistics.mean(estimate(g, T, RATE, FPS, strategy=s).train for g in gops.values())
               for s in STRATEGIES}
        counted = {s: statistics.mean(count_decoded_frames(pl.path, pl.frames, s, gops[pl.path]) for pl in plans)
                   for s in ("seek", "from_start")}
        sizes = [Path(p).stat().st_size for p in gops]
        rows.append({"variant": name, "spec": asdict(spec), "prepare_seconds": round(time.perf_counter() - t0, 1),
                     "max_gop": max(g.max_gop for g in gops.values()),
                     "mb_per_video": statistics.mean(sizes) / 1e6,
                     "est_decoded_per_clip": est, "counted_decoded_per_clip_epoch0": counted})
        stride = round((sampling.clip_size(T, RATE, FPS, FPS) - 1) / (T - 1))
        cases[name] = {"full": full, "decode_only": decode_only_loader(cfg),
                       "reader_decode_only": ReaderCase(plans, stride, cfg.batch_size, args.threads, out)}
    rates: dict[str, dict[str, list[float]]] = {n: {k: [] for k in c} for n, c in cases.items()}

    def rate(case, epoch: int) -> float:
        return case.epoch_rate() if isinstance(case, ReaderCase) else epoch_rate(case, epoch)

    for n, c in cases.items():  # warm-up epoch: pipeline build, page cache
        for k in c:
            rate(c[k], 0)
    for r in range(args.rounds):
        for n, c in cases.items():
            for k in c:
                rates[n][k].append(rate(c[k], 0))  # epoch 0 every round: the same clips as counted
    for row in rows:
        row["clips_per_s_rounds"] = rates[row["variant"]]
        row["clips_per_s"] = {k: statistics.median(v) for k, v in rates[row["variant"]].items()}
    print(f"{args.videos} videos x 10 s, 320x240 @ 30 fps; {T}x{RATE} sampling (span {T * RATE} frames), crop 224, "
          f"batch {base.batch_size}, DALI CPU {args.threads} threads, median of {args.rounds} interleaved epochs\n")
    print("| variant | max GOP | MB / video | decoded / clip, seeking decoder: estimate (counted) | decoded / clip, "
          "from the start | DALI loader clips/s (decoders.video) | its decode-only | DALI readers.video decode-only "
          "(seeks) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, c, v = r["est_decoded_per_clip"], r["counted_decoded_per_clip_epoch0"], r["clips_per_s"]
        print(f"| {r['variant']} | {r['max_gop']} | {r['mb_per_video']:.2f} | {e['seek']:.0f} ({c['seek']:.0f}) = "
              f"{e['seek'] / T:.1f} per frame | {e['from_start']:.0f} ({c['from_start']:.0f}) = "
              f"{e['from_start'] / T:.1f} per frame | {v['full']:.1f} | {v['decode_only']:.1f} "
              f"| {v['reader_decode_only']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"videos": args.videos, "rounds": args.rounds, "threads": args.threads,
                                          "frames": T, "sampling_rate": RATE, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
