"""The node pack in ComfyUI's real web frontend: a CPU ComfyUI server with this pack in its
custom_nodes and the installed ``comfyui_frontend_package``, driven by headless Chromium
(``tests/frontend_driver.py``).

Each example workflow comes in two formats: ``example_workflows/api/<name>.json``, an
API-format prompt, and ``example_workflows/<name>.json``, the same workflow in the UI format
that ComfyUI's Templates browser serves and loads. Checked here:

* every API file loads as a dropped prompt does (``app.loadApiJson``) with our nodes, each
  showing a widget per input with the file's value, and without a missing-node marker, an
  error dialog or a node flagged with errors;
* the server lists exactly the UI files as this pack's templates, and serves each unchanged;
* every UI file opens from the Templates browser (a click on its card) as the same graph: the
  API file's nodes, links, and our nodes' widget values, with nothing missing or flagged.

``WAN_BLOCKSWAP_UPDATE_WORKFLOWS=1`` writes the UI files from the API files, through the
frontend itself (loaded with ``app.loadApiJson``, laid out by its ``graph.arrange()``,
exported as its Workflow > Export does). The Wan 2.1 14B workflow is also the README's
picture, ``docs/comfyui_node.png``: ``WAN_BLOCKSWAP_UPDATE_SCREENSHOT=1`` rewrites it,
otherwise the test checks it is a PNG of the size the frontend renders now. The other
screenshots (the whole graph) stay in pytest's tmp_path.

Skipped without a Chromium on PATH, the frontend package or a ComfyUI core tree
(``COMFYUI_PATH``, else ``../shared/comfyui/v0.33.0`` next to this repository). Everything
talks to 127.0.0.1 only.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from collections import Counter
from types import ModuleType
from typing import Any, Iterator

import pytest
from workflow_files import FILE_INPUTS
from frontend_driver import (
    HEIGHT,
    INSPECT,
    REDRAW,
    WIDTH,
    DevTools,
    Page,
    chromium_binary,
    frame_nodes,
    launch_chromium,
    load_api_json,
    model_neighbours,
    open_template,
    png_size,
    stop_chromium,
    tiny_png,
    ui_workflow_from_api,
    write_workflow,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_DIR = os.path.join(ROOT, "example_workflows")
API_DIR = os.path.join(UI_DIR, "api")
NAMES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(API_DIR, "*.json")))
# the custom_nodes folder the server has this pack in (benchmarks/comfy_server.py): the
# module name the Templates browser files our workflows under
MODULE = "wan_blockswap"
OUR_NODES = ("WanBlockSwapStream", "WanBlockSwapModelLoader")
README_WORKFLOW = "wan21_t2v_14b_blockswap.json"
README_SCREENSHOT = os.path.join(ROOT, "docs", "comfyui_node.png")
UPDATE_SCREENSHOT = os.environ.get("WAN_BLOCKSWAP_UPDATE_SCREENSHOT") == "1"
UPDATE_WORKFLOWS = os.environ.get("WAN_BLOCKSWAP_UPDATE_WORKFLOWS") == "1"
# User settings the server hands the page: no first-run template browser over the graph, no
# workflow restored from an earlier tab (each test's tab starts alike, whatever ran before),
# and no minimap or canvas statistics in the README's picture.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.Persist": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
}


def core_path() -> str:
    """The ComfyUI core tree: ``COMFYUI_PATH``, else the shared one next to this repo."""
    default = os.path.join(ROOT, "..", "shared", "comfyui", "v0.33.0")
    return os.path.abspath(os.environ.get("COMFYUI_PATH") or default)


def missing_requirement() -> str | None:
    """Why this machine cannot run the test, or None. Cheap: runs at collection."""
    if chromium_binary() is None:
        return "no chromium or chromium-headless-shell on PATH"
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return "comfyui_frontend_package is not installed"
    if not os.path.isfile(os.path.join(core_path(), "main.py")):
        return f"no ComfyUI core tree at {core_path()} (set COMFYUI_PATH)"
    return None


MISSING = missing_requirement()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def api_prompt(name: str) -> dict:
    with open(os.path.join(API_DIR, name)) as handle:
        return json.load(handle)


# -- the server ---------------------------------------------------------------------------


def load_comfy_server() -> ModuleType:
    """benchmarks/comfy_server.py by path (benchmarks/ is no package)."""
    path = os.path.join(ROOT, "benchmarks", "comfy_server.py")
    spec = importlib.util.spec_from_file_location("_wan_blockswap_comfy_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_base_files(base: str) -> None:
    """Empty stand-ins for every model file the workflows name, their input image, and the
    user settings (the server's default user)."""
    for name in NAMES:
        for node in api_prompt(name).values():
            for key, value in node["inputs"].items():
                if key in FILE_INPUTS and isinstance(value, str):
                    folder = os.path.join(base, "models", FILE_INPUTS[key])
                    os.makedirs(folder, exist_ok=True)
                    open(os.path.join(folder, value), "wb").close()
                if node["class_type"] == "LoadImage" and key == "image":
                    os.makedirs(os.path.join(base, "input"), exist_ok=True)
                    with open(os.path.join(base, "input", value), "wb") as image:
                        image.write(tiny_png())
    user = os.path.join(base, "user", "default")
    os.makedirs(user, exist_ok=True)
    with open(os.path.join(user, "comfy.settings.json"), "w") as handle:
        json.dump(SETTINGS, handle)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    comfy_server = load_comfy_server()
    workdir = str(tmp_path_factory.mktemp("comfyui_frontend"))
    # an in-memory database: the default one is a file inside the (shared) core tree
    args = ("--cpu", "--database-url", "sqlite:///:memory:")
    instance = comfy_server.Server(core_path(), workdir, args=args, frontend=True)
    write_base_files(instance.base)
    try:
        instance.start(timeout=180)
        yield instance
    finally:
        instance.stop()


def server_get(server: Any, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return response.read()


@pytest.fixture(scope="module")
def object_info(server: Any) -> dict:
    """Our nodes as the server declares them to the frontend."""
    return {
        name: json.loads(server_get(server, f"/object_info/{name}"))[name] for name in OUR_NODES
    }


# -- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    workdir = str(tmp_path_factory.mktemp("chromium"))
    process, url = launch_chromium(chromium_binary(), workdir)
    devtools = None
    try:
        assert url.startswith("ws://127.0.0.1:"), url
        devtools = DevTools(url)
        yield devtools
    finally:
        if devtools is not None:
            try:
                devtools.call("Browser.close", timeout=5)
            except Exception:  # already gone, or it closed before answering
                pass
            devtools.close()
        stop_chromium(process)


@pytest.fixture
def page(server: Any, browser: DevTools) -> Iterator[Page]:
    """A fresh tab on the frontend, once it has its app, graph and our node types, and has
    done starting up: ``window.app`` comes before the start-up workflow loads, which would
    replace one loaded meanwhile; the splash screen goes when that is done."""
    tab = Page(browser)
    try:
        tab.navigate(server.url)
        tab.wait_for(
            "!!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
            " && LiteGraph.registered_node_types['WanBlockSwapStream'])"
            " && !document.getElementById('splash-loader')"
        )
        yield tab
    finally:
        browser.call("Target.closeTarget", {"targetId": tab.target})


# -- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_in_the_frontend(
    page: Page, object_info: dict, tmp_path: Any, name: str
) -> None:
    """The API file as a dropped prompt. With WAN_BLOCKSWAP_UPDATE_WORKFLOWS=1 the graph it
    gives, laid out by the frontend, is exported as the UI file of the same name."""
    prompt = api_prompt(name)
    load_api_json(page, prompt, name)
    state = page.evaluate(INSPECT)
    check_graph(page, state, prompt, object_info, name)

    # the whole graph, for whoever looks into a failure (pytest keeps tmp_path)
    frame_nodes(page, list(prompt), margin=20.0, max_scale=1.0)
    (tmp_path / f"{name}.png").write_bytes(page.screenshot())
    if name == README_WORKFLOW:
        ours = [node_id for node_id, node in prompt.items() if node["class_type"] in OUR_NODES]
        readme_screenshot(page, prompt, ours[0], tmp_path)
    if UPDATE_WORKFLOWS:
        write_workflow(os.path.join(UI_DIR, name), ui_workflow_from_api(page, prompt, name))


def test_the_templates_are_the_ui_workflows(server: Any) -> None:
    """The Templates browser's list (``/workflow_templates``): this pack's entries are the UI
    files (the top level of example_workflows/, not api/), one per API file; each is served
    unchanged from ``/api/workflow_templates/<module>/<name>.json``."""
    templates = json.loads(server_get(server, "/workflow_templates"))
    assert sorted(templates.get(MODULE, [])) == sorted(n[: -len(".json")] for n in NAMES), (
        templates,
        "(WAN_BLOCKSWAP_UPDATE_WORKFLOWS=1 writes the UI files)",
    )
    for name in NAMES:
        served = json.loads(server_get(server, f"/api/workflow_templates/{MODULE}/{name}"))
        with open(os.path.join(UI_DIR, name)) as handle:
            assert served == json.load(handle), name
        assert "nodes" in served and "links" in served, f"{name} is not a UI-format workflow"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_from_the_templates_browser(
    page: Page, object_info: dict, tmp_path: Any, name: str
) -> None:
    """The UI file opened as a user opens it: the Templates browser, a click on its card
    (the frontend fetches it from the server and loads it with ``app.loadGraphData``). The
    graph is the API file's: its nodes and links, our nodes' widgets with its values."""
    path = os.path.join(UI_DIR, name)
    assert os.path.isfile(path), f"{path} is missing: run with WAN_BLOCKSWAP_UPDATE_WORKFLOWS=1"
    prompt = api_prompt(name)
    open_template(page, name[: -len(".json")], len(prompt))
    state = page.evaluate(INSPECT)
    check_graph(page, state, prompt, object_info, name)
    nodes = {node["id"]: node for node in state["nodes"]}
    for node_id, api in prompt.items():
        sockets = {socket["name"]: socket for socket in nodes[node_id]["inputs"]}
        for input_name, value in api["inputs"].items():
            if isinstance(value, list):  # a link: the socket is connected to that output
                where = f"{name}: node {node_id} ({api['class_type']}).{input_name}"
                assert sockets.get(input_name, {}).get("origin") == value, (where, sockets)
    check_no_overlap(state["nodes"], name)

    frame_nodes(page, list(prompt), margin=20.0, max_scale=1.0)
    (tmp_path / f"template_{name}.png").write_bytes(page.screenshot())


def check_graph(page: Page, state: dict, prompt: dict, object_info: dict, name: str) -> None:
    """The graph on the page is ``prompt``'s: every node of it (same ids, same types), none a
    placeholder for an unknown type or flagged red (a missing model, a bad value), no dialog,
    error overlay or toast, no uncaught exception; our nodes show the file's values."""
    nodes = {node["id"]: node for node in state["nodes"]}
    assert set(nodes) == set(prompt), (sorted(nodes), sorted(prompt))
    assert Counter(n["type"] for n in state["nodes"]) == Counter(
        n["class_type"] for n in prompt.values()
    )
    for node_id, node in nodes.items():
        assert node["type"] == prompt[node_id]["class_type"], node
        assert node["registered"], f"missing node type in the frontend: {node['type']}"
        assert not node["has_errors"], f"node {node_id} ({node['type']}) is flagged with errors"
    assert not state["dialogs"], f"a dialog is open: {state['dialogs']}"
    assert not state["error_overlay"], f"error overlay (missing nodes?): {state['error_overlay']}"
    assert not state["error_toasts"], f"error toasts: {state['error_toasts']}"
    exceptions = page.exceptions()
    assert not exceptions, f"uncaught exceptions in the page: {exceptions}"

    ours = [node_id for node_id, node in prompt.items() if node["class_type"] in OUR_NODES]
    assert ours, f"{name} uses none of our nodes"
    for node_id in ours:
        check_our_node(nodes[node_id], prompt[node_id], object_info[prompt[node_id]["class_type"]])


def check_our_node(node: dict, api: dict, declared: dict) -> None:
    """Our node shows one visible widget per input of the file that is not a link, with the
    file's value; inputs the file leaves out may only be optional ones (they show with their
    defaults); linked inputs (``model``) are connected sockets."""
    linked = {name for name, value in api["inputs"].items() if isinstance(value, list)}
    valued = {name: value for name, value in api["inputs"].items() if name not in linked}
    widgets = {widget["name"]: widget for widget in node["widgets"]}
    optional = set(declared["input"].get("optional", {}))
    where = f"{node['type']} (node {node['id']})"

    assert not node["collapsed"], f"{where} is collapsed"
    missing = set(valued) - set(widgets)
    assert not missing, f"{where} shows no widget for {sorted(missing)}"
    extra = set(widgets) - set(valued)
    assert extra <= optional, f"{where} has widgets the file does not set: {sorted(extra)}"
    assert set(widgets) - extra == set(valued)
    for name, value in valued.items():
        widget = widgets[name]
        assert widget["value"] == value, f"{where}.{name} = {widget['value']!r}, file: {value!r}"
    for widget in node["widgets"]:
        assert not widget["hidden"], f"{where}.{widget['name']} is hidden"
        if widget["y"] is not None:  # laid out: inside the node's body
            assert widget["y"] + widget["height"] <= node["size"][1] + 1, (where, widget)
    sockets = {socket["name"]: socket for socket in node["inputs"]}
    for name in linked:
        assert sockets.get(name, {}).get("linked"), f"{where}.{name} is not connected"


def check_no_overlap(nodes: list[dict], name: str) -> None:
    """No two nodes (title bar included) cover each other: the layout is readable."""
    boxes = [
        (node["id"], node["pos"][0], node["pos"][1] - node["title_height"])
        + (node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
        for node in nodes
    ]
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            apart = ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
            assert apart, f"{name}: nodes {a} and {b} overlap"


def readme_screenshot(page: Page, prompt: dict, node_id: str, tmp_path: Any) -> None:
    """The README's picture: our node with what feeds it and what it feeds, zoomed to fill
    the view, selected (outlined, its model links lit). Written with
    WAN_BLOCKSWAP_UPDATE_SCREENSHOT=1, else compared by size."""
    frame_nodes(page, model_neighbours(prompt, node_id))
    select = "(id => { app.canvas.select(app.graph.getNodeById(isNaN(+id) ? id : +id)); return 1 })"
    page.evaluate(f"{select}({json.dumps(node_id)})")
    # the selection toolbox fades in
    page.evaluate("new Promise(done => setTimeout(() => done(true), 500))")
    page.evaluate(REDRAW)
    picture = page.screenshot()
    (tmp_path / "comfyui_node.png").write_bytes(picture)
    assert png_size(picture) == (WIDTH, HEIGHT)
    if UPDATE_SCREENSHOT:
        os.makedirs(os.path.dirname(README_SCREENSHOT), exist_ok=True)
        with open(README_SCREENSHOT, "wb") as handle:
            handle.write(picture)
        return
    assert os.path.isfile(
        README_SCREENSHOT
    ), f"{README_SCREENSHOT} is missing: run with WAN_BLOCKSWAP_UPDATE_SCREENSHOT=1"
    with open(README_SCREENSHOT, "rb") as handle:
        assert png_size(handle.read()) == png_size(picture)
