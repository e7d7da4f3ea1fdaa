"""The seeking DALI loader and the per-GOP PyAV baseline on real files: per-clip packet streams decode exactly the
planned frames (bit-identical to DALI decoding the whole file, the same frames as PyAV), the loaders agree on
frames, windows and flips across codecs, ranks and resume, frames decoded per clip are counted, and the packet
index is persisted."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from conftest import textured_frames
from timesformer_harness.common import cache_path
from timesformer_harness.pipelines import packets
from timesformer_harness.pipelines.factory import build_loader
from timesformer_harness.pipelines.base import CLIP_FORMAT, ClipPlanner, Video
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.dali import DaliLoader, PlanSource
from timesformer_harness.pipelines.packets import (PacketIndexCache, count_stream_frames, index_packets,
                                                   keyframe_segments, plan_packets)
from timesformer_harness.pipelines.pyav import decode_clip, decode_frames
from timesformer_harness.pipelines.sampling import ClipPlan
from timesformer_harness.pipelines.tools.encode import write_video
from timesformer_harness.pipelines.validate import judge, probe_video

STD = 0.225
VP9 = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
# name -> (encoder, extension, options, frames): 320x240-like structure at 48x64, each with keyframes deep in it
CODECS = {
    "vp8": ("libvpx", "webm", {"deadline": "realtime", "cpu-used": "8", "b": "1M", "g": "8"}, 48),
    "vp9_gop8": ("libvpx-vp9", "webm", {**VP9, "g": "8"}, 48),
    "vp9_long": ("libvpx-vp9", "webm", {**VP9, "g": "250"}, 48),  # one keyframe
    "vp9_altref": ("libvpx-vp9", "webm", {"deadline": "good", "cpu-used": "4", "auto-alt-ref": "1",
                                          "lag-in-frames": "16", "g": "16", "crf": "20", "b": "0"}, 48),
    "mjpeg": ("mjpeg", "avi", {}, 48),  # intra-only
    "short": ("libvpx-vp9", "webm", {**VP9, "g": "4"}, 10),  # shorter than the clip span: repeated frames
}


def _write(folder: Path, name: str, seed: int) -> str:
    encoder, ext, options, frames = CODECS[name]
    pix_fmt = "yuvj420p" if encoder == "mjpeg" else "yuv420p"
    return str(write_video(folder / f"{name}.{ext}", textured_frames(frames, 48, 64, seed), encoder, 30, options,
                           pix_fmt=pix_fmt))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("seek")
    return {name: _write(folder, name, seed) for seed, name in enumerate(CODECS)}


def _all_frames(path: str) -> np.ndarray:
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _cfg(folder: Path, paths: list[str], split: str = "train", **kw) -> DataConfig:
    manifest = folder / f"{split}.csv"
    label = {p: i % 3 for i, p in enumerate(dict.fromkeys(paths))}  # a video listed twice keeps its one label
    manifest.write_text("".join(f"{p} {label[p]}\n" for p in paths))
    base = DataConfig(loader="dali", backend="cpu", root=str(folder), **{f"{split}_manifest": str(manifest)},
                      num_frames=4, sampling_rate=8, target_fps=30, train_jitter_scales=[48, 60], train_crop_size=32,
                      test_crop_size=32, num_ensemble_views=3, num_spatial_crops=3, batch_size=3, num_workers=2,
                      validate_cache="none", pad_short=True)
    return replace(base, **kw)


def _whole_file_decode(plans: list[ClipPlan], num_frames: int) -> list[np.ndarray]:
    """DALI's decoder given the whole file (the loader before it seeked): the reference decode, frame for frame."""
    from nvidia.dali import fn, pipeline_def

    def source():
        return ([np.fromfile(p.path, dtype=np.uint8) for p in plans],
                [np.minimum(p.frames, num_frames - 1).astype(np.int32) for p in plans])

    @pipeline_def(batch_size=len(plans), num_threads=1, device_id=None)
    def pipe():
        enc, frames = fn.external_source(source=source, num_outputs=2, batch=True)
        return fn.decoders.video(enc, device="cpu", frames=frames)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out[i]) for i in range(len(plans))]


def _plans(paths: list[str], cfg: DataConfig, split: str = "test") -> list[ClipPlan]:
    videos = [Video(i, p, 0, index_packets(p).num_frames, 30.0, 48, 64) for i, p in enumerate(paths)]
    return ClipPlanner(cfg, split, videos).plans(0)


