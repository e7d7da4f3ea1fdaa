"""``build_loader``: the loader ``data.loader`` asks for (a backend registered in ``pipelines.loaders``), after the
pre-flight check of every video.

``plan_decode`` makes the choice from the probed videos (pure: it touches no GPU): ``data.loader=auto`` picks DALI
when ``nvidia.dali`` imports and its backend decodes every usable video, else PyAV (logging why);
``resolve_backend`` maps ``data.backend`` to a DALI device, and with ``data.backend=auto`` and the model on CUDA,
the DALI decode path (NVDEC, DALI's CPU decoder, nvJPEG) is the one of those that take every video with the most
clips/s measured for this GPU in the decode table (``timesformer_harness.pipelines.decode_rates``; the rule order,
NVDEC first, where a candidate has no figure): videos NVDEC
cannot decode on this GPU (``timesformer_harness.pipelines.nvdec``: the toy set's 32x32 VP9, for one) are decoded by
DALI on the CPU and the clips copied to the GPU. Each loader module is imported only when it is chosen, so DALI is not
loaded for a PyAV or synthetic loader.

Under torch.distributed every per-file step of the pre-flight check is sharded: each rank probes (and deep-checks)
every ``world_size``-th video from its rank (after checking that every rank read the same paths, in the same order),
and the small results are all-gathered, so every rank judges the same infos, makes the same decode plan (checked) and
rejects the same files, with one probe per file in the whole job.
Rank 0 shows the progress of its own share (``timesformer_harness.pipelines.progress``: a bar on a terminal, else a log
line every 30 s); both caches are written as results come, so an interrupted pre-flight check resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch

from timesformer_harness.common import cache_location, cache_path, check_fits
from timesformer_harness.pipelines.base import ClipPlanner, Loader, Video, memory_bytes
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.loaders import AUTO, LOADERS
from timesformer_harness.pipelines.manifest import VideoEntry, read_manifest
from timesformer_harness.pipelines.decode_rates import (DALI_PATHS, RateRow, choose_path, codec_counts, dali_candidates,
                                                        load_rates, short_side_of, table_name)
from timesformer_harness.pipelines.nvdec import DALI_CPU_CODECS, DEFAULT_GENERATION, generation_of
from timesformer_harness.pipelines.quarantine import BadVideo, write_rejected
from timesformer_harness.pipelines.synthetic import check_synthetic_labels
from timesformer_harness.pipelines.validate import VideoInfo, all_missing_hint, deep_check, judge, probe_all

logger = logging.getLogger(__name__)


def resolve_backend(cfg: DataConfig, device: torch.device | str) -> str:
    """DALI device for ``data.backend``: auto = gpu when the model's device is CUDA, else cpu.

    Raises:
        ValueError: ``data.backend=gpu`` with the model on a CPU (NVDEC's frames would have nowhere to go).
    """
    device = torch.device(device)
    if cfg.backend == "gpu" and device.type != "cuda":
        raise ValueError(f"data.backend=gpu decodes on the GPU, but the model runs on {device.type} (no CUDA device "
                         f"is used here); set data.backend=cpu or data.backend=auto")
    if cfg.backend != "auto":
        return cfg.backend
    return "gpu" if device.type == "cuda" else "cpu"


def dali_available() -> str:
    """"" when nvidia.dali imports, else the reason."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"nvidia.dali is not importable ({e})"
    return ""


@dataclass(frozen=True)
class DecodePlan:
    """Which loader decodes the videos, and where."""

    loader: str  # a registered backend that decodes files: dali | pyav
    backend: str  # its decode device: cpu | gpu ("" for a backend without one, e.g. pyav)
    gpu_arch: str  # the GPU generation NVDEC's limits were judged for
    # why data.loader=auto or data.backend=auto decoded where it did, when it moved off its first choice or the decode
    # table chose between paths (naming the rows that decided); "" = it had no choice and did not move
    why: str = ""


def plan_decode(cfg: DataConfig, device: torch.device | str, infos: list[VideoInfo],
                gpu_arch: str = DEFAULT_GENERATION, dali_missing: str = "",
                rates: list[RateRow] | None = None) -> DecodePlan:
    """The loader and DALI device for ``cfg`` and the model's ``device``, judged on the probed ``infos``; touches
    no GPU (``gpu_arch`` is the device's generation, ``timesformer_harness.pipelines.nvdec.generation_of``;
    ``dali_missing`` why nvidia.dali does not import, "" when it does; ``rates`` the decode table's rows, None = read
    the table ``data.decode_rates`` names when there is a choice to make).

    * ``data.loader`` a backend without a decode device (pyav): that backend. ``data.loader=dali`` without DALI:
      RuntimeError.
    * ``data.backend=auto`` with the model on CUDA and ``data.loader`` auto or dali: of the DALI paths that take every
      video (``timesformer_harness.pipelines.decode_rates.dali_candidates``: NVDEC, DALI's CPU decoder, nvJPEG for a
      set of MJPEG files only), the one with the most clips/s in the table for this GPU generation and the set's
      codecs (``choose_path``); the rule order (NVDEC, then the CPU decoder, then nvJPEG) when a candidate has no
      measured figure. DALI's CPU decoder copies the clips to the GPU. No path takes them all: (``data.loader=auto``)
      PyAV. ``data.backend=gpu`` stays on NVDEC (nvJPEG for MJPEG), and the files it cannot decode are rejected by the
      pre-flight check.
    * ``data.loader=auto``: PyAV when DALI is missing or its backend cannot decode a video PyAV can.
    """
    if cfg.loader != AUTO and not LOADERS[cfg.loader].needs_decode_device:
        return DecodePlan(cfg.loader, "", gpu_arch)
    backend = resolve_backend(cfg, device)
    if dali_missing:
        if cfg.loader == "dali":
            raise RuntimeError(f"data.loader=dali but {dali_missing}; use data.loader=pyav")
        return DecodePlan("pyav", backend, gpu_arch, dali_missing)
    moved = ""  # why data.backend=auto decodes where it does (off NVDEC, or chosen by the table)
    if backend == "gpu" and cfg.backend == "auto":
        candidates, refused = dali_candidates(infos, gpu_arch)
        if candidates:
            if len(candidates) > 1 and rates is None:
                rates = load_rates(cfg.decode_rates)
            choice = choose_path(candidates, rates or [], gpu_arch, codec_counts(infos), None, short_side_of(infos),
                                 table_name(cfg.decode_rates))
            backend, moved = DALI_PATHS[choice.path], "; ".join(x for x in (refused, choice.why) if x)
        elif cfg.loader == "auto":
            return DecodePlan("pyav", backend, gpu_arch, f"{refused}; DALI's CPU decoder, the other way, takes only "
                                                          f"{'/'.join(sorted(DALI_CPU_CODECS))}")
    if cfg.loader == "auto":
        def rejected_by(decoder: str) -> list[tuple[str, str]]:
            return judge(infos, decoder, cfg.num_frames, cfg.sampling_rate, cfg.target_fps, cfg.pad_short,
                         cfg.sampling == "segment", gpu_arch, cfg.max_frame_pixels)

        pyav_rejects = {p for p, _ in rejected_by("pyav")}
        dali_only = [(p, r) for p, r in rejected_by(backend) if p not in pyav_rejects]
        if dali_only:
            return DecodePlan("pyav", backend, gpu_arch, f"{len(dali_only)} of {len(infos)} video(s) cannot be "
                              f"decoded by DALI's {backend} backend, e.g. {dali_only[0][0]}: {dali_only[0][1]}")
    return DecodePlan("dali", backend, gpu_arch, moved)


def log_decode_plan(cfg: DataConfig, plan: DecodePlan, device: torch.device) -> None:
    """Say which loader decodes where, and why when ``auto`` moved off its first choice."""
    if plan.loader == "pyav" and cfg.loader == "auto":
        logger.warning("data.loader=auto: using the PyAV loader because %s", plan.why)
    elif plan.loader == "dali" and plan.why and plan.backend == "cpu":
        logger.warning("data.backend=auto: DALI decodes on the CPU and the clips are copied to %s, because %s",
                       device, plan.why)
    elif plan.loader == "dali" and plan.why:
        logger.info("data.backend=auto: DALI decodes on the GPU, because %s", plan.why)
    elif cfg.loader == "auto":
        logger.info("data.loader=auto: using DALI (%s backend)", plan.backend)


class Preflight(NamedTuple):
    """What the pre-flight check of one split found."""

    entries: list[VideoEntry]  # the manifest's videos, in order
    infos: list[VideoInfo]  # each one's probe, in the same order
    plan: DecodePlan  # the loader that would decode them, and where
    rejected: list[tuple[str, str]]  # (path, reason) of the videos that loader cannot use


def preflight(cfg: DataConfig, split: str, device: torch.device | str = "cpu", num_classes: int = 0,
              entries: list[VideoEntry] | None = None) -> Preflight:
    """The pre-flight check ``build_loader`` runs (and ``python -m timesformer_harness.validate --config`` prints):
    the manifest read (labels checked against ``num_classes``), every video probed (cached; under torch.distributed
    each rank probes its share), the decode plan for ``device``, the videos that loader cannot use (the probe's
    judge, then with ``data.validate: deep`` the deep check of the rest)."""
    device = torch.device(device)
    if entries is None:  # a caller that read the manifest already (and checked its labels) passes its entries
        entries = read_manifest(cfg, split, num_classes)
    cache = cache_path(cfg.validate_cache)
    logger.info("pre-flight caches: %s", cache_location(cfg.validate_cache))
    _check_same_entries(entries)
    infos = _probe([e.path for e in entries], cfg, cache)
    plan = plan_decode(cfg, device, infos, generation_of(device) if device.type == "cuda" else DEFAULT_GENERATION,
                       dali_available() if cfg.loader == AUTO or LOADERS[cfg.loader].needs_decode_device else "")
    _check_agreed(plan)
    log_decode_plan(cfg, plan, device)
    rejected = judge(infos, LOADERS[plan.loader].judged_as(plan.backend), cfg.num_frames, cfg.sampling_rate,
                     cfg.target_fps, cfg.pad_short, cfg.sampling == "segment", plan.gpu_arch, cfg.max_frame_pixels)
    if cfg.validate == "deep":
        shallow = {p for p, _ in rejected}
        rejected += _deep_rejects([i.path for i in infos if i.path not in shallow], cfg, cache)
    return Preflight(entries, infos, plan, rejected)


def check_batch_fits(cfg: DataConfig, split: str, device: torch.device) -> None:
    """Refuse, before any video is read, a batch of clips (float32) larger than the memory it is delivered to."""
    crop_key = "train_crop_size" if split == "train" else "test_crop_size"
    crop = getattr(cfg, crop_key)
    check_fits(f"one {split} batch (data.batch_size={cfg.batch_size} clips of data.num_frames={cfg.num_frames} frames "
               f"at data.{crop_key}={crop} px, float32)", cfg.batch_size * 3 * cfg.num_frames * crop * crop * 4,
               [(device.type, memory_bytes(device))], f"lower data.batch_size, data.num_frames or data.{crop_key}")


def build_loader(cfg: DataConfig, split: str, *, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1, start_batch: int = 0, run_dir: str | Path | None = None,
                 quarantine: Sequence[BadVideo | dict[str, Any]] = (), num_classes: int = 0,
                 entries: list[VideoEntry] | None = None,
                 quarantined_videos: dict[str, Sequence[float]] | None = None) -> Loader:
    """The loader ``data.loader`` asks for (auto: DALI when it can decode every video here, else PyAV, saying why).

    The manifest's labels are checked against ``num_classes`` (``model.num_classes``; 0 = not checked) before any
    video is probed; ``entries``: the manifest as the caller read it (``read_manifest``), not read again.

    Every video is pre-flight checked (``timesformer_harness.pipelines.validate``, cached, each rank checking its
    share; ``data.validate: deep`` also decodes every packet); unusable ones raise (``data.on_bad_video: error``) or
    are left out, listed in ``loader.rejected`` and ``{run_dir}/rejected.csv`` (``skip``). Videos that fail while
    decoding go to ``loader.quarantine``, which starts from ``quarantine`` (a resumed run's entries,
    ``timesformer_harness.pipelines.quarantine``). A quarantined video that the pre-flight check now refuses (its file
    went bad) stays in the plan with the facts it was planned with (``quarantined_videos``: path -> frames, fps,
    height, width, from the checkpoint), so that the resumed epochs draw the same clips and replace its own as before.
    """
    device = torch.device(device)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r}; choose from ['train', 'val', 'test']")
    check_batch_fits(cfg, split, device)
    if split == "train" and cfg.random_flip and cfg.format == "ssv2":  # said where train clips are made, once
        logger.warning("data.random_flip=true with data.format=ssv2: train clips are flipped left/right, but SSv2's "
                       "labels tell left from right (\"pushing something from left to right\"), so a flipped clip "
                       "can contradict its label; leave data.random_flip unset (off for SSv2) unless you mean it")
    if cfg.loader != AUTO and not LOADERS[cfg.loader].decodes:
        check_synthetic_labels(cfg, num_classes)
        return LOADERS[cfg.loader].loader_class()(cfg, split, device=device, rank=rank, world_size=world_size,
                                                  start_batch=start_batch)

    entries, infos, plan, rejected = preflight(cfg, split, device, num_classes, entries)
    chosen = LOADERS[plan.loader]
    quarantine = [e if isinstance(e, BadVideo) else BadVideo(**e) for e in quarantine]
    known = {p: facts for p, facts in (quarantined_videos or {}).items() if p in {e.path for e in quarantine}}
    rejected = [(p, r) for p, r in rejected if p not in known]
    if rejected:
        what = f"{len(rejected)} of {len(entries)} videos in the {split} manifest cannot be used"
        if hint := all_missing_hint(entries, rejected):
            what += f" ({hint})"
        listing = "\n".join(f"  {p}: {r}" for p, r in rejected[:10]) + ("\n  ..." if len(rejected) > 10 else "")
        if cfg.on_bad_video == "error":
            deep = " --deep" if cfg.validate == "deep" else ""
            raise ValueError(f"{what} (data.on_bad_video=error):\n{listing}\nfix or remove them (python -m "
                             f"timesformer_harness.pipelines.validate MANIFEST{deep} lists them all), or set "
                             "data.on_bad_video=skip")
        logger.warning("%s; skipping them (data.on_bad_video=skip):\n%s", what, listing)
        if run_dir is not None and rank == 0:
            write_rejected(Path(run_dir) / f"rejected_{split}.csv" if split != "train" else
                           Path(run_dir) / "rejected.csv", rejected, quarantine)
    bad = {p for p, _ in rejected}
    videos = [Video(i, e.path, e.label, *_facts(info, known.get(e.path)))
              for i, (e, info) in enumerate(zip(entries, infos)) if e.path not in bad]
    if not videos:
        raise ValueError(f"no usable videos left in the {split} manifest ({len(rejected)} rejected)")
    planner = ClipPlanner(cfg, split, videos, rank, world_size)
    if split == "train" and planner.num_batches == 0:
        raise ValueError(f"{len(videos)} train videos over {world_size} rank(s) make no full batch of "
                         f"data.batch_size={cfg.batch_size}; lower the batch size")
    loader = chosen.loader_class().build(planner, device, decode_device=plan.backend,
                                         infos=[i for i in infos if i.path not in bad and i.path not in known],
                                         start_batch=start_batch,
                                         rejected=rejected, quarantine=quarantine)
    loader.decode_note = plan.why
    return loader


