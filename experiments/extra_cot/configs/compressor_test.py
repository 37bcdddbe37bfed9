"""Seconds-long compressor config for tests (tiny model, few problems, few steps)."""
import ml_collections

from experiments.extra_cot.configs import compressor

validate = compressor.validate


def get_config(kind: str = "formula") -> ml_collections.ConfigDict:
    c = compressor.get_config()
    c.kind = kind
    c.run_dir = "runs/compressor_test"
    c.data.tokenizer_problems = 200
    c.data.vocab_size = 400
    c.data.num_train = 48
    c.data.num_eval = 8
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.model.num_layers = 1
    c.model.num_heads = 2
    c.model.num_kv_heads = 1
    c.model.head_dim = 16
    c.train.steps = 12
    c.train.batch_tokens = 1024
    c.train.max_length = 256       # one compiled shape: rows lose their CoT tail
    c.train.bucket = 256
    c.train.log_every = 4
    c.train.checkpoint_every = 12
    c.train.optim.learning_rate = 1e-2
    c.eval.ratios = (0.2, 0.5)
    c.eval.batch_size = 8
    return c
