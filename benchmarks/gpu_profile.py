"""Where a step's time goes: host (Python, dispatch, launches) against device (kernels), per attention.

For each attention and mode it prints the wall time per step (host clock around whole steps), the device time
per step (the sum of the kernels' own times, from ``torch.profiler``), the kernels and the operators dispatched
per step, the kernels and operators that cost the most, and the calls that made the host wait for the GPU (CUDA's
sync-debug mode, one step). A step whose wall time is far above its device time is host-bound: fewer, larger
kernels help it, faster kernels do not; a host sync inside it serialises host and device time.

Cases: ``mirrorla_deit_tiny_patch16_224`` (bf16 autocast, inference and training) and, with ``--op``, the
attention op alone (q, k, v given, as in ``mirrorla bench op``). For the op it also lists each chunked pass's
device time with the bandwidth its own tensors make at that time (:func:`pass_bandwidth`): a pass far below the
step's best one is bound by something other than memory.

With ``--host`` it first times the attention's pieces one by one at one DeiT-T layer's shape (B·H = 128·3, 197
tokens, d = 64): a tiny torch op, the backward() of one multiply (by default and on the calling thread: what any
backward call costs), a one-argument Triton kernel, each MirrorLA kernel launch, the ops forward and
forward+backward, the fold, and whole layers, each as host time per call (bursts of a few calls, so the launch
queue never fills and the host clock measures the host) and as device time per call (the same calls queued behind
a sleeping kernel, timed by CUDA events). They say which piece a host-bound step spends its time in, and whether
that piece is bound by the host or by the GPU. A second table does the same at DeiT-T's 1024² layer shape (B·H =
8·3 rows of 4,097 tokens) for the ops' forward+backward and the layers' training steps, on the chunked kernels the
library picks there and on the row kernels forced.

Usage: PYTHONPATH=src python benchmarks/gpu_profile.py [--device cuda] [--img-size 224] [--batch 128]
       [--attn softmax,relu,mirror] [--mode infer,train] [--op N] [--host]
       [--top 10] [--out FILE]

The Triton path's per-GPU launch settings (row kernels against chunked kernels, the chunked backward's blocks) are
measured by ``mirrorla tune``, not here.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mirrorla import models  # noqa: F401  (registers the models)
from mirrorla.attention import LinearAttention


def model_step(attn: str, mode: str, img: int, batch: int, device: torch.device):
    import timm

    model = timm.create_model("mirrorla_deit_tiny_patch16_224", attn=attn, img_size=img).to(device)
    model.train(mode == "train")
    x = torch.randn(batch, 3, img, img, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        if mode == "train":
            with autocast:
                out = model(x)
            out.float().sum().backward()
            for p in model.parameters():
                p.grad = None
        else:
            with torch.no_grad(), autocast:
                model(x)

    return step


OP_SHAPE = (8, 3, 64)  # B, H, d of the op's cases


def op_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def op_tensor_bytes(n: int, device: torch.device) -> int:
    """Bytes of one of the op's [B, H, N, d] tensors at ``n`` tokens."""
    b, h, d = OP_SHAPE
    return b * h * n * d * op_dtype(device).itemsize


def op_step(attn: str, mode: str, n: int, device: torch.device):
    import torch.nn.functional as F

    b, h, d = OP_SHAPE
    dtype = op_dtype(device)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype).requires_grad_(mode == "train") for _ in range(3))
    # the upstream gradient is given, as in `mirrorla bench op`: a loss (o.float().sum()) would add its own kernels
    grad_out = torch.randn(b, h, n, d, device=device, dtype=dtype)
    if attn == "softmax":
        def fn():
            return F.scaled_dot_product_attention(q, k, v)
    else:
        layer = LinearAttention(h * d, h, attn=attn, local_kernel=0).to(device)

        def fn():
            return layer.feature_map.attend(q, k, v, **layer.map_kwargs)

    params = [] if attn == "softmax" else list(layer.parameters())

    def step():
        if mode == "train":
            fn().backward(grad_out)
            for t in (q, k, v, *params):  # every gradient dropped, as in the model steps (no accumulating adds)
                t.grad = None
        else:
            with torch.no_grad():
                fn()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(step, device: torch.device, steps: int) -> float:
    for _ in range(max(5, steps)):  # the caching allocator and the kernels' caches settle first
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def host_syncs(step, device: torch.device) -> list[str]:
    """The calls of one step that made the host wait for the GPU (CUDA's sync-debug mode), de-duplicated."""
    if device.type != "cuda":
        return []
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sync(device)
    return sorted({str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message)})


