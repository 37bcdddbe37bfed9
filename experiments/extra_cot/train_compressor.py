"""Train a CoT compressor on the annotated arithmetic problems (Extra-CoT stage 1).

    python -m experiments.extra_cot.train_compressor --config=experiments/extra_cot/configs/compressor.py
    python -m experiments.extra_cot.train_compressor --config=experiments/extra_cot/configs/compressor_baseline.py

Recipe:
1. tokenizer: load ``data.tokenizer_path`` or train SentencePiece and save it in the run dir;
2. problems: ``data/arithmetic.py`` (train stream, held-out stream); every CoT token gets
   the grade of its annotated span (:func:`token_grades`);
3. model: ``kind='formula'``: a ``TokenClassifier`` on ``question [SEP] cot`` trained
   with the ordinal (or binary) loss of ``models/encoder.py`` under the label policy
   ``labels.keep``; ``kind='surprisal'``: a causal Qwen3 LM trained on the same rows
   (loss on CoT tokens), whose token surprisal is the generic baseline's score;
4. train with Orbax checkpoints (resumable), metrics to ``metrics.jsonl``/TensorBoard;
5. evaluate on held-out problems (keep/drop macro-F1 of the label policy; per ratio:
   essential-token recall and formula integrity, see :func:`ratio_metrics`) and export
   the model (``<run_dir>/model`` + ``compressor.json``, ``models.compressor.save_compressor``).

The compress API for other stages is library code: ``models.compressor.load_scorer``
gives a run's scorer; ``data.compression.compress_batch`` turns one forward pass into
compressed ids at any ratios.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from data.arithmetic import (ESSENTIAL, FILLER, FILLER_SUB_RANK, Problem, align_spans,
                             generate_problems, load_problems, tokenizer_corpus)
from data.compression import keep_mask_batch
from data.formats import SEP
from data.tokenizers import Tokenizer, load_tokenizer, train_sentencepiece
from experiments import cli, run_config
from models import sharding
from models.compressor import Scorer, make_scorer, save_compressor
from models.encoder import TokenClassifier, ordinal_loss
from models.loop import train_loop
from models.metrics import MetricWriter
from models.optim import make_optimizer
from models.qwen3 import Qwen3, Qwen3Config
from models.training import create_train_state, make_train_step, masked_lm_loss, merge_model

__all__ = ["GRADE_SUPPORTING", "GRADE_ESSENTIAL", "Example", "token_grades", "annotate",
           "ratio_metrics", "ratio_table", "macro_f1", "evaluate", "label_policy", "build_model",
           "pack_rows", "sample_batch", "train", "main"]

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "experiments/extra_cot/configs/compressor.py"
TOKENIZER_FILE = "tokenizer.model"
GRADE_SUPPORTING, GRADE_ESSENTIAL = 3, 4
KEEP_GRADE = {"essential": GRADE_ESSENTIAL, "essential+supporting": GRADE_SUPPORTING}


# ----------------------------------------------------------------------------- data and metrics

@dataclasses.dataclass(frozen=True)
class Example:
    """One annotated problem, tokenized (CoT arrays have length N)."""

    uid: str
    question_ids: np.ndarray      # int32 [Q]
    cot_ids: np.ndarray           # int32 [N]
    grades: np.ndarray            # int8 [N], see token_grades
    span_index: np.ndarray        # int32 [N]: span of each token
    equations: np.ndarray         # int32: spans that count as equations (essential, supporting)
    equation_levels: np.ndarray   # int8: their levels
    reference_scores: np.ndarray  # float32 [N]: the annotation ranking (an oracle)


def token_grades(problem: Problem, span_index: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Ordinal grade of each CoT token, from its span's annotation::

        0 hedge, check, dead end    1 result narration    2 restatement of the givens
        3 supporting equation       4 essential (step) equation

    (filler grades are ``data.arithmetic.FILLER_SUB_RANK``; separators share their
    equation's level).
    """
    sub = np.array([FILLER_SUB_RANK.get(s.kind, 0) for s in problem.spans], np.int8)[span_index]
    return np.where(levels == FILLER, sub, levels + 2).astype(np.int8)


def annotate(problems: Sequence[Problem], tokenizer: Tokenizer) -> list[Example]:
    """Tokenize and align every problem (``data.arithmetic.align_spans``)."""
    out = []
    for p in problems:
        ann = align_spans(p, tokenizer)
        eqs = np.array([j for j, s in enumerate(p.spans) if s.is_equation and s.level > FILLER],
                       np.int32)
        out.append(Example(
            uid=p.uid, question_ids=np.asarray(tokenizer.encode(p.question), np.int32),
            cot_ids=ann.ids, grades=token_grades(p, ann.span_index, ann.levels),
            span_index=ann.span_index, equations=eqs,
            equation_levels=np.array([p.spans[j].level for j in eqs], np.int8),
            reference_scores=ann.scores))
    return out


