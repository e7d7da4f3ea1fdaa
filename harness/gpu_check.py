"""``make gpu-check``: the GPU acceptance run. The GPU tests and the user's own commands, at GPU size, each in its
own process, with pass / fail / skip and the key figures read from the commands' own outputs.

    python -m timesformer_harness.gpu_check [--out runs/gpu_check] [--only STEP ...] [--budget-s S]
    python -m timesformer_harness.gpu_check --rehearse-on-cpu   # the same steps at CPU size; the CUDA-only one skipped

Steps (``make`` command each stands for; GPU size in brackets):

* ``gpu_tests``: ``pytest -m gpu`` (``tests/test_gpu.py``: NVDEC per codec and the NVDEC limits on the real GPU,
  VP9 below NVDEC's minimum decoded by DALI on the CPU for a CUDA model, DALI GPU vs CPU frames, the Trainer's
  fp16 + GradScaler and bf16 steps with their memory windows, every SDPA backend against ``naive`` and the
  attention-backend check against SDPA, the profiler in GPU time, NCCL + DDP under torchrun, CUDA memory through
  ``timesformer_harness.metrics``). CUDA-only.
* ``prepare``: ``python -m timesformer_harness.pipelines.tools.prepare`` re-encodes part of the toy set larger [64
  videos, short side 256]: the fix the pre-flight check names for videos below NVDEC's minimum.
* ``validate``: ``python -m timesformer_harness.pipelines.validate --backend gpu`` on those (NVDEC limits of this GPU's
  generation).
* ``train`` and ``evaluate``: ``make train`` / ``make evaluate``, the embedded toy default [2 epochs]; on a GPU its
  32x32 VP9 is below NVDEC's minimum, so DALI decodes it on the CPU (the figures say so).
* ``profile``: ``make profile`` [the GPU preset, 3 steps]; reports which SDPA kernel ``auto`` ran.
* ``gate_baseline`` then ``gate``: ``make gate-baseline`` and ``make gate`` against it [divided attention].
* ``torchrun``: ``torchrun --nproc_per_node=N harness/train.py`` with the Kinetics divided 8x32 recipe on synthetic
  data for 2 steps [N = every visible GPU].
* ``bench``: ``make bench``, every suite [the GPU preset, all variants, train, frames 8 and 16, batches 2 and 8], the
  pipeline and end-to-end suites on the prepared videos (their DALI case decodes with NVDEC on a GPU). Last: the
  longest step.

A step passes when its command exits 0 *and* its outputs show it did its work (results written, records ok, tests
run); a step that cannot run is ``skip`` with the reason. Writes ``<out>/<timestamp>/report.json`` (rewritten after
every step, so a run cut short keeps what it checked) and one log per step beside it. ``--budget-s`` bounds the
run: a step whose estimate (``Step.estimate_s``, from earlier GPU runs) no longer fits is skipped and says so, and a
step's timeout never reaches past the budget. Exit status: 0 when every step that could run passed, 1 when one
failed, 2 when none could run (no CUDA: returned in seconds, nothing run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__" and not __package__:  # run by path (python harness/gpu_check.py)
    from timesformer_harness.scripts import run_by_package_name

    run_by_package_name(__file__, "timesformer_harness.gpu_check")

from timesformer_harness.config import REPO_ROOT
from timesformer_harness.metrics import OutputFolderError, Stopwatch, new_run_dir, run_stamp
from timesformer_harness.runner import run_command
from timesformer_harness.variants import REFERENCE

PREPARE_MODULE = "timesformer_harness.pipelines.tools.prepare"  # the dataset re-encoding tool
TOY_CONFIG = "configs/exp/toy_divided_cpu.yaml"
KINETICS_CONFIG = "configs/exp/k400_divst_8x32_224.yaml"
TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=4",
              "model.num_frames=4", "data.num_frames=4", "data.train_crop_size=32", "data.test_crop_size=32"]


class StepFailed(Exception):
    """The step's command ran, but its outputs show that it did not do its job."""


