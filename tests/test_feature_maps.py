"""Feature maps: the mirror map's invariants, the registry, gradients and the paper's retention claim."""

import math

import pytest
import torch
import torch.nn.functional as F

from mirrorla import create_feature_map, list_feature_maps
from mirrorla.feature_maps import DELTA_FORMS, MirrorFeatureMap

H, D = 3, 8


def qk(b=2, n=20, h=H, d=D, dtype=torch.float64):
    return torch.randn(b, h, n, d, dtype=dtype), torch.randn(b, h, n, d, dtype=dtype)


def mirror_with_active_modulation(**kwargs) -> MirrorFeatureMap:
    fmap = MirrorFeatureMap(H, D, **kwargs).double()
    if fmap.gamma is not None:
        with torch.no_grad():
            fmap.gamma.normal_(std=0.5)  # γ is zero-initialised; make Δα matter
    return fmap


@pytest.mark.parametrize("pairing", ["adjacent", "half"])
@pytest.mark.parametrize("delta_form", sorted(DELTA_FORMS))
def test_mirror_preserves_inner_products_before_relu(pairing, delta_form):
    fmap = mirror_with_active_modulation(pairing=pairing, delta_form=delta_form)
    q, k = qk()
    k[1] *= 3.0  # a second sample with other statistics, so its angles differ
    qr, kr = fmap.reflect(q, k)
    # ⟨q_i, k_j⟩ over the whole token vector (all C = H·d channels), for every pair of tokens of a sample
    gram = lambda a, b: torch.einsum("bhnd,bhmd->bnm", a, b)  # noqa: E731
    torch.testing.assert_close(gram(qr, kr), gram(q, k), rtol=1e-10, atol=1e-10)
    # q·q and k·k too: one orthogonal map per sample, shared by q and k
    torch.testing.assert_close(gram(qr, qr), gram(q, q), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kr.pow(2).sum((1, 3)), k.pow(2).sum((1, 3)))
    # the modulation is really active: angles differ between the two samples
    from mirrorla.ops import cross_head_reflect

    theta = fmap.angles(cross_head_reflect(k, fmap.u))
    assert theta.shape == (2, H, 1, D // 2)
    assert (theta[0] - theta[1]).abs().max() > 1e-3


def test_mirror_without_cross_head_preserves_per_head_inner_products():
    fmap = mirror_with_active_modulation(cross_head=False)
    q, k = qk()
    qr, kr = fmap.reflect(q, k)
    assert (qr - q).abs().max() > 0.1  # it does move the features
    torch.testing.assert_close(qr @ kr.transpose(-2, -1), q @ k.transpose(-2, -1), rtol=1e-10, atol=1e-10)


def test_mirror_with_every_component_off_is_relu():
    fmap = MirrorFeatureMap(H, D, block=False, variance=False, cross_head=False)
    q, k = qk(dtype=torch.float32)
    fq, fk = fmap(q, k)
    torch.testing.assert_close(fq, F.relu(q), rtol=0, atol=0)
    torch.testing.assert_close(fk, F.relu(k), rtol=0, atol=0)
    assert sum(p.numel() for p in fmap.parameters()) == 0


def test_mirror_parameter_counts_match_spec():
    c = H * D
    full = MirrorFeatureMap(H, D)
    assert full.u.shape == (c,) and full.theta.shape == (H, D // 2) and full.gamma.shape == (H, D // 2)
    assert sum(p.numel() for p in full.parameters()) == c + c // 2 + c // 2
    assert torch.all(full.gamma == 0)
    assert torch.all((full.theta >= 0) & (full.theta < math.pi))


def test_gradients_reach_theta_u_gamma():
    fmap = MirrorFeatureMap(H, D)
    q, k = qk(dtype=torch.float32)
    v = torch.randn(2, H, 20, D)
    out = fmap.attend(q, k, v)
    (out ** 2).sum().backward()
    for name in ("theta", "u", "gamma"):
        grad = getattr(fmap, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", list_feature_maps())
def test_every_feature_map_builds_runs_and_backpropagates(name):
    fmap = create_feature_map(name, H, D)
    q = torch.randn(2, H, 16, D, requires_grad=True)
    k = torch.randn(2, H, 16, D, requires_grad=True)
    v = torch.randn(2, H, 16, D)
    fq, fk = fmap(q, k)
    assert (fq >= 0).all() and (fk >= 0).all(), "linear attention needs non-negative features"
    out = fmap.attend(q, k, v)
    assert out.shape == v.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    for pname, p in fmap.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # the N×N read-out path gives the same output
    ref, attns = fmap.attend(q.detach(), k.detach(), v, return_attn=True)
    torch.testing.assert_close(ref, out.detach(), rtol=1e-4, atol=1e-5)
    for attn in attns:
        assert attn.shape == (2, H, 16, 16)


def test_focused_map_keeps_token_norm():
    fmap = create_feature_map("focused", H, D)
    q, k = qk(dtype=torch.float32)
    fq, _ = fmap(q, k)
    pre = (F.relu(q) + 1e-6) / F.softplus(torch.zeros(()))
    torch.testing.assert_close(fq.norm(dim=(1, 3)), pre.norm(dim=(1, 3)), rtol=1e-5, atol=1e-6)


def test_polarity_same_and_opposite_sign_streams():
    fmap = create_feature_map("polarity", H, D)
    q, k = qk(dtype=torch.float32)
    v = torch.randn(2, H, 20, D)
    out = fmap.attend(q, k, v)
    scale = F.softplus(torch.zeros(()))
    pos = lambda x: F.relu(x / scale) ** 3  # noqa: E731  π = 1 + 4·sigmoid(0) = 3
    neg = lambda x: F.relu(-x / scale) ** 3  # noqa: E731
    from mirrorla.ops import linear_attention

    phi_k = torch.cat([pos(k), neg(k)], -1)
    same = linear_attention(torch.cat([pos(q), neg(q)], -1), phi_k, v[..., : D // 2])
    opp = linear_attention(torch.cat([neg(q), pos(q)], -1), phi_k, v[..., D // 2:])
    torch.testing.assert_close(out, torch.cat([same, opp], -1), rtol=1e-5, atol=1e-6)


def test_registry_errors_name_the_known_maps():
    with pytest.raises(ValueError, match="known feature maps: .*mirror.*relu"):
        create_feature_map("softmaxx", H, D)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"head_dim": 7}, "head_dim must be even"),
        ({"variance": True, "block": False}, "needs block=True"),
        ({"pairing": "diag"}, "pairing must be one of"),
        ({"delta_form": "cubic"}, "delta_form must be one of"),
        ({"theta_init": "gaussian"}, "theta_init must be"),
    ],
)
def test_mirror_rejects_bad_options(kwargs, match):
    args = {"num_heads": H, "head_dim": D, **kwargs}
    with pytest.raises(ValueError, match=match):
        MirrorFeatureMap(**args)


def test_feature_map_rejects_wrong_head_layout():
    fmap = create_feature_map("mirror", H, D)
    with pytest.raises(ValueError, match=r"q must have shape \[B, H=3, N, d=8\]"):
        fmap(torch.randn(2, 4, 5, D), torch.randn(2, 4, 5, D))


def energy_retention(x: torch.Tensor, phi: torch.Tensor) -> float:
    return (phi.pow(2).sum() / x.pow(2).sum()).item()


def test_learned_reflection_rescues_negative_quadrant_energy():
    """The paper's claim in 2-D: ReLU keeps almost nothing of a cloud in the third quadrant; a learned
    reflection angle turns it into the non-negative quadrant and keeps most of its energy."""
    g = torch.Generator().manual_seed(0)
    centre = torch.tensor([-2.0, -1.5])
    cloud = centre + 0.6 * torch.randn(512, 2, generator=g)
    assert (cloud < 0).all(dim=1).float().mean() > 0.9  # mostly in the negative quadrant
    x = cloud.view(1, 1, 512, 2)
    relu_retention = energy_retention(x, F.relu(x))

    fmap = MirrorFeatureMap(1, 2, variance=False, cross_head=False, theta_init=0.0)
    opt = torch.optim.Adam([fmap.theta], lr=0.05)
    for _ in range(200):
        phi, _ = fmap(x, x)
        loss = -phi.pow(2).sum() / x.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        phi, _ = fmap(x, x)
    learned_retention = energy_retention(x, phi)
    assert relu_retention < 0.05
    assert learned_retention > 0.9, (relu_retention, learned_retention)


# ---- the study's options: σ² scope, γ init, learning-rate multiplier ----------------------------------------


def _folded_equals_plain(fmap, q, k):
    """The folded path (projections folded, per-sample step per token) equals the plain map."""
    from mirrorla import LinearAttention

    layer = LinearAttention(fmap.num_heads * fmap.head_dim, fmap.num_heads, local_kernel=0)
    layer.feature_map = fmap
    x = torch.randn(2, 16, fmap.num_heads * fmap.head_dim, dtype=torch.float64)
    layer = layer.double()
    torch.testing.assert_close(layer(x), LinearAttention.forward.__get__(layer)(x))
    qp, kp, v = layer.project(x, fold=False)
    plain = fmap.attend(qp, kp, v, eps=layer.eps)
    qf, kf, _ = layer.project(x)
    torch.testing.assert_close(fmap.attend(qf, kf, v, eps=layer.eps, folded=True), plain)


def test_running_variance_is_updated_in_training_and_used_alike_in_eval():
    fmap = create_feature_map("mirror", 2, 8, variance_scope="running", running_momentum=0.5, gamma_init=0.3)
    assert torch.equal(fmap.gamma, torch.full((2, 4), 0.3)) and torch.equal(fmap.running_var, torch.ones(2, 4))
    q, k = torch.randn(3, 2, 10, 8) * 3, torch.randn(3, 2, 10, 8) * 3
    fmap.train()
    fmap(q, k)
    updated = fmap.running_var.clone()
    assert not torch.equal(updated, torch.ones(2, 4))
    from mirrorla.ops import block_variance, cross_head_reflect

    batch = block_variance(cross_head_reflect(k, fmap.u), dim=2).mean(0)
    torch.testing.assert_close(updated, 0.5 * torch.ones(2, 4) + 0.5 * batch)
    fmap.eval()
    out_eval = fmap(q, k)
    assert torch.equal(fmap.running_var, updated)  # eval reads, never writes
    angles = fmap.angles(cross_head_reflect(k, fmap.u))
    assert angles.shape == (1, 2, 1, 4)  # one Θ for every sample
    fmap.train()
    with torch.no_grad():
        fmap.running_var.copy_(updated)
    fmap.running_momentum = 1e-12  # (almost) no update: training now uses the same Θ as evaluation
    torch.testing.assert_close(fmap(q, k), out_eval)


def test_running_and_token_scopes_fold_exactly():
    for scope in ("running", "token"):
        fmap = create_feature_map("mirror", 2, 8, variance_scope=scope, gamma_init=0.5).double().eval()
        _folded_equals_plain(fmap, None, None)


def test_token_scope_gives_queries_and_keys_their_own_angles():
    fmap = create_feature_map("mirror", 1, 4, variance_scope="token", gamma_init=1.0, cross_head=False)
    q, k = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    rq, rk = fmap.reflect(q, k)
    # each token reflected by its own angle: norms kept, but q·k no longer preserved (documented)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    assert not torch.allclose(rq @ rk.transpose(-1, -2), q @ k.transpose(-1, -2))


def test_old_state_dicts_without_the_scope_still_load_and_other_scopes_are_refused():
    a = create_feature_map("mirror", 2, 8)
    legacy = dict(a.state_dict())
    legacy["map_config"] = legacy["map_config"][:5]  # saved before variance_scope existed
    create_feature_map("mirror", 2, 8).load_state_dict(legacy)
    b = create_feature_map("mirror", 2, 8, variance_scope="token")
    with pytest.raises(ValueError, match="variance_scope='sample' in the state dict but 'token' here"):
        b.load_state_dict(a.state_dict())


def test_map_lr_scale_reaches_the_optimizer_and_the_schedule(tmp_path):
    from mirrorla.tools.train import TrainConfig, _recipe, build_model

    model = build_model(TrainConfig(model="mirrorla_vit_nano_patch4"), 10, 3, 32)
    recipe = _recipe(TrainConfig(model="mirrorla_vit_nano_patch4", lr=1e-3, map_lr_scale=10.0, warmup_epochs=0),
                     model, 5, 10)
    map_params = {id(p) for n, p in model.named_parameters() if ".feature_map." in f".{n}"}
    scaled = [g for g in recipe.optimizer.param_groups if g.get("lr_scale") == 10.0]
    assert map_params and {id(p) for g in scaled for p in g["params"]} == map_params
    recipe.scheduler.step_update(1)
    lrs = {g.get("lr_scale", 1.0): g["lr"] for g in recipe.optimizer.param_groups}
    assert lrs[10.0] == pytest.approx(10 * lrs[1.0])
    assert all(g["weight_decay"] == 0.0 for g in scaled)  # angles, gains and vectors are never decayed
