"""The e2e suite: the experiment's train steps fed by its real loader (``bench.data_config``, the toy divided
experiment by default). Is ``make train`` input-bound? Yes when waiting for data takes more than
``bench.input_bound_threshold`` of a step.

Its peak memory is the CUDA allocator's (GPU) or the worker's peak RSS growth (CPU), like every suite's; a loader
keeps memory outside both (DALI's GPU buffers, PyAV's worker processes), so the record says what its peak covers
(``extra["peak_mem_covers"]``) and, on a GPU, adds the device's used memory as the driver reports it
(``extra["device_used_max_bytes"]``: every allocation on the GPU, DALI's and the CUDA context's included)."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from timesformer_harness.bench.case import BenchCase
from timesformer_harness.bench.pipeline import WARMUP_BATCHES, build_train_loader, data_config_path
from timesformer_harness.config import ModelConfig, RootConfig, load_config
from timesformer_harness.counting import count_flops, count_params
from timesformer_harness.metrics import (BenchRecord, fill_throughput, gemm_workload, peak_memory, reset_peak_memory,
                                         time_steps)
from timesformer_harness.workload import TrainStep, build_model


def cases(cfg: RootConfig, base: BenchCase, attns: list[str], modes: list[str],
          device: torch.device) -> list[BenchCase]:
    """One case, for the first selected variant, with the experiment's own model when its config sets one."""
    path = data_config_path(cfg)
    model = base.model
    if Path(path).is_file() and load_config(path).model != ModelConfig():  # the file sets a model
        model = load_config(path).model
    return [replace(base, suite="e2e", model=replace(model, attention_type=attns[0]), mode="train",
                    data_config=path, batches=cfg.bench.pipeline_batches, threshold=cfg.bench.input_bound_threshold)]


def run(case: BenchCase, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """``TrainStep.step`` on the loader's batches; each step's time is split into waiting for the batch and the
    step itself (synchronised)."""
    base = reset_peak_memory(device)
    loader, data = build_train_loader(case, device, "auto")
    T, S, B = data.num_frames, data.train_crop_size, data.batch_size
    rec.frames, rec.img_size, rec.batch = T, S, B
    rec.flops_per_clip = count_flops(case.model, batch=1, frames=T, img_size=S, mode="train")
    model = build_model(case.model, device, dtype=dtype, channels_last=case.channels_last)
    rec.params = count_params(model)
    train = TrainStep.build(model, device, dtype)

    wait, compute, clips, device_used = [], [], 0, 0
    want = WARMUP_BATCHES + case.batches
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
            video, labels = batch.video.to(device, non_blocking=True), batch.label.to(device, non_blocking=True)
            train.step(video, labels)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wait.append(t1 - t0)
            compute.append(time.perf_counter() - t1)
            if device.type == "cuda":  # after the timed part: the driver's view, DALI's buffers included
                free, total = torch.cuda.mem_get_info(device)
                device_used = max(device_used, total - free)
            if len(compute) > WARMUP_BATCHES:
                clips += video.size(0)
        epoch += 1
        if epoch > 100:
            raise RuntimeError("the e2e loader yields no batches")
    rec.peak_mem_bytes, rec.peak_mem_kind = peak_memory(device, base)
    rec.extra["peak_mem_covers"] = peak_memory_covers(device, loader)
    if device.type == "cuda":
        rec.extra["device_used_max_bytes"] = device_used
    if device.type == "cpu" and case.gemm_n:
        gemm, gemm_flops = gemm_workload(device, case.gemm_n)
        rec.peak_flops = gemm_flops / statistics.median(time_steps(gemm, device, warmup=1, steps=5))
        rec.peak_flops_source = f"fp32 GEMM n={case.gemm_n} right after the steps"
    w, c = wait[WARMUP_BATCHES:], compute[WARMUP_BATCHES:]
    steps = [a + b for a, b in zip(w, c)]
    fill_throughput(rec, steps, clips_per_step=B, frames=T)
    rec.clips_per_s = clips / sum(steps)
    rec.images_per_s = rec.clips_per_s * T
    share = sum(w) / sum(steps)
    bound = share > case.threshold
    rec.extra.update({
        "loader": type(loader).__name__, "decode": getattr(loader, "backend", "pyav"),
        "data_wait_ms_median": 1e3 * statistics.median(w),
        "compute_ms_median": 1e3 * statistics.median(c), "data_wait_s": sum(w), "step_s": sum(steps),
        "data_wait_share": share, "input_bound": bound,
        "verdict": ("input-bound" if bound else "compute-bound")
        + f" (data wait {100 * share:.0f}% of a step; threshold {100 * case.threshold:.0f}%)",
    })


def peak_memory_covers(device: torch.device, loader: object) -> str:
    """What an e2e record's ``peak_mem_bytes`` includes, and what the loader keeps outside it."""
    kind = type(loader).__name__
    if device.type == "cuda":
        outside = ("DALI's own GPU buffers (NVDEC output, resize) are outside it: see device_used_max_bytes"
                   if getattr(loader, "backend", "") == "gpu" else f"the {kind} decodes on the CPU")
        return f"torch's CUDA allocator: model, optimizer state, activations, batches on the GPU; {outside}"
    inside = "DALI's CPU pipeline included" if kind == "DaliLoader" else "not the PyAV DataLoader worker processes"
    return f"peak RSS growth of the worker process: model, optimizer state, activations, batches; {inside}"
