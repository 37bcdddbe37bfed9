"""Kill and resume: SFT and CHRPO runs SIGKILLed at seeded random points end bit-identical.

Each test drives the real entry point (``python -m experiments.extra_cot.pipeline`` with
``--config.stage=sft_base`` / ``rl``) on the test config (experiments/extra_cot/configs/test.py, fewer
steps, a checkpoint every step) in a subprocess:

- reference: one uninterrupted run;
- killed: the same command, SIGKILLed ``KILLS`` times, each time
  ``uniform(0, MAX_DELAY_S)`` seconds after the run reported a seeded random
  step (so a kill may land inside a step or a checkpoint save), then relaunched
  until it finishes.

The exported parameters (``<stage>/model``) must be bit-identical, and so must
the final checkpoint's whole training state: optimiser, step, PRNG keys, skip
counters and, for CHRPO, the Lagrange multiplier, RL step and data position.

CHRPO needs rollouts whose rewards differ, or the update is zero and the check
is vacuous. The warm-start model here is built by hand: a bigram chain (only
the embedding and LM head carry signal, attention and MLP outputs start at
zero) that samples template responses, some valid and some not, with varying
think lengths; half the RL questions have the answer it writes. The test checks
that the run moved the parameters and the multiplier.

All runs share a JAX compilation cache, so relaunches do not recompile, and
compile with XLA's cheaper CPU back-end settings (``FAST_COMPILE``): both the
reference and the killed run use them, so the comparison is unaffected.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "experiments/extra_cot/configs/test.py"
KILLS = 2
MAX_DELAY_S = 0.25
SFT_STEPS, RL_STEPS = 6, 4
COMMON = [f"--config.sft_base.steps={SFT_STEPS}", f"--config.rl.steps={RL_STEPS}",
          "--config.rl.budget=0.2", "--config.rl.max_new_tokens=48"]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SFT_ARGS = ["--config.stage=sft_base", "--config.sft_base.checkpoint_every=1",
            "--config.sft_base.log_every=1"]
RL_ARGS = ["--config.stage=rl", "--config.rl.checkpoint_every=1"]


# ----------------------------------------------------------------------------- run directories

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """(template run directory after the data stage, environment for the subprocesses)."""
    from experiments import cli
    from experiments.extra_cot import pipeline

    root = tmp_path_factory.mktemp("kill_resume")
    template = str(root / "template")
    config = cli.parse([f"--config={CONFIG}", f"--config.run_dir={template}",
                        "--config.stage=data", *COMMON])
    pipeline.run_stages(config)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()}
    return template, env


def copy_run(template: str, dest: str) -> str:
    shutil.copytree(template, dest)
    path = os.path.join(dest, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["run_dir"] = dest     # the only key that differs between the copies
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return dest


def command(module: str, run_dir: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", module, f"--config={CONFIG}", f"--config.run_dir={run_dir}",
            *COMMON, *args]


def last_step(metrics_file: str, *, since: float = 0.0) -> int:
    """Largest ``step`` of the metrics.jsonl records written at ``time >= since`` (0 if none)."""
    try:
        with open(metrics_file) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            row = json.loads(line)
            if row["time"] >= since:
                steps.append(int(row["step"]))
        except (ValueError, KeyError, TypeError):
            pass     # a line being written
    return max(steps)


def run_to_end(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_with_kills(cmd: list[str], env: dict, metrics_file: str, *, total: int,
                   rng: np.random.Generator) -> list[tuple[int, int]]:
    """SIGKILL the run ``KILLS`` times, then let it finish.

    Kill k happens ``uniform(0, MAX_DELAY_S)`` s after the launch reports step
    ``targets[k]`` (distinct seeded steps in ``[1, total - 2]``, ascending; a
    relaunch resumes from its last checkpoint, so it reaches the next target).
    Returns (target, delay, exit status) per kill; -SIGKILL means it was running.
    """
    targets = sorted(rng.choice(np.arange(1, total - 1), KILLS, replace=False).tolist())
    kills = []
    for target in targets:
        delay = float(rng.uniform(0.0, MAX_DELAY_S))
        launched = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while last_step(metrics_file, since=launched) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills.append((target, delay, proc.returncode))
    run_to_end(cmd, env)
    return kills


# ----------------------------------------------------------------------------- comparisons

def exported_params(stage_dir: str) -> list[np.ndarray]:
    from experiments import rundir

    model = rundir.load_model(stage_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.split(model, nnx.Param, ...)[1])]


def final_state(stage_dir: str):
    """The newest checkpoint's whole state tree, restored without a target."""
    from models.checkpoint import CheckpointManager

    with CheckpointManager(os.path.join(stage_dir, "checkpoints"), max_to_keep=None) as m:
        restored = m.restore()
    return restored.step, restored.state


def assert_bit_identical(a, b) -> None:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def check_same_run(reference: str, resumed: str, stage: str) -> tuple[list, list]:
    params_ref = exported_params(os.path.join(reference, stage))
    params_res = exported_params(os.path.join(resumed, stage))
    assert_bit_identical(params_ref, params_res)
    (step_ref, state_ref), (step_res, state_res) = (final_state(os.path.join(r, stage))
                                                    for r in (reference, resumed))
    assert step_ref == step_res
    assert_bit_identical(state_ref, state_res)
    return params_ref, state_ref


# ----------------------------------------------------------------------------- SFT

def metric_rows(run_dir: str, stage: str) -> list[dict]:
    from models.metrics import read_metrics

    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")}
            for r in read_metrics(os.path.join(run_dir, stage))]


