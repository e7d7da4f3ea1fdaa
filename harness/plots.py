"""PNG plots of bench results: throughput (with the 95% interval of its median as error bars) and peak memory
against frames, and counted FLOPs and memory per clip against image size and frames (after the paper's Fig. 3), one
line per attention variant; and an evaluation's confusion matrix."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from timesformer_harness.bench.record import BenchRecord  # noqa: E402

logger = logging.getLogger(__name__)


def _curves(records: list[BenchRecord], mode: str) -> list[BenchRecord]:
    """The model and scaling records of ``mode`` that a curve per variant joins: eager, at one batch (the scaling
    suite's, else the model suite's smallest); a batch sweep's other batches and compiled cases are no points of it."""
    rs = [r for r in records if r.suite in ("model", "scaling") and r.mode == mode and (r.compile or "none") == "none"]
    scaling = [r.batch for r in rs if r.suite == "scaling" and r.batch]
    batch = scaling[0] if scaling else min((r.batch for r in rs if r.batch), default=None)
    return [r for r in rs if r.batch == batch]


def series_by_variant(records: list[BenchRecord], mode: str, img_size: int) -> dict[str, list[BenchRecord]]:
    """The curves' records (``_curves``) of one mode and image size, grouped by variant and sorted by frames."""
    by_attn: dict[str, list[BenchRecord]] = {}
    for r in _curves(records, mode):
        if r.img_size == img_size and r.frames:
            by_attn.setdefault(r.attention_type or "?", []).append(r)
    return {a: sorted(rs, key=lambda r: r.frames or 0) for a, rs in sorted(by_attn.items())}


# What a record's peak_mem_bytes measures, per peak_mem_kind (timesformer_harness.metrics.PeakMemory)
MEMORY_AXIS_LABELS = {"rss": "process memory growth (peak RSS)", "cuda_allocator": "CUDA allocator peak"}


def memory_label(records: list[BenchRecord], unit: str, per_clip: bool = False) -> str:
    """The memory axis's label: what the records' ``peak_mem_bytes`` measure (one kind, else "peak memory")."""
    kinds = {r.peak_mem_kind for r in records if r.peak_mem_kind}
    what = MEMORY_AXIS_LABELS.get(kinds.pop(), "peak memory") if len(kinds) == 1 else "peak memory"
    return f"{what}{' per clip' if per_clip else ''}, {unit}"


def flops_label(mode: str) -> str:
    """The cost axis's label: ``flops_per_clip`` counts FLOPs (2 per multiply-add), forward+backward in training."""
    if mode == "train":
        return "train TFLOPs per clip (fwd+bwd, 2 per multiply-add)"
    return "inference TFLOPs per clip (forward, 2 per multiply-add)"


def error_bars(records: list[BenchRecord]) -> list[list[float]]:
    """[below, above] each record's images/s: the 95% interval of its median step time, as throughput."""
    below, above = [], []
    for r in records:
        ms = r.step_ms or {}
        if r.images_per_s and ms.get("ci_low") and ms.get("ci_high"):
            per_ms = r.images_per_s * ms["median"]  # images/s x ms per step: constant for a record
            below.append(r.images_per_s - per_ms / ms["ci_high"])
            above.append(per_ms / ms["ci_low"] - r.images_per_s)
        else:
            below.append(0.0)
            above.append(0.0)
    return [below, above]


def plot_scaling(records: list[BenchRecord], out_dir: str | Path) -> list[Path]:
    """Write ``scaling_<mode>_<img>.png`` (images/s and peak MiB vs frames) for each mode and image size.

    OOM cases are drawn as an ``x`` on the frames axis at zero throughput, so a missing point is visible.
    """
    out_dir = Path(out_dir)
    written = []
    keys = sorted({(r.mode, r.img_size) for r in records if r.suite in ("model", "scaling") and r.mode})
    for mode, img in keys:
        series = series_by_variant(records, mode, img)
        if not series:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
        frames = sorted({r.frames for rs in series.values() for r in rs if r.frames})
        for attn, rs in series.items():
            ok = [r for r in rs if r.status == "ok"]
            line = ax_t.errorbar([r.frames for r in ok], [r.images_per_s for r in ok], yerr=error_bars(ok),
                                 marker="o", capsize=3, label=attn).lines[0]
            ax_m.plot([r.frames for r in ok], [(r.peak_mem_bytes or 0) / 2**20 for r in ok], marker="o",
                      color=line.get_color(), label=attn)
            oom = [r.frames for r in rs if r.status == "oom"]
            if oom:
                ax_t.plot(oom, [0] * len(oom), "x", color=line.get_color(), markersize=10, label=f"{attn} oom")
        mem_label = memory_label([r for rs in series.values() for r in rs], "MiB")
        for ax, ylabel in ((ax_t, "images/s (clips/s x frames)"), (ax_m, mem_label)):
            ax.set_xlabel("frames")
            ax.set_ylabel(ylabel)
            ax.set_xscale("log", base=2)
            ax.set_xticks(frames, [str(f) for f in frames])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
        ax_t.legend(fontsize=8)
        any_r = next(iter(series.values()))[0]
        written.append(_save(fig, out_dir / f"scaling_{mode}_{img}.png", f"{any_r.preset} {mode}, {img}px, batch "
                             f"{any_r.batch}, {any_r.precision}, {any_r.device_name}"))
    return written


