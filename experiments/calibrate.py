"""Calibration between SFT and RL: per question, reference length and target level.

    python -m experiments.pipeline --config.stage=calibrate

For each RL question x the mixed-ratio model answers once per level (greedy by
default) and (docs/method.md, "Calibration")::

    ref_len(x) = think tokens of its correct <COMP_100> answer        (None if wrong)
    target(x)  = min { k : the answers at k and at every level above k are correct }
                                                                      (None if none is)

The rule is strictly monotone: a level counts only if every larger level also
solves the question, so a lucky low-level answer above a failed higher level
never becomes the target. Output: ``calibrate/calibration.jsonl``, one row per
question ``{uid, ref_len, target, levels: {"20": {correct, valid, level,
think_length, cot_ids}, ...}}``; the policy warm start reads the CoTs.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from data.formats import LEVELS
from experiments import rundir
from experiments.datasets import read_questions
from experiments.rollouts import answer_questions, place_model
from models import sharding

__all__ = ["calibration_target", "reference_length", "calibrate", "STAGES"]


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


def calibrate(config, run: rundir.Run) -> dict:
    """Answer every RL question at every level with the mixed model; write the targets."""
    tok = run.tokenizer()
    block = config.calibrate
    questions = read_questions(run.path("data", "rl.jsonl"))
    mesh = sharding.mesh_from_config(config.get("mesh"))     # docs/scaling.md
    model = place_model(rundir.load_model(run.path("sft_mixed")), mesh)
    by_level = {level: answer_questions(model, tok, questions, control=level,
                                        batch_size=block.batch_size,
                                        max_new_tokens=block.max_new_tokens)
                for level in LEVELS}
    rows = []
    for i, q in enumerate(questions):
        verdicts = {level: by_level[level][i] for level in LEVELS}
        full = verdicts[100]
        rows.append({
            "uid": q.uid,
            "ref_len": reference_length(full.correct, full.think_length),
            "target": calibration_target({lv: j.correct for lv, j in verdicts.items()}),
            "levels": {str(lv): {**j.row(), "cot_ids": list(j.cot_ids)}
                       for lv, j in verdicts.items()}})
    rundir.write_jsonl(os.path.join(run.stage_dir("calibrate"), "calibration.jsonl"), rows)
    summary = {"questions": len(rows),
               "with_target": sum(r["target"] is not None for r in rows) / max(len(rows), 1)}
    for level in LEVELS:
        summary[f"accuracy@{level}"] = float(np.mean([j.correct for j in by_level[level]]))
        summary[f"target@{level}"] = sum(r["target"] == level for r in rows)
    return summary


STAGES = {"calibrate": calibrate}
