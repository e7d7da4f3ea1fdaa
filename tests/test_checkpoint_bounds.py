"""Bounded and lossless checkpoint handling, on a hostile corpus generated here (seeded, nothing committed).

Each file goes through every checkpoint entry point (``load_file``, ``load_weights``, ``inspect``, ``convert``,
``evaluate``, ``model.pretrained=`` and auto-resume) in a child process whose address space may grow by at most
1 GiB (``RLIMIT_AS``) past what it held after warming up: the refusal is a ``CheckpointError`` naming the file,
no entry point raises anything else (``MemoryError`` included), the input is unchanged and nothing is written
where a refusal was due. ``python tests/test_checkpoint_bounds.py child KIND PATH GOOD WORK`` is that child.

The rest: limits at their exact boundary, ``convert`` refusing to destroy anything, one-line errors from the CLIs,
and a checkpoint save that fails for want of space (a file size limit in a child; a real full tmpfs where this
machine may mount one).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import crafted_checkpoints as cc
from timesformer_harness.checkpoint import (DEFAULT_LIMITS, CheckpointError, CheckpointLimitError,
                                            CheckpointWriteError, LoadLimits, WeightsMismatchError, convert, inspect,
                                            load_file, load_weights, main as checkpoint_main, save_pyth)
from timesformer_harness.model import TimeSformer

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
HEADROOM = 1 << 30  # address space a child may add to what it held after warming up
TINY_CFG = ["model.img_size=32", "model.patch_size=8", "model.num_frames=4", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=4", "model.num_classes=7", "data.num_frames=4", "data.train_crop_size=32",
            "output.tensorboard=false"]
GiB4 = 3814 << 20  # "4 GB" of zeros: just under 2**32, so the zip needs no zip64 records

# kind -> pattern of the refusal every entry point gives (load_file refuses these).
REFUSED = {
    "shared_refs_top": r"holds a list, not a dict of weights",
    "deep_nesting": r"containers nested more than 100 levels deep \(LoadLimits\.max_depth\)",
    "zip_bomb_member": r"member archive/extra/data\.pkl declares 3,999,268,864 bytes of pickled structure, more "
                       r"than LoadLimits\.max_pickle_bytes=16,777,216",
    "zip_bomb_refused": r"member archive/extra/data\.pkl declares 3,999,268,864 bytes of pickled structure",
    "zip_bomb_data_pkl": r"member archive/data\.pkl declares 3,999,268,864 bytes of pickled structure",
    "zip_bomb_storage": r"its members declare [\d,]+ bytes but the file holds [\d,]+ \(torch\.save stores members "
                        r"uncompressed",
    "legacy_global_nops": r"does not end within LoadLimits\.max_pickle_bytes=16,777,216 bytes / "
                          r"max_pickle_opcodes=2,000,000 opcodes",
    "legacy_nones": r"does not end within LoadLimits\.max_pickle_bytes",
    "zip_global_nops": r"refused, nothing in it was run: .*GLOBAL posix\.system.*\(the scan for other names stopped "
                       r"at LoadLimits",
}
# kind -> pattern: files that read, but whose weights do not fit the model (load_weights and what calls it refuse).
BAD_WEIGHTS = {
    "model_state_int": r"its model_state entry is of type int, not a dict of tensors",
    "model_state_list": r"its model_state entry is of type list, not a dict of tensors",
    "nonsquare_pos_embed": r"pos_embed of 15 patch positions is not a square grid: file \[1, 16, 32\], model "
                           r"\[1, 17, 32\] \(pos_resize='1d'",
    "wide_embeddings": r"shape mismatch pos_embed: file \[1, 17, 64\], model \[1, 17, 32\] \(only the token count "
                       r"is resized; the embedding width must match\)\n  shape mismatch time_embed: file \[1, 4, 64\]",
    "empty_time_embed": r"empty time_embed: file \[1, 0, 32\], model \[1, 4, 32\]",
    "scalar_cls_token": r"shape mismatch cls_token: file \[\], model \[1, 1, 32\]",
    "nan_weights": r"bad values blocks\.0\.attn\.qkv\.weight: holds 3 NaN and 2 infinite values",
    "complex_weights": r"bad values cls_token: holds complex64 values, not real floating point",
    "int64_weights": r"bad values head\.bias: holds int64 values, not real floating point",
}
LOADS = ["shared_refs_cfg", "cyclic_cfg"]  # read and load correctly, in bounded time and memory
# What inspect says of the files it reads (it goes on: a description, not a refusal).
INSPECT = {
    "scalar_cls_token": r"model:       not inferred: cls_token is of shape \[\], where a TimeSformer or ViT state "
                        r"dict has a non-empty 3-D one",
    "nan_weights": r"suspect:     blocks\.0\.attn\.qkv\.weight holds 3 NaN and 2 infinite values",
    "complex_weights": r"suspect:     cls_token holds complex64 values",
    "int64_weights": r"suspect:     head\.bias holds int64 values",
    "nonsquare_pos_embed": r"tensors:     \d+",
    "wide_embeddings": r"model:       attention_type=divided_space_time frames=4 img_size=32",
    "empty_time_embed": r"model:       not inferred: time_embed is of shape \[1, 0, 32\]",
    "shared_refs_cfg": r"epoch:       3",
    "cyclic_cfg": r"epoch:       3",
}


# ----------------------------------------------------------------------------------------------------------------
# The corpus.
def shared_bomb(levels: int) -> list:
    """A list ``levels`` deep, each level holding two references to the one below: 2**levels paths, a few hundred
    bytes pickled."""
    x: list = []
    for _ in range(levels):
        x = [x, x]
    return x


def deflated_zeros(mib: int) -> bytes:
    """A raw deflate stream of ``mib`` MiB of zeros, about 1 KB per MiB: one self-contained block repeated."""
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = block.compress(bytes(1 << 20)) + block.flush(zlib.Z_FULL_FLUSH)  # no reference past its own start
    return chunk * mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block ends it


def zeros_crc(size: int) -> int:
    crc, mib = 0, bytes(1 << 20)
    for _ in range(size >> 20):
        crc = zlib.crc32(mib, crc)
    return zlib.crc32(bytes(size & ((1 << 20) - 1)), crc)


def write_zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip by hand: (name, payload, method, crc, uncompressed size) per member, so a payload may be deflated
    data that Python's zipfile would only write by compressing it again."""
    out, central = bytearray(), bytearray()
    for name, payload, method, crc, size in members:
        n, offset = name.encode(), len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(payload), size, len(n), 0)
        out += n + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(payload), size,
                               len(n), 0, 0, 0, 0, 0, offset) + n
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def torch_members(obj: Any) -> list[tuple[str, bytes, int, int, int]]:
    """The members of ``obj`` as torch.save writes them (stored)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as z:
        return [(i.filename, z.read(i), zipfile.ZIP_STORED, i.CRC, i.file_size) for i in z.infolist()]


def legacy_header() -> bytes:
    """The three pickles a legacy torch file starts with: magic number, protocol version, system info."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return b"".join(pickle.dumps(x, protocol=2) for x in (torch.serialization.MAGIC_NUMBER, 1001, info))


