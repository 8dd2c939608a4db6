"""The pure-PyTorch references of the fused ops: the linear-attention core and MirrorLA's per-sample step.

The fast kernels (``ops/csrc``, ``ops/triton_*.py``) are tested against these, and the Triton ops fall back to
them where a GPU cannot run a kernel configuration; the dispatching functions in :mod:`mirrorla.ops.fused` and
:mod:`mirrorla.ops.linear_attention` re-export them. Nothing here dispatches, so every module of ``ops`` may import
this one.
"""

from __future__ import annotations

import torch

from .reflect import (
    DELTA_FORM_SLOPES,
    DELTA_FORMS,
    _functorch_active,
    _tracing,
    pair_channels,
    rotate_pairs,
    token_moments,
)

__all__ = [
    "angles_from_sums",
    "angles_from_sums_backward",
    "folded_mirror_map_reference",
    "folded_variance",
    "rotate_relu_reference",
    "token_sums_backward",
    "token_sums_reference",
]


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64: never accumulate in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


_CHUNK_TOKENS = 4096
"""The most tokens converted to fp32 at a time where the inputs are half precision."""
_CHUNK_ELEMENTS = 1 << 22
"""...and the most elements (16 MB in fp32) of one converted chunk ``[B, H, tokens, d]`` above
:data:`_MIN_CHUNK_TOKENS`: large batches take shorter chunks, so the chunks' memory does not grow with B·H."""
_MIN_CHUNK_TOKENS = 64  # fewer tokens per chunk would cost more per-op overhead than the memory is worth


