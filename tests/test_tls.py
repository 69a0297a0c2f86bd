"""TLS on both sides of the proxy, over real loopback sockets.

The client side: the proxy listens on a Twisted ``ssl:`` server endpoint, set
up as ``--listen`` sets it up; clients with and without ALPN, and handshakes
that fail, each logged once per address and interval.
The backend side: an ``https://`` backend from :func:`upgradeproxy.parse_backend`,
its certificate checked against a CA bundle, the system's trust store, or
nothing at all. Certificates come from ``trustme``; the TLS client is
Python's ``ssl`` module, driven in a thread like :class:`loopback.Client`.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.events
import pytest
import pytest_twisted
import trustme
from e2e_support import ssl_listen_description
from h2.config import H2Configuration
from h2.connection import H2Connection
from loopback import (
    HOST,
    TIMEOUT,
    BackendServer,
    Client,
    Head,
    Loopback,
    LoopbackBackendConnection,
    Proxy,
    Response,
    echo_app,
    eventually,
    free_port,
    upgrade_request,
    wait,
)
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from upgradeproxy import BackendAddress, ProxyFactory, ProxySettings, parse_backend
from upgradeproxy.cli.service import ProxyService, build_factory
from upgradeproxy.cli.tap import Options
from upgradeproxy.core.address import describe_tls_failure
from upgradeproxy.core.tls import HandshakeFailures, NoApplicationProtocol, choose_protocols_on

pytestmark = [
    pytest.mark.loopback,
    # Twisted's ssl: server endpoint still hands pyOpenSSL objects to OpenSSL.
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning"),
    # A client that offers only TLS 1.0 and 1.1, on purpose.
    pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning"),
]

PAYLOAD = bytes(range(256)) * 4
GET = b"GET /hello HTTP/1.1\r\nHost: app.example\r\n\r\n"


# -- certificates and listeners ------------------------------------------------------


@dataclass(frozen=True)
class Pems:
    """A server certificate and its key, as files, and the CA that issued it."""

    ca: Path
    cert: Path
    key: Path


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def issue(ca: trustme.CA, directory: Path, *names: str) -> Pems:
    """Write the CA and a certificate for ``names`` into ``directory``."""
    directory.mkdir(exist_ok=True)
    pems = Pems(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    issued = ca.issue_cert(*names)
    ca.cert_pem.write_to_path(str(pems.ca))
    issued.private_key_pem.write_to_path(str(pems.key))
    issued.cert_chain_pems[0].write_to_path(str(pems.cert))
    return pems


@pytest.fixture
def pems(ca: trustme.CA, tmp_path: Path) -> Pems:
    """A certificate for ``localhost`` and ``127.0.0.1``."""
    return issue(ca, tmp_path / "localhost", "localhost", HOST)


@pytest_twisted.async_yield_fixture
async def ports(loopback: Loopback) -> AsyncIterator[list[IListeningPort]]:
    """Listeners this test opened itself; closed before ``loopback`` closes the rest."""
    opened: list[IListeningPort] = []
    yield opened
    await DeferredList([maybeDeferred(p.stopListening) for p in opened]).addTimeout(
        TIMEOUT, reactor
    )


def ssl_listen(pems: Pems, port: int = 0) -> str:
    """An ``ssl:`` server endpoint on 127.0.0.1 with ``pems``' certificate."""
    return ssl_listen_description(pems.key, pems.cert, port)


async def listen(ports: list[IListeningPort], factory: Factory, pems: Pems | None) -> int:
    """Listen on 127.0.0.1 with TLS (``ssl:``) when ``pems`` is given, else plain TCP."""
    description = f"tcp:0:interface={HOST}" if pems is None else ssl_listen(pems)
    endpoint = serverFromString(reactor, description)
    choose_protocols_on(endpoint)
    port = await endpoint.listen(factory)
    ports.append(port)
    return int(port.getHost().port)


