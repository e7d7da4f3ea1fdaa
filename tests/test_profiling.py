"""timesformer_harness.profiling: real profiled train steps, the summary's attention ranges (also over synthetic events
shaped like a CUDA profile's), and TensorBoard's profiler plugin reading our run on loopback."""

from __future__ import annotations

import gzip
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from dataclasses import dataclass

import pytest
import torch
import yaml
from torch.autograd import DeviceType

from timesformer_harness.bench import resolve
from timesformer_harness.config import REPO_ROOT
from timesformer_harness.counting import count_flops
from timesformer_harness.gpu_check import collect_profile
from timesformer_harness.model import load_preset
from timesformer_harness import metrics
from timesformer_harness.profiling import main as profiling_main
from timesformer_harness.profiling import ProfileStopped, run_profile, summarise, write_summary


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
    assert tb_trace.stat().st_ino == (run / "trace_perfetto.json").stat().st_ino  # one file, two names
    assert not list(run.glob("*.partial"))
    text = (run / "summary.md").read_text()
    assert "| attn/temporal |" in text and "| attn/spatial |" in text and "attn/joint |" not in text
    assert "aten::" in text and (run / "config.yaml").is_file()
    # every op, with aten's long names whole (the table's defaults stop at 100 rows and cut names at 55 characters)
    table = (run / "key_averages.txt").read_text()
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward " in table and "..." not in table
    assert table.count("aten::") >= 60
    bench = yaml.safe_load((run / "config.yaml").read_text())["bench"]  # the schedule that ran, not the bench's
    assert (bench["steps"], bench["warmup"], bench["out_dir"]) == (2, 2, str(root))
    assert (bench["precision"], bench["threads"]) == ("fp32", torch.get_num_threads())  # resolved, not auto and 0


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


def test_attention_ranges_cost_nothing_without_a_profiler(monkeypatch):
    """The attn/* ranges (two op dispatches each) are entered only while a profiler records (the test above finds
    them in a trace): an unprofiled forward enters none."""
    import torch

    from timesformer_harness.kernels import attention
    from timesformer_harness.model import create_model

    entered = []

    def counted(name: str):
        entered.append(name)
        return torch.profiler.record_function(name)

    monkeypatch.setattr(attention, "record_function", counted)
    model = create_model("tiny", num_classes=3, attention_type="divided_space_time")
    video = torch.randn(1, 3, 2, 32, 32)
    model(video)
    assert entered == []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(video)
    assert entered == ["attn/temporal", "attn/spatial"] * 2  # two blocks
    assert {"attn/temporal", "attn/spatial"} <= {e.name for e in prof.events()}


@dataclass
class Avg:
    """The fields of ``torch.autograd.profiler_util.FunctionEventAvg`` that the summary reads (times in us)."""

    key: str
    count: int
    cpu_time_total: float = 0.0
    self_cpu_time_total: float = 0.0
    device_time_total: float = 0.0
    self_device_time_total: float = 0.0
    device_type: DeviceType = DeviceType.CPU


