"""Shared harness of the side-by-side benchmarks: workers, alternation, ratios, memory.

Protocol. Each benchmark script is both a driver and its own worker. The
driver runs ``python -m benchmarks.<script> --worker=<side> --spec=<json>``
once per side and round, reversing the order of the sides every round
(jax, torch | torch, jax | ...). JAX and torch never share a process (their
thread pools slow each other badly), and the two runs of a round follow each
other within seconds, so the ratio of one round is a same-run ratio even on a
machine shared with other jobs. The report gives the median of the per-round
ratios beside the best time of each side.

A worker prints exactly one line ``BENCH_RESULT <json>`` on stdout holding
what its handler returned plus: the load average before and after, its RSS
after imports (the libraries' own footprint), its peak RSS (``ru_maxrss``)
and its wall time. JAX handlers add ``compiled_memory`` (XLA's memory
analysis of the compiled program) where they can.

Time is measured with ``time.perf_counter`` around calls that block until
their result is ready (``jax.block_until_ready``; torch on CPU is synchronous).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "BENCH_RESULT "

# Model sizes as Hugging Face config.json dicts (both sides build from these).
# micro: the CI smoke size; tiny: models.qwen3's 'tiny' preset at vocab 512;
# small: 4 layers, d = 512, vocab 4096 (the "e.g. 4 layers, d=512").
_COMMON = dict(model_type="qwen3", hidden_act="silu", attention_bias=False,
               use_sliding_window=False, rms_norm_eps=1e-6, tie_word_embeddings=True,
               max_position_embeddings=4096, rope_theta=1e4, dtype="float32")
SIZES: dict[str, dict[str, Any]] = {
    "micro": dict(_COMMON, vocab_size=128, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16),
    "tiny": dict(_COMMON, vocab_size=512, hidden_size=64, intermediate_size=192,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16),
    # the model of the main job (experiments/extra_cot/configs/default.py), at its tokenizer's vocabulary
    "main": dict(_COMMON, vocab_size=768, hidden_size=128, intermediate_size=384,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32),
    "small": dict(_COMMON, vocab_size=4096, hidden_size=512, intermediate_size=1536,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=64),
}

# The optimiser of every train-step benchmark: AdamW, constant learning rate,
# global-norm clip 1, no weight decay (models.optim.make_optimizer keys; the
# torch side builds torch.optim.AdamW + clip_grad_norm_ from the same values).
OPTIMIZER: dict[str, Any] = dict(learning_rate=1e-5, schedule="constant", warmup=0,
                                 total_steps=10**6, weight_decay=0.0, b1=0.9, b2=0.999,
                                 eps=1e-8, grad_clip=1.0)


def size_config(name: str) -> dict[str, Any]:
    """A copy of ``SIZES[name]`` (a config.json dict); unknown names raise ValueError."""
    if name not in SIZES:
        raise ValueError(f"unknown size {name!r}; valid: {sorted(SIZES)}")
    return dict(SIZES[name])


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages of the machine."""
    return [round(x, 2) for x in os.getloadavg()]


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], Any], *, repeats: int, warmup: int = 1,
          cpu_times: list[float] | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    ``fn`` must block until its work is done (wrap JAX calls in block_until_ready).
    When ``cpu_times`` is a list, the CPU seconds (user + system, all threads of
    this process, ``time.process_time``) of each timed call are appended to it:
    on a loaded machine they move much less than wall times.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, "
                         f"warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu_start)
    return times


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled JAX program, in bytes (None if unavailable).

    argument/output: buffers passed in and returned; alias: outputs that reuse a
    donated argument; temp: scratch the program allocates while it runs;
    peak_estimate = argument + output - alias + temp (an upper bound of the
    device memory the call needs).
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if m is None:
        return None
    fields = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
              "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
              "generated_code": m.generated_code_size_in_bytes}
    out = {k: int(v) for k, v in fields.items()}
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def mib(nbytes: float | None) -> float | None:
    """Bytes -> MiB (None stays None)."""
    return None if nbytes is None else nbytes / 2**20


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded with every result file."""
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "load_average": load_average()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        env["cpu"] = names[0] if names else platform.processor()
    except OSError:
        env["cpu"] = platform.processor()
    return env


# ----------------------------------------------------------------------------- workers

def _finish(result: Mapping[str, Any], *, load_before: list[float], rss_base: float,
            start: float) -> dict[str, Any]:
    return {**result, "load_before": load_before, "load_after": load_average(),
            "rss_base_mib": round(rss_base, 1), "rss_peak_mib": round(peak_rss_mib(), 1),
            "wall_s": round(time.perf_counter() - start, 3)}


def call_handler(handler: Callable[[dict], Mapping[str, Any]], spec: dict,
                 *, rss_base: float | None = None) -> dict[str, Any]:
    """Run one handler and attach the process statistics (see the module docstring)."""
    start, load_before = time.perf_counter(), load_average()
    base = rss_mib() if rss_base is None else rss_base
    return _finish(handler(spec), load_before=load_before, rss_base=base, start=start)


def entry(handlers, main) -> None:
    """A benchmark script's entry point: ``--worker...`` runs that worker's
    handler (``worker_main``), anything else runs the driver ``main()``."""
    if any(a.startswith("--worker") for a in sys.argv[1:]):
        worker_main(handlers, sys.argv[1:])
    else:
        main()


def worker_main(handlers: Mapping[str, Callable[[dict], Mapping[str, Any]]],
                argv: Sequence[str]) -> None:
    """Entry point of a worker process: ``--worker=<side> --spec=<json>``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, choices=sorted(handlers))
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    result = call_handler(handlers[args.worker], json.loads(args.spec))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(module: str, side: str, spec: dict, *, timeout: float) -> dict[str, Any]:
    """Run ``python -m module --worker=side`` in a fresh process; its result dict."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", module, f"--worker={side}", f"--spec={json.dumps(spec)}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"worker {module} --worker={side} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(lines[0][len(RESULT_PREFIX):])


def alternate(module: str, specs: Mapping[str, dict], *, rounds: int, timeout: float,
              in_process: Mapping[str, Callable[[dict], Mapping[str, Any]]] | None = None,
              log: Callable[[str], None] | None = None) -> list[dict[str, dict]]:
    """``rounds`` rounds of one worker run per side; the side order flips every round.

    ``specs`` maps side -> spec (a side not in it is not run). ``in_process``
    maps side -> handler to call in this process instead of a subprocess (for
    the JAX side of a CI smoke run only: it then shares this process).
    Returns one {side: result} dict per round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    sides, out = list(specs), []
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        results = {}
        for side in order:
            if in_process and side in in_process:
                results[side] = call_handler(in_process[side], specs[side])
            else:
                results[side] = run_worker(module, side, specs[side], timeout=timeout)
            if log:
                log(f"round {r + 1}/{rounds} {side}: done (load {results[side]['load_after']})")
        out.append(results)
    return out


