"""Checkpoint files for the safe-loading tests.

* Crafted files: each runs code when unpickled the unsafe way and, if it does, creates its own canary file
  ``canaries/<kind>``. ``CRAFTED`` maps each kind to a pattern the refusal message must match.
* Files that are no checkpoint at all (``NOT_CHECKPOINTS``, no code in them).
* Real original-style ``.pyth`` files whose ``cfg`` is a pickled yacs ``CfgNode`` (zip and legacy formats, and
  fvcore's subclass), plus crafted files that hide a payload inside such a config.

The yacs files are written by ``python tests/crafted_checkpoints.py yacs OUT CANARIES`` so that the test process
never imports yacs. ``python tests/crafted_checkpoints.py live OUT`` writes every file and loads each one the unsafe
way (``torch.load`` with the plain pickle module, what the old loader's fallback did), printing which canaries
appeared: it proves the crafted files are live. The NEWOBJ/BUILD file names ``crafted_checkpoints.Canary``, which
an unsafe loader can import wherever this folder is on the path (the CLI tests put it on PYTHONPATH).
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shlex
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
TINY = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=4, num_classes=7)

# kind -> a pattern its refusal message must match (beside the file's name).
CRAFTED = {
    "plain_pickle": r"not a torch checkpoint .*a pickle that imports posix\.system",
    "plain_pickle_protocol4_exec": r"not a torch checkpoint .*a pickle that imports builtins\.exec",
    "protocol0_inst": r"not a torch checkpoint .*a pickle that imports os\.system",
    "legacy_magic_slot": r"not a torch checkpoint .*a pickle that imports posix\.system",
    "legacy_main_object": r"refused, nothing in it was run: .*GLOBAL posix\.system",
    "zip_data_pkl": r"refused, nothing in it was run: .*GLOBAL _?io\.open",  # open's module: io, _io from Python 3.12
    "zip_newobj_build": r"refused, nothing in it was run: .*GLOBAL crafted_checkpoints\.Canary",
    "zip_inst": r"refused, nothing in it was run: Unsupported operand .*names os\.system",
    "zip_model_state_entry": r"refused, nothing in it was run: .*GLOBAL posix\.system",
    "cfg_dict_nested": r"refused, nothing in it was run: .*GLOBAL exec .*builtins\.exec",
    "hf_bin_payload": r"refused, nothing in it was run: .*GLOBAL posix\.system",
    # written by the yacs subprocess:
    "cfgnode_nested": r"refused, nothing in it was run: .*GLOBAL posix\.system",
    "cfgnode_nested_legacy": r"refused, nothing in it was run: .*GLOBAL posix\.system",
    "cfgnode_setstate_gadget": r"refused, nothing in it was run: .*GLOBAL posix\.system",
}
NOT_CHECKPOINTS = {
    "random_bytes": r"is not a torch checkpoint \(neither .*it starts with b'",
    "text_file": r"is not a torch checkpoint \(neither .*it starts with b'epoch: 3",
    "empty_file": r"is not a torch checkpoint \(neither .*it starts with b''",
    "harmless_pickle": r"is not a torch checkpoint \(neither .*it starts with b'\\x80\\x02",
    "truncated_zip": r"is not a torch checkpoint: a truncated or damaged zip archive",
    "zip_without_data_pkl": r"is not a torch checkpoint: a zip archive without data\.pkl",
    "truncated_legacy": r"is not a readable torch checkpoint \(truncated or corrupt\?\)",
    "torchscript": r"is a TorchScript archive, a program rather than a checkpoint: refused",
}
SUFFIX = {"hf_bin_payload": "pytorch_model.bin", "plain_pickle": "weights.pth", "protocol0_inst": "model.pth"}


class Canary:
    """Creates the file named in its state when unpickled: NEWOBJ makes it, BUILD calls ``__setstate__``."""

    def __setstate__(self, state: dict[str, str]) -> None:
        Path(state["path"]).touch()


class System:
    """Unpickles as ``os.system("touch CANARY")`` (pickled as the global ``posix.system``)."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {shlex.quote(str(self.canary))}",)


class Exec:
    """Unpickles as ``exec("open(CANARY, 'w').close()")``."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.canary)!r}, 'w').close()",)


class Open:
    """Unpickles as ``open(CANARY, "w")``."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple:
        return open, (str(self.canary), "w")


