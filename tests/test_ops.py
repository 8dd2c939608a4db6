"""Exact properties of the pure ops: reflections and the linear-attention core."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorla.ops import (
    block_reflect,
    block_variance,
    cross_head_reflect,
    folded_mirror_map,
    householder_reflect,
    linear_attention,
    linear_attention_reference,
    mapped_linear_attention,
)


def reflection_2x2(theta: float) -> torch.Tensor:
    u = torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)
    return torch.eye(2, dtype=torch.float64) - 2 * torch.outer(u, u)


def matrix_of(fn, d: int) -> torch.Tensor:
    """The matrix M with fn(x) = M x, read off the basis vectors (fn acts on the last dim)."""
    return fn(torch.eye(d, dtype=torch.float64)).T


@pytest.mark.parametrize("theta", [0.0, 0.3, 1.2, math.pi / 2, 2.9, -0.7])
def test_block_reflect_2x2_closed_form_equals_householder(theta):
    m = matrix_of(lambda x: block_reflect(x, torch.tensor([theta], dtype=torch.float64)), 2)
    torch.testing.assert_close(m, reflection_2x2(theta), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pairing", ["adjacent", "half"])
def test_block_reflect_is_orthogonal_symmetric_involution(pairing):
    d = 8
    theta = torch.rand(d // 2, dtype=torch.float64) * math.pi
    m = matrix_of(lambda x: block_reflect(x, theta, pairing=pairing), d)
    eye = torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(m @ m.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(m, m.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(m @ m, eye, rtol=0, atol=1e-12)
    assert torch.linalg.det(m).item() == pytest.approx((-1) ** (d // 2), abs=1e-10)  # det −1 per block
    pairs = [(2 * i, 2 * i + 1) for i in range(d // 2)] if pairing == "adjacent" else [
        (i, i + d // 2) for i in range(d // 2)]
    for i, (a, b) in enumerate(pairs):
        block = m[[a, b]][:, [a, b]]
        torch.testing.assert_close(block, reflection_2x2(theta[i].item()), rtol=0, atol=1e-12)


def test_block_reflect_broadcasts_per_sample_angles():
    x = torch.randn(2, 3, 5, 6)
    theta = torch.rand(2, 3, 1, 3)
    y = block_reflect(x, theta)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(y[b, h], block_reflect(x[b, h], theta[b, h, 0]))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_householder_reflect_matches_explicit_matrix():
    c = 12
    u = torch.randn(c, dtype=torch.float64) * 3
    m = matrix_of(lambda x: householder_reflect(x, u), c)
    unit = u / u.norm()
    explicit = torch.eye(c, dtype=torch.float64) - 2 * torch.outer(unit, unit)
    torch.testing.assert_close(m, explicit, rtol=0, atol=1e-12)
    torch.testing.assert_close(m @ m, torch.eye(c, dtype=torch.float64), rtol=0, atol=1e-12)


def test_cross_head_reflect_equals_householder_on_merged_heads():
    b, h, n, d = 2, 3, 7, 4
    x = torch.randn(b, h, n, d, dtype=torch.float64)
    u = torch.randn(h * d, dtype=torch.float64)
    merged = x.transpose(1, 2).reshape(b, n, h * d)
    expected = householder_reflect(merged, u).view(b, n, h, d).transpose(1, 2)
    torch.testing.assert_close(cross_head_reflect(x, u), expected, rtol=0, atol=1e-12)


def test_block_variance_matches_definition():
    x = torch.randn(2, 3, 11, 6, dtype=torch.float64)
    var = block_variance(x, dim=2)
    assert var.shape == (2, 3, 3)
    for i in range(3):
        vals = x[..., 2 * i:2 * i + 2].reshape(2, 3, -1)
        torch.testing.assert_close(var[..., i], vals.var(dim=-1, unbiased=False))
    var_half = block_variance(x, pairing="half", dim=2)
    vals = torch.cat([x[..., 0:1], x[..., 3:4]], -1).reshape(2, 3, -1)
    torch.testing.assert_close(var_half[..., 0], vals.var(dim=-1, unbiased=False))


@pytest.mark.parametrize("dq,dv,nq,n", [(16, 16, 33, 33), (8, 24, 17, 40), (32, 4, 5, 64)])
def test_linear_attention_equals_reference(dq, dv, nq, n):
    q = torch.rand(2, 3, nq, dq)
    k = torch.rand(2, 3, n, dq)
    v = torch.randn(2, 3, n, dv)
    out = linear_attention(q, k, v)
    ref = linear_attention_reference(q, k, v)
    assert out.shape == (2, 3, nq, dv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(1, 40), dq=st.integers(1, 12), dv=st.integers(1, 12),
)
def test_linear_attention_equals_reference_property(b, h, n, dq, dv):
    g = torch.Generator().manual_seed(b * 1000 + h * 100 + n * 10 + dq + dv)
    q = torch.rand(b, h, n, dq, generator=g, dtype=torch.float64)
    k = torch.rand(b, h, n, dq, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, n, dv, generator=g, dtype=torch.float64)
    torch.testing.assert_close(linear_attention(q, k, v).double(), linear_attention_reference(q, k, v).double(),
                               rtol=1e-6, atol=1e-6)


def test_reference_attention_rows_are_normalised_and_reproduce_output():
    q, k, v = torch.rand(1, 2, 9, 4), torch.rand(1, 2, 9, 4), torch.randn(1, 2, 9, 5)
    out, attn = linear_attention_reference(q, k, v, return_attn=True)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2, 9), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn @ v, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_attention_low_precision_long_sequence_stays_finite(dtype):
    # 16,384 tokens of magnitude ~30: Σ φk vᵀ reaches ~1e7, far beyond fp16's 65,504.
    n = 16_384
    q = (torch.rand(1, 2, n, 16) * 30).to(dtype)
    k = (torch.rand(1, 2, n, 16) * 30).to(dtype)
    v = (torch.randn(1, 2, n, 16) * 30).to(dtype)
    out = linear_attention(q, k, v)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = linear_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_core_makes_no_whole_fp32_copy_of_half_inputs(dtype, monkeypatch):
    """Without autograd the torch core converts half-precision q, k, v a chunk of tokens at a time (the same fp32
    state and normaliser): no fp32 tensor the size of a whole input is made, and the output matches the fp32
    computation on the same values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mirrorla.ops import reference

    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 7)  # several chunks, the last one partial
    b, h, n, nq, d, dv = 2, 3, 30, 25, 8, 6
    q, k = (torch.rand(b, h, m, d).to(dtype) for m in (nq, n))
    v = torch.randn(b, h, n, dv).to(dtype)

    class LargestFp32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32:
                LargestFp32.largest = max(LargestFp32.largest, out.numel())
            return out

    with torch.no_grad(), LargestFp32():
        out = linear_attention(q, k, v)
    assert out.dtype == dtype
    assert 0 < LargestFp32.largest <= b * h * 7 * d  # chunks only, never [B, H, N, d]
    ref = linear_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_core_under_autograd_makes_no_whole_fp32_copy(dtype, monkeypatch, largest_fp32):
    """With autograd too the torch core converts half-precision inputs a chunk of tokens at a time, forward and
    backward, and saves them in their own dtype: no fp32 tensor the size of a whole input (nor of the [B, H, Nq,
    dv + 1] products) is made. Output and gradients (in the inputs' dtypes) match autograd through the fp32
    computation on the same values, for strided inputs and a gradient that is a broadcast view."""
    from mirrorla.ops import reference

    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 7)  # several chunks, the last one partial
    b, h, n, nq, d, dv = 2, 3, 30, 25, 8, 6
    qkv = torch.rand(b, n, 3, h, d).to(dtype).permute(2, 0, 3, 1, 4)  # strided views, as the layers make them
    k, v = qkv[1], qkv[2, ..., :dv] - 0.5
    q = torch.rand(b, h, nq, d).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    with largest_fp32() as record:
        out = linear_attention(*leaves)
        out.sum().backward()  # the gradient reaches the op as an expanded (stride 0) tensor
    assert out.dtype == dtype and [t.grad.dtype for t in leaves] == [dtype] * 3
    assert record.largest <= b * h * 7 * (dv + 1) + b * h * d * (dv + 1)  # a chunk's, never [B, H, N, d]
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = linear_attention(*ref_leaves)
    ref.sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float(), ref, **tol)
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_core_under_torch_func(dtype, monkeypatch):
    """Under torch.func transforms (per-sample gradients by ``vmap`` of ``grad``, for example) the core
    takes its plain form, whose ops functorch can run (an autograd Function without ``setup_context`` cannot),
    with the gradients autograd gives through the chunked form; ``vmap`` runs too."""
    from mirrorla.ops import reference

    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 4)
    q, k, v = (torch.rand(2, 3, 11, 4).to(dtype) for _ in range(3))
    out, pullback = torch.func.vjp(lambda a, b, c: linear_attention(a, b, c), q, k, v)
    grad = torch.randn_like(out)
    got = pullback(grad)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    want_out = linear_attention(*leaves)
    want = torch.autograd.grad(want_out, leaves, grad)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want_out, **tol)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, **tol)
    batched = torch.func.vmap(lambda a, b, c: linear_attention(a[None], b[None], c[None])[0])(q, k, v)
    torch.testing.assert_close(batched, want_out.detach(), **tol)


