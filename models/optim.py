"""The optimiser of every trainer: AdamW from a config block, its schedule, and a
parameter EMA.

- ``make_optimizer(config)``: AdamW with a warmup + decay schedule, global-norm
  clipping, a weight-decay mask and, when ``ema_decay > 0``, an exponential
  moving average of the parameters kept in the optimiser state
  (``param_ema``), all built from an ml_collections block whose keys are
  ``OPTIMIZER_DEFAULTS``.
- ``ema_params(opt_state, params)``: the averaged parameters, to export in place
  of the last iterate (``params`` itself when the optimiser keeps no EMA).

Typical use::

    optimizer, schedule = make_optimizer(config.optim, name="optim")
    ...train with models.training.make_train_step...
    final = ema_params(state.opt_state, state.params)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

__all__ = ["OPTIMIZER_DEFAULTS", "default_optimizer_config", "make_schedule",
           "weight_decay_mask", "make_optimizer", "ParamEMAState", "param_ema", "ema_decay_at",
           "ema_params"]

Schedule = Callable[[jax.Array], jax.Array]

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
    "ema_decay": 0.0,            # parameter EMA (param_ema) when > 0; 0: the last iterate
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
    weight decay ``weight_decay`` on ``weight_decay_mask`` leaves, scaled by the schedule;
    with ``ema_decay > 0`` then ``param_ema(ema_decay)``, which passes the updates
    through and averages the updated parameters (read them with ``ema_params``).
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
    ema = _number(block, "ema_decay", name, low=0.0, high=1.0, high_open=True)
    schedule_fn = make_schedule(learning_rate=lr, schedule=block["schedule"],
                                warmup_steps=_warmup_steps(block["warmup"], total, name),
                                total_steps=total, min_lr_ratio=min_ratio)
    decay_embeddings = block["decay_embeddings"]
    adamw = optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=lambda p: weight_decay_mask(p, decay_embeddings=decay_embeddings))
    chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    averaged = [param_ema(ema)] if ema > 0 else []
    return optax.chain(*chain, adamw, *averaged), schedule_fn


# ----------------------------------------------------------------------------- parameter EMA

class ParamEMAState(NamedTuple):
    """``count``: updates averaged so far (int32); ``ema``: float32 parameter average."""
    count: jax.Array
    ema: Any


def ema_decay_at(decay: float, count: jax.Array) -> jax.Array:
    """The decay of update ``count`` (1-based): ``min(decay, (1 + count) / (10 + count))``.

    The warm-up term is TensorFlow's ``ExponentialMovingAverage(num_updates=...)``
    rule: early updates weigh more, so the average does not stay near the init
    for ``1 / (1 - decay)`` steps.
    """
    t = jnp.asarray(count, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def param_ema(decay: float) -> optax.GradientTransformation:
    """An optax transformation that averages the parameters and leaves the updates alone.

    Placed last in a chain, it sees the final update ``u_t`` of step ``t`` and
    keeps (in float32, in its state)::

        theta_t = theta_{t-1} + u_t
        ema_t   = d_t * ema_{t-1} + (1 - d_t) * theta_t,   d_t = ema_decay_at(decay, t)

    with ``ema_0 = theta_0``. Polyak-Ruppert / EMA weight averaging (as in
    Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima"): the
    average moves less with the last few batches than the iterate does. The
    state mirrors the parameter tree (its ``nnx.Param`` wrappers and sharding
    names included), so it shards and checkpoints like AdamW's moments.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"param_ema: decay={decay!r} must lie in (0, 1)")

    def init(params):
        return ParamEMAState(count=jnp.zeros([], jnp.int32),
                             ema=jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("param_ema needs the parameters: call update(updates, state, params)")
        count = state.count + 1
        d = ema_decay_at(decay, count)
        new = jax.tree.map(lambda e, p, u: d * e + (1.0 - d) * (p + u).astype(jnp.float32),
                           state.ema, params, updates)
        return updates, ParamEMAState(count=count, ema=new)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any, params: Any) -> Any:
    """The EMA that ``param_ema`` keeps in ``opt_state``, cast to ``params``' dtypes;
    ``params`` when the optimiser holds no ``ParamEMAState``."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamEMAState))
             if isinstance(s, ParamEMAState)]
    if not found:
        return params
    if len(found) > 1:
        raise ValueError(f"ema_params: the optimiser state holds {len(found)} parameter EMAs")
    return jax.tree.map(lambda e, p: e.astype(p.dtype), found[0].ema, params)
