"""Val/test views in decode units: each (video, temporal clip) is decoded once and cropped S times.

Checked against today's per-view decode (each view decoded on its own, the reference kept here): the same pixels view
by view (DALI CPU on VP9 and on MJPEG frames as JPEG images, PyAV), 1/S of the decoded frames, every (video, view)
once across ranks, a failed unit's views all listed, and evaluation's scores unchanged on the toy set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import encode_video, textured_frames
from corrupt_videos import make_corrupt_corpus
from timesformer_harness.evaluate import ViewAccumulator, accuracy_report, score_loader
from timesformer_harness.pipelines import pyav
from timesformer_harness.pipelines.base import ClipPlanner, Video, stack_clips
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.dali import DaliLoader, PlanSource, build_video_pipeline, to_clips
from timesformer_harness.pipelines.factory import build_loader
from timesformer_harness.pipelines.sampling import ClipPlan, kinetics_frames
from timesformer_harness.pipelines.sampling import test_window as view_window
from timesformer_harness.pipelines.tools.encode import write_video
from timesformer_harness.pipelines.transforms import crop_window, finish_clip

TOY = Path(__file__).resolve().parents[1] / "data" / "toy"


def _cfg(videos, kind: str, paths: list[Path], **kw) -> DataConfig:
    manifest = videos.manifest(f"views_{kind}_{len(paths)}.csv", paths, [i % 3 for i in range(len(paths))])
    args = dict(loader=kind, backend="cpu", root=str(videos.root), test_manifest=str(manifest), num_frames=4,
                sampling_rate=2, test_crop_size=32, num_ensemble_views=2, num_spatial_crops=3, batch_size=6,
                num_workers=0, validate_cache="none")
    return DataConfig(**{**args, **kw})


def _per_view_plans(cfg: DataConfig, videos: list[Video]) -> list[ClipPlan]:
    """Today's per-view plans (one rank), from the sampling functions: view t * S + s of each video in order."""
    out = []
    for v in videos:
        for t in range(cfg.num_ensemble_views):
            frames = kinetics_frames(v.frames, v.fps, cfg.num_frames, cfg.sampling_rate, cfg.target_fps, t,
                                     cfg.num_ensemble_views)
            for s in range(cfg.num_spatial_crops):
                spatial = s if cfg.num_spatial_crops == 3 else 1
                out.append(ClipPlan(v.index, v.path, v.label, frames, view_window(v.height, v.width,
                                                                                  cfg.test_crop_size, spatial)))
    return out


def _dali_graph_clips(cfg: DataConfig, plans: list[ClipPlan], jpeg_frames: bool = False, views: int = 1,
                      backend: str = "cpu") -> tuple[torch.Tensor, int]:
    """``plans`` (units of ``views`` in a row) through the loader's DALI graph for ``backend`` with CPU decoders:
    (clips, frames decoded). By default each view decoded on its own by the one-output graph (the loader's graph
    before units); ``backend="gpu"`` is the GPU graph's CPU twin (resize, mirror and normalise in DALI)."""
    T = cfg.num_frames if jpeg_frames else 0
    units = len(plans) // views
    source = PlanSource(units, backend=backend, prefetch=0, jpeg_frames=jpeg_frames, views=views)
    pipe = build_video_pipeline(source, batch_size=units, crop=cfg.test_crop_size, mean=cfg.mean, std=cfg.std,
                                backend=backend, num_threads=1, frames_per_clip=T, decoder_device="cpu")
    pipe.build()
    source.start(plans)
    clips = to_clips(pipe.run(), plans, backend=backend, decode_only=False, frames_per_clip=T,
                     crop=cfg.test_crop_size, mean=cfg.mean, std=cfg.std, device=torch.device("cpu"))
    source.close()
    return clips, source.decoded


def _pyav_per_view(cfg: DataConfig, plan: ClipPlan) -> torch.Tensor:
    frames = pyav.decode_frames(plan.path, plan.frames)
    return finish_clip(crop_window(frames, plan.window, plan.flip), cfg.test_crop_size, cfg.mean, cfg.std)


