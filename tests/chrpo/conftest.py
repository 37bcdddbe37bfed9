"""Shared fixtures for the chrpo tests."""
import functools

import jax
import pytest


@functools.lru_cache(maxsize=None)
def _jitted(fn, static_items):
    """One jitted function per (fn, static keywords): parametrized cases that
    only change array values reuse its compilation."""
    return jax.jit(functools.partial(fn, **dict(static_items)))


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """``maybe_jit(fn, **static)``: fn with static keywords bound, jitted or not.

    Tests that take this fixture run twice, once eagerly and once under
    ``jax.jit``; both must give the hand-computed values. Static values must
    be hashable.
    """
    def wrap(fn, **static):
        if request.param:
            return _jitted(fn, tuple(sorted(static.items())))
        return functools.partial(fn, **static)
    return wrap
