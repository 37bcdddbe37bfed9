"""Qwen3 dense decoder in Flax NNX, readable in one file.

    h_0   = E[tokens]
    a_l   = h_{l-1} + Attn_l(RMSNorm(h_{l-1}))
    h_l   = a_l + W_down (silu(W_gate x) * W_up x),  x = RMSNorm(a_l)
    logits = RMSNorm(h_L) @ W_out                  (W_out = E^T when tied)

Attention is grouped-query (num_heads queries share num_kv_heads keys/values,
query head h reads kv head h // (num_heads // num_kv_heads)), with a head
dimension of its own, no biases, and an RMSNorm over head_dim applied to every
query and key head *before* the rotary embedding (Qwen3's QK-norm). RoPE uses
the rotate-half convention of Hugging Face transformers:
    inv_freq_i = theta^(-2i / head_dim),  i < head_dim / 2
    rope(x) = [x1 cos - x2 sin, x2 cos + x1 sin],  x = [x1, x2] (halves),
and its linear, dynamic and YaRN scalings (models/rope.py, ``rope_scaling``).

Padding may be on either side: masked tokens are never attended to and, by
default, positions count real tokens only (0 for the first real one), so a
sequence has the same logits whatever padding surrounds it.

Attention probabilities can be recorded for analysis (`with_attention_probs`);
recording is off by default and then costs nothing (a Python-level switch, the
traced program is unchanged).

Parameters are stored in `param_dtype` and computed in `dtype`; RMSNorm
statistics, softmax and the returned logits are float32. Every parameter
carries logical axis names (embed, vocab, heads, kv_heads, head_dim, mlp, norm)
for the sharding rules; kernels are laid out [in, ..., out] with heads as their
own axis ([embed, heads, head_dim], [heads, head_dim, embed]).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from models.rope import RopeScaling, rope, rope_scaling_from_hf, rope_scaling_to_hf

__all__ = ["DTYPES", "PRESETS", "Qwen3Config", "preset", "KVCache", "init_cache", "query_blocks",
           "default_positions", "rope", "RMSNorm", "Attention", "MLP",
           "DecoderBlock", "Qwen3", "with_attention_probs"]

_NEG_INF = float(jnp.finfo(jnp.float32).min)
# Causal attention without a cache, with Qwen3Config.query_block > 0, runs in at
# most this many query blocks (`query_blocks`).
MAX_QUERY_BLOCKS = 8

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture and numerics of a Qwen3 dense decoder (validated on creation).

    dtype is the compute dtype, param_dtype the storage dtype ('float32' or
    'bfloat16'); initializer_range is the std of the normal init of every kernel.
    query_block > 0 runs causal attention without a cache in blocks of at least
    that many query rows, each reading only the keys up to its last row
    (`query_blocks`); 0 attends over all T keys in one block. It changes speed
    and float rounding only (64 is 1.2x faster per CPU SFT step at the main job's
    shape, docs/performance.md), and is not part of the HF config.
    """
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    dtype: str = "float32"
    param_dtype: str = "float32"
    initializer_range: float = 0.02
    query_block: int = 0
    rope_scaling: RopeScaling | None = None   # None: default RoPE (models/rope.py)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):   # from model.json
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        def check(name, ok, want):
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"Qwen3Config.{name} must be {want}, got {value!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            check(name, lambda v: type(v) is int and v > 0, "a positive int")
        for name in ("rope_theta", "rms_norm_eps"):
            check(name, lambda v: type(v) in (int, float) and v > 0, "a positive number")
        check("initializer_range", lambda v: type(v) in (int, float) and v >= 0, ">= 0")
        check("query_block", lambda v: type(v) is int and v >= 0, "an int >= 0")
        check("tie_word_embeddings", lambda v: type(v) is bool, "a bool")
        check("head_dim", lambda v: v % 2 == 0, "even (RoPE rotates pairs)")
        check("num_kv_heads", lambda v: self.num_heads % v == 0,
              f"a divisor of num_heads={self.num_heads}")
        for name in ("dtype", "param_dtype"):
            check(name, lambda v: v in DTYPES, f"one of {sorted(DTYPES)}")
        check("rope_scaling", lambda v: v is None or isinstance(v, RopeScaling),
              "None or a models.rope.RopeScaling")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> "Qwen3Config":
        """From a transformers Qwen3 config.json dict (v4 or v5 layout).

        Refuses features this model does not implement (other activations,
        attention biases, sliding windows, scaled RoPE), naming the key.
        dtype and param_dtype default to the checkpoint's dtype when it is
        float32/bfloat16, else float32; `overrides` replace any field.
        """
        def need(key, ok, want):
            if key in d and d[key] is not None and not ok(d[key]):
                raise ValueError(f"config.json: {key}={d[key]!r} is not supported (want {want})")
        need("model_type", lambda v: v == "qwen3", "'qwen3'")
        need("hidden_act", lambda v: v == "silu", "'silu'")
        need("attention_bias", lambda v: v is False, "false")
        need("use_sliding_window", lambda v: v is False, "false")
        # transformers 5's precedence: a non-empty rope_scaling replaces rope_parameters
        # whole; rope_theta inside the winning dict beats the top-level key
        key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        rope_params = dict(d.get(key) or {})
        scaling = rope_scaling_from_hf(rope_params, key, d)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"config.json lacks required keys {missing}")
        stored = d.get("dtype", d.get("torch_dtype"))
        stored = stored if stored in DTYPES else "float32"
        heads = d["num_attention_heads"]
        fields = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or 128,   # transformers' Qwen3Config default
            rope_theta=float(rope_params.get("rope_theta", d.get("rope_theta") or 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            dtype=stored, param_dtype=stored,
            initializer_range=float(d.get("initializer_range", 0.02)))
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers' Qwen3ForCausalLM accepts.
        (The compute dtype is not part of it; param_dtype is written as dtype.)"""
        return {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
            "rope_theta": self.rope_theta, "rope_scaling": rope_scaling_to_hf(self.rope_scaling),
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": False, "initializer_range": self.initializer_range,
            "dtype": self.param_dtype, "torch_dtype": self.param_dtype,
        }


_QWEN3 = dict(vocab_size=151936, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
              max_position_embeddings=40960)
PRESETS: dict[str, dict[str, Any]] = {
    # Published Hugging Face config.json values of Qwen/Qwen3-*.
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28,
                       num_heads=16, num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28,
                       num_heads=16, num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_layers=36,
                     num_heads=32, num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36,
                     num_heads=32, num_kv_heads=8, tie_word_embeddings=False),
    # CPU presets; the caller sets vocab_size (e.g. a trained SentencePiece).
    "tiny": dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=1e4, max_position_embeddings=4096,
                 tie_word_embeddings=True),
    "small": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=64, rope_theta=1e4, max_position_embeddings=4096,
                  tie_word_embeddings=True),
}


def preset(name: str, **overrides) -> Qwen3Config:
    """A named configuration; keyword overrides replace fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown Qwen3 preset {name!r}; valid: {sorted(PRESETS)}")
    fields = dict(PRESETS[name], **overrides)
    if "vocab_size" not in fields:
        raise ValueError(f"preset {name!r} needs vocab_size=... (set by the caller)")
    return Qwen3Config(**fields)



class KVCache(NamedTuple):
    """Keys/values of every layer, written in place at slots [end, end + T).

    k, v: one [B, num_kv_heads, head_dim, S_max] array per layer (compute dtype);
          slots are the minor axis so attention streams over them.
    mask: [B, S_max] bool, True where the slot holds a real (attendable) token.
    end:  number of slots written so far (same for every row). A Python int
          while it is known statically (a fresh cache, e.g. at prefill): then
          attention reads only slots [0, end + T) instead of all S_max.
    The next real token's position is derived: mask.sum(-1) per row.
    """
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    end: jax.Array | int


def init_cache(config: Qwen3Config, *, batch_size: int, max_length: int) -> KVCache:
    """An empty cache with room for `max_length` slots per row."""
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"init_cache needs positive sizes, got batch_size={batch_size}, "
                         f"max_length={max_length}")
    shape = (batch_size, config.num_kv_heads, config.head_dim, max_length)
    zeros = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers))
    return KVCache(k=zeros, v=zeros, mask=jnp.zeros((batch_size, max_length), bool),
                   end=0)


