"""Shared fixtures for the Qwen3 model tests: the committed HF checkpoints.

tests/fixtures/make_qwen3_fixtures.py wrote them with transformers (see its
docstring); the tests only read them (numpy, safetensors; no torch).
"""
import os

import numpy as np
import pytest

QWEN3_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "fixtures", "qwen3")
QWEN3_CASES = ("gqa_tied", "untied_theta1e4")


@pytest.fixture(scope="session", params=QWEN3_CASES)
def qwen3_case(request):
    """(case directory, reference arrays, loaded model) for each committed case."""
    from models.hf import load_hf

    path = os.path.join(QWEN3_FIXTURES, request.param)
    with np.load(os.path.join(path, "reference.npz"), allow_pickle=False) as f:
        ref = {k: f[k] for k in f.files}
    return path, ref, load_hf(path)
