"""Import this checkout as ``comfyui_wan_blockswap``, the package's one import root, whether
or not it is pip-installed (the GPU machine runs a bare checkout): benchmarks and tests use
the checkout they sit in, through the same package paths an installed copy has. Also puts
``tests/`` on the path, for the test-data writers and tiny models the benchmarks share."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "comfyui_wan_blockswap"


def import_pack() -> ModuleType:
    """The checkout's root package (loaded by its path once, then from ``sys.modules``)."""
    module = sys.modules.get(NAME)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(
        NAME, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NAME]
        raise
    return module


import_pack()
TESTS = os.path.join(ROOT, "tests")
if TESTS not in sys.path:
    sys.path.append(TESTS)
