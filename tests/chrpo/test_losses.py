"""Policy losses: surrogate, KL, entropy, aggregation, weighting; values and grads."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import chrpo

LN2 = math.log(2.0)
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# rho = [0.5, 1, 1.5] for a positive and a negative advantage.
RHO_LOGP = jnp.log(jnp.array([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]]))
RHO_OLD = jnp.zeros((2, 3))
RHO_ADV = jnp.array([1.0, -1.0])


@pytest.mark.parametrize("dual_clip, row1", [
    (None, [0.8, 1.0, 1.5]),
    (1.3, [0.8, 1.0, 1.3]),   # the loss of a negative advantage is capped at -c A
])
def test_clipped_surrogate_hand(maybe_jit, dual_clip, row1):
    f = maybe_jit(chrpo.clipped_surrogate, eps_low=0.2, eps_high=0.28,
                  dual_clip=dual_clip)
    out = f(RHO_LOGP, RHO_OLD, RHO_ADV)
    # A = +1: -min(rho, clip(rho, .8, 1.28)) = [-.5, -1, -1.28]
    np.testing.assert_allclose(out, [[-0.5, -1.0, -1.28], row1], rtol=1e-6)


def test_clip_fractions_hand(maybe_jit):
    f = maybe_jit(chrpo.clip_fractions, eps_low=0.2, eps_high=0.28, dual_clip=1.3)
    out = f(RHO_LOGP, RHO_OLD, RHO_ADV)
    np.testing.assert_array_equal(out["clip_high"], [[0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(out["clip_low"], [[0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(out["dual_clip"], [[0, 0, 0], [0, 0, 1]])


def test_token_level_advantages_are_accepted():
    out = chrpo.clipped_surrogate(RHO_LOGP, RHO_OLD, jnp.broadcast_to(RHO_ADV[:, None],
                                                                      (2, 3)))
    np.testing.assert_allclose(out, chrpo.clipped_surrogate(RHO_LOGP, RHO_OLD, RHO_ADV))


@pytest.mark.parametrize("name, expected", [
    ("k1", [LN2, -LN2]),
    ("k2", [0.5 * LN2 ** 2, 0.5 * LN2 ** 2]),
    ("k3", [LN2 - 0.5, 1.0 - LN2]),   # e^u - 1 - u with u = -ln 2, +ln 2
])
def test_kl_estimators_hand(maybe_jit, name, expected):
    logp = jnp.log(jnp.array([[0.5, 0.25]]))
    ref = jnp.log(jnp.array([[0.25, 0.5]]))
    out = maybe_jit(chrpo.kl_divergence, estimator=name)(logp, ref)
    np.testing.assert_allclose(out, [expected], rtol=1e-5)


def test_k1_and_k3_are_unbiased_for_a_categorical():
    # Under x ~ p, E[k1] = E[k3] = KL(p || q) exactly (Schulman 2020).
    p = np.array([0.1, 0.2, 0.3, 0.4])
    q = np.array([0.4, 0.3, 0.2, 0.1])
    kl = float(np.sum(p * np.log(p / q)))
    logp, logq = jnp.log(jnp.array([p])), jnp.log(jnp.array([q]))
    for fn in (chrpo.kl_k1, chrpo.kl_k3):
        np.testing.assert_allclose(np.sum(p * np.asarray(fn(logp, logq))[0]), kl,
                                   rtol=1e-5)
    assert (np.asarray(chrpo.kl_k3(logp, logq)) >= 0).all()


def test_entropy_from_logits_hand(maybe_jit):
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, -jnp.inf, -jnp.inf, -jnp.inf],
                        [0.0, math.log(3.0), -jnp.inf, -jnp.inf]])
    out = maybe_jit(chrpo.entropy_from_logits)(logits)
    expected = [math.log(4.0), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_first_token_mask_hand(maybe_jit):
    out = maybe_jit(chrpo.first_token_mask)(jnp.array([[0, 1, 1], [0, 0, 0], [1, 0, 1]]))
    np.testing.assert_array_equal(out, [[0, 1, 0], [0, 0, 0], [1, 0, 0]])


AGG_LOSS = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
AGG_MASK = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (10.0, 4.0)),                 # (1+2+3+4, 4 tokens)
    ("seq-mean-token-mean", (2.0 + 4.0, 2.0)),   # row means 2 and 4; empty row not counted
    ("seq-mean-token-sum-norm", (10.0 / 4, 2.0)),  # token sums / max_len 4
])
def test_aggregation_hand(maybe_jit, mode, expected):
    total, den = maybe_jit(chrpo.aggregate, mode=mode, max_len=4)(AGG_LOSS, AGG_MASK)
    np.testing.assert_allclose([total, den], expected, rtol=1e-6)


def policy_batch():
    """Row 0: A = 2, three tokens. Row 1: A = -1, one token; -inf garbage elsewhere."""
    ninf = -jnp.inf
    logp = jnp.array([[-1.0, -2.0, -0.5], [ninf, -1.5, jnp.nan]])
    mask = jnp.array([[True, True, True], [False, True, False]])
    ref = jnp.where(mask, logp - LN2, ninf)   # u = -ln 2 -> k3 = ln 2 - 1/2
    return logp, mask, ref


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_hand(maybe_jit, mode):
    logp, mask, ref = policy_batch()
    beta, ent, w = 0.1, 0.01, 3.0
    f = maybe_jit(chrpo.policy_loss, kl_coef=beta, entropy_coef=ent, control_weight=w,
                  aggregation=mode, max_len=4)
    out = f(logp, logp, jnp.array([2.0, -1.0]), mask, ref_logp=ref,
            entropy=jnp.ones((2, 3)))
    # rho = 1, so l = -A + beta * k3 - ent * 1, times w on each row's first token.
    k3 = LN2 - 0.5
    row0, row1 = -2.0 + beta * k3 - ent, 1.0 + beta * k3 - ent
    sums = {"token-mean": ((w + 2) * row0 + w * row1, 4.0),
            "seq-mean-token-mean": ((w + 2) * row0 / 3 + w * row1, 2.0),
            "seq-mean-token-sum-norm": (((w + 2) * row0 + w * row1) / 4, 2.0)}
    np.testing.assert_allclose([out.loss_sum, out.denominator], sums[mode], rtol=1e-6)
    np.testing.assert_allclose(out.metrics["kl"], k3, rtol=1e-6)
    np.testing.assert_allclose(out.metrics["entropy"], 1.0)
    np.testing.assert_allclose(out.metrics["approx_kl"], 0.0, atol=1e-7)
    assert float(out.metrics["clip_high_fraction"]) == 0.0


def test_control_weight_targets_the_given_positions():
    logp, mask, ref = policy_batch()
    adv = jnp.array([2.0, -1.0])
    base = chrpo.policy_loss(logp, logp, adv, mask)
    same = chrpo.policy_loss(logp, logp, adv, mask, control_weight=1.0,
                             control_mask=jnp.ones((2, 3), bool))
    last = chrpo.policy_loss(logp, logp, adv, mask, control_weight=5.0,
                             control_mask=jnp.array([[0, 0, 1], [0, 0, 0]], bool))
    np.testing.assert_allclose(base.loss_sum, -2.0 * 3 + 1.0)
    np.testing.assert_allclose(same.loss_sum, base.loss_sum)
    np.testing.assert_allclose(last.loss_sum, -2.0 * 2 - 2.0 * 5 + 1.0)
    assert float(last.denominator) == float(base.denominator) == 4.0


def test_surrogate_gradients_match_finite_differences():
    logp = jnp.array([[-0.7, 0.05, 0.4], [0.3, -0.05, -0.6]]) - 1.0
    old = jnp.full((2, 3), -1.0)
    for dual in (None, 3.0):
        f = functools.partial(chrpo.clipped_surrogate, old_logp=old,
                              advantages=jnp.array([1.5, -0.5]), eps_low=0.2,
                              eps_high=0.28, dual_clip=dual)
        check_grads(jax.jit(f), (logp,), order=1, modes=("rev", "fwd"))


@pytest.mark.parametrize("name", ("k1", "k2", "k3"))
def test_kl_gradients_match_finite_differences(name):
    logp = jnp.array([[-1.0, -0.3, -2.0]])
    ref = jnp.array([[-1.4, -0.2, -1.1]])
    check_grads(jax.jit(functools.partial(chrpo.kl_divergence, estimator=name)),
                (logp, ref), order=2, modes=("rev", "fwd"))


def test_policy_loss_gradient_matches_finite_differences():
    key = jax.random.key(3)
    logp = -jax.random.uniform(key, (3, 4), minval=0.5, maxval=2.0)
    old = logp + 0.05 * jax.random.normal(jax.random.key(4), (3, 4))
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], bool)

    @jax.jit
    def loss(lp):
        out = chrpo.policy_loss(lp, old, jnp.array([1.0, -2.0, 0.5]), mask,
                                ref_logp=old - 0.3, kl_coef=0.2, control_weight=2.0,
                                aggregation="seq-mean-token-mean")
        return out.loss_sum / out.denominator

    check_grads(loss, (logp,), order=1, modes=("rev",))


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_reproduce_the_full_batch_loss_and_gradient(mode):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    logp = -jax.random.uniform(k1, (6, 5), minval=0.1, maxval=3.0)
    old = logp + 0.2 * jax.random.normal(k2, (6, 5))
    adv = jax.random.normal(k3, (6,))
    mask = jnp.arange(5)[None, :] < jnp.array([5, 1, 0, 3, 4, 2])[:, None]
    kw = dict(kl_coef=0.1, aggregation=mode, max_len=5, control_weight=3.0)

    def parts(lp, rows):   # (loss_sum, denominator) of the rows, for value_and_grad
        out = chrpo.policy_loss(lp[rows], old[rows], adv[rows], mask[rows],
                                ref_logp=old[rows], **kw)
        return out.loss_sum, out.denominator

    @jax.jit
    def full_and_accumulated(lp):
        (full_sum, full_den), g_full = jax.value_and_grad(
            lambda x: parts(x, slice(0, 6)), has_aux=True)(lp)
        (s1, d1), g1 = jax.value_and_grad(lambda x: parts(x, slice(0, 2)), has_aux=True)(lp)
        (s2, d2), g2 = jax.value_and_grad(lambda x: parts(x, slice(2, 6)), has_aux=True)(lp)
        # The accumulated gradient: sum the micro-batch gradients of the
        # sums, divide once by the summed denominators.
        return (full_sum, full_den, g_full / full_den), (s1 + s2, d1 + d2,
                                                         (g1 + g2) / (d1 + d2))

    (full_sum, full_den, g_full), (acc_sum, acc_den, g_acc) = full_and_accumulated(logp)
    np.testing.assert_allclose(acc_sum, full_sum, rtol=1e-5)
    np.testing.assert_allclose(acc_den, full_den)
    np.testing.assert_allclose(g_acc, g_full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_rows_and_batches_are_finite(mode):
    garbage = jnp.array([[jnp.nan, -jnp.inf, 0.0], [-jnp.inf, jnp.inf, jnp.nan]])
    mask = jnp.zeros((2, 3), bool)

    def loss(lp):
        out = chrpo.policy_loss(lp, garbage, jnp.array([jnp.nan, -1.0]), mask,
                                ref_logp=garbage, kl_coef=0.1, entropy=garbage,
                                entropy_coef=0.01, aggregation=mode, max_len=3,
                                dual_clip=2.0, control_weight=4.0)
        return out.loss_sum, (out.denominator, out.metrics)

    (total, (den, metrics)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        garbage)
    assert float(total) == 0.0 and float(den) == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    assert all(np.isfinite(v) for v in metrics.values())


def test_bfloat16_inputs_are_finite_and_close_to_float32():
    k1, k2 = jax.random.split(jax.random.key(1))
    logp = -jax.random.uniform(k1, (4, 8), minval=0.2, maxval=3.0)
    old = logp + 0.1 * jax.random.normal(k2, (4, 8))
    mask = jnp.arange(8)[None, :] < jnp.array([8, 5, 3, 1])[:, None]
    adv = jnp.array([1.0, -0.5, 0.25, 2.0])

    @functools.partial(jax.jit, static_argnums=0)
    def run(dtype):
        out = chrpo.policy_loss(logp.astype(dtype), old.astype(dtype), adv.astype(dtype),
                                mask, ref_logp=(old - 0.2).astype(dtype), kl_coef=0.1)
        return out.loss_sum / out.denominator

    low, high = run(jnp.bfloat16), run(jnp.float32)
    assert low.dtype == jnp.float32 and np.isfinite(low)
    np.testing.assert_allclose(low, high, rtol=5e-2, atol=1e-2)


@pytest.mark.parametrize("call, message", [
    (lambda: chrpo.policy_loss(RHO_LOGP, RHO_OLD, jnp.ones((2, 1)), jnp.ones((2, 3))),
     r"`advantages` must have shape \(2, 3\)"),
    (lambda: chrpo.policy_loss(RHO_LOGP, RHO_OLD, jnp.ones(3), jnp.ones((2, 3))),
     r"`advantages` must have shape \(2,\)"),
    (lambda: chrpo.policy_loss(RHO_LOGP, RHO_OLD, RHO_ADV, jnp.ones((2, 3)), kl_coef=0.1),
     "needs `ref_logp`"),
    (lambda: chrpo.policy_loss(RHO_LOGP, RHO_OLD, RHO_ADV, jnp.ones((2, 3)),
                               entropy_coef=0.1), "needs `entropy`"),
    (lambda: chrpo.policy_loss(RHO_LOGP, RHO_OLD, RHO_ADV, jnp.ones((2, 3)),
                               aggregation="seq-mean-token-sum-norm"), "max_len"),
    (lambda: chrpo.aggregate(AGG_LOSS, AGG_MASK, mode="sum"),
     "unknown aggregation mode 'sum'; valid names: 'seq-mean-token-mean', "
     "'seq-mean-token-sum-norm', 'token-mean'"),
    (lambda: chrpo.kl_divergence(RHO_LOGP, RHO_OLD, estimator="k4"),
     "unknown KL estimator 'k4'; valid names: 'k1', 'k2', 'k3'"),
    (lambda: chrpo.LossConfig(eps_low=1.0), "eps_low"),
    (lambda: chrpo.LossConfig(dual_clip=0.5), "dual_clip"),
    (lambda: chrpo.LossConfig(kl_coef=-1.0), "kl_coef"),
])
def test_loss_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# GSPO: rows with per-token ratios [2, 8, (pad)] and [0.5, 1, 2]; sequence ratios
# s_0 = exp((ln 2 + ln 8) / 2) = 4 and s_1 = exp((ln .5 + 0 + ln 2) / 3) = 1.
GSPO_LOGP = jnp.log(jnp.array([[2.0, 8.0, 5.0], [0.5, 1.0, 2.0]]))
GSPO_MASK = jnp.array([[True, True, False], [True, True, True]])


def test_sequence_importance_ratio_hand(maybe_jit):
    f = maybe_jit(chrpo.importance_ratio, level="sequence")
    np.testing.assert_allclose(f(GSPO_LOGP, jnp.zeros((2, 3)), GSPO_MASK),
                               [[4.0, 4.0, 4.0], [1.0, 1.0, 1.0]], rtol=1e-6)
    token = chrpo.importance_ratio(GSPO_LOGP, jnp.zeros((2, 3)))
    np.testing.assert_allclose(token, [[2.0, 8.0, 5.0], [0.5, 1.0, 2.0]], rtol=1e-6)
    empty = chrpo.importance_ratio(GSPO_LOGP, jnp.zeros((2, 3)), jnp.zeros((2, 3), bool),
                                   level="sequence")
    np.testing.assert_allclose(empty, np.ones((2, 3)))       # no token: ratio 1, no NaN
    with pytest.raises(ValueError, match="needs `mask`"):
        chrpo.importance_ratio(GSPO_LOGP, jnp.zeros((2, 3)), level="sequence")
    with pytest.raises(ValueError, match="importance level"):
        chrpo.importance_ratio(GSPO_LOGP, jnp.zeros((2, 3)), level="segment")


def _trl_sequence_loss(logp, old_logp, adv, mask, eps_low, eps_high):
    """TRL GRPOTrainer's importance_sampling_level='sequence' loss, written out in numpy
    from its formula: per-row mean log-ratio (count clamped at 1), clipped ratio,
    -min(coef_1 A, coef_2 A) on every token, then the per-sequence mean."""
    logp, old_logp, mask = np.asarray(logp, np.float64), np.asarray(old_logp), np.asarray(mask)
    log_w = ((logp - old_logp) * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)
    coef_1 = np.exp(log_w)[:, None]
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -np.minimum(coef_1 * adv[:, None], coef_2 * adv[:, None])
    return ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()


@pytest.mark.parametrize("adv", [[1.0, -1.0], [-0.5, 2.0]])
def test_gspo_preset_matches_the_sequence_level_formula(adv):
    cfg = chrpo.get_preset("gspo").loss
    assert (cfg.importance_level, cfg.aggregation, cfg.kl_coef) == (
        "sequence", "seq-mean-token-mean", 0.0)
    rng = np.random.default_rng(0)
    logp = jnp.asarray(rng.normal(-1.0, 0.3, (2, 3)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0.0, 1e-3, (2, 3)), jnp.float32)
    adv = jnp.asarray(adv)
    out = chrpo.policy_loss(logp, old, adv, GSPO_MASK, **dataclasses.asdict(cfg))
    want = _trl_sequence_loss(logp, old, np.asarray(adv), GSPO_MASK, cfg.eps_low, cfg.eps_high)
    np.testing.assert_allclose(float(out.loss_sum / out.denominator), want, rtol=1e-5)
    # by hand on the rows above: s = [4, 1] is clipped to [1.0004, 1] for A > 0
    hand = chrpo.policy_loss(GSPO_LOGP, jnp.zeros((2, 3)), jnp.array([1.0, 1.0]), GSPO_MASK,
                             eps_low=3e-4, eps_high=4e-4, importance_level="sequence",
                             aggregation="seq-mean-token-mean")
    np.testing.assert_allclose(float(hand.loss_sum / hand.denominator),
                               (-1.0004 - 1.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(hand.metrics["clip_high_fraction"]), 2 / 5)


def test_gspo_gradient_flows_through_the_mean_log_ratio():
    """d/d logp_t of -s_i A_i (unclipped) is -A_i s_i / |y_i| on each of the row's tokens."""
    mask = jnp.array([[True, True, False]])

    def loss(logp):
        out = chrpo.policy_loss(logp, jnp.zeros((1, 3)), jnp.array([2.0]), mask,
                                eps_low=0.9, eps_high=10.0, importance_level="sequence")
        return out.loss_sum / out.denominator

    logp = jnp.log(jnp.array([[2.0, 8.0, 5.0]]))
    g = jax.grad(loss)(logp)
    # token-mean over 2 tokens of -4 * 2 on each: d/dlogp_t = -(2 * 4 / 2) for t < 2
    np.testing.assert_allclose(g, [[-4.0, -4.0, 0.0]], rtol=1e-6)
