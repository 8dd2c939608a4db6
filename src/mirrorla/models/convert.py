"""``mirrorize``: turn a softmax timm ViT/DeiT or Swin into a linear-attention model, in place, keeping
every pretrained weight it can (q/k/v and projections, norms, MLPs), so a softmax checkpoint can be
fine-tuned into MirrorLA."""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from ..attention import LinearAttention
from ._helpers import check_attn, set_token_grid
from .blocks import NHWCGridBlock

__all__ = ["mirrorize"]


def _zero_local_term(layer: LinearAttention) -> None:
    # The local term is new: start it at zero so the converted model differs only by its attention.
    if layer.local is not None:
        nn.init.zeros_(layer.local.weight)
        nn.init.zeros_(layer.local.bias)


def _linear_from_timm_attention(old: Attention, attn: str, attn_kwargs: dict, prefix_tokens: int) -> LinearAttention:
    if not isinstance(getattr(old, "norm", None), nn.Identity) or getattr(old, "gate", None) is not None:
        raise ValueError("mirrorize supports timm Attention without scale_norm and gating")
    dim = old.qkv.in_features
    if old.qkv.out_features != 3 * dim or old.proj.in_features != dim:
        raise ValueError(f"mirrorize needs attention with qkv {dim}→{3 * dim}, got {old.qkv.out_features} outputs")
    new = _rebuilt(old, dim, attn, attn_kwargs, num_prefix_tokens=prefix_tokens)
    _zero_local_term(new)
    return new


def _rebuilt(old: nn.Module, dim: int, attn: str, attn_kwargs: dict, **kwargs) -> LinearAttention:
    """A ``LinearAttention`` shaped like ``old`` (timm's or this package's attention), with ``old``'s projections
    and q/k norms copied exactly, on its device and dtype."""
    qk_norm = not isinstance(old.q_norm, nn.Identity)
    new = LinearAttention(
        dim, old.num_heads, attn=attn, attn_kwargs=attn_kwargs, qkv_bias=old.qkv.bias is not None,
        qk_norm=qk_norm, proj_bias=old.proj.bias is not None, proj_drop=old.proj_drop.p,
        norm_layer=type(old.q_norm) if qk_norm else None, **kwargs,
    ).to(device=old.qkv.weight.device, dtype=old.qkv.weight.dtype)
    for name in ("qkv", "proj", *(("q_norm", "k_norm") if qk_norm else ())):
        getattr(new, name).load_state_dict(getattr(old, name).state_dict())
    return new


def _convert_linear_attention(old: LinearAttention, attn: str, attn_kwargs: dict) -> LinearAttention:
    """A ``LinearAttention`` of this package with another attention: projections, q/k norms and the local term
    are kept; the new feature map starts from its own init."""
    local_kernel = old.local_kernel if old.local is not None else None
    new = _rebuilt(old, old.dim, attn, attn_kwargs, num_prefix_tokens=old.num_prefix_tokens,
                   grid_size=old.grid_size, eps=old.eps, local_kernel=local_kernel)
    if new.local is not None:
        if old.local is not None and old.local.weight.shape == new.local.weight.shape:
            new.local.load_state_dict(old.local.state_dict())
        else:
            _zero_local_term(new)
    return new


def _global_block_from_swin(blk: SwinTransformerBlock, attn: str, attn_kwargs: dict) -> NHWCGridBlock:
    new = NHWCGridBlock.like_swin_block(blk, attn, attn_kwargs)
    for name in ("norm1", "norm2", "mlp"):
        getattr(new, name).load_state_dict(getattr(blk, name).state_dict())
    new.attn.qkv.load_state_dict(blk.attn.qkv.state_dict())
    new.attn.proj.load_state_dict(blk.attn.proj.state_dict())
    _zero_local_term(new.attn)
    return new


def _track_vit_grid(model: VisionTransformer) -> None:
    """Tell the attention layers the token grid of every input (timm's ViT attention never sees it)."""
    prefix = model.num_prefix_tokens
    set_token_grid(model, tuple(model.patch_embed.grid_size), prefix)

    def hook(_module, _inputs, out):
        if out.dim() == 4:  # dynamic_img_size keeps [B, H, W, C] here
            set_token_grid(model, (out.shape[1], out.shape[2]), prefix)

    if not getattr(model, "_mirrorla_grid_hook", False):
        model.patch_embed.register_forward_hook(hook)
        model._mirrorla_grid_hook = True


@torch.no_grad()
def mirrorize(
    model: nn.Module,
    attn: str = "mirror",
    *,
    stages: tuple[int, ...] | None = None,
    **attn_kwargs,
) -> nn.Module:
    """Replace the softmax attention of a timm model by ``LinearAttention(attn, **attn_kwargs)``, in place.

    - ``VisionTransformer`` (ViT, DeiT): every block; q/k/v, q/k norms and the output projection are copied
      exactly.
    - ``SwinTransformer``: the blocks of ``stages`` (default (0, 1), the anchors' hybrid) become one global
      attention over the stage map; norms, MLPs, q/k/v and projections are copied; the relative position
      bias (meaningless without windows) is dropped.
    - A model that already holds this package's ``LinearAttention`` (a converted model, or one of this package's
      models built with any ``attn``, ``"softmax"`` included) is converted to ``attn``: projections, q/k norms
      and the local term are kept, the feature map starts from its init.

    The new local term starts at zero. Returns ``model``.
    """
    check_attn(attn)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, LinearAttention)]
    if any(child.sr is not None for _, _, child in targets):  # checked before anything changes
        raise ValueError("mirrorize cannot convert spatially reduced attention (PVT v1, sr_ratio > 1); rebuild the "
                         "model with attn=... instead")
    for parent, name, child in targets:
        setattr(parent, name, _convert_linear_attention(child, attn, attn_kwargs))
    found = bool(targets)
    if isinstance(model, VisionTransformer):
        prefix = model.num_prefix_tokens
        for blk in model.blocks:
            old = blk.attn
            if isinstance(old, LinearAttention):
                continue
            if not isinstance(old, Attention):
                raise ValueError(f"mirrorize supports timm's vision_transformer.Attention, got {type(old).__name__}")
            blk.attn = _linear_from_timm_attention(old, attn, attn_kwargs, prefix)
        _track_vit_grid(model)
        return model
    if isinstance(model, SwinTransformer):
        stages = (0, 1) if stages is None else tuple(stages)
        for i in stages:
            if not 0 <= i < len(model.layers):
                raise ValueError(f"stages must index the {len(model.layers)} Swin stages, got {i}")
            stage = model.layers[i]
            stage.blocks = nn.Sequential(*(
                _global_block_from_swin(blk, attn, attn_kwargs) if isinstance(blk, SwinTransformerBlock) else blk
                for blk in stage.blocks
            ))
        return model
    if found:
        return model
    raise TypeError(
        f"mirrorize supports timm VisionTransformer and SwinTransformer models, got {type(model).__name__}"
    )
