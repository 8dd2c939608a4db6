"""Triton kernels: mean-normalised non-causal linear attention with the feature map fused in, forward and backward.

``o_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + ε·N)`` with ``S = Σ_j φ(k_j) v_jᵀ`` and ``z = Σ_j φ(k_j)``, which equals the mean
form ``(φqᵀ S/N) / (φqᵀ z/N + ε)`` of :func:`mirrorla.ops.linear_attention`. The feature map φ is applied inside
the kernels and never written to memory:

- ``identity``: φ(x) = x (features mapped in torch before, e.g. ELU, focused, polarity);
- ``relu``: φ(x) = ReLU(x);
- ``rotate_relu``: φ(x) = ReLU(R(angle)·x), each channel pair rotated by its per-(sample, head) angle:
  MirrorLA's per-sample step once its static reflections are folded into the projections.

Passes: a state pass over k and v, an output pass over q, and in the backward one pass over q (dq, dS, dz and
the q part of d angle) and one over k and v (dk, dv). The k part of d angle needs no pass of its own: a rotation's
training forward also sums the moment ``[Σ w vᵀ | Σ w]``, ``w = [y > 0]·y_p`` (y the rotated key, y_p its pair
partner's), from which the backward gets it as ``sign·(dS ⊙ Σ w vᵀ + dz ⊙ Σ w)`` summed over v, before the k/v
pass. MirrorLA's op adds a pass of token sums over k before the state pass (which turns them into the angles); its
σ² path to θ, γ and dk then runs inside the k/v pass, which adds ``dS₁ + 2·dS₂·k`` to dk as it stores it. Two
sets of kernels run these passes:

- chunked kernels (long rows): one kernel per pass, each with many programs per (b, h) row, every program
  reducing a chunk of tokens into fp32 partials that are added in a fixed order (deterministic, no atomics);
- row kernels (rows of at most ``row_max_tiles`` token tiles, 8 unless :mod:`mirrorla.ops.tuning` has a
  measurement for the GPU, and at most 8 while a CUDA graph records or with fewer (b, h) rows than the GPU has
  SMs, see :func:`_row_max_tiles`): one program per
  row runs every pass of the forward, another every pass of the backward, with the state and dS kept in registers
  between passes: one launch each way, where short rows cost more host time per launch than GPU time (DeiT-T at
  224²).

q, k and v are read in their own dtype (and may be strided views of a qkv tensor); states, normalisers and
gradients of the angle are fp32; the matmuls run on tensor cores (bf16/fp16 inputs with fp32 accumulation, tf32
for the fp32 states; with bf16 inputs the output pass splits S and z in two bf16 halves instead, see
:func:`_output_tiles`), except for fp32 inputs at torch's default matmul precision, whose matmuls run in IEEE fp32
(see :func:`_ieee_dots`). φ is computed in fp32 and rounded once to the inputs' dtype where a matmul takes it.
``benchmarks/compile_check.py`` compiles every configuration for a GPU without one.

The ops are registered with :mod:`torch.library` (``mirrorla::fused_linear_attention``), with fake kernels and
autograd, so ``torch.compile(fullgraph=True)`` and CUDA graphs see one op; eager calls run the same
implementation through a ``torch.autograd.Function``, whose dispatch costs less host time than a custom op's.
Block sizes are fixed per GPU (no autotune: :mod:`mirrorla.ops.tuning` holds the measured choices), so the
kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the test suite checks them.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime import OutOfResources

from ..backend import DELTA_FORM_CODES
from ._checks import check_eps
from ._launch import INTERPRETING, cdiv, graph_capturing, next_power_of_2, on_tensor_device, sizes_jit
from .reference import (
    _linear_attention_torch,
    _linear_attention_torch_grads,
    angles_from_sums,
    angles_from_sums_backward,
    token_sums_backward,
    token_sums_reference,
)
from .tuning import DEFAULT_TUNING, kernel_tuning

__all__ = ["FEATURES", "fused_linear_attention", "mirror_linear_attention", "token_sums_triton"]

FEATURES = {"identity": 0, "relu": 1, "rotate_relu": 2}
_PAIRINGS = {"adjacent": 0, "half": 1}
_BLOCK_N = 64
_GPU_PROPERTIES: dict[int, object] = {}  # torch.cuda.get_device_properties per GPU index, read once
_CPU_CAPABILITY = (9, 0)
"""The compute capability the launchers assume for CPU tensors (the interpreter): an H100's, the GPU the defaults
were chosen for. ``benchmarks/compile_check.py --arch`` sets it, so the configurations it records for a GPU are the
ones the dispatch launches there."""
_STAGES = 2  # the token loops pipeline their loads two deep; three overflowed shared memory at d = 128


# ------------------------------------------------------------------------------------------------------ helpers


@triton.jit
def _partner(offs_d, D: tl.constexpr, PAIRING: tl.constexpr):
    """Index of each channel's pair partner, and the sign of its sine term (−1 first, +1 second of a pair)."""
    if PAIRING == 0:  # adjacent: (2i, 2i+1)
        partner = offs_d ^ 1
        sign = tl.where((offs_d % 2) == 1, 1.0, -1.0)
    else:  # half: (i, i + D/2)
        half = D // 2
        partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
        sign = tl.where(offs_d >= half, 1.0, -1.0)
    return partner, sign


