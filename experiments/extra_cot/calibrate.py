"""Calibration between SFT and RL: per question, reference length and target level.

    python -m experiments.extra_cot.pipeline --config.stage=calibrate

For each RL question x the mixed-ratio model answers once per level (greedy by
default) and (docs/method.md, "Calibration")::

    ref_len(x) = think tokens of its correct <COMP_100> answer        (None if wrong)
    target(x)  = min { k : the answers at k and at every level above k are correct }
                                                                      (None if none is)

The rule is strictly monotone: a level counts only if every larger level also
solves the question, so a lucky low-level answer above a failed higher level
never becomes the target.

With ``calibrate.samples = S > 0`` every question is also answered S more times
per level at ``calibrate.temperature``; ``accuracy[k]`` is then the fraction of
the 1 + S answers that are correct (else the greedy verdict, 0 or 1). A global
budget (``rl.budget`` with ``rl.budget_targets='allocation'``) turns these
estimates into one level per question (``budget_targets``).

Output: ``calibrate/calibration.jsonl``, one row per question ``{uid,
question_tokens, ref_len, target, levels: {"20": {correct, valid, level,
think_length, cot_ids}, ...}}`` (and ``accuracy: {"20": ..., ...}`` when
sampled); the policy warm start reads the CoTs.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from data.formats import LEVELS
from experiments import run_config, rundir
from experiments.extra_cot.datasets import read_questions
from experiments.extra_cot.rollouts import answer_questions, place_model
from models import sharding

__all__ = ["calibration_target", "reference_length", "level_accuracy", "level_costs",
           "length_buckets", "question_tokens", "length_weights", "budget_targets", "policy_targets", "calibrate",
           "STAGES"]


def calibration_target(correct: Mapping[int, bool]) -> int | None:
    """Smallest level k with ``correct[j]`` for every level j >= k; None if the top fails.

    >>> calibration_target({20: True, 40: False, 60: True, 80: True, 100: True})
    60
    """
    missing = [lv for lv in LEVELS if lv not in correct]
    if missing:
        raise ValueError(f"calibration_target needs a verdict for every level; missing {missing}")
    target = None
    for level in sorted(LEVELS, reverse=True):
        if not correct[level]:
            break
        target = level
    return target


def reference_length(correct_full: bool, think_length: int) -> int | None:
    """ref_len: the think length of a correct full (<COMP_100>) answer, else None."""
    if think_length < 0:
        raise ValueError(f"think_length must be >= 0, got {think_length}")
    return int(think_length) if correct_full and think_length > 0 else None


def level_accuracy(row: Mapping) -> dict[int, float]:
    """A calibration row's accuracy estimate per level: ``accuracy`` when sampled, else
    the greedy verdict."""
    sampled = row.get("accuracy")
    if sampled:
        return {int(k): float(v) for k, v in sampled.items()}
    return {lv: float(row["levels"][str(lv)]["correct"]) for lv in LEVELS}


def length_buckets(lengths: list[int], buckets: int) -> list[int]:
    """Quantile bucket (0 .. buckets-1) of every question length; equal lengths share one."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    edges = np.quantile(np.asarray(lengths, np.float64), np.linspace(0, 1, buckets + 1)[1:-1])
    return [int(np.searchsorted(edges, n, side="right")) for n in lengths]


def level_costs(rows: list[Mapping]) -> np.ndarray:
    """Each level's mean realized ratio (think tokens / ref_len) over the calibration rows
    that have a reference length, float32 [len(LEVELS)]: the cost of a level."""
    counted = [r for r in rows if r["ref_len"]]
    if not counted:
        raise ValueError("level_costs: no calibration row has a reference length (ref_len)")
    return np.array([[r["levels"][str(lv)]["think_length"] / r["ref_len"] for lv in LEVELS]
                     for r in counted], np.float32).mean(axis=0)


