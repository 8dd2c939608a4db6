"""The benchmark tool: records, ratios, plots and failure statuses (never wall-clock claims)."""

import json

from mirrorla.tools.cli import main

REQUIRED = {"kind", "attn", "mode", "dtype", "device", "median_ms", "iqr_ms", "peak_mem_mb", "status"}


def test_bench_op_writes_records_tables_and_plot(tmp_path, capsys):
    # each case starts a Python process: keep the grid small
    rc = main(["bench", "op", "--n", "256", "--attn", "softmax,relu,mirror", "--mode", "fwd,train",
               "--min-run-time", "0.05", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {"cpu", "threads", "torch", "device"} <= set(report["machine"])
    records = report["records"]
    assert len(records) == 3 * 2
    for r in records:
        assert REQUIRED <= set(r) and "n" in r
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["peak_mem_mb"] is not None
    md = (tmp_path / "bench.md").read_text()
    assert "× softmax" in md and "| 256 | mirror |" in md
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "bench.md" in capsys.readouterr().out


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
