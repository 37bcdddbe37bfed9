"""The tree path-finding lab (docs/trees.md): trees, their token layouts, one-layer
transformers trained on them, head-role probes and plots. Entry point:
``python -m experiments.trees.lab --config=experiments/trees/config.py:ex1``."""
