"""Tree lab: its configs and (slow) every exercise end to end on its CI-sized config."""
import json
import os

import numpy as np
import pytest

from experiments import cli
from experiments.trees import config as pathfinding_config
from experiments.trees import lab as PF
from experiments.trees import roles as R
from experiments.trees.train import ATTENTION_FILE, train_run

CONFIG = "experiments/trees/config.py"


# ----------------------------------------------------------------- configs
@pytest.mark.parametrize("arg", ["ex1", "ex2", "ex3", "compression", "compression_full",
                                 "depth4", "init", "representation", "ex1_ci",
                                 "compression_ci", "compression_full_ci", "depth4_ci",
                                 "representation_ci"])
def test_every_exercise_config_parses_into_valid_runs(arg):
    config = cli.parse([f"--config={CONFIG}:{arg}"])
    runs = PF.run_configs(config)
    assert len(runs) == len(config.runs) and len({r.name for r in runs}) == len(runs)
    for run in runs:
        assert run.train.optim.total_steps == run.train.steps


def test_warm_up_draws_the_first_level_only_then_every_row():
    from experiments.trees.train import batch_indices   # noqa: PLC0415

    warm = [batch_indices(0, s, rows=300, blocks=3, batch_size=64, first_level_steps=5)
            for s in range(10)]
    assert all(idx.max() < 100 for idx in warm[:5])        # level-1 block: rows 0-99
    assert max(idx.max() for idx in warm[5:]) >= 100        # then all three blocks
    # without a warm-up the draws are those of the plain sampler, step by step
    for s in range(10):
        np.testing.assert_array_equal(
            batch_indices(0, s, rows=300, blocks=3, batch_size=64),
            np.random.default_rng((0, s)).integers(0, 300, 64))
    np.testing.assert_array_equal(warm[7], batch_indices(0, 7, rows=300, blocks=3,
                                                         batch_size=64))


def test_compression_configs_default_small_full_with_four_layers():
    runs = {a: {r.name: r for r in PF.run_configs(cli.parse([f"--config={CONFIG}:{a}"]))}
            for a in ("compression", "compression_full", "depth4")}
    small, full = runs["compression"], runs["compression_full"]
    assert sorted(small) == sorted(full) == ["l1", "l2", "l4"]
    assert all(r.task.levels == (1, 2) and r.train.steps == 1000 for r in small.values())
    # only the default's 4-layer run warms up on the full chain (docs/trees.md)
    assert {n: r.train.first_level_steps for n, r in small.items()} == {"l1": 0, "l2": 0,
                                                                        "l4": 300}
    assert all(r.train.first_level_steps == 0 for r in full.values())
    assert all(r.task.levels == (1, 2, 3, 4) and r.train.steps == 2000 for r in full.values())
    assert [full[n].model.layers for n in ("l1", "l2", "l4")] == [1, 2, 4]
    assert full["l1"].train.optim.learning_rate == 1e-2
    # the 4-layer run of the full sweep uses the ':depth4' setting the config names
    chosen = runs["depth4"][pathfinding_config.L4_SETTING]
    for key in ("learning_rate", "warmup"):
        assert full["l4"].train.optim[key] == chosen.train.optim[key]
    assert full["l4"].model.init_std == chosen.model.init_std
    assert all(r.train.steps == 400 and r.model.layers == 4 for r in runs["depth4"].values())


def test_config_errors_name_the_key():
    with pytest.raises(cli.ConfigError, match="model.layout"):
        cli.parse([f"--config={CONFIG}:ex1", "--config.model.layout=ladder"])
    with pytest.raises(cli.ConfigError, match="data.num_labels"):
        cli.parse([f"--config={CONFIG}:ex1", "--config.data.num_labels=20"])
    config = cli.parse([f"--config={CONFIG}:ex1", "--config.runs=name=x model.hedas=2"])
    with pytest.raises(cli.ConfigError, match="model.hedas"):
        PF.run_configs(config)
    with pytest.raises(ValueError, match="config arg"):
        cli.parse([f"--config={CONFIG}:ex9"])
    with pytest.raises(cli.ConfigError, match="train.first_level_steps"):
        cli.parse([f"--config={CONFIG}:compression", "--config.train.first_level_steps=1001"])


