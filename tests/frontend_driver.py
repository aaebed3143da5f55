"""Driving ComfyUI's real web frontend from tests: headless Chromium over the Chrome DevTools
Protocol (a websocket through aiohttp; no browser-automation package), and what the tests do
in the page: load a workflow the ways the frontend does (an API-format prompt dropped on the
page, a UI workflow opened from the Templates browser), read the graph back, frame nodes for a
screenshot, and export the graph as the frontend's *Export* menu item does.

No pytest in here: ``tests/test_frontend_browser.py`` holds the fixtures and the checks.
Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib
from typing import Any

# the browser tab's size in CSS pixels: the README's screenshot is this size
WIDTH, HEIGHT = 1600, 1000


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-headless-shell")


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

    def click(self, x: float, y: float) -> None:
        """A left click at CSS pixel ``x``, ``y``, as a mouse makes it (pointer events and
        all, which an element's ``click()`` would skip)."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            event = {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}
            if kind == "mouseMoved":
                event = {"type": kind, "x": x, "y": y}
            self.call("Input.dispatchMouseEvent", event)

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


# -- in the page --------------------------------------------------------------------------

# Everything the tests' assertions need, read from the live graph and DOM after a load.
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
      pos: Array.from(n.pos),
      size: Array.from(n.size),
      title_height: LiteGraph.NODE_TITLE_HEIGHT,
      inputs: (n.inputs || []).map(i => {
        const link = i.link == null ? null : app.graph.getLink(i.link);
        return {
          name: i.name,
          linked: i.link != null,
          origin: link ? [String(link.origin_id), link.origin_slot] : null,
        };
      }),
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
    settle(page)


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


def settle(page: Page) -> None:
    """A little time for the stores' watchers after a load, then a redraw."""
    page.evaluate("new Promise(done => setTimeout(() => done(true), 500))")
    page.evaluate(REDRAW)


# What the frontend's Workflow > Export menu item writes (its ``exportWorkflow``): the
# ``workflow`` half of ``app.graphToPrompt()`` (the graph's ``serialize()``, cleaned of
# localized names, with the frontend's version), plus the canvas view where the setting
# that restores it on load is on (``addViewRestore``, not reachable from outside).
EXPORT = """(async () => {
  const { workflow } = await app.graphToPrompt();
  if (app.extensionManager.setting.get('Comfy.EnableWorkflowViewRestore')) {
    const { offset, scale } = app.canvas.ds;
    workflow.extra = workflow.extra || {};
    workflow.extra.ds = { scale, offset: [offset[0], offset[1]] };
  }
  return workflow;
})()"""


def export_workflow(page: Page) -> dict:
    """The graph on the page as a UI-format workflow, as the frontend exports it."""
    return page.evaluate(EXPORT)


def ui_workflow_from_api(page: Page, prompt: dict, name: str) -> dict:
    """The UI-format workflow for API-format ``prompt``, made by the frontend itself: loaded
    as a dropped prompt is (``app.loadApiJson``, which lays the nodes out with
    ``graph.arrange()``), the view fitted to the whole graph, then exported."""
    load_api_json(page, prompt, name)
    frame_nodes(page, list(prompt), margin=20.0, max_scale=1.0)
    return export_workflow(page)


def write_workflow(path: str, workflow: dict) -> None:
    """``workflow`` as the frontend's export writes it: JSON, two-space indent."""
    with open(path, "w") as handle:
        json.dump(workflow, handle, indent=2)
        handle.write("\n")


def open_template(page: Page, name: str, node_count: int, timeout: float = 60.0) -> None:
    """Open workflow ``name`` the way a user does: the Templates browser (the frontend's
    ``Comfy.BrowseTemplates`` command), a click on its card. The frontend then fetches it
    from ``/api/workflow_templates/<module>/<name>.json`` and loads it with
    ``app.loadGraphData(..., {openSource: 'template'})``. Returns once the dialog is gone and
    the graph is the template's (its name on the active tab, ``node_count`` nodes)."""
    card = f"document.querySelector('[data-testid=\"template-workflow-{name}\"]')"
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates').then(() => 1)")
    page.wait_for(f"!!{card} && {card}.getBoundingClientRect().width > 0", timeout)
    x, y = page.evaluate(
        f"(card => {{ card.scrollIntoView({{block: 'center'}});"
        " const r = card.getBoundingClientRect();"
        f" return [r.x + r.width / 2, r.y + r.height / 2]; }})({card})"
    )
    page.click(x, y)
    page.wait_for(
        "!document.querySelector('[data-testid^=\"template-workflow-\"]')"
        f" && app.extensionManager.workflow.activeWorkflow?.filename === {json.dumps(name)}"
        f" && app.graph.nodes.length === {node_count}",
        timeout,
    )
    settle(page)
