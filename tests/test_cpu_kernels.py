"""The fused CPU kernels (csrc/mirror_cpu.cpp) against their pure-PyTorch references."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from mirrorla.ops import (
    DELTA_FORMS,
    cpu_kernels_available,
    cpu_kernels_status,
    folded_mirror_map,
    folded_mirror_map_reference,
    rotate_relu,
    rotate_relu_reference,
    token_sums,
    token_sums_reference,
)

CAN_BUILD = (os.environ.get("MIRRORLA_CPU_KERNELS", "") != "0" and shutil.which("c++") is not None)
needs_kernels = pytest.mark.skipif(not CAN_BUILD, reason="no C++ compiler here: the reference runs instead")

# fp16/bf16 inputs are read in their own dtype and computed in fp32, as the reference does after its cast
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


@needs_kernels
def test_kernels_build_where_a_compiler_exists():
    # a machine with a compiler must get the fused path: a silent fallback would hide a broken kernel
    assert cpu_kernels_available(), cpu_kernels_status()


def _strided(b, h, n, d, dtype):
    """q-like tensor [B, H, N, d] as a view into a [B, N, 3, H, d] qkv projection (what LinearAttention has)."""
    qkv = torch.randn(b, n, 3, h, d, dtype=torch.float64).to(dtype)
    return qkv[:, :, 1].transpose(1, 2)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pairing", ["adjacent", "half"])
@pytest.mark.parametrize("d", [6, 20, 64])  # below, off and on the kernel's 16-lane width
def test_rotate_relu_kernel_equals_reference(dtype, pairing, d):
    torch.manual_seed(0)
    x = _strided(2, 3, 37, d, dtype)
    for angle_batch in (1, 2):
        angle = torch.rand(angle_batch, 3, d // 2, dtype=torch.promote_types(dtype, torch.float32)) * 7
        with torch.no_grad():
            fast = rotate_relu(x, angle, pairing=pairing)
        expected = rotate_relu_reference(x, angle.unsqueeze(2), pairing=pairing)
        assert fast.dtype == expected.dtype == torch.promote_types(dtype, torch.float32)
        torch.testing.assert_close(fast, expected, rtol=0, atol=TOL[dtype] * 10)
        assert (fast >= 0).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 511, 1300])  # one token, under and over the kernel's 512-token chunks
def test_token_sums_kernel_equals_reference(dtype, n):
    torch.manual_seed(0)
    x = _strided(2, 3, n, 20, dtype) + 0.5
    with torch.no_grad():
        fast = token_sums(x)
    expected = token_sums_reference(x)
    torch.testing.assert_close(fast, expected, rtol=TOL[dtype] * 10, atol=TOL[dtype] * n)


@needs_kernels
@pytest.mark.parametrize("delta_form", sorted(DELTA_FORMS))
@pytest.mark.parametrize("pairing", ["adjacent", "half"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_folded_mirror_map_kernel_equals_reference(delta_form, pairing, dtype):
    torch.manual_seed(0)
    h, d = 3, 16
    q, k = _strided(2, h, 29, d, dtype), _strided(2, h, 41, d, dtype) * 2 + 0.3  # Nq ≠ N
    acc = torch.promote_types(dtype, torch.float32)
    theta, gamma = torch.rand(h, d // 2, dtype=acc) * 3, torch.randn(h, d // 2, dtype=acc)
    with torch.no_grad():
        fast = folded_mirror_map(q, k, theta, gamma, eps=1e-6, delta_form=delta_form, pairing=pairing)
    expected = folded_mirror_map_reference(q, k, theta, gamma, eps=1e-6, delta_form=delta_form, pairing=pairing)
    for f, e in zip(fast, expected, strict=True):
        assert f.dtype == e.dtype == acc
        torch.testing.assert_close(f, e, rtol=0, atol=TOL[dtype] * 50)


@needs_kernels
def test_folded_mirror_map_kernel_is_batch_independent():
    torch.manual_seed(0)
    q, k = torch.randn(4, 2, 33, 8), torch.randn(4, 2, 33, 8)
    theta, gamma = torch.rand(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        together = folded_mirror_map(q, k, theta, gamma)
        for i in range(4):
            alone = folded_mirror_map(q[i:i + 1], k[i:i + 1], theta, gamma)
            torch.testing.assert_close(alone[0], together[0][i:i + 1], rtol=0, atol=1e-6)
            torch.testing.assert_close(alone[1], together[1][i:i + 1], rtol=0, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pairing", ["adjacent", "half"])
@pytest.mark.parametrize("d", [6, 20, 64])
def test_rotate_relu_backward_kernel_equals_reference(dtype, pairing, d):
    """Training on CPUs runs ReLU(R x) on the kernels forward and backward: dx (in x's dtype) and d angle (summed
    over the batch where the angles are shared) equal autograd through the reference, for strided x."""
    torch.manual_seed(0)
    acc = torch.promote_types(dtype, torch.float32)
    for angle_batch in (1, 2):
        x = _strided(2, 3, 37, d, dtype).requires_grad_()
        angle = (torch.rand(angle_batch, 3, d // 2, dtype=acc) * 7).requires_grad_()
        grad = torch.randn(2, 3, 37, d, dtype=acc)
        fast = rotate_relu(x, angle, pairing=pairing)
        assert type(fast.grad_fn).__name__ == "_RotateReluCPUBackward"  # the kernels ran, not the reference
        dx, dangle = torch.autograd.grad(fast, (x, angle), grad)
        expected = rotate_relu_reference(x, angle.unsqueeze(2), pairing=pairing)
        ex_dx, ex_dangle = torch.autograd.grad(expected, (x, angle), grad)
        torch.testing.assert_close(fast, expected, rtol=0, atol=TOL[dtype] * 10)
        assert dx.dtype == dtype and dangle.dtype == acc
        assert dx.stride() == torch.empty_like(x).stride()  # dense in x's order, as autograd's element-wise ops
        # dx is rounded to x's dtype once; the reference rounds the same fp32 value
        torch.testing.assert_close(dx, ex_dx, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
        torch.testing.assert_close(dangle, ex_dangle, rtol=TOL[dtype] * 100, atol=TOL[dtype] * 100)


@needs_kernels
def test_rotate_relu_backward_kernel_drops_the_gradient_where_the_relu_is_off():
    """The ReLU's backward selects, as autograd's does: an infinite upstream gradient on a channel whose rotated
    value is negative gives 0 there, not 0·inf = NaN."""
    x = torch.tensor([[[[1.0, -2.0, -1.0, 3.0]]]], requires_grad=True)
    angle = torch.zeros(1, 1, 2, requires_grad=True)
    out = rotate_relu(x, angle)
    grad = torch.tensor([[[[1.0, float("inf"), float("inf"), 2.0]]]])
    dx, dangle = torch.autograd.grad(out, (x, angle), grad)
    assert torch.equal(dx, torch.tensor([[[[1.0, 0.0, 0.0, 2.0]]]]))
    # pair 0: g'₁·y₀ − g'₀·y₁ = 0·1 − 1·(−2); pair 1: 2·(−1) − 0·3
    assert torch.equal(dangle, torch.tensor([[[2.0, -2.0]]]))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_sums_backward_on_the_kernel_equals_reference(dtype):
    torch.manual_seed(0)
    x = (_strided(2, 3, 600, 20, dtype) + 0.5).requires_grad_()
    fast = token_sums(x)
    assert type(fast.grad_fn).__name__ == "_TokenSumsCPUBackward"
    grad = torch.randn_like(fast)
    (got,) = torch.autograd.grad(fast, x, grad)
    (want,) = torch.autograd.grad(token_sums_reference(x), x, grad)
    assert got.dtype == dtype
    # both round an fp32 gradient to x's dtype once; for bf16 fp32 rounding differences may move it by one unit
    tol = dict(rtol=8e-3, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    torch.testing.assert_close(got, want, **tol)


@needs_kernels
@pytest.mark.parametrize("delta_form", sorted(DELTA_FORMS))
@pytest.mark.parametrize("pairing", ["adjacent", "half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_mirror_map_training_on_the_kernels_equals_reference(delta_form, pairing, dtype):
    """The folded map with gradients on CPUs (the angles through autograd, the rotation and ReLU on the kernels):
    the gradients of q, k, θ and γ, the σ² path to k included, equal autograd through the reference."""
    torch.manual_seed(0)
    h, d = 3, 16
    q, k = _strided(2, h, 29, d, dtype), _strided(2, h, 41, d, dtype) * 2 + 0.3
    acc = torch.promote_types(dtype, torch.float32)
    theta, gamma = torch.rand(h, d // 2, dtype=acc) * 3, torch.randn(h, d // 2, dtype=acc)
    leaves = [t.detach().requires_grad_() for t in (q, k, theta, gamma)]
    fast = folded_mirror_map(*leaves, eps=1e-6, delta_form=delta_form, pairing=pairing)
    assert type(fast[0].grad_fn).__name__ == "_RotateReluCPUBackward"
    expected = folded_mirror_map_reference(*leaves, eps=1e-6, delta_form=delta_form, pairing=pairing)
    grads = [torch.randn_like(f) for f in fast]
    got = torch.autograd.grad(fast, leaves, grads)
    want = torch.autograd.grad(expected, leaves, grads)
    # bf16 gradients of q and k: the kernels' token sums add in another order than the reference's, which can move a
    # value across a bf16 rounding boundary (one unit in the last place, 2⁻⁸ relative)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)


@needs_kernels
def test_cpu_training_path_runs_under_torch_func():
    """torch.func transforms (grad, vmap) take the reference where the kernels' autograd Functions cannot run, with
    the gradients the kernels' backward gives under plain autograd."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 11, 8)
    theta, gamma = torch.rand(2, 4), torch.randn(2, 4)

    def loss(*args):
        fq, fk = folded_mirror_map(*args)
        return fq.square().sum() + fk.sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(q, k, theta, gamma)
    leaves = [t.clone().requires_grad_() for t in (q, k, theta, gamma)]
    fast = folded_mirror_map(*leaves)
    assert type(fast[0].grad_fn).__name__ == "_RotateReluCPUBackward"
    want = torch.autograd.grad(fast[0].square().sum() + fast[1].sum(), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    angle = torch.rand(2, 2, 4)
    batched = torch.func.vmap(lambda x: rotate_relu(x[None], angle[:1]))(q)
    torch.testing.assert_close(batched[:, 0], rotate_relu(q, angle[:1]), rtol=0, atol=1e-6)


def test_gradients_are_exact():
    # training takes the kernels' backward where they are built, the reference elsewhere; gradcheck in fp64
    torch.manual_seed(0)
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    theta = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: folded_mirror_map(*a), (q, k, theta, gamma))
    angle = torch.rand(1, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: rotate_relu(x, a, pairing="half"), (q, angle))
    assert torch.autograd.gradcheck(token_sums, (k,))


def test_rotate_relu_rejects_bad_angles():
    x = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"angle must have shape \[1 or B, H, d/2\] = \[1 or 2, 3, 4\]"):
        rotate_relu(x, torch.rand(2, 3, 1, 4))
    with pytest.raises(ValueError, match="pairing"):
        rotate_relu(x, torch.rand(2, 3, 4), pairing="odd")
    with pytest.raises(ValueError, match=r"x must have rank 4"):
        rotate_relu(x[0], torch.rand(1, 3, 4))


def test_disabled_kernels_fall_back_to_the_reference():
    code = ("import torch; from mirrorla.ops import cpu_kernels_status, folded_mirror_map; "
            "print(cpu_kernels_status()); q = torch.randn(1, 2, 9, 8); t = torch.zeros(2, 4); "
            "print(bool((folded_mirror_map(q, q, t, t)[0] >= 0).all()))")
    env = {**os.environ, "MIRRORLA_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "disabled by MIRRORLA_CPU_KERNELS=0" in out and out.strip().endswith("True")
