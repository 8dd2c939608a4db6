"""The model zoo: every registered model builds, runs and trains; sizes match the published ones."""

import copy
import re

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mirrorla
from mirrorla import LinearAttention
from mirrorla.models import attention_counts, list_models

MODELS = list_models()
SMALL = {name: (32 if "nano" in name else 64) for name in MODELS}


def test_registry_has_the_promised_models():
    expected = {
        *(f"mirrorla_deit_{s}_patch16_224" for s in ("tiny", "small", "base")),
        *(f"mirrorla_pvt_{s}" for s in ("tiny", "small", "medium", "large", "nano")),
        *(f"mirrorla_swin_{s}_patch4_window7_224" for s in ("tiny", "small", "base")),
        "mirrorla_swin_tiny_all_linear", "mirrorla_vit_nano_patch4",
        *(f"mirrorla_pvt_v2_b{i}" for i in range(3)),
    }
    assert expected <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_model_builds_runs_backward_and_takes_a_second_resolution(name):
    size = SMALL[name]
    model = timm.create_model(name, num_classes=3, img_size=size)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        other = model(torch.randn(1, 3, size + size // 2, size))  # non-square, larger
    assert other.shape == (1, 3) and torch.isfinite(other).all()
    nwd = model.no_weight_decay()
    named = dict(model.named_parameters())
    reflection = {n for n in named if re.search(r"feature_map\.(theta|gamma|u)$", n)}
    assert reflection and reflection <= set(nwd)
    assert set(nwd) <= set(named) | {"cls_token", "pos_embed", "reg_token", "dist_token"}


@pytest.mark.parametrize("attn", ["relu", "elu", "focused", "polarity", "softmax"])
def test_models_take_every_attention(attn):
    for name in ("mirrorla_vit_nano_patch4", "mirrorla_pvt_nano"):
        model = timm.create_model(name, attn=attn, in_chans=1, img_size=28)
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        counts = attention_counts(model)
        assert counts["linear"] == (0 if attn == "softmax" else counts["total"])


def test_attn_kwargs_reach_the_feature_maps():
    model = timm.create_model("mirrorla_vit_nano_patch4", attn_kwargs={"variance": False, "pairing": "half"})
    fmaps = [m.feature_map for m in model.modules() if isinstance(m, LinearAttention)]
    assert fmaps and all(not f.variance and f.pairing == "half" and f.gamma is None for f in fmaps)


PUBLISHED_PARAMS_M = {
    "mirrorla_deit_tiny_patch16_224": 5.7,
    "mirrorla_deit_small_patch16_224": 22.0,
    "mirrorla_pvt_tiny": 13.2,
    "mirrorla_pvt_small": 24.5,
    "mirrorla_swin_tiny_patch4_window7_224": 28.0,
    "mirrorla_pvt_v2_b0": 3.7,
}

# Parameters of the softmax model that the linear version drops: spatial reduction (PVT v1 and v2) and
# the relative position bias of Swin's globally attended stages 1–2.
DROPPED_BY_LINEAR = re.compile(r"attn\.(sr|sr_norm|norm)\.|layers\.[01]\..*relative_position_bias_table")


def _count(model, pattern=None):
    return sum(p.numel() for n, p in model.named_parameters() if pattern is None or re.search(pattern, n))


@pytest.mark.parametrize("name,published", sorted(PUBLISHED_PARAMS_M.items()))
def test_softmax_sizes_match_published_and_mirror_adds_only_its_parts(name, published):
    softmax = timm.create_model(name, attn="softmax")
    mirror = timm.create_model(name, attn="mirror")
    assert abs(_count(softmax) / 1e6 - published) / published < 0.03
    added = _count(mirror, r"\.local\.|\.feature_map\.")
    dropped = sum(p.numel() for n, p in softmax.named_parameters() if DROPPED_BY_LINEAR.search(n))
    assert _count(mirror) == _count(softmax) - dropped + added
    assert added < 0.02 * _count(softmax)


def test_forward_intermediates_shapes():
    x = torch.randn(2, 3, 64, 64)
    pvt = timm.create_model("mirrorla_pvt_tiny", img_size=64)
    final, feats = pvt.forward_intermediates(x)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 320, 4, 4), (2, 512, 2, 2)]
    assert final.shape == (2, 4, 512)
    assert [i["reduction"] for i in pvt.feature_info] == [4, 8, 16, 32]
    only = pvt.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [tuple(f.shape) for f in only] == [(2, 320, 4, 4), (2, 512, 2, 2)]
    backbone = timm.create_model("mirrorla_pvt_tiny", img_size=64, features_only=True, out_indices=(1, 3))
    assert [tuple(f.shape) for f in backbone(x)] == [(2, 128, 8, 8), (2, 512, 2, 2)]
    deit = timm.create_model("mirrorla_deit_tiny_patch16_224", img_size=64)
    feats = deit.forward_intermediates(x, indices=3, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 192, 4, 4)] * 3
    swin = timm.create_model("mirrorla_swin_tiny_patch4_window7_224", features_only=True, img_size=224)
    assert [tuple(f.shape) for f in swin(torch.randn(1, 3, 224, 224))] == [
        (1, 56, 56, 96), (1, 28, 28, 192), (1, 14, 14, 384), (1, 7, 7, 768)]


