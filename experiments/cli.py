"""Configs from the command line: ``--config=path.py[:arg]`` plus typed ``--config.a.b=value``.

Every script does::

    def main(config): ...
    if __name__ == "__main__":
        cli.run(main, default="experiments/extra_cot/configs/default.py")

``parse`` loads ``get_config()`` (or ``get_config(arg)``) from the file, reads
each override by the type of the field it replaces (the table below; an
unknown key or unreadable value is a ``ConfigError`` that names the key and
suggests close keys), hands the typed values to ``ml_collections.config_flags``
(``DEFINE_config_dict`` on a private ``absl.flags.FlagValues``), which sets
them, validates (the config module's ``validate(config)``, then any
``validators``), locks the config and returns it. Nothing is ever ``eval``-ed:
what config_flags reads is the text this module writes from the typed values.

Override syntax (``--config.a.b=value`` or ``--config.a.b value``):

=================  ===========================================================
field type         accepted text
=================  ===========================================================
bool               true/false, 1/0, yes/no, on/off (any case); a bare flag = true
int                ``-3``, ``1_000`` (no fractions, no exponents)
float              anything ``float()`` reads (``1e-4``, ``3``, ``inf``)
str                the text as given
tuple/list         ``1,2,3``, ``(1, 2)``, ``[a, b]``, ``()``, config_flags'
                   ``"('a', 'b')"``; element type from the current elements
                   (strings may not contain commas)
placeholder/None   ``none`` sets None; otherwise the declared type (placeholders)
                   or, for a plain None field, inferred: bool, int, float, str
=================  ===========================================================

A key given twice takes its last value (config_flags alone would join two
values of a tuple field).
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

__all__ = ["ConfigError", "load_config", "apply_override", "parse", "run", "flatten", "get",
           "check", "check_range", "check_choice"]


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INT = re.compile(r"[+-]?[0-9][0-9_]*")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """A config value, key or file is invalid; the message names the full key."""


# ----------------------------------------------------------------------------- loading

def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path.py`` (``get_config()``) or ``path.py:arg`` (``get_config(arg)``).

    A relative path is tried from the working directory, then from the repository root.
    """
    return _load(spec)[0]


def _load(spec: str):
    path, sep, arg = spec.partition(":")
    candidates = [path] if os.path.isabs(path) else [path, os.path.join(_REPO_ROOT, path)]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise ConfigError(f"--config={spec!r}: no such file (looked in {candidates})")
    name = "_chrpo_config_" + re.sub(r"\W", "_", os.path.abspath(found))
    module_spec = importlib.util.spec_from_file_location(name, found)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={spec!r}: {found} defines no get_config()")
    config = module.get_config(arg) if sep else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config={spec!r}: get_config() returned {type(config).__name__}, "
                          "not an ml_collections.ConfigDict")
    validate = getattr(module, "validate", None)
    return config, validate


# ----------------------------------------------------------------------------- keys and values

def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """``{'a.b': value}`` for every leaf (references resolved)."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        key = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def _unknown(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    keys = list(flatten(config))
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _locate(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    *groups, name = key.split(".")
    node = config
    for depth, part in enumerate(groups):
        if part not in node:
            raise _unknown(config, key)
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"config key '{'.'.join(groups[:depth + 1])}' is a value, "
                              f"not a group, so '{key}' does not exist")
    if name not in node:
        raise _unknown(config, key)
    return node, name


def get(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value at dotted ``key``; ConfigError (with suggestions) when absent."""
    node, name = _locate(config, key)
    return node[name]


def _bad(key: str, raw: str, expected: str) -> ConfigError:
    return ConfigError(f"config key '{key}': cannot read {raw!r} as {expected}")


def _scalar(key: str, raw: str, kind: type | None) -> Any:
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise _bad(key, raw, "bool (true/false/1/0/yes/no/on/off)")
    if kind is int:
        if _INT.fullmatch(text):
            return int(text)
        raise _bad(key, raw, "int")
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise _bad(key, raw, "float") from None
    if kind is str:
        return raw
    # No declared type: infer.
    if text.lower() == "none":
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _INT.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return raw


