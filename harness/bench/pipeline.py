"""The pipeline suite: clips/s of the DALI and the PyAV loader on the experiment's data (the toy set by default),
the frames each decodes per delivered clip, and the loader shoot-out.

The shoot-out runs our DALI loader (full graph, and decode-only), the PyAV loader, and, when they import,
torchcodec (``VideoDecoder.get_frames_at``) and decord (``VideoReader.get_batch``) as decode-only anchors, on the
same clips, interleaved round by round (A B C A B C ...: load from other processes hits every row alike), each row
in a process of its own as a training process holds one loader (another decoder's threads and allocations in the same
process fragment the heap, so a row's batches land on fresh pages). Each row: median clips/s over the rounds, CPU
ms per clip (the row's process and its
workers: steadier than the wall clock on a shared machine), its process's peak RSS growth, frames decoded per clip (counted
where the decoder can be followed, else the model's estimate, marked ``model``) and the file variant.
``benchmarks/bench_prepare.py`` runs it over prepared variants of the same videos.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from timesformer_harness.bench.case import BenchCase, SkipCase
from timesformer_harness.bench.record import BenchRecord, fill_throughput
from timesformer_harness.config import REPO_ROOT, RootConfig, load_config
from timesformer_harness.metrics import PeakMemory, timed_call, timed_items
from timesformer_harness.pipelines.base import take_batches
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.loaders import LOADERS
from timesformer_harness.pipelines.quarantine import failure_reason

SHOOTOUT = "shootout"  # the case of every loader on the same clips
WARMUP_BATCHES = 2
SHOOTOUT_ROUNDS = 3
COUNTED_CLIPS = 16  # clips whose decoded frames are counted per row
CPU = torch.device("cpu")  # a row's epoch synchronises its own device work: nothing to wait for after it


def data_config_path(cfg: RootConfig) -> str:
    """``bench.data_config`` as an absolute path: a relative one is read from the current folder, else from the
    harness's own folder (its shipped configs). ValueError naming the key when neither has it."""
    path = Path(cfg.bench.data_config)
    for candidate in [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]:
        if candidate.is_file():
            return str(candidate)
    raise ValueError(f"bench.data_config={cfg.bench.data_config}: no such file (a relative path is read from the "
                     f"current folder, {Path.cwd()}, then from {REPO_ROOT}); name the YAML whose data section the "
                     "pipeline and e2e suites read")


DATA_PATH_KEYS = ("root", "train_manifest", "val_manifest", "test_manifest", "ssv2_labels", "path_prefix")


def data_paths(data: DataConfig) -> dict[str, str]:
    """The path settings of ``data`` (``data.root``, the manifests ...) made absolute as a run started here reads
    them: from the current folder (a case runs in the harness's folder), or the harness's own (its toy set,
    ``data/toy``) where the current folder has no such path."""
    out = {}
    for key in DATA_PATH_KEYS:
        value = getattr(data, key)
        if value and not os.path.isabs(value):
            here = Path.cwd() / value
            out[key] = str(here if here.exists() or not (REPO_ROOT / value).exists() else REPO_ROOT / value)
    return out


@dataclass(kw_only=True)
class Case(BenchCase):
    """One loader's clips/s on the train split of ``data_config`` (``loader="shootout"``: every loader on the same
    clips). ``batches`` are timed after ``WARMUP_BATCHES``; the batch size is the data config's."""

    suite: ClassVar[str] = "pipeline"
    loader: str  # a registered backend that decodes files (pipelines.loaders), or "shootout"
    data_config: str  # YAML whose data section is used
    data_paths: dict[str, str] = field(default_factory=dict)  # its path settings made absolute (``data_paths``)
    batches: int

    @property
    def name(self) -> str:
        return f"pipeline/{self.loader}"

    def record(self, device: torch.device) -> BenchRecord:
        rec = super().record(device)
        rec.loader = self.loader
        return rec


def cases(cfg: RootConfig, base: dict[str, Any], attns: list[str], modes: list[str],
          device: torch.device) -> list[Case]:
    """One case per registered backend that decodes files (its own process: its own peak memory), then the
    shoot-out of all of them."""
    names = [name for name, b in LOADERS.items() if b.decodes] + [SHOOTOUT]
    path = data_config_path(cfg)
    paths = data_paths(load_config(path).data)
    return [Case.of(base, loader=name, data_config=path, data_paths=paths, batches=cfg.bench.pipeline_batches)
            for name in names]