# ----------------------------------------------------------------------------- summaries

def best(times: Sequence[float]) -> float:
    return float(min(times))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio_summary(per_round: Sequence[float]) -> dict[str, float]:
    """Median, min and max of same-run ratios (one per round)."""
    values = [float(v) for v in per_round]
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(x: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits ('-' for None)."""
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_json(path: str | None, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (plus the environment) to ``path`` when a path is given."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), **payload}, f, indent=1)


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every driver shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--sizes", default="tiny,small",
                   help=f"comma-separated model sizes from {sorted(SIZES)}")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per case")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per worker run")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    p.add_argument("--no-reference", action="store_true",
                   help="run the JAX side only (no torch/transformers needed)")
    p.add_argument("--in-process", action="store_true",
                   help="run the JAX side in this process (with --no-reference only)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker run")
    p.add_argument("--out", default=None, help="write all results to this JSON file")
    return p


def parse_common(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Parse and validate the shared flags; returns (args, [size names])."""
    args = parser.parse_args(argv)
    if args.in_process and not args.no_reference:
        parser.error("--in-process needs --no-reference (torch and JAX must not share a "
                     "process)")
    for name in ("rounds", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        parser.error(f"--sizes: unknown {bad}; valid: {sorted(SIZES)}")
    return args, sizes


def log(message: str) -> None:
    """Progress to stderr (stdout carries the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
