"""DALI (CPU) and PyAV loaders: same frames, same contract, sampling per epoch/rank, views across shards, geometry."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.factory import build_loader
from timesformer_harness.pipelines.base import CLIP_FORMAT, empty_clips
from timesformer_harness.pipelines.dali import PlanSource, build_video_pipeline, to_clips
from timesformer_harness.pipelines.pyav import decode_frames
from timesformer_harness.pipelines.transforms import crop_window, finish_clip, resize_window
from timesformer_harness.pipelines.sampling import ClipPlan, kinetics_frames, segment_frames, train_window
from timesformer_harness.pipelines.sampling import test_window as view_window
from conftest import encode_video

MEAN, STD = [0.45] * 3, [0.225] * 3


def _dali_run(plans: list[ClipPlan], crop: int, decode_only: bool = False):
    src = PlanSource(len(plans), decode_only)
    pipe = build_video_pipeline(src, batch_size=len(plans), crop=crop, mean=MEAN, std=STD, num_threads=1,
                                decode_only=decode_only)
    pipe.build()
    src.start(plans)
    (out,) = pipe.run()
    if decode_only:  # per-clip (T, H, W, 3) uint8 arrays (sizes may differ)
        return [np.array(out[i]) for i in range(len(plans))]
    return to_clips(out, plans, backend="cpu", decode_only=False, frames_per_clip=0, crop=crop, mean=MEAN, std=STD,
                    device=torch.device("cpu"))


def _pyav_clip(plan: ClipPlan, crop: int) -> torch.Tensor:
    return finish_clip(crop_window(decode_frames(plan.path, plan.frames), plan.window, plan.flip), crop, MEAN, STD)


def test_dali_cpu_frames_equal_pyav_frames(videos) -> None:
    """Same indices (unsorted, repeated, last frame) -> the same frames up to YUV->RGB conversion differences."""
    plans = [ClipPlan(0, str(videos.good[0]), 0, np.array([0, 3, 3, 9, 23, 23, 17, 1]), (0, 0, 48, 64)),
             ClipPlan(1, str(videos.portrait), 0, np.array([5, 1, 2, 7, 8, 20, 20, 0]), (0, 0, 64, 40))]
    dali = _dali_run(plans, 32, decode_only=True)
    for i, plan in enumerate(plans):
        ref = decode_frames(plan.path, plan.frames).astype(int)
        d = dali[i].astype(int)
        assert d.shape == ref.shape == (8, *plan.window[2:], 3)
        diff = np.abs(d - ref).mean(axis=(1, 2, 3))
        assert diff.max() < 6, f"clip {i}: mean |DALI - PyAV| per frame {diff}"
        # and each DALI frame is closest to the PyAV frame of the same index (not a neighbour)
        allref = decode_frames(plan.path, np.arange(24)).astype(int)
        nearest = [int(np.abs(allref - f).mean(axis=(1, 2, 3)).argmin()) for f in d]
        assert nearest == plan.frames.tolist()


def test_dali_cpu_augmented_clips_match_pyav(videos) -> None:
    plans = [ClipPlan(0, str(videos.good[1]), 1, np.array([0, 4, 8, 12]), (4, 6, 30, 40), flip=False),
             ClipPlan(1, str(videos.good[2]), 2, np.array([2, 2, 9, 23]), (10, 3, 30, 30), flip=True),
             ClipPlan(2, str(videos.portrait), 0, np.array([0, 5, 10, 15]), (8, 0, 40, 40), flip=False)]
    dali = _dali_run(plans, 32)
    assert dali.shape == (3, 3, 4, 32, 32) and dali.dtype == torch.float32
    for i, plan in enumerate(plans):
        diff = ((dali[i] - _pyav_clip(plan, 32)).abs() * STD[0] * 255).mean()
        assert diff < 6, f"clip {i}: mean |DALI - PyAV| = {diff:.2f} (0-255 scale)"


def test_a_video_replaced_between_batches_is_read_from_the_new_file(videos, tmp_path) -> None:
    """The source keeps files open between clips; a path that names another file now (a re-download or a fix moved
    into place) is opened again, so its clips are cut from the bytes its packet index describes."""
    path = tmp_path / "clip.webm"
    path.write_bytes(videos.good[0].read_bytes())
    plans = [ClipPlan(0, str(path), 0, np.array([0, 5, 10, 15]), (0, 0, 48, 64))]
    src = PlanSource(1, True)
    pipe = build_video_pipeline(src, batch_size=1, crop=32, mean=MEAN, std=STD, num_threads=1, decode_only=True,
                                prefetch=1)
    pipe.build()
    for source in (videos.good[0], videos.good[1]):
        moved = tmp_path / "incoming.webm"
        moved.write_bytes(source.read_bytes())
        os.replace(moved, path)
        src.start(plans)
        (out,) = pipe.run()
        diff = np.abs(np.array(out[0]).astype(int) - decode_frames(str(source), plans[0].frames).astype(int))
        assert diff.mean() < 6, f"{source.name}: mean |DALI - PyAV| {diff.mean():.1f}"
    src.close()


def test_flip_mirrors_and_normalisation_maps_a_constant_colour(tmp_path) -> None:
    frames = np.zeros((8, 32, 48, 3), dtype=np.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 200, 100, 40
    frames[:, :, :12] = 255  # a white band at the left edge
    path = str(encode_video(tmp_path / "const.webm", frames))
    plain = ClipPlan(0, path, 0, np.arange(4), (0, 0, 32, 48), flip=False)
    flipped = replace(plain, flip=True)
    out = _dali_run([plain, flipped], 32)
    assert torch.allclose(out[1], out[0].flip(-1), atol=1e-5)  # flip is an exact horizontal mirror
    for x in (out[0], _pyav_clip(plain, 32)):
        right = x[:, :, 8:24, 20:28].mean(dim=(1, 2, 3)) * 0.225 + 0.45  # back to [0, 1]
        assert torch.allclose(right, torch.tensor([200, 100, 40]) / 255, atol=6 / 255), right * 255
        assert (x[:, :, :, :4] * 0.225 + 0.45 > 0.95).all()  # the white band stays on the left


@pytest.mark.parametrize("kind", ["dali", "pyav"])
def test_train_epoch_sees_every_video_once_deterministically(videos, kind: str) -> None:
    manifest = videos.manifest(f"train_{kind}.csv", videos.good, videos.labels)
    cfg = DataConfig(loader=kind, backend="cpu", root=str(videos.root), train_manifest=str(manifest), num_frames=4,
                     sampling_rate=2, train_jitter_scales=[40, 56], train_crop_size=32, batch_size=2,
                     num_workers=2 if kind == "pyav" else 1, validate_cache="none")
    loader = build_loader(cfg, "train", device="cpu")
    assert len(loader) == 3 and loader.num_clips == 6 and loader.rejected == []
    epoch0 = list(loader)
    b = epoch0[0]
    assert b.video.shape == (2, 3, 4, 32, 32) and b.video.dtype == torch.float32
    assert b.label.dtype == torch.int64 and b.index.dtype == torch.int64
    idx0 = torch.cat([b.index for b in epoch0]).tolist()
    assert sorted(idx0) == list(range(6))
    assert torch.cat([b.label for b in epoch0]).tolist() == [videos.labels[i] for i in idx0]
    again = list(loader)  # the same epoch again: identical clips
    assert all(torch.equal(a.video, c.video) and torch.equal(a.index, c.index) for a, c in zip(epoch0, again))
    loader.set_epoch(1)
    idx1 = torch.cat([b.index for b in loader]).tolist()
    assert sorted(idx1) == list(range(6)) and idx1 != idx0
    resumed = build_loader(cfg, "train", device="cpu", start_batch=1)  # resume epoch 0 at batch 1
    tail = list(resumed)
    assert len(tail) == 2 and all(torch.equal(a.video, c.video) for a, c in zip(tail, epoch0[1:]))


@pytest.mark.parametrize("kind", ["dali", "pyav"])
def test_test_views_seen_exactly_once_across_two_shards(videos, kind: str) -> None:
    paths = videos.good[:5]
    manifest = videos.manifest(f"test_{kind}.csv", paths, [0, 1, 2, 0, 1])
    cfg = DataConfig(loader=kind, backend="cpu", root=str(videos.root), test_manifest=str(manifest), num_frames=4,
                     sampling_rate=2, test_crop_size=32, num_ensemble_views=2, num_spatial_crops=3, batch_size=4,
                     num_workers=0, validate_cache="none")
    seen: Counter = Counter()
    clips = {}
    for rank in range(2):
        loader = build_loader(cfg, "test", device="cpu", rank=rank, world_size=2)
        # 5 videos x 2 clips x 3 crops = 30 views in 10 units of 3 over 2 ranks; batch_size 4 holds one unit
        assert loader.num_clips == 15 and len(loader) == 5
        for batch in loader:
            for v, i, lab in zip(batch.video, batch.index.tolist(), batch.label.tolist()):
                seen[i] += 1
                assert lab == [0, 1, 2, 0, 1][i]
                clips.setdefault(i, []).append(v)
    assert seen == Counter({i: 6 for i in range(5)})
    for views in clips.values():  # six distinct views (2 temporal x left/centre/right)
        assert len({tuple(v.flatten()[:64].tolist()) for v in views}) == 6


@pytest.mark.parametrize("num_frames", [1, 8, 16])
def test_train_plans_equal_the_per_clip_linspace_bit_for_bit(num_frames: int) -> None:
    """An epoch's train plans compute the Kinetics frame indices for all clips at once; they equal, clip for clip,
    ``np.linspace`` per clip with the same draws from the same generator (frames, window, flip, in that order): short
    and long videos, fps 0 (the target fps is used), 1 frame; and ``plan_clip`` (replacements) draws the same way."""
    from timesformer_harness.pipelines.base import ClipPlanner, Video
    from timesformer_harness.pipelines.sampling import clip_size, get_start_end_idx

    gen = np.random.default_rng(7)
    videos = [Video(i, f"v{i}.mp4", i % 5, int(gen.integers(1, 700)), float(gen.choice([0.0, 15.0, 25.0, 29.97, 60.0])),
                    int(gen.integers(48, 400)), int(gen.integers(48, 400))) for i in range(500)]
    cfg = DataConfig(num_frames=num_frames, sampling_rate=8, batch_size=4, train_jitter_scales=[64, 80],
                     train_crop_size=48)
    planner = ClipPlanner(cfg, "train", videos, rank=1, world_size=2)
    for epoch in (0, 3):
        order = np.random.default_rng((cfg.seed, epoch)).permutation(len(videos))[1::2][:planner.num_clips]
        rng = np.random.default_rng((cfg.seed, epoch, 1))
        plans = planner.plans(epoch)
        assert len(plans) == len(order) == 248
        for plan, i in zip(plans, order):
            v = videos[i]
            start, end = get_start_end_idx(v.frames, clip_size(num_frames, 8, cfg.target_fps, v.fps or cfg.target_fps),
                                           -1, 1, rng)
            frames = np.clip(np.linspace(start, end, num_frames), 0, v.frames - 1).astype(np.int64)
            window = train_window(v.height, v.width, [64, 80], 48, rng)
            flip = bool(rng.random() < 0.5)
            assert (plan.index, plan.frames.dtype, plan.frames.tolist(), plan.window, plan.flip) == \
                (v.index, np.int64, frames.tolist(), window, flip)
    one, rng = planner.plan_clip(videos[3], np.random.default_rng(5)), np.random.default_rng(5)
    assert one.frames.tolist() == planner.plan_clips([videos[3]], rng)[0].frames.tolist()


def test_a_rank_outside_the_world_or_a_negative_start_is_refused() -> None:
    """A rank outside [0, world_size) had planned another rank's clips (duplicates), world_size 0 divided by zero,
    and start_batch -1 yielded only the epoch's last batch."""
    from timesformer_harness.pipelines.base import ClipPlanner, Video
    from timesformer_harness.pipelines.pyav import PyAVLoader

    videos = [Video(i, f"v{i}.webm", 0, 48, 30.0, 32, 32) for i in range(8)]
    cfg = DataConfig(num_frames=4, batch_size=2)
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=rf"rank {rank} of world_size {world}: need world_size >= 1"):
            ClipPlanner(cfg, "train", videos, rank=rank, world_size=world)
    with pytest.raises(ValueError, match=r"start_batch=-1 is not within the epoch's 4 batches"):
        PyAVLoader(ClipPlanner(cfg, "train", videos), torch.device("cpu"), start_batch=-1)


