"""Profile one train step: where its time goes, ours (jax.profiler) or transformers' (torch).

    nice -n 5 .venv/bin/python -m benchmarks.profile_step --side=jax --size=small --kind=sft \\
        --steps=3 --trace-dir=/tmp/trace --out=/tmp/profile_jax.json
    nice -n 5 .venv/bin/python -m benchmarks.profile_step --side=torch --size=small --kind=sft \\
        --steps=3 --out=/tmp/profile_torch.json

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


def profile_jax(spec: dict, *, steps: int, trace_dir: str) -> dict:
    """Trace ``steps`` compiled steps; the hlo_profile breakdown plus wall time per step."""
    import jax  # noqa: PLC0415

    import chrpo  # noqa: PLC0415
    import models.qwen3  # noqa: PLC0415
    from benchmarks import jax_side  # noqa: PLC0415
    from experiments.rl import make_rl_loss  # noqa: PLC0415
    from experiments.sft import lm_loss  # noqa: PLC0415

    model = jax_side.load_model(spec["weights"])
    batch = jax.device_put(make_batch(spec))
    loss_fn = lm_loss if spec["kind"] == "sft" else make_rl_loss(chrpo.get_preset("chrpo"))
    built = jax_side.compile_train_step(model, loss_fn, batch)
    holder = {"state": built["state"]}

    def call():
        holder["state"], metrics = built["step"](holder["state"], batch)
        jax.block_until_ready(metrics)

    h.timed(call, repeats=1, warmup=1)
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(steps):
        call()
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                    key=os.path.getmtime)
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
    with open(models.qwen3.__file__) as f:
        source = f.read()
    hlo = built["step"].as_text()
    with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:
        f.write(hlo)
    out = hlo_profile.breakdown(hlo, hlo_profile.load_trace(traces[-1]),
                                qwen3_source=source, steps=steps)
    out["wall_ms_per_step"] = wall * 1e3
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
        rows = [[k, f"{v:.1f}", f"{100 * v / total:.1f}%"] for k, v in result[group].items()]
        return h.markdown_table([group.replace("by_", ""), "ms/step", "share"], rows)
    rows = [[o["name"], o.get("region", ""), o.get("dir", ""), o.get("kind", ""),
             f"{o['ms']:.1f}", f"{100 * o['ms'] / total:.1f}%"] for o in result["ops"][:top]]
    return h.markdown_table(["op", "region", "dir", "kind", "ms/step", "share"], rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("jax", "torch"), required=True)
    parser.add_argument("--size", default="small", choices=sorted(SHAPES))
    parser.add_argument("--kind", default="sft", choices=("sft", "chrpo"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be >= 1")
    from benchmarks.jax_side import write_weights  # noqa: PLC0415
    load = h.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        spec = worker_spec(args.size, args.kind,
                           write_weights(args.size, os.path.join(tmp, "w")))
        if args.side == "jax":
            result = profile_jax(spec, steps=args.steps,
                                 trace_dir=args.trace_dir or os.path.join(tmp, "trace"))
        else:
            result = profile_torch(spec, steps=args.steps)
    result.update(side=args.side, size=args.size, kind=args.kind, steps=args.steps,
                  tokens=tokens_per_step(spec), load_before=load, load_after=h.load_average())
    print(f"{args.side} {args.size} {args.kind}: wall {result['wall_ms_per_step']:.0f} ms/step "
          f"under the profiler, traced op time {result['total_ms']:.0f} ms/step, load "
          f"{load[0]} -> {result['load_after'][0]}")
    groups = ("by_region", "by_kind", "by_dir") if args.side == "jax" else ()
    for group in groups:
        print(table(result, group=group, top=args.top) + "\n")
    print(table(result, group=None, top=args.top))
    h.save_json(args.out, {"benchmark": "profile_step", **result})
    return result


if __name__ == "__main__":
    main()