class _OperatorCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attn, shifted", [("mirror", 3), ("softmax", 5)])
def test_swin_shifted_window_masks_are_built_once_at_the_configured_size(attn, shifted):
    """timm builds a shifted block's mask in every forward when any image size is allowed; here the configured size
    reads a buffer (about 25 operators fewer per shifted block and step). Outputs equal timm's per-forward masks,
    at the configured 224² and at 96², where the masks are still built per forward."""
    model = timm.create_model("mirrorla_swin_tiny_patch4_window7_224", num_classes=3, attn=attn).eval()
    per_forward = copy.deepcopy(model)
    kept = [m for m in per_forward.modules() if getattr(m, "static_attn_mask", None) is not None]
    assert len(kept) == shifted  # every shifted block of the windowed stages (stage 4 is one window: no shift)
    for block in kept:
        block.static_attn_mask = None
    for size, fewer in ((224, 20 * shifted), (96, 0)):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad(), _OperatorCount() as ops:
            out = model(x)
        with torch.no_grad(), _OperatorCount() as ops_per_forward:
            expected = per_forward(x)
        assert torch.equal(out, expected), size
        assert (ops_per_forward.count - ops.count >= fewer) if fewer else ops.count == ops_per_forward.count, (
            size, ops.count, ops_per_forward.count)


def test_timm_model_surface():
    model = timm.create_model("mirrorla_pvt_nano")
    model.set_grad_checkpointing(True)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert model.forward_head(model.forward_features(torch.randn(1, 3, 32, 32)), pre_logits=True).shape == (1, 160)
    assert model.pretrained_cfg["architecture"] == "mirrorla_pvt_nano"
    with pytest.raises(ValueError, match="no pretrained weights are published"):
        timm.create_model("mirrorla_pvt_nano", pretrained=True)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        timm.create_model("mirrorla_pvt_nano", attn="flash")


def test_mirrorize_vit_copies_weights_exactly_and_trains(fit_batch):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4, qk_norm=True)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    mirrorla.mirrorize(vit, attn="mirror", variance=False)
    after = vit.state_dict()
    for key, value in before.items():
        assert key in after, key
        assert torch.equal(after[key], value), key
    new = set(after) - set(before)
    assert new and all(re.search(r"\.attn\.(local|feature_map)\.", k) for k in new)
    assert all(isinstance(b.attn, LinearAttention) and b.attn.is_linear for b in vit.blocks)
    assert all(not b.attn.feature_map.variance for b in vit.blocks)
    losses = fit_batch(vit, torch.randn(8, 3, 32, 32), torch.arange(8) % 4)
    assert losses[-1] < 0.5 * losses[0], losses


