"""Train a TimeSformer: ``torchrun --nproc_per_node=N harness/train.py --config FILE [key=value ...]``.

Also ``python -m timesformer_harness.train`` (one process). The loop follows the original recipe: the learning rate is
set every iteration from the fractional epoch, gradients accumulate until ``solver.global_batch_size`` clips have been
seen (leftover micro-batches at an epoch's end are dropped, as the original does), evaluation runs every
``train.eval_period`` epochs and at the end, and checkpoints are written every ``train.checkpoint_period`` epochs
(see ``timesformer_harness.train_state`` for the file layout). On top of it: DDP (NCCL on GPU, gloo on CPU), AMP (bf16,
or fp16 with a GradScaler), channels-last on GPU, clipping, label smoothing, mixup/cutmix, a resume that continues
the same run (``train.resume``: never | auto | must; a changed model or data config is refused, other changes warned),
SIGTERM/SIGINT handling (finish the step, save, exit 0) and a stop on a non-finite loss.

Videos that fail while decoding are quarantined by the loader (``timesformer_harness.pipelines.quarantine``); the
Trainer merges every rank's list at each epoch's end, keeps it in ``rejected.csv`` and in the checkpoint (so a resumed
run replays the same batches), counts it in the metrics, and stops every rank together when a loader stops on a bad
video (``data.on_bad_video=error``, or more than ``data.max_bad_fraction`` of the videos).

Outputs in ``output.dir``: ``config.yaml`` (resolved, the latest launch's) and ``config.<n>.yaml`` (launch n's),
``train.log`` (rank 0's log, every launch), ``environment.json``, ``metrics.jsonl``, TensorBoard events in ``tb/``,
``checkpoints/``, ``last_val.json``, ``rejected.csv`` (videos left out, when any). Exit statuses:
``timesformer_harness.common.ExitCode``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, NoReturn

if __name__ == "__main__" and not __package__:  # run by path (torchrun harness/train.py)
    from timesformer_harness.scripts import run_by_package_name

    run_by_package_name(__file__, "timesformer_harness.train")

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from timesformer_harness.checkpoint import (CheckpointError, CheckpointWriteError, check_weights_source,
                                            load_weights)
from timesformer_harness.config import ConfigError, RootConfig, load_config, to_yaml
from timesformer_harness.distributed import (DistInfo, all_gather_objects, all_reduce_sum, barrier, cleanup,
                                             init_distributed, report_unexpected)
from timesformer_harness.evaluate import (TOP5_NONE, accuracy_report, class_names_for, fmt_percent, score_loader,
                                          trained_model_changes)
from timesformer_harness.metric_writer import MetricWriter
from timesformer_harness.metrics import PeakMemory, Stopwatch, ThroughputWindow
from timesformer_harness.mixup import mix_batch
from timesformer_harness.optim import build_optimizer, lr_at, set_hyperparameters, set_lr, state_mismatch
from timesformer_harness.runtime import (environment_info, precision_name, release_freed_memory, resolve_precision,
                                         retain_freed_memory, seed_everything, set_determinism)
from timesformer_harness.train_hooks import DebugHooks
from timesformer_harness.train_state import (LAUNCH_FILE, Change, CheckpointManager, RunFolderError, RunLock,
                                             config_changes, data_fingerprint, epoch_partial, find_resume,
                                             format_changes, keep_records_up_to, launch_identity, list_checkpoints,
                                             logged_end, misnamed, resume_disagreement, resume_position, rng_state,
                                             saved_config, set_aside, set_rng_state, started_by_this_launch,
                                             unwritable, val_record, video_facts)
from timesformer_harness.workload import TrainStep, build_model, check_model_fits, compile_model, grad_scaler
from timesformer_harness.pipelines.base import loader_facts
from timesformer_harness.pipelines.config import DataConfig, train_crop_problem
from timesformer_harness.common import (ExitCode, leave_for_torchrun, log_to_file, remove_stale_temporaries,
                                        report_error, setup_logging)
from timesformer_harness.pipelines.loaders import AUTO, LOADERS
from timesformer_harness.pipelines.manifest import VideoEntry, read_manifest
from timesformer_harness.pipelines.quarantine import BadVideoError, Quarantine, write_rejected
from timesformer_harness.pipelines.synthetic import check_synthetic_labels

logger = logging.getLogger(__name__)
RELAYED_SIGNAL_S = 2.0  # a second signal this soon after the first is the same request relayed (torchrun's, pkill's)


def read_back(t: torch.Tensor) -> list[float]:
    """``t``'s values on the host: the only way the Trainer waits for the device (once per micro-batch)."""
    return t.tolist()


