"""Token-level losses, the train state and a NaN-safe train step.

Shared by the SFT, compressor, RL and path-finding trainers (the optimiser is
``models.optim``, the resumable loop around the step ``models.loop``):

- ``token_logprobs`` / ``next_token_logprobs`` / ``masked_lm_loss``: float32,
  numerically stable log-probabilities; the next-token shift lives only in
  ``next_token_logprobs``.
- ``TrainState`` and ``create_train_state``: a checkpointable pytree
  (params, non-trainable model state, optimiser state, step, PRNG key,
  skip counters, algorithm extras).
- ``make_train_step``: a pure ``step(state, batch) -> (state, metrics)`` with
  gradient accumulation and skipping of non-finite updates; callers wrap it in
  ``jax.jit(..., donate_argnums=0)`` (with shardings where needed).
- ``check_finite_updates``: the host-side guard after each step: logs a
  skipped update, raises ``NonFiniteError`` after N skips in a row.

Typical use::

    optimizer, schedule = models.optim.make_optimizer(config.optim, name="optim")
    graphdef, state = create_train_state(model, optimizer, rng=config.seed)
    step = jax.jit(make_train_step(graphdef, loss_fn, optimizer, schedule=schedule,
                                   num_microbatches=config.train.microbatches),
                   donate_argnums=0)
    state, metrics = step(state, batch)   # metrics: loss, grad_norm, learning_rate, skipped, ...
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.optim import Schedule, ema_params

__all__ = [
    "token_logprobs", "next_token_logprobs", "masked_lm_loss",
    "TrainState", "create_train_state", "merge_model", "make_train_step",
    "NonFiniteError", "check_finite_updates", "require_applied_updates",
    "DEFAULT_MAX_CONSECUTIVE_SKIPS",
]

log = logging.getLogger(__name__)
DEFAULT_MAX_CONSECUTIVE_SKIPS = 10

LossFn = Callable[[nnx.Module, Any, jax.Array],
                  tuple[jax.Array, jax.Array, Mapping[str, jax.Array]]]

# ----------------------------------------------------------------------------- token losses

def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log softmax(logits)[..., targets]`` in float32: ``z_y - logsumexp(z)``.

    Args:
      logits: [B, T, V], any float dtype (upcast to float32 before the reduction).
      targets: [B, T] integer ids in [0, V).
    Returns:
      [B, T] float32 log-probabilities; never materialises the [B, T, V] log-softmax.
    """
    chex.assert_rank(logits, 3)
    chex.assert_rank(targets, 2)
    chex.assert_equal_shape_prefix((logits, targets), 2)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def next_token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """The one place of the next-token shift.

    ``out[:, t] = log p(tokens[:, t+1] | tokens[:, :t+1])``.

    Args:
      logits: [B, T, V] from running the model on ``tokens``.
      tokens: [B, T].
    Returns:
      [B, T-1] float32; column t scores token t+1. A mask over tokens aligns as ``mask[:, 1:]``.
    """
    chex.assert_rank(logits, 3)
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape_prefix((logits, tokens), 2)
    # Score all T columns against the targets shifted left (the last column gets
    # a dummy target, then is dropped): the same values as slicing logits[:, :-1],
    # without a [B, T-1, V] copy of the logits (and its padded gradient).
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    return token_logprobs(logits, targets)[:, :-1]


