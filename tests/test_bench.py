"""timesformer_harness.bench: the record schema (provenance, raw samples, older schemas read), the statistics, real
bench runs at the tiny preset and their exports, and comparing two of them (like for like, or refused)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

import pytest
import torch

from timesformer_harness.bench import build_cases, resolve, run_case, run_worker
from timesformer_harness.bench.case import BenchCase
from timesformer_harness.bench.report import summary_table
from timesformer_harness.bench.record import (SCHEMA_VERSION, BenchRecord, read_results, write_flat, write_results,
                                              write_tensorboard)
from timesformer_harness.bench.sweep import SUITES, case_from_dict
from timesformer_harness.config import REPO_ROOT, RootConfig, load_config
from timesformer_harness.counting import count_flops, count_params
from timesformer_harness.metrics import PeakMemory, median_interval, percentile, summarize
from timesformer_harness.model import create_model, load_preset
from timesformer_harness.variants import attention_shape


def _case(suite: str, attention_type: str = "divided_space_time", **kw) -> BenchCase:
    model = replace(load_preset("tiny"), attention_type=attention_type, **kw.pop("model_changes", {}))
    base = {"preset": "tiny", "batch": 2, "precision": "fp32", "channels_last": False, "warmup": 1, "steps": 2,
            "device": "cpu", "peak_flops": 1e11, "peak_flops_source": "test", "frames": 4, "img_size": 32,
            "model": model}
    return SUITES[suite].Case.of(base, **kw)


def _run(case: BenchCase) -> BenchRecord:
    """The worker's function, in this process (the JSON round trip included)."""
    return BenchRecord.from_dict(run_worker(case_from_dict(json.loads(json.dumps(case.to_dict()))).to_dict()))


def test_a_cases_record_keeps_the_warnings_torch_logged(monkeypatch):
    """torch's warnings during a case (dynamo's and inductor's loggers keep theirs from "torch") land in the
    record, each once; the handlers are gone afterwards."""
    import logging

    from timesformer_harness.bench import model as model_suite
    from timesformer_harness.bench.sweep import torch_warnings

    run = model_suite.run

    def warns(case, rec, device, dtype):
        for _ in range(2):
            logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").warning(
                "Encountered an exception in identify_accessed_tensors, assuming every input is mutated\nTraceback")
        logging.getLogger("torch._dynamo.convert_frame").warning("torch._dynamo hit config.recompile_limit (8)")
        logging.getLogger("torch._inductor.utils").info("not a warning")
        run(case, rec, device, dtype)

    monkeypatch.setattr(model_suite, "run", warns)
    rec = _run(_case("model", frames=4, img_size=32))
    assert rec.status == "ok" and rec.extra["torch_warnings"] == [
        "torch._higher_order_ops.triton_kernel_wrap: Encountered an exception in identify_accessed_tensors, "
        "assuming every input is mutated", "torch._dynamo.convert_frame: torch._dynamo hit config.recompile_limit (8)"]
    with torch_warnings() as warned:
        pass
    logging.getLogger("torch._dynamo").warning("after the case")
    monkeypatch.undo()
    assert warned == [] and "torch_warnings" not in _run(_case("model", frames=4, img_size=32)).extra


def test_summaries_percentiles_and_the_interval_of_the_median():
    times = [0.010, 0.020, 0.030, 0.040, 0.050]
    s = summarize(times, scale=1e3)
    assert s["median"] == pytest.approx(30.0)
    assert s["p10"] == pytest.approx(14.0)  # linear interpolation between 10 and 20 ms
    assert s["p90"] == pytest.approx(46.0)
    assert 10.0 <= s["ci_low"] <= 30.0 <= s["ci_high"] <= 50.0
    assert percentile([3.0], 90) == 3.0
    assert median_interval([2.0]) == (2.0, 2.0) and median_interval(times) == median_interval(list(times))
    tight, wide = median_interval([1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0]), median_interval([1, 2, 0.5, 1, 3, 0.2, 1])
    assert tight[1] - tight[0] < wide[1] - wide[0]


def test_record_roundtrip_versions_and_flat_rows(tmp_path):
    rec = BenchRecord(suite="model", case="model/x/train/8x224", clips_per_s=2.0, step_ms={"median": 1.0},
                      samples_s=[0.001, 0.002], env={"git_sha": "abc"})
    write_results(tmp_path / "r.json", [rec], {"preset": "tiny"})
    back, meta = read_results(tmp_path / "r.json")
    assert back == [rec] and meta == {"preset": "tiny"}
    assert json.loads((tmp_path / "r.json").read_text())["schema_version"] == SCHEMA_VERSION
    for bad in (0, SCHEMA_VERSION + 1):
        with pytest.raises(ValueError, match=f"schema_version={bad}; this harness reads 1 to {SCHEMA_VERSION}"):
            BenchRecord.from_dict({**rec.to_dict(), "schema_version": bad})
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        BenchRecord.from_dict({**rec.to_dict(), "bogus": 1})
    bad = tmp_path / "bad.json"  # files that are not results files: a ValueError naming the file, no traceback
    for text, message in (("[1, 2]", "a JSON list, not an object"), ('{"schema_ver', "its JSON does not parse"),
                          ('{"schema_version": 2, "meta": {}}', "'records' must be a list"),
                          ('{"schema_version": 2, "records": [{"case": "x"}]}', "record 0 is not a bench record"),
                          ('{"schema_version": 2, "records": [7]}', "record 0 is not a bench record")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"^{bad}: .*{re.escape(message)}"):
            read_results(bad)
    flat = rec.flat()
    assert flat["clips_per_s"] == 2.0 and flat["step_ms.median"] == 1.0 and flat["env.git_sha"] == "abc"
    assert "samples_s" not in flat and "env" not in flat


def test_schema_1_records_are_read_migrated():
    """A record of schema 1: ``backend`` named the attention kernel or the loader, the CPU memory kind was
    ``rss_fresh_process``, and the gate wrote its own ``gate`` suite for the model step it timed."""
    v1 = {"suite": "attention", "case": "attention/joint/flash/train", "backend": "flash", "peak_mem_kind":
          "rss_fresh_process", "schema_version": 1}
    rec = BenchRecord.from_dict(v1)
    assert (rec.attn_backend, rec.loader, rec.peak_mem_kind, rec.schema_version) == ("flash", None, "rss", 2)
    assert BenchRecord.from_dict({**v1, "suite": "pipeline", "case": "pipeline/dali", "backend": "dali"}).loader == "dali"
    gate = BenchRecord.from_dict({"suite": "gate", "case": "gate/space_only/train", "attention_type": "space_only",
                                  "mode": "train", "frames": 8, "img_size": 224, "extra": {"ratio": 2.5},
                                  "schema_version": 1})
    assert gate.suite == "model" and gate.case == "model/space_only/train/8x224" and gate.extra["ratio"] == 2.5


def test_attention_shapes_follow_the_block_layout():
    cfg = load_preset("cpu_bench")  # 224 px, patch 16 -> N = 196; 3 heads of 64
    assert attention_shape(cfg, "temporal", 2, 8, 224) == (2 * 196, 3, 8, 64)
    assert attention_shape(cfg, "spatial", 2, 8, 224) == (2 * 8, 3, 197, 64)
    assert attention_shape(cfg, "joint", 2, 8, 224) == (2, 3, 1 + 196 * 8, 64)
    with pytest.raises(ValueError, match=r"choose from \['temporal', 'spatial', 'joint'\]"):
        attention_shape(cfg, "diagonal", 2, 8, 224)


def test_build_cases_selects_suites_and_skips_the_duplicate_sweep_point():
    cfg = RootConfig()
    cfg.model = load_preset("tiny")
    cfg.bench.suites = ["model", "scaling"]
    cfg.bench.frames = [4, 8]
    cases = build_cases(cfg, "tiny", ["space_only"], ["train", "infer"], torch.device("cpu"), (None, None))
    names = [c.name for c in cases]
    assert names == ["model/space_only/train/4x32", "model/space_only/infer/4x32", "scaling/space_only/train/8x32"]
    assert all(c.model.attention_type == "space_only" and c.model.depth == 2 for c in cases)
    assert cases[2].steps == cfg.bench.sweep_steps and cases[0].steps == cfg.bench.steps
    assert case_from_dict(json.loads(json.dumps(cases[2].to_dict()))) == cases[2]  # what the worker receives
    assert type(cases[0]).__name__ == "ModelCase" and cases[2].suite == "scaling"
    cfg.bench.suites = ["model", "nope"]
    with pytest.raises(ValueError, match=r"unknown bench suites \['nope'\]"):
        build_cases(cfg, "tiny", ["space_only"], ["train"], torch.device("cpu"), (None, None))


def test_resolve_layers_preset_overrides_and_flags_and_checks_them():
    cfg, preset, device = resolve(preset="tiny", overrides=["model.depth=3"], frames=[4, 8], suites=["scaling"],
                                  out_dir="/tmp/x")
    assert preset == "tiny" and cfg.bench.preset == "tiny" and device.type == "cpu"
    assert cfg.model.embed_dim == load_preset("tiny").embed_dim and cfg.model.depth == 3  # user over preset
    assert cfg.bench.frames == [4, 8] and cfg.bench.suites == ["scaling"] and cfg.bench.out_dir == "/tmp/x"
    with pytest.raises(ValueError, match=r"unknown bench suites \['nope'\]"):
        resolve(preset="tiny", suites=["nope"])
    with pytest.raises(ValueError, match="model.attention_type='diagonal'"):
        resolve(preset="tiny", overrides=["model.attention_type=diagonal"])
    with pytest.raises(ValueError, match=r"bench.frames=\[0\]: every value must be >= 1"):
        resolve(preset="tiny", frames=[0])  # not read as "the model's frames"
    with pytest.raises(ValueError, match=r"image sizes \[17\] .* not multiples of model.patch_size=8"):
        resolve(preset="tiny", img_sizes=[16, 17])  # the patch embedding would measure 16 px under a 17 px label
    # bench.preset given as an override picks the preset, as in a config file (it had been read from the file only)
    cfg, preset, _ = resolve(overrides=["bench.preset=tiny", "model.depth=3"])
    assert preset == "tiny" and cfg.model.embed_dim == load_preset("tiny").embed_dim and cfg.model.depth == 3


