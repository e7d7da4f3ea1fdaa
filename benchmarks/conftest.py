"""pytest-benchmark suites: shared fixtures and the machine_info hook (torch, CUDA, DALI, device details).

    make bench-pytest                                  # saves under .benchmarks/ (--benchmark-autosave)
    .venv/bin/python -m pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:30%

The preset defaults to cpu_bench without a GPU and vit_base_patch16 with one; BENCH_PRESET=tiny overrides it.
A case that runs out of memory is recorded in extra_info (status "oom") and skipped, not failed.
"""

from __future__ import annotations

import os

import pytest
import torch

from timesformer_harness.metrics import gpu_peak
from timesformer_harness.runtime import device_name
from timesformer_harness.runtime import environment_info, resolve_device


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Add torch/CUDA/DALI/apex/git and the device name, so a compare across machines is visible in the JSON."""
    device = resolve_device()
    machine_info["torch_harness"] = environment_info(device)
    machine_info["device_name"] = device_name(device)
    machine_info["cuda_device_count"] = torch.cuda.device_count()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine_info["gpu"] = {"name": props.name, "total_memory": props.total_memory,
                               "capability": f"{props.major}.{props.minor}",
                               "multi_processor_count": props.multi_processor_count}
        row = gpu_peak(props.name)
        machine_info["gpu_peak_flops_table"] = {"label": row.label, "bf16": row.bf16, "fp32": row.fp32} if row else None


@pytest.fixture(scope="session")
def device() -> torch.device:
    return resolve_device()


@pytest.fixture(scope="session")
def preset(device: torch.device) -> str:
    return os.environ.get("BENCH_PRESET") or ("vit_base_patch16" if device.type == "cuda" else "cpu_bench")
