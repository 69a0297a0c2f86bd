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

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from e2e_support import RESULT_TIMEOUT, START_TIMEOUT, demo_behind_proxy, self_test_outcome
from loopback import Loopback, Proxy, eventually
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

pytestmark = pytest.mark.loopback


@pytest_twisted.async_yield_fixture
async def demo_proxy(loopback: Loopback) -> AsyncIterator[Proxy]:
    """The demo backend behind a proxy, on 127.0.0.1."""
    async with demo_behind_proxy(loopback) as proxy:
        yield proxy


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
