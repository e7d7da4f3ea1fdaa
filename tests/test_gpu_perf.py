"""``make gpu-perf``: its rows run as bench cases and a Trainer run, skip what the device cannot run or the budget
cannot fit, and judge the targets on a GPU only. Rehearsed here at CPU size; the GPU run is ``make gpu-perf``."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from timesformer_harness import gpu_perf
from timesformer_harness.metrics import device_totals


def test_rehearsal_runs_the_rows_the_cpu_can_and_skips_the_others(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the Triton kernel as a CPU user meets it (the interpreter is slow)
    rc = gpu_perf.main(["--rehearse-on-cpu", "--out", str(tmp_path), "--trainer-steps", "4",
                        "--rows", "eager-b2", "trainer-b8", "reduce-overhead-b2", "sdpa-cudnn-b8",
                        "temporal-naive-b8", "temporal-efficient-b8", "temporal-triton-b8",
                        "compiled-temporal-triton-b8"])
    assert rc == 0
    rows = {r["row"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert list(rows) == ["trainer-b8", "temporal-triton-b8", "reduce-overhead-b2", "temporal-naive-b8",
                          "temporal-efficient-b8", "compiled-temporal-triton-b8", "sdpa-cudnn-b8",
                          "eager-b2"]  # ROWS order
    temporal = rows["temporal-naive-b8"]  # the temporal pass on its own backend, the spatial one on auto
    assert temporal["status"] == "ok" and temporal["clips_per_s"] > 0
    assert (temporal["record"]["model"]["temporal_attn_backend"], temporal["record"]["model"]["attn_backend"]) == \
        ("naive", "auto")
    assert rows["temporal-efficient-b8"]["status"] == "skipped"
    assert rows["temporal-triton-b8"]["status"] == "skipped"
    triton_reason = ("temporal_attn_backend=triton runs on CUDA GPUs" if importlib.util.find_spec("triton")
                     else "temporal_attn_backend=triton needs the triton package")  # a venv without triton
    assert triton_reason in rows["temporal-triton-b8"]["message"]
    assert rows["compiled-temporal-triton-b8"]["status"] == "skipped"
    assert "on a GPU only" in rows["compiled-temporal-triton-b8"]["message"]
    assert "model.temporal_attn_backend=efficient exists on CUDA only" in rows["temporal-efficient-b8"]["message"]
    eager = rows["eager-b2"]
    assert eager["status"] == "ok" and eager["clips_per_s"] > 0 and eager["mfu_pct"] > 0
    assert eager["record"]["case"] == "model/divided_space_time/train/4x32/b1"  # a bench case, its batch scaled
    assert eager["kernel_ms"] is None  # no kernels on a CPU
    trainer = rows["trainer-b8"]
    assert trainer["status"] == "ok" and trainer["clips_per_s"] > 0 and trainer["syncs_max"] == 0, trainer
    assert rows["reduce-overhead-b2"]["status"] == "skipped" and "CUDA graphs" in rows["reduce-overhead-b2"]["message"]
    assert rows["sdpa-cudnn-b8"]["status"] == "skipped" and "cudnn" in rows["sdpa-cudnn-b8"]["message"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| eager-b2 | divided_space_time | 1 | none | auto | ok |" in summary
    assert "| temporal-naive-b8 | divided_space_time | 2 | none | auto, temporal naive | ok |" in summary
    assert "- eager batch 8 >= 120 clips/s: not measured" in summary
    assert "- the Trainer syncs at most once per micro-batch: not judged on a CPU (0.00)" in summary
    choice = "Temporal attention (eager, batch 8, clips/s by `model.temporal_attn_backend`): not judged on a CPU"
    assert f"{choice} (naive " in summary
    assert summary in capsys.readouterr().out


def test_a_row_that_does_not_fit_the_budget_is_skipped(tmp_path):
    assert gpu_perf.main(["--rehearse-on-cpu", "--out", str(tmp_path), "--budget-s", "1", "--rows",
                          "compiled-b8"]) == 1  # nothing ran
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["status"] == "skipped" and row["message"].startswith("over budget")


def test_a_row_out_of_memory_is_a_result_and_an_error_fails_the_script(tmp_path):
    """OOM is recorded as data (where the batch stops fitting): the script exits 0 when the rest measured; an error,
    or nothing measured, is exit 1."""
    (tmp_path / "summary.md").write_text("# gpu-perf\n")
    ok, oom, skipped = ({"row": n, "status": s} for n, s in (("eager-b8", "ok"), ("eager-b32", "oom"),
                                                              ("compiled-b8", "skipped")))
    assert gpu_perf.script_end(tmp_path, [ok, oom, skipped]) == 0
    assert gpu_perf.script_end(tmp_path, [ok, oom, {"row": "eager-b2", "status": "error"}]) == 1
    assert gpu_perf.script_end(tmp_path, [oom, skipped]) == 1
    assert gpu_perf.script_end(tmp_path, [skipped]) == 1


def test_unknown_rows_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_perf.main(["--rehearse-on-cpu", "--rows", "eager-b3"])
    assert "eager-b3" in capsys.readouterr().err


def test_targets_are_judged_on_a_gpu_only():
    rows = [{"row": "eager-b8", "status": "ok", "clips_per_s": 130.0},
            {"row": "reduce-overhead-b2", "status": "ok", "step_ms": 16.0},
            {"row": "compiled-b8", "status": "oom", "clips_per_s": None},
            {"row": "trainer-b8", "status": "ok", "syncs_mean": 1.0, "syncs_max": 1}]
    on_gpu = dict(gpu_perf.judge(rows, on_gpu=True))
    assert on_gpu["eager batch 8 >= 120 clips/s"] == "met (130.00)"
    assert on_gpu["reduce-overhead batch 2 under 15 ms a step"] == "missed (16.00)"
    assert on_gpu["compiled batch 8 >= 200 clips/s"] == "not measured"
    assert on_gpu["the Trainer syncs at most once per micro-batch"] == "met (1.00)"
    assert dict(gpu_perf.judge(rows, on_gpu=False))["eager batch 8 >= 120 clips/s"].startswith("not judged")
    # 0 syncs on a GPU is a counter that missed the micro-batch's own read of its loss, not a target met
    blind = dict(gpu_perf.judge([{"row": "trainer-b8", "status": "ok", "syncs_mean": 0.0, "syncs_max": 0}],
                                on_gpu=True))["the Trainer syncs at most once per micro-batch"]
    assert blind.startswith("not judged: the counter missed the micro-batch's own read"), blind


def test_a_trainer_row_out_of_memory_is_a_result_with_what_it_logged(tmp_path, monkeypatch):
    """The Trainer row's out of memory is recorded as oom (a result, as a model row's), not as an error that fails
    the script, and the windows it logged before are kept."""
    row = next(r for r in gpu_perf.ROWS if r.name == "trainer-b8")
    logged = {"event": "train", "step": 2, "time/data_wait_pct": 3.0, "debug/syncs_per_micro_batch": 1.0,
              "debug/syncs_per_micro_batch_max": 1}

    def died(argv, timeout_s):
        folder = tmp_path / row.name
        folder.mkdir()
        (folder / "metrics.jsonl").write_text(json.dumps(logged) + "\n")
        return SimpleNamespace(returncode=1, stdout="", wall_s=3.0,
                               stderr="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_perf, "run_command", died)
    result = gpu_perf.run_trainer(row, tmp_path, gpu_perf.resolve_device(), steps=4, timeout_s=60)
    assert result["status"] == "oom" and "CUDA out of memory" in result["message"]
    assert result["syncs_max"] == 1 and result["data_wait_pct"] == 3.0 and result["clips_per_s"] is None
    (tmp_path / "summary.md").write_text("# gpu-perf\n")
    assert gpu_perf.script_end(tmp_path, [{"row": "eager-b8", "status": "ok"}, result]) == 0


def test_the_temporal_attention_choice_is_the_fastest_eager_batch_8_row():
    rows = [{"row": "eager-b8", "status": "ok", "temporal_backend": "same", "clips_per_s": 100.0},
            {"row": "compiled-b8", "status": "ok", "temporal_backend": "same", "clips_per_s": 190.0},
            {"row": "temporal-triton-b8", "status": "ok", "temporal_backend": "triton", "clips_per_s": 130.0},
            {"row": "temporal-cudnn-b8", "status": "ok", "temporal_backend": "cudnn", "clips_per_s": 90.0},
            {"row": "temporal-flash-b8", "status": "error", "temporal_backend": "flash", "clips_per_s": None},
            {"row": "compiled-temporal-triton-b8", "status": "ok", "temporal_backend": "triton", "clips_per_s": 250.0}]
    assert gpu_perf.temporal_choice(rows, on_gpu=True) == \
        "triton 130.0, same 100.0, cudnn 90.0: fastest triton, +30% against same"
    assert gpu_perf.temporal_choice(rows, on_gpu=False) == "not judged on a CPU (triton 130.0, same 100.0, cudnn 90.0)"
    assert gpu_perf.temporal_choice(rows[1:2], on_gpu=True) == "not measured"


def test_the_summary_names_the_triton_attentions_autotuned_blocks():
    meta = {"hardware": "NVIDIA H100", "started": "now", "env": {}, "precision": "bf16", "preset": "vit_base_patch16",
            "frames": 8, "img_size": 224, "warmup": 2, "steps": 10, "peak_flops_source": "the peak table",
            "budget_s": 300, "wall_s": 60, "device": "cuda"}
    row = {"row": "temporal-triton-b8", "kind": "model", "attention_type": "divided_space_time", "batch": 8,
           "compile": "none", "backend": "auto", "temporal_backend": "triton", "status": "ok", "clips_per_s": 130.0,
           "triton_blocks": {"forward S=8 head_dim=64 D=768 bfloat16": "32 rows, 4 warps",
                             "backward S=8 head_dim=64 D=768 bfloat16": "16 rows, 2 warps"}}
    compiled = {**row, "row": "compiled-temporal-triton-b8", "compile": "default", "triton_blocks": None,
                "torch_warnings": ["torch._higher_order_ops.triton_kernel_wrap: Encountered an exception in "
                                   "identify_accessed_tensors, assuming every input is mutated"]}
    text = gpu_perf.summary([row, compiled], meta)
    assert ("- temporal-triton-b8: the Triton attention's autotuned blocks: forward S=8 head_dim=64 D=768 bfloat16: "
            "32 rows, 4 warps; backward S=8 head_dim=64 D=768 bfloat16: 16 rows, 2 warps") in text
    assert "| temporal-triton-b8 | divided_space_time | 8 | none | auto, temporal triton | ok | 130.0 |" in text
    assert ("- compiled-temporal-triton-b8: torch warned: torch._higher_order_ops.triton_kernel_wrap: Encountered an "
            "exception in identify_accessed_tensors, assuming every input is mutated") in text
    assert text.count("torch warned") == 1 and "reduce-overhead rows" not in text
    graphs = {**row, "row": "reduce-overhead-b2", "compile": "reduce-overhead", "temporal_backend": "same",
              "kernel_ms": 9.0, "triton_blocks": None}
    assert "- reduce-overhead rows: their kernel ms come from a profile of CUDA graph replays" in \
        gpu_perf.summary([row, graphs], meta)


def test_device_totals_count_the_device_side_events_only_and_overlap_once():
    def on_gpu(start: float, end: float, **kw) -> SimpleNamespace:
        return SimpleNamespace(device_type=DeviceType.CUDA, device_time_total=end - start,
                               time_range=SimpleNamespace(start=start, end=end), **kw)

    events = [on_gpu(0.0, 250.0, is_user_annotation=False), on_gpu(300.0, 1050.0, is_user_annotation=False),
              SimpleNamespace(device_type=DeviceType.CPU, device_time_total=900.0),  # a CPU op: its kernels' sum
              # a record_function range's GPU-side copy ("attn/temporal"): it spans the kernels counted above
              on_gpu(0.0, 1050.0, is_user_annotation=True)]
    totals = device_totals(events, steps=2)
    assert totals.ms_per_step == pytest.approx(0.5) and totals.ops_per_step == 1.0
    assert totals.summed_ms_per_step == pytest.approx(0.5)
    # a second stream's kernel during the first two (e.g. a decoder thread's): the GPU was busy 1.1 ms, not 1.5
    totals = device_totals([*events, on_gpu(200.0, 1100.0, is_user_annotation=False)], steps=1)
    assert totals.ms_per_step == pytest.approx(1.1) and totals.summed_ms_per_step == pytest.approx(1.9)
    with pytest.raises(RuntimeError, match="traced no GPU work"):
        device_totals(events[2:3], steps=2)


def test_a_rows_timeout_is_a_few_times_its_estimate_within_the_budget():
    from timesformer_harness.gpu_perf import row_timeout

    assert row_timeout(45.0, 400.0) == (135.0, None)  # one hung row leaves the later rows their time
    assert row_timeout(10.0, 400.0) == (60.0, None)  # at least a minute
    assert row_timeout(150.0, 200.0) == (200.0, None)  # never past the budget
    assert row_timeout(150.0, 100.0) == (0.0, "over budget: 100 s left, the row needs about 150 s")


def test_a_failing_profiler_keeps_the_steps_timing(monkeypatch):
    """The kernel-time profile runs after the timing; if it fails (a profiler that cannot trace CUDA graphs, say)
    the record keeps its step times and says why the kernel time is missing."""
    import torch

    from timesformer_harness.bench import case as case_module
    from timesformer_harness.bench.case import ModelCase, measure_step
    from timesformer_harness.model import load_preset

    def broken(*args, **kwargs):
        raise RuntimeError("profiler could not start\nsecond line")

    monkeypatch.setattr(case_module, "kernel_time", broken)
    cpu = torch.device("cpu")
    case = ModelCase(preset="tiny", device="cpu", batch=1, precision="fp32", warmup=1, steps=2,
                     model=load_preset("tiny"), frames=4, img_size=32, kernel_steps=3)
    rec = case.record(cpu)
    measure_step(lambda c, r, d, t: (lambda: None), case, rec, cpu, None)
    assert len(rec.samples_s) == 2 and rec.clips_per_s > 0
    assert rec.extra["kernel_error"] == "profiler could not start"


def test_compiled_rows_need_what_triton_builds_its_launchers_with(monkeypatch):
    """On a GPU, torch.compile's kernels are Triton's: without a C compiler (or Python's headers) a compiled row is
    skipped with the reason instead of failing after minutes of tracing."""
    import torch

    from timesformer_harness.config import ModelConfig

    rows = {r.name: r for r in gpu_perf.ROWS}
    cuda = torch.device("cuda")
    monkeypatch.setattr(gpu_perf, "triton_build_problem", lambda: "no C compiler (gcc, clang, or one named by CC)")
    assert gpu_perf.skip_reason(rows["compiled-b8"], ModelConfig(), cuda, torch.bfloat16) == (
        "torch.compile's GPU kernels are Triton's, and no C compiler (gcc, clang, or one named by CC)")
    assert gpu_perf.skip_reason(rows["eager-b8"], ModelConfig(), cuda, torch.bfloat16) is None
    monkeypatch.setattr(gpu_perf, "triton_build_problem", lambda: None)
    assert gpu_perf.skip_reason(rows["compiled-b8"], ModelConfig(), cuda, torch.bfloat16) is None


@pytest.mark.parametrize("script", ["gpu_perf", "gpu_input"])
def test_an_out_that_cannot_hold_the_results_is_one_line_before_anything_runs(script, tmp_path, capsys, monkeypatch):
    from timesformer_harness.benchmarks import gpu_input
    main = gpu_perf.main if script == "gpu_perf" else gpu_input.main
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setattr(gpu_perf, "run", lambda *a, **k: pytest.fail("a row ran"))
    monkeypatch.setattr(gpu_input, "run", lambda *a, **k: pytest.fail("a row ran"))
    assert main(["--rehearse-on-cpu", "--out", str(afile / "sub")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: cannot write under {afile / 'sub'}: {afile} is a file; name a "
                                               "folder with --out")
    monkeypatch.chdir(tmp_path)  # the default folder is under the current one
    assert gpu_perf.script_start(gpu_perf.script_parser("timesformer_harness.gpu_perf", "d", ["r"], 1.0),
                                 SimpleNamespace(out=None, rows=None, rehearse_on_cpu=True), ["r"]).parent == \
        tmp_path / "runs" / "gpu_perf"
