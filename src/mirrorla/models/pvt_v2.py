"""MirrorLA PVTv2: timm's ``PyramidVisionTransformerV2`` with :class:`LinearAttention` in every block
(no spatial reduction). ``attn="softmax"`` keeps timm's spatial-reduction attention (the original)."""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.pvt_v2 import PyramidVisionTransformerV2

from ..attention import LinearAttention
from ._helpers import build, check_attn, default_cfg, feature_map_no_weight_decay, is_softmax, swap_in

__all__ = ["FeatSizeLinearAttention", "MirrorPvtV2"]


class FeatSizeLinearAttention(LinearAttention):
    """:class:`LinearAttention` with the call signature of timm's PVTv2 attention, ``(x, feat_size)``."""

    def forward(self, x: torch.Tensor, feat_size: list[int] | tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, grid_size=(int(feat_size[0]), int(feat_size[1])))


class MirrorPvtV2(PyramidVisionTransformerV2):
    """timm's PVTv2; for a linear ``attn`` every block's attention is ``LinearAttention(attn, ...)``."""

    def __init__(
        self, *, attn: str = "mirror", attn_kwargs: dict | None = None, img_size: Any = None, **kwargs: Any
    ) -> None:
        # img_size is accepted for a uniform model interface: PVTv2 has no size-dependent parameters.
        check_attn(attn)
        if not is_softmax(attn):
            kwargs["sr_ratios"] = (1,) * len(kwargs.get("depths", (3, 4, 6, 3)))
            kwargs["linear"] = False
        super().__init__(**kwargs)
        self.attn, self.attn_kwargs = attn, dict(attn_kwargs or {})
        if not is_softmax(attn):
            for stage in self.stages:
                for blk in stage.blocks:
                    dim = blk.norm1.normalized_shape[0]
                    swap_in(blk, "attn", FeatSizeLinearAttention(
                        dim, blk.attn.num_heads, attn=attn, attn_kwargs=self.attn_kwargs,
                        qkv_bias=blk.attn.q.bias is not None, num_prefix_tokens=0,
                    ))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return feature_map_no_weight_decay(self)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MirrorPvtV2:
    return build(MirrorPvtV2, variant, pretrained, tuple(range(4)), dict(flatten_sequential=True), **kwargs)


default_cfgs = generate_default_cfgs({
    f"mirrorla_pvt_v2_b{i}": default_cfg(first_conv="patch_embed.proj", classifier="head") for i in range(3)
})


@register_model
def mirrorla_pvt_v2_b0(pretrained: bool = False, **kwargs: Any) -> MirrorPvtV2:
    """PVTv2-b0: depths (2, 2, 2, 2), dims (32, 64, 160, 256); every block ``attn``."""
    args = dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8))
    return _create("mirrorla_pvt_v2_b0", pretrained, **{**args, **kwargs})


@register_model
def mirrorla_pvt_v2_b1(pretrained: bool = False, **kwargs: Any) -> MirrorPvtV2:
    """PVTv2-b1: depths (2, 2, 2, 2), dims (64, 128, 320, 512)."""
    args = dict(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))
    return _create("mirrorla_pvt_v2_b1", pretrained, **{**args, **kwargs})


@register_model
def mirrorla_pvt_v2_b2(pretrained: bool = False, **kwargs: Any) -> MirrorPvtV2:
    """PVTv2-b2: depths (3, 4, 6, 3), dims (64, 128, 320, 512)."""
    args = dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))
    return _create("mirrorla_pvt_v2_b2", pretrained, **{**args, **kwargs})
