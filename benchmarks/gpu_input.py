"""``make gpu-input``: the GPU input shoot-out, in one script sized for 8 minutes of one GPU, preparing included.

    python -m timesformer_harness.benchmarks.gpu_input [--out DIR] [--budget-s 480] [--rows NAME ...] [--update-table]
    python -m timesformer_harness.benchmarks.gpu_input --rehearse-on-cpu   # the rows a CPU can run, at CPU size

The files (``GPU_SIZE``): 8 generated 10 s, 30 fps, 340x256 H.264 sources (keyint 250, a camera panning over a detailed
texture; ``benchmarks/bench_prepare.py``), prepared by ``timesformer_harness.pipelines.tools.prepare`` at a 256 px short
side into ``VARIANTS``: H.264 and VP9 with GOP 32 (= the sampling rate) and a long GOP (250), HEVC with GOP 32, and
MJPEG (intra-only), and ``jpeg-folders``: a folder per MJPEG video holding its JPEG images (the same bytes), read as
frame folders. Sources and variants are made in parallel and kept in ``--data`` (prepare is idempotent). Each
variant's train manifest lists every video 16 times (128 clips); 8x32 sampling, crop 224, jitter 256-320, batch 32.

The rows, in the order they run (``ROWS``, most wanted first): the DALI loader with 8 threads on H.264 GOP 32 on NVDEC
(``data.backend=gpu``), on MJPEG with ``data.backend=gpu`` (its JPEG frames decoded by nvJPEG, ``device="mixed"``, and
resized, flipped and normalised on the GPU), on VP9 GOP 32 on NVDEC, and on MJPEG as JPEG images decoded by DALI on the
CPU (``data.backend=cpu``); the end-to-end step on H.264 GOP 32 (``data.backend=auto``: what a run gets); NVDEC through
PyNvVideoCodec on H.264 GOP 32, a decoder session per thread kept across clips (``benchmarks.session_decode``: the
loaders' clips and transform; a candidate, not a loader; skipped where the package is not installed); the end-to-end
step on MJPEG; the JPEG frame folders on nvJPEG; the DALI loader on NVDEC on the long GOPs and on HEVC GOP 32
(Matroska clip streams); DALI with 16 threads on H.264 GOP 32; the PyAV loader (16 workers) on H.264 GOP 32; DALI's
CPU decoder on VP9 GOP 32 (the candidate against NVDEC); the end-to-end step on VP9 GOP 32, and compiled on H.264
GOP 32 (the rate the data-wait target is set for; past the default budget); PyAV on VP9 GOP 32; the frame folders on
DALI's CPU decoder. Each
loader row decodes on a named path, so that the decode table (``timesformer_harness.pipelines.decode_rates``) gets every
candidate ``data.backend=auto`` chooses between: with ``--update-table [PATH]`` every loader row that ran on a GPU is
merged into it (default: the shipped ``configs/measured/decode_rates.yaml``) as it finishes (not the frame folders'
rows: the table is per file codec). A loader row builds the loader in a fresh process (``loader_row``), runs one warm-up
epoch (its time includes indexing the files), then 3 timed epochs: median clips/s and host CPU ms per clip (the process
and its workers) over each whole epoch, its start included (the headline, and what the targets are judged on: the
epochs are short, and a loader whose workers and prefetch hold the whole epoch makes it while the first batch is
awaited, so the steady part, ``time_epoch``'s from its first batch to its last, also reported, times only the
delivery), then one epoch under
``torch.profiler`` for the GPU's busy ms per clip (``timesformer_harness.metrics.kernel_time``: the kernels and copies
CUPTI sees in that process; NVDEC's decode engine runs no kernels), and the frames decoded per clip, counted on 16
clips. An end-to-end row is the bench's e2e case (``timesformer_harness.bench.e2e``): TimeSformer-Base divided 8x224 in
bf16, eager or compiled, fed by the ``auto`` loader of the variant; its data wait is the share of each step spent
waiting for the batch. A row whose estimated cost no longer fits ``--budget-s`` (counted from the start, preparing
included) is skipped and says so; ``<out>/results.json`` and ``<out>/summary.md`` (the tables, the targets judged on a
GPU only) are rewritten after every row, so a run cut short keeps what it measured.

With ``--rehearse-on-cpu`` the same rows run at CPU size (48 px files, crop 32, batch 4, the tiny model): DALI's CPU
decoder on VP9, MJPEG and the frame folders, PyAV on VP9 and H.264 GOP 32 (so the H.264 files are made and read before
a GPU session does); every other H.264 and HEVC row and the nvJPEG rows are skipped (DALI's CPU decoder does not
decode them; nvJPEG needs a GPU), and so is the CPU-decoder
VP9 row (on a CPU the VP9 row decodes there already). Its rows go to a table only at a path given (``--update-table
PATH``), with the generation ``cpu``: the shipped table holds GPU measurements only."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from timesformer_harness.bench.pipeline import WARMUP_BATCHES
from timesformer_harness.common import atomic_write_text
from timesformer_harness.config import REPO_ROOT
from timesformer_harness.gpu_perf import (fmt_cell, record_row, row_timeout, run_conditions, script_end, script_parser,
                                          script_start)
from timesformer_harness.metrics import Stopwatch, run_stamp
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.decode_rates import CPU_GENERATION, TABLE, RateRow, merge_rates
from timesformer_harness.pipelines.dali import jpeg_libraries_missing
from timesformer_harness.pipelines.tools.transcode import PrepareSpec

logger = logging.getLogger(__name__)

T, RATE = 8, 32  # the Kinetics recipe's sampling: 8 frames, one every 32 (a 256-frame span)


@dataclass(frozen=True)
class Size:
    """The files and the clips at one scale: the GPU's (the issue's) or the CPU rehearsal's."""

    height: int  # of the generated sources (their short side: prepare keeps it)
    width: int
    jitter: tuple[int, int]
    crop: int
    batch: int
    videos: int
    repeat: int
    rounds: int
    threads: int
    e2e_batches: int  # timed end-to-end steps (after the e2e suite's 2 warm-up ones)

    @property
    def e2e_repeat(self) -> int:
        """Each video's repeats in the end-to-end rows' manifest: their steps within one epoch (a pipeline restart
        at an epoch's end, once per thousands of steps in a real epoch, would count as data wait)."""
        return math.ceil((WARMUP_BATCHES + self.e2e_batches) * self.batch / self.videos)


