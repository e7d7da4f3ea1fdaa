"""The bench record: one measured case, versioned, with its provenance and raw samples; reading (older schema
versions migrated), writing, flat exports (CSV, JSON lines) and TensorBoard scalars.

A record's ``env`` is ``runtime.environment_info`` of the worker that measured it (versions, device, machine class,
git SHA, dirty flag and diff hash, host, command line); ``time`` and ``seed`` say when and with which seed;
``samples_s`` holds the raw per-step seconds its medians and intervals come from.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from timesformer_harness.metrics import summarize, utilisation
from timesformer_harness.common import atomic_write_text

SCHEMA_VERSION = 2
STATUSES = ("ok", "oom", "error", "skipped")
# A record's figures: a number or None; in an ok record a finite one (NaN compares as neither faster nor slower).
FIGURES = ("frames", "img_size", "batch", "images_per_s", "clips_per_s", "peak_mem_bytes", "params", "flops_per_clip",
           "achieved_flops", "peak_flops", "utilisation")


class NotResultsFile(ValueError):
    """A JSON file that is no bench results file at all (another tool's output): the caller says what to give."""


def finite_positive(x: object) -> bool:
    """A number that can be a ratio's term: finite and above 0 (not a bool, not NaN)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass
class BenchRecord:
    """One measured case. ``None`` means not measured / not applicable."""

    suite: str  # model | attention | scaling | pipeline | e2e
    case: str  # unique within a run, e.g. "model/divided_space_time/train/8x224"
    attention_type: str | None = None
    preset: str | None = None
    model: dict[str, Any] | None = None  # the ModelConfig the case built (suites that build a model)
    frames: int | None = None
    img_size: int | None = None
    batch: int | None = None
    precision: str = "fp32"
    mode: str | None = None  # train | infer
    compile: str | None = None  # the model step's torch.compile mode (none = eager)
    attn_backend: str | None = None  # the attention suite's kernel
    loader: str | None = None  # the pipeline suite's loader
    device: str = "cpu"
    device_name: str = ""
    images_per_s: float | None = None  # clips/s x frames
    clips_per_s: float | None = None
    step_ms: dict[str, float] | None = None  # median, p10, p90, ci_low, ci_high (95% interval of the median)
    samples_s: list[float] = field(default_factory=list)  # the raw timed samples, seconds per step
    peak_mem_bytes: int | None = None  # the case's growth of the counter peak_mem_kind names
    peak_mem_kind: str | None = None  # cuda_allocator | rss (timesformer_harness.metrics.PeakMemory)
    params: int | None = None
    flops_per_clip: int | None = None  # forward (infer) or forward+backward (train), FLOPs = 2 x MACs
    achieved_flops: float | None = None  # FLOP/s
    peak_flops: float | None = None
    peak_flops_source: str | None = None  # e.g. "table:H100 SXM bf16/fp16 dense" or "fp32 GEMM n=1024 ..."
    utilisation: float | None = None  # achieved / peak, in [0, 1]
    status: str = "ok"
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    time: str = ""  # ISO 8601 with zone, when the worker began
    seed: int | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchRecord:
        """A record of this schema, or of an older one (migrated); ValueError for a newer one or unknown keys."""
        d = migrate(d)
        for key in ("extra", "env", "step_ms", "model"):  # objects (step_ms and model may be null)
            if key in d and not isinstance(d[key], dict) and (d[key] is not None or key in ("extra", "env")):
                raise ValueError(f"bench record's {key!r} is {type(d[key]).__name__}, not an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"bench record has unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def flat(self) -> dict[str, Any]:
        """One level of scalars (nested dicts joined with ``.``, e.g. ``model.depth``; lists and the raw samples left
        out): a CSV row, a JSON line, pytest-benchmark's ``extra_info``."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if key == "samples_s":
                continue
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
            elif not isinstance(value, list):
                out[key] = value
        return out


def migrate(d: dict[str, Any]) -> dict[str, Any]:
    """A record dict of schema 1 brought to this schema: ``backend`` split into ``attn_backend`` / ``loader``, the
    memory kind renamed, a gate record read as the model-suite record it measured."""
    version = d.get("schema_version", 1)
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(f"bench record schema_version={version!r}; this harness reads 1 to {SCHEMA_VERSION} "
                         "(a newer record needs a newer harness)")
    if version == SCHEMA_VERSION:
        return d
    d = dict(d)
    backend = d.pop("backend", None)
    if d.get("suite") == "attention":
        d["attn_backend"] = backend
    elif d.get("suite") == "pipeline":
        d["loader"] = backend
    if d.get("peak_mem_kind") == "rss_fresh_process":
        d["peak_mem_kind"] = "rss"
    if d.get("suite") == "gate":  # the gate timed the model suite's step in A/B blocks
        d["suite"] = "model"
        d["case"] = f"model/{d.get('attention_type')}/{d.get('mode')}/{d.get('frames')}x{d.get('img_size')}"
    d["schema_version"] = SCHEMA_VERSION
    return d


def fill_throughput(rec: BenchRecord, times_s: list[float], clips_per_step: int, frames: int | None,
                    clips: int | None = None) -> None:
    """Set the raw samples, step_ms, clips/s, images/s, achieved FLOP/s and utilisation of ``rec`` from per-step
    seconds: clips/s is ``clips_per_step`` over the median step, or, given ``clips`` (the clips the timed steps
    delivered, where batches differ in size: an epoch's last one), ``clips`` over the steps' total time.

    A utilisation above 100% is not a measurement of the model (its peak, a GEMM timed beside the steps on CPU, ran
    slower than the steps' own matmuls: a contended machine, or a precision faster than that fp32 GEMM): it is kept
    in ``extra["implausible_utilisation"]`` and ``utilisation`` stays None, so that nothing compares with it."""
    rec.samples_s = [round(t, 9) for t in times_s]
    rec.step_ms = summarize(times_s, scale=1e3)
    if clips is None:
        rec.clips_per_s = clips_per_step / statistics.median(times_s)
    else:
        rec.clips_per_s = clips / sum(times_s)
        rec.extra["clips_per_s_is"] = "the timed steps' clips over their total time (batches differ in size)"
    rec.images_per_s = rec.clips_per_s * frames if frames else None
    rec.achieved_flops = rec.flops_per_clip * rec.clips_per_s if rec.flops_per_clip else None
    rec.utilisation = utilisation(rec.achieved_flops, rec.peak_flops)
    if rec.utilisation is not None and rec.utilisation > 1.0:
        rec.extra["implausible_utilisation"] = rec.utilisation
        rec.utilisation = None


def write_results(path: str | Path, records: list[BenchRecord], meta: dict[str, Any] | None = None) -> None:
    """``{"schema_version", "meta", "records": [...]}`` as indented JSON, atomically."""
    payload = {"schema_version": SCHEMA_VERSION, "meta": meta or {}, "records": [r.to_dict() for r in records]}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def read_results(path: str | Path) -> tuple[list[BenchRecord], dict[str, Any]]:
    """The records and meta of a results file of this schema or an older one; ValueError naming ``path`` (and the
    record) for a file that is not one or is damaged (a figure that is not a number, or not finite in an ok record),
    ``NotResultsFile`` for JSON that is no results file at all."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as e:  # invalid JSON or not UTF-8
        raise ValueError(f"{path}: not a results file, its JSON does not parse ({e})") from e
    if not isinstance(data, dict):
        raise NotResultsFile(f"{path}: not a results file (a JSON {type(data).__name__}, not an object with "
                             "schema_version, meta and records)")
    version = data.get("schema_version")
    if version is None and not {"records", "meta"} & set(data):
        raise NotResultsFile(f"{path}: not a bench results file (no schema_version, meta or records)"
                             f"{_looks_like(data)}")
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version={version!r}; this harness reads 1 to {SCHEMA_VERSION} (a newer "
                         "file needs a newer harness)")
    records, meta = data.get("records"), data.get("meta", {})
    if not isinstance(records, list) or not isinstance(meta, dict) or not isinstance(meta.get("env", {}), dict):
        raise ValueError(f"{path}: not a results file ('records' must be a list, 'meta' and its 'env' objects)")
    out = []
    for i, r in enumerate(records):
        try:
            out.append(BenchRecord.from_dict(r))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}: record {i} is not a bench record: {e}") from e
        bad = _bad_figure(out[-1])
        if bad:
            raise ValueError(f"{path}: record {i} ({out[-1].case}): {bad}: a damaged results file")
    return out, meta


def _bad_figure(rec: BenchRecord) -> str | None:
    """What is wrong with ``rec``'s figures (``FIGURES``): one that is not a number, or in an ok record not finite."""
    for key in FIGURES:
        value = getattr(rec, key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{key} is {value!r}, not a number"
        if rec.status == "ok" and not math.isfinite(value):
            return f"{key} is {value!r}, not a finite number"
    return None


def _looks_like(data: dict[str, Any]) -> str:
    """What a JSON object that is not a results file looks like, where its keys say so (else empty)."""
    keys = set(data)
    if {"passed", "exit_status", "regressed"} <= keys:
        return ": it looks like a gate's verdict.json (the gate run's candidate.json beside it holds the records)"
    if {"a", "b", "refused", "cases"} <= keys:
        return ": it looks like bench compare's compare.json"
    if {"variants", "shootout"} <= keys:
        return ": it looks like a loader shoot-out's output (benchmarks' prepare.json)"
    return ""


def run_env(records: list[BenchRecord], meta: dict[str, Any]) -> dict[str, Any]:
    """The environment a run's cases ran in: the first record's (its fresh process, with the threads the case set),
    else the run's ``meta.env`` (the parent process's; older records have none)."""
    return next((r.env for r in records if r.env), meta.get("env", {}))


def write_flat(folder: Path, records: list[BenchRecord]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.jsonl`` in ``folder``: one flat row per record (``BenchRecord.flat``)."""
    rows = [r.flat() for r in records]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "results.csv", buf.getvalue())
    atomic_write_text(folder / "results.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return folder / "results.csv", folder / "results.jsonl"


SCALARS = ("images_per_s", "clips_per_s", "utilisation", "peak_mem_bytes", "achieved_flops")


def write_tensorboard(folder: Path, records: list[BenchRecord]) -> Path:
    """TensorBoard scalars of the run's ok records under ``folder``: ``<quantity>/<case>`` (step 0), and each
    case's raw step times in ms as ``step_ms/<case>`` over the sample index."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for r in records:
            if r.status != "ok":
                continue
            for name in SCALARS:
                value = getattr(r, name)
                if value is not None:
                    writer.add_scalar(f"{name}/{r.case}", value, 0)
            for i, seconds in enumerate(r.samples_s):
                writer.add_scalar(f"step_ms/{r.case}", 1e3 * seconds, i)
    return folder
