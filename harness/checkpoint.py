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
the head dropped (with a warning) when the class count differs, or left at init when the file has none (a backbone).
``strict=True`` fails, naming every key, when anything else is missing, unexpected or of the wrong shape.

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
import errno
import io
import json
import logging
import math
import os
import pickle
import pickletools
import re
import shutil
import struct
import sys
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch

from timesformer_harness.config import ModelConfig
from timesformer_harness.embeddings import resize_pos_embed, resize_time_embed
from timesformer_harness.common import atomic_path, not_a_file, setup_logging
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


class CheckpointLimitError(CheckpointError):
    """A checkpoint beyond a ``LoadLimits`` budget: refused before the memory or time was spent."""


class WeightsMismatchError(CheckpointError, KeyError):
    """``load_weights(strict=True)``: the file's keys, shapes or values do not fit the model (the first
    ``MISMATCHES_SHOWN`` keys listed, the rest counted, and the architecture keys that differ).

    Also a ``KeyError``, as the strict failure always was."""

    __str__ = BaseException.__str__  # KeyError's own __str__ would print the message as a quoted repr


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (disk full, file size limit, ...); the file at its path is unchanged."""


@dataclass(frozen=True)
class LoadLimits:
    """Budgets for reading a checkpoint, whose bytes are untrusted. A file beyond one is refused with a
    ``CheckpointLimitError`` naming it and the limit, before the memory or the time is spent.

    The pickled structure (a zip's ``data.pkl``; the pickles before a legacy file's raw tensor data) describes the
    tensors, it does not hold them: a real checkpoint's is small (TimeSformer ViT-base with its AdamW state: 1,002
    tensors, a 96,568-byte data.pkl of 31,874 opcodes, a 62,045-byte zip directory). Tensor data is bounded by the
    file itself: a zip may not declare more than it holds.
    """

    max_pickle_bytes: int = 16 << 20  # the pickled structure, in bytes (about 170,000 tensors)
    max_pickle_opcodes: int = 2_000_000  # opcodes read when a pickle is scanned without being loaded (~60,000 tensors)
    max_zip_directory_bytes: int = 16 << 20  # the zip's central directory (about 270,000 members)
    max_zip_inflation_bytes: int = 64 << 20  # how much more the members may declare than the file's size on disk
    max_depth: int = 100  # nesting of containers in the loaded structure


DEFAULT_LIMITS = LoadLimits()


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


def _plain(obj: Any, path: Path, limits: LoadLimits) -> Any:
    """``obj`` with every config node (a Counter, see ``_ConfigNode``) replaced by a plain dict.

    Each container is visited once (a memo by id), so shared references stay shared: a pickle of a few hundred
    bytes can reference one list 2**64 times, and copying each reference would never end. Cycles are kept as
    cycles. Nesting deeper than ``limits.max_depth`` is refused.
    """
    memo: dict[int, tuple[Any, Any]] = {}  # id(source) -> (source, result); the source is kept so ids stay unique

    def copy(o: Any, depth: int) -> Any:
        if isinstance(o, torch.Tensor):
            stored = o.untyped_storage().nbytes()
            if o.numel() * o.element_size() > stored:  # a stride-0 view: reading it would allocate its whole size
                raise CheckpointLimitError(f"{path}: a tensor of shape {list(o.shape)} ({o.numel() * o.element_size()}"
                                           f" bytes) is stored in {stored} bytes (an expanded view), which a "
                                           "checkpoint never needs; refused")
            return o
        if not isinstance(o, (dict, list, tuple)):
            return o
        if id(o) in memo:
            return memo[id(o)][1]
        if depth > limits.max_depth:
            raise CheckpointLimitError(f"{path}: containers nested more than {limits.max_depth} levels deep "
                                       f"(LoadLimits.max_depth); refused")
        if isinstance(o, collections.Counter):
            new: Any = {}
            memo[id(o)] = (o, new)
            for k, v in dict.items(o):
                new[k] = copy(v, depth + 1)
        elif isinstance(o, dict):  # a dict or OrderedDict: keep it (and its _metadata), replace changed values
            new = o
            memo[id(o)] = (o, new)
            for k, v in list(dict.items(o)):
                if (c := copy(v, depth + 1)) is not v:
                    o[k] = c
        elif type(o) is list:
            new = []
            memo[id(o)] = (o, new)
            new.extend(copy(v, depth + 1) for v in o)
        elif type(o) is tuple:
            new = tuple(copy(v, depth + 1) for v in o)  # a tuple cannot hold itself, only through a list
            memo[id(o)] = (o, new)
        else:
            new = o
        return new

    return copy(obj, 0)


def _read_budget(f: BinaryIO, limits: LoadLimits) -> tuple[io.BytesIO, bool]:
    """At most ``limits.max_pickle_bytes`` of ``f`` in memory (a claimed length inside a pickle never becomes a
    larger read), and whether ``f`` held more."""
    data = f.read(limits.max_pickle_bytes + 1)
    return io.BytesIO(data[:limits.max_pickle_bytes]), len(data) > limits.max_pickle_bytes


def _pickle_globals(stream: io.BytesIO, max_opcodes: int) -> tuple[list[str], bool, int, int]:
    """Read one pickle from ``stream`` opcode by opcode (``pickletools.genops``: nothing is built, imported or run),
    at most ``max_opcodes`` of them. Returns the ``module.name`` globals it names, whether it is exactly torch's
    legacy magic number, where it ends (0 when it does not: not a pickle, truncated, or past the budget), and the
    opcodes read. Memory stays constant whatever the pickle's length.
    """
    names: dict[str, None] = {}  # an ordered set, capped: enough to name what a refused file asks for
    strings: collections.deque[str] = collections.deque(maxlen=2)  # STACK_GLOBAL names the last two strings pushed
    memo: dict[int, str] = {}  # memo index -> string, to follow BINGET back to a module or class name
    prev: tuple[str, Any] = ("", None)
    values, first, memoized, count = 0, None, 0, 0
    try:
        for op, arg, pos in pickletools.genops(stream):
            count += 1
            if count > max_opcodes:
                break
            found = ""
            if op.name in ("GLOBAL", "INST"):
                module, _, name = arg.partition(" ")
                found = f"{'builtins' if module == '__builtin__' else module}.{name}"  # as Python 3 reads it
            elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                found = f"{strings[0]}.{strings[1]}"
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            elif op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = memoized if op.name == "MEMOIZE" else arg
                memoized += op.name == "MEMOIZE"
                if "UNICODE" in prev[0] and len(memo) < 65536:
                    memo[index] = prev[1]
            elif op.name in ("BINGET", "LONG_BINGET") and arg in memo:
                strings.append(memo[arg])
            elif op.name == "STOP":
                return list(names), values == 1 and first == torch.serialization.MAGIC_NUMBER, pos + 1, count
            if found and len(names) < 1024:
                names[found] = None
            if op.name not in ("PROTO", "FRAME"):
                values += 1
                first = arg if values == 1 else first
            prev = (op.name, arg)
    except Exception:  # noqa: BLE001 - not a pickle, or a truncated one: report what was seen
        pass
    return list(names), False, 0, count


def _scan_legacy(path: Path, limits: LoadLimits) -> tuple[list[str], bool, bool]:
    """Scan the pickles of a legacy torch file (magic number, protocol version, system info, the object, its
    storage keys; then the raw storages) within ``limits``. Returns the globals named, whether the first pickle
    is torch's magic number, and whether the scan stopped at the budget.
    """
    names: list[str] = []
    with open(path, "rb") as f:
        stream, more = _read_budget(f, limits)
    opcodes = limits.max_pickle_opcodes
    for i in range(5):
        found, magic, end, count = _pickle_globals(stream, opcodes)
        names, opcodes = names + found, opcodes - count
        if not end or (i == 0 and not magic):
            over = opcodes < 0 or (more and stream.tell() == limits.max_pickle_bytes)
            return list(dict.fromkeys(names)), i > 0 or magic, not end and over
    return list(dict.fromkeys(names)), True, False


def _foreign_globals(path: Path, limits: LoadLimits) -> tuple[list[str], bool]:
    """The globals a torch file's pickles name, less those torch.save itself writes (opcodes parsed, nothing run),
    and whether the scan stopped at the budget before reading everything."""
    names: list[str] = []
    stopped = False
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in (n for n in archive.namelist() if n.endswith("data.pkl")):
                    with archive.open(member) as f:
                        stream, more = _read_budget(f, limits)
                    found, _, end, count = _pickle_globals(stream, limits.max_pickle_opcodes)
                    names, stopped = names + found, stopped or (not end and (more or count > limits.max_pickle_opcodes))
        else:
            found, _, stopped = _scan_legacy(path, limits)
            names += found
    except (OSError, zipfile.BadZipFile, EOFError):
        pass
    return [n for n in dict.fromkeys(names) if not n.startswith(_KNOWN_GLOBALS)], stopped


def _zip_directory_size(f: BinaryIO) -> int:
    """Size in bytes of a zip's central directory, from its end record (zip64 too); -1 when there is none.

    Python's zipfile (and torch's reader) hold the whole directory in memory, several times its size in bytes:
    this is read first so that a small file with millions of members is refused before it is parsed."""
    size = f.seek(0, os.SEEK_END)
    tail_start = max(0, size - (22 + 65535))  # end record + the longest comment
    f.seek(tail_start)
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return -1
    directory = struct.unpack_from("<I", tail, at + 12)[0]
    if directory == 0xFFFFFFFF and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":  # zip64 locator
        f.seek(struct.unpack_from("<Q", tail, at - 20 + 8)[0])
        record = f.read(56)
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            directory = struct.unpack_from("<Q", record, 40)[0]
    return directory


def _check_zip(path: Path, limits: LoadLimits) -> None:
    """Refuse a zip checkpoint beyond ``limits`` from its directory alone: nothing is decompressed or unpickled."""
    with open(path, "rb") as f:
        directory = _zip_directory_size(f)
    if directory > limits.max_zip_directory_bytes:
        raise CheckpointLimitError(f"{path}: its zip directory is {directory:,} bytes, more than LoadLimits."
                                   f"max_zip_directory_bytes={limits.max_zip_directory_bytes:,}; refused before "
                                   f"reading it")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise CheckpointError(f"{path} is not a torch checkpoint: a truncated or damaged zip archive") from None
    names = [m.filename for m in members]
    if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
        raise CheckpointError(f"{path} is a TorchScript archive, a program rather than a checkpoint: refused, "
                              f"nothing in it was run. {_ADVICE}.")
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise CheckpointError(f"{path} is not a torch checkpoint: a zip archive without data.pkl")
    for m in members:
        if m.filename.endswith("data.pkl") and m.file_size > limits.max_pickle_bytes:
            raise CheckpointLimitError(f"{path}: member {m.filename} declares {m.file_size:,} bytes of pickled "
                                       f"structure, more than LoadLimits.max_pickle_bytes="
                                       f"{limits.max_pickle_bytes:,}; refused before reading it")
    declared, on_disk = sum(m.file_size for m in members), path.stat().st_size
    if declared > on_disk + limits.max_zip_inflation_bytes:
        raise CheckpointLimitError(f"{path}: its members declare {declared:,} bytes but the file holds {on_disk:,} "
                                   f"(torch.save stores members uncompressed; LoadLimits.max_zip_inflation_bytes="
                                   f"{limits.max_zip_inflation_bytes:,}): a decompression bomb or a damaged "
                                   f"file; refused before reading it")


def _check_torch_format(path: Path, limits: LoadLimits) -> None:
    """Refuse, before any unpickling, a file in neither of torch.save's formats (a zip archive holding ``data.pkl``,
    or the legacy format, whose first pickle is torch's magic number), TorchScript archives, and files beyond
    ``limits``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        _check_zip(path, limits)
        return
    names, is_magic, over = _scan_legacy(path, limits)
    if over:
        raise CheckpointLimitError(f"{path}: its pickled structure does not end within LoadLimits.max_pickle_bytes="
                                   f"{limits.max_pickle_bytes:,} bytes / max_pickle_opcodes="
                                   f"{limits.max_pickle_opcodes:,} opcodes; refused before loading it")
    if is_magic:
        return
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        raise CheckpointError(f"{path} is not a torch checkpoint but looks like a safetensors file (a header length, "
                              f"then JSON); safetensors files are read by their suffix: name it "
                              f"{path.with_suffix('.safetensors').name}")
    what = f"a pickle that imports {', '.join(names)}" if names else f"it starts with {head!r}"
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


