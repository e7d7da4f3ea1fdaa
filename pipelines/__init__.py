"""Video input pipelines: the data config, manifests, pre-flight validation, DALI / PyAV / synthetic loaders.

``from pipelines import build_loader, Batch``; the names are loaded on first use, so that the CLIs
(``python -m pipelines.validate``, ``python -m pipelines.tools.toy``) start without importing torch or DALI.
Offline tools (dataset preparation, the toy dataset, the decode-cost model) live in ``pipelines.tools``.
"""

from typing import Any

__all__ = ["Batch", "build_loader"]


def __getattr__(name: str) -> Any:
    if name == "Batch":
        from pipelines.base import Batch

        return Batch
    if name == "build_loader":
        from pipelines.factory import build_loader

        return build_loader
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
