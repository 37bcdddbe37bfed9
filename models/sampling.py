"""Generation with a KV cache, and teacher-forced scoring, for models.qwen3.Qwen3.

`generate` is one compiled function: a prefill over the prompt, then a
`lax.while_loop` that decodes one token per iteration into a static-size cache
(`dynamic_update_slice`, the prompt is never recomputed) and exits as soon as
every sequence has stopped. Parameters enter as an argument (graphdef is
static, state is traced), so new parameters of the same shapes reuse the
compiled program; sampling settings are static (a new value compiles once).
The cache is created inside the compiled function and threaded through the
loop carry, so XLA updates it in place; it never crosses the jit boundary,
hence there is nothing to donate.

n samples per prompt: the prompt is prefilled once, then its cache and first
logits are repeated n times; output row i * n + j is sample j of prompt i.

Cache: grows with the output, in segments (`decode_plan`). Decode step s
(1 <= s < N) writes the previous token at slot P + s - 1 and attends over
every slot of the cache it is given (masked), so reading a fixed
P + N-slot cache would cost every step as much as the last one. Instead the
decode loop is cut into a few `lax.while_loop`s, segment i running steps
[start_i, stop_i) over a cache of exactly P + stop_i - 1 slots, the least its
last step needs; between segments the cache is padded to the next width (one
copy per segment). With k equal segments a step reads on average
P + N (k + 1) / (2k) slots instead of P + N. Each segment compiles its own
copy of the decode step; an empty later segment exits at once. Rows that
have stopped keep running (their outputs are discarded) until every row
stops. Randomness: the draw at step t uses fold_in(key, t), one uniform per
row (inverse CDF); top-k / top-p cuts are found by bisection, without a sort
(`filter_logits`).

Log-probs: `logprobs[b, t] = log softmax(z_t)[y_t]` of the *untempered* model
(temperature 1, no top-k/top-p), whatever the sampling settings, i.e. exactly
what `score` returns for the same tokens. They equal the log-probs of the
sampling distribution only when temperature == 1, top_k == 0 and top_p == 1;
otherwise the sampling distribution is softmax(filter(z / temperature)).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.qwen3 import KVCache, Qwen3, init_cache

__all__ = ["GenerateOutput", "filter_logits", "last_real_index", "decode_plan", "generate",
           "completion_logprobs", "score"]

# Default number of decode segments: one per 32 decode steps, at most 4 (each
# segment compiles its own copy of the decode step; 4 already read on average
# P + 0.625 N slots per step instead of P + N).
SEGMENT_STEPS, MAX_SEGMENTS = 32, 4


class GenerateOutput(NamedTuple):
    """tokens [B*n, N] int32, pad_id after a stop token; lengths [B*n] int32,
    generated tokens including the stop token; logprobs [B*n, N] float32, 0
    after the stop; steps: int32 scalar, token positions produced before the
    loop ended (< N when every sequence stopped early)."""
    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    steps: jax.Array


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set logits [..., V] outside the allowed set to -inf (top-k first, as HF):

    top_k > 0: keep z_i >= the k-th largest logit (ties at the cut are kept);
    top_p < 1: with p = softmax(z) (after top-k), keep token i iff the mass of
               the tokens with larger logits is < top_p: the smallest
               most-probable set reaching top_p, plus ties at its edge; the
               most probable token is always kept.
    Both cuts are found without sorting (see `_cut`).
    """
    _check_filter(top_k, top_p)
    z = logits.astype(jnp.float32)
    if 0 < top_k < z.shape[-1]:
        z = jnp.where(z < _cut(z, jnp.ones_like(z), top_k), -jnp.inf, z)
    if top_p < 1.0:
        z = jnp.where(z < _cut(z, jax.nn.softmax(z, axis=-1), top_p), -jnp.inf, z)
    return z.astype(logits.dtype)


