"""Supervised fine-tuning stages of the main job (loss on response tokens only).

    python -m experiments.extra_cot.pipeline --config.stage=sft_base

Stages (each a recipe over ``train_sft``; the block of the same name configures it):

- ``sft_base``: the base reasoning model on the reference full chains of thought
  (base mode, no control token).
- ``sft_mixed``: Extra-CoT mixed-ratio SFT on the formula-aware compressor's
  data (``compress`` stage): every question at every level <COMP_20> ... <COMP_100>;
  warm-starts from the base model when ``sft_mixed.init='sft_base'``.
- ``sft_policy``: policy-mode warm start from the mixed model: each calibrated
  question with a target gets a <COMP_POLICY> example whose response opens with
  <COMP_target> and carries the mixed model's own correct CoT at that level,
  plus level-mode examples of the same CoTs (so level following is kept).
- ``sft_tokenskip``: the TokenSkip-style baseline: the same mixed-ratio recipe
  on the generic (surprisal) compressor's data.

Optimiser: ``models.optim.make_optimizer`` (AdamW, warmup + cosine, weight
decay, global-norm clipping; the exported model is the parameter EMA when
``optim.ema_decay > 0``); the loop is ``models.loop.train_loop``: Orbax
checkpoints every ``checkpoint_every`` steps, and a re-run resumes from the
latest one (batches are a pure function of (seed, step), so the resumed run is
the same run).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from data.arithmetic import ArithmeticConfig, drill_text
from data.formats import (LEVELS, SFTExample, build_policy_example, build_sft_example,
                          equation_token_mask, weight_equations, weight_level_token)
from experiments import rundir
from experiments.extra_cot.calibrate import policy_targets
from experiments.extra_cot.datasets import read_questions, sft_batch
from models import sharding, sharding_memory
from models.loop import train_loop
from models.qwen3 import Qwen3
from models.optim import make_optimizer
from models.training import (create_train_state, make_train_step, masked_lm_loss, merge_model,
                             require_applied_updates)

__all__ = ["lm_loss", "train_sft", "sft_base", "sft_mixed", "sft_policy", "sft_tokenskip",
           "STAGES"]

log = logging.getLogger(__name__)


def lm_loss(model: Qwen3, batch: dict, rng: jax.Array):
    """Next-token cross-entropy on ``loss_mask`` tokens as (sum, denominator, {})."""
    del rng
    logits = model(batch["tokens"], attention_mask=batch["mask"])
    total, denom = masked_lm_loss(logits, batch["tokens"], batch["loss_mask"])
    return total, denom, {}


def pad_rows(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """``batch`` with all-masked rows appended up to a multiple of ``multiple`` rows.

    The rows carry no loss tokens, so the loss (sum over ``loss_mask`` /
    count) and its gradient are those of the original batch; they let the rows
    split evenly over the mesh's batch axes (``models.sharding.pad_rows`` with
    zero fill).
    """
    return sharding.pad_rows(batch, multiple)


def train_sft(model: Qwen3, examples: Sequence[SFTExample], block: ml_collections.ConfigDict, *,
              stage_dir: str, seed: int, name: str,
              mesh: ml_collections.ConfigDict | Mesh | None = None,
              num_microbatches: int = 1) -> tuple[Qwen3, dict]:
    """``block.steps`` AdamW steps on ``examples``; resumes from ``stage_dir/checkpoints``.

    ``mesh``: a ``jax.sharding.Mesh`` (the run's, ``rundir.Run.mesh``) or a
    device-mesh block (``models.sharding.mesh_from_config``; None = FSDP over every
    device, i.e. nothing to shard on one device). Parameters and
    optimiser state follow the logical-axis rules, batch rows are split over
    ``data x fsdp``; the per-device memory estimate is logged at start. Every
    process builds the same global batch (a pure function of seed and step) and
    places the rows of its own devices. ``num_microbatches``: gradient
    accumulation over that many strided micro-batches of each step's batch
    (``make_train_step``); batches are padded to a multiple of
    ``data x fsdp x num_microbatches`` rows.

    Returns (trained model, {'train_seconds', 'tokens_per_second', 'final_loss', 'examples'}).
    ``block.steps == 0`` returns ``model`` unchanged (e.g. a pretrained Qwen3 as the base).
    """
    if block.steps == 0:
        return model, {"train_seconds": 0.0, "tokens_per_second": 0.0,
                       "final_loss": float("nan"), "examples": len(examples)}
    optimizer, schedule = make_optimizer(block.optim, name=f"{name}.optim")
    graphdef, state = create_train_state(model, optimizer, rng=seed)
    device_mesh = mesh if isinstance(mesh, Mesh) else sharding.mesh_from_config(mesh)
    state, shardings = sharding.place_state(state, device_mesh)
    step_fn = sharding.jit_train_step(make_train_step(graphdef, lm_loss, optimizer,
                                                      schedule=schedule,
                                                      num_microbatches=num_microbatches),
                                      shardings)
    batch_rows = sharding.batch_ways(device_mesh) * num_microbatches
    rows = -(-max(1, block.batch_tokens // block.max_length) // batch_rows) * batch_rows
    log.info("%s: %s", name, sharding_memory.format_memory(
        sharding_memory.estimate_memory(state, shardings, model.config, device_mesh,
                                        batch_size=rows, seq_len=block.max_length,
                                        num_microbatches=num_microbatches),
        mesh_shape=dict(device_mesh.shape)))
    batch_args = dict(seed=seed, batch_tokens=block.batch_tokens, bucket=block.bucket,
                      max_length=block.max_length)

    def batch_fn(step: int):
        batch = pad_rows(sft_batch(examples, step=step, **batch_args), batch_rows)
        return (sharding.shard_batch(batch, device_mesh, process_local=False),
                int(batch["mask"].sum()))

    result = train_loop(state, step_fn, batch_fn, steps=block.steps, directory=stage_dir,
                        checkpoint_every=block.checkpoint_every, log_every=block.log_every,
                        shardings=shardings, desc=name, name=name,
                        max_consecutive_skips=block.max_consecutive_skips)
    require_applied_updates(result.state, name=name)
    return merge_model(graphdef, result.state, average=True), {
        "train_seconds": result.seconds,
        "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
        "final_loss": result.final_loss, "examples": len(examples)}


def weighted_examples(tokenizer, examples: Sequence[SFTExample], weight: float
                      ) -> list[SFTExample]:
    """``examples`` with their equation tokens weighted ``weight`` in the loss
    (``data.formats.weight_equations``); ``weight == 1`` returns them unchanged."""
    if weight == 1:
        return list(examples)
    pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    return [weight_equations(e, equation_token_mask(tokenizer, e.ids, pieces=pieces), weight)
            for e in examples]


def _finish(run: rundir.Run, stage: str, model: Qwen3, examples, config, block) -> dict:
    stage_dir = run.stage_dir(stage)
    examples = weighted_examples(run.tokenizer(), examples, float(block.get("equation_weight", 1.0)))
    micro = config.get("microbatches")
    model, stats = train_sft(model, examples, block, stage_dir=stage_dir, seed=config.seed,
                             name=stage, mesh=run.mesh(config),
                             num_microbatches=micro.sft if micro is not None else 1)
    rundir.export_model(model, stage_dir)
    return stats


def _init(run: rundir.Run, config, block, tokenizer) -> Qwen3:
    if block.init == "scratch":
        return rundir.build_model(config.model, tokenizer, seed=config.seed)
    if not run.done(block.init):
        raise FileNotFoundError(f"stage {block.init!r} (the init of this stage) is not done "
                                f"in {run.root}")
    return rundir.load_model(run.path(block.init))


# ----------------------------------------------------------------------------- stages

def drill_examples(tokenizer, config) -> list[SFTExample]:
    """``sft_base.drill_examples`` arithmetic drills (``data.arithmetic.drill_text``) as
    plain-text examples with the loss on every token but the first; stream
    ``data.seeds.drill``, so every seed of a study sees the same drills."""
    block = config.sft_base
    n = int(block.get("drill_examples", 0))
    if n == 0:
        return []
    arith = ArithmeticConfig(**config.data.arithmetic.to_dict())
    out = []
    for i in range(n):
        ids = np.asarray(tokenizer.encode(drill_text(config.data.seeds.drill, i, arith,
                                                     equations=block.drill_equations)) +
                         [tokenizer.eos_id], np.int32)
        mask = np.ones(ids.shape, bool)
        mask[0] = False
        out.append(SFTExample(ids, mask))
    return out


def sft_base(config, run: rundir.Run) -> dict:
    """Base reasoning model: full reference CoTs, base mode (plus arithmetic drills
    when ``sft_base.drill_examples > 0``)."""
    tok = run.tokenizer()
    questions = read_questions(run.path("data", "sft.jsonl"))
    examples = [build_sft_example(tok, q.question, tok.encode(q.cot), q.answer_text)
                for q in questions]
    drills = drill_examples(tok, config)
    model = _init(run, config, config.sft_base, tok)
    stats = _finish(run, "sft_base", model, examples + drills, config, config.sft_base)
    return {**stats, "drill_examples": len(drills)}


def _level_examples(run: rundir.Run, tok, data_file: str) -> list[SFTExample]:
    questions = {q.uid: q for q in read_questions(run.path("data", "sft.jsonl"))}
    rows = rundir.read_jsonl(run.path("compress", data_file))
    if not rows:
        raise ValueError(f"{run.path('compress', data_file)} holds no compressed CoT")
    return [build_sft_example(tok, questions[r["uid"]].question, r["cot_ids"],
                              questions[r["uid"]].answer_text, control=r["level"]) for r in rows]


def sft_mixed(config, run: rundir.Run) -> dict:
    """Mixed-ratio SFT on the formula-aware compressor's re-bucketed data."""
    tok = run.tokenizer()
    examples = _level_examples(run, tok, "formula.jsonl")
    model = _init(run, config, config.sft_mixed, tok)
    return _finish(run, "sft_mixed", model, examples, config, config.sft_mixed)


def sft_tokenskip(config, run: rundir.Run) -> dict:
    """The TokenSkip-style baseline: mixed-ratio SFT on the generic compressor's data."""
    tok = run.tokenizer()
    examples = _level_examples(run, tok, "baseline.jsonl")
    model = _init(run, config, config.sft_tokenskip, tok)
    return _finish(run, "sft_tokenskip", model, examples, config, config.sft_tokenskip)


def sft_policy(config, run: rundir.Run) -> dict:
    """Policy-mode warm start on each calibrated question's target level
    (``calibrate.policy_targets``: the paper's rule, or a budget's allocation)."""
    tok = run.tokenizer()
    questions = {q.uid: q for q in read_questions(run.path("data", "rl.jsonl"))}
    examples: list[SFTExample] = []
    targets = 0
    rows = rundir.read_jsonl(run.path("calibrate", "calibration.jsonl"))
    for row, target in zip(rows, policy_targets(config, rows)):   # or a budget's levels
        q = questions[row["uid"]]
        # an allocated level's greedy answer can be wrong (the paper's target never is):
        # such a question gets no policy example
        if target is not None and row["levels"][str(target)]["correct"]:
            targets += 1
            cot = row["levels"][str(target)]["cot_ids"]
            example = build_policy_example(tok, q.question, cot, q.answer_text,
                                           target_level=target)
            weight = float(config.sft_policy.get("control_weight", 1.0))
            examples.append(example if weight == 1 else weight_level_token(example, weight))
        if config.sft_policy.level_examples:
            for level in LEVELS:
                got = row["levels"][str(level)]
                if got["correct"]:
                    examples.append(build_sft_example(tok, q.question, got["cot_ids"],
                                                      q.answer_text, control=level))
    model = _init(run, config, config.sft_policy, tok)
    if not examples:  # the mixed model solved no RL question at any level (tiny configs)
        log.warning("sft_policy: calibration gave no correct answer; keeping the init model")
        rundir.export_model(model, run.stage_dir("sft_policy"))
        return {"examples": 0, "policy_examples": 0}
    stats = _finish(run, "sft_policy", model, examples, config, config.sft_policy)
    return {**stats, "policy_examples": targets}


STAGES = {"sft_base": sft_base, "sft_mixed": sft_mixed, "sft_policy": sft_policy,
          "sft_tokenskip": sft_tokenskip}
