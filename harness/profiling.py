"""torch.profiler over real train steps: TensorBoard trace, Perfetto trace and a text summary.

    python -m timesformer_harness.profiling --attn divided_space_time [--preset NAME] [--steps 3] [--wait 1]
        [--warmup 1] [--out runs/profile] [model.KEY=VALUE ...] [bench.batch_size=N ...]

One process, one model: the train step of ``model.*`` on synthetic input, at ``bench.batch_size``,
``bench.precision``, ``bench.channels_last`` and ``bench.threads`` (the only bench keys it reads; the schedule is
``--wait``/``--warmup``/``--steps``). Ctrl-C or SIGTERM stops it without keeping a partial trace.

Writes ``runs/profile/<timestamp>-<attn>/``:
- ``<worker>.<id>.pt.trace.json`` from ``tensorboard_trace_handler`` (``make tensorboard``, torch-tb-profiler);
- ``trace_perfetto.json``, the same Chrome-trace JSON under a fixed name (open at https://ui.perfetto.dev);
- ``summary.md``: top ops by self time, the share of the step in the ``attn/temporal``, ``attn/spatial`` and
  ``attn/joint`` ranges the model emits, memory, and FLOPs.

The torch-tb-profiler UI loads Google Charts from the internet and stays blank offline; its data endpoints work,
and Perfetto or the summary are the offline views.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from timesformer_harness.config import RootConfig, to_yaml
from timesformer_harness.metrics import OutputFolderError
from timesformer_harness.runtime import retain_freed_memory
from timesformer_harness.variants import REFERENCE, VARIANTS
from timesformer_harness.common import atomic_write_text, exit_on_sigterm, setup_logging

logger = logging.getLogger(__name__)

ATTN_RANGES = ("attn/temporal", "attn/spatial", "attn/joint")
STEP_RANGE = "train_step"
FORWARD_RANGE = "forward"
MAX_OP_NAME = 120  # key_averages.txt: wide enough for aten's longest names (the table's default cuts at 55)
# the bench keys the profile reads; the others would be ignored, so an override of one is refused with this hint
PROFILE_BENCH_KEYS = ("batch_size", "precision", "channels_last", "preset", "threads")
UNUSED_KEY_HINTS = {"bench.steps": "--steps", "bench.warmup": "--wait and --warmup", "bench.out_dir": "--out"}
# the scaled_dot_product_attention kernels aten dispatches to (their backward ops share the prefix)
SDPA_OP = re.compile(r"aten::_scaled_dot_product_(flash_attention_for_cpu|flash_attention|efficient_attention|"
                     r"cudnn_attention|attention_math)")


@dataclass
class ProfileSummary:
    """What summary.md reports, also returned to callers (tests).

    On CPU every time is CPU time. On CUDA the step's and forward's wall times stay CPU-side (the step ends with a
    synchronise), while the attention ranges, their shares and the top ops use GPU time: a range's CPU time there
    is only the time to launch its kernels.
    """

    run_dir: str
    attention_type: str
    steps: int
    step_ms: float  # mean over the active steps (profiler overhead included)
    forward_ms: float
    time_basis: str = "CPU"  # what range_ms, the shares, attn_backward_ms and top_ops measure: CPU | GPU
    step_device_ms: float = 0.0  # GPU span of the train_step range per step (CUDA only)
    forward_device_ms: float = 0.0  # GPU span of the forward range per step (CUDA only)
    range_ms: dict[str, float] = field(default_factory=dict)  # time inside each attention range per step
    range_share_of_step: dict[str, float] = field(default_factory=dict)
    range_share_of_forward: dict[str, float] = field(default_factory=dict)
    attn_backward_ms: float = 0.0  # time of the attention's backward autograd nodes per step, their operators included
    attention_ms: float = 0.0  # forward ranges + backward nodes, per step
    attention_share_of_step: float = 0.0
    sdpa_kernels: list[str] = field(default_factory=list)  # the SDPA kernels that ran (auto's choice, e.g. flash)
    top_ops: list[tuple[str, float, int]] = field(default_factory=list)  # (name, self ms per step, calls)
    peak_mem_bytes: int = 0
    peak_mem_kind: str = ""
    flops_per_step: int = 0
    achieved_flops: float = 0.0


def _on_cpu(evt: Any) -> bool:
    return evt.device_type == DeviceType.CPU


AUTOGRAD_NODE = "autograd::engine::evaluate_function: "
# The attention's backward nodes: a fused kernel's (SDPA's, our Triton op's), or for the math and naive backends the
# batched matmuls and the softmax they are made of (the model has no other bmm or softmax; the loss's is LogSoftmax).
ATTENTION_NODE = re.compile(r".*(attention|scaleddotproduct)|bmmbackward|(safe)?softmaxbackward", re.IGNORECASE)


def _is_attention_backward(name: str) -> bool:
    """``name`` is the event of an autograd node of the attention's backward (its time includes its operators')."""
    return name.startswith(AUTOGRAD_NODE) and ATTENTION_NODE.match(name[len(AUTOGRAD_NODE):]) is not None


def summarise(events: Iterable[Any], steps: int, attention_type: str, run_dir: Path, top: int = 15
              ) -> ProfileSummary:
    """Aggregate the profiler's averaged events (``prof.key_averages()``: ``FunctionEventAvg``) of the active steps.

    With CUDA activity the times are kernel time: a range's GPU time is the device time of the kernels launched
    inside it (its CPU event's ``device_time_total``, children included), and the step's GPU time is the busy time
    of every kernel of the step (the sum of all CPU events' self device time: backward runs on autograd's own
    thread, outside the ``train_step`` range). The GPU annotations that the profiler adds for each range (another
    ``device_type``, CPU time 0) are not used: on an H100 under torch 2.11 the ``train_step`` annotation spanned
    a fraction of the forward's, so shares against it exceeded 100%.
    """
    events = list(events)
    cpu = {e.key: e for e in events if _on_cpu(e)}
    on_gpu = any(_device_us(e) > 0 for e in events)
    step = cpu.get(STEP_RANGE)
    assert step is not None and step.cpu_time_total > 0, \
        f"no {STEP_RANGE!r} range in the profile; was the schedule's active phase reached?"
    fwd = cpu.get(FORWARD_RANGE)
    step_us = step.cpu_time_total / max(step.count, 1)
    fwd_us = fwd.cpu_time_total / max(fwd.count, 1) if fwd else 0.0
    s = ProfileSummary(run_dir=str(run_dir), attention_type=attention_type, steps=steps, step_ms=step_us / 1e3,
                       forward_ms=fwd_us / 1e3, time_basis="GPU" if on_gpu else "CPU")

    def range_device_us(name: str) -> float:  # per step: the kernels launched inside the range
        return _device_us(cpu[name]) / steps if name in cpu else 0.0

    if on_gpu:
        s.step_device_ms = sum(float(e.self_device_time_total) for e in cpu.values()) / steps / 1e3
        s.forward_device_ms = range_device_us(FORWARD_RANGE) / 1e3
    base_step, base_fwd = (s.step_device_ms, s.forward_device_ms) if on_gpu else (s.step_ms, s.forward_ms)
    for name in ATTN_RANGES:
        if name not in cpu:
            continue
        ms = (range_device_us(name) if on_gpu else cpu[name].cpu_time_total / steps) / 1e3
        s.range_ms[name] = ms
        s.range_share_of_step[name] = ms / base_step if base_step else 0.0
        s.range_share_of_forward[name] = ms / base_fwd if base_fwd else 0.0
    ours = set(ATTN_RANGES) | {STEP_RANGE, FORWARD_RANGE, "backward", "optimizer"}
    # operators only (CPU events; on CUDA they carry their own kernels' time): not our ranges, not kernels
    ops = [e for e in cpu.values() if e.key not in ours and not e.key.startswith("ProfilerStep")]

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if on_gpu else e.self_cpu_time_total)

    ops.sort(key=self_us, reverse=True)
    s.top_ops = [(e.key, self_us(e) / steps / 1e3, e.count // steps) for e in ops[:top]]
    total_us = _device_us if on_gpu else (lambda e: float(e.cpu_time_total))
    s.attn_backward_ms = sum(total_us(e) for e in ops if _is_attention_backward(e.key)) / steps / 1e3
    s.attention_ms = sum(s.range_ms.values()) + s.attn_backward_ms
    s.attention_share_of_step = s.attention_ms / base_step if base_step else 0.0
    s.sdpa_kernels = sorted({m[1] for e in cpu.values() if (m := SDPA_OP.match(e.key))})
    return s


def _device_us(evt: Any) -> float:
    return float(getattr(evt, "device_time_total", 0.0) or 0.0)


def write_summary(s: ProfileSummary, path: Path, extra: dict[str, Any]) -> None:
    gpu = s.time_basis == "GPU"
    step_ms = s.step_device_ms if gpu else s.step_ms  # what the shares are of
    basis = ("The step and forward times are wall times (CPU side; the step ends with a synchronise); the attention "
             "ranges, the step's GPU time, the shares and the op times are kernel time on the GPU (a step's is every "
             "kernel it ran, backward included; idle gaps between kernels are not counted)." if gpu else
             "Times are CPU-side wall times.")
    lines = [f"# Profile: {s.attention_type}", "",
             f"preset `{extra['preset']}`, batch {extra['batch']}, {extra['frames']}x{extra['img_size']}, "
             f"{extra['precision']}, device {extra['device']}, {s.steps} active steps (wait {extra['wait']}, "
             f"warmup {extra['warmup']}). {basis} All include profiler overhead.", "",
             f"- train step: {s.step_ms:.1f} ms (forward {s.forward_ms:.1f} ms)"
             + (f"; GPU kernel time {s.step_device_ms:.1f} ms (forward {s.forward_device_ms:.1f} ms)" if gpu else ""),
             f"- peak memory: {s.peak_mem_bytes / 2**20:.0f} MiB ({s.peak_mem_kind})",
             f"- FLOPs per step (fwd+bwd, counted): {s.flops_per_step / 1e9:.1f} GFLOP; achieved "
             f"{s.achieved_flops / 1e9:.1f} GFLOP/s (profiler overhead included)", "",
             "## Attention share", "",
             "The attn/* record_function ranges cover the qkv projection and the attention kernel of the forward "
             "pass; backward runs outside them, so attention backward is counted as the time of its autograd nodes "
             "(the fused kernel's backward, or the math and naive backends' batched matmuls and softmax), the "
             "operators they run included.", "",
             f"| range | {s.time_basis} ms per step | share of step | share of forward |", "|---|---|---|---|"]
    for name in ATTN_RANGES:
        if name in s.range_ms:
            lines.append(f"| {name} | {s.range_ms[name]:.1f} | {100 * s.range_share_of_step[name]:.1f}% "
                         f"| {100 * s.range_share_of_forward[name]:.1f}% |")
    total = s.attention_ms
    share = (lambda ms: f"{100 * ms / step_ms:.1f}%" if step_ms else "n/a")  # noqa: E731
    lines += ["", f"Attention backward ({s.time_basis} time of its autograd nodes): {s.attn_backward_ms:.1f} ms "
              f"per step ({share(s.attn_backward_ms)} of the step).",
              f"Attention in total (forward ranges + backward nodes): {total:.1f} ms, "
              f"{share(total)} of the step.", "",
              f"## Top ops by self {s.time_basis} time", "",
              f"| op | self {s.time_basis} ms per step | calls per step |", "|---|---|---|"]
    lines += [f"| `{name}` | {ms:.2f} | {calls} |" for name, ms, calls in s.top_ops]
    lines += ["", "## Files", "",
              "- `*.pt.trace.json`: TensorBoard (`make tensorboard`, torch-tb-profiler; its UI needs internet)",
              "- `trace_perfetto.json`: open at https://ui.perfetto.dev or chrome://tracing",
              "- `key_averages.txt`: the profiler's operator table, every op",
              "- `summary.json`: this summary's figures (ProfileSummary), for tools", ""]
    atomic_write_text(path, "\n".join(lines))
    atomic_write_text(path.with_suffix(".json"), json.dumps({**asdict(s), **extra}, indent=2) + "\n")


class ProfileStopped(Exception):
    """Ctrl-C or SIGTERM during a profile: its run folder was removed (a partial trace would read as a whole one)."""

    def __init__(self, run_dir: Path, done: int, total: int, code: int) -> None:
        signal_name = "SIGTERM" if code == 143 else "Ctrl-C" if code == 130 else f"exit {code}"
        when = f"after {done} of {total} steps" if done < total else f"after its {total} steps, while writing its files"
        super().__init__(f"stopped by {signal_name} {when}; removed the unfinished run {run_dir}")
        self.code = code


def _stop_request(error: BaseException) -> KeyboardInterrupt | SystemExit | None:
    """The Ctrl-C or SIGTERM exit (``common.exit_on_sigterm``) behind ``error``: itself, or an exception raised while
    handling one (the profiler's own clean-up can fail on the way out of an interrupted step)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def run_profile(cfg: RootConfig, preset: str, steps: int = 3, wait: int = 1, warmup: int = 1,
                out_root: str | Path = "runs/profile", with_stack: bool = False) -> ProfileSummary:
    """Profile ``wait + warmup + steps`` train steps of ``cfg.model`` (``timesformer_harness.workload.TrainStep``,
    synthetic input, ``cfg.bench`` batch/precision/channels-last/threads) and write the run directory.

    The step's pieces run inside the ranges ``train_step`` > ``forward`` / ``backward`` / ``optimizer``.

    The trace keeps a name TensorBoard does not list (``.partial``) until the run's other files are written: a run
    folder with a trace is a whole run. Whatever stops the profile before that removes the run folder.

    Raises:
        OutputFolderError: ``out_root`` cannot hold the run folder, or the trace could not be written.
        ProfileStopped: Ctrl-C, or SIGTERM through ``common.exit_on_sigterm``.
    """
    import torch

    from timesformer_harness.metrics import new_run_dir, run_stamp

    run_dir = new_run_dir(out_root, f"{run_stamp()}-{cfg.model.attention_type}")
    done = [0]
    total = wait + warmup + steps
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.bench.threads or threads)
        return _profile_into(run_dir, cfg, preset, steps, wait, warmup, with_stack, done)
    except BaseException as e:
        shutil.rmtree(run_dir, ignore_errors=True)
        stop = _stop_request(e)
        if stop is None:
            raise
        code = 130 if isinstance(stop, KeyboardInterrupt) else stop.code if isinstance(stop.code, int) else 1
        raise ProfileStopped(run_dir, done[0], total, code) from None
    finally:
        torch.set_num_threads(threads)