STEPS = 2
NODE = "autograd::engine::evaluate_function: "
# key_averages() of 2 active steps on CPU: our ranges (CPU time only), operators, the profiler's own step range
CPU_EVENTS = [
    Avg("ProfilerStep#2", 1, 10500, 100),
    Avg("train_step", STEPS, 10000, 200),
    Avg("forward", STEPS, 4000, 100),
    Avg("attn/temporal", 4, 1000, 50),
    Avg("attn/spatial", 4, 2000, 50),
    Avg("aten::mm", 40, 3000, 3000),
    Avg("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 8, 600, 500),
    Avg("aten::add_", 60, 400, 400),
    # autograd's nodes: the attention's backward (fused SDPA; our Triton op) counts with its operators, the loss's not
    Avg(NODE + "ScaledDotProductFlashAttentionForCpuBackward0", 8, 700, 20),
    Avg(NODE + "GeneratedBackwardFor_timesformer_harness_short_attention_defaultBackward", 4, 300, 10),
    Avg(NODE + "LogSoftmaxBackward0", 2, 100, 10),
]
# With CUDA activity: every CPU event also carries its kernels' device time (device_time_total: children included;
# self_device_time_total: its own kernels), each range appears a second time as a GPU annotation (device type CUDA,
# CPU time 0, device time = its span on the GPU), and kernels are events too. The annotations' spans are as a real
# H100 profile gave them: train_step's shorter than forward's, so the summary must not divide by them.
GPU = DeviceType.CUDA
CUDA_EVENTS = [
    Avg("ProfilerStep#2", 1, 10500, 100, 7000, 0),
    Avg("train_step", STEPS, 10000, 200, 3800, 0),  # the forward's kernels; backward runs on autograd's thread
    Avg("forward", STEPS, 4000, 100, 3000, 0),
    Avg("attn/temporal", 4, 300, 50, 600, 0),
    Avg("attn/spatial", 4, 400, 50, 1200, 0),
    Avg("aten::mm", 40, 600, 100, 6500, 6500),
    Avg("aten::_scaled_dot_product_flash_attention", 4, 100, 40, 600, 0),
    Avg("aten::_flash_attention_backward", 8, 100, 40, 700, 700),
    Avg("aten::add_", 60, 300, 300, 800, 800),
    Avg(NODE + "ScaledDotProductFlashAttentionBackward0", 4, 150, 20, 700, 0),  # its operator's kernels
    Avg(NODE + "LogSoftmaxBackward0", 2, 50, 5, 40, 0),
    Avg("ProfilerStep#2", 1, 0, 0, 8200, 8200, GPU),
    Avg("train_step", STEPS, 0, 0, 500, 500, GPU),
    Avg("forward", STEPS, 0, 0, 9000, 9000, GPU),
    Avg("attn/temporal", 4, 0, 0, 2000, 2000, GPU),
    Avg("attn/spatial", 4, 0, 0, 2400, 2400, GPU),
    Avg("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", 8, 0, 0, 900, 900, GPU),
]


def test_summary_of_a_cpu_profile_uses_cpu_time():
    s = summarise(CPU_EVENTS, STEPS, "divided_space_time", Path("run"))
    assert s.time_basis == "CPU" and s.step_ms == 5.0 and s.forward_ms == 2.0 and s.step_device_ms == 0.0
    assert s.range_ms == {"attn/temporal": 0.5, "attn/spatial": 1.0}
    assert s.range_share_of_step == {"attn/temporal": 0.1, "attn/spatial": 0.2}
    assert s.range_share_of_forward == {"attn/temporal": 0.25, "attn/spatial": 0.5}
    assert s.top_ops[:3] == [("aten::mm", 1.5, 20), ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 0.25, 4),
                             ("aten::add_", 0.2, 30)]
    assert s.attn_backward_ms == 0.5 and s.sdpa_kernels == ["flash_attention_for_cpu"]  # (700 + 300) us / 2 steps


def test_summary_of_a_cuda_profile_uses_kernel_time(tmp_path):
    """GPU times are kernel time: a range's is the kernels launched inside it, the step's every kernel of the
    step (backward included). The annotations (CPU time 0, listed after the CPU event) neither replace the CPU
    step (no division by zero) nor serve as spans: shares stay below 1 and forward <= step."""
    s = summarise(CUDA_EVENTS, STEPS, "divided_space_time", tmp_path)
    assert s.time_basis == "GPU" and s.step_ms == 5.0 and s.forward_ms == 2.0  # wall time (ends synchronised)
    assert s.step_device_ms == 4.0 and s.forward_device_ms == 1.5  # all kernels: (6500 + 700 + 800) / 2 us
    assert s.range_ms == {"attn/temporal": 0.3, "attn/spatial": 0.6}
    assert s.range_share_of_step == pytest.approx({"attn/temporal": 0.075, "attn/spatial": 0.15})
    assert s.range_share_of_forward == pytest.approx({"attn/temporal": 0.2, "attn/spatial": 0.4})
    # operators by their kernels' time; kernels themselves and the annotations are not operators
    assert [name for name, _, _ in s.top_ops][:4] == ["aten::mm", "aten::add_", "aten::_flash_attention_backward",
                                                      "aten::_scaled_dot_product_flash_attention"]
    assert s.sdpa_kernels == ["flash_attention"] and s.attention_share_of_step == pytest.approx((0.3 + 0.6 + 0.35) / 4)
    assert s.top_ops[0] == ("aten::mm", 3.25, 20) and s.attn_backward_ms == 0.35
    # without the annotations (an older profiler) the figures are the same
    no_annotations = [e for e in CUDA_EVENTS if e.device_type == DeviceType.CPU]
    assert summarise(no_annotations, STEPS, "divided_space_time", tmp_path) == s


