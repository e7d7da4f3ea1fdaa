"""``make gpu-perf``: the train step's speed on one GPU, in one script sized for a few minutes of device time.

    python -m timesformer_harness.gpu_perf [--out DIR] [--budget-s 540] [--rows NAME ...]
    python -m timesformer_harness.gpu_perf --rehearse-on-cpu   # the same rows at CPU size (CUDA-only ones skipped)

The model is the Kinetics recipe's: TimeSformer-Base divided 8x224, bf16 autocast, synthetic input, steady state
(warm-up and compilation steps are timed apart). The rows, in the order they run (``ROWS``: what the targets judge
first, so that a short lease measures those):

* divided at batch 8: eager, eager with the Triton temporal attention, compiled ``default``; ``reduce-overhead``
  (CUDA graphs) at batch 2;
* the Trainer: ``timesformer_harness.train`` on the K400 recipe with synthetic clips, batch 8: its steady clips/s
  and the host-device syncs of each micro-batch (``train.count_syncs``: CUDA's sync debug mode);
* eager divided at batch 8 with the temporal pass on each other backend (naive, math, flash, efficient, cudnn; the
  spatial pass on ``auto``): the temporal-attention choice (``model.temporal_attn_backend``), and the compiled step
  with the Triton one;
* eager divided at batch 8 with each SDPA backend for both passes (flash, efficient, cudnn, math);
* eager divided at batch 2, 16 and 32 (SDPA ``auto``);
* joint and space-only at batch 8, compiled and eager; ``reduce-overhead`` at batch 8.

Each model row is a model-suite bench case (``timesformer_harness.bench``) in a fresh process, with the GPU's kernel
time profiled after the timing; a row whose estimated cost no longer fits ``--budget-s`` is skipped and says so.
After every row, ``<out>/results.json`` (the bench's records and the Trainer's figures) and ``<out>/summary.md``
(the table, and the targets met or not) are rewritten, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__" and not __package__:  # run by path (python harness/gpu_perf.py)
    from timesformer_harness.scripts import run_by_package_name

    run_by_package_name(__file__, "timesformer_harness.gpu_perf")

import torch

from timesformer_harness.bench.case import ModelCase
from timesformer_harness.bench.cli import measure_peak, resolve
from timesformer_harness.bench.record import BenchRecord
from timesformer_harness.bench.sweep import base_settings, run_case
from timesformer_harness.common import atomic_write_text, exit_on_sigterm, setup_logging
from timesformer_harness.config import ModelConfig
from timesformer_harness.kernels.attention import triton_build_problem
from timesformer_harness.metrics import OutputFolderError, Stopwatch, check_output_root, new_run_dir, run_stamp
from timesformer_harness.runner import run_command, says_oom
from timesformer_harness.runtime import (device_name, environment_info, precision_name, resolve_device,
                                         resolve_precision)
from timesformer_harness.variants import REFERENCE
from timesformer_harness.workload import check_attention

logger = logging.getLogger(__name__)

GPU_PRESET = "vit_base_patch16"
TRAIN_CONFIG = "configs/exp/k400_divst_8x32_224.yaml"
# CPU rehearsal: the same rows on a model a 2-core CPU steps through in well under a second
CPU_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=4",
             "model.num_frames=4", "model.num_classes=10"]
CPU_DATA = ["data.num_frames=4", "data.train_crop_size=32", "data.test_crop_size=32"]


@dataclass(frozen=True)
class Row:
    """One measurement: a model-suite case (``kind="model"``) or the Trainer's run (``kind="trainer"``)."""

    name: str
    kind: str = "model"
    attention_type: str = REFERENCE
    batch: int = 8
    compile: str = "none"
    backend: str = "auto"
    temporal_backend: str = "same"  # divided attention's temporal pass (model.temporal_attn_backend)
    estimate_s: float = 45.0  # what the row costs on a GPU, start-up and compilation included (the budget's unit)


