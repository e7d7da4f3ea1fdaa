"""Start-up at Kinetics scale: a generated manifest of 240,000 videos (hard links to a few toy clips, each link its own
path as a dataset's files are) read by a torchrun job of 2 CPU ranks (gloo), each building the DALI CPU train loader
and taking its first batch. ``python -m timesformer_harness.benchmarks.bench_startup [--files 240000] [--nproc 2]
[--warm-runs 3] [--skip-cold] [--out runs/bench/startup]`` (~7 min on 2 shared cores, most of it the cold probe)

Reported: time from the launch to each rank's first batch with an empty pre-flight cache (cold: every file probed
once in the job, each rank probing its share) and with the cache the cold job filled (warm, ``--warm-runs`` jobs one
after the other; ``--skip-cold`` reuses the cache an earlier run filled), each rank's phases
(imports, process group, ``build_loader``, first batch) and its peak RSS (VmHWM) after each; and, in this process,
what the packet index costs a first epoch: files indexed per second on 1 and 2 threads into an empty store, read back
from the store, the store's bytes per file, and the resident memory of the in-memory LRU full (4,096 indexes). The
dataset and the caches live under ``--out`` (kept, so a rerun skips making the links); nothing there is committed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from timesformer_harness.common import setup_logging
from timesformer_harness.config import REPO_ROOT
from timesformer_harness.pipelines.manifest import read_kinetics

logger = logging.getLogger(__name__)
LAUNCHED = "BENCH_STARTUP_LAUNCHED"  # the launch's wall time (time.time()), handed to the ranks


def make_dataset(folder: Path, files: int, sources: list[Path]) -> Path:
    """``folder/train.csv`` listing ``files`` hard links ``videos/NNN/vNNNNNN.webm`` to ``sources`` in turn (1,000
    per folder, labels ``i % 400``); links already there are kept."""
    lines = []
    for i in range(files):
        link = folder / "videos" / f"{i // 1000:03d}" / f"v{i:06d}.webm"
        if i % 1000 == 0:
            link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.link(sources[i % len(sources)], link)
        lines.append(f"{link} {i % 400}\n")
    manifest = folder / "train.csv"
    manifest.write_text("".join(lines))
    return manifest


def rank_main(out: Path, manifest: Path, cache: Path) -> None:
    """One rank: join the gloo group, build the train loader (the pre-flight check included), take the first batch;
    writes ``out/rank{r}.json`` with the seconds since the launch and the peak RSS after each phase."""
    launched = float(os.environ[LAUNCHED])
    import torch.distributed as dist

    from timesformer_harness.metrics import rss_high_water_bytes
    from timesformer_harness.pipelines.config import DataConfig
    from timesformer_harness.pipelines.factory import build_loader

    marks = {"imports": (time.time() - launched, rss_high_water_bytes())}
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    marks["process group"] = (time.time() - launched, rss_high_water_bytes())
    cfg = DataConfig(loader="dali", backend="cpu", train_manifest=str(manifest), num_frames=8, sampling_rate=3,
                     train_jitter_scales=[32, 36], train_crop_size=32, batch_size=8, num_workers=1,
                     validate_cache=str(cache))
    loader = build_loader(cfg, "train", rank=rank, world_size=world)
    marks["build_loader"] = (time.time() - launched, rss_high_water_bytes())
    batch = next(iter(loader))
    marks["first batch"] = (time.time() - launched, rss_high_water_bytes())
    record = {"rank": rank, "world_size": world, "batches": len(loader), "batch_shape": list(batch.video.shape),
              "marks": {k: {"s": round(s, 3), "peak_rss_bytes": b} for k, (s, b) in marks.items()}}
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def run_job(out: Path, manifest: Path, cache: Path, nproc: int, timeout_s: float) -> list[dict]:
    """``rank_main`` on ``nproc`` ranks under torchrun; every rank's record (its log goes to ``out/job.log``)."""
    from timesformer_harness.runner import run_command

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", LAUNCHED: repr(time.time())}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "timesformer_harness.benchmarks.bench_startup", "--rank", str(out), str(manifest), str(cache)]
    with open(out / "job.log", "w") as log:
        done = run_command(argv, timeout_s=timeout_s, env=env, stdout=log)
    if done.returncode != 0:
        raise RuntimeError(f"the {nproc}-rank job ended with {done.returncode}; see {out / 'job.log'}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def cached_rows(cache: Path) -> int:
    """Rows in the probe cache's probe table (every file probed once, in the whole job)."""
    with sqlite3.connect(cache) as db:
        table = db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'probe_%'").fetchone()[0]
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def index_cost(paths: list[str], folder: Path) -> dict[str, float]:
    """What a first epoch's packet indexing costs per file (``PacketIndexCache.get`` of ``paths``, each once): files/s
    on 1 and 2 threads into an empty store and read back from a filled one, store bytes per file, and the RSS growth
    of a cache holding its LRU's worth of indexes."""
    import torch

    from timesformer_harness.metrics import PeakMemory
    from timesformer_harness.pipelines.packets import PacketIndexCache

    def rate(cache: PacketIndexCache, threads: int) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(cache.get, paths):
                pass
        return len(paths) / (time.perf_counter() - t0)

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for threads in (1, 2):
        store = folder / f"packets{threads}.sqlite"
        store.unlink(missing_ok=True)
        out[f"cold_files_per_s_{threads}_thread"] = rate(PacketIndexCache(store), threads)
    out["warm_files_per_s_1_thread"] = rate(PacketIndexCache(folder / "packets1.sqlite"), 1)
    stored = [folder / "packets1.sqlite", folder / "packets1.sqlite-wal"]  # the log holds what is not checkpointed
    out["store_bytes_per_file"] = sum(p.stat().st_size for p in stored if p.exists()) / len(paths)
    memory = PeakMemory(torch.device("cpu"), release_freed=True)
    held = PacketIndexCache(folder / "packets1.sqlite")
    for p in paths[:held.size]:
        held.get(p)
    peak = memory.take()
    out["lru_indexes"] = len(held.items)
    out["lru_rss_growth_bytes"] = peak.growth if peak is not None else float("nan")
    return out


def summary(name: str, records: list[dict]) -> str:
    lines = [f"{name}: first batch {max(r['marks']['first batch']['s'] for r in records):.1f} s after the launch "
             f"(slowest rank)"]
    for r in records:
        phases = ", ".join(f"{k} {m['s']:.1f} s / {m['peak_rss_bytes'] / 2**20:.0f} MiB" for k, m in r["marks"].items())
        lines.append(f"  rank {r['rank']}: {phases}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.benchmarks.bench_startup",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=240_000, help="manifest entries")
    parser.add_argument("--sources", type=int, default=8, help="toy clips the links point at")
    parser.add_argument("--nproc", type=int, default=2, help="ranks")
    parser.add_argument("--index-files", type=int, default=4096, help="files the packet-index cost is measured on")
    parser.add_argument("--data", default=str(REPO_ROOT / "data/toy"), help="toy dataset (make data)")
    parser.add_argument("--out", default="runs/bench/startup")
    parser.add_argument("--warm-runs", type=int, default=3, help="warm jobs, one after the other")
    parser.add_argument("--skip-cold", action="store_true",
                        help="time warm jobs only, on the cache an earlier run of the same --files filled")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a job may take")
    parser.add_argument("--rank", nargs=3, metavar=("OUT", "MANIFEST", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging()
    if args.rank:
        rank_main(*map(Path, args.rank))
        return 0
    sources = sorted((Path(args.data) / "train").glob("*.webm"))[:args.sources]
    if not sources:
        raise SystemExit(f"no toy clips in {args.data}/train: run make data")
    out = Path(args.out).resolve()
    t0 = time.perf_counter()
    manifest = make_dataset(out / f"data{args.files}", args.files, sources)
    logger.info("manifest of %d links ready in %.1f s: %s", args.files, time.perf_counter() - t0, manifest)
    cache = out / "cache" / f"validate{args.files}.sqlite"
    results = {"files": args.files, "nproc": args.nproc, "sources": [str(s) for s in sources]}
    if not args.skip_cold:
        for stale in cache.parent.glob(f"{cache.stem}*"):  # the cold job starts from an empty cache
            stale.unlink()
        results["cold"] = run_job(out / "cold", manifest, cache, args.nproc, args.timeout)
    elif not cache.exists():
        raise SystemExit(f"--skip-cold: no cache at {cache}; run once without it")
    results["cached_probes"] = cached_rows(cache)
    results["warm"] = [run_job(out / f"warm{i}", manifest, cache, args.nproc, args.timeout)
                       for i in range(args.warm_runs)]
    results["cache_bytes"] = cache.stat().st_size
    paths = [e.path for e in read_kinetics(manifest)[:args.index_files]]
    results["packet_index"] = index_cost(paths, out / "index")
    per_rank = args.files // args.nproc
    cost = results["packet_index"]
    if "cold" in results:
        print(summary("cold", results["cold"]))
    print(f"probe cache: {results['cached_probes']} files, {results['cache_bytes'] / 2**20:.1f} MiB")
    for i, records in enumerate(results["warm"]):
        print(summary(f"warm {i + 1}", records))
    print(f"packet index ({len(paths)} files): {cost['cold_files_per_s_1_thread']:.0f} files/s on 1 thread, "
          f"{cost['cold_files_per_s_2_thread']:.0f} on 2, {cost['warm_files_per_s_1_thread']:.0f} from the store; "
          f"{cost['store_bytes_per_file']:.0f} store bytes per file; a full LRU ({cost['lru_indexes']} indexes) "
          f"{cost['lru_rss_growth_bytes'] / 2**20:.1f} MiB RSS; a first epoch of {per_rank} files per rank: "
          f"{per_rank / cost['cold_files_per_s_1_thread']:.0f} s of one thread's indexing")
    (out / "startup.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
