"""The GPU speed targets (issue 10), judged on one snapshot of ``run_gpu.sh`` by a rule fixed here, before the runs.

Every target is a ratio measured in one run (MirrorLA against ReLU linear attention or softmax, timed round by round
in the same process), a peak memory, or, on an H100 only, a time in ms (the issue's absolute numbers are H100 ones;
on another GPU its ratios decide). The rule:

- **met**: the whole interval of the measured value lies on the target's side (ratios: ``bench``'s paired median
  over rounds with its distribution-free 95% interval, :func:`mirrorla.tools.bench.paired_ratio`; times: the
  median round with the same kind of interval);
- **missed**: the whole interval lies on the other side;
- **undecided**: the interval holds the limit, so the rounds cannot tell (rerun with more ``--rounds``);
- without an interval (a peak memory, a report written before ``bench`` kept its rounds' times, fewer than 6
  rounds) the point value decides, and the verdict says "(point)".

The table also goes to ``targets.md`` and a plot of every target's margin (how far the value is from its limit,
> 1 on the target's side) to ``targets.png``, both in the results folder unless ``--out`` names another file.

Usage: PYTHONPATH=src python benchmarks/targets.py RESULTS_DIR [--out FILE.md]
       (RESULTS_DIR: what run_gpu.sh wrote, e.g. benchmarks/results/gpu_h200)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mirrorla.tools.bench import median_interval, paired_ratio
from mirrorla.tools.checkpoint import atomic_savefig, atomic_write_text


@dataclasses.dataclass(frozen=True)
class Target:
    """One target: ``quantity`` of attention ``case`` in ``folder``'s report (mode, size: N or image pixels) against
    ``limit``.

    quantity: ``speed`` (how many times faster than ``base``, at least limit), ``time_ratio`` (the case's time over
    ``base``'s, at most limit), ``peak_mb`` (the step's peak memory, at most limit) or ``ms`` (its median time, at
    most limit; judged only on a GPU whose name holds ``gpu``)."""

    name: str
    folder: str
    mode: str
    size: int
    quantity: str
    limit: float
    case: str = "mirror"
    base: str | None = None
    gpu: str | None = None

    @property
    def at_least(self) -> bool:
        return self.quantity == "speed"


def _targets() -> list[Target]:
    targets = []
    for mode, words in (("fwd", "forward"), ("train", "forward+backward")):
        for n in (4096, 16384, 65536):
            targets.append(Target(f"op {words}, N = {n:,}: MirrorLA time / ReLU time ≤ 1.15", "op", mode, n,
                                  "time_ratio", 1.15, base="relu"))
    targets.append(Target("op forward, N = 65,536: MirrorLA ≥ 36× faster than softmax", "op", "fwd", 65536, "speed",
                          36.0, base="softmax"))
    targets.append(Target("op forward, N = 65,536: peak memory ≤ 700 MB", "op", "fwd", 65536, "peak_mb", 700.0))
    targets.append(Target("op forward+backward, N = 65,536: peak memory ≤ 2.3 GB", "op", "train", 65536, "peak_mb",
                          2300.0))
    for mode, n, limit in (("fwd", 16384, 0.43), ("fwd", 65536, 1.55), ("train", 16384, 1.8), ("train", 65536, 6.0)):
        words = "forward" if mode == "fwd" else "forward+backward"
        targets.append(Target(f"op {words}, N = {n:,}: MirrorLA ≤ {limit} ms (H100)", "op", mode, n, "ms", limit,
                              gpu="H100"))
    for size in (224, 1024):
        for mode in ("infer", "train"):
            targets.append(Target(f"DeiT-T eager {size}² {mode}: MirrorLA ≥ 0.9× ReLU's images/s", f"model_{size}",
                                  mode, size, "speed", 0.9, base="relu"))
    for size, limit in ((224, 0.7), (1024, 1.0)):
        for mode in ("infer", "train"):
            targets.append(Target(f"DeiT-T compiled {size}² {mode}: MirrorLA ≥ {limit}× softmax's images/s",
                                  f"model_{size}_compiled_{mode}", mode, size, "speed", limit, base="softmax"))
    return targets


TARGETS = _targets()


def _load(folder: Path) -> tuple[list[dict], dict] | None:
    path = folder / "bench.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    return report["records"], report.get("machine", {})


def _record(records: list[dict], target: Target, attn: str) -> dict | None:
    for r in records:
        if (r.get("attn") == attn and r.get("mode") == target.mode and r.get("n", r.get("img_size")) == target.size
                and not r.get("window")):
            return r
    return None


def judge(target: Target, records: list[dict] | None, gpu: str) -> dict:
    """The target's row: ``value`` (with ``low``/``high`` where an interval exists) and ``verdict``."""
    row = {"target": target, "value": None, "verdict": "not measured"}
    if target.gpu and target.gpu not in gpu:
        row["verdict"] = f"not judged here (an {target.gpu} time; the ratios decide on {gpu or 'this GPU'})"
        return row
    if records is None:
        row["verdict"] = f"not measured (no {target.folder}/bench.json)"
        return row
    case = _record(records, target, target.case)
    base = _record(records, target, target.base) if target.base else None
    if case is None or (target.base and base is None):
        row["verdict"] = "not measured (no such case in the report)"
        return row
    if case.get("status") != "ok" or (base is not None and base.get("status") != "ok"):
        failed = case if case.get("status") != "ok" else base
        row["verdict"] = f"not measured ({failed['attn']}: {failed.get('status')})"
        return row
    if target.quantity == "speed":
        value = paired_ratio(base, case)
    elif target.quantity == "time_ratio":
        value = paired_ratio(case, base)  # the case's time over the base's, round by round
    elif target.quantity == "peak_mb":
        value = None if case.get("peak_mem_mb") is None else {"ratio": case["peak_mem_mb"]}
    else:
        interval = median_interval(case["round_ms"]) if case.get("round_ms") else None
        value = ({"ratio": case["median_ms"]} if interval is None else
                 {"ratio": interval[0], "low": interval[1], "high": interval[2]})
    if value is None:
        row["verdict"] = "not measured (no value recorded)"
        return row
    row.update(value=value["ratio"], low=value.get("low"), high=value.get("high"))
    ok = (lambda x: x >= target.limit) if target.at_least else (lambda x: x <= target.limit)
    if row["low"] is None:
        row["verdict"] = ("met" if ok(row["value"]) else "missed") + " (point)"
    elif ok(row["low"]) and ok(row["high"]):
        row["verdict"] = "met"
    elif not ok(row["low"]) and not ok(row["high"]):
        row["verdict"] = "missed"
    else:
        row["verdict"] = "undecided"
    return row


