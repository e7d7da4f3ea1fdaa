"""Checkpoint formats, conversions and strict errors, on real files (safe loading: test_checkpoint_safety.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from timesformer_harness.checkpoint import (MAX_CFG_CHARS, MISMATCHES_SHOWN, CheckpointError, WeightsMismatchError,
                                           convert, inspect, load_file, load_weights, save_pyth)
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


@pytest.mark.parametrize("cfg", ["TRAIN:\n  DATASET: ssv2\n  ENABLE: True\n", {"TRAIN": {"DATASET": "ssv2"}}],
                         ids=["yaml", "cfgnode-dict"])
def test_an_original_ssv2_checkpoint_into_an_rgb_model_warns_to_read_bgr(tmp_path: Path, cfg: object,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The original fed SSv2 frames as BGR: its config says so (TRAIN.DATASET, as a dumped YAML or a yacs CfgNode),
    and loading such weights into a model that reads RGB names the setting; a model set to bgr, or Kinetics
    weights, load without it."""
    path = tmp_path / "ssv2.pyth"
    torch.save({"epoch": 14, "model_state": {f"model.{k}": v for k, v in trained_like().state_dict().items()},
                "cfg": cfg}, path)
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.checkpoint"):
        load_weights(TimeSformer(**TINY, drop_path_rate=0.0), path)
    assert "trained by the original code on SSv2" in caplog.text and "set model.input_channels=bgr" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.checkpoint"):
        load_weights(TimeSformer(**TINY, drop_path_rate=0.0, input_channels="bgr"), path)
        kinetics = tmp_path / "k400.pyth"
        save_pyth(kinetics, trained_like(), cfg_yaml="TRAIN:\n  DATASET: kinetics\n")
        load_weights(TimeSformer(**TINY, drop_path_rate=0.0), kinetics)
        huge = tmp_path / "huge_cfg.pyth"  # a config over MAX_CFG_CHARS is not parsed
        save_pyth(huge, trained_like(), cfg_yaml="TRAIN:\n  DATASET: ssv2\n" + "#" * MAX_CFG_CHARS)
        load_weights(TimeSformer(**TINY, drop_path_rate=0.0), huge)
    assert "input_channels" not in caplog.text


@pytest.mark.parametrize("wrap", ["module_model", "state_dict", "plain", "safetensors", "compiled", "ddp_compiled",
                                  "averaged"])
def test_other_containers_and_prefixes(tmp_path: Path, wrap: str) -> None:
    src = trained_like()
    sd = src.state_dict()
    if wrap == "compiled":  # a torch.compile'd model's state dict: _orig_mod. keys
        path = tmp_path / "compiled.pt"
        torch.save(torch.compile(src).state_dict(), path)
    elif wrap == "ddp_compiled":  # DDP around a compiled model, saved naively
        path = tmp_path / "ddp_compiled.pt"
        torch.save(OrderedDict((f"module._orig_mod.{k}", v) for k, v in sd.items()), path)
    elif wrap == "averaged":  # torch.optim.swa_utils.AveragedModel: module. keys and n_averaged
        path = tmp_path / "swa.pt"
        torch.save(torch.optim.swa_utils.AveragedModel(src).state_dict(), path)
    elif wrap == "module_model":  # a DDP-wrapped original model saved naively
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