def _save(fig: plt.Figure, path: Path, title: str) -> Path:
    """Title, lay out, write and close ``fig``; returns ``path``."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_cost_scaling(records: list[BenchRecord], out_dir: str | Path) -> list[Path]:
    """Write ``scaling_cost_<mode>.png`` after the paper's Fig. 3 (which counts multiply-adds as FLOPs): counted
    FLOPs per clip (``flops_label``: 2 per multiply-add, forward+backward in training) and memory per clip (the
    case's peak memory growth over its batch, ``memory_label``) against image size (at the fewest frames) and against
    frames (at the smallest image size), one line per variant; a case that ran out of memory is an ``x`` (its cost
    still counted)."""
    out_dir = Path(out_dir)
    written = []
    for mode in sorted({r.mode for r in records if r.suite in ("model", "scaling") and r.mode}):
        rs = [r for r in _curves(records, mode) if r.frames and r.img_size and r.status in ("ok", "oom")]
        if not rs:
            continue
        T0, S0 = min(r.frames for r in rs), min(r.img_size for r in rs)
        lines = {"image size (px)": ([r for r in rs if r.frames == T0], lambda r: r.img_size),
                 "frames": ([r for r in rs if r.img_size == S0], lambda r: r.frames)}
        if all(len({x(r) for r in sel}) < 2 for sel, x in lines.values()):
            continue
        fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
        for col, (xlabel, (sel, x)) in enumerate(lines.items()):
            ax_cost, ax_mem = axes[0][col], axes[1][col]
            for attn in sorted({r.attention_type or "?" for r in sel}):
                pts = sorted((r for r in sel if r.attention_type == attn), key=x)
                ok = [r for r in pts if r.status == "ok"]
                costed = [r for r in pts if r.flops_per_clip]
                line = ax_cost.plot([x(r) for r in costed], [r.flops_per_clip / 1e12 for r in costed], marker="o",
                                    label=attn)[0]
                ax_mem.plot([x(r) for r in ok], [(r.peak_mem_bytes or 0) / (r.batch or 1) / 2**30 for r in ok],
                            marker="o", color=line.get_color(), label=attn)
                oom = [r for r in pts if r.status == "oom"]
                if oom:
                    ax_cost.plot([x(r) for r in oom], [(r.flops_per_clip or 0) / 1e12 for r in oom], "x",
                                 color=line.get_color(), markersize=12, label=f"{attn} out of memory")
                    ax_mem.plot([x(r) for r in oom], [0] * len(oom), "x", color=line.get_color(), markersize=12)
            for ax, ylabel in ((ax_cost, flops_label(mode)), (ax_mem, memory_label(rs, "GiB", per_clip=True))):
                ax.set_xlabel(xlabel + (f" at {T0} frames" if col == 0 else f" at {S0} px"))
                ax.set_ylabel(ylabel)
                ax.grid(True, alpha=0.3)
            ax_cost.legend(fontsize=7)
        any_r = rs[0]
        written.append(_save(fig, out_dir / f"scaling_cost_{mode}.png", f"{any_r.preset} {mode} cost and memory, "
                             f"batch {any_r.batch}, {any_r.precision}, {any_r.device_name}"))
    return written


def plot_confusion(matrix: list[list[int]], path: str | Path, class_names: list[str] | None = None,
                   title: str = "") -> Path:
    """Write ``matrix`` (video counts, rows: true class, columns: predicted) as a PNG: each cell coloured by the
    share of its true class (a row sums to 1), its count written in when there are at most 30 classes, and the
    classes named on the axes when there are at most 50 (``class_names``, else their indices). Returns ``path``."""
    n = len(matrix)
    counts = [[int(c) for c in row] for row in matrix]
    shares = [[c / max(sum(row), 1) for c in row] for row in counts]
    side = min(4.0 + 0.35 * n, 24.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:
        for r, row in enumerate(counts):
            for c, count in enumerate(row):
                if count:
                    ax.text(c, r, str(count), ha="center", va="center", fontsize=8,
                            color="white" if shares[r][c] > 0.5 else "black")
    if n <= 50:
        names = [class_names[i] if class_names and i < len(class_names) else str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return _save(fig, Path(path), title or f"confusion matrix, {sum(map(sum, counts))} videos")