def test_frames_and_img_without_the_scaling_suite_are_refused_and_beside_it_noted(caplog):
    """--frames / --img (make bench FRAMES= IMG=) set the scaling suite's grid only: asked of the model suite alone
    they are refused (it would measure the model's frames under a request for 16); beside the scaling suite a log
    line says what the other suites measure."""
    import logging

    with pytest.raises(ValueError, match=r"^--frames 16 \(bench.frames\): the scaling suite's grid only, and --suites "
                                         r"model does not run it \(the model suite the model's 4 frames at 32 px\); add "
                                         r"scaling to --suites"):
        resolve(preset="tiny", frames=[16], suites=["model"])
    with pytest.raises(ValueError, match=r"^--img 64 \(bench.img_sizes\): the scaling suite's grid only"):
        resolve(preset="tiny", overrides=["bench.img_sizes=[64]"], suites=["model", "attention"])
    with pytest.raises(ValueError, match=r"does not run it \(the pipeline suite the data config's frames and crop "
                                         r"\(data.num_frames, data.train_crop_size\)\)"):  # not the model's
        resolve(preset="tiny", overrides=["bench.img_sizes=[64]"], suites=["pipeline"])
    caplog.set_level(logging.INFO)
    resolve(preset="tiny", frames=[16], suites=["model", "scaling"])
    assert "--frames 16 (bench.frames): the scaling suite's grid; the model suite(s) measure the model's 4 frames " \
           "at 32 px" in caplog.text


