"""Attention roles and the head-specialisation index of the tree lab (numpy only).

Output step s of example b is the query position q = target_start - 1 + s
(it predicts target token s); its *current node* is ``tokens[q]`` (the last
written token). Every key position w <= q gets exactly one role:

    parent_edge  the edge whose child is the current node (its parent is the
                 backward step's answer)
    child_edges  edges whose parent is the current node
    chain_match  an earlier chain-of-thought position (before STAGE) holding
                 the current node; in the paired layout its aux is the node
                 after it on the root->goal path (the reversal step's answer)
    self         w = q
    stage        the STAGE marker
    query        the QUERY / root / goal / task-token slots
    bos          the BOS token (a common "no-op" sink)
    other        everything else (unrelated edges and output tokens)

Steps are of four kinds, by target index s (``stage`` = index of STAGE in the
target; n = target length; a task without STAGE has stage = n - 1 here):
``start`` s = 0 (the current token is the task token); ``chain`` 0 < s < stage
(predicting a chain node from the node before it); ``switch`` s in {stage,
stage + 1} (predicting STAGE at the root, then the root after it; for a task
without STAGE, the final EOS); ``answer`` s >= stage + 2 (writing the answer
from the chain). Functional keys thus exist at every step of their kind:
parent_edge at chain steps, chain_match at answer steps.

Role mass: ``M[h, k, r]`` = mean over examples and steps of kind k of
``sum_{w in role r} A[b, h, q, w]`` (a distribution over roles, rows sum to 1).

Specialisation index of heads i, j (0 = same role profile, 1 = disjoint):

    SI(i, j) = mean over step kinds k present of  1/2 sum_r |M[i,k,r] - M[j,k,r]|

and of a layer with H heads, the mean of SI over its H(H-1)/2 pairs (0 for H=1).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ROLES", "STEP_KINDS", "role_masks", "role_masses", "specialisation_index",
           "head_roles"]

ROLES = ("parent_edge", "child_edges", "chain_match", "self", "stage", "query", "bos", "other")
STEP_KINDS = ("start", "chain", "switch", "answer")
_OTHER = ROLES.index("other")


def _edge_table(tokens: np.ndarray, aux: np.ndarray, start: int, *, layout: str,
                width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per key position: edge index (-1 outside the edge list); per edge: parent, child ids."""
    t = len(tokens)
    span = start - 4 - 1                     # positions between BOS and QUERY
    edge_of = np.full(t, -1)
    if layout == "paired":
        edge_of[1:1 + span] = np.arange(span)
        return edge_of, aux[1:1 + span], tokens[1:1 + span]
    n = span // width
    edge_of[1:1 + n * width] = np.repeat(np.arange(n), width)
    firsts = 1 + width * np.arange(n)
    return edge_of, tokens[firsts], tokens[firsts + 1]


def role_masks(batch: dict[str, np.ndarray], *, stage_id: int, layout: str,
               width: int = 1) -> np.ndarray:
    """int8 [B, T, T]: role index (``ROLES``) of key w for query q, -1 where q is
    not an output step or w > q (causal). ``width``: tokens per edge in the
    ``tokens`` layout (2, or 3 with separators); 1 for ``paired``."""
    tokens, aux = np.asarray(batch["tokens"]), np.asarray(batch["aux"])
    b, t = tokens.shape
    out = np.full((b, t, t), -1, np.int8)
    cols = np.arange(t)
    for i in range(b):
        start, n, stage = (int(batch[k][i]) for k in ("target_start", "target_len", "stage"))
        edge_of, parent, child = _edge_table(tokens[i], aux[i], start, layout=layout, width=width)
        queries = np.arange(start - 1, start - 1 + n)
        cur = tokens[i, queries][:, None]                                    # [S, 1]
        e = np.where(edge_of >= 0, edge_of, 0)[None, :]
        in_edges = (edge_of >= 0)[None, :]
        chain = (cols >= start) & (cols < start + stage)
        role = np.full((len(queries), t), _OTHER, np.int8)
        role[:, start - 4:start] = ROLES.index("query")
        role[:, 0] = ROLES.index("bos")
        role[(tokens[i] == stage_id)[None, :].repeat(len(queries), 0)] = ROLES.index("stage")
        role[in_edges & (child[e] == cur)] = ROLES.index("parent_edge")
        role[in_edges & (parent[e] == cur)] = ROLES.index("child_edges")
        role[chain[None, :] & (tokens[i][None, :] == cur)] = ROLES.index("chain_match")
        role[np.arange(len(queries)), queries] = ROLES.index("self")
        role[cols[None, :] > queries[:, None]] = -1
        out[i, queries] = role
    return out


