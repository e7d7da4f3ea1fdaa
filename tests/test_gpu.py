"""GPU tests of the real code paths (``pytest -m gpu``; ``make gpu-check`` runs them). Skipped without CUDA.

NVDEC through our DALI pipeline for every codec of the GPU list (whole clips and per-clip packet streams deep in a
file, frame for frame against PyAV), and the NVDEC limits of ``timesformer_harness.pipelines.nvdec`` checked against
this GPU's driver; VP9 below NVDEC's minimum decoded by DALI on the CPU for a CUDA model (``data.backend=auto``); DALI
GPU vs CPU frames; the Trainer's fp16 + GradScaler and bf16 steps with per-window and validation peak memory; every SDPA
backend through the model against ``naive``, the Triton temporal attention against SDPA (eager and compiled), and
the attention-backend check against SDPA's own refusals; gpu-input's PyNvVideoCodec decoders against the PyAV
loader's clips (when the package is installed); the
profiler's summary in GPU time; NCCL and DDP under torchrun's environment; CUDA memory through
``timesformer_harness.metrics``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import textured_frames
from timesformer_harness.config import REPO_ROOT, load_config
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.dali import jpeg_libraries_missing
from timesformer_harness.pipelines.factory import dali_available
from timesformer_harness.pipelines.nvdec import DALI_CPU_CODECS, NVDEC_CODECS, generation_of, nvdec_problem
from timesformer_harness.pipelines.base import CLIP_FORMAT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
# The NVDEC tests decode through DALI: on a machine without it they are skipped with the reason (make gpu-check
# reports it), and the rest of the GPU tests still run.
DALI_MISSING = dali_available()
needs_dali = pytest.mark.skipif(bool(DALI_MISSING), reason=f"{DALI_MISSING}: pip install nvidia-dali-cuda120")
# nvJPEG through DALI needs nvImageCodec and libnvjpeg beside it (pip brings them; a DALI copied by hand may not, and
# without libnvjpeg DALI's mixed image decoder would decode on the CPU and these tests would not test nvJPEG)
JPEG_MISSING = "" if DALI_MISSING else (jpeg_libraries_missing(gpu=True) or "")
needs_nvjpeg = pytest.mark.skipif(bool(JPEG_MISSING), reason=JPEG_MISSING)
# codec -> (PyAV encoder, container); each clip 160x160, above every NVDEC minimum (HEVC: 144x144)
ENCODERS = {"h264": ("libx264", ".mp4"), "hevc": ("libx265", ".mp4"), "vp8": ("libvpx", ".webm"),
            "vp9": ("libvpx-vp9", ".webm"), "av1": ("libsvtav1", ".mkv"), "mpeg4": ("mpeg4", ".mp4")}
OPTIONS = {"libx264": {"preset": "ultrafast", "g": "8"}, "libx265": {"preset": "ultrafast"},
           "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "g": "8"}, "libsvtav1": {"preset": "10"}}
TINY = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=4",
        "model.num_frames=4", "model.num_classes=10", "model.drop_path_rate=0.0", "data.num_frames=4",
        "data.train_crop_size=32", "data.test_crop_size=32"]
# Decode one clip of argv[1] with DALI's GPU decoder, bypassing the pre-flight check: what NVDEC itself does. In its
# own process: a refusal raised from inside NVDEC's parser callback may abort the process instead of raising.
DECODE_ONE = """
import sys, torch
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.base import ClipPlanner, Video
from timesformer_harness.pipelines.dali import DaliLoader
from timesformer_harness.pipelines.validate import probe_video
info = probe_video(sys.argv[1])
cfg = DataConfig(num_frames=4, sampling_rate=2, num_spatial_crops=1, batch_size=1)
video = Video(0, sys.argv[1], 0, info.frames, info.fps, info.height, info.width)
batch = next(iter(DaliLoader(ClipPlanner(cfg, "test", [video]), torch.device("cuda"), backend="gpu",
                             decode_only=True)))
