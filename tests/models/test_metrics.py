"""Tests for models/metrics.py: JSONL + TensorBoard records, progress bar, timers."""
import glob
import io
import logging
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from models import metrics


def read_events(run_dir):
    """(tag, step, value) of every scalar in the TFRecord event files under run_dir."""
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                out.append((value.tag, event.step, value.simple_value))
    return out


def test_writer_jsonl_and_tensorboard(tmp_path):
    with metrics.MetricWriter(tmp_path, enabled=True) as writer:
        writer.write(1, {"train/loss": jnp.float32(2.5), "tokens": np.int32(40), "skipped": False})
        writer.write(2, {"train/loss": float("nan"), "tokens": 41, "skipped": True})
    records = metrics.read_metrics(tmp_path)
    assert [(r["step"], r["train/loss"], r["tokens"], r["skipped"]) for r in records] == \
        [(1, 2.5, 40, False), (2, None, 41, True)]
    assert all(isinstance(r["time"], float) for r in records)
    lines = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
    assert len(lines) == 2 and "NaN" not in lines[1]  # strict JSON
    events = read_events(str(tmp_path))
    assert ("train/loss", 1, 2.5) in events and ("tokens", 2, 41.0) in events
    nan_loss = [v for tag, step, v in events if tag == "train/loss" and step == 2]
    assert len(nan_loss) == 1 and np.isnan(nan_loss[0])


def test_non_finite_metrics_warn_once_per_name(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        with metrics.MetricWriter(tmp_path, enabled=True) as writer:
            for step in range(3):
                writer.write(step, {"rl/acc_40": float("nan"), "loss": float("inf"), "ok": 1.0})
    texts = [r.getMessage() for r in caplog.records]
    assert not any("NaN or Inf found" in t for t in texts)   # tensorboardX's per-call line
    assert sum("metric 'rl/acc_40' is nan" in t for t in texts) == 1
    assert sum("metric 'loss' is inf" in t for t in texts) == 1
    assert len([e for e in read_events(str(tmp_path)) if e[0] == "rl/acc_40"]) == 3
    assert logging.getLogger("tensorboardX.x2num").disabled is False


def test_writer_rejects_bad_metrics(tmp_path):
    with metrics.MetricWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="metric 'logits' must be a real scalar"):
            writer.write(0, {"logits": jnp.zeros(3)})
        with pytest.raises(ValueError, match=r"reserved"):
            writer.write(0, {"step": 1})


def test_disabled_writer_writes_nothing(tmp_path):
    with metrics.MetricWriter(tmp_path / "run", enabled=False) as writer:
        writer.write(0, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "run")


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    with metrics.MetricWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
    with metrics.MetricWriter(tmp_path, enabled=True, tensorboard=False, resume_step=3) as writer:
        writer.write(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(tmp_path)] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_progress_shows_step_rate_and_metrics():
    out = io.StringIO()
    with metrics.Progress(10, initial=2, desc="sft", enabled=True, file=out,
                          mininterval=0) as bar:
        bar.update(metrics={"loss": np.float32(0.123456), "skipped": 0})
        bar.update(2)
    text = out.getvalue()
    assert bar.n == 5 and "sft" in text and "5/10" in text
    assert "loss=0.1235" in text and "skipped=0" in text and "step/s" in text


def test_progress_quiet_draws_nothing():
    out = io.StringIO()
    with metrics.Progress(10, quiet=True, file=out) as bar:
        bar.update(3, metrics={"loss": 1.0})
    assert bar.n == 3 and out.getvalue() == ""


def test_timer_sums_phases_with_a_fake_clock():
    ticks = iter([0.0, 1.5, 2.0, 2.25, 10.0, 13.0])
    timer = metrics.Timer(clock=lambda: next(ticks))
    with timer.phase("rollout") as t:
        assert t.block(jnp.ones(2)).sum() == 2.0
    with timer.phase("update"):
        pass
    with timer.phase("rollout"):
        pass
    assert timer.counts() == {"rollout": 2, "update": 1}
    assert timer.pop() == {"time/rollout": 4.5, "time/update": 0.25}
    assert timer.totals() == {}
