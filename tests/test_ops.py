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
def test_reference_core_under_autograd_makes_no_whole_fp32_copy(dtype, monkeypatch):
    """With autograd too the torch core converts half-precision inputs a chunk of tokens at a time, forward and
    backward, and saves them in their own dtype: no fp32 tensor the size of a whole input (nor of the [B, H, Nq,
    dv + 1] products) is made. Output and gradients (in the inputs' dtypes) match autograd through the fp32
    computation on the same values, for strided inputs and a gradient that is a broadcast view."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mirrorla.ops import reference

    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 7)  # several chunks, the last one partial
    b, h, n, nq, d, dv = 2, 3, 30, 25, 8, 6
    qkv = torch.rand(b, n, 3, h, d).to(dtype).permute(2, 0, 3, 1, 4)  # strided views, as the layers make them
    k, v = qkv[1], qkv[2, ..., :dv] - 0.5
    q = torch.rand(b, h, nq, d).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    class LargestFp32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    LargestFp32.largest = max(LargestFp32.largest, t.numel())
            return out

    with LargestFp32():
        out = linear_attention(*leaves)
        out.sum().backward()  # the gradient reaches the op as an expanded (stride 0) tensor
    assert out.dtype == dtype and [t.grad.dtype for t in leaves] == [dtype] * 3
    assert LargestFp32.largest <= b * h * 7 * (dv + 1) + b * h * d * (dv + 1)  # a chunk's, never [B, H, N, d]
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = linear_attention(*ref_leaves)
    ref.sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float(), ref, **tol)
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_core_under_torch_func(dtype, monkeypatch):
    """Under torch.func transforms (the Triton ops' fallback differentiates the reference under ``vjp``) the core
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


def test_chunked_reference_core_gradients_are_exact(monkeypatch):
    """The chunked core's hand-written backward against autograd's numerical gradients, in fp64 (the same function
    with fp64 accumulation), over several chunks and the last one partial, with only some inputs needing
    gradients."""
    from mirrorla.ops import reference

    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 4)
    q = torch.rand(1, 2, 9, 4, dtype=torch.float64, requires_grad=True)
    k = torch.rand(1, 2, 11, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 11, 3, dtype=torch.float64, requires_grad=True)
    fn = reference._ChunkedLinearAttention.apply
    assert torch.autograd.gradcheck(lambda *t: fn(*t, 1e-3), (q, k, v))
    assert torch.autograd.gradcheck(lambda kk: fn(q.detach(), kk, v.detach(), 1e-3), (k,))
    assert torch.autograd.gradcheck(lambda qq: fn(qq, k.detach(), v.detach(), 1e-3), (q,))
    torch.testing.assert_close(fn(q, k, v, 1e-3), reference._linear_attention_torch(q, k, v, eps=1e-3))


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
