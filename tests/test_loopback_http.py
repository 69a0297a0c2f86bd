"""Plain HTTP/1.1 through the proxy over real loopback sockets.

Each test checks both ends: what the client gets, and what the scripted
backend received (byte for byte where it matters).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from loopback import (
    HEAD_END,
    Head,
    Loopback,
    dechunk,
    eventually,
    free_port,
    reply_to_each_head,
    sleep,
    switching_response,
    upgrade_request,
    wait,
)

from upgradeproxy import BackendSettings, ProxySettings

pytestmark = pytest.mark.loopback


def ok(body: bytes, *extra: bytes) -> bytes:
    """A 200 with a Content-Length body (and extra header lines)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(body)
    return head + b"".join(e + b"\r\n" for e in extra) + b"\r\n" + body


def get(target: bytes = b"/", *extra: bytes) -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: app.example\r\n"
        + b"".join(e + b"\r\n" for e in extra)
        + b"\r\n"
    )


# -- persistence and framing ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_keep_alive_two_requests_on_one_connection(loopback: Loopback) -> None:
    backend = loopback.backend(reply_to_each_head(lambda head: ok(b"page " + head.target)))
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(get(b"/one"))
    first = await loopback.run(client.read_response)
    assert (first.status, first.body) == (200, b"page /one")
    assert b"close" not in (first.get(b"connection") or b"").lower()

    client.send_once(get(b"/two"))
    second = await loopback.run(client.read_response)
    assert (second.status, second.body) == (200, b"page /two")

    # Both requests went over one backend connection, which is back in the pool.
    assert len(backend.connections) == 1
    conn = backend.connections[0]
    assert [Head.parse(h + HEAD_END).target for h in conn.received.split(HEAD_END)[:-1]] == [
        b"/one",
        b"/two",
    ]
    await eventually(lambda: proxy.factory.proxy.pool.idle_count == 1, what="the connection pooled")


@pytest_twisted.ensureDeferred
async def test_chunked_request_body_is_streamed_to_the_backend(loopback: Loopback) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(
        b"POST /upload HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n"
    )
    conn = await backend.connection()
    head = Head.parse(await wait(conn.head_received))
    assert head.tokens(b"transfer-encoding") == [b"chunked"]
    # The first chunk reaches the backend before the client sends the rest.
    await conn.wait_for(b"hello")
    client.send_once(b"6;ext=1\r\n world\r\n")
    await conn.wait_for(b" world")
    client.send_once(b"0\r\n\r\n")
    await conn.wait_for(b"0\r\n\r\n")
    assert dechunk(conn.after_head) == b"hello world"
    conn.transport.write(ok(b"got it"))

    reply = await loopback.run(client.read_response)
    assert (reply.status, reply.body) == (200, b"got it")


