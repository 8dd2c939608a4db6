"""Deployment: ONNX export of any model of this package (``torch.export`` works on them directly).

Every model exports with ``torch.export.export(model, (x,))`` and ``torch.onnx.export`` (TorchScript-based or
dynamo): under an exporter the pair rotation runs in its real-valued form (ONNX has no complex numbers) and the
fused CPU kernels stand aside. ``torch.jit.script`` is not supported (the feature-map registry and keyword-only
module options are beyond TorchScript); use ``torch.export`` or ONNX.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["export_onnx"]


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = 17,
                dynamo: bool = False, dynamic_batch: bool = True) -> Path:
    """Write ``model`` as ONNX to ``path`` and return it.

    Args:
        model: a model in eval mode (it is put there).
        example: an input ``[B, C, H, W]``; the graph is specialised to its image size.
        opset: ONNX opset (>= 17: LayerNormalization is a single op).
        dynamo: use the ``torch.export``-based exporter (needs ``onnxscript``) instead of the TorchScript-based one.
        dynamic_batch: let the batch dimension vary at run time.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    if example.dim() != 4:
        raise ValueError(f"example must be an image batch [B, C, H, W], got shape {tuple(example.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    kwargs: dict = {"input_names": ["images"], "output_names": ["logits"], "opset_version": opset}
    if dynamo:
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {"images": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        # shape checks in Python become constants in the traced graph: expected, and the reason it is specialised
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its own retirement
        with torch.no_grad():
            torch.onnx.export(model, (example,), str(path), dynamo=dynamo, **kwargs)
    return path
