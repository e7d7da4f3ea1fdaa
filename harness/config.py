"""Typed run configuration: dataclass schema <- YAML file(s) <- ``key=value`` overrides (omegaconf).

``load_config("configs/exp/x.yaml", ["model.depth=2"])`` merges ``OmegaConf.structured(RootConfig)`` with the
YAML (whose ``defaults:`` list may name other YAML files, merged first) and the dotlist, then instantiates the
dataclasses so ``__post_init__`` checks run. A ``defaults:`` entry is looked for beside the file that names it, then
in the shipped configs (``configs/model/toy.yaml`` works from a config in any folder). Every mistake is a
``ConfigError`` naming the key, where it was set and the fix; an unknown key names the closest valid key.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import BooleanNode, DictConfig, ListConfig, OmegaConf, StringNode
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from timesformer_harness.common import not_a_file
from timesformer_harness.kernels.backend_names import BACKENDS as ATTN_BACKENDS, SHORT_SEQUENCE_BACKENDS
from timesformer_harness.pipelines.config import FORMAT_DEPENDENT, DataConfig, check_minimums
from timesformer_harness.variants import REFERENCE, variant

logger = logging.getLogger(__name__)

# divided attention's temporal pass also takes the short-sequence kernels (kernels/short_attention.py)
TEMPORAL_ATTN_BACKENDS = ("same", *ATTN_BACKENDS, *SHORT_SEQUENCE_BACKENDS)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BENCH_SUITES = ("model", "attention", "scaling", "pipeline", "e2e")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")  # "none": eager
RESUME_POLICIES = ("never", "auto", "must")
PACKAGE_DIR = Path(__file__).resolve().parent  # timesformer_harness: harness/ in a clone
REPO_ROOT = PACKAGE_DIR.parent
# The shipped configs: the clone's configs/, or their copy inside an installed wheel (timesformer_harness/configs/).
CONFIG_DIR = PACKAGE_DIR / "configs" if (PACKAGE_DIR / "configs").is_dir() else REPO_ROOT / "configs"


@dataclass
class ModelConfig:
    """TimeSformer hyper-parameters (names as in ``timesformer_harness.model.TimeSformer``)."""

    img_size: int = 224  # input frame size H = W in pixels (the crop the loader delivers)
    patch_size: int = 16  # patch side in pixels; img_size must be a multiple of it
    in_chans: int = 3  # input channels (RGB)
    num_classes: int = 400  # classifier outputs; every manifest label must be below it
    num_frames: int = 8  # frames per clip T (the time embedding's length; set data.num_frames the same)
    embed_dim: int = 768  # token width D (768 = ViT-Base)
    depth: int = 12  # transformer blocks
    num_heads: int = 12  # attention heads; embed_dim must be divisible by it
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    qkv_bias: bool = True  # bias in the fused qkv projection
    drop_rate: float = 0.0  # dropout after the embeddings, each attention projection and in the MLPs
    attn_drop_rate: float = 0.0  # dropout on the attention weights
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly to this in the last block
    attention_type: str = REFERENCE  # a registered variant (timesformer_harness.variants)
    attn_backend: str = "auto"  # auto (SDPA chooses) | flash | efficient | cudnn | math | naive
    # divided attention's temporal pass: same (= attn_backend), a backend, or triton (reads the qkv output in place)
    temporal_attn_backend: str = "same"
    grad_checkpointing: bool = False  # recompute each block in backward: less activation memory, more time
    # "original": time_embed/temporal_fc zero (checkpoint-compatible, the default);
    # "scratch": time_embed ~ N(0, time_embed_std) so a from-scratch model sees frame order from step 0.
    init: str = "original"
    time_embed_std: float = 1.0  # init=scratch: the std of the time embedding's normal init
    # the channel order the weights were trained on: rgb (the loaders' frames), or bgr (the original's SSv2
    # checkpoints and recipe: its JPEG frames decoded by OpenCV reached the ViT as BGR)
    input_channels: str = "rgb"
    pretrained: str = ""  # path to .pyth / state_dict / ImageNet ViT / HF weights; "" = random init
    # how model.pretrained's pos_embed reaches another image size: "" = as the original (ImageNet ViT weights into a
    # divided or joint model: 1d, nearest over the flattened sequence, which scrambles the patch grid; else 2d),
    # 2d (nearest over the patch grid: the better choice for new runs), or 1d
    pretrained_pos_resize: str = ""

    def __post_init__(self) -> None:
        variant(self.attention_type)  # ValueError naming the registered ones
        check_minimums("model", self, {key: 1 for key in ("img_size", "patch_size", "in_chans", "num_classes",
                                                          "num_frames", "embed_dim", "depth", "num_heads")})
        if not self.mlp_ratio > 0:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio}; give a positive number (4.0 in every recipe)")
        if self.attn_backend == "triton":
            raise ValueError("model.attn_backend=triton: the triton kernel takes short sequences only (divided "
                             "attention's temporal pass); set model.temporal_attn_backend=triton instead")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"model.attn_backend={self.attn_backend!r}; choose from {list(ATTN_BACKENDS)}")
        if self.temporal_attn_backend not in TEMPORAL_ATTN_BACKENDS:
            raise ValueError(f"model.temporal_attn_backend={self.temporal_attn_backend!r}; choose from "
                             f"{list(TEMPORAL_ATTN_BACKENDS)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"model.img_size={self.img_size} is not a multiple of model.patch_size={self.patch_size}")
        if self.input_channels not in ("rgb", "bgr"):
            raise ValueError(f"model.input_channels={self.input_channels!r}; choose 'rgb' or 'bgr'")
        if self.pretrained_pos_resize not in ("", "2d", "1d"):
            raise ValueError(f"model.pretrained_pos_resize={self.pretrained_pos_resize!r}; choose '2d', '1d' or '' "
                             "(the original's choice)")
        if self.init not in ("original", "scratch"):
            raise ValueError(f"model.init={self.init!r}; choose 'original' or 'scratch'")
        for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):  # 1 drops everything (DropPath: NaN)
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"model.{key}={getattr(self, key)}; use a probability in [0, 1) (0 = off)")


@dataclass
class SolverConfig:
    """Optimizer and learning-rate schedule (per-iteration, as the original)."""

    optimizer: str = "sgd"  # sgd | adamw | lamb (lamb needs apex)
    base_lr: float = 0.005  # the learning rate the policy scales
    lr_policy: str = "steps_with_relative_lrs"  # steps_with_relative_lrs | cosine | constant
    steps: list[int] = field(default_factory=lambda: [0, 11, 14])  # steps_with_relative_lrs: epochs where lrs[i] starts
    lrs: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.01])  # steps_with_relative_lrs: factors of base_lr
    max_epoch: int = 15  # epochs to train (the cosine policy ends here)
    momentum: float = 0.9  # sgd momentum
    nesterov: bool = True  # sgd: Nesterov momentum
    weight_decay: float = 1e-4  # applied to every parameter, as the original
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw / lamb betas
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start_lr over this many epochs; 0 = none
    warmup_start_lr: float = 0.0  # the learning rate the warm-up starts from (the original's default: 0.01)
    cosine_end_lr: float = 0.0  # cosine: the learning rate at max_epoch
    global_batch_size: int = 64  # gradient accumulation up to this many clips per optimizer step
    grad_clip: float = 0.0  # max grad norm; 0 = off
    label_smoothing: float = 0.0  # cross-entropy label smoothing; 0 = off
    mixup_alpha: float = 0.0  # > 0 enables mixup
    cutmix_alpha: float = 0.0  # > 0 enables cutmix
    use_apex: str = "auto"  # auto | never

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw", "lamb"):
            raise ValueError(f"solver.optimizer={self.optimizer!r}; choose from ['sgd', 'adamw', 'lamb']")
        if self.lr_policy not in ("steps_with_relative_lrs", "cosine", "constant"):
            raise ValueError(
                f"solver.lr_policy={self.lr_policy!r}; choose from ['steps_with_relative_lrs', 'cosine', 'constant']"
            )
        if len(self.steps) != len(self.lrs):
            raise ValueError(f"solver.steps {self.steps} and solver.lrs {self.lrs} must have the same length")
        if self.lr_policy == "steps_with_relative_lrs" and (not self.steps or self.steps[0] != 0):
            raise ValueError(f"solver.steps={self.steps} must start at epoch 0 (e.g. [0, 11, 14])")
        if self.lr_policy == "steps_with_relative_lrs" and any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"solver.steps={self.steps}: give the epochs each stage starts at in increasing order "
                             f"(e.g. [0, 11, 14])")
        if self.use_apex not in ("auto", "never"):
            raise ValueError(f"solver.use_apex={self.use_apex!r}; choose 'auto' or 'never'")
        check_minimums("solver", self, {"global_batch_size": 0, "max_epoch": 1, "weight_decay": 0.0, "grad_clip": 0.0,
                                        "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "warmup_epochs": 0.0})
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"solver.label_smoothing={self.label_smoothing}; use a fraction in [0, 1) (0.1 is usual)")
        # torch refuses these only when the optimizer is built, after the run folder is written
        if not (math.isfinite(self.base_lr) and self.base_lr >= 0.0):
            raise ValueError(f"solver.base_lr={self.base_lr}; give a finite learning rate >= 0 (e.g. 0.005)")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"solver.betas={list(self.betas)}; give 2 values in [0, 1) (e.g. [0.9, 0.999])")


@dataclass
class TrainConfig:
    """Training loop switches."""

    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True  # channels-last patch embedding (CUDA only; ignored on the CPU)
    compile: str = "none"  # none | default | reduce-overhead | max-autotune (torch.compile modes)
    warmup_steps: int = 1  # optimizer steps per epoch logged as warm-up, outside the steady clips/s
    # resuming after the usable videos changed (manifest edited, a video now rejected): error | replan (restart the
    # interrupted epoch from its first batch with the new list)
    on_data_change: str = "error"
    eval_period: int = 5  # validate every this many epochs and at the end; 0 = never
    checkpoint_period: int = 1  # save a checkpoint every this many epochs and at the end
    keep_last: int = 3  # epoch checkpoints kept (the best one is kept besides)
    # never: a fresh run (refused when output.dir holds a run: checkpoints or metrics) | auto: resume from the newest
    # checkpoint when there is one | must: resume, and fail when there is none
    resume: str = "auto"
    log_period: int = 10  # optimizer steps per log line and metrics.jsonl train record
    max_steps_per_epoch: int = 0  # 0 = the whole epoch (a cap for smoke runs)
    seed: int = 0  # torch / numpy / random seed (+ rank); the loaders' sampling has its own, data.seed
    deterministic: bool = False  # deterministic algorithms and cuDNN settings (slower; see runtime.set_determinism)
    debug_nan_at_step: int = -1  # test hook: make the loss NaN at this global optimizer step; -1 = off
    debug_signal_at_step: int = -1  # test hook: SIGTERM ourselves after this optimizer step; -1 = off
    # test hook: SIGKILL rank debug_kill_rank after this optimizer step, on torchrun's first attempt only; -1 = off
    debug_kill_at_step: int = -1
    debug_kill_rank: int = 0  # test hook: the rank debug_kill_at_step kills
    record_samples: bool = False  # write every batch's video indices to samples/rank{R}.jsonl (shard checks)
    # count each micro-batch's host-device syncs (CUDA: torch.cuda.set_sync_debug_mode) into the train records
    count_syncs: bool = False

    def __post_init__(self) -> None:
        check_minimums("train", self, {"eval_period": 0, "checkpoint_period": 1, "keep_last": 1, "log_period": 1,
                                       "max_steps_per_epoch": 0})
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}; choose from {list(PRECISIONS)}")
        self.compile = {"true": "default", "false": "none"}.get(str(self.compile).lower(), self.compile)
        check_compile_mode(self.compile, "train.compile")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps={self.warmup_steps}; must be >= 0")
        if self.on_data_change not in ("error", "replan"):
            raise ValueError(f"train.on_data_change={self.on_data_change!r}; choose 'error' or 'replan'")
        if self.resume not in RESUME_POLICIES:
            raise ValueError(f"train.resume={self.resume!r}; choose from {list(RESUME_POLICIES)}")


@dataclass
class TestConfig:
    """Multi-view evaluation."""

    ensemble: str = "sum"  # sum (the original: raw logits summed over views) | softmax_mean | max
    batch_size: int = 8  # clips per process per batch in validation and evaluation
    checkpoint: str = ""  # evaluate's weights without --checkpoint; "" = the newest checkpoint of output.dir
    split: str = "test"  # which manifest timesformer_harness.evaluate reads: test | val
    output: str = ""  # result JSON; "" = {output.dir}/eval_{split}.json

    def __post_init__(self) -> None:
        check_minimums("test", self, {"batch_size": 1})  # the data section's batch in validation and evaluation
        if self.ensemble not in ("sum", "softmax_mean", "max"):
            raise ValueError(f"test.ensemble={self.ensemble!r}; choose from ['sum', 'softmax_mean', 'max']")
        if self.split not in ("test", "val"):
            raise ValueError(f"test.split={self.split!r}; choose 'test' or 'val'")


@dataclass
class BenchConfig:
    """Benchmark knobs (see timesformer_harness.bench)."""

    batch_size: int = 2  # clips per step of a case
    warmup: int = 2  # untimed steps before the timed ones
    steps: int = 5  # timed samples per case
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True  # channels-last patch embedding in the measured model
    preset: str = ""  # model preset; "" = cpu_bench without a GPU, vit_base_patch16 with one
    # the suites to run: model | attention | scaling | pipeline | e2e
    suites: list[str] = field(default_factory=lambda: ["model", "attention", "scaling", "pipeline", "e2e"])
    # scaling sweep frames; [] (with img_sizes []) = T, 2T on CPU, the paper's grid on a GPU (bench.scaling.paper_grid)
    frames: list[int] = field(default_factory=list)
    img_sizes: list[int] = field(default_factory=list)  # scaling sweep image sizes; [] = the model's (see frames)
    batches: list[int] = field(default_factory=list)  # model suite; [] = [batch_size] on CPU, 2, 4, ... to OOM on GPU
    compile: list[str] = field(default_factory=lambda: ["none"])  # model suite: torch.compile modes, none = eager
    sweep_warmup: int = 1  # the scaling sweep's larger cases take fewer steps
    sweep_steps: int = 3  # timed samples per scaling-sweep case
    mem_limit_gb: float = 8.0  # CPU only: address-space cap per case, so a too-big case records oom, not swap
    case_timeout_s: int = 600  # seconds a case's fresh process may run before it is killed (status error)
    gemm_n: int = 1024  # CPU utilisation: fp32 GEMM of this size measured in the same run is the peak
    # a timed sample's length on CPU: steps (and calibration GEMMs) per block to fill it, so that a short step is not
    # timed right after a GEMM has filled the caches (it had made sub-millisecond steps 2-30x slower); 0 = one step
    block_s: float = 0.1
    threads: int = 0  # CPU intra-op threads per case; 0 = torch's default
    data_config: str = "configs/exp/toy_divided_cpu.yaml"  # pipeline/e2e suites: the data section to load
    pipeline_batches: int = 8  # timed batches per loader (after 2 warm-up batches)
    input_bound_threshold: float = 0.1  # e2e verdict: input-bound when data wait > this share of a step
    out_dir: str = "runs/bench"  # where each run writes its <timestamp>-<attn>/ folder

    def __post_init__(self) -> None:
        check_bench_suites(self.suites)
        if self.precision not in PRECISIONS:
            raise ValueError(f"bench.precision={self.precision!r}; choose from {list(PRECISIONS)}")
        check_minimums("bench", self, {"batch_size": 1, "steps": 1, "sweep_steps": 1, "warmup": 0, "sweep_warmup": 0,
                                       "mem_limit_gb": 0.0, "case_timeout_s": 1, "gemm_n": 1, "block_s": 0.0,
                                       "threads": 0, "pipeline_batches": 1, "input_bound_threshold": 0.0})
        for key in ("batches", "frames", "img_sizes"):
            if any(v < 1 for v in getattr(self, key)):
                raise ValueError(f"bench.{key}={list(getattr(self, key))}: every value must be >= 1")
        for mode in self.compile:
            check_compile_mode(mode, "bench.compile")


def check_compile_mode(mode: str, key: str = "compile") -> None:
    """Raise ValueError naming ``key`` and the modes when ``mode`` is not one of ``COMPILE_MODES``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"{key}={mode!r}; choose from {list(COMPILE_MODES)} (torch.compile's modes; none = eager)")


