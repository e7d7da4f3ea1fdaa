"""The scaling suite: the model suite's step over a sweep of frames x image sizes (``--frames``, ``--img``), with
fewer steps per case; a case that runs out of memory is recorded as ``oom`` and the sweep goes on."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from timesformer_harness.bench import model
from timesformer_harness.bench.case import ModelCase
from timesformer_harness.config import RootConfig

run = model.run  # the same measurement at other input sizes


@dataclass(kw_only=True)
class Case(ModelCase):
    suite: ClassVar[str] = "scaling"


def cases(cfg: RootConfig, base: dict[str, Any], attns: list[str], modes: list[str],
          device: torch.device) -> list[Case]:
    """Default sweep: T and 2T frames on CPU (``make bench`` stays within minutes on 2 cores), T, 2T, 4T on a GPU;
    the preset's image size. The point the model suite measures is left out when that suite runs too."""
    b = cfg.bench
    T, S = cfg.model.num_frames, cfg.model.img_size
    frames = list(b.frames) or ([T, 2 * T, 4 * T] if device.type == "cuda" else [T, 2 * T])
    sizes = list(b.img_sizes) or [S]
    mode = "train" if "train" in modes else "infer"
    return [Case.of(base, model=replace(cfg.model, attention_type=attn), mode=mode, frames=t, img_size=s,
                    warmup=b.sweep_warmup, steps=b.sweep_steps)
            for attn in attns for s in sizes for t in frames
            if not ("model" in b.suites and (t, s) == (T, S))]
