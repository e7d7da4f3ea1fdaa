"""The loader backends: one registered entry per ``data.loader`` value, read by the config, the factory, the
pre-flight check, the bench and the decode-cost model. A new decoder backend is its module (a loader class with
``build``; see ``DaliLoader`` and ``PyAVLoader``) plus one ``LoaderBackend`` in ``LOADERS``.

This module imports nothing heavy: a backend's module is imported only when a loader of it is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoaderBackend:
    """What a ``data.loader`` value means to the rest of the harness."""

    name: str  # the data.loader value
    module: str  # where its loader class lives (imported when one is built)
    class_name: str
    decodes: bool  # reads video files: manifest, pre-flight check, quarantine (False: generated clips)
    needs_decode_device: bool  # its decode device is data.backend's (DALI: cpu | gpu); else it decodes on the CPU
    decode_cost: str  # pipelines.tools.decode_cost's model of the frames it decodes per clip ("" = none)
    outside_rss: str  # what of its memory the process's RSS does not hold ("" = nothing)
    outside_cuda_allocator: str  # what of its GPU memory torch's CUDA allocator does not hold, decoding on the GPU
    summary: str

    def loader_class(self) -> Any:
        return getattr(importlib.import_module(self.module), self.class_name)

    def outside(self, device_type: str, decode_device: str) -> str:
        """What of this loader's memory a peak of ``device_type``'s kind (``cuda`` allocator, else RSS) leaves
        out, when it decodes on ``decode_device``; "" when nothing."""
        if device_type == "cuda":
            return self.outside_cuda_allocator if decode_device == "gpu" else ""
        return self.outside_rss

    def judged_as(self, decode_device: str) -> str:
        """The decoder the pre-flight check judges its videos for (``pipelines.validate.judge``)."""
        return decode_device if self.needs_decode_device else "pyav"


LOADERS: dict[str, LoaderBackend] = {b.name: b for b in (
    LoaderBackend("dali", "timesformer_harness.pipelines.dali", "DaliLoader", decodes=True, needs_decode_device=True,
                  decode_cost="keyframe", outside_rss="",
                  outside_cuda_allocator="DALI's own GPU buffers (NVDEC output, resize), from its own allocator",
                  summary="NVIDIA DALI: NVDEC on a GPU, its CPU decoder (VP8, VP9, MJPEG) without one; one "
                          "pipeline per process"),
    LoaderBackend("pyav", "timesformer_harness.pipelines.pyav", "PyAVLoader", decodes=True, needs_decode_device=False,
                  decode_cost="keyframe", outside_rss="its DataLoader worker processes",
                  outside_cuda_allocator="",
                  summary="PyAV (FFmpeg) in torch DataLoader workers: any codec FFmpeg reads"),
    LoaderBackend("synthetic", "timesformer_harness.pipelines.synthetic", "SyntheticLoader", decodes=False,
                  needs_decode_device=False, decode_cost="", outside_rss="", outside_cuda_allocator="",
                  summary="random clips generated once on the model's device: the model's pace, no decoding"),
)}
AUTO = "auto"  # data.loader=auto: DALI when it decodes every video here, else PyAV (pipelines.factory.plan_decode)


def loader_choices() -> list[str]:
    return [AUTO, *LOADERS]


def backend(name: str) -> LoaderBackend:
    """The registered backend ``name``; ValueError naming the choices otherwise."""
    if name not in LOADERS:
        raise ValueError(f"data.loader={name!r}; choose from {loader_choices()}")
    return LOADERS[name]