def _element_type(items: Sequence[Any]) -> type | None:
    kinds = {type(x) for x in items}
    if not items or len(kinds) > 2 or (len(kinds) == 2 and kinds != {int, float}):
        return None
    return float if float in kinds else kinds.pop()


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _sequence(key: str, raw: str, current: Sequence[Any]) -> Any:
    text = raw.strip()
    if len(text) >= 2 and (text[0], text[-1]) in (("(", ")"), ("[", "]")):
        text = text[1:-1]
    # an element in matching quotes (config_flags' "('a', 'b')") is the text inside them
    parts = [_unquote(p.strip()) for p in text.split(",")]
    if parts and parts[-1] == "":
        parts = parts[:-1]  # "1," and "()" alike
    kind = _element_type(list(current))
    if kind not in (None, bool, int, float, str):
        raise ConfigError(f"config key '{key}': cannot override a sequence of {kind.__name__}")
    values = [_scalar(key, p, kind) for p in parts]
    return type(current)(values)


def _convert(config: ml_collections.ConfigDict, key: str, raw: str | None) -> Any:
    node, name = _locate(config, key)
    current, declared = node[name], node.get_type(name)
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key '{key}' is a group; override its fields "
                          f"(e.g. --config.{key}.<field>=...)")
    nullable = current is None or isinstance(node._fields.get(name), config_dict.FieldReference)
    if raw is None:  # a bare flag
        if declared is bool:
            return node, name, True
        raise ConfigError(f"config key '{key}' needs a value (--config.{key}=...)")
    if nullable and raw.strip().lower() == "none":
        return node, name, None
    if declared in (bool, int, float, str):
        return node, name, _scalar(key, raw, declared)
    if declared in (tuple, list):
        return node, name, _sequence(key, raw, current if current is not None else declared())
    if current is None:
        return node, name, _scalar(key, raw, None)
    raise ConfigError(f"config key '{key}' has type {declared.__name__}, which cannot be "
                      "set from the command line")


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str | None) -> None:
    """Set dotted ``key`` from the text ``raw``, parsed by the field's type (directly,
    without absl flags; ``parse`` sets the same values through config_flags)."""
    node, name, value = _convert(config, key, raw)
    _set(node, name, key, raw, value)


def _set(node: ml_collections.ConfigDict, name: str, key: str, raw: str | None,
         value: Any) -> None:
    try:
        node[name] = value
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise ConfigError(f"config key '{key}': cannot set {raw!r}: {err}") from err


def _flag_text(node: ml_collections.ConfigDict, name: str, value: Any) -> str | None:
    """``value`` as the text that config_flags' parser for field ``name`` reads back to
    it, or None where it has none that would (None, list fields, untyped fields that
    hold None, non-finite floats inside a tuple)."""
    current = node[name]
    typed = isinstance(node._fields.get(name), config_dict.FieldReference)  # a placeholder
    if value is None or (current is None and not typed) or isinstance(current, list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value) if not isinstance(value, float) else repr(value)
    if isinstance(value, tuple) and all(
            isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))
            for v in value):
        return repr(value)   # read back by config_flags' tuple parser (ast.literal_eval)
    return None


def _apply_overrides(config: ml_collections.ConfigDict,
                     overrides: Sequence[tuple[str, str | None]]) -> None:
    """Apply ``(key, raw text)`` overrides in order, the last of a repeated key winning:
    each is read by its field's type (our errors), then set by config_flags, or directly
    where config_flags cannot carry the value (see ``_flag_text``)."""
    last: dict[str, str | None] = {}
    for key, raw in overrides:
        last.pop(key, None)
        last[key] = raw
    argv = ["chrpo"]
    for key, raw in last.items():
        node, name, value = _convert(config, key, raw)
        text = _flag_text(node, name, value)
        if text is None:
            _set(node, name, key, raw, value)
        else:
            argv.append(f"--config.{key}={text}")
    if len(argv) == 1:
        return
    holder = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=holder, lock_config=False,
                                    sys_argv=argv)
    try:
        holder(argv)
    except (flags.Error, TypeError, ValueError, KeyError, AttributeError) as err:
        raise ConfigError(f"config overrides {argv[1:]}: {err}") from err


