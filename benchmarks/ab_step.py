"""A/B of our train step between source trees (e.g. before / after a change), same run.

    .venv/bin/python -m benchmarks.ab_step --trees=before=/tmp/before,after=. \\
        --sizes=small --kinds=sft --rounds=4 --repeats=3 --torch --out=ab.json

Each tree is a directory holding ``models/``, ``experiments/``, ``chrpo/``,
``data/`` and ``benchmarks/`` (a copy of the repository at some state, e.g.
``git archive HEAD models experiments chrpo data benchmarks | tar -x -C DIR``;
a tree whose ``benchmarks/`` predates ``cpu_times`` gets wall-time ratios only). For
every round, every tree (and, with ``--torch``, transformers from this
repository) runs ``benchmarks.train_step``'s worker in a fresh process whose
``PYTHONPATH`` and working directory are that tree; the order of the sides
reverses every round (A B T | T B A | ...), so each round gives same-run
ratios. Reported per case: best step time of each side per round, the
per-round ratio ``t(first tree) / t(other side)`` (> 1: the other side is
faster), its median and range over rounds, and the CPU seconds (user + sys)
each worker used, beside the machine's load average. ``--query-block=tree=N``
sets one tree's ``Qwen3Config.query_block``; with the same directory twice it
A/Bs that setting alone (``--trees=off=.,on=. --query-block=on=64``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks import harness as h
from benchmarks.train_step import worker_spec


def parse_trees(text: str) -> dict[str, str]:
    """'name=dir,name=dir' -> {name: absolute dir}; each dir must hold models/qwen3.py."""
    trees = {}
    for item in [x for x in text.split(",") if x]:
        name, sep, path = item.partition("=")
        if not sep or not name or name == "torch":
            raise ValueError(f"--trees item {item!r} must be name=directory (name != 'torch')")
        path = os.path.abspath(path)
        if not os.path.isfile(os.path.join(path, "models", "qwen3.py")):
            raise ValueError(f"--trees {name}={path}: no models/qwen3.py there")
        trees[name] = path
    if len(trees) < 1:
        raise ValueError("--trees needs at least one name=directory")
    return trees


def parse_query_blocks(text: str, trees: dict[str, str]) -> dict[str, int]:
    """'name=N,...' -> {tree name: Qwen3Config.query_block}; every name must be a tree."""
    out = {}
    for item in [x for x in text.split(",") if x]:
        name, sep, value = item.partition("=")
        if not sep or name not in trees or not value.isdigit():
            raise ValueError(f"--query-block item {item!r} must be tree=N with N >= 0 and "
                             f"tree one of {sorted(trees)}")
        out[name] = int(value)
    return out


def run_in_tree(tree: str, side: str, spec: dict, *, timeout: float) -> dict:
    """One ``benchmarks.train_step`` worker run with ``tree`` first on the path; adds cpu_s."""
    env = dict(os.environ, PYTHONPATH=tree)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "benchmarks.train_step", f"--worker={side}",
           f"--spec={json.dumps(spec)}"]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(h.RESULT_PREFIX)]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"worker in {tree} ({side}) failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    out = json.loads(lines[0][len(h.RESULT_PREFIX):])
    out["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", required=True, help="name=dir,name=dir (first = baseline)")
    parser.add_argument("--sizes", default="small")
    parser.add_argument("--kinds", default="sft")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--torch", action="store_true", help="also time transformers")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--query-block", default="",
                        help="tree=N,...: that tree's model gets Qwen3Config.query_block N "
                             "(e.g. --trees=off=.,on=. --query-block=on=64)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    trees = parse_trees(args.trees)
    query_blocks = parse_query_blocks(args.query_block, trees)
    from benchmarks.jax_side import write_weights  # noqa: PLC0415

    sides = [(name, path, "jax") for name, path in trees.items()]
    if args.torch:
        sides.append(("torch", h.REPO, "torch"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in [s for s in args.sizes.split(",") if s]:
            weights = write_weights(size, os.path.join(tmp, size))
            for kind in [k for k in args.kinds.split(",") if k]:
                spec = worker_spec(size, kind, weights, repeats=args.repeats,
                                   warmup=args.warmup)
                rounds = []
                for r in range(args.rounds):
                    order = sides if r % 2 == 0 else sides[::-1]
                    res = {}
                    for name, path, side in order:
                        side_spec = (dict(spec, model_overrides={"query_block": query_blocks[name]})
                                     if name in query_blocks else spec)
                        res[name] = run_in_tree(path, side, side_spec, timeout=args.timeout)
                        cpu = res[name].setdefault("cpu_times", [])   # older trees: none
                        h.log(f"{size} {kind} round {r + 1} {name}: best "
                              f"{h.best(res[name]['times']):.3f} s, step cpu "
                              f"{h.best(cpu) if cpu else float('nan'):.3f} s, worker cpu "
                              f"{res[name]['cpu_s']} s, load {res[name]['load_before'][0]}")
                    rounds.append(res)
                base = next(iter(trees))
                row = {"size": size, "kind": kind, "rounds": rounds, "ratios": {}}
                for name, _, _ in sides:
                    if name != base:
                        for key, label in (("times", ""), ("cpu_times", " cpu")):
                            if not all(r[base][key] and r[name][key] for r in rounds):
                                continue   # a tree whose worker predates cpu_times
                            row["ratios"][f"{base}/{name}{label}"] = h.ratio_summary(
                                [h.best(r[base][key]) / h.best(r[name][key]) for r in rounds])
                rows.append(row)
                print(f"{size} {kind}: " + "; ".join(
                    f"t({k.split('/')[0]})/t({k.split('/')[1]}) median {v['median']:.2f} "
                    f"({v['min']:.2f}-{v['max']:.2f})" for k, v in row["ratios"].items()),
                    flush=True)
                for name, _, _ in sides:
                    walls = [round(h.best(r[name]["times"]), 3) for r in rounds]
                    cpus = [round(h.best(r[name]["cpu_times"]), 3) for r in rounds
                            if r[name]["cpu_times"]]
                    print(f"  {name}: best step s per round {walls}, cpu s {cpus}", flush=True)
    h.save_json(args.out, {"benchmark": "ab_step", "trees": trees, "query_block": query_blocks,
                           "date": time.ctime(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