def test_loads_into_a_compiled_or_ddp_wrapped_model(tmp_path: Path) -> None:
    """A wrapper's state dict prefixes every key (``_orig_mod.``, ``module.``): the weights go into the module inside
    it, whatever the wrapping, and the wrapper computes with them."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    src = trained_like()
    path = tmp_path / "ck.pyth"
    save_pyth(path, src)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for wrap in (torch.compile, DDP, lambda m: torch.compile(DDP(m))):
            dst = TimeSformer(**TINY, drop_path_rate=0.0)
            report = load_weights(wrap(dst), path)
            assert len(report.loaded) == len(src.state_dict()) and torch.equal(logits(src), logits(dst))
    finally:
        torch.distributed.destroy_process_group()


def test_strict_mismatch_names_the_keys_and_the_architecture(tmp_path: Path) -> None:
    """The first keys that differ, a count of the rest (a model of another size had listed all of its 200 keys), and
    the architecture keys in which the file's model (inferred from its tensors) differs from this one."""
    path = tmp_path / "joint.pyth"
    save_pyth(path, trained_like("joint_space_time"))
    with pytest.raises(KeyError) as err:
        load_weights(TimeSformer(**TINY), path)
    msg = str(err.value)
    assert "missing key blocks.0.temporal_fc.weight [32, 32]" in msg
    assert msg.count("missing key") == MISMATCHES_SHOWN - 1
    assert f"... and {2 * 8 - MISMATCHES_SHOWN + 1} more (`python -m timesformer_harness.checkpoint inspect {path}` " \
           "lists the file's keys)" in msg
    assert "The file's model has attention_type=joint_space_time; this one has attention_type=divided_space_time." \
           in msg
    space = tmp_path / "space.pyth"  # no time_embed: its frame count is unknown, not the inference's default 8
    save_pyth(space, trained_like("space_only"))
    with pytest.raises(KeyError) as err:
        load_weights(TimeSformer(**TINY), space)
    assert "The file's model has attention_type=space_only; this one has attention_type=divided_space_time." \
           in str(err.value)
    big = tmp_path / "big.pyth"
    save_pyth(big, TimeSformer(**{**TINY, "embed_dim": 64, "depth": 3, "patch_size": 16}))
    with pytest.raises(KeyError) as err:
        load_weights(TimeSformer(**TINY), big)
    assert len(str(err.value).splitlines()) == 1 + MISMATCHES_SHOWN + 2
    assert "The file's model has embed_dim=64, depth=3, patch_size=16; this one has embed_dim=32, depth=2, " \
           "patch_size=8." in str(err.value)
    deeper = tmp_path / "deep.pyth"
    save_pyth(deeper, trained_like(depth=3, embed_dim=32))
    with pytest.raises(KeyError, match=r"unexpected key blocks\.2\.attn\.qkv\.weight \[96, 32\]"):
        load_weights(TimeSformer(**TINY), deeper)
    wide = tmp_path / "wide.pyth"
    save_pyth(wide, trained_like(mlp_ratio=2.0))
    with pytest.raises(KeyError,
                       match=r"shape mismatch blocks\.0\.mlp\.fc1\.weight: file \[64, 32\], model \[128, 32\]"):
        load_weights(TimeSformer(**TINY), wide)
    with pytest.raises(KeyError) as err:
        load_weights(TimeSformer(**TINY), wide)
    assert str(err.value).count("blocks.0.mlp.fc1.weight") == 1  # refused once, not again as a missing key
    report = load_weights(TimeSformer(**TINY), wide, strict=False)
    assert "blocks.0.mlp.fc1.weight" in report.skipped and "blocks.0.mlp.fc1.weight" in report.missing
    # weights that are not finite: no config fixes them, so the advice is another file
    model = trained_like()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    nan = tmp_path / "nan.pyth"
    save_pyth(nan, model)
    with pytest.raises(KeyError) as err:
        load_weights(TimeSformer(**TINY), nan)
    assert str(err.value) == (f"{nan} (pyth) does not match the model:\n  bad values blocks.0.attn.qkv.weight: holds 1 "
                              "NaN and 0 infinite values\nWeights that are not finite real numbers are no config's to "
                              "fix: load a checkpoint saved before they went bad, or, from Python, pass strict=False to "
                              "keep the model's own values for them.")
    # keys of which none is the model's (a prefix the loader does not know): no config fixes that either
    prefixed = tmp_path / "prefixed.pth"
    torch.save({f"backbone.{k}": v for k, v in trained_like().state_dict().items()}, prefixed)
    with pytest.raises(KeyError) as err:
        load_weights(TimeSformer(**TINY), prefixed)
    assert str(err.value).endswith(
        "None of the file's keys is one of the model's (the file's first: backbone.cls_token; the model's: "
        "cls_token): they are another model's, or carry a prefix the loader does not strip (it strips module., "
        f"model. and _orig_mod.); `python -m timesformer_harness.checkpoint inspect {prefixed}` lists them.")
    assert "Set the model's config" not in str(err.value)
    # another embedding width: the head is one more mismatch (not "a new class count"), and the fix is the config's
    broad = tmp_path / "broad.pyth"
    save_pyth(broad, trained_like(embed_dim=64))
    with pytest.raises(KeyError) as err:
        load_weights(TimeSformer(**TINY), broad)
    msg = str(err.value)
    assert "The file's model has embed_dim=64; this one has embed_dim=32." in msg
    skipped = load_weights(TimeSformer(**TINY), broad, strict=False).skipped  # every key, the head's among them
    assert skipped["head.weight"] == f"shape mismatch head.weight: file [{TINY['num_classes']}, 64], model " \
                                     f"[{TINY['num_classes']}, 32]"
    assert msg.endswith(f"Set the model's config to the file's (`python -m timesformer_harness.checkpoint inspect "
                        f"{broad}` infers it), or, from Python, pass strict=False to load the matching keys only.")


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


