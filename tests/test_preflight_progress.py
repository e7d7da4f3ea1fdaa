"""The pre-flight check's progress and its resumable caches: the probe and the deep check store results as they come,
so that a check interrupted by Ctrl-C (SIGINT to its process group, as a terminal sends it) exits 130 with one line and
a rerun takes what was done from the cache; progress is a bar on a terminal and dated log lines in a redirected log;
``--cache none`` and ``data.validate_cache=none`` both mean no cache."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import encode_video, textured_frames
from corrupt_videos import corrupt_bytes, file_layout
from timesformer_harness.common import LAYOUT
from timesformer_harness.config import REPO_ROOT
from timesformer_harness.pipelines.progress import Progress
from timesformer_harness.pipelines.validate import deep_probe, each_completed

CLI = [sys.executable, "-m", "timesformer_harness.pipelines.validate"]
CLIP = ["--frames", "4", "--sampling-rate", "2"]
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")
DEEP_LINE = re.compile(r"deep-checked (\d+) videos .*?(\d+) from cache\)")


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of 60 videos: hard links to one real 320x240 VP9 clip of 32 frames (about 40 ms of deep check
    each here), and two copies whose coded frame is damaged (the probe passes them, the deep check does not), one
    first, one last."""
    root = tmp_path_factory.mktemp("many")
    clip = encode_video(root / "clip.webm", textured_frames(32, 240, 320, seed=3))
    bad = corrupt_bytes(clip.read_bytes(), file_layout(clip), "payload/mid", np.random.default_rng(0))
    (root / "bad_first.webm").write_bytes(bad)
    (root / "bad_last.webm").write_bytes(bad)
    assert deep_probe(str(root / "bad_first.webm")).startswith("decode error")
    names = ["bad_first.webm"]
    for i in range(58):
        os.link(clip, root / f"v{i:03d}.webm")
        names.append(f"v{i:03d}.webm")
    names.append("bad_last.webm")
    (root / "m.csv").write_text("".join(f"{n} 0\n" for n in names))
    return root / "m.csv"


def deep_rows(cache: Path) -> int:
    """Verdicts the deep check has committed to ``cache`` (0 before its table exists)."""
    if not cache.exists():
        return 0
    try:
        with sqlite3.connect(cache, timeout=10) as db:
            return db.execute(f"SELECT count(*) FROM deep_{LAYOUT}").fetchone()[0]
    except sqlite3.OperationalError:  # no table yet
        return 0


def running_in_group(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that have not exited (zombies waiting for a parent to reap them have)."""
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return alive



def interrupt_once_cached(args: list[str], cache: Path) -> tuple[subprocess.Popen, str, str]:
    """Start ``args`` in a process group of its own, send the group SIGINT (what Ctrl-C in a terminal does) as soon as
    the deep check's first chunk is in ``cache``, and wait: (the process, its stdout, its stderr)."""
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                           start_new_session=True)
    while deep_rows(cache) == 0 and run.poll() is None:
        time.sleep(0.005)
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=120)
    return run, out, err

def test_an_interrupted_deep_check_resumes_from_its_cache(many: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c.sqlite"
    args = [*CLI, str(many), *CLIP, "--deep", "--workers", "2"]
    run, out, err = interrupt_once_cached([*args, "--cache", str(cache)], cache)
    assert run.returncode == 130, (out, err)
    *logged, last = err.splitlines()  # the log lines before it, then one error line
    assert last == f"error: interrupted; what was checked is in {cache}: a rerun takes it from there", err
    assert all(LINE.match(line) for line in logged) and "Traceback" not in err, err
    for _ in range(1000):  # the worker processes (and the forkserver) go with it
        if not running_in_group(run.pid):
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"processes of the interrupted check are still running: {running_in_group(run.pid)}")
    stored = deep_rows(cache)
    assert 0 < stored < 60  # what finished before the interrupt, not all (the probe rejects none)

    again = subprocess.run([*args, "--cache", str(cache), "--report", str(tmp_path / "resumed.json")],
                           capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    fresh = subprocess.run([*args, "--cache", "none", "--report", str(tmp_path / "fresh.json")], capture_output=True,
                           text=True, cwd=REPO_ROOT, timeout=120)
    assert again.returncode == fresh.returncode == 1, again.stderr
    assert [m.groups() for m in DEEP_LINE.finditer(again.stderr)] == [(str(60 - stored), str(stored))]
    assert [m.groups() for m in DEEP_LINE.finditer(fresh.stderr)] == [("60", "0")]
    resumed, whole = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("resumed", "fresh"))
    assert resumed == whole and resumed["usable"] == 58
    assert [Path(r["path"]).name for r in whole["rejected"]] == ["bad_first.webm", "bad_last.webm"]


