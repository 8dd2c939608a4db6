"""The Triton kernels (fused feature map + linear attention, forward and backward) against the torch reference.

They run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set in conftest), so sizes are small.
Tolerances: fp32 outputs and gradients within 1e-4 (absolute, on values of order 1); bf16 inputs compared with the
reference on the same bf16 values computed in fp32, within 3e-2 (bf16 keeps 8 bits of mantissa).
"""

import warnings

import pytest
import torch
import triton

from mirrorla.backend import select_backend
from mirrorla.feature_maps import create_feature_map
from mirrorla.ops import linear_attention, token_sums_reference
from mirrorla.ops.fused import rotate_relu_reference
from mirrorla.ops.tuning import forced_tuning

triton_ops = pytest.importorskip("mirrorla.ops.triton_linear_attention")


@pytest.fixture
def backend(monkeypatch):
    def use(name: str) -> None:
        monkeypatch.setenv("MIRRORLA_BACKEND", name)

    return use


@pytest.fixture(params=["row", "chunked"])
def kernel_path(request, monkeypatch):
    """Each op on both of its kernel paths: the row kernels (one program per (b, h) row, one launch each way; the
    default for short rows) and the chunked kernels (many programs per row, partials added afterwards)."""
    with forced_tuning(row_max_tiles=10**9 if request.param == "row" else 0):
        yield request.param


def _reference(q, k, v, angle, feature, pairing):
    if feature == "rotate_relu":
        q = rotate_relu_reference(q, angle.unsqueeze(2), pairing=pairing)
        k = rotate_relu_reference(k, angle.unsqueeze(2), pairing=pairing)
    elif feature == "relu":
        q, k = q.relu(), k.relu()
    return linear_attention(q.float(), k.float(), v.float())


def _strided_qkv(b, h, n, d, dtype):
    """q, k, v as views into one [B, N, 3, H, d] tensor, as LinearAttention's qkv projection makes them."""
    qkv = torch.randn(b, n, 3, h, d).to(dtype)
    return [t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0)]


CASES = [  # (feature, pairing, N, d): every N and head dim of the issue, each map and pairing
    ("rotate_relu", "adjacent", 1, 16),
    ("rotate_relu", "half", 17, 48),
    ("rotate_relu", "adjacent", 197, 64),
    ("rotate_relu", "half", 1000, 32),
    ("rotate_relu", "adjacent", 17, 128),
    ("relu", "adjacent", 197, 48),
    ("relu", "adjacent", 1000, 16),
    ("identity", "adjacent", 17, 64),
]


@pytest.mark.parametrize("feature, pairing, n, d", CASES)
def test_fused_op_matches_reference_values_and_gradients_fp32(feature, pairing, n, d, backend, kernel_path):
    # rows of 1,000 tokens on the row kernels too (23 s of interpreter): a GPU tuned so (mirrorla tune) sends rows of
    # up to 4,096 tokens there
    b, h = 2, 2
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    angle = torch.randn(b, h, d // 2, requires_grad=True) if feature == "rotate_relu" else None
    inputs = [q, k, v] + ([angle] if angle is not None else [])
    qq, kk = (q.abs(), k.abs()) if feature == "identity" else (q, k)
    out = triton_ops.fused_linear_attention(qq, kk, v, angle, feature=feature, pairing=pairing)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    backend("torch")
    qq, kk = (q.abs(), k.abs()) if feature == "identity" else (q, k)
    ref = _reference(qq, kk, v, angle, feature, pairing)
    want = torch.autograd.grad(ref, inputs, grad)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for name, a, w in zip("q k v angle".split(), got, want, strict=False):
        torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


def _assert_triton_matches_torch(backend, calls) -> None:
    """For each ``(name, call, inputs, reference)``: the output and the gradients of ``inputs`` on the Triton
    backend equal the torch backend's (``reference()``, or ``call()`` again where it is None)."""
    for name, call, inputs, reference in calls:
        backend("triton")
        out = call()
        got = torch.autograd.grad(out.square().sum(), inputs)
        backend("torch")
        ref = reference() if reference is not None else call()
        want = torch.autograd.grad(ref.square().sum(), inputs)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=name)
        for a, w in zip(got, want, strict=True):
            torch.testing.assert_close(a, w, atol=2e-4, rtol=2e-4, msg=name)


def test_queries_and_keys_of_different_lengths(backend, kernel_path):
    """Spatial reduction (PVT) gives k and v fewer tokens than q: both ops, on both kernel paths, match the torch
    backend in values and every gradient."""
    h, d = 2, 16
    q = torch.randn(2, h, 40, d, requires_grad=True)
    k, v = (torch.randn(2, h, 9, d, requires_grad=True) for _ in range(2))
    fmap = create_feature_map("mirror", h, d)
    with torch.no_grad():
        fmap.gamma.normal_(0, 0.5)
    calls = [("relu", lambda: triton_ops.fused_linear_attention(q, k, v, feature="relu"), [q, k, v],
              lambda: _reference(q, k, v, None, "relu", "adjacent")),
             ("mirror", lambda: fmap.attend(q, k, v, folded=True), [q, k, v, fmap.theta, fmap.gamma], None)]
    _assert_triton_matches_torch(backend, calls)


def _laid_out(shape: tuple, layout: str) -> torch.Tensor:
    """A leaf tensor of ``shape`` ``[B, H, N, w]`` in one of the memory layouts callers hand the ops: ``bnhd`` (heads
    inside tokens, as a projection's output), ``channels`` (every other channel: a channel stride of 2) or ``offset``
    (a view that starts 7 elements into its storage, so no 16-byte alignment)."""
    b, h, n, w = shape
    if layout == "bnhd":
        x = torch.randn(b, n, h, w).transpose(1, 2)
    elif layout == "channels":
        x = torch.randn(b, h, n, 2 * w)[..., ::2]
    else:
        x = torch.randn(b * h * n * w + 7)[7:].view(shape)
    return x.detach().requires_grad_()


ODD_CASES = [  # (op, pairing, Nq, N, d, dv, layouts of q, k, v): widths off the kernels' blocks, odd layouts
    ("rotate_relu", "half", 17, 130, 40, 100, ("channels", "offset", "bnhd")),
    ("relu", "adjacent", 64, 65, 5, 7, ("offset", "bnhd", "channels")),
    ("mirror", "adjacent", 129, 129, 6, 6, ("bnhd", "channels", "channels")),
    ("mirror", "half", 65, 65, 10, 10, ("channels", "offset", "bnhd")),
]


@pytest.mark.parametrize("op, pairing, nq, n, d, dv, layouts", ODD_CASES)
def test_odd_widths_and_layouts_match_the_reference(op, pairing, nq, n, d, dv, layouts, backend, kernel_path):
    """Head widths that are not multiples of 16 (masked lanes; half pairs across a partial block), a value width
    unlike the key width, channel strides of 2 and unaligned storage: values and every gradient as the torch
    backend's, on both kernel paths."""
    b, h = 2, 2
    q = _laid_out((b, h, nq, d), layouts[0])
    k = _laid_out((b, h, n, d), layouts[1])
    v = _laid_out((b, h, n, dv), layouts[2])
    if op == "mirror":
        fmap = create_feature_map("mirror", h, d, pairing=pairing)
        with torch.no_grad():
            fmap.gamma.normal_(0, 0.5)
        calls = [(op, lambda: fmap.attend(q, k, v, folded=True), [q, k, v, fmap.theta, fmap.gamma], None)]
    else:
        angle = torch.randn(b, h, d // 2, requires_grad=True) if op == "rotate_relu" else None
        inputs = [q, k, v] + ([angle] if angle is not None else [])
        calls = [(op, lambda: triton_ops.fused_linear_attention(q, k, v, angle, feature=op, pairing=pairing), inputs,
                  lambda: _reference(q, k, v, angle, op, pairing))]
    _assert_triton_matches_torch(backend, calls)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("op", ["mirror", "rotate_relu", "relu", "identity"])
def test_eps_zero_keeps_gradients_finite_when_the_tokens_do_not_fill_a_tile(op, backend, kernel_path):
    """eps = 0: the padded tokens of the last tile have a zero normaliser. Their 1/den was inf, and 0·inf = NaN
    reached dS, so every gradient but dq was NaN whenever N was not a multiple of the tile (the torch backend's are
    finite). Now values and every gradient match it."""
    b, h, n, d = 2, 2, 17, 16
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    if op == "mirror":
        fmap = create_feature_map("mirror", h, d)
        with torch.no_grad():
            fmap.gamma.normal_(0, 0.5)
        calls = [(op, lambda: fmap.attend(q, k, v, eps=0.0, folded=True), [q, k, v, fmap.theta, fmap.gamma], None)]
    else:
        angle = torch.randn(b, h, d // 2, requires_grad=True) if op == "rotate_relu" else None
        inputs = [q, k, v] + ([angle] if angle is not None else [])

        def call():
            qq, kk = (q.abs(), k.abs()) if op == "identity" else (q, k)
            return triton_ops.fused_linear_attention(qq, kk, v, angle, feature=op, eps=0.0)

        def reference():
            qq, kk = (q.abs(), k.abs()) if op == "identity" else (q, k)
            if op == "rotate_relu":
                qq, kk = (rotate_relu_reference(x, angle.unsqueeze(2), pairing="adjacent") for x in (qq, kk))
            elif op == "relu":
                qq, kk = qq.relu(), kk.relu()
            return linear_attention(qq, kk, v, eps=0.0)

        calls = [(op, call, inputs, reference)]
    _assert_triton_matches_torch(backend, calls)


def test_the_mirror_op_rejects_a_bad_eps_before_any_launch():
    q = k = v = torch.randn(1, 2, 5, 4)
    theta = gamma = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="map_eps must be a finite number > 0, got 0.0"):
        triton_ops.mirror_linear_attention(q, k, v, theta, gamma, map_eps=0.0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        triton_ops.mirror_linear_attention(q, k, v, theta, gamma, eps=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_op_half_precision_strided_inputs(dtype, backend, kernel_path):
    b, h, n, d = 2, 3, 197, 32
    q, k, v = _strided_qkv(b, h, n, d, dtype)
    assert not q.is_contiguous()
    angle = torch.randn(1, h, d // 2, requires_grad=True)  # one angle set shared by the batch
    out = triton_ops.fused_linear_attention(q, k, v, angle, feature="rotate_relu", pairing="adjacent")
    assert out.dtype == dtype and torch.isfinite(out).all()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v, angle], grad)
    backend("torch")
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _reference(q32, k32, v32, angle, "rotate_relu", "adjacent")
    want = torch.autograd.grad(ref, [q32, k32, v32, angle], grad.float())
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for a, w in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), w, atol=3e-2 * max(1.0, w.abs().max().item()), rtol=3e-2)


