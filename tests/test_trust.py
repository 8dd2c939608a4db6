"""A user's runs and inputs: no lost work, one-line errors for bad values, models that pickle and export.

Each test names the failure it covers (the numbered list of the "trust it with your runs" issue)."""

import copy
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import mirrorla
from mirrorla import LinearAttention
from mirrorla.feature_maps import create_feature_map
from mirrorla.tools.cli import main
from mirrorla.tools.train import TrainConfig, train

TINY = dict(model="mirrorla_pvt_nano", data="digits", batch_size=64, lr=2e-3, warmup_epochs=0.2, progress=False,
            train_subset=128)


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2 with exactly one stderr line and no traceback; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# 1. data loss ------------------------------------------------------------------------------------------------


def test_train_refuses_an_out_that_holds_a_run_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, epochs=1, out=str(out)))
    before = (out / "last.safetensors").read_bytes()
    err = _cli_error(capsys, ["train", "--model", "mirrorla_vit_nano_patch4", "--data", "digits", "--out", str(out),
                              "--no-progress"])
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "last.safetensors").read_bytes() == before  # untouched
    train(TrainConfig(**{**TINY, "seed": 1}, epochs=1, out=str(out)), overwrite=True)
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert len((out / "log.csv").read_text().splitlines()) == 2  # header + the new run's one epoch


def test_runs_without_out_get_fresh_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = train(TrainConfig(**TINY, epochs=1))
    b = train(TrainConfig(**TINY, epochs=1))
    dirs = sorted(p for p in (tmp_path / "runs" / "train").iterdir())
    assert len(dirs) == 2 and a["finished"] and b["finished"]


def test_log_never_holds_a_duplicate_epoch_after_a_crash_between_log_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, epochs=2, out=str(out)), stop_after=1)
    # a crash after the log write of epoch 2 but before its checkpoint leaves a stray row
    rows = (out / "log.csv").read_text().splitlines()
    (out / "log.csv").write_text("\n".join([*rows, rows[-1].replace("1,", "2,", 1)]) + "\n")
    train(TrainConfig(), resume=out)
    epochs = [line.split(",")[0] for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]


# 2. compare --------------------------------------------------------------------------------------------------


def test_compare_validates_every_name_first_and_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", "--model", "mirrorla_pvt_nano", "--data", "digits", "--epochs", "1", "--batch-size", "64",
            "--train-subset", "128", "--seeds", "0", "--no-progress", "--out", str(out)]
    err = _cli_error(capsys, [*base, "--attn", "relu,bogus"])
    assert "bogus" in err and not out.exists()  # nothing trained, nothing written
    assert main([*base, "--attn", "relu"]) == 0
    log = out / "runs" / "relu_default_s0" / "log.csv"
    weights = (out / "runs" / "relu_default_s0" / "last.safetensors").read_bytes()
    assert main([*base, "--attn", "relu"]) == 0
    assert "finished: reused" in capsys.readouterr().out
    assert len(log.read_text().splitlines()) == 2
    assert (out / "runs" / "relu_default_s0" / "last.safetensors").read_bytes() == weights
    assert len(json.loads((out / "results.json").read_text())) == 1
    err = _cli_error(capsys, [*base, "--attn", "relu", "--lr", "0.01"])  # another recipe into the same runs
    assert "other options" in err and "lr" in err


# 3. resume extends -------------------------------------------------------------------------------------------


def test_resume_with_more_epochs_extends_and_conflicting_flags_are_errors(tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, epochs=1, out=str(out)))
    err = _cli_error(capsys, ["train", "--resume", str(out)])
    assert "finished" in err and "--epochs" in err
    err = _cli_error(capsys, ["train", "--resume", str(out), "--epochs", "2", "--lr", "0.5", "--attn", "relu"])
    assert "--lr 0.5" in err and "--attn 'relu'" in err
    assert main(["train", "--resume", str(out / "best.json"), "--epochs", "2", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["finished"]
    assert len((out / "log.csv").read_text().splitlines()) == 3


# 4. values silently misread ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ('{"variance": "no"}', "'variance' of feature map 'mirror' must be bool"),
    ('{"varience": false}', "unknown option 'varience'"),
    ('{"pairing": 3}', "must be str"),
])
def test_attn_kwargs_types_and_keys_are_checked(capsys, tmp_path, kwargs, needle):
    err = _cli_error(capsys, ["train", "--data", "digits", "--attn-kwargs", kwargs, "--out", str(tmp_path / "r")])
    assert needle in err
    assert not (tmp_path / "r").exists()


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ValueError, match="known options: .*cross_head.*variance"):
        create_feature_map("mirror", 2, 8, varience=False)


