"""Tree path-finding lab (experiments/trees/lab.py; docs/trees.md).

    python -m experiments.trees.lab --config=experiments/trees/config.py:ex1
    ... :ex2 | :ex3 | :compression | :compression_full | :depth4 | :init | :representation
    (add _ci, e.g. :ex1_ci, for the CI-sized run)

One config = a base run plus ``runs``: each entry is a space-separated list of
``key=value`` overrides of the base (parsed like ``--config.key=value``), so an
exercise is a small sweep. Defaults are sized for 2 CPU cores (minutes each).
"""
import ml_collections

from experiments import cli
from experiments.trees.encoding import MAX_LEVEL
from models.optim import default_optimizer_config

EXERCISES = ("ex1", "ex2", "ex3", "compression", "compression_full", "depth4", "init",
             "representation")
LEVEL_EXERCISES = ("compression", "compression_full", "depth4")  # mixed-level training
# The ':depth4' sweep (4 layers; overrides of the lab's 1-layer settings) and the one of
# its settings that ':compression_full' uses for its 4-layer run. None of them trained
# 4 layers (docs/trees.md), so the full sweep keeps the lab's settings ('base').
_DEPTH4 = {"lr3e-3": "train.optim.learning_rate=3e-3",
           "std02": "model.init_std=0.02",
           "base": "",
           "rope_edge_set": "model.positions=edge_set"}
L4_SETTING = "base"
_RUNS = {
    "ex1": ("name=backward_h1 task.name=backward model.heads=1",
            "name=forward_cot_h2 task.name=forward_cot model.heads=2",
            "name=forward_cot_h1 task.name=forward_cot model.heads=1",
            "name=forward_cot_h4 task.name=forward_cot model.heads=4"),
    "ex2": ("name=cot_s0 task.name=forward_cot seed=0", "name=no_cot_s0 task.name=forward seed=0",
            "name=cot_s1 task.name=forward_cot seed=1", "name=no_cot_s1 task.name=forward seed=1"),
    "ex3": ("name=deep data.kind=branching data.max_children=2 data.min_nodes=16 "
            "data.max_nodes=48 data.num_labels=64",
            "name=bushy data.kind=branching data.max_children=5 data.min_nodes=16 "
            "data.max_nodes=48 data.num_labels=64",
            "name=distractors data.distractor_nodes=16 data.noise_edges=8 data.num_labels=96",
            "name=sort_cot task.name=sort_cot",
            "name=sort task.name=sort"),
    # One model per depth, trained on every level at once (task.levels, set below).
    # Default: 1, 2 and 4 layers, levels (1, 2), 1,000 steps (minutes); 4 layers train only
    # after a warm-up on the full chain (300 steps of level 1; without it they stay near
    # zero, docs/trees.md). ':compression_full': 1, 2, 4 layers (4 with L4_SETTING of
    # ':depth4') on levels 1-4, 2,000 steps, no warm-up.
    "compression": ("name=l1 model.layers=1", "name=l2 model.layers=2",
                    "name=l4 model.layers=4 train.first_level_steps=300"),
    "compression_full": tuple(f"name=l{layers} model.layers={layers}" for layers in (1, 2))
    + (f"name=l4 model.layers=4 {_DEPTH4[L4_SETTING]}".strip(),),
    # Why 4 layers did not train with the 1-layer settings: the ':compression_full' setting
    # (levels 1-4) at 400 steps, 4 layers: peak learning rate, init scale, positions.
    "depth4": tuple(f"name={name} model.layers=4 {setting}".strip()
                    for name, setting in _DEPTH4.items()),
    # Robustness of the backward task (1 head) to the initialisation scale, 3 seeds each.
    "init": tuple(f"name=std{std}_s{seed} task.name=backward model.heads=1 seed={seed} "
                  f"model.init_std={std}" for std in (0.02, 0.1) for seed in (0, 1, 2)),
    # Why the paired layout (one token per position, 'p c ,': 1 vs 2 layers) and why no
    # positions (RoPE over the sequence, or with the edge list as a set).
    "representation": tuple(
        f"name=tokens_l{layers} task.name=backward model.layout=tokens "
        f"model.positions=sequential model.layers={layers}" for layers in (1, 2)) + (
        "name=rope_edge_set task.name=forward_cot model.positions=edge_set",
        "name=rope_sequential task.name=forward_cot model.positions=sequential"),
}


