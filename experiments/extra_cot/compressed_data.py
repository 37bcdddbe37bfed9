"""Stages between the base model and mixed-ratio SFT: compressors, self-CoTs, compressed data.

- ``compressor``: trains the formula-aware compressor (experiments/extra_cot/train_compressor.py,
  config block ``compressor``) on the run's annotated problems and tokenizer; with
  ``compress.baseline_scorer='trained'`` also the generic baseline (block
  ``compressor_baseline``, token surprisal under a small LM trained on the same CoTs).
- ``selfcot``: the base model answers the SFT questions (greedy, base mode); its
  correct chains of thought are kept (Extra-CoT compresses the model's own CoTs).
  ``selfcot.fill_with_reference`` (tiny test configs only) adds the reference
  CoT of every question the model got wrong.
- ``compress``: each kept CoT is compressed at every ratio of ``compress.ratios``
  from one scoring pass, each result is re-bucketed by its *measured* ratio
  (``data.compression.rebucket``), and only questions present at every level are
  kept (``complete_questions``); with ``compress.units='sentences'`` the formula-aware
  compressor keeps whole sentences and lines, never a part of one. Written twice:
  ``formula.jsonl`` (Extra-CoT) and ``baseline.jsonl`` (the TokenSkip-style data;
  ``baseline_scorer='base_lm'`` scores tokens by their surprisal under the base model
  itself, in context).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from data.compression import (CompressedCoT, complete_questions, compress_batch, rebucket,
                              sentence_units)
from data.formats import EQUATION_TEXT, LEVELS, THINK_OPEN, build_prompt
from experiments import run_config, rundir
from experiments.extra_cot import train_compressor
from experiments.extra_cot.datasets import read_questions
from experiments.extra_cot.rollouts import answer_questions, place_model
from models import sharding
from models.compressor import Scorer, load_scorer, surprisal_scorer

__all__ = ["compressor_config", "compressor", "selfcot", "equation_lines", "compressed_rows",
           "compress", "STAGES"]


def compressor_config(block: ml_collections.ConfigDict, run: rundir.Run, *, name: str,
                      mesh: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The train_compressor config of this run: ``block`` with the run's paths filled in,
    and ``mesh`` (the pipeline's ``config.mesh`` block, when given) as its ``mesh``."""
    from experiments.extra_cot.configs import compressor as compressor_configs  # noqa: PLC0415

    cfg = ml_collections.ConfigDict(block.to_dict(preserve_field_references=True))
    cfg.run_dir = run.path(name)
    cfg.data.tokenizer_path = run.tokenizer_path()
    cfg.data.problems_path = run.path("data", "compressor_problems.jsonl")
    cfg.data.eval_path = run.path("data", "compressor_eval.jsonl")   # same distribution
    if mesh is not None:                # the compressor trains on the pipeline's mesh
        cfg.mesh = ml_collections.ConfigDict(dict(mesh))
    compressor_configs.validate(cfg)
    return cfg


def compressor(config, run: rundir.Run) -> dict:
    """Train the compressor(s); returns their held-out metrics."""
    out = {}
    names = [("compressor", config.compressor)]
    if config.compress.baseline_scorer == "trained":
        names.append(("compressor_baseline", config.compressor_baseline))
    for name, block in names:
        metrics = train_compressor.main(compressor_config(block, run, name=name,
                                                          mesh=config.get("mesh")),
                                        mesh=run.mesh(config))
        out.update({f"{name}/{k}": float(v) for k, v in metrics.items()})
    return out


def selfcot(config, run: rundir.Run) -> dict:
    """Greedy base-model answers to the SFT questions; keep the correct CoTs."""
    tok = run.tokenizer()
    block = config.selfcot
    questions = read_questions(run.path("data", "sft.jsonl"))
    questions = questions[:block.num_questions]
    mesh = run.mesh(config)     # docs/scaling.md
    model = place_model(rundir.load_model(run.path("sft_base")), mesh)
    # chunks of answers kept as they are made: a killed stage resumes where it was
    partial = os.path.join(run.stage_dir("selfcot"), "partial")
    resume = os.path.join(partial, rundir.fingerprint({
        "selfcot": run_config.to_json_dict(block), "model": rundir.stage_record(run, "sft_base"),
        "uids": [q.uid for q in questions]}))
    judged = answer_questions(model, tok, questions, control=None, batch_size=block.batch_size,
                              max_new_tokens=block.max_new_tokens, desc="selfcot",
                              resume_dir=resume)
    rows = [{"uid": q.uid, "cot_ids": list(j.cot_ids), "think_length": j.think_length,
             "source": "model"} for q, j in zip(questions, judged) if j.correct and j.cot_ids]
    correct = len(rows)
    if block.fill_with_reference:  # tiny test configs: a model that solves nothing yet
        own = {r["uid"] for r in rows}
        rows += [{"uid": q.uid, "cot_ids": tok.encode(q.cot), "think_length": -1,
                  "source": "reference"} for q in questions if q.uid not in own]
    rundir.write_jsonl(os.path.join(run.stage_dir("selfcot"), "cots.jsonl"), rows)
    if sharding.is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
    return {"questions": len(questions), "kept": len(rows),
            "accuracy": correct / max(len(questions), 1),
            "think_tokens": float(np.mean([j.think_length for j in judged]))}


