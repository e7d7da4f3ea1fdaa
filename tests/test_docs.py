"""The docs are complete: every CLI flag of every entry point, every make target and variable, every config key and
every exit status is written down where a user looks for it, and docs/config.md matches the code.

The parsers are built by the entry points' own ``main`` and caught as they start parsing (nothing runs): each
entry point is a module under the package folders that builds an ``argparse.ArgumentParser``; a new one fails
``test_every_entry_point_has_a_doc`` until ``DOCS`` names the docs that describe it."""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, make_dry_run, make_env
from timesformer_harness import config_reference
from timesformer_harness.common import ExitCode
from timesformer_harness.config import RootConfig

PACKAGE_FOLDERS = {"harness": "timesformer_harness", "pipelines": "timesformer_harness.pipelines",
                   "benchmarks": "timesformer_harness.benchmarks", "kernels": "timesformer_harness.kernels"}
# entry point -> the docs that describe it (README.md counts for all): each of its flags must appear in one of them
DOCS = {
    "timesformer_harness.train": ("training.md",),
    "timesformer_harness.evaluate": ("training.md", "your_data.md", "checkpoints.md"),
    "timesformer_harness.validate": ("pipelines.md", "your_data.md", "bad_videos.md"),
    "timesformer_harness.checkpoint": ("checkpoints.md",),
    "timesformer_harness.config_reference": ("config.md",),
    "timesformer_harness.wheelhouse": ("gpu.md", "make.md"),
    "timesformer_harness.gate": ("benchmarking.md",),
    "timesformer_harness.profiling": ("benchmarking.md",),
    "timesformer_harness.counting": ("benchmarking.md", "model.md"),
    "timesformer_harness.gpu_check": ("gpu.md",),
    "timesformer_harness.gpu_perf": ("gpu.md", "benchmarking.md"),
    "timesformer_harness.bench.cli": ("benchmarking.md",),
    "timesformer_harness.bench.compare": ("benchmarking.md",),
    "timesformer_harness.pipelines.validate": ("pipelines.md", "bad_videos.md", "your_data.md", "gpu.md"),
    "timesformer_harness.pipelines.tools.prepare": ("prepare.md",),
    "timesformer_harness.pipelines.tools.toy": ("pipelines.md",),
    "timesformer_harness.benchmarks.gpu_input": ("gpu.md", "pipelines.md"),
    "timesformer_harness.benchmarks.model_vs_naive": ("model.md", "benchmarking.md"),
    "timesformer_harness.benchmarks.bench_validate": ("bad_videos.md", "benchmarking.md"),
    "timesformer_harness.benchmarks.bench_pipelines": ("pipelines.md", "benchmarking.md"),
    "timesformer_harness.benchmarks.bench_prepare": ("prepare.md", "pipelines.md", "benchmarking.md"),
    "timesformer_harness.benchmarks.bench_clip_streams": ("pipelines.md", "benchmarking.md"),
    "timesformer_harness.benchmarks.bench_startup": ("pipelines.md", "benchmarking.md"),
}
EXIT_TABLE = ("training.md", "## Exit statuses")  # the one table of ExitCode


