"""Per-device memory estimate of a train step and of sampling on a mesh (models/sharding.py).

Parameters, optimiser state and the other TrainState leaves are counted from the
shard shapes of the actual shardings (``sharding.state_shardings``), so the
estimate and the arrays cannot disagree; activations and the KV cache come from
the model config. Works on an ``AbstractMesh`` and on ShapeDtypeStructs, so a
pod's figures are computed on a laptop. Every name here is also an attribute
of ``models.sharding``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from models.sharding import DEFAULT_RULES, _axes_size, logical_to_spec

__all__ = ["MemoryEstimate", "tree_bytes_per_device", "held_bytes_per_device",
           "activation_bytes", "kv_cache_bytes", "estimate_memory", "abstract_train_state",
           "format_memory"]


class MemoryEstimate(NamedTuple):
    """Bytes per device. params / opt_state / gradients / other come from the actual
    shardings (``state_shardings``); activations and kv_cache from the model config
    (see ``activation_bytes`` and ``kv_cache_bytes``)."""
    params: int
    opt_state: int
    gradients: int
    other: int
    activations: int
    kv_cache: int

    @property
    def total(self) -> int:
        return sum(self)


def _leaf_bytes(shape: Sequence[int], dtype: Any) -> int:
    if jax.numpy.issubdtype(dtype, jax.dtypes.prng_key):
        return math.prod(shape) * 8          # a threefry key is two uint32 words
    return math.prod(shape) * np.dtype(dtype).itemsize


def tree_bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds when ``tree`` (arrays or ShapeDtypeStructs) is placed
    with ``shardings`` (same structure): sum of ``prod(shard_shape) * itemsize``."""
    leaves = jax.tree.leaves(tree)
    sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
    if len(leaves) != len(sharding_leaves):
        raise ValueError(f"tree has {len(leaves)} leaves but shardings {len(sharding_leaves)}")
    return sum(_leaf_bytes(s.shard_shape(np.shape(x)), x.dtype)
               for x, s in zip(leaves, sharding_leaves, strict=True))


def held_bytes_per_device(tree: Any) -> int:
    """The most bytes any one device actually holds of ``tree``'s jax.Arrays (its
    addressable shards): the measured counterpart of ``tree_bytes_per_device``."""
    held: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + _leaf_bytes(shard.data.shape,
                                                                         shard.data.dtype)
    return max(held.values(), default=0)


def _split(size: int, logical: str, mesh: Mesh | Any, rules: Mapping[str, Any]) -> float:
    """``size`` divided by the mesh ways ``logical`` is sharded (1 when not divisible)."""
    spec = logical_to_spec((logical,), shape=(size,), mesh=mesh, rules=rules)
    axes = () if not spec or spec[0] is None else (
        (spec[0],) if isinstance(spec[0], str) else tuple(spec[0]))
    return size / _axes_size(dict(mesh.shape), axes)


def activation_bytes(config: Any, *, batch_size: int, seq_len: int, mesh: Mesh | Any,
                     rules: Mapping[str, Any] = DEFAULT_RULES) -> int:
    """Rough activations one device keeps for the backward pass (no rematerialisation).

    With b = rows per device, T = seq_len, c = compute-dtype bytes, and E, F, H, K,
    D, V, L the model sizes (H, K, F, V divided by the tensor ways that apply)::

        per layer: b T c (4 E + 2 (H + 2K) D + H D + 4 F)      norms, q/k/v, output, MLP
                 + b H T^2 (4 + c)                             scores (f32) and probs
        logits:    2 b T V 4                                   f32 logits and their gradient

    An upper-bound style estimate: XLA fusion usually keeps less.
    """
    c = np.dtype(config.compute_dtype).itemsize
    b = _split(batch_size, "batch", mesh, rules)
    e, d, layers = config.hidden_size, config.head_dim, config.num_layers
    h = _split(config.num_heads, "heads", mesh, rules)
    k = _split(config.num_kv_heads, "kv_heads", mesh, rules)
    f = _split(config.intermediate_size, "mlp", mesh, rules)
    v = _split(config.vocab_size, "vocab", mesh, rules)
    per_layer = b * seq_len * c * (4 * e + 2 * (h + 2 * k) * d + h * d + 4 * f) \
        + b * h * seq_len ** 2 * (4 + c)
    return int(layers * per_layer + 2 * b * seq_len * v * 4)


