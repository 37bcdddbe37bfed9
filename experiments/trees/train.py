"""One tree-lab run: data, model, training with periodic evaluation and attention
probes, Orbax checkpoints (resumable), and a ``results.json`` summary.

``train_run(config, run_dir)`` is the whole recipe; ``experiments/trees/lab.py``
calls it once per run of an exercise. Everything is a pure function of the
config and its seed: the batch of step t is drawn by ``default_rng((seed, t))``,
so a resumed run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import cli, run_config
from experiments.trees import encoding as D
from experiments.trees import model as M
from experiments.trees import problems as T
from experiments.trees import roles as R
from models import training
from models.loop import train_loop
from models.metrics import read_metrics
from models.optim import make_optimizer

__all__ = ["samplers", "build_data", "train_run", "RESULTS_FILE", "ATTENTION_FILE"]

log = logging.getLogger(__name__)
RESULTS_FILE, ATTENTION_FILE = "results.json", "attention.npz"
_BATCH_KEYS = ("tokens", "aux", "positions", "attention_mask", "loss_mask", "targets",
               "target_start", "target_len", "stage")
_CHUNK = 256


def samplers(data: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any]]:
    """(train sampler, {test set name: sampler}) from a ``data`` block.

    Test sets: ``train_dist`` (the training distribution; its trees are excluded
    from training) and ``paper`` (the paper's test distribution: random trees
    with 0-3 children per node, ``min_nodes..max_nodes`` nodes, no distractors).
    """
    common = dict(num_labels=data.num_labels, distractor_nodes=data.distractor_nodes,
                  noise_edges=data.noise_edges)
    train = T.problem_sampler(data.kind, min_nodes=data.min_nodes, max_nodes=data.max_nodes,
                              depth=data.depth, max_children=data.max_children,
                              max_depth=data.max_depth or None, **common)
    paper = T.problem_sampler("branching", num_labels=data.num_labels, min_nodes=data.min_nodes,
                              max_nodes=min(data.max_nodes, 32), max_children=3)
    known = {"train_dist": train, "paper": paper}
    unknown = sorted(set(data.test_sets) - set(known))
    if unknown:
        raise ValueError(f"data.test_sets: unknown {unknown}; known {sorted(known)}")
    return train, {name: known[name] for name in data.test_sets}


def build_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Splits and encoded batches: {'vocab', 'seq_len', 'train', 'tests', 'kept_ratio'};
    ``train``/``tests[key]`` are dicts of numpy arrays (``lab_batch``).

    With ``task.levels`` (mixed-level training) every training problem appears
    once per level, and each test set is encoded per level as ``'<name>@k<k>'``;
    ``kept_ratio`` is then ``{'k<k>': ratio}``, else a float.
    """
    data, task, mc = config.data, config.task.name, config.model
    vocab = T.TreeVocab(num_labels=data.num_labels, edge_separator=mc.edge_separator)
    train_sampler, test_samplers = samplers(data)
    train, tests = D.make_splits(seed=config.seed, train_size=data.train_size,
                                 test_size=data.test_size, train_sampler=train_sampler,
                                 test_samplers=test_samplers)
    levels = tuple(config.task.levels)
    if levels:
        variants = [(f"@k{k}", D.keep_fn(keep_every=k), k) for k in levels]
    else:
        variants = [("", D.keep_fn(keep_every=config.task.keep_every,
                                   keep_ratio=config.task.keep_ratio), None)]
    everything = train + [p for ps in tests.values() for p in ps]
    seq_len = max(D.max_seq_len(everything, vocab=vocab, task=task, layout=mc.layout, keep=keep)
                  for _, keep, _ in variants)
    seq_len = 8 * -(-seq_len // 8)
    if data.seq_len:
        if data.seq_len < seq_len:
            raise cli.ConfigError(f"config key 'data.seq_len' = {data.seq_len}: the data need "
                                  f"{seq_len} positions")
        seq_len = data.seq_len

    def enc(problems, keep, level):
        return D.lab_batch(problems, vocab=vocab, task=task, seq_len=seq_len, layout=mc.layout,
                           positions=mc.positions, keep=keep, level=level)

    parts = [enc(train, keep, level) for _, keep, level in variants]
    kept = {suffix[1:]: float(np.mean([len(keep(T.backward_chain(p))) / len(p.path)
                                       if keep else 1.0 for p in everything]))
            for suffix, keep, _ in variants}
    return {"vocab": vocab, "seq_len": seq_len,
            "train": {k: np.concatenate([part[k] for part in parts]) for k in parts[0]},
            "tests": {name + suffix: enc(ps, keep, level) for name, ps in tests.items()
                      for suffix, keep, level in variants},
            "kept_ratio": kept if levels else kept[""]}


def _rows(batch: dict, idx) -> dict:
    return {k: batch[k][idx] for k in _BATCH_KEYS}


def _evaluate(eval_fn, params, rest, batch: dict, limit: int | None = None,
              by_kind: bool = False) -> dict[str, Any]:
    """Exact / chain / answer accuracy and loss over ``batch`` (first ``limit`` rows),
    in chunks of min(256, rows of ``batch``) so one compiled function serves
    every set of at least 256 rows (small CI sets compile one smaller shape).
    ``by_kind`` adds token accuracy per step kind (``pathfinding_roles.STEP_KINDS``)."""
    n = len(batch["tokens"]) if limit is None else min(limit, len(batch["tokens"]))
    chunk = min(_CHUNK, len(batch["tokens"]))
    sums = {"exact": 0.0, "chain_ok": 0.0, "answer_ok": 0.0, "loss": 0.0}
    right, count = np.zeros(len(R.STEP_KINDS)), np.zeros(len(R.STEP_KINDS))
    for lo in range(0, n, chunk):
        idx = np.arange(lo, lo + chunk) % len(batch["tokens"])
        rows = _rows(batch, idx)
        out = jax.device_get(eval_fn(params, rest, rows))
        valid = min(chunk, n - lo)
        for k in ("exact", "chain_ok", "answer_ok"):
            sums[k] += float(np.sum(out[k][:valid]))
        sums["loss"] += float(out["loss"]) * valid
        if by_kind:
            kinds = R.step_kinds({k: v[:valid] for k, v in rows.items()})
            for j in range(len(R.STEP_KINDS)):
                right[j] += out["correct"][:valid][kinds == j].sum()
                count[j] += (kinds == j).sum()
    result: dict[str, Any] = {k: v / n for k, v in sums.items()}
    if by_kind:
        result["by_kind"] = {name: (right[j] / count[j] if count[j] else None)
                             for j, name in enumerate(R.STEP_KINDS)}
    return result


def _probe(attn_fn, params, rest, probe: dict, roles: np.ndarray, kinds: np.ndarray):
    """Role masses [L][H, K, R] and per-layer SI on the probe batch."""
    probs = jax.device_get(attn_fn(params, rest, probe))
    masses = [R.role_masses(np.asarray(p), roles, kinds) for p in probs]
    return masses, [R.specialisation_index(m) for m in masses]


def _probe_metrics(masses: list[np.ndarray], si: list[float]) -> dict[str, float]:
    out = {}
    for layer, (m, s) in enumerate(zip(masses, si)):
        out[f"probe/si_l{layer}"] = s
        for name, cell in R.head_roles(m).items():
            for h, v in enumerate(cell["per_head"]):
                out[f"probe/{name}_l{layer}_h{h}"] = v
    return out


_COMPILED: dict = {}


def compiled_functions(model_config, *, paired: bool,
                       optim: ml_collections.ConfigDict) -> dict[str, Any]:
    """Jitted ``init(key) -> TrainState``, ``step``, ``evaluate`` and ``attention``,
    shared by every run (in this process) with the same model and optimiser
    settings: ``jax.jit`` caches compilations per function object and shape."""
    key = (model_config, paired, json.dumps(run_config.to_json_dict(optim), sort_keys=True))
    if key in _COMPILED:
        return _COMPILED[key]
    optimizer, schedule = make_optimizer(optim, name="train.optim")
    make = lambda rngs: M.PathModel(model_config, paired=paired, rngs=rngs)  # noqa: E731
    graphdef = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param, ...)[0]
    merge = lambda p, r: nnx.merge(graphdef, p, r)  # noqa: E731

    def evaluate(p, r, b):
        return M.teacher_forced_eval(merge(p, r), b)

    _COMPILED[key] = {
        "graphdef": graphdef,
        "init": jax.jit(lambda k: training.create_train_state(
            make(nnx.Rngs(k)), optimizer, rng=k)[1]),
        "step": jax.jit(training.make_train_step(graphdef, M.lm_loss, optimizer,
                                                 schedule=schedule), donate_argnums=0),
        "evaluate": jax.jit(evaluate),
        "attention": jax.jit(lambda p, r, b: M.attention_maps(merge(p, r), b)),
    }
    return _COMPILED[key]


