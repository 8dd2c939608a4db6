"""``TrainConfig``: everything that defines a training run, checked when it is built (stored in every checkpoint)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import timm

from ..feature_maps import check_feature_map_options
from ..models import list_models
from ..models._helpers import check_attn

__all__ = ["TRAIN_COMPILE_MODES", "TrainConfig"]

TRAIN_COMPILE_MODES = ("none", "default", "reduce-overhead")
"""``TrainConfig.compile``: eager; the repeated blocks compiled by torch.compile (inductor fuses the small ops that
bound an eager GPU step's host time); or compiled and replayed as CUDA graphs (on CUDA)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint)."""

    model: str = "mirrorla_vit_nano_patch4"
    attn: str = "mirror"
    attn_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "animal-mnist"
    out: str | None = None  # None: a fresh directory runs/train/<timestamp>
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    clip_grad: float | None = 1.0
    drop_path: float = 0.0
    amp: str = "none"  # "none" or "bf16"
    map_lr_scale: float = 1.0  # learning-rate multiplier of the feature maps' parameters (MirrorLA's θ, γ, u)
    model_ema: bool = False
    model_ema_decay: float = 0.999
    seed: int = 0
    split_seed: int = 0
    img_size: int | None = None
    train_subset: int | None = None  # train on a seeded random subset of N training images (quick runs, tests)
    workers: int = 0
    tensorboard: bool = False
    progress: bool = True
    compile: str = "none"  # "none", "default" or "reduce-overhead": torch.compile the repeated blocks (see train)

    def __post_init__(self) -> None:
        """Every value is checked here, before any work starts; errors name the option and what it accepts."""
        if self.model not in list_models() and not timm.is_model(self.model):
            raise ValueError(f"unknown model {self.model!r}; this package's models: {', '.join(list_models())}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        if self.compile not in TRAIN_COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(TRAIN_COMPILE_MODES)}, got {self.compile!r}")
        check_attn(self.attn)
        if self.attn == "softmax":
            if self.attn_kwargs:
                raise ValueError(f"attn 'softmax' takes no attn_kwargs, got {sorted(self.attn_kwargs)}")
        else:
            check_feature_map_options(self.attn, self.attn_kwargs)
        for name, low in (("epochs", 1), ("batch_size", 1), ("workers", 0), ("seed", 0), ("split_seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name, value in (("train_subset", self.train_subset), ("img_size", self.img_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int (or unset), got {value!r}")
        ranges = {  # name: (low, high, low inclusive, high inclusive)
            "lr": (0.0, None, False, False), "min_lr": (0.0, None, True, False),
            "weight_decay": (0.0, None, True, False), "warmup_epochs": (0.0, None, True, False),
            "label_smoothing": (0.0, 1.0, True, False), "mixup": (0.0, None, True, False),
            "cutmix": (0.0, None, True, False), "drop_path": (0.0, 1.0, True, False),
            "model_ema_decay": (0.0, 1.0, False, False), "map_lr_scale": (0.0, None, False, False),
        }
        for name, (low, high, low_in, high_in) in ranges.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value >= low if low_in else value > low)
            ok = ok and (high is None or (value <= high if high_in else value < high))
            if not ok:
                bounds = f"{'[' if low_in else '('}{low}, {high if high is not None else '∞'}{']' if high_in else ')'}"
                raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")
        if self.clip_grad is not None and not (isinstance(self.clip_grad, (int, float)) and self.clip_grad > 0):
            raise ValueError(f"clip_grad must be a positive number (or unset for none), got {self.clip_grad!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