def echo_app_noting_sni(conn: LoopbackBackendConnection, data: bytes) -> None:
    """:func:`echo_app`, noting in ``conn.state["sni"]`` the server name the client sent."""
    assert conn.transport is not None
    tls = conn.transport.getHandle()  # type: ignore[attr-defined]  # an OpenSSL connection
    conn.state.setdefault("sni", tls.get_servername())
    echo_app(conn, data)


async def tls_backend(loopback: Loopback, ports: list[IListeningPort], pems: Pems) -> BackendServer:
    """A scripted :func:`echo_app` backend that speaks TLS with ``pems``' certificate."""
    server = BackendServer(echo_app_noting_sni)
    await listen(ports, server, pems)
    server.port = ports[-1]
    loopback.backends.append(server)  # its connections are closed with the test's
    return server


async def proxy_to(
    loopback: Loopback,
    ports: list[IListeningPort],
    backend: BackendAddress | IStreamClientEndpoint,
    pems: Pems | None = None,
    *,
    http2: bool = True,
) -> Proxy:
    """A proxy to ``backend``, listening with TLS when ``pems`` is given."""
    factory = ProxyFactory(backend, settings=ProxySettings(splice=True, http2=http2))
    proxy = Proxy(factory, await listen(ports, factory, pems))
    loopback.proxies.append(proxy)
    return proxy


def plain_backend(server: BackendServer) -> IStreamClientEndpoint:
    return TCP4ClientEndpoint(reactor, HOST, server.port_number)


def https(
    port: int, host: str = "localhost", *, tls_ca: Path | None = None, tls_verify: bool = True
) -> BackendAddress:
    """The backend ``https://host:port/app``."""
    return parse_backend(
        reactor,
        f"https://{host}:{port}/app",
        tls_ca=None if tls_ca is None else str(tls_ca),
        tls_verify=tls_verify,
    )


# -- the TLS client ------------------------------------------------------------------------


class TlsClient(Client):
    """:class:`loopback.Client` over TLS, trusting ``ca``. Create and use it in a thread.

    With ``alpn``, it offers those application protocols, as curl and browsers do.
    """

    def __init__(self, port: int, ca: trustme.CA | None, alpn: list[str] | None = None) -> None:
        super().__init__(port)
        context = ssl.create_default_context()
        if ca is not None:
            ca.configure_trust(context)
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        except BaseException:
            self.sock.close()
            raise


async def tls_client(
    loopback: Loopback, port: int, ca: trustme.CA, alpn: list[str] | None = None
) -> TlsClient:
    client = await loopback.run(TlsClient, port, ca, alpn)
    loopback.clients.append(client)
    return client


async def get(loopback: Loopback, client: Client) -> Response:
    await loopback.run(client.sendall, GET)
    return await loopback.run(client.read_response)


async def check_tunnel(
    loopback: Loopback, proxy: Proxy, client: Client, server: BackendServer
) -> LoopbackBackendConnection:
    """Upgrade (with early bytes), then check bytes both ways and the Python relay.

    ``server`` echoes; returns its connection, with the tunnel still open.
    """
    await loopback.run(client.sendall, upgrade_request() + PAYLOAD)
    head = await loopback.run(client.recv_head)
    assert head.status == 101, head.raw
    assert await loopback.run(client.recv_exactly, len(PAYLOAD)) == PAYLOAD
    tunnels = list(proxy.factory.proxy.tunnels)
    assert len(tunnels) == 1
    assert not tunnels[0].spliced, "a TLS tunnel must use the Python relay"
    await loopback.run(client.sendall, b"second" + PAYLOAD)
    assert await loopback.run(client.recv_exactly, len(PAYLOAD) + 6) == b"second" + PAYLOAD
    conn = server.connections[-1]
    assert conn.after_head == PAYLOAD + b"second" + PAYLOAD
    return conn


