"""Multi-host pieces of experiments/extra_cot/pipeline.py, rundir.py and evaluate.py:
distributed initialisation comes first; only the main process prints progress
and writes done.json, the stage JSONL outputs and the evaluation tables and
plots; every process waits at a barrier after each stage (after done.json is
written), so the next stage reads complete files on the shared run_dir."""
import json

import jax
import pytest

from data.arithmetic import ArithmeticConfig, generate_problems
from experiments import cli, rundir
from experiments.extra_cot import evaluate, pipeline
from experiments.extra_cot.datasets import question_row
from experiments.extra_cot.rollouts import Judged
from models import sharding


def _config(run_dir, **overrides):
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    config = cli.parse(["--config=experiments/extra_cot/configs/test.py", f"--config.run_dir={run_dir}",
                        *args])
    with config.unlocked():   # the scale configs carry this block; test.py does not
        config.distributed = {"enabled": True, "coordinator_address": "host0:1234",
                              "num_processes": 2, "process_id": 1}
    return config


class _Initialised(Exception):
    pass


def test_distributed_init_comes_before_anything_is_written(tmp_path, monkeypatch):
    seen = []

    def initialize(block):
        seen.append(dict(block))
        raise _Initialised

    monkeypatch.setattr(sharding, "initialize_distributed", initialize)
    with pytest.raises(_Initialised):
        pipeline.run_stages(_config(tmp_path / "run", stage="data"))
    assert seen == [{"enabled": True, "coordinator_address": "host0:1234",
                     "num_processes": 2, "process_id": 1}]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("main", [True, False])
def test_only_the_main_process_prints(tmp_path, monkeypatch, capsys, main):
    monkeypatch.setattr(sharding, "initialize_distributed", lambda block: False)
    run = rundir.Run(tmp_path / "run")
    run.stage_dir("data")
    run.mark_done("data", {"seconds": 1.0})              # as process 0 would have
    monkeypatch.setattr(sharding, "is_main_process", lambda: main)
    summaries = pipeline.run_stages(_config(run.root, stage="data"))
    assert summaries["data"]["skipped"] is True
    out = capsys.readouterr().out
    assert ("[1/1] data: done, skipping" in out) is main and (out == "") is not main


@pytest.mark.parametrize("main", [True, False])
def test_only_the_main_process_writes_stage_files(tmp_path, monkeypatch, main):
    barriers = []
    monkeypatch.setattr(sharding, "is_main_process", lambda: main)
    monkeypatch.setattr(sharding, "sync_processes",
                        lambda name: barriers.append((name, run.done("stage"))))
    run = rundir.Run(tmp_path / "run")

    def stage():
        rundir.write_jsonl(run.path(run.stage_dir("stage"), "out.jsonl"), [{"a": 1}])
        return {"rows": 1}

    summary = rundir.run_stage(run, "stage", stage)
    assert summary["rows"] == 1 and summary["seconds"] >= 0        # every process gets it
    assert (tmp_path / "run" / "stage" / "out.jsonl").exists() is main
    assert run.done("stage") is main
    assert barriers == [("stage stage done", main)]                 # after done.json
    if main:
        assert rundir.read_jsonl(run.path("stage", "out.jsonl")) == [{"a": 1}]
        done = json.loads((tmp_path / "run" / "stage" / "done.json").read_text())
        assert done["rows"] == 1
        # what the numbers may depend on beyond the config (docs/results.md, session 13)
        env = done["environment"]
        assert env["packages"]["jax"] == jax.__version__ and env["backend"] == "cpu"
        assert env["device_count"] == jax.device_count() and env["cpu"]


@pytest.mark.parametrize("main", [True, False])
def test_only_the_main_process_writes_evaluation_tables(tmp_path, monkeypatch, main):
    """evaluate() with the models and their answers stubbed out (a fixed verdict per
    question): the tables and plots exist on process 0 only; both return the same
    summary."""
    run = rundir.Run(tmp_path / "run")
    run.stage_dir("data")
    problems = generate_problems(3, 2, ArithmeticConfig(max_steps=2))
    rundir.write_jsonl(run.path("data", "test.jsonl"), [question_row(p) for p in problems])
    monkeypatch.setattr(sharding, "is_main_process", lambda: main)
    monkeypatch.setattr(rundir.Run, "tokenizer", lambda self: None)
    monkeypatch.setattr(rundir, "load_model", lambda path: path)
    monkeypatch.setattr(evaluate, "place_model", lambda model, mesh: model)
    verdict = Judged(valid=True, correct=True, level=40, think_length=5, cot_ids=())
    monkeypatch.setattr(evaluate, "answer_questions",
                        lambda model, tok, questions, **kw: [verdict] * len(questions))
    config = _config(run.root)
    summary = evaluate.evaluate(config, run)
    assert summary == {"rows": len(evaluate.method_plan(config.evaluate)),
                       "plots": ["accuracy_vs_actratio.png", "policy_difficulty.png"]}
    written = sorted(p.name for p in (tmp_path / "run" / "evaluate").iterdir())
    assert written == (["accuracy_vs_actratio.png", "policy_difficulty.png", "responses.jsonl",
                        "results.json", "results.md"] if main else [])