print("DECODED", tuple(batch.video.shape))
"""


def _encode(path: Path, codec: str, width: int, height: int, frames: int = 16, seed: int = 0) -> str:
    import av

    from timesformer_harness.pipelines.tools.encode import write_video

    encoder = ENCODERS[codec][0]
    if encoder not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {encoder} encoder")
    return str(write_video(path, textured_frames(frames, height, width, seed), encoder, 30, OPTIONS.get(encoder)))


def _data_cfg(folder: Path, paths: list[str], **kw) -> DataConfig:
    manifest = folder / "test.csv"
    manifest.write_text("".join(f"{p} {i % 2}\n" for i, p in enumerate(paths)))
    base = DataConfig(loader="dali", backend="gpu", root=str(folder), test_manifest=str(manifest), num_frames=4,
                      sampling_rate=2, test_crop_size=64, num_spatial_crops=1, batch_size=len(paths), num_workers=2,
                      validate_cache="none")
    return replace(base, **kw)


def _assert_same_train_clips(batch, ref, what: str) -> None:
    """``batch`` (a GPU loader's train clips) is ``ref``'s: the loaders' layout, the same videos, each clip within 8
    levels of 255 on average and nearer to ``ref``'s than to its mirror image (the same flips)."""
    assert batch.video.is_contiguous(memory_format=CLIP_FORMAT) and torch.equal(batch.index.cpu(), ref.index)
    diff = (batch.video.cpu() - ref.video).abs().mean(dim=(1, 2, 3, 4)) * 0.225 * 255
    mirrored = (batch.video.cpu() - ref.video.flip(-1)).abs().mean(dim=(1, 2, 3, 4)) * 0.225 * 255
    assert (diff < 8).all() and (diff < mirrored).all(), f"|{what}| per clip {diff}, mirrored {mirrored}"


def _probe(path: str):
    from timesformer_harness.pipelines.validate import probe_video

    return probe_video(path)


def _nvdec_refuses(path: str) -> str:
    """DALI's GPU decoder fails on ``path`` (in a child process); its output, for the reason."""
    out = subprocess.run([sys.executable, "-c", DECODE_ONE, path], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "DECODED" not in out.stdout, f"NVDEC decoded {path}: {out.stdout}"
    return out.stdout + out.stderr


def _dali_direct(cfg: DataConfig, paths: list[str], backend: str, decode_only: bool = False,
                 jpeg_frames: bool = False):
    """A DALI loader over ``paths`` without the pre-flight check: what NVDEC itself does with the files."""
    from timesformer_harness.pipelines.base import ClipPlanner, Video
    from timesformer_harness.pipelines.dali import DaliLoader
    from timesformer_harness.pipelines.validate import probe_video

    infos = [probe_video(p) for p in paths]
    videos = [Video(i, p, i % 2, info.frames, info.fps, info.height, info.width) for i, (p, info) in
              enumerate(zip(paths, infos))]
    return DaliLoader(ClipPlanner(cfg, "test", videos), CUDA, backend=backend, decode_only=decode_only,
                      jpeg_frames=jpeg_frames)


@pytest.fixture(scope="module")
def generation() -> str:
    return generation_of(CUDA)


# ------------------------------------------------------------------------------------------ NVDEC

@needs_dali
@pytest.mark.parametrize("codec", sorted(NVDEC_CODECS))
def test_nvdec_decodes_each_codec_through_our_pipeline(codec: str, generation: str, tmp_path: Path) -> None:
    from timesformer_harness.pipelines.factory import build_loader

    ext = ENCODERS[codec][1]
    paths = [_encode(tmp_path / f"clip{i}{ext}", codec, 160, 160, seed=i) for i in range(2)]
    cfg = _data_cfg(tmp_path, paths)
    if problem := nvdec_problem(_probe(paths[0]), generation):  # e.g. AV1 on Hopper: the table says no
        with pytest.raises(ValueError, match="NVDEC on"):
            build_loader(cfg, "test", device=CUDA)  # the pre-flight check refuses it...
        _nvdec_refuses(paths[0])  # ...and so does this GPU: the table is right
        pytest.skip(f"{codec} on this GPU: {problem} (checked: DALI's GPU decoder refuses it too)")
    batch = next(iter(build_loader(cfg, "test", device=CUDA)))
    assert batch.video.is_cuda and tuple(batch.video.shape) == (2, 3, 4, 64, 64)
    assert torch.isfinite(batch.video).all() and batch.video.std() > 0.1
    ref = next(iter(build_loader(replace(cfg, loader="pyav"), "test", device="cpu")))  # FFmpeg's decode
    assert torch.equal(batch.index.cpu(), ref.index)
    diff = ((batch.video.cpu() - ref.video).abs() * 0.225 * 255).mean()
    assert diff < 8, f"{codec}: mean |NVDEC - PyAV| = {diff:.2f} on the 0-255 scale"


@needs_dali
@pytest.mark.parametrize("codec", sorted(NVDEC_CODECS))
def test_nvdec_minimum_frame_size_matches_the_table(codec: str, generation: str, tmp_path: Path) -> None:
    """A clip at the table's minimum decodes; one 16 px narrower is refused by the driver, as the table says."""
    limits = NVDEC_CODECS[codec]
    if generation not in limits.generations:
        pytest.skip(f"{codec} is not decoded by NVDEC on {generation} (see the codec test)")
    (w, h), ext = limits.min_size, ENCODERS[codec][1]
    at_min = _encode(tmp_path / f"min{ext}", codec, w, h, frames=8)
    below = _encode(tmp_path / f"below{ext}", codec, w - 16, h, frames=8)
    cfg = _data_cfg(tmp_path, [at_min], batch_size=1)
    assert nvdec_problem(_probe(at_min), generation) == ""
    frames = next(iter(_dali_direct(cfg, [at_min], "gpu", decode_only=True))).video
    assert tuple(frames.shape) == (1, 4, h, w, 3)
    assert "below NVDEC's" in nvdec_problem(_probe(below), generation)
    assert "too small" in _nvdec_refuses(below)  # DALI: "Video is too small in at least one dimension"


@needs_dali
def test_mjpeg_is_not_decoded_by_dalis_gpu_decoder(tmp_path: Path) -> None:
    from timesformer_harness.pipelines.tools.encode import write_video

    path = str(write_video(tmp_path / "clip.avi", textured_frames(8, 160, 160, 0), "mjpeg", 30,
                           pix_fmt="yuvj420p"))
    assert "mjpeg" in DALI_CPU_CODECS and nvdec_problem(_probe(path)).startswith("codec mjpeg")
    assert re.search("not supported by the GPU variant|Failed to create video decoder", _nvdec_refuses(path))


@needs_dali
@needs_nvjpeg
def test_an_mjpeg_set_on_the_gpu_is_decoded_by_nvjpeg_like_the_cpu_jpeg_frames(tmp_path: Path) -> None:
    """data.backend=gpu on an all-MJPEG set: the pre-flight check accepts it (nvJPEG, not NVDEC, decodes it), the
    DALI loader decodes its frames as JPEG images on the GPU and resizes, flips and normalises them there; its
    frames are libjpeg-turbo's (the CPU JPEG-frames loader's) and its train clips the CPU loader's (windows, flips),
    in the loaders' layout. data.backend=auto keeps MJPEG on the CPU."""
    from timesformer_harness.pipelines.factory import build_loader
    from timesformer_harness.pipelines.tools.encode import write_video

    paths = [str(write_video(tmp_path / f"mj{i}.avi", textured_frames(48, 160, 192, 20 + i), "mjpeg", 30,
                             pix_fmt="yuvj420p")) for i in range(2)]
    cfg = _data_cfg(tmp_path, paths, num_frames=4, sampling_rate=8)
    gpu = _dali_direct(cfg, paths, "gpu", decode_only=True, jpeg_frames=True)
    cpu = _dali_direct(cfg, paths, "cpu", decode_only=True, jpeg_frames=True)
    a, b = next(iter(gpu)).video, next(iter(cpu)).video
    assert a.is_cuda and a.dtype == torch.uint8 and tuple(a.shape) == tuple(b.shape) == (2, 4, 160, 192, 3)
    diff = (a.cpu().int() - b.cpu().int()).abs().float().mean(dim=(2, 3, 4))
    assert diff.max() < 3, f"mean |nvJPEG - libjpeg-turbo| per frame: {diff}"
    manifest = tmp_path / "train.csv"
    manifest.write_text("".join(f"{p} {i % 2}\n" for i, p in enumerate(paths * 4)))
    train = replace(cfg, train_manifest=str(manifest), train_crop_size=64, train_jitter_scales=[80, 120], batch_size=8,
                    loader="auto")
    loader = build_loader(train, "train", device=CUDA)
    assert type(loader).__name__ == "DaliLoader" and loader.backend == "gpu" and loader.jpeg_frames
    flips = [p.flip for p in loader.planner.plans(0)]
    assert any(flips) and not all(flips), flips
    ref = next(iter(build_loader(replace(train, backend="cpu"), "train", device="cpu")))
    _assert_same_train_clips(next(iter(loader)), ref, "nvJPEG loader - CPU")
    auto = build_loader(replace(train, backend="auto", decode_rates="none"), "train", device=CUDA)
    assert auto.backend == "cpu" and auto.jpeg_frames  # no measured table: the rule order keeps MJPEG on the CPU


@needs_dali
@needs_nvjpeg
def test_jpeg_frame_folders_on_the_gpu_load_the_very_batches_of_their_mjpeg_videos(tmp_path: Path) -> None:
    """data.backend=gpu on frame folders that hold MJPEG videos' own JPEG images: nvJPEG decodes the same bytes, so
    the train batches equal those of the videos themselves, exactly, on the GPU."""
    from timesformer_harness.pipelines.factory import build_loader
    from timesformer_harness.pipelines.tools.encode import mjpeg_frame_folder, write_video

    videos = [str(write_video(tmp_path / f"mj{i}.avi", textured_frames(48, 160, 192, 30 + i), "mjpeg", 30,
                              pix_fmt="yuvj420p")) for i in range(2)]
    folders = [str(mjpeg_frame_folder(v, tmp_path / f"frames{i}")) for i, v in enumerate(videos)]
    loaders = []
    for name, paths in (("videos", videos), ("folders", folders)):
        manifest = tmp_path / f"{name}.csv"
        manifest.write_text("".join(f"{p} {i % 2}\n" for i, p in enumerate(paths * 4)))
        cfg = replace(_data_cfg(tmp_path, paths, num_frames=4, sampling_rate=8), train_manifest=str(manifest),
                      train_crop_size=64, train_jitter_scales=[80, 120], batch_size=8, backend="gpu")
        loaders.append(build_loader(cfg, "train", device=CUDA))
    assert all(type(x).__name__ == "DaliLoader" and x.backend == "gpu" and x.jpeg_frames for x in loaders)
    for a, b in zip(*loaders, strict=True):
        assert a.video.is_cuda and torch.equal(a.video, b.video) and torch.equal(a.label, b.label)


@needs_dali
def test_vp9_below_nvdecs_minimum_is_decoded_on_the_cpu_for_a_cuda_model(tmp_path: Path) -> None:
    """The embedded default's case (32x32 VP9, below NVDEC's 128x128): data.backend=auto decodes it with DALI on
    the CPU and delivers the clips on the GPU; data.backend=gpu refuses it."""
    from timesformer_harness.pipelines.factory import build_loader

    paths = [_encode(tmp_path / f"toy{i}.webm", "vp9", 32, 32, frames=16, seed=i) for i in range(2)]
    cfg = _data_cfg(tmp_path, paths, backend="auto", loader="auto", test_crop_size=32)
    loader = build_loader(cfg, "test", device=CUDA)
    assert type(loader).__name__ == "DaliLoader" and loader.backend == "cpu"
    batch = next(iter(loader))
    assert batch.video.is_cuda and tuple(batch.video.shape) == (2, 3, 4, 32, 32)
    ref = next(iter(build_loader(replace(cfg, loader="pyav"), "test", device="cpu")))
    diff = ((batch.video.cpu() - ref.video).abs() * 0.225 * 255).mean()
    assert diff < 8, f"mean |DALI CPU - PyAV| = {diff:.2f} on the 0-255 scale"
    with pytest.raises(ValueError, match="below NVDEC's VP9 minimum of 128x128"):
        build_loader(replace(cfg, backend="gpu", loader="dali"), "test", device=CUDA)


@needs_dali
@pytest.mark.parametrize("codec", sorted(NVDEC_CODECS))
def test_gpu_loader_decodes_clip_streams_frame_for_frame(codec: str, generation: str, tmp_path: Path) -> None:
    """Clips that start past several keyframes (GOP 8, views at frames 0, ~16, ~32 of 64): the GPU loader feeds
    NVDEC per-clip streams cut from the files' byte ranges (IVF for VP8/VP9, Annex-B in IVF for H.264, Matroska for
    HEVC, AV1 and MPEG-4; no PyAV remux) and each decoded frame is PyAV's frame of the planned index; the full graph
    matches the PyAV loader's clips, test views and train clips (scales, crops, flips) alike, in the loaders'
    layout."""
    import av

    from timesformer_harness.pipelines.pyav import decode_frames

    encoder, ext = ENCODERS[codec]
    if encoder not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {encoder} encoder")
    from timesformer_harness.pipelines.tools.encode import write_video

    options = {**OPTIONS.get(encoder, {}), "g": "8"}
    paths = [str(write_video(tmp_path / f"deep{i}{ext}", textured_frames(64, 160, 160, i), encoder, 30, options))
             for i in range(2)]
    if problem := nvdec_problem(_probe(paths[0]), generation):
        pytest.skip(f"{codec} on this GPU: {problem}")
    cfg = _data_cfg(tmp_path, paths, num_frames=4, sampling_rate=4, num_ensemble_views=3, batch_size=6)
    loader = _dali_direct(cfg, paths, "gpu", decode_only=True)
    plans = loader.planner.plans(0)
    modes = {x.mode for x in loader.clip_inputs(plans)}
    assert modes == {"stream"}, modes
    frames = next(iter(loader)).video.cpu().int()  # (6, 4, 160, 160, 3)
    for plan, clip in zip(plans, frames):
        every = decode_frames(plan.path, np.arange(64)).astype(int)
        nearest = [int((torch.from_numpy(every) - f).abs().float().mean(dim=(1, 2, 3)).argmin()) for f in clip]
        assert nearest == plan.frames.tolist(), f"{codec}: NVDEC frames {nearest}, planned {plan.frames.tolist()}"
    from timesformer_harness.pipelines.factory import build_loader

    full = next(iter(build_loader(cfg, "test", device=CUDA)))
    ref = next(iter(build_loader(replace(cfg, loader="pyav"), "test", device="cpu")))
    diff = ((full.video.cpu() - ref.video).abs() * 0.225 * 255).mean()
    assert torch.equal(full.index.cpu(), ref.index) and diff < 8, f"{codec}: mean |GPU loader - PyAV| = {diff:.2f}"
    # train clips (random scales, crops and flips): the PyAV loader's windows and flips, in the loaders' layout
    manifest = tmp_path / "train.csv"
    manifest.write_text("".join(f"{p} {i % 2}\n" for i, p in enumerate(paths * 4)))
    train = replace(cfg, train_manifest=str(manifest), train_crop_size=64, train_jitter_scales=[80, 120], batch_size=8)
    loader = build_loader(train, "train", device=CUDA)
    flips = [p.flip for p in loader.planner.plans(0)]
    assert any(flips) and not all(flips), flips
    ref = next(iter(build_loader(replace(train, loader="pyav"), "train", device="cpu")))
    _assert_same_train_clips(next(iter(loader)), ref, f"{codec}: GPU - PyAV")


@pytest.mark.skipif(importlib.util.find_spec("PyNvVideoCodec") is None,
                    reason="PyNvVideoCodec is not installed (pip install pynvvideocodec)")
def test_pynvvideocodec_sessions_give_the_pyav_loaders_train_clips(tmp_path: Path) -> None:
    """gpu-input's PyNvVideoCodec row (``benchmarks.session_decode``) on NVDEC: H.264 GOP 8 clips with B-frames (as
    ``prepare`` writes them) deep in their files, decoded by two threads' decoders kept across clips and moved from
    file to file, finished on the GPU, are the PyAV loader's train clips (windows, flips, the loaders' layout), within
    NVDEC's colour conversion (BT.709 for untagged files, PyAV's BT.601)."""
    import av

    from timesformer_harness.benchmarks.session_decode import SessionDecodedClips, import_pynvvideocodec
    from timesformer_harness.pipelines.factory import build_loader
    from timesformer_harness.pipelines.tools.encode import write_video

    if "libx264" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx264 encoder")
    try:
        import_pynvvideocodec()
    except Exception as e:  # noqa: BLE001 - installed but not usable here (driver, container capabilities)
        pytest.skip(f"PyNvVideoCodec does not import here: {type(e).__name__}: {str(e)[:300]}")
    options = {"preset": "fast", "g": "8", "bf": "3"}
    paths = [str(write_video(tmp_path / f"deep{i}.mp4", textured_frames(64, 160, 160, i), "libx264", 30, options))
             for i in range(2)]
    manifest = tmp_path / "train.csv"
    manifest.write_text("".join(f"{p} {i % 2}\n" for i, p in enumerate(paths * 4)))
    cfg = replace(_data_cfg(tmp_path, paths), loader="pyav", backend="cpu", train_manifest=str(manifest),
                  train_crop_size=64, train_jitter_scales=[80, 120], batch_size=8)
    ref_loader = build_loader(cfg, "train", device="cpu")
    assert any(p.flip for p in ref_loader.planner.plans(0)) and not all(p.flip for p in ref_loader.planner.plans(0))
    clips = SessionDecodedClips(ref_loader.planner, CUDA, threads=2)
    try:
        batch = next(iter(clips))
    finally:
        clips.close()
    assert batch.video.is_cuda and 1 <= clips.sessions <= 2 and clips.reconfigured >= 1
    _assert_same_train_clips(batch, next(iter(ref_loader)), "PyNvVideoCodec - PyAV")


@needs_dali
def test_dali_gpu_and_cpu_decode_the_same_vp9_frames(tmp_path: Path) -> None:
    paths = [_encode(tmp_path / f"clip{i}.webm", "vp9", 192, 160, frames=24, seed=i) for i in range(3)]
    cfg = _data_cfg(tmp_path, paths, num_frames=8, sampling_rate=3)
    gpu = next(iter(_dali_direct(cfg, paths, "gpu", decode_only=True))).video
    cpu = next(iter(_dali_direct(cfg, paths, "cpu", decode_only=True))).video
    assert gpu.is_cuda and gpu.dtype == torch.uint8 and tuple(gpu.shape) == tuple(cpu.shape) == (3, 8, 160, 192, 3)
    diff = (gpu.cpu().int() - cpu.cpu().int()).abs().float().mean(dim=(2, 3, 4))  # per clip and frame
    assert diff.max() < 4, f"mean |NVDEC - libvpx| per frame: {diff}"


# ------------------------------------------------------------------------------------------ training, attention

@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_trainer_amp_steps(precision: str, tmp_path: Path) -> None:
    from timesformer_harness.distributed import init_distributed
    from timesformer_harness.runtime import autocast
    from timesformer_harness.train import Trainer

    cfg = load_config(None, [*TINY, "data.loader=synthetic", "data.batch_size=4", "data.synthetic_videos=32",
                             f"train.precision={precision}", "solver.max_epoch=1", "train.max_steps_per_epoch=4",
                             "solver.global_batch_size=0", "train.eval_period=1", "train.log_period=1",
                             "data.num_ensemble_views=1", "data.num_spatial_crops=1", "test.batch_size=4",
                             f"output.dir={tmp_path}", "output.tensorboard=false"])
    trainer = Trainer(cfg, init_distributed(cfg.dist))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert trainer.device.type == "cuda" and trainer.dtype is dtype
    assert trainer.scaler.is_enabled() is (precision == "fp16")
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.fit() == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    losses = [r["train/loss"] for r in records if r["event"] == "train"]
    assert start["precision"] == precision and len(losses) == 4 and all(np.isfinite(losses))
    assert "fused=True" in start["optimizer"] or start["optimizer"].startswith("apex.")
    assert all(r.get("memory/peak_cuda_allocator_gib", 0) > 0 for r in records if r["event"] == "train")
    assert next(r for r in records if r["event"] == "val")["memory/val_peak_cuda_allocator_gib"] > 0
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    if precision == "fp16":
        assert trainer.scaler.get_scale() > 0
    with torch.no_grad(), autocast(CUDA, dtype):  # the forward really runs in the autocast dtype
        assert trainer.model(torch.randn(2, 3, 4, 32, 32, device=CUDA)).dtype is dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None], ids=["bf16", "fp16", "fp32"])