def _chunk_tokens(x: torch.Tensor) -> int:
    """Tokens per converted chunk of ``x`` ``[B, H, N, d]``."""
    per_token = max(1, x.shape[0] * x.shape[1] * x.shape[3])
    return min(_CHUNK_TOKENS, max(_MIN_CHUNK_TOKENS, _CHUNK_ELEMENTS // per_token))


FEATURES = ("identity", "relu", "rotate_relu")
"""The element-wise maps the torch core can apply to q and k itself (as the fused kernels do): φ(x) = x,
ReLU(x) and ReLU(R(angle)·x)."""


def _linear_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float,
                            feature: str = "identity", angle: torch.Tensor | None = None,
                            pairing: str = "adjacent") -> torch.Tensor:
    """The torch core: ``o = φq S / (φq z̄ + eps)`` ``[B, H, Nq, dv]`` in v's dtype, φ one of :data:`FEATURES`
    (``angle`` ``[1 or B, H, d/2]`` for ``rotate_relu``), the state and normaliser in fp32 (fp64 for fp64 inputs).

    Half-precision inputs are converted and mapped a chunk of tokens at a time, forward and backward: neither an
    fp32 copy of q, k or v nor φ(q), φ(k) is ever made whole. Other inputs take the plain form (φ, then three
    matmuls), as do compilers, exporters and ``torch.func`` transforms."""
    acc = _accumulation_dtype(q, k, v)
    converts = q.dtype != acc or k.dtype != acc or v.dtype != acc
    if converts and not _tracing() and not _functorch_active():
        # (compilers and exporters get the plain form, whose conversions they fuse; torch.func transforms too,
        # which an autograd Function without setup_context, and writes into a fresh output, would not survive)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, angle)):
            return _ChunkedLinearAttention.apply(q, k, v, angle, feature, pairing, eps)
        features = _Features(feature, angle, pairing, acc)
        return _chunked_output(q, _chunked_state(k, v, features), eps, v.dtype, features)
    if feature == "relu":
        q, k = torch.relu(q), torch.relu(k)
    elif feature == "rotate_relu":
        q = rotate_relu_reference(q, angle.unsqueeze(2), pairing=pairing)
        k = rotate_relu_reference(k, angle.unsqueeze(2), pairing=pairing)
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


class _Features:
    """φ on chunks of tokens in the accumulation dtype ``acc``, and its backward."""

    def __init__(self, feature: str, angle: torch.Tensor | None, pairing: str, acc: torch.dtype) -> None:
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        self.feature, self.pairing, self.acc = feature, pairing, acc
        # [1 or B, H, 1, d/2]: one angle per (sample, head, pair), broadcast over the tokens
        self.angle = None if angle is None else angle.detach().to(acc).unsqueeze(2)
        self.inverse_angle = None if angle is None else -self.angle  # R(a)ᵀ = R(−a), for the backward

    def chunks(self, x: torch.Tensor, *, backward: bool = False):
        """``(start, end, x, y, φ)`` for each chunk of tokens of ``x`` ``[B, H, N, d]`` (:func:`_chunk_tokens`): the
        chunk in ``acc`` (for ``relu``, φ itself where the conversion made a copy) and the rotated chunk before the
        ReLU (``rotate_relu`` only) where ``backward`` needs them (else None: freed at once), and φ of it."""
        step = _chunk_tokens(x)
        for start in range(0, x.shape[2], step):
            xc = x[:, :, start:start + step].to(self.acc)
            copied = x.dtype != self.acc
            if self.feature == "identity":
                phi = xc
            elif self.feature == "relu":  # in place where .to made a copy: φ's sign is x's, all the backward needs
                phi = xc = xc.relu_() if copied else xc.relu()
            else:
                (y,) = rotate_pairs(xc, angle=self.angle, pairing=self.pairing)
                phi = y.relu() if backward else y.relu_()
                yield start, start + step, xc if backward else None, y if backward else None, phi
                continue
            yield start, start + step, xc if backward else None, None, phi

    def backward(self, x: torch.Tensor, y: torch.Tensor | None, dphi: torch.Tensor):
        """``(dx, d angle [B, H, d/2] or None)`` of a chunk from φ's gradient. Where the ReLU is off the gradient is
        0 (selected, not multiplied: an infinite gradient there gives 0, not NaN)."""
        if self.feature == "identity":
            return dphi, None
        if self.feature == "relu":  # x may be φ itself: x > 0 exactly where φ > 0
            return _relu_backward(dphi, x), None
        dy = _relu_backward(dphi, y)
        (dx,) = rotate_pairs(dy, angle=self.inverse_angle, pairing=self.pairing)
        # d y / d a = (−y₁, y₀) for each pair (y₀, y₁) = R(a)·(x₀, x₁)
        yp, dyp = pair_channels(y, self.pairing), pair_channels(dy, self.pairing)
        dangle = (dyp[..., 1] * yp[..., 0] - dyp[..., 0] * yp[..., 1]).sum(2)
        return dx, dangle


def _relu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ReLU's gradient: ``grad`` where ``x > 0``, else 0 (one fused op, as autograd's own)."""
    return torch.ops.aten.threshold_backward(grad, x, 0)


def _chunked_state(k: torch.Tensor, v: torch.Tensor, features: _Features) -> torch.Tensor:
    """The mean-form state ``[S | z̄]`` ``[B, H, d, dv + 1]`` in ``acc``, ``S = (1/N) Σ φk vᵀ``, ``z̄ = (1/N) Σ φk``,
    from chunks of tokens converted and mapped one at a time."""
    b, h, n, d = k.shape
    dv, acc = v.shape[3], features.acc
    with torch.autocast(device_type=k.device.type, enabled=False):
        state = torch.zeros(b, h, d, dv + 1, device=k.device, dtype=acc)
        for start, end, _, _, phi in features.chunks(k):
            state[..., :dv].add_(torch.matmul(phi.transpose(-2, -1), v[:, :, start:end].to(acc)))
            state[..., dv].add_(phi.sum(dim=2))
        return state.mul_(1.0 / n)


def _chunked_output(q: torch.Tensor, state: torch.Tensor, eps: float, dtype: torch.dtype,
                    features: _Features) -> torch.Tensor:
    """``o = φq S / (φq z̄ + eps)`` ``[B, H, Nq, dv]`` in ``dtype`` from the state ``[S | z̄]``, a chunk of queries
    at a time."""
    dv = state.shape[-1] - 1
    with torch.autocast(device_type=q.device.type, enabled=False):
        out = torch.empty(*q.shape[:3], dv, device=q.device, dtype=dtype)
        for start, end, _, _, phi in features.chunks(q):
            num_den = torch.matmul(phi, state)
            out[:, :, start:end] = num_den[..., :dv] / num_den[..., dv:].add_(eps)
        return out


class _ChunkedLinearAttention(torch.autograd.Function):
    """The torch core for half-precision inputs under autograd: forward and backward convert and map a chunk of
    tokens at a time and save the inputs in their own dtype and the fp32 state ``[B, H, d, dv + 1]``, where
    autograd through the plain form saved whole fp32 copies of q, k and v (and φ of them) and the fp32
    ``[B, H, Nq, dv + 1]`` products.

    Backward, with ``num = φq S``, ``den = φq z̄ + eps`` and g the output's gradient: ``dnum = g / den``,
    ``dden = −(g · num) / den²``, ``dφq = [dnum | dden] [S | z̄]ᵀ``, ``d[S | z̄] = Σ φqᵀ [dnum | dden]``; then per key
    ``dφk = (dS v + dz̄) / N`` and ``dv = dSᵀ φk / N``; φ's backward per chunk gives dq, dk and the angle's gradient
    (its q and k parts). Gradients come in their inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, angle, feature, pairing, eps):
        features = _Features(feature, angle, pairing, _accumulation_dtype(q, k, v))
        state = _chunked_state(k, v, features)
        ctx.save_for_backward(q, k, v, state)
        ctx.features, ctx.eps = features, eps
        ctx.angle_meta = None if angle is None else (angle.shape[0], angle.dtype)
        return _chunked_output(q, state, eps, v.dtype, features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, state = ctx.saved_tensors
        dq, dk, dv, dangle = _chunked_grads(q, k, v, state, ctx.features, ctx.eps, grad, ctx.needs_input_grad[:4],
                                            angle_batch=ctx.angle_meta[0] if ctx.angle_meta else 1)
        return dq, dk, dv, None if dangle is None else dangle.to(ctx.angle_meta[1]), None, None, None


def _chunked_grads(q, k, v, state, features: _Features, eps: float, grad, needs, *, angle_batch: int = 1):
    """``(dq, dk, dv, d angle)`` of the chunked core for the output's gradient ``grad``, each None where ``needs``
    (four flags) says so; dq, dk, dv in their inputs' dtypes, d angle ``[angle_batch, H, d/2]`` in ``acc``."""
    n, dv, acc = k.shape[2], v.shape[3], state.dtype
    need_q, need_k, need_v, need_angle = needs
    need_angle = need_angle and features.angle is not None
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if need_q else None
    dangle = torch.zeros(*q.shape[:2], q.shape[3] // 2, device=q.device, dtype=acc) if need_angle else None
    with torch.autocast(device_type=q.device.type, enabled=False):
        dstate = torch.zeros_like(state)
        state_t = state.transpose(-2, -1)
        for start, end, qc, yc, phi in features.chunks(q, backward=True):
            num_den = torch.matmul(phi, state)
            inv_den = num_den[..., dv:].add_(eps).reciprocal_()  # [B, H, c, 1]
            g = grad[:, :, start:end].to(acc)
            dnum_dden = torch.cat([g * inv_den, (g * num_den[..., :dv]).sum(-1, keepdim=True)
                                   .mul_(inv_den).mul_(inv_den).neg_()], dim=-1)  # [B, H, c, dv + 1]
            if need_q or need_angle:
                dx, da = features.backward(qc, yc, torch.matmul(dnum_dden, state_t))
                if need_q:
                    dq[:, :, start:end] = dx
                if need_angle:
                    dangle.add_(da)
            if need_k or need_v or need_angle:
                dstate.add_(torch.matmul(phi.transpose(-2, -1), dnum_dden))
        dstate.mul_(1.0 / n)
        ds, dz = dstate[..., :dv], dstate[..., dv:].transpose(-2, -1)  # [B, H, d, dv], [B, H, 1, d]
        dk = torch.empty_like(k, memory_format=torch.contiguous_format) if need_k else None
        dvv = torch.empty_like(v, memory_format=torch.contiguous_format) if need_v else None
        for start, end, kc, yc, phi in features.chunks(k, backward=True) if need_k or need_v or need_angle else ():
            if need_k or need_angle:
                dphi = torch.matmul(v[:, :, start:end].to(acc), ds.transpose(-2, -1)).add_(dz)
                dx, da = features.backward(kc, yc, dphi)
                if need_k:
                    dk[:, :, start:end] = dx
                if need_angle:
                    dangle.add_(da)
            if need_v:
                dvv[:, :, start:end] = torch.matmul(phi, ds)
    if need_angle and angle_batch == 1 and dangle.shape[0] > 1:
        dangle = dangle.sum(0, keepdim=True)
    return dq, dk, dvv, dangle


def _linear_attention_torch_grads(q, k, v, grad, *, eps: float, feature: str = "identity",
                                  angle: torch.Tensor | None = None, pairing: str = "adjacent",
                                  angle_grad: bool = True):
    """``(dq, dk, dv, d angle or None)`` of :func:`_linear_attention_torch` for the output's gradient ``grad``, by
    chunks of tokens and without autograd (the state recomputed): the Triton ops' backward where a GPU cannot run
    a kernel configuration. Gradients in their inputs' dtypes; d angle only where ``angle_grad``."""
    features = _Features(feature, angle, pairing, _accumulation_dtype(q, k, v))
    state = _chunked_state(k, v, features)
    needs = (True, True, True, angle is not None and angle_grad)
    dq, dk, dv, dangle = _chunked_grads(q, k, v, state, features, eps, grad, needs,
                                        angle_batch=1 if angle is None else angle.shape[0])
    return dq, dk, dv, None if dangle is None else dangle.to(angle.dtype)


def rotate_relu_reference(x: torch.Tensor, angle: torch.Tensor, *, pairing: str = "adjacent") -> torch.Tensor:
    """``ReLU(R(angle)·x)`` with plain PyTorch ops (see :func:`rotate_relu`); ``angle`` broadcastable to
    ``[B, H, N, d/2]``."""
    acc = torch.promote_types(x.dtype, torch.float32)
    (rotated,) = rotate_pairs(x.to(acc), angle=angle.to(acc), pairing=pairing)
    return rotated.relu_()


def token_sums_reference(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, 2, d]``: per-channel sum and sum of squares over the tokens of ``x`` ``[B, H, N, d]`` (fp32, or
    fp64 for fp64 input). Half-precision x is converted a chunk of tokens at a time, also under autograd (whose
    backward ``g₁ + 2 g₂ x`` runs by chunks too)."""
    if (x.dtype != _accumulation_dtype(x) and torch.is_grad_enabled() and x.requires_grad and not _tracing()
            and not _functorch_active()):
        return _ChunkedTokenSums.apply(x)
    return _token_sums(x)


def _token_sums(x: torch.Tensor) -> torch.Tensor:
    """The sums of :func:`token_sums_reference` from :func:`token_moments`, half precision by chunks of tokens."""
    mean, mean_sq = token_moments(x, dim=2, chunk=_chunk_tokens(x))
    return torch.stack([mean, mean_sq], dim=2).mul_(x.shape[2])


def token_sums_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient ``g₁ + 2 g₂ x`` ``[B, H, N, d]`` of the token sums of ``x`` for their gradient ``grad``
    ``[B, H, 2, d]``: computed in ``grad``'s dtype (fp32) and rounded to x's dtype once, a chunk of tokens at a
    time, so no whole fp32 tensor is made for half-precision x."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    g1, g2 = grad[:, :, 0:1], grad[:, :, 1:2]
    step = _chunk_tokens(x)
    for start in range(0, x.shape[2], step):
        out[:, :, start:start + step] = torch.addcmul(g1, x[:, :, start:start + step], g2, value=2.0)
    return out


class _ChunkedTokenSums(torch.autograd.Function):
    """:func:`token_sums_reference` of half-precision x under autograd: autograd through the plain form saved an
    fp32 copy of x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _token_sums(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return token_sums_backward(x, grad.to(_accumulation_dtype(x)))


def folded_variance(sums: torch.Tensor, n: int, *, pairing: str = "adjacent") -> torch.Tensor:
    """σ² ``[B, H, d/2]`` of the keys before the static reflection ``H(0)``, from the token sums
    ``[B, H, 2, d]`` of the folded keys ``H(0)·k``.

    ``H(0)`` negates the first channel of each pair: second moments are unchanged and the block mean of the
    unfolded keys is ``(m₁ − m₀)/2``, so σ² = E[a² + b²]/2 − ((m₁ − m₀)/2)².
    """
    return _variance_before_clamp(sums, n, pairing)[1].clamp_min_(0)


def _variance_before_clamp(sums: torch.Tensor, n: int, pairing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m₁ − m₀, σ² before its clamp at 0)``, both ``[B, H, d/2]``, for :func:`folded_variance` and the closed-form
    backward of the angles."""
    paired = pair_channels(sums, pairing)  # [B, H, 2, d/2, 2]
    diff = (paired[:, :, 0, :, 1] - paired[:, :, 0, :, 0]).mul_(1.0 / n)
    mean_sq = paired[:, :, 1].sum(-1).mul_(1.0 / n)
    return diff, torch.addcmul(mean_sq, diff, diff, value=-0.5).mul_(0.5)


def angles_from_sums(sums: torch.Tensor, n: int, theta: torch.Tensor, gamma: torch.Tensor, *, eps: float = 1e-6,
                     delta_form: str = "tanh_log", pairing: str = "adjacent") -> torch.Tensor:
    """The rotation angles ``2Θ = 2(θ + Δα(σ²))`` ``[B, H, d/2]`` from the token sums ``[B, H, 2, d]`` of ``n``
    folded keys (σ² by :func:`folded_variance`); θ, γ ``[H, d/2]``. Differentiable."""
    var = folded_variance(sums, n, pairing=pairing)
    acc = var.dtype
    return (theta.to(acc)[None] + DELTA_FORMS[delta_form](var, gamma.to(acc), eps)).mul(2.0)


def angles_from_sums_backward(sums: torch.Tensor, n: int, theta: torch.Tensor, gamma: torch.Tensor,
                              grad: torch.Tensor, *, eps: float = 1e-6, delta_form: str = "tanh_log",
                              pairing: str = "adjacent") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients ``(d sums [B, H, 2, d], dθ, dγ [H, d/2])`` of :func:`angles_from_sums` for the angles' gradient
    ``grad`` ``[B, H, d/2]``, in closed form (autograd's, without autograd: for the Triton ops' fallback, which runs
    inside a custom op). ``2Θ = 2(θ + γ·f(σ²))``, σ² clamped at 0 as in :func:`folded_variance`."""
    diff, raw = _variance_before_clamp(sums, n, pairing)
    var = raw.clamp_min(0)
    acc = var.dtype
    g = grad.to(acc) * 2.0
    gamma_acc = gamma.to(acc)
    d_theta = g.sum(0)
    d_gamma = (g * DELTA_FORMS[delta_form](var, torch.ones_like(gamma_acc), eps)).sum(0)
    d_var = (g * DELTA_FORM_SLOPES[delta_form](var, gamma_acc, eps)).masked_fill_(raw < 0, 0)  # clamp's: at ≥ 0
    d_sums = torch.zeros_like(sums, dtype=acc)
    d_paired = pair_channels(d_sums, pairing)
    d_diff = d_var * diff * (-0.5 / n)
    d_paired[:, :, 0, :, 0] = -d_diff
    d_paired[:, :, 0, :, 1] = d_diff
    d_paired[:, :, 1] = (d_var * (0.5 / n)).unsqueeze(-1)
    return d_sums, d_theta.to(theta.dtype), d_gamma.to(gamma.dtype)


def folded_mirror_map_reference(q, k, theta, gamma, *, eps=1e-6, delta_form="tanh_log", pairing="adjacent"):
    """:func:`folded_mirror_map` with plain PyTorch ops (differentiable)."""
    angle = angles_from_sums(token_sums_reference(k), k.shape[2], theta, gamma, eps=eps, delta_form=delta_form,
                             pairing=pairing)
    acc = angle.dtype
    acc_q, acc_k = q.to(acc), k.to(acc)
    q, k = rotate_pairs(acc_q, acc_k, angle=angle.unsqueeze(2), pairing=pairing)
    return q.relu_(), k.relu_()