@pytest.mark.parametrize("feature,pairing,angle_batch", [
    ("identity", "adjacent", None), ("relu", "adjacent", None), ("rotate_relu", "adjacent", 2),
    ("rotate_relu", "half", 1),
])
def test_chunked_reference_core_gradients_are_exact(feature, pairing, angle_batch, monkeypatch):
    """The chunked core's hand-written backward, the feature map's included (dq, dk, dv and the angle's
    gradient), against autograd's numerical gradients in fp64 (the same function with fp64 accumulation), over
    several chunks and the last one partial, with only some inputs needing gradients; its value against the plain
    form's."""
    from mirrorla.ops import reference

    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 4)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 9, 4, dtype=torch.float64, generator=gen).requires_grad_()
    k = torch.randn(2, 2, 11, 4, dtype=torch.float64, generator=gen).requires_grad_()
    v = torch.randn(2, 2, 11, 3, dtype=torch.float64, generator=gen).requires_grad_()
    angle = (torch.randn(angle_batch, 2, 2, dtype=torch.float64, generator=gen).requires_grad_()
             if angle_batch else None)
    if feature != "identity":  # keep the ReLU's inputs off its kink, where a finite difference is no derivative
        q, k = (torch.where(t.abs() < 0.05, 0.3, t).detach().requires_grad_() for t in (q, k))

    def fn(qq, kk, vv, aa=angle):
        return reference._ChunkedLinearAttention.apply(qq, kk, vv, aa, feature, pairing, 0.5)

    leaves = (q, k, v) if angle is None else (q, k, v, angle)
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradcheck(lambda kk: fn(q.detach(), kk, v.detach()), (k,))
    assert torch.autograd.gradcheck(lambda qq: fn(qq, k.detach(), v.detach()), (q,))
    if angle is not None:  # the angle's gradient alone still runs both passes (its q and k parts)
        assert torch.autograd.gradcheck(lambda aa: fn(q.detach(), k.detach(), v.detach(), aa), (angle,))
    plain = reference._linear_attention_torch(q, k, v, eps=0.5, feature=feature, angle=angle, pairing=pairing)
    torch.testing.assert_close(fn(q, k, v), plain)