@triton.jit
def _swap_pairs(x, BN: tl.constexpr, BD: tl.constexpr, PAIRING: tl.constexpr):
    """``x [BN, BD]`` with every channel replaced by its pair partner's value, shuffled in registers.

    A second load through the partner indices would defeat vectorised loads (the index pattern is not contiguous);
    this needs the pairs to lie inside the tile: always for adjacent pairs, for half pairs when BD == D."""
    if PAIRING == 0:
        first, second = tl.split(tl.reshape(x, [BN, BD // 2, 2]))
        return tl.reshape(tl.join(second, first), [BN, BD])
    else:
        first, second = tl.split(tl.permute(tl.reshape(x, [BN, 2, BD // 2]), (0, 2, 1)))
        return tl.reshape(tl.permute(tl.join(second, first), (0, 2, 1)), [BN, BD])


@triton.jit
def _features(ptr, offs_n, offs_d, partner, nmask, dmask, s_n, s_d, cos, ssin, MAP: tl.constexpr,
              SWAP: tl.constexpr, PAIRING: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Load a tile ``[BN, BD]`` and map it: returns (φ, pre-activation y, partner pre-activation y_p, the tile x)
    in fp32."""
    x = tl.load(ptr + offs_n[:, None] * s_n + offs_d[None, :] * s_d, mask=nmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    if MAP == 2:
        if SWAP:
            xp = _swap_pairs(x, BN, BD, PAIRING)
        else:
            xp = tl.load(ptr + offs_n[:, None] * s_n + partner[None, :] * s_d, mask=nmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)
        y = cos[None, :] * x + ssin[None, :] * xp
        # y_p, the partner's rotated value, is y on the partner's channel (the pair shares cos, and its sine signs
        # are opposite). Adjacent pairs sit in the same thread's registers, so swapping y there costs no
        # instruction where the product form took two per element (ptxas, sm_90, bf16, d = 64, instructions per
        # tile: training state pass 610 -> 546, chunked q pass 1,552 -> 1,397 with spills 328 -> 196 B). Half pairs
        # cross threads, and there the swap cost more than it saved (state pass 651 -> 684).
        if SWAP and PAIRING == 0:
            y_p = _swap_pairs(y, BN, BD, PAIRING)
        else:
            y_p = cos[None, :] * xp - ssin[None, :] * x  # its sine sign is opposite
        phi = tl.maximum(y, 0.0)
    elif MAP == 1:
        y = x
        y_p = x
        phi = tl.maximum(x, 0.0)
    else:
        y = x
        y_p = x
        phi = x
    return phi, y, y_p, x


@triton.jit
def _split_half(x, dtype: tl.constexpr):
    """fp32 ``x`` as two values of the 16-bit ``dtype``, ``hi + lo``: about 16 bits of x's mantissa, so that a
    product with a 16-bit operand runs on the 16-bit tensor cores, twice, more exactly than once in TF32 (10 bits)."""
    hi = x.to(dtype)
    return hi, (x - hi.to(tl.float32)).to(dtype)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's interpreter computes tl.dot of bf16 operands wrongly (numpy has no bf16), so under
    # TRITON_INTERPRET the operands go to fp32 first; compiled kernels keep bf16/fp16 on the tensor cores.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _ones_column(like, BN: tl.constexpr):
    """``[BN, 16]`` in ``like``'s dtype, ones in the first column and zeros elsewhere: ``xᵀ · _ones_column`` sums
    ``x [BN, BD]`` over its tokens on the tensor cores (16: tl.dot's narrowest operand), exactly for the operand
    values the other products of the pass see."""
    first = tl.arange(0, 16)[None, :] == 0
    # built in fp32 and cast: Triton's interpreter has no bf16 constants
    return tl.where(first, tl.full([BN, 16], 1.0, tl.float32), 0.0).to(like.dtype)


@triton.jit
def _token_offsets(tile, BN: tl.constexpr):
    """The token indices ``[BN]`` of a tile, 64-bit. Offsets past 2³¹ elements are real: a row's base (b · stride)
    in inputs of more than 2³¹ elements, a token's offset (n · stride) in a row of a strided qkv view longer than
    2³¹ / 3C tokens. 32-bit products there wrap to addresses outside the tensor."""
    return tl.cast(tile, tl.int64) * BN + tl.arange(0, BN)  # tl.cast: a Python int in the interpreter's loops


@triton.jit
def _rotation_row(COS, SSIN, bh, offs_d, dmask, D: tl.constexpr, BD: tl.constexpr, MAP: tl.constexpr):
    """The row's per-channel cos / signed sin; without the rotation COS and SSIN are never read (any pointer)."""
    if MAP == 2:
        cos = tl.load(COS + bh * D + offs_d, mask=dmask, other=1.0)
        ssin = tl.load(SSIN + bh * D + offs_d, mask=dmask, other=0.0)
    else:
        cos = tl.full([BD], 1.0, tl.float32)
        ssin = tl.zeros([BD], tl.float32)
    return cos, ssin


@triton.jit
def _program(COS, SSIN, H, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
             PAIRING: tl.constexpr, MAP: tl.constexpr):
    """The (b, h) row and chunk of this program, channel offsets and masks, pair partners and signs, and the row's
    per-channel cos / signed sin. The row index is 64-bit (see :func:`_token_offsets`)."""
    bh = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    dmask = offs_d < D
    vmask = offs_v < DV
    partner, sign = _partner(offs_d, D, PAIRING)
    cos, ssin = _rotation_row(COS, SSIN, bh, offs_d, dmask, D, BD, MAP)
    return bh, chunk, bh // H, bh % H, offs_d, offs_v, dmask, vmask, partner, sign, cos, ssin


@triton.jit
def _load_state(ST, offs_d, offs_v, partner, dmask, vmask, DV: tl.constexpr):
    """A ``[D, DV + 1]`` fp32 state (or its gradient): S, z, and both with the rows in pair-partner order."""
    smask = dmask[:, None] & vmask[None, :]
    s = tl.load(ST + offs_d[:, None] * (DV + 1) + offs_v[None, :], mask=smask, other=0.0)
    z = tl.load(ST + offs_d * (DV + 1) + DV, mask=dmask, other=0.0)
    s_p = tl.load(ST + partner[:, None] * (DV + 1) + offs_v[None, :], mask=smask, other=0.0)
    z_p = tl.load(ST + partner * (DV + 1) + DV, mask=dmask, other=0.0)
    return s, z, s_p, z_p


@triton.jit
def _map_backward(dphi, left, state_p, bias_p, active, y_p, cos, ssin, sign, MAP: tl.constexpr,
                  SWAP: tl.constexpr, PAIRING: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr, ANGLE_GRAD: tl.constexpr):
    """Through φ: the input's gradient ``[BN, BD]`` from dφ, and (``ANGLE_GRAD`` with a rotation, else zeros) this
    tile's terms of d angle, ``[y > 0]·dφ·y_p`` per token and channel ``[BN, BD]`` (padded tokens 0), which the
    caller sums over tokens and multiplies by the channel's sign.

    For the rotation the partner's gradient is shuffled in registers (``SWAP``) or recomputed from the state rows in
    partner order, ``left · state_pᵀ + bias_p`` (the same product that gave ``dphi``, with the partner rows).

    The ReLU passes where ``active > 0``: the pre-activation y, or φ itself (``φ > 0`` exactly where ``y > 0``). The
    rotation's q pass hands φ where it sums d angle on the CUDA cores (the row kernels; the chunked q pass without
    ``DOT_SUMS``): φ meets ``dphi`` in the layout of the pass's matmuls anyway, where ``y > 0`` took a layout
    conversion of its own per tile. ptxas, bf16, d = 64: the row backward 963 → 895 instructions per tile and 254 →
    240 registers on sm_90 (Triton 3.6: 88 B of spills → none), 2,196 → 2,020 on sm_80 (spills 756 → 596 B); the
    sm_80 chunked q pass 2,186 → 2,012 (272 → 192 B). With ``DOT_SUMS`` (sm_90's chunked q pass) φ's mask saved
    instructions with Triton 3.8 (1,552 → 1,449) but spilled more (328 → 384 B), and with Triton 3.6 it cost
    both (1,510 → 1,517, 216 → 316 B): y's mask stays there. The k/v pass and the plain ReLU hand y too (φ's mask
    cost them up to 41 instructions per tile)."""
    if MAP == 2:
        g = tl.where(active > 0, dphi, 0.0)
        if SWAP:
            g_p = _swap_pairs(g, BN, BD, PAIRING)
        else:
            g_p = tl.where(y_p > 0, _dot(left, tl.trans(state_p), IEEE, UPCAST) + bias_p, 0.0)
        dx = cos[None, :] * g - ssin[None, :] * g_p
        if ANGLE_GRAD:
            # padded tokens and channels need no mask of their own: their x is 0, so y, φ and with them g are 0 (g
            # is 0 wherever the ReLU is off, whatever dφ holds). ptxas, bf16, d = 64, instructions per tile without
            # that mask: sm_90 chunked q pass 1,382 -> 1,338 (spills 156 -> 132 B), row backward 894 -> 858;
            # Triton 3.6 1,525 -> 1,477 and 966 -> 908; sm_80 1,979 -> 1,910 and 1,994 -> 1,924
            d_angle = g * y_p
        else:
            d_angle = tl.zeros_like(sign)
    elif MAP == 1:
        dx = tl.where(active > 0, dphi, 0.0)
        d_angle = tl.zeros_like(sign)
    else:
        dx = dphi
        d_angle = tl.zeros_like(sign)
    return dx, d_angle


# ------------------------------------------------------------------------------------------ token loops (shared)
# Each loop below is one pass over a range of token tiles. The chunked kernels run it over their chunk (many
# programs per (b, h) row, partials added afterwards); the row kernels run every pass of an op over a whole row in
# one program, so a short sequence costs one launch forward and one backward (see _row_path).


@triton.jit
def _state_tiles(k_ptr, v_ptr, first, TILES, N, s_kn, s_kd, s_vn, s_vd, offs_d, offs_v, partner, dmask, vmask,
                 cos, ssin, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr, MAP: tl.constexpr,
                 PAIRING: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr,
                 MOMENT: tl.constexpr):
    """``[Σ φ(k) vᵀ, Σ φ(k)]`` (fp32 ``[BD, BDV]``, ``[BD]``) over the tiles ``first .. first + TILES``, and with
    ``MOMENT`` (a rotation's training forward) the moment ``[Σ w vᵀ, Σ w]``, ``w = [y > 0]·y_p``: the k side of
    the backward's d angle is ``sign·(Σ_v dS ⊙ Σ w vᵀ + dz ⊙ Σ w)`` (see :func:`_moment_angle`)."""
    # the sums over tokens (z and the moment's Σ w) run on the tensor cores too, as products with a column of ones
    # (_ones_column): a sum per tile on the CUDA cores costs cross-lane shuffles
    acc = tl.zeros([BD, BDV], dtype=tl.float32)
    zacc = tl.zeros([BD, 16], dtype=tl.float32)
    if MOMENT:
        macc = tl.zeros([BD, BDV], dtype=tl.float32)
        mzacc = tl.zeros([BD, 16], dtype=tl.float32)
    else:  # never stored: placeholders the compiler drops
        macc = tl.zeros([1, 1], dtype=tl.float32)
        mzacc = tl.zeros([1, 16], dtype=tl.float32)
    for t in range(0, TILES):
        offs_n = _token_offsets(first + t, BN)
        nmask = offs_n < N
        phi, y, y_p, _ = _features(k_ptr, offs_n, offs_d, partner, nmask, dmask, s_kn, s_kd, cos, ssin,
                                   MAP, SWAP, PAIRING, BN, BD)
        v = tl.load(v_ptr + offs_n[:, None] * s_vn + offs_v[None, :] * s_vd, mask=nmask[:, None] & vmask[None, :],
                    other=0.0)
        phi_t = tl.trans(phi.to(v.dtype))
        acc += _dot(phi_t, v, IEEE, UPCAST)
        zacc += _dot(phi_t, _ones_column(v, BN), IEEE, UPCAST)
        if MOMENT:
            w = tl.where(y > 0, y_p, 0.0)  # padded tokens and channels: y = 0, so w = 0
            w_t = tl.trans(w)
            if v.dtype == tl.float32:  # fp32 inputs: fp32 operands (IEEE or TF32 dots)
                macc += _dot(w_t, v, IEEE, UPCAST)
                mzacc += _dot(w_t, _ones_column(v, BN), IEEE, UPCAST)
            else:
                # w in two halves of v's 16-bit dtype, w_hi + w_lo: about 16 bits of w's mantissa (TF32 keeps 10;
                # w rounded to bf16 once, as φ above, cost θ's and γ's gradients precision: bf16 inputs, N = 300,
                # d = 32, relative error 3.3e-3 -> 4.8e-3 against fp64), on the same tensor cores and against the
                # same v operand as φ's product, where TF32 needed an fp32 copy of v
                w_hi = w_t.to(v.dtype)
                w_lo = (w_t - w_hi.to(tl.float32)).to(v.dtype)
                ones = _ones_column(v, BN)
                macc += _dot(w_hi, v, IEEE, UPCAST)
                macc += _dot(w_lo, v, IEEE, UPCAST)
                mzacc += _dot(w_hi, ones, IEEE, UPCAST)
                mzacc += _dot(w_lo, ones, IEEE, UPCAST)
    return acc, tl.sum(zacc, axis=1), macc, tl.sum(mzacc, axis=1)


@triton.jit
def _store_state(base, acc, zacc, offs_d, offs_v, dmask, vmask, DV: tl.constexpr):
    """A ``[D, DV + 1]`` fp32 state (or partial, or gradient) from its ``[BD, BDV]`` and ``[BD]`` parts."""
    tl.store(base + offs_d[:, None] * (DV + 1) + offs_v[None, :], acc, mask=dmask[:, None] & vmask[None, :])
    tl.store(base + offs_d * (DV + 1) + DV, zacc, mask=dmask)


@triton.jit
def _output_tiles(q_ptr, o_ptr, first, TILES, NQ, s_qn, s_qd, s_on, s_od, s, z, eps_n, offs_d, offs_v, partner,
                  dmask, vmask, cos, ssin, BD: tl.constexpr, BN: tl.constexpr, MAP: tl.constexpr,
                  PAIRING: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr,
                  SPLIT: tl.constexpr):
    """o = φ(q) S / (φ(q)·z + ε·N) for the query tiles ``first .. first + TILES`` (state ``s``, ``z`` fp32).
    ``SPLIT``: bf16 queries may take the split products below."""
    # bf16 queries: φ(q) is rounded to bf16, as the state pass rounds φ(k), and meets S and z on the bf16 tensor
    # cores, each split in two bf16 halves (_split_half; z as the first two columns of a [BD, 16] block), so φ is
    # not converted and the denominator needs no sum over channels on the CUDA cores. S and z keep ~16 bits of
    # mantissa where the TF32 product kept 10, φ(q) 8 where it kept 10. ptxas, sm_90, d = 64, instructions per
    # tile: ReLU 449 -> 278, MirrorLA 444 -> 391 (adjacent pairs). Emulated in fp64 with round-to-nearest (B = 4,
    # H = 3, N = 1,000, randn inputs), error of o against exact arithmetic relative to its row's largest value,
    # before o's own rounding to bf16: ReLU mean 2.4e-5 -> 3.0e-7, MirrorLA 1.9e-4 -> 2.4e-4; after it (what a
    # caller gets) ReLU 4.4e-4 both, MirrorLA 5.1e-4 -> 5.4e-4. Half pairs, whose rotation crosses threads, took
    # 601 -> 690 instructions, and heads of 128 (32-token tiles, 8 warps: 236 registers where 128 had done, 631 ->
    # 1,764 instructions), so those keep the TF32 product, as fp16 does (S can exceed fp16's range). So does the
    # training row forward (no SPLIT), which holds the moment as well: ptxas for sm_80 spilled 12 -> 48 B there
    # (7 local accesses per tile), while its few query tiles of a short row gain little
    HALF_DOTS: tl.constexpr = (SPLIT and q_ptr.dtype.element_ty == tl.bfloat16 and not IEEE and BD <= 64
                               and not (MAP == 2 and PAIRING == 1))
    if HALF_DOTS:
        s_hi, s_lo = _split_half(s, tl.bfloat16)
        z_hi, z_lo = _split_half(z, tl.bfloat16)
        column = tl.arange(0, 16)[None, :]
        # built in fp32 and cast back, exactly (the interpreter has no bf16 constants)
        z_cols = tl.where(column == 0, z_hi.to(tl.float32)[:, None],
                          tl.where(column == 1, z_lo.to(tl.float32)[:, None], 0.0)).to(tl.bfloat16)
    for t in range(0, TILES):
        offs_n = _token_offsets(first + t, BN)
        nmask = offs_n < NQ
        phi, y, y_p, _ = _features(q_ptr, offs_n, offs_d, partner, nmask, dmask, s_qn, s_qd, cos, ssin,
                                   MAP, SWAP, PAIRING, BN, BD)
        if HALF_DOTS:
            phi = phi.to(tl.bfloat16)
            num = _dot(phi, s_hi, IEEE, UPCAST) + _dot(phi, s_lo, IEEE, UPCAST)
            den = tl.sum(_dot(phi, z_cols, IEEE, UPCAST), axis=1)
        else:
            num = _dot(phi, s, IEEE, UPCAST)
            den = tl.sum(phi * z[None, :], axis=1)
        if IEEE:
            # fp32 inputs on IEEE dots: the reciprocal below left ptxas 255 registers and up to 7.7 KB of spills
            o = num / (den + eps_n)[:, None]
        else:
            # one reciprocal per token, then products: a division per element compiled to a product and, for the
            # range of its divisor, a scaling and a select of each element (ReLU, bf16: 538 -> 449 per tile)
            inv_den = 1.0 / (den + eps_n)
            o = num * inv_den[:, None]
        tl.store(o_ptr + offs_n[:, None] * s_on + offs_v[None, :] * s_od, o.to(o_ptr.dtype.element_ty),
                 mask=nmask[:, None] & vmask[None, :])


@triton.jit
def _dq_tiles(q_ptr, do_ptr, dq_ptr, first, TILES, NQ, s_qn, s_qd, s_dn, s_dd, s, z, s_p, z_p, eps_n, offs_d,
              offs_v, partner, sign, dmask, vmask, cos, ssin, D: tl.constexpr, BD: tl.constexpr,
              BDV: tl.constexpr, BN: tl.constexpr, MAP: tl.constexpr, PAIRING: tl.constexpr, IEEE: tl.constexpr,
              UPCAST: tl.constexpr, SWAP: tl.constexpr, DOT_SUMS: tl.constexpr):
    """The q pass of the backward over the tiles ``first .. first + TILES``: stores dq (contiguous ``[NQ, D]`` at
    ``dq_ptr``) and returns this range's dS, dz and d angle (q part), fp32. ``DOT_SUMS``: the sums over tokens on
    the tensor cores (below)."""
    # dz and d angle are sums over the tokens. With DOT_SUMS they are products with a [BN, 16] block that holds
    # dden, or ones, in its first column (as the forward sums z), reduced over that block once after the loop: a
    # sum over the token axis per tile crosses the warps (shuffles, shared memory and a barrier per tile). Where
    # that pays is _token_sums_on_dots; the row backward never takes it (its eight warps and the k/v pass's live
    # values left it 963 -> 1,227 instructions and 336 B of new spills). The products round their operands to
    # TF32 as dS's does (2-3e-4 relative on these sums against fp64); IEEE fp32 dots would run on the FMA units,
    # so there the plain sums stay too.
    ds_acc = tl.zeros([BD, BDV], dtype=tl.float32)
    if IEEE or not DOT_SUMS:
        dz_acc = tl.zeros([BD], dtype=tl.float32)
        dang = tl.zeros([BD], dtype=tl.float32)
    else:
        dz_acc = tl.zeros([BD, 16], dtype=tl.float32)
        dang = tl.zeros([BD, 16], dtype=tl.float32)
        first_column = tl.arange(0, 16)[None, :] == 0
        ones = _ones_column(ds_acc, BN)  # fp32, as ds_acc
    for t in range(0, TILES):
        offs_n = _token_offsets(first + t, BN)
        nmask = offs_n < NQ
        phi, y, y_p, _ = _features(q_ptr, offs_n, offs_d, partner, nmask, dmask, s_qn, s_qd, cos, ssin,
                                   MAP, SWAP, PAIRING, BN, BD)
        do = tl.load(do_ptr + offs_n[:, None] * s_dn + offs_v[None, :] * s_dd, mask=nmask[:, None] & vmask[None, :],
                     other=0.0).to(tl.float32)
        # two matmuls, not three: with o = num / den and num = φ S, the product do·Sᵀ gives both the numerator's
        # gradient, dnum·Sᵀ = (do·Sᵀ) / den, and do·num = φ·(do·Sᵀ) row by row, so num itself is never formed
        do_st = _dot(do, tl.trans(s), IEEE, UPCAST)
        # padded tokens get 1/den = 0: with eps = 0 their den is 0, and do·(1/0) = NaN in dnum would reach dS through
        # φᵀ·dnum (0·NaN), so every gradient but dq would be NaN whenever the tokens do not fill the last tile
        inv_den = tl.where(nmask, 1.0 / (tl.sum(phi * z[None, :], axis=1) + eps_n), 0.0)
        dnum = do * inv_den[:, None]
        dden = -tl.sum(phi * do_st, axis=1) * inv_den * inv_den
        dphi = do_st * inv_den[:, None] + dden[:, None] * z[None, :]
        if MAP == 2 and (IEEE or not DOT_SUMS):  # the ReLU's mask off φ, see _map_backward
            active = phi
        else:
            active = y
        dq, d_angle = _map_backward(dphi, dnum, s_p, dden[:, None] * z_p[None, :], active, y_p, cos, ssin, sign,
                                    MAP, SWAP, PAIRING, BN, BD, IEEE, UPCAST, True)
        if (IEEE or not DOT_SUMS) and MAP == 2:
            dang += tl.sum(d_angle, axis=0) * sign
        tl.store(dq_ptr + offs_n[:, None] * D + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=nmask[:, None] & dmask[None, :])
        phi_t = tl.trans(phi)
        ds_acc += _dot(phi_t, dnum, IEEE, UPCAST)
        if IEEE or not DOT_SUMS:
            dz_acc += tl.sum(phi * dden[:, None], axis=0)
        else:
            dz_acc += _dot(phi_t, tl.where(first_column, dden[:, None], 0.0), IEEE, UPCAST)
            if MAP == 2:
                # the loop's last product: Triton leaves it in flight across the loop's back edge, and ptxas then
                # serialises the loop's wgmma (advisory C7515, each waits for the one before it; compile_check's
                # "ptxas advisories"). Every order that puts another product last lifts that but spills more: sm_90,
                # bf16, d = 64, adjacent pairs, per tile, this order 132 B of spills (Triton 3.8) and 148 B (3.6);
                # d angle's product first 212 and 628 B, the best of seven other orders 212 (3.8) and 564 B (3.6);
                # a fresh accumulator summed per tile 284 B (3.8). Which costs more, serialised wgmma or local
                # memory traffic, only a GPU can say
                dang += _dot(tl.trans(d_angle), ones, IEEE, UPCAST)
    if DOT_SUMS and not IEEE:  # over the [BD, 16] blocks' columns (only the first is not zero)
        dz_acc = tl.sum(dz_acc, axis=1)
        dang = tl.sum(dang, axis=1) * sign
    return ds_acc, dz_acc, dang


@triton.jit
def _dkv_tiles(k_ptr, v_ptr, dk_ptr, dv_ptr, first, TILES, N, s_kn, s_kd, s_vn, s_vd, ds, dz, ds_p, dz_p, offs_d,
               offs_v, partner, sign, dmask, vmask, cos, ssin, ds1, ds2, D: tl.constexpr, DV: tl.constexpr,
               BD: tl.constexpr, BN: tl.constexpr, MAP: tl.constexpr, PAIRING: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr, SWAP: tl.constexpr, SIGMA: tl.constexpr, X_FROM_Y: tl.constexpr):
    """The k/v pass of the backward over the tiles ``first .. first + TILES``, from the total dS and dz: stores dk
    and dv (contiguous). With ``SIGMA`` (MirrorLA) dk includes the σ² path's ``dS₁ + 2·dS₂·k`` (``ds1``, ``ds2``
    per channel). The k side of d angle is not summed here: it comes from the forward's moment."""
    for t in range(0, TILES):
        offs_n = _token_offsets(first + t, BN)
        nmask = offs_n < N
        phi, y, y_p, x = _features(k_ptr, offs_n, offs_d, partner, nmask, dmask, s_kn, s_kd, cos, ssin,
                                   MAP, SWAP, PAIRING, BN, BD)
        v = tl.load(v_ptr + offs_n[:, None] * s_vn + offs_v[None, :] * s_vd, mask=nmask[:, None] & vmask[None, :],
                    other=0.0).to(tl.float32)
        dv = _dot(phi, ds, IEEE, UPCAST)
        tl.store(dv_ptr + offs_n[:, None] * DV + offs_v[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=nmask[:, None] & vmask[None, :])
        dphi = _dot(v, tl.trans(ds), IEEE, UPCAST) + dz[None, :]
        dk, _ = _map_backward(dphi, v, ds_p, dz_p[None, :], y, y_p, cos, ssin, sign,
                              MAP, SWAP, PAIRING, BN, BD, IEEE, UPCAST, False)
        if SIGMA:
            if X_FROM_Y:  # adjacent pairs only (the launcher's _x_from_y)
                # x = cos·y − ssin·y_p (the rotation undone; y_p is y with its adjacent pairs swapped in registers),
                # so x need not stay live across the pass's matmuls (see _x_from_y for where that pays)
                dk += ds1[None, :] + (2.0 * ds2 * cos)[None, :] * y - (2.0 * ds2 * ssin)[None, :] * y_p
            else:
                dk += ds1[None, :] + 2.0 * ds2[None, :] * x
        tl.store(dk_ptr + offs_n[:, None] * D + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=nmask[:, None] & dmask[None, :])


@triton.jit
def _token_sum_tiles(x_ptr, first, TILES, N, s_xn, s_xd, offs_d, dmask, BD: tl.constexpr, BN: tl.constexpr):
    """Per-channel ``Σ x`` and ``Σ x²`` (fp32 ``[BD]``) over the tiles ``first .. first + TILES``."""
    # tile-shaped accumulators, reduced over the tokens once after the loop: a reduction per tile costs cross-lane
    # shuffles (ptxas sm_90, bf16, d = 64: 324 instructions per tile and thread, 64 of them shuffles)
    s1 = tl.zeros([BN, BD], dtype=tl.float32)
    s2 = tl.zeros([BN, BD], dtype=tl.float32)
    for t in range(0, TILES):
        offs_n = _token_offsets(first + t, BN)
        nmask = offs_n < N
        x = tl.load(x_ptr + offs_n[:, None] * s_xn + offs_d[None, :] * s_xd, mask=nmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        s1 += x
        s2 += x * x
    return tl.sum(s1, axis=0), tl.sum(s2, axis=0)


# ------------------------------------------------------------------------------------------- chunked kernels


@sizes_jit("N", "H", "TILES", "S_CHUNKS")
def _state_kernel(K, V, COS, SSIN, PART, N, H, TILES,
                  s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                  SPART, THETA, GAMMA, SUMS, S_CHUNKS, n_tokens, eps_map,
                  D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                  MAP: tl.constexpr, PAIRING: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                  SWAP: tl.constexpr, ANGLES: tl.constexpr, FORM: tl.constexpr, LOAD_MAP: tl.constexpr,
                  MOMENT: tl.constexpr):
    """PART[0, bh, chunk] = [Σ φ(k) vᵀ | Σ φ(k)] over the chunk's tokens, ``[BD, BDV + 1]`` → stored
    ``[D, DV + 1]``; with ``MOMENT`` also PART[1, bh, chunk] = the moment (see :func:`_state_tiles`).

    With ``ANGLES`` (MirrorLA) every program derives the row's rotation itself from the token-sum partials of the
    keys (``SPART``, see :func:`_mirror_angles`), which saves a launch; the first chunk's program stores the cos,
    signed sin and token sums that the output and backward kernels read."""
    # LOAD_MAP: MAP, or 0 when the angles are computed here (then COS and SSIN are outputs, not inputs)
    bh, chunk, b, h, offs_d, offs_v, dmask, vmask, partner, sign, cos, ssin = _program(
        COS, SSIN, H, D, DV, BD, BDV, PAIRING, LOAD_MAP)
    if ANGLES:
        cos, ssin, s1, s2 = _mirror_angles(SPART, THETA, GAMMA, bh, h, S_CHUNKS, n_tokens, eps_map, offs_d, partner,
                                           sign, dmask, D, BD, PAIRING, FORM)
        if chunk == 0:
            _store_rotation(COS, SSIN, SUMS, bh, cos, ssin, s1, s2, offs_d, dmask, D)
    acc, zacc, macc, mzacc = _state_tiles(K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, chunk * TILES, TILES,
                                          N, s_kn, s_kd, s_vn, s_vd, offs_d, offs_v, partner, dmask, vmask, cos,
                                          ssin, BD, BDV, BN, MAP, PAIRING, IEEE, UPCAST, SWAP, MOMENT)
    base = PART + (bh * tl.num_programs(1) + chunk) * D * (DV + 1)
    _store_state(base, acc, zacc, offs_d, offs_v, dmask, vmask, DV)
    if MOMENT:
        _store_state(base + tl.num_programs(0) * tl.num_programs(1) * D * (DV + 1), macc, mzacc, offs_d, offs_v,
                     dmask, vmask, DV)


@sizes_jit("NQ", "H", "TILES")
def _output_kernel(Q, STATE, COS, SSIN, O, NQ, H, eps_n, TILES,
                   s_qb, s_qh, s_qn, s_qd, s_ob, s_oh, s_on, s_od,
                   D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                   MAP: tl.constexpr, PAIRING: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   SWAP: tl.constexpr):
    """o = φ(q) S / (φ(q)·z + ε·N) for the program's chunk of ``TILES`` query tiles (the grid's second axis, see
    :func:`_chunks`): the state is loaded once per program."""
    bh, chunk, b, h, offs_d, offs_v, dmask, vmask, partner, sign, cos, ssin = _program(
        COS, SSIN, H, D, DV, BD, BDV, PAIRING, MAP)
    s, z, s_p, z_p = _load_state(STATE + bh * D * (DV + 1), offs_d, offs_v, partner, dmask, vmask, DV)
    _output_tiles(Q + b * s_qb + h * s_qh, O + b * s_ob + h * s_oh, chunk * TILES, TILES, NQ, s_qn, s_qd, s_on,
                  s_od, s, z, eps_n, offs_d, offs_v, partner, dmask, vmask, cos, ssin, BD, BN, MAP, PAIRING, IEEE,
                  UPCAST, SWAP, True)


@sizes_jit("NQ", "H", "TILES")
def _backward_q_kernel(Q, STATE, COS, SSIN, DO, DQ, DSTATE_PART, DANG_PART, NQ, H, eps_n, TILES,
                       s_qb, s_qh, s_qn, s_qd, s_db, s_dh, s_dn, s_dd,
                       D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                       MAP: tl.constexpr, PAIRING: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       SWAP: tl.constexpr, DOT_SUMS: tl.constexpr):
    """dq, and the chunk's partial dS, dz and d angle (q part); ``DOT_SUMS``: see :func:`_token_sums_on_dots`."""
    bh, chunk, b, h, offs_d, offs_v, dmask, vmask, partner, sign, cos, ssin = _program(
        COS, SSIN, H, D, DV, BD, BDV, PAIRING, MAP)
    s, z, s_p, z_p = _load_state(STATE + bh * D * (DV + 1), offs_d, offs_v, partner, dmask, vmask, DV)
    ds_acc, dz_acc, dang = _dq_tiles(Q + b * s_qb + h * s_qh, DO + b * s_db + h * s_dh, DQ + bh * NQ * D,
                                     chunk * TILES, TILES, NQ, s_qn, s_qd, s_dn, s_dd, s, z, s_p, z_p, eps_n,
                                     offs_d, offs_v, partner, sign, dmask, vmask, cos, ssin,
                                     D, BD, BDV, BN, MAP, PAIRING, IEEE, UPCAST, SWAP, DOT_SUMS)
    _store_state(DSTATE_PART + (bh * tl.num_programs(1) + chunk) * D * (DV + 1), ds_acc, dz_acc, offs_d, offs_v,
                 dmask, vmask, DV)
    if MAP == 2:  # only a rotation has an angle to differentiate (DANG_PART is a placeholder otherwise)
        tl.store(DANG_PART + (bh * tl.num_programs(1) + chunk) * D + offs_d, dang, mask=dmask)


@triton.jit
def _moment_angle(MOM, ds, dz, rows, sign, dmask, vmask, offs_v, DV: tl.constexpr):
    """The k side of d angle on the channels ``rows`` ``[BD]``: ``sign·(Σ_v dS ⊙ Σ w vᵀ + dz ⊙ Σ w)`` from the
    forward's moment ``MOM [D, DV + 1]`` (see :func:`_state_tiles`) and the gradient state's rows ``ds``, ``dz`` of
    the same channels. It equals the k/v pass's ``Σ_n [y > 0]·dφ·y_p`` with ``dφ = v dSᵀ + dz``: summing w vᵀ in
    the forward lets the backward know the whole d angle before its k/v pass, which then adds the σ² path to dk
    as it stores it (no pass over k and dk after it)."""
    m = tl.load(MOM + rows[:, None] * (DV + 1) + offs_v[None, :], mask=dmask[:, None] & vmask[None, :], other=0.0)
    mz = tl.load(MOM + rows * (DV + 1) + DV, mask=dmask, other=0.0)
    return sign * (tl.sum(ds * m, axis=1) + dz * mz)


@triton.jit
def _moment_angle_from_memory(MOM, DSTATE, rows, sign, dmask, DV: tl.constexpr, BDV: tl.constexpr):
    """:func:`_moment_angle` with the gradient state's rows read from ``DSTATE [D, DV + 1]`` too, both a block of
    16 columns at a time: a few registers (two whole ``[BD, BDV]`` fp32 tiles more at the start of the k/v pass
    made ptxas spill up to 19 KB per thread at d = 128)."""
    acc = tl.zeros_like(sign)
    for v0 in tl.static_range(0, BDV, 16):
        cols = v0 + tl.arange(0, 16)
        offs = rows[:, None] * (DV + 1) + cols[None, :]
        mask = dmask[:, None] & (cols < DV)[None, :]
        acc += tl.sum(tl.load(MOM + offs, mask=mask, other=0.0) * tl.load(DSTATE + offs, mask=mask, other=0.0),
                      axis=1)
    mz = tl.load(MOM + rows * (DV + 1) + DV, mask=dmask, other=0.0)
    dz = tl.load(DSTATE + rows * (DV + 1) + DV, mask=dmask, other=0.0)
    return sign * (acc + dz * mz)


@sizes_jit("N", "H", "TILES", "CHUNKS_Q")
def _backward_kv_kernel(K, V, COS, SSIN, DSTATE, DK, DV_OUT, MOM, DANG_Q, DANG, SUMS, GAMMA, N, H, TILES, CHUNKS_Q,
                        n_tokens, eps_map, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                        D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                        MAP: tl.constexpr, PAIRING: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                        SWAP: tl.constexpr, MOMENT: tl.constexpr, ANGLES: tl.constexpr, FORM: tl.constexpr,
                        X_FROM_Y: tl.constexpr):
    """dk and dv from the total dS and dz. With ``MOMENT`` (a rotation whose angle needs a gradient) each program
    first adds up the row's d angle: the q side from the q pass's chunk partials ``DANG_Q [B·H, CHUNKS_Q, D]``, the
    k side from the forward's moment (``MOM``: the forward's state ``[2, B·H, D, DV + 1]``, the moment its second
    half). The row's first program stores it per channel into
    ``DANG [B·H, D]``; with ``ANGLES`` (MirrorLA) it goes through the σ² path instead: dθ and dγ into
    ``DANG [2, B·H, D/2]`` (first program) and ``dS₁ + 2·dS₂·k`` into dk (every program, on its tiles)."""
    bh, chunk, b, h, offs_d, offs_v, dmask, vmask, partner, sign, cos, ssin = _program(
        COS, SSIN, H, D, DV, BD, BDV, PAIRING, MAP)
    ds, dz, ds_p, dz_p = _load_state(DSTATE + bh * D * (DV + 1), offs_d, offs_v, partner, dmask, vmask, DV)
    ds1 = tl.zeros([BD], dtype=tl.float32)
    ds2 = tl.zeros([BD], dtype=tl.float32)
    if MAP == 2:
        if MOMENT:
            mom = MOM + (tl.num_programs(0) + bh) * D * (DV + 1)
            dst = DSTATE + bh * D * (DV + 1)
            dang = _moment_angle_from_memory(mom, dst, offs_d, sign, dmask, DV, BDV)
            for c in range(0, CHUNKS_Q):  # in a fixed order: deterministic
                dang += tl.load(DANG_Q + (bh * CHUNKS_Q + c) * D + offs_d, mask=dmask, other=0.0)
            if ANGLES:  # σ² is per pair: both channels' d angle
                if SWAP:
                    dang += _swap_vector(dang, BD, PAIRING)
                else:  # the partner's from its rows of dS and the moment, and its partials
                    dang += _moment_angle_from_memory(mom, dst, partner, -sign, dmask, DV, BDV)
                    for c in range(0, CHUNKS_Q):
                        dang += tl.load(DANG_Q + (bh * CHUNKS_Q + c) * D + partner, mask=dmask, other=0.0)
                ds1, ds2 = _sigma_path(dang, SUMS, GAMMA, DANG, bh, h, tl.num_programs(0), sign, partner, offs_d,
                                       dmask, n_tokens, eps_map, chunk == 0, D, PAIRING, FORM)
            elif chunk == 0:
                tl.store(DANG + bh * D + offs_d, dang, mask=dmask)
    _dkv_tiles(K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, DK + bh * N * D, DV_OUT + bh * N * DV,
               chunk * TILES, TILES, N, s_kn, s_kd, s_vn, s_vd, ds, dz, ds_p, dz_p, offs_d, offs_v, partner,
               sign, dmask, vmask, cos, ssin, ds1, ds2, D, DV, BD, BN, MAP, PAIRING, IEEE, UPCAST, SWAP, ANGLES,
               X_FROM_Y)


@sizes_jit("N", "H", "TILES")
def _token_sums_kernel(X, PART, N, H, TILES, s_xb, s_xh, s_xn, s_xd,
                       D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    """PART[bh, chunk] = [Σ x, Σ x²] per channel over the chunk's tokens (fp32)."""
    bh = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    s1, s2 = _token_sum_tiles(X + (bh // H) * s_xb + (bh % H) * s_xh, chunk * TILES, TILES, N, s_xn, s_xd, offs_d,
                              dmask, BD, BN)
    base = PART + (bh * tl.num_programs(1) + chunk) * 2 * D
    tl.store(base + offs_d, s1, mask=dmask)
    tl.store(base + D + offs_d, s2, mask=dmask)


# ----------------------------------------------------------------------------------------------- row kernels


@sizes_jit("NQ", "N", "H")
def _row_forward_kernel(Q, K, V, COS, SSIN, STATE, O, NQ, N, H, eps_n,
                        s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                        s_ob, s_oh, s_on, s_od, THETA, GAMMA, SUMS, n_tokens, eps_map,
                        D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                        MAP: tl.constexpr, PAIRING: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                        SWAP: tl.constexpr, ANGLES: tl.constexpr, FORM: tl.constexpr, LOAD_MAP: tl.constexpr,
                        MOMENT: tl.constexpr):
    """The whole forward of one (b, h) row in one program: (with ``ANGLES``, MirrorLA: the keys' token sums, the
    rotation, stored with the sums for the backward), the state ``STATE[0, bh]`` (stored for the backward; with
    ``MOMENT`` the moment too, ``STATE[1, bh]``) and o. The state stays in registers between its pass and the
    output pass. Needs ``SWAP`` when rotating."""
    bh, _, b, h, offs_d, offs_v, dmask, vmask, partner, sign, cos, ssin = _program(
        COS, SSIN, H, D, DV, BD, BDV, PAIRING, LOAD_MAP)
    k_ptr = K + b * s_kb + h * s_kh
    tiles_k = tl.cdiv(N, BN)
    if ANGLES:
        s1, s2 = _token_sum_tiles(k_ptr, 0, tiles_k, N, s_kn, s_kd, offs_d, dmask, BD, BN)
        cos, ssin = _angles_from_sums(s1, _swap_vector(s1, BD, PAIRING), s2, _swap_vector(s2, BD, PAIRING), THETA,
                                      GAMMA, h, sign, offs_d, dmask, n_tokens, eps_map, D, PAIRING, FORM)
        _store_rotation(COS, SSIN, SUMS, bh, cos, ssin, s1, s2, offs_d, dmask, D)
    acc, zacc, macc, mzacc = _state_tiles(k_ptr, V + b * s_vb + h * s_vh, 0, tiles_k, N, s_kn, s_kd, s_vn, s_vd,
                                          offs_d, offs_v, partner, dmask, vmask, cos, ssin, BD, BDV, BN, MAP,
                                          PAIRING, IEEE, UPCAST, SWAP, MOMENT)
    _store_state(STATE + bh * D * (DV + 1), acc, zacc, offs_d, offs_v, dmask, vmask, DV)
    if MOMENT:
        _store_state(STATE + (tl.num_programs(0) + bh) * D * (DV + 1), macc, mzacc, offs_d, offs_v, dmask, vmask,
                     DV)
    _output_tiles(Q + b * s_qb + h * s_qh, O + b * s_ob + h * s_oh, 0, tl.cdiv(NQ, BN), NQ, s_qn, s_qd, s_on, s_od,
                  acc, zacc, eps_n, offs_d, offs_v, partner, dmask, vmask, cos, ssin, BD, BN, MAP, PAIRING, IEEE,
                  UPCAST, SWAP, not MOMENT)


@sizes_jit("NQ", "N", "H")
def _row_backward_kernel(Q, K, V, COS, SSIN, STATE, DO, DQ, DK, DV_OUT, DANG, NQ, N, H, eps_n,
                         s_qb, s_qh, s_qn, s_qd, s_db, s_dh, s_dn, s_dd, s_kb, s_kh, s_kn, s_kd,
                         s_vb, s_vh, s_vn, s_vd, SUMS, GAMMA, n_tokens, eps_map,
                         D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                         MAP: tl.constexpr, PAIRING: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                         SWAP: tl.constexpr, ANGLES: tl.constexpr, FORM: tl.constexpr, MOMENT: tl.constexpr):
    """The whole backward of one (b, h) row in one program: the q pass (dq, dS, dz; dS stays in registers), then,
    with ``MOMENT`` (a rotation whose angle needs a gradient), the row's d angle per channel from the q pass and
    the forward's moment ``STATE[1, bh]``, stored into ``DANG [B·H, D]`` or with ``ANGLES`` (MirrorLA) taken
    through the σ² path (dθ and dγ of the row into ``DANG [2, B·H, D/2]``), and the k/v pass (dk, dv; with
    ``ANGLES`` dk includes dS₁ + 2·dS₂·k). Needs ``SWAP`` when rotating (the partner rows of dS are shuffled in
    registers, never reloaded)."""
    bh, _, b, h, offs_d, offs_v, dmask, vmask, partner, sign, cos, ssin = _program(
        COS, SSIN, H, D, DV, BD, BDV, PAIRING, MAP)
    s, z, s_p, z_p = _load_state(STATE + bh * D * (DV + 1), offs_d, offs_v, partner, dmask, vmask, DV)
    ds, dz, dang_q = _dq_tiles(Q + b * s_qb + h * s_qh, DO + b * s_db + h * s_dh, DQ + bh * NQ * D, 0,
                               tl.cdiv(NQ, BN), NQ, s_qn, s_qd, s_dn, s_dd, s, z, s_p, z_p, eps_n, offs_d, offs_v,
                               partner, sign, dmask, vmask, cos, ssin, D, BD, BDV, BN, MAP, PAIRING, IEEE, UPCAST,
                               SWAP, False)
    ds1 = tl.zeros([BD], dtype=tl.float32)
    ds2 = tl.zeros([BD], dtype=tl.float32)
    if MAP == 2:
        if MOMENT:
            dang = dang_q + _moment_angle(STATE + (tl.num_programs(0) + bh) * D * (DV + 1), ds, dz, offs_d, sign,
                                          dmask, vmask, offs_v, DV)
            if ANGLES:  # σ² is per pair: both channels' d angle
                ds1, ds2 = _sigma_path(dang + _swap_vector(dang, BD, PAIRING), SUMS, GAMMA, DANG, bh, h,
                                       tl.num_programs(0), sign, partner, offs_d, dmask, n_tokens, eps_map, True, D,
                                       PAIRING, FORM)
            else:
                tl.store(DANG + bh * D + offs_d, dang, mask=dmask)
    # with SWAP (or no rotation) the partner rows of dS are never read: ds and dz stand in for them
    _dkv_tiles(K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh, DK + bh * N * D, DV_OUT + bh * N * DV, 0,
               tl.cdiv(N, BN), N, s_kn, s_kd, s_vn, s_vd, ds, dz, ds, dz, offs_d, offs_v, partner, sign, dmask, vmask,
               cos, ssin, ds1, ds2, D, DV, BD, BN, MAP, PAIRING, IEEE, UPCAST, SWAP, ANGLES, False)


# ------------------------------------------------------------------------------------------------- launching


def _blocks(d: int, dv: int) -> tuple[int, int, int, int]:
    """(BD, BDV, BN, warps): wide heads take shorter token tiles, so the backward's tiles fit shared memory."""
    bd = max(16, next_power_of_2(d))
    bdv = max(16, next_power_of_2(dv))
    wide = max(bd, bdv) >= 128
    return bd, bdv, (32 if wide else _BLOCK_N), (8 if wide else 4)


def _gpu_properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of the CUDA ``device``, cached per GPU (the launchers ask every call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _GPU_PROPERTIES:
        _GPU_PROPERTIES[index] = torch.cuda.get_device_properties(index)
    return _GPU_PROPERTIES[index]


def _capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of ``device``; :data:`_CPU_CAPABILITY` for CPU tensors."""
    if device.type != "cuda":
        return _CPU_CAPABILITY
    properties = _gpu_properties(device)
    return properties.major, properties.minor


def _row_backward_warps(device: torch.device, warps: int) -> int:
    """Warps of the row backward, whose one program holds both passes' tiles: eight, except four on compute
    capability 8.0 and 8.7 (A100, Orin) where the tiles allow (d ≤ 64).

    On sm_90 four warps spill (ptxas, bf16, d = 64, MirrorLA: 824 B per thread, 163 local-memory accesses per tile;
    eight: none) at about the same warp instructions per token (117 against 120). Without Hopper's warp-group matmuls
    eight warps issue far more instructions per token (sm_80, bf16, d = 64: ReLU 171 against 98, MirrorLA 222
    against 137, with 9.1 local-memory accesses per token against 7.1), and on sm_80 four cost no occupancy: at 255
    registers per thread and 72 KB of shared memory, an SM holds one program of eight warps or two of four. sm_86
    and sm_89 count alike, but their 100 KB of shared memory per SM hold one program, so four warps would halve the
    warps per SM: they keep eight."""
    return warps if _capability(device) in ((8, 0), (8, 7)) else max(warps, 8)


def _token_sums_on_dots(device: torch.device, bd: int, bdv: int) -> bool:
    """Whether the chunked q pass sums dz and its part of d angle over the tokens on the tensor cores (``DOT_SUMS``,
    see :func:`_dq_tiles`): on GPUs of compute capability 9 and up (warp-group matmuls), at 64-wide tiles
    (33 ≤ d ≤ 64). ptxas, bf16/fp16: on sm_90 at d = 48 and 64 the loop per tile shrinks by 12–16% (ReLU 1,165 ->
    1,002, MirrorLA 1,819 -> 1,534 at d = 64) and MirrorLA's spill stores halve; at d = 16 it grows by 9–13% and at
    d = 128 MirrorLA's adjacent pairs start to spill (160 B). On sm_80/sm_89, whose matmuls stage the blocks
    through shared memory, the kernel's shared memory grows by 28–75% at d = 64, which on sm_89 (99 KB per SM)
    halves ReLU's programs per SM and puts 10 more configurations over its limit."""
    return _capability(device)[0] >= 9 and max(bd, bdv) == 64


def _x_from_y(dtype: torch.dtype, bd: int, bdv: int) -> bool:
    """Whether the chunked k/v pass of MirrorLA (adjacent pairs) takes the keys x for dk's σ² term as cos·y − ssin·y_p
    rather than keeping x live across its matmuls (``X_FROM_Y``): for 16-bit inputs at 64-wide tiles (33 ≤ d ≤ 64).
    ptxas, per tile: sm_90 bf16 d = 64 1,026 -> 978 instructions, spills 104 -> 12 B (local accesses 30 -> 6), d = 48
    990 -> 963 and 32 -> 4 B; Triton 3.6 alike; sm_80 1,348 -> 1,295 and 80 -> 0 B; sm_89 1,397 -> 1,372 and 56 -> 0
    (at d = 48 there +0.1–1.4% instructions, 23 registers fewer, no spills either way).
    Elsewhere it cost: d = 16 and 128 up to 3% more instructions and more registers, fp32 (16-token tiles) 1–3% more
    and at d = 128 three times the spills, and the row backward, whose program holds both passes, up to 524 B more
    spills at d = 128 and 116 B more on sm_80 at d = 64. Half pairs keep x: their y_p is not a swap within a thread
    (sm_90, bf16, d = 64: 973 -> 1,085 instructions, spills 68 -> 132 B)."""
    return dtype in (torch.bfloat16, torch.float16) and max(bd, bdv) == 64


def _ieee_dots(dtype: torch.dtype) -> bool:
    """Whether the matmuls of fp32 inputs run in IEEE fp32 (on the FMA units) rather than TF32 (tensor cores): as
    for torch's own fp32 matmuls, TF32 where ``torch.set_float32_matmul_precision("high")`` (or ``"medium"``)
    allows it, IEEE at the default ``"highest"``. Half-precision inputs always take the tensor cores."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def _swap(d: int, bd: int, pairing: int) -> bool:
    """Whether pair partners can be shuffled in registers (see _swap_pairs) instead of loaded a second time."""
    return pairing == 0 or bd == d


def _chunks(n: int, bh: int, device: torch.device, block_n: int = _BLOCK_N) -> tuple[int, int]:
    """(programs per (b, h) row, tiles per program): enough programs to fill the GPU, each looping over tiles. At
    most 4 per SM (the grid's second axis, far below CUDA's 65,535 there) whatever the length: past that a program
    takes more tiles."""
    tiles = cdiv(n, block_n)
    if device.type == "cuda":
        target = 4 * _gpu_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: few, long programs are fastest
    chunks = max(1, min(tiles, cdiv(target, max(bh, 1))))  # an empty batch (B·H = 0) launches an empty grid
    per = max(1, cdiv(tiles, chunks))  # no tokens (no queries): one program per row that runs no tile
    return cdiv(max(tiles, 1), per), per


def _rotation(angle: torch.Tensor | None, b: int, h: int, d: int, pairing: str, device) -> tuple[torch.Tensor, ...]:
    """Per-channel cos and signed sin ``[B·H, d]`` (fp32) of the pair angles ``[B or 1, H, d/2]``; (None, None)
    without angles."""
    if angle is None:  # no rotation: the kernels do not read cos and sin (two fills saved per call)
        return None, None
    a = angle.to(torch.float32).expand(b, h, d // 2)
    cos, sin = torch.cos(a), torch.sin(a)
    if pairing == "adjacent":
        cos_c = cos.repeat_interleave(2, dim=-1)
        ssin = torch.stack([-sin, sin], dim=-1).flatten(-2)
    else:
        cos_c = torch.cat([cos, cos], dim=-1)
        ssin = torch.cat([-sin, sin], dim=-1)
    return cos_c.reshape(b * h, d).contiguous(), ssin.reshape(b * h, d).contiguous()


def _pair_sum(per_channel: torch.Tensor, pairing: str) -> torch.Tensor:
    """``[..., d]`` → ``[..., d/2]``: the two channels of each pair added."""
    d = per_channel.shape[-1]
    if pairing == "adjacent":
        return per_channel.unflatten(-1, (d // 2, 2)).sum(-1)
    return per_channel.unflatten(-1, (2, d // 2)).sum(-2)


def _row_max_tiles(device: torch.device, tuning, rows: int) -> int:
    """The longest row (token tiles) the row kernels run for ``rows`` (b, h) rows on ``device``: its
    ``tuning.row_max_tiles`` (see :mod:`mirrorla.ops.tuning`), at most the default's where one program per row would
    leave the GPU's SMs idle on long rows:

    - while a CUDA graph records the launches. ``mirrorla tune`` times calls issued one by one, where the row kernels
      save host time per launch (one program per row, one launch each way); replayed graphs have no such cost;
    - with fewer rows than the GPU has SMs. One program per row then runs every tile of its row in turn, where the
      chunked kernels spread the same tiles over the whole GPU: on an H200 (132 SMs) the row forward at B·H = 24,
      4,096 tokens took 223 µs per call back to back (``benchmarks/results/gpu_h200/tune``), about 3.5 µs per tile
      and three times the host cost of such a call (65 µs, ``profile_host.txt``): its 24 programs bound it. Calls
      issued one by one hide that behind the chunked kernels' host time (tune measured them at 223 µs too); a
      training step that keeps the GPU busy does not, and there only GPU time counts. ``mirrorla tune`` therefore
      measures the row kernels with at least as many rows as SMs, where its setting applies.

    Forced settings (:func:`~mirrorla.ops.tuning.forced_tuning`: tools and tests that choose a path) are taken as
    they are, except while a graph records."""
    tiles = tuning.row_max_tiles
    if tiles <= DEFAULT_TUNING.row_max_tiles:
        return tiles
    if graph_capturing(device):
        return DEFAULT_TUNING.row_max_tiles
    if tuning.source != "forced" and device.type == "cuda" and rows < _gpu_properties(device).multi_processor_count:
        return DEFAULT_TUNING.row_max_tiles
    return tiles


def _row_path(nq: int, n: int, bn: int, feature: int, swap: bool, max_tiles: int) -> bool:
    """Whether the row kernels run the op: rows of at most ``max_tiles`` token tiles (``row_max_tiles``, a per-GPU
    setting of :mod:`mirrorla.ops.tuning`, measured by ``mirrorla tune``)."""
    # a rotation on the row kernels shuffles pair partners in registers (swap): the partner rows of dS are never
    # reloaded from memory, which a single program could not do without a barrier
    return max(nq, n) <= max_tiles * bn and (swap or feature != 2)


def _forward_impl(q, k, v, cos, ssin, feature: int, pairing: int, eps: float, mirror=None, moment: bool = False):
    """o and the fp32 state ``[1, B·H, d, dv + 1]``, with per-channel ``cos``/``ssin`` ``[B·H, d]`` of the
    rotation (None without one). ``mirror = (θ, γ, sums, Δα form, ε of Δα)``: the kernels compute the rotation from
    the keys' token sums and fill ``cos``, ``ssin`` (``[B·H, d]``) and ``sums`` (``[B·H, 2, d]``), allocated by
    the caller. ``moment`` (a rotation's forward for training): the state is ``[2, B·H, d, dv + 1]``, its second
    half the moment that gives the backward the k side of d angle (see :func:`_moment_angle`)."""
    moment = moment and feature == 2
    if cos is None:
        cos = ssin = q  # never read: the kernels load them only when they rotate
    theta, gamma, sums, form, map_eps = mirror if mirror is not None else (q, q, q, 0, 0.0)
    b, h, nq, d = q.shape
    n, dv = k.shape[2], v.shape[3]
    bd, bdv, bn, warps = _blocks(d, dv)
    swap = _swap(d, bd, pairing)
    ieee = _ieee_dots(q.dtype)
    blocks = dict(D=d, DV=dv, BD=bd, BDV=bdv, BN=bn, MAP=feature, PAIRING=pairing, IEEE=ieee, UPCAST=INTERPRETING,
                  SWAP=swap, num_warps=warps, num_stages=_STAGES)
    angles = dict(ANGLES=mirror is not None, FORM=form, LOAD_MAP=0 if mirror is not None else feature,
                  MOMENT=moment)
    tuning = kernel_tuning(q.device)
    # the moment doubles the state pass's fp32 accumulators; IEEE fp32 dots also hold fp32 operand tiles in
    # registers: with 64-token tiles ptxas (sm_90, d = 64) spilled 14 KB per thread in the state kernel and 25 KB in
    # the row kernel, so that pass takes the IEEE backward's tiles (ieee_backward_blocks)
    state_blocks = dict(blocks)
    if moment and ieee:
        state_blocks["BN"], state_blocks["num_warps"] = tuning.ieee_backward_blocks
    out = torch.empty(b, h, nq, dv, device=q.device, dtype=v.dtype)
    row = (q, v, feature, pairing, mirror is not None, moment, "forward")
    if (_row_path(nq, n, bn, feature, swap, _row_max_tiles(q.device, tuning, b * h))
            and not _row_kernel_too_large(*row)):
        state = torch.empty(1 + moment, b * h, d, dv + 1, device=q.device, dtype=torch.float32)
        try:
            _row_forward_kernel[(b * h,)](
                q, k, v, cos, ssin, state, out, nq, n, h, float(eps) * n, *q.stride(), *k.stride(), *v.stride(),
                *out.stride(), theta, gamma, sums, float(n), float(map_eps), **state_blocks, **angles)
            return out, state
        except OutOfResources:
            _ROW_TOO_LARGE.add(_row_key(*row))  # the chunked kernels below, one tile at a time, may still fit
    spart = _token_sum_parts(k) if mirror is not None else q
    if moment and not ieee and max(bd, bdv) <= 64:
        # the chunked training state pass of a rotation holds the moment's accumulators too: its (token tile, warps)
        # is a per-GPU setting (fewer registers per thread against more instructions per token, see
        # mirrorla.ops.tuning), the forward's (64, 4) by default
        state_blocks["BN"], state_blocks["num_warps"] = tuning.moment_state_blocks
    chunks, per = _chunks(n, b * h, q.device, state_blocks["BN"])
    part = torch.empty(1 + moment, b * h, chunks, d, dv + 1, device=q.device, dtype=torch.float32)
    _state_kernel[(b * h, chunks)](
        k, v, cos, ssin, part, n, h, per, *k.stride(), *v.stride(),
        spart, theta, gamma, sums, spart.shape[1] if mirror is not None else 1, float(n), float(map_eps),
        **state_blocks, **angles)
    state = part.sum(2) if chunks > 1 else part[:, :, 0]  # state and moment: one reduction
    # chunks of query tiles, as the other passes: a program per tile loaded the whole fp32 state (16.6 KB at
    # d = 64, twice the tile's q and o) for each tile, with nothing of its own to overlap the loads with (H200, 65,536
    # tokens: this pass moved q and o at 1.7 TB/s where the state pass streamed k and v at 4.0 TB/s)
    chunks_o, per_o = _chunks(nq, b * h, q.device, bn)
    _output_kernel[(b * h, chunks_o)](
        q, state, cos, ssin, out, nq, h, float(eps) * n, per_o, *q.stride(), *out.stride(), **blocks)
    return out, state


def _backward_impl(q, k, v, cos, ssin, state, grad_out, feature: int, pairing: int, eps: float, mirror=None):
    """dq, dk, dv and, when rotating with the moment in ``state`` (``[2, B·H, d, dv + 1]``, see
    :func:`_forward_impl`), the rotation angle's gradient per channel ``[B·H, d]`` (fp32; None without a rotation
    or a moment). ``mirror = (θ, γ, sums, Δα form, ε of Δα)``: the σ² path too (to dk), and instead of the angle's
    gradient ``[dθ; dγ]`` per row ``[2, B·H, d/2]``."""
    rotating = feature == 2
    moment = rotating and state.shape[0] == 2
    if mirror is not None and not moment:
        raise RuntimeError("mirrorla: MirrorLA's backward needs its forward's moment (a state [2, B·H, d, dv + 1]), "
                           f"got a state {tuple(state.shape)}: run the forward with moment=True")
    if cos is None:
        cos = ssin = q  # never read without a rotation
    b, h, nq, d = q.shape
    n, dv = k.shape[2], v.shape[3]
    bd, bdv, bn, warps = _blocks(d, dv)
    swap = _swap(d, bd, pairing)
    ieee = _ieee_dots(q.dtype)
    tuning = kernel_tuning(q.device)
    blocks = dict(D=d, DV=dv, BD=bd, BDV=bdv, BN=bn, MAP=feature, PAIRING=pairing, IEEE=ieee, UPCAST=INTERPRETING,
                  SWAP=swap, num_warps=warps, num_stages=_STAGES)
    theta, gamma, sums, form, map_eps = mirror if mirror is not None else (q, q, q, 0, 0.0)
    dq = torch.empty(b, h, nq, d, device=q.device, dtype=q.dtype)
    dk = torch.empty(b, h, n, d, device=q.device, dtype=k.dtype)
    dvv = torch.empty(b, h, n, dv, device=q.device, dtype=v.dtype)
    # the angle's gradient: dθ and dγ per row (MirrorLA, through the σ² path), or per channel (a given angle)
    if mirror is not None:
        dang = torch.empty(2, b * h, d // 2, device=q.device, dtype=torch.float32)
    else:  # without a moment the kernels store no angle gradient: a placeholder pointer
        dang = torch.empty(b * h, d, device=q.device, dtype=torch.float32) if moment else state
    row = (q, v, feature, pairing, mirror is not None, moment, "backward")
    if (_row_path(nq, n, bn, feature, swap, _row_max_tiles(q.device, tuning, b * h))
            and not _row_kernel_too_large(*row)):
        # both passes in one program hold more live tiles: eight warps on Hopper, see _row_backward_warps
        row_blocks = dict(blocks, num_warps=_row_backward_warps(q.device, warps))
        if ieee:  # IEEE fp32 dots: the fp32 token tile of the setting (see below)
            row_blocks["BN"], row_blocks["num_warps"] = tuning.ieee_backward_blocks
        try:
            _row_backward_kernel[(b * h,)](
                q, k, v, cos, ssin, state, grad_out, dq, dk, dvv, dang, nq, n, h, float(eps) * n,
                *q.stride(), *grad_out.stride(), *k.stride(), *v.stride(), sums, gamma, float(n), float(map_eps),
                ANGLES=mirror is not None, FORM=form, MOMENT=moment, **row_blocks)
            return dq, dk, dvv, dang if moment else None
        except OutOfResources:
            _ROW_TOO_LARGE.add(_row_key(*row))  # the chunked kernels below, one tile at a time, may still fit
    if ieee:
        # IEEE fp32 dots run on the FMA units with fp32 operand tiles in registers: with 64-token tiles ptxas (sm_90,
        # d = 64) spills 20–30 KB per thread in each backward kernel, with 16-token tiles and 8 warps nothing
        bn, blocks["num_warps"] = tuning.ieee_backward_blocks
        blocks["BN"] = bn
    elif max(bd, bdv) <= 64:  # (token tile, warps): a per-GPU setting, the forward's (64, 4) by default
        bn, blocks["num_warps"] = tuning.backward_blocks
        blocks["BN"] = bn
    chunks_q, per_q = _chunks(nq, b * h, q.device, bn)
    dstate_part = torch.empty(b * h, chunks_q, d, dv + 1, device=q.device, dtype=torch.float32)
    # without a rotation the kernels store no angle gradient: no buffers, no reductions (a placeholder pointer)
    dang_q = torch.empty(b * h, chunks_q, d, device=q.device, dtype=torch.float32) if rotating else state
    _backward_q_kernel[(b * h, chunks_q)](
        q, state, cos, ssin, grad_out, dq, dstate_part, dang_q, nq, h, float(eps) * n, per_q,
        *q.stride(), *grad_out.stride(), DOT_SUMS=_token_sums_on_dots(q.device, bd, bdv), **blocks)
    dstate = dstate_part.sum(1)
    chunks_k, per_k = _chunks(n, b * h, q.device, bn)
    # the k/v pass adds up the row's d angle itself (the q pass's partials and the forward's moment) and, for
    # MirrorLA, adds the σ² path to dk as it stores it
    _backward_kv_kernel[(b * h, chunks_k)](
        k, v, cos, ssin, dstate, dk, dvv, state, dang_q, dang, sums, gamma, n, h, per_k,
        chunks_q, float(n), float(map_eps), *k.stride(), *v.stride(), MOMENT=moment, ANGLES=mirror is not None,
        FORM=form, X_FROM_Y=mirror is not None and pairing == 0 and _x_from_y(q.dtype, bd, bdv), **blocks)
    return dq, dk, dvv, dang if moment else None


# ------------------------------------------------------------------------ GPUs too small for a configuration


_ROW_TOO_LARGE: set[tuple] = set()
"""``(device, dtype, IEEE dots, d, dv, map, pairing, MirrorLA, moment, direction)`` of the calls whose row kernel
was too large for their GPU: they take the chunked kernels (no warning: the same values at the chunked kernels'
speed), and only if those do not fit either the reference (:data:`_TOO_LARGE`). A row kernel holds a whole pass's
state and tiles together: at d = 128 the bf16/fp16 row forward needs 128 KB of shared memory, more than the 99 KB of
compute capability 8.6/8.9, where the chunked forward kernels need at most 80 KB (``compile_check.py --arch 89``)."""


def _row_key(q, v, feature: int, pairing: int, mirror: bool, moment: bool, direction: str) -> tuple:
    return (str(q.device), q.dtype, _ieee_dots(q.dtype), q.shape[3], v.shape[3], feature, pairing, mirror, moment,
            direction)


def _row_kernel_too_large(q, v, feature: int, pairing: int, mirror: bool, moment: bool, direction: str) -> bool:
    """Whether an earlier call found this configuration's row kernel too large for the GPU (one comparison while
    none has been)."""
    return bool(_ROW_TOO_LARGE) and _row_key(q, v, feature, pairing, mirror, moment, direction) in _ROW_TOO_LARGE


_TOO_LARGE: dict[tuple, str] = {}
"""``(configuration, "forward" or "backward")`` → Triton's message, for the kernel configurations this process
found too large for their GPU; their calls run the torch reference instead (one warning per configuration).

Triton raises ``OutOfResources`` at a kernel's first launch on a device, before anything runs, when the compiled
kernel needs more shared memory or threads per block than the GPU has. The backward kernels of heads wider than 64
hold two 128 × 128 fp32 tiles and need up to 160 KB of shared memory per block: GPUs of compute capability 8.6
and 8.9 (RTX 30xx and 40xx, A10, L4, L40S) give 99 KB, 7.5 (T4) 64 KB. ``benchmarks/compile_check.py`` reports
each configuration's needs for an architecture."""

_PAIR_NAMES = {code: name for name, code in _PAIRINGS.items()}
_FEATURE_NAMES = {code: name for name, code in FEATURES.items()}
_FORM_NAMES = {code: name for name, code in DELTA_FORM_CODES.items()}


def _configuration(q, k, v, feature: int, pairing: int, mirror: bool, moment: bool) -> tuple:
    """What selects the compiled kernels of a call: device, dtype, IEEE or TF32 dots, widths, map, pairing, op,
    moment (training or inference kernels of a rotation) and kernel path."""
    nq, d = q.shape[2], q.shape[3]
    n, dv = k.shape[2], v.shape[3]
    bd, _, bn, _ = _blocks(d, dv)
    return (str(q.device), q.dtype, _ieee_dots(q.dtype), d, dv, feature, pairing, mirror, moment,
            _row_path(nq, n, bn, feature, _swap(d, bd, pairing),
                      _row_max_tiles(q.device, kernel_tuning(q.device), q.shape[0] * q.shape[1])))


_MAX_WIDTH = 128
"""The widest head (d and dv) the kernels take. Wider heads would hold ``[256, 256]`` fp32 state tiles: more
shared memory than any GPU gives a block (ptxas for sm_90 at d = 256, bf16: 524 KB forward, 590 KB backward), so
they run the torch reference without compiling kernels that cannot launch."""

_WARNED_WIDTHS: set[tuple[int, int]] = set()


def _runs_kernels(q, k, v, feature: int, pairing: int, mirror: bool, moment: bool, direction: str) -> bool:
    """False for heads wider than :data:`_MAX_WIDTH`, and where an earlier call found this configuration's kernels
    too large for the GPU: always in the forward's direction, and in the backward's also where the forward fell
    back (its saved state is a placeholder then). Costs two comparisons while no configuration has been too
    large."""
    if q.shape[3] > _MAX_WIDTH or v.shape[3] > _MAX_WIDTH:
        if (q.shape[3], v.shape[3]) not in _WARNED_WIDTHS:
            _WARNED_WIDTHS.add((q.shape[3], v.shape[3]))
            warnings.warn(f"mirrorla: the Triton kernels take heads up to {_MAX_WIDTH} wide, got d = {q.shape[3]}, "
                          f"dv = {v.shape[3]}; these calls run the PyTorch reference instead: the same values, "
                          "slower and with more memory", RuntimeWarning, stacklevel=3)
        return False
    if not _TOO_LARGE:
        return True
    configuration = _configuration(q, k, v, feature, pairing, mirror, moment)
    return ((configuration, "forward") not in _TOO_LARGE
            and (direction == "forward" or (configuration, "backward") not in _TOO_LARGE))


def _too_large(q, k, v, feature: int, pairing: int, mirror: bool, moment: bool, direction: str,
               error: OutOfResources) -> None:
    configuration = _configuration(q, k, v, feature, pairing, mirror, moment)
    if (configuration, direction) in _TOO_LARGE:
        return
    _TOO_LARGE[(configuration, direction)] = str(error)
    op = "MirrorLA" if mirror else next(name for name, code in FEATURES.items() if code == feature)
    warnings.warn(
        f"mirrorla: {q.device} cannot run the Triton {direction} kernels of the {op} linear attention for "
        f"{str(q.dtype).removeprefix('torch.')} heads of width {q.shape[3]} ({error}); these calls run the "
        "PyTorch reference instead: the same values, slower and with more memory", RuntimeWarning, stacklevel=2)


def _fused_reference(q, k, v, angle, feature: int, pairing: int, eps: float) -> torch.Tensor:
    """The fused op's value through the torch core, which maps q and k itself (by chunks of tokens for
    half-precision inputs, outside ``torch.func``)."""
    return _linear_attention_torch(q, k, v, eps=eps, feature=_FEATURE_NAMES[feature], angle=angle,
                                   pairing=_PAIR_NAMES[pairing])


def _mirror_reference(q, k, v, theta, gamma, pairing: int, form: int, map_eps: float, eps: float) -> torch.Tensor:
    """MirrorLA's op through the torch references: the angles from the keys' token sums, then the torch core with
    the rotation and ReLU."""
    angle = angles_from_sums(token_sums_reference(k), k.shape[2], theta, gamma, eps=map_eps,
                             delta_form=_FORM_NAMES[form], pairing=_PAIR_NAMES[pairing])
    return _linear_attention_torch(q, k, v, eps=eps, feature="rotate_relu", angle=angle,
                                   pairing=_PAIR_NAMES[pairing])


# --------------------------------------------------------------------------------------- torch.library ops


@on_tensor_device
def _fused_forward_impl(q, k, v, angle, feature: int, pairing: int, eps: float, moment: bool = True):
    """o and the state ``[1 or 2, B·H, d, dv + 1]``; ``moment``: a rotation's state carries the moment its
    backward needs for the angle's gradient (see :func:`_forward_impl`)."""
    b, h, _, d = q.shape
    moment = moment and feature == 2 and angle is not None
    if _runs_kernels(q, k, v, feature, pairing, False, moment, "forward"):
        cos, ssin = _rotation(angle if feature == 2 else None, b, h, d, _PAIR_NAMES[pairing], q.device)
        try:
            return _forward_impl(q, k, v, cos, ssin, feature, pairing, eps, moment=moment)
        except OutOfResources as error:
            _too_large(q, k, v, feature, pairing, False, moment, "forward", error)
    out = _fused_reference(q, k, v, angle, feature, pairing, eps)
    # the state is a placeholder: the backward of a configuration whose forward fell back recomputes
    return out, q.new_zeros(1 + moment, b * h, d, v.shape[3] + 1, dtype=torch.float32)


def _angle_grad(angle, feature: int, state: torch.Tensor) -> bool:
    """Whether the fused op's backward gives the angle a gradient: a rotation whose forward stored the moment."""
    return feature == 2 and angle is not None and state.shape[0] == 2


@on_tensor_device
def _fused_backward_impl(q, k, v, angle, state, grad_out, feature: int, pairing: int, eps: float):
    b, h, _, d = q.shape
    rotating = _angle_grad(angle, feature, state)
    if _runs_kernels(q, k, v, feature, pairing, False, rotating, "backward"):
        pair_name = _PAIR_NAMES[pairing]
        cos, ssin = _rotation(angle if feature == 2 else None, b, h, d, pair_name, q.device)
        try:
            dq, dk, dv, dang = _backward_impl(q, k, v, cos, ssin, state, grad_out, feature, pairing, eps)
        except OutOfResources as error:
            _too_large(q, k, v, feature, pairing, False, rotating, "backward", error)
        else:
            if not rotating:
                return dq, dk, dv, None
            dangle = _pair_sum(dang.view(b, h, d), pair_name)
            if angle.shape[0] == 1 and b > 1:
                dangle = dangle.sum(0, keepdim=True)
            return dq, dk, dv, dangle.to(angle.dtype)
    # an angle that takes no gradient still rotates
    return _linear_attention_torch_grads(q, k, v, grad_out, eps=eps, feature=_FEATURE_NAMES[feature],
                                         angle=angle if feature == 2 else None, pairing=_PAIR_NAMES[pairing],
                                         angle_grad=rotating)


# Each op exists twice over the same implementation: a torch.library custom op (with a fake kernel and autograd)
# that torch.compile and CUDA graphs see as one node, and a torch.autograd.Function that eager mode calls, because
# a custom op's Python dispatch costs several times a Function's per call (measured 39 against 15 µs forward and
# 71 against 13 µs with autograd on this project's CPU): at 224² a DeiT-T step is bound by such host time.


@torch.library.custom_op("mirrorla::fused_linear_attention", mutates_args=())
def _fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angle: torch.Tensor | None, feature: int,
                   pairing: int, eps: float, moment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_forward_impl(q, k, v, angle, feature, pairing, eps, moment)


@_fused_forward.register_fake
def _(q, k, v, angle, feature, pairing, eps, moment=True):
    b, h, nq, d = q.shape
    dv = v.shape[3]
    halves = 2 if moment and feature == 2 and angle is not None else 1
    return (q.new_empty(b, h, nq, dv, dtype=v.dtype), q.new_empty(halves, b * h, d, dv + 1, dtype=torch.float32))


@torch.library.custom_op("mirrorla::fused_linear_attention_backward", mutates_args=())
def _fused_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angle: torch.Tensor | None,
                    state: torch.Tensor, grad_out: torch.Tensor, feature: int, pairing: int,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dangle = _fused_backward_impl(q, k, v, angle, state, grad_out, feature, pairing, eps)
    # custom ops return tensors: an empty one stands for "no angle"
    return dq, dk, dv, (q.new_zeros(0, dtype=torch.float32) if dangle is None else dangle)


@_fused_backward.register_fake
def _(q, k, v, angle, state, grad_out, feature, pairing, eps):
    dangle = angle.new_empty(angle.shape) if _angle_grad(angle, feature, state) else q.new_empty(0,
                                                                                               dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dangle


def _setup_context(ctx, inputs, output):
    q, k, v, angle, feature, pairing, eps, _moment = inputs
    ctx.save_for_backward(q, k, v, angle, output[1])
    ctx.feature, ctx.pairing, ctx.eps = feature, pairing, eps
    ctx.set_materialize_grads(False)  # the state's gradient is never used: no zero tensor for it


def _backward(ctx, grad_out, _grad_state):
    q, k, v, angle, state = ctx.saved_tensors
    dq, dk, dv, dangle = _fused_backward(q, k, v, angle, state, grad_out, ctx.feature, ctx.pairing, ctx.eps)
    return dq, dk, dv, (dangle if _angle_grad(angle, ctx.feature, state) else None), None, None, None, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


class _FusedLinearAttention(torch.autograd.Function):
    """The eager twin of ``mirrorla::fused_linear_attention`` (same implementation, lighter dispatch)."""

    @staticmethod
    def forward(ctx, q, k, v, angle, feature, pairing, eps, moment):
        out, state = _fused_forward_impl(q, k, v, angle, feature, pairing, eps, moment)
        ctx.save_for_backward(q, k, v, angle, state)
        ctx.feature, ctx.pairing, ctx.eps = feature, pairing, eps
        return out

    @staticmethod
    @once_differentiable  # the kernels' gradients are not differentiable: a second derivative is an error, not zero
    def backward(ctx, grad_out):
        q, k, v, angle, state = ctx.saved_tensors
        dq, dk, dv, dangle = _fused_backward_impl(q, k, v, angle, state, grad_out, ctx.feature, ctx.pairing,
                                                  ctx.eps)
        return dq, dk, dv, dangle, None, None, None, None


@torch.library.custom_op("mirrorla::token_sums", mutates_args=())
def _token_sums(x: torch.Tensor) -> torch.Tensor:
    b, h, _, d = x.shape
    return _token_sums_impl(x).view(b, h, 2, d)


@_token_sums.register_fake
def _(x):
    b, h, _, d = x.shape
    return x.new_empty(b, h, 2, d, dtype=torch.float32)


def _token_sums_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _token_sums_grad(x, grad):
    # d/dx [Σx, Σx²] = g₁ + 2 g₂ x, in x's dtype (no fp32 copy of x)
    g1 = grad[:, :, 0:1].to(x.dtype)
    g2 = grad[:, :, 1:2].mul(2.0).to(x.dtype)
    return torch.addcmul(g1, x, g2)


def _token_sums_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _token_sums_grad(x, grad)


_token_sums.register_autograd(_token_sums_backward, setup_context=_token_sums_setup)


class _TokenSums(torch.autograd.Function):
    """The eager twin of ``mirrorla::token_sums``."""

    @staticmethod
    def forward(ctx, x):
        b, h, _, d = x.shape
        ctx.save_for_backward(x)
        return _token_sums_impl(x).view(b, h, 2, d)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _token_sums_grad(x, grad)


# ------------------------------------------------------------------------ MirrorLA: σ² → Θ → rotation, fused


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _delta(var, eps_map, FORM: tl.constexpr):
    """Δα(σ²)/γ and its derivative in σ², for the forms of ``mirrorla.ops.DELTA_FORMS`` (codes:
    ``mirrorla.backend.DELTA_FORM_CODES``)."""
    x = var + eps_map
    if FORM == 0:  # tanh(log(σ² + ε))
        t = _tanh(tl.log(x))
        return t, (1.0 - t * t) / x
    elif FORM == 1:  # log(σ² + ε)
        return tl.log(x), 1.0 / x
    else:  # 1 / sqrt(σ² + ε)
        r = 1.0 / tl.sqrt(x)
        return r, -0.5 * r / x


@triton.jit
def _pair_stats(s1, s1p, s2, s2p, sign, n_tokens):
    """Per channel, from the token sums Σx, Σx² of the folded keys on the channel and on its pair partner: the
    pair's σ² (clamped), its unclamped value and the pair's mean gap ``(m_second − m_first)`` (H(0) negated the
    first channel, so the pair's mean is half that gap)."""
    diff = sign * (s1 - s1p) / n_tokens
    raw = 0.5 * (s2 + s2p) / n_tokens - 0.25 * diff * diff
    return tl.maximum(raw, 0.0), raw, diff


@triton.jit
def _pair_index(offs_d, D: tl.constexpr, PAIRING: tl.constexpr):
    if PAIRING == 0:
        return offs_d // 2
    else:
        return tl.where(offs_d < D // 2, offs_d, offs_d - D // 2)


@triton.jit
def _swap_vector(x, BD: tl.constexpr, PAIRING: tl.constexpr):
    """``x [BD]`` with every channel replaced by its pair partner's value (see :func:`_swap_pairs`)."""
    return tl.reshape(_swap_pairs(tl.reshape(x, [1, BD]), 1, BD, PAIRING), [BD])


@triton.jit
def _angles_from_sums(s1, s1p, s2, s2p, THETA, GAMMA, h, sign, offs_d, dmask, n_tokens, eps_map,
                      D: tl.constexpr, PAIRING: tl.constexpr, FORM: tl.constexpr):
    """The row's per-channel cos(2Θ) and signed sin(2Θ), Θ = θ + γ·f(σ²), from the keys' token sums on each
    channel (``s1``, ``s2``) and on its pair partner (``s1p``, ``s2p``)."""
    var, _, _ = _pair_stats(s1, s1p, s2, s2p, sign, n_tokens)
    pair = _pair_index(offs_d, D, PAIRING)
    theta = tl.load(THETA + h * (D // 2) + pair, mask=dmask, other=0.0)
    gamma = tl.load(GAMMA + h * (D // 2) + pair, mask=dmask, other=0.0)
    f, _ = _delta(var, eps_map, FORM)
    angle = 2.0 * (theta + gamma * f)
    return tl.cos(angle), sign * tl.sin(angle)


@triton.jit
def _mirror_angles(SPART, THETA, GAMMA, bh, h, S_CHUNKS, n_tokens, eps_map, offs_d, partner, sign, dmask,
                   D: tl.constexpr, BD: tl.constexpr, PAIRING: tl.constexpr, FORM: tl.constexpr):
    """cos, signed sin and the token sums (Σx, Σx² per channel) of the row, from the chunk partials
    ``SPART [B·H, S_CHUNKS, 2, D]`` added in a fixed order (deterministic)."""
    s1 = tl.zeros([BD], dtype=tl.float32)
    s1p = tl.zeros([BD], dtype=tl.float32)
    s2 = tl.zeros([BD], dtype=tl.float32)
    s2p = tl.zeros([BD], dtype=tl.float32)
    for c in range(0, S_CHUNKS):
        row = SPART + (bh * S_CHUNKS + c) * 2 * D
        s1 += tl.load(row + offs_d, mask=dmask, other=0.0)
        s1p += tl.load(row + partner, mask=dmask, other=0.0)
        s2 += tl.load(row + D + offs_d, mask=dmask, other=0.0)
        s2p += tl.load(row + D + partner, mask=dmask, other=0.0)
    cos, ssin = _angles_from_sums(s1, s1p, s2, s2p, THETA, GAMMA, h, sign, offs_d, dmask, n_tokens, eps_map, D,
                                  PAIRING, FORM)
    return cos, ssin, s1, s2


@triton.jit
def _store_rotation(COS, SSIN, SUMS, bh, cos, ssin, s1, s2, offs_d, dmask, D: tl.constexpr):
    """The row's cos, signed sin and token sums, for the output pass and the backward."""
    tl.store(COS + bh * D + offs_d, cos, mask=dmask)
    tl.store(SSIN + bh * D + offs_d, ssin, mask=dmask)
    tl.store(SUMS + bh * 2 * D + offs_d, s1, mask=dmask)
    tl.store(SUMS + bh * 2 * D + D + offs_d, s2, mask=dmask)


@triton.jit
def _sigma_path(dang, SUMS, GAMMA, DTG, bh, h, BH, sign, partner, offs_d, dmask, n_tokens, eps_map, store,
                D: tl.constexpr, PAIRING: tl.constexpr, FORM: tl.constexpr):
    """From the row's d angle per channel, both channels of a pair added (``dang [BD]``): where ``store``, dθ and
    dγ of the row into ``DTG [2, BH, D/2]``; returns the gradients of the keys' token sums per channel (dS₁, dS₂)
    through σ², for dk += dS₁ + 2·dS₂·k."""
    row = SUMS + bh * 2 * D
    var, raw, diff = _pair_stats(tl.load(row + offs_d, mask=dmask, other=0.0),
                                 tl.load(row + partner, mask=dmask, other=0.0),
                                 tl.load(row + D + offs_d, mask=dmask, other=0.0),
                                 tl.load(row + D + partner, mask=dmask, other=0.0), sign, n_tokens)
    pair = _pair_index(offs_d, D, PAIRING)
    gamma = tl.load(GAMMA + h * (D // 2) + pair, mask=dmask, other=0.0)
    f, df = _delta(var, eps_map, FORM)
    dtheta = 2.0 * dang
    if store:  # one value per pair: the first channel of each pair stores it
        first = dmask & (sign < 0)
        tl.store(DTG + bh * (D // 2) + pair, dtheta, mask=first)
        tl.store(DTG + (BH + bh) * (D // 2) + pair, dtheta * f, mask=first)
    dvar = tl.where(raw > 0, dtheta * gamma * df, 0.0)
    ds2 = 0.5 * dvar / n_tokens  # ∂σ²/∂S₂ of either channel
    ds1 = -0.5 * sign * diff * dvar / n_tokens  # ∂σ²/∂S₁: opposite signs on the pair's two channels
    return ds1, ds2


def _token_sums_impl(x: torch.Tensor) -> torch.Tensor:
    part = _token_sum_parts(x)
    return part.sum(1) if part.shape[1] > 1 else part[:, 0]


@on_tensor_device
def _token_sum_parts(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ``[Σx, Σx²]`` of each chunk of tokens, ``[B·H, chunks, 2, d]`` fp32 (one launch)."""
    b, h, n, d = x.shape
    bd = max(16, next_power_of_2(d))
    chunks, per = _chunks(n, b * h, x.device)
    part = torch.empty(b * h, chunks, 2, d, device=x.device, dtype=torch.float32)
    _token_sums_kernel[(b * h, chunks)](x, part, n, h, per, *x.stride(), D=d, BD=bd, BN=_BLOCK_N)
    return part


@on_tensor_device
def _mirror_forward_impl(q, k, v, theta, gamma, pairing: int, form: int, map_eps: float, eps: float,
                         moment: bool = True):
    """Short rows: one launch (the row kernel). Longer ones: the keys' token-sum partials, then the state pass,
    whose programs derive the rotation from them (and store cos, signed sin and the token sums for the output and
    backward), then the output pass. ``moment``: the state also carries the moment the backward needs (training);
    without it the state is ``[1, B·H, d, dv + 1]`` and there is no backward."""
    b, h, _, d = k.shape
    sums = torch.empty(b * h, 2, d, device=k.device, dtype=torch.float32)
    cos = torch.empty(b * h, d, device=k.device, dtype=torch.float32)
    ssin = torch.empty_like(cos)
    if _runs_kernels(q, k, v, 2, pairing, True, moment, "forward"):
        try:
            out, state = _forward_impl(q, k, v, cos, ssin, 2, pairing, eps,
                                       mirror=(theta, gamma, sums, form, map_eps), moment=moment)
            return out, state, sums, cos, ssin
        except OutOfResources as error:
            _too_large(q, k, v, 2, pairing, True, moment, "forward", error)
    out = _mirror_reference(q, k, v, theta, gamma, pairing, form, map_eps, eps)
    # placeholders: the backward of a configuration whose forward fell back recomputes
    state = q.new_zeros(1 + moment, b * h, d, v.shape[3] + 1, dtype=torch.float32)
    return out, state, sums.zero_(), cos.zero_(), ssin.zero_()


@on_tensor_device
def _mirror_backward_impl(q, k, v, theta, gamma, state, sums, cos, ssin, grad_out, pairing: int, form: int,
                          map_eps: float, eps: float):
    b, h, _, d = k.shape
    if _runs_kernels(q, k, v, 2, pairing, True, True, "backward"):
        try:
            dq, dk, dv, dtg = _backward_impl(q, k, v, cos, ssin, state, grad_out, 2, pairing, eps,
                                             mirror=(theta, gamma, sums, form, map_eps))
            return dq, dk, dv, dtg.view(2, b, h, d // 2).sum(1)  # [dθ; dγ] over the batch: one launch for both
        except OutOfResources as error:
            _too_large(q, k, v, 2, pairing, True, True, "backward", error)
    # the torch core's gradients by chunks of tokens, then the angle's through the angles and the keys' token sums,
    # in closed form (autograd does not record here, and torch.func fails under a user's dispatch mode)
    options = dict(eps=map_eps, delta_form=_FORM_NAMES[form], pairing=_PAIR_NAMES[pairing])
    sums = token_sums_reference(k)
    angle = angles_from_sums(sums, k.shape[2], theta, gamma, **options)
    dq, dk, dv, dangle = _linear_attention_torch_grads(q, k, v, grad_out, eps=eps, feature="rotate_relu",
                                                       angle=angle, pairing=options["pairing"])
    dsums, dtheta, dgamma = angles_from_sums_backward(sums, k.shape[2], theta, gamma, dangle, **options)
    dk.add_(token_sums_backward(k, dsums))
    return dq, dk, dv, torch.stack([dtheta, dgamma]).float()


@torch.library.custom_op("mirrorla::mirror_linear_attention", mutates_args=())
def _mirror_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, gamma: torch.Tensor,
                    pairing: int, form: int, map_eps: float, eps: float, moment: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, state, token sums, cos, signed sin)``: the last four are small fp32 tensors the backward reuses."""
    return _mirror_forward_impl(q, k, v, theta, gamma, pairing, form, map_eps, eps, moment)


@_mirror_forward.register_fake
def _(q, k, v, theta, gamma, pairing, form, map_eps, eps, moment=True):
    b, h, nq, d = q.shape
    dv = v.shape[3]
    f32 = torch.float32
    return (q.new_empty(b, h, nq, dv, dtype=v.dtype), q.new_empty(1 + moment, b * h, d, dv + 1, dtype=f32),
            q.new_empty(b * h, 2, d, dtype=f32), q.new_empty(b * h, d, dtype=f32), q.new_empty(b * h, d, dtype=f32))


@torch.library.custom_op("mirrorla::mirror_linear_attention_backward", mutates_args=())
def _mirror_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, gamma: torch.Tensor,
                     state: torch.Tensor, sums: torch.Tensor, cos: torch.Tensor, ssin: torch.Tensor,
                     grad_out: torch.Tensor, pairing: int, form: int, map_eps: float,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and ``[dθ; dγ]`` ``[2, H, d/2]`` (fp32): one tensor, as a custom op's outputs must not alias."""
    return _mirror_backward_impl(q, k, v, theta, gamma, state, sums, cos, ssin, grad_out, pairing, form, map_eps,
                                 eps)


@_mirror_backward.register_fake
def _(q, k, v, theta, gamma, state, sums, cos, ssin, grad_out, pairing, form, map_eps, eps):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            theta.new_empty(2, *theta.shape, dtype=torch.float32))


def _mirror_setup_context(ctx, inputs, output):
    q, k, v, theta, gamma, pairing, form, map_eps, eps, _moment = inputs
    _, state, sums, cos, ssin = output
    ctx.save_for_backward(q, k, v, theta, gamma, state, sums, cos, ssin)
    ctx.args = (pairing, form, map_eps, eps)
    ctx.set_materialize_grads(False)  # the four saved outputs get no gradient: no zero tensors for them


def _mirror_backward_autograd(ctx, grad_out, *_grad_saved):
    dq, dk, dv, dtg = _mirror_backward(*ctx.saved_tensors, grad_out, *ctx.args)
    return dq, dk, dv, dtg[0], dtg[1], None, None, None, None, None


_mirror_forward.register_autograd(_mirror_backward_autograd, setup_context=_mirror_setup_context)


class _MirrorLinearAttention(torch.autograd.Function):
    """The eager twin of ``mirrorla::mirror_linear_attention``."""

    @staticmethod
    def forward(ctx, q, k, v, theta, gamma, pairing, form, map_eps, eps, moment):
        out, state, sums, cos, ssin = _mirror_forward_impl(q, k, v, theta, gamma, pairing, form, map_eps, eps,
                                                           moment)
        ctx.save_for_backward(q, k, v, theta, gamma, state, sums, cos, ssin)
        ctx.args = (pairing, form, map_eps, eps)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        dq, dk, dv, dtg = _mirror_backward_impl(*ctx.saved_tensors, grad_out, *ctx.args)
        return dq, dk, dv, dtg[0], dtg[1], None, None, None, None, None


def _use_custom_ops() -> bool:
    """The custom ops where a compiler traces (torch.compile, export): one opaque node each. Eager calls take the
    autograd Functions, which run the same implementation with less dispatch."""
    return torch.compiler.is_compiling()


# ------------------------------------------------------------------------------------------------ public api


def fused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angle: torch.Tensor | None = None, *,
                           feature: str = "identity", pairing: str = "adjacent", eps: float = 1e-6) -> torch.Tensor:
    """Linear attention with φ fused in (Triton). q ``[B, H, Nq, d]``, k ``[B, H, N, d]``, v ``[B, H, N, dv]``,
    ``angle`` ``[B or 1, H, d/2]`` (``rotate_relu`` only) → ``[B, H, Nq, dv]`` in v's dtype. Differentiable in
    q, k, v and angle. Inputs are checked by the caller (:func:`mirrorla.ops.mapped_linear_attention`)."""
    if q.dtype == torch.float64:
        raise ValueError("the Triton kernels take fp32, bf16 or fp16 inputs, got float64 (use the torch backend)")
    angle = angle if feature == "rotate_relu" else None
    # the moment (for the angle's gradient) only where a backward will need it
    moment = angle is not None and angle.requires_grad and torch.is_grad_enabled()
    args = (q, k, v, angle, FEATURES[feature], _PAIRINGS[pairing], float(eps), moment)
    return _fused_forward(*args)[0] if _use_custom_ops() else _FusedLinearAttention.apply(*args)


def token_sums_triton(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ``[Σx, Σx²]`` over tokens, ``[B, H, N, d] → [B, H, 2, d]`` fp32 (Triton, differentiable)."""
    return _token_sums(x) if _use_custom_ops() else _TokenSums.apply(x)


def mirror_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
                            gamma: torch.Tensor, *, pairing: str = "adjacent", delta_form: str = "tanh_log",
                            map_eps: float = 1e-6, eps: float = 1e-6) -> torch.Tensor:
    """MirrorLA's folded per-sample step and linear attention in one op (Triton): σ² of the folded keys
    ``k [B, H, N, d]``, ``Θ = θ + Δα(σ²)`` (θ, γ ``[H, d/2]``), ``φ = ReLU(R(2Θ)·)`` of q and k inside the
    attention kernels. Differentiable in q, k (also through σ²), v, θ and γ. One kernel launch each way for
    rows of up to 512 tokens (d ≤ 64); for longer rows three forward and two backward, as many passes over
    memory backward as ReLU's (each way also one reduction of the chunks' partial states)."""
    if q.dtype == torch.float64:
        raise ValueError("the Triton kernels take fp32, bf16 or fp16 inputs, got float64 (use the torch backend)")
    map_eps, eps = check_eps("map_eps", map_eps, positive=True), check_eps("eps", eps)
    # fp32 contiguous parameters (the usual case) pass as they are: two dispatcher calls each saved per forward
    theta32 = theta if theta.dtype == torch.float32 and theta.is_contiguous() else theta.float().contiguous()
    gamma32 = gamma if gamma.dtype == torch.float32 and gamma.is_contiguous() else gamma.float().contiguous()
    # the moment only where a backward will need it
    moment = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                          or theta32.requires_grad or gamma32.requires_grad)
    args = (q, k, v, theta32, gamma32, _PAIRINGS[pairing], DELTA_FORM_CODES[delta_form], float(map_eps), float(eps),
            moment)
    return _mirror_forward(*args)[0] if _use_custom_ops() else _MirrorLinearAttention.apply(*args)
