"""Every example workflow passes ComfyUI's own prompt validation (node types, required
inputs, links, widget ranges and choices), with empty stand-ins for the model files: the
API-format files in example_workflows/api/ (the UI-format ones beside them are the same
workflows: tests/test_example_workflows_formats.py)."""

import asyncio
import glob
import json
import os

import pytest
from workflow_files import FILE_INPUTS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "api", "*.json")))


@pytest.fixture(scope="module")
def registry(comfy, pack):
    # ComfyUI's nodes.py puts comfy/ first on sys.path, after which "utils" would resolve to
    # comfy/utils.py; main.py imports the utils package before that, and so do we.
    import utils.install_util  # noqa: F401
    import utils.json_util  # noqa: F401

    core_nodes = _core_nodes_module()

    if "WanVaceToVideo" not in core_nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(core_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    core_nodes.NODE_CLASS_MAPPINGS.update(pack.NODE_CLASS_MAPPINGS)
    return core_nodes


def _core_nodes_module():
    """ComfyUI's own ``nodes`` module (this repo has a ``nodes.py`` too, which may come first
    on sys.path in a full test run)."""
    import importlib.util
    import sys

    path = os.path.join(os.path.abspath(os.environ["COMFYUI_PATH"]), "nodes.py")
    module = sys.modules.get("nodes")
    if module is not None and os.path.abspath(getattr(module, "__file__", "")) == path:
        return module
    spec = importlib.util.spec_from_file_location("nodes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nodes"] = module
    spec.loader.exec_module(module)
    return module


def test_there_are_workflows_for_each_family():
    names = {os.path.basename(p) for p in WORKFLOWS}
    assert {
        "wan21_t2v_14b_blockswap.json",
        "wan22_a14b_t2v_blockswap.json",
        "wan_vace_14b_lazy_loader.json",
        "flux_dev_blockswap.json",
    } <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_validates_in_comfyui(registry, tmp_path, path):
    import execution
    import folder_paths
    from PIL import Image

    prompt = json.load(open(path))
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if name in FILE_INPUTS and isinstance(value, str):
                folder = tmp_path / FILE_INPUTS[name]
                folder.mkdir(exist_ok=True)
                (folder / value).write_bytes(b"")
                folder_paths.add_model_folder_path(FILE_INPUTS[name], str(folder))
            if node["class_type"] == "LoadImage" and name == "image":
                folder_paths.set_input_directory(str(tmp_path))
                Image.new("RGB", (8, 8)).save(tmp_path / value)
    assert any(n["class_type"].startswith("WanBlockSwap") for n in prompt.values())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("x", prompt, None))
    assert valid, (error, node_errors)
    assert outputs
