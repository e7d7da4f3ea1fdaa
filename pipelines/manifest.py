"""Video manifests: Kinetics-style ``path<sep>label`` lists, Something-Something-v2 JSON, and plain CSV.

``read_entries(path, fmt, ...)`` is the one place a manifest is parsed: the loaders (through
``read_manifest(cfg, split)``), ``python -m timesformer_harness.pipelines.validate`` and ``python -m
timesformer_harness.pipelines.tools.prepare`` all call it.

Paths: a manifest path is joined with ``data.path_prefix`` (as the original's ``PATH_PREFIX``); a path that is
still relative after that is taken relative to the manifest file's folder (so ``data/toy/train.csv`` can say
``train/x.webm``). SSv2 videos are ``{path_prefix or the split JSON's folder}/{id}.webm``. A malformed line raises
``ValueError`` naming the file, the line number and what was expected, with a hint where the file looks like another
format. A Kinetics line splits on its last whitespace (a path may contain spaces); a UTF-8 byte-order mark is
ignored; a video listed twice with different labels, or a label outside ``num_classes``, is an error naming the
lines. A path may name a folder of frames instead of a video file (``frame_images``: its images in frame order).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timesformer_harness.common import not_a_file
from timesformer_harness.pipelines.config import MANIFEST_FORMATS, SEPARATOR_FIX, DataConfig

logger = logging.getLogger(__name__)

SSV2_SPLITS = {"train": "something-something-v2-train.json", "val": "something-something-v2-validation.json",
               "test": "something-something-v2-validation.json"}  # the original tests on the validation set
SSV2_LABELS = "something-something-v2-labels.json"  # template -> class id, beside the split files by default
# The fix a missing SSv2 labels file's error names, in config keys; a CLI that reads manifests through its flags
# (``add_manifest_arguments``) names its own (``manifest_cli_hint``): its default labels file is beside the split JSON.
SSV2_LABELS_FIX = f"set data.ssv2_labels, or put {SSV2_LABELS} in data.root"
# the comma separator as an override typed in a shell: quoted whole, or the shell drops the YAML quotes around ','
COMMA_SEPARATOR = "\"data.separator=','\""
MANIFEST_CLI_HINTS = ((SSV2_LABELS_FIX, f"pass --ssv2-labels FILE, or put {SSV2_LABELS} beside the split JSON"),
                      (COMMA_SEPARATOR, "--separator ','"))
# A manifest may name a folder of frames (``frame_images``): its images are its frames, at this many frames per second
# (the original's SSv2 frames were taken at 30 fps; prepare's --fps reads them at another rate).
FRAME_FOLDER_FPS = 30
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})  # the frames of a frame folder, any case
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})  # the frame folders the loaders read directly (prepare takes PNG too)
INTEGER = re.compile(r"-?[0-9]+")  # a label as written: ASCII digits (int() would also take "1_0", "+3" and "٣")


@dataclass(frozen=True)
class VideoEntry:
    """One manifest line: the resolved video path, its class id, and (SSv2) the video id."""

    path: str
    label: int
    key: str = ""  # SSv2 video id ("" for the other formats)


def frame_order(name: str) -> tuple[list[str | int], str]:
    """Sort key of a frame's file name: its runs of digits compared as numbers, the rest as text (``img_2.jpg``
    before ``img_10.jpg``; zero-padded names keep their byte order), ties (``01`` and ``1``) by the name itself."""
    parts = re.split(r"(\d+)", name)  # text, digits, text, ...: the same kind at the same position in every key
    return [int(p) if k % 2 else p for k, p in enumerate(parts)], name


def frame_images(folder: str | Path) -> list[Path]:
    """A frame folder's images (``IMAGE_SUFFIXES``) in frame order: by name, the numbers in names by value
    (``frame_order``: ``2.jpg`` before ``10.jpg``, as extracted with ``%d.jpg``). Hidden files (``._0001.jpg``, the
    resource forks a copy from macOS leaves) are not frames, as for a shell's glob.

    Raises ``RuntimeError`` for a folder without images, or with images of several suffixes (``.jpg`` and ``.png``,
    or ``.jpg`` and ``.JPG``: one image sequence has one)."""
    images = sorted((p for p in Path(folder).iterdir()
                     if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()),
                    key=lambda p: frame_order(p.name))
    suffixes = sorted({p.suffix for p in images})
    if not images:
        raise RuntimeError(f"a folder without images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(suffixes) > 1:
        raise RuntimeError(f"a frame folder with images of several kinds ({', '.join(suffixes)}); keep one")
    return images


def _resolve(path: str, prefix: str, base: Path) -> str:
    joined = os.path.join(prefix, path) if prefix else path
    return joined if os.path.isabs(joined) else str(base / joined)


def _label(text: str, where: str, expected: str, num_classes: int = 0, hint: str = "") -> int:
    if not INTEGER.fullmatch(text.strip()):
        raise ValueError(f"{where}: expected {expected} with an integer label (digits 0-9), got label {text!r}{hint}")
    label = int(text)
    if label < 0:
        raise ValueError(f"{where}: label {label} is negative; labels are class ids 0..num_classes-1")
    if num_classes and label >= num_classes:
        raise ValueError(f"{where}: label {label} is out of range for {num_classes} classes (model.num_classes): "
                         f"labels are 0..{num_classes - 1}; fix the manifest, or set model.num_classes")
    return label


class _Listing:
    """A manifest's entries as they are read, refusing a video listed again with another label. One video under two
    spellings (``v/x.webm`` and ``/data/v/x.webm``, ``x.webm`` and ``sub/../x.webm``) is the same video: paths are
    compared absolute and normalised (entries keep the path as written, which quarantine files and prepare's output
    names hold). Links to one file under two names are not looked for (that would stat every video)."""

    def __init__(self) -> None:
        self.entries: list[VideoEntry] = []
        self.first: dict[str, tuple[int, str, str]] = {}  # normalised path -> (label, where first listed, its path)
        self.cwd = os.getcwd()  # what a relative path is relative to

    def add(self, entry: VideoEntry, where: str) -> None:
        label, first, spelled = self.first.setdefault(os.path.normpath(os.path.join(self.cwd, entry.path)),
                                                      (entry.label, where, entry.path))
        # normpath reads sub/.. as nothing; a link sub/ makes sub/../x another file: asked only of a clash
        if label != entry.label and (spelled == entry.path
                                     or os.path.realpath(spelled) == os.path.realpath(entry.path)):
            also = f" as {spelled}" if spelled != entry.path else ""
            raise ValueError(f"{where}: {entry.path} is listed with label {entry.label}, and with label {label} at "
                             f"{first}{also}; a video has one label: remove one of the lines")
        self.entries.append(entry)


def _refuse_non_file(path: Path, what: str, fix: str) -> None:
    """Raise FileNotFoundError when ``path`` (the ``what``) does not exist, ValueError when it is something other
    than a file: a folder (``fix`` names the file to give instead), a named pipe, ..."""
    kind = not_a_file(path)
    if kind == "does not exist":
        raise FileNotFoundError(f"{what} {path} does not exist")
    if kind == "is a folder":
        raise ValueError(f"{what} {path} is a folder, not a file; {fix}")
    if kind:
        raise ValueError(f"{what} {path} {kind}" + (", not a file; write it to a file and name that"
                                                    if kind.startswith("is ") else ""))


def _text(path: Path) -> str:
    """The text of a manifest file (UTF-8; a byte-order mark ignored), or an error naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


