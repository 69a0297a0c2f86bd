"""End to end with Node's ``ws`` package, a WebSocket stack other than the proxy's own kin.

- ``ws`` as the client, through the proxy, to the demo backend's ``/ws`` echo;
- ``ws`` as the backend, behind the proxy, with the Python ``websockets``
  client talking to it, with and without permessage-deflate.

The Node scripts and the pinned ``ws`` live in ``tests/e2e/``; the first test
that needs them runs ``npm ci`` there if ``node_modules`` is missing (or
``.ci/install-e2e`` did it beforehand). Without node and npm, or when the
install fails (no registry), these tests are skipped and say why.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from e2e_support import E2E_DIR, BackgroundProcess, demo_behind_proxy, run_bounded
from loopback import Loopback, Proxy, eventually
from twisted.internet.threads import deferToThread
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.sync.client import connect as ws_connect

pytestmark = pytest.mark.loopback

NODE_PING = "ping from node"


@pytest_twisted.async_yield_fixture
async def demo_proxy(loopback: Loopback) -> AsyncIterator[Proxy]:
    """The demo backend behind a proxy, on 127.0.0.1."""
    async with demo_behind_proxy(loopback) as proxy:
        yield proxy


# -- ws as the client ----------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest_twisted.ensureDeferred
async def test_node_ws_client_through_the_proxy_to_the_demo_websocket_echo(
    node: Path, demo_proxy: Proxy
) -> None:
    url = f"ws://127.0.0.1:{demo_proxy.port}/ws"
    result = await deferToThread(run_bounded, [node, E2E_DIR / "ws_client.mjs", url], 30)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)

    assert report["error"] is None
    # What ws_client.mjs sends: types, lengths, and the bytes of the fixed ones.
    sent = report["sent"]
    assert [(m["type"], m["length"]) for m in sent] == [
        ("text", 12),
        ("text", len("héllo wörld ✓ 𝄞".encode())),
        ("text", 0),
        ("binary", 1),
        ("binary", 256),
        ("text", 70000),
        ("binary", 2**20),
    ]
    assert sent[0]["sha256"] == sha256(b"hello, proxy")
    assert sent[4]["sha256"] == sha256(bytes(range(256)))
    assert report["received"] == sent
    assert report["pong"] == NODE_PING
    # The demo echoes the close code and no reason (RFC 6455 §5.5.1 allows either).
    assert report["close"] == {"code": 1000, "reason": ""}
    # ws offers permessage-deflate; the demo declines by not answering it.
    assert report["extensions"] == ""
    await eventually(lambda: not demo_proxy.factory.proxy.tunnels, what="the tunnel to end")


# -- ws as the backend ---------------------------------------------------------------


@pytest_twisted.async_yield_fixture(params=[False, True], ids=["no-extension", "deflate"])
async def node_echo_server(
    request: pytest.FixtureRequest, node: Path
) -> AsyncIterator[tuple[BackgroundProcess, int, bool]]:
    """``ws_server.mjs`` running; yields (process, port, whether it offers deflate)."""
    deflate: bool = request.param
    args = [node, E2E_DIR / "ws_server.mjs", *(["--deflate"] if deflate else [])]
    server = BackgroundProcess(args)
    try:
        listening = await deferToThread(server.event)
        assert listening["event"] == "listening", listening
        yield server, listening["port"], deflate
    finally:
        await deferToThread(server.stop)


def client_messages() -> list[str | bytes]:
    rng = random.Random(7692)
    fixed: list[str | bytes] = ["hello, node", "héllo wörld ✓ 𝄞", "", b"\x00", bytes(range(256))]
    mixed = [
        rng.randbytes(rng.randint(1, 4096)) if i % 2 else "proxy " * rng.randint(1, 2000)
        for i in range(200)
    ]
    return [*fixed, *mixed, "x" * 70000, rng.randbytes(2**20)]


def talk_to_node(port: int, compression: str | None) -> dict[str, Any]:
    """Send every message through the proxy and read the echoes; say what happened."""
    messages = client_messages()
    wrong: list[int] = []
    with ws_connect(
        f"ws://127.0.0.1:{port}/node-echo",
        proxy=None,
        compression=compression,
        max_size=4 * 2**20,
        open_timeout=5,
        close_timeout=5,
        ping_interval=None,
    ) as ws:
        for index, message in enumerate(messages):
            ws.send(message)
            echo = ws.recv(timeout=10)
            if type(echo) is not type(message) or echo != message:
                wrong.append(index)
        pong = ws.ping(b"ping from python").wait(5)
        ws.close(1000, "python is done")
    close = ws.protocol.close_rcvd
    return {
        "wrong": wrong,
        "pong": pong,
        "extensions": [type(e) for e in ws.protocol.extensions],
        "close": None if close is None else (close.code, close.reason),
    }


@pytest_twisted.ensureDeferred
async def test_python_websockets_client_through_the_proxy_to_a_node_ws_server(
    node_echo_server: tuple[BackgroundProcess, int, bool], loopback: Loopback
) -> None:
    server, port, deflate = node_echo_server
    proxy = loopback.proxy(port)
    outcome = await loopback.run(
        talk_to_node, proxy.port, "deflate" if deflate else None, timeout=30
    )

    assert outcome["wrong"] == []
    assert outcome["pong"], "no pong from node"
    assert outcome["close"] == (1000, "python is done")
    assert outcome["extensions"] == ([PerMessageDeflate] if deflate else [])

    events = [await deferToThread(server.event)]
    while events[-1]["event"] != "close":
        events.append(await deferToThread(server.event))
    connection = events[0]
    assert connection["event"] == "connection", events
    assert connection["path"] == "/node-echo"
    assert connection["extensions"] == ("permessage-deflate" if deflate else "")
    if deflate:
        assert connection["offered"].startswith("permessage-deflate")
    else:
        assert connection["offered"] is None
    assert {"event": "pong", "data": NODE_PING} in events
    assert {"event": "ping", "data": "ping from python"} in events
    assert events[-1] == {"event": "close", "code": 1000, "reason": "python is done"}
    await eventually(lambda: not proxy.factory.proxy.tunnels, what="the tunnel to end")