def profile_case(name: str, step, device: torch.device, steps: int, top: int, lines: list[str],
                 tensor_bytes: int = 0) -> dict:
    """Profile ``steps`` steps; ``tensor_bytes`` (the op's cases: bytes of one [B, H, N, d] tensor) adds the
    per-pass bandwidth table (:func:`pass_bandwidth`)."""
    wall = wall_ms(step, device, steps)
    syncs = host_syncs(step, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith(("aten::", "mirrorla::"))]
    device_ms = sum(e.device_time_total for e in kernels) / 1e3 / steps
    by_kernel: Counter = Counter()
    count_kernel: Counter = Counter()
    for e in kernels:
        by_kernel[e.name[:90]] += e.device_time_total / 1e3 / steps
        count_kernel[e.name[:90]] += 1
    by_op: Counter = Counter()
    count_op: Counter = Counter()
    for e in ops:
        by_op[e.name] += e.self_cpu_time_total / 1e3 / steps
        count_op[e.name] += 1
    row = dict(case=name, wall_ms=wall, device_ms=device_ms, kernels=len(kernels) / steps, ops=len(ops) / steps,
               syncs=len(syncs))
    lines.append(f"\n## {name}: wall {wall:.2f} ms/step, device {device_ms:.2f} ms/step, "
                 f"{row['kernels']:.0f} kernels and {row['ops']:.0f} operators per step")
    lines.append(f"host syncs in one step: {len(syncs)} distinct" + "".join(f"\n  {m}" for m in syncs))
    lines.append("top kernels (ms/step, launches/step):")
    for k, ms in by_kernel.most_common(top):
        lines.append(f"  {ms:8.3f}  {count_kernel[k] / steps:6.0f}  {k}")
    if tensor_bytes:
        passes = pass_bandwidth(by_kernel, tensor_bytes)
        if passes:
            lines.append("chunked passes, bytes of their own tensors over their time:")
            lines += passes
    lines.append("top operators by own host time (ms/step, calls/step):")
    for k, ms in by_op.most_common(top):
        lines.append(f"  {ms:8.3f}  {count_op[k] / steps:6.0f}  {k}")
    return row


PASS_TENSORS = {"_token_sums_kernel": 1, "_state_kernel": 2, "_output_kernel": 2, "_backward_q_kernel": 3,
                "_backward_kv_kernel": 4}
"""The [B, H, N, d] tensors each chunked pass of the op must move at least once: the keys' token sums read k, the
state pass k and v, the output pass q and o, the backward's q pass q, do and dq, its k/v pass k, v, dk and dv (the
per-row states and partials are far smaller)."""


def pass_bandwidth(kernel_ms: dict, tensor_bytes: int) -> list[str]:
    """Lines of a table: each chunked pass's device ms per step and the bandwidth its own tensors' bytes
    (:data:`PASS_TENSORS` × ``tensor_bytes``) make at that time. A streaming pass reaches close to the GPU's
    memory bandwidth; one far below the best pass of the step is bound by something else (instructions,
    registers, latency), which its ptxas numbers in ``compile_check.py`` then show."""
    lines = ["| pass | device ms/step | MB moved | GB/s |", "|---|---|---|---|"]
    for name, tensors in PASS_TENSORS.items():
        ms = kernel_ms.get(name)
        if ms:
            moved = tensors * tensor_bytes
            lines.append(f"| {name} | {ms:.3f} | {moved / 1e6:.0f} | {moved / ms / 1e6:.0f} |")
    return lines if len(lines) > 2 else []


BURST = 8
"""Calls between two syncs in :func:`time_calls`: at most a few hundred launches queued, far below what CUDA's
launch queue holds (about a thousand), so the host never waits for the device inside a burst and its clock
measures its own cost. Timed back to back without syncs (200 calls), a piece of some 15 kernels filled the queue,
and from then on the host clock measured the device."""


