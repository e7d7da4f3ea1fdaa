"""What NVDEC (the GPU's video decoder, behind DALI's ``device='mixed'`` decoder) can decode, per codec and GPU
generation, and why a given video cannot be decoded there.

Sources, checked against each other:

* NVIDIA Video Codec SDK 13.0, *NVDEC Application Note*, table "NVDEC Hardware Capabilities": which codec each GPU
  generation decodes. AV1 Main profile: GA10x (every Ampere GPU except GA100), Ada and Blackwell only; not Turing,
  GA100 (A100) or Hopper (H100/H200). VP8, VP9 and HEVC from 2nd-generation Maxwell on (some GPUs only in that
  generation); HEVC and VP9 up to 8192x8192 from Pascal on; H.264 up to 8192x8192 on Blackwell only.
* NVIDIA Video Codec SDK, *NVDEC Video Decoder API Programming Guide*, chapter "Video Decoder Capabilities": minimum
  frame sizes per codec (H.264, VP8, MPEG-4: 48x16; HEVC: 144x144; VP9 and AV1: 128x128) and maximum sizes. The
  same limits are what the driver reports through ``cuvidGetDecoderCaps`` (``nMinWidth``/``nMinHeight``,
  ``nMaxWidth``/``nMaxHeight``, ``nMaxMBCount``); GStreamer's nvcodec decoders publish them as their pad caps
  (nvh264dec 48-4096 x 16-4096, nvh265dec 144-8192, nvvp8dec 48-4096 x 16-4096, nvvp9dec and nvav1dec 128-8192,
  nvmpeg4videodec 48-2032 x 16-2032).
* DALI 2.4, ``dali/operators/video/frames_decoder_gpu.cc``: the GPU decoder accepts H.264, HEVC, VP8, VP9, AV1 and
  MPEG-4 (MJPEG is commented out there, although the operator's docstring lists it), asks the driver whether the
  codec decodes 8-bit 4:2:0 (``cuvidGetDecoderCaps``), and fails a video whose coded size is below the minimum or
  above the maximum (``width >= caps.nMinWidth && height >= caps.nMinHeight``, then the maximum and the macroblock
  count). It creates the decoder with an NV12 (8-bit 4:2:0) output surface and converts 8-bit samples to RGB, so
  10/12-bit or 4:2:2/4:4:4 video, which NVDEC itself may decode, does not come out right through DALI.

The generation is read from the GPU (``generation_of(torch.device("cuda"))``, by compute capability); without a
GPU, the pre-flight check judges for ``DEFAULT_GENERATION`` (Hopper: H100/H200) unless told another
(``python -m timesformer_harness.pipelines.validate ... --backend gpu --gpu-arch ampere_ga10x``; a compute capability
such as ``sm86`` or ``8.6`` works too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Oldest to newest. GA100 (A100) and GA10x (A10, A40, RTX 30, Jetson Orin) differ in AV1, hence two Ampere entries.
GENERATIONS = ("maxwell1", "maxwell2", "pascal", "volta", "turing", "ampere_ga100", "ampere_ga10x", "ada", "hopper",
               "blackwell")
GENERATION_LABELS = {
    "maxwell1": "Maxwell 1st gen (sm50)",
    "maxwell2": "Maxwell 2nd gen (sm52/53)",
    "pascal": "Pascal (sm6x)",
    "volta": "Volta (sm70/72: V100)",
    "turing": "Turing (sm75: T4)",
    "ampere_ga100": "Ampere GA100 (sm80: A100)",
    "ampere_ga10x": "Ampere GA10x (sm86/87: A10, A40, RTX 30, Orin)",
    "ada": "Ada (sm89: L4, L40, RTX 40)",
    "hopper": "Hopper (sm90: H100, H200)",
    "blackwell": "Blackwell (sm100-121: B200, RTX 50)",
}
DEFAULT_GENERATION = "hopper"  # what the pre-flight check judges for when no GPU is visible and none is named
# What DALI's GPU decoder outputs correctly: 8-bit samples, 4:2:0 chroma (NV12 surfaces).
DALI_BIT_DEPTH = 8
DALI_CHROMA = "420"
# DALI's CPU decoder (libavcodec inside DALI) takes only these; DALI 2.4 fn.decoders.video docstring.
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
# The tool that re-encodes a dataset (codec, size, 8-bit 4:2:0 output); named once here for every message.
PREPARE_TOOL = "python -m timesformer_harness.pipelines.tools.prepare MANIFEST --out DIR"


def _from(first: str) -> tuple[str, ...]:
    return GENERATIONS[GENERATIONS.index(first):]


@dataclass(frozen=True)
class CodecLimits:
    """NVDEC's limits for one codec (8-bit 4:2:0), sizes as (width, height) in pixels."""

    name: str  # as in messages: "H.264"
    min_size: tuple[int, int]
    max_size: tuple[int, int]
    max_macroblocks: int  # 16x16 blocks per frame (the driver's nMaxMBCount)
    generations: tuple[str, ...]  # generations whose NVDEC decodes it
    # Generations whose maximum differs from max_size: generation -> (max_size, max_macroblocks).
    other_max: dict[str, tuple[tuple[int, int], int]] = field(default_factory=dict)

    def max_for(self, generation: str) -> tuple[tuple[int, int], int]:
        return self.other_max.get(generation, (self.max_size, self.max_macroblocks))