def load_data_config(case: Case) -> DataConfig:
    """The data section of the case's config. Raises SkipCase when its videos are not here."""
    data = replace(load_config(case.data_config).data, **case.data_paths)
    root = Path(data.root)
    if not root.exists():
        toy = root == REPO_ROOT / "data" / "toy"
        raise SkipCase(f"no data at {root}: " + ("run `make data` (python -m timesformer_harness.pipelines.tools.toy "
                                                 "--out data/toy)" if toy else f"set data.root in {case.data_config}"))
    return data


def build_train_loader(case: Any, device: torch.device, loader: str) -> tuple[Any, DataConfig]:
    """The train loader of the case's data config with ``data.loader = loader`` (the experiment's own batch size
    and crop), and that data config. Raises SkipCase when the data or the loader's packages are not here."""
    data = replace(load_data_config(case), loader=loader)
    try:
        from timesformer_harness.pipelines.factory import build_loader

        return build_loader(data, "train", device=device), data
    except ImportError as e:
        raise SkipCase(f"the {loader} loader cannot be built here: {e}") from e


def peak_memory_note(device: torch.device, loader: Any) -> str:
    """What a pipeline record's peak memory covers, and what the loader keeps outside it (``pipelines.loaders``)."""
    what = "torch's CUDA allocator peak" if device.type == "cuda" else "RSS growth of the bench process"
    outside = LOADERS[loader.kind].outside(device.type, loader.backend)
    return f"{what}; outside it: {outside}" if outside else f"{what}, the {loader.kind} loader's buffers included"


def run(case: Case, rec: BenchRecord, device: torch.device, dtype: torch.dtype | None) -> None:
    """Clips/s of one loader over ``case.batches`` timed batches after ``WARMUP_BATCHES`` (epochs restart as
    needed); the time of a batch is from asking for it to having it (on the device, synchronised). The shoot-out
    case runs ``run_shootout`` on the first ``case.batches`` batches' videos instead."""
    if case.loader == "shootout":
        return run_shootout_case(case, rec, device)
    memory = PeakMemory(device, release_freed=True)
    loader, data = build_train_loader(case, device, case.loader)
    rec.frames, rec.img_size, rec.batch = data.num_frames, data.train_crop_size, data.batch_size
    timed = [(batch.video.size(0), seconds) for batch, seconds in  # the batches themselves are not kept
             timed_items(take_batches(loader, WARMUP_BATCHES + case.batches), device)][WARMUP_BATCHES:]
    peak = memory.take()
    if peak is not None:
        rec.peak_mem_bytes, rec.peak_mem_kind = peak.growth, peak.kind
    rec.extra["peak_mem_covers"] = peak_memory_note(device, loader)
    fill_throughput(rec, [seconds for _, seconds in timed], clips_per_step=rec.batch, frames=rec.frames,
                    clips=sum(clips for clips, _ in timed))
    rec.extra["rejected"] = len(getattr(loader, "rejected", []))
    rec.extra["decoded_frames"] = decoded_frames_per_clip(loader)


def decoded_frames_per_clip(loader: Any, max_clips: int = COUNTED_CLIPS) -> dict:
    """Frames decoded per delivered clip for the loader's first ``max_clips`` clips of epoch 0, counted
    (``loader.decoded_frames``), beside the decode-cost model its backend follows and DALI's ``seek`` rule
    (``timesformer_harness.pipelines.tools.decode_cost``)."""
    plans = loader.planner.plans(0)[:max_clips]
    strategy = LOADERS[loader.kind].decode_cost
    return {"strategy": strategy, "clips": len(plans), "delivered_frames": float(np.mean([len(p.frames) for p in plans])),
            "counted_per_clip": float(np.mean(loader.decoded_frames(plans))),
            "model_per_clip": modelled_per_clip(plans, loader.indexes, strategy),
            "seek_model_per_clip": modelled_per_clip(plans, loader.indexes, "seek")}


