"""``train.compile``: the train step of every attention variant compiles into one graph (fullgraph: no graph
breaks), gives eager's loss and gradients, and issues far fewer kernels. Slow: inductor compiles for minutes on
2 CPU cores (a C++ compiler builds the kernels)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch._inductor.config as inductor_config

from timesformer_harness.counting import profiled_launches
from timesformer_harness.model import load_preset
from timesformer_harness.workload import TrainStep, build_model, compile_model, synthetic_batch

CPU = torch.device("cpu")
pytestmark = pytest.mark.slow


def built(attention_type: str, depth: int, compile: str, drop_path_rate: float = 0.1
          ) -> tuple[TrainStep, torch.Tensor, torch.Tensor]:
    cfg = replace(load_preset("tiny"), depth=depth, num_frames=8, attention_type=attention_type,
                  drop_path_rate=drop_path_rate)
    torch.manual_seed(0)
    train = TrainStep.build(build_model(cfg, CPU, dtype=torch.bfloat16), CPU, torch.bfloat16, compile=compile)
    video, labels = synthetic_batch(cfg, CPU, 2)
    return train, video, labels


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time", "space_only"])
def test_compiled_step_is_one_graph_with_eagers_numbers(attention_type: str) -> None:
    """Without stochastic depth (inductor draws random numbers its own way), in bf16: the loss and every gradient
    within bf16's rounding of eager's."""
    torch.compiler.reset()
    grads = []
    for mode in ("none", "default"):
        train, video, labels = built(attention_type, 2, mode, drop_path_rate=0.0)
        _, loss = train.forward(video, labels)
        train.backward(loss)
        grads.append((loss.item(), [p.grad.clone() for p in train.model.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = grads
    assert compiled_loss == pytest.approx(eager_loss, rel=2e-2)
    for a, b in zip(eager_grads, compiled_grads):
        assert (a - b).norm() <= 0.03 * a.norm() + 1e-6, ((a - b).norm() / a.norm()).item()


def test_compiled_divided_step_launches_under_600() -> None:
    """Launches per train step of 12 blocks, from the blocks' own count (3 blocks minus 2: the blocks are the
    same code) and the rest: at most 600 compiled (the eager step's ceiling is 900, tests/test_op_counts.py)."""
    torch.compiler.reset()
    totals = {}
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        for depth in (2, 3):
            train, video, labels = built("divided_space_time", depth, "default")
            for _ in range(2):  # compile, then one steady step
                train.step(video, labels)
            counts = profiled_launches(lambda: train.step(video, labels))
            # the compiled code's kernels seen: a trace without them would count only the aten ops around them
            assert counts["inductor kernel"] >= 10 * depth, counts
            totals[depth] = sum(counts.values())
    per_block = totals[3] - totals[2]
    twelve = totals[2] + 10 * per_block
    assert 0 < per_block and twelve <= 600, (totals, twelve)


def test_compile_modes_are_checked() -> None:
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, "none") is model
    with pytest.raises(ValueError, match=r"compile='fast'; choose from \['none', 'default', 'reduce-overhead'"):
        compile_model(model, "fast")
