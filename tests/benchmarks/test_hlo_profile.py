"""benchmarks.hlo_profile: trace events joined to HLO instructions and source regions.

A hand-written HLO text (with the debug tables XLA prints) and hand-written
trace events give known per-region times; one micro-size profile of the real
compiled train step checks that the parser understands what XLA:CPU and
jax.profiler actually write. No timing is asserted.
"""
import gzip
import json

import pytest

from benchmarks import hlo_profile as hp
from benchmarks import profile_step

# Frames (printed 1-based; parent_frame_id is one above the parent's id, 0 = none):
# 1 = MLP.__call__ line 20 (no parent), 2 = _rows_matmul line 5 called from frame 1,
# 3 = token_logprobs line 30, 4 = optax update line 7.
HLO = """HloModule jit_step, is_scheduled=true

FileNames
1 "/repo/models/qwen3.py"
2 "/repo/models/training.py"
3 "/venv/optax/_src/transform.py"

FunctionNames
1 "MLP.__call__"
2 "_rows_matmul"
3 "token_logprobs"
4 "scale_by_adam.<locals>.update_fn"

FileLocations
1 {file_name_id=1 function_name_id=1 line=20 end_line=20 column=1 end_column=9}
2 {file_name_id=1 function_name_id=2 line=5 end_line=5 column=1 end_column=9}
3 {file_name_id=2 function_name_id=3 line=30 end_line=30 column=1 end_column=9}
4 {file_name_id=3 function_name_id=4 line=7 end_line=7 column=1 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=0}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=0}
4 {file_location_id=4 parent_frame_id=0}

%fused_dot (p0: f32[8,4], p1: f32[4,6]) -> f32[8,6] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,6]{1,0} parameter(1)
  ROOT %d = f32[8,6]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_exp (p0: f32[8,6]) -> f32[8,6] {
  %p0 = f32[8,6]{1,0} parameter(0)
  ROOT %e = f32[8,6]{1,0} exponential(%p0)
}

ENTRY %main (a: f32[8,4], b: f32[4,6]) -> f32[8,6] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,6]{1,0} parameter(1)
  %ynn_fusion = f32[8,6]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/transpose(jvp())/dot_general" stack_frame_id=2}
  %exp_fusion = f32[8,6]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_exp, metadata={op_name="jit(step)/jvp()/exp" stack_frame_id=3}
  %copy.1 = f32[8,6]{1,0} copy(%exp_fusion)
  %adam = f32[8,6]{1,0} add(%copy.1, %copy.1), metadata={op_name="jit(step)/add" stack_frame_id=4}
  ROOT %while.3 = f32[8,6]{1,0} while(%adam), condition=%cond, body=%body
}
"""


def _event(op, dur, tid=1):
    return {"ph": "X", "tid": tid, "ts": 0, "dur": dur, "name": op, "args": {"hlo_op": op}}


def test_stack_tables_follow_parents_innermost_first():
    stacks = hp.parse_stack_tables(HLO)
    assert stacks[2] == [("/repo/models/qwen3.py", "_rows_matmul", 5),
                         ("/repo/models/qwen3.py", "MLP.__call__", 20)]
    assert stacks[3] == [("/repo/models/training.py", "token_logprobs", 30)]


def test_instructions_know_their_matmuls_and_metadata():
    ins = hp.parse_instructions(HLO)
    assert ins["ynn_fusion"]["has_dot"] and ins["ynn_fusion"]["calls"] == "fused_dot"
    assert not ins["exp_fusion"]["has_dot"] and ins["exp_fusion"]["frame"] == 3
    assert ins["copy.1"]["frame"] is None and ins["adam"]["opcode"] == "add"
    assert hp.kind(ins["copy.1"], "copy.1") == "copy/transpose"
    assert hp.direction(ins["ynn_fusion"]["op_name"]) == "bwd"
    assert hp.direction(ins["exp_fusion"]["op_name"]) == "fwd"