@pytest.mark.slow
def test_sft_killed_and_resumed_is_bit_identical(workspace, tmp_path):
    template, env = workspace
    reference = copy_run(template, str(tmp_path / "reference"))
    run_to_end(command("experiments.extra_cot.pipeline", reference, SFT_ARGS), env)
    killed = copy_run(template, str(tmp_path / "killed"))
    kills = run_with_kills(command("experiments.extra_cot.pipeline", killed, SFT_ARGS), env,
                           os.path.join(killed, "sft_base", "metrics.jsonl"),
                           total=SFT_STEPS, rng=np.random.default_rng(10))
    assert [rc for *_, rc in kills] == [-signal.SIGKILL] * KILLS, kills   # killed while running
    _, state = check_same_run(reference, killed, "sft_base")
    assert int(state["step"]) == SFT_STEPS and int(state["skipped_total"]) == 0
    assert metric_rows(killed, "sft_base") == metric_rows(reference, "sft_base")


# ----------------------------------------------------------------------------- CHRPO

def chain_model(tok, *, alpha: float = 12.0, seed: int = 0):
    """A Qwen3 that samples template-shaped responses from a bigram chain.

    Chain tokens get orthonormal embeddings; attention and MLP outputs are zero,
    so the final hidden state is the normed embedding of the current token and
    the (untied) LM head gives each chain successor a logit ``alpha`` (every
    other token: 0). Every other token has a zero embedding: uniform next token.
    Successors: newline -> {<COMP_40>, </think>, \\\\}; <COMP_20|40> -> <think>;
    <think> -> newline; </think> -> newline; \\\\boxed{1} spelled out, then
    <|im_end|>. A response is valid when </think> comes before the box.
    """
    from data import formats as F
    from models.qwen3 import Qwen3, Qwen3Config

    nl, box = tok.encode("\n")[0], tok.encode("\\boxed{1}")
    ids = {name: tok.token_to_id(name) for name in
           ("<COMP_20>", "<COMP_40>", F.THINK_OPEN, F.THINK_CLOSE, F.IM_END)}
    succ = {nl: [ids["<COMP_40>"], ids[F.THINK_CLOSE], box[0]],
            ids["<COMP_20>"]: [ids[F.THINK_OPEN]], ids["<COMP_40>"]: [ids[F.THINK_OPEN]],
            ids[F.THINK_OPEN]: [nl], ids[F.THINK_CLOSE]: [nl]}
    for a, b in zip(box, box[1:] + [ids[F.IM_END]]):
        assert a not in succ, "the box must spell distinct tokens"
        succ[a] = [b]
    config = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    model = Qwen3(config, rngs=nnx.Rngs(seed))
    chain = sorted(succ)
    assert len(chain) <= config.hidden_size
    embed = np.zeros((config.vocab_size, config.hidden_size), np.float32)
    head = np.zeros((config.hidden_size, config.vocab_size), np.float32)
    scale = np.sqrt(config.hidden_size)          # RMSNorm of a unit basis vector
    for row, token in enumerate(chain):
        embed[token, row] = 1.0
        head[row, succ[token]] = alpha / scale
    model.embed.set_value(embed)
    model.lm_head.set_value(head)
    for layer in model.layers:
        layer.attn.o_proj.set_value(np.zeros(layer.attn.o_proj.shape, np.float32))
        layer.mlp.down_proj.set_value(np.zeros(layer.mlp.down_proj.shape, np.float32))
    return model


@pytest.fixture(scope="module")
def rl_template(workspace, tmp_path_factory):
    """The data stage plus a warm-start model and a calibration file for the rl stage."""
    from experiments import rundir

    template, env = workspace
    run_dir = copy_run(template, str(tmp_path_factory.mktemp("rl") / "template"))
    run = rundir.Run(run_dir)
    rows = rundir.read_jsonl(run.path("data", "rl.jsonl"))
    for i, row in enumerate(rows):
        if i % 2 == 0:
            row["answer"] = "1"       # the chain model's answer: some rollouts are correct
    rundir.write_jsonl(run.path("data", "rl.jsonl"), rows)
    calibration = [{"uid": r["uid"], "ref_len": 4, "target": None if i % 4 == 3 else 40,
                    "levels": {}} for i, r in enumerate(rows)]
    rundir.write_jsonl(os.path.join(run.stage_dir("calibrate"), "calibration.jsonl"), calibration)
    rundir.export_model(chain_model(run.tokenizer()), run.stage_dir("sft_policy"))
    for stage in ("calibrate", "sft_policy"):     # made by hand: the rl stage's inputs
        run.mark_done(stage, {"made_by": "test"})
    return run_dir, env


@pytest.mark.slow
def test_chrpo_killed_and_resumed_is_bit_identical(rl_template, tmp_path):
    template, env = rl_template
    reference = copy_run(template, str(tmp_path / "reference"))
    run_to_end(command("experiments.extra_cot.pipeline", reference, RL_ARGS), env)
    killed = copy_run(template, str(tmp_path / "killed"))
    kills = run_with_kills(command("experiments.extra_cot.pipeline", killed, RL_ARGS), env,
                           os.path.join(killed, "rl", "metrics.jsonl"),
                           total=RL_STEPS, rng=np.random.default_rng(20))
    assert [rc for *_, rc in kills] == [-signal.SIGKILL] * KILLS, kills
    params, state = check_same_run(reference, killed, "rl")
    extra = state["extra"]
    assert int(extra["rl_step"]) == RL_STEPS and int(extra["position"]) == RL_STEPS * 4
    assert float(np.asarray(extra["lagrange"]["multiplier"])) > 0      # the dual step ran
    initial = exported_params(os.path.join(template, "sft_policy"))
    assert any(not np.array_equal(a, b) for a, b in zip(initial, params))   # it learned
    rows = metric_rows(reference, "rl")
    assert 0 < np.mean([r["valid"] for r in rows]) < 1                    # rewards differed
    assert metric_rows(killed, "rl") == rows
