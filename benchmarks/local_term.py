"""The local term's depthwise convolution with its grid in channels-last order (what ``LinearAttention`` does)
against NCHW order (what it did before), forward and forward+backward, both measured in the same run.

The local term convolves V over the token grid with a 5 × 5 depthwise kernel. V comes out of the qkv projection
with its channels innermost, so the channels-last grid is a view of it; the NCHW grid is a transposed copy. On
CUDA, PyTorch runs an NCHW depthwise convolution in bf16 in its own depthwise kernel and a channels-last one in
cuDNN (``torch._C._select_conv_backend``); on CPUs both take oneDNN, in different layouts.

Cases: DeiT-T's width (C = 192, H = 3) at the token grids of several image sizes (16-pixel patches, a class token).
Times are medians of ``--repeats`` timings (CUDA events on a GPU, the host clock on a CPU) after warm-up, the two
orders called in turn in every round.

Usage: PYTHONPATH=src python benchmarks/local_term.py [--device cpu] [--dtype fp32|bf16]
       [--sizes 224:32,512:8,1024:8] [--repeats 9] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from mirrorla.attention import LinearAttention
from mirrorla.tools.checkpoint import atomic_write_text

ORDERS = ("channels-last", "NCHW")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sizes(text: str) -> list[tuple[int, int]]:
    """``"224:32,1024:8"`` → [(image, batch), ...]; images must be multiples of the 16-pixel patch."""
    sizes = []
    for item in text.split(","):
        image, _, batch = item.strip().partition(":")
        if not (image.isdigit() and batch.isdigit()) or int(image) % 16 or int(image) < 16 or int(batch) < 1:
            raise ValueError(f"--sizes takes IMAGE:BATCH pairs with IMAGE a multiple of 16, got {item!r}")
        sizes.append((int(image), int(batch)))
    return sizes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fns: dict, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """Median ms per call of each of ``fns`` (name → function) over ``repeats`` rounds, after ``warmup`` calls of
    each. Each round calls every function once, in turn, so a machine's drift (CPUs drift by tens of percent between
    seconds) reaches them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_call_ms(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def measure(device: torch.device, dtype: torch.dtype, sizes: list[tuple[int, int]], repeats: int) -> list[dict]:
    """``{image, batch, mode, "channels-last": ms, "NCHW": ms}`` per size and mode (fwd, fwd+bwd)."""
    heads, width = 3, 192
    layer = LinearAttention(width, heads, attn="relu").to(device=device, dtype=dtype)
    rows = []
    for image, batch in sizes:
        side = image // 16
        qkv = torch.randn(batch, 1 + side * side, 3, heads, width // heads, device=device, dtype=dtype)
        v = qkv.permute(2, 0, 3, 1, 4)[2].detach().requires_grad_()  # as the projection gives it: a strided view

        def conv(order: str, v=v, side=side):
            grid = layer._local_grid(v, 1, (side, side))
            return layer.local(grid if order == "channels-last" else grid.contiguous())

        def forward(order: str, conv=conv):
            with torch.no_grad():
                conv(order)

        def train(order: str, conv=conv, v=v):
            conv(order).float().sum().backward()
            v.grad = None
            layer.zero_grad(set_to_none=True)

        row_fwd = dict(image=image, batch=batch, mode="fwd")
        row_train = dict(image=image, batch=batch, mode="fwd+bwd")
        for row, step in ((row_fwd, forward), (row_train, train)):
            row.update(time_ms({order: (lambda order=order, step=step: step(order)) for order in ORDERS}, device,
                               repeats))
        rows += [row_fwd, row_train]
        for row in (row_fwd, row_train):
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    ratio = row["NCHW"] / row["channels-last"]
    return (f"| {row['image']}² | {row['batch']} | {row['mode']} | {row['channels-last']:.2f} | {row['NCHW']:.2f} | "
            f"{ratio:.2f} |")


def report(rows: list[dict], device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    lines = [f"# The local term's convolution, grid channels-last against NCHW ({name}, torch {torch.__version__}, "
             f"{str(dtype).replace('torch.', '')})", "",
             "DeiT-T's width (C = 192), a 5 × 5 depthwise kernel over the token grid (16-pixel patches); median ms "
             "per call; NCHW / channels-last > 1: channels-last is faster.", "",
             "| image | batch | mode | channels-last ms | NCHW ms | NCHW / channels-last |",
             "|---|---|---|---|---|---|"]
    return "\n".join(lines + [_line(r) for r in rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--sizes", default="224:32,512:8,1024:8", help="IMAGE:BATCH pairs (default 224:32,512:8,1024:8)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    try:
        sizes = _sizes(args.sizes)
        if args.repeats < 1:
            raise ValueError(f"--repeats must be ≥ 1, got {args.repeats}")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA GPU is available")
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    rows = measure(device, dtype, sizes, args.repeats)
    text = report(rows, device, dtype)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
