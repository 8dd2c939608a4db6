"""``mirrorla analyze``: measure the paper's claims inside a model, trained or not.

Per attention layer, for q and k separately:

- **energy retention** ``Σ‖φ(x)‖² / Σ‖x‖²`` over tokens, heads and images. For the mirror map the
  denominator is the reflected pre-ReLU features, which have the norm of x (the reflections are orthogonal);
  for ELU+1 and the focused/polarity maps, which do not truncate, it is the same ratio and can exceed 1.
- **zeroed fraction**: the fraction of feature coordinates that are exactly 0 (what the ReLU threw away).
- **effective rank** (entropy of the normalised singular values, ``exp(−Σ pᵢ log pᵢ)``) of φ(K) ``[N, d']``
  and of the N×N attention matrix, per image and head, averaged.
- **attention entropy** per query, ``−Σⱼ aᵢⱼ log aᵢⱼ``, averaged (and divided by log N).
- for MirrorLA: the learned angles θ and the variance offsets Δα they are moved by.

The N×N matrices are read out with :func:`mirrorla.ops.linear_attention_reference` (softmax:
``softmax(qkᵀ/√d)``), so they are exactly what the layer multiplies V with.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attention import LinearAttention
from ..feature_maps import MirrorFeatureMap
from .checkpoint import atomic_savefig, atomic_write_text
from .runs import load_run

# the layer-averaged statistics that `compare --analyze` adds to its tables
ANALYSIS_COLUMNS = ("retention_q", "retention_k", "zeroed_k", "rank_k", "rank_attn", "attn_entropy")

__all__ = [
    "ANALYSIS_COLUMNS",
    "analyze_model",
    "attention_matrices",
    "effective_rank",
    "energy_retention",
    "row_entropy",
    "summary_columns",
    "zeroed_fraction",
]


# ----------------------------------------------------------------------------------------------- statistics


def energy_retention(x: torch.Tensor, phi: torch.Tensor) -> float:
    """``Σ‖φ‖² / Σ‖x‖²`` over every element."""
    return float(phi.double().pow(2).sum() / x.double().pow(2).sum().clamp_min(1e-300))


def zeroed_fraction(phi: torch.Tensor) -> float:
    return float((phi == 0).double().mean())


def effective_rank(m: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank of each matrix ``[..., R, C] → [...]``: ``exp(−Σ pᵢ log pᵢ)``, ``p = σ / Σσ``."""
    s = torch.linalg.svdvals(m.double())
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.exp(entropy)


