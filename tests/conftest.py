import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # the tests' helpers: tiny models, writers
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import _pack  # noqa: E402,F401  (this checkout as comfyui_wan_blockswap, installed or not)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
    # The ComfyUI core tiers run in processes of their own (tests/test_comfyui_cores.py):
    # waited for last, they run beside the rest of the suite instead of before it
    tiers = [item for item in items if item.path.name == "test_comfyui_cores.py"]
    items[:] = [item for item in items if item.path.name != "test_comfyui_cores.py"] + tiers


_tier_modules = []


def pytest_collection_finish(session):
    """Start the core tiers' processes as soon as any of their tests is selected."""
    for item in session.items:
        if item.path.name == "test_comfyui_cores.py":
            item.module.start_all()
            _tier_modules.append(item.module)
            return


def pytest_sessionfinish(session, exitstatus):
    """A run stopped early (Ctrl-C, -x) leaves no tier process behind."""
    for module in _tier_modules:
        module.stop_all()


@pytest.fixture(autouse=True)
def _clean_swaps():
    """Leave no block swap applied between tests, whatever a test did."""
    yield
    from comfyui_wan_blockswap.wan_blockswap.engine import _active

    for swap in list(_active.values()):
        swap.remove()


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI core from ``COMFYUI_PATH``; the test is skipped without one. A core that is
    named but does not import (a missing torchvision, say) fails the test: a run that skips
    every ComfyUI test would look green."""
    import tiny_models

    if not os.environ.get("COMFYUI_PATH"):
        pytest.skip("COMFYUI_PATH is not set")
    try:
        return tiny_models.import_comfy()
    except tiny_models.ComfyUnavailable as error:
        pytest.fail(f"{error} (unset COMFYUI_PATH to skip the ComfyUI tests)", pytrace=False)
