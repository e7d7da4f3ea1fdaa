"""Decode-cost estimate: hand-computed plans, and the estimate against frames actually decoded by PyAV."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from timesformer_harness.pipelines import sampling
from timesformer_harness.pipelines.tools.decode_cost import (STRATEGIES, count_decoded_frames, decode_plan,
                                                             decoded_frames, estimate, estimate_manifest_decode_cost,
                                                             format_decode_cost, measure_clips, read_gop)
from timesformer_harness.pipelines.loaders import LOADERS
from timesformer_harness.pipelines.tools.transcode import PrepareSpec, transcode
from tests.conftest import encode_video, textured_frames

FRAMES = 64
SPECS = [(8, 4, 30), (4, 12, 30)]  # (T, sampling rate, target fps): steps of ~4.4 (decode forward) / ~15.7 (seek)


@pytest.fixture(scope="module")
def gop_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 64-frame clip as VP9 with one keyframe, VP9 with a keyframe every 8 frames, and MJPEG."""
    root = tmp_path_factory.mktemp("gop")
    src = encode_video(root / "src.webm", textured_frames(FRAMES, 32, 48, seed=3))
    out = {}
    for name, spec in {"long": PrepareSpec("vp9", 0, None), "gop8": PrepareSpec("vp9", 0, 8),
                       "intra": PrepareSpec("mjpeg", 0, 1)}.items():
        out[name] = root / f"{name}{'.avi' if spec.codec == 'mjpeg' else '.webm'}"
        assert transcode(src, out[name], spec).frames == FRAMES
    return out


def test_gop_structure(gop_files):
    assert read_gop(gop_files["long"]).keyframes == (0,)
    assert read_gop(gop_files["gop8"]).keyframes == tuple(range(0, FRAMES, 8))
    intra = read_gop(gop_files["intra"])
    assert intra.keyframes == tuple(range(FRAMES)) and intra.max_gop == 1 and intra.fps == 30


def test_plans_by_hand():
    keys = list(range(0, 64, 8))
    # seek: 3 from 0 (4 frames); 20 is > 10 ahead, other GOP -> seek 16 (5); 21 next (1); 40 -> seek 40 (1)
    assert decode_plan([3, 20, 21, 40], keys, 64, "seek") == [(None, 3), (16, 20), (None, 21), (40, 40)]
    assert decoded_frames([3, 20, 21, 40], keys, 64, "seek") == 11
    assert decoded_frames([21, 20, 3, 40, 40], keys, 64, "seek") == 11  # order and repeats do not matter
    assert decoded_frames([3, 20, 21, 40], keys, 64, "from_start") == 41  # whatever the keyframes
    # keyframe: from each frame's keyframe unless already decoding at or past it (the loaders' rule)
    assert decode_plan([3, 20, 21, 40], keys, 64, "keyframe") == [(None, 3), (16, 20), (None, 21), (40, 40)]
    assert decoded_frames([40, 45, 60], keys, 64, "keyframe") == 1 + 5 + 5  # seek 40; 41..45 on; seek 56, 56..60
    assert decoded_frames([9, 14], keys, 64, "keyframe") == 7  # seek 8, decode 8..14 (seek: 0..14 = 15)
    assert decoded_frames([7, 8, 9], keys, 64, "keyframe") == 10  # 8's keyframe is the next frame: decode on
    assert decoded_frames([9, 14], keys, 64, "seek") == 15  # within the leap (10) of the position: no seek
    assert decoded_frames([12, 14], keys, 64, "seek") == 7  # 12 > 0 + 10: seek to 8
    assert decoded_frames([5, 14, 15], [0], 64, "seek") == 16  # one keyframe: seeking never helps
    with pytest.raises(ValueError, match="choose from"):
        decode_plan([1], keys, 64, "nvdec")


