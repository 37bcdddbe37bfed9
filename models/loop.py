"""The resumable training loop of every trainer (SFT stages, the compressor, the tree lab).

One function, no Trainer class: the caller builds the state and the jitted step
(``models.training``), says how to make the batch of step ``t``, and gets the
trained state back::

    optimizer, schedule = models.optim.make_optimizer(block.optim, name="sft.optim")
    graphdef, state = create_train_state(model, optimizer, rng=seed)
    state, shardings = sharding.place_state(state, mesh)
    step_fn = sharding.jit_train_step(make_train_step(graphdef, loss_fn, optimizer,
                                                      schedule=schedule), shardings)
    result = train_loop(state, step_fn, lambda t: (make_batch(t), 0), steps=1000,
                        directory=stage_dir, checkpoint_every=100, shardings=shardings)
    model = merge_model(graphdef, result.state, average=True)

What it does, in order: restore the newest checkpoint of ``<directory>/checkpoints``
(so a killed run resumes where it was; the batches must be a pure function of
the step for the resumed run to be the same run), then for each remaining step
make the batch, step, write the step's record to ``<directory>/metrics.jsonl``
(and TensorBoard), advance the progress bar, check for non-finite updates and
save on the checkpoint interval; the last step is always saved, and pending
writes are committed also when a step raises.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

from models.checkpoint import CheckpointManager, abstract_tree
from models.metrics import MetricWriter, Progress
from models.training import check_finite_updates

__all__ = ["LoopResult", "every_n_record", "train_loop"]

log = logging.getLogger(__name__)

BatchFn = Callable[[int], tuple[Any, int]]
RecordFn = Callable[[int, Any, Mapping[str, jax.Array]], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class LoopResult:
    """``state`` after ``steps``; ``start``: the step it resumed from (0: a fresh run);
    ``seconds`` and ``tokens`` (the batch functions' counts) of this call's steps;
    ``final_loss``: the last recorded loss (NaN when no record held one)."""
    state: Any
    start: int
    seconds: float
    tokens: int
    final_loss: float


def every_n_record(every: int, steps: int, *, prefix: str = "train/") -> RecordFn:
    """A record function: every ``every`` steps and at the last, all the step's metrics
    under ``prefix``; nothing on the other steps."""
    def record(done: int, state: Any, metrics: Mapping[str, jax.Array]) -> dict[str, Any]:
        del state
        if done % every == 0 or done == steps:
            return {f"{prefix}{k}": v for k, v in metrics.items()}
        return {}
    return record


def train_loop(state: Any, step_fn: Callable[[Any, Any], tuple[Any, Mapping[str, jax.Array]]],
               batch_fn: BatchFn, *, steps: int, directory: str, checkpoint_every: int,
               record: RecordFn | None = None, log_every: int = 10,
               shardings: Any = None, max_to_keep: int = 2, metadata: dict | None = None,
               desc: str | None = None, bar_keys: Mapping[str, str] | None = None,
               loss_key: str = "train/loss", max_consecutive_skips: int | None = None,
               name: str = "train", quiet: bool = False, tensorboard: bool = True
               ) -> LoopResult:
    """Train ``state`` with ``step_fn`` up to ``steps`` steps, resuming from its checkpoints.

    Args:
      state: the initial train state (placed on its devices); replaced by the
        newest checkpoint of ``<directory>/checkpoints`` when there is one.
      step_fn: ``(state, batch) -> (state, metrics)``, typically jitted with donation.
      batch_fn: ``step -> (batch, tokens)``: the placed batch of 0-based step
        ``step`` and the number of tokens it holds (for the rate; 0 if unknown).
      steps: the total number of steps of the run (not of this call).
      directory: holds ``checkpoints/`` and ``metrics.jsonl`` (records after the
        restored step are dropped on resume, so the file matches the state).
      checkpoint_every: save interval in steps (the last step is always saved).
      record: ``(steps done, state, metrics) -> {name: scalar}`` written for the
        step (nothing when empty); default ``every_n_record(log_every, steps)``.
      shardings: the state's shardings, to restore onto the same placement.
      max_to_keep: checkpoints kept (2: a corrupted newest one falls back).
      metadata: JSON saved beside every checkpoint.
      desc, quiet: the progress bar's label; ``quiet`` draws none.
      bar_keys: ``{label: record key}`` shown after the bar; default ``{'loss': loss_key}``.
      loss_key: the record key whose last value is ``final_loss``.
      max_consecutive_skips: stop with ``NonFiniteError`` after this many skipped
        (non-finite) updates in a row (``check_finite_updates``); None: no check.
      name: the run's name in log messages.
      tensorboard: also write TensorBoard events.
    """
    if record is None:
        record = every_n_record(log_every, steps)
    bar_keys = {"loss": loss_key} if bar_keys is None else dict(bar_keys)
    manager = CheckpointManager(os.path.join(directory, "checkpoints"), max_to_keep=max_to_keep,
                                save_interval_steps=checkpoint_every)
    start = 0
    try:
        if manager.latest_step() is not None:
            start, state, _ = manager.restore(target=abstract_tree(state, shardings))
            log.info("%s: resuming at step %d", name, start)
        t0, tokens, loss = time.perf_counter(), 0, float("nan")
        with MetricWriter(directory, resume_step=start, tensorboard=tensorboard) as writer, \
                Progress(steps, initial=start, desc=desc, quiet=quiet) as bar:
            for step in range(start, steps):
                batch, n_tokens = batch_fn(step)
                state, metrics = step_fn(state, batch)
                tokens += int(n_tokens)
                done = step + 1
                row = record(done, state, metrics)
                if row:
                    writer.write(done, row)
                    if loss_key in row:
                        loss = float(row[loss_key])
                    shown = {label: row[key] for label, key in bar_keys.items() if key in row}
                    if shown:
                        bar.set_metrics(shown)
                bar.update()
                if max_consecutive_skips is not None:
                    check_finite_updates(metrics, step=done, name=name,
                                         max_consecutive=max_consecutive_skips)
                manager.save(done, state, metadata)
            manager.save(steps, state, metadata, force=True)
    finally:
        manager.close()   # commits the last started save, also when a step failed
    return LoopResult(state=state, start=start, seconds=time.perf_counter() - t0,
                      tokens=tokens, final_loss=loss)
