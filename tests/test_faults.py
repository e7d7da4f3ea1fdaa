"""Videos that fail while decoding: a seeded corpus of corrupted videos (``tests/corrupt_videos.py``: bit flips,
zeroed blocks, shuffled chunks, truncations, damaged frames, a header-only file, an unknown codec) through the
pre-flight check (shallow and ``--deep``), both loaders (quarantine, replacements, exact resume, error mode, budget,
unscored evaluation views), the DALI loader's per-clip packet streams (damage inside a clip's stream, a file that
cannot be indexed at run time) and real training processes (skip, SIGTERM + resume, two ranks stopping together)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import timesformer_harness.pipelines.validate as validate
from conftest import encode_video, textured_frames
from corrupt_videos import KINDS, CorruptVideo, make_corrupt_corpus
from timesformer_harness.checkpoint import load_file
from timesformer_harness.train_state import list_checkpoints
from timesformer_harness.pipelines.factory import build_loader
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.packets import index_packets, plan_packets
from timesformer_harness.pipelines.quarantine import (BadVideo, BadVideoError, Quarantine, TooManyBadVideos,
                                                      write_rejected)
from timesformer_harness.pipelines.validate import deep_check, probe_video

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
LOADERS = ["dali", "pyav"]


@dataclass
class Corpus:
    root: Path
    good: list[Path]  # 48x64 VP9, 24 frames, keyframe every 8
    bad: list[CorruptVideo]  # one copy per kind of damage
    runtime_only: Path  # manifest: the good files + the three "payload" files (pass the probe, fail decoding)

    def kind(self, kind: str) -> str:
        return next(str(c.path) for c in self.bad if c.kind == kind)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """8 good files and 20 corrupted copies; ``{train,val,test}.csv`` list all 28 (labels i % 3)."""
    root = tmp_path_factory.mktemp("faults")
    good = [encode_video(root / f"good{i}.webm", textured_frames(24, 48, 64, seed=i), bitexact=True)
            for i in range(8)]
    bad = make_corrupt_corpus(good, root / "bad", seed=0)
    lines = "".join(f"{p} {i % 3}\n" for i, p in enumerate([*good, *(c.path for c in bad)]))
    for split in ("train", "val", "test"):
        (root / f"{split}.csv").write_text(lines)
    corpus = Corpus(root, good, bad, root / "runtime_only.csv")
    payload = [Path(corpus.kind(k)) for k in ("payload/start", "payload/mid", "payload/end")]
    corpus.runtime_only.write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate([*good, *payload])))
    return corpus


def data_cfg(corpus: Corpus, loader: str, **kw) -> DataConfig:
    """8 frames at rate 3: every clip spans all 24 frames, so it reaches the damage wherever it is, whichever frames
    a decoder skips; crop 32, batches of 4, skip with no budget unless overridden."""
    base = dict(loader=loader, backend="cpu", root=str(corpus.root), num_frames=8, sampling_rate=3,
                train_jitter_scales=[40, 48], train_crop_size=32, test_crop_size=32, num_spatial_crops=1,
                batch_size=4, num_workers=1, on_bad_video="skip", max_bad_fraction=1.0, validate_cache="none")
    return DataConfig(**{**base, **kw})


def digest(video: torch.Tensor) -> list[str]:
    return [hashlib.sha256(clip.numpy().tobytes()).hexdigest()[:16] for clip in video]


# ---------------------------------------------------------------------------------------------------------------
# The corpus and the pre-flight check.
def test_corpus_is_seeded_and_has_every_kind(corpus: Corpus, tmp_path: Path) -> None:
    again = make_corrupt_corpus(corpus.good, tmp_path / "again", seed=0)
    assert [c.path.read_bytes() for c in again] == [c.path.read_bytes() for c in corpus.bad]
    assert [c.kind for c in corpus.bad] == list(KINDS)
    assert all(c.path.read_bytes() != c.source.read_bytes() for c in corpus.bad)
    other = make_corrupt_corpus(corpus.good, tmp_path / "other", seed=1)
    assert [c.path.read_bytes() for c in other] != [c.path.read_bytes() for c in corpus.bad]


def test_the_probe_reports_damage_instead_of_raising(corpus: Corpus) -> None:
    infos = {c.kind: probe_video(str(c.path)) for c in corpus.bad}  # a damaged codec id used to raise here
    assert infos["codec_id"].error.startswith("unknown codec"), infos["codec_id"]
    assert infos["header_only"].error and infos["truncate/start"].error.startswith("truncated")
    assert not infos["payload/mid"].error  # a damaged coded frame: only decoding finds it


@pytest.fixture(scope="module")
def whole_file(corpus: Corpus) -> dict[str, tuple[set[str], list[int], object]]:
    """Per loader, one test view per usable video spanning all its 24 frames: (paths of the unscored views, scored
    video indices, the loader)."""
    out = {}
    for loader in LOADERS:
        ld = build_loader(data_cfg(corpus, loader), "test")
        scored = [i for b in ld for i in b.index.tolist()]
        out[loader] = ({u.path for u in ld.unscored}, scored, ld)
    return out


@pytest.mark.parametrize("loader", LOADERS)
def test_evaluation_scores_what_decodes_and_lists_the_views_it_cannot(corpus: Corpus, whole_file,
                                                                      loader: str) -> None:
    unscored, scored, ld = whole_file[loader]
    usable = {v.index: v.path for v in ld.planner.videos}
    assert sorted(scored + [i for i, p in usable.items() if p in unscored]) == sorted(usable)  # each view once
    assert corpus.kind("payload/mid") in unscored
    assert unscored <= {str(c.path) for c in corpus.bad}
    assert {u.view for u in ld.unscored} == {0} and len(ld.quarantine) == len(unscored)
    for c in corpus.bad:  # every corrupted file is rejected before the run, scored, or listed as unscored
        path = str(c.path)
        assert path in {p for p, _ in ld.rejected} | set(usable.values()), c.kind


def test_deep_check_flags_every_file_a_loader_fails_on_and_no_good_file(corpus: Corpus, whole_file) -> None:
    shallow_ok = [str(c.path) for c in corpus.bad if not probe_video(str(c.path)).error]
    deep = dict(deep_check([*map(str, corpus.good), *shallow_ok], cache=None, workers=2))
    assert not deep.keys() & set(map(str, corpus.good)), deep
    failing = whole_file["dali"][0] | whole_file["pyav"][0]
    assert failing and failing <= set(shallow_ok)  # the shallow check passed them all
    assert failing <= deep.keys(), f"passed the deep check but fail while decoding: {failing - deep.keys()}"


def test_deep_check_is_cached_and_the_cli_runs_it(corpus: Corpus, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "validate.sqlite"
    paths = [str(corpus.good[0]), corpus.kind("payload/mid"), corpus.kind("zero/mid")]
    first = deep_check(paths, cache, workers=1)
    calls: list[str] = []
    monkeypatch.setattr(validate, "deep_probe", lambda p: calls.append(p) or "")
    assert deep_check(paths, cache, workers=1) == first and calls == []  # from the cache
    monkeypatch.undo()
    manifest = corpus.root / "train.csv"
    args = [PY, "-m", "timesformer_harness.pipelines.validate", str(manifest), "--frames", "4", "--sampling-rate", "3",
            "--cache", str(cache), "--workers", "2"]
    with open(tmp_path / "stderr.txt", "w") as err:  # FFmpeg's messages go to stderr: a file, not a pipe
        shallow = subprocess.run(args, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, timeout=120)
        deep = subprocess.run([*args, "--deep"], stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                              timeout=120)
    assert shallow.returncode == deep.returncode == 1
    payload = corpus.kind("payload/mid")
    assert f"{payload}: deep check: decode error" in deep.stdout and payload not in shallow.stdout
    assert "files/s" in deep.stdout


def test_deep_preflight_leaves_nothing_to_quarantine(corpus: Corpus, tmp_path: Path) -> None:
    """data.validate=deep: what fails at run time is rejected before the run, with stage preflight in rejected.csv."""
    cfg = data_cfg(corpus, "dali", validate="deep", validate_cache=str(tmp_path / "v.sqlite"))
    ld = build_loader(cfg, "train", run_dir=tmp_path)
    for epoch in range(2):
        ld.set_epoch(epoch)
        assert sum(1 for _ in ld) == len(ld)
    assert len(ld.quarantine) == 0
    rows = list(csv.DictReader((tmp_path / "rejected.csv").open()))
    deep = {r["path"] for r in rows if r["reason"].startswith("deep check:")}
    assert corpus.kind("payload/mid") in deep and {r["stage"] for r in rows} == {"preflight"}


# ---------------------------------------------------------------------------------------------------------------
# The loaders: quarantine, replacement, exact resume, error mode, budget.
@pytest.mark.parametrize("loader", LOADERS)
def test_train_loader_replaces_failed_clips_and_leaves_their_videos_out(corpus: Corpus, loader: str) -> None:
    ld = build_loader(data_cfg(corpus, loader), "train")
    path_of = {v.index: v.path for v in ld.planner.videos}
    lengths = []
    for epoch in range(2):
        ld.set_epoch(epoch)
        planned = {p.path for p in ld.planner_for(epoch).plans(epoch)[:ld.num_clips]}
        batches = list(ld)
        lengths.append(len(batches))
        assert len(batches) == len(ld) and all(tuple(b.video.shape) == (4, 3, 8, 32, 32) for b in batches)
        used = {path_of[i] for b in batches for i in b.index.tolist()}
        assert planned <= used | ld.quarantine.paths()  # every planned clip was decoded, or left out and replaced
        if epoch == 1:
            assert not used & ld.quarantine.paths()  # a quarantined video is not planned again
    assert corpus.kind("payload/mid") in ld.quarantine.paths()
    assert lengths[1] == (len(path_of) - len(ld.quarantine)) // 4  # the epoch is planned over the rest


@pytest.mark.parametrize("loader", LOADERS)
def test_a_resumed_loader_replays_the_same_batches(corpus: Corpus, loader: str) -> None:
    """The loader from a checkpoint's position and quarantine entries (``state_before``) makes the batches of the
    uninterrupted run: the same videos in every slot, replacements included, and the same pixels (DALI: compared
    for the good files; it may decode a damaged stream differently from run to run)."""
    cfg = data_cfg(corpus, loader, batch_size=2)

    def run(start: tuple[int, int] = (0, 0), entries: list[dict] | None = None):
        ld = build_loader(cfg, "train", start_batch=start[1], quarantine=entries or [])
        out = {}
        for epoch in range(start[0], 2):
            ld.set_epoch(epoch)
            for k, b in enumerate(ld, start=start[1] if epoch == start[0] else 0):
                out[epoch, k] = (b.index.tolist(), digest(b.video))
            ld.quarantine.merge([ld.quarantine.state()])  # the Trainer's epoch-end merge (one rank)
        return out, ld.quarantine

    ref, bad = run()
    found_at = sorted({(e.epoch, e.batch) for e in bad.entries})
    assert found_at and found_at[0][0] == 0
    good = {i for i, p in enumerate(map(str, corpus.good))}
    for start in {found_at[0], (found_at[0][0], found_at[0][1] + 1), found_at[-1], (1, 0), (1, 3)}:
        got, again = run(start, bad.state_before(*start))
        assert got.keys() == {key for key in ref if key >= start}
        for key, (index, pixels) in got.items():
            assert index == ref[key][0], (start, key)
            same = [a == b for i, a, b in zip(index, pixels, ref[key][1]) if loader == "pyav" or i in good]
            assert all(same), (start, key)
        assert again.paths() == bad.paths()


def test_on_bad_video_error_stops_at_the_first_failure_naming_the_file(corpus: Corpus) -> None:
    ld = build_loader(data_cfg(corpus, "dali", train_manifest=str(corpus.runtime_only), on_bad_video="error"),
                      "train")
    with pytest.raises(BadVideoError, match=r"(?s)bad0\d\d_payload_\w+\.webm failed to decode \(epoch 1, batch \d, "
                                            r"rank 0\): DALI: .*Failed to send packet.*data\.on_bad_video=skip"):
        list(ld)


def test_the_budget_stops_the_run_with_the_list(corpus: Corpus) -> None:
    ld = build_loader(data_cfg(corpus, "pyav", max_bad_fraction=0.1), "train")  # 19 usable videos: at most 1
    with pytest.raises(TooManyBadVideos, match=r"2 of 19 videos failed to decode, more than data.max_bad_fraction="
                                               r"0.1 allows \(1\):\n  \S+\.webm: .+\n  \S+\.webm: .+\nthe dataset"):
        for epoch in range(2):
            ld.set_epoch(epoch)
            list(ld)


# ---------------------------------------------------------------------------------------------------------------
# The DALI loader's per-clip packet streams (timesformer_harness.pipelines.packets) under the quarantine.
@pytest.mark.parametrize("kind", ["payload/start", "payload/mid"])
def test_a_damaged_frame_fails_exactly_the_views_whose_clip_stream_holds_it(corpus: Corpus, tmp_path: Path,
                                                                            kind: str) -> None:
    """The DALI loader feeds each clip only the packets from its keyframes on: a view whose stream holds the damaged
    frame fails inside DALI and is left out (its video quarantined), a view whose stream does not decodes, even one
    after the damage (a decoder fed the whole file would have decoded through it), and the pass goes on."""
    bad = next(c for c in corpus.bad if c.kind == kind)
    data, source = bad.path.read_bytes(), bad.source.read_bytes()
    first_diff = next(i for i, (a, b) in enumerate(zip(data, source)) if a != b)
    index = index_packets(bad.path)
    (damaged,) = np.flatnonzero((index.offset <= first_diff) & (first_diff < index.offset + index.size))
    damaged_frame = int(np.flatnonzero(index.display == damaged)[0])
    manifest = tmp_path / "test.csv"
    manifest.write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate([*corpus.good[:3], bad.path])))
    ld = build_loader(data_cfg(corpus, "dali", test_manifest=str(manifest), num_frames=4, sampling_rate=1,
                               num_ensemble_views=3, batch_size=3), "test")
    plans = ld.planner.plans(0)
    assert {x.mode for x in ld.clip_inputs(plans)} == {"stream"}  # every clip is fed its own packets
    mine = [(view, p) for view, p in enumerate(q for q in plans if q.path == str(bad.path))]
    holds = {view: damaged in plan_packets(index, p.frames).packets for view, p in mine}
    scored = [i for b in ld for i in b.index.tolist()]
    assert {u.view for u in ld.unscored} == {view for view, h in holds.items() if h} != set(), (holds, ld.unscored)
    assert all(u.path == str(bad.path) and "DALI" in u.reason for u in ld.unscored)
    assert len(scored) == len(plans) - len(ld.unscored) and ld.quarantine.paths() == {str(bad.path)}
    if kind == "payload/start":  # a view past the damage, whose stream starts at a later keyframe, decodes
        assert any(not holds[view] and min(p.frames) > damaged_frame for view, p in mine), (damaged_frame, holds)


def test_a_video_that_cannot_be_indexed_at_run_time_is_quarantined(corpus: Corpus, tmp_path: Path) -> None:
    """Files that pass the pre-flight check and are then damaged on disk (their packets cannot be indexed, so no
    clip stream can be made): the DALI source leaves their clips out of what DALI gets (a batch of which no clip
    can be fed is not run at all), the loader names them, replaces (train) or lists (test) their clips, and the
    epochs go on with the same pipeline."""
    paths = [Path(shutil.copy(p, tmp_path / p.name)) for p in corpus.good]
    manifest = tmp_path / "all.csv"
    manifest.write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(paths)))
    cfg = data_cfg(corpus, "dali", train_manifest=str(manifest), test_manifest=str(manifest), batch_size=2)
    train, test = build_loader(cfg, "train"), build_loader(cfg, "test")
    broken = {str(paths[i]) for i in (2, 3, 4)}  # test batches of 2: batch 1 all broken, batch 2 half
    for p in broken:
        Path(p).write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 4)  # an EBML magic, then garbage
    scored = [i for b in test for i in b.index.tolist()]
    assert sorted(scored) == [0, 1, 5, 6, 7] and {u.path for u in test.unscored} == broken
    assert all("cannot index its packets" in u.reason for u in test.unscored), test.unscored
    for epoch in range(2):
        train.set_epoch(epoch)
        batches = list(train)
        assert len(batches) == len(train) and all(tuple(b.video.shape) == (2, 3, 8, 32, 32) for b in batches)
        used = {str(paths[i]) for b in batches for i in b.index.tolist()}
        assert not used & broken
    assert train.quarantine.paths() == broken and len(train) == 2  # epoch 1 planned over the 5 left


def test_quarantine_rules(tmp_path: Path) -> None:
    q = Quarantine(100, rank=1, max_bad_fraction=0.02)
    for e in [BadVideo("a", "x", 0, 3, 0), BadVideo("b", "y", 1, 2, 1), BadVideo("c", "z", 1, 5, 0)]:
        q.entries.append(e)
    assert q.excluded(1, -1) == {"a"}  # an epoch plans without the earlier epochs' videos (every rank's)
    assert q.excluded(1, 2) == {"a", "b"} and q.excluded(1, 9) == {"a", "b"}  # this epoch: this rank's, so far
    assert [d["path"] for d in q.state_before(1, 2)] == ["a"]
    other = Quarantine(100, rank=0, entries=q.state()[::-1])
    other.merge([q.state()[2:], q.state()[:2], q.state()])
    q.merge([q.state()])
    assert other.state() == q.state() and len(q) == 3
    with pytest.raises(TooManyBadVideos, match="3 of 100 videos failed to decode"):
        q.check_budget()  # floor(0.02 * 100) = 2 allowed
    with pytest.raises(BadVideoError, match=r"(?s)d failed to decode \(epoch 1, batch 0, rank 0\): broken.*stops"):
        Quarantine(10, on_bad_video="error").add(BadVideo("d", "broken", 0, 0))
    write_rejected(tmp_path / "r.csv", [("p", "missing")], [BadVideo("a", "x", 0, 3), BadVideo("a", "x", 1, 0)])
    assert (tmp_path / "r.csv").read_text().splitlines() == ["path,reason,stage,epoch,batch,rank",
                                                              "p,missing,preflight,,,", "a,x,runtime,1,3,0"]


def test_an_evaluation_names_a_failed_video_once_a_pass(caplog) -> None:
    """Every view of a bad video fails in an evaluation (val/test: no budget): one warning a pass, not one a view."""
    q = Quarantine(10, on_bad_video="skip", max_bad_fraction=None)  # as an evaluation's loader makes it
    with caplog.at_level(logging.DEBUG, logger="timesformer_harness.pipelines.quarantine"):
        for epoch, batch in [(0, 0), (0, 0), (0, 1), (1, 0), (1, 2)]:
            q.add(BadVideo("v.webm", "broken", epoch, batch))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["left out v.webm (epoch 1, batch 0, rank 0): broken",
                      "left out v.webm (epoch 2, batch 0, rank 0): broken"] and len(caplog.records) == 5


# ---------------------------------------------------------------------------------------------------------------
# Real training processes.
TINY = ["--config", "configs/model/tiny.yaml", "model.num_classes=3", "model.num_frames=8", "data.backend=cpu",
        "data.num_frames=8",
        "data.sampling_rate=3", "data.train_crop_size=32", "data.test_crop_size=32", "data.train_jitter_scales=[40,48]",
        "data.batch_size=2", "data.num_workers=1", "data.num_ensemble_views=1", "data.num_spatial_crops=1",
        "data.validate_cache=none", "data.on_bad_video=skip", "data.max_bad_fraction=0.5", "solver.optimizer=adamw",
        "solver.global_batch_size=4", "solver.max_epoch=2", "train.log_period=1", "output.tensorboard=false",
        "test.batch_size=4", "train.record_samples=true"]


def train(*args: str, out: Path, nproc: int = 1, timeout: int = 180) -> tuple[subprocess.CompletedProcess, str]:
    """A training process (stderr to a file: DALI's FFmpeg writes there); returns (result, stderr text)."""
    entry = ["harness/train.py", *TINY, *args, f"output.dir={out}"]
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry] if nproc > 1 \
        else [PY, *entry]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(out.parent / f"{out.name}.stderr", "a") as err:
        res = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout, env=env)
    return res, (out.parent / f"{out.name}.stderr").read_text()


