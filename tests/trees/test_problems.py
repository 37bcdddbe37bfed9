"""experiments/trees/problems.py and experiments/trees/tokens.py: generators, layout, splits, hooks, scoring."""
import functools

import numpy as np
import pytest

from experiments.trees import problems as T


def _parent_map(edges):
    parent = {}
    for p, c in np.asarray(edges).tolist():
        assert c not in parent, f"label {c} has two parents"
        parent[c] = p
    return parent


def _walk_up(edges, root, goal):
    """Goal -> root by following the edge list only."""
    parent, chain = _parent_map(edges), [goal]
    while chain[-1] != root:
        chain.append(parent[chain[-1]])
        assert len(chain) <= len(edges) + 1
    return chain


def _count_paths(edges, root, goal):
    """Directed simple paths root -> goal, by exhaustive DFS."""
    children = {}
    for p, c in np.asarray(edges).tolist():
        children.setdefault(p, []).append(c)
    count, stack = 0, [(root, {root})]
    while stack:
        v, seen = stack.pop()
        if v == goal:
            count += 1
            continue
        stack.extend((c, seen | {c}) for c in children.get(v, ()) if c not in seen)
    return count


def _component(edges, start):
    adjacent = {}
    for p, c in np.asarray(edges).tolist():
        adjacent.setdefault(p, set()).add(c)
        adjacent.setdefault(c, set()).add(p)
    seen, stack = {start}, [start]
    while stack:
        for w in adjacent[stack.pop()] - seen:
            seen.add(w)
            stack.append(w)
    return seen


SAMPLERS = {
    "random": T.problem_sampler("random", num_labels=48, min_nodes=8, max_nodes=32),
    "perfect_binary": T.problem_sampler("perfect_binary", num_labels=31, depth=4),
    "branching": T.problem_sampler("branching", num_labels=64, min_nodes=4, max_nodes=32, max_depth=6),
    "distractors": T.problem_sampler("random", num_labels=80, min_nodes=8, max_nodes=16,
                                     distractor_nodes=8, noise_edges=5),
}


NUM_LABELS = {"random": 48, "perfect_binary": 31, "branching": 64, "distractors": 80}


def _same(a, b):
    return (np.array_equal(a.edges, b.edges) and a.root == b.root and a.goal == b.goal
            and np.array_equal(a.path, b.path))


def test_determinism():
    for sampler in SAMPLERS.values():
        a = [sampler(np.random.default_rng(7)) for _ in range(3)]
        b = [sampler(np.random.default_rng(7)) for _ in range(3)]
        assert all(map(_same, a, b))
    r1, r2 = np.random.default_rng(1), np.random.default_rng(2)
    assert not _same(SAMPLERS["random"](r1), SAMPLERS["random"](r2))


def test_shapes_by_hand_and_by_property():
    np.testing.assert_array_equal(T.perfect_binary_tree(depth=2), [-1, 0, 0, 1, 1, 2, 2])
    assert len(T.perfect_binary_tree(depth=4)) == 31
    rng = np.random.default_rng(0)
    for _ in range(50):
        parents = T.random_tree(rng, min_nodes=8, max_nodes=32, max_children=2)
        assert 8 <= len(parents) <= 32 and parents[0] == -1
        assert np.bincount(parents[1:]).max() <= 2 and (parents[1:] < np.arange(1, len(parents))).all()
        parents = T.branching_tree(rng, min_nodes=4, max_nodes=20, max_children=3, max_depth=3)
        counts = np.bincount(parents[1:], minlength=len(parents))
        assert 4 <= len(parents) <= 20 and counts.max() <= 3 and counts[0] >= 1
        depth = np.zeros(len(parents), int)
        for i in range(1, len(parents)):
            depth[i] = depth[parents[i]] + 1
        assert depth.max() <= 3


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_problems_are_valid_and_paths_correct(name):
    rng = np.random.default_rng(3)
    for _ in range(40):
        p = SAMPLERS[name](rng)
        labels = np.unique(p.edges)
        assert labels.min() >= 0 and labels.max() < NUM_LABELS[name] and p.root != p.goal
        assert p.goal not in p.edges[:, 0]   # the goal is a leaf
        np.testing.assert_array_equal(_walk_up(p.edges, p.root, p.goal), p.path[::-1])
        assert _count_paths(p.edges, p.root, p.goal) == 1


