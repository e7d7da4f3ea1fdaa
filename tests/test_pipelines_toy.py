"""The toy dataset: deterministic, idempotent, Kinetics-format, decodable; its class is invisible in any one frame."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from timesformer_harness.config import REPO_ROOT, load_config
from timesformer_harness.pipelines.factory import build_loader
from timesformer_harness.pipelines.tools.toy import CLASSES, COLOUR_NAMES, ToySpec, clip_params, generate, render_clip
from timesformer_harness.pipelines.validate import check_videos

SMALL = ToySpec(train=12, val=6, test=6)


def test_generate_is_deterministic_idempotent_and_kinetics_format(tmp_path: Path) -> None:
    assert generate(tmp_path / "a", SMALL, workers=1) is True
    assert generate(tmp_path / "a", SMALL, workers=1) is False  # same spec: nothing to do
    assert generate(tmp_path / "b", SMALL, workers=2) is True
    for split in ("train", "val", "test"):
        a, b = (tmp_path / "a" / f"{split}.csv").read_text(), (tmp_path / "b" / f"{split}.csv").read_text()
        assert a == b and len(a.splitlines()) == getattr(SMALL, split)
    for line in (tmp_path / "a" / "val.csv").read_text().splitlines():
        rel, label = line.split(" ")
        assert not Path(rel).is_absolute() and 0 <= int(label) < len(CLASSES)
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / "classes.txt").read_text().split() == list(CLASSES)
    infos, rejected = check_videos([str(p) for p in sorted((tmp_path / "a" / "val").glob("*.webm"))], "cpu", 8, 3,
                                   cache=None)
    assert rejected == [] and {(i.codec, i.frames, i.height, i.width, i.fps) for i in infos} == {("vp9", 24, 32, 32, 30)}
    kept = (tmp_path / "a" / "val" / "val_00005.webm").read_bytes()
    (tmp_path / "a" / "val" / "val_00005.webm").unlink()  # a damaged copy is written again, not "nothing to do"
    assert generate(tmp_path / "a", SMALL, workers=1) is True
    assert (tmp_path / "a" / "val" / "val_00005.webm").read_bytes() == kept
    assert generate(tmp_path / "a", replace(SMALL, seed=1), workers=1) is True  # another spec regenerates


def test_cli_and_toy_preset_feed_the_dali_loader(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    cmd = [sys.executable, "-m", "timesformer_harness.pipelines.tools.toy", "--out", str(out), "--train", "16",
           "--val", "6", "--test", "6"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr
    data = load_config(REPO_ROOT / "configs/data/toy.yaml").data
    cfg = replace(data, root=str(out), validate_cache="none", loader="dali", backend="cpu")
    loader = build_loader(cfg, "train", device="cpu")
    batch = next(iter(loader))
    assert batch.video.shape == (8, 3, 8, 32, 32) and len(loader) == 2
    test = build_loader(cfg, "test", device="cpu")
    assert sum(b.video.shape[0] for b in test) == 6


def _frame_features(frame: np.ndarray, background: float) -> np.ndarray:
    """Per-frame statistics: the dot's colour (share of red, green, blue pixels), centroid and the background."""
    f = frame.astype(np.float32)
    mask = np.abs(f - background).sum(-1) > 60
    ys, xs = np.nonzero(mask)
    shares = [(mask & (f.argmax(-1) == c)).mean() * 20 for c in range(3)]
    return np.array([*shares, xs.mean() / frame.shape[1], ys.mean() / frame.shape[0], background / 255],
                    dtype=np.float32)


def _fit_and_score(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> float:
    """Held-out accuracy of a small MLP (the same learner for frame- and clip-level features)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    net = torch.nn.Sequential(torch.nn.Linear(x_tr.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, len(CLASSES)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    torch.set_num_threads(threads)
    return float((net(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())


def test_neither_a_frame_nor_the_set_of_frames_tells_the_class_but_their_order_does() -> None:
    """The learner that reads the class off the first and last frame cannot read it off one frame or off the mean of
    the 8 sampled frames (what a space-only model sees)."""
    spec = ToySpec()
    rng = np.random.default_rng(0)
    sampled = np.linspace(0, spec.frames - 1, 8).astype(int)  # configs/data/toy.yaml: 8 frames over the video
    frame_x, frame_y, set_x, order_x, clip_y = [], [], [], [], []
    for i in range(600):
        p = clip_params(spec, "train", i)
        frames = render_clip(spec, p)
        feats = np.stack([_frame_features(frames[t], p["background"]) for t in sampled])
        for t in rng.choice(len(sampled), 2, replace=False):
            frame_x.append(feats[t])
            frame_y.append(p["label"])
        set_x.append(feats.mean(0))
        order_x.append(np.concatenate([feats[0], feats[-1]]))
        clip_y.append(p["label"])
    frame_x, frame_y, clip_y = np.stack(frame_x), np.array(frame_y), np.array(clip_y)
    set_x, order_x = np.stack(set_x), np.stack(order_x)
    assert np.bincount(clip_y, minlength=6).min() > 70  # all classes present
    n, m = len(frame_y) * 3 // 4, len(clip_y) * 3 // 4
    frame_acc = _fit_and_score(frame_x[:n], frame_y[:n], frame_x[n:], frame_y[n:])
    set_acc = _fit_and_score(set_x[:m], clip_y[:m], set_x[m:], clip_y[m:])
    order_acc = _fit_and_score(order_x[:m], clip_y[:m], order_x[m:], clip_y[m:])
    chance = 1 / len(CLASSES)
    print(f"per-frame accuracy {frame_acc:.3f}, frame-mean accuracy {set_acc:.3f}, first+last accuracy {order_acc:.3f}")
    assert frame_acc < chance + 0.09, f"a per-frame classifier reaches {frame_acc:.2f} (chance {chance:.2f})"
    assert set_acc < chance + 0.09, f"a classifier of the frames' mean reaches {set_acc:.2f} (chance {chance:.2f})"
    assert order_acc > 0.9, f"the same learner on the first and last frame reaches only {order_acc:.2f}"


@pytest.mark.parametrize("label", range(6))
def test_rendered_clips_follow_their_class(label: int) -> None:
    spec = ToySpec()
    i = next(i for i in range(100) if clip_params(spec, "val", i)["label"] == label)
    p = clip_params(spec, "val", i)
    frames = render_clip(spec, p).astype(int)
    # which of red, green, blue the dot shows in each frame (its most saturated channel at the centre)
    x, y = (int(c) for c in p["centre"])
    shown = [int(np.argmax(f[y, x])) for f in frames]
    runs = [c for k, c in enumerate(shown) if k == 0 or c != shown[k - 1]]
    assert "_".join(COLOUR_NAMES[c] for c in runs) == CLASSES[label]
    sampled = [shown[t] for t in np.linspace(0, spec.frames - 1, spec.clip_frames).astype(int)]
    assert min(sampled.count(c) for c in range(3)) >= spec.min_per_colour


def test_a_frame_too_small_for_the_dot_is_refused_with_the_smallest_size() -> None:
    with pytest.raises(ValueError, match="16-px toy frame cannot hold the dot .* at least 18"):
        ToySpec(size=16)
    res = subprocess.run([sys.executable, "-m", "timesformer_harness.pipelines.tools.toy", "--size", "16", "--out",
                          "unused"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert res.returncode == 2 and "--size 16: a 16-px toy frame cannot hold the dot" in res.stderr, res.stderr
    assert "at least 18" in res.stderr
    assert not (REPO_ROOT / "unused").exists()