def default_positions(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """positions[b, t] = offset[b] + (number of real tokens in row b before t);
    padded slots get the position of the previous real token (never used)."""
    counts = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
    return jnp.maximum(counts, 0) + jnp.asarray(offset, jnp.int32)


def query_blocks(length: int, block: int) -> tuple[tuple[int, int], ...]:
    """Static ``((start, stop), ...)`` query blocks of causal attention over ``length`` tokens.

    Block [start, stop) reads key slots [0, stop) only: under a causal mask its
    later keys get probability 0, so skipping them changes nothing but float
    rounding, and n blocks compute (n + 1) / (2n) of the T x T scores (5/8 at
    n = 4). Blocks hold c = max(block, ceil(length / MAX_QUERY_BLOCKS)) rows
    (the last one fewer); length <= c, or block = 0, is one block.

    >>> query_blocks(200, 64)
    ((0, 64), (64, 128), (128, 192), (192, 200))
    """
    if length < 1 or block < 0:
        raise ValueError(f"query_blocks needs length >= 1 and block >= 0, got "
                         f"length={length}, block={block}")
    c = max(block, -(-length // MAX_QUERY_BLOCKS)) if block else length
    return tuple((start, min(length, start + c)) for start in range(0, length, c))


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], *,
           std: float, dtype) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def _rows_matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False,
                 preferred_element_type=None) -> jax.Array:
    """x [..., I] @ w [I, O] (or w [O, I] with transpose_w) as one 2-D matmul.

    y = reshape(reshape(x, [N, I]) @ w, [..., O]),  N = prod(x.shape[:-1]).
    Same values as ``x @ w``; flattening the leading axes first makes the
    weight gradient of the backward pass a plain [N, I]^T [N, O] contraction
    over one axis. With the 3-D ``x @ w``, autodiff contracts over (batch,
    time) and XLA:CPU then materialises a transposed copy of the [N, O]
    activation gradient for every weight gradient (a strided copy fused with
    the elementwise backward, the largest single cost of the CPU train step,
    docs/performance.md).
    """
    rows = x.reshape(-1, x.shape[-1])
    dims = (((1,), (1 if transpose_w else 0,)), ((), ()))
    y = jax.lax.dot_general(rows, w, dims, preferred_element_type=preferred_element_type)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class RMSNorm(nnx.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",),
                               eager_sharding=False)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(self.dtype)[(None,) * (x.ndim - 1)]
        return normed.astype(self.dtype) * scale


