"""``mirrorla compare`` and ``mirrorla demo``: the same model and recipe with each attention, several seeds.

``--ablation`` adds MirrorLA's component rows, all on the ``mirror`` feature map:
ReLU (every component off) → +block → +variance → +cross-head (the full map).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from .analyze import ANALYSIS_COLUMNS
from .checkpoint import atomic_savefig, atomic_write_text
from .config import TrainConfig
from .train import existing_run_action, holds_run, run_all_planned

__all__ = ["ABLATION", "ANALYSIS_COLUMNS", "aggregate", "compare", "plot_results", "results_markdown"]


# (variant name, mirror feature-map options): each row adds one component to the previous one.
ABLATION: list[tuple[str, dict[str, bool]]] = [
    ("relu (mirror, all off)", {"block": False, "variance": False, "cross_head": False}),
    ("+block", {"block": True, "variance": False, "cross_head": False}),
    ("+variance", {"block": True, "variance": True, "cross_head": False}),
    ("+cross_head", {"block": True, "variance": True, "cross_head": True}),
]


def _runs(attns: list[str], ablation: bool) -> list[tuple[str, str, dict[str, Any]]]:
    runs = [(attn, "default", {}) for attn in attns]
    if ablation:
        runs += [("mirror", variant, kwargs) for variant, kwargs in ABLATION]
    return runs


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def _planned_runs(base: TrainConfig, attns: list[str], seeds: list[int], out: Path, ablation: bool):
    """Every (attention or variant) × seed as ``(attn, variant, config, action)``, each config validated, before
    anything trains. ``action``: ``"train"``, ``"resume"`` (an unfinished run with the same config) or
    ``"reuse"`` (a finished one). A run directory holding another config is an error."""
    if not attns and not ablation:
        raise ValueError("compare needs at least one attention (--attn) or --ablation")
    if not seeds:
        raise ValueError("compare needs at least one seed (--seeds)")
    planned = []
    for attn, variant, kwargs in _runs(attns, ablation):
        for seed in seeds:
            run_dir = out / "runs" / f"{_slug(attn + '_' + variant)}_s{seed}"
            # attn_kwargs of the base recipe are MirrorLA options: other attentions run with their defaults
            attn_kwargs = {**base.attn_kwargs, **kwargs} if attn == "mirror" else {}
            config = dataclasses.replace(base, attn=attn, attn_kwargs=attn_kwargs, seed=seed, out=str(run_dir))
            action = "train"
            if holds_run(run_dir):
                action = existing_run_action(run_dir, config)
            planned.append((attn, variant, config, action))
    return planned


def compare(base: TrainConfig, attns: list[str], seeds: list[int], out: Path, *, ablation: bool = False,
            analyze: bool = False, jobs: int = 1) -> list[dict[str, Any]]:
    """Train every (attention or ablation variant) × seed with ``base``'s recipe; write ``out/results.*``.

    Every run is validated before the first one trains. Rerun into the same ``out``, finished runs are reused
    and unfinished ones resumed, so an interrupted comparison is continued by running it again. ``jobs`` runs
    train at a time (see :func:`~mirrorla.tools.train.run_all_planned`).
    """
    planned = _planned_runs(base, attns, seeds, out, ablation)
    out.mkdir(parents=True, exist_ok=True)
    results = [None] * len(planned)
    labelled = [(f"{attn} ({variant}) seed {config.seed} -> {config.out}", config, action)
                for attn, variant, config, action in planned]
    for i, metrics in run_all_planned(labelled, jobs):
        attn, variant, config, _ = planned[i]
        run_dir = Path(config.out)
        row = {
            "attn": attn, "variant": variant, "seed": config.seed, "top1": metrics["best_top1"],
            "final_top1": metrics["final_top1"], "test_top1": metrics.get("test_top1"),
            "params": metrics["params"], "train_seconds": metrics["train_seconds"],
            "images_per_second": metrics["images_per_second"], "run_dir": str(run_dir),
        }
        if analyze:
            row.update(_analysis_columns(run_dir, base.data))
        results[i] = row
        # partial results survive a crash
        atomic_write_text(out / "results.json", json.dumps([r for r in results if r], indent=2))
    atomic_write_text(out / "results.md", results_markdown(results, base))
    plot_results(results, out / "results.png")
    return results


def _analysis_columns(run_dir: Path, data: str) -> dict[str, Any]:
    from .analyze import summary_columns

    return summary_columns(run_dir, data)


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std of each (attn, variant) row over its seeds, in first-seen order."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault((r["attn"], r["variant"]), []).append(r)
    table = []
    for (attn, variant), rs in rows.items():
        top1 = [r["top1"] for r in rs]
        entry = {
            "attn": attn, "variant": variant, "seeds": len(rs),
            "top1_mean": statistics.fmean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "params": rs[0]["params"], "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rs),
        }
        for key in ANALYSIS_COLUMNS:
            values = [r[key] for r in rs if r.get(key) is not None]
            if any(key in r for r in results):
                entry[key] = statistics.fmean(values) if values else None  # softmax has no feature map
        table.append(entry)
    return table


def results_markdown(results: list[dict[str, Any]], base: TrainConfig | None = None) -> str:
    table = aggregate(results)
    extra = [k for k in ANALYSIS_COLUMNS if table and k in table[0]]
    lines = []
    if base is not None:
        lines += [f"model `{base.model}`, data `{base.data}`, {base.epochs} epochs, batch {base.batch_size}, "
                  f"lr {base.lr}; top-1 is the best validation accuracy of each run, mean ± std over seeds.", ""]
    header = "| attention | variant | seeds | top-1 (%) | params | train s |" + "".join(f" {k} |" for k in extra)
    lines += [header, "|" + "---|" * (6 + len(extra))]
    for r in table:
        cells = "".join(" – |" if r[k] is None else f" {r[k]:.3f} |" for k in extra)
        lines.append(f"| {r['attn']} | {r['variant']} | {r['seeds']} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} "
                     f"| {r['params']:,} | {r['train_seconds_mean']:.0f} |{cells}")
    return "\n".join(lines) + "\n"


def plot_results(results: list[dict[str, Any]], path: Path) -> Path:
    """Bars of mean top-1 (± std) per row, and validation curves (mean over seeds) from each run's log.csv."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = aggregate(results)
    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [r["attn"] if r["variant"] == "default" else f"mirror {r['variant']}" for r in table]
    means = [r["top1_mean"] for r in table]
    ax_bar.bar(range(len(table)), means, yerr=[r["top1_std"] for r in table], capsize=4, color="tab:blue")
    ax_bar.set_xticks(range(len(table)), labels, rotation=30, ha="right", fontsize=8)
    low = min(means) if means else 0
    ax_bar.set_ylim(max(0, low - 10), min(100, max(means, default=100) + 3))
    ax_bar.set_ylabel("best val top-1 (%)")
    ax_bar.set_title("accuracy (mean ± std over seeds)")
    for r, label in zip(table, labels, strict=True):
        curves = []
        for res in results:
            if (res["attn"], res["variant"]) == (r["attn"], r["variant"]):
                log = Path(res["run_dir"]) / "log.csv"
                if log.exists():
                    with open(log) as f:
                        curves.append([float(row["val_top1"]) for row in csv.DictReader(f)])
        if curves:
            n = min(len(c) for c in curves)
            ax_curve.plot(range(1, n + 1), [statistics.fmean(c[i] for c in curves) for i in range(n)], marker="o",
                          label=label)
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("val top-1 (%)")
    ax_curve.set_title("validation accuracy")
    ax_curve.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def cmd_compare(args: argparse.Namespace) -> int:
    from ._args import csv_list
    from .train import config_values

    base = TrainConfig(**config_values(args))
    if args.jobs < 1:
        raise ValueError(f"--jobs must be a positive int, got {args.jobs}")
    if args.variants:
        from .study import load_study, run_study, study_markdown

        if args.attns is not None or args.ablation:
            raise ValueError("--variants names every run of the study: drop --attn and --ablation")
        study = load_study(args.variants)
        out = Path(args.out or f"runs/study_{Path(args.variants).stem}")
        results = run_study(study, out, base=dataclasses.replace(base, progress=base.progress and not args.quick),
                            quick=args.quick, analyze=args.analyze, jobs=args.jobs)
        print(study_markdown(study, results))
        print(f"results: {out / 'results.json'}, {out / 'results.md'}, plot: {out / 'results.png'}")
        return 0
    args.attns = args.attns or "softmax,relu,elu,focused,polarity,mirror"
    try:
        seeds = [int(s) for s in csv_list(args.seeds)]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated ints, got {args.seeds!r}") from None
    out = Path(args.out or "runs/compare")
    results = compare(base, csv_list(args.attns), seeds, out, ablation=args.ablation, analyze=args.analyze,
                      jobs=args.jobs)
    print(results_markdown(results, base))
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, plot: {out / 'results.png'}")
    return 0


# ~3.5 minutes on 2 CPU cores: PVT-nano learns fast at 28 px (256 tokens in its first stage).
DEMO = dict(model="mirrorla_pvt_nano", data="animal-mnist", epochs=8, batch_size=128, lr=2e-3, warmup_epochs=0.5)


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    base = TrainConfig(**{**DEMO, "progress": not args.no_progress, "out": str(out)})
    print(f"mirrorla demo: {base.model} on {base.data}, {base.epochs} epochs each, with softmax, ReLU linear "
          "attention and MirrorLA", flush=True)
    results = compare(base, ["softmax", "relu", "mirror"], [0], out)
    print()
    print(results_markdown(results, base))
    print(f"plot: {out / 'results.png'}   table: {out / 'results.md'}   runs: {out / 'runs'}")
    return 0
