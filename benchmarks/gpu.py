"""GPU figures: train-step MFU at the Qwen3-0.6B / 1.7B shapes in bfloat16, and decode
throughput against the memory-bandwidth bound. Ready for a lent H100/H200; CPU only dry-runs.

    .venv/bin/python -m benchmarks.gpu --out=docs/gpu-results.json    # on the GPU machine
    .venv/bin/python -m benchmarks.gpu --dry-run --in-process          # CPU check, tiny shapes

Train step (``--models``, default qwen3-0.6b,qwen3-1.7b): parameters float32,
compute bfloat16 (``Qwen3Config(dtype='bfloat16', param_dtype='float32')``),
experiments.extra_cot.sft.lm_loss, AdamW (benchmarks.harness.OPTIMIZER), state donated.
A batch that does not fit is halved until it does (recorded). Model FLOPs per
token (PaLM, appendix B; attention not halved for causality, the usual MFU
convention):

    6 * N + 12 * L * H * D_h * T,   N = matmul parameters (blocks + LM head),

    MFU = tokens/s * FLOPs per token / peak dense bf16 FLOP/s of the device.

XLA's own FLOP count of the compiled step (``cost_analysis``) is reported
beside it. Peaks: H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, H100 NVL 835
(``--peak-tflops`` overrides).

Decode (parameters stored in bfloat16, as served): greedy ``generate`` without
a stop token at batch 1, 8, 64 (``--decode-batches``); per-step time
(t(N) - t(1)) / (N - 1). Bandwidth bound of a step: the bytes a step must
read, all weights once plus the KV cache of the real prefix (mean over the
steps of B * L * 2 * K * D_h * (P + t) * 2 bytes), over the bandwidth measured
here (a jitted ``x + 1`` over a 2 GiB array: bytes read + written / time).
Fraction of the bound = bound time / measured step time.
"""
from __future__ import annotations

import datetime
import os

from benchmarks import harness as h

MODULE = "benchmarks.gpu"
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12))
TRAIN_SHAPES = {"qwen3-0.6b": dict(batch=8, length=1024), "qwen3-1.7b": dict(batch=4, length=1024)}
# --dry-run: the 'tiny' preset cut to one narrow layer; the train step is lowered
# (traced, not compiled or timed), the decode part runs as on the GPU.
DRY = dict(model="tiny", overrides=dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_layers=1, num_heads=2, num_kv_heads=1),
           batch=2, length=16, prompt=8, new_tokens=8, bandwidth_mib=16)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device by its kind string (None if unknown)."""
    for name, peak in PEAK_BF16:
        if name.lower() in device_kind.lower():
            return peak
    return None


def flops_per_token(config, seq_len: int) -> float:
    """6 N + 12 L H D_h T (N: block matmul weights + LM head), see the module docstring."""
    e, f, hq, k, d = (config.hidden_size, config.intermediate_size, config.num_heads,
                      config.num_kv_heads, config.head_dim)
    per_layer = e * hq * d + 2 * e * k * d + hq * d * e + 3 * e * f
    n = config.num_layers * per_layer + config.vocab_size * e
    return 6.0 * n + 12.0 * config.num_layers * hq * d * seq_len


def _config(spec: dict, *, dtype: str, param_dtype: str):
    from models.qwen3 import preset  # noqa: PLC0415

    return preset(spec["model"], dtype=dtype, param_dtype=param_dtype,
                  **spec.get("overrides", {}))


def measure_bandwidth(mib: int, *, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s: a jitted x + 1 over ``mib`` MiB of float32."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    x = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    times = h.timed(lambda: f(x).block_until_ready(), repeats=repeats, warmup=2)
    return 2 * x.nbytes / h.best(times)


def _xla_flops(stage) -> float:
    """XLA's FLOP count of a lowered or compiled program (nan when unavailable)."""
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", float("nan")))


def _train_batch(config, batch_size: int, t: int):
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (batch_size, t))
    return jax.device_put({"tokens": tokens.astype(np.int32),
                           "mask": np.ones((batch_size, t), bool),
                           "loss_mask": np.ones((batch_size, t), bool)})


