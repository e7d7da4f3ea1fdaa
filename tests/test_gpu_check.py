"""make gpu-check: without CUDA it says so and exits 2; its CPU rehearsal runs every step but the CUDA-only one;
a broken step is a failure; no step passes without having done its work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timesformer_harness.config import REPO_ROOT
from timesformer_harness.gpu_check import (StepFailed, StepResult, build_steps, collect_bench, collect_pytest,
                                           exit_status, CPU_SIZE)
from timesformer_harness.bench.record import BenchRecord, write_results

STEPS = ["gpu_tests", "prepare", "validate", "train", "evaluate", "profile", "gate_baseline", "gate", "torchrun",
         "bench"]


def _run(args: list[str], timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    out = subprocess.run([sys.executable, "-m", "timesformer_harness.gpu_check", *args], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=timeout)
    report = next(Path(args[args.index("--out") + 1]).glob("*/report.json"))
    return out, json.loads(report.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this test covers the no-GPU path")
def test_without_cuda_nothing_runs_and_exit_code_is_2(tmp_path: Path) -> None:
    out, report = _run(["--out", str(tmp_path)], timeout=120)
    assert out.returncode == 2 and out.stdout.rstrip().endswith("0 passed, 0 failed, 10 skipped"), out.stdout
    assert [s["name"] for s in report["steps"]] == STEPS and report["exit_status"] == 2
    assert all(s["status"] == "skip" and s["reason"].startswith("needs CUDA") for s in report["steps"])
    assert report["mode"] == "no CUDA" and not list(tmp_path.glob("*/*.log"))  # nothing was run
    env = report["environment"]  # where it ran: the tree, the versions, the machine (runtime.environment_info)
    assert len(env["git_sha"]) == 40 and {"cuda", "cuda_driver", "dali", "host", "machine_class"} <= set(env)
    assert f"git {env['git_sha'][:12]}" in out.stdout.splitlines()[0]


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_step_that_does_not_need_cuda(tmp_path: Path) -> None:
    out, report = _run(["--rehearse-on-cpu", "--out", str(tmp_path)], timeout=900)
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS, out.stdout
    failed = {n: s["reason"] for n, s in steps.items() if s["status"] == "fail"}
    assert out.returncode == 0 and not failed, failed
    if not torch.cuda.is_available():
        assert steps["gpu_tests"]["status"] == "skip" and steps["gpu_tests"]["reason"] == "needs CUDA"
    assert all(steps[n]["status"] == "pass" for n in STEPS[1:])
    fig = {n: s["figures"] for n, s in steps.items()}
    assert fig["prepare"]["videos"] == CPU_SIZE.subset and fig["validate"]["usable"] == f"{CPU_SIZE.subset}/" \
        f"{CPU_SIZE.subset}"
    assert [k for k in fig["bench"]["model"] if k.startswith("space_only/train/")]
    assert all(m["images_per_s"] > 0 for m in fig["bench"]["model"].values())
    assert {"auto", "naive"} <= set(fig["bench"]["attention_backends_ok"])
    assert set(fig["bench"]["pipeline_clips_per_s"]) == {"dali", "pyav", "shootout"} and fig["bench"]["e2e"]
    assert fig["train"]["steps"] == 4 and fig["train"]["loader"] == "dali (cpu)" and "val_top1" in fig["train"]
    assert fig["train"]["peak_gib"] > 0 and fig["train"]["val_peak_gib"] > 0  # the process's peak RSS on CPU
    assert fig["bench"]["e2e"][0]["decode"] == "cpu" and fig["bench"]["e2e"][0]["device_used_mib"] is None
    assert fig["evaluate"]["videos"] == CPU_SIZE.eval_videos
    assert fig["profile"]["sdpa_kernels"] and fig["profile"]["attention_share_pct"] > 0
    ((gate_case, gate_verdict),) = fig["gate"].items()
    assert gate_case.startswith("model/divided_space_time/train/") and gate_verdict.startswith("ok")
    assert fig["torchrun"]["world_size"] == 2 and fig["torchrun"]["steps"] == 2
    for name in STEPS[1:]:  # each step's own output is kept beside the report
        assert Path(steps[name]["log"]).is_file()


def test_a_broken_step_fails_and_what_it_needs_is_skipped(tmp_path: Path) -> None:
    out, report = _run(["--rehearse-on-cpu", "--only", "validate", "gate", "injected_failure", "--inject-failure",
                        "--out", str(tmp_path)], timeout=120)
    steps = {s["name"]: s for s in report["steps"]}
    assert out.returncode == 1 and report["exit_status"] == 1
    assert steps["injected_failure"]["status"] == "fail"
    assert steps["injected_failure"]["reason"] == "exit status 3: deliberately broken"
    assert steps["validate"]["status"] == "skip" and steps["validate"]["reason"] == "needs prepare, which did not run"
    assert steps["gate"]["reason"] == "needs gate_baseline, which did not run"


def test_a_budget_skips_the_steps_that_no_longer_fit(tmp_path: Path) -> None:
    out, report = _run(["--rehearse-on-cpu", "--only", "prepare", "validate", "--budget-s", "1", "--out",
                        str(tmp_path)], timeout=120)
    steps = {s["name"]: s for s in report["steps"]}
    assert out.returncode == 2 and report["complete"], out.stdout
    assert steps["prepare"]["reason"] == "over budget: 1 s left, the step takes about 15 s"
    assert steps["validate"]["reason"].startswith("over budget: ") and steps["validate"]["status"] == "skip"


def test_the_report_is_written_after_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped from outside (a time box, Ctrl-C) keeps the steps it finished in report.json."""
    from timesformer_harness import gpu_check

    def run_step(step, run_dir, cuda, done, timeout_s=None):
        if done:
            raise KeyboardInterrupt  # stopped during the second step
        return StepResult(step.name, "pass", "", 1.0, " ".join(step.argv), step.make, {"videos": 16})

    monkeypatch.setattr(gpu_check, "run_step", run_step)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--rehearse-on-cpu", "--only", "prepare", "validate", "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("*/report.json")).read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("prepare", "pass")] and not report["complete"]


