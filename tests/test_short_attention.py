"""The Triton attention for divided attention's temporal pass (``temporal_attn_backend=triton``), run in Triton's CPU
interpreter (conftest sets ``TRITON_INTERPRET=1`` where there is no GPU): the same numbers as the original's explicit
attention, forward and backward, in the model and alone; fewer ops per step than SDPA; clear refusals."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from timesformer_harness.config import ModelConfig
from timesformer_harness.counting import count_train_step
from timesformer_harness.kernels.attention import (MAX_SHORT_SEQUENCE, check_backend, naive_attention,
                                                   short_sequence_choices)
from timesformer_harness.model import create_model, load_preset
from timesformer_harness.workload import TrainStep, build_model, check_attention, synthetic_batch

pytest.importorskip("triton")
import triton  # noqa: E402

from timesformer_harness.kernels.short_attention import (AUTOTUNERS, short_attention, tuned_blocks,  # noqa: E402
                                                           tuning_configs)

CPU = torch.device("cpu")


def reference(qkv: torch.Tensor, seq_len: int, heads: int) -> torch.Tensor:
    """The original's attention over each run of ``seq_len`` tokens of a (tokens, 3 * D) qkv output, in fp32."""
    tokens, width = qkv.shape
    D = width // 3
    q, k, v = (t.transpose(1, 2) for t in qkv.float().view(tokens // seq_len, seq_len, 3, heads, D // heads).unbind(2))
    return naive_attention(q, k, v).transpose(1, 2).reshape(tokens, D)


@pytest.mark.parametrize("seq_len, heads, head_dim, dtype, tol", [
    (8, 4, 16, torch.float32, 1e-5),  # the temporal pass at T = 8: two sequences a program, the last one alone
    (5, 3, 24, torch.float32, 1e-5),  # neither a power of two: three sequences and a padded row, masked
    (1, 2, 16, torch.float32, 1e-5),  # 13 padded rows
    (MAX_SHORT_SEQUENCE, 2, 64, torch.float32, 1e-5),
    (8, 12, 64, torch.bfloat16, 2e-2),  # ViT-B's heads in bf16: the output rounded once
])
def test_matches_the_original_attention_forward_and_backward(seq_len: int, heads: int, head_dim: int,
                                                             dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    sequences = 3
    qkv = torch.randn(sequences * seq_len, 3 * heads * head_dim, dtype=dtype, requires_grad=True)
    out = short_attention(qkv, seq_len, heads)
    assert out.shape == (sequences * seq_len, heads * head_dim) and out.dtype == dtype
    grad = torch.randn_like(out)
    (grad_qkv,) = torch.autograd.grad(out, qkv, grad)
    assert grad_qkv.dtype == dtype
    ref_qkv = qkv.detach().float().requires_grad_()
    ref = reference(ref_qkv, seq_len, heads)
    (ref_grad,) = torch.autograd.grad(ref, ref_qkv, grad.float())
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_qkv.float(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("seq_len, block_rows", [(8, 32), (8, 64), (8, 128), (5, 32), (16, 64), (40, 64)])
def test_every_block_size_the_autotuner_may_pick_gives_the_same_numbers(seq_len: int, block_rows: int) -> None:
    """Several sequences a program (block_rows // seq_len), the last program part-filled: 37 sequences."""
    torch.manual_seed(0)
    qkv = torch.randn(37 * seq_len, 3 * 2 * 16, requires_grad=True)
    out = short_attention(qkv, seq_len, 2, block_rows=block_rows)
    grad = torch.randn_like(out)
    (grad_qkv,) = torch.autograd.grad(out, qkv, grad)
    ref_qkv = qkv.detach().requires_grad_()
    ref = reference(ref_qkv, seq_len, 2)
    (ref_grad,) = torch.autograd.grad(ref, ref_qkv, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_qkv, ref_grad, rtol=1e-5, atol=1e-5)


def test_the_autotuners_choices_are_reported_per_kernel_and_shape() -> None:
    """What the bench records as ``triton_blocks`` (filled here by hand: the interpreter runs no autotuner), and
    the configs each call's autotuning times: those whose blocks hold a sequence, in fp32 none that spills where a
    smaller one holds it."""
    tuner = AUTOTUNERS["forward"]

    def candidates(seq_len: int, dtype: torch.dtype) -> list[tuple[int, int]]:
        named = {"qkv": torch.empty(0, dtype=dtype)}  # as the launch passes them: tensors by position, S by name
        return [(c.kwargs["BLOCK_S"], c.num_warps) for c in tuning_configs(tuner.configs, named, S=seq_len)]

    assert candidates(8, torch.bfloat16) == [(16, 2), (16, 4), (32, 4), (64, 4), (64, 8), (128, 8)]
    assert candidates(40, torch.float16) == [(64, 4), (64, 8), (128, 8)]
    assert candidates(8, torch.float32) == [(16, 2), (16, 4), (32, 4)]
    assert candidates(40, torch.float32) == [(64, 4), (64, 8)] and candidates(100, torch.float32) == [(128, 8)]
    assert AUTOTUNERS["backward"].early_config_prune is tuning_configs
    key = (8, 64, 768, "torch.bfloat16", "torch.bfloat16")
    tuner.cache[key] = triton.Config({"BLOCK_S": 32}, num_warps=4)
    try:
        expected = {"forward S=8 head_dim=64 D=768 bfloat16": "32 rows, 4 warps"}
        assert tuned_blocks() == expected and short_sequence_choices() == expected
    finally:
        del tuner.cache[key]
    assert tuned_blocks() == {}


def test_torchs_compile_caches_key_on_the_kernels_source() -> None:
    """torch's AOT autograd and inductor caches add the source of the Triton kernels a ``triton_op``'s code launches
    (found by reading that code for ``wrap_triton(<name>)``): an edited kernel must not be served from a stale cache,
    so each op's launches name module-level kernels and autotuners, not dictionary lookups."""
    from torch._library.triton import get_triton_kernels_for_op

    for op in ("timesformer_harness::short_attention", "timesformer_harness::short_attention_backward"):
        found = {getattr(k, "fn", k).__name__ for k in get_triton_kernels_for_op(op)}
        assert found == {"_forward_kernel", "_backward_kernel"}, (op, found)


def test_sequences_do_not_see_each_other() -> None:
    """Changing one sequence's tokens changes that sequence's outputs only."""
    torch.manual_seed(0)
    qkv = torch.randn(4 * 8, 3 * 2 * 16)
    changed = qkv.clone()
    changed[8:16] = torch.randn(8, qkv.size(1))
    a, b = short_attention(qkv, 8, 2), short_attention(changed, 8, 2)
    assert torch.equal(a[:8], b[:8]) and torch.equal(a[16:], b[16:]) and not torch.equal(a[8:16], b[8:16])


def test_refuses_what_it_cannot_compute() -> None:
    with pytest.raises(ValueError, match="up to 128 tokens, not 129"):
        short_attention(torch.zeros(129, 96), 129, 2)
    with pytest.raises(ValueError, match="not \\(sequences x 8"):
        short_attention(torch.zeros(12, 96), 8, 2)
    with pytest.raises(ValueError, match="block_rows=16 for sequences of 40 tokens; choose from \\[64, 128\\]"):
        short_attention(torch.zeros(80, 96), 40, 2, block_rows=16)
    with pytest.raises(ValueError, match="takes fp32, bf16 or fp16 qkv, not float64"):  # it computes in fp32
        short_attention(torch.zeros(16, 96, dtype=torch.float64), 8, 2)


def divided(backend: str, depth: int = 2, **kw: object) -> ModelConfig:
    return replace(load_preset("tiny"), depth=depth, num_frames=8, temporal_attn_backend=backend, **kw)


def test_the_model_gives_the_same_logits_and_gradients_as_sdpa() -> None:
    """fp32, temporal_fc drawn (it starts at zero, which would hide the temporal pass); the same state_dict keys."""
    results = {}
    for backend in ("same", "triton"):
        torch.manual_seed(0)
        model = create_model(divided(backend))
        for blk in model.blocks:
            torch.nn.init.normal_(blk.temporal_fc.weight, std=0.2)
        video = torch.randn(2, 3, 8, 32, 32)
        logits = model(video)
        logits.square().sum().backward()
        results[backend] = (logits, {n: p.grad for n, p in model.named_parameters()}, list(model.state_dict()))
    (a, grads_a, keys_a), (b, grads_b, keys_b) = results["same"], results["triton"]
    assert keys_a == keys_b
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_step_issues_fewer_ops_than_sdpa() -> None:
    """Per block: no unbind, transposes or stack around the kernel, and one launching op fewer (the stack that
    gathers dq, dk, dv into the qkv layout); the kernel is one counted op each way."""
    counts = {}
    for backend in ("same", "triton"):
        cfg = divided(backend, drop_path_rate=0.1)
        torch.manual_seed(0)
        train = TrainStep.build(build_model(cfg, CPU, dtype=torch.bfloat16), CPU, torch.bfloat16)
        video, labels = synthetic_batch(cfg, CPU, 2)
        train.step(video, labels)
        counts[backend] = count_train_step(train, video, labels)["total"]
    sdpa, triton_ = counts["same"], counts["triton"]
    assert triton_.by_name["short_attention.default"] == 2 and triton_.by_name["short_attention_backward.default"] == 2
    assert triton_.by_name["stack.default"] == sdpa.by_name["stack.default"] - 2
    assert triton_.launches == sdpa.launches - 2
    assert triton_.ops <= sdpa.ops - 2 * 12


# torch.compile of the model, traced as on a GPU (Triton compiled, not interpreted) up to the kernels' code: dynamo
# with fullgraph=True, then AOT autograd's joint forward + backward graph, whose Triton kernels are listed with the
# tensors functionalization copies for them (those torch's analysis of the kernel's code finds written: Triton's
# compiler, set to an sm90 target, gives it the kernel's IR without a GPU); nothing runs (the forward compiler
# returns a function that stops the call).
COMPILE_TRACE = """
import json, sys
from dataclasses import replace
import torch
import triton
from triton.backends.compiler import GPUTarget
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import default_partition
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from timesformer_harness.model import create_model, load_preset

class SM90:  # what torch asks Triton's active driver for when it generates a kernel's IR
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(SM90())
kernels = []

class Traced(Exception):
    pass

def partition(joint, joint_inputs, **kw):
    kernels.extend([kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__, n.kwargs["tensors_to_clone"]]
                   for n in joint.graph.nodes
                   if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target))
    return default_partition(joint, joint_inputs, **kw)

def forward_compiler(gm, example_inputs):
    def stop(*args):
        raise Traced
    return stop

cfg = replace(load_preset("tiny"), depth=1, num_frames=8, temporal_attn_backend="triton")
backend = aot_autograd(fw_compiler=forward_compiler, partition_fn=partition)
try:
    torch.compile(create_model(cfg), fullgraph=True, backend=backend)(torch.randn(1, 3, 8, 32, 32))
except Traced:
    print(json.dumps(kernels))
"""


def test_torch_compile_traces_the_kernels_into_one_graph_forward_and_backward() -> None:
    """The kernel is a ``triton_op``: ``torch.compile(fullgraph=True)`` takes it into its graph, with its backward
    (a graph break would raise). In a process where Triton compiles rather than interprets: the interpreter's
    kernels cannot be traced (``make gpu-check`` runs the compiled model on a GPU). torch finds that each kernel
    writes its output only: were qkv counted as written (as when a store's offsets came from a helper that also
    took the qkv pointer), the compiled step would copy the whole qkv tensor before each kernel."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", COMPILE_TRACE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [["_forward_kernel", ["out"]],
                                                               ["_backward_kernel", ["grad_qkv"]]], res.stderr[-3000:]


# Compile kernels for real GPUs with Triton's own compiler and ptxas (no GPU needed): what the interpreter cannot check
# (a dot's shape rules, types, register and shared-memory budgets). argv: [target, dtype, (block, warps) ...]. Prints
# per kernel and config the shared memory, and the registers and stack frame (spilled registers) per thread that
# cuobjdump reads from the cubin.
COMPILE_FOR_GPU = """
import json, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from timesformer_harness.kernels.short_attention import KERNELS

cc, dtype, configs = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
shared, usage = {}, {}
for name, kernel in KERNELS.items():
    tensors = ["qkv", "out"] if name == "forward" else ["qkv", "grad_out", "grad_qkv"]
    signature = {**{t: "*" + dtype for t in tensors}, "scale": "fp32", "S": "i32", "TOKENS": "i32", "D": "i32",
                 "HEAD_DIM": "i32", "BLOCK_D": "constexpr", "DOT_PRECISION": "constexpr", "BLOCK_S": "constexpr"}
    for rows, warps in configs:
        constants = {"BLOCK_D": 64, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "BLOCK_S": rows}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
        shared[f"{name} {rows}/{warps}"] = compiled.metadata.shared
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            dump = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", cubin.name],
                                  capture_output=True, text=True, check=True).stdout
        regs, stack = re.search(r"REG:(\\d+) STACK:(\\d+)", dump).groups()
        usage[f"{name} {rows}/{warps}"] = {"registers": int(regs), "stack": int(stack)}
print(json.dumps({"shared": shared, "usage": usage}))
"""


@pytest.mark.parametrize("cc, dtype, configs, limit", [
    (90, "bf16", [(16, 2), (128, 8)], 227 * 1024),  # H100/H200 at ViT-B's head size: every block fits
    (80, "fp32", [(16, 2)], 163 * 1024),  # A100, IEEE fp32 dots
])
def test_the_kernels_compile_for_the_gpus_they_run_on(cc: int, dtype: str, configs: list, limit: int) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU, str(cc), dtype, json.dumps(configs)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    shared, usage = out["shared"], out["usage"]
    assert len(shared) == 2 * len(configs)
    assert all(0 < size <= limit for size in shared.values()), shared
    # The smallest block, what short sequences such as T = 8 can always use, keeps everything in registers: a change
    # that makes it spill (a stack frame) would slow the kernel on every GPU.
    for name in ("forward", "backward"):
        assert usage[f"{name} 16/2"]["stack"] == 0 and usage[f"{name} 16/2"]["registers"] <= 255, usage


def test_the_counting_command_counts_the_triton_step_in_the_interpreter_by_itself() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "timesformer_harness.counting", "--attn", "divided_space_time",
                          "--depth", "2", "--temporal-attn-backend", "triton", "--top", "40"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "|   short_attention.default | 2 |" in res.stdout
    assert "|   short_attention_backward.default | 2 |" in res.stdout


def test_an_interpreter_asked_for_after_triton_was_imported_is_refused_with_the_fix() -> None:
    """Triton builds its own library (``tl.max``, ...) for the interpreter at its first import or never: set later,
    TRITON_INTERPRET=1 would fail inside the kernel, so the check refuses it."""
    code = ("import os, torch.utils.flop_counter; os.environ['TRITON_INTERPRET'] = '1'\n"
            "from dataclasses import replace\n"
            "from timesformer_harness.model import load_preset\n"
            "from timesformer_harness.workload import check_attention\n"
            "check_attention(replace(load_preset('tiny'), temporal_attn_backend='triton'), torch.device('cpu'), None)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1
    assert "TRITON_INTERPRET=1 set before Triton is first imported" in res.stderr, res.stderr[-2000:]


def test_what_triton_needs_to_build_its_launchers_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Triton compiles each kernel's launcher with the host's C compiler against Python's headers (so does
    torch.compile's inductor on a GPU): a machine without either is told so before a kernel is launched."""
    import shutil
    import sysconfig

    from timesformer_harness.kernels.attention import triton_build_problem

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert triton_build_problem() == ("no C compiler (gcc, clang, or one named by CC): Triton builds each kernel's "
                                      "launcher with it")
    monkeypatch.setenv("CC", "/opt/cc")
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})
    assert triton_build_problem() == (f"no Python.h in {tmp_path} (Python's development headers): Triton builds "
                                      "each kernel's launcher with it")
    (tmp_path / "Python.h").touch()
    assert triton_build_problem() is None


def test_refusals_name_the_key_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="temporal pass.*temporal_attn_backend=triton instead"):
        ModelConfig(attn_backend="triton")
    with pytest.raises(ValueError, match="attn_drop_rate=0.1.*set model.attn_drop_rate=0"):
        check_attention(divided("triton", attn_drop_rate=0.1), CPU, None)
    with pytest.raises(ValueError, match="up to 128 frames, not model.num_frames=192"):
        check_attention(replace(divided("triton"), num_frames=192), CPU, None)
    with pytest.raises(ValueError, match="needs an sm80 or newer GPU \\(this GPU is sm75\\)"):
        check_backend("triton", "cuda", torch.float16, (7, 5))
    from timesformer_harness.kernels import attention as attention_module

    monkeypatch.setattr(attention_module, "triton_build_problem", lambda: None)
    check_backend("triton", "cuda", torch.bfloat16, (9, 0))
    monkeypatch.setattr(attention_module, "triton_build_problem", lambda: "no C compiler (gcc, clang, or CC)")
    with pytest.raises(ValueError, match=r"attn_backend=triton cannot run here: no C compiler \(gcc, clang, or CC\); "
                                         "install it, or use auto"):
        check_backend("triton", "cuda", torch.bfloat16, (9, 0))
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="model.temporal_attn_backend=triton runs on CUDA GPUs; on cpu only in "
                                         "Triton's interpreter"):
        check_attention(divided("triton"), CPU, None)
    check_attention(divided("same"), CPU, None)  # the spatial pass alone is not checked for it


@pytest.mark.parametrize("attention_type", ["joint_space_time", "space_only"])
def test_a_temporal_backend_for_a_variant_without_a_temporal_pass_is_warned_about(attention_type, caplog) -> None:
    """Not refused (one override serves every variant of make bench ATTN=all), but said: it changes nothing."""
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.workload"):
        check_attention(replace(divided("triton"), attention_type=attention_type), CPU, None)
    assert f"model.temporal_attn_backend=triton does nothing for {attention_type}" in caplog.text