@pytest.mark.parametrize("flag, value, needle", [
    ("--train-subset", "0", "train_subset must be a positive int"),
    ("--train-subset", "-10", "train_subset must be a positive int"),
    ("--train-subset", "99999", "train_subset must be at most"),
    ("--lr", "-1", "lr must be a number in (0.0"),
    ("--label-smoothing", "1.5", "label_smoothing"),
    ("--epochs", "0", "epochs must be an int >= 1"),
    ("--img-size", "30", "--img-size 30 does not fit model mirrorla_vit_nano_patch4"),
])
def test_out_of_range_values_are_errors_before_any_work(capsys, tmp_path, flag, value, needle):
    out = tmp_path / "r"
    err = _cli_error(capsys, ["train", "--model", "mirrorla_vit_nano_patch4", "--data", "digits", flag, value,
                              "--out", str(out), "--no-progress"])
    assert needle in err
    assert not out.exists()  # a failed validation leaves no empty run directory


@pytest.mark.parametrize("args, needle", [
    (["--n", "0"], "--n takes comma-separated positive ints"),
    (["--attn", "bogus"], "--attn: unknown value 'bogus'"),
    (["--mode", "sideways"], "--mode: unknown value 'sideways'"),
    (["--dtype", "fp8"], "--dtype: unknown value 'fp8'"),
    (["--compile", "--compile-mode", "fast"], "--compile-mode: unknown value 'fast'"),
    (["--compile", "--compile-scope", "layers"], "--compile-scope: unknown value 'layers'"),
    (["--rounds", "0"], "--rounds must be a positive int"),
])
def test_bench_arguments_are_checked(capsys, tmp_path, args, needle):
    err = _cli_error(capsys, ["bench", "op", *args, "--out", str(tmp_path / "b"), "--no-progress"])
    assert needle in err


# 5. model state ----------------------------------------------------------------------------------------------


def test_mirrorize_converts_an_already_converted_model():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2).eval()
    mirrorla.mirrorize(vit, "mirror")
    qkv = vit.blocks[0].attn.qkv.weight.clone()
    mirrorla.mirrorize(vit, "softmax")
    assert all(blk.attn.attn_name == "softmax" for blk in vit.blocks)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, qkv)
    mirrorla.mirrorize(vit, "relu")
    assert all(blk.attn.attn_name == "relu" for blk in vit.blocks)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mirrorize_converts_this_packages_softmax_deit():
    model = timm.create_model("mirrorla_vit_nano_patch4", attn="softmax", num_classes=10).eval()
    mirrorla.mirrorize(model, "mirror")
    assert mirrorla.models.attention_counts(model)["linear"] == mirrorla.models.attention_counts(model)["total"] > 0


def test_state_dict_of_another_pairing_is_refused():
    a = LinearAttention(32, 4, attn_kwargs={"pairing": "half"})
    b = LinearAttention(32, 4, attn_kwargs={"pairing": "adjacent"})
    with pytest.raises(ValueError, match="pairing='half' in the state dict but 'adjacent' here"):
        b.load_state_dict(a.state_dict())
    legacy = {k: v for k, v in a.state_dict().items() if not k.endswith("map_config")}
    LinearAttention(32, 4, attn_kwargs={"pairing": "half"}).load_state_dict(legacy)  # older state dicts still load


FAMILIES = [("mirrorla_vit_nano_patch4", 32), ("mirrorla_pvt_nano", 32), ("mirrorla_pvt_v2_b0", 64),
            ("mirrorla_swin_tiny_all_linear", 64), ("mirrorla_pvt_tiny", 64)]  # one model per model file


@pytest.mark.parametrize("name, img", FAMILIES)
def test_every_model_family_pickles_saves_and_deepcopies(name, img):
    model = timm.create_model(name, num_classes=10, img_size=img)
    model2 = pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    model3 = torch.load(buf, weights_only=False)
    model4 = copy.deepcopy(model)
    x = torch.randn(1, 3, img, img)
    model.eval(), model2.eval(), model3.eval(), model4.eval()
    with torch.no_grad():
        ref = model(x)
        for other in (model2, model3, model4):
            torch.testing.assert_close(other(x), ref)


def test_configured_attention_layer_pickles():
    layer = LinearAttention.configure(attn="relu")(16, 2)
    assert type(pickle.loads(pickle.dumps(layer))) is LinearAttention


# 6. one line, not a traceback --------------------------------------------------------------------------------


def test_info_unknown_model(capsys):
    assert "unknown model 'unknown_model'" in _cli_error(capsys, ["info", "unknown_model"])


