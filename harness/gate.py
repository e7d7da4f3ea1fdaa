"""Performance regression gate: the bench's model suite, timed against a calibration workload, and a verdict per case.

    python -m timesformer_harness.gate --write-baseline FILE [--preset NAME] [--attn all] [--mode train] [key=value ...]
    python -m timesformer_harness.gate --baseline FILE [--cases PATTERN ...] [--tolerance 0.08] [--out DIR]

A gate case is a bench model-suite case (``timesformer_harness.bench.model``) run in a fresh process with the gate's
settings: each of ``pairs`` samples times a block of calibration GEMMs and a block of the model's train steps, A B
A B ..., about ``block_s`` seconds each, and the case's score is the median over samples of time(B)/time(A).
Anything that slows the whole machine (other users, frequency changes) slows A and B alike and cancels in the
ratio. On CPU each case runs with one intra-op thread (``--threads``): co-tenants then degrade it smoothly instead
of turning OpenMP barriers into outliers. A baseline measures each case in ``--repeats`` fresh processes (their
ratios differ by more than one process's samples do) and keeps the median run; the candidate reuses its block
sizes, so both sides time the same work. The verdict (``timesformer_harness.bench.verdict``): a case regresses when its
normalised throughput drops by more than its tolerance (derived from the baseline's own samples, or ``--tolerance``),
when what it measured differs (model, parameters, FLOPs, input size), or when its peak memory grows past
``--mem-tolerance``; a timing or memory regression is measured once more and counts only if it holds.

Writes ``<out>/<timestamp>/``: ``candidate.json`` (the records), ``verdicts.json`` (per case), ``verdict.json`` (the
overall verdict, for CI) and ``junit.xml`` (one test case per gate case), and prints where.

Exit status: 0 every case passes; 1 a case regressed (each one named); 2 the gate could not judge: no, unreadable or
damaged baseline (checked before anything is measured: ``check_baseline``), another preset, device kind or machine class
(``--other-machine`` to judge anyway), an unknown case pattern, bad arguments. ``make gate`` turns every failure into
make's own status 2: CI should call this module directly, or read ``verdict.json``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from timesformer_harness.bench.case import BenchCase, ModelCase
from timesformer_harness.bench.record import (BenchRecord, NotResultsFile, finite_positive, read_results, run_env,
                                              write_results)
from timesformer_harness.bench.sweep import build_cases, run_case
from timesformer_harness.bench.verdict import DEFAULT_MEM_TOLERANCE, Verdict, better, judge_all, median_run
from timesformer_harness.config import ModelConfig, RootConfig, load_config
from timesformer_harness.metrics import OutputFolderError, check_output_root, new_run_dir, run_stamp
from timesformer_harness.common import atomic_write_text, exit_on_sigterm, setup_logging
from timesformer_harness.runtime import environment_info, precision_name, resolve_precision

logger = logging.getLogger(__name__)

DEFAULT_PAIRS = 7
DEFAULT_BLOCK_S = 0.25  # each A or B block lasts about this long (steps are batched into blocks)
CALIB_N = 384  # calibration GEMM size
DEFAULT_CPU_THREADS = 1  # see the module docstring; 0 = torch's default
# A baseline is written once and read by every gate run: it measures each case in this many fresh processes, whose
# ratios differ by more than one process's samples do (memory layout, scheduling), and keeps the median.
DEFAULT_REPEATS = 3
CASE_TIMEOUT_S = 900


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m timesformer_harness.gate", description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 pass, 1 a case regressed, 2 the gate could not judge.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--baseline", help="gate the current tree against this baseline JSON")
    g.add_argument("--write-baseline", help="measure the current tree and write a baseline JSON here")
    p.add_argument("--preset", default=None, help="model preset (write: default by device; gate: must be the "
                                                  "baseline's)")
    p.add_argument("--attn", default="all", help="attention variants to measure (write) or to gate (gate)")
    p.add_argument("--mode", default=None, help="train | infer | both (write: default train; gate: a filter)")
    p.add_argument("--cases", nargs="+", default=None, metavar="PATTERN",
                   help="gate only the baseline cases matching these names or glob patterns")
    p.add_argument("--pairs", type=int, default=None, help=f"A/B samples per case (default: the baseline's, or "
                                                           f"{DEFAULT_PAIRS} when writing)")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help="write: fresh processes per case (the baseline keeps the median run, and every run's "
                        "samples for the tolerance)")
    p.add_argument("--threads", type=int, default=DEFAULT_CPU_THREADS,
                   help="CPU intra-op threads per case (write; the gate reuses the baseline's)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="allowed normalised throughput drop for every case (default: each case's own, from the "
                        "baseline's samples)")
    p.add_argument("--mem-tolerance", type=float, default=None, help="allowed peak-memory growth")
    p.add_argument("--other-machine", action="store_true",
                   help="judge against a baseline from another machine class (its ratios are not like for like)")
    p.add_argument("--inject-delay", action="append", default=[], metavar="CASE=FRACTION",
                   help="make CASE's steps FRACTION longer (busy work after each step, sized from the step's own time "
                        "in this run): checks the gate catches a slowdown of that size on this machine")
    p.add_argument("--out", default="runs/gate", help="where the candidate's records and verdicts are written")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (write) or model.KEY=VALUE what-ifs "
                                                "for the candidate (gate), e.g. model.depth=6")
    args = p.parse_args(argv)
    if args.pairs is not None and args.pairs < 1:
        p.error(f"--pairs {args.pairs}: give 1 or more samples per case")
    if args.tolerance is not None and not 0 < args.tolerance < 1:  # nan too: a gate that could never fail
        p.error(f"--tolerance {args.tolerance}: give the allowed drop as a fraction between 0 and 1 (0.08 = 8%)")
    if args.mem_tolerance is not None and not 0 <= args.mem_tolerance < 10:
        p.error(f"--mem-tolerance {args.mem_tolerance}: give the allowed growth as a fraction (0.05 = 5%)")
    if args.cases:  # --cases takes every word after it: a key=value among them is an override, never a case name
        args.overrides += [c for c in args.cases if "=" in c]
        args.cases = [c for c in args.cases if "=" not in c] or None
    return args


def baseline_cases(cfg: RootConfig, preset: str, attns: list[str], modes: list[str], device: torch.device,
                   peak: tuple[float | None, str | None], precision: str, pairs: int, threads: int) -> list[BenchCase]:
    """The model-suite cases a baseline times: each variant and mode at ``bench.batch_size`` (or the batches
    ``bench.batches`` names), not the bench's batch sweep to out-of-memory on a GPU: a gate compares one figure
    per case, and an out-of-memory record is not one."""
    bench = replace(cfg.bench, suites=["model"], steps=pairs, block_s=DEFAULT_BLOCK_S, threads=threads,
                    batches=list(cfg.bench.batches) or [cfg.bench.batch_size])
    return [replace(c, gemm_n=CALIB_N) for c in build_cases(replace(cfg, bench=bench), preset, attns, modes, device,
                                                            peak, precision)]


def write_baseline(args: argparse.Namespace) -> int:
    from timesformer_harness.bench import attention_types, measure_peak, modes_of, resolve

    cfg, preset, device = resolve(preset=args.preset, overrides=args.overrides)
    try:
        check_output_root(Path(args.write_baseline).parent, "--write-baseline FILE")
    except OutputFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pairs = args.pairs or DEFAULT_PAIRS
    precision = precision_name(resolve_precision(cfg.bench.precision, device))
    peak = measure_peak(device, precision, CALIB_N) if device.type == "cuda" else (None, None)
    cases = baseline_cases(cfg, preset, attention_types(args.attn), modes_of(args.mode or "train"), device, peak,
                           precision, pairs, args.threads)
    runs = [[r] for r in measure(cases)]
    # the later runs time the blocks the first one sized, so that every run's ratio is of the same work
    sized = [c if r[0].status != "ok" else replace(c, steps_per_block=r[0].extra["steps_per_block"],
                                                   calib_reps=r[0].extra["calib_reps"]) for c, r in zip(cases, runs)]
    for _ in range(args.repeats - 1):
        for case_runs, rec in zip(runs, measure(sized)):
            case_runs.append(rec)
    records = [median_run(case_runs) for case_runs in runs]
    bad = [r for r in records if r.status != "ok"]
    for r in bad:
        print(f"{r.case}: {r.status} {r.message}")
    if bad:
        return 1
    env = environment_info(device)
    meta = {"kind": "gate-baseline", "preset": preset, "precision": precision, "batch": cfg.bench.batch_size,
            "device": device.type, "hardware": env["device_name"], "env": env, "pairs": pairs,
            "block_s": DEFAULT_BLOCK_S, "threads": cases[0].threads, "channels_last": cfg.bench.channels_last,
            "warmup": cfg.bench.warmup, "repeats": args.repeats,
            "tolerance": args.tolerance, "mem_tolerance": args.mem_tolerance, "overrides": list(args.overrides)}
    write_results(args.write_baseline, records, meta)
    for r in records:
        print(f"{r.case}: {r.images_per_s:.1f} images/s, ratio {r.extra['ratio']:.3f} (runs "
              f"{', '.join(f'{x:.3f}' for x in r.extra['runs'])}; samples {min(r.extra['ratios']):.3f}-"
              f"{max(r.extra['ratios']):.3f}), peak {r.peak_mem_bytes / 2**20:.0f} MiB")
    print(f"baseline written: {args.write_baseline}")
    return 0


def candidate_model(base: ModelConfig, overrides: list[str]) -> ModelConfig:
    """The baseline's model with ``model.KEY=VALUE`` overrides (a what-if, e.g. ``model.depth=6``), checked."""
    changes = {}
    for item in overrides:
        if not item.startswith("model.") or "=" not in item:
            raise ValueError(f"override {item!r}: the gate takes only model.KEY=VALUE overrides")
        key = item.split("=", 1)[0].split(".", 1)[1]
        changes[key] = getattr(load_config(None, [item]).model, key)  # parsed and typed by the schema
    return replace(base, **changes)


