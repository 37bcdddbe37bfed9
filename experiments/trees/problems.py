"""Tree path-finding task (after Yang et al. 2025, arXiv 2508.08222); numpy only.

A problem is the shuffled edge list of a rooted tree, its root and a goal leaf;
the answer is the path between them. Labels are drawn without replacement from
``num_labels`` symbols, so a model cannot memorise positions.

Targets: backward (goal -> root, e.g. ``8 1 2 4``), forward with chain of
thought (``8 1 2 4 | 4 2 1 8``) and forward without (``4 2 1 8``); the token
layout, batches and scorer live in ``experiments/trees/tokens.py`` and are
re-exported here. Tree shapes are parent arrays over structural ids 0..n-1 with root 0,
``parent[0] == -1`` and ``parent[i] < i``.

Splits: :func:`canonical_form` encodes a problem up to relabelling (AHU
encoding of every component, the goal marked, the root's component first), so
``sample_problems(..., exclude=test_keys)`` never yields a test tree. Perfect
binary trees of one depth share a single shape, so for them use
``key=labelled_form`` (exact labelled tree, edge order ignored).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from experiments.trees.tokens import (TASKS, TreeVocab, build_batch, prompt_batch,
                                      prompt_tokens, reference_targets, score, target_tokens,
                                      teacher_forced_spans)

__all__ = [
    "TASKS", "TreeVocab", "PathProblem", "random_tree", "perfect_binary_tree", "branching_tree",
    "make_problem", "problem_sampler", "canonical_form", "labelled_form", "sample_problems",
    "backward_chain", "sorted_path", "keep_every_k", "keep_ratio", "prompt_tokens", "target_tokens",
    "build_batch", "prompt_batch", "reference_targets", "teacher_forced_spans", "score",
]


@dataclasses.dataclass(frozen=True, eq=False)
class PathProblem:
    """edges: int [E, 2] (parent, child) labels in presentation order, distractors
    included; path: labels root -> goal of the unique root-goal path."""

    edges: np.ndarray
    root: int
    goal: int
    path: np.ndarray


# --------------------------------------------------------------------- shapes
def random_tree(rng: np.random.Generator, *, min_nodes: int = 8, max_nodes: int = 32,
                max_children: int | None = None) -> np.ndarray:
    """Random recursive tree: n ~ U{min_nodes..max_nodes}; node i attaches to a
    uniform earlier node with fewer than ``max_children`` children."""
    if not 2 <= min_nodes <= max_nodes:
        raise ValueError(f"need 2 <= min_nodes <= max_nodes, got {min_nodes}, {max_nodes}")
    if max_children is not None and max_children < 1:
        raise ValueError(f"max_children must be >= 1, got {max_children}")
    n = int(rng.integers(min_nodes, max_nodes + 1))
    parents, counts = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    for i in range(1, n):
        open_nodes = np.arange(i) if max_children is None else np.flatnonzero(counts[:i] < max_children)
        parents[i] = open_nodes[rng.integers(len(open_nodes))]
        counts[parents[i]] += 1
    return parents


def perfect_binary_tree(*, depth: int) -> np.ndarray:
    """Perfect binary tree with leaves at ``depth`` (2**(depth+1) - 1 nodes)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    n = 2 ** (depth + 1) - 1
    return np.concatenate([[-1], (np.arange(1, n) - 1) // 2]).astype(np.int64)


def branching_tree(rng: np.random.Generator, *, min_nodes: int = 4, max_nodes: int = 32,
                   max_children: int = 3, max_depth: int | None = None,
                   max_attempts: int = 1000) -> np.ndarray:
    """Breadth-first growth: each node gets U{0..max_children} children (the root
    at least one) until ``max_nodes`` or ``max_depth``; redrawn below ``min_nodes``."""
    if not 2 <= min_nodes <= max_nodes or max_children < 1:
        raise ValueError(f"need 2 <= min_nodes <= max_nodes and max_children >= 1, got "
                         f"{min_nodes}, {max_nodes}, {max_children}")
    for _ in range(max_attempts):
        parents, depths, head = [-1], [0], 0
        while head < len(parents) and len(parents) < max_nodes:
            low = 1 if head == 0 else 0
            k = int(rng.integers(low, max_children + 1))
            if max_depth is not None and depths[head] >= max_depth:
                k = 0
            k = min(k, max_nodes - len(parents))
            parents += [head] * k
            depths += [depths[head] + 1] * k
            head += 1
        if len(parents) >= min_nodes:
            return np.asarray(parents, np.int64)
    raise ValueError(f"branching_tree: no tree with >= {min_nodes} nodes in {max_attempts} "
                     f"attempts (max_depth={max_depth}, max_children={max_children})")


def _validate_parents(parents: np.ndarray) -> np.ndarray:
    parents = np.asarray(parents, np.int64)
    if parents.ndim != 1 or len(parents) < 2 or parents[0] != -1:
        raise ValueError(f"parents must be 1-D with >= 2 nodes and parents[0] == -1, got {parents}")
    bad = np.flatnonzero((parents[1:] < 0) | (parents[1:] >= np.arange(1, len(parents))))
    if len(bad):
        raise ValueError(f"parents[i] must lie in [0, i); node {bad[0] + 1} has parent {parents[bad[0] + 1]}")
    return parents


# ------------------------------------------------------------------- problems
def make_problem(rng: np.random.Generator, parents: np.ndarray, *, num_labels: int,
                 distractor: np.ndarray | None = None, noise_edges: int = 0) -> PathProblem:
    """Label a shape, pick the goal uniformly among non-root leaves, shuffle edges.

    Distractors use labels disjoint from the main tree: ``distractor`` (a second
    parent array) becomes a separate tree, and ``noise_edges`` edges form a
    random forest over extra labels (each new edge hangs a fresh label under a
    fresh or earlier noise label). Every label thus has at most one parent and
    the root-goal path stays unique.
    """
    parents = _validate_parents(parents)
    n = len(parents)
    extra = 0 if distractor is None else len(_validate_parents(distractor))
    if noise_edges < 0:
        raise ValueError(f"noise_edges must be >= 0, got {noise_edges}")
    needed = n + extra + 2 * noise_edges
    if num_labels < needed:
        raise ValueError(f"num_labels={num_labels} < {needed} labels needed "
                         f"({n} tree + {extra} distractor + 2*{noise_edges} noise)")
    has_child = np.zeros(n, bool)
    has_child[parents[1:]] = True
    leaves = np.flatnonzero(~has_child[1:]) + 1
    goal = int(leaves[rng.integers(len(leaves))])
    labels = rng.permutation(num_labels)
    edges = [np.stack([labels[parents[1:]], labels[1:n]], 1)]
    if distractor is not None:
        d = _validate_parents(distractor)
        lab = labels[n:n + extra]
        edges.append(np.stack([lab[d[1:]], lab[1:]], 1))
    pool, noise_nodes, noise = iter(labels[n + extra:]), [], []
    for _ in range(noise_edges):
        if not noise_nodes or rng.random() < 0.5:
            noise_nodes.append(next(pool))
        parent = noise_nodes[rng.integers(len(noise_nodes))]
        child = next(pool)
        noise.append((parent, child))
        noise_nodes.append(child)
    if noise:
        edges.append(np.asarray(noise, np.int64))
    edges = np.concatenate(edges).astype(np.int64)
    edges = edges[rng.permutation(len(edges))]
    chain = [goal]
    while chain[-1] != 0:
        chain.append(int(parents[chain[-1]]))
    return PathProblem(edges=edges, root=int(labels[0]), goal=int(labels[goal]),
                       path=labels[np.asarray(chain[::-1])].astype(np.int64))


def problem_sampler(kind: str, *, num_labels: int, min_nodes: int = 8, max_nodes: int = 32,
                    depth: int = 4, max_children: int = 3, max_depth: int | None = None,
                    distractor_nodes: int = 0, noise_edges: int = 0
                    ) -> Callable[[np.random.Generator], PathProblem]:
    """``rng -> PathProblem`` for ``kind`` in {'random', 'perfect_binary', 'branching'}.

    'random': :func:`random_tree` (min/max_nodes); 'perfect_binary': ``depth``;
    'branching': :func:`branching_tree` (0..max_children children, max_depth).
    ``distractor_nodes > 1`` adds a random distractor tree of that many nodes.
    """
    shapes = {
        "random": lambda r: random_tree(r, min_nodes=min_nodes, max_nodes=max_nodes),
        "perfect_binary": lambda r: perfect_binary_tree(depth=depth),
        "branching": lambda r: branching_tree(r, min_nodes=min_nodes, max_nodes=max_nodes,
                                              max_children=max_children, max_depth=max_depth),
    }
    if kind not in shapes:
        raise ValueError(f"kind must be one of {sorted(shapes)}, got {kind!r}")
    if distractor_nodes == 1 or distractor_nodes < 0:
        raise ValueError(f"distractor_nodes must be 0 or >= 2, got {distractor_nodes}")

    def sample(rng: np.random.Generator) -> PathProblem:
        distractor = (random_tree(rng, min_nodes=distractor_nodes, max_nodes=distractor_nodes)
                      if distractor_nodes else None)
        return make_problem(rng, shapes[kind](rng), num_labels=num_labels,
                            distractor=distractor, noise_edges=noise_edges)
    return sample


# --------------------------------------------------------------------- splits
def _forest(edges: np.ndarray) -> tuple[dict, list]:
    """children map and component roots; raises if some label has two parents."""
    children: dict = {}
    parent_of: dict = {}
    for p, c in np.asarray(edges, np.int64).reshape(-1, 2).tolist():
        if c in parent_of:
            raise ValueError(f"label {c} has two parents ({parent_of[c]} and {p}); not a forest")
        parent_of[c] = p
        children.setdefault(p, []).append(c)
    roots = [v for v in children if v not in parent_of]
    return children, roots


def _ahu(children: dict, root: int, goal: int, codes: dict) -> str:
    """AHU code: ``(`` + ``*`` if goal + sorted child codes + ``)``; iterative.
    Fills ``codes`` for every node of the component."""
    stack = [(root, False)]
    while stack:
        v, done = stack.pop()
        if done:
            codes[v] = "(" + ("*" if v == goal else "") + "".join(
                sorted(codes[c] for c in children.get(v, ()))) + ")"
        else:
            stack.append((v, True))
            stack.extend((c, False) for c in children.get(v, ()))
    return codes[root]


def canonical_form(problem: PathProblem) -> str:
    """Key equal for two problems iff they are the same up to relabelling and edge order.

    ``AHU(root's tree, goal marked) + '+' + sorted AHU codes of the other
    components joined by ','``. A label with two parents or a cycle raises.
    """
    children, roots = _forest(problem.edges)
    if problem.root not in roots:
        raise ValueError(f"root {problem.root} is not the root of a tree in the edge list")
    codes: dict = {}
    main = _ahu(children, problem.root, problem.goal, codes)
    others = sorted(_ahu(children, r, problem.goal, codes) for r in roots if r != problem.root)
    if len(codes) != len(np.unique(problem.edges)):   # nodes on a cycle have no root
        raise ValueError("edge list contains a cycle")
    return main + "+" + ",".join(others)


def labelled_form(problem: PathProblem) -> str:
    """Key of the exact labelled problem, invariant to edge order only."""
    edges = sorted(map(tuple, np.asarray(problem.edges).tolist()))
    return f"{problem.root}>{problem.goal}:{edges}"


def sample_problems(rng: np.random.Generator, count: int, *,
                    sampler: Callable[[np.random.Generator], PathProblem],
                    exclude: frozenset | set = frozenset(),
                    key: Callable[[PathProblem], str] = canonical_form,
                    unique: bool = False, max_attempts: int = 100_000
                    ) -> tuple[list[PathProblem], frozenset]:
    """Draw ``count`` problems whose ``key`` is not in ``exclude`` (and distinct
    from each other if ``unique``); returns (problems, their keys).

    Typical split: ``test, test_keys = sample_problems(r1, 1024, sampler=s, unique=True)``
    then ``train, _ = sample_problems(r2, n, sampler=s, exclude=test_keys)``.
    """
    problems, keys = [], set()
    for _ in range(max_attempts):
        if len(problems) == count:
            break
        problem = sampler(rng)
        k = key(problem)
        if k in exclude or (unique and k in keys):
            continue
        problems.append(problem)
        keys.add(k)
    if len(problems) < count:
        raise ValueError(f"sample_problems: only {len(problems)} of {count} problems after "
                         f"{max_attempts} draws; the exclusion set covers (almost) all shapes")
    return problems, frozenset(keys)


# ---------------------------------------------------------- compression hooks
def backward_chain(problem: PathProblem) -> np.ndarray:
    """Labels goal -> root."""
    return problem.path[::-1].copy()


def sorted_path(problem: PathProblem) -> np.ndarray:
    """Labels of the root-goal path in ascending order: the answer of the lab's
    two-stage "filter then sort" task (filter the tree to the path, then sort)."""
    return np.sort(problem.path)


def keep_every_k(chain: np.ndarray, *, k: int) -> np.ndarray:
    """Nodes at indices 0, k, 2k, ... plus the last node (always kept)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    chain = np.asarray(chain)
    idx = np.unique(np.concatenate([np.arange(0, len(chain), k), [len(chain) - 1]]))
    return chain[idx] if len(chain) else chain


def keep_ratio(chain: np.ndarray, *, ratio: float) -> np.ndarray:
    """Keep m = clip(floor(ratio*L + 1/2), min(2, L), L) of L nodes, evenly spaced:
    index_j = round(j (L-1)/(m-1)) (half up), j = 0..m-1, so first and last stay."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    chain = np.asarray(chain)
    n = len(chain)
    m = min(n, max(min(2, n), int(np.floor(ratio * n + 0.5))))
    if m <= 1:
        return chain[:m]
    j = np.arange(m)
    return chain[(2 * j * (n - 1) + (m - 1)) // (2 * (m - 1))]