@pytest.mark.parametrize("name", ["long", "gop8", "intra"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_estimate_equals_decoded_count(gop_files, name, strategy):
    """Per clip, the model's count equals the frames PyAV decodes following the same seeks on the real file."""
    path = gop_files[name]
    gop = read_gop(path)
    rng = np.random.default_rng(0)
    for T, rate, tfps in SPECS:
        clips = [sampling.kinetics_frames(FRAMES, 30, T, rate, tfps, i, 3) for i in range(3)]
        clips += [sampling.kinetics_frames(FRAMES, 30, T, rate, tfps, -1, 1, rng) for _ in range(4)]
        for idx in clips:
            assert count_decoded_frames(path, idx, strategy, gop) == decoded_frames(idx, gop.keyframes, FRAMES,
                                                                                     strategy), (name, idx)


def test_train_expectation_is_exact(gop_files):
    """The breakpoint sum equals a dense Monte Carlo average over random starts, and test = mean over clips."""
    gop = read_gop(gop_files["gop8"])
    for T, rate, tfps in SPECS:
        cost = estimate(gop, T, rate, tfps, num_clips=3)
        rng = np.random.default_rng(1)
        mc = np.mean([decoded_frames(sampling.kinetics_frames(FRAMES, 30, T, rate, tfps, -1, 1, rng),
                                     gop.keyframes, FRAMES) for _ in range(20000)])
        assert cost.train == pytest.approx(mc, rel=0.01)
        tests = [decoded_frames(sampling.kinetics_frames(FRAMES, 30, T, rate, tfps, i, 3), gop.keyframes, FRAMES)
                 for i in range(3)]
        assert cost.test == pytest.approx(np.mean(tests))
        assert cost.train_per_frame == pytest.approx(cost.train / T)


def test_shorter_keyframe_spacing_costs_less(gop_files):
    T, rate, tfps = SPECS[1]  # sampled frames ~16 apart: every GOP boundary helps
    cost = {n: estimate(read_gop(p), T, rate, tfps).train for n, p in gop_files.items()}
    intra = read_gop(gop_files["intra"])
    # frames > 10 apart: every wanted frame is a keyframe, seeking to it decodes nothing else; a first frame within
    # DALI's leap of 10 from the start is reached by decoding forward from frame 0 instead
    assert decoded_frames([20, 36, 52], intra.keyframes, FRAMES) == 3
    assert decoded_frames([8, 36, 52], intra.keyframes, FRAMES) == 11
    assert T < cost["intra"] < T + 10
    assert cost["long"] > cost["gop8"] > cost["intra"]


def test_manifest_summary(gop_files, tmp_path):
    garbage = tmp_path / "garbage.webm"
    garbage.write_bytes(b"\x00not a video" * 100)
    paths = [str(gop_files[n]) for n in ("intra", "gop8", "long")] + [str(garbage)]
    out = estimate_manifest_decode_cost(paths, 4, 12, 30, num_clips=3, workers=2)
    assert out["files"] == 3 and [p for p, _ in out["unreadable"]] == [str(garbage)]
    seek = out["strategies"]["seek"]
    assert seek["train"]["worst_path"] == str(gop_files["long"])
    assert seek["train"]["median"] == pytest.approx(estimate(read_gop(gop_files["gop8"]), 4, 12, 30).train)
    assert seek["test"]["median_per_frame"] == pytest.approx(seek["test"]["median"] / 4)
    # decoding from the start does not care about keyframes: every file costs the same
    start = out["strategies"]["from_start"]["train"]
    assert start["median"] == start["worst"] == pytest.approx(estimate(read_gop(gop_files["intra"]), 4, 12, 30,
                                                                       strategy="from_start").train)
    text = format_decode_cost(out)
    assert text.count("train sampling median") == 3 and str(gop_files["long"]) in text
    assert estimate_manifest_decode_cost(paths, 4, 12, 30, max_files=2)["files"] == 1  # first and last only
    assert "no readable file" in format_decode_cost(estimate_manifest_decode_cost([str(garbage)], 4, 12, 30))
    with pytest.raises(ValueError, match="choose from"):
        estimate_manifest_decode_cost(paths, 4, 12, 30, strategies=["nvdec"])


def test_manifest_estimate_shows_its_progress(gop_files, caplog):
    """Not a terminal here: a dated log line per ``progress_every_s`` (0: after every file), files done of the total;
    nothing unless asked."""
    paths = [str(gop_files[n]) for n in ("intra", "gop8", "long")]
    with caplog.at_level(logging.INFO, logger="timesformer_harness.pipelines.progress"):
        estimate_manifest_decode_cost(paths, 4, 12, 30, workers=1)
        assert not caplog.records
        estimate_manifest_decode_cost(paths, 4, 12, 30, workers=1, show_progress=True, progress_every_s=0)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == [f"decode cost: {n}/3 files" for n in (1, 2, 3)], lines


def test_measure_clips_for_the_bench(gop_files):
    T, rate, tfps = SPECS[1]
    clips = [(str(gop_files[n]), sampling.kinetics_frames(FRAMES, 30, T, rate, tfps, i, 2))
             for n in ("long", "gop8") for i in range(2)]
    out = measure_clips(clips, LOADERS["dali"].decode_cost)
    assert out["strategy"] == "keyframe" and out["clips"] == 4 and out["delivered_frames"] == T
    assert out["counted_per_clip"] == out["model_per_clip"]
    long_only = measure_clips(clips[:2], "keyframe")["counted_per_clip"]
    assert long_only > out["counted_per_clip"]  # the GOP-8 file's clips cost less
    # every registered backend that decodes names a model the module has; the synthetic loader decodes nothing
    assert {b.decode_cost for b in LOADERS.values() if b.decodes} <= set(STRATEGIES) and not LOADERS["synthetic"].decode_cost
