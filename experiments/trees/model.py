"""The lab's model, loss, teacher-forced scoring, greedy decoding and attention capture.

``PathModel`` is the project's Qwen3 decoder (``models/qwen3.py``, any depth and
head count) plus, for the ``paired`` layout (``experiments/trees/encoding.py``),
a second embedding table ``F``: the input at position t is

    x_t = E[tok_t] + F[aux_t] * [aux_t != PAD]

and everything after the embedding (blocks, final norm, tied head ``E^T``) is
the decoder's own. With ``paired=False`` it is exactly ``Qwen3.__call__``.

Exact match needs no sampling: greedy decoding reproduces the reference target
iff, under teacher forcing, the argmax at every target position is the
reference token (induction over the prefix; ties aside). ``teacher_forced_eval``
scores that way with one forward pass; ``greedy_decode`` is the explicit loop
(used by the tests to check the equivalence and for free-running outputs).
"""
from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import training
from models.qwen3 import Qwen3, Qwen3Config, with_attention_probs

__all__ = ["PathModel", "lab_model_config", "lm_loss", "teacher_forced_eval", "greedy_decode",
           "attention_maps", "ablate_head"]

MODEL_KEYS = ("tokens", "aux", "positions", "attention_mask")


def lab_model_config(*, vocab_size: int, layers: int, heads: int, hidden: int,
                     mlp: int, kv_heads: int | None = None, rope_theta: float = 1e4,
                     init_std: float = 0.02) -> Qwen3Config:
    """A Qwen3Config with head_dim = hidden / heads (the attention width is fixed)."""
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden={hidden} must split into {heads} heads of even size")
    return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads or heads,
                       head_dim=hidden // heads, rope_theta=float(rope_theta),
                       max_position_embeddings=4096, initializer_range=float(init_std))


class PathModel(nnx.Module):
    """Qwen3 decoder with an optional ``aux`` embedding table (paired layout)."""

    def __init__(self, config: Qwen3Config, *, paired: bool, rngs: nnx.Rngs):
        self.decoder = Qwen3(config, rngs=rngs)
        self.paired = paired
        self.aux_embed = nnx.data(None)
        if paired:
            value = config.initializer_range * jax.random.normal(
                rngs.params(), (config.vocab_size, config.hidden_size), jnp.float32)
            self.aux_embed = nnx.Param(value.astype(config.weight_dtype),
                                       out_sharding=("vocab", "embed"), eager_sharding=False)

    def __call__(self, tokens: jax.Array, *, aux: jax.Array, positions: jax.Array,
                 attention_mask: jax.Array) -> jax.Array:
        """float32 logits [B, T, V]; all inputs int/bool [B, T], causal attention."""
        chex.assert_rank(tokens, 2)
        chex.assert_equal_shape((tokens, aux, positions, attention_mask))
        dec = self.decoder
        if not self.paired:
            return dec(tokens, positions=positions, attention_mask=attention_mask)
        t = tokens.shape[1]
        mask = attention_mask.astype(bool)
        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
        attn_mask = mask[:, None, :] & causal[None]
        dt = dec.config.compute_dtype
        extra = jnp.take(self.aux_embed[...], aux, axis=0) * (aux != 0)[..., None]
        x = (jnp.take(dec.embed[...], tokens, axis=0) + extra).astype(dt)
        for layer in dec.layers:
            x, _ = layer(x, positions=positions, mask=attn_mask)
        return dec.logits(dec.final_norm(x))


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_KEYS}


def lm_loss(model: PathModel, batch: dict[str, Any], rng: jax.Array):
    """``training.masked_lm_loss`` over the target tokens (and EOS):
    returns (sum of -log p, number of target tokens, {}). ``batch['loss_mask']``
    marks predicting positions; shifted by one it marks the predicted tokens."""
    del rng
    logits = model(batch["tokens"], **{k: batch[k] for k in MODEL_KEYS[1:]})
    token_mask = jnp.pad(batch["loss_mask"][:, :-1], ((0, 0), (1, 0)))
    total, count = training.masked_lm_loss(logits, batch["tokens"], token_mask)
    return total, count, {}


