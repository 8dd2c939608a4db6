"""``mirrorla train`` / ``mirrorla eval``: image classification with timm's training pieces, on one CPU or on
many GPUs and machines through ``torchrun`` + DistributedDataParallel.

Reproducibility: every epoch reseeds torch, numpy and random from ``(seed, epoch, rank)`` and the sampler
shuffles with ``(seed, epoch)``, so a run resumed from its epoch-``e`` checkpoint replays exactly what the
uninterrupted run did after epoch ``e``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm.auto import tqdm

from ..models.compile import compile_model
from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint, load_state, save_checkpoint
from .config import TrainConfig
from .data import load_data
from .runs import build_model, load_run, load_weights

__all__ = ["TrainConfig", "build_model", "evaluate", "evaluate_checkpoint", "train"]


# ----------------------------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): nccl on GPUs,
    gloo on CPUs. Without torchrun: one process, CUDA if available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistInfo(device=torch.device("cuda" if cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if not cuda:
        # ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return DistInfo(rank, world, local_rank, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` takes indices ``r, r+w, …``: every sample exactly once across ranks (no padding),
    so reduced evaluation metrics are exact."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _autocast(config: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, info: DistInfo | None = None,
             amp: str = "none") -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy of ``model`` over ``loader`` (summed across ranks)."""
    info = info or DistInfo(device=device)
    model.eval()
    # summed on the device and read once at the end: a read per batch would make the host wait for the GPU
    loss_t = torch.zeros((), dtype=torch.float64, device=device)
    correct1_t = torch.zeros((), dtype=torch.int64, device=device)
    correct5_t = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            loss_t += F.cross_entropy(logits, y, reduction="sum").double()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1_t += (top[:, 0] == y).sum()
            correct5_t += (top == y[:, None]).any(dim=1).sum()
            count += y.numel()
    loss_sum, correct1, correct5 = torch.stack([loss_t, correct1_t.double(), correct5_t.double()]).tolist()
    loss_sum, correct1, correct5, count = _all_reduce_sum([loss_sum, correct1, correct5, float(count)], info)
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count}


def _loader(dataset, batch_size: int, *, train: bool, info: DistInfo, seed: int, workers: int) -> DataLoader:
    if train:
        sampler: Sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                              seed=seed, drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=train, pin_memory=info.device.type == "cuda", persistent_workers=workers > 0)


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """``log.csv`` rewritten from the run's history, atomically: one row per epoch, never a duplicate (a crash
    between this write and the checkpoint's is repaired by the next write, which starts from the checkpoint)."""
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


# files that make a directory a run directory, and everything a run writes (removed by --overwrite)
RUN_MARKERS = ("last.json", "best.json", "metrics.json", "log.csv")
RUN_FILES = (*RUN_MARKERS, "last.safetensors", "best.safetensors", "config.json", "tensorboard")

# options that may differ when a run is resumed: they change neither the model nor the data it sees
RESUME_FREE = ("progress", "workers", "tensorboard", "compile")  # how a run executes, not what it trains


def holds_run(path: Path) -> bool:
    """Whether ``path`` is a directory that already holds a training run."""
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def fresh_run_dir(root: str | Path = "runs/train") -> Path:
    """A new, unused directory ``root/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3`` … on a clash); not created here."""
    base = Path(root) / time.strftime("%Y%m%d-%H%M%S")
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or that holds a run unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a directory (new or empty, or a run to --overwrite)")
    if holds_run(out) and not overwrite:
        raise ValueError(f"--out {out} already holds a run; continue or extend it with `--resume {out}`, replace it "
                         "with `--overwrite`, or choose another --out")


