"""One run directory for the whole main job: stage folders, done markers, models and data.

Layout (``Run(run_dir)``)::

    run_dir/config.json                 the resolved pipeline config (run_config.write_run_config)
    run_dir/data/                       tokenizer + problem splits (sft, rl, val, test) as JSONL
    run_dir/<stage>/                    one folder per stage: checkpoints/, metrics.jsonl,
                                        tensorboard/, model/ (exported params), outputs
    run_dir/<stage>/done.json           written last: the stage's summary, wall time and
                                        ``environment`` (package versions, backend, CPU)

A stage counts as done when its ``done.json`` exists, so the pipeline skips it on
a re-run and a crashed stage resumes from its own checkpoints.

Several hosts: ``run_dir`` must be on a filesystem that every host shares. Only
process 0 writes ``done.json`` and the JSONL outputs (``write_jsonl``);
``run_stage`` ends with a barrier (``sharding.sync_processes``), so no process
starts the next stage, which reads them, before process 0 has written them.

Models: a decoder is built from the ``model`` block (``source='config'``: a fresh
tiny Qwen3; ``source='hf'``: a local Hugging Face safetensors directory) and
exported after each training stage as Orbax params under ``<stage>/model``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import ml_collections
from flax import nnx

from data.tokenizers import Tokenizer, load_tokenizer
from models import model_dir, sharding
from models.qwen3 import Qwen3, Qwen3Config

__all__ = ["DONE_FILE", "Run", "strict_json", "environment", "model_config", "build_model",
           "export_model", "load_model", "read_jsonl", "write_jsonl", "run_stage"]

DONE_FILE = "done.json"
MODEL_FILE = "model.json"   # the architecture beside <stage_dir>/model


class Run:
    """Paths of one pipeline run, and its device mesh."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = os.fspath(run_dir)
        self._mesh: tuple[str, Any] | None = None

    def mesh(self, config: ml_collections.ConfigDict) -> Any:
        """The device mesh of ``config.mesh`` (``models.sharding.mesh_from_config``),
        built once per run and shared by every stage that runs in it (built again only
        if a later config names another mesh)."""
        block = config.get("mesh")
        key = json.dumps(block.to_dict() if block is not None else None, sort_keys=True)
        if self._mesh is None or self._mesh[0] != key:
            self._mesh = (key, sharding.mesh_from_config(block))
        return self._mesh[1]

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def stage_dir(self, stage: str) -> str:
        path = self.path(stage)
        os.makedirs(path, exist_ok=True)
        return path

    def done(self, stage: str) -> bool:
        return os.path.exists(self.path(stage, DONE_FILE))

    def summary(self, stage: str) -> dict:
        with open(self.path(stage, DONE_FILE)) as f:
            return json.load(f)

    def mark_done(self, stage: str, summary: dict) -> None:
        """Write the summary (non-finite floats as null: strict JSON); process 0 only."""
        if not sharding.is_main_process():
            return
        path = self.path(stage, DONE_FILE)
        clean = strict_json(summary)
        with open(path + ".tmp", "w") as f:
            json.dump(clean, f, indent=2, sort_keys=True, allow_nan=False)
        os.replace(path + ".tmp", path)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path())

    def tokenizer_path(self) -> str:
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(self.path("data", name)):
                return self.path("data", name)
        raise FileNotFoundError(f"no tokenizer in {self.path('data')}; run the data stage first")


def strict_json(value):
    """``value`` with every non-finite float replaced by None, so that it is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


ENVIRONMENT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint",
                        "tokenizers")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """What a run's numbers may depend on beyond its config: Python, the numeric
    packages' versions, JAX's backend and devices, the CPU. A stage rerun on another
    machine can differ in the last bit of a float and, through greedy decoding, in
    whole answers (docs/results.md), so every done.json records this."""
    import jax  # noqa: PLC0415

    versions = {}
    for name in ENVIRONMENT_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {"python": sys.version.split()[0], "packages": versions,
            "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "device_count": len(devices), "machine": platform.machine(), "cpu": _cpu_model()}


def run_stage(run: Run, name: str, fn: Callable[[], dict], *, force: bool = False) -> dict:
    """Run ``fn`` unless the stage is done; record its summary with ``seconds`` (wall),
    ``cpu_seconds`` (this process, all threads: a load-independent cost) and
    ``environment`` (``environment()``).

    Process 0 writes ``done.json``; every process then waits at a barrier named
    after the stage, so all of them see the stage's files before the next one."""
    if run.done(name) and not force:
        return {**run.summary(name), "skipped": True}
    start, cpu = time.perf_counter(), time.process_time()
    summary = dict(fn() or {})
    summary["seconds"] = time.perf_counter() - start
    summary["cpu_seconds"] = time.process_time() - cpu
    summary["environment"] = environment()
    run.mark_done(name, summary)
    sharding.sync_processes(f"stage {name} done")
    return summary


# ----------------------------------------------------------------------------- models

def _query_block(block: ml_collections.ConfigDict) -> int:
    """The model block's ``query_block`` (Qwen3Config.query_block; 0 when a config lacks it)."""
    return int(block.get("query_block", 0))


