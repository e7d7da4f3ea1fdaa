"""timesformer_harness.gate and bench.verdict: the verdict on fabricated records (tolerance from the baseline's own
samples, counted quantities exact, memory, re-measurement), refusing what cannot be judged, the CI outputs, and real
gate runs (same tree passes, an injected slowdown and a 3x-deeper model fail)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict
from argparse import Namespace

import pytest
import torch

from timesformer_harness.bench.record import BenchRecord, read_results, write_results
from timesformer_harness.bench.verdict import (TOLERANCE_CEILING, TOLERANCE_FLOOR, better, judge, judge_all,
                                               tolerance_for)
from timesformer_harness.config import REPO_ROOT
from timesformer_harness.gate import (candidate_cases, check_compatible, format_table, junit_xml, parse_args, select,
                                     stack_notes)
from timesformer_harness.runtime import environment_info

CASE = "model/divided_space_time/train/4x32"


def _rec(case: str = CASE, ratio: float = 1.0, params: int = 100, flops: int = 1000, mem: int = 100 * 2**20,
         status: str = "ok", ratios: list[float] | None = None, **kw) -> BenchRecord:
    return BenchRecord(suite="model", case=case, images_per_s=8.0 / ratio, params=params, flops_per_clip=flops,
                       peak_mem_bytes=mem, status=status, extra={"ratio": ratio, "ratios": ratios or [ratio] * 5},
                       **{"mode": "train", **kw})


def test_same_numbers_pass():
    (v,) = judge_all([_rec()], [_rec()], tolerance=0.3, mem_tolerance=0.1)
    assert not v.regressed and v.change == pytest.approx(0.0)


def test_slowdown_beyond_tolerance_regresses_and_within_passes():
    # ratio = time(model)/time(calibration): 1.5x the time is 1/1.5 - 1 = -33% normalised throughput.
    slow = judge(_rec(), _rec(ratio=1.5), tolerance=0.3)
    assert slow.regressed and slow.remeasure and slow.change == pytest.approx(1 / 1.5 - 1)
    assert slow.reasons == ["normalised images/s -33.3% (tolerance -30.0%)"]
    assert not judge(_rec(), _rec(ratio=1.2), tolerance=0.3).regressed
    fast = judge(_rec(), _rec(ratio=0.5), tolerance=0.3)
    assert not fast.regressed and "a slowdown of up to that much would pass unseen; rewrite it" in fast.notes[0]


def test_the_candidate_measures_every_baseline_case_under_its_own_name():
    """A baseline of a batch sweep (``/b2``) or of a compiled step (``/default``) is measured again as those cases:
    they were measured as plain cases of the same name, reported missing, and the gate could never pass."""
    from timesformer_harness.config import ModelConfig

    model = asdict(ModelConfig(depth=2, embed_dim=64, num_heads=4, img_size=32, patch_size=8, num_frames=4))
    base = [_rec(case=f"model/divided_space_time/train/4x32/b{b}", batch=b, frames=4, img_size=32, model=model)
            for b in (1, 2)] + [_rec(case="model/divided_space_time/train/4x32/default", batch=2, frames=4,
                                     img_size=32, model=model, compile="default")]
    for rec in base:
        rec.extra.update(steps_per_block=1, calib_reps=1)
    cases = candidate_cases(base, {}, torch.device("cpu"), [], None, {})
    assert [c.name for c in cases] == [r.case for r in base]


def test_a_speed_that_cannot_be_judged_fails_closed():
    """A NaN or missing normalised throughput on either side regresses (it passed as '+nan% ok'), and a NaN among
    the baseline's samples does not make the tolerance NaN."""
    nan = float("nan")
    missing = _rec()
    missing.extra["ratio"] = None
    for base, cand in ((_rec(), _rec(ratio=nan)), (_rec(ratio=nan), _rec(ratio=88.0)), (_rec(), missing)):
        v = judge(base, cand, tolerance=0.3)
        assert v.regressed and v.reasons[0].startswith("no normalised images/s to compare"), v
    assert tolerance_for(_rec(ratios=[1.0, nan, 1.001, 0.999, 1.0, 1.0])) == TOLERANCE_FLOOR


