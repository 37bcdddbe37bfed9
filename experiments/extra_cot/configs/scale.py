"""Qwen3-1.7B on a TPU pod slice or a GPU node: one config, the target as its argument.

    python -m experiments.extra_cot.pipeline --config=experiments/extra_cot/configs/scale.py:v4-32 \
        --config.model.hf_path=/path/to/Qwen3-1.7B \
        --config.data.tokenizer_path=/path/to/Qwen3-1.7B/tokenizer.json
    # targets: v5p-8, v4-32, 8xh100 (TARGETS; docs/scaling.md)

Each target is ``qwen3_1p7b.py`` plus three blocks:

    mesh:          data / fsdp / tensor sizes (-1 = the rest), models.sharding.mesh_from_config
    distributed:   enabled -> jax.distributed.initialize() on every host first
    microbatches:  sft / rl gradient-accumulation micro-batches (make_train_step)

and an rl.minibatches that makes every update's rows divisible by data x fsdp.

NOT RUN: nothing here has been run on a TPU or GPU. The memory figures in
docs/scaling.md come from ``python -m experiments.extra_cot.configs.scale``, which
evaluates models.sharding_memory.estimate_memory on an abstract mesh of each target.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from experiments import cli
from experiments.extra_cot.configs import qwen3_1p7b

validate = qwen3_1p7b.validate

# device_gib: memory per device (TPU chip HBM, or GPU memory).
TARGETS = {
    "v5p-8": dict(mesh=dict(data=1, fsdp=-1, tensor=1), devices=4, hosts=1, device_gib=95,
                  sft_microbatches=2, rl_microbatches=4),
    "v4-32": dict(mesh=dict(data=1, fsdp=-1, tensor=4), devices=16, hosts=4, device_gib=32,
                  sft_microbatches=2, rl_microbatches=4),
    "8xh100": dict(mesh=dict(data=1, fsdp=-1, tensor=1), devices=8, hosts=1, device_gib=80,
                   sft_microbatches=1, rl_microbatches=4),
}
# Rollouts per RL step: 32 prompts x (8 policy + 3 forced levels x 2) = 448; 14
# mini-batches of 32 rows divide over 1, 2, 4, 8, 16 or 32 batch shards.
RL_MINIBATCHES = 14


def scale_config(target: str) -> ml_collections.ConfigDict:
    """``qwen3_1p7b.get_config()`` plus the mesh, distributed and microbatches blocks."""
    if target not in TARGETS:
        raise ValueError(f"unknown scale target {target!r}; known: {sorted(TARGETS)}")
    spec = TARGETS[target]
    c = qwen3_1p7b.get_config()
    c.run_dir = f"runs/qwen3_1p7b_{target.replace('-', '')}"
    c.mesh = ml_collections.ConfigDict(spec["mesh"])
    # typed placeholders: None (JAX finds them on TPU pods and SLURM) or the given value
    c.distributed = ml_collections.ConfigDict(
        {"enabled": spec["hosts"] > 1, "coordinator_address": config_dict.placeholder(str),
         "num_processes": config_dict.placeholder(int),
         "process_id": config_dict.placeholder(int)})
    c.microbatches = ml_collections.ConfigDict(
        {"sft": spec["sft_microbatches"], "rl": spec["rl_microbatches"]})
    c.rl.minibatches = RL_MINIBATCHES
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``--config=experiments/extra_cot/configs/scale.py:<target>``, a key of ``TARGETS``."""
    if arg not in TARGETS:
        raise cli.ConfigError(f"--config=experiments/extra_cot/configs/scale.py:{arg}: the argument must "
                              f"be a scale target, one of {sorted(TARGETS)}")
    return scale_config(arg)


def memory_rows(target: str) -> dict[str, object]:
    """Estimated bytes per device for SFT (width 4096) and the RL update and rollouts."""
    from jax.sharding import AbstractMesh, AxisType  # noqa: PLC0415 (configs stay light)

    from models import sharding, sharding_memory  # noqa: PLC0415
    from models.qwen3 import preset  # noqa: PLC0415
    from models.optim import make_optimizer  # noqa: PLC0415

    spec, c = TARGETS[target], scale_config(target)
    shape = sharding.resolve_mesh_shape(**spec["mesh"], num_devices=spec["devices"])
    mesh = AbstractMesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    model = preset("qwen3-1.7b", dtype="bfloat16", param_dtype="bfloat16")
    optimizer, _ = make_optimizer(c.sft_mixed.optim)
    state = sharding_memory.abstract_train_state(model, optimizer)
    shardings = sharding.state_shardings(state, mesh)
    sft_rows = c.sft_mixed.batch_tokens // c.sft_mixed.max_length
    rollouts = c.rl.prompts_per_step * (c.rl.policy_samples
                                        + len(c.rl.forced_levels) * c.rl.forced_samples)
    rl_len = 256 + c.rl.max_new_tokens      # prompt bucket + completion
    ways = shape[0] * shape[1]
    for name, rows, micro in (("sft", sft_rows, c.microbatches.sft),
                              ("rl", rollouts // c.rl.minibatches, c.microbatches.rl)):
        if rows % (micro * ways):
            raise ValueError(f"{target}: {name} micro-batches of {rows} / {micro} rows do not "
                             f"split over {ways} batch shards")
    sft = sharding_memory.estimate_memory(state, shardings, model, mesh, batch_size=sft_rows,
                                   seq_len=c.sft_mixed.max_length,
                                   num_microbatches=c.microbatches.sft)
    rl = sharding_memory.estimate_memory(state, shardings, model, mesh,
                                  batch_size=rollouts // c.rl.minibatches, seq_len=rl_len,
                                  num_microbatches=c.microbatches.rl,
                                  sample_batch=rollouts, sample_length=rl_len)
    return {"target": target, "mesh": dict(zip(sharding.MESH_AXES, shape)),
            "device_gib": spec["device_gib"], "sft_rows": sft_rows, "rl_rows": rollouts
            // c.rl.minibatches, "rollouts": rollouts, "sft": sft, "rl": rl}


def main() -> None:
    """Print the per-device memory table of every target (the figures in docs/scaling.md)."""
    from models.sharding_memory import format_memory  # noqa: PLC0415

    for name in TARGETS:
        row = memory_rows(name)
        device = row["device_gib"] * 2 ** 30
        print(f"== {name}: mesh {row['mesh']}, {row['device_gib']} GiB per device")
        print(f"SFT: {row['sft_rows']} rows x 4096 tokens, "
              f"{TARGETS[name]['sft_microbatches']} micro-batches")
        print(format_memory(row["sft"], device_bytes=device))
        print(f"RL: update {row['rl_rows']} rows x 2304 tokens, "
              f"{TARGETS[name]['rl_microbatches']} micro-batches; rollout KV cache "
              f"{row['rollouts']} rows x 2304 slots")
        print(format_memory(row["rl"], device_bytes=device))


if __name__ == "__main__":
    main()
