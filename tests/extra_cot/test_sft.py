"""SFT batches and the SFT trainer: response-only loss, determinism, resume."""
import jax
import numpy as np
import pytest
from flax import nnx

from data.arithmetic import ArithmeticConfig, generate_problems, tokenizer_corpus
from data.formats import build_sft_example
from data.tokenizers import train_sentencepiece
from experiments.extra_cot import sft
from experiments.extra_cot.configs.pipeline_blocks import sft_block
from experiments.extra_cot.datasets import sft_batch

ARITH = ArithmeticConfig(max_steps=2)


@pytest.fixture(scope="module")
def tok(small_tok):          # tests/conftest.py
    return small_tok


@pytest.fixture(scope="module")
def examples(tok):
    return [build_sft_example(tok, p.question, tok.encode(p.cot), p.answer_text)
            for p in generate_problems(5, 24, ARITH)]


def test_sft_batch_is_a_pure_function_of_seed_and_step(examples):
    kw = dict(seed=3, batch_tokens=1024, bucket=128, max_length=512)
    a, b = sft_batch(examples, step=5, **kw), sft_batch(examples, step=5, **kw)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = sft_batch(examples, step=6, **kw)
    assert any(a[k].shape != c[k].shape or not np.array_equal(a[k], c[k]) for k in a)


