"""The main job end to end on the test config, and config validation before any work."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from data.arithmetic import load_problems
from data.compression import level_for_ratio
from data.formats import LEVELS
from experiments import cli, rundir
from experiments.extra_cot import pipeline
from experiments.extra_cot.configs import stages

TEST_CONFIG = "experiments/extra_cot/configs/test.py"


def parse(*overrides, config=TEST_CONFIG):
    return cli.parse([f"--config={config}", *overrides])


@pytest.mark.parametrize("override, key", [
    ("--config.compress.ratios=-0.1,0.5", "compress.ratios"),
    ("--config.rl.objective.tol=-0.1", "rl.objective.tol"),
    ("--config.evaluate.levels=20,30", "evaluate.levels"),
    ("--config.data.sizes.rl=0", "data.sizes.rl"),
    ("--config.sft_mixed.init=nowhere", "sft_mixed.init"),
    ("--config.rl.temperature=0", "rl.temperature"),
    ("--config.compressor.train.steps=0", "compressor.train.steps"),
    ("--config.stage=sft,rl", "stage"),
    # issue 25: before any work, not a traceback after the data stage
    ("--config.model.num_kv_heads=3", "model.num_kv_heads"),
    ("--config.model.dtype=float17", "model.dtype"),
    ("--config.model.head_dim=15", "model.head_dim"),
    ("--config.rl.lagrange_step_size=inf", "rl.lagrange_step_size"),
    ("--config.rl.temperature=inf", "rl.temperature"),
    ("--config.sft_base.equation_weight=0", "sft_base.equation_weight"),
    ("--config.sft_policy.control_weight=0", "sft_policy.control_weight"),
])
def test_invalid_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(cli.ConfigError, match=f"'{key}'"):
        parse(override)


def test_group_of_one_with_a_std_normalised_estimator_is_rejected():
    with pytest.raises(cli.ConfigError, match="'rl.policy_samples'.*at least 2"):
        parse("--config.rl.policy_samples=1", "--config.rl.forced_samples=0",
              "--config.rl.objective.estimator=grpo")
    parse("--config.rl.policy_samples=1", "--config.rl.forced_samples=0",
          "--config.rl.objective.estimator=drgrpo")  # no std: a group of one is allowed


def test_a_stage_without_its_inputs_names_the_stages_to_run_first(tmp_path):
    config = parse(f"--config.run_dir={tmp_path}", "--config.stage=sft_policy")
    with pytest.raises(cli.ConfigError) as err:
        pipeline.run_stages(config)
    text = str(err.value)
    assert "stage 'sft_policy'" in text and "'calibrate'" in text and "'sft_mixed'" in text
    # the command makes everything upstream, in pipeline order
    assert (f"--config.run_dir={tmp_path} --config.stage=data,sft_base,compressor,selfcot,"
            "compress,sft_mixed,calibrate ") in text
    assert not os.path.exists(tmp_path / "sft_policy")          # stopped before any work
    # stages named together count as made: data then sft_base needs nothing else
    assert pipeline.stage_inputs(config, "sft_base") == ("data",)
    pipeline.check_inputs(config, rundir.Run(str(tmp_path)), "sft_base", planned=("data",))
    assert pipeline.stage_inputs(config, "evaluate") == (
        "data", "sft_base", "sft_mixed", "sft_policy", "rl", "sft_tokenskip")
    assert pipeline.stage_inputs(config, "data") == ()


def test_default_config_is_valid_and_runs_every_stage():
    config = parse(config="experiments/extra_cot/configs/default.py")
    assert stages.selected_stages(config.stage) == list(stages.STAGE_ORDER)
    assert stages.selected_stages("rl, data") == ["data", "rl"]
    assert "evaluate_val" not in stages.selected_stages("all")   # only when named
    assert stages.selected_stages("evaluate_val,evaluate") == ["evaluate", "evaluate_val"]
    from experiments.extra_cot import sft
    assert stages.selected_stages("all", sft.STAGES) == [
        "sft_base", "sft_mixed", "sft_policy", "sft_tokenskip"]


def test_long_config_keeps_schedules_tied_to_step_counts():
    config = parse(config="experiments/extra_cot/configs/long.py")
    default = parse(config="experiments/extra_cot/configs/default.py")
    tokens = lambda c, b: c[b].steps * c[b].batch_tokens  # noqa: E731
    for block in ("sft_base", "sft_mixed", "sft_policy", "sft_tokenskip"):
        assert config[block].optim.total_steps == config[block].steps, block
        assert tokens(config, block) >= tokens(default, block), block
    for block in ("sft_mixed", "sft_tokenskip"):      # the longer run trains on more tokens
        assert tokens(config, block) > tokens(default, block), block
    assert config.data.arithmetic.max_steps == default.data.arithmetic.max_steps + 1


def params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.split(model, nnx.Param, ...)[1])]


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    config = parse(f"--config.run_dir={run_dir}")
    pipeline.main(config)
    out = capsys.readouterr().out
    run = rundir.Run(run_dir)
    for stage in stages.STAGE_ORDER:
        summary = run.summary(stage)
        assert summary["seconds"] > 0, stage
    for split in ("sft", "rl", "val", "test"):
        assert len(rundir.read_jsonl(run.path("data", f"{split}.jsonl"))) == \
            config.data.sizes[split]
    # the compressor is evaluated on held-out problems of the run's own task
    held_out = load_problems(run.path("data", "compressor_eval.jsonl"))
    assert len(held_out) == config.compressor.data.num_eval
    assert max(p.difficulty.n_steps for p in held_out) <= config.data.arithmetic.max_steps
    compressor_config = json.load(open(run.path("compressor", "config.json")))
    assert compressor_config["data"]["eval_path"] == run.path("data", "compressor_eval.jsonl")
    # compressed data: every kept question at every level, ratio in the level's window
    rows = rundir.read_jsonl(run.path("compress", "formula.jsonl"))
    assert rows and {r["level"] for r in rows} == set(LEVELS)
    per_question = {}
    for r in rows:
        per_question.setdefault(r["uid"], set()).add(r["level"])
        # the level's own window ([0.3, 0.5) for 40: a ratio of exactly 0.3 is level 40)
        assert level_for_ratio(r["ratio"]) == r["level"], r
    tok = run.tokenizer()
    assert all(r["text"] == tok.decode(r["cot_ids"]) for r in rows[:50])
    assert all(levels == set(LEVELS) for levels in per_question.values())
    calib = rundir.read_jsonl(run.path("calibrate", "calibration.jsonl"))
    assert len(calib) == config.data.sizes.rl
    assert all(set(c["levels"]) == {str(lv) for lv in LEVELS} for c in calib)
    # the chunks a killed selfcot / calibrate would resume from go when the stage is done
    assert not any(os.path.exists(run.path(s, "partial")) for s in ("selfcot", "calibrate"))
    # RL metrics: one finite record per step with the fields
    records = [json.loads(line) for line in open(run.path("rl", "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, config.rl.steps + 1))
    for key in ("tier/invalid", "tier/within_budget", "accuracy", "control/20", "update/kl",
                "update/clip_high_fraction", "zero_variance_fraction", "time/rollout",
                "time/update", "lambda"):
        assert all(r[key] is not None and np.isfinite(r[key]) for r in records), key
    # evaluation: a row for every method and level, sane numbers, table printed, plots
    result = json.load(open(run.path("evaluate", "results.json")))
    table = {(t["method"], t["control"]) for t in result["table"]}
    want = {("base", "-"), ("policy-warm-start", "<COMP_POLICY>"), ("chrpo", "<COMP_POLICY>")}
    want |= {(m, f"<COMP_{lv}>") for m in ("extra-cot", "tokenskip") for lv in LEVELS}
    assert table == want
    for t in result["table"]:
        assert 0 <= t["accuracy"] <= 1 and 0 <= t["valid"] <= 1 and t["n"] == 12
        assert np.isfinite(t["think_tokens"]) and t["think_tokens"] >= 0
    assert "| chrpo | <COMP_POLICY> |" in out
    answered = rundir.read_jsonl(run.path("evaluate", "responses.jsonl"))
    assert all(isinstance(r["response"], str) and "answer" in r for r in answered)
    assert sum(bool(r["response"]) for r in answered) > len(answered) / 2
    assert all("</think>" in r["response"] for r in answered if r["valid"])
    for method, profile in result["difficulty"].items():   # per difficulty, every question once
        assert sum(p["n"] for p in profile) == 12, method
    assert result["policy_difficulty"] == result["difficulty"]["chrpo"]
    for name in ("accuracy_vs_actratio.png", "policy_difficulty.png"):
        assert os.path.getsize(run.path("evaluate", name)) > 1000

    # every JSON file the run wrote is strict JSON (null, never NaN)
    written = [os.path.join(d, f) for d, _, files in os.walk(run_dir) for f in files
               if f.endswith((".json", ".jsonl"))]
    assert len(written) > 20
    for path in written:
        rundir.check_strict_json(path)

    # a second run skips every stage
    assert all(s.get("skipped") for k, s in pipeline.run_stages(config).items()
               if k != "total_seconds")

    # RL resume: drop the last step's checkpoint and outputs, re-run: identical params
    first = params(rundir.load_model(run.path("rl")))
    ckpt = run.path("rl", "checkpoints")
    last = max(int(n) for n in os.listdir(ckpt) if n.isdigit())
    assert last == config.rl.steps and str(last - 1) in os.listdir(ckpt)
    shutil.rmtree(os.path.join(ckpt, str(last)))
    shutil.rmtree(run.path("rl", "model"))
    os.remove(run.path("rl", "done.json"))
    pipeline.run_stages(parse(f"--config.run_dir={run_dir}", "--config.stage=rl"))
    for a, b in zip(first, params(rundir.load_model(run.path("rl")))):
        np.testing.assert_array_equal(a, b)

    # extending the finished RL by one step equals a run that asked for it from the
    # start (RL's schedule is constant; step k's prompts and key are functions of k),
    # and its model replaces the old export
    longer = str(tmp_path / "longer")
    shutil.copytree(run_dir, longer, symlinks=True)
    shutil.rmtree(os.path.join(longer, "rl"))
    more = f"--config.rl.steps={config.rl.steps + 1}"
    pipeline.run_stages(parse(f"--config.run_dir={longer}", "--config.stage=rl", more))
    pipeline.run_stages(parse(f"--config.run_dir={run_dir}", "--config.stage=rl", more,
                              "--config.force=rl"))
    extended = params(rundir.load_model(run.path("rl")))
    fresh = params(rundir.load_model(os.path.join(longer, "rl")))
    assert any(not np.array_equal(a, b) for a, b in zip(first, fresh))
    for b, c in zip(extended, fresh):
        np.testing.assert_array_equal(b, c)
    records = [json.loads(line) for line in open(run.path("rl", "metrics.jsonl"))]
    assert [r["step"] for r in records][-1] == config.rl.steps + 1


@pytest.fixture
def fake_stages(monkeypatch):
    """Every stage replaced by one that records its call: run_stages's own logic only."""
    calls = []

    def fake(name):
        def fn(config, run):
            calls.append(name)
            run.stage_dir(name)           # as every real stage does first
            return {"fake": True}
        return fn
    names = stages.STAGE_ORDER + stages.EXTRA_STAGES
    monkeypatch.setattr(pipeline, "stage_functions", lambda: {n: fake(n) for n in names})
    return calls


