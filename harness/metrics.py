"""Timing, memory, FLOP/s and utilisation helpers, and the versioned bench record shared by bench, gate and
the pytest-benchmark suites.

Method: warm up first, then time each step with ``perf_counter`` and a
device synchronise at the step boundary (timm benchmark.py), report the median and the p10/p90 spread.
Peak memory is the CUDA allocator's peak on GPU (what torch allocates: not DALI's own buffers, not the CUDA context)
and, on CPU, the peak RSS growth of a *fresh process* per case (the bench runs every case in its own subprocess);
``PeakMemoryWindow`` gives the Trainer the peak of each log window instead of a running maximum.
Utilisation is achieved FLOP/s over a peak: the dense tensor-core figure of the run's precision for the GPUs in
``GPU_PEAKS`` (none for any other GPU), or on CPU an fp32 GEMM rate measured in the same run (there is no
trustworthy CPU peak table).
"""

from __future__ import annotations

import json
import logging
import re
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from timesformer_harness.pipelines.files import atomic_write_text

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error", "skipped")

@dataclass(frozen=True)
class GpuPeak:
    """A GPU's dense peaks in FLOP/s: bf16/fp16 on the tensor cores (no 2:4 sparsity) and plain fp32."""

    label: str  # as in records: "H100 SXM"
    pattern: str  # regex on torch.cuda.get_device_name(), matched case-insensitively
    bf16: float
    fp32: float


# Per GPU, from NVIDIA's datasheets; their tensor-core figures are quoted with sparsity, the dense peak is half.
# fp32 is the non-tensor rate: torch runs fp32 matmuls in full fp32 unless TF32 is switched on, which this
# harness does not do. A name matches at word boundaries (B200 is not GB200, H200 is not GH200), the first row
# that matches wins (the NVL and PCIe rows come before their family's), and a MIG slice matches nothing.
GPU_PEAKS: tuple[GpuPeak, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet: SXM / NVL / PCIe columns. "NVIDIA H100 80GB HBM3" is the SXM part.
    GpuPeak("H100 NVL", r"\bH100\b.*\bNVL\b", 835.5e12, 60e12),
    GpuPeak("H100 PCIe", r"\bH100\b.*\bPCIe\b", 756.5e12, 51e12),
    GpuPeak("H100 SXM", r"\bH100\b", 989.5e12, 67e12),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 SXM ("NVIDIA H200") and H200 NVL.
    GpuPeak("H200 NVL", r"\bH200\b.*\bNVL\b", 835.5e12, 60e12),
    GpuPeak("H200 SXM", r"\bH200\b", 989.5e12, 67e12),
    # NVIDIA GH200 Grace Hopper Superchip datasheet (its H100 GPU).
    GpuPeak("GH200", r"\bGH200\b", 989.5e12, 67e12),
    # NVIDIA A100 Tensor Core GPU datasheet: the SXM and PCIe parts (40 and 80 GB) have the same peaks.
    GpuPeak("A100", r"\bA100\b", 312e12, 19.5e12),
    # NVIDIA L40S datasheet; NVIDIA L4 datasheet.
    GpuPeak("L40S", r"\bL40S\b", 362.05e12, 91.6e12),
    GpuPeak("L4", r"\bL4\b", 121e12, 30.3e12),
    # NVIDIA RTX A6000 datasheet (309.7 TFLOPS tensor, with sparsity).
    GpuPeak("RTX A6000", r"\bRTX A6000\b", 154.85e12, 38.7e12),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: bf16 with fp32 accumulate, as autocast runs it.
    # The RTX 4090 D is a cut-down part.
    GpuPeak("RTX 4090", r"\bRTX 4090\b(?! D\b)", 165.2e12, 82.6e12),
    # NVIDIA HGX B200 datasheet (8 GPUs: 36 PFLOPS bf16 with sparsity, 600 TFLOPS fp32) per GPU.
    GpuPeak("B200", r"\bB200\b", 2.25e15, 75e12),
    # NVIDIA GB200 NVL72 datasheet (GB200 superchip: 2 GPUs, 10 PFLOPS bf16 with sparsity; NVL72: 5,760 TFLOPS
    # fp32 over 72 GPUs) per GPU.
    GpuPeak("GB200", r"\bGB200\b", 2.5e15, 80e12),
)


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
    """Reset the CUDA peak; on CPU hand freed heap memory back (``release_freed_memory``), reset this process's RSS
    high-water mark to its current RSS (Linux; elsewhere it keeps the peak so far) and return it (bytes) as the
    baseline: the growth then is this piece of work's own, whatever ran in the process before."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    from timesformer_harness.runtime import release_freed_memory

    release_freed_memory()
    _reset_rss_peak()
    return rss_high_water_bytes()


def rss_high_water_bytes() -> int:
    """This process's own peak RSS in bytes: ``VmHWM`` on Linux. Not ``ru_maxrss``, which a process started by
    fork + exec inherits from its parent (measured: a child of a 1.5 GB process reported 1457 MB, its VmHWM 14 MB),
    so a case run in a fresh process from a big one (a pytest worker, say) read its growth as 0."""
    try:
        return _rss_peak_bytes()
    except OSError:  # no /proc: the portable figure, with the caveat above
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_memory(device: torch.device, baseline: int = 0) -> tuple[int, str]:
    """(peak bytes, kind): CUDA allocator peak, or RSS high-water growth over ``baseline`` on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_allocator"
    return max(rss_high_water_bytes() - baseline, 0), "rss_fresh_process"