def device_values(values: list[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Host values as a tensor on ``device``, copied from pinned memory without waiting for the device (a copy from
    pageable memory would wait for the work queued before it)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes (ranks of a DDP job must agree exactly)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _until_bad_video(batches: Iterator[Any]) -> Iterator[Any]:
    """The loader's batches; in place of the one it could not make, the ``BadVideoError`` that stopped it."""
    try:
        yield from batches
    except BadVideoError as e:
        yield e


def split_data_config(cfg: RootConfig, split: str) -> DataConfig:
    """The data section a split's loader reads: validation's batch is ``test.batch_size``."""
    return cfg.data if split == "train" else replace(cfg.data, batch_size=cfg.test.batch_size)


def check_inputs(cfg: RootConfig, device: torch.device) -> dict[str, list[VideoEntry]]:
    """Read what a run names before it writes anything: the train manifest, the val manifest when the run validates
    (labels checked against ``model.num_classes``), and ``model.pretrained`` when there is no checkpoint to resume;
    and check that the model's weights and a batch of each split fit in ``device``'s memory at all.
    Returns the manifests' entries by split (none for a loader that reads no files), for the loaders' first build.

    Raises:
        FileNotFoundError, ValueError: a manifest missing, malformed or empty, a label out of range, or sizes larger
            than the machine.
        CheckpointError: ``model.pretrained`` names nothing, or a folder without weights or whose config.json names
            another model.
    """
    from timesformer_harness.pipelines.factory import check_batch_fits

    manifests = {}
    splits = ("train", "val") if cfg.train.eval_period else ("train",)
    check_model_fits(cfg.model, device)
    for split in splits:
        check_batch_fits(split_data_config(cfg, split), split, device)
    check_synthetic_labels(cfg.data, cfg.model.num_classes)
    if cfg.data.loader == AUTO or LOADERS[cfg.data.loader].decodes:
        for split in splits:
            manifests[split] = read_manifest(cfg.data, split, cfg.model.num_classes)
    resumable = cfg.train.resume != "never" and list_checkpoints(Path(cfg.output.dir) / "checkpoints")
    if cfg.model.pretrained and not resumable and not Path(cfg.model.pretrained).exists():
        raise CheckpointError(f"model.pretrained={cfg.model.pretrained} does not exist (relative paths are from the "
                              f"current folder, {Path.cwd()}): fix the path, or download the weights "
                              f"(docs/checkpoints.md)")
    if cfg.model.pretrained and not resumable:  # a snapshot folder: its weights file, and config.json vs the model
        check_weights_source(cfg.model.pretrained, cfg.model, warn=False)  # the load warns
    return manifests


def check_train_clips(cfg: RootConfig, resuming: bool) -> None:
    """Refuse train clips that would not be random crops of a jittered resize (``train_crop_problem``), or warn when
    resuming a run that started with them (its checkpoints were trained on them; a change would be refused)."""
    if not (problem := train_crop_problem(cfg.data)):
        return
    if not resuming:
        raise ValueError(problem)
    logger.warning("%s; this run started with it, so it goes on with it", problem)


def accumulation(cfg: RootConfig, world_size: int) -> int:
    """Batches per rank in one optimizer step: ``solver.global_batch_size`` over the clips of one batch on every rank
    (1 when it is 0)."""
    per_step = cfg.data.batch_size * world_size
    return max(1, cfg.solver.global_batch_size // per_step) if cfg.solver.global_batch_size else 1


def step_batches(cfg: RootConfig, batches: int, accum: int) -> int:
    """The batches per rank an epoch of ``batches`` runs (``train.max_steps_per_epoch`` caps them); ValueError when
    they cannot make one optimizer step of ``accum`` batches."""
    if cfg.train.max_steps_per_epoch:
        batches = min(batches, cfg.train.max_steps_per_epoch * accum)
    if batches < accum:
        raise ValueError(f"an epoch has {batches} batches per rank but one optimizer step needs {accum} "
                         f"(solver.global_batch_size={cfg.solver.global_batch_size}); lower it")
    return batches


def check_resume_config(cfg: RootConfig, path: Path, obj: dict[str, Any]) -> list[Change]:
    """Compare this launch's config with the one checkpoint ``path`` (loaded: ``obj``) was written with. Returns the
    changes a resume takes on (to warn about); raises ``RunFolderError`` naming every change that would make the
    checkpoint another model's or its clips other clips (``train_state.config_changes``)."""
    before = saved_config(obj)
    if before is None:
        logger.warning("%s holds no config of this harness: resuming without comparing configs", path)
        return []
    refused, warned = config_changes(before, yaml.safe_load(to_yaml(cfg)),
                                     data_may_change=cfg.train.on_data_change == "replan")
    if refused:
        raise RunFolderError(f"cannot resume from {path}: the config changes the model, its data or its optimizer: "
                             f"{format_changes(refused)}; put the old value(s) back, or train a new model in a folder "
                             f"of its own (output.dir=<new folder> train.resume=never; model.pretrained={path} starts "
                             "it from these weights)")
    return warned


def next_launch(run_dir: Path) -> int:
    """1 + the highest ``n`` of the ``config.<n>.yaml`` files in ``run_dir`` (each launch keeps its config)."""
    found = [int(m[1]) for p in run_dir.glob("config.*.yaml") if (m := re.fullmatch(r"config\.(\d+)\.yaml", p.name))]
    return max(found, default=0) + 1


class Trainer:
    """Builds model, optimizer, loaders and checkpoints from the config, then ``fit()`` runs the epochs."""

    def __init__(self, cfg: RootConfig, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        # a wrong data.root or an empty manifest fails here, before the run folder is touched; the entries read
        # serve each split's first loader
        self.device = info.device
        self._manifests = check_inputs(cfg, self.device)
        # train.resume decides, and a resume refuses a changed model or data, also before the folder is touched
        self._resume = find_resume(cfg.output.dir, self._resume_policy())
        if self._resume is not None and (why := misnamed(*self._resume)):
            raise RunFolderError(why)
        found = None if self._resume is None else (self._resume[0].name, *resume_position(self._resume[1],
                                                                                           self._resume[0]))
        if problem := resume_disagreement(all_gather_objects(found)):
            raise RunFolderError(problem)
        changed = check_resume_config(cfg, *self._resume) if self._resume is not None else []
        check_train_clips(cfg, resuming=self._resume is not None)
        self.accum = accumulation(cfg, info.world_size)
        batches = len(self._manifests.get("train", [])) // info.world_size // cfg.data.batch_size
        if batches and (found is None or found[1] < cfg.solver.max_epoch):  # epochs left to train
            # every listed video counted (the pre-flight check may reject some: the loader's count is checked again);
            # no full batch at all is the loader's own error
            step_batches(cfg, batches, self.accum)
        self.run_dir = Path(cfg.output.dir)
        self.cfg_yaml = to_yaml(cfg)
        self.lock, busy = None, ""
        if info.is_main:  # the lock before anything is written to the folder; the ranks agree before any goes on
            try:
                self.lock = RunLock(self.run_dir)
                launch = self._write_launch_files()
            except RunFolderError as e:
                busy = str(e)
            except OSError as e:  # a full disk
                busy = str(unwritable(self.run_dir, e))
        if self._any_rank(bool(busy)):
            raise RunFolderError(busy or f"output.dir {self.run_dir} cannot be used (rank 0 says why)")
        if info.is_main:
            logger.info("launch %d in %s: config.%d.yaml, log in train.log", launch, self.run_dir, launch)
            if changed:
                logger.warning("resuming from %s with a changed config (the new values apply from here on): %s",
                               self._resume[0], format_changes(changed))
            if self._resume is not None:  # said again here, where train.log has it: the warnings came before it
                saved = list_checkpoints(self._resume[0].parent)
                newer = saved[saved.index(self._resume[0]) + 1:] if self._resume[0] in saved else []
                if newer:  # moved aside: counted by keep_last, they could prune the good ones
                    aside = [set_aside(p).name for p in newer]
                    logger.warning("resuming from %s: the newer %s could not be read, moved aside as %s",
                                   self._resume[0].name, ", ".join(p.name for p in newer), ", ".join(aside))
            (self.run_dir / "environment.json").write_text(json.dumps(environment_info(self.device), indent=2))
        barrier()
        seed_everything(cfg.train.seed + info.rank)
        if cfg.train.deterministic:
            set_determinism()

        self.dtype = resolve_precision(cfg.train.precision, self.device)
        # Channels-last only on CUDA, where the tensor-core convolution wants it (train.channels_last).
        self.model = build_model(cfg.model, self.device, dtype=self.dtype,
                                 channels_last=self.device.type == "cuda" and cfg.train.channels_last)
        self.optimizer, self.optimizer_impl = build_optimizer(list(self.model.parameters()), cfg.solver, self.device)
        self.scaler = grad_scaler(self.device, self.dtype)
        self.ckpt = CheckpointManager(self.run_dir, cfg.train.keep_last)
        self.start_epoch, self.start_batch, self.step = 0, 0, 0
        self.bad_videos: list[dict[str, Any]] = []  # the train loader's quarantine, as restored / last merged
        self.quarantined_videos: dict[str, list[float]] = {}  # their planned facts, as restored
        self.steady = ThroughputWindow()  # every log window past the warm-up steps, for the run's steady clips/s
        self._train_loader: Any = None
        self.resumed_from: tuple[Path, dict[str, Any] | None] | None = None  # (checkpoint, its data fingerprint)
        self.best: dict[str, Any] = {"top1": None, "epoch": None}  # the best val top-1 among saved checkpoints
        # an interrupted epoch's sums so far (loss, clips, correct, micro-batches, the open log window's losses):
        # saved with a mid-epoch checkpoint, so that the resumed epoch's records are those of an uninterrupted one
        self.epoch_partial: dict[str, Any] | None = None
        self.exit_code: int | None = None  # set by a second signal: the status the process exits with
        self.pending_validation: int | None = None  # a resumed epoch (0-based) saved but not validated
        self._restore()
        if info.is_main:
            removed = remove_stale_temporaries(self.ckpt.dir) if self.ckpt.dir.is_dir() else 0
            if removed:
                logger.warning("removed %d temporary file(s) a killed save left in %s", removed, self.ckpt.dir)
            if self.resumed_from is not None:
                dropped = keep_records_up_to(self.run_dir / "metrics.jsonl", self.step)
                if dropped:
                    logger.info("metrics.jsonl: %d record(s) logged after step %d, whose work is redone from %s, "
                                "removed", dropped, self.step, self.resumed_from[0])
            elif dropped := keep_records_up_to(self.run_dir / "metrics.jsonl", -1):
                logger.warning("metrics.jsonl: %d record(s) of an earlier run that saved no checkpoint removed (this "
                               "run starts from step 0)", dropped)
        self.ddp: DDP | None = None
        if info.enabled:
            self.ddp = DDP(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                           find_unused_parameters=cfg.dist.find_unused_parameters)
        self.train_step = TrainStep(self.model, self.optimizer, self.scaler, self.device, self.dtype,
                                    forward_model=compile_model(self.ddp or self.model, cfg.train.compile,
                                                                fullgraph=self.ddp is None),
                                    grad_clip=cfg.solver.grad_clip, label_smoothing=cfg.solver.label_smoothing)

        per_step = cfg.data.batch_size * info.world_size
        if cfg.solver.global_batch_size and cfg.solver.global_batch_size % per_step:
            logger.warning("solver.global_batch_size=%d is not a multiple of %d clips per iteration: effective "
                           "batch %d", cfg.solver.global_batch_size, per_step, per_step * self.accum)
        self.stop_signal: str | None = None
        self.stop_signal_at = 0.0  # time.monotonic() of the first signal
        # TensorBoard's points after the resumed step (or all of them, on a fresh start) are hidden, as metrics.jsonl's
        # records of the work redone are removed above: the event files themselves are append-only
        purge = self.step + 1 if self.resumed_from is not None else 0
        self.metrics = MetricWriter(self.run_dir, info.is_main, cfg.output.tensorboard, purge_step=purge)
        self.memory = PeakMemory(self.device)  # peak per log window and per validation (this process)
        self._val_loader = None
        self.hooks = DebugHooks(cfg.train, self.run_dir, info.rank, self.device)
        if cfg.model.num_frames != cfg.data.num_frames or cfg.model.img_size != cfg.data.train_crop_size:
            logger.warning("model.num_frames/img_size (%d/%d) differ from data.num_frames/train_crop_size (%d/%d): "
                           "the model resizes its embeddings at run time; is that intended?", cfg.model.num_frames,
                           cfg.model.img_size, cfg.data.num_frames, cfg.data.train_crop_size)
        logger.info("model %s: %.2fM params, %s, precision %s, %d process(es) x %d clips, accumulation %d -> "
                    "%d clips per optimizer step", cfg.model.attention_type,
                    sum(p.numel() for p in self.model.parameters()) / 1e6, self.device, precision_name(self.dtype),
                    info.world_size, cfg.data.batch_size, self.accum, per_step * self.accum)

    def _resume_policy(self) -> str:
        """``train.resume``, but ``auto`` in an attempt torchrun restarted (``--max-restarts``) on any rank in a
        folder an earlier attempt of this launch started (``train_state.started_by_this_launch``): it holds this
        run's own checkpoints and records, which ``never`` would refuse. A folder of another run stays refused."""
        policy = self.cfg.train.resume
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0  # per node's agent: agreed
        if policy != "never" or not self._any_rank(restarted):
            return policy
        if self._any_rank(self.info.is_main and started_by_this_launch(self.cfg.output.dir)):
            logger.info("a restarted attempt of this run: train.resume=never continues from its checkpoints (auto)")
            return "auto"
        return policy

    # ----------------------------------------------------------------------------------------------------------
    def _restore(self) -> None:
        """Resume from the checkpoint ``train.resume`` chose; else ``model.pretrained`` weights only (fine-tuning:
        epoch 0, fresh optimizer, a head of another class count re-initialised); else the model's own init."""
        if self._resume is not None:
            path, obj = self._resume
            load_weights(self.model, path, strict=True, new_head=False)
            self._restore_optimizer(path, obj)
            if obj.get("scaler"):
                self.scaler.load_state_dict(obj["scaler"])
            self.start_epoch, self.start_batch, self.step = resume_position(obj, path)
            best = obj.get("best")
            if isinstance(best, dict) and isinstance(best.get("top1"), (int, float)):
                self.best = {"top1": float(best["top1"]), "epoch": best.get("epoch")}
            if self.start_batch == 0 and self.start_epoch and self._validation_due(self.start_epoch - 1):
                # an epoch's checkpoint is saved before its validation: what that validation found is in the
                # metrics (logged at the checkpoint's step, so kept), or it has not run
                val = val_record(self.run_dir / "metrics.jsonl", self.start_epoch)
                top1 = val.get("val/top1") if val is not None else None
                if val is None:
                    self.pending_validation = self.start_epoch - 1
                elif isinstance(top1, (int, float)):  # best may not point at it yet: the launch ended in between
                    self._keep_best(self.start_epoch - 1, float(top1), path if self.info.is_main else None)
            self.resumed_from = (path, obj.get("data"))
            self.epoch_partial = epoch_partial(obj.get("epoch_partial")) if self.start_batch else None
            self.bad_videos = list(obj.get("quarantine", []))
            self.quarantined_videos = video_facts(obj.get("quarantined_videos"))
            rngs = obj.get("rng")
            old_world = int(obj.get("world_size", 1))
            if rngs and old_world == self.info.world_size:
                set_rng_state(rngs[self.info.rank], self.device)
            elif rngs:
                logger.warning("%s was written by %d process(es), this run has %d: random states re-seeded, so the "
                               "run continues but not bit-exactly", path, old_world, self.info.world_size)
            old_clips = int(obj.get("batch_size", self.cfg.data.batch_size)) * old_world  # per iteration, all ranks
            if self.start_batch and old_clips != self.cfg.data.batch_size * self.info.world_size:
                # the epoch's clip order is the same: go on at the first clip not yet trained on (rounded down)
                self.start_batch = self.start_batch * old_clips // (self.cfg.data.batch_size * self.info.world_size)
            logger.info("resumed from %s: %d epoch(s) and %d batch(es) done, step %d", path, self.start_epoch,
                        self.start_batch, self.step)
            self._resume = None  # the loaded checkpoint (weights, optimizer state) is not kept for the whole run
        elif self.cfg.model.pretrained:
            report = load_weights(self.model, self.cfg.model.pretrained, strict=True,
                                  pos_resize=self.cfg.model.pretrained_pos_resize or None)
            logger.info("initialised from %s (%s)", self.cfg.model.pretrained, report.format)
            other_model, _, _ = trained_model_changes(self.cfg, report.saved_config)
            computes_otherwise = [c for c in other_model if c[0] != "model.num_classes"]  # a new head is fine-tuning
            if computes_otherwise:  # the same tensors, another function: a start, not the model that was trained
                logger.warning("model.pretrained=%s was trained as another model: %s; its weights load but compute "
                               "something else in this one (set those keys back to fine-tune the trained model)",
                               self.cfg.model.pretrained, format_changes(computes_otherwise))
        elif self.cfg.model.init == "original" and self.cfg.model.embed_dim >= 768:
            logger.warning("model.pretrained is empty: a ViT-%s-sized model trains from random init, where the "
                           "original recipes start from ImageNet ViT weights "
                           "(model.pretrained=jx_vit_base_p16_224.pth; docs/checkpoints.md)",
                           "B" if self.cfg.model.embed_dim == 768 else "L")

    def _restore_optimizer(self, path: Path, obj: dict[str, Any]) -> None:
        """Load the checkpoint's optimizer state when it fits this optimizer (``optim.state_mismatch``). One that
        does not is refused for a checkpoint of ours (its config matched this run's), and for one with no config of
        ours (an original ``.pyth``, whose optimizer this run cannot know) replaced by a fresh state, with a warning.

        Raises:
            CheckpointError: a checkpoint of ours whose optimizer state does not fit (named, with the fix)."""
        state = obj.get("optimizer_state")
        if not state:
            return
        why = state_mismatch(self.optimizer, state)
        if why is None:
            self.optimizer.load_state_dict(state)
            set_hyperparameters(self.optimizer, self.cfg.solver)  # the groups hold the values saved with them
        elif saved_config(obj) is None:
            logger.warning("%s: its optimizer_state does not fit solver.optimizer=%s (%s); it holds no config of this "
                           "harness, so the optimizer starts with a fresh state", path, self.cfg.solver.optimizer, why)
        else:
            raise CheckpointError(f"{path}: its optimizer_state does not fit solver.optimizer="
                                  f"{self.cfg.solver.optimizer} ({why}): resume it with the harness version that wrote "
                                  f"it, or start a new run from its weights (output.dir=<new folder> "
                                  f"model.pretrained={path})")

    def _build_loader(self, split: str, start_batch: int = 0) -> Any:
        from timesformer_harness.pipelines.factory import build_loader

        data_cfg = split_data_config(self.cfg, split)
        kwargs = {"start_batch": start_batch, "quarantine": self.bad_videos,
                  "quarantined_videos": self.quarantined_videos} if split == "train" else {}
        loader = build_loader(data_cfg, split, device=self.device, rank=self.info.rank,
                              world_size=self.info.world_size, run_dir=self.run_dir,
                              num_classes=self.cfg.model.num_classes, entries=self._manifests.pop(split, None),
                              **kwargs)
        if split == "train":
            self._train_loader = loader
        return loader

    def _write_launch_files(self) -> int:
        """Rank 0, under the lock: the folder, train.log, this launch's config and identity; returns its number."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_to_file(self.run_dir / "train.log")
        launch = next_launch(self.run_dir)  # config.yaml is the latest launch's; config.<n>.yaml each one's
        (self.run_dir / f"config.{launch}.yaml").write_text(self.cfg_yaml)
        (self.run_dir / "config.yaml").write_text(self.cfg_yaml)
        (self.run_dir / LAUNCH_FILE).write_text(launch_identity())
        return launch

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stop_signal is not None:
            if time.monotonic() - self.stop_signal_at < RELAYED_SIGNAL_S:  # e.g. pkill, then torchrun relaying it
                logger.info("%s again within %.0f s: the same stop request, still finishing the step", name,
                            RELAYED_SIGNAL_S)
                return
            logger.warning("second %s: exiting without a checkpoint", name)
            self.exit_code = 128 + signum
            raise SystemExit(self.exit_code)
        self.stop_signal, self.stop_signal_at = name, time.monotonic()
        logger.warning("received %s: finishing the current optimizer step, then saving and exiting", name)

    def _extra_state(self, epoch: int, batch: int) -> dict[str, Any]:
        """Our checkpoint keys (``timesformer_harness.train_state``); every rank's RNG states and quarantine entries are
        gathered (a collective: all ranks call it), and only the entries found before (``epoch``, ``batch``) are
        kept."""
        states = all_gather_objects(self._train_loader.quarantine.state() if self._train_loader is not None
                                    else self.bad_videos)
        merged = Quarantine(0)  # every rank's entries found before this position (the later ones are found again)
        merged.merge(states)
        kept = merged.state_before(epoch, batch)
        planned = getattr(self._train_loader, "planner", None)
        quarantined = {e["path"] for e in kept}  # their planned facts, for a resume whose check now refuses them
        facts = {v.path: [v.frames, v.fps, v.height, v.width] for v in (planned.videos if planned else ())
                 if v.path in quarantined}
        return {"scaler": self.scaler.state_dict(), "rng": all_gather_objects(rng_state(self.device)),
                "scheduler": {"policy": self.cfg.solver.lr_policy,
                              "lr": self.optimizer.param_groups[0]["lr"]},
                "world_size": self.info.world_size, "batch_size": self.cfg.data.batch_size,
                "seed": self.cfg.train.seed, "optimizer_impl": self.optimizer_impl,
                "quarantine": kept, "quarantined_videos": facts, "data": self._data_fingerprint(), "best": self.best,
                "epoch_partial": self.epoch_partial if batch else None}

    def _data_fingerprint(self) -> dict[str, Any] | None:
        """The train loader's usable videos (``data_fingerprint``); None for a loader that reads no files."""
        planner = getattr(self._train_loader, "planner", None)
        return None if planner is None else data_fingerprint([(v.path, v.label) for v in planner.videos])

    def _check_resumed_data(self, loader: Any) -> Any:
        """The train loader (built without a resume offset) to go on with after a resume: ``loader`` when the usable
        videos are those the checkpoint was written with; otherwise an error (``train.on_data_change=error``) or, with
        ``replan``, ``loader`` with the interrupted epoch started again from its first batch."""
        if self.resumed_from is None or self.resumed_from[1] is None:
            return loader
        path, before = self.resumed_from
        now = self._data_fingerprint()
        if now == before:
            return loader
        where = f"batch {self.start_batch} of epoch {self.start_epoch + 1}" if self.start_batch else \
            f"epoch {self.start_epoch + 1}"
        if now is None:  # a loader that reads no files (data.loader=synthetic) in place of the checkpoint's videos
            change = f"{before['videos']} usable videos when {path.name} was written, none now: " \
                     f"data.loader={self.cfg.data.loader} reads no videos"
        elif before["videos"] == now["videos"]:
            change = f"{now['videos']} usable videos, but not the same ones or labels or order as when {path.name} " \
                     "was written"
        else:
            change = f"{before['videos']} usable videos when {path.name} was written, {now['videos']} now"
        if self.cfg.train.on_data_change == "error" and now is None:
            raise RunFolderError(
                f"the train data changed since {path} ({change}): resuming at {where} would train this run on "
                "other data. Put data.loader back to the checkpoint's loader, or set train.on_data_change=replan "
                "to go on with these clips, or train in a new output.dir")
        if self.cfg.train.on_data_change == "error":
            raise RunFolderError(
                f"the train manifest changed since {path} ({change}): resuming at {where} would not continue the "
                "same run. Restore the manifest, or set train.on_data_change=replan to start that epoch again from "
                "its first batch with the new list, or train in a new output.dir")
        logger.warning("the train manifest changed since %s (%s): train.on_data_change=replan, epoch %d starts again "
                       "from its first batch", path, change, self.start_epoch + 1)
        self.metrics.log({"event": "data_changed", "checkpoint": str(path), "before": before, "now": now,
                          "epoch": self.start_epoch + 1}, self.step)
        self.start_batch = 0
        return loader

    def save(self, epoch: int, batch: int) -> Path | None:
        extra = self._extra_state(epoch, batch)
        path = None
        if self.info.is_main:
            try:
                path = self.ckpt.save(self.model, self.optimizer, epoch=epoch, batch=batch, step=self.step,
                                      cfg_yaml=self.cfg_yaml, extra=extra)
            except CheckpointWriteError:
                if self.exit_code is not None:  # a second signal stopped the write (torch reports it as a failure)
                    raise SystemExit(self.exit_code) from None
                raise
        barrier()
        return path

    # ----------------------------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Run the remaining epochs. Returns the process exit code (0 also after a signal-triggered stop). The run
        folder's lock is released when it returns or raises."""
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> int:
        cfg = self.cfg
        if self.pending_validation is not None:  # the last launch stopped after saving the epoch, before validating it
            logger.info("epoch %d was saved but not validated before the last launch stopped: validating it now",
                        self.pending_validation + 1)
            self._keep_best(self.pending_validation, self.validate(self.pending_validation)["top1"],
                            self.resumed_from[0] if self.info.is_main and self.resumed_from else None)
        if self.start_epoch >= cfg.solver.max_epoch:
            logger.info("nothing to do: the run in %s already finished %d epochs", self.run_dir, self.start_epoch)
            if not logged_end(self.run_dir / "metrics.jsonl"):  # the last launch stopped in its final validation
                self._log_end(total_s=None, steady_clips_per_s=None, preflight_rejected=None)
            self.metrics.close()
            return 0
        # after a resume the loader is checked against the checkpoint's data before its offset is set: with another
        # manifest that offset may not exist
        checked = self.resumed_from is not None and self.resumed_from[1] is not None
        loader = self._check_resumed_data(self._build_loader("train", 0 if checked else self.start_batch))
        if checked:
            loader.start_batch = self.start_batch
        self.epoch_batches(loader)  # an accumulation the epoch cannot hold fails before the start record
        if self._val_loader is None and any(map(self._validation_due, range(self.start_epoch, cfg.solver.max_epoch))):
            self._val_loader = self._build_loader("val")  # its pre-flight check now, not epochs into the run
        # after the train loader's pre-flight check: Ctrl-C during that check stops it at once (KeyboardInterrupt, exit
        # 130), and its caches keep what it checked
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.metrics.log({"event": "start", "epoch": self.start_epoch + 1, "batch": self.start_batch,
                          "optimizer": self.optimizer_impl, "precision": precision_name(self.dtype),
                          "world_size": self.info.world_size, "accumulation": self.accum,
                          "clips_per_epoch": loader.num_clips, "loader": loader_facts(loader)}, self.step)
        run_clock = Stopwatch()
        try:
            for epoch in range(self.start_epoch, cfg.solver.max_epoch):
                start = self.start_batch if epoch == self.start_epoch else 0
                if epoch != self.start_epoch and self.start_batch:  # the resumed epoch's loader skipped batches
                    loader, self.start_batch = self._build_loader("train", 0), 0
                stop, next_batch = self.train_epoch(loader, epoch, start)
                if stop and next_batch:  # the epoch's last batch too: its record and validation come on resume
                    return self._report_stop(self.save(epoch, next_batch))
                saving = (epoch + 1) % cfg.train.checkpoint_period == 0 or epoch + 1 == cfg.solver.max_epoch
                # saved before validation: a stop or a kill during a long validation loses none of the epoch's
                # training (a resume runs the validation that did not finish)
                path = self.save(epoch + 1, 0) if saving else None
                top1 = self.validate(epoch)["top1"] if self._validation_due(epoch) else None
                # a stop after the last epoch's checkpoint and validation: the run is complete, and ends as such
                stopping = epoch + 1 < cfg.solver.max_epoch and self._agreed_stop()
                if stopping and not saving:
                    path = self.save(epoch + 1, 0)
                if saving or stopping:
                    self._keep_best(epoch, top1, path)
                if stopping:
                    return self._report_stop(path)
            steady = self.steady.take()
            self._log_end(total_s=round(run_clock.elapsed(), 2),
                          steady_clips_per_s=steady["clips_per_s"] if steady["steps"] else None,
                          preflight_rejected=len(loader.rejected))
            logger.info("training done: %d epochs, %d steps, %.1f s", cfg.solver.max_epoch, self.step,
                        run_clock.elapsed())
        finally:
            self.metrics.close()
            self.hooks.close()
            for sig, handler in previous.items():  # the handlers held this Trainer (and its DDP) alive
                signal.signal(sig, handler)
        return 0

    def _log_end(self, total_s: float | None, steady_clips_per_s: float | None,
                 preflight_rejected: int | None) -> None:
        """The run's ``end`` record: every rank's weight digest (they must agree), this launch's time and steady
        clips/s, the videos left out (None: not known to this launch)."""
        digests = all_gather_objects(param_digest(self.model))
        self.metrics.log({"event": "end", "param_digests": digests, "time/total_s": total_s,
                          "time/steady_clips_per_s": steady_clips_per_s,
                          "data/quarantined": len({e["path"] for e in self.bad_videos}),
                          "data/preflight_rejected": preflight_rejected}, self.step)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks ended with different weights: {digests}")

    def _report_stop(self, path: Path | None) -> int:
        """Log and print the stop (all ranks call it together: a collective); returns the exit status, 128 + the
        signal's number on every rank (130 for SIGINT, 143 for SIGTERM), so that what runs after a stopped run (a
        shell's ``&&``, a scheduler's dependency) does not take it for a finished one."""
        gathered = all_gather_objects((self.stop_signal, str(path) if path else None))
        first = next(((rank, name) for rank, (name, _) in enumerate(gathered) if name), None)
        path = path or next((Path(p) for _, p in gathered if p), None)  # rank 0 writes it
        by = self.stop_signal or (f"{first[1]} on rank {first[0]}" if first else "a signal on another rank")
        reason = f"signal {self.stop_signal}" if self.stop_signal else by
        self.metrics.log({"event": "stop", "reason": reason, "checkpoint": str(path) if path else None}, self.step)
        logger.warning("stopped by %s after step %d; rerun the same command to resume", by, self.step)
        if self.info.is_main:
            print(f"stopped by {by}: saved {path}; rerun the same command to resume", flush=True)
        leave_for_torchrun(f"stopped by {by}: saved {path}; rerun the same command to resume")  # its summary's line
        name = self.stop_signal or (first[1] if first else None)
        return 128 + signal.Signals[name].value if name else int(ExitCode.INTERRUPTED)

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (a collective)."""
        return read_back(all_reduce_sum(device_values([float(flag)], self.device)))[0] > 0

    def _agreed_stop(self) -> bool:
        return self._any_rank(self.stop_signal is not None)

    def _merge_bad_videos(self, loader: Any) -> Quarantine:
        """Every rank's quarantine merged into ``loader.quarantine`` (a collective) and kept in ``rejected.csv``
        (rank 0)."""
        bad = loader.quarantine
        bad.merge(all_gather_objects(bad.state()))
        self.bad_videos = bad.state()
        if self.info.is_main and (bad.entries or loader.rejected):
            write_rejected(self.run_dir / "rejected.csv", loader.rejected, bad.entries)
        elif self.info.is_main:  # an earlier attempt's list, whose videos this run (resumed before them) did not reject
            (self.run_dir / "rejected.csv").unlink(missing_ok=True)
        return bad

    def _agree_on_bad_video(self, loader: Any, epoch: int, batch: int, got: Any) -> None:
        """Stop every rank when any rank's loader stopped on a bad video instead of giving batch ``batch`` (``got``
        is the ``BadVideoError`` there); a collective."""
        failed = isinstance(got, BadVideoError)
        if self._any_rank(failed):
            self._stop_on_bad_video(loader, epoch, batch, got if failed else None)

    def _stop_on_bad_video(self, loader: Any, epoch: int, batch: int, error: BadVideoError | None) -> NoReturn:
        """Stop every rank (all call it, after agreeing at an all-reduce): one rank's loader raised ``error`` (None
        on the others). The list goes to ``rejected.csv``, the first failing rank's message to every rank's error."""
        messages = all_gather_objects(str(error) if error is not None else None)
        logger.error("stopping every rank at epoch %d batch %d: rank(s) %s stopped on a bad video", epoch + 1, batch,
                     [r for r, m in enumerate(messages) if m])
        bad = self._merge_bad_videos(loader)
        self.metrics.log({"event": "bad_video_stop", "epoch": epoch + 1, "batch": batch,
                          "data/quarantined": len(bad)}, self.step)
        self.metrics.log({"event": "stop", "reason": "bad videos", "epoch": epoch + 1, "batch": batch}, self.step)
        first = next(m for m in messages if m)
        raise BadVideoError(f"{first}\nevery video left out is listed in {self.run_dir / 'rejected.csv'}") from error

    def epoch_batches(self, loader: Any) -> int:
        """The batches per rank an epoch of ``loader`` runs (``train.max_steps_per_epoch`` caps them); ValueError
        when they cannot make one optimizer step of the accumulation."""
        return step_batches(self.cfg, len(loader), self.accum)

    def train_epoch(self, loader: Any, epoch: int, start: int) -> tuple[bool, int]:
        """One epoch from batch ``start``. Returns (stop requested, the batch to resume at: after a stop the next
        one, the epoch's length when the stop came after its last; 0 when the epoch is complete)."""
        cfg, info = self.cfg, self.info
        loader.set_epoch(epoch)
        n = self.epoch_batches(loader)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cpu":  # freed memory kept from before (a checkpoint, validation) is not this epoch's
            release_freed_memory()
        self.memory.reset()  # the first window starts here, not at the checkpoint or validation before it
        mixing = cfg.solver.mixup_alpha > 0 or cfg.solver.cutmix_alpha > 0
        clips_per_iter = cfg.data.batch_size * info.world_size
        bar = None
        if info.is_main and sys.stderr.isatty():  # a log file (torchrun, SLURM) gets _log_window's lines instead
            from tqdm import tqdm

            bar = tqdm(total=n, initial=start, desc=f"epoch {epoch + 1}/{cfg.solver.max_epoch}", dynamic_ncols=True,
                       leave=False, file=sys.stderr)
        # the sums of the epoch so far: a resumed epoch's from its checkpoint (clips and correct ones all ranks'
        # totals, counted once, on rank 0), else zero
        partial, self.epoch_partial = (self.epoch_partial if start else None) or {}, None
        # the loss summed per clip (each micro-batch's mean loss times its clips), as the top-1 is counted per clip
        loss_sum = partial.get("loss_clip_sum", 0.0) if info.is_main else 0.0
        seen = partial.get("seen", 0.0) if info.is_main else 0.0
        # read at the epoch's end, not per step
        correct = torch.full((), partial.get("correct", 0) if info.is_main else 0, dtype=torch.int64,
                             device=self.device)
        # the log window: steps, clips, data wait; its losses
        window, window_loss = ThroughputWindow(), list(partial.get("window_loss", []))
        # The epoch's first optimizer steps (a cold loader, allocator growth, autotuning, compilation) are a window
        # of their own, logged as warm-up; the steady clips/s leaves them out.
        warmup_iters = min(self.accum * cfg.train.warmup_steps, n - start)
        warming = warmup_iters > 0
        # the micro-batches up to the epoch's last optimizer step; those after it (fewer than one step) are left
        # over, and go into the epoch's last train record, logged at its end with that step's learning rate
        last_step_at = n - (n - start) % self.accum
        stop = False
        # The next batch is fetched right after each forward, before the step's all-reduce, so that a rank whose
        # loader stopped on a bad video tells the others there and all stop together; the first batch is agreed on
        # here (a rank that skipped a step would leave the others waiting in a collective).
        batches = _until_bad_video(iter(loader))
        iteration = Stopwatch()  # lap() = one iteration, its batch's fetch included
        batch = next(batches, None) if start < n else None
        fetch_s = iteration.elapsed()
        self._agree_on_bad_video(loader, epoch, start, batch)
        for i in range(start, n):
            assert batch is not None, f"the loader ended after {i} of {n} batches"
            self.hooks.on_batch(epoch, i, batch, warmup=warming)
            lr = lr_at(cfg.solver, epoch + i / n)
            set_lr(self.optimizer, lr)
            sync = (i + 1 - start) % self.accum == 0  # from the resumed batch: its accumulation may have changed
            on_device = batch.to(self.device)  # the loaders deliver on the device already; a no-op then
            video, labels = on_device.video, on_device.label
            targets = None
            if mixing:
                video, targets = mix_batch(video, labels, cfg.model.num_classes, cfg.solver.mixup_alpha,
                                           cfg.solver.cutmix_alpha, cfg.solver.label_smoothing)
            no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
            with no_sync:
                logits, loss = self.train_step.forward(video, labels, targets)
                loss = self.hooks.on_loss(loss, self.step, first_micro_batch=(i - start) % self.accum == 0)
                fetch = Stopwatch()
                batch = next(batches, None) if i + 1 < n else None
                next_fetch_s = fetch.elapsed()
                failed = isinstance(batch, BadVideoError)
                loss_val, any_stop, any_failed = self._exchange(loss, self.stop_signal is not None, failed)
                if any_failed:
                    self._stop_on_bad_video(loader, epoch, i + 1, batch if failed else None)
                stop = stop or any_stop
                if not math.isfinite(loss_val):
                    self._fail_non_finite(loss_val, epoch, i)
                self.train_step.backward(loss, self.accum)
            if sync:
                self.train_step.optimizer_step()
                self.step += 1
                self.hooks.on_optimizer_step(self.step)
            loss_sum += loss_val * labels.numel()
            if not mixing:
                correct += (logits.detach().argmax(-1) == labels).sum()
            seen += labels.numel()
            window.add(clips_per_iter, fetch_s, iteration.lap())
            window_loss.append(loss_val)
            fetch_s = next_fetch_s
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.3g}",
                                clips_s=f"{window.clips / max(window.total_s, 1e-9):.1f}",
                                data=f"{100 * window.wait_s / max(window.total_s, 1e-9):.0f}%")
            if warming and i + 1 - start == warmup_iters and not i + 1 == last_step_at < n:
                self._log_window(window, window_loss, lr, epoch, warmup=True)
                warming = False
            elif sync and self.step % cfg.train.log_period == 0 and not i + 1 == last_step_at < n:
                self._log_window(window, window_loss, lr, epoch, warmup=warming)
            if sync and stop:
                if bar is not None:
                    bar.close()
                loss_all, clips, right = self._epoch_totals(loss_sum, seen, correct)
                self.epoch_partial = {"loss_clip_sum": loss_all, "seen": clips, "correct": int(right),
                                      "window_loss": list(window_loss)}
                return True, i + 1
        if bar is not None:
            bar.close()
        if window.steps:
            self._log_window(window, window_loss, lr_at(cfg.solver, epoch + (last_step_at - 1) / n), epoch,
                             warmup=warming)
        loss_total, seen_total, correct_total = self._epoch_totals(loss_sum, seen, correct)
        record = {"event": "epoch", "epoch": epoch + 1, "train/loss": loss_total / max(seen_total, 1),
                  "lr": lr_at(cfg.solver, epoch + (last_step_at - 1) / n)}
        if not mixing:
            record["train/top1"] = 100.0 * correct_total / max(seen_total, 1)
        bad = self._merge_bad_videos(loader)
        record["data/quarantined"] = len(bad)
        record["data/quarantined_epoch"] = len({e.path for e in bad.entries if e.epoch == epoch})
        self.metrics.log(record, self.step)
        logger.info("epoch %d/%d: loss %.4f%s, lr %.3g, step %d%s", epoch + 1, cfg.solver.max_epoch,
                    record["train/loss"], f", train top-1 {record['train/top1']:.1f}%" if not mixing else "",
                    record["lr"], self.step,
                    f"; {len(bad)} video(s) quarantined so far (rejected.csv)" if bad else "")
        try:
            bad.check_budget()  # every rank holds the merged list, so all stop here together
        except BadVideoError as e:
            self.metrics.log({"event": "bad_video_stop", "epoch": epoch + 1, "batch": n,
                              "data/quarantined": len(bad)}, self.step)
            self.metrics.log({"event": "stop", "reason": "bad videos", "epoch": epoch + 1, "batch": n}, self.step)
            raise type(e)(f"{e}\nevery video left out is listed in {self.run_dir / 'rejected.csv'}") from None
        return stop, 0

    def _epoch_totals(self, loss_sum: float, seen: float, correct: torch.Tensor) -> list[float]:
        """The epoch's sums over every rank (a collective): losses, clips and correct ones."""
        totals = torch.cat([device_values([loss_sum, seen], self.device, torch.float64), correct.double().reshape(1)])
        return read_back(all_reduce_sum(totals))

    def _exchange(self, loss: torch.Tensor, stop: bool, failed: bool) -> tuple[float, bool, bool]:
        """The micro-batch's one host-device sync, in one small all-reduce: the mean loss over ranks (for the log
        and the non-finite check on every rank), whether any rank was asked to stop (all stop after the same
        optimizer step) and whether any rank's next batch met a bad video (all stop together). The flags go to the
        device from pinned memory without waiting; the one wait is reading the result back."""
        flags = device_values([float(stop), float(failed)], self.device)
        stats = torch.cat([loss.detach().float().reshape(1), flags])
        total, stops, fails = read_back(all_reduce_sum(stats))
        return total / self.info.world_size, stops > 0, fails > 0

    def _log_window(self, window: ThroughputWindow, losses: list[float], lr: float, epoch: int,
                    warmup: bool = False) -> None:
        """Log the window's loss, clips/s and data-wait share and memory peak; the next window begins. A warm-up
        window (``train.warmup_steps``) is marked ``time/warmup`` and left out of the run's steady clips/s."""
        if not window.steps:
            return
        steps = window.take()
        if not warmup:
            self.steady.add(steps["clips"], 0.0, steps["seconds"])
        record = {"event": "train", "epoch": epoch + 1, "train/loss": sum(losses) / len(losses), "opt/lr": lr,
                  "time/clips_per_s": steps["clips_per_s"],
                  "time/frames_per_s": steps["clips_per_s"] * self.cfg.data.num_frames,
                  "time/data_wait_pct": 100.0 * steps["data_wait_share"], "time/warmup": warmup}
        losses.clear()
        syncs = self.hooks.take_sync_counts()
        if syncs:
            record.update({"debug/syncs_per_micro_batch": sum(syncs) / len(syncs),
                           "debug/syncs_per_micro_batch_max": max(syncs)})
        record.update(self._memory_peak())
        self.metrics.log(record, self.step)
        if self.info.is_main and not sys.stderr.isatty():
            logger.info("epoch %d/%d step %d%s: loss %.4f, lr %.3g, %.1f clips/s, data wait %.0f%%", epoch + 1,
                        self.cfg.solver.max_epoch, self.step, " (warm-up)" if warmup else "", record["train/loss"],
                        lr, record["time/clips_per_s"], record["time/data_wait_pct"])

    def _memory_peak(self, prefix: str = "") -> dict[str, float]:
        """``memory/{prefix}peak_cuda_allocator_gib`` (CUDA) or ``memory/{prefix}peak_rss_gib`` (CPU): the peak since
        the last call (or ``self.memory.reset()``); {} where not measurable."""
        peak = self.memory.take()
        return {} if peak is None else {f"memory/{prefix}peak_{peak.kind}_gib": peak.peak / 2**30}

    def _fail_non_finite(self, loss_val: float, epoch: int, batch: int) -> None:
        path = None
        if self.info.is_main:
            path = self.ckpt.save_debug(self.model, step=self.step, cfg_yaml=self.cfg_yaml,
                                        extra={"position": {"epoch": epoch, "batch": batch}})
        self.metrics.log({"event": "non_finite_loss", "loss": str(loss_val), "epoch": epoch + 1, "batch": batch},
                         self.step)
        self.metrics.log({"event": "stop", "reason": "non-finite loss", "epoch": epoch + 1, "batch": batch,
                          "checkpoint": str(path) if path else None}, self.step)
        saved = list_checkpoints(self.ckpt.dir)
        rerun = f"resumes from {saved[-1].name}" if saved else "starts again (no checkpoint was saved before)"
        message = (f"loss is {loss_val} at step {self.step} (epoch {epoch + 1}, its batch {batch + 1}); weights "
                   f"before this step saved to {path or 'rank 0 debug checkpoint'}. Lower solver.base_lr, set "
                   "solver.grad_clip, or use train.precision=fp32 / bf16 instead of fp16: the same command with that "
                   f"change {rerun}")
        raise NonFiniteLossError(message)

    def _validation_due(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` ends with a validation (``train.eval_period``, and always the last epoch)."""
        every = self.cfg.train.eval_period
        return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == self.cfg.solver.max_epoch)

    def _keep_best(self, epoch: int, top1: float | None, path: Path | None) -> None:
        """0-based ``epoch``, whose end is saved (``path`` on rank 0), validated at ``top1``: when that is the best so
        far, ``best`` points at the checkpoint, and the one it pointed at before is pruned unless among the last
        ``train.keep_last``."""
        if top1 is None or (self.best["top1"] is not None and top1 <= self.best["top1"]):
            return
        self.best = {"top1": top1, "epoch": epoch + 1}
        if path is not None:
            self.ckpt.point("best", path)
            self.ckpt.prune()

    def validate(self, epoch: int) -> dict[str, Any]:
        """Multi-view accuracy on the val split (a loader built once, reused)."""
        if self._val_loader is None:
            self._val_loader = self._build_loader("val")
        self._val_loader.set_epoch(epoch)  # what it quarantines is logged as found in this epoch's validation
        clock = Stopwatch()
        self.memory.reset()  # validation's own peak, logged apart from the training windows
        acc = score_loader(self.model, self._val_loader, self.device, self.dtype, self.cfg.test.ensemble,
                           progress=f"validate epoch {epoch + 1}" if self.info.is_main else "")
        memory = self._memory_peak("val_")
        if self.device.type == "cpu":  # what validation freed goes back, so the next training window reads its own
            release_freed_memory()
            self.memory.reset()
        views = self.cfg.data.num_ensemble_views * self.cfg.data.num_spatial_crops
        try:
            report = accuracy_report(acc, self.cfg.model.num_classes, None, class_names_for(self.cfg, "val"))
        except BadVideoError as e:  # data.on_bad_video=skip and every view failed: no score this time, training goes on
            logger.warning("epoch %d val: %s", epoch + 1, e)
            self.metrics.log({"event": "val", "epoch": epoch + 1, "val/top1": None,
                              "val/unscored_views": len(acc.unscored), **memory}, self.step)
            return {"top1": None}
        report.update({"epoch": epoch + 1, "step": self.step, "seconds": round(clock.elapsed(), 2),
                       "views_per_video": views})
        self.metrics.log({"event": "val", "epoch": epoch + 1, "val/top1": report["top1"], "val/top5": report["top5"],
                          "val/mean_class_accuracy": report["mean_class_accuracy"] or 0.0,
                          "val/unscored_views": report["num_unscored_views"], **memory}, self.step)
        if self.info.is_main:
            (self.run_dir / "last_val.json").write_text(json.dumps(report, indent=2) + "\n")
        logger.info("epoch %d val: top-1 %.2f%%, top-5 %s over %d videos (%.1f s)", epoch + 1, report["top1"],
                    fmt_percent(report["top5"], TOP5_NONE), report["num_videos"], report["seconds"])
        return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harness/train.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (configs/exp/*.yaml)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too (as "
                        "TIMESFORMER_DEBUG=1 does)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. solver.base_lr=0.01")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train; returns the exit status (``timesformer_harness.common.ExitCode``). A mistake in the config or its data,
    a refused checkpoint, bad videos over the budget and a busy run folder are one ``error:`` line each."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return report_error(e, ExitCode.CONFIG, args.debug)
    setup_logging()  # rank from torchrun's RANK
    retain_freed_memory()
    info = init_distributed(cfg.dist)
    try:
        code = Trainer(cfg, info).fit()
        if code > 128:  # stopped on a signal, saved: torchrun, which signals a job's other ranks once one has exited
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nonzero, finds this one exiting 143 (the Trainer's handler
            # took that SIGTERM until fit() returned; a Python handler is reset as the interpreter finalizes)
        return code
    except CheckpointError as e:  # model.pretrained (or a resumed file) missing, refused or unreadable
        return report_error(e, ExitCode.CHECKPOINT, args.debug)
    except BadVideoError as e:  # data.on_bad_video=error, or more bad videos than data.max_bad_fraction
        return report_error(e, ExitCode.BAD_VIDEOS, args.debug)
    except RunFolderError as e:  # output.dir held by another run, or the data changed under a resume
        return report_error(e, ExitCode.RUN_FOLDER, args.debug)
    except NonFiniteLossError as e:  # every rank sees the same loss (all-reduced) and stops at the same step
        return report_error(e, ExitCode.ERROR, args.debug)
    except (ValueError, FileNotFoundError) as e:  # raised for what a user sets: the message names the key or file
        return report_error(e, ExitCode.CONFIG, args.debug)
    except KeyboardInterrupt as e:  # before fit() handles SIGINT itself: no checkpoint was saved
        return report_error(e, ExitCode.INTERRUPTED, args.debug,
                            message="interrupted before training started (no checkpoint; the pre-flight check's "
                                    "cache keeps the videos it checked): rerun the command")
    except Exception as e:  # a lost peer (the rank that stopped first reported the cause), else raised again
        return report_unexpected(e, info.rank, args.debug)
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
