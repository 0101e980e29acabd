"""``pagedllm serve --ui``: the chat page in a real headless Chromium (the system package),
driven over the DevTools protocol: it types a message, sees the streamed answer (the same greedy
text as the API gives), and its Stop button aborts a long answer on the server.

Skipped when no Chromium is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.entrypoints.openai.conftest import MODEL_NAME, ServerProc, launch

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    import websockets.sync.client  # noqa: F401  (the DevTools protocol runs over a websocket)

    HAVE_WEBSOCKETS = True
except ImportError:
    HAVE_WEBSOCKETS = False
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)"),
    pytest.mark.skipif(not HAVE_WEBSOCKETS, reason="needs the websockets package"),
]
KEY = "sk-ui"


@pytest.fixture(scope="module")
def ui_server(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    log_dir = tmp_path_factory.mktemp("ui")
    server = launch("ui", llama_dir, log_dir, "--ui", api_key=KEY)
    try:
        server.wait_ready(time.monotonic() + 120)
        yield server
    finally:
        server.terminate()
        server.wait_stopped()


class Page:
    """One Chromium tab, spoken to over the DevTools protocol (CDP)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    def js(self, expr: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expr)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expr}")

    def type_text(self, text: str) -> None:
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        self.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        self.call("Input.dispatchKeyEvent", type="keyUp", **key)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    assert CHROMIUM is not None
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"]
        + ["--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if match:
                port = int(match.group(1))
            elif not line and proc.poll() is not None:
                break
        assert port is not None, "Chromium did not start its DevTools server"
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        tab = next(t for t in targets if t["type"] == "page")
        from websockets.sync.client import connect

        with connect(tab["webSocketDebuggerUrl"], max_size=None) as ws:
            yield Page(ws)
    finally:
        proc.kill()
        proc.wait(10)


def _open(page: Page, server: ServerProc) -> None:
    page.call("Page.navigate", url=f"{server.base_url}/ui")
    page.wait_for("document.readyState === 'complete' && !!document.getElementById('api-key')")
    page.js("localStorage.clear()")
    page.js(
        f"const k = document.getElementById('api-key'); k.value = '{KEY}';"
        "k.dispatchEvent(new Event('change')); true"
    )
    page.wait_for(f"document.getElementById('model').value === '{MODEL_NAME}'")


def test_page_needs_no_key_but_its_api_calls_do(ui_server: ServerProc) -> None:
    r = httpx.get(f"{ui_server.base_url}/ui")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(f"{ui_server.base_url}/ui/chat.js").status_code == 200
    assert httpx.get(f"{ui_server.base_url}/v1/models").status_code == 401


def test_type_a_message_and_see_the_streamed_answer(ui_server: ServerProc, page: Page) -> None:
    _open(page, ui_server)
    page.js("document.getElementById('temperature').value = '0'; true")
    page.js("document.getElementById('max-tokens').value = '12'; true")
    page.js("document.getElementById('input').focus(); true")
    page.type_text("hello there")
    page.press_enter()
    status = page.wait_for(
        "(document.getElementById('status').textContent.match(/\\d+ tokens in/) || [''])[0]"
    )
    assert status == "12 tokens in"
    shown = page.js("document.querySelector('.msg.assistant').textContent")
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    ref = httpx.post(f"{ui_server.base_url}/v1/chat/completions", json=body, headers=headers)
    assert shown == ref.json()["choices"][0]["message"]["content"] != ""
    assert page.js("document.querySelector('.msg.user').textContent") == "hello there"


def test_stop_aborts_the_request(ui_server: ServerProc, page: Page) -> None:
    _open(page, ui_server)
    page.js("document.getElementById('temperature').value = '0'; true")
    page.js("document.getElementById('max-tokens').value = '480'; true")
    page.js("document.getElementById('input').value = 'a long answer please'; true")
    page.js("document.getElementById('send').click(); true")
    page.wait_for("document.querySelector('.msg.assistant').textContent.length > 0")
    page.js("document.getElementById('stop').click(); true")
    page.wait_for("document.getElementById('status').textContent === 'stopped'")
    assert page.js("document.getElementById('send').disabled") is False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in ui_server.log().splitlines() if x.startswith("{")]
        done = [x for x in lines if x.get("event") == "request_finished"]
        if done and done[-1]["status"] != "ok":
            break
        time.sleep(0.1)
    assert done[-1]["status"] != "ok" and done[-1]["output_tokens"] < 480, done[-1]
