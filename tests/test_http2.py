"""The HTTP/2 front door, in memory: the h2 library as the client, scripted HTTP/1.1 backends."""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2_support import H2Client, h2_cluster, request, websocket
from support import OK, SWITCH

from upgradeproxy import rfc6455


def test_a_get_over_prior_knowledge_reaches_the_backend_as_http_1_1() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request(b"/page?q=1", b"GET", b"app.example", (b"accept", b"*/*")))
    assert cluster.last("a").received == (
        b"GET /page?q=1 HTTP/1.1\r\nhost: app.example\r\naccept: */*\r\n"
        b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: app.example\r\nVia: 1.1 upgradeproxy\r\n\r\n"
    )
    cluster.last("a").send(OK)
    client.pump()
    response = client.response(stream)
    assert (response.status, response.body, response.ended) == (200, b"hello", True)
    assert response.headers[b"content-length"] == b"5"


def test_an_extended_connect_becomes_a_websocket_upgrade_checked_against_the_proxy_s_key() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(websocket(b"/chat", (b"sec-websocket-protocol", b"chat")), end=False)
    received = cluster.last("a").received
    head = dict(line.split(b": ", 1) for line in received.split(b"\r\n\r\n")[0].split(b"\r\n")[1:])
    assert received.startswith(b"GET /chat HTTP/1.1\r\n")
    assert (head[b"Upgrade"], head[b"Connection"]) == (b"websocket", b"upgrade")
    assert head[b"sec-websocket-version"] == b"13"
    assert head[b"sec-websocket-protocol"] == b"chat"
    key = head[b"sec-websocket-key"]
    assert rfc6455.is_valid_key(key)
    cluster.last("a").send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + rfc6455.accept_for(key) + b"\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n\r\nearly"
    )
    client.pump()
    response = client.response(stream)
    assert response.status == 200
    assert response.headers[b"sec-websocket-protocol"] == b"chat"
    assert b"sec-websocket-accept" not in response.headers
    assert response.body == b"early"
    client.send(stream, b"frame")
    assert cluster.last("a").received.endswith(b"\r\n\r\nframe")


def test_a_backend_answering_the_wrong_accept_gets_a_502_on_the_stream() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(websocket(), end=False)
    cluster.last("a").send(SWITCH)  # the RFC's sample accept, not for the proxy's key
    client.pump()
    response = client.response(stream)
    assert response.status == 502
    assert b"Sec-WebSocket-Accept" in response.body
    assert response.reset == ErrorCodes.NO_ERROR
    assert cluster.last("a").closed
