"""The ComfyUI tier against every core tree beside the checkout (``../shared/comfyui/v*``,
or the folders in ``COMFYUI_CORES``, separated by ``os.pathsep``), each in its own process:
one core per process, since core's modules are global. Skipped when ``COMFYUI_PATH`` names
one core (the tier then runs in this process) or when no core tree is there.

All cores' processes start once the suite's tests are collected (``conftest.py``), and these
tests, which wait for them, run last: the tiers run side by side with each other and with the
rest of the suite. CI has two cores; waited for where they stood in the file order, the tiers
ran first with the main process idle, and the suite took 14.3 min on this machine's two cores
(the tiers' share 6.9 min), 12.3 on CI; started at collection, with one thread each, 11.1 on
the same machine. Each process writes to a file of its own (a pipe no one reads would fill
and stall it)."""

import glob
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIER = ["tests/comfyui", "tests/test_tiny_models.py", "tests/test_architectures.py"]


def _cores() -> list[str]:
    named = os.environ.get("COMFYUI_CORES")
    if named:
        return [path for path in named.split(os.pathsep) if path]
    pattern = os.path.join(os.path.dirname(ROOT), "shared", "comfyui", "v*")
    return sorted(path for path in glob.glob(pattern) if os.path.isdir(path))


_RUNS: dict[str, tuple[subprocess.Popen, "tempfile._TemporaryFileWrapper"]] = {}


def start_all() -> None:
    """Start a tier process for every core not started yet (none where COMFYUI_PATH names
    one core: the tier then runs in this process)."""
    if os.environ.get("COMFYUI_PATH"):
        return
    for core in _cores():
        if core not in _RUNS:
            log = tempfile.TemporaryFile("w+")
            process = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TIER],
                cwd=ROOT,
                # one thread each: beside the main process they share CI's two cores, and
                # torch's default (a thread per core) in every process oversubscribes them
                env={**os.environ, "COMFYUI_PATH": core, "OMP_NUM_THREADS": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
            _RUNS[core] = (process, log)


def stop_all() -> None:
    """Kill the tier processes still running (a run stopped before it waited for them)."""
    for process, log in _RUNS.values():
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.skipif(bool(os.environ.get("COMFYUI_PATH")), reason="COMFYUI_PATH runs one core")
@pytest.mark.parametrize("core", _cores() or [None], ids=os.path.basename)
def test_the_comfyui_tier_passes_on(core):
    if core is None:
        pytest.skip("no ComfyUI core tree beside the checkout (../shared/comfyui)")
    start_all()
    run, log = _RUNS[core]
    try:
        run.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        run.kill()
        raise
    log.seek(0)
    tail = log.read()[-6000:]
    log.close()
    assert run.returncode == 0, f"ComfyUI tier on {core}:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
