"""Argument helpers of the command line: parsers of list and JSON values, and the training options shared by
``train`` and ``compare``. Only ``argparse`` here, so building the parser imports no tool."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_train_arguments", "csv_list", "json_dict"]


def csv_list(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def json_dict(text: str) -> dict:
    """A JSON object given on the command line (``--attn-kwargs``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--attn-kwargs must be a JSON object, got {text!r}: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--attn-kwargs must be a JSON object, got {text!r}")
    return value


def add_train_arguments(p: argparse.ArgumentParser, *, with_attn: bool = True) -> None:
    """The options of :class:`mirrorla.tools.config.TrainConfig`; an option left out keeps the config's default."""
    p.add_argument("--model", default=None, help="timm model name (default mirrorla_vit_nano_patch4)")
    if with_attn:
        p.add_argument("--attn", default=None, help="attention: mirror, softmax, relu, elu, focused, polarity")
    p.add_argument("--attn-kwargs", dest="attn_kwargs", type=json_dict, default=None,
                   help='feature-map options as JSON, e.g. \'{"variance": false}\'')
    p.add_argument("--data", default=None, help="animal-mnist (default), mnist5k, digits, cifar10:PATH, "
                   "cifar100:PATH, folder:PATH")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--min-lr", dest="min_lr", type=float, default=None)
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=None)
    p.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=None)
    p.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=None)
    p.add_argument("--mixup", type=float, default=None, help="mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (0 = off)")
    p.add_argument("--clip-grad", dest="clip_grad", type=float, default=None)
    p.add_argument("--drop-path", dest="drop_path", type=float, default=None)
    p.add_argument("--amp", choices=["none", "bf16"], default=None, help="bf16 autocast")
    p.add_argument("--map-lr-scale", dest="map_lr_scale", type=float, default=None,
                   help="learning-rate multiplier of the feature maps' parameters (MirrorLA's angles)")
    p.add_argument("--model-ema", dest="model_ema", action="store_true", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--split-seed", dest="split_seed", type=int, default=None)
    p.add_argument("--img-size", dest="img_size", type=int, default=None)
    p.add_argument("--train-subset", dest="train_subset", type=int, default=None,
                   help="train on a seeded random subset of N training images")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--tensorboard", action="store_true", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--compile", choices=["none", "default", "reduce-overhead"], default=None,
                   help="torch.compile the repeated blocks: default (inductor fuses the small ops; on GPUs an eager "
                   "step is bound by their launches) or reduce-overhead (also CUDA graphs, on CUDA); none (default)")