def get_config(arg: str = "ex1") -> ml_collections.ConfigDict:
    exercise, size = (arg[:-3], "ci") if arg.endswith("_ci") else (arg, "")
    if exercise not in EXERCISES:
        raise ValueError(f"config arg must be one of {EXERCISES}, optionally with '_ci'; "
                         f"got {arg!r}")
    c = ml_collections.ConfigDict()
    c.exercise = exercise
    c.name = "run"
    c.seed = 0
    c.run_dir = f"runs/pathfinding/{arg}"
    c.figures_dir = ""           # '' = <run_dir>/figures; docs use docs/figures/trees
    c.runs = _RUNS[exercise]
    c.quiet = False

    c.data = ml_collections.ConfigDict()
    c.data.kind = "random"       # 'random' (uniform attachment) | 'branching' | 'perfect_binary'
    c.data.num_labels = 48
    c.data.min_nodes = 8
    c.data.max_nodes = 32
    c.data.depth = 4             # perfect_binary only
    c.data.max_children = 3      # branching only
    c.data.max_depth = 0         # branching only; 0 = unbounded
    c.data.distractor_nodes = 0  # a second, disjoint tree of this many nodes (0 = none)
    c.data.noise_edges = 0
    c.data.train_size = 8000
    c.data.test_size = 1024
    c.data.test_sets = ("train_dist", "paper")
    c.data.seq_len = 0           # 0 = the longest example, rounded up to a multiple of 8

    c.model = ml_collections.ConfigDict()
    c.model.layers = 1
    c.model.heads = 2
    c.model.kv_heads = 0         # 0 = heads (no grouping)
    c.model.hidden = 64
    c.model.mlp = 128
    c.model.layout = "paired"    # 'paired' | 'tokens' (experiments/trees/encoding.py)
    c.model.positions = "none"   # 'none' | 'edge_set' | 'sequential'
    c.model.edge_separator = True
    c.model.init_std = 0.1       # 0.02 (the decoder's default) often stalls: see ':init' 
    c.model.rope_theta = 1e4

    c.task = ml_collections.ConfigDict()
    c.task.name = "forward_cot"
    c.task.keep_every = 1
    c.task.keep_ratio = 1.0
    c.task.levels = ()          # mixed-level training: keep every k-th chain node, k in levels

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_train_size = 256
    c.train.eval_test_size = 256
    c.train.probe_size = 64
    c.train.plot_examples = 2
    c.train.checkpoint_every = 500
    c.train.converged_at = 0.99
    c.train.first_level_steps = 0  # with task.levels: steps on the first level's rows only
    c.train.tensorboard = True   # also write TensorBoard events (metrics.jsonl always)
    c.train.optim = default_optimizer_config(learning_rate=1e-2, warmup=0.05, schedule="cosine",
                                             weight_decay=0.0, grad_clip=1.0)
    c.train.optim.total_steps = c.train.get_ref("steps")

    if exercise == "compression":
        c.task.levels = (1, 2)
    if exercise in ("compression_full", "depth4"):
        c.task.levels = (1, 2, 3, 4)
        c.train.steps = 2000 if exercise == "compression_full" else 400
    if exercise == "depth4":
        c.train.eval_every = 100
    if size == "ci":
        c.run_dir = f"/tmp/chrpo_pathfinding/{arg}"
        c.quiet = True
        c.data.train_size, c.data.test_size = 256, 64
        c.data.min_nodes, c.data.max_nodes = 4, 8
        c.data.num_labels = 32
        c.data.seq_len = 56      # one padded length: CI runs of one model share compilations
        c.model.hidden, c.model.mlp = 32, 32
        c.train.steps, c.train.batch_size = 30, 16
        c.train.eval_every, c.train.checkpoint_every = 15, 20
        c.train.eval_train_size = c.train.eval_test_size = 64
        c.train.probe_size, c.train.plot_examples = 8, 1
        c.train.tensorboard = False
        c.runs = _ci_runs(exercise)
        if exercise in LEVEL_EXERCISES:
            c.task.levels = (1, 3)   # one full and one compressed level
    return c


