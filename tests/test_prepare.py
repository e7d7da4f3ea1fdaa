"""Dataset preparation on real files: round trip through the validator and the DALI CPU loader, labels, broken
sources, a killed run resumed, idempotence, frame-rate resampling, SSv2 manifests."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from timesformer_harness.config import REPO_ROOT
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.common import is_temporary
from timesformer_harness.pipelines.tools.decode_cost import read_gop
from timesformer_harness.pipelines.manifest import read_entries, read_kinetics, read_ssv2
from timesformer_harness.pipelines.tools.prepare import JOURNAL, SPEC_FILE, main, parse_gop, prepare
from timesformer_harness.pipelines.tools.transcode import PrepareSpec, output_size, probe_source, transcode
from timesformer_harness.pipelines.validate import check_videos
from tests.conftest import encode_video, textured_frames


def temporaries(folder: Path) -> list[Path]:
    """Outputs being written (or left by a killed writer): ``timesformer_harness.common.atomic_path``'s
    temporaries."""
    return [p for p in folder.glob(".*") if is_temporary(p)]


@pytest.fixture(scope="module")
def prepared(videos, tmp_path_factory: pytest.TempPathFactory):
    """The session's good videos plus four broken ones, prepared once (VP9, short side 32, GOP 4, 2 workers)."""
    vs = videos
    entries = list(zip(vs.good, vs.labels)) + [(vs.garbage, 1), (vs.empty, 2), (vs.missing, 0), (vs.truncated, 1)]
    manifest = vs.root / "prep_src.csv"
    manifest.write_text("".join(f"{p.name} {lab}\n" for p, lab in entries))
    out = tmp_path_factory.mktemp("prepared")
    code = main([str(manifest), "--out", str(out), "--short-side", "32", "--gop", "4", "--workers", "2",
                 "--no-progress"])
    return vs, manifest, out, code


def test_round_trip(prepared):
    vs, manifest, out, code = prepared
    assert code == 1  # some sources failed
    rows = read_kinetics(out / manifest.name)
    assert [Path(r.path).name for r in rows] == [p.name for p in vs.good]  # same order, same names
    assert [r.label for r in rows] == vs.labels  # labels preserved
    assert all(Path(r.path).parent == out for r in rows)
    infos, rejected = check_videos([r.path for r in rows], "cpu", num_frames=4, sampling_rate=2, cache=None)
    assert rejected == []
    for info in infos:
        assert (info.codec, info.height, info.width, info.frames) == ("vp9", 32, 42, 24)
        assert read_gop(info.path).keyframes == (0, 4, 8, 12, 16, 20)
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["spec"]["codec"] == "vp9" and spec["spec"]["gop"] == 4 and spec["videos"] == 6


def test_broken_sources_are_reported(prepared):
    vs, _, out, _ = prepared
    failed = {Path(f["path"]).name: f["reason"] for f in json.loads((out / SPEC_FILE).read_text())["failed"]}
    assert set(failed) == {vs.garbage.name, vs.empty.name, vs.missing.name, vs.truncated.name}
    assert "Invalid data" in failed[vs.garbage.name] and "truncated" in failed[vs.truncated.name]
    assert "empty" in failed[vs.empty.name] and "missing" in failed[vs.missing.name]
    assert not list(out.glob(".*"))  # no partial file left behind


def test_loads_through_dali_cpu(prepared):
    pytest.importorskip("nvidia.dali")
    from timesformer_harness.pipelines.factory import build_loader

    vs, manifest, out, _ = prepared
    cfg = DataConfig(loader="dali", backend="cpu", root=str(out), train_manifest=str(out / manifest.name),
                     num_frames=4, sampling_rate=2, train_jitter_scales=[32, 36], train_crop_size=32, batch_size=2,
                     num_workers=1, validate_cache="none", pad_short=False)
    loader = build_loader(cfg, "train", device="cpu")
    assert type(loader).__name__ == "DaliLoader" and loader.rejected == []
    seen = {}
    for batch in loader:
        assert tuple(batch.video.shape) == (2, 3, 4, 32, 32) and bool(batch.video.isfinite().all())
        seen.update(zip(batch.index.tolist(), batch.label.tolist()))
    assert seen == dict(enumerate(vs.labels))


def test_rerun_skips_and_spec_change_redoes(prepared, tmp_path):
    vs, manifest, out, _ = prepared
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.webm")}
    again = prepare(manifest, out, PrepareSpec("vp9", 32, 4), workers=1, progress=False)
    assert (again.transcoded, again.skipped, len(again.failed)) == (0, 6, 4)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.webm")} == before
    # a different spec in another folder: everything is transcoded (the journal keys on the spec)
    other = prepare(manifest, tmp_path, PrepareSpec("mjpeg", 32, 1), workers=1, progress=False)
    assert (other.transcoded, other.skipped) == (6, 0)
    assert read_gop(tmp_path / f"{vs.good[0].stem}.avi").max_gop == 1
    # a journal line for another spec does not count as done
    lines = [line for line in (tmp_path / JOURNAL).read_text().splitlines() if "claimed" not in line]
    (tmp_path / JOURNAL).write_text("\n".join(line.replace(json.loads(line)["spec"], "0" * 16) for line in lines[:2])
                                    + "\n" + "\n".join(lines[2:]) + "\n")
    redo = prepare(manifest, tmp_path, PrepareSpec("mjpeg", 32, 1), workers=1, progress=False)
    assert (redo.transcoded, redo.skipped) == (2, 4)