def test_a_relative_out_reaches_the_steps_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps run in the clone's root: a relative --out, given from another folder, reaches them absolute."""
    from timesformer_harness import gpu_check

    argvs = []
    monkeypatch.setattr(gpu_check, "run_step", lambda step, *a, **k: argvs.append(step.argv) or
                        StepResult(step.name, "pass", "", 1.0, " ".join(step.argv), step.make, {}))
    monkeypatch.chdir(tmp_path)
    gpu_check.main(["--rehearse-on-cpu", "--only", "prepare", "--out", "reports"])
    (run_dir,) = (tmp_path / "reports").iterdir()
    paths = [a for argv in argvs for a in argv if "reports" in a]
    assert paths and all(a.startswith(str(run_dir)) for a in paths), paths


def test_a_timed_out_step_says_what_it_was_doing(tmp_path: Path) -> None:
    """A step past its time limit is killed and its reason names its last output (pytest -v prints a test's name
    before it runs: the test that hung)."""
    from timesformer_harness.gpu_check import Step, run_step

    hangs = Step("gpu_tests", "(test)", [sys.executable, "-c", "import time; print('tests/test_gpu.py::test_x ', "
                                         "flush=True); time.sleep(60)"], lambda log: {}, timeout_s=60)
    result = run_step(hangs, tmp_path, cuda=False, done={}, timeout_s=2)
    assert result.status == "fail" and result.seconds < 30
    assert result.reason == "timed out after 2 s; its last output: tests/test_gpu.py::test_x"


def test_exit_status() -> None:
    r = lambda status: StepResult("x", status, "", 0.0, "", "")  # noqa: E731
    assert exit_status([r("pass"), r("skip")]) == 0
    assert exit_status([r("pass"), r("fail"), r("skip")]) == 1
    assert exit_status([r("skip"), r("skip")]) == 2


def test_pytest_step_needs_a_test_that_ran(tmp_path: Path) -> None:
    (tmp_path / "test_some.py").write_text("import pytest\n\n"
                                           "def test_ok():\n    pass\n\n"
                                           "@pytest.mark.skip(reason='no AV1 NVDEC here')\ndef test_av1():\n    pass\n")
    junit = tmp_path / "junit.xml"

    def pytest_run(*select: str) -> None:
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                        str(tmp_path / "test_some.py"), *select], cwd=tmp_path, capture_output=True, check=False)

    pytest_run()
    assert collect_pytest(junit)("") == {"passed": 1, "failed": [], "skipped": {"test_av1": "no AV1 NVDEC here"}}
    pytest_run("-k", "av1")  # only skipped tests: not a pass
    with pytest.raises(StepFailed, match=r"no GPU test ran \(1 skipped\)"):
        collect_pytest(junit)("")
    with pytest.raises(StepFailed, match="pytest wrote no"):
        collect_pytest(tmp_path / "none.xml")("")