def test_an_output_folder_that_cannot_be_written_is_one_error_before_any_case(tmp_path, capsys):
    from timesformer_harness.bench.cli import main as bench_main

    afile = tmp_path / "afile"
    afile.write_text("")
    assert bench_main(["--preset", "tiny", "--suites", "model", "--out", str(afile / "runs")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: cannot write under {afile / 'runs'}: ")


def test_model_worker_counts_match_the_model_and_carry_provenance():
    rec = _run(_case("model", mode="train", seed=3))
    assert rec.status == "ok", rec.message
    model = create_model("tiny")
    assert rec.params == count_params(model) and rec.model == asdict(load_preset("tiny"))
    assert rec.flops_per_clip == count_flops(model.config, mode="train")
    assert len(rec.samples_s) == 2 and rec.step_ms["median"] == pytest.approx(1e3 * sum(rec.samples_s) / 2)
    assert rec.clips_per_s == pytest.approx(2 / (rec.step_ms["median"] / 1e3))
    assert rec.images_per_s == pytest.approx(rec.clips_per_s * 4)
    assert rec.achieved_flops == pytest.approx(rec.flops_per_clip * rec.clips_per_s)
    assert rec.utilisation == pytest.approx(rec.achieved_flops / 1e11)
    assert rec.env["torch"] == torch.__version__ and len(rec.env["git_sha"]) == 40
    assert rec.env["machine_class"].startswith("cpu: ") and isinstance(rec.env["git_dirty"], bool)
    assert rec.env["host"] and rec.env["command"]
    assert datetime.fromisoformat(rec.time).utcoffset() is not None and rec.seed == 3
    assert rec.extra["first_step_s"] > 0 and rec.extra["steady_state"] == "timed after 1 warm-up steps"
    assert rec.compile == "none" and "compile_s" not in rec.extra


def test_attention_worker_backends_agree_on_flops():
    recs = [_run(_case("attention", "joint_space_time", shape="joint", attn_backend=b, mode="train"))
            for b in ("auto", "naive")]
    assert all(r.status == "ok" for r in recs), [r.message for r in recs]
    nseq, H, L, hd = 2, 4, 1 + 16 * 4, 16
    assert recs[0].flops_per_clip == recs[1].flops_per_clip == 3 * 4 * nseq * H * L * L * hd // 2
    assert recs[0].extra["seq_len"] == L and [r.attn_backend for r in recs] == ["auto", "naive"]


def test_unknown_pinned_backend_is_an_error_record_with_the_traceback():
    rec = run_case(_case("attention", "space_only", shape="spatial", attn_backend="cudnn", mode="infer"),
                   timeout_s=120)
    assert rec.status == "error" and rec.message.startswith("RuntimeError")
    assert "kernels/attention.py" in rec.extra["traceback"] and rec.case == "attention/spatial/cudnn/infer"


def test_oom_case_is_recorded_and_reported_as_oom():
    """A case over the per-case address-space cap fails to allocate: status oom, not a crashed sweep."""
    case = _case("scaling", "joint_space_time", mode="infer", frames=256, mem_limit_gb=0.3,
                 model_changes={"attn_backend": "naive"})  # naive keeps the L x L matrix
    rec = run_case(case, timeout_s=120)
    assert rec.status == "oom", (rec.status, rec.message)
    assert "allocate" in rec.message and rec.case == "scaling/joint_space_time/infer/256x32"


def _bench_cli(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "timesformer_harness.bench", "--attn", "space_only", "--preset", "tiny", "--mode",
           "both", "--suites", "model,scaling", "--frames", "4,8", "--out", str(out), "bench.steps=2", "bench.warmup=1",
           "bench.sweep_steps=2", "bench.gemm_n=256", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def _case_workers(pid: int) -> list[int]:
    """The bench case processes (``timesformer_harness.runner``) whose parent is ``pid`` (from /proc), not its other
    children (``git`` for the environment record)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"timesformer_harness.runner" in cmdline:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_bench_kills_its_case_and_writes_what_it_measured(sig, tmp_path):
    """SIGTERM (timeout, a scheduler) or Ctrl-C while a case runs: the case's process (its own process group) is
    killed, not left running; the report of the cases before it is written (summary.md, results.json); one error line,
    exit 128 + the signal."""
    cmd = [sys.executable, "-m", "timesformer_harness.bench", "--attn", "space_only", "--preset", "tiny", "--mode",
           "train", "--suites", "model", "--out", str(tmp_path), "bench.steps=1000000", "bench.warmup=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        for _ in range(600):  # the case's worker: started once the peak GEMM and the FLOP counts are done
            workers = _case_workers(proc.pid)
            if workers:
                break
            time.sleep(0.1)
        assert workers, "no case process started"
        time.sleep(1.0)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    (run,) = tmp_path.iterdir()
    name = "SIGINT (Ctrl-C)" if sig == signal.SIGINT else "signal 15"
    assert err.strip().splitlines()[-1] == (f"error: stopped by {name} after 0 of 1 cases; what they measured is in "
                                            f"{run} (summary.md, results.json)")
    assert "Traceback" not in err and (run / "summary.md").is_file()
    assert read_results(run / "results.json")[1]["complete"] is False
    time.sleep(0.5)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


def test_bench_settings_out_of_range_are_refused_naming_the_key():
    for key, value in (("threads", -2), ("case_timeout_s", 0), ("warmup", -1), ("gemm_n", 0), ("mem_limit_gb", -1.0)):
        with pytest.raises(ValueError, match=rf"^command-line overrides: bench.{key}={value}; must be >= "):
            resolve(preset="tiny", overrides=[f"bench.{key}={value}"])


def test_a_failed_model_case_says_why_below_the_table():
    ok = BenchRecord(case="model/space_only/train/4x32", suite="model", attention_type="space_only", mode="train",
                     batch=2, status="ok", clips_per_s=3.0)
    bad = replace(ok, case="model/space_only/infer/4x32", mode="infer", status="error", clips_per_s=None,
                  message="RuntimeError: set_num_threads expects a positive integer")
    table = summary_table([ok, bad])
    assert "- model/space_only/infer/4x32: error: RuntimeError: set_num_threads expects a positive integer" in table


def test_throughput_vs_divided_is_gemm_normalised_where_both_records_time_a_gemm():
    """Joint ran while the machine's GEMM was twice as fast: 1.5x divided's raw clips/s, but its step costs 40 GEMMs
    to divided's 30 (the paired blocks), so 0.75x. Records without paired GEMMs (a GPU's table peak) keep the raw
    ratio, marked raw."""
    gemm = {"gemm_n": 1024, "gemm_ms": 10.0, "ratio": 1.0, "steps_per_block": 1, "calib_reps": 30}
    divided = BenchRecord(case="model/divided_space_time/train/8x224", suite="model", mode="train", batch=2,
                          attention_type="divided_space_time", clips_per_s=4.0, flops_per_clip=int(10e9),
                          achieved_flops=40e9, peak_flops=100e9, utilisation=0.4, peak_mem_bytes=2**20,
                          extra=dict(gemm))
    joint = replace(divided, case="model/joint_space_time/train/8x224", attention_type="joint_space_time",
                    clips_per_s=6.0, flops_per_clip=int(15e9), achieved_flops=90e9, peak_flops=200e9,
                    utilisation=0.45, extra={**gemm, "gemm_ms": 5.0, "ratio": 0.8, "calib_reps": 100,
                                             "steps_per_block": 2})
    rows = {line.split(" | ")[0]: line for line in summary_table([divided, joint]).splitlines()}
    assert rows["| joint_space_time"].endswith("| 0.75x | 1.00x |")
    assert rows["| divided_space_time"].endswith("| 1.00x | 1.00x |")
    on_gpu = [replace(r, device="cuda", extra={}) for r in (divided, joint)]
    rows = {line.split(" | ")[0]: line for line in summary_table(on_gpu).splitlines()}
    assert rows["| joint_space_time"].endswith("| 1.50x raw | 1.00x |")
    unpaired = replace(joint, extra={"gemm_n": 1024})  # no paired blocks: raw
    rows = {line.split(" | ")[0]: line for line in summary_table([divided, unpaired]).splitlines()}
    assert rows["| joint_space_time"].endswith("| 1.50x raw | 1.00x |")
    # a utilisation above 100%: the GEMMs beside the steps were slowed more than the steps, so their pairs are not
    # read either
    contended = replace(joint, utilisation=None, extra={**joint.extra, "implausible_utilisation": 1.2})
    rows = {line.split(" | ")[0]: line for line in summary_table([divided, contended]).splitlines()}
    assert rows["| joint_space_time"].endswith("| 1.50x raw | 1.00x |")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Two real tiny-preset bench runs of the same tree (model and scaling suites), and the first one's process."""
    root = tmp_path_factory.mktemp("bench")
    first = _bench_cli(root / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    second = _bench_cli(root / "b")
    assert second.returncode == 0, second.stderr[-2000:]
    (a,) = (root / "a").iterdir()
    (b,) = (root / "b").iterdir()
    return a, b, first


def test_bench_cli_writes_results_summary_plots_and_config(two_runs):
    run, _, proc = two_runs
    assert run.name.endswith("-space_only")
    records, meta = read_results(run / "results.json")
    assert [r.case for r in records] == ["model/space_only/train/4x32", "model/space_only/infer/4x32",
                                         "scaling/space_only/train/8x32"]
    assert all(r.status == "ok" and r.peak_mem_bytes > 0 and r.peak_mem_kind == "rss" for r in records)
    assert records[2].flops_per_clip == count_flops(
        replace(load_preset("tiny"), attention_type="space_only"), frames=8, mode="train")
    assert meta["peak_flops_source"].startswith("measured fp32 GEMM n=256")
    assert meta["complete"] is True and meta["cases_planned"] == 3
    assert "| space_only | train |" in (run / "summary.md").read_text()
    config = (run / "config.yaml").read_text()  # the flags too: --attn and --mode are not in the config's keys
    assert "model:" in config and config.startswith("# measured with --attn space_only --mode both")
    assert (run / "scaling_train_32.png").stat().st_size > 1000
    assert "| space_only | infer |" in proc.stdout  # the table printed at the end
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["case"] for r in rows] == [r.case for r in records] and rows[0]["step_ms.ci_high"] > 0
    header = (run / "results.csv").read_text().splitlines()[0].split(",")
    assert {"case", "images_per_s", "step_ms.median", "step_ms.ci_low", "env.git_sha", "model.depth"} <= set(header)
    assert list((run / "tb").glob("events.out.tfevents.*"))


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "timesformer_harness.bench", "compare", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120)


def test_compare_two_real_runs_prints_ratios_and_writes_a_plot(two_runs, tmp_path):
    a, b, _ = two_runs
    proc = _compare(str(a), str(b / "results.json"), "--out", str(tmp_path / "cmp"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "3/3 cases like for like" in proc.stdout and "warning" not in proc.stdout
    ra, _ = read_results(a / "results.json")
    rb, _ = read_results(b / "results.json")
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    for row, x, y in zip(data["cases"], ra, rb):
        assert row["case"] == x.case == y.case
        assert row["images_ratio"] == pytest.approx(y.images_per_s / x.images_per_s)
        if x.utilisation is None or y.utilisation is None:  # above 100% on a contended machine: not reported
            assert row["util_ratio"] is None and row["peak_ratio"] is None
        else:
            assert row["util_ratio"] == pytest.approx(y.utilisation / x.utilisation)
            # utilisation = images/s x FLOPs per image / GEMM peak: the two ratios differ by the peaks' ratio
            assert row["peak_ratio"] == pytest.approx(y.peak_flops / x.peak_flops)
        assert f"| {x.case} | {x.images_per_s:.1f} | {y.images_per_s:.1f} | {y.images_per_s / x.images_per_s:.2f}x" \
            in proc.stdout
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert "| case |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_a_model_key_a_record_lacks_is_its_default_when_compared():
    """A record written before a model key existed (the committed gate baseline, say) ran with that key's default:
    compared with one that sets the default it is like for like, with one that sets another value it is not."""
    from timesformer_harness.bench.compare import differences
    from timesformer_harness.bench.record import BenchRecord

    model = asdict(load_preset("tiny"))
    old = BenchRecord("model", "model/x", model={k: v for k, v in model.items() if k != "temporal_attn_backend"})
    assert differences(old, BenchRecord("model", "model/x", model=model)) == []
    naive = BenchRecord("model", "model/x", model={**model, "temporal_attn_backend": "naive"})
    assert differences(old, naive) == ["model temporal_attn_backend 'same' vs 'naive'"]


def test_compare_refuses_what_is_not_like_for_like_and_gates_on_a_ratio(two_runs, tmp_path):
    a, b, _ = two_runs
    data = json.loads((b / "results.json").read_text())

    def variant(name: str, change) -> Path:
        d = json.loads(json.dumps(data))
        change(d)
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps(d))
        return path

    other_preset = variant("preset", lambda d: d["meta"].update(preset="cpu_bench"))
    refused = _compare(str(a), str(other_preset), "--out", str(tmp_path / "o1"))
    assert refused.returncode == 2 and "preset 'tiny' vs 'cpu_bench'" in refused.stdout
    assert "refusing" in refused.stdout and not (tmp_path / "o1").exists()
    forced = _compare(str(a), str(other_preset), "--force", "--out", str(tmp_path / "o2"))
    assert forced.returncode == 0 and "NOT COMPARABLE" in (tmp_path / "o2" / "compare.md").read_text()

    def deeper(d):  # the same case names, another model: one block more
        for r in d["records"]:
            r["model"]["depth"] += 1
            r["params"] += 1000
    other_model = _compare(str(a), str(variant("model", deeper)), "--out", str(tmp_path / "o5"))
    assert other_model.returncode == 2 and "model/space_only/train/4x32: another model (model depth 2 vs 3; " \
        "params" in other_model.stdout

    def all_batch_4(d):
        for r in d["records"]:
            r["batch"] = 4
    none_alike = _compare(str(a), str(variant("none", all_batch_4)), "--out", str(tmp_path / "o6"))
    assert none_alike.returncode == 2 and "no case is like for like in both runs" in none_alike.stdout

    for bad in (0, SCHEMA_VERSION + 1):
        out = _compare(str(a), str(variant(f"schema{bad}", lambda d, v=bad: d.update(schema_version=v))))
        assert out.returncode == 2 and f"schema_version={bad}" in out.stdout

    def schema_1(d):  # as the previous harness wrote it
        d["schema_version"] = 1
        for r in d["records"]:
            for key in ("model", "samples_s", "attn_backend", "loader", "time", "seed"):
                r.pop(key)
            r.update(schema_version=1, backend=None, peak_mem_kind="rss_fresh_process")
    old = _compare(str(a), str(variant("v1", schema_1)), "--out", str(tmp_path / "o7"))
    assert old.returncode == 0 and "3/3 cases like for like" in old.stdout

    def batch_4(d):
        d["meta"]["batch"] = 4
        d["records"][0]["batch"] = 4

    stopped = variant("stopped", lambda d: (d["meta"].update(complete=False), d["records"].pop()))
    out = _compare(str(a), str(stopped), "--out", str(tmp_path / "o4"))
    assert out.returncode == 0 and f"warning: B ({stopped}) is incomplete: 2 of 3 cases (the sweep was stopped)" \
        in out.stdout

    def threads_4(d):  # the cases' own processes ran with another thread count (the parent's is the same)
        for r in d["records"]:
            r["env"]["cpu_threads"] = 4
    batch_and_threads = variant("batch", lambda d: (batch_4(d), threads_4(d)))
    warned = _compare(str(a), str(batch_and_threads), "--out", str(tmp_path / "o3"))
    assert warned.returncode == 0 and "warning: the runs differ in batch 2 vs 4" in warned.stdout
    assert "warning: the runs differ in cpu_threads" in warned.stdout and "vs 4" in warned.stdout
    assert "2/3 cases like for like" in warned.stdout and "batch 2 vs 4 |" in warned.stdout
    other_gemm = variant("gemm", lambda d: [r["extra"].update(gemm_n=384) for r in d["records"]])
    warned = _compare(str(a), str(other_gemm), "--out", str(tmp_path / "o10"))  # utilisation against another peak
    assert warned.returncode == 0 and "reference GEMM n=256 vs n=384: utilisation" in warned.stdout
    broken = variant("broken", lambda d: d.update(records=[{"case": "x"}]))
    out = _compare(str(a), str(broken))
    assert out.returncode == 2 and f"not comparable: {broken}: record 0 is not a bench record" in out.stdout

    # --fail-below: exit 1 naming each like-for-like case whose normalised ratio is under the bar
    assert _compare(str(a), str(b), "--fail-below", "0.01", "--out", str(tmp_path / "o8")).returncode == 0
    failing = _compare(str(a), str(b), "--fail-below", "100", "--out", str(tmp_path / "o9"))
    assert failing.returncode == 1 and "3 case(s) below 100x" in failing.stdout
    assert json.loads((tmp_path / "o9" / "compare.json").read_text())["below"] == [
        "model/space_only/train/4x32", "model/space_only/infer/4x32", "scaling/space_only/train/8x32"]
    # a case that ran in A and did not in B (out of memory, or missing) fails --fail-below: it is no like-for-like
    # case, and a gate that passed it would pass a change that breaks the case
    def lost_two(d):
        d["records"][0].update(status="oom", images_per_s=None, utilisation=None)
        d["records"].pop()
    lost_run = variant("lost", lost_two)
    lost = _compare(str(a), str(lost_run), "--fail-below", "0.01", "--out", str(tmp_path / "o10"))
    assert lost.returncode == 1, lost.stdout
    assert "LOST model/space_only/train/4x32: ok in A, oom in B" in lost.stdout
    assert "LOST scaling/space_only/train/8x32: ok in A, missing in B" in lost.stdout
    assert _compare(str(a), str(lost_run), "--out", str(tmp_path / "o11")).returncode == 0
    # every case lost (all out of memory in B): a verdict, LOST each, not a refusal to compare
    all_lost = variant("all_lost", lambda d: [r.update(status="oom", images_per_s=None, utilisation=None)
                                              for r in d["records"]])
    lost = _compare(str(a), str(all_lost), "--fail-below", "0.01", "--out", str(tmp_path / "o13"))
    assert lost.returncode == 1 and lost.stdout.count("LOST ") == 3, lost.stdout

    # a utilisation above 100% (a calibration GEMM slowed more than the steps) is not compared, nor the pairs it came
    # from: images/s is (an old record's above-100% figure, and one the bench set aside)
    def inflated(d):
        d["records"][0]["utilisation"] = 2.18
        d["records"][1]["extra"]["implausible_utilisation"], d["records"][1]["utilisation"] = 1.2, None
    odd = _compare(str(a), str(variant("odd", inflated)), "--out", str(tmp_path / "o12"))
    cases = json.loads((tmp_path / "o12" / "compare.json").read_text())["cases"]
    for case in cases[:2]:
        assert case["util_b"] is None and case["paired_ratio"] is None
        assert case["normalised_ratio"] == pytest.approx(case["images_ratio"])
    assert cases[2]["paired_ratio"] and cases[2]["normalised_ratio"] == cases[2]["paired_ratio"]
    assert "B's utilisation 218% is above 100% (the GEMM timed beside its steps was slowed more than they were): " \
        "images/s compared" in odd.stdout and "B's utilisation 120% is above 100%" in odd.stdout


def test_compare_reads_the_paired_ratio_which_a_machine_busy_during_a_case_does_not_move(two_runs, tmp_path):
    """The normalised ratio is the steps' time over the GEMM's, timed in pairs (the gate's and the summary's measure):
    a B whose machine was busy during part of each case (half the images/s; the median GEMM slowed less than the
    median step, so utilisation fell too) but whose pairs kept their ratio reads 1.00x and passes --fail-below; a B
    whose steps took 25% longer than the GEMMs beside them reads 0.80x and fails; against another GEMM there is no
    paired ratio and utilisation is read."""
    a, b, _ = two_runs
    data = json.loads((a / "results.json").read_text())
    paired = [r["case"] for r in data["records"] if r["extra"].get("ratio")]
    assert paired, "the bench's CPU cases time their steps and GEMMs in pairs"

    def variant(name: str, change) -> Path:
        d = json.loads(json.dumps(data))
        for r in d["records"]:
            change(r)
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps(d))
        return path

    def busy(r):
        r["images_per_s"] /= 2
        r["clips_per_s"] /= 2
        r["utilisation"] /= 1.6

    out = _compare(str(a), str(variant("busy", busy)), "--fail-below", "0.9", "--out", str(tmp_path / "o1"))
    cases = {c["case"]: c for c in json.loads((tmp_path / "o1" / "compare.json").read_text())["cases"]}
    assert out.returncode == 0, out.stdout
    for name in paired:
        assert cases[name]["paired_ratio"] == pytest.approx(1.0) and cases[name]["normalised_ratio"] == \
            pytest.approx(1.0)
        assert cases[name]["util_ratio"] == pytest.approx(0.625) and cases[name]["images_ratio"] == pytest.approx(0.5)
    assert "medians B/A: normalised 1.00x, paired 1.00x, utilisation 0.62x, images/s 0.50x" in out.stdout
    assert "warning: the machine ran its reference GEMM 0.80x as fast in B as in A (median peak B/A)" in out.stdout

    def slower(r):
        r["extra"]["ratio"] *= 1.25

    out = _compare(str(a), str(variant("slower", slower)), "--fail-below", "0.9", "--out", str(tmp_path / "o2"))
    assert out.returncode == 1 and f"{len(paired)} case(s) below 0.9x" in out.stdout
    assert "reference GEMM" not in out.stdout  # the same machine: only the steps took longer
    assert f"BELOW {paired[0]}: 0.80x" in out.stdout

    def other_gemm(r):
        busy(r)
        r["extra"]["gemm_n"] = 384

    out = _compare(str(a), str(variant("gemm", other_gemm)), "--out", str(tmp_path / "o3"))
    cases = {c["case"]: c for c in json.loads((tmp_path / "o3" / "compare.json").read_text())["cases"]}
    assert out.returncode == 0 and all(cases[n]["paired_ratio"] is None for n in paired)
    assert all(cases[n]["normalised_ratio"] == pytest.approx(0.625) for n in paired)


def _made_run(path: Path, images: list[float | str | None], statuses: list[str] | None = None,
              meta: dict | None = None, name: str = "results.json") -> Path:
    """A run folder holding fabricated model-suite records (one per images/s figure), without measuring."""
    statuses = statuses or ["ok"] * len(images)
    records = [BenchRecord(suite="model", case=f"model/space_only/train/4x{32 + 8 * i}", preset="tiny", batch=2,
                           frames=4, img_size=32 + 8 * i, mode="train", params=10, flops_per_clip=1000,
                           peak_mem_bytes=2**20, status=status, images_per_s=ips)
               for i, (ips, status) in enumerate(zip(images, statuses))]
    path.mkdir(parents=True)
    write_results(path / name, records, {"preset": "tiny", **(meta or {})})
    return path


def _compare_here(capsys, *args: str) -> tuple[int, str]:
    """bench compare in this process (no interpreter to start): its exit status and what it printed."""
    from timesformer_harness.bench.compare import main

    status = main(list(args))
    return status, capsys.readouterr().out


def test_a_figure_that_is_not_a_finite_number_is_refused_naming_the_file_and_case(tmp_path, capsys):
    """NaN would pass --fail-below (nan < R is false) and "fast" was a traceback (exit 1): both refuse the file,
    as the gate refuses a baseline whose ratio is not a finite positive number."""
    from timesformer_harness.bench.compare import CaseComparison

    a = _made_run(tmp_path / "a", [100.0, 100.0])
    for name, figure, says in (("nan", float("nan"), "images_per_s is nan, not a finite number"),
                               ("inf", float("inf"), "images_per_s is inf, not a finite number"),
                               ("fast", "fast", "images_per_s is 'fast', not a number")):
        b = _made_run(tmp_path / name, [100.0, figure])
        with pytest.raises(ValueError, match=f"record 1 \\(model/space_only/train/4x40\\): {says}"):
            read_results(b / "results.json")
        status, out = _compare_here(capsys, str(a), str(b), "--fail-below", "0.9", "--out", str(tmp_path / "o"))
        assert status == 2 and out == f"not comparable: {b / 'results.json'}: record 1 " \
            f"(model/space_only/train/4x40): {says}: a damaged results file\n"
    # a case that did not run keeps no figure that counts: NaN there is no damage
    _made_run(tmp_path / "oom", [100.0, float("nan")], ["ok", "oom"])
    assert read_results(tmp_path / "oom" / "results.json")[0][1].status == "oom"
    # and a ratio is only ever of two finite positive numbers
    row = CaseComparison("c", "ok", "ok", images_a=100.0, images_b=float("nan"), util_a=0.1, util_b=float("inf"))
    assert row.images_ratio is None and row.util_ratio is None and row.normalised_ratio is None


def test_compare_png_draws_bars_from_1x_and_marks_lost_cases(tmp_path):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from timesformer_harness.bench.compare import CaseComparison, comparison_figure, plot_comparison

    rows = [CaseComparison("faster", "ok", "ok", images_a=10.0, images_b=15.0, util_a=0.1, util_b=0.14),
            CaseComparison("slower", "ok", "ok", images_a=10.0, images_b=5.0),
            CaseComparison("oom", "ok", "oom"), CaseComparison("gone", "ok", None, notes=["only in A"])]
    fig = comparison_figure(rows, "b / a")
    (ax,) = fig.axes
    bars = sorted(((p.get_y() + p.get_height() / 2, p.get_x(), p.get_x() + p.get_width())
                   for p in ax.patches if isinstance(p, Rectangle)), key=lambda b: (b[0], b[2]))
    # each bar runs from 1x to its ratio: B slower is a bar left of the 1x line, not a shorter bar from the edge
    assert bars == [pytest.approx((-0.2, 1.0, 1.4)), pytest.approx((0.2, 1.0, 1.5)), pytest.approx((1.2, 1.0, 0.5))]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["faster", "slower", "oom *", "gone *"]
    (cross,) = [line for line in ax.lines if line.get_marker() == "X"]
    assert isinstance(cross, Line2D) and list(cross.get_xdata()) == [1.0, 1.0] and list(cross.get_ydata()) == [2, 3]
    assert [t.get_text() for t in ax.texts] == ["LOST: oom in B", "LOST: missing in B"]
    assert ax.get_xlim()[0] < 0.5 < 1.5 < ax.get_xlim()[1]
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert plot_comparison(rows[2:], tmp_path / "compare.png", "only lost").stat().st_size > 1000


def test_comparing_with_an_empty_or_stopped_run_says_so(tmp_path, capsys):
    from timesformer_harness.bench.compare import check_comparable, load_run

    a = _made_run(tmp_path / "a", [100.0, 100.0])
    empty = _made_run(tmp_path / "empty", [], meta={"complete": False, "cases_planned": 2})
    status, out = _compare_here(capsys, str(a), str(empty), "--out", str(tmp_path / "o"))
    assert status == 2 and out == f"not comparable: B ({empty / 'results.json'}) has no measured cases (stopped " \
        "after 0 of 2 cases)\n"
    status, out = _compare_here(capsys, str(empty), str(a), "--force", "--out", str(tmp_path / "o"))
    assert status == 2 and out.startswith(f"not comparable: A ({empty / 'results.json'}) has no measured cases")
    stopped = _made_run(tmp_path / "stopped", [100.0], meta={"complete": False, "cases_planned": 2})
    refuse, warn = check_comparable(load_run(a), load_run(stopped))
    assert refuse == [] and warn == [f"B ({stopped / 'results.json'}) is incomplete: 1 of 2 cases (the sweep was "
                                     "stopped)"]
    status, out = _compare_here(capsys, str(a), str(stopped), "--out", str(tmp_path / "o"))
    assert status == 0 and f"warning: B ({stopped / 'results.json'}) is incomplete" in out
    assert "the runs differ in B" not in out


def test_a_stopped_runs_summary_says_so_at_its_top(tmp_path):
    from timesformer_harness.bench.report import write_summary

    rec = BenchRecord(suite="model", case="model/space_only/train/4x32", attention_type="space_only", mode="train")
    write_summary(tmp_path / "summary.md", [rec], {"complete": False, "cases_planned": 3})
    head = (tmp_path / "summary.md").read_text().splitlines()[:3]
    assert head[2] == "**Incomplete: the run was stopped after 1 of 3 cases**; the tables hold the cases measured " \
        "before it stopped."
    write_summary(tmp_path / "whole.md", [rec], {"complete": True, "cases_planned": 1})
    assert "Incomplete" not in (tmp_path / "whole.md").read_text()


def test_a_json_file_that_is_not_a_results_file_says_what_it_is(tmp_path, capsys):
    from timesformer_harness.bench.record import NotResultsFile

    a = _made_run(tmp_path / "a", [100.0])
    verdict = tmp_path / "verdict.json"
    verdict.write_text(json.dumps({"passed": True, "exit_status": 0, "cases": 1, "regressed": []}))
    prepare = tmp_path / "prepare.json"
    prepare.write_text(json.dumps({"videos": 8, "variants": [], "shootout": []}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    for path, looks in ((verdict, ": it looks like a gate's verdict.json"), (prepare, ": it looks like a loader "
                        "shoot-out's output"), (other, "")):
        with pytest.raises(NotResultsFile) as e:
            read_results(path)
        assert str(e.value).startswith(f"{path}: not a bench results file (no schema_version, meta or records)"
                                       f"{looks}")
        status, out = _compare_here(capsys, str(a), str(path))
        assert status == 2 and "schema_version" not in out.replace("no schema_version", "") and out.count("\n") == 1
        assert out.rstrip().endswith("give a runs/bench/<stamp>-<attn> folder or its results.json, a gate run's "
                                     "runs/gate/<stamp> folder or its candidate.json, or a gate baseline"), out


def test_compare_reads_a_gate_run_folder(tmp_path, capsys):
    """A gate run writes candidate.json, not results.json: its folder is compared as a bench run's is."""
    from timesformer_harness.bench.compare import load_run

    base = _made_run(tmp_path / "base", [100.0, 100.0], meta={"kind": "gate-baseline"}, name="baseline.json")
    gate_run = _made_run(tmp_path / "gate" / "20270101-000000", [100.0, 90.0], meta={"kind": "gate-candidate"},
                         name="candidate.json")
    run = load_run(gate_run)
    assert run.path == gate_run / "candidate.json" and run.name == "20270101-000000" and len(run.records) == 2
    status, out = _compare_here(capsys, str(base / "baseline.json"), str(gate_run), "--fail-below", "0.95",
                                "--out", str(tmp_path / "o"))
    assert status == 1 and "BELOW model/space_only/train/4x40: 0.90x" in out
    with pytest.raises(FileNotFoundError, match="no results.json or candidate.json \\(give a runs/bench/"):
        load_run(tmp_path / "gate")


def test_a_utilisation_above_100_percent_is_not_reported():
    """The peak a utilisation divides by can be slowed more than the steps (a contended CPU slowing the GEMM timed
    beside them): a utilisation above 1 is kept aside, and the summary says why the column is empty."""
    from timesformer_harness.bench.record import fill_throughput
    from timesformer_harness.bench.report import summary_table

    rec = BenchRecord(suite="model", case="model/joint_space_time/train/8x224", attention_type="joint_space_time",
                      mode="train", batch=2, flops_per_clip=int(10e9), peak_flops=6.6e9,
                      peak_flops_source="fp32 GEMM n=1024 interleaved with the steps")
    fill_throughput(rec, [1.4, 1.39, 1.41], clips_per_step=2, frames=8)
    assert rec.utilisation is None and rec.extra["implausible_utilisation"] == pytest.approx(20e9 / 1.4 / 6.6e9)
    assert rec.images_per_s == pytest.approx(16 / 1.4)
    table = summary_table([rec])
    assert "- model/joint_space_time/train/8x224: 216% of 6.6 GFLOP/s (fp32 GEMM n=1024" in table
    rec2 = BenchRecord(suite="pipeline", case="pipeline/dali", flops_per_clip=None)
    fill_throughput(rec2, [1.0, 2.0, 1.0], clips_per_step=4, frames=8, clips=10)  # the last batch short
    assert rec2.clips_per_s == pytest.approx(10 / 4.0) and rec2.step_ms["median"] == pytest.approx(1000)


def test_a_stopped_sweep_keeps_the_cases_it_measured(tmp_path, monkeypatch):
    """results.json is rewritten after every case: a sweep killed in its second case keeps the first."""
    import timesformer_harness.bench.cli as cli

    measured = _run(_case("model", "space_only"))

    def run_case(case, timeout_s):
        if case.mode == "infer":
            raise KeyboardInterrupt  # the sweep is stopped while the second case runs
        return replace(measured, case=case.name)

    monkeypatch.setattr(cli, "run_case", run_case)
    cfg, preset, device = resolve(preset="tiny", suites=["model"], out_dir=str(tmp_path))
    with pytest.raises(cli.BenchStopped) as stopped:
        cli.run(cfg, preset, device, "space_only", ["space_only"], ["train", "infer"])
    (run,) = tmp_path.iterdir()
    assert stopped.value.code == 130 and stopped.value.out == run
    records, meta = read_results(run / "results.json")
    assert [r.case for r in records] == ["model/space_only/train/4x32"]
    assert meta["complete"] is False and meta["cases_planned"] == 2
    assert "| space_only | train |" in (run / "summary.md").read_text()  # the report of what was measured


def test_suites_that_measure_one_mode_say_so_and_the_run_claims_only_what_it_measured(tmp_path, monkeypatch,
                                                                                       caplog):
    """--mode both with the scaling and attention suites alone measures train only: a log line says so, and
    results.json's meta.modes and config.yaml's first line do not claim inference cases."""
    import logging

    from timesformer_harness.bench import cli

    def fake_run_case(case, timeout_s):  # what was planned is the point here, not what it measures
        rec = case.record(torch.device("cpu"))
        rec.status, rec.message = "skipped", "not run by this test"
        return rec

    monkeypatch.setattr(cli, "run_case", fake_run_case)
    caplog.set_level(logging.INFO)
    cfg, preset, device = resolve(preset="tiny", suites=["attention", "scaling"], out_dir=str(tmp_path))
    _, records = cli.run(cfg, preset, device, "space_only", ["space_only"], ["train", "infer"])
    assert records and {r.mode for r in records} == {"train"}
    for suite in ("attention", "scaling"):
        assert f"the {suite} suite measures one mode, train (of train and infer asked for)" in caplog.text
    (run,) = tmp_path.iterdir()
    assert read_results(run / "results.json")[1]["modes"] == ["train"]
    assert (run / "config.yaml").read_text().startswith(
        "# measured with --attn space_only --mode both (its cases measure train): give them again with --config")


def test_bench_cli_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "timesformer_harness.bench", "--attn", "diagonal"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode != 0 and "choose from" in proc.stderr


def test_a_bench_whose_cases_failed_exits_1(tmp_path):
    """A case that errors (here: timed out at 1 s) is in the table and results.json, and the exit status says so:
    a script or CI job running make bench sees it failed."""
    proc = subprocess.run([sys.executable, "-m", "timesformer_harness.bench", "--preset", "tiny", "--attn",
                           "space_only", "--mode", "train", "--suites", "model", "--out", str(tmp_path),
                           "bench.case_timeout_s=1"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 1 and "error: 1 case(s) failed and 0 of 1 measured" in proc.stderr, proc.stderr[-2000:]
    (results,) = tmp_path.glob("*/results.json")
    assert [r["status"] for r in json.loads(results.read_text())["records"]] == ["error"]


def test_a_case_in_a_fresh_process_reports_its_own_peak_rss_growth():
    """The case's peak RSS growth is its own even when the process that starts it is big: ``ru_maxrss`` carries the
    parent's peak across fork + exec, and read 0 growth for a case started from a pytest worker."""
    ballast = torch.ones(2**30 // 4)  # 1 GiB, touched: this process's peak
    rec = run_case(_case("model", mode="train"), timeout_s=300)
    assert rec.status == "ok", rec.message
    assert rec.peak_mem_kind == "rss" and 0 < rec.peak_mem_bytes < ballast.numel() * 4, rec.peak_mem_bytes
    assert rec.env["command"] == shlex.join(sys.orig_argv)  # the command that started it, not the runner's


def test_shootout_reports_an_outside_decoder_that_fails_and_goes_on():
    """An anchor (torchcodec, decord) that raises on the files gets its row's note and no rate; one of our loaders
    that raises stops the shoot-out, in the calling process or in the row's own."""
    from timesformer_harness.bench.pipeline import Contender, RowFailed, run_shootout
    from timesformer_harness.pipelines.config import DataConfig

    def broken() -> int:
        raise RuntimeError("Check failed: from_size == to_size\nmore")

    ours = Contender("DALI loader", "v", "full", "1 thread", lambda: 4, lambda: (4.0, "counted"))
    rows = run_shootout([ours, Contender("decord", "v", "decode", "1 thread", broken, anchor=True)], rounds=2)
    assert rows[0].clips_per_s > 0 and len(rows[0].rounds) == 2
    assert rows[1].clips_per_s is None and rows[1].note == "failed on these files: RuntimeError: Check failed: " \
                                                            "from_size == to_size"
    with pytest.raises(RuntimeError, match="from_size"):
        run_shootout([Contender("DALI loader", "v", "full", "1 thread", broken)], rounds=1)
    # a row with a recipe is rebuilt in a process of its own: one that cannot be built there stops the shoot-out
    missing = DataConfig(train_manifest="/nonexistent/train.csv")
    with pytest.raises(RowFailed, match="could not build the row: FileNotFoundError: manifest /nonexistent"):
        run_shootout([Contender("DALI loader", "v", "full", "1 thread", broken,
                                recipe=(dict(cfg=missing, variant="v"), 0))], rounds=1)


def test_the_data_suites_read_their_config_and_paths_from_the_current_folder(tmp_path, monkeypatch):
    """bench.data_config and the paths in it are read as a run started in the current folder reads them (a case runs
    in the harness's folder); a config that is not there is an error naming the key, not the toy set instead."""
    from timesformer_harness.bench.pipeline import data_config_path, data_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    (tmp_path / "my.yaml").write_text("data:\n  root: mydata\n  val_manifest: lists/val.csv\n")
    cfg, _, _ = resolve(preset="tiny", suites=["pipeline"], overrides=["bench.data_config=my.yaml"])
    assert data_config_path(cfg) == str(tmp_path / "my.yaml")
    assert data_paths(load_config(tmp_path / "my.yaml").data) == {"root": str(tmp_path / "mydata"),
                                                     "val_manifest": str(tmp_path / "lists/val.csv")}
    shipped, _, _ = resolve(preset="tiny", suites=["e2e"])  # the default: the harness's own toy recipe and data/toy
    assert data_config_path(shipped) == str(REPO_ROOT / "configs/exp/toy_divided_cpu.yaml")
    assert data_paths(load_config(data_config_path(shipped)).data)["root"] == str(REPO_ROOT / "data/toy")
    with pytest.raises(ValueError, match=r"^bench.data_config=nope.yaml: no such file \(a relative path is read from "
                                         rf"the current folder, {tmp_path}, then from {REPO_ROOT}\)"):
        resolve(preset="tiny", suites=["pipeline"], overrides=["bench.data_config=nope.yaml"])


def test_pipeline_and_e2e_suites_on_toy_data(tmp_path):
    """DALI and PyAV clips/s on the toy data with frames decoded per clip (counted = decoder model), and the e2e
    verdict."""
    data = tmp_path / "toy"
    subprocess.run([sys.executable, "-m", "timesformer_harness.pipelines.tools.toy", "--out", str(data)], check=True,
                   cwd=REPO_ROOT, timeout=300, capture_output=True)
    cfg_path = tmp_path / "data.yaml"
    cfg_path.write_text(f"data:\n  root: {data}\n  num_frames: 4\n  train_crop_size: 32\n"
                        f"  train_jitter_scales: [32, 40]\n")
    recs = [_run(_case("pipeline", loader=b, data_config=str(cfg_path), batches=2)) for b in ("pyav", "dali")]
    for r in recs:
        assert r.status == "ok", (r.case, r.message)
        assert r.clips_per_s > 0 and r.frames == 4 and r.img_size == 32
        decoded = r.extra["decoded_frames"]
        assert decoded["delivered_frames"] == 4 and decoded["clips"] == 16
        assert decoded["counted_per_clip"] == pytest.approx(decoded["model_per_clip"])
        assert 4 <= decoded["counted_per_clip"] <= decoded["seek_model_per_clip"] <= 24  # a 24-frame video
        assert r.peak_mem_kind == "rss" and "RSS growth" in r.extra["peak_mem_covers"]
        assert len(r.samples_s) == 2 and r.loader in ("pyav", "dali")
    assert [r.extra["decoded_frames"]["strategy"] for r in recs] == ["keyframe", "keyframe"]
    assert recs[0].extra["peak_mem_covers"] == "RSS growth of the bench process; outside it: its DataLoader worker " \
                                               "processes"
    assert recs[1].extra["peak_mem_covers"] == "RSS growth of the bench process, the dali loader's buffers included"
    shootout = _run(_case("pipeline", loader="shootout", data_config=str(cfg_path), batches=2))
    assert shootout.status == "ok", shootout.message
    rows = {(r["name"], r["graph"]): r for r in shootout.extra["shootout"]}
    assert {("DALI loader", "full"), ("DALI loader", "decode"), ("PyAV loader", "full"), ("torchcodec", "decode"),
            ("decord", "decode")} <= set(rows)
    for key in [("DALI loader", "full"), ("DALI loader", "decode"), ("PyAV loader", "full")]:
        row = rows[key]
        assert row["clips_per_s"] > 0 and len(row["rounds"]) == 3 and row["cpu_ms_per_clip"] > 0
        assert row["decoded_how"] == "counted" and 4 <= row["decoded_per_clip"] <= 24
        # growth in the row's own process over its start: not the ~300 MiB torch and the harness take to import
        assert 0 < row["peak_rss_growth_mib"] < 250
    for name in ("torchcodec", "decord"):  # optional anchors: measured, or the row says why not
        row = rows[(name, "decode")]
        assert (row["clips_per_s"] or 0) > 0 or row["note"].startswith(("not importable: ",
                                                                        "failed on these files: ")), row
        assert row["decoded_how"] == "model: keyframe"
    assert shootout.clips_per_s == pytest.approx(rows[("DALI loader", "full")]["clips_per_s"], rel=1e-3)
    assert shootout.step_ms["median"] > 0 and len(shootout.samples_s) == 3  # ms per batch in each round
    assert shootout.peak_mem_kind == "rss" and "each row in a fresh process" in \
        shootout.extra["peak_mem_covers"] and shootout.peak_mem_bytes > 0
    from timesformer_harness.bench.report import summary_table

    table = summary_table([shootout])
    assert "## Loader shoot-out" in table and "| DALI loader | toy | full |" in table
    assert "| pipeline/shootout | ok |" in table and "| ok | ok |" not in table  # a step time, not the status
    # Threshold 0: any wait for data at all makes the verdict input-bound, and there is always some.
    # in a fresh process, as the bench runs it: its peak RSS growth is the case's own (in this process, earlier
    # tests' peak would hide it)
    e2e = run_case(_case("e2e", mode="train", data_config=str(cfg_path), batches=2, threshold=0.0), timeout_s=300)
    assert e2e.status == "ok", e2e.message
    x = e2e.extra
    assert 0.0 < x["data_wait_share"] < 1.0 and x["data_wait_share"] == pytest.approx(x["data_wait_s"] / x["step_s"])
    assert x["input_bound"] and x["verdict"].startswith("input-bound (data wait")
    assert e2e.frames == 4 and e2e.img_size == 32 and e2e.images_per_s == pytest.approx(4 * e2e.clips_per_s)
    assert x["loader"] == "dali" and x["decode"] == "cpu" and "device_used_max_bytes" not in x
    assert x["peak_mem_covers"] == ("peak RSS growth of the worker process: model, optimizer state, activations, "
                                    "batches, the dali loader's buffers included") and e2e.peak_mem_bytes > 0
    # the Trainer's window arithmetic: clips over the steps' whole time
    assert e2e.clips_per_s == pytest.approx(2 * e2e.batch / x["step_s"]) and len(e2e.samples_s) == 2


def test_an_e2e_case_on_its_data_configs_model_is_named_by_that_file():
    """The e2e suite measures the model its data config sets (the toy recipe's), not the bench preset's: the record
    names the file's model (it had named the preset, --preset tiny over a toy.yaml model)."""
    cfg = resolve(preset="tiny", suites=["e2e"])[0]
    (case,) = build_cases(cfg, "tiny", ["divided_space_time"], ["train"], torch.device("cpu"), (None, None))
    assert case.preset == "toy_divided_cpu.yaml's model" and case.model == replace(
        load_config(cfg.bench.data_config).model, attention_type="divided_space_time")


def test_e2e_records_say_what_their_peak_memory_covers():
    from types import SimpleNamespace

    from timesformer_harness.bench.e2e import peak_memory_covers

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    dali = lambda where: SimpleNamespace(kind="dali", backend=where)  # noqa: E731
    pyav = SimpleNamespace(kind="pyav", backend="cpu")
    assert peak_memory_covers(cuda, dali("gpu")).endswith(
        "outside it: DALI's own GPU buffers (NVDEC output, resize), from its own allocator (see device_used_max_bytes)")
    assert peak_memory_covers(cuda, dali("cpu")).endswith("batches on the GPU, the dali loader's buffers included")
    assert peak_memory_covers(cuda, pyav).startswith("torch's CUDA allocator: model, optimizer state")
    assert peak_memory_covers(cpu, pyav).endswith("outside it: its DataLoader worker processes")


def test_cpu_utilisation_uses_a_gemm_interleaved_with_the_steps():
    rec = _run(_case("model", "space_only", mode="infer", gemm_n=128, steps=3))
    assert rec.status == "ok", rec.message
    assert rec.peak_flops_source == "fp32 GEMM n=128 interleaved with the steps"
    assert rec.peak_flops != 1e11 and rec.utilisation == pytest.approx(rec.achieved_flops / rec.peak_flops)
    x = rec.extra  # one step and one GEMM per sample; the ratio is their median quotient
    assert (x["steps_per_block"], x["calib_reps"], x["gemm_n"]) == (1, 1, 128) and len(x["ratios"]) == 3
    assert x["ratio"] == pytest.approx(sorted(x["ratios"])[1])


def test_blocks_fill_the_sample_length_and_a_delay_slows_only_the_step():
    """``block_s``: as many steps and GEMMs per block as fill it; an injected delay raises the step's time and the
    ratio by about itself, the GEMM's not at all."""
    plain = _run(_case("model", "space_only", mode="infer", gemm_n=128, steps=3, block_s=0.2))
    slow = _run(_case("model", "space_only", mode="infer", gemm_n=128, steps=3, block_s=0.2,
                      steps_per_block=plain.extra["steps_per_block"], calib_reps=plain.extra["calib_reps"],
                      inject_slowdown=3.0))  # each step 4x as long: far above the noise
    assert plain.status == slow.status == "ok", (plain.message, slow.message)
    assert plain.extra["steps_per_block"] > 1 and plain.extra["calib_reps"] > 1
    assert slow.extra["injected_slowdown"] == 3.0  # each call 3x its own time longer, on this machine as it runs
    # 4x injected; the bar is 1.5x because the two cases run in turn and a shared CPU's load can change in between
    assert slow.extra["ratio"] / plain.extra["ratio"] > 1.5 and slow.step_ms["median"] > 1.5 * plain.step_ms["median"]


def test_the_calibration_gemm_is_not_in_a_cases_peak_memory():
    """The GEMM timed beside the steps is the peak's, not the model's: its matrices (12 MiB at n=1024) are made before
    the case's memory window, and a run allocates nothing (they had added ~17.6 MiB to every CPU case's peak)."""
    from timesformer_harness.bench.case import measure_step

    if not PeakMemory(torch.device("cpu")).kind:
        pytest.skip("no resident-set peak on this OS")
    case = _case("model", "space_only", mode="infer", gemm_n=1024, steps=3, block_s=0.0)
    rec = case.record(torch.device("cpu"))
    measure_step(lambda c, r, d, t: (lambda: None), case, rec, torch.device("cpu"), None)
    assert rec.extra["gemm_ms"] > 0 and rec.peak_mem_bytes < 2 * 2**20, rec.peak_mem_bytes


def test_the_scaling_plot_joins_one_batch_and_eager_cases_only(tmp_path):
    """A batch sweep's other batches and compiled cases are not points of the scaling curve (they had been joined
    into it, zigzagging, under a title naming the first record's batch)."""
    from timesformer_harness.plots import series_by_variant

    def rec(suite, frames, batch, compile="none"):
        return BenchRecord(suite=suite, case=f"{suite}/space_only/train/{frames}x32/{batch}/{compile}",
                           attention_type="space_only", preset="tiny", frames=frames, img_size=32, batch=batch,
                           mode="train", status="ok", images_per_s=100.0 * batch, peak_mem_bytes=2**20,
                           compile=compile)

    records = [rec("model", 4, 1), rec("model", 4, 2), rec("model", 4, 4), rec("model", 4, 2, "default"),
               rec("scaling", 8, 2)]
    assert [(r.frames, r.batch, r.compile) for r in series_by_variant(records, "train", 32)["space_only"]] == [
        (4, 2, "none"), (8, 2, "none")]
    sweep_only = [rec("model", 4, 4), rec("model", 4, 1)]  # no scaling suite: the sweep's smallest batch
    assert [r.batch for r in series_by_variant(sweep_only, "train", 32)["space_only"]] == [1]


def test_the_scaling_suite_keeps_the_models_point_when_the_model_suite_measures_other_batches():
    cfg = resolve(preset="tiny", suites=["model", "scaling"])[0]
    grid = {(c.frames, c.img_size) for c in build_cases(cfg, "tiny", ["space_only"], ["train"],
                                                       torch.device("cpu"), (None, None)) if c.suite == "scaling"}
    assert (cfg.model.num_frames, cfg.model.img_size) not in grid  # the model suite measures it, at bench.batch_size
    other = replace(cfg, bench=replace(cfg.bench, batches=[1, 4]))
    grid = {(c.frames, c.img_size) for c in build_cases(other, "tiny", ["space_only"], ["train"],
                                                       torch.device("cpu"), (None, None)) if c.suite == "scaling"}
    assert (cfg.model.num_frames, cfg.model.img_size) in grid  # not at batch 2: the scaling suite measures it


def test_plots_draw_every_variant_and_mark_oom(tmp_path):
    from timesformer_harness.plots import plot_scaling

    def rec(attn, frames, status="ok"):
        ok = status == "ok"
        return BenchRecord(suite="scaling", case=f"scaling/{attn}/train/{frames}x32", attention_type=attn,
                           preset="tiny", frames=frames, img_size=32, batch=2, mode="train", status=status,
                           images_per_s=100.0 / frames if ok else None, peak_mem_bytes=frames * 2**20 if ok else None)

    records = [rec("divided_space_time", 4), rec("divided_space_time", 8), rec("joint_space_time", 4),
               rec("joint_space_time", 8, status="oom")]
    (path,) = plot_scaling(records, tmp_path)
    assert path.name == "scaling_train_32.png" and path.stat().st_size > 1000


def test_error_bars_are_the_interval_of_the_median_as_throughput():
    from timesformer_harness.plots import error_bars

    rec = BenchRecord(suite="model", case="c", images_per_s=100.0, step_ms={"median": 10.0, "ci_low": 8.0,
                                                                            "ci_high": 12.5})
    assert error_bars([rec, BenchRecord(suite="model", case="d")]) == [[20.0, 0.0], [25.0, 0.0]]


def test_flat_exports_and_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recs = [BenchRecord(suite="model", case="model/a", images_per_s=10.0, samples_s=[0.1, 0.2], step_ms={"median": 1}),
            BenchRecord(suite="model", case="model/b", status="oom", message="out of memory")]
    csv_path, jsonl = write_flat(tmp_path, recs)
    assert csv_path.read_text().splitlines()[0].startswith("suite,case,") and len(jsonl.read_text().splitlines()) == 2
    acc = EventAccumulator(str(write_tensorboard(tmp_path / "tb", recs))).Reload()
    assert acc.Tags()["scalars"] == ["images_per_s/model/a", "step_ms/model/a"]  # the oom case has no figures
    assert [e.value for e in acc.Scalars("step_ms/model/a")] == pytest.approx([100.0, 200.0])


def test_pytest_benchmark_suites_record_machine_and_extra_info(tmp_path):
    out = tmp_path / "bench.json"
    # a pytest of its own: without the variables of an xdist worker running this test, which would make
    # pytest-benchmark think it runs under xdist and disable itself
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS"))}
    env["BENCH_PRESET"] = "tiny"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                           "-k", "space_only-infer or temporal-naive", f"--benchmark-json={out}"],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    data = json.loads(out.read_text())
    assert data["machine_info"]["torch_harness"]["torch"] == torch.__version__
    by_name = {b["name"]: b for b in data["benchmarks"]}
    model = by_name["test_model_step[space_only-infer]"]["extra_info"]
    assert model["schema_version"] == SCHEMA_VERSION and model["preset"] == "tiny" and model["clips_per_s"] > 0
    assert model["params"] == count_params(create_model("tiny", attention_type="space_only"))
    stats = by_name["test_model_step[space_only-infer]"]["stats"]  # the record is pytest-benchmark's measurement
    assert model["step_ms.median"] == pytest.approx(1e3 * stats["median"]) and stats["rounds"] == 5
    assert model["step_ms.p90"] <= 1e3 * stats["max"] and model["env.machine_class"].startswith("cpu: ")
    assert by_name["test_attention_fwd_bwd[temporal-naive]"]["extra_info"]["extra.seq_len"] == 4


def test_model_suite_sweeps_batches_and_compile_modes():
    cfg = RootConfig()
    cfg.model = load_preset("tiny")
    cfg.bench.suites, cfg.bench.batches, cfg.bench.compile = ["model"], [1, 2, 4], ["none", "reduce-overhead"]
    cases = build_cases(cfg, "tiny", ["space_only"], ["train"], torch.device("cpu"), (None, None))
    assert [c.name for c in cases] == [f"model/space_only/train/4x32/b{b}{c}" for c in ("", "/reduce-overhead")
                                       for b in (1, 2, 4)]
    assert [c.batch for c in cases] == [1, 2, 4] * 2 and [c.warmup for c in cases] == [2] * 3 + [3] * 3
    assert cases[0].series == cases[2].series != cases[3].series  # a sweep per compile mode
    cfg.bench.batches = []  # the default on CPU: one batch, named as before
    (one,) = build_cases(replace(cfg, bench=replace(cfg.bench, compile=["none"])), "tiny", ["space_only"], ["train"],
                         torch.device("cpu"), (None, None))
    assert one.name == "model/space_only/train/4x32" and one.series is None and one.batch == cfg.bench.batch_size
    with pytest.raises(ValueError, match=r"bench.compile='fastest'; choose from \['none', 'default'"):
        replace(cfg.bench, compile=["fastest"])


def test_batch_sweep_stops_at_the_first_oom_and_counts_its_cost(tmp_path, monkeypatch):
    """A batch that runs out of memory is recorded as oom with its FLOPs counted; the sweep's larger batches are
    recorded as skipped without being run."""
    from timesformer_harness.bench import cli
    from timesformer_harness.bench.record import fill_throughput

    ran = []

    def fake_run_case(case, timeout_s):
        ran.append(case.batch)
        rec = case.record(torch.device("cpu"))
        if case.batch >= 4:
            rec.status, rec.message = "oom", "out of memory"
        else:
            fill_throughput(rec, [(100.0 + case.batch) / 1e3] * 3, clips_per_step=case.batch, frames=case.frames)
        return rec

    monkeypatch.setattr(cli, "run_case", fake_run_case)
    cfg, preset, device = resolve(preset="tiny", suites=["model"], out_dir=str(tmp_path),
                                  overrides=["bench.batches=[1,2,4,8,16]"])
    _, records = cli.run(cfg, preset, device, "space_only", ["space_only"], ["train"])
    assert ran == [1, 2, 4]
    assert [r.status for r in records] == ["ok", "ok", "oom", "skipped", "skipped"]
    assert records[3].message == "batch 4 ran out of memory"
    assert records[2].flops_per_clip == count_flops(replace(cfg.model, attention_type="space_only"), mode="train")
    summary = (next(tmp_path.iterdir()) / "summary.md").read_text()
    assert "## Batch sweep: space_only train, compile none (best: batch 2" in summary
    assert "launch-bound: 2x the clips took 1.01x the time" in summary


def test_sweep_notes_name_the_best_and_the_launch_bound_batches():
    from timesformer_harness.bench.report import sweep_notes

    def rec(batch, ms, status="ok"):
        return BenchRecord(suite="model", case=f"b{batch}", batch=batch, status=status, step_ms={"median": ms},
                           images_per_s=batch / ms * 1e3 if status == "ok" else None)

    notes = sweep_notes([rec(2, 60.0), rec(4, 70.0), rec(8, 130.0), rec(16, 270.0), rec(32, 0, status="oom")])
    assert notes == {2: "launch-bound: 2x the clips took 1.17x the time", 8: "best"}


def test_scaling_grid_is_the_papers_on_a_gpu():
    from timesformer_harness.bench.scaling import cases, paper_grid

    assert paper_grid(8, 224, 16) == [(8, 224), (16, 224), (32, 224), (64, 224), (96, 224), (8, 336), (8, 448)]
    cfg = RootConfig()
    cfg.model = load_preset("vit_base_patch16")
    cfg.bench.suites = ["scaling"]
    base = {"preset": "vit_base_patch16", "batch": 2, "precision": "bf16", "warmup": 1, "steps": 2, "device": "cuda"}
    grid = cases(cfg, base, ["joint_space_time"], ["train"], torch.device("cuda"))
    assert [(c.frames, c.img_size) for c in grid] == paper_grid(8, 224, 16)
    assert [(c.frames, c.img_size) for c in cases(cfg, base, ["joint_space_time"], ["train"], torch.device("cpu"))] \
        == [(8, 224), (16, 224)]


def test_cost_plot_draws_both_axes_and_marks_oom(tmp_path):
    from timesformer_harness.plots import plot_cost_scaling

    def rec(attn, frames, img, status="ok"):
        return BenchRecord(suite="scaling", case=f"scaling/{attn}/train/{frames}x{img}", attention_type=attn,
                           preset="tiny", frames=frames, img_size=img, batch=2, mode="train", status=status,
                           flops_per_clip=frames * img * 10**9,
                           peak_mem_bytes=frames * 2**20 if status == "ok" else None)

    records = [rec(a, t, 32) for a in ("divided_space_time", "joint_space_time") for t in (4, 8)]
    records += [rec("divided_space_time", 4, 48), rec("joint_space_time", 4, 48, status="oom")]
    (path,) = plot_cost_scaling(records, tmp_path)
    assert path.name == "scaling_cost_train.png" and path.stat().st_size > 1000
    assert plot_cost_scaling(records[:1], tmp_path) == []  # one point: nothing to draw


def test_cost_plot_labels_say_what_is_counted_and_measured(tmp_path, monkeypatch):
    """flops_per_clip is FLOPs (2 per multiply-add) of forward+backward in training, not the paper's inference
    multiply-adds; a CPU record's memory is its process's peak RSS growth, drawn over its batch."""
    import matplotlib.figure

    from timesformer_harness.plots import plot_cost_scaling

    labels: list[str] = []

    def savefig(fig, path, **kwargs):
        labels.extend(ax.get_ylabel() for ax in fig.axes)
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    records = [BenchRecord(suite="scaling", case=f"scaling/space_only/{mode}/{t}x32", attention_type="space_only",
                           preset="tiny", frames=t, img_size=32, batch=2, mode=mode, flops_per_clip=t * 10**9,
                           peak_mem_bytes=t * 2**20, peak_mem_kind="rss")
               for mode in ("train", "infer") for t in (4, 8)]
    plot_cost_scaling(records, tmp_path)
    assert labels == ["inference TFLOPs per clip (forward, 2 per multiply-add)"] * 2 \
        + ["process memory growth (peak RSS) per clip, GiB"] * 2 \
        + ["train TFLOPs per clip (fwd+bwd, 2 per multiply-add)"] * 2 \
        + ["process memory growth (peak RSS) per clip, GiB"] * 2


@pytest.mark.parametrize("bad", ["nan", "0", "-1", "inf"])
def test_compare_refuses_a_fail_below_that_could_never_fail(tmp_path, capsys, bad):
    """--fail-below nan (nan < R is never true), 0 or below had passed every case with exit 0 (inf fails every one):
    each is a bad argument, exit 2, as the gate refuses --tolerance nan."""
    a = _made_run(tmp_path / "a", [100.0])
    b = _made_run(tmp_path / "b", [50.0])
    with pytest.raises(SystemExit) as stop:
        _compare_here(capsys, str(a), str(b), "--fail-below", bad, "--out", str(tmp_path / "o"))
    assert stop.value.code == 2 and f"--fail-below {float(bad)}: give a finite ratio B/A above 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    status, out = _compare_here(capsys, str(a), str(b), "--fail-below", "0.9", "--out", str(tmp_path / "o"))
    assert status == 1 and "BELOW model/space_only/train/4x32: 0.50x" in out


def test_compare_judges_a_code_change_that_does_more_work_per_clip_not_refuses_it(tmp_path, capsys):
    """An extra matmul in the model's code changes its FLOPs per clip but not its configuration or parameters: it was
    refused as another model (exit 2), so --fail-below could never catch that slowdown. It is compared, by images/s
    or the paired ratio (utilisation counts the extra work as useful), with the FLOPs' change as its note."""
    from timesformer_harness.bench.compare import compare_records

    a = _made_run(tmp_path / "a", [100.0, 100.0])
    data = json.loads((a / "results.json").read_text())
    data["records"][0].update(flops_per_clip=1200, images_per_s=80.0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(data))
    b = tmp_path / "b"
    status, out = _compare_here(capsys, str(a), str(b), "--fail-below", "0.9", "--out", str(tmp_path / "o"))
    assert status == 1 and "another model" not in out and "2/2 cases like for like" in out
    assert "BELOW model/space_only/train/4x32: 0.80x" in out and "FLOPs per clip +20.0% (0.00 vs 0.00 G)" in out
    # the same utilisation at 20% more FLOPs is 20% fewer clips/s, not an unchanged case
    ra = BenchRecord("model", "model/x", batch=2, params=10, flops_per_clip=1000, images_per_s=100.0, utilisation=0.5)
    rb = BenchRecord("model", "model/x", batch=2, params=10, flops_per_clip=1200, images_per_s=80.0, utilisation=0.5)
    (row,) = compare_records([ra], [rb])
    assert row.comparable and row.normalised_ratio == pytest.approx(0.8) and row.peak_ratio is None
    # another configuration is still another model, whatever its FLOPs
    deeper = BenchRecord("model", "model/x", batch=2, params=11, flops_per_clip=1200, images_per_s=80.0)
    (row,) = compare_records([ra], [deeper])
    assert row.other_model and not row.comparable


def test_compare_to_an_out_that_is_a_file_is_exit_2_not_a_traceback(tmp_path, capsys):
    """--out naming a file had raised FileExistsError: a traceback and exit 1, the status of a regression."""
    from timesformer_harness.bench.compare import main

    a = _made_run(tmp_path / "a", [100.0])
    (tmp_path / "f").write_text("x")
    assert main([str(a), str(a), "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err == f"not written: --out {tmp_path / 'f'} is a file, not a folder\n"
    assert main([str(a), str(a), "--out", str(tmp_path / "f" / "sub")]) == 2
    assert "Not a directory" in capsys.readouterr().err
