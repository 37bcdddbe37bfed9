"""Sampling responses, parsing and judging them: shared by self-CoT, calibration, RL, evaluation.

``generate_responses`` runs ``models.sampling.generate`` over many prompts in
fixed-size batches with one prompt width (the longest prompt rounded up to a
multiple of ``prompt_bucket``), so a stage compiles the sampler once; a short
last batch is filled with copies of its first prompt, whose outputs are dropped.

On a device mesh (``mesh=``, ``models.sharding``) the parameters are placed by
the logical-axis rules and each batch's prompt rows are split over the batch
axes (``data x fsdp``): the batch is filled with those same copies up to a
multiple of ``batch_ways(mesh)`` rows, and the outputs come back with
``sharding.to_host`` (a gather across hosts). ``mesh=None`` takes the mesh the
parameters already live on (e.g. the RL policy, placed by ``sharding.place_state``;
``place_model`` places a loaded model once per stage), and parameters on no
mesh decode on their device as before. Greedy outputs do not depend on the mesh.

``judge`` parses each response with ``data.formats.parse_response`` and checks
the answer with ``data.answers.is_equivalent`` (never ``eval``)::

    valid    control token first (when expected), a closed think span, a \\boxed answer
    correct  valid and the answer equals the gold answer
    level    the emitted <COMP_xx> level (None if absent)
    think    think length in tokens (strictly between <think> and </think>)
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from data.answers import is_equivalent
from data.formats import Control, build_prompt, parse_response
from data.tokenizers import Tokenizer
from experiments.extra_cot.datasets import Question, bucket_width, pad_left
from experiments.rundir import read_jsonl, write_jsonl
from models import sharding
from models.qwen3 import Qwen3
from models.sampling import generate, score

__all__ = ["Judged", "place_model", "generate_responses", "judge", "answer_questions",
           "level_logprobs", "RolloutGroups", "rollout_groups"]


@dataclasses.dataclass(frozen=True)
class Judged:
    """The verdict on one response."""

    valid: bool
    correct: bool
    level: int | None
    think_length: int
    cot_ids: tuple[int, ...]
    answer: str | None = None     # the extracted answer, None when there is none
    text: str = ""                # the response decoded (through <|im_end|>)

    def row(self) -> dict:
        return {"valid": self.valid, "correct": self.correct, "level": self.level,
                "think_length": self.think_length, "answer": self.answer,
                "response": self.text}

    @classmethod
    def from_row(cls, row: dict) -> Judged:
        """The verdict that ``{**row(), 'cot_ids': [...]}`` was written from."""
        return cls(valid=bool(row["valid"]), correct=bool(row["correct"]), level=row["level"],
                   think_length=int(row["think_length"]),
                   cot_ids=tuple(int(i) for i in row["cot_ids"]), answer=row["answer"],
                   text=row["response"])


def place_model(model: Qwen3, mesh: Mesh) -> Qwen3:
    """``model`` with its state on ``mesh`` by the logical-axis rules (parameters
    sharded, the rest replicated); a new module, ``model`` is left as it is."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _on_mesh(state, mesh))


def _on_mesh(state, mesh: Mesh):
    """``state`` placed by the rules (a no-op for leaves already there). On several
    processes, leaves that are not yet on ``mesh`` (e.g. a model every host loaded
    on its own device) go through host memory (``sharding.put_global``;
    tests/extra_cot/test_multihost.py runs it on two processes)."""
    return sharding.put_global(state, sharding.state_shardings(state, mesh))


def _mesh_of(state) -> Mesh | None:
    """The mesh of the first ``NamedSharding``-placed array of ``state`` (None if none)."""
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding):
            return leaf.sharding.mesh
    return None


