"""Real-scale configs (Qwen3-0.6B / 1.7B, Qwen tokenizer, GSM8K / MetaMathQA from local files):
built, validated, and run for one step on tiny stand-ins written here."""
import os

import pytest
from flax import nnx

from data.arithmetic import ArithmeticConfig, generate_problems, tokenizer_corpus
from data.tokenizers import load_tokenizer
from experiments import cli, rundir
from experiments.extra_cot import pipeline
from experiments.extra_cot.configs import stages
from models.hf import save_hf
from models.qwen3 import Qwen3, Qwen3Config

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures")
CONFIGS = ("experiments/extra_cot/configs/qwen3_0p6b.py", "experiments/extra_cot/configs/qwen3_1p7b.py")


@pytest.mark.parametrize("path", CONFIGS)
def test_real_configs_build_and_validate(path, stand_ins):
    tok_path, hf_dir, _ = stand_ins
    config = cli.parse([f"--config={path}", *local_files(tok_path, hf_dir)])
    assert config.model.source == "hf" and config.data.source == "benchmarks"
    assert config.sft_mixed.optim.learning_rate == 2e-5 and config.sft_base.steps == 0
    assert config.rl.objective.estimator == "hierarchical"


@pytest.mark.parametrize("drop, key", [
    ("data.tokenizer_path", "data.tokenizer_path"), ("model.hf_path", "model.hf_path"),
    ("data.benchmarks.rl", "data.benchmarks.rl"), ("data.benchmarks.test", "data.benchmarks.test")])
def test_missing_local_files_are_named_by_their_cli_key_at_parse(drop, key, stand_ins,
                                                                tmp_path):
    tok_path, hf_dir, _ = stand_ins
    args = [a for a in local_files(tok_path, hf_dir) if not a.startswith(f"--config.{drop}=")]
    with pytest.raises(cli.ConfigError, match=rf"config key '{key}'.*(no such|no local|must)"):
        cli.parse([f"--config={CONFIGS[0]}", f"--config.run_dir={tmp_path / 'run'}", *args])
    assert not (tmp_path / "run").exists()


def local_files(tok_path, hf_dir, counts=(3, 2, 2, 2)):
    """The CLI flags that point a real config at the stand-ins and the fixture JSONL files."""
    gsm8k = os.path.join(FIXTURES, "gsm8k_test.jsonl")
    meta = os.path.join(FIXTURES, "metamathqa_train.jsonl")
    sft, rl, val, test = counts
    return [f"--config.model.hf_path={hf_dir}", f"--config.data.tokenizer_path={tok_path}",
            f"--config.data.benchmarks.sft=metamathqa,{meta},train,0,{sft}",
            f"--config.data.benchmarks.rl=gsm8k,{gsm8k},train,0,{rl}",
            f"--config.data.benchmarks.val=gsm8k,{gsm8k},test,0,{val}",
            f"--config.data.benchmarks.test=gsm8k,{gsm8k},test,{val},{test}"]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny Qwen-like tokenizer.json and a tiny HF checkpoint with a smaller vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("standins")
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = tokenizer_corpus(generate_problems(0, 50, ArithmeticConfig(max_steps=2)))
    raw.train_from_iterator(corpus, trainer=trainer)
    tok_path = str(root / "tokenizer.json")
    raw.save(tok_path)
    hf_vocab = raw.get_vocab_size()  # the project's control tokens are added on loading
    model = Qwen3(Qwen3Config(vocab_size=hf_vocab, hidden_size=32, intermediate_size=64,
                              num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                              max_position_embeddings=1024), rngs=nnx.Rngs(0))
    save_hf(model, str(root / "hf"))
    return tok_path, str(root / "hf"), hf_vocab


