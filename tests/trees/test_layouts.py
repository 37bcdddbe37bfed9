"""The tree lab's pieces by hand: token layouts, key roles, attention recording, the model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.trees import encoding as D
from experiments.trees import model as M
from experiments.trees import problems as T
from experiments.trees import roles as R
from models.qwen3 import Qwen3, Qwen3Config, with_attention_probs

VOCAB = T.TreeVocab(num_labels=10)      # label x -> id x + 9; lab ids 19, 20 = sort tasks
HAND = T.PathProblem(edges=np.array([[4, 2], [4, 1], [2, 8]]), root=4, goal=8,
                     path=np.array([4, 2, 8]))


# ----------------------------------------------------------------- layouts
def test_paired_layout_by_hand():
    b = D.lab_batch([HAND], vocab=VOCAB, task="forward_cot", seq_len=20, positions="edge_set")
    # BOS, edges as child<parent, QUERY, root<QUERY, goal<TASK, TASK, then 8 2 4 | 4 2 8 EOS.
    np.testing.assert_array_equal(
        b["tokens"][0], [1, 11, 10, 17, 4, 13, 17, 7, 17, 11, 13, 5, 13, 11, 17, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(
        b["aux"][0], [0, 13, 13, 11, 0, 4, 7, 0, 7, 17, 11, 13, 5, 13, 11, 17, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["targets"][0, :16], list(b["tokens"][0, 1:16]) + [0])
    np.testing.assert_array_equal(np.flatnonzero(b["loss_mask"][0]), np.arange(7, 15))
    np.testing.assert_array_equal(b["positions"][0],
                                  [0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 0, 0, 0])
    assert (b["target_start"][0], b["target_len"][0], b["stage"][0]) == (8, 8, 3)
    assert b["attention_mask"][0].sum() == 16
    none = D.lab_batch([HAND], vocab=VOCAB, task="backward", seq_len=14, positions="none")
    assert not none["positions"].any() and none["stage"][0] == none["target_len"][0] == 4
    seq = D.lab_batch([HAND], vocab=VOCAB, task="backward", seq_len=14, positions="sequential")
    np.testing.assert_array_equal(seq["positions"][0, :12], np.arange(12))


def test_tokens_layout_matches_data_tree_tokens():
    rng = np.random.default_rng(0)
    sampler = T.problem_sampler("random", num_labels=20, min_nodes=4, max_nodes=9)
    problems = [sampler(rng) for _ in range(6)]
    for task in T.TASKS:
        ours = D.lab_batch(problems, vocab=VOCAB_20, task=task, seq_len=48, layout="tokens",
                           positions="sequential")
        ref = T.build_batch(problems, vocab=VOCAB_20, task=task, seq_len=48)
        for key in ("tokens", "targets", "positions", "attention_mask", "loss_mask",
                    "target_start", "target_len"):
            np.testing.assert_array_equal(ours[key], ref[key], err_msg=f"{task}/{key}")
        assert not ours["aux"].any()
    edge_set = D.lab_batch(problems[:1], vocab=VOCAB_20, task="backward", seq_len=48,
                           layout="tokens", positions="edge_set")
    e = len(problems[0].edges)
    np.testing.assert_array_equal(edge_set["positions"][0, 1:1 + 3 * e], np.tile([1, 2, 3], e))
    assert edge_set["positions"][0, 1 + 3 * e] == 4          # QUERY follows the edge slots


VOCAB_20 = T.TreeVocab(num_labels=20)


def test_sort_targets_and_task_ids():
    np.testing.assert_array_equal(D.target_ids(HAND, vocab=VOCAB, task="sort_cot"),
                                  [17, 11, 13, 5, 11, 13, 17, 2])
    np.testing.assert_array_equal(D.target_ids(HAND, vocab=VOCAB, task="sort"), [11, 13, 17, 2])
    assert (D.lab_task_id(VOCAB, "sort_cot"), D.lab_task_id(VOCAB, "sort")) == (19, 20)
    assert D.lab_vocab_size(VOCAB) == 21
    with pytest.raises(ValueError, match="task must be one of"):
        D.lab_task_id(VOCAB, "sideways")


def test_keep_fn_and_compressed_chain():
    assert D.keep_fn() is None
    np.testing.assert_array_equal(D.keep_fn(keep_every=2)(np.arange(5)), [0, 2, 4])
    np.testing.assert_array_equal(D.keep_fn(keep_ratio=0.5)(np.arange(6)), [0, 3, 5])
    with pytest.raises(ValueError, match="not both"):
        D.keep_fn(keep_every=2, keep_ratio=0.5)
    with pytest.raises(ValueError, match="keep_every"):
        D.keep_fn(keep_every=0)
    b = D.lab_batch([HAND], vocab=VOCAB, task="forward_cot", seq_len=20,
                    keep=D.keep_fn(keep_every=2), level=2)
    np.testing.assert_array_equal(b["tokens"][0, 8:15], [17, 13, 5, 13, 11, 17, 2])  # 8 4 | 4 2 8
    assert b["aux"][0, 7] == D.level_id(VOCAB, 2) == 22      # TASK<2>: 19 + 2 sort ids + 1
    assert D.lab_vocab_size(VOCAB, levels=True) == 29
    with pytest.raises(ValueError, match="paired"):
        D.lab_batch([HAND], vocab=VOCAB, task="backward", seq_len=20, layout="tokens", level=1)


def test_splits_exclude_every_test_tree():
    small = T.problem_sampler("random", num_labels=12, min_nodes=4, max_nodes=6)
    paper = T.problem_sampler("branching", num_labels=12, min_nodes=4, max_nodes=6)
    train, tests = D.make_splits(seed=3, train_size=100, test_size=30, train_sampler=small,
                                 test_samplers={"a": small, "b": paper})
    test_keys = {T.canonical_form(p) for ps in tests.values() for p in ps}
    assert len(train) == 100 and all(len(v) == 30 for v in tests.values())
    assert not {T.canonical_form(p) for p in train} & test_keys
    again, _ = D.make_splits(seed=3, train_size=100, test_size=30, train_sampler=small,
                             test_samplers={"a": small, "b": paper})
    assert all(np.array_equal(x.edges, y.edges) for x, y in zip(train, again))


# ----------------------------------------------------------------- roles
def _hand_batch():
    return D.lab_batch([HAND], vocab=VOCAB, task="forward_cot", seq_len=16)


def test_role_masks_by_hand():
    roles = R.role_masks(_hand_batch(), stage_id=VOCAB.STAGE, layout="paired")[0]
    name = {i: r for i, r in enumerate(R.ROLES)}
    # step 2: query position 9 holds node 2 (edge 1 is 2<4, edge 3 is 8<2)
    assert [name[i] for i in roles[9, :10]] == [
        "bos", "parent_edge", "other", "child_edges", "query", "query", "query", "query",
        "other", "self"]
    assert (roles[9, 10:] == -1).all() and (roles[:7] == -1).all()
    # step 6 (answer): node 2 again at position 13; its chain copy is position 9
    assert [name[i] for i in roles[13, :14]] == [
        "bos", "parent_edge", "other", "child_edges", "query", "query", "query", "query",
        "other", "chain_match", "other", "stage", "other", "self"]
    np.testing.assert_array_equal(R.step_kinds(_hand_batch())[0, 6:16],
                                  [-1, 0, 1, 1, 2, 2, 3, 3, 3, -1])
    backward = D.lab_batch([HAND], vocab=VOCAB, task="backward", seq_len=14)
    np.testing.assert_array_equal(R.step_kinds(backward)[0, 7:11], [0, 1, 1, 2])


def _one_hot_probs(choices, t=16, heads=2):
    """probs [1, H, T, T]: query q of head h attends only to choices[h][q]."""
    p = np.zeros((1, heads, t, t))
    for h, row in enumerate(choices):
        for q, w in row.items():
            p[0, h, q, w] = 1.0
    return p


def test_role_masses_and_specialisation_index_by_hand():
    batch = _hand_batch()
    roles = R.role_masks(batch, stage_id=VOCAB.STAGE, layout="paired")
    kinds = R.step_kinds(batch)
    # steps s = 0..7 sit at query positions 7..14 (start, chain x2, switch x2, answer x3)
    head0 = {7: 0, 8: 0, 9: 1, 10: 10, 11: 4, 12: 10, 13: 9, 14: 8}
    head1 = {7: 7, 8: 3, 9: 9, 10: 10, 11: 11, 12: 12, 13: 13, 14: 14}
    m = R.role_masses(_one_hot_probs([head0, head1]), roles, kinds)
    i = {r: k for k, r in enumerate(R.ROLES)}
    start, chain, switch, answer = range(4)
    np.testing.assert_allclose(m[0, chain, [i["parent_edge"], i["bos"]]], [.5, .5])
    np.testing.assert_allclose(m[0, switch, [i["self"], i["query"]]], [.5, .5])
    np.testing.assert_allclose(m[0, answer, i["chain_match"]], 1.0)
    np.testing.assert_allclose(m[1, chain, [i["parent_edge"], i["self"]]], [.5, .5])
    np.testing.assert_allclose(m[1, [start, switch, answer], i["self"]], [1, 1, 1])
    np.testing.assert_allclose(m.sum(-1), np.ones((2, 4)))
    # TV per kind: start 1, chain 1/2, switch 1/2, answer 1 -> mean 3/4
    assert R.specialisation_index(m) == pytest.approx(3 / 4)
    assert R.specialisation_index(m[:1]) == 0.0
    assert R.specialisation_index(np.stack([m[0], m[0]])) == 0.0
    roles_of = R.head_roles(m)
    assert roles_of["lookup"] == {"head": 0, "mass": 0.5, "per_head": [0.5, 0.5]}
    assert roles_of["reversal"]["per_head"] == [1.0, 0.0]


# --------------------------------------------------------- attention recording
TINY = dict(vocab_size=30, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, rope_theta=1e4, initializer_range=0.3)


def _numpy_init(make, seed=0):
    """``make()`` built without compiling any init kernel: abstract shapes from
    ``nnx.eval_shape``, then N(0, 0.3) numpy values (norm scales = 1)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if "norm" in "/".join(map(str, path)):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def test_attention_recording_is_exact_and_leaves_the_model_unchanged():
    model = _numpy_init(lambda: Qwen3(Qwen3Config(**TINY), rngs=nnx.Rngs(0)))
    q = model.layers[0].attn.q_proj
    q[...] = q[...].at[:, 2:].set(0.0)      # heads 2, 3 (kv head 1) get zero queries
    graphdef, state = nnx.split(model)
    tokens = jnp.array([[0, 5, 6, 7, 8]])
    mask = jnp.array([[0, 1, 1, 1, 1]])
    forward = lambda m, t: m(t, attention_mask=mask)  # noqa: E731

    after = []   # trace-time facts about the module after recording

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        plain = forward(m, tokens)
        out = with_attention_probs(forward, m, tokens)
        after.append(([layer.attn.record_probs for layer in m.layers],
                      len(jax.tree.leaves(nnx.state(m, nnx.Intermediate)))))
        return plain, out

    plain, (logits, probs) = run(state)
    np.testing.assert_array_equal(logits, plain)
    assert len(probs) == 2 and probs[0].shape == (1, 4, 5, 5)
    want = np.array([[0, 1, 0, 0, 0], [0, .5, .5, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0],
                     [0, .25, .25, .25, .25]])               # query rows 1..4, slot 0 masked
    for h in (2, 3):
        np.testing.assert_allclose(probs[0][0, h, 1:], want, atol=1e-6)
    assert np.abs(np.asarray(probs[0][0, :2, 1:]) - want).max() > 1e-3   # heads 0, 1 are not
    np.testing.assert_allclose(np.asarray(probs[1][0, :, 1:]).sum(-1), 1.0, atol=1e-5)
    assert after == [([False, False], 0)]     # switched off again, nothing left behind