def kv_cache_bytes(config: Any, *, batch_size: int, max_length: int, mesh: Mesh | Any,
                   rules: Mapping[str, Any] = DEFAULT_RULES) -> int:
    """KV cache per device: ``2 L b K D S c`` (keys and values of every layer), rows split
    over the batch axes and kv heads over the tensor axis (when divisible)."""
    c = np.dtype(config.compute_dtype).itemsize
    b = _split(batch_size, "batch", mesh, rules)
    k = _split(config.num_kv_heads, "kv_heads", mesh, rules)
    return int(2 * config.num_layers * b * k * config.head_dim * max_length * c)


def estimate_memory(state: Any, shardings: Any, config: Any, mesh: Mesh | Any, *,
                    batch_size: int, seq_len: int, num_microbatches: int = 1,
                    sample_batch: int = 0, sample_length: int = 0,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> MemoryEstimate:
    """Per-device memory of a train step and of sampling, before anything is allocated.

    ``state``: a TrainState of arrays or ShapeDtypeStructs (``abstract_train_state``);
    ``shardings``: ``state_shardings(state, mesh)`` (``mesh`` may be an AbstractMesh,
    so a pod's figures can be computed on a laptop). Gradients are float32 copies
    of the parameters (two with micro-batches: the running sum and the current one).
    Activations are for one micro-batch of ``batch_size // num_microbatches`` rows.
    """
    if batch_size % num_microbatches:
        raise ValueError(f"batch_size={batch_size} is not divisible by "
                         f"num_microbatches={num_microbatches}")
    params = tree_bytes_per_device(state.params, shardings.params)
    grads_f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32),
                             state.params)
    grads = tree_bytes_per_device(grads_f32, shardings.params) * (2 if num_microbatches > 1
                                                                  else 1)
    opt = tree_bytes_per_device(state.opt_state, shardings.opt_state)
    other = sum(tree_bytes_per_device(getattr(state, f), getattr(shardings, f))
                for f in ("non_trainable", "step", "rng", "skipped_total",
                          "skipped_consecutive", "extra"))
    acts = activation_bytes(config, batch_size=batch_size // num_microbatches,
                            seq_len=seq_len, mesh=mesh, rules=rules)
    kv = kv_cache_bytes(config, batch_size=sample_batch, max_length=sample_length,
                        mesh=mesh, rules=rules) if sample_batch else 0
    return MemoryEstimate(params, opt, grads, other, acts, kv)


def abstract_train_state(model_config: Any, optimizer: Any, *, extra: Any = None) -> Any:
    """The TrainState of a fresh ``Qwen3(model_config)`` as ShapeDtypeStructs (no allocation)."""
    from models.qwen3 import Qwen3                      # noqa: PLC0415 (qwen3 may import us)
    from models.training import create_train_state      # noqa: PLC0415

    def build():
        model = Qwen3(model_config, rngs=nnx.Rngs(0))
        return create_train_state(model, optimizer, rng=0, extra=extra)[1]

    return jax.eval_shape(build)


def format_memory(estimate: MemoryEstimate, *, mesh_shape: Mapping[str, int] | None = None,
                  device_bytes: int | None = None) -> str:
    """One human-readable line per component, in GiB, with the total (and the device size)."""
    gib = 2.0 ** 30
    head = "memory estimate per device" + (f" on mesh {dict(mesh_shape)}" if mesh_shape else "")
    rows = [f"  {name:<12}{value / gib:9.3f} GiB" for name, value in estimate._asdict().items()]
    total = f"  {'total':<12}{estimate.total / gib:9.3f} GiB"
    if device_bytes:
        total += f" of {device_bytes / gib:.1f} GiB ({100 * estimate.total / device_bytes:.0f}%)"
    return "\n".join([head, *rows, total])
