"""End to end in a real browser: headless Chromium runs the demo page's self-test through the proxy.

The proxy listens on 127.0.0.1 in front of the demo backend. Chromium loads
the page through it, and the page's script opens a WebSocket back through
the proxy, sends three messages (short, non-ASCII, and one long enough for a
64-bit length) and shows ``ok: 3 echoes`` in ``#result`` and the title when
every echo matches.

The test reads the page through the DevTools protocol, polling until the
self-test has a result. (``--dump-dom`` with ``--virtual-time-budget`` does
not wait for WebSocket traffic: with a backend that echoes a little late it
dumps the page while it still says "running…".) Chromium runs in its own
process group, which is killed by its id when the test ends, whatever
happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from e2e_support import demo_behind_proxy
from loopback import Loopback, Proxy, eventually
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

pytestmark = pytest.mark.loopback

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_TIMEOUT = 30.0
RESULT_TIMEOUT = 30.0
# What the page says about itself: its self-test result and the log it keeps.
PAGE_STATE = """JSON.stringify({
  href: location.href,
  title: document.title,
  result: document.getElementById("result")?.textContent ?? null,
  resultClass: document.getElementById("result")?.className ?? null,
  log: document.getElementById("log")?.textContent ?? null,
})"""


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip("chromium is not installed (see .ci/install-e2e)")


@pytest_twisted.async_yield_fixture
async def demo_proxy(loopback: Loopback) -> AsyncIterator[Proxy]:
    """The demo backend behind a proxy, on 127.0.0.1."""
    async with demo_behind_proxy(loopback) as proxy:
        yield proxy


@contextlib.contextmanager
def headless_chromium(
    chromium: str, url: str, workdir: Path, options: Sequence[str] = ()
) -> Iterator[int]:
    """Chromium showing ``url``; yields its DevTools port, and kills it on the way out."""
    profile = workdir / "profile"
    log = (workdir / "chromium.log").open("wb")
    args = [
        chromium,
        "--headless",
        "--no-sandbox",  # the tests may run as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-proxy-server",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        *options,
        url,
    ]
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
    )
    try:
        yield devtools_port(process, profile / "DevToolsActivePort", workdir / "chromium.log")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
            log.close()


def devtools_port(process: subprocess.Popen[bytes], active_port: Path, log: Path) -> int:
    """The port chromium's DevTools listen on, from the file it writes when ready."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"chromium exited ({process.returncode}): {tail(log)}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(active_port.read_text().splitlines()[0])
        time.sleep(0.05)
    raise AssertionError(f"chromium's DevTools did not start in {START_TIMEOUT}s: {tail(log)}")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def page_target(devtools: int) -> str:
    """The DevTools WebSocket URL of the page chromium opened."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{devtools}/json/list", timeout=5) as response:
        targets = json.load(response)
    pages = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
    assert len(pages) == 1, targets
    return str(pages[0])


def evaluate(cdp: ClientConnection, call_id: int, expression: str) -> Any:
    """Run ``Runtime.evaluate`` in the page; ``None`` if the page was between documents."""
    cdp.send(
        json.dumps(
            {
                "id": call_id,
                "method": "Runtime.evaluate",
                "params": {"expression": expression, "returnByValue": True},
            }
        )
    )
    while True:
        message = json.loads(cdp.recv(timeout=10))
        if message.get("id") == call_id:
            break
    result = message.get("result", {})
    if "error" in message or "exceptionDetails" in result:
        return None
    return result.get("result", {}).get("value")


def self_test_outcome(
    chromium: str, url: str, workdir: Path, options: Sequence[str] = ()
) -> dict[str, Any]:
    """Load ``url`` and wait until the page's self-test has a result; return the page's state.

    ``options`` go to chromium's command line.
    """
    with headless_chromium(chromium, url, workdir, options) as devtools:
        target = page_target(devtools)
        with ws_connect(target, proxy=None, max_size=None, ping_interval=None) as cdp:
            deadline = time.monotonic() + RESULT_TIMEOUT
            state: dict[str, Any] = {}
            call_id = 0
            while time.monotonic() < deadline:
                call_id += 1
                value = evaluate(cdp, call_id, PAGE_STATE)
                if value is not None:
                    state = json.loads(value)
                    if state["href"] == url and state["result"] not in (None, "running…"):
                        return state
                time.sleep(0.05)
    raise AssertionError(f"no self-test result after {RESULT_TIMEOUT}s; the page said {state}")


@pytest_twisted.ensureDeferred
async def test_chromium_runs_the_demo_pages_websocket_self_test_through_the_proxy(
    chromium: str, demo_proxy: Proxy, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{demo_proxy.port}/"
    state = await deferToThread(self_test_outcome, chromium, url, tmp_path).addTimeout(
        START_TIMEOUT + RESULT_TIMEOUT + 15, reactor
    )

    assert state["result"] == "ok: 3 echoes", state
    assert state["resultClass"] == "ok"
    assert state["title"] == "ok: 3 echoes"
    log = state["log"].splitlines()
    assert log[0] == f"connected ws://127.0.0.1:{demo_proxy.port}/ws"
    assert [line.split(" ")[0] for line in log[1:]] == ["sent"] * 3 + ["echo"] * 3
    # Chromium is gone, and with it the WebSocket.
    await eventually(lambda: not demo_proxy.factory.proxy.tunnels, what="the tunnel to end")
