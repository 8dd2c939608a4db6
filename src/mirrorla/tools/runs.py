"""Runs on disk: rebuild the model a run trained and load its weights (shared by eval, analyze and resume)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import TrainConfig

__all__ = ["build_model", "load_run", "load_weights"]


def build_model(config: TrainConfig, num_classes: int, in_chans: int, img_size: int) -> torch.nn.Module:
    """The model of ``config`` for data with ``num_classes``, ``in_chans`` and ``img_size`` (timm's factory)."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                                  drop_path_rate=config.drop_path)
    if config.model.startswith("mirrorla_"):
        kwargs.update(attn=config.attn, attn_kwargs=config.attn_kwargs)
    return timm.create_model(config.model, **kwargs)


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path, config: TrainConfig) -> None:
    """``load_state_dict`` whose failure is one line naming the checkpoint and what its JSON says it holds."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {source} does not fit model {config.model} with attention {config.attn!r} "
                              f"(the model its JSON names): {first}") from None


def load_run(path: str | Path, *, use_ema: bool = False) -> tuple[TrainConfig, dict[str, Any], torch.nn.Module]:
    """``(config, state, model)`` of a run directory (its ``best`` checkpoint, else ``last``) or of one checkpoint
    file, the model rebuilt from the config its JSON stores and in eval mode. A checkpoint whose weights do not fit
    that model, or that has no EMA weights when ``use_ema``, is a :class:`CheckpointError`."""
    p = Path(path).expanduser()
    name = "best" if p.is_dir() and (p / "best.json").exists() else "last"
    state, parts = load_checkpoint(p, name)
    config = TrainConfig(**state["config"])
    model = build_model(config, state["num_classes"], state["in_chans"], state["img_size"])
    weights = parts["ema"] if use_ema else parts["model"]
    if weights is None:
        raise CheckpointError(f"checkpoint {p} holds no EMA weights")
    load_weights(model, weights, p, config)
    return config, state, model.eval()
