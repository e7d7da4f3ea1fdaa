"""A bench case (the typed spec the parent builds and the fresh worker process receives as JSON), its empty
record, and the step timing every compute suite shares."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable

import torch

from timesformer_harness.config import ModelConfig
from timesformer_harness.metrics import BenchRecord, gemm_workload, time_steps, time_steps_interleaved
from timesformer_harness.runtime import device_name

# Suites whose cases run a model (or one of its attention shapes) of a given attention variant.
SUITES_WITH_VARIANT = ("model", "attention", "scaling", "e2e")


class SkipCase(Exception):
    """The case cannot run here for a reason that is not a failure (no data, an optional package missing):
    recorded as ``skipped`` with the reason."""


@dataclass
class BenchCase:
    """One measured case. Fields past ``steps`` apply to some suites only (their defaults mean "not used").

    The parent builds it (``timesformer_harness.bench.sweep.build_cases``); ``to_dict``/``from_dict`` carry it to the
    worker process as JSON.
    """

    suite: str  # model | attention | scaling | pipeline | e2e
    preset: str
    model: ModelConfig  # the model to build (its attention_type is the case's variant); attention: its dimensions
    device: str  # "cpu", "cuda:0"
    batch: int
    precision: str  # resolved: fp32 | bf16 | fp16
    channels_last: bool
    warmup: int
    steps: int
    mode: str = "train"  # train | infer
    frames: int = 0  # input clip length (model, scaling, attention)
    img_size: int = 0  # input side (model, scaling, attention)
    gemm_n: int = 0  # CPU: an n^3 fp32 GEMM timed after every step is the utilisation peak; 0 = use peak_flops
    peak_flops: float | None = None  # the run's peak: GPU table, or the GEMM measured at the start of the run
    peak_flops_source: str | None = None
    mem_limit_gb: float = 0.0  # CPU: the worker's address-space headroom (timesformer_harness.runner); 0 = no cap
    shape: str = ""  # attention: temporal | spatial | joint
    backend: str = ""  # attention: timesformer_harness.kernels.attention backend; pipeline: dali | pyav
    data_config: str = ""  # pipeline, e2e: YAML whose data section (and for e2e, model section) is used
    batches: int = 0  # pipeline, e2e: timed batches after 2 warm-up batches
    threshold: float = 0.0  # e2e: input-bound when waiting for data takes more than this share of a step

    @property
    def attention_type(self) -> str | None:
        return self.model.attention_type if self.suite in SUITES_WITH_VARIANT else None

    @property
    def name(self) -> str:
        """Unique within a run: ``model/divided_space_time/train/8x224``, ``attention/joint/flash/train``..."""
        if self.suite == "attention":
            return f"attention/{self.shape}/{self.backend}/{self.mode}"
        if self.suite == "pipeline":
            return f"pipeline/{self.backend}"
        if self.suite == "e2e":
            return f"e2e/{self.attention_type}"
        return f"{self.suite}/{self.attention_type}/{self.mode}/{self.frames}x{self.img_size}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchCase:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"bench case has unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**{**d, "model": ModelConfig(**d["model"])})

    def with_model(self, **changes: Any) -> BenchCase:
        """A copy whose model has ``changes`` (checked by ModelConfig's own validation)."""
        return replace(self, model=replace(self.model, **changes))


def new_record(case: BenchCase, device: torch.device) -> BenchRecord:
    """The record of ``case`` before anything is measured."""
    return BenchRecord(
        suite=case.suite, case=case.name, attention_type=case.attention_type, preset=case.preset,
        frames=case.frames or None, img_size=case.img_size or None, batch=case.batch, precision=case.precision,
        mode=case.mode if case.suite != "pipeline" else None, backend=case.backend or None, device=device.type,
        device_name=device_name(device), peak_flops=case.peak_flops, peak_flops_source=case.peak_flops_source,
    )


def timed(step: Callable[[], object], rec: BenchRecord, case: BenchCase, device: torch.device) -> list[float]:
    """Seconds per step after ``case.warmup`` untimed steps.

    On CPU an fp32 GEMM is timed after every step and its median rate becomes ``rec.peak_flops``, so utilisation
    compares the model with the GEMM under the same load (a once-per-run GEMM swung 76-222 GFLOP/s on a shared
    machine).
    """
    if device.type == "cuda" or not case.gemm_n:
        return time_steps(step, device, case.warmup, case.steps)
    gemm, gemm_flops = gemm_workload(device, case.gemm_n)
    times, gemm_times = time_steps_interleaved(step, gemm, device, case.warmup, case.steps)
    rec.peak_flops = gemm_flops / statistics.median(gemm_times)
    rec.peak_flops_source = f"fp32 GEMM n={case.gemm_n} interleaved with the steps"
    return times
