"""Where the time of a compiled XLA:CPU program goes: trace events joined to the HLO.

``jax.profiler`` writes a Chrome/Perfetto trace (``*.trace.json.gz``) in which
XLA:CPU's thunk executor records one event per executed HLO instruction
(``args.hlo_op`` = the instruction's name, e.g. ``ynn_fusion.110``). The
compiled program's text (``compiled.as_text()``) gives, for each instruction,
its opcode, the fused computation it calls, its ``op_name`` metadata (``jvp(...)``
= forward, ``transpose(jvp(...))`` = backward) and a ``stack_frame_id`` that
resolves, through the text's ``FileNames``/``FunctionNames``/``FileLocations``/
``StackFrames`` tables, to the Python call stack that emitted it.

    time[group] = sum over trace events e with group(e.hlo_op) == group of e.dur

Durations are summed over every thread (thunks run concurrently on XLA's
intra-op threads), so they are thread-seconds, not wall seconds; shares are
of the summed total. Control-flow instructions (``while``, ``conditional``,
``call``) are left out of the total: their events span the events of the
instructions they run (a decode loop's ``while`` event holds every step), so
counting them would count that time twice; their own time is reported apart
as ``control_ms``. Pure functions over text and parsed JSON, no JAX import.
"""
from __future__ import annotations

import collections
import gzip
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_FIELD = re.compile(r"(\w+)=(\d+)")


def parse_stack_tables(hlo_text: str) -> dict[int, list[tuple[str, str, int]]]:
    """stack_frame_id -> call stack [(file, function, line), ...], innermost first.

    Reads the four debug tables that ``as_text()`` prints before the module's
    computations. ``parent_frame_id`` is printed one above the parent's own id
    (0 = no parent), which is how XLA's printer numbers it.
    """
    tables: dict[str, dict[int, str]] = {name: {} for name in _TABLES}
    current = None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped in _TABLES:
            current = stripped
            continue
        if current is None:
            continue
        m = re.match(r"^(\d+) (.*)$", stripped)
        if not m:
            if stripped == "" and tables[current]:
                current = None
            continue
        tables[current][int(m.group(1))] = m.group(2)
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    funcs = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    locs = {}
    for k, v in tables["FileLocations"].items():
        f = dict((a, int(b)) for a, b in _FIELD.findall(v))
        locs[k] = (files.get(f.get("file_name_id"), "?"), funcs.get(f.get("function_name_id"), "?"),
                   f.get("line", 0))
    frames = {k: dict((a, int(b)) for a, b in _FIELD.findall(v))
              for k, v in tables["StackFrames"].items()}
    stacks = {}
    for fid in frames:
        chain, seen, cur = [], set(), fid
        while cur in frames and cur not in seen:
            seen.add(cur)
            chain.append(locs.get(frames[cur].get("file_location_id"), ("?", "?", 0)))
            cur = frames[cur].get("parent_frame_id", 0) - 1   # printed 1-based, 0 = none
        stacks[fid] = chain
    return stacks


def parse_instructions(hlo_text: str) -> dict[str, dict[str, Any]]:
    """instruction name -> {opcode, shape, op_name, frame, calls, has_dot, computation}.

    ``has_dot`` is True for a dot, or a fusion whose called computation
    contains a dot or a convolution (a matmul, whatever XLA:CPU emits for it).
    """
    comps: dict[str, list[str]] = collections.defaultdict(list)
    instrs: dict[str, dict[str, Any]] = {}
    comp = None
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            m = _COMP.match(line)
            comp = m.group(1) if m else None
            continue
        m = _INSTR.match(line)
        if not m or comp is None:
            continue
        name, shape, opcode, rest = m.groups()
        comps[comp].append(opcode)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        instrs[name] = {"opcode": opcode, "shape": shape, "computation": comp,
                        "op_name": op_name.group(1) if op_name else "",
                        "frame": int(frame.group(1)) if frame else None,
                        "calls": calls.group(1) if calls else None}
    for info in instrs.values():
        inner = comps.get(info["calls"] or "", [])
        info["has_dot"] = info["opcode"] in ("dot", "convolution") or any(
            op in ("dot", "convolution") for op in inner)
    return instrs