def ratio_metrics(keep: np.ndarray, examples: Sequence[Example]) -> dict[str, float]:
    """Pooled quality of keep masks ``keep [B, >= N_b]`` (row b belongs to ``examples[b]``).

    - recall_essential: kept essential tokens / essential tokens;
    - integrity: equations (essential and supporting spans; checks and dead ends are
      filler and do not count) with every token kept / all equations;
    - integrity_essential: the same over essential equations only;
    - fractured: equations with some but not all tokens kept / all equations.
    """
    ess = ess_kept = eq = whole = fractured = ess_eq = ess_whole = 0
    for b, ex in enumerate(examples):
        k = np.asarray(keep[b, :len(ex.cot_ids)], bool)
        is_ess = ex.grades == GRADE_ESSENTIAL
        ess, ess_kept = ess + int(is_ess.sum()), ess_kept + int((k & is_ess).sum())
        size = int(ex.span_index.max(initial=-1)) + 1
        kept = np.bincount(ex.span_index, weights=k, minlength=size)[ex.equations]
        total = np.bincount(ex.span_index, minlength=size)[ex.equations]
        real = total > 0  # an equation with no token of its own cannot be judged
        full, essential = real & (kept == total), real & (ex.equation_levels == ESSENTIAL)
        eq, whole = eq + int(real.sum()), whole + int(full.sum())
        fractured += int((real & (kept > 0) & (kept < total)).sum())
        ess_eq, ess_whole = ess_eq + int(essential.sum()), ess_whole + int((full & essential).sum())
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"recall_essential": ratio(ess_kept, ess), "integrity": ratio(whole, eq),
            "integrity_essential": ratio(ess_whole, ess_eq), "fractured": ratio(fractured, eq)}