def _eight_sources(tmp_path: Path, seed: int, workers: int) -> tuple[Path, Path, list[str]]:
    """8 VP9 sources (40 frames of 128x96) and their manifest under ``tmp_path / "src"``: (manifest, the output
    folder, the prepare command into it with ``workers``)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        encode_video(src / f"v{i}.webm", textured_frames(40, 96, 128, seed=seed + i))
    manifest = src / "list.csv"
    manifest.write_text("".join(f"v{i}.webm {i % 4}\n" for i in range(8)))
    out = tmp_path / "out"
    return manifest, out, [sys.executable, "-m", "timesformer_harness.pipelines.tools.prepare", str(manifest), "--out",
                           str(out), "--short-side", "96", "--gop", "8", "--workers", str(workers), "--no-progress"]


def _finished(out: Path) -> list[str]:
    """The outputs the journal records as written (not those only claimed before they were sent to a worker)."""
    if not (out / JOURNAL).is_file():
        return []
    lines = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    return [rec["out"] for rec in lines if not rec.get("claimed")]


def test_a_rerun_from_another_folder_or_spelling_skips_what_is_done(tmp_path, monkeypatch):
    """The journal names each source by its absolute path: the same manifest given relative, absolute, or from its own
    folder is the same run (every video had been encoded again: the journal held the path as spelled from the folder
    of the first run)."""
    manifest, out, _ = _eight_sources(tmp_path, seed=90, workers=1)
    spec = PrepareSpec("vp9", 96, 8)
    monkeypatch.chdir(tmp_path)
    first = prepare(Path("src/list.csv"), Path("out"), spec, workers=1, progress=False)
    assert first.transcoded == 8
    assert all(Path(json.loads(line)["src"]).is_absolute() for line in (out / JOURNAL).read_text().splitlines())
    assert prepare(manifest, out, spec, workers=1, progress=False).skipped == 8  # absolute
    monkeypatch.chdir(tmp_path / "src")
    again = prepare(Path("list.csv"), Path("../out"), spec, workers=1, progress=False)  # from its own folder
    assert (again.transcoded, again.skipped) == (0, 8)


def test_killed_run_resumes(tmp_path):
    """SIGKILL mid-encode: no half-written output under a final name; the re-run skips what was finished."""
    manifest, out, cmd = _eight_sources(tmp_path, seed=20, workers=1)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_finished(out)) >= 2 and temporaries(out):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "prepare finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    finals = sorted(out.glob("v*.webm"))
    assert 2 <= len(finals) < 8 and temporaries(out)
    for f in finals:  # whatever carries a final name is complete
        assert read_gop(f).num_frames == 40
    journaled = _finished(out)
    before = {f.name: f.stat().st_mtime_ns for f in finals}
    report = prepare(manifest, out, PrepareSpec("vp9", 96, 8), workers=2, progress=False)
    assert report.skipped == len(journaled) >= 2 and report.transcoded == 8 - len(journaled) and not report.failed
    assert all(out.joinpath(name).stat().st_mtime_ns == before[name] for name in journaled)  # not redone
    assert not temporaries(out)
    rows = read_kinetics(out / "list.csv")
    assert [r.label for r in rows] == [i % 4 for i in range(8)]
    assert all(read_gop(r.path).num_frames == 40 for r in rows)


def test_fps_resampling_and_sizes(videos, tmp_path):
    src = videos.good[0]  # 24 frames at 30 fps, 48x64
    assert transcode(src, tmp_path / "half.webm", PrepareSpec("vp9", 0, fps=15)).frames == 12
    assert transcode(src, tmp_path / "double.webm", PrepareSpec("vp9", 0, fps=60)).frames == 48
    assert transcode(src, tmp_path / "same.webm", PrepareSpec("vp9", 0)).frames == 24
    assert read_gop(tmp_path / "half.webm").fps == 15 and read_gop(tmp_path / "double.webm").num_frames == 48
    portrait = transcode(videos.portrait, tmp_path / "p.webm", PrepareSpec("vp9", 20))
    assert portrait.frames == 24 and output_size(64, 40, 20) == (32, 20)
    # the source's size and rotation, as a second open of it reads them
    assert (portrait.height, portrait.width, portrait.rotation) == probe_source(videos.portrait) == (64, 40, 0)
    assert output_size(240, 320, 256) == (256, 342) and output_size(241, 321, 0) == (240, 320)


def test_bad_arguments(videos, tmp_path):
    with pytest.raises(ValueError, match="intra-only"):
        PrepareSpec("mjpeg", gop=8)
    with pytest.raises(ValueError, match="choose from"):
        PrepareSpec("av2")
    with pytest.raises(ValueError, match="even"):
        PrepareSpec(short_side=255)
    assert (parse_gop("intra"), parse_gop("32"), parse_gop(None)) == (1, 32, None)
    with pytest.raises(ValueError, match="--gop 'long'"):
        parse_gop("long")
    manifest = videos.manifest("prep_inplace.csv", videos.good[:1])
    with pytest.raises(ValueError, match="overwrite"):
        prepare(manifest, videos.root, PrepareSpec("vp9"), progress=False)
    assert main([str(manifest), "--out", str(tmp_path), "--codec", "mjpeg", "--gop", "8"]) == 2
    # two manifests prepared one at a time into one folder, whose sources differ only by extension: the second is
    # refused before it writes, instead of replacing the first's video under the same name (and label)
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.webm").write_bytes(videos.good[0].read_bytes())
    (src / "x.mp4").write_bytes(videos.h264.read_bytes())
    (src / "train.csv").write_text("x.mp4 0\n")
    (src / "val.csv").write_text("x.webm 1\n")
    out = tmp_path / "out"
    assert prepare(src / "train.csv", out, PrepareSpec("vp9", 32), progress=False).transcoded == 1
    written = (out / "x.webm").read_bytes()
    with pytest.raises(ValueError, match=rf"--out {out}: 1 output name\(s\) were written from other sources .* "
                                         rf"x.webm <- {src / 'x.mp4'}, now asked from {src / 'x.webm'}"):
        prepare(src / "val.csv", out, PrepareSpec("vp9", 32), progress=False)
    assert (out / "x.webm").read_bytes() == written and (out / "train.csv").read_text() == "x.webm 0\n"
    assert main([str(src / "val.csv"), "--out", str(out), "--short-side", "32", "--no-progress"]) == 2
    (src / "x.mp4").unlink()  # a source since removed: its output is fair to replace
    assert prepare(src / "val.csv", out, PrepareSpec("vp9", 32), progress=False).transcoded == 1



def test_an_out_symlinked_to_the_sources_folder_is_refused(videos, tmp_path):
    """--out a symlink to the sources' folder is that folder: prepare refuses, the sources are left as they were."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.webm").write_bytes(videos.good[0].read_bytes())
    (src / "train.csv").write_text("a.webm 0\n")
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(ValueError, match=r"would overwrite 1 source\(s\) in place"):
        prepare(src / "train.csv", tmp_path / "link", PrepareSpec("vp9", 32), workers=1, progress=False)
    assert (src / "a.webm").read_bytes() == videos.good[0].read_bytes()
    assert (src / "train.csv").read_text() == "a.webm 0\n"