def _check_filter(top_k, top_p) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _ordered(bits: jax.Array) -> jax.Array:
    """float32 bit patterns <-> int32 keys with the same order (an involution)."""
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _cut(z: jax.Array, w: jax.Array, bound) -> jax.Array:
    """v* = min{z_i : sum_{j: z_j > z_i} w_j < bound} per row, shape [..., 1].

    For w >= 0 the predicate m(v) = [sum_{z_j > v} w_j < bound] is monotone in
    v and first holds at v*, so a bisection over the order-preserving int32
    keys of float32 values finds v* exactly in 32 masked sums, O(32 V) per row:
    on CPU far cheaper than a sort or lax.top_k, and the same code serves
    top-k (w = 1, bound = k) and top-p (w = softmax(z), bound = top_p).
    """
    keys = _ordered(jax.lax.bitcast_convert_type(z, jnp.int32))
    lo = jnp.min(keys, axis=-1, keepdims=True) - 1   # m(lo) false (or v* = min z)
    hi = jnp.max(keys, axis=-1, keepdims=True)       # m(hi) true

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)   # floor((lo + hi) / 2), no overflow
        v = jax.lax.bitcast_convert_type(_ordered(mid), jnp.float32)
        ok = jnp.sum(jnp.where(z > v, w, 0.0), axis=-1, keepdims=True) < bound
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jax.lax.bitcast_convert_type(_ordered(hi), jnp.float32)


def last_real_index(mask: jax.Array) -> jax.Array:
    """Index of the last 1 in each row of mask [B, T] (rows need one real token)."""
    t = mask.shape[1]
    return (t - 1 - jnp.argmax(mask[:, ::-1].astype(bool), axis=1)).astype(jnp.int32)


def _first_argmax(z: jax.Array) -> jax.Array:
    """argmax over the last axis (first index on ties) as two plain reductions,
    several times faster on CPU than the variadic reduce of jnp.argmax."""
    iota = jnp.arange(z.shape[-1], dtype=jnp.int32)
    hit = z == jnp.max(z, axis=-1, keepdims=True)
    return jnp.min(jnp.where(hit, iota, z.shape[-1]), axis=-1)


def _inverse_cdf_sample(key: jax.Array, z: jax.Array) -> jax.Array:
    """One draw per row from softmax(z) [B, V]: the first i with
    cdf_i >= (1 - u) * cdf_V, u ~ U[0, 1). Tokens of probability 0 (z = -inf)
    are never drawn; one uniform per row instead of V Gumbel variates."""
    cdf = jnp.cumsum(jax.nn.softmax(z, axis=-1), axis=-1)
    u = jax.random.uniform(key, (z.shape[0], 1), jnp.float32)
    return jnp.sum(cdf < (1.0 - u) * cdf[:, -1:], axis=-1).astype(jnp.int32)


def _pick(logits, key, *, temperature, top_k, top_p):
    """Next tokens [B] and their untempered log-probs [B] from logits [B, V]."""
    if temperature == 0.0:
        tok = _first_argmax(logits)
    else:
        tok = _inverse_cdf_sample(key, filter_logits(logits / temperature,
                                                     top_k=top_k, top_p=top_p))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)
    return tok, logp[:, 0]


def decode_plan(prompt_len: int, max_new_tokens: int, *, segments: int | None = None
                ) -> tuple[tuple[int, int], ...]:
    """Static ``((stop_1, width_1), ..., (stop_k, width_k))`` of the decode loop.

    The N - 1 decode steps s = 1 .. N-1 are cut into k nearly equal segments:
    segment i runs steps [stop_{i-1}, stop_i) (stop_0 = 1, stop_k = N),
    stop_i = 1 + ceil((N - 1) i / k), over a cache of width_i = P + stop_i - 1
    slots (step s writes slot P + s - 1 and reads slots [0, P + s)).
    ``segments=None`` picks k = min(MAX_SEGMENTS, ceil((N - 1) / SEGMENT_STEPS));
    k is capped at N - 1. N = 1 has no decode step: ``()``.

    >>> decode_plan(7, 16, segments=3)
    ((6, 12), (11, 17), (16, 22))
    """
    if isinstance(segments, bool) or not (segments is None or (
            isinstance(segments, int) and segments >= 1)):
        raise ValueError(f"decode_segments must be None or an int >= 1, got {segments!r}")
    steps = max_new_tokens - 1
    if steps < 1:
        return ()
    k = min(MAX_SEGMENTS, -(-steps // SEGMENT_STEPS)) if segments is None else segments
    k = min(k, steps)
    stops = [1 + -(-steps * i // k) for i in range(1, k + 1)]
    return tuple((stop, prompt_len + stop - 1) for stop in stops)


def _grow(cache: KVCache, width: int) -> KVCache:
    """The cache padded with empty (masked) slots to ``width`` slots
    (k, v [B, K, D, S], mask [B, S]: see models.qwen3.KVCache)."""
    extra = width - cache.mask.shape[1]
    if extra == 0:
        return cache

    def pad(x):   # slots are the minor axis of every cache array
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])

    return cache._replace(k=tuple(map(pad, cache.k)), v=tuple(map(pad, cache.v)),
                          mask=pad(cache.mask))


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "n_samples", "temperature", "top_k", "top_p",
    "stop_ids", "pad_id", "segments"))
