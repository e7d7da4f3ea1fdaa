"""A newcomer's ordinary mistakes, in real processes: one ``error:`` line on stderr with the exit status of
``timesformer_harness.common.ExitCode`` and no traceback (``--debug`` / ``TIMESFORMER_DEBUG=1`` show it); inputs
checked before the run folder is written; a config kept per launch and a dated ``train.log``; ``defaults:`` from a
config outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from test_train import PY, REPO, TINY, train_cmd
from timesformer_harness.common import ExitCode
from timesformer_harness.config import ConfigError, load_config

FAST = ["solver.max_epoch=1", "train.max_steps_per_epoch=1", "train.eval_period=0"]
EVALUATE = [PY, "harness/evaluate.py"]


def run(cmd: list[str], cwd: Path = REPO, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TIMESFORMER_DEBUG"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180, env=env)


def error_line(res: subprocess.CompletedProcess) -> str:
    """The ``error:`` line, checked to be stderr's only one, its last, with no traceback before it."""
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], res.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """TINY plus ``data.root`` of a toy set of 8 train, 2 val and 2 test VP9 clips, and one optimizer step."""
    from timesformer_harness.pipelines.tools.toy import ToySpec, generate

    root = tmp_path_factory.mktemp("toy")
    generate(root, ToySpec(frames=16, train=8, val=2, test=2), workers=1)
    return [*TINY, f"data.root={root}", *FAST]


def test_a_config_typo_is_one_line_with_the_config_status(tmp_path):
    for cmd in (train_cmd(*TINY, "solver.base_lrr=0.1", f"output.dir={tmp_path}/run"),
                [*EVALUATE, *TINY, "solver.base_lrr=0.1", f"output.dir={tmp_path}/run"]):
        res = run(cmd)
        assert res.returncode == ExitCode.CONFIG == 5
        assert res.stderr.strip() == ("error: unknown config key 'solver.base_lrr' in command-line overrides; did "
                                      "you mean 'solver.base_lr'?")
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_utf8_or_is_a_folder_is_one_line_with_the_config_status(tmp_path):
    """Was a UnicodeDecodeError traceback (exit 1), and "does not exist" for a folder."""
    (tmp_path / "b.yaml").write_bytes(b"\xff\xfe garbage")
    res = run(train_cmd("--config", str(tmp_path / "b.yaml")))
    assert res.returncode == ExitCode.CONFIG, res.stderr[-3000:]
    assert error_line(res) == (f"error: config {tmp_path}/b.yaml is not UTF-8 text (byte 0: invalid start byte); "
                               "save it as UTF-8")
    res = run(train_cmd("--config", str(tmp_path)))
    assert res.returncode == ExitCode.CONFIG, res.stderr[-3000:]
    assert error_line(res) == (f"error: config {tmp_path} is a folder, not a config file; name the YAML file, e.g. "
                               f"{tmp_path}/b.yaml")


def test_a_bad_value_in_a_config_file_names_the_file_and_the_choices(tmp_path):
    my = tmp_path / "my.yaml"
    my.write_text("defaults: [configs/model/tiny.yaml]\ndata:\n  loader: dali2\n")
    res = run(train_cmd("--config", str(my), f"output.dir={tmp_path}/run"))
    assert res.returncode == ExitCode.CONFIG
    assert res.stderr.strip() == f"error: {my}: data.loader='dali2'; choose from ['auto', 'dali', 'pyav', 'synthetic']"
    res = run(train_cmd("--config", str(my), "model.depth=two"))  # a value omegaconf cannot convert
    assert error_line(res) == ("error: command-line overrides: model.depth: Value 'two' of type 'str' could not be "
                               "converted to Integer; give a value like the default, model.depth=12")
    for debug in (run(train_cmd("--config", str(my)), TIMESFORMER_DEBUG="1"), run(train_cmd("--config", str(my),
                                                                                               "--debug"))):
        assert debug.returncode == ExitCode.CONFIG
        assert "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1].startswith(f"error: {my}: data.loader='dali2'")


