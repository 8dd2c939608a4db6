"""PVT v1 as modified by FLatten: four stages of :class:`GridBlock`, per-stage positional embeddings,
mean-pool head. Linear attentions run on every token without spatial reduction; ``attn="softmax"`` is
the original PVT with spatial-reduction attention (ratios 8, 4, 2, 1). timm has no PVT v1; this file
follows timm's model-file anatomy."""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.layers.pos_embed import resample_abs_pos_embed
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._helpers import (
    build,
    default_cfg,
    feature_map_no_weight_decay,
    is_softmax,
    to_2tuple_int,
)
from .blocks import GridBlock

__all__ = ["PyramidVisionTransformer"]


class PatchEmbed(nn.Module):
    """Strided convolution + LayerNorm: ``[B, C_in, H, W] → [B, H/p, W/p, C]``."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PvtStage(nn.Module):
    """Patch embedding, positional embedding (resampled for other input sizes), blocks: NCHW → NCHW."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        *,
        patch_size: int,
        grid_size: tuple[int, int],
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        attn: str,
        attn_kwargs: dict | None,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: list[float],
    ) -> None:
        super().__init__()
        if min(grid_size) < 1:
            raise ValueError(f"img_size is too small for this PVT: stage grid would be {grid_size}")
        self.grid_size = grid_size
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], dim))
        self.pos_drop = nn.Dropout(proj_drop)
        self.blocks = nn.ModuleList(
            GridBlock(
                dim, num_heads, mlp_ratio=mlp_ratio, attn=attn, attn_kwargs=attn_kwargs, qkv_bias=qkv_bias,
                sr_ratio=sr_ratio, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.grad_checkpointing = False
        trunc_normal_(self.pos_embed, std=0.02)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed(x)
        b, h, w, c = x.shape
        pos = self.pos_embed
        if (h, w) != self.grid_size:
            pos = resample_abs_pos_embed(pos, new_size=(h, w), old_size=self.grid_size, num_prefix_tokens=0)
        x = self.pos_drop(x.reshape(b, h * w, c) + pos)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, (h, w), use_reentrant=False)
            else:
                x = blk(x, (h, w))
        return x, (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = self.forward_tokens(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class PyramidVisionTransformer(nn.Module):
    """PVT v1 (FLatten's variant when ``attn`` is linear).

    Args:
        img_size: nominal input size (positional embeddings are resampled for other sizes).
        patch_size: patch of the first stage; later stages use 2.
        embed_dims, num_heads, mlp_ratios, depths: per stage.
        sr_ratios: spatial-reduction ratios, used only with ``attn="softmax"`` (the original PVT).
        attn, attn_kwargs: the attention of every block and its feature-map options.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: tuple[int, ...] = (64, 128, 320, 512),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        attn: str = "mirror",
        attn_kwargs: dict | None = None,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        stages_n = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == stages_n):
            raise ValueError("embed_dims, num_heads, mlp_ratios, depths and sr_ratios need one entry per stage")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.attn, self.attn_kwargs = attn, dict(attn_kwargs or {})
        softmax = is_softmax(attn)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        img = to_2tuple_int(img_size)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, feature_info, reduction, prev, grid = [], [], 1, in_chans, img
        for i in range(stages_n):
            p = patch_size if i == 0 else 2
            reduction *= p
            grid = (grid[0] // p, grid[1] // p)
            stages.append(PvtStage(
                prev, embed_dims[i], patch_size=p, grid_size=grid, depth=depths[i], num_heads=num_heads[i],
                mlp_ratio=mlp_ratios[i], sr_ratio=sr_ratios[i] if softmax else 1, attn=attn,
                attn_kwargs=self.attn_kwargs, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[: i + 1])],
            ))
            feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            prev = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.feature_info = feature_info
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        pos = {f"stages.{i}.pos_embed" for i in range(len(self.stages))}
        return pos | feature_map_no_weight_decay(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stages\.0\.patch_embed", blocks=r"^stages\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-stage feature maps ``[B, C_i, H/r_i, W/r_i]`` (r = 4, 8, 16, 32), as timm's models return them.

        ``indices``: which stages (an int n takes the last n). ``norm`` applies the final norm to the last stage.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        last = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        for i, stage in enumerate(stages):
            tokens, (h, w) = stage.forward_tokens(x)
            if i == last and (norm or not intermediates_only):
                tokens_normed = self.norm(tokens)
                if norm:
                    tokens = tokens_normed
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return tokens_normed if len(stages) == len(self.stages) else x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W]`` → last-stage tokens after the final norm ``[B, N_4, C_4]``."""
        for i, stage in enumerate(self.stages):
            if i < len(self.stages) - 1:
                x = stage(x)
            else:
                x, _ = stage.forward_tokens(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    return build(PyramidVisionTransformer, variant, pretrained, 4,
                 dict(feature_cls="getter", flatten_sequential=True), **kwargs)


default_cfgs = generate_default_cfgs({
    "mirrorla_pvt_tiny": default_cfg(first_conv="stages.0.patch_embed.proj"),
    "mirrorla_pvt_small": default_cfg(first_conv="stages.0.patch_embed.proj"),
    "mirrorla_pvt_medium": default_cfg(first_conv="stages.0.patch_embed.proj"),
    "mirrorla_pvt_large": default_cfg(first_conv="stages.0.patch_embed.proj"),
    "mirrorla_pvt_nano": default_cfg(
        first_conv="stages.0.patch_embed.proj", input_size=(3, 32, 32), num_classes=10, crop_pct=1.0),
})


@register_model
def mirrorla_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-T, depths (2, 2, 2, 2): 8 blocks, all with ``attn``."""
    return _create("mirrorla_pvt_tiny", pretrained, **{"depths": (2, 2, 2, 2), **kwargs})


@register_model
def mirrorla_pvt_small(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-S, depths (3, 4, 6, 3)."""
    return _create("mirrorla_pvt_small", pretrained, **{"depths": (3, 4, 6, 3), **kwargs})


@register_model
def mirrorla_pvt_medium(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-M, depths (3, 4, 18, 3)."""
    return _create("mirrorla_pvt_medium", pretrained, **{"depths": (3, 4, 18, 3), **kwargs})


@register_model
def mirrorla_pvt_large(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-L, depths (3, 8, 27, 3)."""
    return _create("mirrorla_pvt_large", pretrained, **{"depths": (3, 8, 27, 3), **kwargs})


@register_model
def mirrorla_pvt_nano(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """A ~1M-parameter PVT for 28–32 px images: patch 2 then 2, dims (32, 64, 128, 160), one block per stage."""
    args = dict(img_size=32, patch_size=2, embed_dims=(32, 64, 128, 160), num_heads=(1, 2, 4, 5),
                mlp_ratios=(4, 4, 4, 4), depths=(1, 1, 1, 1), sr_ratios=(4, 2, 1, 1), num_classes=10)
    return _create("mirrorla_pvt_nano", pretrained, **{**args, **kwargs})