def entry_point_modules(root: Path = REPO) -> set[str]:
    """Every module of the package folders that builds an argument parser (its own, or gpu_perf's script_parser)."""
    found = set()
    for folder, package in PACKAGE_FOLDERS.items():
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            if "ArgumentParser(" in text or "script_parser(" in text:
                found.add(".".join([package, *path.relative_to(root / folder).with_suffix("").parts]))
    return found


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def parser_of(module: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds, caught at its first parse (so ``main`` runs nothing else)."""

    def catch(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(_Parsed) as caught:
            importlib.import_module(module).main([])
    return caught.value.parser


def flags_of(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """``(subcommand, --flag)`` of every documented option (``--help`` and suppressed ones left out); a subcommand
    itself is listed as ``(name, "")``."""
    out = []
    for action in parser._actions:
        subparsers = action.choices if isinstance(action.choices, dict) else {}  # add_subparsers: name -> parser
        if subparsers and all(isinstance(p, argparse.ArgumentParser) for p in subparsers.values()):
            for name, sub in subparsers.items():
                out += [(name, "")] + [(name, flag) for _, flag in flags_of(sub)]
        elif action.help != argparse.SUPPRESS:
            out += [("", o) for o in action.option_strings if o.startswith("--") and o != "--help"]
    return out


def mentions(text: str, word: str) -> bool:
    """``word`` (a flag, target or key) in ``text`` as a whole token: ``--out`` does not match ``--out-dir``."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def doc_text(*names: str) -> str:
    return "\n".join((REPO / "docs" / n).read_text() for n in names) + (REPO / "README.md").read_text()


def test_every_entry_point_has_a_doc() -> None:
    found = entry_point_modules()
    assert found == set(DOCS), (f"entry points without docs in DOCS: {sorted(found - set(DOCS))}; "
                                f"in DOCS but not found: {sorted(set(DOCS) - found)}")
    missing = [f"{m}: docs/{d}" for m, docs in DOCS.items() for d in docs if not (REPO / "docs" / d).is_file()]
    assert not missing, missing


def test_every_cli_flag_is_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = []
    for module, docs in sorted(DOCS.items()):
        text = doc_text(*docs)
        for sub, flag in flags_of(parser_of(module, monkeypatch)):
            if not all(mentions(text, w) for w in (sub, flag) if w):
                missing.append(f"{module} {sub} {flag}".replace("  ", " ") + f" (in none of {', '.join(docs)})")
    assert not missing, "flags missing from the docs:\n  " + "\n  ".join(missing)


def test_the_flag_collector_sees_subcommands_and_skips_suppressed(monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = flags_of(parser_of("timesformer_harness.checkpoint", monkeypatch))
    assert ("convert", "--hf") in checkpoint and ("inspect", "") in checkpoint
    assert ("", "--max-pickle-mib") in checkpoint
    gpu_check = [flag for _, flag in flags_of(parser_of("timesformer_harness.gpu_check", monkeypatch))]
    assert "--rehearse-on-cpu" in gpu_check and "--inject-failure" not in gpu_check  # argparse.SUPPRESS: a test hook
    assert not mentions("make bench-compare", "make bench") and mentions("(`make bench`)", "make bench")


def makefile_targets_and_variables(makefile: Path = REPO / "Makefile") -> tuple[list[str], list[str]]:
    """The Makefile's targets, and the variables a user sets (``NAME ?= ...``, or used in a recipe and set nowhere)."""
    text = makefile.read_text()
    targets = re.findall(r"^([a-z][\w-]*):", text, re.M)
    assigned = set(re.findall(r"^([A-Z_]+)\s*[:?]?=", text, re.M))
    settable = re.findall(r"^([A-Z_]+)\s*\?=", text, re.M)
    used = set(re.findall(r"\$\(([A-Z_]+)\)", text)) - assigned - {"MAKE", "MAKECMDGOALS"}  # make's own
    return targets, sorted(set(settable) | used)


def test_every_make_target_and_variable_is_documented() -> None:
    targets, variables = makefile_targets_and_variables()
    assert {"train", "tensorboard", "clean", "clean-runs", "docs"} <= set(targets)
    assert {"CONFIG", "TRAIN_ARGS", "CHECKPOINT", "LOGDIR", "PYTEST_WORKERS"} <= set(variables)
    text = (REPO / "docs" / "make.md").read_text()
    missing = [f"make {t}" for t in targets if not mentions(text, f"make {t}")]
    missing += [f"{v}=" for v in variables if not re.search(rf"(?<![\w-]){v}=", text)]
    assert not missing, f"Makefile targets and variables missing from docs/make.md: {missing}"


def test_the_exit_status_table_lists_every_exit_code() -> None:
    doc, heading = EXIT_TABLE
    section = (REPO / "docs" / doc).read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.M)}
    assert rows == {int(c) for c in ExitCode}, f"docs/{doc} '{heading}' rows {sorted(rows)} != ExitCode"
    assert doc in (sys.modules[ExitCode.__module__].__doc__ or "") + (ExitCode.__doc__ or "")