def test_token_sums_kernel_and_its_gradient():
    x = torch.randn(2, 3, 1000, 48, requires_grad=True)
    got = triton_ops.token_sums_triton(x)
    want = token_sums_reference(x)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


@pytest.mark.parametrize("delta_form, pairing", [("tanh_log", "adjacent"), ("log", "half"), ("rsqrt", "adjacent")])
def test_mirror_map_on_triton_matches_torch_in_values_and_every_gradient(delta_form, pairing, backend, kernel_path):
    """The whole folded MirrorLA step (σ² → Θ → rotation → ReLU → attention) through the Triton backend: outputs
    and the gradients of q, k, v, θ and γ equal the reference's (the σ² path reaches k and γ)."""
    h, d, n = 2, 16, 197
    fmap = create_feature_map("mirror", h, d, delta_form=delta_form, pairing=pairing).double().float()
    with torch.no_grad():
        fmap.gamma.normal_(0, 0.5)  # γ starts at 0; make the variance path matter
    q, k, v = (torch.randn(2, h, n, d, requires_grad=True) for _ in range(3))
    params = [q, k, v, fmap.theta, fmap.gamma]
    results = {}
    for name in ("triton", "torch"):
        backend(name)
        assert select_backend(q, k, v) == name
        out = fmap.attend(q, k, v, folded=True)
        results[name] = (out, torch.autograd.grad(out.square().sum(), params))
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-4, rtol=1e-4)
    for name, a, w in zip(("q", "k", "v", "theta", "gamma"), results["triton"][1], results["torch"][1], strict=True):
        torch.testing.assert_close(a, w, atol=2e-4, rtol=2e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mirror_op_half_precision_strided_inputs(dtype, kernel_path):
    """MirrorLA's op on bf16/fp16 views of one qkv tensor: finite, and equal to the fp32 op on the same rounded
    values (within 3e-2; σ² and the rotation are computed in fp32 either way)."""
    b, h, n, d = 2, 2, 40, 32
    q, k, v = _strided_qkv(b, h, n, d, dtype)
    theta, gamma = torch.randn(h, d // 2, requires_grad=True), (0.5 * torch.randn(h, d // 2)).requires_grad_()
    out = triton_ops.mirror_linear_attention(q, k, v, theta, gamma)
    assert out.dtype == dtype and torch.isfinite(out).all()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v, theta, gamma], grad)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = triton_ops.mirror_linear_attention(q32, k32, v32, theta, gamma)
    want = torch.autograd.grad(ref, [q32, k32, v32, theta, gamma], grad.float())
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for name, a, w in zip(("q", "k", "v", "theta", "gamma"), got, want, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.float(), w, atol=3e-2 * max(1.0, w.abs().max().item()), rtol=3e-2, msg=name)


@pytest.mark.parametrize("d", [48, 64])
def test_the_kv_pass_takes_x_from_the_rotated_keys_where_that_pays(d, chunked_kernels, monkeypatch):
    """MirrorLA's chunked k/v pass with 16-bit inputs at 64-wide tiles (adjacent pairs) rebuilds the keys for dk's σ²
    term as cos·y − ssin·y_p rather than keeping x (``_x_from_y``): the same gradients as with x kept, to bf16's
    rounding of the stored dk, and as the fp32 op's on the same rounded values."""
    assert triton_ops._x_from_y(torch.bfloat16, 64, 64) and not triton_ops._x_from_y(torch.float32, 64, 64)
    assert not triton_ops._x_from_y(torch.bfloat16, 16, 16) and not triton_ops._x_from_y(torch.bfloat16, 128, 128)
    b, h, n = 2, 2, 70
    q, k, v = _strided_qkv(b, h, n, d, torch.bfloat16)
    theta, gamma = torch.randn(h, d // 2, requires_grad=True), (0.5 * torch.randn(h, d // 2)).requires_grad_()
    grad = torch.randn(b, h, n, d).bfloat16()
    grads = {}
    for rebuild in (True, False):
        monkeypatch.setattr(triton_ops, "_x_from_y", lambda *args, rebuild=rebuild: rebuild)
        out = triton_ops.mirror_linear_attention(q, k, v, theta, gamma)
        grads[rebuild] = torch.autograd.grad(out, [q, k, v, theta, gamma], grad)
    for name, a, w in zip(("q", "k", "v", "theta", "gamma"), grads[True], grads[False], strict=True):
        torch.testing.assert_close(a.float(), w.float(), atol=1e-3 * w.abs().max().item(), rtol=8e-3, msg=name)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = triton_ops.mirror_linear_attention(q32, k32, v32, theta, gamma)
    want = torch.autograd.grad(ref, [q32, k32, v32, theta, gamma], grad.float())
    for name, a, w in zip(("q", "k", "v", "theta", "gamma"), grads[True], want, strict=True):
        torch.testing.assert_close(a.float(), w, atol=3e-2 * max(1.0, w.abs().max().item()), rtol=3e-2, msg=name)


def test_the_normaliser_sums_the_features_the_state_sums(kernel_path):
    """With bf16 inputs the state pass multiplies φ(k) rounded to bf16 into S; z must sum the same rounded values, or
    the attention weights of a query no longer add up to one. With v all ones each column of S is z: equal to
    fp32 rounding (z from the unrounded φ missed by about 1e-4 here), on both kernel paths (MirrorLA's; a given
    rotation's state pass is the same code); the moment's Σ w likewise equals its product with v."""
    b, h, n, d = 2, 2, 197, 32
    q, k, _ = (t.detach() for t in _strided_qkv(b, h, n, d, torch.bfloat16))
    ones = torch.ones(b, h, n, d, dtype=torch.bfloat16)
    theta, gamma = torch.randn(h, d // 2), 0.5 * torch.randn(h, d // 2)
    _, state, *_ = triton_ops._mirror_forward_impl(q, k, ones, theta, gamma, 0, 0, 1e-6, 1e-6, True)
    assert state.shape == (2, b * h, d, d + 1)
    features, z = state[..., :d], state[..., d:]
    torch.testing.assert_close(features[0], z[0].expand_as(features[0]), atol=0, rtol=1e-6)
    # the moment's w = [y > 0]·y_p changes sign: equal up to fp32 sums of cancelling terms
    scale = state[1].abs().max().item()
    torch.testing.assert_close(features[1], z[1].expand_as(features[1]), atol=1e-5 * scale, rtol=0)



def test_the_bf16_output_pass_keeps_the_state_to_about_16_bits(kernel_path):
    """With bf16 inputs the output pass multiplies φ(q) (bf16) by S and z split in two bf16 halves each: o must be the
    exact o rounded once to bf16, which a half of S or z alone (8 bits) misses for about half the elements (here
    ReLU, whose φ(q) and φ(k) are exact in bf16, so only the products and o's rounding remain). Triton's
    interpreter rounds fp32 to bf16 by truncation, so either rounding is accepted: 99.7% of elements match here,
    43-46% with S's second half left out."""
    b, h, n, d = 1, 2, 197, 32
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d).bfloat16() for _ in range(3))
    o, _ = triton_ops._fused_forward_impl(q, k, v, None, 1, 0, 1e-6, False)
    pq, pk = q.double().relu(), k.double().relu()
    exact = (pq @ (pk.transpose(-1, -2) @ v.double())) / (pq @ pk.sum(-2)[..., None] + 1e-6 * n)
    truncated = (exact.float().view(torch.int32) & -65536).view(torch.float32).bfloat16()
    matches = max((o == truncated).double().mean().item(), (o == exact.bfloat16()).double().mean().item())
    assert matches >= 0.99, matches


