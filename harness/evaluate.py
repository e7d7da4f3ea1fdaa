"""Multi-view evaluation: ``python harness/evaluate.py --config FILE --checkpoint FILE [key=value ...]``.

The test loader yields every video as ``data.num_ensemble_views`` temporal clips x ``data.num_spatial_crops`` crops,
with ``Batch.index`` naming the video. Each rank scores its shard; the views of a video are combined as
``test.ensemble`` says (``sum`` of raw logits: the original; ``softmax_mean``; ``max``), the per-video scores are
gathered, and top-1, top-5 and per-class accuracy are written as JSON (``test.output``, default
``{output.dir}/eval_{split}.json``). Checkpoints in the original ``.pyth`` format load as they are
(``timesformer_harness.checkpoint.load_weights``, strict). A view whose clip fails to decode is left out of its video's
score and listed (``unscored_views``); accuracy is over the videos with at least one scored view
(``data.on_bad_video=error`` stops at the first such view instead).

``--dump FILE`` (``.csv`` or ``.jsonl``) also writes one row per scored video (path, label, predicted class, top-5
classes and probabilities of its ensembled score), the confusion matrix into the JSON result, and its plot beside
the dump (``FILE``'s stem + ``_confusion.png``). Progress in clips: a tqdm bar on a terminal, else a log line every
30 s (docs/checkpoints.md, "Evaluating").
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

if __name__ == "__main__" and not __package__:  # run by path (python harness/evaluate.py)
    from timesformer_harness.scripts import run_by_package_name

    run_by_package_name(__file__, "timesformer_harness.evaluate")

import torch
import yaml

from timesformer_harness.checkpoint import CheckpointError, WeightsMismatchError, load_file
from timesformer_harness.config import RootConfig, load_config, to_yaml
from timesformer_harness.metrics import OutputFolderError, Stopwatch, check_output_root
from timesformer_harness.distributed import (DistInfo, all_gather_objects, cleanup, init_distributed,
                                             report_unexpected)
from timesformer_harness.runtime import autocast, environment_info, resolve_precision, retain_freed_memory
from timesformer_harness.pipelines.base import Batch, Loader, loader_facts
from timesformer_harness.pipelines.manifest import manifest_path, ssv2_class_names
from timesformer_harness.pipelines.progress import LOG_EVERY_S, Progress
from timesformer_harness.common import ExitCode, atomic_write_text, report_error, setup_logging
from timesformer_harness.pipelines.quarantine import BadVideoError
from timesformer_harness.train_state import CLIP_KEYS, Change, config_changes, format_changes, saved_config

logger = logging.getLogger(__name__)

DUMP_FORMATS = (".csv", ".jsonl")  # --dump's suffixes: one row per video, CSV (lists space-separated) or JSON lines
TOP_K = 5


class ViewAccumulator:
    """Per-video score from its views: ``sum`` of logits, ``softmax_mean`` of probabilities, or ``max``."""

    def __init__(self, ensemble: str = "sum") -> None:
        assert ensemble in ("sum", "softmax_mean", "max"), ensemble
        self.ensemble = ensemble
        self.scores: dict[int, torch.Tensor] = {}
        self.labels: dict[int, int] = {}
        self.views: dict[int, int] = {}
        self.unscored: list[dict[str, Any]] = []  # views that could not be decoded (quarantine.UnscoredView)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        """logits: (B, C); labels, index: (B,)."""
        logits = logits.detach().float().cpu()
        if self.ensemble == "softmax_mean":
            logits = logits.softmax(dim=-1)
        for row, y, i in zip(logits, labels.tolist(), index.tolist()):
            if i in self.scores:
                prev = self.scores[i]
                self.scores[i] = torch.maximum(prev, row) if self.ensemble == "max" else prev + row
                if self.labels[i] != y:
                    raise ValueError(f"video {i} has views with labels {self.labels[i]} and {y}")
            else:
                self.scores[i], self.labels[i] = row.clone(), y
            self.views[i] = self.views.get(i, 0) + 1

    def merge(self, others: Iterable[ViewAccumulator]) -> ViewAccumulator:
        """Combine the accumulators of several ranks (a video's views may sit on different ranks)."""
        out = ViewAccumulator(self.ensemble)
        for acc in [self, *others]:
            for i, s in acc.scores.items():
                if i in out.scores:
                    out.scores[i] = torch.maximum(out.scores[i], s) if self.ensemble == "max" else out.scores[i] + s
                else:
                    out.scores[i], out.labels[i] = s.clone(), acc.labels[i]
                out.views[i] = out.views.get(i, 0) + acc.views[i]
            out.unscored += acc.unscored
        out.unscored.sort(key=lambda u: (u["index"], u["view"]))
        return out

    def state(self) -> dict[str, Any]:
        return {"ensemble": self.ensemble, "scores": self.scores, "labels": self.labels, "views": self.views,
                "unscored": self.unscored}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ViewAccumulator:
        acc = cls(state["ensemble"])
        acc.scores, acc.labels, acc.views = state["scores"], state["labels"], state["views"]
        acc.unscored = list(state.get("unscored", []))
        return acc


def accuracy_report(acc: ViewAccumulator, num_classes: int, views_per_video: int | None = None,
                    class_names: list[str] | None = None) -> dict[str, Any]:
    """top-1 / top-5 / per-class accuracy (percent) over the videos in ``acc``; top-5 is None with 5 classes or fewer
    (it would be 100% whatever the model). Raises ``BadVideoError`` when every view failed to decode (nothing to
    score)."""
    if not acc.scores and acc.unscored:
        first = acc.unscored[0]
        raise BadVideoError(f"every view failed to decode ({len(acc.unscored)} views), so there is nothing to score, "
                            f"e.g. {first.get('path')}: {first.get('reason')}; fix or remove those videos (python -m "
                            "timesformer_harness.pipelines.validate MANIFEST --deep finds them)")
    if not acc.scores:
        raise ValueError("no predictions to score: the evaluation loader yielded no clips")
    ids = sorted(acc.scores)
    scores = torch.stack([acc.scores[i] for i in ids])  # (V, C)
    labels = torch.tensor([acc.labels[i] for i in ids])
    k = min(5, scores.size(1))
    topk = scores.topk(k, dim=1).indices
    top1 = topk[:, 0] == labels
    top5 = (topk == labels[:, None]).any(dim=1)
    per_class: dict[str, float | None] = {}
    present = []  # unrounded, for the mean
    for c in range(num_classes):
        mask = labels == c
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        per_class[name] = None
        if mask.any():
            present.append(100.0 * top1[mask].float().mean().item())
            per_class[name] = round(present[-1], 2)
    report = {
        "num_videos": len(ids),
        "top1": round(100.0 * top1.float().mean().item(), 2),
        "top5": round(100.0 * top5.float().mean().item(), 2) if scores.size(1) > 5 else None,
        "mean_class_accuracy": round(sum(present) / len(present), 2) if present else None,
        "per_class_top1": per_class,
        "ensemble": acc.ensemble,
        "views_seen": sum(acc.views.values()),
        "num_unscored_views": len(acc.unscored),
        "num_unscored_videos": len({u["index"] for u in acc.unscored} - set(acc.scores)),  # no view scored
        "unscored_views": acc.unscored,
    }
    if acc.unscored:
        logger.warning("%d view(s) of %d video(s) could not be decoded and are not scored (unscored_views; first: "
                       "%s)", len(acc.unscored), len({u["index"] for u in acc.unscored}), acc.unscored[0]["path"])
    if views_per_video:
        short = [i for i in ids if acc.views[i] != views_per_video]
        report["views_per_video"] = views_per_video
        report["videos_with_wrong_view_count"] = len(short)
        if short:
            logger.warning("%d videos have a view count other than %d (first: %s)", len(short), views_per_video,
                           short[:5])
    return report


def with_progress(loader: Loader, desc: str, interval: float = LOG_EVERY_S) -> Iterator[Batch]:
    """``loader``'s batches, counting its clips on stderr (``pipelines.progress.Progress``: a tqdm bar on a terminal,
    else a log line every ``interval`` seconds, as the pre-flight checks show theirs), then one closing log line."""
    clips = 0
    clock = Stopwatch()
    with Progress(desc, loader.num_clips, unit="clip", interval=interval) as progress:
        for batch in loader:
            yield batch
            clips += int(batch.label.numel())
            progress.update(int(batch.label.numel()))
    seconds = clock.elapsed()
    logger.info("%s: %d clips in %.1f s (%.1f clips/s)", desc, clips, seconds, clips / max(seconds, 1e-9))


@torch.no_grad()
def score_loader(model: torch.nn.Module, loader: Loader, device: torch.device, dtype: torch.dtype | None,
                 ensemble: str = "sum", progress: str = "") -> ViewAccumulator:
    """Run ``model`` over ``loader`` (this rank's shard) and merge the views of every video across ranks, with the
    views the loader could not decode (``loader.unscored``). A ``BadVideoError`` on one rank stops every rank.
    ``progress``: a name to report progress under (``with_progress``); "" for none (ranks other than 0)."""
    was_training = model.training
    model.eval()
    acc = ViewAccumulator(ensemble)
    error = ""
    try:
        for batch in (with_progress(loader, progress) if progress else loader):
            with autocast(device, dtype):
                logits = model(batch.video.to(device, non_blocking=True))
            acc.add(logits, batch.label, batch.index)
    except BadVideoError as e:  # data.on_bad_video=error: the other ranks learn it at the gather below
        error = str(e)
    finally:
        model.train(was_training)
    acc.unscored = [asdict(u) for u in loader.unscored]
    states = all_gather_objects((acc.state(), error))
    errors = [e for _, e in states if e]
    if errors:
        raise BadVideoError(errors[0])
    if len(states) == 1:
        return acc
    return ViewAccumulator(ensemble).merge(ViewAccumulator.from_state(s) for s, _ in states)


def class_names_for(cfg: RootConfig, split: str) -> list[str] | None:
    """The class names of ``classes.txt`` (one name a line, in label order) beside ``split``'s manifest: in
    ``data.root``, or in the folder of ``data.<split>_manifest`` when that is set; without one, an SSv2 labels file's
    templates when they are ``model.num_classes`` ids from 0. None, with a warning naming the file and the fix, when
    the file has blank or repeated names or not ``model.num_classes`` of them (labels are then reported by number, not
    by the wrong names); None without one when there is no file."""
    path = manifest_path(cfg.data, split).parent / "classes.txt"
    if not path.is_file():
        names = ssv2_class_names(cfg.data)
        return names if names is not None and len(names) == cfg.model.num_classes else None
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").rstrip("\n").split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        logger.warning("%s cannot be read (%s): classes are reported by number", path, e)
        return None
    repeated = sorted({n for n in names if names.count(n) > 1 and n})
    problem = (f"{len(names)} names for model.num_classes={cfg.model.num_classes}"
               if len(names) != cfg.model.num_classes else
               f"line {names.index('') + 1} is blank" if "" in names else
               f"repeated names {repeated}" if repeated else "")
    if problem:
        logger.warning("%s: %s; classes are reported by number: write one distinct name a line, label 0 first",
                       path, problem)
        return None
    return names


def find_checkpoint(cfg: RootConfig, explicit: str = "") -> str:
    """``--checkpoint``, else ``test.checkpoint``, else the newest in ``{output.dir}/checkpoints``."""
    from timesformer_harness.train_state import list_checkpoints

    path = explicit or cfg.test.checkpoint
    if path:
        return path
    found = list_checkpoints(Path(cfg.output.dir) / "checkpoints")
    if not found:
        raise FileNotFoundError(f"no checkpoint given (--checkpoint or test.checkpoint=...) and none in "
                                f"{cfg.output.dir}/checkpoints")
    return str(found[-1])


def chosen_newest(checkpoint: Path) -> str:
    """Why ``checkpoint`` was evaluated (no checkpoint named: the newest of its folder) and the one before it, for an
    error about it."""
    from timesformer_harness.train_state import list_checkpoints

    found = list_checkpoints(checkpoint.parent)
    place = found.index(checkpoint) if checkpoint in found else 0
    before = found[place - 1] if place else None
    return (f"the newest checkpoint in {checkpoint.parent}, evaluated as none was given: " +
            (f"give --checkpoint {before} to evaluate the one before it" if before else
             "give --checkpoint FILE") + ", or rerun the training, which sets an unreadable newest checkpoint aside")


def predictions(acc: ViewAccumulator, paths: dict[int, str],
                class_names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per scored video, in manifest order: ``index``, ``path``, ``label``, ``pred``, ``correct``, ``views``,
    ``top5`` (classes, best first) and ``top5_prob`` (their probabilities), and ``label_name``/``pred_name`` when
    the classes have names. The probabilities are those of the video's ensembled score: the softmax of the summed
    (``sum``) or element-wise largest (``max``) logits, or the mean of the views' softmax (``softmax_mean``)."""
    rows = []
    for i in sorted(acc.scores):
        score = acc.scores[i]
        probs = score / acc.views[i] if acc.ensemble == "softmax_mean" else score.softmax(dim=-1)
        top_p, top_c = probs.topk(min(TOP_K, probs.numel()))
        label, pred = acc.labels[i], int(top_c[0])
        row: dict[str, Any] = {"index": i, "path": paths.get(i, ""), "label": label, "pred": pred,
                               "correct": pred == label, "views": acc.views[i], "top5": top_c.tolist(),
                               "top5_prob": [round(p, 6) for p in top_p.tolist()]}
        if class_names:
            row["label_name"] = class_names[label] if label < len(class_names) else ""
            row["pred_name"] = class_names[pred] if pred < len(class_names) else ""
        rows.append(row)
    return rows


def confusion_matrix(rows: list[dict[str, Any]], num_classes: int) -> list[list[int]]:
    """Counts of videos by true class (row) and predicted class (column), from ``predictions``' rows."""
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.int64)
    preds = torch.tensor([r["pred"] for r in rows], dtype=torch.int64)
    counts = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).tolist()