def test_sampling_formulas() -> None:
    # Kinetics: 8 frames x rate 32 at 30 fps = 256 source frames; test clip 0 of 1 starts at frame 0
    assert kinetics_frames(300, 30, 8, 32, 30, clip_idx=0).tolist() == [0, 36, 72, 109, 145, 182, 218, 255]
    assert kinetics_frames(300, 30, 8, 32, 30, clip_idx=1, num_clips=2).tolist()[0] == 22  # delta 44 / 2
    assert kinetics_frames(300, 15, 8, 32, 30, clip_idx=0).tolist()[-1] == 127  # fps-aware: 128 frames at 15 fps
    assert kinetics_frames(20, 30, 4, 8, 30, clip_idx=0).tolist() == [0, 10, 19, 19]  # short video: clamped
    rng = np.random.default_rng(0)
    starts = {kinetics_frames(100, 30, 4, 4, 30, rng=rng)[0] for _ in range(50)}
    assert min(starts) >= 0 and max(starts) <= 84 and len(starts) > 10
    assert segment_frames(33, 4).tolist() == [4, 12, 20, 28]  # middles of segments of 8 frames
    seg = segment_frames(33, 4, np.random.default_rng(0))
    assert all(8 * i <= f <= 8 * (i + 1) for i, f in enumerate(seg))
    # test crops: short side -> crop, then left / centre / right (top / centre / bottom for portrait)
    left, centre, right = (view_window(240, 320, 224, s) for s in range(3))
    assert left == (0, 0, 240, 240) and right[1] + right[3] == 320 and centre[1] == round(37 * 240 / 224)  # ceil((298 - 224) / 2) = 37
    top, _, bottom = (view_window(320, 240, 224, s) for s in range(3))
    assert top[0] == 0 and bottom[0] + bottom[2] == 320 and top[1] == bottom[1] == 0
    for _ in range(20):  # train windows: inside the frame, the crop's share of the jittered short side
        y, x, h, w = train_window(240, 320, [256, 320], 224, rng)
        assert 0 <= y and y + h <= 240 and 0 <= x and x + w <= 320
        assert 224 / 320 * 240 - 1 <= h <= 224 / 256 * 240 + 1 and abs(h - w) <= 1


