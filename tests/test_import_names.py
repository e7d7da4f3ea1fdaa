"""The harness imports under its own name, ``timesformer_harness``, and hides no other distribution: in one process
with it, Hugging Face's ``kernels`` (which transformers needs) and transformers' hub-kernels integration import, and
the Hugging Face round trip holds. Checked from the clone's root (where ``python -m`` and ``python -c`` put the
root on the import path), from another folder, run by path as torchrun runs ``harness/train.py``, and from a wheel
installed in a scratch virtual environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "timesformer_harness"
OLD_NAMES = ("harness", "kernels", "pipelines", "benchmarks")

# Imports the harness first, then Hugging Face's kernels and transformers' hub-kernels integration (it imports
# CUDAProperties & co. from `kernels`: any other package by that name first on the path breaks it), then runs the
# Hugging Face round trip (tests/hf_interop.py) both ways.
PROBE = r"""
import json, sys
from importlib.metadata import distribution
import timesformer_harness.model as ours_module
from timesformer_harness.model import create_model
import kernels
from transformers.utils.import_utils import is_kernels_available
import transformers.integrations.hub_kernels
from kernels import CUDAProperties, LayerRepository, kernelize
tests_dir, out_dir = sys.argv[-2:]
sys.path.append(tests_dir)
from hf_interop import round_trip

report = {"kernels": kernels.__file__, "hf_kernels": str(distribution("kernels").locate_file("kernels/__init__.py")),
          "harness": ours_module.__file__, "kernels_available": is_kernels_available(),
          "old_names": sorted(m for m in sys.modules if m.split(".")[0] in ("harness", "pipelines", "benchmarks")),
          "preset_params": sum(p.numel() for p in create_model("tiny").parameters())}
report.update({attention_type: round_trip(attention_type, out_dir)
               for attention_type in ("divided_space_time", "joint_space_time")})
print("PROBE " + json.dumps(report))
"""
# As `python harness/train.py --help` starts (torchrun starts each rank so): the script's folder first on the path,
# the file run as __main__ with no package. Its start-up runs, argparse exits, then the probe runs in that process.
BY_PATH = r"""
import runpy, sys
saved_argv, harness_dir, script = list(sys.argv), sys.argv[1], sys.argv[2]
sys.path[0] = harness_dir
sys.argv = [script, "--help"]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), e.code
sys.argv = saved_argv
print("PATH " + json.dumps({"harness_dir_on_path": harness_dir in sys.path}))
"""


def hf_kernels_installed() -> bool:
    try:
        distribution("kernels")
        return True
    except PackageNotFoundError:
        return False


needs_hf_kernels = pytest.mark.skipif(not hf_kernels_installed(), reason="Hugging Face's kernels is not installed "
                                      "(transformers >= 5 requires it; make test installs it from constraints.txt)")


def run_probe(python: str, cwd: Path, out: Path, prefix: str = "", args: tuple[str, ...] = ()) -> dict:
    res = subprocess.run([python, "-c", "import json\n" + prefix + PROBE, *args, str(REPO / "tests"), str(out)],
                         cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"probe failed in {cwd}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in res.stdout.splitlines()
             if line.startswith(("PROBE ", "PATH "))}
    return {**lines["PROBE"], **lines.get("PATH", {})}


def check_report(report: dict, harness_dir: Path) -> None:
    assert Path(report["harness"]).parent == harness_dir, report["harness"]
    kernels_file = Path(report["kernels"]).resolve()
    hf_file = Path(report["hf_kernels"]).resolve()
    assert kernels_file == hf_file, f"`import kernels` gave {kernels_file}, not Hugging Face's {hf_file}"
    assert report["kernels_available"], "transformers did not see Hugging Face's kernels"
    assert report["old_names"] == [], f"modules imported under the old top-level names: {report['old_names']}"
    assert report["preset_params"] > 0
    for attention_type in ("divided_space_time", "joint_space_time"):
        r = report[attention_type]
        assert r["format"] == "hf" and not r["missing"], r
        assert r["hf_to_ours"] < 1e-5 and r["ours_to_hf"] < 1e-5, r


def test_no_top_level_folder_is_a_regular_package() -> None:
    """A folder of the clone's root with an ``__init__.py`` is importable by its bare name wherever the root is on
    the import path (``python -m``/``-c`` from the clone, pytest): our ``kernels/`` hid Hugging Face's so."""
    regular = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
    assert regular == [], f"top-level folders that are regular packages: {regular} (remove their __init__.py)"


