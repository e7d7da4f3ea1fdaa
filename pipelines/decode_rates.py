"""The measured decode table: clips/s of each loader path per GPU generation and codec, as data
(``configs/measured/decode_rates.yaml``), and the choices made from it.

``data.backend=auto`` with the model on CUDA (``timesformer_harness.pipelines.factory.plan_decode``) and
``prepare --codec auto`` (``timesformer_harness.pipelines.tools.prepare``) read it; ``make gpu-input``
(``timesformer_harness.benchmarks.gpu_input --update-table``) writes its measured loader rows into it.

A row is one measurement of one loader path (``DECODE_PATHS``: DALI on NVDEC, DALI's CPU decoder, DALI's nvJPEG, the
PyAV loader) on one GPU machine, for one codec, GOP and short side, with the file it was reported in. The nearest
row for a set of videos (``nearest``): the same GPU generation, decode path and codec (else there is none); among
those, the GOP nearest the set's (``UNKNOWN_GOP`` when the set's is not known: the probe reads no keyframes), then
the short side nearest, then the newest date, then the fastest.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, NamedTuple, Sequence

from timesformer_harness.pipelines.nvdec import DALI_CPU_CODECS, GENERATIONS, nvdec_problem
from timesformer_harness.pipelines.packets import JPEG_CODECS
from timesformer_harness.pipelines.validate import VideoInfo

# The shipped table: the clone's configs/, or its copy inside an installed wheel (timesformer_harness/configs/).
TABLE = Path(__file__).resolve().parent.parent / "configs" / "measured" / "decode_rates.yaml"
CPU_GENERATION = "cpu"  # the generation of a row measured without a GPU (a rehearsal): never in the shipped table
DECODE_PATHS = ("nvdec", "dali-cpu", "nvjpeg", "pyav")
# data.backend=auto's candidates in its rule order (the order kept when the table cannot decide), and DALI's device
DALI_PATHS = {"nvdec": "gpu", "dali-cpu": "cpu", "nvjpeg": "gpu"}
PATH_LABELS = {"nvdec": "NVDEC", "dali-cpu": "DALI's CPU decoder", "nvjpeg": "nvJPEG", "pyav": "the PyAV loader"}
# The GOP a set is compared at when its own is not known: the long GOP of unprepared files (x264's default keyint,
# the shoot-out's long-GOP variants).
UNKNOWN_GOP = 250
HEADER = """\
# The measured decode table (timesformer_harness.pipelines.decode_rates): one row per loader path measured on a GPU,
# copied from the results file named in its row. data.backend=auto (a CUDA model) and prepare --codec auto choose by
# it; `make gpu-input GPU_INPUT_ARGS=--update-table` merges a GPU run's loader rows into it. Only measured rows: a
# row is never estimated, and rows measured without a GPU are refused here. docs/gpu.md says how it is read.
"""


@dataclass
class RateRow:
    """One measured loader path."""

    generation: str  # timesformer_harness.pipelines.nvdec.generation_of's name of the GPU (cpu: measured without one)
    device: str  # the GPU's name, e.g. NVIDIA H200
    path: str  # nvdec | dali-cpu | nvjpeg | pyav
    codec: str  # of the files: vp9 | h264 | hevc | mjpeg | ...
    gop: int  # keyframe interval of the files in frames (1 = intra-only)
    short_side: int  # of the files, in pixels
    clips_per_s: float  # the loader's delivered clips per second (median of the run's rounds)
    host_cpu_ms_per_clip: float | None  # the loader process's and its workers' CPU time per clip (None: not reported)
    threads: int  # DALI threads / PyAV workers
    batch: int  # clips per batch
    clip: str  # frames x sampling rate, crop: 8x32, crop 224
    source: str  # the results file the figure is reported in (repository-relative when inside the repository)
    date: str  # of the measurement, YYYY-MM-DD
    git_sha: str  # of the tree measured

    def describe(self) -> str:
        """The row in a sentence, for the log and the reports."""
        cpu = "" if self.host_cpu_ms_per_clip is None else f", {self.host_cpu_ms_per_clip:g} host CPU ms/clip"
        return (f"{self.clips_per_s:g} clips/s{cpu} ({self.device}, {self.codec} GOP {self.gop}, {self.short_side} px, "
                f"{self.threads} threads, batch {self.batch}; {self.source}, {self.date}, git {self.git_sha})")


@dataclass
class RateTable:
    """The file's schema."""

    rows: list[RateRow] = field(default_factory=list)