NVDEC_CODECS: dict[str, CodecLimits] = {
    "h264": CodecLimits("H.264", (48, 16), (4096, 4096), 65536, _from("maxwell1"),
                        {"blackwell": ((8192, 8192), 262144)}),
    "hevc": CodecLimits("HEVC", (144, 144), (8192, 8192), 262144, _from("maxwell2"),
                        {"maxwell2": ((4096, 2304), 36864)}),
    "vp8": CodecLimits("VP8", (48, 16), (4096, 4096), 65536, _from("maxwell2")),
    "vp9": CodecLimits("VP9", (128, 128), (8192, 8192), 262144, _from("maxwell2"),
                       {"maxwell2": ((4096, 2304), 36864)}),
    "av1": CodecLimits("AV1", (128, 128), (8192, 8192), 262144, ("ampere_ga10x", "ada", "blackwell")),
    "mpeg4": CodecLimits("MPEG-4", (48, 16), (2032, 2032), 8192, _from("maxwell1")),
}


def _capability_generation(major: int, minor: int) -> str:
    if major == 5:
        return "maxwell1" if minor == 0 else "maxwell2"
    if major == 6:
        return "pascal"
    if major == 7:
        return "turing" if minor >= 5 else "volta"
    if major == 8 and minor in (0, 6, 7, 9):
        return {0: "ampere_ga100", 6: "ampere_ga10x", 7: "ampere_ga10x", 9: "ada"}[minor]
    if major == 9:
        return "hopper"
    if major in (10, 11, 12):
        return "blackwell"
    raise ValueError(f"compute capability {major}.{minor} is not in the NVDEC table (sm50 to sm121); "
                     f"name the generation instead: one of {list(GENERATIONS)}")


def generation_of(where: Any) -> str:
    """The GPU generation of ``where``: a generation name (``"hopper"``), a compute capability (``(9, 0)``,
    ``"sm90"``, ``"sm_86"``, ``"8.6"``) or a CUDA ``torch.device`` (read from the device).

    Raises:
        ValueError: an unknown name or capability, naming the accepted ones.
    """
    if isinstance(where, tuple):
        return _capability_generation(int(where[0]), int(where[1]))
    if isinstance(where, str):
        name = where.strip().lower()
        if name in GENERATIONS:
            return name
        digits = name.removeprefix("sm").lstrip("_")
        if "." in digits and digits.replace(".", "", 1).isdigit():
            major, minor = digits.split(".")
            return _capability_generation(int(major), int(minor))
        if digits.isdigit() and len(digits) >= 2:
            return _capability_generation(int(digits[:-1]), int(digits[-1]))
        raise ValueError(f"GPU generation {where!r}: name one of {list(GENERATIONS)} or a compute capability "
                         f"such as sm90 or 8.6")
    import torch

    device = torch.device(where)
    if device.type != "cuda":
        raise ValueError(f"generation_of({where!r}): NVDEC generations exist for CUDA devices only")
    return _capability_generation(*torch.cuda.get_device_capability(device))


