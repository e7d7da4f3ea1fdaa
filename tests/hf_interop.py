"""The Hugging Face interop round trip, shared by the checkpoint tests (in process) and the import-name probe (in a
fresh process, from a clone or an installed wheel): Hugging Face weights load into our model with the same logits,
and our weights drive a Hugging Face model to ours."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from timesformer_harness.checkpoint import load_weights, original_to_hf
from timesformer_harness.model import TimeSformer

TINY = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=4, num_classes=7)


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` in eval mode with every parameter drawn from N(0, 0.2) (the zero-initialised temporal path too)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model.eval()


def tiny_config(attention_type: str = "divided_space_time", **kw) -> transformers.TimesformerConfig:
    """The Hugging Face config of ``TINY`` (``kw`` overrides its fields)."""
    fields = dict(image_size=32, patch_size=8, num_channels=3, num_frames=4, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=128, attention_type=attention_type, drop_path_rate=0,
                  num_labels=7)
    return transformers.TimesformerConfig(**{**fields, **kw})


def snapshot(folder: Path, attention_type: str = "divided_space_time", bin_file: bool = False,
             seed: int = 0) -> transformers.TimesformerForVideoClassification:
    """Write a random Hugging Face ``TINY`` model to ``folder`` as ``huggingface_hub.snapshot_download`` leaves one:
    ``config.json`` and ``model.safetensors`` (``save_pretrained``), or with ``bin_file`` the older hub layout,
    ``pytorch_model.bin`` (a torch.save'd state dict with Hugging Face names). Returns the model (eval mode)."""
    hf = randomised(transformers.TimesformerForVideoClassification(tiny_config(attention_type)), seed=seed)
    hf.save_pretrained(folder)
    if bin_file:
        (Path(folder) / "model.safetensors").unlink()
        torch.save(hf.state_dict(), Path(folder) / "pytorch_model.bin")
    return hf


def hf_logits(hf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``hf``'s logits for our layout ``x: (B, 3, T, H, W)`` (Hugging Face takes (B, T, C, H, W))."""
    with torch.no_grad():
        return hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits


def round_trip(attention_type: str, out_dir: Path) -> dict:
    """``format`` and ``missing`` of loading a random Hugging Face model's safetensors into ours; ``hf_to_ours``: the
    largest logit difference of the two; ``ours_to_hf``: the same for a random model of ours exported to a fresh
    Hugging Face model."""
    cfg = tiny_config(attention_type)
    hf = randomised(transformers.TimesformerForVideoClassification(cfg), seed=0)
    path = Path(out_dir) / f"hf_{attention_type}.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    loaded = TimeSformer(**TINY, attention_type=attention_type, drop_path_rate=0.0).eval()
    report = load_weights(loaded, path)
    ours = randomised(TimeSformer(**TINY, attention_type=attention_type, drop_path_rate=0.0), seed=3)
    exported = transformers.TimesformerForVideoClassification(cfg).eval()
    exported.load_state_dict(original_to_hf(ours.state_dict()), strict=True)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, 32, 32)
    frames_first = x.permute(0, 2, 1, 3, 4)  # Hugging Face takes (B, T, C, H, W)
    with torch.no_grad():
        return {"format": report.format, "missing": list(report.missing),
                "hf_to_ours": (loaded(x) - hf(pixel_values=frames_first).logits).abs().max().item(),
                "ours_to_hf": (exported(pixel_values=frames_first).logits - ours(x)).abs().max().item()}
