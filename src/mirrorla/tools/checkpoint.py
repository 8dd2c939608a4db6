"""Checkpoints: weights and optimizer tensors in safetensors, the training state in JSON.

A checkpoint ``NAME`` in a run directory is two files, ``NAME.safetensors`` and ``NAME.json``. Each is written
to a temporary file and renamed into place (atomic on POSIX), the tensors first; the JSON, written last,
records the SHA-256 of the tensor file, so a crash between the two renames, a truncated copy or a corrupt
file is detected on load and reported as :class:`CheckpointError` instead of a traceback from inside torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "atomic_savefig", "atomic_write_text", "load_checkpoint", "load_state",
           "resolve_checkpoint", "save_checkpoint"]

FORMAT = "mirrorla-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or of another format."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically: a reader or a crash sees the old file or the new one, never half."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_savefig(fig, path: Path, **kwargs) -> Path:
    """``fig.savefig`` to ``path`` atomically (a reader never sees half a PNG); the format follows the suffix."""
    path = Path(path)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs))
    return path


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors and a JSON-able remainder."""
    tensors, scalars = {}, {}
    for idx, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    name: str,
    *,
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    ema: torch.nn.Module | None = None,
) -> Path:
    """Write ``run_dir/name.safetensors`` and ``run_dir/name.json`` atomically; returns the JSON path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    meta = dict(state)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_tensors(optimizer.state_dict())
        tensors.update(opt_tensors)
    weights = run_dir / f"{name}.safetensors"
    _atomic_write(weights, lambda tmp: save_file(tensors, tmp))
    meta.update(format=FORMAT, weights=weights.name, weights_sha256=_sha256(weights), has_ema=ema is not None)
    meta_path = run_dir / f"{name}.json"
    _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, default=str)))
    return meta_path


def resolve_checkpoint(path: str | Path, name: str = "last") -> Path:
    """The JSON of a checkpoint given a run directory, a ``.json`` or a ``.safetensors`` path."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / f"{name}.json"
    elif p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p} (expected a run directory or a checkpoint .json/.safetensors)")
    return p


def load_state(path: str | Path, name: str = "last") -> tuple[dict[str, Any], Path]:
    """The JSON state of a checkpoint and its path, without reading the weights (config, epoch, history)."""
    meta_path = resolve_checkpoint(path, name)
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {meta_path} is corrupt or truncated (not valid JSON: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a {FORMAT} checkpoint")
    return meta, meta_path


def load_checkpoint(path: str | Path, name: str = "last") -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Read and verify a checkpoint: ``(state, {"model": ..., "ema": ..., "optimizer": optimizer_state|None})``."""
    meta, meta_path = load_state(path, name)
    weights = meta_path.parent / meta["weights"]
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} are missing")
    if _sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"checkpoint weights {weights} are corrupt or truncated (SHA-256 does not match "
                              f"{meta_path.name})")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint weights {weights} cannot be read: {err}") from None
    parts: dict[str, Any] = {
        "model": {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        "ema": {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")} or None,
        "optimizer": _optimizer_state(tensors, meta["optimizer"]) if "optimizer" in meta else None,
    }
    return meta, parts