def modelled_per_clip(plans: list, indexes: Any, strategy: str) -> float:
    """Frames decoded per clip of ``plans`` by ``timesformer_harness.pipelines.tools.decode_cost``'s ``strategy``, from
    each file's keyframes (``indexes``: a ``PacketIndexCache``)."""
    from timesformer_harness.pipelines.tools.decode_cost import decoded_frames

    per_clip = []
    for p in plans:
        index = indexes.get(p.path)
        per_clip.append(decoded_frames(p.frames, index.keyframes, index.num_frames, strategy))
    return float(np.mean(per_clip))


# ---------------------------------------------------------------------------------------------- the shoot-out

@dataclass
class Contender:
    """One shoot-out row: ``epoch()`` delivers the round's clips and returns how many; ``decoded()`` returns frames
    decoded per clip and how they were obtained (``counted`` or ``model: ...``). ``recipe`` (the arguments of
    ``shootout_contenders`` and the row's position) lets ``run_shootout`` rebuild the row in a process of its own;
    a row without one runs in the calling process."""

    name: str
    variant: str
    graph: str  # full (crop, resize, normalise: what the model gets) | decode (uint8 frames)
    threads: str
    epoch: Callable[[], int] | None = None
    decoded: Callable[[], tuple[float, str]] | None = None
    unavailable: str = ""  # why the row could not run (the shoot-out goes on)
    anchor: bool = False  # an outside decoder (torchcodec, decord): one that fails on these files is reported, not fatal
    recipe: tuple[dict[str, Any], int] | None = None


def _loader_epoch(*loaders: Any) -> Callable[[], int]:
    """An epoch of ``loaders`` (several: one per shard, consumed in turn as one training process would with a
    pipeline each), every round the same clips (epoch 0: the ones counted)."""
    def epoch() -> int:
        for lo in loaders:
            lo.set_epoch(0)
        n = sum(b.video.shape[0] for batches in zip_longest(*loaders) for b in batches if b is not None)
        if loaders[0].device.type == "cuda":  # the last batch's GPU work (NVDEC, resize, copy) is part of the epoch
            torch.cuda.synchronize(loaders[0].device)
        return n
    return epoch


def _anchor_epoch(plans: list, decode: Callable[[str, list[int]], Any], threads: int) -> Callable[[], int]:
    clips = [(p.path, [int(i) for i in p.frames]) for p in plans]

    def epoch() -> int:
        if threads <= 1:
            for path, frames in clips:
                decode(path, frames)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda c: decode(*c), clips))
        return len(clips)
    return epoch


def torchcodec_decoder() -> tuple[Callable[[str, list[int]], Any] | None, str]:
    """torchcodec's ``get_frames_at`` on a decoder opened per clip (one FFmpeg thread), or why it cannot run."""
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as e:  # noqa: BLE001 - the wheel raises OSError/RuntimeError for missing CUDA/FFmpeg libraries
        return None, f"not importable: {failure_reason(e, 200)}"

    def decode(path: str, frames: list[int]) -> Any:
        return VideoDecoder(path, device="cpu", seek_mode="approximate", dimension_order="NHWC",
                            num_ffmpeg_threads=1).get_frames_at(frames).data
    return decode, ""


def decord_decoder() -> tuple[Callable[[str, list[int]], Any] | None, str]:
    """decord's ``get_batch`` on a ``VideoReader`` cached per file and thread (one decoder thread), or why not."""
    try:
        import decord
    except Exception as e:  # noqa: BLE001
        return None, f"not importable: {failure_reason(e, 200)}"
    local = threading.local()

    def decode(path: str, frames: list[int]) -> Any:
        readers = local.__dict__.setdefault("readers", {})
        if path not in readers:
            readers[path] = decord.VideoReader(path, num_threads=1)
        return readers[path].get_batch(frames).asnumpy()
    return decode, ""


