"""The bench's written report: ``summary.md`` (model-suite variants side by side with their ratios against divided
attention, the throughput one GEMM-normalised where the records allow it, then every other case) and the same tables
printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timesformer_harness.bench.record import BenchRecord
from timesformer_harness.variants import REFERENCE
from timesformer_harness.common import atomic_write_text


def _fmt(v: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def normalised_throughput(r: BenchRecord) -> float | None:
    """Clips per reference-GEMM time: the batch over the step's cost in GEMMs, from the step and GEMM blocks timed in
    pairs within the case (``extra.ratio`` x ``calib_reps`` / ``steps_per_block``: the gate's measure, which a
    machine that drifts during the case moves least); None without them (a GPU's table peak), and None when the
    case's utilisation came out above 100% (its GEMMs were slowed more than its steps: the pairs are suspect too)."""
    e = r.extra
    sizes = [e.get(k) for k in ("ratio", "calib_reps", "steps_per_block")]
    if r.device != "cpu" or not r.batch or e.get("implausible_utilisation") or \
            not all(isinstance(v, (int, float)) and v > 0 for v in sizes):
        return None
    ratio, calib_reps, steps_per_block = sizes
    return r.batch / (ratio * calib_reps / steps_per_block)


def throughput_vs(r: BenchRecord, ref: BenchRecord | None) -> str:
    """``r``'s throughput over ``ref``'s: GEMM-normalised (``normalised_throughput``) where both have it, over the
    same GEMM, else raw clips/s, marked ``raw`` (cases timed at different moments of a shared machine)."""
    if ref is None:
        return "-"
    a, b = normalised_throughput(r), normalised_throughput(ref)
    if a and b and r.extra.get("gemm_n") == ref.extra.get("gemm_n"):
        return _ratio(a, b)
    raw = _ratio(r.clips_per_s, ref.clips_per_s)
    return raw if raw == "-" else f"{raw} raw"


THROUGHPUT_NOTE = ("Throughput vs divided is GEMM-normalised: each case's step cost in fp32 GEMMs, from step and GEMM "
                   "blocks timed in pairs within the case (the gate's measure), so that the machine running faster "
                   "during one case than during another does not read as a faster variant. `raw` marks a ratio of "
                   "clips/s as measured (no such GEMM: a GPU's table peak; or a case whose GEMMs were slowed more "
                   "than its steps, utilisation above 100%), which moves with whatever else the machine ran.")


def summary_table(records: list[BenchRecord]) -> str:
    """Markdown tables: model-suite variants side by side with ratios vs divided, then every other case."""
    lines = []
    model = [r for r in records if r.suite == "model"]
    if model:
        lines += ["## Model (synthetic input)", "",
                  "Steady state: each case's first steps (warm-up, autotuning, compilation) are not timed; "
                  "`compile_s` in results.json is the first step's extra time.", "",
                  "| variant | mode | batch | compile | clips/s | images/s | step ms median (95% CI) [p10-p90] | "
                  "peak MiB | params M | GFLOP/clip | GFLOP/s | peak GFLOP/s | util % | "
                  "throughput vs divided (GEMM-normalised, or raw) | "
                  "memory vs divided |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ref = {(r.mode, r.batch, r.compile): r for r in model if r.attention_type == REFERENCE and r.status == "ok"}
        for r in model:
            d = ref.get((r.mode, r.batch, r.compile))
            lines.append(_row([
                r.attention_type, r.mode, str(r.batch), r.compile or "none", _fmt(r.clips_per_s, ".2f"),
                _fmt(r.images_per_s, ".1f"), _step(r),
                _fmt(r.peak_mem_bytes, ".0f", 2**-20), _fmt(r.params, ".2f", 1e-6),
                _fmt(r.flops_per_clip, ".3g", 1e-9), _fmt(r.achieved_flops, ".1f", 1e-9),
                _fmt(r.peak_flops, ".0f", 1e-9), _fmt(r.utilisation, ".1f", 100),
                throughput_vs(r, d), _ratio(r.peak_mem_bytes, d and d.peak_mem_bytes)]))
        lines += ["", THROUGHPUT_NOTE, ""]
        failed = [r for r in model if r.status != "ok" and r.message]
        if failed:  # the reasons, below the table (its step column says only the status)
            lines += [f"- {r.case}: {r.status}: {r.message}" for r in failed] + [""]
        lines += batch_sweep_table(model)
    others = [r for r in records if r.suite != "model"]
    if others:
        lines += ["## Other suites", "",
                  "| case | status | clips/s | images/s | step ms median (95% CI) [p10-p90] | peak MiB | GFLOP/s "
                  "| util % | note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in others:
            note = r.message or r.extra.get("verdict", "")
            if r.suite == "attention" and r.status == "ok":
                note = f"{r.extra['sequences']} seqs x {r.extra['heads']} heads x L={r.extra['seq_len']}"
            clips = r.suite != "attention"  # an attention call is no clip: its step ms is the figure
            lines.append(_row([
                r.case, r.status, _fmt(r.clips_per_s if clips else None, ".2f"),
                _fmt(r.images_per_s if clips else None, ".1f"), _step(r),
                _fmt(r.peak_mem_bytes, ".0f", 2**-20), _fmt(r.achieved_flops, ".1f", 1e-9),
                _fmt(r.utilisation, ".1f", 100), note.replace("|", "/")[:120]]))
        lines.append("")
    for r in others:
        if r.status == "ok" and r.extra.get("shootout"):
            from timesformer_harness.bench.pipeline import format_shootout

            lines += [f"## Loader shoot-out ({r.case}: same clips, {r.extra['rounds']} interleaved rounds, CPU)", "",
                      format_shootout(r.extra["shootout"]), ""]
    implausible = [r for r in records if r.extra.get("implausible_utilisation")]
    if implausible:
        lines += ["Utilisation not reported (`-`) where it came out above 100%: the peak it divides by ran slower than "
                  "the case's own matmuls (on CPU, a GEMM timed beside the steps on a contended machine); images/s "
                  "stands, rerun for a utilisation:", ""]
        lines += [f"- {r.case}: {100 * r.extra['implausible_utilisation']:.0f}% of {_fmt(r.peak_flops, '.1f', 1e-9)} "
                  f"GFLOP/s ({r.peak_flops_source})" for r in implausible] + [""]
    return "\n".join(lines)


# A batch is launch-bound when doubling it costs less than this share of twice the time: a fixed per-step cost
# (the host issuing kernels) dominates the step, not the work, which doubles.
LAUNCH_BOUND_SHARE = 0.75


def sweep_notes(series: list[BenchRecord]) -> dict[int, str]:
    """Notes per batch of one batch sweep (records sorted by batch): ``best`` (the most images/s, the sweep's
    headline), ``launch-bound`` (the next batch's step, of k times the clips, took under 0.75 k times as long)."""
    ok = [r for r in series if r.status == "ok" and r.step_ms and r.batch]
    notes: dict[int, list[str]] = {}
    for a, b in zip(ok, ok[1:]):
        work, cost = b.batch / a.batch, b.step_ms["median"] / a.step_ms["median"]
        if cost < LAUNCH_BOUND_SHARE * work:
            notes.setdefault(a.batch, []).append(f"launch-bound: {work:.0f}x the clips took {cost:.2f}x the time")
    if ok:
        best = max(ok, key=lambda r: r.images_per_s or 0.0)
        notes.setdefault(best.batch, []).insert(0, "best")
    return {batch: "; ".join(n) for batch, n in notes.items()}


def batch_sweep_table(model: list[BenchRecord]) -> list[str]:
    """One table per batch sweep (variant, mode, compile mode with several batches): the MFU per batch, the best
    batch as headline, the launch-bound ones and where memory ran out."""
    series: dict[tuple, list[BenchRecord]] = {}
    for r in model:
        series.setdefault((r.attention_type, r.mode, r.compile or "none"), []).append(r)
    lines: list[str] = []
    for (attn, mode, compile), rs in series.items():
        if len({r.batch for r in rs}) < 2:
            continue
        rs = sorted(rs, key=lambda r: r.batch or 0)
        notes = sweep_notes(rs)
        best = next((r for r in rs if notes.get(r.batch or 0, "").startswith("best")), None)
        head = "no batch ran"
        if best:
            head = (f"best: batch {best.batch}, {_fmt(best.clips_per_s, '.1f')} clips/s, "
                    f"MFU {_fmt(best.utilisation, '.1f', 100)}%")
        lines += [f"## Batch sweep: {attn} {mode}, compile {compile} ({head})", "",
                  "| batch | status | clips/s | step ms | MFU % | peak MiB | first step s | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rs:
            lines.append(_row([str(r.batch), r.status, _fmt(r.clips_per_s, ".1f"),
                               _fmt(r.step_ms and r.step_ms["median"], ".1f"), _fmt(r.utilisation, ".1f", 100),
                               _fmt(r.peak_mem_bytes, ".0f", 2**-20), _fmt(r.extra.get("first_step_s"), ".1f"),
                               (notes.get(r.batch or 0) or r.message).replace("|", "/")[:120]]))
        lines.append("")
    return lines


def _step(r: BenchRecord) -> str:
    if not r.step_ms:
        return r.status
    ms = r.step_ms
    interval = f" ({ms['ci_low']:.1f}-{ms['ci_high']:.1f})" if "ci_low" in ms else ""
    return f"{ms['median']:.1f}{interval} [{ms['p10']:.1f}-{ms['p90']:.1f}]"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_summary(path: Path, records: list[BenchRecord], meta: dict[str, Any]) -> None:
    """``summary.md``: the run's facts, then ``summary_table``; a stopped run (``meta["complete"]`` false) says so
    first, as its ``results.json`` does."""
    env = meta.get("env", {})
    stopped = []
    if meta.get("complete") is False:
        stopped = [f"**Incomplete: the run was stopped after {len(records)} of {meta.get('cases_planned', '?')} "
                   "cases**; the tables hold the cases measured before it stopped.", ""]
    head = [
        f"# Benchmark {meta.get('started', '')}", "", *stopped,
        f"preset `{meta.get('preset')}`, batch {meta.get('batch')} (the pipeline and end-to-end cases: their data "
        f"config's), precision {meta.get('precision')}, "
        f"device {meta.get('hardware')} ({env.get('device')}, {env.get('cpu_threads')} threads), "
        f"torch {env.get('torch')}, DALI {env.get('dali')}, git {env.get('git_sha')}.",
        "Peak for utilisation: " + ("an fp32 GEMM timed between the steps of each case (column peak GFLOP/s); "
                                    if env.get("device") == "cpu" else "")
        + f"run start: {_fmt(meta.get('peak_flops'), '.1f', 1e-9)} GFLOP/s ({meta.get('peak_flops_source')}). "
        f"Peak memory: {meta.get('memory_kind')}. "
        f"Wall time {meta.get('wall_s', 0):.0f} s.", "", "",
    ]
    atomic_write_text(path, "\n".join(head) + summary_table(records) + "\n")
