"""Protocol upgrades over real loopback sockets, with exact packet boundaries.

These are the proxy's reasons to exist (see MISSION.md): no byte lost or
duplicated around the switch, in either direction; a wrong ``101`` refused
with words that say why; no HTTP ever written into a switched connection;
half-close, bulk data both ways, and a real WebSocket library on both ends.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import pytest
import pytest_twisted
from loopback import (
    HEAD_END,
    Client,
    Head,
    Loopback,
    LoopbackBackendConnection,
    eventually,
    sleep,
    switching_response,
    upgrade_request,
    wait,
)
from twisted.internet.error import ConnectionDone
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from upgradeproxy import ProxySettings
from upgradeproxy.core import _splice as splice

pytestmark = pytest.mark.loopback


@pytest.fixture(autouse=True, params=["splice", "python"])
def relay(request: pytest.FixtureRequest, loopback: Loopback) -> str:
    """Run every test with both tunnel relays: splice(2) (Linux) and the Python one."""
    if request.param == "splice" and not splice.AVAILABLE:
        pytest.skip("splice(2) is not available here")
    loopback.proxy_defaults["settings"] = ProxySettings(splice=request.param == "splice")
    return str(request.param)


PAYLOAD = bytes(range(100))
PROTOCOLS = [b"websocket", b"proxmox-backup-protocol-v1"]


def check_switch(head: Head, protocol: bytes) -> None:
    assert head.status == 101, head.raw
    assert b"upgrade" in head.tokens(b"connection"), head.raw
    assert head.get_all(b"upgrade") == [protocol], head.raw


async def switched(
    loopback: Loopback, protocol: bytes = b"websocket", **proxy_kwargs: Any
) -> tuple[Client, LoopbackBackendConnection]:
    """A client and a backend connection with a tunnel between them."""
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number, **proxy_kwargs)
    client = loopback.client(proxy.port)
    client.send_once(upgrade_request(protocol))
    conn = await backend.connection()
    head = await wait(conn.head_received)
    conn.transport.write(switching_response(head))
    check_switch(await loopback.run(client.recv_head), protocol)
    return client, conn


# -- 1. client bytes that arrive with or behind the request head --------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest_twisted.ensureDeferred
async def test_bytes_in_the_same_send_as_the_head_reach_the_backend_once(
    loopback: Loopback, protocol: bytes
) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(upgrade_request(protocol) + PAYLOAD)
    conn = await backend.connection()
    head = await wait(conn.head_received)
    assert Head.parse(head).get_all(b"upgrade") == [protocol]
    conn.transport.write(switching_response(head))

    check_switch(await loopback.run(client.recv_head), protocol)
    await conn.wait_for_bytes(len(PAYLOAD))
    # A marker sent after the switch arrives after everything the proxy held,
    # so once it is in, nothing more can come: the bytes arrived exactly once.
    client.send_once(b"END")
    await conn.wait_for(PAYLOAD + b"END")
    assert conn.after_head == PAYLOAD + b"END"
    assert client.buf == b""


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("sends", [[100], [1, 49, 50]], ids=["one-send", "three-sends"])
@pytest_twisted.ensureDeferred
async def test_bytes_sent_while_the_backend_delays_its_101_reach_the_backend_once(
    loopback: Loopback, protocol: bytes, sends: list[int]
) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(upgrade_request(protocol))
    conn = await backend.connection()
    head = await wait(conn.head_received)
    # The backend is "thinking"; meanwhile the client starts talking.
    offset = 0
    for size in sends:
        client.send_once(PAYLOAD[offset : offset + size])
        offset += size
        await sleep(0.05)
    await sleep(0.2)
    assert conn.after_head == b"", "bytes reached the backend before its 101"
    conn.transport.write(switching_response(head))

    check_switch(await loopback.run(client.recv_head), protocol)
    client.send_once(b"END")
    await conn.wait_for(PAYLOAD + b"END")
    assert conn.after_head == PAYLOAD + b"END"


# -- 2. backend bytes in the same send as its 101 -------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest_twisted.ensureDeferred
async def test_bytes_in_the_same_send_as_the_101_reach_the_client(
    loopback: Loopback, protocol: bytes
) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(upgrade_request(protocol))
    conn = await backend.connection()
    head = await wait(conn.head_received)
    conn.transport.write(switching_response(head) + PAYLOAD)

    check_switch(await loopback.run(client.recv_head), protocol)
    assert await loopback.run(client.recv_exactly, len(PAYLOAD)) == PAYLOAD
    conn.transport.loseConnection()
    assert await loopback.run(client.recv_to_eof) == b""


# -- 3. a wrong 101 is refused with a 502 that says why --------------------------------


async def refused_switch(
    loopback: Loopback, request: bytes, response: bytes, **proxy_kwargs: Any
) -> tuple[str, LoopbackBackendConnection]:
    """Send ``request`` (plus early bytes), answer ``response``; return the 502's body.

    Checks the common part: a 502 that closes the client connection, the
    backend connection closed too, and neither side's early bytes passed on.
    """
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number, **proxy_kwargs)
    client = loopback.client(proxy.port)

    client.send_once(request + b"client-early-bytes")
    conn = await backend.connection()
    await wait(conn.head_received)
    conn.transport.write(response + b"backend-early-bytes")

    reply = await loopback.run(client.read_response)
    assert reply.status == 502, reply.raw
    assert reply.get(b"content-type").startswith(b"text/plain")
    # No trace of the switch, and the connection ends after the 502.
    assert reply.interim == [] and reply.raw.startswith(b"HTTP/1.1 502 "), reply.raw
    # Ending our side lets the proxy close at once instead of lingering.
    client.shutdown_write()
    assert await loopback.run(client.recv_to_eof) == b""
    await wait(conn.closed)
    assert conn.after_head == b"", "the client's bytes reached a refused backend"
    await eventually(
        lambda: not proxy.factory.proxy.connections, what="the client connection to close"
    )
    assert proxy.factory.proxy.pool.idle_count == 0
    return reply.text, conn


@pytest_twisted.ensureDeferred
async def test_101_without_connection_upgrade_is_refused_with_502_naming_the_rule(
    loopback: Loopback,
) -> None:
    request = upgrade_request(b"proxmox-backup-protocol-v1")
    text, _ = await refused_switch(loopback, request, switching_response(request, connection=None))
    assert "Connection: upgrade" in text
    assert "RFC 9110 §7.6.1" in text


@pytest_twisted.ensureDeferred
async def test_101_with_connection_keep_alive_only_is_refused(loopback: Loopback) -> None:
    request = upgrade_request(b"websocket")
    text, _ = await refused_switch(
        loopback, request, switching_response(request, connection=b"keep-alive")
    )
    assert "Connection: upgrade" in text


@pytest_twisted.ensureDeferred
async def test_101_naming_a_protocol_that_was_not_offered_is_refused(loopback: Loopback) -> None:
    request = upgrade_request(b"websocket")
    text, _ = await refused_switch(loopback, request, switching_response(request, protocol=b"h2c"))
    assert "h2c" in text
    assert "did not offer" in text


@pytest.mark.parametrize("chain", ["default", "empty"])
@pytest_twisted.ensureDeferred
async def test_unsolicited_101_to_a_plain_get_is_refused(loopback: Loopback, chain: str) -> None:
    """Whatever the validator chain: a client that did not ask cannot speak the new protocol."""
    request = b"GET /plain HTTP/1.1\r\nHost: app.example\r\n\r\n"
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    kwargs = {"validators": []} if chain == "empty" else {}
    text, conn = await refused_switch(loopback, request, response, **kwargs)
    assert "did not ask to upgrade" in text
    assert not Head.parse(conn.head).has(b"upgrade")


# -- 4. no HTTP after the switch ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_backend_reset_in_the_tunnel_ends_the_client_connection_without_http(
    loopback: Loopback,
) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(upgrade_request(b"websocket"))
    conn = await backend.connection()
    head = await wait(conn.head_received)
    conn.transport.write(switching_response(head) + b"first")
    check_switch(await loopback.run(client.recv_head), b"websocket")
    client.send_once(b"ping")
    await conn.wait_for(b"ping")
    conn.transport.write(b"before-the-reset")
    assert await loopback.run(client.recv_exactly, 21) == b"firstbefore-the-reset"

    conn.reset()
    after = await loopback.run(client.recv_to_eof)
    assert b"HTTP/1.1 5" not in after
    assert after == b""
    await eventually(lambda: not proxy.factory.proxy.tunnels, what="the tunnel to end")


@pytest_twisted.ensureDeferred
async def test_backend_reset_with_data_in_flight_writes_no_http_to_the_client(
    loopback: Loopback,
) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(upgrade_request(b"websocket"))
    conn = await backend.connection()
    head = await wait(conn.head_received)
    conn.transport.write(switching_response(head))
    check_switch(await loopback.run(client.recv_head), b"websocket")
    # Reset while both directions are busy; whatever arrives must be tunnel bytes.
    # (The client may see a reset in turn: the proxy may close with its bytes unread.)
    sending = loopback.run(client.sendall, b"x" * 50_000)
    conn.transport.write(b"y" * 50_000)
    await sleep(0.01)
    conn.reset()
    await sending
    after = await loopback.run(client.recv_to_eof, True)
    assert b"HTTP/" not in after
    assert set(after) <= {ord("y")}


@pytest_twisted.ensureDeferred
async def test_client_reset_in_the_tunnel_ends_the_backend_connection_without_http(
    loopback: Loopback,
) -> None:
    client, conn = await switched(loopback)
    client.send_once(b"hello")
    await conn.wait_for(b"hello")
    client.reset()
    await wait(conn.closed)
    assert conn.after_head == b"hello"


# -- 5. half-close ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_half_close_reaches_the_backend_which_can_still_answer(
    loopback: Loopback,
) -> None:
    client, conn = await switched(loopback, b"proxmox-backup-protocol-v1")

    def answer_at_eof(c: Any) -> None:
        c.transport.write(b"you said: " + c.after_head)
        c.transport.loseConnection()

    conn.server.on_eof = answer_at_eof
    client.send_once(b"last words")
    client.shutdown_write()
    await wait(conn.eof)
    assert conn.half_closed
    assert conn.after_head == b"last words"
    assert await loopback.run(client.recv_to_eof) == b"you said: last words"
    await wait(conn.closed)
    assert conn.close_reason is not None and conn.close_reason.check(ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_backend_half_close_reaches_the_client_which_can_still_send(
    loopback: Loopback,
) -> None:
    client, conn = await switched(loopback, b"proxmox-backup-protocol-v1")
    conn.transport.write(b"all from me")
    conn.transport.loseWriteConnection()
    assert await loopback.run(client.recv_to_eof) == b"all from me"

    client.sendall(b"and now me")
    await conn.wait_for(b"and now me")
    client.shutdown_write()
    await wait(conn.eof)
    await wait(conn.closed)
    assert conn.after_head == b"and now me"


# -- 6. bulk data both ways at once ------------------------------------------------------


BULK = 32 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_32_mib_each_way_at_once_arrive_intact(loopback: Loopback, relay: str) -> None:
    to_backend = os.urandom(BULK)
    to_client = os.urandom(BULK)
    received = hashlib.sha256()
    count = [0]

    def bulk_backend(conn: Any, data: bytes) -> None:
        if conn.head is None:
            return
        if not conn.state.get("started"):
            conn.state["started"] = True
            data = conn.after_head
            conn.transport.write(switching_response(conn.head))
            conn.transport.write(to_client)
        received.update(data)
        count[0] += len(data)

    backend = loopback.backend(bulk_backend)
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port, timeout=30)

    def run_client() -> bytes:
        client.send_once(upgrade_request(b"proxmox-backup-protocol-v1"))
        check_switch(client.recv_head(), b"proxmox-backup-protocol-v1")
        errors: list[BaseException] = []

        def send() -> None:
            try:
                client.sendall(to_backend)
            except BaseException as e:  # reported below
                errors.append(e)

        sender = threading.Thread(target=send)
        sender.start()
        digest = hashlib.sha256()
        got = 0
        while got < BULK:
            chunk = client.recv_exactly(min(len(client.buf) or 65536, BULK - got))
            digest.update(chunk)
            got += len(chunk)
        sender.join(30)
        assert not sender.is_alive() and not errors, errors
        return digest.digest()

    client_digest = await loopback.run(run_client, timeout=60)
    assert client_digest == hashlib.sha256(to_client).digest()
    await eventually(lambda: count[0] >= BULK, timeout=30, what="32 MiB at the backend")
    assert count[0] == BULK
    assert received.digest() == hashlib.sha256(to_backend).digest()
    [tunnel] = proxy.factory.proxy.tunnels
    assert tunnel.spliced == (relay == "splice")


# -- 7. a real WebSocket library on both ends ----------------------------------------------


@pytest.fixture
def websocket_echo_server():
    """A `websockets` echo server in a thread on 127.0.0.1; yields (port, close codes)."""
    close_codes: list[int | None] = []

    def echo(ws: ServerConnection) -> None:
        try:
            for message in ws:
                ws.send(message)
        except ConnectionClosed:
            pass
        close_codes.append(ws.close_code)

    server = ws_serve(echo, "127.0.0.1", 0, max_size=2**21, ping_interval=None, close_timeout=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.socket.getsockname()[1], close_codes
    finally:
        # shutdown() waits for the handlers; never let it hang the suite.
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(10)
        thread.join(5)
        assert not stopper.is_alive() and not thread.is_alive(), "websockets server did not stop"


@pytest_twisted.ensureDeferred
async def test_websockets_library_as_client_and_backend(
    websocket_echo_server: tuple[int, list[int | None]], loopback: Loopback
) -> None:
    backend_port, server_close_codes = websocket_echo_server
    proxy = loopback.proxy(backend_port)
    big = os.urandom(2**20)

    def talk() -> int | None:
        with ws_connect(
            f"ws://127.0.0.1:{proxy.port}/echo",
            proxy=None,
            max_size=2**21,
            open_timeout=5,
            close_timeout=5,
            ping_interval=None,
        ) as ws:
            ws.send("hello, proxy")
            assert ws.recv(timeout=5) == "hello, proxy"
            ws.send(b"\x00\x01\x02binary\xff")
            assert ws.recv(timeout=5) == b"\x00\x01\x02binary\xff"
            ws.send("ünïcödé ✓")
            assert ws.recv(timeout=5) == "ünïcödé ✓"
            ws.send(big)
            assert ws.recv(timeout=10) == big
        return ws.close_code

    assert await loopback.run(talk, timeout=30) == 1000
    await eventually(lambda: server_close_codes == [1000], what="the server to see a clean close")
    await eventually(lambda: not proxy.factory.proxy.tunnels, what="the tunnel to end")
    await eventually(
        lambda: not proxy.factory.proxy.connections, what="the client connection to close"
    )


@pytest_twisted.ensureDeferred
async def test_websocket_frame_in_the_same_send_as_the_handshake(
    websocket_echo_server: tuple[int, list[int | None]], loopback: Loopback
) -> None:
    """The Caddy regression with a real server: a masked text frame sent with the head."""
    backend_port, _ = websocket_echo_server
    proxy = loopback.proxy(backend_port)
    client = loopback.client(proxy.port)
    mask = b"\x01\x02\x03\x04"
    text = b"first frame"
    frame = (
        bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    )

    client.send_once(upgrade_request(b"websocket", b"/echo") + frame)
    head = await loopback.run(client.recv_head)
    check_switch(head, b"websocket")
    echoed = await loopback.run(client.recv_exactly, 2 + len(text))
    assert echoed == bytes([0x81, len(text)]) + text
    assert HEAD_END not in client.buf
    # A clean close: a masked close frame (1000), answered by the server's.
    close = bytes([0x88, 0x82]) + mask + bytes(b ^ mask[i] for i, b in enumerate(b"\x03\xe8"))
    client.send_once(close)
    assert (await loopback.run(client.recv_to_eof)).startswith(b"\x88\x02\x03\xe8")
    client.close()
    await eventually(lambda: not proxy.factory.proxy.tunnels, what="the tunnel to end")
