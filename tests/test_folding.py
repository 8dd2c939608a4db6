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
