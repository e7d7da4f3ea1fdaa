"""``python -m timesformer_harness.bench``: run the suites, write the report; ``python -m timesformer_harness.bench
compare A B``.

    python -m timesformer_harness.bench --attn divided_space_time|joint_space_time|space_only|all [--preset NAME]
        [--mode train|infer|both] [--frames 8,16,32] [--img 224,448] [--suites model,attention,...] [--out DIR]
        [--config FILE] [key=value ...]
    python -m timesformer_harness.bench compare RUN_A RUN_B [--out DIR] [--force]

Every case runs in a fresh process (``timesformer_harness.runner``): on CPU that is what makes its peak RSS its own, and
everywhere it keeps an out-of-memory case from poisoning the next one. A case that runs out of memory is recorded
as ``oom`` and the sweep goes on. Outputs go to ``runs/bench/<timestamp>-<attn>/``: ``results.json``
(``timesformer_harness.bench.record.BenchRecord``, versioned), the same flat as ``results.csv`` and
``results.jsonl``, TensorBoard scalars in ``tb/``, ``summary.md``, ``config.yaml`` and PNG plots.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import torch

from timesformer_harness.bench.case import BenchCase
from timesformer_harness.bench.record import BenchRecord, write_flat, write_results, write_tensorboard
from timesformer_harness.bench.report import summary_table, write_summary
from timesformer_harness.bench.model import count as count_flops_of
from timesformer_harness.bench.sweep import build_cases, run_case
from timesformer_harness.config import (BENCH_SUITES, BenchConfig, ModelConfig, RootConfig, load_config,
                                        to_yaml)
from timesformer_harness.metrics import (OutputFolderError, Stopwatch, gpu_peak_flops, measure_gemm_flops,
                                         new_run_dir, run_stamp)
from timesformer_harness.runtime import device_name, environment_info, precision_name, resolve_device, resolve_precision
from timesformer_harness.variants import VARIANTS
from timesformer_harness.workload import check_attention
from timesformer_harness.common import atomic_write_text, exit_on_sigterm, setup_logging

logger = logging.getLogger(__name__)


class BenchStopped(Exception):
    """The run was stopped by a signal (Ctrl-C, SIGTERM) after ``measured`` of ``planned`` cases; what they measured
    was written to ``out``. ``code`` is the exit status: 128 + the signal's number."""

    def __init__(self, out: Path, measured: int, planned: int, code: int) -> None:
        super().__init__(f"stopped by {'SIGINT (Ctrl-C)' if code == 130 else f'signal {code - 128}'} after "
                         f"{measured} of {planned} cases; what they measured is in {out} (summary.md, results.json)")
        self.out, self.code = out, code


def default_preset(device: torch.device) -> str:
    return "vit_base_patch16" if device.type == "cuda" else "cpu_bench"


def attention_types(attn: str) -> list[str]:
    """``all`` or one variant name, as a list; ValueError naming the choices otherwise."""
    if attn == "all":
        return list(VARIANTS)
    if attn not in VARIANTS:
        raise ValueError(f"--attn {attn!r}; choose from {list(VARIANTS) + ['all']}")
    return [attn]


def modes_of(mode: str) -> list[str]:
    """``both`` or one of ``train``/``infer``, as a list; ValueError otherwise."""
    if mode == "both":
        return ["train", "infer"]
    if mode not in ("train", "infer"):
        raise ValueError(f"--mode {mode!r}; choose train, infer or both")
    return [mode]


def modes_measured(cases: Sequence[BenchCase]) -> list[str]:
    """The modes ``cases`` measure, train first: fewer than ``--mode`` asked for where only the scaling or attention
    suite runs (each measures one mode), none for the pipeline suite alone."""
    seen = {getattr(case, "mode", None) for case in cases}
    return [mode for mode in ("train", "infer") if mode in seen]