# Most wanted first: the rows the targets judge, cheapest first (the Triton temporal attention beside eager-b8:
# cheap, and the candidate of the temporal-attention choice), then the other temporal backends, then the sweeps. A
# lease of 15 minutes cannot run them all, and a row that does not fit the budget is skipped, not cut: the default
# budget (540 s) holds the first five by their estimates.
ROWS: tuple[Row, ...] = (
    Row("eager-b8"),
    Row("trainer-b8", kind="trainer", estimate_s=90.0),
    Row("temporal-triton-b8", temporal_backend="triton"),
    Row("compiled-b8", compile="default", estimate_s=150.0),
    Row("reduce-overhead-b2", batch=2, compile="reduce-overhead", estimate_s=150.0),
    *(Row(f"{a}-compiled-b8", attention_type=a, compile="default", estimate_s=150.0)
      for a in ("joint_space_time", "space_only")),
    *(Row(f"temporal-{b}-b8", temporal_backend=b) for b in ("naive", "math", "flash", "efficient", "cudnn")),
    Row("compiled-temporal-triton-b8", compile="default", temporal_backend="triton", estimate_s=150.0),
    *(Row(f"sdpa-{b}-b8", backend=b) for b in ("flash", "efficient", "cudnn", "math")),
    Row("eager-b2", batch=2),
    Row("eager-b16", batch=16),
    Row("eager-b32", batch=32),
    *(Row(f"{a}-eager-b8", attention_type=a) for a in ("joint_space_time", "space_only")),
    Row("reduce-overhead-b8", compile="reduce-overhead", estimate_s=150.0),
)

# What the train step should reach on one H100 (bf16, divided 8x224 unless named): (row, figure, bound, what).
TARGETS = (
    ("eager-b8", "clips_per_s", 120.0, "eager batch 8 >= 120 clips/s"),
    ("compiled-b8", "clips_per_s", 200.0, "compiled batch 8 >= 200 clips/s"),
    ("compiled-b8", "clips_per_s", 300.0, "compiled batch 8 >= 300 clips/s (about 36% MFU)"),
    ("reduce-overhead-b2", "step_ms", 15.0, "reduce-overhead batch 2 under 15 ms a step"),
    ("joint_space_time-compiled-b8", "mfu_pct", 30.0, "joint compiled >= 30% MFU"),
    ("space_only-compiled-b8", "mfu_pct", 30.0, "space-only compiled >= 30% MFU"),
    ("trainer-b8", "syncs_max", 1.0, "the Trainer syncs at most once per micro-batch"),
)
# The micro-batch reads its loss back once (train.read_back): a GPU count below this missed that read
READS_PER_MICRO_BATCH = 1.0


