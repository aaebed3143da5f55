"""Tests against a real ComfyUI checkout named by COMFYUI_PATH; skipped without one."""

import pytest

# the ``comfy`` fixture comes from tests/conftest.py


def load_pack():
    """Import the node pack the way ComfyUI's custom-node loader does (a package named after
    its path), so ``pack.nodes`` is ours and not ComfyUI's own ``nodes`` module."""
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    name = root.replace(".", "_x_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(root, "__init__.py"), submodule_search_locations=[root]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack(comfy):
    return load_pack()
