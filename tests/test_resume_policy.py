"""A safe resume: ``train.resume=never|auto|must``, the config comparison that refuses a changed model or data and
warns about other changes (``train_state.config_changes``), and the default ``output.dir`` that names the config; the
pure functions on real configs and files, the policies in real training processes on a real toy dataset."""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

import test_user_errors
from test_train import PY, REPO, train_cmd
from test_user_errors import error_line, run
from timesformer_harness.common import ExitCode
from timesformer_harness.config import ConfigError, ModelConfig, RootConfig, load_config, to_yaml
from timesformer_harness.model import create_model
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.train_state import (CLIP_KEYS, IGNORED_KEYS, LAUNCH_FILE, MODEL_KEYS, SOURCE_KEYS,
                                             CheckpointManager, RunFolderError, RunLock, checkpoint_name,
                                             config_changes, find_resume, format_changes, list_checkpoints)

tiny = test_user_errors.tiny  # the fixture: 8 train videos of a toy set, one optimizer step

# The keys of each section a resume lets change (with a warning); every other one is refused. A new field of
# ModelConfig or DataConfig must be put on one side or the other (test_every_model_and_data_key_is_classified).
MODEL_WARNED = {"drop_rate", "attn_drop_rate", "drop_path_rate", "attn_backend", "temporal_attn_backend",
                "grad_checkpointing", "init", "time_embed_std", "pretrained", "pretrained_pos_resize"}
DATA_WARNED = {"loader", "backend", "val_manifest", "test_manifest", "num_ensemble_views", "num_spatial_crops",
               "batch_size", "num_workers", "on_bad_video", "max_bad_fraction", "validate", "seed", "validate_cache",
               "max_frame_pixels", "synthetic_videos", "synthetic_classes", "decode_rates"}


def as_dict(overrides: list[str]) -> dict:
    """The config the harness saves in a checkpoint (``cfg``), loaded back as nested dicts."""
    return yaml.safe_load(to_yaml(load_config(REPO / "configs/model/tiny.yaml", overrides)))


# ---------------------------------------------------------------------------------------------------------------
# The comparison.
def test_config_changes_refuses_model_and_clip_keys_and_warns_about_the_rest():
    before = as_dict(["output.dir=runs/a"])
    after = as_dict(["output.dir=runs/b", "train.resume=must", "model.depth=3", "data.sampling_rate=2",
                     "data.root=/elsewhere", "solver.base_lr=0.01", "data.batch_size=2", "data.num_workers=4"])
    refused, warned = config_changes(before, after)
    assert refused == [("data.root", "data/toy", "/elsewhere"), ("data.sampling_rate", 8, 2), ("model.depth", 2, 3)]
    assert warned == [("data.batch_size", 8, 2), ("data.num_workers", 2, 4), ("solver.base_lr", 0.005, 0.01)]
    assert format_changes(refused) == ("data.root 'data/toy' -> '/elsewhere', data.sampling_rate 8 -> 2, "
                                       "model.depth 2 -> 3")
    # train.on_data_change=replan: where the videos come from may change (the data fingerprint check decides)
    refused, warned = config_changes(before, after, data_may_change=True)
    assert [key for key, _, _ in refused] == ["data.sampling_rate", "model.depth"]
    assert "data.root" in [key for key, _, _ in warned]
    assert config_changes(before, before) == ([], [])


def test_a_key_only_one_config_has_is_not_a_change():
    before, after = as_dict([]), as_dict(["model.depth=3"])
    before["train"]["auto_resume"] = True  # another version's schema
    del before["train"]["resume"]
    del before["model"]["depth"]
    assert config_changes(before, after) == ([], [])
    assert config_changes({"TRAIN": {"ENABLE": True}}, after) == ([], [])  # an original .pyth's yacs config


def test_a_hostile_saved_config_is_compared_in_bounded_work():
    levels = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]  # 9 ** 12 leaves once expanded, a few hundred nodes as loaded
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(11)]
    before = yaml.safe_load("\n".join([*levels, "model: {depth: *l, embed_dim: *l}", "data: *l", "train: *l"]))
    refused, warned = config_changes(before, as_dict([]))
    assert [key for key, _, _ in refused] == ["model.depth", "model.embed_dim"] and warned == []
    assert len(format_changes(refused)) < 200


