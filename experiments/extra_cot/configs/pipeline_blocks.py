"""Per-stage config blocks of the main job, and the validation every pipeline config shares.

A pipeline config (default.py, test.py, qwen3_*.py) is ``base_config()`` with
some values changed. Keys, by block:

    seed, run_dir, stage ('all' or a comma list of stages.STAGE_ORDER)
    data           source ('arithmetic' | 'benchmarks'), arithmetic (data.arithmetic
                   .ArithmeticConfig fields), sizes/seeds per split, tokenizer
    model          source ('config' | 'hf'), architecture of a fresh decoder or hf_path
    sft_base, sft_mixed, sft_policy, sft_tokenskip
                   init (a stage name or 'scratch'), steps, batch_tokens, bucket,
                   max_length, optim (models.optim.OPTIMIZER_DEFAULTS)
    compressor, compressor_baseline
                   experiments/extra_cot/configs/compressor.py blocks (paths filled in per run)
    selfcot, compress, calibrate, rl, evaluate     see each stage's module
"""
from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

import chrpo
from data.arithmetic import ArithmeticConfig
from data.formats import LEVELS
from experiments import cli
from experiments.extra_cot.configs import compressor as compressor_configs
from experiments.extra_cot.configs.stages import STAGE_ORDER, selected_stages
from experiments.rundir import model_config
from models.optim import default_optimizer_config, make_optimizer
from models.qwen3 import DTYPES

SOURCES = ("arithmetic", "benchmarks")
MODEL_SOURCES = ("config", "hf")
BASELINE_SCORERS = ("base_lm", "trained")
COMPRESS_UNITS = ("tokens", "sentences")
STD_ESTIMATORS = ("grpo", "hierarchical")
SFT_BLOCKS = ("sft_base", "sft_mixed", "sft_policy", "sft_tokenskip")


def sft_block(*, init: str, steps: int, learning_rate: float, batch_tokens: int = 4096,
              bucket: int = 128, max_length: int = 512) -> ml_collections.ConfigDict:
    b = ml_collections.ConfigDict()
    b.init = init
    total = ml_collections.FieldReference(steps)
    b.steps = total
    b.batch_tokens = batch_tokens
    b.bucket = bucket
    b.max_length = max_length
    b.log_every = 10
    b.checkpoint_every = 100
    b.max_consecutive_skips = 10   # non-finite updates in a row before the run stops
    # loss weight of equation tokens against the other response tokens (1: plain SFT;
    # experiments.extra_cot.sft.weighted_examples)
    b.equation_weight = 1.0
    b.optim = default_optimizer_config(learning_rate=learning_rate, total_steps=total,
                                       warmup=0.05, weight_decay=0.05, grad_clip=1.0,
                                       min_lr_ratio=0.1)
    return b