def time_calls(fn, device: torch.device, calls: int, warmup: int) -> tuple[float, float, float | None]:
    """(host µs, wall µs, device µs) per call of ``fn``, ``calls`` calls in bursts of :data:`BURST` after ``warmup``
    calls. Host: until a burst's last call returns; wall: until the device has finished it too. Device (CUDA only,
    else None): the same calls queued behind a sleeping kernel, so the GPU runs them back to back with no wait for
    the host, timed by CUDA events: how long the GPU needs per call. Host above device: the host limits a loop of
    such calls; device above host: the GPU does."""
    for _ in range(warmup):
        fn()
    sync(device)
    host = wall = 0.0
    done = 0
    while done < calls:
        n = min(BURST, calls - done)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        sync(device)
        host, wall, done = host + t1 - t0, wall + time.perf_counter() - t0, done + n
    if device.type != "cuda":
        return host * 1e6 / calls, wall * 1e6 / calls, None
    # the sleep outlasts the host's issuing of a burst (twice its measured time, at 2 GHz), so the events time the
    # GPU alone
    cycles = int(2 * host / calls * BURST * 2e9) + 100_000
    busy = 0.0
    done = 0
    while done < calls:
        n = min(BURST, calls - done)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        busy, done = busy + start.elapsed_time(end) * 1e3, done + n
    return host * 1e6 / calls, wall * 1e6 / calls, busy / calls


def kernel_path(path: str):
    """Run the Triton ops on the row kernels (``"row"``, wherever they apply) or on the chunked ones only."""
    from mirrorla.ops.tuning import forced_tuning

    return forced_tuning(row_max_tiles=10**9 if path == "row" else 0)


def on_kernel_path(path: str, fn):
    """``fn`` wrapped to run on the kernel path ``path`` (see :func:`kernel_path`)."""
    def call():
        with kernel_path(path):
            return fn()
    return call


