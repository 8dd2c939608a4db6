"""The ``mirrorla`` command line: ``info``, ``train``, ``eval``, ``compare``, ``demo``, ``bench``, ``analyze``,
``tune``.

This module alone registers every subcommand. Building the parser imports only :mod:`argparse` and
:mod:`mirrorla.tools._args`; each subcommand imports its tool when it runs, so ``mirrorla info`` does not pay
for the training stack (a test checks ``sys.modules``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from ._args import add_train_arguments, csv_list, json_dict


def _lazy(module: str, function: str):
    """A subcommand's entry point, imported when it runs: ``mirrorla.tools.<module>.<function>(args)``."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"mirrorla.tools.{module}"), function)(args)

    return run


def _cmd_info(args: argparse.Namespace) -> int:
    from ..models import list_models
    from .info import format_info, model_info, model_table, update_readme_table

    if args.table:
        names = args.model or [m for m in list_models() if "nano" not in m]
        table = model_table(names, attns=tuple(csv_list(args.attn or "softmax,mirror")), img_size=args.img_size)
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
        for attn in csv_list(args.attn or "mirror"):
            info = model_info(name, img_size=args.img_size, attn=attn, in_chans=args.in_chans,
                              attn_kwargs=args.attn_kwargs)
            print(json.dumps(info, default=str) if args.json else format_info(info))
    return 0


def _add_info(sub) -> None:
    info = sub.add_parser("info", help="parameters, FLOPs and attention layout of a model")
    info.add_argument("model", nargs="*", help="registered model name(s), e.g. mirrorla_deit_tiny_patch16_224")
    info.add_argument("--img-size", type=int, default=224)
    info.add_argument("--in-chans", type=int, default=3)
    info.add_argument("--attn", default=None,
                      help="attention(s), comma separated (default: mirror; with --table softmax,mirror)")
    info.add_argument("--attn-kwargs", type=json_dict, default=None, help="feature-map options as JSON")
    info.add_argument("--json", action="store_true", help="one JSON object per line")
    info.add_argument("--table", action="store_true", help="markdown table of models × attentions")
    info.add_argument("--readme", help="with --table: rewrite the table between the markers of this file")
    info.set_defaults(func=_cmd_info)


def _add_train_and_eval(sub) -> None:
    p = sub.add_parser("train", help="train a model (torchrun --nproc_per_node=N -m mirrorla train ... for DDP)")
    add_train_arguments(p)
    p.add_argument("--out", default=None, help="run directory (checkpoints, log.csv, metrics.json); must not hold a "
                   "run unless --overwrite (default: a fresh runs/train/<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out already holds")
    p.add_argument("--resume", default=None, help="continue the run in this directory with its stored config; "
                   "--epochs N extends it, any other option must agree with the stored one")
    p.add_argument("--stop-after", dest="stop_after", type=int, default=None,
                   help="stop after N epochs of this invocation (the schedule still spans --epochs)")
    p.set_defaults(func=_lazy("train", "cmd_train"))

    e = sub.add_parser("eval", help="evaluate a checkpoint")
    e.add_argument("--checkpoint", required=True, help="a run directory (its best checkpoint) or a checkpoint file")
    e.add_argument("--data", default=None, help="data source (default: the one it was trained on)")
    e.add_argument("--split", choices=["train", "val", "test"], default="test")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    e.set_defaults(func=_lazy("train", "cmd_eval"))


def _add_compare_and_demo(sub) -> None:
    p = sub.add_parser("compare", help="train one model with several attentions and seeds, and compare")
    add_train_arguments(p, with_attn=False)
    p.add_argument("--attn", dest="attns", default=None,
                   help="attentions to compare, comma separated (default softmax,relu,elu,focused,polarity,mirror)")
    p.add_argument("--variants", default=None, help="a study file (JSON): named variants, seeds, settings, protocol "
                   "and decision rule; reports paired differences to its reference variant (see docs)")
    p.add_argument("--quick", action="store_true", help="with --variants: only the study's quick seeds")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--ablation", action="store_true", help="add the MirrorLA component rows")
    p.add_argument("--analyze", action="store_true", help="add retention and rank columns (mirrorla analyze)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time, each in its own process with "
                   "cpu_count/JOBS threads and its output in <run dir>.log (default 1: in this process)")
    p.add_argument("--out", default=None, help="output directory (default runs/compare); rerun into it, finished "
                   "runs are reused and unfinished ones resumed")
    p.set_defaults(func=_lazy("compare", "cmd_compare"))

    d = sub.add_parser("demo", help="the main job on the bundled data: MirrorLA vs ReLU vs softmax on animal-mnist")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_lazy("compare", "cmd_demo"))


