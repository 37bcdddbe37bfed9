"""Budgets: realized ratio, compliance, the Lagrange multiplier's dual ascent."""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chrpo


def test_realized_ratio_hand(maybe_jit):
    f = maybe_jit(chrpo.realized_ratio, fill_value=-1.0)
    out = f(jnp.array([10, 5, 3, 7]), jnp.array([20, 10, 0, -4]))
    np.testing.assert_allclose(out, [0.5, 0.5, -1.0, -1.0])
    assert out.dtype == jnp.float32


def test_realized_ratio_guard_keeps_gradients_finite():
    grad = jax.grad(lambda L: jnp.sum(chrpo.realized_ratio(L, jnp.array([4.0, 0.0]))))(
        jnp.array([2.0, 3.0]))
    np.testing.assert_allclose(grad, [0.25, 0.0])


def test_within_budget_hand(maybe_jit):
    f = maybe_jit(chrpo.within_budget, tol=0.125)
    out = f(jnp.array([0.5, 0.625, 0.75]), jnp.full(3, 0.5))
    np.testing.assert_array_equal(out, [True, True, False])


def test_budget_mask_hand(maybe_jit):
    out = maybe_jit(chrpo.budget_mask)(jnp.array([1, 1, 0, 1]), jnp.array([True, False, True, True]),
                            jnp.array([True, True, True, False]))
    np.testing.assert_array_equal(out, [True, False, False, False])


@pytest.mark.parametrize("start, ratio, mask, expected", [
    # mean over the mask of [0.2, 0.6] = 0.4; 0.5 + 2 * (0.4 - 0.3) = 0.7
    (0.5, [0.2, 0.6, 1.0], [True, True, False], 0.7),
    # 0.1 + 2 * (0.1 - 0.3) = -0.3 -> projected to 0
    (0.1, [0.1, 0.1, 0.1], [True, True, True], 0.0),
    # nothing counts: the multiplier is left unchanged
    (0.25, [0.9, 0.9, 0.9], [False, False, False], 0.25),
])
def test_update_lagrange_hand(maybe_jit, start, ratio, mask, expected):
    f = maybe_jit(chrpo.update_lagrange, budget=0.3, step_size=2.0)
    new = f(chrpo.init_lagrange(start), jnp.array(ratio), jnp.array(mask))
    assert isinstance(new, chrpo.LagrangeState)
    np.testing.assert_allclose(new.multiplier, expected, atol=1e-6)


def test_constraint_violation_hand(maybe_jit):
    v = maybe_jit(chrpo.constraint_violation, budget=0.25)(jnp.array([0.2, 0.4, 0.9]))
    np.testing.assert_allclose(v, 0.5 - 0.25, atol=1e-7)


def test_lagrange_state_is_a_pytree():
    state = chrpo.init_lagrange(0.5)
    assert len(jax.tree.leaves(state)) == 1
    doubled = jax.jit(lambda s: jax.tree.map(lambda x: 2 * x, s))(state)
    assert isinstance(doubled, chrpo.LagrangeState) and float(doubled.multiplier) == 1.0


@pytest.mark.parametrize("call, named", [
    (lambda: chrpo.init_lagrange(-0.1), "multiplier"),
    (lambda: chrpo.update_lagrange(chrpo.init_lagrange(), jnp.ones(2), budget=0.3,
                                   step_size=0.0), "step_size"),
    (lambda: chrpo.update_lagrange(chrpo.init_lagrange(), jnp.ones(2), budget=-1.0,
                                   step_size=0.1), "budget"),
    (lambda: chrpo.update_lagrange(chrpo.init_lagrange(), jnp.ones((2, 2)), budget=0.3,
                                   step_size=0.1), "ratio"),
    (lambda: chrpo.realized_ratio(jnp.ones(3), jnp.ones(2)), "ref_len"),
    (lambda: chrpo.within_budget(jnp.ones(3), jnp.ones(3), tol=-0.5), "tol"),
])
def test_budget_errors_name_the_value(call, named):
    with pytest.raises(ValueError, match=named):
        call()


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(ratios=st.lists(st.lists(st.floats(0.0, 3.0), min_size=4, max_size=4),
                                  min_size=1, max_size=6),
                  budget=st.floats(0.0, 1.0), eta=st.floats(1e-3, 10.0))
def test_dual_ascent_stays_nonnegative_and_moves_with_the_violation(ratios, budget, eta):
    state = chrpo.init_lagrange()
    for r in ratios:
        r = jnp.array(r, jnp.float32)
        new = chrpo.update_lagrange(state, r, budget=budget, step_size=eta)
        assert float(new.multiplier) >= 0.0
        direction = float(jnp.mean(r)) - budget
        if direction > 1e-6:
            assert float(new.multiplier) > float(state.multiplier)
        elif direction < -1e-6:
            assert float(new.multiplier) <= float(state.multiplier)
        state = new
