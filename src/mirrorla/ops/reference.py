"""The pure-PyTorch references of the fused ops: the linear-attention core and MirrorLA's per-sample step.

The fast kernels (``ops/csrc``, ``ops/triton_*.py``) are tested against these, and the Triton ops fall back to
them where a GPU cannot run a kernel configuration; the dispatching functions in :mod:`mirrorla.ops.fused` and
:mod:`mirrorla.ops.linear_attention` re-export them. Nothing here dispatches, so every module of ``ops`` may import
this one.
"""

from __future__ import annotations

import torch

from .reflect import DELTA_FORMS, _tracing, pair_channels, rotate_pairs, token_moments

__all__ = [
    "angles_from_sums",
    "folded_mirror_map_reference",
    "folded_variance",
    "rotate_relu_reference",
    "token_sums_reference",
]


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64: never accumulate in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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


def rotate_relu_reference(x: torch.Tensor, angle: torch.Tensor, *, pairing: str = "adjacent") -> torch.Tensor:
    """``ReLU(R(angle)·x)`` with plain PyTorch ops (see :func:`rotate_relu`); ``angle`` broadcastable to
    ``[B, H, N, d/2]``."""
    acc = torch.promote_types(x.dtype, torch.float32)
    (rotated,) = rotate_pairs(x.to(acc), angle=angle.to(acc), pairing=pairing)
    return rotated.relu_()


def token_sums_reference(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, 2, d]``: per-channel sum and sum of squares over the tokens of ``x`` ``[B, H, N, d]``."""
    mean, mean_sq = token_moments(x, dim=2)
    return torch.stack([mean, mean_sq], dim=2).mul_(x.shape[2])


def folded_variance(sums: torch.Tensor, n: int, *, pairing: str = "adjacent") -> torch.Tensor:
    """σ² ``[B, H, d/2]`` of the keys before the static reflection ``H(0)``, from the token sums
    ``[B, H, 2, d]`` of the folded keys ``H(0)·k``.

    ``H(0)`` negates the first channel of each pair: second moments are unchanged and the block mean of the
    unfolded keys is ``(m₁ − m₀)/2``, so σ² = E[a² + b²]/2 − ((m₁ − m₀)/2)².
    """
    paired = pair_channels(sums, pairing)  # [B, H, 2, d/2, 2]
    diff = (paired[:, :, 0, :, 1] - paired[:, :, 0, :, 0]).mul_(1.0 / n)
    mean_sq = paired[:, :, 1].sum(-1).mul_(1.0 / n)
    return torch.addcmul(mean_sq, diff, diff, value=-0.5).mul_(0.5).clamp_min_(0)


def angles_from_sums(sums: torch.Tensor, n: int, theta: torch.Tensor, gamma: torch.Tensor, *, eps: float = 1e-6,
                     delta_form: str = "tanh_log", pairing: str = "adjacent") -> torch.Tensor:
    """The rotation angles ``2Θ = 2(θ + Δα(σ²))`` ``[B, H, d/2]`` from the token sums ``[B, H, 2, d]`` of ``n``
    folded keys (σ² by :func:`folded_variance`); θ, γ ``[H, d/2]``. Differentiable."""
    var = folded_variance(sums, n, pairing=pairing)
    acc = var.dtype
    return (theta.to(acc)[None] + DELTA_FORMS[delta_form](var, gamma.to(acc), eps)).mul(2.0)


def folded_mirror_map_reference(q, k, theta, gamma, *, eps=1e-6, delta_form="tanh_log", pairing="adjacent"):
    """:func:`folded_mirror_map` with plain PyTorch ops (differentiable)."""
    angle = angles_from_sums(token_sums_reference(k), k.shape[2], theta, gamma, eps=eps, delta_form=delta_form,
                             pairing=pairing)
    acc = angle.dtype
    acc_q, acc_k = q.to(acc), k.to(acc)
    q, k = rotate_pairs(acc_q, acc_k, angle=angle.unsqueeze(2), pairing=pairing)
    return q.relu_(), k.relu_()
