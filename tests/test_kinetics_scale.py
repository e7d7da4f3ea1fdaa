"""Kinetics scale: the pre-flight check sharded across ranks (a real 2-process gloo job under torchrun, counting the
files each rank probes and deep-checks), the ranks agreeing on the decode plan and the rejected files, and the caches
kept off shared filesystems, saying where they are. (The packet index demuxing outside its lock is
``tests/test_pipelines_seek.py::test_two_threads_index_two_files_at_once``.)"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from timesformer_harness import common
from timesformer_harness.common import FileCache, cache_location, cache_path, default_cache_dir, filesystem_type

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "data" / "toy" / "train"

# One rank of the job: counts the probes and deep probes this process runs (the pools run them in threads of this
# process with data.num_workers=1), builds the train loader and writes what it saw (or the error that stopped it) to
# {out}/rank{r}.json. Rank 1 reads {manifest}.rank1 instead when that exists.
WORKER = """
import json, os, sys
import torch.distributed as dist
from timesformer_harness.common import setup_logging
from timesformer_harness.pipelines import factory, validate
from timesformer_harness.pipelines.config import DataConfig

out, manifest, cache, mode = sys.argv[1:5]
setup_logging()
dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 1 and os.path.exists(manifest + ".rank1"):  # a manifest of rank 1's own, where the test made one
    manifest += ".rank1"
probed, deep = [], []
probe, deep_probe = validate.probe_video, validate.deep_probe
validate.probe_video = lambda p: probed.append(p) or probe(p)
validate.deep_probe = lambda p: deep.append(p) or deep_probe(p)
if mode == "no-dali-on-rank-1" and rank == 1:
    factory.dali_available = lambda: "nvidia.dali is not importable (taken away on this rank)"
cfg = DataConfig(loader="auto", backend="cpu", train_manifest=manifest, num_frames=8, sampling_rate=3,
                 train_jitter_scales=[32, 36], train_crop_size=32, batch_size=4, num_workers=1, on_bad_video="skip",
                 max_bad_fraction=1.0, validate="deep" if mode == "deep" else "shallow", validate_cache=cache)
try:
    loader = factory.build_loader(cfg, "train", rank=rank, world_size=dist.get_world_size(), run_dir=out)
    seen = {"kind": loader.kind, "batches": len(loader), "rejected": loader.rejected}
except (RuntimeError, ValueError) as e:
    seen = {"error": str(e)}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"probed": probed, "deep": deep, **seen}, f)
dist.destroy_process_group()
"""


def torchrun(tmp: Path, name: str, manifest: Path, cache: str, mode: str) -> tuple[dict, dict, str]:
    """Run WORKER on 2 ranks; returns (rank 0's record, rank 1's record, the job's stderr)."""
    out = tmp / name
    out.mkdir()
    script = tmp / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out),
           str(manifest), cache, mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((out / "rank0.json").read_text()), json.loads((out / "rank1.json").read_text()), res.stderr


@pytest.fixture
def manifest(tmp_path: Path) -> tuple[Path, list[str]]:
    """41 videos: hard links to 39 toy clips (each its own path, as a dataset's files are), an empty file in rank 1's
    share (index 1) and a missing one in rank 0's (index 4)."""
    clips = sorted(TOY.glob("*.webm"))[:39]
    if len(clips) < 39:
        pytest.skip("the toy dataset is missing: run make data")
    folder = tmp_path / "videos"
    folder.mkdir()
    paths = []
    for i, clip in enumerate(clips):
        os.link(clip, folder / f"v{i:03d}.webm")
        paths.append(str(folder / f"v{i:03d}.webm"))
    (folder / "empty.webm").write_bytes(b"")
    paths.insert(1, str(folder / "empty.webm"))
    paths.insert(4, str(folder / "missing.webm"))
    listing = tmp_path / "train.csv"
    listing.write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(paths)))
    return listing, paths


def test_two_ranks_each_probe_their_share_once_and_agree(manifest, tmp_path: Path) -> None:
    """Cold: rank r probes exactly paths[r::2] and deep-checks exactly its share of the usable files; both ranks
    reject the same two files (each probed by one rank only) and plan the same loader. Warm (same cache): no file is
    probed again but the missing one (a file that is gone is never cached: one stat, by its rank)."""
    listing, paths = manifest
    cache = tmp_path / "cache" / "validate.sqlite"
    r0, r1, err = torchrun(tmp_path, "cold", listing, str(cache), "deep")
    assert r0["probed"] == paths[0::2] and r1["probed"] == paths[1::2]
    assert (len(r0["probed"]), len(r1["probed"])) == (21, 20)
    usable = [p for p in paths if not p.endswith(("empty.webm", "missing.webm"))]
    assert r0["deep"] == usable[0::2] and r1["deep"] == usable[1::2]
    assert (len(r0["deep"]), len(r1["deep"])) == (20, 19)
    reasons = {p: r for p, r in r0["rejected"]}
    assert r0["rejected"] == r1["rejected"] and list(reasons) == [paths[1], paths[4]]
    assert "empty file" in reasons[paths[1]] and "missing" in reasons[paths[4]]
    assert r0["kind"] == r1["kind"] == "dali" and r0["batches"] == r1["batches"] == 39 // 2 // 4
    rows = list(csv.DictReader((tmp_path / "cold" / "rejected.csv").open()))  # rank 0 writes both ranks' finds
    assert [r["path"] for r in rows] == [paths[1], paths[4]]
    assert f"pre-flight caches: {cache.parent} (validate.sqlite" in err

    r0, r1, _ = torchrun(tmp_path, "warm", listing, str(cache), "deep")
    assert r0["probed"] == [paths[4]] and r1["probed"] == [] and r0["deep"] == r1["deep"] == []
    assert r0["rejected"] == r1["rejected"] == [[p, reasons[p]] for p in (paths[1], paths[4])]


