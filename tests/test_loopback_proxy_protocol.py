"""The PROXY protocol over real loopback sockets: a header split across packets, a
tunnel that is spliced and half-closes behind it, and the header sent to a backend."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import pytest_twisted
from e2e_support import ServerCertificate
from loopback import (
    HOST,
    TIMEOUT,
    Loopback,
    LoopbackBackendConnection,
    echo_app,
    eventually,
    free_port,
    switching_response,
    upgrade_request,
)
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint

from upgradeproxy import BackendSettings, ProxyFactory
from upgradeproxy.cli.service import Listener, ProxyService
from upgradeproxy.core._proxyheader import encode, parse
from upgradeproxy.core._splice import AVAILABLE as SPLICE
from upgradeproxy.core.address import BackendAddress
from upgradeproxy.core.balancer import BackendGroup, Policy
from upgradeproxy.core.proxyprotocol import ProxyProtocolFactory, parse_network
from upgradeproxy.core.routing import Route
from upgradeproxy.validators import RFC9110Validator, WebSocketValidator

pytestmark = pytest.mark.loopback

FRAME = b"\x81\x05hello"


@pytest_twisted.ensureDeferred
async def test_a_split_header_then_a_spliced_tunnel_that_half_closes(loopback: Loopback) -> None:
    backend = loopback.backend(echo_app)
    backend.on_eof = lambda conn: None  # keep its side open: a half-close
    proxy = ProxyFactory(TCP4ClientEndpoint(reactor, HOST, backend.port_number))
    listening = loopback.listen(proxy, ProxyProtocolFactory(proxy, [parse_network(HOST)]))
    client = loopback.client(listening.port)
    header = b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\r\n"
    client.send_once(header[:9])
    await eventually(lambda: len(proxy.proxy.connections) == 0, what="nothing yet")
    client.send_once(header[9:] + upgrade_request() + FRAME)
    head = await loopback.run(client.recv_head)
    assert head.status == 101
    assert await loopback.run(client.recv_exactly, len(FRAME)) == FRAME
    tunnel = next(iter(proxy.proxy.tunnels))
    assert tunnel.stats.client == "198.51.100.7"
    assert tunnel.spliced == SPLICE
    connection = backend.connections[0]
    assert b"X-Forwarded-For: 198.51.100.7\r\n" in connection.received
    client.shutdown_write()
    await connection.eof
    assert connection.half_closed, "the client's EOF reached the backend as a half-close"
    assert connection.transport is not None
    connection.transport.write(b"after")
    assert await loopback.run(client.recv_exactly, 5) == b"after"


def behind_a_header(conn: LoopbackBackendConnection, data: bytes) -> None:
    """A script: a WebSocket echo that reads (and keeps) a v2 PROXY header first."""
    assert conn.transport is not None
    if conn.state.get("tunnel"):
        conn.transport.write(data)
        return
    header = parse(bytes(conn.received))
    if header is None:
        return
    # The v2 signature itself starts with CRLF CRLF.
    end = conn.received.find(b"\r\n\r\n", header.length)
    if end < 0:
        return
    conn.state["tunnel"] = True
    head = bytes(conn.received[header.length : end + 4])
    conn.transport.write(switching_response(head) + bytes(conn.received[end + 4 :]))


@pytest_twisted.ensureDeferred
async def test_the_backend_receives_the_header_then_the_request(loopback: Loopback) -> None:
    backend = loopback.backend(behind_a_header)
    group = BackendGroup(
        [BackendAddress(TCP4ClientEndpoint(reactor, HOST, backend.port_number), b"", "echo")],
        policy=Policy.LEAST_CONN, clock=reactor, settings=BackendSettings(), send_proxy="v2",
    )  # fmt: skip
    route = Route("r", group, (RFC9110Validator(), WebSocketValidator()))
    proxy = ProxyFactory(routes=[route])
    listening = loopback.listen(proxy)
    client = loopback.client(listening.port)
    client.send_once(upgrade_request() + FRAME)
    assert (await loopback.run(client.recv_head)).status == 101
    assert await loopback.run(client.recv_exactly, len(FRAME)) == FRAME
    host, port = client.sock.getsockname()
    expected = encode(
        "v2", IPv4Address("TCP", host, port), IPv4Address("TCP", HOST, listening.port)
    )
    received = bytes(backend.connections[0].received)
    assert received.startswith(expected + b"GET /socket HTTP/1.1\r\n")
    assert received.endswith(b"\r\n\r\n" + FRAME)
    assert received.count(expected) == 1


def _tls_get_after_a_header(port: int, ca: str, header: bytes) -> bytes:
    """Send ``header`` in the clear, then GET over TLS with ALPN, as behind a TCP balancer.

    The client offers only ``http/1.1``: this proxy would choose ``h2`` first.
    """
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as raw:
        raw.sendall(header)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            tls.sendall(b"GET /page HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data


@pytest_twisted.ensureDeferred
async def test_an_ssl_listener_reads_the_header_before_the_tls_handshake(
    loopback: Loopback, tmp_path: Path
) -> None:
    backend = loopback.backend(echo_app)
    certificate = ServerCertificate(tmp_path / "tls")
    proxy = ProxyFactory(TCP4ClientEndpoint(reactor, HOST, backend.port_number))
    listen = certificate.listen_description(free_port())
    trusted = [parse_network(HOST)]
    service = ProxyService(
        proxy, [Listener(listen, proxy_protocol=True)], reactor=reactor, grace=0,
        behind=lambda inner: ProxyProtocolFactory(inner, trusted),
    )  # fmt: skip
    service.startService()
    try:
        port = int(listen.split(":")[1])
        header = b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\r\n"
        answer = await loopback.run(_tls_get_after_a_header, port, str(certificate.ca), header)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"you asked for /page")
        received = bytes(backend.connections[0].received)
        assert b"X-Forwarded-For: 198.51.100.7\r\n" in received
        assert b"X-Forwarded-Proto: https\r\n" in received
    finally:
        await service.stopService()
