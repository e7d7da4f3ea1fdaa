"""The fresh-process runner: call a function in a new Python process and say how it ended.

Bench cases, gate cases and the benchmark scripts each run in a process of their own: on CPU that keeps a case's
peak RSS (``timesformer_harness.metrics.PeakMemory``) free of earlier cases' allocations, and everywhere it keeps
one case's out-of-memory state, allocator caches or crashed threads away from the next one.

    outcome = run_in_fresh_process(run_case, case.to_dict(), timeout_s=600, mem_limit_gb=8)

``fn`` must be a module-level function taking and returning JSON values. The child is
``python -m timesformer_harness.runner MODULE:FUNCTION`` with the payload on stdin; it prints one marked JSON line with
the result, or with the exception it caught. One outcome policy for every caller:

* ``ok``: ``fn`` returned; ``Outcome.result`` is its value.
* ``oom``: ``fn`` raised an out-of-memory error (CUDA OOM, ``MemoryError``, a CPU allocator failure, e.g. under
  the address-space cap ``mem_limit_gb`` sets), the process exited with an allocator's out-of-memory message as
  its last words (native libraries such as OpenBLAS exit instead of raising), or it was killed by a signal
  (negative return code, or 137 = 128 + SIGKILL from a shell): on Linux that is the kernel's OOM killer far more
  often than anything else; the message names the signal.
* ``error``: any other exception (``Outcome.traceback`` holds the child's traceback), another non-zero exit, no
  result line, or a timeout (the whole process group is killed).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from timesformer_harness.config import REPO_ROOT
from timesformer_harness.metrics import Stopwatch
from timesformer_harness.runtime import COMMAND_ENV

RESULT_MARK = "HARNESS_RUNNER_RESULT "
OUTCOMES = ("ok", "oom", "error")


@dataclass
class Outcome:
    """How a fresh-process call ended (see the module docstring for the policy)."""

    status: str  # ok | oom | error
    result: Any = None  # fn's return value (status ok)
    message: str = ""  # one line for a record or a log: the exception, the signal or the timeout
    traceback: str = ""  # the child's formatted traceback, when it raised
    returncode: int | None = None  # None after a timeout
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        assert self.status in OUTCOMES, f"outcome {self.status!r} not in {OUTCOMES}"


# What allocators say when they give up (torch's CPU allocator, CUDA, glibc's strerror, OpenBLAS).
OOM_PHRASES = ("out of memory", "can't allocate memory", "cannot allocate memory", "memory allocation")


def says_oom(text: str) -> bool:
    """True when ``text`` is an allocator's out-of-memory message."""
    text = text.lower()
    return any(phrase in text for phrase in OOM_PHRASES)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA OOM and for CPU allocation failures (e.g. under the runner's address-space cap)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or says_oom(str(exc))


def _target_name(fn: Callable[[Any], Any]) -> str:
    module = fn.__module__
    if module == "__main__":  # a script run with ``python -m pkg.mod``: the child imports it by that name
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError(f"{fn.__qualname__} is defined in a script run by path; run it with python -m, or "
                             "move the function into a module")
        module = spec.name
    if "<locals>" in fn.__qualname__:
        raise ValueError(f"{fn.__qualname__} is a nested function; the runner needs a module-level function")
    return f"{module}:{fn.__qualname__}"


def _signal_name(returncode: int) -> str:
    num = -returncode if returncode < 0 else returncode - 128
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


@dataclass
class Finished:
    """How a command ended: its exit code (None when it ran out of time and was killed), what it wrote (when
    captured) and its wall time."""

    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0


def run_command(argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None, cwd: str | Path = REPO_ROOT,
                input: str | None = None, stdout: IO[str] | None = None) -> Finished:
    """Run ``argv`` in its own process group (cwd: the repository root) and wait at most ``timeout_s``; past it, or
    when the wait is interrupted, the whole group is killed (the command and anything it started: loader workers,
    torchrun's ranks). ``input`` goes to its stdin; its output is captured, or both streams go to ``stdout`` (a
    log file). The one way the harness starts a process: the fresh-process runner below and the GPU acceptance
    check's commands use it. (The loader shoot-out keeps a process per row across its rounds, which a command that
    runs to its end cannot: it uses ``multiprocessing``.)"""
    clock = Stopwatch()
    capture = stdout is None
    proc = None
    try:
        with _signals_held():  # a Ctrl-C or SIGTERM while it starts is raised once proc exists: its group is killed
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else None,
                                    stdout=subprocess.PIPE if capture else stdout,
                                    stderr=subprocess.PIPE if capture else subprocess.STDOUT, text=True, cwd=cwd,
                                    env=env, start_new_session=True)
        out, err = proc.communicate(input, timeout=timeout_s)
        return Finished(proc.returncode, out or "", err or "", clock.elapsed())
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()  # what it wrote before it was killed (a result printed before a hang at exit)
        return Finished(None, out or "", err or "", clock.elapsed())
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are held and raised again when it ends (main thread only,
    where Python runs signal handlers): a process started in the block is then known, and can be killed, before
    they act. Without it, one arriving while ``subprocess.Popen`` runs leaves the new process running, unknown."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in held:
            os.kill(os.getpid(), signum)