def test_every_model_and_data_key_is_classified():
    schema = {key for key in yaml.safe_load(to_yaml(RootConfig()))["model"]}
    assert {f.name for f in fields(ModelConfig)} == schema
    assert {f"model.{k}" for k in schema - MODEL_WARNED} == set(MODEL_KEYS)
    data = {f.name for f in fields(DataConfig)}
    assert {f"data.{k}" for k in data - DATA_WARNED} == set(CLIP_KEYS + SOURCE_KEYS)
    flat = {f"{section}.{key}" for section, keys in yaml.safe_load(to_yaml(RootConfig())).items() for key in keys}
    assert set(IGNORED_KEYS) <= flat


# ---------------------------------------------------------------------------------------------------------------
# The policies on real files.
def save_checkpoint(run_dir: Path) -> Path:
    model = create_model("tiny")
    return CheckpointManager(run_dir).save(model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1, batch=0,
                                           step=4, cfg_yaml=to_yaml(RootConfig()), extra={})


def test_pruning_never_removes_the_checkpoint_just_saved(tmp_path):
    """A file of a newer name (one the run did not write, say) puts the one just saved among the old: it is kept."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "checkpoint_epoch_00005.pyth").write_bytes(b"a newer name")
    model = create_model("tiny")
    path = CheckpointManager(tmp_path / "run", keep_last=1).save(
        model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1, batch=0, step=4, cfg_yaml="", extra={})
    assert path.is_file() and (folder / "checkpoint_epoch_00005.pyth").is_file()


def test_find_resume_follows_the_policy(tmp_path):
    empty = tmp_path / "empty"
    assert find_resume(empty, "never") is None and find_resume(empty, "auto") is None
    with pytest.raises(RunFolderError, match=rf"^train.resume=must, but output.dir {empty} has no checkpoint to "
                                             rf"resume from \(looked in {empty}/checkpoints\): check output.dir"):
        find_resume(empty, "must")
    assert not empty.exists()  # nothing was created
    run_dir = tmp_path / "run"
    path = save_checkpoint(run_dir)
    for policy in ("auto", "must"):
        found, obj = find_resume(run_dir, policy)
        assert found == path and obj["step"] == 4
    with pytest.raises(RunFolderError, match=rf"^train.resume=never starts a fresh run, but output.dir {run_dir} "
                                             r"holds 1 checkpoint\(s\), newest checkpoint_epoch_00001.pyth: give this "
                                             r"run its own output.dir=\.\.\., or delete"):
        find_resume(run_dir, "never")
    path.write_bytes(b"not a checkpoint")  # the only one is unreadable: starting over would overwrite it
    for policy in ("auto", "must"):
        with pytest.raises(RunFolderError, match=rf"output.dir {run_dir} holds 1 checkpoint\(s\) and none can be read "
                                                 r"\(newest checkpoint_epoch_00001.pyth"):
            find_resume(run_dir, policy)
    died = tmp_path / "died"  # a run that logged records and died before its first checkpoint
    died.mkdir()
    (died / "metrics.jsonl").write_text('{"step": 0, "event": "start"}\n')
    with pytest.raises(RunFolderError, match="holds an earlier run's metrics.jsonl"):
        find_resume(died, "never")


def test_checkpoints_are_ordered_by_step_whatever_the_batch_size(tmp_path):
    """Mid-epoch saves are named by optimizer step: a relaunch with a bigger batch saves at a higher step but a lower
    batch index, and must still come after (the newest is resumed from, the oldest pruned)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    names = ["checkpoint_epoch_00002.pyth", "checkpoint_epoch_00002_step_00000321.pyth", "checkpoint_epoch_00001.pyth",
             "checkpoint_epoch_00002_step_00000301.pyth", "checkpoint_epoch_00002_iter_000045.pyth",
             "checkpoint_epoch_00003_step_123456789.pyth", "debug_nan_step_00000007.pyth", "last.pyth"]
    for name in names:
        (folder / name).touch()
    assert [p.name for p in list_checkpoints(folder)] == [
        "checkpoint_epoch_00001.pyth", "checkpoint_epoch_00002_iter_000045.pyth",  # an older harness's name
        "checkpoint_epoch_00002_step_00000301.pyth", "checkpoint_epoch_00002_step_00000321.pyth",
        "checkpoint_epoch_00002.pyth", "checkpoint_epoch_00003_step_123456789.pyth"]
    assert checkpoint_name(2, 321) == "checkpoint_epoch_00002_step_00000321.pyth"


