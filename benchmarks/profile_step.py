"""Profile one train step or one greedy decode: where its time goes (jax.profiler / torch).

    nice -n 5 .venv/bin/python -m benchmarks.profile_step --side=jax --size=small --kind=sft \\
        --steps=3 --trace-dir=/tmp/trace --out=/tmp/profile_jax.json
    nice -n 5 .venv/bin/python -m benchmarks.profile_step --side=torch --size=small --kind=sft \\
        --steps=3 --out=/tmp/profile_torch.json
    nice -n 5 .venv/bin/python -m benchmarks.profile_step --side=jax --size=tiny --kind=decode \\
        --batch=64 --steps=3

jax: compiles ``benchmarks.train_step``'s step for the benchmark batch, runs
two untimed steps, traces ``--steps`` steps with ``jax.profiler`` and joins the
trace to the compiled HLO (``benchmarks.hlo_profile.breakdown``): time per
step by model region (MLP, q/k/v projections, attention products, softmax
and mask, RMSNorm, RoPE, LM head, cross-entropy, AdamW update, layout copies),
by kind (matmul, copy/transpose, elementwise/reduce) and by direction
(forward, backward, update), in thread-milliseconds. The compiled HLO is
written beside the trace (``<trace-dir>/step.hlo.txt``).

torch: the same step as ``benchmarks.train_step``'s torch worker under
``torch.profiler`` (CPU activities), grouped by ATen operator (self CPU time,
which also sums over threads: torch's intra-op threads are inside the
operator's time).

decode (jax only): ``models.sampling.generate`` of ``benchmarks.generation``'s
greedy case for the size (its prompt length P and N new tokens) at
``--batch`` rows, traced ``--steps`` times; times are per decode step, i.e.
per generate call / (N - 1) (the prefill's few ops are included, spread
over the steps), and ``wall_ms_per_step`` likewise.

Run one side per process (JAX and torch slow each other down in one process).
Each prints a markdown table and writes the full breakdown as JSON.
"""
from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

from benchmarks import harness as h
from benchmarks import hlo_profile
from benchmarks.train_step import SHAPES, make_batch, tokens_per_step, worker_spec


def _traced_calls(call, *, steps: int, trace_dir: str) -> float:
    """One untimed ``call()`` (warm-up), then ``steps`` calls under ``jax.profiler``
    writing to ``trace_dir``; their mean wall seconds."""
    import jax  # noqa: PLC0415

    h.timed(call, repeats=1, warmup=1)
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(steps):
        call()
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    return wall


def profile_jax(spec: dict, *, steps: int, trace_dir: str) -> dict:
    """Trace ``steps`` compiled steps; the hlo_profile breakdown plus wall time per step."""
    import jax  # noqa: PLC0415

    import chrpo  # noqa: PLC0415
    from benchmarks import jax_side  # noqa: PLC0415
    from experiments.extra_cot.rl import make_rl_loss  # noqa: PLC0415
    from experiments.extra_cot.sft import lm_loss  # noqa: PLC0415

    model = jax_side.load_model(spec["weights"])
    batch = jax.device_put(make_batch(spec))
    loss_fn = lm_loss if spec["kind"] == "sft" else make_rl_loss(chrpo.get_preset("chrpo"))
    built = jax_side.compile_train_step(model, loss_fn, batch)
    holder = {"state": built["state"]}

    def call():
        holder["state"], metrics = built["step"](holder["state"], batch)
        jax.block_until_ready(metrics)

    wall = _traced_calls(call, steps=steps, trace_dir=trace_dir)
    out = _trace_breakdown(trace_dir, built["step"].as_text(), steps=steps)
    out["wall_ms_per_step"] = wall * 1e3
    return out


def _trace_breakdown(trace_dir: str, hlo: str, *, steps: int) -> dict:
    """hlo_profile.breakdown of the newest trace under ``trace_dir`` (HLO saved beside it)."""
    import models.qwen3  # noqa: PLC0415

    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                    key=os.path.getmtime)
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
    with open(models.qwen3.__file__) as f:
        source = f.read()
    with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:
        f.write(hlo)
    return hlo_profile.breakdown(hlo, hlo_profile.load_trace(traces[-1]),
                                 qwen3_source=source, steps=steps)


