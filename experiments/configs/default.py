"""The embedded default of the main job: synthetic math, SentencePiece, a tiny Qwen3 on CPU.

    python -m experiments.pipeline          # this config (docs/results.md)

13 min 16 s wall (1,382 CPU-s) on 2 quiet CPU cores (docs/results.md, "Time
per stage"), with mixed / TokenSkip-style SFT of 1,200 steps, the RL learning
rate 5e-5 and the level-bonus width 0.4 chosen on the validation split.

Sizes and step counts were cut to the 15-minute budget on 2 CPU cores from
measured CPU time (docs/results.md): a 2-layer, 128-wide decoder (~0.5M
parameters + 768-entry vocabulary), problems of 2-3 steps. Every stage's block
is in pipeline_blocks.py; experiments/configs/long.py is the longer run.
"""
import ml_collections

from experiments.configs import pipeline_blocks

validate = pipeline_blocks.validate


def get_config() -> ml_collections.ConfigDict:
    return pipeline_blocks.base_config()