@pytest.mark.parametrize("name", list(CODECS))
def test_clip_streams_decode_the_planned_frames_exactly(files, name, tmp_path) -> None:
    """Per codec: DALI decoding each clip's packet stream gives, bit for bit, what it gives decoding the whole file
    (frames deep in the file, repeats, indices past the end), each frame is PyAV's frame of the same index, and
    the frames decoded per clip, counted by decoding the very stream, equal the keyframe plan."""
    path = files[name]
    cfg = _cfg(tmp_path, [path], num_frames=6, sampling_rate=6)
    plans = _plans([path], cfg)  # 3 temporal views x 3 crops
    plans.append(replace(plans[0], frames=np.array([40, 3, 3, 47, 100, 20])))  # any order, repeats, past the end
    source = PlanSource(len(plans), decode_only=True)
    source.start(plans)
    from timesformer_harness.pipelines.dali import build_video_pipeline

    pipe = build_video_pipeline(source, batch_size=len(plans), crop=32, mean=[0.45] * 3, std=[STD] * 3,
                                num_threads=1, decode_only=True)
    pipe.build()
    (out,) = pipe.run()
    seek = [np.array(out[i]) for i in range(len(plans))]
    index = index_packets(path)
    whole = _whole_file_decode(plans, index.num_frames)
    ref = _all_frames(path).astype(int)
    for plan, got, want in zip(plans, seek, whole):
        same = [np.array_equal(a, b) for a, b in zip(got, want)]
        assert all(same), f"{name} {plan.frames}: the clip stream decodes other pixels ({same})"
        frames = np.minimum(plan.frames, index.num_frames - 1)
        nearest = [int(np.abs(ref - f.astype(int)).mean(axis=(1, 2, 3)).argmin()) for f in got]
        assert nearest == frames.tolist(), f"{name}: DALI frames {nearest}, planned {frames.tolist()}"
        clip = source.clip_input(plan)
        assert clip.mode == "stream"
        wanted = sorted(set(frames.tolist()))
        model = sum(b - a + 1 for a, b in keyframe_segments(index.keyframes, wanted))
        assert clip.decoded == model == count_stream_frames(clip.stream.tobytes(), int(clip.frames[-1]))
    from_start = sum(int(np.minimum(p.frames, index.num_frames - 1).max()) + 1 for p in plans)
    decoded = sum(source.clip_input(p).decoded for p in plans)
    if name in ("mjpeg", "vp9_gop8", "vp8"):
        assert decoded < 0.7 * from_start  # what the seeking saves
    if name == "vp9_long":
        assert decoded == from_start  # one keyframe: nothing to skip


def test_dali_loader_equals_pyav_loader_across_codecs_ranks_and_resume(files, tmp_path, caplog) -> None:
    """Train batches of the seeking DALI loader and the PyAV loader over a mixed-codec manifest, two ranks: the same
    videos, labels, frames, windows and flips (up to the decoders' colour conversion); resume equals the tail of
    the epoch bit for bit; every planned clip comes out; the log says how each clip was fed."""
    paths = [files[n] for n in CODECS] * 2  # 12 videos
    cfg = _cfg(tmp_path, paths, num_frames=4, sampling_rate=8, batch_size=2)
    seen = []
    for rank in range(2):
        dali = build_loader(cfg, "train", device="cpu", rank=rank, world_size=2)
        pyav = build_loader(replace(cfg, loader="pyav"), "train", device="cpu", rank=rank, world_size=2)
        assert isinstance(dali, DaliLoader) and dali.num_clips == 6 and len(dali) == 3
        with caplog.at_level(logging.INFO, logger="timesformer_harness.pipelines.dali"):
            epoch = list(dali)
        assert sum(b.video.shape[0] for b in epoch) == dali.num_clips  # nothing dropped
        plans = dali.planner.plans(0)
        flips = [p.flip for p in plans]
        assert any(flips) and not all(flips)
        for a, b in zip(epoch, pyav):
            assert torch.equal(a.index, b.index) and torch.equal(a.label, b.label)
            assert a.video.shape == b.video.shape == (2, 3, 4, 32, 32)
            assert a.video.is_contiguous(memory_format=CLIP_FORMAT) and b.video.is_contiguous(memory_format=CLIP_FORMAT)
            diff = (a.video - b.video).abs().mean(dim=(1, 2, 3, 4)) * STD * 255
            mirrored = (a.video - b.video.flip(-1)).abs().mean(dim=(1, 2, 3, 4)) * STD * 255
            assert (diff < 5).all() and (diff < mirrored).all(), (diff, mirrored)
        seen += [int(i) for b in epoch for i in b.index]
        resumed = build_loader(cfg, "train", device="cpu", rank=rank, world_size=2, start_batch=1)
        tail = list(resumed)
        assert len(tail) == 2 and all(torch.equal(x.video, y.video) for x, y in zip(tail, epoch[1:]))
    assert sorted(seen) == list(range(12))
    fed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DALI fed 6 clips: ")]
    assert len(fed) == 2, fed  # one full epoch per rank
    assert all(f"{codec} stream" in " ".join(fed) for codec in ("vp8", "vp9", "mjpeg")), fed


