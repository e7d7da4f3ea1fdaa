"""Layers point one way: ``kernels/`` <- ``pipelines/`` <- ``harness/``. Checked on the source (every import
statement, at module level or inside a function, and ``importlib.import_module("...")`` calls), and on a real
training process (which modules it has loaded)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# package -> the top-level packages of this repository it must never import
FORBIDDEN = {"kernels": ("harness", "pipelines", "benchmarks", "tests"),
             "pipelines": ("harness", "benchmarks", "tests")}
OFFLINE_TOOLS = "pipelines.tools"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. pipelines.base
    path: str  # its file, relative to the repository
    line: int
    target: str  # the imported module (or package) name


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every module ``path`` imports. ``from a import b`` yields ``a.b`` when ``a/b.py`` or ``a/b/`` exists under
    ``root`` (a submodule), else ``a``; relative imports are resolved against the file's package."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    rel = str(path.relative_to(root))
    out = []

    def is_module(dotted: str) -> bool:
        base = root.joinpath(*dotted.split("."))
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()

    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
        if isinstance(node, ast.Import):
            out += [Import(name, rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append(Import(name, rel, node.lineno, sub if is_module(sub) else base))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module")))):
            out.append(Import(name, rel, node.lineno, node.args[0].value))
    return sorted(set(out), key=lambda i: (i.line, i.target))  # `from a import b, c` may name one module twice


def layer_violations(root: Path, forbidden: dict[str, tuple[str, ...]] = FORBIDDEN) -> list[str]:
    """``file:line: module imports target`` for every import of a package that ``forbidden`` rules out."""
    bad = []
    for package, banned in forbidden.items():
        for path in sorted((root / package).rglob("*.py")):
            for imp in imports_of(path, root):
                if imp.target.split(".")[0] in banned:
                    bad.append(f"{imp.path}:{imp.line}: {imp.source} imports {imp.target} "
                               f"({package}/ must not import {'/, '.join(banned)}/)")
    return bad


def import_cycles(root: Path, package: str) -> list[list[Import]]:
    """Cycles in the graph of imports among ``package``'s modules (lazy imports inside functions included)."""
    graph: dict[str, list[Import]] = {}
    for path in sorted((root / package).rglob("*.py")):
        imports = imports_of(path, root)
        inside = [i for i in imports if i.target == package or i.target.startswith(f"{package}.")]
        graph[module_name(path, root)] = inside
    cycles: list[list[Import]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, stack: list[str], edges: list[Import]) -> None:  # edges[k] goes stack[k] -> stack[k+1]
        state[node] = 1
        for edge in graph.get(node, []):
            if state.get(edge.target) == 1:
                cycles.append(edges[stack.index(edge.target):] + [edge])
            elif edge.target not in state:
                visit(edge.target, stack + [edge.target], edges + [edge])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node], [])
    return cycles


def describe(cycle: list[Import]) -> str:
    return " -> ".join(f"{e.source} ({e.path}:{e.line})" for e in cycle) + f" -> {cycle[-1].target}"


def test_pipelines_and_kernels_never_import_harness() -> None:
    bad = layer_violations(REPO)
    assert not bad, "imports against the layer order kernels <- pipelines <- harness:\n" + "\n".join(bad)


def test_no_import_cycles_among_pipelines_modules() -> None:
    cycles = import_cycles(REPO, "pipelines")
    assert not cycles, "import cycles:\n" + "\n".join(describe(c) for c in cycles)


def test_the_loader_contract_imports_no_loader() -> None:
    """pipelines.base (Batch, ClipPlanner, ClipLoader) needs only the data config, the sampling and the quarantine."""
    targets = {i.target for i in imports_of(REPO / "pipelines/base.py", REPO) if i.target.startswith("pipelines")}
    assert targets <= {"pipelines.config", "pipelines.sampling", "pipelines.quarantine"}, targets


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """The scanners on a made-up tree: an upward import (absolute, relative, lazy, by name) and a cycle."""
    (tmp_path / "pipelines" / "tools").mkdir(parents=True)
    (tmp_path / "harness").mkdir()
    for init in ("pipelines", "pipelines/tools", "harness"):
        (tmp_path / init / "__init__.py").write_text("")
    (tmp_path / "harness" / "config.py").write_text("")
    (tmp_path / "pipelines" / "a.py").write_text("import os\nfrom pipelines import b\n")
    (tmp_path / "pipelines" / "b.py").write_text("def f():\n    from pipelines.tools.c import g\n")
    (tmp_path / "pipelines" / "tools" / "c.py").write_text(
        "from .. import a\nfrom ...harness import config\nimport importlib\nimportlib.import_module('harness.x')\n"
        "def g():\n    from harness.config import X\n")
    bad = layer_violations(tmp_path, {"pipelines": ("harness",)})
    assert [b.split(" (")[0] for b in bad] == ["pipelines/tools/c.py:2: pipelines.tools.c imports harness.config",
                                               "pipelines/tools/c.py:4: pipelines.tools.c imports harness.x",
                                               "pipelines/tools/c.py:6: pipelines.tools.c imports harness.config"]
    cycles = import_cycles(tmp_path, "pipelines")
    assert [describe(c) for c in cycles] == [
        "pipelines.a (pipelines/a.py:2) -> pipelines.b (pipelines/b.py:2) -> pipelines.tools.c "
        "(pipelines/tools/c.py:1) -> pipelines.a"]


PROBE = """
import json, sys
import harness.train, harness.evaluate
from pipelines import build_loader
from pipelines.config import DataConfig
manifest, want_dali = sys.argv[1], sys.argv[2] == "1"
kinds = ["pyav", "synthetic"] + (["dali"] if want_dali else [])
for kind in kinds:
    cfg = DataConfig(loader=kind, backend="cpu", train_manifest=manifest, num_frames=4, sampling_rate=2,
                     train_jitter_scales=[32, 36], train_crop_size=32, batch_size=2, num_workers=1,
                     validate_cache="none", synthetic_videos=4)
    batch = next(iter(build_loader(cfg, "train", device="cpu")))
    assert tuple(batch.video.shape) == (2, 3, 4, 32, 32), batch.video.shape
print(json.dumps(sorted(m for m in sys.modules if m == "pipelines" or m.startswith("pipelines."))))
"""


def test_a_training_job_never_imports_the_offline_tools(videos) -> None:
    """A real process imports the entry points and builds and iterates each loader on real videos; none of
    ``pipelines.tools`` (prepare, transcode, toy, encode, decode_cost) is loaded."""
    want_dali = "1" if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali") else "0"
    manifest = videos.manifest("layers.csv", videos.good[:4])
    res = subprocess.run([sys.executable, "-c", PROBE, str(manifest), want_dali], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"pipelines.factory", "pipelines.pyav", "pipelines.synthetic", "pipelines.validate"} <= set(loaded)
    if want_dali == "1":
        assert "pipelines.dali" in loaded
    tools = [m for m in loaded if m == OFFLINE_TOOLS or m.startswith(f"{OFFLINE_TOOLS}.")]
    assert not tools, f"a training process loaded offline tools: {tools}"


@pytest.mark.parametrize("module", ["harness.train", "harness.evaluate", "pipelines.factory"])
def test_entry_points_import_without_the_tools(module: str) -> None:
    """Importing an entry point alone (no loader built) loads nothing of pipelines.tools either."""
    code = f"import sys, {module}; print([m for m in sys.modules if m.startswith('{OFFLINE_TOOLS}')])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]"
