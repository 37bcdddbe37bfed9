"""Device mesh, logical-axis rules, and helpers that place states and batches on a mesh.

One mesh with axes ``('data', 'fsdp', 'tensor')`` (DESIGN.md, Sharding). Parameters
carry logical axis names (``nnx.Param(..., out_sharding=('embed', 'mlp'))``); the
rules table maps each logical name to zero, one or several mesh axes::

    batch    -> ('data', 'fsdp')     rows of a batch (and of a KV cache)
    embed    -> 'fsdp'               hidden dimension of the weights (FSDP / ZeRO-3)
    vocab, heads, kv_heads, mlp -> 'tensor'   (Megatron-style tensor parallelism)
    length, head_dim, norm -> replicated

A dimension whose size is not divisible by its mesh axes stays replicated (e.g.
2 kv heads on a tensor axis of 4): ``logical_to_spec`` decides, and everything
else (state shardings, the memory estimate, ``constrain``) goes through it, so
the estimate and the arrays can never disagree.

The same code runs on one device (a 1x1x1 mesh: every spec is replicated), on 8
simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``),
on a GPU node or a TPU pod (``initialize_distributed`` first on every host).
There are no hand-written collectives: ``jax.jit`` propagates the input
shardings and XLA inserts the all-gathers / reduce-scatters.

Typical use::

    mesh = mesh_from_config(config.mesh)                      # sizes, -1 = the rest
    graphdef, state = create_train_state(model, optimizer, rng=0)
    shardings = state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step = jax.jit(make_train_step(...), out_shardings=(shardings, None), donate_argnums=0)
    state, metrics = step(state, shard_batch(batch, mesh))
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["MESH_AXES", "DEFAULT_RULES", "resolve_mesh_shape", "make_mesh", "mesh_from_config",
           "logical_to_spec", "state_shardings", "replicated", "batch_shardings", "shard_batch",
           "constrain", "activate", "initialize_distributed", "is_main_process",
           "MemoryEstimate", "tree_bytes_per_device", "held_bytes_per_device", "activation_bytes",
           "kv_cache_bytes", "estimate_memory", "abstract_train_state", "format_memory"]

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
}


# ----------------------------------------------------------------------------- mesh

def resolve_mesh_shape(*, data: int, fsdp: int, tensor: int, num_devices: int
                       ) -> tuple[int, int, int]:
    """Sizes of ('data', 'fsdp', 'tensor'); one size may be -1 for "the remaining devices".

    The product must equal ``num_devices``. Raises ValueError naming the bad size.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name}={size!r} must be an int >= 1 or -1 (the rest)")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh size may be -1, got -1 for {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"{num_devices} devices are not divisible by the fixed mesh sizes "
                             f"{sizes} (product {fixed})")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh sizes {sizes} multiply to {math.prod(sizes.values())}, "
                         f"but there are {num_devices} devices")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(*, data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types over ``devices`` (default: all).

    With all devices, ``jax.make_mesh`` orders them to follow the physical
    topology (ICI rings on TPU); an explicit ``devices`` list is used in order.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data=data, fsdp=fsdp, tensor=tensor, num_devices=len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)


def mesh_from_config(block: Mapping[str, Any] | None, *,
                     devices: Sequence[Any] | None = None) -> Mesh:
    """``make_mesh`` from a config block with keys data / fsdp / tensor (missing: 1, 1, -1).

    ``None`` (no mesh block) gives pure FSDP over every device, which is the
    1x1x1 mesh on a single device.
    """
    given = dict(block.items()) if block is not None else {}
    unknown = sorted(set(given) - {"data", "fsdp", "tensor"})
    if unknown:
        raise ValueError(f"unknown mesh key(s) {unknown}; known: ['data', 'fsdp', 'tensor']")
    return make_mesh(data=given.get("data", 1), fsdp=given.get("fsdp", -1),
                     tensor=given.get("tensor", 1), devices=devices)


# ----------------------------------------------------------------------------- rules

def _axes_size(mesh_shape: Mapping[str, int], axes: tuple[str, ...]) -> int:
    return math.prod(mesh_shape[a] for a in axes)


