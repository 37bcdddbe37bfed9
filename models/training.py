"""Optimiser, token-level losses, train state and a NaN-safe train step.

Everything here is shared by the SFT, compressor, RL and path-finding scripts:

- ``make_optimizer(config)``: AdamW with a warmup + decay schedule, global-norm
  clipping and a weight-decay mask, built from an ml_collections block.
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

    optimizer, schedule = make_optimizer(config.optim, name="optim")
    graphdef, state = create_train_state(model, optimizer, rng=config.seed)
    step = jax.jit(make_train_step(graphdef, loss_fn, optimizer, schedule=schedule,
                                   num_microbatches=config.train.microbatches),
                   donate_argnums=0)
    state, metrics = step(state, batch)   # metrics: loss, grad_norm, learning_rate, skipped, ...
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

__all__ = [
    "OPTIMIZER_DEFAULTS", "default_optimizer_config", "make_schedule", "weight_decay_mask",
    "make_optimizer", "token_logprobs", "next_token_logprobs", "masked_lm_loss",
    "TrainState", "create_train_state", "merge_model", "make_train_step",
    "NonFiniteError", "check_finite_updates", "require_applied_updates",
    "DEFAULT_MAX_CONSECUTIVE_SKIPS",
]

log = logging.getLogger(__name__)
DEFAULT_MAX_CONSECUTIVE_SKIPS = 10

Schedule = Callable[[jax.Array], jax.Array]
LossFn = Callable[[nnx.Module, Any, jax.Array],
                  tuple[jax.Array, jax.Array, Mapping[str, jax.Array]]]

# Every key an optimiser block may hold, with its default (AdamW, paper-style cosine).
OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "schedule": "cosine",        # 'cosine' | 'linear' | 'constant' (after warmup)
    "warmup": 0.05,              # fraction of total_steps in [0, 1), or whole steps >= 1
    "total_steps": 1000,
    "min_lr_ratio": 0.0,         # final learning rate = learning_rate * min_lr_ratio
    "weight_decay": 0.0,
    "decay_embeddings": False,   # False: embeddings are excluded from weight decay
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "grad_clip": 1.0,            # global-norm clip; 0 disables
}
_SCHEDULES = ("cosine", "linear", "constant")


def default_optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
    """An optimiser block holding every key of ``OPTIMIZER_DEFAULTS`` (plus overrides)."""
    unknown = sorted(set(overrides) - set(OPTIMIZER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown optimizer key(s) {unknown}; known: {sorted(OPTIMIZER_DEFAULTS)}")
    return ml_collections.ConfigDict({**OPTIMIZER_DEFAULTS, **overrides})


def make_schedule(*, learning_rate: float, schedule: str, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> Schedule:
    """Learning rate as a function of the number ``t`` of applied updates (0-based).

    With peak ``lr``, warmup ``W``, total ``T`` and floor ``lr_min = lr * min_lr_ratio``::

        t <  W:  lr * (t + 1) / W                          (linear warmup; no wasted step)
        t >= W:  p = clip((t - W) / (T - W), 0, 1)
                 cosine:   lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2
                 linear:   lr - (lr - lr_min) * p
                 constant: lr
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {_SCHEDULES}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}]")
    peak, floor = float(learning_rate), float(learning_rate) * float(min_lr_ratio)
    decay_len = max(total_steps - warmup_steps, 1)

    def schedule_fn(count):
        t = jnp.asarray(count, jnp.float32)
        warm = peak * (t + 1.0) / max(warmup_steps, 1)
        p = jnp.clip((t - warmup_steps) / decay_len, 0.0, 1.0)
        if schedule == "cosine":
            after = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        elif schedule == "linear":
            after = peak - (peak - floor) * p
        else:
            after = jnp.full_like(p, peak)
        return jnp.where(t < warmup_steps, warm, after)

    return schedule_fn


def _path_names(path) -> list[str]:
    names = []
    for entry in path:
        name = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))
        names.append(str(name).lower())
    return [n for n in names if n != "value"]  # nnx.Variable's own attribute