def test_files_whose_payloads_are_not_byte_ranges_are_decoded_from_frame_0(files, tmp_path, monkeypatch,
                                                                           caplog) -> None:
    """The per-file fallback: an index without payload offsets makes the source feed the whole file, which gives
    the same batch, and the log names the file and why."""
    paths = [files["vp9_gop8"], files["mjpeg"]]
    cfg = _cfg(tmp_path, paths, "test", num_spatial_crops=1, batch_size=6)
    seeking = next(iter(build_loader(cfg, "test", device="cpu")))
    real = packets.index_packets
    monkeypatch.setattr(packets, "index_packets", lambda p, offsets=True: real(p, offsets=False))
    with caplog.at_level(logging.INFO, logger="timesformer_harness.pipelines.dali"):
        whole = next(iter(build_loader(cfg, "test", device="cpu")))
    assert torch.equal(seeking.video, whole.video)
    text = caplog.text
    assert f"{paths[0]}: DALI decodes it from frame 0 (its vp9 payloads are not stored verbatim" in text
    assert "vp9 file 3" in text and "mjpeg file 3" in text


def test_a_file_that_cannot_be_indexed_is_named(files, tmp_path) -> None:
    bad = tmp_path / "not_a_video.webm"
    bad.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 8)
    cfg = _cfg(tmp_path, [files["vp9_gop8"], str(bad)], "test", num_spatial_crops=1, num_ensemble_views=1,
               batch_size=2)
    videos = [Video(0, files["vp9_gop8"], 0, 48, 30.0, 48, 64), Video(1, str(bad), 0, 48, 30.0, 48, 64)]
    loader = DaliLoader(ClipPlanner(cfg, "test", videos), torch.device("cpu"))  # no pre-flight check: what DALI sees
    with pytest.raises(Exception, match=f"{bad}: cannot index its packets"):
        list(loader)


def test_packet_index_is_persisted_and_invalidated_by_a_change(files, tmp_path, monkeypatch) -> None:
    store = tmp_path / "cache" / "packets.sqlite"
    path = str(tmp_path / "copy.webm")
    Path(path).write_bytes(Path(files["vp9_gop8"]).read_bytes())
    first = PacketIndexCache(store).get(path)
    assert store.exists() and first.verbatim and first.keyframes == list(range(0, 48, 8))

    def fail(*_a, **_k):
        raise AssertionError("re-indexed although the store holds the index")

    monkeypatch.setattr(packets, "index_packets", fail)
    again = PacketIndexCache(store).get(path)  # a new process would see the same
    for field in ("offset", "size", "pts", "key", "display"):
        assert np.array_equal(getattr(first, field), getattr(again, field))
    assert (again.codec, again.width, again.height, again.rate) == (first.codec, first.width, first.height,
                                                                    first.rate)
    Path(path).write_bytes(Path(files["vp8"]).read_bytes())  # changed on disk: its old index must not be used
    with pytest.raises(RuntimeError, match="re-indexed"):
        PacketIndexCache(store).get(path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "d"))
    assert cache_path("none", packets.PACKET_CACHE) is None and cache_path("none") is None
    assert cache_path("", packets.PACKET_CACHE) == tmp_path / "d" / "timesformer-harness" / "packets.sqlite"
    assert cache_path("") == tmp_path / "d" / "timesformer-harness" / "validate.sqlite"
    assert cache_path(str(tmp_path / "v.sqlite"), packets.PACKET_CACHE) == tmp_path / "packets.sqlite"


