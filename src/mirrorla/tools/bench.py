"""``mirrorla bench op`` / ``mirrorla bench model``: speed and memory of every attention, in the same run.

Each case runs in a fresh subprocess, so that a case that runs out of memory or time is recorded as such
(``status``: ``ok``, ``oom``, ``timeout``, ``error``) instead of ending the benchmark, and so that its peak
memory is its own:

- CPU: the subprocess's peak resident set size during the first step minus its resident size just before
  it (Linux ``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``). It sees every
  allocation torch makes (inputs excluded: they exist before the step).
- CUDA: ``torch.cuda.max_memory_allocated`` during the first step minus the allocation before it.

Timing: the cases that differ only by attention run in one subprocess, interleaved, on the same input
tensors: after warm-up, each round times a block of calls of every attention in turn (each round starting
with the next attention) (``time.perf_counter`` on the CPU, CUDA events on
GPUs); median and IQR are over rounds (``--rounds``, 7 by default), and ``bench.json`` keeps every round's time
(``round_ms``). Interleaving keeps the ratios fair on a machine whose speed drifts (the 2-core VMs this was
developed on swing by up to 2× between processes).

Ratios (``× softmax``, ``× relu`` in ``bench.md``) are paired by round: each round's time of the baseline over the
case's, measured back to back, so drift between rounds cancels. The table gives their median and, from 6 rounds up,
a distribution-free interval for it (:func:`median_interval`: order statistics, at least 95% coverage), so a ratio
can be told apart from a target near it (``benchmarks/targets.py`` judges the GPU targets by these intervals).

Cases (see ``docs/benchmarks.md`` of the project): **op** — q, k, v ``[B, H, N, d]`` given; the feature map
plus the attention core, against ``scaled_dot_product_attention`` for softmax. ``mirror`` is the map as
``LinearAttention`` runs it (static reflections folded into the projections, per-sample rotation and ReLU
per token: the fused CPU kernel in ``fwd`` mode where it is built, the PyTorch reference in ``train``
mode); ``mirror_unfolded`` applies every reflection to every token. ``machine.cpu_kernels`` in
``bench.json`` says whether the kernel was built. **model** — a whole model's
images/s at each resolution.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_savefig, atomic_write_text

__all__ = ["bench_model", "bench_op", "machine_info", "measure_memory", "measure_times", "median_interval",
           "paired_ratio", "run_cases", "write_report"]

OP_EXTRA = ("mirror_unfolded",)
# glibc returns large freed blocks to the OS and page-faults them back on the next call; which allocations
# that hits varies from process to process and made CPU timings swing up to 2×. Keeping freed memory in
# the heap (same setting for every case) makes the medians repeatable.
_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_OP_INPUTS: dict[tuple, tuple[torch.Tensor, ...]] = {}  # the op inputs of the size being timed (one worker)


# ----------------------------------------------------------------------------------------------- worker side


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing). The workers keep freed
    memory in the heap (``_WORKER_ENV``), so without this the pages freed while a step was built (the fp32 tensors
    half-precision inputs are converted from, a model's initialisation) stay resident, the step reuses them, and
    its peak above the resident size reads too low (MirrorLA's bf16 forward at 65,536 tokens: 7 MB)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _op_step(case: dict[str, Any], device: torch.device):
    """The timed callable of an op case and the tensors it needs."""
    import torch.nn.functional as F

    from ..attention import LinearAttention

    b, h, n, d = case["batch"], case["heads"], case["n"], case["head_dim"]
    dtype = DTYPES[case["dtype"]]
    train = case["mode"] == "train"
    key = (b, h, n, d, dtype, str(device), train)
    if key not in _OP_INPUTS:
        # every attention of a size times on the very same tensors: where a tensor lands in memory (cache-set
        # conflicts between q, k and v) shifted one attention's times by up to 10% against another's
        _OP_INPUTS.clear()
        g = torch.Generator(device="cpu").manual_seed(0)
        _OP_INPUTS[key] = tuple(torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype)
                                .requires_grad_(train and i < 3) for i in range(3 + train))
    # a train step backpropagates a fixed upstream gradient in the output's dtype, as the layer above hands it. A loss
    # computed in the step (o.float().sum()) timed a cast of o to fp32, its sum and the gradient's cast back with every
    # attention alike: at 65,536 tokens (bf16, B·H = 24) 0.52 ms of an H200's 1.61 ms ReLU step, which diluted the
    # ratios between attentions, and 384 MB of each step's peak memory
    q, k, v, *rest = _OP_INPUTS[key]
    grad_out = rest[0] if train else None
    attn = case["attn"]
    if attn == "softmax":
        params = []

        def fn():
            return F.scaled_dot_product_attention(q, k, v)
    else:
        # the map as LinearAttention runs it (folded where the layer folds); q, k, v stand for its projections
        name = "mirror" if attn in ("mirror", "mirror_unfolded") else attn
        layer = LinearAttention(h * d, h, attn=name, local_kernel=0, fold_feature_map=attn != "mirror_unfolded")
        fmap, kwargs = layer.feature_map.to(device), layer.map_kwargs
        params = list(fmap.parameters())  # MirrorLA's θ, γ, u: their gradients are dropped each step, as a model's

        def fn():
            return fmap.attend(q, k, v, **kwargs)

    if case.get("compile"):
        mode = case.get("compile_mode", "default")
        fn = torch.compile(fn, fullgraph=True, **({} if mode == "default" else {"mode": mode}))
    mark = _cudagraph_step_marker(case)
    if not train:
        def step():
            mark()
            with torch.no_grad():
                return fn()
    else:
        def step():
            mark()
            out = fn()
            out.backward(grad_out)
            # every gradient dropped, as the model step does and optimizers' zero_grad(set_to_none=True): accumulating
            # the map's parameter gradients would charge a map with parameters an add kernel per parameter per step
            for t in (q, k, v, *params):
                t.grad = None
            return out
    return step


def _model_step(case: dict[str, Any], device: torch.device):
    import timm

    from .. import models  # noqa: F401  (registers the models)

    dtype = DTYPES[case["dtype"]]
    kwargs: dict[str, Any] = dict(attn=case["attn"], img_size=case["img_size"], num_classes=1000)
    if case.get("window"):
        kwargs["window_size"] = case["window"]
    model = timm.create_model(case["model"], **kwargs).to(device)
    x = torch.randn(case["batch"], 3, case["img_size"], case["img_size"], device=device)
    train = case["mode"] == "train"
    model.train(train)
    fn = model
    if case.get("compile"):
        from ..models.compile import compile_model

        fn = compile_model(model, scope=case.get("compile_scope", "blocks"), mode=case.get("compile_mode", "default"))
    mark = _cudagraph_step_marker(case)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    if not train:
        def step():
            mark()
            with torch.no_grad(), autocast:
                return fn(x)
    else:
        def step():
            mark()
            with autocast:
                out = fn(x)
            out.float().sum().backward()
            for p in model.parameters():
                p.grad = None
            return out
    return step


def _cudagraph_step_marker(case: dict[str, Any]):
    """What a step calls first: under CUDA graphs (``reduce-overhead``) it tells the graph trees that a new
    step begins, so the previous step's outputs may be overwritten; otherwise nothing."""
    if case.get("compile") and "reduce-overhead" in case.get("compile_mode", "default"):
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


