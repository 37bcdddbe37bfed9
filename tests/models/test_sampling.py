"""models/sampling.py: greedy parity with transformers, score/sampler agreement,
top-k/top-p support, stopping, n samples, compile-once."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from models.hf import load_hf
from models.sampling import (_generate, _inverse_cdf_sample, completion_logprobs,
                             filter_logits, generate, score)

N = 16
GQA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "fixtures", "qwen3", "gqa_tied")


def _greedy(model, ref, **kw):
    graphdef, state = nnx.split(model)
    return generate(graphdef, state, ref["gen_prompt"], ref["gen_mask"], max_new_tokens=N,
                    temperature=0.0, stop_ids=(int(ref["gen_stop_id"]),),
                    pad_id=int(ref["gen_pad_id"]), **kw)


def test_greedy_equals_transformers_generate(qwen3_case):
    _, ref, model = qwen3_case
    out = _greedy(model, ref)
    want = ref["gen_tokens"]
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    stop, pad = int(ref["gen_stop_id"]), int(ref["gen_pad_id"])
    for row, n in zip(want, np.asarray(out.lengths)):
        hits = np.flatnonzero(row == stop)
        assert n == (hits[0] + 1 if len(hits) else N)       # stop token counted
        assert (row[n:] == pad).all()
    assert int(out.steps) == int(np.max(out.lengths))      # loop ends when all stopped
    logp = np.asarray(out.logprobs)
    assert (logp[np.arange(N)[None] >= np.asarray(out.lengths)[:, None]] == 0).all()
    assert (logp[np.arange(N)[None] < np.asarray(out.lengths)[:, None]] < 0).all()


def test_padding_side_does_not_change_generation(qwen3_case):
    _, ref, model = qwen3_case
    prompt, mask = ref["gen_prompt"], ref["gen_mask"]
    right_p, right_m = np.zeros_like(prompt), np.zeros_like(mask)
    for i in range(len(prompt)):   # move each row's real tokens to the left edge
        real = prompt[i][mask[i] > 0]
        right_p[i, :len(real)], right_m[i, :len(real)] = real, 1
    out = _greedy(model, dict(ref, gen_prompt=right_p, gen_mask=right_m))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref["gen_tokens"])


@pytest.fixture(scope="module")
def sampled():
    """One sampling run on the GQA checkpoint: n=3 per prompt, top-k 5, top-p 0.8."""
    with np.load(os.path.join(GQA, "reference.npz"), allow_pickle=False) as f:
        prompt, mask = f["gen_prompt"], f["gen_mask"]
    graphdef, state = nnx.split(load_hf(GQA))
    out = generate(graphdef, state, prompt, mask, key=jax.random.key(7), max_new_tokens=N,
                   n_samples=3, temperature=1.0, top_k=5, top_p=0.8, stop_ids=(52,))
    return graphdef, state, np.repeat(prompt, 3, 0), np.repeat(mask, 3, 0), out


def _completion_mask(out):
    return np.arange(N)[None] < np.asarray(out.lengths)[:, None]


def test_score_equals_sampler_logprobs(sampled):
    graphdef, state, prompt, mask, out = sampled
    logp = np.asarray(score(graphdef, state, prompt, mask, out.tokens, _completion_mask(out)))
    np.testing.assert_allclose(logp, np.asarray(out.logprobs), atol=2e-5)
    assert (logp[_completion_mask(out)] < 0).all()
    holed = _completion_mask(out).copy()
    holed[4, 0] = False
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        score(graphdef, state, prompt, mask, out.tokens, holed)


def test_completion_logprobs_is_differentiable(sampled):
    graphdef, state, prompt, mask, out = sampled
    cmask = _completion_mask(out)

    @jax.jit
    def total(params):
        model = nnx.merge(graphdef, params)
        return completion_logprobs(model, prompt, mask, out.tokens, cmask).sum()

    grads = jax.grad(total)(state)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and min(norms) > 0   # every parameter gets a gradient


def test_samples_stay_in_the_top_k_top_p_set(sampled):
    graphdef, state, prompt, mask, out = sampled
    tokens, cmask = np.asarray(out.tokens), _completion_mask(out)
    seq = np.concatenate([prompt, tokens], 1)
    full = np.asarray(jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, attention_mask=m))(
        state, seq, np.concatenate([mask, cmask], 1)))
    p = prompt.shape[1]
    for b in range(len(tokens)):
        for t in range(int(out.lengths[b])):
            z = full[b, p + t - 1]
            y = tokens[b, t]
            assert (z > z[y]).sum() < 5                            # among the top 5
            top = np.sort(z)[::-1][:5]
            probs = np.exp(top - top.max()) / np.exp(top - top.max()).sum()
            assert probs[top > z[y]].sum() < 0.8                   # inside the 0.8 nucleus


def test_n_samples_ordering_under_greedy(qwen3_case):
    _, ref, model = qwen3_case
    out = _greedy(model, ref, n_samples=3)   # greedy: row i * 3 + j copies prompt i
    assert out.tokens.shape == (9, N) and out.lengths.shape == (9,)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(ref["gen_tokens"], 3, 0))


def test_n_samples_of_a_prompt_differ(sampled):
    out = sampled[-1]
    assert out.tokens.shape == out.logprobs.shape == (9, N)
    tokens = np.asarray(out.tokens).reshape(3, 3, N)
    for group in tokens:   # sampling: the 3 samples of a prompt differ
        assert len({tuple(r) for r in group}) > 1


def test_everything_stops_at_once_and_the_loop_exits(qwen3_case):
    _, ref, model = qwen3_case
    graphdef, state = nnx.split(model)
    vocab = model.config.vocab_size
    out = generate(graphdef, state, ref["gen_prompt"], ref["gen_mask"], key=jax.random.key(0),
                   max_new_tokens=N, stop_ids=tuple(range(vocab)), pad_id=0)
    assert int(out.steps) == 1 and np.asarray(out.lengths).tolist() == [1, 1, 1]
    assert (np.asarray(out.tokens)[:, 1:] == 0).all()


def test_compiles_once_for_new_parameters(qwen3_case):
    _, ref, model = qwen3_case
    graphdef, state = nnx.split(model)
    _greedy(model, ref)
    before = _generate._cache_size()
    perturbed = jax.tree.map(lambda x: x * 1.5, state)
    out = generate(graphdef, perturbed, ref["gen_prompt"], ref["gen_mask"], max_new_tokens=N,
                   temperature=0.0, stop_ids=(int(ref["gen_stop_id"]),),
                   pad_id=int(ref["gen_pad_id"]))
    assert _generate._cache_size() == before
    assert not np.array_equal(np.asarray(out.tokens), ref["gen_tokens"])  # params did change


def test_argument_errors_name_the_value(qwen3_case):
    _, ref, model = qwen3_case
    graphdef, state = nnx.split(model)
    p, m = ref["gen_prompt"], ref["gen_mask"]
    cases = [(dict(temperature=1.0), "key"), (dict(temperature=-1.0), "temperature"),
             (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
             (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop_ids=(10**6,)), "1000000"),
             (dict(max_new_tokens=600), "max_position_embeddings")]
    for kw, word in cases:
        with pytest.raises(ValueError, match=word):
            generate(graphdef, state, p, m, **dict(dict(max_new_tokens=4), **kw))
    empty = m.copy()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        generate(graphdef, state, p, empty, max_new_tokens=4, temperature=0.0)
    completion = np.ones((p.shape[0], 3), np.int32)
    holed = np.ones((p.shape[0], 3), bool)
    holed[-1, 1] = False                     # 1 0 1: not a prefix of ones
    with pytest.raises(ValueError, match=rf"completion_mask rows \[{p.shape[0] - 1}\]"):
        score(graphdef, state, p, m, completion, holed)


def _kept_reference(z, k, p):
    """numpy statement of filter_logits' documented rule."""
    keep = np.ones_like(z, bool)
    if 0 < k < len(z):
        keep &= z >= np.sort(z)[::-1][k - 1]
    if p < 1:
        w = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        w /= w.sum()
        above = np.array([w[z > zi].sum() for zi in z])
        keep &= above < p
    return keep


