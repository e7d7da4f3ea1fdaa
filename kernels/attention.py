"""One attention entry point with a selectable backend, and the timm-style attention module.

Backends: ``auto`` (SDPA picks), ``flash``, ``efficient``, ``cudnn``, ``math`` (SDPA pinned to one kernel through
``torch.nn.attention.sdpa_kernel``) and ``naive``: the explicit ``softmax(q k^T * scale) v`` of the original code,
the reference every other backend is tested against. For short sequences (divided attention's temporal pass) also
``triton``: a kernel that reads q, k, v from the qkv projection's output in place (``kernels/short_attention.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import profiler as autograd_profiler
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

from timesformer_harness.kernels.backend_names import BACKENDS, SHORT_SEQUENCE_BACKENDS

MAX_SHORT_SEQUENCE = 128  # their longest sequence: the whole score matrix lives in one program's registers
_SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """The original's explicit attention: scale applied after the matmul, softmax over keys.

    Args:
        q, k, v: (B, heads, L, head_dim).
    """
    scale = q.size(-1) ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale  # (B, heads, L, L)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", dropout_p: float = 0.0
) -> torch.Tensor:
    """Scaled-dot-product attention on (B, heads, L, head_dim) tensors with the chosen backend.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the pinned SDPA backend cannot run these inputs on this device (SDPA's own message).
    """
    if backend == "naive":
        return naive_attention(q, k, v, dropout_p)
    if backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if backend not in _SDPA_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {list(BACKENDS)}")
    with sdpa_kernel([_SDPA_BACKENDS[backend]]):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def check_backend(backend: str, device: torch.device | str, dtype: torch.dtype | None,
                  capability: tuple[int, int] | None = None, dropout: float = 0.0) -> None:
    """Fail early, with the fix, when ``backend`` cannot compute attention in ``dtype`` on ``device``.

    ``dtype`` is what q, k, v are in: the autocast dtype (bf16/fp16) or None/fp32 without autocast. ``capability``
    is the CUDA device's (major, minor) when known. Touches no GPU. The rules are PyTorch's SDPA kernel filters
    (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``): on CUDA, flash and cuDNN take fp16/bf16 only and
    need sm80 or newer, efficient takes fp32/fp16 and also bf16 from sm80 on; off CUDA, efficient and cuDNN do not
    exist, and flash takes no attention dropout (``dropout``, the training's rate). ``auto``, ``math`` and ``naive``
    run everywhere. ``triton`` (short sequences) needs the triton package and an sm80 or newer GPU, or Triton's CPU
    interpreter (``TRITON_INTERPRET=1``: slow, for tests).

    Raises:
        ValueError: unknown backend, or one that cannot run here (instead of SDPA's "No available kernel").
    """
    if backend not in (*BACKENDS, *SHORT_SEQUENCE_BACKENDS):
        raise ValueError(f"unknown attention backend {backend!r}; choose from {list(BACKENDS)}")
    device = torch.device(device)
    dtype = dtype or torch.float32
    if backend in ("auto", "math", "naive"):
        return
    if backend == "triton":
        _check_triton(device, capability)
        return
    if device.type != "cuda":
        if backend in ("efficient", "cudnn"):
            raise ValueError(f"attn_backend={backend} exists on CUDA only; on {device.type} use flash, math, naive "
                             f"or auto")
        if dropout > 0:  # flash
            raise ValueError(f"attn_backend=flash has no attention dropout on {device.type} (attn_drop_rate="
                             f"{dropout}): use attn_backend=math, naive or auto, or set attn_drop_rate=0")
        return
    where = f" (this GPU is sm{capability[0]}{capability[1]})" if capability else ""
    if backend in ("flash", "cudnn"):
        if capability is not None and capability < (8, 0):
            raise ValueError(f"attn_backend={backend} needs an sm80 or newer GPU{where}; use efficient or auto")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attn_backend={backend} takes fp16/bf16 inputs on CUDA, and this run computes "
                             f"attention in {str(dtype).removeprefix('torch.')}: set the precision to bf16 or fp16 "
                             f"(train.precision / bench.precision), or use attn_backend=efficient or auto")
    elif capability is not None and capability < (8, 0) and dtype is torch.bfloat16:  # efficient
        raise ValueError(f"attn_backend=efficient takes fp16/fp32 below sm80{where}; use fp16 precision or auto")


def triton_build_problem() -> str | None:
    """Why Triton could not build its kernels' launchers here, or None. On a kernel's first launch on a GPU, Triton
    compiles a small C module with the host's C compiler (``CC``, else gcc or clang) against Python's headers; so
    does ``torch.compile``'s inductor, whose GPU kernels are Triton's."""
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler (gcc, clang, or one named by CC): Triton builds each kernel's launcher with it"
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not (Path(include) / "Python.h").is_file():
        return f"no Python.h in {include} (Python's development headers): Triton builds each kernel's launcher with it"
    return None


def _check_triton(device: torch.device, capability: tuple[int, int] | None) -> None:
    if importlib.util.find_spec("triton") is None:
        raise ValueError("attn_backend=triton needs the triton package (PyTorch's CUDA wheels bring it; "
                         "pip install triton), or another backend")
    if device.type == "cuda":
        if capability is not None and capability < (8, 0):
            where = f" (this GPU is sm{capability[0]}{capability[1]})"
            raise ValueError(f"attn_backend=triton needs an sm80 or newer GPU{where}; use auto")
        if problem := triton_build_problem():
            raise ValueError(f"attn_backend=triton cannot run here: {problem}; install it, or use auto")
        return
    from timesformer_harness.kernels.short_attention import interpreted

    if not interpreted():
        raise ValueError(f"attn_backend=triton runs on CUDA GPUs; on {device.type} only in Triton's interpreter "
                         f"(TRITON_INTERPRET=1 set before Triton is first imported; slow: for tests), so use auto")


def short_sequence_kernel(backend: str) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """The attention function of a ``SHORT_SEQUENCE_BACKENDS`` name: (qkv (tokens, 3 * D), seq_len, heads) ->
    (tokens, D). Imported on first use (with Triton and torch's Triton wrapper, about a second here)."""
    if backend != "triton":
        raise ValueError(f"unknown short-sequence attention backend {backend!r}; choose from "
                         f"{list(SHORT_SEQUENCE_BACKENDS)}")
    from timesformer_harness.kernels.short_attention import short_attention

    return short_attention


def short_sequence_choices() -> dict[str, str]:
    """The blocks the short-sequence kernels' autotuner chose in this process, per kernel and shape
    (``short_attention.tuned_blocks``); empty when none ran (their module is not imported to say so)."""
    module = sys.modules.get("timesformer_harness.kernels.short_attention")
    return module.tuned_blocks() if module is not None else {}


def available_backends(device: torch.device | str, dtype: torch.dtype | None, head_dim: int = 64) -> list[str]:
    """The backends that run attention forward and backward on ``device`` with q, k, v in ``dtype`` (the case's
    compute dtype: None/fp32, bf16 or fp16), in BACKENDS order: those ``check_backend`` allows, each probed on a
    small (1, 2, 16, head_dim) input."""
    device = torch.device(device)
    dtype = dtype or torch.float32
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    ok = []
    for name in BACKENDS:
        try:
            check_backend(name, device, dtype, capability)
            q = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype, requires_grad=True)
            attention(q, q, q, backend=name).sum().backward()
            ok.append(name)
        except (ValueError, RuntimeError):
            pass
    return ok


class Attention(nn.Module):
    """Multi-head self-attention with the original parameter names (``qkv`` fused Linear, ``proj``).

    ``qkv`` output channels are ``[q | k | v]``, each split into heads contiguously, as in the original.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
        name: str = "attn",
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        if backend not in (*BACKENDS, *SHORT_SEQUENCE_BACKENDS):
            raise ValueError(f"unknown attention backend {backend!r}; choose from {list(BACKENDS)}")
        # a kernel over runs of seq_len tokens, reading the qkv output in place (SHORT_SEQUENCE_BACKENDS)
        self.short_sequence = short_sequence_kernel(backend) if backend in SHORT_SEQUENCE_BACKENDS else None
        if self.short_sequence is not None and attn_drop > 0:
            raise ValueError(f"attention backend {backend} has no dropout on the attention weights (attn_drop="
                             f"{attn_drop}); use another backend or attn_drop 0")
        self.num_heads = num_heads
        self.backend = backend
        self.name = name  # record_function range, e.g. "attn/temporal"
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D). With ``seq_len``, each run of ``seq_len`` consecutive tokens is one sequence
        (attention does not cross runs): divided attention's T frames of one patch, read where they lie."""
        B, L, D = x.shape
        S = seq_len or L
        if self.short_sequence is not None and seq_len is None:
            raise ValueError(f"attention backend {self.backend} runs within short sequences only (divided "
                             f"attention's temporal pass); {self.name} passes none")
        with self._range():
            if self.short_sequence is not None:  # q, k, v read from the qkv output and written as (tokens, D)
                x = self.short_sequence(self.qkv(x).flatten(0, 1), S, self.num_heads)
            else:
                # Unbinding the (3) axis where it lies: its gradient is stacked straight into the qkv layout.
                qkv = self.qkv(x).view(B * L // S, S, 3, self.num_heads, D // self.num_heads)
                q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B * L/S, heads, S, head_dim)
                x = attention(q, k, v, self.backend, self.attn_drop if self.training else 0.0)
                x = x.transpose(1, 2).reshape(B * L, D)
        return self.proj_drop(self.proj(x)).view(B, L, D)

    def _range(self) -> contextlib.AbstractContextManager:
        """The ``record_function`` range named ``self.name`` while a profiler records (torch's own flag for fast
        checks); nothing otherwise, since entering a range dispatches two ops even with no profiler. While
        ``torch.compile`` traces, nothing: dynamo drops such ranges from the graph anyway (and warns at every
        compile), and the flag is not read, so the compiled graph does not depend on it (a guard on it would
        recompile the step when a profiler starts)."""
        if not torch.compiler.is_compiling() and autograd_profiler._is_profiler_enabled:
            return record_function(self.name)
        return contextlib.nullcontext()