def test_keys_of_unstarted_stages_may_change_on_resume(tmp_path, fake_stages, capsys):
    run_dir = f"--config.run_dir={tmp_path / 'run'}"
    first = ("--config.stage=data,sft_base,compressor", run_dir)
    pipeline.run_stages(parse(*first))
    # RL and the warm start have not started: their keys may change, and the rl block's
    # with them; the mixed-ratio SFT's too
    pipeline.run_stages(parse(*first, "--config.rl.steps=7", "--config.rl.budget=0.3",
                              "--config.sft_mixed.steps=9"))
    # started stages' keys, and global ones, stay locked, named in the error
    for key in ("sft_base.steps=3", "compressor_baseline.train.steps=3",
                "compressor.data.num_eval=5", "model.hidden_size=48", "seed=3"):
        name = key.split("=")[0].replace(".", r"\.")
        with pytest.raises(cli.ConfigError, match=rf"cannot change on resume:(\n  .*)*\n  {name}:"):
            pipeline.run_stages(parse(*first, "--config.rl.steps=7", "--config.rl.budget=0.3",
                                      "--config.sft_mixed.steps=9", f"--config.{key}"))
    assert fake_stages == ["data", "sft_base", "compressor"]
    # once the warm start has begun, rl.budget (its targets) is locked, rl.steps is not
    os.makedirs(tmp_path / "run" / "sft_policy")
    with pytest.raises(cli.ConfigError, match=r"cannot change on resume:\n  rl\.budget:"):
        pipeline.run_stages(parse(*first, "--config.rl.steps=7", "--config.rl.budget=0.45",
                                  "--config.sft_mixed.steps=9"))
    pipeline.run_stages(parse(*first, "--config.rl.steps=8", "--config.rl.budget=0.3",
                              "--config.sft_mixed.steps=9"))
    # a forced training stage may get more steps (it continues from its checkpoint)
    pipeline.run_stages(parse(*first, "--config.rl.steps=8", "--config.rl.budget=0.3",
                              "--config.sft_mixed.steps=9", "--config.sft_base.steps=20",
                              "--config.force=sft_base"))
    assert fake_stages == ["data", "sft_base", "compressor", "sft_base"]


