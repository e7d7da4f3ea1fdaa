"""Safe loading, on real files through every entry point: crafted checkpoints never run their code and are refused
naming the file and what they hold; files that are no checkpoint are refused as such; real original checkpoints
(a pickled yacs or fvcore ``CfgNode`` config, zip and legacy formats), Hugging Face ``pytorch_model.bin`` files
and our own training checkpoints still load, without yacs ever being imported."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file as load_safetensors

import crafted_checkpoints as cc
from timesformer_harness.checkpoint import (CheckpointError, load_file, load_weights, main as checkpoint_main,
                                            original_to_hf)
from timesformer_harness.config import load_config
from timesformer_harness.distributed import DistInfo
from timesformer_harness.evaluate import evaluate
from timesformer_harness.model import TimeSformer
from timesformer_harness.train import Trainer
from timesformer_harness.train_state import CheckpointManager

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
EXPECTED = {**cc.CRAFTED, **cc.NOT_CHECKPOINTS}
ORIGINALS = ["original_yacs.pyth", "original_yacs_legacy.pyth", "original_fvcore.pyth"]
# torch's own advice on a refused file is to load it unsafely; our messages must never pass that on.
UNSAFE_ADVICE = ("weights_only` set to `False", "weights_only=" + "False", "add_safe_globals", "safe_globals([")
TINY_CFG = ["model.img_size=32", "model.patch_size=8", "model.num_frames=4", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=4", "model.num_classes=7", "data.num_frames=4", "data.train_crop_size=32",
            "output.tensorboard=false"]


@dataclass
class Files:
    dir: Path
    canaries: Path
    paths: dict[str, Path]  # kind -> file, for every crafted kind and every non-checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """Every crafted file (the yacs ones written in a subprocess: this process never imports yacs), the
    non-checkpoints, and the original-style files. Canaries go to one folder, which must stay empty."""
    out = tmp_path_factory.mktemp("checkpoints")
    canaries = out / "canaries"
    paths = cc.write_crafted(out, canaries)
    res = subprocess.run([PY, str(Path(cc.__file__)), "yacs", str(out), str(canaries)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    paths.update({kind: out / f"{kind}.pyth" for kind in cc.CRAFTED if kind.startswith("cfgnode")})
    paths.update(cc.write_not_checkpoints(out / "not_checkpoints"))
    assert set(paths) == set(EXPECTED)
    return Files(out, canaries, paths)


def assert_refused(files: Files, kind: str, message: str, path: Path | None = None) -> None:
    """The message names the file and what it held, carries no advice to load unsafely, and no canary exists."""
    path = path or files.paths[kind]
    assert str(path) in message, message
    assert re.search(EXPECTED[kind], message), f"{kind}: {message}"
    assert not any(advice in message for advice in UNSAFE_ADVICE), message
    assert not list(files.canaries.iterdir()), f"{kind} ran code: {list(files.canaries.iterdir())}"


def tiny_cfg(run_dir: Path, *overrides: str):
    return load_config(REPO / "configs/model/tiny.yaml", [*TINY_CFG, f"output.dir={run_dir}", *overrides])


def trainer(cfg) -> Trainer:
    t = Trainer(cfg, DistInfo())
    t.metrics.close()
    return t


def test_crafted_files_are_live(tmp_path: Path) -> None:
    """Each crafted file runs its code when loaded the unsafe way (torch.load with the plain pickle module, what the
    old loader's fallback did): the safe-loading tests below test real attacks."""
    res = subprocess.run([PY, str(Path(cc.__file__)), "live", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ran = json.loads(res.stdout.strip().splitlines()[-1])
    assert ran == {kind: True for kind in cc.CRAFTED}


# ----------------------------------------------------------------------------------------------------------------
# In-process entry points, every file.
@pytest.mark.parametrize("kind", EXPECTED)
def test_load_file_and_load_weights_refuse(files: Files, kind: str) -> None:
    with pytest.raises(CheckpointError) as err:
        load_file(files.paths[kind])
    assert_refused(files, kind, str(err.value))
    with pytest.raises(CheckpointError) as err:
        load_weights(TimeSformer(**cc.TINY), files.paths[kind])
    assert_refused(files, kind, str(err.value))


@pytest.mark.parametrize("kind", EXPECTED)
def test_inspect_and_convert_refuse(files: Files, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert checkpoint_main(["inspect", str(files.paths[kind])]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and not out.out
    assert_refused(files, kind, out.err)
    dst = tmp_path / "converted.pyth"
    assert checkpoint_main(["convert", str(files.paths[kind]), str(dst)]) == 2
    assert_refused(files, kind, capsys.readouterr().err)
    assert not dst.exists()


@pytest.mark.parametrize("kind", EXPECTED)
def test_evaluate_refuses(files: Files, kind: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        evaluate(tiny_cfg(tmp_path), str(files.paths[kind]), DistInfo())
    assert_refused(files, kind, str(err.value))


@pytest.mark.parametrize("kind", EXPECTED)
def test_model_pretrained_refuses(files: Files, kind: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        trainer(tiny_cfg(tmp_path, f"model.pretrained={files.paths[kind]}"))
    assert_refused(files, kind, str(err.value))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of ours (after epoch 1) for the tiny config."""
    run = tmp_path_factory.mktemp("good_run")
    path = trainer(tiny_cfg(run)).save(1, 0)
    assert path is not None and path.name == "checkpoint_epoch_00001.pyth"
    return path


@pytest.mark.parametrize("kind", EXPECTED)
def test_resume_skips_a_crafted_newest_checkpoint(files: Files, kind: str, good_checkpoint: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    shutil.copy(good_checkpoint, ckpts / good_checkpoint.name)
    crafted = ckpts / "checkpoint_epoch_00002.pyth"
    shutil.copy(files.paths[kind], crafted)
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.train_state"):
        path, obj = CheckpointManager(tmp_path).load_latest()
        resumed = trainer(tiny_cfg(tmp_path))
    assert path.name == "checkpoint_epoch_00001.pyth" and resumed.start_epoch == 1
    warnings = [r.getMessage() for r in caplog.records if str(crafted) in r.getMessage()]
    assert warnings and "falling back to the previous one" in warnings[0]
    assert_refused(files, kind, warnings[0], path=crafted)


@pytest.mark.parametrize("kind", cc.CRAFTED)
def test_hugging_face_bin_refuses(files: Files, kind: str, tmp_path: Path) -> None:
    """Hugging Face weights go through the same loader: a crafted ``pytorch_model.bin`` is refused."""
    hf = tmp_path / "hf" / "pytorch_model.bin"
    hf.parent.mkdir()
    shutil.copy(files.paths[kind], hf)
    with pytest.raises(CheckpointError) as err:
        load_weights(TimeSformer(**cc.TINY), hf)
    assert_refused(files, kind, str(err.value), path=hf)


def test_forcing_torch_to_load_unsafely_has_no_effect(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only applies where weights_only is not passed; we always pass it."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for kind in ("legacy_main_object", "zip_newobj_build", "cfgnode_setstate_gadget"):
        with pytest.raises(CheckpointError) as err:
            load_file(files.paths[kind])
        assert_refused(files, kind, str(err.value))


def test_config_stand_in_only_stores_data(tmp_path: Path) -> None:
    """A CfgNode whose keys name an allow-listed callable (as yacs would look __setstate__ up) and whose BUILD state
    sets attributes loads as a plain dict of that data; nothing is called, no attribute lands anywhere."""
    stream = (b"\x80\x02" + b"}" + cc.binunicode("cfg")
              + b"cyacs.config\nCfgNode\n)\x81"  # NEWOBJ a CfgNode
              + b"(" + cc.binunicode("__setstate__") + b"ctorch._utils\n_rebuild_tensor\n"
              + cc.binunicode("LR") + b"G?\x84z\xe1G\xae\x14{" + b"u"  # SETITEMS {"__setstate__": fn, "LR": 0.01}
              + b"}" + cc.binunicode("__immutable__") + b"\x88" + b"s" + b"b"  # BUILD {"__immutable__": True}
              + b"s.")  # SETITEM cfg
    path = cc.write_zip_with_data_pkl(tmp_path / "node.pyth", stream)
    obj = load_file(path)
    assert type(obj["cfg"]) is dict and obj["cfg"]["LR"] == 0.01
    assert obj["cfg"]["__setstate__"] is torch._utils._rebuild_tensor  # stored as data, never called


# ----------------------------------------------------------------------------------------------------------------
# Real processes: the CLIs (several files per call where the CLI takes several).
def _run(*args: str) -> subprocess.CompletedProcess:
    """A CLI with this folder on PYTHONPATH, so an unsafe loader could import crafted_checkpoints.Canary."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cc.__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_inspect_cli_refuses_every_crafted_file_and_reads_the_originals(files: Files) -> None:
    originals = [files.dir / name for name in ORIGINALS]
    res = _run("-m", "timesformer_harness.checkpoint", "inspect", "--no-keys", *map(str, files.paths.values()),
               *map(str, originals))
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(files.paths), res.stderr[-3000:]
    for kind, path in files.paths.items():
        assert_refused(files, kind, next(e for e in errors if str(path) in e), path=path)
    for path in originals:
        assert f"file:        {path}\nformat:      pyth" in res.stdout and "epoch:       14" in res.stdout
    assert res.stdout.count("attention_type=divided_space_time frames=4 img_size=32") == 3


def test_convert_cli_refuses(files: Files, tmp_path: Path) -> None:
    dst = tmp_path / "out.safetensors"
    res = _run("-m", "timesformer_harness.checkpoint", "convert", str(files.paths["zip_newobj_build"]), str(dst),
               "--hf")
    assert res.returncode == 2 and not dst.exists()
    assert_refused(files, "zip_newobj_build", res.stderr)


@pytest.mark.parametrize("kind", ["legacy_magic_slot", "cfgnode_setstate_gadget"])
def test_evaluate_cli_refuses(files: Files, kind: str, tmp_path: Path) -> None:
    res = _run("harness/evaluate.py", "--config", "configs/model/tiny.yaml", *TINY_CFG, f"output.dir={tmp_path}",
               "--checkpoint", str(files.paths[kind]))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert_refused(files, kind, res.stderr)


def test_train_cli_refuses_model_pretrained(files: Files, tmp_path: Path) -> None:
    res = _run("harness/train.py", "--config", "configs/model/tiny.yaml", *TINY_CFG, f"output.dir={tmp_path}",
               f"model.pretrained={files.paths['zip_data_pkl']}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert_refused(files, "zip_data_pkl", res.stderr)
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------------
# What must still load.
class _NoYacs:
    """Fails any import of yacs or fvcore: proves the loader never needs them."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in ("yacs", "fvcore"):
            raise ImportError(f"{name} is blocked in this test")


def _assert_plain(obj: Any, where: str = "") -> None:
    """No stand-in, Counter or config class anywhere: dicts are dicts (or the OrderedDicts torch.save wrote)."""
    assert type(obj) not in (Counter,) and "CfgNode" not in type(obj).__name__, where
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{where}[{i}]")


@pytest.mark.parametrize("name", ORIGINALS)
def test_original_checkpoints_with_a_config_object_load_without_yacs(files: Files, name: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", [_NoYacs(), *sys.meta_path])
    assert not {m for m in sys.modules if m.split(".")[0] in ("yacs", "fvcore")}
    path = files.dir / name
    obj = load_file(path)
    assert set(obj) == {"epoch", "model_state", "optimizer_state", "cfg"} and obj["epoch"] == 14
    assert type(obj["cfg"]) is dict and type(obj["cfg"]["SOLVER"]) is dict
    assert json.loads(json.dumps(obj["cfg"])) == json.loads((files.dir / "original_cfg.json").read_text())
    assert obj["cfg"]["SOLVER"]["STEPS"] == (0, 11, 14) and obj["cfg"]["TIMESFORMER"]["PRETRAINED_MODEL"] is None
    _assert_plain(obj)
    expected = load_safetensors(str(files.dir / "original_weights.safetensors"))
    assert obj["model_state"].keys() == expected.keys()
    assert all(torch.equal(obj["model_state"][k], v) for k, v in expected.items())
    assert torch.equal(obj["optimizer_state"]["state"][0]["momentum_buffer"], torch.ones(3))
    model = TimeSformer(**cc.TINY, drop_path_rate=0.0)
    report = load_weights(model, path)
    assert report.format == "pyth" and not report.missing and not report.skipped
    assert torch.equal(model.state_dict()["blocks.1.temporal_fc.weight"], expected["model.blocks.1.temporal_fc.weight"])
    assert not {m for m in sys.modules if m.split(".")[0] in ("yacs", "fvcore")}
    assert not any("_ConfigNode" in repr(g) for g in torch.serialization.get_safe_globals())  # scoped to the load


def test_original_checkpoint_through_trainer_and_resume(files: Files, tmp_path: Path) -> None:
    """``model.pretrained`` and auto-resume both read an original file whose cfg is a CfgNode."""
    original = files.dir / "original_yacs_legacy.pyth"
    t = trainer(tiny_cfg(tmp_path / "ft", f"model.pretrained={original}"))
    expected = load_safetensors(str(files.dir / "original_weights.safetensors"))
    assert all(torch.equal(v, expected[f"model.{k}"]) for k, v in t.model.state_dict().items())
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(original, ckpts / "checkpoint_epoch_00015.pyth")
    path, obj = CheckpointManager(tmp_path / "run").load_latest()
    assert path.name == "checkpoint_epoch_00015.pyth" and obj["cfg"]["TRAIN"]["BATCH_SIZE"] == 8


def test_hugging_face_pytorch_model_bin_loads(tmp_path: Path) -> None:
    sd = OrderedDict((k.removeprefix("model."), v) for k, v in cc.tiny_state(seed=4).items())
    path = tmp_path / "pytorch_model.bin"
    torch.save(original_to_hf(sd), path)
    model = TimeSformer(**cc.TINY, drop_path_rate=0.0)
    report = load_weights(model, path)
    assert report.format == "hf" and not report.missing
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_our_checkpoints_need_no_allowlist(good_checkpoint: Path) -> None:
    """What training writes (rng states, scaler, scheduler, optimizer) is plain: torch.load(weights_only=True)
    reads it with no allowlist at all."""
    obj = torch.load(good_checkpoint, map_location="cpu", weights_only=True)
    assert {"model_state", "optimizer_state", "rng", "scaler", "scheduler", "position", "cfg"} <= set(obj)
    assert isinstance(obj["cfg"], str) and obj["position"] == {"epoch": 1, "batch": 0}
    mine = load_file(good_checkpoint)
    assert mine.keys() == obj.keys() and torch.equal(mine["rng"][0]["torch"], obj["rng"][0]["torch"])


def test_safetensors_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors is not a readable safetensors file"):
        load_file(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pyth does not exist"):
        load_file(tmp_path / "nope.pyth")


def test_nothing_in_the_repository_loads_unsafely() -> None:
    """No unsafe torch.load and no hand-made pickle module outside the test that proves the crafted files live."""
    needle = re.compile(r"weights_only\s*=\s*False|pickle_module\s*=|pickle\.loads?\(|Unpickler\(")
    hits = []
    sources = [*REPO.glob("*.*"), *(p for d in ("harness", "pipelines", "kernels", "benchmarks", "tests", "docs",
                                              "configs") for p in (REPO / d).rglob("*"))]
    for path in sources:
        rel = path.relative_to(REPO)
        if path.suffix not in (".py", ".md", ".toml", ".yaml"):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if needle.search(line) and rel != Path("tests/crafted_checkpoints.py"):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
    helper = Path(cc.__file__).read_text()
    assert "weights_only=" + "False" not in helper and helper.count("pickle_module" + "=") == 1