def test_the_moment_keeps_w_to_about_16_bits_with_16_bit_inputs(kernel_path):
    """The training forward's moment [Σ w vᵀ | Σ w] (w = [y > 0]·y_p in fp32) with bf16 or fp16 inputs: w enters the
    tensor cores as two halves in v's dtype, which keep about 16 bits of it (emulated at N = 300, d = 32: 3e-6 of
    the moment's largest value against fp64 with bf16 inputs; TF32 operands 2e-4; w rounded once to bf16, as φ is,
    1.6e-3). Against an fp64 reference from the same inputs, on both kernel paths."""
    b, h, n, d = 1, 2, 197, 32
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (t.detach() for t in _strided_qkv(b, h, n, d, dtype))
        angle = torch.randn(b, h, d // 2)
        _, state = triton_ops._fused_forward_impl(q, k, v, angle, 2, 0, 1e-6, True)
        x, vv, a = k.double(), v.double(), angle.double()[:, :, None, :]
        cos = a.cos().repeat_interleave(2, dim=-1)
        ssin = torch.stack([-a.sin(), a.sin()], dim=-1).flatten(-2)  # adjacent pairs: (−sin, +sin)
        partner = x.unflatten(-1, (d // 2, 2)).flip(-1).flatten(-2)
        y, y_p = cos * x + ssin * partner, cos * partner - ssin * x
        w = torch.where(y > 0, y_p, torch.zeros_like(y_p))
        want = torch.cat([w.transpose(-1, -2) @ vv, w.sum(-2)[..., None]], dim=-1).reshape(b * h, d, d + 1)
        got = state[1].double()
        assert (got - want).abs().max() <= 5e-5 * want.abs().max(), dtype


@pytest.fixture
def matmul_precision():
    """Sets ``torch.set_float32_matmul_precision`` for a test and restores it afterwards."""
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


def _record_launches(monkeypatch, names, record) -> list:
    """Wrap each kernel of ``names`` so that every launch first appends ``record(name, grid, kwargs)`` to the
    returned list, then runs."""
    calls = []
    for name in names:
        real = getattr(triton_ops, name)

        class Spy:
            def __getitem__(self, grid, name=name, real=real):
                def launch(*args, **kwargs):
                    calls.append(record(name, grid, kwargs))
                    return real[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(triton_ops, name, Spy())
    return calls



@pytest.mark.parametrize("precision, setting", [("high", "backward_blocks"), ("highest", "ieee_backward_blocks")])
@pytest.mark.parametrize("name", ["mirror", "fused rotate_relu", "fused relu"])
def test_chunked_backward_block_options_give_the_same_gradients(name, precision, setting, monkeypatch,
                                                                 matmul_precision):
    """The chunked backward's token tile can differ from the forward's (``backward_blocks`` for TF32 and half
    precision dots, ``ieee_backward_blocks`` for IEEE fp32 ones: per-GPU settings that ``mirrorla tune``
    measures): 32-token tiles over several chunks per row give the gradients of 64-token tiles."""
    matmul_precision(precision)
    q, k, v, angle, theta, gamma = _op_inputs(1, 2, 100, 16)  # 2 rows, 4 tiles of 32: 2 chunks per row
    call, inputs = {"mirror": (lambda: triton_ops.mirror_linear_attention(q, k, v, theta, gamma),
                               [q, k, v, theta, gamma]),
                    "fused rotate_relu": (lambda: triton_ops.fused_linear_attention(q, k, v, angle,
                                                                                    feature="rotate_relu"),
                                          [q, k, v, angle]),
                    "fused relu": (lambda: triton_ops.fused_linear_attention(q, k, v, feature="relu"),
                                   [q, k, v])}[name]
    # the token tile, warps and chunks of each backward launch
    tiles = _record_launches(monkeypatch, ["_backward_kv_kernel"],
                             lambda _, grid, kw: (kw["BN"], kw["num_warps"], grid[1]))
    grads = {}
    for blocks in ((64, 4), (32, 8)):
        with forced_tuning(row_max_tiles=0, **{setting: blocks}):
            grads[blocks] = torch.autograd.grad(call().square().sum(), inputs)
    assert tiles == [(64, 4, 2), (32, 8, 2)]  # 64-token tiles, then 32: two chunks per row either way
    for a, w in zip(grads[(32, 8)], grads[(64, 4)], strict=True):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["row", "chunked"])
def test_fp32_dots_follow_torchs_matmul_precision(path, monkeypatch, matmul_precision):
    """fp32 inputs: IEEE fp32 dots at torch's default matmul precision ("highest"), with the backward on the
    ``ieee_backward_blocks`` token tiles (16 × 8 warps: ptxas spills nothing there, 20–30 KB per thread with 64-token
    tiles), and so the training forward's state pass, which also sums the moment; TF32 dots where
    ``torch.set_float32_matmul_precision("high")`` allows them, as for torch's matmuls, with the backward on
    ``backward_blocks``. Half-precision inputs ignore the setting."""
    launches = _record_launches(monkeypatch, ("_row_forward_kernel", "_row_backward_kernel", "_state_kernel",
                                              "_output_kernel", "_backward_q_kernel", "_backward_kv_kernel"),
                                lambda name, _, kw: (name, kw["IEEE"], kw["BN"], kw["num_warps"]))
    q, k, v, _, theta, gamma = _op_inputs(1, 2, 70, 16)
    seen = {}
    with forced_tuning(row_max_tiles=10**9 if path == "row" else 0):
        for precision, dtype in (("highest", torch.float32), ("high", torch.float32), ("highest", torch.bfloat16)):
            matmul_precision(precision)
            inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            launches.clear()
            triton_ops.mirror_linear_attention(*inputs, theta, gamma).sum().backward()
            seen[precision, dtype] = list(launches)
    for (precision, dtype), calls in seen.items():
        ieee = precision == "highest" and dtype == torch.float32
        assert calls and all(call[1] == ieee for call in calls), (precision, dtype, calls)
        backward = [call[2:] for call in calls if "backward" in call[0]]
        assert backward and all(blocks == ((16, 8) if ieee else (64, 8 if path == "row" else 4))
                                for blocks in backward), (precision, dtype, backward)
        state_pass = [call[2:] for call in calls if call[0] in ("_row_forward_kernel", "_state_kernel")]
        assert state_pass == [(16, 8) if ieee else (64, 4)], (precision, dtype, state_pass)


def test_the_row_backward_takes_four_warps_on_an_a100_and_eight_elsewhere(monkeypatch):
    """The row backward's warps follow the GPU's compute capability (ptxas counts in _row_backward_warps): four on
    sm_80 where the tiles allow (d ≤ 64; wider heads take eight everywhere), eight elsewhere (sm_89's shared memory
    holds one program per SM), with the same gradients."""
    warps = _record_launches(monkeypatch, ["_row_backward_kernel"], lambda _, grid, kw: kw["num_warps"])
    grads = {}
    for d in (16, 128):
        q, k, v, _, theta, gamma = _op_inputs(1, 2, 9, d)
        q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v))
        for capability in ((9, 0), (8, 0), (8, 9), (10, 0)):
            monkeypatch.setattr(triton_ops, "_CPU_CAPABILITY", capability)
            grads[d, capability] = torch.autograd.grad(
                triton_ops.mirror_linear_attention(q, k, v, theta, gamma).float().square().sum(), (q, k, v, theta))
        for a, b in zip(grads[d, (8, 0)], grads[d, (9, 0)], strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)  # the interpreter: warps change no arithmetic
    assert warps == [8, 4, 8, 8, 8, 8, 8, 8]
    assert triton_ops._capability(torch.device("cpu")) == (10, 0)  # CPU tensors: the setting, as compile_check sets


def test_the_chunked_q_pass_sums_over_tokens_on_the_tensor_cores_only_where_that_pays(monkeypatch):
    """DOT_SUMS (ptxas counts in _token_sums_on_dots): compute capability 9 and up at 64-wide tiles, plain sums on
    sm_80/sm_89 and at d = 16; both forms give the same gradients (the interpreter's matmuls are fp32)."""
    flags = _record_launches(monkeypatch, ["_backward_q_kernel"], lambda _, grid, kw: kw["DOT_SUMS"])
    grads = {}
    with forced_tuning(row_max_tiles=0):
        for d in (16, 64):
            q, k, v, _, theta, gamma = _op_inputs(1, 2, 70, d)
            q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v))
            for capability in ((9, 0), (8, 9), (10, 0)):
                monkeypatch.setattr(triton_ops, "_CPU_CAPABILITY", capability)
                out = triton_ops.mirror_linear_attention(q, k, v, theta, gamma)
                grads[d, capability] = torch.autograd.grad(out.float().square().sum(), (q, k, v, theta, gamma))
    assert flags == [False, False, False, True, False, True]
    for dots, plain in zip(grads[64, (9, 0)], grads[64, (8, 9)], strict=True):
        torch.testing.assert_close(dots.float(), plain.float(), rtol=1e-2 if dots.dtype == torch.bfloat16 else 1e-4,
                                   atol=1e-5)
    for a, b in zip(grads[16, (9, 0)], grads[16, (8, 9)], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # both plain: the same arithmetic


def _qkv_far_apart(batch_stride: int, token_stride: int, b: int, n: int, h: int = 2, d: int = 16):
    """q, k, v ``[B, H, N, d]`` (bf16): views of one qkv tensor ``[B, N, 3, H, d]`` whose batch or token strides
    put elements more than 2³¹ elements from the start. Only the views' own elements are written: the OS commits
    no memory for the rest of the storage (a few KB are used of the 4 GB reserved)."""
    shape = (b, n, 3, h, d)
    strides = (batch_stride, token_stride, h * d, d, 1)
    storage = torch.empty(1 + sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True)),
                          dtype=torch.bfloat16)
    qkv = storage.as_strided(shape, strides)
    qkv.copy_(torch.randn(shape))
    return [t.requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0)]


@pytest.mark.parametrize("layout", ["rows past 2^31 elements", "tokens past 2^31 elements"])
@pytest.mark.parametrize("op", ["mirror", "relu"])
def test_inputs_with_offsets_past_2_31_elements(layout, op, kernel_path):
    """Offsets past 2³¹ elements (a qkv tensor of more than 2³¹ elements: the third row of a batch whose rows are
    2³⁰ apart; or a row of 1,030 tokens 2²¹ apart) are computed in 64 bits: 32-bit products wrapped to addresses
    before the tensor (a segfault in the interpreter, an illegal access or garbage on a GPU)."""
    torch.manual_seed(0)
    if layout == "rows past 2^31 elements":
        q, k, v = _qkv_far_apart(batch_stride=2**30 + 2**20, token_stride=3 * 2 * 16, b=3, n=17)
    else:
        q, k, v = _qkv_far_apart(batch_stride=0, token_stride=2**21, b=1, n=1030)
    theta, gamma = torch.randn(2, 8), 0.5 * torch.randn(2, 8)

    def call(q, k, v):
        if op == "mirror":
            return triton_ops.mirror_linear_attention(q, k, v, theta, gamma)
        return triton_ops.fused_linear_attention(q, k, v, feature="relu")

    out = call(q, k, v)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], grad)
    near = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]  # the same values, small offsets
    want_out = call(*near)
    want = torch.autograd.grad(want_out, near, grad)
    torch.testing.assert_close(out, want_out)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w)


@pytest.fixture
def chunked_kernels():
    """The ops on their chunked kernels, whatever the row length."""
    with forced_tuning(row_max_tiles=0):
        yield