def format_dump(rows: list[dict[str, Any]], suffix: str) -> str:
    """``predictions``' rows as JSON lines (``.jsonl``) or CSV (``.csv``, lists space-separated)."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["index", "path"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "top5": " ".join(map(str, r["top5"])), "top5_prob": " ".join(map(str, r["top5_prob"]))})
    return out.getvalue()


def confusion_plot_path(dump: str | Path) -> Path:
    """Where ``--dump FILE`` puts the confusion matrix plot: ``FILE``'s stem + ``_confusion.png``, beside it."""
    dump = Path(dump)
    return dump.with_name(f"{dump.stem}_confusion.png")


def check_dump(dump: str) -> None:
    """Refuse a ``--dump`` file of another suffix before anything runs (its folder is made when it is written).

    Raises:
        ValueError: naming the file and the fix."""
    if Path(dump).suffix not in DUMP_FORMATS:
        raise ValueError(f"--dump {dump}: give a file ending in {' or '.join(DUMP_FORMATS)} (the suffix picks the "
                         f"format)")


def write_dump(acc: ViewAccumulator, loader: Loader, cfg: RootConfig, dump: str | Path) -> dict[str, Any]:
    """Write ``predictions`` to ``dump`` and the confusion matrix plot beside it; returns what goes into the JSON
    result: ``confusion_matrix`` (counts), ``predictions`` and ``confusion_plot`` (the files written)."""
    from timesformer_harness.plots import plot_confusion

    dump = Path(dump)
    paths = {v.index: v.path for v in loader.planner.videos} if loader.planner is not None else {}
    names = class_names_for(cfg, cfg.test.split)
    rows = predictions(acc, paths, names)
    atomic_write_text(dump, format_dump(rows, dump.suffix))
    matrix = confusion_matrix(rows, cfg.model.num_classes)
    plot = plot_confusion(matrix, confusion_plot_path(dump), names,
                          f"{cfg.test.split}: {len(rows)} videos, {acc.ensemble} of views")
    logger.info("wrote %d predictions to %s and the confusion matrix to %s", len(rows), dump, plot)
    return {"confusion_matrix": matrix, "predictions": str(dump), "confusion_plot": str(plot)}


