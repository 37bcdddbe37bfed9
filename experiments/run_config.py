"""A run directory's ``config.json``: the resolved config recorded, compared and checked
on resume.

    write_run_config(config, run_dir, resumable=("train.total_steps",))

The first call writes ``run_dir/config.json``; a later one (a resume) refuses a
config that differs in a key not matching ``resumable`` (fnmatch patterns) and
names every such key with its old and new value (``cli.ConfigError``).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from experiments.cli import ConfigError

__all__ = ["CONFIG_FILE", "to_json_dict", "config_changes", "write_run_config"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"

def _jsonable(value: Any) -> Any:
    if isinstance(value, (ml_collections.ConfigDict, dict)):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The resolved config as plain JSON types (tuples become lists, other objects their repr)."""
    return _jsonable(config)


def _flat_json(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict) and tree:
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(_flat_json(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(tree, sort_keys=True)}


def config_changes(config: ml_collections.ConfigDict, run_dir: str | os.PathLike, *,
                   defaults: ml_collections.ConfigDict | None = None
                   ) -> list[tuple[str, str, str]]:
    """``(dotted key, old, new)`` for each key where ``config`` differs from the
    ``config.json`` of ``run_dir`` (values as JSON text, '<absent>' on one side); []
    when the run has no config yet. With ``defaults``, a key the old run lacks whose
    new value is its default is an extension (see :func:`write_run_config`), not listed."""
    path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        a = _flat_json(json.load(f))
    b = _flat_json(to_json_dict(config))
    base = _flat_json(to_json_dict(defaults)) if defaults is not None else {}
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>"))
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not (k not in a and k in base and base[k] == b.get(k))]


def write_run_config(config: ml_collections.ConfigDict, run_dir: str | os.PathLike, *,
                     resumable: Sequence[str] = (), write: bool | None = None,
                     defaults: ml_collections.ConfigDict | None = None) -> bool:
    """Record the resolved config as ``run_dir/config.json``; check it on resume.

    If ``config.json`` already exists, every key whose value differs (or exists on
    one side only) must match a pattern in ``resumable`` (fnmatch on dotted keys,
    e.g. ``'train.total_steps'``, ``'logging.*'``), else ``ConfigError`` lists the
    keys with old and new values. Then the file is (re)written, atomically, by
    the primary process only (``write`` defaults to ``jax.process_index() == 0``).

    ``defaults``: the config the keys were added to. A key the old run lacks whose
    new value is its value in ``defaults`` is an extension, not a change (a key is
    added with the default that keeps the old behaviour), and does not block the
    resume; with any other value it does.

    Returns True when a previous config was found (a resume).
    """
    path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
    new = to_json_dict(config)
    resumed = os.path.exists(path)
    if resumed:
        with open(path) as f:
            old = json.load(f)
        a, b = _flat_json(old), _flat_json(new)
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        base = _flat_json(to_json_dict(defaults)) if defaults is not None else {}
        added = {k for k in changed if k not in a and k in base and base[k] == b.get(k)}
        fixed = [k for k in changed if k not in added
                 and not any(fnmatch.fnmatchcase(k, p) for p in resumable)]
        if fixed:
            lines = [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in fixed]
            raise ConfigError(f"config differs from the run in {run_dir} in keys that cannot "
                              "change on resume:\n  " + "\n  ".join(lines))
        for k in changed:
            log.info("resume: config key '%s' changed from %s to %s", k, a.get(k), b.get(k))
    if write is None:
        import jax  # only here: the rest of the CLI must not need a backend
        write = jax.process_index() == 0
    if write:
        os.makedirs(os.fspath(run_dir), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(new, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    return resumed
