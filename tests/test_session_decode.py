"""gpu-input's PyNvVideoCodec row (``benchmarks.session_decode``) on the CPU: its clips are the PyAV loader's, clip
for clip, when its decoder returns the frames PyAV decodes. The stand-in decoder below has PyNvVideoCodec's
``SimpleDecoder`` interface as the package documents it (keyword arguments, ``reconfigure_decoder``,
``get_batch_frames_by_index`` returning each requested index once, in ascending order, as DLPack frames)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from timesformer_harness.benchmarks.session_decode import SessionDecodedClips
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.factory import build_loader
from timesformer_harness.pipelines.pyav import decode_frames
from timesformer_harness.pipelines.transforms import resize_in_float, resize_window


class PyAVSimpleDecoder:
    """PyNvVideoCodec's ``SimpleDecoder`` surface over PyAV: RGB frames in host memory (numpy arrays speak DLPack)."""

    made: list[str] = []

    def __init__(self, enc_file_path: str, gpu_id: int = 0, cuda_context: int = 0, cuda_stream: int = 0,
                 use_device_memory: bool = True, max_width: int = 0, max_height: int = 0,
                 need_scanned_stream_metadata: int = 0, decoder_cache_size: int = 4,
                 output_color_type: str = "NATIVE", bWaitForSessionWarmUp: bool = False,  # noqa: N803
                 enableDecodeStats: bool = False):  # noqa: N803
        assert output_color_type == "RGB" and not use_device_memory and cuda_context == cuda_stream == 0
        self.path = enc_file_path
        self.made.append(enc_file_path)

    def reconfigure_decoder(self, new_source: str) -> None:
        self.path = new_source

    def get_batch_frames_by_index(self, indices: list[int]) -> list[np.ndarray]:
        unique = sorted(set(indices))  # as the package does: each index once, ascending
        return list(decode_frames(self.path, unique))


def _nvc() -> SimpleNamespace:
    PyAVSimpleDecoder.made = []
    return SimpleNamespace(SimpleDecoder=PyAVSimpleDecoder, OutputColorType=SimpleNamespace(RGB="RGB", RGBP="RGBP"))


def _cfg(videos, name: str) -> DataConfig:
    manifest = videos.manifest(name, videos.good, videos.labels)
    # 8 frames, one every 4, from 24-frame files: clips near the end repeat the last index
    return DataConfig(loader="pyav", backend="cpu", root=str(videos.root), train_manifest=str(manifest), num_frames=8,
                      sampling_rate=4, train_jitter_scales=[40, 56], train_crop_size=32, batch_size=2, num_workers=1,
                      validate_cache="none")


def test_session_decoded_clips_are_the_pyav_loaders(videos) -> None:
    pyav = build_loader(_cfg(videos, "session_train.csv"), "train", device="cpu")
    plans = pyav.planner.plans(0)
    assert any(len(set(p.frames.tolist())) < len(p.frames) for p in plans), "no clip repeats a frame index"
    assert any(p.flip for p in plans) and any(not p.flip for p in plans)
    clips = SessionDecodedClips(pyav.planner, "cpu", threads=1, nvc=_nvc())
    try:
        for epoch in (0, 1):
            pyav.set_epoch(epoch)
            clips.set_epoch(epoch)
            ours, theirs = list(clips), list(pyav)
            assert len(ours) == len(theirs) == 3
            for a, b in zip(ours, theirs):
                assert torch.equal(a.index, b.index) and torch.equal(a.label, b.label)
                assert a.video.shape == b.video.shape == (2, 3, 8, 32, 32)
                assert a.video.stride() == b.video.stride()  # the loaders' layout
                assert torch.equal(a.video, b.video)
    finally:
        clips.close()
    # one decoder session, moved to the next clip's file each time the file changes, over two epochs
    switches = sum(a.path != b.path for epoch in (0, 1) for a, b in zip(pyav.planner.plans(epoch),
                                                                      pyav.planner.plans(epoch)[1:]))
    switches += pyav.planner.plans(0)[-1].path != pyav.planner.plans(1)[0].path
    assert clips.sessions == 1 and len(PyAVSimpleDecoder.made) == 1
    assert clips.reconfigured == switches


def test_session_decoders_one_per_thread(videos) -> None:
    pyav = build_loader(_cfg(videos, "session_threads.csv"), "train", device="cpu")
    clips = SessionDecodedClips(pyav.planner, "cpu", threads=2, nvc=_nvc())
    try:
        batches = list(clips)
    finally:
        clips.close()
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(6))
    assert 1 <= clips.sessions <= 2 and len(PyAVSimpleDecoder.made) == clips.sessions
    assert clips.sessions + clips.reconfigured <= 6


def test_the_gpu_input_row_times_the_session_decoders(videos, monkeypatch) -> None:
    from dataclasses import asdict, replace

    from timesformer_harness.benchmarks import gpu_input, session_decode

    monkeypatch.setattr(session_decode, "import_pynvvideocodec", _nvc)
    cfg = replace(_cfg(videos, "session_row.csv"), num_workers=2)
    row = gpu_input.session_row({"device": "cpu", "rounds": 2, "data": asdict(cfg)})
    assert row["loader"] == "pynvvideocodec" and row["decode"] == "gpu" and row["clips_per_epoch"] == 6
    assert len(row["rounds_clips_per_s"]) == 2 and row["clips_per_s"] > 0 and row["host_cpu_ms_per_clip"] > 0
    assert 1 <= row["sessions"] <= 2 and row["gpu_ms_per_clip"] is None
    # beside the loaders, not one: the targets judge what a run can load with
    entry = {**row, "row": "pynvc-h264-gop32", "kind": "pynvc", "variant": "h264-gop32", "status": "ok"}
    assert set(dict(gpu_input.judge([entry], on_gpu=True)).values()) == {"not measured"}


def test_the_float_resize_used_off_the_cpu_is_within_one_level_of_the_uint8_kernel() -> None:
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 57, 83, 3), dtype=np.uint8))
    for size in (32, 64, 100):  # down and up
        ref = resize_window(frames, size)
        ours = resize_in_float(frames.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last), size)
        assert ours.dtype == torch.uint8 and ours.shape == ref.shape == (4, 3, size, size)
        assert ours.is_contiguous(memory_format=torch.channels_last)
        assert (ours.int() - ref.int()).abs().max() <= 1
