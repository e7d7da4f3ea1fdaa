"""Pre-flight validation: every bad input gets its reason; cache; CLI exit codes; build_loader error/skip/auto."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import timesformer_harness.pipelines.validate as validate
from timesformer_harness.config import REPO_ROOT
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.factory import build_loader
from timesformer_harness.pipelines.validate import check_videos, probe_video

BAD = {  # fixture attribute -> (reason on the DALI cpu backend, with padding allowed)
    "missing": "missing: no such file",
    "empty": "empty file (0 bytes)",
    "garbage": "cannot open/decode: InvalidDataError",
    "truncated": "truncated: the container declares",
    "h264": "is not decodable by DALI's cpu backend",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_input_has_its_reason(videos, name: str) -> None:
    path = str(getattr(videos, name))
    _, rejected = check_videos([str(videos.good[0]), path], "cpu", 8, 2, pad=True, cache=None)
    assert len(rejected) == 1 and rejected[0][0] == path
    assert BAD[name] in rejected[0][1], rejected[0][1]


def test_a_named_pipe_or_a_device_is_refused_without_being_opened(tmp_path) -> None:
    """A named pipe (opening it would wait for a writer for ever) and a character device (/dev/zero: reading never
    ends) report a size of 0; each is named for what it is, and none is opened."""
    import os

    fifo, zero = tmp_path / "pipe.webm", tmp_path / "zero.webm"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    for path, kind in ((fifo, "a named pipe"), (zero, "a character device")):
        assert probe_video(str(path)).error.startswith(f"not a regular file ({kind}): the loaders seek")


def test_timestamps_that_start_late_are_not_read_as_truncation(tmp_path) -> None:
    """A complete WebM whose timestamps start at 5 s (a cut that kept them): Matroska declares its end time (6.3 s)
    as the duration, which the frames' span (1.3 s) only reaches counted from 0."""
    import av
    from fractions import Fraction

    from conftest import textured_frames

    path = tmp_path / "late.webm"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx-vp9", rate=30)
        s.width, s.height, s.pix_fmt, s.time_base = 64, 48, "yuv420p", Fraction(1, 1000)
        s.options = {"deadline": "realtime", "cpu-used": "8", "g": "8"}
        for k, img in enumerate(textured_frames(40, 48, 64, 2)):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = 5000 + 33 * k, Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(str(path)) as c:
        assert c.duration / 1e6 > 6.0  # the end time, not the 1.3 s the frames last
    info = probe_video(str(path))
    assert info.error == "" and info.frames == 40


def test_codec_sets_per_backend(videos) -> None:
    info = probe_video(str(videos.h264))
    assert info.codec == "h264" or info.codec == "mpeg4"
    for backend in ("gpu", "pyav"):
        assert check_videos([str(videos.h264)], backend, 8, 2, pad=True, cache=None)[1] == []


def test_too_short_depends_on_span_and_padding(videos) -> None:
    short = [str(videos.short)]  # 6 frames at 30 fps
    _, rej = check_videos(short, "cpu", 4, 2, target_fps=30, pad=False, cache=None)
    assert rej and "too short: 6 frames < 8 needed" in rej[0][1]
    assert check_videos(short, "cpu", 4, 2, pad=True, cache=None)[1] == []  # padded with the last frame
    assert check_videos(short, "cpu", 3, 2, pad=False, cache=None)[1] == []  # span 6 fits
    assert "too short: 6 frames < 8" in check_videos(short, "cpu", 8, 1, pad=False, segment=True, cache=None)[1][0][1]


