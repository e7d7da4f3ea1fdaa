"""The config reference, ``docs/config.md``, generated from the config dataclasses.

    python -m timesformer_harness.config_reference            # rewrite docs/config.md (make docs)
    python -m timesformer_harness.config_reference --check    # exit 1 when docs/config.md differs from the code

Every key of ``RootConfig`` (``harness/config.py``, with ``DataConfig`` from ``pipelines/config.py``) with its type,
default and help. The help is the comment beside the field in the code: the comment lines right above it, then the
trailing comment on its line(s), so the dataclasses stay plain and the reference cannot drift from them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
from pathlib import Path
from typing import Any

from timesformer_harness.config import REPO_ROOT, RootConfig

DEFAULT_OUT = REPO_ROOT / "docs" / "config.md"
HEADER = """\
# Config reference

Every key of the run config, generated from the dataclasses by `python -m timesformer_harness.config_reference`
(`make docs`): the help is the comment beside each field in `harness/config.py` and `pipelines/config.py`. Do not
edit this file by hand; `tests/test_docs.py` fails when it and the code differ, or when a key has no help
(`--check` exits 1 when the file is stale, `--out FILE` writes elsewhere).

Set a key in a YAML config (`model:` / `depth: 2`) or on any command line that takes a config (`model.depth=2`);
how configs are merged and where `defaults:` paths resolve: [training.md](training.md#config); the keys to set for
your own videos: [your_data.md](your_data.md). A mistake is one `error:` line with exit status 5
([training.md](training.md#exit-statuses)).

A value is read as YAML. A key of type str keeps what is typed on the command line where YAML would read a number
(`output.dir=007` is `007`, not 7; `12:30` is not 750, `.10` not 0.1); in a YAML file, quote such a value
(`dir: '007'`): unquoted, the text is gone, and it is refused naming the key, as `yes`/`no`/`on`/`off`/`true`/`false`
are for a key that takes a word. A key of type bool takes true or false (YAML's yes/no/on/off too), not 1 or 0.
`${model.num_heads}` or `${oc.env:NAME,default}` in a value is resolved against the merged config.
"""


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}


def field_help(cls: type) -> dict[str, str]:
    """Each dataclass field of ``cls`` -> its help: the comment lines right above it, then its trailing comment
    ("" when it has neither)."""
    source = Path(inspect.getsourcefile(cls) or "").read_text()
    lines, comments = source.splitlines(), _comments(source)
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    helps = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
        helps[stmt.target.id] = " ".join(above + beside)
    return {f.name: helps.get(f.name, "") for f in dataclasses.fields(cls)}


def _sections(root: type) -> list[tuple[str, type]]:
    return [(f.name, _type_of(root, f)) for f in dataclasses.fields(root)]


def _type_of(cls: type, f: dataclasses.Field) -> Any:
    return f.type if not isinstance(f.type, str) else inspect.get_annotations(cls, eval_str=True)[f.name]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_keys(root: type = RootConfig) -> list[str]:
    """Every key of the config tree, ``section.key``."""
    return [f"{name}.{f.name}" for name, cls in _sections(root) for f in dataclasses.fields(cls)]


def missing_help(cls: type = RootConfig) -> list[str]:
    """The keys of ``cls`` (a section, or the whole tree) that have no help comment."""
    if all(dataclasses.is_dataclass(t) for _, t in _sections(cls)):
        return [f"{name}.{key}" for name, section in _sections(cls) for key in missing_help(section)]
    return [name for name, text in field_help(cls).items() if not text]


def _cell(text: str) -> str:
    """``text`` safe in a Markdown table cell: ``|`` escaped, ``<`` too (``<stem>`` would read as an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def render(root: type = RootConfig) -> str:
    """The reference as Markdown: one section per config section, one table row per key."""
    out = [HEADER]
    for name, cls in _sections(root):
        doc = " ".join((cls.__doc__ or "").split()).replace("``", "`").rstrip(".")
        where = Path(inspect.getsourcefile(cls) or "").resolve().relative_to(REPO_ROOT)
        out += [f"## `{name}`", "", f"`{cls.__name__}` in `{where}`: {doc}.", "",
                "| key | type | default | help |", "|---|---|---|---|"]
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            typ = f.type if isinstance(f.type, str) else f.type.__name__
            default = json.dumps(_default(f))
            out.append(f"| `{name}.{f.name}` | {_cell(typ)} | `{_cell(default)}` | {_cell(helps[f.name])} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m timesformer_harness.config_reference",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"the reference to write (default {DEFAULT_OUT})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when --out differs from the code")
    args = p.parse_args(argv)
    out, text = Path(args.out), render(RootConfig)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is stale (or missing): run make docs", file=sys.stderr)
            return 1
        return 0
    missing = missing_help(RootConfig)
    if missing:
        print(f"warning: config keys without a help comment (write one beside the field): {missing}",
              file=sys.stderr)
    out.write_text(text)
    print(f"wrote {out} ({len(config_keys(RootConfig))} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