def test_an_out_holding_the_source_manifest_or_files_prepare_did_not_write_is_refused(videos, tmp_path):
    """--out the sources' folder with sources of another extension: the source manifest would be replaced by the
    prepared one, and clip.webm (another manifest's video) by clip.mp4's transcode. Both are refused before anything
    is written; so is an SSv2 split JSON that the prepared one would replace."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "clip.mp4").write_bytes(videos.h264.read_bytes())
    (src / "clip.webm").write_bytes(videos.good[0].read_bytes())
    (src / "a.csv").write_text("clip.mp4 0\n")
    with pytest.raises(ValueError, match=f"would replace the source manifest {src / 'a.csv'}"):
        prepare(src / "a.csv", src, PrepareSpec("vp9", 32), workers=1, progress=False)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.csv").write_text("clip.mp4 0\n")
    with pytest.raises(ValueError, match=f"1 output name\\(s\\) are taken by files prepare did not write .*"
                                         f"{src / 'clip.webm'}; move them away"):
        prepare(lists / "a.csv", src, PrepareSpec("vp9", 32), path_prefix=str(src), workers=1, progress=False)
    assert main([str(lists / "a.csv"), "--out", str(src), "--path-prefix", str(src), "--no-progress"]) == 2
    assert (src / "clip.webm").read_bytes() == videos.good[0].read_bytes()
    assert (src / "a.csv").read_text() == "clip.mp4 0\n" and not (src / "prepare.json").exists()
    split = src / "something-something-v2-train.json"
    split.write_text(json.dumps([{"id": "clip", "template": "Pushing [something]"}]))
    (src / "something-something-v2-labels.json").write_text(json.dumps({"Pushing something": "0"}))
    with pytest.raises(ValueError, match=f"would replace the source manifest {split}"):
        prepare(split, src, PrepareSpec("mjpeg", 32), fmt="ssv2", ssv2_suffix=".mp4", workers=1, progress=False)
    # a re-run into a folder prepare wrote is not refused: its outputs are in the journal
    out = tmp_path / "out"
    assert prepare(lists / "a.csv", out, PrepareSpec("vp9", 32), path_prefix=str(src), progress=False).transcoded == 1
    assert prepare(lists / "a.csv", out, PrepareSpec("vp9", 48), path_prefix=str(src), progress=False).transcoded == 1

def test_prepare_json_keeps_every_manifest_prepared_into_the_folder(videos, tmp_path, caplog):
    """train, val and test prepared one after the other into one folder: each one's failures stay on record (the
    latest no longer replaces them), and one prepared with other options than the rest is warned about."""
    src = tmp_path / "src"
    src.mkdir()
    for name, p in [("a.webm", videos.good[0]), ("b.webm", videos.good[1]), ("bad.webm", videos.garbage)]:
        (src / name).write_bytes(p.read_bytes())
    (src / "train.csv").write_text("a.webm 0\nbad.webm 1\n")
    (src / "val.csv").write_text("b.webm 1\n")
    out = tmp_path / "out"
    assert [Path(p).name for p, _ in prepare(src / "train.csv", out, PrepareSpec("vp9", 32), workers=1,
                                             progress=False).failed] == ["bad.webm"]
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.pipelines.tools.prepare"):
        prepare(src / "val.csv", out, PrepareSpec("vp9", 32), workers=1, progress=False)
    assert "another spec" not in caplog.text
    record = json.loads((out / SPEC_FILE).read_text())
    assert record["manifest"] == "val.csv" and record["failed"] == []  # the top level: the latest manifest
    assert set(record["manifests"]) == {"train.csv", "val.csv"}
    assert [Path(f["path"]).name for f in record["manifests"]["train.csv"]["failed"]] == ["bad.webm"]
    assert record["manifests"]["train.csv"]["videos"] == 1 and record["manifests"]["val.csv"]["videos"] == 1
    (src / "test.csv").write_text("b.webm 1\n")
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.pipelines.tools.prepare"):
        prepare(src / "test.csv", out, PrepareSpec("vp9", 48), workers=1, progress=False)
    assert f"{out} also holds train.csv, val.csv, prepared with another spec" in caplog.text
    record = json.loads((out / SPEC_FILE).read_text())
    assert {m["spec"]["short_side"] for m in record["manifests"].values()} == {32, 48}


def test_a_csv_manifest_with_commas_in_its_paths_reads_back(videos, tmp_path):
    """SSv2-style names hold commas and quotes: the CSV manifest prepare writes quotes them, as the reader expects."""
    src = tmp_path / "src"
    src.mkdir()
    names = ['Pushing something, left.webm', 'a "quoted" name.webm', "plain.webm"]
    for name, p in zip(names, videos.good):
        (src / name).write_bytes(p.read_bytes())
    manifest = src / "train.csv"
    manifest.write_text('path,label\n"Pushing something, left.webm",0\n"a ""quoted"" name.webm",2\nplain.webm,1\n')
    report = prepare(manifest, tmp_path / "out", PrepareSpec("vp9", 32, 4), fmt="csv", workers=1, progress=False)
    assert report.transcoded == 3 and not report.failed
    rows = read_entries(tmp_path / "out" / "train.csv", "csv")
    assert [(Path(r.path).name, r.label) for r in rows] == [(n, lab) for n, lab in zip(names, [0, 2, 1])]
    assert all(Path(r.path).is_file() for r in rows)


def test_ssv2_manifest(videos, tmp_path, caplog):
    src = tmp_path / "ssv2"
    src.mkdir()
    for i, p in enumerate(videos.good[:2] + [videos.garbage]):
        (src / f"{100 + i}.webm").write_bytes(p.read_bytes())
    (src / "something-something-v2-labels.json").write_text(json.dumps({"Pushing something": "0",
                                                                        "Pulling something": "1"}))
    split = src / "something-something-v2-train.json"
    split.write_text(json.dumps([{"id": "100", "template": "Pushing [something]"},
                                 {"id": "101", "template": "Pulling [something]"},
                                 {"id": "102", "template": "Pulling [something]"}]))
    out = tmp_path / "out"
    report = prepare(split, out, PrepareSpec("vp9", 32, 4), fmt="ssv2", workers=1, progress=False)
    assert report.transcoded == 2 and [Path(p).name for p, _ in report.failed] == ["102.webm"]
    entries = read_ssv2(out / split.name, out / "something-something-v2-labels.json", out)
    assert [(Path(e.path).name, e.label) for e in entries] == [("100.webm", 0), ("101.webm", 1)]
    assert all(read_gop(e.path).num_frames == 24 for e in entries)
    # MJPEG outputs are {id}.avi: prepare names the suffix that reads them, and it does
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.pipelines.tools.prepare"):
        prepare(split, tmp_path / "mjpeg", PrepareSpec("mjpeg", 32), fmt="ssv2", workers=1, progress=False)
    assert "the SSv2 videos written are {id}.avi: read them with data.ssv2_suffix=.avi (--ssv2-suffix .avi)" in \
        caplog.text
    entries = read_entries(tmp_path / "mjpeg" / split.name, "ssv2", ssv2_suffix=".avi")
    assert [Path(e.path).name for e in entries] == ["100.avi", "101.avi"] and all(Path(e.path).is_file()
                                                                                for e in entries)


def _frame_folder(folder: Path, frames, suffix: str = ".jpg") -> Path:
    """``frames`` (RGB) as one JPEG (FFmpeg's mjpeg encoder, quality 2) or PNG file each, named in frame order."""
    import av

    folder.mkdir(parents=True)
    for i, rgb in enumerate(frames):
        enc = av.CodecContext.create("png" if suffix == ".png" else "mjpeg", "w")
        enc.height, enc.width = rgb.shape[:2]
        enc.pix_fmt, enc.time_base = ("rgb24" if suffix == ".png" else "yuvj444p"), Fraction(1, 30)
        if suffix != ".png":
            enc.qmin = enc.qmax = 2
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=enc.pix_fmt)
        (folder / f"img_{i + 1:05d}{suffix}").write_bytes(b"".join(bytes(p) for p in [*enc.encode(frame),
                                                                                       *enc.encode(None)]))
    return folder


