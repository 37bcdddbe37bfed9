"""Per-token policy-gradient losses: clipped surrogate, KL, entropy, aggregation.

For token t of rollout i, with log-probabilities under the current, behaviour
(old) and reference policies and the rollout's advantage A_i:

    rho_t  = exp(logp_t - logp_old_t)
    l_clip = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i)     PPO / DAPO
    l_pg   = min(l_clip, -c A_i)  if A_i < 0 and dual clip c is set, else l_clip
    l_t    = w_t * (l_pg + beta * KL_t - entropy_coef * H_t)

with ``w_t = control_weight`` on the control-token position and 1 elsewhere.
With ``importance_level='sequence'`` (GSPO, Zheng et al. 2025, arXiv 2507.18071;
TRL ``importance_sampling_level="sequence"``) every token of rollout i uses one
length-normalised sequence ratio in place of rho_t:

    s_i = exp( (1 / |y_i|) sum_t m_t (logp_t - logp_old_t) )

clipped to ``[1 - eps_low, 1 + eps_high]`` as above (GSPO's ranges are about
1e-3 wide: the ratio of a whole sequence moves far less than a token's).
KL_t estimates KL(pi || pi_ref) from a sample of pi, with
``u = logp_ref_t - logp_t`` (Schulman 2020, "Approximating KL divergence"):

    k1 = -u,   k2 = u^2 / 2,   k3 = exp(u) - 1 - u

The per-token loss is aggregated over the response mask m into a pair
(sum, denominator); the loss is sum / denominator, and summing both parts
over micro-batches or devices before dividing gives exactly the global value:

    token-mean               sum = sum_{i,t} m l,                   den = sum_{i,t} m
    seq-mean-token-mean      sum = sum_i (sum_t m l / sum_t m),     den = #rows with a token
    seq-mean-token-sum-norm  sum = sum_i (sum_t m l) / max_len,     den = #rows with a token

Rows with no response token contribute 0 to every sum and are not counted.
Token weights w_t scale the loss only, never the denominators, so
``control_weight = 1`` is exactly the unweighted loss. Log-probabilities are
computed in float32 (bfloat16 inputs are upcast); masked positions may hold
any value, including -inf or NaN (advantages of empty rows too): they are
replaced before any arithmetic.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from chrpo import _checks

Array = jnp.ndarray

__all__ = ["LossConfig", "PolicyLossOutput", "KL_ESTIMATORS", "AGGREGATIONS", "IMPORTANCE_LEVELS",
           "importance_ratio",
           "clipped_surrogate", "clip_fractions", "kl_k1", "kl_k2", "kl_k3",
           "kl_divergence", "entropy_from_logits", "first_token_mask",
           "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm",
           "aggregate", "policy_loss"]


def _advantage_per_token(fn: str, advantages: Array, shape: tuple[int, int]) -> Array:
    """[B] sequence advantages become [B, 1] explicitly; [B, T] pass through."""
    advantages = _checks.as_float(_checks.check_rank(fn, "advantages", advantages, (1, 2)))
    if advantages.ndim == 1:
        advantages = _checks.check_shape(fn, "advantages", advantages, shape[:1])
        return advantages[:, None]
    return _checks.check_shape(fn, "advantages", advantages, shape)


IMPORTANCE_LEVELS = ("token", "sequence")


def importance_ratio(logp: Array, old_logp: Array, mask: Array | None = None, *,
                     level: str = "token") -> Array:
    """The importance ratio [B, T]: ``rho_t`` per token, or GSPO's ``s_i`` on every
    token of row i (``level='sequence'``; needs ``mask``, module docstring).

    >>> import jax.numpy as jnp
    >>> r = importance_ratio(jnp.log(jnp.array([[2.0, 8.0, 5.0]])), jnp.zeros((1, 3)),
    ...                      jnp.array([[True, True, False]]), level="sequence")
    >>> [round(float(v), 4) for v in r[0]]    # exp((log 2 + log 8) / 2) = 4 on every token
    [4.0, 4.0, 4.0]
    """
    fn = "importance_ratio"
    _checks.lookup({k: k for k in IMPORTANCE_LEVELS}, level, kind="importance level")
    logp = _checks.as_float(_checks.check_rank(fn, "logp", logp, 2))
    old_logp = _checks.as_float(_checks.check_shape(fn, "old_logp", old_logp, logp.shape))
    if level == "token":
        return jnp.exp(logp - old_logp)
    if mask is None:
        raise ValueError("importance_ratio: level='sequence' needs `mask`")
    mask = _checks.as_bool(_checks.check_shape(fn, "mask", mask, logp.shape))
    log_ratio = jnp.sum(jnp.where(mask, logp - old_logp, 0.0), axis=1, keepdims=True)
    count = jnp.sum(mask, axis=1, keepdims=True, dtype=logp.dtype)
    return jnp.broadcast_to(jnp.exp(_checks.safe_divide(log_ratio, count)), logp.shape)


def clipped_surrogate(logp: Array, old_logp: Array, advantages: Array, *,
                      eps_low: float = 0.2, eps_high: float = 0.2,
                      dual_clip: float | None = None, mask: Array | None = None,
                      importance_level: str = "token") -> Array:
    """Per-token clipped surrogate loss ``l_pg`` [B, T] (module docstring).

    Args:
      logp, old_logp: [B, T] log-probs of the sampled tokens.
      advantages: [B] (one per rollout) or [B, T].
      eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``; eps_high >
        eps_low is DAPO's clip-higher. Both in [0, 1).
      dual_clip: c > 1 caps the loss of negative-advantage tokens at ``-c A``
        (Ye et al. 2020, dual-clip PPO); None disables it.
      mask, importance_level: ``'sequence'`` uses GSPO's ratio over the
        ``mask`` tokens of each row (:func:`importance_ratio`).
    """
    fn = "clipped_surrogate"
    logp = _checks.as_float(_checks.check_rank(fn, "logp", logp, 2))
    old_logp = _checks.as_float(_checks.check_shape(fn, "old_logp", old_logp, logp.shape))
    adv = _advantage_per_token(fn, advantages, logp.shape)
    rho = importance_ratio(logp, old_logp, mask, level=importance_level)
    clipped = jnp.clip(rho, 1.0 - eps_low, 1.0 + eps_high)
    loss = -jnp.minimum(rho * adv, clipped * adv)
    if dual_clip is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -dual_clip * adv), loss)
    return loss


def clip_fractions(logp: Array, old_logp: Array, advantages: Array, *,
                   eps_low: float = 0.2, eps_high: float = 0.2,
                   dual_clip: float | None = None, mask: Array | None = None,
                   importance_level: str = "token") -> dict[str, Array]:
    """Per-token indicators (float32 [B, T]) of where a clip is active.

    clip_high: A > 0 and rho > 1 + eps_high; clip_low: A < 0 and
    rho < 1 - eps_low (the clipped branch is taken, its gradient is zero);
    dual_clip: A < 0 and rho > c (the dual clip caps the loss).
    """
    fn = "clip_fractions"
    logp = _checks.as_float(_checks.check_rank(fn, "logp", logp, 2))
    old_logp = _checks.as_float(_checks.check_shape(fn, "old_logp", old_logp, logp.shape))
    adv = _advantage_per_token(fn, advantages, logp.shape)
    rho = importance_ratio(logp, old_logp, mask, level=importance_level)
    out = {"clip_high": (adv > 0) & (rho > 1.0 + eps_high),
           "clip_low": (adv < 0) & (rho < 1.0 - eps_low)}
    if dual_clip is not None:
        out["dual_clip"] = (adv < 0) & (rho > dual_clip)
    return {k: v.astype(jnp.float32) for k, v in out.items()}


def kl_k1(logp: Array, ref_logp: Array) -> Array:
    """k1 = logp - logp_ref (unbiased, high variance, can be negative)."""
    return _checks.as_float(logp) - _checks.as_float(ref_logp)


def kl_k2(logp: Array, ref_logp: Array) -> Array:
    """k2 = (logp - logp_ref)^2 / 2 (biased, low variance, >= 0)."""
    d = _checks.as_float(logp) - _checks.as_float(ref_logp)
    return 0.5 * d * d


def kl_k3(logp: Array, ref_logp: Array) -> Array:
    """k3 = exp(u) - 1 - u, u = logp_ref - logp (unbiased, >= 0; GRPO's)."""
    u = _checks.as_float(ref_logp) - _checks.as_float(logp)
    return jnp.expm1(u) - u


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_divergence(logp: Array, ref_logp: Array, *, estimator: str = "k3") -> Array:
    """Per-token estimate of KL(pi || pi_ref) with the named estimator, [B, T]."""
    fn = _checks.lookup(KL_ESTIMATORS, estimator, kind="KL estimator")
    logp = _checks.check_rank("kl_divergence", "logp", logp, 2)
    ref_logp = _checks.check_shape("kl_divergence", "ref_logp", ref_logp, logp.shape)
    return fn(logp, ref_logp)


def entropy_from_logits(logits: Array) -> Array:
    """Per-position entropy ``H = -sum_v p_v log p_v`` of ``softmax(logits)``.

    logits: [..., V] (-inf entries allowed); returns float32 [...]. Pass the
    result to ``policy_loss(entropy=...)``; computing it in the model step
    avoids handing [B, T, V] logits to the loss.
    """
    logits = _checks.as_float(logits)
    logq = jax.nn.log_softmax(logits, axis=-1)
    q = jnp.exp(logq)
    return -jnp.sum(jnp.where(q > 0, q * logq, 0.0), axis=-1)


def first_token_mask(mask: Array) -> Array:
    """True at the first True position of each row of ``mask`` [B, T].

    The response starts with the control token, so with a response mask this
    marks the control token (the default ``control_mask`` of ``policy_loss``).
    """
    mask = _checks.as_bool(_checks.check_rank("first_token_mask", "mask", mask, 2))
    return mask & (jnp.cumsum(mask, axis=1) == 1)


def _row_counts(mask: Array) -> tuple[Array, Array]:
    tokens = jnp.sum(mask, axis=1, dtype=jnp.float32)
    return tokens, jnp.sum(tokens > 0, dtype=jnp.float32)


def token_mean(loss: Array, mask: Array, *, max_len: int | None = None
               ) -> tuple[Array, Array]:
    """(sum_{i,t} m l, sum_{i,t} m): the mean over every response token."""
    del max_len  # uniform signature
    masked = jnp.where(mask, loss, 0.0)
    return jnp.sum(masked), jnp.sum(mask, dtype=jnp.float32)


def seq_mean_token_mean(loss: Array, mask: Array, *, max_len: int | None = None
                        ) -> tuple[Array, Array]:
    """(sum of per-row token means, #non-empty rows): GRPO's mean of means."""
    del max_len
    tokens, rows = _row_counts(mask)
    per_row = _checks.safe_divide(jnp.sum(jnp.where(mask, loss, 0.0), axis=1), tokens)
    return jnp.sum(per_row), rows


def seq_mean_token_sum_norm(loss: Array, mask: Array, *, max_len: int | None = None
                            ) -> tuple[Array, Array]:
    """(sum_i sum_t m l / max_len, #non-empty rows): Dr.GRPO's constant norm."""
    if max_len is None or max_len < 1:
        raise ValueError("seq_mean_token_sum_norm: `max_len` must be a positive "
                         f"int (the constant generation budget), got {max_len!r}")
    _, rows = _row_counts(mask)
    return jnp.sum(jnp.where(mask, loss, 0.0)) / max_len, rows


AGGREGATIONS = {"token-mean": token_mean,
                "seq-mean-token-mean": seq_mean_token_mean,
                "seq-mean-token-sum-norm": seq_mean_token_sum_norm}


def aggregate(loss: Array, mask: Array, *, mode: str = "token-mean",
              max_len: int | None = None) -> tuple[Array, Array]:
    """Reduces a per-token loss [B, T] over ``mask`` to (sum, denominator)."""
    fn = _checks.lookup(AGGREGATIONS, mode, kind="aggregation mode")
    loss = _checks.as_float(_checks.check_rank("aggregate", "loss", loss, 2))
    mask = _checks.as_bool(_checks.check_shape("aggregate", "mask", mask, loss.shape))
    return fn(loss, mask, max_len=max_len)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Hyper-parameters of ``policy_loss`` (default; valid range).

    eps_low (0.2; [0, 1)), eps_high (0.2; >= 0), dual_clip (None; > 1),
    kl_estimator ('k3'; KL_ESTIMATORS), kl_coef beta (0.0; >= 0),
    entropy_coef (0.0), control_weight w_ctrl (1.0; >= 0),
    aggregation ('token-mean'; AGGREGATIONS), max_len (None; int >= 1,
    required by 'seq-mean-token-sum-norm'), importance_level ('token';
    IMPORTANCE_LEVELS: 'sequence' is GSPO's ratio).
    """
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    kl_estimator: str = "k3"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    control_weight: float = 1.0
    aggregation: str = "token-mean"
    max_len: int | None = None
    importance_level: str = "token"

    def __post_init__(self):
        o, c = "LossConfig", self
        _checks.check_value(o, "eps_low", c.eps_low, 0 <= c.eps_low < 1, "must be in [0, 1)")
        _checks.check_value(o, "eps_high", c.eps_high, c.eps_high >= 0, "must be >= 0")
        _checks.check_value(o, "dual_clip", c.dual_clip,
                            c.dual_clip is None or c.dual_clip > 1, "must be None or > 1")
        _checks.lookup(KL_ESTIMATORS, c.kl_estimator, kind="KL estimator")
        _checks.check_value(o, "kl_coef", c.kl_coef, c.kl_coef >= 0, "must be >= 0")
        _checks.check_value(o, "control_weight", c.control_weight,
                            c.control_weight >= 0, "must be >= 0")
        _checks.lookup(AGGREGATIONS, c.aggregation, kind="aggregation mode")
        _checks.lookup({k: k for k in IMPORTANCE_LEVELS}, c.importance_level,
                       kind="importance level")
        _checks.check_value(
            o, "max_len", c.max_len,
            c.max_len is None or (isinstance(c.max_len, int) and c.max_len >= 1),
            "must be None or an int >= 1")
        _checks.check_value(o, "max_len", c.max_len,
                            c.aggregation != "seq-mean-token-sum-norm" or c.max_len,
                            "is required by aggregation 'seq-mean-token-sum-norm'")


class PolicyLossOutput(NamedTuple):
    """loss = loss_sum / denominator; metrics are token-means over the mask."""
    loss_sum: Array
    denominator: Array
    metrics: dict[str, Array]


_DL = LossConfig()


def policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, *,
                ref_logp: Array | None = None, entropy: Array | None = None,
                control_mask: Array | None = None,
                eps_low: float = _DL.eps_low, eps_high: float = _DL.eps_high,
                dual_clip: float | None = _DL.dual_clip,
                kl_estimator: str = _DL.kl_estimator, kl_coef: float = _DL.kl_coef,
                entropy_coef: float = _DL.entropy_coef,
                control_weight: float = _DL.control_weight,
                aggregation: str = _DL.aggregation,
                max_len: int | None = _DL.max_len,
                importance_level: str = _DL.importance_level) -> PolicyLossOutput:
    """The CHRPO policy loss over a [B, T] batch, as (sum, denominator, metrics).

    Args:
      logp: [B, T] log-probs of the sampled tokens under the current policy.
      old_logp: [B, T] the same under the behaviour policy (no gradient).
      advantages: [B] (or [B, T]) advantages, e.g. from ``compute_advantages``.
      mask: [B, T] response-token mask (True = a token the loss covers).
      ref_logp: [B, T] reference-policy log-probs; required when kl_coef > 0.
      entropy: [B, T] per-token policy entropies (``entropy_from_logits``);
        required when entropy_coef != 0, reported when given.
      control_mask: [B, T] the control-token positions weighted by
        ``control_weight``; default ``first_token_mask(mask)``.
      eps_low ... max_len: see ``LossConfig`` (validated here).

    Returns:
      ``PolicyLossOutput(loss_sum, denominator, metrics)``: metrics hold the
      token-mean clip fractions, ``approx_kl`` (k3 estimate of KL(old || pi)),
      ``kl`` (to the reference, when given) and ``entropy`` (when given).

    Example:
      >>> import jax.numpy as jnp, chrpo
      >>> logp = jnp.log(jnp.full((2, 2), 0.5))
      >>> out = chrpo.policy_loss(logp, logp, jnp.array([1.0, -1.0]),
      ...                         jnp.array([[True, True], [True, False]]))
      >>> float(out.loss_sum), float(out.denominator)   # (-1 - 1 + 1, 3 tokens)
      (-1.0, 3.0)
    """
    LossConfig(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
               kl_estimator=kl_estimator, kl_coef=kl_coef, entropy_coef=entropy_coef,
               control_weight=control_weight, aggregation=aggregation, max_len=max_len,
               importance_level=importance_level)
    fn = "policy_loss"
    logp = _checks.check_rank(fn, "logp", logp, 2)
    mask = _checks.as_bool(_checks.check_shape(fn, "mask", mask, logp.shape))

    def clean(name: str, x: Array) -> Array:  # masked entries -> 0 (value and grad)
        x = _checks.as_float(_checks.check_shape(fn, name, x, logp.shape))
        return jnp.where(mask, x, 0.0)

    logp, old_logp = clean("logp", logp), clean("old_logp", old_logp)
    old_logp = jax.lax.stop_gradient(old_logp)
    advantages = jnp.where(mask, _advantage_per_token(fn, advantages, logp.shape), 0.0)
    clip = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, mask=mask,
                importance_level=importance_level)
    per_token = clipped_surrogate(logp, old_logp, advantages, **clip)
    metrics = {f"{k}_fraction": _checks.masked_mean(v, mask)
               for k, v in clip_fractions(logp, old_logp, advantages, **clip).items()}
    metrics["approx_kl"] = _checks.masked_mean(kl_k3(old_logp, logp), mask)
    if kl_coef > 0 and ref_logp is None:
        raise ValueError(f"policy_loss: kl_coef={kl_coef} > 0 needs `ref_logp`")
    if ref_logp is not None:
        kl = kl_divergence(logp, clean("ref_logp", ref_logp), estimator=kl_estimator)
        metrics["kl"] = _checks.masked_mean(kl, mask)
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"policy_loss: entropy_coef={entropy_coef} needs `entropy`")
    if entropy is not None:
        entropy = clean("entropy", entropy)
        metrics["entropy"] = _checks.masked_mean(entropy, mask)
        if entropy_coef != 0:
            per_token = per_token - entropy_coef * entropy
    if control_weight != 1.0:
        ctrl = (first_token_mask(mask) if control_mask is None else
                _checks.as_bool(_checks.check_shape(fn, "control_mask", control_mask,
                                                    logp.shape)))
        per_token = jnp.where(ctrl, control_weight * per_token, per_token)
    loss_sum, denominator = aggregate(per_token, mask, mode=aggregation, max_len=max_len)
    return PolicyLossOutput(loss_sum, denominator, metrics)
