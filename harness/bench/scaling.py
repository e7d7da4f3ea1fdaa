"""The scaling suite: the model suite's step over a grid of frames and image sizes (``--frames`` x ``--img``, or the
paper's grid on a GPU), with fewer steps per case; a case that runs out of memory is recorded as ``oom`` (its FLOPs
still counted) and the sweep goes on."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from timesformer_harness.bench import model
from timesformer_harness.bench.case import ModelCase, single_mode
from timesformer_harness.config import RootConfig

run = model.run  # the same measurement at other input sizes


@dataclass(kw_only=True)
class Case(ModelCase):
    suite: ClassVar[str] = "scaling"


def paper_grid(T: int, S: int, patch: int) -> list[tuple[int, int]]:
    """The paper's cost/memory grid (its Fig. 3, scaled to the preset): frames T, 2T, 4T, 8T, 12T at S pixels
    (8 to 96 frames at 224 for the base preset), and S, 1.5S, 2S pixels at T frames (224, 336, 448)."""
    sizes = [S, round(1.5 * S / patch) * patch, 2 * S]
    return [(t, S) for t in (T, 2 * T, 4 * T, 8 * T, 12 * T)] + [(T, s) for s in sizes[1:]]


def cases(cfg: RootConfig, base: dict[str, Any], attns: list[str], modes: list[str],
          device: torch.device) -> list[Case]:
    """In one mode (``single_mode``: train, or infer when only it is asked for), ``--frames`` x ``--img`` when given;
    otherwise the paper's grid on a GPU (``paper_grid``) and T, 2T frames at the preset's size on CPU (``make bench``
    stays within minutes on 2 cores). A case that runs out of memory is recorded as ``oom`` (joint attention's
    frontier). The point the model suite measures (eager, at ``bench.batch_size``) is left out when that suite runs
    too."""
    b = cfg.bench
    T, S = cfg.model.num_frames, cfg.model.img_size
    if b.frames or b.img_sizes:
        grid = [(t, s) for s in (list(b.img_sizes) or [S]) for t in (list(b.frames) or [T])]
    elif device.type == "cuda":
        grid = paper_grid(T, S, cfg.model.patch_size)
    else:
        grid = [(T, S), (2 * T, S)]
    mode = single_mode("scaling", modes)
    return [Case.of(base, model=replace(cfg.model, attention_type=attn), mode=mode, frames=t, img_size=s,
                    warmup=b.sweep_warmup, steps=b.sweep_steps)
            for attn in attns for t, s in grid
            if not ((t, s) == (T, S) and "model" in b.suites and "none" in b.compile
                    and b.batch_size in model.suite_batches(cfg, device))]