JSON_HINT = "; the file looks like JSON (an SSv2 split?): set data.format=ssv2 (--format ssv2)"


def _looks_like_json(text: str) -> bool:
    """Whether a manifest's text starts as a JSON list or object does (SSv2's split files)."""
    return text.lstrip()[:1] in ("[", "{")


def _format_hint(n: int, line: str, json_like: bool = False) -> str:
    """Why a Kinetics line may have failed: a header, or a file in another format."""
    if json_like:
        return JSON_HINT
    if n == 1 and line.strip().lower().replace(",", " ").split()[:2] == ["path", "label"]:
        if "," not in line:  # data.format=csv would refuse every line after it as having no comma
            return "; a header line? Kinetics manifests have none: remove it"
        return ("; a header line? Kinetics manifests have none: remove it, or read the file as data.format=csv "
                "(--format csv), which allows a 'path,label' header")
    if "," in line and len(line.split(",")) == 2:
        return f"; the line is comma-separated: set data.format=csv (--format csv), or {COMMA_SEPARATOR}"
    return ""


def read_kinetics(path: str | Path, separator: str = " ", path_prefix: str = "",
                  num_classes: int = 0) -> list[VideoEntry]:
    """``path<separator>label`` per line (blank lines ignored). With the default separator (whitespace) the label is
    the last field and the path the rest, spaces included; another separator must split a line into exactly 2."""
    path = Path(path)
    _refuse_non_file(path, "manifest", f"name the manifest file, e.g. {path / 'train.csv'}")
    if not separator:
        raise ValueError(f"{path}: the separator is empty (data.separator); {SEPARATOR_FIX}")
    expected = f"'path{separator}label' (separator {separator!r}, data.separator)"
    listing = _Listing()
    text = _text(path)
    json_like = _looks_like_json(text)
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split(separator) if separator != " " else line.strip().rsplit(None, 1)
        if len(fields) != 2 or not fields[0]:
            raise ValueError(f"{path}:{n}: expected {expected}, got {len(fields)} field(s): {line!r}"
                             f"{_format_hint(n, line, json_like)}")
        where = f"{path}:{n}"
        label = _label(fields[1], where, expected, num_classes, _format_hint(n, line, json_like))
        listing.add(VideoEntry(_resolve(fields[0], path_prefix, path.parent), label), where)
    return listing.entries


