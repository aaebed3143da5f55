"""The node pack in ComfyUI's real web frontend: a CPU ComfyUI server with this pack in its
custom_nodes and the installed ``comfyui_frontend_package``, driven by headless Chromium over
the Chrome DevTools Protocol (a websocket through aiohttp; no browser-automation package).

Every example workflow (an API-format prompt) loads into the graph editor with our nodes,
each showing a widget per input, and without a missing-node marker, an error dialog or a node
flagged with errors. The Wan 2.1 14B one is also the README's picture,
``docs/comfyui_node.png``: ``WAN_BLOCKSWAP_UPDATE_SCREENSHOT=1`` rewrites it, otherwise the
test checks it is a PNG of the size the frontend renders now. The other screenshots (the
whole graph) stay in pytest's tmp_path.

Skipped without a Chromium on PATH, the frontend package or a ComfyUI core tree
(``COMFYUI_PATH``, else ``../shared/comfyui/v0.33.0`` next to this repository). Everything
talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib
from types import ModuleType
from typing import Any, Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
OUR_NODES = ("WanBlockSwapStream", "WanBlockSwapModelLoader")
README_WORKFLOW = "wan21_t2v_14b_blockswap.json"
README_SCREENSHOT = os.path.join(ROOT, "docs", "comfyui_node.png")
UPDATE_SCREENSHOT = os.environ.get("WAN_BLOCKSWAP_UPDATE_SCREENSHOT") == "1"
WIDTH, HEIGHT = 1600, 1000
# Inputs that name a file, and the models folder it is in (as in
# tests/comfyui/test_example_workflows.py): a name the server does not list is flagged as a
# missing model (a red node), so each gets an empty stand-in.
FILE_INPUTS = {
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "vae_name": "vae",
}
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


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-headless-shell")


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


# -- the server ---------------------------------------------------------------------------


def load_comfy_server() -> ModuleType:
    """benchmarks/comfy_server.py by path (benchmarks/ is no package)."""
    path = os.path.join(ROOT, "benchmarks", "comfy_server.py")
    spec = importlib.util.spec_from_file_location("_wan_blockswap_comfy_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_png(width: int = 8, height: int = 8) -> bytes:
    """A grey RGB PNG, from the stdlib: the VACE workflow's LoadImage previews a real image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR; fails on anything else."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def write_base_files(base: str) -> None:
    """Empty stand-ins for every model file the workflows name, their input image, and the
    user settings (the server's default user)."""
    for path in WORKFLOWS:
        with open(path) as handle:
            prompt = json.load(handle)
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if name in FILE_INPUTS and isinstance(value, str):
                    folder = os.path.join(base, "models", FILE_INPUTS[name])
                    os.makedirs(folder, exist_ok=True)
                    open(os.path.join(folder, value), "wb").close()
                if node["class_type"] == "LoadImage" and name == "image":
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


# -- the browser --------------------------------------------------------------------------


