"""Folders of JPEG frames read directly by both loaders: each folder here holds the very JPEG images of an MJPEG
video's packets, so everything read from the folder must equal what is read from the video, bit for bit (probe,
plans, DALI's and PyAV's batches, clip streams, nvJPEG's inputs); and what breaks a folder is named."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import encode_video, textured_frames
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.dali import DaliLoader, PlanSource
from timesformer_harness.pipelines.factory import build_loader
from timesformer_harness.pipelines.packets import (PacketIndexCache, clip_stream, index_packets, jpeg_images,
                                                   plan_packets)
from timesformer_harness.pipelines.pyav import PyAVLoader
from timesformer_harness.pipelines.sampling import ClipPlan
from timesformer_harness.pipelines.tools.encode import mjpeg_frame_folder, write_video
from timesformer_harness.pipelines.validate import check_videos, deep_probe, probe_video


def _mjpeg_video_and_folder(root: Path, name: str, seed: int, frames: int = 40, image_name: str = "{:05d}.jpg"
                            ) -> tuple[str, str]:
    """An MJPEG video and a folder holding its packets as ``00000.jpg``, ``00001.jpg``, ... (``image_name``; the same
    bytes)."""
    video = str(write_video(root / f"{name}.avi", textured_frames(frames, 48, 64, seed), "mjpeg", 30, {},
                            pix_fmt="yuvj420p"))
    return video, str(mjpeg_frame_folder(video, root / name, image_name))


def _cfg(root: Path, name: str, paths: list[str], **kw) -> DataConfig:
    manifest = root / f"{name}.csv"
    manifest.write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(paths)))
    base = DataConfig(loader="dali", backend="cpu", root=str(root), train_manifest=str(manifest), num_frames=4,
                      sampling_rate=8, target_fps=30, train_jitter_scales=[48, 60], train_crop_size=32,
                      test_crop_size=32, batch_size=2, num_workers=1, validate_cache="none")
    return replace(base, **kw)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    root = tmp_path_factory.mktemp("frame_folders")
    return [_mjpeg_video_and_folder(root, f"clip{i}", seed=20 + i) for i in range(4)]


def test_a_folder_probes_indexes_and_streams_as_its_mjpeg_video(pairs, tmp_path) -> None:
    """The probe and the deep check say of the folder what they say of the video; the packet index (also through
    its SQLite store) has the images in name order; a clip's stream for DALI's video decoder (the CPU path of a mixed
    set) and its JPEG images for nvJPEG (the GPU path) are the video's, byte for byte."""
    video, folder = pairs[0]
    assert replace(probe_video(folder), path=video) == probe_video(video)
    assert probe_video(folder).frames == 40 and deep_probe(folder) == deep_probe(video) == ""

    stored = tmp_path / "packets.sqlite"
    PacketIndexCache(stored).get(folder)
    index = PacketIndexCache(stored).get(folder)  # a new cache: read back from the store
    assert index.files == tuple(f"{k:05d}.jpg" for k in range(40)) and index.verbatim
    video_index = index_packets(video)
    frames = [33, 2, 2, 17, 39, 45]  # any order, repeats, past the end
    stats: dict[str, int] = {}
    with open(video, "rb") as f:
        folder_fd = os.open(folder, os.O_RDONLY)
        try:
            ours = clip_stream(index, plan_packets(index, frames), folder_fd, stats)
            assert np.array_equal(ours, clip_stream(video_index, plan_packets(video_index, frames), f.fileno()))
        finally:
            os.close(folder_fd)
    assert stats["preads"] == 4 and stats["bytes_read"] == int(index.size[[2, 17, 33, 39]].sum())

    gpu = PlanSource(1, backend="gpu", jpeg_frames=True, prefetch=0)
    plans = [ClipPlan(0, p, 0, np.array(frames), (0, 0, 48, 64)) for p in (folder, video)]
    from_folder, from_video = (gpu.clip_input(p) for p in plans)
    assert from_folder.mode == "images" and len(from_folder.images) == len(frames)
    assert all(np.array_equal(a, b) for a, b in zip(from_folder.images, from_video.images, strict=True))
    gpu.close()


