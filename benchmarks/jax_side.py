"""JAX-side helpers of the benchmarks: shared weights, the optimiser, compiling a train step.

Both sides load the same weights: the driver writes a randomly initialised
``models.qwen3.Qwen3`` of a benchmark size with ``models.hf.save_hf`` and each
worker reads that directory (``load_hf`` here, ``from_pretrained`` on the torch
side), so the two implementations run the same numbers through the same shapes.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.harness import OPTIMIZER, compiled_memory, size_config
from models.hf import load_hf, save_hf
from models.qwen3 import Qwen3, Qwen3Config
from models.optim import make_optimizer
from models.training import create_train_state, make_train_step


def model_config(size: str, **overrides: Any) -> Qwen3Config:
    """The Qwen3Config of a benchmark size (harness.SIZES), with field overrides."""
    return Qwen3Config.from_hf_dict(size_config(size), **overrides)


def random_model(config: Qwen3Config, *, seed: int = 0) -> Qwen3:
    """A Qwen3 whose kernels are N(0, initializer_range^2) and RMSNorm scales 1.

    The same distribution as ``Qwen3(config, rngs=...)``, drawn with numpy: an
    eager jax.random init compiles one small program per parameter shape,
    seconds on a loaded CPU for nothing a benchmark measures.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if str(getattr(path[-1], "key", path[-1])) == "scale":
            value = np.ones(leaf.shape, np.float32)
        else:
            value = config.initializer_range * rng.standard_normal(leaf.shape, np.float32)
        return jnp.asarray(value, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def write_weights(size: str, directory: str, *, seed: int = 0) -> str:
    """Save a ``random_model`` of ``size`` (HF layout: config.json + safetensors) in ``directory``."""
    save_hf(random_model(model_config(size), seed=seed), directory)
    return directory


def load_model(directory: str, **overrides: Any) -> Qwen3:
    """The model written by ``write_weights`` (``overrides``: Qwen3Config fields
    outside the HF config, e.g. query_block=64)."""
    return load_hf(directory, **overrides)


def lower_train_step(model: Qwen3, loss_fn, batch: dict) -> dict[str, Any]:
    """Trace and lower ``make_train_step(loss_fn)`` for ``batch`` (state donated), no compile.

    Returns {'lowered': jax.stages.Lowered, 'state': the initial TrainState,
    'graphdef' (for merge_model), 'lower_s': trace + lower seconds}. Lowering
    checks every shape and dtype of the step; ``lowered.cost_analysis()`` gives
    XLA's FLOP count without compiling.
    """
    optimizer, schedule = make_optimizer(OPTIMIZER)
    graphdef, state = create_train_state(model, optimizer, rng=0)
    state = jax.tree.map(lambda x: x.copy(), state)   # distinct buffers for donation
    step = jax.jit(make_train_step(graphdef, loss_fn, optimizer, schedule=schedule),
                   donate_argnums=0)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    return {"lowered": lowered, "state": state, "graphdef": graphdef,
            "lower_s": time.perf_counter() - start}


def compile_train_step(model: Qwen3, loss_fn, batch: dict) -> dict[str, Any]:
    """Compile ``make_train_step(loss_fn)`` for ``batch`` (state donated, as the scripts do).

    Returns {'step': compiled fn(state, batch) -> (state, metrics), 'state': the
    initial TrainState, 'graphdef' (for merge_model), 'compile_s': lower +
    compile seconds, 'compiled_memory'}.
    """
    built = lower_train_step(model, loss_fn, batch)
    start = time.perf_counter()
    compiled = built["lowered"].compile()
    return {"step": compiled, "state": built["state"], "graphdef": built["graphdef"],
            "compile_s": built["lower_s"] + time.perf_counter() - start,
            "compiled_memory": compiled_memory(compiled)}
