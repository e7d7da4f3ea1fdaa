"""Manifests: Kinetics CSV (separator, prefix, relative paths), plain CSV, SSv2 JSON, malformed lines."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.manifest import (VideoEntry, read_csv, read_entries, read_kinetics, read_manifest,
                                                    read_ssv2)


def test_kinetics_relative_paths_resolve_against_the_manifest_folder(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("a/x.mp4 3\n\n/abs/y.mp4 0\n")
    out = read_kinetics(tmp_path / "train.csv")
    assert [(e.path, e.label) for e in out] == [(str(tmp_path / "a/x.mp4"), 3), ("/abs/y.mp4", 0)]


def test_kinetics_separator_and_prefix(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("clips/x y.mp4,7\n")  # a space inside the path: needs a non-space separator
    out = read_kinetics(tmp_path / "m.csv", separator=",", path_prefix="/data/k400")
    assert out[0].path == "/data/k400/clips/x y.mp4" and out[0].label == 7


@pytest.mark.parametrize("line, match", [("a.mp4 1 extra", r"m.csv:2: expected 'path label'.*label 'extra'"),
                                         ("a.mp4", r"m.csv:2: expected .*got 1 field"),
                                         ("a.mp4 cat", r"m.csv:2: expected .*integer label \(digits 0-9\), got "
                                                       r"label 'cat'"),
                                         ("a.mp4 -1", r"m.csv:2: label -1 is negative")])
def test_kinetics_malformed_line_names_file_line_and_expectation(tmp_path: Path, line: str, match: str) -> None:
    (tmp_path / "m.csv").write_text(f"ok.mp4 0\n{line}\n")
    with pytest.raises(ValueError, match=match):
        read_kinetics(tmp_path / "m.csv")


def test_kinetics_paths_may_hold_spaces_and_a_bom_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("\ufeffmy clips/a b.mp4 3\n  c.mp4\t1  \n", encoding="utf-8")
    assert [(Path(e.path).relative_to(tmp_path).as_posix(), e.label) for e in read_kinetics(tmp_path / "m.csv")] == [
        ("my clips/a b.mp4", 3), ("c.mp4", 1)]
    (tmp_path / "c.csv").write_text("\ufeffpath,label\na.webm,2\n", encoding="utf-8")
    assert [e.label for e in read_csv(tmp_path / "c.csv")] == [2]


@pytest.mark.parametrize("text, match", [
    ("path label\na.mp4 1\n", r"m.csv:1: .*label 'label'; a header line\? Kinetics manifests have none: remove it$"),
    ("path,label\na.mp4,1\n", r"m.csv:1: .*got 1 field.*a header line\?"),
    ("a.mp4,1\n", r"m.csv:1: .*the line is comma-separated: set data.format=csv \(--format csv\), or "
                  r"\"data.separator=','\"$")])  # quoted whole: a shell keeps the YAML quotes
def test_kinetics_errors_hint_at_the_format(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_kinetics(tmp_path / "m.csv")


def test_csv_format_on_a_kinetics_list_hints_at_the_format(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("a.mp4 1\n")
    with pytest.raises(ValueError, match=r"m.csv:1: .*no comma: a Kinetics-style 'path label' list\?"):
        read_csv(tmp_path / "m.csv")


def test_a_video_listed_with_two_labels_is_refused_naming_both_lines(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("a.mp4 1\nb.mp4 2\na.mp4 1\nc.mp4 0\na.mp4 4\n")
    with pytest.raises(ValueError, match=r"m.csv:5: .*a.mp4 is listed with label 4, and with label 1 at .*m.csv:1"):
        read_kinetics(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("a.mp4 1\na.mp4 1\n")  # the same line twice: an oversampled video, kept
    assert len(read_kinetics(tmp_path / "m.csv")) == 2


def test_one_video_under_two_spellings_is_one_video(tmp_path: Path) -> None:
    """Paths are compared absolute and normalised: a video listed absolute and relative, or through a '..', with two
    labels fails naming both lines and both spellings; with one label both lines are kept, each path as written."""
    (tmp_path / "m").mkdir()
    manifest = tmp_path / "m" / "train.csv"
    for first, second in ((f"{tmp_path}/v/good0.webm", "../v/good0.webm"), ("x.webm", "sub/../x.webm")):
        manifest.write_text(f"{first} 0\nother.webm 1\n{second} 3\n")
        with pytest.raises(ValueError, match=rf"train.csv:3: .*m/{re.escape(second)} is listed with label 3, and "
                                             rf"with label 0 at .*train.csv:1 as .*{re.escape(first)}; a video has "
                                             r"one label"):
            read_kinetics(manifest)
        manifest.write_text(f"{first},2\n{second},2\n")
        assert [e.path for e in read_csv(manifest)] == [str(tmp_path / "m" / first), str(tmp_path / "m" / second)]
    (tmp_path / "elsewhere").mkdir()  # through a link, link/.. is another folder: not the same video
    (tmp_path / "m" / "link").symlink_to(tmp_path / "elsewhere")
    manifest.write_text("x.webm 0\nlink/../x.webm 3\n")
    assert [e.label for e in read_kinetics(manifest)] == [0, 3]


@pytest.mark.parametrize("fmt, sep", [("kinetics", " "), ("csv", ",")])
@pytest.mark.parametrize("label", ["1_0", "\u0663", "+3", "0x1", "3.0"])
def test_a_label_is_ascii_digits(tmp_path: Path, fmt: str, sep: str, label: str) -> None:
    """int() reads "1_0" as 10 and the Arabic-Indic digit three as 3: a label is written in digits 0-9."""
    (tmp_path / "m.csv").write_text(f"a.webm{sep}2\nx.webm{sep}{label}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"m.csv:2: expected .*integer label \(digits 0-9\), got label "
                                         rf"{re.escape(repr(label))}"):
        read_entries(tmp_path / "m.csv", fmt)
    (tmp_path / "m.csv").write_text(f"a.webm{sep}2\nx.webm{sep}-1\n")
    with pytest.raises(ValueError, match=r"m.csv:2: label -1 is negative"):
        read_entries(tmp_path / "m.csv", fmt)


@pytest.mark.parametrize("value", ["null", "1.9", "true", "false", '"1_0"', '"\\u0663"', "[1]", '" 1"'])
def test_ssv2_label_ids_are_integers_or_digits(tmp_path: Path, value: str) -> None:
    """An SSv2 labels file's id is an integer or a string of digits: not null (a TypeError), 1.9 or true (read as
    1); the error names the labels file, the template and the value."""
    labels, split = tmp_path / "labels.json", tmp_path / "train.json"
    split.write_text(json.dumps([{"id": "7", "template": "Pushing [something]"}]))
    labels.write_text(f'{{"Pushing something": 0, "Putting something": {value}}}')
    with pytest.raises(ValueError, match=rf"^{labels}: template 'Putting something' has id {re.escape(value)}; "
                                         r"expected a class id, an integer or a string of digits"):
        read_ssv2(split, labels, tmp_path)
    labels.write_text('{"Pushing something": 4, "Putting something": "12"}')
    assert [e.label for e in read_ssv2(split, labels, tmp_path)] == [4]
    labels.write_text('{"Pushing something": 4, "Putting something": "04"}')
    with pytest.raises(ValueError, match=rf"^{labels}: templates 'Pushing something' and 'Putting something' have "
                                         r"the same id 4; each class needs its own id"):
        read_ssv2(split, labels, tmp_path)
    labels.write_text('["Pushing something"]')
    with pytest.raises(ValueError, match=rf"^{labels}: expected a JSON object {{template: id}}, got a list"):
        read_ssv2(split, labels, tmp_path)


@pytest.mark.parametrize("value", ["null", '""', "1003.0", "true", '" 1004"', '"."', '"a/b"'])
def test_ssv2_video_ids_name_a_video(tmp_path: Path, value: str) -> None:
    """A split entry's id names its video ({id}.webm, or a folder of frames): null, "", a float, a bool, an id with
    spaces around it, "." or a path are refused naming the entry (they had become None.webm, .webm, True.webm, ...,
    reported only as missing, and "" and "." both the data root itself as a frame folder)."""
    labels, split = tmp_path / "labels.json", tmp_path / "train.json"
    labels.write_text('{"Pushing something": 0}')
    split.write_text(f'[{{"id": 7, "template": "Pushing [something]"}}, {{"id": {value}, "template": "Pushing '
                     '[something]"}]')
    with pytest.raises(ValueError, match=rf"^{split}: entry 1 has id {re.escape(value)}; expected the video's id"):
        read_ssv2(split, labels, tmp_path)
    split.write_text('[{"id": 7, "template": "Pushing [something]"}, {"id": "clip_8", "template": "Pushing '
                     '[something]"}]')
    assert [Path(e.path).name for e in read_ssv2(split, labels, tmp_path)] == ["7.webm", "clip_8.webm"]
    split.write_text('[{"id": "9"}]')  # SSv2's own test JSON: ids only
    with pytest.raises(ValueError, match=r"entry 0 has no 'id'/'template': .*; SSv2's test JSON lists ids only"):
        read_ssv2(split, labels, tmp_path)


def test_an_empty_separator_is_refused_naming_the_setting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """str.split's "empty separator" named neither the setting nor the fix: read_kinetics names data.separator, the
    manifest CLIs their --separator (refused as the flags are read); the config refuses it as it loads (test_config)."""
    import timesformer_harness.pipelines.validate as validate

    (tmp_path / "m.csv").write_text("a.webm 1\n")
    with pytest.raises(ValueError, match=r"m.csv: the separator is empty \(data.separator\); use ' ' \(whitespace"):
        read_kinetics(tmp_path / "m.csv", separator="")
    with pytest.raises(SystemExit) as exit_:
        validate.main([str(tmp_path / "m.csv"), "--separator", "", "--cache", "none"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("error: argument --separator: is empty; use ' ' (whitespace, as in Kinetics lists) or ',' "
                        "(or --format csv for comma-separated files)"), err


@pytest.mark.parametrize("fmt", ["kinetics", "csv", "ssv2"])
def test_a_manifest_that_is_not_a_file_is_named_for_what_it_is(tmp_path: Path, fmt: str) -> None:
    """A folder (or a named pipe) given as the manifest was reported as not existing."""
    folder = tmp_path / "data"
    folder.mkdir()
    example = "something-something-v2-train.json" if fmt == "ssv2" else "train.csv"
    with pytest.raises(ValueError, match=rf"^manifest {folder} is a folder, not a file; name the .* e.g. "
                                         rf"{folder}/{example}$"):
        read_entries(folder, fmt)
    with pytest.raises(ValueError, match=rf"^manifest {folder} is a folder, not a file; set data.train_manifest to "
                                         rf"the file, e.g. {folder}/{example}$"):
        read_manifest(DataConfig(format=fmt, train_manifest=str(folder)), "train")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"manifest .*pipe is a named pipe, not a file"):
        read_entries(tmp_path / "pipe", fmt)
    with pytest.raises(FileNotFoundError, match=r"manifest .*nope.csv does not exist"):
        read_entries(tmp_path / "nope.csv", fmt)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ValueError, match=r"manifest .*loop cannot be read \(Too many levels of symbolic links\): "
                                         r"check the path and its folders' permissions$"):
        read_entries(tmp_path / "loop", fmt)


@pytest.mark.parametrize("fmt", ["kinetics", "csv"])
@pytest.mark.parametrize("text", ['[{"id": "7", "template": "Pushing [something], fast"}]\n',
                                  '[\n  {"id": "7", "template": "Pushing [something]"}\n]\n',
                                  '{"Pushing something": "0"}\n'])
def test_a_json_file_read_as_a_list_hints_at_ssv2(tmp_path: Path, fmt: str, text: str) -> None:
    """An SSv2 split JSON read as a Kinetics list or a CSV was told to set data.format=csv."""
    (tmp_path / "train.json").write_text(text)
    with pytest.raises(ValueError) as error:
        read_entries(tmp_path / "train.json", fmt)
    assert str(error.value).endswith("; the file looks like JSON (an SSv2 split?): set data.format=ssv2 "
                                     "(--format ssv2)"), error.value
    assert "format=csv" not in str(error.value)


@pytest.mark.parametrize("fmt, text", [("kinetics", "a.mp4 1\nb.mp4 7\n"), ("csv", "a.mp4,1\nb.mp4,7\n")])
def test_labels_are_checked_against_the_number_of_classes(tmp_path: Path, fmt: str, text: str) -> None:
    (tmp_path / "m.csv").write_text(text)
    assert len(read_entries(tmp_path / "m.csv", fmt, num_classes=8)) == 2
    with pytest.raises(ValueError, match=r"m.csv:2: label 7 is out of range for 3 classes \(model.num_classes\): "
                                         r"labels are 0..2"):
        read_entries(tmp_path / "m.csv", fmt, num_classes=3)
    with pytest.raises(ValueError, match=r"m.csv:2: label 7 is out of range"):
        read_manifest(DataConfig(format=fmt, train_manifest=str(tmp_path / "m.csv")), "train", num_classes=3)


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
    # the SSv2 preset moves with data.root: its labels file is the root's, not a fixed data/ssv2/ one
    from timesformer_harness.config import REPO_ROOT, load_config

    (tmp_path / "something-something-v2-labels.json").write_text((tmp_path / "labels.json").read_text())
    preset = load_config(REPO_ROOT / "configs/exp/ssv2_divst_8_224.yaml", [f"data.root={tmp_path}"])
    assert [e.label for e in read_manifest(preset.data, "test")] == [1, 0]
    split.append({"id": "13", "template": "Unknown thing"})
    (tmp_path / "something-something-v2-validation.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"entry 2 \(id 13\) has template 'Unknown thing'"):
        read_ssv2(tmp_path / "something-something-v2-validation.json", tmp_path / "labels.json", tmp_path)


def test_ssv2_files_follow_the_manifest_rules(tmp_path: Path) -> None:
    """As for the other formats: a byte-order mark is ignored, an id listed with two labels fails naming both
    entries, a file that is not UTF-8 or not JSON fails naming the file."""
    labels, split = tmp_path / "labels.json", tmp_path / "train.json"
    labels.write_text("\ufeff" + json.dumps({"Pushing something": "0", "Putting something": "1"}), encoding="utf-8")
    entries = [{"id": "7", "template": "Pushing [something]"}, {"id": "8", "template": "Putting [something]"}]
    split.write_text("\ufeff" + json.dumps(entries), encoding="utf-8")
    assert [e.label for e in read_ssv2(split, labels, tmp_path)] == [0, 1]
    split.write_text(json.dumps(entries + [{"id": "7", "template": "Putting [something]"}]))
    with pytest.raises(ValueError, match=r"entry 2 \(id 7\): .*7.webm is listed with label 1, and with label 0 at "
                                         r".*entry 0 \(id 7\)"):
        read_ssv2(split, labels, tmp_path)
    split.write_bytes(b'[{"id": "7", "template": "Pushing \xe9"}]')
    with pytest.raises(ValueError, match=rf"{split}: not UTF-8 text \(byte 34"):
        read_ssv2(split, labels, tmp_path)
    split.write_text("[{")
    with pytest.raises(ValueError, match=rf"{split}: not JSON"):
        read_ssv2(split, labels, tmp_path)
    split.write_text(json.dumps(entries + [{"id": "9", "template": ["Pushing [something]"]}]))
    with pytest.raises(ValueError, match=r"entry 2 \(id 9\) has template \['Pushing \[something\]'\]; expected the "
                                         r"class's text"):
        read_ssv2(split, labels, tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9/a.webm 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(byte 3: invalid continuation byte\)"):
        read_kinetics(tmp_path / "latin1.txt")


def test_read_manifest_uses_root_and_explicit_paths(tmp_path: Path) -> None:
    (tmp_path / "val.csv").write_text("a.webm 1\n")
    (tmp_path / "other.txt").write_text("b.webm 2\n")
    assert read_manifest(DataConfig(root=str(tmp_path)), "val")[0].label == 1
    assert read_manifest(DataConfig(root=str(tmp_path), val_manifest=str(tmp_path / "other.txt")), "val")[0].label == 2
    with pytest.raises(ValueError, match="split='dev'"):
        read_manifest(DataConfig(root=str(tmp_path)), "dev")


def test_read_entries_is_the_one_dispatch(tmp_path: Path) -> None:
    """One function for every format; the loaders' read_manifest, the validator and prepare all go through it."""
    (tmp_path / "k.txt").write_text("a.webm;3\n")
    (tmp_path / "c.csv").write_text("path,label\nb.webm,1\n")
    (tmp_path / "something-something-v2-labels.json").write_text(json.dumps({"Pushing something": "4"}))
    (tmp_path / "split.json").write_text(json.dumps([{"id": 7, "template": "Pushing [something]"}]))
    assert read_entries(tmp_path / "k.txt", "kinetics", separator=";", path_prefix="/v") == [
        VideoEntry("/v/a.webm", 3)]
    assert read_entries(tmp_path / "c.csv", "csv") == [VideoEntry(str(tmp_path / "b.webm"), 1)]
    # SSv2 defaults: videos and the labels file beside the split JSON; the video id is kept as the entry's key
    assert read_entries(tmp_path / "split.json", "ssv2") == [VideoEntry(str(tmp_path / "7.webm"), 4, "7")]
    assert read_entries(tmp_path / "split.json", "ssv2", path_prefix="/ssv2")[0].path == "/ssv2/7.webm"
    assert read_entries(tmp_path / "split.json", "ssv2", ssv2_suffix=".avi")[0].path == str(tmp_path / "7.avi")
    assert read_entries(tmp_path / "split.json", "ssv2", ssv2_suffix="")[0].path == str(tmp_path / "7")  # frames
    with pytest.raises(ValueError, match=r"manifest format 'json'; choose from \['kinetics', 'csv', 'ssv2'\]"):
        read_entries(tmp_path / "c.csv", "json")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="manifest .*empty.txt lists no videos"):
        read_entries(tmp_path / "empty.txt", "kinetics")


