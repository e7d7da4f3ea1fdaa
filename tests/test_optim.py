"""apex detection: an apex whose optimizer cannot be built, or an unrelated package named apex, falls back to
torch's fused optimizers (saying why), and environment_info's "apex" says whether apex really works."""

from __future__ import annotations

import importlib
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from timesformer_harness import runtime
from timesformer_harness.config import SolverConfig
from timesformer_harness.optim import build_optimizer

# Three stand-ins for what `import apex` can find: apex built without its CUDA extensions (its optimizers raise at
# construction, with apex's own message), an unrelated package of the same name, and a working apex.
FAKE_APEX = {
    "no_cuda_ext": '''
class _Fused:
    def __init__(self, params, **kw):
        raise RuntimeError(f"apex.optimizers.{type(self).__name__} requires cuda extensions")
class FusedSGD(_Fused): pass
class FusedAdam(_Fused): pass
class FusedLAMB(_Fused): pass
''',
    "unrelated": None,  # an `apex` package with no `optimizers` module
    "working": '''
import torch
class FusedSGD(torch.optim.SGD):
    def __init__(self, params, lr, momentum, nesterov, weight_decay):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
class FusedAdam(torch.optim.AdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, adam_w_mode=True):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)
class FusedLAMB(FusedAdam):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, max_grad_norm=1.0):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm  # apex's default clips every step to a global norm of 1.0
''',
}


@pytest.fixture(params=sorted(FAKE_APEX))
def fake_apex(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "apex"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A stand-in apex for tests."""\n')
    if FAKE_APEX[request.param] is not None:
        (pkg / "optimizers.py").write_text(FAKE_APEX[request.param])
    for name in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    runtime.apex_available.cache_clear()
    yield request.param
    runtime.apex_available.cache_clear()


def _params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(4, 2).parameters())


def test_apex_used_only_when_its_optimizer_builds(fake_apex: str, caplog: pytest.LogCaptureFixture) -> None:
    cuda = torch.device("cuda")  # the choice depends on the device type; the CPU parameters never move
    for name, torch_cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        with caplog.at_level(logging.INFO, logger="timesformer_harness.optim"):
            opt, impl = build_optimizer(_params(), SolverConfig(optimizer=name), cuda)
        if fake_apex == "working":
            assert impl == {"sgd": "apex.optimizers.FusedSGD", "adamw": "apex.optimizers.FusedAdam"}[name]
            assert type(opt).__module__ == "apex.optimizers"
        else:
            assert impl == f"torch.optim.{torch_cls.__name__}(fused=True)" and type(opt) is torch_cls
            why = ("requires cuda extensions); an apex installed without its CUDA extensions" if fake_apex ==
                   "no_cuda_ext" else "is not importable (ModuleNotFoundError")
            assert "apex not used: apex.optimizers.Fused" in caplog.text and why in caplog.text, caplog.text
        assert f"optimizer: {impl}" in caplog.text
        caplog.clear()
    never = build_optimizer(_params(), SolverConfig(use_apex="never"), cuda)[1]
    assert never == "torch.optim.SGD(fused=True)"
    if fake_apex == "working":
        lamb, impl = build_optimizer(_params(), SolverConfig(optimizer="lamb"), cuda)
        assert impl == "apex.optimizers.FusedLAMB"
        assert lamb.max_grad_norm == math.inf  # no clipping of its own: solver.grad_clip (0 = off) decides
    else:
        with pytest.raises(ValueError, match=r"lamb needs apex .* and here apex.optimizers.FusedLAMB"):
            build_optimizer(_params(), SolverConfig(optimizer="lamb"), cuda)
    assert build_optimizer(_params(), SolverConfig(), torch.device("cpu"))[1] == "torch.optim.SGD(foreach=True)"


def test_environment_reports_whether_apex_works(fake_apex: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.apex_available() is (torch.cuda.is_available() and fake_apex == "working")
    runtime.apex_available.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    # a CUDA build of torch without a GPU cannot initialise cuDNN (it takes the minimum over zero devices)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: None)
    assert runtime.apex_available() is (fake_apex == "working")
    assert runtime.environment_info(torch.device("cpu"))["apex"] is (fake_apex == "working")
