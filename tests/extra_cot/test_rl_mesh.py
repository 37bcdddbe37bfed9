"""The CHRPO stage (experiments/extra_cot/rl.py) on a device mesh.

- Padded mini-batch rows weigh nothing: loss, denominator, masked metrics and
  gradient of ``make_rl_loss`` are those of the unpadded mini-batch, for every
  aggregation.
- Two CHRPO steps through ``rl.rl`` on 8 simulated CPU devices (data 2 x fsdp 2
  x tensor 2; 6-row mini-batches padded to 8) equal the single-device run: the
  same greedy rollouts (generated with the mesh-sharded parameters and prompt
  rows split over data x fsdp), losses
  and updated parameters; a mesh that does not fit the devices is refused with
  an error naming the sizes.

The 8-device side runs in one subprocess (``XLA_FLAGS`` must be set before jax
starts) that runs this file as a script on a copy of a run directory prepared
here (tokenizer, RL questions, calibration, the ``sft_policy`` init model), and
writes JSON / npz; the single-device reference is the same code in the pytest
process. The tiny random init model answers nothing correctly, so both sides
judge with the same deterministic stand-in (``_parity_rewards``: a rollout is
"correct" iff the sum of its completion ids plus its subgroup index is odd),
which gives non-zero advantages within every group and therefore a real
gradient.
"""
import json
import logging
import os
import shutil
import subprocess
import sys

import chrpo
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.arithmetic import ArithmeticConfig, generate_problems, tokenizer_corpus
from data.tokenizers import train_sentencepiece
from experiments import rundir
from experiments.extra_cot import rl
from experiments.extra_cot import rollouts as rollouts_module
from experiments.extra_cot.configs import test as test_config
from experiments.extra_cot.datasets import question_row
from models.metrics import read_metrics
from models import sharding_memory
from models.qwen3 import Qwen3, Qwen3Config

ARITH = ArithmeticConfig(max_steps=2)
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
BAD_MESH = {"data": 3, "fsdp": 1, "tensor": 1}
LR = 1e-3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
EIGHT_DEVICES = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS":
                 "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}


