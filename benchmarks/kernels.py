"""The primitives under the train step and the decode loop, XLA:CPU vs PyTorch, side by side.

    .venv/bin/python -m benchmarks.kernels --rounds=3 --repeats=20
    .venv/bin/python -m benchmarks.kernels --no-reference --in-process --repeats=2   # smoke

Where benchmarks.train_step and benchmarks.generation compare whole steps,
this compares the pieces, to say which ones make up a gap. Each case is one
operation on float32 inputs from a fixed seed, the same arrays on both sides:
ours is the ``jax.jit`` of the jnp expression, torch's the eager call of the
same expression (``torch.no_grad``). Shapes are those of the ``small``
train-step case (4 x 256 token rows, hidden 512, MLP 1536) and of the ``tiny``
greedy decode at batch 64 (2 kv heads x 2 query heads of 16, 159 cache slots):

    matmul x@w         [1024, 512] @ [512, 1536]        forward projection
    matmul dy@w^T      [1024, 1536] @ [512, 1536]^T     input gradient
    matmul x^T@dy      [1024, 512]^T @ [1024, 1536]     weight gradient
    exp                [1024, 6144]
    silu(x)*y          [1024, 6144]                     SwiGLU's elementwise part
    softmax            [8192, 256] over the last axis   training attention rows
    decode attention   scores, mask, softmax, values of one decode step
    decode PV out DG / GD
                       its probabilities x values product alone, in the output
                       order of models/qwen3.py (head dim first) and the other

ratio = torch's best time / ours (above 1: ours is faster), per round, median
and range over rounds; each round runs each side in a fresh process, in
alternating order.

The report ends with each side's float32 GEMM rate (best ``matmul x@w``) and
the train-step ceiling it implies: tokens/s = rate / model FLOPs per token
(``benchmarks.gpu.flops_per_token``, 6 N + attention) for the SFT shapes of
``benchmarks.train_step``, the throughput of a step whose every FLOP ran at
that GEMM rate and that did nothing else.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks import harness as h

MODULE = "benchmarks.kernels"
CASES = ("matmul x@w", "matmul dy@w^T", "matmul x^T@dy", "exp", "silu(x)*y", "softmax",
         "decode attention", "decode PV out DG", "decode PV out GD")
_ROWS, _EMBED, _MLP = 1024, 512, 1536
_B, _K, _G, _D, _S = 64, 2, 2, 16, 159


def inputs(case: str) -> list[np.ndarray]:
    """The float32 (and bool) inputs of ``case``, from a seed fixed per case."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; valid: {CASES}")
    rng = np.random.default_rng(CASES.index(case))

    def f(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    if case == "matmul x@w":
        return [f(_ROWS, _EMBED), f(_EMBED, _MLP)]
    if case == "matmul dy@w^T":
        return [f(_ROWS, _MLP), f(_EMBED, _MLP)]
    if case == "matmul x^T@dy":
        return [f(_ROWS, _EMBED), f(_ROWS, _MLP)]
    if case in ("exp", "silu(x)*y"):
        return [f(_ROWS, 4 * _MLP)] * (1 if case == "exp" else 2)
    if case == "softmax":
        return [f(8192, 256)]
    if case.startswith("decode PV"):   # probabilities [B, K, G, S], values [B, K, D, S]
        return [rng.random((_B, _K, _G, _S), dtype=np.float32), f(_B, _K, _D, _S)]
    # decode attention: q [B, K, G, D], k and v [B, K, D, S] (the cache layout), mask [B, S]
    return [f(_B, _K, _G, _D), f(_B, _K, _D, _S), f(_B, _K, _D, _S),
            rng.random((_B, _S)) < 0.9]


def expression(xp: Any, case: str):
    """``case`` as a function of its inputs over the array module ``xp`` (jnp or torch)."""
    keep = {"keepdim": True} if xp.__name__ == "torch" else {"keepdims": True}

    def softmax(z):
        e = xp.exp(z - xp.amax(z, -1, **keep))
        return e / xp.sum(e, -1, **keep)

    def attention(q, k, v, mask):
        s = xp.einsum("bkgd,bkds->bkgs", q, k) * _D ** -0.5
        s = xp.where(mask[:, None, None, :], s, xp.full_like(s, -1e30))
        return xp.einsum("bkgs,bkds->bkgd", softmax(s), v)

    def silu_mul(x, y):
        return x / (1 + xp.exp(-x)) * y

    return {"matmul x@w": lambda x, w: x @ w, "matmul dy@w^T": lambda dy, w: dy @ w.T,
            "matmul x^T@dy": lambda x, dy: x.T @ dy, "exp": xp.exp, "silu(x)*y": silu_mul,
            "softmax": softmax, "decode attention": attention,
            "decode PV out DG": lambda p, v: xp.einsum("bkds,bkgs->bkdg", v, p),
            "decode PV out GD": lambda p, v: xp.einsum("bkgs,bkds->bkgd", p, v)}[case]


def jax_worker(spec: dict) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    out = {}
    for case in spec["cases"]:
        args = [jnp.asarray(a) for a in inputs(case)]
        fn = jax.jit(expression(jnp, case))
        out[case] = h.timed(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)),
                            repeats=spec["repeats"], warmup=spec["warmup"] + 1)
    return {"times": out}