def test_two_threads_index_two_files_at_once(files, monkeypatch) -> None:
    """The cache's lock guards its memory, not the demuxing: two threads each indexing a file of their own are both
    inside ``index_packets`` at the same time (a barrier of two that times out otherwise)."""
    import threading

    barrier, real = threading.Barrier(2, timeout=10), packets.index_packets

    def meeting(path, offsets=True):
        barrier.wait()  # BrokenBarrierError when the other thread cannot get here
        return real(path, offsets)

    monkeypatch.setattr(packets, "index_packets", meeting)
    cache, found, errors = PacketIndexCache(), {}, []

    def index(name: str) -> None:
        try:
            found[name] = cache.get(files[name])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=index, args=(n,)) for n in ("vp9_gop8", "mjpeg")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors and set(found) == {"vp9_gop8", "mjpeg"}, errors


@pytest.mark.parametrize("name", ["vp9_gop8", "mjpeg", "vp9_long", "short"])
def test_pyav_decodes_per_gop(files, name) -> None:
    """The PyAV baseline: the same pixels as decoding every frame, and exactly the keyframe plan's frame count
    (intra-only: one frame per wanted frame, not the whole span)."""
    path = files[name]
    index = index_packets(path)
    every = _all_frames(path)
    n = index.num_frames
    rng = np.random.default_rng(0)
    clips = [np.array([1, 9, 17, 25, 33, 41]), np.array([40, 3, 3, 47, 20]), np.array([0, 47, 100])]
    clips += [np.sort(rng.integers(0, 48, 6)) for _ in range(4)]
    for frames in clips:
        clip = decode_clip(path, frames, index)
        assert np.array_equal(clip.frames, every[np.minimum(frames, n - 1)]), frames
        wanted = sorted(set(np.minimum(frames, n - 1).tolist()))
        assert clip.decoded == sum(b - a + 1 for a, b in keyframe_segments(index.keyframes, wanted)), frames
    if name == "mjpeg":
        assert decode_clip(path, clips[0], index).decoded == 6  # from-start would decode 42
    assert np.array_equal(decode_frames(path, clips[1]), every[np.minimum(clips[1], n - 1)])  # indexes itself


def test_pyav_seeks_land_on_the_keyframe_with_millisecond_timestamps(tmp_path) -> None:
    """WebM stores pts in ms: frame 8 at 30 fps is 266.67 ms, muxed as 267. A seek target computed as
    ``int(8 / 30 * 1000) = 266`` lands on the keyframe before (one GOP early) for about a third of the keyframes;
    seeking to the keyframe's stored pts lands on it, so only the plan's frames are decoded."""
    path = str(write_video(tmp_path / "ms.webm", textured_frames(96, 32, 32, 1), "libvpx-vp9", 30, {**VP9, "g": "8"}))
    index = index_packets(path)
    assert index.keyframes == list(range(0, 96, 8))
    truncated = [k for k in index.keyframes if int(k / 30 * 1000) < index.pts[index.display[k]]]
    assert truncated  # the file has keyframes that the truncating formula misses
    for k in truncated:
        assert decode_clip(path, [k, k + 1], index).decoded == 2


@pytest.mark.parametrize("encoder, options", [
    ("libx264", {"preset": "ultrafast", "g": "16", "bf": "2", "crf": "18"}),
    ("libx265", {"preset": "ultrafast", "x265-params": "keyint=16:min-keyint=16:open-gop=1:bframes=3:scenecut=0"})],
    ids=["h264_bframes", "hevc_open_gop"])
