"""timesformer_harness.evaluate: view ensembling (sum / softmax_mean / max), merging across ranks, the accuracy report,
and the CLI on a checkpoint written in the original .pyth layout."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from timesformer_harness.evaluate import ViewAccumulator, accuracy_report
from timesformer_harness.model import create_model
from test_train import PY, run, toy  # noqa: F401 (toy is a fixture)


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
    assert result["videos_with_wrong_view_count"] == 0 and result["num_videos"] == 8
    assert result["views_seen"] == 8 * 6 and len(result["per_class_top1"]) == 6
    assert {"top1", "top5", "per_class_top1", "mean_class_accuracy", "environment"} <= set(result)
    assert "top-1" in res.stdout