def test_qwen3_config_runs_one_step_on_stand_ins(stand_ins, tmp_path):
    tok_path, hf_dir, hf_vocab = stand_ins
    config = cli.parse([
        f"--config={CONFIGS[0]}", f"--config.run_dir={tmp_path / 'run'}",
        "--config.stage=data,sft_base,selfcot", *local_files(tok_path, hf_dir),
        "--config.data.compressor_problems=4",
        "--config.model.dtype=float32", "--config.model.param_dtype=float32",
        "--config.sft_base.steps=1", "--config.sft_base.batch_tokens=1024",
        "--config.sft_base.max_length=256", "--config.sft_base.bucket=256",
        "--config.selfcot.num_questions=2", "--config.selfcot.batch_size=2",
        "--config.selfcot.max_new_tokens=4"])
    summaries = pipeline.run_stages(config)
    run = rundir.Run(config.run_dir)
    assert summaries["data"]["n_sft"] == 3 and summaries["data"]["n_test"] == 2
    tok = load_tokenizer(run.tokenizer_path())
    assert tok.vocab_size > hf_vocab             # control tokens were added ...
    model = rundir.load_model(run.path("sft_base"))
    assert model.config.vocab_size == tok.vocab_size   # ... and the embedding grew with them
    assert summaries["sft_base"]["examples"] == 3
    assert summaries["selfcot"]["questions"] == 2
    rows = rundir.read_jsonl(run.path("data", "rl.jsonl"))
    assert rows[0]["answer"] == "56" and rows[0]["difficulty"]["n_steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece"])
def test_smoke_preset_runs_every_stage_on_an_hf_checkpoint(kind, stand_ins, tmp_path, capsys):
    """qwen3_0p6b.py:smoke, every stage, on a tiny Qwen3 checkpoint that transformers
    wrote (tests/fixtures/qwen3/gqa_tied: vocabulary 128, grown to the tokenizer's) with
    a byte-level BPE tokenizer.json or a SentencePiece model, and the fixture JSONL
    files of GSM8K and MetaMathQA."""
    tok_path, _, _ = stand_ins
    hf_dir = os.path.join(os.path.dirname(__file__), "..", "fixtures", "qwen3", "gqa_tied")
    if kind == "sentencepiece":
        from data.tokenizers import train_sentencepiece
        sp = train_sentencepiece(
            tokenizer_corpus(generate_problems(0, 50, ArithmeticConfig(max_steps=2))),
            vocab_size=400)
        tok_path = str(tmp_path / "tok.model")
        sp.save(tok_path)
    config = cli.parse([f"--config={CONFIGS[0]}:smoke", f"--config.run_dir={tmp_path / 'run'}",
                        *local_files(tok_path, hf_dir)])
    pipeline.main(config)
    run = rundir.Run(config.run_dir)
    assert all(run.done(s) for s in stages.STAGE_ORDER)
    want = "HFTokenizer" if kind == "tokenizer.json" else "SentencePieceTokenizer"
    assert type(load_tokenizer(run.tokenizer_path())).__name__ == want
    rows = rundir.read_jsonl(run.path("compress", "formula.jsonl"))
    assert rows and all(r["level"] in (20, 40, 60, 80, 100) for r in rows)
    methods = {r["method"] for r in rundir.read_jsonl(run.path("evaluate", "responses.jsonl"))}
    assert methods == {"base", "extra-cot", "tokenskip", "policy-warm-start", "chrpo"}
    assert "| chrpo | <COMP_POLICY> |" in capsys.readouterr().out
    # the trained policy back to a Hugging Face directory (docs/real_scale.md): the same
    # logits when it is read again
    import jax.numpy as jnp
    import numpy as np
    from models.hf import load_hf
    policy = rundir.load_model(run.path("rl"))
    save_hf(policy, str(tmp_path / "export"))
    again = load_hf(str(tmp_path / "export"))
    ids = jnp.asarray([[1, 5, 9, 3, 7]])
    np.testing.assert_array_equal(np.asarray(policy(ids)), np.asarray(again(ids)))
    assert again.config.vocab_size == policy.config.vocab_size > 128
