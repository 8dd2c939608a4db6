"""Host cost of an attention layer's step without a GPU: Python, dispatch and autograd, with the Triton kernels
stubbed out.

An eager DeiT-T training step at 224² is bound by the host on a GPU (``gpu_profile.py``): what decides its speed is
how many operators and kernel launches each layer issues and how much Python runs around them. This script measures
that part on a CPU. It runs ``LinearAttention`` layers on the Triton backend in Triton's interpreter with every
kernel launch replaced by a counter that does nothing, so a step costs only its host work (plus the torch operators'
CPU arithmetic on small tensors, the same for every attention). Per attention it reports the host µs per training
step (forward, backward of the output's sum, gradients dropped) and per inference forward, the aten operators
dispatched (nested ones included), and the Triton launches per kernel.

What it does not measure: Triton's own launcher (argument binding, the driver call: 15–30 µs per launch on an
H200's host, ``gpu_profile.py --host``), the CUDA caching allocator, and anything on the GPU. Compare attentions
within one run; the absolute µs belong to this CPU.

Usage: PYTHONPATH=src python benchmarks/host_cost.py [--attn relu,mirror] [--tokens 17] [--batch 1] [--dim 192]
       [--heads 3] [--no-autocast] [--steps 100] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time


@contextlib.contextmanager
def stubbed_launches():
    """Inside the block every Triton kernel launch (in the interpreter) only counts itself, per kernel name, in the
    counter it yields; the launcher is restored after the block."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: collections.Counter = collections.Counter()
    run = InterpretedFunction.run

    def count(self, *args, **kwargs):
        launches[getattr(self.fn, "__name__", "kernel")] += 1

    InterpretedFunction.run = count
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


def _median_us(fn, steps: int, repeats: int) -> float:
    for _ in range(max(5, steps // 10)):  # caches, allocator
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(times)


def _aten_ops(fn) -> int:
    """The operators one call of ``fn`` dispatches, nested ones included (each costs host time on a GPU), as
    ``gpu_profile.py`` counts them per step."""
    import torch

    with torch.profiler.profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith(("aten::", "mirrorla::")))


def measure(attns, *, tokens: int, batch: int, dim: int, heads: int, steps: int, repeats: int,
            autocast: bool = True) -> list[dict]:
    """Per attention: host µs, dispatched operators and Triton launches (per kernel) of a training step and of
    an inference forward. Needs ``TRITON_INTERPRET=1`` and ``MIRRORLA_BACKEND=triton`` set. ``autocast``: bf16
    autocast, as models train on GPUs (the projections' casts are part of the step)."""
    import torch

    from mirrorla import LinearAttention

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(batch, tokens, dim)
    rows = []
    try:
        with stubbed_launches() as launches:
            for attn in attns:
                layer = LinearAttention(dim, num_heads=heads, attn=attn, qkv_bias=True)

                def train_step(layer=layer):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        out = layer(x)
                    out.float().sum().backward()
                    for p in layer.parameters():
                        p.grad = None

                def infer(layer=layer):
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        layer(x)

                row = {"attn": attn}
                for mode, fn in (("train", train_step), ("infer", infer)):
                    row[f"{mode}_us"] = _median_us(fn, steps, repeats)
                    row[f"{mode}_ops"] = _aten_ops(fn)
                    launches.clear()
                    fn()
                    row[f"{mode}_launches"] = dict(launches)
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def report(rows: list[dict], args) -> str:
    lines = [f"# Host cost per layer step, Triton kernels stubbed (CPU, one thread; LinearAttention C = {args.dim}, "
             f"H = {args.heads}, batch {args.batch}, {args.tokens} tokens, qkv bias, "
             f"{'bf16 autocast' if args.autocast else 'fp32'})", "",
             "| attention | train µs/step | train operators | train Triton launches | infer µs | infer operators | "
             "infer Triton launches |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attn']} | {r['train_us']:.0f} | {r['train_ops']} | {sum(r['train_launches'].values())} | "
                     f"{r['infer_us']:.0f} | {r['infer_ops']} | {sum(r['infer_launches'].values())} |")
    lines += ["", "Triton launches per kernel (training step):"]
    for r in rows:
        kernels = ", ".join(f"{name} {n}" for name, n in sorted(r["train_launches"].items())) or "none"
        lines.append(f"- {r['attn']}: {kernels}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attn", default="relu,mirror", help="comma-separated linear attentions")
    p.add_argument("--tokens", type=int, default=17, help="tokens per image (default 17, a class token and a 4 × 4 "
                   "grid: small, so the torch operators' CPU arithmetic stays small; the counts are those of any row "
                   "the row kernels take, up to 512 tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-autocast", dest="autocast", action="store_false", help="fp32 steps (default: bf16 autocast, "
                   "as models train on GPUs)")
    p.add_argument("--dim", type=int, default=192, help="channels C (192: DeiT-T)")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from mirrorla.attention import list_attentions

    attns = [a.strip() for a in args.attn.split(",") if a.strip()]
    linear = [a for a in list_attentions() if a != "softmax"]
    if not attns or any(a not in linear for a in attns):
        print(f"host_cost: --attn takes linear attentions ({', '.join(linear)}), got {args.attn!r}", file=sys.stderr)
        return 2
    for name in ("tokens", "batch", "dim", "heads", "steps", "repeats"):
        if getattr(args, name) < 1:
            print(f"host_cost: --{name} must be a positive int, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.dim % args.heads:
        print(f"host_cost: --dim ({args.dim}) must be divisible by --heads ({args.heads})", file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the interpreter's launcher is the one stubbed
    os.environ["MIRRORLA_BACKEND"] = "triton"
    text = report(measure(attns, tokens=args.tokens, batch=args.batch, dim=args.dim, heads=args.heads,
                          steps=args.steps, repeats=args.repeats, autocast=args.autocast), args)
    print(text, end="")
    if args.out:
        from pathlib import Path

        from mirrorla.tools.checkpoint import atomic_write_text

        atomic_write_text(Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