@dataclass
class Step:
    """One check: a command, the ``make`` command it stands for, and how to read its key figures."""

    name: str
    make: str
    argv: list[str]
    collect: Callable[[str], dict[str, Any]]  # the step's log text -> key figures; raises StepFailed
    timeout_s: int = 600
    estimate_s: float = 60.0  # what it takes on a GPU (earlier runs' times, rounded up): --budget-s skips by it
    cuda_only: bool = False
    needs: str = ""  # a step that must have passed first
    setup: Callable[[], None] | None = None  # in-process preparation (e.g. a manifest) before the command


@dataclass
class StepResult:
    name: str
    status: str  # pass | fail | skip
    reason: str
    seconds: float
    command: str
    make: str
    figures: dict[str, Any] = field(default_factory=dict)
    log: str = ""


@dataclass(frozen=True)
class Size:
    """What differs between the GPU run and its CPU rehearsal: the sizes and the repeat counts."""

    subset: int  # toy videos re-encoded by the prepare step
    short_side: int
    eval_videos: int  # toy val/test videos that train and evaluate score (0 = the whole split)
    validate: tuple[str, ...]
    bench: tuple[str, ...]
    data_batch: int  # batch of the bench's pipeline and end-to-end suites
    train: tuple[str, ...]
    profile: tuple[str, ...]
    gate_baseline: tuple[str, ...]
    gate: tuple[str, ...]
    torchrun: tuple[str, ...]


GPU_SIZE = Size(
    subset=64, short_side=256, eval_videos=0, validate=("--backend", "gpu"),
    bench=("--attn", "all", "--mode", "train", "--frames", "8,16", "bench.case_timeout_s=300", "bench.batches=[2,8]"),
    data_batch=8,
    train=("solver.max_epoch=2", "train.eval_period=1"), profile=("--steps", "3"),
    gate_baseline=("--attn", REFERENCE, "--repeats", "1"), gate=(), torchrun=())  # one gate case, one run: the budget
CPU_SIZE = Size(  # the rehearsal: every step at a size this 2-core CPU runs in seconds
    subset=16, short_side=48, eval_videos=32, validate=("--backend", "cpu"),
    bench=("--attn", "space_only", "--mode", "train", "--preset", "tiny", "--frames", "4,8",
           "bench.pipeline_batches=2"), data_batch=4,
    train=("solver.max_epoch=1", "train.max_steps_per_epoch=4", "train.eval_period=1"),
    profile=("--preset", "tiny", "--steps", "1", "--wait", "0"),
    gate_baseline=("--preset", "tiny", "--attn", REFERENCE, "--pairs", "2", "--repeats", "1"),
    # The rehearsal checks the plumbing, not the speed: on a shared CPU a timing verdict would be noise.
    gate=("--tolerance", "0.95", "--mem-tolerance", "0.5"),
    torchrun=(*TINY_MODEL, "data.batch_size=2", "solver.global_batch_size=0", "data.num_workers=1"))


# ------------------------------------------------------------------------------------------ reading outputs