def test_breakdown_sums_events_per_region_kind_and_step():
    events = [_event("ynn_fusion", 3000), _event("ynn_fusion", 1000, tid=2),
              _event("exp_fusion", 2000), _event("copy.1", 500), _event("adam", 1500),
              {"ph": "X", "tid": 1, "ts": 0, "dur": 9e6, "name": "ThunkExecutor::Execute"},
              _event("while.3", 7000)]              # encloses the others: not added
    b = hp.breakdown(HLO, events, steps=2)
    assert b["total_ms"] == pytest.approx(4.0)             # 8000 us over 2 steps
    assert b["control_ms"] == pytest.approx(3.5)
    assert "while.3" not in [o["name"] for o in b["ops"]]
    assert b["by_region"] == pytest.approx({
        "MLP (SwiGLU)": 2.0,                              # _rows_matmul defers to its caller
        "cross-entropy (log-softmax over V)": 1.0,
        "AdamW update + clip + skip": 0.75,
        "copies without a source line (layouts, outputs)": 0.25})
    assert b["by_kind"] == pytest.approx({"matmul": 2.0, "elementwise/reduce": 1.75,
                                          "copy/transpose": 0.25})
    assert b["by_dir"]["bwd"] == pytest.approx(2.0)
    assert b["ops"][0]["name"] == "ynn_fusion" and b["ops"][0]["count"] == 1
    with pytest.raises(ValueError, match="steps=0"):
        hp.breakdown(HLO, events, steps=0)


def test_attention_lines_are_found_in_the_model_source():
    import models.qwen3
    with open(models.qwen3.__file__) as f:
        names = hp.attention_line_names(f.read())
    assert {"o_proj matmul", "attention QK^T", "attention PV",
            "attention softmax + mask"} <= set(names.values())


def test_load_trace_keeps_complete_events(tmp_path):
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": [_event("a", 5), {"ph": "M", "name": "thread_name"}]}, f)
    assert [e["name"] for e in hp.load_trace(str(path))] == ["a"]


def test_profile_of_the_compiled_micro_step_names_its_matmuls(tmp_path):
    out = profile_step.main(["--side=jax", "--size=micro", "--kind=sft", "--steps=1",
                             f"--trace-dir={tmp_path}"])
    assert out["total_ms"] > 0 and out["tokens"] == 2 * 16
    assert out["by_kind"].get("matmul", 0) > 0
    assert "MLP (SwiGLU)" in out["by_region"] and "LM head matmul" in out["by_region"]
    assert (tmp_path / "step.hlo.txt").exists()


def test_profile_of_the_micro_decode_leaves_its_loops_out_of_the_total(tmp_path):
    out = profile_step.main(["--side=jax", "--size=micro", "--kind=decode", "--batch=2",
                             "--steps=1", f"--trace-dir={tmp_path}"])
    assert out["tokens"] == 2 and out["new_tokens"] == 8
    assert out["control_ms"] > 0                   # the decode loop's while event(s)
    assert not [o for o in out["ops"] if o["name"].startswith("while")]
    assert {"LM head matmul", "attention softmax + mask", "sampling: pick the next token",
            "decode loop: token bookkeeping"} <= set(out["by_region"])
    with pytest.raises(SystemExit):
        profile_step.main(["--side=torch", "--size=micro", "--kind=decode"])


def test_ab_step_trees_need_a_model_and_a_name(tmp_path):
    from benchmarks import ab_step
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "qwen3.py").write_text("")
    assert ab_step.parse_trees(f"a={tmp_path},b={tmp_path}") == {"a": str(tmp_path),
                                                                  "b": str(tmp_path)}
    with pytest.raises(ValueError, match="name=directory"):
        ab_step.parse_trees(str(tmp_path))
    with pytest.raises(ValueError, match="name != 'torch'"):
        ab_step.parse_trees(f"torch={tmp_path}")
    with pytest.raises(ValueError, match="no models/qwen3.py"):
        ab_step.parse_trees(f"a={tmp_path / 'missing'}")
    trees = {"off": str(tmp_path), "on": str(tmp_path)}
    assert ab_step.parse_query_blocks("on=64", trees) == {"on": 64}
    assert ab_step.parse_query_blocks("", trees) == {}
    for bad in ("other=64", "on=-1", "on", "on=x"):
        with pytest.raises(ValueError, match="must be tree=N"):
            ab_step.parse_query_blocks(bad, trees)


def test_timed_records_cpu_seconds_per_call():
    from benchmarks import harness
    cpu = []
    times = harness.timed(lambda: sum(range(20000)), repeats=3, warmup=0, cpu_times=cpu)
    assert len(times) == len(cpu) == 3 and all(c >= 0 for c in cpu)