def test_distractors_never_create_another_path():
    rng = np.random.default_rng(11)
    for _ in range(60):
        p = SAMPLERS["distractors"](rng)
        n_main = len(_component(p.edges, p.root))
        assert 8 <= n_main <= 16
        assert len(p.edges) == (n_main - 1) + 7 + 5   # main tree + distractor tree + noise edges
        assert set(p.path) <= _component(p.edges, p.root)
        assert _count_paths(p.edges, p.root, p.goal) == 1
        _parent_map(p.edges)   # every label has at most one parent
        others = set(np.unique(p.edges)) - _component(p.edges, p.root)
        assert len(others) >= 8 + 6   # distractor labels never touch the main tree


def test_too_few_labels_is_rejected():
    with pytest.raises(ValueError, match="num_labels=30 < 31"):
        T.make_problem(np.random.default_rng(0), T.perfect_binary_tree(depth=4), num_labels=30)
    with pytest.raises(ValueError, match="parents"):
        T.make_problem(np.random.default_rng(0), np.array([-1, 2, 0]), num_labels=9)


# ----------------------------------------------------------------- layout
HAND = T.PathProblem(edges=np.array([[4, 2], [4, 1], [2, 8]]), root=4, goal=8, path=np.array([4, 2, 8]))


def test_hand_made_layout():
    vocab = T.TreeVocab(num_labels=10)   # label x -> id x + 9
    batch = T.build_batch([HAND], vocab=vocab, task="forward_cot", seq_len=24)
    prompt = [1, 13, 11, 3, 13, 10, 3, 11, 17, 3, 4, 13, 17, 7]
    target = [17, 11, 13, 5, 13, 11, 17, 2]
    np.testing.assert_array_equal(batch["tokens"][0], prompt + target + [0, 0])
    np.testing.assert_array_equal(batch["targets"][0], prompt[1:] + target + [0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0] * 13 + [1] * 8 + [0] * 3)
    np.testing.assert_array_equal(batch["positions"][0], list(range(22)) + [0, 0])
    np.testing.assert_array_equal(batch["attention_mask"][0], [1] * 22 + [0] * 2)
    assert batch["target_start"][0] == 14 and batch["target_len"][0] == 8
    assert vocab.decode(batch["tokens"][0]).endswith("<q> 4 8 <fwd_cot> 8 2 4 | 4 2 8 <eos>")
    no_sep = T.TreeVocab(num_labels=10, edge_separator=False)
    np.testing.assert_array_equal(T.target_tokens(HAND, vocab=no_sep, task="backward"), [17, 11, 13, 2])
    np.testing.assert_array_equal(T.target_tokens(HAND, vocab=no_sep, task="forward"), [13, 11, 17, 2])
    np.testing.assert_array_equal(T.prompt_tokens(HAND, vocab=no_sep, task="forward"),
                                  [1, 13, 11, 13, 10, 11, 17, 4, 13, 17, 8])


@pytest.mark.parametrize("task", T.TASKS)
def test_batch_shapes_and_targets_walk_the_edges(task):
    vocab, rng = T.TreeVocab(num_labels=80), np.random.default_rng(5)
    problems = [SAMPLERS["distractors"](rng) for _ in range(8)]
    batch = T.build_batch(problems, vocab=vocab, task=task, seq_len=160)
    assert batch["tokens"].shape == batch["loss_mask"].shape == (8, 160)
    assert batch["tokens"].dtype == np.int32 and batch["attention_mask"].dtype == bool
    for i, p in enumerate(problems):
        span = batch["targets"][i][batch["loss_mask"][i] > 0] - vocab.NUM_SPECIAL
        chain = _walk_up(p.edges, p.root, p.goal)
        expected = {"backward": chain, "forward": chain[::-1],
                    "forward_cot": chain + [vocab.STAGE - 9] + chain[::-1]}[task] + [vocab.EOS - 9]
        np.testing.assert_array_equal(span, expected)
    with pytest.raises(ValueError, match="example 0 needs"):
        T.build_batch(problems, vocab=vocab, task=task, seq_len=20)


