"""Progress of a long step over many items (the pre-flight probe and deep check): a tqdm bar when stderr is a
terminal, else a dated log line every ``interval`` seconds (files done of the total, rate, how many came from a cache,
time left), so that a log file (a torchrun or SLURM redirect) gets readable lines instead of one ``\\r``-joined bar.

Any layer may use it (the harness sits above the pipelines); ``Progress(..., show=False)`` shows nothing (ranks other
than 0).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, TextIO

logger = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # seconds between two progress lines in a log file


def _duration(seconds: float) -> str:
    """``seconds`` as ``42 s``, ``3 min 05 s`` or ``2 h 07 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Count the finished items of a step of ``total``, ``cached`` of which were known before it started (they count
    as done; the rate is over the others).

    Args:
        desc: what the step is, first word of every line (``deep check``).
        total: items in the step, cached ones included.
        cached: items already done (taken from a cache).
        unit: what an item is, singular (``file``).
        show: False shows nothing (a rank other than 0, a caller that prints its own summary).
        interval: seconds between two log lines when stderr is not a terminal.
        stream: where a bar goes, and whose ``isatty()`` decides between bar and log lines (default: stderr).
        log: the logger of the log lines (this module's by default).
        clock: monotonic seconds (a test passes its own).
    """

    def __init__(self, desc: str, total: int, *, cached: int = 0, unit: str = "file", show: bool = True,
                 interval: float = LOG_EVERY_S, stream: TextIO | None = None, log: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.cached, self.unit = desc, total, cached, unit
        self.done = cached
        self.interval, self.log, self.clock = interval, log or logger, clock
        stream = stream or sys.stderr
        self.start = self.last = clock()
        self.bar: Any = None
        self.lines = show and not stream.isatty() and total > cached
        if show and stream.isatty() and total > cached:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=cached, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                            leave=False, postfix={"from cache": cached} if cached else None)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more items are done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and self.clock() - self.last >= self.interval:
            self.last = self.clock()
            self.log.info("%s", self.line())

    def line(self) -> str:
        """``deep check: 1200/3000 files (40%), 35.2 files/s, 100 from cache, about 51 s left``."""
        fresh, seconds = self.done - self.cached, self.clock() - self.start
        rate = fresh / seconds if seconds > 0 else 0.0
        left = f", about {_duration((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total \
            else ""
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}s ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:.1f} {self.unit}s/s, {self.cached} from cache{left}")

    def close(self) -> None:
        """Remove the bar (the caller logs its own summary)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
