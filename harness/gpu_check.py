"""``make gpu-check``: on a CUDA machine, exercise every GPU-only branch in a few minutes and say what passed.

Checks: NVDEC decode through our DALI pipeline (h264 clips made here with PyAV), AMP fp16 training with
GradScaler, the flash SDPA backend (and the other fused ones), CUDA memory statistics, and an NCCL all-reduce
across every visible GPU under torch.distributed. Without a CUDA device every check reports ``skip`` and the
command exits 2, so a CPU machine never reads as a pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from harness.model import create_model
from kernels.attention import attention


@dataclass
class CheckResult:
    name: str
    status: str  # pass | fail | skip
    detail: str
    seconds: float


def check_amp_fp16_gradscaler() -> str:
    """Five fp16 autocast train steps with GradScaler on a small model: finite loss, scale stays positive."""
    device = torch.device("cuda")
    model = create_model("tiny").to(device).set_channels_last(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(4, 3, 4, 32, 32, device=device)
    y = torch.randint(0, 10, (4,), device=device)
    losses = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == torch.float16, f"autocast produced {out.dtype}"
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(map(lambda v: v == v and abs(v) < 1e4, losses)), f"losses {losses}"
    assert losses[-1] < losses[0], f"loss did not decrease: {losses}"
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, scale {scaler.get_scale():.0f}"


def check_sdpa_backends() -> str:
    """Every fused SDPA backend against the naive reference in bf16 at TimeSformer shapes; flash must run."""
    device = torch.device("cuda")
    ran, failed = [], []
    for L in (8, 197, 1569):  # temporal, spatial, joint sequence lengths
        q, k, v = (torch.randn(4, 12, L, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
        ref = attention(q.float(), k.float(), v.float(), "naive")
        for backend in ("flash", "efficient", "cudnn"):
            try:
                err = (attention(q, k, v, backend).float() - ref).abs().max().item()
            except RuntimeError as e:
                failed.append(f"{backend}@L{L}: {str(e).splitlines()[0][:80]}")
                continue
            assert err < 3e-2, f"{backend} at L={L} differs from naive by {err}"
            ran.append(f"{backend}@L{L}")
    assert any(r.startswith("flash") for r in ran), f"flash never ran: {failed}"
    return f"ran {', '.join(ran)}" + (f"; unavailable: {'; '.join(failed)}" if failed else "")


def check_memory_stats() -> str:
    """Peak allocator statistics see a forward+backward of the CPU bench preset on the GPU."""
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    model = create_model("cpu_bench").to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 8, 224, 224, device=device)).sum().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.memory_stats(device)["reserved_bytes.all.peak"]
    assert peak > 10 * 2**20, f"peak {peak} bytes is implausibly small"
    return f"peak allocated {peak / 2**20:.0f} MiB, peak reserved {reserved / 2**20:.0f} MiB"


def _nccl_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    t = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(t)
    if rank == 0:
        Path(out).write_text(str(t[0].item()))
    dist.destroy_process_group()


def check_nccl() -> str:
    """An NCCL all-reduce over every visible GPU (one process each; a single GPU still inits NCCL)."""
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sum")
        mp.spawn(_nccl_worker, args=(world, os.path.join(tmp, "init"), out), nprocs=world, join=True)
        got = float(Path(out).read_text())
    want = world * (world + 1) / 2
    assert got == want, f"all_reduce gave {got}, expected {want}"
    return f"all_reduce over {world} GPU(s) = {got:g}"


def write_h264_clips(folder: Path, count: int = 4, frames: int = 48, size: int = 96) -> Path:
    """Moving-gradient h264 mp4 clips and a Kinetics-style manifest (``path label``) pointing at them."""
    import numpy as np

    from pipelines.tools.encode import write_video

    yy, xx = np.mgrid[0:size, 0:size]
    lines = []
    for i in range(count):
        path = folder / f"clip{i}.mp4"
        write_video(path, (np.stack([(xx + 4 * t) % 256, (yy + 2 * t) % 256, np.full_like(xx, 40 * i)], -1)
                           .astype(np.uint8) for t in range(frames)), "libx264", fps=30)
        lines.append(f"{path} {i % 2}")
    manifest = folder / "train.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def check_nvdec_decode() -> str:
    """h264 clips (made here with PyAV) decoded by our DALI pipeline on the GPU (NVDEC)."""
    from pipelines.config import DataConfig
    from pipelines import build_loader

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_h264_clips(Path(tmp))
        cfg = DataConfig(loader="dali", backend="gpu", root=tmp, train_manifest=str(manifest), num_frames=8,
                         sampling_rate=2, train_jitter_scales=[64, 80], train_crop_size=56, batch_size=2)
        loader = build_loader(cfg, "train", device=torch.device("cuda"))
        batch = next(iter(loader))
    assert batch.video.is_cuda and tuple(batch.video.shape) == (2, 3, 8, 56, 56), f"got {tuple(batch.video.shape)}"
    assert torch.isfinite(batch.video).all() and batch.video.std() > 0.05, "decoded frames look empty"
    return f"batch {tuple(batch.video.shape)} on {batch.video.device}"


CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("nvdec_decode", check_nvdec_decode),
    ("amp_fp16_gradscaler", check_amp_fp16_gradscaler),
    ("flash_sdpa", check_sdpa_backends),
    ("cuda_memory_stats", check_memory_stats),
    ("nccl", check_nccl),
]


def run_checks(names: list[str] | None = None) -> list[CheckResult]:
    results = []
    for name, fn in CHECKS:
        if names and name not in names:
            continue
        start = time.perf_counter()
        if not torch.cuda.is_available():
            results.append(CheckResult(name, "skip", "no CUDA device visible to this torch", 0.0))
            continue
        try:
            detail, status = fn(), "pass"
        except Exception as e:  # a check's failure is reported, and the others still run
            detail, status = f"{type(e).__name__}: {e}", "fail"
            traceback.print_exc()
        results.append(CheckResult(name, status, detail, time.perf_counter() - start))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=[n for n, _ in CHECKS], help="run only these checks")
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"gpu-check on {device} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    results = run_checks(args.only)
    for r in results:
        print(f"  {r.status.upper():<5} {r.name:<22} {r.seconds:6.1f}s  {r.detail}")
    passed = sum(r.status == "pass" for r in results)
    print(f"{passed} passed, {sum(r.status == 'fail' for r in results)} failed, "
          f"{sum(r.status == 'skip' for r in results)} skipped")
    if any(r.status == "fail" for r in results):
        return 1
    return 0 if passed == len(results) else 2


if __name__ == "__main__":
    sys.exit(main())
