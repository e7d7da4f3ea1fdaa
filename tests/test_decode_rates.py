"""The measured decode table: the shipped rows are the measured ones, quoted from their results files; the writer
keeps rows measured without a GPU out of the shipped table; ``data.backend=auto`` (a CUDA model) and ``prepare
--codec auto`` choose by a table given here (no GPU touched), and keep the rule order where a candidate has no
figure."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from timesformer_harness.config import REPO_ROOT
from timesformer_harness.pipelines import decode_rates
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.decode_rates import (TABLE, RateRow, choose_path, load_rates, merge_rates, nearest,
                                                        recommend_format, set_rate)
from timesformer_harness.pipelines.factory import DecodePlan, log_decode_plan, plan_decode, preflight
from timesformer_harness.pipelines.nvdec import GENERATIONS
from timesformer_harness.pipelines.tools.encode import write_video
from timesformer_harness.pipelines.tools.prepare import SPEC_FILE, main as prepare_main
from timesformer_harness.pipelines.tools.transcode import OUTPUT_CODECS
from timesformer_harness.pipelines.validate import VideoInfo, probe_video
from tests.conftest import encode_video, textured_frames

CUDA = torch.device("cuda")
CFG = DataConfig(num_frames=4, sampling_rate=2, pad_short=True)


def row(path: str, codec: str, gop: int, rate: float, generation: str = "hopper", short_side: int = 256,
        date: str = "2026-12-01", threads: int = 8) -> RateRow:
    return RateRow(generation=generation, device="NVIDIA H100 80GB HBM3", path=path, codec=codec, gop=gop,
                   short_side=short_side, clips_per_s=rate, host_cpu_ms_per_clip=2.0, threads=threads, batch=32,
                   clip="8x32, crop 224", source=f"docs/results/{path}-{codec}.md", date=date, git_sha="abc1234")


def videos(codec: str, n: int = 3, side: int = 256) -> list[VideoInfo]:
    return [VideoInfo(f"v{i}.{codec}", codec=codec, frames=300, fps=30.0, height=side, width=side * 4 // 3,
                      bit_depth=8, chroma="420") for i in range(n)]


# ------------------------------------------------------------------------------------------------ the shipped table

def test_the_shipped_table_holds_the_measured_gpu_rows_quoted_from_their_results_files() -> None:
    rows = load_rates()
    assert len(rows) == 8 and {r.generation for r in rows} <= set(GENERATIONS)  # no CPU row
    for r in rows:
        text = (REPO_ROOT / r.source).read_text()
        assert r.date in r.source and r.git_sha in text, r  # the file's date, and the tree it names
        label = {"nvdec": "DALI, NVDEC", "pyav": "PyAV loader"}[r.path]
        variant = {("vp9", 32): "VP9, GOP 32", ("vp9", 250): "VP9, long GOP (250)", ("h264", 32): "H.264, GOP 32",
                   ("h264", 250): "H.264, long GOP (250)"}[(r.codec, r.gop)]
        line = f"| {label} | {variant} | {r.clips_per_s:.1f} | {r.host_cpu_ms_per_clip:.1f} |"
        assert line in text, line  # quoted exactly: the row of the table in the results file
    assert [(r.path, r.codec, r.gop, r.clips_per_s) for r in rows if r.path == "nvdec"] == [
        ("nvdec", "vp9", 250, 45.4), ("nvdec", "vp9", 32, 61.6), ("nvdec", "h264", 250, 32.2),
        ("nvdec", "h264", 32, 35.0)]


def test_the_writer_refuses_cpu_rows_for_the_shipped_table_and_merges_elsewhere(tmp_path: Path) -> None:
    shipped = TABLE.read_bytes()
    cpu = row("dali-cpu", "vp9", 32, 6.2, generation="cpu")
    with pytest.raises(ValueError, match="measured without a GPU; the shipped table holds GPU measurements only"):
        merge_rates(TABLE, [cpu])
    assert TABLE.read_bytes() == shipped
    path = tmp_path / "rates.yaml"
    assert merge_rates(path, [cpu, row("nvdec", "vp9", 32, 60.0)]) == load_rates(path)
    again = merge_rates(path, [replace(cpu, clips_per_s=7.0, git_sha="1234567"), row("nvdec", "vp9", 250, 45.0)])
    assert [(r.path, r.gop, r.clips_per_s) for r in again] == [("nvdec", 32, 60.0), ("dali-cpu", 32, 7.0),
                                                               ("nvdec", 250, 45.0)]  # same conditions: replaced
    assert load_rates(path) == again and load_rates(path)[1].git_sha == "1234567"  # a digit-only SHA stays text
    assert path.read_text().startswith(decode_rates.HEADER)


def test_a_broken_table_names_the_file_and_the_row(tmp_path: Path) -> None:
    path = tmp_path / "rates.yaml"
    with pytest.raises(FileNotFoundError, match=f"decode table {path}: no such file"):
        load_rates(path)
    merge_rates(path, [row("nvdec", "vp9", 32, 60.0)])
    path.write_text(path.read_text().replace("path: nvdec", "path: nvdex"))
    with pytest.raises(ValueError, match=r"rates.yaml, rows\[0\]: path 'nvdex': one of \['nvdec', 'dali-cpu'"):
        load_rates(path)
    path.write_text("rows:\n- {generation: hopper, path: nvdec}\n")
    with pytest.raises(ValueError, match="every row needs the keys"):
        load_rates(path)
    assert load_rates("none") == []


# ------------------------------------------------------------------------------------------------ nearest rows

def test_nearest_is_same_generation_path_and_codec_then_gop_then_short_side_then_newest() -> None:
    rows = [row("nvdec", "vp9", 32, 60.0), row("nvdec", "vp9", 250, 45.0), row("nvdec", "vp9", 32, 99.0, "ada"),
            row("nvdec", "vp9", 32, 70.0, short_side=320), row("nvdec", "vp9", 32, 80.0, date="2026-12-05"),
            row("nvdec", "h264", 32, 35.0)]
    assert nearest(rows, "hopper", "nvdec", "vp9", 40, 256).clips_per_s == 80.0  # GOP 32, 256 px, the newest
    assert nearest(rows, "hopper", "nvdec", "vp9", 40, 310).clips_per_s == 70.0  # the nearer short side
    assert nearest(rows, "hopper", "nvdec", "vp9", None, 256).clips_per_s == 45.0  # unknown GOP: the long one
    assert nearest(rows, "ada", "nvdec", "vp9", 250).clips_per_s == 99.0  # the only Ada row
    assert nearest(rows, "ampere_ga100", "nvdec", "vp9", 32) is None
    assert nearest(rows, "hopper", "dali-cpu", "vp9", 32) is None
    # a set of 2 VP9 and 1 H.264 videos: 3 clips in 2/80 + 1/35 seconds
    rate = set_rate(rows, "hopper", "nvdec", {"vp9": 2, "h264": 1}, 32, 256)
    assert rate.clips_per_s == pytest.approx(3 / (2 / 80.0 + 1 / 35.0))
    assert [r.codec for r in rate.rows] == ["vp9", "h264"]
    assert set_rate(rows, "hopper", "nvdec", {"vp9": 1, "hevc": 1}) is None  # no HEVC row: no figure


# ------------------------------------------------------------------------------------------------ data.backend=auto

def test_an_all_mjpeg_set_goes_to_nvjpeg_only_when_the_table_says_it_is_faster(caplog) -> None:
    mjpeg = videos("mjpeg")
    faster = [row("nvjpeg", "mjpeg", 1, 512.0), row("dali-cpu", "mjpeg", 1, 300.0)]
    plan = plan_decode(CFG, CUDA, mjpeg, "hopper", rates=faster)
    assert (plan.loader, plan.backend) == ("dali", "gpu")
    assert plan.why.startswith("NVDEC cannot decode 3 of 3 video(s), e.g. v0.mjpeg: codec mjpeg")
    assert ("the measured table (configs/measured/decode_rates.yaml) puts nvJPEG first for hopper, mjpeg: nvJPEG "
            "512 clips/s, 2 host CPU ms/clip (NVIDIA H100 80GB HBM3, mjpeg GOP 1, 256 px, 8 threads, batch 32; "
            "docs/results/nvjpeg-mjpeg.md, 2026-12-01, git abc1234); DALI's CPU decoder 300 clips/s") in plan.why
    with caplog.at_level(logging.INFO, logger="timesformer_harness.pipelines.factory"):
        log_decode_plan(CFG, plan, CUDA)
    assert "data.backend=auto: DALI decodes on the GPU, because NVDEC cannot decode 3 of 3" in caplog.text
    assert "puts nvJPEG first for hopper, mjpeg: nvJPEG 512 clips/s" in caplog.text

    slower = [row("nvjpeg", "mjpeg", 1, 200.0), row("dali-cpu", "mjpeg", 1, 300.0)]
    plan = plan_decode(CFG, CUDA, mjpeg, "hopper", rates=slower)
    assert plan.backend == "cpu" and "puts DALI's CPU decoder first for hopper, mjpeg: DALI's CPU decoder 300 " \
                                      "clips/s" in plan.why
    for rates, missing in (([row("dali-cpu", "mjpeg", 1, 300.0)], "nvJPEG"),
                           ([], "DALI's CPU decoder or nvJPEG"),
                           ([row("nvjpeg", "mjpeg", 1, 900.0, "ada"), row("dali-cpu", "mjpeg", 1, 300.0)], "nvJPEG")):
        plan = plan_decode(CFG, CUDA, mjpeg, "hopper", rates=rates)
        assert plan.backend == "cpu" and plan.why.endswith(
            f"no measured figure for {missing} (hopper, mjpeg) in configs/measured/decode_rates.yaml: kept the rule "
            "order (DALI's CPU decoder before nvJPEG)"), plan.why
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timesformer_harness.pipelines.factory"):
        log_decode_plan(CFG, plan, CUDA)
    assert "DALI decodes on the CPU and the clips are copied to cuda, because NVDEC cannot decode 3 of 3" in caplog.text
    assert "no measured figure for nvJPEG" in caplog.text


def test_vp9_goes_to_nvdec_or_the_cpu_decoder_by_the_table() -> None:
    vp9 = videos("vp9")
    nvdec_first = [row("nvdec", "vp9", 250, 45.4), row("dali-cpu", "vp9", 250, 40.0)]
    assert plan_decode(CFG, CUDA, vp9, "hopper", rates=nvdec_first).backend == "gpu"
    cpu_first = [row("nvdec", "vp9", 250, 45.4), row("dali-cpu", "vp9", 250, 90.0)]
    plan = plan_decode(CFG, CUDA, vp9, "hopper", rates=cpu_first)
    assert plan == DecodePlan("dali", "cpu", "hopper", plan.why) and plan.why.startswith(
        "the measured table (configs/measured/decode_rates.yaml) puts DALI's CPU decoder first for hopper, vp9: DALI's "
        "CPU decoder 90 clips/s")
    # the set's GOP is not probed: the long GOP's rows decide, whatever GOP 32 says
    gop32 = cpu_first + [row("nvdec", "vp9", 32, 200.0), row("dali-cpu", "vp9", 32, 50.0)]
    assert plan_decode(CFG, CUDA, vp9, "hopper", rates=gop32).backend == "cpu"
    # another generation's rows do not count; no figure for a candidate: the rule order, NVDEC first, said
    plan = plan_decode(CFG, CUDA, vp9, "hopper", rates=[row("nvdec", "vp9", 250, 45.4),
                                                        row("dali-cpu", "vp9", 250, 90.0, "ada")])
    assert plan.backend == "gpu" and plan.why == ("no measured figure for DALI's CPU decoder (hopper, vp9) in "
                                                  "configs/measured/decode_rates.yaml: kept the rule order (NVDEC "
                                                  "before DALI's CPU decoder)")
    # a table named by data.decode_rates
    named = replace(CFG, decode_rates="/data/rates.yaml")
    assert "in /data/rates.yaml: kept the rule order" in plan_decode(named, CUDA, vp9, "hopper", rates=[]).why


def test_explicit_backends_and_single_candidates_are_not_chosen_by_the_table() -> None:
    cpu_first = [row("nvdec", "vp9", 250, 45.4), row("dali-cpu", "vp9", 250, 90.0),
                 row("nvjpeg", "mjpeg", 1, 900.0), row("dali-cpu", "mjpeg", 1, 100.0)]
    vp9, mjpeg = videos("vp9"), videos("mjpeg")
    assert plan_decode(replace(CFG, backend="gpu"), CUDA, vp9, "hopper", rates=cpu_first) == DecodePlan(
        "dali", "gpu", "hopper")
    assert plan_decode(replace(CFG, backend="cpu"), CUDA, mjpeg, "hopper", rates=cpu_first) == DecodePlan(
        "dali", "cpu", "hopper")
    assert plan_decode(CFG, "cpu", mjpeg, "hopper", rates=cpu_first) == DecodePlan("dali", "cpu", "hopper")
    # H.264: NVDEC is the only DALI path; below NVDEC's minimum VP9 has only the CPU decoder
    assert plan_decode(CFG, CUDA, videos("h264"), "hopper", rates=cpu_first) == DecodePlan("dali", "gpu", "hopper")
    small = plan_decode(CFG, CUDA, videos("vp9", side=64), "hopper", rates=cpu_first)
    assert small.backend == "cpu" and small.why.startswith("NVDEC cannot decode 3 of 3") and "table" not in small.why


def test_choose_path_keeps_the_rule_order_on_a_tie_and_needs_a_candidate() -> None:
    tie = [row("nvdec", "vp9", 32, 50.0), row("dali-cpu", "vp9", 32, 50.0)]
    assert choose_path(["nvdec", "dali-cpu"], tie, "hopper", {"vp9": 1}, 32).path == "nvdec"
    with pytest.raises(ValueError, match="no candidate"):
        choose_path([], tie, "hopper", {"vp9": 1})


def test_preflight_of_real_mjpeg_files_reads_the_table_data_decode_rates_names(tmp_path: Path, monkeypatch) -> None:
    """The factory's pre-flight check of real probed MJPEG files for a CUDA model (its compute capability faked as
    sm90: no CUDA touched), with a table written to a file: nvJPEG when the table says so."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    paths = [write_video(tmp_path / f"m{i}.avi", textured_frames(24, 48, 64, seed=i), "mjpeg", 30, pix_fmt="yuvj420p")
             for i in range(2)]
    assert {probe_video(str(p)).codec for p in paths} == {"mjpeg"}
    manifest = tmp_path / "train.csv"
    manifest.write_text("".join(f"{p} {i}\n" for i, p in enumerate(paths)))
    table = tmp_path / "rates.yaml"
    merge_rates(table, [row("nvjpeg", "mjpeg", 1, 512.0), row("dali-cpu", "mjpeg", 1, 300.0)])
    cfg = replace(CFG, root=str(tmp_path), train_manifest=str(manifest), validate_cache="none",
                  decode_rates=str(table))
    check = preflight(cfg, "train", CUDA)
    assert (check.plan.loader, check.plan.backend, check.rejected) == ("dali", "gpu", [])
    assert "puts nvJPEG first for hopper, mjpeg: nvJPEG 512 clips/s" in check.plan.why and str(table) in check.plan.why
    merge_rates(table, [row("nvjpeg", "mjpeg", 1, 100.0)])
    assert preflight(cfg, "train", CUDA).plan.backend == "cpu"
    with pytest.raises(FileNotFoundError, match="no such file .data.decode_rates names it"):
        preflight(replace(cfg, decode_rates=str(tmp_path / "none.yaml")), "train", CUDA)