def test_a_redirected_log_gets_dated_progress_lines(many: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("".join(many.read_text().splitlines(keepends=True)[:12]))
    with open(tmp_path / "log.txt", "w") as log:  # stderr a file, as under torchrun or SLURM
        res = subprocess.run([*CLI, str(manifest), "--path-prefix", str(many.parent), *CLIP, "--deep", "--workers",
                              "2", "--cache", "none", "--log-every", "0"], stdout=subprocess.PIPE, stderr=log,
                             text=True, cwd=REPO_ROOT, timeout=120)
    text = (tmp_path / "log.txt").read_text()
    assert res.returncode == 1, text  # bad_first.webm
    assert "\r" not in text and "\x1b" not in text  # no bar
    lines = text.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    for step, total in (("probe", 12), ("deep check", 12)):
        done = [int(m.group(1)) for line in lines if (m := re.search(rf": {step}: (\d+)/{total} files \(\d+%\), "
                                                                    rf"[\d.]+ files/s, 0 from cache", line))]
        assert done == list(range(1, total + 1)), (step, lines)  # --log-every 0: a line per file, in order


def test_progress_is_a_bar_on_a_terminal_and_timed_lines_in_a_log(caplog: pytest.LogCaptureFixture) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    with Progress("deep check", 10, cached=4, stream=tty, interval=0) as bar:
        bar.update(6)
    assert "\rdeep check:  40%|" in tty.getvalue() and "| 4/10 [" in tty.getvalue()  # cached files count as done
    assert "from cache=4]" in tty.getvalue() and tty.getvalue().endswith("\r")  # and the bar goes at the end
    assert caplog.records == []  # a terminal gets the bar, no log lines

    now = [0.0]
    log = logging.getLogger("test_progress")
    with caplog.at_level(logging.INFO, logger="test_progress"):
        with Progress("probe", 3000, cached=1000, stream=io.StringIO(), interval=30, log=log,
                      clock=lambda: now[0]) as bar:
            for _ in range(2000):
                now[0] += 0.0625  # 16 files/s: a line every 480 files
                bar.update()
    assert [r.getMessage() for r in caplog.records] == [
        f"probe: {done}/3000 files ({100 * done // 3000}%), 16.0 files/s, 1000 from cache, about {left} left"
        for done, left in ((1480, "1 min 35 s"), (1960, "1 min 05 s"), (2440, "35 s"), (2920, "5 s"))]

    caplog.clear()
    quiet = Terminal()
    with Progress("probe", 5, stream=quiet, interval=0, show=False) as bar:  # a rank other than 0
        bar.update(5)
    with Progress("probe", 5, cached=5, stream=quiet, interval=0) as bar:  # all from the cache: nothing to show
        pass
    assert quiet.getvalue() == "" and caplog.records == []


def _fail_on_x(path: str) -> str:
    if path == "x":
        raise ValueError("x is bad")
    time.sleep(0.05)
    return path


def test_a_script_without_a_main_guard_is_told_why_its_workers_died(tmp_path: Path) -> None:
    """Each worker of the process pool imports the main script; one without an ``if __name__ == "__main__":`` guard
    re-runs its work there and the worker dies: the error says so instead of a bare BrokenProcessPool."""
    script = tmp_path / "unguarded.py"
    script.write_text("import os, sys\nfrom timesformer_harness.pipelines.validate import each_completed\n"
                      "print(list(each_completed(os.path.getsize, [sys.executable] * 8, workers=2)))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1 and "RuntimeError: a worker process of the 2-process check died" in done.stderr
    assert 'no `if __name__ == "__main__":` guard' in done.stderr, done.stderr[-2000:]


def test_each_completed_stops_its_workers_on_an_error() -> None:
    paths = ["a", "b", "c", "x"] + [f"p{i}" for i in range(40)]
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="x is bad"):
        for _ in each_completed(_fail_on_x, paths, 2):
            pass
    assert set(multiprocessing.active_children()) == before  # terminated, not left to finish the queue
    good = [f"p{i}" for i in range(7)]
    assert sorted(each_completed(_fail_on_x, good, 2, chunk=3)) == list(enumerate(good))  # tasks of 3, 3 and 1
    assert sorted(each_completed(_fail_on_x, good[:3], 2, processes=False)) == list(enumerate(good[:3]))


def test_cache_none_means_no_cache_for_the_cli_as_for_the_config(many: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("v000.webm 0\nv001.webm 0\n")
    for setting in ("none", ""):
        for _ in range(2):  # the second run probes again: nothing was kept
            res = subprocess.run([*CLI, str(manifest), "--path-prefix", str(many.parent), *CLIP, "--cache", setting],
                                 capture_output=True, text=True, cwd=tmp_path, timeout=120)
            assert res.returncode == 0, res.stderr
            assert "probed 2 videos (0 from cache)" in res.stderr
    assert list(tmp_path.iterdir()) == [manifest]  # no file named none


def test_the_cli_refuses_a_cache_on_a_shared_filesystem_in_its_own_words(tmp_path: Path, monkeypatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    import timesformer_harness.common as common
    from timesformer_harness.pipelines import validate

    if common.filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm to stand in for a shared filesystem")
    monkeypatch.setattr(common, "NETWORK_FILESYSTEMS", frozenset({"tmpfs"}))  # tmpfs stands in for NFS
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "m.csv").write_text("a.webm 0\n")
    shared = f"/dev/shm/harness-test-{os.getpid()}/c.sqlite"
    assert validate.main([str(tmp_path / "m.csv"), "--cache", shared]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --cache {shared} is on tmpfs, a shared filesystem") and "or set none" in err
    assert "data.validate_cache" not in err and not Path(shared).parent.exists()


def test_a_runs_preflight_check_interrupted_resumes_too(many: Path, tmp_path: Path) -> None:
    """``python -m timesformer_harness.validate --config`` runs the check a training runs (``factory.preflight``):
    the same 130 and one line on SIGINT, and the rerun takes the stored verdicts from the cache. One worker: the
    check runs in the process itself, which the interrupt then stops inside a decode."""
    cache = tmp_path / "c.sqlite"
    args = [sys.executable, "-m", "timesformer_harness.validate", "--config", "configs/exp/toy_divided_cpu.yaml",
            "--deep", f"data.root={many.parent}", f"data.train_manifest={many}", f"data.path_prefix={many.parent}",
            f"data.validate_cache={cache}", "data.num_workers=1"]
    run, out, err = interrupt_once_cached(args, cache)
    assert run.returncode == 130, (out, err)
    *logged, last = err.splitlines()
    assert last.startswith("error: interrupted; the videos checked so far are cached") and "Traceback" not in err, err
    stored = deep_rows(cache)
    assert 0 < stored < 60
    again = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert again.returncode == 1, again.stderr  # the two damaged copies
    assert [m.groups() for m in DEEP_LINE.finditer(again.stderr)] == [(str(60 - stored), str(stored))]
    assert "58/60 videos usable" in again.stdout


def test_a_training_interrupted_in_its_preflight_check_exits_130_at_once(many: Path, tmp_path: Path) -> None:
    """Training installs its own SIGINT handler (finish the step, save) only after the train loader's pre-flight
    check: Ctrl-C during the check stops it there, and the verdicts that came in are in the cache."""
    cache = tmp_path / "c.sqlite"
    args = [sys.executable, "-m", "timesformer_harness.train", "--config", "configs/exp/toy_divided_cpu.yaml",
            f"data.root={many.parent}", f"data.train_manifest={many}", f"data.path_prefix={many.parent}",
            "data.validate=deep", f"data.validate_cache={cache}", "data.num_workers=1",
            f"output.dir={tmp_path / 'run'}", "train.eval_period=0", "solver.max_epoch=1"]
    run, out, err = interrupt_once_cached(args, cache)
    assert run.returncode == 130, (out, err[-3000:])
    assert err.splitlines()[-1].startswith("error: interrupted") and "Traceback" not in err, err[-3000:]
    assert 0 < deep_rows(cache) < 60 and not list((tmp_path / "run").rglob("*.pyth"))


def test_an_interrupted_probe_keeps_every_result_that_came_in(many: Path, tmp_path: Path, monkeypatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """In this process (one worker): Ctrl-C arriving in the 20th probe leaves the 19 before it in the cache (16 in
    the first chunk, 3 flushed on the way out), and the next probe takes them from there."""
    from timesformer_harness.pipelines import validate

    paths = [str(many.parent / line.split()[0]) for line in many.read_text().splitlines()[:30]]
    cache = tmp_path / "c.sqlite"
    real, calls = validate.probe_video, []

    def interrupted(path: str) -> validate.VideoInfo:
        calls.append(path)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(validate, "probe_video", interrupted)
    with pytest.raises(KeyboardInterrupt):
        validate.probe_all(paths, cache, workers=1)
    monkeypatch.setattr(validate, "probe_video", real)
    with caplog.at_level(logging.INFO, logger="timesformer_harness.pipelines.validate"):
        infos = validate.probe_all(paths, cache, workers=1)
    assert "probed 11 videos (19 from cache)" in caplog.text
    assert infos == [real(p) for p in paths]


def test_a_terminal_gets_a_bar_not_log_lines(many: Path, tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    manifest = tmp_path / "m.csv"
    manifest.write_text("".join(many.read_text().splitlines(keepends=True)[1:13]))  # 12 good files
    leader, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 rows of 120 columns
    res = subprocess.run([*CLI, str(manifest), "--path-prefix", str(many.parent), *CLIP, "--deep", "--workers", "1",
                          "--cache", "none", "--log-every", "0"], stdout=subprocess.PIPE, stderr=terminal, text=True,
                         cwd=REPO_ROOT, timeout=120)
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal's other end is closed and drained
            break
        if not data:
            break
        shown += data
    os.close(leader)
    text = shown.decode()
    assert res.returncode == 0, text
    for step in ("probe", "deep check"):  # tqdm's bars, drawn over themselves
        assert re.search(rf"\r{step}: +\d+%\|[^\r]*\| \d+/12 \[", text), text
    assert ": probe: " not in text and ": deep check: " not in text  # and no progress log lines
