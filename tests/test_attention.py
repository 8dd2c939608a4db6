"""LinearAttention: shapes, grids, prefix tokens, batch independence, low precision and timm integration."""

import os
import sys
from unittest import mock

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mirrorla
from mirrorla import LinearAttention, create_feature_map, list_attentions
from mirrorla.ops import linear_attention_reference

C, HEADS = 48, 3


@pytest.mark.parametrize("attn", list_attentions())
def test_every_attention_forward_backward(attn):
    m = LinearAttention(C, HEADS, attn=attn)
    x = torch.randn(2, 1 + 6 * 4, C, requires_grad=True)
    y = m(x, grid_size=(6, 4))
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None, name


@pytest.mark.parametrize("attn", list_attentions())
def test_sample_output_does_not_depend_on_rest_of_batch(attn):
    m = LinearAttention(C, HEADS, attn=attn).eval()
    x = torch.randn(5, 65, C)
    with torch.no_grad():
        full = m(x)
        alone = m(x[2:3])
        other = m(torch.cat([x[2:3], 100 * torch.randn(3, 65, C)]))
    torch.testing.assert_close(full[2:3], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other[:1], alone, rtol=1e-5, atol=1e-5)


def test_module_equals_explicit_computation():
    """Projections, mirror map, N×N linear attention and the local term written out by hand."""
    m = LinearAttention(C, HEADS, attn="mirror", num_prefix_tokens=1).double()
    with torch.no_grad():
        m.feature_map.gamma.normal_()
    x = torch.randn(2, 1 + 5 * 3, C, dtype=torch.float64)
    b, n, _ = x.shape
    q, k, v = m.qkv(x).view(b, n, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    fq, fk = m.feature_map(q, k)
    o = linear_attention_reference(fq, fk, v).transpose(1, 2).reshape(b, n, C)
    grid = v[:, :, 1:].transpose(2, 3).reshape(b, C, 5, 3)
    local = torch.nn.functional.conv2d(grid, m.local.weight, m.local.bias, padding=2, groups=C)
    o[:, 1:] += local.flatten(2).transpose(1, 2)
    expected = m.proj(o)
    torch.testing.assert_close(m(x, grid_size=(5, 3)), expected, rtol=1e-10, atol=1e-10)


def test_local_term_skips_prefix_tokens_and_handles_non_square_grids():
    m = LinearAttention(C, HEADS, attn="relu", num_prefix_tokens=2)
    v = torch.randn(1, HEADS, 2 + 7 * 3, C // HEADS)
    local = m._local_term(v, (7, 3))
    assert local.shape == (1, 2 + 21, C)
    assert torch.all(local[:, :2] == 0)
    with pytest.raises(ValueError, match=r"grid_size \(4, 4\) with 2 prefix tokens does not match N = 23"):
        m._local_term(v, (4, 4))


def test_local_term_gives_its_convolution_a_channels_last_grid_that_cuda_runs_in_cudnn():
    """The depthwise convolution of the local term gets the grid in channels-last order, a view of v when v comes from
    the qkv projection. CUDA runs a channels-last depthwise convolution in cuDNN in every dtype; the NCHW grid of
    before took PyTorch's own depthwise kernel in bf16 (``torch._C._select_conv_backend`` on fake CUDA tensors: no
    GPU here). The values are checked against an explicit convolution above."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    qkv = torch.randn(2, 1 + 4 * 6, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    grid = LinearAttention._local_grid(qkv[2], 1, (4, 6))
    assert grid.shape == (2, C, 4, 6) and grid.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert grid.stride(1) == 1  # channels innermost

    def backend(x, w):
        return torch._C._select_conv_backend(x, w, None, [1, 1], [2, 2], [1, 1], False, [0, 0], x.shape[1], None)

    with FakeTensorMode():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            qkv = torch.empty(8, 1 + 64 * 64, 3, 3, 64, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4)
            grid = LinearAttention._local_grid(qkv[2], 1, (64, 64))
            weight = torch.empty(192, 1, 5, 5, device="cuda", dtype=dtype)
            assert backend(grid, weight) == torch._C._ConvBackend.Cudnn, dtype
            if dtype == torch.bfloat16:
                assert backend(grid.contiguous(), weight) == torch._C._ConvBackend.CudaDepthwise2d


def test_grid_inference():
    m = LinearAttention(C, HEADS, attn="relu")
    assert m.resolve_grid(196) == (0, (14, 14))
    assert m.resolve_grid(197) == (1, (14, 14))
    with pytest.raises(ValueError, match="cannot infer the token grid of N = 150"):
        m.resolve_grid(150)
    assert m.resolve_grid(150, (10, 15)) == (0, (10, 15))
    no_local = LinearAttention(C, HEADS, attn="relu", local_kernel=0)
    assert no_local(torch.randn(1, 150, C)).shape == (1, 150, C)  # any N without the local term


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attn", ["mirror", "relu", "elu", "focused", "polarity"])
def test_autocast_long_sequence_stays_finite(attn, dtype):
    m = LinearAttention(64, 2, attn=attn)
    x = 4 * torch.randn(1, 128 * 128, 64)  # N = 16,384
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        y = m(x)
    assert torch.isfinite(y).all()
    with torch.no_grad():
        ref = m(x)
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 50, "num_heads": 3}, "must be divisible by num_heads"),
        ({"dim": 48, "num_heads": 3, "attn": "cosine"}, "unknown attention 'cosine'; known: softmax"),
        ({"dim": 45, "num_heads": 3, "attn": "mirror"}, "head_dim must be even"),
        ({"dim": 48, "num_heads": 3, "local_kernel": 4}, "local_kernel must be"),
        ({"dim": 48, "num_heads": 3, "attn": "softmax", "attn_kwargs": {"block": False}}, "takes no attn_kwargs"),
        ({"dim": 48, "num_heads": 3, "eps": -1e-6}, r"eps must be a finite number >= 0, got -1e-06"),
        ({"dim": 48, "num_heads": 3, "eps": float("nan")}, "eps must be a finite number >= 0, got nan"),
        ({"dim": 48, "num_heads": 3, "attn_kwargs": {"eps": 0.0}}, "eps must be a finite number > 0, got 0.0"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearAttention(**kwargs)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword arguments: \\['heads'\\]"):
        LinearAttention(C, heads=3)


def test_forward_errors():
    m = LinearAttention(C, HEADS)
    with pytest.raises(ValueError, match=r"x must have shape \[B, N, C=48\]"):
        m(torch.randn(2, 16, 32))
    with pytest.raises(ValueError, match=r"x must have shape \[B, N, C=48\]"):
        m(torch.randn(16, C))
    with pytest.raises(ValueError, match="attn_mask/is_causal are not supported"):
        m(torch.randn(1, 16, C), is_causal=True)


def test_no_weight_decay_lists_reflection_parameters():
    assert LinearAttention(C, HEADS).no_weight_decay() == {
        "feature_map.theta", "feature_map.gamma", "feature_map.u"}
    assert LinearAttention(C, HEADS, attn_kwargs={"variance": False}).no_weight_decay() == {
        "feature_map.theta", "feature_map.u"}


@pytest.mark.parametrize("attn", ["mirror", "polarity", "softmax"])
def test_timm_vision_transformer_accepts_it_and_trains(attn, fit_batch):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4,
        attn_layer=LinearAttention.configure(attn=attn), qk_norm=True, qkv_bias=True,
    )
    assert all(isinstance(b.attn, LinearAttention) for b in model.blocks)
    losses = fit_batch(model, torch.randn(8, 3, 32, 32), torch.arange(8) % 4)
    assert losses[-1] < 0.5 * losses[0], losses


def test_gated_follows_timm_and_polarity_keeps_its_linear_gate():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    layer = LinearAttention(32, 4, attn="relu", gated=True, local_kernel=0)
    q, k, v = layer.project(x)
    o = layer.feature_map.attend(q, k, v, eps=layer.eps).transpose(1, 2).reshape(2, 16, 32)
    torch.testing.assert_close(layer(x), layer.proj(o * torch.sigmoid(layer.gate(x))))
    polarity = LinearAttention(32, 4, attn="polarity", local_kernel=0)
    q, k, v = polarity.project(x)
    o = polarity.feature_map.attend(q, k, v, eps=polarity.eps).transpose(1, 2).reshape(2, 16, 32)
    torch.testing.assert_close(polarity(x), polarity.proj(o * polarity.gate(x)))


def test_attn_head_dim_must_agree():
    LinearAttention(32, 4, attn_head_dim=8)
    with pytest.raises(ValueError, match="attn_head_dim must be None or dim / num_heads = 8"):
        LinearAttention(32, 4, attn_head_dim=16)


_PACKAGE_DIR = os.path.dirname(mirrorla.__file__) + os.sep  # the library's files (a checkout may be named mirrorla)


class _HostSyncs(TorchDispatchMode):
    """Records what would make the host wait for a GPU: operators that read a value back (``.item()``, ``bool()``,
    ``int()``, ``torch.equal``), make a tensor from host data (``torch.tensor(..., device="cuda")`` copies it and
    waits) or have a value-dependent size; and the library's own calls of ``Tensor.tolist``, ``numpy`` and ``cpu``,
    which dispatch no operator on a CPU tensor. On the CPU none of these costs anything, so only this shows them.
    ``x[i] = number`` also shows as ``lift_fresh`` though a GPU does not wait for it: the check errs strict."""

    SYNCING = ("aten::_local_scalar_dense", "aten::lift_fresh", "aten::equal", "aten::nonzero", "aten::masked_select",
               "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave")
    METHODS = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self._patches = [mock.patch.object(torch.Tensor, name, self._recorded(name)) for name in self.METHODS]

    def _recorded(self, name: str):
        original = getattr(torch.Tensor, name)

        def method(tensor, *args, **kwargs):
            # the library's own calls only: Triton's interpreter reads CPU tensors through numpy, a GPU never does
            if sys._getframe(1).f_code.co_filename.startswith(_PACKAGE_DIR):
                self.found.append(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)

        return method

    def __enter__(self):
        for patch in self._patches:
            patch.start()
        return super().__enter__()

    def __exit__(self, *exc):
        for patch in self._patches:
            patch.stop()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.found.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_the_host_sync_recorder_sees_reads_and_host_data():
    """The check below is only as good as its lists: this fails if torch renames the operators."""
    tolist = torch.Tensor.tolist
    fmap = create_feature_map("mirror", 2, 32)
    with _HostSyncs() as syncs:
        x = torch.tensor([1.0, -2.0])
        bool(x.sum() > 0)
        torch.equal(x, x)
        x.nonzero()
        x.tolist()  # not the library's call: not recorded
        fmap._decode_config(fmap._config_code())  # the library's: reads a checkpoint's config code with tolist
    assert syncs.found == ["aten::lift_fresh", "aten::_local_scalar_dense", "aten::equal", "aten::nonzero",
                           "aten::lift_fresh", "Tensor.tolist"]
    assert torch.Tensor.tolist is tolist  # restored


MIRROR_CONFIGS = [{}, {"pairing": "half"}, {"variance_scope": "running"}, {"variance_scope": "token"},
                  {"delta_form": "rsqrt", "cross_head": False}, {"variance": False},
                  {"variance": False, "block": False}, {"variance": False, "pairing": "half"}]
SYNC_CASES = ([("mirror", kw) for kw in MIRROR_CONFIGS]
              + [(attn, {}) for attn in list_attentions() if attn != "mirror"])
# On the Triton backend: MirrorLA's configurations and relu. Softmax runs no Triton kernel; the other maps run in
# torch, then the same fused core as relu (with its map off): only the interpreter's time would differ.
SYNC_RUNS = ([(attn, kw, "torch") for attn, kw in SYNC_CASES]
             + [(attn, kw, "triton") for attn, kw in SYNC_CASES if attn in ("mirror", "relu")])
SYNC_IDS = [f"{attn}-{','.join(f'{k}={v}' for k, v in kw.items()) or 'default'}-{backend}"
            for attn, kw, backend in SYNC_RUNS]


@pytest.mark.parametrize("attn, kwargs, backend", SYNC_RUNS, ids=SYNC_IDS)
def test_a_training_and_an_inference_step_never_wait_for_the_gpu(attn, kwargs, backend, monkeypatch):
    """No host syncs in a layer's step, on every path a GPU takes (the Triton kernels, and the torch reference
    that MIRRORLA_BACKEND=torch and configurations the kernels do not take run): a sync stalls the launch queue,
    and a CUDA graph cannot capture it."""
    if backend == "triton":
        pytest.importorskip("mirrorla.ops.triton_linear_attention")
    monkeypatch.setenv("MIRRORLA_BACKEND", backend)
    layer = LinearAttention(64, 2, attn=attn, attn_kwargs=kwargs)
    x = torch.randn(2, 17, 64, requires_grad=True)
    layer(x).sum().backward()  # first calls may build caches
    layer.eval()(x)
    with _HostSyncs() as syncs:
        layer.train()(x).sum().backward()
        layer.eval()
        with torch.no_grad():
            layer(x)
            layer(x)  # the cached fold
    assert syncs.found == []


@pytest.mark.parametrize("name, kwargs", [("mirrorla_deit_tiny_patch16_224", {"depth": 2}), ("mirrorla_pvt_nano", {}),
                                          ("mirrorla_pvt_v2_b0", {}), ("mirrorla_swin_tiny_all_linear", {})],
                         ids=["deit", "pvt", "pvt_v2", "swin"])
def test_a_whole_model_step_never_waits_for_the_gpu(name, kwargs, monkeypatch):
    """Each model family's own code (patch embedding, positions, stages, head) around the layers above; on the torch
    path, as the layers' Triton paths are checked above."""
    monkeypatch.setenv("MIRRORLA_BACKEND", "torch")
    model = timm.create_model(name, img_size=64, num_classes=4, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    with _HostSyncs() as syncs:
        model(x).sum().backward()
        with torch.no_grad():
            model.eval()(x)
    assert syncs.found == []


def test_a_mirror_layer_step_dispatches_few_operators_more_than_relu_under_autocast(benchmark_script, monkeypatch):
    """An eager training step on a GPU is bound by the host: every operator a layer dispatches costs host time
    (``benchmarks/gpu_profile.py``). ``benchmarks/host_cost.py`` counts them with the Triton kernels stubbed
    (interpreter). Under bf16 autocast a MirrorLA layer's training step dispatches 7 operators more than ReLU's (the
    fold writes autocast's dtype, so the projection casts neither the folded weight nor the bias, forward or
    backward; before, 23 more), and its cached inference forward fewer than ReLU's. (The launches per step are
    ``test_a_short_sequence_layer_step_launches_few_kernels``'s.)"""
    monkeypatch.setenv("MIRRORLA_BACKEND", "triton")
    host_cost = benchmark_script("host_cost")
    rows = {r["attn"]: r for r in host_cost.measure(["relu", "mirror"], tokens=17, batch=1, dim=192, heads=3,
                                                    steps=1, repeats=1)}
    relu, mirror = rows["relu"], rows["mirror"]
    assert len(mirror["train_launches"]) == 4 and mirror["infer_launches"] == {"_row_forward_kernel": 1}
    assert mirror["train_ops"] - relu["train_ops"] <= 7
    assert mirror["infer_ops"] <= relu["infer_ops"]
    # the stub is gone after the measurement: the interpreter runs kernels again
    from triton.runtime.interpreter import InterpretedFunction

    assert InterpretedFunction.run.__name__ == "run"
