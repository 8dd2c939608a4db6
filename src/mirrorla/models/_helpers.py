"""Shared pieces of the model files: attention factories, model configs and model-level queries."""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..attention import SOFTMAX, LinearAttention, check_attention

__all__ = [
    "attention_counts",
    "init_like_timm",
    "swap_in",
    "build",
    "check_attn",
    "default_cfg",
    "feature_map_no_weight_decay",
    "refuse_pretrained",
]


check_attn = check_attention  # the models' name for the one check in mirrorla.attention


def is_softmax(attn: str) -> bool:
    return check_attn(attn) == SOFTMAX


def default_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm's pretrained_cfg for a model of this project. No weights are published (``url`` empty)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


def build(model_cls: type, variant: str, pretrained: bool, default_out_indices: Any, feature_cfg: dict[str, Any],
          **kwargs: Any):
    """timm's ``build_model_with_cfg`` for a model of this package (``out_indices`` may be passed in kwargs)."""
    from timm.models import build_model_with_cfg

    refuse_pretrained(variant, pretrained)
    out_indices = kwargs.pop("out_indices", default_out_indices)
    feature_cfg = dict(out_indices=out_indices, **feature_cfg)
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def refuse_pretrained(variant: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(
            f"no pretrained weights are published for {variant!r} (MirrorLA released none); build it with "
            "pretrained=False, or convert a pretrained softmax timm ViT with mirrorla.mirrorize(model)"
        )


def feature_map_no_weight_decay(model: nn.Module) -> set[str]:
    """Full names of every feature-map parameter that must not be weight-decayed (angles, vectors, scales)."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, LinearAttention):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


_SOFTMAX_ATTENTION_TYPES: tuple[type, ...] = ()


def _timm_attention_types() -> tuple[type, ...]:
    global _SOFTMAX_ATTENTION_TYPES
    if not _SOFTMAX_ATTENTION_TYPES:
        from timm.models import pvt_v2, swin_transformer, vision_transformer

        _SOFTMAX_ATTENTION_TYPES = (
            vision_transformer.Attention,
            swin_transformer.WindowAttention,
            pvt_v2.Attention,
        )
    return _SOFTMAX_ATTENTION_TYPES


def attention_counts(model: nn.Module) -> dict[str, int]:
    """``{"linear": L, "total": T}``: how many attention layers of ``model`` are linear, out of all."""
    linear = total = 0
    for module in model.modules():
        if isinstance(module, LinearAttention):
            total += 1
            linear += int(module.is_linear)
        elif isinstance(module, _timm_attention_types()):
            total += 1
    return {"linear": linear, "total": total}


def set_token_grid(model: nn.Module, grid_size: tuple[int, int], num_prefix_tokens: int) -> None:
    """Tell every attention layer of a single-resolution model the token grid of the current input."""
    for module in model.modules():
        if isinstance(module, LinearAttention):
            module.grid_size = grid_size
            module.num_prefix_tokens = num_prefix_tokens


def to_2tuple_int(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    if isinstance(size, torch.Size) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    raise ValueError(f"img_size must be an int or (height, width), got {size!r}")


def init_like_timm(module: nn.Module) -> nn.Module:
    """The init timm's vision transformers give their blocks, on ``module`` (a block built after the model's own
    ``__init__`` ran): linear weights truncated normal with std 0.02 and zero biases, LayerNorms at 1 and 0.
    The feature maps' own parameters (angles, vectors, scales) keep the init their maps define."""
    from timm.layers import trunc_normal_

    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def swap_in(parent: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of ``parent.<name>`` and give it timm's init: the one way a model family that builds
    timm's model first (PVTv2, Swin) puts this package's attention in."""
    setattr(parent, name, init_like_timm(new))
    return new