def weight_decay_mask(params: Any, *, decay_embeddings: bool = False) -> Any:
    """Pytree of bools, True where weight decay applies.

    Excluded: leaves of rank < 2, any leaf under a name containing 'norm', leaves
    named 'bias' or 'scale' (also when stacked over layers), and, unless
    ``decay_embeddings``, any leaf under a name containing 'embed'.
    """
    def decide(path, leaf):
        names = _path_names(path)
        if jnp.ndim(leaf) < 2 or any("norm" in n for n in names):
            return False
        if names and names[-1] in ("bias", "scale"):
            return False
        return decay_embeddings or not any("embed" in n for n in names)

    return jax.tree_util.tree_map_with_path(decide, params)


def _number(block, key: str, name: str, *, low: float, high: float = math.inf,
            low_open: bool = False, high_open: bool = False, integer: bool = False) -> float:
    value = block[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}.{key}={value!r} must be a number")
    if integer and value != int(value):
        raise ValueError(f"{name}.{key}={value!r} must be a whole number")
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if not math.isfinite(value) or bad_low or bad_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}.{key}={value!r} must lie in {interval}")
    return int(value) if integer else float(value)


def _warmup_steps(warmup: Any, total_steps: int, name: str) -> int:
    """``warmup`` in [0, 1) is a fraction of ``total_steps``; a whole number >= 1 is steps."""
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) \
            or not math.isfinite(warmup):
        raise ValueError(f"{name}.warmup={warmup!r} must be a number")
    if 0 <= warmup < 1:
        return int(round(warmup * total_steps))
    if warmup >= 1 and warmup == int(warmup) and warmup <= total_steps:
        return int(warmup)
    raise ValueError(f"{name}.warmup={warmup!r} must be a fraction in [0, 1) or whole "
                     f"steps in [1, total_steps={total_steps}]")


def make_optimizer(config: Mapping[str, Any], *, name: str = "optimizer"
                   ) -> tuple[optax.GradientTransformation, Schedule]:
    """AdamW from an optimiser block (keys: ``OPTIMIZER_DEFAULTS``; missing keys take defaults).

    ``name`` is the block's config key, used in error messages (e.g. ``'train.optim'``).

    Update: ``clip_by_global_norm(grad_clip)`` then AdamW(b1, b2, eps) with decoupled
    weight decay ``weight_decay`` on ``weight_decay_mask`` leaves, scaled by the schedule.
    The schedule counts *applied* updates (a skipped step does not advance it).

    Returns:
      (optimizer, schedule_fn).
    Raises:
      ValueError naming the key for unknown keys or out-of-range values.
    """
    given = dict(config.items()) if hasattr(config, "items") else dict(config)
    unknown = sorted(set(given) - set(OPTIMIZER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown {name} key(s) {[f'{name}.{k}' for k in unknown]}; "
                         f"known: {sorted(OPTIMIZER_DEFAULTS)}")
    block = {**OPTIMIZER_DEFAULTS, **given}
    if block["schedule"] not in _SCHEDULES:
        raise ValueError(f"{name}.schedule={block['schedule']!r} must be one of {_SCHEDULES}")
    if not isinstance(block["decay_embeddings"], bool):
        raise ValueError(f"{name}.decay_embeddings={block['decay_embeddings']!r} must be a bool")
    lr = _number(block, "learning_rate", name, low=0.0, low_open=True)
    total = _number(block, "total_steps", name, low=1, integer=True)
    min_ratio = _number(block, "min_lr_ratio", name, low=0.0, high=1.0)
    weight_decay = _number(block, "weight_decay", name, low=0.0)
    b1 = _number(block, "b1", name, low=0.0, high=1.0, high_open=True)
    b2 = _number(block, "b2", name, low=0.0, high=1.0, high_open=True)
    eps = _number(block, "eps", name, low=0.0, low_open=True)
    clip = _number(block, "grad_clip", name, low=0.0)
    schedule_fn = make_schedule(learning_rate=lr, schedule=block["schedule"],
                                warmup_steps=_warmup_steps(block["warmup"], total, name),
                                total_steps=total, min_lr_ratio=min_ratio)
    decay_embeddings = block["decay_embeddings"]
    adamw = optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=lambda p: weight_decay_mask(p, decay_embeddings=decay_embeddings))
    chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    return optax.chain(*chain, adamw), schedule_fn


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


def merge_model(graphdef: Any, state: TrainState) -> nnx.Module:
    """The ``nnx.Module`` that ``state`` holds (for evaluation or sampling)."""
    return nnx.merge(graphdef, state.params, state.non_trainable)

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
