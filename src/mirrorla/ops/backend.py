"""The one place that decides which implementation runs an op: ``torch`` (the pure-PyTorch reference), ``cpu``
(the fused C++ kernels, no backward) or ``triton`` (fused GPU kernels, forward and backward).

``MIRRORLA_BACKEND=auto|torch|cpu|triton`` forces a choice (default ``auto``):

- ``auto``: CUDA tensors take ``triton`` where Triton imports; CPU tensors take ``cpu`` where no gradient is needed
  and the kernels built (see :mod:`mirrorla.ops.fused`); everything else takes ``torch``.
- ``triton`` on CPU tensors runs the kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` (how the tests
  check them without a GPU); without it, CPU tensors fall back to ``torch``.
- ``torch``: always the reference. ``cpu``: the C++ kernels wherever they apply.

Compilers and exporters (``torch.compile`` tracing, ``torch.export``, ONNX) get ``torch`` for the CPU kernels,
which they cannot trace; the Triton ops are registered custom ops that ``torch.compile`` keeps whole.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "backend_setting", "select_backend", "triton_available"]

BACKENDS = ("auto", "torch", "cpu", "triton")


def backend_setting() -> str:
    """The value of ``MIRRORLA_BACKEND`` (``auto`` when unset); an unknown value is an error that names it."""
    value = os.environ.get("MIRRORLA_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"MIRRORLA_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


_TRITON: dict[str, bool] = {}


def _triton_imports() -> bool:
    # a plain dict, not functools.cache: dynamo traces through this call inside compiled models
    if "ok" not in _TRITON:
        try:
            from . import triton_linear_attention  # noqa: F401

            _TRITON["ok"] = True
        except Exception:  # noqa: BLE001 (no triton, or one that cannot compile here: the reference runs)
            _TRITON["ok"] = False
    return _TRITON["ok"]


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if device.type == "cuda":
        return _triton_imports()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1" and _triton_imports()


def select_backend(*tensors: torch.Tensor, has_triton: bool = True, has_cpu: bool = False) -> str:
    """``"torch"``, ``"cpu"`` or ``"triton"`` for an op on ``tensors``.

    ``has_triton``/``has_cpu``: whether the op has that kernel. A forced backend the op or the device cannot use
    falls back to ``torch``.
    """
    setting = backend_setting()
    device = tensors[0].device
    if setting == "torch":
        return "torch"
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if has_triton and setting in ("auto", "triton") and triton_available(device):
        if setting == "triton" or device.type == "cuda":
            if all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in tensors):
                return "triton"
    if has_cpu and setting in ("auto", "cpu") and device.type == "cpu" and not wants_grad:
        return "cpu"
    return "torch"
