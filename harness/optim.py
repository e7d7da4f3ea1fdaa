"""Optimizers (SGD-Nesterov, AdamW, LAMB) and the per-iteration learning-rate schedule.

Implementation choice, logged once: apex ``FusedSGD``/``FusedAdam``/``FusedLAMB`` when apex imports and the model
is on CUDA (``solver.use_apex=auto``), else torch's ``fused=True`` on CUDA, else ``foreach=True``. LAMB exists
only in apex. Weight decay applies to every parameter, as in the original recipe (its "bn" group is empty for ViT).
The learning rate is a function of the fractional epoch ``epoch + iter / iters_per_epoch`` and is set every
iteration, like the original ``get_epoch_lr`` / ``set_lr``.
"""

from __future__ import annotations

import importlib
import logging
import math

import torch

from harness.config import SolverConfig

logger = logging.getLogger(__name__)

_APEX = {"sgd": "FusedSGD", "adamw": "FusedAdam", "lamb": "FusedLAMB"}


def _apex_optimizer(name: str) -> type | None:
    try:
        module = importlib.import_module("apex.optimizers")
    except ImportError:
        return None
    return getattr(module, _APEX[name], None)


def build_optimizer(params: list[torch.nn.Parameter], cfg: SolverConfig, device: torch.device) -> tuple[
        torch.optim.Optimizer, str]:
    """The optimizer ``cfg.optimizer`` asks for, and a name saying which implementation runs.

    Raises:
        ValueError: ``lamb`` without apex on CUDA (torch has no LAMB).
    """
    params = [p for p in params if p.requires_grad]
    cuda = device.type == "cuda"
    apex_cls = _apex_optimizer(cfg.optimizer) if cuda and cfg.use_apex == "auto" else None
    lr, wd = cfg.base_lr, cfg.weight_decay
    if apex_cls is not None:
        if cfg.optimizer == "sgd":
            opt = apex_cls(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
        elif cfg.optimizer == "adamw":  # FusedAdam with adam_w_mode=True is AdamW
            opt = apex_cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=wd, adam_w_mode=True)
        else:
            opt = apex_cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=wd)
        impl = f"apex.optimizers.{_APEX[cfg.optimizer]}"
    else:
        if cfg.optimizer == "lamb":
            raise ValueError("solver.optimizer=lamb needs apex (apex.optimizers.FusedLAMB) on a CUDA device; "
                             "install apex or use solver.optimizer=adamw / sgd")
        mode = {"fused": True} if cuda else {"foreach": True}
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, dampening=0.0,
                                  weight_decay=wd, **mode)
        else:
            opt = torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=wd, **mode)
        impl = f"torch.optim.{type(opt).__name__}({next(iter(mode))}=True)"
    for group in opt.param_groups:
        group.setdefault("initial_lr", lr)
    logger.info("optimizer: %s (lr %g, weight decay %g)", impl, lr, wd)
    return opt, impl


def lr_at(cfg: SolverConfig, epoch: float) -> float:
    """Learning rate at fractional epoch ``epoch`` (``cur_epoch + cur_iter / iters_per_epoch``).

    ``steps_with_relative_lrs``: ``lrs[i] * base_lr`` for epochs in ``[steps[i], steps[i+1])``.
    ``cosine``: from base_lr at 0 to ``cosine_end_lr`` at ``max_epoch``. ``constant``: base_lr.
    A linear warm-up from ``warmup_start_lr`` over ``warmup_epochs`` joins the policy's value at its end.
    """
    def policy(e: float) -> float:
        if cfg.lr_policy == "steps_with_relative_lrs":
            i = max(j for j, start in enumerate(cfg.steps) if start <= e)
            return cfg.lrs[i] * cfg.base_lr
        if cfg.lr_policy == "cosine":
            t = min(e / cfg.max_epoch, 1.0)
            return cfg.cosine_end_lr + (cfg.base_lr - cfg.cosine_end_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        return cfg.base_lr

    if epoch < cfg.warmup_epochs:
        end = policy(cfg.warmup_epochs)
        return cfg.warmup_start_lr + (end - cfg.warmup_start_lr) * epoch / cfg.warmup_epochs
    return policy(epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
