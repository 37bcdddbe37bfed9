"""Tests for models/optim.py's parameter EMA (the AdamW block itself: test_training.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import optim, sharding, training


def test_ema_decay_warms_up_then_holds():
    got = [float(optim.ema_decay_at(0.99, t)) for t in (1, 2, 10, 1000)]
    np.testing.assert_allclose(got, [2 / 11, 3 / 12, 11 / 20, 0.99], rtol=1e-6)


def test_param_ema_hand_computed():
    """Two updates: ema_1 = d1 ema_0 + (1 - d1) theta_1, then ema_2 likewise with d2."""
    ema = optim.param_ema(0.5)
    params = {"w": jnp.array([1.0, 2.0])}
    state = ema.init(params)
    d1, d2 = min(0.5, 2 / 11), min(0.5, 3 / 12)
    updates = {"w": jnp.array([1.0, -1.0])}
    out, state = ema.update(updates, state, params)
    np.testing.assert_array_equal(out["w"], updates["w"])     # updates pass through
    theta1 = np.array([2.0, 1.0])
    want1 = d1 * np.array([1.0, 2.0]) + (1 - d1) * theta1
    np.testing.assert_allclose(state.ema["w"], want1, rtol=1e-6)
    _, state = ema.update({"w": jnp.array([2.0, 2.0])}, state, {"w": jnp.asarray(theta1)})
    np.testing.assert_allclose(state.ema["w"], d2 * want1 + (1 - d2) * np.array([4.0, 3.0]),
                               rtol=1e-6)
    assert int(state.count) == 2


def test_param_ema_needs_params_and_a_decay_below_one():
    with pytest.raises(ValueError, match="needs the parameters"):
        optim.param_ema(0.9).update({"w": jnp.ones(2)}, optim.param_ema(0.9).init(
            {"w": jnp.ones(2)}))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"decay=.* must lie in \(0, 1\)"):
            optim.param_ema(bad)


@pytest.mark.parametrize("value", [1.0, -0.5, "0.9"])
def test_make_optimizer_rejects_a_bad_ema_decay(value):
    with pytest.raises(ValueError, match=r"sft\.optim\.ema_decay="):
        optim.make_optimizer({"total_steps": 10, "ema_decay": value}, name="sft.optim")


def test_ema_params_without_an_ema_is_the_params():
    optimizer, _ = optim.make_optimizer({"total_steps": 10})
    params = {"w": jnp.ones(3)}
    assert optim.ema_params(optimizer.init(params), params) is params


class Linear(nnx.Module):
    def __init__(self, *, rngs):
        self.lin = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.lin(x)


def loss_fn(model, batch, rng):
    del rng
    err = model(batch["x"]) - batch["y"]
    return jnp.sum(err ** 2), jnp.float32(err.size), {}


def test_train_step_keeps_the_ema_and_merge_model_exports_it():
    """Through make_train_step: the EMA follows the iterates by its recursion, a skipped
    (non-finite) update leaves it alone, and merge_model(average=True) returns it."""
    optimizer, schedule = optim.make_optimizer({"learning_rate": 0.1, "total_steps": 10,
                                                "warmup": 0, "ema_decay": 0.9})
    graphdef, state = training.create_train_state(Linear(rngs=nnx.Rngs(0)), optimizer, rng=0)
    step = jax.jit(training.make_train_step(graphdef, loss_fn, optimizer, schedule=schedule))
    x = jnp.arange(12.0).reshape(3, 4) / 10
    batch = {"x": x, "y": jnp.ones((3, 2))}
    ema = jax.tree.map(np.asarray, state.params)
    for t in (1, 2, 3):
        state, _ = step(state, batch)
        d = float(optim.ema_decay_at(0.9, t))
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p), ema, state.params)
    state, metrics = step(state, {"x": x * jnp.nan, "y": batch["y"]})
    assert int(metrics["skipped"]) == 1
    averaged = nnx.split(training.merge_model(graphdef, state, average=True), nnx.Param, ...)[1]
    last = nnx.split(training.merge_model(graphdef, state), nnx.Param, ...)[1]
    for got, want, it in zip(jax.tree.leaves(averaged), jax.tree.leaves(ema),
                             jax.tree.leaves(last), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert not np.allclose(got, it)          # the average is not the last iterate


def test_ema_state_is_sharded_like_the_params(tiny_decoder):
    """The EMA mirrors the nnx.Param tree with its logical sharding names, so
    models.sharding places it like the parameters (and like AdamW's moments)."""
    optimizer, _ = optim.make_optimizer({"total_steps": 10, "ema_decay": 0.99})
    _, state = training.create_train_state(tiny_decoder(64), optimizer, rng=0)
    found = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda v: isinstance(
        v, optim.ParamEMAState)) if isinstance(s, optim.ParamEMAState)]
    assert len(found) == 1

    def names(tree):
        return [v.get_metadata().get("out_sharding")
                for v in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))]

    assert names(found[0].ema) == names(state.params)
    assert any(n is not None for n in names(state.params))
    assert {x.dtype for x in jax.tree.leaves(found[0].ema)} == {jnp.dtype(jnp.float32)}
    mesh = sharding.mesh_from_config(None)
    assert len(jax.tree.leaves(sharding.state_shardings(state, mesh))) == \
        len(jax.tree.leaves(state))