def test_probe_cache_by_path_size_mtime(videos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "probe.sqlite"
    paths = [str(p) for p in videos.good[:3]]
    first, _ = check_videos(paths, "cpu", 8, 2, cache=cache)
    calls = []
    monkeypatch.setattr(validate, "probe_video", lambda p: calls.append(p) or validate.VideoInfo(p, "probed"))
    again, rej = check_videos(paths, "cpu", 8, 2, cache=cache)
    assert calls == [] and again == first and rej == []
    copy = tmp_path / "copy.webm"  # a changed file (new size/mtime) is probed again
    copy.write_bytes(videos.good[0].read_bytes())
    check_videos([str(copy)], "cpu", 8, 2, cache=cache)
    copy.write_bytes(videos.good[1].read_bytes() + b"\0")
    _, rej = check_videos([str(copy)], "cpu", 8, 2, cache=cache)
    assert calls == [str(copy), str(copy)] and rej == [(str(copy), "probed")]


def test_cli_lists_unusable_files_and_exits_1(videos, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = videos.manifest("cli_good.csv", videos.good[:2])
    bad = videos.manifest("cli_bad.csv", videos.good[:2] + [videos.h264, videos.empty])
    args = ["--cache", str(tmp_path / "c.sqlite"), "--frames", "4", "--sampling-rate", "2"]
    res = subprocess.run([sys.executable, "-m", "timesformer_harness.pipelines.validate", *args, str(bad)],
                         capture_output=True,
                         text=True, cwd=REPO_ROOT)  # a real process once; the other cases in-process
    assert res.returncode == 1
    assert f"{videos.h264}: codec" in res.stdout and f"{videos.empty}: empty file" in res.stdout
    assert "2/4 videos usable by the cpu backend (2 rejected)" in res.stdout
    assert validate.main(args + [str(good)]) == 0
    assert "2/2 videos usable by the cpu backend (0 rejected)" in capsys.readouterr().out
    assert validate.main(args + ["--backend", "gpu", "--gpu-arch", "hopper", str(bad)]) == 1
    out = capsys.readouterr().out  # the empty file, and the 64x48 VP9 files: below NVDEC's 128x128 VP9 minimum
    assert "(3 rejected)" in out and f"{videos.good[0]}: frame 64x48 is below NVDEC's VP9 minimum" in out
    (tmp_path / "m.csv").write_text("a.webm one\n")
    assert validate.main(args + [str(tmp_path / "m.csv")]) == 1
    assert "m.csv:1: expected 'path label'" in capsys.readouterr().err
    (tmp_path / "m.csv").write_text("a.webm 1\nb.webm 5\n")
    assert validate.main(args + ["--num-classes", "3", str(tmp_path / "m.csv")]) == 1
    err = capsys.readouterr().err
    assert "m.csv:2: label 5 is out of range for 3 classes (--num-classes)" in err  # this CLI's flag, not the key
    assert "fix the manifest, or pass another --num-classes" in err and "model.num_classes" not in err


def _cfg(videos, manifest: Path, **kw) -> DataConfig:
    base = DataConfig(loader="dali", backend="cpu", root=str(videos.root), train_manifest=str(manifest),
                      num_frames=4, sampling_rate=2, train_jitter_scales=[40, 48], train_crop_size=32,
                      batch_size=2, num_workers=1, validate_cache="none")
    return replace(base, **kw)


def test_build_loader_on_bad_video_error_lists_the_files(videos) -> None:
    manifest = videos.manifest("err.csv", videos.good[:4] + [videos.garbage, videos.missing])
    with pytest.raises(ValueError, match=r"(?s)2 of 6 videos in the train manifest cannot be used .*garbage.webm: "
                                         r"cannot open.*missing.webm: missing.*data.on_bad_video=skip"):
        build_loader(_cfg(videos, manifest), "train", device="cpu")


def test_a_manifest_none_of_whose_videos_exists_says_how_its_paths_are_read(videos, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """Paths written from another folder than the manifest's: every video is missing, and both the validator and the
    loader say that a relative path is read from the manifest's folder. One video there: no such hint."""
    listing = tmp_path / "lists" / "train.csv"
    listing.parent.mkdir()
    listing.write_text("mydata/a.webm 0\nmydata/b.webm 1\n")  # from the folder above the manifest's
    hint = "none of the manifest's videos exists: a relative path in a manifest is read from the manifest's own folder"
    args = ["--cache", "none", "--frames", "4", "--sampling-rate", "2"]
    assert validate.main(args + [str(listing)]) == 1
    out = capsys.readouterr().out
    assert f"{listing.parent / 'mydata' / 'a.webm'}: missing: no such file" in out and hint in out
    with pytest.raises(ValueError, match=r"2 of 2 videos in the train manifest cannot be used \(none of the "
                                         r"manifest's videos exists: a relative path"):
        build_loader(_cfg(videos, listing), "train", device="cpu")
    (tmp_path / "labels.json").write_text('{"Pushing something": 0}')  # SSv2 names ids: its own hint
    (tmp_path / "split.json").write_text('[{"id": 5, "template": "Pushing [something]"}]')
    assert validate.main(args + ["--format", "ssv2", "--ssv2-labels", str(tmp_path / "labels.json"),
                                 str(tmp_path / "split.json")]) == 1
    out = capsys.readouterr().out
    assert "none of the split's videos exists: SSv2 videos are read as {folder}/{id}{suffix}" in out and hint not in out
    listing.write_text(f"mydata/a.webm 0\n{videos.good[0]} 1\n")
    assert validate.main(args + [str(listing)]) == 1
    assert "none of the manifest's videos exists" not in capsys.readouterr().out


def test_build_loader_skip_writes_rejected_csv(videos, tmp_path: Path) -> None:
    bad = [videos.garbage, videos.missing, videos.empty, videos.truncated, videos.h264]
    manifest = videos.manifest("skip.csv", videos.good[:4] + bad)
    loader = build_loader(_cfg(videos, manifest, on_bad_video="skip"), "train", device="cpu", run_dir=tmp_path)
    assert sorted(p for p, _ in loader.rejected) == sorted(str(p) for p in bad)
    lines = (tmp_path / "rejected.csv").read_text().splitlines()
    assert lines[0] == "path,reason,stage,epoch,batch,rank" and len(lines) == 1 + len(bad)
    assert all(line.endswith(",preflight,,,") for line in lines[1:])
    assert loader.num_clips == 4 and len(loader) == 2
    seen = sorted(i for b in loader for i in b.index.tolist())
    assert seen == [0, 1, 2, 3]  # the good videos keep their manifest indices


def test_auto_falls_back_to_pyav_for_codecs_dali_cpu_cannot_decode(videos, caplog) -> None:
    manifest = videos.manifest("auto.csv", videos.good[:3] + [videos.h264])
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.pipelines.factory"):
        loader = build_loader(_cfg(videos, manifest, loader="auto"), "train", device="cpu")
    assert type(loader).__name__ == "PyAVLoader" and loader.rejected == []
    assert "using the PyAV loader because 1 of 4 video(s) cannot be decoded by DALI's cpu backend, e.g. " \
        f"{videos.h264}: codec " in caplog.text
    ok = videos.manifest("auto_ok.csv", videos.good[:3])
    assert type(build_loader(_cfg(videos, ok, loader="auto"), "train", device="cpu")).__name__ == "DaliLoader"


# ----------------------------------------------------------------------------------------------------------------
# python -m timesformer_harness.validate --config: the run's own settings.
TOY = REPO_ROOT / "configs/exp/toy_divided_cpu.yaml"


def test_config_mode_checks_the_toy_recipe_as_its_run_would(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from timesformer_harness import validate as run_validate

    monkeypatch.chdir(REPO_ROOT)  # data.root=data/toy is relative to where a run starts
    cache = tmp_path / "c.sqlite"
    report = tmp_path / "report.json"
    assert run_validate.main(["--config", str(TOY), "--split", "val", f"data.validate_cache={cache}",
                              "--report", str(report)]) == 0
    out = capsys.readouterr().out
    loader = "dali loader (cpu decode)" if validate_dali() else "pyav loader"
    assert f"val split (data/toy/val.csv): judged for the {loader} on cpu" in out
    assert f"200/200 videos usable by the {loader} (0 rejected)" in out
    assert json.loads(report.read_text())["usable"] == 200
    assert cache.is_file()  # data.validate_cache, not the CLI's default


def validate_dali() -> bool:
    from timesformer_harness.pipelines.factory import dali_available

    return dali_available() == ""


def _copy_of_toy(tmp_path: Path, videos, lines: list[str], extra: str = "") -> Path:
    """The toy recipe copied into ``tmp_path`` (its defaults made absolute), reading ``lines`` as its train split."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("".join(f"{line}\n" for line in lines))
    text = TOY.read_text().replace("../model/", f"{TOY.parent.parent}/model/").replace(
        "../data/", f"{TOY.parent.parent}/data/")
    config = tmp_path / "my.yaml"
    config.write_text(text.replace("data:\n  batch_size: 32", f"data:\n  root: {tmp_path / 'data'}\n"
                                   f"  path_prefix: {videos.root}\n  validate_cache: none\n  batch_size: 32{extra}"))
    return config


def test_config_mode_uses_loader_fallback_padding_and_num_classes(videos, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from timesformer_harness import validate as run_validate

    lines = [f"{p.name} {i % 6}" for i, p in enumerate(videos.good[:3])] + ["short.webm 1", "h264.mp4 2"]
    config = _copy_of_toy(tmp_path, videos, lines)
    # the run's settings: data.pad_short=true by default (the 6-frame file is padded), the H.264 file moves the
    # decode to PyAV (data.loader=auto), 8 frames x rate 3 at 30 fps
    assert run_validate.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "judged for the pyav loader on cpu, because 1 of 5 video(s) cannot be decoded by DALI's cpu backend" in out \
        or not validate_dali()
    assert "5/5 videos usable by the pyav loader (0 rejected)" in out
    # the same manifest through the flag CLI's defaults (DALI cpu, no padding, 8x8): what the config mode replaces
    manifest = tmp_path / "data" / "train.csv"
    assert validate.main([str(manifest), "--path-prefix", str(videos.root), "--cache", ""]) == 1
    flags = capsys.readouterr().out
    assert "short.webm: too short: 6 frames < 64 needed by the clip span (set --pad to pad" in flags
    assert "h264.mp4: codec h264 is not decodable by DALI's cpu backend" in flags and "--backend pyav" in flags
    # with padding off, the hint names the config key; the clip span is the config's 8 x 3
    assert run_validate.main(["--config", str(config), "data.pad_short=false"]) == 1
    out = capsys.readouterr().out
    assert "short.webm: too short: 6 frames < 24 needed by the clip span (set data.pad_short=true to pad" in out
    # labels against model.num_classes (6 in the toy recipe), before any video is probed
    (tmp_path / "data" / "train.csv").write_text("good0.webm 7\n")
    assert run_validate.main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.csv:1: label 7 is out of range for 6 classes" in err
    assert "Traceback" not in err


def test_config_mode_runs_as_a_module_and_the_flag_cli_points_to_it(videos, tmp_path: Path) -> None:
    config = _copy_of_toy(tmp_path, videos, [f"{p.name} 0" for p in videos.good[:2]] + ["garbage.webm 0"])
    res = subprocess.run([sys.executable, "-m", "timesformer_harness.validate", "--config", str(config)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"{videos.garbage}: cannot open/decode: InvalidDataError" in res.stdout
    assert "2/3 videos usable" in res.stdout
    for args in (["m.csv", "--config", str(config)], ["--config", str(config)]):  # with a manifest or without
        res = subprocess.run([sys.executable, "-m", "timesformer_harness.pipelines.validate", *args],
                             capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 1
        assert res.stderr.strip() == (f"error: a run's config is read by the harness, a layer above the pipelines: "
                                      f"run python -m timesformer_harness.validate --config {config} [--split train] "
                                      f"to check with its settings")
    (tmp_path / "bad.yaml").write_text("data:\n  num_frame: 8\n")
    res = subprocess.run([sys.executable, "-m", "timesformer_harness.validate", "--config", "bad.yaml"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: unknown config key 'data.num_frame'"), res.stderr


def test_a_result_worked_out_while_the_file_changed_is_worked_out_again(videos, tmp_path, monkeypatch) -> None:
    """A probe of a file still being written is stored under the file as it was before the probe, so the finished
    file is probed again (its verdict is not the half-written file's)."""
    path = tmp_path / "arriving.webm"
    whole = videos.good[0].read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    real, calls = validate.probe_video, []

    def written_meanwhile(p: str) -> validate.VideoInfo:
        info = real(p)
        calls.append(info.error)
        if len(calls) == 1:
            path.write_bytes(whole)  # the copy finishes while the result waits to be stored
        return info

    monkeypatch.setattr(validate, "probe_video", written_meanwhile)
    cache = tmp_path / "c.sqlite"
    (first,) = validate.probe_all([str(path)], cache, workers=1, progress=False)
    (second,) = validate.probe_all([str(path)], cache, workers=1, progress=False)
    assert first.error and len(calls) == 2 and second.error == "" and second.frames == 24
    assert validate.probe_all([str(path)], cache, workers=1, progress=False) == [second] and len(calls) == 2


def test_a_file_that_cannot_be_read_is_not_remembered_as_bad(videos, tmp_path, monkeypatch) -> None:
    """A permission or I/O error is the storage's, not the file's: it is reported without the advice to re-encode,
    and neither the probe nor the deep check keeps it, so the file is read again once it can be."""
    import errno

    import av

    path = str(videos.good[0])
    real_open = av.open

    def denied(*args, **kwargs):
        raise av.error.PermissionError(errno.EACCES, "Permission denied", path)

    cache = tmp_path / "c.sqlite"
    monkeypatch.setattr(av, "open", denied)
    (info,) = validate.probe_all([path], cache, workers=1, progress=False)
    (deep,) = validate.deep_check([path], cache, workers=1, progress=False)
    assert info.error.startswith("unreadable: PermissionError") and "re-encode" not in info.error
    assert "unreadable: PermissionError" in deep[1] and "re-encode" not in deep[1]
    monkeypatch.setattr(av, "open", real_open)
    (info,) = validate.probe_all([path], cache, workers=1, progress=False)
    assert info.error == "" and validate.deep_check([path], cache, workers=1, progress=False) == []


def test_importing_the_pipelines_touches_no_cache_folder() -> None:
    """The cache folder is found when a cache is used, not on import: a run with data.validate_cache=none, or one
    given its own path, imports the pipelines even where the default folder cannot be made."""
    code = ("import timesformer_harness.common as common\n"
            "def unusable():\n    raise ValueError('the default cache folder cannot be made')\n"
            "common.default_cache_dir = unusable\n"
            "import timesformer_harness.pipelines.factory, timesformer_harness.pipelines.validate")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("flag, value", [("--target-fps", "0"), ("--target-fps", "nan"), ("--target-fps", "-1"),
                                         ("--frames", "0"), ("--frames", "-5"), ("--sampling-rate", "-3"),
                                         ("--workers", "-1"), ("--log-every", "-1")])
def test_the_manifest_cli_refuses_numbers_out_of_range(flag, value, tmp_path, capsys) -> None:
    """As the config path does: exit 2 naming the flag, before any file is read (--target-fps 0 was a
    ZeroDivisionError, -1 an eight-minute crawl, --frames 0 "all usable")."""
    (tmp_path / "m.csv").write_text("a.webm 1\n")
    with pytest.raises(SystemExit) as exit_:
        validate.main([flag, value, "--cache", "none", str(tmp_path / "m.csv")])
    assert exit_.value.code == 2 and f"{flag} {value}: give" in capsys.readouterr().err


@pytest.mark.parametrize("fps, refused", [(12288.0, True), (0.5, True), (30.0, False), (1.0, False)])
def test_a_frame_rate_no_video_has_is_refused_for_kinetics_sampling(fps, refused) -> None:
    """A probe's frame rate from broken timestamps (a negative time step read 12288 fps, all frames at one time
    0.5 fps) would set the clip's span: refused naming it, for Kinetics-style sampling; segment sampling (SSv2)
    counts frames and does not use it."""
    info = validate.VideoInfo("v.webm", codec="vp9", frames=300, fps=fps, height=240, width=320, pix_fmt="yuv420p",
                              bit_depth=8, chroma="420")
    reasons = validate.judge([info], "cpu", 8, 1, pad=True)
    assert bool(reasons) == refused and all(f"a frame rate of {fps:.3g} fps" in r for _, r in reasons)
    assert validate.judge([info], "cpu", 8, 1, pad=True, segment=True) == []


def test_segment_sampling_is_a_key_of_its_own(videos, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SSv2-style videos listed in a CSV manifest of one's own get segment sampling from data.sampling=segment (the
    loader plans one frame per segment; the pre-flight check and both validate CLIs need T frames, not a window);
    data.sampling=auto is window sampling for a CSV manifest, as before."""
    from timesformer_harness import validate as run_validate
    from timesformer_harness.config import load_config
    from timesformer_harness.pipelines.sampling import kinetics_frames, segment_frames

    lines = [f"{p.name},{i % 2}" for i, p in enumerate(videos.good[:3])] + ["short.webm,1"]
    config = _copy_of_toy(tmp_path, videos, [], "\n  format: csv\n  pad_short: false\n  num_frames: 4\n"
                          "  sampling_rate: 8\n  loader: pyav\n  sampling: segment")
    for split in ("train", "val"):
        (tmp_path / "data" / f"{split}.csv").write_text("".join(f"{line}\n" for line in lines))
    cfg = load_config(config, ["data.num_workers=0", "data.batch_size=4"])
    assert cfg.data.sampling == "segment"
    plans = build_loader(cfg.data, "train", device="cpu", num_classes=6).planner.plans(0)
    for p in plans:  # a random frame in each segment of the whole video, not a window of 4 x 8 frames
        edges = [round((p.video_frames - 1) / 4 * i) for i in range(5)]
        assert all(edges[i] <= f <= edges[i + 1] for i, f in enumerate(p.frames))
    assert sorted(p.video_frames for p in plans) == [6, 24, 24, 24]  # the 6-frame video is usable: it has T frames
    assert run_validate.main(["--config", str(config)]) == 0
    assert "4/4 videos usable" in capsys.readouterr().out
    manifest = [str(tmp_path / "data" / "train.csv"), "--format", "csv", "--path-prefix", str(videos.root),
                "--cache", "", "--backend", "pyav", "--frames", "4"]
    assert validate.main([*manifest, "--sampling", "segment"]) == 0
    assert "4/4 videos usable" in capsys.readouterr().out
    assert validate.main(manifest) == 1  # auto on a CSV manifest: window sampling, 4 x 8 frames
    assert "short.webm: too short: 6 frames < 32 needed by the clip span" in capsys.readouterr().out
    window = load_config(config, ["data.sampling=auto", "data.pad_short=true", "data.num_spatial_crops=1"]).data
    assert window.sampling == "window"
    plans = build_loader(window, "val", device="cpu", num_classes=6).planner.plans(0)
    assert plans[0].frames.tolist() == kinetics_frames(24, 30, 4, 8, 30, 0, 1).tolist()  # [0, 10, 20, 23]
    assert plans[0].frames.tolist() != segment_frames(24, 4).tolist()
    with pytest.raises(ValueError, match=r"data.sampling='segments'; choose from \['auto', 'segment', 'window'\]"):
        load_config(config, ["data.sampling=segments"])


def test_a_cut_file_is_judged_cut_not_blamed_on_the_storage(tmp_path, monkeypatch) -> None:
    """An AVI cut before its index (FFmpeg estimates its duration from what is left) is truncated by its header's
    frame count; a Matroska file cut in its header (FFmpeg says EIO) that reads whole is said to be likely cut, not
    the storage's fault, and is not cached either (an I/O error that passes must not leave a good file bad)."""
    from conftest import encode_video, textured_frames
    from timesformer_harness.pipelines.tools.encode import write_video

    avi = write_video(tmp_path / "m.avi", textured_frames(24, 32, 32, 0), "mjpeg", 30, {}, pix_fmt="yuvj420p")
    data = avi.read_bytes()
    cut_avi = tmp_path / "cut.avi"
    cut_avi.write_bytes(data[:len(data) * 2 // 3])
    info = validate.probe_video(str(cut_avi))
    assert info.error == "truncated: its header declares 24 frames, 14 present", info
    assert validate.probe_video(str(avi)).error == ""
    webm = encode_video(tmp_path / "v.webm", textured_frames(8, 32, 32, seed=1))
    cut_webm = tmp_path / "cut.webm"
    cut_webm.write_bytes(webm.read_bytes()[:100])
    cache = tmp_path / "c.sqlite"
    (info,) = validate.probe_all([str(cut_webm)], cache, workers=1, progress=False)
    assert info.error.startswith("unreadable: OSError") and "yet the file reads whole" in info.error, info
    assert "storage" not in info.error and validate.probe_video(str(cut_webm)).error == info.error
    (deep,) = validate.deep_check([str(cut_webm)], cache, workers=1, progress=False)
    assert "yet the file reads whole" in deep[1] and "storage" not in deep[1], deep
    probes = []
    real_probe = validate.probe_video
    monkeypatch.setattr(validate, "probe_video", lambda p: probes.append(p) or real_probe(p))
    validate.probe_all([str(cut_webm)], cache, workers=1, progress=False)
    assert probes == [str(cut_webm)]  # not cached: probed again


def test_good_mpeg4_files_are_not_refused(tmp_path) -> None:
    """An MP4 trimmed by its edit list (its header counts every sample, fewer are shown) is not truncated; a 32x32
    MPEG-4 Part 2 file decodes under the decoder's pixel bound (that decoder checks a fixed-size buffer against it)."""
    from conftest import encode_video, textured_frames

    mp4 = encode_video(tmp_path / "e.mp4", textured_frames(60, 48, 48, seed=2), codec="mpeg4")
    data = bytearray(mp4.read_bytes())
    at = data.find(b"elst")  # its one segment's duration halved: a tail trim that keeps the samples
    struct.pack_into(">I", data, at + 12, struct.unpack_from(">I", data, at + 12)[0] // 2)
    trimmed = tmp_path / "trimmed.mp4"
    trimmed.write_bytes(bytes(data))
    assert validate.probe_video(str(trimmed)).error == ""
    tiny = encode_video(tmp_path / "tiny.mp4", textured_frames(8, 32, 32, seed=3), codec="mpeg4")
    assert (validate.probe_video(str(tiny)).error, validate.deep_probe(str(tiny))) == ("", "")


def test_a_config_given_as_the_manifest_points_to_the_config_check(tmp_path: Path, capsys) -> None:
    """``pipelines.validate mydata/my.yaml`` read the config as a manifest: "my.yaml:1: expected 'path label' ...
    got label 'minutes.'". It says the file is a config, and the command that checks one."""
    config = tmp_path / "my.yaml"
    config.write_text("# the toy-sized model runs the whole path in minutes.\nmodel:\n  num_classes: 3\n")
    assert validate.main([str(config)]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {config} is a config, not a manifest: run python -m "
                                               f"timesformer_harness.validate --config {config} [--split train] to "
                                               f"check its videos with its settings")
    manifest = tmp_path / "m.csv"  # a manifest's own mistake keeps its message
    manifest.write_text("a.mp4 cat\n")
    assert validate.main([str(manifest)]) == 1
    assert "m.csv:1: expected 'path label'" in capsys.readouterr().err


def test_the_config_check_takes_debug_and_timesformer_debug(tmp_path: Path, capsys, monkeypatch) -> None:
    """``timesformer_harness.validate`` refused ``--debug`` and ignored TIMESFORMER_DEBUG, as no other entry point
    does: both now add the error's traceback; without them the error stays one line (exit status 1)."""
    from timesformer_harness.validate import main as check_config

    (tmp_path / "bad.yaml").write_text("data:\n  num_frame: 8\n")
    monkeypatch.delenv("TIMESFORMER_DEBUG", raising=False)
    assert check_config(["--config", str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'data.num_frame'") and "Traceback" not in err
    for argv, env in ((["--debug"], "0"), ([], "1")):
        monkeypatch.setenv("TIMESFORMER_DEBUG", env)
        assert check_config(["--config", str(tmp_path / "bad.yaml"), *argv]) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.strip().splitlines()[-1].startswith("error: unknown config key 'data.num_frame'")
