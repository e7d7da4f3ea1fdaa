"""A training run's metrics: one JSON object a line in ``metrics.jsonl``, plus TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from timesformer_harness.metrics import wall_time


def tb_tag(event: str | None, key: str) -> str:
    """The TensorBoard tag of a record's key: the key, but an ``epoch`` record's ``train/*`` (the epoch's means) are
    ``train/epoch_*``, so that they do not land on the log windows' ``train/loss`` curve at the same step."""
    if event == "epoch" and key.startswith("train/"):
        return "train/epoch_" + key.split("/", 1)[1]
    return key


class MetricWriter:
    """``metrics.jsonl`` plus TensorBoard scalars, written by rank 0 only.

    Every record gets ``step`` and a wall-clock ``time``. Numeric values under a namespaced key (``train/loss``,
    ``time/clips_per_s``; booleans as 0/1, ``time/warmup``) also go to TensorBoard (``run_dir/tb``, tags by
    ``tb_tag``); events, strings and lists stay in the JSONL.

    Args:
        run_dir: the run's output directory.
        enabled: False on ranks other than 0 (every call is then a no-op).
        tensorboard: also write TensorBoard event files.
        purge_step: hide the TensorBoard points an earlier launch logged at this step and after (a resume redoes
            that work, whose records ``metrics.jsonl`` drops too); None keeps them all.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge_step)

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": round(wall_time(), 3), **record}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and "/" in key:
                    self.tb.add_scalar(tb_tag(record.get("event"), key), float(value), step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