def step_kinds(batch: dict[str, np.ndarray]) -> np.ndarray:
    """int8 [B, T]: index into ``STEP_KINDS`` of each output step, -1 elsewhere."""
    b, t = np.asarray(batch["tokens"]).shape
    out = np.full((b, t), -1, np.int8)
    for i in range(b):
        start, n, stage = (int(batch[k][i]) for k in ("target_start", "target_len", "stage"))
        stage = min(stage, n - 1)
        s = np.arange(n)
        kind = np.where(s < stage, 1, np.where(s <= stage + 1, 2, 3))
        out[i, start - 1 + s] = np.where(s == 0, 0, kind)
    return out


def role_masses(probs: np.ndarray, roles: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """``M`` float64 [H, len(STEP_KINDS), len(ROLES)] from attention probs [B, H, T, T],
    ``role_masks`` [B, T, T] and ``step_kinds`` [B, T]; NaN rows for absent kinds."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 4 or probs.shape[0] != roles.shape[0] or probs.shape[2:] != roles.shape[1:]:
        raise ValueError(f"probs {probs.shape} must be [B, H, T, T] matching roles {roles.shape}")
    h = probs.shape[1]
    out = np.full((h, len(STEP_KINDS), len(ROLES)), np.nan)
    for k in range(len(STEP_KINDS)):
        rows = kinds == k                                                    # [B, T]
        if not rows.any():
            continue
        p = probs.transpose(0, 2, 1, 3)[rows]                                # [N, H, T]
        r = roles[rows]                                                      # [N, T]
        for j in range(len(ROLES)):
            out[:, k, j] = (p * (r == j)[:, None, :]).sum(-1).mean(0)
    return out


def specialisation_index(masses: np.ndarray) -> float:
    """Mean pairwise ``SI`` of the heads of one layer (``masses`` [H, K, R]); 0 for one head."""
    masses = np.asarray(masses, np.float64)
    h = masses.shape[0]
    if h < 2:
        return 0.0
    present = ~np.isnan(masses[0, :, 0])
    pairs = [0.5 * np.abs(masses[i, present] - masses[j, present]).sum(-1).mean()
             for i in range(h) for j in range(i + 1, h)]
    return float(np.mean(pairs))


def head_roles(masses: np.ndarray) -> dict[str, Any]:
    """Which head does what: for the functional (kind, role) cells, the head with the
    most mass and that mass. ``lookup``: chain steps on parent_edge;
    ``reversal``: answer steps on chain_match; ``switch``: switch steps on the
    query slots (root/goal: "is this node the root?"); ``stage``: answer steps
    on the STAGE marker."""
    cells = {"lookup": ("chain", "parent_edge"), "reversal": ("answer", "chain_match"),
             "switch": ("switch", "query"), "stage": ("answer", "stage")}
    out = {}
    for name, (kind, role) in cells.items():
        col = np.asarray(masses)[:, STEP_KINDS.index(kind), ROLES.index(role)]
        if np.isnan(col).all():
            continue
        out[name] = {"head": int(np.nanargmax(col)), "mass": float(np.nanmax(col)),
                     "per_head": [round(float(v), 4) for v in col]}
    return out
