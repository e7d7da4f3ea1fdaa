"""timesformer_harness.workload: the one train/infer step (loss with label smoothing, clipping, the fp16 scaler path,
torch.compile) on the tiny model, and the attention-backend check every model build goes through (CUDA cases
judged from a device object and a compute capability, no GPU touched)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from timesformer_harness.config import SolverConfig
from timesformer_harness.model import load_preset
from timesformer_harness.workload import (BENCH_SOLVER, TrainStep, build_model, check_attention, synthetic_batch,
                                          synthetic_step)

CPU = torch.device("cpu")
# Plain gradient descent: a parameter moves by exactly -lr x its (clipped) gradient.
PLAIN_SGD = SolverConfig(optimizer="sgd", base_lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0)


def _tiny(seed: int = 0, **changes):
    torch.manual_seed(seed)
    cfg = replace(load_preset("tiny"), **changes)
    model = build_model(cfg, CPU)
    video, labels = synthetic_batch(cfg, CPU, batch=3)
    return cfg, model, video, labels


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_label_smoothing_loss_is_the_formula():
    eps = 0.2
    cfg, model, video, labels = _tiny(drop_path_rate=0.0)
    step = TrainStep.build(model, CPU, None, replace(PLAIN_SGD, label_smoothing=eps))
    logits, loss = step.forward(video, labels)
    logp = F.log_softmax(logits.detach(), dim=-1)
    nll = -logp[torch.arange(len(labels)), labels]
    expected = ((1 - eps) * nll + eps * (-logp.mean(dim=-1))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(nll.mean().item(), rel=1e-3)  # smoothing changed it


def test_gradient_clipping_bounds_the_update_norm():
    clip = 1e-3
    _, model, video, labels = _tiny(drop_path_rate=0.0)
    before = _flat(model)
    grads = TrainStep.build(model, CPU, None, PLAIN_SGD)
    _, loss = grads.forward(video, labels)
    grads.backward(loss)
    raw_norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()])).item()
    assert raw_norm > 10 * clip, "the test needs a gradient well above the clip"
    grads.optimizer.zero_grad(set_to_none=True)

    clipped = TrainStep.build(model, CPU, None, replace(PLAIN_SGD, grad_clip=clip))
    clipped.step(video, labels)
    update = torch.linalg.vector_norm(_flat(model) - before).item()  # lr 1: the clipped gradient's norm
    assert update == pytest.approx(clip, rel=1e-3)
    assert all(p.grad is None for p in model.parameters())  # cleared for the next step


def test_fp16_step_goes_through_the_grad_scaler():
    if not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast in this torch")
    _, model, video, labels = _tiny(drop_path_rate=0.0)
    before = _flat(model)
    step = TrainStep.build(model, CPU, torch.float16, PLAIN_SGD)
    assert step.scaler.is_enabled() and step.scaler.get_scale() == 2.0**16
    seen = []
    step.optimizer.register_step_pre_hook(lambda opt, args, kw: seen.append(
        torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()))
    logits, loss = step.forward(video, labels)
    assert logits.dtype is torch.float16 and loss.dtype is torch.float32
    step.backward(loss)
    step.optimizer_step()
    # the optimizer saw unscaled gradients: the update is -lr x grad, not 65536 x larger
    (grad,) = seen
    assert torch.isfinite(grad).all()
    assert torch.allclose(_flat(model), before - grad, atol=1e-6)
    assert torch.linalg.vector_norm(grad).item() < 1e3


def test_synthetic_step_modes_and_the_bench_optimizer():
    cfg = load_preset("tiny")
    model, step = synthetic_step(cfg, CPU, None, mode="train", batch=2)
    before = _flat(model)
    assert model.training
    step()
    assert not torch.equal(_flat(model), before)
    model, infer = synthetic_step(cfg, CPU, None, mode="infer", batch=2, frames=2, img_size=16)
    logits = infer()
    assert not model.training and logits.shape == (2, cfg.num_classes) and logits.is_inference()
    with pytest.raises(ValueError, match=r"mode='eval'; choose from \['train', 'infer'\]"):
        synthetic_step(cfg, CPU, None, mode="eval", batch=2)
    opt = TrainStep.build(build_model(cfg, CPU), CPU, None).optimizer
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == BENCH_SOLVER.momentum == 0.9
    assert opt.defaults["foreach"] and not opt.defaults["nesterov"] and opt.defaults["weight_decay"] == 0.0


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """``train.compile``: torch.compile (inductor, which needs a C++ compiler on CPU) gives the same step. Slow:
    inductor's first compile of even this 1-block model takes about a minute on 2 cores (3 minutes under load)."""
    # Forget earlier compilations of the model's code in this process (test_model compiles it at other shapes):
    # they would make dynamo recompile with dynamic shapes, a different (and here failing) inductor path.
    torch.compiler.reset()
    small = dict(depth=1, embed_dim=32, num_heads=2, num_frames=2, img_size=16, drop_path_rate=0.0)
    results = []
    for compile_ in (False, True):
        _, model, video, labels = _tiny(seed=1, **small)
        step = TrainStep.build(model, CPU, None, replace(PLAIN_SGD, base_lr=0.1),
                               compile="default" if compile_ else "none")
        assert (step.forward_model is not model) == compile_
        losses = [step.step(video, labels).item() for _ in range(2)]
        results.append((losses, _flat(model)))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = results
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    assert torch.allclose(compiled_params, eager_params, atol=1e-5)


