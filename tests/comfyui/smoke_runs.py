"""Running a benchmark script in its CPU smoke mode, as the benchmark tests do."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cpu_smoke(script: str, output, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``benchmarks/<script> --cpu --output <output> args...``: the finished process and the
    JSON it wrote (it must exit 0)."""
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--cpu"]
        + ["--output", str(output), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run, json.loads(open(output).read())
