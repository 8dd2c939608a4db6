"""Non-causal linear attention: the O(N) core shared by every linear feature map, and its N×N reference."""

from __future__ import annotations

import torch

from ..backend import select_backend
from ._checks import check_floating, check_rank
from .fused import rotate_relu
from .reflect import _tracing, check_pairing

__all__ = ["MAPPED_FEATURES", "linear_attention", "linear_attention_reference", "mapped_linear_attention"]

MAPPED_FEATURES = ("identity", "relu", "rotate_relu")


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


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64: never accumulate in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
        precision inputs a chunk of tokens at a time where no gradient is needed (no whole fp32 copies).
    """
    _check_qkv(q, k, v)
    if select_backend(q, k, v) == "triton":
        from .triton_linear_attention import fused_linear_attention

        return fused_linear_attention(q, k, v, feature="identity", eps=eps)
    return _linear_attention_torch(q, k, v, eps=eps)


_CHUNK_TOKENS = 4096  # tokens converted to fp32 at a time where the inputs are half precision and no gradient is needed


def _linear_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float) -> torch.Tensor:
    acc = _accumulation_dtype(q, k, v)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    converts = q.dtype != acc or k.dtype != acc or v.dtype != acc
    if converts and not needs_grad and not _tracing():
        return _linear_attention_chunked(q, k, v, eps=eps, acc=acc)
    out_dtype = v.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
        inv_n = 1.0 / k.shape[2]
        kv = torch.matmul(kf.transpose(-2, -1), vf).mul_(inv_n)  # [B, H, dq, dv]
        k_mean = kf.mean(dim=2).unsqueeze(-1)  # [B, H, dq, 1]
        # numerator and normaliser in one pass over q: q · [S | z̄]
        num_den = torch.matmul(qf, torch.cat([kv, k_mean], dim=-1))  # [B, H, Nq, dv + 1]
        dv = v.shape[-1]
        out = num_den[..., :dv] / num_den[..., dv:].add_(eps)
    return out.to(out_dtype)


def _linear_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float,
                              acc: torch.dtype) -> torch.Tensor:
    """The reference core for half-precision inputs without autograd: the same fp32 state and normaliser, built
    from chunks of ``_CHUNK_TOKENS`` tokens converted at a time, so no fp32 copy of a whole q, k or v is made
    (with autograd the converted inputs are saved for the backward anyway, and the plain path runs)."""
    b, h, n, d = k.shape
    nq, dv = q.shape[2], v.shape[3]
    with torch.autocast(device_type=q.device.type, enabled=False):
        state = torch.zeros(b, h, d, dv + 1, device=q.device, dtype=acc)  # [S | z], sums over tokens
        for start in range(0, n, _CHUNK_TOKENS):
            kc = k[:, :, start:start + _CHUNK_TOKENS].to(acc)
            state[..., :dv].add_(torch.matmul(kc.transpose(-2, -1), v[:, :, start:start + _CHUNK_TOKENS].to(acc)))
            state[..., dv].add_(kc.sum(dim=2))
        state.mul_(1.0 / n)
        out = torch.empty(b, h, nq, dv, device=q.device, dtype=v.dtype)
        for start in range(0, nq, _CHUNK_TOKENS):
            num_den = torch.matmul(q[:, :, start:start + _CHUNK_TOKENS].to(acc), state)
            out[:, :, start:start + _CHUNK_TOKENS] = num_den[..., :dv] / num_den[..., dv:].add_(eps)
    return out


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
        ``[B, H, Nq, dv]`` in v's dtype. The Triton backend never writes φ(q), φ(k) to memory; the torch backend
        maps in torch (the fused CPU kernel where no gradient is needed) and runs the reference core.
    """
    _check_qkv(q, k, v)
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
    if feature == "relu":
        q, k = torch.relu(q), torch.relu(k)
    elif feature == "rotate_relu":
        q, k = rotate_relu(q, angle, pairing=pairing), rotate_relu(k, angle, pairing=pairing)
    return _linear_attention_torch(q, k, v, eps=eps)