def batch_indices(seed: int, step: int, *, rows: int, blocks: int, batch_size: int,
                  first_level_steps: int = 0) -> np.ndarray:
    """Training rows of step ``step``: ``batch_size`` uniform draws (a pure function of
    (seed, step), so a resumed run sees the same batches).

    Mixed-level data holds ``blocks`` equal blocks of rows, one per level of
    ``task.levels``, the first level first. While ``step < first_level_steps`` the
    rows come from the first block only: a warm-up on the full chain before the
    mixed levels, as Extra-CoT's mixed-ratio SFT starts from the full-CoT model.
    """
    high = rows // blocks if step < first_level_steps else rows
    return np.random.default_rng((seed, step)).integers(0, high, batch_size)


def _train_loop(config, run_dir: str, data: dict, fns: dict, state, probe: dict,
                roles: np.ndarray, kinds: np.ndarray, *, quiet: bool):
    """``models.loop.train_loop`` from the last checkpoint (if any) to ``train.steps``,
    recording the loss every ``log_every`` steps and the accuracies and attention
    probes every ``eval_every``; returns (state, first step, seconds)."""
    tc = config.train
    eval_fn, attn_fn = fns["evaluate"], fns["attention"]
    train, n_train = data["train"], len(data["train"]["tokens"])
    blocks = max(len(config.task.levels), 1)
    train_eval = _rows(train, np.arange(min(tc.eval_train_size, n_train)))

    def batch_fn(step: int):
        idx = batch_indices(config.seed, step, rows=n_train, blocks=blocks,
                            batch_size=tc.batch_size, first_level_steps=tc.first_level_steps)
        return {k: jnp.asarray(v) for k, v in _rows(train, idx).items()}, 0

    def record(done: int, state, metrics) -> dict:
        row = {}
        if done % tc.log_every == 0 or done == tc.steps:
            row.update({k: metrics[k] for k in ("loss", "grad_norm", "learning_rate")})
        if done % tc.eval_every == 0 or done == tc.steps:
            p, r = state.params, state.non_trainable
            row.update({f"train/{k}": v for k, v in _evaluate(eval_fn, p, r, train_eval).items()})
            for name, batch in data["tests"].items():
                acc = _evaluate(eval_fn, p, r, batch, limit=tc.eval_test_size)
                row.update({f"{name}/{k}": v for k, v in acc.items()})
            row.update(_probe_metrics(*_probe(attn_fn, p, r, probe, roles, kinds)))
        return row

    result = train_loop(state, fns["step"], batch_fn, steps=tc.steps, directory=run_dir,
                        checkpoint_every=tc.checkpoint_every, record=record, max_to_keep=1,
                        desc=config.name, bar_keys={"loss": "loss", "train/exact": "train/exact"},
                        loss_key="loss", name=run_dir, quiet=quiet, tensorboard=tc.tensorboard)
    return result.state, result.start, result.seconds