def read_csv(path: str | Path, path_prefix: str = "", num_classes: int = 0) -> list[VideoEntry]:
    """Plain comma-separated ``path,label`` (an optional header row ``path,label``)."""
    path = Path(path)
    _refuse_non_file(path, "manifest", f"name the manifest file, e.g. {path / 'train.csv'}")
    listing = _Listing()
    text = _text(path)
    json_like = _looks_like_json(text)
    with io.StringIO(text, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if n == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                continue
            if len(row) != 2 or not row[0].strip():
                hint = ("; the line has no comma: a Kinetics-style 'path label' list? set data.format=kinetics "
                        "(--format kinetics)") if len(row) == 1 else ""
                hint = JSON_HINT if json_like else hint
                raise ValueError(f"{path}:{n}: expected 2 comma-separated fields 'path,label', got {len(row)}: "
                                 f"{row}{hint}")
            where = f"{path}:{n}"
            label = _label(row[1].strip(), where, "'path,label'", num_classes, JSON_HINT if json_like else "")
            listing.add(VideoEntry(_resolve(row[0].strip(), path_prefix, path.parent), label), where)
    return listing.entries


def _json(path: Path, kind: type, expected: str) -> Any:
    """``path``'s JSON, which must be a ``kind``; ValueError naming the file and what was ``expected`` otherwise."""
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); expected {expected}") from None
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expected {expected}, got a {type(data).__name__}")
    return data


def _ssv2_labels(labels_json: Path) -> dict[str, str]:
    """The SSv2 labels file's ``{template: id}``, each id as digits (an int, or a string of ASCII digits: not a
    bool, a float or null, which ``int()`` would read as 1 or refuse with a traceback)."""
    labels = _json(labels_json, dict, "a JSON object {template: id}")
    for template, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not INTEGER.fullmatch(str(value)):
            raise ValueError(f"{labels_json}: template {template!r} has id {json.dumps(value)[:80]}; expected a "
                             f"class id, an integer or a string of digits (e.g. \"12\")")
    first: dict[int, str] = {}
    for template, value in labels.items():  # two classes under one id would train as one
        if (other := first.setdefault(int(value), template)) != template:
            raise ValueError(f"{labels_json}: templates {other!r} and {template!r} have the same id {int(value)}; "
                             "each class needs its own id")
    return {template: str(value) for template, value in labels.items()}