REWRITE = "re-write it with `make gate-baseline`"


def baseline_model(rec: BenchRecord, meta: dict[str, Any]) -> ModelConfig:
    """The model a baseline record measured (a schema-1 baseline kept it once, in its meta); ValueError naming the
    record for one this tree's ``ModelConfig`` cannot build."""
    model = rec.model or meta.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"record {rec.case} holds no model configuration: not a gate baseline; {REWRITE}")
    if not rec.model:
        model = {**model, "attention_type": rec.attention_type}
    unknown = sorted(set(model) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ValueError(f"record {rec.case}: model key(s) {unknown} unknown to this tree's ModelConfig: the baseline "
                         f"was written by another version of the harness; {REWRITE}")
    try:
        return ModelConfig(**model)
    except (TypeError, ValueError) as e:
        raise ValueError(f"record {rec.case}: its model configuration does not build here ({e}); {REWRITE}") from e


def check_baseline(baseline: list[BenchRecord], meta: dict[str, Any]) -> None:
    """Refuse a damaged or foreign baseline before anything is measured (ValueError naming the record and the fix):
    every record ok, with a model this tree builds, a finite positive ratio and positive whole block sizes."""
    for rec in baseline:
        if rec.status != "ok":
            raise ValueError(f"record {rec.case} has status {rec.status!r}, not 'ok': a baseline holds measured cases "
                             f"only; {REWRITE}")
        baseline_model(rec, meta)
        for key in ("steps_per_block", "calib_reps", "gemm_n", "calib_n"):  # calib_n: gemm_n's older name
            value = rec.extra.get(key)
            if value is None and key in ("gemm_n", "calib_n"):
                continue  # older baselines: the gate's default size
            if value is None:
                raise ValueError(f"record {rec.case} has no block sizes (extra.steps_per_block, calib_reps): not a "
                                 f"gate baseline; {REWRITE}")
            if not (finite_positive(value) and isinstance(value, int)):
                raise ValueError(f"record {rec.case}: extra.{key} is {value!r}, not a positive whole number: a "
                                 f"damaged baseline; {REWRITE}")
        ratio = rec.extra.get("ratio")
        if not finite_positive(ratio):
            raise ValueError(f"record {rec.case}: extra.ratio is {ratio!r}, not a finite positive number: a damaged "
                             f"baseline; {REWRITE}")


def candidate_cases(baseline: list[BenchRecord], meta: dict[str, Any], device: torch.device, overrides: list[str],
                    pairs: int | None, delays: dict[str, float]) -> list[ModelCase]:
    """The cases that measure the baseline's records (which ``check_baseline`` passed) again on this tree: the same
    model (plus ``overrides``), input, settings and block sizes."""
    out = []
    for rec in baseline:
        out.append(ModelCase(
            preset=rec.preset, device=str(device),
            batch=rec.batch, precision=rec.precision, warmup=meta.get("warmup", 2),
            steps=pairs or meta.get("pairs", DEFAULT_PAIRS), threads=meta.get("threads", 0),
            model=candidate_model(baseline_model(rec, meta), overrides), mode=rec.mode, frames=rec.frames,
            img_size=rec.img_size, channels_last=meta.get("channels_last", True),
            gemm_n=rec.extra.get("gemm_n") or rec.extra.get("calib_n") or CALIB_N,
            peak_flops=rec.peak_flops if rec.device == "cuda" else None,
            peak_flops_source=rec.peak_flops_source if rec.device == "cuda" else None,
            steps_per_block=rec.extra["steps_per_block"], calib_reps=rec.extra["calib_reps"],
            compile=rec.compile or "none", sweep_batch=f"/b{rec.batch}" in rec.case,  # as named in the baseline
            inject_slowdown=delays.get(rec.case, 0.0)))
    return out


def measure(cases: list[ModelCase]) -> list[BenchRecord]:
    from tqdm import tqdm

    return [run_case(c, CASE_TIMEOUT_S) for c in tqdm(cases, desc="gate", unit="case", file=sys.stderr)]


def select(baseline: list[BenchRecord], args: argparse.Namespace) -> list[BenchRecord]:
    """The baseline records ``--cases``, ``--attn`` and ``--mode`` leave; ValueError for a pattern matching none."""
    chosen = baseline
    if not baseline:
        raise ValueError("the baseline holds no case; write one with make gate-baseline")
    if args.cases:
        unknown = [p for p in args.cases if not any(fnmatch.fnmatchcase(r.case, p) for r in baseline)]
        if unknown:
            raise ValueError(f"--cases {unknown} match no baseline case; its cases: {[r.case for r in baseline]}")
        chosen = [r for r in chosen if any(fnmatch.fnmatchcase(r.case, p) for p in args.cases)]
    if args.attn != "all":
        chosen = [r for r in chosen if r.attention_type == args.attn]
    if args.mode and args.mode != "both":
        chosen = [r for r in chosen if r.mode == args.mode]
    if not chosen:
        held = sorted({(r.attention_type, r.mode) for r in baseline})
        raise ValueError(f"no baseline case is left by --attn {args.attn}" + (f" --mode {args.mode}" if args.mode else "")
                         + f"; it holds (attention, mode) {held}")
    return chosen


def parse_delays(items: list[str], baseline: list[BenchRecord]) -> dict[str, float]:
    delays = {}
    for item in items:
        case, sep, fraction = item.rpartition("=")
        if not sep or case not in {r.case for r in baseline}:
            raise ValueError(f"--inject-delay {item!r}: expected CASE=FRACTION with a baseline case, e.g. "
                             f"{baseline[0].case}=0.10")
        try:
            delays[case] = float(fraction)
        except ValueError:
            delays[case] = math.nan  # refused below, as a number out of range is
        if not 0 < delays[case] < 100:
            raise ValueError(f"--inject-delay {item!r}: the fraction {fraction!r} must be a number above 0 (0.10: "
                             "each step 10% longer)")
    return delays


def check_compatible(meta: dict[str, Any], baseline: list[BenchRecord], device: torch.device, preset: str | None,
                     other_machine: bool) -> None:
    """Refuse to judge across device kinds, presets or (unless ``other_machine``) machine classes: ValueError naming
    the fix."""
    if meta.get("kind") != "gate-baseline":
        raise ValueError("this file is not a gate baseline (meta.kind != 'gate-baseline'); write one with "
                         "`python -m timesformer_harness.gate --write-baseline FILE`")
    if meta.get("device") != device.type:
        raise ValueError(f"baseline was measured on {meta.get('device')!r}, this run is on {device.type!r}; "
                         "write a baseline on this machine class (make gate-baseline BASELINE=...)")
    if preset and meta.get("preset") != preset:
        raise ValueError(f"baseline preset {meta.get('preset')!r} != --preset {preset!r}; drop --preset or write a "
                         "new baseline")
    here = environment_info(device)["machine_class"]
    there = run_env(baseline, meta).get("machine_class")
    if there and there != here and not other_machine:
        raise ValueError(f"baseline machine class {there!r}, this machine {here!r}: write a baseline here "
                         "(make gate-baseline BASELINE=...), or pass --other-machine to judge anyway")


def stack_notes(baseline_env: dict[str, Any], candidate_env: dict[str, Any]) -> list[str]:
    """What differs between the environments the baseline's and the candidate's cases ran in (each case's own
    process: its threads, not the gate's): the notes printed with a verdict."""
    return [f"{k} {baseline_env.get(k)!r} -> {candidate_env.get(k)!r}"
            for k in ("machine_class", "torch", "cuda", "cpu_threads")
            if baseline_env.get(k) is not None and baseline_env.get(k) != candidate_env.get(k)]


def environment_notes(baseline: list[BenchRecord], meta: dict[str, Any], candidate: list[BenchRecord]) -> list[str]:
    """``stack_notes`` of the baseline's and the candidate's cases; none where no candidate case recorded its
    environment (every one failed): the gate's own process is not where the cases ran."""
    cand_env = run_env(candidate, {})
    return stack_notes(run_env(baseline, meta), cand_env) if cand_env else []


def format_table(verdicts: list[Verdict], baseline: list[BenchRecord], candidate: list[BenchRecord]) -> str:
    base, cand = {r.case: r for r in baseline}, {r.case: r for r in candidate}
    lines = ["| case | base images/s | cand images/s | base ratio | cand ratio | normalised change | tolerance "
             "| verdict |", "|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        b, c = base.get(v.case), cand.get(v.case)
        fmt = lambda r: "-" if r is None or r.images_per_s is None else f"{r.images_per_s:.1f}"  # noqa: E731
        change = "-" if v.change is None else f"{100 * v.change:+.1f}%"
        verdict = "REGRESSED: " + "; ".join(v.reasons) if v.regressed else "ok" + (
            f" ({'; '.join(v.notes)})" if v.notes else "")
        lines.append(f"| {v.case} | {fmt(b)} | {fmt(c)} | {v.base_ratio or 0:.3f} | {v.cand_ratio or 0:.3f} "
                     f"| {change} | -{100 * (v.tolerance or 0):.1f}% | {verdict} |")
    return "\n".join(lines)


def junit_xml(verdicts: list[Verdict], seconds: float) -> str:
    """One JUnit test case per gate case; a regression is a failure carrying its reasons."""
    failed = [v for v in verdicts if v.regressed]
    suite = ET.Element("testsuite", name="gate", tests=str(len(verdicts)), failures=str(len(failed)),
                       time=f"{seconds:.1f}")
    for v in verdicts:
        case = ET.SubElement(suite, "testcase", classname="gate", name=v.case)
        if v.regressed:
            ET.SubElement(case, "failure", message="; ".join(v.reasons)).text = "\n".join(v.reasons)
        elif v.notes:
            ET.SubElement(case, "system-out").text = "\n".join(v.notes)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def gate(args: argparse.Namespace) -> int:
    from timesformer_harness.metrics import Stopwatch
    from timesformer_harness.runtime import resolve_device

    path = Path(args.baseline)
    if not path.is_file():
        what = "is a folder, not a baseline file" if path.is_dir() else "does not exist"
        print(f"error: baseline {path} {what}; write one with `make gate-baseline BASELINE={path}`", file=sys.stderr)
        return 2
    clock = Stopwatch()
    try:
        check_output_root(args.out)
    except OutputFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        try:
            baseline, meta = read_results(path)
        except NotResultsFile as e:
            raise ValueError(f"{e}; give the baseline `make gate-baseline BASELINE={path}` writes") from e
        except ValueError as e:
            raise ValueError(f"{e}; {REWRITE}") from e
        device = resolve_device()
        check_compatible(meta, baseline, device, args.preset, args.other_machine)
        baseline = select(baseline, args)
        delays = parse_delays(args.inject_delay, baseline)
        check_baseline(baseline, meta)  # the cases this run gates, before any is measured
        cases = candidate_cases(baseline, meta, device, args.overrides, args.pairs, delays)
    except (ValueError, KeyError) as e:
        print(f"error: cannot gate against {path}: {str(e).removeprefix(f'{path}: ')}", file=sys.stderr)
        return 2
    tol = args.tolerance if args.tolerance is not None else meta.get("tolerance")
    mem_tol = next(t for t in (args.mem_tolerance, meta.get("mem_tolerance"), DEFAULT_MEM_TOLERANCE) if t is not None)
    candidate = measure(cases)
    verdicts = judge_all(baseline, candidate, tol, mem_tol)
    again = [c for c, v in zip(cases, verdicts) if v.remeasure]
    if again:  # a timing or memory regression counts only if a second measurement shows it too
        logger.info("re-measuring %s to confirm", [c.name for c in again])
        first = {v.case: v for v in verdicts}
        by_case, second = {r.case: r for r in candidate}, {}
        for r in measure(again):
            by_case[r.case], second[r.case] = better(by_case[r.case], r), judge_all(
                [b for b in baseline if b.case == r.case], [r], tol, mem_tol)[0]
        candidate = [by_case[r.case] for r in candidate]
        verdicts = judge_all(baseline, candidate, tol, mem_tol)
        for v in verdicts:  # the first measurement's failure stays on record, passed or not
            if v.case in second:
                v.notes.append(f"measured twice, the better counts: first {'; '.join(first[v.case].reasons)}; "
                               f"then {'; '.join(second[v.case].reasons) or 'within tolerance'}")
    out = new_run_dir(args.out, run_stamp())
    notes = environment_notes(baseline, meta, candidate)
    failed = [v for v in verdicts if v.regressed]
    summary = {"passed": not failed, "exit_status": 1 if failed else 0, "cases": len(verdicts),
               "regressed": [v.case for v in failed], "baseline": str(path), "out": str(out),
               "overrides": list(args.overrides), "mem_tolerance": mem_tol, "notes": notes,
               "env": environment_info(device)}
    write_results(out / "candidate.json", candidate, {**meta, "kind": "gate-candidate", "baseline": str(path)})
    atomic_write_text(out / "verdicts.json", json.dumps([asdict(v) for v in verdicts], indent=2) + "\n")
    atomic_write_text(out / "verdict.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "junit.xml", junit_xml(verdicts, clock.elapsed()))
    print(format_table(verdicts, baseline, candidate))
    for note in notes:
        print(f"note: the baseline was measured on another machine or stack: {note}")
    for v in failed:
        print(f"REGRESSED {v.case}: {'; '.join(v.reasons)}")
    print(f"gate: {len(verdicts) - len(failed)}/{len(verdicts)} cases pass (normalised images/s within each case's "
          f"tolerance, memory +{100 * mem_tol:.0f}%, model, params and FLOPs exact)")
    print(f"written: {out}/verdict.json, verdicts.json, junit.xml, candidate.json")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    exit_on_sigterm()  # a case's process group is killed on the way out
    try:
        return write_baseline(args) if args.write_baseline else gate(args)
    except ValueError as e:  # bad arguments found while building cases (an unknown variant, a bad override)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