@pytest.mark.parametrize("feature,pairing", [("relu", "adjacent"), ("rotate_relu", "adjacent"),
                                             ("rotate_relu", "half")])
@pytest.mark.parametrize("grad", [False, True])
def test_torch_core_maps_half_inputs_by_chunks(feature, pairing, grad, monkeypatch, largest_fp32):
    """On the torch backend (a GPU without Triton, MIRRORLA_BACKEND=torch) the core applies ReLU or the rotation
    and ReLU itself, to one chunk of tokens at a time, forward and backward: for bf16 inputs no fp32 tensor the size
    of q, k, φ(q) or φ(k) is made (the map in torch before the core made them whole, and autograd saved them).
    Output and gradients (q, k, v and the angle's) match autograd through the fp32 map and core on the same
    values."""
    from mirrorla.ops import reference

    monkeypatch.setenv("MIRRORLA_BACKEND", "torch")
    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 7)  # several chunks, the last one partial
    b, h, n, nq, d, dv = 2, 3, 30, 25, 8, 6
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(b, n, 3, h, d, generator=gen).bfloat16().permute(2, 0, 3, 1, 4)  # strided, as layers make
    k, v = qkv[1], qkv[2, ..., :dv]
    q = torch.randn(b, h, nq, d, generator=gen).bfloat16()
    angle = torch.randn(b, h, d // 2, generator=gen) if feature == "rotate_relu" else None
    inputs = [t for t in (q, k, v, angle) if t is not None]
    upstream = torch.randn(b, h, nq, dv, generator=gen).bfloat16()

    def run(*ts):
        return mapped_linear_attention(*ts[:3], feature=feature, angle=ts[3] if len(ts) > 3 else None,
                                       pairing=pairing)

    leaves = [t.detach().requires_grad_(grad) for t in inputs]
    with largest_fp32() as record:
        out = run(*leaves)
        if grad:
            out.backward(upstream)
    assert out.dtype == torch.bfloat16
    assert 0 < record.largest <= b * h * 7 * (dv + 1) + b * h * d * (dv + 1)  # a chunk's, never [B, H, N, d]
    ref_leaves = [t.detach().float().requires_grad_(grad) for t in inputs]
    ref = run(*ref_leaves)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    if grad:
        ref.backward(upstream.float())
        for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
            assert leaf.grad.dtype == leaf.dtype
            torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad, rtol=3e-2, atol=3e-2)


