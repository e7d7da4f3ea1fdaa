"""Measurement primitives: the one timing API, the one peak-memory API, the one GEMM calibration, statistics, and
FLOP/s and utilisation against the GPU peak table. Cases, records, comparison and verdicts live in
``timesformer_harness.bench``.

Timing: warm up first, then time with ``perf_counter`` and a device synchronise at every boundary that is timed
(timm's benchmark.py does the same). ``time_steps`` times calls one by one; ``time_pairs`` alternates two workloads
in blocks (A B A B ...: a calibration block beside every model block sees the same machine state, so their ratio
cancels what slows the whole machine); ``timed_items`` times what an iterator takes to produce each item (a loader's
batches); ``cpu_seconds`` is the CPU time of this process and its workers. ``ThroughputWindow`` turns per-step wait
and step times into clips/s and the data-wait share, for the Trainer's log windows and the bench alike.

Memory: ``PeakMemory`` is the high-water mark of one window of work, of one kind: ``cuda_allocator`` (torch's CUDA
caching allocator: model, optimizer state, activations, batches; not DALI's own buffers, not the CUDA context) or
``rss`` (this process's resident set on Linux: everything it maps, DALI's CPU buffers included, not its worker
processes). A window reports its peak and the counter at its start, so growth is the window's own work.

Utilisation is achieved FLOP/s over a peak: the dense tensor-core figure of the run's precision for the GPUs in
``GPU_PEAKS`` (none for any other GPU), or on CPU the rate of the calibration GEMM measured in the same run (there
is no trustworthy CPU peak table).
"""

from __future__ import annotations

import itertools
import math
import re
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

T = TypeVar("T")
MEMORY_KINDS = ("cuda_allocator", "rss")


# ---------------------------------------------------------------------------------------------- clocks

class Stopwatch:
    """Wall-clock seconds since it was made (``elapsed``), or since the last ``lap``."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def lap(self) -> float:
        """Seconds since the previous lap (or the start); the next lap starts now."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return seconds


