"""Pure functions (no parameters): the linear-attention core, its N×N reference and the reflections."""

from .linear_attention import linear_attention, linear_attention_reference
from .reflect import (
    PAIRINGS,
    block_reflect,
    block_variance,
    cross_head_reflect,
    householder_reflect,
    pair_channels,
    rotate_pairs,
    token_moments,
    unpair_channels,
)

__all__ = [
    "PAIRINGS",
    "block_reflect",
    "block_variance",
    "cross_head_reflect",
    "householder_reflect",
    "linear_attention",
    "linear_attention_reference",
    "pair_channels",
    "rotate_pairs",
    "token_moments",
    "unpair_channels",
]