def _ci_runs(exercise: str) -> tuple[str, ...]:
    """A subset of the exercise's runs, with smaller trees where the run sets sizes."""
    small = " data.min_nodes=6 data.max_nodes=10 data.num_labels=32"
    return {
        "ex1": _RUNS["ex1"][:2],
        "ex2": _RUNS["ex2"][:2],
        "ex3": ("name=deep_distractors data.kind=branching data.max_children=2"
                " data.distractor_nodes=4 data.noise_edges=2" + small,
                "name=sort_cot task.name=sort_cot"),
        "compression": ("name=l1 model.layers=1", "name=l2 model.layers=2"),
        "compression_full": ("name=l1 model.layers=1", "name=l2 model.layers=2"),
        "depth4": _RUNS["depth4"][:1],
        "init": _RUNS["init"][:1],
        "representation": _RUNS["representation"][:1],
    }[exercise]


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject invalid values by key (the runs' overrides are validated per run too)."""
    cli.check_choice(config, "exercise", EXERCISES)
    cli.check_choice(config, "data.kind", ("random", "branching", "perfect_binary"))
    cli.check_choice(config, "model.layout", ("paired", "tokens"))
    cli.check_choice(config, "model.positions", ("none", "edge_set", "sequential"))
    cli.check_choice(config, "task.name", ("backward", "forward_cot", "forward", "sort_cot",
                                           "sort"))
    for key in ("data.num_labels", "data.min_nodes", "data.train_size", "data.test_size",
                "model.layers", "model.heads", "model.hidden", "model.mlp", "task.keep_every",
                "train.steps", "train.batch_size", "train.log_every", "train.eval_every",
                "train.eval_train_size", "train.eval_test_size", "train.probe_size",
                "train.checkpoint_every"):
        cli.check(config, key, lambda v: isinstance(v, int) and not isinstance(v, bool)
                  and v >= 1, "must be an int >= 1")
    cli.check(config, "data.max_nodes", lambda v: v >= config.data.min_nodes,
              f"must be >= data.min_nodes={config.data.min_nodes}")
    cli.check(config, "data.distractor_nodes", lambda v: v == 0 or v >= 2, "must be 0 or >= 2")
    need = config.data.max_nodes + config.data.distractor_nodes + 2 * config.data.noise_edges
    cli.check(config, "data.num_labels", lambda v: v >= need,
              f"must be >= max_nodes + distractor_nodes + 2 * noise_edges = {need}")
    cli.check(config, "train.first_level_steps", lambda v: isinstance(v, int)
              and not isinstance(v, bool) and 0 <= v <= config.train.steps,
              f"must be an int in [0, train.steps={config.train.steps}]")
    cli.check_range(config, "data.noise_edges", low=0)
    cli.check_range(config, "data.max_depth", low=0)
    cli.check_range(config, "data.seq_len", low=0)
    cli.check_range(config, "model.kv_heads", low=0)
    cli.check(config, "model.hidden", lambda v: v % config.model.heads == 0
              and (v // config.model.heads) % 2 == 0,
              f"must split into model.heads={config.model.heads} heads of even size")
    cli.check_range(config, "task.keep_ratio", low=0.0, high=1.0, low_open=True)
    cli.check(config, "task.keep_ratio", lambda v: v == 1.0 or config.task.keep_every == 1,
              "set task.keep_ratio or task.keep_every, not both")
    cli.check(config, "task.levels", lambda v: all(isinstance(k, int) and 1 <= k <= MAX_LEVEL
                                                   for k in v) and len(set(v)) == len(v),
              f"must be distinct ints in [1, {MAX_LEVEL}]")
    cli.check(config, "task.levels", lambda v: not v or (
        config.model.layout == "paired" and config.task.keep_every == 1
        and config.task.keep_ratio == 1.0), "needs model.layout='paired' and no keep_every/ratio")
    cli.check_range(config, "train.converged_at", low=0.0, high=1.0)
    cli.check(config, "data.test_sets", lambda v: len(v) >= 1 and set(v) <= {"train_dist",
                                                                             "paper"},
              "must be a non-empty subset of ('train_dist', 'paper')")
    cli.check(config, "runs", lambda v: all(isinstance(r, str) for r in v),
              "must be a tuple of 'key=value ...' strings")