def test_several_programs_per_row_match_the_reference(backend, chunked_kernels, monkeypatch):
    """One (b, h) row spread over several programs (here 3 for the queries' 300 tokens and 4 for the keys' 200): the
    k/v pass adds the q pass's partial d angles and the moment itself, and every program adds the σ² path to its
    own tiles of dk. MirrorLA and the rotation with a given angle match the torch backend in values and every
    gradient."""
    chunks = []
    real = triton_ops._backward_kv_kernel

    class Spy:
        def __getitem__(self, grid):
            chunks.append(grid[1])
            return real[grid]

    monkeypatch.setattr(triton_ops, "_backward_kv_kernel", Spy())
    torch.manual_seed(0)
    h, d = 1, 16
    q = torch.randn(1, h, 300, d, requires_grad=True)
    k, v = (torch.randn(1, h, 200, d, requires_grad=True) for _ in range(2))
    angle = torch.randn(1, h, d // 2, requires_grad=True)
    fmap = create_feature_map("mirror", h, d, delta_form="rsqrt")
    with torch.no_grad():
        fmap.gamma.normal_(0, 0.5)
    calls = [("mirror", lambda: fmap.attend(q, k, v, folded=True), [q, k, v, fmap.theta, fmap.gamma], None),
             ("rotate_relu", lambda: triton_ops.fused_linear_attention(q, k, v, angle, feature="rotate_relu"),
              [q, k, v, angle], lambda: _reference(q, k, v, angle, "rotate_relu", "adjacent"))]
    _assert_triton_matches_torch(backend, calls)
    assert chunks == [4, 4]  # several programs per row on the keys' side, for both ops


def test_output_pass_programs_take_chunks_of_tiles(monkeypatch, chunked_kernels):
    """The output pass gives each program a chunk of query tiles, as the other passes (the state loaded once per
    program; at most 4 programs per SM, so never past CUDA's 65,535 on the grid's second axis). Here 5 tiles of 64
    queries run on 2 programs per row (the interpreter's 4 programs over 2 rows), 3 tiles each: the second program's
    chunk holds the partial tile and runs past the last one. Relaunched with a program per tile on the same state,
    the pass writes exactly the same output."""
    q, k, v, _, theta, gamma = _op_inputs(1, 2, 300, 16)  # 5 tiles of 64 tokens
    grids, alone, real_kernel = [], [], triton_ops._output_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append((grid[1], args[8]))  # programs per row, tiles per program
                real_kernel[grid](*args, **kwargs)
                out = torch.full_like(args[4], float("nan"))
                real_kernel[(grid[0], 5)](*args[:4], out, *args[5:8], 1, *args[9:], **kwargs)
                alone.append(out)
            return launch

    monkeypatch.setattr(triton_ops, "_output_kernel", Spy())
    with torch.no_grad():
        o = triton_ops.mirror_linear_attention(q, k, v, theta, gamma)
    assert grids == [(2, 3)]
    torch.testing.assert_close(o, alone[0], rtol=0, atol=0)
    assert triton_ops._chunks(10**9, 1, torch.device("cpu"))[0] <= 65535


def test_chunked_kernels_take_rows_without_queries(chunked_kernels):
    """No queries (q [B, H, 0, d]: the public ops refuse it, the kernels' callers may not): the chunked passes launch
    a program per row that runs no tile (chunking 0 tiles divided by zero before), the output is empty and every
    gradient finite (k, v and the angles' get nothing from no queries)."""
    assert triton_ops._chunks(0, 6, torch.device("cpu")) == (1, 1)
    q, k, v, _, theta, gamma = _op_inputs(1, 2, 40, 16)
    q = q[:, :, :0].detach().requires_grad_()
    o = triton_ops.mirror_linear_attention(q, k, v, theta, gamma)
    o.sum().backward()
    assert o.shape == (1, 2, 0, 16)
    for name, t in (("k", k), ("v", v), ("theta", theta), ("gamma", gamma)):
        assert torch.isfinite(t.grad).all() and not t.grad.any(), name


def test_launchers_make_their_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: a launcher whose tensors live on another GPU of the process
    (cuda:1 while cuda:0 is current) runs with that GPU current, and with none switched when they match. Checked
    with fake CUDA tensors and a recording stand-in for ``torch.cuda.device`` (no GPU here); the two-GPU test below
    runs the ops themselves."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mirrorla.ops._launch import on_tensor_device

    switched, seen = [], []

    class Device:  # records the device the launcher switches to
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            switched.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    launcher = on_tensor_device(lambda grad, x: seen.append((grad, x.device)) or "done")
    with FakeTensorMode():
        on_1, on_0 = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0")
    assert launcher(None, on_1) == "done" and switched == [torch.device("cuda:1")]  # the first tensor decides
    assert launcher(None, on_0) == "done" and switched == [torch.device("cuda:1")]
    assert launcher(None, torch.empty(2)) == "done" and len(seen) == 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_ops_on_a_gpu_that_is_not_current():
    q, k, v = (torch.randn(2, 3, 300, 32, device="cuda:1", requires_grad=True) for _ in range(3))
    theta, gamma = torch.rand(3, 16, device="cuda:1"), torch.rand(3, 16, device="cuda:1")
    with torch.cuda.device(0):
        out = triton_ops.mirror_linear_attention(q, k, v, theta, gamma)
        grads = torch.autograd.grad(out.square().sum(), [q, k, v])
    with torch.cuda.device(1):
        want = triton_ops.mirror_linear_attention(q, k, v, theta, gamma)
        want_grads = torch.autograd.grad(want.square().sum(), [q, k, v])
    torch.testing.assert_close(out, want)
    for a, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, w)


def test_an_empty_batch(kernel_path):
    """B = 0 (an empty batch from a detection or sampling pipeline): empty outputs and gradients, zero gradients for
    θ and γ, as the torch backend gives; the chunked launchers divided by B·H before."""
    q, k, v = (torch.randn(0, 2, 100, 16, requires_grad=True) for _ in range(3))
    theta, gamma = torch.rand(2, 8, requires_grad=True), torch.rand(2, 8, requires_grad=True)
    for out, params in ((triton_ops.mirror_linear_attention(q, k, v, theta, gamma), [theta, gamma]),
                        (triton_ops.fused_linear_attention(q, k, v, feature="relu"), [])):
        assert out.shape == (0, 2, 100, 16)
        grads = torch.autograd.grad(out.sum(), [q, k, v, *params])
        assert [tuple(g.shape) for g in grads] == [(0, 2, 100, 16)] * 3 + [(2, 8)] * len(params)
        for g in grads[3:]:
            assert torch.equal(g, torch.zeros(2, 8))


def test_heads_wider_than_the_kernels_take_run_the_reference(monkeypatch):
    """Heads wider than 128 would need more shared memory than any GPU has: they run the torch reference, with one
    warning, without compiling or launching a kernel."""
    monkeypatch.setattr(triton_ops, "_WARNED_WIDTHS", set())
    launches = _count_launches(monkeypatch)
    q, k, v, _, theta, gamma = _op_inputs(1, 1, 20, 160)
    with pytest.warns(RuntimeWarning, match="heads up to 128 wide, got d = 160"):
        out = triton_ops.mirror_linear_attention(q, k, v, theta, gamma)
    grads = torch.autograd.grad(out.square().sum(), [q, k, v, theta, gamma])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per width
        relu = triton_ops.fused_linear_attention(q, k, v, feature="relu")
        relu.sum().backward()
    assert not launches
    want = triton_ops._mirror_reference(q, k, v, theta, gamma, 0, 0, 1e-6, 1e-6)
    torch.testing.assert_close(out, want)
    for a, w in zip(grads, torch.autograd.grad(want.square().sum(), [q, k, v, theta, gamma]), strict=True):
        torch.testing.assert_close(a, w)
    torch.testing.assert_close(relu, _reference(q, k, v, None, "relu", "adjacent"))

def _count_launches(monkeypatch):
    """Count the Triton kernel launches of both kernel modules, per kernel name."""
    from collections import Counter

    from mirrorla.ops import triton_reflect

    launches = Counter()

    class Counting:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launches[self.name] += 1
            return self.kernel[grid]

    for module in (triton_ops, triton_reflect):
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel") and isinstance(value, triton.runtime.KernelInterface):  # not jit helpers
                monkeypatch.setattr(module, name, Counting(value, name))
    return launches


def test_a_short_sequence_layer_step_launches_few_kernels(backend, monkeypatch):
    """At DeiT-T's sequence length (197 tokens) a layer's training step is bound by host time per launch on a GPU:
    ReLU's takes one launch forward and one backward; MirrorLA's adds only its fold (one launch each way at this
    width)."""
    from mirrorla import LinearAttention

    backend("triton")
    launches = _count_launches(monkeypatch)
    x = torch.randn(1, 197, 32)
    for attn, want in (("relu", {"_row_forward_kernel": 1, "_row_backward_kernel": 1}),
                       ("mirror", {"_row_forward_kernel": 1, "_row_backward_kernel": 1, "_fold_rows_kernel": 1,
                                   "_fold_rows_backward_kernel": 1})):
        launches.clear()
        LinearAttention(32, 2, attn=attn)(x, grid_size=(14, 14)).sum().backward()
        assert dict(launches) == want, attn


def test_while_a_cuda_graph_records_the_launchers_choose_by_device_time(backend, monkeypatch):
    """A replayed CUDA graph costs no host time per launch: while one records, the fold's backward runs a program
    per column block plus du's launch (not one program), and rows longer than the default's 8 tiles take the
    chunked kernels even where the GPU's tuning (timed with launches issued one by one) gives the row kernels
    longer rows. Same values and gradients either way."""
    from mirrorla import LinearAttention
    from mirrorla.ops import triton_reflect

    backend("triton")
    launches = _count_launches(monkeypatch)
    torch.manual_seed(0)
    layer = LinearAttention(32, 2, attn="mirror")
    x = torch.randn(1, 576, 32, requires_grad=True)  # 9 tiles of 64 tokens
    results = {}
    for capturing in (False, True):
        monkeypatch.setattr(triton_ops, "graph_capturing", lambda device, capturing=capturing: capturing)
        monkeypatch.setattr(triton_reflect, "graph_capturing", lambda device, capturing=capturing: capturing)
        launches.clear()
        with forced_tuning(row_max_tiles=64):
            out = layer(x, grid_size=(24, 24))
            results[capturing] = (out, torch.autograd.grad(out.square().sum(), [x, *layer.parameters()]))
        if capturing:
            assert "_row_forward_kernel" not in launches and launches["_state_kernel"] == 1
            assert launches["_fold_rows_backward_kernel"] == 1 and launches["_unit_grad_kernel"] == 1
        else:
            assert launches["_row_forward_kernel"] == 1 and launches["_row_backward_kernel"] == 1
            assert launches["_fold_rows_backward_kernel"] == 1 and "_unit_grad_kernel" not in launches
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-4, rtol=1e-4)
    for a, w in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(a, w, atol=2e-4, rtol=2e-4)


