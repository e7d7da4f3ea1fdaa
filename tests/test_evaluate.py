"""timesformer_harness.evaluate: view ensembling (sum / softmax_mean / max), merging across ranks, the accuracy report,
and the CLI on a checkpoint written in the original .pyth layout."""

from __future__ import annotations

import collections
import csv
import json
import logging
import re
from pathlib import Path

import matplotlib.image
import pytest
import torch

from timesformer_harness.checkpoint import convert, save_pyth
from timesformer_harness.evaluate import ViewAccumulator, accuracy_report, with_progress
from timesformer_harness.pipelines.base import Batch
from timesformer_harness.model import create_model
from test_train import PY, run, toy, train_cmd  # noqa: F401 (toy is a fixture)


def _views() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two videos x two views, three classes. Video 0 (label 2): view logits favour 0 once and 2 once."""
    logits = torch.tensor([[3.0, 0.0, 2.5], [0.0, 0.0, 2.0], [0.0, 5.0, 0.0], [0.0, 4.0, 0.0]])
    return logits, torch.tensor([2, 2, 1, 1]), torch.tensor([0, 0, 1, 1])


def test_sum_ensemble_adds_raw_logits_like_the_original():
    acc = ViewAccumulator("sum")
    acc.add(*_views())
    assert torch.equal(acc.scores[0], torch.tensor([3.0, 0.0, 4.5]))
    assert acc.views == {0: 2, 1: 2}
    report = accuracy_report(acc, num_classes=3, views_per_video=2)
    assert (report["top1"], report["num_videos"], report["videos_with_wrong_view_count"]) == (100.0, 2, 0)
    assert report["per_class_top1"] == {"0": None, "1": 100.0, "2": 100.0}


def test_softmax_mean_and_max_can_disagree_with_sum():
    logits, labels, index = _views()
    mx = ViewAccumulator("max")
    mx.add(logits, labels, index)
    assert torch.equal(mx.scores[0], torch.tensor([3.0, 0.0, 2.5]))  # element-wise max picks class 0: wrong
    assert accuracy_report(mx, 3)["top1"] == 50.0
    sm = ViewAccumulator("softmax_mean")
    sm.add(logits, labels, index)
    assert torch.allclose(sm.scores[1], logits[2:].softmax(-1).sum(0))


def test_views_split_across_ranks_merge_to_the_same_scores():
    logits, labels, index = _views()
    whole = ViewAccumulator("sum")
    whole.add(logits, labels, index)
    r0, r1 = ViewAccumulator("sum"), ViewAccumulator("sum")
    r0.add(logits[::2], labels[::2], index[::2])
    r1.add(logits[1::2], labels[1::2], index[1::2])
    merged = r0.merge([ViewAccumulator.from_state(r1.state())])
    assert merged.views == whole.views and all(torch.equal(merged.scores[i], whole.scores[i]) for i in (0, 1))


def test_top5_and_missing_views_are_reported():
    acc = ViewAccumulator("sum")
    logits = torch.arange(7.0).repeat(3, 1)  # ranks classes 6, 5, 4, 3, 2 first
    acc.add(logits, torch.tensor([6, 2, 0]), torch.tensor([0, 1, 2]))
    report = accuracy_report(acc, num_classes=7, views_per_video=3)
    assert report["top1"] == pytest.approx(33.33) and report["top5"] == pytest.approx(66.67)
    assert report["videos_with_wrong_view_count"] == 3


def test_top5_of_5_classes_or_fewer_is_none_and_the_class_mean_is_of_exact_values():
    """With 5 classes or fewer every label is among the top 5: the figure would be 100% for any model. The mean class
    accuracy averages the exact per-class values (it had averaged the rounded ones: 44.45 for 0, 2/3, 2/3)."""
    acc = ViewAccumulator("sum")
    labels = torch.tensor([0, 1, 1, 1, 2, 2, 2])
    predicted = torch.tensor([1, 1, 1, 0, 2, 2, 0])
    acc.add(torch.nn.functional.one_hot(predicted, 3).float(), labels, torch.arange(7))
    report = accuracy_report(acc, num_classes=3, views_per_video=1)
    assert report["top5"] is None and report["per_class_top1"] == {"0": 0.0, "1": 66.67, "2": 66.67}
    assert report["mean_class_accuracy"] == 44.44


def test_nothing_scored_because_every_view_failed_is_a_bad_video_error():
    from timesformer_harness.pipelines.quarantine import BadVideoError

    acc = ViewAccumulator("sum")
    acc.unscored = [{"index": 0, "path": "a.webm", "view": v, "reason": "DALI: broken frame"} for v in range(3)]
    with pytest.raises(BadVideoError, match=r"every view failed to decode \(3 views\), so there is nothing to score, "
                                            r"e\.g\. a\.webm: DALI: broken frame; fix or remove those videos"):
        accuracy_report(acc, num_classes=7)
    with pytest.raises(ValueError, match="no predictions to score"):  # no view at all: not a decoding failure
        accuracy_report(ViewAccumulator("sum"), num_classes=7)


def test_mixed_labels_for_one_video_are_an_error():
    acc = ViewAccumulator("sum")
    with pytest.raises(ValueError, match="video 0 has views with labels 1 and 2"):
        acc.add(torch.zeros(2, 3), torch.tensor([1, 2]), torch.tensor([0, 0]))


def test_evaluate_cli_on_an_original_format_pyth(toy, tmp_path):
    """A file with exactly the original keys (epoch, model_state with `model.`, optimizer_state, cfg string)."""
    model = create_model("tiny", num_classes=6)
    state = collections.OrderedDict((f"model.{k}", v) for k, v in model.state_dict().items())
    original = {"epoch": 14, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []},
                "cfg": "TRAIN:\n  BATCH_SIZE: 8\nTIMESFORMER:\n  ATTENTION_TYPE: divided_space_time\n"}
    ckpt = tmp_path / "TimeSformer_tiny.pyth"
    torch.save(original, ckpt)
    out = tmp_path / "result.json"
    res = run([PY, "harness/evaluate.py", *toy, "data.num_spatial_crops=3", "data.num_ensemble_views=2", f"output.dir={tmp_path}",
               "--checkpoint", str(ckpt), f"test.output={out}", "test.split=test"])
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["checkpoint_format"] == "pyth" and result["views_per_video"] == 6
    assert result["split"] == "test" and result["manifest"].endswith("/test.csv")
    assert result["videos_with_wrong_view_count"] == 0 and result["num_videos"] == 8
    assert result["views_seen"] == 8 * 6 and len(result["per_class_top1"]) == 6
    assert {"top1", "top5", "per_class_top1", "mean_class_accuracy", "environment"} <= set(result)
    assert "top-1" in res.stdout
    # a checkpoint of another class count is not the configured model: refused, not scored with a random head
    other = tmp_path / "other.json"
    res = run([PY, "harness/evaluate.py", *toy, f"output.dir={tmp_path}", "model.num_classes=10",
               "--checkpoint", str(ckpt), f"test.output={other}"])
    assert res.returncode == 2 and not other.exists(), res.stderr[-3000:]
    assert "shape mismatch head.weight: file [6, " in res.stderr and "model [10, " in res.stderr


def test_a_checkpoint_trained_as_another_model_of_the_same_shapes_is_refused(toy, tmp_path):
    """Our checkpoints carry their config: one trained with 2 heads loads into a 4-head model (the same tensors) but
    computes another function, so it is refused naming the key; another frame count is evaluated, with a warning."""
    from timesformer_harness.config import load_config, to_yaml

    args = [a for a in toy if a != "--config" and not a.endswith(".yaml")]
    trained = load_config("configs/model/tiny.yaml", [*args, "model.num_heads=2"])
    ckpt = tmp_path / "two_heads.pyth"
    save_pyth(ckpt, create_model("tiny", num_classes=6, num_heads=2), None, epoch=0, cfg_yaml=to_yaml(trained))
    res = run([PY, "harness/evaluate.py", *toy, f"output.dir={tmp_path}", "--checkpoint", str(ckpt),
               f"test.output={tmp_path / 'r.json'}"])
    assert res.returncode == 2 and not (tmp_path / "r.json").exists(), res.stderr[-3000:]
    assert "was trained as another model than the configured one: model.num_heads 2 -> 4" in res.stderr
    res = run([PY, "harness/evaluate.py", *toy, "model.num_heads=2", "model.num_frames=8", "data.num_frames=8",
               "data.sampling_rate=2", f"output.dir={tmp_path}", "--checkpoint", str(ckpt),
               f"test.output={tmp_path / 'r.json'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "was trained with other clips: model.num_frames 4 -> 8" in res.stderr
    assert "is evaluated on other clips than it was trained with: data.num_frames 4 -> 8, data.sampling_rate 3 -> 2; " \
           "its score is of these clips" in res.stderr
    # weights that do not fit: the keys of its config that differ, not only the shapes
    res = run([PY, "harness/evaluate.py", *toy, "model.num_heads=2", "model.num_classes=8", f"output.dir={tmp_path}",
               "--checkpoint", str(ckpt), f"test.output={tmp_path / 'r8.json'}"])
    assert res.returncode == 2 and not (tmp_path / "r8.json").exists(), res.stderr[-3000:]
    assert "was trained as another model than the configured one: model.num_classes 6 -> 8" in res.stderr


def test_dump_predictions_confusion_matrix_and_progress_from_a_snapshot_folder(toy, tmp_path):
    """--dump on the toy test split, with the same weights as a .pyth and as a Hugging Face snapshot folder written by
    convert --hf: the same predictions both ways, rows that match the manifest, a confusion matrix that adds up, a
    real PNG beside the dump, and progress lines in the piped stderr."""
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=6)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)  # predictions that differ between videos
    ckpt = tmp_path / "tiny.pyth"
    save_pyth(ckpt, model, epoch=3, cfg_yaml="model:\n  num_heads: 4\n")  # the head count config.json records
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    convert(ckpt, snapshot / "model.safetensors", hf=True, weights_only=True)
    root = Path(next(a for a in toy if a.startswith("data.root=")).split("=", 1)[1])
    views = ["data.num_spatial_crops=3", "data.num_ensemble_views=2", "test.split=test", f"output.dir={tmp_path}"]
    results = {}
    dumps = {"csv": tmp_path / "preds.csv", "jsonl": tmp_path / "new_folder" / "preds.jsonl"}  # a folder it makes
    for name, weights in (("csv", snapshot), ("jsonl", ckpt)):
        res = run([PY, "harness/evaluate.py", *toy, *views, "--checkpoint", str(weights), "--dump", str(dumps[name]),
                   f"test.output={tmp_path / f'{name}.json'}"])
        assert res.returncode == 0, res.stderr[-3000:]
        results[name] = (json.loads((tmp_path / f"{name}.json").read_text()), res.stderr)
    with open(tmp_path / "preds.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    json_rows = [json.loads(line) for line in dumps["jsonl"].read_text().splitlines()]
    # The same weights give the same rows, whichever file held them and whichever format the rows went to.
    assert [(int(r["index"]), r["path"], int(r["pred"]), [int(c) for c in r["top5"].split()],
             [float(p) for p in r["top5_prob"].split()]) for r in csv_rows] == \
        [(r["index"], r["path"], r["pred"], r["top5"], r["top5_prob"]) for r in json_rows]
    manifest = [line.rsplit(" ", 1) for line in (root / "test.csv").read_text().splitlines()]
    names = (root / "classes.txt").read_text().split("\n")
    assert [(Path(r["path"]).relative_to(root).as_posix(), r["label"]) for r in json_rows] == \
        [(path, int(label)) for path, label in manifest]
    for r in json_rows:
        assert r["views"] == 6 and len(r["top5"]) == 5 and r["pred"] == r["top5"][0]
        assert r["top5_prob"] == sorted(r["top5_prob"], reverse=True) and 0 < sum(r["top5_prob"]) <= 1.000001
        assert (r["label_name"], r["pred_name"], r["correct"]) == (names[r["label"]], names[r["pred"]],
                                                                   r["pred"] == r["label"])
    result, stderr = results["csv"]
    assert results["jsonl"][0]["confusion_matrix"] == result["confusion_matrix"]
    matrix = result["confusion_matrix"]
    assert len(matrix) == 6 and all(len(row) == 6 for row in matrix)
    expected = collections.Counter((r["label"], r["pred"]) for r in json_rows)
    assert {(t, p): c for t, row in enumerate(matrix) for p, c in enumerate(row) if c} == expected
    assert sum(matrix[c][c] for c in range(6)) == sum(r["correct"] for r in json_rows) == \
        round(result["top1"] * 8 / 100)
    assert result["predictions"] == str(tmp_path / "preds.csv")
    plot = tmp_path / "preds_confusion.png"
    assert result["confusion_plot"] == str(plot)
    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    # Progress in a pipe: log lines, no bar (a run this short ends before the first periodic line), and the total.
    assert len(re.findall(r"evaluate test: 48 clips in [\d.]+ s \([\d.]+ clips/s\)", stderr)) == 1
    assert "\r" not in stderr


def test_class_names_come_from_beside_the_splits_manifest_and_a_bad_list_is_not_used(tmp_path, caplog):
    """classes.txt is read beside the manifest scored: with data.<split>_manifest set elsewhere (data.root left at its
    default, the toy set, whose classes.txt has other names), from that folder; a list with a blank line, too few
    names or a repeated one is refused with a warning (the classes go by number), never shifted or merged."""
    from timesformer_harness.config import load_config
    from timesformer_harness.evaluate import class_names_for

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "test.csv").write_text("a.webm 0\n")
    cfg = load_config(None, ["model.num_classes=3", f"data.test_manifest={mine / 'test.csv'}"])
    assert (Path(cfg.data.root) / "classes.txt").is_file()  # the toy set's: not these videos' names
    assert class_names_for(cfg, "test") is None
    (mine / "classes.txt").write_text("clapping\njumping\nwaving\n")
    assert class_names_for(cfg, "test") == ["clapping", "jumping", "waving"]
    for text, problem in (("\nclapping\njumping\nwaving\n", "4 names for model.num_classes=3"),
                          ("clapping\n\nwaving\n", "line 2 is blank"),
                          ("clapping\njumping\n", "2 names for model.num_classes=3"),
                          ("clap\nclap\nwaving\n", "repeated names ['clap']")):
        (mine / "classes.txt").write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert class_names_for(cfg, "test") is None
        assert f"{mine / 'classes.txt'}: {problem}; classes are reported by number" in caplog.text


def test_an_ssv2_split_names_its_classes_by_the_labels_files_templates(tmp_path):
    """Without a classes.txt, SSv2's labels file names the classes (its templates in id order), when its ids are the
    model's 0..N-1; a classes.txt beside the split JSON still wins."""
    from timesformer_harness.config import load_config
    from timesformer_harness.evaluate import class_names_for

    (tmp_path / "something-something-v2-labels.json").write_text(
        json.dumps({"Pushing something from right to left": "1", "Pushing something from left to right": "0"}))
    (tmp_path / "something-something-v2-validation.json").write_text("[]")
    cfg = load_config(None, ["data.format=ssv2", f"data.root={tmp_path}", "model.num_classes=2"])
    assert class_names_for(cfg, "val") == ["Pushing something from left to right",
                                           "Pushing something from right to left"]
    assert class_names_for(load_config(None, ["data.format=ssv2", f"data.root={tmp_path}", "model.num_classes=3"]),
                           "val") is None  # another class count: by number
    (tmp_path / "classes.txt").write_text("ltr\nrtl\n")
    assert class_names_for(cfg, "val") == ["ltr", "rtl"]


