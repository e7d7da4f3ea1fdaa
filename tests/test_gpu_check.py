"""make gpu-check: on a machine without CUDA it must say so and never read as a pass."""

import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from harness.gpu_check import run_checks, write_h264_clips

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this test covers the no-GPU path")
def test_without_cuda_every_check_skips_and_exit_code_is_2() -> None:
    results = run_checks()
    assert [r.name for r in results] == ["nvdec_decode", "amp_fp16_gradscaler", "flash_sdpa", "cuda_memory_stats", "nccl"]
    assert {r.status for r in results} == {"skip"}
    out = subprocess.run([sys.executable, "-m", "harness.gpu_check"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "0 passed, 0 failed, 5 skipped" in out.stdout


def test_h264_clips_for_the_nvdec_check_are_real_h264(tmp_path: Path) -> None:
    manifest = write_h264_clips(tmp_path, count=2, frames=12, size=32)
    lines = manifest.read_text().split("\n")
    assert lines[0].endswith(" 0") and lines[1].endswith(" 1")
    with av.open(lines[0].split(" ")[0]) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in c.decode(video=0)) == 12