# -- the proxy listening with TLS ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_through_a_tls_listener(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems, ca: trustme.CA
) -> None:
    backend = loopback.backend(echo_app)
    proxy = await proxy_to(loopback, ports, plain_backend(backend), pems)
    client = await tls_client(loopback, proxy.port, ca)

    reply = await get(loopback, client)
    assert (reply.status, reply.body) == (200, b"you asked for /hello")


@pytest_twisted.ensureDeferred
async def test_a_tls_listener_forwards_x_forwarded_proto_https(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems, ca: trustme.CA
) -> None:
    backend = loopback.backend(echo_app)
    proxy = await proxy_to(loopback, ports, plain_backend(backend), pems)
    client = await tls_client(loopback, proxy.port, ca)

    assert (await get(loopback, client)).status == 200
    conn = await backend.connection()
    assert Head.parse(await wait(conn.head_received)).get(b"X-Forwarded-Proto") == b"https"


@pytest_twisted.ensureDeferred
async def test_upgrade_through_a_tls_listener_relays_exact_bytes_in_python(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems, ca: trustme.CA
) -> None:
    backend = loopback.backend(echo_app)
    proxy = await proxy_to(loopback, ports, plain_backend(backend), pems)
    client = await tls_client(loopback, proxy.port, ca)

    await check_tunnel(loopback, proxy, client, backend)


@pytest_twisted.ensureDeferred
async def test_with_http2_off_a_client_offering_h2_and_http_1_1_over_alpn_gets_http_1_1(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems, ca: trustme.CA
) -> None:
    backend = loopback.backend(echo_app)
    proxy = await proxy_to(loopback, ports, plain_backend(backend), pems, http2=False)
    client = await tls_client(loopback, proxy.port, ca, ["h2", "http/1.1"])

    assert client.sock.selected_alpn_protocol() == "http/1.1"  # type: ignore[attr-defined]
    reply = await get(loopback, client)
    assert (reply.status, reply.body) == (200, b"you asked for /hello")
    await check_tunnel(loopback, proxy, client, backend)


def h2_get(sock: ssl.SSLSocket, path: str) -> tuple[int, bytes]:
    """One GET over HTTP/2 on ``sock`` (blocking, in a thread): its status and body."""
    connection = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    connection.initiate_connection()
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"),
               (":path", path)]  # fmt: skip
    connection.send_headers(1, headers, end_stream=True)
    sock.sendall(connection.data_to_send())
    status, body = 0, b""
    while True:
        data = sock.recv(65536)
        assert data, "the proxy closed the connection"
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                connection.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, h2.events.StreamEnded):
                return status, body
        sock.sendall(connection.data_to_send())


def h2_websocket_echo(sock: ssl.SSLSocket, payload: bytes) -> tuple[int, bytes]:
    """An RFC 8441 WebSocket over HTTP/2 on ``sock`` (blocking): its status, and the echo."""
    connection = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    connection.initiate_connection()
    sock.sendall(connection.data_to_send())
    headers = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
               (":authority", "localhost"), (":path", "/chat"),
               ("sec-websocket-version", "13")]  # fmt: skip
    status, echoed, sent = 0, b"", False
    while len(echoed) < len(payload):
        if not sent and connection.remote_settings.enable_connect_protocol:
            connection.send_headers(1, headers)
            sent = True
        sock.sendall(connection.data_to_send())
        data = sock.recv(65536)
        assert data, "the proxy closed the connection"
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
                connection.send_data(1, payload)
            elif isinstance(event, h2.events.DataReceived):
                echoed += event.data
                connection.acknowledge_received_data(event.flow_controlled_length, 1)
    return status, echoed