def question_tokens(tokenizer, question: str) -> int:
    """A question's length as the calibration rows record it (``question_tokens``) and
    ``length_weights`` reads it: its tokens, without the prompt template."""
    return len(tokenizer.encode(question))


def length_weights(rows: list[Mapping], lengths: Sequence[int]) -> np.ndarray:
    """float32 [len(lengths)]: each question's expected share of the think tokens, its
    reference length predicted from its question length (``lengths``, as
    ``question_tokens`` counts them) over the mean prediction.

    ActRatio is a ratio of token sums (``evaluate.results_table``: mean think tokens over
    the base's), so a level costs a question its ratio times the question's reference
    length over the mean one: a long question moved up a level spends more of the
    budget than a short one. The prediction is the least-squares line of ``ref_len`` on
    ``question_tokens`` over the calibration rows that have both (floored at 1 token);
    all ones where the rows cannot fit a line (fewer than two distinct lengths).
    """
    q = np.asarray(lengths, np.float64)
    pts = np.array([(r["question_tokens"], r["ref_len"]) for r in rows
                    if r.get("ref_len") and "question_tokens" in r], np.float64).reshape(-1, 2)
    if q.size == 0 or len(np.unique(pts[:, 0])) < 2:
        return np.ones(q.shape, np.float32)
    slope, intercept = np.polyfit(pts[:, 0], pts[:, 1], 1)
    pred = np.maximum(intercept + slope * q, 1.0)
    return (pred / pred.mean()).astype(np.float32)


def budget_targets(rows: list[Mapping], budget: float, *, two_sided: bool = True,
                   buckets: int = 0, costs_by: str = "level") -> tuple[list[int | None], dict]:
    """One target level per calibration row at a mean ratio of ``budget``.

    ``chrpo.allocate_levels`` over the rows with a reference length: accuracy from
    ``level_accuracy``, the cost of level k the mean realized ratio of the level-k
    answers (think tokens / ref_len) over those rows, the same for every question
    (``costs_by='level'``) or times the question's ``ref_len`` over the mean
    (``costs_by='length'``: the share of the tokens it spends, so that the planned
    ratio is ActRatio's; ``length_weights``). Rows without ``ref_len`` get None (no
    target, as in ``calibration_target``).

    ``buckets > 0``: each question's accuracy is the mean over its bucket of
    question lengths (``length_buckets`` of ``question_tokens``), so the levels
    depend on what the policy can see in the prompt, not on one question's few
    answers: a target the policy can learn. Returns (targets, info: multiplier,
    planned mean ratio, level costs).
    """
    import jax.numpy as jnp  # noqa: PLC0415
    import chrpo  # noqa: PLC0415

    counted = [i for i, r in enumerate(rows) if r["ref_len"]]
    if not counted:
        return [None] * len(rows), {"multiplier": None, "planned_ratio": None, "costs": {}}
    costs = level_costs(rows)
    acc = np.array([[level_accuracy(rows[i])[lv] for lv in LEVELS] for i in counted],
                   np.float32)
    if buckets:
        missing = [rows[i]["uid"] for i in counted if "question_tokens" not in rows[i]]
        if missing:
            raise ValueError(f"budget_targets: buckets={buckets} needs 'question_tokens' in the "
                             f"calibration rows (rerun the calibrate stage); missing for "
                             f"{missing[:3]}")
        group = np.array(length_buckets([rows[i]["question_tokens"] for i in counted], buckets))
        for g in np.unique(group):
            acc[group == g] = acc[group == g].mean(axis=0)
    if costs_by not in ("level", "length"):
        raise ValueError(f"budget_targets: costs_by must be 'level' or 'length', got {costs_by!r}")
    weight = np.ones(len(counted), np.float32)
    if costs_by == "length":
        ref = np.array([rows[i]["ref_len"] for i in counted], np.float32)
        weight = ref / ref.mean()
    choice, mu, mean = chrpo.allocate_levels(jnp.asarray(acc),
                                             jnp.asarray(weight[:, None] * costs[None, :]),
                                             budget, two_sided=two_sided)
    targets: list[int | None] = [None] * len(rows)
    for i, c in zip(counted, np.asarray(choice).tolist()):
        targets[i] = LEVELS[c]
    return targets, {"multiplier": float(mu), "planned_ratio": float(mean),
                     "costs": {str(lv): float(c) for lv, c in zip(LEVELS, costs)}}


