"""Tests against a real ComfyUI checkout named by COMFYUI_PATH; skipped without one."""

import pytest

# the ``comfy`` fixture comes from tests/conftest.py


def load_pack():
    """The node pack, as ComfyUI imports it: a package whose modules import each other
    relatively (here under its one import root, the name an installed copy has)."""
    import _pack

    return _pack.import_pack()


@pytest.fixture(scope="session")
def pack(comfy):
    return load_pack()