def test_ranks_that_would_plan_different_loaders_stop_with_both_plans(manifest, tmp_path: Path) -> None:
    """DALI importable on rank 0 only: data.loader=auto would give rank 0 DALI and rank 1 PyAV (different batches
    per epoch, a hang at the first collective); both ranks raise instead, naming each rank's plan."""
    listing, _ = manifest
    r0, r1, _ = torchrun(tmp_path, "split", listing, "none", "no-dali-on-rank-1")
    assert r0["error"] == r1["error"]
    assert "rank 0: dali on cpu" in r0["error"] and "rank 1: pyav on cpu" in r0["error"]
    assert "set data.loader and data.backend explicitly" in r0["error"]


@pytest.mark.parametrize("change", ["reversed", "one line more", "one label"])
def test_ranks_that_read_different_manifests_stop_before_probing(change, manifest, tmp_path: Path) -> None:
    """Rank 1's manifest lists the videos in another order, or one more, or gives one video another label: each
    rank's probes would be placed back by position among other files' (or the gather would fail on one rank and reset
    the other's connection), or rank 1 would train that video as another class. Both ranks refuse with the same
    error, naming each rank's count and the first difference, before probing any file."""
    listing, paths = manifest
    lines = listing.read_text().splitlines(keepends=True)
    extra = str(tmp_path / "videos" / "extra.webm")
    relabelled = lines[:7] + [f"{paths[7]} 2\n"] + lines[8:]  # was label 7 % 3 = 1
    Path(f"{listing}.rank1").write_text("".join({"reversed": lines[::-1], "one line more": lines + [f"{extra} 0\n"],
                                                 "one label": relabelled}[change]))
    r0, r1, err = torchrun(tmp_path, "differ", listing, "none", "shallow")
    assert r0["error"] == r1["error"] and r0["probed"] == r1["probed"] == []
    error = r0["error"]
    assert error.startswith("the ranks read different manifests (rank 0: 41 videos (sha256 ")
    if change == "reversed":
        assert "rank 1: 41 videos" in error
        assert f"video 1: rank 0 has {paths[0]!r} label 0, rank 1 has {paths[-1]!r} label {40 % 3}" in error
    elif change == "one line more":
        assert "rank 1: 42 videos" in error and f"video 42: rank 0 has no entry, rank 1 has {extra!r} label 0" in error
    else:
        assert "rank 1: 41 videos" in error
        assert f"video 8: rank 0 has {paths[7]!r} label 1, rank 1 has {paths[7]!r} label 2" in error
    assert "every rank must read the same manifest: a file every node sees, not rewritten while the job starts" in error
    assert "Traceback" not in err and "extended slice" not in err and "Connection reset" not in err