def test_force_reruns_a_finished_stage_and_changed_settings_warn(tmp_path, fake_stages,
                                                                   capsys):
    run_dir = f"--config.run_dir={tmp_path / 'run'}"
    pipeline.run_stages(parse("--config.stage=data,sft_base", run_dir))
    capsys.readouterr()
    pipeline.run_stages(parse("--config.stage=data,sft_base", "--config.force=sft_base",
                              run_dir))
    assert fake_stages == ["data", "sft_base", "sft_base"]
    assert "sft_base: forced, running again" in capsys.readouterr().out
    with pytest.raises(cli.ConfigError, match="not among the stages this run runs"):
        parse("--config.stage=data", "--config.force=sft_base", run_dir)
    # a finished evaluation whose settings change is skipped with a warning
    os.makedirs(tmp_path / "run" / "evaluate")
    rundir.Run(str(tmp_path / "run")).mark_done("evaluate", {"fake": True})
    pipeline.run_stages(parse("--config.stage=data", "--config.evaluate.num_questions=5",
                              run_dir))
    out = capsys.readouterr().out
    assert "warning: evaluate.num_questions changed" in out
    assert "--config.force=evaluate" in out


def test_a_run_builds_its_mesh_once(tmp_path, monkeypatch):
    """Every stage of a run asks rundir.Run.mesh; models.sharding builds the mesh once."""
    import ml_collections

    from experiments import rundir
    from models import sharding

    built = []
    real = sharding.mesh_from_config
    monkeypatch.setattr(sharding, "mesh_from_config",
                        lambda block: built.append(block) or real(block))
    run = rundir.Run(str(tmp_path))
    config = ml_collections.ConfigDict({"mesh": {"data": 1, "fsdp": -1, "tensor": 1}})
    first = run.mesh(config)
    assert run.mesh(config) is first and run.mesh(config.copy_and_resolve_references()) is first
    assert len(built) == 1
    other = ml_collections.ConfigDict({"mesh": None})
    assert dict(run.mesh(other).shape) == dict(first.shape) and len(built) == 2