def shootout_contenders(cfg: DataConfig, variant: str, anchor_threads: int = 1, scaling: bool = False,
                        whole_file: bool = False, max_counted: int = COUNTED_CLIPS,
                        device: torch.device | str = "cpu") -> list[Contender]:
    """The shoot-out rows for the train clips of ``cfg``: DALI full graph and decode-only, the PyAV loader
    (``cfg.num_workers`` workers), torchcodec and decord (``anchor_threads`` threads each). ``whole_file`` adds the
    DALI loader fed whole files (decoded from frame 0: the baseline of the clip streams); ``scaling`` adds the
    DALI full graph with 1 thread, and with 2 pipelines of 1 thread (ranks 0 and 1 of 2: other random clips of the
    same videos). On a CUDA ``device`` the DALI rows decode where ``data.backend=auto`` puts them (NVDEC when it
    takes every video) and deliver their clips on the GPU; the other rows stay CPU decoders."""
    from timesformer_harness.pipelines.factory import build_loader
    from timesformer_harness.pipelines.dali import DaliLoader
    from timesformer_harness.pipelines.packets import ANNEXB_CODECS, IVF_FOURCC, PacketIndexCache

    device = torch.device(device)
    dali_cfg = replace(cfg, loader="dali", backend="cpu" if device.type == "cpu" else "auto")
    dali = build_loader(dali_cfg, "train", device=device)
    decode_only = DaliLoader(dali.planner, device, backend=dali.backend, decode_only=True,
                             jpeg_frames=dali.jpeg_frames)
    pyav = build_loader(replace(cfg, loader="pyav"), "train", device="cpu")
    plans = dali.planner.plans(0)
    counted = plans[:max_counted]

    def counted_by(loader: Any) -> Callable[[], tuple[float, str]]:
        return lambda: (float(np.mean(loader.decoded_frames(counted))), "counted")

    def keyframe_model() -> tuple[float, str]:
        return modelled_per_clip(counted, dali.indexes, "keyframe"), "model: keyframe"

    threads = f"{cfg.num_workers} threads" + (", NVDEC" if dali.backend == "gpu" else "")
    rows = [Contender("DALI loader", variant, "full", threads, _loader_epoch(dali), counted_by(dali)),
            Contender("DALI loader", variant, "decode", threads, _loader_epoch(decode_only),
                      counted_by(decode_only)),
            Contender("PyAV loader", variant, "full", f"{cfg.num_workers} workers", _loader_epoch(pyav),
                      counted_by(pyav))]
    for name, make in (("torchcodec", torchcodec_decoder), ("decord", decord_decoder)):
        decode, why = make()
        label = f"{anchor_threads} thread{'s' if anchor_threads > 1 else ''}"
        rows.append(Contender(name, variant, "decode", label, _anchor_epoch(plans, decode, anchor_threads)
                              if decode else None, keyframe_model, why, anchor=True))
    if whole_file:
        codec = dali.indexes.get(plans[0].path).codec
        if codec in IVF_FOURCC and codec not in ANNEXB_CODECS:  # an index without payload offsets: whole files
            whole = DaliLoader(dali.planner, device, backend=dali.backend, indexes=PacketIndexCache(offsets=False))
            rows.insert(2, Contender("DALI loader, whole file", variant, "full", threads, _loader_epoch(whole),
                                     counted_by(whole)))
        else:
            rows.insert(2, Contender("DALI loader, whole file", variant, "full", threads,
                                     unavailable=f"{codec} clips without payload offsets are remuxed by PyAV: no "
                                                 f"whole-file feed to compare"))
    if scaling:
        one = build_loader(replace(dali_cfg, num_workers=1), "train", device=device)
        rows.append(Contender("DALI loader", variant, "full", "1 thread", _loader_epoch(one), counted_by(one)))
        shards = [build_loader(replace(dali_cfg, num_workers=1), "train", device=device, rank=r, world_size=2)
                  for r in range(2)]
        rows.append(Contender("DALI loader", variant, "full", "2 pipelines x 1 thread", _loader_epoch(*shards),
                              counted_by(shards[0])))
    recipe = dict(cfg=cfg, variant=variant, anchor_threads=anchor_threads, scaling=scaling, whole_file=whole_file,
                  max_counted=max_counted, device=str(device))
    for position, row in enumerate(rows):
        row.recipe = (recipe, position)
    return rows


@dataclass
class ShootoutRow:
    name: str
    variant: str
    graph: str
    threads: str
    clips_per_s: float | None = None  # median over the rounds
    rounds: list[float] = field(default_factory=list)
    cpu_ms_per_clip: float | None = None  # median over the rounds
    decoded_per_clip: float | None = None
    decoded_how: str = ""
    note: str = ""
    # peak RSS growth of the row's own process over its start, torch and the harness imported (None: in the caller's)
    peak_rss_growth_mib: float | None = None


