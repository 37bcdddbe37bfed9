"""Formula-aware CoT compressor (Extra-CoT stage 1): a tiny bidirectional encoder on CPU.

    python -m experiments.extra_cot.train_compressor --config=experiments/extra_cot/configs/compressor.py

Trains in about a minute on 2 CPU cores (see docs/compressor.md for the
measured time). The baseline (generic surprisal compressor) is
``compressor_baseline.py``; the seconds-long test config is ``compressor_test.py``.
"""
import ml_collections

from experiments import cli
from models.optim import default_optimizer_config, make_optimizer

KINDS = ("formula", "surprisal")
KEEP_POLICIES = ("essential", "essential+supporting")
GRADINGS = ("ordinal", "binary")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.run_dir = "runs/compressor"
    # 'formula': keep-score classifier on the span annotations (this method);
    # 'surprisal': causal LM on the same CoTs, scores = token surprisal (the baseline).
    c.kind = "formula"

    c.data = ml_collections.ConfigDict()
    c.data.tokenizer_path = ""     # '' -> train SentencePiece on tokenizer_seed problems, save it
    c.data.tokenizer_seed = 0
    c.data.tokenizer_problems = 2000
    c.data.vocab_size = 768
    c.data.problems_path = ""      # JSONL of data.arithmetic problems; '' -> generate train_seed
    c.data.train_seed = 10
    c.data.num_train = 2000
    c.data.eval_seed = 11          # held-out problems (another stream)
    c.data.eval_path = ""          # JSONL of held-out problems; '' -> generate eval_seed
    c.data.num_eval = 200

    # Label policy: the binary keep set used for keep/drop F1 (and for 'binary' training);
    # 'ordinal' also teaches the order hedge < narration < restatement < supporting < essential.
    c.labels = ml_collections.ConfigDict()
    c.labels.keep = "essential+supporting"
    c.labels.grading = "ordinal"

    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = 96
    c.model.intermediate_size = 256
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 24
    c.model.rope_theta = 1e4

    steps = ml_collections.FieldReference(120)
    c.train = ml_collections.ConfigDict()
    c.train.steps = steps
    c.train.batch_tokens = 4096    # rows per batch = batch_tokens // row width (16 at 256)
    c.train.max_length = 512       # longer rows lose their CoT tail (counted in the log)
    c.train.bucket = 128           # row widths round up to a multiple: few compiled shapes
    c.train.log_every = 25
    c.train.checkpoint_every = 100
    c.train.optim = default_optimizer_config(learning_rate=3e-3, total_steps=steps,
                                             warmup=0.05, weight_decay=0.01)

    c.eval = ml_collections.ConfigDict()
    c.eval.ratios = (0.1, 0.2, 0.3, 0.4, 0.5)
    c.eval.batch_size = 32
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    cli.check_choice(config, "kind", KINDS)
    cli.check_choice(config, "labels.keep", KEEP_POLICIES)
    cli.check_choice(config, "labels.grading", GRADINGS)
    for key in ("data.num_train", "data.num_eval", "data.tokenizer_problems", "train.steps",
                "train.batch_tokens", "train.log_every", "train.checkpoint_every",
                "eval.batch_size", "model.hidden_size", "model.intermediate_size",
                "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.head_dim"):
        cli.check(config, key, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  "must be a positive int")
    for key in ("seed", "data.tokenizer_seed", "data.train_seed", "data.eval_seed"):
        cli.check(config, key, lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0")
    cli.check_range(config, "data.vocab_size", low=300, high=65536)
    cli.check_range(config, "train.bucket", low=8)
    cli.check(config, "train.max_length", lambda v: v >= config.train.bucket,
              "must be at least train.bucket")
    cli.check(config, "train.batch_tokens", lambda v: v >= config.train.bucket,
              "must be at least train.bucket (one row of the narrowest width)")
    cli.check(config, "train.optim.total_steps", lambda v: v == config.train.steps,
              "must equal train.steps")
    try:
        make_optimizer(config.train.optim, name="train.optim")
    except ValueError as err:
        raise cli.ConfigError(f"config key 'train.optim': {err}") from None
    cli.check(config, "eval.ratios", lambda v: len(v) > 0 and all(0 < r <= 1 for r in v),
              "must be a non-empty list of ratios in (0, 1]")
    cli.check(config, "model.num_kv_heads", lambda v: config.model.num_heads % v == 0,
              "must divide model.num_heads")
    cli.check(config, "run_dir", lambda v: bool(v), "must be a directory path")