def _refusal(path: Path, err: pickle.UnpicklingError, limits: LoadLimits) -> CheckpointError:
    """The error for a file torch's weights-only unpickler refused: torch's reason (it names the global it met)
    plus the other globals the file names (as far as the scan budget reads)."""
    reason = _torch_reason(err)
    found, stopped = _foreign_globals(path, limits)
    names = [n for n in found if n not in reason]
    if names:
        reason += f"; it {'also ' if 'GLOBAL' in reason else ''}names {', '.join(names)}"
    if stopped:
        reason += " (the scan for other names stopped at LoadLimits.max_pickle_bytes/max_pickle_opcodes)"
    return CheckpointError(f"{path}: refused, nothing in it was run: {reason}. {_ADVICE}.")


def load_file(path: str | Path, limits: LoadLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Read a checkpoint file (or a Hugging Face snapshot folder's weights: ``weights_file``) into a dict of tensors,
    containers and primitives, safely (see module docstring), within ``limits`` (memory and time bounded whatever the
    file holds).

    Raises:
        FileNotFoundError: no such file or folder.
        CheckpointError: the file is not a torch checkpoint, is truncated, or holds anything but tensors, containers,
            primitives and config nodes (code, say); the message names the file and what it held. A folder without
            weights; a path that is neither a file nor a folder (a named pipe, a device).
        CheckpointLimitError: the file is beyond a budget of ``limits``.
    """
    path = weights_file(path)
    if (kind := not_a_file(path)) == "does not exist":
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if kind:  # a named pipe, a device: reading one could wait for a writer, or never end
        raise CheckpointError(f"checkpoint {path} {kind}" + (", not a file; give a checkpoint file (.pyth, "
                                                             ".safetensors) or a Hugging Face snapshot folder"
                                                             if kind.startswith("is ") else ""))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return dict(load_safetensors(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors holds no code; any failure is a bad file
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    _check_torch_format(path, limits)
    try:
        with torch.serialization.safe_globals([(_ConfigNode, name) for name in _CONFIG_CLASSES]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e, limits) from None
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler ran no code; any failure is a bad file
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): "
                              f"{_torch_reason(e)}") from None
    obj = _plain(obj, path, limits)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


# --------------------------------------------------------------------------------------------------------------
# Hugging Face snapshot folders (what ``huggingface_hub.snapshot_download`` leaves: config.json beside the weights).
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a snapshot's weights, looked for in this order
HF_CONFIG = "config.json"
_MAX_CONFIG_BYTES = 16 << 20  # a Timesformer config.json is ~23 kB (most of it the 400 class names)
# TimesformerConfig's defaults: transformers leaves a field that equals its default out of config.json.
HF_DEFAULTS = {"image_size": 224, "patch_size": 16, "num_channels": 3, "num_frames": 8, "hidden_size": 768,
               "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "qkv_bias": True,
               "attention_type": "divided_space_time", "num_labels": 2}
# config.json field -> ModelConfig field. A different architecture field is an error; the others load_weights adapts.
_HF_ARCHITECTURE = {"hidden_size": "embed_dim", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
                    "patch_size": "patch_size", "num_channels": "in_chans", "attention_type": "attention_type",
                    "qkv_bias": "qkv_bias"}
_HF_ADAPTED = {"num_frames": ("num_frames", "time_embed is resized"),
               "image_size": ("img_size", "pos_embed is resized"),
               "num_labels": ("num_classes", "the head is dropped: fine-tuning to a new class count")}


def weights_file(path: str | Path) -> Path:
    """``path`` itself, or for a folder (a Hugging Face snapshot) the weights file in it (``HF_WEIGHT_FILES``).

    Raises:
        CheckpointError: a folder without one of those files (named, with what was looked for)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in HF_WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    shards = sorted(p.name for p in path.glob("*.index.json"))
    sharded = f"; its sharded weights ({shards[0]}) are not read: merge the shards into one file" if shards else ""
    pyth = sorted(p.name for p in path.glob("*.pyth"))  # a training run's checkpoints folder
    fix = "give a weights file or a snapshot folder"
    if pyth:
        example = "last.pyth" if "last.pyth" in pyth else pyth[-1]
        fix = f"it holds .pyth checkpoints: give one of them, e.g. {path / example}"
    raise CheckpointError(f"{path} is a folder without weights: looked for {' or '.join(HF_WEIGHT_FILES)} (with "
                          f"{HF_CONFIG}, as a Hugging Face snapshot has them){sharded}; {fix}")


def read_config_json(path: str | Path) -> dict[str, Any] | None:
    """A snapshot folder's ``config.json`` (any model's); None when ``path`` is a file or the folder has none.

    Raises:
        CheckpointError: config.json is not a JSON object (named), or larger than a config can be."""
    config = Path(path) / HF_CONFIG
    if not Path(path).is_dir() or not config.is_file():
        return None
    try:
        if config.stat().st_size > _MAX_CONFIG_BYTES:
            raise ValueError(f"{config.stat().st_size:,} bytes, more than a config holds")
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors; nesting
        reason = "nested deeper than Python's recursion limit" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{config} is not a readable config ({reason}); fix it, or remove it to load the "
                              f"weights unchecked") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config} holds a JSON {type(data).__name__}, not an object; fix or remove it")
    return data


