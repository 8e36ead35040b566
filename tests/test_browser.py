"""The report in a real browser: headless Debian `chromium`, driven over the DevTools protocol.

Chromium is started with `--remote-debugging-pipe` (DevTools messages on fds 3/4, NUL-separated
JSON), so no extra Python package is needed. Pages load from file:// with the network emulated
offline and no host resolving; the test fails on any console error, uncaught exception, dialog
(alert), or request that is not file:/data:/blob:, and checks that every plotly figure and every
circuitsvis widget rendered. A screenshot goes to tests/artifacts/.

Install: `apt-get update && apt-get install -y chromium`.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_results import BOS_LIKE_TOKEN, EVIL_IMG_TOKEN, EVIL_TOKEN, make_results

from iclgd_lens.report import render_report

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).parent / "artifacts"
if CHROMIUM is None:
    if os.environ.get("CI") == "true":  # under CI a missing browser is a failed install, not a reason to skip
        raise RuntimeError(
            "chromium is not installed but CI=true: .ci/install must install it (apt-get install -y chromium)"
        )
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe."""

    def __init__(self, user_data_dir: Path):
        cmd_r, self._cmd_w = os.pipe()  # we write commands, chromium reads fd 3
        self._resp_r, resp_w = os.pipe()  # chromium writes fd 4, we read

        def wire_fds():  # runs in the child: put the pipe ends on fds 3 and 4
            high_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(resp_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
                "--disable-extensions",
                "--no-default-browser-check",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                f"--user-data-dir={user_data_dir}",
                "--remote-debugging-pipe",
                "--window-size=1280,2000",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds,
            close_fds=False,  # keep fds 3/4 made by wire_fds
        )
        os.close(cmd_r)
        os.close(resp_w)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._resp_r)

    def _read_message(self, deadline: float) -> dict | None:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._resp_r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._resp_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(
        self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30
    ) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply is None:
                raise TimeoutError(f"no reply to {method}")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._on_event(reply, session)

    def _on_event(self, event: dict, session: str | None) -> None:
        self.events.append(event)
        if event.get("method") == "Page.javascriptDialogOpening" and session:
            # dismiss it so the page goes on; the test fails on the recorded event
            msg = {
                "id": 10**9 + len(self.events),
                "method": "Page.handleJavaScriptDialog",
                "params": {"accept": True},
                "sessionId": session,
            }
            os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")

    def pump(self, seconds: float, session: str) -> None:
        """Collect events for `seconds`."""
        deadline = time.monotonic() + seconds
        while (msg := self._read_message(deadline)) is not None:
            if "id" not in msg:
                self._on_event(msg, session)


def open_page(url: str, screenshot: Path | None = None, settle_s: float = 30) -> dict:
    """Load `url` offline; return what rendered and every problem seen."""
    user_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"iclgd-chromium-{os.getpid()}-{time.monotonic_ns()}"
    devtools = DevTools(user_dir)
    try:
        target = devtools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = devtools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            devtools.send(method, session=session)
        devtools.send(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
            session=session,
        )
        devtools.send("Page.navigate", {"url": url}, session=session)
        check = """(() => {
            const graphs = [...document.querySelectorAll('.plotly-graph-div')];
            const widgets = [...document.querySelectorAll('.circuitsvis-widget')];
            return {
              graphs: graphs.length,
              graphs_rendered: graphs.filter(
                g => g.classList.contains('js-plotly-plot') && g.querySelector('svg.main-svg')
              ).length,
              widgets: widgets.length,
              widgets_rendered: widgets.filter(w => w.childElementCount > 0 && w.innerText.length > 0).length,
              text: document.body ? document.body.innerText : '',
              ready: document.readyState,
            };
        })()"""
        deadline = time.monotonic() + settle_s
        state: dict = {}
        while time.monotonic() < deadline:
            devtools.pump(0.5, session)
            state = (
                devtools.send(
                    "Runtime.evaluate", {"expression": check, "returnByValue": True}, session=session
                )["result"].get("value")
                or {}
            )
            if (
                state.get("ready") == "complete"
                and state["graphs"] == state["graphs_rendered"]
                and state["widgets"] == state["widgets_rendered"]
            ):
                break
        devtools.pump(1.0, session)  # late errors
        if screenshot is not None:
            metrics = devtools.send("Page.getLayoutMetrics", session=session)
            height = min(int(metrics["cssContentSize"]["height"]), 6000)
            shot = devtools.send(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1},
                },
                session=session,
                timeout=60,
            )
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        devtools.close()
        shutil.rmtree(user_dir, ignore_errors=True)

    events = devtools.events
    state["dialogs"] = [e["params"] for e in events if e.get("method") == "Page.javascriptDialogOpening"]
    state["exceptions"] = [
        e["params"]["exceptionDetails"].get("exception", {}).get("description")
        or e["params"]["exceptionDetails"].get("text")
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
    ]
    state["console_errors"] = [
        " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
        for e in events
        if e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")
    ]
    state["log_errors"] = [
        e["params"]["entry"]["text"]
        for e in events
        if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
    ]
    state["requests"] = [
        e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"
    ]
    return state


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "report"
    render_report(make_results(), out, analyses={})
    return out


def assert_clean(state: dict) -> None:
    assert state["dialogs"] == [], f"a dialog opened: {state['dialogs']}"
    assert state["exceptions"] == [], f"uncaught exceptions: {state['exceptions']}"
    assert state["console_errors"] == [], f"console errors: {state['console_errors']}"
    assert state["log_errors"] == [], f"log errors: {state['log_errors']}"
    remote = [u for u in state["requests"] if not u.startswith(("file:", "data:", "blob:"))]
    assert remote == [], f"network requests from an offline report: {remote}"


def test_index_renders_offline_without_errors(report_dir):
    state = open_page((report_dir / "index.html").as_uri(), ARTIFACTS / "report_index.png")
    assert_clean(state)
    assert state["graphs"] > 0 and state["graphs_rendered"] == state["graphs"]
    assert "simaou by layer" in state["text"] or state["graphs"] >= 7
    # the hostile model and task names, shown as text (no dialog above)
    assert EVIL_IMG_TOKEN in state["text"]


def test_layer_page_renders_figures_and_attention_and_shows_tokens_as_text(report_dir):
    page = report_dir / "layer_01.html"
    state = open_page(page.as_uri(), ARTIFACTS / "report_layer_01.png")
    assert_clean(state)
    expected_graphs = page.read_text().count('class="plotly-graph-div"')
    assert expected_graphs >= 4 and state["graphs"] == expected_graphs == state["graphs_rendered"]
    assert state["widgets"] == 3 and state["widgets_rendered"] == 3  # ZSL, ICL, GD attention views
    for token in (EVIL_TOKEN, EVIL_IMG_TOKEN, BOS_LIKE_TOKEN):
        assert token in state["text"], token  # shown as text by circuitsvis, never run (no dialog above)


def test_single_file_report_renders(tmp_path):
    path = render_report(make_results(n_layers=2), tmp_path / "single", single_file=True, analyses={})
    state = open_page(path.as_uri())
    assert_clean(state)
    assert state["graphs"] > 0 and state["graphs_rendered"] == state["graphs"]
    assert state["widgets"] == 6 and state["widgets_rendered"] == 6
