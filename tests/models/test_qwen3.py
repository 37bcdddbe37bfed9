"""models/qwen3.py: config, presets, axis names, padding, cache, dtypes, jit."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.hf import load_hf
from models.qwen3 import (MAX_QUERY_BLOCKS, PRESETS, Qwen3, Qwen3Config, init_cache, preset,
                         query_blocks)

QWEN3_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "fixtures", "qwen3")

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, rope_theta=1e4, max_position_embeddings=64,
            initializer_range=0.2)


def _jit_forward(**kw):
    """fn(graphdef, state, tokens, mask, positions) -> model(...) under jit."""
    def fwd(graphdef, state, tokens, mask, positions):
        return nnx.merge(graphdef, state)(tokens, attention_mask=mask, positions=positions, **kw)
    return jax.jit(fwd, static_argnums=0)


@pytest.fixture(scope="module")
def tiny():
    """The committed GQA + tied checkpoint (V=128, E=32, H=4, K=2, D=16), split and a
    jitted forward; loading builds no random init (compiling that costs seconds)."""
    model = load_hf(os.path.join(QWEN3_FIXTURES, "gqa_tied"))
    graphdef, state = nnx.split(model)
    return model, graphdef, state, _jit_forward()


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("hidden_size", -1), ("num_layers", 2.0), ("head_dim", 7),
    ("num_kv_heads", 3), ("rope_theta", 0.0), ("rms_norm_eps", -1e-6),
    ("dtype", "float16"), ("param_dtype", "int8"), ("tie_word_embeddings", 1)])
def test_config_rejects_bad_field_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        Qwen3Config(**dict(TINY, **{field: value}))


def test_presets_match_published_configs():
    # Values of the published Qwen/Qwen3-* config.json files.
    want = {"qwen3-0.6b": (1024, 3072, 28, 16, 8, True),
            "qwen3-1.7b": (2048, 6144, 28, 16, 8, True),
            "qwen3-4b": (2560, 9728, 36, 32, 8, True),
            "qwen3-8b": (4096, 12288, 36, 32, 8, False)}
    for name, (hidden, inter, layers, heads, kv, tie) in want.items():
        c = preset(name)
        assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
                c.tie_word_embeddings) == (hidden, inter, layers, heads, kv, tie)
        assert (c.vocab_size, c.head_dim, c.rope_theta, c.rms_norm_eps,
                c.max_position_embeddings) == (151936, 128, 1e6, 1e-6, 40960)
    assert preset("tiny", vocab_size=300).hidden_size == 64
    with pytest.raises(ValueError, match="vocab_size"):
        preset("tiny")
    with pytest.raises(ValueError, match="qwen3-0.6b"):
        preset("qwen3-0.5b")
    assert set(want) <= set(PRESETS)


def test_qwen3_0_6b_parameter_count():
    # Model card: 0.6B parameters, 0.44B non-embedding (tied head counted once).
    model = nnx.eval_shape(lambda: Qwen3(preset("qwen3-0.6b"), rngs=nnx.Rngs(0)))
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert sum(sizes) == 596_049_920
    assert round((sum(sizes) - 151936 * 1024) / 1e9, 2) == 0.44


def test_every_param_has_logical_axes(tiny):
    model, _, state, _ = tiny
    allowed = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "norm"}
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    spec_leaves = jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == len(spec_leaves) == 2 + 2 * 11   # embed, final norm, 11 per layer
    for value, spec in zip(leaves, spec_leaves):
        assert len(spec) == value.ndim and set(spec) <= allowed, (spec, value.shape)
    assert model.layers[0].attn.q_proj.out_sharding == ("embed", "heads", "head_dim")
    assert model.layers[0].attn.o_proj.shape == (4, 16, 32)   # [heads, head_dim, embed]


def test_hf_dict_round_trip_and_unsupported_keys():
    c = Qwen3Config(**TINY)
    assert Qwen3Config.from_hf_dict(c.to_hf_dict()) == c
    bf = dataclasses.replace(c, dtype="bfloat16", param_dtype="bfloat16")
    assert Qwen3Config.from_hf_dict(bf.to_hf_dict()) == bf
    v5 = dict(c.to_hf_dict(), rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    del v5["rope_theta"]
    assert Qwen3Config.from_hf_dict(v5).rope_theta == 5e5
    for key, value in [("hidden_act", "gelu"), ("attention_bias", True),
                       ("use_sliding_window", True), ("model_type", "llama"),
                       ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
                       ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "mrope": 1}),
                       ("rope_scaling", {"rope_type": "linear"}),
                       ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4})]:
        with pytest.raises(ValueError, match=key.split("_")[0]):
            Qwen3Config.from_hf_dict(dict(c.to_hf_dict(), **{key: value}))


def _place(seqs, width, left):
    """Pad each sequence to `width` on the left or right; returns tokens, mask."""
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        tokens[i, sl], mask[i, sl] = s, 1
    return tokens, mask


def test_left_and_right_padding_give_same_logits(tiny):
    _, graphdef, state, forward = tiny
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 128, n) for n in (9, 5, 2)]
    lt, lm = _place(seqs, 9, left=True)
    rt, rm = _place(seqs, 9, left=False)
    left = np.asarray(forward(graphdef, state, lt, lm, None))
    right = np.asarray(forward(graphdef, state, rt, rm, None))
    for i, s in enumerate(seqs):
        n = len(s)
        np.testing.assert_allclose(left[i, 9 - n:], right[i, :n], atol=2e-5)
    # The shortest sequence alone, unpadded: same logits again.
    alone = np.asarray(forward(graphdef, state, lt[2:, 7:], lm[2:, 7:], None))
    np.testing.assert_allclose(alone[0], right[2, :2], atol=2e-5)
    assert np.abs(left).max() > 0.1   # the comparison is not between zeros


def test_cache_prefill_then_decode_matches_full_forward(tiny):
    model, graphdef, state, forward = tiny
    rng = np.random.default_rng(1)
    tokens, mask = _place([rng.integers(1, 128, 7), rng.integers(1, 128, 4)], 7, left=True)
    full = np.asarray(forward(graphdef, state, tokens, mask, None))

    @jax.jit
    def prefill(state):
        m = nnx.merge(graphdef, state)
        cache = init_cache(m.config, batch_size=2, max_length=10)
        out, cache = m(jnp.asarray(tokens[:, :4]), attention_mask=jnp.asarray(mask[:, :4]),
                       cache=cache)
        assert isinstance(cache.end, int)   # static: the prefill read 4 slots, not 10
        return out, cache._replace(end=jnp.asarray(cache.end))

    @jax.jit
    def step(state, cache, tok, tok_mask):   # traced cache.end: full-width reads
        return nnx.merge(graphdef, state)(tok, attention_mask=tok_mask, cache=cache)

    outs, cache = prefill(state)
    outs = [outs]
    for t in range(4, 7):
        out, cache = step(state, cache, tokens[:, t:t + 1], mask[:, t:t + 1])
        outs.append(out)
    stepwise = jnp.concatenate(outs, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(stepwise)[real], full[real], atol=2e-5)
    assert int(cache.end) == 7 and np.array_equal(np.asarray(cache.mask)[:, :7], real)
    assert not np.asarray(cache.mask)[:, 7:].any()
    with pytest.raises(ValueError, match="overflow"):
        model(jnp.asarray(tokens), cache=init_cache(model.config, batch_size=2, max_length=5))
    with pytest.raises(ValueError, match="causal"):
        model(jnp.asarray(tokens), cache=init_cache(model.config, batch_size=2, max_length=8),
              causal=False)


def test_bfloat16_runs_and_stays_close_to_float32(tiny):
    _, graphdef, state, forward = tiny
    tokens = np.random.default_rng(2).integers(1, 128, (2, 6)).astype(np.int32)
    mask = np.ones_like(tokens)
    ref = np.asarray(forward(graphdef, state, tokens, mask, None))
    low = load_hf(os.path.join(QWEN3_FIXTURES, "gqa_tied"), dtype="bfloat16",
                  param_dtype="bfloat16")
    assert low.layers[0].mlp.up_proj[...].dtype == jnp.bfloat16
    out = forward(*nnx.split(low), tokens, mask, None)
    assert out.dtype == jnp.float32
    err = np.abs(np.asarray(out) - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max(), err


def test_causal_false_reads_the_future_and_causal_does_not(tiny):
    _, graphdef, state, _ = tiny
    hidden = jax.jit(lambda s, t, causal: nnx.merge(graphdef, s).hidden_states(t, causal=causal),
                     static_argnums=2)
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, 128, (1, 5)), jnp.int32)
    changed = tokens.at[0, 4].set((tokens[0, 4] + 1) % 128)
    for causal, moves in [(True, False), (False, True)]:
        a, b = hidden(state, tokens, causal), hidden(state, changed, causal)
        assert a.shape == (1, 5, 32)
        assert bool(jnp.any(jnp.abs(a[0, :4] - b[0, :4]) > 1e-6)) == moves
        assert bool(jnp.any(jnp.abs(a[0, 4] - b[0, 4]) > 1e-6))


def test_positions_reach_rope_relatively(tiny):
    _, graphdef, state, forward = tiny
    tokens = np.random.default_rng(4).integers(1, 128, (2, 5)).astype(np.int32)
    mask = np.ones_like(tokens)

    def at(pos):
        return np.asarray(forward(graphdef, state, tokens, mask,
                                  np.broadcast_to(pos, (2, 5)).astype(np.int32)))

    base = at(np.arange(5))
    np.testing.assert_allclose(np.asarray(forward(graphdef, state, tokens, mask, None)), base,
                               atol=1e-6)          # default positions count from 0
    np.testing.assert_allclose(at(np.arange(5) + 3), base, atol=1e-4)  # shift: no change
    assert np.abs(at(2 * np.arange(5)) - base).max() > 1e-3          # stretch: changes


def test_query_blocks_cover_every_row_once():
    for n in (1, 63, 64, 65, 150, 200, 512, 1000, 4096):
        blocks = query_blocks(n, 64)
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert len(blocks) <= MAX_QUERY_BLOCKS
        assert all(e - s >= 64 for s, e in blocks[:-1])
        assert query_blocks(n, 0) == ((0, n),)
    assert query_blocks(64, 64) == ((0, 64),)
    assert len(query_blocks(4096, 64)) == MAX_QUERY_BLOCKS
    with pytest.raises(ValueError, match="length=0, block=64"):
        query_blocks(0, 64)
    with pytest.raises(ValueError, match="query_block must be an int >= 0, got -1"):
        Qwen3Config(**dict(TINY, query_block=-1))


def test_causal_query_blocks_match_one_block():
    """Blocked causal attention (query_block 64: 3 blocks at T = 150) gives the
    logits and gradients of attention over all T keys, with left and right padding."""
    config = Qwen3Config(**dict(TINY, max_position_embeddings=256))
    full_graphdef, state = nnx.split(Qwen3(config, rngs=nnx.Rngs(3)))
    blocked_graphdef = nnx.graphdef(Qwen3(dataclasses.replace(config, query_block=64),
                                          rngs=nnx.Rngs(3)))
    rng = np.random.default_rng(5)
    seqs = [rng.integers(1, 50, n) for n in (150, 97, 40)]
    lt, lm = _place(seqs, 150, left=True)
    rt, rm = _place(seqs, 150, left=False)
    tokens, mask = np.concatenate([lt, rt]), np.concatenate([lm, rm])
    real = mask.astype(bool)

    def run(graphdef):
        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens, attention_mask=mask)
            logp = jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0)
            return jnp.sum(logp), logits

        fn = jax.value_and_grad(loss, has_aux=True)
        dots = str(jax.make_jaxpr(fn)(state)).count("dot_general")
        (_, logits), grads = jax.jit(fn)(state)
        return dots, np.asarray(logits), grads

    blocked_dots, blocked, blocked_grads = run(blocked_graphdef)
    full_dots, full, full_grads = run(full_graphdef)
    assert blocked_dots > full_dots   # the blocked path was the one traced
    np.testing.assert_allclose(blocked[real], full[real], atol=2e-5)
    assert np.abs(full[real]).max() > 0.1
    for a, b in zip(jax.tree.leaves(blocked_grads), jax.tree.leaves(full_grads)):
        a, b = np.asarray(a), np.asarray(b)   # sums over 900 tokens: compare as vectors
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) and np.linalg.norm(b) > 0
