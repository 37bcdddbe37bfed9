"""GRPO / Dr.GRPO / DAPO presets against their published formulas, and the registry.

Each reference below is the paper's objective written independently in numpy,
per prompt group, from the equation cited in its comment; chrpo computes the
same quantity with segment ids over an interleaved batch.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chrpo

G, PER, T, MAX_LEN = 3, 4, 7, 9   # prompts, rollouts per prompt, padded length, budget


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(7)
    n = G * PER
    group_ids = rng.permutation(np.repeat(np.arange(G), PER)).astype(np.int32)
    lengths = rng.integers(1, T + 1, n)
    mask = np.arange(T)[None, :] < lengths[:, None]
    logp = -rng.uniform(0.1, 3.0, (n, T)).astype(np.float32)
    old = (logp + 0.3 * rng.standard_normal((n, T))).astype(np.float32)
    ref = (logp + 0.2 * rng.standard_normal((n, T))).astype(np.float32)
    for a in (logp, old, ref):
        a[~mask] = -np.inf   # padding garbage the loss must ignore
    inputs = chrpo.RewardInputs(
        valid=rng.random(n) < 0.9, correct=rng.random(n) < 0.6,
        level=rng.choice([0.2, 0.4, 0.6, 0.8, 1.0], n).astype(np.float32),
        ratio=rng.uniform(0.1, 1.2, n).astype(np.float32),
        target=rng.choice([0.2, 0.4, 0.6], n).astype(np.float32),
        has_target=rng.random(n) < 0.8)
    rewards = np.asarray(chrpo.hierarchical_reward(*inputs), np.float64)
    for g in range(G):   # every group must carry signal for the comparison to bite
        assert np.ptp(rewards[group_ids == g]) > 0
    return dict(group_ids=group_ids, mask=mask, logp=logp, old=old, ref=ref,
                inputs=inputs, rewards=rewards)


def valid(b, name):
    """The array in float64 with its padding garbage replaced by 0."""
    return np.where(b["mask"], b[name], 0.0).astype(np.float64)


def per_token_clip_objective(b, adv, eps_low, eps_high):
    """min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) on valid tokens, 0 elsewhere."""
    m = b["mask"]
    rho = np.exp(valid(b, "logp") - valid(b, "old"))
    a = adv[:, None]
    obj = np.minimum(rho * a, np.clip(rho, 1 - eps_low, 1 + eps_high) * a)
    return np.where(m, obj, 0.0), rho


def chrpo_loss(b, config):
    loss, metrics = jax.jit(functools.partial(
        chrpo.chrpo_objective, num_groups=G, config=config))(
        b["logp"], b["old"], b["mask"], b["inputs"], b["group_ids"], ref_logp=b["ref"])
    assert float(metrics["clip_high_fraction"]) + float(metrics["clip_low_fraction"]) > 0
    return float(loss)


def test_grpo_preset_matches_deepseekmath(batch):
    # Shao et al. 2024 (DeepSeekMath), eq. 3 with the outcome-supervision
    # advantage of Sec. 4.1.2, A_i = (r_i - mean(r)) / std(r), and the KL
    # estimator of eq. 4, pi_ref/pi - log(pi_ref/pi) - 1:
    #   J = 1/G sum_i 1/|o_i| sum_t [min(rho A, clip(rho, 1-e, 1+e) A) - beta KL]
    # averaged over prompts; the loss is -J. eps = 0.2, beta = 0.04.
    b, beta = batch, 0.04
    adv = np.zeros(G * PER)
    for g in range(G):
        r = b["rewards"][b["group_ids"] == g]
        adv[b["group_ids"] == g] = (r - r.mean()) / r.std()
    obj, _ = per_token_clip_objective(b, adv, 0.2, 0.2)
    log_ratio = valid(b, "ref") - valid(b, "logp")
    kl = np.exp(log_ratio) - log_ratio - 1
    per_seq = (obj - beta * np.where(b["mask"], kl, 0.0)).sum(1) / b["mask"].sum(1)
    prompt_means = [per_seq[b["group_ids"] == g].mean() for g in range(G)]
    expected = -np.mean(prompt_means)
    np.testing.assert_allclose(chrpo_loss(b, chrpo.get_preset("grpo")), expected,
                               rtol=1e-4)


def test_drgrpo_preset_matches_liu_et_al(batch):
    # Liu et al. 2025 ("Understanding R1-Zero-Like Training"), the Dr. GRPO
    # objective: A_i = r_i - mean(r) (no std), and the token sum of each
    # response is not divided by |o_i|; as in their implementation the sum is
    # divided by a constant (the generation budget MAX_LEN) instead:
    #   J = 1/G sum_i sum_t min(rho A, clip(rho, 1-e, 1+e) A) / MAX_LEN
    # averaged over prompts; no KL term; the loss is -J.
    b = batch
    adv = np.zeros(G * PER)
    for g in range(G):
        r = b["rewards"][b["group_ids"] == g]
        adv[b["group_ids"] == g] = r - r.mean()
    obj, _ = per_token_clip_objective(b, adv, 0.2, 0.2)
    per_seq = obj.sum(1) / MAX_LEN
    expected = -np.mean([per_seq[b["group_ids"] == g].mean() for g in range(G)])
    config = chrpo.get_preset("drgrpo", max_len=MAX_LEN)
    np.testing.assert_allclose(chrpo_loss(b, config), expected, rtol=1e-4)


def test_dapo_preset_matches_yu_et_al(batch):
    # Yu et al. 2025 (DAPO), the J_DAPO objective: decoupled clip
    # [1 - 0.2, 1 + 0.28], group-normalised advantages, token-level loss
    #   J = 1 / sum_i |o_i| * sum_i sum_t min(rho A, clip(rho, .8, 1.28) A)
    # over all tokens of the batch; no KL term; the loss is -J.
    b = batch
    adv = np.zeros(G * PER)
    for g in range(G):
        r = b["rewards"][b["group_ids"] == g]
        adv[b["group_ids"] == g] = (r - r.mean()) / r.std()
    obj, rho = per_token_clip_objective(b, adv, 0.2, 0.28)
    assert ((rho > 1.2) & (rho < 1.28) & b["mask"]).any()   # clip-higher matters here
    expected = -obj.sum() / b["mask"].sum()
    np.testing.assert_allclose(chrpo_loss(b, chrpo.get_preset("dapo")), expected,
                               rtol=1e-4)


def test_preset_table():
    grpo, dapo = chrpo.get_preset("grpo"), chrpo.get_preset("dapo")
    drgrpo = chrpo.get_preset("drgrpo", max_len=64)
    assert (grpo.advantage.estimator, grpo.loss.aggregation, grpo.loss.kl_coef) == (
        "grpo", "seq-mean-token-mean", 0.04)
    assert (drgrpo.advantage.estimator, drgrpo.loss.aggregation, drgrpo.loss.max_len,
            drgrpo.loss.kl_coef) == ("drgrpo", "seq-mean-token-sum-norm", 64, 0.0)
    assert (dapo.loss.eps_low, dapo.loss.eps_high, dapo.loss.aggregation,
            dapo.loss.kl_coef) == (0.2, 0.28, "token-mean", 0.0)
    assert chrpo.get_preset("chrpo").advantage.estimator == "hierarchical"


def test_registry_lookups():
    assert chrpo.get_advantage_estimator("rloo") is chrpo.rloo_advantages
    assert chrpo.get_kl_estimator("k2") is chrpo.kl_k2
    assert chrpo.get_aggregation("token-mean") is chrpo.token_mean
    assert chrpo.available() == {
        "advantage": ("drgrpo", "grpo", "grpo-batch", "hierarchical", "rloo"),
        "kl": ("k1", "k2", "k3"),
        "aggregation": ("seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean"),
        "preset": ("chrpo", "dapo", "drgrpo", "grpo", "gspo", "lcpo-exact", "lcpo-max",
                   "length-penalty")}


@pytest.mark.parametrize("call, message", [
    (lambda: chrpo.get_preset("ppo"),
     "unknown preset 'ppo'; valid names: 'chrpo', 'dapo', 'drgrpo', 'grpo'"),
    (lambda: chrpo.get_preset("drgrpo"), "max_len"),
    (lambda: chrpo.get_preset("grpo", kl_coeff=0.1), "unknown ChrpoConfig field 'kl_coeff'"),
    (lambda: chrpo.get_advantage_estimator("gae"), "valid names: 'drgrpo', 'grpo'"),
    (lambda: chrpo.get_kl_estimator("k0"), "valid names: 'k1', 'k2', 'k3'"),
    (lambda: chrpo.get_aggregation("mean"), "valid names: 'seq-mean-token-mean'"),
    (lambda: chrpo.ChrpoConfig().replace(b_cal=0.05), "b_cal"),
])
def test_registry_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_config_replace_routes_flat_keys_and_is_jit_static():
    base = chrpo.ChrpoConfig()
    new = base.replace(kl_coef=0.5, b_cal=0.3, estimator="rloo")
    assert (new.loss.kl_coef, new.reward.b_cal, new.advantage.estimator) == (
        0.5, 0.3, "rloo")
    assert base.loss.kl_coef == 0.0   # frozen: the original is unchanged
    flat = new.as_flat_dict()
    assert flat["kl_coef"] == 0.5 and len(flat) == sum(
        len(dataclasses.fields(p)) for p in (new.reward, new.advantage, new.loss))
    assert hash(new) == hash(base.replace(kl_coef=0.5, b_cal=0.3, estimator="rloo"))
    f = jax.jit(chrpo.compute_advantages, static_argnames=("num_groups", "config"))
    inputs = chrpo.RewardInputs(jnp.ones(2, bool), jnp.array([True, False]),
                                jnp.full(2, 0.4), jnp.full(2, 0.3), jnp.full(2, 0.4),
                                jnp.ones(2, bool))
    a_grpo, _ = f(inputs, jnp.zeros(2, jnp.int32), num_groups=1, config=base)
    a_rloo, _ = f(inputs, jnp.zeros(2, jnp.int32), num_groups=1, config=new)
    # base: R = [1.5, 0], grpo gives +-1 (up to eps); new: b_cal 0.3 makes
    # R = [1.6, 0] and rloo gives R_i - R_other = +-1.6.
    np.testing.assert_allclose(a_grpo, [1.0, -1.0], rtol=1e-5)
    np.testing.assert_allclose(a_rloo, [1.6, -1.6], rtol=1e-6)
