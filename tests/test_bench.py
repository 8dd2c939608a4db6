"""The benchmark tool: records, ratios, plots and failure statuses (never wall-clock claims)."""

import json

import pytest

from mirrorla.tools.cli import main

REQUIRED = {"kind", "attn", "mode", "dtype", "device", "median_ms", "iqr_ms", "peak_mem_mb", "status"}


def test_bench_op_writes_records_tables_and_plot(tmp_path, capsys):
    # each case starts Python processes (about 9 s each here, most of it importing torch and timm): one mode only;
    # the forward cases are measured in-process below
    rc = main(["bench", "op", "--n", "256", "--attn", "softmax,relu,mirror", "--mode", "train",
               "--min-run-time", "0.05", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {"cpu", "threads", "torch", "device"} <= set(report["machine"])
    records = report["records"]
    assert len(records) == 3
    for r in records:
        assert REQUIRED <= set(r) and "n" in r
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["peak_mem_mb"] is not None
        assert r["rounds"] == 7 and len(r["round_ms"]) == 7 and all(t > 0 for t in r["round_ms"])
    md = (tmp_path / "bench.md").read_text()
    assert "× softmax" in md and "| 256 | mirror |" in md
    # 7 rounds: each ratio with its interval, the median of the paired rounds' ratios inside it
    (mirror_row,) = [line for line in md.splitlines() if line.startswith("| 256 | mirror |")]
    cells = [c.strip() for c in mirror_row.strip("|").split("|")]
    for cell in cells[5:7]:
        ratio, low, high = (float(x) for x in cell.replace("(", " ").replace("–", " ").rstrip(")").split())
        assert low <= ratio <= high
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "bench.md" in capsys.readouterr().out


def test_op_forward_cases_measure_memory_and_time():
    """The forward (no-grad) op cases, measured by the functions each worker process runs."""
    from mirrorla.tools import bench

    base = dict(kind="op", n=96, mode="fwd", dtype="fp32", device="cpu", batch=1, heads=3, head_dim=16,
                compile=False, min_run_time=0.01)
    cases = [dict(base, attn=a) for a in ("softmax", "relu", "mirror")]
    for case in cases:
        assert bench.measure_memory(case)["status"] == "ok"
    times = bench.measure_times(cases, min_run_time=0.01, max_call_seconds=30)
    assert [t["status"] for t in times] == ["ok"] * 3
    assert all(t["median_ms"] > 0 and t["iqr_ms"] >= 0 for t in times)


def test_rounds_are_kept_in_order_and_their_number_is_an_option():
    from mirrorla.tools import bench

    case = dict(kind="op", n=32, mode="fwd", dtype="fp32", device="cpu", batch=1, heads=1, head_dim=16,
                compile=False, min_run_time=0.01, attn="relu")
    (one,) = bench.measure_times([case], min_run_time=0.01, max_call_seconds=30, rounds=1)
    assert one["rounds"] == 1 and len(one["round_ms"]) == 1 and one["iqr_ms"] == 0
    (many,) = bench.measure_times([case], min_run_time=0.01, max_call_seconds=30, rounds=9)
    assert len(many["round_ms"]) == 9 and many["median_ms"] == pytest.approx(sorted(many["round_ms"])[4], rel=1e-3)
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        bench.measure_times([case], min_run_time=0.01, max_call_seconds=30, rounds=0)


def test_median_interval_is_the_sign_tests_order_statistics():
    """From n values, the k-th smallest and largest with the largest k for which P(Binomial(n, 1/2) < k) ≤ 2.5%:
    the interval holds the median with at least 95% probability whatever the distribution."""
    from math import comb

    from mirrorla.tools.bench import median_interval

    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) is None  # 5 values: even min..max covers only 93.8%
    assert median_interval([]) is None
    assert median_interval([float(x) for x in (6, 0, 3, 1, 5, 2, 4)]) == (3.0, 0.0, 6.0)  # 7: min..max, 98.4%
    assert median_interval([float(x) for x in range(15)]) == (7.0, 3.0, 11.0)  # 15: 4th smallest..largest, 96.5%
    for n in range(6, 60):
        median, low, high = median_interval([float(x) for x in range(n)])
        k = int(low) + 1
        assert high == n - k
        below = sum(comb(n, i) for i in range(k)) / 2**n  # P(Binomial(n, 1/2) <= k - 1)
        assert below <= 0.025 < below + comb(n, k) / 2**n
    # 50%: P(Binomial(9, 1/2) <= 2) = 9.0% <= 25% < P(<= 3) = 25.4%: the 3rd smallest to the 3rd largest
    assert median_interval([float(x) for x in range(9)], confidence=0.5)[1:] == (2.0, 6.0)
    with pytest.raises(ValueError, match="confidence must be in"):
        median_interval([1.0] * 9, confidence=1.0)


def test_ratios_are_paired_by_round_so_drift_between_rounds_cancels():
    """A machine whose speed halves between rounds: the case runs 2× faster than the base in every round, the
    unpaired ratio of medians says otherwise, the paired one says 2 with an interval of exactly 2."""
    from mirrorla.tools.bench import paired_ratio

    drift = [1, 1, 1, 2, 2, 2, 2, 4, 4]
    base_rounds = [10.0 * x for x in drift]
    case_rounds = [5.0 * x for x in drift[::-1]][::-1]  # the same drift, round by round
    base = {"status": "ok", "median_ms": 20.0, "round_ms": base_rounds}
    case = {"status": "ok", "median_ms": 10.0, "round_ms": case_rounds}
    assert paired_ratio(base, case) == {"ratio": 2.0, "low": 2.0, "high": 2.0, "paired": True}
    shuffled = dict(case, round_ms=[5.0 * x for x in (4, 4, 2, 2, 2, 2, 1, 1, 1)])  # same times, other rounds
    wide = paired_ratio(base, shuffled)
    assert wide["low"] < 1 and wide["high"] > 4
    # reports from before round_ms (or a case that did not run): the ratio of medians, unpaired, or nothing
    assert paired_ratio({"status": "ok", "median_ms": 3.0}, {"status": "ok", "median_ms": 1.5}) == {
        "ratio": 2.0, "paired": False}
    assert paired_ratio(base, {"status": "timeout", "median_ms": None}) is None
    few = paired_ratio(dict(base, round_ms=base_rounds[:5]), dict(case, round_ms=case_rounds[:5]))
    assert few == {"ratio": 2.0, "paired": True}  # no interval from 5 rounds


def test_cpu_peak_memory_counts_pages_freed_while_the_step_was_built():
    """The CPU workers keep freed memory in the heap, and half-precision op inputs are converted from fp32 tensors
    that are freed before the step runs: the step's peak must still count what it allocates (here at least its
    96 MB bf16 output), not reuse those resident pages unseen (it read 5 MB at 65,536 tokens)."""
    from mirrorla.tools import bench

    b, h, n, d = 8, 3, 32_768, 64
    case = dict(kind="op", n=n, mode="fwd", dtype="bf16", device="cpu", batch=b, heads=h, head_dim=d,
                compile=False, min_run_time=0.01, attn="relu")
    out = bench._worker({"task": "memory", "case": case}, timeout=120)
    assert out["status"] == "ok", out
    assert out["peak_mem_mb"] >= b * h * n * d * 2 / 2**20, out


def test_op_train_steps_drop_every_gradient_as_a_model_step_does(monkeypatch):
    """A train op step leaves no gradient behind, the feature map's parameters included (MirrorLA's θ, γ, u):
    gradients kept from step to step would be accumulated by an add kernel per parameter per step, a cost only the
    maps with parameters paid and that a training step (zero_grad(set_to_none=True)) does not pay."""
    import torch

    from mirrorla import attention
    from mirrorla.tools import bench

    layers = []

    class Recorded(attention.LinearAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            layers.append(self)

    monkeypatch.setattr(attention, "LinearAttention", Recorded)
    case = dict(kind="op", n=32, mode="train", dtype="fp32", device="cpu", batch=1, heads=2, head_dim=8,
                compile=False, attn="mirror")
    step = bench._op_step(case, torch.device("cpu"))
    step()
    step()
    q, k, v, _ = bench._OP_INPUTS[next(iter(bench._OP_INPUTS))]
    params = list(layers[0].feature_map.parameters())
    assert len(params) >= 2 and all(p.requires_grad for p in params)  # θ and γ at least
    assert all(t.grad is None for t in (q, k, v, *params))


@pytest.mark.parametrize("attn", ["softmax", "relu", "mirror"])
def test_op_train_steps_backpropagate_a_fixed_gradient_and_compute_no_loss(monkeypatch, attn):
    """A train op step times the attention's forward and backward for a given upstream gradient (in the output's
    shape and dtype, the same every step), not a loss of its own: o.float().sum() added a cast of o, a sum and a
    cast back of its gradient to every attention's time (a third of ReLU's at 65,536 tokens on an H200)."""
    import torch

    from mirrorla.tools import bench

    seen = []
    real_backward = torch.Tensor.backward

    def recording_backward(self, gradient=None, *args, **kwargs):
        seen.append((tuple(self.shape), self.dtype, gradient))
        return real_backward(self, gradient, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", recording_backward)
    case = dict(kind="op", n=32, mode="train", dtype="bf16", device="cpu", batch=1, heads=2, head_dim=8,
                compile=False, attn=attn)
    step = bench._op_step(case, torch.device("cpu"))
    step()
    step()
    assert len(seen) == 2 and all(shape == (1, 2, 32, 8) and dtype == torch.bfloat16 for shape, dtype, _ in seen)
    grads = [g for *_, g in seen]
    assert grads[0] is grads[1] and grads[0].shape == (1, 2, 32, 8) and grads[0].dtype == torch.bfloat16


def test_bench_model_reports_images_per_second(tmp_path):
    rc = main(["bench", "model", "--model", "mirrorla_vit_nano_patch4", "--attn", "softmax,mirror", "--img-size",
               "48", "--batch", "2", "--mode", "infer", "--min-run-time", "0.05", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert {(r["attn"], r["img_size"]) for r in records} == {("softmax", 48), ("mirror", 48)}
    assert all(r["status"] == "ok" and r["images_per_second"] > 0 for r in records)


def test_cases_that_run_out_of_time_are_recorded_not_fatal(tmp_path):
    rc = main(["bench", "op", "--n", "64", "--attn", "relu", "--mode", "fwd", "--timeout", "0.01", "--out",
               str(tmp_path), "--no-progress"])
    assert rc == 0
    (record,) = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert record["status"] == "timeout" and record["median_ms"] is None
    assert "timeout" in (tmp_path / "bench.md").read_text()


def test_a_finished_report_is_replaced_only_when_asked(tmp_path, capsys):
    """A second benchmark into the same --out refuses before it measures anything (one-line error, the report
    untouched); --overwrite replaces it."""
    args = ["bench", "op", "--n", "64", "--attn", "relu", "--mode", "fwd", "--timeout", "0.01", "--out", str(tmp_path),
            "--no-progress"]
    assert main(args) == 0
    report = (tmp_path / "bench.json").read_text()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a benchmark report (bench.json): pass --overwrite" in err and err.count("\n") == 1
    assert (tmp_path / "bench.json").read_text() == report
    assert main([*args, "--overwrite"]) == 0


def test_report_tables_have_as_many_divider_cells_as_header_cells(tmp_path):
    """A markdown table renders only when its divider row has exactly the header's cells."""
    from mirrorla.tools.bench import write_report

    records = [dict(kind="op", attn=a, n=64, mode="fwd", dtype="fp32", status="ok", median_ms=1.0 + i, iqr_ms=0.1,
                    peak_mem_mb=1.0) for i, a in enumerate(("softmax", "relu", "mirror"))]
    write_report(records, tmp_path, {"device": "cpu", "cpu": "x", "threads": 1, "torch": "t", "cpu_kernels": "n/a"})
    lines = (tmp_path / "bench.md").read_text().splitlines()
    tables = [i for i, line in enumerate(lines) if line.startswith("|---")]
    assert tables
    for i in tables:
        cells = lines[i - 1].count("|")
        assert lines[i].count("|") == cells and all(row.count("|") == cells for row in lines[i + 1:i + 4])


def test_a_failed_compiled_case_resets_the_compiler_and_the_others_are_measured(monkeypatch):
    """In-process runs (CUDA): a compiled case that fails is recorded as an error, the compiler's state is reset
    (half-built CUDA-graph trees killed the next case once) and the other attentions of the size are measured."""
    import torch

    from mirrorla.tools import bench

    real_new_step = bench._new_step

    def new_step(case, device):
        if case["attn"] == "mirror":
            raise RuntimeError("compilation failed")
        return real_new_step(case, device)

    resets = []
    real_compile = torch.compile
    monkeypatch.setattr(bench, "_new_step", new_step)
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    # dynamo traces the relu case with fullgraph=True; inductor's C++ code generation would add 15 s on 2 cores
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, **options, backend="eager"))
    base = dict(kind="op", n=64, mode="fwd", dtype="fp32", device="cpu", batch=1, heads=2, head_dim=16,
                compile=True, compile_mode="default", min_run_time=0.01, median_ms=None, iqr_ms=None, peak_mem_mb=None)
    records = [dict(base, attn="relu"), dict(base, attn="mirror")]
    out = bench._run_cases_in_process(records, timeout=60, progress=False)
    assert [r["status"] for r in out] == ["ok", "error"]
    assert "compilation failed" in out[1]["error"] and out[0]["median_ms"] > 0
    assert resets == [1]


def _stub_python(tmp_path, slow_check: bool):
    """An executable standing in for Python in benchmarks/gpu_session.sh: it logs each call (its arguments and
    MIRRORLA_TUNING), writes the tuning file where `mirrorla tune --out FILE` is called, and sleeps in gpu_check
    when ``slow_check``."""
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$* | tuning=${{MIRRORLA_TUNING:-}}" >> {calls}\n'
        'case "$*" in\n'
        f'  *gpu_check.py*) {"sleep 30" if slow_check else "echo ok"} ;;\n'
        '  *"mirrorla tune"*) out=""; prev=""; for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done;'
        ' echo "{}" > "$out" ;;\n'
        "esac\n")
    stub.chmod(0o755)
    return stub, calls


def _gpu_session(tmp_path, stub, budget: int, min_step: int, pack=None):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PACK": str(pack or tmp_path / "results.tgz"), "BUDGET": str(budget),
           "MIN_STEP": str(min_step)}
    done = subprocess.run(["bash", str(root / "benchmarks/gpu_session.sh"), str(stub)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out, (out / "session.log").read_text().splitlines()


def test_gpu_session_runs_its_steps_in_order_with_the_settings_tune_chose(tmp_path):
    import tarfile

    stub, calls = _stub_python(tmp_path, slow_check=False)
    out, log = _gpu_session(tmp_path, stub, budget=570, min_step=30)
    assert [line.split(":")[0] for line in log] == ["gpu_check", "tune", "run_gpu", "targets", "gpu_profile",
                                                    "local_term", "torch_backend",
                                                    "packed " + str(out) + " into " + str(tmp_path / "results.tgz")]
    assert all(" exit 0 " in line for line in log[:7]), log
    assert (out / "gpu_check.txt").exists() and not list(out.glob("*.partial"))
    lines = calls.read_text().splitlines()
    # the checks and tune run with the library's settings; the snapshot and the profile with tune's
    assert "gpu_check.py" in lines[0] and lines[0].endswith("tuning=")
    assert "mirrorla tune" in lines[1] and lines[1].endswith("tuning=")
    later = lines[2:]
    assert any("bench op" in line for line in later) and "gpu_profile.py" in later[-3]
    assert f"benchmarks/targets.py {out}" in later[-4]  # right after the snapshot's last bench
    assert "local_term.py --device cuda" in later[-2]
    assert "bench op --device cuda --n 65536" in later[-1] and "op_torch_backend" in later[-1]
    assert all(line.endswith(f"tuning={out / 'kernel_tuning.json'}") for line in later)
    with tarfile.open(tmp_path / "results.tgz") as pack:
        assert "./session.log" in pack.getnames()


def test_gpu_session_keeps_within_its_budget_and_still_packs_what_it_has(tmp_path):
    import tarfile

    stub, calls = _stub_python(tmp_path, slow_check=True)
    out, log = _gpu_session(tmp_path, stub, budget=3, min_step=2)
    # gpu_check is cut at the budget (timeout's 124), not at its own 200 s; nothing after it starts
    assert log[0].startswith("gpu_check: exit 124") and "(limit 3 s)" in log[0], log
    assert [line.split(":")[0] for line in log[1:7]] == ["tune", "run_gpu", "targets", "gpu_profile", "local_term",
                                                         "torch_backend"]
    assert all("skipped" in line for line in log[1:7]), log
    assert len(calls.read_text().splitlines()) == 1
    assert (out / "gpu_check.txt.partial").exists() and not (out / "gpu_check.txt").exists()
    with tarfile.open(tmp_path / "results.tgz") as pack:
        assert {"./session.log", "./gpu_check.txt.partial"} <= set(pack.getnames())


def test_gpu_session_packs_into_its_own_output_directory(tmp_path):
    """PACK inside OUT (how a lent machine returns one archive from its output folder): the archive holds the
    session's files and not itself, also when a second session packs over the first's archive."""
    import tarfile

    stub, _ = _stub_python(tmp_path, slow_check=False)
    for _ in range(2):
        out, log = _gpu_session(tmp_path, stub, budget=570, min_step=30, pack=tmp_path / "out" / "results.tgz")
        assert log[-1] == f"packed {out} into {out / 'results.tgz'}", log
        with tarfile.open(out / "results.tgz") as pack:
            names = pack.getnames()
        assert {"./session.log", "./gpu_check.txt", "./kernel_tuning.json"} <= set(names)
        assert not any("results.tgz" in name for name in names), names


def test_local_term_benchmark_times_both_grid_orders_in_one_run(tmp_path, benchmark_script, capsys):
    """benchmarks/local_term.py at a tiny size on the CPU: both orders, both modes, ratios, the table written; bad
    sizes are a one-line error."""
    local_term = benchmark_script("local_term")
    out = tmp_path / "local_term.txt"
    assert local_term.main(["--sizes", "32:2,48:1", "--repeats", "1", "--out", str(out)]) == 0
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 32²") or line.startswith("| 48²")]
    assert [r.split(" | ")[2] for r in rows] == ["fwd", "fwd+bwd"] * 2
    assert all(float(r.split(" | ")[5].rstrip(" |")) > 0 for r in rows)
    assert local_term.main(["--sizes", "100:2"]) == 2
    assert "IMAGE a multiple of 16" in capsys.readouterr().err


def test_gpu_profile_times_pieces_in_bursts_that_cannot_fill_the_launch_queue(monkeypatch, benchmark_script):
    """gpu_profile's per-piece timing syncs after every BURST calls, so the host clock measures the host (200 calls
    back to back filled CUDA's launch queue and then measured the device); on a CPU it reports no device time."""
    import torch

    gpu_profile = benchmark_script("gpu_profile")
    events = []
    monkeypatch.setattr(gpu_profile, "sync", lambda device: events.append("sync"))
    host_us, wall_us, device_us = gpu_profile.time_calls(lambda: events.append("call"), torch.device("cpu"),
                                                         calls=20, warmup=3)
    assert events.count("call") == 23 and device_us is None and 0 < host_us <= wall_us
    after_warmup = events[events.index("sync") + 1:]
    bursts = "".join("c" if e == "call" else "|" for e in after_warmup).split("|")[:-1]
    assert [len(b) for b in bursts] == [gpu_profile.BURST] * (20 // gpu_profile.BURST) + [20 % gpu_profile.BURST]



def test_gpu_profile_long_row_table_runs_both_kernel_paths(monkeypatch, benchmark_script):
    """gpu_profile's second table (the ops' forward+backward and the layers' training steps at the 1024² layer
    shape, here a 4 × 4 grid) times every piece on the Triton path, on the kernels the library picks (here made the
    chunked ones) and on the row kernels forced, with a host time for each (kernel launches recorded, not run)."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from mirrorla.ops.tuning import forced_tuning

    monkeypatch.setenv("MIRRORLA_BACKEND", "triton")
    launched = set()
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, grid, warmup, **k: launched.add(self.fn.__name__))
    gpu_profile = benchmark_script("gpu_profile")
    lines: list[str] = []
    with forced_tuning(row_max_tiles=0):  # the library's choice at 1024² with few rows: the chunked kernels
        rows = gpu_profile.long_row_costs(torch.device("cpu"), lines, batch=1, grid=4, calls=1)
    assert [r["piece"] for r in rows] == [
        name for attn in ("relu", "mirror") for name in (
            f"{attn} op fwd+bwd", f"{attn} op fwd+bwd, row kernels", f"layer {attn} training step",
            f"layer {attn} training step, row kernels")]
    assert all(r["host_us"] > 0 and r["device_us"] is None for r in rows)
    assert "DeiT-T's 64² layer shape (batch 1, H = 3, N = 17, d = 64)" in "\n".join(lines)
    assert {"_row_forward_kernel", "_row_backward_kernel", "_state_kernel", "_backward_q_kernel",
            "_backward_kv_kernel", "_token_sums_kernel"} <= launched


def test_gpu_profile_pass_bandwidth_divides_each_pass_bytes_by_its_time(benchmark_script):
    """The op profile's pass table: a pass's bytes are its own [B, H, N, d] tensors (the output pass reads q and
    writes o: two), divided by its device time; kernels that are not chunked passes are left out, and a step without
    any (softmax, the CPU) gets no table."""
    gpu_profile = benchmark_script("gpu_profile")
    import torch

    tensor = gpu_profile.op_tensor_bytes(65536, torch.device("cuda"))
    assert tensor == 8 * 3 * 65536 * 64 * 2  # bf16 on CUDA
    lines = gpu_profile.pass_bandwidth({"_output_kernel": 0.24, "_state_kernel": 0.103, "elementwise": 1.0}, tensor)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in lines[2:]}
    assert set(rows) == {"_output_kernel", "_state_kernel"}
    assert rows["_output_kernel"] == ["0.240", "403", "1678 |"]  # 2 × 201 MB in 0.24 ms
    assert rows["_state_kernel"][2] == "3909 |"
    assert gpu_profile.pass_bandwidth({"flash_fwd": 1.0}, tensor) == []


def _targets_report(folder, gpu: str, rows: dict) -> None:
    """A bench.json in ``folder`` with ``rows``: {(attn, mode, size): (round_ms, peak MB)}."""
    folder.mkdir(parents=True)
    records = []
    for (attn, mode, size), (rounds, peak) in rows.items():
        records.append({"kind": "op", "attn": attn, "mode": mode, "n": size, "dtype": "bf16", "status": "ok",
                        "peak_mem_mb": peak, "median_ms": sorted(rounds)[len(rounds) // 2], "round_ms": rounds})
    (folder / "bench.json").write_text(json.dumps({"machine": {"gpu": gpu}, "records": records}))


def test_targets_are_judged_by_their_intervals(tmp_path, benchmark_script, capsys):
    """benchmarks/targets.py on a made-up snapshot: a ratio whose whole interval is on the target's side is met, one
    on the other side missed, one whose interval holds the limit undecided; values without rounds decide as points;
    H100 times are not judged on another GPU; a missing report is 'not measured'. Table and plot are written."""
    targets = benchmark_script("targets")
    results = tmp_path / "snapshot"
    relu = [1.0] * 9
    op = {}
    for n, mirror in ((4096, [1.1] * 9), (16384, [1.3] * 9), (65536, [1.0, 1.0, 1.0, 1.1, 1.1, 1.2, 1.2, 1.3, 1.3])):
        op[("relu", "fwd", n)] = (relu, 10.0)
        op[("mirror", "fwd", n)] = (mirror, 650.0)
    op[("softmax", "fwd", 65536)] = ([50.0] * 9, 100.0)
    _targets_report(results / "op", "NVIDIA H200", op)
    _targets_report(results / "model_224", "NVIDIA H200", {("relu", "train", 224): ([10.0], 1.0),
                                                            ("mirror", "train", 224): ([11.5], 1.0)})
    assert targets.main([str(results)]) == 0
    table = (results / "targets.md").read_text()
    assert capsys.readouterr().out.startswith(table)
    verdict = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[2].rstrip(" |")
               for line in table.splitlines() if line.startswith("| ") and " | " in line}
    assert verdict["op forward, N = 4,096: MirrorLA time / ReLU time ≤ 1.15"] == "met"
    assert verdict["op forward, N = 16,384: MirrorLA time / ReLU time ≤ 1.15"] == "missed"
    assert verdict["op forward, N = 65,536: MirrorLA time / ReLU time ≤ 1.15"] == "undecided"
    assert verdict["op forward, N = 65,536: MirrorLA ≥ 36× faster than softmax"] == "met"  # 50 / 1.3 ≥ 36
    assert verdict["op forward, N = 65,536: peak memory ≤ 700 MB"] == "met (point)"
    assert verdict["DeiT-T eager 224² train: MirrorLA ≥ 0.9× ReLU's images/s"] == "missed (point)"  # 10/11.5
    assert verdict["op forward, N = 65,536: MirrorLA ≤ 1.55 ms (H100)"].startswith("not judged here")
    assert verdict["op forward+backward, N = 4,096: MirrorLA time / ReLU time ≤ 1.15"].startswith("not measured")
    assert verdict["DeiT-T compiled 1024² train: MirrorLA ≥ 1.0× softmax's images/s"] == (
        "not measured (no model_1024_compiled_train/bench.json)")
    assert "3 met, 2 missed, 1 undecided" in table
    assert (results / "targets.png").stat().st_size > 10_000
    # on an H100 its absolute times are judged, by the median round's interval
    h100 = tmp_path / "h100"
    _targets_report(h100 / "op", "NVIDIA H100 80GB HBM3", {("mirror", "fwd", 65536): ([1.4] * 9, 1.0)})
    targets.main([str(h100)])
    assert "| op forward, N = 65,536: MirrorLA ≤ 1.55 ms (H100) | 1.400 ms (1.400–1.400) | met |" in (
        h100 / "targets.md").read_text()
    assert targets.main([str(tmp_path / "absent")]) == 2
    assert "is not a folder" in capsys.readouterr().err