def _video_id(value: object) -> bool:
    """Whether an SSv2 split entry's ``id`` names a video: an integer (not a bool), or a name that is one path part
    with no surrounding space (not null, "", ".", "1003.0" from a float, or " 1004")."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return (isinstance(value, str) and value == value.strip() and value not in ("", ".", "..")
            and "/" not in value and "\\" not in value)


def read_ssv2(split_json: str | Path, labels_json: str | Path, video_dir: str | Path,
              ext: str = ".webm", num_classes: int = 0) -> list[VideoEntry]:
    """SSv2: ``labels_json`` maps template -> id; ``split_json`` lists ``{id, template}``; videos are
    ``{video_dir}/{id}{ext}`` (``ext`` "": folders of frames). The label is the template with '[' and ']' removed,
    looked up in the labels."""
    split_json, labels_json = Path(split_json), Path(labels_json)
    _refuse_non_file(split_json, "manifest", f"name the split JSON, e.g. {split_json / SSV2_SPLITS['train']}")
    if not_a_file(labels_json) == "does not exist":
        raise FileNotFoundError(f"SSv2 labels file {labels_json} does not exist: {SSV2_LABELS_FIX}")
    _refuse_non_file(labels_json, "SSv2 labels file", f"name the file, e.g. {labels_json / SSV2_LABELS}")
    labels = _ssv2_labels(labels_json)
    items = _json(split_json, list, "a JSON list of {'id': ..., 'template': ...} objects")
    listing = _Listing()
    for n, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item or "template" not in item:
            raise ValueError(f"{split_json}: entry {n} has no 'id'/'template': {repr(item)[:200]}"
                             + ("; SSv2's test JSON lists ids only (its labels are not public): the test split "
                                "reads the validation JSON, as the original did" if isinstance(item, dict)
                                and "id" in item and "template" not in item else ""))
        if not _video_id(item["id"]):
            raise ValueError(f"{split_json}: entry {n} has id {json.dumps(item['id'])[:80]}; expected the video's "
                             "id, an integer or a name (e.g. \"78687\"): its video is {id}" + ext)
        if not isinstance(item["template"], str):
            raise ValueError(f"{split_json}: entry {n} (id {item['id']}) has template {item['template']!r}; expected "
                             "the class's text, e.g. \"Pushing [something] from left to right\"")
        template = item["template"].replace("[", "").replace("]", "")
        if template not in labels:
            raise ValueError(f"{split_json}: entry {n} (id {item['id']}) has template {template!r}, which is not in "
                             f"{labels_json}")
        where = f"{split_json}: entry {n} (id {item['id']})"
        label = _label(labels[template], where, "a template", num_classes)
        listing.add(VideoEntry(str(Path(video_dir) / f"{item['id']}{ext}"), label, str(item["id"])), where)
    return listing.entries


def read_entries(path: str | Path, fmt: str = "kinetics", *, separator: str = " ", path_prefix: str = "",
                 ssv2_labels: str | Path = "", ssv2_suffix: str = ".webm", num_classes: int = 0) -> list[VideoEntry]:
    """The videos listed by the manifest ``path`` in format ``fmt``: the one manifest parser.

    Args:
        fmt: ``kinetics`` (``path<separator>label`` lines), ``csv`` (``path,label``, optional header) or ``ssv2``
            (the split JSON).
        separator: the Kinetics field separator (``data.separator``).
        path_prefix: joined before every Kinetics/CSV path; for SSv2 the folder of the ``{id}.webm`` videos
            (default: the split JSON's folder).
        ssv2_labels: the SSv2 labels JSON (default: ``something-something-v2-labels.json`` beside the split JSON).
        ssv2_suffix: SSv2 videos are ``{id}{ssv2_suffix}`` (``data.ssv2_suffix``); "" names folders of frames.
        num_classes: labels must be below it (``model.num_classes``); 0 = not checked.

    Raises:
        FileNotFoundError: the manifest (or the SSv2 labels file) does not exist.
        ValueError: an unknown format, a manifest that is not a file (a folder: the file to name), a malformed line
            or entry (file:line and what was expected), a label not in digits or out of range, a video listed twice
            (under any spelling of its path) with different labels, or no videos.
    """
    path = Path(path)
    if fmt == "kinetics":
        entries = read_kinetics(path, separator, path_prefix, num_classes)
    elif fmt == "csv":
        entries = read_csv(path, path_prefix, num_classes)
    elif fmt == "ssv2":
        entries = read_ssv2(path, ssv2_labels or path.parent / SSV2_LABELS, path_prefix or path.parent, ssv2_suffix,
                            num_classes=num_classes)
    else:
        raise ValueError(f"manifest format {fmt!r}; choose from {list(MANIFEST_FORMATS)}")
    if not entries:
        raise ValueError(f"manifest {path} lists no videos")
    return entries


def _separator(text: str) -> str:
    """``--separator``'s value: refused when empty (``str.split`` takes no empty separator)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; use ' ' (whitespace, as in Kinetics lists) or ',' (or --format csv "
                                         "for comma-separated files)")
    return text