def pyth(sd: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    return {"epoch": 3, "model_state": OrderedDict((f"model.{k}", v) for k, v in sd.items()), "optimizer_state": {},
            "cfg": "TRAIN:\n  ENABLE: True\n", **extra}


def write_corpus(out: Path, seed: int = 0) -> dict[str, Path]:
    """Every hostile kind (``REFUSED``, ``BAD_WEIGHTS``, ``LOADS``) as a file in ``out``; kind -> path."""
    out.mkdir(parents=True, exist_ok=True)
    p = {kind: out / f"{kind}.pyth" for kind in [*REFUSED, *BAD_WEIGHTS, *LOADS]}
    sd = {k.removeprefix("model."): v for k, v in cc.tiny_state(seed).items()}
    torch.save(shared_bomb(64), p["shared_refs_top"])
    torch.save(pyth(sd, cfg={"SOLVER": shared_bomb(64)}), p["shared_refs_cfg"])
    cycle: list = [1]
    cycle.append(cycle)
    torch.save(pyth(sd, cfg={"LOOP": cycle}), p["cyclic_cfg"])
    depth = 100_000  # EMPTY_LIST x depth, then APPEND x (depth - 1): lists nested 100,000 deep in 200 KB
    cc.write_zip_with_data_pkl(p["deep_nesting"], b"\x80\x02}" + cc.binunicode("cfg") + b"]" * depth
                               + b"a" * (depth - 1) + b"s.")
    members = torch_members(pyth(sd))
    bomb = ("archive/extra/data.pkl", deflated_zeros(GiB4 >> 20), zipfile.ZIP_DEFLATED, zeros_crc(GiB4), GiB4)
    write_zip(p["zip_bomb_member"], [*members, bomb])
    refused = b"\x80\x02cposix\nsystem\n."  # torch refuses this GLOBAL; the old refusal path then read every data.pkl
    write_zip(p["zip_bomb_refused"], [(n, refused, 0, zlib.crc32(refused), len(refused)) if n == "archive/data.pkl"
                                      else (n, *rest) for n, *rest in [*members, bomb]])
    write_zip(p["zip_bomb_data_pkl"], [("archive/data.pkl", *bomb[1:]) if m[0] == "archive/data.pkl" else m
                                       for m in members])
    write_zip(p["zip_bomb_storage"], [*members, ("archive/data/99", *bomb[1:])])
    nops = 60_000_000  # a 60 MB legacy file: GLOBAL, then None pushed 60 million times
    p["legacy_global_nops"].write_bytes(legacy_header() + b"\x80\x02cposix\nsystem\n" + b"N" * nops + b".")
    p["legacy_nones"].write_bytes(legacy_header() + b"\x80\x02" + b"N" * nops + b".")
    cc.write_zip_with_data_pkl(p["zip_global_nops"], b"\x80\x02cposix\nsystem\n" + b"N" * 12_000_000 + b".")
    torch.save({"epoch": 3, "model_state": 7}, p["model_state_int"])
    torch.save({"epoch": 3, "model_state": [sd["cls_token"]]}, p["model_state_list"])
    torch.save(pyth({**sd, "pos_embed": sd["pos_embed"][:, :16].clone()}), p["nonsquare_pos_embed"])
    torch.save(pyth({**sd, "pos_embed": torch.randn(1, 17, 64), "time_embed": torch.randn(1, 4, 64)}),
               p["wide_embeddings"])
    torch.save(pyth({**sd, "time_embed": torch.zeros(1, 0, 32)}), p["empty_time_embed"])
    torch.save(pyth({**sd, "cls_token": torch.tensor(0.5)}), p["scalar_cls_token"])
    qkv = sd["blocks.0.attn.qkv.weight"].clone()
    qkv.view(-1)[[3, 9, 27]] = float("nan")
    qkv.view(-1)[[1, 2]] = torch.tensor([float("inf"), float("-inf")])
    torch.save(pyth({**sd, "blocks.0.attn.qkv.weight": qkv}), p["nan_weights"])
    torch.save(pyth({**sd, "cls_token": sd["cls_token"].to(torch.complex64)}), p["complex_weights"])
    torch.save(pyth({**sd, "head.bias": torch.arange(7)}), p["int64_weights"])
    return p


# ----------------------------------------------------------------------------------------------------------------
# The child: every entry point on one file, under the address-space cap.
def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _child(kind: str, path: Path, good: Path, work: Path) -> dict[str, Any]:
    from timesformer_harness.config import load_config
    from timesformer_harness.distributed import DistInfo
    from timesformer_harness.evaluate import evaluate
    from timesformer_harness.train import Trainer

    def cfg(run: Path, *overrides: str):
        return load_config(REPO / "configs/model/tiny.yaml", [*TINY_CFG, f"output.dir={run}", *overrides])

    def trainer(c) -> int:
        t = Trainer(c, DistInfo())
        t.metrics.close()
        return t.start_epoch

    run = work / "resume"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(good, run / "checkpoints/checkpoint_epoch_00001.pyth")
    shutil.copy(path, run / "checkpoints/checkpoint_epoch_00004.pyth")  # its name fits its "epoch": 3
    trainer(cfg(work / "warm", f"model.pretrained={good}"))  # warm up: every lazy import and allocator arena
    inspect(good)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cap = _vm_size() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    results: dict[str, Any] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        start = time.perf_counter()
        try:
            results[name] = {"ok": True, "value": fn()}
        except Exception as e:  # noqa: BLE001 - recorded: the parent asserts which type it was
            results[name] = {"ok": False, "type": type(e).__name__, "checkpoint_error": isinstance(e, CheckpointError),
                             "message": str(e)}
        results[name]["seconds"] = round(time.perf_counter() - start, 3)

    attempt("load_file", lambda: sorted(map(str, load_file(path))))
    attempt("load_weights", lambda: load_weights(TimeSformer(**cc.TINY), path).format)
    attempt("inspect", lambda: inspect(path, show_keys=False))
    attempt("convert", lambda: convert(path, work / "converted.pyth"))
    if kind not in LOADS:  # a file that loads would go on to a full evaluation
        attempt("evaluate", lambda: evaluate(cfg(work / "eval"), str(path), DistInfo()))
    attempt("pretrained", lambda: trainer(cfg(work / "ft", f"model.pretrained={path}")))
    attempt("resume", lambda: trainer(cfg(run)))
    results["resume_file"] = str(run / "checkpoints/checkpoint_epoch_00004.pyth")
    results["rss_growth"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss
    results["cap"] = cap
    return results


# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training checkpoint of ours for the tiny model (epoch 1 done)."""
    from timesformer_harness.config import load_config
    from timesformer_harness.distributed import DistInfo
    from timesformer_harness.train import Trainer

    run = tmp_path_factory.mktemp("good_run")
    t = Trainer(load_config(REPO / "configs/model/tiny.yaml", [*TINY_CFG, f"output.dir={run}"]), DistInfo())
    t.metrics.close()
    path = t.save(1, 0)
    assert path is not None
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_child(kind: str, path: Path, good: Path, work: Path) -> dict[str, Any]:
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
           "PYTHONPATH": os.pathsep.join([str(Path(cc.__file__).parent), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([PY, __file__, "child", kind, str(path), str(good), str(work)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", [*REFUSED, *BAD_WEIGHTS, *LOADS])
def test_every_entry_point_is_bounded_and_refuses_clearly(corpus: dict[str, Path], good_checkpoint: Path,
                                                         kind: str, tmp_path: Path) -> None:
    path = corpus[kind]
    before = sha256(path)
    r = run_child(kind, path, good_checkpoint, tmp_path / "work")
    assert sha256(path) == before  # nothing lost
    assert not any(v.get("type") == "MemoryError" for v in r.values() if isinstance(v, dict)), r
    assert r["rss_growth"] < 256 << 20, r  # far below the cap: the budgets, not the cap, bound the work

    def refused(name: str, pattern: str, where: Path = path) -> None:
        out = r[name]
        assert not out["ok"] and out["checkpoint_error"], (name, out)
        assert str(where) in out["message"] and re.search(pattern, out["message"]), (name, out["message"])
        assert "\nTraceback" not in out["message"]

    if kind in REFUSED:
        for name in ("load_file", "load_weights", "inspect", "convert", "evaluate", "pretrained"):
            refused(name, REFUSED[kind])
        assert r["resume"]["ok"] and r["resume"]["value"] == 1, r["resume"]  # fell back to the good epoch-1 file
        assert not (tmp_path / "work/converted.pyth").exists()
    elif kind in BAD_WEIGHTS:
        assert r["load_file"]["ok"], r["load_file"]
        for name in ("load_weights", "evaluate", "pretrained"):
            refused(name, BAD_WEIGHTS[kind])
        refused("resume", BAD_WEIGHTS[kind], Path(r["resume_file"]))  # the run's own newest file: said, not skipped
        if kind.startswith("model_state"):
            refused("inspect", BAD_WEIGHTS[kind])
            refused("convert", BAD_WEIGHTS[kind])
        else:
            assert r["inspect"]["ok"] and re.search(INSPECT[kind], r["inspect"]["value"]), r["inspect"]
            assert r["convert"]["ok"], r["convert"]  # a conversion keeps the file as it is, and names what is odd
            if kind in ("nan_weights", "complex_weights", "int64_weights"):
                assert "\nwarning: " in r["convert"]["value"]
    else:
        for name in ("load_file", "load_weights", "inspect", "convert", "pretrained"):
            assert r[name]["ok"], (name, r[name])
        assert re.search(INSPECT[kind], r["inspect"]["value"])
        assert r["resume"]["ok"] and r["resume"]["value"] == 3 + 1  # the hostile file is the newest, and loads
        converted = load_file(tmp_path / "work/converted.pyth")
        assert converted["epoch"] == 3 and set(converted["cfg"]) == set(load_file(path)["cfg"])


def test_shared_references_stay_shared(corpus: dict[str, Path]) -> None:
    """The 64-level list is one list per level after loading, not 2**64 copies; a cycle stays a cycle."""
    level = load_file(corpus["shared_refs_cfg"])["cfg"]["SOLVER"]
    for _ in range(64):
        assert len(level) == 2 and level[0] is level[1]
        level = level[0]
    assert level == []
    loop = load_file(corpus["cyclic_cfg"])["cfg"]["LOOP"]
    assert loop[0] == 1 and loop[1] is loop


# ----------------------------------------------------------------------------------------------------------------
# Each limit at its exact boundary.
def test_depth_limit_is_exact(tmp_path: Path) -> None:
    nested: list = []
    for _ in range(4):
        nested = [nested]
    path = tmp_path / "nested.pyth"
    torch.save({"cfg": nested}, path)  # the dict, then lists at depths 1..5
    assert load_file(path, LoadLimits(max_depth=5))["cfg"] == nested
    with pytest.raises(CheckpointLimitError, match=r"nested more than 4 levels deep \(LoadLimits\.max_depth\)"):
        load_file(path, LoadLimits(max_depth=4))


def test_an_expanded_tensor_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """1.6 kB on disk, 6 GB as a tensor (a stride-0 view): refused as a limit, naming the shape, before any check
    reads it; a view smaller than its storage (a slice saved with it) loads."""
    path = tmp_path / "expanded.pyth"
    torch.save({"model_state": {"model.pos_embed": torch.zeros(1, 1, 1).expand(1, 1, 1_500_000_000)}}, path)
    assert path.stat().st_size < 4096
    with pytest.raises(CheckpointLimitError, match=r"a tensor of shape \[1, 1, 1500000000\] \(6000000000 bytes\) is "
                                               r"stored in 4 bytes \(an expanded view\)"):
        load_file(path)
    sliced = tmp_path / "sliced.pyth"
    torch.save({"model_state": {"w": torch.arange(10.0)[2:5]}}, sliced)
    assert load_file(sliced)["model_state"]["w"].tolist() == [2.0, 3.0, 4.0]


def test_pickle_bytes_limit_is_exact_for_zip_and_legacy(tmp_path: Path) -> None:
    obj = pyth({k.removeprefix("model."): v for k, v in cc.tiny_state(1).items()})
    zipped = tmp_path / "zip.pyth"
    torch.save(obj, zipped)
    size = zipfile.ZipFile(zipped).getinfo("zip/data.pkl").file_size
    assert load_file(zipped, LoadLimits(max_pickle_bytes=size))["epoch"] == 3
    with pytest.raises(CheckpointLimitError, match=rf"member zip/data\.pkl declares {size:,} bytes"):
        load_file(zipped, LoadLimits(max_pickle_bytes=size - 1))
    legacy = tmp_path / "legacy.pyth"
    legacy.write_bytes(cc.legacy_bytes(obj))
    with open(legacy, "rb") as f:  # the five pickles' bytes: everything before the raw storages
        for _ in range(5):
            _skip_pickle(f)
        pickles = f.tell()
    assert load_file(legacy, LoadLimits(max_pickle_bytes=pickles))["epoch"] == 3
    with pytest.raises(CheckpointLimitError, match=r"does not end within LoadLimits\.max_pickle_bytes"):
        load_file(legacy, LoadLimits(max_pickle_bytes=pickles - 1))


def _skip_pickle(f: Any) -> None:
    """Move ``f`` past one pickle by reading its opcodes (nothing built)."""
    for op, _, _ in pickletools.genops(f):
        if op.name == "STOP":
            return


def test_zip_directory_and_inflation_limits_are_exact(tmp_path: Path) -> None:
    members = torch_members(pyth({k.removeprefix("model."): v for k, v in cc.tiny_state(2).items()}))
    path = write_zip(tmp_path / "many.pyth", members + [(f"archive/pad/{i}", b"", 0, 0, 0) for i in range(2000)])
    directory = sum(46 + len(name.encode()) for name, *_ in members) + sum(46 + len(f"archive/pad/{i}")
                                                                          for i in range(2000))
    assert load_file(path, LoadLimits(max_zip_directory_bytes=directory))["epoch"] == 3
    with pytest.raises(CheckpointLimitError, match=rf"its zip directory is {directory:,} bytes, more than "
                                                   rf"LoadLimits\.max_zip_directory_bytes={directory - 1:,}"):
        load_file(path, LoadLimits(max_zip_directory_bytes=directory - 1))
    extra = 5 << 20
    padded = write_zip(tmp_path / "inflated.pyth", [*members, ("archive/pad/x", deflated_zeros(5), 8,
                                                                zeros_crc(extra), extra)])
    declared = sum(m[4] for m in members) + extra
    over = declared - padded.stat().st_size
    assert load_file(padded, LoadLimits(max_zip_inflation_bytes=over))["epoch"] == 3
    with pytest.raises(CheckpointLimitError, match=rf"its members declare {declared:,} bytes but the file holds "
                                                   rf"{padded.stat().st_size:,}"):
        load_file(padded, LoadLimits(max_zip_inflation_bytes=over - 1))


def test_refusal_scan_stops_at_the_opcode_budget(tmp_path: Path) -> None:
    """A refused pickle is scanned for the other names it imports, within the budget: a name before the budget is
    found, one after it is not, and the message says the scan stopped."""
    stream = (b"\x80\x02cposix\nsystem\n" + b"N" * 1000 + b"cbuiltins\nexec\n" + b"N" * 1000
              + b"csubprocess\nPopen\n.")
    path = cc.write_zip_with_data_pkl(tmp_path / "names.pyth", stream)
    with pytest.raises(CheckpointError) as err:
        load_file(path, LoadLimits(max_pickle_opcodes=1500))
    assert "names builtins.exec" in str(err.value) and "subprocess.Popen" not in str(err.value)
    assert "the scan for other names stopped at LoadLimits" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        load_file(path)
    assert "builtins.exec, subprocess.Popen" in str(err.value) and "stopped" not in str(err.value)


def test_defaults_are_documented() -> None:
    doc = (REPO / "docs/checkpoints.md").read_text()
    for name, value in vars(DEFAULT_LIMITS).items():
        assert f"`{name}`" in doc and (f"{value:,}" in doc), name


# ----------------------------------------------------------------------------------------------------------------
# convert destroys nothing.
def test_convert_refuses_to_overwrite_and_keeps_the_training_state(good_checkpoint: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "src.pyth"
    shutil.copy(good_checkpoint, src)
    before = sha256(src)
    for args in (["convert", str(src), str(src)], ["convert", str(src), str(src), "--force"],
                 ["convert", str(src), os.path.join(tmp_path, ".", "src.pyth"), "--force"]):
        assert checkpoint_main(args) == 2
        assert f"convert would overwrite its input {src}" in capsys.readouterr().err
    os.link(src, tmp_path / "hardlink.pyth")
    assert checkpoint_main(["convert", str(src), str(tmp_path / "hardlink.pyth"), "--force"]) == 2
    assert "would overwrite its input" in capsys.readouterr().err
    assert sha256(src) == before

    dst = tmp_path / "out.pyth"
    assert checkpoint_main(["convert", str(src), str(dst)]) == 0
    assert "kept epoch, optimizer_state, cfg" in capsys.readouterr().out
    a, b = load_file(src), load_file(dst)
    assert a.keys() == b.keys() and a["epoch"] == b["epoch"] and a["cfg"] == b["cfg"]
    assert a["position"] == b["position"]
    assert a["optimizer_state"]["param_groups"] == b["optimizer_state"]["param_groups"]
    assert all(torch.equal(v, b["model_state"][k]) for k, v in a["model_state"].items())
    written = sha256(dst)
    assert checkpoint_main(["convert", str(src), str(dst)]) == 2
    assert f"{dst} exists; pass --force to replace it" in capsys.readouterr().err and sha256(dst) == written
    assert checkpoint_main(["convert", str(src), str(dst), "--force", "--weights-only"]) == 0
    stripped = load_file(dst)
    assert stripped["epoch"] == 0 and stripped["optimizer_state"] == {} and stripped["cfg"] == ""
    assert set(stripped) == {"epoch", "model_state", "optimizer_state", "cfg"}
    capsys.readouterr()

    st = tmp_path / "w.safetensors"
    assert checkpoint_main(["convert", str(src), str(st)]) == 2
    assert "holds epoch, optimizer_state, cfg, " in capsys.readouterr().err and not st.exists()
    assert checkpoint_main(["convert", str(src), str(st), "--weights-only"]) == 0
    assert "dropped epoch, optimizer_state, cfg" in capsys.readouterr().out
    assert checkpoint_main(["convert", str(src), str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder; give the output file's name" in capsys.readouterr().err
    assert checkpoint_main(["convert", str(src), str(tmp_path / "nope" / "x.pyth")]) == 2
    assert f"folder {tmp_path / 'nope'} does not exist; create it first" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists() and sha256(src) == before


# ----------------------------------------------------------------------------------------------------------------
# One line, no traceback, from the real CLIs.
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_errors_are_one_line(corpus: dict[str, Path], good_checkpoint: Path, tmp_path: Path) -> None:
    res = _cli("-m", "timesformer_harness.checkpoint", "inspect", "--no-keys", str(corpus["scalar_cls_token"]),
               str(corpus["zip_bomb_member"]), str(corpus["legacy_global_nops"]), str(good_checkpoint))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("error: ") for e in errors), errors
    assert str(corpus["zip_bomb_member"]) in errors[0] and str(corpus["legacy_global_nops"]) in errors[1]
    assert res.stdout.count("file:        ") == 2 and "not inferred: cls_token" in res.stdout
    assert f"file:        {good_checkpoint}" in res.stdout  # it went on past the refused files
    for script, arg in (("harness/evaluate.py", f"--checkpoint={corpus['nonsquare_pos_embed']}"),
                        ("harness/train.py", f"model.pretrained={corpus['wide_embeddings']}")):
        res = _cli(script, "--config", "configs/model/tiny.yaml", *TINY_CFG, f"output.dir={tmp_path / script}", arg)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        line = next(x for x in res.stderr.splitlines() if x.startswith("error: "))
        assert "does not match the model" in line, res.stderr[-3000:]


def test_strict_mismatch_is_a_checkpoint_error_and_a_key_error(corpus: dict[str, Path]) -> None:
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(TimeSformer(**cc.TINY), corpus["wide_embeddings"])
    assert isinstance(err.value, CheckpointError) and isinstance(err.value, KeyError)
    assert str(err.value).startswith(f"{corpus['wide_embeddings']} (pyth) does not match the model:\n  ")
    report = load_weights(TimeSformer(**cc.TINY), corpus["nan_weights"], strict=False)
    assert "blocks.0.attn.qkv.weight" in report.skipped and "blocks.0.attn.qkv.weight" in report.missing


# ----------------------------------------------------------------------------------------------------------------
# A save that runs out of space.
_SAVE_CHILD = """
import os, resource, sys, torch
sys.path.insert(0, {tests!r})
import crafted_checkpoints as cc
from timesformer_harness.checkpoint import CheckpointWriteError, save_pyth
from timesformer_harness.model import TimeSformer
model = TimeSformer(**cc.TINY)
limit = int(sys.argv[2])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    save_pyth(sys.argv[1], model, extra={{"big": torch.zeros(1 << 20)}})
except CheckpointWriteError as e:
    print(e)
    sys.exit(3)
"""


def _save(path: Path, fsize: int) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", _SAVE_CHILD.format(tests=str(Path(cc.__file__).parent)), str(path), str(fsize)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def _assert_previous_survives(folder: Path, path: Path, before: str) -> None:
    assert sha256(path) == before and load_file(path)["epoch"] == 0
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temporary left behind


def test_save_past_the_file_size_limit_names_path_and_space(tmp_path: Path) -> None:
    assert issubclass(CheckpointWriteError, CheckpointError)  # what train.py and evaluate.py print as one line
    path = tmp_path / "checkpoint_epoch_00001.pyth"
    save_pyth(path, TimeSformer(**cc.TINY))
    before = sha256(path)
    res = _save(path, 256 << 10)
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr[-3000:]
    message = res.stdout.strip()
    assert message.startswith(f"could not write {path}: the file size limit was reached (ulimit -f) "
                              f"([Errno 27] File too large); ")
    assert " MiB free on its filesystem, " in message
    assert f"bytes written when it failed; {path} is unchanged" in message
    _assert_previous_survives(tmp_path, path, before)


def test_save_to_a_full_disk_names_path_and_space(tmp_path: Path) -> None:
    """A real full filesystem: a 1 MiB tmpfs (needs root, or skips)."""
    mount = tmp_path / "tiny_fs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        path = mount / "checkpoint_epoch_00001.pyth"
        save_pyth(path, TimeSformer(**cc.TINY))
        before = sha256(path)
        res = _save(path, 0)
        assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr[-3000:]
        message = res.stdout.strip()
        assert message.startswith(f"could not write {path}: the disk is full ([Errno 28] No space left on device); ")
        assert "; 0.0 MiB free on its filesystem, " in message and f"{path} is unchanged" in message  # at the failure
        _assert_previous_survives(mount, path, before)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    print(json.dumps(_child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))))