def test_the_row_limit_while_a_cuda_graph_records(monkeypatch):
    """_row_max_tiles: the GPU's row_max_tiles, capped at the default's 8 tiles only while a graph records."""
    for tuned in (3, 8, 64):
        with forced_tuning(row_max_tiles=tuned):
            tuning = triton_ops.kernel_tuning(torch.device("cpu"))
            for capturing, want in ((False, tuned), (True, min(tuned, 8))):
                monkeypatch.setattr(triton_ops, "graph_capturing", lambda device, capturing=capturing: capturing)
                assert triton_ops._row_max_tiles(torch.device("cpu"), tuning, 24) == want
    # on a CPU tensor nothing records: the helper asks CUDA only for CUDA tensors
    from mirrorla.ops._launch import graph_capturing

    assert graph_capturing(torch.device("cpu")) is False


def test_the_row_limit_with_fewer_rows_than_sms(monkeypatch):
    """A GPU's measured row_max_tiles applies beyond the default's 8 tiles only with at least as many (b, h) rows
    as the GPU has SMs (one program per row would leave the others idle); forced settings (tools, tests) and CPU
    tensors take the value as it is. Checked on a stand-in for a 132-SM GPU (no GPU here)."""
    from types import SimpleNamespace

    from mirrorla.ops.tuning import KernelTuning

    monkeypatch.setattr(triton_ops, "_gpu_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(triton_ops, "graph_capturing", lambda device: False)
    gpu = torch.device("cuda")
    measured = KernelTuning(row_max_tiles=64, source="a tuning file")
    for rows, want in ((1, 8), (24, 8), (131, 8), (132, 64), (1024, 64)):
        assert triton_ops._row_max_tiles(gpu, measured, rows) == want, rows
    assert triton_ops._row_max_tiles(gpu, KernelTuning(row_max_tiles=4, source="a file"), 1) == 4  # below the cap
    assert triton_ops._row_max_tiles(gpu, KernelTuning(row_max_tiles=0, source="a file"), 1) == 0  # chunked only
    with forced_tuning(row_max_tiles=64):
        assert triton_ops._row_max_tiles(gpu, triton_ops.kernel_tuning(torch.device("cpu")), 24) == 64
    assert triton_ops._row_max_tiles(torch.device("cpu"), measured, 1) == 64


def test_rows_that_need_partner_loads_take_the_chunked_kernels(monkeypatch):
    """Half pairs in a head dim that is not a power of two cannot be shuffled in registers: such rotations take the
    chunked kernels even when short, where the partner channels' rows are loaded from memory, and still match the
    torch backend in values and every gradient (MirrorLA here; the given rotation in the fp32 cases)."""
    launches = _count_launches(monkeypatch)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 48, requires_grad=True) for _ in range(3))
    theta, gamma = torch.randn(2, 24, requires_grad=True), (0.5 * torch.randn(2, 24)).requires_grad_()
    results = {}
    for name in ("triton", "torch"):
        out = triton_ops.mirror_linear_attention(q, k, v, theta, gamma, pairing="half") if name == "triton" else \
            triton_ops._mirror_reference(q, k, v, theta, gamma, 1, 0, 1e-6, 1e-6)
        results[name] = (out, torch.autograd.grad(out.square().sum(), [q, k, v, theta, gamma]))
        if name == "triton":
            assert "_row_forward_kernel" not in launches and launches["_state_kernel"] == 1
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-4, rtol=1e-4)
    for label, a, w in zip(("q", "k", "v", "theta", "gamma"), results["triton"][1], results["torch"][1], strict=True):
        torch.testing.assert_close(a, w, atol=2e-4, rtol=2e-4, msg=label)
    launches.clear()
    triton_ops.mirror_linear_attention(q, k, v, theta, gamma, pairing="adjacent").sum().backward()
    assert dict(launches) == {"_row_forward_kernel": 1, "_row_backward_kernel": 1}


def test_the_moment_is_summed_only_for_a_backward(kernel_path, monkeypatch):
    """A rotating op's forward sums the moment (which gives the backward the keys' part of d angle) only where an
    input needs a gradient, and MirrorLA's backward then takes as many launches as ReLU's: its σ² path runs inside
    the k/v pass. A rotation whose angle needs no gradient gets none, and the right gradients for q, k, v."""
    launches = _count_launches(monkeypatch)
    moments = _record_launches(monkeypatch, ("_row_forward_kernel", "_state_kernel"),  # over the counting ones
                               lambda _, grid, kw: kw["MOMENT"])
    q, k, v, angle, theta, gamma = _op_inputs(1, 2, 100, 16)
    with torch.no_grad():
        triton_ops.mirror_linear_attention(q, k, v, theta, gamma)
        triton_ops.fused_linear_attention(q, k, v, angle, feature="rotate_relu")
    assert moments == [False, False]
    launches.clear()
    triton_ops.mirror_linear_attention(q, k, v, theta, gamma).sum().backward()
    mirror_launches = dict(launches)
    launches.clear()
    triton_ops.fused_linear_attention(q, k, v, feature="relu").sum().backward()
    assert moments[2:] == [True, False]  # MirrorLA's training forward, then ReLU's (no rotation, no moment)
    # ReLU's launches, and on the chunked kernels the keys' token sums before the state pass
    assert mirror_launches == {**launches, **({"_token_sums_kernel": 1} if kernel_path == "chunked" else {})}
    # the angle as a constant: no moment, no angle gradient, and q, k, v's gradients as before
    out = triton_ops.fused_linear_attention(q, k, v, angle.detach(), feature="rotate_relu")
    assert moments[-1] is False
    got = torch.autograd.grad(out.square().sum(), [q, k, v])
    want = torch.autograd.grad(_reference(q, k, v, angle.detach(), "rotate_relu", "adjacent").square().sum(),
                               [q, k, v])
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4)


def test_relu_and_elu_maps_use_the_fused_core(backend):
    q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))
    for name in ("relu", "elu"):
        fmap = create_feature_map(name, 2, 16)
        backend("triton")
        got = fmap.attend(q, k, v)
        backend("torch")
        torch.testing.assert_close(got, fmap.attend(q, k, v), atol=1e-5, rtol=1e-5)


def test_dispatch_rules(backend, monkeypatch):
    x = torch.randn(1, 1, 4, 4)
    backend("auto")
    assert select_backend(x) == "torch"  # CPU tensors never take the interpreter unless asked
    assert select_backend(x, has_cpu=True) == "cpu"
    backend("triton")
    assert select_backend(x) == "triton"
    assert select_backend(x.double()) == "torch"  # the kernels take fp32/bf16/fp16
    backend("bogus")
    with pytest.raises(ValueError, match="MIRRORLA_BACKEND must be one of"):
        select_backend(x)


def test_an_interpreter_that_cannot_run_the_kernels_is_an_error_that_says_what_to_install(backend, monkeypatch):
    from mirrorla import backend as backend_module

    problem = backend_module._interpreter_problem
    # Triton before 3.7 converts one-element arrays to int, which NumPy 2.4 refuses (every kernel with a loop fails)
    assert problem("3.6.0", "2.4.6") is not None and "numpy<2.4 or triton>=3.7" in problem("3.6.0", "2.4.6")
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.8.0", "2.4.0rc1"),
                                          ("3.10.1", "3.0.0"), (None, "2.4.6"), ("3.6.0", None)):
        assert problem(triton_version, numpy_version) is None, (triton_version, numpy_version)
    assert problem("3.6.1", "2.10.0") is not None  # minor versions compare as numbers, not strings
    x = torch.randn(1, 1, 4, 4)
    monkeypatch.setattr(backend_module, "_INTERPRETER_PROBLEM", problem("3.6.0", "2.4.6"))
    backend("auto")
    assert select_backend(x) == "torch"  # CPU tensors in auto mode never ask the interpreter
    backend("triton")
    with pytest.raises(RuntimeError, match=r"install numpy<2.4 or triton>=3.7"):
        select_backend(x)