def row_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of ``[..., Nq, N]`` (rows renormalised to sum to 1)."""
    p = attn.double().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def attention_matrices(layer: LinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The N×N attention matrices of a layer (one per stream) and its attention output ``[B, H, N, dv]``."""
    if layer.feature_map is None:
        attn = torch.softmax((q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1)
        return [attn], (attn @ v.double()).to(v.dtype)
    out, attns = layer.feature_map.attend(q, k, v, eps=layer.eps, return_attn=True)
    return attns, out


# ----------------------------------------------------------------------------------------------- collection


class _Capture:
    """Forward pre-hooks that keep each LinearAttention's input and grid."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: dict[str, tuple[torch.Tensor, Any]] = {}
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LinearAttention)}
        self.handles = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                        for name, m in self.layers.items()]

    def _hook(self, name: str):
        def hook(_module, args, kwargs):
            self.inputs[name] = (args[0].detach(), kwargs.get("grid_size"))
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.double().flatten()
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)) if v.numel() else None
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "p05": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "mean_abs": float(v.abs().mean())}


@torch.no_grad()
def analyze_layer(layer: LinearAttention, x: torch.Tensor, grid_size=None, *, max_tokens: int = 4096
                  ) -> dict[str, Any]:
    """Every statistic of one layer for the input ``x`` ``[B, N, C]`` it saw."""
    q, k, v = layer.project(x, grid_size, fold=False)
    stats: dict[str, Any] = {"attn": layer.attn_name, "tokens": int(q.shape[2]), "key_tokens": int(k.shape[2]),
                             "heads": layer.num_heads}
    if layer.feature_map is not None:
        fq, fk = layer.feature_map(q, k)
        for name, raw, phi in (("q", q, fq), ("k", k, fk)):
            stats[f"retention_{name}"] = energy_retention(raw, phi)
            stats[f"zeroed_{name}"] = zeroed_fraction(phi)
        stats["rank_k"] = float(effective_rank(fk).mean())
        stats["feature_dim"] = int(fk.shape[-1])
        fmap = layer.feature_map
        if isinstance(fmap, MirrorFeatureMap) and fmap.block:
            stats["theta"] = _summary(torch.remainder(fmap.theta, math.pi))
            if fmap.variance:
                stats["delta_alpha"] = _summary(fmap.variance_offsets(k))
    if q.shape[2] <= max_tokens and k.shape[2] <= max_tokens:
        attns, _ = attention_matrices(layer, q, k, v)
        stats["rank_attn"] = float(torch.stack([effective_rank(a).mean() for a in attns]).mean())
        entropy = torch.stack([row_entropy(a).mean() for a in attns]).mean()
        stats["attn_entropy"] = float(entropy)
        stats["attn_entropy_normalised"] = float(entropy / math.log(max(k.shape[2], 2)))
    return stats


@torch.no_grad()
def analyze_model(model: nn.Module, images: torch.Tensor, *, max_tokens: int = 4096) -> list[dict[str, Any]]:
    """Run ``images`` through ``model`` and return the statistics of each ``LinearAttention`` layer, in order."""
    model.eval()
    capture = _Capture(model)
    try:
        model(images)
    finally:
        capture.close()
    layers = []
    for name, layer in capture.layers.items():
        if name in capture.inputs:
            x, grid = capture.inputs[name]
            layers.append({"layer": name, **analyze_layer(layer, x, grid, max_tokens=max_tokens)})
    return layers


# ----------------------------------------------------------------------------------------------- checkpoints


def _images(data: str, img_size: int, split_seed: int, num_images: int) -> torch.Tensor:
    from .data import load_data

    bundle = load_data(data, img_size=img_size, split_seed=split_seed, augment=False)
    n = min(num_images, len(bundle.val))
    return torch.stack([bundle.val[i][0] for i in range(n)])


def _expand_runs(paths: list[str]) -> list[Path]:
    """Run directories; a compare directory stands for its default-variant runs (first seed of each attn)."""
    runs = []
    for p in map(Path, paths):
        results = p / "results.json"
        if results.exists():
            seen = set()
            for r in json.loads(results.read_text()):
                if r["variant"] == "default" and r["attn"] not in seen:
                    seen.add(r["attn"])
                    runs.append(Path(r["run_dir"]))
        else:
            runs.append(p)
    return runs


def summary_columns(run_dir: Path, data: str, num_images: int = 32) -> dict[str, float]:
    """Layer-averaged retention, φ(K) rank and attention entropy of a run (``compare --analyze``)."""
    config, state, model = load_run(Path(run_dir))
    layers = analyze_model(model, _images(data, state["img_size"], config.split_seed, num_images))
    cols = {}
    for key in ANALYSIS_COLUMNS:
        values = [layer[key] for layer in layers if key in layer]
        if values:
            cols[key] = sum(values) / len(values)
    return cols


def _plot_layers(analyses: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("retention_k", "energy retention of k"), ("zeroed_k", "zeroed fraction of φ(k)"),
            ("rank_k", "effective rank of φ(K)"), ("rank_attn", "effective rank of attention"),
            ("attn_entropy_normalised", "attention entropy / log N")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for label, layers in analyses.items():
            ys = [layer.get(key) for layer in layers]
            if any(y is not None for y in ys):
                ax.plot(range(len(ys)), [float("nan") if y is None else y for y in ys], marker="o", label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def _plot_attention_maps(models: dict[str, nn.Module], image: torch.Tensor, path: Path, queries: int = 3) -> None:
    """Attention of a few query tokens over the token grid of the first attention layer of each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for label, model in models.items():
        capture = _Capture(model)
        try:
            model(image[None])
        finally:
            capture.close()
        name, layer = next(iter(capture.layers.items()))
        x, grid = capture.inputs[name]
        prefix, (gh, gw) = layer.resolve_grid(x.shape[1], grid)
        q, k, v = layer.project(x, grid, fold=False)
        attns, _ = attention_matrices(layer, q, k, v)
        attn = torch.stack(attns).mean(0)[0].mean(0)  # streams, then heads: [N, Nk]
        kh, kw = (gh, gw) if layer.sr is None else (gh // layer.sr_ratio, gw // layer.sr_ratio)
        rows.append((label, attn[prefix:, prefix:].reshape(gh * gw, kh, kw), (gh, gw)))
    fig, axes = plt.subplots(len(rows), queries + 1, figsize=(2.6 * (queries + 1), 2.6 * len(rows)), squeeze=False)
    for (label, attn, (gh, gw)), ax_row in zip(rows, axes, strict=True):
        picks = [(gh // 2) * gw + gw // 2, (gh // 4) * gw + gw // 4, (3 * gh // 4) * gw + 3 * gw // 4][:queries]
        img = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
        ax_row[0].imshow(img.numpy(), cmap="gray")
        ax_row[0].set_title(f"{label}: input", fontsize=8)
        scale_y, scale_x = attn.shape[1] / gh, attn.shape[2] / gw  # key grid may be spatially reduced
        for ax, qi in zip(ax_row[1:], picks, strict=True):
            ax.imshow(attn[qi].numpy(), cmap="viridis")
            ax.scatter([(qi % gw) * scale_x], [(qi // gw) * scale_y], c="red", s=12)
            ax.set_title(f"query ({qi // gw}, {qi % gw})", fontsize=8)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def analyze_runs(paths: list[str], data: str | None, out: Path, num_images: int = 64) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    analyses, models, first_image = {}, {}, None
    for run in _expand_runs(paths):
        config, state, model = load_run(run)
        images = _images(data or config.data, state["img_size"], config.split_seed, num_images)
        label = config.attn if config.attn != "mirror" or not config.attn_kwargs else f"mirror {config.attn_kwargs}"
        label = label if label not in analyses else f"{label} ({run.name})"
        analyses[label] = analyze_model(model, images)
        models[label] = model
        first_image = images[0] if first_image is None else first_image
    result = {"data": data, "num_images": num_images, "runs": [str(p) for p in _expand_runs(paths)],
              "analysis": analyses}
    atomic_write_text(out / "analysis.json", json.dumps(result, indent=2))
    _plot_layers(analyses, out / "layers.png")
    shown = {k: m for k, m in models.items() if k.split(" ")[0] in ("mirror", "relu", "softmax")} or models
    _plot_attention_maps(shown, first_image, out / "attention_maps.png")
    atomic_write_text(out / "analysis.md", _markdown(analyses))
    return result


def _markdown(analyses: dict[str, list[dict[str, Any]]]) -> str:
    cols = ["retention_q", "retention_k", "zeroed_q", "zeroed_k", "rank_k", "rank_attn", "attn_entropy_normalised"]
    lines = ["| attention | layer | tokens | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for label, layers in analyses.items():
        for layer in layers:
            cells = " | ".join("–" if layer.get(c) is None else f"{layer[c]:.3f}" for c in cols)
            lines.append(f"| {label} | {layer['layer']} | {layer['tokens']} | {cells} |")
    return "\n".join(lines) + "\n"


def cmd_analyze(args: argparse.Namespace) -> int:
    result = analyze_runs(args.checkpoint, args.data, Path(args.out), args.num_images)
    print((Path(args.out) / "analysis.md").read_text())
    print(f"written: {args.out}/analysis.json, analysis.md, layers.png, attention_maps.png "
          f"({len(result['analysis'])} model(s))")
    return 0
