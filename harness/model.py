"""TimeSformer (Bertasius et al., ICML 2021): a ViT over video with divided, joint or space-only attention.

Clean-room implementation of the original ``VisionTransformer`` semantics (token order, CLS handling, drop-path
placement, init quirks, run-time resizing of position/time embeddings) with the same ``state_dict`` keys, so
original checkpoints load and give the same logits. Attention goes through ``timesformer_harness.kernels.attention``
(fused SDPA by default).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from timesformer_harness.config import CONFIG_DIR, ModelConfig, model_kwargs
from timesformer_harness.embeddings import resize_pos_embed, resize_time_embed
from timesformer_harness.kernels.attention import Attention
from timesformer_harness.kernels.cast import call_with_cast_weights, matmul_weights
from timesformer_harness.kernels.layout import frames_residual, patch_major, temporal_residual_and_frames
from timesformer_harness.kernels.residual import draw_keep_scales, residual_add, scale_rows
from timesformer_harness.variants import REFERENCE, variant

LN_EPS = 1e-6  # the original wrappers use eps 1e-6 (the class default of 1e-5 is never used)
PRESET_DIR = CONFIG_DIR / "model"


def trunc_normal_(tensor: torch.Tensor, std: float, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """Fill ``tensor`` from N(0, std^2) truncated to [a, b] (the bounds absolute, as in timm): drawn with ``normal_``,
    each value outside the bounds drawn again. The same seed gives the same weights on torch 2.11 and 2.13: torch's
    own ``nn.init.trunc_normal_`` drew by inverse CDF up to 2.12 and draws as here from 2.13, so one seed gave two
    models (and the toy recipe a run that learns on one torch and stalls on the other)."""
    if tensor.is_meta:  # no values to draw (a meta normal_ would import torch's compiler stack, about a second)
        return tensor
    with torch.no_grad():
        tensor.normal_(0.0, std)
        while True:
            outside = (tensor < a) | (tensor > b)
            if not outside.any():
                break
            tensor.copy_(torch.where(outside, torch.empty_like(tensor).normal_(0.0, std), tensor))
    return tensor


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> dropout -> fc2 -> dropout (the dropouts only with ``drop`` > 0)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(0, -2)  # the matmuls on (tokens, D): no reshapes around each of them
        return self.drop(self.fc2(self.drop(self.act(self.fc1(tokens))))).view(x.shape)


class PatchEmbed(nn.Module):
    """Frame-wise 2-D patch embedding: (B, C, T, H, W) -> (B*T, N, D), frames in (b t) order, patches row-major.
    ``reverse_channels``: the input's channels are taken in reverse order (RGB frames into weights trained on BGR),
    by reversing the kernel's input channels, not the frames."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 reverse_channels: bool = False) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2  # from the construction size, as the original
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.channels_last = False
        self.reverse_channels = reverse_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Returns (tokens (B*T, N, D), T, patch columns W')."""
        T = x.size(2)
        x = rearrange(x, "b c t h w -> (b t) c h w")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.reverse_channels:
            x = F.conv2d(x, self.proj.weight.flip(1), self.proj.bias, self.proj.stride)
        else:
            x = self.proj(x)  # (B*T, D, H', W')
        Wp = x.size(-1)
        return x.flatten(2).transpose(1, 2), T, Wp


class Block(nn.Module):
    """Pre-norm transformer block; a variant with a temporal branch (``divided_space_time``) adds a temporal attention
    before the spatial one (``timesformer_harness.variants``).

    Parameters are registered in the original order (norm1, attn, temporal_norm1, temporal_attn, temporal_fc,
    norm2, mlp) so that ``state_dict`` key order matches too.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        attention_type: str = REFERENCE,
        attn_backend: str = "auto",
        temporal_attn_backend: str = "same",
    ) -> None:
        super().__init__()
        self.variant = variant(attention_type)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, attn_backend,
                              name=self.variant.space_attention)
        if self.variant.temporal_branch:
            self.temporal_norm1 = nn.LayerNorm(dim, eps=LN_EPS)
            temporal_backend = attn_backend if temporal_attn_backend == "same" else temporal_attn_backend
            self.temporal_attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, temporal_backend,
                                           "attn/temporal")
            self.temporal_fc = nn.Linear(dim, dim)
        self.drop_prob = drop_path  # stochastic depth: the model draws every block's masks at once
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.matmul_weights = matmul_weights(self)

    def drop_path_shapes(self, B: int, T: int, N: int) -> list[tuple[int, ...]]:
        """The shapes of the stochastic-depth scales ``forward`` takes, one per residual branch, broadcast against
        the branch: whole rows are dropped (per clip; per patch sequence and per frame in divided attention, per
        frame in space-only attention, as in the original)."""
        if self.variant.temporal_branch:
            return [(B, N, 1, 1), (B, T, 1), (B, 1, 1)]
        rows = B if self.variant.frames_joint else B * T
        return [(rows, 1, 1), (rows, 1, 1)]

    def forward(self, x: torch.Tensor, B: int, T: int, scales: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, 1 + N*T, D) when the variant keeps the frames joint; (B*T, 1 + N, D) when each frame is one.
        ``scales``: stochastic depth's keep masks divided by the keep probability (``drop_path_shapes``), or None."""
        *attn_scales, mlp_scale = scales if scales is not None else [None] * len(self.drop_path_shapes(1, 1, 1))
        if self.variant.temporal_branch:
            x = self._space_time(x, B, T, *attn_scales)
        else:
            x = residual_add(x, self.attn(self.norm1(x)), attn_scales[0])
        return residual_add(x, self.mlp(self.norm2(x)), mlp_scale)

    def _space_time(self, x: torch.Tensor, B: int, T: int, temporal_scale: torch.Tensor | None,
                    spatial_scale: torch.Tensor | None) -> torch.Tensor:
        """Divided attention: temporal (each patch over its T frames; the CLS token takes no part), then spatial
        (each frame over its N patches and the CLS token, whose T outputs are averaged). Tokens stay in the
        ``(n t)`` order; ``kernels/layout.py`` moves them to per-frame sequences and back."""
        D = x.size(-1)
        N = (x.size(1) - 1) // T
        # LayerNorm is per token: it runs on every token (the CLS row is not used) and the patches are read in place.
        res_t = self.temporal_attn(self.temporal_norm1(x)[:, 1:], seq_len=T)  # (B, N*T, D)
        # Stochastic depth drops whole patch sequences, before temporal_fc, as in the original.
        res_t = scale_rows(patch_major(res_t, T), temporal_scale).view(B, N * T, D)
        x, frames = temporal_residual_and_frames(x, self.temporal_fc(res_t), T)  # frames: (B, T, 1+N, D)
        res_s = self.attn(self.norm1(frames).view(B * T, 1 + N, D)).view(B, T, 1 + N, D)
        return frames_residual(x, res_s, spatial_scale, T)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class TimeSformer(nn.Module):
    """TimeSformer with the original ``VisionTransformer``'s parameters and ``state_dict`` keys.

    Args:
        attention_type: a registered variant (``timesformer_harness.variants``): ``divided_space_time``,
            ``joint_space_time``, ``space_only``.
        attn_backend: ``auto`` | ``flash`` | ``efficient`` | ``cudnn`` | ``math`` | ``naive`` (see
            ``timesformer_harness.kernels.attention``).
        temporal_attn_backend: the backend of divided attention's temporal pass (sequences of T tokens, a
            different shape from the spatial pass's): ``same`` (``attn_backend``) or one of those.
        grad_checkpointing: recompute each block in backward (saves activation memory for HR/L).
        init: ``original`` (time_embed and every temporal_fc zero: a divided block starts as a ViT block) or
            ``scratch`` (time_embed ~ N(0, time_embed_std), so a model trained from scratch sees frame order).
        input_channels: the channel order the weights expect, ``rgb`` (the loaders' frames) or ``bgr`` (the
            original's SSv2 checkpoints); with ``bgr`` the RGB frames are read in reverse channel order.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 400,
        num_frames: int = 8,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        attention_type: str = REFERENCE,
        attn_backend: str = "auto",
        temporal_attn_backend: str = "same",
        grad_checkpointing: bool = False,
        init: str = "original",
        time_embed_std: float = 1.0,
        input_channels: str = "rgb",
    ) -> None:
        super().__init__()
        # Validates the arguments and keeps them, so the model can be rebuilt (e.g. on the meta device).
        self.config = ModelConfig(**{k: v for k, v in locals().items() if k in ModelConfig.__dataclass_fields__})
        self.attention_type = attention_type
        self.variant = variant(attention_type)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      reverse_channels=input_channels == "bgr")
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        if self.variant.time_embed:
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
            self.time_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows linearly
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], attention_type,
                  attn_backend, temporal_attn_backend)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(init, time_embed_std)
        self.stem_weights, self.head_weights = matmul_weights(self.patch_embed), matmul_weights(self.head)
        self._keep_cache: dict = {}  # stochastic depth's keep probabilities on the device, per batch shape

    def drop_path_scales(self, B: int, T: int, N: int, device: torch.device) -> list[list[torch.Tensor] | None]:
        """Every block's stochastic-depth scales for one forward (``Block.drop_path_shapes``), drawn at once; None
        for a block that drops nothing (eval mode, or a drop probability of 0)."""
        drawn = [blk for blk in self.blocks if self.training and blk.drop_prob > 0.0]
        shapes = [blk.drop_path_shapes(B, T, N) for blk in drawn]
        flat = draw_keep_scales([s for block in shapes for s in block],
                                [blk.drop_prob for blk, block in zip(drawn, shapes) for _ in block], device,
                                self._keep_cache) if drawn else []
        scales, i = {}, 0
        for blk, block in zip(drawn, shapes):
            scales[id(blk)] = flat[i:i + len(block)]
            i += len(block)
        return [scales.get(id(blk)) for blk in self.blocks]

    def _init_weights(self, init: str, time_embed_std: float) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():  # the patch conv keeps PyTorch's default init, as in the original
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:  # every block, block 0 included (the original's skip never hits a Block)
            if self.variant.temporal_branch:
                nn.init.zeros_(blk.temporal_fc.weight)
                nn.init.zeros_(blk.temporal_fc.bias)
        if init == "scratch" and self.variant.time_embed and not self.time_embed.is_meta:
            nn.init.normal_(self.time_embed, std=time_embed_std)

    def set_channels_last(self, enabled: bool = True) -> TimeSformer:
        """Run the patch convolution in channels-last memory format (faster on tensor-core GPUs)."""
        self.patch_embed.channels_last = enabled
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.patch_embed.proj.to(memory_format=fmt)
        return self

    def _pos_embed(self, num_tokens: int, Wp: int) -> torch.Tensor:
        """pos_embed, 2-D nearest-resized to the input's (Hp, Wp) patch grid when its token count differs from
        construction's (as the original: a grid of the same count but another shape is not resized)."""
        if num_tokens == self.pos_embed.size(1):
            return self.pos_embed
        Hp = (num_tokens - 1) // Wp
        return resize_pos_embed(self.pos_embed, Hp * Wp, grid=(Hp, Wp))

    def _time_embed(self, T: int) -> torch.Tensor:
        """time_embed, 1-D nearest-resized when the clip has a different frame count."""
        if T == self.time_embed.size(1):
            return self.time_embed
        return resize_time_embed(self.time_embed, T)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, T, H, W) -> CLS features (B, embed_dim)."""
        B = x.size(0)
        x, T, Wp = call_with_cast_weights(self.patch_embed, self.stem_weights, x)  # (B*T, N, D)
        N = x.size(1)
        pos = self._pos_embed(N + 1, Wp)
        cls = self.cls_token + pos[:, :1]  # the same in every frame; the embedding dropout drops it with the patches
        x = self.pos_drop(x + pos[:, 1:])  # (B*T, N, D)
        if self.variant.frames_joint:  # one sequence per clip: (B, 1+N*T, D), patches in (n t) order
            x = x.view(B, T, N, -1)
            if self.variant.time_embed:
                x = self.time_drop(x + self._time_embed(T).unsqueeze(2))
            x = torch.cat([self.pos_drop(cls.expand(B, -1, -1)), x.transpose(1, 2).reshape(B, N * T, -1)], dim=1)
        else:  # one sequence per frame: (B*T, 1+N, D)
            x = torch.cat([self.pos_drop(cls.expand(B * T, -1, -1)), x], dim=1)
        for blk, scales in zip(self.blocks, self.drop_path_scales(B, T, N, x.device)):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(call_with_cast_weights, blk, blk.matmul_weights, x, B, T, scales, use_reentrant=False)
            else:
                x = call_with_cast_weights(blk, blk.matmul_weights, x, B, T, scales)
        cls = x[:, 0] if self.variant.frames_joint else x[:, 0].view(B, T, -1).mean(dim=1)  # frames averaged
        return self.norm(cls)  # LayerNorm is per token: the CLS token's alone is the one used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, T, H, W) -> logits (B, num_classes)."""
        return call_with_cast_weights(self.head, self.head_weights, self.forward_features(x))


def load_preset(name: str) -> ModelConfig:
    """The ModelConfig of ``configs/model/NAME.yaml`` (e.g. ``vit_base_patch16``, ``cpu_bench``, ``tiny``)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"unknown model preset {name!r}; choose from {names}")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return ModelConfig(**data.get("model", {}))  # type: ignore[union-attr]


def create_model(cfg: ModelConfig | str, **overrides: object) -> TimeSformer:
    """Build a TimeSformer from a ModelConfig or a preset name, with keyword overrides."""
    if isinstance(cfg, str):
        cfg = load_preset(cfg)
    kw = {**model_kwargs(cfg), **overrides}
    return TimeSformer(**kw)


def config_of(model: TimeSformer) -> ModelConfig:
    """The ModelConfig a model was built with (a copy)."""
    return ModelConfig(**asdict(model.config))


