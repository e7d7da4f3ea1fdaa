"""Layers point one way: ``common`` <- ``kernels/`` <- ``pipelines/`` <- ``harness/``, where ``common`` is
``harness/common.py`` (``timesformer_harness.common``: atomic files, logging set-up, the file cache; the standard
library only). Checked on the source (every import
statement, at module level or inside a function, and ``importlib.import_module("...")`` calls), and on a real
training process (which modules it has loaded). And no module uses another module's ``_private`` names.

The folders are one package, ``timesformer_harness`` (``harness/`` itself; ``kernels/``, ``pipelines/`` and
``benchmarks/`` its subpackages): the scanners map folders to import names with pyproject.toml's ``package-dir``."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# folder -> the folders of this repository whose modules it must never import
FORBIDDEN = {"kernels": ("harness", "pipelines", "benchmarks", "tests"),
             "pipelines": ("harness", "benchmarks", "tests")}
OFFLINE_TOOLS = "timesformer_harness.pipelines.tools"
BASE = "timesformer_harness.common"  # below every layer: any module may import it, it imports none of ours


def package_dirs(root: Path) -> dict[str, str]:
    """Top-level folder -> its import name, from ``[tool.setuptools.package-dir]`` (data-only folders left out)."""
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {folder: name for name, folder in mapping.items() if any((root / folder).rglob("*.py"))}


LAYOUT = package_dirs(REPO)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. timesformer_harness.pipelines.base
    path: str  # its file, relative to the repository
    line: int
    target: str  # the imported module (or package) name


def module_name(path: Path, root: Path, layout: dict[str, str]) -> str:
    """The import name of ``path``: its folder's import name, then the rest of its path."""
    folder, *parts = path.relative_to(root).with_suffix("").parts
    parts = parts[:-1] if parts and parts[-1] == "__init__" else parts
    return ".".join([layout.get(folder, folder), *parts])


def folder_of(module: str, layout: dict[str, str]) -> str:
    """The top-level folder that holds ``module`` (the longest import-name match; ``tests`` for the tests' own
    helpers); a module of another distribution gets its own top-level name."""
    if module == BASE:
        return "common"
    matches = [folder for folder, name in layout.items() if module == name or module.startswith(f"{name}.")]
    return max(matches, key=lambda f: len(layout[f])) if matches else module.split(".")[0]


def file_of(module: str, root: Path, layout: dict[str, str]) -> Path | None:
    """``module``'s file (``.py`` or package ``__init__.py``; a folder for a namespace package) under ``root``."""
    folder = folder_of(module, layout)
    if folder not in layout:
        return None
    base = root.joinpath(folder, *module[len(layout[folder]):].split(".")[1:])
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py", base) if p.exists()), None)


def imports_of(path: Path, root: Path, layout: dict[str, str]) -> list[Import]:
    """Every module ``path`` imports. ``from a import b`` yields ``a.b`` when that is a module of this repository (a
    submodule), else ``a``; relative imports are resolved against the file's package."""
    name = module_name(path, root, layout)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    rel = str(path.relative_to(root))
    out = []

    def is_module(dotted: str) -> bool:
        found = file_of(dotted, root, layout)
        return found is not None and (found.suffix == ".py" or found.is_dir())

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


def layer_violations(root: Path, layout: dict[str, str] = LAYOUT,
                     forbidden: dict[str, tuple[str, ...]] = FORBIDDEN) -> list[str]:
    """``file:line: module imports target`` for every import of a folder that ``forbidden`` rules out."""
    bad = []
    for folder, banned in forbidden.items():
        for path in sorted((root / folder).rglob("*.py")):
            for imp in imports_of(path, root, layout):
                if folder_of(imp.target, layout) in banned:
                    bad.append(f"{imp.path}:{imp.line}: {imp.source} imports {imp.target} "
                               f"({folder}/ must not import {'/, '.join(banned)}/)")
    return bad


def import_cycles(root: Path, folder: str, layout: dict[str, str] = LAYOUT) -> list[list[Import]]:
    """Cycles in the graph of imports among ``folder``'s modules (lazy imports inside functions included)."""
    graph: dict[str, list[Import]] = {}
    for path in sorted((root / folder).rglob("*.py")):
        imports = imports_of(path, root, layout)
        graph[module_name(path, root, layout)] = [i for i in imports if folder_of(i.target, layout) == folder]
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


def test_the_common_module_imports_only_the_standard_library() -> None:
    path = REPO / "harness" / "common.py"
    ours = [i for i in imports_of(path, REPO, LAYOUT) if i.target.split(".")[0] == "timesformer_harness"]
    third_party = [i.target for i in imports_of(path, REPO, LAYOUT) if i.target.split(".")[0] not in sys.stdlib_module_names
                   and i.target != "__future__"]
    assert not ours and not third_party, (ours, third_party)


def test_no_import_cycles_among_pipelines_modules() -> None:
    cycles = import_cycles(REPO, "pipelines")
    assert not cycles, "import cycles:\n" + "\n".join(describe(c) for c in cycles)


