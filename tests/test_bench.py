"""harness.metrics and harness.bench: the record schema, the statistics, and real bench runs at the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

from harness.bench import attention_shape, build_cases, case_name, run_case, run_worker
from harness.config import REPO_ROOT, RootConfig
from harness.counting import count_flops, count_params
from harness.metrics import (SCHEMA_VERSION, BenchRecord, gpu_peak_flops, is_oom, percentile, read_results,
                             step_stats, write_results)
from harness.model import create_model, load_preset


def _spec(**kw) -> dict:
    base = {"preset": "tiny", "model": asdict(load_preset("tiny")), "batch": 2, "precision": "fp32",
            "channels_last": False, "warmup": 1, "steps": 2, "device": "cpu", "mem_limit_gb": 0.0,
            "peak_flops": 1e11, "peak_flops_source": "test", "frames": 4, "img_size": 32}
    return {**base, **kw}


def test_step_stats_percentiles():
    times = [0.010, 0.020, 0.030, 0.040, 0.050]
    s = step_stats(times)
    assert s["median"] == pytest.approx(30.0)
    assert s["p10"] == pytest.approx(14.0)  # linear interpolation between 10 and 20 ms
    assert s["p90"] == pytest.approx(46.0)
    assert percentile([3.0], 90) == 3.0


def test_record_roundtrip_and_version_check(tmp_path):
    rec = BenchRecord(suite="model", case="model/x/train/8x224", clips_per_s=2.0, step_ms={"median": 1.0})
    write_results(tmp_path / "r.json", [rec], {"preset": "tiny"})
    back, meta = read_results(tmp_path / "r.json")
    assert back == [rec] and meta == {"preset": "tiny"}
    assert json.loads((tmp_path / "r.json").read_text())["schema_version"] == SCHEMA_VERSION
    with pytest.raises(ValueError, match="schema_version=0"):
        BenchRecord.from_dict({**rec.to_dict(), "schema_version": 0})
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        BenchRecord.from_dict({**rec.to_dict(), "bogus": 1})
    assert "env" not in rec.extra_info() and rec.extra_info()["clips_per_s"] == 2.0


def test_gpu_peak_table_and_oom_detection():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16")[0] == 756e12
    assert gpu_peak_flops("NVIDIA H200", "bf16")[0] == 989e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32")[0] == 67e12
    assert gpu_peak_flops("Some Unknown GPU", "bf16") == (None, None)
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_attention_shapes_follow_the_block_layout():
    cfg = load_preset("cpu_bench")  # 224 px, patch 16 -> N = 196; 3 heads of 64
    assert attention_shape(cfg, "temporal", 2, 8, 224) == (2 * 196, 3, 8, 64)
    assert attention_shape(cfg, "spatial", 2, 8, 224) == (2 * 8, 3, 197, 64)
    assert attention_shape(cfg, "joint", 2, 8, 224) == (2, 3, 1 + 196 * 8, 64)
    with pytest.raises(ValueError, match="choose temporal, spatial or joint"):
        attention_shape(cfg, "diagonal", 2, 8, 224)


def test_build_cases_selects_suites_and_skips_the_duplicate_sweep_point():
    cfg = RootConfig()
    cfg.model = load_preset("tiny")
    cfg.bench.suites = ["model", "scaling"]
    cfg.bench.frames = [4, 8]
    cases = build_cases(cfg, "tiny", ["space_only"], ["train", "infer"], torch.device("cpu"), (None, None))
    names = [case_name(c) for c in cases]
    assert names == ["model/space_only/train/4x32", "model/space_only/infer/4x32", "scaling/space_only/train/8x32"]
    cfg.bench.suites = ["model", "nope"]
    with pytest.raises(ValueError, match=r"unknown bench suites \['nope'\]"):
        build_cases(cfg, "tiny", ["space_only"], ["train"], torch.device("cpu"), (None, None))


def test_model_worker_counts_match_the_model():
    rec = run_worker(_spec(suite="model", attention_type="divided_space_time", mode="train"))
    assert rec.status == "ok", rec.message
    model = create_model("tiny")
    assert rec.params == count_params(model)
    assert rec.flops_per_clip == count_flops(model.config, mode="train")
    assert rec.clips_per_s == pytest.approx(2 / (rec.step_ms["median"] / 1e3))
    assert rec.images_per_s == pytest.approx(rec.clips_per_s * 4)
    assert rec.achieved_flops == pytest.approx(rec.flops_per_clip * rec.clips_per_s)
    assert rec.utilisation == pytest.approx(rec.achieved_flops / 1e11)
    assert rec.env["torch"] == torch.__version__


def test_attention_worker_backends_agree_on_flops():
    recs = [run_worker(_spec(suite="attention", shape="joint", backend=b, mode="train",
                             attention_type="joint_space_time")) for b in ("auto", "naive")]
    assert all(r.status == "ok" for r in recs), [r.message for r in recs]
    nseq, H, L, hd = 2, 4, 1 + 16 * 4, 16
    assert recs[0].flops_per_clip == recs[1].flops_per_clip == 3 * 4 * nseq * H * L * L * hd // 2
    assert recs[0].extra["seq_len"] == L


def test_unknown_pinned_backend_is_an_error_record_not_a_crash():
    rec = run_worker(_spec(suite="attention", shape="spatial", backend="cudnn", mode="infer",
                           attention_type="space_only"))
    assert rec.status == "error" and "RuntimeError" in rec.message


def test_oom_case_is_recorded_and_reported_as_oom():
    """A case over the per-case address-space cap fails to allocate: status oom, not a crashed sweep."""
    model = asdict(replace(load_preset("tiny"), attn_backend="naive"))  # naive keeps the L x L matrix
    rec = run_case(_spec(suite="scaling", attention_type="joint_space_time", mode="infer", frames=256,
                         model=model, mem_limit_gb=0.3), timeout_s=120)
    assert rec.status == "oom", (rec.status, rec.message)
    assert "allocate" in rec.message


def test_bench_cli_writes_results_summary_plots_and_config(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "harness.bench", "--attn", "space_only", "--preset", "tiny", "--mode", "both",
           "--suites", "model,scaling", "--frames", "4,8", "--out", str(out), "bench.steps=2", "bench.warmup=1",
           "bench.sweep_steps=2", "bench.gemm_n=256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = out.iterdir()
    assert run.name.endswith("-space_only")
    records, meta = read_results(run / "results.json")
    assert [r.case for r in records] == ["model/space_only/train/4x32", "model/space_only/infer/4x32",
                                         "scaling/space_only/train/8x32"]
    assert all(r.status == "ok" and r.peak_mem_bytes > 0 and r.peak_mem_kind == "rss_fresh_process"
               for r in records)
    assert records[2].flops_per_clip == count_flops(
        replace(load_preset("tiny"), attention_type="space_only"), frames=8, mode="train")
    assert meta["peak_flops_source"].startswith("measured fp32 GEMM n=256")
    assert "| space_only | train |" in (run / "summary.md").read_text()
    assert "model:" in (run / "config.yaml").read_text()
    assert (run / "scaling_train_32.png").stat().st_size > 1000
    assert "| space_only | infer |" in proc.stdout  # the table printed at the end


def test_bench_cli_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "harness.bench", "--attn", "diagonal"], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode != 0 and "choose from" in proc.stderr


def test_pipeline_and_e2e_suites_on_toy_data(tmp_path):
    """DALI and PyAV clips/s on the toy data with frames decoded per clip (counted = decoder model), and the e2e
    verdict."""
    data = tmp_path / "toy"
    subprocess.run([sys.executable, "-m", "pipelines.tools.toy", "--out", str(data)], check=True, cwd=REPO_ROOT,
                   timeout=300, capture_output=True)
    cfg_path = tmp_path / "data.yaml"
    cfg_path.write_text(f"data:\n  root: {data}\n  num_frames: 4\n  train_crop_size: 32\n"
                        f"  train_jitter_scales: [32, 40]\n")
    recs = [run_worker(_spec(suite="pipeline", backend=b, data_config=str(cfg_path), batches=2))
            for b in ("pyav", "dali")]
    for r in recs:
        assert r.status == "ok", (r.case, r.message)
        assert r.clips_per_s > 0 and r.frames == 4 and r.img_size == 32
        decoded = r.extra["decoded_frames"]
        assert decoded["delivered_frames"] == 4 and decoded["clips"] == 16
        assert decoded["counted_per_clip"] == pytest.approx(decoded["model_per_clip"])
        assert 4 <= decoded["counted_per_clip"] <= 24  # a 24-frame video
    assert [r.extra["decoded_frames"]["strategy"] for r in recs] == ["pyav", "from_start"]
    e2e = run_worker(_spec(suite="e2e", attention_type="divided_space_time", mode="train",
                           data_config=str(cfg_path), batches=2, threshold=0.1))
    assert e2e.status == "ok", e2e.message
    assert e2e.extra["verdict"].split()[0] in ("input-bound", "compute-bound")
    assert 0.0 <= e2e.extra["data_wait_share"] <= 1.0


def test_cpu_utilisation_uses_a_gemm_interleaved_with_the_steps():
    rec = run_worker(_spec(suite="model", attention_type="space_only", mode="infer", gemm_n=128))
    assert rec.status == "ok", rec.message
    assert rec.peak_flops_source == "fp32 GEMM n=128 interleaved with the steps"
    assert rec.peak_flops != 1e11 and rec.utilisation == pytest.approx(rec.achieved_flops / rec.peak_flops)


def test_plots_draw_every_variant_and_mark_oom(tmp_path):
    from harness.plots import plot_scaling

    def rec(attn, frames, status="ok"):
        ok = status == "ok"
        return BenchRecord(suite="scaling", case=f"scaling/{attn}/train/{frames}x32", attention_type=attn,
                           preset="tiny", frames=frames, img_size=32, batch=2, mode="train", status=status,
                           images_per_s=100.0 / frames if ok else None, peak_mem_bytes=frames * 2**20 if ok else None)

    records = [rec("divided_space_time", 4), rec("divided_space_time", 8), rec("joint_space_time", 4),
               rec("joint_space_time", 8, status="oom")]
    (path,) = plot_scaling(records, tmp_path)
    assert path.name == "scaling_train_32.png" and path.stat().st_size > 1000


def test_pytest_benchmark_suites_record_machine_and_extra_info(tmp_path):
    out = tmp_path / "bench.json"
    env = {**__import__("os").environ, "BENCH_PRESET": "tiny"}
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
    assert by_name["test_attention_fwd_bwd[temporal-naive]"]["extra_info"]["extra"]["seq_len"] == 4
