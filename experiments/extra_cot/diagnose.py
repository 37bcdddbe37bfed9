"""Where the arithmetic pipeline's answers go wrong: per-equation error analysis of a run.

    python -m experiments.extra_cot.diagnose --run_dir=runs/study/seed0                   # base model
    python -m experiments.extra_cot.diagnose --run_dir=runs/study/seed0 --stage=sft_mixed --levels=20,40,60
    python -m experiments.extra_cot.diagnose --run_dir=runs/study/seed0 --data                # compressed data

Model mode: the stage's model answers the first ``--questions`` validation
questions greedily (base mode, or each ``<COMP_xx>`` level); every wrong answer
gets the class of its first wrong step equation against the reference chain
(``op``: another operation; ``x-copy``: the previous result miscopied;
``operand``: the question's operand miscopied; ``arith``: true operands, wrong
result; ``missing-step`` / ``extra-step``; ``final-copy``: right equations,
wrong final answer; ``invalid``: unparseable), split by whether the response
restated that step (a ``so I add``-style phrase since the previous equation).

Data mode: for each level of ``compress/formula.jsonl``, how many of each
row's step equations are preceded by their restatement phrase: ``all``,
``none`` or ``some`` (``some``: the chain restates a few steps and not the
others, so the model cannot tell from the level alone which steps to restate).

Only for ``data.source='arithmetic'`` runs: the analysis reads the
equations and restatement phrases that data/arithmetic_cot.py writes.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from collections.abc import Sequence

from data.answers import is_equivalent
from data.formats import EQUATION_TEXT, LEVELS, build_prompt, parse_response
from experiments import rundir
from experiments.extra_cot.datasets import read_questions

__all__ = ["step_equations", "restated_steps", "first_error", "classify_responses",
           "restatement_profile", "main"]

_RESTATE = re.compile(r"[Ss]o I (add|subtract|multiply|divide)")


def step_equations(cot: str) -> list[tuple[str, str, str, str]]:
    """(x, op, a, y) of every line that is exactly one equation: the chain's steps."""
    return [m.groups() for line in cot.split("\n") if (m := EQUATION_TEXT.fullmatch(line.strip()))]


def restated_steps(cot: str) -> list[bool]:
    """Per step equation: a restatement phrase stands between it and the step before."""
    out, seen = [], False
    for line in cot.split("\n"):
        if EQUATION_TEXT.fullmatch(line.strip()):
            out.append(seen)
            seen = False
        elif _RESTATE.search(line):
            seen = True
    return out


def first_error(reference: str, response_cot: str) -> tuple[str, int | None]:
    """(class, step index) of the first wrong step of ``response_cot`` (see module doc)."""
    ref, got = step_equations(reference), step_equations(response_cot)
    for i, want in enumerate(ref):
        if i >= len(got):
            return "missing-step", i
        have = got[i]
        if have == want:
            continue
        if have[1] != want[1]:
            return "op", i
        if int(have[0]) != int(want[0]):
            return "x-copy", i
        if int(have[2]) != int(want[2]):
            return "operand", i
        if int(have[3]) != int(want[3]):
            return "arith", i
    return ("extra-step", len(ref)) if len(got) > len(ref) else ("final-copy", None)


def classify_responses(tokenizer, questions, responses, *, control) -> dict:
    """Accuracy and first-error classes (with / without a restatement of that step)."""
    counts: collections.Counter = collections.Counter()
    correct = 0
    for q, r in zip(questions, responses):
        p = parse_response(tokenizer, r, expect_control=control is not None)
        if p.valid and is_equivalent(p.answer, q.answer):
            correct += 1
            continue
        if not p.valid:
            counts["invalid"] += 1
            continue
        text = tokenizer.decode(list(p.cot_ids))
        kind, step = first_error(q.cot, text)
        restated = restated_steps(text)
        if step is not None and step < len(restated):
            kind += " (restated)" if restated[step] else " (not restated)"
        counts[kind] += 1
    return {"n": len(questions), "accuracy": correct / max(1, len(questions)),
            "first_errors": dict(counts.most_common())}


def restatement_profile(tokenizer, rows: Sequence[dict]) -> dict:
    """Per level of compressed rows ``{level, cot_ids}``: shares of rows whose step
    equations are all / none / some restated, and the mean measured ratio."""
    out = {}
    for level in LEVELS:
        group = [r for r in rows if r["level"] == level]
        kinds: collections.Counter = collections.Counter()
        for r in group:
            flags = restated_steps(tokenizer.decode(r["cot_ids"]))
            kinds["none" if not any(flags) else "all" if all(flags) else "some"] += 1
        n = max(1, len(group))
        out[level] = {"rows": len(group), **{k: kinds[k] / n for k in ("all", "some", "none")},
                      "ratio": sum(r["ratio"] for r in group) / n}
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--stage", default="sft_base", help="the model: a training stage's name")
    parser.add_argument("--levels", default="", help="comma list of <COMP_xx> levels; '' = base mode")
    parser.add_argument("--questions", type=int, default=200, help="validation questions")
    parser.add_argument("--data", action="store_true", help="profile compress/formula.jsonl instead")
    parser.add_argument("--json", default="", help="also write the result to this file")
    args = parser.parse_args(argv)
    run = rundir.Run(args.run_dir)
    tok = run.tokenizer()
    if args.data:
        result = {"restatements": restatement_profile(
            tok, rundir.read_jsonl(run.path("compress", "formula.jsonl")))}
    else:
        from experiments.extra_cot.rollouts import generate_responses  # noqa: PLC0415 (loads jax)

        questions = read_questions(run.path("data", "val.jsonl"))[:args.questions]
        model = rundir.load_model(run.path(args.stage))
        controls = [int(v) for v in args.levels.split(",") if v.strip()] or [None]
        result = {}
        for control in controls:
            prompts = [build_prompt(tok, q.question, control=control) for q in questions]
            responses = generate_responses(model, prompts, tokenizer=tok, batch_size=100,
                                           max_new_tokens=320)
            name = "base" if control is None else f"<COMP_{control}>"
            result[name] = classify_responses(tok, questions, responses, control=control)
    text = json.dumps(rundir.strict_json(result), indent=1, allow_nan=False)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
