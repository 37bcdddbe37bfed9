"""The whole pipeline in about two minutes: the CI end-to-end config (tests/extra_cot/test_pipeline.py).

Same stages and code paths as default.py, with tiny sizes and few steps; the
numbers it produces only show that every stage runs and writes sane outputs.
"""
import ml_collections

from experiments.extra_cot.configs import pipeline_blocks

validate = pipeline_blocks.validate


def get_config() -> ml_collections.ConfigDict:
    c = pipeline_blocks.base_config()
    c.run_dir = "runs/test"
    c.data.arithmetic.max_steps = 3
    c.data.vocab_size = 400
    c.data.tokenizer_problems = 200
    c.data.compressor_problems = 64
    c.data.sizes.update({"sft": 96, "rl": 16, "val": 8, "test": 12})
    c.model.update({"hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                    "num_heads": 2, "num_kv_heads": 1, "head_dim": 16})
    for name, steps in (("sft_base", 12), ("sft_mixed", 6), ("sft_policy", 4),
                        ("sft_tokenskip", 4)):
        block = c[name]
        block.steps = steps
        block.batch_tokens = 2048
        block.bucket = block.max_length = 384   # one compiled width per stage
        block.log_every = 2
        block.checkpoint_every = 4
        block.optim.learning_rate = 1e-2
    for name in ("compressor", "compressor_baseline"):
        block = c[name]
        block.model.update({"hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                            "num_heads": 2, "num_kv_heads": 1, "head_dim": 16})
        block.train.steps = 4
        block.train.batch_tokens = 1024
        block.train.bucket = 256
        block.train.log_every = 2
        block.train.checkpoint_every = 2
        block.data.num_eval = 4
        block.eval.ratios = (0.2,)
        block.eval.batch_size = 4
    c.selfcot.update({"num_questions": 32, "batch_size": 32, "max_new_tokens": 160,
                      "fill_with_reference": True})
    c.compress.batch_size = 16
    c.calibrate.update({"batch_size": 16, "max_new_tokens": 160})
    c.rl.update({"steps": 2, "prompts_per_step": 4, "policy_samples": 2, "forced_samples": 1,
                 "max_new_tokens": 96, "checkpoint_every": 1})
    c.evaluate.update({"num_questions": 12, "batch_size": 12, "max_new_tokens": 160})
    return c
