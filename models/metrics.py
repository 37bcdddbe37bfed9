"""Scalar metrics (JSONL + TensorBoard), a tqdm progress bar and per-phase timers.

::

    with MetricWriter(run_dir) as writer, Progress(total, initial=start) as bar:
        for step in range(start, total):
            timer = Timer()
            with timer.phase("rollout") as t:
                rollouts = t.block(generate(...))
            ...
            writer.write(step, {**metrics, **timer.pop()})
            bar.update(metrics={"loss": metrics["loss"]})

Only the primary process writes or draws (``jax.process_index() == 0`` by default).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tqdm

log = logging.getLogger(__name__)
# tensorboardX logs "NaN or Inf found in input tensor." for every such scalar it is
# given; MetricWriter says it once per metric name instead
_TBX_LOG = logging.getLogger("tensorboardX.x2num")


@contextlib.contextmanager
def _silenced(logger: logging.Logger) -> Iterator[None]:
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled

__all__ = ["METRICS_FILE", "MetricWriter", "Progress", "Timer", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
_RESERVED = ("step", "time")


def _primary() -> bool:
    return jax.process_index() == 0


def _scalar(name: str, value: Any) -> bool | int | float:
    array = np.asarray(value)
    if array.ndim != 0 or array.dtype.kind not in "biuf":
        raise ValueError(f"metric {name!r} must be a real scalar, got {array.dtype} of shape "
                         f"{array.shape}")
    return array.item()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in file order."""
    with open(os.path.join(os.fspath(run_dir), METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
    """Writes ``{"step", "time", **metrics}`` lines to ``metrics.jsonl`` and TensorBoard scalars.

    Args:
      run_dir: created if missing; events files go to ``run_dir/tensorboard``.
      enabled: default ``jax.process_index() == 0``; a disabled writer ignores writes.
      tensorboard: also write TensorBoard event files (tensorboardX).
      resume_step: when resuming from a checkpoint at this step, drop JSONL records
        with a larger step and let TensorBoard purge its events after it, so the
        re-run steps are not recorded twice.

    Non-finite values are written to JSONL as ``null`` (strict JSON) and to
    TensorBoard as they are, with one warning per metric name (not one per step).
    Metric names may use '/' to group TensorBoard charts.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool | None = None,
                 tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = os.fspath(run_dir)
        self.enabled = _primary() if enabled is None else bool(enabled)
        self._file, self._tb = None, None
        self._non_finite: set[str] = set()
        if not self.enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, METRICS_FILE)
        if resume_step is not None and os.path.exists(path):
            self._truncate_after(path, int(resume_step))
        self._file = open(path, "a", buffering=1)  # line-buffered: each record reaches the OS
        if tensorboard:
            from tensorboardX import SummaryWriter
            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"), purge_step=purge,
                                     flush_secs=30)

    @staticmethod
    def _truncate_after(path: str, step: int) -> None:
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record scalar ``metrics`` at ``step`` (jax/numpy/python scalars; one device fetch)."""
        if not self.enabled:
            return
        clash = sorted(set(metrics) & set(_RESERVED))
        if clash:
            raise ValueError(f"metric names {clash} are reserved")
        values = {k: _scalar(k, v) for k, v in jax.device_get(dict(metrics)).items()}
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                if math.isfinite(value):
                    self._tb.add_scalar(name, float(value), global_step=int(step))
                    continue
                if name not in self._non_finite:
                    self._non_finite.add(name)
                    log.warning("metric '%s' is %s at step %d (null in %s, %s in TensorBoard; "
                                "said once per metric)", name, value, step, METRICS_FILE, value)
                with _silenced(_TBX_LOG):
                    self._tb.add_scalar(name, float(value), global_step=int(step))

    def write_text(self, tag: str, text: str, *, step: int = 0) -> None:
        """A text entry for TensorBoard (e.g. the resolved config)."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _format(value: Any) -> str:
    value = np.asarray(value).item() if hasattr(value, "shape") else value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """A tqdm bar over steps ``initial .. total`` showing step, rate, ETA and chosen metrics.

    ``quiet=True`` (or a non-primary process) draws nothing; counting still works.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str | None = None,
                 quiet: bool = False, enabled: bool | None = None, file: Any = None,
                 mininterval: float = 0.5):
        enabled = _primary() if enabled is None else enabled
        self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step",
                              disable=quiet or not enabled, file=file or sys.stderr,
                              mininterval=mininterval, dynamic_ncols=True)
        self.n = initial

    def set_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Show ``metrics`` after the bar (floats as 4 significant digits)."""
        self._bar.set_postfix({k: _format(v) for k, v in metrics.items()}, refresh=False)

    def update(self, n: int = 1, *, metrics: Mapping[str, Any] | None = None) -> None:
        if metrics:
            self.set_metrics(metrics)
        self.n += n
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Phase:
    @staticmethod
    def block(value: Any) -> Any:
        """Wait for ``value``'s device work (JAX dispatch is asynchronous), then return it."""
        return jax.block_until_ready(value)


class Timer:
    """Wall time per named phase, summed until ``reset``/``pop``.

    Time only what finished: call ``t.block(result)`` inside ``with timer.phase(...) as t``.
    """

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._totals: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[_Phase]:
        start = self._clock()
        try:
            yield _Phase()
        finally:
            self._totals[name] = self._totals.get(name, 0.0) + self._clock() - start
            self._counts[name] = self._counts.get(name, 0) + 1

    def totals(self, *, prefix: str = "time/") -> dict[str, float]:
        """``{prefix + name: seconds}`` summed over every entry of the phase."""
        return {prefix + k: v for k, v in self._totals.items()}

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def reset(self) -> None:
        self._totals.clear()
        self._counts.clear()

    def pop(self, *, prefix: str = "time/") -> dict[str, float]:
        """``totals`` then ``reset``: per-step phase times for a metrics record."""
        out = self.totals(prefix=prefix)
        self.reset()
        return out
