"""Test-wide JAX settings.

DESIGN.md: tests run with ``jax_numpy_rank_promotion='raise'`` so an array of
shape [B] can never silently broadcast against one of shape [B, T].
"""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