def torch_worker(spec: dict) -> dict:
    import torch  # noqa: PLC0415

    out = {}
    with torch.no_grad():
        for case in spec["cases"]:
            args = [torch.from_numpy(a) for a in inputs(case)]
            fn = expression(torch, case)
            out[case] = h.timed(lambda fn=fn, args=args: fn(*args), repeats=spec["repeats"],
                                warmup=spec["warmup"] + 1)
    return {"times": out, "threads": torch.get_num_threads()}


HANDLERS = {"jax": jax_worker, "torch": torch_worker}


def summarize(rounds: list[dict], cases) -> list[dict]:
    """Per case: best time per side (microseconds) and the per-round ratios torch / ours."""
    rows = []
    for case in cases:
        row = {"case": case}
        for side in rounds[0]:
            row[f"{side}_us"] = min(h.best(r[side]["times"][case]) for r in rounds) * 1e6
        if "torch" in rounds[0]:
            row["ratio"] = h.ratio_summary([h.best(r["torch"]["times"][case])
                                            / h.best(r["jax"]["times"][case]) for r in rounds])
        rows.append(row)
    return rows


def ceilings(rows: list[dict], sizes=("tiny", "small")) -> list[dict]:
    """Per side: GEMM GFLOP/s of ``matmul x@w`` and the SFT tokens/s ceiling per size."""
    from benchmarks import gpu, jax_side  # noqa: PLC0415
    from benchmarks.train_step import SHAPES  # noqa: PLC0415

    (gemm,) = [r for r in rows if r["case"] == "matmul x@w"] or [None]
    if gemm is None:
        return []
    flops = 2.0 * _ROWS * _EMBED * _MLP
    out = []
    for side in ("jax", "torch"):
        if f"{side}_us" not in gemm:
            continue
        rate = flops / (gemm[f"{side}_us"] * 1e-6)
        per_token = {size: gpu.flops_per_token(jax_side.model_config(size),
                                               SHAPES[size]["sft"]["length"]) for size in sizes}
        out.append({"side": side, "gflops": rate / 1e9,
                    "sft_ceiling_tokens_per_s": {k: rate / v for k, v in per_token.items()}})
    return out


def report(rows: list[dict]) -> str:
    out = []
    for r in rows:
        ratio = (f"{r['ratio']['median']:.2f} ({r['ratio']['min']:.2f}-{r['ratio']['max']:.2f})"
                 if "ratio" in r else "-")
        out.append([r["case"], h.fmt(r["jax_us"]), h.fmt(r.get("torch_us")), ratio])
    table = h.markdown_table(["case", "ours us", "torch us", "torch / ours (median, range)"],
                             out)
    lines = [f"{c['side']}: float32 GEMM {c['gflops']:.0f} GFLOP/s; SFT train-step ceiling "
             + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in c["sft_ceiling_tokens_per_s"].items())
             for c in ceilings(rows)]
    return "\n".join([table, ""] + lines) if lines else table


def main(argv=None) -> list[dict]:
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(repeats=20, sizes="tiny")   # --sizes is unused: the shapes are fixed
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated cases (default: all)")
    args, _ = h.parse_common(parser, argv)
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        parser.error(f"--cases: unknown {bad}; valid: {list(CASES)}")
    spec = {"cases": cases, "repeats": args.repeats, "warmup": args.warmup}
    specs = {"jax": spec} if args.no_reference else {"jax": spec, "torch": spec}
    h.log(f"kernels: {len(cases)} case(s), {args.rounds} round(s)")
    rounds = h.alternate(MODULE, specs, rounds=args.rounds, timeout=args.timeout,
                         in_process={"jax": jax_worker} if args.in_process else None, log=h.log)
    rows = summarize(rounds, cases)
    print(report(rows))
    h.save_json(args.out, {"benchmark": "kernels", "rows": rows, "ceilings": ceilings(rows)})
    return rows


if __name__ == "__main__":
    h.entry(HANDLERS, main)