def test_an_output_dir_that_cannot_be_written_is_one_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match=rf"^output.dir {tmp_path}/file/run cannot be written \(Not a directory\): "
                                             r"give the run a folder it can write"):
        RunLock(tmp_path / "file" / "run")


def test_the_resume_policy_is_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"^command-line overrides: train.resume='sometimes'; choose from "
                                          r"\['never', 'auto', 'must'\]$"):
        load_config(None, ["train.resume=sometimes"])
    with pytest.raises(ConfigError, match="unknown config key 'train.auto_resume'"):
        load_config(None, ["train.auto_resume=false"])


# ---------------------------------------------------------------------------------------------------------------
# The default run folder.
def test_the_default_output_dir_names_the_config(tmp_path):
    assert load_config(REPO / "configs/exp/toy_divided_cpu.yaml").output.dir == "runs/train/toy_divided_cpu"
    assert load_config(REPO / "configs/exp/toy_joint_cpu.yaml").output.dir == "runs/train/toy_joint_cpu"
    assert load_config().output.dir == "runs/train/default"
    my = tmp_path / "my.yaml"
    my.write_text("defaults: [configs/exp/toy_divided_cpu.yaml]\n")  # a copy of a recipe gets a folder of its own
    assert load_config(my).output.dir == "runs/train/my"
    assert load_config(my, ["output.dir=runs/x"]).output.dir == "runs/x"
    my.write_text("defaults: [configs/exp/toy_divided_cpu.yaml]\noutput:\n  dir: runs/mine\n")
    assert load_config(my).output.dir == "runs/mine"


def test_a_run_writes_where_its_config_is_named(tiny, tmp_path):
    my = tmp_path / "my.yaml"
    my.write_text("defaults: [configs/model/tiny.yaml]\n")
    args = [a for a in tiny if not a.startswith("--config") and a != "configs/model/tiny.yaml"]
    res = run([PY, str(REPO / "harness/train.py"), "--config", str(my), *args], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "runs/train/my/config.yaml").read_text())
    assert saved["output"]["dir"] == "runs/train/my"
    assert [p.name for p in (tmp_path / "runs/train/my/checkpoints").glob("checkpoint_*")] == [
        "checkpoint_epoch_00001.pyth"]


