"""MirrorLA's per-sample step, ``ReLU(R(angle)·x)``, and per-channel token sums, each with its pure-PyTorch
reference beside the dispatching function of the same signature.

Eager PyTorch runs "rotate each channel pair" and "ReLU" as separate passes over memory, and the sum and
sum of squares over tokens as two more; ``csrc/mirror_cpu.cpp`` does each in one pass on CPUs, and the Triton
backend does the token sums on GPUs. Training on CPUs runs the rotation and ReLU and the token sums on the C++
kernels too, each with a backward (one pass over x and the gradient for the rotation, ``g₁ + 2 g₂ x`` for the
sums), and the angles from the sums (small tensors) through autograd. Which one runs is decided in
:mod:`mirrorla.backend`; all give the same values and gradients (tests check it).
"""

from __future__ import annotations

import torch

from ..backend import DELTA_FORM_CODES, cpu_kernels_available, cpu_kernels_status, select_backend
from ._checks import check_eps, check_even_last_dim, check_floating, check_rank
from .reference import (
    angles_from_sums,
    folded_mirror_map_reference,
    folded_variance,
    rotate_relu_reference,
    token_sums_backward,
    token_sums_reference,
)
from .reflect import _functorch_active, _tracing, check_delta_form, check_pairing

__all__ = [
    "cpu_kernels_available",
    "cpu_kernels_status",
    "folded_angles",
    "folded_mirror_map",
    "folded_mirror_map_reference",
    "folded_variance",
    "rotate_relu",
    "rotate_relu_reference",
    "token_sums",
    "token_sums_reference",
]

def _use_kernel(*xs: torch.Tensor) -> bool:
    """Whether the C++ kernels run a call on these tensors, with or without a gradient (each op here has a
    backward on them: :class:`_RotateReluCPU`, :class:`_TokenSumsCPU`). Compilers, exporters and ``torch.func``
    transforms always get the reference."""
    if _tracing() or _functorch_active() or any(x.device.type != "cpu" or x.stride(-1) != 1 for x in xs):
        return False
    return (select_backend(*xs, has_triton=False, has_cpu=True, cpu_backward=True) == "cpu"
            and cpu_kernels_available())


def _wants_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _cos_sin(angle: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles in the kernels' op-math type for inputs of ``dtype`` (contiguous, as they read
    them)."""
    a = angle.to(torch.promote_types(dtype, torch.float32))
    return torch.cos(a).contiguous(), torch.sin(a).contiguous()


class _RotateReluCPU(torch.autograd.Function):
    """``ReLU(R(angle)·x)`` on the C++ kernels, forward and backward: one pass over x forward (out in fp32, or
    fp64), one over x and the output's gradient backward (dx in x's dtype and d angle, the rotated values
    recomputed from x, so nothing but x is saved). Autograd through the reference took about a dozen passes over
    memory and as many temporaries. ``angle`` ``[1 or B, H, d/2]``."""

    @staticmethod
    def forward(ctx, x, angle, half):
        cos, sin = _cos_sin(angle.detach(), x.dtype)
        ctx.save_for_backward(x, cos, sin)
        ctx.half, ctx.angle_dtype = half, angle.dtype
        return torch.ops.mirrorla_cpu.rotate_relu(x, cos, sin, half)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, cos, sin = ctx.saved_tensors
        dx, dangle = torch.ops.mirrorla_cpu.rotate_relu_backward(x, grad.to(cos.dtype).contiguous(), cos, sin,
                                                                 ctx.half)
        if cos.shape[0] == 1:  # angles shared by the batch
            dangle = dangle.sum(0, keepdim=True)
        return (dx if ctx.needs_input_grad[0] else None,
                dangle.to(ctx.angle_dtype) if ctx.needs_input_grad[1] else None, None)


class _TokenSumsCPU(torch.autograd.Function):
    """:func:`token_sums` on the C++ kernel (one pass over x, in its own dtype) with its backward
    ``g₁ + 2 g₂ x``: σ²'s path to the keys in training, where the reference's autograd kept an fp32 copy of
    half-precision keys and ran several passes over them. The gradient is computed in fp32 and rounded to x's dtype
    once, as the reference's is (the Triton op's stays in x's dtype, for GPU memory)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.ops.mirrorla_cpu.token_sums(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return token_sums_backward(x, grad)


# ---------------------------------------------------------------------------------------------- rotate + ReLU


