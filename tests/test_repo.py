"""The repository as a document: the README stays a front door, every relative link in the docs resolves to a file
of this repository, and nothing in code, configs or docs points outside it (background notes, issue numbers)."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
GENERATED = {"runs", "data"}  # top-level output folders; hidden folders (.git, .venv, caches) are skipped too
# Written so that this file does not match itself: background notes, the shared folder, issue numbers.
OUTSIDE = re.compile(r"research/[a-z]+\.md|\bissues? #?[0-9]+\b|(\.\./)?\bshared[/]|HELPERS\.md|DESIGN\.md|STYLE\.md",
                     re.IGNORECASE)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def repo_files(root: Path, suffixes: tuple[str, ...], names: tuple[str, ...] = ()) -> list[Path]:
    """Files under ``root`` with one of ``suffixes`` (or one of ``names``), generated folders left out."""
    out = []
    for folder, dirs, files in os.walk(root):
        top = Path(folder) == root
        dirs[:] = sorted(d for d in dirs if not (d.startswith(".") or d.endswith(".egg-info") or d == "__pycache__"
                                                 or (top and d in GENERATED)))
        out += [Path(folder) / f for f in sorted(files) if Path(f).suffix in suffixes or f in names]
    return out


def outside_mentions(root: Path) -> list[str]:
    bad = []
    for path in repo_files(root, (".py", ".md", ".yaml", ".yml", ".toml"), ("Makefile",)):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in OUTSIDE.finditer(line):
                bad.append(f"{path.relative_to(root)}:{number}: {match.group(0)!r}")
    return bad


def broken_links(root: Path, docs: list[Path]) -> list[str]:
    """``file:line: target`` for every relative link in ``docs`` whose file does not exist or lies outside ``root``
    (web links and in-page anchors are not checked)."""
    bad = []
    for doc in docs:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # https:, mailto:, an anchor in the same page
                path = (doc.parent / target.split("#")[0]).resolve()
                if not path.is_relative_to(root.resolve()) or not path.exists():
                    bad.append(f"{doc.relative_to(root)}:{number}: {target}")
    return bad


def broken_fences(doc: Path) -> list[str]:
    """``file:line`` of code fences that do not close as CommonMark closes them: a closing fence with text after it
    (the block runs on, and the headings after it render as code), or a block still open at the end."""
    bad, opened = [], 0
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        fence = re.match(r" {0,3}(```+)(.*)", line)
        if not fence:
            continue
        if not opened:
            opened = number
        elif fence.group(2).strip():
            bad.append(f"{doc.name}:{number}: text after the closing fence of the block opened at line {opened}")
            opened = 0
        else:
            opened = 0
    return bad + ([f"{doc.name}:{opened}: a code block never closed"] if opened else [])


def markdown_docs(root: Path) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def test_readme_is_a_front_door() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the "
                                            "detail to docs/ and dated measurements to docs/results/")


def test_nothing_points_outside_the_repository() -> None:
    bad = outside_mentions(REPO)
    assert not bad, "mentions of files or issues outside this repository (state the fact instead):\n" + "\n".join(bad)


def test_every_relative_link_in_the_docs_resolves() -> None:
    bad = broken_links(REPO, markdown_docs(REPO))
    assert not bad, "broken relative links:\n" + "\n".join(bad)


def test_every_code_block_in_the_docs_closes() -> None:
    bad = [b for doc in markdown_docs(REPO) for b in broken_fences(doc)]
    assert not bad, "code fences that do not close:\n" + "\n".join(sorted(set(bad)))


def test_every_doc_is_reachable_from_the_readme() -> None:
    """Each ``docs/*.md`` is linked from the README, each result file from ``docs/results/README.md``."""
    readme = (REPO / "README.md").read_text()
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if f"(docs/{p.name})" not in readme]
    index = (REPO / "docs" / "results" / "README.md").read_text()
    missing += [f"results/{p.name}" for p in sorted((REPO / "docs" / "results").glob("*.md"))
                if p.name != "README.md" and f"({p.name})" not in index]
    assert not missing, f"not linked from the README or the results index: {missing}"


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "harness").mkdir()
    (tmp_path / "docs" / "a.md").write_text("see [b](b.md), [c](../nowhere.md#x), [web](https://x.org), [top](#t)\n"
                                            "![plot](results/p.png) and [up](../../outside.md)\n")
    (tmp_path / "docs" / "b.md").write_text("fine\n")
    (tmp_path / "README.md").write_text("[a](docs/a.md)\n")
    note, issue, shared, design = "research" + "/bench.md", "Issue " + "12", "../" + "shar" + "ed/", "DESIGN" + ".md"
    (tmp_path / "harness" / "x.py").write_text(f"# measured in {note}\n# see {issue}\n# {shared}{design}\n"
                                               "# an issue with this\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ignored.md").write_text("issue " + "3\n")
    (tmp_path / "docs" / "c.md").write_text("```bash\nmake\n``` and prose\n## heading\n```\nopen\n")
    assert broken_fences(tmp_path / "docs" / "c.md") == [
        "c.md:3: text after the closing fence of the block opened at line 1", "c.md:5: a code block never closed"]
    assert broken_fences(tmp_path / "docs" / "a.md") == []
    (tmp_path / "docs" / "c.md").unlink()
    assert broken_links(tmp_path, markdown_docs(tmp_path)) == [
        "docs/a.md:1: ../nowhere.md#x", "docs/a.md:2: results/p.png", "docs/a.md:2: ../../outside.md"]
    assert outside_mentions(tmp_path) == [f"harness/x.py:1: {note!r}", f"harness/x.py:2: {issue!r}",
                                          f"harness/x.py:3: {shared!r}", f"harness/x.py:3: {design!r}"]