def test_sft_batch_layout(examples):
    by_ids = {tuple(e.ids): e for e in examples}
    for step in range(8):
        batch = sft_batch(examples, step=step, seed=0, batch_tokens=1024, bucket=128,
                          max_length=512)
        rows, width = batch["tokens"].shape
        assert width % 128 == 0 and rows == max(1, 1024 // width)
        for r in range(rows):
            n = int(batch["mask"][r].sum())
            assert batch["mask"][r, :n].all()               # right padding
            ex = by_ids[tuple(batch["tokens"][r, :n])]
            np.testing.assert_array_equal(batch["loss_mask"][r, :n], ex.loss_mask)
            assert not batch["loss_mask"][r, n:].any()


def test_sft_batch_cuts_long_examples(examples):
    batch = sft_batch(examples, step=0, seed=0, batch_tokens=256, bucket=64, max_length=64)
    assert batch["tokens"].shape[1] == 64


def block(steps, checkpoint_every):
    b = sft_block(init="scratch", steps=steps, learning_rate=1e-2, batch_tokens=1024,
                  bucket=256, max_length=256)
    b.log_every, b.checkpoint_every = 1, checkpoint_every
    return b


def params_of(model):
    return jax.tree.leaves(nnx.split(model, nnx.Param, ...)[1])


@pytest.fixture(scope="module")
def straight(tok, examples, tiny_decoder, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("straight"))
    model, stats = sft.train_sft(tiny_decoder(tok.vocab_size), examples, block(6, 3), stage_dir=d, seed=0,
                                 name="t")
    return model, stats, d


def test_train_sft_lowers_the_loss(straight):
    from models.metrics import read_metrics

    _, stats, run_dir = straight
    assert stats["examples"] == 24 and stats["tokens_per_second"] > 0
    losses = [r["train/loss"] for r in read_metrics(run_dir)]
    assert len(losses) == 6 and np.isfinite(losses).all() and losses[-1] < losses[0]


def test_resume_gives_the_same_run(tok, examples, straight, tiny_decoder, tmp_path, monkeypatch):
    real = sft.sft_batch

    def crash_at_4(ex, *, step, **kw):
        if step == 4:
            raise RuntimeError("simulated crash")
        return real(ex, step=step, **kw)

    monkeypatch.setattr(sft, "sft_batch", crash_at_4)
    with pytest.raises(RuntimeError, match="simulated"):
        sft.train_sft(tiny_decoder(tok.vocab_size), examples, block(6, 3), stage_dir=str(tmp_path), seed=0,
                      name="t")
    monkeypatch.setattr(sft, "sft_batch", real)
    resumed, _ = sft.train_sft(tiny_decoder(tok.vocab_size, seed=99), examples, block(6, 3),
                               stage_dir=str(tmp_path), seed=0, name="t")
    for a, b in zip(params_of(straight[0]), params_of(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zero_steps_keeps_the_model(tok, examples, tiny_decoder, tmp_path):
    model = tiny_decoder(tok.vocab_size)
    same, stats = sft.train_sft(model, examples, block(0, 1), stage_dir=str(tmp_path), seed=0,
                                name="t")
    assert same is model and stats["train_seconds"] == 0.0


def test_weighted_examples_reach_the_batch_and_the_loss():
    """Equation weights make the batch's loss_mask float and the loss a weighted mean."""
    import jax.numpy as jnp
    import numpy as np

    from data.arithmetic import generate_problems, tokenizer_corpus
    from data.formats import build_sft_example
    from data.tokenizers import train_sentencepiece
    from experiments.extra_cot.datasets import sft_batch
    from experiments.extra_cot.sft import weighted_examples
    from models.training import masked_lm_loss

    tok = train_sentencepiece(tokenizer_corpus(generate_problems(11, 200)), vocab_size=400)
    examples = [build_sft_example(tok, p.question, tok.encode(p.cot), p.answer_text)
                for p in generate_problems(3, 4)]
    assert weighted_examples(tok, examples, 1.0) == examples
    heavy = weighted_examples(tok, examples, 3.0)
    args = dict(step=0, seed=0, batch_tokens=2048, bucket=128, max_length=512)
    plain, weighted = sft_batch(examples, **args), sft_batch(heavy, **args)
    assert plain["loss_mask"].dtype == bool and weighted["loss_mask"].dtype == np.float32
    assert set(np.unique(weighted["loss_mask"])) == {0.0, 1.0, 3.0}
    # uniform logits: every token costs log V, so the weighted mean is log V as well,
    # while the denominator counts equation tokens three times
    logits = jnp.zeros(plain["tokens"].shape + (tok.vocab_size,))
    s0, d0 = masked_lm_loss(logits, plain["tokens"], plain["loss_mask"])
    s1, d1 = masked_lm_loss(logits, weighted["tokens"], weighted["loss_mask"])
    n_eq = float((weighted["loss_mask"][:, 1:] == 3.0).sum())
    assert float(d1) == float(d0) + 2 * n_eq and n_eq > 0
    assert float(s1 / d1) == pytest.approx(float(s0 / d0), rel=1e-6)


def test_drill_examples_follow_the_config():
    from experiments import cli
    from experiments.extra_cot.sft import drill_examples

    config = cli.parse(["--config=experiments/extra_cot/configs/test.py", "--config.sft_base.drill_examples=3",
                        "--config.sft_base.drill_equations=5"])
    tok = train_sentencepiece(tokenizer_corpus(generate_problems(11, 200)), vocab_size=400)
    drills = drill_examples(tok, config)
    assert len(drills) == 3
    for ex in drills:
        assert ex.ids[-1] == tok.eos_id and not ex.loss_mask[0] and ex.loss_mask[1:].all()
        assert tok.decode(list(ex.ids[:-1])).count("=") == 5
    off = cli.parse(["--config=experiments/extra_cot/configs/test.py"])
    assert drill_examples(tok, off) == []
    with pytest.raises(cli.ConfigError, match="sft_base.drill_examples"):
        cli.parse(["--config=experiments/extra_cot/configs/test.py", "--config.sft_base.drill_examples=-1"])


def test_sft_keeps_two_checkpoints(straight):
    """A corrupted latest checkpoint can fall back to the step before (issue 25)."""
    import os

    from models.checkpoint import CheckpointManager
    _, _, d = straight
    with CheckpointManager(os.path.join(d, "checkpoints"), max_to_keep=2) as manager:
        assert manager.all_steps() == [3, 6]
