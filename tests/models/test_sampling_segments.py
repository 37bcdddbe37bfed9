"""models/sampling.py: the segmented decode loop over a growing cache (decode_plan).

Segmenting changes which cache width each decode step reads, never the
result: greedy outputs still equal transformers' (the committed fixture) with
exact log-probs, sampled outputs equal the one-segment loop's, and the plan
covers every step with the least width.
"""
import os

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from models.hf import load_hf
from models.sampling import MAX_SEGMENTS, SEGMENT_STEPS, decode_plan, generate, score

N = 16
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fixtures", "qwen3")


def test_decode_plan_hand_values():
    # 15 decode steps in 3 segments: stops 1 + ceil(15 i / 3) = 6, 11, 16; width P + stop - 1.
    assert decode_plan(7, 16, segments=3) == ((6, 12), (11, 17), (16, 22))
    assert decode_plan(7, 16) == ((16, 22),)                 # 15 steps <= 32: one segment
    assert decode_plan(32, 128) == ((33, 64), (65, 96), (97, 128), (128, 159))
    assert decode_plan(5, 3, segments=9) == ((2, 6), (3, 7))  # at most one per step
    assert decode_plan(5, 1) == () and decode_plan(5, 1, segments=4) == ()
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="decode_segments"):
            decode_plan(5, 8, segments=bad)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 64), n=st.integers(1, 400),
       k=st.one_of(st.none(), st.integers(1, 12)))
def test_decode_plan_covers_every_step_with_the_least_width(p, n, k):
    plan = decode_plan(p, n, segments=k)
    if n == 1:
        assert plan == ()
        return
    stops = [s for s, _ in plan]
    want_k = min(MAX_SEGMENTS, -(-(n - 1) // SEGMENT_STEPS)) if k is None else k
    assert len(plan) == min(want_k, n - 1)
    assert stops[-1] == n and stops[0] >= 2 and all(a < b for a, b in zip(stops, stops[1:]))
    # Segment i's last step s = stop_i - 1 writes slot P + s - 1 and reads [0, P + s).
    assert all(w == p + s - 1 for s, w in plan)
    sizes = np.diff([1] + stops)
    assert sizes.max() - sizes.min() <= 1                     # nearly equal segments


def _case(name):
    path = os.path.join(FIXTURES, name)
    with np.load(os.path.join(path, "reference.npz"), allow_pickle=False) as f:
        ref = {k: f[k] for k in f.files}
    return ref, load_hf(path)


def test_segmented_greedy_equals_transformers_and_its_logprobs_are_exact():
    # 3 segments of 5 steps: rows stop inside different segments (fixture stop id).
    ref, model = _case("gqa_tied")
    graphdef, state = nnx.split(model)
    pad = int(ref["gen_pad_id"])
    out = generate(graphdef, state, ref["gen_prompt"], ref["gen_mask"], max_new_tokens=N,
                   temperature=0.0, stop_ids=(int(ref["gen_stop_id"]),), pad_id=pad,
                   decode_segments=3)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref["gen_tokens"])
    lengths = np.asarray(out.lengths)
    keep = np.arange(N)[None] < lengths[:, None]
    assert (ref["gen_tokens"][~keep] == pad).all()
    assert int(out.steps) == lengths.max()
    # logprobs[b, t] = log softmax of the untempered model at the token it emitted,
    # recomputed by the scorer (one teacher-forced pass over prompt + output).
    want = score(graphdef, state, ref["gen_prompt"], ref["gen_mask"], ref["gen_tokens"], keep)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(want), atol=1e-5)


def test_segmented_sampling_equals_one_segment():
    # The draw at step t uses fold_in(key, t) whatever segment runs step t, and the
    # n-fold repeated cache grows with the rows it holds.
    ref, model = _case("gqa_tied")
    graphdef, state = nnx.split(model)
    kw = dict(key=jax.random.key(7), max_new_tokens=N, n_samples=3, temperature=1.0,
              stop_ids=(52,))
    one = generate(graphdef, state, ref["gen_prompt"], ref["gen_mask"], **kw)  # 1 segment
    three = generate(graphdef, state, ref["gen_prompt"], ref["gen_mask"], decode_segments=3,
                     **kw)
    np.testing.assert_array_equal(np.asarray(three.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(three.lengths), np.asarray(one.lengths))
    np.testing.assert_allclose(np.asarray(three.logprobs), np.asarray(one.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="decode_segments"):
        generate(graphdef, state, ref["gen_prompt"], ref["gen_mask"], decode_segments=0, **kw)