def _profile_into(run_dir: Path, cfg: RootConfig, preset: str, steps: int, wait: int, warmup: int,
                  with_stack: bool, done: list[int]) -> ProfileSummary:
    """``run_profile``'s work in ``run_dir``; ``done[0]`` counts the steps run."""
    from dataclasses import replace

    import torch

    from timesformer_harness.counting import count_flops
    from timesformer_harness.metrics import PeakMemory, synchronize
    from timesformer_harness.runtime import (device_name, precision_name, resolve_device, resolve_precision,
                                             seed_everything)
    from timesformer_harness.workload import TrainStep, build_model, synthetic_batch

    device = resolve_device()
    seed_everything(0)
    dtype = resolve_precision(cfg.bench.precision, device)
    mcfg = cfg.model
    attention_type = mcfg.attention_type
    B, T, S = cfg.bench.batch_size, mcfg.num_frames, mcfg.img_size
    memory = PeakMemory(device, release_freed=True)
    model = build_model(mcfg, device, dtype=dtype, channels_last=cfg.bench.channels_last)
    video, labels = synthetic_batch(mcfg, device, B)
    train = TrainStep.build(model, device, dtype)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # torch-tb-profiler's name for a worker's trace, with ".partial" until the run's files are all written
    staged = run_dir / f"{attention_type}.{time.time_ns()}.pt.trace.json.partial"

    def on_ready(p: profile) -> None:
        p.export_chrome_trace(str(staged))
        if not staged.is_file():  # the profiler logs a failed write ("Failed to write to log file!") without raising
            raise OutputFolderError(f"could not write the trace under {run_dir} (a full disk, or a file size limit?); "
                                    f"the run folder is removed: free space, or give --out elsewhere")

    with profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=steps, repeat=1),
                 on_trace_ready=on_ready, record_shapes=True, profile_memory=True, with_stack=with_stack,
                 with_flops=False) as prof:  # FLOPs come from counting.py (the profiler's miss CPU SDPA)
        for _ in range(wait + warmup + steps):
            with record_function(STEP_RANGE):
                with record_function(FORWARD_RANGE):
                    _, loss = train.forward(video, labels)
                with record_function("backward"):
                    train.backward(loss)
                with record_function("optimizer"):
                    train.optimizer_step()
                synchronize(device)
            done[0] += 1
            prof.step()
    s = summarise(prof.key_averages(), steps, attention_type, run_dir)
    peak = memory.take()
    if peak is not None:
        s.peak_mem_bytes, s.peak_mem_kind = peak.growth, peak.kind
    if device.type == "cpu":
        s.peak_mem_kind = "rss: growth of this process (includes profiler buffers)"
    s.flops_per_step = count_flops(mcfg, batch=B, mode="train")
    s.achieved_flops = s.flops_per_step / (s.step_ms / 1e3)
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    atomic_write_text(run_dir / "key_averages.txt", prof.key_averages().table(
        sort_by=sort_key, row_limit=-1, max_name_column_width=MAX_OP_NAME))
    write_summary(s, run_dir / "summary.md", {
        "preset": preset, "batch": B, "frames": T, "img_size": S, "precision": precision_name(dtype),
        "device": device_name(device), "wait": wait, "warmup": warmup})
    # the config as profiled: the schedule in the bench's terms (untimed steps, recorded steps, where), the precision
    # and thread count resolved
    ran = replace(cfg.bench, steps=steps, warmup=wait + warmup, out_dir=str(run_dir.parent),
                  precision=precision_name(dtype), threads=torch.get_num_threads())
    atomic_write_text(run_dir / "config.yaml", to_yaml(replace(cfg, bench=ran)))
    perfetto = run_dir / "trace_perfetto.json"  # the same file under a fixed name
    try:
        os.link(staged, perfetto)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(staged, perfetto)
    os.replace(staged, staged.with_suffix(""))  # last: the run is whole
    return s