def test_the_loader_contract_imports_no_loader() -> None:
    """pipelines.base (Batch, ClipPlanner, ClipLoader) needs only the data config, the sampling and the quarantine."""
    pkg = LAYOUT["pipelines"]
    targets = {i.target for i in imports_of(REPO / "pipelines/base.py", REPO, LAYOUT) if i.target.startswith(pkg)}
    assert targets <= {f"{pkg}.config", f"{pkg}.sampling", f"{pkg}.quarantine"}, targets


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """The scanners on a made-up tree laid out as ours (``harness/`` the package, ``pipelines/`` its subpackage, no
    ``__init__.py`` in either): an upward import (absolute, relative, lazy, by name) and a cycle."""
    layout = {"harness": "pkg", "pipelines": "pkg.pipelines"}
    (tmp_path / "pipelines" / "tools").mkdir(parents=True)
    (tmp_path / "harness").mkdir()
    (tmp_path / "pipelines" / "tools" / "__init__.py").write_text("")
    (tmp_path / "harness" / "config.py").write_text("")
    (tmp_path / "pipelines" / "a.py").write_text("import os\nfrom pkg.pipelines import b\n")
    (tmp_path / "pipelines" / "b.py").write_text("def f():\n    from pkg.pipelines.tools.c import g\n")
    (tmp_path / "pipelines" / "tools" / "c.py").write_text(
        "from .. import a\nfrom ... import config\nimport importlib\nimportlib.import_module('pkg.x')\n"
        "def g():\n    from pkg.config import X\n")
    bad = layer_violations(tmp_path, layout, {"pipelines": ("harness",)})
    assert [b.split(" (")[0] for b in bad] == ["pipelines/tools/c.py:2: pkg.pipelines.tools.c imports pkg.config",
                                               "pipelines/tools/c.py:4: pkg.pipelines.tools.c imports pkg.x",
                                               "pipelines/tools/c.py:6: pkg.pipelines.tools.c imports pkg.config"]
    cycles = import_cycles(tmp_path, "pipelines", layout)
    assert [describe(c) for c in cycles] == [
        "pkg.pipelines.a (pipelines/a.py:2) -> pkg.pipelines.b (pipelines/b.py:2) -> pkg.pipelines.tools.c "
        "(pipelines/tools/c.py:1) -> pkg.pipelines.a"]