def _facts(info: VideoInfo, known: Sequence[float] | None) -> tuple[int, float, int, int]:
    """A planned video's frames, fps, height and width: as probed, or as a checkpoint recorded them (``known``)."""
    if known is None:
        return info.frames, info.fps, info.height, info.width
    frames, fps, height, width = known
    return int(frames), float(fps), int(height), int(width)


def _process_group() -> tuple[int, int]:
    """(rank, world size) in torch.distributed's default group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` outside torch.distributed). The pipelines' own copy of
    ``timesformer_harness.distributed.all_gather_objects``, which sits a layer above them."""
    import torch.distributed as dist

    world = _process_group()[1]
    if world == 1:
        return [obj]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def _shares(paths: list[str], work: Callable[[list[str]], Any]) -> list[Any]:
    """``work`` of this rank's share of ``paths`` (every world_size-th path, from its rank), all-gathered: every
    rank's result in rank order (``[work(paths)]`` outside torch.distributed). Keep the results small: they are
    pickled to every rank."""
    rank, world = _process_group()
    return _all_gather(work(paths[rank::world]))


_INFO_FIELDS = operator.attrgetter(*(f.name for f in fields(VideoInfo)))  # a VideoInfo as a tuple, for the wire


def _share_progress(step: str) -> dict[str, Any]:
    """``probe_all`` / ``deep_check``'s progress arguments for ``step``: shown on rank 0 only, naming its share."""
    rank, world = _process_group()
    return {"progress": rank == 0, "desc": step if world == 1 else f"{step} (rank 0's share, 1/{world})"}