# ----------------------------------------------------------------------------- validation

def check(config: ml_collections.ConfigDict, key: str, predicate: Callable[[Any], bool],
          message: str) -> None:
    """Raise ``ConfigError("config key 'k' = v: message")`` unless ``predicate(value)``."""
    value = get(config, key)
    try:
        ok = bool(predicate(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: {message}")


def check_range(config: ml_collections.ConfigDict, key: str, *, low: float | None = None,
                high: float | None = None, low_open: bool = False, high_open: bool = False) -> None:
    """``value`` must be a finite number in the interval given by ``low``/``high`` (open ends
    optional); NaN and +-inf are refused whatever the bounds."""
    def inside(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return high is None or (v < high if high_open else v <= high)
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    opening = "(" if low_open or low is None else "["
    closing = ")" if high_open or high is None else "]"
    interval = f"{opening}{lo}, {hi}{closing}"
    check(config, key, inside, f"must be a number in {interval}")


def check_choice(config: ml_collections.ConfigDict, key: str, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    check(config, key, lambda v: v in choices, f"must be one of {choices}")


# ----------------------------------------------------------------------------- parse / run

def _split_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str | None]], bool]:
    spec, overrides, wants_help, i = None, [], False, 0
    while i < len(argv):
        arg = argv[i]
        head, eq, value = arg.partition("=")
        takes_next = not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if arg in ("-h", "--help"):
            wants_help = True
        elif head == "--config":
            if not eq and not takes_next:
                raise ConfigError("--config needs a file: --config=path.py[:arg]")
            spec = value if eq else argv[i + 1]
            i += 0 if eq else 1
        elif head.startswith("--config."):
            key = head[len("--config."):]
            overrides.append((key, value if eq else (argv[i + 1] if takes_next else None)))
            i += 1 if (not eq and takes_next) else 0
        else:
            raise ConfigError(f"unrecognised argument {arg!r}; expected --config=path.py[:arg] "
                              "or --config.<key>=<value>")
        i += 1
    return spec, overrides, wants_help


def _help_text(config: ml_collections.ConfigDict, spec: str) -> str:
    rows = [f"  --config.{k}={json.dumps(v, default=repr) if not isinstance(v, str) else v}  "
            f"({type(v).__name__})" for k, v in flatten(config).items()]
    usage = "usage: --config=path.py[:arg] [--config.<key>=<value> ...]"
    return "\n".join([f"config: {spec}", usage, *rows])


def parse(argv: Sequence[str] | None = None, *, default: str | None = None,
          validators: Sequence[Callable[[ml_collections.ConfigDict], None]] = ()
          ) -> ml_collections.ConfigDict:
    """Load, override, validate and lock a config. ``argv`` excludes the program name.

    ``-h``/``--help`` prints every key with its value and type, then exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    spec, overrides, wants_help = _split_argv(argv)
    spec = spec or default
    if spec is None:
        raise ConfigError("no config given: pass --config=path.py[:arg]")
    config, module_validate = _load(spec)
    _apply_overrides(config, overrides)
    if wants_help:
        print(_help_text(config, spec))
        raise SystemExit(0)
    for validate in ([module_validate] if module_validate else []) + list(validators):
        validate(config)
    config.lock()
    return config


def run(main: Callable[[ml_collections.ConfigDict], Any], *, default: str | None = None,
        argv: Sequence[str] | None = None,
        validators: Sequence[Callable[[ml_collections.ConfigDict], None]] = ()) -> Any:
    """``main(parse(argv, ...))``; a ConfigError prints ``error: ...`` and exits with status 2.

    That holds for a ConfigError raised by ``main`` too (e.g. ``write_run_config``
    finding that a resumed run's config changed in a key that cannot change).
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return main(parse(argv, default=default, validators=validators))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
