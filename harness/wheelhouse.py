"""Every dependency of the harness as a wheel in one folder, for a machine without network (a GPU node).

    python -m timesformer_harness.wheelhouse --out DIR [--python-version 3.12] [--torch torch==2.13.0]

On a machine with network (``make wheelhouse WHEELS=DIR``): downloads the wheels of the harness's dependencies,
its test extra and its build backend (setuptools, for the editable install), at the versions in
``constraints.txt``, for the target Python, then checks that they resolve from that folder alone. Copy the folder
and the clone to the other machine and run ``make venv WHEELS=DIR`` there: pip installs with ``--no-index``.
torch is left out unless ``--torch`` names one: GPU machines bring their own CUDA build, which ``make venv`` reuses.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from timesformer_harness.config import REPO_ROOT

EXTRAS = ("test",)
LEFT_OUT = {"torch"}  # the machine's own build is reused; --torch adds one


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError as e:  # Python 3.10
        raise SystemExit(f"wheelhouse: reading {path} needs Python 3.11 or newer (tomllib)") from e
    with open(path, "rb") as f:
        return tomllib.load(f)


def requirement_name(requirement: str) -> str:
    """The normalised (PEP 503) project name of a requirement: ``Torch_TB.profiler>=1`` -> ``torch-tb-profiler``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, torch_spec: str = "") -> list[str]:
    """The requirement strings to download: the build backend's, the dependencies' and the test extra's, without
    torch (or with ``torch_spec`` in its place)."""
    data = _load_toml(pyproject)
    project = data["project"]
    reqs = [*data["build-system"]["requires"], *project["dependencies"]]
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    kept = [r for r in reqs if requirement_name(r) not in LEFT_OUT]
    return kept + ([torch_spec] if torch_spec else [])


def pip_target_args(python_version: str, constraints: Path | None) -> list[str]:
    """pip's options for the target machine's wheels: binary only (nothing is built there), for its Python, at the
    pinned versions."""
    return (["--only-binary=:all:"] + (["--python-version", python_version] if python_version else [])
            + (["-c", str(constraints)] if constraints else []))


def download(reqs: list[str], out: Path, constraints: Path | None, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(out),
           *pip_target_args(python_version, constraints), *reqs]
    subprocess.run(cmd, check=True)


def resolves_offline(reqs: list[str], wheels: Path, constraints: Path | None, python_version: str) -> str:
    """pip's resolution of ``reqs`` from ``wheels`` alone (no index, no pip config), as a fresh install for the
    target Python would do it; "" when it resolves, else pip's error."""
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # a config's find-links or index must not fill gaps
    # pip takes another Python's tags only with --target; a dry run writes nothing there
    with tempfile.TemporaryDirectory() as target:
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--dry-run", "--target", target,
               "--no-index", "--find-links", str(wheels), *pip_target_args(python_version, constraints), *reqs]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return "" if proc.returncode == 0 else (proc.stderr.strip() or proc.stdout.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m timesformer_harness.wheelhouse", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the folder to fill with wheels (created)")
    p.add_argument("--python-version", default="",
                   help="the target machine's Python, e.g. 3.12 (default: this interpreter's)")
    p.add_argument("--torch", default="", metavar="SPEC",
                   help="also download this torch, e.g. torch==2.13.0 (default: none; the machine's own is reused)")
    p.add_argument("--constraints", type=Path, default=REPO_ROOT / "constraints.txt",
                   help="pinned versions (default: the clone's constraints.txt; empty string: the newest releases)")
    p.add_argument("--pyproject", type=Path, default=REPO_ROOT / "pyproject.toml",
                   help="the project whose dependencies to download (default: the clone's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.pyproject.is_file():
        print(f"wheelhouse: no {args.pyproject}: run it from a clone of the repository, or pass --pyproject",
              file=sys.stderr)
        return 2
    constraints = args.constraints if str(args.constraints) not in ("", ".") else None
    if constraints is not None and not constraints.is_file():
        print(f"wheelhouse: no constraints file {constraints} (pass --constraints '' for the newest releases)",
              file=sys.stderr)
        return 2
    reqs = requirements(args.pyproject, args.torch)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        download(reqs, args.out, constraints, args.python_version)
    except subprocess.CalledProcessError as e:
        print(f"wheelhouse: pip download failed (exit {e.returncode}); pip's message is above", file=sys.stderr)
        return 1
    error = resolves_offline(reqs, args.out, constraints, args.python_version)
    if error:
        print(f"wheelhouse: {args.out} does not install offline:\n{error}", file=sys.stderr)
        return 1
    wheels = sorted(args.out.glob("*.whl"))
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    target = args.python_version or ".".join(map(str, sys.version_info[:2]))
    print(f"wheelhouse: {len(wheels)} wheels, {mib:.0f} MiB in {args.out}, for Python {target}; checked to resolve "
          "from this folder alone")
    print(f"on the machine without network: make venv WHEELS={args.out}"
          + ("" if args.torch else "  (with a python3 that imports torch: PYTHON=...)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
