"""Helpers for the Triton launchers: integer arithmetic, the launch device, whether a CUDA graph records the
launches (:func:`graph_capturing`), and ``@sizes_jit``, the kernels' ``triton.jit`` that leaves sizes
unspecialised.

Since Triton 3.5 ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: each call from host Python
goes through their wrapper and cost about 8 µs on the H100 host we profiled, four calls per kernel launch in our
launchers. A DeiT-T training step is bound by such host time, so the launchers use these plain versions.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether Triton's interpreter runs the kernels: read once, at import, as Triton reads it when ``@triton.jit`` runs."""


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (1 for ``n ≤ 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def on_tensor_device(launcher):
    """Run ``launcher`` with its first tensor argument's CUDA device current: Triton launches on the current device
    (and its stream), so tensors on another GPU of the process (``cuda:1`` while ``cuda:0`` is current, as in model
    parallelism) would be read by kernels running on the wrong one. The check costs about a microsecond; the
    device switch happens only when the devices differ."""

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return run


def graph_capturing(device: torch.device) -> bool:
    """Whether this launch is being recorded into a CUDA graph (``torch.compile(mode="reduce-overhead")``,
    ``torch.cuda.graph``). Replays cost no host time per launch, so there the launchers choose by the GPU's time
    alone: more programs and more launches where that is faster on the device. About a microsecond per call."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def sizes_jit(*sizes: str):
    """``@triton.jit`` that does not specialise the kernel on the size arguments ``sizes`` (token, head and tile
    counts); unit strides and 16-byte alignments still are.

    Triton compiles a separate variant for an integer argument equal to 1 or divisible by 16. For sizes those
    variants depend on the batch and the GPU's SM count (a chunk of one tile on a large GPU, one head), so
    ``benchmarks/compile_check.py`` on a CPU could not know which of them a GPU will run. One such variant broke
    on Hopper: with one tile per program the state kernel's loop was unrolled away, and the ptxas of Triton 3.6
    (CUDA 12.8) built a wgmma descriptor from an uninitialised register there, so the kernel read shared memory
    out of bounds (an illegal memory access, or silently wrong sums). With the sizes unspecialised, each
    configuration compiles to the one variant compile_check checks."""
    return triton.jit(do_not_specialize=sizes)
