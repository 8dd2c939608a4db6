"""The ``mirrorla`` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ..attention import LinearAttention

    x = torch.randn(2, 1 + 14 * 14, 192, requires_grad=True)
    for attn in ("softmax", "relu", "mirror"):
        layer = LinearAttention(192, 3, attn=attn)
        y = layer(x)
        y.square().mean().backward()
        print(f"{attn:8s} out {tuple(y.shape)}  grad-norm {x.grad.norm():.3f}")
        x.grad = None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirrorla", description="MirrorLA linear attention tools")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