def _probe(paths: list[str], cfg: DataConfig, cache: str | Path | None) -> list[VideoInfo]:
    """``validate.probe_all`` of ``paths`` (cached); under torch.distributed each rank probes its share and all
    ranks get every file's info, in the order of ``paths`` (the same on every rank: ``_check_same_entries``)."""
    progress = _share_progress("probe")
    parts = _shares(paths, lambda share: [_INFO_FIELDS(i) for i in probe_all(share, cache, max(1, cfg.num_workers),
                                                                             **progress)])
    infos: list[Any] = [None] * len(paths)
    for rank, part in enumerate(parts):  # rank r probed paths[r::world]
        infos[rank::len(parts)] = [VideoInfo(*row) for row in part]
    return infos


_DIGEST_BLOCK = 4096  # entries per block digest: a disagreement is located to a block, then to an entry


def _entry_digests(entries: list[VideoEntry]) -> tuple[int, str, list[str]]:
    """(count, sha256 of all ``entries`` in order, sha256 of each block of ``_DIGEST_BLOCK`` entries): small to
    gather, cheap to make (a 240k-entry manifest hashes in tens of milliseconds)."""
    whole, blocks = hashlib.sha256(), []
    for start in range(0, len(entries), _DIGEST_BLOCK):
        data = "".join(f"{e.path}\0{e.label}\0{e.key}\0" for e in entries[start:start + _DIGEST_BLOCK])
        encoded = data.encode("utf-8", "surrogateescape")
        whole.update(encoded)
        blocks.append(hashlib.sha256(encoded).hexdigest()[:32])
    return len(entries), whole.hexdigest(), blocks


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The first index where ``a`` and ``b`` differ (the shorter one's length when it is the other's start)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _said(entry: VideoEntry) -> str:
    """A manifest entry as an error message names it."""
    return f"{entry.path!r} label {entry.label}" + (f" id {entry.key!r}" if entry.key else "")


