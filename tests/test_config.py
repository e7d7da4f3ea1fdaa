"""timesformer_harness.config: YAML + defaults lists + overrides, unknown keys, value checks, and the recipes in
configs/exp."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from timesformer_harness.config import ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parent.parent
EXP = REPO / "configs" / "exp"


def test_unknown_override_names_the_closest_key():
    with pytest.raises(KeyError, match=r"unknown config key 'solver.base_lrr' in command-line overrides; "
                                       r"did you mean 'solver.base_lr'\?"):
        load_config(None, ["solver.base_lrr=0.1"])


def test_a_key_in_the_wrong_section_names_the_section_it_is_in():
    for bad, hint in (("train.max_epoch", "'solver.max_epoch'"), ("train.base_lr", "'solver.base_lr'"),
                      ("train.batch_size", "'data.batch_size' (or 'test.batch_size', 'bench.batch_size')")):
        with pytest.raises(KeyError, match=rf"unknown config key '{bad}' in command-line overrides; did you mean "
                                           rf"{re.escape(hint)}\?$"):
            load_config(None, [f"{bad}=2"])


@pytest.mark.parametrize("given, bad, hint", [
    ("train.epochs", "train.epochs", "'solver.max_epoch'"),  # another trainer's name
    ("lr", "lr", "'solver.base_lr'"),
    ("solvr.base_lr", "solvr", "'solver'"),  # a misspelt section is named as a section
    ("solvr.base_lrr", "solvr", "'solver'"),
    ("model.frames", "model.frames", "'model.num_frames' (or 'bench.frames')"),  # its own section's near key first
])
def test_the_suggestion_is_the_key_meant(given, bad, hint):
    with pytest.raises(KeyError, match=rf"unknown config key '{bad}' in command-line overrides; did you mean "
                                       rf"{re.escape(hint)}\?$"):
        load_config(None, [f"{given}=2"])


def test_unknown_yaml_key_names_the_file_and_the_closest_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  eval_perod: 2\n")
    with pytest.raises(KeyError, match=rf"'train.eval_perod' in {bad}; did you mean 'train.eval_period'"):
        load_config(bad)


def test_bad_values_name_the_key_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"solver.optimizer='adam'; choose from \['sgd', 'adamw', 'lamb'\]"):
        load_config(None, ["solver.optimizer=adam"])
    with pytest.raises(ValueError, match=r"solver.steps=\[1, 11\] must start at epoch 0"):
        load_config(None, ["solver.steps=[1,11]", "solver.lrs=[1,0.1]"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(None, ["solver.base_lr"])
    # key= is the empty string (omegaconf alone reads None, which no key takes); a number key names its default
    assert load_config(None, ["data.ssv2_labels=x", "data.ssv2_labels="]).data.ssv2_labels == ""
    with pytest.raises(ValueError, match=r"data.num_frames: .*give a value like the default, data.num_frames=8"):
        load_config(None, ["data.num_frames="])


def test_an_override_that_is_not_yaml_is_named_with_a_shell_safe_fix():
    """``data.separator=','`` typed in a shell arrives as ``data.separator=,``: the error names that override among
    the others (it named none), and a fix the shell keeps as typed."""
    with pytest.raises(ValueError, match=r"^command-line overrides: 'data.separator=,': while parsing .*; a value is "
                                         r"YAML: quote it, and the override for the shell \(\"data.separator=','\"\)"):
        load_config(None, ["model.depth=2", "data.separator=,", "data.num_frames=4"])
    with pytest.raises(ValueError, match=r"^command-line overrides: 'data.train_jitter_scales=\[256,320': "):
        load_config(None, ["data.train_jitter_scales=[256,320"])
    assert load_config(None, ["data.separator=','"]).data.separator == ","


@pytest.mark.parametrize("override, message", [
    ("data.num_frames=0", "data.num_frames=0; must be >= 1"),
    ("data.sampling_rate=0", "data.sampling_rate=0; must be >= 1"),  # would repeat one frame T times
    ("data.target_fps=-30", "data.target_fps=-30; must be >= 1"),
    ("data.batch_size=0", "data.batch_size=0; must be >= 1"),
    ("test.batch_size=0", "test.batch_size=0; must be >= 1"),
    ("data.train_jitter_scales=[320,256]", r"data.train_jitter_scales=\[320, 256\]; give \[min, max\]"),
    ("data.std=[0.2,0,0.2]", r"data.std=\[0.2, 0.0, 0.2\]; give 3 values \(R, G, B\), every std > 0"),
    ("solver.max_epoch=0", "solver.max_epoch=0; must be >= 1"),
    ("train.keep_last=0", "train.keep_last=0; must be >= 1"),
    ("train.log_period=0", "train.log_period=0; must be >= 1"),  # a modulo by zero at the first step
    ("solver.label_smoothing=1.5", r"solver.label_smoothing=1.5; use a fraction in \[0, 1\)"),  # silently used
    ("solver.base_lr=-0.1", r"solver.base_lr=-0.1; give a finite learning rate >= 0"),  # torch's error, late
    ("solver.base_lr=nan", r"solver.base_lr=nan; give a finite learning rate >= 0"),
    ("solver.base_lr=inf", r"solver.base_lr=inf; give a finite learning rate >= 0"),
    ("solver.betas=[0.9]", r"solver.betas=\[0.9\]; give 2 values in \[0, 1\)"),  # an IndexError inside torch, late
    ("solver.betas=[0.9,1.0]", r"solver.betas=\[0.9, 1.0\]; give 2 values in \[0, 1\)"),
    ("solver.mixup_alpha=-1", "solver.mixup_alpha=-1.0; must be >= 0.0"),
    ("solver.steps=[0,14,11]", r"solver.steps=\[0, 14, 11\]: give the epochs each stage starts at in increasing"),
    ("bench.frames=[8,0]", r"bench.frames=\[8, 0\]: every value must be >= 1"),
    ("model.drop_path_rate=1.0", r"model.drop_path_rate=1.0; use a probability in \[0, 1\)"),  # NaN logits
    ("model.drop_path_rate=-0.2", r"model.drop_path_rate=-0.2; use a probability"),  # silently no stochastic depth
    ("model.attn_drop_rate=1.5", r"model.attn_drop_rate=1.5; use a probability"),  # torch's error, naming no key
    ("model.drop_rate=-0.1", r"model.drop_rate=-0.1; use a probability"),
])
def test_a_value_out_of_range_names_the_key_and_where_it_was_set(override, message, tmp_path):
    """One key per message, so that the error names the command line when the value came from it, not the file."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("solver:\n  max_epoch: 3\ntrain:\n  keep_last: 2\n")
    with pytest.raises(ValueError, match=rf"^command-line overrides: {message}"):
        load_config(recipe, [override])
    key, value = override.split("=")
    section, name = key.split(".")
    recipe.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ValueError, match=rf"^{recipe}: {message}"):
        load_config(recipe)


