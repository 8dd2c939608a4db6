"""``mirrorla tune``: measure the Triton path's per-GPU launch settings on this GPU and write them down.

The settings (:mod:`mirrorla.ops.tuning`) are where the row kernels stop paying (``row_max_tiles``), the chunked
backward's ``(token tile, warps)``: ``backward_blocks`` for tensor-core dots (bf16/fp16 inputs, fp32 ones with
TF32 allowed) and ``ieee_backward_blocks`` for IEEE fp32 dots (fp32 inputs at torch's default matmul precision),
and ``moment_state_blocks``, the same for the chunked state pass of a rotation's training forward.
They are measured at the shape of the speed targets (B = 8, H = 3, d = 64; bf16, and fp32 for the IEEE setting;
the row kernels with a larger batch, below) and turned into settings by rules fixed here, before any run:

- **row_max_tiles.** The ops ``relu`` and ``mirror``, forward and forward+backward, run on the row kernels and on
  the chunked kernels at each N of ``--lengths``, with at least as many (b, h) rows as the GPU has SMs (batch
  ``max(--batch, ⌈SMs / H⌉)``): the library caps rows beyond the default's 8 tiles at fewer rows, where one program
  per row leaves SMs idle (see ``_row_max_tiles`` in :mod:`mirrorla.ops.triton_linear_attention`), so the setting
  only applies from there. Each time is the median of ``--repeats`` timings of ``--calls`` calls back to back
  (wall clock, device finished). The row kernels *win* at N when they take at most the chunked
  kernels' time in all four cases. The setting is the tile count (64 tokens) of the largest N at which they win
  and at every shorter N measured; 0 (chunked kernels only) when they lose at the shortest.
- **backward_blocks, ieee_backward_blocks, moment_state_blocks.** Each option of the setting
  (:data:`BLOCK_SETTINGS`, the first the default) first runs the MirrorLA op forward and backward on the chunked
  kernels; an option whose gradients (q, k, v, θ, γ) differ from the default's by more than
  :data:`GRAD_TOLERANCE` (largest error over the largest value) is out. What the setting drives is then timed
  alone with each option at each N of ``--block-lengths``: for the backward settings the chunked backward
  (``relu`` and ``mirror``), for ``moment_state_blocks`` the chunked training forward (``mirror``, and
  ``rotate_relu`` with a given angle). An option's score is the geometric mean of its time over the default's;
  the best score wins if it is at most :data:`MIN_GAIN` and no single case is slower than :data:`MAX_LOSS` times
  the default's. Otherwise the default stays.

Writes (or updates) the GPU's entry in ``--out`` (a tuning file, other GPUs' entries kept) and, with ``--report
DIR``, ``tune.json`` (every timing), ``tune.md`` and ``tune.png`` there. ``MIRRORLA_TUNING=FILE`` makes the library
use the file; this project's measured entries live in ``src/mirrorla/ops/kernel_tuning.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..backend import triton_interpreter_problem
from ..ops.tuning import DEFAULT_TUNING, TUNING_FORMAT, KernelTuning, forced_tuning, read_tuning_file
from .checkpoint import atomic_savefig, atomic_write_text

BLOCK_N = 64  # the kernels' token tile at d ≤ 64: row_max_tiles counts these
BLOCK_SETTINGS = {  # setting: (its options, the first the default; the fp32 matmul precision that selects it)
    "backward_blocks": (((64, 4), (64, 8), (32, 4), (32, 8)), "high"),
    "ieee_backward_blocks": (((16, 8), (16, 4), (32, 8), (64, 4)), "highest"),
    "moment_state_blocks": (((64, 4), (32, 4), (32, 8), (16, 4)), "high"),
}
SETTING_PASSES = {  # what each block setting drives, as the report names it
    "backward_blocks": "the chunked backward",
    "ieee_backward_blocks": "the chunked backward",
    "moment_state_blocks": "the chunked training forward of a rotation (its state pass also sums the moment)",
}
GRAD_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-5}
MIN_GAIN = 0.95  # an option must save at least 5 % (geometric mean over the cases) to replace the default
MAX_LOSS = 1.05  # and may lose at most 5 % in any single case
PATH_LENGTHS = (64, 197, 512, 1024, 2048, 4096)
BLOCK_LENGTHS = (4096, 16384, 65536)
HEADS, HEAD_DIM = 3, 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, calls: int, repeats: int, warmup: int = 3) -> float:
    """Median over ``repeats`` of the wall µs per call of ``fn`` called ``calls`` times back to back (device
    finished), after ``warmup`` calls (compilation, allocator)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(times)