def test_compile_fullgraph_through_the_custom_op(backend):
    backend("triton")
    fmap = create_feature_map("mirror", 2, 16)
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    eager = fmap.attend(q, k, v, folded=True)
    compiled = torch.compile(lambda a, b, c: fmap.attend(a, b, c, folded=True), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mirror_layer_bf16_matches_fp32():
    from mirrorla import LinearAttention

    layer = LinearAttention(192, 3).cuda()
    x = torch.randn(4, 1024, 192, device="cuda")
    ref = layer(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_running_scope_on_triton_matches_torch(backend):
    h, d, n = 2, 16, 40
    fmap = create_feature_map("mirror", h, d, variance_scope="running", gamma_init=0.4).eval()
    q, k, v = (torch.randn(2, h, n, d, requires_grad=True) for _ in range(3))
    params = [q, k, v, fmap.theta, fmap.gamma]
    got = {}
    for name in ("triton", "torch"):
        backend(name)
        out = fmap.attend(q, k, v, folded=True)
        got[name] = (out, torch.autograd.grad(out.square().sum(), params, allow_unused=True))
    torch.testing.assert_close(got["triton"][0], got["torch"][0], atol=1e-4, rtol=1e-4)
    for a, w in zip(got["triton"][1], got["torch"][1], strict=True):
        if w is None:
            assert a is None
        else:
            torch.testing.assert_close(a, w, atol=2e-4, rtol=2e-4)


def _op_inputs(b, h, n, d):
    """q, k, v ``[B, H, N, d]``, per-sample angles ``[B, H, d/2]`` and θ, γ ``[H, d/2]``, all requiring gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    angle = torch.randn(b, h, d // 2, requires_grad=True)
    theta, gamma = torch.randn(h, d // 2, requires_grad=True), torch.randn(h, d // 2, requires_grad=True)
    return q, k, v, angle, theta, gamma


def _op_calls():
    """(name, call, inputs) of each public Triton op, on small interpreter-sized inputs."""
    q, k, v, angle, theta, gamma = _op_inputs(2, 2, 40, 16)
    return [
        ("fused rotate_relu", lambda: triton_ops.fused_linear_attention(q, k, v, angle, feature="rotate_relu"),
         [q, k, v, angle]),
        ("fused relu", lambda: triton_ops.fused_linear_attention(q, k, v, feature="relu"), [q, k, v]),
        ("token sums", lambda: triton_ops.token_sums_triton(k), [k]),
        ("mirror", lambda: triton_ops.mirror_linear_attention(q, k, v, theta, gamma), [q, k, v, theta, gamma]),
    ]


@pytest.mark.parametrize("index", range(4))
def test_eager_function_and_custom_op_agree_bitwise(index, monkeypatch):
    """Eager calls go through a torch.autograd.Function, compiled ones through the torch.library custom op: one
    implementation, so values and every gradient are identical."""
    name, call, inputs = _op_calls()[index]
    results = []
    for custom in (False, True):
        monkeypatch.setattr(triton_ops, "_use_custom_ops", lambda custom=custom: custom)
        out = call()
        results.append((out, torch.autograd.grad(out.square().sum(), inputs)))
    (out_f, grads_f), (out_c, grads_c) = results
    torch.testing.assert_close(out_f, out_c, rtol=0, atol=0, msg=name)
    for a, w in zip(grads_f, grads_c, strict=True):
        torch.testing.assert_close(a, w, rtol=0, atol=0, msg=name)


def test_custom_ops_pass_torch_library_opcheck():
    """Schemas, fake kernels and autograd registrations of the custom ops (what torch.compile relies on)."""
    q, k, v, angle, theta, gamma = _op_inputs(1, 2, 20, 16)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(triton_ops._fused_forward, (q, k, v, angle, 2, 0, 1e-6), test_utils=tests)
    torch.library.opcheck(triton_ops._fused_forward, (q, k, v, None, 1, 0, 1e-6), test_utils=tests)
    torch.library.opcheck(triton_ops._token_sums, (k,), test_utils=tests)
    torch.library.opcheck(triton_ops._mirror_forward, (q, k, v, theta, gamma, 0, 0, 1e-6, 1e-6), test_utils=tests)
    # without the moment (inference): a state of one half, in the fake kernels too
    with torch.no_grad():
        for op, args in ((triton_ops._mirror_forward, (q, k, v, theta, gamma, 0, 0, 1e-6, 1e-6, False)),
                         (triton_ops._fused_forward, (q, k, v, angle, 2, 0, 1e-6, False))):
            assert op(*args)[1].shape[0] == 1
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_backward_custom_ops_fake_kernels_match_strided_inputs():
    """q, k, v are strided views of one qkv tensor in the models; the backward ops return contiguous gradients,
    and their fake kernels must say so (a fake that copied q's strides failed the compiled DeiT-T training step on
    the GPU: inductor checks the real strides against the fake's)."""
    torch.manual_seed(0)
    b, h, n, d = 1, 2, 20, 16
    q, k, v = (t.detach() for t in _strided_qkv(b, h, n, d, torch.float32))
    assert not q.is_contiguous()
    theta, gamma = torch.randn(h, d // 2), torch.randn(h, d // 2)
    out, state, sums, cos, ssin = triton_ops._mirror_forward(q, k, v, theta, gamma, 0, 0, 1e-6, 1e-6)
    grad = torch.randn_like(out)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(triton_ops._mirror_backward,
                          (q, k, v, theta, gamma, state, sums, cos, ssin, grad, 0, 0, 1e-6, 1e-6), test_utils=tests)
    angle = torch.randn(b, h, d // 2)
    out, state = triton_ops._fused_forward(q, k, v, angle, 2, 0, 1e-6)
    torch.library.opcheck(triton_ops._fused_backward, (q, k, v, angle, state, grad, 2, 0, 1e-6), test_utils=tests)



# ------------------------------------------------------------------------ GPUs too small for a configuration


class _TooLargeKernel:
    """Stands in for a kernel that needs more shared memory per block than the GPU has: its launch raises Triton's
    OutOfResources, as the first launch of such a kernel does (a d = 128 backward on an RTX 4090)."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise triton.runtime.OutOfResources(165_888, 101_376, "shared memory")

        return launch


FALLBACK_OPS = ["mirror", "fused rotate_relu", "fused relu"]


@pytest.mark.parametrize("op", FALLBACK_OPS)
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("custom", [False, True], ids=["function", "custom op"])
def test_configurations_too_large_for_the_gpu_run_the_reference(op, direction, custom, kernel_path, monkeypatch):
    """Where a kernel does not fit the GPU, the op gives the kernels' values and gradients through the torch
    reference, warns once, and stops trying that configuration's kernels (in the backward too when the forward fell
    back: its saved state is a placeholder). Through the custom op too, whose implementation runs where autograd
    does not record (what torch.compile calls)."""
    monkeypatch.setattr(triton_ops, "_TOO_LARGE", {})
    monkeypatch.setattr(triton_ops, "_ROW_TOO_LARGE", set())
    # a row kernel too large hands its rows to the chunked kernels: here those do not fit either
    names = [f"_{ {'forward': 'output', 'backward': 'backward_kv'}[direction] }_kernel"]
    if kernel_path == "row":
        names.append(f"_row_{direction}_kernel")
    call, inputs = next((c, x) for n, c, x in _op_calls() if n == op)
    out = call()
    want = (out.detach(), torch.autograd.grad(out.square().sum(), inputs))

    too_large = {name: _TooLargeKernel() for name in names}
    for name, kernel in too_large.items():
        monkeypatch.setattr(triton_ops, name, kernel)
    monkeypatch.setattr(triton_ops, "_use_custom_ops", lambda: custom)
    for attempt in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = call()
            grads = torch.autograd.grad(out.square().sum(), inputs)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if attempt == 0:
            assert len(messages) == 1 and f"Triton {direction} kernels" in messages[0], messages
            assert "shared memory" in messages[0] and "PyTorch reference" in messages[0]
        else:
            assert messages == []  # one warning per configuration
        torch.testing.assert_close(out, want[0], atol=1e-4, rtol=1e-4)
        for x, a, w in zip(inputs, grads, want[1], strict=True):
            assert a.dtype == x.dtype and a.shape == x.shape
            torch.testing.assert_close(a, w, atol=2e-4, rtol=2e-4)
    assert all(kernel.launches == 1 for kernel in too_large.values())  # the second call did not try them again
    assert len(triton_ops._TOO_LARGE) == 1


@pytest.mark.parametrize("op", ["mirror", "fused rotate_relu"])
@pytest.mark.parametrize("custom", [False, True], ids=["function", "custom op"])
def test_the_fallback_for_a_gpu_too_small_keeps_half_inputs_out_of_fp32(op, custom, monkeypatch, largest_fp32):
    """Where the GPU cannot run a configuration, the torch core runs it by chunks of tokens, forward and backward
    (the backward without recomputing under torch.func, whose plain form made whole fp32 copies of bf16 q, k and
    φ of them): no fp32 tensor the size of an input is made, and values and gradients are the torch backend's."""
    from mirrorla.ops import mapped_linear_attention, mirror_linear_attention, reference

    monkeypatch.setattr(reference, "_CHUNK_TOKENS", 7)
    monkeypatch.setattr(triton_ops, "_runs_kernels", lambda *args: False)
    monkeypatch.setattr(triton_ops, "_use_custom_ops", lambda: custom)
    b, h, n, d = 2, 2, 60, 16
    q, k, v, angle, theta, gamma = _op_inputs(b, h, n, d)
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    inputs = [q, k, v, theta, gamma] if op == "mirror" else [q, k, v, angle]
    upstream = torch.randn(b, h, n, d).bfloat16()

    def call(backend_op):
        if op == "mirror":
            return backend_op(q, k, v, theta, gamma)
        return mapped_linear_attention(q, k, v, angle=angle, feature="rotate_relu") if backend_op is None \
            else backend_op(q, k, v, angle, feature="rotate_relu")

    with largest_fp32() as record:
        out = call(triton_ops.mirror_linear_attention if op == "mirror" else triton_ops.fused_linear_attention)
        grads = torch.autograd.grad(out, inputs, upstream)
    # a chunk's products, or the op's fp32 state [1 + moment, B·H, d, dv + 1]; never [B, H, N, d]
    assert 0 < record.largest <= max(b * h * 7 * (d + 1), 2 * b * h * d * (d + 1)) < b * h * n * d
    monkeypatch.setenv("MIRRORLA_BACKEND", "torch")
    want = call(mirror_linear_attention if op == "mirror" else None)
    want_grads = torch.autograd.grad(want, inputs, upstream)
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, want_grads, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)


def test_the_fallback_rotates_by_an_angle_that_takes_no_gradient(monkeypatch):
    """A fixed angle (no gradient) still rotates in the fallback's backward, which then skips the angle's own
    gradient: q, k and v get the torch backend's gradients."""
    from mirrorla.ops import mapped_linear_attention

    monkeypatch.setattr(triton_ops, "_runs_kernels", lambda *args: False)
    q, k, v, angle, _, _ = _op_inputs(2, 2, 30, 16)
    fixed = angle.detach()
    out = triton_ops.fused_linear_attention(q, k, v, fixed, feature="rotate_relu")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    monkeypatch.setenv("MIRRORLA_BACKEND", "torch")
    want = mapped_linear_attention(q, k, v, feature="rotate_relu", angle=fixed)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("op", ["mirror", "fused relu"])  # the same fallback for every map: MirrorLA's and a plain one
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_row_kernel_too_large_for_the_gpu_hands_its_rows_to_the_chunked_kernels(op, direction, monkeypatch):
    """A row kernel holds a whole pass's state and tiles at once, so it can exceed a GPU's shared memory where the
    chunked kernels fit (bf16 at d = 128 on compute capability 8.9: 128 KB against at most 80 KB). Then the chunked
    kernels run that configuration, with their values and gradients and no warning, and the row kernel is not
    tried again."""
    monkeypatch.setattr(triton_ops, "_TOO_LARGE", {})
    monkeypatch.setattr(triton_ops, "_ROW_TOO_LARGE", set())
    call, inputs = next((c, x) for n, c, x in _op_calls() if n == op)
    with forced_tuning(row_max_tiles=0):  # what the chunked kernels give
        out = call()
        want = (out.detach(), torch.autograd.grad(out.square().sum(), inputs))
    too_large = _TooLargeKernel()
    monkeypatch.setattr(triton_ops, f"_row_{direction}_kernel", too_large)
    launches = _count_launches(monkeypatch)
    with forced_tuning(row_max_tiles=10**9), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):
            out = call()
            grads = torch.autograd.grad(out.square().sum(), inputs)
            torch.testing.assert_close(out, want[0], atol=1e-5, rtol=1e-5)
            for a, w in zip(grads, want[1], strict=True):
                torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)
    assert too_large.launches == 1
    chunked = "_backward_kv_kernel" if direction == "backward" else "_output_kernel"
    assert launches[chunked] == 2, dict(launches)
    assert triton_ops._TOO_LARGE == {} and len(triton_ops._ROW_TOO_LARGE) == 1


def test_other_configurations_keep_their_kernels_after_one_is_too_large(monkeypatch):
    """The fallback is per configuration: a head width the GPU cannot hold does not send other widths to the
    reference."""
    monkeypatch.setattr(triton_ops, "_TOO_LARGE", {})
    monkeypatch.setattr(triton_ops, "_ROW_TOO_LARGE", set())
    launches = _count_launches(monkeypatch)
    q, k, v = (torch.randn(1, 2, 9, 32, requires_grad=True) for _ in range(3))
    with pytest.warns(RuntimeWarning, match="heads of width 32"):
        real = triton_ops._row_backward_kernel, triton_ops._backward_kv_kernel
        monkeypatch.setattr(triton_ops, "_row_backward_kernel", _TooLargeKernel())
        monkeypatch.setattr(triton_ops, "_backward_kv_kernel", _TooLargeKernel())
        triton_ops.fused_linear_attention(q, k, v, feature="relu").sum().backward()
        monkeypatch.setattr(triton_ops, "_row_backward_kernel", real[0])
        monkeypatch.setattr(triton_ops, "_backward_kv_kernel", real[1])
    launches.clear()
    q16, k16, v16 = (t[..., :16].detach().requires_grad_() for t in (q, k, v))
    triton_ops.fused_linear_attention(q16, k16, v16, feature="relu").sum().backward()
    assert dict(launches) == {"_row_forward_kernel": 1, "_row_backward_kernel": 1}
    launches.clear()
    triton_ops.fused_linear_attention(q, k, v, feature="relu").sum().backward()
    assert dict(launches) == {"_row_forward_kernel": 1}  # width 32: the forward's kernels, the reference's backward


# ----------------------------------------------------------------------------------- the fold (triton_reflect)

FOLD_CASES = [  # (rows R, C_in, C, groups, bias, signs, weight given transposed): one and several programs over
    # the input columns (32 each), C within one and across two row blocks (64 each), R = groups·C and more rows
    (48, 20, 16, 3, True, 8, False),
    (60, 7, 16, 2, True, 16, False),
    (40, 33, 20, 1, False, None, False),
    (288, 9, 96, 2, True, 16, False),
    (200, 40, 96, 2, True, 96, True),
    (576, 192, 192, 2, True, 64, False),  # DeiT-T's qkv: one program takes its 192 columns in one 256-wide block
]


@pytest.fixture(params=["one program", "a program per block"])
def fold_backward_path(request, monkeypatch):
    """The fold's backward both ways: narrow projections in one program that also adds du's shares (one launch),
    wider ones with a program per column block and a second launch for du."""
    from mirrorla.ops import triton_reflect

    monkeypatch.setattr(triton_reflect, "_ONE_PROGRAM_MAX_BLOCKS", 10**9 if request.param == "one program" else 0)
    return request.param


@pytest.mark.parametrize("rows, c_in, c, groups, bias, signs, transposed", FOLD_CASES)
def test_triton_fold_matches_the_torch_fold_in_values_and_gradients(rows, c_in, c, groups, bias, signs, transposed,
                                                                    fold_backward_path):
    from mirrorla.ops.reflect import _ReflectProjectionRows
    from mirrorla.ops.triton_reflect import reflect_projection_rows_triton

    w = (torch.randn(c_in, rows).t() if transposed else torch.randn(rows, c_in)).requires_grad_()
    b = torch.randn(rows, requires_grad=True) if bias else None
    u = torch.randn(c, requires_grad=True)
    s = (torch.randint(0, 2, (signs,)) * 2 - 1).float() if signs else None
    inputs = [w, u] + ([b] if bias else [])
    grads = [torch.randn(rows, c_in)] + ([torch.randn(rows)] if bias else [])
    got_out = reflect_projection_rows_triton(w, b, u, s, groups)
    want_out = _ReflectProjectionRows.apply(w, b, u, s, groups)
    for got, want in zip(got_out, want_out, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad([t for t in got_out if t is not None], inputs, grads)
    want = torch.autograd.grad([t for t in want_out if t is not None], inputs, grads)
    for name, a, e in zip(("weight", "u", "bias"), got, want, strict=False):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


def test_triton_fold_partial_gradients_and_bf16(fold_backward_path):
    """Only the bias used (the weight's gradient is None), u without a gradient, strided u and signs, and bf16
    weights (fp32 arithmetic, bf16 outputs within bf16's precision)."""
    from mirrorla.ops.reflect import _ReflectProjectionRows
    from mirrorla.ops.triton_reflect import reflect_projection_rows_triton

    w, b = torch.randn(48, 10, requires_grad=True), torch.randn(48, requires_grad=True)
    u = torch.randn(32)[::2]  # a strided view
    signs = torch.tensor([-1.0, 0.0, 1.0, 0.0])[::2]
    got = torch.autograd.grad(reflect_projection_rows_triton(w, b, u, signs, 2)[1].square().sum(), [w, b])
    want = torch.autograd.grad(_ReflectProjectionRows.apply(w, b, u, signs, 2)[1].square().sum(), [w, b])
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    wb, bb = w.detach().bfloat16().requires_grad_(), b.detach().bfloat16().requires_grad_()
    out = reflect_projection_rows_triton(wb, bb, u, signs, 2)
    assert out[0].dtype == out[1].dtype == torch.bfloat16 and torch.isfinite(out[0]).all()
    ref = _ReflectProjectionRows.apply(w, b, u, signs, 2)
    torch.testing.assert_close(out[0].float(), ref[0].detach(), atol=5e-2, rtol=2e-2)
    dw, db = torch.autograd.grad(out[0].float().sum() + out[1].float().sum(), [wb, bb])
    assert dw.dtype == torch.bfloat16 and torch.isfinite(dw).all() and torch.isfinite(db).all()


def test_triton_fold_in_autocasts_dtype(fold_backward_path):
    """``out_dtype`` on the Triton fold: the folded weights are the fp32 fold rounded once to bf16, to nearest as
    torch's cast rounds (``_rounded``: a GPU's ``cvt.rn``; the interpreter alone would round toward zero), and bf16
    incoming gradients give exactly the gradients the fp32 fold gets from them after a cast."""
    from mirrorla.ops.triton_reflect import reflect_projection_rows_triton

    w, b, u = torch.randn(96, 20, requires_grad=True), torch.randn(96, requires_grad=True), torch.randn(32,
                                                                                                     requires_grad=True)
    signs = (torch.randint(0, 2, (8,)) * 2 - 1).float()
    ref_w, ref_b = reflect_projection_rows_triton(w, b, u, signs, 2)
    got_w, got_b = reflect_projection_rows_triton(w, b, u, signs, 2, torch.bfloat16)
    assert got_w.dtype == got_b.dtype == torch.bfloat16
    assert torch.equal(got_w, ref_w.bfloat16()) and torch.equal(got_b, ref_b.bfloat16())
    grads = [torch.randn(96, 20).bfloat16(), torch.randn(96).bfloat16()]
    want = torch.autograd.grad([ref_w.bfloat16(), ref_b.bfloat16()], [w, b, u], grads)
    got = torch.autograd.grad([got_w, got_b], [w, b, u], grads)
    for a, e in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, e)


def test_a_mirror_layer_under_autocast_on_triton_runs_no_cast_of_its_folded_weights(backend, cast_shapes):
    """The layer asks the Triton fold for autocast's dtype: no cast of the folded qkv weights runs forward (nor its
    backward), and the step matches the torch backend's."""
    from mirrorla import LinearAttention

    torch.manual_seed(0)
    layer = LinearAttention(48, 3, qkv_bias=True)
    x = torch.randn(2, 17, 48)
    results = {}
    for name in ("triton", "torch"):
        backend(name)
        layer.zero_grad()
        with cast_shapes() as casts, torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x, grid_size=(4, 4))
        out.float().square().sum().backward()
        assert (144, 48) not in casts.shapes and (144,) not in casts.shapes, name
        results[name] = (out.float(), [p.grad.clone() for p in layer.parameters()])
    # bf16 autocast on both backends: relative to each tensor's norm (the kernels' bf16 outputs of the attention
    # round differently in the interpreter), 4e-3 to 5e-3 measured here
    assert (results["triton"][0] - results["torch"][0]).norm() <= 2e-2 * results["torch"][0].norm()
    for a, e in zip(results["triton"][1], results["torch"][1], strict=True):
        assert (a - e).norm() <= 2e-2 * e.norm()