def test_remuxed_packets_keep_the_frames_for_the_gpu_decoder(tmp_path, encoder, options) -> None:
    """The GPU path for what no clip stream can serve (payloads that are not byte ranges of the file, unreadable
    extradata; ``tests/test_clip_streams.py`` tests the IVF and Matroska cuts on these files), here on B-frames and
    HEVC with open GOPs, whose leading pictures reference the previous GOP and are left
    out: the plan's packets copied into Matroska and re-timed decode (PyAV standing in for NVDEC) to the clip's frames
    at the planned positions, and the clip costs only the frames from each wanted frame's keyframe."""
    if encoder not in av.codecs_available:
        pytest.skip(f"no {encoder} encoder")
    path = str(write_video(tmp_path / "b.mp4", textured_frames(64, 64, 64, 5), encoder, 30, options))
    index = index_packets(path)
    assert index.keyframes == [0, 16, 32, 48] and not np.array_equal(index.display, np.arange(64))  # reordered
    every = _all_frames(path)
    for frames in ([20, 21, 40, 63], [5, 40, 41], [33, 33, 18], [16, 17, 48]):
        plan = plan_packets(index, frames)
        assert packets.feed_mode(index, plan, "cpu")[0] == "file"
        out = _all_frames_bytes(packets.remux_packets(index, plan))
        assert len(out) == len(plan.packets)  # every copied packet decodes to a frame: no leading picture left
        assert np.array_equal(out[plan.frames[plan.order]], every[frames]), frames
        wanted = sorted(set(frames))
        model = sum(b - a + 1 for a, b in keyframe_segments(index.keyframes, wanted))
        assert model <= plan.decoded <= model + 3 * len(plan.segments), frames  # + reordered frames per segment


def test_a_transport_stream_whose_seeks_land_late_is_decoded_from_its_start(tmp_path) -> None:
    """MPEG-TS demuxers can land a seek to a keyframe on a later one: the PyAV loader sees where it landed and
    decodes that clip from the file's start (the frames of a full decode, not the last one repeated), and the GPU
    path's remux finds the clip's packets again from the start."""
    if "libx264" not in av.codecs_available:
        pytest.skip("no libx264 encoder")
    path = str(write_video(tmp_path / "gop10.ts", textured_frames(60, 48, 64, 3), "libx264", 30,
                           {"g": "10"}))
    every, index = _all_frames(path), index_packets(path)
    wanted = [0, 2, 4, 6, 8, 10, 12, 15, 40, 41]
    assert np.array_equal(decode_frames(path, wanted, index), every[wanted])
    plan = plan_packets(index, wanted)
    out = _all_frames_bytes(packets.remux_packets(index, plan))
    assert np.array_equal(out[plan.frames[plan.order]], every[wanted])


def test_frames_the_decoder_never_outputs_are_an_error_not_another_frame(tmp_path) -> None:
    """An MP4 whose edit list hides its first 3 frames (a stream-copy cut): the packets number 60 frames, the
    decoder outputs 57. A clip that wants a hidden frame fails naming the file (the run-time quarantine takes it),
    instead of a later frame standing in for it; the pre-flight check refuses the file first."""
    if "libx264" not in av.codecs_available:
        pytest.skip("no libx264 encoder")
    src = write_video(tmp_path / "src.mp4", textured_frames(60, 48, 64, 4), "libx264", 30,
                      {"preset": "ultrafast", "g": "12", "bf": "3", "crf": "18"})
    cut = tmp_path / "cut.mp4"
    with av.open(str(src)) as i, av.open(str(cut), "w") as o:
        out = o.add_stream_from_template(i.streams.video[0])
        kept = [p for p in i.demux(i.streams.video[0]) if p.size]
        shift = sorted(p.pts for p in kept)[3]  # pts before 0: the edit list starts at the fourth frame
        for p in kept:
            p.pts, p.dts, p.stream = p.pts - shift, p.dts - shift, out
            o.mux(p)
    assert len(_all_frames(str(cut))) == 57 and index_packets(str(cut)).num_frames == 60
    with pytest.raises(RuntimeError, match=rf"{cut}: the decoder never output frame\(s\) \[0, 2\] of the 60"):
        decode_frames(str(cut), [0, 2, 5, 9])
    assert probe_video(str(cut)).error.startswith("its first 3 frame(s) never come out of the decoder (an edit list "
                                                  "hides them")


def _all_frames_bytes(data: bytes) -> np.ndarray:
    import io

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


# ------------------------------------------------------------------------------------------ MJPEG as JPEG images
def _mjpeg_set(folder: Path, n: int = 4) -> list[str]:
    return [str(write_video(folder / f"mj{i}.avi", textured_frames(48, 48, 64, 10 + i), "mjpeg", 30, {},
                            pix_fmt="yuvj420p")) for i in range(n)]