def test_each_case_gets_its_tolerance_from_its_baseline_samples():
    """Steady samples: the floor; scattered ones: wider, up to the ceiling; too few to tell: the ceiling."""
    steady = _rec(ratios=[1.0, 1.001, 0.999, 1.0, 1.002, 0.998, 1.0])
    scattered = _rec(ratios=[1.0, 1.03, 0.97, 1.015, 0.985, 1.025, 0.975])
    wild = _rec(ratios=[1.0, 2.0, 0.5, 1.5, 0.7, 1.9, 0.6])
    assert tolerance_for(steady) == TOLERANCE_FLOOR
    assert TOLERANCE_FLOOR < tolerance_for(scattered) < TOLERANCE_CEILING
    assert tolerance_for(wild) == TOLERANCE_CEILING and tolerance_for(_rec(ratios=[1.0, 1.0])) == TOLERANCE_CEILING
    assert tolerance_for(wild, fixed=0.2) == 0.2
    # a 10% slowdown fails a steady case and passes within the spread of a scattered one only when the spread says so
    assert judge(steady, _rec(ratio=1 / 0.9)).regressed
    assert not judge(steady, _rec(ratio=1.04)).regressed


def test_what_was_measured_must_match_and_memory_has_a_tolerance():
    v = judge(_rec(model={"depth": 2}), _rec(params=101, flops=1001, model={"depth": 3}), tolerance=0.3)
    assert v.regressed and not v.remeasure  # another model: a second measurement would not change that
    assert v.reasons == ["model depth 2 vs 3", "params 100 vs 101", "flops_per_clip 1000 vs 1001"]
    m = judge(_rec(), _rec(mem=120 * 2**20), tolerance=0.3, mem_tolerance=0.1)
    assert m.regressed and m.remeasure and "peak memory 100.0 -> 120.0 MiB (+20.0%" in m.reasons[0]
    assert not judge(_rec(), _rec(mem=105 * 2**20), tolerance=0.3, mem_tolerance=0.1).regressed


def test_missing_and_failed_cases_regress():
    base = [_rec(), _rec(case="model/space_only/train/4x32")]
    verdicts = judge_all(base, [_rec(status="oom")], tolerance=0.3, mem_tolerance=0.1)
    assert [v.regressed for v in verdicts] == [True, True]
    assert "candidate status oom" in verdicts[0].reasons[0]
    assert verdicts[1].reasons == ["missing from the candidate run"]
    table = format_table(verdicts, base, [_rec(status="oom")])
    assert "| model/space_only/train/4x32 |" in table and "REGRESSED" in table


def test_a_remeasurement_keeps_the_better_ratio_and_the_better_memory():
    first, second = _rec(ratio=1.3, mem=100), _rec(ratio=1.1, mem=120)
    best = better(first, second)
    assert best.extra["ratio"] == 1.1 and best.peak_mem_bytes == 100
    assert better(first, _rec(status="error")) is first


def test_junit_xml_has_a_case_per_gate_case_and_fails_the_regressed():
    verdicts = judge_all([_rec(), _rec(case="model/space_only/train/4x32")], [_rec(), _rec(
        case="model/space_only/train/4x32", ratio=2.0)], tolerance=0.1)
    suite = ET.fromstring(junit_xml(verdicts, 12.5))
    assert suite.get("tests") == "2" and suite.get("failures") == "1" and suite.get("time") == "12.5"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [CASE, "model/space_only/train/4x32"]
    assert cases[0].find("failure") is None and "normalised images/s -50.0%" in cases[1].find("failure").get("message")


