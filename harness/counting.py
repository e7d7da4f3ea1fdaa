"""Parameter and FLOP counts per clip, aten op counts per step, and host-device syncs in a real run.

    python -m timesformer_harness.counting [--attn all] [--depth 12] [--frames 8] [--batch 2] [--precision bf16]
        [--drop-path 0.1] [--temporal-attn-backend same] [--top 0]   # one train step's aten ops and launches

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device: no compute, no memory,
and SDPA takes its math path there, so attention FLOPs are counted (the CPU flash kernel has no FLOP formula
and would count 0). FLOPs = 2 x multiply-adds; the paper's "TFLOPs" are multiply-adds summed over 3 views.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from timesformer_harness.config import ModelConfig
from timesformer_harness.model import TimeSformer, config_of, create_model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(
    model: TimeSformer | ModelConfig,
    batch: int = 1,
    frames: int | None = None,
    img_size: int | None = None,
    mode: str = "infer",
) -> int:
    """FLOPs of one forward (``infer``) or forward+backward (``train``) on a (batch, 3, frames, img, img) input.

    ``frames``/``img_size`` default to the model's construction values; other values exercise the run-time
    resizing of the time/position embeddings, as a real input would.
    """
    if mode not in ("infer", "train"):
        raise ValueError(f"mode={mode!r}; choose 'infer' or 'train'")
    cfg = config_of(model) if isinstance(model, TimeSformer) else model
    cfg = replace(cfg, grad_checkpointing=False, attn_backend="math",  # count model FLOPs, not recompute
                  temporal_attn_backend="same")
    T = frames or cfg.num_frames
    S = img_size or cfg.img_size
    with torch.device("meta"):
        meta_model = create_model(cfg)
        x = torch.empty(batch, cfg.in_chans, T, S, S)
    meta_model.train(mode == "train")
    from torch.utils.flop_counter import FlopCounterMode  # here: it imports Triton (see main)

    counter = FlopCounterMode(display=False)
    with counter:
        if mode == "train":
            meta_model(x).sum().backward()
        else:
            with torch.no_grad():
                meta_model(x)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- ops per step

# An op "launches" unless it is a view (``OpOverload.is_view``) or one of these: allocations, and views the schema
# does not mark as such. A launching op is at least one kernel on a GPU (a few, such as ``_foreach_copy_`` over many
# tensors, may be more); the count is what the host issues per step, the cost that bounds a small step on a GPU.
NO_KERNEL = frozenset({"empty.memory_format", "empty_strided.default", "empty_like.default", "new_empty.default",
                       "new_empty_strided.default", "_unsafe_view.default", "lift_fresh.default",
                       "resize_.default", "set_.source_Storage_storage_offset"})
# the device's result read on the host: a scalar, or an output whose size depends on the values (the host waits to
# allocate it: a boolean mask's nonzero, unique)
SYNC_OPS = frozenset({"_local_scalar_dense.default", "item.default", "is_nonzero.default", "equal.default",
                      "nonzero.default", "masked_select.default", "_unique.default", "_unique2.default",
                      "unique_dim.default", "unique_consecutive.default", "repeat_interleave.Tensor"})
MASK_INDEXING = frozenset({"index.Tensor", "index_put_.default", "index_put.default", "_index_put_impl_.default"})
# aten's ops and our own (each of ours is one kernel: kernels/short_attention.py's Triton attention)
COUNTED_NAMESPACES = frozenset({"aten", "timesformer_harness"})


@dataclass
class OpCount:
    """aten ops dispatched in one phase of a step: every op, those that launch a kernel on a GPU (not views or
    allocations), host-device syncs (a scalar read back), and the count per op name."""

    ops: int = 0
    launches: int = 0
    syncs: int = 0
    by_name: Counter = field(default_factory=Counter)

    def add(self, name: str, is_view: bool, syncs: bool = False) -> None:
        """Count the op ``name``; ``syncs``: it reads the device's values on the host whatever its name says."""
        self.ops += 1
        self.by_name[name] += 1
        if not is_view and name not in NO_KERNEL:
            self.launches += 1
        if name in SYNC_OPS or syncs:
            self.syncs += 1

    def __add__(self, other: OpCount) -> OpCount:
        return OpCount(self.ops + other.ops, self.launches + other.launches, self.syncs + other.syncs,
                       self.by_name + other.by_name)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it (below autograd and autocast: the casts and the backward ops count too)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = OpCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if func.namespace in COUNTED_NAMESPACES:  # not the profiler's record_function markers
            name = f"{func._opname}.{func._overloadname}"
            # indexing by a boolean mask runs nonzero inside the op: its output size waits for the mask's values
            masked = name in MASK_INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                   for i in (args[1] if len(args) > 1 else ()) or ())
            self.count.add(name, func.is_view, syncs=masked)
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> OpCount:
    """The aten ops of one call of ``fn`` (call it once before to leave lazy initialisation out)."""
    with OpCounter() as counter:
        fn()
    return counter.count