def test_a_yaml_boolean_for_a_word_key_is_refused_naming_the_key(tmp_path):
    """``yes``/``on``/``true`` are booleans in YAML: a key that takes a word says so instead of seeing 'True'."""
    for word in ("yes", "on", "true", "no"):
        with pytest.raises(ValueError, match=r"command-line overrides: train.resume=(True|False): YAML reads "
                                             r"yes/no/on/off/true/false as a boolean, .* \(default: train.resume=auto\)"):
            load_config(None, [f"train.resume={word}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  attention_type: on\n")
    with pytest.raises(ValueError, match=rf"{bad}: model.attention_type=True: YAML reads"):
        load_config(bad)
    assert load_config(None, ["train.compile=true"]).train.compile == "default"  # true/false mean something there
    assert load_config(None, ["train.resume=never"]).train.resume == "never"


def test_an_interpolation_resolves_against_the_merged_config(tmp_path, monkeypatch):
    """``${model.num_heads}`` on the command line and ``${model.attention_type}`` set by a ``defaults:`` file resolve
    against the whole config; one that cannot be resolved is one error naming the key and where it was set."""
    monkeypatch.setenv("HARNESS_TEST_ROOT", "envroot")
    monkeypatch.delenv("HARNESS_TEST_UNSET", raising=False)
    assert load_config(None, ["model.num_heads=4", "model.depth=${model.num_heads}"]).model.depth == 4
    (tmp_path / "base.yaml").write_text("model:\n  attention_type: joint_space_time\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("defaults: [base.yaml]\noutput:\n  dir: ${oc.env:HARNESS_TEST_ROOT}/${model.attention_type}\n")
    assert load_config(exp).output.dir == "envroot/joint_space_time"
    for bad, what in (("model.depth=${model.nope}", "Interpolation key 'model.nope' not found"),
                      ("output.dir=${foo}", "Interpolation key 'foo' not found"),
                      ("output.dir=${output.dir}", "Recursive interpolation detected"),
                      ("output.dir=${oc.env:HARNESS_TEST_UNSET}",
                       ".*Environment variable 'HARNESS_TEST_UNSET' not found")):
        with pytest.raises(ConfigError, match=rf"^command-line overrides: {re.escape(bad)}: {what}.*; an "
                                              r"interpolation names a key of the merged config"):
            load_config(exp, [bad])
    exp.write_text("defaults: [base.yaml]\noutput:\n  dir: runs/${model.attention_typo}\n")
    with pytest.raises(ConfigError, match=rf"^{exp}: output.dir=runs/\$\{{model.attention_typo\}}: Interpolation "):
        load_config(exp)


def test_one_element_of_a_list_is_refused_asking_for_the_whole_list(tmp_path):
    for override in ("data.mean.0=0.5", "data.mean[0]=0.5"):
        with pytest.raises(ConfigError, match=r"^command-line overrides: data.mean.0: one element of a list cannot be "
                                              r"set; give the whole list \(e.g. data.mean=\[0.45,0.45,0.45\]\)$"):
            load_config(None, [override])
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver:\n  betas:\n    1: 0.99\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: solver.betas.1: .* \(e.g. solver.betas=\[0.9,0.999\]\)$"):
        load_config(bad)
    assert load_config(None, ["data.mean=[0.5,0.45,0.45]"]).data.mean == [0.5, 0.45, 0.45]


def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, kind in (("42\n", "int"), ("0.5\n", "float"), ("true\n", "bool"), ("- model\n", "ListConfig")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=rf"^config {bad} holds a {kind}; a config is a mapping of sections"):
            load_config(bad)


def test_a_config_file_that_is_not_utf8_or_not_a_file_is_named(tmp_path):
    """Bytes that are not UTF-8 were a UnicodeDecodeError (a traceback, or an error without the file); a folder or a
    named pipe given as the config was "does not exist"."""
    bad = tmp_path / "b.yaml"
    bad.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ConfigError, match=rf"^config {bad} is not UTF-8 text \(byte 0: invalid start byte\); save it "
                                          r"as UTF-8$"):
        load_config(bad)
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "mine.yaml").write_text("model:\n  depth: 2\n")
    with pytest.raises(ConfigError, match=rf"^config {tmp_path}/cfgs is a folder, not a config file; name the YAML "
                                          rf"file, e.g. {tmp_path}/cfgs/mine.yaml$"):
        load_config(tmp_path / "cfgs")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ConfigError, match=rf"^config {tmp_path}/pipe is a named pipe, not a file"):
        load_config(tmp_path / "pipe")


