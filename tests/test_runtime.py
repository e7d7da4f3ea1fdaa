"""timesformer_harness.runtime: precision and device resolution, autocast, seeding, determinism, environment facts."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from timesformer_harness.runtime import (autocast, device_name, environment_info, git_state, precision_name,
                                         resolve_device, resolve_precision, seed_everything, set_determinism)

CPU = torch.device("cpu")


def test_precision_resolution_per_device():
    assert resolve_precision("auto", CPU) is None  # fp32 on CPU: bf16 is emulated on AVX2
    assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("fp16", torch.device("cuda")) is torch.float16
    with pytest.raises(ValueError, match="precision=fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match=r"precision='fp8'; choose from \['auto', 'fp32', 'bf16', 'fp16'\]"):
        resolve_precision("fp8", CPU)
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


def test_autocast_runs_matmuls_in_the_asked_dtype():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(CPU, torch.bfloat16):
        assert (a @ b).dtype is torch.bfloat16
    with autocast(CPU, None):
        assert (a @ b).dtype is torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_device_resolution_without_a_gpu():
    assert resolve_device() == CPU and resolve_device("cpu") == CPU
    with pytest.raises(RuntimeError, match="this torch sees no CUDA device; use 'cpu' or 'auto'"):
        resolve_device("cuda")


def test_seed_everything_repeats_python_numpy_and_torch():
    def draw() -> tuple[float, float, list[float]]:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first


def test_set_determinism_switches_torch_and_cublas(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        set_determinism()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def test_environment_info_names_versions_and_hardware():
    git_state.cache_clear()  # read once per process: the tree may have changed since this worker read it
    info = environment_info(CPU)
    assert info["torch"] == torch.__version__ and info["device"] == "cpu"
    assert info["cpu_threads"] == torch.get_num_threads() and isinstance(info["apex"], bool)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert info["device_name"] == device_name(CPU) and info["device_name"] in cpuinfo
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=Path(__file__).parent).stdout
    assert info["git_sha"] == (git("rev-parse", "HEAD").strip() or "unknown") and len(info["git_sha"]) == 40
    diff = git("diff", "HEAD")
    assert info["git_dirty"] == bool(diff) and (info["git_diff_sha"] is not None) == bool(diff)
    assert info["machine_class"] == f"cpu: {info['device_name']}, {info['cpu_capability']}, {os.cpu_count()} CPUs"
    assert info["host"] and info["command"]


def test_a_tree_without_git_is_named_by_the_commit_the_environment_gives(tmp_path, monkeypatch):
    """A tree copied without its .git folder (or a machine without git): the records name the commit that
    TIMESFORMER_HARNESS_GIT_SHA gives, with the tree's state unknown; "unknown" without it."""
    from timesformer_harness.runtime import GIT_SHA_ENV

    monkeypatch.setenv("PATH", str(tmp_path))  # no git to run
    for given, named in (("0123abcd" * 5 + "\n", "0123abcd" * 5), (None, "unknown")):
        if given is None:
            monkeypatch.delenv(GIT_SHA_ENV)
        else:
            monkeypatch.setenv(GIT_SHA_ENV, given)
        git_state.cache_clear()
        assert git_state() == {"git_sha": named, "git_dirty": None, "git_diff_sha": None}
    git_state.cache_clear()


def test_the_cuda_driver_version_is_read_from_nvidia_smi(tmp_path, monkeypatch):
    from timesformer_harness.runtime import cuda_driver_version

    assert torch.cuda.is_available() or cuda_driver_version() is None
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=driver_version" ] && printf "580.159.04\\n580.159.04\\n"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_driver_version() == "580.159.04"  # one line per GPU: the first
    smi.write_text("#!/bin/sh\nexit 9\n")
    assert cuda_driver_version() is None
    smi.unlink()
    assert cuda_driver_version() is None


def test_retain_freed_memory_stops_page_faults_on_reused_batches():
    """A freed 38.5 MB batch (eight 8 x 224 x 224 clips) is mapped afresh and faulted in page by page on every
    allocation by default; after ``retain_freed_memory`` the next one reuses the heap's pages (minor faults counted by
    the kernel, in a fresh process: the setting is process-wide)."""
    import sys

    code = """
import resource, sys, torch
from timesformer_harness.runtime import retain_freed_memory

def faults():
    for _ in range(16):  # warm: glibc's heap settles after a few batches (measured: 8 with faults, then none)
        torch.empty(8, 3, 8, 224, 224).zero_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(8, 3, 8, 224, 224).zero_()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

default = faults()
applied = retain_freed_memory()
print(default, applied, faults())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    default, applied, retained = res.stdout.split()
    pages = 8 * 3 * 8 * 224 * 224 * 4 / 4096
    assert applied == "True"
    assert float(default) > 0.9 * pages, "expected the default malloc to fault every page of a fresh batch in"
    assert float(retained) < 0.05 * pages, f"{retained} page faults per reused batch ({pages:.0f} pages)"
