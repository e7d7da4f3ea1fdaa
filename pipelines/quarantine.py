"""Videos that fail while decoding: the quarantine list, its rules, and ``rejected.csv``.

The pre-flight check (``timesformer_harness.pipelines.validate``) reads headers and packet counts; damage inside the
coded stream only shows when a decoder reaches it. ``timesformer_harness.pipelines.base.ClipLoader`` then finds the clip
that failed (its decoder tries each suspect alone), records it here, and completes the batch without it. The rules live
in ``Quarantine``:

* exclusion (what makes a resumed run replay the same batches): a decision at batch ``b`` of epoch ``e`` on rank
  ``r`` sees every entry of an earlier epoch (all ranks' entries, merged at each epoch's end) and ``r``'s own
  entries of epoch ``e`` up to batch ``b``. A checkpoint stores every entry found before its position; the later
  ones are found again, at the same batches, by the same decodes.
* ``data.on_bad_video: error``: the first failure raises ``BadVideoError`` naming the file.
* the budget ``data.max_bad_fraction``: more quarantined videos than ``floor(fraction * usable videos)`` raise
  ``TooManyBadVideos`` listing them (a damaged dataset, a wrong mount, a decoder bug should stop a run, not thin
  it out). Evaluation has no budget: it reports the views it could not score (``UnscoredView``).

Entries are plain types (``BadVideo``), so they go into a checkpoint read with ``torch.load(weights_only=True)``
and into a CSV row as they are.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    import torch

    from timesformer_harness.pipelines.sampling import ClipPlan

logger = logging.getLogger(__name__)


class BadVideoError(RuntimeError):
    """A video failed while decoding and the run must stop (``data.on_bad_video=error``, or the budget)."""


class TooManyBadVideos(BadVideoError):
    """More videos failed while decoding than ``data.max_bad_fraction`` allows."""


class ClipDecodeError(RuntimeError):
    """One clip could not be decoded (a loader's ``_decode_unit``); the message is the decoder's reason."""


@dataclass(frozen=True)
class BadVideo:
    """A video left out because it failed while decoding: where (0-based epoch and batch, rank) and why."""

    path: str
    reason: str
    epoch: int
    batch: int
    rank: int = 0


@dataclass(frozen=True)
class UnscoredView:
    """An evaluation view that could not be decoded, so it is left out of the video's score."""

    index: int  # video index in the manifest
    path: str
    view: int  # temporal_clip * num_spatial_crops + spatial_crop
    reason: str


@dataclass
class FailedBatch:
    """What a loader's ``_batches`` yields for a batch it could not make.

    Args:
        plans: the batch's clip plans.
        clips: the clips it did decode, slot -> (3, T, S, S).
        errors: slot -> reason of the clips that failed; None when the decoder cannot tell which one failed
            (DALI: the whole batch raises), so every slot is a suspect.
        cause: the batch-level error, for the log.
    """

    plans: list[ClipPlan]
    clips: dict[int, torch.Tensor] = field(default_factory=dict)
    errors: dict[int, str] | None = None
    cause: str = ""


def failure_reason(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (a ClipDecodeError's message alone), cut to ``limit`` characters."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    return (text if isinstance(e, ClipDecodeError) else f"{type(e).__name__}: {text}")[:limit]


class Quarantine:
    """The videos this rank knows to fail at run time, with the rules that use them (see the module docstring).

    Args:
        num_videos: usable videos after the pre-flight check (the budget's base).
        rank: this process's rank (entries it adds carry it).
        on_bad_video: ``error`` (the first failure raises) or ``skip``.
        max_bad_fraction: the budget as a fraction of ``num_videos``; None = no budget (evaluation).
        entries: known entries (from a checkpoint), as ``BadVideo`` or their ``asdict`` form.
    """

    def __init__(self, num_videos: int, *, rank: int = 0, on_bad_video: str = "skip",
                 max_bad_fraction: float | None = 0.01, entries: Iterable[BadVideo | dict[str, Any]] = ()) -> None:
        self.num_videos, self.rank, self.on_bad_video = num_videos, rank, on_bad_video
        self.max_bad_fraction = max_bad_fraction
        self.limit = None if max_bad_fraction is None else math.floor(max_bad_fraction * num_videos + 1e-9)
        self.entries: list[BadVideo] = [e if isinstance(e, BadVideo) else BadVideo(**e) for e in entries]
        self._named = {(e.path, e.epoch) for e in self.entries}  # (path, epoch) said in the log

    def __len__(self) -> int:
        """Distinct videos quarantined."""
        return len(self.paths())

    def paths(self) -> set[str]:
        return {e.path for e in self.entries}

    def excluded(self, epoch: int, batch: int) -> set[str]:
        """Paths a decision at ``batch`` of ``epoch`` on this rank leaves out (``batch=-1``: the epoch's plan)."""
        return {e.path for e in self.entries
                if e.epoch < epoch or (e.epoch == epoch and e.rank == self.rank and e.batch <= batch)}

    def add(self, entry: BadVideo) -> None:
        """Record a failure; raises ``BadVideoError`` under ``on_bad_video=error`` and ``TooManyBadVideos`` past the
        budget (the entry is recorded first, so the caller's report lists it)."""
        # an evaluation's other views of a video that failed in this pass: said once a pass
        again = (entry.path, entry.epoch) in self._named
        self._named.add((entry.path, entry.epoch))
        self.entries.append(entry)
        where = f"epoch {entry.epoch + 1}, batch {entry.batch}, rank {entry.rank}"
        if self.on_bad_video == "error":
            raise BadVideoError(
                f"{entry.path} failed to decode ({where}): {entry.reason}\n"
                f"data.on_bad_video=error stops at the first bad video: fix or remove it (python -m "
                f"timesformer_harness.pipelines.validate MANIFEST --deep finds such files before a run), or set "
                f"data.on_bad_video=skip to leave bad videos out and go on")
        if self.limit is None:
            (logger.debug if again else logger.warning)("left out %s (%s): %s", entry.path, where, entry.reason)
            return
        logger.warning("left out %s (%s): %s; %d of at most %d bad videos (data.max_bad_fraction=%g)", entry.path,
                       where, entry.reason, len(self), self.limit, self.max_bad_fraction)
        self.check_budget()

    def check_budget(self) -> None:
        """Raise ``TooManyBadVideos`` with the list when more videos are quarantined than the budget allows."""
        n = len(self)
        if self.limit is None or n <= self.limit:
            return
        first: dict[str, BadVideo] = {}
        for e in self.entries:
            first.setdefault(e.path, e)
        listing = "\n".join(f"  {e.path}: {e.reason}" for e in list(first.values())[:20])
        more = f"\n  ... and {n - 20} more" if n > 20 else ""
        raise TooManyBadVideos(
            f"{n} of {self.num_videos} videos failed to decode, more than data.max_bad_fraction="
            f"{self.max_bad_fraction:g} allows ({self.limit}):\n{listing}{more}\nthe dataset looks damaged: check it "
            f"with python -m timesformer_harness.pipelines.validate MANIFEST --deep, or raise data.max_bad_fraction")

    def state(self) -> list[dict[str, Any]]:
        """The entries as plain dicts (checkpoint, all_gather)."""
        return [asdict(e) for e in self.entries]

    def state_before(self, epoch: int, batch: int) -> list[dict[str, Any]]:
        """The entries found before position (``epoch``, ``batch``): what a checkpoint saved there holds (later ones
        are found again by the resumed run; keeping them would change the batch they were found in)."""
        return [asdict(e) for e in self.entries if (e.epoch, e.batch) < (epoch, batch)]

    def merge(self, states: Sequence[Sequence[dict[str, Any]]]) -> None:
        """Replace the entries by the union of every rank's ``state()``, in an order that does not depend on the
        rank (so all ranks hold the same list)."""
        unique = {(d["path"], d["epoch"], d["batch"], d["rank"]): d for s in states for d in s}
        self.entries = [BadVideo(**unique[k]) for k in sorted(unique, key=lambda k: (k[1], k[2], k[3], k[0]))]


def write_rejected(path: str | Path, preflight: Sequence[tuple[str, str]],
                   quarantined: Sequence[BadVideo] = ()) -> None:
    """``rejected.csv`` (written atomically): one row per video left out, ``path,reason,stage,epoch,batch,rank``;
    ``stage`` is ``preflight`` (epoch/batch/rank empty) or ``runtime`` (1-based epoch where it first failed)."""
    from timesformer_harness.common import atomic_write_text

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "reason", "stage", "epoch", "batch", "rank"])
    for p, reason in preflight:
        writer.writerow([p, reason, "preflight", "", "", ""])
    first: dict[str, BadVideo] = {}
    for e in quarantined:
        first.setdefault(e.path, e)
    for e in first.values():
        writer.writerow([e.path, e.reason, "runtime", e.epoch + 1, e.batch, e.rank])
    atomic_write_text(path, text.getvalue(), fsync=False)
