"""Nearest-neighbour resizing of pos_embed / time_embed: the model's run-time resize and checkpoint loading share one
helper, and both give bit-identical results to an explicit index-based reference written here."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from timesformer_harness.checkpoint import load_weights, save_pyth
from timesformer_harness.embeddings import resize_pos_embed, resize_time_embed
from timesformer_harness.model import TimeSformer

TINY = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=4, num_classes=7)


def nearest(n_in: int, n_out: int) -> torch.Tensor:
    """Source index of each output position under nearest interpolation: floor(i * n_in / n_out)."""
    return torch.arange(n_out) * n_in // n_out


def ref_pos(pos: torch.Tensor, Hp: int, Wp: int) -> torch.Tensor:
    """(1, 1+P*P, D) -> (1, 1+Hp*Wp, D): the CLS slot kept, the P x P patch grid resampled row- and column-wise."""
    P = int((pos.size(1) - 1) ** 0.5)
    grid = pos[0, 1:].reshape(P, P, -1)
    grid = grid[nearest(P, Hp)][:, nearest(P, Wp)]
    return torch.cat([pos[:, :1], grid.reshape(1, Hp * Wp, -1)], dim=1)


def ref_time(te: torch.Tensor, T: int) -> torch.Tensor:
    return te[:, nearest(te.size(1), T)]


def model_with(attention_type: str) -> TimeSformer:
    torch.manual_seed(0)
    model = TimeSformer(**TINY, attention_type=attention_type, drop_path_rate=0.0).eval()
    with torch.no_grad():  # a time_embed that is not zero, so its resize shows in the logits
        for name, p in model.named_parameters():
            if name == "time_embed" or "temporal_fc" in name:
                p.normal_(std=0.5)
    return model


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time", "space_only"])
@pytest.mark.parametrize("T,H,W", [(6, 48, 48), (3, 24, 24), (8, 32, 48), (2, 40, 16)])
def test_forward_resize_is_bit_identical_to_the_reference(attention_type: str, T: int, H: int, W: int) -> None:
    """The model at another frame count / image size equals, bit for bit, a copy whose embeddings were resized
    beforehand by the reference (so that copy resizes nothing at run time)."""
    model = model_with(attention_type)
    Hp, Wp = H // 8, W // 8
    ref = copy.deepcopy(model)
    ref.pos_embed = nn.Parameter(ref_pos(model.pos_embed.detach(), Hp, Wp))
    if attention_type != "space_only":
        ref.time_embed = nn.Parameter(ref_time(model.time_embed.detach(), T))
    x = torch.randn(2, 3, T, H, W)
    with torch.no_grad():
        ours, expected = model(x), ref(x)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("P,Hp,Wp", [(4, 6, 6), (4, 3, 3), (4, 4, 6), (14, 28, 28), (14, 7, 10), (3, 5, 2)])
def test_pos_resize_2d_matches_the_reference(P: int, Hp: int, Wp: int) -> None:
    pos = torch.randn(1, 1 + P * P, 5)
    assert torch.equal(resize_pos_embed(pos, Hp * Wp, grid=(Hp, Wp)), ref_pos(pos, Hp, Wp))
    if Hp == Wp:  # the loader's default grid is the square one
        assert torch.equal(resize_pos_embed(pos, Hp * Wp), ref_pos(pos, Hp, Wp))


@pytest.mark.parametrize("T0,T", [(8, 16), (8, 4), (4, 6), (8, 96), (96, 8), (3, 7)])
def test_time_resize_matches_the_reference(T0: int, T: int) -> None:
    te = torch.randn(1, T0, 5)
    assert torch.equal(resize_time_embed(te, T), ref_time(te, T))


def test_pos_resize_modes() -> None:
    """``1d`` resamples the flattened raster sequence like the original loader (new token j takes old token
    j * N0 // N, scrambling the rows); ``2d`` resamples the grid."""
    pos = torch.arange(5, dtype=torch.float32).reshape(1, 5, 1)  # CLS + 2x2 grid
    assert resize_pos_embed(pos, 16, mode="1d")[0, :, 0].tolist() == [0] + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert resize_pos_embed(pos, 16, mode="2d")[0, 1:5, 0].tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="pos_resize='3d'"):
        resize_pos_embed(pos, 16, mode="3d")


def test_checkpoint_loading_resizes_with_the_same_helper(tmp_path) -> None:
    """Weights saved at 4 frames / 32 px load into a 8-frame / 64 px model as the reference resize says."""
    small = model_with("divided_space_time")
    path = tmp_path / "small.pyth"
    save_pyth(path, small)
    big = TimeSformer(**{**TINY, "num_frames": 8, "img_size": 64}, drop_path_rate=0.0)
    load_weights(big, path)
    assert torch.equal(big.pos_embed, ref_pos(small.pos_embed.detach(), 8, 8))
    assert torch.equal(big.time_embed, ref_time(small.time_embed.detach(), 8))
