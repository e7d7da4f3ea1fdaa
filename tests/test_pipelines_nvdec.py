"""NVDEC capability table and the GPU pre-flight check, on real encoded files (no GPU needed: judged by the table)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import textured_frames
from harness.config import REPO_ROOT
from pipelines import nvdec
from pipelines.tools.encode import write_video
from pipelines.nvdec import auto_decode_device, generation_of, nvdec_problem
from pipelines.validate import VideoInfo, check_videos, probe_video

# name -> (encoder, width, height, pix_fmt, extension)
FILES = {
    "vp9_32": ("libvpx-vp9", 32, 32, "yuv420p", ".webm"),  # the toy dataset's size
    "vp9_128": ("libvpx-vp9", 128, 128, "yuv420p", ".webm"),
    "av1_128": ("libsvtav1", 128, 128, "yuv420p", ".mkv"),
    "hevc_128": ("libx265", 128, 128, "yuv420p", ".mp4"),
    "hevc_144": ("libx265", 144, 144, "yuv420p", ".mp4"),
    "hevc_10bit": ("libx265", 144, 144, "yuv420p10le", ".mp4"),
    "h264_444": ("libx264", 64, 48, "yuv444p", ".mp4"),
    "h264_64x48": ("libx264", 64, 48, "yuv420p", ".mp4"),
    "mpeg4_32x16": ("mpeg4", 32, 16, "yuv420p", ".mp4"),
    "mjpeg": ("mjpeg", 64, 48, "yuvj420p", ".avi"),
}
OPTIONS = {"libsvtav1": {"preset": "10"}, "libx265": {"preset": "ultrafast", "log-level": "error"},
           "libx264": {"preset": "ultrafast"}, "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import av

    root = tmp_path_factory.mktemp("nvdec")
    out = {}
    for name, (encoder, w, h, pix_fmt, ext) in FILES.items():
        if encoder not in av.codecs_available:
            continue
        frames = textured_frames(12, h, w, seed=len(out))
        out[name] = str(write_video(root / f"{name}{ext}", frames, encoder, 30, OPTIONS.get(encoder), pix_fmt=pix_fmt))
    return out


def _need(files: dict[str, str], *names: str) -> None:
    missing = [n for n in names if n not in files]
    if missing:
        pytest.skip(f"this PyAV build has no encoder for {missing}")


def test_generation_of_names_and_compute_capabilities() -> None:
    cases = {"sm50": "maxwell1", "sm52": "maxwell2", "6.1": "pascal", "sm70": "volta", "sm_75": "turing",
             "sm80": "ampere_ga100", "8.6": "ampere_ga10x", "sm87": "ampere_ga10x", "sm89": "ada", "sm90": "hopper",
             "sm100": "blackwell", "sm120": "blackwell", "Hopper": "hopper"}
    for given, want in cases.items():
        assert generation_of(given) == want, given
    assert generation_of((9, 0)) == "hopper" and generation_of((8, 0)) == "ampere_ga100"
    for bad in ("sm30", "sm85", "h100x", "4"):
        with pytest.raises(ValueError, match="name one of|not in the NVDEC table"):
            generation_of(bad)
    with pytest.raises(ValueError, match="CUDA devices only"):
        generation_of(torch.device("cpu"))
    assert nvdec.DEFAULT_GENERATION == "hopper"


def test_probe_records_pixel_format_bit_depth_and_chroma(files) -> None:
    _need(files, "vp9_128", "hevc_10bit", "h264_444", "mjpeg")
    want = {"vp9_128": ("yuv420p", 8, "420"), "hevc_10bit": ("yuv420p10le", 10, "420"),
            "h264_444": ("yuv444p", 8, "444"), "mjpeg": ("yuvj420p", 8, "420")}
    for name, (pix_fmt, depth, chroma) in want.items():
        info = probe_video(files[name])
        assert (info.pix_fmt, info.bit_depth, info.chroma) == (pix_fmt, depth, chroma), name


def test_nvdec_minimum_frame_sizes_on_real_files(files) -> None:
    _need(files, "vp9_32", "vp9_128", "hevc_128", "hevc_144", "h264_64x48", "mpeg4_32x16")
    problem = {name: nvdec_problem(probe_video(path)) for name, path in files.items()}
    assert problem["vp9_32"].startswith("frame 32x32 is below NVDEC's VP9 minimum of 128x128; decode it on the CPU "
                                        "(data.backend=cpu")
    assert problem["vp9_128"] == "" and problem["hevc_144"] == "" and problem["h264_64x48"] == ""
    assert "frame 128x128 is below NVDEC's HEVC minimum of 144x144; re-encode it (python -m pipelines.tools.prepare" in \
        problem["hevc_128"] and "data.loader=pyav" in problem["hevc_128"]  # no DALI CPU decoder for HEVC
    assert "frame 32x16 is below NVDEC's MPEG-4 minimum of 48x16" in problem["mpeg4_32x16"]


def test_av1_per_gpu_generation(files) -> None:
    _need(files, "av1_128")
    info = probe_video(files["av1_128"])
    assert info.codec == "av1"
    for gen in ("turing", "ampere_ga100", "hopper"):
        assert nvdec_problem(info, gen).startswith(
            f"AV1: NVDEC on {nvdec.GENERATION_LABELS[gen]} GPUs does not decode it (NVIDIA NVDEC application note: "
            f"AV1 decode on Ampere GA10x, Ada, Blackwell); re-encode it"), gen
    for gen in ("ampere_ga10x", "ada", "blackwell", "sm86", "sm89", "sm100"):
        assert nvdec_problem(info, gen) == "", gen


def test_eight_bit_420_only_and_mjpeg_not_on_the_gpu(files) -> None:
    _need(files, "hevc_10bit", "h264_444", "mjpeg")
    assert "pixel format yuv420p10le (10-bit, chroma 420): DALI's GPU decoder outputs 8-bit 4:2:0 only" in \
        nvdec_problem(probe_video(files["hevc_10bit"]))
    assert "pixel format yuv444p (8-bit, chroma 444)" in nvdec_problem(probe_video(files["h264_444"]))
    assert nvdec_problem(probe_video(files["mjpeg"])).startswith(
        "codec mjpeg: DALI's GPU decoder takes ['av1', 'h264', 'hevc', 'mpeg4', 'vp8', 'vp9'] only; decode it on the "
        "CPU")


def test_maximum_sizes_per_generation() -> None:  # too big to encode here: judged from a probed-info object
    uhd_dci = VideoInfo("big.mp4", codec="h264", width=4112, height=2160, bit_depth=8, chroma="420")
    assert "above NVDEC's H.264 maximum on Hopper (sm90: H100, H200) GPUs (4096x4096, 65536 macroblocks)" in \
        nvdec_problem(uhd_dci, "hopper")
    assert nvdec_problem(uhd_dci, "blackwell") == ""
    assert nvdec_problem(VideoInfo("8k.webm", codec="vp9", width=8192, height=4320), "hopper") == ""
    assert "above NVDEC's MPEG-4 maximum" in nvdec_problem(VideoInfo("m.avi", codec="mpeg4", width=1920,
                                                                     height=1200))  # 120 x 75 = 9000 > 8192 blocks


def test_auto_decode_device_picks_dali_cpu_for_what_nvdec_cannot_take(files) -> None:
    _need(files, "vp9_32", "vp9_128", "h264_64x48")
    small, big, h264 = (probe_video(files[n]) for n in ("vp9_32", "vp9_128", "h264_64x48"))
    broken = VideoInfo("gone.webm", error="missing: no such file")
    assert auto_decode_device([big, h264, broken], "hopper") == ("gpu", "")
    device, why = auto_decode_device([small, big, broken], "hopper")
    assert device == "cpu" and why.startswith(f"NVDEC cannot decode 1 of 2 video(s), e.g. {files['vp9_32']}: "
                                              f"frame 32x32 is below")
    assert auto_decode_device([small, h264], "hopper")[0] == ""  # h264 has no DALI CPU decoder: PyAV


def test_check_videos_and_cli_name_every_file_nvdec_cannot_decode(files, tmp_path: Path) -> None:
    _need(files, "vp9_32", "vp9_128", "av1_128", "hevc_10bit", "h264_64x48")
    names = ["vp9_32", "vp9_128", "av1_128", "hevc_10bit", "h264_64x48"]
    _, rejected = check_videos([files[n] for n in names], "gpu", 4, 2, pad=True, cache=None)
    assert [p for p, _ in rejected] == [files[n] for n in ("vp9_32", "av1_128", "hevc_10bit")]
    _, rejected = check_videos([files[n] for n in names], "gpu", 4, 2, pad=True, cache=None, gpu_arch="ada")
    assert [p for p, _ in rejected] == [files[n] for n in ("vp9_32", "hevc_10bit")]
    manifest = tmp_path / "m.csv"
    manifest.write_text("".join(f"{files[n]} 0\n" for n in names))
    args = [sys.executable, "-m", "pipelines.validate", str(manifest), "--backend", "gpu", "--cache", "",
            "--frames", "4", "--sampling-rate", "2", "--pad"]
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # judged for the default generation even on a GPU machine
    res = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, env=hidden)
    assert res.returncode == 1, res.stderr
    assert "judging NVDEC decode for Hopper (sm90: H100, H200), the default: no GPU visible" in res.stdout
    assert f"{files['vp9_32']}: frame 32x32 is below NVDEC's VP9 minimum of 128x128" in res.stdout
    assert f"{files['av1_128']}: AV1: NVDEC on Hopper" in res.stdout
    assert f"{files['hevc_10bit']}: pixel format yuv420p10le" in res.stdout
    assert "2/5 videos usable by the gpu backend (3 rejected)" in res.stdout
    res = subprocess.run(args + ["--gpu-arch", "sm86"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert "judging NVDEC decode for Ampere GA10x (sm86/87: A10, A40, RTX 30, Orin), as named" in res.stdout
    assert "3/5 videos usable by the gpu backend (2 rejected)" in res.stdout
    good = tmp_path / "good.csv"
    good.write_text(f"{files['vp9_128']} 0\n{files['h264_64x48']} 1\n")
    res = subprocess.run(args[:3] + [str(good)] + args[4:], capture_output=True, text=True, cwd=REPO_ROOT,
                         env=hidden)
    assert res.returncode == 0 and "2/2 videos usable by the gpu backend (0 rejected)" in res.stdout, res.stdout