def _qkv(batch: int, n: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """q, k, v ``[B, H, N, d]``: strided views of one qkv tensor, as a model's projection gives them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(batch, n, 3, HEADS, HEAD_DIM, generator=g).to(device, dtype).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _angles(device: torch.device, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    theta = torch.rand(HEADS, HEAD_DIM // 2, generator=g).to(device)
    gamma = (0.5 * torch.randn(HEADS, HEAD_DIM // 2, generator=g)).to(device)
    return theta, gamma


def _ops(device: torch.device):
    from ..ops import triton_linear_attention as tla

    theta, gamma = (t.requires_grad_() for t in _angles(device))
    return {"relu": lambda q, k, v: tla.fused_linear_attention(q, k, v, feature="relu"),
            "mirror": lambda q, k, v: tla.mirror_linear_attention(q, k, v, theta, gamma)}


def measure_paths(device: torch.device, dtype: torch.dtype, lengths=PATH_LENGTHS, batch: int = 8, calls: int = 20,
                  repeats: int = 5, warmup: int = 3, progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The ops on the row kernels and on the chunked kernels at each N: ``{n, attn, mode, row_us, chunked_us}``."""
    rows = []
    ops = _ops(device)
    for n in lengths:
        q, k, v = (t.detach().requires_grad_() for t in _qkv(batch, n, device, dtype))
        grad = torch.randn(batch, HEADS, n, HEAD_DIM, device=device, dtype=dtype)
        for attn, op in ops.items():
            for mode in ("fwd", "fwd+bwd"):
                def call(op=op, mode=mode, q=q, k=k, v=v, grad=grad):
                    if mode == "fwd":
                        with torch.no_grad():
                            op(q, k, v)
                    else:
                        op(q, k, v).backward(grad)
                times = {}
                for path, tiles in (("row", 10**9), ("chunked", 0)):
                    with forced_tuning(row_max_tiles=tiles):
                        times[path] = time_call(call, device, calls, repeats, warmup)
                rows.append(dict(n=n, attn=attn, mode=mode, row_us=times["row"], chunked_us=times["chunked"]))
                progress(f"paths  N={n:<6} {attn:<6} {mode:<7} row {times['row']:9.1f} µs  chunked "
                         f"{times['chunked']:9.1f} µs  row/chunked {times['row'] / times['chunked']:.2f}")
    return rows


def path_batch(device: torch.device, batch: int) -> int:
    """The batch at which the row kernels race the chunked kernels: ``batch``, raised on a GPU to ``⌈SMs / H⌉`` so
    that B·H is at least its SM count (where ``row_max_tiles`` applies beyond the default's tiles)."""
    if device.type != "cuda":
        return batch
    return max(batch, -(-torch.cuda.get_device_properties(device).multi_processor_count // HEADS))


def _block_name(blocks: tuple[int, int]) -> str:
    return f"{blocks[0]}x{blocks[1]}"


@contextlib.contextmanager
def matmul_precision(precision: str):
    """``torch.set_float32_matmul_precision(precision)`` inside the block (it selects IEEE or TF32 dots for fp32
    inputs, and so which backward setting applies), restored after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def setting_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The inputs a block setting is measured on: bf16 on a GPU for the tensor-core settings, fp32 for the IEEE one
    (and in the interpreter, which has no bf16 dots; the precision then picks the setting)."""
    return torch.bfloat16 if setting != "ieee_backward_blocks" and device.type == "cuda" else torch.float32


def check_block_options(device: torch.device, setting: str = "backward_blocks", n: int = 4096,
                        batch: int = 2) -> dict[str, float]:
    """Per option of ``setting`` (see :data:`BLOCK_SETTINGS`), the largest relative error of the MirrorLA op's
    gradients (q, k, v, θ, γ) on the chunked kernels against the default option's (the same sums in other
    orders): ``{"32x8": error, ...}``."""
    from ..ops import triton_linear_attention as tla

    options, precision = BLOCK_SETTINGS[setting]
    theta, gamma = (t.requires_grad_() for t in _angles(device))
    q, k, v = (t.detach().requires_grad_() for t in _qkv(batch, n, device, setting_dtype(setting, device), seed=2))
    grads = {}
    with matmul_precision(precision):
        for blocks in options:
            with forced_tuning(row_max_tiles=0, **{setting: blocks}):
                out = tla.mirror_linear_attention(q, k, v, theta, gamma)
                grads[blocks] = torch.autograd.grad(out.float().square().mean(), [q, k, v, theta, gamma])
    errors = {}
    for blocks in options[1:]:
        errors[_block_name(blocks)] = max(
            ((a.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
            for a, w in zip(grads[blocks], grads[options[0]], strict=True))
    return errors


def measure_block_options(device: torch.device, setting: str = "backward_blocks", lengths=BLOCK_LENGTHS,
                          batch: int = 8, calls: int = 10, repeats: int = 5, warmup: int = 3,
                          progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """What ``setting`` drives, alone, with each of its options: the chunked backward (the ops' backward
    implementations on one saved forward) or, for ``moment_state_blocks``, the chunked training forward (with the
    moment): ``{n, attn, us: {"64x4": µs, ...}}``."""
    from ..ops import triton_linear_attention as tla

    options, precision = BLOCK_SETTINGS[setting]
    dtype = setting_dtype(setting, device)
    theta, gamma = _angles(device)
    rows = []
    with matmul_precision(precision), forced_tuning(row_max_tiles=0), torch.no_grad():
        for n in lengths:
            q, k, v = _qkv(batch, n, device, dtype)
            if setting == "moment_state_blocks":  # adjacent pairs (0), Δα form tanh_log (0); moment on
                angle = 2.0 * theta.expand(batch, HEADS, HEAD_DIM // 2)
                grad = state = saved = None
                timed = {
                    "mirror": lambda q=q, k=k, v=v: tla._mirror_forward_impl(q, k, v, theta, gamma, 0, 0, 1e-6, 1e-6,
                                                                             True),
                    "rotate_relu": lambda q=q, k=k, v=v, a=angle: tla._fused_forward_impl(q, k, v, a, 2, 0, 1e-6,
                                                                                         True)}
            else:
                grad = torch.randn(batch, HEADS, n, HEAD_DIM, device=device, dtype=dtype)
                _, state = tla._fused_forward_impl(q, k, v, None, 1, 0, 1e-6)
                saved = tla._mirror_forward_impl(q, k, v, theta, gamma, 0, 0, 1e-6, 1e-6)[1:]
                timed = {  # relu: feature 1; mirror: adjacent pairs (0), Δα form tanh_log (0)
                    "relu": lambda q=q, k=k, v=v, s=state, g=grad: tla._fused_backward_impl(q, k, v, None, s, g, 1,
                                                                                          0, 1e-6),
                    "mirror": lambda q=q, k=k, v=v, s=saved, g=grad: tla._mirror_backward_impl(
                        q, k, v, theta, gamma, *s, g, 0, 0, 1e-6, 1e-6)}
            for attn, fn in timed.items():
                us = {}
                for blocks in options:
                    with forced_tuning(row_max_tiles=0, **{setting: blocks}):
                        us[_block_name(blocks)] = time_call(fn, device, calls, repeats, warmup)
                rows.append(dict(n=n, attn=attn, us=us))
                base = us[_block_name(options[0])]
                progress(f"{setting} N={n:<6} {attn:<6} " + "  ".join(
                    f"{name} {t:8.1f} µs ({t / base:.2f})" for name, t in us.items()))
            del q, k, v, grad, state, saved
    return rows


def choose_row_max_tiles(rows: list[dict[str, Any]], block_n: int = BLOCK_N) -> tuple[int, str]:
    """The rule of the module docstring: (row_max_tiles, why)."""
    by_n: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_n.setdefault(r["n"], []).append(r)
    if not by_n:
        raise ValueError("no path timings to choose row_max_tiles from")
    chosen, why = 0, None
    for n in sorted(by_n):
        losing = [r for r in by_n[n] if r["row_us"] > r["chunked_us"]]
        if losing:
            worst = max(losing, key=lambda r: r["row_us"] / r["chunked_us"])
            why = (f"the row kernels lose at N = {n} ({worst['attn']} {worst['mode']}: "
                   f"{worst['row_us'] / worst['chunked_us']:.2f}× the chunked kernels' time)")
            break
        chosen = -(-n // block_n)
    if why is None:
        why = f"the row kernels win at every N measured, up to {max(by_n)}"
    if chosen == 0:
        return 0, f"{why}: the chunked kernels run every row"
    tiles = f"{chosen} tile{'s' if chosen > 1 else ''}"
    return chosen, f"{why}: rows of at most {tiles} ({chosen * block_n} tokens) take them"


def choose_backward_blocks(rows: list[dict[str, Any]], errors: dict[str, float], tolerance: float,
                           options=None) -> tuple[tuple[int, int], str]:
    """The rule of the module docstring: ((token tile, warps), why). ``options``: those of ``backward_blocks``
    unless given, the first the default."""
    options = options or BLOCK_SETTINGS["backward_blocks"][0]
    default = options[0]
    if not rows:
        raise ValueError("no backward timings to choose backward blocks from")
    scores = {}
    for blocks in options[1:]:
        name = _block_name(blocks)
        if errors.get(name, math.inf) > tolerance:
            continue
        ratios = [r["us"][name] / r["us"][_block_name(default)] for r in rows]
        scores[blocks] = (math.exp(statistics.fmean(math.log(x) for x in ratios)), max(ratios))
    excluded = [_block_name(b) for b in options[1:] if b not in scores]
    note = f" ({', '.join(excluded)} out: gradients differ by more than {tolerance:g})" if excluded else ""
    if not scores:
        return default, f"no option's gradients matched the default's{note}: the default {_block_name(default)} stays"
    best = min(scores, key=lambda b: scores[b][0])
    mean, worst = scores[best]
    summary = f"best option {_block_name(best)}: {mean:.3f}× the default's time on average, {worst:.3f}× at worst"
    if mean <= MIN_GAIN and worst <= MAX_LOSS:
        return best, f"{summary}{note}: it replaces {_block_name(default)}"
    return default, (f"{summary}{note}: not enough (needs ≤ {MIN_GAIN} on average and ≤ {MAX_LOSS} in every "
                     f"case), the default {_block_name(default)} stays")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"


def tune(device: torch.device, *, lengths=PATH_LENGTHS, block_lengths=BLOCK_LENGTHS, batch: int = 8,
         calls: int = 20, block_calls: int = 10, repeats: int = 5, warmup: int = 3, check_n: int = 4096,
         progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure and decide: the result with every timing, the chosen :class:`KernelTuning` and the reasons."""
    import triton

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    row_batch = path_batch(device, batch)
    paths = measure_paths(device, dtype, lengths, row_batch, calls, repeats, warmup, progress)
    row_max_tiles, row_why = choose_row_max_tiles(paths)
    chosen, reasons, blocks = {}, {"row_max_tiles": row_why}, {}
    for setting, (options, _) in BLOCK_SETTINGS.items():
        errors = check_block_options(device, setting, n=check_n)
        progress(f"{setting} gradients against the default's: " + ", ".join(
            f"{name} {error:.1e}" for name, error in errors.items()))
        rows = measure_block_options(device, setting, block_lengths, batch, block_calls, repeats, warmup, progress)
        dtype_blocks = setting_dtype(setting, device)
        chosen[setting], reasons[setting] = choose_backward_blocks(rows, errors, GRAD_TOLERANCE[dtype_blocks],
                                                                   options)
        blocks[setting] = dict(dtype=str(dtype_blocks).replace("torch.", ""), errors=errors,
                               tolerance=GRAD_TOLERANCE[dtype_blocks], rows=rows)
    gpu = _device_name(device)
    when = datetime.date.today().isoformat()
    measured = (f"mirrorla tune on {when}, torch {torch.__version__}, triton {triton.__version__}, "
                f"B={batch} (row kernels: B={row_batch}), H={HEADS}, d={HEAD_DIM}, {str(dtype).replace('torch.', '')}")
    tuning = KernelTuning(row_max_tiles=row_max_tiles, **chosen, source=measured)
    return dict(gpu=gpu, measured=measured, dtype=str(dtype).replace("torch.", ""), batch=batch, row_batch=row_batch,
                seconds=round(time.perf_counter() - started, 1), paths=paths, blocks=blocks,
                tuning=tuning.settings(), reasons=reasons)


def write_tuning_entry(path: Path, gpu: str, tuning: dict[str, Any], measured: str) -> None:
    """Set ``gpu``'s entry of the tuning file at ``path`` (created if missing; other entries kept), atomically."""
    path = Path(path)
    data: dict[str, Any] = {"format": TUNING_FORMAT, "gpus": {}}
    if path.exists():
        read_tuning_file(path)  # a malformed file is an error here, before it is replaced
        data = json.loads(path.read_text())
    data["gpus"][gpu] = {**tuning, "measured": measured}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _markdown(result: dict[str, Any]) -> str:
    t = result["tuning"]
    lines = [f"# Kernel tuning: {result['gpu']}", "", f"{result['measured']}; {result['seconds']} s.", "",
             f"- **row_max_tiles = {t['row_max_tiles']}**: {result['reasons']['row_max_tiles']}."]
    lines += [f"- **{setting} = {tuple(t[setting])}**: {result['reasons'][setting]}." for setting in result["blocks"]]
    lines += ["", f"## Row kernels against chunked kernels (batch {result['row_batch']}, wall µs "
                  "per call, median)", "",
              "| N | attention | mode | row | chunked | row / chunked |", "|---|---|---|---|---|---|"]
    for r in result["paths"]:
        lines.append(f"| {r['n']} | {r['attn']} | {r['mode']} | {r['row_us']:.1f} | {r['chunked_us']:.1f} | "
                     f"{r['row_us'] / r['chunked_us']:.2f} |")
    for setting, measured in result["blocks"].items():
        names = list(measured["rows"][0]["us"]) if measured["rows"] else []
        lines += ["", f"## {setting}: {SETTING_PASSES[setting]} by (token tile x warps), {measured['dtype']} inputs "
                      "(wall µs per call, median; × the first, the default)", "",
                  "Gradients against the default's (largest error over largest value): " + ", ".join(
                      f"{k} {v:.1e}" for k, v in measured["errors"].items())
                  + f" (tolerance {measured['tolerance']:g}).", "",
                  "| N | attention | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in measured["rows"]:
            base = r["us"][names[0]]
            lines.append(f"| {r['n']} | {r['attn']} | " + " | ".join(
                f"{us:.1f}" + ("" if i == 0 else f" (× {us / base:.2f})") for i, us in enumerate(r["us"].values()))
                + " |")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(result["blocks"])
    fig, axes = plt.subplots(1, 1 + len(settings), figsize=(5.5 * (1 + len(settings)), 4))
    left = axes[0]
    cases = sorted({(r["attn"], r["mode"]) for r in result["paths"]})
    for attn, mode in cases:
        rs = [r for r in result["paths"] if (r["attn"], r["mode"]) == (attn, mode)]
        left.plot([r["n"] for r in rs], [r["row_us"] / r["chunked_us"] for r in rs], marker="o",
                  label=f"{attn} {mode}")
    left.axhline(1.0, color="grey", lw=0.8)
    tiles = result["tuning"]["row_max_tiles"]
    if tiles:
        left.axvline(tiles * BLOCK_N, color="black", ls="--", lw=0.8, label=f"row_max_tiles = {tiles}")
    left.set(xscale="log", xlabel="tokens N", ylabel="row / chunked time", title="row kernels (< 1: faster)")
    left.legend(fontsize=7)
    for ax, setting in zip(axes[1:], settings, strict=True):
        rows = result["blocks"][setting]["rows"]
        names = list(rows[0]["us"]) if rows else []
        labels = [f"{r['attn']}\nN={r['n']}" for r in rows]
        width = 0.8 / max(1, len(names) - 1)
        for i, name in enumerate(names[1:]):
            ax.bar([x + i * width for x in range(len(labels))], [r["us"][name] / r["us"][names[0]] for r in rows],
                   width, label=name)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([x + width * (len(names) - 2) / 2 for x in range(len(labels))], labels, fontsize=7)
        ax.set(ylabel=f"time / default {names[0] if names else ''}",
               title=f"{setting}, {result['blocks'][setting]['dtype']} "
                     f"(chosen {_block_name(tuple(result['tuning'][setting]))})")
        ax.legend(fontsize=7)
    fig.suptitle(f"mirrorla tune: {result['gpu']}", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def write_report(result: dict[str, Any], out: Path) -> None:
    """``tune.json`` (every timing), ``tune.md`` and ``tune.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tune.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "tune.md", _markdown(result))
    _plot(result, out / "tune.png")


def _lengths(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be comma-separated token counts ≥ 1, got {text!r}")
    return values


def cmd_tune(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is available (mirrorla tune measures a GPU)")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 (its times "
                         "say nothing about a GPU; for checking this tool only)")
    problem = triton_interpreter_problem() if device.type == "cpu" else None
    if problem:
        raise ValueError(problem)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda[:N] or cpu, got {args.device!r}")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    lengths = _lengths(args.lengths, "--lengths")
    block_lengths = _lengths(args.block_lengths, "--block-lengths")
    for name, least in (("batch", 1), ("calls", 1), ("repeats", 1), ("warmup", 1)):
        if getattr(args, name) < least:
            raise ValueError(f"--{name} must be ≥ {least}, got {getattr(args, name)}")
    out = Path(args.out)
    if out.exists():
        read_tuning_file(out)  # refuse a malformed file before minutes of measuring
    if args.report and (Path(args.report) / "tune.json").exists() and not args.overwrite:
        raise ValueError(f"--report {args.report} already holds a tuning report (tune.json): pass --overwrite to "
                         "replace it, or another directory")
    result = tune(device, lengths=lengths, block_lengths=block_lengths, batch=args.batch, calls=args.calls,
                  block_calls=max(1, args.calls // 2), repeats=args.repeats, warmup=args.warmup,
                  check_n=min(4096, max(block_lengths)),
                  progress=lambda line: print(line, flush=True))
    write_tuning_entry(out, result["gpu"], result["tuning"], result["measured"])
    if args.report:
        write_report(result, Path(args.report))
    t = result["tuning"]
    print(f"row_max_tiles = {t['row_max_tiles']}: {result['reasons']['row_max_tiles']}")
    for setting in result["blocks"]:
        print(f"{setting} = {tuple(t[setting])}: {result['reasons'][setting]}")
    print(f"wrote {result['gpu']!r} to {out}" + (f", the report to {args.report}" if args.report else "")
          + f"; MIRRORLA_TUNING={out} makes the library use it")
    if t == DEFAULT_TUNING.settings():
        print("(the measured settings are the defaults)")
    return 0