def resolve(*, preset: str | None = None, config: str | None = None, overrides: Sequence[str] = (),
            frames: list[int] | None = None, img_sizes: list[int] | None = None, suites: list[str] | None = None,
            out_dir: str | None = None) -> tuple[RootConfig, str, torch.device]:
    """The bench's config, its preset name and the device.

    Precedence, lowest first: the schema defaults, ``config`` (YAML), the preset's model fields
    (``configs/model/<preset>.yaml``; default ``bench.preset`` of ``config`` and ``overrides``, else by device),
    ``overrides`` (``key=value``),
    then the keyword arguments. The result is checked like any loaded config (``load_config``), its attention
    backend against the device in ``bench.precision`` (``timesformer_harness.workload.check_attention``), and
    ``bench.preset`` names the preset used.
    """
    from timesformer_harness.model import load_preset

    device = resolve_device()
    preset = preset or load_config(config, list(overrides)).bench.preset or default_preset(device)
    # The preset's model fields go in as overrides before the user's, so ``model.depth=6`` still wins.
    preset_cfg, default = load_preset(preset), ModelConfig()
    preset_over = [f"model.{k}={v}" for k, v in asdict(preset_cfg).items() if getattr(default, k) != v]
    cfg = load_config(config, preset_over + list(overrides))
    changes: dict[str, object] = {"preset": preset}
    if frames:
        changes["frames"] = list(frames)
    if img_sizes:
        changes["img_sizes"] = list(img_sizes)
    if suites:
        changes["suites"] = list(suites)
    if out_dir:
        changes["out_dir"] = out_dir
    bench = replace(cfg.bench, **changes)
    check_grid(bench, cfg.model)
    ragged = [s for s in bench.img_sizes if s % cfg.model.patch_size]
    if ragged:
        raise ValueError(f"image sizes {ragged} (--img / bench.img_sizes) are not multiples of model.patch_size="
                         f"{cfg.model.patch_size}: the patch embedding would drop the remainder")
    # the model's attention backend in the bench's precision on this device, before any case starts
    check_attention(cfg.model, device, resolve_precision(cfg.bench.precision, device))
    cfg = replace(cfg, bench=bench)
    if {"pipeline", "e2e"} & set(bench.suites):
        from timesformer_harness.bench.pipeline import data_config_path

        data_config_path(cfg)  # the YAML those suites read exists
    return cfg, preset, device


def check_grid(bench: BenchConfig, model: ModelConfig) -> None:
    """``bench.frames`` and ``bench.img_sizes`` (``--frames``, ``--img``) set the scaling suite's grid and nothing
    else: ValueError when that suite is not selected (the others would measure the model's frames and size under a
    request for other ones); a log line when the model or attention suite runs beside it at the model's."""
    if not (bench.frames or bench.img_sizes):
        return
    parts = []
    if bench.frames:
        parts.append(f"--frames {','.join(map(str, bench.frames))} (bench.frames)")
    if bench.img_sizes:
        parts.append(f"--img {','.join(map(str, bench.img_sizes))} (bench.img_sizes)")
    asked = " and ".join(parts)
    own = f"the model's {model.num_frames} frames at {model.img_size} px"
    if "scaling" not in bench.suites:
        sizes = [f"the {s} suite {own}" for s in ("model", "attention") if s in bench.suites]
        sizes += [f"the {s} suite the data config's frames and crop (data.num_frames, data.train_crop_size)"
                  for s in ("pipeline", "e2e") if s in bench.suites]
        raise ValueError(f"{asked}: the scaling suite's grid only, and --suites {','.join(bench.suites)} does not run "
                         f"it ({'; '.join(sizes) or 'none of them measures a grid'}); add scaling to --suites, or set "
                         "those keys to measure another input size")
    others = [s for s in ("model", "attention") if s in bench.suites]
    if others:
        logger.info("%s: the scaling suite's grid; the %s suite(s) measure %s", asked, " and ".join(others), own)