def equation_lines(pieces: Sequence[str], units: np.ndarray) -> np.ndarray:
    """1 on the tokens of every unit that is a line holding one equation and nothing
    else (``data.formats.EQUATION_TEXT``: a step ``05-03=02``, not a check inside a
    sentence), else 0: the formulas a unit-wise compression keeps first."""
    out = np.zeros(len(pieces), dtype=np.int64)
    for u in np.unique(units):
        where = np.flatnonzero(units == u)
        text = "".join(pieces[t] for t in where)
        if text.startswith("\n") and EQUATION_TEXT.fullmatch(text.strip()):
            out[where] = 1
    return out


def compressed_rows(scorer: Scorer, question_ids, cots: list[dict], ratios, *,
                    pieces: Sequence[str] | None = None) -> list[dict]:
    """Rows {uid, level, ratio, cot_ids} of the questions present at every level.

    ``pieces`` (the text of every token id): keep whole sentences and lines
    (``data.compression.sentence_units``) instead of single tokens, the lines that
    are one equation first (:func:`equation_lines`); and where a level's window
    holds both chains that keep every equation line and chains that lost one (the
    equations alone exceed the smaller ratio), only the whole ones compete for it."""
    ids = [c["cot_ids"] for c in cots]
    units = priority = None
    if pieces is not None:
        texts = [[pieces[t] for t in row] for row in ids]
        units = [sentence_units(row) for row in texts]
        priority = [equation_lines(row, u) for row, u in zip(texts, units)]
    kept = compress_batch(scorer, question_ids, ids, ratios, units=units, priority=priority)
    samples = [CompressedCoT(question_id=c["uid"], target_ratio=float(g), think_ids=tuple(ids),
                             full_length=len(c["cot_ids"]))
               for c, by_ratio in zip(cots, kept) for g, ids in by_ratio.items()]
    if pieces is not None:
        samples = _whole_formulas_first(samples, {c["uid"]: p for c, p in zip(cots, priority)},
                                        {c["uid"]: u for c, u in zip(cots, units)}, pieces)
    buckets = complete_questions(rebucket(samples, one_per_level=True), LEVELS)
    order = {c["uid"]: i for i, c in enumerate(cots)}
    rows = [{"uid": uid, "level": level, "ratio": s.measured_ratio, "cot_ids": list(s.think_ids)}
            for level in LEVELS for uid, group in buckets[level].items() for s in group]
    return sorted(rows, key=lambda r: (order[r["uid"]], r["level"]))


def _whole_formulas_first(samples: list[CompressedCoT], priority: dict, units: dict,
                          pieces: Sequence[str]) -> list[CompressedCoT]:
    """Drop a sample that lost an equation line when another sample of the same
    question in the same level window kept them all."""
    def equation_lines_kept(s):
        text = "".join(pieces[t] for t in s.think_ids)
        return sum(bool(EQUATION_TEXT.fullmatch(line.strip())) for line in text.split("\n"))

    def whole(s):
        source = units[s.question_id][priority[s.question_id] > 0]
        return equation_lines_kept(s) >= len(np.unique(source))

    flags = [whole(s) for s in samples]
    has_whole = {(s.question_id, s.level) for s, ok in zip(samples, flags) if ok}
    return [s for s, ok in zip(samples, flags) if ok or (s.question_id, s.level) not in has_whole]


def _stats(rows: list[dict], prefix: str) -> dict:
    out = {f"{prefix}/questions": len({r["uid"] for r in rows})}
    for level in LEVELS:
        ratios = [r["ratio"] for r in rows if r["level"] == level]
        out[f"{prefix}/ratio@{level}"] = float(np.mean(ratios)) if ratios else float("nan")
    return out


def with_text(tok, rows: list[dict]) -> list[dict]:
    """Each row with ``text``, its ``cot_ids`` decoded: what a person reads in the file."""
    return [{**r, "text": tok.decode(r["cot_ids"])} for r in rows]


def compress(config, run: rundir.Run) -> dict:
    """formula.jsonl and baseline.jsonl: re-bucketed compressed self-CoTs."""
    tok = run.tokenizer()
    questions = {q.uid: q for q in read_questions(run.path("data", "sft.jsonl"))}
    cots = rundir.read_jsonl(run.path("selfcot", "cots.jsonl"))
    if not cots:
        raise ValueError("the base model solved no SFT question; nothing to compress")
    ratios = tuple(config.compress.ratios)
    out_dir = run.stage_dir("compress")
    formula, _ = load_scorer(run.path("compressor"), batch_size=config.compress.batch_size)
    plain = [tok.encode(questions[c["uid"]].question) for c in cots]
    pieces = ([tok.decode([i]) for i in range(tok.vocab_size)]
              if config.compress.units == "sentences" else None)
    rows = with_text(tok, compressed_rows(formula, plain, cots, ratios, pieces=pieces))
    rundir.write_jsonl(os.path.join(out_dir, "formula.jsonl"), rows)
    summary = _stats(rows, "formula")
    if config.compress.baseline_scorer == "trained":
        baseline, _ = load_scorer(run.path("compressor_baseline"),
                                  batch_size=config.compress.batch_size)
        prefixes = plain
    else:  # the base model's own surprisal of each CoT token, after its chat prompt
        lm = rundir.load_model(run.path("sft_base"))
        baseline = surprisal_scorer(lm, sep_id=None, batch_size=config.compress.batch_size)
        opener = [tok.token_to_id(THINK_OPEN), *tok.encode("\n")]
        prefixes = [build_prompt(tok, questions[c["uid"]].question) + opener for c in cots]
    rows = with_text(tok, compressed_rows(baseline, prefixes, cots, ratios))
    rundir.write_jsonl(os.path.join(out_dir, "baseline.jsonl"), rows)
    summary.update(_stats(rows, "baseline"))
    return summary


STAGES = {"compressor": compressor, "selfcot": selfcot, "compress": compress}
