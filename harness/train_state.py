"""Training checkpoints: original ``.pyth`` layout plus what an exact resume needs, kept last-K, found again.

Files live in ``{output.dir}/checkpoints/``:
  * ``checkpoint_epoch_{N:05d}.pyth``: written after epoch N (1-based) ends; ``epoch`` inside is N-1 (the
    original's 0-based "epoch just finished"), so the original tools read it as they read their own.
  * ``checkpoint_epoch_{N:05d}_step_{S:08d}.pyth``: written when a run stops inside epoch N (SIGTERM/SIGINT) after
    optimizer step S; ``epoch`` inside is N-2 (the last finished one), our ``position`` says where to go on. Named by
    step, not by batch: a batch index counts batches of one launch's size, and a resume with another batch size or
    rank count would order the files wrongly (an older harness's ``_iter_{I:06d}`` names still load).
  * ``debug_nan_step_{S:08d}.pyth``: the weights at a non-finite loss (never pruned, never resumed from).

Our keys next to the original ``epoch``/``model_state``/``optimizer_state``/``cfg``: ``position`` ({epoch, batch}:
the next batch to run), ``step`` (optimizer steps so far), ``scaler``, ``scheduler``, ``rng`` (every rank's torch,
CUDA, Python and NumPy generator states), ``world_size``, ``seed``, ``quarantine``. Writes are atomic
(``timesformer_harness.checkpoint``).

``quarantine`` holds the videos that failed while decoding (``data.on_bad_video: skip``), every rank's, found before
``position``: ``timesformer_harness.pipelines.quarantine.BadVideo`` as plain dicts (path, reason, 0-based epoch and
batch, rank), so the file loads with ``weights_only=True``. The resumed run's train loader starts from them: it plans
later epochs without those videos and replaces its own where they come up again in the current one, and it finds the
ones after ``position`` again, at the same batches, by the same decodes, so it replays the batches of the uninterrupted
run. Entries found at or after ``position`` are left out on purpose: kept, they would change the batch in which they
were found. ``{output.dir}/rejected.csv`` lists them all (``stage=runtime``), and the ``data.max_bad_fraction`` budget
counts them; see ``timesformer_harness.pipelines.quarantine``.

Which checkpoint a launch continues from (``find_resume``: ``train.resume`` never | auto | must) and which config
changes a resume refuses or warns about (``config_changes``: the architecture, what a clip is, where the videos come
from) are decided here too, before the run folder is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import re
import reprlib
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from timesformer_harness.checkpoint import CheckpointError, load_file, save_pyth
from timesformer_harness.common import atomic_write_text, try_lock

logger = logging.getLogger(__name__)

_NAME = re.compile(r"checkpoint_epoch_(\d{5})(?:_(iter|step)_(\d{6,}))?\.pyth")


class RunFolderError(Exception):
    """The run folder cannot be used as asked: another run holds it, or the data changed under a resume."""


def unwritable(run_dir: str | Path, e: OSError) -> RunFolderError:
    """The error for a run folder that cannot be written (read-only, no permission, a file in the way, a full disk)."""
    return RunFolderError(f"output.dir {run_dir} cannot be written ({e.strerror or e}): give the run a folder it can "
                          "write, output.dir=...")


class RunLock:
    """An exclusive lock on a run folder (``{output.dir}/.lock``), held while the run lives: a second run pointed
    at the same folder fails at once naming the holder (pid, host, start time) instead of interleaving its metrics
    and overwriting its checkpoints. The operating system releases it when the holder dies, however it dies."""

    _held: set[str] = set()  # the lock files this process holds: a second Trainer in it shares its lock

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._key = ""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file, held = try_lock(self.path)
            if not held:
                self._file.seek(0)
                holder = self._file.read().strip() or "another process"
                self._file.close()
                if os.path.realpath(self.path) in RunLock._held:
                    return
                raise RunFolderError(f"output.dir {self.path.parent} is in use by {holder}: wait for that run to end, "
                                     "or give this one its own output.dir=...")
            self._file.seek(0)
            self._file.truncate()
            self._file.write(f"pid {os.getpid()} on {socket.gethostname()}")
            self._file.flush()
        except OSError as e:
            raise unwritable(self.path.parent, e) from None
        self._key = os.path.realpath(self.path)
        RunLock._held.add(self._key)

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            RunLock._held.discard(self._key)


LAUNCH_FILE = ".launch"  # in a run folder: the torchrun launch that last started it (launch_identity)


def launch_identity() -> str:
    """What names this torchrun launch across its restarts ("" outside torchrun): its rendezvous id (``--rdzv-id``;
    a single-node launch without one draws a fresh one), else, for the default id ``none``, its agent (the workers'
    parent) by pid, host and start time."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return ""
    if run_id != "none":
        return f"torchrun rendezvous {run_id}"
    agent = os.getppid()
    try:  # /proc/<pid>/stat: field 22, the start time, 20th after the parenthesised command name
        started = Path(f"/proc/{agent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"torchrun agent pid {agent} on {socket.gethostname()} started {started}"


def started_by_this_launch(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` was last started by this torchrun launch (an earlier attempt of it), by its
    ``LAUNCH_FILE``."""
    identity = launch_identity()
    try:
        return bool(identity) and (Path(run_dir) / LAUNCH_FILE).read_text() == identity
    except OSError:
        return False


# What a resume refuses to change (a changed value would make the checkpoint another model's, its clips other clips,
# or its optimizer state another optimizer's): the architecture, the keys that define a clip, the optimizer. The
# data's sources are refused too unless train.on_data_change=replan (then the fingerprint check decides, as for an
# edited manifest). Other keys are warned, and apply from the resume on.
MODEL_KEYS = tuple(f"model.{k}" for k in ("img_size", "patch_size", "in_chans", "num_classes", "num_frames",
                                           "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                                           "attention_type", "input_channels"))
CLIP_KEYS = tuple(f"data.{k}" for k in ("num_frames", "sampling_rate", "target_fps", "train_jitter_scales",
                                         "train_crop_size", "test_crop_size", "mean", "std", "random_flip",
                                         "inv_uniform_sample", "pad_short", "sampling"))
SOURCE_KEYS = tuple(f"data.{k}" for k in ("format", "root", "train_manifest", "path_prefix", "separator",
                                           "ssv2_labels", "ssv2_suffix"))
OPTIMIZER_KEYS = ("solver.optimizer",)  # SGD's momentum buffers are no AdamW moments
IGNORED_KEYS = ("output.dir", "train.resume")  # where the run is (a moved folder) and how it was started

Change = tuple[str, Any, Any]  # (dotted key, checkpoint's value, this launch's value)
_SHORT = reprlib.Repr()  # a value read from a file, shown cut short (its nesting could be hostile)
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 1, 6, 4, 300, 60


def _pairs(before: Any, after: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, before's value, after's value)`` for every leaf of ``after`` (lists are leaves) that ``before``
    has too. Walks ``after``'s keys only: ``before`` comes from a file, whose aliases could nest without end."""
    pairs = []
    for key, value in after.items():
        if not isinstance(before, dict) or key not in before:
            continue
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            pairs += _pairs(before[key], value, full)
        else:
            pairs.append((full, before[key], value))
    return pairs


def config_changes(before: dict[str, Any], after: dict[str, Any],
                   data_may_change: bool = False) -> tuple[list[Change], list[Change]]:
    """``(refused, warned)``: the keys whose value differs between the checkpoint's config ``before`` and this
    launch's ``after`` (nested dicts, as the YAML loads), split into those a resume refuses (``MODEL_KEYS``,
    ``CLIP_KEYS``, ``OPTIMIZER_KEYS``, and ``SOURCE_KEYS`` unless ``data_may_change``) and the others. A key that only
    one side has (a schema of another version) and ``IGNORED_KEYS`` are left out."""
    refuse = set(MODEL_KEYS + CLIP_KEYS + OPTIMIZER_KEYS + (() if data_may_change else SOURCE_KEYS))
    refused: list[Change] = []
    warned: list[Change] = []
    for key, old, new in sorted(_pairs(before, after), key=lambda change: change[0]):
        if key not in IGNORED_KEYS and old != new:
            (refused if key in refuse else warned).append((key, old, new))
    return refused, warned


def format_changes(changes: list[Change]) -> str:
    """``key old -> new`` for each change, comma-separated (one line; a value from a file is shown cut short)."""
    return ", ".join(f"{key} {_SHORT.repr(old)} -> {_SHORT.repr(new)}" for key, old, new in changes)


def saved_config(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The config a checkpoint of ours was written with (its ``cfg`` YAML, as nested dicts); None when it has none
    this harness can read (an original ``.pyth`` holds a yacs config, whose sections are ``MODEL``, ``SOLVER``, ...:
    no ``model`` section)."""
    text = obj.get("cfg")
    try:
        cfg = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError:
        return None
    return cfg if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) else None


def find_resume(run_dir: str | Path, policy: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a launch with ``train.resume=policy`` continues from, read before the run folder is written.

    ``never``: None, and a ``RunFolderError`` when ``run_dir`` already holds an earlier run's checkpoints or metrics
    (a fresh run would mix with them, and prune them). ``auto``: the newest readable checkpoint, or None when there
    is no checkpoint. ``must``: the newest readable checkpoint, and a ``RunFolderError`` when there is none. Both
    raise a ``RunFolderError`` when there are checkpoints and none can be read: starting over would overwrite them
    and drop the run's metrics.
    """
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir / "checkpoints")
    if policy == "never":
        metrics = run_dir / "metrics.jsonl"
        if found or (metrics.is_file() and metrics.stat().st_size):
            held = f"{len(found)} checkpoint(s), newest {found[-1].name}" if found else "an earlier run's metrics.jsonl"
            raise RunFolderError(f"train.resume=never starts a fresh run, but output.dir {run_dir} holds {held}: give "
                                 f"this run its own output.dir=..., or delete {run_dir} to start over, or continue "
                                 "that run with train.resume=auto")
        return None
    latest = CheckpointManager(run_dir).load_latest() if found else None
    if latest is None and found:
        raise RunFolderError(f"output.dir {run_dir} holds {len(found)} checkpoint(s) and none can be read (newest "
                             f"{found[-1].name}; the warnings above say why): restore them (a copy cut short, a disk "
                             "not mounted?), or move them away to start over there, or give a fresh run its own "
                             "output.dir=...")
    if latest is None and policy == "must":
        raise RunFolderError(f"train.resume=must, but output.dir {run_dir} has no checkpoint to resume from (looked in "
                             f"{run_dir / 'checkpoints'}): check output.dir (a relative path is from the current "
                             f"folder, {Path.cwd()}), or use train.resume=auto to start a fresh run there")
    return latest


def resume_disagreement(found: list[tuple[Any, ...] | None]) -> str | None:
    """Why the ranks cannot go on together (None when they agree): ``found`` holds each rank's resume, (checkpoint
    name, epoch, batch, step) or None, in rank order. Ranks that resumed from different checkpoints (an output.dir
    that is not one folder every node sees) would train different epochs and wait in different collectives."""
    if all(f == found[0] for f in found):
        return None
    views = "; ".join(f"rank {r}: " + ("nothing" if f is None else f"{f[0]} (epoch {f[1]}, batch {f[2]}, step {f[3]})")
                      for r, f in enumerate(found))
    return (f"the ranks found different checkpoints to resume from in output.dir ({views}): output.dir must be one "
            "folder every node sees (a shared filesystem), not a folder of each node's own")


def data_fingerprint(videos: list[tuple[str, int]]) -> dict[str, Any]:
    """What an epoch's clip order is drawn from: the usable videos, in order, with their labels (count and SHA-256).
    A resume compares the checkpoint's with its own: the same batch index means the same clips only if they match."""
    digest = hashlib.sha256(json.dumps(videos).encode()).hexdigest()
    return {"videos": len(videos), "sha256": digest}


def keep_records_up_to(metrics: Path, step: int) -> int:
    """Drop the records of ``metrics`` (``metrics.jsonl``) logged after optimizer step ``step``: the work a resumed
    run redoes from its checkpoint at ``step`` would otherwise be in the file twice; a line cut short by a killed
    writer goes too. Returns how many went."""
    if not metrics.is_file():
        return 0

    def logged_by_then(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:
            return False

    lines = [line for line in metrics.read_text().splitlines(keepends=True) if line.strip()]
    kept = [line for line in lines if line.endswith("\n") and logged_by_then(line)]
    if len(kept) != len(lines):
        atomic_write_text(metrics, "".join(kept))
    return len(lines) - len(kept)


def _records(metrics: Path, event: str) -> list[dict[str, Any]]:
    """The records of ``event`` in ``metrics`` (``metrics.jsonl``), in order; lines that do not parse are left out."""
    found = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


def val_record(metrics: Path, epoch: int) -> dict[str, Any] | None:
    """The last validation record (``event: val``) of 1-based ``epoch`` in ``metrics`` (``metrics.jsonl``), or None."""
    return next((r for r in reversed(_records(metrics, "val")) if r.get("epoch") == epoch), None)


def logged_end(metrics: Path) -> bool:
    """Whether ``metrics`` (``metrics.jsonl``) holds the run's ``end`` record."""
    return bool(_records(metrics, "end"))


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """``checkpoint_epoch_{epoch:05d}.pyth`` at the end of epoch ``epoch`` (1-based), or with ``_step_{step:08d}``
    for a save inside it, after optimizer step ``step``."""
    end = "" if step is None else f"_step_{step:08d}"
    return f"checkpoint_epoch_{epoch:05d}{end}.pyth"


def _order(path: Path) -> tuple[int, int, float]:
    m = _NAME.fullmatch(path.name)
    assert m, path
    if m[2] is None:
        return int(m[1]), 2, 0.0  # the epoch's end: after its mid-epoch saves
    return int(m[1]), 1 if m[2] == "step" else 0, float(m[3])  # an older harness's _iter_ names first


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Regular checkpoints in ``folder``, oldest first (temporary and debug files excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.fullmatch(p.name)), key=_order)


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to ``<name>.damaged`` (``.damaged.2``, ... when taken): kept for a look, but no
    longer listed, resumed from or counted towards ``train.keep_last``. Returns the new path."""
    n = 1
    while (new := path.with_name(f"{path.name}.damaged" + (f".{n}" if n > 1 else ""))).exists():
        n += 1
    os.rename(path, new)
    return new


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's generator states, in types ``torch.load(weights_only=True)`` accepts: the CPU's and, on a CUDA
    ``device``, that GPU's (the one this rank uses: a restarted rank may be given another)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore ``rng_state``'s states; the saved GPU generator goes to ``device`` (a CUDA one), whichever GPU it was
    saved from. (Checkpoints written before held every visible GPU's: that of ``device``'s index is taken.)"""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):
        cuda = cuda[device.index] if device is not None and device.index is not None and device.index < len(cuda) \
            else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


class CheckpointManager:
    """Save, prune and find the checkpoints of one run directory.

    Args:
        run_dir: the run's output directory (checkpoints go to ``run_dir/checkpoints``).
        keep_last: how many regular checkpoints to keep (older ones are deleted after a successful save).
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 3) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        epoch: int,
        batch: int,
        step: int,
        cfg_yaml: str,
        extra: dict[str, Any],
    ) -> Path:
        """Write the checkpoint for "next: batch ``batch`` of epoch ``epoch``" (0-based) and prune old ones.

        ``batch == 0`` is the end of epoch ``epoch - 1``: file ``checkpoint_epoch_{epoch:05d}.pyth``. Otherwise the
        run stopped inside epoch ``epoch``: file ``checkpoint_epoch_{epoch+1:05d}_step_{step:08d}.pyth``.
        """
        if batch == 0:
            path, finished = self.dir / checkpoint_name(epoch), epoch - 1
        else:
            path, finished = self.dir / checkpoint_name(epoch + 1, step), epoch - 1
        payload = {"position": {"epoch": epoch, "batch": batch}, "step": step, **extra}
        save_pyth(path, model, optimizer.state_dict(), epoch=finished, cfg_yaml=cfg_yaml, extra=payload)
        logger.info("saved %s (next: epoch %d batch %d, step %d)", path, epoch, batch, step)
        self.point("last", path)
        self.prune(keep=path)
        return path

    def point(self, name: str, target: Path) -> Path:
        """Make ``{name}.pyth`` (``last``, ``best``) a relative link to ``target`` in the checkpoint folder, replacing
        the old link atomically."""
        link, tmp = self.dir / f"{name}.pyth", self.dir / f".{name}.pyth.link"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(target).name)
        os.replace(tmp, link)
        return link

    def pointed(self, name: str) -> Path | None:
        """The checkpoint ``{name}.pyth`` links to, or None."""
        link = self.dir / f"{name}.pyth"
        return (self.dir / os.readlink(link)) if link.is_symlink() else None

    def save_debug(self, model: torch.nn.Module, *, step: int, cfg_yaml: str, extra: dict[str, Any]) -> Path:
        path = self.dir / f"debug_nan_step_{step:08d}.pyth"
        save_pyth(path, model, None, epoch=-1, cfg_yaml=cfg_yaml, extra={"step": step, **extra})
        return path

    def prune(self, keep: Path | None = None) -> None:
        """Delete regular checkpoints past the newest ``keep_last``; the one ``best`` links to, and ``keep`` (the one
        just saved, which a newer name can put among the old), are kept."""
        kept = {p.name for p in (self.pointed("best"), keep) if p is not None}
        for old in list_checkpoints(self.dir)[: -self.keep_last]:
            if old.name in kept:
                continue
            old.unlink(missing_ok=True)
            logger.info("removed old checkpoint %s (train.keep_last=%d)", old, self.keep_last)

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads; a corrupt one is skipped with a warning. None when there is none."""
        for path in reversed(list_checkpoints(self.dir)):
            try:
                obj = load_file(path)
                if "model_state" not in obj:
                    raise ValueError("no model_state entry")
                return path, obj
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
                logger.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one", path,
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def misnamed(path: Path, obj: dict[str, Any]) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from as the run's newest (None when its name fits what it holds):
    its name says another epoch or step than the state inside (a checkpoint copied or renamed into the folder, whose
    resume would prune the run's later checkpoints and drop its later metrics). Our names: ``epoch_N`` holds the
    position "next: epoch N, batch 0", ``epoch_N_step_S`` step S inside epoch N; the original's ``epoch_N`` holds
    ``epoch`` N - 1. An older harness's ``_iter_`` names are not checked."""
    m = _NAME.fullmatch(path.name)
    if m is None or m[2] == "iter":
        return None
    epoch, batch, step = resume_position(obj, path)
    named_epoch, named_step = int(m[1]), None if m[3] is None else int(m[3])
    if named_step is None:
        fits = epoch == named_epoch and batch == 0
    else:
        fits = epoch == named_epoch - 1 and batch > 0 and step == named_step
    if fits:
        return None
    named = f"the end of epoch {named_epoch}" if named_step is None else f"step {named_step} inside epoch {named_epoch}"
    held = f"the end of epoch {epoch}" if batch == 0 else f"batch {batch} of epoch {epoch + 1}"
    return (f"{path}: its name says {named}, but it holds the state after {held} (step {step}): a checkpoint copied "
            f"or renamed into this run's folder? Resuming from it would prune this run's later checkpoints and drop "
            f"its later metrics. Move it out of {path.parent} (to train from its weights, start a new run with "
            f"model.pretrained=<its new path>)")


def video_facts(value: Any) -> dict[str, list[float]]:
    """A checkpoint's ``quarantined_videos`` (path -> frames, fps, height, width: what those videos were planned
    with), checked; entries not of that form are left out (an older checkpoint has none)."""
    if not isinstance(value, dict):
        return {}
    return {p: list(f) for p, f in value.items() if isinstance(p, str) and isinstance(f, (list, tuple)) and len(f) == 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in f)}


def epoch_partial(value: Any) -> dict[str, Any] | None:
    """A mid-epoch checkpoint's ``epoch_partial`` (the interrupted epoch's loss summed per clip, clips and correct ones
    over all ranks, and its open log window's losses), checked; None when it is absent or not of that form (an older
    checkpoint, whose loss sum was per micro-batch: the resumed epoch's records then cover the batches after the
    resume)."""
    if not isinstance(value, dict):
        return None
    scalars = {k: value.get(k) for k in ("loss_clip_sum", "seen", "correct")}
    losses = value.get("window_loss")
    if (not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scalars.values())
            or not isinstance(losses, list) or len(losses) > 1 << 20
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in losses)):
        return None
    return {**scalars, "window_loss": list(losses)}


def resume_position(obj: dict[str, Any], path: str | Path = "the checkpoint") -> tuple[int, int, int]:
    """(epoch, batch, step) to continue from: our ``position`` and ``step``, else the original's ``epoch`` + 1 and
    step 0. A file whose entries are not counts (it loads, but is no training checkpoint) raises
    ``CheckpointError`` naming ``path``."""
    def count(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < -1:
            raise CheckpointError(f"{path}: {what} is {type(value).__name__} {str(value)[:60]!r}, not a count: not a "
                                  "training checkpoint this run can resume from (move it out of the checkpoints "
                                  "folder, or load its weights with model.pretrained=...)")
        return int(value)

    step = count(obj.get("step", 0), "step")
    position = obj.get("position")
    if position is None:
        return count(obj.get("epoch", -1), "epoch") + 1, 0, step
    if not isinstance(position, dict):
        count(position, "position")  # raises: a position is {epoch, batch}
    return count(position.get("epoch"), "position.epoch"), count(position.get("batch"), "position.batch"), step