def resume_config(run: str | Path, overrides: dict[str, Any] | None = None, *,
                  state: dict[str, Any] | None = None) -> TrainConfig:
    """The stored config of the run in ``run`` (its directory, or one of its checkpoint files), with ``overrides``.

    ``epochs`` may grow (the run is extended: the cosine schedule is stretched to the new length from the current
    step, see the README), and the options in :data:`RESUME_FREE` may change. Any other override must equal the
    stored value; otherwise the error names every conflicting option. ``state``: the checkpoint's JSON state when
    the caller has read it already.
    """
    run_dir = _run_dir_of(run)
    if state is None:  # the JSON alone; train passes the state of the checkpoint it has read and verified
        state, _ = load_state(run_dir, "last")
    stored = TrainConfig(**{**state["config"], "out": str(run_dir)})  # the run may have moved
    changes: dict[str, Any] = {}
    conflicts = []
    for key, value in (overrides or {}).items():
        old = getattr(stored, key)
        if key == "out":
            if Path(value).resolve() != run_dir.resolve():
                conflicts.append(f"--out {value} (the run continues in {run_dir})")
        elif key == "epochs":
            if value < stored.epochs:
                conflicts.append(f"--epochs {value} (the run was planned for {stored.epochs}; it can only be extended)")
            changes[key] = value
        elif key in RESUME_FREE:
            changes[key] = value
        elif value != old:
            conflicts.append(f"--{key.replace('_', '-')} {value!r} (the run has {old!r})")
    if conflicts:
        raise ValueError(f"cannot resume {run_dir} with other options: {'; '.join(conflicts)}")
    if state["epoch"] >= changes.get("epochs", stored.epochs):
        raise ValueError(f"the run in {run_dir} has finished its {state['epoch']} epochs; extend it with "
                         f"--resume {run_dir} --epochs N (N > {state['epoch']})")
    return dataclasses.replace(stored, **changes)


_IGNORED_IN_MATCH = ("out", *RESUME_FREE)  # where a run is kept, and what may differ on resume


def existing_run_action(run_dir: Path, config: TrainConfig) -> str:
    """What to do with a run directory that already holds a run of ``config``: ``"reuse"`` (finished),
    ``"resume"`` (checkpointed) or ``"train"`` (never checkpointed); a run of other options is an error."""
    metrics_path = run_dir / "metrics.json"
    stored_path = run_dir / "config.json"
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else {}
    mine = dataclasses.asdict(config)
    diff = sorted(k for k in mine if k not in _IGNORED_IN_MATCH and stored.get(k) != mine[k])
    if diff:
        raise ValueError(f"{run_dir} holds a run with other options ({', '.join(diff)}); use another --out or "
                         "remove that run")
    if metrics_path.exists() and json.loads(metrics_path.read_text()).get("finished"):
        return "reuse"
    try:
        resume_config(run_dir)
    except ValueError:  # no last checkpoint yet (crashed in epoch 1): start it again
        return "train"
    return "resume"


def run_planned(config: TrainConfig, action: str) -> dict[str, Any]:
    """The metrics of a planned run (see :func:`existing_run_action`): read back, resumed, or trained."""
    run_dir = Path(config.out)
    if action == "reuse":
        return json.loads((run_dir / "metrics.json").read_text())
    if action == "resume":
        return train(config, resume=run_dir)
    return train(config, overwrite=True)  # a new run, or one of the same config that never checkpointed


ACTION_NOTES = {"train": "", "resume": " (resuming)", "reuse": " (finished: reused)"}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_logged(config: TrainConfig, action: str, log_path: str) -> dict[str, Any]:
    """:func:`run_planned` in a worker process, its console output kept in ``log_path`` (beside the run)."""
    import contextlib

    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return run_planned(config, action)