@pytest_twisted.ensureDeferred
async def test_a_websocket_over_http2_is_tunnelled_to_the_backend_over_tls(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems, ca: trustme.CA
) -> None:
    backend = loopback.backend(echo_app)
    proxy = await proxy_to(loopback, ports, plain_backend(backend), pems)
    client = await tls_client(loopback, proxy.port, ca, ["h2"])
    status, echoed = await loopback.run(h2_websocket_echo, client.sock, b"frame" * 1000)
    assert (status, echoed) == (200, b"frame" * 1000)
    [tunnel] = proxy.factory.proxy.snapshot()["tunnels"]
    assert (tunnel["protocol"], tunnel["client_protocol"]) == ("websocket", "HTTP/2")
    head = backend.connections[-1].head
    assert head is not None and head.startswith(b"GET /chat HTTP/1.1\r\n")
    assert b"\r\nsec-websocket-key: " in head


@pytest_twisted.ensureDeferred
async def test_a_client_offering_h2_and_http_1_1_over_alpn_gets_h2_and_is_served_over_it(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems, ca: trustme.CA
) -> None:
    backend = loopback.backend(echo_app)
    proxy = await proxy_to(loopback, ports, plain_backend(backend), pems)
    client = await tls_client(loopback, proxy.port, ca, ["h2", "http/1.1"])

    assert client.sock.selected_alpn_protocol() == "h2"  # type: ignore[attr-defined]
    assert await loopback.run(h2_get, client.sock, "/hello") == (200, b"you asked for /hello")
    [connection] = proxy.factory.proxy.connections
    assert type(connection).__name__ == "HTTP2Connection"


def handshake_lines(events: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if "TLS handshake with client" in formatEvent(e)]


def connect_and_fail(port: int, ca: trustme.CA | None, alpn: list[str] | None) -> str:
    """Connect with TLS where the handshake must fail; what the client was told."""
    with pytest.raises(ssl.SSLError) as raised:
        TlsClient(port, ca, alpn)
    return str(raised.value)


def send_plain_http(port: int) -> bytes:
    """Send a plain HTTP request to a TLS port; what came back before the close."""
    return send_bytes(port, GET)


def send_bytes(port: int, data: bytes) -> bytes:
    """Send ``data`` to a port and read until it closes."""
    client = Client(port)
    try:
        client.sendall(data)
        return client.recv_to_eof()
    finally:
        client.sock.close()