def runtime_rows(run_dir: Path) -> list[dict[str, str]]:
    return [r for r in csv.DictReader((run_dir / "rejected.csv").open()) if r["stage"] == "runtime"]


def test_training_with_skip_lists_what_it_left_out_and_resumes_exactly(corpus: Corpus, tmp_path: Path) -> None:
    """DALI: an uninterrupted run and one stopped by SIGTERM mid-epoch (after one video was quarantined, before the
    others) then resumed record the same batches and end with the same rejected.csv; val lists unscored views."""
    ref, ref_err = train("data.loader=dali", f"data.root={corpus.root}", "train.eval_period=2", out=tmp_path / "ref")
    assert ref.returncode == 0, ref_err[-3000:]
    rows = runtime_rows(tmp_path / "ref")
    assert corpus.kind("payload/mid") in {r["path"] for r in rows} and all("DALI" in r["reason"] for r in rows)
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    end, val = records[-1], next(r for r in records if r["event"] == "val")
    assert end["event"] == "end" and end["data/quarantined"] == len(rows) and end["data/preflight_rejected"] == 9
    assert [r["data/quarantined"] for r in records if r["event"] == "epoch"] == [len(rows)] * 2
    assert val["val/unscored_views"] >= 1
    report = json.loads((tmp_path / "ref" / "last_val.json").read_text())
    assert report["num_unscored_views"] == val["val/unscored_views"] and report["unscored_views"][0]["reason"]
    assert "left out" in ref_err and "replaced by" in ref_err

    # SIGTERM after optimizer step s stops after step s + 1, saving position batch 2 (s + 1) (2 batches a step):
    # chosen after the first failure and at or before the last, so the checkpoint holds some entries and not all
    found = sorted(int(r["batch"]) for r in rows if r["epoch"] == "1")
    assert len(set(found)) >= 2, f"the test needs failures at two batches of epoch 1: {rows}"
    step = max(1, found[0] // 2)
    assert found[0] < 2 * (step + 1) <= found[-1], found
    args = ("data.loader=dali", f"data.root={corpus.root}", "train.eval_period=0")
    first, err = train(*args, f"train.debug_signal_at_step={step}", out=tmp_path / "resumed")
    assert first.returncode == 143 and "stopped by SIGTERM" in first.stdout, err[-3000:]
    (mid,) = list_checkpoints(tmp_path / "resumed" / "checkpoints")
    saved = load_file(mid)["quarantine"]
    assert 0 < len(saved) < len(rows), (saved, rows)  # found before the stop; the others are found again after it
    facts = load_file(mid)["quarantined_videos"]  # what they were planned with, should their files go bad
    assert set(facts) == {e["path"] for e in saved} and all(f[0] == 24 and f[2:] == [48, 64] for f in facts.values())
    second, err = train(*args, out=tmp_path / "resumed")
    assert second.returncode == 0 and "resumed from" in err, err[-3000:]
    assert (tmp_path / "resumed" / "samples" / "rank0.jsonl").read_text() == \
        (tmp_path / "ref" / "samples" / "rank0.jsonl").read_text()
    assert runtime_rows(tmp_path / "resumed") == rows


def test_a_quarantined_video_whose_file_went_bad_stays_planned_on_resume(corpus: Corpus, tmp_path: Path) -> None:
    """A resumed run's pre-flight check refuses a video quarantined before the checkpoint (its file is now garbage):
    the video stays in the plan with the facts it was planned with (so the epoch's clip order, and the data check,
    are the run's), listed once, as quarantined; a video nobody quarantined is refused as usual."""
    copies = [shutil.copy(p, tmp_path / p.name) for p in corpus.good[:6]]
    manifest = tmp_path / "train.csv"
    manifest.write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(copies)))
    cfg = DataConfig(root=str(tmp_path), num_frames=8, sampling_rate=2, train_crop_size=32,
                     train_jitter_scales=[40, 48], batch_size=2, on_bad_video="skip", validate_cache="none")
    before = build_loader(cfg, "train")
    went_bad, other = copies[1], copies[4]
    planned = next(v for v in before.planner.videos if v.path == str(went_bad))
    for path in (went_bad, other):
        Path(path).write_bytes(b"\0" * 4096)
    entry = {"path": str(went_bad), "reason": "failed at run time", "epoch": 0, "batch": 1, "rank": 0}
    facts = {str(went_bad): [planned.frames, planned.fps, planned.height, planned.width]}
    after = build_loader(cfg, "train", quarantine=[entry], quarantined_videos=facts, run_dir=tmp_path)
    assert [v.path for v in after.planner.videos] == [v.path for v in before.planner.videos if v.path != str(other)]
    assert next(v for v in after.planner.videos if v.path == str(went_bad)) == planned
    assert [p for p, _ in after.rejected] == [str(other)]
    rows = list(csv.DictReader((tmp_path / "rejected.csv").open()))
    assert [(r["path"], r["stage"]) for r in rows] == [(str(other), "preflight"), (str(went_bad), "runtime")]
    assert str(went_bad) in {p for p, _ in build_loader(cfg, "train").rejected}  # without the checkpoint's facts


