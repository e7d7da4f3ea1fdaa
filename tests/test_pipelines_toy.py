"""The toy dataset: deterministic, idempotent, Kinetics-format, decodable; its class is invisible in any one frame."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config import REPO_ROOT, load_config
from pipelines import build_loader
from pipelines.toy import CLASSES, ToySpec, clip_params, generate, render_clip
from pipelines.validate import check_videos

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
    assert rejected == [] and {(i.codec, i.frames, i.height, i.width, i.fps) for i in infos} == {("vp9", 32, 64, 64, 30)}
    assert generate(tmp_path / "a", replace(SMALL, seed=1), workers=1) is True  # another spec regenerates


def test_cli_and_toy_preset_feed_the_dali_loader(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    cmd = [sys.executable, "-m", "pipelines.toy", "--out", str(out), "--train", "16", "--val", "6", "--test", "6"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr
    data = load_config(REPO_ROOT / "configs/data/toy.yaml").data
    cfg = replace(data, root=str(out), validate_cache="none", loader="dali", backend="cpu")
    loader = build_loader(cfg, "train", device="cpu")
    batch = next(iter(loader))
    assert batch.video.shape == (8, 3, 8, 64, 64) and len(loader) == 2
    test = build_loader(cfg, "test", device="cpu")
    assert sum(b.video.shape[0] for b in test) == 6


def _frame_features(frame: np.ndarray, background: float) -> np.ndarray:
    """Per-frame statistics: colour shares and the dot's (torus) centroid."""
    f = frame.astype(np.float32)
    mask = np.abs(f - background).sum(-1) > 60
    S = frame.shape[0]
    ang = 2 * np.pi * (np.arange(S) + 0.5) / S
    ys, xs = np.nonzero(mask)
    red = (f[..., 0] > f[..., 1] + 60).mean()
    green = (f[..., 1] > f[..., 0] + 60).mean()
    return np.array([np.sin(ang[xs]).mean(), np.cos(ang[xs]).mean(), np.sin(ang[ys]).mean(), np.cos(ang[ys]).mean(),
                     red * 20, green * 20, background / 255], dtype=np.float32)


def _clip_features(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Three frames' features (window start, +3, +23) -> the dot's displacement between the first two (torus angle
    difference, under half a turn) and the colours at both ends of the window."""
    dx = np.angle(complex(b[1], b[0]) / complex(a[1], a[0]))
    dy = np.angle(complex(b[3], b[2]) / complex(a[3], a[2]))
    return np.array([dx * 5, dy * 5, a[4], a[5], c[4], c[5]], dtype=np.float32)


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


def test_single_frames_do_not_tell_the_class_but_clips_do() -> None:
    spec = ToySpec()
    rng = np.random.default_rng(0)
    frame_x, frame_y, clip_x, clip_y = [], [], [], []
    for i in range(480):
        p = clip_params(spec, "train", i)
        frames = render_clip(spec, p)
        for t in rng.choice(spec.frames, 2, replace=False):  # two random frames per clip
            frame_x.append(_frame_features(frames[t], p["background"]))
            frame_y.append(p["label"])
        start = int(rng.integers(0, spec.frames - 24 + 1))  # a 24-frame window (8 frames x sampling rate 3)
        a, b, c = (_frame_features(frames[start + k], p["background"]) for k in (0, 3, 23))
        clip_x.append(_clip_features(a, b, c))
        clip_y.append(p["label"])
    frame_x, frame_y = np.stack(frame_x), np.array(frame_y)
    clip_x, clip_y = np.stack(clip_x), np.array(clip_y)
    assert np.bincount(clip_y, minlength=6).min() > 50  # all classes present
    n = len(frame_y) * 3 // 4
    frame_acc = _fit_and_score(frame_x[:n], frame_y[:n], frame_x[n:], frame_y[n:])
    m = len(clip_y) * 3 // 4
    clip_acc = _fit_and_score(clip_x[:m], clip_y[:m], clip_x[m:], clip_y[m:])
    chance = 1 / len(CLASSES)
    print(f"per-frame accuracy {frame_acc:.3f}, clip accuracy {clip_acc:.3f}")
    assert frame_acc < chance + 0.09, f"a per-frame classifier reaches {frame_acc:.2f} (chance {chance:.2f})"
    assert clip_acc > 0.9, f"the same learner on three frames of a clip reaches only {clip_acc:.2f}"


@pytest.mark.parametrize("label", range(6))
def test_rendered_clips_follow_their_class(label: int) -> None:
    spec = ToySpec()
    i = next(i for i in range(100) if clip_params(spec, "val", i)["label"] == label)
    p = clip_params(spec, "val", i)
    frames = render_clip(spec, p).astype(int)
    red = lambda f: (f[..., 0] > f[..., 1] + 60).sum()  # noqa: E731
    green = lambda f: (f[..., 1] > f[..., 0] + 60).sum()  # noqa: E731
    if label >= 4:
        first, last = (red, green) if label == 4 else (green, red)
        assert first(frames[0]) > 50 and last(frames[-1]) > 50 and first(frames[-1]) == 0
    else:
        assert (red(frames[0]) > 50) == (red(frames[-1]) > 50)
