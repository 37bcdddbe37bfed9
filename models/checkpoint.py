"""Orbax checkpoints that never restore a half-written or corrupted step silently.

A step directory ``<dir>/<step>/`` holds three Orbax items:

- ``state``: the pytree (Orbax ``StandardSave``; typed PRNG keys are saved exactly,
  their implementation included);
- ``metadata``: the caller's JSON dict (config, data position, ...);
- ``manifest``: per-leaf shape, dtype and a checksum written by this module.

Guarantees:

- **Commit.** Orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it
  after writing ``commit_success.txt``. A step counts only if its directory has
  that marker. Temporary directories are removed when a manager opens; a step
  directory without the marker (e.g. a commit-file backend that crashed) is
  renamed to ``<step>.incomplete-<ns>`` so it can never become the latest.
- **Retention.** ``max_to_keep`` is Orbax's: old steps are deleted in the save's
  finalisation, *after* the new step has been committed. If the new save fails,
  nothing is deleted (the failure surfaces from ``wait``/``save``/``close``).
- **Fallback.** ``restore()`` without a step tries the newest step first. If it
  is unreadable (missing/truncated files, bad JSON, checksum mismatch) it logs a
  warning, tries the previous step, and once one restores, renames the
  unreadable ones to ``<step>.corrupt-<ns>`` (kept for inspection; later saves of
  those steps work again). If no step is readable it raises ``CheckpointError``
  and renames nothing. ``restore(step=k)`` never falls back.
- **Checksums.** Per leaf, two sums over its bits as uint32 words, computed on
  device (``[sum w_i, sum (i+1) w_i] mod 2**32``; exact under any sharding). A bit
  flip that still decodes is detected. Leaves restored to another dtype are not
  checked.
- A target that does not fit the checkpoint (missing/extra leaves, other shapes)
  raises ``CheckpointMismatchError`` at once: that is a caller error, not
  corruption, and never triggers fallback.

One writer per directory; all processes call every method (Orbax syncs them);
only process 0 renames directories.

Typical resume logic::

    manager = CheckpointManager(f"{run_dir}/checkpoints", max_to_keep=3, save_interval_steps=500)
    if manager.latest_step() is not None:
        _, state, meta = manager.restore(target=abstract_tree(state, shardings))
    for ...:
        state, metrics = train_step(state, batch)
        manager.save(int(state.step), state, {"data_position": position})
    manager.save(int(state.step), state, {"data_position": position}, force=True)
    manager.close()
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "CheckpointMismatchError", "Restored", "CheckpointManager",
           "abstract_tree", "local_target", "tree_checksums"]

log = logging.getLogger(__name__)

STATE, METADATA, MANIFEST = "state", "metadata", "manifest"
COMMIT_MARKER = "commit_success.txt"
_FORMAT = 1
_STEP_NAME = re.compile(r"(0|[1-9][0-9]*)")


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or restored."""


class CheckpointMismatchError(CheckpointError):
    """The restore target does not match the saved tree (a caller error)."""


class Restored(NamedTuple):
    """What ``restore`` returns; unpacks as ``step, state, metadata = manager.restore(...)``."""
    step: int
    state: Any
    metadata: dict


