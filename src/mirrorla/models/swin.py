"""MirrorLA Swin: the anchors' hybrid (stages 1–2 one global linear attention, stages 3–4 timm's
shifted-window softmax) and an all-linear variant, on top of timm's ``SwinTransformer``."""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

from ._helpers import build, check_attn, default_cfg, feature_map_no_weight_decay, is_softmax, swap_in
from .blocks import NHWCGridBlock

__all__ = ["MirrorSwinTransformer"]


class _StaticMaskSwinBlock(SwinTransformerBlock):
    """timm's shifted-window block, whose attention mask at its configured resolution is a buffer built once.

    With ``strict_img_size=False`` (any image size, as here) timm builds every shifted block's mask again in each
    forward: about 25 small operators per block and step, each a kernel launch on a GPU. This block reads the
    buffer when the (padded) input has the configured size, device and dtype, and builds the mask as timm does
    for any other input."""

    def _init_buffers(self) -> None:
        super()._init_buffers()
        mask = None
        if self.dynamic_mask:
            weight = self.norm1.weight
            mask = super().get_attn_mask(device=weight.device, dtype=weight.dtype)
        self.register_buffer("static_attn_mask", mask, persistent=False)

    def get_attn_mask(self, x: torch.Tensor | None = None, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor | None:
        mask = self.static_attn_mask
        if x is not None and mask is not None and mask.device == x.device and mask.dtype == x.dtype:
            padded = tuple(-(-r // w) * w for r, w in zip(self.input_resolution, self.window_size, strict=True))
            if tuple(x.shape[1:3]) == padded:
                return mask
        return super().get_attn_mask(x, device, dtype)


class MirrorSwinTransformer(SwinTransformer):
    """timm's Swin with the blocks of ``global_stages`` replaced by one global attention of kind ``attn``
    over the whole stage map (no windows, no shift, no relative position bias); other stages keep timm's
    shifted-window softmax.

    Args:
        attn, attn_kwargs: attention of the global stages and its feature-map options.
        global_stages: stage indices with global attention. ``None`` (default) means stages 1–2 (the
            anchors' hybrid) for a linear ``attn`` and none for ``"softmax"``, which is then the original Swin.
        **kwargs: timm ``SwinTransformer`` arguments.
    """

    def __init__(
        self,
        *,
        attn: str = "mirror",
        attn_kwargs: dict | None = None,
        global_stages: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        check_attn(attn)
        kwargs.setdefault("strict_img_size", False)
        super().__init__(**kwargs)
        self.attn, self.attn_kwargs = attn, dict(attn_kwargs or {})
        if global_stages is None:
            global_stages = () if is_softmax(attn) else (0, 1)
        bad = [i for i in global_stages if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"global_stages must index the {len(self.layers)} stages, got {bad}")
        self.global_stages = tuple(sorted(global_stages))
        for i, stage in enumerate(self.layers):
            for j, blk in enumerate(stage.blocks):
                if i in self.global_stages:
                    swap_in(stage.blocks, str(j), NHWCGridBlock.like_swin_block(blk, self.attn, self.attn_kwargs))
                elif type(blk) is SwinTransformerBlock:  # the same module, its mask kept (timm builds the blocks)
                    blk.__class__ = _StaticMaskSwinBlock
                    blk._init_buffers()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set(super().no_weight_decay()) | feature_map_no_weight_decay(self)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MirrorSwinTransformer:
    return build(MirrorSwinTransformer, variant, pretrained, tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))),
                 dict(flatten_sequential=True), **kwargs)


default_cfgs = generate_default_cfgs({
    name: default_cfg()
    for name in (
        "mirrorla_swin_tiny_patch4_window7_224",
        "mirrorla_swin_small_patch4_window7_224",
        "mirrorla_swin_base_patch4_window7_224",
        "mirrorla_swin_tiny_all_linear",
    )
})

_TINY = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))


@register_model
def mirrorla_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> MirrorSwinTransformer:
    """Swin-T hybrid: stages 1–2 (4 of 12 blocks) global ``attn``, stages 3–4 window-7 softmax."""
    return _create("mirrorla_swin_tiny_patch4_window7_224", pretrained, **{**_TINY, **kwargs})


@register_model
def mirrorla_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> MirrorSwinTransformer:
    """Swin-S hybrid: depths (2, 2, 18, 2); stages 1–2 (4 of 24 blocks) global ``attn``."""
    args = {**_TINY, "depths": (2, 2, 18, 2)}
    return _create("mirrorla_swin_small_patch4_window7_224", pretrained, **{**args, **kwargs})


@register_model
def mirrorla_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> MirrorSwinTransformer:
    """Swin-B hybrid: dim 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32); stages 1–2 global ``attn``."""
    args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create("mirrorla_swin_base_patch4_window7_224", pretrained, **{**args, **kwargs})


@register_model
def mirrorla_swin_tiny_all_linear(pretrained: bool = False, **kwargs: Any) -> MirrorSwinTransformer:
    """Swin-T shape with one global ``attn`` in every stage (all 12 blocks, no windows)."""
    args = {**_TINY, "global_stages": (0, 1, 2, 3)}
    return _create("mirrorla_swin_tiny_all_linear", pretrained, **{**args, **kwargs})
