"""One workload: build the model for a case, and one train or inference step.

Every number the harness prints times these functions: the Trainer's loop (``TrainStep``'s pieces), the bench's
model, scaling and e2e suites, the gate, the profiler, the pytest-benchmark suites and ``model_vs_naive``
(``synthetic_step`` or ``TrainStep.step``). A change to the step (AMP, the optimizer, clipping, channels-last,
compile) therefore reaches all of them at once.

A train step is: forward under autocast, the loss in fp32 (cross-entropy with label smoothing, or soft-target
cross-entropy after mixup/cutmix), backward through the fp16 ``GradScaler`` (a no-op for fp32 and bf16), optional
gradient-norm clipping on unscaled gradients, the optimizer step, ``zero_grad(set_to_none=True)``.

Measured steps (bench, gate, profiler, benchmarks) use ``BENCH_SOLVER``: SGD with momentum 0.9 and no weight decay,
built by ``timesformer_harness.optim.build_optimizer`` like the Trainer's (``foreach`` on CPU, ``fused`` or apex on
CUDA).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from timesformer_harness.common import check_fits, host_memory_bytes
from timesformer_harness.config import ModelConfig, SolverConfig, check_compile_mode
from timesformer_harness.mixup import soft_target_cross_entropy
from timesformer_harness.model import TimeSformer, create_model
from timesformer_harness.optim import build_optimizer
from timesformer_harness.runtime import autocast
from timesformer_harness.kernels.attention import MAX_SHORT_SEQUENCE, check_backend
from timesformer_harness.variants import variant
from timesformer_harness.pipelines.base import empty_clips, memory_bytes

logger = logging.getLogger(__name__)

MODES = ("train", "infer")
# The optimizer of every measured train step. Its hyper-parameters do not change the step's cost except through
# the ops they add (Nesterov and weight decay add a pass over the parameters each), so the bench keeps the plain
# momentum SGD its baselines were measured with.
BENCH_SOLVER = SolverConfig(optimizer="sgd", base_lr=1e-4, momentum=0.9, nesterov=False, weight_decay=0.0)


def check_attention(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None,
                    capability: tuple[int, int] | None = None) -> None:
    """Fail before anything is built when ``cfg.attn_backend`` (or divided attention's ``temporal_attn_backend``)
    cannot run attention on ``device`` in ``dtype`` (the autocast dtype; None = fp32), e.g. ``flash`` or ``cudnn``
    in fp32 on CUDA: a ValueError naming the key and the fix instead of SDPA's "No available kernel" at the first
    forward. ``capability`` is the GPU's (major, minor), read from ``device`` when not given."""
    device = torch.device(device)
    if capability is None and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
    keys = {"attn_backend": cfg.attn_backend}
    if variant(cfg.attention_type).temporal_branch and cfg.temporal_attn_backend != "same":
        keys["temporal_attn_backend"] = cfg.temporal_attn_backend
    elif cfg.temporal_attn_backend != "same":  # kept, so that one override serves make bench ATTN=all
        logger.warning("model.temporal_attn_backend=%s does nothing for %s, which has no temporal pass (divided "
                       "attention's); its attention runs on model.attn_backend=%s", cfg.temporal_attn_backend,
                       cfg.attention_type, cfg.attn_backend)
    if keys.get("temporal_attn_backend") == "triton":
        if cfg.attn_drop_rate > 0:
            raise ValueError(f"model.temporal_attn_backend=triton has no attention dropout (model.attn_drop_rate="
                             f"{cfg.attn_drop_rate}): set model.attn_drop_rate=0 or another temporal_attn_backend")
        if cfg.num_frames > MAX_SHORT_SEQUENCE:
            raise ValueError(f"model.temporal_attn_backend=triton takes up to {MAX_SHORT_SEQUENCE} frames, not "
                             f"model.num_frames={cfg.num_frames}: use another temporal_attn_backend")
    for key, backend in keys.items():
        try:
            check_backend(backend, device, dtype, capability, cfg.attn_drop_rate)
        except ValueError as e:  # its messages name attn_backend and attn_drop_rate, without the section
            raise ValueError(str(e).replace("attn_backend=", f"model.{key}=").replace(
                "attn_drop_rate=", "model.attn_drop_rate=")) from None


MODEL_SIZES = ("embed_dim", "depth", "num_frames", "img_size", "patch_size", "mlp_ratio", "num_classes")


def check_model_fits(cfg: ModelConfig, device: torch.device) -> None:
    """Refuse a model whose fp32 weights alone are larger than the memory it is built in (the host's, then
    ``device``'s), counted on the meta device, naming its largest parameter and the sizes that make it."""
    with torch.device("meta"):
        meta = create_model(cfg)
    params = list(meta.named_parameters())
    count = sum(p.numel() for _, p in params)
    name, largest = max(params, key=lambda kv: kv[1].numel())
    sizes = ", ".join(f"model.{k}={getattr(cfg, k)}" for k in MODEL_SIZES)
    memories = [("cpu", host_memory_bytes())] + ([] if device.type == "cpu" else [(device.type, memory_bytes(device))])
    check_fits(f"the model's weights ({count:,} parameters in fp32)", 4 * count, memories,
               f"the largest is {name} {list(largest.shape)}; check the sizes ({sizes})")


def build_model(cfg: ModelConfig, device: torch.device, *, dtype: torch.dtype | None = None,
                channels_last: bool = False) -> TimeSformer:
    """The TimeSformer of ``cfg`` on ``device``, after ``check_attention(cfg, device, dtype)``; ``dtype`` is the
    autocast dtype the model will run in (None = fp32); ``channels_last`` runs its patch convolution
    channels-last."""
    check_attention(cfg, device, dtype)
    check_model_fits(cfg, device)
    model = create_model(cfg).to(device)
    if channels_last:
        model.set_channels_last(True)
    return model


def compile_model(module: torch.nn.Module, mode: str = "none", *, fullgraph: bool = True) -> torch.nn.Module:
    """``torch.compile(module)`` in ``mode`` (``COMPILE_MODES``; compiled lazily, at the first call), or ``module`` for
    ``none``. ``fullgraph``: a graph break fails instead of splitting the step; DDP's wrapper splits the graph at its
    gradient buckets on purpose, so the Trainer passes False there."""
    check_compile_mode(mode)
    if mode == "none":
        return module
    return torch.compile(module, mode=None if mode == "default" else mode, fullgraph=fullgraph)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The loss scaler: active for fp16 autocast only (bf16 and fp32 do not underflow this way)."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)


def synthetic_batch(cfg: ModelConfig, device: torch.device, batch: int, frames: int | None = None,
                    img_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clips (batch, 3, frames, img_size, img_size) ~ N(0, 1), stored in the loaders' layout
    (``pipelines.base.CLIP_FORMAT``, as every loader delivers them), and uniform labels, on ``device``."""
    T, S = frames or cfg.num_frames, img_size or cfg.img_size
    video = empty_clips((batch, cfg.in_chans, T, S, S), device).normal_()
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
    return video, labels


class TrainStep:
    """One optimizer step, in the pieces a training loop interleaves with its own work.

    ``step(video, labels)`` runs ``forward``, ``backward`` and ``optimizer_step``. The Trainer calls the pieces
    itself: it accumulates gradients over micro-batches (``backward(loss, accum)``), all-reduces the loss between
    forward and backward, and skips DDP's gradient sync on the non-final micro-batches.

    Args:
        model: the module whose parameters the optimizer holds (clipping walks these).
        optimizer: e.g. from ``timesformer_harness.optim.build_optimizer``.
        scaler: the fp16 loss scaler (``grad_scaler``).
        device: where the step runs (autocast's device type).
        dtype: autocast dtype; None = plain fp32.
        forward_model: what the forward calls, when it is not ``model`` itself: a DDP wrapper, a compiled module.
        grad_clip: max total gradient norm (on unscaled gradients); 0 = off.
        label_smoothing: for the hard-label cross-entropy.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, dtype: torch.dtype | None, *, forward_model: torch.nn.Module | None = None,
                 grad_clip: float = 0.0, label_smoothing: float = 0.0) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.device, self.dtype = device, dtype
        self.forward_model = forward_model if forward_model is not None else model
        self.grad_clip, self.label_smoothing = grad_clip, label_smoothing

    @classmethod
    def build(cls, model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None,
              solver: SolverConfig = BENCH_SOLVER, *, compile: str = "none") -> TrainStep:
        """A step with its own optimizer (``build_optimizer(solver)``) and scaler, clipping and smoothing from
        ``solver``; the model is put in train mode."""
        optimizer, _ = build_optimizer(list(model.parameters()), solver, device)
        model.train()
        return cls(model, optimizer, grad_scaler(device, dtype), device, dtype,
                   forward_model=compile_model(model, compile), grad_clip=solver.grad_clip,
                   label_smoothing=solver.label_smoothing)

    def forward(self, video: torch.Tensor, labels: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, C), loss): hard-label cross-entropy, or soft-target cross-entropy when ``targets`` (B, C)
        (mixup/cutmix) is given. The loss is computed in fp32 whatever the autocast dtype."""
        with autocast(self.device, self.dtype):
            logits = self.forward_model(video)
            if targets is not None:
                loss = soft_target_cross_entropy(logits.float(), targets)
            else:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return logits, loss

    def backward(self, loss: torch.Tensor, accum: int = 1) -> None:
        """Accumulate the gradients of ``loss / accum`` (scaled for fp16)."""
        self.scaler.scale(loss / accum).backward()

    def optimizer_step(self) -> None:
        """Clip (if asked), step the optimizer through the scaler, and clear the gradients."""
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, video: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One whole step on one batch; returns the (detached) loss."""
        _, loss = self.forward(video, labels)
        self.backward(loss)
        self.optimizer_step()
        return loss.detach()


def infer_step(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """An inference forward (eval mode, ``inference_mode``, autocast); returns ``video -> logits``."""
    model.eval()

    def run(video: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(device, dtype):
            return model(video)

    return run


def synthetic_step(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None, *, mode: str, batch: int,
                   frames: int | None = None, img_size: int | None = None, channels_last: bool = False,
                   compile: str = "none", solver: SolverConfig = BENCH_SOLVER
                   ) -> tuple[TimeSformer, Callable[[], None]]:
    """The model of ``cfg`` and one step on a fixed random batch: what the bench, gate and benchmarks time.

    ``mode="train"``: ``TrainStep.step`` (forward, backward, optimizer step); ``"infer"``: ``infer_step``.
    Returns (the model, a no-argument function running one step).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose from {list(MODES)}")
    model = build_model(cfg, device, dtype=dtype, channels_last=channels_last)
    video, labels = synthetic_batch(cfg, device, batch, frames, img_size)
    if mode == "train":
        train = TrainStep.build(model, device, dtype, solver, compile=compile)
        return model, lambda: train.step(video, labels)
    infer = infer_step(compile_model(model, compile), device, dtype)
    return model, lambda: infer(video)
