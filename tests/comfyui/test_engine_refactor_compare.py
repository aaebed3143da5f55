"""benchmarks/engine_refactor_compare.py in its CPU smoke mode: the frozen old engine and this
checkout's, side by side on core's Wan, plan the same and give outputs bit-identical to each
other and to the unswapped model; plans past the deadline are recorded as not run."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "engine_refactor_compare.py")
OLD = os.path.join(ROOT, ".carry", "engine_base")

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(OLD, "wan_blockswap", "__init__.py")),
    reason="no frozen old engine at .carry/engine_base",
)


def _run(tmp_path, name, *args):
    output = tmp_path / name
    run = subprocess.run(
        [sys.executable, SCRIPT, "--cpu", "--output", str(output), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run, json.loads(output.read_text())


def test_cpu_run_compares_both_engines_with_equal_outputs(tmp_path, comfy):
    plans = ["all swapped", "streamed"]
    # the new engine holds copies at the forward's edge by default: same plans, same outputs
    run, results = _run(tmp_path, "compare.json", "--plans", *plans)
    assert results["mode"] == "cpu" and results["old"] == OLD
    assert results["new_holds_at_forward_edge"] is True
    assert list(results["configs"]) == [f"{p}, {c}" for p in plans for c in ("raw", "compressed")]
    for key, config in results["configs"].items():
        assert config["status"] == "ok" and config["same_plan"] is True, (key, config)
        assert len(config["apply_s"]["old"]) == len(config["apply_s"]["new"]) == 2  # rounds
        plan = config["plans"]["new"]
        assert plan["kind"] == ("streamed" if key.startswith("streamed") else "slots")
        assert len(plan["swapped"]) == 8  # every block
        assert plan["compressed"] is key.endswith("compressed")
    small, large = results["tokens"]
    assert small < large
    assert [(r["plan"], r["compression"], r["tokens"]) for r in results["rows"]] == [
        (p, c, t) for p in plans for c in ("raw", "compressed") for t in (small, large)
    ]
    for row in results["rows"]:
        assert row["equal_output"] is True and row["same_plan"] is True, row
        assert row["old_equal_reference"] and row["new_equal_reference"]
        assert row["old_ms"] > 0 and row["new_ms"] > 0 and row["ratio"] > 0
        assert row["met"] is None and row["peak_ratio"] is None  # nothing judged on the CPU
    bars = results["bars"]
    assert bars["judged"] is False and bars["all_met"] is None
    assert bars["all_equal_output"] is True and bars["not_measured"] == []
    assert "streamed" in run.stdout and "equal outputs and plans: True" in run.stdout


def test_plans_past_the_deadline_are_not_run(tmp_path, comfy):
    _, results = _run(tmp_path, "late.json", "--plans", "half resident", "--deadline", "0")
    assert set(results["configs"]) == {"half resident, raw", "half resident, compressed"}
    for config in results["configs"].values():
        assert config["status"] == "not_run" and "deadline" in config["reason"]
    assert results["rows"] == [] and results["bars"]["all_equal_output"] is False
    assert results["bars"]["not_measured"] == list(results["configs"])
    assert set(results["all_on_gpu"]) == {str(t) for t in results["tokens"]}