def test_frame_folders_become_videos(videos, tmp_path):
    """A manifest that names folders of frames (the original's SSv2 frame lists): the pre-flight check takes a
    folder of JPEG frames (the loaders read it) and refuses one of PNG frames with the command that converts it;
    prepare makes each folder one video, its images in name order at 30 frames per second (--fps otherwise), re-done
    when an image changes; a folder without images, or with two kinds, is a failed source with its reason. The
    folder names hold glob characters, read literally."""
    import numpy as np

    frames = textured_frames(12, 48, 64, seed=7)
    clip = _frame_folder(tmp_path / "frames" / "clip [a]*", frames)
    _frame_folder(tmp_path / "frames" / "png clip", frames[:5], ".png")
    mixed = _frame_folder(tmp_path / "frames" / "mixed", frames[:2])
    _frame_folder(tmp_path / "frames" / "mixed_png", frames[2:3], ".png")
    (mixed / "img_00003.png").write_bytes((tmp_path / "frames" / "mixed_png" / "img_00001.png").read_bytes())
    (tmp_path / "frames" / "no images").mkdir()
    manifest = tmp_path / "frames.csv"
    manifest.write_text("".join(f"frames/{name} {label}\n" for name, label in
                                [("clip [a]*", 3), ("png clip", 1), ("mixed", 0), ("no images", 2)])
                        + f"{videos.good[0]} 4\n")

    png = tmp_path / "frames" / "png clip"
    infos, rejected = check_videos([str(clip), str(png), str(videos.good[0])], "cpu", num_frames=4, sampling_rate=2,
                                   cache=None)
    assert (infos[0].codec, infos[0].frames, infos[0].fps) == ("mjpeg", 12, 30.0)  # the loaders read JPEG folders
    assert [(p, r.split(":")[0]) for p, r in rejected] == [(str(png), "a folder of .png frames")]
    assert "tools.prepare MANIFEST --out DIR` and use DIR's manifest" in rejected[0][1]

    out = tmp_path / "out"
    report = prepare(manifest, out, PrepareSpec(codec="mjpeg", short_side=0, quality=2), progress=False)
    assert dict(report.failed) == {
        str(tmp_path / "frames" / "mixed"): "a frame folder with images of several kinds (.jpg, .png); keep one",
        str(tmp_path / "frames" / "no images"): "a folder without images (.jpeg, .jpg, .png)"}
    rows = read_kinetics(out / manifest.name)
    assert [(Path(r.path).name, r.label) for r in rows] == [("clip [a]*.avi", 3), ("png clip.avi", 1),
                                                            (videos.good[0].stem + ".avi", 4)]
    infos, rejected = check_videos([r.path for r in rows], "cpu", num_frames=4, sampling_rate=1, cache=None)
    assert rejected == [] and [(i.frames, i.fps, i.width, i.height) for i in infos[:2]] == [(12, 30.0, 64, 48),
                                                                                            (5, 30.0, 64, 48)]
    import av

    with av.open(rows[0].path) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 3  # the images, in name order
    corner = decoded[:, :4, :4].mean(axis=(1, 2, 3))  # the frame-number patch: 8 more per frame
    assert np.all(np.diff(corner) > 2), corner  # rising: the frames in name order

    again = prepare(manifest, out, PrepareSpec(codec="mjpeg", short_side=0, quality=2), progress=False)
    assert again.skipped == 3 and again.transcoded == 0
    time.sleep(0.01)
    (clip / "img_00012.jpg").unlink()  # a frame less: that video is made again
    redone = prepare(manifest, out, PrepareSpec(codec="mjpeg", short_side=0, quality=2), progress=False)
    assert redone.transcoded == 1 and redone.skipped == 2
    slower = prepare(manifest, tmp_path / "out15", PrepareSpec(codec="mjpeg", short_side=0, fps=15), progress=False)
    info = check_videos([str(tmp_path / "out15" / "frames" / "clip [a]*.avi")], "cpu", num_frames=4, sampling_rate=2,
                        cache=None)[0][0]
    assert slower.transcoded == 3 and (info.frames, info.fps) == (11, 15.0)