# Model keys a checkpoint may be evaluated under with another value: the clip's size (embeddings resized, as the
# original's model does at run time)
RESIZED_KEYS = ("model.num_frames", "model.img_size")


# The keys that define a test clip: a checkpoint scored on clips made otherwise is scored on another protocol
TEST_CLIP_KEYS = tuple(k for k in CLIP_KEYS if k not in (
    "data.train_jitter_scales", "data.train_crop_size", "data.random_flip", "data.inv_uniform_sample"))


def trained_model_changes(cfg: RootConfig, saved_yaml: str) -> tuple[list[Change], list[Change], list[Change]]:
    """How ``cfg`` differs from the config a checkpoint of this harness was trained with (``saved_yaml``, its ``cfg``):
    (model keys that change what its weights compute, or do not fit them; ``RESIZED_KEYS``, which its embeddings are
    resized for; ``TEST_CLIP_KEYS``). All empty for a checkpoint without a config of ours (the original's ``.pyth``, a
    state dict)."""
    saved = saved_config({"cfg": saved_yaml})
    if saved is None:
        return [], [], []
    now = yaml.safe_load(to_yaml(cfg))
    refused, _ = config_changes({"model": saved["model"], "data": saved.get("data")},
                                {"model": now["model"], "data": now["data"]}, data_may_change=True)
    model = [c for c in refused if c[0].startswith("model.")]
    return ([c for c in model if c[0] not in RESIZED_KEYS], [c for c in model if c[0] in RESIZED_KEYS],
            [c for c in refused if c[0] in TEST_CLIP_KEYS])


