"""Real scale: Qwen3-1.7B (the paper's model); everything else as qwen3_0p6b.py.

    python -m experiments.extra_cot.pipeline --config=experiments/extra_cot/configs/qwen3_1p7b.py \
        --config.model.hf_path=/path/to/Qwen3-1.7B \
        --config.data.tokenizer_path=/path/to/Qwen3-1.7B/tokenizer.json
"""
import ml_collections

from experiments.extra_cot.configs import pipeline_blocks, qwen3_0p6b

validate = pipeline_blocks.validate


def get_config() -> ml_collections.ConfigDict:
    c = qwen3_0p6b.get_config("1.7b")
    for name in ("sft_mixed", "sft_tokenskip", "sft_policy"):
        c[name].batch_tokens = 32768
    c.rl.minibatches = 16
    return c