def test_every_config_key_has_help_and_docs_config_md_is_current() -> None:
    assert not config_reference.missing_help(RootConfig), "config keys without a help comment"
    keys = config_reference.config_keys(RootConfig)
    assert {"solver.max_epoch", "train.max_steps_per_epoch", "dist.timeout_s", "data.root", "bench.gemm_n"} <= set(keys)
    text = (REPO / "docs" / "config.md").read_text()
    assert all(mentions(text, f"`{k}`") for k in keys)
    assert text == config_reference.render(RootConfig), "docs/config.md is stale: run make docs"


def test_help_comes_from_the_comments_beside_each_field(tmp_path: Path) -> None:
    source = tmp_path / "cfg_fixture.py"
    source.write_text(
        "from dataclasses import dataclass, field\n\n\n@dataclass\nclass Section:\n    \"\"\"A section.\"\"\"\n\n"
        "    a: int = 1  # the a\n    # the b, said above it\n    # over two lines\n    b: list[int] = field(\n"
        "        default_factory=lambda: [1, 2])  # and beside it\n    c: str = \"x\"\n")
    sys.path.insert(0, str(tmp_path))
    try:
        section = importlib.import_module("cfg_fixture").Section
    finally:
        sys.path.remove(str(tmp_path))
    helps = config_reference.field_help(section)
    assert helps == {"a": "the a", "b": "the b, said above it over two lines and beside it", "c": ""}
    assert config_reference.missing_help(section) == ["c"]