def test_torch_core_chunks_are_bounded_in_elements_for_large_batches(monkeypatch, largest_fp32):
    """A chunk holds at most _CHUNK_TOKENS tokens and, above _MIN_CHUNK_TOKENS, at most _CHUNK_ELEMENTS elements:
    more (b, h) rows take fewer tokens per chunk (B = 64, H = 12, N = 16,384 would otherwise convert 805 MB of fp32
    per chunk)."""
    from mirrorla.ops import reference

    assert reference._chunk_tokens(torch.empty(1, 3, 0, 64)) == reference._CHUNK_TOKENS
    assert reference._chunk_tokens(torch.empty(64, 12, 0, 64)) == (1 << 22) // (64 * 12 * 64)
    assert reference._chunk_tokens(torch.empty(4096, 16, 0, 128)) == reference._MIN_CHUNK_TOKENS
    monkeypatch.setenv("MIRRORLA_BACKEND", "torch")  # (the CPU kernels would map q and k whole)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * 3 * 8 * 5)  # 5 tokens of [2, 3, ·, 8]
    monkeypatch.setattr(reference, "_MIN_CHUNK_TOKENS", 1)
    q, k, v = (torch.randn(2, 3, 23, 8).bfloat16().requires_grad_() for _ in range(3))
    angle = torch.randn(2, 3, 4, requires_grad=True)
    with largest_fp32() as record:
        out = mapped_linear_attention(q, k, v, feature="rotate_relu", angle=angle)
        out.sum().backward()
    assert 0 < record.largest <= max(2 * 3 * 5 * 9, 2 * 3 * 8 * 9)
    ref = [t.detach().float().requires_grad_() for t in (q, k, v, angle)]
    want = mapped_linear_attention(*ref[:3], feature="rotate_relu", angle=ref[3])
    want.sum().backward()
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    for leaf, r in zip((q, k, v, angle), ref, strict=True):
        torch.testing.assert_close(leaf.grad.float(), r.grad, rtol=3e-2, atol=3e-2)


def test_token_sums_reference_under_autograd_makes_no_whole_fp32_copy(monkeypatch, largest_fp32):
    """σ²'s path on the torch backend: the token sums of bf16 keys, forward and backward (``g₁ + 2 g₂ x``), a chunk
    of tokens at a time; the same sums and gradient as autograd through the fp32 sums."""
    from mirrorla.ops import reference, token_sums_reference

    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 7)
    x = torch.randn(2, 3, 30, 8).bfloat16().requires_grad_()
    grad = torch.randn(2, 3, 2, 8)
    with largest_fp32() as record:
        sums = token_sums_reference(x)
        sums.backward(grad)
    assert 0 < record.largest <= 2 * 3 * 7 * 8
    ref_x = x.detach().float().requires_grad_()
    ref = torch.stack([ref_x.sum(2), ref_x.square().sum(2)], 2)
    ref.backward(grad)
    torch.testing.assert_close(sums, ref)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), ref_x.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype,pairing,delta_form", [
    (torch.float32, "adjacent", "tanh_log"), (torch.float32, "half", "log"), (torch.float32, "adjacent", "rsqrt"),
    (torch.bfloat16, "adjacent", "tanh_log"), (torch.bfloat16, "half", "tanh_log"),
])
def test_mirror_linear_attention_matches_the_map_then_the_core(backend, dtype, pairing, delta_form, monkeypatch):
    """The MirrorLA op (σ², angles, rotation and ReLU, core) on the torch backend (the map inside the chunked core
    for bf16) and on the CPU kernels gives the values and the q, k, v, θ, γ gradients of the reference map followed
    by the reference core, computed in fp64 on the same values."""
    from mirrorla.ops import folded_mirror_map_reference, mirror_linear_attention, reference

    monkeypatch.setenv("MIRRORLA_BACKEND", backend)
    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 8)
    b, h, n, d, dv = 2, 3, 21, 8, 5
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=gen).to(dtype)
    theta, gamma = torch.randn(h, d // 2, generator=gen), torch.randn(h, d // 2, generator=gen) * 0.3
    upstream = torch.randn(b, h, n, dv, generator=gen).to(dtype)
    options = dict(pairing=pairing, delta_form=delta_form)

    leaves = [t.detach().requires_grad_() for t in (q, k, v, theta, gamma)]
    out = mirror_linear_attention(*leaves, **options, map_eps=1e-5, eps=1e-4)
    out.backward(upstream)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, theta, gamma)]
    phi_q, phi_k = folded_mirror_map_reference(*ref_leaves[:2], *ref_leaves[3:], eps=1e-5, **options)
    ref = linear_attention(phi_q, phi_k, ref_leaves[2], eps=1e-4)
    ref.backward(upstream.double())
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **tol)
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        assert leaf.grad.dtype == leaf.dtype
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **tol)


