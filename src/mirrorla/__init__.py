"""MirrorLA: reflecting feature maps for vision linear attention (arXiv 2602.04346), on PyTorch.

Layers, from the bottom: :mod:`mirrorla.ops` (pure functions) → :mod:`mirrorla.feature_maps`
(small modules behind a registry) → :class:`LinearAttention` (one attention module) →
:mod:`mirrorla.models` (timm models) → :mod:`mirrorla.tools` (train, bench, analyze, CLI).
"""

from . import ops
from .attention import LinearAttention, list_attentions
from .feature_maps import (
    FeatureMap,
    MirrorFeatureMap,
    create_feature_map,
    list_feature_maps,
    register_feature_map,
)
from .models import list_models, mirrorize  # noqa: E402  (registers the timm models)
from .models.compile import compile_model
from .models.export import export_onnx

__version__ = "0.1.0"

__all__ = [
    "FeatureMap",
    "LinearAttention",
    "MirrorFeatureMap",
    "compile_model",
    "create_feature_map",
    "export_onnx",
    "list_attentions",
    "list_feature_maps",
    "list_models",
    "mirrorize",
    "ops",
    "register_feature_map",
]