def connect_with_tls_1_1(port: int) -> str:
    """Offer only TLS 1.0 and 1.1 (which Twisted's defaults refuse); what the client was told."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # or OpenSSL 3 will not even offer them
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with (
        socket.create_connection((HOST, port), timeout=TIMEOUT) as sock,
        pytest.raises(ssl.SSLError) as raised,
    ):
        context.wrap_socket(sock)
    return str(raised.value)


@pytest_twisted.ensureDeferred
async def test_with_http2_off_a_client_offering_only_h2_is_refused_with_no_application_protocol(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems, ca: trustme.CA
) -> None:
    backend = loopback.backend(echo_app)
    proxy = await proxy_to(loopback, ports, plain_backend(backend), pems, http2=False)

    with capturedLogs() as events:
        told = await loopback.run(connect_and_fail, proxy.port, ca, ["h2", "foo"])
        await eventually(lambda: bool(handshake_lines(events)), what="the handshake's log line")
    assert "alert no application protocol" in told, told
    assert handshake_lines(events) == [
        f"TLS handshake with client {HOST} failed: it offered only h2, foo over ALPN, and "
        "this proxy speaks http/1.1 (alert no_application_protocol sent)"
    ]
    assert [e["log_level"] for e in events if handshake_lines([e])] == [LogLevel.info]
    assert backend.connections == []
    await eventually(lambda: not proxy.factory.proxy.connections, what="the connection to end")


@pytest_twisted.ensureDeferred
async def test_listen_endpoints_of_the_service_choose_h2_then_http_1_1_and_refuse_others(
    loopback: Loopback, pems: Pems, ca: trustme.CA
) -> None:
    """``--listen ssl:...`` as twistd runs it: through :class:`ProxyService`."""
    backend = loopback.backend(echo_app)
    factory = ProxyFactory(plain_backend(backend))
    port = free_port()
    service = ProxyService(factory, [ssl_listen(pems, port)], reactor=reactor, grace=0)
    service.startService()
    try:
        loopback.proxies.append(Proxy(factory, port))
        client = await tls_client(loopback, port, ca, ["http/1.1"])
        assert client.sock.selected_alpn_protocol() == "http/1.1"  # type: ignore[attr-defined]
        reply = await get(loopback, client)
        assert (reply.status, reply.body) == (200, b"you asked for /hello")
        client = await tls_client(loopback, port, ca, ["h2", "http/1.1"])
        assert client.sock.selected_alpn_protocol() == "h2"  # type: ignore[attr-defined]
        status, body = await loopback.run(h2_get, client.sock, "/hello")
        assert (status, body) == (200, b"you asked for /hello")

        told = await loopback.run(connect_and_fail, port, ca, ["spdy/3"])
        assert "alert no application protocol" in told, told
    finally:
        await service.stopService()


FAILED_HANDSHAKES = {
    # The client trusts only the system's CAs.
    "unknown-ca": (
        lambda port: connect_and_fail(port, None, None),
        "the client refused the handshake (tlsv1 alert unknown ca)",
    ),
    "old-tls-version": (
        connect_with_tls_1_1,
        "it offered only TLS versions this proxy does not accept (unsupported protocol)",
    ),
    "plain-http": (
        send_plain_http,
        "it sent plain HTTP to a TLS port: it should use https://",
    ),
    "not-tls": (
        lambda port: send_bytes(port, b"SSH-2.0-OpenSSH_9.6\r\n"),
        "it did not start a TLS handshake (wrong version number)",
    ),
}


@pytest.mark.parametrize("case", FAILED_HANDSHAKES)
@pytest_twisted.ensureDeferred
async def test_every_failed_client_handshake_is_logged(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems, case: str
) -> None:
    client, logged = FAILED_HANDSHAKES[case]
    backend = loopback.backend(echo_app)
    proxy = await proxy_to(loopback, ports, plain_backend(backend), pems)

    with capturedLogs() as events:
        await loopback.run(client, proxy.port)
        await eventually(lambda: bool(handshake_lines(events)), what="the handshake's log line")
    assert handshake_lines(events) == [f"TLS handshake with client {HOST} failed: {logged}"]
    assert [e["log_level"] for e in events if handshake_lines([e])] == [LogLevel.info]


# -- the handshake failure log's rate limit ----------------------------------------------------


def tls_failure(reason: str = "tlsv1 alert unknown ca") -> Failure:
    from OpenSSL import SSL

    return Failure(SSL.Error([("SSL routines", "", reason)]))


def test_failed_handshakes_are_logged_once_per_address_and_interval() -> None:
    clock = task.Clock()
    failures = HandshakeFailures(clock, interval=60)
    with capturedLogs() as events:
        failures.failed("192.0.2.1", tls_failure())
        clock.advance(30)
        failures.failed("192.0.2.1", tls_failure())
        failures.failed("192.0.2.1", tls_failure())
        failures.failed("192.0.2.2", tls_failure())
        clock.advance(31)
        failures.failed("192.0.2.1", tls_failure())

    assert handshake_lines(events) == [
        "TLS handshake with client 192.0.2.1 failed: the client refused the handshake "
        "(tlsv1 alert unknown ca)",
        "TLS handshake with client 192.0.2.2 failed: the client refused the handshake "
        "(tlsv1 alert unknown ca)",
        "TLS handshake with client 192.0.2.1 failed: the client refused the handshake "
        "(tlsv1 alert unknown ca); 2 more from this address not logged",
    ]


def test_the_failed_handshake_log_remembers_a_bounded_number_of_addresses() -> None:
    clock = task.Clock()
    failures = HandshakeFailures(clock, interval=60, addresses=2)
    with capturedLogs() as events:
        for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"):
            failures.failed(address, tls_failure())
        assert len(handshake_lines(events)) == 2  # no room for .3 and .4 yet
        clock.advance(60)
        failures.failed("192.0.2.5", tls_failure())

    assert len(failures._windows) == 2
    assert handshake_lines(events)[-1].endswith(
        "(tlsv1 alert unknown ca); 2 from other addresses not logged"
    )


def test_a_client_that_leaves_before_any_handshake_is_not_a_tls_failure() -> None:
    failures = HandshakeFailures(task.Clock())
    with capturedLogs() as events:
        failures.failed("192.0.2.1", Failure(ConnectionDone()))
    assert handshake_lines(events) == []


def test_what_a_client_offers_is_logged_bounded_in_length() -> None:
    failures = HandshakeFailures(task.Clock())
    offered = [b"x" * 100] + [b"p%d" % i for i in range(20)] + [b"\xff"]
    with capturedLogs() as events:
        failures.failed("192.0.2.1", Failure(NoApplicationProtocol(offered, [b"http/1.1"])))
    (line,) = handshake_lines(events)
    assert f"it offered only {'x' * 40}, p0, p1, p2, p3, p4, p5, p6 and 14 more over ALPN" in line
    assert len(line) < 300


# -- https backends ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_https_backend_verified_with_its_ca_bundle(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems, tmp_path: Path
) -> None:
    server = await tls_backend(loopback, ports, pems)
    bundle = tmp_path / "bundle.pem"  # the right CA second: every certificate counts
    bundle.write_bytes(trustme.CA().cert_pem.bytes() + pems.ca.read_bytes())
    address = https(server.port_number, tls_ca=bundle)
    assert address.tls and address.name == f"localhost:{server.port_number}"
    proxy = await proxy_to(loopback, ports, address)

    reply = await get(loopback, loopback.client(proxy.port))
    assert (reply.status, reply.body) == (200, b"you asked for /app/hello")
    assert server.connections[0].state["sni"] == b"localhost"

    await check_tunnel(loopback, proxy, loopback.client(proxy.port), server)


@pytest_twisted.ensureDeferred
async def test_https_backend_by_ip_address_is_verified_against_the_address(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems
) -> None:
    server = await tls_backend(loopback, ports, pems)
    proxy = await proxy_to(loopback, ports, https(server.port_number, HOST, tls_ca=pems.ca))

    reply = await get(loopback, loopback.client(proxy.port))
    assert (reply.status, reply.body) == (200, b"you asked for /app/hello")
    assert server.connections[0].state["sni"] is None  # no SNI for an address


async def refused_backend(loopback: Loopback, proxy: Proxy, server: BackendServer) -> str:
    """A GET that must end in 502 without the request reaching ``server``; the 502's body."""
    client = loopback.client(proxy.port)
    reply = await get(loopback, client)
    assert reply.status == 502, reply.raw
    assert await loopback.run(client.recv_to_eof) == b""
    conn = await server.connection()
    await wait(conn.closed)
    assert conn.received == b"", "the request went to a backend that failed verification"
    return reply.text