GPU_SIZE = Size(height=256, width=340, jitter=(256, 320), crop=224, batch=32, videos=8, repeat=32, rounds=3,
                threads=8, e2e_batches=12)
CPU_SIZE = Size(height=48, width=64, jitter=(40, 48), crop=32, batch=4, videos=2, repeat=8, rounds=2, threads=2,
                e2e_batches=3)

# name -> what prepare makes of the sources (the short side is the size's height)
VARIANTS = {"h264-gop32": ("h264", RATE), "vp9-gop32": ("vp9", RATE), "mjpeg": ("mjpeg", 1),
            "h264-long": ("h264", 250), "vp9-long": ("vp9", 250), "hevc-gop32": ("hevc", RATE),
            "jpeg-folders": ("mjpeg", 1)}
# variants made from another's files instead of by prepare: per MJPEG video, a folder of its JPEG images (same bytes)
FOLDER_VARIANTS = {"jpeg-folders": "mjpeg"}
GPU_ONLY_CODECS = {"h264": "H.264", "hevc": "HEVC"}  # DALI's CPU decoder takes VP8/VP9/MJPEG only


@dataclass(frozen=True)
class Row:
    """One measurement: a loader on a variant (``kind`` dali | pyav), PyNvVideoCodec's decoders kept across clips
    (``kind`` pynvc: ``benchmarks.session_decode``) or the end-to-end step (``kind`` e2e)."""

    name: str
    kind: str
    variant: str
    thread_factor: int = 1  # x the size's threads (DALI threads, PyAV workers)
    backend: str = "auto"  # data.backend on a GPU (the rehearsal decodes on the CPU)
    rehearsed: bool = True  # False: the CPU rehearsal skips it (on a CPU it would repeat another row)
    compile: str = "none"  # an e2e row's step: eager, or torch.compile's mode (the model's own rate on a GPU)
    # what the row costs on a GPU, process start and warm-up included (the budget's unit; guessed from the 2026-11-26
    # NVDEC shoot-out's rates until a run of this script measures them)
    estimate_s: float = 30.0


# Making the sources and the variants the rows need, on a 16-core GPU host (the estimates' unit; a guess from the
# 2-core CPU's 141 s for five variants until a run of this script measures it: the meta's "prepare")
PREPARE_ESTIMATE_S = 60.0