def test_a_val_set_whose_every_view_fails_is_warned_about_and_training_goes_on(corpus: Corpus, tmp_path: Path) -> None:
    """data.on_bad_video=skip: no view of the val set decodes, so validation has nothing to score; each epoch still
    ends with its checkpoint and the run finishes, its val records saying so (evaluate exits 3 on such a set), and
    the log names the epoch whose validation left the video out."""
    val = tmp_path / "val.csv"
    val.write_text(f"{corpus.kind('payload/mid')} 0\n")
    res, err = train("data.loader=dali", f"data.train_manifest={corpus.root / 'runtime_only.csv'}",
                     f"data.val_manifest={val}", "train.eval_period=1", "solver.max_epoch=2",
                     "train.max_steps_per_epoch=1", out=tmp_path / "run")
    assert res.returncode == 0, err[-3000:]
    assert "val: every view failed to decode" in err
    assert [f"(epoch {e}, batch 0, rank 0)" in err for e in (1, 2)] == [True, True], err[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["event"] == "val"]
    assert len(vals) == 2 and records[-1]["event"] == "end"
    assert all(r["val/top1"] is None and r["val/unscored_views"] >= 1 for r in vals)
    assert list_checkpoints(tmp_path / "run" / "checkpoints")


def test_a_bad_val_video_stops_the_run_before_it_trains(corpus: Corpus, tmp_path: Path) -> None:
    """data.on_bad_video=error: the val manifest's pre-flight check runs at start-up beside the train one's, so a
    bad val video stops the run before its first step, not at its first validation epochs later."""
    train_csv, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train_csv.write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(corpus.good)))
    val.write_text("".join(f"{p} 0\n" for p in corpus.good[:2]) + f"{corpus.kind('header_only')} 1\n")
    res, err = train("data.loader=pyav", f"data.train_manifest={train_csv}",
                     f"data.val_manifest={val}", "data.on_bad_video=error", "train.eval_period=2", out=tmp_path / "run")
    assert res.returncode == 5, err[-3000:]
    assert "1 of 3 videos in the val manifest cannot be used" in err and corpus.kind("header_only") in err
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not [line for line in metrics.read_text().splitlines() if "\"start\"" in line]


