"""The fast MirrorLA path: folding into the projections and per-sample rotations equal the plain map."""

import itertools
import math

import pytest
import torch

from mirrorla import LinearAttention
from mirrorla.feature_maps import MirrorFeatureMap
from mirrorla.ops import (
    block_reflect,
    block_variance,
    cross_head_reflect,
    folded_variance,
    rotate_pairs,
    token_moments,
    token_sums,
)

COMBOS = [dict(block=b, variance=v, cross_head=c, pairing=p)
          for b, v, c, p in itertools.product([True, False], [True, False], [True, False], ["adjacent", "half"])
          if b or not v]


def test_reflection_is_rotation_after_fixed_reflection():
    """H(θ) = R(2θ)·H(0): the identity that lets H(0) move into the weights."""
    x = torch.randn(5, 8, dtype=torch.float64)
    theta = torch.rand(4, dtype=torch.float64) * math.pi
    (rotated,) = rotate_pairs(block_reflect(x, torch.zeros(4, dtype=torch.float64)), angle=2 * theta)
    torch.testing.assert_close(rotated, block_reflect(x, theta), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pairing", ["adjacent", "half"])
def test_rotate_pairs_complex_and_real_paths_agree(pairing):
    x = torch.randn(2, 3, 7, 8)
    angle = torch.rand(2, 3, 1, 4) * 6
    (fast,) = rotate_pairs(x, angle=angle, pairing=pairing)
    pairs = x.unflatten(-1, (4, 2)) if pairing == "adjacent" else x.unflatten(-1, (2, 4)).transpose(-1, -2)
    c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    expected = torch.stack([c[..., 0] * pairs[..., 0] - s[..., 0] * pairs[..., 1],
                            s[..., 0] * pairs[..., 0] + c[..., 0] * pairs[..., 1]], -1)
    expected = expected.flatten(-2) if pairing == "adjacent" else expected.transpose(-1, -2).flatten(-2)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    # an odd storage offset admits no complex view: the real path runs and agrees
    shifted = torch.empty(x.numel() + 1)[1:].view_as(x).copy_(x)
    (real,) = rotate_pairs(shifted, angle=angle, pairing=pairing)
    torch.testing.assert_close(real, fast, rtol=1e-5, atol=1e-5)


def test_token_moments_chunked_matches_plain():
    x = torch.randn(1, 2, 10_000, 6, dtype=torch.float64)
    mean, mean_sq = token_moments(x, dim=2, chunk=1024)
    torch.testing.assert_close(mean, x.mean(2))
    torch.testing.assert_close(mean_sq, x.square().mean(2))


def test_variance_from_folded_keys_equals_block_variance():
    fmap = MirrorFeatureMap(3, 8).double()
    k = torch.randn(2, 3, 50, 8, dtype=torch.float64) + 0.7
    k_cross = cross_head_reflect(k, fmap.u)
    folded = block_reflect(k_cross, torch.zeros(3, 1, 4, dtype=torch.float64)).detach()  # H(0)·H_cross·k
    for grad in (False, True):  # the fused kernel (no gradients) and the reference
        with torch.set_grad_enabled(grad):
            var = folded_variance(token_sums(folded.detach().requires_grad_(grad)), 50)
        torch.testing.assert_close(var, block_variance(k_cross, dim=2).detach())


@pytest.mark.parametrize("kwargs", COMBOS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_folded_layer_equals_plain_layer_values_and_gradients(kwargs):
    torch.manual_seed(1)
    layer = LinearAttention(48, 3, attn="mirror", attn_kwargs=kwargs, qkv_bias=True).double()
    with torch.no_grad():
        if layer.feature_map.gamma is not None:
            layer.feature_map.gamma.normal_()
    assert layer.fold_feature_map == (kwargs["block"] or kwargs["cross_head"])
    x = torch.randn(2, 1 + 6 * 5, 48, dtype=torch.float64)
    out_fast = layer(x, grid_size=(6, 5))
    grads_fast = torch.autograd.grad(out_fast.square().sum(), list(layer.parameters()))
    layer.fold_feature_map = False
    out_plain = layer(x, grid_size=(6, 5))
    grads_plain = torch.autograd.grad(out_plain.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # inference: the fused CPU kernel where it is built
        layer.fold_feature_map = layer.feature_map.foldable
        torch.testing.assert_close(layer(x, grid_size=(6, 5)), out_plain, rtol=1e-10, atol=1e-10)
    for (name, _), gf, gp in zip(layer.named_parameters(), grads_fast, grads_plain, strict=True):
        torch.testing.assert_close(gf, gp, rtol=1e-8, atol=1e-10, msg=name)


def test_qk_norm_disables_folding_and_stays_correct():
    layer = LinearAttention(48, 3, attn="mirror", qk_norm=True)
    assert not layer.fold_feature_map  # a norm between projection and map blocks the algebra
    assert torch.isfinite(layer(torch.randn(1, 16, 48))).all()


def test_fold_projection_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"weight must be \[C=24, C_in\]"):
        MirrorFeatureMap(3, 8).fold_projection(torch.randn(20, 5), None)


@pytest.mark.parametrize("fold", [True, False])
def test_layer_compiles_with_fullgraph(fold):
    torch.manual_seed(0)
    layer = LinearAttention(32, 2, attn="mirror", fold_feature_map=fold)
    with torch.no_grad():
        layer.feature_map.gamma.normal_()
    x = torch.randn(2, 1 + 4 * 4, 32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if fold else "inductor")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_folding_q_and_k_together_equals_folding_each():
    from mirrorla.feature_maps import create_feature_map

    for kwargs in ({}, {"variance": False}, {"pairing": "half"}, {"cross_head": False}):
        fmap = create_feature_map("mirror", 3, 8, **kwargs).double()
        w, b = torch.randn(2, 24, 10, dtype=torch.float64), torch.randn(2, 24, dtype=torch.float64)
        wg, bg = fmap.fold_projection(w, b)
        for i in range(2):
            wi, bi = fmap.fold_projection(w[i], b[i])
            torch.testing.assert_close(wg[i], wi)
            torch.testing.assert_close(bg[i], bi)


@pytest.mark.parametrize("kwargs", [{}, {"pairing": "half"}, {"block": False, "variance": False},
                                    {"variance": False}, {"cross_head": False}])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_fold_equals_the_generic_fold_in_values_and_gradients(kwargs, bias):
    """The one-node fold of the qkv rows (reflect_projection_rows) equals folding q and k op by op and keeping v:
    folded weights and the gradients of weight, bias and u."""
    from mirrorla.feature_maps import FeatureMap

    torch.manual_seed(0)
    fmap = MirrorFeatureMap(3, 8, **kwargs).double()
    w = torch.randn(72, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(72, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = [w] + ([b] if bias else []) + list(fmap.parameters())
    gw, gb = torch.randn(72, 10, dtype=torch.float64), torch.randn(72, dtype=torch.float64)
    results = []
    for fold in (fmap.fold_leading_rows, lambda *a: FeatureMap.fold_leading_rows(fmap, *a)):
        wf, bf = fold(w, b, 2)
        loss = (wf * gw).sum() + ((bf * gb).sum() if bias else 0)
        results.append(((wf, bf), torch.autograd.grad(loss, inputs, allow_unused=True)))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(w[48:], out[0][48:])  # the v rows pass unchanged
    if bias:
        torch.testing.assert_close(out[1], ref[1])
    for a, e in zip(grads, ref_grads, strict=True):
        if e is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, e)


def test_reflect_projection_rows_gradcheck_and_errors():
    from mirrorla.ops import reflect_projection_rows

    torch.manual_seed(0)
    w = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, dtype=torch.float64, requires_grad=True)
    signs = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w, b, u: reflect_projection_rows(w, b, u, signs, groups=3), (w, b, u))
    assert torch.autograd.gradcheck(lambda w, u: reflect_projection_rows(w, None, u, groups=2)[0], (w, u))
    # an orthogonal map of the rows: each group's column norms are kept
    wf, _ = reflect_projection_rows(w, b, u, signs, groups=3)
    torch.testing.assert_close(wf[:6].norm(dim=0), w[:6].norm(dim=0))
    for kwargs, needle in [
        (dict(weight=torch.randn(5, 3)), r"weight must have shape \[R ≥ groups·C = 18, C_in\]"),
        (dict(bias=torch.randn(3)), r"bias must have shape \[R = 20\]"),
        (dict(signs=torch.ones(4)), r"signs must have shape \[C = 6\] or \[d\] with d dividing C"),
        (dict(groups=0), "groups must be a positive int"),
    ]:
        args = dict(weight=w, bias=b, u=u, signs=signs, groups=3) | kwargs
        with pytest.raises(ValueError, match=needle):
            reflect_projection_rows(args["weight"], args["bias"], args["u"], args["signs"], groups=args["groups"])


def test_fused_fold_in_bf16_weights_stays_finite_and_close():
    from mirrorla.feature_maps import FeatureMap

    fmap = MirrorFeatureMap(3, 8)
    w, b = torch.randn(72, 10), torch.randn(72)
    ref = FeatureMap.fold_leading_rows(fmap, w, b, 2)
    got = fmap.bfloat16().fold_leading_rows(w.bfloat16(), b.bfloat16(), 2)
    assert got[0].dtype == torch.bfloat16 and torch.isfinite(got[0]).all()
    torch.testing.assert_close(got[0].float(), ref[0], atol=5e-2, rtol=5e-2)


def test_fused_fold_under_autocast_keeps_the_weights_precision():
    """Under bf16 autocast the fold's own matmuls stay in fp32 (a bf16 product there broke the training step on the
    GPU), and a backward run inside the autocast region works too."""
    torch.manual_seed(0)
    layer = LinearAttention(48, 3, qkv_bias=True)
    with torch.no_grad():
        layer.feature_map.gamma.normal_()
    x = torch.randn(2, 17, 48)
    ref_w, _ = layer.feature_map.fold_leading_rows(layer.qkv.weight, layer.qkv.bias, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, b = layer.feature_map.fold_leading_rows(layer.qkv.weight, layer.qkv.bias, 2)
        assert w.dtype == torch.float32 and b.dtype == torch.float32
        torch.testing.assert_close(w, ref_w)
        layer(x).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("options", [{}, {"variance": False}, {"cross_head": False}])
def test_the_fold_in_autocasts_dtype_gives_the_values_and_gradients_of_a_cast_after_it(options):
    """``out_dtype``: the folded weights as the fp32 fold rounded once (what autocast's cast of them gave), and the
    same fp32 gradients for the same bf16 incoming ones; the common configuration and the generic fold alike."""
    torch.manual_seed(0)
    fmap = MirrorFeatureMap(3, 8, **options)
    w, b = torch.randn(72, 10, requires_grad=True), torch.randn(72, requires_grad=True)
    leaves = [w, b, *fmap.parameters()]
    ref_w, ref_b = fmap.fold_leading_rows(w, b, 2)
    got_w, got_b = fmap.fold_leading_rows(w, b, 2, out_dtype=torch.bfloat16)
    assert got_w.dtype == got_b.dtype == torch.bfloat16
    assert torch.equal(got_w, ref_w.bfloat16()) and torch.equal(got_b, ref_b.bfloat16())
    grads = [torch.randn(72, 10).bfloat16(), torch.randn(72).bfloat16()]
    want = torch.autograd.grad([ref_w.bfloat16(), ref_b.bfloat16()], leaves, grads, allow_unused=True)
    got = torch.autograd.grad([got_w, got_b], leaves, grads, allow_unused=True)
    for a, e in zip(got, want, strict=True):
        assert (a is None and e is None) or (a.dtype == torch.float32 and torch.equal(a, e))


def test_a_layer_under_autocast_runs_no_cast_of_its_folded_weights(cast_shapes):
    """LinearAttention asks the fold for autocast's dtype: F.linear finds the folded qkv weights cast already, so no
    cast of them runs in the forward (a non-leaf weight's cast is not cached by autocast: one per step and layer,
    and its backward), and the step gives the same output and gradients as before (the cast after the fold)."""
    torch.manual_seed(0)
    layer = LinearAttention(48, 3, qkv_bias=True)
    with torch.no_grad():
        layer.feature_map.gamma.normal_(0, 0.5)
    x = torch.randn(2, 17, 48)
    with cast_shapes() as casts, torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, grid_size=(4, 4))
    out.float().square().sum().backward()
    assert (144, 48) not in casts.shapes and (144,) not in casts.shapes
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    w, b = layer.feature_map.fold_leading_rows(layer.qkv.weight, layer.qkv.bias, 2)  # fp32, cast by autocast
    layer._fold_qkv_weight = lambda out_dtype=None: (w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = layer(x, grid_size=(4, 4))
    ref.float().square().sum().backward()
    assert torch.equal(out, ref)
    for a, p in zip(got, layer.parameters(), strict=True):
        assert torch.equal(a, p.grad)
