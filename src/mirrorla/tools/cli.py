"""The ``mirrorla`` command line: ``info``, ``train``, ``eval``, ``compare``, ``bench``, ``analyze``, ``demo``.

Each subcommand imports its tool lazily, so ``mirrorla info`` does not pay for the training stack.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--attn-kwargs must be a JSON object, got {text!r}: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--attn-kwargs must be a JSON object, got {text!r}")
    return value


def _cmd_info(args: argparse.Namespace) -> int:
    from ..models import list_models
    from .info import format_info, model_info, model_table, update_readme_table

    if args.table:
        names = args.model or [m for m in list_models() if "nano" not in m]
        table = model_table(names, attns=tuple(_csv(args.attn or "softmax,mirror")), img_size=args.img_size)
        if args.readme:
            update_readme_table(Path(args.readme), table)
            print(f"updated the model table in {args.readme}")
        else:
            print(table)
        return 0
    if not args.model:
        raise ValueError("name a MODEL (see the README's model table) or use --table")
    known = list_models()
    for name in args.model:
        if name not in known:
            raise ValueError(f"unknown model {name!r}; this package's models: {', '.join(known)}")
    for name in args.model:
        for attn in _csv(args.attn or "mirror"):
            info = model_info(name, img_size=args.img_size, attn=attn, in_chans=args.in_chans,
                              attn_kwargs=args.attn_kwargs)
            print(json.dumps(info, default=str) if args.json else format_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirrorla", description="MirrorLA linear attention: models, training, "
                                     "benchmarks and analysis")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters, FLOPs and attention layout of a model")
    info.add_argument("model", nargs="*", help="registered model name(s), e.g. mirrorla_deit_tiny_patch16_224")
    info.add_argument("--img-size", type=int, default=224)
    info.add_argument("--in-chans", type=int, default=3)
    info.add_argument("--attn", default=None,
                      help="attention(s), comma separated (default: mirror; with --table softmax,mirror)")
    info.add_argument("--attn-kwargs", type=_json_dict, default=None, help='feature-map options as JSON')
    info.add_argument("--json", action="store_true", help="one JSON object per line")
    info.add_argument("--table", action="store_true", help="markdown table of models × attentions")
    info.add_argument("--readme", help="with --table: rewrite the table between the markers of this file")
    info.set_defaults(func=_cmd_info)

    # the heavier tools register their own subcommands (train also adds eval, compare and demo)
    from . import analyze, bench, train

    for tool in (train, bench, analyze):
        tool.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        # a user's mistake: one line that names it, never a traceback (CheckpointError is a ValueError)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"mirrorla {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