def _generate(graphdef, state, prompt_ids, prompt_mask, key, *, max_new_tokens, n_samples,
              temperature, top_k, top_p, stop_ids, pad_id, segments=None) -> GenerateOutput:
    model: Qwen3 = nnx.merge(graphdef, state)
    b, p = prompt_ids.shape
    pick = functools.partial(_pick, temperature=temperature, top_k=top_k, top_p=top_p)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    plan = decode_plan(p, max_new_tokens, segments=segments)

    cache = init_cache(model.config, batch_size=b, max_length=plan[0][1] if plan else p)
    hidden, cache = model.hidden_states(prompt_ids, attention_mask=prompt_mask, cache=cache)
    last = jnp.take_along_axis(hidden, last_real_index(prompt_mask)[:, None, None], axis=1)
    logits = model.logits(last[:, 0])
    if n_samples > 1:
        rep = functools.partial(jnp.repeat, repeats=n_samples, axis=0)
        logits = rep(logits)
        cache = cache._replace(k=tuple(map(rep, cache.k)), v=tuple(map(rep, cache.v)),
                               mask=rep(cache.mask))
    rows = b * n_samples
    tok, logp = pick(logits, jax.random.fold_in(key, 0))
    tokens = jnp.full((rows, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    logprobs = jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(logp)
    done = jnp.isin(tok, stops)
    lengths = jnp.ones((rows,), jnp.int32)
    ones = jnp.ones((rows, 1), bool)

    def cond(carry, stop):
        step, _, _, done, *_ = carry
        return (step < stop) & ~jnp.all(done)

    def body(carry):
        step, cache, tok, done, tokens, logprobs, lengths = carry
        logits, cache = model(tok[:, None], attention_mask=ones, cache=cache)
        new, logp = pick(logits[:, 0], jax.random.fold_in(key, step))
        new = jnp.where(done, pad_id, new)
        logp = jnp.where(done, 0.0, logp)
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, step))
        logprobs = jax.lax.dynamic_update_slice(logprobs, logp[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        return step + 1, cache, new, done | jnp.isin(new, stops), tokens, logprobs, lengths

    cache = cache._replace(end=jnp.asarray(cache.end, jnp.int32))  # now a loop variable
    carry = (jnp.ones((), jnp.int32), cache, tok, done, tokens, logprobs, lengths)
    for stop, width in plan:
        carry = (carry[0], _grow(carry[1], width), *carry[2:])
        carry = jax.lax.while_loop(functools.partial(cond, stop=stop), body, carry)
    step, _, _, _, tokens, logprobs, lengths = carry
    return GenerateOutput(tokens=tokens, lengths=lengths, logprobs=logprobs, steps=step)


def _bad_rows(x, is_bad) -> list[int]:
    """Sorted global indices of the rows of ``x`` for which ``is_bad(rows) -> bool [n]``
    holds, over the rows this process holds: all of them, or, for an array sharded
    over several hosts, each addressable shard's (a host can check only its own rows)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        parts = [(s.index[0].start or 0, np.asarray(s.data)) for s in x.addressable_shards]
    else:
        parts = [(0, np.asarray(x))]
    return sorted({start + int(r) for start, rows in parts
                   for r in np.flatnonzero(is_bad(rows.astype(bool)))})


def _check_prompt(ids, mask, name: str) -> None:
    chex.assert_rank(ids, 2)
    chex.assert_equal_shape([ids, mask])
    if not isinstance(mask, jax.core.Tracer):
        empty = _bad_rows(mask, lambda m: ~m.any(axis=1))
        if empty:
            raise ValueError(f"{name}: rows {empty} have no real token")


def generate(graphdef: nnx.GraphDef, state: nnx.State, prompt_ids: jax.Array,
             prompt_mask: jax.Array, *, key: jax.Array | None = None, max_new_tokens: int,
             n_samples: int = 1, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
             decode_segments: int | None = None) -> GenerateOutput:
    """Sample continuations of padded prompts (graphdef, state = nnx.split(model)).

    prompt_ids, prompt_mask: [B, P], mask 1 = real. Left padding is the usual
    layout; padding on either side is correct (pads are never attended and
    positions count real tokens). temperature == 0 is greedy (key unused).
    A sequence stops after emitting any id in `stop_ids` (kept in its output).
    Needs P + max_new_tokens <= config.max_position_embeddings.
    decode_segments: number of decode-loop segments over a growing cache
    (`decode_plan`; None = automatic). It changes speed and compile time only,
    not the result (up to float rounding of sums over masked slots).
    """
    _check_prompt(prompt_ids, prompt_mask, "prompt_mask")
    config = nnx.merge(graphdef, state).config   # host-side, ~5 ms for 28 layers
    if max_new_tokens < 1 or n_samples < 1:
        raise ValueError(f"need max_new_tokens >= 1 and n_samples >= 1, got "
                         f"max_new_tokens={max_new_tokens}, n_samples={n_samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    _check_filter(top_k, top_p)
    decode_plan(1, 2, segments=decode_segments)   # validates decode_segments
    if prompt_ids.shape[1] + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt length {prompt_ids.shape[1]} + max_new_tokens "
                         f"{max_new_tokens} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    stop_ids = tuple(int(s) for s in stop_ids)
    bad = [s for s in (*stop_ids, pad_id) if not 0 <= s < config.vocab_size]
    if bad:
        raise ValueError(f"stop_ids/pad_id {bad} outside the vocabulary [0, {config.vocab_size})")
    if key is None:
        if temperature != 0.0:
            raise ValueError("sampling with temperature > 0 needs key=jax.random.key(...)")
        key = jax.random.key(0)
    return _generate(graphdef, state, jnp.asarray(prompt_ids, jnp.int32),
                     jnp.asarray(prompt_mask, bool), key,
                     max_new_tokens=int(max_new_tokens), n_samples=int(n_samples),
                     temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                     stop_ids=stop_ids, pad_id=int(pad_id), segments=decode_segments)


def completion_logprobs(model: Qwen3, prompt_ids: jax.Array, prompt_mask: jax.Array,
                        completion_ids: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """log pi(y_t | x, y_<t) [B, C] float32 in one teacher-forced pass (0 where masked).

    prompt [B, P] padded on either side; completion [B, C] right-padded (its
    mask is a prefix of ones). Differentiable; usable inside a jitted loss.
    """
    chex.assert_rank([prompt_ids, completion_ids], 2)
    chex.assert_equal_shape([prompt_ids, prompt_mask])
    chex.assert_equal_shape([completion_ids, completion_mask])
    p, c = prompt_ids.shape[1], completion_ids.shape[1]
    tokens = jnp.concatenate([prompt_ids, completion_ids], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
    hidden = model.hidden_states(tokens, attention_mask=mask)
    # Token t of the completion is predicted at the last real prompt slot (t=0)
    # or at the completion slot just before it.
    before = jnp.concatenate([last_real_index(prompt_mask)[:, None],
                              jnp.broadcast_to(p + jnp.arange(c - 1), (tokens.shape[0], c - 1))],
                             axis=1)
    logits = model.logits(jnp.take_along_axis(hidden, before[..., None], axis=1))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                               completion_ids.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    return jnp.where(completion_mask.astype(bool), logp, 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, prompt_ids, prompt_mask, completion_ids, completion_mask):
    return completion_logprobs(nnx.merge(graphdef, state), prompt_ids, prompt_mask,
                               completion_ids, completion_mask)


def score(graphdef: nnx.GraphDef, state: nnx.State, prompt_ids: jax.Array,
          prompt_mask: jax.Array, completion_ids: jax.Array,
          completion_mask: jax.Array) -> jax.Array:
    """Compiled `completion_logprobs` of a split model: [B, C] float32.

    For generate()'s output use completion_mask = arange(N) < lengths[:, None]
    (and prompts repeated n_samples times, row i * n + j)."""
    _check_prompt(prompt_ids, prompt_mask, "prompt_mask")
    chex.assert_equal_shape([completion_ids, completion_mask])
    if not isinstance(completion_mask, jax.core.Tracer):
        holes = _bad_rows(completion_mask, lambda m: (m[:, 1:] & ~m[:, :-1]).any(axis=1))
        if holes:
            raise ValueError(f"completion_mask rows {holes} are not a prefix of ones")
    return _score(graphdef, state, prompt_ids, prompt_mask, completion_ids, completion_mask)