def test_mirror_linear_attention_on_the_torch_backend_makes_no_whole_fp32_copy(monkeypatch, largest_fp32):
    """MirrorLA training on the torch backend with bf16 q, k, v (a GPU without Triton): the token sums, the
    angles, the map and the core, forward and backward, make no fp32 tensor the size of q, k or φ of them."""
    from mirrorla.ops import mirror_linear_attention, reference

    monkeypatch.setenv("MIRRORLA_BACKEND", "torch")
    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 7)
    b, h, n, d = 2, 3, 30, 8
    q, k, v = (torch.randn(b, h, n, d).bfloat16().requires_grad_() for _ in range(3))
    theta, gamma = (torch.randn(h, d // 2, requires_grad=True) for _ in range(2))
    with largest_fp32() as record:
        out = mirror_linear_attention(q, k, v, theta, gamma)
        out.sum().backward()
    assert 0 < record.largest <= b * h * 7 * (d + 1) + b * h * d * (d + 1)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, theta, gamma))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mirror_linear_attention_on_the_torch_backend_stays_finite_in_half_precision(dtype, monkeypatch):
    """16,384 tokens of large half-precision activations through the torch backend's MirrorLA (token sums, angles,
    the map inside the chunked core): the output and every gradient stay finite (the sums of Σk² and the state
    would overflow fp16 if they were not accumulated in fp32)."""
    from mirrorla.ops import mirror_linear_attention

    monkeypatch.setenv("MIRRORLA_BACKEND", "torch")
    q, k, v = ((torch.randn(1, 2, 16_384, 16) * 30).to(dtype).requires_grad_() for _ in range(3))
    theta, gamma = (torch.randn(2, 8, requires_grad=True) for _ in range(2))
    out = mirror_linear_attention(q, k, v, theta, gamma)
    out.float().sum().backward()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, theta, gamma))


