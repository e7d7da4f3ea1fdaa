"""Manifests: Kinetics CSV (separator, prefix, relative paths), plain CSV, SSv2 JSON, malformed lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config import DataConfig
from pipelines.manifest import read_csv, read_kinetics, read_manifest, read_ssv2


def test_kinetics_relative_paths_resolve_against_the_manifest_folder(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("a/x.mp4 3\n\n/abs/y.mp4 0\n")
    out = read_kinetics(tmp_path / "train.csv")
    assert [(e.path, e.label) for e in out] == [(str(tmp_path / "a/x.mp4"), 3), ("/abs/y.mp4", 0)]


def test_kinetics_separator_and_prefix(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("clips/x y.mp4,7\n")  # a space inside the path: needs a non-space separator
    out = read_kinetics(tmp_path / "m.csv", separator=",", path_prefix="/data/k400")
    assert out[0].path == "/data/k400/clips/x y.mp4" and out[0].label == 7


@pytest.mark.parametrize("line, match", [("a.mp4 1 extra", r"m.csv:2: expected 'path label'.*got 3 field"),
                                         ("a.mp4", r"m.csv:2: expected .*got 1 field"),
                                         ("a.mp4 cat", r"m.csv:2: expected .*integer label, got label 'cat'"),
                                         ("a.mp4 -1", r"m.csv:2: label -1 is negative")])
def test_kinetics_malformed_line_names_file_line_and_expectation(tmp_path: Path, line: str, match: str) -> None:
    (tmp_path / "m.csv").write_text(f"ok.mp4 0\n{line}\n")
    with pytest.raises(ValueError, match=match):
        read_kinetics(tmp_path / "m.csv")


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest .*nope.csv does not exist"):
        read_kinetics(tmp_path / "nope.csv")


def test_plain_csv_with_header(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text('path,label\n"v/a b.webm",2\nv/c.webm,0\n')
    out = read_csv(tmp_path / "m.csv")
    assert [(Path(e.path).name, e.label) for e in out] == [("a b.webm", 2), ("c.webm", 0)]
    (tmp_path / "bad.csv").write_text("v/a.webm,1,2\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: expected 2 comma-separated fields"):
        read_csv(tmp_path / "bad.csv")


def test_ssv2_templates_map_to_labels(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps({"Pushing something from left to right": "0",
                                                      "Putting something on something": "1"}))
    split = [{"id": "11", "template": "Putting [something] on [something]", "label": "x"},
             {"id": "12", "template": "Pushing [something] from left to right"}]
    (tmp_path / "something-something-v2-validation.json").write_text(json.dumps(split))
    out = read_ssv2(tmp_path / "something-something-v2-validation.json", tmp_path / "labels.json", tmp_path / "v")
    assert [(Path(e.path).name, e.label) for e in out] == [("11.webm", 1), ("12.webm", 0)]
    cfg = DataConfig(format="ssv2", root=str(tmp_path), ssv2_labels=str(tmp_path / "labels.json"))
    via_cfg = read_manifest(cfg, "test")  # test reads the validation split; videos under data.root
    assert [(e.path, e.label) for e in via_cfg] == [(str(tmp_path / "11.webm"), 1), (str(tmp_path / "12.webm"), 0)]
    split.append({"id": "13", "template": "Unknown thing"})
    (tmp_path / "something-something-v2-validation.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"entry 2 \(id 13\) has template 'Unknown thing'"):
        read_ssv2(tmp_path / "something-something-v2-validation.json", tmp_path / "labels.json", tmp_path)


def test_read_manifest_uses_root_and_explicit_paths(tmp_path: Path) -> None:
    (tmp_path / "val.csv").write_text("a.webm 1\n")
    (tmp_path / "other.txt").write_text("b.webm 2\n")
    assert read_manifest(DataConfig(root=str(tmp_path)), "val")[0].label == 1
    assert read_manifest(DataConfig(root=str(tmp_path), val_manifest=str(tmp_path / "other.txt")), "val")[0].label == 2
    with pytest.raises(ValueError, match="split='dev'"):
        read_manifest(DataConfig(root=str(tmp_path)), "dev")
