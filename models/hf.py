"""Hugging Face Qwen3 checkpoints <-> models.qwen3.Qwen3 (safetensors only).

A checkpoint directory holds config.json and either model.safetensors or
model-0000k-of-0000n.safetensors shards listed by model.safetensors.index.json.
Pickle-based files (*.bin, *.pt, *.pth, *.ckpt, *.pkl, *.pickle) are refused, never
opened; a file that is not valid safetensors (a pickle renamed, a truncated
export) raises ValueError naming it.

Name and layout map (torch Linear weights are [out, in]; ours are [in, ..., out]):

    model.embed_tokens.weight                 [V, E]      embed          [V, E]
    model.layers.{i}.input_layernorm.weight   [E]         input_norm     [E]
    ...self_attn.q_proj.weight                [H*D, E]    attn.q_proj    [E, H, D]
    ...self_attn.{k,v}_proj.weight            [K*D, E]    attn.{k,v}_proj [E, K, D]
    ...self_attn.o_proj.weight                [E, H*D]    attn.o_proj    [H, D, E]
    ...self_attn.{q,k}_norm.weight            [D]         attn.{q,k}_norm [D]
    ...post_attention_layernorm.weight        [E]         post_attn_norm [E]
    ...mlp.{gate,up}_proj.weight              [F, E]      mlp.*          [E, F]
    ...mlp.down_proj.weight                   [E, F]      mlp.down_proj  [F, E]
    model.norm.weight                         [E]         final_norm     [E]
    lm_head.weight (absent when tied)         [V, E]      lm_head        [E, V]

Every conversion is a reshape/transpose, so import -> export is bit-exact.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from models.qwen3 import Qwen3, Qwen3Config

__all__ = ["PICKLE_SUFFIXES", "TensorSpec", "tensor_specs", "to_hf_tensors",
           "assign_hf_tensors", "read_safetensors", "load_hf", "save_hf",
           "parse_size"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class TensorSpec(NamedTuple):
    """One HF tensor: where it lives in the model and how its layout maps."""
    path: tuple[str | int, ...]          # attribute path of the nnx.Param
    hf_shape: tuple[int, ...]
    from_hf: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def tensor_specs(config: Qwen3Config) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint for `config` must hold, in module order."""
    e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    same = (lambda w: w, lambda w: w)
    transposed = (lambda w: w.T, lambda w: w.T)

    def heads_in(n):   # [n*D, E] <-> [E, n, D]
        return (lambda w: w.reshape(n, d, e).transpose(2, 0, 1),
                lambda w: w.transpose(1, 2, 0).reshape(n * d, e))

    heads_out = (lambda w: w.reshape(e, h, d).transpose(1, 2, 0),   # [E, H*D] <-> [H, D, E]
                 lambda w: w.transpose(2, 0, 1).reshape(e, h * d))
    specs = {"model.embed_tokens.weight": TensorSpec(("embed",), (v, e), *same)}
    for i in range(config.num_layers):
        for name, path, shape, conv in [
                ("input_layernorm", ("input_norm", "scale"), (e,), same),
                ("self_attn.q_proj", ("attn", "q_proj"), (h * d, e), heads_in(h)),
                ("self_attn.k_proj", ("attn", "k_proj"), (k * d, e), heads_in(k)),
                ("self_attn.v_proj", ("attn", "v_proj"), (k * d, e), heads_in(k)),
                ("self_attn.o_proj", ("attn", "o_proj"), (e, h * d), heads_out),
                ("self_attn.q_norm", ("attn", "q_norm", "scale"), (d,), same),
                ("self_attn.k_norm", ("attn", "k_norm", "scale"), (d,), same),
                ("post_attention_layernorm", ("post_attn_norm", "scale"), (e,), same),
                ("mlp.gate_proj", ("mlp", "gate_proj"), (f, e), transposed),
                ("mlp.up_proj", ("mlp", "up_proj"), (f, e), transposed),
                ("mlp.down_proj", ("mlp", "down_proj"), (e, f), transposed)]:
            specs[f"model.layers.{i}.{name}.weight"] = TensorSpec(("layers", i) + path, shape,
                                                                  *conv)
    specs["model.norm.weight"] = TensorSpec(("final_norm", "scale"), (e,), *same)
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec(("lm_head",), (v, e), *transposed)
    return specs


def _param_at(model: Qwen3, path) -> nnx.Param:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def to_hf_tensors(model: Qwen3) -> dict[str, np.ndarray]:
    """The model's parameters under HF names and layouts (param dtype kept)."""
    return {name: np.ascontiguousarray(spec.to_hf(np.asarray(_param_at(model, spec.path)[...])))
            for name, spec in tensor_specs(model.config).items()}


