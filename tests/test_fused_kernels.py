"""The fused eager functions of ``kernels/`` (one-op weight casts, residual adds, the divided block's layout steps)
against their plain-op formulations: the same values, the same gradients, the same gradient dtypes."""

from __future__ import annotations

import pytest
import torch

from timesformer_harness.counting import OpCounter
from timesformer_harness.kernels.cast import call_with_cast_weights, matmul_weights
from timesformer_harness.kernels.layout import (frames_residual, frames_residual_reference,
                                                temporal_residual_and_frames, temporal_residual_and_frames_reference)
from timesformer_harness.kernels.residual import draw_keep_scales, reference_ops, residual_add, scale_rows
from timesformer_harness.model import TimeSformer

TINY = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=3, num_heads=4, num_classes=7)
B, T, N, D = 2, 4, 5, 8


def grads_of(fn, inputs: list[torch.Tensor], seed: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The outputs of ``fn(*inputs)`` and the gradients of a random linear function of them w.r.t. ``inputs``."""
    inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    outputs = fn(*inputs)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    loss.backward()
    return [o.detach() for o in outputs], [t.grad for t in inputs if t.requires_grad]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-6) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.allclose(x.float(), y.float(), atol=atol, rtol=1e-5), (x.float() - y.float()).abs().max()


@pytest.mark.parametrize("update_dtype", [torch.float32, torch.bfloat16])
def test_temporal_residual_and_frames_matches_plain_ops(update_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, update = torch.randn(B, 1 + N * T, D), torch.randn(B, N * T, D).to(update_dtype)
    fused = grads_of(lambda a, u: temporal_residual_and_frames(a, u, T), [x, update])
    plain = grads_of(lambda a, u: temporal_residual_and_frames_reference(a, u, T), [x, update])
    assert_same(fused[0], plain[0])
    assert_same(fused[1], plain[1], atol=1e-2 if update_dtype is torch.bfloat16 else 1e-6)
    frames = fused[0][1]
    assert frames.shape == (B, T, 1 + N, D)
    assert torch.equal(frames[:, 2, 0], x[:, 0]) and torch.equal(frames[1, 3, 1 + 2], fused[0][0][1, 1 + 2 * T + 3])


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.bfloat16])
def test_frames_residual_matches_plain_ops(with_scale: bool, res_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x1, res = torch.randn(B, 1 + N * T, D), torch.randn(B, T, 1 + N, D).to(res_dtype)
    scale = draw_keep_scales([(B, T, 1)], [0.5], torch.device("cpu"))[0] if with_scale else None
    fused = grads_of(lambda a, r: frames_residual(a, r, scale, T), [x1, res])
    plain = grads_of(lambda a, r: frames_residual_reference(a, r, scale, T), [x1, res])
    assert_same(fused[0], plain[0])
    assert_same(fused[1], plain[1], atol=1e-2 if res_dtype is torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("with_scale", [False, True])
def test_residual_add_and_scale_rows_keep_the_branch_dtype(with_scale: bool) -> None:
    torch.manual_seed(0)
    x, branch = torch.randn(B, 7, D), torch.randn(B, 7, D).bfloat16()
    scale = draw_keep_scales([(B, 1, 1)], [0.5], torch.device("cpu"))[0] if with_scale else None
    for fn in (lambda a, b: residual_add(a, b, scale), lambda a, b: a + scale_rows(b, scale).float()):
        fused = grads_of(fn, [x, branch])
        with reference_ops():
            plain = grads_of(fn, [x, branch])
        assert_same(fused[0], plain[0])
        assert_same(fused[1], plain[1])
        assert fused[1][1].dtype == torch.bfloat16


def cuda_autocast_ops(call) -> list[str]:  # noqa: ANN001
    """The ops ``call()`` runs that CUDA autocast has a kernel for (it would cast their inputs), by name; read from
    the dispatcher's registrations, which CPU builds have too."""
    with OpCounter() as counter:
        call()
    names = [getattr(getattr(torch.ops.aten, op), overload).name()
             for op, overload in (n.split(".") for n in counter.count.by_name)]
    return [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCUDA")]


def test_fused_functions_run_under_autocast_without_casts() -> None:
    """The fused functions mix the fp32 residual stream with bf16 branches inside autocast and use no autocast-off
    context: every op their forwards run is one CUDA autocast leaves alone (none of its lists, or an ``out=``
    variant), checked against the kernels CUDA autocast registers (present in CPU builds too). The CPU autocast's
    casts are counted by the op-count tests."""
    torch.manual_seed(0)
    x, branch = torch.randn(B, 1 + N * T, D, requires_grad=True), torch.randn(B, 1 + N * T, D).bfloat16()
    res = torch.randn(B, T, 1 + N, D).bfloat16().requires_grad_()
    rows, frames = draw_keep_scales([(B, 1, 1), (B, T, 1)], [0.5, 0.5], torch.device("cpu"))
    calls = {
        "residual_add": lambda: residual_add(x, branch, rows),
        "residual_add (no scale)": lambda: residual_add(x, branch),
        "scale_rows": lambda: scale_rows(branch, rows),
        "temporal_residual_and_frames": lambda: temporal_residual_and_frames(x, branch[:, 1:], T),
        "frames_residual": lambda: frames_residual(x, res, frames, T),
        "frames_residual (no scale)": lambda: frames_residual(x, res, None, T),
    }
    for name, call in calls.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = cuda_autocast_ops(call)
        assert not cast, f"{name} runs {cast}, which CUDA autocast would cast: use the out= variant"


def test_keep_scales_are_zero_or_one_over_keep_at_the_keep_rate() -> None:
    torch.manual_seed(0)
    cache: dict = {}
    shapes, probs = [(4000, 1, 1), (2, 3000, 1)], [0.1, 0.5]
    first = draw_keep_scales(shapes, probs, torch.device("cpu"), cache)
    for scale, shape, p in zip(first, shapes, probs):
        assert scale.shape == shape and scale.dtype == torch.float32
        assert scale.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
        assert abs((scale > 0).float().mean().item() - (1 - p)) < 0.03
    keep = next(iter(cache.values()))
    second = draw_keep_scales(shapes, probs, torch.device("cpu"), cache)
    assert next(iter(cache.values())) is keep  # the keep probabilities stay on the device
    assert not torch.equal(first[0], second[0])  # fresh masks every call


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time", "space_only"])
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_model_fused_path_matches_plain_ops(attention_type: str, precision: torch.dtype | None) -> None:
    """A training step with stochastic depth: the fused functions and one-op weight casts give the plain ops'
    output and every parameter's gradient (bf16: autocast's own casts, bit for bit in the weights)."""
    model = TimeSformer(**TINY, attention_type=attention_type, drop_path_rate=0.5).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    video = torch.randn(2, 3, 4, 32, 32)
    results = []
    for plain in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same stochastic-depth masks
        with reference_ops() if plain else torch.autocast("cpu", enabled=False):
            with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
                out = model(video)
        out.float().square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_f, grads_f), (out_p, grads_p) = results
    atol = 1e-5 if precision is None else 2e-2
    assert torch.allclose(out_f.float(), out_p.float(), atol=atol)
    for name, g in grads_f.items():
        assert g is not None and g.dtype == torch.float32, name
        assert torch.allclose(g, grads_p[name], atol=atol, rtol=1e-3), name


def test_cast_weights_gives_autocasts_values_and_gradients() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    weights = matmul_weights(layer)
    assert weights == ((layer[0], "weight"), (layer[0], "bias"), (layer[2], "weight"), (layer[2], "bias"))
    runs = []
    for fused in (True, False):
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call_with_cast_weights(layer, weights, x) if fused else layer(x)
        out.float().sum().backward()
        runs.append((out, [p.grad for p in layer.parameters()]))
    assert runs[0][0].dtype == torch.bfloat16 and torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_cast_weights_asks_nothing_of_autocast_while_torch_compile_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``torch.compile`` the layers run plainly (inductor fuses the casts) and no autocast query is made first:
    torch 2.11's dynamo cannot trace ``torch.amp.is_autocast_available`` and breaks the graph on it, which fails a
    ``fullgraph`` compile. Here tracing is faked and the query raises."""

    def untraceable(device_type: str) -> bool:
        raise AssertionError(f"autocast queried for {device_type} while compiling")

    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = call_with_cast_weights(layer, matmul_weights(layer), x)
        monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        traced = call_with_cast_weights(layer, matmul_weights(layer), x)
    assert traced.dtype == torch.bfloat16 and torch.equal(traced, eager)


def test_cast_weights_puts_the_parameters_back_after_the_call_and_when_it_raises() -> None:
    """The bf16 copies sit in the layers' places only during the call: afterwards (and after an exception inside
    it) the module holds its own fp32 ``Parameter`` objects, so ``parameters()``, ``state_dict`` and the optimizer
    see what they saw before; inside the call the layers see the copies."""

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.seen: list[torch.dtype] = []

        def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
            self.seen.append(self.fc.weight.dtype)
            if fail:
                raise RuntimeError("inside the call")
            return self.fc(x)

    probe = Probe()
    before = [(name, p) for name, p in probe.named_parameters()]
    weights = matmul_weights(probe)
    for fail in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            try:
                call_with_cast_weights(probe, weights, torch.randn(2, 4), fail)
            except RuntimeError as e:
                assert fail and str(e) == "inside the call"
        after = list(probe.named_parameters())
        assert [n for n, _ in after] == [n for n, _ in before]
        assert all(a is b and isinstance(a, torch.nn.Parameter) for (_, a), (_, b) in zip(after, before))
        assert all(t.dtype == torch.float32 for t in probe.state_dict().values())
    assert probe.seen == [torch.bfloat16, torch.bfloat16]
