"""torch.distributed from torchrun's environment: init, teardown, small collectives.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (multi-node runs get
them from the rendezvous). Without them everything runs as a single process and the collectives are no-ops.

Restarts (``torchrun --max-restarts=N``): torchrun's agent hosts one TCPStore for the whole job and hands every attempt
the same ``MASTER_PORT``, and ``init_process_group`` keys it without an attempt prefix, so a restarted worker can read
the dead attempt's gloo addresses (``Gloo connectFullMesh failed ... Connection refused`` or a connect timeout; see
https://github.com/pytorch/pytorch/issues/135712). ``init_distributed`` therefore joins the group through its own
namespace of that store, one per attempt, which the ranks agree on through the store itself
(``TORCHELASTIC_RESTART_COUNT`` is per agent, so it differs between the nodes of a multi-node job:
https://github.com/pytorch/pytorch/issues/108158).
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
# Before any group exists: its functions take ``group=group.WORLD`` as a default, evaluated on import. Imported after
# init (DDP imports it), it holds the default group to the end of the process, whose gloo threads are never joined.
import torch.distributed.nn.functional  # noqa: F401

from timesformer_harness.common import ExitCode, leave_for_torchrun, report_error
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
        count = torch.cuda.device_count()
        if count > 1 and local_rank >= count:  # one visible GPU per process (count 1) is the other layout
            raise RuntimeError(f"LOCAL_RANK {local_rank} but this node shows {count} GPUs: start at most {count} "
                               f"processes per node (torchrun --nproc_per_node={count}), one per GPU")
        torch.cuda.set_device(local_rank % count)
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return DistInfo(0, 0, 1, dev, "")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ValueError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo (or auto) on CPU")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's shared store (its default)
            kwargs.update(store=attempt_store(rank, world_size, timeout), rank=rank, world_size=world_size)
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    logger.info("distributed: %s, world size %d, this is rank %d (local %d) on %s", backend, world_size, rank,
                local_rank, dev)
    return DistInfo(rank, local_rank, world_size, dev, backend)


def attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The torchrun agent's store (``MASTER_ADDR:MASTER_PORT``) under a prefix of this attempt's own.

    Each rank posts a fresh random token, then acknowledges the set of tokens it reads; the prefix is the hash of a
    set that every rank acknowledged. A token left by an earlier attempt may be read, but its set is never
    acknowledged by the rank that now owns the slot (that rank reads its own new token), so all ranks settle on the
    set of this attempt's tokens. Every wait is bounded by ``timeout`` (``dist.timeout_s``).
    """
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    store.set(f"harness/token/{rank}", uuid.uuid4().hex)
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        tokens = b",".join(store.multi_get([f"harness/token/{r}" for r in range(world_size)]))  # waits for all
        attempt = hashlib.sha256(tokens).hexdigest()[:16]
        store.set(f"harness/ack/{attempt}/{rank}", b"")
        if store.check([f"harness/ack/{attempt}/{r}" for r in range(world_size)]):
            return dist.PrefixStore(f"harness/attempt/{attempt}", store)
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the {world_size} ranks did not agree on a process group within "
                               f"dist.timeout_s={timeout.total_seconds():.0f} s (a rank did not start?)")
        time.sleep(0.05)


def cleanup() -> None:
    """Leave the process group (safe to call when it was never joined), joining gloo's threads: call it after the DDP
    model is released (objects only a reference cycle holds are collected first). A gloo worker still running at exit
    can free a collective's tensors while the interpreter shuts down and abort the process ("terminate called without
    an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# gloo's words when the process at the other end of a connection has ended (a rank that stopped on its own error)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def report_unexpected(error: Exception, rank: int, debug: bool = False) -> int:
    """An entry point's last ``except``: when ``error`` is this rank's collective failing because another rank's
    process ended (gloo closes its connections; that rank reported the cause), one line and
    ``ExitCode.PEER_STOPPED``; any other error is left for torchrun's failure summary and raised again (its
    traceback printed)."""
    if (isinstance(error, RuntimeError) and dist.is_available() and dist.is_initialized()
            and any(words in str(error) for words in _PEER_GONE)):
        return report_error(error, ExitCode.PEER_STOPPED, debug,
                            message=f"rank {rank} lost its connection to another rank of the job, which stopped "
                                    f"first: that rank's error (above, and torchrun's 'Root Cause') says why")
    leave_for_torchrun(f"{type(error).__name__}: {error}")
    raise error


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

