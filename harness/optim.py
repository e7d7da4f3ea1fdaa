"""Optimizers (SGD-Nesterov, AdamW, LAMB) and the per-iteration learning-rate schedule.

Implementation choice, logged once: apex ``FusedSGD``/``FusedAdam``/``FusedLAMB`` when the model is on CUDA
(``solver.use_apex=auto``) and apex's optimizer can be built (an apex installed without its CUDA extensions
imports but raises at construction, and a package of the same name on the package index is not NVIDIA's apex:
both fall back, saying why), else torch's ``fused=True`` on CUDA, else ``foreach=True``. LAMB exists only in apex.
Weight decay applies to every parameter, as in the original recipe (its "bn" group is empty for ViT).
The learning rate is a function of the fractional epoch ``epoch + iter / iters_per_epoch`` and is set every
iteration, like the original ``get_epoch_lr`` / ``set_lr``.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any

import torch

from timesformer_harness.config import SolverConfig

logger = logging.getLogger(__name__)

_APEX = {"sgd": "FusedSGD", "adamw": "FusedAdam", "lamb": "FusedLAMB"}
# What each optimizer's per-parameter state holds once it has stepped (torch's and apex's): a state of another
# optimizer lacks some, and loading it fails at the first step (AdamW: KeyError 'step') or goes on with nonsense.
_STATE_KEYS = {"SGD": ("momentum_buffer",), "FusedSGD": ("momentum_buffer",),
               "AdamW": ("step", "exp_avg", "exp_avg_sq"), "FusedAdam": ("exp_avg", "exp_avg_sq"),
               "FusedLAMB": ("exp_avg", "exp_avg_sq")}


def _apex_optimizer(params: list[torch.nn.Parameter], cfg: SolverConfig) -> tuple[torch.optim.Optimizer | None, str]:
    """apex's fused optimizer for ``cfg.optimizer`` over ``params``, or (None, why it cannot be used here)."""
    name = _APEX[cfg.optimizer]
    try:
        cls = getattr(importlib.import_module("apex.optimizers"), name)
    except (ImportError, AttributeError) as e:  # no apex, or a package named apex that is not NVIDIA's
        return None, f"apex.optimizers.{name} is not importable ({type(e).__name__}: {e})"
    lr, wd = cfg.base_lr, cfg.weight_decay
    try:
        if cfg.optimizer == "sgd":
            opt = cls(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
        elif cfg.optimizer == "adamw":  # FusedAdam with adam_w_mode=True is AdamW
            opt = cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=wd, adam_w_mode=True)
        else:  # FusedLAMB clips to a global norm of 1.0 unless told otherwise; solver.grad_clip does the clipping
            opt = cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=wd, max_grad_norm=math.inf)
    except Exception as e:  # noqa: BLE001 - whatever apex raises, torch's optimizer takes over
        return None, (f"apex.optimizers.{name} cannot be built ({type(e).__name__}: {e}); an apex installed without "
                      f"its CUDA extensions does this: reinstall it with them, or set solver.use_apex=never")
    if not isinstance(opt, torch.optim.Optimizer):
        return None, f"apex.optimizers.{name} built a {type(opt).__name__}, not a torch optimizer"
    return opt, ""


def build_optimizer(params: list[torch.nn.Parameter], cfg: SolverConfig, device: torch.device) -> tuple[
        torch.optim.Optimizer, str]:
    """The optimizer ``cfg.optimizer`` asks for, and a name saying which implementation runs.

    Raises:
        ValueError: ``lamb`` without apex on CUDA (torch has no LAMB).
    """
    params = [p for p in params if p.requires_grad]
    cuda = device.type == "cuda"
    apex_opt, apex_why = None, "the model is not on CUDA" if not cuda else "solver.use_apex=never"
    if cuda and cfg.use_apex == "auto":
        apex_opt, apex_why = _apex_optimizer(params, cfg)
    lr, wd = cfg.base_lr, cfg.weight_decay
    if apex_opt is not None:
        opt, impl = apex_opt, f"apex.optimizers.{_APEX[cfg.optimizer]}"
    else:
        if cfg.optimizer == "lamb":
            raise ValueError(f"solver.optimizer=lamb needs apex (apex.optimizers.FusedLAMB) on a CUDA device, and "
                             f"here {apex_why}; install apex with its CUDA extensions or use solver.optimizer=adamw "
                             f"/ sgd")
        if cuda and cfg.use_apex == "auto":
            logger.info("apex not used: %s", apex_why)
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


def state_mismatch(optimizer: torch.optim.Optimizer, state: Any) -> str | None:
    """Why ``state`` (a saved ``state_dict()``) does not fit ``optimizer``: another number of parameter groups or of
    tensors in them, a parameter's state without the keys ``optimizer`` keeps (another optimizer's), or of another
    shape than the parameter. None when it fits."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    saved = state.get("state") if isinstance(state, dict) else None
    if (not isinstance(groups, list) or not isinstance(saved, dict)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        return "it is not an optimizer state (param_groups and state)"
    if len(groups) != len(optimizer.param_groups):
        return f"it has {len(groups)} parameter group(s), this optimizer {len(optimizer.param_groups)}"
    counts = [len(g["params"]) for g in groups], [len(g["params"]) for g in optimizer.param_groups]
    if counts[0] != counts[1]:
        return f"its parameter groups hold {counts[0]} tensors, this optimizer's {counts[1]}"
    needs = _STATE_KEYS.get(type(optimizer).__name__, ())
    ids = [i for g in groups for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for n, (i, param) in enumerate(zip(ids, params)):
        entry = saved.get(i, {})
        if not isinstance(entry, dict):
            return f"the state of parameter {n} is a {type(entry).__name__}, not a dict"
        if entry and (missing := [k for k in needs if k not in entry]):
            return (f"the state of parameter {n} holds {', '.join(map(str, entry)) or 'nothing'}, not "
                    f"{', '.join(missing)} ({type(optimizer).__name__}'s; written by another optimizer?)")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                return (f"the state of parameter {n} has {key} of shape {list(value.shape)}, the parameter "
                        f"{list(param.shape)}")
    return None


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: SolverConfig) -> None:
    """Set every param group's weight decay, momentum and Nesterov (SGD) and betas (AdamW, LAMB) to ``cfg``'s, where
    the group has them: after a resume loads an optimizer state, whose groups hold the values it was saved with (the
    learning rate is set every step)."""
    values = {"weight_decay": cfg.weight_decay, "momentum": cfg.momentum, "nesterov": cfg.nesterov,
              "betas": tuple(cfg.betas)}
    for group in optimizer.param_groups:
        group.update({k: v for k, v in values.items() if k in group})


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
