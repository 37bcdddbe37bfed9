"""Token statistics of the synthetic arithmetic problems (data/arithmetic.py).

    python -m data.arithmetic_stats      # train the default tokenizer, describe 1,000 problems
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

import numpy as np

from data.arithmetic import Problem, align_spans, generate_problems, tokenizer_corpus
from data.arithmetic_cot import ESSENTIAL, FILLER, SUPPORTING
from data.formats import build_prompt
from data.tokenizers import train_sentencepiece

__all__ = ["describe", "main"]


def describe(problems: Sequence[Problem], tokenizer: Any, *, quiet: bool = False) -> dict[str, float]:
    """Token statistics of ``problems`` under ``tokenizer``; printed unless ``quiet``.

    Keys: n, cot_median, cot_p90, cot_max, prompt_median, prompt_p90 (base-mode
    prompt incl. the chat template), answer_median, share_filler,
    share_supporting, share_essential (token-weighted over all CoTs),
    max_share_essential and max_share_core (the worst single problem).
    """
    if not problems:
        raise ValueError("describe needs at least one problem")
    cot_len, prompt_len, answer_len, worst_e, worst_core = [], [], [], [], []
    counts = np.zeros(3)
    for p in problems:
        levels = align_spans(p, tokenizer, protect_ratios=()).levels
        per = np.bincount(levels, minlength=3)
        counts += per
        cot_len.append(levels.shape[0])
        worst_e.append(per[ESSENTIAL] / levels.shape[0])
        worst_core.append((per[ESSENTIAL] + per[SUPPORTING]) / levels.shape[0])
        prompt_len.append(len(build_prompt(tokenizer, p.question)))
        answer_len.append(len(tokenizer.encode(p.answer_text)))
    stats = dict(
        n=len(problems), cot_median=float(np.median(cot_len)), cot_p90=float(np.percentile(cot_len, 90)),
        cot_max=float(max(cot_len)), prompt_median=float(np.median(prompt_len)),
        prompt_p90=float(np.percentile(prompt_len, 90)), answer_median=float(np.median(answer_len)),
        share_filler=float(counts[FILLER] / counts.sum()),
        share_supporting=float(counts[SUPPORTING] / counts.sum()),
        share_essential=float(counts[ESSENTIAL] / counts.sum()),
        max_share_essential=float(max(worst_e)), max_share_core=float(max(worst_core)))
    if not quiet:
        print("  ".join(f"{k}={v:.3g}" for k, v in stats.items()))
    return stats


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """``python -m data.arithmetic_stats``: train the default tokenizer and print the statistics."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--train", type=int, default=2000, help="problems the tokenizer trains on (seed 0)")
    parser.add_argument("--sample", type=int, default=1000, help="problems described (seed 1)")
    parser.add_argument("--vocab_size", type=int, default=768)
    args = parser.parse_args(argv)
    corpus = tokenizer_corpus(generate_problems(0, args.train))
    start = time.perf_counter()
    tokenizer = train_sentencepiece(corpus, vocab_size=args.vocab_size)
    seconds = time.perf_counter() - start
    print(f"sentencepiece: vocab_size={tokenizer.vocab_size} trained in {seconds:.2f}s on {args.train} problems")
    return describe(generate_problems(1, args.sample), tokenizer)


if __name__ == "__main__":
    main()
