"""The training loop's debug and test hooks, kept out of the loop's own code.

``train.record_samples`` writes the video indices of every batch (shard checks), ``train.debug_nan_at_step`` makes
the loss NaN at an optimizer step (the non-finite stop), ``train.debug_signal_at_step`` sends the process SIGTERM
after an optimizer step (the stop-and-resume path), ``train.debug_kill_at_step`` SIGKILLs rank
``train.debug_kill_rank`` after an optimizer step on torchrun's first attempt (the elastic restart path),
``train.count_syncs`` counts the host-device synchronisations of each micro-batch
(``timesformer_harness.counting.SyncCounter``). All are off by default; the loop calls each hook once per batch or
step, and a disabled hook returns at once.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from timesformer_harness.config import TrainConfig
from timesformer_harness.counting import SyncCounter

if TYPE_CHECKING:
    from timesformer_harness.pipelines.base import Batch


class DebugHooks:
    """Args:
        cfg: the ``train`` section (its ``record_samples`` / ``debug_*`` fields).
        run_dir: where ``samples/rank{R}.jsonl`` goes.
        rank: this process's rank; only rank 0 sends the debug signal (the stop flag then reaches the others).
        device: the training device (``train.count_syncs`` counts its synchronisations).
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, rank: int, device: torch.device | str = "cpu") -> None:
        self.syncs = SyncCounter(torch.device(device)).start() if cfg.count_syncs else None
        self._sync_mark: tuple[int, int, int, bool] | None = None  # (epoch, batch, syncs so far, warm-up): last batch
        self._sync_counts: list[int] = []
        self.nan_at_step = cfg.debug_nan_at_step
        self.signal_at_step = cfg.debug_signal_at_step if rank == 0 else -1
        # torchrun counts its restarts in TORCHELASTIC_RESTART_COUNT: a restarted worker replays the step, unkilled
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.kill_at_step = cfg.debug_kill_at_step if rank == cfg.debug_kill_rank and first_attempt else -1
        self.samples_file = None
        if cfg.record_samples:
            (Path(run_dir) / "samples").mkdir(parents=True, exist_ok=True)
            self.samples_file = open(Path(run_dir) / "samples" / f"rank{rank}.jsonl", "a")

    def on_batch(self, epoch: int, batch_idx: int, batch: Batch, warmup: bool = False) -> None:
        """Record the batch's video indices (``train.record_samples``) and the synchronisations of the micro-batch
        before it (``train.count_syncs``: the count from one batch to the next of the same epoch, so each epoch's
        last micro-batch, whose span takes in validation and checkpoints, is not counted; nor are the warm-up
        micro-batches (``warmup``: this batch's micro-batch is one), whose one-time set-up copies would count)."""
        if self.syncs is not None:
            total = self.syncs.count
            mark = self._sync_mark
            if mark is not None and mark[:2] == (epoch, batch_idx - 1) and not mark[3]:
                self._sync_counts.append(total - mark[2])
            self._sync_mark = (epoch, batch_idx, total, warmup)
        if self.samples_file is not None:
            self.samples_file.write(json.dumps({"epoch": epoch, "batch": batch_idx,
                                                "index": batch.index.tolist()}) + "\n")
            self.samples_file.flush()

    def on_loss(self, loss: torch.Tensor, step: int, first_micro_batch: bool) -> torch.Tensor:
        """The loss, made NaN on the first micro-batch of optimizer step ``train.debug_nan_at_step``."""
        if step == self.nan_at_step and first_micro_batch:
            return loss * float("nan")
        return loss

    def on_optimizer_step(self, step: int) -> None:
        """Send this process SIGTERM once optimizer step ``train.debug_signal_at_step`` is done (rank 0), or SIGKILL
        once ``train.debug_kill_at_step`` is (rank ``train.debug_kill_rank``, first attempt)."""
        if step == self.signal_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def take_sync_counts(self) -> list[int]:
        """The synchronisations of each micro-batch counted since the last call (``train.count_syncs``)."""
        counts, self._sync_counts = self._sync_counts, []
        return counts

    def close(self) -> None:
        if self.syncs is not None:
            self.syncs.stop()
            self.syncs = None
        if self.samples_file is not None:
            self.samples_file.close()