@pytest.mark.parametrize("loader", ["dali", "pyav"])
@pytest.mark.parametrize("frames, height, width, reason", [
    (12, 48, 64, "12 frames now, 24 when the pre-flight check counted them"),
    (30, 96, 128, "128x96 frames now, 64x48 when the pre-flight check read them"),
    (30, 32, 32, "32x32 frames now, 64x48 when the pre-flight check read them")])
def test_a_video_replaced_after_the_preflight_check_is_quarantined(corpus: Corpus, tmp_path: Path, loader: str,
                                                                   frames: int, height: int, width: int,
                                                                   reason: str) -> None:
    """A file replaced after the pre-flight check by a valid one: shorter, its clips would repeat its new last frame
    (the loaders clamp indices past a video's end, as padding does); of another frame size, its clips were planned
    on the old size, and PyAV (and DALI for a larger one) had cut the new frames at the old crop window. It is
    quarantined instead, naming both counts or sizes, and the epoch goes on."""
    copies = [shutil.copy(p, tmp_path / p.name) for p in corpus.good[:4]]
    (tmp_path / "train.csv").write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(copies)))
    cfg = DataConfig(root=str(tmp_path), loader=loader, backend="cpu", num_frames=8, sampling_rate=2,
                     train_crop_size=32, train_jitter_scales=[40, 48], batch_size=2, num_workers=1,
                     on_bad_video="skip", max_bad_fraction=0.5, validate_cache="none")
    built = build_loader(cfg, "train")
    replaced = copies[2]  # 24 frames of 64x48 when checked
    encode_video(Path(replaced), textured_frames(frames, height, width, seed=2), bitexact=True)
    batches = list(built)
    assert len(batches) == 2 and [e.path for e in built.quarantine.entries] == [str(replaced)]
    assert reason in built.quarantine.entries[0].reason


