"""Tree path-finding lab: one-layer multi-head transformers, chain of thought,
head specialisation, chain compression (docs/trees.md).

    python -m experiments.trees.lab --config=experiments/trees/config.py:ex1 \
        --config.figures_dir=docs/figures/trees

An exercise is a base config plus a list of runs (``config.runs``, each a string
of ``key=value`` overrides). Each run trains in ``<run_dir>/<name>/``
(``experiments/trees/train.py``: checkpoints, metrics.jsonl, TensorBoard,
results.json, attention.npz); then this script writes ``summary.md`` /
``summary.json`` and the exercise's plots.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import ml_collections
import numpy as np

from experiments import cli, rundir
from experiments.trees import config as pathfinding_config
from experiments.trees import plots as P
from experiments.trees.problems import TreeVocab
from experiments.trees.train import ATTENTION_FILE, train_run

__all__ = ["run_configs", "summary_rows", "markdown_table", "main"]

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "experiments/trees/config.py:ex1"


def run_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """One validated config per entry of ``config.runs`` (base + its overrides)."""
    out, names = [], set()
    for i, spec in enumerate(config.runs):
        run = copy.deepcopy(config)
        run.unlock()
        for item in spec.split():
            key, eq, value = item.partition("=")
            if not eq:
                raise cli.ConfigError(f"config key 'runs' entry {i}: {item!r} is not key=value")
            cli.apply_override(run, key, value)
        pathfinding_config.validate(run)
        if run.name in names:
            raise cli.ConfigError(f"config key 'runs': duplicate run name {run.name!r}")
        names.add(run.name)
        run.lock()
        out.append(run)
    return out


def _acc(res: dict, split: str) -> float | None:
    return (res["final"].get(split) or {}).get("exact")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _role(res: dict, name: str) -> str:
    cell = (res["head_roles"][0] or {}).get(name)
    return "-" if cell is None else f"h{cell['head']} ({cell['mass']:.2f})"


def _ablation(res: dict, split: str = "train_dist") -> str:
    """Exact match with each head of layer 0 silenced, e.g. 'h0 0.01, h1 1.00'."""
    cells = res.get("ablation") or [[]]
    if len(cells[0]) < 2:
        return "-"
    return ", ".join(f"h{h} {c[split]['exact']:.2f}" for h, c in enumerate(cells[0]))


def summary_rows(exercise: str, results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the exercise's table; every number comes from results.json."""
    if exercise in pathfinding_config.LEVEL_EXERCISES:
        header = ["run", "layers", "level k", "kept ratio", "train", "unseen (train dist)",
                  "paper (0-3 children)", "chain ok (train dist)", "answer ok (train dist)"]
        rows = []
        for n, r in results.items():
            for k in r["levels"]:
                rows.append([n, r["layers"], k, r["kept_ratio"][f"k{k}"], _acc(r, "train"),
                             _acc(r, f"train_dist@k{k}"), _acc(r, f"paper@k{k}"),
                             r["final"][f"train_dist@k{k}"]["chain_ok"],
                             r["final"][f"train_dist@k{k}"]["answer_ok"]])
    else:
        header = ["run", "task", "layers", "heads", "train", "unseen (train dist)",
                  "paper (0-3 children)", f"steps to {results_any(results)}% train", "SI",
                  "lookup head", "reversal head", "switch head", "head ablated", "s/step"]
        rows = [[n, r["task"], r["layers"], r["heads"], _acc(r, "train"),
                 _acc(r, "train_dist"), _acc(r, "paper"), r["steps_to_converge"],
                 r["si"][0], _role(r, "lookup"), _role(r, "reversal"), _role(r, "switch"),
                 _ablation(r), r["seconds_per_step"]] for n, r in results.items()]
    return header, [[_fmt(v) for v in row] for row in rows]


def results_any(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    return f"{100 * first['converged_at']:g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table (one line per row, trailing newline) of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _plots(config, runs: list, results: dict[str, dict], figures: str) -> list[str]:
    """The exercise's figures; returns their paths."""
    ex, made = config.exercise, []

    def path(name):
        made.append(os.path.join(figures, f"{ex}_{name}.png"))
        return made[-1]

    if ex == "depth4":
        P.plot_accuracy_curves(results, path("train_curves"), key="train/exact",
                               title="4 layers, levels 1-4: level-1 train exact match")
        P.plot_accuracy_curves(results, path("test_curves"), key="train_dist@k1/exact",
                               title="4 layers, levels 1-4: level-1 unseen-tree exact match")
        return made
    if ex in pathfinding_config.LEVEL_EXERCISES:
        points: dict[int, list] = {}
        for r in results.values():
            points[r["layers"]] = [(r["kept_ratio"][f"k{k}"], _acc(r, f"train_dist@k{k}"))
                                   for k in r["levels"]]
        P.plot_compression(points, path("accuracy_vs_kept_ratio"),
                           title="forward with a compressed chain (keep every k-th node)")
        for r in results.values():
            P.plot_training(r, path(f"{r['name']}_training"),
                            title=f"{r['name']}: {r['layers']} layer(s), levels {r['levels']}")
        return made
    if ex == "init":
        P.plot_accuracy_curves(results, path("train_curves"), key="train/exact",
                               title="backward, 1 layer, 1 head: init std x seed")
        return made
    if ex == "ex2":
        P.plot_accuracy_curves(results, path("train_curves"), key="train/exact",
                               title="train exact match: forward with / without chain")
        P.plot_accuracy_curves(results, path("test_curves"), key="train_dist/exact",
                               title="unseen-tree exact match: forward with / without chain")
    for run in runs:
        res = results[run.name]
        label = f"{run.name}: {res['task']}, {res['layers']} layer(s), {res['heads']} head(s)"
        P.plot_training(res, path(f"{run.name}_training"), title=label)
        if ex == "ex2" and not run.name.endswith("s0"):
            continue
        P.plot_role_masses(res["masses"], path(f"{run.name}_roles"), title=label)
        vocab = TreeVocab(num_labels=run.data.num_labels)
        with np.load(os.path.join(config.run_dir, run.name, ATTENTION_FILE),
                     allow_pickle=False) as f:
            att = {k: f[k] for k in f.files}
        for e in range(len(att["tokens"])):
            P.plot_attention(att, vocab, path(f"{run.name}_attention_{e}"), example=e,
                             title=label)
    return made


def main(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Train every run of the exercise, then write summary.md/json and plots."""
    runs = run_configs(config)
    os.makedirs(config.run_dir, exist_ok=True)
    results = {}
    for run in runs:
        log.info("run %s -> %s", run.name, os.path.join(config.run_dir, run.name))
        results[run.name] = train_run(run, os.path.join(config.run_dir, run.name),
                                      quiet=config.quiet)
    figures = config.figures_dir or os.path.join(config.run_dir, "figures")
    made = _plots(config, runs, results, figures)
    header, rows = summary_rows(config.exercise, results)
    table = markdown_table(header, rows)
    with open(os.path.join(config.run_dir, "summary.md"), "w") as f:
        f.write(table)
    summary = {"exercise": config.exercise, "header": header, "rows": rows, "figures": made,
               "runs": {n: {k: v for k, v in r.items() if k != "history"}
                        for n, r in results.items()}}
    with open(os.path.join(config.run_dir, "summary.json"), "w") as f:
        json.dump(rundir.strict_json(summary), f, indent=1, allow_nan=False)
    print(table)
    return summary


if __name__ == "__main__":
    cli.run(main, default=DEFAULT_CONFIG)