# ---------------------------------------------------------------------------------------------------------------
# Real training processes.
@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """A run folder holding one finished epoch (one optimizer step)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    res = run(train_cmd(*tiny, f"output.dir={out}"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def copy_of(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, symlinks=True)
    (to / ".lock").unlink(missing_ok=True)
    return to


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (size, modification time in ns)."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_changed_learning_rate_warns_once_and_resumes(finished, tiny, tmp_path):
    out = copy_of(finished, tmp_path / "run")
    res = run(train_cmd(*tiny, f"output.dir={out}", "solver.base_lr=0.01", "solver.max_epoch=2",
                        "solver.weight_decay=0.05"))
    assert res.returncode == 0, res.stderr[-3000:]
    old = out / "checkpoints" / "checkpoint_epoch_00001.pyth"
    warning = (f"resuming from {old} with a changed config (the new values apply from here on): solver.base_lr "
               f"0.001 -> 0.01, solver.max_epoch 1 -> 2, solver.weight_decay 0.0001 -> 0.05")
    warned = [line for line in res.stderr.splitlines() if "with a changed config" in line]
    assert len(warned) == 1 and " WARNING " in warned[0] and warned[0].endswith(warning), warned
    assert f"resumed from {old}: 1 epoch(s) and 0 batch(es) done, step 1" in res.stderr
    assert warning in (out / "train.log").read_text()
    assert (out / "checkpoints" / "checkpoint_epoch_00002.pyth").is_file()
    assert yaml.safe_load((out / "config.2.yaml").read_text())["solver"]["base_lr"] == 0.01
    # they do apply: the optimizer state loaded from the checkpoint held the old weight decay in its groups
    groups = torch.load(out / "checkpoints" / "checkpoint_epoch_00002.pyth", weights_only=True)["optimizer_state"]
    assert {g["weight_decay"] for g in groups["param_groups"]} == {0.05}


def test_a_changed_model_or_clip_is_refused_before_anything_is_written(finished, tiny, tmp_path):
    out = copy_of(finished, tmp_path / "run")
    before = snapshot(out)
    res = run(train_cmd(*tiny, f"output.dir={out}", "model.depth=3", "data.sampling_rate=2", "solver.base_lr=0.01",
                        "solver.optimizer=sgd"))  # AdamW's state is no SGD's: it would fail at the first step
    assert res.returncode == ExitCode.RUN_FOLDER == 4
    ckpt = f"{out}/checkpoints/checkpoint_epoch_00001.pyth"
    assert error_line(res) == (f"error: cannot resume from {ckpt}: the config changes the model, its data or its "
                               f"optimizer: data.sampling_rate 3 -> 2, model.depth 2 -> 3, solver.optimizer 'adamw' -> "
                               f"'sgd'; put the old value(s) back, or train a new model in a folder of its own "
                               f"(output.dir=<new folder> train.resume=never; model.pretrained={ckpt} starts it from "
                               f"these weights)")
    assert "KeyError" not in res.stderr and "solver.base_lr" not in res.stderr
    assert snapshot(out) == before


def test_resume_must_with_nothing_to_resume_exits_4(tiny, tmp_path):
    out = tmp_path / "typo"
    res = run(train_cmd(*tiny, f"output.dir={out}", "train.resume=must"))
    assert res.returncode == ExitCode.RUN_FOLDER
    assert error_line(res).startswith(f"error: train.resume=must, but output.dir {out} has no checkpoint to resume "
                                      f"from (looked in {out}/checkpoints)")
    assert not out.exists()


def test_resume_never_refuses_a_used_folder_and_trains_in_a_new_one(finished, tiny, tmp_path):
    out = copy_of(finished, tmp_path / "run")
    before = snapshot(out)
    res = run(train_cmd(*tiny, f"output.dir={out}", "train.resume=never"))
    assert res.returncode == ExitCode.RUN_FOLDER
    assert error_line(res) == (f"error: train.resume=never starts a fresh run, but output.dir {out} holds 1 "
                               f"checkpoint(s), newest checkpoint_epoch_00001.pyth: give this run its own "
                               f"output.dir=..., or delete {out} to start over, or continue that run with "
                               f"train.resume=auto")
    assert snapshot(out) == before
    fresh = tmp_path / "fresh"
    res = run(train_cmd(*tiny, f"output.dir={fresh}", "train.resume=never"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" not in res.stderr and (fresh / "checkpoints" / "checkpoint_epoch_00001.pyth").is_file()


def test_a_restarted_attempt_continues_its_run_under_resume_never(finished, tiny, tmp_path):
    """torchrun --max-restarts starts the failed run's workers again (TORCHELASTIC_RESTART_COUNT > 0) in the folder
    their first attempt wrote: train.resume=never would refuse it and every restart would fail, so a restarted attempt
    continues from its checkpoints. A folder another launch started (the first attempt refused it) stays refused."""
    out = copy_of(finished, tmp_path / "run")
    before = snapshot(out)
    res = run(train_cmd(*tiny, f"output.dir={out}", "train.resume=never", "solver.max_epoch=2"),
              TORCHELASTIC_RESTART_COUNT="1", TORCHELASTIC_RUN_ID="job-b")
    assert res.returncode == ExitCode.RUN_FOLDER, res.stderr[-3000:]
    assert "train.resume=never" in res.stderr and snapshot(out) == before
    (out / LAUNCH_FILE).write_text("torchrun rendezvous job-a")  # as the first attempt of job-a wrote it
    res = run(train_cmd(*tiny, f"output.dir={out}", "train.resume=never", "solver.max_epoch=2"),
              TORCHELASTIC_RESTART_COUNT="1", TORCHELASTIC_RUN_ID="job-a")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "a restarted attempt of this run: train.resume=never continues from its checkpoints (auto)" in res.stderr
    assert f"resumed from {out}/checkpoints/checkpoint_epoch_00001.pyth: 1 epoch(s) and 0 batch(es) done, step 1" \
        in res.stderr
    assert (out / LAUNCH_FILE).read_text() == "torchrun rendezvous job-a"


def test_ranks_that_found_different_checkpoints_are_stopped_before_training():
    """Ranks whose output.dir is not one shared folder resume from different checkpoints (or none): they would train
    different epochs and wait in different collectives, so the run stops at once with each rank's view."""
    from timesformer_harness.train_state import resume_disagreement

    same = ("checkpoint_epoch_00005.pyth", 5, 0, 40)
    assert resume_disagreement([same, same]) is None and resume_disagreement([None, None]) is None
    assert resume_disagreement([same, None]) == (
        "the ranks found different checkpoints to resume from in output.dir (rank 0: checkpoint_epoch_00005.pyth "
        "(epoch 5, batch 0, step 40); rank 1: nothing): output.dir must be one folder every node sees (a shared "
        "filesystem), not a folder of each node's own")