def _check_same_entries(entries: list[VideoEntry]) -> None:
    """Raise the same ValueError on every rank when the ranks' ``entries`` (each read its manifest itself) differ: a
    rank's share of the probes is placed back by position, so it would be matched to other files (or the gather would
    fail), and a rank whose labels differ would train its share on other classes. Locates the first differing entry
    with one more gather, of one block of entries, only when they differ."""
    digests = _all_gather(_entry_digests(entries))
    if len({d[:2] for d in digests}) == 1:
        return
    # every rank holds the same digests, so every rank takes this branch and the gather below together
    start = _DIGEST_BLOCK * min(_first_difference(d[2], digests[0][2]) for d in digests[1:] if d[:2] != digests[0][:2])
    blocks = _all_gather(entries[start:start + _DIGEST_BLOCK])
    at, rank = min((_first_difference(b, blocks[0]), r) for r, b in enumerate(blocks[1:], 1) if b != blocks[0])
    said = [f"rank {r} has " + (_said(blocks[r][at]) if at < len(blocks[r]) else "no entry") for r in (0, rank)]
    groups: dict[tuple[int, str], list[int]] = {}
    for r, (count, digest, _) in enumerate(digests):
        groups.setdefault((count, digest), []).append(r)
    listing = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {count} videos "
                        f"(sha256 {digest[:16]})" for (count, digest), ranks in groups.items())
    raise ValueError(f"the ranks read different manifests ({listing}); the first difference is video {start + at + 1}: "
                     f"{', '.join(said)}. Each rank probes its share of the videos by position, so their results "
                     f"would be matched to the wrong files, and a rank would train on other labels: every rank must "
                     f"read the same manifest: a file every node sees, not rewritten while the job starts")