def test_cases_are_chosen_by_pattern_variant_and_mode():
    base = [_rec(), _rec(case="model/space_only/train/4x32", attention_type="space_only"),
            _rec(case="model/space_only/infer/4x32", attention_type="space_only", mode="infer")]
    base[0].attention_type = "divided_space_time"
    args = Namespace(cases=["model/space_only/*"], attn="all", mode=None)
    assert [r.case for r in select(base, args)] == ["model/space_only/train/4x32", "model/space_only/infer/4x32"]
    assert [r.case for r in select(base, Namespace(cases=None, attn="space_only", mode="train"))] == [
        "model/space_only/train/4x32"]
    with pytest.raises(ValueError, match=r"--cases \['model/joint\*'\] match no baseline case"):
        select(base, Namespace(cases=["model/joint*"], attn="all", mode=None))
    with pytest.raises(ValueError, match=r"no baseline case is left by --attn bogus; it holds \(attention, mode\) "
                                         r"\[\('divided_space_time', 'train'\), \('space_only', 'infer'\)"):
        select(base, Namespace(cases=None, attn="bogus", mode=None))
    # --cases takes every word after it: the what-if after the patterns is an override, not a case name
    parsed = parse_args(["--baseline", "b.json", "--cases", "model/space*", "model.depth=8"])
    assert (parsed.cases, parsed.overrides) == (["model/space*"], ["model.depth=8"])


def test_a_baseline_times_one_batch_per_case_on_a_gpu_too():
    """On a GPU the bench sweeps the batch to out-of-memory; a baseline times the bench's batch (or the batches
    bench.batches names): an out-of-memory record would fail the baseline it belongs to."""
    from timesformer_harness.bench.cli import resolve
    from timesformer_harness.gate import baseline_cases

    cfg, preset, _ = resolve(preset="tiny", overrides=[])
    cuda = torch.device("cuda")  # the cases are built, not run: no GPU needed
    cases = baseline_cases(cfg, preset, ["divided_space_time", "space_only"], ["train"], cuda, (None, None), "bf16",
                           pairs=5, threads=1)
    assert [(c.attention_type, c.batch, c.sweep_batch) for c in cases] == [
        ("divided_space_time", cfg.bench.batch_size, False), ("space_only", cfg.bench.batch_size, False)]
    cfg, preset, _ = resolve(preset="tiny", overrides=["bench.batches=[2,8]"])
    cases = baseline_cases(cfg, preset, ["space_only"], ["train"], cuda, (None, None), "bf16", pairs=5, threads=1)
    assert [c.batch for c in cases] == [2, 8] and all(c.steps == 5 for c in cases)


def test_incompatible_baselines_are_refused():
    cpu = torch.device("cpu")
    meta = {"kind": "gate-baseline", "device": "cuda", "preset": "vit_base_patch16"}
    with pytest.raises(ValueError, match="measured on 'cuda'.*make gate-baseline"):
        check_compatible(meta, [], cpu, None, False)
    with pytest.raises(ValueError, match="not a gate baseline"):
        check_compatible({"device": "cpu"}, [], cpu, None, False)
    with pytest.raises(ValueError, match="baseline preset 'tiny' != --preset 'cpu_bench'"):
        check_compatible({"kind": "gate-baseline", "device": "cpu", "preset": "tiny"}, [], cpu, "cpu_bench", False)
    here = environment_info(cpu)
    other = _rec(env={**here, "machine_class": "cpu: Some Other CPU, AVX2, 64 CPUs", "torch": "2.0.0"})
    meta = {"kind": "gate-baseline", "device": "cpu", "preset": "tiny"}
    with pytest.raises(ValueError, match="machine class 'cpu: Some Other CPU.*--other-machine"):
        check_compatible(meta, [other], cpu, None, False)
    check_compatible(meta, [other], cpu, None, True)  # judged anyway
    check_compatible(meta, [_rec(env=here)], cpu, None, False)
    notes = stack_notes(other.env, here)
    assert notes[0].startswith("machine_class 'cpu: Some Other CPU") and notes[1] == f"torch '2.0.0' -> " \
                                                                                     f"'{torch.__version__}'"
    # each case's own process is compared, not the gate's: one thread per case on both sides is no difference
    assert stack_notes({**here, "cpu_threads": 1}, {**here, "cpu_threads": 1}) == []
    assert stack_notes({**here, "cpu_threads": 1}, {**here, "cpu_threads": 2}) == ["cpu_threads 1 -> 2"]


