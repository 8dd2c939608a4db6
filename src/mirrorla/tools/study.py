"""``mirrorla compare --variants STUDY.json``: a whole accuracy study as one reproducible file, with paired statistics.

The study file (JSON) holds the protocol, written before the runs, and everything that defines them::

    {
      "protocol": "what is compared, why, and how (free text, copied into the report)",
      "decision_rule": "fixed before the runs (free text, copied into the report)",
      "reference": "mirror",                      # the variant every other one is paired with
      "seeds": [0, 1, 2, 3, 4],
      "quick_seeds": [0, 1],                      # what --quick runs (default: the first two seeds)
      "recipe": {"model": "mirrorla_pvt_nano", "epochs": 20},      # TrainConfig values shared by every run
      "settings": [{"name": "animal-mnist", "data": "animal-mnist"},
                   {"name": "mnist5k-56px", "data": "mnist5k", "img_size": 56}],   # optional; default: one
      "variants": [{"name": "mirror", "attn": "mirror"},
                   {"name": "relu", "attn": "relu"},
                   {"name": "mirror-half", "attn": "mirror", "attn_kwargs": {"pairing": "half"},
                    "recipe": {"lr": 0.002}}]
    }

Every (setting, variant, seed) is one training run under ``OUT/runs/``; rerun into the same ``OUT``, finished runs
are reused and unfinished ones resumed (as ``compare`` does). The report gives, per setting, each variant's mean ±
std over seeds and its **paired difference** to the reference: the mean over seeds of (variant − reference) at
the same seed, with its 95% Student-t interval. The decision rule this package applies (and prints) is the one of
the study issue: a variant *passes* when its interval excludes 0 above it in at least two settings and is below 0
in none; with fewer than three settings, in every setting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

from .checkpoint import atomic_savefig, atomic_write_text
from .config import TrainConfig

__all__ = ["load_study", "paired_interval", "run_study", "study_markdown"]

_CURVE = ("best_epoch", "last_gain")
_MECHANISM = ("retention_k", "zeroed_k", "rank_k", "rank_attn", "attn_entropy")
_STUDY_KEYS = {"protocol", "decision_rule", "reference", "seeds", "quick_seeds", "recipe", "settings", "variants"}
_VARIANT_KEYS = {"name", "attn", "attn_kwargs", "recipe"}


def load_study(path: str | Path) -> dict[str, Any]:
    """Read and check a study file; every error names the file and the key."""
    path = Path(path)
    try:
        study = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"study file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"study file {path} is not valid JSON: {err}") from None
    if not isinstance(study, dict):
        raise ValueError(f"study file {path} must hold a JSON object")
    unknown = set(study) - _STUDY_KEYS
    if unknown:
        raise ValueError(f"study file {path}: unknown key(s) {sorted(unknown)}; known: {sorted(_STUDY_KEYS)}")
    variants = study.get("variants")
    if not isinstance(variants, list) or len(variants) < 2:
        raise ValueError(f"study file {path}: 'variants' must be a list of at least two variants")
    names = [v.get("name") if isinstance(v, dict) else None for v in variants]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"study file {path}: every variant needs a unique non-empty 'name', got {names}")
    for v in variants:
        extra = set(v) - _VARIANT_KEYS
        if extra:
            raise ValueError(f"study file {path}: variant {v['name']!r} has unknown key(s) {sorted(extra)}; "
                             f"known: {sorted(_VARIANT_KEYS)}")
    if study.get("reference") not in names:
        raise ValueError(f"study file {path}: 'reference' must name a variant ({', '.join(names)}), "
                         f"got {study.get('reference')!r}")
    seeds = study.get("seeds")
    if not isinstance(seeds, list) or len(seeds) < 2 or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"study file {path}: 'seeds' must list at least two int seeds (pairs need two)")
    settings = study.get("settings") or [{"name": "default"}]
    if not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in settings):
        raise ValueError(f"study file {path}: every setting needs a 'name'")
    return {**study, "settings": settings, "recipe": study.get("recipe") or {}}


def _configs(study: dict[str, Any], base: TrainConfig, out: Path, seeds: list[int]):
    """Every run of the study as ``(setting, variant, seed, TrainConfig)``, each validated before anything trains."""
    planned = []
    for seed in seeds:
        for setting in study["settings"]:
            for variant in study["variants"]:
                values = {**dataclasses.asdict(base), **study["recipe"],
                          **{k: v for k, v in setting.items() if k != "name"}, **variant.get("recipe", {}),
                          "attn": variant.get("attn", "mirror"), "attn_kwargs": variant.get("attn_kwargs", {}),
                          "seed": seed,
                          "out": str(out / "runs" / _slug(setting["name"]) / f"{_slug(variant['name'])}_s{seed}")}
                try:
                    config = TrainConfig(**values)
                except TypeError as err:  # an unknown recipe key
                    raise ValueError(f"setting {setting['name']!r}, variant {variant['name']!r}: {err}") from None
                planned.append((setting["name"], variant["name"], seed, config))
    return planned


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")


def run_study(study: dict[str, Any], out: Path, *, base: TrainConfig | None = None, quick: bool = False,
              analyze: bool = False, jobs: int = 1) -> list[dict[str, Any]]:
    """Run (or continue) every run of ``study``, ``jobs`` at a time; write ``out/results.json``, ``results.md``
    and ``results.png``. Runs go seed by seed (every setting and variant of the first seed, then the next), so a
    study stopped early holds the same seeds in every cell and its pairs stay balanced. With ``analyze``, a
    finished run that is reused keeps the statistics an earlier ``results.json`` holds for it (delete that file
    to recompute them)."""
    from .train import existing_run_action, holds_run, run_all_planned

    seeds = (study.get("quick_seeds") or study["seeds"][:2]) if quick else study["seeds"]
    planned = _configs(study, base or TrainConfig(progress=False), out, list(seeds))
    actions = [existing_run_action(Path(c.out), c) if holds_run(Path(c.out)) else "train" for *_, c in planned]
    out.mkdir(parents=True, exist_ok=True)
    # the study as run (defaults filled in): the protocol travels with its results
    atomic_write_text(out / "study.json", json.dumps(study, indent=2))
    labelled = [(f"{setting} / {variant} seed {seed}", config, action)
                for (setting, variant, seed, config), action in zip(planned, actions, strict=True)]
    results: list[dict[str, Any] | None] = [None] * len(planned)
    earlier = _earlier_analyses(out / "results.json")
    for i, metrics in run_all_planned(labelled, jobs):
        setting, variant, seed, config = planned[i]
        row = {"setting": setting, "variant": variant, "seed": seed, "top1": metrics["best_top1"],
               "test_top1": metrics.get("test_top1"), "train_seconds": metrics["train_seconds"],
               "run_dir": config.out}
        row.update(_curve_columns(Path(config.out)))
        if analyze:
            from .analyze import ANALYSIS_COLUMNS, summary_columns

            # a finished run reused as it was keeps the statistics computed when it finished
            kept = earlier.get(config.out) if actions[i] == "reuse" else None
            if kept is not None and all(k in kept for k in ANALYSIS_COLUMNS):
                row.update({k: kept[k] for k in ANALYSIS_COLUMNS})
            else:
                row.update(summary_columns(Path(config.out), config.data))
        results[i] = row
        atomic_write_text(out / "results.json", json.dumps([r for r in results if r], indent=2))
    done = [r for r in results if r]
    atomic_write_text(out / "results.md", study_markdown(study, done))
    plot_study(study, done, out / "results.png")
    return done


def _earlier_analyses(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of an earlier ``results.json`` by run directory (empty when there is none or it is unreadable)."""
    try:
        return {r["run_dir"]: r for r in json.loads(path.read_text()) if isinstance(r, dict) and "run_dir" in r}
    except (OSError, ValueError, TypeError):
        return {}


