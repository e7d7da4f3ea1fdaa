"""Host cost of the DALI loader's clip streams, old against new, in one run: what making one clip's input costs
(plan + reads + stream), and what the thread that iterates the loader spends in DALI's source callback.

``python -m timesformer_harness.benchmarks.bench_clip_streams [--old REV] [--videos 4] [--clips 96] [--repeats 7]
[--data runs/bench/clip_streams_data] [--out runs/bench/clip_streams.json]``

Files: ``--videos`` generated 10 s 320x240 H.264 sources (``bench_prepare.make_sources``) prepared by
``timesformer_harness.pipelines.tools.prepare`` to a 256-px short side with a keyframe every 32 frames, as VP9,
H.264 and HEVC. Clips: train plans at 8x32 sampling (``ClipPlanner``). Old: ``pipelines/packets.py`` at ``--old``
(read from git), as its ``feed_mode`` feeds the GPU decoder: ``remux_packets`` (PyAV copies the packets into
Matroska) where it remuxes, else its IVF stream (``clip_stream``; before that existed, ``ivf_stream`` over a pread per
packet). New: this tree's ``clip_stream`` (one ``os.pread`` per keyframe run; H.264 as Annex-B in IVF, HEVC in
Matroska written from the byte ranges). HEVC also gets a ``file`` row: the whole file read (``np.fromfile``), what
``feed_mode`` feeds instead of a remux that saves under ``REMUX_MIN_SAVING`` of the frames. All in this process, one
thread, rows interleaved per repeat, median over repeats of the CPU (``time.process_time``) and wall ms per clip;
counted per clip: ``os.pread`` calls, bytes read, PyAV containers opened, stream bytes, frames a decoder decodes.
Then a real DALI CPU pipeline over the VP9 files (batch 8, 2 threads): ms per clip the iterating thread spends in
the source callback with the streams made in the callback (``prefetch=0``: the old loader) and by the source's
worker (``prefetch=2``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


import numpy as np

from timesformer_harness.common import setup_logging
from timesformer_harness.config import REPO_ROOT
from timesformer_harness.pipelines.config import DataConfig

T, RATE, FPS, GOP, SHORT, BATCH = 8, 32, 30, 32, 256, 8
CODECS = ("vp9", "h264", "hevc")
NEW_NAMES = {"vp9": "IVF, a pread per run", "h264": "Annex-B in IVF, a pread per run",
             "hevc": "Matroska, a pread per run"}


def old_packets(rev: str):
    """``pipelines/packets.py`` as it was at git ``rev``, imported as a module of its own."""
    text = subprocess.run(["git", "show", f"{rev}:pipelines/packets.py"], cwd=REPO_ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(f"/tmp/old_packets_{os.getpid()}.py")
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_packets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def prepared(data: Path, videos: int) -> dict[str, list[str]]:
    """codec -> the prepared files (generated and prepared once, kept in ``data``)."""
    from timesformer_harness.benchmarks.bench_prepare import make_sources
    from timesformer_harness.pipelines.manifest import read_entries
    from timesformer_harness.pipelines.tools.prepare import prepare
    from timesformer_harness.pipelines.tools.transcode import PrepareSpec

    manifest = make_sources(data / "source", videos)
    out = {}
    for codec in CODECS:
        report = prepare(manifest, data / codec, PrepareSpec(codec, SHORT, GOP), workers=0, progress=False)
        assert not report.failed, report.summary()
        out[codec] = [e.path for e in read_entries(Path(report.manifest), "kinetics")]
    return out


def train_plans(paths: list[str], clips: int, index_of) -> list:
    from timesformer_harness.pipelines.base import ClipPlanner, Video

    cfg = DataConfig(num_frames=T, sampling_rate=RATE, target_fps=FPS, train_jitter_scales=[256, 320],
                     train_crop_size=224, batch_size=1, validate_cache="none")
    videos = []
    for i, p in enumerate(paths):
        index = index_of(p)
        videos.append(Video(i, p, 0, index.num_frames, index.fps, index.height, index.width))
    planner, plans, epoch = ClipPlanner(cfg, "train", videos), [], 0
    while len(plans) < clips:
        plans += planner.plans(epoch)
        epoch += 1
    return plans[:clips]


class Counts:
    """Counts ``os.pread`` calls and bytes, and ``av.open`` calls, while active (patched module attributes)."""

    def __init__(self):
        import av

        self.preads = self.bytes = self.opens = 0
        self._pread, self._open, self._av = os.pread, av.open, av

    def __enter__(self):
        def pread(fd, n, at):
            data = self._pread(fd, n, at)
            self.preads += 1
            self.bytes += len(data)
            return data

        def open_(*a, **k):
            self.opens += 1
            return self._open(*a, **k)

        os.pread, self._av.open = pread, open_
        return self

    def __exit__(self, *exc):
        os.pread, self._av.open = self._pread, self._open


def stream_rows(files: dict[str, list[str]], clips: int, repeats: int, old) -> list[dict]:
    """Per codec, old and new: CPU and wall ms per clip (median over repeats), and the counts per clip."""
    from timesformer_harness.pipelines import packets

    makers = {}
    for codec, paths in files.items():
        new_index = {p: packets.index_packets(p) for p in paths}
        old_index = {p: old.index_packets(p) for p in paths}
        plans = train_plans(paths, clips, new_index.get)
        fds = {p: os.open(p, os.O_RDONLY) for p in paths}

        def old_make(plan, old_index=old_index, fds=fds):
            index = old_index[plan.path]
            pp = old.plan_packets(index, plan.frames)
            if old.feed_mode(index, pp, "gpu")[0] != "stream":
                return old.remux_packets(index, pp), pp.decoded
            if hasattr(old, "clip_stream"):
                return old.clip_stream(index, pp, fds[plan.path]), pp.decoded
            return old.ivf_stream(index, old.read_payloads(index, pp.packets, fds[plan.path])), pp.decoded

        def new_make(plan, new_index=new_index, fds=fds):
            index = new_index[plan.path]
            pp = packets.plan_packets(index, plan.frames)
            if packets.feed_mode(index, pp, "gpu")[0] != "stream":
                raise RuntimeError(f"{plan.path}: not fed as a clip stream: {packets.feed_mode(index, pp, 'gpu')}")
            return packets.clip_stream(index, pp, fds[plan.path]), pp.decoded

        def whole_file(plan, new_index=new_index):
            last = min(int(plan.frames.max()), new_index[plan.path].num_frames - 1)
            return np.fromfile(plan.path, np.uint8), last + 1

        first = old_index[paths[0]]
        mode = old.feed_mode(first, old.plan_packets(first, plans[0].frames), "gpu")[0]
        old_name = ("PyAV remux into Matroska" if mode != "stream" else
                    NEW_NAMES[codec] if hasattr(old, "clip_stream") else "IVF, a pread per packet")
        makers[(codec, "old", old_name)] = (old_make, plans)
        makers[(codec, "new", NEW_NAMES[codec])] = (new_make, plans)
        if codec == "hevc":
            makers[(codec, "file", "the whole file")] = (whole_file, plans)
    samples: dict[tuple, list[tuple[float, float]]] = {k: [] for k in makers}
    for r in range(repeats + 1):  # the first round warms up (page cache, imports) and is not kept
        for key, (make, plans) in makers.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for plan in plans:
                make(plan)
            w, c = time.perf_counter() - w0, time.process_time() - c0
            if r:
                samples[key].append((1e3 * c / len(plans), 1e3 * w / len(plans)))
    rows = []
    for key, (make, plans) in makers.items():
        with Counts() as n:
            made = [make(p) for p in plans]
        cpu, wall = zip(*samples[key])
        rows.append({"codec": key[0], "path": key[1], "stream": key[2], "clips": len(plans),
                     "cpu_ms_per_clip": statistics.median(cpu), "cpu_ms_spread": [min(cpu), max(cpu)],
                     "wall_ms_per_clip": statistics.median(wall), "preads_per_clip": n.preads / len(plans),
                     "bytes_read_per_clip": n.bytes / len(plans), "containers_per_clip": n.opens / len(plans),
                     "stream_bytes_per_clip": statistics.mean(len(m[0]) for m in made),
                     "decoded_frames_per_clip": statistics.mean(m[1] for m in made)})
    return rows


class Timed:
    """A DALI source callback that adds up the seconds spent in it (``seconds``)."""

    def __init__(self, source) -> None:
        self.source, self.seconds = source, 0.0

    def __getattr__(self, name: str):  # what the graph builder reads from the source (e.g. its settings)
        return getattr(self.source, name)

    def __call__(self):
        t0 = time.perf_counter()
        try:
            return self.source()
        finally:
            self.seconds += time.perf_counter() - t0


def callback_rows(paths: list[str], clips: int, repeats: int) -> list[dict]:
    """ms per clip the iterating thread spends in the DALI source callback, streams made in it or by the worker."""
    from timesformer_harness.pipelines import dali
    from timesformer_harness.pipelines.packets import PacketIndexCache

    indexes = PacketIndexCache()
    plans = train_plans(paths, clips, indexes.get)
    plans = plans[:len(plans) - len(plans) % BATCH]
    spent: dict[int, list[float]] = {0: [], 2: []}
    for r in range(repeats + 1):
        for prefetch in spent:
            source = dali.PlanSource(BATCH, indexes=indexes, prefetch=prefetch)
            timed = Timed(source)
            pipe = dali.build_video_pipeline(timed, batch_size=BATCH, crop=224, mean=[0.45] * 3, std=[0.225] * 3,
                                             num_threads=2)
            pipe.build()
            source.start(plans)
            for _ in range(len(plans) // BATCH):
                pipe.run()
                time.sleep(0.02)  # the training step: the worker makes the next batches meanwhile
            source.close()
            del pipe
            if r:
                spent[prefetch].append(1e3 * timed.seconds / len(plans))
    return [{"codec": "vp9", "prefetch": k, "callback_ms_per_clip": statistics.median(v),
             "spread": [min(v), max(v)], "clips": len(plans)} for k, v in spent.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.benchmarks.bench_clip_streams",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--old", default="HEAD", help="git revision of the old pipelines/packets.py")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--clips", type=int, default=96, help="clips per codec per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", default=str(REPO_ROOT / "runs/bench/clip_streams_data"))
    parser.add_argument("--out", default=str(REPO_ROOT / "runs/bench/clip_streams.json"))
    args = parser.parse_args(argv)
    setup_logging()
    files = prepared(Path(args.data), args.videos)
    old = old_packets(args.old)
    rows = stream_rows(files, args.clips, args.repeats, old)
    callbacks = callback_rows(files["vp9"], args.clips, args.repeats)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                         text=True).stdout.strip()
    result = {"git": sha, "old": args.old, "argv": sys.argv[1:], "streams": rows, "callback": callbacks}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.videos} videos x 10 s, {SHORT}-px short side, GOP {GOP}, {T}x{RATE} train clips; median of "
          f"{args.repeats} repeats (min-max)\n")
    print("| codec | path | stream | CPU ms / clip | wall ms / clip | preads / clip | KB read / clip "
          "| PyAV containers / clip | stream KB | frames decoded / clip |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["cpu_ms_spread"]
        print(f"| {r['codec']} | {r['path']} | {r['stream']} | {r['cpu_ms_per_clip']:.3f} ({lo:.3f}-{hi:.3f}) "
              f"| {r['wall_ms_per_clip']:.3f} | {r['preads_per_clip']:.1f} | {r['bytes_read_per_clip'] / 1e3:.0f} "
              f"| {r['containers_per_clip']:.0f} | {r['stream_bytes_per_clip'] / 1e3:.0f} "
              f"| {r['decoded_frames_per_clip']:.1f} |")
    print("\n| DALI CPU pipeline, VP9 | ms per clip in the source callback (iterating thread) |")
    print("|---|---|")
    for r in callbacks:
        lo, hi = r["spread"]
        what = "streams made in the callback (old)" if r["prefetch"] == 0 else "made by the worker, 2 batches ahead"
        print(f"| {what} | {r['callback_ms_per_clip']:.3f} ({lo:.3f}-{hi:.3f}) |")
    print(f"\nwritten {args.out}; git {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
