"""benchmarks/: every script runs end to end at its smallest size, JAX side only.

No timing is asserted (the machine is shared); the checks are on what the
scripts compute and report: shapes, token counts, finite losses, the phases
of an RL step, the model-FLOP formula. CI installs only the `test` extra, so
the transformers side is never started (--no-reference) and everything runs
in this process (--in-process).
"""
import math

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import (answer_cost, generation, gpu, harness, jax_side, kernels, rl_step,
                        train_step)
from models.qwen3 import Qwen3, preset

FAST = ["--sizes=micro", "--no-reference", "--in-process", "--rounds=1", "--repeats=1",
        "--warmup=0"]


def test_train_step_runs_the_chrpo_step():
    # Only the CHRPO step: each compiled train step costs seconds of CI time,
    # and the SFT step differs from it by its loss alone (experiments.extra_cot.sft.lm_loss).
    # --query-block=4: 4 causal query blocks over the 16 tokens (models.qwen3.query_blocks)
    rows = train_step.main(FAST + ["--kinds=chrpo", "--query-block=4"])
    assert [r["kind"] for r in rows] == ["chrpo"]
    assert rows[0]["rounds"][0]["jax"]["query_block"] == 4
    for r in rows:
        shape = train_step.SHAPES["micro"][r["kind"]]
        want = shape["batch"] * (shape.get("length") or shape["prompt"] + shape["completion"])
        assert r["tokens"] == want
        run = r["rounds"][0]["jax"]
        assert math.isfinite(run["loss"]) and run["skipped"] == 0
        assert len(run["times"]) == 1 and "torch" not in r and "ratio" not in r
        assert r["jax"]["compiled_memory"]["argument"] > 0


def test_generation_runs_n_samples_per_prompt():
    rows = generation.main(FAST + ["--cases=sample 2x2"])
    assert [(r["case"], r["batch"], r["samples"]) for r in rows] == [("sample 2x2", 2, 2)]
    for r in rows:   # the worker itself raises if generate stopped before max_new_tokens
        assert r["jax"]["prefill"] > 0 and r["jax"]["end_to_end"] > 0
        assert r["jax"]["compiled_memory"]["output"] > 0


def test_kernel_cases_compute_the_same_values_in_jax_and_numpy():
    # torch runs the same expression through the same array-module calls
    import jax.numpy as jnp
    for case in kernels.CASES:
        args = kernels.inputs(case)
        want = kernels.expression(np, case)(*args)
        got = jax.jit(kernels.expression(jnp, case))(*args)
        assert got.shape == want.shape, case
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3, err_msg=case)
    probs = jax.jit(kernels.expression(jnp, "softmax"))(*kernels.inputs("softmax"))
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown case"):
        kernels.inputs("conv")


def test_kernels_driver_times_the_chosen_cases():
    rows = kernels.main(["--no-reference", "--in-process", "--rounds=1", "--repeats=1",
                         "--warmup=0", "--cases=exp,decode attention"])
    assert [r["case"] for r in rows] == ["exp", "decode attention"]
    assert all(r["jax_us"] > 0 and "ratio" not in r for r in rows)
    with pytest.raises(SystemExit):
        kernels.main(["--no-reference", "--in-process", "--cases=conv"])
    # the ceiling: GEMM rate / model FLOPs per token
    (c,) = kernels.ceilings([{"case": "matmul x@w", "jax_us": 1e6}])
    gemm = 2.0 * 1024 * 512 * 1536
    assert c["gflops"] == pytest.approx(gemm / 1e9)
    small = gpu.flops_per_token(jax_side.model_config("small"), 256)
    assert c["sft_ceiling_tokens_per_s"]["small"] == pytest.approx(gemm / small)


def test_rl_step_reports_every_phase():
    (row,) = rl_step.main(["--sizes=micro", "--in-process", "--steps=1", "--scoring=jit"])
    setup = rl_step.SETUPS["micro"]
    per_prompt = setup["policy_samples"] + len(setup["forced_levels"]) * setup["forced_samples"]
    assert row["rows"] == setup["prompts"] * per_prompt
    assert set(row["first_step_s"]) == set(rl_step.PHASES) - {"scoring"}   # jit only
    assert "scoring_jit" in row["counted"] and "judge" not in row["counted"]
    assert all(v >= 0 for v in row["first_step_s"].values())
    assert row["completion_width"] % 32 == 0 and row["prompt_width"] % 32 == 0


def test_gpu_script_dry_run_compiles_and_counts_flops():
    out = gpu.main(["--dry-run", "--in-process"])
    (train,) = out["train"]
    assert train["device"] == jax.devices()[0].device_kind
    assert train["mfu"] is None and train["peak_tflops"] is None     # no known peak on CPU
    assert train["xla_tflops_per_step"] > 0
    (dec,) = out["decode"]
    assert [c["batch"] for c in dec["cases"]] == [1] and dec["bandwidth_gbs"] > 0
    config = gpu._config(dict(model="tiny", overrides=gpu.DRY["overrides"]),
                         dtype="bfloat16", param_dtype="bfloat16")
    params = sum(x.size for x in jax.tree.leaves(nnx.state(
        nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))), nnx.Param)))
    assert dec["cases"][0]["weight_bytes"] == 2 * params                # bf16 weights


def test_flops_per_token_is_six_n_plus_attention():
    # Qwen3-0.6B: N = all parameters minus the RMSNorm scales (the tied embedding
    # counts once, as the LM head): 596,049,920 - 28 * (2 * 1024 + 2 * 128) - 1024.
    config = preset("qwen3-0.6b")
    n = 596_049_920 - 28 * (2 * 1024 + 2 * 128) - 1024
    assert gpu.flops_per_token(config, 0) == 6 * n
    assert gpu.flops_per_token(config, 1024) - 6 * n == 12 * 28 * 16 * 128 * 1024


def test_peak_lookup_and_ratio_summary():
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops("cpu") is None
    s = harness.ratio_summary([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)


def test_driver_flags_are_validated():
    with pytest.raises(SystemExit):
        train_step.main(["--sizes=micro", "--in-process"])     # torch would share the process
    with pytest.raises(SystemExit):
        generation.main(["--sizes=huge", "--no-reference"])
    with pytest.raises(ValueError, match="huge"):
        harness.size_config("huge")


def test_train_batches_are_deterministic_and_masked():
    spec = dict(size="micro", kind="chrpo", **train_step.SHAPES["micro"]["chrpo"])
    a, b = train_step.make_batch(spec), train_step.make_batch(spec)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    m = a["completion_mask"]
    assert (a["old_logp"][~m] == 0).all() and (a["old_logp"][m] < 0).all()
    assert m[:, 0].all() and (m.sum(1) <= spec["completion"]).all()


def test_answer_cost_gives_every_hostile_case_its_right_verdict():
    rows = answer_cost.main(["--repeats=1"])
    assert len(rows) == len(answer_cost.cases()) >= 10
    assert rows[0]["case"].startswith("reference")
    for r in rows:
        assert r["verdict"] == r["expected"], r["case"]
        assert r["seconds"] > 0
