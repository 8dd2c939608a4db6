"""Argument checks shared by the ops: every error names the argument and the expected shape."""

from __future__ import annotations

import math
import numbers

import torch


def check_rank(name: str, x: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {tuple(x.shape)}")


def check_even_last_dim(name: str, x: torch.Tensor) -> None:
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(
            f"{name} must have an even last dimension (channels are reflected in pairs), "
            f"got shape {tuple(x.shape)}"
        )


def check_floating(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_eps(name: str, eps, *, positive: bool = False) -> float:
    """``eps`` as a float if it is a finite real number ≥ 0 (> 0 with ``positive``), else a one-line ``ValueError``.
    A negative normaliser offset can make ``φqᵀz + eps`` cross zero (inf and NaN outputs); the variance
    modulation's ε is taken in ``log(σ² + ε)`` and ``1/√(σ² + ε)``, where σ² = 0 (e.g. zero keys) needs ε > 0."""
    bound = "> 0" if positive else ">= 0"
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0 or (
            positive and eps == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {eps!r}")
    return float(eps)