# Most wanted first: the rows the targets judge and the candidates for the fastest path, then the long GOPs, HEVC (its
# Matroska clip streams), more threads and the PyAV baseline. A row that does not fit the budget is skipped, not cut.
ROWS: tuple[Row, ...] = (
    Row("dali-h264-gop32", "dali", "h264-gop32", backend="gpu"),
    Row("dali-mjpeg-nvjpeg", "dali", "mjpeg", backend="gpu"),
    Row("dali-vp9-gop32", "dali", "vp9-gop32", backend="gpu"),
    Row("dali-mjpeg", "dali", "mjpeg", backend="cpu"),
    Row("e2e-h264-gop32", "e2e", "h264-gop32", estimate_s=60.0),
    # NVDEC with a decoder session kept across clips (PyNvVideoCodec), the candidate against DALI's per-clip streams
    Row("pynvc-h264-gop32", "pynvc", "h264-gop32", estimate_s=40.0),
    Row("e2e-mjpeg", "e2e", "mjpeg", estimate_s=60.0),
    Row("dali-folders-nvjpeg", "dali", "jpeg-folders", backend="gpu"),
    Row("dali-h264-long", "dali", "h264-long", backend="gpu", estimate_s=40.0),
    Row("dali-vp9-long", "dali", "vp9-long", backend="gpu", estimate_s=40.0),
    Row("dali-hevc-gop32", "dali", "hevc-gop32", backend="gpu", estimate_s=40.0),
    Row("dali-h264-gop32-x2threads", "dali", "h264-gop32", thread_factor=2, backend="gpu"),
    Row("pyav-h264-gop32", "pyav", "h264-gop32", thread_factor=2, estimate_s=40.0),
    Row("dali-cpu-vp9-gop32", "dali", "vp9-gop32", backend="cpu", rehearsed=False, estimate_s=40.0),
    Row("e2e-vp9-gop32", "e2e", "vp9-gop32", estimate_s=60.0),
    # the data wait at the compiled step's rate, what the end-to-end target is set for (the compilation in its warm-up)
    Row("e2e-h264-gop32-compiled", "e2e", "h264-gop32", compile="default", estimate_s=180.0),
    Row("pyav-vp9-gop32", "pyav", "vp9-gop32", thread_factor=2, estimate_s=40.0),
    Row("dali-folders", "dali", "jpeg-folders", backend="cpu"),
)

# The targets for one H100 (<= 16 host cores, 8x224 clips from 256-px-short-side files).
TARGETS = (
    ("loader", "loader >= 400 clips/s on at least one prepared format"),
    ("h264", "loader >= 200 clips/s on unprepared H.264 GOP 32"),
    ("host", "host CPU <= 2.5 ms per clip (the fastest loader row)"),
    ("e2e", "end-to-end data wait < 10% (the lowest e2e row at the compiled step's rate; eager's without one)"),
)


def data_config(size: Size, root: Path, manifest: Path, threads: int) -> DataConfig:
    """The variant's train data at ``size`` (``data.loader=auto``): 8x32 sampling, the size's jitter, crop and batch."""
    return DataConfig(loader="auto", root=str(root), train_manifest=str(manifest), num_frames=T, sampling_rate=RATE,
                      target_fps=30, train_jitter_scales=list(size.jitter), train_crop_size=size.crop,
                      test_crop_size=size.crop, batch_size=size.batch, num_workers=threads, validate_cache="none",
                      pad_short=False)