def is_timesformer_config(config: dict[str, Any] | None) -> bool:
    """Whether ``config`` is a Hugging Face TimesformerConfig (a timm ViT snapshot's config.json is not)."""
    return bool(config) and config.get("model_type") == "timesformer"


def hf_config_value(config: dict[str, Any], key: str) -> Any:
    """A TimesformerConfig field as transformers reads it: absent means its default; ``num_labels`` counts
    ``id2label``."""
    if key == "num_labels" and isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return config.get(key, HF_DEFAULTS.get(key))


def hf_config_mismatches(config: dict[str, Any], model: ModelConfig, whose: str = "model.",
                         new_head: bool = True) -> tuple[list[str], list[str]]:
    """Where a TimesformerConfig (config.json) and ``model`` differ: (architecture fields, which no weights can
    bridge; fields ``load_weights`` adapts: frames and image size by resizing the embeddings, the class count by
    dropping the head, unless not ``new_head``). Each names both values, the ModelConfig field prefixed by
    ``whose``."""
    errors, adapted = [], []
    for key, ours in _HF_ARCHITECTURE.items():
        if (value := hf_config_value(config, key)) != getattr(model, ours):
            errors.append(f"{key}={value!r} where {whose}{ours}={getattr(model, ours)!r}")
    hidden = int(model.embed_dim * model.mlp_ratio)
    if (value := hf_config_value(config, "intermediate_size")) != hidden:
        errors.append(f"intermediate_size={value!r} where {whose}embed_dim x {whose}mlp_ratio={hidden}")
    for key, (ours, what) in _HF_ADAPTED.items():
        if (value := hf_config_value(config, key)) != getattr(model, ours):
            line = f"{key}={value!r} where {whose}{ours}={getattr(model, ours)!r}"
            if key == "num_labels" and not new_head:  # evaluating or resuming: another head is another model
                errors.append(line)
            else:
                adapted.append(f"{line} ({what})")
    return errors, adapted


