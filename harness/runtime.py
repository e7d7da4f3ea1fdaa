"""Device, precision, seeding and environment facts shared by every entry point."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The command line a user typed, handed to the processes it starts (timesformer_harness.runner) so that their
# records name it rather than their own start-up.
COMMAND_ENV = "TIMESFORMER_HARNESS_COMMAND"
# the commit of a tree copied without its .git folder (rsync to a cluster node, a copied working tree): records name it
GIT_SHA_ENV = "TIMESFORMER_HARNESS_GIT_SHA"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` = the current CUDA device when there is one, else CPU."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but this torch sees no CUDA device; use 'cpu' or 'auto'")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``auto``|``fp32``|``bf16``|``fp16``); None means plain fp32.

    ``auto`` is bf16 autocast on CUDA and fp32 on CPU (this AVX2 CPU emulates bf16 matmuls slowly).
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r}; choose from ['auto', 'fp32', 'bf16', 'fp16']")
    dtype = _DTYPES[precision]
    if dtype is torch.float16 and device.type == "cpu":
        raise ValueError("precision=fp16 needs a CUDA device (autocast on CPU supports bf16); use bf16 or fp32")
    return dtype


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_determinism() -> None:
    """Deterministic kernels where torch has them (a debug mode: expect slower steps).

    ``warn_only``: an op without a deterministic implementation warns instead of failing, since not every SDPA
    backend's backward has one. cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first call to be
    deterministic; an existing value is kept.
    """
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    logger.info("deterministic algorithms on (expect slower steps)")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


@functools.lru_cache(maxsize=1)
def retain_freed_memory(threshold: int = 1 << 30) -> bool:
    """Have glibc's malloc serve blocks up to ``threshold`` bytes from its heap and keep freed memory there, so a
    batch tensor reuses pages instead of mapping fresh ones: by default every block over 32 MiB (a batch of eight
    8 x 224 x 224 clips is 38.5 MB) is a new mapping whose pages are faulted in and zeroed on first write, which costs
    as much as resizing the clips. Process-wide, once; True when applied (False where the C library is not
    glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = min(2 * threshold, 2**31 - 1)  # mallopt takes a C int
    applied = bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim))
    if applied:
        logger.debug("malloc: blocks up to %d MiB from the heap, freed memory kept", threshold >> 20)
    return applied


def release_freed_memory() -> bool:
    """Hand the memory glibc's malloc holds free back to the system (``malloc_trim(0)``: every arena, the middle of
    the heap included), so that the RSS is what is in use; True when glibc did so. Measuring a peak RSS growth in a
    process that ``retain_freed_memory`` made keep its freed blocks needs it first: otherwise the work reuses those
    pages and its growth reads 0."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(malloc_trim(0))


@functools.lru_cache(maxsize=1)
def apex_available() -> bool:
    """True when NVIDIA apex's fused optimizers can run here: CUDA is visible and ``apex.optimizers.FusedAdam``
    builds. An apex installed without its CUDA extensions imports but raises at construction, and a package of the
    same name on the package index has no ``apex.optimizers``: both are False."""
    if not torch.cuda.is_available():
        return False
    try:
        from apex.optimizers import FusedAdam

        FusedAdam([torch.nn.Parameter(torch.zeros(1))])
    except Exception:  # noqa: BLE001 - whatever a broken or foreign apex raises
        return False
    return True


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, object]:
    """The tree this code runs from: ``git_sha`` (full), ``git_dirty`` (uncommitted changes to tracked files) and
    ``git_diff_sha`` (SHA-256 of ``git diff HEAD``, so two dirty trees can be told apart). Outside git: the commit
    ``TIMESFORMER_HARNESS_GIT_SHA`` names (its tree's state unknown), else "unknown"."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                 cwd=os.path.dirname(os.path.abspath(__file__)))
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"git_sha": os.environ.get(GIT_SHA_ENV, "").strip() or "unknown", "git_dirty": None,
                "git_diff_sha": None}
    diff = git("diff", "HEAD") or ""
    return {"git_sha": sha.strip(), "git_dirty": bool(diff),
            "git_diff_sha": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None}


def cuda_driver_version() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``), or None without a CUDA device or where it cannot be read."""
    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    versions = out.stdout.split()
    return versions[0] if out.returncode == 0 and versions else None


def device_name(device: torch.device) -> str:
    """The GPU name, or the CPU model from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_class(device: torch.device) -> str:
    """What a timing is comparable across: the GPU's name, or the CPU's model, vector ISA and logical CPU count."""
    if device.type == "cuda":
        return f"cuda: {device_name(device)}"
    return f"cpu: {device_name(device)}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs"


def environment_info(device: torch.device | None = None) -> dict[str, object]:
    """The one record of where and how something ran, kept with every benchmark record and run: versions, the
    device and its machine class, the CPU threads and vector ISA, the git tree (``git_state``), host and command."""
    device = device or resolve_device()
    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_driver": cuda_driver_version(),
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "dali": dali_version,
        "apex": apex_available(),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "machine_class": machine_class(device),
        "cpu_threads": torch.get_num_threads(),
        # the vector ISA torch's CPU kernels dispatch to (e.g. AVX2, AVX512): two CPUs of one name can differ
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **git_state(),
        "host": platform.node(),
        "command": os.environ.get(COMMAND_ENV) or shlex.join(sys.orig_argv),
    }