def _check_tensors(config: Qwen3Config, tensors: Mapping[str, np.ndarray]) -> None:
    """Raise one error listing every missing, unexpected, mis-shaped or non-finite tensor
    (a NaN or Inf weight would load silently and poison every logit)."""
    specs = tensor_specs(config)
    problems = []
    for name, spec in specs.items():
        if name not in tensors:
            problems.append(f"  missing     {name}: expected {spec.hf_shape}")
        elif tuple(tensors[name].shape) != spec.hf_shape:
            problems.append(f"  wrong shape {name}: expected {spec.hf_shape}, "
                            f"found {tuple(tensors[name].shape)}")
    for name in sorted(set(tensors) - set(specs)):
        tied_copy = (name == "lm_head.weight" and config.tie_word_embeddings
                     and "model.embed_tokens.weight" in tensors
                     and np.array_equal(tensors[name], tensors["model.embed_tokens.weight"]))
        if not tied_copy:  # a tied checkpoint may repeat the embedding as lm_head
            problems.append(f"  unexpected  {name}: found {tuple(tensors[name].shape)}")
    for name in sorted(set(tensors) & set(specs)):
        if not np.issubdtype(tensors[name].dtype, np.floating) and \
                tensors[name].dtype != jnp.bfloat16:
            problems.append(f"  wrong dtype {name}: found {tensors[name].dtype}")
        elif tuple(tensors[name].shape) == specs[name].hf_shape:
            bad = int(np.size(tensors[name]) - np.count_nonzero(
                np.isfinite(np.asarray(tensors[name], dtype=np.float32))))
            if bad:
                problems.append(f"  non-finite  {name}: {bad} NaN/Inf value(s)")
    if problems:
        raise ValueError("checkpoint does not match the Qwen3 config "
                         f"({len(problems)} problem(s)):\n" + "\n".join(problems))


def assign_hf_tensors(model: Qwen3, tensors: Mapping[str, np.ndarray]) -> Qwen3:
    """Set every parameter of `model` from HF-named tensors (cast to param dtype)."""
    _check_tensors(model.config, tensors)
    dtype = model.config.weight_dtype
    for name, spec in tensor_specs(model.config).items():
        param = _param_at(model, spec.path)
        param.set_value(jnp.asarray(spec.from_hf(np.asarray(tensors[name])), dtype=dtype))
    return model


def _refuse_pickle(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"refusing to read {path!r}: pickle-based checkpoints "
                         f"({', '.join(PICKLE_SUFFIXES)}) can run arbitrary code; "
                         "convert it to safetensors first")


def _read_file(path: str) -> dict[str, np.ndarray]:
    _refuse_pickle(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    try:
        with safe_open(path, framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:   # the header is parsed, never unpickled
        raise ValueError(f"{path!r} is not a valid safetensors file ({err}); a renamed "
                         "pickle or a truncated export?") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint: a directory, a .safetensors file or an index."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, INDEX_NAME)):
            return read_safetensors(os.path.join(path, INDEX_NAME))
        found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if len(found) == 1:
            return _read_file(os.path.join(path, found[0]))
        pickles = sorted(n for n in os.listdir(path) if n.lower().endswith(PICKLE_SUFFIXES))
        if not found and pickles:
            _refuse_pickle(os.path.join(path, pickles[0]))
        raise FileNotFoundError(f"{path!r} holds {len(found)} *.safetensors files "
                                f"({found}) and no {INDEX_NAME}; expected exactly one")
    _refuse_pickle(path)
    if not path.endswith(".json"):
        return _read_file(path)
    with open(path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path!r} has no 'weight_map' object")
    root, tensors = os.path.dirname(path), {}
    for shard in sorted(set(weight_map.values())):
        _refuse_pickle(shard)
        for name, value in _read_file(os.path.join(root, shard)).items():
            if weight_map.get(name) != shard:
                raise ValueError(f"{shard}: tensor {name!r} is not mapped to it by {path!r}")
            tensors[name] = value
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise ValueError(f"{path!r} maps tensors that no shard holds: {absent}")
    return tensors


def load_hf(path: str, **config_overrides) -> Qwen3:
    """A Qwen3 from a HF directory (config.json + safetensors).

    `config_overrides` replace Qwen3Config fields (e.g. dtype='bfloat16').
    The model is built abstractly (no random init) and filled from the file.
    """
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path!r} is not a checkpoint directory")
    config_path = os.path.join(path, CONFIG_NAME)
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: malformed JSON ({err.msg} at line {err.lineno}, "
                         f"column {err.colno}); truncated?") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    config = Qwen3Config.from_hf_dict(raw, **config_overrides)
    tensors = read_safetensors(path)
    model = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
    return assign_hf_tensors(model, tensors)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB' (10^9) or '512MiB' (2^20)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)\s*", str(size), flags=re.I)
    if not m:
        raise ValueError(f"max_shard_size must be a positive int or e.g. '5GB', got {size!r}")
    unit = m.group(2).upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def save_hf(model: Qwen3, path: str, *, max_shard_size: int | str | None = None) -> list[str]:
    """Write config.json and the weights; returns the written file names.

    Without max_shard_size: one model.safetensors. With it: tensors are packed
    in module order into model-0000k-of-0000n.safetensors, each at most that
    many bytes unless a single tensor is larger, plus model.safetensors.index.json.
    """
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(model.config.to_hf_dict(), f, indent=2)
    tensors = to_hf_tensors(model)
    meta = {"format": "pt"}
    if max_shard_size is None:
        save_file(tensors, os.path.join(path, SINGLE_NAME), metadata=meta)
        return [CONFIG_NAME, SINGLE_NAME]
    limit, shards = parse_size(max_shard_size), [[]]
    used = 0
    for name, value in tensors.items():
        if shards[-1] and used + value.nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += value.nbytes
    weight_map, files = {}, []
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, os.path.join(path, fname), metadata=meta)
        weight_map.update({n: fname for n in names})
        files.append(fname)
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": weight_map}
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)
    return [CONFIG_NAME, *files, INDEX_NAME]