def check_weights_source(path: str | Path, model: ModelConfig | None, strict: bool = True,
                         warn: bool = True, new_head: bool = True) -> Path:
    """The weights file ``path`` names (itself, or a snapshot folder's: ``weights_file``), after the folder's
    Timesformer config.json is checked against ``model`` (``hf_config_mismatches``; nothing to check for a file, a
    config of another model, or no ``model``). Reads no weights, so a run can check its ``model.pretrained`` before
    it writes anything. Fields the loader adapts are logged as warnings (``warn``: the check before a load warns
    nothing, the load does); so are the others unless ``strict``. ``new_head``: as ``load_weights``'s.

    Raises:
        CheckpointError: a folder without weights.
        WeightsMismatchError: ``strict`` and config.json names another architecture (every field named).
    """
    file = weights_file(path)  # a folder without weights fails first, naming what it looked for
    config = read_config_json(path)
    if model is None or not is_timesformer_config(config):
        return file
    errors, adapted = hf_config_mismatches(config, model, new_head=new_head)
    where = Path(path) / HF_CONFIG
    if errors and strict:
        raise WeightsMismatchError(f"{where} describes another model: {'; '.join(errors)}. Set those model.* keys to "
                                   f"the snapshot's values (docs/checkpoints.md pairs releases with configs)")
    for line in errors + adapted if warn else []:
        logger.warning("%s: %s", where, line)
    return file


