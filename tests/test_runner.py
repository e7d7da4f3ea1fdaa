"""timesformer_harness.runner: the one fresh-process runner and its outcome policy, on real child processes (a function
that returns, raises, allocates past the address-space cap, is SIGKILLed, or outlives its timeout)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from timesformer_harness.runner import Outcome, is_oom, run_in_fresh_process

# The child imports this module by name; tests/ is on its path through PYTHONPATH.
ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent)}


def returns(payload: dict) -> dict:
    return {"doubled": payload["x"] * 2, "pid": os.getpid()}


def raises(payload: dict) -> None:
    raise ValueError(f"bad input {payload['x']}")


def allocates(payload: dict) -> None:
    import torch

    torch.empty(payload["bytes"], dtype=torch.uint8).fill_(1)  # past the cap: the allocator fails


def exits_like_openblas(payload: dict) -> None:
    sys.stderr.write("OpenBLAS error: Memory allocation still failed after 10 retries, giving up.\n")
    sys.stderr.flush()
    os._exit(1)


def exits_quietly(payload: dict) -> None:
    os._exit(3)


def kills_itself(payload: dict) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def aborts(payload: dict) -> None:
    os.abort()


def hangs(payload: dict) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    Path(payload["pid_file"]).write_text(str(child.pid))
    time.sleep(120)


def returns_then_hangs_at_exit(payload: dict) -> int:
    threading.Thread(target=time.sleep, args=(120,)).start()  # not a daemon: the interpreter waits for it at exit
    return 42


def _alive(pid: int) -> bool:
    """Running (a killed process that nobody has reaped yet is a zombie, state Z: not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_ok_returns_the_value_from_another_process():
    out = run_in_fresh_process(returns, {"x": 21}, timeout_s=120, env=ENV)
    assert out.status == "ok", out.message
    assert out.result["doubled"] == 42 and out.result["pid"] != os.getpid()
    assert out.returncode == 0 and out.wall_s > 0


def test_an_exception_is_an_error_with_its_traceback():
    out = run_in_fresh_process(raises, {"x": 7}, timeout_s=120, env=ENV)
    assert out.status == "error"
    assert out.message == "ValueError: bad input 7"
    assert "in raises" in out.traceback and "ValueError: bad input 7" in out.traceback
    assert out.returncode == 1


def test_an_allocation_past_the_address_space_cap_is_oom():
    out = run_in_fresh_process(allocates, {"bytes": 4 * 2**30}, timeout_s=120, mem_limit_gb=0.5, env=ENV)
    assert out.status == "oom", (out.status, out.message)
    assert "allocate" in out.message
    # the same allocation without the cap is not refused up front (virtual memory), so the cap made the difference
    small = run_in_fresh_process(allocates, {"bytes": 2**20}, timeout_s=120, mem_limit_gb=0.5, env=ENV)
    assert small.status == "ok", small.message


def test_an_exit_without_a_result_is_oom_only_after_an_allocator_message():
    native = run_in_fresh_process(exits_like_openblas, {}, timeout_s=120, env=ENV)
    assert native.status == "oom" and native.returncode == 1 and "Memory allocation still failed" in native.message
    quiet = run_in_fresh_process(exits_quietly, {}, timeout_s=120, env=ENV)
    assert quiet.status == "error" and quiet.returncode == 3 and "exited with code 3 and no result" in quiet.message


def test_a_sigkilled_worker_is_oom_and_named():
    out = run_in_fresh_process(kills_itself, {}, timeout_s=120, env=ENV)
    assert out.status == "oom"
    assert out.returncode == -signal.SIGKILL and "SIGKILL" in out.message


def test_a_worker_that_crashes_is_an_error_not_out_of_memory():
    """SIGABRT or SIGSEGV is native code crashing (a decoder, a kernel launcher): an error, which the device scripts
    count as a failure; only SIGKILL is what the OOM killer sends."""
    out = run_in_fresh_process(aborts, {}, timeout_s=120, env=ENV)
    assert out.status == "error" and out.returncode == -signal.SIGABRT, out
    assert out.message.startswith("worker died of SIGABRT (exit -6): a crash in native code")


def test_a_timeout_is_an_error_and_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    t0 = time.perf_counter()
    out = run_in_fresh_process(hangs, {"pid_file": str(pid_file)}, timeout_s=15, env=ENV)
    assert out.status == "error" and out.message == "timed out after 15 s" and out.returncode is None
    assert time.perf_counter() - t0 < 60
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 10
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the worker's own child outlived the timeout"


def test_a_result_given_before_a_hang_at_exit_is_kept():
    """A worker that printed its result and then hung on its way out (a thread, a driver's teardown) is killed at
    the timeout, and its result is kept with a note: the measurement was made."""
    out = run_in_fresh_process(returns_then_hangs_at_exit, {}, timeout_s=10, env=ENV)
    assert out.status == "ok" and out.result == 42 and out.returncode is None, out
    assert out.message == "the worker gave its result, then hung at exit: killed after 10 s"


def test_nested_functions_are_refused_before_starting():
    def local(payload):
        return payload

    with pytest.raises(ValueError, match="module-level function"):
        run_in_fresh_process(local, {}, timeout_s=10)


def test_is_oom_recognises_the_allocator_messages():
    import torch

    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(MemoryError())
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert Outcome("ok").traceback == ""


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals reach the main thread")
def test_a_signal_while_the_command_starts_still_kills_it(monkeypatch):
    """SIGTERM (turned into SystemExit, as the entry points do) that arrives while ``subprocess.Popen`` is starting
    the command: it acts once the command is known, so the command is killed, not left running unknown."""
    from timesformer_harness.runner import run_command

    started: list[int] = []
    real_popen = subprocess.Popen

    def popen_then_signal(*args, **kwargs):  # noqa: ANN002, ANN003 - Popen's own
        proc = real_popen(*args, **kwargs)
        started.append(proc.pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # where the handler runs, before Popen returns
        return proc

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        monkeypatch.setattr(subprocess, "Popen", popen_then_signal)
        with pytest.raises(SystemExit) as stopped:
            run_command([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=60)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143 and started
    time.sleep(0.2)
    assert not _alive(started[0])


def exits_255_out_of_memory(payload: dict) -> None:
    print("terminate called: memory allocation failed", file=sys.stderr, flush=True)
    os._exit(255)


def test_an_exit_code_above_128_is_an_exit_code_not_a_signal():
    """The worker is started without a shell: 255 is its exit status (here after an allocation failed), not
    signal 127."""
    out = run_in_fresh_process(exits_255_out_of_memory, {}, timeout_s=120, env=ENV)
    assert out.status == "oom" and out.returncode == 255 and "exited with code 255" in out.message, out
