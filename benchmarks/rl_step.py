"""One CHRPO RL step broken down: rollout, scoring, behaviour/reference log-probs, update.

    .venv/bin/python -m benchmarks.rl_step                          # tiny + small, 1 round
    .venv/bin/python -m benchmarks.rl_step --sizes=small --steps=4 --out=/tmp/rl.json
    .venv/bin/python -m benchmarks.rl_step --sizes=micro --in-process --steps=2

JAX only (there is no transformers counterpart of a CHRPO step). The step is
the body of ``experiments.extra_cot.rl.rl`` built from the same public pieces, on
synthetic arithmetic questions (data/arithmetic.py) and a SentencePiece
tokenizer trained on them (the model's vocabulary is the tokenizer's):

    rollout    experiments.extra_cot.rollouts.rollout_groups: generate (policy and forced
               level samples) + judge every response
    scoring    experiments.extra_cot.rl.reward_inputs + chrpo.compute_advantages
               (hierarchical rewards, group-relative advantages), called
               eagerly as experiments.extra_cot.rl does; ``scoring_jit`` is the same
               call under jax.jit (not counted in the step total)
    old logp   models.sampling.score under the current policy
    ref logp   models.sampling.score under the frozen reference
    update     ``passes`` x ``minibatches`` jitted train steps with
               experiments.extra_cot.rl.make_rl_loss (chrpo.policy_loss)

The judging inside ``rollout`` is also timed alone (``judge``: parsing and
answer checking of the same responses), so generation = rollout - judge, and
on well-formed responses (``judge_gold``: each question's gold chain of
thought and answer built with data/formats.build_response). An untrained
model emits no stop token, so every rollout runs max_new_tokens: the worst
case of generation. Step 0 compiles everything (its phases are reported as
``first step``); the steady-state figure is the median over the later steps.
"""
from __future__ import annotations

import time

from benchmarks import harness as h

MODULE = "benchmarks.rl_step"
PHASES = ("rollout", "judge", "judge_gold", "scoring", "scoring_jit", "old_logp", "ref_logp",
          "update")
NOT_IN_TOTAL = ("judge", "judge_gold")   # judge is inside rollout; judge_gold is a reference
# Rollouts per step = prompts * (policy_samples + len(forced_levels) * forced_samples).
SETUPS = {
    "micro": dict(prompts=2, policy_samples=2, forced_levels=[20], forced_samples=1,
                  max_new_tokens=8, minibatches=2, passes=1),
    "tiny": dict(prompts=8, policy_samples=4, forced_levels=[20, 60], forced_samples=2,
                 max_new_tokens=128, minibatches=2, passes=1),
    "small": dict(prompts=8, policy_samples=4, forced_levels=[20, 60], forced_samples=2,
                  max_new_tokens=128, minibatches=2, passes=1),
}


