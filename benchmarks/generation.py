"""Sampling throughput: models.sampling.generate vs transformers' generate (KV cache).

    .venv/bin/python -m benchmarks.generation                       # tiny + small, 3 rounds
    .venv/bin/python -m benchmarks.generation --sizes=small --rounds=5 --out=/tmp/gen.json
    .venv/bin/python -m benchmarks.generation --sizes=micro --no-reference --in-process

Cases per size: greedy decoding at batch 1, 8 and 64, and sampling
(temperature 1, no top-k/top-p) of G samples for each of B prompts. Both
sides get the same weights, the same prompts ([B, P] random ids, no padding),
the same max_new_tokens N and no stop token, so both produce exactly B*G*N
tokens (checked). Each case is timed twice: with max_new_tokens=1 (the
prefill and one token) and with N; then

    prefill tok/s = B * P / t(1)
    decode  tok/s = B * G * (N - 1) / (t(N) - t(1))

from the best time of each. Ours: the public ``generate`` (host-side checks
included); its compile time and XLA memory analysis come from an AOT compile
of the same program. transformers: ``model.generate`` (DynamicCache, SDPA;
``num_return_sequences=G`` repeats the prompt, so it prefills B*G rows).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from benchmarks import harness as h

MODULE = "benchmarks.generation"
# Per size: prompt length P, new tokens N, and cases (name, batch B, samples G, greedy).
CASES = {
    "micro": dict(prompt=8, new_tokens=8,
                  cases=[("greedy b1", 1, 1, True), ("greedy b2", 2, 1, True),
                         ("sample 2x2", 2, 2, False)]),
    "tiny": dict(prompt=32, new_tokens=128,
                 cases=[("greedy b1", 1, 1, True), ("greedy b8", 8, 1, True),
                        ("greedy b64", 64, 1, True), ("sample 8x8", 8, 8, False)]),
    "small": dict(prompt=64, new_tokens=128,
                  cases=[("greedy b1", 1, 1, True), ("greedy b8", 8, 1, True),
                         ("greedy b64", 64, 1, True), ("sample 8x8", 8, 8, False)]),
}


def prompts(size: str, batch: int, length: int) -> np.ndarray:
    """The prompts of a case: int32 [B, P] ids in [3, V), from a fixed seed."""
    vocab = h.size_config(size)["vocab_size"]
    return np.random.default_rng(batch).integers(3, vocab, (batch, length)).astype(np.int32)


def jax_worker(spec: dict) -> dict:
    """Time models.sampling.generate for every case of ``spec``."""
    import time  # noqa: PLC0415

    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from benchmarks import jax_side  # noqa: PLC0415
    from models import sampling  # noqa: PLC0415

    graphdef, state = nnx.split(jax_side.load_model(spec["weights"]))
    results = []
    for name, batch, samples, greedy in spec["cases"]:
        ids = prompts(spec["size"], batch, spec["prompt"])
        mask = np.ones_like(ids, bool)
        kw = dict(n_samples=samples, temperature=0.0 if greedy else 1.0, stop_ids=(),
                  pad_id=0, key=jax.random.key(1))
        start = time.perf_counter()
        compiled = sampling._generate.lower(
            graphdef, state, jax.numpy.asarray(ids), jax.numpy.asarray(mask), kw["key"],
            max_new_tokens=spec["new_tokens"], n_samples=samples,
            temperature=kw["temperature"], top_k=0, top_p=1.0, stop_ids=(), pad_id=0).compile()
        compile_s = time.perf_counter() - start
        timings = {}
        for n in (1, spec["new_tokens"]):
            def call(n=n):
                out = sampling.generate(graphdef, state, ids, mask, max_new_tokens=n, **kw)
                jax.block_until_ready(out)
                timings["steps"] = int(out.steps)
            timings[n] = h.timed(call, repeats=spec["repeats"], warmup=spec["warmup"])
            if timings["steps"] != n:
                raise RuntimeError(f"{name}: generate stopped after {timings['steps']} of {n}")
        results.append({"name": name, "batch": batch, "samples": samples,
                        "prefill_times": timings[1], "full_times": timings[spec["new_tokens"]],
                        "compile_s": compile_s, "compiled_memory": h.compiled_memory(compiled)})
    return {"cases": results}


def torch_worker(spec: dict) -> dict:
    """Time transformers' generate for every case of ``spec``."""
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from benchmarks import torch_side  # noqa: PLC0415

    model = torch_side.load_model(spec["weights"], train=False)
    results = []
    for name, batch, samples, greedy in spec["cases"]:
        ids = torch.from_numpy(prompts(spec["size"], batch, spec["prompt"])).long()
        mask = torch.ones_like(ids)
        sampling = {} if greedy else dict(temperature=1.0, top_k=0, top_p=1.0)
        timings = {}
        for n in (1, spec["new_tokens"]):
            def call(n=n):
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                         do_sample=not greedy,
                                         num_return_sequences=samples, **sampling)
                timings["shape"] = tuple(out.shape)
            start = time.perf_counter()
            call()
            timings[f"first{n}"] = time.perf_counter() - start
            timings[n] = h.timed(call, repeats=spec["repeats"], warmup=max(spec["warmup"] - 1, 0))
            want = (batch * samples, spec["prompt"] + n)
            if timings["shape"] != want:
                raise RuntimeError(f"{name}: transformers returned {timings['shape']}, want {want}")
        results.append({"name": name, "batch": batch, "samples": samples,
                        "prefill_times": timings[1], "full_times": timings[spec["new_tokens"]],
                        "compile_s": timings[f"first{spec['new_tokens']}"],
                        "threads": torch.get_num_threads()})
    return {"cases": results}