def measure_peak(device: torch.device, precision: str, gemm_n: int) -> tuple[float | None, str | None]:
    """The utilisation denominator: the GPU's dense peak from ``timesformer_harness.metrics.GPU_PEAKS`` (none for a GPU
    not in it: the source says so and no utilisation is computed), else an fp32 GEMM measured now on this CPU."""
    if device.type == "cuda":
        peak, source = gpu_peak_flops(device_name(device), precision)
        if peak is None:
            logger.warning("%s", source)
        return peak, source
    rate = measure_gemm_flops(device, n=gemm_n)
    return rate, f"measured fp32 GEMM n={gemm_n} ({rate / 1e9:.1f} GFLOP/s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m timesformer_harness.bench", description=__doc__.split("\n\n")[0],
                                epilog="Compare two runs: python -m timesformer_harness.bench compare RUN_A RUN_B")
    p.add_argument("--attn", default="all", help=" | ".join([*VARIANTS, "all"]))
    p.add_argument("--preset", default=None, help="model preset (configs/model/NAME.yaml); default by device")
    p.add_argument("--mode", default="both", help="train | infer | both")
    p.add_argument("--frames", default=None, help="the scaling suite's frame counts, e.g. 8,16,32 (that suite only)")
    p.add_argument("--img", default=None, help="the scaling suite's image sizes, e.g. 224,448 (that suite only)")
    p.add_argument("--suites", default=None, help=f"comma list from {','.join(BENCH_SUITES)}")
    p.add_argument("--out", default=None, help="output root (default bench.out_dir = runs/bench)")
    p.add_argument("--config", default=None, help="YAML config (bench/model/data sections)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. bench.steps=3 model.depth=2")
    return p


def _int_list(s: str | None, flag: str) -> list[int] | None:
    if not s:
        return None
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {s!r}: expected comma-separated integers, e.g. 8,16,32") from None


