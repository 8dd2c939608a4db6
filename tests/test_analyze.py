"""Analysis statistics on inputs with known answers, the attention read-out, and the analyze CLI."""

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from mirrorla import LinearAttention, list_attentions
from mirrorla.tools.analyze import (
    analyze_model,
    attention_matrices,
    effective_rank,
    energy_retention,
    row_entropy,
    zeroed_fraction,
)


def test_retention_of_nonnegative_input_is_one():
    x = torch.rand(100, 8)
    assert energy_retention(x, F.relu(x)) == pytest.approx(1.0)
    assert zeroed_fraction(F.relu(x)) == 0.0


def test_retention_of_a_symmetric_cloud_under_relu_is_half():
    x = torch.randn(500, 6)
    cloud = torch.cat([x, -x])  # every point with its mirror image
    assert energy_retention(cloud, F.relu(cloud)) == pytest.approx(0.5, abs=1e-12)
    assert zeroed_fraction(F.relu(cloud)) == pytest.approx(0.5, abs=1e-12)


def test_effective_rank_known_values():
    u, v = torch.randn(30, 1, dtype=torch.float64), torch.randn(1, 20, dtype=torch.float64)
    assert effective_rank(u @ v).item() == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.eye(7)).item() == pytest.approx(7.0, abs=1e-9)
    two = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert effective_rank(two).item() == pytest.approx(2.0, abs=1e-9)


def test_row_entropy_known_values():
    uniform = torch.full((3, 16), 1 / 16)
    torch.testing.assert_close(row_entropy(uniform), torch.full((3,), math.log(16), dtype=torch.float64))
    one_hot = torch.eye(5)
    torch.testing.assert_close(row_entropy(one_hot), torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("attn", list_attentions())
def test_attention_readout_times_v_is_the_layer_output(attn):
    layer = LinearAttention(32, 2, attn=attn).double()
    x = torch.randn(2, 25, 32, dtype=torch.float64)
    q, k, v = layer.project(x, fold=False)
    attns, out = attention_matrices(layer, q, k, v)
    # the read-out reproduces the stream outputs ...
    halves = v.chunk(len(attns), dim=-1)
    torch.testing.assert_close(torch.cat([a @ h for a, h in zip(attns, halves, strict=True)], -1), out)
    # ... which are what the layer computes on its fast path
    if layer.feature_map is None:
        fast = F.scaled_dot_product_attention(q, k, v)
    else:
        qf, kf, vf = layer.project(x)
        fast = layer.feature_map.attend(qf, kf, vf, eps=layer.eps,
                                        **({"folded": True} if layer.fold_feature_map else {}))
    torch.testing.assert_close(out, fast, rtol=1e-8, atol=1e-8)
    for a in attns:
        assert (a >= -1e-12).all()
        rows = a.sum(-1)  # A·1 / (A·1 + eps): 1 up to the normaliser's eps
        assert (rows <= 1 + 1e-9).all() and (rows > 1 - 1e-3).all()


def test_analyze_model_reports_every_layer():
    torch.manual_seed(0)
    model = timm.create_model("mirrorla_pvt_nano", in_chans=1, img_size=28)
    layers = analyze_model(model, torch.randn(4, 1, 28, 28))
    assert [entry["layer"] for entry in layers] == [f"stages.{i}.blocks.0.attn" for i in range(4)]
    first = layers[0]
    assert first["tokens"] == 14 * 14
    for key in ("retention_q", "retention_k", "zeroed_q", "zeroed_k", "rank_k", "rank_attn", "attn_entropy"):
        assert math.isfinite(first[key]), key
    assert 0 <= first["zeroed_k"] <= 1 and 1 <= first["rank_k"] <= first["feature_dim"]
    assert {"mean", "std", "median"} <= set(first["theta"]) and "delta_alpha" in first


def test_analyze_cli_and_compare_columns(tmp_path):
    from mirrorla.tools.cli import main
    from mirrorla.tools.compare import compare
    from mirrorla.tools.train import TrainConfig

    base = TrainConfig(model="mirrorla_pvt_nano", data="digits", epochs=1, batch_size=64, train_subset=128,
                       progress=False)
    results = compare(base, ["softmax", "relu", "mirror"], [0], tmp_path / "cmp", analyze=True)
    for r in results:
        if r["attn"] != "softmax":
            assert 0 < r["retention_k"] and r["rank_k"] >= 1
        assert "attn_entropy" in r
    assert "retention_k" in (tmp_path / "cmp" / "results.md").read_text()
    assert main(["analyze", "--checkpoint", str(tmp_path / "cmp"), "--num-images", "8",
                 "--out", str(tmp_path / "an")]) == 0
    report = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert set(report["analysis"]) == {"softmax", "relu", "mirror"}
    for name in ("layers.png", "attention_maps.png", "analysis.md"):
        assert (tmp_path / "an" / name).stat().st_size > 500