def _setup(spec: dict):
    """Tokenizer, questions, calibration, policy/reference models and the jitted step."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    import chrpo  # noqa: PLC0415
    from benchmarks.jax_side import compile_train_step, model_config, random_model  # noqa: PLC0415
    from data.arithmetic import ArithmeticConfig, generate_problems, tokenizer_corpus  # noqa: PLC0415
    from data.tokenizers import train_sentencepiece  # noqa: PLC0415
    from experiments.extra_cot.datasets import question_from_row, question_row  # noqa: PLC0415
    from experiments.extra_cot.rl import make_rl_loss  # noqa: PLC0415

    arith = ArithmeticConfig(max_steps=3)
    tok = train_sentencepiece(tokenizer_corpus(generate_problems(0, 200, arith)),
                              vocab_size=spec["vocab"])
    questions = [question_from_row(question_row(p))
                 for p in generate_problems(1, spec["prompts"], arith)]
    calibration = [{"ref_len": 64, "target": 60} for _ in questions]
    config = model_config(spec["size"], vocab_size=tok.vocab_size)
    model, reference = random_model(config), nnx.split(random_model(config))
    objective = chrpo.get_preset("chrpo")
    return dict(jax=jax, nnx=nnx, tok=tok, questions=questions, calibration=calibration,
                model=model, reference=reference, objective=objective,
                loss_fn=make_rl_loss(objective), compile_train_step=compile_train_step)


def jax_worker(spec: dict) -> dict:
    """Run ``spec['steps']`` RL steps; seconds per phase per step."""
    import numpy as np  # noqa: PLC0415

    import chrpo  # noqa: PLC0415
    from data.formats import build_response, build_prompt  # noqa: PLC0415
    from experiments.extra_cot.rl import reward_inputs  # noqa: PLC0415
    from experiments.extra_cot.rollouts import judge, rollout_groups  # noqa: PLC0415
    from models.sampling import score  # noqa: PLC0415
    from models.training import merge_model  # noqa: PLC0415

    s = _setup(spec)
    jax, nnx, tok, questions = s["jax"], s["nnx"], s["tok"], s["questions"]
    width = max(len(build_prompt(tok, q.question, control="policy")) for q in questions) + 1
    width = -(-width // 32) * 32
    gold = [build_response(tok, tok.encode(q.cot), q.answer_text, level=60) for q in questions]
    num_local = 1 + len(spec["forced_levels"])

    def advantages_of(inputs, group_ids, local_ids):   # experiments.extra_cot.rl's advantage call
        groups = jax.numpy.asarray(group_ids)
        return chrpo.compute_advantages(
            inputs, groups, num_groups=len(questions),
            subgroup_ids=chrpo.nested_ids(groups, jax.numpy.asarray(local_ids),
                                          num_local=num_local),
            num_subgroups=len(questions) * num_local, config=s["objective"])

    scorers = {"eager": {"scoring": advantages_of},
               "jit": {"scoring_jit": jax.jit(advantages_of)},
               "both": {"scoring": advantages_of, "scoring_jit": jax.jit(advantages_of)},
               }[spec["scoring"]]
    train, steps = None, []
    for step in range(spec["steps"]):
        t, phase_start = {}, time.perf_counter()

        def lap(name, value=None):
            nonlocal phase_start
            jax.block_until_ready(value)
            now = time.perf_counter()
            t[name], phase_start = now - phase_start, now
            return value

        model = s["model"] if train is None else merge_model(train["graphdef"], train["state"])
        batch = lap("rollout", rollout_groups(
            model, tok, questions, policy_samples=spec["policy_samples"],
            forced_levels=spec["forced_levels"], forced_samples=spec["forced_samples"],
            max_new_tokens=spec["max_new_tokens"], temperature=1.0,
            key=jax.random.key(step), prompt_width=width, completion_bucket=32))
        for c, m, g in zip(batch.completion_ids, batch.completion_mask, batch.group_ids):
            judge(tok, c[m].tolist(), questions[g].answer, expect_control=True)
        lap("judge")
        for r, q in zip(gold, questions):
            judge(tok, r, q.answer, expect_control=True)
        lap("judge_gold")
        for name, fn in scorers.items():
            inputs = reward_inputs(batch, s["calibration"])
            advantages, _ = lap(name, fn(inputs, batch.group_ids, batch.local_ids))
        tensors = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                   batch.completion_mask)
        old = lap("old_logp", score(*nnx.split(model), *tensors))
        ref = lap("ref_logp", score(*s["reference"], *tensors))
        arrays = dict(zip(("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"),
                          tensors), old_logp=np.asarray(old), ref_logp=np.asarray(ref),
                      advantages=np.asarray(advantages))
        rows = len(arrays["advantages"])
        chunks = np.split(np.random.default_rng(step).permutation(rows), spec["minibatches"])
        if train is None:   # compile once (the mini-batch shape is fixed)
            first = {k: v[chunks[0]] for k, v in arrays.items()}
            built = s["compile_train_step"](s["model"], s["loss_fn"], first)
            train = {"step": built["step"], "state": built["state"],
                     "graphdef": built["graphdef"],
                     "compile_s": built["compile_s"], "memory": built["compiled_memory"]}
        for _ in range(spec["passes"]):
            for chunk in chunks:
                train["state"], metrics = train["step"](
                    train["state"], {k: v[chunk] for k, v in arrays.items()})
        lap("update", metrics)
        steps.append(t)
    return {"steps": steps, "rows": int(batch.prompt_ids.shape[0]),
            "prompt_width": int(width), "completion_width": int(batch.completion_ids.shape[1]),
            "vocab": int(tok.vocab_size), "train_compile_s": train["compile_s"],
            "train_compiled_memory": train["memory"]}


HANDLERS = {"jax": jax_worker}


def summarize(spec: dict, rounds: list[dict]) -> dict:
    """Median seconds per phase over the steady steps of all rounds, and the first step."""
    runs = [r["jax"] for r in rounds]
    steady = [st for run in runs for st in run["steps"][1:]] or [runs[0]["steps"][0]]
    present = [p for p in PHASES if p in steady[0]]
    phases = {p: h.median([st[p] for st in steady]) for p in present}
    first = {p: h.median([run["steps"][0][p] for run in runs]) for p in present}
    # The step as experiments.extra_cot.rl runs it: eager scoring when it was measured.
    counted = [p for p in present if p not in NOT_IN_TOTAL
               and not (p == "scoring_jit" and "scoring" in present)]
    total = sum(phases[p] for p in counted)
    return {"size": spec["size"], "setup": {k: spec[k] for k in SETUPS[spec["size"]]},
            "rows": runs[0]["rows"], "prompt_width": runs[0]["prompt_width"],
            "completion_width": runs[0]["completion_width"], "vocab": runs[0]["vocab"],
            "steady_s": phases, "first_step_s": first, "step_total_s": total,
            "counted": counted,
            "train_compile_s": h.median([run["train_compile_s"] for run in runs]),
            "train_compiled_memory": runs[0]["train_compiled_memory"],
            "rss_peak_mib": max(run["rss_peak_mib"] for run in runs),
            "load": [run["load_before"][0] for run in runs], "rounds": rounds}


def report(rows: list[dict]) -> str:
    """Markdown table: one line per phase and size (steady seconds, share, first step)."""
    out = []
    for r in rows:
        for p in r["steady_s"]:
            share = (f"{100 * r['steady_s'][p] / r['step_total_s']:.0f}%"
                     if p in r["counted"] else "(not counted)")
            if p == "judge":
                share = "(in rollout)"
            out.append([r["size"], p, h.fmt(r["steady_s"][p]), share,
                        h.fmt(r["first_step_s"][p])])
        out.append([r["size"], "**step**", h.fmt(r["step_total_s"]), "100%",
                    f"rows {r['rows']}, P {r['prompt_width']}, C {r['completion_width']}, "
                    f"V {r['vocab']}, RSS {h.fmt(r['rss_peak_mib'])} MiB, "
                    f"load {' '.join(f'{x:.1f}' for x in r['load'])}"])
    return h.markdown_table(["size", "phase", "steady s", "share", "first step s"], out)


def main(argv=None) -> list[dict]:
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(rounds=1, no_reference=True)
    parser.add_argument("--steps", type=int, default=4, help="RL steps per round (>= 2)")
    parser.add_argument("--vocab", type=int, default=512, help="tokenizer vocabulary bound")
    parser.add_argument("--scoring", choices=("eager", "jit", "both"), default="both",
                        help="compute_advantages as experiments.extra_cot.rl calls it (eager), jitted, "
                             "or both")
    args, sizes = h.parse_common(parser, argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    rows = []
    for size in sizes:
        spec = dict(size=size, steps=args.steps, vocab=args.vocab, scoring=args.scoring,
                    **SETUPS[size])
        h.log(f"rl_step {size}: {args.rounds} round(s) of {args.steps} steps")
        rounds = h.alternate(MODULE, {"jax": spec}, rounds=args.rounds, timeout=args.timeout,
                             in_process=HANDLERS if args.in_process else None, log=h.log)
        rows.append(summarize(spec, rounds))
    print(report(rows))
    h.save_json(args.out, {"benchmark": "rl_step", "rows": rows})
    return rows


if __name__ == "__main__":
    h.entry(HANDLERS, main)
