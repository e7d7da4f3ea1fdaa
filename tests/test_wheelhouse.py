"""The wheelhouse for machines without network: what it downloads, that make venv installs from it alone, and (slow)
that a real one, downloaded here, resolves the harness with no index."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_dry_run
from timesformer_harness import wheelhouse


def test_requirement_names_are_normalised() -> None:
    assert wheelhouse.requirement_name("Torch_TB.profiler>=0.4.3") == "torch-tb-profiler"
    assert wheelhouse.requirement_name("torch>=2.6") == "torch"
    assert wheelhouse.requirement_name("pytest-xdist >= 3.5; python_version > '3'") == "pytest-xdist"
    with pytest.raises(ValueError, match="not a requirement"):
        wheelhouse.requirement_name(">=1")


def test_it_downloads_the_build_backend_the_dependencies_and_the_test_extra_without_torch() -> None:
    reqs = wheelhouse.requirements(REPO / "pyproject.toml")
    names = [wheelhouse.requirement_name(r) for r in reqs]
    assert "torch" not in names
    assert {"setuptools", "nvidia-dali-cuda120", "av", "omegaconf", "torch-tb-profiler", "pytest", "pytest-xdist",
            "transformers"} <= set(names)
    assert len(names) == len(set(names))
    with_torch = wheelhouse.requirements(REPO / "pyproject.toml", torch_spec="torch==2.13.0")
    assert with_torch == reqs + ["torch==2.13.0"]


def _make_plan(tmp_path: Path, *args: str) -> list[str]:
    """The commands ``make -n`` would run in a tree with this repository's pyproject.toml and constraints.txt and no
    venv, one per line."""
    for name in ("pyproject.toml", "constraints.txt"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    return make_dry_run(tmp_path, *args).splitlines()


def test_make_venv_with_wheels_installs_from_that_folder_alone(tmp_path: Path) -> None:
    installs = [line for line in _make_plan(tmp_path, "venv", "WHEELS=/wh") if "pip install" in line]
    assert len(installs) == 3  # torch (when the python has none), triton (likewise), the harness
    assert all("--no-index --find-links /wh" in line for line in installs)
    assert not any("--no-index" in line for line in _make_plan(tmp_path, "venv"))


def test_make_wheelhouse_fills_the_folder_from_the_index(tmp_path: Path) -> None:
    plan = _make_plan(tmp_path, "wheelhouse", "WHEELS=/wh", "WHEELHOUSE_ARGS=--python-version 3.12")
    assert not any("--no-index" in line for line in plan)  # its own venv comes from the index
    assert any(re.search(r"-m timesformer_harness\.wheelhouse --out /wh --constraints 'constraints\.txt' "
                         r"--python-version 3\.12$", line) for line in plan)


def test_missing_inputs_are_named_before_anything_is_downloaded(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "timesformer_harness.wheelhouse", "--out", str(tmp_path / "wheels")]
    no_pins = subprocess.run([*cmd, "--constraints", str(tmp_path / "pins.txt")], capture_output=True, text=True)
    assert no_pins.returncode == 2 and "pins.txt" in no_pins.stderr and "--constraints ''" in no_pins.stderr
    no_project = subprocess.run([*cmd, "--pyproject", str(tmp_path / "pyproject.toml")], capture_output=True, text=True)
    assert no_project.returncode == 2 and "pyproject.toml" in no_project.stderr and "clone" in no_project.stderr
    assert not (tmp_path / "wheels").exists()


@pytest.mark.slow
def test_a_downloaded_wheelhouse_installs_the_harness_with_no_index(tmp_path: Path) -> None:
    out = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "timesformer_harness.wheelhouse", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
        assert "checked to resolve from this folder alone" in proc.stdout
        wheels = {w.name for w in out.glob("*.whl")}
        for prefix in ("nvidia_dali_cuda120-", "av-", "setuptools-", "einops-", "transformers-"):
            assert any(w.startswith(prefix) for w in wheels), f"no {prefix}* wheel in {sorted(wheels)}"
        assert not any(w.startswith("torch-") for w in wheels)

        # the editable install builds with setuptools from the folder: pip's dry run prepares the metadata offline
        editable = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--dry-run", "--no-index",
                    "--find-links", str(out), "-c", str(REPO / "constraints.txt"), "-e", f"{REPO}[test]"]
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
        done = subprocess.run(editable, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]

        # and both checks fail when the folder lacks a wheel
        reqs = wheelhouse.requirements(REPO / "pyproject.toml")
        for wheel in out.glob("einops-*.whl"):
            wheel.unlink()
        error = wheelhouse.resolves_offline(reqs, out, REPO / "constraints.txt", "")
        assert "einops" in error, error
        for wheel in out.glob("setuptools-*.whl"):
            wheel.unlink()
        failed = subprocess.run(editable, capture_output=True, text=True, env=env, timeout=300)
        assert failed.returncode != 0 and "setuptools" in failed.stderr, failed.stderr[-4000:]
    finally:
        shutil.rmtree(out, ignore_errors=True)  # about 640 MiB
