"""The list of suites, the cases they make for a config, and running one case in a fresh process.

Each suite module (``timesformer_harness.bench.model``, ``attention``, ``scaling``, ``pipeline``, ``e2e``) has a
``Case`` class (a ``BenchCase``), ``cases(cfg, base, attns, modes, device) -> list[Case]`` and
``run(case, rec, device, dtype)``, which fills the record in the worker process. ``run_case`` sends a case to
``run_worker`` through ``timesformer_harness.runner``, whose outcome policy (``ok`` / ``oom`` / ``error``) decides
the record's status when the worker does not return one.
"""

from __future__ import annotations

import contextlib
import logging
from types import ModuleType
from typing import Any, Iterator

import torch

from timesformer_harness.bench import attention, e2e, model, pipeline, scaling
from timesformer_harness.bench.case import BenchCase, SkipCase
from timesformer_harness.bench.record import BenchRecord
from timesformer_harness.config import BENCH_SUITES, RootConfig, check_bench_suites
from timesformer_harness.runner import run_in_fresh_process
from timesformer_harness.runtime import environment_info, resolve_precision, seed_everything

# In the order a run measures them (and BENCH_SUITES names them).
SUITES: dict[str, ModuleType] = {"model": model, "attention": attention, "scaling": scaling, "pipeline": pipeline,
                                 "e2e": e2e}
assert tuple(SUITES) == BENCH_SUITES


def base_settings(cfg: RootConfig, preset: str, precision: str, device: torch.device,
                  peak: tuple[float | None, str | None]) -> dict[str, Any]:
    """The settings every case of a run shares; each suite's ``Case.of`` takes the ones its class has."""
    b = cfg.bench
    cpu = device.type == "cpu"
    return dict(preset=preset, model=cfg.model, device=str(device), batch=b.batch_size, precision=precision,
                channels_last=b.channels_last, warmup=b.warmup, steps=b.steps, mem_limit_gb=b.mem_limit_gb if cpu
                else 0.0, threads=b.threads if cpu else 0, gemm_n=b.gemm_n if cpu else 0, block_s=b.block_s,
                peak_flops=peak[0], peak_flops_source=peak[1])


def build_cases(cfg: RootConfig, preset: str, attns: list[str], modes: list[str], device: torch.device,
                peak: tuple[float | None, str | None], precision: str = "fp32") -> list[BenchCase]:
    """The cases of the suites in ``cfg.bench.suites``, suite by suite in ``BENCH_SUITES`` order."""
    check_bench_suites(cfg.bench.suites)
    base = base_settings(cfg, preset, precision, device, peak)
    return [case for name, suite in SUITES.items() if name in cfg.bench.suites
            for case in suite.cases(cfg, base, attns, modes, device)]


def case_from_dict(payload: dict[str, Any]) -> BenchCase:
    """The case a ``BenchCase.to_dict`` payload describes (its ``suite`` names the class)."""
    if payload.get("suite") not in SUITES:
        raise ValueError(f"bench case of suite {payload.get('suite')!r}; choose from {list(SUITES)}")
    return SUITES[payload["suite"]].Case.from_dict(payload)


# torch's loggers that do not hand their records up to "torch" (propagate off): a handler goes on each
TORCH_LOGGERS = ("torch", "torch._dynamo", "torch._inductor", "torch._functorch")
MAX_TORCH_WARNINGS = 20


@contextlib.contextmanager
def torch_warnings() -> Iterator[list[str]]:
    """The warnings torch logs while it runs (a graph break, a recompile, a Triton kernel torch could not analyse
    and so copies every input of), each distinct first line once, up to ``MAX_TORCH_WARNINGS``: what explains an
    odd figure of a compiled case, kept in its record rather than lost in the worker's stderr."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            line = f"{record.name}: {record.getMessage().splitlines()[0] if record.getMessage() else ''}"[:300]
            if line not in seen and len(seen) < MAX_TORCH_WARNINGS:
                seen.append(line)

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in TORCH_LOGGERS]
    for log in loggers:
        log.addHandler(handler)
    try:
        yield seen
    finally:
        for log in loggers:
            log.removeHandler(handler)


def run_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process (the fresh worker) and return its record as a dict.

    Exceptions propagate to ``timesformer_harness.runner``, which classifies them; ``SkipCase`` becomes a ``skipped``
    record.
    """
    case = case_from_dict(payload)
    device = torch.device(case.device)
    if device.type == "cpu" and case.threads:
        # e.g. the gate's one intra-op thread: with co-tenants on a small CPU, spinning OpenMP barriers whose
        # threads get preempted turn contention into outliers; a single thread degrades smoothly.
        torch.set_num_threads(case.threads)
    seed_everything(case.seed)
    dtype = resolve_precision(case.precision, device)
    rec = case.record(device)
    rec.env = environment_info(device)
    with torch_warnings() as warned:
        try:
            SUITES[case.suite].run(case, rec, device, dtype)
        except SkipCase as e:
            rec.status, rec.message = "skipped", str(e)[:300]
    if warned:
        rec.extra["torch_warnings"] = warned
    return rec.to_dict()


def run_case(case: BenchCase, timeout_s: float) -> BenchRecord:
    """Run ``case`` in a fresh process; an ``oom``/``error`` outcome becomes the record's status and message
    (with the worker's traceback, if it raised, in ``extra["traceback"]``)."""
    out = run_in_fresh_process(run_worker, case.to_dict(), timeout_s=timeout_s, mem_limit_gb=case.mem_limit_gb)
    if out.status == "ok":
        return BenchRecord.from_dict(out.result)
    rec = case.record(torch.device(case.device))
    rec.status, rec.message = out.status, out.message
    if out.traceback:
        rec.extra["traceback"] = out.traceback
    return rec
