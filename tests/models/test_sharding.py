"""models/sharding.py on one device: mesh sizes, the rules table, shardings of a
TrainState, batches, the no-op constraint and the memory estimate (hand-computed
on abstract 2x2x2 meshes). The 8-device cases live in test_sharding_mesh.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from models import sharding as sh
from models import sharding_memory as shm
from models.qwen3 import Qwen3, preset
from models.optim import default_optimizer_config, make_optimizer
from models.training import create_train_state


def abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), sh.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny", vocab_size=32)     # E 64, F 192, H 4, K 2, D 16, 2 layers
    optimizer, _ = make_optimizer(default_optimizer_config())
    graphdef, state = create_train_state(Qwen3(cfg, rngs=nnx.Rngs(0)), optimizer, rng=0)
    return cfg, optimizer, state


@pytest.mark.parametrize("sizes,devices,want", [
    ((1, -1, 1), 8, (1, 8, 1)), ((2, 2, -1), 8, (2, 2, 2)), ((-1, 1, 4), 8, (2, 1, 4)),
    ((1, 1, 1), 1, (1, 1, 1)), ((4, 4, 2), 32, (4, 4, 2))])
def test_mesh_shape_fills_the_minus_one(sizes, devices, want):
    data, fsdp, tensor = sizes
    assert sh.resolve_mesh_shape(data=data, fsdp=fsdp, tensor=tensor,
                                 num_devices=devices) == want


@pytest.mark.parametrize("sizes,match", [
    ((-1, -1, 1), "only one mesh size"), ((3, -1, 1), "not divisible"),
    ((2, 2, 1), "multiply to 4"), ((0, 1, 8), "mesh.data=0"), ((1, 2.0, 4), "mesh.fsdp=2.0")])
def test_mesh_shape_errors_name_the_value(sizes, match):
    data, fsdp, tensor = sizes
    with pytest.raises(ValueError, match=match):
        sh.resolve_mesh_shape(data=data, fsdp=fsdp, tensor=tensor, num_devices=8)


def test_mesh_from_config_on_one_device():
    mesh = sh.mesh_from_config(None)
    assert mesh.axis_names == sh.MESH_AXES and tuple(mesh.shape.values()) == (1, 1, 1)
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert sh.mesh_from_config({"data": -1, "fsdp": 1}).shape["data"] == 1
    with pytest.raises(ValueError, match="unknown mesh key"):
        sh.mesh_from_config({"model": 2})


def test_rules_map_logical_names_to_mesh_axes():
    mesh = abstract_mesh(2, 2, 2)
    assert sh.logical_to_spec(("embed", "mlp"), shape=(64, 192), mesh=mesh) == P("fsdp", "tensor")
    assert sh.logical_to_spec(("batch", "length", "embed"), shape=(8, 5, 64), mesh=mesh) \
        == P(("data", "fsdp"))   # fsdp taken by batch first; embed then replicated
    assert sh.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")   # no mesh: the rules
    # Not divisible -> replicated; size-1 mesh axes are dropped.
    assert sh.logical_to_spec(("embed", "kv_heads", "head_dim"), shape=(64, 2, 16),
                              mesh=abstract_mesh(1, 2, 4)) == P("fsdp")
    assert sh.logical_to_spec(("batch",), shape=(6,), mesh=abstract_mesh(1, 3, 2)) == P("fsdp")
    assert sh.logical_to_spec(("norm",), shape=(64,), mesh=mesh) == P()
    with pytest.raises(ValueError, match="'experts' has no rule"):
        sh.logical_to_spec(("experts",))
    with pytest.raises(ValueError, match="do not match shape"):
        sh.logical_to_spec(("embed",), shape=(2, 3), mesh=mesh)
    with pytest.raises(ValueError, match=r"mesh axes \['model'\]"):
        sh.logical_to_spec(("embed",), shape=(4,), mesh=mesh, rules={"embed": "model"})


def test_state_shardings_follow_the_param_names(tiny):
    cfg, _, state = tiny
    mesh = sh.mesh_from_config(None)
    shardings = sh.state_shardings(state, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    placed = jax.device_put(state, shardings)
    assert all(x.sharding.spec == P() for x in jax.tree.leaves(placed))   # 1x1x1: replicated
    # On an abstract 2x2x2 mesh the same state gets the rules' specs, moments included.
    big = sh.state_shardings(state, abstract_mesh(2, 2, 2))
    up = big.params["layers"][0]["mlp"]["up_proj"].get_value()
    assert up.spec == P("fsdp", "tensor")
    mu = big.opt_state[1][0].mu["layers"][0]["attn"]["q_proj"].get_value()
    assert mu.spec == P("fsdp", "tensor")
    assert big.step.spec == P() and big.params["final_norm"]["scale"].get_value().spec == P()


def test_batch_sharding_splits_rows_or_names_the_leaf():
    mesh = abstract_mesh(2, 2, 2)
    specs = sh.batch_shardings({"tokens": np.zeros((8, 3)), "w": np.zeros((4,))}, mesh)
    assert specs["tokens"].spec == P(("data", "fsdp")) == specs["w"].spec
    with pytest.raises(ValueError, match=r"\['tokens'\] of shape \(6, 3\)"):
        sh.batch_shardings({"tokens": np.zeros((6, 3))}, mesh)
    one = sh.shard_batch({"tokens": np.arange(6).reshape(3, 2)}, sh.mesh_from_config(None))
    np.testing.assert_array_equal(np.asarray(one["tokens"]), np.arange(6).reshape(3, 2))


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.arange(6.0).reshape(1, 2, 3)
    assert sh.constrain(x, ("batch", "length", "embed")) is x
    with sh.activate(sh.mesh_from_config(None)):
        assert sh.constrain(x, ("batch", "length", "embed")) is x
        out = jax.jit(lambda y: sh.constrain(y * 2, ("batch", "length", "embed")))(x)
    np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(x))
    assert not sh._ACTIVE


def test_distributed_only_when_enabled():
    assert sh.initialize_distributed(None) is False
    assert sh.initialize_distributed({"enabled": False, "num_processes": 4}) is False
    assert sh.is_main_process()


def test_tree_bytes_match_held_bytes_on_one_device(tiny):
    _, _, state = tiny
    mesh = sh.mesh_from_config(None)
    placed = jax.device_put(state, sh.state_shardings(state, mesh))
    for part in ("params", "opt_state"):
        assert shm.tree_bytes_per_device(getattr(state, part),
                                        getattr(sh.state_shardings(state, mesh), part)) \
            == shm.held_bytes_per_device(getattr(placed, part))


def test_param_and_optimizer_bytes_by_hand_on_2x2x2(tiny):
    cfg, optimizer, _ = tiny
    abstract = shm.abstract_train_state(cfg, optimizer)
    mesh = abstract_mesh(2, 2, 2)
    est = shm.estimate_memory(abstract, sh.state_shardings(abstract, mesh), cfg, mesh,
                             batch_size=4, seq_len=8)
    # Per device, float32: embed [32/2, 64/2]; per layer q [32,2,16], k/v [32,1,16]
    # (2 kv heads / tensor 2), o [2,16,32], gate/up [32,96], down [96,32]; norms whole:
    # q_norm/k_norm 16 each, input/post norms 64 each; final norm 64.
    layer = 32 * 2 * 16 + 2 * 32 * 1 * 16 + 2 * 16 * 32 + 3 * 32 * 96 + 2 * 16 + 2 * 64
    params = 4 * (16 * 32 + cfg.num_layers * layer + 64)
    assert est.params == params
    assert est.gradients == params                    # float32 params: same bytes
    # AdamW: mu and nu like the params, plus int32 counts (clip has none; adam 1, schedule 1).
    assert est.opt_state == 2 * params + 4 * 2
    assert est.other == 4 * 3 + 8                      # step + 2 skip counters, one key


def test_activation_and_kv_bytes_by_hand():
    cfg = preset("tiny", vocab_size=32)
    mesh = abstract_mesh(1, 2, 2)
    b, t = 4 // 2, 8
    e, d, f, h, k, v = 64, 16, 192 // 2, 4 // 2, 2 // 2, 32 // 2
    per_layer = b * t * 4 * (4 * e + 2 * (h + 2 * k) * d + h * d + 4 * f) + b * h * t * t * 8
    assert shm.activation_bytes(cfg, batch_size=4, seq_len=t, mesh=mesh) \
        == 2 * per_layer + 2 * b * t * v * 4
    assert shm.kv_cache_bytes(cfg, batch_size=6, max_length=10, mesh=mesh) \
        == 2 * 2 * 3 * 1 * 16 * 10 * 4
    # 3 rows do not split 2 ways: the cache stays whole on each device.
    assert shm.kv_cache_bytes(cfg, batch_size=3, max_length=10, mesh=mesh) \
        == 2 * 2 * 3 * 1 * 16 * 10 * 4
    est = shm.MemoryEstimate(1, 2, 3, 4, 5, 6)
    assert est.total == 21
    text = shm.format_memory(shm.MemoryEstimate(2**30, 0, 0, 0, 0, 2**29), mesh_shape=mesh.shape,
                            device_bytes=3 * 2**30)
    lines = [line.split() for line in text.splitlines()]
    assert lines[1] == ["params", "1.000", "GiB"] and lines[6] == ["kv_cache", "0.500", "GiB"]
    assert lines[-1] == ["total", "1.500", "GiB", "of", "3.0", "GiB", "(50%)"]
    assert math.isclose(shm.MemoryEstimate(*[2**30] * 6).total / 2**30, 6.0)


def test_scale_configs_resolve_and_estimate_by_hand(monkeypatch):
    # sizes only: the local checkpoint and data files are not needed here
    from experiments.extra_cot.configs import pipeline_blocks
    monkeypatch.setattr(pipeline_blocks, "_check_local_files", lambda config: None)
    monkeypatch.setattr(pipeline_blocks.os.path, "isfile", lambda path: True)
    from experiments import cli
    from experiments.extra_cot.configs import scale as scale_common
    for target, spec in scale_common.TARGETS.items():
        c = cli.parse([f"--config=experiments/extra_cot/configs/scale.py:{target}"])   # validates
        assert c.to_dict() == scale_common.scale_config(target).to_dict()
        shape = sh.resolve_mesh_shape(**c.mesh.to_dict(), num_devices=spec["devices"])
        assert math.prod(shape) == spec["devices"]
        assert c.distributed.enabled == (spec["hosts"] > 1)
    row = scale_common.memory_rows("8xh100")        # fsdp 8, bfloat16 Qwen3-1.7B
    e, f, h, k, d, v, layers = 2048, 6144, 16, 8, 128, 151936, 28
    matrices = v * e + layers * (2 * e * h * d + 2 * e * k * d + 3 * e * f)
    norms = layers * (2 * d + 2 * e) + e               # 'norm' is replicated
    assert row["sft"].params == 2 * (matrices // 8 + norms)
    assert row["sft"].opt_state == 2 * row["sft"].params + 8
    with pytest.raises(ValueError, match="unknown scale target"):
        scale_common.scale_config("v3-8")
    with pytest.raises(cli.ConfigError, match=r"scale.py:v3-8: the argument must be a scale "
                                              r"target, one of \['8xh100', 'v4-32', 'v5p-8'\]"):
        cli.parse(["--config=experiments/extra_cot/configs/scale.py:v3-8"])


def test_a_scalar_batch_leaf_is_replicated():
    mesh = sh.make_mesh(fsdp=-1)
    batch = {"tokens": np.zeros((4, 3), np.int32), "flag": np.float32(1.0)}
    out = sh.batch_shardings(batch, mesh)
    assert out["flag"].spec == P()
    placed = sh.shard_batch(batch, mesh)
    assert placed["flag"].shape == () and placed["tokens"].shape == (4, 3)


def test_pad_rows_fills_up_to_the_row_shards():
    batch = {"tokens": np.arange(6, dtype=np.int32).reshape(3, 2),
             "grades": np.ones((3, 2), np.int32), "flag": np.float32(2.0)}
    assert sh.batch_ways(abstract_mesh(2, 2, 2)) == 4 and sh.batch_ways(abstract_mesh(1, 1, 8)) == 1
    out = sh.pad_rows(batch, sh.batch_ways(abstract_mesh(2, 2, 2)), fill={"grades": -1})
    np.testing.assert_array_equal(out["tokens"], [[0, 1], [2, 3], [4, 5], [0, 0]])
    np.testing.assert_array_equal(out["grades"][3], [-1, -1])
    assert out["grades"].dtype == np.int32 and out["flag"] == 2.0
    assert sh.pad_rows(out, 4) is out and sh.pad_rows(batch, 1) is batch
    with pytest.raises(ValueError, match="disagree on their number of rows"):
        sh.pad_rows({"a": np.zeros((3, 1)), "b": np.zeros((2, 1))}, 4)
    with pytest.raises(ValueError, match=r"fill names keys \['mask'\]"):
        sh.pad_rows(batch, 4, fill={"mask": False})
    with pytest.raises(ValueError, match="multiple=0"):
        sh.pad_rows(batch, 0)


def test_place_state_gives_fresh_buffers_on_the_mesh(tiny):
    _, _, state = tiny
    mesh = sh.mesh_from_config(None)
    placed, shardings = sh.place_state(state, mesh)
    leaves, placed_leaves = jax.tree.leaves(state), jax.tree.leaves(placed)
    assert all(a is not b for a, b in zip(leaves, placed_leaves, strict=True))
    assert all(x.sharding == s for x, s in zip(placed_leaves, jax.tree.leaves(shardings)))
    step = sh.jit_train_step(lambda s, b: (jax.tree.map(lambda x: x, s), {"b": b}), shardings)
    out, metrics = step(placed, 3.0)
    assert float(metrics["b"]) == 3.0 and placed_leaves[0].is_deleted()   # donated
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(out)[0]), np.asarray(leaves[0]))


def test_to_host_on_one_process():
    x = {"a": jnp.arange(4.0), "b": np.int32(3)}
    out = sh.to_host(x)
    assert isinstance(out["a"], np.ndarray) and out["a"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert int(out["b"]) == 3
