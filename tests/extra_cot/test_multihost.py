"""Two JAX processes on this machine as two "hosts" of one 8-device mesh.

Each process is started with 4 simulated CPU devices, joins the other through
``models.sharding.initialize_distributed`` (a coordinator on localhost, gloo
collectives between the processes) and runs the real entry points:
``experiments.extra_cot.sft.train_sft`` on a mesh that spans both processes (every
process builds the same global batch and places its own devices' rows) and
greedy ``experiments.extra_cot.rollouts.generate_responses`` (outputs gathered to every
process with ``sharding.to_host``), and two CHRPO steps of ``experiments.extra_cot.rl.rl``
(the set-up and stand-in judge of tests/extra_cot/test_rl_mesh.py) on a
data 2 x fsdp 2 x tensor 2 mesh over both processes, and a benchmark read per
host through grain (``ShardByJaxProcess``), assembled into one global batch by
``sharding.shard_batch``. Each process writes what
it saw; the pytest process makes the single-device references with the same
code. This is the multi-host code path of docs/scaling.md, run for real, on
one machine.
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from data.arithmetic import generate_problems
from data.formats import build_prompt
from models.metrics import read_metrics

MESHES = {"fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
          "mixed": {"data": 2, "fsdp": 2, "tensor": 2}}
PROCESSES, LOCAL_DEVICES = 2, 4
HERE = os.path.dirname(os.path.abspath(__file__))
GSM8K = os.path.join(os.path.dirname(HERE), "data", "fixtures", "gsm8k_test.jsonl")  # 4 records


def _sibling(name: str):
    """Another test file of this folder as a module (its set-up helpers)."""
    spec = importlib.util.spec_from_file_location(f"_{name}_helpers",
                                                  os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rl_helpers():
    """tests/extra_cot/test_rl_mesh.py: its RL run set-up and stand-in judge."""
    return _sibling("test_rl_mesh")


def _setup():
    """The SFT set-up of tests/extra_cot/test_sft_mesh.py, plus 7 prompts to sample."""
    helpers = _sibling("test_sft_mesh")
    examples, model, block = helpers._setup()
    tok = helpers._tokenizer()
    prompts = [build_prompt(tok, p.question, control=None)
               for p in generate_problems(5, 7, helpers.ARITH)]
    return tok, examples, prompts, model, block


def _run(stage_dir, mesh_block):
    """(losses, params as numpy, greedy responses) of train_sft + generate_responses."""
    from experiments.extra_cot import sft                            # noqa: PLC0415
    from experiments.extra_cot.rollouts import generate_responses   # noqa: PLC0415
    from models import sharding                            # noqa: PLC0415

    tok, examples, prompts, model, block = _setup()
    model, _ = sft.train_sft(model, examples, block, stage_dir=stage_dir, seed=0, name="t",
                             mesh=mesh_block)
    mesh = sharding.mesh_from_config(mesh_block)
    responses = generate_responses(model, prompts, tokenizer=tok, batch_size=3,
                                   max_new_tokens=12, mesh=mesh)
    losses = [r["train/loss"] for r in read_metrics(stage_dir)] if sharding.is_main_process() \
        else []
    params = sharding.to_host({"/".join(map(str, path)): leaf for path, leaf in
                               jax.tree_util.tree_leaves_with_path(
                                   nnx.split(model, nnx.Param, ...)[1])})
    return losses, params, [r.tolist() for r in responses]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_device(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    address = f"localhost:{_free_port()}"
    helpers = _rl_helpers()
    helpers._make_run(str(tmp_path / "rl_one"))
    shutil.copytree(tmp_path / "rl_one", tmp_path / "rl_mesh")
    from data import benchmarks   # noqa: PLC0415 (tfds: only here)

    benchmarks.build_benchmark("gsm8k", jsonl_path=GSM8K, data_dir=tmp_path / "tfds",
                               split="test")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           # LLVM -O0, as in test_rl_mesh.py: compiling, not running, dominates here
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES} "
                        "--xla_backend_optimization_level=0"}
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(tmp_path),
                                 address, str(i)], env=env, cwd=repo, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for i in range(PROCESSES)]
    try:
        logs = [w.communicate(timeout=600)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    for i, (w, log) in enumerate(zip(workers, logs)):
        assert w.returncode == 0, f"process {i}:\n{log[-3000:]}"
    ref_losses, ref_params, ref_responses = _run(str(tmp_path / "one"), None)
    assert len(ref_losses) == _sibling("test_sft_mesh").STEPS and ref_losses[-1] < ref_losses[0]
    for name in MESHES:
        views = [json.loads((tmp_path / f"{name}.p{i}.json").read_text())
                 for i in range(PROCESSES)]
        for i, got in enumerate(views):
            assert got["processes"] == PROCESSES and got["local_devices"] == LOCAL_DEVICES
            assert got["devices"] == PROCESSES * LOCAL_DEVICES
            # each process holds only its own devices' rows of the global batch
            assert got["rows_per_process"] == got["rows"] // PROCESSES, (name, i)
            # greedy tokens, gathered to every process, equal one device's
            assert got["responses"] == ref_responses, (name, i)
        assert views[1]["losses"] == []          # metrics are written by process 0 only
        np.testing.assert_allclose(views[0]["losses"], ref_losses, rtol=1e-5, err_msg=name)
        with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as params:
            assert sorted(params.files) == sorted(ref_params)
            for key, value in ref_params.items():
                np.testing.assert_allclose(params[key], value, atol=1e-5, rtol=0,
                                           err_msg=f"{name}: {key}")
    # CHRPO: same rollouts, update losses and parameters as one device
    from experiments.extra_cot import rl   # noqa: PLC0415

    real = rl.reward_inputs
    rl.reward_inputs = helpers._parity_rewards
    try:
        ref = helpers._run_rl(str(tmp_path / "rl_one"), None)
    finally:
        rl.reward_inputs = real
    views = [json.loads((tmp_path / f"rl.p{i}.json").read_text()) for i in range(PROCESSES)]
    for i, got in enumerate(views):
        assert got["rollouts"] == ref["rollouts"] and len(ref["rollouts"]) == 2, i
        assert got["prompt_shards"] == [4] and got["held_fraction"] < 0.75, i
    assert [m["step"] for m in views[0]["metrics"]] == [1, 2]
    for mine, want in zip(views[0]["metrics"], ref["metrics"], strict=True):
        assert want["advantage_abs_mean"] > 0
        for key in ("reward_mean", "advantage_abs_mean", "think_tokens", "accuracy"):
            assert mine[key] == want[key], key
        for key in ("update/loss", "update/grad_norm", "update/kl"):
            np.testing.assert_allclose(mine[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    with np.load(tmp_path / "rl.npz", allow_pickle=False) as params:
        for key, value in ref["params"].items():
            np.testing.assert_allclose(params[key], value, atol=1e-5, rtol=0, err_msg=key)
    # grain on two hosts: each reads its own records, shard_batch assembles the global batch
    views = [json.loads((tmp_path / f"grain.p{i}.json").read_text()) for i in range(PROCESSES)]
    local = [v["local"] for v in views]
    assert sorted(local[0] + local[1]) == [0, 1, 2, 3] and len(local[0]) == len(local[1]) == 2
    assert all(v["global"] == local[0] + local[1] for v in views)
    # only process 0 wrote the metrics file of each run
    assert (tmp_path / "fsdp8" / "metrics.jsonl").exists()


def _worker(out: str, address: str, process_id: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from models import sharding   # noqa: PLC0415

    assert sharding.initialize_distributed({"enabled": True, "coordinator_address": address,
                                            "num_processes": PROCESSES,
                                            "process_id": process_id})
    from experiments.extra_cot.datasets import sft_batch   # noqa: PLC0415

    _, examples, _, _, block = _setup()
    for name, mesh_block in MESHES.items():
        losses, params, responses = _run(os.path.join(out, name), mesh_block)
        mesh = sharding.mesh_from_config(mesh_block)
        batch = sft_batch(examples, step=0, seed=0, batch_tokens=block.batch_tokens,
                          bucket=block.bucket, max_length=block.max_length)
        batch = sharding.pad_rows(batch, sharding.batch_ways(mesh))
        rows = len(batch["tokens"])
        placed = sharding.shard_batch(batch, mesh, process_local=False)["tokens"]
        rows_here = {i for s in placed.addressable_shards for i in range(*s.index[0].indices(rows))}
        view = {"losses": losses, "responses": responses, "processes": jax.process_count(),
                "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                "rows": rows, "rows_per_process": len(rows_here)}
        with open(os.path.join(out, f"{name}.p{process_id}.json"), "w") as f:
            json.dump(view, f)
        if process_id == 0:
            np.savez(os.path.join(out, f"{name}.npz"), **params)
        sharding.sync_processes(f"{name} written")

    # each host reads its own slice of a benchmark through grain (ShardByJaxProcess) and
    # shard_batch (process_local=True) assembles the global batch from the hosts' rows:
    # on data 2 x tensor 4, process i's devices hold rows [2 i, 2 i + 2)
    import grain   # noqa: PLC0415

    from data.benchmarks import benchmark_loader   # noqa: PLC0415

    records = benchmark_loader("gsm8k", data_dir=os.path.join(out, "tfds"), split="test",
                               shard_options=grain.sharding.ShardByJaxProcess())
    local = [int(r["id"].rsplit("/", 1)[1]) for r in records]
    mesh = sharding.mesh_from_config({"data": 2, "fsdp": 1, "tensor": 4})
    placed = sharding.shard_batch({"ids": np.asarray(local, np.int32)[:, None]}, mesh)
    with open(os.path.join(out, f"grain.p{process_id}.json"), "w") as f:
        json.dump({"local": local,
                   "global": sharding.to_host(placed["ids"])[:, 0].tolist()}, f)

    from experiments.extra_cot import rl   # noqa: PLC0415

    helpers = _rl_helpers()
    rl.reward_inputs = helpers._parity_rewards
    result = helpers._run_rl(os.path.join(out, "rl_mesh"), helpers.MESH)
    with open(os.path.join(out, f"rl.p{process_id}.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "params"}, f)
    if process_id == 0:
        np.savez(os.path.join(out, "rl.npz"), **result["params"])
    sharding.sync_processes("rl written")


if __name__ == "__main__":   # one process of the test above
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
