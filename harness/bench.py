"""Throughput, memory, FLOPs and utilisation per attention variant: model, attention, scaling, pipeline, e2e suites.

    python -m harness.bench --attn divided_space_time|joint_space_time|space_only|all [--preset NAME]
        [--mode train|infer|both] [--frames 8,16,32] [--img 224,448] [--suites model,attention,...] [--out DIR]
        [--config FILE] [key=value ...]

Every case runs in a fresh subprocess (``python -m harness.bench --worker SPEC``): on CPU that is what makes its
peak RSS its own, and everywhere it keeps an out-of-memory case from poisoning the next one. A case that runs out
of memory is recorded as ``oom`` and the sweep goes on. Outputs go to ``runs/bench/<timestamp>-<attn>/``:
``results.json`` (harness.metrics.BenchRecord, versioned), ``summary.md``, ``config.yaml`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

from harness.config import ATTENTION_TYPES, REPO_ROOT, ModelConfig, RootConfig, load_config, to_yaml
from harness.metrics import (BenchRecord, fill_throughput, gemm_workload, gpu_peak_flops, is_oom, measure_gemm_flops,
                             peak_memory, reset_peak_memory, time_steps, time_steps_interleaved, write_results)
from harness.runtime import (autocast, device_name, environment_info, precision_name, resolve_device,
                             resolve_precision, seed_everything)

logger = logging.getLogger(__name__)

SUITES = ("model", "attention", "scaling", "pipeline", "e2e")
RECORD_MARK = "BENCH_RECORD "
# Attention shapes each variant runs (the attention suite).
VARIANT_SHAPES = {
    "divided_space_time": ("temporal", "spatial"),
    "joint_space_time": ("joint",),
    "space_only": ("spatial",),
}


# ------------------------------------------------------------------------------------------ case specs

def default_preset(device: torch.device) -> str:
    return "vit_base_patch16" if device.type == "cuda" else "cpu_bench"


def attention_types(attn: str) -> list[str]:
    if attn == "all":
        return list(ATTENTION_TYPES)
    if attn not in ATTENTION_TYPES:
        raise ValueError(f"--attn {attn!r}; choose from {list(ATTENTION_TYPES) + ['all']}")
    return [attn]


def modes_of(mode: str) -> list[str]:
    if mode == "both":
        return ["train", "infer"]
    if mode not in ("train", "infer"):
        raise ValueError(f"--mode {mode!r}; choose train, infer or both")
    return [mode]


def build_cases(cfg: RootConfig, preset: str, attns: list[str], modes: list[str], device: torch.device,
                peak: tuple[float | None, str | None]) -> list[dict[str, Any]]:
    """The list of case specs (plain dicts, JSON-serialisable) for the selected suites."""
    b = cfg.bench
    unknown = sorted(set(b.suites) - set(SUITES))
    if unknown:
        raise ValueError(f"unknown bench suites {unknown}; choose from {list(SUITES)}")
    base = {
        "preset": preset, "model": asdict(cfg.model), "batch": b.batch_size, "precision": b.precision,
        "channels_last": b.channels_last, "warmup": b.warmup, "steps": b.steps, "device": str(device),
        "mem_limit_gb": b.mem_limit_gb, "peak_flops": peak[0], "peak_flops_source": peak[1],
        "gemm_n": b.gemm_n if device.type == "cpu" else 0,
    }
    T, S = cfg.model.num_frames, cfg.model.img_size
    cases: list[dict[str, Any]] = []
    if "model" in b.suites:
        for attn in attns:
            for mode in modes:
                cases.append({**base, "suite": "model", "attention_type": attn, "mode": mode, "frames": T,
                              "img_size": S})
    if "attention" in b.suites:
        from kernels.attention import available_backends

        backends = available_backends(device, resolve_precision(b.precision, device),  # the cases' dtype
                                      cfg.model.embed_dim // cfg.model.num_heads)
        shapes = [s for s in ("temporal", "spatial", "joint") if any(s in VARIANT_SHAPES[a] for a in attns)]
        attn_mode = "train" if "train" in modes else "infer"  # forward+backward when training is asked for
        for shape in shapes:
            owner = next(a for a in attns if shape in VARIANT_SHAPES[a])  # the variant this shape belongs to
            for backend in backends:
                cases.append({**base, "suite": "attention", "shape": shape, "backend": backend, "mode": attn_mode,
                              "frames": T, "img_size": S, "attention_type": owner})
    if "scaling" in b.suites:
        # Default sweep: T, 2T (and 4T on a GPU); the CPU default must fit `make bench` in 5 minutes on 2 cores.
        frames = list(b.frames) or ([T, 2 * T, 4 * T] if device.type == "cuda" else [T, 2 * T])
        sizes = list(b.img_sizes) or [S]
        mode = "train" if "train" in modes else "infer"
        for attn in attns:
            for s in sizes:
                for t in frames:
                    if "model" in b.suites and (t, s) == (T, S):
                        continue  # the model suite already measured this point
                    cases.append({**base, "suite": "scaling", "attention_type": attn, "mode": mode, "frames": t,
                                  "img_size": s, "warmup": b.sweep_warmup, "steps": b.sweep_steps})
    data_cfg = str(REPO_ROOT / b.data_config) if not os.path.isabs(b.data_config) else b.data_config
    if "pipeline" in b.suites:
        for loader in ("dali", "pyav"):
            cases.append({**base, "suite": "pipeline", "backend": loader, "data_config": data_cfg,
                          "batches": b.pipeline_batches})
    if "e2e" in b.suites:
        # The experiment the data config describes (its own model, e.g. the toy model): is `make train` input-bound?
        exp_model = base["model"]
        if Path(data_cfg).is_file() and load_config(data_cfg).model != ModelConfig():  # the file sets a model
            exp_model = asdict(load_config(data_cfg).model)
        for attn in attns[:1]:  # one variant by default (the first); --attn picks another
            cases.append({**base, "suite": "e2e", "attention_type": attn, "mode": "train", "data_config": data_cfg,
                          "model": exp_model, "batches": b.pipeline_batches,
                          "threshold": b.input_bound_threshold})
    return cases


def case_name(spec: dict[str, Any]) -> str:
    suite = spec["suite"]
    if suite == "attention":
        return f"attention/{spec['shape']}/{spec['backend']}/{spec['mode']}"
    if suite == "pipeline":
        return f"pipeline/{spec['backend']}"
    if suite == "e2e":
        return f"e2e/{spec['attention_type']}"
    return f"{suite}/{spec['attention_type']}/{spec['mode']}/{spec['frames']}x{spec['img_size']}"


# ------------------------------------------------------------------------------------------ worker side

def _limit_address_space(limit_gb: float) -> None:
    """Cap this process's address space at (current + limit) so a too-big CPU case fails with an allocation
    error (recorded as ``oom``) instead of swapping the shared machine."""
    if limit_gb <= 0:
        return
    import psutil

    vms = psutil.Process().memory_info().vms
    cap = vms + int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _new_record(spec: dict[str, Any], device: torch.device, precision: str) -> BenchRecord:
    return BenchRecord(
        suite=spec["suite"], case=case_name(spec), attention_type=spec.get("attention_type"),
        preset=spec.get("preset"), frames=spec.get("frames"), img_size=spec.get("img_size"), batch=spec.get("batch"),
        precision=precision, mode=spec.get("mode"), backend=spec.get("backend"), device=device.type,
        device_name=device_name(device), peak_flops=spec.get("peak_flops"),
        peak_flops_source=spec.get("peak_flops_source"),
    )


def _model_config(spec: dict[str, Any], **overrides: Any) -> ModelConfig:
    cfg = ModelConfig(**spec["model"])
    return replace(cfg, **{"attention_type": spec["attention_type"], **overrides})


def _build_model(cfg: ModelConfig, device: torch.device, channels_last: bool) -> torch.nn.Module:
    from harness.model import create_model

    model = create_model(cfg).to(device)
    if channels_last:
        model.set_channels_last(True)
    return model


def _train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                   dtype: torch.dtype | None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def model_step(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, *, mode: str, batch: int,
               frames: int, img_size: int, channels_last: bool) -> tuple[torch.nn.Module, Callable[[], None]]:
    """The model of ``cfg`` on ``device`` and one step on random (batch, 3, frames, img_size, img_size) input: a
    train step (forward, backward, SGD step) for ``mode == "train"``, else an inference forward."""
    model = _build_model(cfg, device, channels_last)
    x = torch.randn(batch, 3, frames, img_size, img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    if mode == "train":
        return model, _train_step_fn(model, x, y, device, dtype)
    model.eval()

    def step() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            model(x)

    return model, step


def run_model_case(spec: dict[str, Any], rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """Model-only train step (forward, backward, SGD step) or inference on synthetic input."""
    from harness.counting import count_flops, count_params

    T, S, B = spec["frames"], spec["img_size"], spec["batch"]
    cfg = _model_config(spec)
    rec.flops_per_clip = count_flops(cfg, batch=1, frames=T, img_size=S, mode=spec["mode"])
    base = reset_peak_memory(device)
    model, step = model_step(cfg, device, dtype, mode=spec["mode"], batch=B, frames=T, img_size=S,
                             channels_last=spec["channels_last"])
    rec.params = count_params(model)
    times = _timed(step, rec, spec, device)
    rec.peak_mem_bytes, rec.peak_mem_kind = peak_memory(device, base)
    fill_throughput(rec, times, clips_per_step=B, frames=T)


def _timed(step, rec: BenchRecord, spec: dict[str, Any], device: torch.device) -> list[float]:
    """Time the steps; on CPU interleave an fp32 GEMM after each step and use its median rate as the peak, so
    utilisation compares the model with the GEMM under the same load (a once-per-run GEMM swung 76-222 GFLOP/s
    on this shared machine)."""
    if device.type == "cuda" or not spec.get("gemm_n"):
        return time_steps(step, device, spec["warmup"], spec["steps"])
    gemm, gemm_flops = gemm_workload(device, spec["gemm_n"])
    times, gemm_times = time_steps_interleaved(step, gemm, device, spec["warmup"], spec["steps"])
    rec.peak_flops = gemm_flops / statistics.median(gemm_times)
    rec.peak_flops_source = f"fp32 GEMM n={spec['gemm_n']} interleaved with the steps"
    return times


def attention_shape(cfg: ModelConfig, shape: str, B: int, T: int, S: int) -> tuple[int, int, int, int]:
    """(sequences, heads, L, head_dim) of one attention call of ``shape`` inside a block."""
    N = (S // cfg.patch_size) ** 2
    hd = cfg.embed_dim // cfg.num_heads
    if shape == "temporal":
        return B * N, cfg.num_heads, T, hd  # one sequence per patch position
    if shape == "spatial":
        return B * T, cfg.num_heads, 1 + N, hd  # one sequence per frame, CLS included
    if shape == "joint":
        return B, cfg.num_heads, 1 + N * T, hd
    raise ValueError(f"attention shape {shape!r}; choose temporal, spatial or joint")


def run_attention_case(spec: dict[str, Any], rec: BenchRecord, device: torch.device,
                       dtype: torch.dtype | None) -> None:
    """One attention call (forward, or forward+backward) of a block's shape with one backend."""
    from kernels.attention import attention

    cfg = ModelConfig(**spec["model"])
    B, T, S = spec["batch"], spec["frames"], spec["img_size"]
    nseq, H, L, hd = attention_shape(cfg, spec["shape"], B, T, S)
    fwd_flops = 4 * nseq * H * L * L * hd  # QK^T and AV, 2 FLOPs per multiply-add
    rec.flops_per_clip = (3 * fwd_flops if spec["mode"] == "train" else fwd_flops) // B
    rec.extra.update({"shape": spec["shape"], "sequences": nseq, "heads": H, "seq_len": L, "head_dim": hd})
    base = reset_peak_memory(device)
    q, k, v = (torch.randn(nseq, H, L, hd, device=device, dtype=dtype or torch.float32,
                           requires_grad=spec["mode"] == "train") for _ in range(3))
    backend = spec["backend"]
    if spec["mode"] == "train":
        grad = torch.randn(nseq, H, L, hd, device=device, dtype=q.dtype)

        def step() -> None:
            q.grad = k.grad = v.grad = None
            attention(q, k, v, backend=backend).backward(grad)
    else:
        def step() -> None:
            with torch.inference_mode():
                attention(q, k, v, backend=backend)

    times = _timed(step, rec, spec, device)
    rec.peak_mem_bytes, rec.peak_mem_kind = peak_memory(device, base)
    fill_throughput(rec, times, clips_per_step=B, frames=T)


