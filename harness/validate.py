"""Check a run's videos with the run's own settings, before the run.

``python -m timesformer_harness.validate --config my.yaml [--split train] [--deep] [key=value ...]`` reads the config
as training does (``defaults:``, overrides) and runs the pre-flight check ``build_loader`` runs
(``timesformer_harness.pipelines.factory.preflight``): the split's manifest with its labels checked against
``model.num_classes``, the loader and decode device ``data.loader`` / ``data.backend`` would pick on this machine
(the PyAV fallback included), the clip span ``data.num_frames`` x ``data.sampling_rate`` at ``data.target_fps``,
``data.pad_short``, ``data.max_frame_pixels``, ``data.validate`` and the cache ``data.validate_cache``. It prints
each unusable file with its reason (whose fix names config keys) and a summary; exit status 0 when every video is
usable, 1 otherwise (and for a mistake in the config or the manifest, as one ``error:`` line), 130 when interrupted
(Ctrl-C): the probe and deep-check results that came in before it are cached, so a rerun resumes there. Progress: a
bar on a terminal, else a log line every 30 s. ``--debug`` (or ``TIMESFORMER_DEBUG=1``) prints an error's traceback.

``python -m timesformer_harness.pipelines.validate MANIFEST`` is the same check with command-line flags instead of a
config (the pipelines cannot read a run's config: it lives a layer above them).
"""

from __future__ import annotations

import argparse
import sys

import torch

from timesformer_harness.common import ExitCode, report_error, setup_logging
from timesformer_harness.config import load_config
from timesformer_harness.pipelines.factory import preflight
from timesformer_harness.pipelines.loaders import LOADERS
from timesformer_harness.pipelines.manifest import manifest_path
from timesformer_harness.pipelines.validate import print_verdict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.validate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML config (e.g. configs/exp/toy_divided_cpu.yaml)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="train",
                        help="whose manifest to check (data.{split}_manifest, else {data.root}/{split}.csv)")
    parser.add_argument("--deep", action="store_true", help="also decode every packet (data.validate=deep)")
    parser.add_argument("--report", default=None, metavar="FILE",
                        help="also write the verdict as JSON (the config, split, loader, counts and reasons)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too (as "
                        "TIMESFORMER_DEBUG=1 does)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, as for training")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check the split's videos as the run would; returns the exit status (0 all usable, 1 otherwise, 130 when
    interrupted)."""
    args = parse_args(argv)
    try:
        return run_check(args)
    except KeyboardInterrupt as e:  # the caches keep every result that came in before it
        return report_error(e, ExitCode.INTERRUPTED, args.debug, message="interrupted; the videos checked so far are "
                            "cached (unless data.validate_cache=none): a rerun takes them from there")


def run_check(args: argparse.Namespace) -> int:
    """``main``'s work: the check of ``args.split`` with the config's settings; returns the exit status."""
    try:
        cfg = load_config(args.config, args.overrides + (["data.validate=deep"] if args.deep else []))
    except (KeyError, ValueError, FileNotFoundError) as e:  # the message names the key or file, and the fix
        return report_error(e, ExitCode.ERROR, args.debug,
                            message=str(e.args[0] if isinstance(e, KeyError) and e.args else e))
    setup_logging()
    data = cfg.data
    if data.loader in LOADERS and not LOADERS[data.loader].decodes:
        print(f"data.loader={data.loader} reads no video files: nothing to check")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the device a run picks (dist.init)
    try:
        check = preflight(data, args.split, device, cfg.model.num_classes)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # manifest, labels, data.loader=dali without DALI
        return report_error(e, ExitCode.ERROR, args.debug)
    plan = check.plan
    judged = f"{plan.loader} loader" + (f" ({plan.backend} decode)" if LOADERS[plan.loader].needs_decode_device else "")
    print(f"{args.config}, {args.split} split ({manifest_path(data, args.split)}): judged for the {judged} on "
          f"{device.type}" + (f", because {plan.why}" if plan.why else ""))
    facts = {"config": str(args.config), "split": args.split, "manifest": str(manifest_path(data, args.split)),
             "loader": plan.loader, "backend": plan.backend, "gpu_arch": plan.gpu_arch, "why": plan.why,
             "deep": data.validate == "deep"}
    clip = None if data.sampling == "segment" else (data.num_frames, data.sampling_rate, data.target_fps)
    return print_verdict(check.entries, check.rejected, judged, report=args.report, facts=facts, clip=clip,
                         workers=max(1, data.num_workers))


if __name__ == "__main__":
    sys.exit(main())