def evaluate(results: Path) -> tuple[list[dict], str]:
    """Every target's row, and the GPU the reports name."""
    loaded = {folder: _load(results / folder) for folder in {t.folder for t in TARGETS}}
    gpu = next((m.get("gpu", "") for _, m in filter(None, loaded.values()) if m.get("gpu")), "")
    return [judge(t, loaded[t.folder][0] if loaded[t.folder] else None, gpu) for t in TARGETS], gpu


def _value_text(row: dict) -> str:
    if row["value"] is None:
        return "–"
    unit = {"peak_mb": " MB", "ms": " ms", "speed": "×", "time_ratio": "×"}[row["target"].quantity]
    digits = 1 if row["target"].quantity == "peak_mb" else 3 if row["target"].quantity == "ms" else 2
    text = f"{row['value']:.{digits}f}{unit}"
    if row.get("low") is not None:
        text += f" ({row['low']:.{digits}f}–{row['high']:.{digits}f})"
    return text


def markdown(rows: list[dict], gpu: str, results: Path) -> str:
    counts = {v: sum(r["verdict"].split(" ")[0] == v for r in rows) for v in ("met", "missed", "undecided")}
    lines = [f"# Speed targets on {gpu or 'an unnamed GPU'} ({results})", "",
             f"{counts['met']} met, {counts['missed']} missed, {counts['undecided']} undecided, "
             f"{len(rows) - sum(counts.values())} not judged or not measured.", "",
             "| target | measured (95% interval) | verdict |", "|---|---|---|"]
    lines += [f"| {r['target'].name} | {_value_text(r)} | {r['verdict']} |" for r in rows]
    lines += ["", "Rule (benchmarks/targets.py): met where the whole interval lies on the target's side, missed where "
              "it lies on the other, undecided where it holds the limit; (point): no interval recorded, the value "
              "decides. Ratios are paired by timing round: the median over rounds of the two attentions' times in "
              "the same round, with an order-statistics interval for that median."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, gpu: str) -> None:
    """Each judged target's margin on a log axis: value / limit for "at least" targets, limit / value for "at most"
    ones, so > 1 is on the target's side; the interval as a bar, coloured by verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    judged = [r for r in rows if r["value"] is not None]
    if not judged:
        return
    colours = {"met": "tab:green", "missed": "tab:red", "undecided": "tab:orange"}
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(judged) + 1.4))
    for y, row in enumerate(judged):
        target = row["target"]

        def margin(x, target=target):
            return x / target.limit if target.at_least else target.limit / x

        m = margin(row["value"])
        colour = colours[row["verdict"].split(" ")[0]]
        if row.get("low") is not None:
            ends = sorted((margin(row["low"]), margin(row["high"])))
            ax.plot(ends, [y, y], color=colour, linewidth=3, alpha=0.6)
        ax.plot([m], [y], "o", color=colour, markerfacecolor=colour if row.get("low") is not None else "white")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([t for t in (0.25, 0.5, 0.7, 0.8, 0.9, 1, 1.25, 1.5, 2, 3, 5, 10)
                   if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]])
    ax.set_yticks(range(len(judged)), [r["target"].name for r in judged], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("margin: value / limit, or limit / value for an upper limit (> 1: on the target's side)")
    ax.set_title(f"speed targets on {gpu or 'an unnamed GPU'}: green met, red missed, orange undecided; "
                 "hollow: point value", fontsize=9)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="run_gpu.sh's output folder")
    parser.add_argument("--out", default=None, help="the table's file (default RESULTS/targets.md; the plot beside "
                        "it, .png)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: RESULTS {results} is not a folder (run_gpu.sh's output, e.g. benchmarks/results/gpu_h200)",
              file=sys.stderr)
        return 2
    rows, gpu = evaluate(results)
    out = Path(args.out) if args.out else results / "targets.md"
    text = markdown(rows, gpu, results)
    atomic_write_text(out, text)
    plot(rows, out.with_suffix(".png"), gpu)
    print(text, end="")
    print(f"written: {out}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
