"""The gate's verdict over two sets of model-suite records: a case regresses when its normalised throughput drops by
more than its tolerance, when its counted quantities differ, or when its peak memory grows past the memory
tolerance.

Normalised throughput is the record's ``extra["ratio"]``: the median over samples of the time of a block of model
steps over the time of a block of a calibration GEMM timed beside it (``bench.case.time_model_step``). A case's
tolerance comes from its baseline's own samples: ``TOLERANCE_Z`` times the spread of the baseline's median ratio
(half its 95% bootstrap interval, relative), combined for two medians, never below ``TOLERANCE_FLOOR`` (the run-to-run
drift a clean tree shows on a shared machine, which no single run's spread can see) nor above ``TOLERANCE_CEILING``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from timesformer_harness.bench.compare import differences
from timesformer_harness.bench.record import BenchRecord, finite_positive
from timesformer_harness.metrics import relative_spread

TOLERANCE_FLOOR = 0.06
TOLERANCE_CEILING = 0.15
TOLERANCE_Z = 2.0
DEFAULT_MEM_TOLERANCE = 0.05  # peak memory growth; a memory regression is re-measured like a timing one


@dataclass
class Verdict:
    """The comparison of one case: ``regressed`` with the reasons, or not."""

    case: str
    base_ratio: float | None = None
    cand_ratio: float | None = None
    change: float | None = None  # normalised throughput change, candidate vs baseline (-0.25 = 25% slower)
    tolerance: float | None = None
    regressed: bool = False
    remeasure: bool = False  # only timing or memory failed: worth a second measurement
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def tolerance_for(base: BenchRecord, fixed: float | None = None) -> float:
    """``fixed`` when given, else the case's tolerance from its baseline's pair ratios (see the module docstring)."""
    if fixed is not None:
        return fixed
    ratios = [r for r in base.extra.get("ratios") or [] if finite_positive(r)]
    if len(ratios) < 3:
        return TOLERANCE_CEILING
    spread = TOLERANCE_Z * math.sqrt(2) * relative_spread(ratios)
    return min(max(spread, TOLERANCE_FLOOR), TOLERANCE_CEILING)


def judge(base: BenchRecord, cand: BenchRecord | None, tolerance: float | None = None,
          mem_tolerance: float = DEFAULT_MEM_TOLERANCE) -> Verdict:
    """One case. Throughput is one-sided (only slower fails); what was measured (model, params, FLOPs, input)
    must match exactly; peak memory may grow by ``mem_tolerance``."""
    v = Verdict(case=base.case, base_ratio=base.extra.get("ratio"), tolerance=tolerance_for(base, tolerance))
    if cand is None:
        v.regressed = True
        v.reasons.append("missing from the candidate run")
        return v
    if cand.status != "ok":
        v.regressed = True
        v.reasons.append(f"candidate status {cand.status}: {cand.message}")
        return v
    measured_other = differences(base, cand)
    if measured_other:
        v.regressed = True
        v.reasons += measured_other
    v.cand_ratio = cand.extra.get("ratio")
    timing = memory = False
    if not (finite_positive(v.base_ratio) and finite_positive(v.cand_ratio)):  # fail closed: cannot be judged
        v.regressed = True
        v.reasons.append(f"no normalised images/s to compare (baseline {v.base_ratio}, candidate {v.cand_ratio})")
    else:
        v.change = v.base_ratio / v.cand_ratio - 1.0  # ratio = time(model)/time(calibration); throughput ~ 1/ratio
        if v.change < -v.tolerance:
            timing = True
            v.reasons.append(f"normalised images/s {100 * v.change:+.1f}% (tolerance -{100 * v.tolerance:.1f}%)")
        elif v.change > v.tolerance:
            v.notes.append(f"faster by {100 * v.change:.0f}%, past the tolerance: the baseline no longer describes "
                           "this machine or tree, and a slowdown of up to that much would pass unseen; rewrite it "
                           "(make gate-baseline)")
    if base.peak_mem_bytes and cand.peak_mem_bytes is not None:
        growth = cand.peak_mem_bytes / base.peak_mem_bytes - 1.0
        if growth > mem_tolerance:
            memory = True
            v.reasons.append(f"peak memory {base.peak_mem_bytes / 2**20:.1f} -> {cand.peak_mem_bytes / 2**20:.1f} "
                             f"MiB ({100 * growth:+.1f}%, tolerance +{100 * mem_tolerance:.0f}%)")
    v.regressed = v.regressed or timing or memory
    v.remeasure = (timing or memory) and not measured_other
    return v


def judge_all(baseline: list[BenchRecord], candidate: list[BenchRecord], tolerance: float | None = None,
              mem_tolerance: float = DEFAULT_MEM_TOLERANCE) -> list[Verdict]:
    by_case = {r.case: r for r in candidate}
    return [judge(b, by_case.get(b.case), tolerance, mem_tolerance) for b in baseline]


def median_run(runs: list[BenchRecord]) -> BenchRecord:
    """One record of a case measured in several processes (a baseline): the run whose ratio is the median, carrying
    every run's ratio (``extra["runs"]``) and every sample (``extra["ratios"]``, so the case's tolerance sees the
    spread between processes too, which one process's samples cannot show)."""
    ok = sorted((r for r in runs if r.status == "ok"), key=lambda r: r.extra["ratio"])
    if not ok:
        return runs[0]
    chosen = ok[(len(ok) - 1) // 2]
    extra = {**chosen.extra, "runs": [r.extra["ratio"] for r in ok],
             "ratios": [x for r in ok for x in r.extra["ratios"]]}
    return BenchRecord.from_dict({**chosen.to_dict(), "extra": extra})


def better(first: BenchRecord, second: BenchRecord) -> BenchRecord:
    """Of two measurements of one case, the one with the better normalised throughput and memory (each taken from
    the better side: a re-measurement confirms a regression only when both show it)."""
    if second.status != "ok":
        return first
    best = first if first.extra.get("ratio", math.inf) <= second.extra.get("ratio", math.inf) else second
    other = second if best is first else first
    if other.peak_mem_bytes is not None and (best.peak_mem_bytes is None or other.peak_mem_bytes < best.peak_mem_bytes):
        best = BenchRecord.from_dict({**best.to_dict(), "peak_mem_bytes": other.peak_mem_bytes})
    return best
