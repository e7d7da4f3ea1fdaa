"""How an entry point that users run by path (``torchrun harness/train.py``) starts: as its module, by package name.

Run by path, a file is ``__main__`` with its own folder first on the import path. Run again through
``runpy.run_module``, it is imported once (by its package name, as ``python -m`` would), and ``harness/`` is off the
path, where its ``evaluate.py``, ``config.py``, ... would hide a library's top-level module of the same name. This
module imports nothing but the standard library, since it runs before that folder leaves the path.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import NoReturn


def run_by_package_name(script: str, module: str) -> NoReturn:
    """Run ``module`` as ``__main__`` in place of ``script`` (its file), without ``script``'s folder on the path."""
    folder = Path(script).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p).resolve() != folder]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    sys.exit()