def masked_lm_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy as ``(sum, denominator)``.

    ``loss_mask[b, t] = 1`` marks token t as a prediction target (it is scored by
    the logits at t-1, see ``next_token_logprobs``); ``loss_mask[:, 0]`` is ignored::

        sum         = -sum_{b, t>=1} m[b, t] * log p(tokens[b, t] | tokens[b, :t])
        denominator =  sum_{b, t>=1} m[b, t]

    The mean loss is ``sum / denominator``; summing both over micro-batches or
    devices before dividing gives exactly the global token mean.
    """
    chex.assert_rank(loss_mask, 2)
    chex.assert_equal_shape((tokens, loss_mask))
    logp = next_token_logprobs(logits, tokens)
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return -jnp.sum(logp * mask), jnp.sum(mask)


# ----------------------------------------------------------------------------- train state

@flax.struct.dataclass
class TrainState:
    """Everything a training loop carries and checkpoints.

    Attributes:
      params: ``nnx.State`` of the model's ``nnx.Param`` leaves (the only thing optimised).
      non_trainable: the rest of the model state (e.g. caches); read-only in the step.
      opt_state: optimiser state over ``params``.
      step: int32, number of ``step`` calls (= batches consumed), skipped ones included.
      rng: typed PRNG key; each step splits it (Orbax saves typed keys exactly).
      skipped_total / skipped_consecutive: int32 counts of skipped (non-finite) updates.
      extra: algorithm state the step does not touch (e.g. a Lagrange multiplier).
    """
    params: Any
    non_trainable: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    skipped_total: jax.Array
    skipped_consecutive: jax.Array
    extra: Any = None


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                       rng: int | jax.Array, extra: Any = None) -> tuple[Any, TrainState]:
    """Split ``model`` into (graphdef, params, rest) and build the initial ``TrainState``.

    ``rng``: an int seed or a typed key (a raw uint32 key is wrapped as threefry).
    Returns ``(graphdef, state)``; pass ``graphdef`` to ``make_train_step``/``merge_model``.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if isinstance(rng, int):
        key = jax.random.key(rng)
    elif jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        key = rng
    else:
        key = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
    # Each counter gets its own buffer: a state that shares one array between
    # leaves cannot be donated to a jitted step ("donate the same buffer twice").
    def zero():
        return jnp.zeros((), jnp.int32)

    return graphdef, TrainState(params=params, non_trainable=rest, opt_state=optimizer.init(params),
                                step=zero(), rng=key, skipped_total=zero(),
                                skipped_consecutive=zero(), extra=extra)


def merge_model(graphdef: Any, state: TrainState, *, average: bool = False) -> nnx.Module:
    """The ``nnx.Module`` that ``state`` holds (for evaluation or sampling).

    ``average=True``: with the parameter EMA that the optimiser keeps
    (``models.optim.param_ema``, when ``ema_decay > 0``) in place of the last
    iterate; the parameters themselves when it keeps none. Export with it; sample
    the policy being trained without it.
    """
    params = ema_params(state.opt_state, state.params) if average else state.params
    return nnx.merge(graphdef, params, state.non_trainable)

# ----------------------------------------------------------------------------- train step

_STEP_METRICS = ("loss", "denominator", "grad_norm", "learning_rate", "skipped",
                 "skipped_total", "skipped_consecutive")