def run_stamp() -> str:
    """Local time as ``YYYYmmdd-HHMMSS``: the name of a run folder."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


class OutputFolderError(OSError):
    """An output root that cannot hold a run folder: a file, a read-only place, a full disk."""


def check_output_root(root: str | Path, flag: str = "--out", create: bool = True) -> Path:
    """Create ``root`` (with its parents; ``create=False``: only its nearest existing folder is tried, nothing is
    made) and write and remove a file in it, so that a command learns before it measures anything that it could not
    write its results there. Raises OutputFolderError naming ``root`` and the ``flag`` that names it."""
    root = Path(root)
    existing = next(p for p in (root, *root.parents) if p.exists() or p == Path(p.anchor or "."))
    if existing.exists() and not existing.is_dir():
        what = "it is a file" if existing == root else f"{existing} is a file"
        raise OutputFolderError(f"cannot write under {root}: {what}; name a folder with {flag}")
    try:
        if create:
            root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root if create else existing):
            pass
    except OSError as e:
        raise OutputFolderError(f"cannot write under {root}: {e.strerror or e}; name a writable "
                                f"folder with {flag}") from e
    return root


def new_run_dir(root: str | Path, name: str) -> Path:
    """Create and return the folder ``root/name`` (``name`` usually starts with ``run_stamp()``), or ``name-2``,
    ``name-3``, ... when a run that started in the same second holds it: two runs never share a folder.
    Raises OutputFolderError (``check_output_root``) when ``root`` cannot hold it."""
    root = check_output_root(root)
    for n in itertools.count(1):
        path = root / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputFolderError(f"cannot make the run folder {path}: {e.strerror or e}") from e
    raise AssertionError("unreachable")


def iso_now() -> str:
    """Local time in ISO 8601 with its UTC offset, to the second."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def wall_time() -> float:
    """Seconds since the epoch: the timestamp of a logged event."""
    return time.time()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronize_stream(device: torch.device) -> None:
    """Wait for the work queued on this thread's current stream of ``device`` only (CUDA; a no-op on CPU): the
    training step's, and a DALI batch's copy into torch, but not DALI's own streams decoding the next batches, which
    ``synchronize`` would wait for and count in the step."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def cpu_seconds() -> float:
    """CPU time of this process (to the nanosecond) and of its live child processes (a loader's workers)."""
    import psutil

    total = time.process_time()
    for child in psutil.Process().children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


# ---------------------------------------------------------------------------------------------- timing

def time_block(fn: Callable[[], object], n: int, device: torch.device,
               sync: Callable[[torch.device], None] = synchronize) -> float:
    """Seconds for ``n`` calls of ``fn`` back to back, the device synchronised (``sync``) at the end."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return time.perf_counter() - t0


def time_steps(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``steps`` times; seconds per step (synchronised)."""
    if steps < 1:
        raise ValueError(f"steps={steps}; need at least 1 timed step")
    for _ in range(warmup):
        fn()
    synchronize(device)
    return [time_block(fn, 1, device) for _ in range(steps)]


@dataclass
class KernelTime:
    """A step's work on the GPU, per step: the time the GPU was busy (the union of its kernels', copies' and fills'
    intervals: work on several streams at once counts once), their summed durations, and the device operations."""

    ms_per_step: float
    ops_per_step: float
    summed_ms_per_step: float = 0.0


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals."""
    total, reached = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def kernel_time(fn: Callable[[], object], device: torch.device, steps: int = 3) -> KernelTime | None:
    """The GPU work of ``steps`` calls of ``fn`` (already warmed up), from a ``torch.profiler`` trace with CUDA
    activity; None off CUDA (a CPU has no kernels apart from its ops)."""
    if device.type != "cuda" or steps < 1:
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    return device_totals(prof.events(), steps)


def device_totals(events: Iterable[object], steps: int) -> KernelTime:
    """``KernelTime`` from profiler events: the device-side ones (``device_type`` CUDA, whose ``time_range`` is
    their span on the device and ``device_time_total`` their own duration in us), over ``steps``. Not the GPU-side
    copies of ``record_function`` ranges (device type CUDA too, ``is_user_annotation``: each spans its kernels, which
    are counted themselves), as torch's own device totals leave them out. Raises ``RuntimeError`` when the trace
    holds no device work (no CUDA activity traced): a step on a GPU runs kernels."""
    from torch.autograd import DeviceType

    on_device = [e for e in events if e.device_type == DeviceType.CUDA  # type: ignore[attr-defined]
                 and not getattr(e, "is_user_annotation", False)]
    if not on_device:
        raise RuntimeError("the profiler traced no GPU work (CUDA activity not recorded: is CUPTI available?)")
    summed_us = sum(float(e.device_time_total) for e in on_device)  # type: ignore[attr-defined]
    busy_us = busy_time((e.time_range.start, e.time_range.end) for e in on_device)  # type: ignore[attr-defined]
    return KernelTime(ms_per_step=busy_us / steps / 1e3, ops_per_step=len(on_device) / steps,
                      summed_ms_per_step=summed_us / steps / 1e3)


def time_pairs(a: Callable[[], object], b: Callable[[], object], device: torch.device, pairs: int, *,
               a_reps: int = 1, b_reps: int = 1, warmup: int = 0) -> tuple[list[float], list[float]]:
    """``pairs`` rounds of a block of ``a_reps`` calls of ``a`` then a block of ``b_reps`` calls of ``b``, after
    ``warmup`` untimed calls of each; seconds per call of ``a`` and of ``b`` in each round."""
    if pairs < 1:
        raise ValueError(f"pairs={pairs}; need at least 1")
    for _ in range(warmup):
        a()
        b()
    synchronize(device)
    a_times, b_times = [], []
    for _ in range(pairs):
        a_times.append(time_block(a, a_reps, device) / a_reps)
        b_times.append(time_block(b, b_reps, device) / b_reps)
    return a_times, b_times


def timed_items(items: Iterable[T], device: torch.device,
                sync: Callable[[torch.device], None] = synchronize) -> Iterator[tuple[T, float]]:
    """Each item of ``items`` with the seconds from asking for it to having it (device work synchronised by
    ``sync``)."""
    it = iter(items)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        sync(device)
        yield item, time.perf_counter() - t0


def timed_call(fn: Callable[[], T], device: torch.device) -> tuple[T, float, float]:
    """``fn()``'s result, its wall seconds (device synchronised) and the CPU seconds of this process and its workers."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0, cpu_seconds() - c0


# ---------------------------------------------------------------------------------------------- statistics

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    assert values, "percentile of an empty list"
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_interval(values: list[float], confidence: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """A percentile-bootstrap interval of the median (fixed seed: the same samples give the same interval)."""
    xs = np.asarray(values, dtype=float)
    if len(xs) < 2:
        return float(xs[0]), float(xs[0])
    rng = np.random.default_rng(0)
    medians = np.median(xs[rng.integers(0, len(xs), size=(resamples, len(xs)))], axis=1)
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


def summarize(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """Median, p10, p90 and a 95% bootstrap interval of the median (``ci_low``, ``ci_high``), each times ``scale``."""
    low, high = median_interval(values)
    return {"median": scale * statistics.median(values), "p10": scale * percentile(values, 10),
            "p90": scale * percentile(values, 90), "ci_low": scale * low, "ci_high": scale * high}


def relative_spread(values: list[float]) -> float:
    """Half the 95% interval of the median over the median: how far this median may sit from the true one."""
    low, high = median_interval(values)
    return (high - low) / 2 / statistics.median(values)


class ThroughputWindow:
    """Steps of a training loop or a benchmark, in windows: ``add`` one step (its clips, the seconds spent waiting
    for its batch, its whole duration), ``take`` the window's clips/s and data-wait share and begin the next."""

    def __init__(self) -> None:
        self.steps, self.clips, self.wait_s, self.total_s = 0, 0, 0.0, 0.0

    def add(self, clips: int, wait_s: float, total_s: float) -> None:
        self.steps += 1
        self.clips += clips
        self.wait_s += wait_s
        self.total_s += total_s

    def take(self) -> dict[str, float]:
        """``steps``, ``clips``, ``seconds``, ``clips_per_s`` and ``data_wait_share`` (in [0, 1]) of the window."""
        total = max(self.total_s, 1e-12)
        out = {"steps": self.steps, "clips": self.clips, "seconds": self.total_s, "clips_per_s": self.clips / total,
               "data_wait_share": self.wait_s / total}
        self.__init__()
        return out


# ---------------------------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class MemoryPeak:
    """A window's high-water mark and the counter when the window began, in bytes, of one ``kind``."""

    kind: str  # cuda_allocator | rss
    peak: int
    start: int

    @property
    def growth(self) -> int:
        return max(self.peak - self.start, 0)


class PeakMemory:
    """Peak memory over consecutive windows of work (a bench case, a training log window, a validation pass):
    ``take()`` returns the window's ``MemoryPeak`` and begins the next window.

    On CUDA the counter is the caching allocator's (``reset_peak_memory_stats`` / ``max_memory_allocated``); on
    Linux CPU it is the process's resident set (VmHWM, reset through ``/proc/self/clear_refs``). ``kind`` is ""
    where neither can be read (``take()`` then returns None). ``release_freed``: on CPU each window first hands the
    memory glibc holds free back to the system (``runtime.release_freed_memory``), so that the window's growth is its
    own work even where an earlier piece of work left freed pages to reuse; a training loop leaves it off, since its
    batches are meant to reuse those pages."""

    def __init__(self, device: torch.device | str, release_freed: bool = False) -> None:
        self.device = torch.device(device)
        self.release_freed = release_freed
        if self.device.type == "cuda":
            self.kind = "cuda_allocator"
        else:
            self.kind = "rss" if _reset_rss_peak() else ""
        self.reset()

    def reset(self) -> None:
        """Begin a new window."""
        if self.kind == "cuda_allocator":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = int(torch.cuda.memory_allocated(self.device))
        elif self.kind == "rss":
            if self.release_freed:
                from timesformer_harness.runtime import release_freed_memory

                release_freed_memory()
            _reset_rss_peak()
            self._start = _rss_peak_bytes()

    def so_far(self) -> MemoryPeak | None:
        """The peak since the window began (None when not measurable here); the window goes on."""
        if self.kind == "cuda_allocator":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.kind == "rss":
            peak = _rss_peak_bytes()
        else:
            return None
        return MemoryPeak(self.kind, peak, self._start)

    def take(self) -> MemoryPeak | None:
        """The peak since the window began (None when not measurable here); a new window begins."""
        out = self.so_far()
        self.reset()
        return out


def rss_high_water_bytes() -> int:
    """This process's own peak RSS in bytes: ``VmHWM`` on Linux. Not ``ru_maxrss``, which a process started by
    fork + exec inherits from its parent, so a child of a big process would read its own growth as 0."""
    try:
        return _rss_peak_bytes()
    except OSError:  # no /proc: the portable figure, with the caveat above
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


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


# ---------------------------------------------------------------------------------------------- FLOP/s

@dataclass
class Gemm:
    """The calibration workload: an n x n x n GEMM on one device. ``run`` computes it once; ``flops`` per call."""

    n: int
    run: Callable[[], object]
    flops: int

    def rate(self, seconds_per_call: list[float]) -> float:
        """FLOP/s at the median of the per-call times."""
        return self.flops / statistics.median(seconds_per_call)


def gemm(device: torch.device, n: int, dtype: torch.dtype = torch.float32) -> Gemm:
    """An n x n x n GEMM of random ``dtype`` matrices on ``device``, into an output allocated here too (a run
    allocates nothing: a memory figure taken around runs does not count it)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return Gemm(n, lambda: torch.mm(a, b, out=c), 2 * n**3)


def measure_gemm_flops(device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an fp32 n x n x n GEMM on ``device`` (its fastest of ``repeats`` calls after a warm-up)."""
    g = gemm(device, n)
    return g.flops / min(time_steps(g.run, device, warmup=2, steps=repeats))


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


def utilisation(achieved: float | None, peak: float | None) -> float | None:
    """Achieved over peak FLOP/s, or None when either is unknown."""
    if not achieved or not peak:
        return None
    return achieved / peak