def test_training_with_the_pyav_loader_finishes_and_lists_what_it_left_out(corpus: Corpus, tmp_path: Path) -> None:
    res, err = train("data.loader=pyav", f"data.root={corpus.root}", "train.eval_period=0", out=tmp_path / "run")
    assert res.returncode == 0, err[-3000:]
    rows = runtime_rows(tmp_path / "run")
    assert corpus.kind("payload/mid") in {r["path"] for r in rows}
    assert all("InvalidDataError" in r["reason"] or "Error" in r["reason"] for r in rows)
    end = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["data/quarantined"] == len(rows)


def test_two_ranks_stop_together_when_one_rank_hits_a_bad_video(corpus: Corpus, tmp_path: Path) -> None:
    """on_bad_video=error, one damaged file among good ones (in one rank's shard): that rank's loader raises, the
    other learns it at the step's all-reduce, both exit naming the file (no hang until the collective timeout)."""
    manifest = tmp_path / "one_bad.csv"
    paths = [*corpus.good[:7], corpus.kind("payload/mid")]
    manifest.write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(paths)))
    res, err = train("data.loader=dali", f"data.train_manifest={manifest}", "data.on_bad_video=error",
                     "train.eval_period=0", "dist.timeout_s=120", out=tmp_path / "ddp", nproc=2, timeout=150)
    assert res.returncode != 0
    assert "error: " in err and "payload_mid.webm failed to decode" in err, err[-4000:]
    for rank in (0, 1):  # each rank stopped on purpose, the one that found it and the one told at the all-reduce
        assert any(f"[rank{rank}] ERROR" in line and "stopping every rank at epoch" in line
                   for line in err.splitlines()), err[-4000:]
    assert runtime_rows(tmp_path / "ddp")[0]["path"] == corpus.kind("payload/mid")
    assert "bad_video_stop" in (tmp_path / "ddp" / "metrics.jsonl").read_text()
