"""Formula integrity and essential-token recall of the two CoT compressors (not a unit test).

    .venv/bin/python benchmarks/compressor_quality.py
    .venv/bin/python benchmarks/compressor_quality.py --formula_run=runs/compressor \\
        --baseline_run=runs/compressor_baseline --problems=300 --seed=12

A run directory without an exported model is first trained with the default config
(experiments/extra_cot/configs/compressor.py, compressor_baseline.py). Both compressors then
score held-out problems of the stream ``--seed`` (neither trained nor validated on
it), each with one forward pass, and every ratio 0.1 ... 0.9 keeps the top
round(g * N) tokens (data/compression.py). Printed as markdown tables:

- integrity: essential + supporting equations kept whole (every token kept) / all of
  them (checks and dead ends are filler and do not count);
- ess. whole: the same over essential (step) equations only;
- fractured: equations partly kept / all of them;
- ess. recall: essential tokens kept / essential tokens.

Reference rows: the annotation ranking itself (``oracle``, data/arithmetic.py's
importance scores) and a uniformly random ranking.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.arithmetic import generate_problems  # noqa: E402
from data.tokenizers import load_tokenizer  # noqa: E402
from experiments import cli  # noqa: E402
from experiments.extra_cot import train_compressor as tc  # noqa: E402
from models.compressor import COMPRESSOR_FILE, load_scorer  # noqa: E402

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METRICS = ("integrity", "integrity_essential", "fractured", "recall_essential")
HEADERS = ("integrity", "ess. whole", "fractured", "ess. recall")
CONFIGS = {"formula": "experiments/extra_cot/configs/compressor.py",
           "surprisal": "experiments/extra_cot/configs/compressor_baseline.py"}


def ensure_trained(run_dir: str, kind: str) -> None:
    """Train ``run_dir`` with the default config of ``kind`` unless it holds an exported model."""
    if os.path.exists(os.path.join(run_dir, COMPRESSOR_FILE)):
        return
    print(f"# training {kind} compressor in {run_dir}", file=sys.stderr)
    tc.main(cli.parse([f"--config={CONFIGS[kind]}", f"--config.run_dir={run_dir}"]))


def _padded(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(r) for r in rows])
    out = np.full((len(rows), max(lengths)), -np.inf, np.float32)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out, lengths


def measure(run_dir: str, problems, *, seed: int) -> dict[str, dict[str, float]]:
    """{'model' | 'oracle' | 'random': ratio_table} for the compressor of ``run_dir``."""
    scorer, meta = load_scorer(run_dir)
    tokenizer = load_tokenizer(os.path.join(run_dir, meta["tokenizer"]))
    examples = tc.annotate(problems, tokenizer)
    start = time.perf_counter()
    scores, lengths = scorer.padded([e.question_ids for e in examples],
                                    [e.cot_ids for e in examples])
    seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    tables = {
        "model": tc.ratio_table(scores, lengths, examples, RATIOS),
        "oracle": tc.ratio_table(*_padded([e.reference_scores for e in examples]), examples,
                                 RATIOS),
        "random": tc.ratio_table(*_padded([rng.random(len(e.cot_ids)) for e in examples]),
                                 examples, RATIOS)}
    if scorer.kind == "keep":
        gold = np.concatenate([e.grades >= tc.GRADE_SUPPORTING for e in examples])
        pred = np.concatenate([scores[b, :n] > 0 for b, n in enumerate(lengths)])
        tables["model"]["macro_f1"] = tc.macro_f1(pred, gold)
    tables["model"]["score_seconds"] = seconds
    return tables


def table(columns: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per ratio; for each metric, one column per compressor."""
    names = list(columns)
    head = ["ratio"] + [f"{h} ({n})" for h in HEADERS for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in RATIOS:
        cells = [f"{g:.1f}"] + [f"{columns[n][f'{m}@{g:g}']:.3f}" for m in METRICS for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formula_run", default="runs/compressor")
    parser.add_argument("--baseline_run", default="runs/compressor_baseline")
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--seed", type=int, default=12, help="held-out problem stream")
    args = parser.parse_args(argv)
    ensure_trained(args.formula_run, "formula")
    ensure_trained(args.baseline_run, "surprisal")
    problems = generate_problems(args.seed, args.problems)
    formula = measure(args.formula_run, problems, seed=args.seed)
    baseline = measure(args.baseline_run, problems, seed=args.seed)
    print(f"{args.problems} held-out problems (stream {args.seed}); Extra-CoT = formula-aware "
          f"compressor ({args.formula_run}), surprisal = generic baseline ({args.baseline_run})\n")
    print(table({"Extra-CoT": formula["model"], "surprisal": baseline["model"]}))
    print("\nreference rankings\n")
    print(table({"oracle": formula["oracle"], "random": formula["random"]}))
    print(f"\nExtra-CoT keep/drop macro-F1 (keep = essential + supporting): "
          f"{formula['model']['macro_f1']:.4f}")
    seconds = formula["model"]["score_seconds"], baseline["model"]["score_seconds"]
    print(f"scoring time, {args.problems} problems, one forward pass (compilation included): "
          f"Extra-CoT {seconds[0]:.1f}s, surprisal {seconds[1]:.1f}s")
    return {"formula": formula, "baseline": baseline}


if __name__ == "__main__":
    main()