def tiny_state(seed: int = 0) -> collections.OrderedDict[str, torch.Tensor]:
    """Random weights of the tiny test model, keyed as in original ``.pyth`` files (``model.`` prefix)."""
    from timesformer_harness.model import TimeSformer

    torch.manual_seed(seed)
    model = TimeSformer(**TINY, drop_path_rate=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return collections.OrderedDict((f"model.{k}", v) for k, v in model.state_dict().items())


def binunicode(s: str) -> bytes:
    """The BINUNICODE opcode for ``s``."""
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def legacy_bytes(obj: Any) -> bytes:
    """``obj`` as torch.save's legacy (non-zip) format writes it."""
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def write_zip_with_data_pkl(path: Path, data_pkl: bytes) -> Path:
    """A real zip-format torch file (tiny weights) whose ``archive/data.pkl`` is replaced by ``data_pkl``."""
    buf = io.BytesIO()
    torch.save({"model_state": tiny_state()}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return path


def newobj_build_stream(canary: Path) -> bytes:
    """By hand: NEWOBJ a ``crafted_checkpoints.Canary``, then BUILD it with ``{"path": CANARY}``."""
    return (b"\x80\x02"  # PROTO 2
            + b"ccrafted_checkpoints\nCanary\n"  # GLOBAL
            + b")"  # EMPTY_TUPLE: the constructor arguments
            + b"\x81"  # NEWOBJ: Canary.__new__(Canary)
            + b"}" + binunicode("path") + binunicode(str(canary)) + b"s"  # EMPTY_DICT, SETITEM: the state
            + b"b"  # BUILD: Canary.__setstate__(state)
            + b".")  # STOP


def inst_stream(canary: Path) -> bytes:
    """By hand, protocol 0: MARK, the argument string, INST os.system (calls it), STOP."""
    return f"(S'touch {shlex.quote(str(canary))}'\nios\nsystem\n.".encode()


def write_crafted(out: Path, canaries: Path) -> dict[str, Path]:
    """Write every crafted kind that needs no yacs into ``out``; kind -> path."""
    out.mkdir(parents=True, exist_ok=True)
    canaries.mkdir(parents=True, exist_ok=True)
    c = {kind: canaries / kind for kind in CRAFTED}
    sd = tiny_state()
    files = {kind: out / SUFFIX.get(kind, f"{kind}.pyth") for kind in CRAFTED if not kind.startswith("cfgnode")}
    for kind in files:
        files[kind].parent.mkdir(parents=True, exist_ok=True)
    files["plain_pickle"].write_bytes(pickle.dumps(System(c["plain_pickle"]), protocol=2))
    files["plain_pickle_protocol4_exec"].write_bytes(
        pickle.dumps({"model_state": {}, "hook": Exec(c["plain_pickle_protocol4_exec"])}, protocol=4))
    files["protocol0_inst"].write_bytes(inst_stream(c["protocol0_inst"]))
    magic = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
    legacy = legacy_bytes({"epoch": 0, "model_state": sd})
    assert legacy.startswith(magic)
    files["legacy_magic_slot"].write_bytes(pickle.dumps(System(c["legacy_magic_slot"]), protocol=2) + legacy[len(magic):])
    files["legacy_main_object"].write_bytes(
        legacy_bytes({"epoch": 0, "model_state": sd, "cfg": System(c["legacy_main_object"])}))
    write_zip_with_data_pkl(files["zip_data_pkl"], pickle.dumps({"model_state": Open(c["zip_data_pkl"])}, protocol=2))
    write_zip_with_data_pkl(files["zip_newobj_build"], newobj_build_stream(c["zip_newobj_build"]))
    write_zip_with_data_pkl(files["zip_inst"], inst_stream(c["zip_inst"]))
    evil_sd = collections.OrderedDict(sd)
    evil_sd["model.evil"] = System(c["zip_model_state_entry"])
    torch.save({"epoch": 0, "model_state": evil_sd, "optimizer_state": {}, "cfg": ""}, files["zip_model_state_entry"])
    torch.save({"epoch": 0, "model_state": sd, "optimizer_state": {},
                "cfg": {"TRAIN": {"BATCH_SIZE": 8, "HOOK": Exec(c["cfg_dict_nested"])}}}, files["cfg_dict_nested"])
    hf = {k.removeprefix("model."): v for k, v in sd.items()}
    hf["classifier.extra"] = System(c["hf_bin_payload"])
    torch.save(hf, files["hf_bin_payload"])
    return files


def write_not_checkpoints(out: Path) -> dict[str, Path]:
    """Files that are no torch checkpoint (nothing in them would run code); kind -> path."""
    out.mkdir(parents=True, exist_ok=True)
    files = {kind: out / f"{kind}.pyth" for kind in NOT_CHECKPOINTS}
    files["random_bytes"].write_bytes(bytes(range(7, 256)) * 4)
    files["text_file"].write_text("epoch: 3\nmodel_state: {}\n")
    files["empty_file"].write_bytes(b"")
    files["harmless_pickle"].write_bytes(pickle.dumps({"epoch": 3, "model_state": {}}, protocol=2))
    buf = io.BytesIO()
    torch.save({"model_state": tiny_state()}, buf)
    files["truncated_zip"].write_bytes(buf.getvalue()[:2000])
    with zipfile.ZipFile(files["zip_without_data_pkl"], "w") as z:
        z.writestr("archive/readme.txt", "no pickle here")
    files["truncated_legacy"].write_bytes(legacy_bytes({"model_state": tiny_state()})[:300])
    with warnings.catch_warnings():  # TorchScript is deprecated, and still what some files are
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(files["torchscript"]))
    return files


# ----------------------------------------------------------------------------------------------------------------
# Written in a subprocess that has yacs.
def _fvcore_cfgnode() -> type:
    """fvcore's ``CfgNode`` as it pickles: a yacs ``CfgNode`` subclass named ``fvcore.common.config.CfgNode``."""
    import types

    from yacs.config import CfgNode as YacsNode

    for name in ("fvcore", "fvcore.common", "fvcore.common.config"):
        sys.modules.setdefault(name, types.ModuleType(name))

    class CfgNode(YacsNode):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "fvcore.common.config", "CfgNode"
    sys.modules["fvcore.common.config"].CfgNode = CfgNode
    return CfgNode


def _original_cfg(node_type: type) -> Any:
    """A frozen config in the original's shape (nested nodes, lists, tuples, None)."""
    cfg = node_type()
    cfg.TRAIN = node_type()
    cfg.TRAIN.ENABLE = True
    cfg.TRAIN.BATCH_SIZE = 8
    cfg.TRAIN.CHECKPOINT_FILE_PATH = ""
    cfg.DATA = node_type()
    cfg.DATA.NUM_FRAMES = 8
    cfg.DATA.TRAIN_JITTER_SCALES = [256, 320]
    cfg.DATA.MEAN = [0.45, 0.45, 0.45]
    cfg.TIMESFORMER = node_type()
    cfg.TIMESFORMER.ATTENTION_TYPE = "divided_space_time"
    cfg.TIMESFORMER.PRETRAINED_MODEL = None
    cfg.SOLVER = node_type()
    cfg.SOLVER.STEPS = (0, 11, 14)
    cfg.SOLVER.BASE_LR = 0.005
    cfg.freeze()
    return cfg


def write_yacs_files(out: Path, canaries: Path) -> None:
    """Original-style checkpoints with a real yacs (and fvcore-style) ``CfgNode``, the files to compare them with,
    and the crafted files that hide a payload in such a config. Needs yacs: run in a subprocess."""
    from safetensors.torch import save_file
    from yacs.config import CfgNode

    out.mkdir(parents=True, exist_ok=True)
    sd = tiny_state()
    optimizer_state = {"state": {0: {"momentum_buffer": torch.ones(3)}},
                       "param_groups": [{"lr": 0.005, "momentum": 0.9, "params": [0]}]}
    cfg = _original_cfg(CfgNode)
    original = {"epoch": 14, "model_state": sd, "optimizer_state": optimizer_state, "cfg": cfg}
    torch.save(original, out / "original_yacs.pyth")
    (out / "original_yacs_legacy.pyth").write_bytes(legacy_bytes(original))
    torch.save({**original, "cfg": _original_cfg(_fvcore_cfgnode())}, out / "original_fvcore.pyth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "original_weights.safetensors"))
    (out / "original_cfg.json").write_text(json.dumps(cfg))

    evil = _original_cfg(CfgNode)
    evil.defrost()
    evil.TRAIN["HOOK"] = System(canaries / "cfgnode_nested")  # item assignment skips yacs's type check
    torch.save({"epoch": 14, "model_state": sd, "cfg": evil}, out / "cfgnode_nested.pyth")
    evil.TRAIN["HOOK"] = System(canaries / "cfgnode_nested_legacy")
    (out / "cfgnode_nested_legacy.pyth").write_bytes(legacy_bytes({"epoch": 14, "model_state": sd, "cfg": evil}))
    # yacs looks attributes up among a node's keys, so a node whose key "__setstate__" is os.system has BUILD call
    # os.system(state). By hand: NEWOBJ a CfgNode, SETITEMS {"__setstate__": posix.system}, BUILD "touch CANARY".
    gadget = (b"\x80\x02" + b"cyacs.config\nCfgNode\n" + b")\x81"
              + b"(" + binunicode("__setstate__") + b"cposix\nsystem\n" + b"u"
              + binunicode(f"touch {shlex.quote(str(canaries / 'cfgnode_setstate_gadget'))}") + b"b.")
    write_zip_with_data_pkl(out / "cfgnode_setstate_gadget.pyth", gadget)


def load_unsafely(path: Path) -> None:
    """What the old loader's fallback amounted to: torch.load with the plain pickle module (no weights-only)."""
    try:
        torch.load(path, map_location="cpu", pickle_module=pickle)
    except Exception:  # noqa: BLE001 - most crafted files fail after their payload ran
        pass


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "yacs":
        write_yacs_files(out, Path(sys.argv[3]))
    elif mode == "live":
        canaries = out / "canaries"
        files = write_crafted(out, canaries)
        write_yacs_files(out, canaries)
        files.update({k: out / f"{k}.pyth" for k in CRAFTED if k.startswith("cfgnode")})
        for path in files.values():
            load_unsafely(path)
        print(json.dumps({kind: (canaries / kind).exists() for kind in files}))
    else:
        sys.exit(f"unknown mode {mode!r}: yacs OUT CANARIES | live OUT")
