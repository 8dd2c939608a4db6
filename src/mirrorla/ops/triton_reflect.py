"""Triton kernels for :func:`mirrorla.ops.reflect_projection_rows`: the fold of ``T = diag(s)·(I − 2uuᵀ/‖u‖²)``
into projection rows, forward and backward.

Every training forward of a MirrorLA layer folds its static reflections into the qkv weights and every backward
maps the weights' gradient back through the fold. The arithmetic is negligible (O(C·C_in)), but the torch
reference dispatches about a dozen small operators forward and twenty backward, and a DeiT-T training step on a GPU
is bound by such host time (measured on an H100: 0.39 ms forward, 1.7 ms forward+backward per layer). Here the
forward is one launch and the backward one (C_in ≤ 256) or two:

- forward: each program owns a block of input columns (program 0 also the bias), computes ``a = unitᵀ w`` per
  column and row group in a first pass over the C rows and writes ``s ⊙ (w − unit·a)`` in a second; the rows after
  ``groups·C`` are copied;
- backward: the same per column for the gradient (``Hᵀ = H``), plus each program's share of the gradient of the
  unit vector, ``−Σ (g·a + w·r)`` over its columns; the shares are added and mapped to ``du`` by a one-program
  kernel, or for narrow projections by the backward's single program itself after the column blocks.

``unit = √2·u/‖u‖`` is recomputed by every program (C loads). Arithmetic in fp32; the folded weights in the
inputs' dtype or the caller's ``out_dtype`` (autocast's, for a projection that would cast them anyway), the gradients
in the inputs' dtypes.
Fixed block sizes, so the kernels also run in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._launch import INTERPRETING, cdiv, graph_capturing, next_power_of_2, on_tensor_device, sizes_jit

__all__ = ["reflect_projection_rows_triton"]

_BLOCK_C = 64  # rows (output channels) per step of a program's loops over C
_BLOCK_J = 32  # input columns per program
_ONE_PROGRAM_MAX_BLOCKS = 8
"""Projections with at most this many column blocks (C_in ≤ 256, DeiT-T's 192) run the backward in one program and
add the shares of du in the same program: one launch instead of two, which saves tens of microseconds of host time
per launch where launches are issued one by one. On one SM the work is not small: with 32-column blocks taken one
after another it took 88 µs per call at DeiT-T's width on an H200 (``benchmarks/results/gpu_h200/profile_host.txt``),
some 105 dependent steps of a [64, 32] tile. So that program takes every column at once, in one block of
``next_power_of_2(C_in)`` columns with a warp per 32 of them, 32 rows a step: 60 steps of [32, 256] tiles at
DeiT-T's width, the bias's on a 16-column tile (eight warps; ptxas for sm_80, sm_89 and sm_90 with Triton 3.6 and
3.8: 166–212 registers, no spills; 64 rows a step spilled fp32 on sm_80 and with Triton 3.6). Wider projections, and
every projection while a CUDA graph records (replays cost no host time), spread 32-column blocks over programs and
add the shares in a second launch."""


_INTERPRETING = tl.constexpr(INTERPRETING)  # a global the kernels read: Triton takes only constexpr ones


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """fp32 ``x`` in ``dtype``, rounded to nearest even as a GPU's ``cvt.rn`` and torch's casts round. Triton's
    interpreter rounds fp32 → bf16 toward zero (NumPy has no bf16), so there the rounding is done on the bits: the
    folded weights then equal autocast's cast of the fp32 fold in the interpreter too (compiled code: one ``cvt``)."""
    if _INTERPRETING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _unit_scale(U, C, BC: tl.constexpr):
    """√2/‖u‖, so that unit = u·scale has ‖unit‖² = 2."""
    acc = tl.zeros([BC], dtype=tl.float32)
    for c0 in range(0, C, BC):
        offs = c0 + tl.arange(0, BC)
        u = tl.load(U + offs, mask=offs < C, other=0.0).to(tl.float32)
        acc += u * u
    return 1.4142135623730951 / tl.sqrt(tl.sum(acc, axis=0))


@triton.jit
def _unit_and_sign(U, S, offs_c, cmask, scale, NS, HAS_SIGNS: tl.constexpr):
    unit = tl.load(U + offs_c, mask=cmask, other=0.0).to(tl.float32) * scale
    if HAS_SIGNS:
        sign = tl.load(S + offs_c % NS, mask=cmask, other=1.0).to(tl.float32)
    else:
        sign = tl.full(offs_c.shape, 1.0, tl.float32)
    return unit, sign


@triton.jit
def _load_tile(X, rows, offs_j, s_r, s_c, mask):
    """``X[rows, offs_j]`` as fp32 (0 where masked)."""
    return tl.load(X + rows[:, None] * s_r + offs_j[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _copy_rows(SRC, DST, offs_j, jmask, s_r, s_c, d_r, d_c, first, R, BC: tl.constexpr):
    """``DST[first:R, offs_j] = SRC[first:R, offs_j]``: the rows after the folded groups pass unchanged."""
    for r0 in range(first, R, BC):
        rows = r0 + tl.arange(0, BC)
        mask = (rows < R)[:, None] & jmask[None, :]
        tl.store(DST + rows[:, None] * d_r + offs_j[None, :] * d_c,
                 _rounded(_load_tile(SRC, rows, offs_j, s_r, s_c, mask), DST.dtype.element_ty), mask=mask)


@triton.jit
def _row_block(X, U, S, g, c0, offs_j, jmask, s_r, s_c, C, NS, scale, HAS_SIGNS: tl.constexpr, BC: tl.constexpr):
    """Rows ``c0 .. c0 + BC`` of group g: their channel offsets and mask, unit vector and signs, row indices, tile
    mask, and the tile ``X[rows, offs_j]`` (fp32)."""
    offs_c = c0 + tl.arange(0, BC)
    cmask = offs_c < C
    unit, sign = _unit_and_sign(U, S, offs_c, cmask, scale, NS, HAS_SIGNS)
    rows = g * C + offs_c
    mask = cmask[:, None] & jmask[None, :]
    return offs_c, cmask, unit, sign, rows, mask, _load_tile(X, rows, offs_j, s_r, s_c, mask)


@triton.jit
def _fold_columns(SRC, DST, U, S, offs_j, jmask, s_r, s_c, d_r, d_c, R, C, GROUPS, NS, scale,
                  HAS_SIGNS: tl.constexpr, BC: tl.constexpr):
    """DST[:, j] = T·SRC[:, j] per group of C rows for the columns ``offs_j``; later rows copied."""
    for g in range(0, GROUPS):
        a = tl.zeros(offs_j.shape, dtype=tl.float32)
        for c0 in range(0, C, BC):
            _, _, unit, _, _, _, w = _row_block(SRC, U, S, g, c0, offs_j, jmask, s_r, s_c, C, NS, scale, HAS_SIGNS,
                                                BC)
            a += tl.sum(unit[:, None] * w, axis=0)
        for c0 in range(0, C, BC):
            _, _, unit, sign, rows, mask, w = _row_block(SRC, U, S, g, c0, offs_j, jmask, s_r, s_c, C, NS, scale,
                                                         HAS_SIGNS, BC)
            out = (w - unit[:, None] * a[None, :]) * sign[:, None]
            tl.store(DST + rows[:, None] * d_r + offs_j[None, :] * d_c, _rounded(out, DST.dtype.element_ty), mask=mask)
    _copy_rows(SRC, DST, offs_j, jmask, s_r, s_c, d_r, d_c, GROUPS * C, R, BC)


@sizes_jit("R", "C_IN", "C", "GROUPS", "NS")
def _fold_rows_kernel(W, BIAS, U, S, OUT_W, OUT_B, R, C_IN, C, GROUPS, NS, s_wr, s_wc, s_b,
                      HAS_BIAS: tl.constexpr, HAS_SIGNS: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr):
    pid = tl.program_id(0)
    scale = _unit_scale(U, C, BC)
    offs_j = pid * BJ + tl.arange(0, BJ)
    _fold_columns(W, OUT_W, U, S, offs_j, offs_j < C_IN, s_wr, s_wc, C_IN, 1, R, C, GROUPS, NS, scale,
                  HAS_SIGNS, BC)
    if HAS_BIAS:
        if pid == 0:  # the bias is one more column: column stride 0, only its first lane kept
            lane = tl.arange(0, BJ)
            _fold_columns(BIAS, OUT_B, U, S, lane, lane < 1, s_b, 0, 1, 0, R, C, GROUPS, NS, scale,
                          HAS_SIGNS, BC)


@triton.jit
def _fold_columns_backward(G, W, U, S, DST, PART, offs_j, jmask, s_gr, s_gc, s_wr, s_wc, d_r, d_c, R, C, GROUPS,
                           NS, scale, ADD_FROM, HAS_SIGNS: tl.constexpr, BC: tl.constexpr):
    """For the columns ``offs_j``: DST = Tᵀ·G per group of C rows (later rows copied), and the columns' share of
    d unit = −Σ_j (s⊙g_j·a_j + w_j·r_j), ``a = unitᵀw``, ``r = unitᵀ(s⊙g)``, into PART[:C]: stored for the groups
    before ``ADD_FROM``, added for the others (one program writes its row of PART, so no atomics)."""
    for g in range(0, GROUPS):
        a = tl.zeros(offs_j.shape, dtype=tl.float32)
        r = tl.zeros(offs_j.shape, dtype=tl.float32)
        for c0 in range(0, C, BC):
            _, _, unit, sign, rows, mask, w = _row_block(W, U, S, g, c0, offs_j, jmask, s_wr, s_wc, C, NS, scale,
                                                         HAS_SIGNS, BC)
            gs = _load_tile(G, rows, offs_j, s_gr, s_gc, mask) * sign[:, None]  # diag(s) is its own transpose
            a += tl.sum(unit[:, None] * w, axis=0)
            r += tl.sum(unit[:, None] * gs, axis=0)
        for c0 in range(0, C, BC):
            offs_c, cmask, unit, sign, rows, mask, w = _row_block(W, U, S, g, c0, offs_j, jmask, s_wr, s_wc, C, NS,
                                                                  scale, HAS_SIGNS, BC)
            gs = _load_tile(G, rows, offs_j, s_gr, s_gc, mask) * sign[:, None]
            tl.store(DST + rows[:, None] * d_r + offs_j[None, :] * d_c,
                     _rounded(gs - unit[:, None] * r[None, :], DST.dtype.element_ty), mask=mask)
            share = -(tl.sum(gs * a[None, :], axis=1) + tl.sum(w * r[None, :], axis=1))
            prev = tl.load(PART + offs_c, mask=cmask & (g >= ADD_FROM), other=0.0)
            tl.store(PART + offs_c, prev + share, mask=cmask)
    _copy_rows(G, DST, offs_j, jmask, s_gr, s_gc, d_r, d_c, GROUPS * C, R, BC)


@triton.jit
def _fold_backward_block(block, GW, GB, W, BIAS, U, S, DW, DB, PART, R, C_IN, C, GROUPS, NS, s_gr, s_gc, s_gb,
                         s_wr, s_wc, s_b, scale, HAS_BIAS: tl.constexpr, HAS_SIGNS: tl.constexpr, BC: tl.constexpr,
                         BJ: tl.constexpr):
    """Column block ``block`` of the backward (block 0 also the bias), its share of d unit into ``PART[block]``."""
    offs_j = block * BJ + tl.arange(0, BJ)
    part = PART + block * C
    _fold_columns_backward(GW, W, U, S, DW, part, offs_j, offs_j < C_IN, s_gr, s_gc, s_wr, s_wc, C_IN, 1, R, C,
                           GROUPS, NS, scale, 1, HAS_SIGNS, BC)
    if HAS_BIAS:
        if block == 0:  # the bias is one more column: 16 lanes (tl's narrowest useful tile), the first kept
            lane = tl.arange(0, 16)
            _fold_columns_backward(GB, BIAS, U, S, DB, part, lane, lane < 1, s_gb, 0, s_b, 0, 1, 0, R, C, GROUPS,
                                   NS, scale, 0, HAS_SIGNS, BC)


@sizes_jit("R", "C_IN", "C", "GROUPS", "NS")
def _fold_rows_backward_kernel(GW, GB, W, BIAS, U, S, DW, DB, PART, DU, R, C_IN, C, GROUPS, NS, s_gr, s_gc, s_gb,
                               s_wr, s_wc, s_b, HAS_BIAS: tl.constexpr, HAS_SIGNS: tl.constexpr, BC: tl.constexpr,
                               BJ: tl.constexpr, ONE_PROGRAM: tl.constexpr, NEED_U: tl.constexpr):
    """One column block per program; or with ``ONE_PROGRAM`` every block in turn and then du (one launch)."""
    scale = _unit_scale(U, C, BC)
    if ONE_PROGRAM:
        blocks = tl.cdiv(C_IN, BJ)
        for block in range(0, blocks):
            _fold_backward_block(block, GW, GB, W, BIAS, U, S, DW, DB, PART, R, C_IN, C, GROUPS, NS, s_gr, s_gc,
                                 s_gb, s_wr, s_wc, s_b, scale, HAS_BIAS, HAS_SIGNS, BC, BJ)
        if NEED_U:
            tl.debug_barrier()  # the shares were stored by other threads of this program: wait for every store
            _unit_grad(PART, U, DU, blocks, C, scale, BC)
    else:
        _fold_backward_block(tl.program_id(0), GW, GB, W, BIAS, U, S, DW, DB, PART, R, C_IN, C, GROUPS, NS, s_gr,
                             s_gc, s_gb, s_wr, s_wc, s_b, scale, HAS_BIAS, HAS_SIGNS, BC, BJ)


@triton.jit
def _shares_sum(PART, offs, cmask, P, C):
    """d unit on the channels ``offs``: the programs' shares ``PART [P, C]`` added in a fixed order."""
    d_unit = tl.zeros(offs.shape, dtype=tl.float32)
    for p in range(0, P):
        d_unit += tl.load(PART + p * C + offs, mask=cmask, other=0.0)
    return d_unit


@triton.jit
def _unit_grad(PART, U, DU, P, C, scale, BC: tl.constexpr):
    """du from the programs' shares of d unit ``PART [P, C]``: unit = √2·u/‖u‖ (``scale`` = √2/‖u‖), so
    du = (√2/‖u‖)·(d unit − unit·(unitᵀ d unit)/2). The shares are added in a fixed order."""
    dot = tl.zeros([BC], dtype=tl.float32)
    for c0 in range(0, C, BC):
        offs = c0 + tl.arange(0, BC)
        cmask = offs < C
        unit = tl.load(U + offs, mask=cmask, other=0.0).to(tl.float32) * scale
        dot += unit * _shares_sum(PART, offs, cmask, P, C)
    half_dot = 0.5 * tl.sum(dot, axis=0)
    for c0 in range(0, C, BC):
        offs = c0 + tl.arange(0, BC)
        cmask = offs < C
        unit = tl.load(U + offs, mask=cmask, other=0.0).to(tl.float32) * scale
        d_unit = _shares_sum(PART, offs, cmask, P, C)
        tl.store(DU + offs, _rounded((d_unit - unit * half_dot) * scale, DU.dtype.element_ty), mask=cmask)


@sizes_jit("P", "C")
def _unit_grad_kernel(PART, U, DU, P, C, BC: tl.constexpr):
    """du from the shares of the column-block programs (one program)."""
    _unit_grad(PART, U, DU, P, C, _unit_scale(U, C, BC), BC)


@on_tensor_device
def _fold_forward(weight, bias, u, signs, groups: int, out_dtype=None):
    rows, c_in = weight.shape
    c = u.shape[0]
    out_w = torch.empty(rows, c_in, device=weight.device, dtype=out_dtype or weight.dtype)
    out_b = torch.empty(rows, device=weight.device, dtype=out_dtype or bias.dtype) if bias is not None else None
    _fold_rows_kernel[(cdiv(c_in, _BLOCK_J),)](
        weight, bias if bias is not None else weight, u, signs if signs is not None else u, out_w,
        out_b if out_b is not None else out_w, rows, c_in, c, groups, signs.shape[0] if signs is not None else 1,
        *weight.stride(), bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, HAS_SIGNS=signs is not None, BC=_BLOCK_C, BJ=_BLOCK_J)
    return out_w, out_b


@on_tensor_device
def _fold_backward(d_w, d_b, weight, bias, u, signs, groups: int, need_u: bool):
    rows, c_in = weight.shape
    c = u.shape[0]
    if d_w is None:  # only the bias was used: the weight's gradient is zero, which the kernel still maps
        d_w = torch.zeros_like(weight)
    with_bias = bias is not None and d_b is not None
    d_weight = torch.empty(rows, c_in, device=weight.device, dtype=weight.dtype)
    d_bias = torch.empty(rows, device=weight.device, dtype=bias.dtype) if with_bias else None
    blocks = cdiv(c_in, _BLOCK_J)
    # one program saves a launch's host time; a CUDA graph replays launches for free, and there the column blocks
    # run side by side (one program took 88 µs per DeiT-T layer on an H200, 1.06 ms of a 19 ms training step)
    one_program = blocks <= _ONE_PROGRAM_MAX_BLOCKS and not graph_capturing(weight.device)
    bc, bj, warps = _BLOCK_C, _BLOCK_J, 4
    if one_program:  # every column in one block, see _ONE_PROGRAM_MAX_BLOCKS
        bj, blocks = max(_BLOCK_J, next_power_of_2(c_in)), 1
        bc, warps = 32, max(4, bj // 32)
    part = torch.empty(blocks, c, device=weight.device, dtype=torch.float32)
    d_u = torch.empty_like(u) if need_u else None
    _fold_rows_backward_kernel[(1 if one_program else blocks,)](
        d_w, d_b if with_bias else d_w, weight, bias if with_bias else weight, u, signs if signs is not None else u,
        d_weight, d_bias if with_bias else d_weight, part, d_u if need_u else part, rows, c_in, c, groups,
        signs.shape[0] if signs is not None else 1, *d_w.stride(), d_b.stride(0) if with_bias else 0,
        *weight.stride(), bias.stride(0) if with_bias else 0,
        HAS_BIAS=with_bias, HAS_SIGNS=signs is not None, BC=bc, BJ=bj, ONE_PROGRAM=one_program,
        NEED_U=need_u, num_warps=warps)
    if need_u and not one_program:
        _unit_grad_kernel[(1,)](part, u, d_u, blocks, c, BC=_BLOCK_C)
    return d_weight, d_bias, d_u


class _FoldRowsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, u, signs, groups, out_dtype):
        ctx.save_for_backward(weight, bias, u, signs)
        ctx.groups = groups
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensor made for it
        return _fold_forward(weight, bias, u, signs, groups, out_dtype)

    @staticmethod
    @once_differentiable  # the kernels' gradients are not differentiable: a second derivative is an error, not zero
    def backward(ctx, d_w, d_b):
        weight, bias, u, signs = ctx.saved_tensors
        if d_w is None and d_b is None:
            return None, None, None, None, None, None
        # the gradients arrive in out_dtype; the kernel reads them as fp32 and writes the inputs' dtypes
        d_weight, d_bias, d_u = _fold_backward(d_w, d_b, weight, bias, u, signs, ctx.groups, ctx.needs_input_grad[2])
        return d_weight, d_bias, d_u, None, None, None


def reflect_projection_rows_triton(weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                                   signs: torch.Tensor | None, groups: int, out_dtype: torch.dtype | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`mirrorla.ops.reflect_projection_rows` on the Triton kernels (arguments checked by it): weight
    ``[R, C_in]``, bias ``[R]`` or None, u ``[C]``, signs ``[C]`` or ``[d]`` (d divides C) or None →
    ``(weight' [R, C_in] contiguous, bias' [R] or None)`` in ``out_dtype`` (default: the inputs'). One launch
    forward, one or two backward."""
    # weight and bias are read through their strides; u and signs are short vectors read as contiguous ones
    u = u if u.is_contiguous() else u.contiguous()
    signs = signs if signs is None or signs.is_contiguous() else signs.contiguous()
    return _FoldRowsTriton.apply(weight, bias, u, signs, groups, out_dtype)
