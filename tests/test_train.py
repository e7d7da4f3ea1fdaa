"""timesformer_harness.train / optim / train_state: schedules, optimizers, checkpoint files, and real training processes
(single process and 2-process torchrun on gloo) reading a tiny toy dataset (real VP9 files) through the DALI CPU
pipeline: exact resume after SIGTERM, NaN stop, kill -9 during a save, disjoint shards and identical weights."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from timesformer_harness.checkpoint import load_file
from timesformer_harness.config import SolverConfig, load_config
from timesformer_harness.model import create_model
from timesformer_harness.optim import build_optimizer, lr_at
from timesformer_harness.train import RELAYED_SIGNAL_S
from timesformer_harness.train_state import CheckpointManager, list_checkpoints, resume_position

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
# The tiny model on 32 px, 4-frame clips of a 32-video toy set: 8 batches of 4 per epoch, 2 per optimizer step.
TINY = ["--config", "configs/model/tiny.yaml", "model.num_classes=6", "data.loader=dali", "data.backend=cpu",
        "data.num_frames=4", "data.sampling_rate=3", "data.train_crop_size=32", "data.test_crop_size=32",
        "data.train_jitter_scales=[32,40]", "data.random_flip=false", "data.batch_size=4", "data.num_workers=1",
        "data.num_ensemble_views=1", "data.num_spatial_crops=1", "data.validate_cache=none",
        "solver.optimizer=adamw", "solver.base_lr=1e-3", "solver.global_batch_size=8", "solver.max_epoch=2",
        "train.eval_period=2", "train.log_period=1", "output.tensorboard=false", "test.batch_size=4"]


def make_toy(out: Path) -> Path:
    """A tiny toy dataset (32 train / 8 val / 8 test VP9 clips of 32x32 px, 16 frames)."""
    from timesformer_harness.pipelines.tools.toy import ToySpec, generate

    generate(out, ToySpec(frames=16, train=32, val=8, test=8), workers=1)
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> list[str]:
    """TINY plus ``data.root`` of a freshly generated tiny toy dataset."""
    return [*TINY, f"data.root={make_toy(tmp_path_factory.mktemp('toy'))}"]


def train_cmd(*args: str, nproc: int = 1) -> list[str]:
    entry = ["harness/train.py"]  # run as a script, as torchrun does
    if nproc > 1:
        return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry, *args]
    return [PY, *entry, *args]


def run(cmd: list[str], timeout: int = 180, threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run_dir / "checkpoints")[-1])["model_state"]


def epoch_records(run_dir: Path) -> list[tuple]:
    """Each epoch's train loss, train top-1 and val top-1, and the train windows' losses, as ``metrics.jsonl``
    holds them: what a resumed run must log as an uninterrupted one does."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["event"], r["epoch"], r.get("train/loss"), r.get("train/top1"), r.get("val/top1"))
            for r in records if r["event"] in ("epoch", "val", "train")]


def assert_same_records(a: list[tuple], b: list[tuple]) -> None:
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for ra, rb in zip(a, b):  # the losses within float noise of the weights' (1e-6), the counts exactly
        assert ra[2] == (rb[2] if rb[2] is None else pytest.approx(rb[2], rel=1e-6)) and ra[3:] == rb[3:], (ra, rb)


# ---------------------------------------------------------------------------------------------------------------
# Schedules and optimizers.
def test_steps_with_relative_lrs_matches_the_original_recipe():
    cfg = SolverConfig()  # lr 0.005, steps [0, 11, 14] x [1, 0.1, 0.01], 15 epochs
    assert lr_at(cfg, 0.0) == pytest.approx(0.005)
    assert lr_at(cfg, 10.99) == pytest.approx(0.005)
    assert lr_at(cfg, 11.0) == pytest.approx(5e-4)
    assert lr_at(cfg, 13.5) == pytest.approx(5e-4)
    assert lr_at(cfg, 14.2) == pytest.approx(5e-5)


