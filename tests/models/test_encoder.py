"""The bidirectional token classifier (models/encoder.py) and the scorers (models/compressor.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.compressor import keep_scorer, pad_rows, surprisal_scorer
from models.encoder import (TokenClassifier, cot_keep_logits, join_inputs, ordered_thresholds,
                            ordinal_loss)
from models.qwen3 import Qwen3, preset
from models.sampling import completion_logprobs

VOCAB, SEP = 40, 39


def _config():
    # A large init std makes every attention path clearly visible in the outputs.
    return preset("tiny", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=16, initializer_range=0.5)


@pytest.fixture(scope="module")
def model():
    return TokenClassifier(_config(), num_grades=5, keep_grade=3, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def padded_logits(model):
    """Jitted cot_keep_logits of the module's model on padded arrays."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda *a: cot_keep_logits(nnx.merge(graphdef, state), *a, sep_id=SEP))


@pytest.fixture(scope="module")
def keep_logits(padded_logits):
    """Keep logits of one unpadded (question, CoT) pair."""
    return lambda q, c: np.asarray(padded_logits(
        np.asarray([q]), np.ones((1, len(q)), bool), np.asarray([c]),
        np.ones((1, len(c)), bool)))[0]


QUESTION, COT = [3, 4, 5, 6, 7], [10, 11, 12, 13, 14, 15, 16]


def test_later_token_changes_earlier_scores(model, keep_logits):
    base = keep_logits(QUESTION, COT)
    changed = keep_logits(QUESTION, COT[:-1] + [30])
    assert np.all(np.abs(base[:-1] - changed[:-1]) > 1e-4)  # every earlier CoT token moved
    # The same change cannot reach earlier slots of the causal decoder (the test can fail).
    tokens, mask = join_inputs(jnp.asarray([QUESTION]), jnp.ones((1, 5), bool),
                               jnp.asarray([COT]), jnp.ones((1, 7), bool), sep_id=SEP)
    causal = jax.jit(lambda t: model.backbone.hidden_states(t, attention_mask=mask))
    np.testing.assert_array_equal(causal(tokens)[:, :-1], causal(tokens.at[0, -1].set(30))[:, :-1])


def test_scores_are_question_conditioned(keep_logits):
    base = keep_logits(QUESTION, COT)
    other = keep_logits([3, 4, 25, 6, 7], COT)
    assert np.all(np.abs(base - other) > 1e-4)


def test_padding_anywhere_gives_the_same_scores(padded_logits, keep_logits):
    reference = keep_logits(QUESTION, COT)
    # question right-padded (padding between question and CoT), CoT right-padded.
    q = np.zeros((2, 8), np.int32)
    qm = np.zeros((2, 8), bool)
    q[0, :5], qm[0, :5] = QUESTION, True
    q[1, 3:], qm[1, 3:] = QUESTION, True            # left-padded in row 1
    c, cm = pad_rows([COT, COT[:4]], width=9)
    out = np.asarray(padded_logits(q, qm, c, cm))
    np.testing.assert_allclose(out[0, :7], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1, :4], keep_logits(QUESTION, COT[:4]), rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(out[0, 7:])) and np.all(np.isneginf(out[1, 4:]))


def test_keep_scorer_matches_single_rows_whatever_the_chunking(model, keep_logits):
    rng = np.random.default_rng(0)
    qs = [rng.integers(1, 30, rng.integers(1, 9)).tolist() for _ in range(5)]
    cs = [rng.integers(1, 30, rng.integers(0, 12)).tolist() for _ in range(5)]
    cs[2] = COT
    alone = keep_scorer(model, sep_id=SEP, batch_size=1, bucket=32)(qs, cs)
    together = keep_scorer(model, sep_id=SEP, batch_size=8, bucket=32)(qs, cs)
    for q, c, a, b in zip(qs, cs, alone, together):
        assert a.shape == b.shape == (len(c),) and a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(alone[2], keep_logits(qs[2], COT), rtol=1e-5, atol=1e-5)


def test_surprisal_scorer_is_minus_the_completion_logprob():
    lm = Qwen3(_config(), rngs=nnx.Rngs(1))
    qs, cs = [[3, 4, 5], [6, 7, 8, 9, 1]], [[10, 11, 12, 13], [14, 15]]
    scores = surprisal_scorer(lm, sep_id=SEP, batch_size=4, bucket=8)(qs, cs)
    # Reference: the sampler's teacher-forced log-probs, prompt left-padded [q SEP].
    prompt, prompt_mask = np.zeros((2, 6), np.int32), np.zeros((2, 6), bool)
    for b, q in enumerate(qs):
        prompt[b, 6 - len(q) - 1:], prompt_mask[b, 6 - len(q) - 1:] = q + [SEP], True
    c, cm = pad_rows(cs, width=4)
    ref = np.asarray(jax.jit(completion_logprobs)(lm, prompt, prompt_mask, c, cm))
    for b, s in enumerate(scores):
        np.testing.assert_allclose(s, -ref[b, :len(cs[b])], rtol=1e-4, atol=1e-5)
        assert np.all(s > 0)
    with pytest.raises(ValueError, match="empty"):
        surprisal_scorer(lm, sep_id=None)([[]], [[1, 2]])


def _bce(x, y):
    return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 / (1 + math.exp(x))))


def test_ordinal_loss_by_hand():
    z = jnp.asarray([[0.0, 2.0, 5.0]])
    theta = jnp.asarray([0.0, 1.0])
    total, denom = ordinal_loss(z, theta, jnp.asarray([[0, 2, -1]]))
    expected = _bce(0, 0) + _bce(-1, 0) + _bce(2, 1) + _bce(1, 1)
    assert float(denom) == 2.0
    assert float(total) == pytest.approx(expected, rel=1e-6)
    # G = 2 is plain binary cross-entropy on the keep logit.
    total, _ = ordinal_loss(jnp.asarray([[1.5]]), jnp.asarray([0.5]), jnp.asarray([[1]]))
    assert float(total) == pytest.approx(_bce(1.0, 1), rel=1e-6)


def test_thresholds_are_increasing_and_keep_logit_uses_the_policy(model):
    theta = np.asarray(ordered_thresholds(jnp.asarray([0.3, -4.0, 2.0, -1.0])))
    assert np.all(np.diff(theta) > 0) and theta[0] == pytest.approx(0.3)
    tokens, mask = jnp.asarray([QUESTION]), jnp.ones((1, 5), bool)

    @jax.jit
    def both(m):
        z = m.scores(tokens, attention_mask=mask)
        return m(tokens, attention_mask=mask), z - m.thresholds()[2]

    keep, expected = both(model)
    np.testing.assert_allclose(keep, expected, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_grades=1, keep_grade=1), "num_grades"),
    (dict(num_grades=5, keep_grade=5), "keep_grade"),
    (dict(num_grades=3, keep_grade=0), "keep_grade")])
def test_bad_policy_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenClassifier(_config(), rngs=nnx.Rngs(0), **kwargs)
