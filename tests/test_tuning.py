"""Per-GPU kernel tuning: the lookup (MIRRORLA_TUNING, the bundled table, the defaults), forced values, the rules of
``mirrorla tune`` on given timings, its tuning file, and one tiny run of the command in Triton's interpreter."""

import json

import pytest
import torch

from mirrorla.ops import tuning
from mirrorla.ops.tuning import (
    DEFAULT_TUNING,
    KernelTuning,
    clear_tuning_cache,
    forced_tuning,
    kernel_tuning,
    read_tuning_file,
    tuning_for_gpu,
)
from mirrorla.tools import tune
from mirrorla.tools.cli import main

GPU = "NVIDIA Test GPU 80GB"


def _file(path, gpus):
    path.write_text(json.dumps({"format": 1, "gpus": gpus}))
    return path


@pytest.fixture
def fresh_cache():
    clear_tuning_cache()
    yield
    clear_tuning_cache()


def test_bundled_table_is_valid_and_only_defaults_apply_without_an_entry(monkeypatch):
    monkeypatch.delenv("MIRRORLA_TUNING", raising=False)
    read_tuning_file(tuning.BUNDLED_TUNING)  # ships with the package (package data) and parses
    assert tuning_for_gpu("a GPU nobody measured") == DEFAULT_TUNING
    assert kernel_tuning(torch.device("cpu")) == DEFAULT_TUNING
    assert (DEFAULT_TUNING.row_max_tiles, DEFAULT_TUNING.backward_blocks) == (8, (64, 4))
    assert DEFAULT_TUNING.moment_state_blocks == (64, 4)  # the forward's tiles


def test_the_users_file_names_a_gpu_and_wins(tmp_path, monkeypatch, fresh_cache):
    path = _file(tmp_path / "t.json", {GPU: {"row_max_tiles": 2, "backward_blocks": [32, 8],
                                             "ieee_backward_blocks": [32, 4], "moment_state_blocks": [32, 4],
                                             "measured": "today"}})
    monkeypatch.setenv("MIRRORLA_TUNING", str(path))
    got = tuning_for_gpu(GPU)
    assert (got.row_max_tiles, got.backward_blocks, got.ieee_backward_blocks, got.moment_state_blocks) == (
        2, (32, 8), (32, 4), (32, 4))
    assert "today" in got.source
    assert tuning_for_gpu("another GPU") == DEFAULT_TUNING
    # a CUDA device looks its name up once; clear_tuning_cache rereads the file
    names = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: names.append(index) or GPU)
    assert kernel_tuning(torch.device("cuda")).row_max_tiles == 2
    assert kernel_tuning(torch.device("cuda:0")).backward_blocks == (32, 8)
    assert names == [0]
    _file(path, {GPU: {"row_max_tiles": 5, "backward_blocks": [64, 8]}})
    assert kernel_tuning(torch.device("cuda:0")).row_max_tiles == 2  # cached
    clear_tuning_cache()
    assert kernel_tuning(torch.device("cuda:0")).row_max_tiles == 5
    # an entry written before a setting existed takes that setting's default
    assert kernel_tuning(torch.device("cuda:0")).moment_state_blocks == DEFAULT_TUNING.moment_state_blocks
    with forced_tuning(row_max_tiles=0):  # forced values win on every device
        assert kernel_tuning(torch.device("cuda:0")).row_max_tiles == 0
        assert kernel_tuning(torch.device("cuda:0")).backward_blocks == (64, 8)
        assert kernel_tuning(torch.device("cpu")).source == "forced"
    assert kernel_tuning(torch.device("cuda:0")).row_max_tiles == 5


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"gpus": {}}), '"format": 1'),
    (json.dumps({"format": 1, "gpus": {GPU: {"backward_blocks": [64, 4]}}}), f"entry '{GPU}': missing"),
    (json.dumps({"format": 1, "gpus": {GPU: {"row_max_tiles": -1, "backward_blocks": [64, 4]}}}),
     "row_max_tiles must be an int >= 0"),
    (json.dumps({"format": 1, "gpus": {GPU: {"row_max_tiles": 8, "backward_blocks": [128, 4]}}}),
     "backward_blocks must be"),
    (json.dumps({"format": 1, "gpus": {GPU: {"row_max_tiles": 8, "backward_blocks": [64, 4],
                                             "moment_state_blocks": [64, 3]}}}), "moment_state_blocks must be"),
])
def test_a_malformed_tuning_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    monkeypatch.setenv("MIRRORLA_TUNING", str(path))
    with pytest.raises(ValueError, match=message) as info:
        tuning_for_gpu(GPU)
    assert "bad.json" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv("MIRRORLA_TUNING", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="MIRRORLA_TUNING"):
        tuning_for_gpu(GPU)


