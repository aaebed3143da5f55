"""The ComfyUI tier against every core tree beside the checkout (``../shared/comfyui/v*``,
or the folders in ``COMFYUI_CORES``, separated by ``os.pathsep``), each in its own process:
one core per process, since core's modules are global. Skipped when ``COMFYUI_PATH`` names
one core (the tier then runs in this process) or when no core tree is there.

All cores' processes start with the first test and run side by side: CI has two cores, and
this tier is most of the suite's time."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIER = ["tests/comfyui", "tests/test_tiny_models.py", "tests/test_architectures.py"]


def _cores() -> list[str]:
    named = os.environ.get("COMFYUI_CORES")
    if named:
        return [path for path in named.split(os.pathsep) if path]
    pattern = os.path.join(os.path.dirname(ROOT), "shared", "comfyui", "v*")
    return sorted(path for path in glob.glob(pattern) if os.path.isdir(path))


_RUNS: dict[str, subprocess.Popen] = {}


def _start_all() -> None:
    for core in _cores():
        if core not in _RUNS:
            _RUNS[core] = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TIER],
                cwd=ROOT,
                env={**os.environ, "COMFYUI_PATH": core},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )


@pytest.mark.skipif(bool(os.environ.get("COMFYUI_PATH")), reason="COMFYUI_PATH runs one core")
@pytest.mark.parametrize("core", _cores() or [None], ids=os.path.basename)
def test_the_comfyui_tier_passes_on(core):
    if core is None:
        pytest.skip("no ComfyUI core tree beside the checkout (../shared/comfyui)")
    _start_all()
    run = _RUNS[core]
    try:
        output, _ = run.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        run.kill()
        raise
    tail = output[-6000:]
    assert run.returncode == 0, f"ComfyUI tier on {core}:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
