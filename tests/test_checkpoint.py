"""Checkpoint formats, conversions and strict errors, on real files (safe loading: test_checkpoint_safety.py)."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from timesformer_harness.checkpoint import load_file, load_weights, save_pyth
from timesformer_harness.model import TimeSformer

TINY = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=4, num_classes=7)
REPO = Path(__file__).resolve().parent.parent


def trained_like(attention_type: str = "divided_space_time", seed: int = 0, **kw) -> TimeSformer:
    """A tiny model with every parameter random (the temporal path included)."""
    torch.manual_seed(seed)
    model = TimeSformer(**{**TINY, **kw}, attention_type=attention_type, drop_path_rate=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def logits(model: TimeSformer, T: int = 4, S: int = 32) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, T, S, S))


def test_pyth_round_trip_identical_logits(tmp_path: Path) -> None:
    src = trained_like()
    path = tmp_path / "checkpoint_epoch_00001.pyth"
    save_pyth(path, src, optimizer_state={"state": {}, "param_groups": []}, epoch=0,
              cfg_yaml="TRAIN:\n  ENABLE: True\n")
    raw = load_file(path)
    assert set(raw) == {"epoch", "model_state", "optimizer_state", "cfg"}
    assert all(k.startswith("model.") for k in raw["model_state"])
    dst = TimeSformer(**TINY, drop_path_rate=0.0)
    report = load_weights(dst, path)
    assert report.format == "pyth" and not report.missing and not report.skipped
    assert torch.equal(logits(src), logits(dst))
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


@pytest.mark.parametrize("wrap", ["module_model", "state_dict", "plain", "safetensors"])
def test_other_containers_and_prefixes(tmp_path: Path, wrap: str) -> None:
    src = trained_like()
    sd = src.state_dict()
    if wrap == "module_model":  # a DDP-wrapped original model saved naively
        path = tmp_path / "ddp.pyth"
        torch.save({"model_state": OrderedDict((f"module.model.{k}", v) for k, v in sd.items()), "epoch": 1}, path)
    elif wrap == "state_dict":
        path = tmp_path / "sd.pth"
        torch.save({"state_dict": OrderedDict((f"module.{k}", v) for k, v in sd.items())}, path)
    elif wrap == "plain":
        path = tmp_path / "plain.pth"
        torch.save(sd, path)
    else:
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    dst = TimeSformer(**TINY, drop_path_rate=0.0)
    load_weights(dst, path)
    assert torch.equal(logits(src), logits(dst))


def test_strict_mismatch_names_every_key(tmp_path: Path) -> None:
    path = tmp_path / "joint.pyth"
    save_pyth(path, trained_like("joint_space_time"))
    with pytest.raises(KeyError) as err:
        load_weights(TimeSformer(**TINY), path)
    msg = str(err.value)
    assert "missing key blocks.0.temporal_fc.weight [32, 32]" in msg
    assert "missing key blocks.1.temporal_attn.qkv.weight [96, 32]" in msg
    assert msg.count("missing key") == 2 * 8
    deeper = tmp_path / "deep.pyth"
    save_pyth(deeper, trained_like(depth=3, embed_dim=32))
    with pytest.raises(KeyError, match=r"unexpected key blocks\.2\.attn\.qkv\.weight \[96, 32\]"):
        load_weights(TimeSformer(**TINY), deeper)
    wide = tmp_path / "wide.pyth"
    save_pyth(wide, trained_like(mlp_ratio=2.0))
    with pytest.raises(KeyError,
                       match=r"shape mismatch blocks\.0\.mlp\.fc1\.weight: file \[64, 32\], model \[128, 32\]"):
        load_weights(TimeSformer(**TINY), wide)
    report = load_weights(TimeSformer(**TINY), wide, strict=False)
    assert "blocks.0.mlp.fc1.weight" in report.skipped and "blocks.0.mlp.fc1.weight" in report.missing


def test_resizes_time_and_pos_embed_and_drops_head(tmp_path: Path) -> None:
    src = trained_like()
    path = tmp_path / "ck.pyth"
    save_pyth(path, src)
    dst = TimeSformer(**{**TINY, "num_frames": 8, "img_size": 64, "num_classes": 3})
    report = load_weights(dst, path)
    assert report.resized["time_embed"] == ((1, 4, 32), (1, 8, 32))
    assert report.resized["pos_embed"] == ((1, 17, 32), (1, 65, 32))
    assert set(report.skipped) == {"head.weight", "head.bias"}
    assert torch.equal(dst.time_embed[0, 1::2], src.time_embed[0])  # nearest: frame t <- t // 2
    # 2-D nearest on the 4x4 grid -> 8x8: patch (r, c) takes (r // 2, c // 2), as forward does at run time.
    new = dst.pos_embed[0, 1:].reshape(8, 8, -1)
    old = src.pos_embed[0, 1:].reshape(4, 4, -1)
    assert torch.equal(new[5, 3], old[2, 1]) and torch.equal(dst.pos_embed[0, 0], src.pos_embed[0, 0])


def test_imagenet_vit_conversion(tmp_path: Path) -> None:
    vit = trained_like("space_only")  # the timm ViT key set
    sd = {k: v for k, v in vit.state_dict().items()}
    sd["pos_embed"] = torch.arange(17, dtype=torch.float32).reshape(1, 17, 1).expand(1, 17, 32).clone()
    path = tmp_path / "vit_base.pth"
    torch.save({"model": sd}, path)  # timm/DeiT-style wrapper
    model = TimeSformer(**{**TINY, "img_size": 64})
    report = load_weights(model, path)
    assert report.format == "vit2d"
    for i in range(2):
        blk = model.blocks[i]
        assert torch.equal(blk.temporal_attn.qkv.weight, blk.attn.qkv.weight)
        assert torch.equal(blk.temporal_attn.proj.bias, blk.attn.proj.bias)
        assert torch.equal(blk.temporal_norm1.weight, blk.norm1.weight)
        assert blk.temporal_fc.weight.abs().sum() == 0 and blk.temporal_fc.bias.abs().sum() == 0
    assert model.time_embed.abs().sum() == 0
    # The original's quirk: 1-D nearest over the flattened sequence, 16 -> 64 tokens: token j <- j // 4.
    pos = model.pos_embed[0, 1:, 0]
    assert pos[:8].tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert torch.equal(pos, (torch.arange(64) // 4 + 1).float())
    # The better option: 2-D resize keeps the grid (row 0 of the 8x8 grid reads old row 0 twice per column).
    model2d = TimeSformer(**{**TINY, "img_size": 64})
    load_weights(model2d, path, pos_resize="2d")
    assert model2d.pos_embed[0, 1:9, 0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]


def test_inspect_and_convert_cli(tmp_path: Path) -> None:
    path = tmp_path / "ck.pyth"
    save_pyth(path, trained_like(), epoch=4)
    run = lambda *a: subprocess.run([sys.executable, "-m", "timesformer_harness.checkpoint", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    out = run("inspect", str(path))
    assert out.returncode == 0, out.stderr
    assert "format:      pyth" in out.stdout and "epoch:       4" in out.stdout
    assert "attention_type=divided_space_time frames=4 img_size=32 patch=8 classes=7 embed_dim=32 depth=2" in out.stdout
    assert "blocks.1.temporal_fc.weight" in out.stdout and f"parameters:  {sum(p.numel() for p in trained_like().parameters()):,}" in out.stdout
    hf = tmp_path / "hf.safetensors"
    kept = run("convert", str(path), str(hf), "--hf")  # a safetensors file cannot keep the epoch: asked first
    assert kept.returncode == 2 and "holds epoch beside its weights" in kept.stderr and not hf.exists()
    assert run("convert", str(path), str(hf), "--hf", "--weights-only").returncode == 0
    assert "format:      hf" in run("inspect", str(hf), "--no-keys").stdout
    bad = run("inspect", str(tmp_path / "missing.pyth"))
    assert bad.returncode == 2 and "missing.pyth does not exist" in bad.stderr


# ----------------------------------------------------------------------------------------------------------
# Hugging Face transformers interop: an independent implementation of the same model.
@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_huggingface_weights_load_and_export(tmp_path: Path, attention_type: str) -> None:
    pytest.importorskip("transformers", reason="the test extra installs transformers")
    from hf_interop import round_trip

    report = round_trip(attention_type, tmp_path)
    assert report["format"] == "hf" and not report["missing"], report
    assert report["hf_to_ours"] < 1e-5 and report["ours_to_hf"] < 1e-5, report