def resolve_generation(named: str | None = None, flag: str = "--gpu-arch") -> tuple[str, str]:
    """(generation, where it came from): ``named`` when given, else the visible GPU's, else the default; ``flag``:
    the option of the command that names one, for the message."""
    if named:
        gen = generation_of(named)
        return gen, f"{GENERATION_LABELS[gen]}, as named"
    import torch

    if torch.cuda.is_available():
        gen = generation_of(torch.device("cuda"))
        return gen, f"{GENERATION_LABELS[gen]}, read from {torch.cuda.get_device_name()}"
    return DEFAULT_GENERATION, (f"{GENERATION_LABELS[DEFAULT_GENERATION]}, the default: no GPU visible "
                                f"({flag} names another)")


def _generations_text(gens: tuple[str, ...]) -> str:
    names = [GENERATION_LABELS[g].split(" (")[0] for g in gens]
    if gens == GENERATIONS[-len(gens):]:
        return f"{names[0]} and newer"
    return ", ".join(names)


def _fix(codec: str, re_encode: str) -> str:
    """How to get a file NVDEC refuses into training: DALI's CPU decoder where it takes the codec, else re-encode."""
    if codec in DALI_CPU_CODECS:
        return (f"decode it on the CPU (data.backend=cpu; data.backend=auto does so by itself) or re-encode it "
                f"({PREPARE_TOOL} {re_encode})")
    return f"re-encode it ({PREPARE_TOOL} {re_encode}) or use data.loader=pyav"


def nvdec_problem(info: Any, generation: str = DEFAULT_GENERATION) -> str:
    """Why DALI's GPU decoder (NVDEC) on a ``generation`` GPU cannot decode the video ``info`` describes ("" = it
    can). ``info`` has ``codec``, ``width``, ``height`` and, when probed, ``bit_depth`` and ``chroma``
    (``timesformer_harness.pipelines.validate.VideoInfo``); each message names the limit and the fix."""
    generation = generation_of(generation)
    codec, w, h = info.codec, info.width, info.height
    limits = NVDEC_CODECS.get(codec)
    if limits is None:
        return (f"codec {codec}: DALI's GPU decoder takes {sorted(NVDEC_CODECS)} only; "
                + _fix(codec, "--codec vp9"))
    label = GENERATION_LABELS[generation]
    if generation not in limits.generations:
        return (f"{limits.name}: NVDEC on {label} GPUs does not decode it (NVIDIA NVDEC application note: "
                f"{limits.name} decode on {_generations_text(limits.generations)}); " + _fix(codec, "--codec vp9"))
    depth, chroma = getattr(info, "bit_depth", 0), getattr(info, "chroma", "")
    if (depth and depth != DALI_BIT_DEPTH) or (chroma and chroma != DALI_CHROMA):
        fmt = getattr(info, "pix_fmt", "") or f"{depth}-bit {chroma}"
        return (f"pixel format {fmt} ({depth}-bit, chroma {chroma}): DALI's GPU decoder outputs 8-bit 4:2:0 "
                f"only; " + _fix(codec, f"--codec {codec if codec in ('vp9', 'h264', 'hevc') else 'vp9'}"))
    (min_w, min_h), ((max_w, max_h), max_mbs) = limits.min_size, limits.max_for(generation)
    if w < min_w or h < min_h:
        return (f"frame {w}x{h} is below NVDEC's {limits.name} minimum of {min_w}x{min_h}; "
                + _fix(codec, f"--short-side {max(min_w, min_h, 256)}"))
    mbs = math.ceil(w / 16) * math.ceil(h / 16)
    if w > max_w or h > max_h or mbs > max_mbs:
        return (f"frame {w}x{h} is above NVDEC's {limits.name} maximum on {label} GPUs ({max_w}x{max_h}, "
                f"{max_mbs} macroblocks); " + _fix(codec, "--short-side 256"))
    return ""

