"""CHRPO: reinforcement learning on <COMP_POLICY> prompts (docs/method.md, stage 3).

    python -m experiments.extra_cot.pipeline --config.stage=rl

One RL step, as a recipe (the math is chrpo/, the model code models/):

1. prompts: ``rl.prompts_per_step`` RL questions, in an order that is a pure
   function of (seed, epoch);
2. rollouts: per prompt ``policy_samples`` policy-mode samples and, for each
   level of ``forced_levels``, ``forced_samples`` samples whose response is
   forced to open with that control token (``experiments.extra_cot.rollouts.rollout_groups``);
3. judge: parse (data/formats.py) and check answers (data/answers.py); reward
   inputs use the calibrated ``ref_len`` and ``target`` of each question;
4. rewards and advantages once per batch: ``chrpo.compute_advantages`` (the
   hierarchical estimator gets the level subgroups);
5. behaviour and reference log-probs: ``models.sampling.score`` under the
   policy before the update and under the frozen warm-start model;
6. ``rl.passes`` passes over ``rl.minibatches`` shuffled mini-batches with
   ``chrpo.policy_loss`` (``models.training.make_train_step``: clipping and
   non-finite skipping);
7. Lagrange multiplier (when ``rl.budget`` is set): ``chrpo.update_lagrange``
   (``rl.budget_controller='dual'``) or ``chrpo.update_pid_lagrange`` ('pid') on
   the policy rollouts' mean realized ratio; it enters the next step's reward or
   advantage (``rl.objective.global_mode``). With ``rl.budget_targets='allocation'``
   the level bonus's targets are the budget's allocation
   (``experiments.extra_cot.calibrate.budget_targets``), the warm start's too. A budget also
   writes ``rl/budget.png``: the batch ratio and the multiplier per step.

The checkpoint holds the whole state: params, optimiser, multiplier, RL step,
data position and both PRNG keys (``TrainState.extra``), so a resumed run is
the same run.

Device mesh (``config.mesh``, ``models.sharding``; the default is a 1x1x1 mesh on
one device, the same code): the policy's state and the frozen reference are
placed by the logical-axis rules, rollouts and scoring run on the sharded
parameters, and each mini-batch is padded with all-masked rows to a multiple of
``data x fsdp`` (``pad_minibatch``: such rows weigh zero in every aggregation)
before its rows are split over the mesh. Scores come back to the host with
``sharding.to_host`` (a gather across processes on several hosts).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import chrpo
from data.formats import LEVELS, build_prompt
from experiments import rundir
from experiments.extra_cot.calibrate import policy_targets
from experiments.extra_cot.datasets import bucket_width, read_questions
from models.metrics import MetricWriter, Progress, Timer
from experiments.extra_cot.rollouts import RolloutGroups, rollout_groups
from models import sharding, sharding_memory
from models.checkpoint import CheckpointManager, abstract_tree
from models.sampling import completion_logprobs, score
from models.optim import make_optimizer
from models.training import (check_finite_updates, create_train_state, make_train_step,
                             merge_model, require_applied_updates)

__all__ = ["chrpo_config", "prompt_order", "reward_inputs", "make_rl_loss", "pad_minibatch",
           "plot_budget_trace", "rl", "STAGES"]

log = logging.getLogger(__name__)


def chrpo_config(block: ml_collections.ConfigDict) -> chrpo.ChrpoConfig:
    """The ChrpoConfig of ``rl.objective`` (flat fields of chrpo.ChrpoConfig)."""
    return chrpo.ChrpoConfig().replace(**block.objective.to_dict())


def prompt_order(n: int, step: int, per_step: int, *, seed: int) -> np.ndarray:
    """Question indices of RL step ``step``: epoch e is permutation(seed, e) of range(n)."""
    if n < per_step:
        raise ValueError(f"rl.prompts_per_step={per_step} exceeds the {n} RL questions")
    per_epoch = n // per_step
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([int(seed), 7, int(epoch)]).permutation(n)
    return order[within * per_step:(within + 1) * per_step]


def reward_inputs(batch: RolloutGroups, calibration: list[dict], *,
                  target_ratio: float | None = None) -> chrpo.RewardInputs:
    """RewardInputs [N] from the verdicts and each row's calibration (``calibration[g]``).

    ``target_ratio`` (the LCPO rewards): every question with a reference length gets
    this target ratio instead of its target level."""
    rows = [calibration[g] for g in batch.group_ids]
    think = np.array([j.think_length for j in batch.judged], np.float32)
    ref = np.array([r["ref_len"] or 0 for r in rows], np.float32)
    if target_ratio is None:
        target = np.array([(r["target"] or 0) / 100 for r in rows], np.float32)
        has_target = [r["target"] is not None for r in rows]
    else:
        target = np.full(len(rows), target_ratio, np.float32)
        has_target = list(ref > 0)
    return chrpo.RewardInputs(
        valid=jnp.asarray([j.valid for j in batch.judged]),
        correct=jnp.asarray([j.correct for j in batch.judged]),
        level=jnp.asarray([(j.level or 0) / 100 for j in batch.judged], jnp.float32),
        ratio=chrpo.realized_ratio(jnp.asarray(think), jnp.asarray(ref)),
        target=jnp.asarray(target),
        has_target=jnp.asarray(has_target))


def make_rl_loss(config: chrpo.ChrpoConfig):
    """``loss_fn(model, batch, rng)`` for make_train_step: chrpo.policy_loss on one mini-batch."""
    loss_kwargs = dataclasses.asdict(config.loss)

    def loss_fn(model, batch, rng):
        del rng
        logp = completion_logprobs(model, batch["prompt_ids"], batch["prompt_mask"],
                                   batch["completion_ids"], batch["completion_mask"])
        out = chrpo.policy_loss(logp, batch["old_logp"], batch["advantages"],
                                batch["completion_mask"], ref_logp=batch["ref_logp"],
                                **loss_kwargs)
        return out.loss_sum, out.denominator, out.metrics

    return loss_fn


def pad_minibatch(batch: dict, multiple: int) -> dict:
    """``batch`` with rows appended up to a multiple of ``multiple`` (mesh row shards).

    An appended row has an all-False ``completion_mask`` (and prompt mask, zero
    ids, log-probs and advantage). ``chrpo.policy_loss`` zeroes every masked
    token, and each aggregation counts only tokens or non-empty rows, so
    (loss_sum, denominator), the masked-mean metrics and the gradient (the
    masked logits are finite: the model masks with finfo.min, not -inf) are
    those of ``batch``; tests/extra_cot/test_rl_mesh.py checks all three
    aggregations.
    """
    return sharding.pad_rows(batch, multiple)


def _step_metrics(batch: RolloutGroups, inputs: chrpo.RewardInputs, adv_metrics: dict,
                  updates: list[dict]) -> dict:
    policy = batch.local_ids == 0
    judged = [j for j, p in zip(batch.judged, policy) if p]
    ratio = np.asarray(inputs.ratio)[policy & np.asarray(inputs.has_target)]
    out = {k: float(v) for k, v in adv_metrics.items()}
    out["accuracy"] = float(np.mean([j.correct for j in judged]))
    out["valid"] = float(np.mean([j.valid for j in judged]))
    out["ratio_policy"] = float(ratio.mean()) if ratio.size else float("nan")
    out["think_tokens"] = float(np.mean([j.think_length for j in judged]))
    for level in (*LEVELS, None):
        out[f"control/{level or 'none'}"] = float(np.mean([j.level == level for j in judged]))
    for key in ("kl", "approx_kl", "clip_high_fraction", "clip_low_fraction", "loss",
                "grad_norm", "skipped"):
        values = [float(u[key]) for u in updates if key in u]
        if values:
            out[f"update/{key}"] = float(np.mean(values))
    return out


def _init_state(config, model, optimizer):
    pid = config.rl.get("budget_controller", "dual") == "pid"
    extra = {"lagrange": chrpo.init_pid_lagrange() if pid else chrpo.init_lagrange(),
             "rl_step": jnp.zeros((), jnp.int32),
             "position": jnp.zeros((), jnp.int32),
             "rollout_key": jax.random.key(config.seed + 1)}
    return create_train_state(model, optimizer, rng=config.seed, extra=extra)


def _advantages(batch: RolloutGroups, inputs: chrpo.RewardInputs, *, num_local: int,
                multiplier, objective: chrpo.ChrpoConfig):
    """chrpo.compute_advantages over the prompt groups and their level subgroups."""
    groups = jnp.asarray(batch.group_ids)
    num_groups = int(batch.group_ids.max()) + 1
    return chrpo.compute_advantages(
        inputs, groups, num_groups=num_groups,
        subgroup_ids=chrpo.nested_ids(groups, jnp.asarray(batch.local_ids), num_local=num_local),
        num_subgroups=num_groups * num_local, lagrange_multiplier=multiplier, config=objective)


def _optimise(state, train_step, arrays: dict, *, passes: int, minibatches: int,
              rng: np.random.Generator, max_skips: int, mesh, num_microbatches: int = 1):
    """``passes`` shuffled passes of ``minibatches`` updates; returns (state, metrics list).

    Each mini-batch is padded to a multiple of the mesh's row shards times
    ``num_microbatches`` (the train step's gradient accumulation) and split over
    the mesh. Stops with NonFiniteError after ``max_skips`` non-finite updates in
    a row."""
    rows, updates = len(arrays["advantages"]), []
    ways = sharding.batch_ways(mesh) * num_microbatches
    for _ in range(passes):
        for chunk in np.split(rng.permutation(rows), minibatches):
            batch = pad_minibatch({k: v[chunk] for k, v in arrays.items()}, ways)
            state, metrics = train_step(state, sharding.shard_batch(batch, mesh,
                                                                    process_local=False))
            check_finite_updates(metrics, step=int(state.step), name="rl",
                                 max_consecutive=max_skips)
            updates.append(metrics)
    return state, jax.device_get(updates)


def _dual_step(extra: dict, inputs: chrpo.RewardInputs, policy_rows: np.ndarray, block) -> dict:
    """The multiplier's step on the policy rollouts' mean realized ratio (when rl.budget):
    projected dual ascent ('dual') or the PID Lagrangian ('pid', rl.pid's gains)."""
    if block.budget is None:
        return extra
    mask = chrpo.budget_mask(inputs.valid, inputs.has_target, jnp.asarray(policy_rows))
    if block.get("budget_controller", "dual") == "pid":
        lagrange = chrpo.update_pid_lagrange(
            extra["lagrange"], inputs.ratio, mask, budget=block.budget, kp=block.pid.kp,
            ki=block.pid.ki, kd=block.pid.kd, integral_limit=block.pid.integral_limit,
            two_sided=block.get("budget_two_sided", False))
    else:
        lagrange = chrpo.update_lagrange(extra["lagrange"], inputs.ratio, mask,
                                         budget=block.budget, step_size=block.lagrange_step_size)
    return {**extra, "lagrange": lagrange}


def _log_memory(state, shardings, model_config, mesh, block, prompt_width: int,
                num_microbatches: int) -> None:
    """Per-device memory of one update (a mini-batch) and of the rollouts' KV cache."""
    rows = block.prompts_per_step * (block.policy_samples
                                     + len(block.forced_levels) * block.forced_samples)
    ways = sharding.batch_ways(mesh) * num_microbatches
    per_update = -(-(rows // block.minibatches) // ways) * ways      # padded mini-batch
    length = prompt_width + block.max_new_tokens + 1                   # + forced control
    estimate = sharding_memory.estimate_memory(state, shardings, model_config, mesh,
                                               batch_size=per_update, seq_len=length,
                                               num_microbatches=num_microbatches,
                                               sample_batch=rows, sample_length=length)
    log.info("rl: %s", sharding_memory.format_memory(estimate, mesh_shape=dict(mesh.shape)))


def plot_budget_trace(metrics_path: str, out_path: str, *, budget: float) -> str:
    """``rl/budget.png``: the policy rollouts' mean ratio against the budget, and the
    multiplier, per RL step (from ``metrics.jsonl``)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in rundir.read_jsonl(metrics_path) if "lambda" in r]
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True)
    top.plot(steps, [r["ratio_policy"] for r in rows], "o-", label="batch mean ratio")
    top.axhline(budget, color="k", linestyle="--", label=f"budget {budget:g}")
    top.set_ylabel("realized ratio")
    top.legend(fontsize=8)
    bottom.plot(steps, [r["lambda"] for r in rows], "s-", color="C1")
    bottom.axhline(0.0, color="k", linewidth=0.5)
    bottom.set_ylabel("multiplier lambda")
    bottom.set_xlabel("RL step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def rl(config, run: rundir.Run) -> dict:
    """The CHRPO stage: train the policy-mode model, export it to ``rl/model``."""
    block, tok = config.rl, run.tokenizer()
    stage_dir = run.stage_dir("rl")
    objective = chrpo_config(block)
    questions = read_questions(run.path("data", "rl.jsonl"))
    rows = rundir.read_jsonl(run.path("calibrate", "calibration.jsonl"))
    targets = policy_targets(config, rows)        # the paper's, or the budget's allocation
    by_uid = {r["uid"]: {**r, "target": t} for r, t in zip(rows, targets)}
    calibration = [by_uid[q.uid] for q in questions]
    lcpo = objective.reward.kind in ("lcpo-exact", "lcpo-max")
    mesh = run.mesh(config)
    policy = rundir.load_model(run.path(block.init))
    ref_graphdef, ref_state = nnx.split(rundir.load_model(run.path(block.init)))   # frozen
    reference = (ref_graphdef, sharding.place_state(ref_state, mesh)[0])
    optim = ml_collections.ConfigDict(block.optim.to_dict())
    optim.total_steps = block.steps * block.passes * block.minibatches
    optimizer, schedule = make_optimizer(optim, name="rl.optim")
    graphdef, state = _init_state(config, policy, optimizer)
    state, shardings = sharding.place_state(state, mesh)
    micro = config.get("microbatches")
    micro = micro.rl if micro is not None else 1
    train_step = sharding.jit_train_step(make_train_step(graphdef, make_rl_loss(objective),
                                                         optimizer, schedule=schedule,
                                                         num_microbatches=micro), shardings)
    manager = CheckpointManager(os.path.join(stage_dir, "checkpoints"), max_to_keep=2,
                                save_interval_steps=block.checkpoint_every)
    if manager.latest_step() is not None:
        _, state, _ = manager.restore(target=abstract_tree(state, shardings))
    start = int(state.extra["rl_step"])
    prompt_width = bucket_width(max(len(build_prompt(tok, q.question, control="policy"))
                                    for q in questions) + 1, 32)
    _log_memory(state, shardings, policy.config, mesh, block, prompt_width, micro)
    timer, last = Timer(), {}
    with MetricWriter(stage_dir, resume_step=start) as writer, \
            Progress(block.steps, initial=start, desc="rl") as bar:
        for step in range(start, block.steps):
            picked = prompt_order(len(questions), step, block.prompts_per_step, seed=config.seed)
            model = merge_model(graphdef, state)
            with timer.phase("rollout"):
                batch = rollout_groups(
                    model, tok, [questions[i] for i in picked],
                    policy_samples=block.policy_samples, forced_levels=block.forced_levels,
                    forced_samples=block.forced_samples, max_new_tokens=block.max_new_tokens,
                    temperature=block.temperature, prompt_width=prompt_width,
                    key=jax.random.fold_in(state.extra["rollout_key"], step),
                    completion_bucket=block.completion_bucket)
            inputs = reward_inputs(batch, [calibration[i] for i in picked],
                                   target_ratio=block.budget if lcpo else None)
            advantages, adv_metrics = _advantages(
                batch, inputs, num_local=1 + len(block.forced_levels), objective=objective,
                multiplier=state.extra["lagrange"].multiplier)
            tensors = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                       batch.completion_mask)
            with timer.phase("score") as t:
                old_logp = t.block(score(*nnx.split(model), *tensors))
                ref_logp = t.block(score(*reference, *tensors))
            old_logp, ref_logp, advantages = sharding.to_host((old_logp, ref_logp, advantages))
            arrays = dict(zip(("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"),
                              tensors), old_logp=old_logp, ref_logp=ref_logp,
                          advantages=advantages)
            with timer.phase("update"):
                state, updates = _optimise(state, train_step, arrays, passes=block.passes,
                                           minibatches=block.minibatches,
                                           max_skips=block.max_consecutive_skips, mesh=mesh,
                                           num_microbatches=micro,
                                           rng=np.random.default_rng([config.seed, 11, step]))
            extra = _dual_step(dict(state.extra), inputs, batch.local_ids == 0, block)
            extra["rl_step"] = jnp.asarray(step + 1, jnp.int32)
            extra["position"] = jnp.asarray((step + 1) * block.prompts_per_step, jnp.int32)
            # the host-made extras go back onto the state's (replicated) shardings
            state = sharding.put_global(state.replace(extra=extra), shardings)
            last = {**_step_metrics(batch, inputs, adv_metrics, updates), **timer.pop(),
                    "lambda": float(extra["lagrange"].multiplier)}
            writer.write(step + 1, last)
            bar.update(metrics={"acc": last["accuracy"], "ratio": last["ratio_policy"],
                                "reward": last["reward_mean"]})
            manager.save(step + 1, state, {"position": int(extra["position"])})
        manager.save(block.steps, state, {"position": int(state.extra["position"])}, force=True)
    manager.close()
    if block.budget is not None and sharding.is_main_process():
        plot_budget_trace(os.path.join(stage_dir, "metrics.jsonl"),
                          os.path.join(stage_dir, "budget.png"), budget=block.budget)
    require_applied_updates(state, name="rl")
    rundir.export_model(merge_model(graphdef, state), stage_dir)
    return {"steps": block.steps, **{f"last/{k}": v for k, v in last.items()}}


STAGES = {"rl": rl}
