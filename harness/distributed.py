"""torch.distributed from torchrun's environment: init, teardown, small collectives.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (multi-node runs get
them from the rendezvous). Without them everything runs as a single process and the collectives are no-ops.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from timesformer_harness.config import DistConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: DistConfig, device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) and pick this rank's device.

    Args:
        cfg: ``dist.backend`` ``auto`` picks nccl when CUDA is available, else gloo.
        device: ``auto`` | ``cpu`` | ``cuda``; CUDA ranks use ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} asked for, but this torch sees no CUDA device; use 'cpu' or 'auto'")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return DistInfo(0, 0, 1, dev, "")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ValueError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo (or auto) on CPU")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=cfg.timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    logger.info("distributed: %s, world size %d, this is rank %d (local %d) on %s", backend, world_size, rank,
                local_rank, dev)
    return DistInfo(rank, local_rank, world_size, dev, backend)


def cleanup() -> None:
    """Leave the process group (safe to call when it was never joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op single-process) and return it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` single-process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