def _load_data_config(spec: dict[str, Any]):
    path = spec["data_config"]
    cfg = load_config(path) if Path(path).is_file() else RootConfig()
    return cfg.data


def _build_loader(spec: dict[str, Any], device: torch.device, loader: str):
    """The pipelines engineer's loader, or a clear reason it cannot be built here (raised as RuntimeError)."""
    try:
        from pipelines import build_loader
    except ImportError as e:
        raise RuntimeError(f"pipelines.build_loader is not importable ({e})") from e
    data = replace(_load_data_config(spec), loader=loader)  # the experiment's own batch size and crop
    root = Path(data.root) if os.path.isabs(data.root) else REPO_ROOT / data.root
    if not root.exists():
        raise FileNotFoundError(f"no data at {root}: run `make data` (python -m pipelines.toy --out data/toy)")
    return build_loader(data, "train", device=device), data


def run_pipeline_case(spec: dict[str, Any], rec: BenchRecord, device: torch.device) -> None:
    """Clips/s of one loader (dali or pyav) over ``batches`` timed batches after 2 warm-up batches."""
    base = reset_peak_memory(device)
    loader, data = _build_loader(spec, device, spec["backend"])
    rec.frames, rec.img_size, rec.batch = data.num_frames, data.train_crop_size, data.batch_size
    times: list[float] = []
    clips = 0
    epoch = 0
    want = 2 + spec["batches"]
    while len(times) < want:
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in loader:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            if len(times) > 2:
                clips += batch.video.size(0)
            if len(times) >= want:
                break
            t0 = time.perf_counter()
        epoch += 1
        if epoch > 100:
            raise RuntimeError(f"loader {spec['backend']} yields no batches (len={len(loader)})")
    timed = times[2:]
    rec.peak_mem_bytes, rec.peak_mem_kind = peak_memory(device, base)
    fill_throughput(rec, timed, clips_per_step=rec.batch, frames=rec.frames)
    rec.clips_per_s = clips / sum(timed)  # the last batch of an epoch may be smaller
    rec.images_per_s = rec.clips_per_s * rec.frames
    rec.extra["rejected"] = len(getattr(loader, "rejected", []))
    rec.extra["decoded_frames"] = decoded_frames_per_clip(loader, spec["backend"])


