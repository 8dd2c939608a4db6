"""``mirrorla compare --variants``: a study file, paired statistics and the decision rule."""

import json
import math
from pathlib import Path

import pytest

from mirrorla.tools.cli import main
from mirrorla.tools.study import decisions, load_study, paired_interval, summarise


def test_paired_interval_matches_the_t_distribution():
    mean, low, high = paired_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3: half-width t(0.975, 2) · 1/√3 = 4.3027 / 1.7321
    assert mean == 2.0 and math.isclose(high - mean, 4.302652729911275 / math.sqrt(3), rel_tol=1e-9)
    assert math.isclose(mean - low, high - mean)
    assert paired_interval([0.5])[1] == -math.inf


def _study(**kw):
    base = {"reference": "a", "seeds": [0, 1], "variants": [{"name": "a", "attn": "relu"},
                                                          {"name": "b", "attn": "mirror"}]}
    return {**base, **kw}


def test_decision_rule_needs_two_settings_above_and_none_below():
    study = {**_study(), "settings": [{"name": n} for n in ("s1", "s2", "s3")]}
    results = []
    for setting, shift in (("s1", 1.0), ("s2", 1.0), ("s3", 0.0)):
        for seed, noise in ((0, 0.1), (1, -0.1), (2, 0.05)):
            results.append({"setting": setting, "variant": "a", "seed": seed, "top1": 50.0 + noise})
            results.append({"setting": setting, "variant": "b", "seed": seed, "top1": 50.0 + noise + shift
                            + (0.3 * noise if setting == "s3" else 0.01 * seed)})
    verdict = decisions(study, summarise(study, results))["b"]
    assert verdict == {"above": 2, "below": 0, "settings": 3, "passes": True, "worse": False}
    results = [dict(r, top1=r["top1"] - 2.0 * (r["variant"] == "b" and r["setting"] == "s3")) for r in results]
    assert decisions(study, summarise(study, results))["b"]["passes"] is False  # one setting below 0
    # the mirror image: below 0 in two settings, above in none, reads as worse than the reference
    flipped = [dict(r, top1=100.0 - r["top1"]) for r in results if r["setting"] != "s3"]
    flipped += [r for r in results if r["setting"] == "s3" and r["variant"] == "a"]
    flipped += [dict(r, top1=r["top1"] * 0 + 50.0 + r["seed"] * 0.1) for r in results
                if r["setting"] == "s3" and r["variant"] == "b"]
    verdict = decisions(study, summarise(study, flipped))["b"]
    assert (verdict["below"], verdict["above"], verdict["worse"], verdict["passes"]) == (2, 0, True, False)


@pytest.mark.parametrize("change, needle", [
    ({"reference": "zz"}, "'reference' must name a variant"),
    ({"seeds": [0]}, "at least two int seeds"),
    ({"variants": [{"name": "a"}]}, "at least two variants"),
    ({"colour": 1}, "unknown key"),
])
def test_study_files_are_checked(tmp_path, change, needle):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**_study(), **change}))
    with pytest.raises(ValueError, match=needle):
        load_study(path)


def test_two_variant_two_seed_study_on_digits(tmp_path, capsys):
    """The smallest real study: digits, PVT-nano, one epoch, two variants × two seeds (about 30 s here)."""
    study = {"protocol": "smoke test", "decision_rule": "none", "reference": "relu", "seeds": [0, 1],
             "recipe": {"model": "mirrorla_pvt_nano", "data": "digits", "epochs": 1, "batch_size": 64,
                        "train_subset": 256, "warmup_epochs": 0.2},
             "variants": [{"name": "relu", "attn": "relu"},
                          {"name": "mirror-half", "attn": "mirror", "attn_kwargs": {"pairing": "half"}}]}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study))
    out = tmp_path / "out"
    assert main(["compare", "--variants", str(path), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {(r["variant"], r["seed"]) for r in results} == {("relu", 0), ("relu", 1), ("mirror-half", 0),
                                                            ("mirror-half", 1)}
    report = (out / "results.md").read_text()
    assert "smoke test" in report and "| mirror-half | 2 |" in report and "95% interval" in report
    assert (out / "results.png").stat().st_size > 0
    assert json.loads((out / "study.json").read_text()) == {**study, "settings": [{"name": "default"}]}
    capsys.readouterr()
    assert main(["compare", "--variants", str(path), "--out", str(out), "--no-progress", "--analyze"]) == 0
    assert capsys.readouterr().out.count("finished: reused") == 4
    analysed = json.loads((out / "results.json").read_text())
    assert all(0 < r["retention_k"] <= 1 and r["rank_k"] > 0 for r in analysed)
    # reused runs keep the statistics computed before: marked here, the mark survives a rerun
    analysed[0]["retention_k"] = 0.123
    (out / "results.json").write_text(json.dumps(analysed))
    assert main(["compare", "--variants", str(path), "--out", str(out), "--no-progress", "--analyze"]) == 0
    assert json.loads((out / "results.json").read_text())[0]["retention_k"] == 0.123


def test_jobs_train_in_worker_processes_seed_by_seed(tmp_path, capsys):
    """--jobs 2: two runs at a time in spawned processes, each one's output in ``<run dir>.log``; the runs go seed
    by seed and the results keep the study's order."""
    study = {"reference": "relu", "seeds": [0, 1],
             "recipe": {"model": "mirrorla_pvt_nano", "data": "digits", "epochs": 1, "batch_size": 64,
                        "train_subset": 128, "warmup_epochs": 0.0},
             "variants": [{"name": "relu", "attn": "relu"}, {"name": "mirror", "attn": "mirror"}]}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study))
    out = tmp_path / "out"
    assert main(["compare", "--variants", str(path), "--out", str(out), "--no-progress", "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "2 at a time" in printed and printed.count(" trained] ") == 4
    results = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in results] == [("relu", 0), ("mirror", 0), ("relu", 1), ("mirror", 1)]
    for r in results:
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert metrics["finished"] and r["top1"] == metrics["best_top1"] and r["best_epoch"] == 1.0
        assert "epoch 1/1" in Path(r["run_dir"] + ".log").read_text()


def test_jobs_must_be_positive(tmp_path, capsys):
    assert main(["compare", "--attn", "relu", "--data", "digits", "--out", str(tmp_path / "o"), "--jobs", "0"]) == 2
    assert "--jobs must be a positive int, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_curve_columns_read_the_log(tmp_path):
    from mirrorla.tools.study import _curve_columns

    (tmp_path / "log.csv").write_text("epoch,val_top1\n" + "".join(f"{e},{v}\n" for e, v in
                                                                  enumerate([10, 30, 50, 40, 60, 61, 62], 1)))
    assert _curve_columns(tmp_path) == {"best_epoch": 7.0, "last_gain": 62.0 - 30.0}
    assert _curve_columns(tmp_path / "missing") == {}


@pytest.mark.parametrize("name", ["mirror_study.json", "mirror_choices.json"])
def test_the_shipped_study_files_are_valid(name):
    """The shipped study files load and every one of their runs is a valid TrainConfig."""
    from mirrorla.tools.config import TrainConfig
    from mirrorla.tools.study import _configs

    study = load_study(Path(__file__).resolve().parents[1] / "benchmarks" / "study" / name)
    planned = _configs(study, TrainConfig(progress=False), Path("unused"), study["seeds"])
    assert len(planned) == len(study["settings"]) * len(study["variants"]) * len(study["seeds"])
    assert study["reference"] == "mirror" and len(study["seeds"]) >= 5 and study["recipe"]["epochs"] >= 20