def _check_local_files(config: ml_collections.ConfigDict) -> None:
    """The tokenizer and every benchmark file exist, before any work: the error names the
    CLI key to set (the data stage would find out only after the run directory exists)."""
    from data.benchmarks import expected_path  # noqa: PLC0415 (imports tfds)

    cli.check(config, "data.tokenizer_path", os.path.isfile,
              "must be a local tokenizer file (tokenizer.json or a SentencePiece model); "
              "no such file")
    for split in ("sft", "rl", "val", "test"):
        name, path, part, start, count = config.data.benchmarks[split]
        try:
            want = expected_path(name, jsonl_path=path, split=part)
        except ValueError as err:
            raise cli.ConfigError(f"config key 'data.benchmarks.{split}': {err}") from None
        if not os.path.isfile(want):
            raise cli.ConfigError(
                f"config key 'data.benchmarks.{split}': no local file {want!r} for {name} "
                f"split {part!r} (nothing is downloaded); pass "
                f"--config.data.benchmarks.{split}={name},/path/to/file.jsonl,{part},{start},"
                f"{count}")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.run_dir = "runs/main"
    c.stage = "all"
    # stages to run again although finished ('' or a comma list of --config.stage names);
    # a training stage resumes from its last checkpoint and may get more steps
    # (docs/real_scale.md, "Resuming, extending, forcing")
    c.force = ""
    # device mesh of the SFT stages (models/sharding.py; -1 = the remaining devices):
    # FSDP over every device by default, which is no sharding on one device
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # gradient accumulation (models.training.make_train_step): every SFT step / every RL
    # update is split into this many micro-batches, each spanning the whole mesh
    c.microbatches = ml_collections.ConfigDict({"sft": 1, "rl": 1})

    c.data = d = ml_collections.ConfigDict()
    d.source = "arithmetic"
    # 2-3 step chains of two-digit values with small operands: what a 2-layer decoder
    # learns in a few CPU minutes; equations zero-padded to 2 digits, each step
    # restating its question sentence word for word, and the last step saying that it is
    # the last: the changes of the CoT that raised the base model most on validation
    # (docs/results.md, "The base model")
    d.arithmetic = ml_collections.ConfigDict({
        "min_steps": 2, "max_steps": 3, "max_digits": 2, "max_operand": 11, "max_start": 20,
        "op_weights": (1.0, 1.0, 0.3, 0.3), "pad_width": 2, "restate": "quote_steps",
        "mark_last": True})
    d.tokenizer_path = ""         # '' -> train SentencePiece on tokenizer_problems problems
    d.vocab_size = 768
    d.tokenizer_problems = 2000
    d.compressor_problems = 2000  # annotated problems the compressor learns from
    # 1,000 test problems: a binomial standard error of at most 1.6 points per accuracy
    d.sizes = ml_collections.ConfigDict({"sft": 8000, "rl": 256, "val": 200, "test": 1000})
    d.seeds = ml_collections.ConfigDict({"tokenizer": 0, "compressor": 1, "compressor_eval": 2,
                                         "sft": 10, "rl": 20, "val": 30, "test": 40,
                                         "drill": 50})
    # benchmarks: per split (name, local file or dir, benchmark split, first record, count)
    d.benchmarks = ml_collections.ConfigDict({
        "sft": ("metamathqa", "", "train", 0, 4000), "rl": ("gsm8k", "", "train", 0, 512),
        "val": ("gsm8k", "", "test", 0, 200), "test": ("gsm8k", "", "test", 200, 1119)})

    c.model = m = ml_collections.ConfigDict()
    m.source = "config"
    m.hf_path = ""
    m.hidden_size = 128
    m.intermediate_size = 384
    m.num_layers = 2
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = 32
    m.rope_theta = 1e4
    m.max_position_embeddings = 2048
    m.dtype = "float32"
    m.param_dtype = "float32"
    # std of the normal init of every kernel: 0.05 (Qwen3's 0.02 is for hidden sizes in the
    # thousands); at 0.02 one seed in three learned the base task slowly and answered
    # 76.5% of validation against 92.0% at 0.05 (docs/results.md, "The base model")
    m.initializer_range = 0.05
    # > 0: causal attention in query blocks of at least this many rows (Qwen3Config.query_block),
    # a speed setting that changes float rounding; this default's results swing by several
    # points under such a change (docs/results.md, "Sensitivity to float rounding"), so it
    # stays off here
    m.query_block = 0

    # 1,000 steps of 4,096 tokens with equation tokens weighted 4x: 67% against 49.5% for
    # 1,500 x 2,048 unweighted on validation (docs/results.md, "The base model")
    c.sft_base = sft_block(init="scratch", steps=1000, learning_rate=3e-3, batch_tokens=4096)
    c.sft_base.equation_weight = 4.0
    # arithmetic drills mixed into the base SFT data (experiments.extra_cot.sft.drill_examples;
    # arithmetic source only): lines of step equations, 'drill_equations' per example
    c.sft_base.drill_examples = 0
    c.sft_base.drill_equations = 24
    # 1,200 steps (~5 epochs of the ~4,900 mixed examples): validation accuracy rises with
    # the step count at every level, most at <COMP_20> (13.5 / 19.5 / 23.0 / 35.0 / 46.5%
    # for 300 / 450 / 600 / 900 / 1,200 steps; docs/results.md, "Tuning on the validation
    # split")
    # 1,000 steps since session 7 (was 1,200): the larger test split's evaluation and the
    # longer base SFT had to fit the 15-minute budget (docs/results.md, "Time per stage");
    # learning rate 3e-3 since session 11 (was 1e-3): at 1e-3 the mixed model was
    # under-trained and one seed's <COMP_20> fell to 74% on validation (docs/results.md,
    # "The mixed-ratio SFT was under-trained")
    c.sft_mixed = sft_block(init="sft_base", steps=1000, learning_rate=3e-3, batch_tokens=2048)
    c.sft_policy = sft_block(init="sft_mixed", steps=40, learning_rate=5e-4, batch_tokens=2048)
    c.sft_policy.level_examples = True
    # loss weight of a policy example's chosen level token against its other response
    # tokens (1: plain SFT): the one token that says which level the question gets
    c.sft_policy.control_weight = 1.0
    c.sft_tokenskip = sft_block(init="sft_base", steps=1000, learning_rate=3e-3,  # = sft_mixed
                             batch_tokens=2048)

    c.compressor = compressor_configs.get_config()
    c.compressor_baseline = compressor_configs.get_config()
    c.compressor_baseline.kind = "surprisal"

    c.selfcot = ml_collections.ConfigDict({"num_questions": 2000, "batch_size": 128,
                                           "max_new_tokens": 320,
                                           "fill_with_reference": False})
    c.compress = ml_collections.ConfigDict({
        # 0.25 beside the deciles: where a chain's step equations alone take more than 20%
        # of it, 0.2 must drop one and 0.3 lands in level 40; 0.25 gives level 20 a chain
        # with every equation (docs/results.md, "The multi-seed study (session 8)")
        "ratios": (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        "baseline_scorer": "base_lm", "batch_size": 64,
        # what the formula-aware compressor keeps whole: 'tokens' (equations only, as in the
        # paper) or 'sentences' (every line and sentence: data.compression.sentence_units).
        # 'sentences': <COMP_40> answered 90.0% of validation against 64.5% (the dip of
        # docs/results.md), <COMP_20> 94.5 against 84.0 (seed 0). The TokenSkip-style
        # baseline keeps single tokens, as TokenSkip does.
        "units": "sentences"})
    # samples: answers per level at `temperature` beside the greedy one; their accuracy is
    # what a budget's allocation (rl.budget_targets='allocation') spends tokens by
    c.calibrate = ml_collections.ConfigDict({"batch_size": 128, "max_new_tokens": 320,
                                             "samples": 0, "temperature": 1.0})

    c.rl = r = ml_collections.ConfigDict()
    r.init = "sft_policy"
    r.steps = 10
    r.prompts_per_step = 16
    r.policy_samples = 4
    r.forced_levels = (20, 40)
    r.forced_samples = 2
    r.temperature = 1.0
    r.max_new_tokens = 256
    r.completion_bucket = 64
    r.passes = 1
    r.minibatches = 2
    r.budget = config_dict.placeholder(float)   # global mean-ratio budget B; None = off
    # with a budget (docs/chrpo.md, "A budget that binds"): the targets of the warm start
    # and of the level bonus, 'calibration' (the paper's rule) or 'allocation'
    # (experiments.extra_cot.calibrate.budget_targets: the most accurate levels at mean ratio B);
    # two-sided: B is the ratio to reach (mean r = B), not only a ceiling
    r.budget_targets = "calibration"
    r.budget_two_sided = False
    # > 0: the allocation pools accuracy over this many buckets of question length
    # (experiments.extra_cot.calibrate.budget_targets), so the targets follow what the prompt shows
    r.allocation_buckets = 0
    # the cost of a level on a question, for the allocation and the budget decode: 'level'
    # (its mean ratio, the same for every question) or 'length' (times the question's
    # share of the tokens, experiments.extra_cot.calibrate.length_weights: ActRatio is a
    # ratio of token sums, so moving a long question up spends more of the budget)
    r.budget_costs = "length"
    # 'dual': projected dual ascent at lagrange_step_size (the paper's update);
    # 'pid': chrpo.update_pid_lagrange with the gains of rl.pid
    r.budget_controller = "dual"
    # gains chosen on validation (seed 0, budget 0.3; docs/results.md, "What was tuned on
    # validation"):
    # kp 4 / ki 4 swung the ratio 0.2 -> 0.69 -> 0.2 in 20 steps, kp 2 / ki 1 / kd 4 too
    r.pid = ml_collections.ConfigDict({"kp": 1.0, "ki": 0.5, "kd": 0.0, "integral_limit": 3.0})
    r.lagrange_step_size = 0.5
    r.log_every = 1
    r.checkpoint_every = 10
    r.max_consecutive_skips = 10   # non-finite updates in a row before the run stops
    # 5e-5: at 2e-4 the KL to the warm start reached 1-2 nats/token and CHRPO fell below
    # its warm start on validation (docs/results.md, "Tuning on the validation split")
    r.optim = default_optimizer_config(learning_rate=5e-5, total_steps=1, warmup=0.0,
                                       schedule="constant", weight_decay=0.0, grad_clip=1.0)
    r.objective = ml_collections.ConfigDict(chrpo.get_preset("chrpo").as_flat_dict())
    r.objective.max_len = config_dict.placeholder(int)
    # 0.4 (preset 0.8): the level bonus is gone two levels above a question's target, so
    # <COMP_60> earns nothing extra on a <COMP_20> question; on validation CHRPO went from
    # 50.0% at ActRatio 0.604 to 51.0% at 0.525 (docs/results.md, "Tuning ... session 5")
    r.objective.ratio_width = 0.4

    c.evaluate = ml_collections.ConfigDict({
        "num_questions": 1000, "batch_size": 250, "max_new_tokens": 320,
        "levels": LEVELS, "tokenskip_levels": LEVELS, "difficulty_key": "n_steps",
        # the methods to answer with (experiments.extra_cot.evaluate.METHOD_STAGES); 'base' always
        "methods": ("base", "extra-cot", "tokenskip", "policy-warm-start", "chrpo"),
        # with rl.budget set, 'chrpo' also answers decoded under the budget ('chrpo-budget')
        "budget_decode": True})
    return c


def _positive_int(config, key: str) -> None:
    cli.check(config, key, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
              "must be a positive int")


def _check_model(config: ml_collections.ConfigDict) -> None:
    """Build the fresh decoder's Qwen3Config (vocabulary: data.vocab_size); its error
    names the field, reported here as the ``model.<field>`` key."""
    try:
        model_config(config.model, config.data.vocab_size)
    except (TypeError, ValueError) as err:
        text = str(err)
        field = text.split("Qwen3Config.", 1)[1].split(" ", 1)[0] if "Qwen3Config." in text else ""
        key = f"model.{field}" if field else "model"
        raise cli.ConfigError(f"config key '{key}': {text}") from None


def _check_block(key: str, build) -> None:
    """Build a block's own object now, so its ValueError names the key before any work."""
    try:
        build()
    except (TypeError, ValueError) as err:
        raise cli.ConfigError(f"config key '{key}': {err}") from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject out-of-range values before any work starts, naming the key."""
    selected_stages(config.stage)
    forced = selected_stages(config.force) if config.get("force") else []
    outside = [f for f in forced if f not in selected_stages(config.stage)]
    if outside:
        raise cli.ConfigError(f"config key 'force' = {config.force!r}: {outside} not among the "
                              f"stages this run runs (--config.stage={config.stage})")
    cli.check(config, "run_dir", bool, "must be a directory path")
    cli.check(config, "seed", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0")
    for axis in ("data", "fsdp", "tensor"):
        cli.check(config, f"mesh.{axis}",
                  lambda v: not isinstance(v, bool) and isinstance(v, int) and (v >= 1 or v == -1),
                  "must be an int >= 1, or -1 for the remaining devices")
    for key in ("microbatches.sft", "microbatches.rl"):
        _positive_int(config, key)
    cli.check_choice(config, "data.source", SOURCES)
    cli.check_choice(config, "model.source", MODEL_SOURCES)
    cli.check_range(config, "data.vocab_size", low=300, high=65536)
    for split in ("sft", "rl", "val", "test"):
        _positive_int(config, f"data.sizes.{split}")
    if config.data.source == "benchmarks" and not config.data.tokenizer_path:
        raise cli.ConfigError("config key 'data.tokenizer_path' must name a tokenizer.json "
                              "when data.source='benchmarks'")
    if config.data.source == "benchmarks":
        _check_local_files(config)
    if config.model.source == "hf":
        cli.check(config, "model.hf_path", bool, "must name a local Hugging Face directory")
        cli.check(config, "model.hf_path",
                  lambda v: os.path.isfile(os.path.join(v, "config.json")),
                  "must be a local Hugging Face directory with a config.json (nothing is "
                  "downloaded); pass --config.model.hf_path=/path/to/Qwen3-0.6B")
        cli.check_choice(config, "model.dtype", tuple(DTYPES))
        cli.check_choice(config, "model.param_dtype", tuple(DTYPES))
    else:   # the architecture is checked now, not after the data stage
        _check_model(config)
    cli.check(config, "model.query_block",
              lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 0,
              "must be an int >= 0 (0: attention over all keys in one block)")
    for block in SFT_BLOCKS:
        cli.check_choice(config, f"{block}.init", ("scratch",) + STAGE_ORDER)
        cli.check(config, f"{block}.steps", lambda v: isinstance(v, int) and v >= 0,
                  "must be an int >= 0 (0 keeps the init model)")
        for key in ("batch_tokens", "bucket", "max_length", "log_every", "checkpoint_every",
                    "max_consecutive_skips"):
            _positive_int(config, f"{block}.{key}")
        cli.check(config, f"{block}.max_length", lambda v, b=block: v >= config[b].bucket,
                  f"must be >= {block}.bucket")
        cli.check_range(config, f"{block}.equation_weight", low=0.0, low_open=True, high=100.0)
        if config[block].steps >= 1:
            _check_block(f"{block}.optim",
                         lambda b=block: make_optimizer(config[b].optim, name=f"{b}.optim"))
    cli.check(config, "sft_base.drill_examples",
              lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              "must be an int >= 0 (0: no drills)")
    _positive_int(config, "sft_base.drill_equations")
    if config.sft_base.drill_examples and config.data.source != "arithmetic":
        raise cli.ConfigError("config key 'sft_base.drill_examples' must be 0 unless "
                              "data.source='arithmetic' (drills come from its generator)")
    if config.data.source == "arithmetic":
        _check_block("data.arithmetic",
                     lambda: ArithmeticConfig(**config.data.arithmetic.to_dict()))
    for name in ("compressor", "compressor_baseline"):
        try:
            compressor_configs.validate(config[name])
        except cli.ConfigError as err:
            raise cli.ConfigError(str(err).replace("config key '", f"config key '{name}.")) from None
    cli.check(config, "compress.ratios",
              lambda v: len(v) > 0 and all(0 < g <= 1 for g in v),
              "must be a non-empty list of ratios in (0, 1]")
    cli.check_choice(config, "compress.baseline_scorer", BASELINE_SCORERS)
    cli.check_choice(config, "compress.units", COMPRESS_UNITS)
    for key in ("selfcot.num_questions", "selfcot.batch_size", "selfcot.max_new_tokens",
                "calibrate.batch_size", "calibrate.max_new_tokens", "compress.batch_size",
                "rl.steps", "rl.prompts_per_step", "rl.policy_samples", "rl.max_new_tokens",
                "rl.completion_bucket", "rl.passes", "rl.minibatches", "rl.checkpoint_every",
                "rl.max_consecutive_skips",
                "evaluate.num_questions", "evaluate.batch_size", "evaluate.max_new_tokens"):
        _positive_int(config, key)
    _validate_rl(config)
    for key in ("evaluate.levels", "evaluate.tokenskip_levels", "rl.forced_levels"):
        cli.check(config, key, lambda v: all(lv in LEVELS for lv in v),
                  f"must hold levels among {LEVELS}")
    cli.check(config, "calibrate.samples", lambda v: isinstance(v, int) and not isinstance(v, bool)
              and v >= 0, "must be an int >= 0")
    cli.check_range(config, "calibrate.temperature", low=0.0, low_open=True)
    methods = ("base", "extra-cot", "tokenskip", "policy-warm-start", "chrpo")
    cli.check(config, "evaluate.methods",
              lambda v: "base" in v and all(m in methods for m in v),
              f"must hold 'base' and names among {methods}")
    cli.check(config, "evaluate.budget_decode", lambda v: isinstance(v, bool),
              "must be true or false")


def _validate_rl(config: ml_collections.ConfigDict) -> None:
    r = config.rl
    cli.check_choice(config, "rl.init", ("sft_policy", "sft_mixed"))
    cli.check_range(config, "sft_policy.control_weight", low=0.0, low_open=True, high=1000.0)
    updates = r.steps * r.passes * r.minibatches   # rl.py sets rl.optim.total_steps to this
    _check_block("rl.optim", lambda: make_optimizer({**r.optim.to_dict(), "total_steps": updates},
                                                    name="rl.optim"))
    cli.check(config, "rl.forced_samples", lambda v: isinstance(v, int) and v >= 0,
              "must be an int >= 0")
    cli.check_range(config, "rl.temperature", low=0.0, low_open=True)
    cli.check(config, "rl.budget", lambda v: v is None or 0 < v <= 1,
              "must be None (no global budget) or a mean ratio in (0, 1]")
    cli.check_range(config, "rl.lagrange_step_size", low=0.0, low_open=True)
    cli.check_choice(config, "rl.budget_targets", ("calibration", "allocation"))
    cli.check_choice(config, "rl.budget_costs", ("level", "length"))
    cli.check_choice(config, "rl.budget_controller", ("dual", "pid"))
    cli.check(config, "rl.allocation_buckets", lambda v: isinstance(v, int)
              and not isinstance(v, bool) and v >= 0, "must be an int >= 0")
    for gain in ("kp", "ki", "kd"):
        cli.check_range(config, f"rl.pid.{gain}", low=0.0)
    cli.check_range(config, "rl.pid.integral_limit", low=0.0, low_open=True)
    kind = config.rl.objective.get("kind", "hierarchical")
    if kind.startswith("lcpo") and config.rl.budget is None:
        raise cli.ConfigError(f"config key 'rl.budget': rl.objective.kind={kind!r} needs "
                              "the target ratio; set --config.rl.budget")
    cli.check_range(config, "rl.objective.tol", low=0.0)
    try:
        objective = chrpo.ChrpoConfig().replace(**r.objective.to_dict())
    except ValueError as err:
        raise cli.ConfigError(f"config key 'rl.objective': {err}") from None
    group = r.policy_samples + len(r.forced_levels) * r.forced_samples
    if objective.advantage.estimator in STD_ESTIMATORS + ("rloo",):
        cli.check(config, "rl.policy_samples", lambda v: group >= 2,
                  f"gives a group of {group} rollouts; estimator "
                  f"'{objective.advantage.estimator}' needs at least 2 per prompt")
    rows = r.prompts_per_step * group
    cli.check(config, "rl.minibatches", lambda v: v <= rows and rows % v == 0,
              f"must divide the {rows} rollouts of a step (equal mini-batch shapes)")
