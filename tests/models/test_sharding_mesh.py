"""Sharded SFT / CHRPO steps, greedy sampling, cross-mesh restore and the memory
estimate on 8 simulated CPU devices.

The mesh cases run in ONE subprocess (``python tests/models/test_sharding_mesh.py
DIR`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``): the rest of
the suite shares a 1-device JAX in the pytest process. The subprocess measures
and prints one JSON object; the assertions live in the pytest functions below.

Every step is built exactly as experiments/extra_cot/sft.py and experiments/extra_cot/rl.py build
theirs (``create_train_state`` + ``make_train_step`` with ``lm_loss`` /
``make_rl_loss``); the single-device reference is the same code on a 1x1x1 mesh.

Tolerances (float32): XLA reorders the sums of a sharded matmul / reduction, so
results differ by a few ulps, not bit for bit.
- loss and grad_norm (computed before the optimiser): rtol 2e-5, i.e. ~100 ulps
  of float32 (reductions over ~1e4 terms reorder; observed <= 1e-6).
- parameters after 2 AdamW steps: atol 2e-3 * lr (observed <= 3.2e-4 * lr),
  against updates of up to 2 lr each; a shard missing from a gradient sum
  moves parameters by O(lr). The test optimiser uses eps=1e-4 so that an update is
  Lipschitz in the gradient (|du| <= lr |dg| / eps); with eps=1e-8 an element
  whose gradient is ~1e-8 turns an ulp-level gradient difference into an O(lr)
  update difference, which says nothing about sharding.
- greedy tokens: exactly equal (argmax margins of a random tiny model are far
  above the ~1e-6 logit differences; checked on all rows).
- checkpoints: bit-exact (restore moves bytes, no arithmetic).
- memory: estimate / held bytes within 10% (the brief); they agree exactly here
  because both use the same shard shapes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8), "mixed": (2, 2, 2)}
LR = 1e-2
LOSS_RTOL, PARAM_ATOL = 2e-5, 2e-3 * LR
# LLVM -O0 on the CPU backend: these programs run for milliseconds but compile for
# seconds each; both the reference and the sharded runs use the same flags.
XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- subprocess side

def _measure(ckpt_dir: str) -> dict:
    import chrpo
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from experiments.extra_cot.rl import make_rl_loss
    from experiments.extra_cot.sft import lm_loss
    from models import checkpoint
    from models import sharding as sh
    from models import sharding_memory as shm
    from models.qwen3 import Qwen3, preset
    from models.sampling import generate, score
    from models.optim import default_optimizer_config, make_optimizer
    from models.training import create_train_state, make_train_step, merge_model

    assert jax.device_count() == 8, jax.devices()
    t_start = os.times()
    # 16 heads / 8 kv heads / 128 vocab and mlp: every tensor-sharded dim divides 8.
    # One layer keeps compile time down; layers are unrolled, so a second adds nothing new.
    cfg = preset("tiny", vocab_size=128, num_heads=16, num_kv_heads=8, head_dim=4,
                 intermediate_size=128, num_layers=1)
    optimizer, schedule = make_optimizer(default_optimizer_config(
        learning_rate=LR, warmup=0, total_steps=10, weight_decay=0.1, eps=1e-4))
    rng = np.random.default_rng(0)
    b, t = 8, 16
    mask = np.ones((b, t), bool)
    mask[:3, 11:] = False                                       # right padding on 3 rows
    sft_batch = {"tokens": rng.integers(0, 128, (b, t)).astype(np.int32), "mask": mask,
                 "loss_mask": mask & (np.arange(t) >= 4)}
    p, c = 6, 8
    prompt_mask = np.ones((b, p), bool)
    prompt_mask[::2, :2] = False                                # left padding on 4 rows
    completion_mask = np.arange(c)[None] < rng.integers(3, c + 1, b)[:, None]
    tensors = {"prompt_ids": rng.integers(0, 128, (b, p)).astype(np.int32),
               "prompt_mask": prompt_mask,
               "completion_ids": rng.integers(0, 128, (b, c)).astype(np.int32),
               "completion_mask": completion_mask}
    model0 = Qwen3(cfg, rngs=nnx.Rngs(0))
    logp0 = np.asarray(score(*nnx.split(model0), *tensors.values()))
    noise = rng.normal(0.0, 0.3, (b, c)).astype(np.float32)     # clipping is active
    rl_batch = {**tensors, "old_logp": logp0 + noise, "ref_logp": logp0 - noise,
                "advantages": rng.normal(size=b).astype(np.float32)}
    rl_loss = make_rl_loss(chrpo.ChrpoConfig().replace(kl_coef=0.05))

    def train(mesh, loss_fn, batch):
        graphdef, state = create_train_state(Qwen3(cfg, rngs=nnx.Rngs(0)), optimizer, rng=0)
        shardings = sh.state_shardings(state, mesh)
        state = jax.device_put(state, shardings)
        step = jax.jit(make_train_step(graphdef, loss_fn, optimizer, schedule=schedule),
                       out_shardings=(shardings, None), donate_argnums=0)
        metrics = []
        for _ in range(2):
            state, m = step(state, sh.shard_batch(batch, mesh))
            metrics.append({k: float(m[k]) for k in ("loss", "grad_norm")})
        return graphdef, state, shardings, metrics

    def sample(mesh, graphdef, state):
        model_graphdef, model_state = nnx.split(merge_model(graphdef, state))
        prompts = sh.shard_batch({"ids": tensors["prompt_ids"], "mask": prompt_mask}, mesh)
        out = generate(model_graphdef, model_state, prompts["ids"],
                       prompts["mask"], max_new_tokens=6, temperature=0.0, decode_segments=1)
        return np.asarray(out.tokens), out.tokens.sharding

    def run(mesh):
        g, sft_state, shardings, sft_metrics = train(mesh, lm_loss, sft_batch)
        _, rl_state, _, rl_metrics = train(mesh, rl_loss, rl_batch)
        tokens, token_sharding = sample(mesh, g, sft_state)
        return {"sft": (sft_state, sft_metrics), "rl": (rl_state, rl_metrics),
                "tokens": tokens, "shardings": shardings, "graphdef": g,
                "token_spec": str(token_sharding.spec)}

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    def rel(a, b):
        return max(abs(x[k] - y[k]) / abs(y[k]) for x, y in zip(a, b) for k in x)

    single = sh.make_mesh(devices=jax.devices()[:1])
    ref = run(single)
    out: dict = {"cases": {}}
    for name, (d, f, tp) in MESHES.items():
        mesh = sh.make_mesh(data=d, fsdp=f, tensor=tp)
        got = run(mesh)
        state = got["sft"][0]
        held = {part: shm.held_bytes_per_device(getattr(state, part))
                for part in ("params", "opt_state")}
        est = shm.estimate_memory(shm.abstract_train_state(cfg, optimizer), got["shardings"], cfg,
                                 mesh, batch_size=b, seq_len=t)
        out["cases"][name] = {
            "sft_loss_rel": rel(got["sft"][1], ref["sft"][1]),
            "rl_loss_rel": rel(got["rl"][1], ref["rl"][1]),
            "sft_param_diff": max_diff(state.params, ref["sft"][0].params),
            "rl_param_diff": max_diff(got["rl"][0].params, ref["rl"][0].params),
            "tokens_equal": bool((got["tokens"] == ref["tokens"]).all()),
            "tokens_row_count": int(got["tokens"].shape[0]),
            "token_spec": got["token_spec"],
            "up_proj_spec": str(state.params["layers"][0]["mlp"]["up_proj"][...].sharding.spec),
            "held": held, "estimate": {"params": est.params, "opt_state": est.opt_state},
            "single_device_params": shm.held_bytes_per_device(ref["sft"][0].params),
        }

    # Cross-mesh restore: 8 devices as fsdp 2 x tensor 4 -> 1 device, and 1 -> 2x2x2.
    state_1 = ref["sft"][0]
    grid = sh.make_mesh(data=1, fsdp=2, tensor=4)
    state_8 = jax.device_put(state_1, sh.state_shardings(state_1, grid))
    restore = {}
    for label, saved, mesh in (("8to1", state_8, single),
                               ("1to8", state_1, sh.make_mesh(data=2, fsdp=2, tensor=2))):
        target_shardings = sh.state_shardings(saved, mesh)
        with checkpoint.CheckpointManager(os.path.join(ckpt_dir, label)) as manager:
            manager.save(2, saved)
        with checkpoint.CheckpointManager(os.path.join(ckpt_dir, label)) as manager:
            back = manager.restore(target=checkpoint.abstract_tree(saved, target_shardings)).state
        shard_ok = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
            jax.tree.leaves(back), jax.tree.leaves(target_shardings), strict=True))
        same = all(np.array_equal(np.asarray(jax.random.key_data(x) if jnp.issubdtype(
            x.dtype, jax.dtypes.prng_key) else x), np.asarray(jax.random.key_data(y) if
            jnp.issubdtype(y.dtype, jax.dtypes.prng_key) else y))
            for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(state_1), strict=True))
        restore[label] = {"equal": same, "shardings": shard_ok,
                          "devices": len(jax.tree.leaves(back.params)[0].sharding.device_set),
                          "held_params": shm.held_bytes_per_device(back.params)}
    out["restore"] = restore
    # constrain() under activate(): the logical names become the sharding of the output.
    mixed = sh.make_mesh(data=2, fsdp=2, tensor=2)
    with sh.activate(mixed):
        heads = jax.jit(lambda x: sh.constrain(x + 1, ("batch", "length", "heads")))(
            jnp.zeros((8, 4, 16)))
    out["constrain_spec"] = str(heads.sharding.spec)
    # The sampler's KV cache on 2x2x2: per-device bytes of the compiled generate
    # (temporaries + outputs, compiled only) against the cache's global size.
    from models.sampling import _generate
    kv_cfg = preset("tiny", vocab_size=128, num_heads=16, num_kv_heads=8, head_dim=16,
                    intermediate_size=128, num_layers=2)
    kv_b, kv_p, kv_n = 16, 32, 480
    kv_graphdef, kv_state = nnx.split(Qwen3(kv_cfg, rngs=nnx.Rngs(0)))
    kv_args = dict(max_new_tokens=kv_n, n_samples=1, temperature=0.0, top_k=0, top_p=1.0,
                   stop_ids=(), pad_id=0, segments=1)
    kv = {"cache_bytes": 2 * kv_cfg.num_layers * kv_b * kv_cfg.num_kv_heads
          * kv_cfg.head_dim * (kv_p + kv_n) * 4}
    for label, mesh in (("single", single), ("mixed", mixed)):
        state = sh.put_global(kv_state, sh.state_shardings(kv_state, mesh))
        ids, kv_mask = sh.shard_batch((np.ones((kv_b, kv_p), np.int32),
                                       np.ones((kv_b, kv_p), bool)), mesh)
        memory = _generate.lower(kv_graphdef, state, ids, kv_mask, jax.random.key(0),
                                 **kv_args).compile().memory_analysis()
        kv[label] = int(memory.temp_size_in_bytes + memory.output_size_in_bytes)
    out["kv_cache"] = kv
    end = os.times()
    out["cpu_seconds"] = (end.user - t_start.user) + (end.system - t_start.system)
    out["wall_seconds"] = end.elapsed - t_start.elapsed
    return out


# ----------------------------------------------------------------------------- pytest side

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, os.path.abspath(__file__),
                          str(tmp_path_factory.mktemp("mesh_ckpt"))], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("MESH_RESULTS ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    return json.loads(lines[-1][len("MESH_RESULTS "):])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_steps_match_single_device(measured, name):
    case = measured["cases"][name]
    assert case["sft_loss_rel"] <= LOSS_RTOL, case
    assert case["rl_loss_rel"] <= LOSS_RTOL, case
    assert case["sft_param_diff"] <= PARAM_ATOL, case
    assert case["rl_param_diff"] <= PARAM_ATOL, case


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MESHES))
def test_greedy_sampling_matches_single_device(measured, name):
    case = measured["cases"][name]
    assert case["tokens_equal"] and case["tokens_row_count"] == 8, case


@pytest.mark.slow
def test_parameters_are_actually_sharded(measured):
    cases, single = measured["cases"], measured["cases"]["data"]["single_device_params"]
    assert cases["data"]["held"]["params"] == single               # data-parallel: replicated
    # fsdp / tensor over 8 ways: every matrix is split 8 ways, only norms stay whole.
    for name in ("fsdp", "tensor"):
        assert single / 8 <= cases[name]["held"]["params"] < single / 7, cases[name]
    assert single / 4 <= cases["mixed"]["held"]["params"] < single / 3.5, cases["mixed"]
    assert cases["mixed"]["up_proj_spec"] == "P('fsdp', 'tensor')"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MESHES))
def test_memory_estimate_within_ten_percent(measured, name):
    case = measured["cases"][name]
    for part in ("params", "opt_state"):
        held, estimate = case["held"][part], case["estimate"][part]
        assert abs(estimate - held) <= 0.1 * held, (part, estimate, held)


@pytest.mark.slow
def test_constrain_applies_the_rules_under_a_mesh(measured):
    assert measured["constrain_spec"] == "P(('data', 'fsdp'), None, 'tensor')"


@pytest.mark.slow
def test_kv_cache_is_split_over_batch_and_kv_heads(measured):
    """On data 2 x fsdp 2 x tensor 2 the cache [B, K, D, S] of 16 rows and 8 kv heads
    splits 4 ways by rows and 2 by kv heads: one device holds 1/8 of it (plus the
    small temporaries of the loop); replicated, a device would hold all of it."""
    kv = measured["kv_cache"]
    assert kv["single"] >= kv["cache_bytes"]
    assert kv["cache_bytes"] / 8 <= kv["mixed"] < kv["cache_bytes"] / 4, kv


@pytest.mark.slow
@pytest.mark.parametrize("label,devices", [("8to1", 1), ("1to8", 8)])
def test_checkpoint_restores_onto_another_mesh(measured, label, devices):
    case = measured["restore"][label]
    assert case["equal"] and case["shardings"] and case["devices"] == devices, case


if __name__ == "__main__":
    print("MESH_RESULTS " + json.dumps(_measure(sys.argv[1])), flush=True)