class DevTools:
    """One Chrome DevTools Protocol connection (the browser's websocket), used synchronously:
    each call runs a private event loop until its answer comes; events that arrive meanwhile
    are kept in ``events``."""

    def __init__(self, url: str) -> None:
        import aiohttp

        self.loop = asyncio.new_event_loop()
        self.next_id = 0
        self.events: list[dict] = []

        async def connect() -> tuple[Any, Any]:
            http = aiohttp.ClientSession()
            # max_msg_size=0: a screenshot comes back as one large base64 message
            return http, await http.ws_connect(url, max_msg_size=0)

        self.http, self.ws = self.loop.run_until_complete(connect())

    def call(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict:
        return self.loop.run_until_complete(self._call(method, params or {}, session, timeout))

    async def _call(self, method: str, params: dict, session: str | None, timeout: float) -> dict:
        import aiohttp

        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            received = await asyncio.wait_for(self.ws.receive(), deadline - time.monotonic())
            if received.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed during {method}")
            data = json.loads(received.data)
            if data.get("id") != self.next_id:
                self.events.append(data)
                continue
            if "error" in data:
                raise RuntimeError(f"{method}: {data['error']}")
            return data["result"]

    def close(self) -> None:
        async def close() -> None:
            await self.ws.close()
            await self.http.close()

        try:
            self.loop.run_until_complete(close())
        finally:
            self.loop.close()


class Page:
    """A browser tab (a flat DevTools session) of ``WIDTH`` x ``HEIGHT`` CSS pixels."""

    def __init__(self, devtools: DevTools) -> None:
        self.devtools = devtools
        self.target = devtools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = devtools.call(
            "Target.attachToTarget", {"targetId": self.target, "flatten": True}
        )["sessionId"]
        self.call("Runtime.enable")
        self.call("Page.enable")
        # the screenshot's size, whatever the window decorations leave of --window-size
        metrics = {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics)

    def call(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        return self.devtools.call(method, params, self.session, timeout)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The expression's value (promises awaited), as JSON; a page exception raises."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        result = self.call("Runtime.evaluate", params, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise RuntimeError(f"page exception: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll until ``expression`` is truthy (errors while the page loads count as not)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied: {expression}")
            time.sleep(0.2)

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])

    def exceptions(self) -> list[str]:
        """Uncaught exceptions this tab reported since the last call; drains the events."""
        events, self.devtools.events[:] = list(self.devtools.events), []
        found = []
        for event in events:
            if event.get("sessionId") == self.session and (
                event.get("method") == "Runtime.exceptionThrown"
            ):
                details = event["params"]["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details["text"])
        return found


def launch_chromium(binary: str, workdir: str, timeout: float = 60.0) -> tuple[Any, str]:
    """Headless Chromium with a DevTools port of its choosing; returns the process and the
    browser's websocket URL (printed on stderr, which goes to a file: nothing to drain)."""
    log_path = os.path.join(workdir, "chromium.log")
    command = [
        binary,
        "--headless=new",
        "--remote-debugging-port=0",
        "--no-sandbox",
        "--disable-gpu",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={os.path.join(workdir, 'profile')}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        # no host name resolves but localhost: the page (or Chromium) reaches nothing else
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
        "about:blank",
    ]
    with open(log_path, "wb") as log:
        # a session of its own: teardown ends Chromium's helper processes by its group id
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, errors="replace") as log:
            match = re.search(r"DevTools listening on (ws://\S+)", log.read())
        if match:
            return process, match.group(1)
        if process.poll() is not None or time.monotonic() > deadline:
            stop_chromium(process)
            raise RuntimeError(f"chromium did not start; see {log_path}")
        time.sleep(0.1)


def stop_chromium(process: Any) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    try:  # helpers the browser left behind: its process group is ours alone
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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


# -- in the page --------------------------------------------------------------------------

# Everything the assertions need, read from the live graph and DOM after a load.
INSPECT = """(() => {
  const shown = e => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
  const text = e => (e.innerText || '').trim().slice(0, 500);
  return {
    nodes: app.graph.nodes.map(n => ({
      id: String(n.id),
      type: n.type,
      title: n.title,
      registered: !!LiteGraph.registered_node_types[n.type],
      has_errors: !!n.has_errors,
      collapsed: !!(n.flags && n.flags.collapsed),
      size: Array.from(n.size),
      inputs: (n.inputs || []).map(i => ({name: i.name, linked: i.link != null})),
      widgets: (n.widgets || []).map(w => ({
        name: w.name,
        value: w.value,
        hidden: !!(w.hidden || (w.options && w.options.hidden) || w.advanced),
        y: w.y,
        height: w.computedHeight || LiteGraph.NODE_WIDGET_HEIGHT,
      })),
    })),
    dialogs: [...document.querySelectorAll('.p-dialog, [role="dialog"]')].filter(shown).map(text),
    error_overlay: [...document.querySelectorAll('[data-testid="error-overlay"]')]
      .filter(shown).map(text),
    error_toasts: [...document.querySelectorAll('.p-toast-message-error')]
      .filter(shown).map(text),
  };
})()"""