def hf_config(model: ModelConfig, id2label: dict[str, str] | None = None) -> dict[str, Any]:
    """The Hugging Face ``config.json`` (TimesformerConfig fields) of a model, every field written out; ``id2label``
    names the classes (default ``LABEL_i``, transformers' own)."""
    from timesformer_harness.model import LN_EPS

    labels = id2label or {str(i): f"LABEL_{i}" for i in range(model.num_classes)}
    return {
        "architectures": ["TimesformerForVideoClassification" if model.num_classes else "TimesformerModel"],
        "model_type": "timesformer",
        "image_size": model.img_size,
        "patch_size": model.patch_size,
        "num_channels": model.in_chans,
        "num_frames": model.num_frames,
        "hidden_size": model.embed_dim,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "intermediate_size": int(model.embed_dim * model.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": LN_EPS,
        "qkv_bias": model.qkv_bias,
        "attention_type": model.attention_type,
        "drop_path_rate": 0,  # an int: TimesformerConfig types the field so (0.0 is fine at inference)
        "id2label": labels,
        "label2id": {v: int(k) for k, v in labels.items()},
    }


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
    """Original keys -> Hugging Face ``TimesformerForVideoClassification`` keys (the inverse of hf_to_original).

    Raises:
        CheckpointError: a key with no Hugging Face name (named)."""
    layer_inv = {v: k for k, v in _HF_LAYER_MAP.items()}
    top_inv = {v: k for k, v in _HF_TOP_MAP.items()}
    out = {}
    for key, value in sd.items():
        base, suffix = _split_param(key)
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", base)
        if m and m.group(2) in layer_inv:
            out[_join(f"timesformer.encoder.layer.{m.group(1)}.{layer_inv[m.group(2)]}", suffix)] = value
        elif base == "head":
            out[_join("classifier", suffix)] = value
        elif base in top_inv:
            out[_join(f"timesformer.{top_inv[base]}", suffix)] = value
        else:
            raise CheckpointError(f"key {key} has no Hugging Face Timesformer name; write .pyth instead")
    return out


_WRAPPERS = ("state_dict", "model", "module")  # where other tools keep the weights, tried in this order
# Key prefixes that wrap the weights, stripped in any order: DDP's (and AveragedModel's) module., the original's
# self.model (model.), torch.compile's _orig_mod.
_PREFIXES = ("module.", "model.", "_orig_mod.")


def weights_entry(obj: dict[str, Any]) -> str | None:
    """The top-level entry of a loaded file that holds its weights: ``model_state`` (``.pyth``), a ``state_dict``/
    ``model``/``module`` wrapper, or None when the file itself is the state dict."""
    if "model_state" in obj:
        return "model_state"
    return next((k for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)


def unwrap_state_dict(obj: dict[str, Any], source: str | Path = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Find the weights in a loaded file and bring them to original key names. Returns (state_dict, format).

    Raises:
        CheckpointError: ``model_state`` is not a dict (an int, a list); the message names ``source``."""
    entry = weights_entry(obj)
    fmt = "pyth" if entry == "model_state" else "state_dict"
    sd = obj if entry is None else obj[entry]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: its {entry} entry is of type {type(sd).__name__}, not a dict of tensors")
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if "n_averaged" in sd and all(k.startswith("module.") for k in sd if k != "n_averaged"):
        del sd["n_averaged"]  # torch.optim.swa_utils.AveragedModel: its count beside the averaged module.* weights
    while sd and (prefix := next((p for p in _PREFIXES if all(k.startswith(p) for k in sd)), None)):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(k.startswith(("timesformer.", "embeddings.", "encoder.layer.")) for k in sd):
        return hf_to_original(sd), "hf"
    if fmt != "pyth" and "time_embed" not in sd and not any(".temporal_" in k for k in sd) and "pos_embed" in sd:
        fmt = "vit2d"  # an image ViT (or a space-only TimeSformer, whose key set is the same)
    return sd, fmt


def tensor_problem(value: torch.Tensor) -> str | None:
    """Why a tensor is no usable weight: complex, integer or bool values, or NaN/inf entries; None when fine."""
    if value.is_complex() or not value.is_floating_point():
        return f"holds {str(value.dtype).removeprefix('torch.')} values, not real floating point"
    if value.numel() and not bool(torch.isfinite(value).all()):
        nan = int(value.isnan().sum())
        return f"holds {nan} NaN and {int((~torch.isfinite(value)).sum()) - nan} infinite values"
    return None


def _resize_problem(key: str, value: torch.Tensor, want: torch.Size, mode: str) -> str | None:
    """Why ``value`` (``time_embed`` or ``pos_embed``, shape ``(1, tokens, D)``) cannot be resized to ``want``."""
    if value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != want[2]:
        return (f"shape mismatch {key}: file {list(value.shape)}, model {list(want)} (only the token count is "
                f"resized; the embedding width must match)")
    tokens = value.shape[1] - (key == "pos_embed")  # pos_embed's first slot is the CLS token's
    if tokens < 1:
        return f"empty {key}: file {list(value.shape)}, model {list(want)}"
    if key == "pos_embed" and mode == "2d" and math.isqrt(tokens) ** 2 != tokens:
        return (f"pos_embed of {tokens} patch positions is not a square grid: file {list(value.shape)}, model "
                f"{list(want)} (pos_resize='1d' resizes the flat sequence instead)")
    return None


POS_RESIZE_MODES = {  # how LoadReport names the pos_embed resize it did (load_weights' pos_resize)
    "2d": "2-D nearest over the patch grid",
    "1d": "1-D nearest over the flattened sequence, the original's quirk; pos_resize='2d' keeps the grid",
}


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
    saved_config: str = ""  # the YAML config a checkpoint of this harness was written with ("" for other files)
    pos_resize: str = ""  # how pos_embed was resized, "2d" or "1d" ("" when it was not)

    def __str__(self) -> str:
        lines = [f"{self.path}: format {self.format}, {len(self.loaded)} tensors loaded"]
        lines += [f"  resized {k}: {list(a)} -> {list(b)}" + (f" ({POS_RESIZE_MODES[self.pos_resize]})"
                                                              if k == "pos_embed" and self.pos_resize else "")
                  for k, (a, b) in self.resized.items()]
        if self.converted:
            lines.append(f"  {len(self.converted)} temporal tensors copied from their spatial twins")
        lines += [f"  skipped {k}: {why}" for k, why in self.skipped.items()]
        if self.missing:
            lines.append(f"  left at init: {', '.join(self.missing)}")
        return "\n".join(lines)


MISMATCHES_SHOWN = 12  # lines of a strict failure's key list; a model of another size would list every key
_ARCHITECTURE_KEYS = ("embed_dim", "depth", "patch_size", "img_size", "num_frames", "num_classes", "mlp_ratio",
                      "in_chans", "qkv_bias", "attention_type")


def _architectures(sd: dict[str, torch.Tensor], model_cfg: Any) -> str:
    """A line naming the architecture keys in which the file's model (inferred from its tensors) differs from
    ``model_cfg``, or "" when it cannot be inferred or none differs (num_heads is not stored: never named)."""
    if not isinstance(model_cfg, ModelConfig):
        return ""
    try:
        file_cfg = infer_model_config(sd)
    except CheckpointError:
        return ""
    unknown = {"num_classes"} if not file_cfg.num_classes else set()  # a backbone has no head
    if "time_embed" not in sd:  # a space-only or image model stores no frame count
        unknown.add("num_frames")
    differ = [k for k in _ARCHITECTURE_KEYS if k not in unknown and getattr(file_cfg, k) != getattr(model_cfg, k)]
    if not differ:
        return ""
    return (f"The file's model has {', '.join(f'{k}={getattr(file_cfg, k)}' for k in differ)}; this one has "
            f"{', '.join(f'{k}={getattr(model_cfg, k)}' for k in differ)}.\n")


def _mismatch_fix(path: str | Path, errors: list[str], names_differ: bool, file_key: str, model_key: str) -> str:
    """The advice that fits a strict failure's ``errors``: another config for keys missing, unexpected or of another
    shape; another file for weights that are not finite real numbers; for key names of which none is the model's
    (``names_differ``: ``file_key`` and ``model_key`` are each side's first), what the loader strips."""
    if names_differ:
        return (f"None of the file's keys is one of the model's (the file's first: {file_key}; the model's: "
                f"{model_key}): they are another model's, or carry a prefix the loader does not strip (it strips "
                f"module., model. and _orig_mod.); `python -m timesformer_harness.checkpoint inspect {path}` lists "
                "them.")
    fixes = []
    if any(not e.startswith("bad values ") for e in errors):
        fixes.append(f"Set the model's config to the file's (`python -m timesformer_harness.checkpoint inspect {path}` "
                     "infers it), or, from Python, pass strict=False to load the matching keys only.")
    if any(e.startswith("bad values ") for e in errors):
        fixes.append("Weights that are not finite real numbers are no config's to fix: load a checkpoint saved before "
                     "they went bad, or, from Python, pass strict=False to keep the model's own values for them.")
    return " ".join(fixes)


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without its DDP (``module``) and torch.compile (``_orig_mod``) wrappers, in either order."""
    while isinstance(inner := getattr(model, "_orig_mod", getattr(model, "module", None)), torch.nn.Module):
        model = inner
    return model


def load_weights(
    model: torch.nn.Module,
    path: str | Path,
    strict: bool = True,
    pos_resize: str | None = None,
    limits: LoadLimits = DEFAULT_LIMITS,
    new_head: bool = True,
) -> LoadReport:
    """Load weights from any supported format into ``model`` (see module docstring), or from a Hugging Face snapshot
    folder: its weights file, after its ``config.json`` is checked against ``model.config`` (``hf_config_mismatches``:
    another architecture fails, like a strict key mismatch but before the weights are read; other frames, image size
    or class count are logged as the loader adapts them).

    Args:
        strict: fail (naming every key and shape) on anything but the documented conversions: time_embed and
            pos_embed resizing, a head of another class count or none (``new_head``), and the keys an ImageNet
            conversion leaves at init.
            Weights that are not real floating point, or hold NaN/inf, count as errors too.
        pos_resize: ``2d`` or ``1d``; default: ``1d`` for ImageNet ViT weights into a divided or joint model (what
            the original did), else ``2d``.
        limits: the reading budgets (``LoadLimits``).
        new_head: a head of another class count is dropped, the model's kept, and a file without a head (a backbone)
            leaves the model's at init (fine-tuning); False: either is a mismatch like any other (evaluating or
            resuming: a random head would score noise).

    Raises:
        FileNotFoundError, CheckpointError: as ``load_file``.
        WeightsMismatchError: strict and the keys, shapes or values do not fit (a ``CheckpointError`` and a
            ``KeyError``); the message lists the first keys and counts the rest. Strict and a snapshot's
            config.json names another architecture than ``model``'s (every field named).
    """
    bare = bare_model(model)  # the wrappers' state dicts prefix every key: load into the module itself
    model_cfg = getattr(bare, "config", None)
    file = check_weights_source(path, model_cfg if isinstance(model_cfg, ModelConfig) else None, strict,
                                new_head=new_head)
    obj = load_file(file, limits)
    sd, fmt = unwrap_state_dict(obj, path)
    dataset = _cfg_value(obj.get("cfg"), "TRAIN", "DATASET")  # the original's config names what it trained on
    if isinstance(model_cfg, ModelConfig) and model_cfg.input_channels == "rgb" and str(dataset).lower() == "ssv2":
        logger.warning("%s was trained by the original code on SSv2, whose frames reached the model as BGR; this "
                       "model reads them as RGB: set model.input_channels=bgr (configs/exp/ssv2_*.yaml do)", path)
    report = LoadReport(str(path), fmt, saved_config=obj["cfg"] if isinstance(obj.get("cfg"), str) else "")
    target = bare.state_dict()
    allowed_missing: set[str] = set()
    # the original's 1-D quirk is how it loaded image ViT weights into a divided or joint TimeSformer (the models with
    # a time_embed); a space-only model's own weights have the same keys as an image ViT, and into a space-only model
    # both resize 2-D
    mode = pos_resize or ("1d" if fmt == "vit2d" and "time_embed" in target else "2d")

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
    names_differ = bool(sd) and not any(k in target for k in sd)  # another model's, or a prefix not stripped
    head = [k for k in target if k.startswith("head.")]
    if new_head and head and not names_differ and not any(k.startswith("head.") for k in sd):  # a backbone
        logger.warning("%s has no classification head: %s left at init (fine-tuning)", path, ", ".join(head))
        allowed_missing |= set(head)

    errors = []

    def refuse(key: str, why: str) -> None:
        report.skipped[key] = why
        errors.append(why)

    for key, value in sd.items():
        if key not in target:
            refuse(key, f"unexpected key {key} {list(value.shape)}")
            continue
        want = target[key].shape
        if target[key].is_floating_point() and (why := tensor_problem(value)):
            refuse(key, f"bad values {key}: {why}")
            continue
        if value.shape != want:
            if key in ("time_embed", "pos_embed"):
                if why := _resize_problem(key, value, want, mode):
                    refuse(key, why)
                    continue
                value = (resize_time_embed(value, want[1]) if key == "time_embed"
                         else resize_pos_embed(value, want[1] - 1, mode=mode))
            elif key.startswith("head.") and value.shape[1:] == want[1:] and new_head:
                report.skipped[key] = f"class count differs: file {list(value.shape)}, model {list(want)}"
                logger.warning("dropping %s from %s: %s (fine-tuning to a new class count)", key, path,
                               report.skipped[key])
                allowed_missing.add(key)
                continue
            else:
                refuse(key, f"shape mismatch {key}: file {list(value.shape)}, model {list(want)}")
                continue
            report.resized[key] = (tuple(sd[key].shape), tuple(want))
            if key == "pos_embed":
                report.pos_resize = mode
        target[key] = value.to(target[key].dtype)
        report.loaded.append(key)
    report.missing = [k for k in target if k not in report.loaded]
    # a key the file has but that was refused is listed once, with its reason, not again as missing
    errors += [f"missing key {k} {list(target[k].shape)}" for k in report.missing
               if k not in allowed_missing and k not in report.skipped]
    if strict and errors:
        shown = errors if len(errors) <= MISMATCHES_SHOWN else [
            *errors[:MISMATCHES_SHOWN - 1], f"... and {len(errors) - MISMATCHES_SHOWN + 1} more "
            f"(`python -m timesformer_harness.checkpoint inspect {path}` lists the file's keys)"]
        raise WeightsMismatchError(f"{path} ({fmt}) does not match the model:\n  " + "\n  ".join(shown) + "\n"
                                   + _architectures(sd, model_cfg)
                                   + _mismatch_fix(path, errors, names_differ, next(iter(sd), ""),
                                                   next(iter(target), "")))
    bare.load_state_dict(target, strict=True)
    logger.info("%s", report)
    return report


# --------------------------------------------------------------------------------------------------------------
# Saving.
_WRITE_FAILURES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                   errno.EFBIG: "the file size limit was reached (ulimit -f)"}


def _write_error(path: Path, tmp: Path | None, err: BaseException) -> CheckpointWriteError:
    """The one-line error for a failed write: the path, the reason (disk full, ...), the free space, and that the
    file at ``path`` is unchanged."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):  # torch.save wraps the file's OSError
        cause = cause.__cause__ or cause.__context__
    reason = str(cause or err).splitlines()[0] if str(cause or err) else type(err).__name__
    why = _WRITE_FAILURES.get(getattr(cause, "errno", None), "the write failed")
    written = tmp.stat().st_size if tmp is not None and tmp.exists() else 0
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MiB free on its filesystem"
    except OSError:
        free = "free space unknown"
    return CheckpointWriteError(f"could not write {path}: {why} ({reason}); {free}, {written:,} bytes written when "
                                f"it failed; {path} is unchanged")


def _atomic_write(path: str | Path, write: Any) -> None:
    """``write(tmp)`` through ``timesformer_harness.common.atomic_path`` (temporary file, fsync, rename).

    Raises:
        CheckpointWriteError: the write failed (disk full, ...); ``path`` is unchanged and no temporary is left."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            try:
                write(tmp)
            except Exception as e:  # noqa: BLE001 - OSError, torch's RuntimeError, safetensors' own error type
                raise _write_error(path, tmp, e) from None
    except OSError as e:  # the temporary's creation, fsync or rename
        raise _write_error(path, None, e) from None


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through ``timesformer_harness.common.atomic_path``: a crash never leaves half a file, and a failed
    write (disk full: ``CheckpointWriteError`` naming the path and the free space) leaves ``path`` as it was."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so that a failed write keeps its errno (torch's own says "pos")
            torch.save(obj, f)

    _atomic_write(path, write)


def pyth_state(model: torch.nn.Module) -> collections.OrderedDict[str, torch.Tensor]:
    """The model's weights keyed as in original ``.pyth`` files (``model.`` prefix, no DDP ``module.``)."""
    return collections.OrderedDict((f"model.{k}", v.detach().cpu()) for k, v in bare_model(model).state_dict().items())


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
def _dim(sd: dict[str, torch.Tensor], key: str, ndim: int, axis: int) -> int:
    """``sd[key].shape[axis]``, or a CheckpointError naming the key when it is absent or not ``ndim``-D."""
    value = sd.get(key)
    if value is None or value.ndim != ndim or value.numel() == 0:
        what = "absent" if value is None else f"of shape {list(value.shape)}"
        raise CheckpointError(f"{key} is {what}, where a TimeSformer or ViT state dict has a non-empty {ndim}-D one")
    return int(value.shape[axis])


def infer_model_config(sd: dict[str, torch.Tensor]) -> ModelConfig:
    """The ModelConfig a state dict (original key names) was trained with; num_heads is not stored: D/64 assumed.

    Raises:
        CheckpointError: a key the inference needs is absent or of an unexpected shape (named)."""
    D = _dim(sd, "cls_token", 3, 2)
    patch = _dim(sd, "patch_embed.proj.weight", 4, 3)
    patches = _dim(sd, "pos_embed", 3, 1) - 1
    blocks = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not blocks or patches < 1:
        raise CheckpointError("no transformer blocks (blocks.N.*)" if not blocks else "pos_embed has no patch slots")
    heads = max(D // 64, 1)
    while D % heads:
        heads -= 1
    try:
        return ModelConfig(
            img_size=math.isqrt(patches) * patch,
            patch_size=patch,
            in_chans=_dim(sd, "patch_embed.proj.weight", 4, 1),
            num_classes=_dim(sd, "head.weight", 2, 0) if "head.weight" in sd else 0,
            num_frames=_dim(sd, "time_embed", 3, 1) if "time_embed" in sd else 8,
            embed_dim=D,
            depth=1 + max(blocks),
            num_heads=heads,
            mlp_ratio=_dim(sd, "blocks.0.mlp.fc1.weight", 2, 0) / D,
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
            attention_type=infer_variant(sd),
        )
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def inspect(path: str | Path, show_keys: bool = True, limits: LoadLimits = DEFAULT_LIMITS) -> str:
    """A human-readable description of a checkpoint file (or a Hugging Face snapshot folder: its weights file, and
    its config.json compared with the weights): format, entries, epoch, tensors, the inferred model (or why it
    cannot be inferred), tensors that are not real floating point or hold NaN/inf, and every key."""
    file = weights_file(path)
    config = read_config_json(path)
    obj = load_file(file, limits)
    sd, fmt = unwrap_state_dict(obj, file)
    cfg = None
    try:
        cfg = infer_model_config(sd)
        model = (f"attention_type={cfg.attention_type} frames={cfg.num_frames} img_size={cfg.img_size} "
                 f"patch={cfg.patch_size} classes={cfg.num_classes} embed_dim={cfg.embed_dim} depth={cfg.depth}"
                 f"{'' if fmt != 'vit2d' else '  (image ViT: frames not stored)'}")
    except CheckpointError as e:
        model = f"not inferred: {e}"
    n = sum(v.numel() for v in sd.values())
    entries = sorted(str(k)[:60] for k, v in obj.items() if not isinstance(v, torch.Tensor))
    lines = [f"folder:      {path}"] if file != Path(path) else []
    shown = ", ".join(entries[:24]) + (f", ... ({len(entries) - 24} more)" if len(entries) > 24 else "")
    lines += [f"file:        {file}", f"format:      {fmt}", f"top-level:   {shown or '(tensors only)'}"]
    if "epoch" in obj:  # printed only when a number: a hostile entry's repr could be unbounded
        epoch = obj["epoch"]
        shown = epoch if type(epoch) in (int, float) else f"(a {type(epoch).__name__})"
        if type(epoch) is int and epoch >= -1:  # the original's 0-based last finished epoch; file names count from 1
            done = f"{epoch + 1} epoch(s) done" if epoch >= 0 else "no epoch done yet: a mid-epoch or debug checkpoint"
            shown = f"{epoch} (0-based, as the original's: {done}; file names count from 1)"
        lines.append(f"epoch:       {shown}")
    lines += [f"tensors:     {len(sd)}", f"parameters:  {n:,}", f"model:       {model}"]
    lines += _config_lines(config, cfg)
    problems = {k: why for k, v in sd.items() if (why := tensor_problem(v))}
    lines += [f"suspect:     {k} {why}" for k, why in problems.items()]
    if show_keys:
        lines.append("keys:")
        lines += [f"  {k:<48} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in sd.items()]
    return "\n".join(lines)


def _config_lines(config: dict[str, Any] | None, inferred: ModelConfig | None) -> list[str]:
    """``inspect``'s lines on a snapshot's config.json: its model, and where it disagrees with the weights."""
    if config is None:
        return []
    if not is_timesformer_config(config):
        what = config.get("model_type") or config.get("architecture") or "no model_type"
        return [f"config.json: not a Hugging Face Timesformer config ({what}); not checked"]
    v = lambda key: hf_config_value(config, key)  # noqa: E731
    lines = [f"config.json: attention_type={v('attention_type')} frames={v('num_frames')} image_size="
             f"{v('image_size')} patch={v('patch_size')} labels={v('num_labels')} hidden_size={v('hidden_size')} "
             f"layers={v('num_hidden_layers')} heads={v('num_attention_heads')}"]
    if inferred is not None:
        errors, adapted = hf_config_mismatches(config, inferred, whose="the weights' ")
        # num_heads is not in the weights (inferred as embed_dim / 64): config.json's is the one to believe
        found = [e for e in errors if not e.startswith("num_attention_heads=")] + [a.split(" (")[0] for a in adapted]
        lines += [f"mismatch:    config.json {m}" for m in found]
    return lines


def _inspect_files(paths: list[str], show_keys: bool, limits: LoadLimits) -> int:
    """Print ``inspect`` for each file; a file that fails prints ``error: ...`` and the rest go on. Exit status."""
    failed = 0
    for i, path in enumerate(paths):
        try:
            print(("\n" if i else "") + inspect(path, show_keys=show_keys, limits=limits), flush=True)
        except (OSError, ValueError, KeyError) as e:  # CheckpointError is a ValueError
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed += 1
    return 2 if failed else 0


_EMPTY = ({}, "", None, [])  # entries a conversion can drop without losing anything


def convert(src: str | Path, dst: str | Path, hf: bool = False, weights_only: bool = False, force: bool = False,
            limits: LoadLimits = DEFAULT_LIMITS) -> str:
    """Write ``src`` (any supported format) as an original-layout ``.pyth`` or, for a ``.safetensors`` ``dst``, a
    safetensors file (Hugging Face key names with ``hf``, and a ``config.json`` beside it: ``hf_config``). ``src``
    may be a Hugging Face snapshot folder. Returns a one-line summary.

    A ``.pyth`` keeps every entry of ``src`` beside the weights (epoch, optimizer_state, cfg, training state) unless
    ``weights_only``; a safetensors file holds tensors only, so ``src``'s other entries need ``weights_only``.
    The config.json's model is inferred from the weights; ``num_attention_heads``, which they do not store, comes
    from ``src``'s config (a snapshot's config.json, or ``model.num_heads`` in our checkpoints' ``cfg``), else
    embed_dim / 64 (the original's, and the summary says it was assumed).

    Raises:
        CheckpointError: ``dst`` is ``src`` (even with ``force``), exists (without ``force``), is a folder or lies in a
            missing folder, or would drop entries without ``weights_only``; the config.json beside it exists
            (without ``force``); as ``load_file`` for ``src``.
    """
    src, dst = Path(src), Path(dst)
    safetensors = dst.suffix == ".safetensors"
    if dst.is_dir():
        raise CheckpointError(f"{dst} is a folder; give the output file's name, e.g. {dst / 'converted.pyth'}")
    if not dst.parent.is_dir():
        raise CheckpointError(f"cannot write {dst}: folder {dst.parent} does not exist; create it first")
    src_file = weights_file(src)  # a snapshot folder's weights file
    if dst.exists() and src_file.exists() and os.path.samefile(src_file, dst):
        raise CheckpointError(f"convert would overwrite its input {src_file}; write to another file")
    if dst.exists() and not force:
        raise CheckpointError(f"{dst} exists; pass --force to replace it")
    if hf and not safetensors:
        raise CheckpointError(f"--hf writes Hugging Face names into a .safetensors file; {dst} is not one")
    config_path = dst.parent / HF_CONFIG
    if hf and config_path.exists() and src.is_dir() and os.path.samefile(config_path, src / HF_CONFIG):
        raise CheckpointError(f"convert --hf would overwrite its input's {config_path}; write into another folder")
    if hf and config_path.exists() and not force:
        raise CheckpointError(f"{config_path} exists (convert --hf writes the Hugging Face config beside {dst.name}); "
                              f"pass --force to replace it, or write into another folder")
    obj = load_file(src, limits)
    entry = weights_entry(obj)
    sd, _ = unwrap_state_dict(obj, src)
    if not sd:
        raise CheckpointError(f"{src} holds no tensors to convert")
    rest = {k: v for k, v in obj.items() if k != entry and not (entry is None and isinstance(v, torch.Tensor))}
    kept = [str(k) for k, v in rest.items() if not any(type(v) is type(e) and v == e for e in _EMPTY)]
    if safetensors and kept and not weights_only:
        raise CheckpointError(f"{src} holds {', '.join(kept)} beside its weights, which a .safetensors file cannot "
                              f"keep: pass --weights-only to write the weights alone, or write .pyth to keep them")
    if hf:
        config, heads_from = _hf_config_for(sd, obj, read_config_json(src))
    if safetensors:
        from safetensors.torch import save_file

        out = original_to_hf(sd) if hf else sd
        _atomic_write(dst, lambda tmp: save_file({k: v.contiguous() for k, v in out.items()}, str(tmp)))
    else:
        rest = {} if weights_only else rest
        state = collections.OrderedDict((f"model.{k}", v) for k, v in sd.items())
        pyth = {"epoch": rest.get("epoch", 0), "model_state": state, "optimizer_state": rest.get("optimizer_state", {}),
                "cfg": rest.get("cfg", "")}
        atomic_save({**pyth, **{k: v for k, v in rest.items() if k not in pyth}}, dst)
    notes = ""
    if hf:
        _atomic_write(config_path, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
        notes = f"; {config_path} beside it, num_attention_heads={config['num_attention_heads']} {heads_from}"
        if dst.name != HF_WEIGHT_FILES[0]:
            notes += f"; transformers' from_pretrained reads {HF_WEIGHT_FILES[0]}: name the file so to use the folder"
        if config.get("attention_type") == "space_only":
            notes += ("; note: transformers' space_only model classifies each frame ((B*T, classes) logits), where "
                      "the original and this harness average the frames before the final norm and head")
    problems = [f"{k} {why}" for k, v in sd.items() if (why := tensor_problem(v))]
    return (f"wrote {dst} ({len(sd)} tensors" + (f"; kept {', '.join(kept)}" if kept and not weights_only else "")
            + (f"; dropped {', '.join(kept)} (--weights-only)" if kept and weights_only else "") + notes + ")"
            + "".join(f"\nwarning: {p}" for p in problems))


def _hf_config_for(sd: dict[str, torch.Tensor], obj: dict[str, Any],
                   src_config: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The config.json of ``sd`` (``hf_config``) and where its head count came from (in words). The head count and
    the class names come from ``src``'s config where it has them (see ``convert``)."""
    inferred = infer_model_config(sd)
    heads, source = inferred.num_heads, "(assumed: embed_dim / 64; the weights do not store it)"
    labels = None
    if is_timesformer_config(src_config):
        heads, source = hf_config_value(src_config, "num_attention_heads"), "(from the source's config.json)"
        names = src_config.get("id2label")
        labels = names if isinstance(names, dict) and len(names) == inferred.num_classes else None
    elif isinstance(num_heads := _cfg_num_heads(obj.get("cfg")), int):
        heads, source = num_heads, "(from the source's cfg: model.num_heads)"
    try:
        model = replace(inferred, num_heads=heads)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot describe the weights as a Hugging Face config: {e}") from None
    return hf_config(model, labels), source


MAX_CFG_CHARS = 1 << 20  # the original's dumped config is about 10 kB, ours a few kB


def _cfg_value(cfg: Any, section: str, key: str) -> Any:
    """``cfg[section][key]`` of a checkpoint's ``cfg`` entry: our checkpoints' resolved YAML, the original's
    ``cfg.dump()`` YAML, or its yacs ``CfgNode`` loaded as a dict; None where it has none, or where the YAML is over
    ``MAX_CFG_CHARS`` (a file's config is read on every load: an untrusted one is not parsed at any size)."""
    if isinstance(cfg, str):
        if len(cfg) > MAX_CFG_CHARS:
            return None
        import yaml

        try:
            cfg = yaml.safe_load(cfg)
        except yaml.YAMLError:
            return None
    part = cfg.get(section) if isinstance(cfg, dict) else None
    return part.get(key) if isinstance(part, dict) else None


def _cfg_num_heads(cfg: Any) -> int | None:
    """``model.num_heads`` of a checkpoint's ``cfg`` entry; None when it has none (the original's yacs config does
    not: its heads are fixed at 12)."""
    heads = _cfg_value(cfg, "model", "num_heads")
    return heads if type(heads) is int else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timesformer_harness.checkpoint",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--max-pickle-mib", type=float, default=DEFAULT_LIMITS.max_pickle_bytes / 2**20,
                        help="refuse a file whose pickled structure is larger (LoadLimits.max_pickle_bytes)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_inspect = sub.add_parser("inspect", help="print format, keys, shapes, parameter count and the inferred model")
    p_inspect.add_argument("files", nargs="+", metavar="file")
    p_inspect.add_argument("--no-keys", action="store_true", help="omit the per-key listing")
    p_convert = sub.add_parser("convert",
                               help="write any supported format as an original-format .pyth or HF safetensors")
    p_convert.add_argument("src")
    p_convert.add_argument("dst", help="*.pyth (original layout) or *.safetensors (Hugging Face keys with --hf)")
    p_convert.add_argument("--hf", action="store_true", help="write Hugging Face Timesformer key names")
    p_convert.add_argument("--weights-only", action="store_true",
                           help="write the weights alone (drop epoch, optimizer_state, cfg and any other entry)")
    p_convert.add_argument("--force", action="store_true", help="replace an existing DST (never SRC itself)")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    limits = LoadLimits(max_pickle_bytes=int(args.max_pickle_mib * 2**20))
    try:
        if args.cmd == "inspect":
            return _inspect_files(args.files, show_keys=not args.no_keys, limits=limits)
        print(convert(args.src, args.dst, hf=args.hf, weights_only=args.weights_only, force=args.force,
                      limits=limits))
    except (OSError, ValueError, KeyError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