def test_the_report_names_how_pos_embed_was_resized(tmp_path: Path) -> None:
    """ImageNet ViT weights into a larger divided model take the original's 1-D quirk, which scrambles the patch grid:
    the report (the line training and evaluation log) says which resize ran, not only the shapes."""
    path = tmp_path / "vit_base.pth"
    torch.save({"model": trained_like("space_only").state_dict()}, path)
    quirk = str(load_weights(TimeSformer(**{**TINY, "img_size": 64}), path))
    assert "resized pos_embed: [1, 17, 32] -> [1, 65, 32] (1-D nearest over the flattened sequence" in quirk
    grid = str(load_weights(TimeSformer(**{**TINY, "img_size": 64}), path, pos_resize="2d"))
    assert "resized pos_embed: [1, 17, 32] -> [1, 65, 32] (2-D nearest over the patch grid)" in grid
    pyth = tmp_path / "ck.pyth"
    save_pyth(pyth, trained_like())
    report = str(load_weights(TimeSformer(**{**TINY, "img_size": 64, "num_frames": 8}), pyth))
    assert "(2-D nearest over the patch grid)" in report
    assert "  resized time_embed: [1, 4, 32] -> [1, 8, 32]" in report.splitlines()  # no resize mode: time only


def test_training_chooses_how_pretrained_pos_embed_is_resized(tmp_path: Path, caplog) -> None:
    """model.pretrained_pos_resize: ImageNet ViT weights into a divided model at a larger image size take the
    original's 1-D resize unless the config asks for the patch grid (2d), which the docs advise for new runs."""
    from timesformer_harness.config import load_config
    from timesformer_harness.distributed import DistInfo
    from timesformer_harness.train import Trainer

    path = tmp_path / "vit_base.pth"
    torch.save({"model": trained_like("space_only").state_dict()}, path)
    shape = ["model.img_size=64", "model.patch_size=8", "model.num_frames=4", "model.embed_dim=32", "model.depth=2",
             "model.num_heads=4", "model.num_classes=7", "data.loader=synthetic", "data.synthetic_classes=7",
             "data.num_frames=4",
             "data.train_crop_size=64", "output.tensorboard=false", f"model.pretrained={path}"]
    for choice in ("", "2d", "1d"):
        cfg = load_config(REPO / "configs/model/tiny.yaml",
                          [*shape, f"model.pretrained_pos_resize={choice}", f"output.dir={tmp_path / (choice or 'x')}"])
        with caplog.at_level(logging.INFO):
            trainer = Trainer(cfg, DistInfo())
        trainer.metrics.close()
        trainer.lock.release()
        want = TimeSformer(**{**TINY, "img_size": 64})
        load_weights(want, path, pos_resize=choice or None)
        assert torch.equal(trainer.model.pos_embed.detach().cpu(), want.pos_embed.detach())
        mode = "2-D nearest over the patch grid" if choice == "2d" else "1-D nearest over the flattened sequence"
        assert f"resized pos_embed: [1, 17, 32] -> [1, 65, 32] ({mode}" in caplog.text, caplog.text[-2000:]
        caplog.clear()
    with pytest.raises(ValueError, match="model.pretrained_pos_resize='grid'; choose '2d', '1d' or ''"):
        load_config(REPO / "configs/model/tiny.yaml", ["model.pretrained_pos_resize=grid"])


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
    joint = TimeSformer(**{**TINY, "img_size": 64, "attention_type": "joint_space_time"})  # the same quirk
    load_weights(joint, path)
    assert torch.equal(joint.pos_embed, model.pos_embed)
    # The better option: 2-D resize keeps the grid (row 0 of the 8x8 grid reads old row 0 twice per column).
    model2d = TimeSformer(**{**TINY, "img_size": 64})
    load_weights(model2d, path, pos_resize="2d")
    assert model2d.pos_embed[0, 1:9, 0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    # a space-only model's own weights (an image ViT's keys): loaded at another size, the grid resize, as its forward
    # does at run time, so that loading at 64 px equals loading at 32 px and running at 64
    space_only = TimeSformer(**{**TINY, "img_size": 64, "attention_type": "space_only"})
    assert load_weights(space_only, path).format == "vit2d"
    assert torch.equal(space_only.pos_embed, model2d.pos_embed)


def test_inspect_and_convert_cli(tmp_path: Path) -> None:
    path = tmp_path / "ck.pyth"
    save_pyth(path, trained_like(), epoch=4)
    run = lambda *a: subprocess.run([sys.executable, "-m", "timesformer_harness.checkpoint", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    out = run("inspect", str(path))
    assert out.returncode == 0, out.stderr
    assert "format:      pyth" in out.stdout  # the original's 0-based epoch, said so: checkpoint_epoch_00005's
    assert "epoch:       4 (0-based, as the original's: 5 epoch(s) done; file names count from 1)\n" in out.stdout
    assert "attention_type=divided_space_time frames=4 img_size=32 patch=8 classes=7 embed_dim=32 depth=2" in out.stdout
    assert "blocks.1.temporal_fc.weight" in out.stdout and f"parameters:  {sum(p.numel() for p in trained_like().parameters()):,}" in out.stdout
    mid = tmp_path / "mid.pyth"  # a step checkpoint of the first epoch
    save_pyth(mid, trained_like(), epoch=-1)
    assert "epoch:       -1 (0-based, as the original's: no epoch done yet: a mid-epoch or debug checkpoint; file " \
           "names count from 1)\n" in run("inspect", str(mid)).stdout
    hf = tmp_path / "hf.safetensors"
    kept = run("convert", str(path), str(hf), "--hf")  # a safetensors file cannot keep the epoch: asked first
    assert kept.returncode == 2 and "holds epoch beside its weights" in kept.stderr and not hf.exists()
    assert run("convert", str(path), str(hf), "--hf", "--weights-only").returncode == 0
    assert "format:      hf" in run("inspect", str(hf), "--no-keys").stdout
    bad = run("inspect", str(tmp_path / "missing.pyth"))
    assert bad.returncode == 2 and "missing.pyth does not exist" in bad.stderr
    os.mkfifo(tmp_path / "pipe")  # was "does not exist"; never opened (reading it would wait for a writer)
    fifo = run("inspect", str(tmp_path / "pipe"))
    assert fifo.returncode == 2 and fifo.stderr == (f"error: checkpoint {tmp_path}/pipe is a named pipe, not a file; "
                                                    "give a checkpoint file (.pyth, .safetensors) or a Hugging Face "
                                                    "snapshot folder\n"), fifo.stderr
    many = tmp_path / "many.pyth"  # the top-level list names what it leaves out
    torch.save({"model_state": trained_like().state_dict(), **{f"entry_{i:02d}": i for i in range(30)}}, many)
    top = next(line for line in inspect(many, show_keys=False).splitlines() if line.startswith("top-level:"))
    assert top.endswith("entry_23, ... (7 more)") and "entry_00, entry_01" in top


# ----------------------------------------------------------------------------------------------------------
# Hugging Face transformers interop: an independent implementation of the same model.
@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_huggingface_weights_load_and_export(tmp_path: Path, attention_type: str) -> None:
    pytest.importorskip("transformers", reason="the test extra installs transformers")
    from hf_interop import round_trip

    report = round_trip(attention_type, tmp_path)
    assert report["format"] == "hf" and not report["missing"], report
    assert report["hf_to_ours"] < 1e-5 and report["ours_to_hf"] < 1e-5, report


# ----------------------------------------------------------------------------------------------------------
# Hugging Face snapshot folders (config.json beside model.safetensors or pytorch_model.bin) and convert --hf.
def checkpoint_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "timesformer_harness.checkpoint", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("bin_file", [False, True], ids=["model.safetensors", "pytorch_model.bin"])
def test_snapshot_folder_loads_and_inspects(tmp_path: Path, bin_file: bool) -> None:
    pytest.importorskip("transformers", reason="the test extra installs transformers")
    from hf_interop import hf_logits, snapshot

    folder = tmp_path / "snapshot"
    hf = snapshot(folder, bin_file=bin_file)
    weights = "pytorch_model.bin" if bin_file else "model.safetensors"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", weights])
    ours = TimeSformer(**TINY, drop_path_rate=0.0).eval()
    report = load_weights(ours, folder)
    assert report.format == "hf" and not report.missing and report.path == str(folder)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert (ours(x) - hf_logits(hf, x)).abs().max().item() < 1e-5
    out = checkpoint_cli("inspect", str(folder), "--no-keys")
    assert out.returncode == 0, out.stderr
    assert f"folder:      {folder}\nfile:        {folder / weights}\nformat:      hf" in out.stdout
    assert ("config.json: attention_type=divided_space_time frames=4 image_size=32 patch=8 labels=7 hidden_size=32 "
            "layers=2 heads=4") in out.stdout
    assert "mismatch" not in out.stdout


def test_a_backbone_without_a_head_fine_tunes_with_the_head_at_init(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """transformers' TimesformerModel (a backbone: no classifier) loads for fine-tuning, the head left at its init with
    a warning; evaluating or resuming (new_head=False) still refuses it: a random head would score noise."""
    pytest.importorskip("transformers", reason="the test extra installs transformers")
    import transformers
    from hf_interop import randomised, tiny_config

    folder = tmp_path / "backbone"
    backbone = randomised(transformers.TimesformerModel(tiny_config()), seed=0)
    backbone.save_pretrained(folder)
    ours = TimeSformer(**TINY, drop_path_rate=0.0)
    head = ours.head.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.checkpoint"):
        report = load_weights(ours, folder)
    assert report.missing == ["head.weight", "head.bias"] and torch.equal(ours.head.weight, head)
    assert torch.equal(ours.cls_token, backbone.embeddings.cls_token)
    assert f"{folder} has no classification head: head.weight, head.bias left at init (fine-tuning)" in caplog.text
    with pytest.raises(WeightsMismatchError, match=r"missing key head\.weight \[7, 32\]"):
        load_weights(TimeSformer(**TINY), folder, new_head=False)


def test_folder_without_weights_is_one_line_naming_what_was_looked_for(tmp_path: Path) -> None:
    folder = tmp_path / "empty_snapshot"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "timesformer"}')
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        load_weights(TimeSformer(**TINY), folder)
    msg = str(err.value)
    assert msg == (f"{folder} is a folder without weights: looked for model.safetensors or pytorch_model.bin (with "
                   f"config.json, as a Hugging Face snapshot has them); its sharded weights "
                   f"(model.safetensors.index.json) are not read: merge the shards into one file; give a weights "
                   f"file or a snapshot folder")
    out = checkpoint_cli("inspect", str(folder))
    assert out.returncode == 2 and out.stderr == f"error: {msg}\n" and not out.stdout


def test_a_misnamed_safetensors_file_and_a_checkpoints_folder_say_what_to_give(tmp_path: Path) -> None:
    """safetensors files are read by their suffix: one named otherwise says it looks like one; a training run's
    checkpoints folder (no weights file of a snapshot) names a checkpoint in it to give instead."""
    model = trained_like()
    misnamed = tmp_path / "weights.pth"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(misnamed))
    with pytest.raises(CheckpointError) as err:
        load_weights(TimeSformer(**TINY), misnamed)
    assert str(err.value) == (f"{misnamed} is not a torch checkpoint but looks like a safetensors file (a header "
                              "length, then JSON); safetensors files are read by their suffix: name it "
                              "weights.safetensors")
    misnamed.rename(tmp_path / "weights.safetensors")
    load_weights(TimeSformer(**TINY), tmp_path / "weights.safetensors")
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    save_pyth(folder / "checkpoint_epoch_00001.pyth", model)
    (folder / "last.pyth").symlink_to("checkpoint_epoch_00001.pyth")
    with pytest.raises(CheckpointError) as err:
        load_weights(TimeSformer(**TINY), folder)
    assert str(err.value).endswith(f"as a Hugging Face snapshot has them); it holds .pyth checkpoints: give one of "
                                   f"them, e.g. {folder / 'last.pyth'}")


def test_snapshot_config_is_checked_against_the_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("transformers", reason="the test extra installs transformers")
    from hf_interop import snapshot

    folder = tmp_path / "snapshot"
    snapshot(folder)
    config = json.loads((folder / "config.json").read_text())
    # The head count is in no weight's shape: only config.json can tell that 8 heads of 4 are not 4 heads of 8.
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 8, "num_hidden_layers": 3}))
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(TimeSformer(**TINY), folder)
    assert str(err.value).startswith(f"{folder / 'config.json'} describes another model: num_hidden_layers=3 where "
                                     f"model.depth=2; num_attention_heads=8 where model.num_heads=4. Set those "
                                     f"model.* keys")
    assert "\n" not in str(err.value)
    inspected = checkpoint_cli("inspect", str(folder), "--no-keys").stdout
    assert "mismatch:    config.json num_hidden_layers=3 where the weights' depth=2" in inspected
    assert "num_attention_heads=8" not in inspected.split("config.json:")[-1].split("\n", 1)[1]  # not in the weights
    # Frames, image size and classes are what the loader adapts: named in a warning, and the load goes on.
    (folder / "config.json").write_text(json.dumps(config))
    caplog.set_level(logging.WARNING, logger="timesformer_harness.checkpoint")
    report = load_weights(TimeSformer(**{**TINY, "num_frames": 8, "num_classes": 3}), folder)
    assert report.resized["time_embed"] == ((1, 4, 32), (1, 8, 32)) and set(report.skipped) == {"head.weight",
                                                                                                "head.bias"}
    warned = [r.getMessage() for r in caplog.records if "config.json" in r.getMessage()]
    with pytest.raises(WeightsMismatchError, match=r"config.json describes another model: num_labels=7 where "
                                                   r"model.num_classes=3\. Set those"):  # evaluating: no new head
        load_weights(TimeSformer(**{**TINY, "num_frames": 8, "num_classes": 3}), folder, new_head=False)
    assert warned == [f"{folder / 'config.json'}: num_frames=4 where model.num_frames=8 (time_embed is resized)",
                      f"{folder / 'config.json'}: num_labels=7 where model.num_classes=3 (the head is dropped: "
                      f"fine-tuning to a new class count)"]
    # A timm ViT snapshot's config.json is another model's: not checked, and its weights load as ImageNet ViT.
    vit = tmp_path / "timm_vit"
    vit.mkdir()
    save_file({k: v.contiguous() for k, v in trained_like("space_only").state_dict().items()},
              str(vit / "model.safetensors"))
    (vit / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224", "num_classes": 7}))
    assert load_weights(TimeSformer(**TINY), vit).format == "vit2d"
    assert "config.json: not a Hugging Face Timesformer config (vit_base_patch16_224); not checked" in \
        checkpoint_cli("inspect", str(vit), "--no-keys").stdout


def test_convert_hf_of_a_space_only_model_says_how_transformers_differs(tmp_path: Path) -> None:
    src = tmp_path / "space.pyth"
    save_pyth(src, trained_like("space_only"))
    summary = convert(src, tmp_path / "model.safetensors", hf=True, weights_only=True)
    assert "transformers' space_only model classifies each frame ((B*T, classes) logits)" in summary
    divided = tmp_path / "divided"
    divided.mkdir()
    save_pyth(divided / "div.pyth", trained_like())
    assert "classifies each frame" not in convert(divided / "div.pyth", divided / "model.safetensors", hf=True,
                                                  weights_only=True)


def test_convert_hf_writes_a_config_transformers_loads(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    from hf_interop import hf_logits

    src = tmp_path / "ours.pyth"
    ours = trained_like(num_heads=8)  # 8 heads of 4: what a head count inferred from the weights (32 / 64) misses
    save_pyth(src, ours, epoch=3, cfg_yaml="model:\n  num_heads: 8\n  depth: 2\n")
    out_dir = tmp_path / "hf"
    out_dir.mkdir()
    summary = convert(src, out_dir / "model.safetensors", hf=True, weights_only=True)
    assert f"{out_dir / 'config.json'} beside it, num_attention_heads=8 (from the source's cfg: model.num_heads)" \
        in summary
    config = json.loads((out_dir / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "num_frames", "image_size", "hidden_size", "num_hidden_layers",
                                   "num_attention_heads", "intermediate_size", "attention_type")} == {
        "model_type": "timesformer", "num_frames": 4, "image_size": 32, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 8, "intermediate_size": 128, "attention_type": "divided_space_time"}
    hf = transformers.TimesformerForVideoClassification.from_pretrained(out_dir).eval()
    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert (hf_logits(hf, x) - ours(x)).abs().max().item() < 1e-5
    # The folder reads back as a snapshot, config.json checked, and a second convert asks before replacing it.
    assert load_weights(TimeSformer(**{**TINY, "num_heads": 8}), out_dir).format == "hf"
    with pytest.raises(CheckpointError, match="config.json exists .*pass --force"):
        convert(src, out_dir / "other.safetensors", hf=True, weights_only=True)
    assert not (out_dir / "other.safetensors").exists()
    guessed = convert(src, out_dir / "other.safetensors", hf=True, weights_only=True, force=True)
    assert "num_attention_heads=8 (from the source's cfg" in guessed and "name the file so" in guessed
    with pytest.raises(CheckpointError, match="convert would overwrite its input .*model.safetensors"):
        convert(out_dir, out_dir / "model.safetensors", hf=True, weights_only=True, force=True)  # the folder's file
    with pytest.raises(CheckpointError, match="convert --hf would overwrite its input's .*config.json"):
        convert(out_dir, out_dir / "again.safetensors", hf=True, weights_only=True, force=True)
    plain = tmp_path / "plain.pyth"
    save_pyth(plain, ours)
    assumed = convert(plain, out_dir / "model.safetensors", hf=True, weights_only=True, force=True)
    assert "num_attention_heads=1 (assumed: embed_dim / 64" in assumed


def test_convert_to_pyth_keeps_cfg_and_epoch_of_any_source(tmp_path: Path) -> None:
    src = tmp_path / "ck.pyth"
    cfg = "model:\n  num_heads: 4\n"
    save_pyth(src, trained_like(), epoch=7, cfg_yaml=cfg, extra={"seed": 3})
    out = tmp_path / "out.pyth"
    assert "kept epoch, cfg, seed" in convert(src, out)
    raw = load_file(out)
    assert (raw["epoch"], raw["cfg"], raw["seed"]) == (7, cfg, 3)