def test_a_resumed_trainer_does_not_keep_the_loaded_checkpoint(finished, tiny, tmp_path):
    """The checkpoint a resume loads (weights and optimizer state: about 1 GB for ViT-B) is restored and let go, not
    kept by the Trainer for the whole run on every rank."""
    from timesformer_harness.distributed import init_distributed
    from timesformer_harness.train import Trainer

    out = copy_of(finished, tmp_path / "run")
    assert tiny[0] == "--config"
    cfg = load_config(REPO / tiny[1], [*tiny[2:], f"output.dir={out}", "solver.max_epoch=2",
                                       "output.tensorboard=false"])
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    try:
        assert (trainer.start_epoch, trainer.step) == (1, 1) and trainer._resume is None
        assert trainer.resumed_from[0] == out / "checkpoints" / "checkpoint_epoch_00001.pyth"
    finally:
        if trainer.lock is not None:
            trainer.lock.release()


def test_an_epoch_saved_but_not_validated_is_validated_on_resume(tiny, tmp_path):
    """An epoch's checkpoint is written before its validation, so a launch killed during a long validation loses
    no training; the next launch finds the epoch has no validation record and runs it first."""
    import json

    out = tmp_path / "run"
    cmd = train_cmd(*tiny, "train.eval_period=1", f"output.dir={out}")
    first = run(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert log.index("saved ") < log.index("epoch 1 val: top-1")  # saved first
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    (validated,) = [r for r in records if r.get("event") == "val"]
    # what a launch killed during that validation leaves: the checkpoint, no val or end record, no last_val.json
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("event") not in ("val", "end")))
    (out / "last_val.json").unlink()
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 1 was saved but not validated before the last launch stopped: validating it now" in \
        (out / "train.log").read_text()
    (redone,) = [json.loads(line) for line in metrics.read_text().splitlines() if '"event": "val"' in line]
    assert redone["val/top1"] == validated["val/top1"] and (out / "last_val.json").is_file()
    assert (out / "checkpoints" / "best.pyth").resolve().name == "checkpoint_epoch_00001.pyth"
    third = run(cmd)  # validated now: nothing left to do
    assert third.returncode == 0 and "validating it now" not in third.stderr
    assert len([line for line in metrics.read_text().splitlines() if '"event": "val"' in line]) == 1
    # the run's end record, which the killed launch did not write, was written by the one that validated
    assert len([line for line in metrics.read_text().splitlines() if '"event": "end"' in line]) == 1
    # epoch 1's checkpoint was saved before its validation, so it records no best; the resume reads epoch 1's top-1
    # from its val record: a second epoch that does not change the model (learning rate ~0) scores the same, which
    # is not better, and best.pyth stays at epoch 1
    more = run(train_cmd(*tiny, "train.eval_period=1", f"output.dir={out}", "solver.max_epoch=2",
                         "solver.base_lr=1e-12"))
    assert more.returncode == 0, more.stderr[-3000:]
    tops = [json.loads(line)["val/top1"] for line in metrics.read_text().splitlines() if '"event": "val"' in line]
    assert len(tops) == 2 and tops[0] == tops[1]
    assert (out / "checkpoints" / "best.pyth").resolve().name == "checkpoint_epoch_00001.pyth"