def test_an_mjpeg_set_is_decoded_as_jpeg_images_like_the_pyav_loader(tmp_path, caplog) -> None:
    """An all-MJPEG manifest on the CPU: the factory turns on ``jpeg_frames``; each clip's frames are fed as JPEG
    images (one decode each, counted) and decode to PyAV's frames of the planned indices (also repeats and indices
    past the end); train batches equal the PyAV loader's (frames, windows, flips); resume equals the epoch's tail."""
    paths = _mjpeg_set(tmp_path)
    cfg = _cfg(tmp_path, paths, num_frames=4, sampling_rate=8, batch_size=2)
    dali = build_loader(cfg, "train", device="cpu")
    pyav = build_loader(replace(cfg, loader="pyav"), "train", device="cpu")
    assert isinstance(dali, DaliLoader) and dali.jpeg_frames
    with caplog.at_level(logging.INFO, logger="timesformer_harness.pipelines.dali"):
        epoch = list(dali)
    assert "DALI fed 4 clips: mjpeg images 4; 4.0 frames decoded per clip" in caplog.text
    plans = dali.planner.plans(0)
    assert any(p.flip for p in plans) and not all(p.flip for p in plans)
    for a, b in zip(epoch, pyav, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.label, b.label)
        assert a.video.shape == b.video.shape == (2, 3, 4, 32, 32)
        diff = (a.video - b.video).abs().mean(dim=(1, 2, 3, 4)) * STD * 255
        mirrored = (a.video - b.video.flip(-1)).abs().mean(dim=(1, 2, 3, 4)) * STD * 255
        assert (diff < 5).all() and (diff < mirrored).all(), (diff, mirrored)
    tail = list(build_loader(cfg, "train", device="cpu", start_batch=1))
    assert len(tail) == 1 and torch.equal(tail[0].video, epoch[1].video)

    odd = [replace(plans[0], frames=np.array([40, 3, 3, 100])), plans[1]]  # any order, repeats, past the end
    source = PlanSource(2, decode_only=True, jpeg_frames=True)
    inputs = [source.clip_input(p) for p in odd]
    assert [(x.mode, x.decoded, len(x.images)) for x in inputs] == [("images", 4, 4)] * 2
    from timesformer_harness.pipelines.dali import build_video_pipeline, to_clips

    pipe = build_video_pipeline(source, batch_size=2, crop=32, mean=[0.45] * 3, std=[STD] * 3, num_threads=1,
                                decode_only=True, frames_per_clip=4)
    pipe.build()
    source.start(odd)
    (out,) = pipe.run()
    frames = to_clips(out, odd, backend="cpu", decode_only=True, frames_per_clip=4, crop=32, mean=[0.45] * 3,
                      std=[STD] * 3, device=torch.device("cpu"))
    assert frames.shape == (2, 4, 48, 64, 3) and frames.dtype == torch.uint8
    for plan, clip in zip(odd, frames):
        ref = _all_frames(plan.path).astype(int)
        nearest = [int(np.abs(ref - f.numpy().astype(int)).mean(axis=(1, 2, 3)).argmin()) for f in clip]
        assert nearest == np.minimum(plan.frames, 47).tolist()