def generate_responses(model: Qwen3, prompts: Sequence[Sequence[int]], *, tokenizer: Tokenizer,
                       batch_size: int, max_new_tokens: int, temperature: float = 0.0,
                       key: jax.Array | None = None, prompt_bucket: int = 32,
                       prompt_width: int | None = None, mesh: Mesh | None = None,
                       desc: str | None = None, batch_offset: int = 0) -> list[np.ndarray]:
    """Response ids of every prompt (through the stop token ``<|im_end|>`` when emitted).

    ``key`` is needed when ``temperature > 0``; batch b draws with
    ``fold_in(key, batch_offset + b)`` (``batch_offset``: the batches that came before,
    when the prompts are a later chunk of a longer list).
    ``prompt_width`` fixes the padded prompt width (default: the longest prompt
    rounded up to a multiple of ``prompt_bucket``). ``mesh``: decode with the rows
    of each batch (``batch_size`` rounded up to a multiple of
    ``sharding.batch_ways(mesh)``) split over the mesh; sampled (not greedy)
    draws then depend on that row count. ``desc``: a progress bar over the prompts
    (process 0, when there is more than one batch).
    """
    if not prompts:
        return []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    graphdef, state = nnx.split(model)
    mesh = _mesh_of(state) if mesh is None else mesh
    rows = batch_size
    if mesh is not None:
        ways = sharding.batch_ways(mesh)
        rows = -(-batch_size // ways) * ways
        state = _on_mesh(state, mesh)
    width = prompt_width or bucket_width(max(len(p) for p in prompts), prompt_bucket)
    out: list[np.ndarray] = []
    bar = tqdm.tqdm(total=len(prompts), desc=desc, unit="q", leave=False,
                    disable=desc is None or len(prompts) <= batch_size
                    or not sharding.is_main_process())
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        real = len(chunk)
        chunk += [chunk[0]] * (rows - real)
        ids, mask = pad_left(chunk, width=width, pad_id=tokenizer.pad_id)
        if mesh is not None:
            ids, mask = sharding.shard_batch((ids, mask), mesh, process_local=False)
        result = generate(graphdef, state, ids, mask, max_new_tokens=max_new_tokens,
                          temperature=temperature, stop_ids=(tokenizer.eos_id,),
                          pad_id=tokenizer.pad_id,
                          key=None if key is None else jax.random.fold_in(
                              key, batch_offset + b))
        tokens, lengths = sharding.to_host((result.tokens, result.lengths))
        out.extend(tokens[r, :lengths[r]].copy() for r in range(real))
        bar.update(real)
    bar.close()
    return out


def judge(tokenizer: Tokenizer, response: Sequence[int], gold: str, *,
          expect_control: bool, with_text: bool = True) -> Judged:
    """Parse one response and check its answer against ``gold``; ``with_text``: keep the
    decoded response (the RL rollouts, which never write it, skip the decode)."""
    parsed = parse_response(tokenizer, response, expect_control=expect_control)
    correct = bool(parsed.valid and is_equivalent(parsed.answer, gold))
    text = tokenizer.decode(_through_stop(tokenizer, response)) if with_text else ""
    return Judged(valid=bool(parsed.valid), correct=correct, level=parsed.level,
                  think_length=int(parsed.think_length), cot_ids=tuple(parsed.cot_ids),
                  answer=parsed.answer, text=text)


def _through_stop(tokenizer: Tokenizer, response: Sequence[int]) -> list[int]:
    """The ids up to and including the first ``<|im_end|>``, in the vocabulary."""
    ids = [int(i) for i in response if 0 <= int(i) < tokenizer.vocab_size]
    stop = tokenizer.eos_id
    return ids[:ids.index(stop) + 1] if stop in ids else ids


def answer_questions(model: Qwen3, tokenizer: Tokenizer, questions: Sequence[Question], *,
                     control: Control, batch_size: int, max_new_tokens: int,
                     temperature: float = 0.0, key: jax.Array | None = None,
                     mesh: Mesh | None = None, levels: Sequence[int] | None = None,
                     desc: str | None = None, resume_dir: str | None = None,
                     chunk_batches: int = 4) -> list[Judged]:
    """Greedy (or sampled) answers to ``questions`` in one mode, judged.

    ``control``: None (base mode), a level (``<COMP_xx>`` prompts, the response
    must start with a control token) or ``'policy'``. ``levels`` (policy mode
    only): one level per question that opens its response (``<COMP_level>`` is
    forced, the rest decoded), as the RL stage's forced rollouts are. ``mesh`` and
    ``desc`` (a progress bar): see :func:`generate_responses`.

    ``resume_dir``: answer in chunks of ``chunk_batches * batch_size`` questions and
    keep each chunk's verdicts in ``<resume_dir>/<first question>.jsonl`` (process 0
    writes) as soon as it is judged; a chunk found there is read back, not answered
    again, so a killed stage resumes at its first unfinished chunk. The chunks share
    one prompt width and the batch numbering of the whole list, so the answers are
    those of one call without ``resume_dir`` (greedy or sampled). The caller names
    the directory after everything the answers depend on and removes it when done.
    """
    if resume_dir is not None:
        return _answer_in_chunks(model, tokenizer, questions, control=control,
                                 batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 temperature=temperature, key=key, mesh=mesh, levels=levels,
                                 desc=desc, resume_dir=resume_dir, chunk_batches=chunk_batches)
    return _answer(model, tokenizer, questions, control=control, batch_size=batch_size,
                   max_new_tokens=max_new_tokens, temperature=temperature, key=key, mesh=mesh,
                   levels=levels, desc=desc)


def _answer_in_chunks(model, tokenizer, questions, *, resume_dir: str, chunk_batches: int,
                      batch_size: int, control: Control, levels, desc, **kwargs) -> list[Judged]:
    if isinstance(chunk_batches, bool) or not isinstance(chunk_batches, int) or chunk_batches < 1:
        raise ValueError(f"chunk_batches={chunk_batches!r} must be an int >= 1")
    if not questions:
        return []
    size = chunk_batches * batch_size
    width = bucket_width(max(len(build_prompt(tokenizer, q.question, control=control))
                             for q in questions) + (levels is not None), 32)
    starts = range(0, len(questions), size)
    paths = [os.path.join(resume_dir, f"{start:07d}.jsonl") for start in starts]
    before = {p for p in paths if os.path.exists(p)}      # decided once: every process alike
    if sharding.is_main_process():
        os.makedirs(resume_dir, exist_ok=True)
    out: list[Judged] = []
    bar = tqdm.tqdm(total=len(questions), desc=desc, unit="q", leave=False,
                    disable=desc is None or len(questions) <= batch_size
                    or not sharding.is_main_process())
    for start, path in zip(starts, paths):
        part = questions[start:start + size]
        if path in before:
            rows = read_jsonl(path)
            if [r.get("uid") for r in rows] != [q.uid for q in part]:
                raise ValueError(f"{path}: its {len(rows)} verdicts are not those of this "
                                 f"chunk's {len(part)} questions; remove {resume_dir} to "
                                 "answer them again")
            judged = [Judged.from_row(r) for r in rows]
        else:
            judged = _answer(model, tokenizer, part, control=control, batch_size=batch_size,
                             levels=None if levels is None else levels[start:start + size],
                             prompt_width=width, batch_offset=start // batch_size, **kwargs)
            write_jsonl(path, [{**j.row(), "cot_ids": list(j.cot_ids), "uid": q.uid}
                               for q, j in zip(part, judged)])
        out += judged
        bar.update(len(part))
    bar.close()
    return out


def _answer(model: Qwen3, tokenizer: Tokenizer, questions: Sequence[Question], *,
            control: Control, batch_size: int, max_new_tokens: int, temperature: float = 0.0,
            key: jax.Array | None = None, mesh: Mesh | None = None,
            levels: Sequence[int] | None = None, desc: str | None = None,
            prompt_width: int | None = None, batch_offset: int = 0) -> list[Judged]:
    prompts = [build_prompt(tokenizer, q.question, control=control) for q in questions]
    forced: list[list[int]] = [[] for _ in questions]
    if levels is not None:
        if control != "policy" or len(levels) != len(questions):
            raise ValueError(f"levels: one per question ({len(questions)}) in policy mode; "
                             f"got {len(levels)} with control={control!r}")
        unknown = sorted({lv for lv in levels if lv not in tokenizer.control_ids})
        if unknown:
            raise ValueError(f"levels {unknown} have no control token; known: "
                             f"{sorted(tokenizer.control_ids)}")
        forced = [[tokenizer.control_ids[lv]] for lv in levels]
    responses = generate_responses(model, [p + f for p, f in zip(prompts, forced)],
                                   tokenizer=tokenizer, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, temperature=temperature,
                                   key=key, mesh=mesh, desc=desc, prompt_width=prompt_width,
                                   batch_offset=batch_offset)
    return [judge(tokenizer, np.concatenate([np.asarray(f, np.int32), r]), q.answer,
                  expect_control=control is not None)
            for f, r, q in zip(forced, responses, questions)]


def level_logprobs(model: Qwen3, tokenizer: Tokenizer, questions: Sequence[Question], *,
                   levels: Sequence[int], batch_size: int,
                   prompt_bucket: int = 32) -> np.ndarray:
    """log pi(<COMP_k> | policy prompt) for each question and level k, float32 [Q, K].

    The policy's own preference among the levels as the first response token (log
    probabilities over the whole vocabulary, in one teacher-forced pass per batch;
    a row's normaliser is the same for every level, so argmax rules are unchanged
    by renormalising over the K levels).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    if not questions:
        return np.zeros((0, len(levels)), np.float32)
    ids = np.asarray([tokenizer.control_ids[lv] for lv in levels], np.int32)
    graphdef, state = nnx.split(model)
    prompts = [build_prompt(tokenizer, q.question, control="policy") for q in questions]
    width = bucket_width(max(len(p) for p in prompts), prompt_bucket)
    k, out = len(levels), []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - real)     # one compiled shape
        p_ids, p_mask = pad_left([p for p in chunk for _ in range(k)], width=width,
                                 pad_id=tokenizer.pad_id)
        c_ids = np.tile(ids, len(chunk))[:, None]
        logp = score(graphdef, state, p_ids, p_mask, c_ids, np.ones_like(c_ids, bool))
        out.append(np.asarray(logp, np.float32).reshape(len(chunk), k)[:real])
    return np.concatenate(out)


# ----------------------------------------------------------------------------- RL rollout groups

@dataclasses.dataclass
class RolloutGroups:
    """One RL rollout batch: ``len(questions) * group_size`` rows, prompt-major.

    Row layout per prompt: ``policy_samples`` policy-mode rollouts (subgroup 0),
    then ``forced_samples`` rollouts for each forced level j (subgroup 1 + j),
    whose response is forced to open with ``<COMP_level>`` and continues from
    the policy. Every row is scored under the <COMP_POLICY> prompt, the control
    token being the completion's first token.
    """

    prompt_ids: np.ndarray        # int32 [N, P], left-padded policy prompts
    prompt_mask: np.ndarray       # bool [N, P]
    completion_ids: np.ndarray    # int32 [N, C], right-padded (control token first)
    completion_mask: np.ndarray   # bool [N, C]
    group_ids: np.ndarray         # int32 [N], the prompt of each row
    local_ids: np.ndarray         # int32 [N], 0 = policy, 1 + j = forced level j
    judged: list[Judged]


def rollout_groups(model: Qwen3, tokenizer: Tokenizer, questions: Sequence[Question], *,
                   policy_samples: int, forced_levels: Sequence[int], forced_samples: int,
                   max_new_tokens: int, temperature: float, key: jax.Array,
                   prompt_width: int, completion_bucket: int, mesh: Mesh | None = None
                   ) -> RolloutGroups:
    """Sample every rollout of one RL step and judge it (see :class:`RolloutGroups`).

    All rollouts are one batch; ``mesh`` splits its rows (see :func:`generate_responses`).
    """
    control = tokenizer.control_ids
    prompts, forced, groups, local = [], [], [], []
    for g, q in enumerate(questions):
        base = build_prompt(tokenizer, q.question, control="policy")
        plan = [(None, 0)] * policy_samples + [
            (level, 1 + j) for j, level in enumerate(forced_levels) for _ in range(forced_samples)]
        for level, sub in plan:
            prompts.append(base)
            forced.append([] if level is None else [control[level]])
            groups.append(g)
            local.append(sub)
    responses = generate_responses(
        model, [p + f for p, f in zip(prompts, forced)], tokenizer=tokenizer,
        batch_size=len(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
        key=key, prompt_width=prompt_width, mesh=mesh)
    completions = [np.concatenate([np.asarray(f, np.int32), r]).astype(np.int32)
                   for f, r in zip(forced, responses)]
    width = bucket_width(max(len(c) for c in completions), completion_bucket)
    completion_ids = np.full((len(prompts), width), tokenizer.pad_id, np.int32)
    completion_mask = np.zeros((len(prompts), width), bool)
    for r, c in enumerate(completions):
        completion_ids[r, :len(c)], completion_mask[r, :len(c)] = c, True
    prompt_ids, prompt_mask = pad_left(prompts, width=prompt_width, pad_id=tokenizer.pad_id)
    judged = [judge(tokenizer, c, questions[g].answer, expect_control=True, with_text=False)
              for c, g in zip(completions, groups)]
    return RolloutGroups(prompt_ids, prompt_mask, completion_ids, completion_mask,
                         np.asarray(groups, np.int32), np.asarray(local, np.int32), judged)