def spawn_on_eight_devices(script: str, *args: str) -> subprocess.Popen:
    """``python script *args`` on 8 simulated CPU devices (LLVM -O0: compiling, not
    running, dominates these tiny programs), started in the background so the
    caller computes its single-device reference meanwhile; shared with
    test_rollouts_mesh.py."""
    return subprocess.Popen([sys.executable, script, *args], env={**os.environ, **EIGHT_DEVICES},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ----------------------------------------------------------------------------- padded rows

@pytest.fixture(scope="module")
def tiny():
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    model = Qwen3(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    b, p, c = 3, 6, 8
    prompt_mask = np.arange(p) >= np.array([[0], [2], [4]])               # left padding
    completion_mask = np.arange(c) < np.array([[8], [5], [2]])            # right padding
    batch = {"prompt_ids": rng.integers(1, 64, (b, p)).astype(np.int32),
             "prompt_mask": prompt_mask,
             "completion_ids": rng.integers(1, 64, (b, c)).astype(np.int32),
             "completion_mask": completion_mask,
             "old_logp": np.where(completion_mask, rng.normal(-4.0, 0.3, (b, c)), 0.0
                                  ).astype(np.float32),
             "ref_logp": np.where(completion_mask, rng.normal(-4.0, 0.3, (b, c)), 0.0
                                  ).astype(np.float32),
             "advantages": np.array([1.0, -0.5, 0.25], np.float32)}
    return model, batch


def test_padded_minibatch_rows_weigh_nothing(tiny):
    """Every aggregation in one compiled function (one compile per batch shape).
    Tolerances: the padded batch sums the same terms plus exact zeros, in another
    order (float32): loss and metrics rtol 1e-6; gradients rtol 1e-5 with atol
    1e-6 x the leaf's largest entry (matmuls over 3 vs 4 rows); a padded row with
    any weight would move them by O(1) relative."""
    model, batch = tiny
    loss_fns = [rl.make_rl_loss(chrpo.get_preset("chrpo").replace(
        aggregation=mode, max_len=8, kl_coef=0.05)) for mode in AGGREGATIONS]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def values_and_grads(params, batch):
        out = []
        for loss_fn in loss_fns:
            def objective(p, loss_fn=loss_fn):
                total, denom, metrics = loss_fn(nnx.merge(graphdef, p, rest), batch, None)
                return total, (denom, metrics)
            out.append(jax.value_and_grad(objective, has_aux=True)(params))
        return out

    padded = rl.pad_minibatch(batch, 4)
    assert len(padded["advantages"]) == 4 and not padded["completion_mask"][3].any()
    assert not padded["prompt_mask"][3].any() and rl.pad_minibatch(padded, 4) is padded
    for mode, plain, pad in zip(AGGREGATIONS, values_and_grads(params, batch),
                                values_and_grads(params, padded)):
        (total, (denom, metrics)), grads = plain
        (total_p, (denom_p, metrics_p)), grads_p = pad
        assert float(denom_p) == float(denom) > 0, mode
        np.testing.assert_allclose(float(total_p), float(total), rtol=1e-6, err_msg=mode)
        assert sorted(metrics_p) == sorted(metrics) and "kl" in metrics
        for key in metrics:
            np.testing.assert_allclose(float(metrics_p[key]), float(metrics[key]), rtol=1e-6,
                                       atol=1e-9, err_msg=f"{mode}: {key}")
        flat, flat_p = jax.tree.leaves(grads), jax.tree.leaves(grads_p)
        assert max(float(jnp.abs(g).max()) for g in flat) > 1e-4, mode   # a real gradient
        for g, g_p in zip(flat, flat_p, strict=True):
            scale = float(jnp.abs(g).max())
            np.testing.assert_allclose(np.asarray(g_p), np.asarray(g), rtol=1e-5,
                                       atol=1e-6 * scale, err_msg=mode)


# ----------------------------------------------------------------------------- the RL stage

def _config(run_dir: str, mesh: dict | None, microbatches: int = 1):
    c = test_config.get_config()
    c.run_dir = run_dir
    c.microbatches.rl = microbatches
    if mesh is not None:
        c.mesh.update(mesh)
    # 3 prompts x (2 policy + 2 forced levels x 1) = 12 rollouts, 2 mini-batches of 6
    # rows: padded to 8 on the 2 x 2 row shards of MESH. Greedy rollouts: the
    # forced levels still make the rows of a group differ.
    c.rl.update({"steps": 2, "prompts_per_step": 3, "policy_samples": 2, "forced_samples": 1,
                 "forced_levels": (20, 60), "max_new_tokens": 16, "minibatches": 2,
                 "completion_bucket": 32, "checkpoint_every": 10, "temperature": 0.0})
    c.rl.optim.learning_rate = LR
    c.rl.optim.eps = 1e-4        # see test_rl_on_eight_devices_equals_one_device
    return c


def _make_run(root: str) -> None:
    """A run directory holding what the rl stage reads, with a fresh test-config model."""
    run = rundir.Run(root)
    tok = train_sentencepiece(tokenizer_corpus(generate_problems(0, 120, ARITH)), vocab_size=400)
    os.makedirs(run.path("data"))
    tok.save(run.path("data", "tokenizer.model"))
    problems = generate_problems(7, 6, ARITH)
    rundir.write_jsonl(run.path("data", "rl.jsonl"), [question_row(p) for p in problems])
    rundir.write_jsonl(os.path.join(run.stage_dir("calibrate"), "calibration.jsonl"),
                       [{"uid": p.uid, "ref_len": 40, "target": 40} for p in problems])
    model = rundir.build_model(_config(root, None).model, tok, seed=0)
    rundir.export_model(model, run.stage_dir("sft_policy"))
    for stage in ("data", "calibrate", "sft_policy"):   # made by hand: the rl stage's inputs
        run.mark_done(stage, {"made_by": "test"})


def _parity_rewards(batch, calibration, **kwargs):
    """The real reward inputs, with every rollout valid and "correct" iff the sum of
    its completion ids plus its subgroup index is odd (see the module docstring)."""
    inputs = _REAL_REWARD_INPUTS(batch, calibration, **kwargs)
    odd = [(int(ids[m].sum()) + int(sub)) % 2 == 1 for ids, m, sub in
           zip(batch.completion_ids, batch.completion_mask, batch.local_ids)]
    return inputs._replace(valid=jnp.ones_like(inputs.valid), correct=jnp.asarray(odd))


_REAL_REWARD_INPUTS = rl.reward_inputs


def _params(model) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_leaves_with_path(nnx.split(model, nnx.Param, ...)[1])}


def _run_rl(root: str, mesh: dict | None, microbatches: int = 1, config=None) -> dict:
    """Run the rl stage; its metrics, final parameters, each step's rollouts
    (completion ids), the fraction of the policy's bytes one device held and the
    row shards of the sampler's prompts (rows / rows per device)."""
    run, rollouts, held, prompt_shards = rundir.Run(root), [], [], []

    def recording_generate(graphdef, state, ids, mask, **kwargs):
        prompt_shards.append(ids.shape[0] // ids.sharding.shard_shape(ids.shape)[0])
        return _REAL_GENERATE(graphdef, state, ids, mask, **kwargs)

    def recording_rollouts(model, *args, **kwargs):
        state = nnx.split(model)[1]
        held.append(sharding_memory.held_bytes_per_device(state)
                    / sum(x.nbytes for x in jax.tree.leaves(state)))
        batch = _REAL_ROLLOUT_GROUPS(model, *args, **kwargs)
        rollouts.append(batch.completion_ids.tolist())
        return batch

    rl.rollout_groups, rollouts_module.generate = recording_rollouts, recording_generate
    try:
        rl.rl(config or _config(root, mesh, microbatches), run)
    finally:
        rl.rollout_groups, rollouts_module.generate = _REAL_ROLLOUT_GROUPS, _REAL_GENERATE
    return {"metrics": read_metrics(run.path("rl")), "rollouts": rollouts,
            "held_fraction": max(held), "prompt_shards": sorted(set(prompt_shards)),
            "params": _params(rundir.load_model(run.path("rl")))}


@pytest.mark.slow
def test_rl_on_eight_devices_equals_one_device(tmp_path, monkeypatch, caplog):
    """Tolerances (float32; sums over sharded rows, hidden units and vocabulary are
    reordered, and the 8-device side compiles at LLVM -O0): per-update losses and
    grad norms rtol 1e-5 (atol 1e-7 for losses near 0); parameters after 4 AdamW
    updates at lr 1e-3 within 1e-5 absolute, against moves of up to 4e-3 (eps 1e-4
    keeps Adam from dividing a rounding-level gradient difference by a near-zero
    second moment). Greedy rollouts are compared exactly: logit differences of
    ~1e-6 do not flip an argmax here, and a flip would show as another rollout,
    not as a small error."""
    _make_run(str(tmp_path / "one"))
    for name in ("mesh", "bad"):
        shutil.copytree(tmp_path / "one", tmp_path / name)
    proc = spawn_on_eight_devices(__file__, str(tmp_path))
    monkeypatch.setattr(rl, "reward_inputs", _parity_rewards)
    caplog.set_level(logging.INFO, logger="experiments.extra_cot.rl")
    ref = _run_rl(str(tmp_path / "one"), None)
    assert "rl: memory estimate per device on mesh {'data': 1, 'fsdp': 1" in caplog.text
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    got = json.loads((tmp_path / "mesh.json").read_text())
    assert got["devices"] == 8
    print(f"8-device subprocess: {got['cpu_seconds']:.1f} CPU-s")
    assert "mesh sizes" in got["bad_mesh_error"] and "8 devices" in got["bad_mesh_error"]
    assert ref["held_fraction"] == 1.0 and got["held_fraction"] < 0.75   # really sharded
    assert ref["prompt_shards"] == [1] and got["prompt_shards"] == [4]  # rows over data x fsdp
    assert got["rollouts"] == ref["rollouts"] and len(ref["rollouts"]) == 2
    assert [m["step"] for m in got["metrics"]] == [m["step"] for m in ref["metrics"]] == [1, 2]
    for mine, want in zip(got["metrics"], ref["metrics"]):
        assert want["advantage_abs_mean"] > 0          # the stand-in judge gives a gradient
        for key in ("reward_mean", "advantage_abs_mean", "think_tokens", "accuracy"):
            assert mine[key] == want[key], key
        for key in ("update/loss", "update/grad_norm", "update/kl", "update/approx_kl"):
            np.testing.assert_allclose(mine[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    with np.load(tmp_path / "mesh.npz", allow_pickle=False) as params:
        assert sorted(params.files) == sorted(ref["params"])
        worst = max(float(np.abs(params[k] - v).max()) for k, v in ref["params"].items())
        for key, value in ref["params"].items():
            np.testing.assert_allclose(params[key], value, atol=1e-5, rtol=0, err_msg=key)
    loss_rel = max(abs(m["update/loss"] - w["update/loss"]) / max(abs(w["update/loss"]), 1e-30)
                   for m, w in zip(got["metrics"], ref["metrics"]))
    print(f"observed: update/loss max rel diff {loss_rel:.2e}, params max abs diff {worst:.2e}")
    init = _params(rundir.load_model(str(tmp_path / "one" / "sft_policy")))
    moved = max(float(np.abs(ref["params"][k] - init[k]).max()) for k in init)
    assert moved > 1e-4                                # RL moved the parameters


@pytest.mark.slow
def test_rl_microbatches_equal_one_batch(tmp_path, monkeypatch):
    """``microbatches.rl=4``: each 6-row mini-batch padded to 8 rows and accumulated
    over 4 micro-batches of 2 gives the one-batch updates (rtol 1e-5, parameters
    within 1e-5 after 4 updates, the tolerances of the mesh test above)."""
    _make_run(str(tmp_path / "one"))
    shutil.copytree(tmp_path / "one", tmp_path / "micro")
    monkeypatch.setattr(rl, "reward_inputs", _parity_rewards)
    ref = _run_rl(str(tmp_path / "one"), None)
    seen, real = [], rl.make_train_step

    def recording(*args, **kwargs):
        seen.append(kwargs.get("num_microbatches"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "make_train_step", recording)
    got = _run_rl(str(tmp_path / "micro"), None, microbatches=4)
    assert seen == [4]
    assert got["rollouts"] == ref["rollouts"]
    for mine, want in zip(got["metrics"], ref["metrics"], strict=True):
        assert want["advantage_abs_mean"] > 0
        for key in ("update/loss", "update/grad_norm"):
            np.testing.assert_allclose(mine[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for key, value in ref["params"].items():
        np.testing.assert_allclose(got["params"][key], value, atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.slow
def test_rl_with_a_pid_budget_resumes_to_the_same_run(tmp_path, monkeypatch):
    """rl.budget with the PID multiplier and the Lagrangian advantage: the multiplier
    follows the PID rule on the batch ratio, is logged and plotted, and a run killed after
    step 1 and resumed gives the straight run's multiplier and parameters exactly."""
    global _REAL_ROLLOUT_GROUPS
    _make_run(str(tmp_path / "straight"))
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    monkeypatch.setattr(rl, "reward_inputs", _parity_rewards)

    def budget_config(root):
        c = _config(root, None)
        c.rl.update({"budget": 0.05, "budget_controller": "pid", "budget_two_sided": True,
                     "checkpoint_every": 1})
        c.rl.objective.global_mode = "advantage"
        return c

    ref = _run_rl(str(tmp_path / "straight"), None, config=budget_config(
        str(tmp_path / "straight")))
    lams = [m["lambda"] for m in ref["metrics"]]
    d = [m["ratio_policy"] - 0.05 for m in ref["metrics"]]   # the tiny model's ratios
    pid = budget_config("").rl.pid
    assert lams[0] == pytest.approx((pid.kp + pid.ki) * d[0], rel=1e-5) and lams[0] != 0
    assert lams[1] == pytest.approx(pid.kp * d[1] + pid.ki * (d[0] + d[1]), rel=1e-5, abs=1e-7)
    assert os.path.exists(tmp_path / "straight" / "rl" / "budget.png")
    real, calls = _REAL_ROLLOUT_GROUPS, []

    def killed_at_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:            # after step 1's checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    _REAL_ROLLOUT_GROUPS = killed_at_step_two
    try:
        with pytest.raises(KeyboardInterrupt):
            _run_rl(str(tmp_path / "resumed"), None,
                    config=budget_config(str(tmp_path / "resumed")))
    finally:
        _REAL_ROLLOUT_GROUPS = real
    got = _run_rl(str(tmp_path / "resumed"), None, config=budget_config(
        str(tmp_path / "resumed")))
    assert [m["lambda"] for m in got["metrics"]] == lams
    for key, value in ref["params"].items():
        np.testing.assert_array_equal(got["params"][key], value, err_msg=key)


_REAL_ROLLOUT_GROUPS = rl.rollout_groups
_REAL_GENERATE = rollouts_module.generate

if __name__ == "__main__":   # the 8-device side of the test above
    out = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    rl.reward_inputs = _parity_rewards
    try:
        rl.rl(_config(os.path.join(out, "bad"), BAD_MESH), rundir.Run(os.path.join(out, "bad")))
        bad_error = ""
    except ValueError as err:
        bad_error = str(err)
    result = _run_rl(os.path.join(out, "mesh"), MESH)
    with open(os.path.join(out, "mesh.json"), "w") as f:
        json.dump({"devices": jax.device_count(), "bad_mesh_error": bad_error,
                   "cpu_seconds": sum(os.times()[:2]),
                   **{k: v for k, v in result.items() if k != "params"}}, f)
    np.savez(os.path.join(out, "mesh.npz"), **result["params"])
