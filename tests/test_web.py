"""ProxyResource: the proxy mounted under a path of a twisted.web site."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import pytest_twisted
from support import KEY, MountedProxy
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from upgradeproxy import BackendAddress, BackendSettings, Refusal, rfc6455
from upgradeproxy.demo import ECHO_PROTOCOL, DemoBackendFactory
from upgradeproxy.testing import ScriptedBackendEndpoint
from upgradeproxy.web import ProxyResource

HANDSHAKE = (
    b"GET /app/chat?room=1 HTTP/1.1\r\nHost: site.example\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY + b"\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + rfc6455.accept_for(KEY) + b"\r\n\r\n"
)


def test_a_frame_in_the_same_packet_as_the_handshake_reaches_the_backend() -> None:
    m = MountedProxy()
    m.send(HANDSHAKE + b"\x81\x85first")
    assert m.backend.received.startswith(b"GET /chat?room=1 HTTP/1.1\r\n")
    assert b"first" not in m.backend.received
    m.backend.send(SWITCH + b"from-backend")
    client = m.transport.value()
    assert client.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert client.endswith(b"\r\n\r\nfrom-backend")
    assert m.backend.received.endswith(b"\r\n\r\n\x81\x85first")
    m.send(b"more")
    assert m.backend.received.endswith(b"firstmore")
    assert m.transport.producer is m.backend.transport


def test_bytes_sent_while_the_backend_answers_are_replayed() -> None:
    m = MountedProxy()
    m.send(HANDSHAKE)
    m.send(b"early-1,")
    m.send(b"early-2")
    m.backend.send(SWITCH)
    assert m.backend.received.endswith(b"\r\n\r\nearly-1,early-2")


def test_plain_requests_are_proxied_with_the_mount_path_removed() -> None:
    m = MountedProxy()
    m.send(b"POST /app/items/1?x=y HTTP/1.1\r\nHost: site.example\r\nContent-Length: 4\r\n\r\nbody")
    sent = m.backend.received
    assert sent.startswith(b"POST /items/1?x=y HTTP/1.1\r\n")
    assert sent.endswith(b"Content-Length: 4\r\n") is False and sent.endswith(b"\r\n\r\nbody")
    assert b"X-Forwarded-For: 192.0.2.9\r\n" in sent
    m.backend.send(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-App: 1\r\n\r\nok")
    client = m.transport.value()
    assert client.startswith(b"HTTP/1.1 201 Created\r\n")
    assert b"X-App: 1\r\n" in client and b"Via: 1.1 upgradeproxy\r\n" in client
    assert client.endswith(b"\r\n\r\nok")


def test_a_refused_101_gets_502_with_the_reason() -> None:
    m = MountedProxy()
    m.send(HANDSHAKE + b"frame")
    m.backend.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    client = m.transport.value()
    assert client.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"without 'Connection: upgrade' (RFC 9110" in client
    assert m.backend.closed


def test_a_validator_refusing_the_request_keeps_the_backend_out() -> None:
    from zope.interface import implementer

    from upgradeproxy import IUpgradeValidator

    @implementer(IUpgradeValidator)
    class NoChat:
        name = "no-chat"

        def check_request(self, attempt):  # type: ignore[no-untyped-def]
            return Refusal("no chat here", 403)

        def check_response(self, attempt):  # type: ignore[no-untyped-def]
            return None

    m = MountedProxy([NoChat()])
    m.send(HANDSHAKE)
    assert m.transport.value().startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"no chat here" in m.transport.value()
    assert m.endpoint.connections == []


# -- over loopback, with the demo backend ---------------------------------------------------


def _masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


def _one_send_then_read(port: int, data: bytes, until: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        received = b""
        while until not in received:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_over_loopback_a_frame_sent_with_the_handshake_is_echoed() -> None:
    backend_port = reactor.listenTCP(0, DemoBackendFactory(), interface="127.0.0.1")
    root = Resource()
    backend = TCP4ClientEndpoint(reactor, "127.0.0.1", backend_port.getHost().port)
    root.putChild(b"app", ProxyResource(backend))
    site_port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        port = site_port.getHost().port
        handshake = (
            b"GET /app/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY + b"\r\n\r\n"
        )
        received = await deferToThread(
            _one_send_then_read, port, handshake + _masked_text_frame(b"first"), b"first"
        )
        assert received.startswith(b"HTTP/1.1 101 ")
        assert received.endswith(b"\r\n\r\n\x81\x05first")

        raw = (
            b"GET /app/echo HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: "
            + ECHO_PROTOCOL.encode()
            + b"\r\n\r\nraw-bytes"
        )
        received = await deferToThread(_one_send_then_read, port, raw, b"raw-bytes")
        assert received.startswith(b"HTTP/1.1 101 ") and received.endswith(b"raw-bytes")
    finally:
        await site_port.stopListening()
        await backend_port.stopListening()


# -- the resource runs its proxy as the listening door does ------------------------------


def test_the_resource_starts_its_proxy_so_health_checks_run_and_stops_it_at_shutdown() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from upgradeproxy.core.balancer import BackendGroup, HealthCheck, Policy
    from upgradeproxy.core.routing import Route

    clock = MemoryReactorClock()
    endpoint = ScriptedBackendEndpoint()
    group = BackendGroup(
        [BackendAddress(endpoint, b"", "checked")],
        policy=Policy.LEAST_CONN,
        clock=clock,
        health=HealthCheck(path="/healthz", interval=5.0),
        settings=BackendSettings(),
        route="app",
    )
    resource = ProxyResource(routes=[Route("app", group, ())], clock=clock)
    assert resource.proxy.running
    assert endpoint.attempts == 1, "the first health check runs at once"
    endpoint.connections[-1].send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    clock.advance(5.0)
    assert endpoint.attempts == 2
    ((stop, args, kwargs),) = clock.triggers["before"]["shutdown"]
    stop(*args, **kwargs)  # what the reactor does when it stops
    assert not resource.proxy.running
    clock.advance(50.0)
    assert endpoint.attempts == 2, "no health check after the reactor stopped"
