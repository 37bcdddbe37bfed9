"""RoPE variants (models/rope.py) against transformers, on config.json files it wrote.

tests/fixtures/make_rope_fixtures.py writes the checkpoints and the logits that
transformers computes from each config.json; here models.hf.load_hf reads the same
files and must give the same logits (40 positions, past max_position_embeddings=16).
"""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from models.hf import load_hf
from models.qwen3 import Qwen3, Qwen3Config
from models.rope import RopeScaling, inv_frequencies

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fixtures", "qwen3_rope")
CASES = sorted(os.listdir(FIXTURES))


def _logits(model, ref):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, attention_mask=m))
    return np.asarray(f(state, ref["tokens"], ref["mask"]))


def _reference(case):
    with np.load(os.path.join(FIXTURES, case, "reference.npz"), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_every_variant_has_a_case():
    assert CASES == ["dynamic", "linear", "no_head_dim", "theta_precedence", "yarn_rope_scaling",
                     "yarn_settings"]


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    ref, model = _reference(case), load_hf(os.path.join(FIXTURES, case))
    real = ref["mask"].astype(bool)
    err = np.abs(_logits(model, ref)[real] - ref["logits"][real]).max()
    assert err <= 1e-4, err
    assert np.abs(ref["logits"][real]).max() > 1.0


@pytest.mark.parametrize("case, wrong", [
    ("theta_precedence", dict(rope_theta=5e5)),          # the top-level key must lose
    ("linear", dict(rope_scaling=None)), ("dynamic", dict(rope_scaling=None)),
    ("yarn_rope_scaling", dict(rope_scaling=None)), ("yarn_settings", dict(rope_scaling=None)),
])
def test_the_scaling_matters_on_these_positions(case, wrong):
    """The cases are not vacuous: the plain reading of each file gives other logits."""
    ref = _reference(case)
    model = load_hf(os.path.join(FIXTURES, case))
    other = Qwen3(dataclasses.replace(model.config, **wrong), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model))
    real = ref["mask"].astype(bool)
    assert np.abs(_logits(other, ref)[real] - ref["logits"][real]).max() > 1e-2


def test_what_the_loader_read():
    def config(case):
        with open(os.path.join(FIXTURES, case, "config.json")) as f:
            return Qwen3Config.from_hf_dict(json.load(f))
    assert config("theta_precedence").rope_theta == 1e4
    assert config("no_head_dim").head_dim == 128
    assert config("linear").rope_scaling == RopeScaling(rope_type="linear", factor=2.0)
    yarn = config("yarn_rope_scaling").rope_scaling
    assert (yarn.rope_type, yarn.factor, yarn.original_max_position_embeddings) == ("yarn", 4.0, 8)
    assert yarn.attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
    for case in CASES:      # config.json -> Qwen3Config -> config.json -> the same config
        c = config(case)
        assert Qwen3Config.from_hf_dict(c.to_hf_dict()) == c


def test_refusals_name_the_key():
    base = Qwen3Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=4).to_hf_dict()
    for edit, match in [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.rope_type"),
        ({"rope_parameters": {"rope_type": "longrope"}}, "rope_parameters.rope_type"),
        ({"rope_scaling": {"rope_type": "linear"}}, "lacks 'factor'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "short_factor": [1]}}, "short_factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": -1.0}}, "factor"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0,
                           "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ]:
        with pytest.raises(ValueError, match=match):
            Qwen3Config.from_hf_dict(dict(base, **edit))


def test_inv_frequencies_by_hand():
    inv, scale = inv_frequencies(4, 100.0)
    np.testing.assert_allclose(inv, [1.0, 0.1], rtol=1e-6)
    assert scale == 1.0
    inv, _ = inv_frequencies(4, 100.0, RopeScaling(rope_type="linear", factor=4.0))
    np.testing.assert_allclose(inv, [0.25, 0.025], rtol=1e-6)
    with pytest.raises(ValueError, match="RopeScaling.rope_type"):
        RopeScaling(rope_type="default", factor=1.0)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        inv_frequencies(4, 100.0, RopeScaling(rope_type="yarn", factor=2.0))


def test_model_json_round_trip_keeps_the_scaling(tmp_path):
    from experiments import rundir
    model = load_hf(os.path.join(FIXTURES, "yarn_settings"))
    rundir.export_model(model, str(tmp_path / "stage"))
    again = rundir.load_model(str(tmp_path / "stage"))
    assert again.config == model.config and again.config.rope_scaling.rope_type == "yarn"
    shutil.rmtree(tmp_path / "stage")