def _gate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "timesformer_harness.gate", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=600)


def test_an_output_folder_that_cannot_be_written_is_refused_before_measuring(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("{}")
    out = _gate("--baseline", str(afile), "--out", str(afile))
    assert out.returncode == 2 and out.stderr.strip() == (f"error: cannot write under {afile}: it is a "
                                                          "file; name a folder with --out") and not out.stdout
    out = _gate("--write-baseline", str(afile / "b.json"), "--preset", "tiny")
    assert out.returncode == 2 and f"error: cannot write under {afile}: it is a file; name a folder " \
        "with --write-baseline FILE" in out.stderr


def test_gate_end_to_end_same_tree_passes_and_a_slowdown_or_3x_depth_fails(tmp_path):
    baseline = tmp_path / "tiny.json"
    w = _gate("--write-baseline", str(baseline), "--preset", "tiny", "--attn", "divided_space_time",
              "--pairs", "5", "--repeats", "2")
    assert w.returncode == 0, w.stdout + w.stderr[-2000:]
    records, meta = read_results(baseline)
    assert meta["kind"] == "gate-baseline" and meta["preset"] == "tiny" and meta["threads"] == 1
    assert records[0].case == CASE and records[0].model["depth"] == 2 and len(records[0].extra["ratios"]) == 10
    assert len(records[0].extra["runs"]) == 2 and meta["repeats"] == 2
    assert records[0].extra["gemm_n"] == 384 and records[0].env["machine_class"] == \
        environment_info(torch.device("cpu"))["machine_class"]

    # The plumbing, not the speed: a tolerance wide enough for a shared CPU's noise under the test suite's own load
    # (a same-tree run once measured -18% here), still far from what the slowdowns below cost.
    same = _gate("--baseline", str(baseline), "--out", str(tmp_path / "gate"), "--tolerance", "0.5")
    assert same.returncode == 0, same.stdout + same.stderr[-2000:]
    assert "1/1 cases pass" in same.stdout
    (run,) = (tmp_path / "gate").iterdir()
    assert f"written: {run}/verdict.json" in same.stdout
    cand, cand_meta = read_results(run / "candidate.json")
    assert cand_meta["kind"] == "gate-candidate" and cand[0].extra["steps_per_block"] == \
        records[0].extra["steps_per_block"]  # same work per sample as the baseline
    summary = json.loads((run / "verdict.json").read_text())
    assert summary["passed"] and summary["exit_status"] == 0 and summary["regressed"] == []
    assert ET.parse(run / "junit.xml").getroot().get("failures") == "0"

    # Each step made twice as long (busy work): -50%, caught and confirmed by the second measurement.
    slowed = _gate("--baseline", str(baseline), "--out", str(tmp_path / "slowed"), "--tolerance", "0.3",
                   "--inject-delay", f"{CASE}=1.0")
    assert slowed.returncode == 1, slowed.stdout + slowed.stderr[-2000:]
    assert f"REGRESSED {CASE}: normalised images/s" in slowed.stdout

    # The candidate does 3x the blocks: another model, refused as such.
    deeper = _gate("--baseline", str(baseline), "--out", str(tmp_path / "deep"), "--tolerance", "0.5",
                   "model.depth=6")
    assert deeper.returncode == 1, deeper.stdout + deeper.stderr[-2000:]
    assert f"REGRESSED {CASE}: model depth 2 vs 6; params" in deeper.stdout
    (run,) = (tmp_path / "deep").iterdir()
    assert json.loads((run / "verdict.json").read_text())["regressed"] == [CASE]


def test_gate_exit_2_when_it_cannot_judge(tmp_path):
    missing = _gate("--baseline", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "make gate-baseline" in missing.stderr and not missing.stdout
    foreign = tmp_path / "gpu.json"
    write_results(foreign, [_rec()], {"kind": "gate-baseline", "device": "cuda", "preset": "vit_base_patch16"})
    out = _gate("--baseline", str(foreign))
    assert out.returncode == 2 and "measured on 'cuda'" in out.stderr and not out.stdout
    here = tmp_path / "cpu.json"
    write_results(here, [_rec()], {"kind": "gate-baseline", "device": "cpu", "preset": "tiny"})
    unknown = _gate("--baseline", str(here), "--cases", "model/nope*")
    assert unknown.returncode == 2 and "match no baseline case" in unknown.stderr and not unknown.stdout
    # arguments that would make a gate that cannot fail, or report a bad flag as a regression (exit 1)
    for flag, value in (("--tolerance", "nan"), ("--tolerance", "8"), ("--pairs", "-1"), ("--mem-tolerance", "-1")):
        bad = _gate("--baseline", str(here), flag, value)
        assert bad.returncode == 2 and f"{flag} " in bad.stderr and not bad.stdout, (flag, bad.stderr)
    bad = _gate("--baseline", str(here), "--inject-delay", f"{CASE}=0")
    assert bad.returncode == 2 and "must be a number above 0" in bad.stderr and not bad.stdout
    # damaged baselines: one line, exit 2 (never 1, which CI reads as a regression)
    data = json.loads(here.read_text())
    damaged = {"env_null": lambda d: d["meta"].update(env=None),
               "extra_null": lambda d: d["records"][0].update(extra=None),
               "extra_empty": lambda d: d["records"][0].update(extra={}),
               "no_records": lambda d: d.update(records=[])}
    for name, damage in damaged.items():
        d = json.loads(json.dumps(data))
        damage(d)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(d))
        out = _gate("--baseline", str(path))
        assert out.returncode == 2 and f"\nerror: cannot gate against {path}: " in f"\n{out.stderr}", \
            (name, out.stdout, out.stderr[-1500:])
        assert "Traceback" not in out.stderr
    folder = _gate("--baseline", str(tmp_path))
    assert folder.returncode == 2 and "is a folder, not a baseline file" in folder.stderr


def test_a_baseline_keeps_the_median_run_and_every_sample():
    from timesformer_harness.bench.verdict import median_run

    runs = [_rec(ratio=r, ratios=[r - 0.01, r, r + 0.01], mem=m) for r, m in ((1.05, 300), (0.99, 100), (1.01, 200))]
    best = median_run(runs + [_rec(status="error")])
    assert best.extra["ratio"] == 1.01 and best.peak_mem_bytes == 200 and best.extra["runs"] == [0.99, 1.01, 1.05]
    assert sorted(best.extra["ratios"]) == pytest.approx(sorted(x for r in runs for x in r.extra["ratios"]))


def _baseline_rec(**extra) -> BenchRecord:
    """A record as make gate-baseline writes it, on this machine: a model this tree builds, ratio and block sizes."""
    from timesformer_harness.model import load_preset

    rec = _rec(attention_type="divided_space_time", preset="tiny", model=asdict(load_preset("tiny")), frames=4,
               img_size=32, batch=2, env=environment_info(torch.device("cpu")))
    rec.extra.update({"steps_per_block": 2, "calib_reps": 3, "gemm_n": 384, **extra})
    return rec


def test_a_damaged_or_foreign_baseline_is_refused_naming_the_record_and_the_fix():
    """Checked before anything is measured: a model key this tree does not know (a baseline from another version),
    a ratio or a block size that is not a finite positive number, a record that is not ok."""
    from timesformer_harness.gate import check_baseline

    meta = {"kind": "gate-baseline", "device": "cpu", "preset": "tiny"}
    check_baseline([_baseline_rec()], meta)
    newer = _baseline_rec()
    newer.model["old_knob"] = 1
    with pytest.raises(ValueError, match=rf"record {CASE}: model key\(s\) \['old_knob'\] unknown to this tree's "
                                         "ModelConfig: the baseline was written by another version of the harness; "
                                         "re-write it with `make gate-baseline`"):
        check_baseline([newer], meta)
    for ratio in (float("nan"), float("inf"), 0, -1.0, "1.0", True, None):
        with pytest.raises(ValueError, match=rf"record {CASE}: extra.ratio is .*not a finite positive number.*"
                                             "make gate-baseline"):
            check_baseline([_baseline_rec(ratio=ratio)], meta)
    for key, value in (("steps_per_block", "x"), ("calib_reps", 0), ("steps_per_block", 1.5),
                       ("gemm_n", float("nan")), ("calib_n", -5)):
        with pytest.raises(ValueError, match=rf"record {CASE}: extra.{key} is .*not a positive whole number"):
            check_baseline([_baseline_rec(**{key: value})], meta)
    failed = _baseline_rec()
    failed.status = "error"
    with pytest.raises(ValueError, match=rf"record {CASE} has status 'error', not 'ok'.*make gate-baseline"):
        check_baseline([failed], meta)


def test_a_damaged_baseline_is_exit_2_before_anything_is_measured(tmp_path):
    """One line naming the file, the record and the fix, exit 2 (never 1, which CI reads as a regression)."""
    meta = {"kind": "gate-baseline", "device": "cpu", "preset": "tiny", "threads": 1}
    newer, nan, letters = _baseline_rec(), _baseline_rec(ratio=float("nan")), _baseline_rec(steps_per_block="x")
    newer.model["old_knob"] = 1
    for name, rec, says in (("newer", newer, "model key(s) ['old_knob'] unknown"),
                            ("nan", nan, "extra.ratio is nan"), ("letters", letters, "extra.steps_per_block is 'x'")):
        path = tmp_path / f"{name}.json"
        write_results(path, [rec], meta)
        out = _gate("--baseline", str(path), "--out", str(tmp_path / "gate"))
        assert out.returncode == 2, (name, out.stdout, out.stderr[-1500:])
        (line,) = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert line.startswith(f"error: cannot gate against {path}: record {CASE}: {says}"), line
        assert line.endswith("re-write it with `make gate-baseline`") and "Traceback" not in out.stderr
        assert not list((tmp_path / "gate").glob("*"))  # refused before measuring: no run folder


def test_no_environment_note_from_a_candidate_whose_cases_recorded_none():
    """Every candidate case failed (no environment recorded): no note built from the gate's own process."""
    from timesformer_harness.gate import environment_notes

    base = [_baseline_rec()]
    base[0].env["cpu_threads"] = 1
    failed = _rec(status="error", env={})
    assert environment_notes(base, {}, [failed]) == []
    ran = _rec(env={**base[0].env, "cpu_threads": 2})
    assert environment_notes(base, {}, [failed, ran]) == ["cpu_threads 1 -> 2"]


def test_a_first_measurement_that_regressed_stays_on_record_when_the_second_passes(tmp_path, monkeypatch, capsys):
    """A timing regression is measured again and the better counts; the first measurement's failure had been
    dropped from verdicts.json, junit.xml and the table (only a log line said a case was re-measured), so a CI
    user saw a plain ok on a case that had failed once."""
    import timesformer_harness.gate as gate

    base_path = REPO_ROOT / "benchmarks" / "baselines" / "cpu_bench.json"
    base = [r for r in read_results(base_path)[0] if r.case == "model/divided_space_time/train/8x224"]
    slow_then_fine = iter([1.25, 1.0])

    def measure(cases):
        return [BenchRecord.from_dict({**b.to_dict(), "extra": {**b.extra, "ratio": b.extra["ratio"] *
                                                                 next(slow_then_fine)}}) for b in base]

    monkeypatch.setattr(gate, "measure", measure)
    status = gate.main(["--baseline", str(base_path), "--cases", base[0].case, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0 and "ok (measured twice, the better counts: first normalised images/s -20.0%" in out
    (run,) = tmp_path.iterdir()
    (v,) = json.loads((run / "verdicts.json").read_text())
    assert not v["regressed"] and v["notes"][0].endswith("; then within tolerance")
    assert "first normalised images/s -20.0%" in ET.parse(run / "junit.xml").find("testcase/system-out").text