def test_cuda_summary_is_written_and_read_back_by_the_gpu_check(tmp_path):
    run = tmp_path / "profile" / "20260101-000000-divided_space_time"
    run.mkdir(parents=True)
    s = summarise(CUDA_EVENTS, STEPS, "divided_space_time", run)
    extra = {"preset": "vit_base_patch16", "batch": 8, "frames": 8, "img_size": 224, "precision": "bf16",
             "device": "NVIDIA H100 80GB HBM3", "wait": 1, "warmup": 1}
    write_summary(s, run / "summary.md", extra)
    text = (run / "summary.md").read_text()
    assert "| attn/temporal | 0.3 | 7.5% | 20.0% |" in text and "| GPU ms per step |" in text
    assert "GPU kernel time 4.0 ms (forward 1.5 ms)" in text and "Top ops by self GPU time" in text
    (run / "x.pt.trace.json").write_text("{}")
    assert json.loads((run / "summary.json").read_text())["preset"] == "vit_base_patch16"
    figures = collect_profile(tmp_path / "profile")("")
    assert figures["sdpa_kernels"] == ["flash_attention"]
    assert figures["attention_share_pct"] == pytest.approx(100 * (0.3 + 0.6 + 0.35) / 4.0, abs=0.1)


def test_profiling_cli_rejects_all():
    out = subprocess.run([sys.executable, "-m", "timesformer_harness.profiling", "--attn", "all"], capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 2 and "takes one variant" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "timesformer_harness.profiling", "--attn", "diagonal", "--preset",
                          "tiny"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode == 2 and "--attn 'diagonal': the profiler takes one variant, from" in bad.stderr


@pytest.mark.parametrize("flag", ["--wait", "--warmup"])
def test_profiling_cli_rejects_a_negative_schedule_before_making_a_folder(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        profiling_main(["--preset", "tiny", flag, "-1", "--out", str(tmp_path / "profile")])
    assert exit_.value.code == 2 and "0 or more" in capsys.readouterr().err
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize("args, message", [
    (["bench.steps=7"], "bench.steps: the profiler does not read it"),
    (["bench.warmup=4"], "use --wait and --warmup"),
    (["bench.out_dir=elsewhere"], "use --out"),
    (["bench.compile=[default]"], "bench.compile: the profiler does not read it"),
    (["data.root=x"], "data.root: the profiler does not read it"),
    (["--attn", "joint_space_time", "model.attention_type=space_only"], "contradicts --attn joint_space_time"),
    (["--steps", "0"], "--steps 0: record at least 1 step"),
])
def test_profiling_cli_refuses_keys_it_would_ignore(args, message, tmp_path, capsys):
    """An override the profile would not apply is refused, naming the flag that does its job: before, the run went
    on without it and its config.yaml recorded the ignored value."""
    with pytest.raises(SystemExit) as exit_:
        profiling_main(["--preset", "tiny", "--out", str(tmp_path / "profile"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "profile").exists()


def test_profiling_cli_takes_the_variant_preset_and_threads_from_overrides(tmp_path, capsys):
    assert profiling_main(["--steps", "1", "--wait", "0", "--warmup", "0", "--out", str(tmp_path), "bench.preset=tiny",
                           "bench.threads=1", "model.attention_type=joint_space_time"]) == 0
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert run.name.endswith("-joint_space_time") and summary["preset"] == "tiny"
    assert summary["attention_type"] == "joint_space_time"
    assert yaml.safe_load((run / "config.yaml").read_text())["bench"]["threads"] == 1


def test_profiling_cli_refuses_torchrun_and_an_output_that_is_a_file(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert profiling_main(["--preset", "tiny", "--steps", "1", "--out", str(afile)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: cannot write under {afile}: it is a file; name a "
                                               "folder with --out")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        profiling_main(["--preset", "tiny", "--out", str(tmp_path / "p")])
    assert exit_.value.code == 2 and "not torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_stopped_profile_leaves_no_partial_run(signum, code, name, tmp_path):
    """A profile stopped mid-way ends with one line and its exit status, and removes its run folder: the partial
    trace it held had read as a whole run in TensorBoard (Ctrl-C had printed a traceback; SIGTERM left a folder)."""
    proc = subprocess.Popen([sys.executable, "-m", "timesformer_harness.profiling", "--preset", "tiny", "--steps",
                             "100000", "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # into the profiled steps
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert f"error: stopped by {name} after " in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_holds_a_trace_tensorboard_lists_only_once_it_is_whole(tmp_path, monkeypatch):
    """Until the summary and config are written the trace is ``*.pt.trace.json.partial`` (torch-tb-profiler lists a
    folder as a run once it holds a ``*.pt.trace.json``, and never forgets it); a Ctrl-C then removes the folder and
    says the steps were all done."""
    from timesformer_harness import profiling

    seen = {}

    def interrupted(s, path, extra):
        seen["traces"] = [p.name for p in path.parent.iterdir() if p.name.endswith(".pt.trace.json")]
        seen["partial"] = [p.name for p in path.parent.glob("*.pt.trace.json.partial")]
        raise KeyboardInterrupt

    monkeypatch.setattr(profiling, "write_summary", interrupted)
    with pytest.raises(ProfileStopped, match=r"stopped by Ctrl-C after its 2 steps, while writing its "
                                                        r"files; removed the unfinished run "):
        run_profile(_cfg("space_only"), "tiny", steps=1, wait=0, warmup=1, out_root=tmp_path)
    assert seen["traces"] == [] and len(seen["partial"]) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_the_profiler_fails_on_is_still_a_stop(tmp_path, monkeypatch):
    """Ctrl-C inside ``prof.step()`` can make the profiler's own clean-up raise (an AssertionError in the context of
    the KeyboardInterrupt): still one line, status 130, no folder left (it had been a traceback, status 1, and a
    folder TensorBoard listed)."""
    from torch.profiler import profile

    step = profile.step
    calls = []

    def step_then_fail(self):
        calls.append(1)
        if len(calls) == 2:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise AssertionError("Expected record to be set")  # what torch's profiler raised
        step(self)

    monkeypatch.setattr(profile, "step", step_then_fail)
    with pytest.raises(ProfileStopped,
                       match=r"stopped by Ctrl-C after 2 of 3 steps; removed the unfinished run "):
        run_profile(_cfg("space_only"), "tiny", steps=1, wait=1, warmup=1, out_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_trace_that_cannot_be_written_is_one_line_and_leaves_no_folder(tmp_path):
    """A full disk or a file size limit: the profiler only logs that its write failed. The profile stops with one line
    naming the folder and the fix, status 2, and removes its run folder (it had been a ValueError from max() and a
    folder holding a half-written trace)."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY)); "
            "from timesformer_harness.profiling import main; "
            f"sys.exit(main(['--preset', 'tiny', '--steps', '1', '--warmup', '0', '--wait', '0', '--out', "
            f"{str(tmp_path)!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    (line,) = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: could not write the trace under {tmp_path}/") and "free space" in line, line
    assert "Traceback" not in res.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["math", "naive"])
def test_attention_backward_is_counted_for_the_unfused_backends(backend, tmp_path):
    """The math and naive backends' backward is batched matmuls and a softmax (no op named for attention): their
    autograd nodes are still the attention's, so its backward time is not reported as 0."""
    cfg = resolve(preset="tiny", overrides=[f"model.attn_backend={backend}"])[0]
    s = run_profile(cfg, "tiny", steps=1, wait=0, warmup=1, out_root=tmp_path)
    assert 0 < s.attn_backward_ms < s.step_ms and s.sdpa_kernels == ([] if backend == "naive" else ["attention_math"])


def test_two_profiles_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "run_stamp", lambda: "20260101-000000")
    first, second = (run_profile(_cfg("space_only"), "tiny", steps=1, wait=0, warmup=0, out_root=tmp_path)
                     for _ in range(2))
    assert Path(first.run_dir).name == "20260101-000000-space_only"
    assert Path(second.run_dir).name == "20260101-000000-space_only-2"
    assert all(len(list(Path(r).glob("*.pt.trace.json"))) == 1 for r in (first.run_dir, second.run_dir))


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