def test_forced_values_are_checked_before_the_block_and_restored_after():
    with pytest.raises(ValueError, match="backward_blocks"):
        with forced_tuning(backward_blocks=(48, 4)):
            pass
    with forced_tuning(row_max_tiles=3):
        with forced_tuning(backward_blocks=(32, 4)):
            assert kernel_tuning(torch.device("cpu")).settings() == {"row_max_tiles": 3, "backward_blocks": [32, 4],
                                                                     "ieee_backward_blocks": [16, 8],
                                                                     "moment_state_blocks": [64, 4]}
        assert kernel_tuning(torch.device("cpu")).backward_blocks == (64, 4)
    assert kernel_tuning(torch.device("cpu")) == DEFAULT_TUNING
    with pytest.raises(TypeError):
        with forced_tuning(tile=3):
            pass


def _paths(ratios: dict[int, list[float]]):
    """Path timings with the given row/chunked ratios per N (four cases each)."""
    cases = [("relu", "fwd"), ("relu", "fwd+bwd"), ("mirror", "fwd"), ("mirror", "fwd+bwd")]
    return [dict(n=n, attn=a, mode=m, row_us=100.0 * r, chunked_us=100.0)
            for n, rs in ratios.items() for (a, m), r in zip(cases, rs, strict=True)]


def test_row_rule_takes_the_longest_rows_where_the_row_kernels_win_at_every_shorter_length():
    tiles, why = tune.choose_row_max_tiles(_paths({64: [0.5] * 4, 197: [0.6] * 4, 512: [0.9, 0.8, 1.0, 0.95],
                                                   1024: [0.9, 1.1, 0.9, 0.9], 2048: [0.5] * 4}))
    assert tiles == 8 and "lose at N = 1024 (relu fwd+bwd: 1.10×" in why and "512 tokens" in why
    assert tune.choose_row_max_tiles(_paths({64: [0.5] * 4, 197: [0.9] * 4}))[0] == 4  # 197 tokens: 4 tiles
    tiles, why = tune.choose_row_max_tiles(_paths({64: [1.2, 0.5, 0.5, 0.5], 197: [0.5] * 4}))
    assert tiles == 0 and "chunked kernels run every row" in why
    with pytest.raises(ValueError, match="no path timings"):
        tune.choose_row_max_tiles([])


