"""TimeSformer (Bertasius et al., ICML 2021): a ViT over video with divided, joint or space-only attention.

Clean-room implementation of the original ``VisionTransformer`` semantics (token order, CLS handling, drop-path
placement, init quirks, run-time resizing of position/time embeddings) with the same ``state_dict`` keys, so
original checkpoints load and give the same logits. Attention goes through ``timesformer_harness.kernels.attention``
(fused SDPA by default).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from einops import rearrange
from omegaconf import OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from timesformer_harness.config import CONFIG_DIR, ModelConfig, model_kwargs
from timesformer_harness.embeddings import resize_pos_embed, resize_time_embed
from timesformer_harness.kernels.attention import Attention
from timesformer_harness.kernels.layout import from_spatial, from_temporal, to_spatial, to_temporal
from timesformer_harness.variants import REFERENCE, variant

LN_EPS = 1e-6  # the original wrappers use eps 1e-6 (the class default of 1e-5 is never used)
PRESET_DIR = CONFIG_DIR / "model"


class DropPath(nn.Module):
    """Per-sample stochastic depth (row-wise over dim 0), scaled by 1/keep as in timm."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Frame-wise 2-D patch embedding: (B, C, T, H, W) -> (B*T, N, D), frames in (b t) order, patches row-major."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2  # from the construction size, as the original
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Returns (tokens (B*T, N, D), T, patch columns W')."""
        T = x.size(2)
        x = rearrange(x, "b c t h w -> (b t) c h w")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
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
    ) -> None:
        super().__init__()
        self.variant = variant(attention_type)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, attn_backend,
                              name=self.variant.space_attention)
        if self.variant.temporal_branch:
            self.temporal_norm1 = nn.LayerNorm(dim, eps=LN_EPS)
            self.temporal_attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, attn_backend, "attn/temporal")
            self.temporal_fc = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """x: (B, 1 + N*T, D) when the variant keeps the frames joint; (B*T, 1 + N, D) when each frame is one."""
        if not self.variant.temporal_branch:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))

        # Temporal: each patch position attends over its T frames; the CLS token takes no part.
        # drop_path acts on the reshaped (B*N) rows and temporal_fc comes after it, as in the original.
        patches = x[:, 1:]  # (B, N*T, D)
        res_t = self.drop_path(self.temporal_attn(self.temporal_norm1(to_temporal(patches, T))))
        patches = patches + self.temporal_fc(from_temporal(res_t, B))

        # Spatial: each frame attends over its N patches plus a copy of the CLS token.
        cls = x[:, :1]  # (B, 1, D)
        cls_per_frame = rearrange(cls.expand(-1, T, -1), "b t d -> (b t) 1 d")
        xs = torch.cat([cls_per_frame, to_spatial(patches, T)], dim=1)  # (B*T, 1+N, D)
        res_s = self.drop_path(self.attn(self.norm1(xs)))
        cls_res = res_s[:, :1].reshape(B, T, -1).mean(dim=1, keepdim=True)  # CLS output averaged over frames
        x = torch.cat([cls, patches], dim=1) + torch.cat([cls_res, from_spatial(res_s[:, 1:], B)], dim=1)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TimeSformer(nn.Module):
    """TimeSformer with the original ``VisionTransformer``'s parameters and ``state_dict`` keys.

    Args:
        attention_type: a registered variant (``timesformer_harness.variants``): ``divided_space_time``,
            ``joint_space_time``, ``space_only``.
        attn_backend: ``auto`` | ``flash`` | ``efficient`` | ``cudnn`` | ``math`` | ``naive`` (see
            ``timesformer_harness.kernels.attention``).
        grad_checkpointing: recompute each block in backward (saves activation memory for HR/L).
        init: ``original`` (time_embed and every temporal_fc zero: a divided block starts as a ViT block) or
            ``scratch`` (time_embed ~ N(0, time_embed_std), so a model trained from scratch sees frame order).
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
        grad_checkpointing: bool = False,
        init: str = "original",
        time_embed_std: float = 1.0,
    ) -> None:
        super().__init__()
        # Validates the arguments and keeps them, so the model can be rebuilt (e.g. on the meta device).
        self.config = ModelConfig(**{k: v for k, v in locals().items() if k in ModelConfig.__dataclass_fields__})
        self.attention_type = attention_type
        self.variant = variant(attention_type)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        if self.variant.time_embed:
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
            self.time_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows linearly
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], attention_type,
                  attn_backend)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(init, time_embed_std)

    def _init_weights(self, init: str, time_embed_std: float) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():  # the patch conv keeps PyTorch's default init, as in the original
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:  # every block, block 0 included (the original's skip never hits a Block)
            if self.variant.temporal_branch:
                nn.init.zeros_(blk.temporal_fc.weight)
                nn.init.zeros_(blk.temporal_fc.bias)
        if init == "scratch" and self.variant.time_embed:
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
        x, T, Wp = self.patch_embed(x)  # (B*T, N, D)
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1)
        x = self.pos_drop(x + self._pos_embed(x.size(1), Wp))
        if self.variant.frames_joint:
            cls_tokens = x[:B, :1]  # every (b, t) row holds the same CLS + pos[0]; the original takes the first B
            x = rearrange(x[:, 1:], "(b t) n d -> (b n) t d", b=B)
            if self.variant.time_embed:
                x = self.time_drop(x + self._time_embed(T))
            x = torch.cat([cls_tokens, rearrange(x, "(b n) t d -> b (n t) d", b=B)], dim=1)  # (B, 1+N*T, D)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, B, T, use_reentrant=False)
            else:
                x = blk(x, B, T)
        if not self.variant.frames_joint:
            x = rearrange(x, "(b t) n d -> b t n d", b=B).mean(dim=1)  # average frames before the final norm
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, T, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x))


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