def train_worker(spec: dict) -> dict:
    """MFU of the bf16 train step of ``spec['model']``; halves the batch on OOM.

    ``spec['lower_only']`` (the --dry-run): trace and lower the step, report
    XLA's FLOP count of the lowered program, time nothing (the compiled path
    is the one benchmarks.train_step runs, smoke-tested there).
    """
    import jax  # noqa: PLC0415

    from benchmarks.jax_side import compile_train_step, lower_train_step, random_model  # noqa: PLC0415
    from experiments.extra_cot.sft import lm_loss  # noqa: PLC0415

    config = _config(spec, dtype="bfloat16", param_dtype="float32")
    device = jax.devices()[0]
    batch_size, t, tried = spec["batch"], spec["length"], []
    peak = spec.get("peak") or peak_flops(device.device_kind)
    out = {"device": device.device_kind, "model": spec["model"], "length": t,
           "peak_tflops": None if peak is None else peak / 1e12}
    if spec.get("lower_only"):
        built = lower_train_step(random_model(config), lm_loss, _train_batch(config, batch_size, t))
        return {**out, "batch": batch_size, "oom_batches": [], "times": [],
                "compile_s": built["lower_s"], "tokens_per_s": None, "model_tflops": None,
                "xla_tflops_per_step": _xla_flops(built["lowered"]) / 1e12, "mfu": None,
                "compiled_memory": None, "memory_stats": _memory_stats(device)}
    while batch_size >= 1:
        try:
            batch = _train_batch(config, batch_size, t)
            built = compile_train_step(random_model(config), lm_loss, batch)
            holder = {"state": built["state"]}

            def call():
                holder["state"], metrics = built["step"](holder["state"], batch)
                jax.block_until_ready(metrics)

            times = h.timed(call, repeats=spec["repeats"], warmup=spec["warmup"])
            break
        except Exception as err:  # noqa: BLE001 - XLA reports OOM as a runtime error
            if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
                raise
            tried.append(batch_size)
            batch_size //= 2
    else:
        raise RuntimeError(f"{spec['model']}: out of memory at every batch size {tried}")
    tokens_per_s = batch_size * t / h.best(times)
    model_flops = flops_per_token(config, t) * tokens_per_s
    return {**out, "batch": batch_size, "oom_batches": tried, "times": times,
            "compile_s": built["compile_s"], "tokens_per_s": tokens_per_s,
            "model_tflops": model_flops / 1e12,
            "xla_tflops_per_step": _xla_flops(built["step"]) / 1e12,
            "mfu": None if peak is None else model_flops / peak,
            "compiled_memory": built["compiled_memory"], "memory_stats": _memory_stats(device)}


def decode_worker(spec: dict) -> dict:
    """Greedy decode step time vs the bandwidth bound, per batch size."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from benchmarks.jax_side import random_model  # noqa: PLC0415
    from models.sampling import generate  # noqa: PLC0415

    config = _config(spec, dtype="bfloat16", param_dtype="bfloat16")
    device = jax.devices()[0]
    graphdef, state = nnx.split(random_model(config))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    bandwidth = measure_bandwidth(spec["bandwidth_mib"])
    p, n, cases = spec["prompt"], spec["new_tokens"], []
    for b in spec["batches"]:
        ids = np.random.default_rng(b).integers(3, config.vocab_size, (b, p)).astype(np.int32)
        mask = np.ones_like(ids, bool)
        best = {}
        for steps in (1, n):
            def call(steps=steps):
                jax.block_until_ready(generate(graphdef, state, ids, mask, max_new_tokens=steps,
                                               temperature=0.0))
            best[steps] = h.best(h.timed(call, repeats=spec["repeats"], warmup=1))
        # None when noise exceeds the decode time (only at dry-run sizes).
        step_s = (best[n] - best[1]) / (n - 1) if best[n] > best[1] else None
        kv_per_slot = b * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
        kv_bytes = kv_per_slot * (p + n / 2)          # mean real prefix over the steps
        bound_s = (weight_bytes + kv_bytes) / bandwidth
        cases.append({"batch": b, "step_s": step_s,
                      "tokens_per_s": None if step_s is None else b / step_s,
                      "weight_bytes": weight_bytes, "kv_bytes_mean": kv_bytes,
                      "bound_s": bound_s,
                      "fraction_of_bound": None if step_s is None else bound_s / step_s})
    return {"device": device.device_kind, "model": spec["model"], "prompt": p,
            "new_tokens": n, "bandwidth_gbs": bandwidth / 1e9, "cases": cases,
            "memory_stats": _memory_stats(device)}


def _memory_stats(device) -> dict | None:
    """Peak device memory in GiB where the backend reports it (GPU: yes, CPU: no)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    return {k: round(v / 2**30, 3) for k, v in stats.items()
            if k in ("peak_bytes_in_use", "bytes_limit", "bytes_in_use")}