def test_cosine_and_warmup_are_per_iteration():
    cfg = SolverConfig(lr_policy="cosine", base_lr=1.0, cosine_end_lr=0.0, max_epoch=10, warmup_epochs=1.0,
                       warmup_start_lr=0.1)
    assert lr_at(cfg, 0.0) == pytest.approx(0.1)
    assert lr_at(cfg, 0.5) == pytest.approx(0.1 + 0.5 * (lr_at(cfg, 1.0) - 0.1))  # linear into the cosine
    assert lr_at(cfg, 5.0) == pytest.approx(0.5)
    assert lr_at(cfg, 10.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(cfg, 2.25) < lr_at(cfg, 2.0)  # changes inside an epoch


def test_optimizer_choice_is_reported_and_lamb_needs_apex(caplog):
    model = create_model("tiny")
    with caplog.at_level(logging.INFO, logger="timesformer_harness.optim"):
        opt, impl = build_optimizer(list(model.parameters()), SolverConfig(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert impl == "torch.optim.SGD(foreach=True)" and impl in caplog.text
    opt, impl = build_optimizer(list(model.parameters()), SolverConfig(optimizer="adamw"), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(ValueError, match="needs apex"):
        build_optimizer(list(model.parameters()), SolverConfig(optimizer="lamb"), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files.
def _save(mgr: CheckpointManager, model, epoch: int, batch: int) -> Path:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return mgr.save(model, opt, epoch=epoch, batch=batch, step=epoch * 10 + batch, cfg_yaml="model: {}\n", extra={})


def test_checkpoint_names_order_keep_last_and_original_layout(tmp_path):
    model = create_model("tiny")
    mgr = CheckpointManager(tmp_path, keep_last=2)
    _save(mgr, model, 1, 0)
    _save(mgr, model, 1, 3)  # stopped inside epoch 2 (1-based) after 3 batches
    _save(mgr, model, 2, 0)
    names = [p.name for p in list_checkpoints(mgr.dir)]
    assert names == ["checkpoint_epoch_00002_step_00000013.pyth", "checkpoint_epoch_00002.pyth"]  # by step, 13
    obj = load_file(mgr.dir / names[-1])
    assert obj["epoch"] == 1 and isinstance(obj["cfg"], str) and "optimizer_state" in obj  # original keys
    assert all(k.startswith("model.") for k in obj["model_state"])
    assert resume_position(obj)[:2] == (2, 0)
    assert resume_position(load_file(mgr.dir / names[0]))[:2] == (1, 3)
    assert resume_position({"epoch": 14, "model_state": {}}) == (15, 0, 0)  # an original file


def test_last_and_best_links_and_pruning_keeps_the_best(tmp_path):
    model = create_model("tiny")
    mgr = CheckpointManager(tmp_path, keep_last=1)
    first = _save(mgr, model, 1, 0)
    mgr.point("best", first)
    _save(mgr, model, 2, 0)
    third = _save(mgr, model, 3, 0)
    assert [p.name for p in list_checkpoints(mgr.dir)] == ["checkpoint_epoch_00001.pyth", "checkpoint_epoch_00003.pyth"]
    assert mgr.pointed("last") == third and mgr.pointed("best") == first
    assert load_file(mgr.dir / "last.pyth")["step"] == 30


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    model = create_model("tiny")
    mgr = CheckpointManager(tmp_path, keep_last=3)
    _save(mgr, model, 1, 0)
    latest = _save(mgr, model, 2, 0)
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.train_state"):
        path, obj = mgr.load_latest()
    assert path.name == "checkpoint_epoch_00001.pyth" and resume_position(obj)[:2] == (1, 0)
    assert "checkpoint_epoch_00002.pyth is unreadable" in caplog.text and "falling back" in caplog.text


KILL_DURING_SAVE = r"""
import os, sys, time
import torch
from timesformer_harness.model import create_model
from timesformer_harness.train_state import CheckpointManager
mgr = CheckpointManager(sys.argv[1], keep_last=3)
model = create_model("tiny")
opt = torch.optim.SGD(model.parameters(), lr=0.1)
mgr.save(model, opt, epoch=1, batch=0, step=4, cfg_yaml="", extra={})
real_fsync = os.fsync
def slow_fsync(fd):  # the second save stalls after writing its temp file, before the rename
    print("saving", flush=True)
    time.sleep(60)
os.fsync = slow_fsync
mgr.save(model, opt, epoch=2, batch=0, step=8, cfg_yaml="", extra={"big": torch.zeros(1 << 20)})
"""


@pytest.mark.parametrize("entries", [{"position": [1, 2]}, {"position": {"epoch": "1", "batch": 0}},
                                     {"step": [3]}, {"epoch": None}, {"position": {"epoch": 1}}])
def test_a_checkpoint_whose_position_is_not_counts_is_refused(entries):
    from timesformer_harness.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"^ckpt.pyth: .* not a count: not a training checkpoint"):
        resume_position({"model_state": {}, "step": 1, **entries}, "ckpt.pyth")


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    proc = subprocess.Popen([PY, "-c", KILL_DURING_SAVE, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        tmp_files = list((tmp_path / "checkpoints").glob(".checkpoint_epoch_00002.*.tmp.pyth"))
        assert tmp_files, "the second save should be in flight"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    mgr = CheckpointManager(tmp_path)
    assert [p.name for p in list_checkpoints(mgr.dir)] == ["checkpoint_epoch_00001.pyth"]
    path, obj = mgr.load_latest()
    assert obj["step"] == 4 and resume_position(obj)[:2] == (1, 0)


# ---------------------------------------------------------------------------------------------------------------
# Real training processes.
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, toy) -> Path:
    """An uninterrupted 2-epoch run (the reference for resume)."""
    out = tmp_path_factory.mktemp("train") / "ref"
    res = run(train_cmd(*toy, f"output.dir={out}", "output.tensorboard=true"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_run_writes_config_metrics_tensorboard_and_original_checkpoints(reference_run):
    from timesformer_harness.config import load_config

    cfg = load_config(reference_run / "config.yaml")  # the resolved config loads back as it was
    assert cfg.model.num_classes == 6 and cfg.solver.global_batch_size == 8 and cfg.data.loader == "dali"
    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events.count("epoch") == 2 and "val" in events and events[-1] == "end"
    train = [r for r in records if r["event"] == "train"]
    assert {"train/loss", "opt/lr", "time/clips_per_s", "time/data_wait_pct"} <= set(train[0])
    assert max(r["step"] for r in records) == 8  # 32 clips / 8 per optimizer step x 2 epochs
    assert list((reference_run / "tb").glob("events.out.tfevents.*"))
    val = json.loads((reference_run / "last_val.json").read_text())
    assert val["num_videos"] == 8 and (val["top1"] / 12.5).is_integer()  # k of 8 videos right
    ckpts = reference_run / "checkpoints"
    assert os.readlink(ckpts / "last.pyth") == "checkpoint_epoch_00002.pyth"
    best = max((r for r in records if r["event"] == "val"), key=lambda r: (r["val/top1"], -r["epoch"]))
    assert os.readlink(ckpts / "best.pyth") == f"checkpoint_epoch_{best['epoch']:05d}.pyth"
    # saved before its validation: the checkpoint records the best before it (none: epoch 2 is the first validated)
    assert load_file(ckpts / "best.pyth")["best"] == {"top1": None, "epoch": None}
    assert next(r for r in records if r["event"] == "start")["epoch"] == 1  # epochs are 1-based in every record
    obj = load_file(reference_run / "checkpoints" / "checkpoint_epoch_00002.pyth")
    assert obj["epoch"] == 1 and obj["step"] == 8 and resume_position(obj)[:2] == (2, 0)
    assert {"scaler", "scheduler", "rng", "optimizer_state", "cfg"} <= set(obj)


def test_sigterm_stops_saves_and_resume_reproduces_the_uninterrupted_run(reference_run, toy, tmp_path):
    out = tmp_path / "resumed"
    # SIGTERM (a real signal to the process) after step 2: step 3 finishes, is saved, exit 143 (128 + SIGTERM's
    # number, so that a shell's && does not go on as after a finished run) mid-epoch 2.
    first = run(train_cmd(*toy, f"output.dir={out}", "train.debug_signal_at_step=2"))
    assert first.returncode == 128 + signal.SIGTERM == 143, first.stderr[-3000:]
    assert "stopped by SIGTERM" in first.stdout
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint_epoch_00001_step_00000003.pyth"]
    assert "\r" not in first.stderr and " step 1 (warm-up): loss " in first.stderr  # no tqdm bar in a log file
    stop = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert stop["event"] == "stop" and stop["reason"] == "signal SIGTERM"
    assert stop["checkpoint"].endswith("_step_00000003.pyth")
    # what a crash would have left: a save's temporary, a record past the checkpoint's step, a line cut short
    stale = out / "checkpoints" / ".checkpoint_epoch_00002.0123abcd.tmp.pyth"
    stale.write_bytes(b"partial")
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "event": "epoch", "epoch": 2}) + "\n" + '{"step": 4, "ev')
    second = run(train_cmd(*toy, f"output.dir={out}"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and not stale.exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]  # each epoch once
    assert [r["event"] for r in records].count("start") == 2
    # the interrupted epoch's record counts its batches before the stop too (from the checkpoint)
    assert_same_records(epoch_records(out), epoch_records(reference_run))
    a, b = final_weights(reference_run), final_weights(out)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"


def test_a_stop_after_an_epochs_last_step_keeps_its_record_and_validation(reference_run, toy, tmp_path):
    out = tmp_path / "resumed"
    # SIGTERM after step 3: step 4, epoch 1's last, finishes; its record and validation are due after it
    first = run(train_cmd(*toy, f"output.dir={out}", "train.debug_signal_at_step=3"))
    assert first.returncode == 143 and "stopped by SIGTERM" in first.stdout, first.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint_epoch_00001_step_00000004.pyth"]
    assert {r[0] for r in epoch_records(out)} == {"train"}  # no epoch or val record yet: they come on resume
    second = run(train_cmd(*toy, f"output.dir={out}"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_records(epoch_records(out), epoch_records(reference_run))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [  # the epoch's own checkpoint too
        "checkpoint_epoch_00001_step_00000004.pyth", "checkpoint_epoch_00001.pyth", "checkpoint_epoch_00002.pyth"]


def test_a_resume_with_another_accumulation_steps_from_the_resumed_batch(toy, tmp_path):
    """Stopped after step 2 (batch 4 of 8, 2 micro-batches a step), resumed with 3 a step
    (solver.global_batch_size 8 -> 12, warned about): the resumed epoch's step takes batches 4-6, not 4-5 with a
    third of the loss missing; the left-over batch 7 goes into that step's record. Every train record has its own
    step."""
    out = tmp_path / "run"
    first = run(train_cmd(*toy, f"output.dir={out}", "train.debug_signal_at_step=1"))
    assert first.returncode == 143 and "stopped by SIGTERM" in first.stdout, first.stderr[-3000:]
    second = run(train_cmd(*toy, f"output.dir={out}", "solver.global_batch_size=12"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "solver.global_batch_size 8 -> 12" in second.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert len(steps) == len(set(steps)), steps
    epochs = [(r["epoch"], r["step"]) for r in records if r["event"] == "epoch"]
    assert epochs == [(1, 3), (2, 5)]  # batches 4-6 make step 3; epoch 2: 0-2 and 3-5, 6-7 left over


def test_a_stop_during_validation_keeps_best_and_the_last_epochs_ends_the_run(tmp_path, monkeypatch):
    """A SIGTERM that arrives while an epoch validates: at an epoch with no scheduled checkpoint
    (train.checkpoint_period=2) the stop saves one, and best.pyth points at it when its top-1 is the best; in the last
    epoch (saved, validated) the run is complete and ends with its end record, not a stop."""
    from timesformer_harness.distributed import DistInfo
    from timesformer_harness.train import Trainer

    out = tmp_path / "run"
    base = ["data.loader=synthetic", "data.synthetic_videos=8", "data.batch_size=4", "solver.global_batch_size=4",
            "train.eval_period=1", "train.checkpoint_period=2", "train.keep_last=1", "output.tensorboard=false",
            f"output.dir={out}"]

    def launch(max_epoch: int, scores: list[float], status: int = 143) -> Trainer:
        trainer = Trainer(load_config(REPO / "configs/model/tiny.yaml", [*base, f"solver.max_epoch={max_epoch}"]),
                          DistInfo())
        def validate_then_signal(epoch: int) -> dict:  # the scores this test wants, whatever the model learnt
            trainer.metrics.log({"event": "val", "epoch": epoch + 1, "val/top1": scores[epoch]}, trainer.step)
            trainer._on_signal(signal.SIGTERM, None)
            return {"top1": scores[epoch]}

        monkeypatch.setattr(trainer, "validate", validate_then_signal)
        assert trainer.fit() == status  # 128 + SIGTERM's number after a stop, 0 for a run that ends complete
        return trainer

    launch(3, [50.0, 60.0, 40.0])  # stops after epoch 1's validation
    ckpts = out / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint_epoch_00001.pyth"]
    assert (ckpts / "best.pyth").resolve().name == "checkpoint_epoch_00001.pyth"
    launch(3, [50.0, 60.0, 40.0])  # epoch 2: saved (period 2), best; stopped after its validation
    assert (ckpts / "best.pyth").resolve().name == "checkpoint_epoch_00002.pyth"
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint_epoch_00002.pyth"]  # keep_last 1: epoch 1 went
    launch(3, [50.0, 60.0, 40.0], status=0)  # epoch 3, the last: a stop during its validation ends the run
    assert (ckpts / "best.pyth").resolve().name == "checkpoint_epoch_00002.pyth"  # epoch 2 kept as best
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint_epoch_00002.pyth", "checkpoint_epoch_00003.pyth"]
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1] == "end" and events.count("stop") == 2


def test_a_stop_asked_by_another_rank_is_logged_as_such(tmp_path, caplog):
    from timesformer_harness.distributed import DistInfo
    from timesformer_harness.train import Trainer

    cfg = load_config(REPO / "configs/model/tiny.yaml", ["data.loader=synthetic", "train.eval_period=0",
                                                         "output.tensorboard=false", f"output.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, DistInfo())
    try:
        with caplog.at_level(logging.WARNING):
            code = trainer._report_stop(None)  # this rank got no signal (stop_signal None): another one did
    finally:
        trainer.metrics.close()
        trainer.lock.release()
    assert "stopped by a signal on another rank after step 0" in caplog.text and "None" not in caplog.text
    assert code == 130  # no rank's signal known (a real job gathers it: the two-rank test below)


def test_two_ranks_stopped_by_a_signal_to_one_both_save_once_and_exit_with_its_status(toy, tmp_path):
    """SIGTERM to rank 0 alone: both ranks finish the same step, one checkpoint is saved, and both exit 143, rank 1
    naming the rank that got it (a rank that exited 0 had made torchrun report a stopped job as a finished one)."""
    out = tmp_path / "run"
    res = run(train_cmd(*toy, f"output.dir={out}", "train.debug_signal_at_step=2", "train.eval_period=0", nproc=2),
              timeout=240)
    assert res.returncode != 0, res.stderr[-4000:]
    assert "stopped by SIGTERM: saved" in res.stdout, res.stdout[-2000:]
    assert "stopped by SIGTERM on rank 0 after step 3" in res.stderr, res.stderr[-4000:]
    saved = out / "checkpoints" / "checkpoint_epoch_00001_step_00000003.pyth"
    assert list_checkpoints(out / "checkpoints") == [saved]
    # torchrun's summary: both ranks 143 (not one killed by the SIGTERM torchrun sends the rest once one has
    # exited), each with its stop line in place of "To enable traceback see ..."
    assert len(re.findall(r"exitcode\s*:\s*143 ", res.stderr)) == 2 and "(SIGTERM)" not in res.stderr, \
        res.stderr[-4000:]
    assert f"traceback : stopped by SIGTERM on rank 0: saved {saved}; rerun the same command to resume" in res.stderr


def test_a_second_signal_in_the_middle_of_a_save_exits_with_its_status(tmp_path, monkeypatch):
    """torch.save reports the SystemExit a second SIGTERM raises inside its writer as a failed write: the run exits
    128 + 15 as documented, not 2 with a disk error."""
    from timesformer_harness.checkpoint import CheckpointWriteError
    from timesformer_harness.distributed import DistInfo
    from timesformer_harness.train import Trainer

    cfg = load_config(REPO / "configs/model/tiny.yaml", ["data.loader=synthetic", "train.eval_period=0",
                                                         "output.tensorboard=false", f"output.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, DistInfo())
    trainer.metrics.close()
    trainer._on_signal(signal.SIGTERM, None)  # the first: finish the step, then save

    def interrupted_save(*args, **kwargs):
        try:
            trainer.stop_signal_at -= RELAYED_SIGNAL_S  # not the first relayed: a second request
            trainer._on_signal(signal.SIGTERM, None)  # the second arrives while the checkpoint is written
        except SystemExit as e:
            raise CheckpointWriteError(f"could not write x.pyth: the write failed ({e!r})") from e

    monkeypatch.setattr(trainer.ckpt, "save", interrupted_save)
    try:
        with pytest.raises(SystemExit) as stopped:
            trainer.save(0, 1)
        assert stopped.value.code == 128 + signal.SIGTERM
        def disk_full(*args, **kwargs):
            raise CheckpointWriteError("could not write x.pyth: the disk is full")

        monkeypatch.setattr(trainer, "exit_code", None)  # a write that fails on its own is still reported as one
        monkeypatch.setattr(trainer.ckpt, "save", disk_full)
        with pytest.raises(CheckpointWriteError, match="the disk is full"):
            trainer.save(0, 1)
    finally:
        trainer.lock.release()


def test_a_signal_relayed_right_after_the_first_is_the_same_stop_request(tmp_path, caplog):
    """pkill, a cgroup kill or scancel signal torchrun and its workers at once, and torchrun relays its own signal to
    them: a second signal within RELAYED_SIGNAL_S of the first keeps the graceful stop (finish the step, save); one
    after that exits at once."""
    from timesformer_harness.distributed import DistInfo
    from timesformer_harness.train import Trainer

    cfg = load_config(REPO / "configs/model/tiny.yaml", ["data.loader=synthetic", "train.eval_period=0",
                                                         "output.tensorboard=false", f"output.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, DistInfo())
    try:
        trainer.metrics.close()
        trainer._on_signal(signal.SIGTERM, None)
        with caplog.at_level(logging.INFO, logger="timesformer_harness.train"):
            trainer._on_signal(signal.SIGTERM, None)  # relayed: no SystemExit
        assert trainer.stop_signal == "SIGTERM" and "the same stop request" in caplog.text
        trainer.stop_signal_at -= RELAYED_SIGNAL_S
        with pytest.raises(SystemExit) as stopped:
            trainer._on_signal(signal.SIGINT, None)
        assert stopped.value.code == 128 + signal.SIGINT
    finally:
        trainer.lock.release()


def test_a_recipe_without_imagenet_weights_says_it_trains_from_random_init(tmp_path, caplog):
    from timesformer_harness.distributed import DistInfo
    from timesformer_harness.train import Trainer

    cfg = load_config(REPO / "configs/exp/k400_divst_8x32_224.yaml", ["data.loader=synthetic", "train.eval_period=0",
                                                                     f"output.dir={tmp_path / 'run'}"])
    caplog.set_level(logging.WARNING, logger="timesformer_harness.train")
    trainer = Trainer(cfg, DistInfo())
    trainer.metrics.close()
    trainer.lock.release()
    assert [r.getMessage() for r in caplog.records if "model.pretrained is empty" in r.getMessage()] == [
        "model.pretrained is empty: a ViT-B-sized model trains from random init, where the original recipes start "
        "from ImageNet ViT weights (model.pretrained=jx_vit_base_p16_224.pth; docs/checkpoints.md)"]


def test_pretrained_weights_of_another_model_of_the_same_shapes_are_named_in_a_warning(tmp_path, caplog):
    """A checkpoint of ours trained with 2 heads loads into a 4-head model (the same tensors) and computes another
    function: fine-tuning from it is allowed (it is a start) but warned, naming the key. Another class count is
    fine-tuning as usual (a new head): no warning."""
    from timesformer_harness.checkpoint import save_pyth
    from timesformer_harness.config import to_yaml
    from timesformer_harness.distributed import DistInfo
    from timesformer_harness.train import Trainer

    tiny = REPO / "configs/model/tiny.yaml"
    trained = load_config(tiny, ["model.num_heads=2", "model.num_classes=6"])
    ckpt = tmp_path / "two_heads.pyth"
    save_pyth(ckpt, create_model("tiny", num_classes=6, num_heads=2), None, epoch=0, cfg_yaml=to_yaml(trained))
    caplog.set_level(logging.WARNING, logger="timesformer_harness.train")
    for name, overrides in (("heads", ["model.num_classes=6"]), ("classes", ["model.num_heads=2"])):
        cfg = load_config(tiny, [*overrides, "data.loader=synthetic", "data.synthetic_classes=5",
                                  "train.eval_period=0", f"model.pretrained={ckpt}", f"output.dir={tmp_path / name}"])
        trainer = Trainer(cfg, DistInfo())  # loads model.pretrained
        trainer.metrics.close()
        trainer.lock.release()
    warned = [r.getMessage() for r in caplog.records if "was trained as another model" in r.getMessage()]
    assert warned == [f"model.pretrained={ckpt} was trained as another model: model.num_heads 2 -> 4; its weights load "
                      "but compute something else in this one (set those keys back to fine-tune the trained model)"]


def test_train_clips_below_the_crop_are_refused_for_a_new_run_and_warned_on_resume(caplog):
    """A run that started with them (before they were refused) resumes with a warning: a change of the jitter would
    be refused by the resume, and a refusal here would leave it no way on."""
    from timesformer_harness.train import check_train_clips

    cfg = load_config(None, ["data.train_crop_size=448"])
    with pytest.raises(ValueError, match=r"^data.train_jitter_scales=\[256, 320\] starts below "
                                         r"data.train_crop_size=448: .* e.g. data.train_jitter_scales=\[448, 512\]$"):
        check_train_clips(cfg, resuming=False)
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.train"):
        check_train_clips(cfg, resuming=True)
    assert "starts below data.train_crop_size=448" in caplog.text and "this run started with it" in caplog.text
    check_train_clips(load_config(None, ["data.loader=synthetic", "data.train_crop_size=448"]), resuming=False)


def test_a_stale_rejected_list_goes_when_the_run_rejects_nothing(toy, tmp_path):
    """rejected.csv left by an attempt whose work was discarded (it stopped on a video since restored): the run that
    rejects nothing does not keep listing it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "rejected.csv").write_text("path,reason,stage,epoch,batch,rank\nx.webm,broken,runtime,1,7,0\n")
    res = run(train_cmd(*toy, f"output.dir={out}", "solver.max_epoch=1", "train.eval_period=0"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (out / "rejected.csv").exists()


def test_a_second_run_on_a_held_run_folder_is_refused_before_writing(toy, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([PY, "-c", "import sys, time; from timesformer_harness.train_state import RunLock; "
                               "lock = RunLock(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = run(train_cmd(*toy, f"output.dir={out}"))
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 4, res.stderr[-2000:]
    assert f"error: output.dir {out} is in use by pid {holder.pid} on " in res.stderr
    assert "Traceback" not in res.stderr and sorted(p.name for p in out.iterdir()) == [".lock"]
    res = run(train_cmd(*toy, f"output.dir={out}", "solver.max_epoch=1"))  # the holder is gone: the lock is free
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_holder_with_this_processs_pid_in_another_namespace_is_another_run(tmp_path):
    """Two containers (PID namespaces) can both run as pid 1: a lock held by another process is refused whatever
    pid its holder wrote; a second lock in the process that holds it is shared."""
    from timesformer_harness.train_state import RunFolderError, RunLock

    out = tmp_path / "run"
    holder = subprocess.Popen([PY, "-c", "import fcntl, sys, time, pathlib; p = pathlib.Path(sys.argv[1]); "
                               "p.mkdir(); f = open(p / '.lock', 'a+'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); "
                               "f.write(sys.argv[2]); f.flush(); print('held', flush=True); time.sleep(60)",
                               str(out), f"pid {os.getpid()} on another-host"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"is in use by pid {os.getpid()} on another-host"):
            RunLock(out)
    finally:
        holder.kill()
        holder.wait()
    first = RunLock(out)
    try:
        RunLock(out)  # a second Trainer in this process
    finally:
        first.release()


def test_a_run_folder_that_cannot_take_the_launch_files_is_one_line(toy, tmp_path):
    """A write under the lock that fails (a full disk; here config.yaml is a folder) is exit 4 with the reason."""
    out = tmp_path / "run"
    (out / "config.yaml").mkdir(parents=True)
    res = run(train_cmd(*toy, f"output.dir={out}", "solver.max_epoch=1"))
    assert res.returncode == 4, res.stderr[-2000:]
    assert f"error: output.dir {out} cannot be written (Is a directory): give the run a folder it can write" \
        in res.stderr and "Traceback" not in res.stderr


def test_resuming_after_the_manifest_changed_is_refused_or_replanned(toy, tmp_path):
    root = Path(toy[-1].split("=", 1)[1])
    lines = (root / "train.csv").read_text().splitlines()
    manifest = tmp_path / "train.csv"
    manifest.write_text("".join(f"{root / line.rsplit(None, 1)[0]} {line.rsplit(None, 1)[1]}\n" for line in lines))
    out = tmp_path / "run"
    args = [*toy, f"data.train_manifest={manifest}", f"output.dir={out}"]
    first = run(train_cmd(*args, "train.debug_signal_at_step=2"))
    assert first.returncode == 143 and "stopped by SIGTERM" in first.stdout, first.stderr[-3000:]
    manifest.write_text("".join(reversed(manifest.read_text().splitlines(keepends=True))))  # same videos, reordered
    refused = run(train_cmd(*args))
    assert refused.returncode == 4, refused.stderr[-3000:]
    saved = out / "checkpoints" / "checkpoint_epoch_00001_step_00000003.pyth"
    assert (f"error: the train manifest changed since {saved}"
            " (32 usable videos, but not the same ones or labels or order" in refused.stderr)
    assert "train.on_data_change=replan" in refused.stderr and "Traceback" not in refused.stderr
    kept = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(kept[:8]))  # shrunk: the checkpoint's batch 6 is past the new epoch's 2 batches
    shrunk = run(train_cmd(*args))
    assert shrunk.returncode == 4 and "(32 usable videos when checkpoint_epoch_00001_step_00000003.pyth was " \
        "written, 8 now)" in shrunk.stderr, shrunk.stderr[-3000:]
    manifest.write_text("".join(kept))
    replanned = run(train_cmd(*args, "train.on_data_change=replan"))
    assert replanned.returncode == 0, replanned.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    changed = [r for r in records if r["event"] == "data_changed"]
    assert len(changed) == 1 and changed[0]["epoch"] == 1
    start = [r for r in records if r["event"] == "start"][-1]
    assert start["epoch"] == 1 and start["batch"] == 0  # the interrupted first epoch again from its first batch


def test_the_epoch_loss_counts_clips_when_a_resume_changed_the_batch_size(tmp_path):
    """An epoch resumed with another data.batch_size: its loss weights each micro-batch's mean by its clips, as its
    top-1 counts clips (it had averaged the micro-batches' means, so the small batches' clips counted twice)."""
    args = ["--config", "configs/model/tiny.yaml", "data.loader=synthetic", "data.num_frames=4",
            "data.train_crop_size=32", "data.synthetic_videos=16", "solver.global_batch_size=0", "train.eval_period=0",
            "output.tensorboard=false", "solver.max_epoch=1", "train.log_period=1", f"output.dir={tmp_path}"]
    first = run(train_cmd(*args, "data.batch_size=2", "train.debug_signal_at_step=2"))
    assert first.returncode == 143 and "stopped by SIGTERM" in first.stdout, first.stderr[-3000:]
    second = run(train_cmd(*args, "data.batch_size=4"))
    assert second.returncode == 0, second.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed_at = [i for i, r in enumerate(records) if r["event"] == "start"][1]
    clips = [(r["train/loss"], 2 if i < resumed_at else 4) for i, r in enumerate(records) if r["event"] == "train"]
    assert {n for _, n in clips} == {2, 4}, clips  # one micro-batch per window (log_period 1, no accumulation)
    (epoch,) = [r for r in records if r["event"] == "epoch"]
    assert epoch["train/loss"] == pytest.approx(sum(loss * n for loss, n in clips) / sum(n for _, n in clips))
    assert epoch["train/top1"] * sum(n for _, n in clips) / 100 == pytest.approx(round(
        epoch["train/top1"] * sum(n for _, n in clips) / 100))  # the same clips: a whole number of them right


def test_nan_loss_stops_with_a_clear_error_and_a_debug_checkpoint(toy, tmp_path):
    res = run(train_cmd(*toy, f"output.dir={tmp_path}", "train.debug_nan_at_step=3"))
    assert res.returncode == 1, res.stderr[-3000:]
    debug = tmp_path / "checkpoints" / "debug_nan_step_00000003.pyth"
    message = (f"loss is nan at step 3 (epoch 1, its batch 7); weights before this step saved to {debug}. Lower "
               "solver.base_lr, set solver.grad_clip, or use train.precision=fp32 / bf16 instead of fp16: the same "
               "command with that change starts again (no checkpoint was saved before)")
    assert res.stderr.strip().splitlines()[-1] == f"error: {message}", res.stderr[-3000:]
    assert "Traceback" not in res.stderr  # one line, not a traceback of 30
    assert message in (tmp_path / "train.log").read_text()
    assert debug.is_file() and load_file(debug)["step"] == 3
    assert not list_checkpoints(tmp_path / "checkpoints")  # no regular checkpoint from a broken run


def test_unknown_key_on_the_command_line_fails_naming_the_closest(tmp_path):
    res = run([PY, "-m", "timesformer_harness.train", "--config", "configs/model/tiny.yaml", "solver.base_lrr=0.1",
               f"output.dir={tmp_path}"])
    assert res.returncode != 0 and "did you mean 'solver.base_lr'" in res.stderr


def test_torchrun_two_processes_disjoint_shards_identical_weights(toy, tmp_path):
    res = run(train_cmd(*toy, f"output.dir={tmp_path}", "train.record_samples=true", "train.eval_period=0",
                        nproc=2), timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    seen = {}
    for rank in (0, 1):
        rows = [json.loads(line) for line in (tmp_path / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
        for epoch in (0, 1):
            seen[rank, epoch] = [i for r in rows if r["epoch"] == epoch for i in r["index"]]
    for epoch in (0, 1):
        assert seen[0, epoch] and seen[1, epoch]
        assert not set(seen[0, epoch]) & set(seen[1, epoch]), "ranks read overlapping clips"
    end = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and len(end["param_digests"]) == 2
    assert end["param_digests"][0] == end["param_digests"][1]
    assert "gloo" in res.stderr


def run_two_ranks(worker: str, tmp_path: Path, *worker_args: str) -> subprocess.CompletedProcess:
    """``worker`` (a script ending in ``train.main``) as a 2-rank torchrun job training the tiny model for one epoch on
    synthetic clips into ``tmp_path/run``; its own arguments come before the training's."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    args = ["--config", "configs/model/tiny.yaml", "data.loader=synthetic", "data.num_frames=4",
            "data.train_crop_size=32", "data.batch_size=2", "data.synthetic_videos=8", "solver.max_epoch=1",
            "solver.global_batch_size=4", "train.eval_period=0", "output.tensorboard=false",
            f"output.dir={tmp_path / 'run'}"]
    return run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *worker_args,
                *args], timeout=240)


# One rank of a 2-rank run: notes the threads that joining the default group starts (gloo's), trains, and writes
# which of them still run once train.main has returned (its cleanup done). "late-import": the control, with
# torch.distributed.nn.functional imported again after the group exists, as DDP would import it.
THREADS_WORKER = """
import importlib, json, os, sys
import torch.distributed as dist
from timesformer_harness import train

def threads():
    return set(os.listdir("/proc/self/task"))

out, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
init, started = dist.init_process_group, set()
def init_and_note(*a, **k):
    before = threads()
    init(*a, **k)
    started.update(threads() - before)
    if mode == "late-import":
        sys.modules.pop("torch.distributed.nn.functional")
        importlib.import_module("torch.distributed.nn.functional")
dist.init_process_group = init_and_note
rc = train.main(args)
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"rc": rc, "default_group_threads": len(started), "left": len(started & threads())}, f)
"""


@pytest.mark.parametrize("mode", ["as-trained", "late-import"])
def test_a_2_rank_run_joins_the_default_groups_gloo_threads_before_exit(tmp_path, mode):
    """The default group's gloo threads carry the last ``all_gather_objects``; one still running at exit once freed
    that gather's tensors during interpreter shutdown and aborted the process. After train.main returns they are
    joined: ``torch.distributed.nn.functional`` (whose defaults capture the default group when it is imported) is
    imported before the group exists, and the signal handlers that held the Trainer are restored. The control
    imports it after: the group and its threads outlive the run."""
    res = run_two_ranks(THREADS_WORKER, tmp_path, str(tmp_path), mode)
    assert res.returncode == 0, res.stderr[-4000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["rc"] == 0 and seen["default_group_threads"] >= 1, seen
        assert seen["left"] == (0 if mode == "as-trained" else seen["default_group_threads"]), seen


# One rank of a 2-rank run in which rank 0 alone cannot write its checkpoint (a full disk, made by replacing the
# write), so that rank 1, waiting in the barrier after the save, loses its connection to rank 0.
RANK0_FAILS_WORKER = """
import os, sys
from timesformer_harness import train
from timesformer_harness.checkpoint import CheckpointWriteError

def no_space(*args, **kwargs):
    raise CheckpointWriteError("could not write checkpoint_epoch_00001.pyth: no space left on device "
                               "(made by the test)")

if os.environ["RANK"] == "0":
    train.CheckpointManager.save = no_space
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_rank_that_loses_the_rank_that_failed_says_so_in_one_line_and_torchrun_names_the_cause(tmp_path):
    """Rank 0 stops on its own error (status 2) while rank 1 waits for it in a collective: rank 1 says in one line that
    it lost its connection (status 6), not with gloo's traceback, and torchrun's summary names rank 0 and its error as
    the root cause (rank 1 had been named, with 'To enable traceback see ...')."""
    res = run_two_ranks(RANK0_FAILS_WORKER, tmp_path)
    assert res.returncode == 1, res.stderr[-4000:]
    lines = res.stderr.splitlines()
    assert "error: could not write checkpoint_epoch_00001.pyth: no space left on device (made by the test)" in lines
    assert ("error: rank 1 lost its connection to another rank of the job, which stopped first: that rank's error "
            "(above, and torchrun's 'Root Cause') says why") in lines, res.stderr[-4000:]
    assert "[rank1]: Traceback" not in res.stderr and "Connection closed by peer" not in res.stderr
    root = res.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 0 (local_rank: 0)" in root and "no space left on device (made by the test)" in root, root


def test_an_error_is_left_where_torchruns_summary_reads_it(tmp_path, monkeypatch):
    """report_error writes the worker's error file in the format torchrun's own reader takes (its message, and the
    time it names the first failure by); a lost connection is dated a second later, so it is never the root cause."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from timesformer_harness.common import ExitCode, report_error

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    before = int(time.time())
    assert report_error(ValueError("model.pretrained=x.pth does not exist"), ExitCode.CHECKPOINT) == 2
    cause = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert cause.message["extraInfo"]["py_callstack"] == "model.pretrained=x.pth does not exist"
    assert before <= cause.timestamp <= int(time.time())
    report_error(RuntimeError("gloo"), ExitCode.PEER_STOPPED, message="rank 1 lost its connection")
    effect = ProcessFailure(local_rank=1, pid=2, exitcode=6, error_file=str(error_file))
    assert effect.message["message"] == "rank 1 lost its connection" and effect.timestamp > cause.timestamp
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    error_file.unlink()
    report_error(ValueError("outside torchrun"), ExitCode.CONFIG)
    assert not error_file.exists()


def test_deterministic_mode_repeats_a_run_bit_for_bit(tmp_path):
    """train.deterministic=true: two runs of the same config (synthetic clips; mixup/cutmix, label smoothing,
    clipping and drop-path all drawing random numbers) end with identical weights."""
    common = ["--config", "configs/model/tiny.yaml", "data.loader=synthetic", "data.num_frames=4",
              "data.train_crop_size=32", "data.batch_size=4", "data.synthetic_videos=16", "solver.max_epoch=2",
              "solver.global_batch_size=8", "solver.mixup_alpha=0.8", "solver.cutmix_alpha=1.0",
              "solver.label_smoothing=0.1", "solver.grad_clip=1.0", "model.drop_path_rate=0.2",
              "train.eval_period=0", "train.log_period=1", "train.deterministic=true", "output.tensorboard=false"]
    runs, losses = [], []
    for name in ("a", "b"):
        res = run(train_cmd(*common, f"output.dir={tmp_path / name}"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "deterministic algorithms on" in res.stderr
        runs.append(final_weights(tmp_path / name))
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["train/loss"] for r in records if r["event"] == "train"])
        assert records[-1]["event"] == "end" and records[-1]["step"] == 4  # 16 clips / 8 per step x 2 epochs
    a, b = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses[0] == losses[1] and len(losses[0]) == 4


def _val_top1(metrics: Path) -> list[float]:
    """The val top-1 of every complete validation record written so far (the file may end mid-line)."""
    found = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "val":
            found.append(record["val/top1"])
    return found


@pytest.mark.slow
def test_toy_recipe_divided_learns_the_frame_order(tmp_path: Path) -> None:
    """The embedded default end to end: the real toy dataset and configs/exp/toy_divided_cpu.yaml through the DALI
    CPU loader. Divided attention reaches >= 90% val top-1 (measured: 83% at epoch 4, 94% at epoch 6 of 40):
    the run validates every 2 epochs, is watched and stopped with SIGTERM (it saves and exits 143) after the first
    validation at or above 90%, so the test pays for the epochs the recipe needs, not all 40. Space-only attention,
    the control, cannot learn the order at all: ``test_space_only_cannot_see_the_frame_order`` proves it."""
    from timesformer_harness.pipelines.tools.toy import generate

    generate(tmp_path / "toy")
    divided = tmp_path / "divided_space_time"
    cmd = train_cmd("--config", "configs/exp/toy_divided_cpu.yaml", f"data.root={tmp_path / 'toy'}",
                    "data.validate_cache=none", "output.tensorboard=false", "train.eval_period=2",
                    f"output.dir={divided}")
    env = {**os.environ, "OMP_NUM_THREADS": str(min(2, os.cpu_count() or 1)), "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "divided.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 1500
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(2)
                if max(_val_top1(divided / "metrics.jsonl"), default=0.0) >= 90.0:
                    proc.send_signal(signal.SIGTERM)
                    break
            returncode = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (tmp_path / "divided.log").read_text()
    assert returncode == 143, output[-3000:]
    top1 = _val_top1(divided / "metrics.jsonl")
    print(f"toy val top-1 per validation (every 2 epochs): {top1}")
    assert max(top1) >= 90.0, top1


def test_space_only_cannot_see_the_frame_order(tmp_path: Path) -> None:
    """Why space-only attention stays at chance on the toy set (its six classes are the six orders of three colours):
    whatever its weights, its logits for a real toy clip are the same with the frames reversed or rotated, so no
    training can tell one order from another (it has no time embedding, attends within each frame and averages the
    frames' CLS tokens). Divided attention, built the same way, gives other logits for the reordered clips (measured:
    1e-3 apart, at initialisation)."""
    import av

    from timesformer_harness.pipelines.tools.toy import ToySpec, generate

    generate(tmp_path / "toy", ToySpec(train=6, val=6, test=0), workers=1)
    clips = []
    for line in (tmp_path / "toy" / "val.csv").read_text().split("\n")[:3]:
        with av.open(str(tmp_path / "toy" / line.split()[0])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        clip = torch.from_numpy(np.stack(frames[::3][:8])).float().div(255)  # the recipe's 8 x rate 3: (T, H, W, C)
        clips.append(clip.permute(3, 0, 1, 2))
    video = torch.stack(clips)  # (3, C, 8, 32, 32)
    reordered = [video.flip(2), video.roll(3, dims=2)]
    logits = {}
    recipe = load_config(REPO / "configs/exp/toy_divided_cpu.yaml").model  # the model make train builds
    for attention_type in ("space_only", "divided_space_time"):
        torch.manual_seed(0)
        model = create_model(recipe, attention_type=attention_type).eval()
        with torch.no_grad():
            logits[attention_type] = [model(v) for v in (video, *reordered)]
    same, *others = logits["space_only"]
    for other in others:
        torch.testing.assert_close(other, same, rtol=0, atol=1e-6)  # float rounding only (measured: 4e-8)
    same, *others = logits["divided_space_time"]
    moved = [float((other - same).abs().max()) for other in others]
    assert min(moved) > 1e-4, f"the control: divided attention's logits move {moved} when the frames move"


def test_memory_is_logged_per_window_and_validation_apart(tmp_path, monkeypatch):
    """Each train record's peak is that window's (not a running maximum), and validation's peak is logged on its
    own: a 320 MiB buffer touched during validation shows in the val record only (CPU: the process's peak RSS)."""
    import numpy as np

    import timesformer_harness.train as train_module
    from timesformer_harness.config import load_config
    from timesformer_harness.distributed import init_distributed
    from timesformer_harness.metrics import PeakMemory

    if not PeakMemory("cpu").kind:
        pytest.skip("/proc/self/clear_refs cannot be written here")
    real_score = train_module.score_loader

    def score_with_a_big_buffer(*args, **kwargs):
        big = np.ones(320 * 2**20 // 8)
        try:
            return real_score(*args, **kwargs)
        finally:
            del big

    monkeypatch.setattr(train_module, "score_loader", score_with_a_big_buffer)
    cfg = load_config("configs/model/tiny.yaml", [
        "data.loader=synthetic", "data.num_frames=4", "data.train_crop_size=32", "data.test_crop_size=32",
        "data.batch_size=4", "data.synthetic_videos=16", "data.num_ensemble_views=1", "data.num_spatial_crops=1",
        "test.batch_size=4", "solver.max_epoch=2", "solver.global_batch_size=0", "train.eval_period=1",
        "train.log_period=2", "train.warmup_steps=0", f"output.dir={tmp_path}", "output.tensorboard=false"])
    assert train_module.Trainer(cfg, init_distributed(cfg.dist)).fit() == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["memory/peak_rss_gib"] for r in records if r["event"] == "train"]
    val = [r["memory/val_peak_rss_gib"] for r in records if r["event"] == "val"]
    assert len(train) == 4 and len(val) == 2  # 2 windows of 2 steps per epoch; validation after each epoch
    assert min(val) - max(train) > 0.25, (train, val)


def test_warm_up_steps_are_a_window_of_their_own_and_left_out_of_the_steady_rate(tmp_path):
    """Each epoch's first ``train.warmup_steps`` optimizer steps are logged as a window marked ``time/warmup``; the
    end record's steady clips/s is the clips of the other windows over their time."""
    from timesformer_harness.config import load_config
    from timesformer_harness.distributed import init_distributed
    from timesformer_harness.train import Trainer

    cfg = load_config("configs/model/tiny.yaml", [
        "data.loader=synthetic", "data.num_frames=4", "data.train_crop_size=32", "data.batch_size=2",
        "data.synthetic_videos=10", "solver.max_epoch=2", "solver.global_batch_size=0", "train.eval_period=0",
        "train.log_period=2", "train.warmup_steps=1", f"output.dir={tmp_path}", "output.tensorboard=false"])
    assert Trainer(cfg, init_distributed(cfg.dist)).fit() == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    # 5 steps per epoch, logged every 2 global steps: epoch 1 = [1 warm-up] [2] [3, 4] [5]; epoch 2 = [6 warm-up]
    # [7, 8] [9, 10]
    assert [(r["epoch"], r["step"], r["time/warmup"]) for r in train] == [
        (1, 1, True), (1, 2, False), (1, 4, False), (1, 5, False), (2, 6, True), (2, 8, False), (2, 10, False)]
    steady = [r for r in train if not r["time/warmup"]]
    steps = [2 - 1, 4 - 2, 5 - 4, 8 - 6, 10 - 8]
    seconds = sum(n * 2 / r["time/clips_per_s"] for n, r in zip(steps, steady))
    end = next(r for r in records if r["event"] == "end")
    assert end["time/steady_clips_per_s"] == pytest.approx(2 * sum(steps) / seconds, rel=1e-6)


def test_sync_counter_counts_reads_of_device_values_on_cpu() -> None:
    from timesformer_harness.counting import SyncCounter

    x = torch.ones(3)
    with SyncCounter(torch.device("cpu")) as syncs:
        for _ in range(3):
            x.sum().item()
        x * 2
    assert syncs.count == 3
    # an output whose size depends on the values: the host waits for them to allocate it (on a GPU, a sync)
    with SyncCounter(torch.device("cpu")) as syncs:
        x[x > 0].sum()
        torch.unique(x)
        x.nonzero()
    assert syncs.count == 3


def test_count_syncs_logs_each_micro_batchs_syncs(tmp_path):
    """``train.count_syncs``: the train records carry the syncs per micro-batch (on CPU the aten reads; none in the
    step loop), every micro-batch but the warm-up ones and each epoch's last counted."""
    from timesformer_harness.config import load_config
    from timesformer_harness.distributed import init_distributed
    from timesformer_harness.train import Trainer

    cfg = load_config("configs/model/tiny.yaml", [
        "data.loader=synthetic", "data.num_frames=4", "data.train_crop_size=32", "data.batch_size=2",
        "data.synthetic_videos=12", "solver.global_batch_size=4", "solver.max_epoch=1", "train.log_period=1",
        "train.eval_period=0", "train.count_syncs=true", f"output.dir={tmp_path}", "output.tensorboard=false"])
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    assert trainer.fit() == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    counted = [r for r in records if "debug/syncs_per_micro_batch" in r]
    # 6 micro-batches, 2 per step: the warm-up step's 2 and the last are not counted, 2 windows hold the other 3
    assert len(counted) == 2 and all(r["debug/syncs_per_micro_batch_max"] == 0 for r in counted), counted
    assert not any(r["time/warmup"] for r in counted)
    assert trainer.hooks.syncs is None  # stopped at the end of the run


def test_sync_counts_leave_out_warm_up_micro_batches_and_each_epochs_last(tmp_path):
    """What ``on_batch`` attributes to each micro-batch: the syncs from its batch to the next one of the same epoch,
    none for a warm-up micro-batch (the first step's one-time copies, such as stochastic depth's keep
    probabilities reaching the GPU) or for an epoch's last."""
    from timesformer_harness.config import TrainConfig
    from timesformer_harness.train_hooks import DebugHooks

    hooks = DebugHooks(TrainConfig(count_syncs=True), tmp_path, rank=0)
    syncs = hooks.syncs
    hooks.syncs = SimpleNamespace(count=0)
    for epoch, batch_idx, total, warmup in [(0, 0, 0, True), (0, 1, 2, False), (0, 2, 3, False), (0, 3, 4, False),
                                            (1, 0, 9, True), (1, 1, 11, True), (1, 2, 12, False)]:
        hooks.syncs.count = total
        hooks.on_batch(epoch, batch_idx, None, warmup=warmup)
    assert hooks.take_sync_counts() == [1, 1] and hooks.take_sync_counts() == []
    hooks.syncs = syncs
    hooks.close()


def test_the_step_loop_waits_for_the_device_once_per_micro_batch(tmp_path, monkeypatch):
    """A training epoch reads device values only through ``read_back``: once per micro-batch (the all-reduced loss
    and flags), once to agree on the first batch and once for the epoch's totals; no ``.item()`` (an aten
    ``_local_scalar_dense``) anywhere in it. Accuracy is accumulated on the device."""
    from timesformer_harness import train as train_module
    from timesformer_harness.config import load_config
    from timesformer_harness.counting import OpCounter
    from timesformer_harness.distributed import init_distributed

    reads = []
    real_read_back = train_module.read_back
    monkeypatch.setattr(train_module, "read_back", lambda t: reads.append(t.numel()) or real_read_back(t))
    cfg = load_config("configs/model/tiny.yaml", [
        "data.loader=synthetic", "data.num_frames=4", "data.train_crop_size=32", "data.batch_size=2",
        "data.synthetic_videos=12", "solver.global_batch_size=4", "solver.max_epoch=1", "train.log_period=1",
        f"output.dir={tmp_path}", "output.tensorboard=false"])
    trainer = train_module.Trainer(cfg, init_distributed(cfg.dist))
    loader = trainer._build_loader("train", 0)
    reads.clear()  # the ranks' agreement on the run folder's lock, at construction
    # On the CPU a tensor turned into Python values dispatches no op (on a GPU it waits for the device): count them
    conversions: list[str] = []
    for name in ("tolist", "numpy", "cpu"):
        def counted(t, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            if threading.current_thread() is threading.main_thread():  # not the loader's threads
                conversions.append(_name)
            return _real(t, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    for name in ("tensor", "as_tensor"):  # a tensor made on the device from host values: a blocking copy on a GPU
        def made(*args, _real=getattr(torch, name), _name=name, **kwargs):
            if kwargs.get("device") is not None and threading.current_thread() is threading.main_thread():
                conversions.append(f"{_name}(device=)")
            return _real(*args, **kwargs)
        monkeypatch.setattr(torch, name, made)
    with OpCounter() as ops:
        stop, _ = trainer.train_epoch(loader, 0, 0)
    monkeypatch.undo()
    trainer.metrics.close()
    assert not stop and len(loader) == 6 and trainer.step == 3  # 6 micro-batches, 2 per optimizer step
    assert reads == [1] + [3] * 6 + [3], reads  # first-batch agreement, 6 micro-batches, the epoch's totals
    assert ops.count.syncs == 0, ops.count.by_name
    assert conversions == ["tolist"] * len(reads), conversions  # read_back's, and no other
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "epoch" and 0 <= record["train/top1"] <= 100 and record["train/loss"] > 0


def test_a_label_out_of_range_is_named_before_the_first_step(tmp_path):
    """A manifest label >= model.num_classes stops the run while the loader is built, naming the file and line,
    instead of failing inside cross_entropy (on a GPU, an opaque device-side assert)."""
    from timesformer_harness.config import load_config
    from timesformer_harness.distributed import init_distributed
    from timesformer_harness.train import Trainer

    manifest = tmp_path / "train.csv"
    manifest.write_text("".join(f"{p} {label}\n" for p, label in
                                [(REPO / "data/toy/train" / n, i % 6) for i, n in enumerate(
                                    sorted(os.listdir(REPO / "data/toy/train"))[:3])] + [("x.webm", 7)]))
    cfg = load_config("configs/exp/toy_divided_cpu.yaml", [
        f"data.train_manifest={manifest}", "model.num_classes=6", "solver.max_epoch=1", "data.validate_cache=none",
        f"output.dir={tmp_path / 'run'}", "output.tensorboard=false"])
    with pytest.raises(ValueError, match=r"train.csv:4: label 7 is out of range for 6 classes"):
        Trainer(cfg, init_distributed(cfg.dist)).fit()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_train_manifest_is_read_once_at_start(tmp_path, monkeypatch):
    """The start-up check reads the manifests before the run folder is written; the first loaders use what it read
    (a Kinetics manifest is hundreds of thousands of lines), later builds read the file again."""
    from timesformer_harness.config import load_config
    from timesformer_harness.distributed import init_distributed
    from timesformer_harness.pipelines import manifest
    from timesformer_harness.train import Trainer

    reads = []
    real = manifest.read_entries
    monkeypatch.setattr(manifest, "read_entries", lambda path, *a, **k: reads.append(Path(path).name) or
                        real(path, *a, **k))
    cfg = load_config("configs/exp/toy_divided_cpu.yaml", ["train.eval_period=1", "data.validate_cache=none",
                                                            f"output.dir={tmp_path}", "output.tensorboard=false"])
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    trainer._build_loader("train")
    trainer._build_loader("val")
    assert reads == ["train.csv", "val.csv"]
    trainer._build_loader("train")
    assert reads == ["train.csv", "val.csv", "train.csv"]


def test_generator_states_take_the_ranks_own_gpu():
    """A checkpoint keeps each rank's GPU generator, restored onto the GPU the rank has now (ranks can move between
    GPUs across torchrun restarts); on a CPU no GPU state is written, and an older checkpoint's list of every GPU's
    states is read without a GPU."""
    from timesformer_harness.train_state import rng_state, set_rng_state

    state = rng_state(torch.device("cpu"))
    assert "cuda" not in state
    torch.manual_seed(3)
    expected = torch.rand(3)
    set_rng_state({**rng_state(torch.device("cpu")), "cuda": [torch.zeros(16, dtype=torch.uint8)]})  # old format
    torch.manual_seed(3)
    set_rng_state(rng_state(torch.device("cpu")), torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_more_processes_than_gpus_on_a_node_are_refused(monkeypatch):
    """Eight GPUs visible and a ninth process on the node: a clear error, not a second rank on GPU 0 (which NCCL
    refuses later, unclearly). One visible GPU per process (CUDA_VISIBLE_DEVICES per rank) stays allowed."""
    from timesformer_harness.config import DistConfig
    from timesformer_harness.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "8")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 8 but this node shows 8 GPUs: start at most 8 processes per "
                                           r"node \(torchrun --nproc_per_node=8\), one per GPU"):
        init_distributed(DistConfig())


def test_an_epochs_left_over_micro_batches_are_logged_once_with_the_last_steps_lr(tmp_path):
    """7 micro-batches an epoch, 3 per optimizer step: the 7th is left over. It goes into the epoch's last train
    record, logged once at the epoch's end (not a second record at the same step) with the learning rate of the
    last optimizer step that ran, not one of a micro-batch whose gradients were dropped; in TensorBoard the epoch's
    mean loss is its own tag, not a point on the windows' train/loss curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from timesformer_harness.distributed import init_distributed
    from timesformer_harness.train import Trainer

    cfg = load_config("configs/model/tiny.yaml", [
        "data.loader=synthetic", "data.num_frames=4", "data.train_crop_size=32", "data.batch_size=2",
        "data.synthetic_videos=14", "data.synthetic_classes=4", "model.num_classes=4", "solver.global_batch_size=6",
        "solver.max_epoch=2", "solver.lr_policy=cosine", "solver.warmup_epochs=0.5", "train.log_period=1",
        "train.eval_period=0", f"output.dir={tmp_path}"])
    assert Trainer(cfg, init_distributed(cfg.dist)).fit() == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # one record per step: 2 steps an epoch
    epochs = [r for r in records if r["event"] == "epoch"]
    for epoch, (last, record) in enumerate(zip([train[1], train[3]], epochs)):
        used = lr_at(cfg.solver, epoch + 5 / 7)  # the last step's micro-batches are the epoch's 4th to 6th
        assert last["opt/lr"] == pytest.approx(used) and record["lr"] == pytest.approx(used)
        assert used != pytest.approx(lr_at(cfg.solver, epoch + 6 / 7))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(loss) == [1, 2, 3, 4] and loss[2] == pytest.approx(train[1]["train/loss"], rel=1e-6)
    assert [e.step for e in events.Scalars("train/epoch_loss")] == [2, 4]
    assert [e.value for e in events.Scalars("time/warmup")] == [1.0, 0.0, 1.0, 0.0]


def test_a_resume_hides_the_redone_steps_in_tensorboard(tmp_path):
    """A resume redoes the work after its checkpoint: metrics.jsonl drops the records logged after the checkpoint's
    step, and TensorBoard hides its points from then on too (the event files are append-only; the new launch's
    writer purges them), so each step is on the curves once, with the redone run's value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from timesformer_harness.distributed import init_distributed
    from timesformer_harness.train import Trainer

    overrides = [
        "data.loader=synthetic", "data.num_frames=4", "data.train_crop_size=32", "data.batch_size=2",
        "data.synthetic_videos=8", "data.synthetic_classes=4", "model.num_classes=4", "solver.global_batch_size=0",
        "solver.max_epoch=2", "train.log_period=1", "train.eval_period=0", f"output.dir={tmp_path}"]
    cfg = load_config("configs/model/tiny.yaml", overrides)
    assert Trainer(cfg, init_distributed(cfg.dist)).fit() == 0
    (tmp_path / "checkpoints" / "checkpoint_epoch_00002.pyth").unlink()  # as if killed before epoch 2's save
    cfg = load_config("configs/model/tiny.yaml", overrides + ["solver.base_lr=0.5"])  # the redone steps differ
    assert Trainer(cfg, init_distributed(cfg.dist)).fit() == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["train/loss"] for r in records if r["event"] == "train"}
    assert sorted(train) == [1, 2, 3, 4, 5, 6, 7, 8]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in loss] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(value == pytest.approx(train[step], rel=1e-6) for step, value in loss)
    assert [e.step for e in events.Scalars("train/epoch_loss")] == [4, 8]


def test_resuming_a_run_of_videos_with_the_synthetic_loader_is_refused(toy, tmp_path):
    """The synthetic loader reads no files, so it has no data fingerprint: a resume that switched a run of videos to
    it had gone on training that model on random clips, with only the changed-config warning. It is a change of the
    train data like an edited manifest: refused (exit 4) naming the loader, or gone on with under replan."""
    out = tmp_path / "run"
    args = [*toy, f"output.dir={out}"]
    first = run(train_cmd(*args, "train.debug_signal_at_step=2"))
    assert first.returncode == 143 and "stopped by SIGTERM" in first.stdout, first.stderr[-3000:]
    synthetic = ["data.loader=synthetic", "data.synthetic_classes=2"]
    refused = run(train_cmd(*args, *synthetic))
    assert refused.returncode == 4, refused.stderr[-3000:]
    saved = out / "checkpoints" / "checkpoint_epoch_00001_step_00000003.pyth"
    assert (f"error: the train data changed since {saved} (32 usable videos when {saved.name} was written, none now: "
            "data.loader=synthetic reads no videos)") in refused.stderr, refused.stderr[-3000:]
    assert "Put data.loader back" in refused.stderr and "Traceback" not in refused.stderr
    assert list_checkpoints(out / "checkpoints") == [saved]