@pytest_twisted.ensureDeferred
async def test_https_backend_signed_by_an_unknown_ca_gives_502(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems
) -> None:
    server = await tls_backend(loopback, ports, pems)
    proxy = await proxy_to(loopback, ports, https(server.port_number))  # system trust only

    text = await refused_backend(loopback, proxy, server)
    assert f"the backend (localhost:{server.port_number}) could not be reached" in text, text
    assert "its TLS certificate could not be verified" in text, text
    assert "give that CA's certificate as the backend's CA bundle" in text, text


@pytest.mark.parametrize(
    ("names", "host"),
    [
        (("other.example",), "localhost"),
        # A name that resolves to the address is not enough for an IP-literal URL.
        (("localhost",), HOST),
    ],
    ids=["wrong-name", "name-for-an-address"],
)
@pytest_twisted.ensureDeferred
async def test_https_backend_with_a_certificate_for_another_host_gives_502(
    loopback: Loopback,
    ports: list[IListeningPort],
    ca: trustme.CA,
    tmp_path: Path,
    names: tuple[str, ...],
    host: str,
) -> None:
    other = issue(ca, tmp_path / "other", *names)
    server = await tls_backend(loopback, ports, other)
    proxy = await proxy_to(loopback, ports, https(server.port_number, host, tls_ca=other.ca))

    text = await refused_backend(loopback, proxy, server)
    assert "its TLS certificate does not name the host in the backend URL" in text, text