def test_synthetic_loader_contract() -> None:
    cfg = DataConfig(loader="synthetic", num_frames=4, train_crop_size=16, batch_size=3, synthetic_videos=10,
                     synthetic_classes=5)
    loader = build_loader(cfg, "train", device="cpu", rank=1, world_size=2)
    assert len(loader) == 1 and loader.num_clips == 3
    batch = next(iter(loader))
    assert batch.video.shape == (3, 3, 4, 16, 16) and batch.label.max() < 5 and batch.video.std() > 0.5
    assert batch.video.is_contiguous(memory_format=CLIP_FORMAT)  # the real loaders' layout
    # its labels are checked against the model's classes, as a manifest's are (evaluation scored 10 labels on 6)
    assert build_loader(cfg, "test", num_classes=5).num_clips > 0
    with pytest.raises(ValueError, match=r"data.synthetic_classes=5 draws labels 0..4, out of range for "
                                         r"model.num_classes=4: set data.synthetic_classes=4 \(or fewer\)"):
        build_loader(cfg, "test", num_classes=4)


def test_ssv2_manifest_and_segment_sampling_through_dali(videos, tmp_path) -> None:
    import json
    import shutil

    for i in range(4):  # SSv2 layout: {root}/{id}.webm + the split and labels JSON files
        shutil.copy(videos.good[i], tmp_path / f"{100 + i}.webm")
    (tmp_path / "labels.json").write_text(json.dumps({"Pushing something": "0", "Lifting something up": "1"}))
    split = [{"id": str(100 + i), "template": ["Pushing [something]", "Lifting [something] up"][i % 2]}
             for i in range(4)]
    for name in ("train", "validation"):
        (tmp_path / f"something-something-v2-{name}.json").write_text(json.dumps(split))
    cfg = DataConfig(loader="dali", backend="cpu", format="ssv2", root=str(tmp_path), random_flip=False,
                     ssv2_labels=str(tmp_path / "labels.json"), num_frames=4, test_crop_size=32, num_spatial_crops=1,
                     batch_size=4, num_workers=1, validate_cache="none")
    loader = build_loader(cfg, "val", device="cpu")
    plans = loader.planner.plans(0)
    assert [p.frames.tolist() for p in plans] == [segment_frames(24, 4).tolist()] * 4  # segment middles
    batch = next(iter(loader))
    assert batch.label.tolist() == [0, 1, 0, 1] and batch.video.shape == (4, 3, 4, 32, 32)
    train = build_loader(replace(cfg, inv_uniform_sample=True, train_jitter_scales=[40, 56], train_crop_size=32),
                         "train", device="cpu")
    for p in train.planner.plans(0):  # random frame within each segment of (24 - 1) / 4 frames
        assert all(round(5.75 * i) <= f <= round(5.75 * (i + 1)) for i, f in enumerate(p.frames))


