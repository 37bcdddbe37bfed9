"""Device mesh, logical-axis rules, and helpers that place states and batches on a mesh.

One mesh with axes ``('data', 'fsdp', 'tensor')`` (docs/design.md, Sharding). Parameters
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
    state, shardings = place_state(state, mesh)               # by the logical-axis rules
    step = jit_train_step(make_train_step(...), shardings)    # out_shardings, donation
    batch = pad_rows(batch, batch_ways(mesh))                 # all-masked rows, if needed
    state, metrics = step(state, shard_batch(batch, mesh))
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["MESH_AXES", "DEFAULT_RULES", "resolve_mesh_shape", "make_mesh", "mesh_from_config",
           "logical_to_spec", "state_shardings", "replicated", "put_global", "place_state",
           "jit_train_step", "batch_ways", "pad_rows", "batch_shardings", "shard_batch", "to_host",
           "constrain", "activate", "initialize_distributed", "is_main_process",
           "sync_processes"]

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


def put_global(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also works on several processes.

    One process: ``device_put``. Several processes (multi-host), where a
    sharding spans other hosts' devices: every process must pass the same
    global value; a leaf already on its sharding is kept, any other leaf goes
    through host memory and each process builds only the shards of its own
    devices (``jax.make_array_from_callback``; PRNG keys via their key data).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            impl, data = jax.random.key_impl(x), _global_value(jax.random.key_data(x))
            spec = PartitionSpec(*s.spec, *([None] * (data.ndim - np.ndim(x))))
            placed = jax.make_array_from_callback(data.shape, NamedSharding(s.mesh, spec),
                                                  lambda i: data[i])
            return jax.random.wrap_key_data(placed, impl=impl)
        value = _global_value(x)
        return jax.make_array_from_callback(value.shape, s, lambda i: value[i])

    return jax.tree.map(one, tree, shardings)


def _global_value(x: Any) -> np.ndarray:
    """The whole value of ``x`` on this host (a gather when it spans other hosts)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-host only)

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def place_state(state: Any, mesh: Mesh, *, rules: Mapping[str, Any] = DEFAULT_RULES
                ) -> tuple[Any, Any]:
    """(state on ``mesh``, its shardings): every leaf copied into a buffer of its own
    (a train step donates its input state, and a fresh TrainState may share
    buffers) and placed by ``state_shardings`` (``put_global``: on several hosts
    every process passes the same state, e.g. built from the same seed). On a
    1x1x1 mesh this is a copy."""
    shardings = state_shardings(state, mesh, rules=rules)
    return put_global(jax.tree.map(lambda x: x.copy(), state), shardings), shardings


def jit_train_step(step: Any, shardings: Any) -> Any:
    """``jax.jit`` of a pure ``step(state, batch) -> (state, metrics)`` that keeps the
    state on ``shardings`` (``out_shardings``) and donates the input state."""
    return jax.jit(step, out_shardings=(shardings, None), donate_argnums=0)


# ----------------------------------------------------------------------------- batches

def _batch_axes(mesh: Mesh, rules: Mapping[str, Any]) -> tuple[str, ...]:
    target = rules["batch"]
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    return tuple(a for a in axes if mesh.shape[a] > 1)


def batch_ways(mesh: Mesh, *, rules: Mapping[str, Any] = DEFAULT_RULES) -> int:
    """Number of row shards of a batch on ``mesh`` (``data x fsdp`` by default): the
    rows of every sharded batch must be a multiple of it (see ``pad_rows``)."""
    return _axes_size(mesh.shape, _batch_axes(mesh, rules))