def test_the_wheel_lists_every_code_folder() -> None:
    """pyproject.toml's ``packages`` name every folder with Python code under the mapped folders (one left out
    would be missing from the wheel), and ``package-dir`` maps every top-level code folder but tests/."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setup["package-dir"]
    expected = set(dirs)
    for name, folder in dirs.items():
        for sub in (REPO / folder).rglob("*.py"):
            rel = sub.parent.relative_to(REPO / folder)
            if rel.parts and "__pycache__" not in rel.parts:
                expected.add(".".join([name, *rel.parts]))
    assert set(setup["packages"]) == expected
    code_folders = {d.name for d in REPO.iterdir() if d.is_dir() and not d.name.startswith(".")
                    and d.name not in ("runs", "data") and any(d.rglob("*.py"))}
    assert code_folders - {"tests"} <= set(dirs.values()), code_folders


@needs_hf_kernels
@pytest.mark.slow
def test_coexists_with_hf_kernels_from_the_clone_root_and_elsewhere(tmp_path: Path) -> None:
    """The project's own environment (an editable install): from the clone's root, where ``kernels/`` lies on the
    import path, and from another folder."""
    check_report(run_probe(sys.executable, REPO, tmp_path), REPO / "harness")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check_report(run_probe(sys.executable, elsewhere, tmp_path), REPO / "harness")


@needs_hf_kernels
@pytest.mark.slow
def test_coexists_with_hf_kernels_run_by_path(tmp_path: Path) -> None:
    """``harness/train.py`` run by path (as torchrun runs it) takes ``harness/`` off the import path and runs the
    module by its package name; Hugging Face's kernels imports in that process after it."""
    report = run_probe(sys.executable, REPO, tmp_path, BY_PATH, (str(REPO / "harness"), "harness/train.py"))
    assert report["harness_dir_on_path"] is False
    check_report(report, REPO / "harness")


def build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from a copy of the tracked files (an in-tree build would write build/ into the
    clone)."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return wheel


@needs_hf_kernels
@pytest.mark.slow
def test_coexists_with_hf_kernels_from_an_installed_wheel(tmp_path: Path) -> None:
    """The wheel in a scratch virtual environment (its dependencies seen through the project's environment's
    site-packages): it holds every module and config, and the probe imports the harness from it."""
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    tracked = subprocess.run(["git", "ls-files", "harness", "kernels", "pipelines", "benchmarks", "configs"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    prefix = {"harness": PACKAGE, "kernels": f"{PACKAGE}/kernels", "pipelines": f"{PACKAGE}/pipelines",
              "benchmarks": f"{PACKAGE}/benchmarks", "configs": f"{PACKAGE}/configs"}
    wanted = {f"{prefix[f.split('/')[0]]}/{f.split('/', 1)[1]}" for f in tracked if f.endswith((".py", ".yaml"))}
    assert wanted - set(names) == set(), f"missing from the wheel: {sorted(wanted - set(names))}"
    assert not [n for n in names if n.split("/")[0] in OLD_NAMES], "the wheel has top-level packages of the old names"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    ours = [p for p in sys.path if p and ("site-packages" in p or "dist-packages" in p)]
    (purelib / "_project_env.pth").write_text("\n".join(ours) + "\n")  # path lines only: no editable finder runs
    work = tmp_path / "work"
    work.mkdir()
    check_report(run_probe(python, work, tmp_path), purelib / PACKAGE)


def test_an_old_module_path_still_runs_from_the_clone_root_with_a_notice(tmp_path: Path) -> None:
    """``python -m pipelines.tools.toy`` (the path before the package had one name) runs from the clone's root,
    where the folders import as namespace packages, and says which command to use instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    res = subprocess.run([sys.executable, "-m", "pipelines.tools.toy", "--out", str(tmp_path / "toy"), "--train",
                          "2", "--val", "1", "--test", "1"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "python -m timesformer_harness.pipelines.tools.toy" in res.stderr, res.stderr
    assert (tmp_path / "toy").is_dir()
    new = subprocess.run([sys.executable, "-m", "timesformer_harness.pipelines.tools.toy", "--out",
                          str(tmp_path / "toy2"), "--train", "2", "--val", "1", "--test", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert new.returncode == 0, new.stderr[-3000:]
    assert "old one" not in new.stderr


def test_every_name_the_package_imports_from_itself_exists() -> None:
    """``from timesformer_harness.X import name``, at module level or inside a function (the lazy imports of scripts
    and GPU paths run only where they are used), names something ``X`` has: a helper renamed in one module and
    not in a script that runs only on demand would fail there, not here."""
    import ast
    import importlib

    folders = {"harness": PACKAGE, "pipelines": f"{PACKAGE}.pipelines", "benchmarks": f"{PACKAGE}.benchmarks",
               "kernels": f"{PACKAGE}.kernels"}
    missing, checked = [], 0
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                        and node.module.split(".")[0] == PACKAGE):
                    continue
                module = importlib.import_module(node.module)
                for alias in node.names:
                    checked += 1
                    if alias.name != "*" and not hasattr(module, alias.name):
                        try:  # a submodule imported by name
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ModuleNotFoundError:
                            missing.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{alias.name}")
    assert checked > 300 and not missing, missing