def test_jpeg_frames_on_the_gpu_are_fed_with_each_frames_flip_and_a_mixed_set_decodes_as_video(files, tmp_path
                                                                                                ) -> None:
    """On the GPU (nvJPEG) the source feeds, per frame, its JPEG image, its clip's crop window and its clip's flip:
    T consecutive samples per clip, in clip order (the GPU graph flips and normalises each frame). A set that mixes
    MJPEG with video codecs is decoded as video."""
    paths = _mjpeg_set(tmp_path, 2)
    cfg = _cfg(tmp_path, paths * 2, num_frames=4, sampling_rate=8, batch_size=4)
    plans = build_loader(cfg, "train", device="cpu").planner.plans(0)
    assert any(p.flip for p in plans) and not all(p.flip for p in plans)
    source = PlanSource(4, backend="gpu", jpeg_frames=True, prefetch=0)
    source.start(plans)
    images, anchors, shapes, flips = source()
    assert len(images) == len(anchors) == len(shapes) == len(flips) == 4 * 4
    for i, plan in enumerate(plans):
        frames = slice(4 * i, 4 * i + 4)
        assert [int(f) for f in flips[frames]] == [int(plan.flip)] * 4
        assert all(a.tolist() == list(plan.window[:2]) for a in anchors[frames])
        assert all(s.tolist() == list(plan.window[2:]) for s in shapes[frames])
    cpu = PlanSource(4, jpeg_frames=True, prefetch=0)
    cpu.start(plans)
    assert len(cpu()) == 3  # on the CPU the flip is done in torch
    for a, b in zip(images, cpu.clip_input(plans[0]).images + cpu.clip_input(plans[1]).images):
        assert np.array_equal(a, b)
    mixed = build_loader(_cfg(tmp_path, [files["mjpeg"], files["vp9_gop8"]] * 2, batch_size=2), "train")
    assert isinstance(mixed, DaliLoader) and not mixed.jpeg_frames
    # the pre-flight check for the GPU: a set of MJPEG files only is nvJPEG's; in a mixed set NVDEC refuses MJPEG
    infos = [probe_video(p) for p in (*paths, files["vp9_gop8"])]
    assert judge(infos[:2], "gpu", 4, 8, pad=True, gpu_arch="hopper") == []
    refused = dict(judge(infos, "gpu", 4, 8, pad=True, gpu_arch="hopper"))
    assert refused[paths[0]].startswith("codec mjpeg") and refused[paths[1]].startswith("codec mjpeg")


def test_jpeg_frames_without_huffman_tables_decode_with_the_standard_ones(tmp_path) -> None:
    """Motion-JPEG as AVI1 stores it leaves out the Huffman tables (DHT); ``jpeg_images`` feeds such packets as
    they are, which relies on the JPEG decoder using the standard tables: the stripped image decodes to the very
    pixels of the full one (the encoder wrote the standard tables)."""
    from nvidia.dali import fn, pipeline_def

    path = str(write_video(tmp_path / "std.avi", textured_frames(3, 48, 64, 0), "mjpeg", 30, {"huffman": "default"},
                           pix_fmt="yuvj420p"))
    index = index_packets(path)
    with open(path, "rb") as fh:
        full = packets.jpeg_images(index, [0, 1, 2], fh.fileno())

    def strip_dht(jpeg: bytes) -> bytes:
        out, i = bytearray(jpeg[:2]), 2
        while jpeg[i + 1] != 0xDA:  # marker segments up to the scan
            end = i + 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")
            if jpeg[i + 1] != 0xC4:
                out += jpeg[i:end]
            i = end
        return bytes(out + jpeg[i:])

    stripped = [strip_dht(j) for j in full]
    assert all(b"\xff\xc4" in j for j in full) and all(len(s) < len(j) for s, j in zip(stripped, full))

    @pipeline_def(batch_size=6, num_threads=1, device_id=None)
    def pipe():
        enc = fn.external_source(source=lambda: [np.frombuffer(j, np.uint8) for j in full + stripped], batch=True)
        return fn.decoders.image(enc, device="cpu")

    p = pipe()
    p.build()
    (out,) = p.run()
    for i in range(3):
        assert np.array_equal(np.array(out[i]), np.array(out[i + 3]))


def test_a_damaged_jpeg_frame_quarantines_its_video(tmp_path) -> None:
    """A frame whose JPEG header is destroyed fails DALI's image decoder for the whole batch: the loader finds the
    clip by decoding the suspects alone, quarantines the file, names it, and the epoch completes with replacements."""
    paths = _mjpeg_set(tmp_path, 6)
    index = index_packets(paths[2])
    data = bytearray(Path(paths[2]).read_bytes())
    for d in range(0, index.num_frames, 2):  # every other frame: whichever clip is planned meets one
        at = int(index.offset[d])
        data[at:at + 32] = bytes(32)
    Path(paths[2]).write_bytes(bytes(data))
    cfg = _cfg(tmp_path, paths, num_frames=4, sampling_rate=2, batch_size=3, on_bad_video="skip",
               max_bad_fraction=0.5)
    loader = build_loader(cfg, "train", device="cpu")
    assert loader.jpeg_frames
    epoch = list(loader)
    assert sum(b.video.shape[0] for b in epoch) == loader.num_clips
    assert loader.quarantine.paths() == {paths[2]}
    (bad,) = loader.quarantine.entries
    assert bad.path == paths[2] and bad.reason
