"""Weights from outside: pickle is never opened, bad safetensors are named (issue 10).

Missing, mis-shaped and unexpected tensors are named by tests/models/test_hf.py
(::test_missing_tensor_is_named_with_its_shape,
::test_misshaped_and_unexpected_tensors_are_named); pickle suffixes by
::test_pickle_files_are_refused_unopened. Here: a *working* pickle payload
(its unpickling would create a file) under every name a loader might try, a
truncated export, and a shard listed by the index but absent.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil

import pytest

from models.hf import PICKLE_SUFFIXES, load_hf, read_safetensors

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "qwen3"


class _Payload:
    """Unpickling this creates ``target``: proof that a loader ran pickle code."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def _checkpoint_dir(root: pathlib.Path, name: str, source: str = "gqa_tied") -> pathlib.Path:
    d = root / name
    d.mkdir()
    shutil.copy(FIXTURES / source / "config.json", d / "config.json")
    return d


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    target = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(target)))   # what torch.load-style loading would do
    assert target.exists()


@pytest.mark.parametrize("file_name", ["model.safetensors", "pytorch_model.bin", "model.pt",
                                       "weights.pth", "model.ckpt", "model.pkl",
                                       "MODEL.BIN"])
def test_pickle_payloads_are_never_unpickled(tmp_path, file_name):
    target = tmp_path / "ran"
    d = _checkpoint_dir(tmp_path, "ckpt")
    (d / file_name).write_bytes(pickle.dumps(_Payload(target)))
    with pytest.raises(ValueError, match="pickle|not a valid safetensors") as err:
        load_hf(str(d))
    if file_name.endswith(".safetensors"):
        assert repr(str(d / file_name)) in str(err.value)   # names the file
    with pytest.raises(ValueError):
        read_safetensors(str(d / file_name))
    assert not target.exists()


def test_pickle_suffixes_cover_the_common_formats():
    assert {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"} <= set(PICKLE_SUFFIXES)


def test_truncated_export_is_named(tmp_path):
    d = _checkpoint_dir(tmp_path, "cut")
    data = (FIXTURES / "gqa_tied" / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"{d / 'model.safetensors'}.*not a valid safetensors"):
        load_hf(str(d))


def test_shard_listed_by_the_index_but_absent_is_named(tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "untied_theta1e4", d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(d / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_hf(str(d))
