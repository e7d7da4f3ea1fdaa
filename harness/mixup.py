"""Mixup and cutmix for video batches, with label-smoothed soft targets, and the loss that reads them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B, C) targets: ``1 - smoothing + smoothing / C`` on the label, ``smoothing / C`` elsewhere."""
    off, on = smoothing / num_classes, 1.0 - smoothing + smoothing / num_classes
    return torch.full((labels.size(0), num_classes), off, device=labels.device).scatter_(1, labels[:, None], on)


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box (y0, y1, x0, x1) of about ``(1 - lam)`` of the frame area, centred at a uniform random point and
    clipped to the frame (so the area actually cut can be smaller)."""
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def mix_batch(video: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one chosen per batch, like timm's ``Mixup`` in batch mode) with smoothed soft targets.

    Each clip is mixed with the clip at the mirrored batch position (``video.flip(0)``), with weight
    ``lam ~ Beta(alpha, alpha)``. Cutmix pastes the same box in every frame and sets ``lam`` to the share of the
    frame that was kept.

    Args:
        video: (B, 3, T, H, W).
        labels: (B,) class indices.
        mixup_alpha, cutmix_alpha: > 0 enables each; with both, one is picked per batch with probability 1/2.

    Returns:
        (mixed video (B, 3, T, H, W), targets (B, C) whose rows sum to 1).
    """
    targets = smoothed_one_hot(labels, num_classes, smoothing)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(()).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    flipped = video.flip(0)
    if use_cutmix:
        H, W = video.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(H, W, lam)
        video = video.clone()
        video[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        video = video * lam + flipped * (1.0 - lam)
    return video, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c targets[c] * log_softmax(logits)[c]``; logits, targets: (B, C)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