def test_the_reference_cli_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "config.md"
    cmd = [sys.executable, "-m", "timesformer_harness.config_reference", "--out", str(out)]
    assert subprocess.run([*cmd, "--check"], capture_output=True, text=True).returncode == 1  # no file yet: stale
    subprocess.run(cmd, check=True, capture_output=True)
    assert out.read_text() == config_reference.render(RootConfig)
    done = subprocess.run([*cmd, "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out.write_text(out.read_text().replace("| `model.depth` |", "| `model.depth_old` |"))
    stale = subprocess.run([*cmd, "--check"], capture_output=True, text=True)
    assert stale.returncode == 1 and "stale" in stale.stderr and "make docs" in stale.stderr


def test_make_clean_keeps_runs_and_clean_runs_deletes_them(tmp_path: Path) -> None:
    checkpoint = tmp_path / "runs/train/mine/checkpoints/checkpoint_epoch_00001.pyth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    (tmp_path / ".pytest_cache").mkdir()
    (tmp_path / ".benchmarks/run").mkdir(parents=True)
    make = ["make", "-s", "-f", str(REPO / "Makefile"), "-C", str(tmp_path)]
    subprocess.run([*make, "clean"], check=True, capture_output=True, timeout=60, env=make_env())
    assert checkpoint.read_bytes() == b"weights"
    assert not (tmp_path / ".pytest_cache").exists() and not (tmp_path / ".benchmarks").exists()
    subprocess.run([*make, "clean-runs"], check=True, capture_output=True, timeout=60, env=make_env())
    assert not (tmp_path / "runs").exists()


def test_the_venv_is_reinstalled_when_its_inputs_change_not_their_mtimes(tmp_path: Path) -> None:
    """``make``'s venv rule: a tree copied onto another machine (every mtime new, the same files) does not run pip
    again (offline GPU machines have no index); a changed pyproject.toml or constraints.txt does."""
    for name in ("pyproject.toml", "constraints.txt"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    (tmp_path / ".venv").mkdir()
    stamp = tmp_path / ".venv/.installed"

    def installs() -> bool:
        return "pip install" in make_dry_run(tmp_path, "venv")

    assert installs()  # no stamp yet
    checksum = subprocess.run("cat pyproject.toml constraints.txt | cksum", shell=True, cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()
    stamp.write_text(checksum + "\n")  # what the install writes
    future = time.time() + 60
    for name in ("pyproject.toml", "constraints.txt"):
        os.utime(tmp_path / name, (future, future))  # newer than the stamp: copied, not changed
    assert not installs()
    with open(tmp_path / "constraints.txt", "a") as f:
        f.write("# refreshed\n")
    assert installs()
    stamp.write_text("")  # a stamp from before checksums: mtimes decide, as they did
    os.utime(stamp, (future - 120, future - 120))
    assert installs()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
        return json.loads(gzip.decompress(body) if r.headers.get("Content-Encoding") == "gzip" else body)


def test_make_tensorboard_serves_training_scalars_and_profiles(tmp_path: Path) -> None:
    """The command ``make tensorboard`` runs, over a runs/ folder holding a training run's scalars (written by the
    Trainer's ``MetricWriter``) and a real profile: both show, the scalars under their run and the trace in the
    profiler plugin."""
    from timesformer_harness.bench import resolve
    from timesformer_harness.metric_writer import MetricWriter
    from timesformer_harness.profiling import run_profile

    runs = tmp_path / "runs"
    (runs / "train/mine").mkdir(parents=True)
    writer = MetricWriter(runs / "train/mine", enabled=True, tensorboard=True)
    for step in (1, 2):
        writer.log({"train/loss": 1.0 / step}, step)
    writer.close()
    cfg = resolve(preset="tiny", overrides=["model.attention_type=divided_space_time"])[0]
    profile = Path(run_profile(cfg, "tiny", steps=1, wait=1, warmup=1, out_root=runs / "profile").run_dir)
    port = _free_port()
    dry = make_dry_run(REPO, "tensorboard", f"LOGDIR={runs}", f"TB_PORT={port}",
                       f"VENV={Path(sys.executable).parent.parent}").splitlines()
    command = next(line for line in dry if "/bin/tensorboard " in line)  # the recipe, after any venv set-up lines
    assert f"--logdir {runs}" in command and f"--port {port}" in command
    proc = subprocess.Popen(shlex.split(command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        tags: dict = {}
        profiles: dict = {}
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, f"tensorboard exited: {proc.stderr.read()[-2000:]}"
            try:
                tags = _get_json(f"{base}/scalars/tags")
                profiles = _get_json(f"{base}/pytorch_profiler/runs")
                if "train/mine/tb" in tags and profiles.get("runs") and not profiles.get("loading"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(1)
        assert "train/loss" in tags.get("train/mine/tb", {}), tags
        assert f"profile/{profile.name}" in profiles.get("runs", []), profiles
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_your_data_manifest_script_keeps_every_video_container_in_any_case(tmp_path: Path) -> None:
    """docs/your_data.md's manifest script kept only lower-case .mp4/.webm: .MP4, .MOV, .mkv were dropped silently.
    Now every container the loaders read is kept, in any case, and what it skips is printed."""
    text = (REPO / "docs" / "your_data.md").read_text()
    script = re.search(r"python - <<'PY'\n(.*?)\nPY\n", text, re.S)
    assert script, "docs/your_data.md lost its manifest script"
    for name in ("a.mp4", "b.MP4", "c.MOV", "d.mkv", "e.webm", "notes.txt"):
        (tmp_path / "mydata" / "videos" / "clap" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "mydata" / "videos" / "clap" / name).write_bytes(b"")
    res = subprocess.run([sys.executable, "-c", script[1]], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    listed = [line.rsplit(" ", 1)[0] for split in ("train", "val", "test")
              for line in (tmp_path / "mydata" / f"{split}.csv").read_text().splitlines()]
    assert sorted(listed) == [f"videos/clap/{n}" for n in ("a.mp4", "b.MP4", "c.MOV", "d.mkv", "e.webm")]
    assert res.stdout.startswith("skipped mydata/videos/clap/notes.txt: not a file ending in .mp4, ")
