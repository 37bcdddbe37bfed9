"""A trained model as a directory: its parameters and a JSON description of it.

Every model the project exports (each stage's decoder, the compressor) is
written and read here, the same way::

    <directory>/model/            Orbax checkpoint of the nnx.Param leaves (one step)
    <directory>/<description>     JSON that rebuilds the module (e.g. model.json:
                                  the Qwen3Config fields)

    save_model(model, stage_dir, description=dataclasses.asdict(model.config),
               description_file="model.json")
    model, description = load_model(stage_dir, make=lambda d: Qwen3(Qwen3Config(**d), ...),
                                    description_file="model.json")

On several processes every process takes part in the Orbax write and process 0
alone writes the JSON; a model loaded here is whole on this process's first
device (``models.checkpoint.local_target``), ready to be placed on a mesh.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

from flax import nnx

from models import sharding
from models.checkpoint import CheckpointManager, local_target

__all__ = ["PARAMS_DIR", "save_model", "read_description", "load_model"]

PARAMS_DIR = "model"


def save_model(model: nnx.Module, directory: str, *, description: dict[str, Any],
               description_file: str, step: int = 0) -> None:
    """Write ``model``'s parameters to ``<directory>/model`` and ``description`` to
    ``<directory>/<description_file>``, replacing a model exported there before
    (Orbax would keep an existing step)."""
    params = nnx.split(model, nnx.Param, ...)[1]
    target = os.path.join(directory, PARAMS_DIR)
    # every process meets at the barrier whether or not there was a model to clear (a
    # check per process would race with process 0 creating the directory)
    if sharding.is_main_process() and os.path.exists(target):
        shutil.rmtree(target)
    sharding.sync_processes(f"{target} cleared")
    with CheckpointManager(target, max_to_keep=1) as manager:
        manager.save(step, params, force=True)
    if not sharding.is_main_process():
        return
    with open(os.path.join(directory, description_file), "w") as f:
        json.dump(description, f, indent=2, sort_keys=True)


def read_description(directory: str, description_file: str) -> dict[str, Any]:
    """The JSON description of the model exported to ``directory``; FileNotFoundError
    when there is none, ValueError naming the file when it is not a JSON object."""
    path = os.path.join(directory, description_file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no exported model in {directory} (no {description_file})")
    try:
        with open(path) as f:
            description = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a model description this code wrote "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(description, dict):
        raise ValueError(f"{path}: not a model description this code wrote (a JSON "
                         f"{type(description).__name__}, not an object)")
    return description


def load_model(directory: str, make: Callable[[dict[str, Any]], nnx.Module], *,
               description_file: str) -> tuple[nnx.Module, dict[str, Any]]:
    """(the module saved by :func:`save_model`, its description).

    ``make(description)`` builds a module of the right shape (it runs under
    ``nnx.eval_shape``, so nothing is initialised); a description it rejects
    (TypeError / ValueError, e.g. an unknown config field) is reported as a
    ValueError naming the file.
    """
    description = read_description(directory, description_file)
    try:
        abstract = nnx.eval_shape(lambda: make(description))
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{os.path.join(directory, description_file)}: not a model "
                         f"description this code wrote ({type(err).__name__}: {err})") from None
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    with CheckpointManager(os.path.join(directory, PARAMS_DIR), max_to_keep=1) as manager:
        _, params, _ = manager.restore(target=local_target(params))
    return nnx.merge(graphdef, params, rest), description