def test_the_row_kernels_race_with_at_least_as_many_rows_as_the_gpu_has_sms(monkeypatch):
    """The library applies a measured row_max_tiles beyond 8 tiles only with B·H ≥ the GPU's SMs, so tune measures
    there: the batch rises to ⌈SMs / H⌉ on a GPU (a stand-in for a 132-SM one here), never falls."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    assert tune.path_batch(torch.device("cuda"), 8) == 44  # 44 · 3 heads = 132 rows
    assert tune.path_batch(torch.device("cuda"), 64) == 64
    assert tune.path_batch(torch.device("cpu"), 8) == 8


def _blocks(ratios: dict[str, list[float]]):
    """Backward timings for N = 4096 and 65536 × relu, mirror, with the given ratios to the default per option."""
    keys = [(4096, "relu"), (4096, "mirror"), (65536, "relu"), (65536, "mirror")]
    return [dict(n=n, attn=a, us={"64x4": 100.0, **{name: 100.0 * rs[i] for name, rs in ratios.items()}})
            for i, (n, a) in enumerate(keys)]


def test_block_rule_needs_matching_gradients_a_clear_gain_and_no_large_loss():
    ok = {"64x8": 0.0, "32x4": 1e-3, "32x8": 1e-3}
    rows = _blocks({"64x8": [1.0] * 4, "32x4": [0.9] * 4, "32x8": [0.8, 0.8, 0.8, 0.8]})
    assert tune.choose_backward_blocks(rows, ok, 2e-2)[0] == (32, 8)
    # the fastest option's gradients differ: the next best wins
    blocks, why = tune.choose_backward_blocks(rows, {**ok, "32x8": 0.5}, 2e-2)
    assert blocks == (32, 4) and "32x8 out" in why
    # a 3 % gain is not enough; a 20 % gain with one case 10 % slower is not either
    assert tune.choose_backward_blocks(_blocks({"64x8": [0.97] * 4, "32x4": [1.0] * 4, "32x8": [1.0] * 4}), ok,
                                       2e-2)[0] == (64, 4)
    blocks, why = tune.choose_backward_blocks(
        _blocks({"64x8": [0.7, 0.7, 0.7, 1.1], "32x4": [1.0] * 4, "32x8": [1.0] * 4}), ok, 2e-2)
    assert blocks == (64, 4) and "1.100× at worst" in why
    blocks, why = tune.choose_backward_blocks(rows, {k: 1.0 for k in ok}, 2e-2)
    assert blocks == (64, 4) and "no option's gradients matched" in why


def test_tuning_file_entries_are_merged_and_a_malformed_file_is_never_replaced(tmp_path):
    path = tmp_path / "sub" / "kt.json"
    tune.write_tuning_entry(path, "GPU A", {"row_max_tiles": 4, "backward_blocks": [32, 8]}, "run 1")
    tune.write_tuning_entry(path, "GPU B", {"row_max_tiles": 16, "backward_blocks": [64, 4]}, "run 2")
    tune.write_tuning_entry(path, "GPU A", {"row_max_tiles": 2, "backward_blocks": [64, 8]}, "run 3")
    entries = read_tuning_file(path)
    assert entries["GPU A"] == KernelTuning(2, (64, 8), source="kt.json: run 3")
    assert entries["GPU B"].row_max_tiles == 16
    path.write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        tune.write_tuning_entry(path, "GPU A", {"row_max_tiles": 2, "backward_blocks": [64, 8]}, "run 4")
    assert path.read_text() == "{broken"


def test_tune_command_measures_decides_and_reports_in_the_interpreter(tmp_path, capsys):
    """The whole command at a tiny size on CPU tensors (Triton's interpreter: the times mean nothing, the
    pipeline is what is checked): timings of every case, the entry in the tuning file, the report."""
    out, report = tmp_path / "kt.json", tmp_path / "report"
    _file(out, {"other GPU": {"row_max_tiles": 1, "backward_blocks": [64, 4]}})
    args = ["tune", "--device", "cpu", "--out", str(out), "--report", str(report), "--lengths", "17",
            "--block-lengths", "17", "--batch", "1", "--calls", "1", "--repeats", "1", "--warmup", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert all(f"{name} = " in printed for name in ("row_max_tiles", "backward_blocks", "ieee_backward_blocks",
                                                    "moment_state_blocks"))
    entries = read_tuning_file(out)
    assert set(entries) == {"other GPU", "cpu (Triton interpreter)"}
    result = json.loads((report / "tune.json").read_text())
    assert {(r["attn"], r["mode"]) for r in result["paths"]} == {(a, m) for a in ("relu", "mirror")
                                                                for m in ("fwd", "fwd+bwd")}
    assert all(r["row_us"] > 0 and r["chunked_us"] > 0 for r in result["paths"])
    assert result["row_batch"] == 1 and "(row kernels: B=1)" in result["measured"]  # the interpreter: --batch
    assert set(result["blocks"]["backward_blocks"]["rows"][0]["us"]) == {"64x4", "64x8", "32x4", "32x8"}
    assert set(result["blocks"]["ieee_backward_blocks"]["rows"][0]["us"]) == {"16x8", "16x4", "32x8", "64x4"}
    moment_rows = result["blocks"]["moment_state_blocks"]["rows"]  # the training forward of both rotations
    assert {r["attn"] for r in moment_rows} == {"mirror", "rotate_relu"}
    assert set(moment_rows[0]["us"]) == {"64x4", "32x4", "32x8", "16x4"}
    for measured in result["blocks"].values():  # every option gives the default's gradients
        assert max(measured["errors"].values()) < 1e-5
    assert entries["cpu (Triton interpreter)"].settings() == result["tuning"]
    assert (report / "tune.png").stat().st_size > 0 and "# Kernel tuning" in (report / "tune.md").read_text()
    # a finished report is not replaced by accident
    assert main(args) == 2
    assert "already holds a tuning report" in capsys.readouterr().err


def test_tune_command_refuses_what_it_cannot_measure(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "kt.json")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["tune", "--out", out]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET")
    assert main(["tune", "--device", "cpu", "--out", out]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["tune", "--device", "cpu", "--out", out, "--lengths", "0"]) == 2
    assert "--lengths must be" in capsys.readouterr().err
    from mirrorla import backend

    with monkeypatch.context() as patch:  # an interpreter that cannot run the kernels with this NumPy
        patch.setattr(backend, "_INTERPRETER_PROBLEM", backend._interpreter_problem("3.6.0", "2.4.6"))
        assert main(["tune", "--device", "cpu", "--out", out]) == 2
        assert "install numpy<2.4 or triton>=3.7" in capsys.readouterr().err
    (tmp_path / "kt.json").write_text("[]")
    assert main(["tune", "--device", "cpu", "--out", out]) == 2
    assert '"format": 1' in capsys.readouterr().err


def test_bench_records_the_launch_settings_that_ran(tmp_path, monkeypatch):
    from mirrorla.tools.bench import machine_info, write_report

    monkeypatch.setenv("MIRRORLA_BACKEND", "triton")
    with forced_tuning(row_max_tiles=3):
        machine = machine_info("cpu")
    assert machine["kernel_tuning"] == {"row_max_tiles": 3, "backward_blocks": [64, 4],
                                        "ieee_backward_blocks": [16, 8], "moment_state_blocks": [64, 4],
                                        "source": "forced"}
    records = [dict(kind="op", attn="relu", n=64, mode="fwd", dtype="fp32", status="ok", median_ms=1.0, iqr_ms=0.1,
                    peak_mem_mb=1.0)]
    write_report(records, tmp_path, machine)
    assert ("row kernels up to 3 tiles, chunked backward (64, 4), IEEE fp32 (16, 8), rotation's training state "
            "pass (64, 4) (forced)" in (tmp_path / "bench.md").read_text())
    monkeypatch.setenv("MIRRORLA_BACKEND", "torch")
    assert machine_info("cpu")["kernel_tuning"] is None


def test_the_moment_state_setting_drives_only_the_chunked_training_state_pass(monkeypatch):
    """``moment_state_blocks`` is the (token tile, warps) of the chunked state pass of a rotation's training forward
    (tensor-core dots: fp32 inputs with TF32 allowed here), and of nothing else: the inference forward and ReLU's
    state pass keep the forward's tiles, IEEE fp32 dots keep theirs. Values and gradients do not change (the
    same sums in another order)."""
    tla = pytest.importorskip("mirrorla.ops.triton_linear_attention")
    real, launches = tla._state_kernel, []

    class RecordingStateKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((kwargs["MOMENT"], kwargs["MAP"], kwargs["BN"], kwargs["num_warps"]))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tla, "_state_kernel", RecordingStateKernel())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 150, 16, generator=g).requires_grad_() for _ in range(3))  # 3 tiles of 64 tokens
    theta = torch.rand(2, 8, generator=g).requires_grad_()
    gamma = (0.5 * torch.randn(2, 8, generator=g)).requires_grad_()
    angle = torch.randn(2, 2, 8, generator=g).requires_grad_()
    results = {}
    with tune.matmul_precision("high"):
        for blocks in ((64, 4), (32, 4), (16, 4)):
            launches.clear()
            with forced_tuning(row_max_tiles=0, moment_state_blocks=blocks):
                out = tla.mirror_linear_attention(q, k, v, theta, gamma)
                rotated = tla.fused_linear_attention(q, k, v, angle, feature="rotate_relu")
                results[blocks] = (out, rotated, *torch.autograd.grad(
                    out.square().sum() + rotated.square().sum(), [q, k, v, theta, gamma, angle]))
                with torch.no_grad():
                    tla.mirror_linear_attention(q, k, v, theta, gamma)  # inference: no moment
                tla.fused_linear_attention(q, k, v, feature="relu")
            assert launches == [(True, 2, *blocks), (True, 2, *blocks), (False, 2, 64, 4), (False, 1, 64, 4)]
    launches.clear()
    with forced_tuning(row_max_tiles=0, moment_state_blocks=(32, 4)):  # IEEE fp32 dots: their own setting
        tla.mirror_linear_attention(q, k, v, theta, gamma)
    assert launches == [(True, 2, *DEFAULT_TUNING.ieee_backward_blocks)]
    for blocks in ((32, 4), (16, 4)):
        for got, want in zip(results[blocks], results[(64, 4)], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
