"""The ComfyUI tier against every core tree beside the checkout (``../shared/comfyui/v*``,
or the folders in ``COMFYUI_CORES``, separated by ``os.pathsep``), each in its own process:
one core per process, since core's modules are global. Skipped when ``COMFYUI_PATH`` names
one core (the tier then runs in this process) or when no core tree is there."""

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


@pytest.mark.skipif(bool(os.environ.get("COMFYUI_PATH")), reason="COMFYUI_PATH runs one core")
@pytest.mark.parametrize("core", _cores() or [None], ids=os.path.basename)
def test_the_comfyui_tier_passes_on(core):
    if core is None:
        pytest.skip("no ComfyUI core tree beside the checkout (../shared/comfyui)")
    env = {**os.environ, "COMFYUI_PATH": core}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TIER],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"ComfyUI tier on {core}:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