@pytest_twisted.ensureDeferred
async def test_https_backend_without_verification_works_and_warns(
    loopback: Loopback, ports: list[IListeningPort], ca: trustme.CA, tmp_path: Path
) -> None:
    server = await tls_backend(loopback, ports, issue(ca, tmp_path / "other", "other.example"))
    with capturedLogs() as events:
        address = https(server.port_number, tls_verify=False)
    warnings = [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn]
    assert warnings == [
        f"certificate verification is OFF for backend https://localhost:{server.port_number}"
        "/app: anyone on the path can read and change its traffic"
    ]
    proxy = await proxy_to(loopback, ports, address)

    reply = await get(loopback, loopback.client(proxy.port))
    assert (reply.status, reply.body) == (200, b"you asked for /app/hello")
    assert server.connections[0].state["sni"] == b"localhost"


# -- both sides ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tls_on_both_sides_upgrade_and_backend_eof_closes_the_client(
    loopback: Loopback, ports: list[IListeningPort], pems: Pems, ca: trustme.CA
) -> None:
    server = await tls_backend(loopback, ports, pems)
    proxy = await proxy_to(loopback, ports, https(server.port_number, tls_ca=pems.ca), pems)
    client = await tls_client(loopback, proxy.port, ca)

    conn = await check_tunnel(loopback, proxy, client, server)
    assert conn.transport is not None
    conn.transport.loseConnection()

    # TLS has no half-close: the backend's EOF ends the whole tunnel.
    assert await loopback.run(client.recv_to_eof) == b""
    await eventually(
        lambda: not proxy.factory.proxy.tunnels and not proxy.factory.proxy.connections,
        what="the tunnel and the client connection to end",
    )


# -- what a TLS failure is called -----------------------------------------------------------------


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[list[Failure]] = Deferred()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.callback([reason])  # (a bare Failure would fire the errback)


class _AnswerInPlainHttp(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.transport.loseConnection()


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("unknown-ca", "could not be verified"),
        ("wrong-name", "does not name the host"),
        ("plain-http", "write its URL with http://"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_tls_failures_are_described_with_what_to_change(
    loopback: Loopback,
    ports: list[IListeningPort],
    ca: trustme.CA,
    tmp_path: Path,
    case: str,
    words: str,
) -> None:
    if case == "plain-http":
        address = https(await listen(ports, Factory.forProtocol(_AnswerInPlainHttp), None))
    else:
        pems = issue(ca, tmp_path / case, "other.example" if case == "wrong-name" else "localhost")
        server = await tls_backend(loopback, ports, pems)
        # The unknown CA is the trustme one, left out: only the system's is trusted.
        address = https(server.port_number, tls_ca=pems.ca if case == "wrong-name" else None)
    protocol = await address.endpoint.connect(Factory.forProtocol(_Recorder))
    protocol.transport.write(GET)
    (reason,) = await wait(protocol.lost)
    described = describe_tls_failure(reason)
    assert described is not None and words in described, described


def test_an_insecure_backend_given_on_the_command_line_is_warned_about_once() -> None:
    with capturedLogs() as logs:
        options = Options()
        options.parseOptions(["--backend", "https://localhost:8443", "--backend-insecure"])
        build_factory(options["proxy_config"], reactor)
    warnings = [e for e in logs if "certificate verification is OFF" in formatEvent(e)]
    assert len(warnings) == 1
