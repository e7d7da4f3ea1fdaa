"""Files the harness writes through ``common.atomic_path`` get the mode a plain ``open(path, "w")`` gives (0o666 less
the umask), whatever the writer did to its temporary: safetensors' ``save_file`` renames a 0600 file of its own over
it."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from safetensors.torch import save_file

from timesformer_harness.checkpoint import convert, save_pyth
from timesformer_harness.common import atomic_path, atomic_write_text
from timesformer_harness.model import create_model


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set the process's umask for the test (restored after)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_path_gives_the_umask_mode_whatever_the_writer_did(tmp_path: Path, umask, mask: int,
                                                                  want: int) -> None:
    umask(mask)
    atomic_write_text(tmp_path / "plain.txt", "x")
    with atomic_path(tmp_path / "replaced.bin") as tmp:  # a writer that renames its own private file over it
        own = tmp_path / "own"
        own.write_bytes(b"y")
        own.chmod(0o600)
        os.replace(own, tmp)
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {"plain.txt": want, "replaced.bin": want,
                                                           "w.safetensors": want}


def test_convert_outputs_are_world_readable_under_umask_022(tmp_path: Path, umask) -> None:
    src = tmp_path / "ck.pyth"
    save_pyth(src, create_model("tiny", num_classes=3), epoch=2)
    convert(src, tmp_path / "out.pyth")
    convert(src, tmp_path / "out.safetensors", weights_only=True)
    (tmp_path / "hf").mkdir()
    convert(src, tmp_path / "hf" / "model.safetensors", hf=True, weights_only=True)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert {p: mode(tmp_path / p) for p in written} == {p: 0o644 for p in written}
    assert "hf/config.json" in written and "hf/model.safetensors" in written