def test_mirrorize_dynamic_vit_tracks_the_grid():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=2, dynamic_img_size=True)
    mirrorla.mirrorize(vit)
    assert vit(torch.randn(1, 3, 64, 96)).shape == (1, 2)
    assert vit.blocks[0].attn.grid_size == (4, 6)


def test_mirrorize_swin_copies_weights_of_converted_stages():
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3)
    old_block = swin.layers[0].blocks[1]
    qkv, fc1 = old_block.attn.qkv.weight.clone(), old_block.mlp.fc1.weight.clone()
    mirrorla.mirrorize(swin, stages=(0, 1))
    new_block = swin.layers[0].blocks[1]
    assert torch.equal(new_block.attn.qkv.weight, qkv) and torch.equal(new_block.mlp.fc1.weight, fc1)
    assert attention_counts(swin) == {"linear": 4, "total": 12}
    assert swin(torch.randn(1, 3, 224, 224)).shape == (1, 3)


def test_mirrorize_rejects_other_models():
    with pytest.raises(TypeError, match="supports timm VisionTransformer and SwinTransformer"):
        mirrorla.mirrorize(torch.nn.Linear(2, 2))


def test_info_counts_params_and_flops():
    from mirrorla.tools.info import model_info

    soft = model_info("mirrorla_deit_tiny_patch16_224", attn="softmax")
    mirror = model_info("mirrorla_deit_tiny_patch16_224", attn="mirror")
    assert soft["params"] == _count(timm.create_model("mirrorla_deit_tiny_patch16_224", attn="softmax"))
    assert abs(soft["gmacs"] - 1.3) / 1.3 < 0.05  # published DeiT-T: 1.3 GFLOPs (fvcore multiply-adds)
    assert mirror["gmacs"] < soft["gmacs"] and mirror["feature_map_gflops"] > 0
    assert (soft["linear_blocks"], mirror["linear_blocks"]) == (0, 12)


def test_readme_model_table_is_current():
    from pathlib import Path

    from mirrorla.tools.info import model_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for row in model_table(["mirrorla_deit_tiny_patch16_224", "mirrorla_pvt_tiny"]).splitlines()[2:]:
        assert row in readme, f"README model table is stale (run `make model-table`): missing {row}"


_SMALLEST = ["mirrorla_vit_nano_patch4", "mirrorla_pvt_nano", "mirrorla_pvt_v2_b0", "mirrorla_swin_tiny_all_linear"]


@pytest.mark.parametrize("name, attn", [(m, a) for m in mirrorla.models.list_models() for a in ("softmax", "mirror")]
                         + [(m, a) for m in _SMALLEST for a in mirrorla.list_attentions() if a not in
                            ("softmax", "mirror")])
def test_attention_layers_get_timms_init(name, attn):
    """Whatever way a family puts the attention in (attn_layer, built from scratch, swapped after timm built the
    model), its linear weights start as timm's do: truncated normal, std 0.02, zero biases."""
    model = timm.create_model(name, attn=attn, num_classes=10)
    weights, biases = [], []
    for module in model.modules():
        # this package's layer, or timm's own attention where a family keeps it for softmax (PVTv2, Swin)
        if isinstance(module, mirrorla.LinearAttention) or type(module).__name__.endswith("Attention"):
            for linear in module.children():
                if isinstance(linear, torch.nn.Linear):
                    weights.append(linear.weight.detach().flatten())
                    if linear.bias is not None:
                        biases.append(linear.bias.detach().flatten())
    assert weights, "no attention layer found"
    w = torch.cat(weights)
    assert abs(w.std().item() - 0.02) < 1e-3, w.std()
    assert torch.quantile(w.abs()[:1_000_000], 0.999).item() < 0.08  # a truncated normal, not PyTorch's uniform
    if biases:
        assert torch.cat(biases).abs().max().item() == 0.0
