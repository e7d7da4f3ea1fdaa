"""Parameter and FLOP counts per clip.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device: no compute, no memory,
and SDPA takes its math path there, so attention FLOPs are counted (the CPU flash kernel has no FLOP formula
and would count 0). FLOPs = 2 x multiply-adds; the paper's "TFLOPs" are multiply-adds summed over 3 views.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from timesformer_harness.config import ModelConfig
from timesformer_harness.model import TimeSformer, config_of, create_model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(
    model: TimeSformer | ModelConfig,
    batch: int = 1,
    frames: int | None = None,
    img_size: int | None = None,
    mode: str = "infer",
) -> int:
    """FLOPs of one forward (``infer``) or forward+backward (``train``) on a (batch, 3, frames, img, img) input.

    ``frames``/``img_size`` default to the model's construction values; other values exercise the run-time
    resizing of the time/position embeddings, as a real input would.
    """
    if mode not in ("infer", "train"):
        raise ValueError(f"mode={mode!r}; choose 'infer' or 'train'")
    cfg = config_of(model) if isinstance(model, TimeSformer) else model
    cfg = replace(cfg, grad_checkpointing=False, attn_backend="math")  # count model FLOPs, not recompute
    T = frames or cfg.num_frames
    S = img_size or cfg.img_size
    with torch.device("meta"):
        meta_model = create_model(cfg)
        x = torch.empty(batch, cfg.in_chans, T, S, S)
    meta_model.train(mode == "train")
    counter = FlopCounterMode(display=False)
    with counter:
        if mode == "train":
            meta_model(x).sum().backward()
        else:
            with torch.no_grad():
                meta_model(x)
    return int(counter.get_total_flops())
