"""Bench cases: the typed spec the parent builds and the fresh worker process receives as JSON, one class per kind
of measurement (each suite module defines its own on top of these), and the timing of a model step every compute
suite shares.

``BenchCase`` holds what every case has; ``ModelCase`` adds a model run at an input size (the model and scaling
suites' case, and the base of the attention and end-to-end ones). ``case.record(device)`` is the case's record
before anything is measured.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, ClassVar

import torch

from timesformer_harness.bench.record import BenchRecord, fill_throughput
from timesformer_harness.config import ModelConfig
from timesformer_harness.kernels.attention import short_sequence_choices
from timesformer_harness.metrics import (Gemm, PeakMemory, Stopwatch, gemm, iso_now, kernel_time, synchronize,
                                         time_block, time_pairs, time_steps)
from timesformer_harness.runtime import device_name

logger = logging.getLogger(__name__)


class SkipCase(Exception):
    """The case cannot run here for a reason that is not a failure (no data, an optional package missing):
    recorded as ``skipped`` with the reason."""


@dataclass(kw_only=True)
class BenchCase:
    """What every case has. Subclasses set ``suite`` and ``name``."""

    suite: ClassVar[str] = ""
    preset: str
    device: str  # "cpu", "cuda:0"
    batch: int
    precision: str  # resolved: fp32 | bf16 | fp16
    warmup: int
    steps: int  # timed samples
    mem_limit_gb: float = 0.0  # CPU: the worker's address-space headroom (timesformer_harness.runner); 0 = no cap
    threads: int = 0  # CPU intra-op threads in the worker; 0 = torch's default
    seed: int = 0

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def series(self) -> tuple | None:
        """The sweep this case is one point of, when later points depend on it (``ModelCase``); None here."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchCase:
        d = {k: v for k, v in d.items() if k != "suite"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no keys {unknown}; expected a subset of {sorted(known)}")
        if isinstance(d.get("model"), dict):
            d["model"] = ModelConfig(**d["model"])
        return cls(**d)

    @classmethod
    def of(cls, base: dict[str, Any], **changes: Any) -> BenchCase:
        """A case of this class from the run's shared settings ``base`` (the keys this class has) and ``changes``."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in base.items() if k in names}, **changes})

    def record(self, device: torch.device) -> BenchRecord:
        """The record of this case before anything is measured."""
        return BenchRecord(suite=self.suite, case=self.name, preset=self.preset, batch=self.batch,
                           precision=self.precision, device=device.type, device_name=device_name(device),
                           time=iso_now(), seed=self.seed)


@dataclass(kw_only=True)
class ModelCase(BenchCase):
    """A model (or one of its attention shapes) at an input size, timed in samples of ``steps``.

    With ``gemm_n`` set, each sample pairs a block of the step with a block of an n^3 fp32 GEMM on the same device
    (``timesformer_harness.metrics.time_pairs``): the record then carries ``extra["ratio"]``, the median over samples
    of step-block time over GEMM-block time, which whatever slows the whole machine slows alike (the gate compares
    it), and on CPU the GEMM's rate becomes the utilisation peak. ``block_s`` sizes the blocks to about that many
    seconds each (0: one step and one GEMM per sample); ``steps_per_block`` and ``calib_reps`` fix them (the gate
    reuses its baseline's, so both sides time the same work)."""

    suite: ClassVar[str] = "model"
    model: ModelConfig  # its attention_type is the case's variant
    mode: str = "train"  # train | infer
    frames: int = 0
    img_size: int = 0
    channels_last: bool = False
    gemm_n: int = 0
    peak_flops: float | None = None  # the GPU table's peak; None on CPU (the GEMM's rate) or for an unknown GPU
    peak_flops_source: str | None = None
    block_s: float = 0.0
    steps_per_block: int = 0
    calib_reps: int = 0
    inject_slowdown: float = 0.0  # the gate's check that it catches a slowdown: each step this fraction longer
    compile: str = "none"  # torch.compile mode of the step (timesformer_harness.config.COMPILE_MODES)
    kernel_steps: int = 0  # CUDA: steps profiled after the timing for the GPU's kernel time (0 = none)
    sweep_batch: bool = False  # one point of a batch sweep: the name carries the batch

    @property
    def attention_type(self) -> str:
        return self.model.attention_type

    @property
    def name(self) -> str:
        name = f"{self.suite}/{self.attention_type}/{self.mode}/{self.frames}x{self.img_size}"
        return name + (f"/b{self.batch}" if self.sweep_batch else "") + (
            f"/{self.compile}" if self.compile != "none" else "")

    @property
    def series(self) -> tuple | None:
        """The batch sweep this case is a point of (a larger batch of the same series is not run once a smaller
        one ran out of memory), or None."""
        return (self.suite, self.attention_type, self.mode, self.frames, self.img_size, self.compile) \
            if self.sweep_batch else None

    def record(self, device: torch.device) -> BenchRecord:
        rec = super().record(device)
        rec.attention_type, rec.model, rec.mode = self.attention_type, asdict(self.model), self.mode
        rec.compile = self.compile
        rec.frames, rec.img_size = self.frames or None, self.img_size or None
        rec.peak_flops, rec.peak_flops_source = self.peak_flops, self.peak_flops_source
        return rec


def single_mode(suite: str, modes: list[str]) -> str:
    """The mode a suite that measures one mode (scaling, attention) runs: train when asked for, else infer; a log
    line says so when both were asked for (the model suite measures both)."""
    mode = "train" if "train" in modes else "infer"
    if len(set(modes)) > 1:
        logger.info("the %s suite measures one mode, %s (of %s asked for): --mode infer gives its inference cases",
                    suite, mode, " and ".join(modes))
    return mode


def time_model_step(step: Callable[[], object], rec: BenchRecord, case: ModelCase, device: torch.device,
                    calib: Gemm | None = None) -> list[float]:
    """Seconds per step of ``case.steps`` samples after ``case.warmup`` untimed steps; with ``case.gemm_n``, paired
    with the calibration GEMM (see ``ModelCase``; ``calib``, made here when not given), whose figures go into
    ``rec``."""
    if not case.gemm_n:
        return time_steps(step, device, case.warmup, case.steps)
    calib = calib or gemm(device, case.gemm_n)
    for _ in range(case.warmup):
        step()
        calib.run()
    synchronize(device)
    steps_per_block, calib_reps = case.steps_per_block or 1, case.calib_reps or 1
    if case.block_s and not (case.steps_per_block and case.calib_reps):
        step_s = min(time_block(step, 1, device) for _ in range(3))
        calib_s = min(time_block(calib.run, 1, device) for _ in range(3))
        steps_per_block = case.steps_per_block or max(1, round(case.block_s / step_s))
        calib_reps = case.calib_reps or max(1, round(steps_per_block * step_s / calib_s))
    calib_times, times = time_pairs(calib.run, step, device, case.steps, a_reps=calib_reps, b_reps=steps_per_block)
    ratios = [(t * steps_per_block) / (c * calib_reps) for t, c in zip(times, calib_times)]
    rec.extra.update({"ratio": statistics.median(ratios), "ratios": ratios, "steps_per_block": steps_per_block,
                      "calib_reps": calib_reps, "gemm_n": case.gemm_n,
                      "gemm_ms": 1e3 * statistics.median(calib_times)})
    if device.type == "cpu":
        rec.peak_flops = calib.rate(calib_times)
        rec.peak_flops_source = f"fp32 GEMM n={case.gemm_n} interleaved with the steps"
    return times


StepBuilder = Callable[[ModelCase, BenchRecord, torch.device, "torch.dtype | None"], Callable[[], object]]


def measure_step(build: StepBuilder, case: ModelCase, rec: BenchRecord, device: torch.device,
                 dtype: torch.dtype | None) -> None:
    """Build the case's step (``build`` also fills what it knows: params, FLOPs), time it (``time_model_step``) and
    fill ``rec`` with the throughput and the peak memory of building and running it."""
    calib = gemm(device, case.gemm_n) if case.gemm_n else None  # the peak's, not the step's: outside the window
    if calib is not None:
        calib.run()  # its first run also allocates the BLAS library's own buffers
    memory = PeakMemory(device, release_freed=True)
    step = build(case, rec, device, dtype)
    if case.warmup:  # the first step alone: lazy initialisation, autotuning and compilation happen in it
        rec.extra["first_step_s"] = time_block(step, 1, device)
        case = replace(case, warmup=case.warmup - 1)
    if case.inject_slowdown:
        step = _slowed(step, case.inject_slowdown, device)
        rec.extra["injected_slowdown"] = case.inject_slowdown
    rec.extra["steady_state"] = f"timed after {case.warmup + 1 if 'first_step_s' in rec.extra else 0} warm-up steps"
    times = time_model_step(step, rec, case, device, calib)
    if case.compile != "none" and "first_step_s" in rec.extra:
        rec.extra["compile_s"] = max(rec.extra["first_step_s"] - statistics.median(times), 0.0)
    if blocks := short_sequence_choices():  # what the Triton attention's autotuner picked (eager: in this process)
        rec.extra["triton_blocks"] = blocks
    peak = memory.take()
    if peak is not None:
        rec.peak_mem_bytes, rec.peak_mem_kind = peak.growth, peak.kind
    fill_throughput(rec, times, clips_per_step=case.batch, frames=case.frames)
    try:
        kernels = kernel_time(step, device, case.kernel_steps)
    except RuntimeError as e:  # the profiler is an extra: its failure must not lose the timing above
        rec.extra["kernel_error"] = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        kernels = None
    if kernels is not None:  # how much of the step the GPU was busy: the rest is the host issuing the kernels
        rec.extra.update({"kernel_ms": kernels.ms_per_step, "kernel_ops_per_step": kernels.ops_per_step,
                          "kernel_share": kernels.ms_per_step / rec.step_ms["median"]})


def _slowed(step: Callable[[], object], fraction: float, device: torch.device) -> Callable[[], None]:
    """``step`` made ``fraction`` longer: each call (the device synchronised) followed by busy work on this thread for
    that fraction of the time the call took, so the slowdown is the one asked for whatever the machine's load or
    speed (a sleep would idle the core, which a real slowdown does not)."""
    def slower() -> None:
        watch = Stopwatch()
        step()
        synchronize(device)
        until = watch.elapsed() * (1.0 + fraction)
        while watch.elapsed() < until:
            pass
    return slower