def _split_microbatches(batch: Any, num: int) -> Any:
    """[B, ...] -> [num, B // num, ...]; micro-batch i holds rows i, i + num, i + 2 num, ...

    The strided split keeps a batch that is sharded over its leading axis sharded
    inside every micro-batch (each micro-batch spans all devices).
    """
    def split(x):
        if x.ndim == 0 or x.shape[0] % num:
            raise ValueError(f"batch leaf of shape {x.shape} cannot be split into "
                             f"num_microbatches={num} equal micro-batches")
        x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(graphdef: Any, loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    schedule: Schedule | None = None, num_microbatches: int = 1
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Build a pure ``step(state, batch) -> (state, metrics)``.

    ``loss_fn(model, batch, rng) -> (sum, denominator, aux)`` with scalar ``sum``
    and ``denominator`` (the latter must not depend on the parameters; it is
    treated as a constant) and ``aux`` a dict of scalars. With micro-batches
    k = 1..A (``num_microbatches``, see ``_split_microbatches``)::

        loss = sum_k s_k / sum_k d_k,      grads = (sum_k grad s_k) / sum_k d_k

    which equals the one-batch result exactly in real arithmetic (float32
    accumulation). ``aux`` values are averaged over micro-batches.

    The update is skipped (params and opt_state bit-identical, ``skipped_total``
    and ``skipped_consecutive`` + 1) when the loss or any gradient is NaN/Inf, or
    when the denominator is 0. ``step`` and ``rng`` always advance. Only
    ``nnx.Param`` leaves are differentiated; ``non_trainable`` is read-only.

    Metrics (scalars): loss, denominator, grad_norm (global norm before clipping),
    learning_rate (``schedule`` at the applied-update count; only with
    ``schedule``), skipped (0/1), skipped_total, skipped_consecutive, plus ``aux``.
    """
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) \
            or num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches!r} must be an int >= 1")

    def micro_step(params, non_trainable, batch, rng):
        def objective(p):
            total, denom, aux = loss_fn(nnx.merge(graphdef, p, non_trainable), batch, rng)
            if jnp.shape(total) != () or jnp.shape(denom) != ():
                raise ValueError(f"loss_fn must return scalar (sum, denominator); got shapes "
                                 f"{jnp.shape(total)} and {jnp.shape(denom)}")
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in dict(aux or {}).items()}
            for name, v in aux.items():
                if v.shape != ():
                    raise ValueError(f"aux metric {name!r} must be a scalar, got shape {v.shape}")
                if name in _STEP_METRICS:
                    raise ValueError(f"aux metric {name!r} collides with a step metric")
            denom = jax.lax.stop_gradient(jnp.asarray(denom, jnp.float32))
            return jnp.asarray(total, jnp.float32), (denom, aux)

        (total, (denom, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return total, denom, aux, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    def accumulate(state, batch, rng):
        if num_microbatches == 1:
            return micro_step(state.params, state.non_trainable, batch, rng)
        micro = _split_microbatches(batch, num_microbatches)
        keys = jax.random.split(rng, num_microbatches)

        def body(carry, xs):
            total, denom, grads = carry
            t, d, aux, g = micro_step(state.params, state.non_trainable, *xs)
            return (total + t, denom + d, jax.tree.map(jnp.add, grads, g)), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), state.params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (total, denom, grads), auxs = jax.lax.scan(body, init, (micro, keys))
        return total, denom, jax.tree.map(lambda v: jnp.mean(v, axis=0), auxs), grads

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, step_rng = jax.random.split(state.rng)
        total, denom, aux, grads = accumulate(state, batch, step_rng)
        loss = total / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        ok = jnp.isfinite(loss) & (denom > 0) & _all_finite(grads)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        skipped = jnp.where(ok, 0, 1).astype(jnp.int32)
        new_state = state.replace(
            params=jax.tree.map(keep, new_params, state.params),
            opt_state=jax.tree.map(keep, new_opt_state, state.opt_state),
            step=state.step + 1, rng=rng,
            skipped_total=state.skipped_total + skipped,
            skipped_consecutive=jnp.where(ok, 0, state.skipped_consecutive + 1).astype(jnp.int32))
        metrics = {"loss": loss, "denominator": denom, "grad_norm": optax.tree.norm(grads),
                   "skipped": skipped, "skipped_total": new_state.skipped_total,
                   "skipped_consecutive": new_state.skipped_consecutive, **aux}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(
                schedule(state.step - state.skipped_total), jnp.float32)
        return new_state, metrics

    return step


class NonFiniteError(FloatingPointError):
    """Too many updates in a row had a non-finite loss or gradient; the run stops."""


def check_finite_updates(metrics: Mapping[str, Any], *, step: int, max_consecutive: int,
                         name: str = "train") -> int:
    """Host-side guard after ``make_train_step``: log each skip, stop after N in a row.

    ``metrics`` is the step's metrics dict (``skipped``, ``skipped_total``,
    ``skipped_consecutive``); ``step`` is the number of steps done, for the
    messages. A skipped update logs a warning naming the step and both counts;
    ``skipped_consecutive >= max_consecutive`` raises :class:`NonFiniteError`
    (the parameters are those of the last finite update, so the last checkpoint
    is good). Reads three scalars from the device (one sync per call).

    Returns:
      skipped_consecutive after this step.
    """
    if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) \
            or max_consecutive < 1:
        raise ValueError(f"max_consecutive={max_consecutive!r} must be an int >= 1")
    counts = jax.device_get({k: metrics[k] for k in
                             ("skipped", "skipped_total", "skipped_consecutive")})
    skipped, total, run = (int(counts[k]) for k in
                           ("skipped", "skipped_total", "skipped_consecutive"))
    if skipped:
        log.warning("%s: step %d skipped its update (non-finite loss or gradient; loss=%s); "
                    "%d skipped in a row, %d in total", name, step,
                    float(jax.device_get(metrics["loss"])) if "loss" in metrics else "n/a",
                    run, total)
    if run >= max_consecutive:
        raise NonFiniteError(
            f"{name}: {run} consecutive updates had a non-finite loss or gradient "
            f"(limit {max_consecutive}, reached at step {step}; {total} skipped in total). "
            "Stopping: lower the learning rate or check the data; the last checkpoint "
            "holds the last finite update.")
    return run


def require_applied_updates(state: TrainState, *, name: str = "train") -> None:
    """Raise :class:`NonFiniteError` when every update of ``state`` was skipped.

    A stage shorter than ``max_consecutive_skips`` steps whose every loss or
    gradient was non-finite would otherwise end normally and export its init
    model as if trained. Call it before exporting.
    """
    steps, skipped = int(jax.device_get(state.step)), int(jax.device_get(state.skipped_total))
    if steps > 0 and skipped >= steps:
        raise NonFiniteError(f"{name}: all {steps} updates had a non-finite loss or gradient "
                             "and were skipped; nothing was trained, so nothing is exported. "
                             "Lower the learning rate or check the data and the init model.")
