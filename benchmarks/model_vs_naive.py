"""Fused attention vs the original's explicit attention, train step at the CPU bench preset.

    .venv/bin/python -m benchmarks.model_vs_naive [--preset cpu_bench] [--batch 2] [--rounds 3] [--steps 4]

For each attention type it times an SGD train step (forward, backward, step) of our model with
``attn_backend=auto`` (fused SDPA) and with ``attn_backend=naive`` (the original's ``softmax(q k^T * scale) v``,
same layout reshapes as the original), every case in a fresh process so its peak RSS is its own. Rounds are
interleaved (A B A B ...) and the medians over rounds are compared, so the ratios hold on a noisy shared machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

ATTN_TYPES = ("divided_space_time", "joint_space_time", "space_only")


def worker(preset: str, attention_type: str, backend: str, batch: int, steps: int, warmup: int) -> dict:
    """One case in this process: median train-step time and peak RSS growth over the model's construction."""
    import torch
    import torch.nn.functional as F

    from harness.model import create_model

    torch.manual_seed(0)
    model = create_model(preset, attention_type=attention_type, attn_backend=backend)
    cfg = model.config
    x = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_s": statistics.median(times), "peak_mib": (peak_kib - base_kib) / 1024, "frames": cfg.num_frames}


def run_case(args: argparse.Namespace, attention_type: str, backend: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.model_vs_naive", "--worker", attention_type, backend,
           "--preset", args.preset, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu_bench")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attn", nargs="*", default=list(ATTN_TYPES), choices=ATTN_TYPES)
    p.add_argument("--worker", nargs=2, metavar=("ATTN", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.preset, *args.worker, args.batch, args.steps, args.warmup)))
        return 0

    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for attention_type in args.attn:
            for backend in ("naive", "auto"):
                res = run_case(args, attention_type, backend)
                runs.setdefault((attention_type, backend), []).append(res)
                print(f"round {r + 1}/{args.rounds} {attention_type:<19} {backend:<5} "
                      f"{res['step_s'] * 1000:7.0f} ms  {res['peak_mib']:6.0f} MiB", file=sys.stderr)
    print(f"\nTrain step (SGD), preset {args.preset}, batch {args.batch}, fp32, median of {args.rounds} interleaved "
          f"rounds x {args.steps} steps, fresh process per case\n")
    print("| attention | naive images/s | fused images/s | speed-up | naive peak MiB | fused peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for attention_type in args.attn:
        row = {}
        for backend in ("naive", "auto"):
            rs = runs[(attention_type, backend)]
            step = statistics.median(r["step_s"] for r in rs)
            row[backend] = (args.batch * rs[0]["frames"] / step, statistics.median(r["peak_mib"] for r in rs))
        (ni, nm), (fi, fm) = row["naive"], row["auto"]
        print(f"| {attention_type} | {ni:.1f} | {fi:.1f} | {fi / ni:.2f}x | {nm:.0f} | {fm:.0f} | {fm / nm:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