def abstract_tree(tree: Any, shardings: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves for a restore target.

    ``tree`` holds arrays or ShapeDtypeStructs (e.g. from ``jax.eval_shape``); the
    sharding is taken from ``shardings`` (a matching tree, to restore onto another
    mesh) or else from each leaf.
    """
    def one(x, sharding=None):
        sharding = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    if shardings is None:
        return jax.tree.map(one, tree)
    return jax.tree.map(one, tree, shardings)


def local_target(tree: Any) -> Any:
    """``abstract_tree(tree)`` on this process's first local device: the restore
    target for a model that every process loads whole (an exported model read
    before it is placed on a mesh). Without it Orbax restores onto the devices
    named in the checkpoint, which other hosts do not have."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return abstract_tree(tree, jax.tree.map(lambda _: device, tree))


def _leaf_name(path) -> str:
    names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    return "/".join(str(n) for n in names)


def _named_leaves(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_leaf_name(path): leaf for path, leaf in flat}


def _as_words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words (64-bit leaves give a trailing axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _checksum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    words = _as_words(x)
    index, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index, stride = index + iota * jnp.uint32(stride % 2**32), stride * words.shape[axis]
    # Two 0-d results: always replicated, so every process can read them.
    return jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * (index + 1), dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda leaves: [_checksum(x) for x in leaves])


def _checkable(x: Any) -> bool:
    if not isinstance(x, (jax.Array, np.ndarray)):
        return False
    return not jnp.issubdtype(x.dtype, jnp.complexfloating) and x.dtype != np.object_


def tree_checksums(tree: Any) -> dict[str, list[int] | None]:
    """``{leaf name: [sum w, sum (i+1) w] mod 2**32}`` over each array's bits.

    Leaves that are not arrays (Python scalars, strings) map to None.
    """
    named = _named_leaves(tree)
    names = [n for n, x in named.items() if _checkable(x)]
    sums = _checksums_jit([jnp.asarray(named[n]) for n in names]) if names else []
    host = [[int(np.asarray(part.addressable_data(0))) for part in pair] for pair in sums]
    out: dict[str, list[int] | None] = dict.fromkeys(named)
    out.update(zip(names, host, strict=True))
    return out


def _dtype_name(x: Any) -> str:
    return str(x.dtype) if hasattr(x, "dtype") else type(x).__name__


def _manifest(state: Any, step: int, *, checksums: bool) -> dict:
    named = _named_leaves(state)
    sums = tree_checksums(state) if checksums else dict.fromkeys(named)
    return {"format": _FORMAT, "step": step,
            "leaves": {n: {"shape": list(np.shape(x)), "dtype": _dtype_name(x), "checksum": sums[n]}
                       for n, x in named.items()}}


def _check_target(manifest: dict, target: Any, path: str) -> None:
    saved, wanted = manifest["leaves"], _named_leaves(target)
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    shapes = [f"{n}: saved {saved[n]['shape']}, target {list(np.shape(x))}"
              for n, x in wanted.items() if n in saved and list(np.shape(x)) != saved[n]["shape"]]
    if missing or extra or shapes:
        raise CheckpointMismatchError(
            f"restore target does not match checkpoint {path}: not in checkpoint {missing[:8]}, "
            f"not in target {extra[:8]}, shape differences {shapes[:8]}")


def _verify(manifest: dict, state: Any, path: str) -> None:
    saved, named = manifest["leaves"], _named_leaves(state)
    if set(named) != set(saved):
        log.warning("checkpoint %s: restored tree has other leaf names than the manifest; "
                    "checksums not verified", path)
        return
    comparable = {n: x for n, x in named.items()
                  if saved[n]["checksum"] is not None and _dtype_name(x) == saved[n]["dtype"]}
    sums = tree_checksums(comparable)
    bad = sorted(n for n, x in comparable.items() if sums[n] != saved[n]["checksum"])
    if bad:
        raise CheckpointError(f"checkpoint {path}: checksum mismatch in leaves {bad[:8]}")


class CheckpointManager:
    """Save and restore ``(step, state pytree, JSON metadata)`` under ``directory``.

    Args:
      directory: root; step ``k`` lives in ``directory/k``.
      max_to_keep: newest complete steps kept (None keeps all).
      save_interval_steps: ``save`` without ``force`` writes only when
        ``step % save_interval_steps == 0``.
      async_save: write in a background thread (``wait`` or the next save joins it).
      verify: write and check per-leaf checksums.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True, verify: bool = True):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep={max_to_keep!r} must be None or an int >= 1")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps!r} must be an int >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self._interval, self._verify = save_interval_steps, verify
        if jax.process_index() == 0:
            os.makedirs(self.directory, exist_ok=True)
            for name in sorted(os.listdir(self.directory)):
                path = os.path.join(self.directory, name)
                if _STEP_NAME.fullmatch(name) and os.path.isdir(path) \
                        and not os.path.exists(os.path.join(path, COMMIT_MARKER)):
                    self._set_aside(int(name), "incomplete")
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("chrpo_checkpoint_open")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, METADATA, MANIFEST))

    # ------------------------------------------------------------------ queries
    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def all_steps(self) -> list[int]:
        """Committed steps on disk (marker present), ascending; in-flight saves excluded."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory)
                      if _STEP_NAME.fullmatch(n) and os.path.exists(
                          os.path.join(self.directory, n, COMMIT_MARKER)))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return int(step) % self._interval == 0

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, metadata: dict | None = None, *,
             force: bool = False) -> bool:
        """Start saving ``state`` at ``step`` (asynchronously by default).

        Returns False (nothing written) when ``step`` is off the save interval and
        not ``force``, or when ``step`` is already the latest committed step (so a
        final forced save after the loop is harmless). Raises ``CheckpointError`` if
        ``step`` is older than the latest committed step, if ``metadata`` is not
        JSON-serialisable, or if the previous asynchronous save failed.
        """
        step = int(step)
        if not force and not self.should_save(step):
            return False
        self.wait()
        latest = self.latest_step()
        if latest == step:
            log.info("checkpoint step %d already committed in %s", step, self.directory)
            return False
        if latest is not None and step < latest:
            raise CheckpointError(f"cannot save step {step}: older than the latest "
                                  f"committed step {latest} in {self.directory}")
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"metadata for step {step} is not JSON-serialisable: {err}") from err
        manifest = _manifest(state, step, checksums=self._verify)
        self._mgr.save(step, force=True, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state), METADATA: ocp.args.JsonSave(metadata),
            MANIFEST: ocp.args.JsonSave(manifest)}))
        log.info("saving checkpoint step %d to %s", step, self.step_path(step))
        return True

    def wait(self) -> None:
        """Block until the pending save is committed; re-raise its failure as CheckpointError."""
        try:
            self._mgr.wait_until_finished()
        except Exception as err:  # noqa: BLE001  (any failure of the background save)
            self._mgr.reload()
            raise CheckpointError(f"saving a checkpoint in {self.directory} failed: {err}") from err

    # ------------------------------------------------------------------ restore
    def restore(self, step: int | None = None, *, target: Any = None) -> Restored:
        """Restore ``step`` (default: the newest readable step, with fallback).

        ``target``: abstract pytree (``abstract_tree``) whose leaves carry the
        wanted shardings and dtypes; without it Orbax rebuilds nested dicts with
        the saved shardings.
        """
        self.wait()
        steps = self.all_steps()
        if step is not None:
            if int(step) not in steps:
                raise CheckpointError(f"no committed checkpoint for step {step} in "
                                      f"{self.directory}; committed steps: {steps}")
            try:
                return self._restore_step(int(step), target)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"checkpoint {self.step_path(step)} is unreadable: "
                                      f"{err}") from err
        if not steps:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        failed: list[tuple[int, Exception]] = []
        for candidate in reversed(steps):
            try:
                restored = self._restore_step(candidate, target)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001  (corruption shows as many error types)
                log.warning("checkpoint %s is unreadable (%s: %s); trying the previous step",
                            self.step_path(candidate), type(err).__name__, str(err)[:300])
                failed.append((candidate, err))
                continue
            for bad, _ in failed:
                self._set_aside(bad, "corrupt")
            if failed:
                self._mgr.reload()
            return restored
        raise CheckpointError(f"no readable checkpoint in {self.directory}; tried steps "
                              f"{[s for s, _ in failed]}") from failed[0][1]

    def _restore_step(self, step: int, target: Any) -> Restored:
        path = self.step_path(step)
        manifest = self._mgr.restore(step, args=ocp.args.Composite(
            **{MANIFEST: ocp.args.JsonRestore()}))[MANIFEST]
        if target is not None:
            _check_target(manifest, target, path)
        state_args = ocp.args.StandardRestore(target) if target is not None \
            else ocp.args.StandardRestore()
        out = self._mgr.restore(step, args=ocp.args.Composite(
            **{STATE: state_args, METADATA: ocp.args.JsonRestore()}))
        if self._verify:
            _verify(manifest, out[STATE], path)
        log.info("restored checkpoint step %d from %s", step, path)
        return Restored(step=step, state=out[STATE], metadata=dict(out[METADATA] or {}))

    # ------------------------------------------------------------------ housekeeping
    def _set_aside(self, step: int, reason: str) -> None:
        if jax.process_index() != 0:
            return
        source = self.step_path(step)
        dest = f"{source}.{reason}-{time.time_ns()}"
        os.rename(source, dest)
        log.warning("moved %s checkpoint %s to %s", reason, source, dest)

    def close(self) -> None:
        """Wait for pending saves, then release Orbax's threads."""
        try:
            self.wait()
        finally:
            self._mgr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