# ----------------------------------------------------------------- lab model
def test_path_model_reduces_to_the_decoder():
    config = Qwen3Config(**dict(TINY, num_layers=1))   # one layer of TINY
    b = _hand_batch()
    tokens = jnp.asarray(b["tokens"])
    inputs = {k: jnp.asarray(b[k]) for k in ("aux", "positions", "attention_mask")}
    no_aux = dict(inputs, aux=jnp.zeros_like(inputs["aux"]))

    @jax.jit
    def outputs(plain_state, paired_state):
        plain, paired = nnx.merge(*plain_state), nnx.merge(*paired_state)
        want = plain.decoder(tokens, positions=inputs["positions"],
                             attention_mask=inputs["attention_mask"])
        want_paired = paired.decoder(tokens, positions=inputs["positions"],
                                     attention_mask=inputs["attention_mask"])
        return (plain(tokens, **inputs), want, paired(tokens, **no_aux), want_paired,
                paired(tokens, **inputs))

    plain = nnx.split(_numpy_init(lambda: M.PathModel(config, paired=False, rngs=nnx.Rngs(1))))
    paired = nnx.split(_numpy_init(lambda: M.PathModel(config, paired=True, rngs=nnx.Rngs(1))))
    got, want, got_paired, want_paired, with_aux = outputs(plain, paired)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_paired, want_paired, atol=1e-5)
    assert np.abs(with_aux - got_paired).max() > 1e-3       # the aux table is used
    with pytest.raises(ValueError, match="heads"):
        M.lab_model_config(vocab_size=21, layers=1, heads=3, hidden=16, mlp=16)


