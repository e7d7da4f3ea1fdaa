"""The e2e suite: the experiment's train steps fed by its real loader (``bench.data_config``, the toy divided
experiment by default). Is ``make train`` input-bound? Yes when waiting for data takes more than
``bench.input_bound_threshold`` of a step. Clips/s and the data-wait share come from the Trainer's own
``ThroughputWindow``, so the record and a training log agree on what they mean.

Its peak memory is the CUDA allocator's (GPU) or the worker's peak RSS growth (CPU), like every suite's; a loader
keeps memory outside both (DALI's GPU buffers, PyAV's worker processes), so the record says what its peak covers
(``extra["peak_mem_covers"]``) and, on a GPU, adds the device's used memory as the driver reports it
(``extra["device_used_max_bytes"]``: every allocation on the GPU, DALI's and the CUDA context's included)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from timesformer_harness.bench.case import ModelCase
from timesformer_harness.bench.pipeline import (WARMUP_BATCHES, build_train_loader, data_config_path, data_paths,
                                                load_data_config)
from timesformer_harness.bench.record import BenchRecord, fill_throughput
from timesformer_harness.config import ModelConfig, RootConfig, load_config
from timesformer_harness.counting import count_flops, count_params
from timesformer_harness.metrics import (PeakMemory, ThroughputWindow, gemm, synchronize_stream, time_block, time_steps,
                                         timed_items)
from timesformer_harness.pipelines.base import take_batches
from timesformer_harness.pipelines.loaders import LOADERS
from timesformer_harness.workload import TrainStep, build_model


@dataclass(kw_only=True)
class Case(ModelCase):
    """Train steps of ``model`` on the loader of ``data_config`` (its batch size, frames and crop)."""

    suite: ClassVar[str] = "e2e"
    data_config: str
    data_paths: dict[str, str] = field(default_factory=dict)  # its path settings made absolute (pipeline.data_paths)
    batches: int  # timed after WARMUP_BATCHES
    threshold: float  # input-bound when waiting for data takes more than this share of a step

    @property
    def name(self) -> str:
        return f"e2e/{self.attention_type}"


def cases(cfg: RootConfig, base: dict[str, Any], attns: list[str], modes: list[str],
          device: torch.device) -> list[Case]:
    """One case, for the first selected variant, with the experiment's own model when its config sets one."""
    path = data_config_path(cfg)
    loaded = load_config(path)
    own = loaded.model != ModelConfig()  # the file's model when it sets one, named by the file instead of the preset
    model = loaded.model if own else cfg.model
    settings = {**base, "preset": f"{Path(path).name}'s model"} if own else base
    return [Case.of(settings, model=replace(model, attention_type=attns[0]), mode="train", data_config=path,
                    data_paths=data_paths(loaded.data),
                    batches=cfg.bench.pipeline_batches, threshold=cfg.bench.input_bound_threshold)]


def run(case: Case, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """``TrainStep.step`` on the loader's batches; each step's time is split into waiting for the batch and the
    step itself (synchronised)."""
    data = load_data_config(case)
    T, S, B = data.num_frames, data.train_crop_size, data.batch_size
    rec.frames, rec.img_size, rec.batch = T, S, B
    rec.flops_per_clip = count_flops(case.model, batch=1, frames=T, img_size=S, mode="train")  # before the window
    memory = PeakMemory(device, release_freed=True)
    loader, _ = build_train_loader(case, device, "auto")
    model = build_model(case.model, device, dtype=dtype, channels_last=case.channels_last)
    rec.params = count_params(model)
    train = TrainStep.build(model, device, dtype, compile=case.compile)  # compiled in the warm-up batches

    window, waits, computes, device_used = ThroughputWindow(), [], [], 0
    # the step's stream only: a device-wide wait would also wait for DALI's streams decoding the next batches
    batches = timed_items(take_batches(loader, WARMUP_BATCHES + case.batches), device, synchronize_stream)
    for i, (batch, wait_s) in enumerate(batches):
        video, labels = batch.video.to(device, non_blocking=True), batch.label.to(device, non_blocking=True)
        compute_s = time_block(lambda: train.step(video, labels), 1, device, synchronize_stream)
        if device.type == "cuda":  # after the timed part: the driver's view, DALI's buffers included
            free, total = torch.cuda.mem_get_info(device)
            device_used = max(device_used, total - free)
        if i >= WARMUP_BATCHES:
            window.add(video.size(0), wait_s, wait_s + compute_s)
            waits.append(wait_s)
            computes.append(compute_s)
    peak = memory.take()
    if peak is not None:
        rec.peak_mem_bytes, rec.peak_mem_kind = peak.growth, peak.kind
    rec.extra["peak_mem_covers"] = peak_memory_covers(device, loader)
    if device.type == "cuda":
        rec.extra["device_used_max_bytes"] = device_used
    if device.type == "cpu" and case.gemm_n:
        calib = gemm(device, case.gemm_n)
        rec.peak_flops = calib.rate(time_steps(calib.run, device, warmup=1, steps=5))
        rec.peak_flops_source = f"fp32 GEMM n={case.gemm_n} right after the steps"
    steps = window.take()
    fill_throughput(rec, [w + c for w, c in zip(waits, computes)], clips_per_step=B, frames=T, clips=steps["clips"])
    share = steps["data_wait_share"]
    bound = share > case.threshold
    rec.extra.update({
        "loader": loader.kind, "decode": loader.backend,
        "data_wait_ms_median": 1e3 * statistics.median(waits), "compute_ms_median": 1e3 * statistics.median(computes),
        "data_wait_s": sum(waits), "step_s": steps["seconds"], "data_wait_share": share, "input_bound": bound,
        "verdict": ("input-bound" if bound else "compute-bound")
        + f" (data wait {100 * share:.0f}% of a step; threshold {100 * case.threshold:.0f}%)",
    })


def peak_memory_covers(device: torch.device, loader: Any) -> str:
    """What an e2e record's ``peak_mem_bytes`` includes, and what the loader keeps outside it
    (``pipelines.loaders``)."""
    if device.type == "cuda":
        what = "torch's CUDA allocator: model, optimizer state, activations, batches on the GPU"
    else:
        what = "peak RSS growth of the worker process: model, optimizer state, activations, batches"
    outside = LOADERS[loader.kind].outside(device.type, loader.backend)
    if outside and device.type == "cuda":
        outside += " (see device_used_max_bytes)"
    return f"{what}; outside it: {outside}" if outside else f"{what}, the {loader.kind} loader's buffers included"