def profile_decode(size: str, weights: str, *, batch: int, steps: int, trace_dir: str) -> dict:
    """Trace ``steps`` greedy generate calls at ``batch`` rows; times per decode step."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from benchmarks import jax_side  # noqa: PLC0415
    from benchmarks.generation import CASES, prompts  # noqa: PLC0415
    from models import sampling  # noqa: PLC0415

    prompt, new = CASES[size]["prompt"], CASES[size]["new_tokens"]
    graphdef, state = nnx.split(jax_side.load_model(weights))
    ids = prompts(size, batch, prompt)
    mask = np.ones_like(ids, bool)
    kw = dict(max_new_tokens=new, temperature=0.0, stop_ids=(), pad_id=0,
              key=jax.random.key(1))

    def call():
        jax.block_until_ready(sampling.generate(graphdef, state, ids, mask, **kw))

    wall = _traced_calls(call, steps=steps, trace_dir=trace_dir)
    hlo = sampling._generate.lower(
        graphdef, state, jax.numpy.asarray(ids), jax.numpy.asarray(mask), kw["key"],
        max_new_tokens=new, n_samples=1, temperature=0.0, top_k=0, top_p=1.0, stop_ids=(),
        pad_id=0).compile().as_text()
    decode_steps = max(new - 1, 1)
    out = _trace_breakdown(trace_dir, hlo, steps=steps * decode_steps)
    out.update(wall_ms_per_step=wall * 1e3 / decode_steps, batch=batch, prompt=prompt,
               new_tokens=new)
    return out


def profile_torch(spec: dict, *, steps: int) -> dict:
    """torch.profiler over ``steps`` eager steps: self CPU ms per ATen operator per step."""
    import torch  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    from benchmarks import torch_side  # noqa: PLC0415

    model = torch_side.load_model(spec["weights"], train=True)
    optimizer = torch_side.adamw(model)
    batch = {k: torch.from_numpy(v) for k, v in make_batch(spec).items()}
    if spec["kind"] != "sft":
        raise ValueError("profile_torch: only --kind=sft is implemented on the torch side")

    def call():
        ids = batch["tokens"].long()
        loss = model(input_ids=ids, attention_mask=batch["mask"].long(), labels=ids).loss
        torch_side.apply_update(model, optimizer, loss)

    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            call()
        wall = (time.perf_counter() - start) / steps
    ops = [{"name": e.key, "ms": e.self_cpu_time_total / 1e3 / steps, "count": e.count / steps}
           for e in prof.key_averages() if e.self_cpu_time_total > 0]
    ops.sort(key=lambda o: -o["ms"])
    return {"total_ms": sum(o["ms"] for o in ops), "ops": ops, "wall_ms_per_step": wall * 1e3,
            "threads": torch.get_num_threads()}


def table(result: dict, *, group: str | None, top: int) -> str:
    """Markdown table of a breakdown group (or of the top ``top`` ops)."""
    total = result["total_ms"]
    if group:
        rows = [[k, h.fmt(v), f"{100 * v / total:.1f}%"] for k, v in result[group].items()]
        return h.markdown_table([group.replace("by_", ""), "ms/step", "share"], rows)
    rows = [[o["name"], o.get("region", ""), o.get("dir", ""), o.get("kind", ""),
             h.fmt(o["ms"]), f"{100 * o['ms'] / total:.1f}%"] for o in result["ops"][:top]]
    return h.markdown_table(["op", "region", "dir", "kind", "ms/step", "share"], rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("jax", "torch"), required=True)
    parser.add_argument("--size", default="small", choices=sorted(SHAPES))
    parser.add_argument("--kind", default="sft", choices=("sft", "chrpo", "decode"))
    parser.add_argument("--batch", type=int, default=64, help="rows of --kind=decode")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be >= 1")
    if args.batch < 1:
        parser.error(f"--batch={args.batch} must be >= 1")
    if args.kind == "decode" and args.side != "jax":
        parser.error("--kind=decode is profiled on --side=jax only")
    from benchmarks.jax_side import write_weights  # noqa: PLC0415
    load = h.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_weights(args.size, os.path.join(tmp, "w"))
        trace_dir = args.trace_dir or os.path.join(tmp, "trace")
        if args.kind == "decode":
            result = profile_decode(args.size, weights, batch=args.batch, steps=args.steps,
                                    trace_dir=trace_dir)
            tokens = args.batch
        else:
            spec = worker_spec(args.size, args.kind, weights)
            tokens = tokens_per_step(spec)
            result = (profile_jax(spec, steps=args.steps, trace_dir=trace_dir)
                      if args.side == "jax" else profile_torch(spec, steps=args.steps))
    result.update(side=args.side, size=args.size, kind=args.kind, steps=args.steps,
                  tokens=tokens, load_before=load, load_after=h.load_average())
    print(f"{args.side} {args.size} {args.kind}: wall {result['wall_ms_per_step']:.3g} ms/step "
          f"under the profiler, traced op time {result['total_ms']:.3g} ms/step, load "
          f"{load[0]} -> {result['load_after'][0]}")
    groups = ("by_region", "by_kind", "by_dir") if args.side == "jax" else ()
    for group in groups:
        print(table(result, group=group, top=args.top) + "\n")
    print(table(result, group=None, top=args.top))
    h.save_json(args.out, {"benchmark": "profile_step", **result})
    return result


if __name__ == "__main__":
    main()