# ------------------------------------------------------------------------------------------------ prepare --codec auto

def test_recommend_format_takes_the_most_clips_per_s_for_the_generation() -> None:
    rows = [row("nvdec", "vp9", 32, 61.6), row("nvdec", "vp9", 250, 45.4), row("nvdec", "h264", 32, 35.0),
            row("pyav", "mjpeg", 1, 900.0), row("nvjpeg", "mjpeg", 1, 700.0, "ada")]
    rec = recommend_format(rows, "hopper", OUTPUT_CODECS, 256)
    assert (rec.codec, rec.gop, rec.path, rec.rate.clips_per_s) == ("vp9", 32, "nvdec", 61.6)  # PyAV does not count
    assert rec.why.startswith("the most clips/s measured for hopper in the decode table: NVDEC 61.6 clips/s")
    assert recommend_format(rows, "hopper", OUTPUT_CODECS, 256, gop=250)[:2] == ("vp9", 250)  # --gop given
    assert recommend_format(rows, "hopper", {"h264"}, 256)[:3] == ("h264", 32, "nvdec")
    # MJPEG on Hopper: the paths auto would take (CPU decoder, nvJPEG) must both have a figure
    both = rows + [row("nvjpeg", "mjpeg", 1, 400.0), row("dali-cpu", "mjpeg", 1, 300.0)]
    assert recommend_format(both, "hopper", OUTPUT_CODECS, 256)[:3] == ("mjpeg", 1, "nvjpeg")
    assert recommend_format(rows + [row("nvjpeg", "mjpeg", 1, 400.0)], "hopper", OUTPUT_CODECS, 256).codec == "vp9"
    # 96 px is below NVDEC's VP9 minimum (128): only DALI's CPU decoder would take VP9, and it has no figure; H.264's
    # minimum is 48x16
    small = recommend_format(rows, "hopper", OUTPUT_CODECS, 96)
    assert small[:3] == ("h264", 32, "nvdec")
    # the measured VP9 formats passed over are named in the explanation, with why
    passed_over = ("; passed over at 96 px: vp9 GOP 32 (not NVDEC: frame 96x96 is below NVDEC's VP9 minimum of "
                   "128x128; no measured figure for DALI's CPU decoder), vp9 GOP 250 (not NVDEC: frame 96x96 is below "
                   "NVDEC's VP9 minimum of 128x128; no measured figure for DALI's CPU decoder)")
    assert small.why.endswith(passed_over), small.why
    vp9_only = recommend_format(rows, "hopper", {"vp9"}, 96)
    assert vp9_only.path == "" and vp9_only.why.endswith(passed_over)
    none = recommend_format(rows, "ampere_ga100", OUTPUT_CODECS, 256)
    assert (none.codec, none.gop, none.path, none.rate) == ("vp9", None, "", None)
    assert none.why == ("no measured DALI figure for ampere_ga100 in the decode table; vp9, the rule's choice (DALI's "
                        "CPU and GPU decoders both take it)")
    # the shipped table today: VP9 GOP 32 on NVDEC, from the H200 shoot-out
    shipped = recommend_format(load_rates(), "hopper", OUTPUT_CODECS, 256)
    assert (shipped.codec, shipped.gop, shipped.path, shipped.rate.clips_per_s) == ("vp9", 32, "nvdec", 61.6)