def test_mirror_layer_folds_on_triton_and_matches_the_torch_backend(backend, monkeypatch):
    """A MirrorLA layer's training step on the Triton backend runs its fold through the Triton kernels, and every
    parameter's gradient equals the torch backend's."""
    from mirrorla import LinearAttention
    from mirrorla.ops import triton_reflect

    calls = []
    original = triton_reflect.reflect_projection_rows_triton
    monkeypatch.setattr(triton_reflect, "reflect_projection_rows_triton", lambda *a: calls.append(1) or original(*a))
    layer = LinearAttention(48, 3, qkv_bias=True)
    with torch.no_grad():
        layer.feature_map.gamma.normal_(0, 0.5)
    x = torch.randn(2, 17, 48)
    results = {}
    for name in ("triton", "torch"):
        backend(name)
        layer.zero_grad()
        out = layer(x, grid_size=(4, 4))
        out.square().sum().backward()
        results[name] = (out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    assert calls == [1]  # the Triton fold ran on the Triton backend only
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-4, rtol=1e-4)
    for n, g in results["triton"][1].items():
        torch.testing.assert_close(g, results["torch"][1][n], atol=5e-4, rtol=5e-4, msg=f"gradient of {n}")


def test_launchers_use_plain_integer_helpers(monkeypatch, backend):
    """The launchers never call ``triton.cdiv``/``triton.next_power_of_2`` (constexpr functions since Triton 3.5,
    whose host calls cost microseconds each, several per launch), and the plain helpers agree with them."""
    import triton

    from mirrorla.ops._launch import cdiv, next_power_of_2
    from mirrorla.ops.triton_reflect import reflect_projection_rows_triton

    for n in range(1, 300):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for b in (1, 7, 64):
            assert cdiv(n, b) == triton.cdiv(n, b)

    def forbidden(*_):
        raise AssertionError("a host-side call of a Triton constexpr function")

    monkeypatch.setattr(triton, "cdiv", forbidden)
    monkeypatch.setattr(triton, "next_power_of_2", forbidden)
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    theta, gamma = torch.rand(2, 8, requires_grad=True), torch.rand(2, 8, requires_grad=True)
    triton_ops.mirror_linear_attention(q, k, v, theta, gamma).sum().backward()
    triton_ops.fused_linear_attention(q, k, v, feature="relu").sum().backward()
    w, u = torch.randn(48, 5, requires_grad=True), torch.randn(16, requires_grad=True)
    reflect_projection_rows_triton(w, None, u, None, 2)[0].sum().backward()
    assert u.grad is not None and theta.grad is not None