def test_callers_share_the_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_manifest, the validator CLI and prepare call read_entries (recorded here), not a parser of their own."""
    import timesformer_harness.pipelines.manifest as manifest
    import timesformer_harness.pipelines.tools.prepare as prepare
    import timesformer_harness.pipelines.validate as validate
    from timesformer_harness.pipelines.tools.transcode import PrepareSpec

    calls = []

    def spy(path, fmt="kinetics", **kw):
        calls.append((Path(path).name, fmt))
        raise ValueError("spied")

    monkeypatch.setattr(manifest, "read_entries", spy)
    monkeypatch.setattr(prepare, "read_entries", spy)
    (tmp_path / "m.csv").write_text("a.webm 0\n")
    with pytest.raises(ValueError, match="spied"):
        read_manifest(DataConfig(root=str(tmp_path), train_manifest=str(tmp_path / "m.csv")), "train")
    assert validate.main([str(tmp_path / "m.csv"), "--format", "csv", "--cache", ""]) == 1
    with pytest.raises(ValueError, match="spied"):
        prepare.prepare(tmp_path / "m.csv", tmp_path / "out", PrepareSpec(), fmt="ssv2", progress=False)
    assert calls == [("m.csv", "kinetics"), ("m.csv", "csv"), ("m.csv", "ssv2")]


def test_missing_ssv2_labels_names_the_callers_own_setting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A missing SSv2 labels file: the run's config names data.ssv2_labels / data.root; the validate and prepare CLIs
    name their --ssv2-labels flag and their default (beside the split JSON), no config key."""
    import timesformer_harness.pipelines.tools.prepare as prepare
    import timesformer_harness.pipelines.validate as validate

    split = tmp_path / "something-something-v2-train.json"
    split.write_text(json.dumps([{"id": "7", "template": "Pushing [something]"}]))
    with pytest.raises(FileNotFoundError, match=rf"SSv2 labels file {tmp_path}/something-something-v2-labels.json "
                                                r"does not exist: set data.ssv2_labels, or put "
                                                r"something-something-v2-labels.json in data.root"):
        read_manifest(DataConfig(format="ssv2", root=str(tmp_path)), "train")
    cli_fix = "pass --ssv2-labels FILE, or put something-something-v2-labels.json beside the split JSON"
    assert validate.main([str(split), "--format", "ssv2", "--cache", ""]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: SSv2 labels file") and cli_fix in err and "data." not in err
    assert prepare.main([str(split), "--format", "ssv2", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SSv2 labels file") and cli_fix in err and "data." not in err