def pad_rows(batch: Mapping[str, Any], multiple: int, *,
             fill: Mapping[str, Any] | None = None) -> Any:
    """``batch`` with rows appended up to a multiple of ``multiple`` rows.

    An appended row of leaf ``k`` is ``fill[k]`` everywhere (default 0: zero ids
    and all-False masks). Callers choose fills that give the rows zero weight
    (no loss tokens, e.g. ``fill={'grades': -1}`` for unlabelled positions), so
    the loss, its gradient and the masked metrics equal the original batch's.
    0-d leaves (per-batch scalars) have no rows and are kept. ``batch`` itself
    is returned when no row is needed.
    """
    rows = {np.shape(v)[0] for v in batch.values() if np.ndim(v) > 0}
    if len(rows) != 1:
        raise ValueError(f"batch leaves disagree on their number of rows: {sorted(rows)}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple={multiple!r} must be an int >= 1")
    extra = -rows.pop() % multiple
    if extra == 0:
        return batch
    fill = dict(fill or {})
    unknown = sorted(set(fill) - set(batch))
    if unknown:
        raise ValueError(f"fill names keys {unknown} that the batch does not have")
    return {k: v if np.ndim(v) == 0 else np.concatenate(
        [v, np.full((extra, *np.shape(v)[1:]), fill.get(k, 0), np.asarray(v).dtype)])
        for k, v in batch.items()}


def batch_shardings(batch: Any, mesh: Mesh, *, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """Shardings that split every leaf [B, ...] of ``batch`` over ``rules['batch']``.

    A 0-d leaf (a per-batch scalar, e.g. a flag) has no rows and is replicated.
    Raises ValueError naming the leaf when B is not divisible by the batch-axes
    size (replicating a batch silently would multiply the work per device).
    """
    axes = _batch_axes(mesh, rules)
    ways = _axes_size(mesh.shape, axes)

    def one(path, x):
        if np.ndim(x) == 0:
            return NamedSharding(mesh, PartitionSpec())
        if np.shape(x)[0] % ways:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} of shape {np.shape(x)} "
                             f"cannot be split over mesh axes {axes} ({ways} ways)")
        return NamedSharding(mesh, PartitionSpec(axes or None))

    return jax.tree_util.tree_map_with_path(one, batch)


def shard_batch(batch: Any, mesh: Mesh, *, rules: Mapping[str, Any] = DEFAULT_RULES,
                process_local: bool = True) -> Any:
    """Place a host batch on ``mesh``, rows split over the batch axes.

    One process: ``batch`` is the global batch. Several processes (multi-host):
    with ``process_local=True``, ``batch`` is this process's rows (e.g. from a
    grain loader with ``ShardByJaxProcess``) and the global array is assembled
    without copying between hosts (``jax.make_array_from_process_local_data``);
    with ``process_local=False`` every process holds the whole global batch
    (e.g. RL rollouts, gathered on every host) and places only the rows of its
    own devices.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, batch_shardings(batch, mesh, rules=rules))
    if not process_local:
        full = jax.tree.map(np.asarray, batch)
        return jax.tree.map(lambda s, x: jax.make_array_from_callback(x.shape, s,
                                                                      lambda i: x[i]),
                            batch_shardings(full, mesh, rules=rules), full)
    local = jax.tree.map(np.asarray, batch)
    global_shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(), *x.shape[1:]),
                                       x.dtype), local)
    shardings = batch_shardings(global_shapes, mesh, rules=rules)
    return jax.tree.map(
        lambda s, x, g: jax.make_array_from_process_local_data(s, x, g.shape),
        shardings, local, global_shapes)


def to_host(x: Any) -> Any:
    """The whole value of every jax.Array of ``x`` as numpy, on every process.

    One process: ``np.asarray``. Several processes: an array that is not fully
    addressable (sharded over other hosts' devices) is gathered
    (``multihost_utils.process_allgather``, a collective: every process must call it).
    """
    return jax.tree.map(np.asarray if jax.process_count() == 1 else _global_value, x)


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
    them). Returns True when this call initialised (False when disabled, or when
    JAX's distributed runtime is already up).
    """
    if block is None or not block.get("enabled", False):
        return False
    if jax.distributed.is_initialized():   # several entry points may call this
        return False
    kwargs = {k: block[k] for k in ("coordinator_address", "num_processes", "process_id")
              if block.get(k) is not None}
    jax.distributed.initialize(**kwargs)
    return True


def is_main_process() -> bool:
    """True on process 0, the only one that writes logs, plots and checkpoint metadata."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Wait until every process reaches the barrier ``name``; a no-op on one process.

    Used after process 0 writes a file that the other processes read next (a
    stage's outputs and ``done.json``), with ``run_dir`` on a filesystem that
    every host shares.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-host only)

        multihost_utils.sync_global_devices(name)