def run_all_planned(runs: list[tuple[str, TrainConfig, str]], jobs: int = 1):
    """Run ``(label, config, action)`` items, ``jobs`` at a time; yield ``(index, metrics)`` as each finishes.

    ``jobs == 1`` trains in this process, in order, its output on the console. With ``jobs > 1`` each run trains in
    its own spawned process with ``cpu_count // jobs`` torch threads (small models train faster as several
    single-threaded processes than as one multi-threaded one) and writes its console output to ``<run dir>.log``;
    this process prints one line as each run ends. A failing run stops the ones not yet started.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs}")
    if jobs == 1:
        for i, (label, config, action) in enumerate(runs):
            print(f"[{i + 1}/{len(runs)}] {label}" + ACTION_NOTES[action], flush=True)
            yield i, run_planned(config, action)
        return
    import concurrent.futures as cf
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = {}
    with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                initargs=(threads,)) as pool:
        for i, (_, config, action) in enumerate(runs):
            if action != "reuse":
                pending[pool.submit(_run_logged, config, action, f"{config.out}.log")] = i
        for i, (label, config, action) in enumerate(runs):
            if action == "reuse":  # read back here: no process needed
                print(f"[{i + 1}/{len(runs)}] {label}" + ACTION_NOTES[action], flush=True)
                yield i, run_planned(config, action)
        if pending:
            print(f"{len(pending)} runs to train, {jobs} at a time with {threads} torch thread(s) each; each run's "
                  "output goes to <run dir>.log", flush=True)
        start = time.perf_counter()
        try:
            for done, future in enumerate(cf.as_completed(pending), 1):
                i = pending[future]
                try:
                    metrics = future.result()
                except Exception:
                    print(f"{runs[i][0]} failed; its output: {runs[i][1].out}.log", flush=True)
                    raise
                print(f"[{done}/{len(pending)} trained] {runs[i][0]}: best top-1 {metrics['best_top1']:.2f} "
                      f"({metrics['train_seconds']:.0f} s; {time.perf_counter() - start:.0f} s since start)",
                      flush=True)
                yield i, metrics
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _run_dir_of(run: str | Path) -> Path:
    p = Path(run).expanduser()
    if p.is_file() or p.suffix in (".json", ".safetensors"):
        p = p.parent  # a checkpoint file names its run: resume always continues from the run's last checkpoint
    if not holds_run(p):
        raise CheckpointError(f"--resume {run}: no run there (expected a run directory holding last.json)")
    return p


def _remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _check_model_input(model: torch.nn.Module, config: TrainConfig, in_chans: int, img_size: int) -> None:
    """One tiny forward before any work: an image size the model cannot take fails here, in one line."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, img_size, img_size))
    except (RuntimeError, AssertionError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--img-size {img_size} does not fit model {config.model}: {first}") from None
    finally:
        model.train()


def _default_img_size(model: str, data: str) -> int | None:
    """The model's configured input size (timm's ``resolve_data_config``) for folder data, which has no size of
    its own; None for the bundled sets and CIFAR, which keep their native size."""
    if not data.startswith("folder:"):
        return None
    from timm.data import resolve_data_config

    cfg = timm.models.get_pretrained_cfg(model)
    pretrained = cfg.to_dict() if cfg is not None else {}
    return int(resolve_data_config(pretrained_cfg=pretrained, use_test_size=False)["input_size"][-1])


# ----------------------------------------------------------------------------------------------- training


@dataclass
class _Recipe:
    """The optimisation pieces of a run, built from its config (timm's AdamW, cosine schedule, EMA, mixup)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: torch.nn.Module
    ema: Any = None
    mixup: Any = None


def param_groups(model: torch.nn.Module, weight_decay: float, map_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW parameter groups as timm makes them (no weight decay for biases, norms, 1-d parameters and the model's
    ``no_weight_decay()``), with the feature maps' parameters in groups of their own whose ``lr_scale`` timm's
    schedulers multiply into the learning rate at every step."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if map_lr_scale == 1.0:  # exactly timm's two groups, so checkpoints of earlier runs resume
        from timm.optim import param_groups_weight_decay

        return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        groups.setdefault((decay, ".feature_map." in f".{name}"), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             **({"lr_scale": map_lr_scale} if in_map else {})}
            for (decay, in_map), params in groups.items()]


def _recipe(config: TrainConfig, model: torch.nn.Module, steps_per_epoch: int, num_classes: int) -> _Recipe:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    optimizer = create_optimizer_v2(param_groups(model, config.weight_decay, config.map_lr_scale), opt="adamw",
                                    lr=config.lr, weight_decay=config.weight_decay)
    # stepped per update with the absolute step, so a resumed or extended run (longer t_initial) picks up its curve
    scheduler = CosineLRScheduler(
        optimizer, t_initial=config.epochs * steps_per_epoch, lr_min=config.min_lr,
        warmup_t=int(config.warmup_epochs * steps_per_epoch), warmup_lr_init=config.lr * 1e-2, t_in_epochs=False,
    )
    ema = ModelEmaV3(model, decay=config.model_ema_decay) if config.model_ema else None
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                      num_classes=num_classes)
        criterion: torch.nn.Module = SoftTargetCrossEntropy()
    elif config.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(config.label_smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    return _Recipe(optimizer, scheduler, criterion, ema, mixup)


def _resolve_run(config: TrainConfig, resume, overrides, overwrite: bool):
    """The config to run, and the checkpoint to continue from (``({}, {})`` for a new run)."""
    if resume is not None:
        state, parts = load_checkpoint(_run_dir_of(resume), "last")  # read and verified once
        return resume_config(resume, overrides, state=state), state, parts
    if overrides:
        config = dataclasses.replace(config, **overrides)
    if config.out is None:
        return config, {}, {}  # a fresh directory is picked, and taken, when the run starts writing
    check_out_dir(Path(config.out), overwrite=overwrite)
    return config, {}, {}


def _take_run_dir(config: TrainConfig, *, new_run: bool, overwrite: bool) -> TrainConfig:
    """Create the run directory just before the first write, checked again: another process may have started a
    run there since the checks (an automatic name is then replaced by the next free one)."""
    if not new_run:
        return config
    if config.out is None:
        while True:
            out = fresh_run_dir()
            try:
                out.mkdir(parents=True)  # atomic: two runs started in the same second get two directories
                return dataclasses.replace(config, out=str(out))
            except FileExistsError:
                continue
    out = Path(config.out)
    check_out_dir(out, overwrite=overwrite)
    if overwrite:
        _remove_run_files(out)
    out.mkdir(parents=True, exist_ok=True)
    return config


def _training_set(config: TrainConfig, data):
    if not config.train_subset:
        return data.train
    if config.train_subset > len(data.train):
        raise ValueError(f"train_subset must be at most the {len(data.train)} training images of {config.data}, "
                         f"got {config.train_subset}")
    # a seeded random subset: the bundled sets store their labels in sorted blocks
    order = np.random.default_rng(config.split_seed).permutation(len(data.train))[: config.train_subset]
    return torch.utils.data.Subset(data.train, sorted(order.tolist()))


READ_EVERY = 10
"""Training steps between reads of the step's numbers (loss, accuracy, whether the loss stayed finite) back to
the host. A read makes the host wait for the GPU; one per step would keep the host from queueing the next step's
kernels while the GPU still runs this one's."""


def _first_bad_step_of_all_ranks(first_bad: torch.Tensor, bad_loss: torch.Tensor, info: DistInfo
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first step at which any rank's loss was not finite (-1: none) and that loss, the same on every rank.

    A loss that turns NaN on one rank turns every rank's NaN one step later (the gradients are averaged), which
    can fall after a read: that rank would stop at the read while the others went on into the next step's
    gradient all-reduce and waited for it forever. Two scalar collectives per read (every ``READ_EVERY`` steps),
    on the device: no host read of their own."""
    never = torch.iinfo(torch.int64).max
    key = torch.where(first_bad >= 0, first_bad * info.world_size + info.rank, never)  # the earliest, then the rank
    dist.all_reduce(key, op=dist.ReduceOp.MIN)
    value = torch.where(key % info.world_size == info.rank, bad_loss, torch.zeros_like(bad_loss))
    dist.all_reduce(value)  # only the rank that saw the first bad loss adds it (none: 0)
    return torch.where(key == never, -1, key // info.world_size), value


def _train_epoch(ddp_model, model, loader, recipe: _Recipe, config: TrainConfig, info: DistInfo, epoch: int
                 ) -> tuple[float, float, float, float]:
    """One epoch; returns (loss sum, correct, images seen, seconds) of this rank.

    A non-finite loss is an error naming its step. It is noticed on the device at that step and raised at the
    next read (at most ``READ_EVERY`` steps later), always before the epoch's checkpoint is written."""
    steps_per_epoch = len(loader)
    seed_everything(config.seed * 100_003 + epoch * 101 + info.rank)
    loader.sampler.set_epoch(epoch)
    ddp_model.train()
    t0 = time.perf_counter()
    loss_sum = correct = seen = 0.0
    loss_t = torch.zeros((), dtype=torch.float64, device=info.device)  # Σ loss · batch, as the host would sum it
    correct_t = torch.zeros((), dtype=torch.int64, device=info.device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=info.device)  # the first step with a non-finite loss
    bad_loss = torch.zeros((), dtype=torch.float32, device=info.device)
    bar = tqdm(loader, desc=f"{config.attn} epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=not (config.progress and info.is_main), dynamic_ncols=True)
    cuda_graphs = config.compile == "reduce-overhead" and info.device.type == "cuda"
    for step, (x, y) in enumerate(bar):
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        if cuda_graphs:  # a new training step: the graphs' output buffers of the last one may be reused
            torch.compiler.cudagraph_mark_step_begin()
        target = y
        if recipe.mixup is not None:
            x, target = recipe.mixup(x, y)
        with _autocast(config, info.device):
            logits = ddp_model(x)
        loss = recipe.criterion(logits.float(), target)
        new_bad = (first_bad < 0) & ~torch.isfinite(loss.detach())
        first_bad = torch.where(new_bad, step, first_bad)
        bad_loss = torch.where(new_bad, loss.detach(), bad_loss)
        recipe.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        recipe.optimizer.step()
        recipe.scheduler.step_update(epoch * steps_per_epoch + step + 1)
        if recipe.ema is not None:
            recipe.ema.update(model, step=epoch * steps_per_epoch + step + 1)
        n = y.numel()
        loss_t += loss.detach().double() * n
        correct_t += (logits.argmax(1) == y).sum()
        seen += n
        if (step + 1) % READ_EVERY and step + 1 < steps_per_epoch:
            continue
        if info.enabled:  # every rank stops at the same read (see _first_bad_step_of_all_ranks)
            first_bad, bad_loss = _first_bad_step_of_all_ranks(first_bad, bad_loss, info)
        loss_sum, correct, bad_step, bad_value = torch.stack(
            [loss_t, correct_t.double(), first_bad.double(), bad_loss.double()]).tolist()
        if bad_step >= 0:
            raise FloatingPointError(f"loss became {bad_value} at epoch {epoch + 1}, step {int(bad_step) + 1}")
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                        img_s=f"{seen * info.world_size / max(elapsed, 1e-9):.0f}")
    bar.close()
    return loss_sum, correct, seen, time.perf_counter() - t0


def train(config: TrainConfig, *, resume: str | Path | None = None, stop_after: int | None = None,
          overwrite: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``config`` (or continue the run in ``resume``); returns the final metrics (also ``out/metrics.json``).

    Every value is checked before anything is written: the data are loaded, the model built and run on one
    image first. ``config.out`` must not hold a run unless ``overwrite`` (its run files are then replaced);
    ``config.out = None`` picks a fresh ``runs/train/<timestamp>``.

    ``resume``: a run directory (or one of its checkpoint files); ``config`` is then ignored and the stored
    config is used with ``overrides`` (see :func:`resume_config`: ``epochs`` may grow, the rest must agree).

    ``stop_after``: stop after this many epochs of *this* invocation, the schedule still spanning
    ``config.epochs`` (for time-boxed jobs; continue with ``resume``).
    """
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be a positive int, got {stop_after!r}")
    config, state, parts = _resolve_run(config, resume, overrides, overwrite)
    info = setup_distributed()

    seed_everything(config.seed)
    data = load_data(config.data, img_size=config.img_size or _default_img_size(config.model, config.data),
                     split_seed=config.split_seed)
    train_set = _training_set(config, data)
    per_rank_batch = max(1, config.batch_size // info.world_size)
    train_loader = _loader(train_set, per_rank_batch, train=True, info=info, seed=config.seed, workers=config.workers)
    val_loader = _loader(data.val, per_rank_batch * 2, train=False, info=info, seed=config.seed, workers=config.workers)
    if len(train_loader) == 0:
        raise ValueError(f"batch size {config.batch_size} is larger than the {len(train_set)} training images")

    model = build_model(config, data.num_classes, data.in_chans, data.img_size)
    _check_model_input(model, config, data.in_chans, data.img_size)
    model = model.to(info.device)
    params = sum(p.numel() for p in model.parameters())
    recipe = _recipe(config, model, len(train_loader), data.num_classes)
    start_epoch, best_top1, history, train_seconds = 0, -1.0, [], 0.0
    if resume is not None:
        load_weights(model, parts["model"], Path(config.out) / "last.json", config)
        recipe.optimizer.load_state_dict(parts["optimizer"])
        if recipe.ema is not None and parts["ema"] is not None:
            recipe.ema.module.load_state_dict(parts["ema"])
        start_epoch, best_top1 = state["epoch"], state["best_top1"]
        history, train_seconds = state["history"], state["train_seconds"]
    if config.compile != "none":
        # block by block: one block's code serves all (fast to compile); after the EMA copy and the resumed weights,
        # so the EMA model stays eager and nothing is traced twice. Parameter names are unchanged (checkpoints).
        compile_model(model, scope="blocks", mode=config.compile)
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type
                 == "cuda" else None) if info.enabled else model)
    if info.is_main:
        # everything was checked: only now is the run directory created (or the old run replaced)
        config = _take_run_dir(config, new_run=resume is None, overwrite=overwrite)
        atomic_write_text(Path(config.out) / "config.json", json.dumps(dataclasses.asdict(config), indent=2))
    out = Path(config.out) if config.out is not None else None  # ranks other than 0 write nothing
    writer = None
    if config.tensorboard and info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

    end_epoch = config.epochs if stop_after is None else min(config.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end_epoch):
        try:
            sums = _train_epoch(ddp_model, model, train_loader, recipe, config, info, epoch)
        except FloatingPointError as err:  # the run diverged: say what is kept, in one line
            where = out if out is not None else "the run directory"  # ranks other than 0 do not know it
            kept = (f"{where} keeps the checkpoint of epoch {epoch}" if epoch > 0
                    else "no epoch finished, so no checkpoint was written")
            raise FloatingPointError(f"{err}; {kept}. A lower --lr or a --clip-grad may help") from None
        loss_sum, correct, seen, seconds_sum = _all_reduce_sum(list(sums), info)
        epoch_seconds = seconds_sum / info.world_size  # mean over ranks
        train_seconds += epoch_seconds
        val = evaluate(model, val_loader, info.device, info, config.amp)
        ema = recipe.ema
        ema_val = evaluate(ema.module, val_loader, info.device, info, config.amp) if ema is not None else None
        top1 = max(val["top1"], ema_val["top1"]) if ema_val else val["top1"]
        row = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 5),
            "train_top1": round(100 * correct / seen, 3),
            "val_loss": round(val["loss"], 5),
            "val_top1": round(val["top1"], 3),
            "val_top5": round(val["top5"], 3),
            "ema_val_top1": round(ema_val["top1"], 3) if ema_val else "",
            "lr": recipe.optimizer.param_groups[0]["lr"],
            "images_per_second": round(seen / max(epoch_seconds, 1e-9), 2),
            "epoch_seconds": round(epoch_seconds, 3),
        }
        history.append(row)
        improved = top1 > best_top1
        best_top1 = max(best_top1, top1)
        if info.is_main:
            _write_log(out / "log.csv", history)
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key != "epoch":
                        writer.add_scalar(key, value, epoch + 1)
            ckpt_state = {"config": dataclasses.asdict(config), "epoch": epoch + 1, "best_top1": best_top1,
                          "history": history, "train_seconds": train_seconds, "params": params,
                          "num_classes": data.num_classes, "in_chans": data.in_chans, "img_size": data.img_size}
            save_checkpoint(out, "last", model=model, state=ckpt_state, optimizer=recipe.optimizer,
                            ema=ema.module if ema else None)
            if improved:
                best_model = ema.module if ema_val and ema_val["top1"] >= val["top1"] else model
                save_checkpoint(out, "best", model=best_model, state=ckpt_state)
            print(f"epoch {epoch + 1}/{config.epochs}  train loss {row['train_loss']:.4f} acc {row['train_top1']:.2f}"
                  f"  val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f}  {row['images_per_second']:.0f} img/s",
                  flush=True)
    if writer is not None:
        writer.close()
    return _finish(config, model, data, history, best_top1, train_seconds, params, per_rank_batch, info, out)


def _finish(config, model, data, history, best_top1, train_seconds, params, per_rank_batch, info, out):
    """``metrics.json``: the run's summary, with the test accuracy once every epoch ran."""
    finished = len(history) >= config.epochs
    metrics = {
        "model": config.model,
        "attn": config.attn,
        "attn_kwargs": config.attn_kwargs,
        "data": config.data,
        "epochs": len(history),
        "finished": finished,
        "seed": config.seed,
        "best_top1": round(best_top1, 3),
        "final_top1": history[-1]["val_top1"] if history else None,
        "params": params,
        "train_seconds": round(train_seconds, 2),
        "images_per_second": round(sum(r["images_per_second"] for r in history) / max(len(history), 1), 2),
        "world_size": info.world_size,
    }
    if finished:
        test_loader = _loader(data.test, per_rank_batch * 2, train=False, info=info, seed=config.seed,
                              workers=config.workers)
        metrics["test_top1"] = round(evaluate(model, test_loader, info.device, info, config.amp)["top1"], 3)
    if info.is_main:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    if info.enabled:
        dist.barrier()
    return metrics


def evaluate_checkpoint(path: str | Path, data: str | None = None, *, split: str = "test", use_ema: bool = False,
                        batch_size: int = 256) -> dict[str, Any]:
    """Evaluate a checkpoint (a run directory → its ``best`` checkpoint, or one checkpoint file)."""
    config, state, model = load_run(path, use_ema=use_ema)
    bundle = load_data(data or config.data, img_size=state["img_size"], split_seed=config.split_seed, augment=False)
    if (bundle.num_classes, bundle.in_chans) != (state["num_classes"], state["in_chans"]):
        raise ValueError(f"data {data!r} has {bundle.num_classes} classes and {bundle.in_chans} channels; the "
                         f"checkpoint expects {state['num_classes']} and {state['in_chans']}")
    dataset = {"train": bundle.train, "val": bundle.val, "test": bundle.test}[split]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    result = evaluate(model.to(device), loader, device)
    return {"checkpoint": str(Path(path).expanduser()), "data": data or config.data, "split": split,
            "model": config.model, "attn": config.attn, "epoch": state["epoch"],
            **{k: round(v, 4) for k, v in result.items()}}


# ----------------------------------------------------------------------------------------------- CLI


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the command line gave (the others keep their defaults)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in fields and v is not None}


def cmd_train(args: argparse.Namespace) -> int:
    given = config_values(args)
    if args.resume:
        if args.overwrite:
            raise ValueError("--overwrite and --resume exclude each other: --resume continues the run in place")
        metrics = train(TrainConfig(), resume=args.resume, stop_after=args.stop_after, overrides=given)
    else:
        metrics = train(TrainConfig(**given), stop_after=args.stop_after, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, use_ema=args.ema)
    print(json.dumps(result, indent=2))
    return 0