def test_a_damaged_newer_checkpoint_is_moved_aside_and_prunes_nothing_good(finished, tiny, tmp_path):
    """A resume that falls back past an unreadable checkpoint moves it aside as ``<name>.damaged``: counted by
    ``train.keep_last``, it made the save after the resume delete the checkpoint resumed from and the one just
    saved, leaving only the damaged file."""
    out = copy_of(finished, tmp_path / "run")
    folder = out / "checkpoints"
    good = (folder / "checkpoint_epoch_00001.pyth").read_bytes()
    (folder / "checkpoint_epoch_00002.pyth").write_bytes(good[:100_000])  # a copy cut short
    more = [f"output.dir={out}", "solver.max_epoch=2", "train.keep_last=1", "train.max_steps_per_epoch=2",
            "solver.global_batch_size=4"]  # two steps an epoch: the stop at step 2 saves inside epoch 2
    res = run(train_cmd(*tiny, *more, "train.debug_signal_at_step=2"))
    assert res.returncode == 143, res.stderr[-3000:]
    saved = "checkpoint_epoch_00002_step_00000003.pyth"  # the stop's save; epoch 1's pruned by keep_last=1
    assert {p.name for p in folder.iterdir()} == {"checkpoint_epoch_00002.pyth.damaged", saved, "last.pyth"}
    assert "the newer checkpoint_epoch_00002.pyth could not be read, moved aside as " \
           "checkpoint_epoch_00002.pyth.damaged" in (out / "train.log").read_text()
    assert (folder / "checkpoint_epoch_00002.pyth.damaged").read_bytes() == good[:100_000]
    assert (folder / "last.pyth").resolve().name == saved
    again = run(train_cmd(*tiny, *more))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {folder / saved}: 1 epoch(s) and 2 batch(es) done, step 3" in again.stderr
    assert {p.name for p in folder.iterdir()} == {"checkpoint_epoch_00002.pyth", "checkpoint_epoch_00002.pyth.damaged",
                                                  "last.pyth"}


