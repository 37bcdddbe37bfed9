"""Train-step throughput: our jitted SFT and CHRPO steps vs transformers' Qwen3 in PyTorch.

    .venv/bin/python -m benchmarks.train_step                      # tiny + small, 3 rounds
    .venv/bin/python -m benchmarks.train_step --sizes=small --rounds=5 --out=/tmp/train.json
    .venv/bin/python -m benchmarks.train_step --sizes=micro --no-reference --in-process

One step = forward, backward, global-norm clip and AdamW update of every
parameter, on the same weights and the same batch on both sides:

- sft:   next-token cross-entropy over every token of a [B, T] batch
         (ours: experiments.extra_cot.sft.lm_loss; torch: Qwen3ForCausalLM(labels=...).loss);
- chrpo: the CHRPO policy loss (chrpo 'chrpo' preset: clip-higher, dual clip,
         k3 KL to a reference, weighted control token, token mean) over
         [B, C] completion tokens after [B, P] prompts (ours:
         experiments.extra_cot.rl.make_rl_loss; torch: the same loss written in torch, logits
         only for the completion positions via ``logits_to_keep``).

Tokens/s counts every token the step processes (B*T, or B*(P+C)). Ours is
compiled once (``jax.jit(...).lower().compile()``, timed separately, state
donated); torch runs eagerly and its first step is reported in the same
column. The report is the best step time of each side, the median over rounds
of the same-run ratio (ours / torch tokens/s), peak RSS of each worker and
XLA's memory estimate of the compiled step.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from benchmarks import harness as h

MODULE = "benchmarks.train_step"
KINDS = ("sft", "chrpo")
# Batch shapes per size: sft (batch, length); chrpo (batch, prompt, completion).
SHAPES = {
    "micro": {"sft": dict(batch=2, length=16), "chrpo": dict(batch=2, prompt=8, completion=8)},
    "tiny": {"sft": dict(batch=8, length=128), "chrpo": dict(batch=8, prompt=32, completion=96)},
    # the main job's SFT batches hold 2,048 token slots (sft.batch_tokens), here at width 256
    "main": {"sft": dict(batch=8, length=256), "chrpo": dict(batch=8, prompt=64, completion=192)},
    "small": {"sft": dict(batch=4, length=256),
              "chrpo": dict(batch=4, prompt=64, completion=192)},
}


def worker_spec(size: str, kind: str, weights: str, **extra) -> dict:
    """The worker spec of one case: shapes of ``SHAPES[size][kind]``, the weights
    file, and the 'chrpo' preset's loss settings that the torch side re-implements
    (``extra``: repeats, warmup, ...). Shared by this benchmark, ab_step and
    profile_step."""
    import chrpo  # noqa: PLC0415

    loss = {k: v for k, v in dataclasses.asdict(chrpo.get_preset("chrpo").loss).items()
            if k in ("eps_low", "eps_high", "dual_clip", "kl_coef", "control_weight")}
    return dict(size=size, kind=kind, weights=weights, torch_loss=loss, **extra,
                **SHAPES[size][kind])


def tokens_per_step(spec: dict) -> int:
    """Tokens one step processes: B * T (sft) or B * (P + C) (chrpo)."""
    if spec["kind"] == "sft":
        return spec["batch"] * spec["length"]
    return spec["batch"] * (spec["prompt"] + spec["completion"])


def make_batch(spec: dict) -> dict[str, np.ndarray]:
    """The benchmark batch (numpy), a pure function of the spec.

    sft: tokens int32 [B, T], mask and loss_mask all True.
    chrpo: full prompts [B, P]; completions [B, C] where row b has
    C - b * (C // (2B)) real tokens; behaviour/reference log-probs in [-3, -0.5]
    (0 where masked) and advantages ~ N(0, 1).
    """
    rng = np.random.default_rng(0)
    vocab, b = h.size_config(spec["size"])["vocab_size"], spec["batch"]
    if spec["kind"] == "sft":
        t = spec["length"]
        tokens = rng.integers(3, vocab, (b, t)).astype(np.int32)
        return {"tokens": tokens, "mask": np.ones((b, t), bool),
                "loss_mask": np.ones((b, t), bool)}
    p, c = spec["prompt"], spec["completion"]
    lengths = c - np.arange(b) * (c // (2 * b))
    cmask = np.arange(c)[None] < lengths[:, None]
    logp = lambda: np.where(cmask, -rng.uniform(0.5, 3.0, (b, c)), 0.0).astype(np.float32)  # noqa: E731
    return {"prompt_ids": rng.integers(3, vocab, (b, p)).astype(np.int32),
            "prompt_mask": np.ones((b, p), bool),
            "completion_ids": rng.integers(3, vocab, (b, c)).astype(np.int32),
            "completion_mask": cmask, "old_logp": logp(), "ref_logp": logp(),
            "advantages": rng.normal(size=b).astype(np.float32)}


# ----------------------------------------------------------------------------- workers

def jax_worker(spec: dict) -> dict:
    """Compile and time our train step for ``spec``."""
    import jax  # noqa: PLC0415

    import chrpo  # noqa: PLC0415
    from benchmarks import jax_side  # noqa: PLC0415
    from experiments.extra_cot.rl import make_rl_loss  # noqa: PLC0415
    from experiments.extra_cot.sft import lm_loss  # noqa: PLC0415

    model = jax_side.load_model(spec["weights"], **spec.get("model_overrides", {}))
    batch = jax.device_put(make_batch(spec))
    loss_fn = lm_loss if spec["kind"] == "sft" else make_rl_loss(chrpo.get_preset("chrpo"))
    built = jax_side.compile_train_step(model, loss_fn, batch)
    holder = {"state": built["state"], "metrics": None}

    def call():
        holder["state"], holder["metrics"] = built["step"](holder["state"], batch)
        jax.block_until_ready(holder["metrics"])

    cpu_times: list[float] = []
    times = h.timed(call, repeats=spec["repeats"], warmup=spec["warmup"], cpu_times=cpu_times)
    return {"times": times, "cpu_times": cpu_times, "compile_s": built["compile_s"],
            "compiled_memory": built["compiled_memory"],
            "loss": float(holder["metrics"]["loss"]),
            "skipped": int(holder["metrics"]["skipped_total"]),
            "query_block": model.config.query_block}


def torch_worker(spec: dict) -> dict:
    """Time transformers' Qwen3 + torch AdamW on the same batch."""
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from benchmarks import torch_side  # noqa: PLC0415

    model = torch_side.load_model(spec["weights"], train=True)
    optimizer = torch_side.adamw(model)
    batch = {k: torch.from_numpy(v) for k, v in make_batch(spec).items()}
    last = {}

    def sft_loss():
        ids = batch["tokens"].long()
        return model(input_ids=ids, attention_mask=batch["mask"].long(), labels=ids).loss

    def chrpo_loss():
        c = batch["completion_ids"].shape[1]
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1).long()
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1).long()
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=c + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(
            -1, batch["completion_ids"].long()[..., None])[..., 0]
        return torch_side.policy_loss(logp, batch["old_logp"], batch["advantages"],
                                      batch["completion_mask"], batch["ref_logp"],
                                      **spec["torch_loss"])

    loss_fn = sft_loss if spec["kind"] == "sft" else chrpo_loss

    def call():
        loss = loss_fn()
        torch_side.apply_update(model, optimizer, loss)
        last["loss"] = float(loss.detach())

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    cpu_times: list[float] = []
    times = h.timed(call, repeats=spec["repeats"], warmup=max(spec["warmup"] - 1, 0),
                    cpu_times=cpu_times)
    return {"times": times, "cpu_times": cpu_times, "compile_s": first, "loss": last["loss"],
            "threads": torch.get_num_threads()}


