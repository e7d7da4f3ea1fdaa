"""Atomic writes (timesformer_harness.common): all or nothing, plain-file permissions, stale temporaries found
and removed."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from timesformer_harness.common import atomic_path, atomic_write_text, is_temporary, remove_stale_temporaries


def test_failure_inside_the_block_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="check failed"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".json" and is_temporary(tmp)
            tmp.write_text("new, but bad")
            raise RuntimeError("check failed")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_permissions_are_those_of_a_plain_write(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.txt") == 0o644


def test_remove_stale_temporaries(tmp_path: Path) -> None:
    """What a killed writer leaves (the block never ends) is removed; other hidden files are not."""
    (tmp_path / "d").mkdir()
    ctx = atomic_path(tmp_path / "d" / "clip.webm")
    left = ctx.__enter__()  # entered and never exited: a process killed mid-write
    left.write_bytes(b"half")
    keep = [tmp_path / ".hidden.tmp", tmp_path / ".config", tmp_path / "clip.webm", tmp_path / ".x.abcdefgh.tmp"]
    for p in keep:
        p.write_text("")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not left.exists() and all(p.exists() for p in keep)


def test_file_cache_keys_results_by_file_and_version_and_leaves_an_older_harness_its_table(tmp_path: Path) -> None:
    """The probe's and the packet index's store: a result is returned for the file as it was stored, of the same
    version; the table an older harness wrote in the same file is left as it was (that harness still reads it), and a
    table of this name but another layout is rebuilt, not an error."""
    import sqlite3

    from timesformer_harness.common import LAYOUT, FileCache, file_key

    video = tmp_path / "a.webm"
    video.write_bytes(b"x" * 10)
    store = tmp_path / "packets.sqlite"
    with sqlite3.connect(store) as db:  # the packet index's own table before the shared cache, and a broken one
        db.execute("CREATE TABLE packets (path TEXT, size INTEGER, mtime INTEGER, version INTEGER, meta TEXT, "
                   "arrays BLOB)")
        db.execute("INSERT INTO packets VALUES ('x', 1, 2, 1, '{}', NULL)")
        db.execute(f"CREATE TABLE packets_{LAYOUT} (path TEXT, info TEXT)")
    cache = FileCache(store, "packets", 1)
    assert cache.get(video) is None
    cache.put([(file_key(video), '{"n": 1}', b"\x00\x01"), (file_key(tmp_path / "gone.webm"), "{}", None)])
    assert cache.get(video) == ('{"n": 1}', b"\x00\x01") and cache.get(tmp_path / "gone.webm") is None
    assert FileCache(store, "packets", 2).get(video) is None  # another version of the result
    assert FileCache(None, "packets", 1).get(video) is None  # no store
    video.write_bytes(b"y" * 11)  # changed: the stored result is not its result any more
    assert cache.get(video) is None
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT path, meta FROM packets").fetchall() == [("x", "{}")]


@pytest.mark.parametrize("where", ["under a file", "a folder", "not a database"])
def test_a_cache_that_cannot_be_used_is_warned_about_and_done_without(where, tmp_path, caplog) -> None:
    """A cache path that cannot hold the store (its folder is a file, it is a folder, it holds something else): the
    results are worked out without it, with one warning naming the file and the setting, not a traceback."""
    from timesformer_harness.common import FileCache, file_key

    video = tmp_path / "a.webm"
    video.write_bytes(b"x" * 10)
    store = {"under a file": video / "c.sqlite", "a folder": tmp_path, "not a database": tmp_path / "c.sqlite"}[where]
    if where == "not a database":
        store.write_bytes(b"not sqlite " * 200)
    cache = FileCache(store, "probe", 1)
    with caplog.at_level(logging.WARNING, logger="timesformer_harness.common"):
        assert cache.get(video) is None
        cache.put([(file_key(video), "{}", None)])
        assert cache.get(video) is None
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"{store}: the probe cache cannot be used" in warning and "data.validate_cache" in warning


def test_two_caches_rebuilding_an_older_layout_table_at_once_keep_each_others_results(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """Two ranks open a store whose table has an older layout. B reads the table's columns (old); A then opens,
    rebuilds the table and stores a result before B goes on: B must not drop the table A rebuilt (A's result lost).
    The rebuild reads the columns again inside its write transaction, so B finds A's table and keeps it."""
    import sqlite3
    import threading

    from timesformer_harness.common import LAYOUT, FileCache, file_key

    video, other = tmp_path / "a.webm", tmp_path / "b.webm"
    video.write_bytes(b"x" * 10)
    other.write_bytes(b"y" * 10)
    store = tmp_path / "probe.sqlite"
    with sqlite3.connect(store) as db:
        db.execute(f"CREATE TABLE probe_{LAYOUT} (path TEXT, info TEXT)")
    a, b = FileCache(store, "probe", 1), FileCache(store, "probe", 1)
    a_done, started = threading.Event(), []

    def run_a() -> None:
        a.put([(file_key(video), "from A", None)])
        a_done.set()

    class PausedAfterColumns(sqlite3.Connection):  # B's connection: lets A run once B has read the columns
        def execute(self, sql: str, *args):  # type: ignore[override]
            cursor = super().execute(sql, *args)
            if not sql.startswith("PRAGMA table_info") or started:
                return cursor
            rows = cursor.fetchall()
            started.append(threading.Thread(target=run_a, daemon=True))
            started[0].start()
            a_done.wait(3)  # A finishes, or waits on B's write lock (B read the columns under it); B goes on then
            return rows

    connect, opened = sqlite3.connect, []

    def connect_b_first(*args, **kw) -> sqlite3.Connection:
        opened.append(args[0])
        return connect(*args, **kw, **({"factory": PausedAfterColumns} if len(opened) == 1 else {}))

    monkeypatch.setattr(sqlite3, "connect", connect_b_first)
    b.put([(file_key(other), "from B", None)])
    assert a_done.wait(60) and len(opened) == 2
    assert a.get(video) == b.get(video) == ("from A", None)
    assert a.get(other) == b.get(other) == ("from B", None)