def add_manifest_arguments(parser: argparse.ArgumentParser) -> None:
    """The manifest argument and options of every CLI that reads one (what ``read_entries`` takes)."""
    parser.add_argument("manifest", help="Kinetics-style 'path label' list, plain CSV, or SSv2 split JSON")
    parser.add_argument("--format", choices=MANIFEST_FORMATS, default="kinetics")
    parser.add_argument("--separator", default=" ", type=_separator,
                        help="Kinetics manifest separator (data.separator)")
    parser.add_argument("--path-prefix", default="", help="joined before every manifest path (data.path_prefix); "
                        "SSv2: the folder of the {id}.webm videos (default: the split JSON's folder)")
    parser.add_argument("--ssv2-labels", default="", help="SSv2 labels JSON (default: "
                        f"{SSV2_LABELS} beside the split JSON)")
    parser.add_argument("--ssv2-suffix", default=".webm", help="SSv2 videos are {id}SUFFIX (data.ssv2_suffix); '' "
                        "for folders of JPEG frames named {id}")


def manifest_cli_hint(message: str) -> str:
    """``message`` with the config keys a manifest error's fix names replaced by ``add_manifest_arguments``' flags
    (``MANIFEST_CLI_HINTS``)."""
    for key, flag in MANIFEST_CLI_HINTS:
        message = message.replace(key, flag)
    return message


def manifest_path(cfg: DataConfig, split: str) -> Path:
    """The file listing ``split``: ``data.{split}_manifest`` if set, else the format's default under ``data.root``."""
    explicit = getattr(cfg, f"{split}_manifest")
    if explicit:
        return Path(explicit)
    if cfg.format == "ssv2":
        return Path(cfg.root) / SSV2_SPLITS[split]
    return Path(cfg.root) / f"{split}.csv"


def read_manifest(cfg: DataConfig, split: str, num_classes: int = 0) -> list[VideoEntry]:
    """The videos of ``split`` (train | val | test) as configured by ``data.format``; labels checked against
    ``num_classes`` (``model.num_classes``) when it is given."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r}; choose from ['train', 'val', 'test']")
    path = manifest_path(cfg, split)
    example = path / (SSV2_SPLITS[split] if cfg.format == "ssv2" else f"{split}.csv")
    try:
        _refuse_non_file(path, "manifest", f"set data.{split}_manifest to the file, e.g. {example}")
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {path} does not exist: set data.root (now {cfg.root!r}; a relative path is "
                                f"from the current folder, {Path.cwd()}) or data.{split}_manifest") from None
    # An SSv2 dataset's videos and labels file sit under data.root by default, wherever the split file is.
    prefix = cfg.path_prefix or (cfg.root if cfg.format == "ssv2" else "")
    entries = read_entries(path, cfg.format, separator=cfg.separator, path_prefix=prefix,
                           ssv2_labels=cfg.ssv2_labels or Path(cfg.root) / SSV2_LABELS, ssv2_suffix=cfg.ssv2_suffix,
                           num_classes=num_classes)
    logger.info("%s: %d videos (%s format)", path, len(entries), cfg.format)
    return entries


def ssv2_class_names(cfg: DataConfig) -> list[str] | None:
    """The class names an SSv2 labels file holds (its templates, in id order), when its ids are exactly 0..N-1; None
    otherwise, or for another format, or when the file cannot be read (the manifest reader names what is wrong)."""
    if cfg.format != "ssv2":
        return None
    try:
        labels = _ssv2_labels(Path(cfg.ssv2_labels or Path(cfg.root) / SSV2_LABELS))
    except (OSError, ValueError):
        return None
    by_id = {int(value): template for template, value in labels.items()}
    return [by_id[i] for i in range(len(by_id))] if set(by_id) == set(range(len(by_id))) else None