# Wait for the canvas to have drawn what changed (two animation frames).
REDRAW = """new Promise(done => {
  app.canvas.setDirty(true, true);
  requestAnimationFrame(() => requestAnimationFrame(() => done(true)));
})"""


def load_api_json(page: Page, prompt: dict, name: str) -> None:
    """What dropping an API-format prompt on the page does (the frontend's
    ``app.loadApiJson``: a node per entry, links, then ``graph.arrange()``), then let it
    settle: the node count, a little time for the stores' watchers, and a redraw."""
    page.evaluate(f"app.loadApiJson({json.dumps(prompt)}, {json.dumps(name)}).then(() => true)")
    page.wait_for(f"app.graph.nodes.length === {len(prompt)}", timeout=30)
    page.evaluate("new Promise(done => setTimeout(() => done(true), 500))")
    page.evaluate(REDRAW)


def frame_nodes(page: Page, ids: list[str], margin: float = 60.0, max_scale: float = 1.6) -> None:
    """Zoom and pan the canvas so that nodes ``ids`` fill the view below the top bar and
    right of the side bar, centred: legible widgets for the README's picture."""
    script = """((ids, margin, maxScale) => {
      const nodes = ids.map(id => app.graph.getNodeById(isNaN(+id) ? id : +id));
      const title = LiteGraph.NODE_TITLE_HEIGHT;
      const x0 = Math.min(...nodes.map(n => n.pos[0]));
      const y0 = Math.min(...nodes.map(n => n.pos[1] - title));
      const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
      const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
      const el = app.canvas.canvas;
      // the page's chrome over the canvas: side bar left, tabs and run bar on top
      const left = 60, top = 110, width = el.clientWidth - left, height = el.clientHeight - top;
      const scale = Math.min(maxScale, (width - 2 * margin) / (x1 - x0),
                             (height - 2 * margin) / (y1 - y0));
      const ds = app.canvas.ds;
      ds.scale = scale;
      // screen = (graph + offset) * scale: centre the box horizontally, top-align it
      ds.offset = [left / scale + (width / scale - (x1 - x0)) / 2 - x0,
                   (top + margin) / scale - y0];
      return scale;
    })(%s, %s, %s)""" % (
        json.dumps(ids),
        margin,
        max_scale,
    )
    page.evaluate(script)
    page.evaluate(REDRAW)


def model_neighbours(prompt: dict, node_id: str) -> list[str]:
    """``node_id`` and the nodes linked straight to it, either way."""
    ids = [node_id]
    ids += [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
    ids += [
        other
        for other, node in prompt.items()
        if any(isinstance(v, list) and v[0] == node_id for v in node["inputs"].values())
    ]
    return list(dict.fromkeys(ids))


# -- the test -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def object_info(server: Any) -> dict:
    """Our nodes as the server declares them to the frontend."""
    return {name: server_json(server, f"/object_info/{name}")[name] for name in OUR_NODES}


def server_json(server: Any, path: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_in_the_frontend(page: Page, object_info: dict, tmp_path: Any, path: str) -> None:
    name = os.path.basename(path)
    with open(path) as handle:
        prompt = json.load(handle)
    load_api_json(page, prompt, name)
    state = page.evaluate(INSPECT)
    nodes = {node["id"]: node for node in state["nodes"]}

    # every node of the file, none a placeholder for an unknown type or flagged red (a
    # missing model, a bad value)
    assert set(nodes) == set(prompt), (sorted(nodes), sorted(prompt))
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

    # the whole graph, for whoever looks into a failure (pytest keeps tmp_path)
    frame_nodes(page, list(prompt), margin=20.0, max_scale=1.0)
    (tmp_path / f"{name}.png").write_bytes(page.screenshot())
    if name == README_WORKFLOW:
        readme_screenshot(page, prompt, ours[0], tmp_path)


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
