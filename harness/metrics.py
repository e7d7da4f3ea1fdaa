"""Timing, memory, FLOP/s and utilisation helpers, and the versioned bench record shared by bench, gate and
the pytest-benchmark suites.

Method: warm up first, then time each step with ``perf_counter`` and a
device synchronise at the step boundary (timm benchmark.py), report the median and the p10/p90 spread.
Peak memory is the CUDA allocator's peak on GPU and, on CPU, the peak RSS growth of a *fresh process* per case
(``ru_maxrss`` cannot be reset, so the caller runs every case in its own subprocess).
Utilisation is achieved FLOP/s over a peak: the dense bf16 tensor-core figure for known GPUs (torchtitan
``get_peak_flops``), or on CPU an fp32 GEMM rate measured in the same run (there is no trustworthy CPU peak table).
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from pipelines.files import atomic_write_text

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error", "skipped")

# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s; torchtitan tools/utils.py get_peak_flops.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM; matched after the PCIe/NVL names
    "H20": 148e12,
    "A100": 312e12,
    "A6000": 154.85e12,
    "L40S": 362e12,
    "B200": 2.25e15,
    "GB200": 2.5e15,
}
# fp32 (non-tensor) peaks, used when a GPU run is in plain fp32.
GPU_PEAK_FLOPS_FP32 = {"H200": 67e12, "H100": 67e12, "A100": 19.5e12}


@dataclass
class BenchRecord:
    """One measured case. ``None`` means not measured / not applicable."""

    suite: str  # model | attention | scaling | pipeline | e2e | gate
    case: str  # a unique, human-readable name within a run, e.g. "model/divided_space_time/train/8x224"
    attention_type: str | None = None
    preset: str | None = None
    frames: int | None = None
    img_size: int | None = None
    batch: int | None = None
    precision: str = "fp32"
    mode: str | None = None  # train | infer
    backend: str | None = None  # attention backend (attention suite) or loader (pipeline suite)
    device: str = "cpu"
    device_name: str = ""
    images_per_s: float | None = None  # clips/s x frames
    clips_per_s: float | None = None
    step_ms: dict[str, float] | None = None  # {"median", "p10", "p90"}
    peak_mem_bytes: int | None = None
    peak_mem_kind: str | None = None  # cuda_allocator | rss_fresh_process
    params: int | None = None
    flops_per_clip: int | None = None  # forward (infer) or forward+backward (train), FLOPs = 2 x MACs
    achieved_flops: float | None = None  # FLOP/s
    peak_flops: float | None = None
    peak_flops_source: str | None = None  # e.g. "table:H100 bf16 dense" or "measured fp32 GEMM n=1024"
    utilisation: float | None = None  # achieved / peak, in [0, 1]
    status: str = "ok"
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        assert self.status in STATUSES, f"status {self.status!r} not in {STATUSES}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchRecord:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"bench record schema_version={version!r}, this harness reads {SCHEMA_VERSION}; "
                "re-run the benchmark (or the gate's --write-baseline) with this version"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"bench record has unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def extra_info(self) -> dict[str, Any]:
        """The flat, JSON-serialisable view attached to pytest-benchmark's ``extra_info``."""
        d = self.to_dict()
        d.pop("env")
        return d


def write_results(path: str | Path, records: list[BenchRecord], meta: dict[str, Any] | None = None) -> None:
    """``{"schema_version", "meta", "records": [...]}`` as indented JSON."""
    payload = {"schema_version": SCHEMA_VERSION, "meta": meta or {}, "records": [r.to_dict() for r in records]}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def read_results(path: str | Path) -> tuple[list[BenchRecord], dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version={data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return [BenchRecord.from_dict(r) for r in data["records"]], data.get("meta", {})


# ---------------------------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``steps`` times; seconds per step (synchronised)."""
    if steps < 1:
        raise ValueError(f"steps={steps}; need at least 1 timed step")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def time_steps_interleaved(fn: Callable[[], object], ref: Callable[[], object], device: torch.device, warmup: int,
                           steps: int) -> tuple[list[float], list[float]]:
    """Like ``time_steps``, with one ``ref`` call timed after every step (A B A B): the reference sees the same
    machine state (co-tenants, clocks) as the steps it sits between."""
    for _ in range(warmup):
        fn()
        ref()
    synchronize(device)
    times, ref_times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        t1 = time.perf_counter()
        ref()
        synchronize(device)
        times.append(t1 - t0)
        ref_times.append(time.perf_counter() - t1)
    return times, ref_times


def gemm_workload(device: torch.device, n: int = 1024) -> tuple[Callable[[], object], int]:
    """An n x n x n fp32 GEMM and its FLOPs: the CPU peak proxy for utilisation."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return (lambda: torch.mm(a, b)), 2 * n**3


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    assert values, "percentile of an empty list"
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def step_stats(times_s: list[float]) -> dict[str, float]:
    """Median, p10 and p90 of per-step seconds, in milliseconds."""
    return {
        "median": 1e3 * statistics.median(times_s),
        "p10": 1e3 * percentile(times_s, 10),
        "p90": 1e3 * percentile(times_s, 90),
    }


# ---------------------------------------------------------------------------------------------- memory

def reset_peak_memory(device: torch.device) -> int:
    """Reset the CUDA peak; on CPU return the current ``ru_maxrss`` high-water mark (bytes) as the baseline."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return rss_high_water_bytes()


def rss_high_water_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_memory(device: torch.device, baseline: int = 0) -> tuple[int, str]:
    """(peak bytes, kind): CUDA allocator peak, or RSS high-water growth over ``baseline`` on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_allocator"
    return max(rss_high_water_bytes() - baseline, 0), "rss_fresh_process"


# ---------------------------------------------------------------------------------------------- FLOP/s

def measure_gemm_flops(device: torch.device, n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32
                       ) -> float:
    """FLOP/s of an n x n x n GEMM on ``device`` (best of ``repeats`` after a warm-up): the CPU peak proxy."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_steps(lambda: torch.mm(a, b), device, warmup=2, steps=repeats)
    return 2.0 * n**3 / min(times)


def gpu_peak_flops(name: str, precision: str) -> tuple[float | None, str | None]:
    """The dense peak for a GPU name (``torch.cuda.get_device_name``) and precision, or (None, None) if unknown."""
    table = GPU_PEAK_FLOPS_FP32 if precision == "fp32" else GPU_PEAK_FLOPS
    for key, value in table.items():  # insertion order: specific names before their prefixes
        if key in name:
            kind = "fp32" if precision == "fp32" else "bf16/fp16 dense"
            return value, f"table:{key} {kind}"
    return None, None


def achieved_flops(flops_per_clip: int | None, clips_per_s: float | None) -> float | None:
    if not flops_per_clip or not clips_per_s:
        return None
    return flops_per_clip * clips_per_s


def utilisation(achieved: float | None, peak: float | None) -> float | None:
    if not achieved or not peak:
        return None
    return achieved / peak


def fill_throughput(rec: BenchRecord, times_s: list[float], clips_per_step: int, frames: int | None) -> None:
    """Set step_ms, clips/s, images/s, achieved FLOP/s and utilisation of ``rec`` from per-step times."""
    rec.step_ms = step_stats(times_s)
    rec.clips_per_s = clips_per_step / statistics.median(times_s)
    rec.images_per_s = rec.clips_per_s * frames if frames else None
    rec.achieved_flops = achieved_flops(rec.flops_per_clip, rec.clips_per_s)
    rec.utilisation = utilisation(rec.achieved_flops, rec.peak_flops)
