"""Atomic file writes: a reader (or a resumed run) sees the old file or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

# ".{stem}.{8 random hex digits}.tmp{suffix}": the temporary name atomic_path gives.
_TEMPORARY = re.compile(r"\..*\.[0-9a-f]{8}\.tmp(\.[^.]*)?")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temporary(path: Path) -> Path:
    """Create an empty, new ``.{stem}.{8 random hex digits}.tmp{suffix}`` beside ``path``, with the permissions a plain
    ``open(path, "w")`` would give (mode 0o666 less the umask; ``mkstemp`` would make it 0o600)."""
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path`` (same suffix, so a writer that picks the container from the
    extension still can); when the block ends without an exception it is fsynced and renamed over ``path``, else
    removed. A check of the written file belongs inside the block: raising there leaves ``path`` as it was.
    A process killed inside the block leaves the temporary behind (``remove_stale_temporaries`` clears them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text)


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like one of ``atomic_path``'s temporaries."""
    return _TEMPORARY.fullmatch(Path(path).name) is not None


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries that killed writers left anywhere under ``folder``; returns how many. Only for a
    folder no other process is writing to."""
    stale = [p for p in Path(folder).rglob(".*.tmp*") if p.is_file() and is_temporary(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