@pytest.mark.parametrize("loader", ["dali", "pyav"])
def test_both_loaders_read_a_folder_set_as_the_video_set(pairs, tmp_path, caplog, loader: str) -> None:
    """A manifest of frame folders gives the same plans and the very batches of the same manifest of the videos:
    DALI feeds each clip's images to its image decoder (``jpeg_frames``, one decode a frame, counted), PyAV decodes
    each wanted image once. In a set mixed with a VP9 video, DALI decodes the folder as an MJPEG video stream."""
    videos, folders = [v for v, _ in pairs], [f for _, f in pairs]
    cfg_folders = _cfg(tmp_path, "folders", folders, loader=loader)
    cfg_videos = _cfg(tmp_path, "videos", videos, loader=loader)
    kind = DaliLoader if loader == "dali" else PyAVLoader
    a, b = build_loader(cfg_folders, "train"), build_loader(cfg_videos, "train")
    assert isinstance(a, kind) and isinstance(b, kind) and a.rejected == b.rejected == []
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert [(p.frames.tolist(), p.window, p.flip) for p in a.planner.plans(epoch)] == \
            [(p.frames.tolist(), p.window, p.flip) for p in b.planner.plans(epoch)]
        with caplog.at_level(logging.INFO, logger="timesformer_harness.pipelines.dali"):
            batches = list(a)
        for x, y in zip(batches, b, strict=True):
            assert torch.equal(x.video, y.video) and torch.equal(x.label, y.label) and torch.equal(x.index, y.index)
    if loader == "dali":
        assert a.jpeg_frames and "DALI fed 4 clips: mjpeg images 4; 4.0 frames decoded per clip" in caplog.text
        vp9 = [str(encode_video(tmp_path / f"other{i}.webm", textured_frames(40, 48, 64, 9 + i))) for i in (0, 1)]
        mixed = build_loader(_cfg(tmp_path, "mixed_folder", [folders[0], vp9[0], folders[1], vp9[1]]), "train")
        same = build_loader(_cfg(tmp_path, "mixed_video", [videos[0], vp9[0], videos[1], vp9[1]]), "train")
        assert isinstance(mixed, DaliLoader) and not mixed.jpeg_frames
        for x, y in zip(mixed, same, strict=True):
            assert torch.equal(x.video, y.video)


def test_frames_numbered_without_padding_keep_their_order(tmp_path) -> None:
    """Frames extracted as ``frame_1.jpg`` ... ``frame_24.jpg`` (FFmpeg's ``%d``): ``frame_10`` comes after
    ``frame_9`` in the index, in the loaders' clips (the video's very frames) and in the video prepare makes."""
    from timesformer_harness.pipelines.pyav import decode_frames
    from timesformer_harness.pipelines.tools.transcode import PrepareSpec, transcode

    video, folder = _mjpeg_video_and_folder(tmp_path, "unpadded", 3, 24, image_name="frame_{}.jpg")
    assert index_packets(folder).files == tuple(f"frame_{k}.jpg" for k in range(24))
    frames = np.arange(24)
    assert np.array_equal(decode_frames(folder, frames), decode_frames(video, frames))
    prepared = tmp_path / "prepared.webm"  # re-encoded: the images read by FFmpeg's image2 demuxer
    assert transcode(folder, prepared, PrepareSpec("vp9", 0, quality=10)).frames == 24
    made, source = decode_frames(str(prepared), frames).astype(int), decode_frames(video, frames).astype(int)
    nearest = [int(np.abs(source - f).mean(axis=(1, 2, 3)).argmin()) for f in made]
    assert nearest == frames.tolist()


def test_prepare_copies_a_jpeg_folder_into_mjpeg_bit_for_bit(pairs, tmp_path) -> None:
    """prepare --codec mjpeg on a folder of JPEG frames at their own size packs its images into one video as they
    are (one file instead of one per frame; the same pixels); at another size it re-encodes them."""
    from timesformer_harness.pipelines.manifest import read_entries
    from timesformer_harness.pipelines.tools.prepare import prepare
    from timesformer_harness.pipelines.tools.transcode import PrepareSpec

    _, folder = pairs[1]
    manifest = tmp_path / "folders.csv"
    manifest.write_text(f"{folder} 1\n")
    for spec, copied in ((PrepareSpec("mjpeg", 0), True), (PrepareSpec("mjpeg", 48, fps=15), True),
                         (PrepareSpec("mjpeg", 32), False)):
        out = tmp_path / f"out_{spec.short_side}_{spec.fps}"
        assert prepare(manifest, out, spec, progress=False).transcoded == 1
        (made,) = [e.path for e in read_entries(out / manifest.name)]
        index = index_packets(made)
        assert index.keyframes == list(range(40)) and index.fps == (spec.fps or 30)
        with open(made, "rb") as f:
            images = jpeg_images(index, range(40), f.fileno())
        originals = [p.read_bytes() for p in sorted(Path(folder).glob("*.jpg"))]
        assert (images == originals) is copied, spec
        assert (index.width, index.height) == ((64, 48) if copied else (42, 32))


def test_an_ssv2_split_reads_frame_folders_named_by_id(pairs) -> None:
    """SSv2 as frames, the original's layout: ``{root}/{id}/`` folders with ``data.ssv2_suffix=""`` load the very
    batches of the ``{id}.avi`` videos beside them (segment sampling, the val split's three crops)."""
    root = Path(pairs[0][0]).parent
    (root / "labels.json").write_text(json.dumps({"Pushing something": "0", "Lifting something up": "1"}))
    split = [{"id": Path(v).stem, "template": ["Pushing [something]", "Lifting [something] up"][i % 2]}
             for i, (v, _) in enumerate(pairs)]
    (root / "something-something-v2-validation.json").write_text(json.dumps(split))
    cfg = DataConfig(loader="dali", backend="cpu", format="ssv2", root=str(root), ssv2_labels=str(root / "labels.json"),
                     ssv2_suffix="", num_frames=4, test_crop_size=32, num_spatial_crops=3, batch_size=6,
                     num_workers=1, validate_cache="none")
    folders, videos = build_loader(cfg, "val"), build_loader(replace(cfg, ssv2_suffix=".avi"), "val")
    assert [p.path for p in folders.planner.plans(0)][::3] == [f for _, f in pairs]
    assert [p.path for p in videos.planner.plans(0)][::3] == [v for v, _ in pairs]
    for x, y in zip(folders, videos, strict=True):
        assert torch.equal(x.video, y.video) and x.label.tolist() == y.label.tolist() == [0, 0, 0, 1, 1, 1]


