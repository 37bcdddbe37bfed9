"""Qwen3-1.7B on 8xh100: qwen3_1p7b.py plus the mesh / distributed / microbatches blocks
of experiments/configs/scale_common.py (see docs/scaling.md; NOT RUN on that hardware).

    python -m experiments.pipeline --config=experiments/configs/scale_8xh100.py \
        --config.model.hf_path=/path/to/Qwen3-1.7B \
        --config.data.tokenizer_path=/path/to/Qwen3-1.7B/tokenizer.json
"""
import ml_collections

from experiments.configs import qwen3_1p7b, scale_common

validate = qwen3_1p7b.validate


def get_config() -> ml_collections.ConfigDict:
    return scale_common.scale_config("8xh100")