def test_caches_stay_off_shared_filesystems_and_say_where_they_are(tmp_path: Path, monkeypatch) -> None:
    """The filesystem type comes from the real mount table. With the folder $XDG_CACHE_HOME names on a filesystem
    counted as shared (tmpfs here, standing in for NFS), the caches move to the node-local folder and the log line
    says why; a data.validate_cache path on one, or a FileCache store there, is refused with the fix."""
    if filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm to stand in for a shared filesystem")
    assert filesystem_type("/proc/self/status") == "proc"
    assert filesystem_type(tmp_path / "not" / "made" / "yet") == filesystem_type(tmp_path) != ""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == (tmp_path / "xdg" / "timesformer-harness", "")
    assert cache_path("") == tmp_path / "xdg" / "timesformer-harness" / "validate.sqlite"
    assert "node-local" not in cache_location("")

    monkeypatch.setattr(common, "NETWORK_FILESYSTEMS", frozenset({"tmpfs"}))
    monkeypatch.setattr(common, "NODE_LOCAL_ROOT", tmp_path / "var-tmp")  # /var/tmp, without touching it
    (tmp_path / "var-tmp").mkdir()
    shared = Path("/dev/shm") / f"harness-test-{os.getpid()}"
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared))
    local = tmp_path / "var-tmp" / f"timesformer-harness-{os.getuid()}"
    assert default_cache_dir() == (local, f"{shared / 'timesformer-harness'} is on tmpfs, a shared filesystem")
    assert local.is_dir() and local.stat().st_mode & 0o777 == 0o700  # private: its parent is anyone's to write
    assert cache_path("", "packets.sqlite") == local / "packets.sqlite"
    assert cache_location("") == (f"{local} (validate.sqlite: probe and deep check; packets.sqlite: packet indexes), "
                                  f"node-local because {shared / 'timesformer-harness'} is on tmpfs, a shared "
                                  "filesystem")
    with pytest.raises(ValueError, match=rf"data.validate_cache={shared}/v.sqlite is on tmpfs, a shared filesystem.*"
                                         r"node-local disk"):
        cache_path(shared / "v.sqlite")
    with pytest.raises(ValueError, match=rf"{shared}/v.sqlite: a cache on tmpfs"):
        FileCache(shared / "v.sqlite", "probe", 1)
    assert not shared.exists()  # refused before anything was written
    assert cache_path("none") is None and cache_location("none") == "off (data.validate_cache=none)"
    local.rmdir()
    local.symlink_to(tmp_path)  # someone else's link where the private folder goes
    with pytest.raises(ValueError, match=r"is not a folder of this user's: remove it, or set data.validate_cache"):
        cache_path("")
    monkeypatch.setattr(common, "NODE_LOCAL_ROOT", Path("/dev/shm"))  # the fallback on a shared filesystem too
    with pytest.raises(ValueError, match=rf"{shared / 'timesformer-harness'} is on tmpfs and /dev/shm on tmpfs, both "
                                         r"shared filesystems.*set data.validate_cache to a folder on a node-local"):
        cache_path("")


def test_cray_dvs_virtiofs_and_network_fuse_filesystems_count_as_shared(tmp_path: Path, monkeypatch) -> None:
    """The filesystem types a cache must stay off: the listed network ones, Cray DVS, virtiofs and the network FUSE
    ones (sshfs, rclone, MooseFS, gcsfuse, JuiceFS); local disks, tmpfs, overlay, fuseblk (NTFS or exFAT on a local
    disk) and fuse-overlayfs (a rootless container's root, where the default cache folders are) are node-local."""
    shared = ["nfs4", "lustre", "dvs", "virtiofs", "fuse.sshfs", "fuse.rclone", "fuse.mfs", "fuse.gcsfuse",
              "fuse.juicefs"]
    local = ["ext4", "xfs", "btrfs", "tmpfs", "overlay", "fuseblk", "fuse.fuse-overlayfs", ""]
    for fs in shared + local:
        monkeypatch.setattr(common, "filesystem_type", lambda path, fs=fs: fs)
        assert common.on_network_filesystem(tmp_path) == (fs if fs in shared else ""), fs
    for fs in ("dvs", "virtiofs", "fuse.rclone"):
        monkeypatch.setattr(common, "filesystem_type", lambda path, fs=fs: fs)
        with pytest.raises(ValueError, match=rf"data.validate_cache={tmp_path}/v.sqlite is on {fs}, a shared"):
            cache_path(tmp_path / "v.sqlite")


def test_a_folder_given_as_the_cache_holds_every_cache(tmp_path: Path) -> None:
    """data.validate_cache naming an existing folder: the probe cache and the packet indexes both go in it (the
    packet indexes had gone to the folder's parent, while the probe cache failed to open the folder as a file)."""
    folder = tmp_path / "caches"
    folder.mkdir()
    assert cache_path(str(folder)) == folder / "validate.sqlite"
    assert cache_path(str(folder), "packets.sqlite") == folder / "packets.sqlite"
    assert cache_path(str(tmp_path / "mine.sqlite"), "packets.sqlite") == tmp_path / "packets.sqlite"  # a file: beside


def test_a_new_cache_file_switched_to_wal_by_two_processes_at_once_waits_for_the_other() -> None:
    """Two ranks opening a new cache file together both switch it to WAL; SQLite answers one of them "database is
    locked" at once, without its busy timeout. The switch is retried; another error is raised as it is."""
    import sqlite3

    class Racing:
        def __init__(self, answers: list[str]):
            self.answers, self.calls = answers, 0

        def execute(self, sql: str) -> None:
            assert sql == "PRAGMA journal_mode=WAL"
            self.calls += 1
            if self.answers:
                raise sqlite3.OperationalError(self.answers.pop(0))

    db = Racing(["database is locked", "database is locked"])
    common.set_wal_mode(db)  # type: ignore[arg-type]
    assert db.calls == 3
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        common.set_wal_mode(Racing(["disk I/O error"]))  # type: ignore[arg-type]
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        common.set_wal_mode(Racing(["database is locked"] * 3), timeout_s=0.0)  # type: ignore[arg-type]