def run_in_fresh_process(fn: Callable[[Any], Any], payload: Any, *, timeout_s: float, mem_limit_gb: float = 0.0,
                         env: dict[str, str] | None = None) -> Outcome:
    """Call ``fn(payload)`` in a new ``python`` process (cwd = the repository root) and classify how it ended.

    Args:
        fn: a module-level function; payload and return value must be JSON-serialisable.
        timeout_s: wall-clock limit; past it the child's whole process group is killed (status ``error``).
        mem_limit_gb: if > 0, the child caps its address space at its size after start-up plus this much
            (``RLIMIT_AS``), so a too-big CPU case fails to allocate (status ``oom``) instead of swapping a shared
            machine. Leave 0 on CUDA: the driver reserves far more address space than it uses.
        env: extra environment variables for the child. ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (idle OpenMP
            threads sleep instead of spinning: on a shared CPU a spinning barrier whose partner thread was
            preempted costs whole scheduler ticks per op); set it in ``env`` or the parent's environment to override.
    """
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    child_env.setdefault(COMMAND_ENV, shlex.join(sys.orig_argv))
    cmd = [sys.executable, "-m", "timesformer_harness.runner", _target_name(fn), str(mem_limit_gb)]
    done = run_command(cmd, timeout_s=timeout_s, env=child_env, input=json.dumps(payload))
    wall, code, stdout, stderr = done.wall_s, done.returncode, done.stdout, done.stderr
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):  # also from a worker that then hung on its way out and was killed
            out = json.loads(line[len(RESULT_MARK):])
            notes = [out.get("message", "")]
            if code is None:
                notes.append(f"the worker gave its result, then hung at exit: killed after {timeout_s:g} s")
            return Outcome(out["status"], out.get("result"), "; ".join(n for n in notes if n), out.get("traceback", ""),
                           code, wall)
    if code is None:
        return Outcome("error", message=f"timed out after {timeout_s:g} s", wall_s=wall)
    tail = (stderr.strip().splitlines() or ["no output"])[-1][:300]
    if code == -signal.SIGKILL:
        return Outcome("oom", message=f"worker killed by SIGKILL (exit {code}; the kernel's OOM killer is the usual "
                                      f"sender): {tail}", returncode=code, wall_s=wall)
    if code < 0 and not says_oom(tail):  # SIGSEGV, SIGABRT, SIGBUS, ...: a crash in native code, not a memory limit
        name = _signal_name(code)
        why = "stopped from outside" if name in ("SIGINT", "SIGTERM") else "a crash in native code"
        return Outcome("error", message=f"worker died of {name} (exit {code}): {why}; its last output: {tail}",
                       returncode=code, wall_s=wall)
    status = "oom" if says_oom(tail) else "error"  # a native library that exits when an allocation fails
    return Outcome(status, message=f"worker exited with code {code} and no result: {tail}", returncode=code,
                   wall_s=wall)


def _limit_address_space(limit_gb: float) -> None:
    import psutil

    cap = psutil.Process().memory_info().vms + int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _child(target: str, mem_limit_gb: float) -> int:
    """The child's side: import ``MODULE:FUNCTION``, call it on the stdin payload, print the marked result."""
    from timesformer_harness.runtime import retain_freed_memory

    retain_freed_memory()  # as the harness's own entry points do: batches reuse pages
    payload = json.loads(sys.stdin.read())
    module, _, name = target.partition(":")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    if mem_limit_gb > 0:
        import torch  # noqa: F401 - loaded before the cap: its libraries reserve address space when they load

        _limit_address_space(mem_limit_gb)
    try:
        out = {"status": "ok", "result": fn(payload)}
    except Exception as e:  # noqa: BLE001 - every failure becomes an outcome
        first = str(e).splitlines()[0] if str(e) else ""
        out = {"status": "oom" if is_oom(e) else "error", "message": f"{type(e).__name__}: {first}"[:300],
               "traceback": traceback.format_exc()}
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0 if out["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], float(sys.argv[2])))