def check_trained_model(cfg: RootConfig, checkpoint: str, saved_yaml: str) -> None:
    """Refuse a checkpoint of this harness whose model config differs from ``cfg.model`` in a key that changes what
    its weights compute without changing their shapes (``model.num_heads``, ``model.attention_type`` between joint
    and space-only, ``model.input_channels``): it would load and score wrongly. The frame count and image size
    (``RESIZED_KEYS``) may differ, and so may the test clips (``TEST_CLIP_KEYS``): warned. Also the clearer error
    when its weights did not fit the model: the keys that differ (``model.num_classes``, ``model.embed_dim``, ...)."""
    wrong, resized, clips = trained_model_changes(cfg, saved_yaml)
    if wrong:
        raise CheckpointError(f"{checkpoint} was trained as another model than the configured one: "
                              f"{format_changes(wrong)}; evaluate it with its own values (the run's config.yaml, or "
                              "those keys set back on the command line)")
    if resized:
        logger.warning("%s was trained with other clips: %s; its embeddings are resized to this config's",
                       checkpoint, format_changes(resized))
    if clips:
        logger.warning("%s is evaluated on other clips than it was trained with: %s; its score is of these clips "
                       "(the run's config.yaml has its own)", checkpoint, format_changes(clips))


def evaluate(cfg: RootConfig, checkpoint: str, info: DistInfo, dump: str = "", newest: bool = False
             ) -> dict[str, Any]:
    """Load ``checkpoint`` into the configured model and run the full multi-view test on ``test.split``; with
    ``dump``, rank 0 writes the per-video predictions (``write_dump``). ``newest``: ``checkpoint`` was not named but
    found (``find_checkpoint``), which an error reading it says, with the one to give instead."""
    from timesformer_harness.checkpoint import load_weights
    from timesformer_harness.workload import build_model
    from timesformer_harness.pipelines.factory import build_loader

    dtype = resolve_precision(cfg.train.precision, info.device)
    model = build_model(cfg.model, info.device, dtype=dtype,
                        channels_last=info.device.type == "cuda" and cfg.train.channels_last)
    try:
        report = load_weights(model, checkpoint, strict=True, new_head=False)
    except FileNotFoundError as e:  # found, then gone: a training run in this folder pruned it
        raise CheckpointError(f"{e}: it was there a moment ago (a training run in {cfg.output.dir} keeps only its "
                              "newest checkpoints): run again, or give --checkpoint a file it keeps (last.pyth, "
                              "best.pyth)") from e
    except WeightsMismatchError:  # a checkpoint of ours names the config keys that differ (model.num_classes, ...)
        saved = load_file(checkpoint).get("cfg")
        check_trained_model(cfg, checkpoint, saved if isinstance(saved, str) else "")
        raise
    except CheckpointError as e:  # unreadable or refused
        if not newest:
            raise
        raise CheckpointError(f"{e} ({chosen_newest(Path(checkpoint))})") from e
    check_trained_model(cfg, checkpoint, report.saved_config)
    data_cfg = replace(cfg.data, batch_size=cfg.test.batch_size)
    loader = build_loader(data_cfg, cfg.test.split, device=info.device, rank=info.rank,
                          world_size=info.world_size, run_dir=cfg.output.dir, num_classes=cfg.model.num_classes)
    clock = Stopwatch()
    acc = score_loader(model, loader, info.device, dtype, cfg.test.ensemble,
                       progress=f"evaluate {cfg.test.split}" if info.is_main else "")
    seconds = clock.elapsed()
    views = cfg.data.num_ensemble_views * cfg.data.num_spatial_crops
    result = accuracy_report(acc, cfg.model.num_classes, views, class_names_for(cfg, cfg.test.split))
    manifest = "" if data_cfg.loader == "synthetic" else str(manifest_path(data_cfg, cfg.test.split))
    result.update({"checkpoint": str(checkpoint), "checkpoint_format": report.format, "split": cfg.test.split,
                   "manifest": manifest,  # the file scored (SSv2's test split is its validation JSON)
                   "seconds": round(seconds, 2), "world_size": info.world_size,
                   "loader": loader_facts(loader), "rejected": [list(r) for r in loader.rejected],
                   "environment": environment_info(info.device)})
    if dump and info.is_main:
        result.update(write_dump(acc, loader, cfg, dump))
    return result