def test_prompt_batch_is_left_padded():
    vocab = T.TreeVocab(num_labels=10)
    batch = T.prompt_batch([HAND], vocab=vocab, task="backward", seq_len=16)
    prompt = T.prompt_tokens(HAND, vocab=vocab, task="backward")
    np.testing.assert_array_equal(batch["tokens"][0], [0, 0] + list(prompt))
    np.testing.assert_array_equal(batch["positions"][0], [0, 0] + list(range(14)))
    assert batch["attention_mask"][0].tolist() == [False] * 2 + [True] * 14


def test_score_by_hand():
    reference = np.array([[5, 6, 2, 0], [5, 7, 8, 2]])
    predicted = np.array([[5, 6, 2, 9, 9], [5, 6, 8, 2, 0]])   # row 0 right (tail ignored)
    out = T.score(predicted, reference)
    np.testing.assert_array_equal(out["exact_match"], [True, False])
    np.testing.assert_allclose(out["position_accuracy"], [1.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(out["position_count"], [2, 2, 2, 1])
    short = T.score(np.array([[5, 6]]), np.array([[5, 6, 2]]))
    assert not short["exact_match"][0] and short["position_accuracy"][2] == 0.0


def test_teacher_forced_perfect_predictions_score_one():
    vocab, rng = T.TreeVocab(num_labels=48), np.random.default_rng(9)
    problems = [SAMPLERS["random"](rng) for _ in range(6)]
    batch = T.build_batch(problems, vocab=vocab, task="forward_cot", seq_len=200)
    reference = T.reference_targets(problems, vocab=vocab, task="forward_cot", length=70)
    spans = T.teacher_forced_spans(batch["targets"], batch, length=70)
    assert T.score(spans, reference)["exact_match"].all()
    wrong = batch["targets"].copy()
    wrong[2, batch["target_start"][2]] += 1   # second target token of example 2
    assert T.score(T.teacher_forced_spans(wrong, batch, length=70), reference)["exact_match"].tolist() \
        == [True, True, False, True, True, True]


# ------------------------------------------------------------------ splits
def _relabel(p, perm, rng):
    order = rng.permutation(len(p.edges))
    return T.PathProblem(edges=perm[p.edges][order], root=int(perm[p.root]), goal=int(perm[p.goal]),
                         path=perm[p.path])


def test_canonical_form_invariant_under_relabelling_and_shuffling():
    rng = np.random.default_rng(4)
    for sampler in SAMPLERS.values():
        for _ in range(10):
            p = sampler(rng)
            q = _relabel(p, rng.permutation(80), rng)
            assert T.canonical_form(p) == T.canonical_form(q)
            assert T.labelled_form(p) == T.labelled_form(_relabel(p, np.arange(80), rng))


def _problem(edges, root, goal):
    return T.PathProblem(edges=np.array(edges), root=root, goal=goal, path=np.array([root, goal]))


def test_canonical_form_hand_made_examples():
    chain = _problem([[0, 1], [1, 2]], 0, 2)
    star = _problem([[0, 1], [0, 2]], 0, 2)
    assert T.canonical_form(chain) == "(((*)))+" and T.canonical_form(star) == "(()(*))+"   # ")" < "*" in ASCII
    # same shape, goal at non-equivalent leaves: 0 -> {1, 2}, 1 -> 3
    deep_goal, shallow_goal = _problem([[0, 1], [0, 2], [1, 3]], 0, 3), _problem([[0, 1], [0, 2], [1, 3]], 0, 2)
    assert T.canonical_form(deep_goal) != T.canonical_form(shallow_goal)
    # same shape, goal at symmetric leaves: equal
    assert T.canonical_form(_problem([[0, 1], [0, 2]], 0, 1)) == T.canonical_form(star)
    # a distractor component changes the key; its labels do not
    with_distractor = _problem([[0, 1], [0, 2], [7, 8]], 0, 2)
    assert T.canonical_form(with_distractor) == "(()(*))+(())" != T.canonical_form(star)
    assert T.canonical_form(_problem([[0, 1], [0, 2], [9, 5]], 0, 1)) == "(()(*))+(())"
    with pytest.raises(ValueError, match="two parents"):
        T.canonical_form(_problem([[0, 1], [2, 1]], 0, 1))
    with pytest.raises(ValueError, match="cycle"):
        T.canonical_form(_problem([[0, 1], [5, 6], [6, 5]], 0, 1))


def test_no_test_tree_appears_in_training():
    # small trees so that shapes collide often and the exclusion must work
    sampler = T.problem_sampler("branching", num_labels=12, min_nodes=3, max_nodes=6)
    test, keys = T.sample_problems(np.random.default_rng(0), 30, sampler=sampler, unique=True)
    assert len(keys) == 30 == len({T.canonical_form(p) for p in test})
    calls = []
    counting = lambda rng: calls.append(1) or sampler(rng)   # noqa: E731
    train, train_keys = T.sample_problems(np.random.default_rng(1), 200, sampler=counting, exclude=keys)
    assert len(train) == 200 and not train_keys & keys
    assert not {T.canonical_form(p) for p in train} & keys
    assert len(calls) > 200   # some draws were test shapes and got rejected
    with pytest.raises(ValueError, match="only 1 of 2"):
        T.sample_problems(np.random.default_rng(2), 2, sampler=SAMPLERS["perfect_binary"],
                          unique=True, max_attempts=50)
    labelled, _ = T.sample_problems(np.random.default_rng(2), 5, sampler=SAMPLERS["perfect_binary"],
                                    key=T.labelled_form, unique=True)
    assert len({T.labelled_form(p) for p in labelled}) == 5


# -------------------------------------------------------------- compression
def test_keep_every_k_keeps_exactly_what_it_documents():
    np.testing.assert_array_equal(T.keep_every_k(np.arange(10), k=3), [0, 3, 6, 9])
    np.testing.assert_array_equal(T.keep_every_k(np.arange(8), k=3), [0, 3, 6, 7])
    for length in range(1, 13):
        for k in range(1, 6):
            kept = T.keep_every_k(np.arange(length) * 10, k=k)
            np.testing.assert_array_equal(kept, np.array(sorted(set(range(0, length, k)) | {length - 1})) * 10)
    with pytest.raises(ValueError, match="k must be >= 1"):
        T.keep_every_k(np.arange(3), k=0)


def test_keep_ratio_keeps_exactly_what_it_documents():
    np.testing.assert_array_equal(T.keep_ratio(np.arange(10), ratio=0.5), [0, 2, 5, 7, 9])
    np.testing.assert_array_equal(T.keep_ratio(np.arange(5), ratio=0.1), [0, 4])
    np.testing.assert_array_equal(T.keep_ratio(np.arange(1), ratio=0.1), [0])
    for length in range(1, 15):
        for ratio in (0.05, 0.2, 0.25, 0.5, 0.7, 0.9, 1.0):
            kept = T.keep_ratio(np.arange(length), ratio=ratio)
            m = min(length, max(min(2, length), int(np.floor(ratio * length + 0.5))))
            assert len(kept) == m and kept[0] == 0 and kept[-1] == length - 1
            assert (np.diff(kept) > 0).all()
    with pytest.raises(ValueError, match="ratio"):
        T.keep_ratio(np.arange(3), ratio=0.0)


def test_compressed_targets():
    vocab = T.TreeVocab(num_labels=20)
    p = T.PathProblem(edges=np.array([[1, 2], [2, 3], [3, 4], [4, 5]]), root=1, goal=5,
                      path=np.array([1, 2, 3, 4, 5]))
    keep = functools.partial(T.keep_every_k, k=2)
    ids = lambda xs: [x + 9 for x in xs]   # noqa: E731
    np.testing.assert_array_equal(T.target_tokens(p, vocab=vocab, task="backward", keep=keep),
                                  ids([5, 3, 1]) + [vocab.EOS])
    np.testing.assert_array_equal(T.target_tokens(p, vocab=vocab, task="forward_cot", keep=keep),
                                  ids([5, 3, 1]) + [vocab.STAGE] + ids([1, 2, 3, 4, 5]) + [vocab.EOS])


def test_sorted_path_is_the_path_in_ascending_order():
    np.testing.assert_array_equal(T.sorted_path(HAND), [2, 4, 8])
    rng = np.random.default_rng(5)
    for _ in range(20):
        p = SAMPLERS["random"](rng)
        s = T.sorted_path(p)
        assert (np.diff(s) > 0).all() and set(s.tolist()) == set(p.path.tolist())