def macro_f1(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Mean over the classes keep and drop of F1 = 2 TP / (2 TP + FP + FN)."""
    predicted, gold = np.asarray(predicted, bool), np.asarray(gold, bool)
    if predicted.shape != gold.shape:
        raise ValueError(f"predicted {predicted.shape} and gold {gold.shape} differ in shape")
    f1 = []
    for p, g in ((predicted, gold), (~predicted, ~gold)):
        tp, denom = int((p & g).sum()), int(p.sum() + g.sum())
        f1.append(2 * tp / denom if denom else 1.0)
    return float(np.mean(f1))


def ratio_table(scores: np.ndarray, lengths: np.ndarray, examples: Sequence[Example],
                ratios: Sequence[float]) -> dict[str, float]:
    """``{f"{metric}@{ratio}": value}`` for top-k keep masks of ``scores`` at every ratio."""
    out = {}
    for g in ratios:
        for name, value in ratio_metrics(keep_mask_batch(scores, lengths, g), examples).items():
            out[f"{name}@{g:g}"] = value
    return out


def evaluate(scorer: Scorer, examples: Sequence[Example], *, ratios: Sequence[float],
             keep_grade: int) -> dict[str, float]:
    """Held-out metrics: ``ratio_table`` and, for a keep-logit scorer, keep/drop macro-F1
    of ``logit > 0`` against the policy labels ``grade >= keep_grade``."""
    scores, lengths = scorer.padded([e.question_ids for e in examples],
                                    [e.cot_ids for e in examples])
    out = ratio_table(scores, lengths, examples, ratios)
    if scorer.kind == "keep":
        pred = np.concatenate([scores[b, :n] > 0 for b, n in enumerate(lengths)])
        gold = np.concatenate([e.grades >= keep_grade for e in examples])
        out["macro_f1"] = macro_f1(pred, gold)
    return out


def label_policy(keep: str, grading: str) -> tuple[int, int]:
    """(num_grades, keep_grade) of the classifier for a label policy.

    'ordinal': the five grades of :func:`experiments.compressor_eval.token_grades`,
    keep iff grade >= KEEP_GRADE[keep]; 'binary': grades collapse to keep (1) / drop (0).
    """
    if keep not in KEEP_GRADE:
        raise ValueError(f"labels.keep={keep!r} must be one of {sorted(KEEP_GRADE)}")
    if grading == "ordinal":
        return GRADE_ESSENTIAL + 1, KEEP_GRADE[keep]
    if grading == "binary":
        return 2, 1
    raise ValueError(f"labels.grading={grading!r} must be 'ordinal' or 'binary'")


def model_grades(grades: np.ndarray, *, keep: str, grading: str) -> np.ndarray:
    """Token grades as the classifier sees them under the label policy."""
    return (grades >= KEEP_GRADE[keep]).astype(np.int8) if grading == "binary" else grades


def build_model(config: ml_collections.ConfigDict, vocab_size: int, *, rngs: nnx.Rngs
                ) -> TokenClassifier | Qwen3:
    m = config.model
    arch = Qwen3Config(vocab_size=int(vocab_size), hidden_size=m.hidden_size,
                       intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                       num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                       rope_theta=float(m.rope_theta), max_position_embeddings=4096)
    if config.kind == "surprisal":
        return Qwen3(arch, rngs=rngs)
    num_grades, keep_grade = label_policy(config.labels.keep, config.labels.grading)
    return TokenClassifier(arch, num_grades=num_grades, keep_grade=keep_grade, rngs=rngs)


# ----------------------------------------------------------------------------- batches

def pack_rows(examples: Sequence[Example], *, sep_id: int, max_length: int, keep: str,
              grading: str) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Rows ``question [SEP] cot`` and their grades (-1 off the CoT); rows longer than
    ``max_length`` lose their CoT tail. Returns (ids rows, grade rows, number cut)."""
    ids, grades, cut = [], [], 0
    for ex in examples:
        row = np.concatenate([ex.question_ids, [sep_id], ex.cot_ids]).astype(np.int32)
        g = np.concatenate([np.full(len(ex.question_ids) + 1, -1, np.int8),
                            model_grades(ex.grades, keep=keep, grading=grading)])
        if len(row) > max_length:
            cut += 1
            row, g = row[:max_length], g[:max_length]
        if np.any(g >= 0):
            ids.append(row)
            grades.append(g)
    return ids, grades, cut


def sample_batch(ids: Sequence[np.ndarray], grades: Sequence[np.ndarray], *, step: int,
                 seed: int, batch_tokens: int, bucket: int) -> dict[str, np.ndarray]:
    """Batch ``step``: a pure function of (seed, step), so a resumed run sees the same data.

    One random row picks the width (its length rounded up to a multiple of ``bucket``);
    ``max(1, batch_tokens // width)`` rows of that width bucket are drawn (the first is
    the picked row), so every step costs about the same. Returns right-padded
    ``tokens`` int32, ``mask`` bool and ``grades`` int32 (-1 = no label).
    """
    rng = np.random.default_rng([seed, step])
    widths = np.array([-(-len(r) // bucket) * bucket for r in ids])
    first = int(rng.integers(len(ids)))
    width = int(widths[first])
    size = max(1, batch_tokens // width)
    chosen = np.concatenate([[first], rng.choice(np.flatnonzero(widths == width), size - 1)])
    batch = {"tokens": np.zeros((size, width), np.int32), "mask": np.zeros((size, width), bool),
             "grades": np.full((size, width), -1, np.int32)}
    for b, i in enumerate(chosen):
        n = len(ids[i])
        batch["tokens"][b, :n], batch["grades"][b, :n] = ids[i], grades[i]
        batch["mask"][b, :n] = True
    return batch


def classifier_loss(model: TokenClassifier, batch, rng):
    """Ordinal loss of the CoT tokens of ``batch`` (see ``models.encoder.ordinal_loss``)."""
    del rng
    z = model.scores(batch["tokens"], attention_mask=batch["mask"])
    total, denom = ordinal_loss(z, model.thresholds(), batch["grades"])
    return total, denom, {}


def lm_loss(model: Qwen3, batch, rng):
    """Next-token loss on the CoT tokens (grade >= 0) given ``question [SEP]`` and earlier CoT."""
    del rng
    logits = model(batch["tokens"], attention_mask=batch["mask"])
    total, denom = masked_lm_loss(logits, batch["tokens"], batch["grades"] >= 0)
    return total, denom, {}


# ----------------------------------------------------------------------------- training

def train(config: ml_collections.ConfigDict, model: nnx.Module, ids, grades, *,
          run_dir: str, metadata: dict, mesh: Mesh | None = None) -> tuple[nnx.Module, dict]:
    """Optimise ``model`` for ``train.steps`` steps, resuming from the latest checkpoint.

    On the device mesh of ``config.mesh`` (None: FSDP over every device, nothing
    to shard on one) like experiments/extra_cot/sft.py: state placed by the logical-axis
    rules, batches padded with unlabelled rows (grades -1, no loss) to a
    multiple of ``data x fsdp`` and split over them.

    Returns (trained model, {'train_seconds', 'steps_per_second', 'final_loss'}).
    """
    tc = config.train
    optimizer, schedule = make_optimizer(tc.optim, name="train.optim")
    graphdef, state = create_train_state(model, optimizer, rng=config.seed)
    mesh = sharding.mesh_from_config(config.get("mesh")) if mesh is None else mesh
    state, shardings = sharding.place_state(state, mesh)
    loss_fn = lm_loss if config.kind == "surprisal" else classifier_loss
    step_fn = sharding.jit_train_step(make_train_step(graphdef, loss_fn, optimizer,
                                                      schedule=schedule), shardings)
    rows = sharding.batch_ways(mesh)

    def batch_fn(step: int):
        batch = sample_batch(ids, grades, step=step, seed=config.seed,
                             batch_tokens=tc.batch_tokens, bucket=tc.bucket)
        batch = sharding.pad_rows(batch, rows, fill={"grades": -1})
        return sharding.shard_batch(batch, mesh, process_local=False), 0

    result = train_loop(state, step_fn, batch_fn, steps=tc.steps, directory=run_dir,
                        checkpoint_every=tc.checkpoint_every, log_every=tc.log_every,
                        shardings=shardings, metadata=metadata, desc=f"train {config.kind}",
                        name=f"train {config.kind}")
    stats = {"train_seconds": result.seconds,
             "steps_per_second": (tc.steps - result.start) / max(result.seconds, 1e-9),
             "final_loss": result.final_loss}
    return merge_model(graphdef, result.state, average=True), stats


# ----------------------------------------------------------------------------- main

def _tokenizer(config, run_dir: str) -> Tokenizer:
    d = config.data
    if d.tokenizer_path:
        tokenizer = load_tokenizer(d.tokenizer_path)
    else:
        corpus = tokenizer_corpus(generate_problems(d.tokenizer_seed, d.tokenizer_problems))
        tokenizer = train_sentencepiece(corpus, vocab_size=d.vocab_size)
    if sharding.is_main_process():
        tokenizer.save(os.path.join(run_dir, TOKENIZER_FILE))
    return tokenizer


def main(config: ml_collections.ConfigDict, *, mesh: Mesh | None = None) -> dict:
    """Train, evaluate on held-out problems, export; returns the evaluation metrics.
    ``mesh``: the device mesh to train on (default: the one ``config.mesh`` names)."""
    run_dir = config.run_dir
    os.makedirs(run_dir, exist_ok=True)
    run_config.write_run_config(config, run_dir, resumable=("train.log_every", "eval.*"))
    tokenizer = _tokenizer(config, run_dir)
    sep_id = tokenizer.token_to_id(SEP)
    d = config.data
    problems = (load_problems(d.problems_path) if d.problems_path
                else generate_problems(d.train_seed, d.num_train))
    train_examples = annotate(problems[:d.num_train], tokenizer)
    # held-out problems from the training problems' distribution: the pipeline passes its
    # own (eval_path); generated ones follow data.arithmetic's defaults
    eval_problems = (load_problems(d.eval_path) if d.eval_path
                     else generate_problems(d.eval_seed, d.num_eval))
    eval_examples = annotate(eval_problems[:d.num_eval], tokenizer)
    ids, grades, cut = pack_rows(train_examples, sep_id=sep_id, max_length=config.train.max_length,
                                 keep=config.labels.keep, grading=config.labels.grading)
    log.info("%d training rows (%d cut to %d tokens)", len(ids), cut, config.train.max_length)
    model = build_model(config, tokenizer.vocab_size, rngs=nnx.Rngs(config.seed))
    arch = (model if isinstance(model, Qwen3) else model.backbone).config
    metadata = {"kind": config.kind, "architecture": dataclasses.asdict(arch), "sep_id": sep_id,
                "tokenizer": TOKENIZER_FILE, "labels": {"keep": config.labels.keep,
                                                        "grading": config.labels.grading}}
    if isinstance(model, TokenClassifier):
        metadata.update(num_grades=model.num_grades, keep_grade=model.keep_grade)
    model, stats = train(config, model, ids, grades, run_dir=run_dir, metadata=metadata,
                         mesh=mesh)
    save_compressor(model, run_dir, metadata, step=config.train.steps)
    scorer = make_scorer(model, sep_id=sep_id, batch_size=config.eval.batch_size)
    keep_grade = KEEP_GRADE[config.labels.keep]
    results = {**stats, **evaluate(scorer, eval_examples, ratios=config.eval.ratios,
                                   keep_grade=keep_grade)}
    with MetricWriter(run_dir) as writer:
        writer.write(config.train.steps, {f"eval/{k}": v for k, v in results.items()})
    print("  ".join(f"{k}={v:.4g}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    cli.run(main, default=DEFAULT_CONFIG)