def test_every_sdpa_backend_through_the_model_matches_naive(dtype: torch.dtype | None) -> None:
    from timesformer_harness.model import create_model
    from timesformer_harness.runtime import autocast
    from timesformer_harness.kernels.attention import available_backends

    cfg = load_config(None, [*TINY, "model.embed_dim=128", "model.num_heads=2"]).model  # head_dim 64
    backends = available_backends(CUDA, dtype, head_dim=64)
    assert "naive" in backends and "math" in backends
    if dtype is not None and torch.cuda.get_device_capability() >= (8, 0):
        assert "flash" in backends, f"flash SDPA did not run in {dtype} here: {backends}"
    torch.manual_seed(0)
    ref_model = create_model(replace(cfg, attn_backend="naive")).to(CUDA)
    with torch.no_grad():  # move the zero-initialised temporal parts off zero so temporal attention counts
        for p in ref_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(2, 3, 4, 32, 32, device=CUDA)

    def run(backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = create_model(replace(cfg, attn_backend=backend)).to(CUDA)
        model.load_state_dict(ref_model.state_dict())
        with autocast(CUDA, dtype):
            logits = model(x)
        logits.float().square().sum().backward()
        return logits.float().detach(), {n: p.grad.float() for n, p in model.named_parameters()}

    ref_logits, ref_grads = run("naive")
    tol = 1e-3 if dtype is None else 5e-2
    for backend in backends:
        logits, grads = run(backend)
        err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
        assert err < tol, f"{backend}: logits differ from naive by {err:.2e} (relative)"
        for name, g in grads.items():
            gerr = ((g - ref_grads[name]).norm() / (ref_grads[name].norm() + 1e-12)).item()
            assert gerr < 2 * tol, f"{backend}: grad of {name} differs from naive by {gerr:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None], ids=["bf16", "fp16", "fp32"])
def test_triton_temporal_attention_matches_sdpa_eager_and_compiled(dtype: torch.dtype | None) -> None:
    """``temporal_attn_backend=triton`` (the Triton kernel on the GPU, not its interpreter): ViT-B's head size at
    T = 8, logits and gradients against the SDPA model, eager, and in bf16 (the recipes' precision; one compilation
    keeps the GPU check short) also under ``torch.compile(fullgraph=True)`` (the kernel is a ``triton_op``: a graph
    break would fail)."""
    pytest.importorskip("triton")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the triton backend needs sm80 or newer")
    from timesformer_harness.kernels.attention import triton_build_problem

    if problem := triton_build_problem():  # the machine's, not the kernel's: said as the skip's reason
        pytest.skip(problem)
    from timesformer_harness.model import create_model
    from timesformer_harness.runtime import autocast

    cfg = load_config(None, [*TINY, "model.embed_dim=128", "model.num_heads=2", "model.num_frames=8"]).model
    torch.manual_seed(0)
    ref_model = create_model(cfg).to(CUDA)
    with torch.no_grad():  # temporal_fc starts at zero, which would hide the temporal pass
        for p in ref_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(4, 3, 8, 32, 32, device=CUDA)

    def run(backend: str, compiled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = create_model(replace(cfg, temporal_attn_backend=backend)).to(CUDA)
        model.load_state_dict(ref_model.state_dict())
        forward = torch.compile(model, fullgraph=True) if compiled else model
        with autocast(CUDA, dtype):
            logits = forward(x)
        logits.float().square().sum().backward()
        return logits.float().detach(), {n: p.grad.float() for n, p in model.named_parameters()}

    ref_logits, ref_grads = run("math", compiled=False)
    tol = 1e-3 if dtype is None else 5e-2
    for compiled in (False, True) if dtype is torch.bfloat16 else (False,):
        logits, grads = run("triton", compiled)
        err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
        assert err < tol, f"compiled={compiled}: logits differ from SDPA math by {err:.2e} (relative)"
        for name, g in grads.items():
            gerr = ((g - ref_grads[name]).norm() / (ref_grads[name].norm() + 1e-12)).item()
            assert gerr < 2 * tol, f"compiled={compiled}: grad of {name} differs from SDPA math by {gerr:.2e}"


def test_check_backend_refusals_match_sdpa_on_this_gpu() -> None:
    from timesformer_harness.model import load_preset
    from timesformer_harness.workload import build_model
    from timesformer_harness.kernels.attention import attention, check_backend

    cap = torch.cuda.get_device_capability()
    q = torch.randn(1, 2, 16, 64, device=CUDA)
    for backend in ("flash", "cudnn"):
        with pytest.raises(ValueError, match="takes fp16/bf16|needs an sm80"):
            check_backend(backend, CUDA, torch.float32, cap)
        with pytest.raises(ValueError, match=f"model.attn_backend={backend} (takes fp16/bf16|needs an sm80)"):
            build_model(replace(load_preset("tiny"), attn_backend=backend), CUDA)  # fp32: refused before building
        with pytest.raises(RuntimeError):  # what the check saves the user from: SDPA's own failure
            attention(q, q, q, backend)


def test_profile_summary_is_in_gpu_time(tmp_path: Path) -> None:
    from timesformer_harness.bench import resolve
    from timesformer_harness.profiling import run_profile

    cfg = resolve(preset="tiny", overrides=["model.attention_type=divided_space_time", "bench.batch_size=4"])[0]
    s = run_profile(cfg, "tiny", steps=2, wait=1, warmup=1, out_root=tmp_path)
    assert s.time_basis == "GPU" and 0 < s.step_device_ms and 0 < s.forward_device_ms <= s.step_device_ms
    for name in ("attn/temporal", "attn/spatial"):
        assert 0 < s.range_share_of_step[name] < s.range_share_of_forward[name] < 1, (name, s)
    assert s.peak_mem_kind == "cuda_allocator" and s.top_ops and s.top_ops[0][1] > 0
    text = (Path(s.run_dir) / "summary.md").read_text()
    assert "| GPU ms per step |" in text and re.search(r"Attention in total.*?[\d.]+% of the step", text)


# ------------------------------------------------------------------------------------------ distributed, memory

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_over_nccl_under_torchrun(tmp_path: Path) -> None:
    """harness/train.py under torchrun, one rank per GPU (2 when 2 are visible): init_distributed, DDP, NCCL."""
    nprocs = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
           "harness/train.py", "--config", "configs/exp/k400_divst_8x32_224.yaml", *TINY, "data.loader=synthetic",
           f"data.synthetic_videos={8 * nprocs}", "data.batch_size=2", "solver.global_batch_size=0",
           "solver.max_epoch=1", "train.max_steps_per_epoch=2", "dist.backend=nccl", f"output.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    end = next(r for r in records if r["event"] == "end")
    assert start["world_size"] == nprocs and len(end["param_digests"]) == nprocs
    assert len(set(end["param_digests"])) == 1  # the ranks ended with identical weights
    if nprocs == 2:
        assert "distributed: nccl, world size 2" in out.stderr


NCCL_ONE_RANK = """
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
torch.cuda.set_device(0)
dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
t = torch.full((4,), 3.0, device="cuda")
dist.all_reduce(t)
model = DDP(torch.nn.Linear(8, 2).cuda(), device_ids=[0])
model(torch.randn(4, 8, device="cuda")).sum().backward()
assert t.tolist() == [3.0] * 4 and model.module.weight.grad is not None
dist.destroy_process_group()
print("NCCL_OK")
"""


def test_nccl_process_group_and_ddp_step_with_torchrun_environment() -> None:
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    out = subprocess.run([sys.executable, "-c", NCCL_ONE_RANK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "NCCL_OK" in out.stdout, out.stderr[-3000:]


def test_cuda_memory_through_metrics() -> None:
    from timesformer_harness.metrics import PeakMemory, time_steps

    window = PeakMemory(CUDA)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=CUDA)
    peak = window.take()
    assert peak.kind == "cuda_allocator" and peak.growth >= 64 * 2**20
    del block
    window.reset()  # a new window starts from what is allocated now (take() began one while the block was alive)
    small = window.take()
    assert small.peak < peak.peak and small.start == torch.cuda.memory_allocated(CUDA)
    a = torch.randn(2048, 2048, device=CUDA)
    times = time_steps(lambda: a @ a, CUDA, warmup=1, steps=3)  # synchronised: each time covers the kernel
    assert len(times) == 3 and min(times) > 0


def test_sync_counter_sees_blocking_reads_and_not_pinned_copies() -> None:
    from timesformer_harness.counting import SyncCounter

    x = torch.ones(4, device=CUDA)
    pinned = torch.ones(4).pin_memory()
    with SyncCounter(CUDA) as syncs:
        pinned.to(CUDA, non_blocking=True)
        (x * 2).sum()
        assert syncs.count == 0
        x.sum().item()
        x.cpu()
        x.tolist()
    assert syncs.count == 3 and torch.cuda.get_sync_debug_mode() == 0


def test_trainer_micro_batch_syncs_exactly_once(tmp_path: Path) -> None:
    """The step loop's one read per micro-batch, counted by CUDA's sync debug mode (train.count_syncs)."""
    from timesformer_harness.distributed import init_distributed
    from timesformer_harness.train import Trainer

    cfg = load_config(None, [*TINY, "data.loader=synthetic", "data.batch_size=4", "data.synthetic_videos=48",
                             "solver.max_epoch=1", "solver.global_batch_size=8", "train.eval_period=0",
                             "train.log_period=1", "train.count_syncs=true", f"output.dir={tmp_path}",
                             "output.tensorboard=false"])
    assert Trainer(cfg, init_distributed(cfg.dist)).fit() == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    counted = [r for r in records if "debug/syncs_per_micro_batch_max" in r]
    assert counted and max(r["debug/syncs_per_micro_batch_max"] for r in counted) <= 1, counted
    # and the one read each micro-batch makes (its loss, read back) is seen: a count of 0 would be a blind counter
    assert all(r["debug/syncs_per_micro_batch"] >= 1 for r in counted), counted


def test_kernel_time_is_the_gpus_busy_time() -> None:
    from timesformer_harness.metrics import kernel_time

    a = torch.randn(4096, 4096, device=CUDA)
    a @ a
    one = kernel_time(lambda: a @ a, CUDA, steps=3)
    two = kernel_time(lambda: (a @ a, a @ a), CUDA, steps=3)
    assert one is not None and one.ops_per_step == 1 and one.ms_per_step > 0
    assert two.ops_per_step == 2 and 1.5 < two.ms_per_step / one.ms_per_step < 2.5