def logical_to_spec(logical: Sequence[str | None], *, shape: Sequence[int] | None = None,
                    mesh: Mesh | Any = None,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> PartitionSpec:
    """The ``PartitionSpec`` of an array whose dimensions carry ``logical`` names.

    Each name maps through ``rules`` (unknown names raise ValueError). With
    ``shape`` and ``mesh`` (a Mesh or AbstractMesh), a dimension not divisible by
    the product of its mesh-axis sizes is replicated instead, and mesh axes of
    size 1 are dropped; a mesh axis is never used by two dimensions (the first
    dimension keeps it).
    """
    if shape is not None and len(shape) != len(logical):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    sizes = dict(mesh.shape) if mesh is not None else None
    used: set[str] = set()
    out: list[Any] = []
    for dim, name in enumerate(logical):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        target = rules[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a not in used)
        if sizes is not None:
            unknown = [a for a in axes if a not in sizes]
            if unknown:
                raise ValueError(f"rule {name!r} -> {target!r} names mesh axes {unknown} "
                                 f"not in the mesh {tuple(sizes)}")
            axes = tuple(a for a in axes if sizes[a] > 1)
            if shape is not None and axes and shape[dim] % _axes_size(sizes, axes):
                axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(tree: Any, mesh: Mesh, *, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """A tree of ``NamedSharding`` with the structure of ``tree`` (e.g. a TrainState).

    Every ``nnx.Variable`` that carries logical names (``out_sharding`` metadata:
    the parameters and the optimiser moments that optax builds from them) is
    sharded by ``logical_to_spec``; every other leaf (step counters, PRNG keys,
    optimiser counts, algorithm extras) is replicated. ``tree`` may hold arrays
    or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``).
    """
    def one(var):
        if not _is_variable(var):
            return replicated(mesh)
        names = var.get_metadata().get("out_sharding")
        value = var.get_value()
        if names is None:
            sharding = replicated(mesh)
        else:
            sharding = NamedSharding(mesh, logical_to_spec(names, shape=np.shape(value),
                                                           mesh=mesh, rules=rules))
        return jax.tree.map(lambda _: sharding, var)

    return jax.tree.map(one, tree, is_leaf=_is_variable)


# ----------------------------------------------------------------------------- batches

def batch_shardings(batch: Any, mesh: Mesh, *, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """Shardings that split every leaf [B, ...] of ``batch`` over ``rules['batch']``.

    A 0-d leaf (a per-batch scalar, e.g. a flag) has no rows and is replicated.
    Raises ValueError naming the leaf when B is not divisible by the batch-axes
    size (replicating a batch silently would multiply the work per device).
    """
    target = rules["batch"]
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    ways = _axes_size(mesh.shape, axes)

    def one(path, x):
        if np.ndim(x) == 0:
            return NamedSharding(mesh, PartitionSpec())
        if np.shape(x)[0] % ways:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} of shape {np.shape(x)} "
                             f"cannot be split over mesh axes {axes} ({ways} ways)")
        return NamedSharding(mesh, PartitionSpec(axes or None))

    return jax.tree_util.tree_map_with_path(one, batch)


def shard_batch(batch: Any, mesh: Mesh, *, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """Place a host batch on ``mesh``, rows split over the batch axes.

    One process: ``batch`` is the global batch. Several processes (multi-host):
    ``batch`` is this process's rows (e.g. from a grain loader with
    ``ShardByJaxProcess``) and the global array is assembled without copying
    between hosts (``jax.make_array_from_process_local_data``).
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, batch_shardings(batch, mesh, rules=rules))
    local = jax.tree.map(np.asarray, batch)
    global_shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(), *x.shape[1:]),
                                       x.dtype), local)
    shardings = batch_shardings(global_shapes, mesh, rules=rules)
    return jax.tree.map(
        lambda s, x, g: jax.make_array_from_process_local_data(s, x, g.shape),
        shardings, local, global_shapes)


# ----------------------------------------------------------------------------- activations

_ACTIVE: list[tuple[Mesh, Mapping[str, Any]]] = []


@contextlib.contextmanager
def activate(mesh: Mesh, *, rules: Mapping[str, Any] = DEFAULT_RULES):
    """Within this context (also while tracing under ``jax.jit``), ``constrain`` acts on ``mesh``.

    It also sets ``jax.set_mesh(mesh)``, so the mesh is part of what jit traces
    under (a function traced outside the context is traced again inside it).
    """
    _ACTIVE.append((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to its logical axes; a no-op without a mesh.

    Outside ``activate(mesh)`` (or on a mesh of one device) ``x`` is returned
    unchanged, so model code may call it unconditionally, e.g.
    ``x = constrain(x, ('batch', 'length', 'embed'))``.
    """
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    if mesh.size == 1:
        return x
    spec = logical_to_spec(logical, shape=np.shape(x), mesh=mesh, rules=rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ----------------------------------------------------------------------------- multi-host

def initialize_distributed(block: Mapping[str, Any] | None) -> bool:
    """``jax.distributed.initialize(**kwargs)`` when ``block.enabled`` (call before any jax use).

    ``block`` keys: enabled (bool), and optionally coordinator_address,
    num_processes, process_id (left out on TPU pods and SLURM, where JAX finds
    them). Returns True when it initialised.
    """
    if block is None or not block.get("enabled", False):
        return False
    kwargs = {k: block[k] for k in ("coordinator_address", "num_processes", "process_id")
              if block.get(k) is not None}
    jax.distributed.initialize(**kwargs)
    return True


def is_main_process() -> bool:
    """True on process 0, the only one that writes logs, plots and checkpoint metadata."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- memory

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
