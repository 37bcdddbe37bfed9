"""Decoding the policy under a budget: the level log-probabilities, forced levels, the rule."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import chrpo
from data.arithmetic import ArithmeticConfig, generate_problems
from data.formats import LEVELS, build_prompt
from experiments.extra_cot.datasets import question_from_row, question_row
from experiments.extra_cot.evaluate import budget_decode_levels, method_plan
from experiments.extra_cot.rollouts import answer_questions, level_logprobs

ARITH = ArithmeticConfig(max_steps=2)
COSTS = np.array([0.2, 0.4, 0.6, 0.8, 1.0], np.float32)


@pytest.fixture(scope="module")
def tok(small_tok):          # tests/conftest.py
    return small_tok


@pytest.fixture(scope="module")
def model(tok, tiny_decoder):
    return tiny_decoder(tok.vocab_size, seed=3)


def _questions(stream, n):
    return [question_from_row(question_row(p)) for p in generate_problems(stream, n, ARITH)]


def test_level_logprobs_are_the_first_token_log_probabilities(tok, model):
    qs = _questions(5, 3)
    got = level_logprobs(model, tok, qs, levels=LEVELS, batch_size=2)   # 2 + a padded 1
    assert got.shape == (3, len(LEVELS)) and got.dtype == np.float32
    ids = [tok.control_ids[lv] for lv in LEVELS]
    for q, row in zip(qs, got):
        prompt = jnp.asarray([build_prompt(tok, q.question, control="policy")])
        logp = jax.nn.log_softmax(model(prompt)[0, -1].astype(jnp.float32))
        np.testing.assert_allclose(row, np.asarray(logp)[ids], atol=1e-5)
    assert np.all(got < 0) and len({tuple(r) for r in got.round(4)}) == 3


def test_answer_questions_opens_each_response_with_its_forced_level(tok, model):
    qs = _questions(6, 3)
    judged = answer_questions(model, tok, qs, control="policy", batch_size=3,
                              max_new_tokens=6, levels=[20, 80, 60])
    assert [j.level for j in judged] == [20, 80, 60]
    with pytest.raises(ValueError, match="one per question"):
        answer_questions(model, tok, qs, control="policy", batch_size=3, max_new_tokens=2,
                         levels=[20])
    with pytest.raises(ValueError, match=r"levels \[30\] have no control token"):
        answer_questions(model, tok, qs, control="policy", batch_size=3, max_new_tokens=2,
                         levels=[20, 30, 40])


def test_choose_levels_is_allocate_levels_rule_at_its_multiplier():
    rng = np.random.default_rng(0)
    u = jnp.asarray(np.log(rng.dirichlet(np.ones(5), size=40)).astype(np.float32))
    cost = jnp.broadcast_to(jnp.asarray(COSTS), u.shape)
    for budget in (0.25, 0.45, 0.7):
        choice, mu, mean = chrpo.allocate_levels(u, cost, budget, two_sided=True,
                                                 max_multiplier=1e4)
        rule = chrpo.choose_levels(u, cost, mu)
        # the allocation mixes a few questions at the final multiplier; the rule does not
        assert int(jnp.sum(rule != choice)) <= 3
        assert abs(float(jnp.mean(COSTS[np.asarray(rule)])) - budget) <= 0.06
    # a larger price never buys a dearer level
    cheap, dear = chrpo.choose_levels(u, cost, 5.0), chrpo.choose_levels(u, cost, 0.5)
    assert bool(jnp.all(cheap <= dear)) and int(jnp.sum(cheap < dear)) > 0
    with pytest.raises(ValueError, match="cost"):
        chrpo.choose_levels(u, cost[:3], 1.0)


def test_budget_decode_meets_the_budget_planned_on_validation(tok, model):
    val, test = _questions(7, 24), _questions(8, 12)
    lo_levels, lo = budget_decode_levels(model, tok, val, test, budget=0.3, costs=COSTS,
                                         batch_size=8)
    hi_levels, hi = budget_decode_levels(model, tok, val, test, budget=0.8, costs=COSTS,
                                         batch_size=8)
    assert len(lo_levels) == len(test) and set(lo_levels) <= set(LEVELS)
    assert abs(lo["val_planned_ratio"] - 0.3) <= 0.8 / len(val) + 1e-6
    assert abs(hi["val_planned_ratio"] - 0.8) <= 0.8 / len(val) + 1e-6
    assert hi["multiplier"] < lo["multiplier"]
    assert np.mean(hi_levels) > np.mean(lo_levels)
    assert lo["level_costs"]["20"] == pytest.approx(0.2)
    # at the ends of the range every question (decoded with the multiplier of its own
    # set) takes the cheapest / the dearest level
    ends = [budget_decode_levels(model, tok, val, val, budget=b, costs=COSTS,
                                 batch_size=8)[0] for b in (0.2, 1.0)]
    assert ends == [[20] * len(val), [100] * len(val)]
    with pytest.raises(ValueError, match="validation questions"):
        budget_decode_levels(model, tok, [], test, budget=0.3, costs=COSTS, batch_size=8)


def test_budget_decode_with_token_shares(tok, model):
    val, test = _questions(7, 24), _questions(8, 12)
    # weights of the mean one: the same levels and plan as the unweighted decode
    plain, a = budget_decode_levels(model, tok, val, test, budget=0.5, costs=COSTS, batch_size=8)
    ones, b = budget_decode_levels(model, tok, val, test, budget=0.5, costs=COSTS, batch_size=8,
                                   val_weights=np.ones(len(val)), weights=np.ones(len(test)))
    assert plain == ones and a["multiplier"] == pytest.approx(b["multiplier"])
    # the planned ratio is the token-weighted one: the mean of share x cost of each choice
    w = np.linspace(0.5, 1.5, len(test))
    levels, info = budget_decode_levels(model, tok, val, test, budget=0.5, costs=COSTS,
                                        batch_size=8, weights=w)
    want = np.mean([wi * COSTS[LEVELS.index(lv)] for wi, lv in zip(w, levels)])
    assert info["planned_ratio"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="weights for"):
        budget_decode_levels(model, tok, val, test, budget=0.5, costs=COSTS, batch_size=8,
                             weights=w[:-1])


def test_chrpo_budget_comes_with_chrpo_when_a_budget_is_set():
    block = ml_collections.ConfigDict({"levels": (20,), "tokenskip_levels": (),
                                       "methods": ("base", "chrpo")})
    assert method_plan(block) == [("base", None), ("chrpo", "policy")]
    assert method_plan(block, budget=0.3)[-1] == ("chrpo-budget", "policy")
    block.methods = ("base", "policy-warm-start")
    assert all(m != "chrpo-budget" for m, _ in method_plan(block, budget=0.3))
    block.methods, block.budget_decode = ("base", "chrpo"), False   # a peer's sweep run
    assert method_plan(block, budget=0.3) == [("base", None), ("chrpo", "policy")]