def model_config(block: ml_collections.ConfigDict, vocab_size: int) -> Qwen3Config:
    """Architecture of a ``source='config'`` model block (vocab from the tokenizer)."""
    return Qwen3Config(vocab_size=int(vocab_size), hidden_size=block.hidden_size,
                       intermediate_size=block.intermediate_size, num_layers=block.num_layers,
                       num_heads=block.num_heads, num_kv_heads=block.num_kv_heads,
                       head_dim=block.head_dim, rope_theta=float(block.rope_theta),
                       max_position_embeddings=block.max_position_embeddings,
                       dtype=block.dtype, param_dtype=block.param_dtype,
                       initializer_range=float(block.get("initializer_range", 0.02)),
                       query_block=_query_block(block))


def build_model(block: ml_collections.ConfigDict, tokenizer: Tokenizer, *, seed: int) -> Qwen3:
    """The starting decoder: a fresh one, or a local Hugging Face checkpoint.

    An HF model whose vocabulary is smaller than the tokenizer's (the control
    tokens were added) gets its embedding rows extended with small random rows.
    """
    if block.source == "config":
        return Qwen3(model_config(block, tokenizer.vocab_size), rngs=nnx.Rngs(seed))
    from models.hf import load_hf  # noqa: PLC0415 (only the real-scale configs need it)

    model = load_hf(block.hf_path, dtype=block.dtype, param_dtype=block.param_dtype,
                    query_block=_query_block(block))
    return grow_vocab(model, tokenizer.vocab_size, seed=seed)


def grow_vocab(model: Qwen3, vocab_size: int, *, seed: int) -> Qwen3:
    """``model`` with at least ``vocab_size`` embedding rows (new rows ~ N(0, init std))."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    config = model.config
    if vocab_size <= config.vocab_size:
        return model
    if not config.tie_word_embeddings:
        raise ValueError(f"model.hf_path: the tokenizer has {vocab_size} ids, the untied "
                         f"checkpoint {config.vocab_size}; grow only tied embeddings")
    extra = vocab_size - config.vocab_size
    grown = Qwen3(dataclasses.replace(config, vocab_size=vocab_size), rngs=nnx.Rngs(seed))
    _, state = nnx.split(model)
    old = state["embed"][...]
    rows = config.initializer_range * jax.random.normal(jax.random.key(seed), (extra, old.shape[1]))
    state["embed"].set_value(jnp.concatenate([old, rows.astype(old.dtype)], axis=0))
    nnx.update(grown, state)
    return grown


def export_model(model: Qwen3, stage_dir: str) -> None:
    """Write the decoder to ``<stage_dir>/model`` and its architecture to
    ``<stage_dir>/model.json`` (``models.model_dir.save_model``)."""
    model_dir.save_model(model, stage_dir, description=dataclasses.asdict(model.config),
                         description_file=MODEL_FILE)


def load_model(stage_dir: str) -> Qwen3:
    """The decoder exported by :func:`export_model`."""
    return model_dir.load_model(stage_dir, lambda arch: Qwen3(Qwen3Config(**arch),
                                                              rngs=nnx.Rngs(0)),
                                description_file=MODEL_FILE)[0]


def fingerprint(payload: Any) -> str:
    """16 hex digits of the SHA-256 of ``payload`` as sorted-key JSON: the name of a
    directory of partial work (e.g. ``<stage>/partial/<fingerprint>``) made from the
    settings, inputs and models it depends on, so that work made under other ones is
    never read back."""
    blob = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_record(run: Run, stage: str) -> str | None:
    """The text of ``stage``'s done.json (None if not done): what identifies the model
    or files that stage made, for a fingerprint."""
    if not run.done(stage):
        return None
    with open(run.path(stage, DONE_FILE)) as f:
        return f.read()


# ----------------------------------------------------------------------------- JSONL

def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """One sorted-key JSON object per line, written atomically; on process 0 only
    (every process computes the same rows; see the module docstring). Strict JSON:
    a non-finite float is written as null (``strict_json``)."""
    if not sharding.is_main_process():
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(strict_json(row), sort_keys=True, separators=(",", ":"),
                               allow_nan=False) + "\n")
    os.replace(path + ".tmp", path)


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def check_strict_json(path: str) -> int:
    """Parse ``path`` (``.json`` whole, ``.jsonl`` line by line) as strict JSON, as jq or
    JavaScript would: NaN / Infinity raise ValueError naming file:line. Returns the
    number of JSON values read."""
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            try:
                json.load(f, parse_constant=_refuse_constant)
            except ValueError as err:
                raise ValueError(f"{path}: not strict JSON ({err})") from None
            return 1
        count = 0
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    json.loads(line, parse_constant=_refuse_constant)
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not strict JSON ({err})") from None
                count += 1
        return count


def read_jsonl(path: str, *, required: tuple[str, ...] = (),
               types: dict[str, tuple[type, ...]] | None = None) -> list[dict[str, Any]]:
    """The JSON object of each non-blank line; a line that is not UTF-8 or not a JSON
    object, lacks a field named in ``required`` or holds a field of another type
    than ``types`` gives (bools are never ints) raises ValueError naming file:line."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 (byte {raw[err.start]:#04x} at "
                                 f"column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: malformed JSON ({err.msg} at column "
                                 f"{err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise ValueError(f"{path}:{number}: missing field(s) {missing}; a row needs "
                                 f"{list(required)}")
            for key, kinds in (types or {}).items():
                value = row.get(key)
                if key in row and (not isinstance(value, kinds) or
                                   (isinstance(value, bool) and bool not in kinds)):
                    names = " or ".join(k.__name__ for k in kinds)
                    raise ValueError(f"{path}:{number}: field {key!r} must be {names}, got "
                                     f"{json.dumps(value)[:40]}")
            rows.append(row)
    return rows