def test_bench_step_fails_on_error_records_and_missing_suites(tmp_path: Path) -> None:
    run = tmp_path / "bench" / "20260101-000000-all"
    ok = [BenchRecord(suite=s, case=f"{s}/x", attention_type="divided_space_time", mode="train",
                      attn_backend="flash" if s == "attention" else None, loader="dali" if s == "pipeline" else None,
                      images_per_s=10.0, clips_per_s=1.0, utilisation=0.4, frames=8, img_size=224, batch=2)
          for s in ("model", "attention", "pipeline", "e2e")]
    # on a GPU the CPU decoders' shoot-out says why it does not run, and a sweep skips the batches past an OOM
    said = [BenchRecord(suite="pipeline", case="pipeline/shootout", status="skipped", message="CPU decoders"),
            BenchRecord(suite="model", case="model/x/b16", status="oom", frames=8, img_size=224, batch=16),
            BenchRecord(suite="model", case="model/x/b32", status="skipped", message="b16 ran out of memory")]
    write_results(run / "results.json", ok + said, {"hardware": "GPU"})
    figures = collect_bench(tmp_path / "bench")("")
    assert figures["model"]["divided_space_time/train/8x224/b2"] == {"images_per_s": 10.0, "mfu_pct": 40.0,
                                                                     "peak_mib": 0.0}
    assert figures["oom"] == ["model/x/b16"]
    assert figures["attention_backends_ok"] == ["flash"] and figures["pipeline_clips_per_s"] == {"dali": 1.0}
    broken = ok[:3] + [BenchRecord(suite="e2e", case="e2e/x", status="error", message="ValueError: no videos")]
    write_results(run / "results.json", broken, {})
    with pytest.raises(StepFailed, match="cases not ok: e2e/x: error ValueError: no videos"):
        collect_bench(tmp_path / "bench")("")
    write_results(run / "results.json", ok[:1], {})
    with pytest.raises(StepFailed, match=r"suites without a measured record: \['attention', 'e2e', 'pipeline'\]"):
        collect_bench(tmp_path / "bench")("")
    with pytest.raises(StepFailed, match="no \\*/results.json"):
        collect_bench(tmp_path / "nothing")("")


def test_train_figures_read_either_memory_kind_and_the_decode_move(tmp_path: Path) -> None:
    """From the run's own records, not its log: the loader as the start record gives it (with why auto moved the
    decode off NVDEC), and either memory kind."""
    from timesformer_harness.gpu_check import collect_train

    moved = {"kind": "dali", "decode": "cpu", "note": "NVDEC cannot decode 1632 of 1632 video(s)"}
    records = [{"event": "start", "optimizer": "torch.optim.AdamW(fused=True)", "precision": "fp32",
                "world_size": 1, "loader": moved},
               {"event": "train", "time/clips_per_s": 900.0, "time/data_wait_pct": 3.0,
                "memory/peak_cuda_allocator_gib": 0.123},
               {"event": "val", "val/top1": 50.0, "memory/val_peak_cuda_allocator_gib": 0.2},
               {"event": "end", "step": 8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = collect_train(tmp_path)("a log that says DALI loader (gpu) is not read")
    assert figures["loader"] == "dali (cpu; NVDEC cannot decode 1632 of 1632 video(s))"
    assert figures["peak_gib"] == 0.12 and figures["val_peak_gib"] == 0.2 and figures["steps"] == 8
    records[0]["loader"] = {"kind": "dali", "decode": "gpu", "note": ""}
    records[1] = {"event": "train", "memory/peak_rss_gib": 1.5}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert collect_train(tmp_path)("")["peak_gib"] == 1.5 and collect_train(tmp_path)("")["loader"] == "dali (gpu)"


def test_validate_figures_come_from_its_report(tmp_path: Path) -> None:
    from timesformer_harness.gpu_check import collect_validate

    report = tmp_path / "validate.json"
    with pytest.raises(StepFailed, match="was not written"):
        collect_validate(report)("64/64 videos usable by the gpu backend")
    report.write_text(json.dumps({"backend": "gpu", "judged_for": "NVIDIA H100 (hopper)", "videos": 64,
                                  "usable": 63, "rejected": [{"path": "a.webm", "reason": "too short"}]}))
    assert collect_validate(report)("") == {"usable": "63/64", "backend": "gpu", "judged_for": "NVIDIA H100 (hopper)"}


def test_gpu_size_commands_are_the_users_commands(tmp_path: Path) -> None:
    from timesformer_harness.gpu_check import GPU_SIZE

    steps = {s.name: s for s in build_steps(tmp_path, GPU_SIZE, nprocs=8)}
    assert list(steps) == STEPS and steps["gpu_tests"].cuda_only and not steps["bench"].cuda_only
    assert steps["bench"].argv[2:6] == ["timesformer_harness.bench", "--out", str(tmp_path / "bench"), "--attn"]
    assert "--preset" not in steps["bench"].argv  # the GPU preset is bench's own default on CUDA
    assert steps["torchrun"].argv[2:6] == ["torch.distributed.run", "--standalone", "--nproc_per_node=8",
                                          "harness/train.py"]
    assert "data.synthetic_videos=512" in steps["torchrun"].argv
    assert steps["evaluate"].needs == "train" and steps["gate"].needs == "gate_baseline"


@pytest.mark.skipif(torch.cuda.is_available(), reason="without CUDA nothing runs: the folder is all that is checked")
def test_a_relative_out_is_under_the_current_folder_and_a_file_is_refused(tmp_path: Path) -> None:
    """As every other command's ``--out``: relative to where it runs, not to the clone; a file is one line, exit 2."""
    out = subprocess.run([sys.executable, "-m", "timesformer_harness.gpu_check", "--out", "reports"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and list((tmp_path / "reports").glob("*/report.json")), out.stdout + out.stderr
    assert not (REPO_ROOT / "reports").exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    out = subprocess.run([sys.executable, "-m", "timesformer_harness.gpu_check", "--out", str(afile)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == (f"error: cannot write under {afile}: it is a file; name a "
                                                          "folder with --out"), out.stderr
