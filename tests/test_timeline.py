"""--timeline: the Chrome trace-event file of a real job (schema, nesting, overlap)."""
import json
from collections import defaultdict

import pytest

from conftest import run_train


def events_of(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    assert set(doc) >= {"traceEvents", "displayTimeUnit"}
    return doc["traceEvents"]


def check_schema_and_nesting(events, ranks):
    spans = [e for e in events if e["ph"] == "X"]
    meta = [e for e in events if e["ph"] == "M"]
    for e in spans:
        assert set(e) >= {"name", "cat", "ph", "ts", "dur", "pid", "tid"}, e
        assert e["dur"] >= 0 and e["ts"] >= 0
    assert {e["pid"] for e in spans} == set(range(ranks))  # one process per rank
    names = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert names == {r: f"rank {r}" for r in range(ranks)}
    threads = {(e["pid"], e["tid"]) for e in meta if e["name"] == "thread_name"}
    assert {(e["pid"], e["tid"]) for e in spans} <= threads  # every row is named
    # On one thread, spans nest or follow each other: never partly overlap.
    rows = defaultdict(list)
    for e in spans:
        rows[(e["pid"], e["tid"])].append(e)
    for row in rows.values():
        row.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in row:
            while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - 0.2:
                stack.pop()
            if stack:
                assert e["ts"] + e["dur"] <= stack[-1]["ts"] + stack[-1]["dur"] + 0.2, (e, stack[-1])
            stack.append(e)
    return spans


def inside(child, parent):
    return parent["ts"] - 0.2 <= child["ts"] and \
        child["ts"] + child["dur"] <= parent["ts"] + parent["dur"] + 0.2


def test_a_two_rank_timeline_shows_every_phase_and_the_overlap(small_data, tmp_path):
    path = tmp_path / "timeline.json"
    result = run_train(2, "--data", small_data, "--hidden", "256,256", "--steps", "12",
                       "--bucket-mb", "0.05", "--overlap", "--ckpt-dir", str(tmp_path / "ckpt"),
                       "--ckpt-every", "11", "--eval-every", "11", "--timeline", str(path),
                       "--timeline-steps", "10:11")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"events of 2 ranks in {path}" in result.stdout
    spans = check_schema_and_nesting(events_of(path), 2)
    steps = sorted({e["name"] for e in spans if e["cat"] == "step"})
    assert steps == ["step 10", "step 11"]  # the window alone
    for pid in (0, 1):
        mine = [e for e in spans if e["pid"] == pid]
        cats = {e["cat"] for e in mine}
        assert cats >= {"step", "data", "compute", "layer", "exchange", "update", "fault",
                        "evaluation"}, cats
        outer = [e for e in mine if e["cat"] in ("step", "evaluation")]
        layers = [e for e in mine if e["cat"] == "layer"]
        assert layers and all(any(inside(lay, s) for s in outer) for lay in layers)
        assert {e["name"] for e in layers} >= {"forward 0: Linear", "backward 4: Linear"}
        assert any(e["name"] == "checkpoint" and e["args"]["step"] == 11 for e in mine)
        # Buckets are summed on the exchange thread; backward hands them over as it makes
        # them final, so with overlap a hand-over lies inside a backward pass (how long
        # the sums then run beside backward depends on the machine: not asserted).
        buckets = [e for e in mine if e["name"] == "allreduce"]
        backward = [e for e in mine if e["name"] == "backward"]
        ready = [e for e in mine if e["name"] == "bucket ready"]
        assert buckets and {e["tid"] for e in buckets}.isdisjoint({e["tid"] for e in backward})
        assert any(inside(r, w) for r in ready for w in backward), "no bucket began in backward"


def test_without_overlap_no_bucket_begins_before_backward_ends(small_data, tmp_path):
    path = tmp_path / "timeline.json"
    result = run_train(2, "--data", small_data, "--hidden", "256,256", "--steps", "3",
                       "--bucket-mb", "0.05", "--no-overlap", "--timeline", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    spans = check_schema_and_nesting(events_of(path), 2)
    backward = [e for e in spans if e["name"] == "backward"]
    buckets = [e for e in spans if e["name"] == "allreduce"]
    assert buckets and not any(inside(b, w) for b in buckets for w in backward)


@pytest.mark.parametrize("args, expect", [
    (["--strategy", "ps"], {"pull", "optimizer"}),
    (["--pp", "2", "--batch-size", "40"], {"send forward", "recv backward"}),
])
def test_parameter_server_and_pipeline_timelines(small_data, tmp_path, args, expect):
    path = tmp_path / "t.json"
    n = 3 if "ps" in args else 2
    result = run_train(n, "--data", small_data, "--hidden", "16,16", "--steps", "4",
                       "--timeline", str(path), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    spans = check_schema_and_nesting(events_of(path), n)
    assert expect <= {e["name"] for e in spans}


def test_timeline_option_errors(small_data, tmp_path):
    for args, message in ((["--timeline-steps", "3:5"], "--timeline-steps '3:5' does not apply"),
                          (["--timeline", str(tmp_path / "t.json"), "--timeline-steps", "5:3"],
                           "--timeline-steps: expected FIRST:LAST")):
        result = run_train(2, "--data", small_data, *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