def count_train_step(train: Any, video: torch.Tensor, labels: torch.Tensor) -> dict[str, OpCount]:
    """The aten ops of one ``TrainStep`` (``timesformer_harness.workload``) on a batch, by phase: ``forward``,
    ``backward``, ``optimizer`` and their ``total``. Run a step before to leave lazy initialisation out."""
    with OpCounter() as forward:
        _, loss = train.forward(video, labels)
    with OpCounter() as backward:
        train.backward(loss)
    with OpCounter() as optimizer:
        train.optimizer_step()
    counts = {"forward": forward.count, "backward": backward.count, "optimizer": optimizer.count}
    return {**counts, "total": forward.count + backward.count + optimizer.count}


def _is_view(aten_name: str) -> bool:
    packet = getattr(torch.ops.aten, aten_name, None)
    return packet is not None and any(getattr(packet, o).is_view for o in packet.overloads())


_NO_KERNEL_NAMES = {n.split(".")[0] for n in NO_KERNEL} | {"empty", "as_strided_", "resolve_conj", "resolve_neg"}


def profiled_launches(fn: Callable[[], object]) -> Counter:
    """Kernel launches of one call of ``fn``, read from a ``torch.profiler`` trace: what a compiled step issues
    (a dispatch mode cannot see inside compiled code). Counted: each inductor kernel (compile with
    ``torch._inductor.config.cpp.enable_kernel_profile`` on CPU, so that each call is a trace event), each
    ``_foreach`` op once, and each innermost aten op that is neither a view nor an allocation. Innermost ops
    include the kernels an op runs inside itself (``slice_backward``'s fill and copy), and an op that runs others
    counts as those only (``addmm`` as its bias copy, not its GEMM): a CPU proxy of the compiled step's launches,
    whose GPU figure (Triton splits what a C++ kernel fuses) is ``make gpu-perf``'s."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = list(prof.events())
    children: dict[int, list] = {}
    for e in events:
        if e.cpu_parent is not None:
            children.setdefault(id(e.cpu_parent), []).append(e)
    counts: Counter = Counter()

    def launches(e: Any) -> int:
        if "cpp_fused" in e.name or "triton_" in e.name:
            counts["inductor kernel"] += 1
            return 1
        if e.name.startswith("aten::_foreach"):
            counts[e.name] += 1
            return 1
        inner = sum(launches(k) for k in children.get(id(e), []))
        op = e.name.removeprefix("aten::")
        if inner == 0 and e.name.startswith("aten::") and op not in _NO_KERNEL_NAMES and not _is_view(op):
            counts[e.name] += 1
            return 1
        return inner

    for e in events:
        if e.cpu_parent is None:
            launches(e)
    return counts


# ---------------------------------------------------------------------------------------- syncs in a real run

CUDA_SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")'s message


class SyncCounter:
    """Host-device synchronisations while it is running: on CUDA every one ``torch.cuda.set_sync_debug_mode("warn")``
    reports (blocking copies, ``.item()``, stream synchronisations; their warnings are counted, not shown), on CPU
    the ops that read a device value back (``OpCounter``'s syncs, this thread's). ``count`` is the running total.

    ``start()`` / ``stop()`` (or ``with``); the CUDA mode and the warning hook are process-wide while it runs."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._ops: OpCounter | None = None
        self._cuda_count = 0
        self._saved: tuple[Any, ...] | None = None

    @property
    def count(self) -> int:
        return self._cuda_count if self.cuda else (self._ops.count.syncs if self._ops is not None else 0)

    def start(self) -> SyncCounter:
        if self.cuda:
            import warnings

            self._saved = (torch.cuda.get_sync_debug_mode(), warnings.showwarning, list(warnings.filters))
            warnings.filterwarnings("always", message=CUDA_SYNC_WARNING)  # not once per call site
            shown = warnings.showwarning

            def show(message, *args, **kwargs):  # noqa: ANN001, ANN202 - warnings.showwarning's signature
                if CUDA_SYNC_WARNING in str(message):
                    self._cuda_count += 1
                else:
                    shown(message, *args, **kwargs)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._ops = OpCounter()
            self._ops.__enter__()
        return self

    def stop(self) -> None:
        if self.cuda and self._saved is not None:
            import warnings

            mode, warnings.showwarning, warnings.filters[:] = self._saved
            torch.cuda.set_sync_debug_mode(mode)
            self._saved = None
        elif self._ops is not None:
            self._ops.__exit__(None, None, None)

    def __enter__(self) -> SyncCounter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Print one train step's op counts per attention variant (the ``tiny`` preset at ``--depth`` and ``--frames``:
    sizes change no count), on the CPU."""
    import argparse

    from timesformer_harness.model import load_preset
    from timesformer_harness.variants import VARIANTS
    from timesformer_harness.workload import TrainStep, build_model, synthetic_batch

    p = argparse.ArgumentParser(prog="python -m timesformer_harness.counting", description=main.__doc__)
    p.add_argument("--attn", default="all", help=" | ".join([*VARIANTS, "all"]))
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--temporal-attn-backend", default="same",
                   help="divided attention's temporal pass (model.temporal_attn_backend; triton runs in Triton's "
                        "CPU interpreter here)")
    p.add_argument("--top", type=int, default=0, help="also list the N most frequent ops of each variant")
    args = p.parse_args(argv)
    if args.attn != "all" and args.attn not in VARIANTS:
        p.error(f"--attn {args.attn!r}; choose from {[*VARIANTS, 'all']}")
    for flag in ("depth", "frames", "batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if not 0.0 <= args.drop_path < 1.0:
        p.error(f"--drop-path {args.drop_path}: a probability in [0, 1)")
    if args.temporal_attn_backend == "triton":  # the step runs on the CPU: the kernels in Triton's interpreter,
        os.environ.setdefault("TRITON_INTERPRET", "1")  # which must be chosen before Triton is first imported
    cpu, dtype = torch.device("cpu"), torch.bfloat16 if args.precision == "bf16" else None
    print("| attention | ops (forward / backward / optimizer) | kernel launches (forward / backward / optimizer) "
          "| syncs |\n|---|---|---|---|")
    for attn in VARIANTS if args.attn == "all" else [args.attn]:
        try:
            cfg = replace(load_preset("tiny"), depth=args.depth, num_frames=args.frames, attention_type=attn,
                          drop_path_rate=args.drop_path, temporal_attn_backend=args.temporal_attn_backend)
            torch.manual_seed(0)
            model = build_model(cfg, cpu, dtype=dtype)
        except ValueError as e:
            p.error(str(e))
        train = TrainStep.build(model, cpu, dtype)
        video, labels = synthetic_batch(cfg, cpu, args.batch)
        train.step(video, labels)  # lazy initialisation (optimizer state) left out of the count
        c = count_train_step(train, video, labels)
        phases = [c[k] for k in ("forward", "backward", "optimizer")]
        print(f"| {attn} | {c['total'].ops} ({' / '.join(str(x.ops) for x in phases)}) | {c['total'].launches} "
              f"({' / '.join(str(x.launches) for x in phases)}) | {c['total'].syncs} |")
        for name, n in c["total"].by_name.most_common(args.top):
            print(f"|   {name} | {n} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