def test_pyav_seek_path_returns_the_same_frames_as_decoding_from_the_start(tmp_path) -> None:
    from conftest import textured_frames

    path = str(encode_video(tmp_path / "long.webm", textured_frames(72, 32, 48, seed=3)))  # keyframes every 8
    every = decode_frames(path, np.arange(72))
    idx = np.array([40, 41, 47, 55, 55, 63, 71, 71])  # a seek per GOP: keyframes 40, 48, 56, 64
    assert np.array_equal(decode_frames(path, idx), every[idx])
    assert np.array_equal(decode_frames(path, np.array([33, 70])), every[[33, 70]])


def test_mirroring_the_window_before_the_resize_is_exact() -> None:
    """Both CPU loaders mirror the crop window before resizing it (the smaller tensor): the result is bit for bit
    the resized clip mirrored, for windows up- and down-scaled, square or not; normalising into a batch slot gives
    the same values as normalising alone (in the loaders' layout or contiguous), and both are the normalisation
    formula."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 240, 320, 3), dtype=np.uint8)
    for window in [(0, 0, 240, 320), (13, 40, 177, 177), (5, 7, 201, 163), (30, 90, 96, 96)]:
        plain = finish_clip(crop_window(frames, window), 224, MEAN, STD)
        mirrored = finish_clip(crop_window(frames, window, flip=True), 224, MEAN, STD)
        assert torch.equal(mirrored, plain.flip(-1)), window
        for slot in (empty_clips((2, 3, 4, 224, 224)), torch.empty((2, 3, 4, 224, 224))):  # loaders' layout, other
            finish_clip(crop_window(frames, window), 224, MEAN, STD, out=slot[1])
            assert torch.equal(slot[1], plain)
        resized = resize_window(crop_window(frames, window), 224).permute(1, 0, 2, 3).float()
        assert (plain - (resized - 0.45 * 255) / (0.225 * 255)).abs().max() < 1e-5  # (x - 255 mean) / (255 std)


# ------------------------------------------------------------------------------------------------------------------
# The loader registry: a backend is its module plus one registration.
COUNTING_MODULE = '''
"""A decoder backend of a test: the PyAV loader under a name of its own."""
from timesformer_harness.pipelines.pyav import PyAVLoader


class CountingLoader(PyAVLoader):
    kind = "counting"
'''


def test_a_backend_added_by_one_registration_is_built_checked_and_benchmarked(videos, tmp_path, monkeypatch) -> None:
    """A new backend: its module and one ``LoaderBackend``. The config takes its name, the factory pre-flight checks
    the videos for it and builds it, its batches follow the contract, it says where it decoded, and the bench's
    pipeline suite makes a case of it and counts its decoded frames with its decode-cost model."""
    import torch

    from timesformer_harness.bench import pipeline as pipeline_suite
    from timesformer_harness.config import RootConfig
    from timesformer_harness.pipelines.base import loader_facts
    from timesformer_harness.pipelines.loaders import LOADERS, LoaderBackend

    (tmp_path / "counting_loader.py").write_text(COUNTING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(LOADERS, "counting", LoaderBackend(
        "counting", "counting_loader", "CountingLoader", decodes=True, needs_decode_device=False,
        decode_cost="keyframe", outside_rss="its DataLoader worker processes", outside_cuda_allocator="",
        summary="PyAV, counting"))
    manifest = videos.manifest("counting.csv", videos.good[:4])
    cfg = DataConfig(loader="counting", train_manifest=str(manifest), num_frames=4, sampling_rate=2,
                     train_jitter_scales=[32, 36], train_crop_size=32, batch_size=2, num_workers=0,
                     validate_cache="none")
    loader = build_loader(cfg, "train", device="cpu")
    batch = next(iter(loader))
    assert type(loader).__name__ == "CountingLoader" and batch.video.shape == (2, 3, 4, 32, 32)
    assert loader_facts(loader) == {"kind": "counting", "decode": "cpu", "note": ""}
    with pytest.raises(ValueError, match=r"data.loader='nope'; choose from \['auto', 'dali', 'pyav', 'synthetic', "
                                         r"'counting'\]"):
        DataConfig(loader="nope")
    root = RootConfig()
    (tmp_path / "data.yaml").write_text(f"data:\n  root: {videos.root}\n")
    root.bench.data_config = str(tmp_path / "data.yaml")
    names = [c.loader for c in pipeline_suite.cases(root, {"preset": "tiny", "device": "cpu", "batch": 2,
                                                            "precision": "fp32", "warmup": 1, "steps": 1},
                                                     [], [], torch.device("cpu"))]
    assert names == ["dali", "pyav", "counting", "shootout"]
    decoded = pipeline_suite.decoded_frames_per_clip(loader, max_clips=4)
    assert decoded["strategy"] == "keyframe" and decoded["counted_per_clip"] == pytest.approx(decoded["model_per_clip"])
    assert pipeline_suite.peak_memory_note(torch.device("cpu"), loader).endswith("its DataLoader worker processes")


# A rank under torchrun with PyAV DataLoader workers, signalled as torchrun stops a rank (its whole process group):
# the rank's own handler takes SIGTERM, and its workers go on delivering the epoch. argv: toy dataset, manifest path.
SIGNALLED_GROUP = """
import os, signal, sys, time
from pathlib import Path
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.factory import build_loader