def test_mirror_linear_attention_rejects_bad_parameters():
    from mirrorla.ops import mirror_linear_attention

    q = k = v = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"theta must have shape \[H, d/2\] = \[2, 2\]"):
        mirror_linear_attention(q, k, v, torch.zeros(2, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="d must be even"):
        mirror_linear_attention(q[..., :3], k[..., :3], v, torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="delta_form must be one of"):
        mirror_linear_attention(q, k, v, torch.zeros(2, 2), torch.zeros(2, 2), delta_form="exp")


@pytest.mark.parametrize("delta_form", ["tanh_log", "log", "rsqrt"])
@pytest.mark.parametrize("pairing", ["adjacent", "half"])
def test_angles_from_sums_backward_is_autograds(delta_form, pairing):
    """The closed-form gradients of the angles (what the Triton ops' fallback backward runs inside a custom op) are
    autograd's through :func:`angles_from_sums`, in fp64: every Δα form's slope, both pairings, a γ of 0, and pairs
    whose σ² is clamped at 0 (their σ² takes no gradient)."""
    from mirrorla.ops.reference import angles_from_sums, angles_from_sums_backward

    gen = torch.Generator().manual_seed(3)
    b, h, d, n = 3, 2, 8, 10
    x = torch.randn(b, h, n, d, dtype=torch.float64, generator=gen)
    sums = torch.stack([x.sum(2), x.square().sum(2)], 2)
    sums[0, 0, 1] = 0.0  # Σx² = 0 with Σx ≠ 0: negative σ² before the clamp, on every pair of this head
    theta = torch.randn(h, d // 2, dtype=torch.float64, generator=gen)
    gamma = torch.randn(h, d // 2, dtype=torch.float64, generator=gen)
    gamma[0, 0] = 0.0
    grad = torch.randn(b, h, d // 2, dtype=torch.float64, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (sums, theta, gamma)]
    options = dict(eps=1e-3, delta_form=delta_form, pairing=pairing)
    want = torch.autograd.grad(angles_from_sums(leaves[0], n, *leaves[1:], **options), leaves, grad)
    got = angles_from_sums_backward(sums, n, theta, gamma, grad, **options)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert (got[0][0, 0, 1] == 0).all()


def test_linear_attention_under_autocast_reduces_in_fp32():
    n = 16_384
    q, k, v = (torch.rand(1, 1, n, 8) * 30 for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, linear_attention(q, k, v))


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.rand(2, 3, 4), torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)), "q must have rank 4"),
        ((torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 6), torch.rand(2, 3, 4, 5)), "q and k must share"),
        ((torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5), torch.rand(2, 3, 7, 5)), "v must match k"),
        ((torch.rand(2, 3, 4, 5), torch.rand(1, 3, 4, 5), torch.rand(1, 3, 4, 5)), "q and k must share"),
    ],
)
def test_linear_attention_rejects_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        linear_attention(*args)


@pytest.mark.parametrize("eps", [-1.0, float("inf"), "1e-6", None])
def test_linear_attention_ops_reject_a_bad_eps_and_take_zero(eps):
    q, k, v = (torch.rand(1, 2, 5, 4) for _ in range(3))
    for op in (linear_attention, linear_attention_reference, mapped_linear_attention):
        with pytest.raises(ValueError, match=f"eps must be a finite number >= 0, got {eps!r}"):
            op(q, k, v, eps=eps)
    # eps = 0 is the plain mean-normalised form: finite wherever φqᵀz > 0 (here every entry is positive)
    torch.testing.assert_close(linear_attention(q, k, v, eps=0.0), linear_attention_reference(q, k, v, eps=0.0))
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got 0"):
        folded_mirror_map(q, k, torch.zeros(2, 2), torch.zeros(2, 2), eps=0)


def test_reflection_ops_reject_bad_input():
    with pytest.raises(ValueError, match="even last dimension"):
        block_reflect(torch.rand(3, 5), torch.rand(2))
    with pytest.raises(ValueError, match=r"theta must broadcast to \[\.\.\., d/2\]"):
        block_reflect(torch.rand(3, 6), torch.rand(4))
    with pytest.raises(ValueError, match="pairing must be one of"):
        block_reflect(torch.rand(3, 6), torch.rand(3), pairing="diagonal")
    with pytest.raises(ValueError, match=r"u must have shape \[C\]"):
        householder_reflect(torch.rand(3, 6), torch.rand(5))
    with pytest.raises(ValueError, match=r"u must have shape \[H·d\]"):
        cross_head_reflect(torch.rand(1, 2, 3, 4), torch.rand(4))
    with pytest.raises(TypeError, match="floating-point"):
        block_reflect(torch.ones(3, 6, dtype=torch.long), torch.rand(3))


# the legacy exporter is exercised on purpose: its deprecation and constant-folding warnings are expected here
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_tracing_is_seen_by_both_onnx_exporters(tmp_path):
    """The ops switch to their traceable forms when a compiler, tracer or exporter records them; both ONNX
    exporters are recognised (TorchScript traces, the dynamo exporter exports) and eager calls are not."""
    import io

    from mirrorla.ops.reflect import _tracing

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(_tracing())
            return x * 2

    assert not _tracing()
    torch.onnx.export(Probe(), (torch.randn(2),), io.BytesIO(), dynamo=False)
    torch.onnx.export(Probe(), (torch.randn(2),), str(tmp_path / "probe.onnx"), dynamo=True)
    assert seen and all(seen), seen