def check_bench_suites(suites: list[str]) -> None:
    """Raise ValueError naming the unknown suites and the valid ones."""
    unknown = sorted(set(suites) - set(BENCH_SUITES))
    if unknown:
        raise ValueError(f"unknown bench suites {unknown}; choose from {list(BENCH_SUITES)}")


@dataclass
class DistConfig:
    """torch.distributed settings (torchrun supplies rank/world size through the environment)."""

    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    timeout_s: int = 1800  # seconds a collective or the start-up join may wait for the other ranks
    find_unused_parameters: bool = False  # DDP option (not needed by TimeSformer)

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"dist.backend={self.backend!r}; choose from ['auto', 'nccl', 'gloo']")


@dataclass
class OutputConfig:
    """Where a run writes."""

    # the run folder (checkpoints, logs, metrics); load_config(path) makes it runs/train/<the config file's stem>
    # unless set
    dir: str = "runs/train/default"
    tensorboard: bool = True  # write TensorBoard scalars to {output.dir}/tb


@dataclass
class RootConfig:
    """The whole tree; each entry point reads only the parts it needs. ``data`` is
    ``timesformer_harness.pipelines.config.DataConfig`` (the pipelines own their schema)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


class ConfigError(ValueError):
    """A config the schema refuses: the message names the key, where it was set (file or command line) and the fix."""


class UnknownKeyError(ConfigError, KeyError):
    """A key the schema does not have (also a ``KeyError``, as it always was)."""

    __str__ = BaseException.__str__  # KeyError's own __str__ would print the message as a quoted repr


COMMAND_LINE = "command-line overrides"


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, DictConfig):
        return [prefix.rstrip(".")]
    keys = []
    for k in node.keys():
        keys += _all_keys(node[k], f"{prefix}{k}.")
    return keys


# Names other trainers use for our keys (timm, torchvision's references, PySlowFast's, Lightning's).
KEY_ALIASES = {
    "epochs": "solver.max_epoch", "num_epochs": "solver.max_epoch", "max_epochs": "solver.max_epoch",
    "lr": "solver.base_lr", "learning_rate": "solver.base_lr", "wd": "solver.weight_decay",
    "opt": "solver.optimizer", "sched": "solver.lr_policy", "lr_scheduler": "solver.lr_policy",
    "warmup_epoch": "solver.warmup_epochs", "clip_grad": "solver.grad_clip", "max_grad_norm": "solver.grad_clip",
    "gradient_clip_val": "solver.grad_clip", "smoothing": "solver.label_smoothing", "mixup": "solver.mixup_alpha",
    "cutmix": "solver.cutmix_alpha", "workers": "data.num_workers", "amp": "train.precision",
    "output_dir": "output.dir", "log_dir": "output.dir", "checkpoint_dir": "output.dir",
}


def _suggestions(bad: str, schema: DictConfig) -> list[str]:
    """The valid keys ``bad`` most likely meant, best first (``bad`` is a section or a key of a valid section: the
    check names an unknown section alone)."""
    valid = _all_keys(schema)
    section, _, leaf = bad.rpartition(".")
    alias = [KEY_ALIASES[leaf]] if leaf in KEY_ALIASES else []
    elsewhere = [k for k in valid if k.rsplit(".", 1)[-1] == leaf]  # train.max_epoch is solver.max_epoch
    if not section:  # a misspelt section (solvr:), or a key without its section (base_lr=)
        return difflib.get_close_matches(bad, list(schema.keys()), n=1, cutoff=0.6) or elsewhere or alias
    in_section = [k for k in valid if k.startswith(f"{section}.")]
    # a near spelling in its own section, the key in another section, another trainer's name for it, then looser
    found = (difflib.get_close_matches(bad, in_section, n=1, cutoff=0.8) + elsewhere + alias
             or difflib.get_close_matches(bad, in_section, n=1, cutoff=0.5)
             or difflib.get_close_matches(bad, valid, n=1, cutoff=0.5))
    return list(dict.fromkeys(found))


def _unknown_key_error(bad: str, schema: DictConfig, source: str) -> UnknownKeyError:
    close = _suggestions(bad, schema)
    others = f" (or {', '.join(repr(k) for k in close[1:])})" if len(close) > 1 else ""
    hint = f"; did you mean {close[0]!r}{others}?" if close else f"; valid sections: {sorted(schema.keys())}"
    return UnknownKeyError(f"unknown config key {bad!r} in {source}{hint}")


TAKES_BOOLEANS = {"train.compile"}  # string keys whose check maps true/false to a value


def _takes_text(section: Any, key: str) -> bool:
    """Whether ``key`` (``model.init``, or ``init`` with ``section`` the schema's ``model``) is a string key."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(section, parent, default=None) if parent else section
    return isinstance(node, DictConfig) and leaf in node and isinstance(node._get_node(leaf), StringNode)


def _check_keys(node: Any, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Fail on the first key of ``node`` that the schema does not have, naming the closest valid one, and on a
    YAML boolean or number given to a string key (``train.resume=yes`` would otherwise arrive as the string 'True',
    ``dir: 007`` as '7') or anything but a boolean to a boolean key."""
    if isinstance(node, DictConfig):  # its values as written: an interpolation is resolved after the merge
        node = OmegaConf.to_container(node, resolve=False)
    if not isinstance(node, dict):
        return
    for k, value in node.items():
        full = f"{prefix}{k}"
        if k not in schema:
            raise _unknown_key_error(full, OmegaConf.structured(RootConfig), source)
        if isinstance(schema[k], DictConfig) and value is None:  # `model:` with every key commented out
            first = next(iter(schema[k]))
            raise ConfigError(f"{source}: section {full!r} is empty; delete it, or give it keys (e.g. "
                              f"{full}.{first}={schema[k][first]})")
        if isinstance(schema[k], DictConfig):
            _check_keys(value, schema[k], source, prefix=f"{full}.")
        elif isinstance(schema[k], ListConfig) and isinstance(value, dict):  # data.mean.0=0.5, data.mean[0]=0.5
            example = ",".join(str(v) for v in schema[k]) or "..."
            raise ConfigError(f"{source}: {full}.{next(iter(value), '')}: one element of a list cannot be set; give "
                              f"the whole list (e.g. {full}=[{example}])")
        elif isinstance(value, bool) and isinstance(schema._get_node(k), StringNode) and full not in TAKES_BOOLEANS:
            raise ConfigError(f"{source}: {full}={value}: YAML reads yes/no/on/off/true/false as a boolean, and "
                              f"{full} takes a word; give one of its values (default: {full}={schema[k]})")
        elif (isinstance(schema._get_node(k), BooleanNode) and value is not None and not isinstance(value, bool)
              and not (isinstance(value, str) and "${" in value)):  # omegaconf would read 2 or "1" as True
            raise ConfigError(f"{source}: {full}={value!r}: {full} takes a boolean; give true or false")
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)
              and isinstance(schema._get_node(k), StringNode)):
            raise ConfigError(f"{source}: {full}={value}: YAML reads this unquoted value as a number (007 as 7, 12:30 "
                              f"as 750, .10 as 0.1), and {full} takes text; quote it ({k}: '...')")


def _find_default(name: str, config: Path) -> Path:
    """A ``defaults:`` entry of ``config``: beside it, else in the shipped configs (a leading
    ``configs/`` dropped, so the repository-relative ``configs/model/toy.yaml`` works from any folder)."""
    tried = [config.parent / name, CONFIG_DIR / name.removeprefix("configs/")]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        kinds = [(p, kind) for p in tried if (kind := not_a_file(p)) != "does not exist"]
        what = f"{kinds[0][0]} {kinds[0][1]}, not a config file" if kinds else "does not exist"
        raise ConfigError(f"defaults entry {name!r} of {config}: {what}: looked for "
                          f"{' and '.join(str(p) for p in tried)}; give a YAML file's path relative to that config's "
                          f"folder or to the shipped configs (e.g. configs/model/toy.yaml)")
    return found


def find_config(path: str | Path) -> Path:
    """``--config``'s file: ``path`` from the current folder; when nothing is there and ``path`` is relative, the
    shipped config of that name (a leading ``configs/`` dropped, as for a ``defaults:`` entry), said in a warning."""
    path = Path(path)
    shipped = CONFIG_DIR / str(path).removeprefix("configs/")
    if path.is_absolute() or not_a_file(path) != "does not exist" or not shipped.is_file():
        return path
    logger.warning("config %s is not in the current folder (%s): using the shipped %s", path, Path.cwd(), shipped)
    return shipped


MAX_CONFIG_FILES = 256  # files one config may read through its defaults, repeats counted (a tree, not a bomb)


def _yaml_sources(path: Path, seen: tuple[Path, ...] = (), read: list[int] | None = None
                  ) -> list[tuple[str, DictConfig]]:
    """``(name, content)`` of a YAML file and, before it, of every file its ``defaults:`` list names (recursively),
    in merge order. ``read`` counts the files read so far for the whole tree (at most ``MAX_CONFIG_FILES``)."""
    read = [0] if read is None else read
    read[0] += 1
    if read[0] > MAX_CONFIG_FILES:
        raise ConfigError(f"config {path}: its 'defaults' read more than {MAX_CONFIG_FILES} files (a file named "
                          "several times at several levels multiplies); name each file once")
    if (kind := not_a_file(path)) == "does not exist":
        raise ConfigError(f"config file {path} does not exist (a relative path is read from the current folder, "
                          f"{Path.cwd()}, then from the shipped configs, {CONFIG_DIR}); fix the path")
    if kind == "is a folder":
        example = next(iter(sorted(path.glob("*.yaml"))), path / "my.yaml")
        raise ConfigError(f"config {path} is a folder, not a config file; name the YAML file, e.g. {example}")
    if kind:
        raise ConfigError(f"config {path} {kind}" + (", not a file; write the config to a YAML file and name that"
                                                      if kind.startswith("is ") else ""))
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'defaults'")
    try:
        cfg: Any = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e
    except OSError:  # omegaconf refuses a document that is a scalar (42): "Invalid loaded object type: int"
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} holds a {type(cfg).__name__}; a config is a mapping of sections "
                          f"(model:, data:, solver:, ...)")
    defaults = cfg.pop("defaults", [])
    if not OmegaConf.is_list(defaults) and not isinstance(defaults, list):
        raise ConfigError(f"config {path}: 'defaults' must be a list of YAML files, e.g. "
                          f"defaults: [configs/model/toy.yaml, configs/data/toy.yaml]")
    sources: list[tuple[str, DictConfig]] = []
    for name in defaults:
        sources += _yaml_sources(_find_default(str(name), path), seen + (path.resolve(),), read)
    return [*sources, (str(path), cfg)]


def _as_written(node: DictConfig, key: str) -> Any:
    """``key``'s value in ``node`` as written (an interpolation unresolved: one file alone may not resolve it), or
    None."""
    value: Any = OmegaConf.to_container(node, resolve=False)
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _set_in(key: str, sources: list[tuple[str, DictConfig]]) -> str:
    """Where ``key``'s value came from: the last source that sets it, or "" (the schema's default)."""
    return next((name for name, node in reversed(sources) if _as_written(node, key) is not None), "")


def _overrides_node(overrides: list[str], schema: DictConfig) -> DictConfig:
    """``key=value`` overrides as one config, the last of a key winning. A value is YAML, but a string key keeps its
    text as typed where YAML would read a number (``output.dir=007`` is '007', not 7; ``12:30`` not 750). A value
    that is not YAML is a ConfigError naming its override."""
    node = OmegaConf.create()
    for item in overrides:
        try:
            node.merge_with_dotlist([item])
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(f"{COMMAND_LINE}: {item!r}: {' '.join(str(e).split())}; a value is YAML: quote it, and "
                              f"the override for the shell (\"data.separator=','\"), or close its brackets (e.g. "
                              f"data.train_jitter_scales=[256,320])") from e
        key, _, text = item.partition("=")
        value = _as_written(node, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _takes_text(schema, key):
            OmegaConf.update(node, key, text)
    return node


def _omegaconf_error(e: OmegaConfBaseException, source: str, schema: DictConfig) -> ConfigError:
    """omegaconf's multi-line error as one line: where, the key, what was wrong, and the default to copy."""
    key = str(getattr(e, "full_key", "") or "")
    what = str(getattr(e, "msg", "") or e).split("\n")[0].strip()
    default = OmegaConf.select(schema, key, default=None) if key else None
    if OmegaConf.is_config(default):
        default = OmegaConf.to_container(default)
    shown = "''" if default == "" else default
    fix = f"; give a value like the default, {key}={shown}" if default is not None else ""
    return ConfigError(f"{source}: {key + ': ' if key else ''}{what}{fix}")


def default_output_dir(path: str | Path) -> str:
    """The run folder of a config that sets no ``output.dir``: ``runs/train/<its file stem>`` (``my.yaml``: ``my``)."""
    return f"runs/train/{Path(path).stem}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RootConfig:
    """Build the typed config from an optional YAML file and ``key=value`` overrides.

    Raises:
        UnknownKeyError: an unknown key (a ``ConfigError`` and a ``KeyError``), naming the closest valid key.
        ConfigError: a missing or malformed file, a value of the wrong type, a value a ``__post_init__`` check
            rejects; the message names the key, the file or the command line that set it, and the fix.
    """
    schema = OmegaConf.structured(RootConfig)
    for key, unset in FORMAT_DEPENDENT.items():  # resolved when the config is built, for the format it names
        schema.data[key] = unset
    sources = _yaml_sources(find_config(path)) if path is not None else []
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.depth=2)")
        # ``key=`` is the empty string (as in Hydra), not omegaconf's None, which no field of the schema takes
        overrides = [item + "''" if item.endswith("=") else item for item in overrides]
        sources.append((COMMAND_LINE, _overrides_node(overrides, schema)))
    cfg = schema
    for source, node in sources:  # one at a time, so that an error names the file (or the command line)
        _check_keys(node, schema, source)
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _omegaconf_error(e, source, schema) from e
    if path is not None and not _set_in("output.dir", sources):
        cfg.output.dir = default_output_dir(path)
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except InterpolationResolutionError as e:
        key = str(getattr(e, "full_key", "") or "")
        what = str(getattr(e, "msg", "") or e).split("\n")[0].strip()
        raise ConfigError(f"{_set_in(key, sources) or 'the config'}: {key}={_as_written(cfg, key)}: {what}; an "
                          "interpolation names a key of the merged config (${model.depth}) or an environment "
                          "variable (${oc.env:NAME,default})") from e
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, _set_in(str(getattr(e, "full_key", "")), sources) or "the config", schema) from e
    except ValueError as e:  # a __post_init__ check; its message starts with the key where it is about one
        key = re.match(r"[a-z_]+\.[a-z_]+", str(e))
        source = _set_in(key[0], sources) if key else ""
        raise ConfigError(f"{source}: {e}" if source else str(e)) from e


def to_yaml(cfg: RootConfig) -> str:
    """The resolved config as YAML (saved next to every run's outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RootConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Constructor kwargs for ``timesformer_harness.model.TimeSformer`` (the fields that are not loading options)."""
    from dataclasses import asdict

    kw = asdict(cfg)
    kw.pop("pretrained")
    kw.pop("pretrained_pos_resize")
    return kw