def _curve_columns(run_dir: Path, last: int = 5) -> dict[str, float]:
    """From a run's ``log.csv``: the epoch of its best validation top-1 and the validation gain over its last
    ``last`` epochs (a run still rising at the end of its schedule has not converged)."""
    import csv

    log = run_dir / "log.csv"
    if not log.exists():
        return {}
    with open(log) as f:
        top1 = [float(row["val_top1"]) for row in csv.DictReader(f)]
    if not top1:
        return {}
    cols = {"best_epoch": float(top1.index(max(top1)) + 1)}
    if len(top1) > last:
        cols["last_gain"] = top1[-1] - top1[-1 - last]
    return cols


def paired_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of paired differences and its Student-t interval (n − 1 degrees of freedom).
    One difference gives an infinite interval."""
    from scipy.stats import t

    n = len(differences)
    if n == 0:
        raise ValueError("paired_interval needs at least one difference")
    mean = statistics.fmean(differences)
    if n == 1:
        return mean, -math.inf, math.inf
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def summarise(study: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, variant): seeds, mean ± std top-1, and the paired difference to the reference with its
    95% interval (seeds that both ran), in the study's order."""
    by = {(r["setting"], r["variant"], r["seed"]): r["top1"] for r in results}
    rows = []
    for setting in [s["name"] for s in study["settings"]]:
        for variant in [v["name"] for v in study["variants"]]:
            seeds = sorted(s for (st, v, s) in by if st == setting and v == variant)
            if not seeds:
                continue
            top1 = [by[(setting, variant, s)] for s in seeds]
            row = {"setting": setting, "variant": variant, "seeds": len(seeds), "mean": statistics.fmean(top1),
                   "std": statistics.stdev(top1) if len(top1) > 1 else 0.0}
            for key in _CURVE + _MECHANISM:  # mean over seeds; mechanism statistics come from compare --analyze
                values = [r[key] for r in results if r["setting"] == setting and r["variant"] == variant
                          and r.get(key) is not None]
                if values:
                    row[key] = statistics.fmean(values)
            if variant != study["reference"]:
                pairs = [s for s in seeds if (setting, study["reference"], s) in by]
                if pairs:
                    diffs = [by[(setting, variant, s)] - by[(setting, study["reference"], s)] for s in pairs]
                    row["diff"], row["low"], row["high"] = paired_interval(diffs)
                    row["pairs"] = len(pairs)
            rows.append(row)
    return rows