def test_an_empty_separator_is_refused_at_load_naming_the_key(tmp_path):
    """data.separator= was accepted, then failed reading the manifest as "empty separator"."""
    fix = r"data.separator is empty; use ' ' \(whitespace, as in Kinetics lists\) or ','"
    with pytest.raises(ConfigError, match=rf"^command-line overrides: {fix}"):
        load_config(None, ["data.separator="])
    my = tmp_path / "my.yaml"
    my.write_text("data:\n  separator: ''\n")
    with pytest.raises(ConfigError, match=rf"^{my}: {fix}"):
        load_config(my)
    assert load_config(None, ["data.separator=;"]).data.separator == ";"


def test_an_empty_section_is_named_as_empty(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  # depth: 2\nsolver:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: section 'model' is empty; delete it, or give it keys \(e.g. "
                                          r"model.img_size=224\)$"):
        load_config(bad)


@pytest.mark.parametrize("key, text, number", [
    ("output.dir", "007", 7), ("output.dir", "12:30", 750), ("output.dir", "1e3", 1000.0),
    ("output.dir", "1_000", 1000), ("test.checkpoint", "0x10", 16), ("data.ssv2_suffix", ".10", 0.1),
])
def test_a_text_key_keeps_text_that_yaml_reads_as_a_number(key, text, number, tmp_path):
    """On the command line a string key keeps the text as typed; unquoted in a file (the text gone) it is refused,
    asking to quote it. The saved config quotes it, so that it reads back the same."""
    section, name = key.split(".")
    cfg = load_config(None, [f"{key}={text}"])
    assert getattr(getattr(cfg, section), name) == text
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert load_config(None, [f"{key}=x", f"{key}={text}", f"{key}={text}x"]) == load_config(None, [f"{key}={text}x"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"{section}:\n  {name}: {text}\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: {key}={number}: YAML reads this unquoted value as a number "
                                          rf".* and {key} takes text; quote it \({name}: '...'\)$"):
        load_config(bad)
    bad.write_text(f"{section}:\n  {name}: '{text}'\n")
    assert getattr(getattr(load_config(bad), section), name) == text


def test_a_boolean_key_takes_only_a_boolean(tmp_path):
    """omegaconf reads 2, 1 or the string '1' as True: a boolean key refuses them, naming the key."""
    for given, shown in (("2", "2"), ("1", "1"), ("0", "0"), ("'1'", "'1'"), ("1.0", "1.0")):
        with pytest.raises(ConfigError, match=rf"^command-line overrides: model.qkv_bias={shown}: model.qkv_bias "
                                              r"takes a boolean; give true or false$"):
            load_config(None, [f"model.qkv_bias={given}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  deterministic: 1\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: train.deterministic=1: train.deterministic takes a boolean"):
        load_config(bad)
    cfg = load_config(None, ["model.qkv_bias=false", "train.deterministic=true", "data.random_flip=no",
                             "model.grad_checkpointing=${train.deterministic}"])
    assert (cfg.model.qkv_bias, cfg.train.deterministic, cfg.data.random_flip, cfg.model.grad_checkpointing) == (
        False, True, False, True)


def test_defaults_list_merges_first_and_overrides_win(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  depth: 3\n  embed_dim: 96\n  num_heads: 4\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("defaults: [base.yaml]\nmodel:\n  depth: 5\n")
    cfg = load_config(exp, ["model.embed_dim=128"])
    assert (cfg.model.depth, cfg.model.embed_dim) == (5, 128)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(EXP / "k400_divst_8x32_224.yaml", ["solver.base_lr=0.01"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


# T, sampling rate, crop, attention, classes of the original TimeSformer configs (Kinetics-400, HR, L, SSv2).
RECIPES = {
    "k400_divst_8x32_224": (8, 32, 224, "divided_space_time", 400),
    "k400_jointst_8x32_224": (8, 32, 224, "joint_space_time", 400),
    "k400_spaceonly_8x32_224": (8, 32, 224, "space_only", 400),
    "k400_divst_16x16_448": (16, 16, 448, "divided_space_time", 400),
    "k400_divst_96x4_224": (96, 4, 224, "divided_space_time", 400),
    "ssv2_divst_8_224": (8, 8, 224, "divided_space_time", 174),
    "ssv2_divst_16_448": (16, 8, 448, "divided_space_time", 174),
    "ssv2_divst_64_224": (64, 8, 224, "divided_space_time", 174),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_original_recipes(name):
    T, rate, crop, attention, classes = RECIPES[name]
    cfg = load_config(EXP / f"{name}.yaml")
    assert (cfg.model.num_frames, cfg.data.num_frames, cfg.data.sampling_rate) == (T, T, rate)
    assert (cfg.model.img_size, cfg.data.train_crop_size, cfg.data.test_crop_size) == (crop, crop, crop)
    assert cfg.data.train_jitter_scales == ([448, 512] if crop == 448 else [256, 320])
    assert (cfg.model.attention_type, cfg.model.num_classes) == (attention, classes)
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.patch_size) == (768, 12, 16)
    s = cfg.solver
    assert (s.optimizer, s.nesterov, s.momentum, s.base_lr, s.weight_decay) == ("sgd", True, 0.9, 0.005, 1e-4)
    assert (s.lr_policy, s.steps, s.lrs, s.max_epoch) == ("steps_with_relative_lrs", [0, 11, 14], [1.0, 0.1, 0.01], 15)
    assert s.global_batch_size == 64
    assert (cfg.train.eval_period, cfg.train.checkpoint_period) == (5, 5)
    assert (cfg.data.num_ensemble_views, cfg.data.num_spatial_crops, cfg.test.ensemble) == (1, 3, "sum")
    ssv2 = name.startswith("ssv2")
    assert (cfg.data.random_flip, cfg.data.inv_uniform_sample) == (not ssv2, ssv2)
    assert cfg.model.input_channels == ("bgr" if ssv2 else "rgb")  # the original's SSv2 ViT saw BGR frames
    assert cfg.output.dir == f"runs/train/{name}"


def test_every_exp_config_loads():
    names = sorted(p.name for p in EXP.glob("*.yaml"))
    assert names
    for name in names:
        load_config(EXP / name)


def test_a_defaults_tree_is_read_in_bounded_work(tmp_path, monkeypatch):
    """A file may be named by several others (a diamond), but a tree that names files several times at several
    levels multiplies its reads (2^25 for 25 levels of two): refused after MAX_CONFIG_FILES reads, at once."""
    from omegaconf import OmegaConf

    from timesformer_harness.config import MAX_CONFIG_FILES

    reads = []
    real_load = OmegaConf.load
    monkeypatch.setattr(OmegaConf, "load", lambda path: reads.append(path) or real_load(path))

    (tmp_path / "d.yaml").write_text("model:\n  depth: 3\n")
    for name in ("b", "c"):
        (tmp_path / f"{name}.yaml").write_text("defaults: [d.yaml]\n")
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml, c.yaml]\n")
    assert load_config(tmp_path / "a.yaml").model.depth == 3  # a diamond is fine
    for n in range(25):
        (tmp_path / f"bomb{n}.yaml").write_text(f"defaults: [bomb{n + 1}.yaml, bomb{n + 1}.yaml]\n")
    (tmp_path / "bomb25.yaml").write_text("model:\n  depth: 2\n")
    reads.clear()
    with pytest.raises(ValueError, match=rf"its 'defaults' read more than {MAX_CONFIG_FILES} files"):
        load_config(tmp_path / "bomb0.yaml")
    assert len(reads) <= MAX_CONFIG_FILES  # without the bound: 2^26 - 1
    (tmp_path / "self.yaml").write_text("defaults: [self.yaml]\n")
    with pytest.raises(ValueError, match="includes itself through 'defaults'"):
        load_config(tmp_path / "self.yaml")


@pytest.mark.parametrize("key", ["depth", "embed_dim", "num_heads", "num_frames", "num_classes"])
def test_a_model_size_below_one_is_refused(key):
    with pytest.raises(ValueError, match=rf"model.{key}=-1; must be >= 1"):
        load_config(None, [f"model.{key}=-1"])


def test_a_config_path_not_in_the_current_folder_is_read_from_the_shipped_configs(tmp_path, monkeypatch, caplog):
    """``--config configs/exp/x.yaml`` run from a data folder (docs/your_data.md) was 'does not exist'; it is now
    read as a ``defaults:`` entry is, from the shipped configs, with a warning. A file in the current folder wins."""
    monkeypatch.chdir(tmp_path)
    shipped = load_config(EXP / "k400_divst_8x32_224.yaml")
    with caplog.at_level("WARNING", logger="timesformer_harness.config"):
        cfg = load_config("configs/exp/k400_divst_8x32_224.yaml")
    assert cfg.model == shipped.model and cfg.data == shipped.data
    assert "config configs/exp/k400_divst_8x32_224.yaml is not in the current folder" in caplog.text
    (tmp_path / "configs" / "exp").mkdir(parents=True)
    (tmp_path / "configs" / "exp" / "k400_divst_8x32_224.yaml").write_text("model:\n  depth: 3\n")
    assert load_config("configs/exp/k400_divst_8x32_224.yaml").model.depth == 3
    with pytest.raises(ConfigError, match=r"config file configs/exp/nope.yaml does not exist \(a relative path is "
                                          rf"read from the current folder, {tmp_path}, then from the shipped configs"):
        load_config("configs/exp/nope.yaml")