def _add_bench_options(p: argparse.ArgumentParser, modes: str) -> None:
    p.add_argument("--mode", default=modes, help=f"comma separated, of: {modes}")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16 (comma separated)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the measured function")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode with --compile: default, "
                   "reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs")
    p.add_argument("--compile-scope", default="blocks", help="bench model --compile: blocks (each repeated block "
                   "compiled once and its code reused: fast to compile) or model (one graph)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case before it is recorded as timeout")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timed repetitions per case")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds, every attention once per round: the "
                   "median is over rounds, and from 6 rounds up the ratios get an interval (default 7)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace the report already in --out (its bench.json)")


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="speed and memory benchmarks")
    bsub = bench.add_subparsers(dest="bench_kind", required=True)
    op = bsub.add_parser("op", help="feature map + attention core on given q, k, v")
    op.add_argument("--n", default="196,1024,4096,16384,65536", help="token counts")
    op.add_argument("--heads", type=int, default=3)
    op.add_argument("--head-dim", type=int, default=64)
    op.add_argument("--batch", type=int, default=1)
    op.add_argument("--attn", default="softmax,relu,elu,focused,polarity,mirror",
                    help="attentions (also: mirror_unfolded, every reflection applied to every token)")
    op.add_argument("--out", default="runs/bench/op")
    _add_bench_options(op, "fwd,train")
    op.set_defaults(func=_lazy("bench", "cmd_op"))

    model = bsub.add_parser("model", help="whole-model images/s and memory per resolution")
    model.add_argument("--model", default="mirrorla_deit_tiny_patch16_224", help="model(s), comma separated")
    model.add_argument("--attn", default="softmax,relu,mirror")
    model.add_argument("--img-size", default="224,384,512,768,1024")
    model.add_argument("--batch", type=int, default=8)
    model.add_argument("--window", default=None, help="Swin softmax window sizes to sweep, e.g. 7,14,28,56")
    model.add_argument("--out", default="runs/bench/model")
    _add_bench_options(model, "infer,train")
    model.set_defaults(func=_lazy("bench", "cmd_model"))


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="retention, rank and attention statistics of trained models")
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="run directories (or a `mirrorla compare` output directory for all its attentions)")
    p.add_argument("--data", default=None, help="data source (default: each run's own)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--out", default="runs/analyze")
    p.set_defaults(func=_lazy("analyze", "cmd_analyze"))


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="measure the Triton kernels' per-GPU launch settings on this GPU")
    p.add_argument("--out", required=True,
                   help="tuning file to write this GPU's entry to (others kept); MIRRORLA_TUNING=FILE uses it")
    p.add_argument("--report", default=None, help="also write tune.json, tune.md and tune.png to this directory")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --report")
    p.add_argument("--device", default="cuda", help="cuda[:N]; cpu only with TRITON_INTERPRET=1 (checks the tool)")
    p.add_argument("--lengths", default="64,197,512,1024,2048,4096",
                   help="token counts at which the row kernels race the chunked kernels")
    p.add_argument("--block-lengths", default="4096,16384,65536",
                   help="token counts at which the chunked backward's options race")
    p.add_argument("--batch", type=int, default=8,
                   help="batch of the timings (H = 3); the row kernels race at max(batch, ⌈SMs / 3⌉), see the docs")
    p.add_argument("--calls", type=int, default=20, help="calls back to back per timing (half for the backward)")
    p.add_argument("--repeats", type=int, default=5, help="timings per case (their median counts)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before a case's timings (compilation)")
    p.set_defaults(func=_lazy("tune", "cmd_tune"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirrorla", description="MirrorLA linear attention: models, training, "
                                     "benchmarks and analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_info, _add_train_and_eval, _add_compare_and_demo, _add_bench, _add_analyze, _add_tune):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            FloatingPointError) as err:
        # a user's mistake (or a run that diverged): one line that names it, never a traceback (CheckpointError is
        # a ValueError)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"mirrorla {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