class Attention(nnx.Module):
    """Grouped-query self-attention with QK-norm and RoPE."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        std, pdt = config.initializer_range, config.weight_dtype
        self.q_proj = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), std=std, dtype=pdt)
        self.k_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), std=std, dtype=pdt)
        self.v_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), std=std, dtype=pdt)
        self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), std=std, dtype=pdt)
        norm = dict(eps=config.rms_norm_eps, dtype=config.compute_dtype, param_dtype=pdt)
        self.q_norm = RMSNorm(d, **norm)
        self.k_norm = RMSNorm(d, **norm)
        self.num_kv_heads, self.head_dim = k, d
        self.groups = h // k
        self.rope_theta, self.rope_scaling = config.rope_theta, config.rope_scaling
        self.max_positions = config.max_position_embeddings
        self.dtype = config.compute_dtype
        self.query_block = config.query_block
        self.record_probs = False   # static switch, see `with_attention_probs`

    def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None,
                 offset: jax.Array | None = None, causal: bool = False):
        """x: [B, T, E]; mask: [B, T, W] bool (query t may read key slot w).

        Without kv, keys are this call's T tokens (W = T). With kv = (k, v) of
        shape [B, K, D, S_max], this call's keys/values are written at slots
        [offset, offset + T) first, then slots [0, W) are read.
        causal=True (without kv) promises that the mask lets no query t read a
        slot w > t; with config.query_block > 0 attention then runs in
        `query_blocks`, which skip the scores such a mask zeroes (same result up
        to float rounding).
        Returns (y [B, T, E], new kv or None).

        Projections are 2-D matmuls of [B*T, E] token rows with [E, N*D] views
        of the kernels (see `_rows_matmul`); keys and values are kept
        [B, K, D, S] (slots minor) so that both attention products are batched
        over (B, K) and stream along the slot axis: a decode step copies
        neither weights nor cache.
        """
        b, t, e = x.shape
        kh, g, d = self.num_kv_heads, self.groups, self.head_dim

        def project(p, n):   # [B, T, E] @ [E, n*D] -> [B, T, n, D]
            w = p[...].astype(self.dtype).reshape(e, n * d)
            return _rows_matmul(x, w).reshape(b, t, n, d)

        rot = dict(theta=self.rope_theta, scaling=self.rope_scaling,
                   max_position_embeddings=self.max_positions)
        q = rope(self.q_norm(project(self.q_proj, kh * g)), positions, **rot)
        k = rope(self.k_norm(project(self.k_proj, kh)), positions, **rot)
        k, v = k.transpose(0, 2, 3, 1), project(self.v_proj, kh).transpose(0, 2, 3, 1)
        if kv is not None:
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, 0, 0, offset))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, 0, 0, offset))
        width = mask.shape[-1]
        if causal and kv is None and self.query_block and not self.record_probs:
            out = [self._attend(q[:, s:e], k[..., :e], v[..., :e], mask[:, s:e, :e])
                   for s, e in query_blocks(t, self.query_block)]   # [s, e) reads [0, e)
            out = out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)
        else:
            out = self._attend(q, k[..., :width], v[..., :width], mask)
        y = _rows_matmul(out, self.o_proj[...].astype(self.dtype).reshape(kh * g * d, e))
        return y, (None if kv is None else (k, v))

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Queries q [B, T, H, D] over keys and values [B, K, D, W] under mask
        [B, T, W] -> head outputs [B, T, H*D] (before o_proj)."""
        b, t = q.shape[:2]
        kh, g, d = self.num_kv_heads, self.groups, self.head_dim
        # Query head h = kv_head * G + g; rows of one kv head, t-major: [B, K, T*G, D].
        q = q.reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, d)
        scores = jnp.einsum("bkqd,bkds->bkqs", q, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kh, t, g, -1) * d ** -0.5
        scores = jnp.where(mask[:, None, :, None, :], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        if self.record_probs:   # [B, K, T, G, W] -> [B, H, T, W], h = kv_head * G + g
            self.sow(nnx.Intermediate, "attention_probs",
                     probs.transpose(0, 1, 3, 2, 4).reshape(b, kh * g, t, -1))
        probs = probs.astype(self.dtype).reshape(b, kh, t * g, -1)
        out = jnp.einsum("bkds,bkqs->bkdq", v, probs).reshape(b, kh, d, t, g)
        return out.transpose(0, 3, 1, 4, 2).reshape(b, t, kh * g * d)


class MLP(nnx.Module):
    """SwiGLU: W_down (silu(x W_gate) * (x W_up))."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        e, f = config.hidden_size, config.intermediate_size
        std, pdt = config.initializer_range, config.weight_dtype
        self.gate_proj = _param(rngs, (e, f), ("embed", "mlp"), std=std, dtype=pdt)
        self.up_proj = _param(rngs, (e, f), ("embed", "mlp"), std=std, dtype=pdt)
        self.down_proj = _param(rngs, (f, e), ("mlp", "embed"), std=std, dtype=pdt)
        self.dtype = config.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        gate = jax.nn.silu(_rows_matmul(x, w(self.gate_proj)))
        return _rows_matmul(gate * _rows_matmul(x, w(self.up_proj)), w(self.down_proj))


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: attention then SwiGLU MLP."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, dtype=config.compute_dtype,
                    param_dtype=config.weight_dtype)
        self.input_norm = RMSNorm(config.hidden_size, **norm)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, *, positions, mask, kv=None, offset=None, causal=False):
        """Same arguments as Attention.__call__; returns (x, new kv or None)."""
        y, kv = self.attn(self.input_norm(x), positions=positions, mask=mask, kv=kv,
                          offset=offset, causal=causal)
        x = x + y
        return x + self.mlp(self.post_attn_norm(x)), kv


class Qwen3(nnx.Module):
    """The decoder. See the module docstring and docs/contributing.md."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        pdt, std = config.weight_dtype, config.initializer_range
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size),
                            ("vocab", "embed"), std=std, dtype=pdt)
        self.layers = nnx.List([DecoderBlock(config, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                  dtype=config.compute_dtype, param_dtype=pdt)
        self.lm_head = None if config.tie_word_embeddings else _param(
            rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"),
            std=std, dtype=pdt)

    def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                      attention_mask: jax.Array | None = None,
                      cache: KVCache | None = None, causal: bool = True):
        """Final normed hidden states [B, T, E] (compute dtype).

        Returns (hidden, new_cache) when `cache` is given, else hidden.
        causal=False lets every token attend to every real token (a
        bidirectional encoder over the same blocks); it cannot use a cache.
        """
        chex.assert_rank(tokens, 2)
        b, t = tokens.shape
        mask = (jnp.ones((b, t), bool) if attention_mask is None
                else attention_mask.astype(bool))
        chex.assert_shape(mask, (b, t))
        if cache is None:
            key_mask, q_slots, k_slots, offset = mask, jnp.arange(t), jnp.arange(t), None
            if positions is None:
                positions = default_positions(mask)
        else:
            if not causal:
                raise ValueError("causal=False cannot be combined with a KV cache")
            if cache.mask.shape[0] != b:
                raise ValueError(f"cache batch {cache.mask.shape[0]} != tokens batch {b}")
            offset, size = cache.end, cache.mask.shape[1]
            if isinstance(offset, int) and offset + t > size:
                raise ValueError(f"cache overflow: {offset} slots used + {t} tokens > {size}")
            width = offset + t if isinstance(offset, int) else size
            cache_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, offset))
            key_mask = cache_mask[:, :width]
            q_slots, k_slots = offset + jnp.arange(t), jnp.arange(width)
            if positions is None:
                positions = default_positions(mask, cache.mask.sum(-1, keepdims=True))
        chex.assert_shape(positions, (b, t))
        attn_mask = key_mask[:, None, :]
        if causal:
            attn_mask = attn_mask & (k_slots[None, :] <= q_slots[:, None])[None]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.config.compute_dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = layer(x, positions=positions, mask=attn_mask, kv=kv, offset=offset,
                          causal=causal and cache is None)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        x = self.final_norm(x)
        if cache is None:
            return x
        return x, KVCache(k=tuple(new_k), v=tuple(new_v), mask=cache_mask, end=offset + t)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on hidden states [..., E] -> float32 logits [..., V]."""
        dt = self.config.compute_dtype
        if self.lm_head is None:
            return _rows_matmul(hidden, self.embed[...].astype(dt), transpose_w=True,
                                preferred_element_type=jnp.float32)
        return _rows_matmul(hidden, self.lm_head[...].astype(dt),
                            preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None,
                 cache: KVCache | None = None, causal: bool = True):
        """float32 logits [B, T, V]; (logits, new_cache) when `cache` is given."""
        out = self.hidden_states(tokens, positions=positions, attention_mask=attention_mask,
                                 cache=cache, causal=causal)
        if cache is None:
            return self.logits(out)
        hidden, new_cache = out
        return self.logits(hidden), new_cache


def with_attention_probs(fn, model: nnx.Module, *args, **kwargs):
    """Run ``fn(model, *args, **kwargs)`` and also return every attention map it computed.

    Returns ``(out, probs)``: ``probs`` is a tuple with one float32 array
    [B, H, T, W] per attention call, in layer order (a layer called twice
    contributes two entries): ``probs[l][b, h, t, w]`` is the softmax weight
    that query head h of query t gives key slot w (each row sums to 1 over its
    attendable slots; masked slots get 0). Query head h reads kv head
    ``h // (H // K)``.

    Recording switches ``Attention.record_probs`` on for this call only and
    collects the values with ``nnx.capture``; it works eagerly and inside
    ``jax.jit`` (merge the model inside the traced function).
    """
    attns = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, Attention)]
    for _, m in attns:
        m.record_probs = True
    try:
        out, captured = nnx.capture(fn, nnx.Intermediate)(model, *args, **kwargs)
    finally:
        for _, m in attns:
            m.record_probs = False
    probs = []
    for path, _ in attns:
        node = captured
        for key in path:
            node = node.get(key, {}) if hasattr(node, "get") else {}
        if "attention_probs" in node:
            probs.extend(node["attention_probs"].get_value())
    return out, tuple(probs)