class RowFailed(RuntimeError):
    """A shoot-out row's epoch raised in its own process; the message is the failure's reason."""


class _InProcess:
    """A row run in the calling process (a contender without a recipe)."""

    def __init__(self, epoch: Callable[[], int]):
        self.run = epoch

    def epoch(self) -> tuple[int, float, float, int | None]:
        return *timed_call(self.run, CPU), None

    def close(self) -> None:
        pass


class _RowProcess:
    """A row rebuilt from its recipe in a spawned process of its own, run there one epoch per call."""

    def __init__(self, recipe: tuple[dict[str, Any], int], threads: int):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_row_process_main, args=(child, recipe, threads), name="shootout-row")
        self.proc.start()
        child.close()

    def epoch(self) -> tuple[int, float, float, int | None]:
        """(clips, seconds, CPU seconds of the process and its workers, its peak RSS bytes) of one epoch."""
        self.conn.send("epoch")
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(timeout=10)
            raise RowFailed(f"the row's process died (exit code {self.proc.exitcode})") from None
        if status != "ok":
            raise RowFailed(value)
        return value

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.terminate()
        self.conn.close()


def _row_process_main(conn: Any, recipe: tuple[dict[str, Any], int], threads: int) -> None:
    from timesformer_harness.runtime import retain_freed_memory

    torch.set_num_threads(threads)
    retain_freed_memory()
    memory = PeakMemory("cpu")  # one window from here: the row's build and all its epochs
    kwargs, position = recipe
    row, why = None, ""
    try:
        row = shootout_contenders(**kwargs)[position]
    except Exception as e:  # noqa: BLE001 - reported to the parent at the first epoch
        why = f"could not build the row: {failure_reason(e, 200)}"
    try:
        while conn.recv() == "epoch":
            if row is None:
                conn.send(("error", why))
                continue
            try:
                peak = memory.so_far()
                conn.send(("ok", (*timed_call(row.epoch, CPU), peak and peak.growth)))
            except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
                conn.send(("error", failure_reason(e, 200)))
    finally:
        conn.close()


def run_shootout(contenders: list[Contender], rounds: int = SHOOTOUT_ROUNDS) -> list[ShootoutRow]:
    """One warm-up round, then ``rounds`` interleaved rounds of every runnable contender; medians per row. A row
    with a recipe runs in a spawned process of its own (with this process's torch threads), the others here."""
    runners: dict[int, _InProcess | _RowProcess] = {}
    measured: dict[int, list[tuple[int, float, float, int | None]]] = {}
    try:
        for c in contenders:  # warm-up: pipeline build, worker start, page cache, packet indexes
            if c.epoch is None:
                continue
            runner = _RowProcess(c.recipe, torch.get_num_threads()) if c.recipe else _InProcess(c.epoch)
            runners[id(c)] = runner
            try:
                runner.epoch()
            except Exception as e:  # noqa: BLE001 - an outside decoder's failure is its row's verdict
                if not c.anchor:
                    raise
                reason = str(e) if isinstance(e, RowFailed) else failure_reason(e, 200)
                c.epoch, c.unavailable = None, f"failed on these files: {reason}"
                runners.pop(id(c)).close()
                continue
            measured[id(c)] = []
        live = [c for c in contenders if id(c) in measured]
        for _ in range(rounds):
            for c in live:
                measured[id(c)].append(runners[id(c)].epoch())
    finally:
        for runner in runners.values():
            runner.close()
    rows = []
    for c in contenders:
        row = ShootoutRow(c.name, c.variant, c.graph, c.threads, note=c.unavailable)
        if id(c) in measured:
            rates = [n / dt for n, dt, _, _ in measured[id(c)]]
            row.rounds = [round(r, 2) for r in rates]
            row.clips_per_s = statistics.median(rates)
            row.cpu_ms_per_clip = statistics.median(1e3 * cpu / n for n, _, cpu, _ in measured[id(c)])
            peaks = [peak for _, _, _, peak in measured[id(c)] if peak is not None]
            row.peak_rss_growth_mib = max(peaks) / 2**20 if peaks else None
        if c.decoded is not None:
            row.decoded_per_clip, row.decoded_how = c.decoded()
        rows.append(row)
    return rows