def _reset_rss_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux 4.0+: ``/proc/self/clear_refs``, "5");
    False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _rss_peak_bytes() -> int:
    """This process's peak RSS since its last reset (VmHWM in ``/proc/self/status``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM line in /proc/self/status")


class PeakMemoryWindow:
    """Peak memory over consecutive windows of work (the Trainer's log windows, a validation pass): ``take()``
    returns the peak since the window began and begins the next one.

    On CUDA the window is the caching allocator's peak (``torch.cuda.max_memory_allocated``, reset with
    ``reset_peak_memory_stats``): model, optimizer state, activations and batches, but not DALI's own GPU buffers
    or the CUDA context. On Linux CPU it is the process's peak RSS (all of it, DALI's CPU buffers included; not
    DataLoader worker processes). ``kind`` names it (``max_allocated`` / ``max_rss``), "" where neither can be
    reset (then ``take()`` returns None).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.kind = "max_allocated"
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.kind = "max_rss" if _reset_rss_peak() else ""

    def reset(self) -> None:
        """Begin a new window."""
        if self.kind == "max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "max_rss":
            _reset_rss_peak()

    def take(self) -> int | None:
        """Peak bytes since the window began (None when not measurable here); a new window begins."""
        if self.kind == "max_allocated":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.kind == "max_rss":
            peak = _rss_peak_bytes()
        else:
            return None
        self.reset()
        return peak


# ---------------------------------------------------------------------------------------------- FLOP/s

def measure_gemm_flops(device: torch.device, n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32
                       ) -> float:
    """FLOP/s of an n x n x n GEMM on ``device`` (best of ``repeats`` after a warm-up): the CPU peak proxy."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_steps(lambda: torch.mm(a, b), device, warmup=2, steps=repeats)
    return 2.0 * n**3 / min(times)


def gpu_peak(name: str) -> GpuPeak | None:
    """The ``GPU_PEAKS`` row of a ``torch.cuda.get_device_name()`` string, or None: an unknown GPU, or a MIG slice
    (a fraction of the GPU whose share of the peak the name does not give)."""
    if re.search(r"\bMIG\b", name):
        return None
    return next((row for row in GPU_PEAKS if re.search(row.pattern, name, re.IGNORECASE)), None)


def gpu_peak_flops(name: str, precision: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s, where it comes from) for a GPU name and the run's precision (fp32 | bf16 | fp16).

    Unknown GPUs give ``(None, why)``: no utilisation is computed rather than one against a guessed peak.
    """
    row = gpu_peak(name)
    if row is None:
        return None, (f"no peak for {name!r} in timesformer_harness.metrics.GPU_PEAKS (a MIG slice or an unlisted "
                      f"GPU): utilisation not computed")
    if precision == "fp32":
        return row.fp32, f"table:{row.label} fp32 (non-tensor)"
    return row.bf16, f"table:{row.label} bf16/fp16 dense"


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
