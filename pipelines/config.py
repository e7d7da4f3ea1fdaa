"""The data section of the run config (``data:`` in the YAML files): which videos, how they are sampled and loaded.

It belongs to ``pipelines`` (every loader, the manifest reader and the pre-flight check take it);
``timesformer_harness.config.RootConfig`` composes it as its ``data`` field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from timesformer_harness.pipelines.loaders import loader_choices

MANIFEST_FORMATS = ("kinetics", "csv", "ssv2")  # path<sep>label lines | comma-separated path,label | SSv2 JSON
# What an empty data.separator (or --separator '') is told: str.split takes no empty separator
SEPARATOR_FIX = "use ' ' (whitespace, as in Kinetics lists) or ',' (or data.format=csv for comma-separated files)"
# The keys whose default depends on data.format, unset: ``DataConfig.__post_init__`` resolves them. ``DataConfig()``
# resolves them for the default format, so a schema built from it must be given these back before a config that
# names another format is merged in (``timesformer_harness.config.load_config``).
FORMAT_DEPENDENT = {"random_flip": None, "sampling": "auto"}
SAMPLINGS = ("auto", "segment", "window")  # data.sampling


def train_crop_problem(cfg: DataConfig) -> str:
    """Why ``cfg``'s train clips would not be random crops of a jittered resize ("" when they are): a
    ``train_jitter_scales`` that starts below ``train_crop_size`` makes every crop the whole frame squeezed square."""
    lo, hi = cfg.train_jitter_scales
    if lo >= cfg.train_crop_size or cfg.loader == "synthetic":
        return ""
    return (f"data.train_jitter_scales={[lo, hi]} starts below data.train_crop_size={cfg.train_crop_size}: a train "
            f"clip's short side is resized into that range and then cropped, so the range must start at the crop or "
            f"above (the recipes: [256, 320] for 224, [448, 512] for 448); e.g. data.train_jitter_scales="
            f"[{cfg.train_crop_size}, {max(hi, round(cfg.train_crop_size * 8 / 7))}]")


def resolve_sampling(sampling: str, fmt: str) -> str:
    """The temporal sampling ``sampling`` (``data.sampling``) means for manifests of format ``fmt``: ``auto`` is
    ``segment`` for SSv2 and ``window`` otherwise."""
    if sampling == "auto":
        return "segment" if fmt == "ssv2" else "window"
    return sampling


def check_minimums(section: str, values: object, minimums: dict[str, float]) -> None:
    """Raise ValueError naming ``section.<field>`` for the first field of ``values`` below its minimum (the message
    starts with the key, so that a config error names where that key was set)."""
    for name, low in minimums.items():
        value = getattr(values, name)
        if value < low:
            raise ValueError(f"{section}.{name}={value}; must be >= {low}")


@dataclass
class DataConfig:
    """Dataset, sampling and augmentation (the original recipe's names, lower-case)."""

    loader: str = "auto"  # auto, or a registered backend (pipelines.loaders: dali | pyav | synthetic)
    backend: str = "auto"  # DALI device: auto | cpu | gpu
    format: str = "kinetics"  # kinetics | csv | ssv2 (timesformer_harness.pipelines.manifest)
    root: str = "data/toy"  # folder holding train.csv / val.csv / test.csv (kinetics format)
    train_manifest: str = ""  # overrides {root}/train.csv
    val_manifest: str = ""  # overrides {root}/val.csv
    test_manifest: str = ""  # overrides {root}/test.csv
    path_prefix: str = ""  # joined before every manifest path (the original's PATH_PREFIX); SSv2: the videos' folder
    separator: str = " "  # kinetics manifests: " " = whitespace, the label the last field (paths may hold spaces)
    ssv2_labels: str = ""  # the SSv2 labels JSON; "": {root}/something-something-v2-labels.json
    ssv2_suffix: str = ".webm"  # SSv2 videos are {path_prefix}/{id}{ssv2_suffix}; "" = folders of JPEG frames {id}/
    num_frames: int = 8  # frames per clip T (model.num_frames)
    # which frames a clip takes: segment = one frame in each 1/T of the whole video (SSv2's recipe), window = every
    # sampling_rate-th frame of one window (Kinetics'), auto = segment for data.format=ssv2, else window; the run's
    # saved config holds the value used
    sampling: str = "auto"
    sampling_rate: int = 8  # window sampling: a clip takes every sampling_rate-th frame at target_fps
    target_fps: int = 30  # the frame rate sampling_rate counts in; videos at another rate are sampled in time
    # train: short side drawn in [min, max], then a train_crop_size crop (a new run refuses a min below the crop)
    train_jitter_scales: list[int] = field(default_factory=lambda: [256, 320])
    train_crop_size: int = 224  # train: random square crop of the resized frames (model.img_size)
    test_crop_size: int = 224  # val/test: short side resized to this, then num_spatial_crops square crops
    mean: list[float] = field(default_factory=lambda: [0.45, 0.45, 0.45])  # per-channel mean subtracted (RGB, 0-1)
    std: list[float] = field(default_factory=lambda: [0.225, 0.225, 0.225])  # per-channel std divided by
    # train: horizontal flip with probability 0.5; null = on, except off for data.format=ssv2 (its labels tell left
    # from right: "pushing something from left to right"); the run's saved config holds the value used
    random_flip: bool | None = None
    inv_uniform_sample: bool = False  # train: draw the short side uniform in 1/size (as the original's option)
    num_ensemble_views: int = 1  # val/test: uniform temporal clips per video
    num_spatial_crops: int = 3  # val/test: spatial crops per clip, 1 (centre) or 3 (left/top, centre, right/bottom)
    batch_size: int = 8  # per process
    num_workers: int = 2  # PyAV DataLoader workers / DALI threads
    on_bad_video: str = "error"  # error | skip: a video that fails the pre-flight check or decoding at run time
    max_bad_fraction: float = 0.01  # skip: stop the run once more than this fraction of videos fail at run time
    validate: str = "shallow"  # pre-flight check: shallow (headers, packet counts) | deep (decode every packet, cached)
    pad_short: bool = True  # pad videos shorter than the clip span with their last frame
    seed: int = 0  # the loaders' sampling seed: epoch order, clip starts, crops and flips
    # the probe cache of pipelines/validate.py (a file, or a folder to hold it), the packet indexes beside it; "" = the
    # node-local default (common.cache_path), "none" = off
    validate_cache: str = ""
    # the pre-flight check refuses videos whose frames (width x height) exceed this, before decoding any frame, so a
    # small crafted file cannot make a decoder's memory (or a quarantine decision) depend on free memory; 3840x2160
    max_frame_pixels: int = 3840 * 2160
    # data.backend=auto on a CUDA model picks the decode path with the most clips/s measured for this GPU in this table
    # (pipelines/decode_rates.py); "" = the shipped configs/measured/decode_rates.yaml, "none" = no table (rule order)
    decode_rates: str = ""
    synthetic_videos: int = 64  # data.loader=synthetic: clips per epoch (all ranks together)
    synthetic_classes: int = 10  # data.loader=synthetic: labels drawn from 0..synthetic_classes-1

    def __post_init__(self) -> None:
        check_minimums("data", self, {"num_frames": 1, "sampling_rate": 1, "target_fps": 1, "train_crop_size": 1,
                                      "test_crop_size": 1, "num_ensemble_views": 1, "batch_size": 1, "num_workers": 0,
                                      "synthetic_videos": 1, "synthetic_classes": 1})
        if len(self.train_jitter_scales) != 2 or not 0 < self.train_jitter_scales[0] <= self.train_jitter_scales[1]:
            raise ValueError(f"data.train_jitter_scales={list(self.train_jitter_scales)}; give [min, max] short sides "
                             "in pixels, 0 < min <= max (e.g. [256, 320])")
        if len(self.mean) != 3:
            raise ValueError(f"data.mean={list(self.mean)}; give 3 values (R, G, B), e.g. [0.45, 0.45, 0.45]")
        if len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"data.std={list(self.std)}; give 3 values (R, G, B), every std > 0")
        if self.loader not in loader_choices():
            raise ValueError(f"data.loader={self.loader!r}; choose from {loader_choices()}")
        if self.backend not in ("auto", "cpu", "gpu"):
            raise ValueError(f"data.backend={self.backend!r}; choose from ['auto', 'cpu', 'gpu']")
        if self.format not in MANIFEST_FORMATS:
            raise ValueError(f"data.format={self.format!r}; choose from {list(MANIFEST_FORMATS)}")
        if not self.separator:
            raise ValueError(f"data.separator is empty; {SEPARATOR_FIX}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"data.sampling={self.sampling!r}; choose from {list(SAMPLINGS)}")
        self.sampling = resolve_sampling(self.sampling, self.format)  # resolved once here, as random_flip
        if self.random_flip is None:  # resolved once here: every loader, and a resume's check, see the value used
            self.random_flip = self.format != "ssv2"
        if self.on_bad_video not in ("error", "skip"):
            raise ValueError(f"data.on_bad_video={self.on_bad_video!r}; choose 'error' or 'skip'")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={self.max_bad_fraction}; use a fraction in [0, 1] (0.01 = 1%)")
        if self.validate not in ("shallow", "deep"):
            raise ValueError(f"data.validate={self.validate!r}; choose 'shallow' or 'deep'")
        if self.max_frame_pixels < 1:
            raise ValueError(f"data.max_frame_pixels={self.max_frame_pixels}; use a positive pixel count "
                             f"(width x height, e.g. {3840 * 2160} for 3840x2160)")
        if self.num_spatial_crops not in (1, 3):
            raise ValueError(f"data.num_spatial_crops={self.num_spatial_crops}; the protocol uses 1 or 3 crops")