def check_overrides(overrides: list[str], attn: str | None) -> list[str]:
    """The profile's overrides with ``--attn`` (when given) as ``model.attention_type``. Raises ValueError for a key
    the profile would ignore (any outside ``model.*`` and ``PROFILE_BENCH_KEYS``), naming the flag that does its
    job, and for a ``model.attention_type`` that contradicts ``--attn``."""
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip().lstrip("+")
        if key == "model.attention_type" and attn is not None and value.strip() != attn:
            raise ValueError(f"{item} contradicts --attn {attn}: give one of them")
        if key.startswith("model.") or key in {f"bench.{k}" for k in PROFILE_BENCH_KEYS}:
            continue
        hint = UNUSED_KEY_HINTS.get(key)
        raise ValueError(f"{key}: the profiler does not read it (it profiles one model's train step on synthetic "
                         f"input: model.* and bench.{', bench.'.join(PROFILE_BENCH_KEYS)})"
                         + (f"; use {hint}" if hint else ""))
    return [*overrides, f"model.attention_type={attn}"] if attn is not None else list(overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m timesformer_harness.profiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--attn", default=None, help=f"{' | '.join(VARIANTS)} (default: model.attention_type, "
                                                f"{REFERENCE})")
    p.add_argument("--preset", default=None,
                   help="model preset (configs/model/NAME.yaml; default bench.preset, else cpu_bench without a GPU "
                        "and vit_base_patch16 with one)")
    p.add_argument("--steps", type=int, default=3, help="active (recorded) steps (default 3)")
    p.add_argument("--wait", type=int, default=1, help="steps run before the profiler records (default 1)")
    p.add_argument("--warmup", type=int, default=1,
                   help="steps recorded and then discarded, after --wait (default 1)")
    p.add_argument("--out", default="runs/profile", help="the run folder's root (default runs/profile)")
    p.add_argument("--with-stack", action="store_true", help="record Python stacks (bigger traces)")
    p.add_argument("overrides", nargs="*",
                   help=f"key=value overrides of model.* and bench.{{{','.join(PROFILE_BENCH_KEYS)}}}, "
                        "e.g. model.depth=2")
    args = p.parse_args(argv)
    setup_logging()
    exit_on_sigterm()
    retain_freed_memory()
    from timesformer_harness.bench import resolve

    if args.attn is not None and args.attn not in VARIANTS:
        p.error(f"--attn {args.attn!r}: the profiler takes one variant, from {list(VARIANTS)}")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: record at least 1 step")
    if args.wait < 0 or args.warmup < 0:
        p.error(f"--wait and --warmup count steps: 0 or more (got --wait {args.wait}, --warmup {args.warmup})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("the profiler runs as one process: start it with python, not torchrun (each rank would profile the "
                "same model on the same GPU); pick a GPU with CUDA_VISIBLE_DEVICES")
    try:
        cfg, preset, _ = resolve(preset=args.preset, overrides=check_overrides(args.overrides, args.attn))
    except (ValueError, KeyError, FileNotFoundError) as e:
        p.error(str(e))
    try:
        s = run_profile(cfg, preset, steps=args.steps, wait=args.wait, warmup=args.warmup, out_root=args.out,
                        with_stack=args.with_stack)
    except OutputFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ProfileStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    print((Path(s.run_dir) / "summary.md").read_text())
    print(f"profile: {s.run_dir}  (make tensorboard; or open trace_perfetto.json in https://ui.perfetto.dev)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