def decoded_frames_per_clip(loader, name: str, max_clips: int = 16) -> dict:
    """Frames decoded per delivered clip for the loader's first ``max_clips`` clips of epoch 0: counted by decoding
    with PyAV along the loader's decoder model, beside the model's estimate (``pipelines.decode_cost``)."""
    from pipelines.decode_cost import measure_clips, strategy_for

    strategy = strategy_for(name, getattr(loader, "backend", "cpu"))
    return measure_clips([(p.path, p.frames) for p in loader.planner.plans(0)], strategy, max_clips)


def run_e2e_case(spec: dict[str, Any], rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """Train steps fed by the real pipeline; input-bound when waiting for data is > threshold of a step."""
    from harness.counting import count_flops, count_params

    base = reset_peak_memory(device)
    loader, data = _build_loader(spec, device, "auto")
    cfg = _model_config(spec)
    T, S, B = data.num_frames, data.train_crop_size, data.batch_size
    rec.frames, rec.img_size, rec.batch = T, S, B
    rec.flops_per_clip = count_flops(cfg, batch=1, frames=T, img_size=S, mode="train")
    model = _build_model(cfg, device, spec["channels_last"])
    rec.params = count_params(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    wait, compute, clips = [], [], 0
    want = 2 + spec["batches"]
    epoch = 0
    while len(compute) < want:
        loader.set_epoch(epoch)
        it = iter(loader)
        while len(compute) < want:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            x, y = batch.video.to(device, non_blocking=True), batch.label.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            wait.append(t1 - t0)
            compute.append(t2 - t1)
            if len(compute) > 2:
                clips += x.size(0)
        epoch += 1
        if epoch > 100:
            raise RuntimeError("the e2e loader yields no batches")
    rec.peak_mem_bytes, rec.peak_mem_kind = peak_memory(device, base)
    if device.type == "cpu" and spec.get("gemm_n"):
        gemm, gemm_flops = gemm_workload(device, spec["gemm_n"])
        rec.peak_flops = gemm_flops / statistics.median(time_steps(gemm, device, warmup=1, steps=5))
        rec.peak_flops_source = f"fp32 GEMM n={spec['gemm_n']} right after the steps"
    w, c = wait[2:], compute[2:]
    steps = [a + b for a, b in zip(w, c)]
    fill_throughput(rec, steps, clips_per_step=B, frames=T)
    rec.clips_per_s = clips / sum(steps)
    rec.images_per_s = rec.clips_per_s * T
    share = sum(w) / sum(steps)
    rec.extra.update({
        "loader": type(loader).__name__, "data_wait_ms_median": 1e3 * sorted(w)[len(w) // 2],
        "compute_ms_median": 1e3 * sorted(c)[len(c) // 2], "data_wait_share": share,
        "input_bound": share > spec["threshold"],
        "verdict": ("input-bound" if share > spec["threshold"] else "compute-bound")
        + f" (data wait {100 * share:.0f}% of a step; threshold {100 * spec['threshold']:.0f}%)",
    })


def run_worker(spec: dict[str, Any]) -> BenchRecord:
    """Run one case in this (fresh) process and return its record; errors become ``oom``/``error`` records."""
    device = torch.device(spec["device"])
    seed_everything(0)
    dtype = resolve_precision(spec["precision"], device)
    rec = _new_record(spec, device, precision_name(dtype))
    rec.env = environment_info(device)
    if device.type == "cpu":
        _limit_address_space(spec.get("mem_limit_gb", 0.0))
    try:
        suite = spec["suite"]
        if suite in ("model", "scaling"):
            run_model_case(spec, rec, device, dtype)
        elif suite == "attention":
            run_attention_case(spec, rec, device, dtype)
        elif suite == "pipeline":
            run_pipeline_case(spec, rec, device)
        elif suite == "e2e":
            run_e2e_case(spec, rec, device, dtype)
        else:
            raise ValueError(f"unknown suite {suite!r}")
    except (RuntimeError, MemoryError, FileNotFoundError, ImportError, NotImplementedError) as e:
        if is_oom(e):
            rec.status, rec.message = "oom", str(e).splitlines()[0][:300]
        elif spec["suite"] in ("pipeline", "e2e") and (
                isinstance(e, (FileNotFoundError, ImportError)) or "not importable" in str(e)):
            rec.status, rec.message = "skipped", str(e)[:300]
        else:
            rec.status, rec.message = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return rec


def run_case(spec: dict[str, Any], timeout_s: int) -> BenchRecord:
    """Run a case in a fresh subprocess; a crash or timeout becomes an ``error`` record."""
    cmd = [sys.executable, "-m", "harness.bench", "--worker", json.dumps(spec)]
    stub = BenchRecord(suite=spec["suite"], case=case_name(spec), attention_type=spec.get("attention_type"),
                       preset=spec.get("preset"), frames=spec.get("frames"), img_size=spec.get("img_size"),
                       batch=spec.get("batch"), mode=spec.get("mode"), backend=spec.get("backend"),
                       device=torch.device(spec["device"]).type)
    env = dict(os.environ)
    if stub.device == "cpu":
        # Idle OpenMP threads sleep instead of spinning: on a shared CPU a spinning barrier whose partner thread
        # was preempted costs whole scheduler ticks per op (measured here: 3-10x slower divided-attention steps
        # under load). Set OMP_WAIT_POLICY yourself to override.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT, env=env)
    except subprocess.TimeoutExpired:
        stub.status, stub.message = "error", f"timed out after {timeout_s}s (bench.case_timeout_s)"
        return stub
    for line in reversed(out.stdout.splitlines()):
        if line.startswith(RECORD_MARK):
            return BenchRecord.from_dict(json.loads(line[len(RECORD_MARK):]))
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    killed = out.returncode < 0 or out.returncode == 137
    stub.status = "oom" if killed or "memory" in tail.lower() else "error"
    stub.message = f"worker exited with code {out.returncode}: {tail[:300]}"
    return stub


# ------------------------------------------------------------------------------------------ reporting

def _fmt(v: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def summary_table(records: list[BenchRecord]) -> str:
    """Markdown tables: model-suite variants side by side with ratios vs divided, then every other case."""
    lines = []
    model = [r for r in records if r.suite == "model"]
    if model:
        lines += ["## Model (synthetic input)", "",
                  "| variant | mode | clips/s | images/s | step ms median [p10-p90] | peak MiB | params M "
                  "| GFLOP/clip | GFLOP/s | peak GFLOP/s | util % | throughput vs divided | memory vs divided |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ref = {r.mode: r for r in model if r.attention_type == "divided_space_time" and r.status == "ok"}
        for r in model:
            d = ref.get(r.mode)
            lines.append(_row(r, [
                r.attention_type, r.mode, _fmt(r.clips_per_s, ".2f"), _fmt(r.images_per_s, ".1f"), _step(r),
                _fmt(r.peak_mem_bytes, ".0f", 2**-20), _fmt(r.params, ".2f", 1e-6),
                _fmt(r.flops_per_clip, ".1f", 1e-9), _fmt(r.achieved_flops, ".1f", 1e-9),
                _fmt(r.peak_flops, ".0f", 1e-9), _fmt(r.utilisation, ".1f", 100),
                _ratio(r.clips_per_s, d and d.clips_per_s),
                _ratio(r.peak_mem_bytes, d and d.peak_mem_bytes)]))
        lines.append("")
    others = [r for r in records if r.suite != "model"]
    if others:
        lines += ["## Other suites", "",
                  "| case | status | clips/s | images/s | step ms median [p10-p90] | peak MiB | GFLOP/s | util % "
                  "| note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in others:
            note = r.message or r.extra.get("verdict", "")
            if r.suite == "attention" and r.status == "ok":
                note = f"{r.extra['sequences']} seqs x {r.extra['heads']} heads x L={r.extra['seq_len']}"
            lines.append(_row(r, [
                r.case, r.status, _fmt(r.clips_per_s, ".2f"), _fmt(r.images_per_s, ".1f"), _step(r),
                _fmt(r.peak_mem_bytes, ".0f", 2**-20), _fmt(r.achieved_flops, ".1f", 1e-9),
                _fmt(r.utilisation, ".1f", 100), note.replace("|", "/")[:120]]))
        lines.append("")
    return "\n".join(lines)


def _step(r: BenchRecord) -> str:
    if not r.step_ms:
        return r.status
    return f"{r.step_ms['median']:.1f} [{r.step_ms['p10']:.1f}-{r.step_ms['p90']:.1f}]"


def _row(r: BenchRecord, cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_summary(path: Path, records: list[BenchRecord], meta: dict[str, Any]) -> None:
    env = meta.get("env", {})
    head = [
        f"# Benchmark {meta.get('started', '')}", "",
        f"preset `{meta.get('preset')}`, batch {meta.get('batch')}, precision {meta.get('precision')}, "
        f"device {meta.get('hardware')} ({env.get('device')}, {env.get('cpu_threads')} threads), "
        f"torch {env.get('torch')}, DALI {env.get('dali')}, git {env.get('git_sha')}.",
        "Peak for utilisation: " + ("an fp32 GEMM timed between the steps of each case (column peak GFLOP/s); "
                                    if env.get("device") == "cpu" else "")
        + f"run start: {_fmt(meta.get('peak_flops'), '.1f', 1e-9)} GFLOP/s ({meta.get('peak_flops_source')}). "
        f"Peak memory: {meta.get('memory_kind')}. "
        f"Wall time {meta.get('wall_s', 0):.0f} s.", "", "",
    ]
    path.write_text("\n".join(head) + summary_table(records) + "\n")


# ------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--attn", default="all", help="divided_space_time | joint_space_time | space_only | all")
    p.add_argument("--preset", default=None, help="model preset (configs/model/NAME.yaml); default by device")
    p.add_argument("--mode", default="both", help="train | infer | both")
    p.add_argument("--frames", default=None, help="scaling sweep frame counts, e.g. 8,16,32")
    p.add_argument("--img", default=None, help="scaling sweep image sizes, e.g. 224,448")
    p.add_argument("--suites", default=None, help=f"comma list from {','.join(SUITES)}")
    p.add_argument("--out", default=None, help="output root (default bench.out_dir = runs/bench)")
    p.add_argument("--config", default=None, help="YAML config (bench/model/data sections)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. bench.steps=3 model.depth=2")
    return p.parse_args(argv)


def _int_list(s: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {s!r}: expected comma-separated integers, e.g. 8,16,32") from None


def resolve(args: argparse.Namespace) -> tuple[RootConfig, str, torch.device]:
    """The config with CLI flags applied, the preset name and the device."""
    from harness.model import load_preset

    device = resolve_device()
    preset = args.preset or load_config(args.config).bench.preset or default_preset(device)
    # The preset's model fields go in as overrides before the user's, so ``model.depth=6`` still wins.
    preset_cfg, default = load_preset(preset), ModelConfig()
    preset_over = [f"model.{k}={v}" for k, v in asdict(preset_cfg).items() if getattr(default, k) != v]
    cfg = load_config(args.config, preset_over + list(args.overrides))
    if device.type == "cpu" and cfg.bench.precision == "auto":
        cfg.bench.precision = "fp32"
    if args.frames:
        cfg.bench.frames = _int_list(args.frames, "--frames")
    if args.img:
        cfg.bench.img_sizes = _int_list(args.img, "--img")
    if args.suites:
        cfg.bench.suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    if args.out:
        cfg.bench.out_dir = args.out
    cfg.bench.preset = preset
    return cfg, preset, device


def measure_peak(device: torch.device, precision: str, gemm_n: int) -> tuple[float | None, str | None]:
    """The utilisation denominator: GPU table by name, else an fp32 GEMM measured now on this CPU."""
    if device.type == "cuda":
        return gpu_peak_flops(device_name(device), precision)
    rate = measure_gemm_flops(device, n=gemm_n)
    return rate, f"measured fp32 GEMM n={gemm_n} ({rate / 1e9:.1f} GFLOP/s)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        rec = run_worker(json.loads(args.worker))
        print(RECORD_MARK + json.dumps(rec.to_dict()), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from tqdm import tqdm

    cfg, preset, device = resolve(args)
    attns = attention_types(args.attn)
    modes = modes_of(args.mode)
    precision = precision_name(resolve_precision(cfg.bench.precision, device))
    started = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.bench.out_dir) / f"{started}-{args.attn}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    peak = measure_peak(device, precision, cfg.bench.gemm_n)
    cases = build_cases(cfg, preset, attns, modes, device, peak)
    logger.info("%d cases -> %s (peak %s)", len(cases), out, peak[1])
    t0 = time.perf_counter()
    records: list[BenchRecord] = []
    bar = tqdm(cases, desc="bench", unit="case", file=sys.stderr)
    for spec in bar:
        bar.set_postfix_str(case_name(spec))
        rec = run_case(spec, cfg.bench.case_timeout_s)
        if rec.status != "ok":
            logger.warning("%s: %s %s", rec.case, rec.status, rec.message)
        records.append(rec)
    meta = {
        "started": started, "preset": preset, "attn": args.attn, "modes": modes, "batch": cfg.bench.batch_size,
        "precision": precision, "peak_flops": peak[0], "peak_flops_source": peak[1],
        "memory_kind": "CUDA allocator peak" if device.type == "cuda" else "peak RSS growth of a fresh process",
        "hardware": device_name(device), "wall_s": time.perf_counter() - t0, "env": environment_info(device),
        "config": to_yaml(cfg),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE") if device.type == "cpu" else None,
    }
    write_results(out / "results.json", records, meta)
    write_summary(out / "summary.md", records, meta)
    try:
        from harness.plots import plot_scaling

        plot_scaling(records, out)
    except Exception as e:  # a missing plot must not lose the measurements
        logger.warning("plots failed: %s", e)
    print(summary_table(records))
    print(f"results: {out}/results.json  summary: {out}/summary.md  ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
