"""Non-causal linear attention: the O(N) core shared by every linear feature map, and its N×N reference."""

from __future__ import annotations

import torch

from ..backend import select_backend
from ._checks import check_eps, check_floating, check_rank
from .fused import _use_kernel, folded_angles, folded_mirror_map, rotate_relu
from .reference import FEATURES, _accumulation_dtype, _linear_attention_torch
from .reflect import check_delta_form, check_pairing

__all__ = ["MAPPED_FEATURES", "linear_attention", "linear_attention_reference", "mapped_linear_attention",
           "mirror_linear_attention"]

MAPPED_FEATURES = FEATURES


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_rank("q", q, 4, "[B, H, N, dq]")
    check_rank("k", k, 4, "[B, H, N, dq]")
    check_rank("v", v, 4, "[B, H, N, dv]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(name, t)
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share batch, heads and feature dim: q {tuple(q.shape)} vs k {tuple(k.shape)} "
            "(expected [B, H, N, dq] for both)"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must match k in batch, heads and tokens: v {tuple(v.shape)} vs k {tuple(k.shape)} "
            "(expected v [B, H, N, dv])"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k need at least one token, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Mean-normalised linear attention, ``o_i = φq_iᵀ S / (φq_iᵀ z̄ + eps)``.

    ``S = (1/N) Σ_j φk_j v_jᵀ`` and ``z̄ = (1/N) Σ_j φk_j`` (docs/method.md §2.4).

    Args:
        q: feature-mapped (non-negative) queries ``[B, H, Nq, dq]``.
        k: feature-mapped (non-negative) keys ``[B, H, N, dq]``.
        v: values ``[B, H, N, dv]``.
        eps: added to the normaliser.

    Returns:
        ``[B, H, Nq, dv]`` in v's dtype. The reduction and the normaliser always run in fp32, also under
        autocast, because the KV state of thousands of tokens overflows fp16. On CUDA the Triton kernels run it
        (:mod:`mirrorla.backend` decides), reading q, k, v in their own dtype; the torch version converts half
        precision inputs a chunk of tokens at a time, forward and backward (no whole fp32 copies).
    """
    _check_qkv(q, k, v)
    eps = check_eps("eps", eps)
    if select_backend(q, k, v) == "triton":
        from .triton_linear_attention import fused_linear_attention

        return fused_linear_attention(q, k, v, feature="identity", eps=eps)
    return _linear_attention_torch(q, k, v, eps=eps)


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    eps: float = 1e-6,
    return_attn: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same result as :func:`linear_attention`, through the explicit N×N attention matrix.

    ``A = φQ φKᵀ / N``, ``attn = A / (A·1 + eps)``, ``o = attn V``. O(N²): for tests and attention maps.

    Returns:
        ``o`` ``[B, H, Nq, dv]`` (v's dtype), and with ``return_attn`` also ``attn`` ``[B, H, Nq, N]``
        (fp32, or fp64 for fp64 inputs).
    """
    _check_qkv(q, k, v)
    eps = check_eps("eps", eps)
    with torch.autocast(device_type=q.device.type, enabled=False):
        acc = _accumulation_dtype(q, k, v)
        a = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) / k.shape[2]
        attn = a / (a.sum(dim=-1, keepdim=True) + eps)
        out = torch.matmul(attn, v.to(acc)).to(v.dtype)
    return (out, attn) if return_attn else out


