"""experiments.extra_cot.rollouts.generate_responses on a device mesh.

- On 8 simulated CPU devices the prompt rows of every batch are split over the
  mesh's batch axes (data x fsdp) and the parameters by the logical-axis rules,
  and the greedy responses equal the single-device ones token for token: on
  data 2 x fsdp 2 x tensor 2 with an explicit ``mesh=`` (batch_size 3 padded to
  4 rows, 7 prompts: a short last batch), and on fsdp 8 with the mesh taken from
  a model placed by ``place_model`` (batch_size 5 padded to 8).
- On one device a 1x1x1 mesh gives exactly today's output (``mesh=None``), and
  ``place_model``'s multi-process branch (through host memory) keeps the values.

The 8-device side is this file run as a script in a subprocess
(``spawn_on_eight_devices`` of test_rl_mesh.py); it writes JSON.
"""
import importlib.util
import json
import os
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.extra_cot import rollouts
from models import sharding, sharding_memory
from models.qwen3 import Qwen3, Qwen3Config

TOKENIZER = types.SimpleNamespace(pad_id=0, eos_id=7)    # generate_responses reads these two
MAX_NEW = 6
CASES = {"mixed": ({"data": 2, "fsdp": 2, "tensor": 2}, 3, "explicit"),
         "fsdp": ({"data": 1, "fsdp": 8, "tensor": 1}, 5, "placed")}


def _model() -> Qwen3:
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    return Qwen3(config, rngs=nnx.Rngs(3))


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(8, 64, n).tolist() for n in (5, 9, 3, 12, 7, 4, 10)]


def _generate(model, batch_size: int, mesh=None) -> list[list[int]]:
    out = rollouts.generate_responses(model, _prompts(), tokenizer=TOKENIZER,
                                      batch_size=batch_size, max_new_tokens=MAX_NEW,
                                      prompt_bucket=16, mesh=mesh)
    return [r.tolist() for r in out]


def _recording_generate(seen: list):
    """models.sampling.generate, recording the rows and the rows per device of its prompts."""
    real = rollouts.generate

    def wrapped(graphdef, state, ids, mask, **kwargs):
        per_device = (ids.sharding.shard_shape(ids.shape)[0] if isinstance(ids, jax.Array)
                      else ids.shape[0])
        seen.append((int(ids.shape[0]), int(per_device),
                     sharding_memory.held_bytes_per_device(state)
                     / sum(x.nbytes for x in jax.tree.leaves(state))))
        return real(graphdef, state, ids, mask, **kwargs)

    return wrapped


def _params(model) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_leaves_with_path(nnx.split(model, nnx.Param, ...)[1])}


def _with_params(model, params: dict[str, np.ndarray]) -> Qwen3:
    """``model`` with the given parameter values: the 8-device process compiles its
    initialisers at -O0, which rounds differently, so both sides use the parent's."""
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.numpy.asarray(params[jax.tree_util.keystr(path)]), state)
    return nnx.merge(graphdef, state, rest)


def test_a_one_device_mesh_changes_nothing(monkeypatch):
    model, seen = _model(), []
    monkeypatch.setattr(rollouts, "generate", _recording_generate(seen))
    mesh = sharding.mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1})
    plain = _generate(model, 3)
    assert _generate(rollouts.place_model(model, mesh), 3) == plain    # mesh from the params
    assert _generate(model, 3, mesh) == plain
    assert [rows for rows, _, _ in seen] == [3] * 9                     # 7 prompts: 3 + 3 + 1
    assert all(len(r) >= 1 for r in plain) and len(plain) == 7


def test_place_model_goes_through_the_host_on_several_processes(monkeypatch):
    """The multi-process branch of place_model (leaves not yet on the mesh are
    copied through host memory), exercised on one device: same values, and the
    leaves end on the mesh's shardings."""
    model = _model()
    mesh = sharding.mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    placed = rollouts.place_model(model, mesh)
    monkeypatch.undo()
    want, got = _params(model), _params(placed)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    leaves = jax.tree.leaves(nnx.split(placed)[1])
    assert leaves and all(x.sharding.mesh == mesh for x in leaves)


def _load_rl_mesh_module():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_rl_mesh.py")
    spec = importlib.util.spec_from_file_location("_rl_mesh_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_greedy_responses_on_eight_devices_equal_one_device(tmp_path):
    model = _model()
    np.savez(tmp_path / "params.npz", **_params(model))
    proc = _load_rl_mesh_module().spawn_on_eight_devices(__file__, str(tmp_path))
    want = {name: _generate(model, batch) for name, (_, batch, _) in CASES.items()}
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    got = json.loads((tmp_path / "rollouts.json").read_text())
    assert got["devices"] == 8
    print(f"8-device subprocess: {got['cpu_seconds']:.1f} CPU-s")
    for name, (_, batch, _) in CASES.items():
        assert got[name]["responses"] == want[name], name
        ways = 4 if name == "mixed" else 8
        rows = -(-batch // ways) * ways
        batches = -(-len(_prompts()) // batch)
        # every batch padded to a multiple of the row shards, each device holding its rows
        assert got[name]["seen"] == [[rows, rows // ways]] * batches, name
        assert max(got[name]["held"]) < 0.75, name                       # parameters sharded
    assert max(len(r) for r in want["mixed"]) == MAX_NEW


if __name__ == "__main__":   # the 8-device side of the test above
    assert jax.device_count() == 8, jax.devices()
    with np.load(os.path.join(sys.argv[1], "params.npz"), allow_pickle=False) as saved:
        model = _with_params(_model(), dict(saved))
    result = {"devices": jax.device_count()}
    for name, (block, batch, how) in CASES.items():
        seen: list = []
        rollouts.generate = _recording_generate(seen)
        mesh = sharding.mesh_from_config(block)
        responses = (_generate(model, batch, mesh) if how == "explicit"
                     else _generate(rollouts.place_model(model, mesh), batch))
        result[name] = {"responses": responses, "seen": [list(s[:2]) for s in seen],
                        "held": [s[2] for s in seen]}
    result["cpu_seconds"] = sum(os.times()[:2])
    with open(os.path.join(sys.argv[1], "rollouts.json"), "w") as f:
        json.dump(result, f)