@settings(max_examples=25, deadline=None)
@given(z=st.lists(st.integers(-40, 40), min_size=12, max_size=12, unique=True),
       k=st.integers(0, 13), p=st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.2, 1e-3]))
def test_filter_logits_keeps_exactly_the_documented_set(z, k, p):
    # Distinct logits on a 0.25 grid: no float ties, so the rule is unambiguous.
    z = np.asarray(z, np.float32) * 0.25
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(z[None]), top_k=k, top_p=p)))[0]
    np.testing.assert_array_equal(kept, _kept_reference(z, k, p))
    assert kept[np.argmax(z)]                                       # top-1 always kept
    if 0 < k:
        assert kept.sum() <= k
    if p < 1 and (k == 0 or k >= 12):
        probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        assert probs[kept].sum() >= p - 1e-6                        # reaches the mass
        assert probs[kept].sum() - probs[kept].min() < p + 1e-6     # and is minimal


def test_inverse_cdf_sampling_frequencies():
    logits = jnp.log(jnp.asarray([[0.1, 0.0, 0.6, 0.3]] * 20000, jnp.float32))
    draws = np.asarray(_inverse_cdf_sample(jax.random.key(3), logits))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.1, 0.0, 0.6, 0.3], atol=0.01)
    assert freq[1] == 0.0                                            # zero mass: never drawn