def _newest(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise StepFailed(f"no {pattern} under {folder}")
    return found[-1]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise StepFailed(f"{path} was not written")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _round(v: Any, nd: int = 1) -> Any:
    return round(v, nd) if isinstance(v, float) else v


def collect_pytest(junit: Path) -> Callable[[str], dict[str, Any]]:
    def collect(log: str) -> dict[str, Any]:
        import xml.etree.ElementTree as ET

        if not junit.is_file():
            raise StepFailed(f"pytest wrote no {junit.name}")
        cases = list(ET.parse(junit).getroot().iter("testcase"))
        skipped = {c.get("name"): c.find("skipped").get("message", "") for c in cases if c.find("skipped") is not None}
        failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
        passed = len(cases) - len(skipped) - len(failed)
        figures = {"passed": passed, "failed": failed, "skipped": skipped}
        if failed:
            raise StepFailed(f"{len(failed)} GPU test(s) failed: {', '.join(failed)}")
        if passed == 0:
            raise StepFailed(f"no GPU test ran ({len(skipped)} skipped)")
        return figures
    return collect


def collect_prepare(out: Path) -> Callable[[str], dict[str, Any]]:
    def collect(log: str) -> dict[str, Any]:
        spec = json.loads((out / "prepare.json").read_text()) if (out / "prepare.json").is_file() else None
        if spec is None or not spec["videos"] or spec["failed"]:
            raise StepFailed(f"prepare wrote {spec and spec['videos']} videos, failures: {spec and spec['failed']}")
        return {"videos": spec["videos"], "short_side": spec["spec"]["short_side"], "codec": spec["spec"]["codec"]}
    return collect


def collect_validate(report: Path) -> Callable[[str], dict[str, Any]]:
    def collect(log: str) -> dict[str, Any]:
        if not report.is_file():
            raise StepFailed(f"{report} was not written")
        r = json.loads(report.read_text())
        return {"usable": f"{r['usable']}/{r['videos']}", "backend": r["backend"], "judged_for": r["judged_for"]}
    return collect


def collect_bench(out: Path) -> Callable[[str], dict[str, Any]]:
    def collect(log: str) -> dict[str, Any]:
        from timesformer_harness.bench.record import read_results

        records, meta = read_results(_newest(out, "*/results.json"))
        by_suite: dict[str, list] = {}  # the records that measured something, by suite
        for r in records:
            if r.status == "ok":
                by_suite.setdefault(r.suite, []).append(r)
        missing = sorted({"model", "attention", "pipeline", "e2e"} - set(by_suite))
        # skipped: a case that says why it cannot run here (the CPU decoders' shoot-out on a GPU) or the larger
        # batches of a sweep that ran out of memory
        bad = [f"{r.case}: {r.status} {r.message}" for r in records if r.status not in ("ok", "oom", "skipped")]
        if missing or bad:
            raise StepFailed(f"suites without a measured record: {missing}; cases not ok: {'; '.join(bad)}")
        figures: dict[str, Any] = {"device": meta.get("hardware"), "precision": meta.get("precision"),
                                   "peak_flops_source": meta.get("peak_flops_source"), "model": {}}
        for r in by_suite["model"]:
            figures["model"][f"{r.attention_type}/{r.mode}/{r.frames}x{r.img_size}/b{r.batch}"] = {
                "images_per_s": _round(r.images_per_s),
                "mfu_pct": None if r.utilisation is None else _round(100 * r.utilisation, 2),
                "peak_mib": _round((r.peak_mem_bytes or 0) / 2**20, 0)}
        figures["attention_backends_ok"] = sorted({r.attn_backend for r in by_suite["attention"]})
        figures["pipeline_clips_per_s"] = {r.loader: _round(r.clips_per_s) for r in by_suite["pipeline"]}
        figures["e2e"] = [{"verdict": r.extra.get("verdict"), "decode": r.extra.get("decode"),
                           "peak_mib": _round((r.peak_mem_bytes or 0) / 2**20, 0),
                           "device_used_mib": _round(r.extra["device_used_max_bytes"] / 2**20, 0)
                           if "device_used_max_bytes" in r.extra else None} for r in by_suite["e2e"]]
        figures["oom"] = [r.case for r in records if r.status == "oom"]
        return figures
    return collect


def describe_loader(facts: dict[str, str] | None) -> str | None:
    """A run's loader as its records give it (``pipelines.base.loader_facts``): backend (decode device; why
    ``auto`` moved it, when it did)."""
    if not facts:
        return None
    where = "; ".join(x for x in (facts.get("decode"), facts.get("note")) if x)
    return f"{facts['kind']} ({where})" if where else facts["kind"]


def _peak_gib(record: dict[str, Any], prefix: str = "") -> float | None:
    """A metrics.jsonl record's peak memory in GiB: the CUDA allocator's, else the process's peak RSS."""
    for kind in ("cuda_allocator", "rss"):
        if (v := record.get(f"memory/{prefix}peak_{kind}_gib")) is not None:
            return _round(v, 2)
    return None


def collect_train(out: Path) -> Callable[[str], dict[str, Any]]:
    def collect(log: str) -> dict[str, Any]:
        records = _jsonl(out / "metrics.jsonl")
        start = next((r for r in records if r.get("event") == "start"), {})
        end = next((r for r in records if r.get("event") == "end"), None)
        if end is None:
            raise StepFailed("metrics.jsonl has no 'end' record: training did not finish")
        windows = [r for r in records if r.get("event") == "train"]
        last = windows[-1] if windows else {}
        vals = [r for r in records if r.get("event") == "val"]
        figures = {"loader": describe_loader(start.get("loader")), "optimizer": start.get("optimizer"),
                   "precision": start.get("precision"),
                   "world_size": start.get("world_size"), "steps": end.get("step"),
                   "clips_per_s": _round(end.get("time/steady_clips_per_s") or last.get("time/clips_per_s")),
                   "data_wait_pct": _round(last.get("time/data_wait_pct")),
                   "peak_gib": _peak_gib(last), "val_peak_gib": _peak_gib(vals[-1], "val_") if vals else None}
        if (out / "last_val.json").is_file():
            figures["val_top1"] = json.loads((out / "last_val.json").read_text())["top1"]
        return figures
    return collect


def collect_evaluate(out: Path) -> Callable[[str], dict[str, Any]]:
    def collect(log: str) -> dict[str, Any]:
        path = out / "eval_test.json"
        if not path.is_file():
            raise StepFailed(f"{path} was not written")
        result = json.loads(path.read_text())
        return {"top1": result["top1"], "videos": result["num_videos"], "loader": describe_loader(result["loader"])}
    return collect


def collect_profile(out: Path) -> Callable[[str], dict[str, Any]]:
    def collect(log: str) -> dict[str, Any]:
        run = _newest(out, "*/summary.json").parent
        if not list(run.glob("*.pt.trace.json")):
            raise StepFailed(f"no TensorBoard trace in {run}")
        summary = json.loads((run / "summary.json").read_text())
        return {"sdpa_kernels": summary["sdpa_kernels"],
                "attention_share_pct": _round(100 * summary["attention_share_of_step"], 1), "run_dir": str(run)}
    return collect


def collect_gate_baseline(path: Path) -> Callable[[str], dict[str, Any]]:
    def collect(log: str) -> dict[str, Any]:
        from timesformer_harness.bench.record import read_results

        if not path.is_file():
            raise StepFailed(f"{path} was not written")
        records, _ = read_results(path)
        return {r.case: {"images_per_s": _round(r.images_per_s), "ratio": _round(r.extra.get("ratio"), 3)}
                for r in records}
    return collect


def collect_gate(out: Path) -> Callable[[str], dict[str, Any]]:
    def collect(log: str) -> dict[str, Any]:
        verdicts = json.loads(_newest(out, "*/verdicts.json").read_text())
        return {v["case"]: ("REGRESSED: " + "; ".join(v["reasons"]) if v["regressed"] else
                            f"ok ({100 * v['change']:+.1f}%)" if v["change"] is not None else "ok")
                for v in verdicts}
    return collect


# ------------------------------------------------------------------------------------------ the steps

def build_steps(run_dir: Path, size: Size, nprocs: int) -> list[Step]:
    """Every step of the check with its arguments at ``size``; outputs go under ``run_dir``."""
    py = sys.executable
    toy = REPO_ROOT / "data" / "toy"
    subset, prepared = run_dir / "toy_subset.csv", run_dir / "toy_prepared"
    data_yaml = run_dir / "toy_prepared.yaml"
    eval_subset = run_dir / "toy_eval_subset.csv"
    scored = [f"data.val_manifest={eval_subset}", f"data.test_manifest={eval_subset}"] if size.eval_videos else []

    def write_manifests() -> None:  # toy subsets for the prepare tool and for scoring, and a data config
        lines = (toy / "val.csv").read_text().splitlines()[:size.subset]
        subset.write_text("\n".join(lines) + "\n")
        data_yaml.write_text(f"# the toy recipe on the prepared (re-encoded) toy videos\n"
                             f"defaults: [{REPO_ROOT / TOY_CONFIG}]\n"
                             f"data:\n  root: {prepared}\n  train_manifest: {prepared / subset.name}\n"
                             f"  batch_size: {size.data_batch}\n")
        if size.eval_videos:  # absolute paths: the manifest lives outside the toy folder
            lines = (toy / "test.csv").read_text().splitlines()[:size.eval_videos]
            eval_subset.write_text("".join(f"{toy / line.split()[0]} {line.split()[1]}\n" for line in lines))

    junit = run_dir / "gpu_tests.xml"
    train_dir = run_dir / "train"
    baseline = run_dir / "gate_baseline.json"
    torchrun_dir = run_dir / "torchrun"
    synthetic = [f"data.synthetic_videos={(64 if size is GPU_SIZE else 8) * nprocs}"]
    return [
        # -v: each test's name is in the log before it runs, so a timeout's reason names the test that hung
        Step("gpu_tests", "pytest -m gpu", [py, "-m", "pytest", "-m", "gpu", "tests", "-v", "-rs", "-p",
                                            "no:cacheprovider", f"--junitxml={junit}"],
             collect_pytest(junit), timeout_s=420, estimate_s=240, cuda_only=True),
        Step("prepare", f"python -m {PREPARE_MODULE}",
             [py, "-m", PREPARE_MODULE, str(subset), "--out", str(prepared), "--path-prefix", str(toy),
              "--short-side", str(size.short_side), "--codec", "vp9", "--no-progress"],
             collect_prepare(prepared), timeout_s=300, estimate_s=15, setup=write_manifests),
        Step("validate", "python -m timesformer_harness.pipelines.validate",
             [py, "-m", "timesformer_harness.pipelines.validate", str(prepared / subset.name), *size.validate,
              "--frames", "8", "--sampling-rate", "3", "--cache", "", "--report", str(run_dir / "validate.json")],
             collect_validate(run_dir / "validate.json"), timeout_s=120, estimate_s=15, needs="prepare"),
        Step("train", "make train", [py, "-m", "timesformer_harness.train", "--config", TOY_CONFIG, *size.train,
                                     *scored, f"output.dir={train_dir}"], collect_train(train_dir), timeout_s=420,
             estimate_s=40, setup=write_manifests),
        Step("evaluate", "make evaluate", [py, "-m", "timesformer_harness.evaluate", "--config", TOY_CONFIG, *scored,
                                           f"output.dir={train_dir}"],
             collect_evaluate(train_dir), timeout_s=240, estimate_s=20, needs="train"),
        Step("profile", "make profile", [py, "-m", "timesformer_harness.profiling", "--attn", REFERENCE,
                                         *size.profile, "--out", str(run_dir / "profile")],
             collect_profile(run_dir / "profile"), timeout_s=300, estimate_s=30),
        Step("gate_baseline", "make gate-baseline", [py, "-m", "timesformer_harness.gate", "--write-baseline",
                                                     str(baseline), *size.gate_baseline],
             collect_gate_baseline(baseline), timeout_s=300, estimate_s=30),
        Step("gate", "make gate", [py, "-m", "timesformer_harness.gate", "--baseline", str(baseline), *size.gate,
                                   "--out", str(run_dir / "gate")],
             collect_gate(run_dir / "gate"), timeout_s=300, estimate_s=30, needs="gate_baseline"),
        Step("torchrun", f"torchrun --nproc_per_node={nprocs} harness/train.py",
             [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}", "harness/train.py",
              "--config", KINETICS_CONFIG, "data.loader=synthetic", *synthetic, "solver.max_epoch=1",
              "train.max_steps_per_epoch=2", *size.torchrun, f"output.dir={torchrun_dir}"],
             collect_train(torchrun_dir), timeout_s=420, estimate_s=40),
        # last: the longest step (a case per process), so that a run cut short by its time box loses the least
        Step("bench", "make bench", [py, "-m", "timesformer_harness.bench", "--out", str(run_dir / "bench"),
                                     *size.bench, f"bench.data_config={data_yaml}"],
             collect_bench(run_dir / "bench"), timeout_s=600, estimate_s=400, needs="prepare"),
    ]