def load_trace(path: str) -> list[dict[str, Any]]:
    """The complete ('X') events of a ``*.trace.json.gz`` (or plain .json) file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


def op_durations(events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """hlo_op -> {'us': summed duration (microseconds), 'count': events}."""
    out: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"us": 0.0, "count": 0})
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if op:
            out[op]["us"] += float(e.get("dur", 0.0))
            out[op]["count"] += 1
    return dict(out)


# (function name of a frame, region); the innermost matching frame decides.
_REGIONS = (
    ("_pick", "sampling: pick the next token"),
    ("_generate.<locals>.body", "decode loop: token bookkeeping"),
    ("_grow", "decode loop: cache growth"),
    ("token_logprobs", "cross-entropy (log-softmax over V)"),
    ("next_token_logprobs", "cross-entropy (log-softmax over V)"),
    ("masked_lm_loss", "cross-entropy (log-softmax over V)"),
    ("Qwen3.logits", "LM head matmul"),
    ("rope", "RoPE"),
    ("RMSNorm.__call__", "RMSNorm"),
    ("Attention.__call__.<locals>.project", "q/k/v projections"),
    ("MLP.__call__", "MLP (SwiGLU)"),
    ("Attention.__call__", "attention core"),
    ("Attention._attend", "attention core"),
    ("default_positions", "embedding, masks, positions"),
    ("Qwen3.hidden_states", "embedding, masks, positions"),
    ("DecoderBlock.__call__", "residual adds"),
)
_UPDATE_FILES = ("optax",)
_HELPERS = ("_rows_matmul",)   # shared helpers: the caller's frame decides
_UPDATE_FUNCS = ("make_train_step.<locals>.step", "_all_finite")


def region_of(stack: list[tuple[str, str, int]], attention_lines: Mapping[int, str]) -> str:
    """The model region (or 'AdamW update + clip + skip') a call stack belongs to.

    ``attention_lines`` maps line numbers of ``Attention.__call__`` in
    models/qwen3.py to finer names (o_proj, scores, softmax ...).
    """
    for file, func, line in stack:
        if func in _HELPERS:
            continue
        if any(tag in file for tag in _UPDATE_FILES):
            return "AdamW update + clip + skip"
        for name, region in _REGIONS:
            if func == name:
                if region == "attention core" and line in attention_lines:
                    return attention_lines[line]
                return region
        if func.startswith(_UPDATE_FUNCS):
            return "AdamW update + clip + skip"
    return "other" if stack else "copies without a source line (layouts, outputs)"


def direction(op_name: str) -> str:
    """'bwd' for transpose(jvp(...)), 'fwd' for jvp(...), else 'update/other'."""
    if "transpose(jvp" in op_name:
        return "bwd"
    if "jvp(" in op_name:
        return "fwd"
    return "update/other"


def kind(info: Mapping[str, Any], name: str) -> str:
    """'matmul' (dot or a fusion holding one), 'copy/transpose', or 'elementwise/reduce'."""
    if info.get("has_dot"):
        return "matmul"
    if info.get("opcode") in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        return "copy/transpose"
    return "elementwise/reduce"


def attention_line_names(source: str) -> dict[int, str]:
    """Line number -> region for the lines of ``Attention.__call__`` in qwen3.py's source.

    Recognises the o_proj matmul, the two attention einsums, the mask, the
    softmax and the head transposes by their text.
    """
    names = {}
    soft, heads = "attention softmax + mask", "attention head transposes"
    patterns = (("o_proj", "o_proj matmul"), ("bkqd,bkds", "attention QK^T"),
                ("bkds,bkqs", "attention PV"), ("softmax", soft), ("jnp.where(mask", soft),
                ("* d ** -0.5", soft), ("transpose", heads), ("reshape", heads))
    in_attention = False
    for number, line in enumerate(source.splitlines(), start=1):
        if line.startswith("class "):
            in_attention = line.startswith("class Attention")
        if not in_attention:
            continue
        for pattern, region in patterns:
            if pattern in line:
                names[number] = region
                break
    return names


CONTROL_FLOW = ("while", "conditional", "call")


def breakdown(hlo_text: str, events: Iterable[Mapping[str, Any]], *, qwen3_source: str = "",
              steps: int = 1) -> dict[str, Any]:
    """Per-instruction, per-region and per-kind time of the traced program, per step.

    Returns {'total_ms', 'control_ms', 'ops': [{name, ms, count, region, dir, kind, shape}],
    'by_region', 'by_kind', 'by_dir', 'by_region_kind'} with milliseconds per step
    (sum / steps); ``control_ms`` is the (enclosing, not added) time of the
    ``CONTROL_FLOW`` instructions.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    stacks = parse_stack_tables(hlo_text)
    instrs = parse_instructions(hlo_text)
    attention_lines = attention_line_names(qwen3_source)
    ops, control_us = [], 0.0
    for name, d in op_durations(events).items():
        info = instrs.get(name, {})
        if info.get("opcode") in CONTROL_FLOW:
            control_us += d["us"]
            continue
        stack = stacks.get(info.get("frame"), [])
        ops.append({"name": name, "ms": d["us"] / 1e3 / steps, "count": d["count"] / steps,
                    "region": region_of(stack, attention_lines) if info else "unknown",
                    "dir": direction(info.get("op_name", "")), "kind": kind(info, name),
                    "shape": info.get("shape", "?")})
    ops.sort(key=lambda o: -o["ms"])

    def group(*keys):
        acc: dict[str, float] = collections.defaultdict(float)
        for o in ops:
            acc[" | ".join(o[k] for k in keys)] += o["ms"]
        return dict(sorted(acc.items(), key=lambda kv: -kv[1]))

    return {"total_ms": sum(o["ms"] for o in ops), "control_ms": control_us / 1e3 / steps,
            "ops": ops, "by_region": group("region"),
            "by_kind": group("kind"), "by_dir": group("dir"),
            "by_region_kind": group("region", "kind"),
            "by_region_dir_kind": group("region", "dir", "kind")}
