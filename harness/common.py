"""What every layer of the harness shares, on the standard library alone: atomic file writes, the logging set-up and
the exit statuses of the command lines, and the file-keyed cache the pre-flight probe and the packet index keep
their results in.

The layers point one way (``kernels`` <- ``pipelines`` <- the rest of ``timesformer_harness``); this module sits
below all of them and imports nothing of the harness.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import sqlite3
import stat
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Iterable, Iterator

# ---------------------------------------------------------------------------------------------- atomic files

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
    The file gets the mode a plain ``open(path, "w")`` gives (0o666 less the umask), whatever the writer did.
    A process killed inside the block leaves the temporary behind (``remove_stale_temporaries`` clears them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that renamed its own file over the temporary
            os.chmod(tmp, mode)  # (safetensors' save_file: a 0600 mkstemp file) gets the umask's mode back
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


def try_lock(path: str | os.PathLike) -> tuple[IO[str], bool]:
    """Open ``path`` (made when missing) and try an exclusive ``flock`` on it without waiting: the open file and
    whether this process now holds the lock (a file system that refuses locks counts as held elsewhere). The lock
    goes when the file is closed or the process dies, however it dies."""
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return f, False
    return f, True


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries that killed writers left anywhere under ``folder``; returns how many. Only for a
    folder no other process is writing to."""
    stale = [p for p in Path(folder).rglob(".*.tmp*") if p.is_file() and is_temporary(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


# ---------------------------------------------------------------------------------------------- logging

FORMAT = "%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"  # dated: a run's log file spans days
# The import names the folders had before they became one package: from a clone's root they still import (as
# namespace packages), so ``python -m harness.train`` runs, with a notice naming the command to use instead.
OLD_MODULE_ROOTS = {"harness": "timesformer_harness", "kernels": "timesformer_harness.kernels",
                    "pipelines": "timesformer_harness.pipelines", "benchmarks": "timesformer_harness.benchmarks"}


def setup_logging(level: int = logging.INFO, rank: int | None = None) -> None:
    """Send log records to stderr with one format, replacing any handler set up before.

    ``rank`` defaults to torchrun's ``RANK``; in a multi-process job each line is prefixed ``[rankN]`` and ranks
    other than 0 log warnings and errors only. A command started by an old module path gets a warning that names
    the new one (``renamed_main_module``).
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if isinstance(handler, _RunLogHandler):
            handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(rank))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    new = renamed_main_module()
    if new:
        logging.getLogger(__name__).warning("this command's module path is the old one and will stop working: run "
                                            "python -m %s (it works from any folder)", new)


def _formatter(rank: int) -> logging.Formatter:
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return logging.Formatter(FORMAT.format(prefix=f"[rank{rank}] " if multi else ""), DATE_FORMAT)


class _RunLogHandler(logging.FileHandler):
    """The file handler ``log_to_file`` adds (one at a time)."""


def log_to_file(path: str | os.PathLike) -> None:
    """Also append every log record to ``path`` (a run's ``train.log``), in the stderr format; replaces the file an
    earlier call named. Call it after ``setup_logging``, once the run folder is known to be this process's."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _RunLogHandler)]:
        root.removeHandler(handler)
        handler.close()
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(_formatter(int(os.environ.get("RANK", "0"))))
    root.addHandler(handler)


def renamed_main_module() -> str | None:
    """The module to run instead when this process was started by an old module path (``python -m harness.train``
    gives ``timesformer_harness.train``); None when it was not."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    top, _, rest = name.removesuffix(".__main__").partition(".")
    if top not in OLD_MODULE_ROOTS or not rest:
        return None
    return f"{OLD_MODULE_ROOTS[top]}.{rest}"


# ---------------------------------------------------------------------------------------------- exit statuses


class ExitCode(enum.IntEnum):
    """The exit statuses of training and evaluation (one table: docs/training.md, "Exit statuses", which also lists
    the other command lines' own)."""

    OK = 0  # done
    ERROR = 1  # an unexpected failure (its traceback is printed), or a training loss that became NaN or inf
    CHECKPOINT = 2  # a checkpoint (or model.pretrained) missing, refused, unreadable or not written
    BAD_VIDEOS = 3  # bad videos over the budget (data.on_bad_video, data.max_bad_fraction)
    RUN_FOLDER = 4  # output.dir is in use by another run, or the data changed under a resume
    CONFIG = 5  # a mistake in the config or the data it names: key, value, file, manifest, label
    PEER_STOPPED = 6  # another rank of the job stopped first and this one lost its connection: that rank's error is it
    # 128 + the signal's number (143 for SIGTERM): a training stopped by Ctrl-C or SIGTERM, which saved a checkpoint
    # (rerun to resume); Ctrl-C before anything could be saved; a second signal
    INTERRUPTED = 130


DEBUG_ENV = "TIMESFORMER_DEBUG"  # set to 1: an error also prints its traceback


def host_memory_bytes() -> int | None:
    """The machine's physical memory, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def check_fits(what: str, nbytes: int, memories: list[tuple[str, int | None]], fix: str) -> None:
    """Raise ValueError when ``what`` (``nbytes``) is larger than one of ``memories`` (where, its total bytes or None
    when unknown): sizes that cannot run on this machine, refused before any allocation (which would fail with an
    allocator's traceback, or after a long pre-flight). ``fix`` says which settings make it."""
    for where, total in memories:
        if total is not None and nbytes > total:
            raise ValueError(f"{what}: {nbytes / 2**30:,.1f} GiB, more than the {total / 2**30:,.1f} GiB of memory "
                             f"on {where}; {fix}")


def exit_on_sigterm() -> None:
    """Let SIGTERM (``timeout``, a job scheduler, ``kill``) end this process through ``SystemExit(143)``, as Ctrl-C
    ends it through KeyboardInterrupt: ``finally`` blocks and handlers run, so a command it waits on
    (``runner.run_command``) has its process group killed on the way out rather than left running (on a GPU, holding
    it), and what was measured is written. Call it from an entry point's main thread."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def leave_for_torchrun(message: str, effect: bool = False) -> None:
    """Leave ``message`` in the error file torchrun gives each worker (``TORCHELASTIC_ERROR_FILE``; nothing outside
    torchrun): its failure summary prints it where it would say "To enable traceback see ...". torchrun names the
    failure with the earliest timestamp (whole seconds) the root cause, so an ``effect`` of another rank's failure (this
    rank lost its connection to it) is dated a second later: the rank that failed first is named."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    if path:
        with contextlib.suppress(OSError):
            extra = {"py_callstack": message, "timestamp": str(int(time.time()) + int(effect))}  # what it prints
            Path(path).write_text(json.dumps({"message": {"message": message, "extraInfo": extra}}))


def report_error(error: BaseException, code: ExitCode, debug: bool = False, message: str = "") -> int:
    """Print ``error: <message>`` (``error``'s own by default) on stderr, and into the run's log file when there is
    one; return ``code``, for an entry point's ``main`` to return. The traceback comes first when ``debug`` (a
    ``--debug`` flag) or ``TIMESFORMER_DEBUG=1``."""
    if debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(error)
    message = message or str(error) or type(error).__name__
    leave_for_torchrun(message, effect=code == ExitCode.PEER_STOPPED)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _RunLogHandler):
            handler.handle(logging.makeLogRecord({"name": "timesformer_harness", "levelno": logging.ERROR,
                                                  "levelname": "ERROR", "msg": message}))
    print(f"error: {message}", file=sys.stderr, flush=True)
    return int(code)


# ---------------------------------------------------------------------------------------------- the file cache

CACHE_ENV = "XDG_CACHE_HOME"
PROBE_CACHE = "validate.sqlite"
COLUMNS = ("path", "size", "mtime", "version", "meta", "data")  # a FileCache table's layout
LAYOUT = "c2"  # its name: bump it with COLUMNS
# Filesystems shared between nodes (/proc/self/mountinfo's names), where SQLite's file locks are unreliable and a
# cache that several ranks write can be corrupted: no FileCache store lives on one. FUSE filesystems are named one by
# one: a container's root can be FUSE too (fuse-overlayfs, rootless Podman), and it is node-local.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
    "ocfs2", "gfs2", "panfs", "wekafs", "orangefs", "pvfs2", "dvs", "virtiofs", "fuse.glusterfs", "fuse.sshfs",
    "fuse.s3fs", "fuse.gcsfuse", "fuse.cephfs", "fuse.juicefs", "fuse.beegfs", "fuse.rclone", "fuse.mfs",
    "fuse.lizardfs", "fuse.goofys", "fuse.blobfuse", "fuse.blobfuse2", "fuse.geesefs", "fuse.ossfs"})
NODE_LOCAL_ROOT = Path("/var/tmp")  # node-local and kept across reboots on common Linux set-ups (unlike /tmp)


def filesystem_type(path: str | os.PathLike) -> str:
    """The type of the filesystem that holds ``path`` (or would hold it: it need not exist yet), as
    ``/proc/self/mountinfo`` names it (``ext4``, ``nfs4``, ``lustre``, ...); "" where that cannot be read."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    target = os.path.realpath(path)
    best, found = -1, ""
    for line in lines:  # "id parent major:minor root MOUNT_POINT options [optional...] - TYPE source super-options"
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # "\040" is a space
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best:  # the deepest mount point; of equal ones the last mounted
            best, found = len(mount), fields[fields.index("-", 6) + 1]
    return found


def on_network_filesystem(path: str | os.PathLike) -> str:
    """The type of the shared filesystem ``path`` is on (``NETWORK_FILESYSTEMS``), or "" when it is node-local."""
    fs = filesystem_type(path)
    return fs if fs in NETWORK_FILESYSTEMS else ""


def default_cache_dir() -> tuple[Path, str]:
    """The harness's cache folder and, when it is not the usual one, why: ``$XDG_CACHE_HOME/timesformer-harness``
    (``~/.cache`` when unset) when that is node-local, else ``/var/tmp/timesformer-harness-<uid>`` (a home shared
    over NFS is common on clusters), made private (mode 700).

    Raises:
        ValueError: that node-local folder is a link, not a folder, or another user's; or ``/var/tmp`` is on a shared
            filesystem too.
    """
    usual = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache") / "timesformer-harness"
    fs = on_network_filesystem(usual)
    if not fs:
        return usual, ""
    if also := on_network_filesystem(NODE_LOCAL_ROOT):
        raise ValueError(f"{usual} is on {fs} and {NODE_LOCAL_ROOT} on {also}, both shared filesystems, where SQLite's "
                         f"file locks are unreliable: set data.validate_cache to a folder on a node-local disk (the "
                         f"node's scratch or /tmp), or none")
    local = NODE_LOCAL_ROOT / f"timesformer-harness-{os.getuid()}"
    local.mkdir(mode=0o700, exist_ok=True)  # in a folder every user may write to: made private, and checked
    st = os.lstat(local)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ValueError(f"{local} (the node-local cache folder, since {usual} is on {fs}) is not a folder of this "
                         f"user's: remove it, or set data.validate_cache to a node-local path of yours")
    return local, f"{usual} is on {fs}, a shared filesystem"


def cache_dir() -> Path:
    """The harness's cache folder, always on a node-local filesystem (``default_cache_dir``)."""
    return default_cache_dir()[0]


def cache_path(setting: str | os.PathLike | None, name: str = PROBE_CACHE) -> Path | None:
    """Where the cache ``name`` lives for a ``data.validate_cache`` setting: "" (or None) the harness's cache folder,
    ``none`` nowhere (no cache), an existing folder that folder, else the probe cache's own path, with every other
    cache beside it.

    Raises:
        ValueError: the setting is a path on a shared filesystem (NFS, Lustre, sshfs, ...; ``NETWORK_FILESYSTEMS``).
    """
    setting = "" if setting is None else str(setting)
    if setting == "none":
        return None
    if setting and (fs := on_network_filesystem(setting)):
        raise ValueError(f"data.validate_cache={setting} is on {fs}, a shared filesystem, where SQLite's file locks "
                         f"are unreliable and every rank writes the cache; give a path on a node-local disk, leave it "
                         f"unset (the default folder is kept on one) or set none")
    probe = Path(setting) if setting else cache_dir() / PROBE_CACHE
    if probe.is_dir():  # a folder named: the caches go in it, not beside it
        probe = probe / PROBE_CACHE
    return probe if name == PROBE_CACHE else probe.parent / name


def cache_location(setting: str | os.PathLike | None) -> str:
    """Where the caches of a ``data.validate_cache`` setting live, in words (for a log line)."""
    probe = cache_path(setting)
    if probe is None:
        return "off (data.validate_cache=none)"
    where = f"{probe.parent} ({PROBE_CACHE}: probe and deep check; packets.sqlite: packet indexes)"
    moved = "" if setting else default_cache_dir()[1]
    return f"{where}, node-local because {moved}" if moved else where


def not_a_file(path: str | os.PathLike) -> str:
    """What ``path`` is when it is not a regular file (links followed), to finish "X ...": "does not exist",
    "is a folder", "is a named pipe", ... ("is ...": something other than a file), "cannot be read (...): ..." (the
    path itself fails); "" for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as e:  # a loop of links, a folder on the way without permission, a name too long
        return f"cannot be read ({e.strerror}): check the path and its folders' permissions"
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {kind}"
    return "" if stat.S_ISREG(mode) else "is not a file"


def file_key(path: str | os.PathLike) -> tuple[str, int, int] | None:
    """(absolute path, size, mtime_ns) of a file: what a cached result of it is valid for; None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def set_wal_mode(db: sqlite3.Connection, timeout_s: float = 60.0) -> None:
    """Put ``db`` in write-ahead-logging mode. Switching a new file to WAL needs an exclusive lock, and SQLite answers
    "database is locked" at once, without its busy timeout, while another process (another rank, at the same
    moment) holds the file: so retry until ``timeout_s``. A file already in WAL mode stays in it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class FileCache:
    """An SQLite table mapping a file (``file_key``) and a result version to a result: ``meta`` text and an optional
    ``data`` blob. Results of another version, or of the file before it changed, are not returned. The table is
    named ``<table>_<LAYOUT>``: an older harness's table of the same kind in the same file is not touched (both
    versions can share a cache), and a table of the right name but another layout is dropped and rebuilt (under
    SQLite's write lock, so ranks opening the store together rebuild it once and keep each other's results).

    One connection per process (a cache made before a fork works in the child), shared by threads under a lock.
    ``path`` None: no store, every ``get`` misses and ``put`` keeps nothing. A store on a shared filesystem
    (``NETWORK_FILESYSTEMS``) is refused: SQLite's locks are not to be trusted there, and every rank writes.
    """

    def __init__(self, path: str | os.PathLike | None, table: str, version: int | str):
        if path and (fs := on_network_filesystem(path)):
            raise ValueError(f"{path}: a cache on {fs}, a shared filesystem, where SQLite's file locks are unreliable; "
                             f"keep it on a node-local disk (the default folder, {cache_dir()}, is)")
        # the table's name carries the layout, so that an older harness's table of the same kind, in the same file,
        # is left to it (a harness reads its own tables only)
        self.path, self.table, self.version = (Path(path) if path else None), f"{table}_{LAYOUT}", version
        self.lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._db_pid = -1

    def __getstate__(self) -> dict:  # for worker processes: the store's path travels, not its connection
        return {"path": self.path, "table": self.table, "version": self.version}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["table"], state["version"])

    def _unusable(self, error: Exception) -> None:
        """Go on without the store (every ``get`` misses, ``put`` keeps nothing), saying why once."""
        logging.getLogger(__name__).warning(
            "%s: the %s cache cannot be used (%s: %s); going on without it, so its results are worked out again: "
            "point data.validate_cache (--cache for the tools) at a writable file on a node-local disk, or set it to "
            "none", self.path, self.table.rsplit("_", 1)[0], type(error).__name__, error)
        self.path, self._db = None, None

    def _connect(self) -> sqlite3.Connection | None:
        if self.path is None:
            return None
        if self._db is None or self._db_pid != os.getpid():
            try:
                self._open()
            except (OSError, sqlite3.Error) as e:  # a read-only or missing folder, a folder given as the file, ...
                self._unusable(e)
        return self._db

    def _open(self) -> None:
        """Connect to the store, in WAL mode, with this harness's table in its layout."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
        # write-ahead logging (node-local stores only, as __init__ ensures: its index is shared memory of one host):
        # readers run beside a writer, and a commit needs no fsync (~10 ms per commit here without it; a crash
        # can lose the last results, not the file's consistency)
        set_wal_mode(db)
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            if self._columns(db) != list(COLUMNS):
                # made or rebuilt under the write lock, the columns read again inside it: two ranks that both saw
                # the old layout would otherwise each drop the table, the second one what the first had rebuilt
                db.execute("BEGIN IMMEDIATE")
                if (columns := self._columns(db)) and columns != list(COLUMNS):  # an older layout: a cache, rebuilt
                    db.execute(f"DROP TABLE IF EXISTS {self.table}")
                db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (path TEXT, size INTEGER, mtime INTEGER, "
                           f"version, meta TEXT, data BLOB, PRIMARY KEY (path, size, mtime, version))")
                db.commit()
        except BaseException:
            db.close()  # rolls back
            raise
        self._db, self._db_pid = db, os.getpid()

    def _columns(self, db: sqlite3.Connection) -> list[str]:
        """The columns of this cache's table in ``db``, in order; [] when there is none."""
        return [row[1] for row in db.execute(f"PRAGMA table_info({self.table})")]

    def get(self, path: str | os.PathLike) -> tuple[str, bytes | None] | None:
        """(meta, data) stored for ``path`` as it is now, or None."""
        key = file_key(path)
        with self.lock:
            db = self._connect()
            if db is None or key is None:
                return None
            try:
                return db.execute(f"SELECT meta, data FROM {self.table} WHERE path=? AND size=? AND mtime=? AND "
                                  f"version=?", (*key, self.version)).fetchone()
            except sqlite3.Error as e:  # not a database, locked past the timeout, ...
                self._unusable(e)
                return None

    def put(self, items: Iterable[tuple[tuple[str, int, int] | None, str, bytes | None]]) -> None:
        """Store (key, meta, data) results in one transaction. ``key`` is the file's ``file_key`` taken before the
        result was worked out: a file that changed while it was read is then stored under its old state, and worked
        out again next time, never the other way round. Files that were gone (key None) are left out."""
        rows = [(*key, self.version, meta, data) for key, meta, data in items if key]
        with self.lock:
            db = self._connect()
            if db is None or not rows:
                return
            try:
                with db:
                    db.executemany(f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?, ?, ?, ?, ?)", rows)
            except sqlite3.Error as e:  # read-only, disk full, ...
                self._unusable(e)
