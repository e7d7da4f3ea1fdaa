"""Video input pipelines: manifests, pre-flight validation, DALI / PyAV / synthetic loaders, the toy dataset.

``from pipelines import build_loader, Batch``; the names are loaded on first use, so that the CLIs
(``python -m pipelines.toy``, ``python -m pipelines.validate``) start without importing torch or DALI.
"""

from typing import Any

__all__ = ["Batch", "build_loader"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipelines import base

        return getattr(base, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
