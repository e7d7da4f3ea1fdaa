"""Attention over short sequences read from the qkv projection's output in place: divided attention's temporal pass.

The temporal pass of a divided block attends over each patch's T frames (T = 8 in the Kinetics recipe), 196 x 12
sequences of 8 tokens per clip at ViT-B. Through SDPA it costs more than its FLOPs: q, k and v are strided views of
the qkv output, SDPA's kernels tile 64 or more query rows where a sequence has 8, and in backward the three
gradients are stacked back into the qkv layout. Here one Triton program per head and block of whole sequences (16
to 128 rows: two to sixteen sequences at T = 8; the size and the warps picked by Triton's autotuner on the GPU)
reads its q, k, v rows straight from the qkv output ``(tokens, 3 * D)``, holds the block's score matrix in registers
(masked so that each sequence attends to itself only), and writes its output rows straight into ``(tokens, D)``;
backward recomputes the scores (nothing but the qkv output is saved) and writes dq, dk, dv into one
``(tokens, 3 * D)`` gradient.

Numerics: dots accumulate in fp32, on tensor cores in TF32 for bf16/fp16 inputs (exact for those operands; the
fp32 probabilities are rounded to TF32's 10-bit mantissa, finer than the 16-bit type flash attention rounds them
to) and in IEEE fp32 for fp32 inputs; softmax in fp32, the result rounded once to the input's dtype; the scale is
applied to the product, as the original's ``(q @ k^T) * scale``.

The kernels are registered with ``torch.library.triton_op``, so ``torch.compile`` traces them into its graph rather
than breaking it. They run on CUDA GPUs of sm80 or newer; on the CPU only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported: ``torch.utils.flop_counter`` imports it, for one), which
is how the tests check them against SDPA.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from timesformer_harness.kernels.attention import MAX_SHORT_SEQUENCE


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET=1`` now and when Triton was first
    imported (its own library functions, ``tl.max`` among them, are built for the interpreter then or never)."""
    from triton.runtime.interpreter import InterpretedFunction

    return (os.environ.get("TRITON_INTERPRET", "0") == "1"
            and isinstance(getattr(tl.standard, "max", None), InterpretedFunction))


