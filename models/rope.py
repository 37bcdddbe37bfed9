"""Rotary position embeddings: the default frequencies and the scaled variants Qwen3 uses.

For head dimension D and base theta, the default inverse frequencies are

    inv_freq_i = theta^(-2i / D),   i < D / 2

and a position p rotates the two halves of a head by the angles p * inv_freq
(rotate-half convention of Hugging Face transformers):

    rope(x) = s * [x1 cos - x2 sin, x2 cos + x1 sin],   x = [x1, x2]

with s = 1 except for YaRN. The scaled variants, as transformers computes them
(``transformers.modeling_rope_utils``; factor f, L = max_position_embeddings):

- ``linear`` (position interpolation): inv_freq / f.
- ``dynamic`` (NTK-aware): for a forward pass whose largest position is
  n - 1 > L - 1, the base becomes theta * (f n / L - (f - 1))^(D / (D - 2));
  shorter passes use the default frequencies. transformers keeps the longest
  n it has seen in the module's state; here n is that of each call.
- ``yarn`` (Peng et al. 2023, arXiv 2309.00071): per frequency a blend of
  inv_freq (extrapolation) and inv_freq / f (interpolation), the weight a
  linear ramp over the dimensions whose wavelengths make between beta_slow and
  beta_fast turns in the original context L0; cos and sin are scaled by the
  attention factor s (0.1 ln f + 1 unless given).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ROPE_TYPES", "RopeScaling", "inv_frequencies", "yarn_attention_factor", "rope",
           "rope_scaling_from_hf", "rope_scaling_to_hf"]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """A scaled RoPE (``rope_type`` one of ``ROPE_TYPES`` but 'default').

    factor: f (> 0). original_max_position_embeddings: YaRN's pretraining
    context L0 (0: the model's max_position_embeddings). beta_fast, beta_slow,
    attention_factor (0: from f), truncate: YaRN's settings, transformers'
    defaults (32, 1, None, True).
    """
    rope_type: str
    factor: float
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0
    truncate: bool = True

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"RopeScaling.{name}={getattr(self, name)!r} must be {want}")
        if self.rope_type not in ROPE_TYPES[1:]:
            bad("rope_type", f"one of {ROPE_TYPES[1:]}")
        for name in ("factor", "beta_fast", "beta_slow"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                    or not math.isfinite(v):
                bad(name, "a finite number > 0")
        v = self.attention_factor
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
            bad("attention_factor", "a finite number >= 0 (0: from the factor)")
        v = self.original_max_position_embeddings
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            bad("original_max_position_embeddings", "an int >= 0")
        if not isinstance(self.truncate, bool):
            bad("truncate", "a bool")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | "RopeScaling" | None) -> "RopeScaling | None":
        """From a model.json dict (or a RopeScaling, or None)."""
        if d is None or isinstance(d, cls):
            return d
        return cls(**d)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
    """YaRN's cos/sin scale: ``0.1 ln f + 1`` (1 for f <= 1), or the ratio of the
    two mscales when both are given (transformers' rule)."""
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None, *,
                    max_position_embeddings: int = 0) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [head_dim / 2], cos/sin scale) of a static RoPE.

    ``dynamic`` has the default frequencies here (they change only past
    ``max_position_embeddings``, inside :func:`rope`).
    """
    d = head_dim
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    pos_freqs = np.power(np.float32(theta), exponents, dtype=np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if scaling is None or scaling.rope_type == "dynamic":
        return inv_freq, 1.0
    f = float(scaling.factor)
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(f)).astype(np.float32), 1.0
    # yarn
    original = scaling.original_max_position_embeddings or max_position_embeddings
    if original <= 0:
        raise ValueError("yarn RoPE needs original_max_position_embeddings or "
                         "max_position_embeddings > 0")

    def correction_dim(rotations: float) -> float:
        return (d * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0.0, 1.0).astype(np.float32)
    extrapolation = np.float32(1.0) - ramp
    interpolation = (np.float32(1.0) / (np.float32(f) * pos_freqs)).astype(np.float32)
    blended = interpolation * (np.float32(1.0) - extrapolation) + inv_freq * extrapolation
    scale = scaling.attention_factor or yarn_attention_factor(f)
    return blended.astype(np.float32), float(scale)


def rope(x: jax.Array, positions: jax.Array, *, theta: float,
         scaling: RopeScaling | None = None, max_position_embeddings: int = 0) -> jax.Array:
    """Rotary embedding of ``x`` [B, T, N, D] at ``positions`` [B, T] (module docstring)."""
    d = x.shape[-1]
    if scaling is None or scaling.rope_type == "dynamic":
        # the default frequencies, computed by XLA as they always were here (numpy's float32
        # power differs from it in the last bit for some head sizes, e.g. 24)
        inv_freq, scale = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)), 1.0
    else:
        inv_np, scale = inv_frequencies(d, theta, scaling,
                                        max_position_embeddings=max_position_embeddings)
        inv_freq = jnp.asarray(inv_np)
    if scaling is not None and scaling.rope_type == "dynamic":
        n = (jnp.max(positions) + 1).astype(jnp.float32)
        length, f = float(max_position_embeddings), float(scaling.factor)
        base = theta * ((f * n / length) - (f - 1.0)) ** (d / (d - 2))
        exponents = jnp.arange(0, d, 2, dtype=jnp.int32).astype(jnp.float32) / d
        inv_freq = jnp.where(n > length, 1.0 / (base ** exponents), inv_freq)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None]  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- config.json

_ROPE_KEYS = {"linear": {"factor"}, "dynamic": {"factor"},
              "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                       "attention_factor", "mscale", "mscale_all_dim", "truncate"}}


def rope_scaling_from_hf(params: dict[str, Any], key: str, d: dict[str, Any]) -> RopeScaling | None:
    """The RopeScaling of a config.json RoPE dict (``key`` names it in errors); refuses
    types and settings this model does not compute."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: {key}.rope_type={rope_type!r} is not supported "
                         f"(want one of {ROPE_TYPES})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json: {key}.partial_rotary_factor="
                         f"{params['partial_rotary_factor']!r} is not supported (want 1.0)")
    unknown = sorted(set(params) - _ROPE_KEYS[rope_type]
                     - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if unknown:
        raise ValueError(f"config.json: {key} has keys {unknown} that a {rope_type!r} RoPE "
                         f"does not use here (known: {sorted(_ROPE_KEYS[rope_type])})")
    try:
        if rope_type != "yarn":
            return RopeScaling(rope_type=rope_type, factor=params["factor"])
        original = d.get("original_max_position_embeddings",
                         params.get("original_max_position_embeddings"))
        factor = params.get("factor")
        if factor is None:    # transformers: the ratio of the two context lengths
            factor = d.get("max_position_embeddings", 32768) / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = yarn_attention_factor(factor, params.get("mscale"),
                                              params.get("mscale_all_dim"))
        return RopeScaling(rope_type="yarn", factor=factor,
                           original_max_position_embeddings=int(original or 0),
                           beta_fast=params.get("beta_fast") or 32.0,
                           beta_slow=params.get("beta_slow") or 1.0,
                           attention_factor=float(attention), truncate=params.get("truncate", True))
    except KeyError as err:
        raise ValueError(f"config.json: {key} of type {rope_type!r} lacks {err}") from None
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise ValueError(f"config.json: {key}={params!r}: {err}") from None


def rope_scaling_to_hf(scaling: RopeScaling | None) -> dict[str, Any] | None:
    """The config.json ``rope_scaling`` of a RopeScaling (None: default RoPE)."""
    if scaling is None:
        return None
    out = {"rope_type": scaling.rope_type, "factor": scaling.factor}
    if scaling.rope_type == "yarn":
        out.update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow,
                   attention_factor=scaling.attention_factor, truncate=scaling.truncate)
        if scaling.original_max_position_embeddings:
            out["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    return out
