"""Load and save TimeSformer weights without ever running pickled code.

Formats read by ``load_weights`` (detected from the file's keys):
  * ``pyth``: the original ``.pyth`` checkpoint (``model_state`` with ``model.`` keys, optional ``module.``) and our
    own checkpoints (the same layout plus extra entries);
  * ``state_dict``: a plain state dict with the original key names (``state_dict``/``model``/``module`` wrappers too);
  * ``safetensors``: a ``.safetensors`` file with the original key names or the Hugging Face ones;
  * ``vit2d``: ImageNet ViT weights in the timm key set, converted as the original ``load_pretrained`` does
    (temporal_attn/temporal_norm1 copied from attn/norm1; temporal_fc and time_embed stay zero);
  * ``hf``: Hugging Face ``TimesformerModel``/``TimesformerForVideoClassification`` weights (key map below).

Then time_embed is 1-D nearest-resized to the model's frames, pos_embed nearest-resized to its patch grid, and
the head dropped (with a warning) when the class count differs. ``strict=True`` fails, naming every key, when
anything else is missing, unexpected or of the wrong shape.

Safety: every file but ``.safetensors`` is read by ``torch.load(weights_only=True)``, whose unpickler builds only
tensors, containers and primitives and refuses any other global before it is called. Original files whose ``cfg``
is a pickled yacs/fvcore ``CfgNode`` load through torch's own allowlist (``torch.serialization.safe_globals``,
scoped to the call) with a stand-in that only stores data; the config comes back as a plain dict. A file in neither
of torch.save's formats (zip, or legacy with its magic number first) is refused before any unpickling. Refusals
raise ``CheckpointError`` naming the file and what it held or tried to import. See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import math
import pickle
import pickletools
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from timesformer_harness.config import ModelConfig
from timesformer_harness.embeddings import resize_pos_embed, resize_time_embed
from timesformer_harness.common import atomic_path, setup_logging
from timesformer_harness.variants import infer_variant

logger = logging.getLogger(__name__)

# Config classes that original checkpoints pickle as their ``cfg`` entry. torch's weights-only unpickler admits
# these names, and only these, as ``_ConfigNode``: the classes are never imported and no code of theirs runs.
_CONFIG_CLASSES = ("yacs.config.CfgNode", "fvcore.common.config.CfgNode", "slowfast.config.defaults.CfgNode",
                   "timesformer.config.defaults.CfgNode")
_ADVICE = ("Only tensors, containers and primitives (and yacs/fvcore CfgNode configs) are loaded; if you trust "
           "the file, re-save its weights with a trusted tool (a plain state dict, or .safetensors)")
# Globals that torch.save itself writes, and the configs; left out when naming what a refused file asks for.
_KNOWN_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", *_CONFIG_CLASSES)


class CheckpointError(ValueError):
    """A checkpoint file that was refused (it holds code or objects we do not load) or is not a checkpoint."""


class _ConfigNode:
    """Stand-in for a pickled ``CfgNode``: unpickling one makes a ``collections.Counter``, which ``_plain`` turns
    into a plain dict.

    A ``CfgNode`` (a dict subclass) pickles as NEWOBJ (make it), SETITEMS (its keys) and BUILD (its ``__dict__``:
    ``__immutable__`` and similar flags). torch's unpickler lets SETITEMS fill only an exact dict, OrderedDict or
    Counter, and BUILD on a Counter only stores the state in the instance's ``__dict__``. torch.save writes no
    Counter for weights (unlike OrderedDict), so the loader turns every Counter into a plain dict.
    """

    def __new__(cls, *args: Any) -> collections.Counter:  # type: ignore[misc]
        return collections.Counter()


def _plain(obj: Any) -> Any:
    """``obj`` with every config node (a Counter, see ``_ConfigNode``) replaced by a plain dict, recursively."""
    if isinstance(obj, collections.Counter):
        return {k: _plain(v) for k, v in dict.items(obj)}
    if isinstance(obj, dict):  # a dict or OrderedDict: keep it (and its _metadata), replace changed values
        changed = {k: new for k, v in dict.items(obj) if (new := _plain(v)) is not v}
        for k, new in changed.items():
            obj[k] = new
        return obj
    if type(obj) is list:
        return [_plain(v) for v in obj]
    if type(obj) is tuple:
        return tuple(_plain(v) for v in obj)
    return obj


def _pickle_globals(data: bytes, start: int = 0) -> tuple[list[str], bool, int]:
    """Read the pickle at ``data[start:]`` opcode by opcode (``pickletools.genops``: nothing is built, imported or
    run). Returns the ``module.name`` globals it names, whether it is exactly torch's legacy magic number, and
    where it ends (0 when it does not end within ``data``)."""
    names: list[str] = []
    ops: list[tuple[str, Any]] = []
    strings: list[str] = []  # STACK_GLOBAL (protocol 4+) names the two strings pushed before it
    memo: dict[int, str] = {}  # memo index -> string, to follow BINGET back to a module or class name
    end = memoized = 0
    stream = io.BytesIO(data)
    stream.seek(start)
    try:
        for op, arg, pos in pickletools.genops(stream):
            ops.append((op.name, arg))
            if op.name in ("GLOBAL", "INST"):
                module, _, name = arg.partition(" ")
                names.append(f"{'builtins' if module == '__builtin__' else module}.{name}")  # as Python 3 reads it
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            elif op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = memoized if op.name == "MEMOIZE" else arg
                memoized += op.name == "MEMOIZE"
                if len(ops) > 1 and "UNICODE" in ops[-2][0]:
                    memo[index] = ops[-2][1]
            elif op.name in ("BINGET", "LONG_BINGET") and arg in memo:
                strings.append(memo[arg])
            elif op.name == "STOP":
                end = pos + 1
    except Exception:  # noqa: BLE001 - not a pickle, or one longer than data: report what was seen
        pass
    values = [arg for name, arg in ops if name not in ("PROTO", "FRAME", "STOP")]
    return names, bool(end) and values == [torch.serialization.MAGIC_NUMBER], end


def _foreign_globals(path: Path) -> list[str]:
    """The globals a torch file's pickles name, less those torch.save itself writes (opcodes parsed, nothing run)."""
    names: list[str] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in (n for n in archive.namelist() if n.endswith("data.pkl")):
                names += _pickle_globals(archive.read(member))[0]
    else:  # legacy: magic number, protocol version, system info, the object, its storage keys; then raw storages
        with open(path, "rb") as f:
            data = f.read(64 << 20)
        start = 0
        for _ in range(5):
            found, _magic, start = _pickle_globals(data, start)
            names += found
            if not start:
                break
    return [n for n in dict.fromkeys(names) if not n.startswith(_KNOWN_GLOBALS)]


