"""Correctness of the compiled Triton kernels on a real GPU (the test suite checks them in the interpreter).

Compares the fused op and the MirrorLA layer on the Triton backend with the torch reference on the same device:
outputs and the gradients of q, k, v and the angles, fp32 and bf16, strided inputs, head dims 16–128, N from 1
to 4,097, both pairings; rows of 513 to 4,096 tokens on both kernel paths (the row kernels take them on a GPU
tuned so, the chunked ones by default). Also checks that a DeiT-T forward under torch.compile(fullgraph) matches
eager, and that CUDA-graph capture (mode="reduce-overhead") runs, also for a training step compiled block by block.
Prints one line per check and exits 1 on a mismatch.

Also checks the MirrorLA layer (fold, σ², rotation, attention) on the Triton backend against the torch backend on
the same device, in values and in the gradients of every parameter, and the chunked kernels' block options
(``backward_blocks``, ``ieee_backward_blocks`` and ``moment_state_blocks``, chosen per GPU by ``mirrorla tune``)
against their defaults.

Usage: PYTHONPATH=src python benchmarks/gpu_check.py [DEVICE] [--kernels-only] [--quick]  (DEVICE defaults to
cuda; --kernels-only skips the compiled DeiT-T checks, which spend minutes compiling; --quick keeps the head width
and sizes the benchmarks use, d = 64, so few kernel variants compile)
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from mirrorla.ops.fused import rotate_relu_reference
from mirrorla.ops.linear_attention import _linear_attention_torch
from mirrorla.ops.triton_linear_attention import fused_linear_attention
from mirrorla.ops.tuning import forced_tuning

args = [a for a in sys.argv[1:] if not a.startswith("--")]
device = torch.device(args[0] if args else "cuda")
kernels_only = "--kernels-only" in sys.argv
quick = "--quick" in sys.argv
failures = 0


def report(name: str, err: float, tol: float) -> None:
    global failures
    ok = err <= tol
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max rel err {err:.2e} (tol {tol:.0e})", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def reference(q, k, v, angle, feature, pairing):
    q, k, v = q.float(), k.float(), v.float()
    if feature == "rotate_relu":
        q = rotate_relu_reference(q, angle.unsqueeze(2), pairing=pairing)
        k = rotate_relu_reference(k, angle.unsqueeze(2), pairing=pairing)
    elif feature == "relu":
        q, k = q.relu(), k.relu()
    return _linear_attention_torch(q, k, v, eps=1e-6)


# the interpreter (device cpu) is slow: smaller sizes there
# sequences of up to 512 tokens run on the row kernels (one program per row), longer ones on the chunked kernels
CASE_SIZES = ((4097, 128), (1, 16), (197, 48), (197, 64), (1000, 64)) if device.type == "cuda" else \
    ((1, 16), (97, 48))
if quick:
    CASE_SIZES = ((1000, 64), (197, 64)) if device.type == "cuda" else ((97, 64),)
# rows of 513 to 4,096 tokens run on either kernel path, by the GPU's row_max_tiles (a tuned GPU gives them the row
# kernels with B·H at least its SM count, the defaults the chunked ones): both are checked, whatever this GPU's setting
cases = [(feature, pairing, n, d, dtype, path)
         for feature, pairing in (("rotate_relu", "adjacent"), ("rotate_relu", "half"), ("relu", "adjacent"))
         for n, d in CASE_SIZES
         for dtype in (torch.float32, torch.bfloat16)
         for path in (("row", "chunked") if 512 < n <= 4096 else ("",))]
for feature, pairing, n, d, dtype, path in cases:
    b, h = 3, 3
    g = torch.Generator(device="cpu").manual_seed(n * d)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(device, dtype)
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))  # strided views
    angle = torch.randn(b, h, d // 2, generator=g).to(device).requires_grad_() if feature == "rotate_relu" else None
    inputs = [q, k, v] + ([angle] if angle is not None else [])
    with forced_tuning(row_max_tiles=10**9 if path == "row" else 0) if path else contextlib.nullcontext():
        out = fused_linear_attention(q, k, v, angle, feature=feature, pairing=pairing)
        grad = torch.randn(out.shape, generator=g).to(device, dtype)
        got = torch.autograd.grad(out, inputs, grad)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference(q32, k32, v32, angle, feature, pairing)
    want = torch.autograd.grad(ref, [q32, k32, v32] + ([angle] if angle is not None else []), grad.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # tf32 state products on fp32 inputs
    name = f"{feature} {pairing} N={n} d={d} {str(dtype).split('.')[-1]}" + (f" {path} kernels" if path else "")
    report(f"{name} out", rel(out, ref), tol)
    if n == 1:  # one token: where φ(q)·φ(k) = 0 the normaliser is ε and the gradients are 1/ε-sized noise
        continue
    for label, a, w in zip(("dq", "dk", "dv", "dangle"), got, want, strict=False):
        report(f"{name} {label}", rel(a, w), tol * 2)

# the whole folded MirrorLA step on the Triton backend (σ², Θ, rotation, attention: one op) against the reference
from mirrorla.feature_maps import create_feature_map  # noqa: E402

MAP_CASES = (("tanh_log", "adjacent", 4096, 64, torch.bfloat16), ("tanh_log", "half", 197, 64, torch.bfloat16),
             ("rsqrt", "half", 1000, 48, torch.float32), ("log", "adjacent", 999, 128, torch.bfloat16),
             ("log", "adjacent", 250, 128, torch.float32))
for delta_form, pairing, n, d, dtype in MAP_CASES[:2] if quick else MAP_CASES:
    torch.manual_seed(n * d)  # the map's parameters: the same in every run, so a failure can be reproduced
    fmap = create_feature_map("mirror", 3, d, delta_form=delta_form, pairing=pairing).to(device)
    with torch.no_grad():
        fmap.gamma.normal_(0, 0.5)
    g = torch.Generator(device="cpu").manual_seed(d)
    q, k, v = (torch.randn(2, 3, n, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    params = [q, k, v, fmap.theta, fmap.gamma]
    results = {}
    for backend in ("triton", "torch"):
        os.environ["MIRRORLA_BACKEND"] = backend
        out = fmap.attend(q, k, v, folded=True)
        results[backend] = (out.float(), torch.autograd.grad(out.float().square().mean(), params))
    os.environ.pop("MIRRORLA_BACKEND")
    name = f"mirror map {delta_form} {pairing} N={n} d={d} {str(dtype).split('.')[-1]}"
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-3
    report(f"{name} out", rel(results["triton"][0], results["torch"][0]), tol)
    for label, a, w in zip(("dq", "dk", "dv", "dtheta", "dgamma"), results["triton"][1], results["torch"][1],
                           strict=True):
        report(f"{name} {label}", rel(a, w), 2 * tol)

# the chunked kernels' (token tile, warps) options that mirrorla tune may choose: the MirrorLA op's gradients with
# each option against the default's (the same sums in other orders; tune checks them too before it picks one), for
# the backward with tensor-core dots (bf16) and IEEE fp32 dots, and for the training forward's state pass
from mirrorla.tools.tune import BLOCK_SETTINGS, GRAD_TOLERANCE, check_block_options, setting_dtype  # noqa: E402

n_blocks = 4096 if device.type == "cuda" else 300
for setting, (options, _) in BLOCK_SETTINGS.items():
    tol = GRAD_TOLERANCE[setting_dtype(setting, device)]
    for option, error in check_block_options(device, setting, n=n_blocks).items():
        report(f"chunked kernels {setting} {option} vs {options[0][0]}x{options[0][1]}, N={n_blocks}", error, tol)

# the fold of the static reflections into the qkv rows: Triton kernels against the torch version, values and the
# gradients of weight, bias and u (DeiT-T's and DeiT-B's widths; fp32 and bf16 weights)
from mirrorla.ops.reflect import _ReflectProjectionRows  # noqa: E402
from mirrorla.ops.triton_reflect import reflect_projection_rows_triton  # noqa: E402

for c, dtype in ((192, torch.float32), (768, torch.float32), (192, torch.bfloat16)):
    g = torch.Generator(device="cpu").manual_seed(c)
    w, b = torch.randn(3 * c, c, generator=g), torch.randn(3 * c, generator=g)
    w, b = (t.to(device, dtype).requires_grad_() for t in (w, b))
    u = torch.randn(c, generator=g).to(device).requires_grad_()
    signs = torch.tensor([-1.0, 1.0] * 32, device=device)
    grads = [torch.randn(3 * c, c, generator=g).to(device, dtype), torch.randn(3 * c, generator=g).to(device, dtype)]
    fold_results = []
    for fold in (reflect_projection_rows_triton, _ReflectProjectionRows.apply):
        outs = fold(w, b, u, signs, 2)
        fold_results.append((outs, torch.autograd.grad(list(outs), [w, b, u], grads)))
    (got, got_grads), (want, want_grads) = fold_results
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    name = f"fold C={c} {str(dtype).split('.')[-1]}"
    report(f"{name} weight", rel(got[0], want[0]), tol)
    report(f"{name} bias", rel(got[1], want[1]), tol)
    for label, a, e in zip(("dweight", "dbias", "du"), got_grads, want_grads, strict=True):
        report(f"{name} {label}", rel(a, e), 10 * tol)

# the layer as models run it: the fused fold of the q/k rows, then the Triton op; bf16 autocast on the GPU
from mirrorla import LinearAttention  # noqa: E402

torch.manual_seed(0)
layer = LinearAttention(192, 3, qkv_bias=True).to(device)
with torch.no_grad():
    layer.feature_map.gamma.normal_(0, 0.5)
x = torch.randn(4, 197 if device.type == "cuda" else 17, 192, device=device)
layer_results = {}
for backend in ("triton", "torch"):
    os.environ["MIRRORLA_BACKEND"] = backend
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = layer(x).float()
    grads = torch.autograd.grad(out.square().mean(), list(layer.parameters()))
    layer_results[backend] = (out, grads)
os.environ.pop("MIRRORLA_BACKEND")
tol = 3e-2 if device.type == "cuda" else 2e-3
precision = "bf16 autocast" if device.type == "cuda" else "fp32"
report(f"LinearAttention(mirror) layer, {precision}, triton vs torch out",
       rel(layer_results["triton"][0], layer_results["torch"][0]), tol)
for (pname, _), a, w in zip(layer.named_parameters(), layer_results["triton"][1], layer_results["torch"][1],
                            strict=True):
    report(f"LinearAttention(mirror) layer d {pname}", rel(a, w), 2 * tol)

if device.type == "cuda" and not kernels_only:
    import timm

    import mirrorla  # noqa: F401  (registers the models)
    from mirrorla.models.compile import compile_model

    model = timm.create_model("mirrorla_deit_tiny_patch16_224").to(device).eval()
    x = torch.randn(8, 3, 224, 224, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x).float()
        compiled = torch.compile(model, fullgraph=True)(x).float()
        report("DeiT-T compile(fullgraph) vs eager, bf16", rel(compiled, eager), 3e-2)
    # training under CUDA graphs, compiled block by block (what bench --compile measures): loss and gradients
    train_model = timm.create_model("mirrorla_deit_tiny_patch16_224").to(device).train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        train_model(x).float().square().mean().backward()
    ref_grads = [p.grad.float().clone() for p in train_model.parameters()]
    compile_model(train_model, scope="blocks", mode="reduce-overhead")
    for _ in range(3):
        train_model.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            train_model(x).float().square().mean().backward()
    worst = max(rel(p.grad.float(), g) for p, g in zip(train_model.parameters(), ref_grads, strict=True))
    report("DeiT-T training, blocks compiled with CUDA graphs vs eager, bf16, worst gradient", worst, 5e-2)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        graphs = torch.compile(model, mode="reduce-overhead")
        for _ in range(3):
            out = graphs(x).float()
        report("DeiT-T compile(reduce-overhead, CUDA graphs) vs eager, bf16", rel(out, eager), 3e-2)
    os.environ["MIRRORLA_BACKEND"] = "torch"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        report("DeiT-T triton vs torch backend, bf16", rel(model(x).float(), eager), 3e-2)

print(f"{len(cases)} kernel cases; {failures} failures", flush=True)
sys.exit(1 if failures else 0)
