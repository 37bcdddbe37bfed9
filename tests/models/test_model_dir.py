"""Tests for models/model_dir.py: the one save / load of an exported model directory."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from models import model_dir
from models.qwen3 import Qwen3, Qwen3Config


def make(description):
    return Qwen3(Qwen3Config(**description), rngs=nnx.Rngs(0))


def params_of(model):
    return jax.tree.leaves(nnx.split(model, nnx.Param, ...)[1])


def test_round_trip_and_a_second_save_replaces_the_first(tmp_path, tiny_decoder):
    first, second = tiny_decoder(50, seed=1), tiny_decoder(50, seed=2)
    description = dataclasses.asdict(first.config)
    model_dir.save_model(first, str(tmp_path), description=description,
                         description_file="model.json")
    loaded, got = model_dir.load_model(str(tmp_path), make, description_file="model.json")
    assert got == json.loads(json.dumps(description))
    for a, b in zip(params_of(loaded), params_of(first), strict=True):
        np.testing.assert_array_equal(a, b)
    model_dir.save_model(second, str(tmp_path), description=description,
                         description_file="model.json", step=7)
    loaded, _ = model_dir.load_model(str(tmp_path), make, description_file="model.json")
    for a, b in zip(params_of(loaded), params_of(second), strict=True):
        np.testing.assert_array_equal(a, b)


def test_missing_and_malformed_descriptions_name_the_file(tmp_path, tiny_decoder):
    with pytest.raises(FileNotFoundError, match="no exported model in .* \\(no model.json\\)"):
        model_dir.load_model(str(tmp_path), make, description_file="model.json")
    (tmp_path / "model.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="model.json: not a model description .* list"):
        model_dir.read_description(str(tmp_path), "model.json")
    model = tiny_decoder(50)
    model_dir.save_model(model, str(tmp_path), description={"vocab_size": 50, "typo": 1},
                         description_file="model.json")
    with pytest.raises(ValueError, match="model.json: not a model description .*TypeError"):
        model_dir.load_model(str(tmp_path), make, description_file="model.json")
