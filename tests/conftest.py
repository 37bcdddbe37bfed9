"""Test-wide JAX settings.

docs/design.md (Contracts): tests run with ``jax_numpy_rank_promotion='raise'`` so an array of
shape [B] can never silently broadcast against one of shape [B, T].
"""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_tok():
    """SentencePiece (vocab 400) on 120 two-step arithmetic problems of stream 0: the
    tokenizer of the SFT, RL and reliability tests, trained once per test process."""
    from data.arithmetic import ArithmeticConfig, generate_problems, tokenizer_corpus
    from data.tokenizers import train_sentencepiece

    problems = generate_problems(0, 120, ArithmeticConfig(max_steps=2))
    return train_sentencepiece(tokenizer_corpus(problems), vocab_size=400)


@pytest.fixture(scope="session")
def problem_tok():
    """SentencePiece (default vocab) on 300 default arithmetic problems of stream 11."""
    from data.arithmetic import generate_problems, tokenizer_corpus
    from data.tokenizers import train_sentencepiece

    return train_sentencepiece(tokenizer_corpus(generate_problems(11, 300)))


def make_tiny_decoder(vocab_size: int, seed: int = 0):
    """A one-layer Qwen3 decoder (hidden 32, 2 heads, 1 KV head) for fast tests."""
    from flax import nnx

    from models.qwen3 import Qwen3, Qwen3Config

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                         max_position_embeddings=1024)
    return Qwen3(config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="session")
def tiny_decoder():
    """``tiny_decoder(vocab_size, seed=0)``: a fresh :func:`make_tiny_decoder`."""
    return make_tiny_decoder