def test_second_derivatives_through_the_triton_ops_are_an_error_not_zero():
    """The kernels' backward is not itself differentiable: differentiating it (a gradient penalty, create_graph)
    raises instead of silently treating the attention's and the fold's gradients as constants."""
    from mirrorla.ops.triton_reflect import reflect_projection_rows_triton

    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    theta, gamma = torch.rand(2, 8, requires_grad=True), torch.rand(2, 8, requires_grad=True)
    w, u = torch.randn(48, 5, requires_grad=True), torch.randn(16, requires_grad=True)
    outputs = [
        (triton_ops.fused_linear_attention(q, k, v, feature="relu"), q),
        (triton_ops.mirror_linear_attention(q, k, v, theta, gamma), q),
        (reflect_projection_rows_triton(w, None, u, None, 2)[0], w),
    ]
    for out, x in outputs:
        (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            grad.square().sum().backward()


def _run_with_triton_compiler(args: list[str], timeout: int):
    """``python ARGS`` in a subprocess with Triton's compiler (TRITON_INTERPRET, which replaces it, removed) and
    this checkout's ``src`` on the path: how the tests run ``benchmarks/compile_check.py``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_row_kernels_compile_for_an_h100_without_serialised_wgmma():
    """The interpreter runs the kernels' Python, not Triton's compiler: the row kernels (bf16, d = 64, every map and
    pairing the dispatch launches) must also compile for sm_90 within its shared memory, which
    ``benchmarks/compile_check.py`` checks without a GPU (Triton's bundled ptxas, no driver), and without a ptxas
    performance advisory (C7515: wgmma serialised, as in MirrorLA's chunked q pass, see ``_dq_tiles``)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = _run_with_triton_compiler([str(root / "benchmarks" / "compile_check.py"), "--quick", "--kernels", "_row_"],
                                       timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "13 configurations, 0 failed, 0 with ptxas performance advisories" in result.stdout, result.stdout[-3000:]


def test_compile_check_counts_the_programs_an_sm_holds(benchmark_script):
    """compile_check's occupancy column, CUDA's occupancy rules: registers allocated per warp in units of 256,
    1 KB of shared memory reserved per block, and the per-SM limits of warps and blocks. sm_90 values are those of
    the H100 report's bf16, d = 64 kernels: MirrorLA's q pass (255 registers) 2, ReLU's k/v pass (162) 3, ReLU's
    state pass (92) 5; a block of 99 KB of shared memory fits once on sm_89; no table, no number."""
    per_sm = benchmark_script("compile_check").programs_per_sm
    assert per_sm(255, 4, 69632, 90) == 2
    assert per_sm(162, 4, 57344, 90) == 3
    assert per_sm(92, 4, 26624, 90) == 5
    assert per_sm(32, 4, 512, 90) == 16  # the warps' limit: 64 per SM
    assert per_sm(32, 1, 512, 90) == 32  # the blocks' limit
    assert per_sm(128, 8, 101376, 89) == 1
    assert per_sm(128, 4, 1024, 70) is None


def test_compile_check_reads_ptxas_performance_advisories(benchmark_script):
    advisories = benchmark_script("compile_check").ptxas_advisories
    report = (
        "ptxas info    : Compiling entry function '_backward_q_kernel' for 'sm_90a'\n"
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non "
        "wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in "
        "the function '_backward_q_kernel'\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 120 bytes cumulative stack size\n")
    assert advisories(report) == ["C7515"]
    assert advisories(report.replace("(C7515) Potential", "(C7510) Potential") + report) == ["C7510", "C7515"]
    assert advisories("ptxas info    : Used 240 registers, used 1 barriers\n") == []


# The miscompile seen on an H200 (ptxas of CUDA 12.8, the state kernel unrolled to one tile): the second k step's
# wgmma descriptor is built from UR7, which nothing wrote, so the wgmma read shared memory out of bounds.
_MISCOMPILED_SASS = """
        /*0a00*/                   S2UR UR5, SR_CgaCtaId ;
        /*18f0*/                   USHF.R.U32.HI UR6, URZ, 0x4, UR5 ;
        /*1940*/                   USGXT.U32 UR6, UR6, 0xe ;
        /*1ed0*/                   UMOV UR14, UR6 ;
        /*1ee0*/                   UMOV UR15, 0xc0000010 ;
        /*1ef0*/                   WARPGROUP.ARRIVE ;
        /*1f00*/                   HGMMA.64x16x16.F32.BF16 R96, R24, gdesc[UR12].tnspB, RZ, !UPT ;
        /*1f10*/                   UIADD3 UR4, UP0, UR7, 0x20, URZ ;
        /*1f20*/                   UIADD3.X UR7, UR7, -0x3ffffff0, URZ, UP0, !UPT ;
        /*1f30*/                   UMOV UR6, UR4 ;
        /*1f40*/                   HGMMA.64x16x16.F32.BF16 R96, R28, gdesc[UR4].tnspB, R96 ;
"""
# The same descriptors built correctly (CUDA 12.9's ptxas), with the operands that imply register pairs: .64 values,
# a .WIDE result, desc[] memory descriptors, a 32-bit address inside a .64 store, a guarded instruction
_SOUND_SASS = """
        /*0000*/                   ULDC.64 UR8, c[0x0][0x208] ;
        /*0010*/                   S2UR UR5, SR_CgaCtaId ;
        /*0020*/                   UIMAD.WIDE.U32 UR10, UR5, 0x4, URZ ;
        /*0030*/                   LDG.E.64 R2, desc[UR8][R2.64] ;
        /*0040*/                   STS.64 [R64+UR5], R60 ;
        /*0050*/                   USHF.R.U32.HI UR6, URZ, 0x4, UR5 ;
        /*0060*/                   UMOV UR7, 0xc0000010 ;
        /*0070*/                   UMOV UR14, UR6 ;
        /*0080*/                   UMOV UR15, UR7 ;
        /*0090*/                   HGMMA.64x16x16.F32.BF16 R96, R24, gdesc[UR12].tnspB, RZ, !UPT ;
        /*00a0*/                   UIADD3.64 UR14, UR6, 0x20, URZ ;
        /*00b0*/                   @P0 UIADD3 UR4, UR11, 0x1, URZ ;
        /*00c0*/                   HGMMA.64x16x16.F32.BF16 R96, R28, gdesc[UR12].tnspB, R96 ;
"""


def test_compile_check_finds_reads_of_uniform_registers_nothing_wrote(benchmark_script):
    """compile_check's miscompile check: the wgmma descriptor made from an unwritten register is found (its address
    is the instruction compute-sanitizer named), a sound kernel's registers are not."""
    check = benchmark_script("compile_check").uninitialised_uniform_reads
    found = check(_MISCOMPILED_SASS)
    assert [(address, register) for address, register, _ in found] == [("1f10", "UR7"), ("1f20", "UR7")]
    assert check(_SOUND_SASS) == []
    # the B descriptor of a wgmma whose A comes from registers is UR14:UR15: its unwritten half is found (the
    # second wgmma's descriptor is written whole by the .64 add before it)
    found = check(_SOUND_SASS.replace("UMOV UR15, UR7", "UMOV UR16, UR7"))
    assert [(address, register) for address, register, _ in found] == [("0090", "UR15")]


def test_kernels_compile_one_variant_whatever_the_sizes():
    """Launches that differ only in sizes (tokens, heads, tiles per program, column counts of the fold) bind to
    the same compiled variant. Triton would otherwise compile another for a size of 1 or a multiple of 16, and
    which of those a GPU runs depends on the batch and its SM count, so compile_check on a CPU would miss some:
    the one-tile state kernel that ptxas of CUDA 12.8 miscompiled was such a variant. (A subprocess: compile_check
    needs Triton's compiler, which TRITON_INTERPRET replaces.)"""
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    script = (f"import sys; sys.path.insert(0, {str(benchmarks)!r}); import compile_check as c; "
              "launches = c.record_launches(quick=True); "
              "print(sorted({name for name, *_ in launches})); print(c.size_dependent_variants(launches))")
    result = _run_with_triton_compiler(["-c", script], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    names, variants = result.stdout.strip().splitlines()[-2:]
    for kernel in ("_state_kernel", "_output_kernel", "_backward_q_kernel", "_backward_kv_kernel",
                   "_token_sums_kernel", "_row_forward_kernel", "_row_backward_kernel", "_fold_rows_kernel"):
        assert kernel in names
    assert variants == "[]"