def mapped_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature: str = "identity",
    angle: torch.Tensor | None = None,
    pairing: str = "adjacent",
    eps: float = 1e-6,
) -> torch.Tensor:
    """:func:`linear_attention` of ``φ(q), φ(k), v`` for an element-wise φ, fused where a backend can.

    Args:
        q, k, v: ``[B, H, Nq, d]``, ``[B, H, N, d]``, ``[B, H, N, dv]`` (any float dtype, strided views allowed).
        feature: ``"identity"``, ``"relu"`` or ``"rotate_relu"`` (ReLU of each channel pair rotated by ``angle``:
            MirrorLA's per-sample step once its static reflections are folded into the projections).
        angle: ``[1 or B, H, d/2]`` rotation angles, for ``rotate_relu`` only (differentiable).
        pairing: channel pairs ``"adjacent"`` ``(2i, 2i+1)`` or ``"half"`` ``(i, i + d/2)``.

    Returns:
        ``[B, H, Nq, dv]`` in v's dtype. The Triton backend never writes φ(q), φ(k) to memory; on CPUs the C++
        kernel applies ``rotate_relu`` (forward and backward) before the torch core; otherwise the torch core maps q
        and k itself, for half-precision inputs a chunk of tokens at a time (no whole fp32 q, k, φ(q) or φ(k)).
    """
    _check_qkv(q, k, v)
    eps = check_eps("eps", eps)
    if feature not in MAPPED_FEATURES:
        raise ValueError(f"feature must be one of {MAPPED_FEATURES}, got {feature!r}")
    check_pairing(pairing)
    if feature == "rotate_relu":
        b, h, _, d = q.shape
        if angle is None or angle.dim() != 3 or angle.shape[1:] != (h, d // 2) or angle.shape[0] not in (1, b):
            raise ValueError(f"angle must have shape [1 or B, H, d/2] = [1 or {b}, {h}, {d // 2}] for "
                             f"feature='rotate_relu', got {None if angle is None else tuple(angle.shape)}")
        if d % 2:
            raise ValueError(f"rotate_relu pairs channels: d must be even, got {d}")
    elif angle is not None:
        raise ValueError(f"angle is only used by feature='rotate_relu', got feature={feature!r}")
    tensors = (q, k, v) if angle is None else (q, k, v, angle)
    if select_backend(*tensors) == "triton":
        from .triton_linear_attention import fused_linear_attention

        return fused_linear_attention(q, k, v, angle, feature=feature, pairing=pairing, eps=eps)
    if feature == "rotate_relu" and _use_kernel(q, k, angle):  # the C++ kernel maps (fp32 out), the core sums
        q, k = rotate_relu(q, angle, pairing=pairing), rotate_relu(k, angle, pairing=pairing)
        feature, angle = "identity", None
    return _linear_attention_torch(q, k, v, eps=eps, feature=feature, angle=angle, pairing=pairing)


def mirror_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    gamma: torch.Tensor,
    *,
    pairing: str = "adjacent",
    delta_form: str = "tanh_log",
    map_eps: float = 1e-6,
    eps: float = 1e-6,
) -> torch.Tensor:
    """MirrorLA's folded per-sample step and linear attention in one op: σ² of the folded keys, the angles
    ``2Θ = 2(θ + Δα(σ²))`` and ``φ = ReLU(R(2Θ)·)`` of q and k (:func:`~mirrorla.ops.folded_mirror_map`), then
    :func:`linear_attention` of ``φ(q), φ(k), v``.

    Args:
        q, k, v: folded queries and keys ``[B, H, Nq, d]``, ``[B, H, N, d]`` (d even) and values ``[B, H, N, dv]``.
        theta, gamma: ``[H, d/2]`` angles and modulation gains.
        pairing, delta_form, map_eps: the map's channel pairs, Δα form and ε (see :func:`folded_mirror_map`).
        eps: added to the attention's normaliser.

    Returns:
        ``[B, H, Nq, dv]`` in v's dtype, differentiable in q, k (also through σ²), v, θ and γ. The Triton
        backend runs it in the attention kernels; on CPUs the C++ kernel maps q and k; otherwise the torch core
        maps them a chunk of tokens at a time (half-precision inputs: no whole fp32 copy of q, k, φ(q) or φ(k)).
    """
    _check_qkv(q, k, v)
    check_pairing(pairing)
    check_delta_form(delta_form)
    map_eps, eps = check_eps("map_eps", map_eps, positive=True), check_eps("eps", eps)
    b, h, _, d = q.shape
    if d % 2:
        raise ValueError(f"the map pairs channels: d must be even, got q {tuple(q.shape)}")
    for name, t in (("theta", theta), ("gamma", gamma)):
        check_floating(name, t)
        if tuple(t.shape) != (h, d // 2):
            raise ValueError(f"{name} must have shape [H, d/2] = [{h}, {d // 2}], got {tuple(t.shape)}")
    return _mirror_linear_attention(q, k, v, theta, gamma, pairing, delta_form, map_eps, eps)


def _mirror_linear_attention(q, k, v, theta, gamma, pairing: str, delta_form: str, map_eps: float, eps: float):
    """:func:`mirror_linear_attention`'s dispatch, for arguments already checked (``MirrorFeatureMap.attend`` checks
    its own: each check is host time in every layer's forward)."""
    if select_backend(q, k, v) == "triton":  # (the Triton op takes θ, γ in fp32 whatever their dtype)
        from .triton_linear_attention import mirror_linear_attention as mirror_linear_attention_triton

        return mirror_linear_attention_triton(q, k, v, theta, gamma, pairing=pairing, delta_form=delta_form,
                                              map_eps=map_eps, eps=eps)
    if _use_kernel(q, k, theta, gamma):
        phi_q, phi_k = folded_mirror_map(q, k, theta, gamma, eps=map_eps, delta_form=delta_form, pairing=pairing)
        return _linear_attention_torch(phi_q, phi_k, v, eps=eps)
    angle = folded_angles(k, theta, gamma, eps=map_eps, delta_form=delta_form, pairing=pairing)
    return _linear_attention_torch(q, k, v, eps=eps, feature="rotate_relu", angle=angle, pairing=pairing)