@pytest.mark.parametrize("mistake", ["data_root", "empty_manifest", "label_out_of_range", "synthetic_labels",
                                     "jitter_below_crop"])
def test_data_mistakes_fail_before_the_run_folder_is_written(mistake, tiny, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    if mistake == "data_root":
        args, expected = [f"data.root={tmp_path}/nope"], (f"error: manifest {tmp_path}/nope/train.csv does not exist: "
                                                          f"set data.root (now '{tmp_path}/nope'; a relative path is "
                                                          f"from the current folder, {REPO}) or data.train_manifest")
    elif mistake == "empty_manifest":
        (root / "train.csv").write_text("\n")
        args, expected = [f"data.root={root}"], f"error: manifest {root}/train.csv lists no videos"
    elif mistake == "jitter_below_crop":  # every train crop would be the whole frame squeezed square
        args, expected = ["data.train_jitter_scales=[24,28]"], (
            "error: data.train_jitter_scales=[24, 28] starts below data.train_crop_size=32: a train clip's short side "
            "is resized into that range and then cropped, so the range must start at the crop or above (the "
            "recipes: [256, 320] for 224, [448, 512] for 448); e.g. data.train_jitter_scales=[32, 37]")
    elif mistake == "synthetic_labels":  # the synthetic loader's labels are checked like a manifest's
        args, expected = ["data.loader=synthetic"], ("error: data.synthetic_classes=10 draws labels 0..9, out of range "
                                                     "for model.num_classes=6: set data.synthetic_classes=6 (or fewer)")
    else:
        toy_root = next(a for a in tiny if a.startswith("data.root=")).split("=", 1)[1]
        first = (Path(toy_root) / "train.csv").read_text().splitlines()[0].rsplit(" ", 1)[0]
        (root / "train.csv").write_text(f"{Path(toy_root) / first} 7\n")
        args, expected = [f"data.root={root}"], (f"error: {root}/train.csv:1: label 7 is out of range for 6 classes "
                                                 f"(model.num_classes): labels are 0..5; fix the manifest, or set "
                                                 f"model.num_classes")
    res = run(train_cmd(*tiny, *args, f"output.dir={tmp_path}/run"))
    assert res.returncode == ExitCode.CONFIG
    assert error_line(res) == expected
    assert not (tmp_path / "run").exists()  # no config.yaml, metrics.jsonl, tb/ or lock


@pytest.mark.parametrize("section", ["model", "data"])
def test_sizes_larger_than_the_machine_are_refused_before_any_allocation(section, tiny, tmp_path):
    """model.num_frames or data.num_frames set far too large (a typo: 80000000 for 8): the model's weights or one
    batch would be larger than all of this machine's memory. One error line naming the sizes, exit 5, no run folder
    (it was an allocator's traceback, after the run folder was written)."""
    from timesformer_harness.common import host_memory_bytes

    memory = host_memory_bytes()
    if section == "model":  # time_embed: frames x embed_dim (64) fp32 values
        frames = memory // (64 * 4) + 1
        expected = (r"error: the model's weights \([\d,]+ parameters in fp32\): [\d,.]+ GiB, more than the [\d,.]+ GiB "
                    rf"of memory on cpu; the largest is time_embed \[1, {frames}, 64\]; check the sizes \("
                    rf"model.embed_dim=64, model.depth=2, model.num_frames={frames}, ")
    else:  # 4 clips of 3 x frames x 32 x 32 float32
        frames = memory // (4 * 3 * 32 * 32 * 4) + 1
        expected = (rf"error: one train batch \(data.batch_size=4 clips of data.num_frames={frames} frames at "
                    r"data.train_crop_size=32 px, float32\): [\d,.]+ GiB, more than the [\d,.]+ GiB of memory on cpu; "
                    r"lower data.batch_size, data.num_frames or data.train_crop_size$")
    res = run(train_cmd(*tiny, f"{section}.num_frames={frames}", f"output.dir={tmp_path}/run"))
    assert res.returncode == ExitCode.CONFIG
    assert re.match(expected, error_line(res)), error_line(res)
    assert not (tmp_path / "run").exists()


def test_an_accumulation_an_epoch_cannot_hold_fails_before_the_run_folder(tiny, tmp_path):
    """The mistake is refused from the manifest's length, before the run folder is written or the weights are read
    (it came after both), so that the corrected command runs under ``train.resume=never``."""
    out = tmp_path / "run"
    res = run(train_cmd(*tiny, "solver.global_batch_size=64", f"output.dir={out}"))
    assert res.returncode == ExitCode.CONFIG
    assert error_line(res) == ("error: an epoch has 2 batches per rank but one optimizer step needs 16 "
                               "(solver.global_batch_size=64); lower it")
    assert not out.exists()
    fixed = run(train_cmd(*tiny, "train.resume=never", f"output.dir={out}"))
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    # the finished run relaunched with that mistake: nothing left to train, so nothing to refuse
    again = run(train_cmd(*tiny, "solver.global_batch_size=64", f"output.dir={out}"))
    assert again.returncode == 0 and "nothing to do: the run in" in again.stderr, again.stderr[-3000:]


def test_a_missing_pretrained_file_is_a_checkpoint_error_before_the_run_folder(tiny, tmp_path):
    res = run(train_cmd(*tiny, f"model.pretrained={tmp_path}/nope.pyth", f"output.dir={tmp_path}/run"))
    assert res.returncode == ExitCode.CHECKPOINT == 2
    assert error_line(res).startswith(f"error: model.pretrained={tmp_path}/nope.pyth does not exist")
    assert not (tmp_path / "run").exists()
    res = run([*EVALUATE, *tiny, f"output.dir={tmp_path}/run"])  # no --checkpoint, and none in the run folder
    assert res.returncode == ExitCode.CHECKPOINT
    assert error_line(res) == (f"error: no checkpoint given (--checkpoint or test.checkpoint=...) and none in "
                               f"{tmp_path}/run/checkpoints")


def test_evaluating_a_damaged_newest_checkpoint_names_the_one_before_it(tiny, tmp_path):
    """With no checkpoint named, evaluate takes the newest in the run folder: when that one is damaged (a copy cut
    short) the error says it was chosen, not given, and which one to give instead."""
    out = tmp_path / "run"
    res = run(train_cmd(*tiny, "solver.max_epoch=2", f"output.dir={out}"))
    assert res.returncode == 0, res.stderr[-3000:]
    folder = out / "checkpoints"
    newest, before = folder / "checkpoint_epoch_00002.pyth", folder / "checkpoint_epoch_00001.pyth"
    newest.write_bytes(newest.read_bytes()[:50_000])
    res = run([*EVALUATE, *tiny, f"output.dir={out}"])
    assert res.returncode == ExitCode.CHECKPOINT
    assert error_line(res) == (f"error: {newest} is not a torch checkpoint: a truncated or damaged zip archive (the "
                               f"newest checkpoint in {folder}, evaluated as none was given: give --checkpoint "
                               f"{before} to evaluate the one before it, or rerun the training, which sets an "
                               "unreadable newest checkpoint aside)")
    res = run([*EVALUATE, *tiny, f"output.dir={out}", "--checkpoint", str(newest)])  # named: no such advice
    assert error_line(res) == f"error: {newest} is not a torch checkpoint: a truncated or damaged zip archive"
    res = run([*EVALUATE, *tiny, f"output.dir={out}", "--checkpoint", str(before)])
    assert res.returncode == 0, res.stderr[-3000:]


def test_each_launch_keeps_its_config_and_the_run_keeps_a_dated_log(tiny, tmp_path):
    run_dir = tmp_path / "run"
    for epochs in (1, 2):  # the second launch resumes the first's run for one more epoch
        res = run(train_cmd(*tiny, f"solver.max_epoch={epochs}", f"output.dir={run_dir}"))
        assert res.returncode == 0, res.stderr[-3000:]
    configs = sorted(p.name for p in run_dir.glob("config*.yaml"))
    assert configs == ["config.1.yaml", "config.2.yaml", "config.yaml"]
    epochs = {name: yaml.safe_load((run_dir / name).read_text())["solver"]["max_epoch"] for name in configs}
    assert epochs == {"config.1.yaml": 1, "config.2.yaml": 2, "config.yaml": 2}
    log = (run_dir / "train.log").read_text().splitlines()
    assert log and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", line) for line in log
                       if not line.startswith(" ")), log[:5]
    assert sum("launch 1 in" in line for line in log) == sum("launch 2 in" in line for line in log) == 1
    assert any("resumed from" in line for line in log) and any("training done" in line for line in log)
    # an error after the run folder is taken goes into its log as well as to stderr: weights that do not load
    (tmp_path / "junk.pyth").write_bytes(b"not a checkpoint")
    res = run(train_cmd(*tiny, f"model.pretrained={tmp_path}/junk.pyth", f"output.dir={tmp_path}/bad_weights"))
    assert res.returncode == ExitCode.CHECKPOINT
    line = error_line(res)
    assert "junk.pyth" in line
    last = (tmp_path / "bad_weights" / "train.log").read_text().splitlines()[-1]
    assert last.endswith(f" ERROR timesformer_harness: {line.removeprefix('error: ')}")


