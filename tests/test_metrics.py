"""timesformer_harness.metrics: the GPU peak table over the names NVIDIA's driver reports, peak memory per window (the
process's real peak RSS on CPU; the CUDA calls through a fake allocator), and the timing primitives on real calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from timesformer_harness.metrics import (GPU_PEAKS, PeakMemory, Stopwatch, ThroughputWindow, gpu_peak, gpu_peak_flops,
                                         time_pairs, time_steps, timed_call, timed_items)
from timesformer_harness.runtime import retain_freed_memory

# torch.cuda.get_device_name() strings as the driver reports them -> the table row they must select
NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 SXM5 80GB": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200 SXM",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100-SXM4-40GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA A100-PCIE-40GB": "A100",
    "NVIDIA L40S": "L40S",
    "NVIDIA L4": "L4",
    "NVIDIA RTX A6000": "RTX A6000",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "NVIDIA B200": "B200",
    "NVIDIA GB200": "GB200",
}
# names that must not borrow another GPU's peak
UNKNOWN = ["NVIDIA GeForce RTX 4090 D", "NVIDIA L40", "NVIDIA RTX 6000 Ada Generation", "NVIDIA A10", "NVIDIA A10G",
           "NVIDIA H20", "NVIDIA H800", "Tesla V100-SXM2-16GB", "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
           "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "Some Unknown GPU", ""]


@pytest.mark.parametrize("name", sorted(NAMES))
def test_each_reported_name_selects_its_own_row(name: str) -> None:
    row = gpu_peak(name)
    assert row is not None and row.label == NAMES[name]


@pytest.mark.parametrize("name", UNKNOWN)
def test_unknown_names_and_mig_slices_get_no_peak(name: str) -> None:
    peak, source = gpu_peak_flops(name, "bf16")
    assert peak is None and "utilisation not computed" in source and repr(name) in source


def test_dense_peaks_per_precision() -> None:
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == (989.5e12, "table:H100 SXM bf16/fp16 dense")
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp16")[0] == 989.5e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32") == (67e12, "table:H100 SXM fp32 (non-tensor)")
    # SXM, PCIe and NVL differ in fp32 as in bf16; the two A100 form factors do not
    assert len({gpu_peak(n).fp32 for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL")}) == 3
    assert gpu_peak("NVIDIA A100-SXM4-80GB") == gpu_peak("NVIDIA A100 80GB PCIe")
    assert gpu_peak_flops("NVIDIA B200", "bf16")[0] == 2.25e15 and gpu_peak_flops("NVIDIA GB200", "bf16")[0] == 2.5e15
    for row in GPU_PEAKS:  # dense tensor-core bf16 is well above the fp32 vector rate everywhere
        assert 1e12 < row.fp32 < row.bf16 < 3e15, row


# ------------------------------------------------------------------------------------------ memory windows

def test_cpu_window_is_the_peak_rss_of_that_window_only() -> None:
    window = PeakMemory(torch.device("cpu"))
    if not window.kind:
        pytest.skip("/proc/self/clear_refs cannot be written here")
    assert window.kind == "rss"
    big = np.ones(256 * 2**20 // 8)  # 256 MiB, touched
    del big
    first = window.take()
    second = window.take()  # a window in which nothing big happened
    assert first.kind == "rss" and first.peak - second.peak > 200 * 2**20, (first, second)
    assert 0 < second.peak < first.peak and first.growth > 200 * 2**20 and second.growth < 20 * 2**20


def test_cpu_peak_growth_is_the_work_s_own_after_freed_memory_was_kept() -> None:
    """A process that keeps freed blocks (``retain_freed_memory``, as every harness entry point does) and has freed
    512 MiB: 200 MiB of new work still reads as ~200 MiB of peak growth when the window hands freed memory back first
    (it read 0 when the work reused the kept pages), and a second window of nothing reads ~0."""
    retain_freed_memory()
    kept = np.ones(512 * 2**20 // 8)
    del kept
    window = PeakMemory(torch.device("cpu"), release_freed=True)
    work = np.ones(200 * 2**20 // 8)  # touched
    peak = window.take()
    del work
    assert peak.kind == "rss" and 190 * 2**20 < peak.growth < 260 * 2**20, peak.growth >> 20
    assert window.take().growth < 20 * 2**20


class FakeAllocator:
    """torch.cuda's peak-memory calls over a counter (what the CUDA caching allocator reports)."""

    def __init__(self) -> None:
        self.allocated = self.peak = 0
        self.resets = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def reset_peak_memory_stats(self, device=None) -> None:
        assert torch.device(device).type == "cuda"
        self.peak = self.allocated
        self.resets += 1

    def max_memory_allocated(self, device=None) -> int:
        assert torch.device(device).type == "cuda"
        return self.peak

    def memory_allocated(self, device=None) -> int:
        assert torch.device(device).type == "cuda"
        return self.allocated


def test_cuda_window_resets_the_allocator_peak_after_each_take(monkeypatch) -> None:
    fake = FakeAllocator()
    for name in ("reset_peak_memory_stats", "max_memory_allocated", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    fake.alloc(100)
    window = PeakMemory(torch.device("cuda", 0))
    assert window.kind == "cuda_allocator" and fake.resets == 1
    fake.alloc(50)
    fake.alloc(-50)
    first = window.take()
    assert (first.peak, first.start, first.growth) == (150, 100, 50)  # model (100) resident + a transient 50
    assert window.take().peak == 100  # the next window saw nothing above the resident 100
    fake.alloc(1000)
    fake.alloc(-1000)
    window.reset()  # e.g. before validation: what came before does not count
    assert window.take().peak == 100


# ------------------------------------------------------------------------------------------ timing

def test_timing_primitives_on_real_calls() -> None:
    cpu, calls = torch.device("cpu"), []
    times = time_steps(lambda: calls.append("s"), cpu, warmup=2, steps=3)
    assert len(times) == 3 and calls == ["s"] * 5 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="steps=0"):
        time_steps(lambda: None, cpu, warmup=0, steps=0)
    calls.clear()
    a, b = time_pairs(lambda: calls.append("a"), lambda: calls.append("b"), cpu, pairs=2, a_reps=2, b_reps=3,
                      warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b", "b"] * 2 and len(a) == len(b) == 2
    import time as clock

    items = list(timed_items(iter([1, 2]), cpu))
    assert [i for i, _ in items] == [1, 2]
    out, wall, cpu_s = timed_call(lambda: sum(range(200_000)), cpu)
    assert out == sum(range(200_000)) and wall > 0 and cpu_s > 0
    _, slept, slept_cpu = timed_call(lambda: clock.sleep(0.05), cpu)
    assert slept >= 0.05 and slept_cpu < 0.04  # asleep: wall time, little CPU time
    watch = Stopwatch()
    clock.sleep(0.01)
    assert watch.lap() >= 0.01 and watch.elapsed() >= 0.01 and watch.lap() < 0.01


def test_throughput_window_is_clips_over_time_and_the_wait_share() -> None:
    window = ThroughputWindow()
    window.add(8, 0.1, 0.5)
    window.add(8, 0.3, 0.5)
    assert window.take() == {"steps": 2, "clips": 16, "seconds": 1.0, "clips_per_s": 16.0,
                             "data_wait_share": pytest.approx(0.4)}
    assert window.take()["steps"] == 0  # a new window began
