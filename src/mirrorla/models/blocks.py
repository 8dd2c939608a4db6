"""Transformer blocks built around :class:`LinearAttention` for the hierarchical models."""

from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp
from torch import nn

from ..attention import LinearAttention

__all__ = ["GridBlock", "NHWCGridBlock"]


class GridBlock(nn.Module):
    """Pre-norm block ``x + attn(norm(x)); x + mlp(norm(x))`` on tokens ``[B, N, C]`` of a known grid."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        attn: str = "mirror",
        attn_kwargs: dict | None = None,
        qkv_bias: bool = True,
        sr_ratio: int = 1,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = LinearAttention(
            dim, num_heads, attn=attn, attn_kwargs=attn_kwargs, qkv_bias=qkv_bias, sr_ratio=sr_ratio,
            attn_drop=attn_drop, proj_drop=proj_drop, num_prefix_tokens=0,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid_size=grid_size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class NHWCGridBlock(GridBlock):
    """:class:`GridBlock` on channels-last maps ``[B, H, W, C]`` (the layout of timm's Swin stages):
    one global attention over the whole map instead of (shifted) windows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, h, w, c = x.shape
        return super().forward(x.reshape(b, h * w, c), (h, w)).reshape(b, h, w, c)

    @classmethod
    def like_swin_block(cls, blk: nn.Module, attn: str, attn_kwargs: dict | None) -> NHWCGridBlock:
        """A global block of the shape of timm's ``SwinTransformerBlock`` ``blk`` (width, heads, MLP ratio, qkv
        bias, drop path), on ``blk``'s device and dtype; its weights are new (see ``mirrorize`` to copy them)."""
        dim = blk.norm1.normalized_shape[0]
        return cls(
            dim, blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / dim, attn=attn, attn_kwargs=attn_kwargs,
            qkv_bias=blk.attn.qkv.bias is not None, drop_path=getattr(blk.drop_path1, "drop_prob", 0.0),
        ).to(device=blk.attn.qkv.weight.device, dtype=blk.attn.qkv.weight.dtype)
