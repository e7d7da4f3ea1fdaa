"""The attention variants: one registered entry per ``model.attention_type``, read by the config, the model, the
bench, the checkpoint inference and the command lines. A new variant is one ``AttentionVariant`` in ``VARIANTS``
(and, when its block does something none of these does, that behaviour in ``timesformer_harness.model.Block``).

What an entry says:

* block behaviour: ``temporal_branch``, a temporal attention over each patch position's T frames before the
  spatial one (with ``temporal_norm1``, ``temporal_attn``, ``temporal_fc``, zero-initialised as the original);
* token layout: ``frames_joint`` keeps one sequence of 1 + N*T tokens per clip through the blocks; otherwise each
  frame is a sequence of 1 + N tokens and the frames are averaged after the last block;
* time embedding: ``time_embed``, a learned (1, T, D) embedding added per frame;
* checkpoint signature: which of those parameters a state dict holds (``infer_variant`` reads it back);
* FLOPs: ``attention_calls`` (the block's attention shapes), from which ``attention_flops`` counts QK^T and AV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class AttentionVariant:
    name: str
    temporal_branch: bool  # divided space-time: a temporal attention branch in every block
    time_embed: bool  # a learned time embedding
    frames_joint: bool  # the tokens of all frames form one sequence through the blocks (else one per frame)
    attention_calls: tuple[str, ...]  # the attention shapes one block runs: temporal | spatial | joint
    summary: str

    @property
    def space_attention(self) -> str:
        """The name the block's ``attn`` records itself under (profiler ranges, errors): joint or spatial."""
        return "attn/joint" if "joint" in self.attention_calls else "attn/spatial"


VARIANTS: dict[str, AttentionVariant] = {v.name: v for v in (
    AttentionVariant("divided_space_time", temporal_branch=True, time_embed=True, frames_joint=True,
                     attention_calls=("temporal", "spatial"),
                     summary="temporal attention over each patch's T frames, then spatial attention per frame"),
    AttentionVariant("joint_space_time", temporal_branch=False, time_embed=True, frames_joint=True,
                     attention_calls=("joint",), summary="one attention over all N x T patches of the clip"),
    AttentionVariant("space_only", temporal_branch=False, time_embed=False, frames_joint=False,
                     attention_calls=("spatial",),
                     summary="spatial attention per frame, frames averaged at the end (blind to frame order)"),
)}
REFERENCE = "divided_space_time"  # the paper's model: the bench's tables give every variant's ratio to it
ATTENTION_CALLS = ("temporal", "spatial", "joint")


def variant(name: str) -> AttentionVariant:
    """The registered variant ``name``; ValueError naming the choices otherwise."""
    if name not in VARIANTS:
        raise ValueError(f"model.attention_type={name!r}; choose from {list(VARIANTS)}")
    return VARIANTS[name]


def infer_variant(keys: Iterable[str]) -> str:
    """The variant whose parameters a state dict (original key names) holds: a temporal branch, a time embedding."""
    keys = list(keys)
    temporal = any(".temporal_attn." in k for k in keys)
    time = "time_embed" in keys
    matches = [v.name for v in VARIANTS.values() if v.temporal_branch == temporal and v.time_embed == time]
    if len(matches) != 1:
        raise ValueError(f"the state dict's keys match {matches or 'no'} attention variant (temporal branch: "
                         f"{temporal}, time_embed: {time}); choose from {list(VARIANTS)}")
    return matches[0]


def attention_shape(cfg: object, shape: str, batch: int, frames: int, img_size: int) -> tuple[int, int, int, int]:
    """(sequences, heads, L, head_dim) of one attention call of ``shape`` inside a block of the model ``cfg`` (a
    ``ModelConfig``: its patch_size, embed_dim and num_heads) at this input."""
    N = (img_size // cfg.patch_size) ** 2
    heads, hd = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    if shape == "temporal":
        return batch * N, heads, frames, hd  # one sequence per patch position
    if shape == "spatial":
        return batch * frames, heads, 1 + N, hd  # one sequence per frame, CLS included
    if shape == "joint":
        return batch, heads, 1 + N * frames, hd
    raise ValueError(f"attention shape {shape!r}; choose from {list(ATTENTION_CALLS)}")


def attention_flops(cfg: object, shape: str, batch: int, frames: int, img_size: int) -> int:
    """Forward FLOPs (2 per multiply-add) of one attention call of ``shape``: QK^T and AV."""
    nseq, heads, length, hd = attention_shape(cfg, shape, batch, frames, img_size)
    return 4 * nseq * heads * length * length * hd
