"""Tests for models/optim.py (schedules, optimiser validation) and models/training.py
(token losses, train step)."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from models import optim, training

VOCAB, DIM, LENGTH = 7, 8, 6


class Buffer(nnx.Variable):
    """A non-trainable variable (stands in for a RoPE cache)."""


class TinyLM(nnx.Module):
    """Embed -> + buffer[position] -> RMSNorm -> Linear, called like the Qwen3 contract."""

    def __init__(self, *, rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.norm = nnx.RMSNorm(DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)
        self.table = Buffer(jnp.arange(LENGTH, dtype=jnp.float32) / LENGTH)

    def __call__(self, tokens, *, positions, attention_mask):
        x = self.embed(tokens) + self.table[...][positions][..., None]
        return self.head(self.norm(x)) * attention_mask[..., None]


def lm_loss(model, batch, rng):
    """Masked next-token loss; ``batch['scale']`` [B] multiplies the logits (NaN injection)."""
    del rng
    tokens = batch["tokens"]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits = model(tokens, positions=positions, attention_mask=jnp.ones_like(tokens))
    total, denom = training.masked_lm_loss(logits * batch["scale"][:, None, None], tokens,
                                           batch["mask"])
    return total, denom, {"target_tokens": denom, "micro_mean": total / denom}


def make_batch(rows, mask=None):
    starts = jnp.arange(rows) % VOCAB
    tokens = (starts[:, None] + jnp.arange(LENGTH)[None, :]) % VOCAB  # next = current + 1
    mask = jnp.ones_like(tokens) if mask is None else jnp.asarray(mask)
    return {"tokens": tokens.astype(jnp.int32), "mask": mask.astype(jnp.int32),
            "scale": jnp.ones((rows,), jnp.float32)}


def leaves_equal_bits(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    as_bytes = lambda x: (np.asarray(x).dtype, np.shape(x), np.asarray(x).tobytes())  # noqa: E731
    return all(as_bytes(x) == as_bytes(y) for x, y in pairs)


@pytest.fixture(scope="module")
def adam_setup():
    optimizer, schedule = optim.make_optimizer(optim.default_optimizer_config(
        learning_rate=0.05, schedule="constant", warmup=2, total_steps=100, weight_decay=0.01))
    graphdef, state = training.create_train_state(TinyLM(rngs=nnx.Rngs(0)), optimizer, rng=1)
    step = jax.jit(training.make_train_step(graphdef, lm_loss, optimizer, schedule=schedule))
    return state, step, schedule


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("kind, expected", [
    # lr 1, warmup 2, total 10, floor 0.1; at t=4: p = (4 - 2) / 8 = 0.25.
    ("cosine", [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1, 0.1]),
    ("linear", [0.5, 1.0, 1.0, 1.0 - 0.9 * 0.25, 0.55, 0.1, 0.1]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_schedule_hand_computed(kind, expected):
    _, fn = optim.make_optimizer({"learning_rate": 1.0, "schedule": kind, "warmup": 2,
                                  "total_steps": 10, "min_lr_ratio": 0.1})
    got = jax.jit(fn)(jnp.array([0, 1, 2, 4, 6, 10, 50]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_warmup_fraction_equals_steps():
    _, by_fraction = optim.make_optimizer({"warmup": 0.2, "total_steps": 10})
    _, by_steps = optim.make_optimizer({"warmup": 2, "total_steps": 10})
    ts = jnp.arange(12)
    np.testing.assert_array_equal(by_fraction(ts), by_steps(ts))
    assert float(by_steps(0)) == pytest.approx(0.5e-3)


@pytest.mark.parametrize("key, value, needle", [
    ("schedule", "cosin", "optimizer.schedule='cosin' must be one of"),
    ("warmup", 1.5, "optimizer.warmup=1.5"),
    ("warmup", 20, "optimizer.warmup=20"),
    ("learning_rate", 0.0, "optimizer.learning_rate=0.0 must lie in (0.0"),
    ("b2", 1.0, "optimizer.b2=1.0"),
    ("total_steps", 2.5, "optimizer.total_steps=2.5 must be a whole number"),
    ("grad_clip", -1.0, "optimizer.grad_clip=-1.0"),
    ("decay_embeddings", 1, "optimizer.decay_embeddings=1 must be a bool"),
    ("learing_rate", 0.1, "unknown optimizer key(s) ['optimizer.learing_rate']"),
])
def test_make_optimizer_names_bad_key(key, value, needle):
    with pytest.raises(ValueError) as err:
        optim.make_optimizer(ml_collections.ConfigDict({"total_steps": 10, key: value}))
    assert needle in str(err.value)


def test_make_optimizer_uses_the_block_name():
    with pytest.raises(ValueError, match=r"train\.optim\.eps=0\.0 must lie in \(0\.0, inf\]"):
        optim.make_optimizer({"eps": 0.0}, name="train.optim")


def test_weight_decay_mask_excludes_norms_biases_embeddings():
    params = {"embed": {"embedding": jnp.ones((5, 4))}, "norm": {"scale": jnp.ones(4)},
              "layers": {"q_norm": {"scale": jnp.ones((2, 4))}, "bias": jnp.ones((2, 4)),
                         "kernel": jnp.ones((2, 4, 4))},
              "head": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones(5)}}
    mask = optim.weight_decay_mask(params)
    assert mask == {"embed": {"embedding": False}, "norm": {"scale": False},
                    "layers": {"q_norm": {"scale": False}, "bias": False, "kernel": True},
                    "head": {"kernel": True, "bias": False}}
    assert optim.weight_decay_mask(params, decay_embeddings=True)["embed"]["embedding"]


def test_weight_decay_reaches_only_masked_params(adam_setup):
    optimizer, _ = optim.make_optimizer({"learning_rate": 0.5, "schedule": "constant",
                                         "warmup": 0, "total_steps": 10,
                                         "weight_decay": 0.1, "grad_clip": 0.0})
    params = adam_setup[0].params

    @jax.jit
    def update(p):
        return optimizer.update(jax.tree.map(jnp.zeros_like, p), optimizer.init(p), p)[0]

    updates = update(params)
    # Zero gradients: the AdamW update is exactly -lr * wd * p on decayed leaves, else 0.
    np.testing.assert_allclose(updates["head"]["kernel"][...],
                               -0.05 * params["head"]["kernel"][...], rtol=1e-6)
    for name in (("embed", "embedding"), ("norm", "scale"), ("head", "bias")):
        assert not np.any(np.asarray(updates[name[0]][name[1]][...]))


# ----------------------------------------------------------------------------- token losses

@pytest.mark.parametrize("use_jit", [False, True])
def test_token_logprobs_hand_computed(use_jit):
    logits = jnp.array([[[0.0, math.log(3.0)], [1.0, 1.0]]])  # softmax: [1/4, 3/4], [1/2, 1/2]
    targets = jnp.array([[1, 0]])
    fn = jax.jit(training.token_logprobs) if use_jit else training.token_logprobs
    np.testing.assert_allclose(fn(logits, targets), [[math.log(0.75), math.log(0.5)]], rtol=1e-6)


def test_token_logprobs_stable_and_float32():
    expected = -2.0 - math.log1p(math.exp(-2.0))  # log softmax([0, -2])[1]
    large = training.token_logprobs(jnp.array([[[1e4, 1e4 - 2.0, -1e4]]]), jnp.array([[1]]))
    np.testing.assert_allclose(large, [[expected]], atol=2e-3)  # float32 ulp at 1e4 is ~1e-3
    half = training.token_logprobs(jnp.array([[[2.0, 0.0]]], jnp.bfloat16), jnp.array([[1]]))
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, [[expected]], rtol=1e-6)  # bf16 inputs, float32 maths


def test_masked_lm_loss_shift_and_mask():
    logits = jnp.zeros((1, 4, 2)).at[0, 0, 1].set(math.log(3.0))  # position 0 predicts token 1
    tokens = jnp.array([[0, 1, 0, 1]])
    mask = jnp.array([[1, 1, 0, 1]])  # mask[:, 0] ignored; token 2 not a target
    total, denom = jax.jit(training.masked_lm_loss)(logits, tokens, mask)
    assert float(denom) == 2.0
    np.testing.assert_allclose(total, -math.log(0.75) + math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(training.next_token_logprobs(logits, tokens),
                               [[math.log(0.75), -math.log(2.0), -math.log(2.0)]], rtol=1e-6)


def test_masked_lm_loss_rejects_misaligned_mask():
    with pytest.raises(AssertionError):
        training.masked_lm_loss(jnp.zeros((1, 4, 2)), jnp.zeros((1, 4), jnp.int32),
                                jnp.ones((1, 3)))


# ----------------------------------------------------------------------------- train step

def test_train_step_lowers_loss(adam_setup):
    state, step, _ = adam_setup
    batch = make_batch(8)
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.3 * losses[0]
    assert int(state.step) == 40 and int(state.skipped_total) == 0
    assert float(metrics["target_tokens"]) == 8 * (LENGTH - 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_update_is_skipped(adam_setup, bad):
    state, step, schedule = adam_setup
    state, _ = step(state, make_batch(4))
    bad_batch = make_batch(4)
    bad_batch["scale"] = bad_batch["scale"].at[1].set(bad)
    after, metrics = step(state, bad_batch)
    assert leaves_equal_bits(after.params, state.params)
    assert leaves_equal_bits(after.opt_state, state.opt_state)
    assert (int(metrics["skipped"]), int(after.skipped_total), int(after.skipped_consecutive)) \
        == (1, 1, 1)
    after, _ = step(after, bad_batch)
    assert (int(after.skipped_total), int(after.skipped_consecutive)) == (2, 2)
    assert int(after.step) == 3 and not leaves_equal_bits(jax.random.key_data(after.rng),
                                                          jax.random.key_data(state.rng))
    # Two skipped updates did not advance the optimiser's count: lr is read at count 1.
    recovered, metrics = step(after, make_batch(4))
    assert (int(recovered.skipped_total), int(recovered.skipped_consecutive)) == (2, 0)
    assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(1)))
    assert not leaves_equal_bits(recovered.params, after.params)


def test_non_trainable_state_is_not_optimised(adam_setup):
    state, step, _ = adam_setup
    after, _ = step(state, make_batch(4))
    assert leaves_equal_bits(after.non_trainable, state.non_trainable)
    opt_shapes = {x.shape for x in jax.tree.leaves(after.opt_state)}
    assert (LENGTH,) not in opt_shapes  # the buffer has no Adam moments
    assert not leaves_equal_bits(after.params, state.params)


def test_accumulation_matches_one_big_batch():
    mask = np.ones((4, LENGTH), np.int32)
    mask[1, 3:] = 0
    mask[2, 2:] = 0  # targets per row 5, 2, 1, 5: micro-batches {0, 2} and {1, 3} hold 6 and 7
    batch = make_batch(4, mask)
    batch["scale"] = jnp.array([4.0, 1.0, 1.0, 1.0])  # make per-row losses differ
    sgd = optax.sgd(1.0)
    graphdef, state = training.create_train_state(TinyLM(rngs=nnx.Rngs(3)), sgd, rng=0)
    one = jax.jit(training.make_train_step(graphdef, lm_loss, sgd))
    two = jax.jit(training.make_train_step(graphdef, lm_loss, sgd, num_microbatches=2))
    s1, m1 = one(state, batch)
    s2, m2 = two(state, batch)
    # float32 sums in a different order: agreement to a few ulps.
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    assert float(m2["denominator"]) == float(m1["denominator"]) == 13.0
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The test can fail: the mean of the two micro-batch means (aux are averaged) differs.
    assert abs(float(m2["micro_mean"]) - float(m1["loss"])) > 1e-3
    assert float(m1["micro_mean"]) == pytest.approx(float(m1["loss"]), rel=1e-6)


def test_train_step_rejects_bad_microbatching():
    sgd = optax.sgd(1.0)
    graphdef, state = training.create_train_state(TinyLM(rngs=nnx.Rngs(0)), sgd, rng=0)
    with pytest.raises(ValueError, match="num_microbatches=0"):
        training.make_train_step(graphdef, lm_loss, sgd, num_microbatches=0)
    step = training.make_train_step(graphdef, lm_loss, sgd, num_microbatches=3)
    with pytest.raises(ValueError, match="num_microbatches=3"):
        step(state, make_batch(4))


def test_merge_model_round_trip():
    model = TinyLM(rngs=nnx.Rngs(5))
    graphdef, state = training.create_train_state(model, optax.sgd(0.1), rng=jax.random.key(2))
    merged = training.merge_model(graphdef, state)
    assert isinstance(merged, TinyLM) and merged is not model
    assert leaves_equal_bits(nnx.state(merged), nnx.state(model))
    assert jax.random.key_data(state.rng).tolist() == \
        jax.random.key_data(jax.random.key(2)).tolist()


def test_fresh_state_can_be_donated():
    """A freshly created state must not share buffers between leaves."""
    optimizer, schedule = optim.make_optimizer(optim.default_optimizer_config(
        learning_rate=0.01, schedule="constant", warmup=0, total_steps=10))
    graphdef, state = training.create_train_state(TinyLM(rngs=nnx.Rngs(0)), optimizer, rng=3)
    step = jax.jit(training.make_train_step(graphdef, lm_loss, optimizer, schedule=schedule),
                   donate_argnums=0)
    state, metrics = step(state, make_batch(4))
    state, metrics = step(state, make_batch(4))
    assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
