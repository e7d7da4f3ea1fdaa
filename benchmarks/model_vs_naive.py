"""Fused attention vs the original's explicit attention, train step at the CPU bench preset.

    .venv/bin/python -m timesformer_harness.benchmarks.model_vs_naive [--preset cpu_bench] [--batch 2]
        [--rounds 3] [--steps 4]

For each attention type it times the harness's train step (``timesformer_harness.workload.synthetic_step``: forward,
backward, optimizer step) of our model with ``attn_backend=auto`` (fused SDPA) and with ``attn_backend=naive`` (the
original's ``softmax(q k^T * scale) v``, same layout reshapes as the original), every case in a fresh process
(``timesformer_harness.runner``) so its peak RSS is its own. Rounds are interleaved (A B A B ...) and the medians over
rounds are compared, so the ratios hold on a noisy shared machine. A case that runs out of memory or fails is reported
as such and left out of the table.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

from timesformer_harness.pipelines.logs import setup_logging

logger = logging.getLogger(__name__)

ATTN_TYPES = ("divided_space_time", "joint_space_time", "space_only")
BACKENDS = ("naive", "auto")


def worker(case: dict[str, Any]) -> dict[str, float]:
    """One case in this (fresh) process: median train-step time, and peak RSS growth from before the model is built
    (model, optimizer state, activations)."""
    import torch

    from timesformer_harness.metrics import peak_memory, reset_peak_memory
    from timesformer_harness.model import load_preset
    from timesformer_harness.runtime import seed_everything
    from timesformer_harness.workload import synthetic_step

    seed_everything(0)
    cfg = replace(load_preset(case["preset"]), attention_type=case["attention_type"], attn_backend=case["backend"])
    cpu = torch.device("cpu")
    base = reset_peak_memory(cpu)
    _, step = synthetic_step(cfg, cpu, None, mode="train", batch=case["batch"])
    for _ in range(case["warmup"]):
        step()
    times = []
    for _ in range(case["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_mib": peak_memory(cpu, base)[0] / 2**20,
            "frames": cfg.num_frames}


def main(argv: list[str] | None = None) -> int:
    from timesformer_harness.runner import run_in_fresh_process

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu_bench")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per case")
    p.add_argument("--attn", nargs="*", default=list(ATTN_TYPES), choices=ATTN_TYPES)
    args = p.parse_args(argv)
    setup_logging()

    runs: dict[tuple[str, str], list[dict]] = {}
    failed: dict[tuple[str, str], str] = {}
    for r in range(args.rounds):
        for attention_type in args.attn:
            for backend in BACKENDS:
                case = {"preset": args.preset, "attention_type": attention_type, "backend": backend,
                        "batch": args.batch, "steps": args.steps, "warmup": args.warmup}
                out = run_in_fresh_process(worker, case, timeout_s=args.timeout)
                if out.status != "ok":
                    failed[(attention_type, backend)] = f"{out.status}: {out.message}"
                    logger.warning("round %d/%d %s %s: %s %s", r + 1, args.rounds, attention_type, backend,
                                   out.status, out.message)
                    continue
                res = out.result
                runs.setdefault((attention_type, backend), []).append(res)
                logger.info("round %d/%d %-19s %-5s %7.0f ms  %6.0f MiB", r + 1, args.rounds, attention_type,
                            backend, res["step_s"] * 1000, res["peak_mib"])
    print(f"\nTrain step (workload), preset {args.preset}, batch {args.batch}, fp32, median of {args.rounds} "
          f"interleaved rounds x {args.steps} steps, fresh process per case\n")
    print("| attention | naive images/s | fused images/s | speed-up | naive peak MiB | fused peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for attention_type in args.attn:
        if any((attention_type, b) in failed for b in BACKENDS):
            reasons = "; ".join(f"{b}: {failed[(attention_type, b)]}" for b in BACKENDS if (attention_type, b) in failed)
            print(f"| {attention_type} | {reasons} | | | | | |")
            continue
        row = {}
        for backend in BACKENDS:
            rs = runs[(attention_type, backend)]
            step = statistics.median(r["step_s"] for r in rs)
            row[backend] = (args.batch * rs[0]["frames"] / step, statistics.median(r["peak_mib"] for r in rs))
        (ni, nm), (fi, fm) = row["naive"], row["auto"]
        print(f"| {attention_type} | {ni:.1f} | {fi:.1f} | {fi / ni:.2f}x | {nm:.0f} | {fm:.0f} | {fm / nm:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