def table_path(setting: str | Path | None) -> Path | None:
    """The table ``data.decode_rates`` names: "" or None = the shipped one, "none" = no table."""
    if setting is None or str(setting) == "":
        return TABLE
    if str(setting) == "none":
        return None
    return Path(setting)


def table_name(setting: str | Path | None) -> str:
    """How messages name the table ``data.decode_rates`` names."""
    where = table_path(setting)
    return "no table (data.decode_rates=none)" if where is None else \
        "configs/measured/decode_rates.yaml" if where == TABLE else str(where)


def load_rates(path: str | Path | None = None) -> list[RateRow]:
    """The rows of the table at ``path`` (``table_path``'s values; "none" = no rows).

    Raises:
        FileNotFoundError / ValueError: a missing table or a row that breaks the schema, naming the file and the key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where = table_path(path)
    if where is None:
        return []
    if not where.is_file():
        raise FileNotFoundError(f"decode table {where}: no such file (data.decode_rates names it; '' = the shipped "
                                f"{TABLE}, 'none' = no table)")
    try:
        table = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RateTable), OmegaConf.load(where)))
    except (OmegaConfBaseException, ValueError) as e:
        raise ValueError(f"decode table {where}: {e}; every row needs the keys "
                         f"{[f.name for f in fields(RateRow)]}") from None
    for i, row in enumerate(table.rows):
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"decode table {where}, rows[{i}]: {problem}")
    return table.rows


def _row_problem(row: RateRow) -> str:
    if row.generation not in (*GENERATIONS, CPU_GENERATION):
        return f"generation {row.generation!r}: one of {[*GENERATIONS, CPU_GENERATION]}"
    if row.path not in DECODE_PATHS:
        return f"path {row.path!r}: one of {list(DECODE_PATHS)}"
    if row.gop < 1 or row.short_side < 1 or not row.clips_per_s > 0:
        return f"gop {row.gop}, short_side {row.short_side} and clips_per_s {row.clips_per_s} must be positive"
    return ""


def merge_rates(path: str | Path, new: Sequence[RateRow]) -> list[RateRow]:
    """Write ``new`` into the table at ``path`` (made when missing): a row replaces the one measured under the same
    conditions (generation, device, path, codec, GOP, short side, threads, batch, clip), the others are kept.
    Returns the table's rows.

    Raises:
        ValueError: a row measured without a GPU (generation ``cpu``) bound for the shipped table; a broken row.
    """
    from omegaconf import OmegaConf

    from timesformer_harness.common import atomic_write_text

    path = Path(path)
    for row in new:
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"decode table {path}: the new row {row}: {problem}")
    cpu = [r for r in new if r.generation == CPU_GENERATION]
    if cpu and path.resolve() == TABLE.resolve():
        raise ValueError(f"decode table {path}: {len(cpu)} row(s) were measured without a GPU; the shipped table holds "
                         f"GPU measurements only (write a rehearsal's rows to another file: --update-table PATH)")
    rows = load_rates(path) if path.is_file() else []
    keys = {_key(r) for r in new}
    merged = [r for r in rows if _key(r) not in keys] + list(new)
    text = OmegaConf.to_yaml(OmegaConf.structured(RateTable(rows=merged)))
    atomic_write_text(path, HEADER + text)
    return merged


def _key(row: RateRow) -> tuple[Any, ...]:
    return (row.generation, row.device, row.path, row.codec, row.gop, row.short_side, row.threads, row.batch,
            row.clip)


def nearest(rows: Iterable[RateRow], generation: str, path: str, codec: str, gop: int | None = None,
            short_side: int | None = None) -> RateRow | None:
    """The row that stands for ``path`` decoding ``codec`` on a ``generation`` GPU (the module docstring's rule); None
    when no row has that generation, path and codec. ``gop`` None: ``UNKNOWN_GOP``; ``short_side`` None: any."""
    gop = UNKNOWN_GOP if gop is None else gop
    same = [r for r in rows if (r.generation, r.path, r.codec) == (generation, path, codec)]
    if not same:
        return None
    return min(same, key=lambda r: (abs(r.gop - gop), 0 if short_side is None else abs(r.short_side - short_side),
                                    _negated_date(r.date), -r.clips_per_s))


def _negated_date(date: str) -> tuple[int, ...]:
    return tuple(-int(x) for x in date.split("-") if x.isdigit())


class SetRate(NamedTuple):
    """What the table says one decode path delivers on a set of videos."""

    clips_per_s: float  # the set's rate: its codecs' rows, weighted by their share of the videos
    rows: list[RateRow]  # the row that stood for each codec


def set_rate(rows: Sequence[RateRow], generation: str, path: str, codecs: Mapping[str, int], gop: int | None = None,
             short_side: int | None = None) -> SetRate | None:
    """The clips/s the table gives ``path`` on a set with ``codecs`` (codec -> number of videos): each codec's nearest
    row, combined as time per clip (a clip takes 1/rate of its codec's row; the set's rate is the videos over the
    summed times). None when a codec has no row."""
    chosen = [nearest(rows, generation, path, c, gop, short_side) for c in codecs]
    if any(r is None for r in chosen):
        return None
    if len(chosen) == 1:
        return SetRate(chosen[0].clips_per_s, chosen)
    seconds = sum(n / r.clips_per_s for n, r in zip(codecs.values(), chosen))
    return SetRate(sum(codecs.values()) / seconds, chosen)


def dali_candidates(infos: Iterable[Any], generation: str) -> tuple[list[str], str]:
    """The DALI decode paths that take every probed video of ``infos`` (those with an ``error`` are left out), in
    ``DALI_PATHS``' rule order, and why NVDEC is not among them ("" when it is): NVDEC when ``nvdec_problem`` passes
    every video, DALI's CPU decoder when it takes every codec, nvJPEG for a set of JPEG-frame (MJPEG) videos only."""
    infos = [i for i in infos if not getattr(i, "error", "")]
    codecs = {i.codec for i in infos}
    refused = [(i.path, p) for i in infos if (p := nvdec_problem(i, generation))]
    paths = [] if refused else ["nvdec"]
    if infos and codecs <= DALI_CPU_CODECS:
        paths.append("dali-cpu")
    if infos and codecs <= JPEG_CODECS:
        paths.append("nvjpeg")
    why = (f"NVDEC cannot decode {len(refused)} of {len(infos)} video(s), e.g. {refused[0][0]}: {refused[0][1]}"
           if refused else "")
    return paths, why


class Choice(NamedTuple):
    """The decode path the table (or, without figures, the rule order) chose, and why."""

    path: str
    why: str  # "" when there was no choice to make
    rate: SetRate | None  # the chosen path's figure (None: not measured)


def choose_path(candidates: Sequence[str], rows: Sequence[RateRow], generation: str, codecs: Mapping[str, int],
                gop: int | None = None, short_side: int | None = None, table: str = "the decode table") -> Choice:
    """The candidate (``dali_candidates``' order) with the highest measured clips/s for ``generation`` and the set's
    ``codecs``; the first candidate, saying which has no figure, when any has none. ``table`` names the table in
    ``why``."""
    if not candidates:
        raise ValueError("choose_path: no candidate decode path")
    if len(candidates) == 1:
        return Choice(candidates[0], "", set_rate(rows, generation, candidates[0], codecs, gop, short_side))
    rates = {p: set_rate(rows, generation, p, codecs, gop, short_side) for p in candidates}
    missing = [p for p, r in rates.items() if r is None]
    what = f"{generation}, {'/'.join(sorted(codecs))}"
    if missing:
        names = " or ".join(PATH_LABELS[p] for p in missing)
        order = " before ".join(PATH_LABELS[p] for p in candidates)
        return Choice(candidates[0], f"no measured figure for {names} ({what}) in {table}: kept the rule order "
                                     f"({order})", rates[candidates[0]])
    best = max(candidates, key=lambda p: (rates[p].clips_per_s, -candidates.index(p)))
    said = "; ".join(f"{PATH_LABELS[p]} {_rate_text(rates[p])}" for p in sorted(
        candidates, key=lambda p: -rates[p].clips_per_s))
    return Choice(best, f"the measured table ({table}) puts {PATH_LABELS[best]} first for {what}: {said}", rates[best])


def _rate_text(rate: SetRate) -> str:
    if len(rate.rows) == 1:
        return rate.rows[0].describe()
    return f"{rate.clips_per_s:.1f} clips/s over the set from " + ", ".join(r.describe() for r in rate.rows)


class Recommendation(NamedTuple):
    """The prepared format the table recommends for a GPU generation."""

    codec: str
    gop: int | None  # None: the encoder's default (the fallback without a measured row)
    path: str  # the decode path data.backend=auto would take on it ("" when not measured)
    rate: SetRate | None
    why: str


FALLBACK_CODEC = "vp9"  # without a measured row: DALI's CPU and GPU decoders both take it


def recommend_format(rows: Sequence[RateRow], generation: str, codecs: Collection[str], short_side: int = 0,
                     gop: int | None = None, table: str = "the decode table") -> Recommendation:
    """The format among ``codecs`` (what the preparing tool can write) and the measured GOPs (or ``gop`` when given)
    that delivers the most clips/s to the DALI loader on a ``generation`` GPU: each format is judged as
    ``data.backend=auto`` would decode a prepared set of it (``dali_candidates``, ``choose_path``), at ``short_side``
    (0 = any: judged at 256). MJPEG is intra-only (GOP 1). Without a measured figure: ``FALLBACK_CODEC``, saying
    why."""
    side = short_side or 256
    formats = sorted({(r.codec, 1 if r.codec in JPEG_CODECS else gop if gop is not None else r.gop) for r in rows
                      if r.generation == generation and r.path in DALI_PATHS and r.codec in codecs})
    best: Recommendation | None = None
    skipped: list[str] = []  # measured formats that cannot be judged at this size, and why: said in ``why``
    for codec, g in formats:
        prepared = VideoInfo(f"a prepared {codec} file", codec=codec, width=side, height=side, bit_depth=8,
                             chroma="420")
        candidates, _ = dali_candidates([prepared], generation)
        problem = nvdec_problem(prepared, generation).split("; ")[0]  # e.g. below NVDEC's minimum at this size
        not_nvdec = [f"not NVDEC: {problem}"] if problem else []
        if not candidates:
            skipped.append(f"{codec} GOP {g} ({'; '.join(not_nvdec + ['no DALI decoder takes it'])})")
            continue
        choice = choose_path(candidates, rows, generation, {codec: 1}, g, short_side or None, table)
        if choice.rate is None:
            unmeasured = f"no measured figure for {PATH_LABELS[choice.path]}"
            skipped.append(f"{codec} GOP {g} ({'; '.join(not_nvdec + [unmeasured])})")
            continue
        if best is None or choice.rate.clips_per_s > best.rate.clips_per_s:
            row = choice.rate.rows[0]
            best = Recommendation(codec, g, choice.path, choice.rate,
                                  f"the most clips/s measured for {generation} in {table}: {PATH_LABELS[choice.path]} "
                                  f"{row.describe()}" + (f" ({choice.why})" if choice.why else ""))
    passed_over = f"; passed over at {side} px: {', '.join(skipped)}" if skipped else ""
    if best is not None:
        return best._replace(why=best.why + passed_over)
    return Recommendation(FALLBACK_CODEC, gop, "", None,
                          f"no measured DALI figure for {generation} in {table}; {FALLBACK_CODEC}, the rule's choice "
                          f"(DALI's CPU and GPU decoders both take it)" + passed_over)


def short_side_of(infos: Iterable[Any]) -> int | None:
    """The median short side of the probed ``infos`` (None when none has a size)."""
    sides = [min(i.width, i.height) for i in infos if not getattr(i, "error", "") and i.width and i.height]
    return int(statistics.median(sides)) if sides else None


def codec_counts(infos: Iterable[Any]) -> dict[str, int]:
    """codec -> number of probed videos (errored ones left out)."""
    return dict(Counter(i.codec for i in infos if not getattr(i, "error", "")))

