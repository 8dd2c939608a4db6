"""Householder reflections used by the MirrorLA feature map (pure functions, no parameters).

A reflection ``H = I − 2uuᵀ/‖u‖²`` is orthogonal and symmetric, so applying the same ``H`` to queries
and keys keeps every inner product ``(Hq)ᵀ(Hk) = qᵀk`` (docs/method.md §1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..backend import DELTA_FORM_CODES, select_backend
from ._checks import check_even_last_dim, check_floating

__all__ = [
    "DELTA_FORMS",
    "PAIRINGS",
    "block_reflect",
    "block_variance",
    "check_delta_form",
    "check_pairing",
    "cross_head_reflect",
    "householder_reflect",
    "reflect_projection_rows",
    "pair_channels",
    "rotate_pairs",
    "token_moments",
    "unpair_channels",
]

PAIRINGS = ("adjacent", "half")


def check_pairing(pairing: str) -> str:
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    return pairing


def check_delta_form(delta_form: str) -> str:
    if delta_form not in DELTA_FORMS:
        raise ValueError(f"delta_form must be one of {sorted(DELTA_FORMS)}, got {delta_form!r}")
    return delta_form


def pair_channels(x: torch.Tensor, pairing: str = "adjacent") -> torch.Tensor:
    """View ``[..., d]`` as ``[..., d/2, 2]`` blocks: ``(2i, 2i+1)`` (adjacent) or ``(i, i+d/2)`` (half)."""
    check_pairing(pairing)
    check_even_last_dim("x", x)
    half = x.shape[-1] // 2
    if pairing == "adjacent":
        return x.unflatten(-1, (half, 2))
    return x.unflatten(-1, (2, half)).transpose(-1, -2)


def unpair_channels(x: torch.Tensor, pairing: str = "adjacent") -> torch.Tensor:
    """Inverse of :func:`pair_channels`: ``[..., d/2, 2]`` → ``[..., d]``."""
    check_pairing(pairing)
    if pairing == "adjacent":
        return x.flatten(-2)
    return x.transpose(-1, -2).flatten(-2)


def block_reflect(x: torch.Tensor, theta: torch.Tensor, *, pairing: str = "adjacent") -> torch.Tensor:
    """Reflect each channel pair of ``x`` by ``H(θ) = [[−cos2θ, −sin2θ], [−sin2θ, cos2θ]]``.

    ``H(θ) = I − 2uuᵀ`` with ``u = (cos θ, sin θ)``, so ‖u‖ = 1 by construction.

    Args:
        x: ``[..., d]`` with d even.
        theta: angles broadcastable to ``[..., d/2]`` (one per block).
        pairing: ``"adjacent"`` pairs channels ``(2i, 2i+1)`` (default, as in the paper's figure);
            ``"half"`` pairs ``(i, i + d/2)``.

    Returns:
        ``[..., d]``, same dtype as ``x``.
    """
    check_floating("x", x)
    check_floating("theta", theta)
    pairs = pair_channels(x, pairing)  # [..., d/2, 2]
    try:
        torch.broadcast_shapes(theta.shape, pairs.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"theta must broadcast to [..., d/2] = {tuple(pairs.shape[:-1])}, got shape {tuple(theta.shape)}"
        ) from None
    two_theta = 2.0 * theta
    cos = torch.cos(two_theta).to(x.dtype).unsqueeze(-1)  # [..., d/2, 1]
    sin = torch.sin(two_theta).to(x.dtype).unsqueeze(-1)
    sign = torch.arange(-1, 2, 2, dtype=x.dtype, device=x.device)  # [−1, 1], made on the device: no host copy
    # y = (−c·x0 − s·x1, −s·x0 + c·x1) = sign ⊙ c ⊙ x − s ⊙ swap(x)
    y = torch.addcmul(-sin * pairs.flip(-1), cos * sign, pairs)
    return unpair_channels(y, pairing)


def _unit(u: torch.Tensor) -> torch.Tensor:
    """u / ‖u‖ in at least fp32: ‖u‖² of a bf16 parameter would round badly."""
    u = u.to(torch.promote_types(u.dtype, torch.float32))
    return u * torch.rsqrt(u.pow(2).sum().clamp_min(1e-12))


def householder_reflect(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x − 2 (uᵀx / ‖u‖²) u`` on the last dimension.

    Args:
        x: ``[..., C]``.
        u: ``[C]``, any non-zero vector (it is normalised here, so it can be a free parameter).

    Returns:
        ``[..., C]`` in x's dtype.
    """
    check_floating("x", x)
    check_floating("u", u)
    if u.dim() != 1 or x.dim() == 0 or u.shape[0] != x.shape[-1]:
        raise ValueError(
            f"u must have shape [C] with C = x.shape[-1] = {x.shape[-1] if x.dim() else '?'}, "
            f"got u {tuple(u.shape)}"
        )
    unit = _unit(u).to(x.dtype)
    proj = torch.matmul(x, unit)  # [...]
    return torch.addcmul(x, proj.unsqueeze(-1), unit, value=-2.0)


def block_variance(x: torch.Tensor, *, pairing: str = "adjacent", dim: int = -2) -> torch.Tensor:
    """Variance of each channel block over the token dimension and the block's two channels.

    Args:
        x: ``[..., N, d]`` (tokens on ``dim``, channels last), d even.
        pairing: how channels form blocks, as in :func:`block_reflect`.
        dim: the token dimension (not the last).

    Returns:
        ``[..., d/2]`` (the token dimension removed), fp32 or wider, population variance over ``2N`` values.
    """
    check_floating("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., N, d], got {tuple(x.shape)}")
    token_dim = dim if dim >= 0 else x.dim() + dim
    if token_dim == x.dim() - 1:
        raise ValueError("dim must be the token dimension, not the channel dimension")
    if x.shape[token_dim] == 0:
        raise ValueError(f"x needs at least one token on dim {dim}, got shape {tuple(x.shape)}")
    mean, mean_sq = token_moments(x, dim=token_dim)  # [..., d] each
    mean, mean_sq = pair_channels(mean, pairing), pair_channels(mean_sq, pairing)
    return (mean_sq.mean(-1) - mean.mean(-1).square()).clamp_min(0)


def token_moments(x: torch.Tensor, *, dim: int = -2, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and mean square over the token dimension, in fp32 or wider: ``[..., N, d] → [..., d]``.

    ``torch.var_mean`` over a non-innermost dimension is ~20× slower on CPUs than a plain mean; long inputs
    are summed in chunks of tokens that stay in cache. Variances from these moments are exact enough for
    angle modulation in fp32 (they are clamped at 0).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    n = x.shape[dim]
    if _tracing() or n <= chunk:
        x = x.to(acc)
        return x.mean(dim=dim), x.square().mean(dim=dim)
    # both sums per chunk: the second read of a chunk hits the cache, so x streams from memory once; half-precision
    # x is converted a chunk at a time, never whole
    total = total_sq = None
    for part in x.split(chunk, dim=dim):
        part = part.to(acc)
        s, sq = part.sum(dim=dim), part.square().sum(dim=dim)
        total = s if total is None else total.add_(s)
        total_sq = sq if total_sq is None else total_sq.add_(sq)
    return total.div_(n), total_sq.div_(n)


def cross_head_reflect(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`householder_reflect` on the concatenated heads of ``x``, without merging them.

    Args:
        x: ``[B, H, N, d]``; head h holds channels ``h·d … h·d + d − 1`` of the model's C = H·d.
        u: ``[H·d]`` reflecting vector spanning all heads (any non-zero vector).

    Returns:
        ``[B, H, N, d]``, equal to splitting ``householder_reflect(merge_heads(x), u)`` into heads.
    """
    check_floating("x", x)
    check_floating("u", u)
    if x.dim() != 4:
        raise ValueError(f"x must have rank 4 ([B, H, N, d]), got shape {tuple(x.shape)}")
    heads, head_dim = x.shape[1], x.shape[3]
    if u.dim() != 1 or u.shape[0] != heads * head_dim:
        raise ValueError(f"u must have shape [H·d] = [{heads * head_dim}], got {tuple(u.shape)}")
    unit = _unit(u).to(x.dtype).view(heads, 1, head_dim)
    proj = (x * unit).sum(dim=(1, 3), keepdim=True)  # [B, 1, N, 1]: uᵀz per token, over all heads
    return torch.addcmul(x, proj, unit, value=-2.0)


class _ReflectProjectionRows(torch.autograd.Function):
    """Autograd of :func:`reflect_projection_rows`: one node with a closed-form backward, so a training step pays
    a dozen small kernels for the fold instead of the fifty-odd that autograd records for the op-by-op version."""

    @staticmethod
    def forward(ctx, weight, bias, u, signs, groups, out_dtype=None):
        # autocast must not turn the fold's matmuls into bf16 ones: the folded weights are computed at the parameters'
        # precision (at least fp32) and rounded once, to out_dtype where the caller gives one
        with torch.autocast(weight.device.type, enabled=False):
            return _ReflectProjectionRows._forward(ctx, weight, bias, u, signs, groups, out_dtype)

    @staticmethod
    def backward(ctx, d_weight, d_bias):
        with torch.autocast(ctx.device_type, enabled=False):
            return _ReflectProjectionRows._backward(ctx, d_weight, d_bias)

    @staticmethod
    def _forward(ctx, weight, bias, u, signs, groups, out_dtype):
        ctx.device_type = weight.device.type
        rows, c = weight.shape[0], u.shape[0]
        compute = torch.promote_types(weight.dtype, torch.float32)
        # [C_in (+1), R]: input channels as rows, the bias as one more; reflections act along the output channels
        m = (torch.cat([weight.t(), bias[None]], 0) if bias is not None else weight.t()).to(compute)
        qk = m[:, : groups * c].view(m.shape[0], groups, c)
        norm = torch.linalg.vector_norm(u.to(compute))
        unit = u.to(compute) / norm * math.sqrt(2.0)  # ‖unit‖² = 2: H = I − unit·unitᵀ
        a = torch.matmul(qk, unit)  # [K, G]: unitᵀ w per input channel and group
        out_qk = torch.addcmul(qk, a[..., None], unit, value=-1.0)
        if signs is not None:  # [d] repeated over the C channels (one head's pattern) or [C]
            # out of place: the TorchScript ONNX exporter mistranslates an in-place product on a view
            out_qk = (out_qk.view(*out_qk.shape[:2], -1, signs.shape[0]) * signs.to(compute)).view(out_qk.shape)
        out = torch.cat([out_qk.view(m.shape[0], groups * c), m[:, groups * c:]], 1) if groups * c < rows \
            else out_qk.view(m.shape[0], rows)
        out = out.to(out_dtype or weight.dtype)
        ctx.save_for_backward(qk, unit, a, norm, signs)
        ctx.groups, ctx.has_bias, ctx.weight_dtype, ctx.bias_dtype = groups, bias is not None, weight.dtype, (
            None if bias is None else bias.dtype)
        c_in = weight.shape[1]
        # weight' = out[:C_in]ᵀ (a transposed view: F.linear reads it as a plain row-major matrix), bias' = out[C_in]
        return out[:c_in].t(), (out[c_in] if bias is not None else None)

    @staticmethod
    def _backward(ctx, d_weight, d_bias):
        qk, unit, a, norm, signs = ctx.saved_tensors
        groups, k, c = ctx.groups, qk.shape[0], unit.shape[0]
        compute = unit.dtype
        rows = d_weight.shape[0] if d_weight is not None else d_bias.shape[0]
        c_in = k - ctx.has_bias
        if d_weight is None:
            d_weight = torch.zeros(rows, c_in, dtype=compute, device=unit.device)
        if ctx.has_bias and d_bias is None:
            d_bias = torch.zeros(rows, dtype=compute, device=unit.device)
        dm = (torch.cat([d_weight.t(), d_bias[None]], 0) if ctx.has_bias else d_weight.t()).to(compute)
        g = dm[:, : groups * c].view(k, groups, c)
        if signs is not None:  # diag(s) is its own transpose
            g = (g.view(k, groups, -1, signs.shape[0]) * signs.to(compute)).view(k, groups, c)
        r = torch.matmul(g, unit)  # [K, G]
        d_qk = torch.addcmul(g, r[..., None], unit, value=-1.0)  # Hᵀ = H
        d_m = torch.cat([d_qk.view(k, groups * c), dm[:, groups * c:]], 1) if groups * c < rows \
            else d_qk.view(k, rows)
        # d unit = −Σ (g a + w r) over input channels and groups (the two places unit enters w − unit·(unitᵀw))
        d_unit = -(torch.matmul(a.reshape(1, -1), g.reshape(-1, c)) + torch.matmul(r.reshape(1, -1), qk.reshape(-1, c)))
        d_unit = d_unit[0]
        # unit = √2·u/‖u‖: du = (√2/‖u‖)(d unit − û ûᵀ d unit), û = unit/√2
        d_u = (d_unit - unit * (torch.dot(unit, d_unit) * 0.5)) * (math.sqrt(2.0) / norm)
        d_weight_in = d_m[:c_in].t().to(ctx.weight_dtype)
        d_bias_in = d_m[c_in].to(ctx.bias_dtype) if ctx.has_bias else None
        return d_weight_in, d_bias_in, d_u, None, None, None


def reflect_projection_rows(weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                            signs: torch.Tensor | None = None, *, groups: int = 1,
                            out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold ``T = diag(signs)·(I − 2uuᵀ/‖u‖²)`` into the first ``groups`` blocks of C output rows of a projection.

    Row block g of ``weight`` becomes ``T·W_g`` (and of ``bias`` ``T·b_g``); rows after ``groups·C`` pass unchanged
    (e.g. the v rows of a fused qkv projection). Equal to applying :func:`householder_reflect` and the signs to the
    projection's outputs, for a projection computed once per forward instead of per token. One autograd node with
    a closed-form backward (to weight, bias and u); the arithmetic runs in at least fp32.

    Args:
        weight: ``[R, C_in]`` with ``R ≥ groups·C``.
        bias: ``[R]`` or None.
        u: ``[C]``, any non-zero vector.
        signs: ``[C]`` of ±1, or ``[d]`` with d dividing C, repeated over the C channels (one head's pattern,
            e.g. the H(0) of the block reflections); or None.
        groups: how many blocks of C rows to fold.
        out_dtype: the dtype of ``weight'`` and ``bias'`` (default: the inputs'). The arithmetic stays in at least
            fp32 and the gradients come back in the inputs' dtypes; under autocast the caller passes autocast's
            dtype, so the projection finds its weights already cast (the same values: one rounding of the fp32
            result) and no cast, forward or backward, runs between the fold and the projection.

    Returns:
        ``(weight' [R, C_in], bias' [R] or None)`` (on the torch backend ``weight'`` is a transposed view, on the
        Triton backend a contiguous tensor). :mod:`mirrorla.backend` picks the
        implementation: Triton kernels on CUDA, the torch version elsewhere and under compilers and exporters.
    """
    check_floating("weight", weight)
    check_floating("u", u)
    if u.dim() != 1:
        raise ValueError(f"u must have shape [C], got {tuple(u.shape)}")
    c = u.shape[0]
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if weight.dim() != 2 or weight.shape[0] < groups * c:
        raise ValueError(f"weight must have shape [R ≥ groups·C = {groups * c}, C_in], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [R = {weight.shape[0]}], got {tuple(bias.shape)}")
    if signs is not None and (signs.dim() != 1 or signs.shape[0] == 0 or c % signs.shape[0]):
        raise ValueError(f"signs must have shape [C = {c}] or [d] with d dividing C, got {tuple(signs.shape)}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be None or a floating torch.dtype, got {out_dtype!r}")
    if not _tracing() and select_backend(weight, u, *([bias] if bias is not None else [])) == "triton":
        # one launch forward and one or two backward instead of a dozen and twenty small operators: on a GPU a training
        # step pays host time per operator, and every MirrorLA layer folds once per step. Compilers and exporters
        # trace the torch version (inductor fuses it itself).
        from .triton_reflect import reflect_projection_rows_triton

        return reflect_projection_rows_triton(weight, bias, u, signs, groups, out_dtype)
    return _ReflectProjectionRows.apply(weight, bias, u, signs, groups, out_dtype)


def _complex_view(x: torch.Tensor) -> torch.Tensor | None:
    """``[..., d]`` as complex ``[..., d/2]`` (adjacent pairs) without a copy, or None where no view exists."""
    if x.dtype not in (torch.float32, torch.float64) or x.stride(-1) != 1:
        return None
    try:
        return torch.view_as_complex(x.unflatten(-1, (x.shape[-1] // 2, 2)))
    except RuntimeError:  # odd strides or storage offset
        return None


# torch's own check (autograd.Function.apply raises with it); a torch without it has no transforms to detect
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``vjp``, ``grad``, ``vmap``, ...) runs this call. The ops' own autograd
    Functions (the chunked torch core, the CPU kernels' backward) and the C++ kernels cannot run under one; the
    plain reference ops can, and they take the call (per-sample gradients by ``vmap`` of ``grad``, for example)."""
    return _TRANSFORMS_ACTIVE()


def _tracing() -> bool:
    """Whether a compiler, exporter or tracer records this call: they get the real-valued rotation (inductor fuses
    it; ONNX and TorchScript have no ``view_as_complex``)."""
    # Both ONNX exporters are covered without torch.onnx.is_in_onnx_export() (two imports per call, ~7 µs, on every
    # eager forward): the TorchScript one traces the forward (is_tracing), the dynamo one exports it (is_compiling).
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch.jit.is_scripting())


def rotate_pairs(*xs: torch.Tensor, angle: torch.Tensor, pairing: str = "adjacent") -> tuple[torch.Tensor, ...]:
    """Rotate each channel pair of every ``x`` by ``angle``: ``(x0, x1) ↦ (c·x0 − s·x1, s·x0 + c·x1)``.

    A reflection composed with another is a rotation, ``H(θ) = R(2θ)·H(0)``: MirrorLA's per-sample reflection is
    this rotation once the static ``H(0)`` sits in the projection weights.

    Args:
        xs: tensors ``[..., d]`` with d even (q and k share one rotation, computed once).
        angle: broadcastable to ``[..., d/2]``.
        pairing: as in :func:`block_reflect`.

    Returns:
        a tuple of ``[..., d]`` tensors in the inputs' dtypes. In eager mode adjacent fp32/fp64 pairs take one
        complex multiply; under ``torch.compile``, ``torch.export`` and ONNX export the real form.
    """
    for x in xs:
        check_floating("x", x)
        check_even_last_dim("x", x)
    check_floating("angle", angle)
    out = []
    rot = cos = sin = None
    for x in xs:
        z = _complex_view(x) if pairing == "adjacent" and not _tracing() else None
        if z is not None:
            if rot is None or rot.dtype != z.dtype:
                a = angle.to(x.dtype)
                rot = torch.polar(torch.ones_like(a), a)
            out.append(torch.view_as_real(z * rot).flatten(-2))
            continue
        pairs = pair_channels(x, pairing)
        if cos is None or cos.dtype != x.dtype:
            cos = torch.cos(angle).to(x.dtype).unsqueeze(-1)
            sin = torch.sin(angle).to(x.dtype).unsqueeze(-1)
        sign = torch.arange(-1, 2, 2, dtype=x.dtype, device=x.device)  # [−1, 1]
        # (c·x0 − s·x1, c·x1 + s·x0) = c ⊙ x + s ⊙ sign ⊙ swap(x)
        out.append(unpair_channels(torch.addcmul(cos * pairs, sin * sign, pairs.flip(-1)), pairing))
    return tuple(out)


def _delta_tanh_log(var: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return gamma * torch.tanh(torch.log(var + eps))


def _delta_log(var: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return gamma * torch.log(var + eps)


def _delta_rsqrt(var: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return gamma * torch.rsqrt(var + eps)


DELTA_FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "tanh_log": _delta_tanh_log,  # γ·tanh(log(σ² + ε)): bounded, the default
    "log": _delta_log,  # γ·log(σ² + ε): unbounded
    "rsqrt": _delta_rsqrt,  # γ/√(σ² + ε): shrinks the offset as features spread out
}
"""Forms of the variance-aware angle offset Δα(σ²) (docs/method.md §2.3, an open choice)."""


def _slope_tanh_log(var: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    x = var + eps
    return gamma * (1.0 - torch.tanh(torch.log(x)).square()) / x


def _slope_log(var: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return gamma / (var + eps)


def _slope_rsqrt(var: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return -0.5 * gamma * torch.rsqrt(var + eps) / (var + eps)


DELTA_FORM_SLOPES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "tanh_log": _slope_tanh_log,
    "log": _slope_log,
    "rsqrt": _slope_rsqrt,
}
"""dΔα/dσ² of each form of :data:`DELTA_FORMS` (same arguments): the backward of the angles where autograd cannot
record (the Triton ops' fallback inside a custom op). Tests check each against autograd of its form."""

if set(DELTA_FORMS) != set(DELTA_FORM_CODES) or set(DELTA_FORMS) != set(DELTA_FORM_SLOPES):
    # the kernels and the closed-form backward must know every form, and no other
    raise ImportError(f"DELTA_FORMS {sorted(DELTA_FORMS)}, the kernels' codes {sorted(DELTA_FORM_CODES)} and the "
                      f"slopes {sorted(DELTA_FORM_SLOPES)} differ")