def _check_agreed(plan: DecodePlan) -> None:
    """Raise when the ranks chose different decode plans from the same infos (DALI importable on some nodes only,
    different GPU generations): their loaders would deliver different numbers of batches and the job would hang."""
    plans = _all_gather(plan)
    if len(set(plans)) > 1:
        def said(p: DecodePlan) -> str:
            return f"{p.loader} on {p.backend or '-'} for {p.gpu_arch}" + (f" ({p.why})" if p.why else "")

        listing = "; ".join(f"rank {r}: {said(p)}" for r, p in enumerate(plans))
        raise RuntimeError(f"the ranks chose different loaders from the same videos: {listing}; give every rank the "
                           f"same software and GPUs, or set data.loader and data.backend explicitly")


def _deep_rejects(paths: list[str], cfg: DataConfig, cache: str | Path | None) -> list[tuple[str, str]]:
    """``validate.deep_check`` of ``paths``; under torch.distributed each rank decodes its share and all ranks get
    every verdict (the same list everywhere, one decode per file)."""
    progress = _share_progress("deep check")
    parts = _shares(paths, lambda share: deep_check(share, cache, max(1, cfg.num_workers), **progress))
    bad = dict(r for part in parts for r in part)
    return [(p, bad[p]) for p in paths if p in bad]