toy, manifest = Path(sys.argv[1]), Path(sys.argv[2])
lines = (toy / "train.csv").read_text().splitlines()[:8]
manifest.write_text("".join(f"{toy / line.split()[0]} {line.split()[1]}\\n" for line in lines))
cfg = DataConfig(loader="pyav", backend="cpu", root="", train_manifest=str(manifest), num_frames=4, sampling_rate=2,
                 train_jitter_scales=[32, 32], train_crop_size=32, batch_size=2, num_workers=1, validate_cache="none")
loader = build_loader(cfg, "train", device="cpu")
stopped = []
signal.signal(signal.SIGTERM, lambda *args: stopped.append(1))
batches = iter(loader)
next(batches)
os.killpg(os.getpgid(0), signal.SIGTERM)  # torchrun's stop: every process of the rank's group
time.sleep(1)
print("handled", len(stopped), "batches", 1 + sum(1 for _ in batches))
"""


def test_pyav_workers_outlive_a_signal_to_the_ranks_process_group(tmp_path) -> None:
    """torchrun stops a rank by signalling its process group (SIGTERM on preemption): the rank finishes its step
    and saves, so its DataLoader workers, in a group of their own, must not die of the signal meant for it."""
    import subprocess
    import sys

    from timesformer_harness.config import REPO_ROOT

    res = subprocess.run([sys.executable, "-c", SIGNALLED_GROUP, str(REPO_ROOT / "data" / "toy"),
                          str(tmp_path / "train.csv")], capture_output=True, text=True, start_new_session=True,
                         cwd=REPO_ROOT, timeout=180)
    assert res.returncode == 0 and res.stdout.split() == ["handled", "1", "batches", "4"], res.stderr[-2000:]


def test_a_gpu_jpeg_loader_without_nvjpeg_says_it_decodes_on_the_cpu(tmp_path, monkeypatch, caplog) -> None:
    """DALI's mixed image decoder falls back to the CPU without a word when libnvjpeg is missing (a DALI copied by
    hand): the loader says so when it is built (constructed here for cuda:0 without touching a GPU)."""
    import logging

    from timesformer_harness.config import REPO_ROOT
    from timesformer_harness.pipelines import dali

    toy = REPO_ROOT / "data" / "toy"
    lines = (toy / "train.csv").read_text().splitlines()[:4]
    (tmp_path / "train.csv").write_text("".join(f"{toy / line.split()[0]} {line.split()[1]}\n" for line in lines))
    cfg = DataConfig(loader="dali", backend="cpu", root="", train_manifest=str(tmp_path / "train.csv"), num_frames=4,
                     sampling_rate=2, train_jitter_scales=[32, 32], train_crop_size=32, batch_size=2, num_workers=1,
                     validate_cache="none")
    planner = build_loader(cfg, "train", device="cpu").planner
    monkeypatch.setattr(dali, "jpeg_libraries_missing",
                        lambda gpu: "nvjpeg/lib/libnvjpeg.so.12 missing" if gpu else None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.pipelines.dali"):
        dali.DaliLoader(planner, torch.device("cuda", 0), backend="gpu", jpeg_frames=True)
        dali.DaliLoader(planner, torch.device("cuda", 0), backend="gpu", jpeg_frames=False)  # NVDEC: no JPEG
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "JPEG frames to be decoded on the GPU, but nvjpeg/lib/libnvjpeg.so.12 missing; DALI decodes them on the CPU "
        "instead"]


def _ssv2_layout(videos, root, count: int = 4) -> None:
    """An SSv2 folder as docs/your_data.md describes it: {id}.webm videos, the split JSONs and the labels JSON under
    its default name."""
    import json
    import shutil

    for i in range(count):
        shutil.copy(videos.good[i], root / f"{100 + i}.webm")
    (root / "something-something-v2-labels.json").write_text(json.dumps({"Pushing something from left to right": "0",
                                                                          "Pushing something from right to left": "1"}))
    split = [{"id": str(100 + i), "template": ["Pushing [something] from left to right",
                                               "Pushing [something] from right to left"][i % 2]} for i in range(count)]
    for name in ("train", "validation"):
        (root / f"something-something-v2-{name}.json").write_text(json.dumps(split))


def test_ssv2_trains_without_flips_unless_asked(videos, tmp_path, caplog) -> None:
    """A config that names data.format=ssv2 and no data.random_flip trains on unflipped clips (SSv2's labels tell left
    from right); the saved config records the value used; an explicit true still flips, with a warning when the train
    loader is built (once: not on every copy of the config, nor for the val/test loaders, which do not flip)."""
    import logging

    from timesformer_harness.config import load_config, to_yaml

    _ssv2_layout(videos, tmp_path)
    (tmp_path / "my.yaml").write_text(f"data:\n  format: ssv2\n  root: {tmp_path}\n  loader: pyav\n  num_frames: 4\n"
                                      "  train_jitter_scales: [40, 56]\n  train_crop_size: 32\n  batch_size: 4\n"
                                      "  num_workers: 0\n  validate_cache: none\nmodel:\n  num_classes: 2\n")
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.pipelines"):
        cfg = load_config(tmp_path / "my.yaml")
    assert cfg.data.random_flip is False and "random_flip: false" in to_yaml(cfg) and not caplog.records
    loader = build_loader(cfg.data, "train", device="cpu", num_classes=2)
    plans = loader.planner.plans(0)
    batch = next(iter(loader))
    assert not any(p.flip for p in plans)
    for clip, plan in zip(batch.video, plans):  # the decoded clips are the unflipped ones
        torch.testing.assert_close(clip, _pyav_clip(plan, 32))
    assert load_config(tmp_path / "my.yaml", ["data.format=kinetics"]).data.random_flip is True  # other formats flip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.pipelines"):
        flipped = load_config(tmp_path / "my.yaml", ["data.random_flip=true"])
        copy = replace(flipped.data, batch_size=2)
        assert "random_flip" not in caplog.text
        plans = build_loader(copy, "train", device="cpu", num_classes=2).planner.plans(0)
    assert any(p.flip for p in plans)
    assert caplog.text.count("data.random_flip=true with data.format=ssv2") == 1
