"""Generic baseline compressor: token surprisal under a small causal LM trained on the same CoTs.

    python -m experiments.extra_cot.train_compressor --config=experiments/extra_cot/configs/compressor_baseline.py

LLMLingua's token-level importance (as in Selective Context): s_t = -log p(c_t |
question [SEP], c_<t); the compressor keeps the most surprising tokens. Same data,
tokenizer, backbone size and step budget as the formula-aware compressor
(compressor.py); it never sees the span annotations. See docs/compressor.md.
"""
import ml_collections

from experiments.extra_cot.configs import compressor

validate = compressor.validate


def get_config() -> ml_collections.ConfigDict:
    c = compressor.get_config()
    c.kind = "surprisal"
    c.run_dir = "runs/compressor_baseline"
    return c