def test_a_checkpoint_whose_name_says_another_position_is_refused_and_nothing_pruned(finished, tiny, tmp_path):
    """A checkpoint copied into a run's folder under a newer name than the state it holds (another run's epoch 1 as
    epoch 5) had been resumed from as the newest: the run then pruned its own later checkpoints and dropped its later
    metrics. The name and the position inside must agree (ours, and the original's ``epoch`` + 1)."""
    from timesformer_harness.train_state import misnamed

    out = copy_of(finished, tmp_path / "run")
    folder = out / "checkpoints"
    epoch_1 = folder / "checkpoint_epoch_00001.pyth"
    obj = torch.load(epoch_1, weights_only=True)
    assert misnamed(epoch_1, obj) is None
    assert misnamed(folder / "checkpoint_epoch_00001_step_00000001.pyth", obj) is not None
    assert misnamed(folder / "checkpoint_epoch_00001_iter_000045.pyth", obj) is None  # an older harness's: unchecked
    original = {"epoch": 4, "model_state": {}}  # the original's epoch is 0-based, its file names 1-based
    assert misnamed(folder / "checkpoint_epoch_00005.pyth", original) is None
    assert misnamed(folder / "checkpoint_epoch_00006.pyth", original) is not None
    mid = {**obj, "position": {"epoch": 1, "batch": 2}, "step": 3}
    assert misnamed(folder / "checkpoint_epoch_00002_step_00000003.pyth", mid) is None
    assert misnamed(folder / "checkpoint_epoch_00002_step_00000004.pyth", mid) is not None
    assert misnamed(folder / "checkpoint_epoch_00002.pyth", mid) is not None

    shutil.copy(epoch_1, folder / "checkpoint_epoch_00005.pyth")
    before = snapshot(out)
    res = run(train_cmd(*tiny, f"output.dir={out}", "solver.max_epoch=6"))
    assert res.returncode == ExitCode.RUN_FOLDER, res.stderr[-3000:]
    assert error_line(res) == (
        f"error: {folder / 'checkpoint_epoch_00005.pyth'}: its name says the end of epoch 5, but it holds the state "
        f"after the end of epoch 1 (step 1): a checkpoint copied or renamed into this run's folder? Resuming from it "
        f"would prune this run's later checkpoints and drop its later metrics. Move it out of {folder} (to train "
        "from its weights, start a new run with model.pretrained=<its new path>)")
    assert snapshot(out) == before


def test_an_optimizer_state_that_does_not_fit_is_replaced_or_refused(finished, tiny, tmp_path):
    """An optimizer state that does not fit this run's optimizer never reaches ``load_state_dict`` (AdamW's first
    step raised KeyError 'step' on SGD's state; another group count was an error naming no file): from a checkpoint
    with no config of ours (the original's, whose optimizer a run cannot know) the optimizer starts fresh, with a
    warning; from one of ours it is one error line naming the file, with the checkpoint exit status."""
    out = copy_of(finished, tmp_path / "original")
    ckpt = out / "checkpoints" / "checkpoint_epoch_00001.pyth"
    obj = torch.load(ckpt, weights_only=True)
    adamw = obj["optimizer_state"]
    params = [torch.zeros_like(e["exp_avg"], requires_grad=True) for _, e in sorted(adamw["state"].items())]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()
    torch.save({**obj, "optimizer_state": sgd.state_dict(), "cfg": "TRAIN:\n  DATASET: kinetics\n"}, ckpt)
    res = run(train_cmd(*tiny, f"output.dir={out}", "solver.max_epoch=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (f"{ckpt}: its optimizer_state does not fit solver.optimizer=adamw (the state of parameter 0 holds "
            "momentum_buffer, not step, exp_avg, exp_avg_sq (AdamW's; written by another optimizer?)); it holds no "
            "config of this harness, so the optimizer starts with a fresh state") in res.stderr
    assert f"{ckpt} holds no config of this harness: resuming without comparing configs" in res.stderr
    assert (out / "checkpoints" / "checkpoint_epoch_00002.pyth").is_file()

    ours = copy_of(finished, tmp_path / "ours")
    ckpt = ours / "checkpoints" / "checkpoint_epoch_00001.pyth"
    obj = torch.load(ckpt, weights_only=True)
    (group,) = obj["optimizer_state"]["param_groups"]
    half = len(group["params"]) // 2
    groups = [{**group, "params": group["params"][:half]}, {**group, "params": group["params"][half:]}]
    torch.save({**obj, "optimizer_state": {**obj["optimizer_state"], "param_groups": groups}}, ckpt)
    res = run(train_cmd(*tiny, f"output.dir={ours}", "solver.max_epoch=2"))
    assert res.returncode == ExitCode.CHECKPOINT == 2
    assert error_line(res) == (f"error: {ckpt}: its optimizer_state does not fit solver.optimizer=adamw (it has 2 "
                               "parameter group(s), this optimizer 1): resume it with the harness version that wrote "
                               f"it, or start a new run from its weights (output.dir=<new folder> "
                               f"model.pretrained={ckpt})")
    assert not (ours / "checkpoints" / "checkpoint_epoch_00002.pyth").exists()