def test_ssv2_prepared_folder_is_a_data_root(videos, tmp_path, caplog):
    """A labels JSON of another name (given with --ssv2-labels) is written under the name data.ssv2_labels defaults
    to, so that data.root=DIR alone reads the prepared set, videos and labels; a split file of another name is
    named in a warning with the key that reads it."""
    from timesformer_harness.pipelines.factory import build_loader
    from timesformer_harness.pipelines.manifest import read_manifest

    src = tmp_path / "ssv2"
    src.mkdir()
    for i, p in enumerate(videos.good[:2]):
        (src / f"{100 + i}.webm").write_bytes(p.read_bytes())
    (src / "labels.json").write_text(json.dumps({"Pushing something": "0", "Pulling something": "1"}))
    split = [{"id": "100", "template": "Pushing [something]"}, {"id": "101", "template": "Pulling [something]"}]
    (src / "something-something-v2-validation.json").write_text(json.dumps(split))
    (src / "mine.json").write_text(json.dumps(split))
    out = tmp_path / "out"
    report = prepare(src / "something-something-v2-validation.json", out, PrepareSpec("vp9", 32, 4), fmt="ssv2",
                     ssv2_labels=str(src / "labels.json"), workers=1, progress=False)
    assert report.transcoded == 2 and not report.failed
    cfg = DataConfig(format="ssv2", root=str(out), loader="pyav", num_frames=4, test_crop_size=32,
                     num_spatial_crops=1, batch_size=2, num_workers=0, validate_cache="none")
    entries = read_manifest(cfg, "val")
    assert [(Path(e.path), e.label) for e in entries] == [(out / "100.webm", 0), (out / "101.webm", 1)]
    batch = next(iter(build_loader(cfg, "val", device="cpu", num_classes=2)))
    assert batch.label.tolist() == [0, 1] and batch.video.shape == (2, 3, 4, 32, 32)
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.pipelines.tools.prepare"):
        prepare(src / "mine.json", out, PrepareSpec("vp9", 32, 4), fmt="ssv2", ssv2_labels=str(src / "labels.json"),
                workers=1, progress=False)
    assert f"mine.json is not a split file name data.root={out} looks for" in caplog.text
    assert f"(or data.val_manifest / data.test_manifest) at {out / 'mine.json'}" in caplog.text


