"""Logging set-up shared by every command-line entry point (one handler, one format, rank-aware), and the notice
for a command started by its module path from before the package had its own import name."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
# The import names the folders had before they became one package: from a clone's root they still import (as
# namespace packages), so ``python -m timesformer_harness.train`` runs, with a notice naming the command to use instead.
OLD_MODULE_ROOTS = {"harness": "timesformer_harness", "kernels": "timesformer_harness.kernels",
                    "pipelines": "timesformer_harness.pipelines", "benchmarks": "timesformer_harness.benchmarks"}


def setup_logging(level: int = logging.INFO, rank: int | None = None) -> None:
    """Send log records to stderr with one format, replacing any handler set up before.

    ``rank`` defaults to torchrun's ``RANK``; in a multi-process job each line is prefixed ``[rankN]`` and ranks
    other than 0 log warnings and errors only. A command started by an old module path gets a warning that names
    the new one (``renamed_main_module``).
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT.format(prefix=f"[rank{rank}] " if multi else ""), DATE_FORMAT))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    new = renamed_main_module()
    if new:
        logging.getLogger(__name__).warning("this command's module path is the old one and will stop working: run "
                                            "python -m %s (it works from any folder)", new)


def renamed_main_module() -> str | None:
    """The module to run instead when this process was started by an old module path (``python -m
    timesformer_harness.train`` gives ``timesformer_harness.train``); None when it was not."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    top, _, rest = name.removesuffix(".__main__").partition(".")
    if top not in OLD_MODULE_ROOTS or not rest:
        return None
    return f"{OLD_MODULE_ROOTS[top]}.{rest}"