def prepare_variants(data: Path, size: Size, names: list[str]) -> tuple[dict[str, Path | str], dict[str, Any]]:
    """The sources and the variants ``names`` at ``size``, made in parallel (existing ones kept; a folder variant
    after the variant it is made from): each variant's train manifest (every video once), or why it could not be
    made (a string: that variant's rows fail with it, the others run), and what preparing cost."""
    from timesformer_harness.benchmarks.bench_prepare import make_sources
    from timesformer_harness.pipelines.tools.prepare import prepare

    cores = os.cpu_count() or 1
    clock = Stopwatch()
    manifest = make_sources(data / f"source_{size.height}p", size.videos, size.height, size.width, workers=cores)
    sources_s = clock.lap()

    def one(name: str) -> tuple[str, Path | str]:
        codec, gop = VARIANTS[name]
        out = data / f"{name}_{size.height}p"
        try:
            report = prepare(manifest, out, PrepareSpec(codec, size.height, gop), workers=max(1, cores // len(names)),
                             progress=False)
        except Exception as e:  # noqa: BLE001 - one variant's failure is its rows' result, not the run's end
            return name, f"prepare {name} failed: {type(e).__name__}: {e}"[:600]
        return name, f"prepare {name}: {report.summary()}" if report.failed else out / manifest.name

    encoded = list(dict.fromkeys(FOLDER_VARIANTS.get(name, name) for name in names))
    with ThreadPoolExecutor(max(1, len(encoded))) as pool:
        manifests = dict(pool.map(one, encoded))
    for name in names:
        if name in FOLDER_VARIANTS:
            made = manifests[FOLDER_VARIANTS[name]]
            manifests[name] = made if isinstance(made, str) else folder_variant(made, data / f"{name}_{size.height}p")
    costs = {"sources_s": round(sources_s, 1), "variants_s": round(clock.lap(), 1), "cores": cores}
    return {name: manifests[name] for name in names}, costs


def folder_variant(videos: Path, out: Path) -> Path:
    """Per MJPEG video of the manifest ``videos``, a folder of its JPEG images (the same bytes) under ``out``, and
    their manifest (``out / videos.name``)."""
    from timesformer_harness.pipelines.tools.encode import mjpeg_frame_folder

    lines = []
    for line in videos.read_text().splitlines():
        video, label = line.rsplit(" ", 1)
        if not (out / Path(video).stem).is_dir():
            mjpeg_frame_folder(videos.parent / video, out / f".{Path(video).stem}.tmp").rename(out / Path(video).stem)
        lines.append(f"{Path(video).stem} {label}\n")
    (out / videos.name).write_text("".join(lines))
    return out / videos.name


@dataclass
class EpochTiming:
    """One loader epoch: its clips, wall and CPU seconds in all, and the steady part's (from the first batch's
    arrival to the last's: the pipeline's start and first fill left out, as a long epoch would dilute them)."""

    clips: int
    seconds: float
    cpu_seconds: float
    steady_clips: int
    steady_seconds: float
    steady_cpu_seconds: float


def time_epoch(loader: Any, device: torch.device) -> EpochTiming:
    """Epoch 0 of ``loader`` (every round the same clips), timed; at each mark torch's stream is synchronised (the
    batch delivered), not the device (DALI's streams decoding the batches after it)."""
    from timesformer_harness.metrics import cpu_seconds, synchronize_stream

    loader.set_epoch(0)
    c0, t0 = cpu_seconds(), time.perf_counter()
    clips, first = 0, None
    for batch in loader:
        clips += int(batch.video.shape[0])
        if first is None:
            synchronize_stream(device)
            first = (clips, time.perf_counter(), cpu_seconds())
    synchronize_stream(device)
    t1, c1 = time.perf_counter(), cpu_seconds()
    assert first is not None, "the loader delivered no batch"
    return EpochTiming(clips, t1 - t0, c1 - c0, clips - first[0], t1 - first[1], c1 - first[2])


def loader_row(payload: dict[str, Any]) -> dict[str, Any]:
    """One loader row, in the fresh process ``run_in_fresh_process`` starts: build the loader, a warm-up epoch,
    ``rounds`` timed epochs, one profiled epoch on a GPU, the frames decoded per clip. Returns the row's figures:
    clips/s and host CPU ms per clip of the whole epochs (medians), and of their steady parts.

    torch keeps its default threads, as in training: the CPU decode path finishes clips with torch ops."""
    from timesformer_harness.bench.pipeline import decoded_frames_per_clip
    from timesformer_harness.metrics import rss_high_water_bytes
    from timesformer_harness.pipelines.factory import build_loader
    from timesformer_harness.runtime import retain_freed_memory

    retain_freed_memory()
    device = torch.device(payload["device"])
    loader = build_loader(DataConfig(**payload["data"]), "train", device=device)
    row = timed_epochs(loader, device, payload["rounds"])
    decoded = decoded_frames_per_clip(loader)
    return {**row, "loader": loader.kind, "decode": loader.backend,
            "jpeg_frames": bool(getattr(loader, "jpeg_frames", False)),
            "decoded_per_clip": decoded["counted_per_clip"], "decoded_model_per_clip": decoded["model_per_clip"],
            "decoded_clips": decoded["clips"], "delivered_frames": decoded["delivered_frames"],
            "peak_rss_mb": rss_high_water_bytes() / 2**20}


def session_row(payload: dict[str, Any]) -> dict[str, Any]:
    """The PyNvVideoCodec row (``benchmarks.session_decode``), in a fresh process: the clips the loaders plan for the
    variant, decoded by a ``SimpleDecoder`` per thread kept across clips, timed as ``loader_row`` times a loader
    (NVDEC's own decoded-frame count is not visible: none reported)."""
    from timesformer_harness.benchmarks.session_decode import SessionDecodedClips
    from timesformer_harness.metrics import rss_high_water_bytes
    from timesformer_harness.pipelines.factory import build_loader
    from timesformer_harness.runtime import retain_freed_memory

    retain_freed_memory()
    device = torch.device(payload["device"])
    cfg = DataConfig(**payload["data"])
    planner = build_loader(replace(cfg, loader="pyav", num_workers=1), "train", device="cpu").planner
    clips = SessionDecodedClips(planner, device, threads=cfg.num_workers)
    try:
        row = timed_epochs(clips, device, payload["rounds"])
    finally:
        clips.close()
    return {**row, "loader": clips.kind, "decode": clips.backend, "sessions": clips.sessions,
            "reconfigured": clips.reconfigured, "peak_rss_mb": rss_high_water_bytes() / 2**20}


def timed_epochs(loader: Any, device: torch.device, rounds: int) -> dict[str, Any]:
    """A warm-up epoch of ``loader``, ``rounds`` timed ones and one profiled on a GPU: clips/s and host CPU ms per
    clip of the whole epochs (medians; the headline) and of their steady parts, the GPU's busy ms per clip."""
    from timesformer_harness.metrics import kernel_time

    first = time_epoch(loader, device)
    timed = [time_epoch(loader, device) for _ in range(rounds)]
    if any(r.steady_clips == 0 for r in timed):
        raise ValueError(f"an epoch of {timed[0].clips} clips is one batch: no steady part to time")
    row: dict[str, Any] = {}
    try:
        kernels = kernel_time(lambda: time_epoch(loader, device), device, steps=1)
    except Exception as e:  # noqa: BLE001 - the timing stands without the profile
        kernels, row["kernel_error"] = None, f"{type(e).__name__}: {e}"[:300]
    clips = timed[0].clips
    return {**row, "torch_threads": torch.get_num_threads(), "clips_per_epoch": clips,
            "first_epoch_s": first.seconds,
            # the headline is the whole epochs' (their start and first fill included): with workers and prefetch
            # deep enough to hold a short epoch, its steady part only times the delivery of batches made meanwhile
            "rounds_clips_per_s": [r.clips / r.seconds for r in timed],
            "clips_per_s": statistics.median(r.clips / r.seconds for r in timed),
            "host_cpu_ms_per_clip": statistics.median(1e3 * r.cpu_seconds / r.clips for r in timed),
            "steady_clips_per_s": statistics.median(r.steady_clips / r.steady_seconds for r in timed),
            "steady_host_cpu_ms_per_clip": statistics.median(1e3 * r.steady_cpu_seconds / r.steady_clips
                                                             for r in timed),
            "gpu_ms_per_clip": None if kernels is None else kernels.ms_per_step / clips,  # busy: overlaps once
            "gpu_ms_summed_per_clip": None if kernels is None else kernels.summed_ms_per_step / clips,
            "gpu_ops_per_clip": None if kernels is None else kernels.ops_per_step / clips}


def skip_reason(row: Row, cuda: bool, dali: bool) -> str | None:
    """Why ``row`` cannot run here (None when it can)."""
    codec = VARIANTS[row.variant][0]
    if not cuda and codec in GPU_ONLY_CODECS and row.kind != "pyav":  # PyAV decodes them on any machine
        return (f"{GPU_ONLY_CODECS[codec]} rows run on a GPU only (DALI's CPU decoder takes VP8/VP9/MJPEG; on a "
                "CPU the PyAV row reads these files)")
    if row.backend == "gpu" and not cuda and codec == "mjpeg":
        return "nvJPEG rows run on a GPU only (data.backend=gpu decodes MJPEG's JPEG frames with nvJPEG)"
    if row.compile != "none" and not cuda:
        return ("compiled end-to-end rows run on a GPU only (on a CPU the eager rows rehearse the same loader and "
                "step; inductor's CPU build of the step is the gpu-perf rehearsal's)")
    if not row.rehearsed and not cuda:
        return "a GPU host's row only: on a CPU it repeats another row (every DALI row decodes on the CPU here)"
    if row.kind == "pynvc" and importlib.util.find_spec("PyNvVideoCodec") is None:
        return "PyNvVideoCodec is not installed here (pip install pynvvideocodec)"
    if row.kind == "dali" and not dali:  # an e2e row runs on the loader auto picks (PyAV without DALI)
        return "DALI is not importable here (nvidia-dali-cuda120): no DALI loader to measure"
    if codec == "mjpeg" and dali and row.kind in ("dali", "e2e"):  # decoded as JPEG images
        return jpeg_libraries_missing(gpu=cuda and row.kind == "dali" and row.backend == "gpu")
    return None


def run_loader(row: Row, cfg: DataConfig, device: torch.device, rounds: int, timeout_s: float) -> dict[str, Any]:
    """``loader_row`` (``session_row`` for PyNvVideoCodec) for ``row`` in a fresh process; its figures, or its status
    and message."""
    from timesformer_harness.runner import run_in_fresh_process

    on = torch.device("cpu") if row.kind == "pyav" else device  # the PyAV loader delivers on the CPU
    loader = "pyav" if row.kind == "pyav" else "dali"
    payload = {"device": str(on), "rounds": rounds,
               "data": asdict(replace(cfg, loader=loader, backend=row.backend if on.type == "cuda" else "cpu"))}
    out = run_in_fresh_process(session_row if row.kind == "pynvc" else loader_row, payload, timeout_s=timeout_s)
    if out.status != "ok":
        return {"status": out.status, "message": out.message + (f"\n{out.traceback[-1500:]}" if out.traceback else "")}
    return {"status": "ok", **out.result}


def run_e2e(row: Row, cfg: DataConfig, out: Path, base: dict[str, Any], model: Any, batches: int,
            timeout_s: float) -> dict[str, Any]:
    """The bench's e2e case on the variant's ``auto`` loader, in a fresh process: clips/s and the data wait."""
    from omegaconf import OmegaConf

    from timesformer_harness.bench.e2e import Case
    from timesformer_harness.bench.sweep import run_case

    path = out / f"{row.name}.yaml"
    atomic_write_text(path, OmegaConf.to_yaml({"data": asdict(cfg)}))
    case = Case.of(base, model=replace(model, num_frames=T, img_size=cfg.train_crop_size), mode="train",
                   frames=T, img_size=cfg.train_crop_size, batch=cfg.batch_size, data_config=str(path),
                   batches=batches, threshold=0.1, compile=row.compile)
    rec = run_case(case, timeout_s=timeout_s)
    x = rec.extra
    return {"status": rec.status, "message": rec.message, "compile": row.compile, "clips_per_s": rec.clips_per_s,
            "loader": x.get("loader"),
            "decode": x.get("decode"), "data_wait_pct": None if x.get("data_wait_share") is None
            else 100 * x["data_wait_share"], "data_wait_ms": x.get("data_wait_ms_median"),
            "compute_ms": x.get("compute_ms_median"), "verdict": x.get("verdict"), "record": rec.to_dict()}


def decode_path(entry: dict[str, Any]) -> str:
    """The decode table's path of a loader row that ran: pyav, nvjpeg (JPEG frames on the GPU), nvdec or dali-cpu."""
    if entry["kind"] == "pyav":
        return "pyav"
    if entry["decode"] == "gpu":
        return "nvjpeg" if entry.get("jpeg_frames") else "nvdec"
    return "dali-cpu"


def table_row(entry: dict[str, Any], meta: dict[str, Any], generation: str, results: Path) -> RateRow:
    """A loader row that ran, in the decode table's schema (``generation``: the GPU's, ``cpu`` without one); figures
    rounded as the summary shows them."""
    codec, gop = VARIANTS[entry["variant"]]
    size = meta["size"]
    env = meta["env"]
    sha = str(env.get("git_sha", "unknown"))[:7] + ("-dirty" if env.get("git_dirty") else "")
    try:
        source = str(results.resolve().relative_to(REPO_ROOT))
    except ValueError:
        source = str(results.resolve())
    started = meta["started"]
    return RateRow(generation=generation, device=meta["hardware"], path=decode_path(entry), codec=codec, gop=gop,
                   short_side=size["height"], clips_per_s=round(entry["clips_per_s"], 1),
                   host_cpu_ms_per_clip=round(entry["host_cpu_ms_per_clip"], 2), threads=entry["threads"],
                   batch=size["batch"], clip=f"{T}x{RATE}, crop {size['crop']}", source=source,
                   date=f"{started[:4]}-{started[4:6]}-{started[6:8]}", git_sha=sha)


def judge(rows: list[dict[str, Any]], on_gpu: bool) -> list[tuple[str, str]]:
    """Each target of ``TARGETS`` and its verdict: met / missed (with the figure and the row), not measured, or not
    judged (off a GPU)."""
    ok = [r for r in rows if r["status"] == "ok"]
    loaders = [r for r in ok if r["kind"] in ("dali", "pyav")]  # what a run can load with (not PyNvVideoCodec's row)
    fastest = max(loaders, key=lambda r: r["clips_per_s"], default=None)
    h264 = max((r for r in loaders if r["variant"] == "h264-gop32"), key=lambda r: r["clips_per_s"], default=None)
    waits = [r for r in ok if r["kind"] == "e2e" and r.get("data_wait_pct") is not None]
    compiled = [r for r in waits if r.get("compile", "none") != "none"]  # the rate the target is set for
    e2e = min(compiled or waits, key=lambda r: r["data_wait_pct"], default=None)
    figures = {"loader": (fastest, "clips_per_s", lambda v: v >= 400.0), "h264": (h264, "clips_per_s",
                                                                              lambda v: v >= 200.0),
               "host": (fastest, "host_cpu_ms_per_clip", lambda v: v <= 2.5),
               "e2e": (e2e, "data_wait_pct", lambda v: v < 10.0)}
    verdicts = []
    for key, what in TARGETS:
        row, figure, meets = figures[key]
        if row is None:
            verdicts.append((what, "not measured"))
            continue
        value = row[figure]
        shown = f"{value:.2f}, {row['row']}"
        if not on_gpu:
            verdicts.append((what, f"not judged on a CPU ({shown})"))
        else:
            verdicts.append((what, f"{'met' if meets(value) else 'missed'} ({shown})"))
    return verdicts


def summary(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown report: the conditions, the loader rows, the end-to-end rows and the targets."""
    s = meta["size"]
    lines = [f"# gpu-input: {meta['hardware']}", "",
             f"{run_conditions(meta)}, DALI {meta['dali']}, {meta['cores']} CPU cores. {s['videos']} generated 10 s 30 fps videos, "
             f"{s['height']} px short side, each {s['repeat']}x per epoch; {T}x{RATE} sampling, crop {s['crop']}, "
             f"jitter {s['jitter'][0]}-{s['jitter'][1]}, batch {s['batch']}. Preparing: sources "
             f"{meta['prepare'].get('sources_s', '-')} s, variants {meta['prepare'].get('variants_s', '-')} s "
             f"(in parallel). Loader rows: a warm-up epoch (indexing included), then the median of {s['rounds']} "
             "epochs; host CPU ms = the row process's and its workers' CPU time per clip; GPU ms = the GPU's busy "
             "time per clip in one profiled epoch (kernels and copies; NVDEC's engine runs none); decoded frames "
             f"counted on the epoch's first 16 clips. Budget {meta['budget_s']:.0f} s, used {meta['wall_s']:.0f} s.",
             "", "| row | variant | loader | decode | threads | status | clips/s | host CPU ms / clip | GPU ms / clip "
             "| decoded frames / clip | first epoch s | peak RSS MiB |", "|---" * 12 + "|"]
    for r in rows:
        if r["kind"] == "e2e":
            continue
        decode = r.get("decode")
        if decode and r.get("jpeg_frames"):
            decode += ", JPEG frames"
        lines.append("| " + " | ".join([
            r["row"], r["variant"], r["kind"], fmt_cell(decode), str(r["threads"]),
            r["status"] + (f": {r['message'][:100]}" if r.get("message") and r["status"] != "ok" else ""),
            fmt_cell(r.get("clips_per_s")), fmt_cell(r.get("host_cpu_ms_per_clip"), ".2f"),
            fmt_cell(r.get("gpu_ms_per_clip"), ".3f"), fmt_cell(r.get("decoded_per_clip")),
            fmt_cell(r.get("first_epoch_s")), fmt_cell(r.get("peak_rss_mb"), ".0f")]) + " |")
    e2e = [r for r in rows if r["kind"] == "e2e"]
    if e2e:
        lines += ["", f"End to end: the bench's e2e case, {meta['model']} train step ({meta['precision']}; eager, or "
                  "compiled in its warm-up steps) fed by the variant's `auto` loader; data wait = the share of each "
                  "step spent waiting for its batch.",
                  "", "| row | variant | step | status | loader (decode) | clips/s | data wait % | wait ms / step | "
                  "step ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in e2e:
        step = r.get("compile", "none")
        lines.append("| " + " | ".join([
            r["row"], r["variant"], "eager" if step == "none" else f"compiled ({step})",
            r["status"] + (f": {r['message'][:100]}" if r.get("message") and r["status"] != "ok" else ""),
            f"{r.get('loader') or '-'} ({r.get('decode') or '-'})", fmt_cell(r.get("clips_per_s")),
            fmt_cell(r.get("data_wait_pct")), fmt_cell(r.get("data_wait_ms")), fmt_cell(r.get("compute_ms"))]) + " |")
    lines += ["", "Targets (set for one H100; judged on a GPU only, and only on the rows that ran):", ""]
    lines += [f"- {what}: {verdict}" for what, verdict in judge(rows, on_gpu=meta["device"] == "cuda")]
    return "\n".join(lines) + "\n"


def model_settings(cuda: bool) -> tuple[dict[str, Any], Any, str, str]:
    """(the bench's base settings, the model config, the preset, the precision) of the end-to-end rows:
    TimeSformer-Base divided 8x224 in bf16 on a GPU, the gpu-perf rehearsal's tiny model on a CPU."""
    from timesformer_harness.bench.cli import measure_peak, resolve
    from timesformer_harness.bench.sweep import base_settings
    from timesformer_harness.gpu_perf import CPU_MODEL, GPU_PRESET
    from timesformer_harness.runtime import precision_name, resolve_precision

    cfg, preset, device = resolve(preset=GPU_PRESET if cuda else "tiny",
                                  overrides=["bench.precision=bf16", "bench.warmup=2",
                                             *([] if cuda else [*CPU_MODEL, "bench.gemm_n=256"])])
    precision = precision_name(resolve_precision(cfg.bench.precision, device))
    peak = measure_peak(device, precision, cfg.bench.gemm_n)
    return base_settings(cfg, preset, precision, device, peak), cfg.model, preset, precision


def expected_rows(rows: list[Row], reasons: dict[str, str | None], budget_s: float, scale: float) -> list[Row]:
    """The rows of ``rows`` that can run (no reason not to) and fit the budget by the estimates: each row's
    ``estimate_s`` times ``scale``, after ``PREPARE_ESTIMATE_S`` of preparing files; a row that does not fit takes
    no time, as when it is skipped."""
    spent, fits = PREPARE_ESTIMATE_S * scale, []
    for row in rows:
        if reasons[row.name] is None and spent + row.estimate_s * scale <= budget_s:
            fits.append(row)
            spent += row.estimate_s * scale
    return fits


def run(out: Path, data: Path, budget_s: float, only: list[str] | None,
        table: Path | None = None) -> list[dict[str, Any]]:
    """Prepare the files the chosen rows need, then every row that fits the budget, in ``ROWS`` order; the results
    rewritten after each, and each loader row that ran merged into the decode table at ``table`` (None: none)."""
    from timesformer_harness.benchmarks.bench_prepare import repeated_manifest
    from timesformer_harness.pipelines.nvdec import generation_of
    from timesformer_harness.runtime import device_name, environment_info, resolve_device

    clock = Stopwatch()
    device = resolve_device()
    cuda = device.type == "cuda"
    size = GPU_SIZE if cuda else CPU_SIZE
    dali = importlib.util.find_spec("nvidia.dali") is not None
    chosen = [r for r in ROWS if not only or r.name in only]
    reasons = {r.name: skip_reason(r, cuda, dali) for r in chosen}
    scale = 1.0 if cuda else 0.25  # a CPU row at CPU size costs less than its GPU estimate
    # the files of the rows expected to run are made up front, in parallel; a later row that fits after all gets its
    # own when it comes
    names = list(dict.fromkeys(r.variant for r in expected_rows(chosen, reasons, budget_s, scale)))
    machine = {"started": run_stamp(), "device": device.type, "hardware": device_name(device),
               "env": environment_info(device), "dali": _dali_version(), "cores": os.cpu_count()}
    # the machine's facts first: a run cut short while preparing still says where it ran
    atomic_write_text(out / "results.json", json.dumps({"meta": {
        **machine, "stage": f"preparing {', '.join(names) or 'nothing'}"}, "rows": []}, indent=2) + "\n")
    manifests, prepared = prepare_variants(data, size, names) if names else ({}, {})
    base, model, preset, precision = model_settings(cuda) if any(
        r.kind == "e2e" and reasons[r.name] is None for r in chosen) else ({}, None, "-", "-")
    meta = {**machine, "size": asdict(size), "prepare": prepared, "model": f"{preset} divided {T}x{size.crop}",
            "precision": precision, "budget_s": budget_s, "wall_s": clock.elapsed()}
    results: list[dict[str, Any]] = []
    for row in chosen:
        threads = size.threads * row.thread_factor
        entry: dict[str, Any] = {"row": row.name, "kind": row.kind, "variant": row.variant, "threads": threads,
                                 **({"compile": row.compile} if row.kind == "e2e" else {})}
        timeout_s, over = row_timeout(row.estimate_s * scale, budget_s - clock.elapsed())
        if reasons[row.name] is None and over is None and row.variant not in manifests:  # faster than estimated
            late, meta["prepare"][f"late {row.variant}"] = prepare_variants(data, size, [row.variant])
            manifests.update(late)
            timeout_s, over = row_timeout(row.estimate_s * scale, budget_s - clock.elapsed())
        made = manifests.get(row.variant)
        if reasons[row.name] is not None or over is not None:
            entry.update(status="skipped", message=reasons[row.name] or over)
        elif isinstance(made, str):  # the variant could not be made
            entry.update(status="error", message=made)
        else:
            manifest = repeated_manifest(made, size.e2e_repeat if row.kind == "e2e" else size.repeat)
            cfg = data_config(size, manifest.parent, manifest, threads)
            if row.kind == "e2e":
                entry.update(run_e2e(row, cfg, out, base, model, size.e2e_batches, timeout_s=timeout_s))
            else:
                entry.update(run_loader(row, cfg, device, size.rounds, timeout_s=timeout_s))
        record_row(out, results, entry, meta, clock.elapsed(), summary)
        # the table holds what data.backend=auto chooses between, per file codec (no frame folders, no PyNvVideoCodec)
        in_table = entry["kind"] in ("dali", "pyav") and row.variant not in FOLDER_VARIANTS
        if table is not None and in_table and entry["status"] == "ok":
            generation = generation_of(device) if cuda else CPU_GENERATION
            merge_rates(table, [table_row(entry, meta, generation, out / "results.json")])
            logger.info("%s: merged into the decode table %s", row.name, table)
    return results


def _dali_version() -> str:
    try:
        from nvidia import dali
    except ImportError:
        return "not installed"
    return dali.__version__


def main(argv: list[str] | None = None) -> int:
    names = [r.name for r in ROWS]
    p = script_parser("timesformer_harness.benchmarks.gpu_input", __doc__, names, budget_s=480.0)
    p.add_argument("--data", default="runs/gpu_input/data", help="generated files (kept, re-used)")
    p.add_argument("--update-table", nargs="?", const=str(TABLE), default=None, metavar="PATH",
                   help="merge every loader row that ran into the decode table at PATH (default: the shipped "
                        "configs/measured/decode_rates.yaml, GPU rows only)")
    args = p.parse_args(argv)
    table = None if args.update_table is None else Path(args.update_table)
    if table is not None and table.resolve() == TABLE.resolve() and not torch.cuda.is_available():
        p.error(f"--update-table {table}: the shipped decode table holds GPU measurements only, and there is no "
                f"CUDA device here; give a path for the rehearsal's rows (--update-table PATH)")
    out = script_start(p, args, names)
    if out is None:
        return 2
    return script_end(out, run(out, Path(args.data), args.budget_s, args.rows, table))


if __name__ == "__main__":
    sys.exit(main())
