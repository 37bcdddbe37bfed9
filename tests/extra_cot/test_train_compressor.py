"""experiments/extra_cot/train_compressor.py: a training run on the test config, the compress API,
label grades and the quality metrics."""
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from data.arithmetic import generate_problem
from data.compression import compress_batch, num_kept, sentence_units, unit_keep_mask
from data.formats import SEP
from data.tokenizers import load_tokenizer
from experiments import cli
from experiments.extra_cot import train_compressor as tc
from models.compressor import load_compressor_model, load_scorer

CONFIG = "experiments/extra_cot/configs/compressor_test.py"
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, results) of one training run of the test config."""
    run_dir = tmp_path_factory.mktemp("compressor")
    config = cli.parse([f"--config={CONFIG}", f"--config.run_dir={run_dir}"])
    return config, tc.main(config)


@pytest.fixture(scope="module")
def trained(run):
    config, _ = run
    scorer, meta = load_scorer(config.run_dir, batch_size=4)
    tokenizer = load_tokenizer(os.path.join(config.run_dir, meta["tokenizer"]))
    examples = tc.annotate([generate_problem(99, i) for i in range(6)], tokenizer)
    return scorer, tokenizer, examples


def test_training_lowers_the_loss_on_held_out_rows(run, trained):
    config, results = run
    _, tokenizer, examples = trained
    assert results["steps_per_second"] > 0 and 0.0 <= results["macro_f1"] <= 1.0
    ids, grades, _ = tc.pack_rows(examples, sep_id=tokenizer.token_to_id(SEP), max_length=256,
                                  keep=config.labels.keep, grading=config.labels.grading)
    batch = tc.sample_batch(ids, grades, step=0, seed=5, batch_tokens=1024, bucket=256)
    initial = tc.build_model(config, tokenizer.vocab_size, rngs=nnx.Rngs(config.seed))
    final, meta = load_compressor_model(config.run_dir)
    assert meta["kind"] == "formula" and meta["keep_grade"] == tc.GRADE_SUPPORTING

    @jax.jit
    def loss(model):
        total, denom, _ = tc.classifier_loss(model, batch, None)
        return total / denom

    before, after = float(loss(initial)), float(loss(final))
    assert after < 0.8 * before, (before, after)


def test_compress_keeps_round_g_n_tokens_in_order_from_one_forward_pass(trained):
    scorer, _, examples = trained
    calls = []
    forward = scorer.forward
    scorer.forward = lambda *a: calls.append(1) or forward(*a)
    try:
        questions = [e.question_ids for e in examples]
        cots = [e.cot_ids.tolist() for e in examples]
        out = compress_batch(scorer, questions, cots, RATIOS)
        assert len(calls) == math.ceil(len(examples) / scorer.batch_size)  # all ratios, one pass
        scores = scorer(questions, cots)
    finally:
        scorer.forward = forward
    for row, cot, s in zip(out, cots, scores):
        order = np.argsort(-s, kind="stable")
        for g in RATIOS:
            k = int(math.floor(g * len(cot) + 0.5 + 1e-9))
            assert len(row[g]) == k == num_kept(len(cot), g)
            assert row[g] == [cot[t] for t in sorted(order[:k])]  # top-k, original order
        assert set(row) == set(RATIOS)


def test_compress_with_sentence_units_keeps_whole_sentences(trained):
    scorer, tokenizer, examples = trained
    questions = [e.question_ids for e in examples]
    cots = [e.cot_ids.tolist() for e in examples]
    pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    units = [sentence_units([pieces[t] for t in cot]) for cot in cots]
    out = compress_batch(scorer, questions, cots, RATIOS, units=units)
    scores = scorer(questions, cots)
    for row, cot, u, s in zip(out, cots, units, scores):
        for g in RATIOS:
            mask = unit_keep_mask(s[:len(cot)], u, g)
            assert row[g] == [t for t, k in zip(cot, mask) if k]
            assert len(row[g]) <= num_kept(len(cot), g)
            kept_units = {int(x) for x, k in zip(u, mask) if k}
            assert int(mask.sum()) == sum(int((u == x).sum()) for x in kept_units)
    with pytest.raises(ValueError, match="rows"):
        compress_batch(scorer, questions, cots, RATIOS, units=units[:1])


def test_second_run_resumes_from_the_checkpoint(run):
    config, results = run
    again = tc.main(config)  # the checkpoint holds the last step: nothing is retrained
    for key, value in results.items():
        if "@" in key or key == "macro_f1":
            assert again[key] == pytest.approx(value, abs=1e-9), key


def test_token_grades_follow_the_span_annotation(trained):
    _, tokenizer, _ = trained
    problem = next(p for p in (generate_problem(7, i) for i in range(50))
                   if {"partial", "check"} <= {s.kind for s in p.spans})
    ex = tc.annotate([problem], tokenizer)[0]
    want = {"step": 4, "partial": 3, "restate": 2, "narration": 1, "hedge": 0, "check": 0,
            "dead_end": 0}
    for t, j in enumerate(ex.span_index):
        span = problem.spans[j]
        expected = want.get(span.kind, {0: 0, 1: 3, 2: 4}[span.level])  # separators
        assert ex.grades[t] == expected, (t, span)
    levels = [problem.spans[j].level for j in ex.equations]
    assert levels == ex.equation_levels.tolist() and set(levels) == {1, 2}


def _example():
    # Tokens 0-1 filler (span 0), 2-4 essential equation (span 1), 5-6 supporting
    # equation (span 2), 7 filler check equation (span 3, not counted).
    return tc.Example(uid="x", question_ids=np.zeros(2, np.int32),
                      cot_ids=np.arange(8, dtype=np.int32),
                      grades=np.array([0, 2, 4, 4, 4, 3, 3, 0], np.int8),
                      span_index=np.array([0, 0, 1, 1, 1, 2, 2, 3], np.int32),
                      equations=np.array([1, 2], np.int32),
                      equation_levels=np.array([2, 1], np.int8),
                      reference_scores=np.linspace(1, 0.1, 8).astype(np.float32))


def test_ratio_metrics_by_hand():
    ex = _example()
    keep = np.array([[1, 0, 1, 1, 0, 1, 1, 1]], bool)  # essential eq fractured, supporting whole
    m = tc.ratio_metrics(keep, [ex])
    assert m == {"recall_essential": 2 / 3, "integrity": 1 / 2, "integrity_essential": 0.0,
                 "fractured": 1 / 2}
    keep = np.array([[0, 0, 1, 1, 1, 0, 0, 0]], bool)
    assert tc.ratio_metrics(keep, [ex]) == {"recall_essential": 1.0, "integrity": 0.5,
                                            "integrity_essential": 1.0, "fractured": 0.0}


def test_macro_f1_by_hand():
    pred = np.array([1, 1, 0, 0, 1], bool)
    gold = np.array([1, 0, 0, 0, 1], bool)
    # keep: TP 2, FP 1, FN 0 -> 4/5; drop: TP 2, FP 0, FN 1 -> 4/5
    assert tc.macro_f1(pred, gold) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="shape"):
        tc.macro_f1(pred, gold[:3])


def test_label_policies():
    assert tc.label_policy("essential+supporting", "ordinal") == (5, 3)
    assert tc.label_policy("essential", "ordinal") == (5, 4)
    assert tc.label_policy("essential", "binary") == (2, 1)
    grades = np.array([0, 1, 2, 3, 4], np.int8)
    assert tc.model_grades(grades, keep="essential", grading="binary").tolist() == [0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="labels.keep"):
        tc.label_policy("everything", "ordinal")


@pytest.mark.parametrize("override, key", [
    ("--config.labels.keep=formulas", "labels.keep"),
    ("--config.kind=tokenskip", "kind"),
    ("--config.train.steps=0", "train.steps"),
    ("--config.eval.ratios=0.2,1.5", "eval.ratios")])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(cli.ConfigError, match=key.replace(".", r"\.")):
        cli.parse([f"--config={CONFIG}", override])