def decisions(study: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The decision rule per variant: settings whose interval is above 0, below 0, and whether it passes."""
    n_settings = len(study["settings"])
    needed = 2 if n_settings >= 3 else n_settings
    verdicts = {}
    for variant in [v["name"] for v in study["variants"] if v["name"] != study["reference"]]:
        mine = [r for r in rows if r["variant"] == variant and "diff" in r]
        above = sum(r["low"] > 0 for r in mine)
        below = sum(r["high"] < 0 for r in mine)
        complete = len(mine) == n_settings
        verdicts[variant] = {"above": int(above), "below": int(below), "settings": len(mine),
                             "passes": bool(above >= needed and below == 0 and complete),
                             "worse": bool(below >= needed and above == 0 and complete)}
    return verdicts


def study_markdown(study: dict[str, Any], results: list[dict[str, Any]]) -> str:
    rows = summarise(study, results)
    lines = ["# Study", ""]
    if study.get("protocol"):
        lines += ["## Protocol (fixed before the runs)", "", study["protocol"], ""]
    if study.get("decision_rule"):
        lines += ["## Decision rule (fixed before the runs)", "", study["decision_rule"], ""]
    lines += [f"Reference variant: `{study['reference']}`. Top-1 is each run's best validation accuracy; the paired "
              "difference is the mean over seeds of (variant − reference) at the same seed, with its 95% t-interval. "
              "best_epoch: the epoch of the best validation top-1; last_gain: validation top-1 at the last epoch "
              "minus five epochs before (near 0: the schedule has settled). The mechanism columns (from --analyze, "
              "layer averages on validation images): retention_k, the share of k's energy kept by the feature map; "
              "zeroed_k, the fraction of φ(k) entries that are 0; rank_k and rank_attn, the effective ranks of φ(K) "
              "and of the attention matrix; attn_entropy, the attention rows' entropy. All are means over seeds. "
              "Retention is Σ‖φ(k)‖² / Σ‖k‖²: a share of the keys' energy only for maps that zero or keep each "
              "coordinate (ReLU, MirrorLA and its variants); focused rescales its features and polarity raises "
              "them to a power in two streams, so theirs is not comparable.",
              ""]
    for setting in [s["name"] for s in study["settings"]]:
        mech = [k for k in _CURVE + _MECHANISM if any(k in r for r in rows if r["setting"] == setting)]
        lines += [f"## {setting}", "", "| variant | seeds | top-1 (%) | paired diff | 95% interval |"
                  + "".join(f" {k} |" for k in mech), "|---" * (5 + len(mech)) + "|"]
        for r in rows:
            if r["setting"] != setting:
                continue
            diff = f"{r['diff']:+.2f}" if "diff" in r else "(reference)"
            ci = f"[{r['low']:+.2f}, {r['high']:+.2f}]" if "diff" in r else ""
            cells = "".join(f" {r[k]:{'.1f' if k in _CURVE else '.3f'}} |" if k in r else " – |" for k in mech)
            lines.append(f"| {r['variant']} | {r['seeds']} | {r['mean']:.2f} ± {r['std']:.2f} | {diff} | {ci} |"
                         + cells)
        lines.append("")
    reference = study["reference"]
    lines += ["## Decision", "", "passes the rule: better than the reference by the rule (interval above 0 in enough "
              "settings, below 0 in none); the last column reads the same rule both ways.", "",
              "| variant | settings above 0 | settings below 0 | passes the rule | reading |", "|---|---|---|---|---|"]
    for variant, v in decisions(study, rows).items():
        reading = (f"better than {reference}" if v["passes"] else f"worse than {reference}" if v["worse"]
                   else f"not separated from {reference}")
        lines.append(f"| {variant} | {v['above']}/{v['settings']} | {v['below']}/{v['settings']} | "
                     f"{'yes' if v['passes'] else 'no'} | {reading} |")
    return "\n".join(lines) + "\n"


def plot_study(study: dict[str, Any], results: list[dict[str, Any]], path: Path) -> Path:
    """One panel per setting: each variant's paired difference to the reference with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(study, results)
    settings = [s["name"] for s in study["settings"]]
    variants = [v["name"] for v in study["variants"] if v["name"] != study["reference"]]
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 0.5 * len(variants) + 2.2),
                             squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings, strict=True):
        for y, variant in enumerate(variants):
            row = next((r for r in rows if r["setting"] == setting and r["variant"] == variant and "diff" in r), None)
            if row is None:
                continue
            low = row["low"] if math.isfinite(row["low"]) else row["diff"]
            high = row["high"] if math.isfinite(row["high"]) else row["diff"]
            color = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:gray"
            ax.errorbar(row["diff"], y, xerr=[[row["diff"] - low], [high - row["diff"]]], fmt="o", color=color,
                        capsize=4)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(variants)), variants, fontsize=8)
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel(f"top-1 − {study['reference']} (points)")
    fig.suptitle("paired difference to the reference, mean and 95% interval over seeds", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path