def rotate_relu(x: torch.Tensor, angle: torch.Tensor, *, pairing: str = "adjacent") -> torch.Tensor:
    """``ReLU`` of each channel pair of ``x`` rotated by ``angle``; one pass over memory on CPUs.

    Args:
        x: ``[B, H, N, d]``, d even, any floating dtype.
        angle: one angle per (sample or all samples, head, pair): ``[1 or B, H, d/2]``.
        pairing: ``"adjacent"`` pairs ``(2i, 2i+1)`` or ``"half"`` pairs ``(i, i + d/2)``.

    Returns:
        ``[B, H, N, d]`` in fp32 (fp64 for fp64 input): the attention core reduces in fp32 anyway, so the
        map's output goes there directly. Differentiable in ``x`` and ``angle`` (on CPUs through the kernel's
        backward, one pass over x and the gradient; elsewhere through the reference).
    """
    check_rank("x", x, 4, "[B, H, N, d]")
    check_floating("x", x)
    check_even_last_dim("x", x)
    check_floating("angle", angle)
    check_pairing(pairing)
    b, h, _, d = x.shape
    if angle.dim() != 3 or angle.shape[1:] != (h, d // 2) or angle.shape[0] not in (1, b):
        raise ValueError(f"angle must have shape [1 or B, H, d/2] = [1 or {b}, {h}, {d // 2}], "
                         f"got {tuple(angle.shape)}")
    if not _use_kernel(x, angle):
        return rotate_relu_reference(x, angle.unsqueeze(2), pairing=pairing)
    if _wants_grad(x, angle):
        return _RotateReluCPU.apply(x, angle, pairing == "half")
    return torch.ops.mirrorla_cpu.rotate_relu(x, *_cos_sin(angle, x.dtype), pairing == "half")


# ------------------------------------------------------------------------------------------------ token sums


def token_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-channel sum and sum of squares over tokens, ``[B, H, N, d] → [B, H, 2, d]`` (fp32, or fp64 for fp64
    input); one pass over memory on CPUs. Differentiable (on CPUs through the kernel, whose backward is
    ``g₁ + 2 g₂ x``; elsewhere through the reference or the Triton op)."""
    check_rank("x", x, 4, "[B, H, N, d]")
    check_floating("x", x)
    if x.dtype != torch.float64 and select_backend(x) == "triton":
        from .triton_linear_attention import token_sums_triton

        return token_sums_triton(x)
    if not _use_kernel(x):
        return token_sums_reference(x)
    return _TokenSumsCPU.apply(x) if _wants_grad(x) else torch.ops.mirrorla_cpu.token_sums(x)


# ------------------------------------------------------------------------------------ the folded MirrorLA step


def folded_angles(k: torch.Tensor, theta: torch.Tensor, gamma: torch.Tensor, *, eps: float = 1e-6,
                  delta_form: str = "tanh_log", pairing: str = "adjacent", sums: torch.Tensor | None = None):
    """The per-sample rotation angles ``2Θ = 2(θ + Δα(σ²))`` ``[B, H, d/2]`` (fp32) of folded keys ``[B, H, N, d]``.

    σ² comes from the token sums of k (:func:`token_sums`, or ``sums`` when given), undoing ``H(0)`` algebraically
    (:func:`folded_variance`). Differentiable in k, θ and γ.
    """
    if sums is None:
        sums = token_sums(k)
    return angles_from_sums(sums, k.shape[2], theta, gamma, eps=eps, delta_form=delta_form, pairing=pairing)


def folded_mirror_map(
    q: torch.Tensor,
    k: torch.Tensor,
    theta: torch.Tensor,
    gamma: torch.Tensor,
    *,
    eps: float = 1e-6,
    delta_form: str = "tanh_log",
    pairing: str = "adjacent",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample step of MirrorLA with its static reflections folded into the projections.

    The projections already applied ``H(0)·H_cross``; this computes σ² of the keys (over tokens and each
    pair's two channels, undoing ``H(0)`` algebraically), ``Θ = θ + Δα(σ²)`` and ``ReLU(R(2Θ)·)`` of q and k
    (``H(Θ) = R(2Θ)·H(0)``). On CPUs without gradients it is one fused kernel call (one read of k for σ²,
    one read-and-write of q and of k); with gradients the token sums and the rotation and ReLU of q and k run on
    the kernels, forward and backward, and the angles from the sums through autograd.

    Args:
        q, k: folded queries and keys ``[B, H, N, d]`` (Nq may differ from N).
        theta, gamma: ``[H, d/2]`` angles and modulation gains.
        eps, delta_form: Δα's ε and form (a key of :data:`DELTA_FORMS`).
        pairing: ``"adjacent"`` or ``"half"``.

    Returns:
        ``(φ(q), φ(k))`` ``[B, H, N, d]`` in fp32 (fp64 for fp64 inputs).
    """
    check_rank("q", q, 4, "[B, H, Nq, d]")
    check_rank("k", k, 4, "[B, H, N, d]")
    check_pairing(pairing)
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k need at least one token (N >= 1), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    check_delta_form(delta_form)
    eps = check_eps("eps", eps, positive=True)
    if not _use_kernel(q, k, theta, gamma):
        return folded_mirror_map_reference(q, k, theta, gamma, eps=eps, delta_form=delta_form, pairing=pairing)
    if _wants_grad(q, k, theta, gamma):
        # training on CPUs: the token sums and the rotation and ReLU of q and k on the kernels, forward and
        # backward; the angles from the sums (small tensors) through autograd
        angle = folded_angles(k, theta, gamma, eps=eps, delta_form=delta_form, pairing=pairing)
        half = pairing == "half"
        return _RotateReluCPU.apply(q, angle, half), _RotateReluCPU.apply(k, angle, half)
    if q.dtype != k.dtype:  # the fused kernel reads both in one dtype
        return folded_mirror_map_reference(q, k, theta, gamma, eps=eps, delta_form=delta_form, pairing=pairing)
    acc = torch.promote_types(k.dtype, torch.float32)
    return torch.ops.mirrorla_cpu.folded_mirror_map(
        q, k, theta.to(acc).contiguous(), gamma.to(acc).contiguous(), float(eps),
        DELTA_FORM_CODES[delta_form], pairing == "half")