CUDA = torch.device("cuda")


def test_check_attention_refuses_what_sdpa_cannot_run_on_cuda():
    cfg = load_preset("tiny")
    for backend in ("flash", "cudnn"):
        with pytest.raises(ValueError, match=rf"model.attn_backend={backend} takes fp16/bf16 inputs on CUDA, and this "
                                             r"run computes attention in float32: set the precision to bf16 or fp16"):
            check_attention(replace(cfg, attn_backend=backend), CUDA, None, (9, 0))
        check_attention(replace(cfg, attn_backend=backend), CUDA, torch.bfloat16, (9, 0))
        with pytest.raises(ValueError, match=rf"model.attn_backend={backend} needs an sm80 or newer GPU \(this GPU "
                                             r"is sm75\)"):
            check_attention(replace(cfg, attn_backend=backend), CUDA, torch.float16, (7, 5))
    check_attention(replace(cfg, attn_backend="efficient"), CUDA, None, (9, 0))
    with pytest.raises(ValueError, match="model.attn_backend=efficient takes fp16/fp32 below sm80"):
        check_attention(replace(cfg, attn_backend="efficient"), CUDA, torch.bfloat16, (7, 0))
    for backend in ("auto", "math", "naive"):
        check_attention(replace(cfg, attn_backend=backend), CUDA, None, (7, 0))
    with pytest.raises(ValueError, match="model.attn_backend=cudnn exists on CUDA only"):
        check_attention(replace(cfg, attn_backend="cudnn"), CPU, None)


def test_build_model_checks_before_building_and_reads_the_gpus_capability(monkeypatch):
    """The Trainer, evaluation, every bench case, the gate and the profiler build through ``build_model``."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (9, 0))
    with pytest.raises(ValueError, match="model.attn_backend=flash takes fp16/bf16 inputs on CUDA"):
        build_model(replace(load_preset("tiny"), attn_backend="flash"), CUDA)  # fp32: refused, nothing built
    with pytest.raises(ValueError, match="model.attn_backend=flash takes fp16/bf16"):
        synthetic_step(replace(load_preset("tiny"), attn_backend="flash"), CUDA, None, mode="train", batch=2)
    assert asked == [CUDA, CUDA]
    assert build_model(replace(load_preset("tiny"), attn_backend="flash"), CPU).blocks[0].attn.backend == "flash"


def test_bench_config_is_refused_before_any_case_runs():
    from timesformer_harness.bench import resolve

    with pytest.raises(ValueError, match="model.attn_backend=efficient exists on CUDA only"):
        resolve(preset="tiny", overrides=["model.attn_backend=efficient"])
