"""Video input pipelines: manifests, pre-flight validation, DALI / PyAV / synthetic loaders, the toy dataset."""

from pipelines.base import Batch, build_loader

__all__ = ["Batch", "build_loader"]