def injected_failure() -> Step:
    """A step that always fails (tests: a broken step must be reported as ``fail``)."""
    return Step("injected_failure", "(test)", [sys.executable, "-c", "import sys; print('deliberately broken');"
                                               " sys.exit(3)"], lambda log: {}, timeout_s=60)


# ------------------------------------------------------------------------------------------ running

def run_step(step: Step, run_dir: Path, cuda: bool, done: dict[str, StepResult],
             timeout_s: float | None = None) -> StepResult:
    """Run one step in its own process (output to ``<run_dir>/<name>.log``) and judge it; ``timeout_s``: a shorter
    limit than the step's own (what is left of a budget)."""
    command = " ".join(step.argv)
    result = StepResult(step.name, "skip", "", 0.0, command, step.make)
    if step.cuda_only and not cuda:
        result.reason = "needs CUDA"
        return result
    if step.needs and (done.get(step.needs) is None or done[step.needs].status != "pass"):
        prior = done.get(step.needs)
        result.reason = f"needs {step.needs}, which " + ("did not run" if prior is None else
                                                         f"did not pass ({prior.status}: {prior.reason})")
        return result
    log = run_dir / f"{step.name}.log"
    result.log = str(log)
    limit = step.timeout_s if timeout_s is None else min(step.timeout_s, timeout_s)
    clock = Stopwatch()
    env = dict(os.environ)
    if not cuda:  # as the Makefile's CPU targets: idle OpenMP threads sleep instead of spinning
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        if step.setup is not None:
            step.setup()
        with open(log, "w") as f:  # its own process group: a timeout ends torchrun's workers too
            rc = run_command(step.argv, timeout_s=limit, env=env, stdout=f).returncode
        text = log.read_text(errors="replace")
        if rc is None:
            result.status, result.reason = "fail", f"timed out after {limit:.0f} s; its last output: {_last_line(text)}"
        elif rc != 0:
            result.status, result.reason = "fail", f"exit status {rc}: {_last_line(text)}"
        else:
            result.figures = step.collect(text)
            result.status = "pass"
    except (StepFailed, OSError, ValueError, KeyError) as e:
        result.status, result.reason = "fail", f"{type(e).__name__}: {e}" if not isinstance(e, StepFailed) else str(e)
    result.seconds = round(clock.elapsed(), 1)
    return result


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("File ")]
    return lines[-1][:300] if lines else "no output"


