"""The DALI loader's clip streams: made off the training thread, read with one ``os.pread`` per keyframe run, H.264
cut as Annex-B byte streams in IVF and HEVC, AV1, MPEG-4 Part 2 and H.264 with 2-byte NAL length prefixes cut into
hand-written Matroska instead of a PyAV remux (no container opened per clip), decoding to the file's own frames;
what the cuts cannot serve is still remuxed."""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import threading
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pytest
import torch

from conftest import textured_frames
from timesformer_harness.config import REPO_ROOT
from timesformer_harness.pipelines import dali, packets
from timesformer_harness.pipelines.config import DataConfig
from timesformer_harness.pipelines.factory import build_loader
from timesformer_harness.pipelines.packets import (PacketIndex, PacketPlan, clip_stream, feed_mode, index_packets,
                                                  plan_packets)
from timesformer_harness.pipelines.sampling import ClipPlan
from timesformer_harness.pipelines.tools.encode import write_video

VP9 = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0", "g": "8"}
NAL_FILES = {  # name -> (encoder, options): B-frames (decode order != display order), GOP 32 as prepare makes it
    "h264_bframes": ("libx264", {"preset": "ultrafast", "g": "16", "bf": "2", "crf": "18"}),
    "h264_gop32": ("libx264", {"preset": "fast", "crf": "23", "g": "32", "keyint_min": "32"}),
    "hevc_open_gop": ("libx265", {"preset": "ultrafast",
                                  "x265-params": "log-level=error:keyint=16:min-keyint=16:open-gop=1:bframes=3:"
                                                 "scenecut=0"}),
    "hevc_bframes": ("libx265", {"preset": "ultrafast",
                                 "x265-params": "log-level=error:keyint=16:min-keyint=16:open-gop=0:bframes=3:"
                                                "scenecut=0"}),
    "av1": ("libsvtav1", {"preset": "10", "g": "16"}),
    "mpeg4_bframes": ("mpeg4", {"g": "16", "bf": "2"}),
}
CUT = ["h264_bframes", "h264_gop32"]
MATROSKA = ["hevc_bframes", "hevc_open_gop", "av1", "mpeg4_bframes", "h264_2byte"]  # h264_2byte: _two_byte_copy
CLIPS = ([20, 21, 40, 63], [5, 40, 41], [33, 33, 18], [16, 17, 48], [0, 63, 100], list(range(0, 64, 8)))


@pytest.fixture(scope="module")
def nal_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("nal")
    out = {}
    for seed, (name, (encoder, options)) in enumerate(NAL_FILES.items()):
        if encoder in av.codecs_available:
            out[name] = str(write_video(folder / f"{name}.mp4", textured_frames(64, 64, 64, seed), encoder, 30,
                                        options))
    return out


def _nal_file(nal_files: dict[str, str], name: str) -> str:
    if name == "h264_2byte":
        return _two_byte_copy(_nal_file(nal_files, "h264_bframes"))
    if name not in nal_files:
        pytest.skip(f"this PyAV build has no {NAL_FILES[name][0]} encoder")
    return nal_files[name]


def _two_byte_copy(path: str) -> str:
    """A copy of the H.264 MP4 ``path`` whose NAL units have 2-byte length prefixes (avcC lengthSizeMinusOne 1), the
    same packets otherwise (x264 writes 4-byte ones; MP4 and Matroska allow 1, 2 or 4)."""
    out = path.replace(".mp4", "_2byte.mp4")
    if os.path.exists(out):
        return out

    def shorter(payload: bytes) -> bytes:
        units, at = [], 0
        while at < len(payload):
            n = int.from_bytes(payload[at:at + 4], "big")
            units.append(n.to_bytes(2, "big") + payload[at + 4:at + 4 + n])
            at += 4 + n
        return b"".join(units)

    with av.open(path) as src, av.open(out, "w") as dst:
        s = src.streams.video[0]
        o = dst.add_stream_from_template(s)
        extradata = bytearray(s.codec_context.extradata)
        extradata[4] = (extradata[4] & 0xFC) | 1
        o.codec_context.extradata = bytes(extradata)
        for p in src.demux(s):
            if p.size:
                q = av.Packet(shorter(bytes(p)))
                q.pts, q.dts, q.time_base, q.is_keyframe, q.stream = p.pts, p.dts, p.time_base, p.is_keyframe, o
                dst.mux(q)
    return out


