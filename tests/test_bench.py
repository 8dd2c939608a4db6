"""The benchmark tool: records, ratios, plots and failure statuses (never wall-clock claims)."""

import json

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
    md = (tmp_path / "bench.md").read_text()
    assert "× softmax" in md and "| 256 | mirror |" in md
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
    monkeypatch.setattr(bench, "_new_step", new_step)
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    base = dict(kind="op", n=64, mode="fwd", dtype="fp32", device="cpu", batch=1, heads=2, head_dim=16,
                compile=True, compile_mode="default", min_run_time=0.01, median_ms=None, iqr_ms=None, peak_mem_mb=None)
    records = [dict(base, attn="relu"), dict(base, attn="mirror")]
    out = bench._run_cases_in_process(records, timeout=60, progress=False)
    assert [r["status"] for r in out] == ["ok", "error"]
    assert "compilation failed" in out[1]["error"] and out[0]["median_ms"] > 0
    assert resets == [1]
