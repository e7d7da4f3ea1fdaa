"""``make gpu-input``: the GPU input shoot-out prepares its files, runs its loader rows and end-to-end rows each in a
process of its own, skips what the device cannot run or the budget cannot fit, and judges the targets on a GPU only.
Rehearsed here at CPU size on real prepared files; the GPU run is ``make gpu-input``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from timesformer_harness.benchmarks import gpu_input
from timesformer_harness.pipelines.decode_rates import TABLE, load_rates

H264_SKIP = "H.264 rows run on a GPU only"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_input_data")  # the generated files, shared by the tests (prepare re-uses them)


def test_rehearsal_runs_the_rows_a_cpu_can_and_skips_the_h264_ones(tmp_path, data, capsys):
    table = tmp_path / "rates.yaml"  # the rehearsal's rows go to a table the test gives, never the shipped one
    shipped = TABLE.read_bytes()
    assert gpu_input.main(["--rehearse-on-cpu", "--out", str(tmp_path), "--data", str(data),
                           "--update-table", str(table)]) == 0
    assert TABLE.read_bytes() == shipped
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["row"]: r for r in results["rows"]}
    assert list(rows) == [r.name for r in gpu_input.ROWS]  # ROWS order, every row reported
    skipped = [name for name, r in rows.items() if r["status"] == "skipped"]
    assert skipped == ["dali-h264-gop32", "dali-mjpeg-nvjpeg", "e2e-h264-gop32", "pynvc-h264-gop32",
                       "dali-folders-nvjpeg", "dali-h264-long", "dali-hevc-gop32", "dali-h264-gop32-x2threads",
                       "dali-cpu-vp9-gop32", "e2e-h264-gop32-compiled"]
    assert all(rows[name]["message"].startswith(H264_SKIP) for name in skipped if "h264" in name)
    assert rows["dali-hevc-gop32"]["message"].startswith("HEVC rows run on a GPU only")
    assert rows["dali-mjpeg-nvjpeg"]["message"].startswith("nvJPEG rows run on a GPU only")
    assert rows["dali-folders-nvjpeg"]["message"].startswith("nvJPEG rows run on a GPU only")
    assert rows["dali-cpu-vp9-gop32"]["message"].startswith("a GPU host's row only")
    assert rows["e2e-h264-gop32-compiled"]["compile"] == "default"  # skipped, and still not called eager
    assert "| e2e-h264-gop32-compiled | h264-gop32 | compiled (default) | skipped" in \
        (tmp_path / "summary.md").read_text()
    ran = [name for name, r in rows.items() if r["status"] == "ok"]
    assert ran == ["dali-vp9-gop32", "dali-mjpeg", "e2e-mjpeg", "dali-vp9-long", "pyav-h264-gop32", "e2e-vp9-gop32",
                   "pyav-vp9-gop32", "dali-folders"]  # PyAV reads the H.264 files (made here too) on a CPU
    size = gpu_input.CPU_SIZE
    clips = size.videos * size.repeat
    for name in ("dali-vp9-gop32", "dali-mjpeg", "dali-vp9-long", "pyav-h264-gop32", "pyav-vp9-gop32", "dali-folders"):
        r = rows[name]
        assert r["clips_per_epoch"] == clips and r["decoded_clips"] == clips and r["delivered_frames"] == 8.0, r
        assert r["decoded_per_clip"] == r["decoded_model_per_clip"], r  # counted = the keyframe model
        assert r["clips_per_s"] > 0 and r["host_cpu_ms_per_clip"] > 0 and r["gpu_ms_per_clip"] is None, r
        assert r["steady_clips_per_s"] > 0 and r["steady_host_cpu_ms_per_clip"] > 0, r  # the epoch's start left out
        assert len(r["rounds_clips_per_s"]) == size.rounds and r["torch_threads"] >= 1
    assert (rows["dali-vp9-gop32"]["loader"], rows["dali-vp9-gop32"]["decode"]) == ("dali", "cpu")
    assert rows["dali-mjpeg"]["jpeg_frames"] and rows["dali-mjpeg"]["decoded_per_clip"] == 8.0  # intra-only
    assert rows["dali-folders"]["jpeg_frames"] and rows["dali-folders"]["decoded_per_clip"] == 8.0  # an image a frame
    assert rows["pyav-vp9-gop32"]["loader"] == "pyav" and rows["pyav-vp9-gop32"]["threads"] == 2 * size.threads
    # the same clips: PyAV decodes what DALI's clip streams decode; a long GOP decodes more per clip
    assert rows["pyav-vp9-gop32"]["decoded_per_clip"] == rows["dali-vp9-gop32"]["decoded_per_clip"]
    assert rows["dali-vp9-long"]["decoded_per_clip"] > rows["dali-vp9-gop32"]["decoded_per_clip"] > 8.0
    for name in ("e2e-mjpeg", "e2e-vp9-gop32"):
        r = rows[name]
        assert (r["loader"], r["decode"]) == ("dali", "cpu") and r["clips_per_s"] > 0, r
        assert 0.0 <= r["data_wait_pct"] <= 100.0
        assert r["record"]["suite"] == "e2e" and r["record"]["batch"] == size.batch
        assert (r["record"]["frames"], r["record"]["img_size"]) == (8, size.crop)
    assert results["meta"]["size"]["batch"] == size.batch and results["meta"]["device"] == "cpu"
    summary = (tmp_path / "summary.md").read_text()
    assert "| dali-mjpeg | mjpeg | dali | cpu, JPEG frames | 2 | ok |" in summary
    assert f"| dali-h264-gop32 | h264-gop32 | dali | - | 2 | skipped: {H264_SKIP}" in summary
    assert "- loader >= 200 clips/s on unprepared H.264 GOP 32: not judged on a CPU (" in summary  # PyAV's row ran
    assert "- loader >= 400 clips/s on at least one prepared format: not judged on a CPU (" in summary
    assert summary in capsys.readouterr().out
    prepared = sorted(p.name for p in data.iterdir())
    assert prepared == ["h264-gop32_48p", "jpeg-folders_48p", "mjpeg_48p", "source_48p", "vp9-gop32_48p",
                        "vp9-long_48p"]  # H.264 GOP 32 for the PyAV row only
    folders = sorted(p.name for p in (data / "jpeg-folders_48p").iterdir() if p.is_dir())
    assert folders == ["src000", "src001"]  # each the JPEG images of that MJPEG video
    assert len(list((data / "jpeg-folders_48p" / "src000").glob("*.jpg"))) == 300
    assert sorted(p.name for p in (data / "vp9-gop32_48p").glob("*.webm")) == ["src000.webm", "src001.webm"]
    # every loader row that ran, in the decode table's schema, as the GPU run writes its rows
    written = {(r.path, r.codec, r.gop): r for r in load_rates(table)}
    loaders = {name: r for name, r in rows.items() if r["status"] == "ok" and r["kind"] != "e2e"}
    assert sorted(written) == [("dali-cpu", "mjpeg", 1), ("dali-cpu", "vp9", 32), ("dali-cpu", "vp9", 250),
                               ("pyav", "h264", 32), ("pyav", "vp9", 32)] and len(loaders) == 6  # no folders: files
    sha, started = results["meta"]["env"]["git_sha"][:7], results["meta"]["started"]
    for name, (path, codec, gop) in {"dali-vp9-gop32": ("dali-cpu", "vp9", 32), "dali-mjpeg": ("dali-cpu", "mjpeg", 1),
                                     "dali-vp9-long": ("dali-cpu", "vp9", 250),
                                     "pyav-vp9-gop32": ("pyav", "vp9", 32),
                                     "pyav-h264-gop32": ("pyav", "h264", 32)}.items():
        r, w = rows[name], written[(path, codec, gop)]
        assert (w.generation, w.device, w.short_side, w.batch, w.threads) == (
            "cpu", results["meta"]["hardware"], size.height, size.batch, r["threads"]), w
        assert (w.clips_per_s, w.host_cpu_ms_per_clip) == (round(r["clips_per_s"], 1),
                                                           round(r["host_cpu_ms_per_clip"], 2)), w
        assert w.clip == f"8x32, crop {size.crop}" and w.source == str((tmp_path / "results.json").resolve())
        assert w.git_sha.startswith(sha) and w.date == f"{started[:4]}-{started[4:6]}-{started[6:8]}"


def test_a_row_that_does_not_fit_the_budget_is_skipped(tmp_path, data):
    assert gpu_input.main(["--rehearse-on-cpu", "--out", str(tmp_path), "--data", str(data), "--budget-s", "1",
                           "--rows", "dali-vp9-gop32"]) == 1  # nothing ran
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["status"] == "skipped" and row["message"].startswith("over budget")


def test_files_are_made_up_front_for_the_rows_the_estimates_fit_and_late_for_a_row_that_fits_after_all(
        tmp_path, data, monkeypatch):
    """The rows expected to run by the estimates have their files made in parallel before the first row; the files
    of a row not expected are not made then (on a lent GPU, encoding that no row uses), but are when the row comes
    and fits the time left after all."""
    rows = {r.name: r for r in gpu_input.ROWS}
    chosen = [rows[n] for n in ("dali-h264-gop32", "dali-mjpeg", "dali-hevc-gop32", "pyav-vp9-gop32")]
    none = {r.name: None for r in chosen}
    assert gpu_input.PREPARE_ESTIMATE_S + 30 + 30 + 40 <= 170 < gpu_input.PREPARE_ESTIMATE_S + 30 + 30 + 40 + 40
    assert gpu_input.expected_rows(chosen, none, 170, 1.0) == chosen[:3]
    assert gpu_input.expected_rows(chosen, {**none, "dali-mjpeg": "a reason"}, 170, 1.0) == [chosen[0], *chosen[2:]]
    assert gpu_input.expected_rows(chosen, none, 1e4, 1.0) == chosen

    monkeypatch.setattr(gpu_input, "PREPARE_ESTIMATE_S", 1e6)  # by the estimates no row fits: nothing made up front
    assert gpu_input.main(["--rehearse-on-cpu", "--out", str(tmp_path), "--data", str(data),
                           "--rows", "dali-vp9-gop32"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["rows"]
    assert row["status"] == "ok" and row["clips_per_s"] > 0
    assert list(results["meta"]["prepare"]) == ["late vp9-gop32"]  # made when the row came


def test_the_shipped_table_takes_no_rehearsal_rows(tmp_path, capsys):
    shipped = TABLE.read_bytes()
    with pytest.raises(SystemExit):
        gpu_input.main(["--rehearse-on-cpu", "--out", str(tmp_path), "--update-table"])
    assert "the shipped decode table holds GPU measurements only" in capsys.readouterr().err
    assert TABLE.read_bytes() == shipped and not (tmp_path / "results.json").exists()


def test_unknown_rows_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_input.main(["--rehearse-on-cpu", "--rows", "dali-av1"])
    assert "dali-av1" in capsys.readouterr().err


def test_targets_are_judged_on_a_gpu_only():
    rows = [{"row": "dali-mjpeg", "kind": "dali", "variant": "mjpeg", "status": "ok", "clips_per_s": 450.0,
             "host_cpu_ms_per_clip": 3.0},
            {"row": "dali-h264-gop32", "kind": "dali", "variant": "h264-gop32", "status": "ok", "clips_per_s": 150.0,
             "host_cpu_ms_per_clip": 1.0},
            {"row": "pyav-h264-gop32", "kind": "pyav", "variant": "h264-gop32", "status": "error",
             "clips_per_s": None},
            {"row": "e2e-mjpeg", "kind": "e2e", "variant": "mjpeg", "status": "ok", "data_wait_pct": 10.0},
            {"row": "e2e-h264-gop32", "kind": "e2e", "variant": "h264-gop32", "status": "oom",
             "data_wait_pct": None}]
    target = "end-to-end data wait < 10% (the lowest e2e row at the compiled step's rate; eager's without one)"
    on_gpu = dict(gpu_input.judge(rows, on_gpu=True))
    assert on_gpu["loader >= 400 clips/s on at least one prepared format"] == "met (450.00, dali-mjpeg)"
    assert on_gpu["loader >= 200 clips/s on unprepared H.264 GOP 32"] == "missed (150.00, dali-h264-gop32)"
    assert on_gpu["host CPU <= 2.5 ms per clip (the fastest loader row)"] == "missed (3.00, dali-mjpeg)"
    assert on_gpu[target] == "missed (10.00, e2e-mjpeg)"
    compiled = {"row": "e2e-h264-gop32-compiled", "kind": "e2e", "variant": "h264-gop32", "status": "ok",
                "compile": "default", "data_wait_pct": 12.0}  # the faster step waits longer: the figure judged
    assert dict(gpu_input.judge([*rows, compiled], on_gpu=True))[target] == "missed (12.00, e2e-h264-gop32-compiled)"
    on_cpu = dict(gpu_input.judge(rows, on_gpu=False))
    assert on_cpu["loader >= 400 clips/s on at least one prepared format"] == "not judged on a CPU (450.00, dali-mjpeg)"
    assert dict(gpu_input.judge(rows[2:3], on_gpu=True)) == {what: "not measured" for _, what in gpu_input.TARGETS}


def test_a_variant_that_cannot_be_made_fails_its_rows_only(tmp_path, data, monkeypatch):
    """prepare failing on one variant (an encoder the GPU host lacks, say) is that variant's rows' error; the
    others are prepared and run."""
    from timesformer_harness.pipelines.tools import prepare as prepare_module

    real = prepare_module.prepare

    def prepare(manifest, out, spec, **kwargs):
        if spec.gop == 250:
            raise RuntimeError("no libvpx-vp9 encoder in this FFmpeg")
        return real(manifest, out, spec, **kwargs)

    monkeypatch.setattr(prepare_module, "prepare", prepare)
    assert gpu_input.main(["--rehearse-on-cpu", "--out", str(tmp_path), "--data", str(data),
                           "--rows", "dali-vp9-long", "dali-mjpeg"]) == 1
    rows = {r["row"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["dali-vp9-long"]["status"] == "error"
    assert rows["dali-vp9-long"]["message"] == ("prepare vp9-long failed: RuntimeError: no libvpx-vp9 encoder in "
                                                "this FFmpeg")
    assert rows["dali-mjpeg"]["status"] == "ok" and rows["dali-mjpeg"]["clips_per_s"] > 0


def test_a_loader_epochs_steady_part_leaves_its_start_out():
    """``time_epoch``: clips/s and CPU from the first batch's arrival to the last's, and of the whole epoch."""
    import time
    from types import SimpleNamespace

    import torch

    class Loader:
        def set_epoch(self, epoch):
            assert epoch == 0

        def __iter__(self):
            time.sleep(0.3)  # the pipeline's start and first fill
            for _ in range(4):
                time.sleep(0.05)
                yield SimpleNamespace(video=torch.zeros(8, 1))

    t = gpu_input.time_epoch(Loader(), torch.device("cpu"))
    assert (t.clips, t.steady_clips) == (32, 24)
    assert 0.15 <= t.steady_seconds < 0.3 <= t.seconds
    assert t.steady_clips / t.steady_seconds > 1.5 * t.clips / t.seconds


def test_the_end_to_end_rows_steps_fit_one_epoch():
    for size in (gpu_input.GPU_SIZE, gpu_input.CPU_SIZE):
        clips = size.videos * size.e2e_repeat
        assert clips >= (gpu_input.WARMUP_BATCHES + size.e2e_batches) * size.batch > clips - size.videos
        assert size.videos * size.repeat >= 4 * size.batch  # a loader epoch has a steady part after its first batch


def test_jpeg_rows_need_nvimagecodec_and_nvjpeg_beside_dali(tmp_path, monkeypatch):
    """DALI decodes JPEG through nvImageCodec (and nvJPEG on the GPU), libraries loaded at run time: a DALI copied
    without them is caught before the rows run, with what is missing and the fix."""
    from timesformer_harness.pipelines import dali as factory

    why = factory.jpeg_libraries_missing(gpu=True, nvidia_dir=tmp_path)
    assert why.startswith("DALI's JPEG decoding needs nvImageCodec and nvJPEG: nvimgcodec/libnvimgcodec.so.0, ")
    assert "nvjpeg/lib/libnvjpeg.so.12" in why and "pip install nvidia-nvimgcodec-cu12[all]" in why
    for name in ("nvimgcodec/libnvimgcodec.so.0", "nvimgcodec/extensions/libjpeg_turbo_ext.so.0.9.0"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    assert factory.jpeg_libraries_missing(gpu=False, nvidia_dir=tmp_path) is None
    assert "libnvjpeg_ext" in factory.jpeg_libraries_missing(gpu=True, nvidia_dir=tmp_path)
    assert factory.jpeg_libraries_missing(gpu=True) is None  # pip's DALI brings them
    monkeypatch.setitem(factory.JPEG_LIBRARIES, "gpu", ("nvjpeg/lib/libnvjpeg.so.99",))
    rows = {r.name: r for r in gpu_input.ROWS}
    assert "libnvjpeg.so.99" in gpu_input.skip_reason(rows["dali-mjpeg-nvjpeg"], cuda=True, dali=True)
    assert "libnvjpeg.so.99" in gpu_input.skip_reason(rows["dali-folders-nvjpeg"], cuda=True, dali=True)
    assert gpu_input.skip_reason(rows["dali-mjpeg"], cuda=True, dali=True) is None  # libjpeg-turbo's only


def test_a_compiled_end_to_end_row_compiles_the_step(tmp_path, monkeypatch):
    """The compiled e2e row runs the bench's e2e case with its step compiled (the data wait at the model's own
    rate), and says so in its row; on a CPU it is skipped with the reason."""
    from types import SimpleNamespace

    from timesformer_harness.bench import sweep

    cases = []

    def run_case(case, timeout_s):
        cases.append(case)
        return SimpleNamespace(status="ok", message="", clips_per_s=10.0, to_dict=dict,
                               extra={"loader": "dali", "decode": "gpu", "data_wait_share": 0.05})

    monkeypatch.setattr(sweep, "run_case", run_case)
    row = {r.name: r for r in gpu_input.ROWS}["e2e-h264-gop32-compiled"]
    base, model, _, _ = gpu_input.model_settings(cuda=False)
    cfg = gpu_input.data_config(gpu_input.CPU_SIZE, tmp_path, tmp_path / "train.csv", 2)
    result = gpu_input.run_e2e(row, cfg, tmp_path, base, model, 3, timeout_s=60)
    assert cases[0].compile == "default" and cases[0].suite == "e2e" and cases[0].batches == 3
    assert result["compile"] == "default" and result["data_wait_pct"] == 5.0
    assert gpu_input.skip_reason(row, cuda=False, dali=True).startswith("H.264 rows run on a GPU only")
    vp9 = gpu_input.Row("e2e-vp9-compiled", "e2e", "vp9-gop32", compile="default")
    assert gpu_input.skip_reason(vp9, cuda=False, dali=True).startswith("compiled end-to-end rows run on a GPU only")


def test_what_each_row_needs():
    rows = {r.name: r for r in gpu_input.ROWS}
    without_dali = {name: gpu_input.skip_reason(row, cuda=True, dali=False) for name, row in rows.items()}
    assert sorted(n for n, why in without_dali.items() if why is None) == [
        "e2e-h264-gop32", "e2e-h264-gop32-compiled", "e2e-mjpeg", "e2e-vp9-gop32", "pyav-h264-gop32",
        "pyav-vp9-gop32"]  # e2e: PyAV feeds it
    assert without_dali["dali-mjpeg-nvjpeg"].startswith("DALI is not importable")
    with_dali = {name: gpu_input.skip_reason(row, cuda=True, dali=True) for name, row in rows.items()}
    assert {name: why for name, why in with_dali.items() if why is not None} == {
        "pynvc-h264-gop32": "PyNvVideoCodec is not installed here (pip install pynvvideocodec)"}
    assert gpu_input.skip_reason(rows["pyav-h264-gop32"], cuda=False, dali=True) is None  # PyAV: any machine
    assert gpu_input.skip_reason(rows["dali-h264-gop32"], cuda=False, dali=True).startswith(H264_SKIP)


def test_an_epochs_marks_wait_for_torchs_stream_not_the_device(monkeypatch):
    """A device-wide synchronise at the marks would also wait for DALI's streams decoding the next batches and move
    their time out of the steady part: the marks wait for torch's stream only."""
    from timesformer_harness import metrics

    waits = []
    monkeypatch.setattr(metrics, "synchronize", lambda device: pytest.fail("a device-wide synchronise"))
    monkeypatch.setattr(metrics, "synchronize_stream", lambda device: waits.append(device))
    batches = [SimpleNamespace(video=torch.zeros(2, 3)) for _ in range(3)]
    loader = type("Loader", (), {"set_epoch": lambda self, epoch: None, "__iter__": lambda self: iter(batches)})()
    timing = gpu_input.time_epoch(loader, torch.device("cpu"))
    assert timing.clips == 6 and timing.steady_clips == 4 and len(waits) == 2
