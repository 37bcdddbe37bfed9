"""Bidirectional token classifier: one keep-score per chain-of-thought token (Extra-CoT stage 1).

The input is ``question [SEP] cot``; the question conditions the scores and
carries no label. The backbone is the Qwen3 decoder of ``models/qwen3.py``
called with ``causal=False`` (every token attends to every real token), so the
encoder shares the decoder's blocks, RoPE, padding rules and sharding names::

    h = Qwen3.hidden_states(tokens, attention_mask=m, causal=False)    [B, T, E]
    z = h @ w                                                          [B, T]

Ordinal keep-scores (a cumulative-link model). Each CoT token has a grade
``g in {0, ..., G-1}`` (higher = more important, e.g. hedge < restatement <
supporting equation < essential equation) and one score ``z``; G-1 ordered
thresholds ``theta_1 < ... < theta_{G-1}`` turn it into nested keep decisions::

    P(g >= j | x) = sigmoid(z - theta_j),          j = 1 .. G-1
    loss          = sum_j BCE(sigmoid(z - theta_j), [g >= j])   per labelled token

A label policy "keep iff g >= k" reads its keep logit as ``z - theta_k``; the
ranking used for compression is the ranking of ``z`` and therefore the same for
every policy. ``G = 2`` is the plain binary keep/drop classifier.

Padding may sit anywhere (left, right, or between question and CoT): padded
slots are never attended to and positions count real tokens only, so scores of
real tokens do not depend on the padding layout.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from models.qwen3 import Qwen3, Qwen3Config

__all__ = ["TokenClassifier", "ordered_thresholds", "join_inputs", "cot_keep_logits",
           "ordinal_loss"]


def ordered_thresholds(raw: jax.Array) -> jax.Array:
    """Strictly increasing thresholds from unconstrained ``raw`` [G-1]:
    ``theta_1 = raw_1``, ``theta_j = theta_{j-1} + softplus(raw_j)``."""
    chex.assert_rank(raw, 1)
    steps = jnp.concatenate([raw[:1], jax.nn.softplus(raw[1:])])
    return jnp.cumsum(steps.astype(jnp.float32))


class TokenClassifier(nnx.Module):
    """Qwen3 backbone without the causal mask plus a scalar score head and ordinal thresholds.

    Args:
      config: backbone architecture (``models.qwen3.Qwen3Config``); its LM head is unused.
      num_grades: G >= 2 ordinal grades of the labels.
      keep_grade: k in [1, G-1]: the policy "keep iff grade >= k" whose logit
        ``keep_logits`` returns.
    """

    def __init__(self, config: Qwen3Config, *, num_grades: int, keep_grade: int,
                 rngs: nnx.Rngs):
        if isinstance(num_grades, bool) or not isinstance(num_grades, int) or num_grades < 2:
            raise ValueError(f"num_grades must be an int >= 2, got {num_grades!r}")
        if isinstance(keep_grade, bool) or not isinstance(keep_grade, int) \
                or not 1 <= keep_grade <= num_grades - 1:
            raise ValueError(f"keep_grade must be an int in [1, {num_grades - 1}], "
                             f"got {keep_grade!r}")
        self.config = config
        self.num_grades, self.keep_grade = num_grades, keep_grade
        self.backbone = Qwen3(config, rngs=rngs)
        std = config.initializer_range
        w = std * jax.random.normal(rngs.params(), (config.hidden_size,), jnp.float32)
        self.score_head = nnx.Param(w.astype(config.weight_dtype), out_sharding=("embed",),
                                    eager_sharding=False)
        # theta_1 = 0 and unit gaps to start with (softplus(0.5413) = 1).
        raw = jnp.concatenate([jnp.zeros((1,)), jnp.full((num_grades - 2,), 0.5413)])
        self.thresholds_raw = nnx.Param(raw.astype(jnp.float32), out_sharding=(None,),
                                        eager_sharding=False)

    def thresholds(self) -> jax.Array:
        """theta [G-1] float32, strictly increasing."""
        return ordered_thresholds(self.thresholds_raw[...])

    def scores(self, tokens: jax.Array, *, attention_mask: jax.Array,
               positions: jax.Array | None = None) -> jax.Array:
        """Ordinal scores z [B, T] float32 of every slot (padded slots: meaningless)."""
        chex.assert_rank(tokens, 2)
        chex.assert_equal_shape([tokens, attention_mask])
        h = self.backbone.hidden_states(tokens, positions=positions,
                                        attention_mask=attention_mask, causal=False)
        w = self.score_head[...].astype(h.dtype)
        return jnp.einsum("bte,e->bt", h, w, preferred_element_type=jnp.float32)

    def keep_logits(self, tokens: jax.Array, *, attention_mask: jax.Array,
                    positions: jax.Array | None = None) -> jax.Array:
        """``z - theta_k`` [B, T]: > 0 means "keep" under the policy grade >= keep_grade."""
        z = self.scores(tokens, attention_mask=attention_mask, positions=positions)
        return z - self.thresholds()[self.keep_grade - 1]

    def __call__(self, tokens: jax.Array, *, attention_mask: jax.Array,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.keep_logits(tokens, attention_mask=attention_mask, positions=positions)


def join_inputs(question_ids: jax.Array, question_mask: jax.Array, cot_ids: jax.Array,
                cot_mask: jax.Array, *, sep_id: int) -> tuple[jax.Array, jax.Array]:
    """``question [SEP] cot`` as tokens and mask [B, Tq + 1 + Tc] (padding stays in place).

    The CoT occupies slots ``Tq + 1 ..``; a row's padding may therefore sit between
    its question and its CoT, which the backbone handles (see the module docstring).
    """
    chex.assert_rank([question_ids, question_mask, cot_ids, cot_mask], 2)
    chex.assert_equal_shape([question_ids, question_mask])
    chex.assert_equal_shape([cot_ids, cot_mask])
    chex.assert_equal_shape_prefix([question_ids, cot_ids], 1)
    b = question_ids.shape[0]
    sep = jnp.full((b, 1), sep_id, jnp.int32)
    tokens = jnp.concatenate([question_ids.astype(jnp.int32), sep, cot_ids.astype(jnp.int32)], 1)
    mask = jnp.concatenate([question_mask.astype(bool), jnp.ones((b, 1), bool),
                            cot_mask.astype(bool)], axis=1)
    return tokens, mask


def cot_keep_logits(model: TokenClassifier, question_ids: jax.Array, question_mask: jax.Array,
                    cot_ids: jax.Array, cot_mask: jax.Array, *, sep_id: int) -> jax.Array:
    """Keep logits of the CoT tokens [B, Tc] float32 from one forward pass; -inf where padded."""
    tokens, mask = join_inputs(question_ids, question_mask, cot_ids, cot_mask, sep_id=sep_id)
    logits = model.keep_logits(tokens, attention_mask=mask)[:, question_ids.shape[1] + 1:]
    return jnp.where(cot_mask.astype(bool), logits, -jnp.inf)


def ordinal_loss(z: jax.Array, thresholds: jax.Array, grades: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """All-threshold ordinal cross-entropy as ``(sum, denominator)``.

    Args:
      z: scores [B, T] (any float dtype; computed in float32).
      thresholds: theta [G-1], increasing.
      grades: int [B, T]; ``grade in [0, G-1]`` for labelled tokens, ``-1`` for
        unlabelled ones (question, [SEP], padding).
    Returns::

        sum         = sum_{b,t: g >= 0} sum_j -[g >= j] log s(z - theta_j)
                                             -[g <  j] log s(theta_j - z)
        denominator = #{(b, t): g >= 0}
    """
    chex.assert_rank([z, grades], 2)
    chex.assert_equal_shape([z, grades])
    chex.assert_rank(thresholds, 1)
    labelled = grades >= 0
    j = jnp.arange(1, thresholds.shape[0] + 1)
    margin = z.astype(jnp.float32)[..., None] - thresholds.astype(jnp.float32)[None, None, :]
    above = grades[..., None] >= j[None, None, :]
    nll = -jnp.where(above, jax.nn.log_sigmoid(margin), jax.nn.log_sigmoid(-margin))
    per_token = jnp.sum(nll, axis=-1)
    return jnp.sum(jnp.where(labelled, per_token, 0.0)), jnp.sum(labelled.astype(jnp.float32))
