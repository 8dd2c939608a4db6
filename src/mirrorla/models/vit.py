"""MirrorLA DeiT / ViT: timm's ``VisionTransformer`` with :class:`LinearAttention` in every block."""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ..attention import LinearAttention
from ._helpers import build, check_attn, default_cfg, feature_map_no_weight_decay, set_token_grid

__all__ = ["MirrorVisionTransformer"]


class MirrorVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` whose blocks use ``LinearAttention(attn=attn, attn_kwargs=...)``.

    The attention layers are told the token grid of each input (for the local term), so any input size
    works with ``dynamic_img_size=True`` (the default of the registered models), non-square included.
    Everything else — ``forward_features``, ``forward_head``, ``forward_intermediates``,
    ``reset_classifier``, ``set_grad_checkpointing``, ``feature_info`` — is timm's.
    """

    def __init__(self, *, attn: str = "mirror", attn_kwargs: dict | None = None, **kwargs: Any) -> None:
        check_attn(attn)
        if "attn_layer" in kwargs:
            raise ValueError("MirrorVisionTransformer builds its own attn_layer: pass attn= and attn_kwargs= instead")
        layer = LinearAttention.configure(attn=attn, attn_kwargs=dict(attn_kwargs or {}))
        super().__init__(attn_layer=layer, **kwargs)
        self.attn = attn
        self.attn_kwargs = dict(attn_kwargs or {})
        self._token_grid: tuple[int, int] | None = None
        self._set_grid(tuple(self.patch_embed.grid_size))

    def _set_grid(self, grid: tuple[int, int]) -> None:
        if grid != self._token_grid:
            set_token_grid(self, grid, self.num_prefix_tokens)
            self._token_grid = grid

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # With dynamic_img_size the patch embedding is still [B, H, W, C] here: the one place the grid is known.
        self._set_grid(tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size))
        return super()._pos_embed(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set(super().no_weight_decay()) | feature_map_no_weight_decay(self)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MirrorVisionTransformer:
    return build(MirrorVisionTransformer, variant, pretrained, 3, dict(feature_cls="getter"), **kwargs)


default_cfgs = generate_default_cfgs({
    "mirrorla_deit_tiny_patch16_224": default_cfg(),
    "mirrorla_deit_small_patch16_224": default_cfg(),
    "mirrorla_deit_base_patch16_224": default_cfg(),
    "mirrorla_vit_nano_patch4": default_cfg(input_size=(3, 32, 32), num_classes=10, crop_pct=1.0),
})


def _deit(variant: str, dim: int, heads: int, pretrained: bool, **kwargs: Any) -> MirrorVisionTransformer:
    args = dict(patch_size=16, embed_dim=dim, depth=12, num_heads=heads, dynamic_img_size=True)
    return _create(variant, pretrained, **{**args, **kwargs})


@register_model
def mirrorla_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> MirrorVisionTransformer:
    """DeiT-T (dim 192, depth 12, 3 heads), all 12 blocks with ``attn`` (default MirrorLA)."""
    return _deit("mirrorla_deit_tiny_patch16_224", 192, 3, pretrained, **kwargs)


@register_model
def mirrorla_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> MirrorVisionTransformer:
    """DeiT-S (dim 384, depth 12, 6 heads), all 12 blocks with ``attn``."""
    return _deit("mirrorla_deit_small_patch16_224", 384, 6, pretrained, **kwargs)


@register_model
def mirrorla_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> MirrorVisionTransformer:
    """DeiT-B (dim 768, depth 12, 12 heads), all 12 blocks with ``attn``."""
    return _deit("mirrorla_deit_base_patch16_224", 768, 12, pretrained, **kwargs)


@register_model
def mirrorla_vit_nano_patch4(pretrained: bool = False, **kwargs: Any) -> MirrorVisionTransformer:
    """A ~0.7M-parameter ViT for 28–32 px images on a CPU: patch 4, dim 96, depth 6, 3 heads of 32."""
    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=3.0,
                num_classes=10, dynamic_img_size=True)
    return _create("mirrorla_vit_nano_patch4", pretrained, **{**args, **kwargs})