# ----------------------------------------------------------------- end to end
def _check_results(res, run):
    levels = [f"@k{k}" for k in run.task.levels] or [""]
    for split in ["train"] + [name + lv for name in run.data.test_sets for lv in levels]:
        for key in ("exact", "chain_ok", "answer_ok"):
            assert 0.0 <= res["final"][split][key] <= 1.0
        assert res["final"][split]["exact"] <= res["final"][split]["chain_ok"]
        kinds = res["final"][split]["by_kind"]
        assert set(kinds) == set(R.STEP_KINDS)
        assert all(v is None or 0.0 <= v <= 1.0 for v in kinds.values())
    for layer_masses, si in zip(res["masses"], res["si"]):
        m = np.array([[np.nan if v is None else v for v in row] for row in
                      np.array(layer_masses, dtype=object).reshape(-1, len(R.ROLES))])
        present = ~np.isnan(m[:, 0])
        np.testing.assert_allclose(m[present].sum(-1), 1.0, atol=1e-4)
        assert 0.0 <= si <= 1.0 and (si == 0.0) == (run.model.heads == 1)
    evals = [r["step"] for r in res["history"] if "train/exact" in r]
    assert evals == list(range(run.train.eval_every, run.train.steps + 1, run.train.eval_every))
    losses = [r["loss"] for r in res["history"] if "loss" in r]
    assert losses[-1] < losses[0]                         # it trains
    if run.task.levels:
        assert [res["kept_ratio"][f"k{k}"] < 1.0 for k in run.task.levels] == [
            k > 1 for k in run.task.levels]
    else:
        assert (res["kept_ratio"] < 1.0) == (run.task.keep_every > 1)
    assert np.array(res["ablation"]).shape == (run.model.layers, run.model.heads)
    assert all(0.0 <= s["exact"] <= 1.0 for layer in res["ablation"] for h in layer
               for s in h.values())


@pytest.mark.slow
@pytest.mark.parametrize("exercise", ["ex1", "ex2", "ex3", "compression"])
def test_exercise_runs_end_to_end_on_its_ci_config(exercise, tmp_path):
    config = cli.parse([f"--config={CONFIG}:{exercise}_ci", f"--config.run_dir={tmp_path}"])
    summary = PF.main(config)
    runs = PF.run_configs(config)
    assert [row[0] for row in summary["rows"]] == [r.name for r in runs
                                                    for _ in (r.task.levels or [None])]
    for run in runs:
        with open(os.path.join(tmp_path, run.name, "results.json")) as f:
            _check_results(json.load(f), run)
        with np.load(os.path.join(tmp_path, run.name, ATTENTION_FILE), allow_pickle=False) as f:
            probs = f["probs"]
        assert probs.shape[:3] == (run.model.layers, run.train.plot_examples, run.model.heads)
    assert summary["figures"] and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
                                      for p in summary["figures"])
    with open(os.path.join(tmp_path, "summary.json")) as f:
        assert json.load(f)["rows"] == summary["rows"]
    assert PF.main(config)["rows"] == summary["rows"]     # finished runs are reused
    if exercise == "compression":     # ... also by another sweep that lists the same run
        stamp = {r.name: os.path.getmtime(os.path.join(tmp_path, r.name, "results.json"))
                 for r in runs}
        full = cli.parse([f"--config={CONFIG}:compression_full_ci", f"--config.run_dir={tmp_path}"])
        assert PF.main(full)["rows"] == summary["rows"]
        depth4 = cli.parse([f"--config={CONFIG}:depth4_ci", f"--config.run_dir={tmp_path}",
                            "--config.runs=name=l1 model.layers=1"])
        sweep = PF.main(depth4)
        assert sweep["rows"] == summary["rows"][:2]
        assert sorted(os.path.basename(p) for p in sweep["figures"]) == [
            "depth4_test_curves.png", "depth4_train_curves.png"]
        assert stamp == {n: os.path.getmtime(os.path.join(tmp_path, n, "results.json"))
                         for n in stamp}


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    config = cli.parse([f"--config={CONFIG}:ex1_ci", "--config.train.steps=20",
                        "--config.train.checkpoint_every=10", "--config.train.eval_every=10",
                        "--config.quiet=true"])
    run = PF.run_configs(config)[1]
    straight = train_run(run, str(tmp_path / "straight"), quiet=True)

    from models.metrics import MetricWriter   # noqa: PLC0415 (the loop's writer)

    real_write = MetricWriter.write

    def crash_at_20(self, step, metrics):   # after the step-10 checkpoint, before step 20's
        if step == 20:
            raise KeyboardInterrupt("simulated crash")
        return real_write(self, step, metrics)

    monkeypatch.setattr(MetricWriter, "write", crash_at_20)
    with pytest.raises(KeyboardInterrupt):
        train_run(run, str(tmp_path / "resumed"), quiet=True)
    monkeypatch.setattr(MetricWriter, "write", real_write)
    resumed = train_run(run, str(tmp_path / "resumed"), quiet=True)
    assert resumed["final"] == straight["final"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])