def test_out_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _cli_error(capsys, ["train", "--data", "digits", "--out", str(f)])


def test_checkpoint_naming_another_model_and_resume_of_a_file(capsys, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, epochs=1, out=str(out)))
    meta = json.loads((out / "best.json").read_text())
    meta["config"]["attn"] = "softmax"
    (out / "best.json").write_text(json.dumps(meta))
    err = _cli_error(capsys, ["eval", "--checkpoint", str(out)])
    assert "does not fit model mirrorla_pvt_nano with attention 'softmax'" in err
    err = _cli_error(capsys, ["train", "--resume", str(tmp_path / "nowhere" / "best.json")])
    assert "no run there" in err


def test_corrupt_image_in_a_folder_is_skipped_with_a_warning(tmp_path):
    from PIL import Image

    from mirrorla.tools.data import load_data

    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), color=(i * 90, 20, 200)).save(d / f"{i}.png")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file.*broken.png"):
        bundle = load_data(f"folder:{tmp_path}", img_size=32)
    assert len(bundle.train) == 4
    for i in range(len(bundle.train)):
        bundle.train[i]  # no crash mid-epoch


def test_mirror_map_with_no_tokens_is_a_value_error():
    fmap = create_feature_map("mirror", 2, 8)
    q = torch.randn(1, 2, 0, 8)
    with pytest.raises(ValueError, match="at least one token"):
        fmap(q, q)
    with pytest.raises(ValueError, match="at least one token"):
        fmap(q, q, folded=True)


def test_grid_size_that_does_not_fit_n_is_an_error():
    layer = LinearAttention(16, 2, attn="relu")
    x = torch.randn(1, 20, 16)
    with pytest.raises(ValueError, match=r"grid_size \(4, 4\) does not fit N = 20"):
        layer(x, grid_size=(4, 4))
    assert layer(torch.randn(1, 17, 16), grid_size=(4, 4)).shape == (1, 17, 16)  # one class token


# 7. export ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, img", FAMILIES)
def test_torch_export_of_every_family(name, img):
    model = timm.create_model(name, num_classes=10, img_size=img).eval()
    x = torch.randn(2, 3, img, img)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mirrorla_vit_nano_patch4", "mirrorla_pvt_nano"])
def test_onnx_export_matches_pytorch_in_onnxruntime(tmp_path, name):
    ort = pytest.importorskip("onnxruntime")
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "model.onnx"
    mirrorla.export_onnx(model, x, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert abs(out - ref).max() <= 1e-4


# 8. image size of folder data ------------------------------------------------------------------------------


def test_folder_data_defaults_to_the_models_input_size_and_warns_on_upscaling(tmp_path):
    from PIL import Image

    from mirrorla.tools.train import _default_img_size

    assert _default_img_size("mirrorla_vit_nano_patch4", "folder:x") == 32
    assert _default_img_size("mirrorla_deit_tiny_patch16_224", "folder:x") == 224
    assert _default_img_size("mirrorla_vit_nano_patch4", "digits") is None
    for split in ("train", "val"):
        d = tmp_path / split / "a"
        d.mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(d / "0.png")
    from mirrorla.tools.data import load_data

    with pytest.warns(UserWarning, match="upscaled 7.0x per side"):
        load_data(f"folder:{tmp_path}", img_size=224)


def test_cli_never_prints_a_traceback_for_a_bad_value():
    proc = subprocess.run([sys.executable, "-m", "mirrorla", "train", "--data", "nowhere"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown data source" in proc.stderr


def test_run_directory_is_taken_atomically_at_the_first_write(tmp_path, monkeypatch):
    """Between the checks and the first write another process may start a run: an automatic name moves on to the
    next free one, an explicit --out that now holds a run is refused."""
    from mirrorla.tools import train as train_module

    taken = tmp_path / "20260101-000000"
    taken.mkdir()
    names = iter([taken, tmp_path / "20260101-000000-2"])
    monkeypatch.setattr(train_module, "fresh_run_dir", lambda root="runs/train": next(names))
    config = train_module._take_run_dir(TrainConfig(**TINY), new_run=True, overwrite=False)
    assert config.out == str(tmp_path / "20260101-000000-2") and Path(config.out).is_dir()

    out = tmp_path / "explicit"
    config = TrainConfig(**TINY, out=str(out))
    train_module.check_out_dir(out, overwrite=False)  # passes: nothing there yet
    out.mkdir()
    (out / "last.json").write_text("{}")  # another run got there first
    with pytest.raises(ValueError, match="already holds a run"):
        train_module._take_run_dir(config, new_run=True, overwrite=False)