def skip_reason(row: Row, model: ModelConfig, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why ``row`` cannot run on ``device`` (None when it can)."""
    if row.compile == "reduce-overhead" and device.type != "cuda":
        return "CUDA graphs (reduce-overhead) need a GPU"
    if row.temporal_backend == "triton" and row.compile != "none" and device.type != "cuda":
        return "the Triton kernel compiles into a graph on a GPU only (on the CPU it runs interpreted, eager)"
    if row.compile != "none" and device.type == "cuda" and (problem := triton_build_problem()):
        return f"torch.compile's GPU kernels are Triton's, and {problem}"
    if (row.backend, row.temporal_backend) != ("auto", "same"):
        try:
            check_attention(replace(model, attn_backend=row.backend, temporal_attn_backend=row.temporal_backend),
                            device, dtype)
        except ValueError as e:
            return str(e)
    return None


def model_case(row: Row, base: dict[str, Any], model: ModelConfig, device: torch.device) -> ModelCase:
    """The model-suite case of ``row``: the step timed at steady state, its kernel time profiled on a GPU."""
    batch = row.batch if device.type == "cuda" else max(1, row.batch // 4)
    warmup = base["warmup"] if row.compile == "none" else max(base["warmup"], 3)
    model = replace(model, attention_type=row.attention_type, attn_backend=row.backend,
                    temporal_attn_backend=row.temporal_backend)
    return ModelCase.of(base, model=model, mode="train", frames=model.num_frames, img_size=model.img_size,
                        batch=batch, sweep_batch=True, compile=row.compile, warmup=warmup, kernel_steps=3)


def run_trainer(row: Row, out: Path, device: torch.device, steps: int, timeout_s: float) -> dict[str, Any]:
    """The Trainer on synthetic clips for ``steps`` optimizer steps, counting syncs: its steady clips/s, data wait,
    syncs per micro-batch (mean and max over the logged windows) and exit status."""
    run_dir = out / row.name
    batch = row.batch if device.type == "cuda" else 2
    argv = [sys.executable, "-m", "timesformer_harness.train", "--config",
            TRAIN_CONFIG if device.type == "cuda" else "configs/model/tiny.yaml",
            *([] if device.type == "cuda" else [*CPU_MODEL, *CPU_DATA]),
            "data.loader=synthetic", f"data.batch_size={batch}", f"data.synthetic_videos={batch * steps}",
            "solver.max_epoch=1", "solver.global_batch_size=0", "train.eval_period=0", "train.log_period=2",
            "train.count_syncs=true", f"train.compile={row.compile}", "train.resume=never",
            f"output.dir={run_dir}", "output.tensorboard=false"]
    done = run_command(argv, timeout_s=timeout_s)
    result: dict[str, Any] = {"row": row.name, "kind": "trainer", "batch": batch, "command": " ".join(argv[1:]),
                              "wall_s": round(done.wall_s, 1), "status": "ok" if done.returncode == 0 else "error"}
    if done.returncode != 0:
        output = done.stderr or done.stdout
        result["message"] = "timed out" if done.returncode is None else output[-600:]
        if done.returncode is not None and says_oom(output):
            result["status"] = "oom"  # a result, as the model rows' out of memory
    try:  # what a stopped run logged before it stopped is kept beside its status
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError) as e:
        if result["status"] != "ok":
            return result
        return {**result, "status": "error", "message": f"the run's metrics.jsonl could not be read: {e}"}
    windows = [r for r in records if r.get("event") == "train"]
    steady = [r for r in windows if not r.get("time/warmup")]
    counted = [r for r in windows if "debug/syncs_per_micro_batch" in r]
    end = next((r for r in records if r.get("event") == "end"), {})
    result.update({
        "clips_per_s": end.get("time/steady_clips_per_s"),
        "data_wait_pct": max((r["time/data_wait_pct"] for r in steady), default=None),
        "syncs_mean": sum(r["debug/syncs_per_micro_batch"] for r in counted) / len(counted) if counted else None,
        "syncs_max": max((r["debug/syncs_per_micro_batch_max"] for r in counted), default=None),
        "steps": len(records) and max(r.get("step", 0) for r in records)})
    return result


def figures(rec: BenchRecord) -> dict[str, Any]:
    """A model row's table figures from its bench record."""
    step = rec.step_ms or {}
    return {"status": rec.status, "clips_per_s": rec.clips_per_s, "step_ms": step.get("median"),
            "kernel_ms": rec.extra.get("kernel_ms"), "kernel_share": rec.extra.get("kernel_share"),
            "kernels_per_step": rec.extra.get("kernel_ops_per_step"),
            "mfu_pct": None if rec.utilisation is None else 100 * rec.utilisation,
            "peak_mib": None if rec.peak_mem_bytes is None else rec.peak_mem_bytes / 2**20,
            "first_step_s": rec.extra.get("first_step_s"), "compile_s": rec.extra.get("compile_s"),
            "message": rec.message, "kernel_error": rec.extra.get("kernel_error"),
            "triton_blocks": rec.extra.get("triton_blocks"), "torch_warnings": rec.extra.get("torch_warnings")}


def fmt_cell(v: Any, spec: str = ".1f") -> str:
    """A table cell: ``-`` for None, numbers in ``spec``."""
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def sdpa_cell(r: dict[str, Any]) -> str:
    """The SDPA column: the backend, and the temporal pass's where it differs (``temporal_attn_backend``)."""
    temporal = r.get("temporal_backend", "same")
    return r["backend"] if temporal == "same" else f"{r['backend']}, temporal {temporal}"


def run_conditions(meta: dict[str, Any]) -> str:
    """A device script's run in its summary's first words: when, the git tree, torch, CUDA and the driver."""
    env = meta["env"]
    return (f"Started {meta['started']}, git {env.get('git_sha', '?')}, torch {env.get('torch')}, CUDA "
            f"{env.get('cuda')} (driver {env.get('cuda_driver')})")


def summary(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown report: the conditions, the model rows' table, the Trainer's figures and the targets."""
    lines = [f"# gpu-perf: {meta['hardware']}", "",
             f"{run_conditions(meta)}, {meta['precision']}, preset {meta['preset']} ({meta['frames']}x{meta['img_size']}), synthetic input. "
             f"Steady state: each case's first step is timed apart (compilation in it), then "
             f"{meta['warmup'] - 1} more warm-up step(s) ({max(meta['warmup'], 3) - 1} for compiled ones) and "
             f"{meta['steps']} timed ones, each "
             "synchronised. Kernel ms: the GPU's busy time per step (kernels, copies, fills) from a profiler trace "
             "of 3 more steps; busy % = kernel ms / step ms (the rest of the step the GPU waited for the host). "
             f"MFU against {meta['peak_flops_source']}. Budget {meta['budget_s']:.0f} s, used {meta['wall_s']:.0f} s.",
             "", "| row | variant | batch | compile | SDPA | status | clips/s | step ms | kernel ms | GPU busy % | "
             "kernels/step | MFU % | peak MiB | first step s | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "model":
            continue
        lines.append("| " + " | ".join([
            r["row"], r["attention_type"], str(r["batch"]), r["compile"], sdpa_cell(r),
            r["status"] + (f": {r['message'][:80]}" if r.get("message") and r["status"] != "ok" else ""),
            fmt_cell(r.get("clips_per_s")), fmt_cell(r.get("step_ms"), ".2f"), fmt_cell(r.get("kernel_ms"), ".2f"),
            fmt_cell(None if r.get("kernel_share") is None else 100 * r["kernel_share"], ".0f"),
            fmt_cell(r.get("kernels_per_step"), ".0f"), fmt_cell(r.get("mfu_pct")), fmt_cell(r.get("peak_mib"), ".0f"),
            fmt_cell(r.get("first_step_s"), ".1f"), fmt_cell(r.get("compile_s"), ".1f")]) + " |")
    lines += [f"- {r['row']}: no kernel time, the profiler failed: {r['kernel_error']}" for r in rows
              if r.get("kernel_error")]
    if any(r["compile"] == "reduce-overhead" and r.get("kernel_ms") is not None for r in rows):
        lines.append("- reduce-overhead rows: their kernel ms come from a profile of CUDA graph replays, which CUPTI "
                     "before CUDA 13.1 Update 1 may attribute wrongly (a GPU busy % above 100 or near 0 says so); "
                     "their step ms and clips/s are timed without the profiler")
    lines += [f"- {r['row']}: the Triton attention's autotuned blocks: "
              + "; ".join(f"{shape}: {block}" for shape, block in r["triton_blocks"].items())
              for r in rows if r.get("triton_blocks")]
    lines += [f"- {r['row']}: torch warned: " + " | ".join(w[:160] for w in r["torch_warnings"][:3])
              for r in rows if r.get("torch_warnings")]
    for r in rows:
        if r["kind"] == "trainer":
            lines += ["", f"Trainer ({r['row']}, batch {r['batch']}): {r['status']}"
                      + (f", {r.get('message', '')[:200]}" if r["status"] != "ok" else
                         f", steady {fmt_cell(r.get('clips_per_s'))} clips/s, data wait up to "
                         f"{fmt_cell(r.get('data_wait_pct'))}%, syncs per micro-batch "
                         f"{fmt_cell(r.get('syncs_mean'), '.2f')} "
                         f"(max {fmt_cell(r.get('syncs_max'), '.0f')}), {r.get('steps')} steps in {r['wall_s']} s"),
                      "", f"`python {r['command']}`"]
    lines += ["", "Targets (set for one H100; judged on a GPU only, and only the rows that ran):", ""]
    lines += [f"- {what}: {verdict}" for what, verdict in judge(rows, on_gpu=meta["device"] == "cuda")]
    lines += ["", f"Temporal attention (eager, batch 8, clips/s by `model.temporal_attn_backend`): "
                  f"{temporal_choice(rows, on_gpu=meta['device'] == 'cuda')}"]
    return "\n".join(lines) + "\n"


def temporal_choice(rows: list[dict[str, Any]], on_gpu: bool) -> str:
    """The temporal-attention choice the rows measured: the clips/s of ``eager-b8`` (``same``: SDPA ``auto``) and of
    each ``temporal-*`` row, fastest first, and on a GPU the value they choose for ``model.temporal_attn_backend``."""
    rates = {r["temporal_backend"]: r["clips_per_s"] for r in rows
             if (r["row"] == "eager-b8" or r["row"].startswith("temporal-")) and r["status"] == "ok"
             and r.get("clips_per_s")}
    if not rates:
        return "not measured"
    ranked = sorted(rates.items(), key=lambda kv: -kv[1])
    figures = ", ".join(f"{backend} {fmt_cell(rate)}" for backend, rate in ranked)
    if not on_gpu:
        return f"not judged on a CPU ({figures})"
    best, rate = ranked[0]
    against = f", {100 * (rate / rates['same'] - 1):+.0f}% against same" if best != "same" and "same" in rates else ""
    return f"{figures}: fastest {best}{against}"


def judge(rows: list[dict[str, Any]], on_gpu: bool) -> list[tuple[str, str]]:
    """Each target of ``TARGETS`` and its verdict: met / missed (with the figure), not measured, or not judged."""
    by_name = {r["row"]: r for r in rows if r["status"] == "ok"}
    verdicts = []
    for name, key, bound, what in TARGETS:
        value = by_name.get(name, {}).get(key)
        if value is None:
            verdicts.append((what, "not measured"))
        elif not on_gpu:
            verdicts.append((what, f"not judged on a CPU ({fmt_cell(value, '.2f')})"))
        elif key == "syncs_max" and (by_name[name].get("syncs_mean") or 0.0) < READS_PER_MICRO_BATCH:
            verdicts.append((what, f"not judged: the counter missed the micro-batch's own read of its loss (mean "
                                   f"{fmt_cell(by_name[name].get('syncs_mean'), '.2f')} per micro-batch, not 1)"))
        else:
            met = value <= bound if key in ("step_ms", "syncs_max") else value >= bound
            verdicts.append((what, f"{'met' if met else 'missed'} ({fmt_cell(value, '.2f')})"))
    return verdicts


def run(out: Path, budget_s: float, only: list[str] | None, trainer_steps: int) -> list[dict[str, Any]]:
    """Every row that fits the budget, in ``ROWS`` order; the results rewritten after each."""
    device = resolve_device()
    cuda = device.type == "cuda"
    cfg, preset, device = resolve(preset=GPU_PRESET if cuda else "tiny",
                                  overrides=["bench.precision=bf16", "bench.warmup=2", "bench.steps=10",
                                             *([] if cuda else CPU_MODEL)])
    dtype = resolve_precision(cfg.bench.precision, device)
    precision = precision_name(dtype)
    peak = measure_peak(device, precision, cfg.bench.gemm_n)
    base = base_settings(cfg, preset, precision, device, peak)
    clock = Stopwatch()
    meta = {"started": run_stamp(), "device": device.type, "hardware": device_name(device),
            "env": environment_info(device),
            "precision": precision, "preset": preset, "frames": cfg.model.num_frames, "img_size": cfg.model.img_size,
            "warmup": cfg.bench.warmup, "steps": cfg.bench.steps, "peak_flops": peak[0],
            "peak_flops_source": peak[1], "budget_s": budget_s, "wall_s": 0.0}
    scale = 1.0 if device.type == "cuda" else 0.25  # a CPU row costs less than its GPU estimate
    results: list[dict[str, Any]] = []
    for row in ROWS:
        if only and row.name not in only:
            continue
        entry: dict[str, Any] = {"row": row.name, "kind": row.kind, "attention_type": row.attention_type,
                                 "batch": row.batch, "compile": row.compile, "backend": row.backend,
                                 "temporal_backend": row.temporal_backend}
        reason = skip_reason(row, cfg.model, device, dtype)
        timeout_s, over = row_timeout(row.estimate_s * scale, budget_s - clock.elapsed())
        if reason is not None or over is not None:
            entry.update(status="skipped", message=reason or over)
        elif row.kind == "trainer":
            entry.update(run_trainer(row, out, device, trainer_steps, timeout_s=timeout_s))
        else:
            case = model_case(row, base, cfg.model, device)
            rec = run_case(case, timeout_s=timeout_s)
            entry.update(batch=case.batch, record=rec.to_dict(), **figures(rec))
        record_row(out, results, entry, meta, clock.elapsed(), summary)
    return results


ROW_TIMEOUT_FACTOR = 3.0  # a row is stopped past this many times its estimate: one hung row leaves the rest their time


def row_timeout(need_s: float, left_s: float) -> tuple[float, str | None]:
    """A device script's row that needs about ``need_s`` with ``left_s`` of the budget left: its timeout (at most
    ``ROW_TIMEOUT_FACTOR`` times the estimate, at least a minute, never past the budget), or why it is skipped."""
    if need_s > left_s:
        return 0.0, f"over budget: {left_s:.0f} s left, the row needs about {need_s:.0f} s"
    return min(left_s, max(60.0, ROW_TIMEOUT_FACTOR * need_s)), None


def record_row(out: Path, rows: list[dict[str, Any]], entry: dict[str, Any], meta: dict[str, Any], wall_s: float,
               summary_of: Callable[[list[dict[str, Any]], dict[str, Any]], str]) -> None:
    """Log a device script's finished row, add it to ``rows`` and rewrite ``results.json`` and ``summary.md`` (made by
    ``summary_of``), so that a run cut short keeps what it measured."""
    logger.info("%s: %s %s", entry["row"], entry["status"], entry.get("message") or "")
    rows.append(entry)
    meta["wall_s"] = wall_s
    atomic_write_text(out / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "summary.md", summary_of(rows, meta))


def script_parser(prog: str, doc: str, row_names: list[str], budget_s: float) -> argparse.ArgumentParser:
    """The options every device script takes (``make gpu-perf``, ``make gpu-input``): ``--out``, ``--budget-s``,
    ``--rows`` and ``--rehearse-on-cpu``."""
    name = prog.rsplit(".", 1)[-1]
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0])
    p.add_argument("--out", default=None,
                   help=f"output folder (default runs/{name}/<timestamp> under the current folder)")
    p.add_argument("--budget-s", type=float, default=budget_s,
                   help=f"seconds the run may take (default {budget_s:.0f})")
    p.add_argument("--rows", nargs="*", default=None, help=f"only these rows, from {row_names}")
    p.add_argument("--rehearse-on-cpu", action="store_true", help="run without a GPU, at CPU size")
    return p


def script_start(p: argparse.ArgumentParser, args: argparse.Namespace, row_names: list[str]) -> Path | None:
    """Check a device script's arguments (``p.error`` on an unknown row) and make its output folder (``--out``, or
    ``runs/<script>/<timestamp>`` under the current folder); None when there is no GPU and no ``--rehearse-on-cpu``,
    or the folder cannot be written (said on stderr)."""
    setup_logging()
    exit_on_sigterm()  # the running row's process group is killed on the way out, not left on the GPU
    name = p.prog.rsplit(".", 1)[-1]
    unknown = sorted(set(args.rows or []) - set(row_names))
    if unknown:
        p.error(f"--rows {unknown}: choose from {row_names}")
    if not torch.cuda.is_available() and not args.rehearse_on_cpu:
        print(f"{name.replace('_', '-')}: no CUDA device; run it on a GPU, or rehearse with --rehearse-on-cpu",
              file=sys.stderr)
        return None
    try:
        if args.out:  # absolute: the Trainer row runs in the clone's root
            return check_output_root(Path(args.out).absolute())
        return new_run_dir(Path("runs", name).absolute(), run_stamp())
    except OutputFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def script_end(out: Path, rows: list[dict[str, Any]]) -> int:
    """Print the summary; the exit status: 0 when a row measured and every other row that ran ran out of memory (a
    result: where the batch stops fitting), else 1."""
    print((out / "summary.md").read_text())
    ran = [r["status"] for r in rows if r["status"] != "skipped"]
    return 0 if "ok" in ran and set(ran) <= {"ok", "oom"} else 1


def main(argv: list[str] | None = None) -> int:
    names = [r.name for r in ROWS]
    p = script_parser("timesformer_harness.gpu_perf", __doc__, names, budget_s=540.0)
    p.add_argument("--trainer-steps", type=int, default=30, help="the Trainer row's optimizer steps (default 30)")
    args = p.parse_args(argv)
    out = script_start(p, args, names)
    if out is None:
        return 2
    return script_end(out, run(out, args.budget_s, args.rows, args.trainer_steps))


if __name__ == "__main__":
    sys.exit(main())
