"""The SFT trainer on a device mesh: padded rows change nothing, and a run on 8
(simulated CPU) devices equals the single-device run.

The 8-device runs happen in one subprocess (``XLA_FLAGS`` must be set before
jax starts), which runs this file as a script and writes each run's losses and
final parameters; the pytest process makes the single-device reference with
the same code.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from data.arithmetic import ArithmeticConfig, generate_problems, tokenizer_corpus
from data.formats import build_sft_example
from data.tokenizers import train_sentencepiece
from experiments import cli
from experiments.extra_cot import sft
from experiments.extra_cot.configs.pipeline_blocks import sft_block
from experiments.extra_cot.datasets import sft_batch
from models.metrics import read_metrics
from models.qwen3 import Qwen3, Qwen3Config

ARITH = ArithmeticConfig(max_steps=2)
MESHES = {"fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
          "mixed": {"data": 2, "fsdp": 2, "tensor": 2}}
STEPS = 3


def _tokenizer():
    return train_sentencepiece(tokenizer_corpus(generate_problems(0, 120, ARITH)), vocab_size=400)


def _setup():
    tok = _tokenizer()
    examples = [build_sft_example(tok, p.question, tok.encode(p.cot), p.answer_text)
                for p in generate_problems(5, 24, ARITH)]
    config = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=1024)
    block = sft_block(init="scratch", steps=STEPS, learning_rate=1e-3, batch_tokens=1024,
                      bucket=256, max_length=256)
    block.log_every = 1
    block.optim.eps = 1e-4   # see test_sft_on_eight_devices_equals_one_device
    return examples, Qwen3(config, rngs=nnx.Rngs(0)), block


def _run(stage_dir, mesh, num_microbatches=1):
    examples, model, block = _setup()
    model, _ = sft.train_sft(model, examples, block, stage_dir=stage_dir, seed=0, name="t",
                             mesh=mesh, num_microbatches=num_microbatches)
    losses = [r["train/loss"] for r in read_metrics(stage_dir)]
    params = {"/".join(map(str, path)): np.asarray(leaf) for path, leaf in
              jax.tree_util.tree_leaves_with_path(nnx.split(model, nnx.Param, ...)[1])}
    return losses, params


def test_padded_rows_leave_the_loss_unchanged():
    examples, model, _ = _setup()
    batch = sft_batch(examples, step=0, seed=0, batch_tokens=1024, bucket=256, max_length=256)
    padded = sft.pad_rows(batch, 8)
    assert len(padded["tokens"]) == 8 and len(batch["tokens"]) < 8
    assert not padded["loss_mask"][len(batch["tokens"]):].any()
    assert sft.pad_rows(padded, 8) is padded
    flagged = sft.pad_rows({**batch, "flag": np.float32(2.0)}, 8)
    assert flagged["flag"] == 2.0 and len(flagged["tokens"]) == 8
    total, denom, _ = sft.lm_loss(model, batch, None)
    total_p, denom_p, _ = sft.lm_loss(model, padded, None)
    assert float(denom_p) == float(denom)
    np.testing.assert_allclose(float(total_p), float(total), rtol=1e-6)


def test_microbatches_give_the_one_batch_step(tmp_path, monkeypatch):
    """Gradient accumulation over 3 micro-batches (the 4-row batches are padded to 6
    rows with all-masked ones) equals one batch: sum_k s_k / sum_k d_k."""
    losses, params = _run(str(tmp_path / "one"), None)
    built, real = [], sft.make_train_step

    def recording(*args, **kwargs):
        built.append(kwargs.get("num_microbatches"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "make_train_step", recording)
    micro_losses, micro_params = _run(str(tmp_path / "micro"), None, num_microbatches=3)
    assert built == [3]
    np.testing.assert_allclose(micro_losses, losses, rtol=1e-5)
    for key, value in params.items():
        np.testing.assert_allclose(micro_params[key], value, atol=1e-5, rtol=0, err_msg=key)


def test_microbatches_are_read_from_the_config_and_checked():
    config = cli.parse(["--config=experiments/extra_cot/configs/test.py", "--config.microbatches.sft=2"])
    assert config.microbatches.sft == 2 and config.microbatches.rl == 1
    with pytest.raises(cli.ConfigError, match="microbatches.rl"):
        cli.parse(["--config=experiments/extra_cot/configs/test.py", "--config.microbatches.rl=0"])


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_mesh_sizes_are_checked_at_parse_time(value):
    with pytest.raises(cli.ConfigError, match="mesh.fsdp"):
        cli.parse(["--config=experiments/extra_cot/configs/test.py", f"--config.mesh.fsdp={value}"])


def test_query_block_reaches_the_model_and_is_checked():
    from experiments import rundir  # noqa: PLC0415

    config = cli.parse(["--config=experiments/extra_cot/configs/test.py", "--config.model.query_block=64"])
    assert rundir.model_config(config.model, 300).query_block == 64
    default = cli.parse(["--config=experiments/extra_cot/configs/test.py"])
    assert rundir.model_config(default.model, 300).query_block == 0
    for value in (-1, 1.5, True):
        with pytest.raises(cli.ConfigError, match="model.query_block"):
            cli.parse(["--config=experiments/extra_cot/configs/test.py",
                       f"--config.model.query_block={value}"])


@pytest.mark.slow
def test_sft_on_eight_devices_equals_one_device(tmp_path):
    """Tolerances: float32 reductions over sharded rows and hidden units are
    reordered, so losses agree to rtol 1e-5; after 3 AdamW steps at lr 1e-3 the
    parameters agree to 1e-5 absolute (eps 1e-4 keeps Adam from dividing a
    rounding-level gradient difference by a near-zero second moment)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    ref_losses, ref_params = _run(str(tmp_path / "one"), None)
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]
    for name in MESHES:
        got = json.loads((tmp_path / f"{name}.json").read_text())
        assert got["devices"] == 8
        np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-5, err_msg=name)
        with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as params:
            assert sorted(params.files) == sorted(ref_params)
            for key, value in ref_params.items():
                np.testing.assert_allclose(params[key], value, atol=1e-5, rtol=0,
                                           err_msg=f"{name}: {key}")


if __name__ == "__main__":   # the 8-device side of the test above
    out = sys.argv[1]
    for name, mesh in MESHES.items():
        losses, params = _run(os.path.join(out, name), mesh)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"losses": losses, "devices": jax.device_count()}, f)
        np.savez(os.path.join(out, f"{name}.npz"), **params)