def format_shootout(rows: list[dict] | list[ShootoutRow]) -> str:
    """The shoot-out as a markdown table, with each row's rate relative to decord (decode-only anchor) of the
    same variant and the DALI full graph's rate over its own decode-only rate."""
    rows = [r if isinstance(r, dict) else r.__dict__ for r in rows]

    def rate_of(variant: str, name: str, graph: str) -> float | None:
        return next((r["clips_per_s"] for r in rows if r["variant"] == variant and r["name"] == name
                     and r["graph"] == graph and r["clips_per_s"]), None)

    lines = ["| loader | variant | graph | threads | clips/s (median) | CPU ms / clip | peak RSS growth MiB "
             "| decoded frames / clip | vs decord | full / decode-only | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r["clips_per_s"]
        decord = rate_of(r["variant"], "decord", "decode")
        own_decode = rate_of(r["variant"], r["name"], "decode") if r["graph"] == "full" else None
        decoded = "-" if r["decoded_per_clip"] is None else f"{r['decoded_per_clip']:.1f} ({r['decoded_how']})"
        lines.append("| " + " | ".join([
            r["name"], r["variant"], r["graph"], r["threads"], "-" if rate is None else f"{rate:.1f}",
            "-" if r["cpu_ms_per_clip"] is None else f"{r['cpu_ms_per_clip']:.1f}",
            "-" if r.get("peak_rss_growth_mib") is None else f"{r['peak_rss_growth_mib']:.0f}", decoded,
            f"{rate / decord:.2f}x" if rate and decord else "-",
            f"{rate / own_decode:.2f}" if rate and own_decode and r["threads"] == _decode_threads(rows, r) else "-",
            r["note"].replace("|", "/")]) + " |")
    return "\n".join(lines)


def _decode_threads(rows: list[dict], row: dict) -> str:
    """The threads of the decode-only row the full graph is compared with."""
    return next((r["threads"] for r in rows if r["variant"] == row["variant"] and r["name"] == row["name"]
                 and r["graph"] == "decode"), "")


def shootout_subset(data: DataConfig, clips: int, folder: Path) -> DataConfig:
    """``data`` with its train manifest cut to the first ``clips`` videos (written to ``folder``)."""
    from timesformer_harness.pipelines.manifest import read_manifest

    entries = read_manifest(data, "train")[:clips]
    manifest = folder / "shootout_train.csv"
    manifest.write_text("".join(f"{os.path.abspath(e.path)} {e.label}\n" for e in entries))
    return replace(data, format="kinetics", separator=" ", path_prefix="", train_manifest=str(manifest))


def run_shootout_case(case: Case, rec: BenchRecord, device: torch.device) -> None:
    """The shoot-out on the case's data (CPU loaders): the first ``case.batches`` batches' videos, 3 rounds."""
    import tempfile

    if device.type != "cpu":
        raise SkipCase("the shoot-out compares CPU decoders; the per-loader cases measure the GPU loader")
    data = load_data_config(case)
    with tempfile.TemporaryDirectory() as tmp:
        subset = shootout_subset(data, case.batches * data.batch_size, Path(tmp))
        rows = run_shootout(shootout_contenders(subset, Path(data.root).name), SHOOTOUT_ROUNDS)
    rec.frames, rec.img_size, rec.batch = data.num_frames, data.train_crop_size, data.batch_size
    peaks = [r.peak_rss_growth_mib for r in rows if r.peak_rss_growth_mib is not None]
    rec.peak_mem_bytes, rec.peak_mem_kind = (int(max(peaks) * 2**20), "rss") if peaks else (None, None)
    rec.extra["peak_mem_covers"] = "the largest peak RSS growth of the rows' processes (each row in a fresh process " \
                                   "of its own, from its start with torch imported; PyAV's workers not counted)"
    if rows[0].rounds:  # our DALI loader, full graph: seconds per batch in each round
        fill_throughput(rec, [rec.batch / rate for rate in rows[0].rounds], clips_per_step=rec.batch,
                        frames=rec.frames)
    rec.extra["shootout"] = [r.__dict__ for r in rows]
    rec.extra["rounds"] = SHOOTOUT_ROUNDS