def host_costs(device: torch.device, batch: int, lines: list[str], calls: int = 200) -> list[dict]:
    """Per-call times (µs) of the attention's pieces at one DeiT-T layer's shape, called ``calls`` times back to
    back: ``host`` until the last call returns, ``wall`` until the device has finished too."""
    import triton
    import triton.language as tl

    from mirrorla.ops import reflect_projection_rows
    from mirrorla.ops import triton_linear_attention as tla

    @triton.jit
    def _one_arg(X):
        tl.store(X, 1.0)

    h, n, d, c = 3, 197, 64, 192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def qkv(grad: bool):
        x = torch.randn(batch, n, 3, h, d, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
        return [t.detach().requires_grad_(grad) for t in x.unbind(0)]  # strided views, as in the model

    q, k, v = qkv(False)
    qg, kg, vg = qkv(True)
    tiny = torch.zeros(8, device=device)
    theta = torch.rand(h, d // 2, device=device)
    gamma = torch.zeros(h, d // 2, device=device)
    theta_g, gamma_g = theta.clone().requires_grad_(), gamma.clone().requires_grad_()
    grad_out = torch.randn(batch, h, n, d, device=device, dtype=dtype)
    w = torch.randn(3 * c, c, device=device, requires_grad=True)
    bias = torch.randn(3 * c, device=device, requires_grad=True)
    u = torch.randn(c, device=device, requires_grad=True)
    signs = torch.ones(d, device=device)
    x = torch.randn(batch, n, c, device=device)  # a class token and a 14 × 14 grid

    leaves = (qg, kg, vg, theta_g, gamma_g, w, bias, u)

    def fwd_bwd(fn):
        def step():
            out = fn()
            if isinstance(out, tuple):
                torch.autograd.backward([t for t in out if t is not None],
                                        [torch.ones_like(t) for t in out if t is not None])
            else:
                out.backward(grad_out if out.shape == grad_out.shape else torch.ones_like(out))
            for t in leaves:  # dropped, as in a training step: accumulating them would add an add kernel per leaf
                t.grad = None
        return step

    layers = {}
    for attn in ("relu", "mirror"):
        layers[attn] = LinearAttention(c, h, attn=attn).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def layer_step(attn: str, train: bool):
        layer = layers[attn]
        def step():
            if train:
                with autocast:
                    out = layer(x)
                out.float().sum().backward()
                for p in layer.parameters():
                    p.grad = None
            else:
                with torch.no_grad(), autocast:
                    layer(x)
        return step

    def chunked(fn):
        """fn on the chunked kernels (N = 197 takes the row kernels by default): the two paths side by side."""
        return on_kernel_path("chunked", fn)

    state_args = tla._mirror_forward_impl(q, k, v, theta, gamma, 0, 0, 1e-6, 1e-6, True)  # with the moment
    leaf = torch.zeros(8, device=device, requires_grad=True)

    def tiny_backward():
        (leaf * 2.0).sum().backward()
        leaf.grad = None

    def tiny_backward_on_caller():
        # the engine runs a CUDA graph's backward on its device thread by default; this keeps it on the caller's
        with torch.autograd.set_multithreading_enabled(False):
            tiny_backward()

    cases = [
        ("torch: one tiny add", lambda: tiny.add_(1.0)),
        # what one backward() call costs whatever it differentiates: the ops' fwd+bwd rows below pay it once per call
        ("autograd: backward of one multiply", tiny_backward),
        ("autograd: the same on the calling thread", tiny_backward_on_caller),
        ("triton: a one-argument kernel", lambda: _one_arg[(1,)](tiny)),
        ("triton: token sums (one launch + alloc)", lambda: tla._token_sum_parts(k)),
        ("relu op forward (no grad)", lambda: tla._fused_forward_impl(q, k, v, None, 1, 0, 1e-6)),
        ("mirror op forward (no grad)", lambda: tla._mirror_forward_impl(q, k, v, theta, gamma, 0, 0, 1e-6, 1e-6,
                                                                         False)),
        ("relu op backward impl", lambda: tla._fused_backward_impl(q, k, v, None, state_args[1], grad_out, 1, 0,
                                                                   1e-6)),
        ("mirror op backward impl", lambda: tla._mirror_backward_impl(q, k, v, theta, gamma, *state_args[1:],
                                                                      grad_out, 0, 0, 1e-6, 1e-6)),
        ("relu op fwd+bwd (autograd)", fwd_bwd(lambda: tla.fused_linear_attention(qg, kg, vg, feature="relu"))),
        ("mirror op fwd+bwd (autograd)", fwd_bwd(lambda: tla.mirror_linear_attention(qg, kg, vg, theta_g,
                                                                                     gamma_g))),
        ("relu op fwd+bwd, chunked kernels", chunked(fwd_bwd(lambda: tla.fused_linear_attention(qg, kg, vg,
                                                                                                feature="relu")))),
        ("mirror op fwd+bwd, chunked kernels", chunked(fwd_bwd(lambda: tla.mirror_linear_attention(qg, kg, vg,
                                                                                                   theta_g,
                                                                                                   gamma_g)))),
        ("fold forward (no grad)", lambda: reflect_projection_rows(w.detach(), bias.detach(), u.detach(), signs,
                                                                   groups=2)),
        ("fold fwd+bwd (autograd)", fwd_bwd(lambda: reflect_projection_rows(w, bias, u, signs, groups=2))),
        ("layer relu inference (bf16 autocast)", layer_step("relu", False)),
        ("layer mirror inference (bf16 autocast)", layer_step("mirror", False)),
        ("layer relu training step", layer_step("relu", True)),
        ("layer mirror training step", layer_step("mirror", True)),
        ("layer relu training step, chunked kernels", chunked(layer_step("relu", True))),
        ("layer mirror training step, chunked kernels", chunked(layer_step("mirror", True))),
    ]
    return time_pieces(cases, device, calls, lines,
                       f"Host and device cost per call, one DeiT-T layer's shape (batch {batch}, H = 3, N = 197, "
                       f"d = 64), {calls} calls in bursts of {BURST}")


def long_row_costs(device: torch.device, lines: list[str], batch: int = 8, grid: int = 64,
                   calls: int = 40) -> list[dict]:
    """The same columns at DeiT-T's 1024² layer shape (batch 8: B·H = 24 rows of 4,097 tokens, fewer rows than a
    large GPU has SMs), for the op forward+backward and a layer's training step on the kernels the library picks
    there (the chunked ones) and on the row kernels forced (one program per row): whether such a step is bound by
    the host or by the GPU, and which path a step at this shape would rather take (see ``_row_max_tiles``).
    ``grid``: the token grid's side (64 at 1024²), after a class token."""
    from mirrorla.ops import triton_linear_attention as tla

    h, d, c = 3, 64, 192
    n = 1 + grid * grid
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(batch, n, 3, h, d, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = (t.detach().requires_grad_() for t in x.unbind(0))
    theta = torch.rand(h, d // 2, device=device, requires_grad=True)
    gamma = torch.zeros(h, d // 2, device=device, requires_grad=True)
    grad_out = torch.randn(batch, h, n, d, device=device, dtype=dtype)
    tokens = torch.randn(batch, n, c, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    layers = {attn: LinearAttention(c, h, attn=attn).to(device) for attn in ("relu", "mirror")}
    ops = {"relu": lambda: tla.fused_linear_attention(q, k, v, feature="relu"),
           "mirror": lambda: tla.mirror_linear_attention(q, k, v, theta, gamma)}

    def op_step(attn: str):
        def step():
            ops[attn]().backward(grad_out)
            q.grad = k.grad = v.grad = theta.grad = gamma.grad = None
        return step

    def layer_step(attn: str):
        def step():
            with autocast:
                out = layers[attn](tokens)
            out.float().sum().backward()
            for p in layers[attn].parameters():
                p.grad = None
        return step

    cases = []
    for attn in ("relu", "mirror"):
        cases += [(f"{attn} op fwd+bwd", op_step(attn)),
                  (f"{attn} op fwd+bwd, row kernels", on_kernel_path("row", op_step(attn))),
                  (f"layer {attn} training step", layer_step(attn)),
                  (f"layer {attn} training step, row kernels", on_kernel_path("row", layer_step(attn)))]
    return time_pieces(cases, device, calls, lines,
                       f"Host and device cost per call, DeiT-T's {16 * grid}² layer shape (batch {batch}, H = 3, "
                       f"N = {n}, d = 64), {calls} calls in bursts of {BURST}")


def time_pieces(cases, device: torch.device, calls: int, lines: list[str], title: str) -> list[dict]:
    """Time each ``(name, fn)`` with :func:`time_calls` and add a table of host, device and wall µs per call."""
    rows = []
    lines += ["", f"## {title}", "",
              "| piece | host µs/call | device µs/call | wall µs/call | host syncs |", "|---|---|---|---|---|"]
    for name, fn in cases:
        host_us, wall_us, device_us = time_calls(fn, device, calls, warmup=5)
        syncs = host_syncs(fn, device)
        row = dict(piece=name, host_us=host_us, device_us=device_us, wall_us=wall_us, syncs=syncs)
        rows.append(row)
        shown = "–" if device_us is None else f"{device_us:.1f}"
        lines.append(f"| {name} | {host_us:.1f} | {shown} | {wall_us:.1f} | {len(syncs)} |")
        print(lines[-1], flush=True)
        for m in syncs:
            lines.append(f"|   sync: {m} | | | | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--attn", default="softmax,relu,mirror")
    p.add_argument("--mode", default="infer,train")
    p.add_argument("--op", type=int, default=0, help="also profile the op alone at this many tokens (B=8, H=3, d=64)")
    p.add_argument("--host", action="store_true", help="first time the attention's pieces one by one (host cost)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    lines: list[str] = [f"# Profile on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
                        f"torch {torch.__version__}"]
    rows = []
    if args.host:
        host_costs(device, args.batch, lines)
        long_row_costs(device, lines)
    for mode in args.mode.split(","):
        for attn in args.attn.split(","):
            if args.op:
                rows.append(profile_case(f"op {attn} {mode} N={args.op}", op_step(attn, mode, args.op, device),
                                         device, args.steps, args.top, lines,
                                         tensor_bytes=op_tensor_bytes(args.op, device)))
            rows.append(profile_case(f"deit_tiny {attn} {mode} {args.img_size}px batch {args.batch}",
                                     model_step(attn, mode, args.img_size, args.batch, device),
                                     device, args.steps, args.top, lines))
            for r in rows[-2 if args.op else -1:]:
                print(f"{r['case']}: wall {r['wall_ms']:.2f} ms, device {r['device_ms']:.2f} ms, "
                      f"{r['kernels']:.0f} kernels, {r['ops']:.0f} operators per step", flush=True)
    summary = ["", "| case | wall ms | device ms | kernels/step | operators/step | host syncs |",
               "|---|---|---|---|---|---|"]
    summary += [f"| {r['case']} | {r['wall_ms']:.2f} | {r['device_ms']:.2f} | {r['kernels']:.0f} | {r['ops']:.0f} "
                f"| {r['syncs']} |" for r in rows]
    text = "\n".join(lines[:1] + summary + lines[1:]) + "\n"
    print("\n".join(summary))
    if args.out:  # written whole or not at all (a killed run leaves no half report)
        from pathlib import Path

        from mirrorla.tools.checkpoint import atomic_write_text

        atomic_write_text(Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