HANDLERS = {"train": train_worker, "decode": decode_worker}


def report(train: list[dict], decode: list[dict]) -> str:
    """Markdown tables of both parts."""
    rows = [[r["device"], r["model"], f"{r['batch']}x{r['length']}", h.fmt(r["tokens_per_s"]),
             h.fmt(r["model_tflops"]), h.fmt(r["xla_tflops_per_step"]),
             "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", h.fmt(r["compile_s"]),
             h.fmt((r["memory_stats"] or {}).get("peak_bytes_in_use"))] for r in train]
    out = [h.markdown_table(["device", "model", "batch", "tokens/s", "model TFLOP/s",
                             "XLA TFLOP/step", "MFU", "compile s", "peak GiB"], rows)]
    ms = lambda x: None if x is None else 1e3 * x  # noqa: E731
    rows = [[r["device"], r["model"], c["batch"], h.fmt(ms(c["step_s"])),
             h.fmt(c["tokens_per_s"]), h.fmt(ms(c["bound_s"])),
             "-" if c["fraction_of_bound"] is None else f"{100 * c['fraction_of_bound']:.1f}%",
             h.fmt(r["bandwidth_gbs"])]
            for r in decode for c in r["cases"]]
    out.append(h.markdown_table(["device", "model", "batch", "step ms", "tokens/s",
                                 "bound ms", "of bound", "measured GB/s"], rows))
    return "\n\n".join(out)


def main(argv=None) -> dict:
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(no_reference=True, rounds=1, repeats=5)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on any backend: lower the train step, run the "
                             "decode part")
    parser.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b")
    parser.add_argument("--decode-batches", default="1,8,64")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args, _ = h.parse_common(parser, argv)
    common = dict(repeats=args.repeats, warmup=args.warmup,
                  peak=None if args.peak_tflops is None else args.peak_tflops * 1e12)
    if args.dry_run:
        train_specs = [dict(common, model=DRY["model"], overrides=DRY["overrides"],
                            batch=DRY["batch"], length=DRY["length"], repeats=1, warmup=0,
                            lower_only=True)]
        decode_specs = [dict(common, model=DRY["model"], overrides=DRY["overrides"], batches=[1],
                             prompt=DRY["prompt"], new_tokens=DRY["new_tokens"], repeats=1,
                             bandwidth_mib=DRY["bandwidth_mib"])]
    else:
        models = [m for m in args.models.split(",") if m]
        batches = [int(b) for b in args.decode_batches.split(",") if b]
        train_specs = [dict(common, model=m, **TRAIN_SHAPES.get(m, dict(batch=4, length=1024)))
                       for m in models]
        decode_specs = [dict(common, model=m, batches=batches, prompt=args.prompt,
                             new_tokens=args.new_tokens, bandwidth_mib=2048) for m in models]
    # Workers may use 95% of the GPU memory (JAX preallocates 75% by default).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    in_process = HANDLERS if args.in_process else None
    run = lambda side, spec: h.alternate(MODULE, {side: spec}, rounds=1,  # noqa: E731
                                         timeout=args.timeout, in_process=in_process,
                                         log=h.log)[0][side]
    train = [run("train", s) for s in train_specs]
    decode = [run("decode", s) for s in decode_specs]
    print(report(train, decode))
    payload = {"benchmark": "gpu", "dry_run": args.dry_run,
               "date": datetime.date.today().isoformat(), "train": train, "decode": decode}
    h.save_json(args.out, payload)
    return payload


if __name__ == "__main__":
    h.entry(HANDLERS, main)
