"""Every attention backend against the explicit softmax(q k^T * scale) v reference."""

import pytest
import torch

from timesformer_harness.kernels.attention import (BACKENDS, Attention, attention, available_backends, check_backend,
                                                   naive_attention)
from timesformer_harness.kernels.layout import frame_major, patch_major


@pytest.mark.parametrize("shape", [(6, 2, 8, 16), (2, 3, 17, 8), (1, 4, 65, 32)])  # temporal, spatial, joint-like
def test_backends_match_naive(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-2, -1) / shape[-1] ** 0.5, dim=-1) @ v
    assert torch.allclose(naive_attention(q, k, v), ref, atol=1e-6)
    backends = available_backends("cpu", torch.float32, shape[-1])
    assert {"auto", "flash", "math", "naive"} <= set(backends) <= set(BACKENDS)
    for backend in backends:
        assert (attention(q, k, v, backend) - ref).abs().max() <= 1e-5, backend


def test_backend_gradients_match() -> None:
    torch.manual_seed(0)
    grads = {}
    for backend in available_backends("cpu", torch.float32, 8):
        torch.manual_seed(1)
        k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
        torch.manual_seed(0)
        q = torch.randn(2, 2, 9, 8, requires_grad=True)
        attention(q, k, v, backend).square().sum().backward()
        grads[backend] = q.grad
    for backend, g in grads.items():
        assert torch.allclose(g, grads["naive"], atol=1e-5), backend


def _runs(backend: str, dtype: torch.dtype) -> bool:
    """Whether ``backend`` really computes attention forward and backward on this CPU in ``dtype``."""
    q = torch.randn(2, 2, 9, 16, dtype=dtype, requires_grad=True)
    try:
        attention(q, q, q, backend).sum().backward()
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_available_backends_probe_in_the_case_dtype(dtype: torch.dtype) -> None:
    assert available_backends("cpu", dtype, 16) == [b for b in BACKENDS if _runs(b, dtype)]
    assert available_backends("cpu", None, 16) == available_backends("cpu", torch.float32, 16)


def test_check_backend_agrees_with_sdpa_on_cpu() -> None:
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                check_backend(backend, "cpu", dtype)
                allowed = True
            except ValueError:
                allowed = False
            assert allowed == _runs(backend, dtype), (backend, dtype)
    with pytest.raises(ValueError, match="efficient exists on CUDA only"):
        check_backend("efficient", torch.device("cpu"), None)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        check_backend("fast", "cpu", None)


def test_check_backend_cuda_rules_without_touching_a_gpu() -> None:
    cuda = torch.device("cuda")  # a device object only: check_backend never allocates on it
    for backend in ("flash", "cudnn"):
        for dtype in (None, torch.float32):
            with pytest.raises(ValueError, match=rf"attn_backend={backend} takes fp16/bf16 inputs on CUDA.*"
                                                 r"computes attention in float32.*train.precision"):
                check_backend(backend, cuda, dtype)
        for dtype in (torch.bfloat16, torch.float16):
            check_backend(backend, cuda, dtype, capability=(9, 0))
        with pytest.raises(ValueError, match=rf"{backend} needs an sm80 or newer GPU \(this GPU is sm75\)"):
            check_backend(backend, cuda, torch.float16, capability=(7, 5))
    for dtype in (None, torch.float16, torch.bfloat16):
        check_backend("efficient", cuda, dtype, capability=(8, 0))
        for backend in ("auto", "math", "naive"):
            check_backend(backend, cuda, dtype, capability=(7, 0))
    check_backend("efficient", cuda, torch.float32, capability=(7, 5))
    with pytest.raises(ValueError, match="efficient takes fp16/fp32 below sm80"):
        check_backend("efficient", cuda, torch.bfloat16, capability=(7, 5))


def test_unavailable_backend_raises_sdpa_error() -> None:
    if "efficient" in available_backends("cpu", torch.float32):
        pytest.skip("efficient attention runs on this device")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="No viable backend"):
        attention(q, q, q, "efficient")