HANDLERS = {"jax": jax_worker, "torch": torch_worker}


def rates(case: dict, *, prompt: int, new_tokens: int) -> dict[str, float | None]:
    """prefill, decode and end-to-end tokens/s of one worker's case (best times).

    decode is None when t(N) <= t(1) (noise larger than the decode time: only
    at the smoke size)."""
    rows = case["batch"] * case["samples"]
    t1, tn = h.best(case["prefill_times"]), h.best(case["full_times"])
    return {"prefill": case["batch"] * prompt / t1,
            "decode": rows * (new_tokens - 1) / (tn - t1) if tn > t1 else None,
            "end_to_end": rows * new_tokens / tn}


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def summarize(spec: dict, rounds: list[dict]) -> list[dict]:
    """One row per case: best rates per side, same-run decode/prefill ratios, memory."""
    rows = []
    for i, (name, batch, samples, _) in enumerate(spec["cases"]):
        row = {"size": spec["size"], "case": name, "batch": batch, "samples": samples,
               "prompt": spec["prompt"], "new_tokens": spec["new_tokens"]}
        per_round = {}
        for side in rounds[0]:
            runs = [r[side]["cases"][i] for r in rounds]
            rs = [rates(c, prompt=spec["prompt"], new_tokens=spec["new_tokens"]) for c in runs]
            per_round[side] = rs
            row[side] = {k: _max(r[k] for r in rs) for k in rs[0]}
            row[side].update(
                compile_s=h.median([c["compile_s"] for c in runs]),
                rss_peak_mib=max(r[side]["rss_peak_mib"] for r in rounds),
                compiled_memory=runs[0].get("compiled_memory"),
                load=[r[side]["load_before"][0] for r in rounds])
        row["rounds"] = [{side: dict(r[side]["cases"][i], load_before=r[side]["load_before"])
                          for side in r} for r in rounds]   # raw times, per round
        if "torch" in per_round:
            for k in ("prefill", "decode", "end_to_end"):
                pairs = [(j[k], t[k]) for j, t in zip(per_round["jax"], per_round["torch"])]
                ratios = [a / b for a, b in pairs if a is not None and b is not None]
                if ratios:
                    row[f"ratio_{k}"] = h.ratio_summary(ratios)
        rows.append(row)
    return rows


def report(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    out = []
    for r in rows:
        j, t = r["jax"], r.get("torch")
        ratio = lambda k: (f"{r[k]['median']:.2f} ({r[k]['min']:.2f}-{r[k]['max']:.2f})"  # noqa: E731
                           if k in r else "-")
        mem = h.mib((j["compiled_memory"] or {}).get("peak_estimate"))
        out.append([r["size"], r["case"], h.fmt(j["prefill"]), h.fmt(t["prefill"]) if t else "-",
                    ratio("ratio_prefill"), h.fmt(j["decode"]),
                    h.fmt(t["decode"]) if t else "-", ratio("ratio_decode"),
                    ratio("ratio_end_to_end"),
                    h.fmt(j["compile_s"]), h.fmt(j["rss_peak_mib"]),
                    h.fmt(t["rss_peak_mib"]) if t else "-", h.fmt(mem),
                    " ".join(f"{x:.1f}" for x in j["load"])])
    return h.markdown_table(
        ["size", "case", "ours prefill tok/s", "torch prefill tok/s", "prefill ratio",
         "ours decode tok/s", "torch decode tok/s", "decode ratio (median, range)",
         "end-to-end ratio",
         "ours compile s", "ours RSS MiB", "torch RSS MiB", "XLA est. MiB", "load (1 min)"], out)


def main(argv=None) -> list[dict]:
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(repeats=3)
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names to run (default: all of the size)")
    args, sizes = h.parse_common(parser, argv)
    from benchmarks.jax_side import write_weights  # noqa: PLC0415

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            cases = [c for c in CASES[size]["cases"]
                     if args.cases is None or c[0] in args.cases.split(",")]
            if not cases:
                parser.error(f"--cases={args.cases!r} selects nothing of size {size}; "
                             f"valid: {[c[0] for c in CASES[size]['cases']]}")
            spec = dict(size=size, weights=write_weights(size, os.path.join(tmp, size)),
                        prompt=CASES[size]["prompt"], new_tokens=CASES[size]["new_tokens"],
                        cases=cases, repeats=args.repeats, warmup=args.warmup)
            specs = {"jax": spec} if args.no_reference else {"jax": spec, "torch": spec}
            h.log(f"generation {size}: {args.rounds} round(s)")
            rounds = h.alternate(MODULE, specs, rounds=args.rounds, timeout=args.timeout,
                                 in_process={"jax": jax_worker} if args.in_process else None,
                                 log=h.log)
            rows.extend(summarize(spec, rounds))
    print(report(rows))
    h.save_json(args.out, {"benchmark": "generation", "rows": rows})
    return rows


if __name__ == "__main__":
    h.entry(HANDLERS, main)
