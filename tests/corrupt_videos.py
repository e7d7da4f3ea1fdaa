"""A seeded corpus of corrupted videos for the fault tests (a helper module, like ``crafted_checkpoints.py``).

Each corrupted copy of a good file gets one kind of damage, placed by the demuxer's packet offsets rather than
guessed from the file size: ``header`` is everything before the first packet's payload (EBML header, segment info,
tracks, the first cluster's header), and the coded stream ``[first payload, end of the last payload)`` is cut in
thirds, ``start`` / ``mid`` / ``end``.

* ``bitflip/<where>``: a few single-bit errors (a bad sector, a flaky copy);
* ``zero/<where>``: a zeroed block of 64-512 bytes (a hole left by an interrupted write);
* ``shuffle/<where>``: 2-8 chunks of 16-64 bytes in the wrong order (a bad reassembly of a download);
* ``truncate/<start|mid|end>``: the file cut inside that third (the download stopped early);
* ``payload/<start|mid|end>``: the first 8 bytes of one coded frame overwritten, the container intact: damage only a
  decoder sees, so it passes a header-and-packet-count check and then stops a loader;
* ``header_only``: the header without any coded frame;
* ``codec_id``: the codec named in the header replaced by one FFmpeg does not know.

The same good files, seed and count give the same bytes (``make_corrupt_corpus``).

``python tests/corrupt_videos.py [--seeds 10] [--out DIR]`` prints, per kind, how many files the probe and the deep
check flag, how many fail a test view over frames 0-21 (8 frames x rate 3) in the DALI and in the PyAV loader, how
many each loader quarantines over 3 training epochs, and how many decode without error (the table in
docs/bad_videos.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np

LOCATIONS = ("header", "start", "mid", "end")
STREAM = ("start", "mid", "end")
KINDS = (tuple(f"{k}/{loc}" for k in ("bitflip", "zero", "shuffle") for loc in LOCATIONS)
         + tuple(f"{k}/{loc}" for k in ("truncate", "payload") for loc in STREAM) + ("header_only", "codec_id"))
CODEC_IDS = (b"V_VP9", b"V_VP8", b"V_MPEG4/ISO/AVC", b"MJPG", b"avc1")  # Matroska CodecID; AVI / MP4 fourcc


class CorruptVideo(NamedTuple):
    """One corrupted copy: its path, the damage (``kind``, e.g. ``bitflip/mid``) and the good file it came from."""

    path: Path
    kind: str
    source: Path


@dataclass(frozen=True)
class Layout:
    """Byte ranges of a file: the header is ``[0, stream_start)``, the coded stream ``[stream_start, stream_end)``."""

    size: int
    stream_start: int
    stream_end: int
    packets: tuple[tuple[int, int], ...] = ()  # (offset, size) of each packet's payload, in file order

    def region(self, location: str) -> tuple[int, int]:
        """``[lo, hi)`` of the ``header`` or of a third (``start`` / ``mid`` / ``end``) of the coded stream."""
        if location == "header":
            return 0, self.stream_start
        third = (self.stream_end - self.stream_start) / 3
        k = STREAM.index(location)
        return self.stream_start + int(k * third), self.stream_start + int((k + 1) * third)


def file_layout(path: str | Path) -> Layout:
    """Where the coded stream of ``path`` starts and ends (found from the demuxed packets' payloads)."""
    data = Path(path).read_bytes()
    packets = []
    with av.open(str(path)) as container:
        for packet in container.demux(container.streams.video[0]):
            if packet.size == 0:
                continue
            payload = bytes(packet)
            at = data.find(payload, max(0, (packet.pos or 0) - 64))
            if at >= 0:
                packets.append((at, len(payload)))
    if not packets:
        raise ValueError(f"{path}: no video packet found; is it a good video?")
    packets.sort()
    return Layout(len(data), packets[0][0], max(at + n for at, n in packets), tuple(packets))


def corrupt_bytes(data: bytes, layout: Layout, kind: str, rng: np.random.Generator) -> bytes:
    """``data`` with the damage ``kind`` (one of ``KINDS``), drawn from ``rng``."""
    buf = bytearray(data)
    if kind == "header_only":
        return bytes(buf[:layout.stream_start])
    if kind == "codec_id":
        for name in CODEC_IDS:
            at = data.find(name, 0, layout.stream_start)
            if at >= 0:
                junk = rng.integers(ord("Q"), ord("Z") + 1, 3, dtype=np.uint8).tobytes()  # e.g. V_VP9 -> V_VXQ
                buf[at + len(name) - 3:at + len(name)] = junk
                return bytes(buf)
        raise ValueError(f"no known codec id in the header; knows {CODEC_IDS}")
    what, location = kind.split("/")
    lo, hi = layout.region(location)
    if hi - lo < 16:
        raise ValueError(f"the {location} region is only {hi - lo} bytes")
    if what == "bitflip":
        for pos in rng.integers(lo, hi, size=int(rng.integers(1, 9))):
            buf[pos] ^= 1 << int(rng.integers(8))
    elif what == "zero":
        n = min(hi - lo, int(rng.integers(64, 513)))
        at = int(rng.integers(lo, hi - n + 1))
        buf[at:at + n] = bytes(n)
    elif what == "shuffle":
        chunk = int(rng.integers(16, 65))
        count = max(2, min(8, (hi - lo) // chunk))
        at = int(rng.integers(lo, max(lo + 1, hi - chunk * count + 1)))
        parts = [bytes(buf[at + i * chunk:at + (i + 1) * chunk]) for i in range(count)]
        order = rng.permutation(count)
        if (order == np.arange(count)).all():
            order = np.roll(order, 1)
        buf[at:at + chunk * count] = b"".join(parts[i] for i in order)
    elif what == "truncate":
        return bytes(buf[:int(rng.integers(lo, hi))])
    elif what == "payload":
        inside = [(at, n) for at, n in layout.packets[1:] if lo <= at < hi and n >= 16]
        at, _ = inside[int(rng.integers(len(inside)))] if inside else layout.packets[-1]
        buf[at:at + 8] = rng.integers(0, 256, size=8, dtype=np.uint8).tobytes()
    else:
        raise ValueError(f"unknown damage {kind!r}; choose from {KINDS}")
    return bytes(buf)


def make_corrupt_corpus(good_files: list[str | Path], out_dir: str | Path, seed: int = 0, n: int = len(KINDS),
                        kinds: tuple[str, ...] = KINDS) -> list[CorruptVideo]:
    """``n`` corrupted copies of ``good_files`` in ``out_dir``: the kinds in turn (every kind once when
    ``n >= len(kinds)``), the good files in turn, the damage of copy ``i`` drawn from ``default_rng((seed, i))``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layouts = {Path(p): file_layout(p) for p in good_files}
    out = []
    for i, (kind, src) in enumerate(zip(itertools.islice(itertools.cycle(kinds), n), itertools.cycle(layouts))):
        data = corrupt_bytes(src.read_bytes(), layouts[src], kind, np.random.default_rng((seed, i)))
        path = out_dir / f"bad{i:03d}_{kind.replace('/', '_')}{src.suffix}"
        path.write_bytes(data)
        out.append(CorruptVideo(path, kind, src))
    return out


def outcome_table(root: Path, seeds: int) -> str:
    """The per-kind outcome table (markdown) of ``seeds`` corpora of one copy per kind, from 8 good 48x64 VP9 files."""
    import collections
    import logging

    from conftest import encode_video, textured_frames
    from timesformer_harness.pipelines.factory import build_loader
    from timesformer_harness.pipelines.config import DataConfig
    from timesformer_harness.pipelines.validate import deep_probe, probe_video

    logging.getLogger("timesformer_harness.pipelines").setLevel(logging.ERROR)
    good = [encode_video(root / f"good{i}.webm", textured_frames(24, 48, 64, seed=i), bitexact=True) for i in range(8)]
    assert not any(deep_probe(str(p)) for p in good), "the deep check flags a good file"
    count: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for seed in range(seeds):
        bad = make_corrupt_corpus(good, root / f"bad{seed}", seed=seed)
        manifest = root / f"seed{seed}.csv"
        manifest.write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate([*good, *(c.path for c in bad)])))
        common = dict(backend="cpu", train_manifest=str(manifest), test_manifest=str(manifest), sampling_rate=3,
                      train_jitter_scales=[40, 48], train_crop_size=32, test_crop_size=32, num_spatial_crops=1,
                      batch_size=4, num_workers=1, on_bad_video="skip", max_bad_fraction=1.0, validate_cache="none")
        fails, quarantined = {}, {}
        for loader in ("dali", "pyav"):
            test = build_loader(DataConfig(loader=loader, num_frames=8, **common), "test")  # 8 x 3: frames 0-21
            list(test)
            fails[loader] = {u.path for u in test.unscored}
            train = build_loader(DataConfig(loader=loader, num_frames=4, **common), "train")
            for epoch in range(3):
                train.set_epoch(epoch)
                list(train)
                train.quarantine.merge([train.quarantine.state()])
            quarantined[loader] = train.quarantine.paths()
        for c in bad:
            p, row = str(c.path), count[c.kind]
            probe, deep, failed = bool(probe_video(p).error), bool(deep_probe(p)), p in fails["dali"] | fails["pyav"]
            row.update(n=1, probe=probe, deep=deep, dali=p in fails["dali"], pyav=p in fails["pyav"],
                       q_dali=p in quarantined["dali"], q_pyav=p in quarantined["pyav"],
                       deep_missed=failed and not deep, decodes=not probe and not failed)
    cols = ["n", "probe", "deep", "dali", "pyav", "q_dali", "q_pyav", "deep_missed", "decodes"]
    total: collections.Counter = collections.Counter()
    lines = ["| kind | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for kind in KINDS:
        lines.append(f"| {kind} | " + " | ".join(str(count[kind][c]) for c in cols) + " |")
        total.update(count[kind])
    lines.append("| total | " + " | ".join(str(total[c]) for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, for pipelines
    parser = argparse.ArgumentParser(description="the per-kind outcome table of the corrupted-video corpus")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", default="", help="folder for the files (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print(outcome_table(folder, args.seeds))