def test_defaults_resolve_beside_the_config_then_in_the_shipped_configs(tmp_path):
    (tmp_path / "mine.yaml").write_text("model:\n  depth: 3\n")
    my = tmp_path / "my.yaml"
    my.write_text("defaults: [configs/model/toy.yaml, configs/data/toy.yaml, mine.yaml]\nmodel:\n  num_classes: 3\n")
    cfg = load_config(my)
    shipped = load_config(REPO / "configs/exp/toy_divided_cpu.yaml")
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_classes) == (shipped.model.embed_dim, 3, 3)
    assert cfg.data == load_config(REPO / "configs/data/toy.yaml").data
    other = tmp_path / "elsewhere"
    other.mkdir()
    res = run([PY, str(REPO / "harness/train.py"), "--config", str(my), "data.root=nowhere",
               f"output.dir={tmp_path}/run"], cwd=other)
    assert "configs/model/toy.yaml" not in res.stderr and res.returncode == ExitCode.CONFIG  # found from any folder
    assert "nowhere/train.csv does not exist" in error_line(res)
    my.write_text("defaults: [configs/model/nope.yaml]\n")
    with pytest.raises(ConfigError, match=rf"defaults entry 'configs/model/nope.yaml' of {my}: does not exist: "
                                          rf"looked for {tmp_path}/configs/model/nope.yaml and "
                                          rf"{REPO}/configs/model/nope.yaml"):
        load_config(my)
    my.write_text("defaults: [configs/model]\n")  # a folder: named for what it is
    with pytest.raises(ConfigError, match=rf"defaults entry 'configs/model' of {my}: {REPO}/configs/model is a "
                                          rf"folder, not a config file: looked for "):
        load_config(my)


def test_ctrl_c_while_the_run_starts_is_interrupted_not_a_traceback(monkeypatch, capsys, tmp_path):
    import timesformer_harness.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what SIGINT raises before fit() installs its own handler

    monkeypatch.setattr(train_module, "Trainer", interrupted)
    # main's malloc policy is process-wide: it would keep freed memory in this test worker and change what later
    # tests' peak-RSS windows read
    monkeypatch.setattr(train_module, "retain_freed_memory", lambda: False)
    assert train_module.main([*TINY, f"output.dir={tmp_path}/run"]) == ExitCode.INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("error: interrupted before training started (no checkpoint; the "
                                            "pre-flight check's cache keeps the videos it checked): rerun the command")
    assert "Traceback" not in err
