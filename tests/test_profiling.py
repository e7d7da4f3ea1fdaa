"""harness.profiling: real profiled train steps, the summary's attention ranges, and TensorBoard's profiler plugin
reading our run on loopback."""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from harness.bench import resolve
from harness.config import REPO_ROOT
from harness.counting import count_flops
from harness.model import load_preset
from harness.profiling import run_profile


def _cfg(attention_type: str):
    return resolve(preset="tiny", overrides=[f"model.attention_type={attention_type}"])[0]


@pytest.fixture(scope="module")
def divided_run(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("profile")
    s = run_profile(_cfg("divided_space_time"), "tiny", steps=2, wait=1, warmup=1, out_root=root)
    return root, s


def test_profile_writes_traces_and_summary(divided_run):
    root, s = divided_run
    run = Path(s.run_dir)
    assert run.parent == root and run.name.endswith("-divided_space_time")
    (tb_trace,) = run.glob("*.pt.trace.json")
    events = json.loads((run / "trace_perfetto.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"train_step", "forward", "backward", "optimizer", "attn/temporal", "attn/spatial"} <= names  # our ranges
    assert tb_trace.stat().st_size == (run / "trace_perfetto.json").stat().st_size
    text = (run / "summary.md").read_text()
    assert "| attn/temporal |" in text and "| attn/spatial |" in text and "attn/joint |" not in text
    assert "aten::" in text and (run / "key_averages.txt").is_file() and (run / "config.yaml").is_file()


def test_profile_summary_numbers_are_consistent(divided_run):
    _, s = divided_run
    assert s.steps == 2 and s.step_ms > s.forward_ms > 0
    for name in ("attn/temporal", "attn/spatial"):
        assert 0 < s.range_share_of_step[name] < s.range_share_of_forward[name] < 1
    names = [name for name, _, _ in s.top_ops]
    assert len(names) == len(set(names)) and all(calls >= 1 for _, _, calls in s.top_ops)
    assert {"aten::addmm", "aten::mm"} & set(names), names  # the Linear layers are among the top ops
    assert s.top_ops == sorted(s.top_ops, key=lambda t: -t[1])
    assert s.flops_per_step == count_flops(load_preset("tiny"), batch=resolve(preset="tiny")[0].bench.batch_size,
                                           mode="train")
    assert s.achieved_flops == pytest.approx(s.flops_per_step / (s.step_ms / 1e3)) and s.peak_mem_bytes > 0


def test_joint_profile_reports_the_joint_range(tmp_path):
    s = run_profile(_cfg("joint_space_time"), "tiny", steps=1, wait=0, warmup=1, out_root=tmp_path)
    assert set(s.range_ms) == {"attn/joint"}


def test_profiling_cli_rejects_all():
    out = subprocess.run([sys.executable, "-m", "harness.profiling", "--attn", "all"], capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 2 and "takes one variant" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "harness.profiling", "--attn", "diagonal", "--preset", "tiny"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode == 2 and "model.attention_type='diagonal'; choose from" in bad.stderr  # config check


def _get(url: str) -> tuple[int, object]:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
        if r.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return r.status, json.loads(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_profiler_plugin_serves_our_run(divided_run):
    root, s = divided_run
    run_name = Path(s.run_dir).name
    tb = Path(sys.executable).parent / "tensorboard"
    port = _free_port()
    proc = subprocess.Popen([str(tb), "--logdir", str(root), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler"
    try:
        runs: dict = {}
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, f"tensorboard exited: {proc.stderr.read()[-2000:]}"
            try:
                _, runs = _get(f"{base}/runs")
                if run_name in runs.get("runs", []) and not runs.get("loading"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(1)
        assert run_name in runs.get("runs", []), runs
        q = urllib.parse.quote(run_name)
        _, views = _get(f"{base}/views?run={q}")
        assert "Overview" in views and "Trace" in views
        _, workers = _get(f"{base}/workers?run={q}&view=Overview")
        assert workers == ["divided_space_time"]
        _, spans = _get(f"{base}/spans?run={q}&worker=divided_space_time")
        status, overview = _get(f"{base}/overview?run={q}&worker=divided_space_time&span={spans[0]}")
        assert status == 200 and "steps" in overview, sorted(overview)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
