"""Tests for models/loop.py: the resumable training loop of SFT, the compressor and the tree lab."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import optim, training
from models.loop import every_n_record, train_loop
from models.metrics import read_metrics


class Linear(nnx.Module):
    def __init__(self, *, rngs):
        self.lin = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.lin(x)


def loss_fn(model, batch, rng):
    del rng
    err = model(batch["x"])[:, 0] - batch["y"]
    return jnp.sum(err ** 2), jnp.float32(err.size), {}


def setup(ema_decay=0.0):
    optimizer, schedule = optim.make_optimizer({"learning_rate": 0.05, "total_steps": 12,
                                                "warmup": 0, "ema_decay": ema_decay})
    graphdef, state = training.create_train_state(Linear(rngs=nnx.Rngs(0)), optimizer, rng=0)
    step = jax.jit(training.make_train_step(graphdef, loss_fn, optimizer, schedule=schedule))
    return graphdef, state, step


def batch_fn(step):
    """A pure function of the step, as the loop's resume contract asks."""
    x = np.random.default_rng(step).normal(size=(4, 3)).astype(np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(x.sum(1))}, 4


def bits(tree):
    def raw(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x).dtype, np.asarray(x).tobytes()
    return [raw(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_run_stopped_and_resumed_is_the_straight_run(tmp_path, ema_decay):
    _, state, step = setup(ema_decay)
    straight = train_loop(state, step, batch_fn, steps=12, directory=str(tmp_path / "a"),
                          checkpoint_every=4, log_every=2, quiet=True, tensorboard=False)
    assert straight.start == 0 and straight.tokens == 48
    _, state, step = setup(ema_decay)
    first = train_loop(state, step, batch_fn, steps=5, directory=str(tmp_path / "b"),
                       checkpoint_every=4, log_every=2, quiet=True, tensorboard=False)
    assert first.start == 0
    _, state, step = setup(ema_decay)        # a new process: a fresh state, then the checkpoint
    resumed = train_loop(state, step, batch_fn, steps=12, directory=str(tmp_path / "b"),
                         checkpoint_every=4, log_every=2, quiet=True, tensorboard=False)
    assert resumed.start == 5 and resumed.tokens == 28
    assert bits(resumed.state) == bits(straight.state)
    assert resumed.final_loss == straight.final_loss and np.isfinite(resumed.final_loss)
    rows = read_metrics(tmp_path / "b")
    # the records of both calls, each step once: 2, 4, 5 (the end of the first call) ...
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 8, 10, 12]
    assert [r["step"] for r in read_metrics(tmp_path / "a")] == [2, 4, 6, 8, 10, 12]
    assert "train/loss" in rows[-1] and "train/grad_norm" in rows[-1]


def test_custom_records_and_bar_keys(tmp_path):
    _, state, step = setup()
    seen = []

    def record(done, state, metrics):
        seen.append(done)
        return {"loss": metrics["loss"], "probe": jnp.float32(done)} if done % 3 == 0 else {}

    result = train_loop(state, step, batch_fn, steps=6, directory=str(tmp_path),
                        checkpoint_every=100, record=record, loss_key="loss",
                        bar_keys={"loss": "loss"}, quiet=True, tensorboard=False)
    assert seen == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["probe"]) for r in read_metrics(tmp_path)] == [(3, 3.0), (6, 6.0)]
    assert result.final_loss == pytest.approx(read_metrics(tmp_path)[-1]["loss"])


def test_every_n_record_prefixes_and_keeps_the_last_step():
    record = every_n_record(4, 6, prefix="x/")
    assert record(4, None, {"loss": 1.0}) == {"x/loss": 1.0}
    assert record(5, None, {"loss": 1.0}) == {}
    assert record(6, None, {"loss": 2.0}) == {"x/loss": 2.0}


def test_non_finite_updates_stop_the_loop_with_a_good_last_checkpoint(tmp_path):
    _, state, step = setup()

    def bad_from_3(t):
        batch, n = batch_fn(t)
        return ({**batch, "x": batch["x"] * jnp.nan} if t >= 3 else batch), n

    with pytest.raises(training.NonFiniteError, match="2 consecutive updates"):
        train_loop(state, step, bad_from_3, steps=10, directory=str(tmp_path),
                   checkpoint_every=1, max_consecutive_skips=2, quiet=True, tensorboard=False)
    _, state, step = setup()
    again = train_loop(state, step, batch_fn, steps=5, directory=str(tmp_path),
                       checkpoint_every=1, quiet=True, tensorboard=False)
    # the stop comes before step 5's save: the run resumes after step 4 (a skipped update,
    # so the parameters are step 3's) and redoes step 5 with a good batch
    assert again.start == 4
    assert int(again.state.skipped_total) == 1 and int(again.state.step) == 5