def test_ablate_head_zeroes_exactly_one_output_block():
    config = M.lab_model_config(vocab_size=21, layers=2, heads=2, hidden=16, mlp=16)
    model = _numpy_init(lambda: M.PathModel(config, paired=True, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    out = M.ablate_head(params, layer=1, head=0)
    o_proj = lambda p, l: np.asarray(p["decoder"]["layers"][l]["attn"]["o_proj"][...])  # noqa
    assert not o_proj(out, 1)[0].any() and o_proj(out, 1)[1].any()
    np.testing.assert_array_equal(o_proj(out, 1)[1], o_proj(params, 1)[1])
    np.testing.assert_array_equal(o_proj(out, 0), o_proj(params, 0))
    with pytest.raises(ValueError, match="head=2"):
        M.ablate_head(params, layer=0, head=2)
    with pytest.raises(ValueError, match="layer=5"):
        M.ablate_head(params, layer=5, head=0)


def test_lm_loss_of_a_uniform_model_is_log_vocab():
    b = {k: jnp.asarray(v) for k, v in _hand_batch().items()}
    uniform = lambda tokens, **_: jnp.zeros(tokens.shape + (21,))  # noqa: E731
    total, count, _ = jax.jit(lambda b: M.lm_loss(uniform, b, None))(b)
    assert float(count) == 8 and float(total / count) == pytest.approx(np.log(21), rel=1e-6)


def _oracle(bad_label=None, wrong_label=None):
    """A 'model' that solves the paired backward task from its inputs alone
    (parent table from the edge positions; TASK -> goal; root -> EOS), optionally
    answering ``wrong_label`` whenever the current token is ``bad_label``."""
    v = VOCAB_20.size + 2

    def model(tokens, *, aux, positions, attention_mask):
        del positions, attention_mask
        t = tokens.shape[1]
        qpos = jnp.argmax(tokens == VOCAB_20.QUERY, axis=1)[:, None]
        cols = jnp.arange(t)[None]
        edge = (cols >= 1) & (cols < qpos)
        parent = jnp.einsum("bt,btv->bv", jnp.where(edge, aux, 0), jax.nn.one_hot(tokens, v))
        root = jnp.take_along_axis(tokens, qpos + 1, 1)
        goal = jnp.take_along_axis(tokens, qpos + 2, 1)
        nxt = jnp.take_along_axis(parent, tokens, 1).astype(jnp.int32)
        nxt = jnp.where(tokens == VOCAB_20.BACKWARD, goal, jnp.where(tokens == root,
                                                                      VOCAB_20.EOS, nxt))
        if bad_label is not None:
            nxt = jnp.where(tokens == VOCAB_20.label_ids(bad_label), VOCAB_20.label_ids(
                wrong_label), nxt)
        return 10.0 * jax.nn.one_hot(nxt, v)
    return model


def test_teacher_forced_exact_match_equals_greedy_decoding():
    rng = np.random.default_rng(4)
    sampler = T.problem_sampler("random", num_labels=20, min_nodes=4, max_nodes=9)
    problems = [sampler(rng) for _ in range(24)]
    batch = D.lab_batch(problems, vocab=VOCAB_20, task="backward", seq_len=40)
    ref = T.reference_targets(problems, vocab=VOCAB_20, task="backward", length=12)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    for model in (_oracle(), _oracle(bad_label=problems[0].path[-1], wrong_label=19)):
        tf = np.asarray(jax.jit(lambda b: M.teacher_forced_eval(model, b)["exact"])(jb))
        out = np.asarray(M.greedy_decode(model, jb, max_new=12, eos_id=VOCAB_20.EOS,
                                         paired=True))
        greedy = T.score(out, ref)["exact_match"]
        np.testing.assert_array_equal(tf, greedy)
    assert greedy.any() and not greedy.all()      # the corrupted oracle fails some trees
    with pytest.raises(ValueError, match="max_new"):
        M.greedy_decode(_oracle(), batch, max_new=40, eos_id=VOCAB_20.EOS, paired=True)
