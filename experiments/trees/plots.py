"""Plots of the tree lab (matplotlib, Agg backend, PNG). Inputs are the files a
run writes (``results.json``, ``attention.npz``), so every figure can be redrawn
without training."""
from __future__ import annotations

import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.trees.problems import TreeVocab  # noqa: E402
from experiments.trees.roles import ROLES, STEP_KINDS  # noqa: E402

__all__ = ["token_name", "plot_attention", "plot_role_masses", "plot_training",
           "plot_accuracy_curves", "plot_compression"]

_SPECIAL = ["pad", "bos", "eos", ",", "Q", "|", "bwd", "fwd_cot", "fwd"]
_FUNCTIONAL = {"start": None, "chain": "parent_edge", "switch": None, "answer": "chain_match"}
_ROLE_COLORS = ["#1f77b4", "#aec7e8", "#d62728", "#9467bd", "#2ca02c", "#ff7f0e", "#8c564b",
                "#c7c7c7"]


def token_name(i: int, vocab: TreeVocab) -> str:
    """Readable name of a lab token id (labels as numbers, specials by role)."""
    i = int(i)
    if i < vocab.NUM_SPECIAL:
        return _SPECIAL[i]
    if i < vocab.size:
        return str(i - vocab.NUM_SPECIAL)
    return ("sort_cot", "sort")[i - vocab.size]


def _key_labels(tokens, aux, n: int, vocab: TreeVocab, paired: bool) -> list[str]:
    names = []
    for t in range(n):
        name = token_name(tokens[t], vocab)
        if paired and aux[t] and tokens[t] >= vocab.NUM_SPECIAL and aux[t] >= vocab.NUM_SPECIAL:
            name = f"{name}<{token_name(aux[t], vocab)}"   # child<parent, or node<previous
        names.append(name)
    return names


def plot_attention(att: dict[str, np.ndarray], vocab: TreeVocab, path: str, *, example: int = 0,
                   title: str = "") -> None:
    """Heatmaps of every head's attention (columns: heads; rows: layers) at every
    output step of one example. Row label ``cur -> next``: the current token and
    the token predicted at that step. Boxes mark the functional key of the step:
    the parent edge of the current node (chain steps) and the chain position
    holding it (answer steps)."""
    probs, roles = att["probs"][:, example], att["roles"][example]       # [L, H, T, T], [T, T]
    tokens, aux = att["tokens"][example], att["aux"][example]
    start, n = int(att["target_start"][example]), int(att["target_len"][example])
    kinds = att["kinds"][example]
    paired = bool(np.any(att["aux"]))
    q = np.arange(start - 1, start - 1 + n)
    width = int(q[-1]) + 1
    layers, heads = probs.shape[:2]
    keys = _key_labels(tokens, aux, width, vocab, paired)
    rows = [f"{token_name(tokens[i], vocab)} -> {token_name(tokens[i + 1], vocab)}"
            if i + 1 < len(tokens) else token_name(tokens[i], vocab) for i in q]
    fig, axes = plt.subplots(layers, heads, figsize=(0.16 * width * heads + 1.5,
                                                     0.28 * n * layers + 1.4),
                             squeeze=False)
    for layer in range(layers):
        for h in range(heads):
            ax = axes[layer, h]
            ax.imshow(probs[layer, h][q][:, :width], aspect="auto", cmap="viridis", vmin=0,
                      vmax=1, interpolation="nearest")
            for s, qi in enumerate(q):
                role = _FUNCTIONAL[STEP_KINDS[kinds[qi]]]
                if role is None:
                    continue
                for w in np.flatnonzero(roles[qi, :width] == ROLES.index(role)):
                    ax.add_patch(patches.Rectangle((w - 0.5, s - 0.5), 1, 1, fill=False,
                                                   edgecolor="red", linewidth=1.2))
            ax.set_xticks(range(width))
            ax.set_xticklabels(keys, rotation=90, fontsize=6)
            ax.set_yticks(range(n))
            ax.set_yticklabels(rows, fontsize=7)
            ax.set_title(f"layer {layer} head {h}", fontsize=9)
    fig.suptitle(title + "  (red boxes: parent edge at chain steps, chain match at answer "
                 "steps)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_role_masses(masses: Sequence, path: str, *, title: str = "", layer: int = 0) -> None:
    """Stacked bars: for each head and step kind, its mean attention mass per role."""
    m = np.asarray(masses[layer], dtype=float)                           # [H, K, R]
    heads = m.shape[0]
    kinds = [k for k in range(len(STEP_KINDS)) if not np.isnan(m[0, k, 0])]
    fig, ax = plt.subplots(figsize=(1.1 * heads * len(kinds) + 2.5, 3.4))
    x, labels = 0, []
    for k in kinds:
        for h in range(heads):
            bottom = 0.0
            for r, role in enumerate(ROLES):
                ax.bar(x, m[h, k, r], bottom=bottom, color=_ROLE_COLORS[r],
                       label=role if (x == 0) else None)
                bottom += m[h, k, r]
            labels.append(f"h{h}\n{STEP_KINDS[k]}")
            x += 1
        x += 0.5
    ticks = [i + 0.5 * (i // heads) for i in range(len(labels))]
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("attention mass")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _series(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in history if r.get(key) is not None]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else \
        (np.array([]), np.array([]))


def plot_training(results: dict[str, Any], path: str, *, title: str = "") -> None:
    """Over training: exact match (train, test sets), the specialisation index and
    each head's functional role masses (lookup, reversal, switch) of layer 0."""
    hist = results["history"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for key in sorted({k for r in hist for k in r if k.endswith("/exact")}):
        a1.plot(*_series(hist, key), label=key.split("/")[0])
    a1.set_xlabel("step")
    a1.set_ylabel("exact match")
    a1.set_ylim(-0.02, 1.02)
    a1.legend(fontsize=8)
    a2.plot(*_series(hist, "probe/si_l0"), color="k", linewidth=2, label="SI (layer 0)")
    styles = {"lookup": "-", "reversal": "--", "switch": ":"}
    for h in range(results["heads"]):
        for role, ls in styles.items():
            s, v = _series(hist, f"probe/{role}_l0_h{h}")
            if len(s):
                a2.plot(s, v, ls, color=f"C{h}", label=f"h{h} {role}")
    a2.set_xlabel("step")
    a2.set_ylabel("mass / index")
    a2.set_ylim(-0.02, 1.02)
    a2.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy_curves(runs: dict[str, dict], path: str, *, key: str, title: str = "") -> None:
    """``key`` (e.g. 'train/exact') over steps for several runs."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, res in runs.items():
        ax.plot(*_series(res["history"], key), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_compression(points: dict[int, list[tuple[float, float]]], path: str, *,
                     title: str = "") -> None:
    """Accuracy against kept ratio, one line per model depth: points[layers] =
    [(kept ratio, exact match), ...]."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for layers, pts in sorted(points.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{layers} layer(s)")
    ax.set_xlabel("kept ratio of the backward chain (measured)")
    ax.set_ylabel("exact match (unseen trees)")
    ax.set_ylim(-0.02, 1.02)
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