def teacher_forced_eval(model: PathModel, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """One forward pass; per example (bool [B]) ``exact`` (every target token and
    EOS right: equals greedy-decoding exact match), ``chain_ok`` (targets before
    STAGE right), ``answer_ok`` (STAGE and the targets after it right; = exact
    without STAGE);
    ``correct`` bool [B, T] at predicting positions; ``loss`` mean target NLL."""
    logits = model(batch["tokens"], **{k: batch[k] for k in MODEL_KEYS[1:]})
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    mask = batch["loss_mask"] > 0
    correct = (pred == batch["targets"]) | ~mask
    t = batch["tokens"].shape[1]
    offset = jnp.arange(t)[None, :] - (batch["target_start"][:, None] - 1)   # target index
    before = offset < batch["stage"][:, None]
    lp = training.token_logprobs(logits, batch["targets"])
    return {"exact": jnp.all(correct, axis=1),
            "chain_ok": jnp.all(correct | ~before, axis=1),
            "answer_ok": jnp.all(correct | before, axis=1),
            "correct": correct & mask,
            "loss": -jnp.sum(lp * mask) / jnp.maximum(jnp.sum(mask), 1)}


def greedy_decode(model: PathModel, batch: dict[str, Any], *, max_new: int, eos_id: int,
                  paired: bool) -> jax.Array:
    """Free-running greedy decoding from the prompts of a teacher-forcing batch
    (its targets are ignored and overwritten). Full recompute per step (no
    cache): cheap at lab sizes. Returns int32 [B, max_new], PAD after EOS."""
    tokens, positions = batch["tokens"], batch["positions"]
    b, t = tokens.shape
    start = batch["target_start"]
    if isinstance(start, np.ndarray) and int(start.max()) + max_new > t:
        raise ValueError(f"prompt + max_new={max_new} exceeds seq_len={t}")
    cols = jnp.arange(t)[None, :]
    prompt = cols < start[:, None]
    tokens = jnp.where(prompt, tokens, 0)
    aux = jnp.where(prompt, batch["aux"], 0)
    rows = jnp.arange(b)

    def body(i, carry):
        tokens, aux, done, out = carry
        cur = start + i
        mask = cols < cur[:, None]
        logits = model(tokens, aux=aux, positions=positions, attention_mask=mask)
        y = jnp.argmax(logits[rows, cur - 1], axis=-1).astype(jnp.int32)
        y = jnp.where(done, 0, y)
        tokens = tokens.at[rows, cur].set(y)
        if paired:
            aux = aux.at[rows, cur].set(jnp.where(done, 0, tokens[rows, cur - 1]))
        out = out.at[:, i].set(y)
        return tokens, aux, done | (y == eos_id), out

    init = (tokens, aux, jnp.zeros(b, bool), jnp.zeros((b, max_new), jnp.int32))
    return jax.lax.fori_loop(0, max_new, body, init)[3]


def attention_maps(model: PathModel, batch: dict[str, Any]) -> tuple[jax.Array, ...]:
    """Teacher-forced attention probabilities, one float32 [B, H, T, T] per layer.
    Row t is what the model attends to when it predicts ``targets[:, t]``: at a
    target position, exactly the attention of that greedy-decoding step."""
    _, probs = with_attention_probs(
        lambda m, b: m(b["tokens"], **{k: b[k] for k in MODEL_KEYS[1:]}), model, batch)
    return probs


def ablate_head(params: Any, *, layer: int, head: int) -> Any:
    """``params`` (the ``nnx.Param`` state of a PathModel) with one attention head
    silenced: ``o_proj[head]`` of that layer is zero, so the head's output never
    reaches the residual stream (its attention is still computed)."""
    hits = []

    def zero(path, x):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if names[:5] == ["decoder", "layers", layer, "attn", "o_proj"]:
            if not 0 <= head < x.shape[0]:
                raise ValueError(f"head={head} out of range for {x.shape[0]} heads")
            hits.append(path)
            return x.at[head].set(0)
        return x
    out = jax.tree_util.tree_map_with_path(zero, params)
    if not hits:
        raise ValueError(f"layer={layer} has no attention o_proj in these params")
    return out