def policy_targets(config, rows: list[Mapping]) -> list[int | None]:
    """The target level of every calibration row that the warm start and the reward use:
    ``target`` (the paper's rule), or ``budget_targets`` at ``rl.budget`` when
    ``rl.budget_targets='allocation'``."""
    rl = config.rl
    if rl.budget is None or rl.get("budget_targets", "calibration") == "calibration":
        return [r["target"] for r in rows]
    return budget_targets(rows, rl.budget, two_sided=rl.get("budget_two_sided", False),
                          buckets=rl.get("allocation_buckets", 0),
                          costs_by=rl.get("budget_costs", "level"))[0]


def calibrate(config, run: rundir.Run) -> dict:
    """Answer every RL question at every level with the mixed model; write the targets."""
    tok = run.tokenizer()
    block = config.calibrate
    questions = read_questions(run.path("data", "rl.jsonl"))
    mesh = run.mesh(config)     # docs/scaling.md
    model = place_model(rundir.load_model(run.path("sft_mixed")), mesh)
    # every answer pass kept in chunks as it is made: a killed stage resumes where it was
    partial = os.path.join(run.stage_dir("calibrate"), "partial")
    resume = os.path.join(partial, rundir.fingerprint({
        "calibrate": run_config.to_json_dict(block), "seed": config.seed,
        "model": rundir.stage_record(run, "sft_mixed"), "uids": [q.uid for q in questions]}))
    by_level = {level: answer_questions(model, tok, questions, control=level,
                                        batch_size=block.batch_size,
                                        max_new_tokens=block.max_new_tokens,
                                        desc=f"calibrate <COMP_{level}>",
                                        resume_dir=os.path.join(resume, f"{level}"))
                for level in LEVELS}
    samples = block.get("samples", 0)
    hits = {level: np.array([j.correct for j in by_level[level]], np.float64) for level in LEVELS}
    for level in LEVELS if samples else ():
        for s in range(samples):
            key = jax.random.key(config.seed * 1000 + 17 * level + s)
            judged = answer_questions(model, tok, questions, control=level,
                                      batch_size=block.batch_size,
                                      max_new_tokens=block.max_new_tokens,
                                      temperature=block.temperature, key=key,
                                      desc=f"calibrate <COMP_{level}> sample {s + 1}",
                                      resume_dir=os.path.join(resume, f"{level}_sample{s}"))
            hits[level] += [j.correct for j in judged]
    rows = []
    for i, q in enumerate(questions):
        verdicts = {level: by_level[level][i] for level in LEVELS}
        full = verdicts[100]
        rows.append({
            "uid": q.uid,
            "question_tokens": question_tokens(tok, q.question),
            "ref_len": reference_length(full.correct, full.think_length),
            "target": calibration_target({lv: j.correct for lv, j in verdicts.items()}),
            "levels": {str(lv): {**j.row(), "cot_ids": list(j.cot_ids)}
                       for lv, j in verdicts.items()}})
        if samples:
            rows[-1]["accuracy"] = {str(lv): hits[lv][i] / (1 + samples) for lv in LEVELS}
    rundir.write_jsonl(os.path.join(run.stage_dir("calibrate"), "calibration.jsonl"), rows)
    if sharding.is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
    summary = {"questions": len(rows),
               "with_target": sum(r["target"] is not None for r in rows) / max(len(rows), 1)}
    for level in LEVELS:
        summary[f"accuracy@{level}"] = float(np.mean([j.correct for j in by_level[level]]))
        summary[f"target@{level}"] = sum(r["target"] == level for r in rows)
    return summary


STAGES = {"calibrate": calibrate}
