"""``compile_model``: ``torch.compile`` for this package's models, whole or block by block.

A vision transformer repeats one block class many times. Compiled block by block ("regional" compilation), the
compiler traces and optimises one block and reuses the code for every block of the same class and input shapes,
so a DeiT-T compiles in the time of one block instead of twelve. The model's other modules (patch embedding,
head) stay eager: a few large kernels, little host overhead. The attention's custom ops never break a graph, so
``fullgraph=True`` holds in either scope, and ``mode="reduce-overhead"`` replays each block as a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..attention import LinearAttention

__all__ = ["COMPILE_MODES", "COMPILE_SCOPES", "compile_model", "repeated_blocks"]

COMPILE_SCOPES = ("model", "blocks")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _holds_attention(module: nn.Module) -> bool:
    return any(isinstance(s, LinearAttention) or type(s).__name__.endswith("Attention") for s in module.modules())


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated attention blocks: the members of every ``ModuleList``/``Sequential`` of at least two
    modules of one class that hold an attention layer (this package's ``LinearAttention``, or a timm class whose name
    ends in ``Attention``).
    Only the innermost such lists count: a PVT's stages hold lists of blocks, and the blocks are what repeat
    with the same shapes."""
    lists = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))
             and len(m) >= 2 and len({type(c) for c in m.children()}) == 1
             and all(_holds_attention(c) for c in m.children())]
    inner = [m for m in lists if not any(o is not m and any(o is s for s in m.modules()) for o in lists)]
    return [block for m in inner for block in m.children()]


def compile_model(model: nn.Module, *, scope: str = "blocks", mode: str = "default", fullgraph: bool = True,
                  backend: str | Any = "inductor") -> nn.Module:
    """``torch.compile`` ``model``: ``scope="model"`` returns the compiled model (one graph); ``scope="blocks"``
    compiles each repeated block in place (:func:`repeated_blocks`) and returns ``model`` itself.

    ``mode``: one of :data:`COMPILE_MODES` (``"reduce-overhead"``: CUDA graphs; call
    ``torch.compiler.cudagraph_mark_step_begin()`` before each training step). ``backend`` goes to
    ``torch.compile`` (e.g. ``"aot_eager"`` to check tracing without code generation).
    """
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"scope must be one of {', '.join(COMPILE_SCOPES)}, got {scope!r}")
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    options: dict[str, Any] = dict(fullgraph=fullgraph, backend=backend)
    if mode != "default":
        options["mode"] = mode
    if scope == "model":
        return torch.compile(model, **options)
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated attention blocks to compile; use scope='model'")
    for block in blocks:
        block.compile(**options)
    return model