@triton.jit
def _rows(block, S, TOKENS, BLOCK_S: tl.constexpr):
    """A program's rows: as many whole sequences of S tokens as BLOCK_S rows hold (several when S is short, so that
    few rows of the 16-row minimum of a tensor-core dot are padding), the token of each row, which rows hold one,
    and the keys each row may attend to: those of its own sequence (a row that holds no token attends to all,
    keeping its softmax finite; it reads zeros and its results are not stored)."""
    SEQS = BLOCK_S // S
    rows = tl.arange(0, BLOCK_S)
    tokens = block.to(tl.int64) * (SEQS * S) + rows
    rows_ok = (rows < SEQS * S) & (tokens < TOKENS)
    same_sequence = (rows // S)[:, None] == (rows // S)[None, :]
    keys_ok = (same_sequence & rows_ok[None, :]) | (~rows_ok)[:, None]
    return tokens, rows_ok, keys_ok


@triton.jit
def _block(S, TOKENS, D, HEAD_DIM, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's keys each row may attend to, the mask of its (row, column) elements, and their offsets in a
    (tokens, D) tensor (the output, its gradient) and in the (tokens, 3 * D) qkv layout. No pointer comes in:
    torch's analysis of what a kernel writes follows a store's offsets back through the calls that made them, and
    would count every pointer such a call takes as written (and ``torch.compile`` would copy it first)."""
    block, head = tl.program_id(0), tl.program_id(1)
    tokens, rows_ok, keys_ok = _rows(block, S, TOKENS, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    mask = rows_ok[:, None] & (cols < HEAD_DIM)[None, :]
    at_out = tokens[:, None] * D + head * HEAD_DIM + cols[None, :]
    at_qkv = tokens[:, None] * (3 * D) + head * HEAD_DIM + cols[None, :]
    return keys_ok, mask, at_out, at_qkv


@triton.jit
def _load_qkv(qkv, at_qkv, mask, D):
    """q, k, v of the block's rows, in fp32."""
    q = tl.load(qkv + at_qkv, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(qkv + at_qkv + D, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(qkv + at_qkv + 2 * D, mask=mask, other=0.0).to(tl.float32)
    return q, k, v


@triton.jit
def _probabilities(q, k, keys_ok, scale, DOT_PRECISION: tl.constexpr):
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    scores = tl.where(keys_ok, scores, float("-inf"))  # other sequences' and padded keys take no weight
    p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _forward_kernel(qkv, out, scale, S, TOKENS, D, HEAD_DIM, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    keys_ok, mask, at_out, at_qkv = _block(S, TOKENS, D, HEAD_DIM, BLOCK_D, BLOCK_S)
    q, k, v = _load_qkv(qkv, at_qkv, mask, D)
    p = _probabilities(q, k, keys_ok, scale, DOT_PRECISION)
    o = tl.dot(p, v, input_precision=DOT_PRECISION)
    tl.store(out + at_out, o.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(qkv, grad_out, grad_qkv, scale, S, TOKENS, D, HEAD_DIM, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_S: tl.constexpr):
    keys_ok, mask, at_out, at_qkv = _block(S, TOKENS, D, HEAD_DIM, BLOCK_D, BLOCK_S)
    q, k, v = _load_qkv(qkv, at_qkv, mask, D)
    do = tl.load(grad_out + at_out, mask=mask, other=0.0).to(tl.float32)
    p = _probabilities(q, k, keys_ok, scale, DOT_PRECISION)
    dv = tl.dot(tl.trans(p), do, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # softmax backward; sum(p * dp) = rowsum(do * o)
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * scale
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION) * scale
    at = grad_qkv + at_qkv
    dtype = grad_qkv.dtype.element_ty
    tl.store(at, dq.to(dtype), mask=mask)
    tl.store(at + D, dk.to(dtype), mask=mask)
    tl.store(at + 2 * D, dv.to(dtype), mask=mask)


# Rows per program and warps: Triton's autotuner times each that can hold a sequence at the first call of a shape
# (S, head_dim, D, dtypes) on the GPU and keeps the fastest. More rows make fewer, larger programs and dots, with
# more masked-out scores between the sequences of a block.
CONFIGS = ((16, 2), (16, 4), (32, 4), (64, 4), (64, 8), (128, 8))  # (BLOCK_S, num_warps)
# In fp32 (IEEE dots) every block of more rows than this spills registers, on sm80 and sm90 (read from the cubins):
# those are timed only for sequences no smaller block holds.
FP32_MAX_ROWS = 32


def min_block(seq_len: int) -> int:
    """The fewest rows a program takes for sequences of ``seq_len``: one sequence, and at least a 16-row dot."""
    return max(16, triton.next_power_of_2(seq_len))


def tuning_configs(configs: list, named_args: dict, **kwargs: object) -> list:
    """The autotuner's candidates for a call (its ``early_config_prune``; the launch's positional arguments by name,
    the others as keywords): the ``configs`` whose blocks hold a sequence of ``S``, and in fp32 none past
    ``FP32_MAX_ROWS`` rows unless they are all there is."""
    call = {**named_args, **kwargs}
    smallest = min_block(call["S"])
    fit = [c for c in configs if c.kwargs["BLOCK_S"] >= smallest]
    if call["qkv"].dtype == torch.float32:
        return [c for c in fit if c.kwargs["BLOCK_S"] <= max(smallest, FP32_MAX_ROWS)]
    return fit


# One autotuner per kernel, at module level: torch's compile caches key on the source of the kernels an op's code
# names in ``wrap_triton(<name>)``, so an edited kernel is not served from a stale cache.
_TUNING = dict(configs=[triton.Config({"BLOCK_S": rows}, num_warps=warps) for rows, warps in CONFIGS],
               key=["S", "HEAD_DIM", "D"], prune_configs_by={"early_config_prune": tuning_configs})
_forward_tuned = triton.autotune(**_TUNING)(_forward_kernel)
_backward_tuned = triton.autotune(**_TUNING)(_backward_kernel)
KERNELS = {"forward": _forward_kernel, "backward": _backward_kernel}
AUTOTUNERS = {"forward": _forward_tuned, "backward": _backward_tuned}


def tuned_blocks() -> dict[str, str]:
    """The blocks the autotuner chose in this process, per kernel and shape, e.g. ``{"forward S=8 head_dim=64
    D=768 bfloat16": "32 rows, 4 warps"}``; empty before an autotuned call (and in the interpreter, which runs the
    smallest block)."""
    def shape(key: tuple) -> str:  # the autotuner's key: the values of S, HEAD_DIM, D, then the tensors' dtypes
        dtypes = dict.fromkeys(str(v).removeprefix("torch.") for v in key[3:])
        return " ".join([*(f"{n}={v}" for n, v in zip(("S", "head_dim", "D"), key)), *dtypes])

    return {f"{name} {shape(key)}": f"{config.kwargs['BLOCK_S']} rows, {config.num_warps} warps"
            for name, tuner in AUTOTUNERS.items() for key, config in tuner.cache.items()}


def _run(name: str, qkv: torch.Tensor, seq_len: int, num_heads: int, block_rows: int, *tensors: torch.Tensor) -> None:
    """Launch ``KERNELS[name]`` over ``qkv`` (tokens, 3 * D) and ``tensors``, ``block_rows`` rows a program: 0 =
    autotuned on a GPU, the smallest block in the interpreter (whose kernels the autotuner cannot time)."""
    tokens, width = qkv.shape
    D = width // 3
    head_dim = D // num_heads
    args = dict(scale=head_dim ** -0.5, S=seq_len, TOKENS=tokens, D=D, HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32")

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(tokens // seq_len, meta["BLOCK_S"] // seq_len), num_heads

    kernel = _forward_kernel if name == "forward" else _backward_kernel
    tuned = _forward_tuned if name == "forward" else _backward_tuned
    interpreter = interpreted()
    if block_rows or interpreter:
        rows = block_rows or min_block(seq_len)
        launch = kernel if interpreter else wrap_triton(kernel)
        launch[grid](qkv, *tensors, **args, BLOCK_S=rows, num_warps=max(w for r, w in CONFIGS if r == rows))
    else:
        wrap_triton(tuned)[grid](qkv, *tensors, **args)


@triton_op("timesformer_harness::short_attention", mutates_args=())
def _short_attention(qkv: torch.Tensor, seq_len: int, num_heads: int, block_rows: int) -> torch.Tensor:
    out = qkv.new_empty(qkv.size(0), qkv.size(1) // 3)
    _run("forward", qkv, seq_len, num_heads, block_rows, out)
    return out


@triton_op("timesformer_harness::short_attention_backward", mutates_args=())
def _short_attention_backward(qkv: torch.Tensor, grad_out: torch.Tensor, seq_len: int, num_heads: int,
                              block_rows: int) -> torch.Tensor:
    grad_qkv = torch.empty_like(qkv)
    _run("backward", qkv, seq_len, num_heads, block_rows, grad_out, grad_qkv)
    return grad_qkv


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:  # noqa: ANN001
    ctx.save_for_backward(inputs[0])  # qkv
    ctx.shape = inputs[1:]  # seq_len, num_heads, block_rows


def _backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
    (qkv,) = ctx.saved_tensors
    return _short_attention_backward(qkv, grad_out.contiguous(), *ctx.shape), None, None, None


_short_attention.register_autograd(_backward, setup_context=_setup_context)


def short_attention(qkv: torch.Tensor, seq_len: int, num_heads: int, block_rows: int = 0) -> torch.Tensor:
    """Multi-head attention within each run of ``seq_len`` consecutive tokens.

    Args:
        qkv: (tokens, 3 * D), the fused qkv projection's output: ``[q | k | v]``, each split into ``num_heads``
            heads contiguously; ``tokens`` a multiple of ``seq_len``.
        seq_len: tokens per sequence, at most ``MAX_SHORT_SEQUENCE``.
        block_rows: rows per program, one of ``CONFIGS``' and at least ``min_block(seq_len)``; 0 (the default):
            chosen by Triton's autotuner on the GPU.

    Returns:
        (tokens, D): each token's attention output, heads side by side (what the output projection reads).

    Raises:
        ValueError: a sequence longer than ``MAX_SHORT_SEQUENCE``, token counts that are not whole sequences,
            ``block_rows`` that no config has or that cannot hold a sequence, or a dtype other than fp32/bf16/fp16
            (the kernel computes in fp32: float64 would be rounded silently).
    """
    if qkv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the triton attention backend takes fp32, bf16 or fp16 qkv, not "
                         f"{str(qkv.dtype).removeprefix('torch.')}: use another temporal_attn_backend")
    if seq_len > MAX_SHORT_SEQUENCE:
        raise ValueError(f"the triton attention backend takes sequences of up to {MAX_SHORT_SEQUENCE} tokens, not "
                         f"{seq_len}: use another temporal_attn_backend for clips of more frames")
    if qkv.dim() != 2 or qkv.size(0) % seq_len or qkv.size(1) % (3 * num_heads):
        raise ValueError(f"qkv of shape {tuple(qkv.shape)} is not (sequences x {seq_len}, 3 x heads x head_dim)")
    rows = sorted({r for r, _ in CONFIGS if r >= min_block(seq_len)})
    if block_rows and block_rows not in rows:
        raise ValueError(f"block_rows={block_rows} for sequences of {seq_len} tokens; choose from {rows} (or 0: "
                         f"autotuned)")
    return _short_attention(qkv.contiguous(), seq_len, num_heads, block_rows)
