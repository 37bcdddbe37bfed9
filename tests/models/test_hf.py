"""models/hf.py: parity with transformers, bit-exact round trips, clear refusals."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from models.hf import load_hf, parse_size, read_safetensors, save_hf, to_hf_tensors

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fixtures", "qwen3")


def _forward(graphdef):
    return jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, attention_mask=m))


def test_logits_match_transformers_on_padded_batch(qwen3_case):
    path, ref, model = qwen3_case
    graphdef, state = nnx.split(model)
    logits = np.asarray(_forward(graphdef)(state, ref["tokens"], ref["mask"]))
    real = ref["mask"].astype(bool)
    assert real.sum(1).tolist() == [12, 8, 9, 5] and not real.all(1)[1:].any()
    assert not real[1, 0] and not real[2, -1]            # row 1 left-, row 2 right-padded
    err = np.abs(logits[real] - ref["logits"][real]).max()
    assert err <= 1e-4, err
    assert np.abs(ref["logits"][real]).max() > 1.0       # references are not near zero


def _assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("max_shard_size", [None, "30KB"])
def test_import_export_import_is_bit_exact(qwen3_case, tmp_path, max_shard_size):
    path, _, model = qwen3_case
    files = save_hf(model, str(tmp_path), max_shard_size=max_shard_size)
    sharded = max_shard_size is not None
    assert ("model.safetensors.index.json" in files) == sharded
    if sharded:
        shards = [f for f in files if f.startswith("model-")]
        assert len(shards) >= 2
        for f in shards:   # each shard respects the limit unless one tensor is larger
            t = read_safetensors(str(tmp_path / f))
            assert len(t) == 1 or sum(v.nbytes for v in t.values()) <= 30_000
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(
            v.nbytes for v in read_safetensors(path).values())
    # Tensors written equal the original file's, byte for byte.
    _assert_same_tensors(read_safetensors(path), read_safetensors(str(tmp_path)))
    again = load_hf(str(tmp_path))
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(again, nnx.Param))):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
    model = load_hf(os.path.join(FIXTURES, "gqa_tied"), dtype="bfloat16", param_dtype="bfloat16")
    save_hf(model, str(tmp_path / "a"))
    again = load_hf(str(tmp_path / "a"))
    assert again.config.param_dtype == "bfloat16"
    first = to_hf_tensors(model)
    assert first["model.norm.weight"].dtype == jnp.bfloat16
    _assert_same_tensors(first, to_hf_tensors(again))


def _copy_with(tmp_path, edit, name="ckpt"):
    """A copy of the gqa_tied checkpoint whose tensors went through `edit`."""
    src = os.path.join(FIXTURES, "gqa_tied")
    dst = tmp_path / name
    dst.mkdir()
    shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
    tensors = read_safetensors(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_missing_tensor_is_named_with_its_shape(tmp_path):
    path = _copy_with(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"missing\s+model\.layers\.1\.self_attn\.k_norm"
                                         r"\.weight: expected \(16,\)"):
        load_hf(path)


def test_misshaped_and_unexpected_tensors_are_named(tmp_path):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = np.ascontiguousarray(
            t["model.layers.0.mlp.up_proj.weight"].T)
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError) as err:
        load_hf(_copy_with(tmp_path, edit))
    msg = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight: expected (64, 32), found (32, 64)" in msg
    assert "unexpected  model.layers.0.self_attn.q_proj.bias: found (64,)" in msg
    assert "2 problem(s)" in msg


def test_tied_checkpoint_may_repeat_the_embedding_only_verbatim(tmp_path):
    def same(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    def other(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1.0
    assert load_hf(_copy_with(tmp_path, same, "same")).lm_head is None
    with pytest.raises(ValueError, match="unexpected  lm_head.weight: found"):
        load_hf(_copy_with(tmp_path, other, "other"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "x.ckpt"])
def test_pickle_files_are_refused_unopened(tmp_path, name):
    shutil.copy(os.path.join(FIXTURES, "gqa_tied", "config.json"), tmp_path / "config.json")
    (tmp_path / name).write_bytes(b"not even a pickle")
    with pytest.raises(ValueError, match="pickle"):
        load_hf(str(tmp_path))
    with pytest.raises(ValueError, match="pickle"):
        read_safetensors(str(tmp_path / name))
    index = {"weight_map": {"model.embed_tokens.weight": name}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="pickle"):
        load_hf(str(tmp_path))


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    assert parse_size("1.5kb") == 1500
    for bad in ("5 parsecs", 0, -3, "GB", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_non_finite_weights_are_refused_by_name(tmp_path):
    def edit(t):
        w = t["model.layers.0.mlp.down_proj.weight"].copy()
        w[0, 0], w[1, 2] = np.nan, np.inf
        t["model.layers.0.mlp.down_proj.weight"] = w
        n = t["model.norm.weight"].copy()
        n[3] = -np.inf
        t["model.norm.weight"] = n
    with pytest.raises(ValueError) as err:
        load_hf(_copy_with(tmp_path, edit))
    msg = str(err.value)
    assert "non-finite  model.layers.0.mlp.down_proj.weight: 2 NaN/Inf value(s)" in msg
    assert "non-finite  model.norm.weight: 1 NaN/Inf value(s)" in msg