_STEPS: dict[str, Any] = {}  # in-process (CUDA) runs: each case's step is built (and compiled) once


def _build_step(case: dict[str, Any], device: torch.device):
    key = json.dumps({k: case[k] for k in sorted(case) if k not in _RESULT_FIELDS}, default=str)
    if key not in _STEPS:
        if device.type != "cuda":  # a CPU worker process measures one group; keep nothing of another
            _STEPS.clear()
        _STEPS[key] = _new_step(case, device)
    return _STEPS[key]


_RESULT_FIELDS = ("median_ms", "iqr_ms", "peak_mem_mb", "status", "error", "calls_per_round", "rounds",
                  "round_ms", "images_per_second", "note")
DEFAULT_ROUNDS = 7


def _new_step(case: dict[str, Any], device: torch.device):
    from ..backend import cpu_kernels_available

    # load (or build) the fused CPU kernels before anything is measured: the library's pages are not part of
    # a step's memory, and every attention's process then starts from the same state
    cpu_kernels_available()
    return _op_step(case, device) if case["kind"] == "op" else _model_step(case, device)


def measure_memory(case: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one step, measured on the first call in a fresh process (later calls reuse heap the
    allocator kept from earlier ones); with ``compile`` on the second call, after compilation."""
    device = torch.device(case["device"])
    step = _build_step(case, device)
    if case.get("compile"):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"peak_mem_mb": round((torch.cuda.max_memory_allocated() - before) / 2**20, 2), "status": "ok"}
    _release_free_heap()
    exact = _reset_peak_rss()
    before = _rss_kb("VmRSS")
    step()
    peak_mb = (_rss_kb("VmHWM") - before) / 1024 if exact else None
    return {"peak_mem_mb": None if peak_mb is None else round(peak_mb, 2), "status": "ok"}


def measure_times(cases: list[dict[str, Any]], *, min_run_time: float, max_call_seconds: float,
                  rounds: int = DEFAULT_ROUNDS) -> list[dict[str, Any]]:
    """Median and IQR of the per-call time of each case, interleaved: every round times a block of calls of
    each case in turn, so drift of a shared machine hits every attention alike and their ratios stay fair. Each
    result keeps its rounds' times in round order (``round_ms``): round r of every case ran in the same round,
    which is what pairs them (:func:`paired_ratio`)."""
    if rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds}")
    device = torch.device(cases[0]["device"])
    blocks: list[tuple[Any, int] | None] = []
    results: list[dict[str, Any]] = []
    for case in cases:
        step = _build_step(case, device)
        step()  # warm-up (and compilation)
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        one = time.perf_counter() - t0
        if one > max_call_seconds:
            blocks.append(None)
            results.append({"status": "timeout", "note": f"one call took {one:.1f} s > {max_call_seconds:.0f} s"})
            continue
        calls = max(1, int(max(min_run_time / rounds, 0.02) / max(one, 1e-6)))
        blocks.append((step, calls))
        results.append({"status": "ok", "calls_per_round": calls})
    samples: list[list[float]] = [[] for _ in cases]
    for r in range(rounds):
        # each round starts with the next attention, so none always runs first (after the others' traffic)
        for i in [(j + r) % len(blocks) for j in range(len(blocks))]:
            block = blocks[i]
            if block is None:
                continue
            step, calls = block
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    step()
                end.record()
                torch.cuda.synchronize()
                samples[i].append(start.elapsed_time(end) / calls)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    step()
                samples[i].append((time.perf_counter() - t0) * 1e3 / calls)
    for case, result, ts in zip(cases, results, samples, strict=True):
        if result["status"] != "ok":
            continue
        quartiles = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
        result.update(median_ms=round(statistics.median(ts), 4), iqr_ms=round(quartiles[2] - quartiles[0], 4),
                      rounds=len(ts), round_ms=[round(t, 5) for t in ts])
        if case["kind"] == "model":
            result["images_per_second"] = round(case["batch"] / (result["median_ms"] / 1e3), 2)
    return results


# ----------------------------------------------------------------------------------------------- driver side


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    from ..backend import backend_setting, cpu_kernels_status, triton_available

    cuda = device.startswith("cuda")
    backend = backend_setting()
    if backend == "auto":
        backend = "triton" if cuda and triton_available(torch.device(device)) else "cpu/torch"
    tuning = None
    if backend == "triton":  # the Triton path's per-GPU launch settings, and where they came from
        from ..ops.tuning import kernel_tuning

        chosen = kernel_tuning(torch.device(device))
        tuning = {**chosen.settings(), "source": chosen.source}
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "triton": _triton_version(), "backend": backend, "kernel_tuning": tuning,
            "cpu_kernels": cpu_kernels_status()}


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _worker(payload: dict[str, Any], timeout: float) -> list[dict[str, Any]] | dict[str, Any]:
    """Run a worker subprocess; its failure becomes a status."""
    try:
        proc = subprocess.run([sys.executable, "-m", "mirrorla.tools.bench", json.dumps(payload)],
                              capture_output=True, text=True, timeout=timeout, env={**_WORKER_ENV, **os.environ})
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode == 0 and proc.stdout.strip():
        return json.loads(proc.stdout.strip().splitlines()[-1])
    err = proc.stderr[-3000:]
    oom = proc.returncode in (-9, 137) or "out of memory" in err.lower() or "MemoryError" in err
    return {"status": "oom" if oom else "error",
            "error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}


def run_cases(cases: list[dict[str, Any]], *, timeout: float, progress: bool = True) -> list[dict[str, Any]]:
    """Memory of each case in its own fresh subprocess, then the timings of each group of cases that differ
    only by attention in one subprocess, interleaved. Failures become records with their status."""
    from tqdm.auto import tqdm

    records = [{**c, "median_ms": None, "iqr_ms": None, "peak_mem_mb": None} for c in cases]
    if records and records[0]["device"].startswith("cuda"):
        return _run_cases_in_process(records, timeout=timeout, progress=progress)
    bar = tqdm(total=2 * len(cases), desc="bench", disable=not progress, dynamic_ncols=True)
    for r in records:
        bar.set_postfix_str(f"memory {r['attn']} {r.get('n', r.get('img_size'))} {r['mode']} {r['dtype']}")
        r.update(_worker({"task": "memory", "case": r}, timeout))
        bar.update()
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(_key(r), []).append(r)
    for key, members in groups.items():
        runnable = [r for r in members if r["status"] == "ok"]
        bar.set_postfix_str(f"time {key[0]} {key[4]} {key[2]} {key[3]}")
        if runnable:
            out = _worker({"task": "time", "cases": runnable, "min_run_time": runnable[0]["min_run_time"],
                           "rounds": runnable[0].get("rounds", DEFAULT_ROUNDS), "max_call_seconds": timeout / 4},
                          timeout * (len(runnable) + 1))
            for r, res in zip(runnable, out if isinstance(out, list) else [out] * len(runnable), strict=True):
                r.update(res)
        bar.update(len(members))
    bar.close()
    return records


def _run_cases_in_process(records: list[dict[str, Any]], *, timeout: float, progress: bool) -> list[dict[str, Any]]:
    """CUDA: every case in this process (a subprocess per case cost more start-up than the whole measurement).
    Memory is the allocator's peak during one step after a reset, minus what was allocated before it; the cases
    of one size are then timed together, interleaved, with CUDA events. An out-of-memory case is recorded as
    ``oom`` and the rest go on."""
    from tqdm.auto import tqdm

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(_key(r), []).append(r)
    bar = tqdm(total=len(records), desc="bench", disable=not progress, dynamic_ncols=True)
    for key, members in groups.items():
        bar.set_postfix_str(f"{key[0]} {key[4]} {key[2]} {key[3]}")
        for r in members:
            try:
                r.update(measure_memory(r))
            except torch.OutOfMemoryError as err:
                r.update(status="oom", error=str(err).splitlines()[0][:300])
            except Exception as err:  # noqa: BLE001 (one failing case must not end the benchmark)
                r.update(status="error", error=f"{type(err).__name__}: {str(err).strip()[:300]}")
        if any(r.get("compile") and r["status"] != "ok" for r in members):
            # a compiled step that failed midway leaves the CUDA-graph trees half built, and the next compiled case
            # then died on their internal assertion (H100 run): start the compiler's state afresh, rebuilding the
            # steps that did work
            torch.compiler.reset()
            _STEPS.clear()
        runnable = [r for r in members if r["status"] == "ok"]
        if runnable:
            try:
                out = measure_times(runnable, min_run_time=runnable[0]["min_run_time"], max_call_seconds=timeout / 4,
                                    rounds=runnable[0].get("rounds", DEFAULT_ROUNDS))
            except torch.OutOfMemoryError as err:
                out = [{"status": "oom", "error": str(err).splitlines()[0][:300]}] * len(runnable)
            for r, res in zip(runnable, out, strict=True):
                r.update(res)
        _OP_INPUTS.clear()
        _STEPS.clear()
        torch.cuda.empty_cache()
        bar.update(len(members))
    bar.close()
    return records


def _op_cases(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    from ._args import csv_list as _csv

    cases = []
    for dtype in _csv(args.dtype):
        for mode in _csv(args.mode):
            for n in (int(x) for x in _csv(args.n)):
                for attn in _csv(args.attn):
                    cases.append(dict(kind="op", attn=attn, n=n, mode=mode, dtype=dtype, device=device,
                                      batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                                      compile=args.compile, min_run_time=args.min_run_time, rounds=args.rounds,
                                      **_compile_options(args, "op")))
    return cases


def _model_cases(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    from ._args import csv_list as _csv

    windows = [int(w) for w in _csv(args.window)] if args.window else [None]
    cases = []
    for model in _csv(args.model):
        for dtype in _csv(args.dtype):
            for mode in _csv(args.mode):
                for size in (int(x) for x in _csv(args.img_size)):
                    for attn in _csv(args.attn):
                        for window in windows if attn == "softmax" and "swin" in model else [None]:
                            cases.append(dict(kind="model", model=model, attn=attn, img_size=size, mode=mode,
                                              dtype=dtype, device=device, batch=args.batch, window=window,
                                              compile=args.compile, min_run_time=args.min_run_time, rounds=args.rounds,
                                              **_compile_options(args, "model")))
    return cases


def _compile_options(args: argparse.Namespace, kind: str) -> dict[str, str]:
    if not args.compile:
        return {}
    return {"compile_mode": args.compile_mode, **({"compile_scope": args.compile_scope} if kind == "model" else {})}


def _label(r: dict[str, Any]) -> str:
    label = r["attn"]
    if r.get("window"):
        label += f" (window {r['window']})"
    return label


def _key(r: dict[str, Any]) -> tuple:
    return (r["kind"], r.get("model"), r["mode"], r["dtype"], r.get("n", r.get("img_size")))


def _tuning_text(tuning: dict[str, Any] | None) -> str:
    if not tuning:
        return ""
    moment = tuning.get("moment_state_blocks")  # absent from the records of runs before the setting existed
    return (f", row kernels up to {tuning['row_max_tiles']} tiles, chunked backward "
            f"{tuple(tuning['backward_blocks'])}, IEEE fp32 {tuple(tuning['ieee_backward_blocks'])}"
            + (f", rotation's training state pass {tuple(moment)}" if moment else "") + f" ({tuning['source']})")


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float] | None:
    """``(median, low, high)`` of ``values``: the median with a distribution-free interval for it, the order
    statistics ``x₍ₖ₎`` and ``x₍ₙ₊₁₋ₖ₎`` with the largest k for which ``P(Binomial(n, ½) < k) ≤ (1 − confidence)/2``
    (the sign test's interval: it covers the median with at least ``confidence`` whatever the distribution, so a
    few slow rounds, a GPU clock dip, cannot narrow or shift it as they would a t-interval). None where n is too
    small for any such k (fewer than 6 values at 95%)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return None
    tail, k, below = (1 - confidence) / 2, 0, 0.0  # below: P(Binomial(n, ½) ≤ k − 1)
    while k < n // 2 and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return None
    return statistics.median(xs), xs[k - 1], xs[n - k]


def paired_ratio(base: dict[str, Any], case: dict[str, Any], confidence: float = 0.95) -> dict[str, Any] | None:
    """How many times faster ``case`` ran than ``base`` (records of one timing group): per round, the base's time
    over the case's, then :func:`median_interval` of those ratios (``ratio``, ``low``, ``high``; no ``low``/``high``
    below 6 rounds). Records without per-round times (reports from before ``round_ms``) give the ratio of their
    medians, unpaired. None where either did not run."""
    if any(r.get("status") != "ok" or not r.get("median_ms") for r in (base, case)):
        return None
    b, c = base.get("round_ms"), case.get("round_ms")
    if not b or not c or len(b) != len(c):
        return {"ratio": base["median_ms"] / case["median_ms"], "paired": False}
    ratios = [x / y for x, y in zip(b, c, strict=True)]
    interval = median_interval(ratios, confidence)
    if interval is None:
        return {"ratio": statistics.median(ratios), "paired": True}
    return {"ratio": interval[0], "low": interval[1], "high": interval[2], "paired": True}


def _ratio_text(ratio: dict[str, Any] | None) -> str:
    if ratio is None:
        return "–"
    if "low" in ratio:
        return f"{ratio['ratio']:.2f} ({ratio['low']:.2f}–{ratio['high']:.2f})"
    return f"{ratio['ratio']:.2f}"


def write_report(records: list[dict[str, Any]], out: Path, machine: dict[str, Any]) -> None:
    """``bench.json``, ``bench.md`` (ratios against softmax and ReLU of the same size) and ``bench.png``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps({"machine": machine, "records": records}, indent=2))
    lines = [f"# Benchmark ({machine['device']}{', ' + machine['gpu'] if machine.get('gpu') else ''}; "
             f"{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}; "
             f"backend: {machine.get('backend', 'n/a')}{_tuning_text(machine.get('kernel_tuning'))}; "
             f"fused CPU kernels: {machine.get('cpu_kernels', 'n/a')})", ""]
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in records:
        by_key.setdefault(_key(r), {})[_label(r)] = r
    groups: dict[tuple, list[tuple]] = {}
    for key in by_key:
        groups.setdefault(key[:4], []).append(key)
    for group, keys in groups.items():
        kind, model, mode, dtype = group
        size_name = "N" if kind == "op" else "img"
        compiled = next((r for r in records if _key(r)[:4] == group and r.get("compile")), None)
        how = ""
        if compiled:
            how = f", compiled ({compiled.get('compile_mode', 'default')}" + (
                f", {compiled['compile_scope']})" if compiled.get("compile_scope") else ")")
        title = f"## {kind}{' ' + model if model else ''} — {mode}, {dtype}{how}"
        lines += [title, "", f"| {size_name} | attention | median ms | IQR ms | peak MB | × softmax | × relu | "
                  + ("img/s |" if kind == "model" else "status |"), "|---" * 8 + "|"]
        for key in sorted(keys, key=lambda k: k[4]):
            row = by_key[key]
            soft, relu = row.get("softmax"), row.get("relu")
            for label, r in row.items():
                def ratio(base, r=r):
                    return _ratio_text(paired_ratio(base, r) if base else None)
                med = f"{r['median_ms']:.3f}" if r.get("median_ms") is not None else "–"
                iqr = f"{r['iqr_ms']:.3f}" if r.get("iqr_ms") is not None else "–"
                mem = f"{r['peak_mem_mb']:.1f}" if r.get("peak_mem_mb") is not None else "–"
                last = (f"{r['images_per_second']:.1f} |" if kind == "model" and r.get("status") == "ok"
                        else f"{r['status']} |")
                lines.append(f"| {key[4]} | {label} | {med} | {iqr} | {mem} | {ratio(soft)} | {ratio(relu)} | {last}")
        lines.append("")
    lines.append("× softmax / × relu: how many times faster than softmax / ReLU linear attention of the same size, "
                 "measured in the same run (> 1 is faster): the median over rounds of the baseline's time over this "
                 "case's in the same round and, from 6 rounds up, in brackets an interval that holds that median "
                 "with at least 95% confidence (order statistics of the rounds' ratios).")
    atomic_write_text(out / "bench.md", "\n".join(lines) + "\n")
    _plot(records, out / "bench.png")


def _plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    groups = sorted({(r["kind"], r.get("model"), r["mode"], r["dtype"]) for r in ok}, key=str)
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4 * len(groups)), squeeze=False)
    for row, group in zip(axes, groups, strict=True):
        kind, model, mode, dtype = group
        rs = [r for r in ok if (r["kind"], r.get("model"), r["mode"], r["dtype"]) == group]
        for label in sorted({_label(r) for r in rs}):
            pts = sorted((r.get("n", r.get("img_size")), r["median_ms"], r["peak_mem_mb"]) for r in rs
                         if _label(r) == label)
            xs = [p[0] for p in pts]
            row[0].plot(xs, [p[1] for p in pts], marker="o", label=label)
            if all(p[2] is not None for p in pts):
                row[1].plot(xs, [max(p[2], 1e-3) for p in pts], marker="o", label=label)
        xname = "tokens N" if kind == "op" else "image size (px)"
        for ax, yname in zip(row, ("median latency (ms)", "peak memory of the step (MB)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xname)
            ax.set_ylabel(yname)
            ax.set_title(f"{kind}{' ' + model if model else ''} {mode} {dtype}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def _device(arg: str | None) -> str:
    if arg:
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


OP_MODES, MODEL_MODES = ("fwd", "train"), ("infer", "train")


def _positive_ints(text: str, option: str) -> list[int]:
    from ._args import csv_list as _csv

    values = []
    for item in _csv(text):
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{option} takes comma-separated positive ints, got {item!r}") from None
        if value < 1:
            raise ValueError(f"{option} takes comma-separated positive ints, got {value}")
        values.append(value)
    if not values:
        raise ValueError(f"{option} needs at least one value")
    return values


def _choices(text: str, option: str, allowed) -> list[str]:
    from ._args import csv_list as _csv

    values = _csv(text)
    for value in values:
        if value not in allowed:
            raise ValueError(f"{option}: unknown value {value!r}; choose from {', '.join(allowed)}")
    if not values:
        raise ValueError(f"{option} needs at least one value")
    return values


def validate_args(args: argparse.Namespace, kind: str) -> None:
    """Every bench option checked before any case runs; errors name the option and what it accepts."""
    from ..attention import list_attentions
    from ..models.compile import COMPILE_MODES, COMPILE_SCOPES

    # a report can hold hours of measurements (a lent GPU's session): it is replaced only when asked
    if (Path(args.out) / "bench.json").exists() and not getattr(args, "overwrite", False):
        raise ValueError(f"--out {args.out} already holds a benchmark report (bench.json): pass --overwrite to "
                         "replace it, or another directory")
    _choices(args.mode, "--mode", OP_MODES if kind == "op" else MODEL_MODES)
    for option, value, allowed in (("--compile-mode", args.compile_mode, COMPILE_MODES),
                                   ("--compile-scope", args.compile_scope, COMPILE_SCOPES)):
        if value not in allowed:
            raise ValueError(f"{option}: unknown value {value!r}; choose one of {', '.join(allowed)}")
    _choices(args.dtype, "--dtype", tuple(DTYPES))
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    for name in ("timeout", "min_run_time"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be a positive int (6 or more give the ratios an interval), got {args.rounds}")
    if args.batch < 1:
        raise ValueError(f"--batch must be a positive int, got {args.batch}")
    if kind == "op":
        _positive_ints(args.n, "--n")
        _choices(args.attn, "--attn", (*list_attentions(), *OP_EXTRA))
        if args.heads < 1 or args.head_dim < 1:
            raise ValueError(f"--heads and --head-dim must be positive ints, got {args.heads} and {args.head_dim}")
    else:
        from ..models import list_models

        _choices(args.model, "--model", list_models())
        _positive_ints(args.img_size, "--img-size")
        _choices(args.attn, "--attn", list_attentions())
        if args.window:
            _positive_ints(args.window, "--window")


def bench_op(args: argparse.Namespace) -> list[dict[str, Any]]:
    validate_args(args, "op")
    device = _device(args.device)
    records = run_cases(_op_cases(args, device), timeout=args.timeout, progress=not args.no_progress)
    write_report(records, Path(args.out), machine_info(device))
    return records


def bench_model(args: argparse.Namespace) -> list[dict[str, Any]]:
    validate_args(args, "model")
    device = _device(args.device)
    records = run_cases(_model_cases(args, device), timeout=args.timeout, progress=not args.no_progress)
    write_report(records, Path(args.out), machine_info(device))
    return records


def _print_report(out: str) -> int:
    print((Path(out) / "bench.md").read_text())
    print(f"written: {out}/bench.json, {out}/bench.md, {out}/bench.png")
    return 0


def cmd_op(args: argparse.Namespace) -> int:
    bench_op(args)
    return _print_report(args.out)


def cmd_model(args: argparse.Namespace) -> int:
    bench_model(args)
    return _print_report(args.out)


def _worker_main(payload: dict[str, Any]) -> Any:
    if payload["task"] == "memory":
        return measure_memory(payload["case"])
    return measure_times(payload["cases"], min_run_time=payload["min_run_time"],
                         max_call_seconds=payload["max_call_seconds"], rounds=payload.get("rounds", DEFAULT_ROUNDS))


if __name__ == "__main__":  # worker: python -m mirrorla.tools.bench PAYLOAD_JSON
    try:
        print(json.dumps(_worker_main(json.loads(sys.argv[1]))))
    except (torch.OutOfMemoryError, MemoryError) as err:
        print(json.dumps({"status": "oom", "error": str(err)[:500]}))