def _decode(data: bytes, fmt: str) -> np.ndarray:
    with av.open(io.BytesIO(data), format=fmt) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _demuxed(path: str) -> list[bytes]:
    """The payloads of ``path``'s video packets, in decode order, as PyAV demuxes them."""
    with av.open(path) as c:
        return [bytes(p) for p in c.demux(video=0) if p.size]


def _gpu_clip_streams(index: PacketIndex, path: str,
                      opens: Opens) -> Iterator[tuple[list[int], PacketPlan, np.ndarray, dict[str, int]]]:
    """(frames, plan, stream, stats) for each of ``CLIPS``: the GPU backend's clip stream of ``path``, checked to be fed
    as a ``stream`` (the whole file on the CPU) and made without opening a PyAV container (``opens``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for frames in CLIPS:
            plan = plan_packets(index, frames)
            assert feed_mode(index, plan, "gpu") == ("stream", "")
            assert feed_mode(index, plan, "cpu")[0] == "file"
            before, stats = opens.count, {}
            stream = clip_stream(index, plan, fd, stats)
            assert opens.count == before, frames  # no container per clip
            yield frames, plan, stream, stats
    finally:
        os.close(fd)


def _ivf_frames(stream: np.ndarray) -> list[tuple[int, bytes]]:
    """(pts, payload) of each frame of an IVF stream."""
    data, at, out = stream.tobytes(), 32, []
    while at < len(data):
        size, pts = struct.unpack_from("<IQ", data, at)
        out.append((pts, data[at + 12:at + 12 + size]))
        at += 12 + size
    return out


class Opens:
    """Counts ``av.open`` calls (PyAV containers opened)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count, real = 0, av.open

        def counting(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(av, "open", counting)


def test_vp9_clip_streams_are_the_demuxed_packets_read_once_per_keyframe_run(tmp_path, monkeypatch) -> None:
    """A VP9 clip stream is, byte for byte, IVF around the packets PyAV demuxes (pts 0, 1, 2, ...: the stream the
    loader fed before), read with exactly one ``os.pread`` per keyframe run covering exactly the runs' bytes, and no
    PyAV container is opened."""
    path = str(write_video(tmp_path / "gop8.webm", textured_frames(64, 48, 64, 3), "libvpx-vp9", 30, VP9))
    index = index_packets(path)
    assert index.keyframes == list(range(0, 64, 8)) and index.verbatim
    demuxed = _demuxed(path)
    opens = Opens(monkeypatch)
    fd = os.open(path, os.O_RDONLY)
    try:
        for frames in CLIPS:
            plan = plan_packets(index, frames)
            stats: dict[str, int] = {}
            stream = clip_stream(index, plan, fd, stats)
            want = [struct.pack("<4sHH4sHHIIII", b"DKIF", 0, 32, b"VP90", 64, 48, 30, 1, len(plan.packets), 0)]
            for i, d in enumerate(plan.packets):
                want += [struct.pack("<IQ", len(demuxed[d]), i), demuxed[d]]
            assert stream.tobytes() == b"".join(want), frames
            runs = np.split(plan.packets, plan.segments[1:])
            spans = sum(int(index.offset[r[-1]] + index.size[r[-1]] - index.offset[r[0]]) for r in runs)
            assert stats == {"preads": len(plan.segments), "bytes_read": spans}, frames
            assert len(plan.segments) > 1  # the clips span several keyframe runs
    finally:
        os.close(fd)
    assert opens.count == 0


@pytest.mark.parametrize("name", CUT)
def test_annexb_clip_streams_decode_to_the_files_frames(nal_files, name, monkeypatch) -> None:
    """H.264 on the GPU backend: the clip stream is IVF (fourcc H264) around an Annex-B byte stream (SPS/PPS from
    the avcC record before each keyframe run, length prefixes turned into start codes), made without opening a PyAV
    container. Decoded by PyAV (libavformat's IVF demuxer and the H.264 decoder: the demuxing DALI's decoder opens
    in-memory streams with), and as a raw Annex-B stream (``format='h264'``), it gives exactly the original file's
    frames at the planned positions, with B-frames; the frames' pts are their display positions."""
    path = _nal_file(nal_files, name)
    index = index_packets(path)
    assert index.verbatim and index.extradata[0] == 1  # avcC: 4-byte length-prefixed NAL units
    every = _decode(Path(path).read_bytes(), "mp4")
    opens = Opens(monkeypatch)
    for frames, plan, stream, _ in _gpu_clip_streams(index, path, opens):
        want = every[np.minimum(frames, index.num_frames - 1)]
        ivf = _decode(stream.tobytes(), "ivf")
        assert len(ivf) == len(plan.packets) and np.array_equal(ivf[plan.frames[plan.order]], want), frames
        raw = b"".join(p for _, p in _ivf_frames(stream))
        assert np.array_equal(_decode(raw, "h264")[plan.frames[plan.order]], want), frames
        with av.open(io.BytesIO(stream.tobytes()), format="ivf") as c:
            assert [f.pts for f in c.decode(video=0)] == list(range(len(plan.packets)))
    assert opens.count == 3 * len(CLIPS)  # the test's own three decodes per clip, no other


@pytest.mark.parametrize("name", MATROSKA)
def test_matroska_clip_streams_decode_to_the_files_frames(nal_files, name, monkeypatch) -> None:
    """HEVC (closed GOP with B-frames, and open GOP), AV1, MPEG-4 Part 2 with B-frames and H.264 with 2-byte NAL length
    prefixes on the GPU backend: the clip stream is Matroska written from byte ranges of the file (one ``os.pread``
    per keyframe run, no PyAV container opened), whose demuxed packets are the plan's packets, verbatim, with the
    planned display positions as pts and the file's key flags; the file's extradata is the track's CodecPrivate.
    PyAV (libavformat's Matroska demuxer, FFmpeg's decoders) decodes it to exactly the original file's frames at the
    planned positions."""
    path = _nal_file(nal_files, name)
    index = index_packets(path)
    assert index.verbatim and packets.stream_format(index) == ("matroska", "")
    assert not np.array_equal(index.display, np.arange(64)) or name == "av1"  # B-frames: decode order != display
    every = _decode(Path(path).read_bytes(), "mp4")
    demuxed = _demuxed(path)
    opens = Opens(monkeypatch)
    for frames, plan, stream, stats in _gpu_clip_streams(index, path, opens):
        stream = stream.tobytes()
        assert stats["preads"] == len(plan.segments), frames
        with av.open(io.BytesIO(stream), format="matroska") as c:
            track = c.streams.video[0]
            assert (track.codec_context.codec.canonical_name, track.width, track.height) == (index.codec, 64, 64)
            assert bytes(track.codec_context.extradata) == index.extradata and track.average_rate == 30
            assert abs(c.duration / 1e6 - len(plan.packets) / 30) < 1e-3  # Info's Duration, in frames
            got = [(bytes(p), p.pts, p.is_keyframe) for p in c.demux(track) if p.size]
        assert [g[0] for g in got] == [demuxed[d] for d in plan.packets], frames
        assert [g[1] for g in got] == plan.pts.tolist(), frames
        assert [g[2] for g in got] == index.key[plan.packets].tolist(), frames
        out = _decode(stream, "matroska")
        assert len(out) == len(plan.packets), frames  # no leading picture left without its references
        assert np.array_equal(out[plan.frames[plan.order]], every[np.minimum(frames, index.num_frames - 1)]), frames
    assert opens.count == 2 * len(CLIPS)  # the test's own demux and decode per clip, no other


def test_matroska_clusters_keep_block_timestamps_within_int16(nal_files) -> None:
    """Timestamps a cluster's signed 16-bit relative block timestamps cannot reach (a clip stream of a 5000x longer
    frame scale, B-frames: some blocks earlier than their cluster's first) start new clusters; libavformat's
    demuxer reads back every packet's pts exactly."""
    path = _nal_file(nal_files, "hevc_bframes")
    index = index_packets(path)
    plan = plan_packets(index, [20, 21, 40, 63])
    far = replace(plan, pts=plan.pts * 5000)
    firsts = packets.mkv.cluster_firsts(far.pts, far.segments)
    clusters = len(np.unique(firsts))
    assert clusters > len(far.segments)
    fd = os.open(path, os.O_RDONLY)
    try:
        stream = packets.matroska_stream(index, far, fd).tobytes()
    finally:
        os.close(fd)
    with av.open(io.BytesIO(stream), format="matroska") as c:
        assert [p.pts for p in c.demux(video=0) if p.size] == far.pts.tolist()
    assert stream.count(b"\x1f\x43\xb6\x75") == clusters  # Cluster IDs
    rel = far.pts - far.pts[firsts]
    assert rel.min() < 0 and rel.max() <= 32767  # a B-frame before its cluster's first block: negative, in range


def test_what_the_cuts_cannot_serve_is_remuxed(nal_files, tmp_path, monkeypatch) -> None:
    """The remux (two PyAV containers per clip: the file and the Matroska output) stays, on the GPU, for what the
    cuts cannot serve, and says why: H.264 whose extradata is neither an avcC record nor Annex-B, HEVC whose
    extradata is not an hvcC record, and payloads that are not byte ranges of the file (HEVC, H.264). What they can
    serve is cut: H.264 with 2-byte NAL length prefixes and MPEG-4 Part 2 go to Matroska; on the CPU backend every
    codec but VP8/VP9/MJPEG is fed whole (DALI's CPU decoder has no other)."""
    path = _nal_file(nal_files, "h264_bframes")
    index = index_packets(path)
    plan = plan_packets(index, [40, 41])
    two_byte = bytearray(index.extradata)
    two_byte[4] = (two_byte[4] & 0xFC) | 1
    assert packets.stream_format(replace(index, extradata=bytes(two_byte))) == ("matroska", "")
    mode, why = feed_mode(replace(index, extradata=b"\x02junk"), plan, "gpu")
    assert mode == "remux" and why.startswith(f"{path}: cannot read the h264 parameter sets from its extradata")
    with pytest.raises(ValueError, match="cannot cut a clip stream: .* neither an avcC record nor Annex-B"):
        clip_stream(replace(index, extradata=b"\x02junk"), plan, 0)
    with pytest.raises(ValueError, match="neither an avcC record nor Annex-B NAL units"):
        packets.nal_layout(replace(index, extradata=b""))
    hevc = index_packets(_nal_file(nal_files, "hevc_bframes"))
    annexb = replace(hevc, extradata=b"\0\0\0\1\x40\x01")  # a VPS NAL unit header, Annex-B: a raw stream's extradata
    assert feed_mode(annexb, plan_packets(annexb, [40, 41]), "gpu") == (
        "remux", "its hevc extradata is not an hvcC record (Matroska's CodecPrivate)")
    for name in ("h264_bframes", "hevc_bframes"):
        nindex = index_packets(_nal_file(nal_files, name))
        framed = replace(nindex, offset=np.full_like(nindex.offset, -1))
        assert feed_mode(framed, plan_packets(framed, [40, 41]), "gpu") == (
            "remux", f"its {nindex.codec} payloads are not stored verbatim in the file (container framing)")
    opens = Opens(monkeypatch)
    remuxed = packets.remux_packets(index, plan)
    assert opens.count == 2 and len(_decode(remuxed, "matroska")) == len(plan.packets)
    mpeg4 = str(write_video(tmp_path / "mpeg4_gop8.mp4", textured_frames(48, 48, 64, 2), "mpeg4", 30,
                            {"g": "8"}))
    mindex = index_packets(mpeg4)
    assert feed_mode(mindex, plan_packets(mindex, [40, 41]), "gpu") == ("stream", "")
    for i in (index, mindex):
        assert feed_mode(i, plan, "cpu") == ("file",
                                             f"no CPU decoder for {i.codec} in DALI (the pre-flight check rejects it)")


def test_dali_cpu_decoder_reads_the_matroska_writer_like_ivf(tmp_path, monkeypatch) -> None:
    """The Matroska writer as DALI's demuxer reads it (DALI's CPU decoder has no HEVC, AV1, MPEG-4 or H.264, so VP9
    stands in): VP9 clips across several keyframe runs, written by ``matroska_stream`` (V_VP9) instead of
    ``ivf_stream``, through the loader's own decode graph (``fn.decoders.video``, device cpu, ``frames=`` the planned
    positions) give exactly the frames the IVF streams give: DALI accepts the hand-written Matroska and orders the
    frames by its block timestamps."""
    paths = [str(write_video(tmp_path / f"gop8_{i}.webm", textured_frames(64, 48, 64, i), "libvpx-vp9", 30, VP9))
             for i in range(2)]
    plans = [ClipPlan(i, p, 0, np.asarray(frames), (0, 0, 48, 64)) for i, p in enumerate(paths) for frames in CLIPS]
    batch = len(CLIPS)
    written: list[bytes] = []

    def decoded() -> list[np.ndarray]:
        source = dali.PlanSource(batch, decode_only=True, prefetch=0)
        pipe = dali.build_video_pipeline(source, batch_size=batch, crop=32, mean=[0.0] * 3, std=[1.0] * 3,
                                         num_threads=2, decode_only=True)
        pipe.build()
        source.start(plans)
        out = [np.array(x) for _ in range(len(plans) // batch) for x in pipe.run()[0]]
        source.close()
        return out

    ivf = decoded()

    def matroska(index, plan, fd, stats=None):
        data = packets.matroska_stream(index, plan, fd, stats)
        written.append(data.tobytes())
        return data

    monkeypatch.setattr(dali, "clip_stream", matroska)
    mkv = decoded()
    assert len(written) == len(plans) and all(w.startswith(b"\x1a\x45\xdf\xa3") for w in written)
    assert all(b"V_VP9" in w for w in written)
    assert len(mkv) == len(ivf) == len(plans)
    for plan, a, b in zip(plans, ivf, mkv):
        assert a.shape == (len(plan.frames), 48, 64, 3) and np.array_equal(a, b), plan.frames


def test_annexb_extradata_is_used_as_it_is(nal_files) -> None:
    """A file whose extradata is Annex-B already (MPEG-TS, raw streams): its parameter sets are that extradata and
    its payloads are left as they are (length 0)."""
    index = index_packets(_nal_file(nal_files, "h264_bframes"))
    params, length_size = packets.nal_layout(index)
    assert length_size == 4 and params.startswith(packets.START_CODE) and params.count(packets.START_CODE) == 2
    assert packets.nal_layout(replace(index, extradata=params)) == (params, 0)


def _toy_cfg(tmp_path: Path, num: int = 24, **kw) -> DataConfig:
    toy = REPO_ROOT / "data" / "toy"
    if not (toy / "train.csv").exists():
        pytest.skip("no toy dataset: run `make data`")
    manifest = tmp_path / "train.csv"
    lines = (toy / "train.csv").read_text().splitlines()[:num]
    manifest.write_text("".join(f"{toy / line}\n" for line in lines))
    base = DataConfig(loader="dali", backend="cpu", root=str(toy), train_manifest=str(manifest), num_frames=8,
                      sampling_rate=3, target_fps=30, train_jitter_scales=[32, 40], train_crop_size=32, batch_size=4,
                      num_workers=2, validate_cache="none")
    return replace(base, **kw)


def test_clip_streams_are_made_off_the_training_thread(tmp_path, monkeypatch, caplog) -> None:
    """A real DALI CPU pipeline over toy VP9 videos: every clip stream of the epoch is made on the source's worker
    thread, none on the thread that iterates the loader (where DALI calls the source), in this process; the epoch's
    log line gives the worker's CPU ms and the callback's ms per clip; the batches are bit for bit those of the same
    graph fed by a source that makes the streams in the callback (the loader's old path), whose streams were made on
    the calling thread. The packet indexes are stored in SQLite, written from the worker."""
    made: list[tuple[int, int, str]] = []
    calls: list[int] = []
    real_stream, real_call = dali.clip_stream, dali.PlanSource.__call__

    def recording_stream(*args, **kwargs):
        made.append((threading.get_ident(), os.getpid(), threading.current_thread().name))
        return real_stream(*args, **kwargs)

    def recording_call(self):
        calls.append(threading.get_ident())
        return real_call(self)

    monkeypatch.setattr(dali, "clip_stream", recording_stream)
    monkeypatch.setattr(dali.PlanSource, "__call__", recording_call)
    cfg = _toy_cfg(tmp_path, validate_cache=str(tmp_path / "cache" / "validate.sqlite"))  # indexes in SQLite too
    loader = build_loader(cfg, "train", device="cpu")
    assert isinstance(loader, dali.DaliLoader) and loader.indexes.store.path == tmp_path / "cache" / "packets.sqlite"
    main = threading.get_ident()
    assert not any(loader.indexes.store.get(p.path) for p in loader.planner.plans(0))
    with caplog.at_level(logging.INFO, logger="timesformer_harness.pipelines.dali"):
        epoch = list(loader)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DALI fed 24 clips: vp9 stream 24")]
    costs = re.search(r"inputs made in ([\d.]+) CPU ms per clip by the source's worker, ([\d.]+) ms per clip in "
                      r"DALI's callback$", line)
    assert costs and float(costs[1]) > 0, line
    assert sum(b.video.shape[0] for b in epoch) == loader.num_clips == 24
    assert len(made) == 24 and calls and set(calls) == {main}
    assert all(ident != main and pid == os.getpid() and name.startswith("clip-inputs") for ident, pid, name in made)
    assert all(loader.indexes.store.get(p.path) for p in loader.planner.plans(0))  # stored by the worker

    made.clear()
    plans = loader.planner.plans(0)
    source = dali.PlanSource(cfg.batch_size, prefetch=0)
    pipe = dali.build_video_pipeline(source, batch_size=cfg.batch_size, crop=loader.crop, mean=cfg.mean, std=cfg.std,
                                     num_threads=2)
    pipe.build()
    source.start(plans)
    for i, batch in enumerate(epoch):
        (out,) = pipe.run()
        chunk = plans[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        old = dali.to_clips(out, chunk, backend="cpu", decode_only=False, frames_per_clip=0, crop=loader.crop,
                            mean=cfg.mean, std=cfg.std, device=torch.device("cpu"))
        assert torch.equal(batch.video, old), f"batch {i}"
        assert batch.index.tolist() == [p.index for p in chunk]
    source.close()
    assert len(made) == 24 and {ident for ident, _, _ in made} == {main}


def test_a_restarted_source_drops_the_batches_made_ahead(tmp_path) -> None:
    """``start`` while the worker holds batches made ahead for the previous plans: the next batch DALI gets is the
    new plans' first (the loader restarts its source this way after a decode failure); ``close`` stops the
    worker."""
    cfg = _toy_cfg(tmp_path, 16)
    loader = build_loader(cfg, "train", device="cpu")
    plans = loader.planner.plans(0)
    source = dali.PlanSource(4, decode_only=True, prefetch=3)
    source.start(plans)
    assert len(source.pending) == 3
    first = source()
    source.start(plans[8:])
    again = source()
    assert [len(x) for x in again] == [4, 4, 4] and list(source.queue)[-1].plans == plans[8:12]
    assert not np.array_equal(first[0][0], again[0][0]) or plans[0].path == plans[8].path
    source.close()
    assert source.worker is None and not source.pending and not source.fds
