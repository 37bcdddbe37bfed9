"""The embedded default of the main job: synthetic math, SentencePiece, a tiny Qwen3 on CPU.

    python -m experiments.extra_cot.pipeline          # this config (docs/results.md)

About 11 minutes wall alone on 2 CPU cores (656 s for seed 1 of the study;
docs/results.md, "Time per stage"), evaluated on 1,000 test problems. The chains of thought
zero-pad their equations and quote each step's question sentence; base SFT
weights equation tokens 4x (docs/results.md, "The base model"); the RL
learning rate 5e-5 and the level-bonus width 0.4 were chosen on the
validation split in session 5.

Sizes and step counts were cut to the 15-minute budget on 2 CPU cores from
measured CPU time (docs/results.md): a 2-layer, 128-wide decoder (~0.5M
parameters + 768-entry vocabulary), problems of 2-3 steps. Every stage's block
is in pipeline_blocks.py; experiments/extra_cot/configs/long.py is the longer run.
"""
import ml_collections

from experiments.extra_cot.configs import pipeline_blocks

validate = pipeline_blocks.validate


def get_config() -> ml_collections.ConfigDict:
    return pipeline_blocks.base_config()
