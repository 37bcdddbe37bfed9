"""Private helpers shared by the chrpo modules: entry checks and masked reductions.

Every public function checks its inputs here first, so a wrong shape or an
unknown name fails at trace time with a message that names the function, the
argument and the offending value.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray
T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, *, kind: str) -> T:
    """Returns ``table[name]``; raises ValueError listing the valid names."""
    if name not in table:
        valid = ", ".join(repr(k) for k in sorted(table))
        raise ValueError(f"unknown {kind} {name!r}; valid names: {valid}")
    return table[name]


def check_rank(fn: str, name: str, x: Any, rank: int | tuple[int, ...]) -> Array:
    """Converts ``x`` to an array and checks its rank (one rank or a tuple)."""
    x = jnp.asarray(x)
    ranks = (rank,) if isinstance(rank, int) else rank
    if x.ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(
            f"{fn}: `{name}` must have rank {want}, got shape {tuple(x.shape)}")
    return x


def check_shape(fn: str, name: str, x: Any, shape: tuple[int, ...]) -> Array:
    """Converts ``x`` to an array and checks it has exactly ``shape``."""
    x = jnp.asarray(x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{fn}: `{name}` must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def check_integer(fn: str, name: str, x: Array) -> Array:
    """Checks that ``x`` has an integer dtype (segment ids, lengths)."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{fn}: `{name}` must be integer, got dtype {x.dtype}")
    return x


def check_positive_int(fn: str, name: str, value: Any) -> int:
    """Checks a static (Python) positive integer such as ``num_groups``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{fn}: `{name}` must be a static Python int, got {value!r}")
    if value < 1:
        raise ValueError(f"{fn}: `{name}` must be >= 1, got {value}")
    return int(value)


def check_value(owner: str, name: str, value: Any, ok: bool, rule: str) -> None:
    """Raises ValueError ``owner: name=value violates rule`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{owner}: {name}={value!r} is invalid: {rule}")


def as_bool(x: Any) -> Array:
    """Masks may arrive as bool or 0/1 numbers; nonzero means True."""
    x = jnp.asarray(x)
    return x if x.dtype == jnp.bool_ else x != 0


def as_float(x: Any) -> Array:
    """Upcasts to at least float32 (bfloat16 inputs are computed in float32)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def mask_or_ones(fn: str, name: str, mask: Any, shape: tuple[int, ...]) -> Array:
    """Returns a bool mask of ``shape``: all True when ``mask`` is None."""
    if mask is None:
        return jnp.ones(shape, dtype=jnp.bool_)
    return as_bool(check_shape(fn, name, mask, shape))


def safe_divide(numerator: Array, denominator: Array) -> Array:
    """``numerator / denominator`` where ``denominator > 0``, else 0.

    The double ``where`` keeps both the value and its gradient finite when the
    denominator is 0 (an empty group, an all-masked row).
    """
    positive = denominator > 0
    safe = jnp.where(positive, denominator, jnp.ones_like(denominator))
    return jnp.where(positive, numerator / safe, jnp.zeros_like(numerator))


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of ``x`` over ``mask`` (same shape); 0 when the mask is empty."""
    x = as_float(x)
    total = jnp.sum(jnp.where(mask, x, jnp.zeros_like(x)))
    return safe_divide(total, jnp.sum(mask, dtype=x.dtype))

