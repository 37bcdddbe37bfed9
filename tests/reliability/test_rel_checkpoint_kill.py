"""A real SIGKILL during a checkpoint save never becomes the latest step (issue 10).

The simulated failures (a leftover temporary directory, a step without its
commit marker, a failed commit, corrupted files with fallback and warning) are
tests/models/test_checkpoint.py. Here a child process saves through
models.checkpoint.CheckpointManager and is killed with SIGKILL:

- inside Orbax's commit (the data written, the rename not done), with
  ``max_to_keep=1``: the previous step survives and stays the latest;
- at seeded random moments of a save loop: whatever is on disk, the latest
  committed step restores bit-exactly and no in-flight step is counted.

Then a new manager saves the next step over the interrupted one. (Orbax removes
the leftover ``<step>.orbax-checkpoint-tmp`` in a background task started when
a manager opens and awaited by its first save; until then the directory is
present but never counted.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest

from models.checkpoint import CheckpointManager, abstract_tree

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from models.checkpoint import CheckpointManager

    def state(k):
        return {"w": jnp.full((256, 256), k, jnp.float32),
                "b": [jnp.arange(4096, dtype=jnp.int32) * k + i for i in range(16)]}

    mode, directory = sys.argv[1], sys.argv[2]
    manager = CheckpointManager(directory, max_to_keep=1 if mode == "commit" else 2)
    if mode == "commit":
        manager.save(1, state(1)); manager.wait()
        from orbax.checkpoint._src.path import atomicity

        async def stall(self, *args, **kwargs):
            print("IN_COMMIT", flush=True)
            time.sleep(120)

        atomicity.AtomicRenameTemporaryPath.finalize = stall
        manager.save(2, state(2)); manager.wait()
    else:
        for k in range(1, 10_000):
            manager.save(k, state(k))
            print("SAVING", k, flush=True)
""")


def state(k):
    return {"w": jnp.full((256, 256), k, jnp.float32),
            "b": [jnp.arange(4096, dtype=jnp.int32) * k + i for i in range(16)]}


def run_and_kill(tmp_path, mode: str, until: str, delay: float) -> str:
    """Start the child, SIGKILL it ``delay`` s after it prints ``until``; return its directory."""
    script, directory = tmp_path / "child.py", tmp_path / f"ckpt-{mode}"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), mode, str(directory)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if line.strip() == until or time.monotonic() > deadline:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return str(directory)


def assert_latest_restores_exactly(directory: str) -> int:
    with CheckpointManager(directory) as manager:
        latest = manager.latest_step()
        assert latest is not None
        restored = manager.restore(target=abstract_tree(state(0)))
        assert restored.step == latest
        for got, want in zip(*(map(np.asarray, t) for t in
                               (restored.state["b"], state(latest)["b"]))):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.asarray(restored.state["w"]),
                                      np.asarray(state(latest)["w"]))
    return latest


def save_next(directory: str, step: int) -> None:
    """Saving goes on after the crash; Orbax's clean-up of the interrupted write (started
    in the background when a manager opens) has finished by the next commit."""
    with CheckpointManager(directory) as manager:
        assert manager.save(step, state(step))
        manager.wait()
        assert manager.latest_step() == step
    assert [n for n in os.listdir(directory) if "orbax-checkpoint-tmp" in n] == []


@pytest.mark.slow
def test_sigkill_inside_the_commit_keeps_the_previous_step(tmp_path):
    directory = run_and_kill(tmp_path, "commit", "IN_COMMIT", 0.0)
    names = os.listdir(directory)
    assert any("orbax-checkpoint-tmp" in n for n in names)   # step 2 was written, not committed
    assert "1" in names                                       # and step 1 not yet deleted
    assert assert_latest_restores_exactly(directory) == 1
    save_next(directory, 2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_moments_of_a_save_loop(tmp_path, seed):
    rng = np.random.default_rng(seed)
    start, delay = int(rng.integers(2, 5)), float(rng.uniform(0.0, 0.15))
    directory = run_and_kill(tmp_path, "loop", f"SAVING {start}", delay)
    latest = assert_latest_restores_exactly(directory)
    assert latest >= start - 1
    save_next(directory, latest + 1)
