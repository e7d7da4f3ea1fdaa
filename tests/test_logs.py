"""Logging set-up: one handler and one format for every CLI (timesformer_harness.common.setup_logging),
rank-aware."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from timesformer_harness.common import setup_logging

REPO = Path(__file__).resolve().parent.parent
HARNESS_CLIS = ("harness/checkpoint.py", "harness/train.py", "harness/evaluate.py")
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (\[rank\d+\] )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    yield root
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_one_handler_rank_prefix_and_quiet_ranks(root_logger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    setup_logging(rank=0)
    setup_logging(rank=1)  # a second call replaces the handler, it does not add one
    assert len(root_logger.handlers) == 1 and root_logger.level == logging.WARNING
    record = logging.LogRecord("timesformer_harness.pipelines.x", logging.WARNING, __file__, 1, "hello", None, None)
    assert LINE.match(root_logger.handlers[0].format(record)).group(1) == "[rank1] "
    monkeypatch.setenv("WORLD_SIZE", "1")
    setup_logging(logging.DEBUG, rank=0)
    assert root_logger.level == logging.DEBUG
    assert LINE.fullmatch(root_logger.handlers[0].format(record)[:-5])


def calls_in_main(path: Path) -> set[str]:
    """Names called inside ``main()`` of ``path`` (empty when it has none)."""
    tree = ast.parse(path.read_text())
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    return {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
            for m in mains for n in ast.walk(m) if isinstance(n, ast.Call)}


def test_every_cli_sets_up_logging_the_one_way() -> None:
    files = sorted((REPO / "pipelines").rglob("*.py")) + [REPO / f for f in HARNESS_CLIS]
    clis = [f for f in files if "def main(" in f.read_text()]
    assert {str(f.relative_to(REPO)) for f in clis} >= {"pipelines/validate.py", "pipelines/tools/prepare.py",
                                                        "pipelines/tools/toy.py", *HARNESS_CLIS}
    for f in clis:
        called = calls_in_main(f)
        assert "setup_logging" in called and "basicConfig" not in called, f"{f.relative_to(REPO)}: {called}"
    others = [f for f in files if "basicConfig" in f.read_text()]
    assert not others, others


def test_a_cli_logs_in_the_one_format(videos, tmp_path: Path) -> None:
    manifest = videos.manifest("logs.csv", videos.good[:2])
    res = subprocess.run([sys.executable, "-m", "timesformer_harness.pipelines.validate", str(manifest), "--cache", "",
                          "--frames", "4",
                          "--sampling-rate", "2"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines and all(LINE.match(line) for line in lines), lines