def train_run(config: ml_collections.ConfigDict, run_dir: str, *, quiet: bool = False
              ) -> dict[str, Any]:
    """Train and evaluate one configuration; returns (and writes) ``results.json``.

    A finished run (``results.json`` present, same config up to the keys that name
    the sweep it belongs to) is loaded, not redone; an interrupted one resumes from
    its last checkpoint.
    """
    os.makedirs(run_dir, exist_ok=True)
    # The sweep a run belongs to (its name, runs, output paths, verbosity) does not change
    # what it trains, so a finished run is reused by any exercise that lists it.
    run_config.write_run_config(config, run_dir, resumable=("name", "exercise", "runs", "run_dir",
                                                      "figures_dir", "quiet"))
    results_path = os.path.join(run_dir, RESULTS_FILE)
    if os.path.exists(results_path):
        with open(results_path) as f:
            return json.load(f)
    t0 = time.time()
    data = build_data(config)
    vocab, tc, mc = data["vocab"], config.train, config.model
    model_config = M.lab_model_config(
        vocab_size=D.lab_vocab_size(vocab, levels=bool(config.task.levels)),
        layers=mc.layers, heads=mc.heads,
        kv_heads=mc.kv_heads or None, hidden=mc.hidden, mlp=mc.mlp, rope_theta=mc.rope_theta,
        init_std=mc.init_std)
    fns = compiled_functions(model_config, paired=mc.layout == "paired", optim=tc.optim)
    state = fns["init"](jax.random.key(config.seed))
    probe_set = next(iter(data["tests"].values()))
    probe = _rows(probe_set, np.arange(min(tc.probe_size, len(probe_set["tokens"]))))
    width = 1 if mc.layout == "paired" else (3 if mc.edge_separator else 2)
    roles = R.role_masks(probe, stage_id=vocab.STAGE, layout=mc.layout, width=width)
    kinds = R.step_kinds(probe)
    state, start, train_seconds = _train_loop(config, run_dir, data, fns, state, probe,
                                              roles, kinds, quiet=quiet)

    # Final analysis: full test sets, accuracy by step kind, head ablations, role masses.
    eval_fn, attn_fn, p, r = fns["evaluate"], fns["attention"], state.params, state.non_trainable
    train_eval = _rows(data["train"], np.arange(min(tc.eval_train_size,
                                                    len(data["train"]["tokens"]))))
    final = {name: _evaluate(eval_fn, p, r, batch, by_kind=True)
             for name, batch in data["tests"].items()}
    final["train"] = _evaluate(eval_fn, p, r, train_eval, by_kind=True)
    ablation = [[{name: _evaluate(eval_fn, M.ablate_head(p, layer=layer, head=h), r, batch,
                                  limit=tc.eval_test_size, by_kind=True)
                  for name, batch in data["tests"].items()}
                 for h in range(mc.heads)] for layer in range(mc.layers)]
    masses, si = _probe(attn_fn, p, r, probe, roles, kinds)
    history = read_metrics(run_dir)
    reach = [rec["step"] for rec in history
             if (rec.get("train/exact") or 0.0) >= tc.converged_at]
    plot_rows = _rows(probe, np.arange(min(tc.plot_examples, len(probe["tokens"]))))
    probs = jax.device_get(attn_fn(p, r, plot_rows))
    n_plot = len(plot_rows["tokens"])
    np.savez(os.path.join(run_dir, ATTENTION_FILE),
             probs=np.stack([np.asarray(x) for x in probs]), roles=roles[:n_plot],
             kinds=kinds[:n_plot], **{k: np.asarray(v) for k, v in plot_rows.items()})
    results = {
        "name": config.name, "task": config.task.name, "layers": mc.layers, "heads": mc.heads,
        "layout": mc.layout, "positions": mc.positions, "steps": tc.steps,
        "keep_every": config.task.keep_every, "keep_ratio": config.task.keep_ratio,
        "levels": list(config.task.levels),
        "kept_ratio": data["kept_ratio"], "seq_len": data["seq_len"],
        "final": final, "ablation": ablation, "steps_to_converge": reach[0] if reach else None,
        "converged_at": tc.converged_at,
        "masses": [m.tolist() for m in masses], "si": si,
        "head_roles": [R.head_roles(m) for m in masses],
        "train_seconds": train_seconds if start == 0 else None,
        "seconds_per_step": train_seconds / max(tc.steps - start, 1),
        "wall_seconds": time.time() - t0,
        "history": history,
    }
    results = _finite(results)
    with open(results_path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    os.replace(results_path + ".tmp", results_path)
    return results


def _finite(value):
    """The same structure with NaN/inf floats (absent step kinds) as None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