@pytest.mark.parametrize("S,E,B", [(3, 2, 6), (3, 2, 7), (3, 1, 4), (3, 2, 2), (3, 1, 1), (1, 2, 5)])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_units_shard_every_view_once_and_keep_each_unit_on_one_rank(S: int, E: int, B: int, world: int) -> None:
    cfg = DataConfig(num_frames=4, sampling_rate=2, test_crop_size=32, num_ensemble_views=E, num_spatial_crops=S,
                     batch_size=B)
    videos = [Video(i, f"v{i}.webm", i % 4, 20 + 7 * i, 30.0, 48, 64 if i % 2 else 40) for i in range(7)]
    reference = {(p.index, k % (E * S)): p for k, p in enumerate(_per_view_plans(cfg, videos))}
    seen: Counter = Counter()
    for rank in range(world):
        planner = ClipPlanner(cfg, "test", videos, rank, world)
        n = planner.views_per_unit
        assert n == (S if B >= S else 1) and planner.batch_views == B // n * n <= B
        plans = planner.plans(0)
        assert len(plans) == planner.num_clips and planner.num_batches == -(-len(plans) // planner.batch_views)
        for pos, p in enumerate(plans):
            view = planner.view_of(pos)
            seen[(p.index, view)] += 1
            ref = reference[(p.index, view)]  # the same frames and window as that view's own plan
            assert (p.path, p.label, p.window, p.flip) == (ref.path, ref.label, ref.window, ref.flip)
            assert np.array_equal(p.frames, ref.frames)
        for u in range(0, len(plans), n):  # a unit: S views of one temporal clip, in view order
            unit = plans[u:u + n]
            assert len({p.index for p in unit}) == 1 and all(np.array_equal(p.frames, unit[0].frames) for p in unit)
            crops = [planner.view_of(u + j) % S for j in range(n)]
            assert crops == ([*range(S)] if n == S else [planner.view_of(u) % S])
    assert seen == Counter({key: 1 for key in reference})


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_cpu_decodes_each_unit_once_with_the_per_view_pixels(videos, codec: str) -> None:
    """VP9: one video decode per unit, sliced 3 times. MJPEG (frames as JPEG images): each image decoded once, in the
    union of the unit's 3 windows (``decoders.image_slice``), then sliced per view: the pixels of each view's own
    window decode."""
    if codec == "mjpeg":
        paths = [write_video(videos.root / f"views_mjpeg{i}.avi", textured_frames(24, 48, 64, 20 + i), "mjpeg",
                             pix_fmt="yuvj420p") for i in range(3)]
    else:
        paths = [*videos.good[:3], videos.portrait]
    cfg = _cfg(videos, "dali", paths)
    loader = build_loader(cfg, "test", device="cpu")
    assert loader.planner.views_per_unit == 3 and loader.jpeg_frames == (codec == "mjpeg")
    assert len(loader) == len(paths)  # videos x 2 clips = units of 3 views, 2 units a batch
    batches = list(loader)
    plans = _per_view_plans(cfg, loader.planner.videos)  # one rank: the units' views are today's order
    assert [i for b in batches for i in b.index.tolist()] == [p.index for p in plans]
    assert all(tuple(b.video.shape) == (6, 3, 4, 32, 32) for b in batches)
    reference, decoded_per_view = _dali_graph_clips(cfg, plans, loader.jpeg_frames)
    assert torch.equal(torch.cat([b.video for b in batches]), reference)  # bit-identical, view by view
    assert len({p.window for p in plans if p.path == str(paths[0])}) == 3  # the crops differ (landscape 48x64)
    # frames decoded: the pass decodes each unit once; the per-view decode 3 times
    assert loader.source.decoded * 3 == decoded_per_view == sum(loader.decoded_frames(plans))
    if codec == "mjpeg":  # every view's 4 frames were decoded as images of their own before
        assert decoded_per_view == 4 * len(plans)
    assert loader.source.decoded == sum(loader.decoded_frames(plans[::3])) > 0


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_the_gpu_graph_on_cpu_decoders_gives_the_cpu_graphs_clips(videos, codec: str) -> None:
    """The GPU graph (units of 3 views; MJPEG as JPEG frames, each decoded once in its unit's union window; the
    resize, mirror and normalise in DALI; ``to_clips``' GPU layout) run with CPU decoders, where it differs from
    the NVDEC/nvJPEG graph only in the decoders: each view equals the one-output GPU graph's clip exactly, and the
    CPU graph's (resize, mirror and normalise in torch) within one uint8 step. Every other unit mirrored (the graph
    mirrors a unit's views together; val/test units mirror none)."""
    from timesformer_harness.pipelines.base import CLIP_FORMAT

    jpeg = codec == "mjpeg"
    if jpeg:
        paths = [write_video(videos.root / f"twin_mjpeg{i}.avi", textured_frames(24, 48, 64, 40 + i), "mjpeg",
                             pix_fmt="yuvj420p") for i in range(2)]
    else:
        paths = [videos.good[0], videos.portrait]
    cfg = _cfg(videos, "dali", paths)
    planner = build_loader(cfg, "test", device="cpu").planner
    plans = [replace(p, flip=bool(k // 3 % 2)) for k, p in enumerate(_per_view_plans(cfg, planner.videos))]
    units, decoded_units = _dali_graph_clips(cfg, plans, jpeg, views=3, backend="gpu")
    per_view, decoded_per_view = _dali_graph_clips(cfg, plans, jpeg, backend="gpu")
    cpu, _ = _dali_graph_clips(cfg, plans, jpeg, views=3)
    assert units.shape == (len(plans), 3, 4, 32, 32) and units.is_contiguous(memory_format=CLIP_FORMAT)
    assert torch.equal(units, per_view) and decoded_units * 3 == decoded_per_view > 0
    one_step = 1 / (255 * min(cfg.std))
    diff = (units - cpu).abs()
    assert diff.max() <= one_step * 1.001, (diff.max(), one_step)
    assert diff.mean() < one_step / 2, diff.mean()  # the resizes round apart: about a quarter of the values
    assert not torch.equal(units[3], units[3].flip(-1))  # a mirrored view is not its own mirror image


def test_dali_decode_only_gives_each_view_its_units_frames(videos) -> None:
    """``decode_only`` (the decode-rate benchmark's loader): each view of a unit gets the unit's one decoded clip,
    the frames the one-output graph decodes for it alone."""
    paths = videos.good[:2]
    cfg = _cfg(videos, "dali", paths)
    planner = build_loader(cfg, "test", device="cpu").planner
    loader = DaliLoader(planner, torch.device("cpu"), decode_only=True)
    frames = torch.cat([b.video for b in loader])
    plans = _per_view_plans(cfg, planner.videos)
    source = PlanSource(len(plans), decode_only=True, prefetch=0)
    pipe = build_video_pipeline(source, batch_size=len(plans), crop=32, mean=cfg.mean, std=cfg.std, num_threads=1,
                                decode_only=True)
    pipe.build()
    source.start(plans)
    reference = to_clips(pipe.run(), plans, backend="cpu", decode_only=True, frames_per_clip=0, crop=32,
                         mean=cfg.mean, std=cfg.std, device=torch.device("cpu"))
    source.close()
    assert frames.shape == (len(plans), 4, 48, 64, 3) and torch.equal(frames, reference)
    assert loader.source.decoded * 3 == source.decoded > 0


def test_pyav_decodes_each_unit_once_with_the_per_view_pixels(videos, monkeypatch) -> None:
    paths = [*videos.good[:3], videos.portrait]
    cfg = _cfg(videos, "pyav", paths)
    loader = build_loader(cfg, "test", device="cpu")
    calls: list[int] = []
    decode_clip = pyav.decode_clip

    def counted(*args, **kw):
        got = decode_clip(*args, **kw)
        calls.append(got.decoded)
        return got

    plans = _per_view_plans(cfg, loader.planner.videos)
    per_view = sum(loader.decoded_frames(plans))  # today: every view decoded on its own
    monkeypatch.setattr(pyav, "decode_clip", counted)  # num_workers=0: decoded in this process
    batches = list(loader)
    assert len(calls) == len(plans) // 3 and sum(calls) * 3 == per_view
    monkeypatch.undo()
    assert [i for b in batches for i in b.index.tolist()] == [p.index for p in plans]
    reference = torch.stack([_pyav_per_view(cfg, p) for p in plans])
    assert torch.equal(torch.cat([b.video for b in batches]), reference)


@pytest.mark.parametrize("kind", ["dali", "pyav"])
def test_a_unit_that_fails_drops_all_its_views_each_listed(videos, kind: str) -> None:
    # a file that passes the pre-flight check and is then damaged on disk: its units fail at run time
    bad = videos.root / f"views_bad_{kind}.webm"
    bad.write_bytes(videos.good[2].read_bytes())
    cfg = _cfg(videos, kind, [videos.good[0], bad, videos.good[1]], num_ensemble_views=2, batch_size=6,
               on_bad_video="skip")
    loader = build_loader(cfg, "test", device="cpu", rank=1, world_size=2)  # units 1, 3, 5: clip 1 of each
    bad.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 4)
    scored = [(i, loader.planner.view_of(k)) for k, i in enumerate(i for b in loader for i in b.index.tolist())]
    assert sorted(scored) == [(0, 3), (0, 4), (0, 5), (2, 3), (2, 4), (2, 5)]
    assert sorted((u.index, u.view) for u in loader.unscored) == [(1, 3), (1, 4), (1, 5)]
    assert {u.path for u in loader.unscored} == {str(bad)} and loader.quarantine.paths() == {str(bad)}


def test_dali_a_unit_whose_decode_fails_is_decoded_again_alone_and_drops_its_views(videos) -> None:
    """A damaged payload fails the whole DALI batch without naming a clip: each unit of it is decoded again once,
    alone (a batch-1 pipeline of the same 3-output graph); the damaged video's unit drops its 3 views, the good unit
    of the same batch keeps its pixels."""
    (bad,) = make_corrupt_corpus([videos.good[1]], videos.root, n=1, kinds=("payload/mid",))  # a manifest name
    paths = [videos.good[0], bad.path, videos.good[2]]
    cfg = _cfg(videos, "dali", paths, num_frames=24, sampling_rate=1, num_ensemble_views=1, batch_size=6,
               on_bad_video="skip")  # every frame: every view's stream holds the damage
    loader = build_loader(cfg, "test", device="cpu")
    assert len(loader.planner.videos) == 3, loader.rejected
    batches = list(loader)
    plans = _per_view_plans(cfg, loader.planner.videos)
    kept = [p for p in plans if p.path != str(bad.path)]
    assert [i for b in batches for i in b.index.tolist()] == [p.index for p in kept] == [0, 0, 0, 2, 2, 2]
    assert [(u.index, u.view) for u in loader.unscored] == [(1, 0), (1, 1), (1, 2)]
    assert all(u.path == str(bad.path) and u.reason.startswith("DALI") for u in loader.unscored), loader.unscored
    assert loader.quarantine.paths() == {str(bad.path)}
    reference, _ = _dali_graph_clips(cfg, kept)
    assert torch.equal(torch.cat([b.video for b in batches]), reference)


def test_evaluation_scores_are_unchanged_on_the_toy_set(tmp_path) -> None:
    """Toy val (24 videos), 3 crops: the per-video scores and accuracy of a fixed model from the unit batches equal
    those from today's per-view clips (the same loader's decoder), batched the same way."""
    lines = (TOY / "val.csv").read_text().splitlines()[:24]
    (tmp_path / "val.csv").write_text("".join(f"{TOY / line}\n" for line in lines))
    cfg = DataConfig(loader="pyav", backend="cpu", root=str(TOY), val_manifest=str(tmp_path / "val.csv"),
                     num_frames=8, sampling_rate=3, test_crop_size=24, num_ensemble_views=1, num_spatial_crops=3,
                     batch_size=6, num_workers=0, validate_cache="none")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AvgPool3d((2, 4, 4)), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 6 * 6, 6))
    for kind in ("pyav", "dali"):
        loader = build_loader(replace(cfg, loader=kind), "val", device="cpu")
        got = score_loader(model, loader, torch.device("cpu"), None)
        plans = _per_view_plans(cfg, loader.planner.videos)
        if kind == "dali":
            per_view = list(_dali_graph_clips(cfg, plans)[0])
        else:
            per_view = [_pyav_per_view(cfg, p) for p in plans]
        want = ViewAccumulator()
        with torch.no_grad():
            for b in range(0, len(plans), cfg.batch_size):
                chunk = plans[b:b + cfg.batch_size]
                clips = stack_clips(per_view[b:b + cfg.batch_size])
                want.add(model(clips), torch.tensor([p.label for p in chunk]), torch.tensor([p.index for p in chunk]))
        assert sorted(got.scores) == sorted(want.scores) == list(range(24))
        assert all(torch.equal(got.scores[i], want.scores[i]) for i in want.scores), kind
        assert got.views == want.views == {i: 3 for i in range(24)}
        assert accuracy_report(got, 6, 3) == accuracy_report(want, 6, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dali_gpu_units_give_the_per_view_graphs_clips(videos) -> None:
    """NVDEC, with the resize and normalise in DALI: the unit graph's 3 outputs, interleaved, equal the one-output
    graph's clips view by view, from a third of its decoded frames. 144x192 VP9 (NVDEC's VP9 minimum is 128x128)."""
    from timesformer_harness.pipelines.base import CLIP_FORMAT

    paths = [encode_video(videos.root / f"views_gpu{i}.webm", textured_frames(24, 144, 192, 30 + i)) for i in range(2)]
    cfg = _cfg(videos, "dali", paths, backend="gpu", test_crop_size=128)
    cuda = torch.device("cuda", torch.cuda.current_device())
    loader = build_loader(cfg, "test", device=cuda)
    assert loader.backend == "gpu" and loader.planner.views_per_unit == 3 and len(loader) == 2
    batches = list(loader)
    assert all(b.video.is_cuda and b.video.is_contiguous(memory_format=CLIP_FORMAT) for b in batches)
    plans = _per_view_plans(cfg, loader.planner.videos)
    assert [i for b in batches for i in b.index.tolist()] == [p.index for p in plans]
    source = PlanSource(len(plans), backend="gpu", prefetch=0)
    pipe = build_video_pipeline(source, batch_size=len(plans), crop=cfg.test_crop_size, mean=cfg.mean, std=cfg.std,
                                backend="gpu", num_threads=1, device_id=cuda.index)
    pipe.build()
    source.start(plans)
    reference = to_clips(pipe.run(), plans, backend="gpu", decode_only=False, frames_per_clip=0,
                         crop=cfg.test_crop_size, mean=cfg.mean, std=cfg.std, device=cuda)
    source.close()
    assert torch.equal(torch.cat([b.video for b in batches]), reference)
    assert loader.source.decoded * 3 == source.decoded
