"""The attention-variant registry: every registered entry's block behaviour, layout and time embedding show in the
model it builds, its checkpoint signature reads back, its FLOP formula matches torch's counter, and a variant
added by one registration works through config, model, checkpoint inference and the bench."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from timesformer_harness.bench import attention as attention_suite
from timesformer_harness.bench.cli import attention_types
from timesformer_harness.checkpoint import infer_model_config
from timesformer_harness.config import ModelConfig, RootConfig, load_config
from timesformer_harness.model import TimeSformer, create_model, load_preset
from timesformer_harness.variants import (ATTENTION_CALLS, REFERENCE, VARIANTS, AttentionVariant, attention_flops,
                                          attention_shape, infer_variant, variant)

TINY = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_builds_the_model_its_entry_describes(name: str) -> None:
    entry = VARIANTS[name]
    model = TimeSformer(**TINY, attention_type=name, drop_path_rate=0.0).eval()
    keys = model.state_dict().keys()
    assert any(".temporal_attn." in k for k in keys) == entry.temporal_branch
    assert ("time_embed" in keys) == entry.time_embed
    assert infer_variant(keys) == name and infer_model_config(model.state_dict()).attention_type == name
    assert model.blocks[0].attn.name == entry.space_attention
    with torch.no_grad():
        assert model(torch.randn(2, 3, 4, 32, 32)).shape == (2, 5)


def test_unknown_names_are_refused_naming_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"model.attention_type='diagonal'; choose from \['divided_space_time'"):
        variant("diagonal")
    with pytest.raises(ValueError, match="model.attention_type='diagonal'"):
        ModelConfig(attention_type="diagonal")
    assert REFERENCE in VARIANTS and set(ATTENTION_CALLS) == {c for v in VARIANTS.values() for c in v.attention_calls}


@pytest.mark.parametrize("shape", ATTENTION_CALLS)
def test_the_flop_formula_is_what_torch_counts(shape: str) -> None:
    cfg = load_preset("cpu_bench")
    nseq, heads, length, hd = attention_shape(cfg, shape, 2, 8, 224)
    q = torch.empty(nseq, heads, length, hd, device="meta")
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == attention_flops(cfg, shape, 2, 8, 224)


def test_a_variant_added_by_one_registration_runs_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Divided attention without a time embedding: one ``AttentionVariant``, no other change. The config takes it,
    the model builds it (temporal branch, no time_embed), a checkpoint of it is recognised, and the bench's
    variant list and attention suite include it."""
    entry = AttentionVariant("divided_no_time", temporal_branch=True, time_embed=False, frames_joint=True,
                             attention_calls=("temporal", "spatial"), summary="divided, frame order from attention "
                                                                              "alone")
    monkeypatch.setitem(VARIANTS, entry.name, entry)
    cfg = load_config(None, ["model.attention_type=divided_no_time"])
    model = create_model(replace(cfg.model, **TINY, drop_path_rate=0.0)).eval()
    keys = model.state_dict().keys()
    assert "time_embed" not in keys and "blocks.1.temporal_attn.qkv.weight" in keys
    assert infer_model_config(model.state_dict()).attention_type == "divided_no_time"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 4, 32, 32)).shape == (1, 5)
    assert attention_types("all")[-1] == "divided_no_time"
    root = RootConfig()
    root.model = replace(load_preset("tiny"), attention_type="divided_no_time")
    base = {"preset": "tiny", "device": "cpu", "batch": 2, "precision": "fp32", "warmup": 1, "steps": 1}
    cases = attention_suite.cases(root, base, ["divided_no_time"], ["train"], torch.device("cpu"))
    assert {c.shape for c in cases} == {"temporal", "spatial"} and {c.model.attention_type for c in cases} == {
        "divided_no_time"}
