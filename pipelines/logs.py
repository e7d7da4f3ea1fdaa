"""Logging set-up shared by every command-line entry point (one handler, one format, rank-aware)."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


def setup_logging(level: int = logging.INFO, rank: int | None = None) -> None:
    """Send log records to stderr with one format, replacing any handler set up before.

    ``rank`` defaults to torchrun's ``RANK``; in a multi-process job each line is prefixed ``[rankN]`` and ranks
    other than 0 log warnings and errors only.
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