def test_attention_module_keeps_original_names_and_layout() -> None:
    torch.manual_seed(0)
    m = Attention(16, num_heads=4, backend="naive")
    assert [k for k, _ in m.named_parameters()] == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    x = torch.randn(2, 5, 16)
    q, k, v = m.qkv(x).split(16, dim=-1)  # [q | k | v], heads contiguous inside each
    heads = lambda t: t.reshape(2, 5, 4, 4).transpose(1, 2)  # noqa: E731
    attn = torch.softmax(heads(q) @ heads(k).transpose(-2, -1) * 0.5, -1)
    ref = m.proj((attn @ heads(v)).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(m(x), ref, atol=1e-6)
    m.backend = "auto"
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_layout_views_token_order_without_copies() -> None:
    B, N, T, D = 2, 3, 4, 5
    x = torch.arange(B * N * T).float().reshape(B, N * T, 1).expand(B, N * T, D).contiguous()
    t = patch_major(x, T)  # token 1 + n*T + t -> row (b, n), position t
    assert t.shape == (B, N, T, D) and t[0, 1, 2, 0] == 1 * T + 2
    s = frame_major(x, T)  # -> row (b, t), position n
    assert s.shape == (B, T, N, D) and s[0, 1, 2, 0] == 2 * T + 1
    assert t.data_ptr() == s.data_ptr() == x.data_ptr()  # views, no copies


def test_attention_over_runs_of_seq_len_tokens() -> None:
    """seq_len=T: each run of T consecutive tokens is its own sequence, as attention on the reshaped batch."""
    torch.manual_seed(0)
    m = Attention(16, num_heads=4, backend="naive")
    x = torch.randn(2, 3 * 4, 16)
    runs = m(x.reshape(6, 4, 16)).reshape(2, 12, 16)
    assert torch.allclose(m(x, seq_len=4), runs, atol=1e-6)
    assert not torch.allclose(m(x), runs, atol=1e-3)  # without it the 12 tokens attend to each other


def test_the_temporal_pass_takes_its_own_backend() -> None:
    """``model.temporal_attn_backend``: divided attention's temporal pass on its own backend, the spatial pass on
    ``attn_backend``; ``same`` follows ``attn_backend``. The weights (state_dict keys) and the logits do not change;
    a backend the device cannot run is refused naming the key; joint attention has no temporal pass to check."""
    from dataclasses import replace

    from timesformer_harness.config import ModelConfig
    from timesformer_harness.model import create_model
    from timesformer_harness.workload import check_attention

    kw = dict(num_classes=5, attention_type="divided_space_time", init="scratch")
    torch.manual_seed(0)
    same = create_model("tiny", **kw).eval()
    torch.manual_seed(0)
    naive = create_model("tiny", temporal_attn_backend="naive", **kw).eval()
    assert [(b.temporal_attn.backend, b.attn.backend) for b in naive.blocks] == [("naive", "auto")] * 2
    assert [(b.temporal_attn.backend, b.attn.backend) for b in same.blocks] == [("auto", "auto")] * 2
    assert same.state_dict().keys() == naive.state_dict().keys()
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(same(video), naive(video), atol=1e-5)
    with pytest.raises(ValueError, match=r"model.temporal_attn_backend='fast'; choose from \['same', 'auto'"):
        ModelConfig(temporal_attn_backend="fast")
    cfg = ModelConfig(attention_type="divided_space_time", temporal_attn_backend="efficient")
    with pytest.raises(ValueError, match="^model.temporal_attn_backend=efficient exists on CUDA only"):
        check_attention(cfg, torch.device("cpu"), None)
    check_attention(replace(cfg, attention_type="joint_space_time"), torch.device("cpu"), None)
    with pytest.raises(ValueError, match="^model.attn_backend=cudnn exists on CUDA only"):
        check_attention(replace(cfg, attn_backend="cudnn"), torch.device("cpu"), None)
    # the fix names the key that was checked (the temporal one's message had said to change attn_backend)
    with pytest.raises(ValueError, match=r"^model.temporal_attn_backend=flash takes fp16/bf16 .* or use "
                                         r"model.temporal_attn_backend=efficient or auto$"):
        check_attention(replace(cfg, temporal_attn_backend="flash"), torch.device("cuda"), None, (9, 0))


def test_flash_with_attention_dropout_on_cpu_is_refused_before_the_first_step() -> None:
    """SDPA's flash kernel on the CPU takes no dropout: training with model.attn_drop_rate > 0 had passed the
    start-up check and then failed its first forward with SDPA's "No available kernel"."""
    from timesformer_harness.config import ModelConfig
    from timesformer_harness.model import create_model
    from timesformer_harness.workload import check_attention

    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(RuntimeError):  # what the check stands in for
        attention(q, q, q, "flash", dropout_p=0.1)
    cfg = ModelConfig(attn_backend="flash", attn_drop_rate=0.1)
    with pytest.raises(ValueError, match=r"^model.attn_backend=flash has no attention dropout on cpu "
                                         r"\(model.attn_drop_rate=0.1\): use model.attn_backend=math, naive or auto, "
                                         r"or set model.attn_drop_rate=0$"):
        check_attention(cfg, torch.device("cpu"), None)
    check_attention(ModelConfig(attn_backend="flash"), torch.device("cpu"), None)
    check_backend("flash", torch.device("cuda"), torch.bfloat16, (9, 0), dropout=0.1)  # CUDA's flash has dropout
    model = create_model("tiny", attn_backend="auto", attn_drop_rate=0.1, num_classes=3).train()
    model(torch.randn(1, 3, 4, 32, 32)).sum().backward()  # what the message points to runs