PROBE = """
import json, sys
import timesformer_harness.train, timesformer_harness.evaluate
from timesformer_harness.pipelines.factory import build_loader
from timesformer_harness.pipelines.config import DataConfig
manifest, want_dali = sys.argv[1], sys.argv[2] == "1"
kinds = ["pyav", "synthetic"] + (["dali"] if want_dali else [])
for kind in kinds:
    cfg = DataConfig(loader=kind, backend="cpu", train_manifest=manifest, num_frames=4, sampling_rate=2,
                     train_jitter_scales=[32, 36], train_crop_size=32, batch_size=2, num_workers=1,
                     validate_cache="none", synthetic_videos=4)
    batch = next(iter(build_loader(cfg, "train", device="cpu")))
    assert tuple(batch.video.shape) == (2, 3, 4, 32, 32), batch.video.shape
print(json.dumps(sorted(m for m in sys.modules if m.startswith("timesformer_harness.pipelines."))))
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
    pkg = LAYOUT["pipelines"]
    assert {f"{pkg}.factory", f"{pkg}.pyav", f"{pkg}.synthetic", f"{pkg}.validate"} <= set(loaded)
    if want_dali == "1":
        assert f"{pkg}.dali" in loaded
    tools = [m for m in loaded if m == OFFLINE_TOOLS or m.startswith(f"{OFFLINE_TOOLS}.")]
    assert not tools, f"a training process loaded offline tools: {tools}"


@pytest.mark.parametrize("module", ["timesformer_harness.train", "timesformer_harness.evaluate",
                                    "timesformer_harness.pipelines.factory"])
def test_entry_points_import_without_the_tools(module: str) -> None:
    """Importing an entry point alone (no loader built) loads nothing of pipelines.tools either."""
    code = f"import sys, {module}; print([m for m in sys.modules if m.startswith('{OFFLINE_TOOLS}')])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------------------------
# No module uses another module's private names.
SCANNED = ("kernels", "pipelines", "harness", "benchmarks", "tests")
# (file, private name) -> why it stays. Every entry must still be in use (a stale one fails the test).
PRIVATE_ALLOWED = {
    ("harness/checkpoint.py", "_orig_mod"):
        "torch.compile's wrapper keeps the compiled module there and torch has no public accessor; "
        "pyth_state unwraps it so a compiled model saves with the original keys",
    ("tests/test_checkpoint_safety.py", "_utils"):
        "a crafted checkpoint names torch._utils._rebuild_tensor, the function real torch files name; the test "
        "checks that the loader stored that very function as data",
    ("tests/test_runner.py", "_exit"): "os._exit is public (documented): a child that exits without clean-up",
    ("kernels/cast.py", "_foreach_copy_"):
        "torch's multi-tensor copy (listed with the other torch._foreach_* ops in torch's docs; FSDP2 casts its "
        "parameters with it): one kernel for a block's weight casts, and there is no public alias",
    ("tests/test_compile.py", "_inductor"):
        "inductor's C++ kernels appear in a profile only with its cpp.enable_kernel_profile option, which has no "
        "public switch; the test counts the compiled step's launches from that profile",
    ("harness/counting.py", "_python_dispatch"):
        "TorchDispatchMode lives in torch.utils._python_dispatch, the path torch's docs give for it; no public alias",
    ("kernels/attention.py", "_is_profiler_enabled"):
        "torch.autograd.profiler keeps this flag for fast checks of whether a profiler records (torch's own dynamo "
        "reads it); the attention ranges are entered only then, and there is no public alias",
    ("tests/test_short_attention.py", "_library"):
        "torch._library.triton.get_triton_kernels_for_op lists the kernels whose source torch's compile caches key a "
        "triton_op on; there is no public accessor, and the test checks that ours are found",
    ("tests/test_fused_kernels.py", "_C"):
        "torch._C._dispatch_has_kernel_for_dispatch_key: the dispatcher's registrations are the only way to ask, "
        "without a GPU, which ops CUDA autocast casts",
}


def is_private(name: str) -> bool:
    return name.startswith("_") and len(name) > 1 and not (name.startswith("__") and name.endswith("__"))


def private_name_uses(path: Path, root: Path) -> list[tuple[int, str, str]]:
    """``(line, private name, how)`` for each use in ``path`` of a private name that belongs to another module:
    ``from m import _x``, ``import m._x`` / ``from m._x import y``, ``m._x`` or ``m.a._x`` where ``m`` was bound by
    an import, and ``getattr``/``hasattr``/``setattr``/``delattr`` with a literal private attribute name. A module's
    own ``_names`` (defined and used in the same file, ``self._x``) are not uses of another module's names."""
    tree = ast.parse(path.read_text(), filename=str(path.relative_to(root)))
    imported: set[str] = set()  # local names bound by an import statement
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported.add(alias.asname or alias.name.split(".")[0])
                out += [(node.lineno, part, f"import {alias.name}") for part in alias.name.split(".")
                        if is_private(part)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            out += [(node.lineno, part, f"from {module} import ...") for part in (node.module or "").split(".")
                    if is_private(part)]
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                if is_private(alias.name):
                    out.append((node.lineno, alias.name, f"from {module} import {alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in imported:
                dotted = [value.id] + chain[::-1]
                first = next((i for i, part in enumerate(dotted) if is_private(part)), None)
                # report each chain once, at its outermost node: only when the private part is this node's attr
                if first is not None and first == len(dotted) - 1:
                    out.append((node.lineno, dotted[first], ".".join(dotted)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and is_private(node.args[1].value)):
            out.append((node.lineno, node.args[1].value, f"{node.func.id}(..., {node.args[1].value!r})"))
    return sorted(set(out))


def private_name_violations(root: Path, packages: tuple[str, ...] = SCANNED,
                            allowed: dict[tuple[str, str], str] = PRIVATE_ALLOWED) -> tuple[list[str], list[str]]:
    """(violations, stale allowlist entries)."""
    bad, used = [], set()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = str(path.relative_to(root))
            for line, name, how in private_name_uses(path, root):
                if (rel, name) in allowed:
                    used.add((rel, name))
                else:
                    bad.append(f"{rel}:{line}: {how} uses the private name {name}")
    stale = [f"{f}: {n}" for f, n in allowed if (f, n) not in used and (root / f).is_file()]
    return bad, stale


def test_no_module_uses_another_modules_private_names() -> None:
    bad, stale = private_name_violations(REPO)
    assert not bad, ("private names used outside their module (make the name public, or add an allowlist entry "
                     "with the reason):\n" + "\n".join(bad))
    assert not stale, "allowlist entries no longer used (remove them from PRIVATE_ALLOWED):\n" + "\n".join(stale)


def test_the_private_name_check_catches_what_it_looks_for(tmp_path: Path) -> None:
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "a.py").write_text(
        "import torch\nimport pipelines.b as b\nfrom pipelines.b import _helper, public\nfrom ._c import x\n"
        "from torch.utils import _pytree\n_mine = 1\n\n\nclass K:\n    def f(self):\n"
        "        return self._x, _mine, b._y, torch._dynamo.reset, torch.nn._z.w, public.__name__\n\n\n"
        "def g(m):\n    return getattr(m, '_orig_mod', m), getattr(m, 'name'), m._not_imported\n")
    bad, stale = private_name_violations(tmp_path, ("pipelines",), {("pipelines/a.py", "_pytree"): "why",
                                                                     ("pipelines/gone.py", "_q"): "why",
                                                                     ("pipelines/a.py", "_unused"): "why"})
    assert [b.split(": ", 1)[1] for b in bad] == [
        "from pipelines.b import _helper uses the private name _helper",
        "from ._c import ... uses the private name _c",
        "torch._dynamo uses the private name _dynamo",
        "b._y uses the private name _y",
        "torch.nn._z uses the private name _z",
        "getattr(..., '_orig_mod') uses the private name _orig_mod",
    ]
    assert stale == ["pipelines/a.py: _unused"]