def run(cfg: RootConfig, preset: str, device: torch.device, attn: str, attns: list[str],
        modes: list[str]) -> tuple[Path, list[BenchRecord]]:
    """Measure every case of the selected suites and write the run directory; returns it and the records.

    Raises:
        BenchStopped: Ctrl-C or SIGTERM (``common.exit_on_sigterm``) during a case: the case's process group is
            killed and the report of the cases measured before it is written, as at the end of a run."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    precision = precision_name(resolve_precision(cfg.bench.precision, device))
    started = run_stamp()
    out = new_run_dir(cfg.bench.out_dir, f"{started}-{attn}")
    peak = measure_peak(device, precision, cfg.bench.gemm_n)
    cases = build_cases(cfg, preset, attns, modes, device, peak, precision)
    measured_modes = modes_measured(cases)
    flags = f"--attn {attn} --mode {'both' if len(modes) == 2 else modes[0]}"  # what the flags chose
    if measured_modes != modes:  # the scaling and attention suites measure one mode
        flags += f" (its cases measure {' and '.join(measured_modes) or 'no mode'})"
    atomic_write_text(out / "config.yaml", f"# measured with {flags}: give them again with --config\n" + to_yaml(cfg))
    logger.info("%d cases -> %s (peak %s)", len(cases), out, peak[1])
    clock = Stopwatch()
    records: list[BenchRecord] = []
    meta = {  # the run's facts, computed once; wall_s and complete are set at each write
        "started": started, "preset": preset, "attn": attn, "modes": measured_modes, "batch": cfg.bench.batch_size,
        "precision": precision, "peak_flops": peak[0], "peak_flops_source": peak[1],
        "memory_kind": "CUDA allocator peak" if device.type == "cuda" else "peak RSS growth of each case's process",
        "hardware": device_name(device), "env": environment_info(device), "config": to_yaml(cfg),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE") if device.type == "cpu" else None,
        "cases_planned": len(cases), "wall_s": 0.0, "complete": not cases,
    }

    out_of_memory: dict[tuple, int] = {}  # a batch sweep's smallest batch that ran out of memory
    stopped = None
    # log lines go through tqdm, so that a warning is not written into the bar's line when stderr is not a terminal
    with logging_redirect_tqdm(), tqdm(cases, desc="bench", unit="case", file=sys.stderr) as bar:
        try:
            for case in bar:
                bar.set_postfix_str(case.name)
                records.append(measure(case, cfg, device, out_of_memory))
                # after every case: a sweep that is killed or times out keeps what it measured ("complete": false)
                meta.update(wall_s=clock.elapsed(), complete=len(records) == len(cases))
                write_results(out / "results.json", records, meta)
        except KeyboardInterrupt:
            stopped = 130
        except SystemExit as e:  # SIGTERM, through exit_on_sigterm
            stopped = e.code if isinstance(e.code, int) else 143
    if stopped is not None:
        meta.update(wall_s=clock.elapsed(), complete=False)
        write_results(out / "results.json", records, meta)
    write_report(out, records, meta)
    if stopped is not None:
        raise BenchStopped(out, len(records), len(cases), stopped)
    return out, records


def measure(case: BenchCase, cfg: RootConfig, device: torch.device, out_of_memory: dict[tuple, int]) -> BenchRecord:
    """One case's record: run in a fresh process, or skipped when a smaller batch of its sweep ran out of memory
    (``out_of_memory``, updated here)."""
    if case.series in out_of_memory and case.batch > out_of_memory[case.series]:
        rec = case.record(device)
        rec.status, rec.message = "skipped", f"batch {out_of_memory[case.series]} ran out of memory"
    else:
        rec = run_case(case, cfg.bench.case_timeout_s)
    if rec.status == "oom" and case.suite in ("model", "scaling"):
        count_flops_of(case, rec)  # what the case would have cost: the paper's cost curve goes on past OOM
    if rec.status == "oom" and case.series is not None:
        out_of_memory[case.series] = min(case.batch, out_of_memory.get(case.series, case.batch))
    if rec.status != "ok":
        logger.warning("%s: %s %s", rec.case, rec.status, rec.message)
    return rec


def write_report(out: Path, records: list[BenchRecord], meta: dict) -> None:
    """``summary.md``, the flat files, TensorBoard scalars and the plots of ``records`` (``results.json`` is written
    after every case)."""
    write_summary(out / "summary.md", records, meta)
    write_flat(out, records)
    write_tensorboard(out / "tb", records)
    try:
        from timesformer_harness.plots import plot_cost_scaling, plot_scaling

        plot_scaling(records, out)
        plot_cost_scaling(records, out)
    except Exception as e:  # noqa: BLE001 - a missing plot must not lose the measurements
        logger.warning("plots failed: %s", e)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        from timesformer_harness.bench.compare import main as compare_main

        return compare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    exit_on_sigterm()
    try:
        attns, modes = attention_types(args.attn), modes_of(args.mode)
        cfg, preset, device = resolve(preset=args.preset, config=args.config, overrides=args.overrides,
                                      frames=_int_list(args.frames, "--frames"), img_sizes=_int_list(args.img, "--img"),
                                      suites=[s.strip() for s in args.suites.split(",") if s.strip()]
                                      if args.suites else None, out_dir=args.out)
    except (ValueError, KeyError, FileNotFoundError) as e:
        parser.error(str(e))
    clock = Stopwatch()
    try:
        out, records = run(cfg, preset, device, args.attn, attns, modes)
    except BenchStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # before the first case (the peak GEMM, the cases' FLOP counts)
        print("error: interrupted before any case ran", file=sys.stderr)
        return 130
    except OutputFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(records))
    print(f"results: {out}/results.json (flat: results.csv, results.jsonl; TensorBoard: tb/)  summary: "
          f"{out}/summary.md  ({clock.elapsed():.0f} s)")
    failed = [r for r in records if r.status == "error"]  # out of memory and skipped are results; an error is not
    if failed or (records and not any(r.status == "ok" for r in records)):
        print(f"error: {len(failed)} case(s) failed and {sum(r.status == 'ok' for r in records)} of {len(records)} "
              f"measured; the reasons are in the table's notes and results.json", file=sys.stderr)
        return 1
    return 0