def test_prepare_codec_auto_encodes_the_recommended_format(tmp_path: Path, capsys) -> None:
    """``prepare --codec auto`` on real files: the table given names MJPEG fastest on Hopper, so the outputs are
    MJPEG; for a generation without rows, VP9 with the reason."""
    src = [encode_video(tmp_path / f"s{i}.webm", textured_frames(12, 48, 64, seed=i)) for i in range(2)]
    manifest = tmp_path / "train.csv"
    manifest.write_text("".join(f"{p.name} {i}\n" for i, p in enumerate(src)))
    table = tmp_path / "rates.yaml"
    merge_rates(table, [row("nvdec", "vp9", 32, 61.6), row("nvjpeg", "mjpeg", 1, 400.0),
                        row("dali-cpu", "mjpeg", 1, 300.0)])
    out = tmp_path / "auto"
    assert prepare_main([str(manifest), "--out", str(out), "--codec", "auto", "--gpu", "sm90", "--decode-rates",
                         str(table), "--short-side", "32", "--no-progress"]) == 0
    spec = json.loads((out / SPEC_FILE).read_text())["spec"]
    assert (spec["codec"], spec["gop"]) == ("mjpeg", 1) and sorted(p.name for p in out.glob("*.avi")) == [
        "s0.avi", "s1.avi"]
    said = capsys.readouterr().out
    assert ("--codec auto for Hopper (sm90: H100, H200), as named: mjpeg, GOP 1, because the most clips/s measured "
            f"for hopper in {table}: nvJPEG 400 clips/s") in said
    other = tmp_path / "other"
    assert prepare_main([str(manifest), "--out", str(other), "--codec", "auto", "--gpu", "ada", "--decode-rates",
                         str(table), "--short-side", "32", "--gop", "8", "--no-progress"]) == 0
    spec = json.loads((other / SPEC_FILE).read_text())["spec"]
    assert (spec["codec"], spec["gop"]) == ("vp9", 8)
    assert "vp9, GOP 8, because no measured DALI figure for ada in" in capsys.readouterr().out
    if not torch.cuda.is_available():  # no GPU named or visible: the default, and prepare's own flag to name one
        unnamed = tmp_path / "unnamed"
        assert prepare_main([str(manifest), "--out", str(unnamed), "--codec", "auto", "--decode-rates", str(table),
                             "--short-side", "32", "--no-progress"]) == 0
        assert "Hopper (sm90: H100, H200), the default: no GPU visible (--gpu names another)" in \
            capsys.readouterr().out