def fmt_percent(value: float | None, none: str = "n/a") -> str:
    """``value`` (a percentage) to two decimals and a % sign, or ``none``."""
    return none if value is None else f"{value:.2f}%"


TOP5_NONE = "n/a (5 classes or fewer)"  # how a None top-5 reads in a log line


def result_path(cfg: RootConfig) -> Path:
    """Where the result JSON goes: ``test.output``, else ``{output.dir}/eval_{test.split}.json``."""
    return Path(cfg.test.output or Path(cfg.output.dir) / f"eval_{cfg.test.split}.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harness/evaluate.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (configs/exp/*.yaml)")
    parser.add_argument("--checkpoint", default="", help="weights: original .pyth, ours, state_dict, safetensors, "
                        "or a Hugging Face snapshot folder")
    parser.add_argument("--dump", default="", metavar="FILE", help="also write per-video predictions to FILE (.csv or "
                        ".jsonl), the confusion matrix into the result and its plot beside FILE (*_confusion.png)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too (as "
                        "TIMESFORMER_DEBUG=1 does)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. test.ensemble=softmax_mean")
    parser.add_argument("--split", default=None, help=argparse.SUPPRESS)  # validate's flag: answered below
    args = parser.parse_intermixed_args(argv)
    if args.split is not None:
        parser.error(f"--split is not a flag of evaluate: the split is a config key, test.split={args.split}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Evaluate; returns the exit status (``timesformer_harness.common.ExitCode``): a mistake in the config or its
    data, a missing or refused checkpoint and bad videos are one ``error:`` line each."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dump:  # the places are tried, not made: a run that fails before it writes leaves no folder
            check_dump(args.dump)
            check_output_root(Path(args.dump).parent, "--dump FILE", create=False)
        check_output_root(result_path(cfg).parent, "test.output=FILE" if cfg.test.output else "output.dir",
                          create=False)
    except (ValueError, OutputFolderError) as e:  # a ConfigError, check_dump's, or a place that cannot be written
        return report_error(e, ExitCode.CONFIG, args.debug)
    setup_logging()  # rank from torchrun's RANK
    retain_freed_memory()
    info = init_distributed(cfg.dist)
    try:
        try:
            checkpoint = find_checkpoint(cfg, args.checkpoint)
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from e
        if not Path(checkpoint).exists():
            raise CheckpointError(f"checkpoint {checkpoint} does not exist (relative paths are from the current "
                                  f"folder, {Path.cwd()}): give --checkpoint FILE or test.checkpoint=FILE")
        result = evaluate(cfg, checkpoint, info, args.dump, newest=not (args.checkpoint or cfg.test.checkpoint))
        if info.is_main:
            out = result_path(cfg)
            atomic_write_text(out, json.dumps(result, indent=2) + "\n")
            unscored = (f"  ({result['num_unscored_views']} views could not be decoded: unscored_views)"
                        if result["num_unscored_views"] else "")
            print(f"{checkpoint}: {result['num_videos']} videos, {result['views_seen']} views "
                  f"({result['ensemble']}): top-1 {result['top1']:.2f}%  "
                  f"top-5 {fmt_percent(result['top5'], TOP5_NONE)}  "
                  f"mean class {fmt_percent(result['mean_class_accuracy'])}{unscored}  -> {out}")
    except CheckpointError as e:  # missing, refused, unreadable, or not the configured model's
        return report_error(e, ExitCode.CHECKPOINT, args.debug)
    except BadVideoError as e:  # data.on_bad_video=error
        return report_error(e, ExitCode.BAD_VIDEOS, args.debug)
    except (ValueError, FileNotFoundError) as e:  # raised for what a user sets: the message names the key or file
        return report_error(e, ExitCode.CONFIG, args.debug)
    except KeyboardInterrupt as e:
        return report_error(e, ExitCode.INTERRUPTED, args.debug, message="interrupted: no result written")
    except Exception as e:  # a lost peer (the rank that stopped first reported the cause), else raised again
        return report_unexpected(e, info.rank, args.debug)
    finally:
        cleanup()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
