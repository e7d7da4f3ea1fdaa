"""``model.pretrained=`` a Hugging Face snapshot folder, in real training processes: it initialises the run; a folder
without weights, or whose config.json names another architecture, is one ``error:`` line (exit 2) before the run
folder is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_user_errors import error_line, run, tiny  # noqa: F401 (tiny is a fixture)
from test_train import train_cmd
from timesformer_harness.checkpoint import convert, save_pyth
from timesformer_harness.common import ExitCode
from timesformer_harness.model import create_model


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """The ``tiny`` preset (6 classes) as a folder convert --hf writes: config.json beside model.safetensors."""
    folder = tmp_path_factory.mktemp("snapshot")
    torch.manual_seed(0)
    save_pyth(folder / "tiny.pyth", create_model("tiny", num_classes=6), cfg_yaml="model:\n  num_heads: 4\n")
    convert(folder / "tiny.pyth", folder / "model.safetensors", hf=True, weights_only=True)
    (folder / "tiny.pyth").unlink()
    return folder


def test_training_starts_from_a_snapshot_folder(tiny, snapshot, tmp_path):
    res = run(train_cmd(*tiny, f"model.pretrained={snapshot}", f"output.dir={tmp_path}/run"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"initialised from {snapshot} (hf)" in res.stderr
    assert "config.json:" not in res.stderr  # its config describes the configured model: nothing to warn about


def test_a_folder_without_weights_is_refused_before_the_run_folder(tiny, tmp_path):
    empty = tmp_path / "downloaded"
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "timesformer"}')
    res = run(train_cmd(*tiny, f"model.pretrained={empty}", f"output.dir={tmp_path}/run"))
    assert res.returncode == ExitCode.CHECKPOINT == 2
    assert error_line(res) == (f"error: {empty} is a folder without weights: looked for model.safetensors or "
                               f"pytorch_model.bin (with config.json, as a Hugging Face snapshot has them); give a "
                               f"weights file or a snapshot folder")
    assert not (tmp_path / "run").exists()


def test_a_snapshot_of_another_architecture_is_refused_before_the_run_folder(tiny, snapshot, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").symlink_to(snapshot / "model.safetensors")  # as the hub's cache links its blobs
    config = json.loads((snapshot / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_attention_heads": 8}))
    res = run(train_cmd(*tiny, f"model.pretrained={other}", f"output.dir={tmp_path}/run"))
    assert res.returncode == ExitCode.CHECKPOINT
    assert error_line(res).startswith(f"error: {other / 'config.json'} describes another model: "
                                      f"num_attention_heads=8 where model.num_heads=4. Set those model.* keys")
    assert not (tmp_path / "run").exists()


def test_a_snapshot_the_loader_adapts_is_named_once_and_trains(tiny, snapshot, tmp_path):
    other = tmp_path / "eight_frames"
    other.mkdir()
    (other / "model.safetensors").symlink_to(snapshot / "model.safetensors")
    config = json.loads((snapshot / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_frames": 8}))
    res = run(train_cmd(*tiny, f"model.pretrained={other}", f"output.dir={tmp_path}/run"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count(f"{other / 'config.json'}: num_frames=8 where model.num_frames=4 (time_embed is "
                            f"resized)") == 1



def test_a_config_json_nested_past_the_recursion_limit_is_a_checkpoint_error(tmp_path):
    """200,000 nested lists in a 400 kB config.json: one error naming the file (it was a RecursionError traceback)."""
    from timesformer_harness.checkpoint import CheckpointError, read_config_json

    (tmp_path / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match=r"config.json is not a readable config \(nested deeper than Python's "
                                              r"recursion limit\); fix it, or remove it"):
        read_config_json(tmp_path)
