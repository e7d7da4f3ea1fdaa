"""timesformer_harness.mixup: mixup and cutmix on real tensors; the soft targets agree with what was done to the
clips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from timesformer_harness.mixup import cutmix_box, mix_batch, smoothed_one_hot, soft_target_cross_entropy

B, T, H, W, C = 4, 3, 16, 20, 5


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(B, 3, T, H, W, generator=g) + 1.0  # > 0 everywhere, so a pasted pixel always differs
    labels = torch.tensor([0, 1, 2, 3])  # every clip's mirrored partner has another label
    return video, labels


def _lam_from_targets(targets: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per clip, the weight of its own label: targets[i, y_i] = lam * on + (1 - lam) * off."""
    off, on = smoothing / C, 1 - smoothing + smoothing / C
    own = targets[torch.arange(B), labels]
    return (own - off) / (on - off)


def test_smoothed_one_hot_rows_sum_to_one():
    t = smoothed_one_hot(torch.tensor([1, 4]), C, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert t[0, 1] == pytest.approx(0.9 + 0.1 / C) and t[0, 0] == pytest.approx(0.1 / C)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_applies_one_lambda_to_clips_and_targets(smoothing):
    video, labels = _batch()
    torch.manual_seed(3)
    mixed, targets = mix_batch(video, labels, C, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=smoothing)
    assert torch.allclose(targets.sum(1), torch.ones(B))
    lam = _lam_from_targets(targets, labels, smoothing)
    assert torch.allclose(lam, lam[0].expand(B), atol=1e-6), "one lambda per batch"
    lam = lam[0].item()
    assert 0.0 < lam < 1.0
    assert torch.allclose(mixed, lam * video + (1 - lam) * video.flip(0), atol=1e-6)
    # the partner's label gets the rest of the weight
    partner = labels.flip(0)
    off, on = smoothing / C, 1 - smoothing + smoothing / C
    assert torch.allclose(targets[torch.arange(B), partner], torch.full((B,), (1 - lam) * on + lam * off))


def test_cutmix_pastes_one_box_in_every_frame_and_lambda_is_the_kept_area():
    video, labels = _batch()
    torch.manual_seed(5)
    mixed, targets = mix_batch(video, labels, C, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.0)
    assert torch.allclose(targets.sum(1), torch.ones(B))
    lam = _lam_from_targets(targets, labels, 0.0)[0].item()
    changed = (mixed != video)  # (B, 3, T, H, W)
    box = changed[0, 0, 0]
    assert all(torch.equal(changed[b, c, t], box) for b in range(B) for c in range(3) for t in range(T))
    ys, xs = box.nonzero(as_tuple=True)
    assert box.sum() > 0, "this seed cuts a non-empty box"
    y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
    assert box.sum().item() == (y1 - y0) * (x1 - x0), "the changed pixels form one rectangle"
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (H * W))
    assert torch.equal(mixed[..., y0:y1, x0:x1], video.flip(0)[..., y0:y1, x0:x1])


def test_cutmix_box_is_clipped_to_the_frame_and_at_most_the_asked_area():
    torch.manual_seed(0)
    for lam in (0.1, 0.5, 0.9):
        for _ in range(50):
            y0, y1, x0, x1 = cutmix_box(H, W, lam)
            assert 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W
            assert (y1 - y0) * (x1 - x0) <= (1 - lam) * H * W + 1e-9


def test_with_both_alphas_each_batch_picks_one():
    video, labels = _batch()
    torch.manual_seed(0)
    kinds = set()
    for _ in range(20):
        mixed, _ = mix_batch(video, labels, C, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.0)
        kinds.add("cutmix" if (mixed == video).any() else "mixup")  # mixup changes every pixel
    assert kinds == {"mixup", "cutmix"}


def test_soft_target_cross_entropy_matches_torch_on_probabilities():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, C, generator=g)
    targets = torch.softmax(torch.randn(B, C, generator=g), dim=-1)
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(F.cross_entropy(logits, targets).item())
