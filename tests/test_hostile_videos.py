"""Hostile video files against the pre-flight check: each is made here by a seeded script (PyAV, byte edits; no
binary blobs), and each is refused before it costs memory or minutes, or judged by the right reason.

* ``sparse``: a good webm extended to 4 GiB by a hole (``truncate``): refused from its inode, reading almost nothing
  (it used to be demuxed through the 4 GiB of zeros: 35-50 s, then reported usable);
* ``zero_tail`` / ``junk_tail``: 3 MiB of written zeros / seeded random bytes appended: refused from the last MiB /
  after the demux, by where the packets end;
* ``huge_mjpeg``: 8192x8192 MJPEG frames in a small ``.mkv``: refused from its header by ``data.max_frame_pixels``,
  never decoded, so ``validate --deep`` and ``build_loader`` under ``data.on_bad_video=skip`` run in bounded memory
  (a child process under an ``RLIMIT_AS`` cap); with the limit raised the same file reaches the loader, whose
  fate then depends on the memory left: the limit is what makes the decision deterministic;
* ``grows_midstream``: a 64x64 MJPEG stream whose second frame is 8192x8192 (and ``grows_vp9``, 64x64 VP9 frames,
  then 512x512 ones; ``grows_libx264`` and ``grows_libx265``, the same in H.264 and HEVC mp4): the deep check's
  decoder, bounded by the header's frame size, refuses that frame before allocating it, and the loaders' packet
  index refuses the file from its payloads' frame sizes;
* two video streams (and audio longer than the video): judged on the first video stream, the one both loaders
  decode; a shorter first stream is "too short" for a long clip, not "truncated"; a file cut short still is.

``python tests/test_hostile_videos.py child MANIFEST CACHE MAX_PIXELS`` is the capped child.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

import timesformer_harness.pipelines.validate as validate
from conftest import encode_resizing
from timesformer_harness.pipelines.validate import (MAX_FRAME_PIXELS, TAIL_BYTES, check_videos, deep_probe,
                                                    probe_video)

REPO = Path(__file__).resolve().parent.parent
HEADROOM = 384 << 20  # the child's address-space cap: what it had mapped after warming up, plus this
BIG = 8192


def _frames(num: int, height: int, width: int, seed: int) -> np.ndarray:
    """Seeded frames: a grey field with a random square per frame (compresses to little in MJPEG)."""
    rng = np.random.default_rng(seed)
    out = np.full((num, height, width, 3), 96, np.uint8)
    for t in range(num):
        y, x = rng.integers(0, height - 32), rng.integers(0, width - 32)
        out[t, y:y + 32, x:x + 32] = rng.integers(0, 256, 3, dtype=np.uint8)
    return out


def _two_streams(path: Path, first: int, second: int, seed: int) -> Path:
    """A webm-like Matroska file with two VP9 video streams of ``first`` and ``second`` frames (Matroska declares
    one duration for the file, its longest stream's)."""
    frames = _frames(max(first, second), 64, 96, seed)
    with av.open(str(path), "w") as out:
        streams = [out.add_stream("libvpx-vp9", rate=30) for _ in range(2)]
        for s in streams:
            s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
            s.codec_context.options = {"deadline": "realtime", "cpu-used": "8"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for s, n in zip(streams, (first, second)):
                if i < n:
                    out.mux(s.encode(frame))
        for s in streams:
            out.mux(s.encode(None))
    return path


def _audio_longer(path: Path, seed: int) -> Path:
    """A webm of 12 VP9 frames (0.4 s) and 2 s of Opus audio: the container's duration is the audio's."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("libvpx-vp9", rate=30)
        v.width, v.height, v.pix_fmt = 96, 64, "yuv420p"
        a = out.add_stream("libopus", rate=48000)
        for rgb in _frames(12, 64, 96, seed):
            out.mux(v.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(v.encode(None))
        for _ in range(100):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 48000
            out.mux(a.encode(frame))
        out.mux(a.encode(None))
    return path


def make_hostile(root: Path, good: Path, seed: int = 0) -> dict[str, Path]:
    """Every hostile file of this module under ``root``, from the good webm ``good`` and ``seed``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = {name: root / f"{name}.webm" for name in ("sparse", "zero_tail", "junk_tail")}
    for path in files.values():
        shutil.copy(good, path)
    with open(files["sparse"], "r+b") as f:
        f.truncate(4 << 30)  # a hole: no block is written
    with open(files["zero_tail"], "ab") as f:
        f.write(bytes(3 * TAIL_BYTES))
    with open(files["junk_tail"], "ab") as f:
        f.write(rng.bytes(3 * TAIL_BYTES))
    files["huge_mjpeg"] = encode_resizing(root / "huge_mjpeg.mkv", "mjpeg", list(_frames(4, BIG, BIG, seed)),
                                          "yuvj420p")
    small, big = _frames(2, 64, 64, seed + 1), _frames(1, BIG, BIG, seed + 1)
    files["grows_midstream"] = encode_resizing(root / "grows_midstream.mkv", "mjpeg", [small[0], big[0], small[1]],
                                               "yuvj420p")
    realtime = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}  # packets in frame order
    files["grows_vp9"] = encode_resizing(root / "grows_vp9.webm", "libvpx-vp9",
                                         [*_frames(4, 64, 64, seed + 5), *_frames(2, 512, 512, seed + 5)],
                                         options=realtime)
    # zero latency: each encoder's packets come out as its frames go in, so the two encoders' timestamps stay in order
    for encoder, options in (("libx264", {"tune": "zerolatency"}),
                             ("libx265", {"tune": "zerolatency", "x265-params": "log-level=error"})):
        files[f"grows_{encoder}"] = encode_resizing(root / f"grows_{encoder}.mp4", encoder,  # an in-band 512x512 SPS
                                                    [*_frames(4, 64, 64, seed + 6), *_frames(2, 512, 512, seed + 6)],
                                                    options=options)
    files["first_shorter"] = _two_streams(root / "first_shorter.mkv", 6, 24, seed + 2)
    files["second_shorter"] = _two_streams(root / "second_shorter.mkv", 24, 6, seed + 3)
    files["audio_longer"] = _audio_longer(root / "audio_longer.webm", seed + 4)
    data = files["first_shorter"].read_bytes()
    files["two_cut"] = root / "two_cut.mkv"  # both streams cut: the download stopped at 40% of the file
    files["two_cut"].write_bytes(data[: int(len(data) * 0.4)])
    return files


@pytest.fixture(scope="module")
def hostile(videos, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_hostile(tmp_path_factory.mktemp("hostile"), videos.good[0])


def _read_bytes() -> int:
    """Bytes this process has read through read(2) and friends so far (``rchar``, page cache included)."""
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")))


@pytest.mark.parametrize("name, reason", [
    ("sparse", "sparse file: only "),
    ("zero_tail", f"its last {TAIL_BYTES} bytes (of "),
    ("junk_tail", "its packets end at byte "),
])
def test_a_file_whose_size_its_video_cannot_explain_is_refused_reading_little(hostile, name: str,
                                                                              reason: str) -> None:
    path = str(hostile[name])
    size = os.path.getsize(path)
    before = _read_bytes()
    info = probe_video(path)
    read = _read_bytes() - before
    assert info.error.startswith(reason), info.error
    assert "download it again" in info.error
    if name != "junk_tail":  # refused before the container is parsed: the inode, or one read of the last MiB
        assert read <= TAIL_BYTES + (64 << 10), read
    else:  # the demux reads the appended bytes looking for packets: the file's size, not more
        assert read <= 3 * size, (read, size)
    assert deep_probe(path).startswith(reason if name != "junk_tail" else "")
    if name == "sparse":
        assert size == 4 << 30 and read < 1 << 20, read  # 4 GiB on paper, ~1 KiB read


def test_the_size_checks_pass_every_good_file(videos, hostile) -> None:
    paths = [str(p) for p in videos.good] + [str(videos.portrait), str(videos.short), str(videos.h264)]
    paths += [str(hostile[n]) for n in ("first_shorter", "second_shorter", "audio_longer")]
    infos, rejected = check_videos(paths, "pyav", 4, 1, pad=True, cache=None)
    assert rejected == [] and all(i.pix_fmt for i in infos)
    assert all(not validate.size_problem(p, os.stat(p)) for p in paths)


def test_frames_above_the_pixel_limit_are_refused_from_the_header(hostile, capsys: pytest.CaptureFixture) -> None:
    path = str(hostile["huge_mjpeg"])
    info = probe_video(path)
    assert (info.width, info.height, info.frames, info.error) == (BIG, BIG, 4, "")
    assert info.pix_fmt == ""  # above PROBE_DECODE_SIZE: measured from the header, no frame decoded
    _, rejected = check_videos([path], "cpu", 4, 1, pad=True, cache=None)
    assert rejected == [(path, f"frame {BIG}x{BIG} ({BIG * BIG} pixels, 192 MiB per RGB frame) is above "
                               f"data.max_frame_pixels={MAX_FRAME_PIXELS}; downscale it (python -m "
                               "timesformer_harness.pipelines.tools.prepare MANIFEST --out DIR --short-side 256) or "
                               "raise data.max_frame_pixels")]
    assert check_videos([path], "cpu", 4, 1, pad=True, cache=None, max_pixels=BIG * BIG)[1] == []
    manifest = hostile["huge_mjpeg"].with_suffix(".csv")
    manifest.write_text(f"{path} 0\n")
    assert validate.main([str(manifest), "--cache", "", "--deep"]) == 1  # the CLI names its own flag
    out = capsys.readouterr().out
    assert f"is above --max-frame-pixels {MAX_FRAME_PIXELS}; " in out and "raise --max-frame-pixels" in out
    assert "deep check: 0 videos decoded" in out


def test_a_frame_larger_than_the_header_says_is_refused_by_the_decoder_before_allocating(hostile) -> None:
    """The header and the first frame say 64x64, the second frame is 8192x8192: the probe (header and first frame)
    passes it, the deep check's decoder refuses that frame before allocating it (96 MiB at 4:2:0)."""
    path = str(hostile["grows_midstream"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    info = probe_video(path)
    assert (info.width, info.height, info.frames, info.error) == (64, 64, 3, "")
    assert deep_probe(path).startswith("decode error after 2 packets, 1 frames"), deep_probe(path)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - rss
    assert grown < 48 << 20, grown


@pytest.mark.parametrize("loader", ["pyav", "dali"])
def test_the_loaders_refuse_a_video_whose_frames_grow_midstream_before_decoding_it(videos, hostile, tmp_path: Path,
                                                                                  loader: str) -> None:
    """The shallow check passes both files (header and first frame: 64x64). The packet index reads each payload's
    own frame size (the MJPEG file's second frame is 8192x8192, the VP9 file's fifth a 512x512 keyframe; the H.264
    and HEVC mp4 files, whose header says 64x64, send a 512x512 sequence parameter set in-band before their fifth
    frame), so both loaders quarantine the files with that reason before any decoder meets the frame: before, the
    PyAV loader's decoder refused the MJPEG frame (FFmpeg's max_pixels) and DALI's CPU decoder, which takes no such
    bound, allocated it. The whole file is refused, not only its clips that hold the frame."""
    from timesformer_harness.pipelines.config import DataConfig
    from timesformer_harness.pipelines.factory import build_loader

    grown = {str(hostile["grows_midstream"]): "8192x8192", str(hostile["grows_vp9"]): "512x512"}
    if loader == "pyav":  # DALI's CPU decoder takes neither H.264 nor HEVC (the pre-flight check says so)
        grown.update({str(hostile["grows_libx264"]): "512x512", str(hostile["grows_libx265"]): "512x512"})
    manifest = tmp_path / "m.csv"
    manifest.write_text("".join(f"{p} 0\n" for p in [*map(str, videos.good[:3]), *grown]))
    cfg = DataConfig(loader=loader, backend="cpu", train_manifest=str(manifest), num_frames=2, sampling_rate=1,
                     train_jitter_scales=[32, 36], train_crop_size=32, batch_size=2, num_workers=0,
                     validate="shallow", validate_cache="none", on_bad_video="skip", max_bad_fraction=1.0)
    built = build_loader(cfg, "train")
    assert built.rejected == []  # the shallow check cannot see them
    seen = {i for batch in built for i in batch.index.tolist()}
    assert seen == {0, 1, 2}, seen
    reasons = {bad.path: bad.reason for bad in built.quarantine.entries}
    assert reasons.keys() == grown.keys(), reasons
    for path, size in grown.items():
        assert f"codes a {size} frame, far above the 64x64 of the stream's header" in reasons[path], reasons[path]


def test_two_video_streams_are_judged_on_the_first(hostile) -> None:
    first_short, second_short = str(hostile["first_shorter"]), str(hostile["second_shorter"])
    infos, rejected = check_videos([first_short, second_short, str(hostile["audio_longer"])], "cpu", 4, 1,
                                   pad=True, cache=None)
    assert rejected == [] and [i.frames for i in infos] == [6, 24, 12]  # the first video stream's packets
    _, rejected = check_videos([first_short, second_short], "cpu", 8, 2, pad=False, cache=None)
    assert rejected == [(first_short, "too short: 6 frames < 16 needed by the clip span (set data.pad_short=true "
                                      "to pad it: window sampling repeats the last frame, segment sampling spreads "
                                      "the repeats over the clip)")]
    cut = probe_video(str(hostile["two_cut"]))
    assert cut.error.startswith("truncated: the container declares 0.80 s but frames cover only"), cut.error


# ----------------------------------------------------------------------------------------------------------------
# The capped child: validate --deep and build_loader(on_bad_video=skip) on a manifest holding the 8192x8192 file.
def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _child(manifest: str, cache: str, max_pixels: int) -> dict:
    from timesformer_harness.pipelines.config import DataConfig
    from timesformer_harness.pipelines.factory import build_loader

    cfg = DataConfig(loader="pyav", backend="cpu", train_manifest=manifest, num_frames=4, sampling_rate=1,
                     train_jitter_scales=[32, 36], train_crop_size=32, batch_size=2, num_workers=0,
                     validate="deep", validate_cache=cache, on_bad_video="skip", max_bad_fraction=1.0,
                     max_frame_pixels=max_pixels)
    good = replace(cfg, train_manifest=manifest + ".good", validate_cache="none")
    for batch in build_loader(good, "train"):  # warm up: every lazy import, the allocator's arenas
        pass
    clip = ["--frames", "4", "--sampling-rate", "1", "--workers", "1", "--deep"]
    assert validate.main([manifest + ".good", "--cache", "", *clip]) == 0
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    cap = _vm_size() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out: dict = {"cap": cap}
    out["validate_exit"] = validate.main([manifest, "--cache", cache, *clip, "--max-frame-pixels", str(max_pixels)])
    try:
        loader = build_loader(cfg, "train")
        out["rejected"] = loader.rejected
        out["indices"] = sorted(i for batch in loader for i in batch.index.tolist())
        out["quarantined"] = [(b.path, b.reason) for b in loader.quarantine.entries]
    except Exception as e:  # noqa: BLE001 - recorded: the parent asserts what it was
        out["error"] = f"{type(e).__name__}: {e}"
    out["rss_growth"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - baseline
    return out


def run_child(manifest: Path, cache: Path, max_pixels: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    res = subprocess.run([sys.executable, __file__, "child", str(manifest), str(cache), str(max_pixels)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_pixel_limit_makes_the_quarantine_independent_of_free_memory(videos, hostile, tmp_path: Path) -> None:
    """Under a cap of 384 MiB past the warmed-up process, the 8192x8192 file is refused by ``validate --deep`` and by
    ``build_loader`` (skip) with the limit's reason, the good files train, and the process grows by less than one
    such frame. With the limit raised past it, the file reaches the decoder, which fails for want of memory: then
    the decision would depend on what the machine has free."""
    good = [str(p) for p in videos.good[:4]]
    big = str(hostile["huge_mjpeg"])
    manifest = tmp_path / "m.csv"
    manifest.write_text("".join(f"{p} 0\n" for p in good + [big]))
    Path(f"{manifest}.good").write_text("".join(f"{p} 0\n" for p in good))
    r = run_child(manifest, tmp_path / "cache.sqlite", MAX_FRAME_PIXELS)
    assert r["validate_exit"] == 1 and "error" not in r, r
    assert [p for p, _ in r["rejected"]] == [big]
    assert r["rejected"][0][1].startswith(f"frame {BIG}x{BIG} ({BIG * BIG} pixels")
    assert r["indices"] == [0, 1, 2, 3] and r["quarantined"] == []
    assert r["rss_growth"] < 64 << 20, r["rss_growth"]
    raised = run_child(manifest, tmp_path / "cache2.sqlite", BIG * BIG)
    failed = raised.get("error", "") + "".join(reason for _, reason in raised.get("quarantined", []))
    assert "MemoryError" in failed or "Cannot allocate memory" in failed or "Errno 12" in failed, raised


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    print(json.dumps(_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))


def test_the_pyav_loader_refuses_a_frame_of_another_size_than_the_header(tmp_path: Path) -> None:
    """MPEG-4 Part 2 frames carry no size the packet index reads, and its decoder's pixel bound has a floor (512x512,
    for the decoder's own buffer): a 64x64 stream whose frames become 400x400 is refused by the PyAV loader's decode,
    whose crop windows are the header's, instead of cropping a corner of the larger frames."""
    from timesformer_harness.pipelines.pyav import decode_clip

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (s, s, 3), dtype=np.uint8) for s in [64] * 8 + [400] * 8]
    path = str(encode_resizing(tmp_path / "grows_mpeg4.avi", "mpeg4", frames))
    assert decode_clip(path, [1, 3]).frames.shape[1:3] == (64, 64)
    with pytest.raises(RuntimeError, match=r"a 400x400 frame in a stream whose header says 64x64: re-encode"):
        decode_clip(path, [10, 12])
