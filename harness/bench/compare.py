"""Two bench runs side by side: ``python -m timesformer_harness.bench compare RUN_A RUN_B [--out DIR] [--force]
[--fail-below RATIO]``.

For every case in either run: images/s of A and B and their ratio B/A, the same for utilisation, and the paired
ratio. On CPU each model, attention and scaling case times blocks of its steps and blocks of an fp32 GEMM in
alternation; the paired ratio is B/A of its throughput in GEMM time (``report.normalised_throughput``: the median over
the pairs of step time over GEMM time, the gate's measure and the bench summary's), so a machine that is slower for
everyone (other jobs, clocks), or slower during part of a case, slows both halves of a pair and the ratio stays put.
The normalised ratio (the paired ratio where both records have one over the same GEMM, else utilisation B/A, else
images/s B/A) is the one to read, and to gate on. Utilisation (achieved FLOP/s over the case's median GEMM rate) and
raw images/s come second; their quotient, the peak ratio, says how much the machine itself differed between the runs.
A utilisation above 100% (a calibration GEMM slowed more than the steps; records from before it was refused at
measurement) is not used, and the note says so.

A case is like for like when both records are ``ok`` and agree on what was measured: batch, precision, mode, frames,
image size, the model's configuration, parameters and FLOPs per clip. The comparison is refused (exit 2, unless
``--force``) when the runs differ in preset or device kind, when a case present in both measured a different model
(configuration or parameters; FLOPs too when either differs), or when no case is like for like. FLOPs per clip that
differ at the same configuration and parameters are the code doing other work (an extra matmul, one removed): the
case is compared (by its paired ratio, else images/s: utilisation counts the other work as useful), its note gives the
FLOPs' change, and ``--fail-below`` judges it. ``--fail-below R`` exits 1 when a like-for-like case's normalised ratio
is below R (B slower than R x A), or when a case that ran in A did not run in B (missing, out of memory, an error).
Other differences (device name, torch version, CPU threads, an incomplete run) are printed as warnings. Writes
``compare.md``, ``compare.json`` and ``compare.png`` to ``--out`` (default ``runs/bench/compare/<A>_vs_<B>/``). Runs
of older record schemas are read (migrated), not refused; a gate run's folder is read through its ``candidate.json``.
Exit 2 whatever ``--force`` says: a file that is no results file,
a damaged one (a figure that is not a number, or not finite in an ok record: NaN would pass ``--fail-below``), a run
with no measured case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from timesformer_harness.bench.record import BenchRecord, NotResultsFile, finite_positive, read_results, run_env
from timesformer_harness.bench.report import normalised_throughput
from timesformer_harness.common import atomic_write_text
from timesformer_harness.config import ModelConfig

# Case fields that must match for its numbers to be compared as like with like; the last three mean another model.
CASE_KEYS = ("batch", "precision", "mode", "compile", "frames", "img_size", "model", "params", "flops_per_clip")
MODEL_KEYS = ("model", "params", "flops_per_clip")
MODEL_DEFAULTS = asdict(ModelConfig())


@dataclass
class Run:
    """A bench run as read from its ``results.json``."""

    name: str
    path: Path
    records: list[BenchRecord]
    meta: dict[str, Any]

    @property
    def device_kind(self) -> str:
        kinds = {r.device for r in self.records}
        return next(iter(kinds)) if len(kinds) == 1 else ",".join(sorted(kinds))


RUN_FILES = ("results.json", "candidate.json")  # a bench run's folder, a gate run's
WHAT_TO_GIVE = ("give a runs/bench/<stamp>-<attn> folder or its results.json, a gate run's runs/gate/<stamp> folder "
                "or its candidate.json, or a gate baseline")


def load_run(path: str | Path) -> Run:
    """A bench run's folder or a gate run's (its ``results.json`` or ``candidate.json``), or any results file such
    as a gate baseline."""
    path = Path(path)
    results = next((path / f for f in RUN_FILES if (path / f).is_file()), path / RUN_FILES[0]) if path.is_dir() \
        else path
    if not results.is_file():
        raise FileNotFoundError(f"{path}: no {' or '.join(RUN_FILES)} ({WHAT_TO_GIVE})")
    try:
        records, meta = read_results(results)
    except NotResultsFile as e:
        raise NotResultsFile(f"{e}; {WHAT_TO_GIVE}") from e
    return Run(results.parent.name if results.name in RUN_FILES else results.stem, results, records, meta)


def nothing_measured(label: str, run: Run) -> str | None:
    """Why ``run`` (``label`` A or B) cannot be compared at all: it holds no case (an empty or stopped run)."""
    if run.records:
        return None
    how = (f"stopped after 0 of {run.meta.get('cases_planned', '?')} cases" if run.meta.get("complete") is False
           else "its results hold none")
    return f"{label} ({run.path}) has no measured cases ({how})"


def differences(a: BenchRecord, b: BenchRecord) -> list[str]:
    """What differs between two records of one case in ``CASE_KEYS`` (a model's config: the keys that differ)."""
    out = []
    for key in CASE_KEYS:
        va, vb = getattr(a, key), getattr(b, key)
        if va is None or vb is None or va == vb:
            continue  # an older record without the field: nothing to compare
        if key == "model":  # a key a record lacks predates it: the record ran with its default
            va, vb = {**MODEL_DEFAULTS, **va}, {**MODEL_DEFAULTS, **vb}
            changed = sorted(k for k in set(va) | set(vb) if va.get(k) != vb.get(k))
            if changed:
                out.append("model " + ", ".join(f"{k} {va.get(k)!r} vs {vb.get(k)!r}" for k in changed))
        else:
            out.append(f"{key} {va} vs {vb}")
    return out


def check_comparable(a: Run, b: Run) -> tuple[list[str], list[str]]:
    """(reasons to refuse, warnings: whole sentences) at the level of the runs. Refused: another preset or device
    kind. Warned: batch, precision, device name, torch version, CPU threads and vector ISA, the reference GEMM's size
    (CPU utilisation), an incomplete (stopped) sweep."""
    refuse, differ = [], []
    if a.meta.get("preset") != b.meta.get("preset"):
        refuse.append(f"preset {a.meta.get('preset')!r} vs {b.meta.get('preset')!r}: different models")
    if a.device_kind != b.device_kind:
        refuse.append(f"device kind {a.device_kind!r} vs {b.device_kind!r}")
    for key in ("batch", "precision", "hardware"):
        if a.meta.get(key) != b.meta.get(key):
            differ.append(f"{key} {a.meta.get(key)!r} vs {b.meta.get(key)!r}")
    env_a, env_b = run_env(a.records, a.meta), run_env(b.records, b.meta)
    for key in ("torch", "cuda", "dali", "cpu_threads", "cpu_capability", "machine_class"):
        if env_a.get(key) != env_b.get(key):
            differ.append(f"{key} {env_a.get(key)!r} vs {env_b.get(key)!r}")
    gemms_a, gemms_b = ({r.extra.get("gemm_n") for r in run.records} - {None, 0} for run in (a, b))
    if gemms_a and gemms_b and gemms_a != gemms_b:  # the peak each utilisation divides by: another workload
        differ.append(f"reference GEMM n={'/'.join(map(str, sorted(gemms_a)))} vs "
                      f"n={'/'.join(map(str, sorted(gemms_b)))}: utilisation divides by different GEMMs and a case "
                      "timed against another GEMM has no paired ratio; compare images/s, or rerun one side with the "
                      "other's bench.gemm_n")
    warn = [f"the runs differ in {d}" for d in differ]
    for label, run in (("A", a), ("B", b)):
        if run.meta.get("complete") is False:
            warn.append(f"{label} ({run.path}) is incomplete: {len(run.records)} of {run.meta.get('cases_planned')} "
                        "cases (the sweep was stopped)")
    return refuse, warn


@dataclass
class CaseComparison:
    """One case in A and B. Ratios are B / A (above 1: B is faster or uses the machine better)."""

    case: str
    status_a: str | None
    status_b: str | None
    images_a: float | None = None
    images_b: float | None = None
    util_a: float | None = None
    util_b: float | None = None
    paired_a: float | None = None  # clips per GEMM time (report.normalised_throughput); None when the GEMMs differ
    paired_b: float | None = None
    mem_a: int | None = None
    mem_b: int | None = None
    notes: list[str] = field(default_factory=list)  # what makes the case not like for like
    cautions: list[str] = field(default_factory=list)  # shown beside the notes; the case stays like for like
    other_model: bool = False  # the two records measured different models
    other_work: bool = False  # the same model, other FLOPs per clip: utilisation B/A is no throughput ratio

    @property
    def images_ratio(self) -> float | None:
        return _ratio(self.images_b, self.images_a)

    @property
    def util_ratio(self) -> float | None:
        return _ratio(self.util_b, self.util_a)

    @property
    def paired_ratio(self) -> float | None:
        """Throughput in GEMM time B/A: steps and GEMMs timed in pairs within each case (CPU)."""
        return _ratio(self.paired_b, self.paired_a)

    @property
    def normalised_ratio(self) -> float | None:
        """The paired ratio where both records have one, else utilisation B/A (not when the FLOPs per clip differ),
        else images/s B/A."""
        return self.paired_ratio or (None if self.other_work else self.util_ratio) or self.images_ratio

    @property
    def peak_ratio(self) -> float | None:
        """How much faster B's machine ran the case's reference GEMM (images ratio / utilisation ratio; none when the
        FLOPs per clip differ, which the utilisation ratio holds too)."""
        i, u = self.images_ratio, self.util_ratio
        return i / u if i and u and not self.other_work else None

    @property
    def mem_ratio(self) -> float | None:
        return _ratio(self.mem_b, self.mem_a)

    @property
    def comparable(self) -> bool:
        return self.status_a == self.status_b == "ok" and not self.notes


def _ratio(b: float | None, a: float | None) -> float | None:
    return b / a if finite_positive(a) and finite_positive(b) else None


def compare_records(a: list[BenchRecord], b: list[BenchRecord]) -> list[CaseComparison]:
    """Every case of A (in A's order), then the cases only B has."""
    by_a, by_b = {r.case: r for r in a}, {r.case: r for r in b}
    names = [r.case for r in a] + [r.case for r in b if r.case not in by_a]
    rows = []
    for name in names:
        ra, rb = by_a.get(name), by_b.get(name)
        row = CaseComparison(name, ra.status if ra else None, rb.status if rb else None)
        if ra is None or rb is None:
            row.notes.append("only in A" if rb is None else "only in B")
        else:
            row.images_a, row.images_b = ra.images_per_s, rb.images_per_s
            odd = {side: _implausible(rec) for side, rec in (("A", ra), ("B", rb))}
            row.util_a, row.util_b = (None if odd[side] else rec.utilisation for side, rec in (("A", ra), ("B", rb)))
            row.cautions += [f"{side}'s utilisation {100 * u:.0f}% is above 100% (the GEMM timed beside its steps was "
                             "slowed more than they were): images/s compared" for side, u in odd.items() if u]
            if not any(odd.values()) and ra.extra.get("gemm_n") == rb.extra.get("gemm_n"):
                row.paired_a, row.paired_b = normalised_throughput(ra), normalised_throughput(rb)
            row.mem_a, row.mem_b = ra.peak_mem_bytes, rb.peak_mem_bytes
            differ = differences(ra, rb)
            if [n.split(" ", 1)[0] for n in differ] == ["flops_per_clip"] and ra.flops_per_clip > 0:
                differ, row.other_work = [], True  # the same model, the code doing other work per clip
                row.cautions.append(f"FLOPs per clip {rb.flops_per_clip / ra.flops_per_clip - 1:+.1%} "
                                    f"({ra.flops_per_clip / 1e9:.2f} vs {rb.flops_per_clip / 1e9:.2f} G) at the same "
                                    "model configuration and parameters: the code does other work per clip")
            row.notes += differ
            row.other_model = any(n.split(" ", 1)[0] in MODEL_KEYS for n in row.notes)
            if ra.status != "ok" or rb.status != "ok":
                row.notes.append(f"status {ra.status} vs {rb.status}")
        rows.append(row)
    return rows


def _implausible(rec: BenchRecord) -> float | None:
    """``rec``'s utilisation when it is above 100% (also in records from before the bench set such a figure aside):
    neither it nor the step/GEMM pairs it came from are compared."""
    u = rec.utilisation if rec.utilisation is not None else rec.extra.get("implausible_utilisation")
    return u if u is not None and u > 1.0 else None


def refusals(rows: list[CaseComparison]) -> list[str]:
    """Reasons at the level of the cases to refuse the comparison: a case that measured another model, or none
    like for like (unless some were lost in B: ok in A, failed or missing in B, which is a verdict, not a refusal)."""
    out = [f"{r.case}: another model ({'; '.join(n for n in r.notes if n.split(' ', 1)[0] in MODEL_KEYS)})"
           for r in rows if r.other_model]
    if not any(r.comparable for r in rows) and not lost(rows):
        out.append("no case is like for like in both runs")
    return out


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _num(v: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def format_table(rows: list[CaseComparison]) -> str:
    lines = ["| case | images/s A | images/s B | B/A | util % A | util % B | util B/A | paired B/A | normalised B/A "
             "| peak B/A | memory B/A | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.case} | {_num(r.images_a)} | {_num(r.images_b)} | {_x(r.images_ratio)} "
                     f"| {_num(r.util_a, '.1f', 100)} | {_num(r.util_b, '.1f', 100)} | {_x(r.util_ratio)} "
                     f"| {_x(r.paired_ratio)} | {_x(r.normalised_ratio)} | {_x(r.peak_ratio)} | {_x(r.mem_ratio)} "
                     f"| {'; '.join(r.notes + r.cautions)} |")
    return "\n".join(lines)


def summarise(rows: list[CaseComparison]) -> dict[str, float | int | None]:
    """Medians over the comparable cases of the images/s, utilisation, paired, normalised, peak and memory
    ratios."""
    ok = [r for r in rows if r.comparable]

    def med(values: list[float | None]) -> float | None:
        vs = [v for v in values if v]
        return statistics.median(vs) if vs else None

    return {"cases": len(rows), "comparable": len(ok), "images_ratio": med([r.images_ratio for r in ok]),
            "util_ratio": med([r.util_ratio for r in ok]), "paired_ratio": med([r.paired_ratio for r in ok]),
            "normalised_ratio": med([r.normalised_ratio for r in ok]),
            "peak_ratio": med([r.peak_ratio for r in ok]), "mem_ratio": med([r.mem_ratio for r in ok])}


MACHINE_MOVED = 1.2  # the machine's GEMM rate B/A beyond which (either way) one run shared a busier machine


def machine_moved(peak_ratio: float | None) -> str | None:
    """A warning when the median peak ratio says the machine ran its reference GEMM at another speed in B than in A
    (other jobs on a shared machine, clocks): the paired ratio corrects for most of it, not all."""
    if peak_ratio is None or 1 / MACHINE_MOVED <= peak_ratio <= MACHINE_MOVED:
        return None
    return (f"the machine ran its reference GEMM {peak_ratio:.2f}x as fast in B as in A (median peak B/A): one run "
            "shared a busier machine, which the paired ratio corrects for mostly, not wholly (same-tree runs have "
            "read 0.89x then); read a ratio near --fail-below against a rerun on a quiet machine")


def below(rows: list[CaseComparison], threshold: float) -> list[CaseComparison]:
    """The like-for-like cases whose normalised ratio is under ``threshold``."""
    return [r for r in rows if r.comparable and r.normalised_ratio is not None and r.normalised_ratio < threshold]


def lost(rows: list[CaseComparison]) -> list[CaseComparison]:
    """The cases ``ok`` in A that B does not have or did not complete (out of memory, an error, skipped)."""
    return [r for r in rows if r.status_a == "ok" and r.status_b != "ok"]


def comparison_figure(rows: list[CaseComparison], title: str) -> Any:
    """The figure of ``plot_comparison``: per case, bars of the images/s and normalised ratios (B/A) drawn from 1x
    on a log axis (left of the 1x line: B slower), and a red cross at 1x labelled LOST for a case ok in A that B
    lost (out of memory, an error, missing), which has no ratio and is the worst outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    gone = {r.case for r in lost(rows)}
    shown = [r for r in rows if r.images_ratio or r.case in gone]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.32 * max(len(shown), 1)))
    drawn = [(i, r) for i, r in enumerate(shown) if r.images_ratio]
    norm = [(i, r) for i, r in drawn if r.normalised_ratio != r.images_ratio]
    if drawn:
        ax.barh([i + 0.2 for i, _ in drawn], [r.images_ratio - 1 for _, r in drawn], left=1, height=0.4,
                label="images/s B/A", color="tab:blue")
    if norm:
        ax.barh([i - 0.2 for i, _ in norm], [r.normalised_ratio - 1 for _, r in norm], left=1, height=0.4,
                label="normalised B/A (GEMM-paired; what --fail-below reads)", color="tab:orange")
    lost_at = [(i, r) for i, r in enumerate(shown) if r.case in gone]
    if lost_at:
        ax.plot([1.0] * len(lost_at), [i for i, _ in lost_at], "X", color="tab:red", markersize=9, linestyle="none",
                label="LOST in B (no ratio)")
        for i, r in lost_at:
            ax.annotate(f"LOST: {r.status_b or 'missing'} in B", (1.0, i), xytext=(8, 0), textcoords="offset points",
                        va="center", fontsize=7, color="tab:red")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ends = [1.0] + [r.images_ratio for _, r in drawn] + [r.normalised_ratio for _, r in norm]
    ax.set_xlim(min(ends) / 1.3, max(ends) * 1.3)
    times = FuncFormatter(lambda v, _: f"{v:g}x")
    ax.xaxis.set_major_formatter(times)
    ax.xaxis.set_minor_formatter(times)
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.set_yticks(range(len(shown)), [r.case + (" *" if not r.comparable else "") for r in shown], fontsize=7)
    ax.set_ylim(len(shown) - 0.4, -0.6)  # the first case on top
    ax.set_xlabel("B / A from 1x (log scale; * = not like for like, see compare.md)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_comparison(rows: list[CaseComparison], path: Path, title: str) -> Path:
    """``compare.png``: ``comparison_figure`` of ``rows``."""
    import matplotlib.pyplot as plt

    fig = comparison_figure(rows, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from timesformer_harness.common import setup_logging

    p = argparse.ArgumentParser(prog="python -m timesformer_harness.bench compare",
                                description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 compared, 1 a case below --fail-below (or lost in B), 2 refused "
                                       "or unreadable, or --out not written.")
    p.add_argument("run_a", help="runs/bench/<stamp>-<attn> directory (or its results.json): the reference")
    p.add_argument("run_b", help="the run compared with it")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/compare/<A>_vs_<B>)")
    p.add_argument("--force", action="store_true", help="compare even what is refused (other preset, device kind "
                                                        "or model; no case like for like)")
    p.add_argument("--fail-below", type=float, default=None, metavar="RATIO",
                   help="exit 1 when a like-for-like case's normalised ratio B/A is below RATIO (e.g. 0.9), or a "
                        "case that ran in A is missing or did not run in B")
    args = p.parse_args(argv)
    if args.fail_below is not None and not 0 < args.fail_below < float("inf"):  # nan too: it could never fail
        p.error(f"--fail-below {args.fail_below}: give a finite ratio B/A above 0 (0.9: B at most 10% slower)")
    setup_logging()
    try:
        a, b = load_run(args.run_a), load_run(args.run_b)
    except (ValueError, OSError) as e:
        print(f"not comparable: {e}")
        return 2
    empty = [why for why in (nothing_measured("A", a), nothing_measured("B", b)) if why]
    if empty:  # nothing to compare, --force or not
        print(f"not comparable: {'; '.join(empty)}")
        return 2
    refuse, warn = check_comparable(a, b)
    rows = compare_records(a.records, b.records)
    refuse += refusals(rows)
    summary = summarise(rows)
    if busy := machine_moved(summary["peak_ratio"]):
        warn.append(busy)
    for w in warn:
        print(f"warning: {w}")
    for r in refuse:
        print(f"not comparable: {r}")
    if refuse and not args.force:
        print("refusing to compare (--force to compare anyway)")
        return 2
    failing = below(rows, args.fail_below) if args.fail_below is not None else []
    missing = lost(rows) if args.fail_below is not None else []
    out = Path(args.out) if args.out else Path("runs/bench/compare") / f"{a.name}_vs_{b.name}"
    table = format_table(rows)
    head = "".join(f"{label} = {run.path} ({run.meta.get('preset')}, {run.meta.get('hardware')}, git "
                   f"{run.meta.get('env', {}).get('git_sha')})\n" for label, run in (("A", a), ("B", b)))
    verdict = (f"{summary['comparable']}/{summary['cases']} cases like for like; medians B/A: normalised "
               f"{_x(summary['normalised_ratio'])}, paired {_x(summary['paired_ratio'])}, utilisation "
               f"{_x(summary['util_ratio'])}, images/s "
               f"{_x(summary['images_ratio'])}, machine (GEMM peak) {_x(summary['peak_ratio'])}, peak memory "
               f"{_x(summary['mem_ratio'])}")
    if args.fail_below is not None:
        verdict += (f"\n{len(failing)} case(s) below {args.fail_below:g}x" +
                    "".join(f"\n  BELOW {r.case}: {_x(r.normalised_ratio)}" for r in failing) +
                    "".join(f"\n  LOST {r.case}: ok in A, {r.status_b or 'missing'} in B" for r in missing))
    notes = "".join(f"- warning: {w}\n" for w in warn) + "".join(f"- NOT COMPARABLE: {r}\n" for r in refuse)
    report = json.dumps(
        {"a": str(a.path), "b": str(b.path), "refused": refuse, "warnings": warn, "summary": summary,
         "fail_below": args.fail_below, "below": [r.case for r in failing], "lost": [r.case for r in missing],
         "cases": [{**asdict(r), "images_ratio": r.images_ratio, "util_ratio": r.util_ratio,
                    "paired_ratio": r.paired_ratio, "normalised_ratio": r.normalised_ratio, "peak_ratio": r.peak_ratio,
                    "mem_ratio": r.mem_ratio}
                   for r in rows]}, indent=2) + "\n"
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.md", f"# {a.name} vs {b.name}\n\n{head}\n{notes}\n{verdict}\n\n{table}\n")
        atomic_write_text(out / "compare.json", report)
        png = plot_comparison(rows, out / "compare.png", f"{b.name} / {a.name}")
    except OSError as e:  # a file in the way, a full disk: exit 2, not a traceback's 1, which reads as a regression
        why = " is a file, not a folder" if out.is_file() else f": {e.strerror or e} ({e.filename})"
        print(f"not written: --out {out}{why}", file=sys.stderr)
        return 2
    print(head + "\n" + table + "\n\n" + verdict)
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}, {png}")
    return 1 if failing or missing else 0


if __name__ == "__main__":
    sys.exit(main())