def test_progress_counts_clips_in_log_lines_when_stderr_is_not_a_terminal(caplog):
    class FakeLoader:  # three batches of 4, 4 and 2 clips
        num_clips = 10

        def __iter__(self):
            for n in (4, 4, 2):
                yield Batch(torch.zeros(n, 3, 1, 2, 2), torch.zeros(n, dtype=torch.int64), torch.arange(n))

    caplog.set_level(logging.INFO)
    seen = [b.label.numel() for b in with_progress(FakeLoader(), "evaluate val", interval=0.0)]
    assert seen == [4, 4, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert [re.sub(r", [\d.]+ clips/s.*", "", m) for m in lines[:-1]] == [
        "evaluate val: 4/10 clips (40%)", "evaluate val: 8/10 clips (80%)", "evaluate val: 10/10 clips (100%)"]
    assert re.fullmatch(r"evaluate val: 10 clips in [\d.]+ s \([\d.]+ clips/s\)", lines[-1])


def test_training_validation_reports_its_progress_too(toy, tmp_path):
    res = run(train_cmd(*toy, "solver.max_epoch=1", "train.max_steps_per_epoch=1", "train.eval_period=1",
                        f"output.dir={tmp_path / 'run'}"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(re.findall(r"validate epoch 1: 8 clips in [\d.]+ s \([\d.]+ clips/s\)", res.stderr)) == 1


def test_dump_of_another_suffix_is_refused_before_anything_runs(toy, tmp_path):
    res = run([PY, "harness/evaluate.py", *toy, f"output.dir={tmp_path}", "--checkpoint", str(tmp_path / "none.pyth"),
               "--dump", str(tmp_path / "preds.txt")])
    assert res.returncode == 5 and res.stderr.strip().splitlines() == [
        f"error: --dump {tmp_path / 'preds.txt'}: give a file ending in .csv or .jsonl (the suffix picks the format)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a dump or result in a place that cannot be written: one line before the evaluation (it had been a traceback
    # after it, the result lost)
    afile = tmp_path / "afile"
    afile.write_text("")
    for args, under, what, flag in (
            (["--dump", str(afile / "p.csv")], afile, "it is a file", "--dump FILE"),
            ([f"test.output={afile / 'r.json'}"], afile, "it is a file", "test.output=FILE"),
            ([f"output.dir={afile / 'run'}"], afile / "run", f"{afile} is a file", "output.dir")):
        res = run([PY, "harness/evaluate.py", *toy, f"output.dir={tmp_path / 'run'}", "--checkpoint",
                   str(tmp_path / "none.pyth"), *args])
        assert res.returncode == 5 and res.stderr.strip().splitlines() == [
            f"error: cannot write under {under}: {what}; name a folder with {flag}"], res.stderr[-2000:]
    # the places are tried, not made: a run that stops before it writes (no checkpoint here) leaves no folder
    res = run([PY, "harness/evaluate.py", *toy, f"output.dir={tmp_path / 'new' / 'run'}", "--checkpoint",
               str(tmp_path / "none.pyth"), "--dump", str(tmp_path / "dumps" / "p.csv")])
    assert res.returncode == 2 and not (tmp_path / "new").exists() and not (tmp_path / "dumps").exists()


def test_split_as_a_flag_names_the_config_key(capsys) -> None:
    """``evaluate --split val`` (validate's flag) was argparse's bare 'unrecognized arguments'; the usage error
    now names test.split=val."""
    from timesformer_harness.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as stop:
        evaluate_main(["--config", "configs/exp/toy_divided_cpu.yaml", "--split", "val"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "harness/evaluate.py: error: --split is not a flag of evaluate: the split is a config key, test.split=val")
