"""Fused attention vs the original's explicit attention, train step at the CPU bench preset.

    .venv/bin/python -m timesformer_harness.benchmarks.model_vs_naive [--preset cpu_bench] [--batch 2]
        [--rounds 3] [--steps 4]

For each attention type it runs the bench's model-suite case (``timesformer_harness.bench.model``: the train step of
``timesformer_harness.workload.synthetic_step``, synchronised, its peak memory from before the model is built) of our
model with ``attn_backend=auto`` (fused SDPA) and with ``attn_backend=naive`` (the original's
``softmax(q k^T * scale) v``, same layout reshapes as the original), every case in a fresh process. Rounds are
interleaved (A B A B ...) and the medians over rounds are compared, so the ratios hold on a noisy shared machine. A
case that runs out of memory or fails is reported as such and left out of the table.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from dataclasses import replace

from timesformer_harness.variants import VARIANTS
from timesformer_harness.common import setup_logging

logger = logging.getLogger(__name__)

BACKENDS = ("naive", "auto")


def main(argv: list[str] | None = None) -> int:
    import torch

    from timesformer_harness.bench.model import Case
    from timesformer_harness.bench.record import BenchRecord
    from timesformer_harness.bench.sweep import run_case
    from timesformer_harness.model import load_preset

    p = argparse.ArgumentParser(prog="python -m timesformer_harness.benchmarks.model_vs_naive",
                                description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu_bench")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per case")
    p.add_argument("--attn", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    setup_logging()

    preset = load_preset(args.preset)
    runs: dict[tuple[str, str], list[BenchRecord]] = {}
    failed: dict[tuple[str, str], str] = {}
    for r in range(args.rounds):
        for attention_type in args.attn:
            for backend in BACKENDS:
                case = Case(preset=args.preset, device="cpu", batch=args.batch, precision="fp32", warmup=args.warmup,
                            steps=args.steps, model=replace(preset, attention_type=attention_type,
                                                            attn_backend=backend),
                            mode="train", frames=preset.num_frames, img_size=preset.img_size)
                rec = run_case(case, args.timeout)
                if rec.status != "ok":
                    failed[(attention_type, backend)] = f"{rec.status}: {rec.message}"
                    logger.warning("round %d/%d %s %s: %s %s", r + 1, args.rounds, attention_type, backend,
                                   rec.status, rec.message)
                    continue
                runs.setdefault((attention_type, backend), []).append(rec)
                logger.info("round %d/%d %-19s %-5s %7.0f ms  %6.0f MiB", r + 1, args.rounds, attention_type,
                            backend, rec.step_ms["median"], rec.peak_mem_bytes / 2**20)
    print(f"\nTrain step (bench model suite), preset {args.preset}, batch {args.batch}, fp32, median of {args.rounds} "
          f"interleaved rounds x {args.steps} steps, fresh process per case, torch {torch.__version__}\n")
    print("| attention | naive images/s | fused images/s | speed-up | naive peak MiB | fused peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for attention_type in args.attn:
        if any((attention_type, b) in failed for b in BACKENDS):
            reasons = "; ".join(f"{b}: {failed[(attention_type, b)]}" for b in BACKENDS
                                if (attention_type, b) in failed)
            print(f"| {attention_type} | {reasons} | | | | | |")
            continue
        row = {b: (statistics.median(r.images_per_s for r in runs[(attention_type, b)]),
                   statistics.median(r.peak_mem_bytes / 2**20 for r in runs[(attention_type, b)])) for b in BACKENDS}
        (ni, nm), (fi, fm) = row["naive"], row["auto"]
        print(f"| {attention_type} | {ni:.1f} | {fi:.1f} | {fi / ni:.2f}x | {nm:.0f} | {fm:.0f} | {fm / nm:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