@pytest_twisted.ensureDeferred
async def test_content_length_request_body_reaches_the_backend(loopback: Loopback) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)
    body = bytes(range(256)) * 400

    client.sendall(
        b"PUT /blob HTTP/1.1\r\nHost: app.example\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    conn = await backend.connection()
    await conn.wait_for_bytes(len(body))
    assert conn.after_head == body
    assert Head.parse(conn.head).get(b"content-length") == b"%d" % len(body)
    conn.transport.write(ok(b"stored"))
    assert (await loopback.run(client.read_response)).body == b"stored"


@pytest_twisted.ensureDeferred
async def test_chunked_response_is_streamed_to_the_client(loopback: Loopback) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(get(b"/stream"))
    conn = await backend.connection()
    await wait(conn.head_received)
    conn.transport.write(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\n"
    )
    # The chunks sent so far reach the client before the response is complete.
    await loopback.run(client.peek_until, b"pedia")
    conn.transport.write(b"E\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n")

    reply = await loopback.run(client.read_response)
    assert reply.status == 200
    assert reply.body == b"Wikipedia in\r\n\r\nchunks."
    assert reply.get(b"transfer-encoding") == b"chunked"
    # The connection is still usable.
    client.send_once(get(b"/again"))
    await conn.wait_for(b"/again")
    conn.transport.write(ok(b"again"))
    assert (await loopback.run(client.read_response)).body == b"again"


@pytest_twisted.ensureDeferred
async def test_close_delimited_response_reaches_the_client_whole(loopback: Loopback) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(get(b"/legacy"))
    conn = await backend.connection()
    await wait(conn.head_received)
    conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the ")
    await loopback.run(client.peek_until, b"until the ")
    conn.transport.write(b"connection closes")
    conn.transport.loseConnection()

    reply = await loopback.run(client.read_response)
    assert reply.status == 200
    assert reply.body == b"until the connection closes"
    # Either framed for the client (chunked) or close-delimited in turn.
    if reply.get(b"transfer-encoding") is None:
        assert await loopback.run(client.recv_to_eof) == b""


@pytest_twisted.ensureDeferred
async def test_head_response_has_no_body_and_the_connection_stays_in_sync(
    loopback: Loopback,
) -> None:
    def respond(head: Head) -> bytes:
        if head.method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1234\r\n\r\n"
        return ok(b"after head")

    backend = loopback.backend(reply_to_each_head(respond))
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(b"HEAD /big HTTP/1.1\r\nHost: app.example\r\n\r\n")
    reply = await loopback.run(client.read_response, b"HEAD")
    assert reply.status == 200
    assert reply.get(b"content-length") == b"1234"
    assert reply.body == b""
    assert reply.raw.endswith(HEAD_END)

    client.send_once(get(b"/next"))
    reply = await loopback.run(client.read_response)
    assert (reply.status, reply.body) == (200, b"after head")
    assert len(backend.connections) == 1


@pytest_twisted.ensureDeferred
async def test_100_continue_is_relayed_before_the_body_is_sent(loopback: Loopback) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(
        b"POST /data HTTP/1.1\r\nHost: app.example\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    conn = await backend.connection()
    head = Head.parse(await wait(conn.head_received))
    assert head.get(b"expect") == b"100-continue"
    conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    interim = await loopback.run(client.recv_until, HEAD_END)
    assert interim.startswith(b"HTTP/1.1 100 ")
    client.send_once(b"hello")
    await conn.wait_for_bytes(5)
    assert conn.after_head == b"hello"
    conn.transport.write(ok(b"thanks"))
    reply = await loopback.run(client.read_response)
    assert (reply.status, reply.body) == (200, b"thanks")


# -- errors, in words -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_backend_not_listening_gives_502_saying_it_could_not_be_reached(
    loopback: Loopback,
) -> None:
    proxy = loopback.proxy(free_port())
    client = loopback.client(proxy.port)

    client.send_once(get())
    reply = await loopback.run(client.read_response)
    assert reply.status == 502
    assert "could not be reached" in reply.text
    assert await loopback.run(client.recv_to_eof) == b""


@pytest_twisted.ensureDeferred
async def test_backend_that_never_answers_gives_504(loopback: Loopback) -> None:
    backend = loopback.backend()
    settings = ProxySettings(backend=BackendSettings(response_timeout=0.5))
    proxy = loopback.proxy(backend.port_number, settings=settings)
    client = loopback.client(proxy.port)

    client.send_once(get(b"/slow"))
    conn = await backend.connection()
    await wait(conn.head_received)
    reply = await loopback.run(client.read_response)
    assert reply.status == 504
    assert "0.5 seconds" in reply.text
    # The proxy gives up on the backend connection too.
    await wait(conn.closed)
    await eventually(lambda: proxy.factory.proxy.pool.idle_count == 0, what="no pooled connection")


@pytest_twisted.ensureDeferred
async def test_upgrade_that_is_never_answered_gives_504(loopback: Loopback) -> None:
    backend = loopback.backend()
    settings = ProxySettings(backend=BackendSettings(response_timeout=0.5))
    proxy = loopback.proxy(backend.port_number, settings=settings)
    client = loopback.client(proxy.port)

    client.send_once(upgrade_request(b"websocket") + b"early")
    conn = await backend.connection()
    await wait(conn.head_received)
    reply = await loopback.run(client.read_response)
    assert reply.status == 504
    await wait(conn.closed)
    assert conn.after_head == b""


@pytest.mark.parametrize("size", [40_000, 1_000_000], ids=["40k", "still-sending-1M"])
@pytest_twisted.ensureDeferred
async def test_request_head_too_large_gives_431(loopback: Loopback, size: int) -> None:
    """Also when the client is still sending: the 431 must not be lost to a reset."""
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    await loopback.run(client.sendall, get(b"/", b"X-Big: " + b"a" * size))
    reply = await loopback.run(client.read_response)
    assert reply.status == 431
    assert await loopback.run(client.recv_to_eof) == b""
    await sleep(0.05)
    assert backend.connections == []


@pytest_twisted.ensureDeferred
async def test_content_length_with_transfer_encoding_gives_400_and_reaches_no_backend(
    loopback: Loopback,
) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(
        b"POST / HTTP/1.1\r\nHost: app.example\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    reply = await loopback.run(client.read_response)
    assert reply.status == 400
    assert "Content-Length" in reply.text and "Transfer-Encoding" in reply.text
    assert await loopback.run(client.recv_to_eof) == b""
    await sleep(0.05)
    assert backend.connections == []


@pytest_twisted.ensureDeferred
async def test_refused_101_does_not_leak_the_backend_connection(loopback: Loopback) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)

    first = loopback.client(proxy.port)
    request = upgrade_request(b"websocket")
    first.send_once(request)
    refused = await backend.connection(0)
    await wait(refused.head_received)
    refused.transport.write(switching_response(request, connection=None))
    assert (await loopback.run(first.read_response)).status == 502
    # The backend connection that answered wrongly is closed, not pooled.
    await wait(refused.eof)
    await wait(refused.closed)
    assert proxy.factory.proxy.pool.idle_count == 0

    second = loopback.client(proxy.port)
    second.send_once(get(b"/after"))
    fresh = await backend.connection(1)
    await wait(fresh.head_received)
    fresh.transport.write(ok(b"fresh"))
    assert (await loopback.run(second.read_response)).body == b"fresh"
    assert refused.after_head == b"", "the next request went to the refused connection"
    assert len(backend.connections) == 2


# -- what the proxy changes in heads --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_fields_removed_and_forwarding_fields_added(loopback: Loopback) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(
        b"GET /path?q=1 HTTP/1.1\r\n"
        b"Host: app.example\r\n"
        b"Connection: keep-alive, X-Hop\r\n"
        b"X-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: spoofed.example\r\n"
        b"Via: 1.0 edge\r\n"
        b"X-End-To-End: kept\r\n"
        b"\r\n"
    )
    conn = await backend.connection()
    received = Head.parse(await wait(conn.head_received))
    assert received.start_line == b"GET /path?q=1 HTTP/1.1"
    for name in (b"x-hop", b"keep-alive", b"te", b"proxy-connection", b"upgrade"):
        assert not received.has(name), f"{name!r} reached the backend: {received.raw!r}"
    assert b"x-hop" not in received.tokens(b"connection")
    assert received.get(b"host") == b"app.example"
    assert received.get(b"x-end-to-end") == b"kept"
    assert received.get_all(b"x-forwarded-for") == [b"203.0.113.9, 127.0.0.1"]
    assert received.get_all(b"x-forwarded-proto") == [b"http"]
    assert received.get_all(b"x-forwarded-host") == [b"app.example"]
    assert received.get_all(b"via") == [b"1.0 edge, 1.1 upgradeproxy"]

    conn.transport.write(
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Resp-Hop\r\n"
        b"X-Resp-Hop: 1\r\n"
        b"Keep-Alive: timeout=30\r\n"
        b"Via: 1.1 app\r\n"
        b"Content-Length: 2\r\n"
        b"\r\nok"
    )
    reply = await loopback.run(client.read_response)
    assert reply.body == b"ok"
    assert reply.get(b"x-resp-hop") is None
    assert reply.get(b"keep-alive") is None
    assert reply.get_all(b"via") == [b"1.1 app, 1.1 upgradeproxy"]


@pytest_twisted.ensureDeferred
async def test_upgrade_request_reaches_the_backend_as_an_upgrade(loopback: Loopback) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number)
    client = loopback.client(proxy.port)

    client.send_once(
        upgrade_request(
            b"proxmox-backup-protocol-v1",
            extra=b"Keep-Alive: timeout=5\r\nX-Forwarded-For: 203.0.113.9\r\n",
        )
    )
    conn = await backend.connection()
    received = Head.parse(await wait(conn.head_received))
    assert received.tokens(b"connection") == [b"upgrade"]
    assert received.get_all(b"upgrade") == [b"proxmox-backup-protocol-v1"]
    assert not received.has(b"keep-alive")
    assert received.get_all(b"x-forwarded-for") == [b"203.0.113.9, 127.0.0.1"]
    assert received.get_all(b"via") == [b"1.1 upgradeproxy"]