HANDLERS = {"jax": jax_worker, "torch": torch_worker}


# ----------------------------------------------------------------------------- driver

def summarize(spec: dict, rounds: list[dict]) -> dict:
    """One result row: best tokens/s per side, same-run ratios, compile, memory, load."""
    tokens = tokens_per_step(spec)
    row = {"size": spec["size"], "kind": spec["kind"], "tokens": tokens,
           "shape": {k: spec[k] for k in ("batch", "length", "prompt", "completion")
                     if k in spec}, "rounds": rounds}
    for side in rounds[0]:
        runs = [r[side] for r in rounds]
        row[side] = {"tokens_per_s": max(tokens / h.best(x["times"]) for x in runs),
                     "median_step_s": h.median([h.median(x["times"]) for x in runs]),
                     "compile_s": h.median([x["compile_s"] for x in runs]),
                     "rss_peak_mib": max(x["rss_peak_mib"] for x in runs),
                     "rss_base_mib": min(x["rss_base_mib"] for x in runs),
                     "compiled_memory": runs[0].get("compiled_memory"),
                     "load": [x["load_before"][0] for x in runs]}
    if "torch" in rounds[0]:
        row["ratio"] = h.ratio_summary([h.best(r["torch"]["times"]) / h.best(r["jax"]["times"])
                                        for r in rounds])
    return row


def report(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    out = []
    for r in rows:
        j, t = r["jax"], r.get("torch")
        mem = h.mib((j["compiled_memory"] or {}).get("peak_estimate"))
        ratio = r.get("ratio")
        out.append([r["size"], r["kind"], r["tokens"], h.fmt(j["tokens_per_s"]),
                    h.fmt(t["tokens_per_s"]) if t else "-",
                    (f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"
                     if ratio else "-"),
                    h.fmt(j["compile_s"]), h.fmt(t["compile_s"]) if t else "-",
                    h.fmt(j["rss_peak_mib"]), h.fmt(t["rss_peak_mib"]) if t else "-",
                    h.fmt(mem), " ".join(f"{x:.1f}" for x in j["load"])])
    return h.markdown_table(
        ["size", "step", "tokens/step", "ours tok/s", "torch tok/s", "ratio (median, range)",
         "ours compile s", "torch 1st step s", "ours RSS MiB", "torch RSS MiB",
         "XLA est. MiB", "load (1 min)"], out)


def main(argv=None) -> list[dict]:
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="sft,chrpo")
    parser.add_argument("--query-block", type=int, default=0,
                        help="our model's Qwen3Config.query_block (0: one attention block)")
    args, sizes = h.parse_common(parser, argv)
    if args.query_block < 0:
        parser.error(f"--query-block must be >= 0, got {args.query_block}")
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds: valid are {KINDS}, got {args.kinds!r}")
    from benchmarks.jax_side import write_weights  # noqa: PLC0415

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            weights = write_weights(size, os.path.join(tmp, size))
            for kind in kinds:
                spec = worker_spec(size, kind, weights, repeats=args.repeats,
                                   warmup=args.warmup,
                                   model_overrides={"query_block": args.query_block})
                specs = {"jax": spec} if args.no_reference else {"jax": spec, "torch": spec}
                h.log(f"train_step {size} {kind}: {args.rounds} round(s)")
                rounds = h.alternate(MODULE, specs, rounds=args.rounds, timeout=args.timeout,
                                     in_process={"jax": jax_worker} if args.in_process else None,
                                     log=h.log)
                rows.append(summarize(spec, rounds))
    print(report(rows))
    h.save_json(args.out, {"benchmark": "train_step", "rows": rows})
    return rows


if __name__ == "__main__":
    h.entry(HANDLERS, main)
