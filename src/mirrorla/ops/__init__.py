"""Pure functions (no parameters): the linear-attention core, its N×N reference, the reflections and the fused
per-sample step of the MirrorLA map (with pure-PyTorch references)."""

from ..backend import select_backend
from .fused import (
    cpu_kernels_available,
    cpu_kernels_status,
    folded_angles,
    folded_mirror_map,
    folded_mirror_map_reference,
    folded_variance,
    rotate_relu,
    rotate_relu_reference,
    token_sums,
    token_sums_reference,
)
from .linear_attention import (
    linear_attention,
    linear_attention_reference,
    mapped_linear_attention,
    mirror_linear_attention,
)
from .reflect import (
    DELTA_FORMS,
    PAIRINGS,
    block_reflect,
    block_variance,
    check_delta_form,
    check_pairing,
    cross_head_reflect,
    householder_reflect,
    pair_channels,
    reflect_projection_rows,
    rotate_pairs,
    token_moments,
    unpair_channels,
)

__all__ = [
    "DELTA_FORMS",
    "PAIRINGS",
    "block_reflect",
    "block_variance",
    "check_delta_form",
    "check_pairing",
    "cpu_kernels_available",
    "cpu_kernels_status",
    "folded_angles",
    "folded_mirror_map",
    "folded_mirror_map_reference",
    "folded_variance",
    "cross_head_reflect",
    "householder_reflect",
    "linear_attention",
    "linear_attention_reference",
    "mapped_linear_attention",
    "mirror_linear_attention",
    "pair_channels",
    "reflect_projection_rows",
    "rotate_pairs",
    "rotate_relu",
    "rotate_relu_reference",
    "select_backend",
    "token_moments",
    "token_sums",
    "token_sums_reference",
    "unpair_channels",
]