def _detail(r: StepResult) -> str:
    if r.status != "pass":
        return r.reason
    return json.dumps(r.figures, default=str)[:400]


def format_table(results: list[StepResult]) -> str:
    lines = [f"  {'step':<16} {'status':<6} {'seconds':>8}  detail"]
    for r in results:
        lines.append(f"  {r.name:<16} {r.status.upper():<6} {r.seconds:8.1f}  {_detail(r)}")
    return "\n".join(lines)


def exit_status(results: list[StepResult]) -> int:
    """0 when every step that could run passed, 1 when one failed, 2 when none could run."""
    if any(r.status == "fail" for r in results):
        return 1
    return 0 if any(r.status == "pass" for r in results) else 2


def environment() -> dict[str, Any]:
    """Where the check runs: ``runtime.environment_info`` (versions, driver, git tree, host, command), the visible
    GPUs and the first one's compute capability."""
    import torch

    from timesformer_harness.runtime import environment_info

    cuda = torch.cuda.is_available()
    return {**environment_info(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "capability": list(torch.cuda.get_device_capability()) if cuda else None}


def main(argv: list[str] | None = None) -> int:
    from timesformer_harness.common import atomic_write_text, exit_on_sigterm, setup_logging

    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.gpu_check",

                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="run the same steps at CPU size (the CUDA-only step is skipped): tests the runner")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    parser.add_argument("--out", default="runs/gpu_check", help="report folder root")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds the run may take: a step whose estimate no longer fits is skipped (default: no "
                             "limit)")
    parser.add_argument("--inject-failure", action="store_true", help=argparse.SUPPRESS)  # tests
    args = parser.parse_args(argv)
    setup_logging()
    exit_on_sigterm()  # the running step's process group (a torchrun, a bench) is killed on the way out
    env = environment()
    cuda = bool(env["gpus"])
    mode = "cpu rehearsal" if args.rehearse_on_cpu else "gpu" if cuda else "no CUDA"
    try:
        run_dir = new_run_dir(Path(args.out).absolute(), run_stamp())  # its steps run in the clone's root
    except OutputFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rehearse = args.rehearse_on_cpu
    steps = build_steps(run_dir, CPU_SIZE if rehearse else GPU_SIZE, 2 if rehearse else max(1, len(env["gpus"])))
    if args.inject_failure:
        steps.append(injected_failure())
    known = [s.name for s in steps]
    if args.only:
        unknown = sorted(set(args.only) - set(known))
        if unknown:
            parser.error(f"unknown step(s) {unknown}; choose from {known}")
        steps = [s for s in steps if s.name in args.only]
    device = ", ".join(env["gpus"]) or "no CUDA device"
    print(f"gpu-check ({mode}) on {device}: torch {env['torch']}, CUDA {env['cuda']} (driver {env['cuda_driver']}), "
          f"DALI {env['dali']}, git {str(env['git_sha'])[:12]} -> {run_dir}", flush=True)
    warnings = []
    if env["dali"] is None and cuda:
        warnings.append("nvidia.dali is not installed: the NVDEC tests were skipped and every loader ran PyAV, so GPU "
                        "decoding was not checked; pip install nvidia-dali-cuda120 and run make gpu-check again")
    done: dict[str, StepResult] = {}
    clock = Stopwatch()

    def write_report() -> int:  # after every step: a run stopped from outside keeps what it checked
        results = list(done.values())
        status = exit_status(results)
        report = {"mode": mode, "started": run_dir.name, "environment": env, "exit_status": status,
                  "complete": len(results) == len(steps), "warnings": warnings, "steps": [asdict(r) for r in results]}
        atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
        return status

    status = exit_status([])  # each step's write_report replaces it
    for step in steps:
        left = None if args.budget_s is None else args.budget_s - clock.elapsed()
        if not cuda and not rehearse:  # GPU-size steps: nothing runs without CUDA
            done[step.name] = StepResult(step.name, "skip", "needs CUDA (--rehearse-on-cpu runs the CPU-size "
                                         "rehearsal)", 0.0, " ".join(step.argv), step.make)
        elif left is not None and step.estimate_s > left:
            done[step.name] = StepResult(step.name, "skip", f"over budget: {left:.0f} s left, the step takes about "
                                         f"{step.estimate_s:.0f} s", 0.0, " ".join(step.argv), step.make)
        else:
            print(f"[{step.name}] {step.make}: {' '.join(step.argv)}", flush=True)
            done[step.name] = run_step(step, run_dir, cuda, done, timeout_s=left)
            print(f"[{step.name}] {done[step.name].status} ({done[step.name].seconds:.0f} s) "
                  f"{_detail(done[step.name])[:200]}", flush=True)
        status = write_report()
    results = list(done.values())
    print(format_table(results))
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    print(f"report: {run_dir / 'report.json'}")
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    for w in warnings:
        print(f"WARNING: {w}")
    return status


if __name__ == "__main__":
    sys.exit(main())