def test_what_breaks_a_folder_is_named_before_and_during_a_run(pairs, tmp_path) -> None:
    """The pre-flight check refuses, naming the image and the fix: a folder without images, one of PNG frames
    (prepare makes a video of them), an image that is not a JPEG, one of another size; the deep check an image that
    is cut short. At run time an image rewritten after its folder was indexed is quarantined with the fix (touch
    the folder), and the epoch completes."""
    _, good = pairs[0]
    (Path(good) / "._00000.jpg").write_bytes(b"\0\5\26\7" + bytes(60))  # a resource fork: hidden, not a frame
    (Path(good) / "notes.txt").write_text("extracted at 30 fps\n")
    root = tmp_path / "bad"
    root.mkdir()
    broken = {name: _mjpeg_video_and_folder(root, name, 7, 12)[1] for name in ("not_jpeg", "other_size", "cut")}
    Path(broken["not_jpeg"], "00004.jpg").write_bytes(b"GIF89a" + bytes(100))
    small = str(write_video(root / "small.avi", textured_frames(1, 24, 32, 8), "mjpeg", 30, {}, pix_fmt="yuvj420p"))
    with open(small, "rb") as f:
        Path(broken["other_size"], "00007.jpg").write_bytes(jpeg_images(index_packets(small), [0], f.fileno())[0])
    cut = Path(broken["cut"], "00003.jpg")
    cut.write_bytes(cut.read_bytes()[:-200])  # the frame header kept, the scan cut short: it decodes (grey)
    (root / "empty").mkdir()
    (root / "png").mkdir()
    (root / "png" / "00000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    paths = [good, *broken.values(), str(root / "empty"), str(root / "png")]
    _, rejected = check_videos(paths, "cpu", num_frames=4, sampling_rate=2, cache=None)
    assert dict(rejected) == {
        broken["not_jpeg"]: "image 00004.jpg is not a JPEG image (no frame header); replace it, or remove it",
        broken["other_size"]: "image 00007.jpg is 32x24, the folder's first frame 64x48: a clip's frames have one "
                              "size; resize it, or remove it",
        str(root / "empty"): "a folder without images (.jpeg, .jpg, .png)",
        str(root / "png"): "a folder of .png frames: the loaders read folders of JPEG frames (.jpeg, .jpg); make a "
                           "video of it with `python -m timesformer_harness.pipelines.tools.prepare MANIFEST --out "
                           "DIR` and use DIR's manifest"}
    assert deep_probe(broken["cut"]) == ("frame 3 of 12: image 00003.jpg is cut short (no end-of-image marker): an "
                                         "interrupted write or copy; extract or copy it again")
    assert deep_probe(broken["not_jpeg"]) == dict(rejected)[broken["not_jpeg"]]
    assert index_packets(good).num_frames == 40 and deep_probe(good) == ""  # the hidden file and the notes ignored
    # a frame header after 100 kB of metadata (an APP segment: EXIF, ICC) is found, past the first read
    first = Path(good, "00000.jpg").read_bytes()
    app = b"\xff\xe2" + (65533).to_bytes(2, "big") + bytes(65531)
    Path(broken["cut"], "00000.jpg").write_bytes(first[:2] + app + app + first[2:])
    assert probe_video(broken["cut"]).error == "" and probe_video(broken["cut"]).width == 64

    run = tmp_path / "run"
    run.mkdir()
    folders = [_mjpeg_video_and_folder(run, f"clip{i}", 30 + i, 12)[1] for i in range(4)]
    cfg = _cfg(tmp_path, "run", folders, batch_size=2, on_bad_video="skip", max_bad_fraction=0.5)
    loader = build_loader(cfg, "train")
    assert sum(b.video.shape[0] for b in loader) == 4 and not loader.quarantine.entries
    for image in Path(folders[2]).iterdir():  # trailing bytes: a JPEG decoder would not notice; the sizes change
        with open(image, "ab") as f:
            f.write(bytes(16))
    loader.set_epoch(1)
    assert sum(b.video.shape[0] for b in loader) == 4
    (bad,) = loader.quarantine.entries
    assert bad.path == folders[2] and "has changed since the folder was indexed" in bad.reason
    assert "`touch` the folder so that it is indexed again" in bad.reason