def _check_torch_format(path: Path) -> None:
    """Refuse, before any unpickling, a file in neither of torch.save's formats (a zip archive holding ``data.pkl``,
    or the legacy format, whose first pickle is torch's magic number), and TorchScript archives."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            raise CheckpointError(f"{path} is not a torch checkpoint: a truncated or damaged zip archive") from None
        if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in members):
            raise CheckpointError(f"{path} is a TorchScript archive, a program rather than a checkpoint: refused, "
                                  f"nothing in it was run. {_ADVICE}.")
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in members):
            raise CheckpointError(f"{path} is not a torch checkpoint: a zip archive without data.pkl")
        return
    names, is_magic, _ = _pickle_globals(head)
    if is_magic:
        return
    what = f"a pickle that imports {', '.join(dict.fromkeys(names))}" if names else f"it starts with {head[:16]!r}"
    raise CheckpointError(f"{path} is not a torch checkpoint (neither torch.save's zip format nor its legacy format: "
                          f"{what}); nothing in it was run")


def _torch_reason(err: Exception) -> str:
    """torch's reason for refusing (or failing on) a file, without its advice to load the file unsafely."""
    text = str(err).split("WeightsUnpickler error:")[-1].split("\n\nCheck the documentation")[0]
    text = text.replace(torch.serialization.UNSAFE_MESSAGE, "").replace("Weights only load failed.", "")
    reason = " ".join(line.strip() for line in text.splitlines() if line.strip())
    reason = reason.split(" Please use `torch.serialization")[0].rstrip(". ")
    if isinstance(err, pickle.UnpicklingError):
        return reason or "refused by torch's weights-only unpickler"
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def _refusal(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    """The error for a file torch's weights-only unpickler refused: torch's reason (it names the global it met)
    plus the other globals the file names."""
    reason = _torch_reason(err)
    names = [n for n in _foreign_globals(path) if n not in reason]
    if names:
        reason += f"; it {'also ' if 'GLOBAL' in reason else ''}names {', '.join(names)}"
    return CheckpointError(f"{path}: refused, nothing in it was run: {reason}. {_ADVICE}.")


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file into a dict of tensors, containers and primitives, safely (see module docstring).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a torch checkpoint, is truncated, or holds anything but tensors, containers,
            primitives and config nodes (code, say); the message names the file and what it held.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return dict(load_safetensors(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors holds no code; any failure is a bad file
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    _check_torch_format(path)
    try:
        with torch.serialization.safe_globals([(_ConfigNode, name) for name in _CONFIG_CLASSES]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        obj = _plain(obj)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler ran no code of the file; any failure is a bad file
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): "
                              f"{_torch_reason(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


# --------------------------------------------------------------------------------------------------------------
# Key conversion to the original VisionTransformer names.
_HF_LAYER_MAP = {
    "attention.attention.qkv": "attn.qkv",
    "attention.output.dense": "attn.proj",
    "temporal_attention.attention.qkv": "temporal_attn.qkv",
    "temporal_attention.output.dense": "temporal_attn.proj",
    "temporal_layernorm": "temporal_norm1",
    "temporal_dense": "temporal_fc",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.time_embeddings": "time_embed",
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "layernorm": "norm",
    "classifier": "head",
}


def _split_param(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight'); parameters without a suffix (cls_token) -> (key, '')."""
    head, _, last = key.rpartition(".")
    return (head, last) if last in ("weight", "bias") else (key, "")


def _join(base: str, suffix: str) -> str:
    return f"{base}.{suffix}" if suffix else base


def hf_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Timesformer keys -> original keys."""
    out = {}
    for key, value in sd.items():
        k = key.removeprefix("timesformer.")
        base, suffix = _split_param(k)
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", base)
        if m and m.group(2) in _HF_LAYER_MAP:
            out[_join(f"blocks.{m.group(1)}.{_HF_LAYER_MAP[m.group(2)]}", suffix)] = value
        elif base in _HF_TOP_MAP:
            out[_join(_HF_TOP_MAP[base], suffix)] = value
        else:
            out[key] = value  # reported as unexpected
    return out


def original_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys -> Hugging Face ``TimesformerForVideoClassification`` keys (the inverse of hf_to_original)."""
    layer_inv = {v: k for k, v in _HF_LAYER_MAP.items()}
    top_inv = {v: k for k, v in _HF_TOP_MAP.items()}
    out = {}
    for key, value in sd.items():
        base, suffix = _split_param(key)
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", base)
        if m:
            out[_join(f"timesformer.encoder.layer.{m.group(1)}.{layer_inv[m.group(2)]}", suffix)] = value
        elif base == "head":
            out[_join("classifier", suffix)] = value
        else:
            out[_join(f"timesformer.{top_inv[base]}", suffix)] = value
    return out


def unwrap_state_dict(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Find the weights in a loaded file and bring them to original key names. Returns (state_dict, format)."""
    fmt = "state_dict"
    if "model_state" in obj:
        sd, fmt = obj["model_state"], "pyth"
    elif isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    elif isinstance(obj.get("model"), dict):
        sd = obj["model"]
    elif isinstance(obj.get("module"), dict):
        sd = obj["module"]
    else:
        sd = obj
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "model.", "module."):  # DDP and the original wrapper's `self.model`
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(k.startswith(("timesformer.", "embeddings.", "encoder.layer.")) for k in sd):
        return hf_to_original(sd), "hf"
    if fmt != "pyth" and "time_embed" not in sd and not any(".temporal_" in k for k in sd) and "pos_embed" in sd:
        fmt = "vit2d"  # an image ViT (or a space-only TimeSformer, whose key set is the same)
    return sd, fmt


@dataclass
class LoadReport:
    """What ``load_weights`` did, key by key."""

    path: str
    format: str
    loaded: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    converted: dict[str, str] = field(default_factory=dict)  # target key <- source key (ImageNet copies)
    skipped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    missing: list[str] = field(default_factory=list)  # model keys left at their init

    def __str__(self) -> str:
        lines = [f"{self.path}: format {self.format}, {len(self.loaded)} tensors loaded"]
        lines += [f"  resized {k}: {list(a)} -> {list(b)}" for k, (a, b) in self.resized.items()]
        if self.converted:
            lines.append(f"  {len(self.converted)} temporal tensors copied from their spatial twins")
        lines += [f"  skipped {k}: {why}" for k, why in self.skipped.items()]
        if self.missing:
            lines.append(f"  left at init: {', '.join(self.missing)}")
        return "\n".join(lines)


def load_weights(
    model: torch.nn.Module,
    path: str | Path,
    strict: bool = True,
    pos_resize: str | None = None,
) -> LoadReport:
    """Load weights from any supported format into ``model`` (see module docstring).

    Args:
        strict: fail (naming every key and shape) on anything but the documented conversions: time_embed and
            pos_embed resizing, a head of another class count, and the keys an ImageNet conversion leaves at init.
        pos_resize: ``2d`` or ``1d``; default: ``1d`` for ImageNet ViT weights (what the original did), else ``2d``.

    Raises:
        FileNotFoundError, CheckpointError: as ``load_file``.
        KeyError: strict and the keys or shapes do not match; the message lists them.
    """
    sd, fmt = unwrap_state_dict(load_file(path))
    report = LoadReport(str(path), fmt)
    target = model.state_dict()
    allowed_missing: set[str] = set()

    if fmt == "vit2d" and any(".temporal_attn." in k for k in target):
        for key in list(sd):  # temporal branch starts as a copy of the spatial one; temporal_fc stays zero
            m = re.fullmatch(r"blocks\.(\d+)\.(attn|norm1)\.(.+)", key)
            new = m and f"blocks.{m[1]}.temporal_{m[2]}.{m[3]}"
            if new and new not in sd:
                sd[new] = sd[key].clone()
                report.converted[new] = key
        allowed_missing |= {k for k in target if ".temporal_fc." in k}
    if fmt == "vit2d":
        allowed_missing.add("time_embed")

    errors = []
    for key, value in sd.items():
        if key not in target:
            report.skipped[key] = "not in this model"
            errors.append(f"unexpected key {key} {list(value.shape)}")
            continue
        want = target[key].shape
        if value.shape != want:
            if key == "time_embed":
                value = resize_time_embed(value, want[1])
            elif key == "pos_embed":
                value = resize_pos_embed(value, want[1] - 1, mode=pos_resize or ("1d" if fmt == "vit2d" else "2d"))
            elif key.startswith("head."):
                report.skipped[key] = f"class count differs: file {list(value.shape)}, model {list(want)}"
                logger.warning("dropping %s from %s: %s (fine-tuning to a new class count)", key, path, report.skipped[key])
                allowed_missing.add(key)
                continue
            else:
                report.skipped[key] = f"shape {list(value.shape)} != model {list(want)}"
                errors.append(f"shape mismatch {key}: file {list(value.shape)}, model {list(want)}")
                continue
            report.resized[key] = (tuple(sd[key].shape), tuple(want))
        target[key] = value.to(target[key].dtype)
        report.loaded.append(key)
    report.missing = [k for k in target if k not in report.loaded]
    errors += [f"missing key {k} {list(target[k].shape)}" for k in report.missing if k not in allowed_missing]
    if strict and errors:
        raise KeyError(f"{path} ({fmt}) does not match the model:\n  " + "\n  ".join(errors)
                       + "\nPass strict=False to load the matching keys only.")
    model.load_state_dict(target, strict=True)
    logger.info("%s", report)
    return report


# --------------------------------------------------------------------------------------------------------------
# Saving.
def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through ``timesformer_harness.common.atomic_path`` (temporary file, fsync, rename): a crash
    never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def pyth_state(model: torch.nn.Module) -> collections.OrderedDict[str, torch.Tensor]:
    """The model's weights keyed as in original ``.pyth`` files (``model.`` prefix, no DDP ``module.``)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return collections.OrderedDict((f"model.{k}", v.detach().cpu()) for k, v in model.state_dict().items())


def save_pyth(
    path: str | Path,
    model: torch.nn.Module,
    optimizer_state: dict | None = None,
    epoch: int = 0,
    cfg_yaml: str = "",
    extra: dict[str, Any] | None = None,
) -> None:
    """Write an original-format ``.pyth`` (epoch, model_state, optimizer_state, cfg) plus our ``extra`` entries."""
    obj: dict[str, Any] = {"epoch": epoch, "model_state": pyth_state(model), "optimizer_state": optimizer_state or {},
                           "cfg": cfg_yaml}
    obj.update(extra or {})
    atomic_save(obj, path)


# --------------------------------------------------------------------------------------------------------------
# Inspection.
def infer_model_config(sd: dict[str, torch.Tensor]) -> ModelConfig:
    """The ModelConfig a state dict (original key names) was trained with; num_heads is not stored: D/64 assumed."""
    D = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return ModelConfig(
        img_size=math.isqrt(sd["pos_embed"].shape[1] - 1) * patch,
        patch_size=patch,
        in_chans=sd["patch_embed.proj.weight"].shape[1],
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        num_frames=sd["time_embed"].shape[1] if "time_embed" in sd else 8,
        embed_dim=D,
        depth=depth,
        num_heads=max(D // 64, 1),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        attention_type=infer_variant(sd),
    )


def inspect(path: str | Path, show_keys: bool = True) -> str:
    """A human-readable description of a checkpoint file."""
    obj = load_file(path)
    sd, fmt = unwrap_state_dict(obj)
    cfg = infer_model_config(sd)
    n = sum(v.numel() for v in sd.values())
    lines = [f"file:        {path}", f"format:      {fmt}",
             f"top-level:   {sorted(k for k in obj if not isinstance(obj[k], torch.Tensor))[:12] or '(tensors only)'}"]
    if "epoch" in obj:
        lines.append(f"epoch:       {obj['epoch']}")
    lines += [f"tensors:     {len(sd)}", f"parameters:  {n:,}",
              f"model:       attention_type={cfg.attention_type} frames={cfg.num_frames} img_size={cfg.img_size} "
              f"patch={cfg.patch_size} classes={cfg.num_classes} embed_dim={cfg.embed_dim} depth={cfg.depth}"
              f"{'' if fmt != 'vit2d' else '  (image ViT: frames not stored)'}"]
    if show_keys:
        lines.append("keys:")
        lines += [f"  {k:<48} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in sd.items()]
    return "\n".join(lines)


def _inspect_files(paths: list[str], show_keys: bool) -> int:
    """Print ``inspect`` for each file; a file that fails prints ``error: ...`` and the rest go on. Exit status."""
    failed = 0
    for i, path in enumerate(paths):
        try:
            print(("\n" if i else "") + inspect(path, show_keys=show_keys), flush=True)
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed += 1
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.checkpoint",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_inspect = sub.add_parser("inspect", help="print format, keys, shapes, parameter count and the inferred model")
    p_inspect.add_argument("files", nargs="+", metavar="file")
    p_inspect.add_argument("--no-keys", action="store_true", help="omit the per-key listing")
    p_convert = sub.add_parser("convert", help="write any supported format as an original-format .pyth or HF safetensors")
    p_convert.add_argument("src")
    p_convert.add_argument("dst", help="*.pyth (original layout) or *.safetensors (Hugging Face keys with --hf)")
    p_convert.add_argument("--hf", action="store_true", help="write Hugging Face Timesformer key names")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    try:
        if args.cmd == "inspect":
            return _inspect_files(args.files, show_keys=not args.no_keys)
        else:
            sd, _ = unwrap_state_dict(load_file(args.src))
            if args.dst.endswith(".safetensors"):
                from safetensors.torch import save_file

                out = original_to_hf(sd) if args.hf else sd
                save_file({k: v.contiguous() for k, v in out.items()}, args.dst)
            else:
                atomic_save({"epoch": 0, "model_state": collections.OrderedDict((f"model.{k}", v) for k, v in sd.items()),
                             "optimizer_state": {}, "cfg": ""}, args.dst)
            print(f"wrote {args.dst} ({len(sd)} tensors)")
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
