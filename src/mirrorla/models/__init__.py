"""timm models with MirrorLA (or any attention of the registry) inside; importing registers them."""

from . import pvt, pvt_v2, swin, vit  # noqa: F401  (registers the models)
from ._helpers import attention_counts, feature_map_no_weight_decay
from .convert import mirrorize
from .pvt import PyramidVisionTransformer
from .pvt_v2 import MirrorPvtV2
from .swin import MirrorSwinTransformer
from .vit import MirrorVisionTransformer

__all__ = [
    "MirrorPvtV2",
    "MirrorSwinTransformer",
    "MirrorVisionTransformer",
    "PyramidVisionTransformer",
    "attention_counts",
    "feature_map_no_weight_decay",
    "list_models",
    "mirrorize",
]


def list_models() -> list[str]:
    """Names of the models this package registers with timm."""
    import timm

    return sorted(timm.list_models("mirrorla_*"))