def test_short_side_0_crops_an_odd_size(tmp_path):
    """--short-side 0 keeps the source's pixels: a 65x49 source (PNG frames: exact pixels) comes out 64x48, its last
    column and row cut off, not squeezed by a resize (2-pixel checks would be a pixel out of phase at the far side)."""
    import av
    import numpy as np

    y, x = np.mgrid[0:49, 0:65]
    checks = np.where((x // 2 + y // 2) % 2, 220, 30).astype(np.uint8)
    src = _frame_folder(tmp_path / "frames", np.repeat(checks[None, :, :, None], 3, axis=3).repeat(6, axis=0), ".png")
    assert output_size(49, 65, 0) == (48, 64)
    done = transcode(src, tmp_path / "out.avi", PrepareSpec("mjpeg", 0, quality=2))
    assert (done.frames, done.height, done.width) == (6, 49, 65)  # the source's size, not the cropped one
    with av.open(str(tmp_path / "out.avi")) as container:
        out = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
    assert out.shape == (6, 48, 64)
    assert np.abs(out.astype(float) - checks[:48, :64]).mean() < 2  # squeezed to 64x48: ~80


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_a_full_range_source_keeps_its_levels(tmp_path, codec):
    """A full-range source (MJPEG, yuvj420p: Y 0-255) written to limited-range yuv420p is converted, not copied:
    grey bars 0, 16, ..., 240, 255 decode back within a few levels (copied, they came out stretched: 16 -> 0,
    224 -> 242)."""
    import av
    import numpy as np

    from timesformer_harness.pipelines.tools.encode import write_video

    levels = np.array([*range(0, 256, 16), 255])
    bars = np.repeat(np.repeat(levels.astype(np.uint8), 16)[None, :, None], 3, axis=2).repeat(32, axis=0)
    src = write_video(tmp_path / "bars.avi", [bars] * 6, "mjpeg", pix_fmt="yuvj420p")
    out = tmp_path / f"bars.{'webm' if codec == 'vp9' else 'mp4'}"
    assert transcode(src, out, PrepareSpec(codec, 0, quality=10)).frames == 6
    with av.open(str(out)) as container:
        rgb = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(rgb[16, 8::16].astype(int) - levels[:, None]).max() <= 3


def test_a_rotated_source_is_warned_about(videos, tmp_path, caplog):
    """A phone video's display matrix (here a 90 degree one written into an MP4's track header) is not applied: the
    output is the frames as stored, as the loaders read them, and prepare says so for that source, with how to
    rotate it first; an unrotated source gets no warning."""
    import struct

    data = bytearray(videos.h264.read_bytes())
    matrix = data.find(b"tkhd") + 4 + 40  # version 0 track header: the matrix after 40 bytes of fields
    data[matrix:matrix + 36] = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "phone.mp4").write_bytes(bytes(data))
    (src / "plain.mp4").write_bytes(videos.h264.read_bytes())
    (src / "list.csv").write_text("phone.mp4 0\nplain.mp4 1\n")
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.pipelines.tools.prepare"):
        report = prepare(src / "list.csv", tmp_path / "out", PrepareSpec("vp9", 32), workers=1, progress=False)
    assert report.transcoded == 2
    assert f"{src / 'phone.mp4'}: its frames carry a display rotation of" in caplog.text
    rotation = probe_source(src / "phone.mp4")[2]  # transcode reports it as a second open of the source reads it
    assert rotation and f"rotation of {rotation} degrees" in caplog.text
    assert "written as stored" in caplog.text and "transpose" in caplog.text and "plain.mp4" not in caplog.text
    assert read_gop(tmp_path / "out" / "phone.webm").num_frames == 24


def test_an_output_renamed_into_place_but_not_journaled_is_redone_not_refused(tmp_path):
    """A worker renames its output into place before the main process journals it: a run stopped in between left
    a file the journal did not name, and the re-run refused it as another's. Every output is claimed in the journal
    before it is sent to a worker, so the re-run knows it and redoes it."""
    manifest, out, cmd = _eight_sources(tmp_path, seed=60, workers=2)
    prepare(manifest, out, PrepareSpec("vp9", 96, 8), workers=2, progress=False)
    lines = (out / JOURNAL).read_text().splitlines()
    last_done = max(i for i, line in enumerate(lines) if "claimed" not in line)
    (out / JOURNAL).write_text("\n".join(lines[:last_done] + lines[last_done + 1:]) + "\n")  # the gap
    report = prepare(manifest, out, PrepareSpec("vp9", 96, 8), workers=2, progress=False)
    assert (report.transcoded, report.skipped, report.failed) == (1, 7, [])


def _in_group(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` still alive (zombies aside)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("to", ["process", "group"])
def test_sigterm_finishes_the_videos_being_encoded_and_the_rerun_goes_on(tmp_path, to):
    """SIGTERM (a job scheduler's stop) to a run of 2 workers, to its main process or to its whole process group: it
    ends as Ctrl-C does, exit 143 with one line, what finished journaled, no process left; the re-run does the rest
    (it had been refused: outputs renamed into place after the main process was killed were unknown to the journal;
    and a SIGTERM to the group killed the forkserver: a traceback, and workers left encoding after the lock was
    released)."""
    manifest, out, cmd = _eight_sources(tmp_path, seed=80, workers=2)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(_finished(out)) < 2:
            time.sleep(0.01)
        assert proc.poll() is None, "prepare finished before it could be stopped"
        (os.killpg(proc.pid, signal.SIGTERM) if to == "group" else proc.send_signal(signal.SIGTERM))
        _, err = proc.communicate(timeout=120)
        time.sleep(1)  # the workers and the forkserver see their parent's pipes close
        left = _in_group(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and "error: interrupted:" in err and "Traceback" not in err, err[-2000:]
    assert left == [], left
    assert not (out / "list.csv").exists() and not temporaries(out)
    report = prepare(manifest, out, PrepareSpec("vp9", 96, 8), workers=2, progress=False)
    assert report.skipped == len(set(_finished(out))) - report.transcoded >= 2
    assert report.transcoded + report.skipped == 8 and not report.failed


def test_ctrl_c_stops_cleanly(tmp_path):
    """Ctrl-C (SIGINT to the process group) mid-run: the workers do not die with tracebacks; the main process starts
    no other video, journals the ones being encoded when they finish, and exits 130 with one line; a re-run does the
    rest."""
    manifest, out, cmd = _eight_sources(tmp_path, seed=40, workers=2)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if _finished(out) and temporaries(out):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "prepare finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1].startswith("error: interrupted: the videos finished are in"), stderr
    journaled = set(_finished(out))
    assert {p.name for p in out.glob("v*.webm")} == journaled and 1 <= len(journaled) < 8
    assert not (out / "list.csv").exists()
    report = prepare(manifest, out, PrepareSpec("vp9", 96, 8), workers=1, progress=False)
    assert (report.skipped, report.transcoded) == (len(journaled), 8 - len(journaled)) and not report.failed


def test_a_second_prepare_into_a_folder_being_prepared_is_refused(videos, tmp_path):
    """While one prepare holds --out (its lock on the journal), another into the same folder exits 2 naming it,
    before it removes the first one's temporaries (which it took for a killed run's) or writes anything."""
    import fcntl

    manifest = videos.manifest("prep_locked.csv", videos.good[:1])
    out = tmp_path / "out"
    out.mkdir()
    being_written = out / ".good0.0123abcd.tmp.webm"  # the first prepare's output in progress
    being_written.write_bytes(b"partial")
    with open(out / JOURNAL, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ValueError, match=f"--out {out} is being prepared by another process"):
            prepare(manifest, out, PrepareSpec("vp9", 32), workers=1, progress=False)
        assert main([str(manifest), "--out", str(out), "--short-side", "32", "--no-progress"]) == 2
        assert being_written.read_bytes() == b"partial" and not (out / "good0.webm").exists()
    assert prepare(manifest, out, PrepareSpec("vp9", 32), workers=1, progress=False).transcoded == 1
    assert not being_written.exists()  # the lock free: a killed run's temporary, removed


@pytest.mark.parametrize("codec, bad, good", [("vp9", 64, 63), ("h264", 52, 0), ("hevc", -1, 51), ("mjpeg", 1, 2),
                                              ("mjpeg", 32, 31)])
def test_an_out_of_range_quality_is_refused_up_front(videos, tmp_path, codec, bad, good):
    """A crf / qscale the encoder does not take failed every video at encode time and replaced the prepared manifest
    with an empty one; it is refused before anything is written (exit 2), and the limits themselves are taken."""
    assert PrepareSpec(codec, quality=good).quality == good
    with pytest.raises(ValueError, match=f"--quality {bad}: {codec}'s (crf|qscale) goes from"):
        PrepareSpec(codec, quality=bad)
    manifest = videos.manifest("prep_quality.csv", videos.good[:1])
    out = tmp_path / "out"
    out.mkdir()
    (out / manifest.name).write_text("kept\n")
    assert main([str(manifest), "--out", str(out), "--codec", codec, "--quality", str(bad), "--no-progress"]) == 2
    assert (out / manifest.name).read_text() == "kept\n"


def test_an_error_writing_the_output_stops_the_run_and_keeps_the_manifest(tmp_path):
    """A destination that cannot take the outputs (here a file size limit, RLIMIT_FSIZE: EFBIG, as a full disk gives
    ENOSPC) is not a broken source: the run stops at the first such error with one line, exit 1, the videos finished
    journaled, no other started, and the manifest of the earlier run left as it was (it had been replaced by one
    without the videos not reached)."""
    import resource

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        encode_video(src / f"small{i}.webm", textured_frames(8, 32, 48, seed=60 + i))
    for i in range(3):
        encode_video(src / f"large{i}.webm", textured_frames(40, 96, 128, seed=70 + i))
    manifest = src / "list.csv"
    manifest.write_text("small0.webm 0\nsmall1.webm 1\nlarge0.webm 2\nlarge1.webm 3\nlarge2.webm 0\n")
    out = tmp_path / "out"
    assert prepare(manifest, out, PrepareSpec("vp9", 0, 8), workers=1, progress=False).transcoded == 5
    listed = (out / "list.csv").read_text()
    sizes = sorted(p.stat().st_size for p in out.glob("*.webm"))
    limit = (sizes[1] + sizes[2]) // 2  # the small videos' outputs fit, the large ones' do not

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal's kill

    cmd = [sys.executable, "-m", "timesformer_harness.pipelines.tools.prepare", str(manifest), "--out", str(out),
           "--short-side", "0", "--gop", "4", "--workers", "1", "--no-progress"]
    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    last = run.stderr.splitlines()[-1]
    assert last.startswith(f"error: [Errno {errno.EFBIG}] cannot write {out / 'large0.webm'}: File too large; the "
                           "run stopped there"), last
    assert "large1" not in run.stderr and "large2" not in run.stderr  # not started
    assert (out / "list.csv").read_text() == listed and not temporaries(out)
    assert _finished(out)[5:] == ["small0.webm", "small1.webm"]


def test_only_an_error_about_the_output_stops_the_run():
    """An error naming the output or its temporary is the destination's (the run stops); one naming a source in the
    same folder (an --out beside the sources) is that source's failure, and the run goes on."""
    import errno

    from timesformer_harness.pipelines.tools.transcode import is_destination_error

    dst = Path("/data/vids/a.webm")
    assert is_destination_error(OSError(errno.ENOSPC, "No space left on device"), dst)  # whatever it names
    assert is_destination_error(PermissionError(errno.EACCES, "Permission denied", str(dst)), dst)
    assert is_destination_error(PermissionError(errno.EACCES, "Permission denied", "/data/vids/.a.0123abcd.tmp.webm"),
                                dst)
    assert not is_destination_error(PermissionError(errno.EACCES, "Permission denied", "/data/vids/a.mp4"), dst)
    other = "/data/vids/.b.0123abcd.tmp.webm"  # another output's temporary
    assert not is_destination_error(PermissionError(errno.EACCES, "Permission denied", other), dst)


def test_an_out_that_is_a_file_is_one_error(videos, tmp_path, capsys):
    """--out naming a file, or a path under one: one error line and exit 2 (it was a FileExistsError or
    NotADirectoryError traceback); the file is left as it was."""
    manifest = videos.manifest("prep_outfile.csv", videos.good[:1])
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    for out in (afile, afile / "sub"):
        assert main([str(manifest), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --out {out} cannot be a folder: it, or a folder above it, is a file; choose another " \
                      "output folder\n"
    assert afile.read_text() == "mine\n"


def test_outputs_outside_nvdec_limits_are_warned_about_once(videos, tmp_path, caplog):
    """VP9 outputs below NVDEC's 128x128 minimum (42x32 here): one warning naming a size, the limit and the short side
    that NVDEC takes; MJPEG (which NVDEC never decodes) and VP9 at 128 px get none."""
    manifest = videos.manifest("prep_nvdec.csv", videos.good[:3])
    logger = "timesformer_harness.pipelines.tools.prepare"
    with caplog.at_level(logging.WARNING, logger=logger):
        prepare(manifest, tmp_path / "small", PrepareSpec("vp9", 32), workers=1, progress=False)
    said = [r.getMessage() for r in caplog.records if "NVDEC" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("3 of 3 outputs: NVDEC cannot decode them, e.g. frame 42x32 is below "
                                                 "NVDEC's VP9 minimum of 128x128; decode it on the CPU")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=logger):
        prepare(manifest, tmp_path / "mjpeg", PrepareSpec("mjpeg", 32), workers=1, progress=False)
        prepare(manifest, tmp_path / "large", PrepareSpec("vp9", 128), workers=1, progress=False)
    assert "NVDEC" not in caplog.text
