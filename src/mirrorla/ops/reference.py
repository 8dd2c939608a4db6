"""The pure-PyTorch references of the fused ops: the linear-attention core and MirrorLA's per-sample step.

The fast kernels (``ops/csrc``, ``ops/triton_*.py``) are tested against these, and the Triton ops fall back to
them where a GPU cannot run a kernel configuration; the dispatching functions in :mod:`mirrorla.ops.fused` and
:mod:`mirrorla.ops.linear_attention` re-export them. Nothing here dispatches, so every module of ``ops`` may import
this one.
"""

from __future__ import annotations

import torch

from .reflect import DELTA_FORMS, _functorch_active, _tracing, pair_channels, rotate_pairs, token_moments

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


_CHUNK_TOKENS = 4096  # tokens converted to fp32 at a time where the inputs are half precision


def _linear_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float) -> torch.Tensor:
    acc = _accumulation_dtype(q, k, v)
    converts = q.dtype != acc or k.dtype != acc or v.dtype != acc
    if converts and not _tracing() and not _functorch_active():
        # half-precision inputs: a chunk of tokens in fp32 at a time, never a whole fp32 copy (compilers and
        # exporters get the plain form below, whose conversions they fuse; torch.func transforms too, which an
        # autograd Function without setup_context, and writes into a fresh output, would not survive)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _ChunkedLinearAttention.apply(q, k, v, eps)
        return _chunked_output(q, _chunked_state(k, v, acc), eps, v.dtype)
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


def _chunks(x: torch.Tensor, acc: torch.dtype):
    """(start, the chunk in ``acc``) for each run of :data:`_CHUNK_TOKENS` tokens of ``x`` ``[B, H, N, d]``."""
    for start in range(0, x.shape[2], _CHUNK_TOKENS):
        yield start, x[:, :, start:start + _CHUNK_TOKENS].to(acc)


def _chunked_state(k: torch.Tensor, v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The mean-form state ``[S | z̄]`` ``[B, H, d, dv + 1]`` in ``acc``, ``S = (1/N) Σ k vᵀ``, ``z̄ = (1/N) Σ k``,
    from chunks of tokens converted one at a time."""
    b, h, n, d = k.shape
    dv = v.shape[3]
    with torch.autocast(device_type=k.device.type, enabled=False):
        state = torch.zeros(b, h, d, dv + 1, device=k.device, dtype=acc)
        for start, kc in _chunks(k, acc):
            state[..., :dv].add_(torch.matmul(kc.transpose(-2, -1), v[:, :, start:start + _CHUNK_TOKENS].to(acc)))
            state[..., dv].add_(kc.sum(dim=2))
        return state.mul_(1.0 / n)


def _chunked_output(q: torch.Tensor, state: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """``o = q S / (q z̄ + eps)`` ``[B, H, Nq, dv]`` in ``dtype`` from the state ``[S | z̄]``, a chunk of queries at a
    time."""
    dv = state.shape[-1] - 1
    with torch.autocast(device_type=q.device.type, enabled=False):
        out = torch.empty(*q.shape[:3], dv, device=q.device, dtype=dtype)
        for start, qc in _chunks(q, state.dtype):
            num_den = torch.matmul(qc, state)
            out[:, :, start:start + _CHUNK_TOKENS] = num_den[..., :dv] / num_den[..., dv:].add_(eps)
        return out


class _ChunkedLinearAttention(torch.autograd.Function):
    """The torch core for half-precision inputs under autograd: forward and backward convert a chunk of tokens to
    fp32 at a time and save the inputs in their own dtype and the fp32 state ``[B, H, d, dv + 1]``, where autograd
    through the plain form saved whole fp32 copies of q, k and v and the fp32 ``[B, H, Nq, dv + 1]`` products.

    Backward, with ``num = q S``, ``den = q z̄ + eps`` and g the output's gradient: ``dnum = g / den``,
    ``dden = −(g · num) / den²``, ``dq = [dnum | dden] [S | z̄]ᵀ``, ``d[S | z̄] = Σ qᵀ [dnum | dden]``; then per key
    ``dk = (dS v + dz̄) / N`` and ``dv = dSᵀ k / N``. Gradients come in their inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, eps):
        acc = _accumulation_dtype(q, k, v)
        state = _chunked_state(k, v, acc)
        ctx.save_for_backward(q, k, v, state)
        ctx.eps = eps
        return _chunked_output(q, state, eps, v.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, state = ctx.saved_tensors
        n, dv, acc = k.shape[2], v.shape[3], state.dtype
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = torch.empty_like(q, memory_format=torch.contiguous_format) if need_q else None
        with torch.autocast(device_type=q.device.type, enabled=False):
            dstate = torch.zeros_like(state)
            state_t = state.transpose(-2, -1)
            for start, qc in _chunks(q, acc):
                end = start + _CHUNK_TOKENS
                num_den = torch.matmul(qc, state)
                inv_den = num_den[..., dv:].add_(ctx.eps).reciprocal_()  # [B, H, c, 1]
                g = grad[:, :, start:end].to(acc)
                dnum_dden = torch.cat([g * inv_den, (g * num_den[..., :dv]).sum(-1, keepdim=True)
                                       .mul_(inv_den).mul_(inv_den).neg_()], dim=-1)  # [B, H, c, dv + 1]
                if need_q:
                    dq[:, :, start:end] = torch.matmul(dnum_dden, state_t)
                if need_k or need_v:
                    dstate.add_(torch.matmul(qc.transpose(-2, -1), dnum_dden))
            dstate.mul_(1.0 / n)
            ds, dz = dstate[..., :dv], dstate[..., dv:].transpose(-2, -1)  # [B, H, d, dv], [B, H, 1, d]
            dk = torch.empty_like(k, memory_format=torch.contiguous_format) if need_k else None
            dvv = torch.empty_like(v, memory_format=torch.contiguous_format) if need_v else None
            for start, kc in _chunks(k, acc) if need_k or need_v else ():
                end = start + _CHUNK_TOKENS
                if need_k:
                    dk[:, :, start:end] = torch.matmul(v[:, :, start:end].to(acc), ds.transpose(-2, -1)).add_(dz)
                if need_v:
                    dvv[:, :, start:end] = torch.matmul(kc, ds)
        return dq, dk, dvv, None


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
