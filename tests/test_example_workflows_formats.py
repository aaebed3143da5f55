"""The example workflows' two formats say the same thing, checked from the files alone (no
browser, no ComfyUI): ``example_workflows/<name>.json`` is the UI-format workflow ComfyUI's
Templates browser serves and loads (only the top level of the folder is listed there, and an
API-format file would open as an empty graph), ``example_workflows/api/<name>.json`` the
API-format prompt that core's validation checks (tests/comfyui/test_example_workflows.py).

The UI files are written by the frontend from the API files
(``WAN_BLOCKSWAP_UPDATE_WORKFLOWS=1 python -m pytest tests/test_frontend_browser.py``); this
catches an API file changed without them, where there is no Chromium.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_DIR = os.path.join(ROOT, "example_workflows")
API_DIR = os.path.join(UI_DIR, "api")
UI_NAMES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(UI_DIR, "*.json")))
API_NAMES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(API_DIR, "*.json")))
OUR_NODES = ("WanBlockSwapStream", "WanBlockSwapModelLoader")
REGENERATE = "WAN_BLOCKSWAP_UPDATE_WORKFLOWS=1 python -m pytest tests/test_frontend_browser.py"


def load(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name)) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def widget_inputs() -> dict[str, list[str]]:
    """Our nodes' inputs in the order the frontend makes their widgets (and writes
    ``widgets_values``): ``INPUT_TYPES``, required then optional. The loader's lists the
    model files through core's ``folder_paths``: a stand-in here, where there is no core (the
    names are all that matter)."""
    from comfyui_wan_blockswap import nodes

    stand_in = types.ModuleType("folder_paths")
    stand_in.get_filename_list = lambda folder: []
    saved = sys.modules.get("folder_paths")
    sys.modules["folder_paths"] = stand_in
    try:
        declared = {name: nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES() for name in OUR_NODES}
    finally:
        if saved is None:
            del sys.modules["folder_paths"]
        else:
            sys.modules["folder_paths"] = saved
    return {
        name: [key for group in ("required", "optional") for key in inputs.get(group, {})]
        for name, inputs in declared.items()
    }


def test_the_same_workflows_in_both_formats() -> None:
    assert API_NAMES, f"no API-format workflows in {API_DIR}"
    assert UI_NAMES == API_NAMES, f"UI and API files differ; regenerate: {REGENERATE}"


@pytest.mark.parametrize("name", API_NAMES)
def test_each_format_is_what_it_says(name: str) -> None:
    """The API file is a prompt (node id -> class_type and inputs); the UI file a graph
    (nodes, links): an API file at the top level would open as an empty template."""
    prompt = load(API_DIR, name)
    assert prompt and all("class_type" in node and "inputs" in node for node in prompt.values())
    if name not in UI_NAMES:
        pytest.fail(f"no example_workflows/{name}; regenerate: {REGENERATE}")
    workflow = load(UI_DIR, name)
    assert isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list)
    assert "version" in workflow


@pytest.mark.parametrize("name", API_NAMES)
def test_ui_workflow_matches_api_workflow(name: str, widget_inputs: dict) -> None:
    """Node for node (the frontend keeps the API file's ids), link for link; our nodes'
    ``widgets_values`` are the API file's inputs in ``INPUT_TYPES`` order, linked ones (the
    model) left out (every other input set in the API file); other nodes' widgets hold the API file's values in its
    order (they may hold more: a seed's control_after_generate)."""
    if name not in UI_NAMES:
        pytest.fail(f"no example_workflows/{name}; regenerate: {REGENERATE}")
    prompt = load(API_DIR, name)
    workflow = load(UI_DIR, name)
    nodes = {str(node["id"]): node for node in workflow["nodes"]}
    hint = f"{name}: regenerate the UI file: {REGENERATE}"

    assert sorted(n["type"] for n in workflow["nodes"]) == sorted(
        n["class_type"] for n in prompt.values()
    ), hint
    assert set(nodes) == set(prompt), hint
    links = {link[0]: link for link in workflow["links"]}
    assert len(links) == len(workflow["links"]), f"{name}: duplicate link ids"
    for node_id, api in prompt.items():
        node = nodes[node_id]
        where = f"{name}: node {node_id} ({api['class_type']})"
        assert node["type"] == api["class_type"], (where, hint)

        # links: each API link [source id, output slot] is a link into the named input
        linked = {key: value for key, value in api["inputs"].items() if isinstance(value, list)}
        sockets = {socket["name"]: socket for socket in node.get("inputs", [])}
        for key, (source, slot) in linked.items():
            link = links.get(sockets.get(key, {}).get("link"))
            assert link is not None, f"{where}.{key} is not linked; {hint}"
            _, origin, origin_slot, target, target_slot, _ = link
            assert [str(origin), origin_slot, str(target)] == [source, slot, node_id], (where, key)
            assert node["inputs"][target_slot]["name"] == key, (where, key)
        into = [link for link in workflow["links"] if str(link[3]) == node_id]
        assert len(into) == len(linked), f"{where}: links the API file lacks; {hint}"

        values = [value for key, value in api["inputs"].items() if key not in linked]
        shown = node.get("widgets_values", [])
        if api["class_type"] in OUR_NODES:
            order = [key for key in widget_inputs[api["class_type"]] if key not in linked]
            missing = [key for key in order if key not in api["inputs"]]
            assert not missing, f"{where}: the API file leaves out {missing}"
            expected = [api["inputs"][key] for key in order]
            assert len(shown) == len(expected), (where, shown, expected, hint)
            for key, value, want in zip(order, shown, expected):
                assert same(value, want), f"{where}.{key}: UI {value!r}, API {want!r}; {hint}"
            if "widgets_values_named" in node:  # newer frontends write both
                assert list(node["widgets_values_named"]) == order, (where, hint)
                assert node["widgets_values_named"] == dict(zip(order, shown)), (where, hint)
        else:
            assert is_subsequence(values, shown), (where, values, shown, hint)


def same(a: object, b: object) -> bool:
    """Equal as JSON values: 8 and 8.0 alike (the frontend writes 8.0 as 8), but not 0 and
    false."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def is_subsequence(values: list, shown: list) -> bool:
    """``values`` appear in ``shown`` in order, maybe with others between."""
    rest = iter(shown)
    return all(any(same(v, s) for s in rest) for v in values)
