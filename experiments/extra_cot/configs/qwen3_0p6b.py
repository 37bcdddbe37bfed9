"""Real scale: Qwen3-0.6B from a local Hugging Face directory, GSM8K / MetaMathQA from local files.

    python -m experiments.extra_cot.pipeline --config=experiments/extra_cot/configs/qwen3_0p6b.py \
        --config.model.hf_path=/path/to/Qwen3-0.6B \
        --config.data.tokenizer_path=/path/to/Qwen3-0.6B/tokenizer.json

    # a first try: every stage in minutes, on a few records of the same files
    python -m experiments.extra_cot.pipeline --config=experiments/extra_cot/configs/qwen3_0p6b.py:smoke \
        --config.model.hf_path=/path/to/Qwen3-0.6B \
        --config.data.tokenizer_path=/path/to/Qwen3-0.6B/tokenizer.json \
        --config.data.benchmarks.sft=metamathqa,/path/to/MetaMathQA-395K.json,train,0,16 \
        --config.data.benchmarks.rl=gsm8k,/path/to/gsm8k,train,0,4 \
        --config.data.benchmarks.val=gsm8k,/path/to/gsm8k,test,0,4 \
        --config.data.benchmarks.test=gsm8k,/path/to/gsm8k,test,4,4

Nothing is downloaded: the checkpoint (config.json + *.safetensors), the Qwen
tokenizer.json and the benchmark JSONL files must exist locally (data/benchmarks.py
lists the accepted schemas). The base model is the pretrained Qwen3 itself
(``sft_base.steps = 0``); SFT blocks use the paper's hyper-parameters (lr 2e-5,
cosine, warmup 0.05, weight decay 0.05, grad clip 1.0). The compressor still
learns from annotated synthetic problems (benchmarks carry no span labels), now
tokenized with the Qwen tokenizer. Checked in CI only by building the config and
running one step on tiny stand-ins (tests/extra_cot/test_real_configs.py);
docs/results.md ("Real scale") says what has and has not been run.
"""
import ml_collections

from experiments.extra_cot.configs import pipeline_blocks

validate = pipeline_blocks.validate


def get_config(size: str = "0.6b") -> ml_collections.ConfigDict:
    """``size``: '0.6b' or '1.7b' (qwen3_1p7b.py), or 'smoke': the 0.6B config with every
    stage shrunk to a few records and steps (``smoke``)."""
    if size == "smoke":
        return smoke(get_config("0.6b"))
    c = pipeline_blocks.base_config()
    c.run_dir = f"runs/qwen3_{size.replace('.', 'p')}"
    c.data.source = "benchmarks"
    c.data.tokenizer_path = f"checkpoints/Qwen3-{size.upper()}/tokenizer.json"
    c.data.benchmarks.update({
        "sft": ("metamathqa", "data/metamathqa/MetaMathQA-395K.json", "train", 0, 20000),
        "rl": ("gsm8k", "data/gsm8k", "train", 0, 4096),
        "val": ("gsm8k", "data/gsm8k", "test", 0, 200),
        "test": ("gsm8k", "data/gsm8k", "test", 200, 1119)})
    c.data.sizes.update({"sft": 20000, "rl": 4096, "val": 200, "test": 1119})
    c.model.source = "hf"
    c.model.hf_path = f"checkpoints/Qwen3-{size.upper()}"
    c.model.dtype = c.model.param_dtype = "bfloat16"
    for name, steps in (("sft_base", 0), ("sft_mixed", 3000), ("sft_policy", 300),
                        ("sft_tokenskip", 3000)):
        block = c[name]
        block.steps = steps
        block.batch_tokens = 65536
        block.bucket = 256
        block.max_length = 4096
        block.log_every = 10
        block.checkpoint_every = 500
        block.optim.update({"learning_rate": 2e-5, "warmup": 0.05, "weight_decay": 0.05,
                            "grad_clip": 1.0, "min_lr_ratio": 0.0})
    c.sft_mixed.init = c.sft_tokenskip.init = "sft_base"
    c.selfcot.update({"num_questions": 20000, "batch_size": 64, "max_new_tokens": 2048})
    c.compress.batch_size = 32
    c.calibrate.update({"batch_size": 64, "max_new_tokens": 2048})
    c.rl.update({"steps": 200, "prompts_per_step": 32, "policy_samples": 8, "forced_samples": 2,
                 "forced_levels": (20, 40, 60), "max_new_tokens": 2048,
                 "completion_bucket": 256, "minibatches": 8, "checkpoint_every": 20})
    c.rl.optim.learning_rate = 1e-6
    c.evaluate.update({"num_questions": 1119, "batch_size": 64, "max_new_tokens": 2048,
                       "difficulty_key": "n_steps"})
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every stage of ``c`` on a few records, a step or two each: a first try of the real
    path (tests/extra_cot/test_real_configs.py runs it on stand-ins). The model, the
    tokenizer and the benchmark files stay the user's; the benchmark record counts
    shrink to 16 / 4 / 4 / 4 (the CLI overrides above set the paths with them)."""
    c.run_dir = "runs/qwen3_smoke"
    for split, count in (("sft", 16), ("rl", 4), ("val", 4), ("test", 4)):
        name, path, part, start, _ = c.data.benchmarks[split]
        c.data.benchmarks[split] = (name, path, part, 4 if split == "test" else 0, count)
        c.data.sizes[split] = count
    c.data.compressor_problems = 16
    for name in ("sft_base", "sft_mixed", "sft_policy", "sft_tokenskip"):
        block = c[name]
        block.steps = 0 if name == "sft_base" else 1
        block.batch_tokens = 2048
        block.bucket = block.max_length = 512
        block.log_every = block.checkpoint_every = 1
    for name in ("compressor", "compressor_baseline"):
        block = c[name]
        block.train.update({"steps": 2, "batch_tokens": 1024, "bucket": 256, "log_every": 1,
                            "checkpoint_every": 1})
        block.data.num_eval = 4
        block.eval.update({"ratios": (0.2,), "batch_size": 4})
    c.selfcot.update({"num_questions": 4, "batch_size": 4, "max_new_tokens": 32,
                      "fill_with_reference": True})
    c.compress.batch_size = 4
    c.calibrate.update({"batch_size": 4, "max_new_tokens": 32})
    c.rl.update({"steps": 1, "prompts_per_step": 2, "policy_samples": 2, "forced_samples": 1,
                 "forced_levels": (20,), "max_new_tokens": 32, "completion_bucket": 32,
                 "minibatches": 2, "checkpoint_every": 1})
    c.evaluate.update({"num_questions": 4, "batch_size": 4, "max_new_tokens": 32})
    return c
