"""HAProxy and the PROXY protocol over loopback, both ways.

In front (``send-proxy-v2``): the client connects from 127.0.0.2 to HAProxy,
which connects from 127.0.0.1 to the proxy's PROXY protocol listener (made by
the real ``ProxyService``): the access log, ``X-Forwarded-For`` and the tunnel
must name 127.0.0.2, and a WebSocket tunnel through it must echo, spliced.

Behind (``accept-proxy``): the proxy sends the header to HAProxy as its
backend, and HAProxy, which parses it strictly, tells its own backend the
source it read there.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from loopback import HOST, TIMEOUT, Loopback, echo_app, eventually, free_port, upgrade_request
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from upgradeproxy import BackendSettings, ProxyFactory
from upgradeproxy.cli.service import Listener, ProxyService
from upgradeproxy.core._splice import AVAILABLE as SPLICE
from upgradeproxy.core.accesslog import AccessLog, RequestRecord, TunnelRecord
from upgradeproxy.core.address import BackendAddress
from upgradeproxy.core.balancer import BackendGroup, Policy
from upgradeproxy.core.proxyprotocol import ProxyProtocolFactory, parse_network
from upgradeproxy.core.routing import Route
from upgradeproxy.validators import RFC9110Validator, WebSocketValidator

pytestmark = pytest.mark.loopback

CLIENT = "127.0.0.2"
FRAME = b"\x81\x05hello"  # an unmasked text frame: the echo backend does not care


class Records(AccessLog):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[Any] = []

    def emit(self, record: Any) -> None:
        self.records.append(record)


HAPROXY_CONFIG = """\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind {host}:{front}
    default_backend proxy
backend proxy
    server upgradeproxy {host}:{proxy} send-proxy-v2
"""


#: HAProxy as a backend that wants the PROXY protocol, passing on what it read in it.
HAPROXY_BEHIND = """\
global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind {host}:{front} accept-proxy
    http-request set-header X-Source %[src]:%[src_port]
    default_backend app
backend app
    server app {host}:{proxy}
"""


def start_haproxy(
    haproxy: str, workdir: Path, front: int, proxy: int, template: str = HAPROXY_CONFIG
) -> subprocess.Popen[bytes]:
    config = workdir / "haproxy.cfg"
    config.write_text(template.format(host=HOST, front=front, proxy=proxy))
    check = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, timeout=10)
    assert check.returncode == 0, check.stderr.decode()
    return subprocess.Popen(
        [haproxy, "-db", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_haproxy(process: subprocess.Popen[bytes]) -> bytes:
    """Terminate HAProxy (by its PID) and return what it printed."""
    process.terminate()
    try:
        return process.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0]


def connect_from_client(port: int) -> socket.socket:
    """A socket from 127.0.0.2 to ``port``, retried while HAProxy starts."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        sock = socket.socket()
        sock.settimeout(TIMEOUT)
        sock.bind((CLIENT, 0))
        try:
            sock.connect((HOST, port))
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def read_until(sock: socket.socket, marker: bytes, have: bytes = b"") -> bytes:
    data = have
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"EOF before {marker!r}; received {data!r}")
        data += chunk
    return data


def plain_get(port: int) -> bytes:
    with connect_from_client(port) as sock:
        sock.sendall(b"GET /page HTTP/1.1\r\nHost: app.example\r\n\r\n")
        return read_until(sock, b"you asked for /page")


def open_websocket(port: int) -> tuple[socket.socket, bytes]:
    """Upgrade, with a first frame in the same packet; returns the socket and what came back."""
    sock = connect_from_client(port)
    sock.sendall(upgrade_request() + FRAME)
    received = read_until(sock, FRAME)
    return sock, received


def echo_again(sock: socket.socket) -> bytes:
    sock.sendall(b"\x81\x03bye")
    data = read_until(sock, b"bye")
    sock.shutdown(socket.SHUT_WR)
    sock.close()
    return data


@pytest_twisted.ensureDeferred
async def test_behind_haproxy_send_proxy_v2(
    haproxy: str, loopback: Loopback, tmp_path: Path
) -> None:
    backend = loopback.backend(echo_app)
    records = Records()
    factory = ProxyFactory(
        TCP4ClientEndpoint(reactor, HOST, backend.port_number), access_log=records
    )
    proxy_port, front = free_port(), free_port()
    listen = f"tcp:{proxy_port}:interface={HOST}"
    trusted = [parse_network(f"{HOST}/32")]
    service = ProxyService(
        factory, [Listener(listen, proxy_protocol=True)], reactor=reactor, grace=0,
        behind=lambda inner: ProxyProtocolFactory(inner, trusted),
    )  # fmt: skip
    service.startService()
    process = start_haproxy(haproxy, tmp_path, front, proxy_port)
    try:
        page = await loopback.run(plain_get, front, timeout=2 * TIMEOUT)
        assert page.startswith(b"HTTP/1.1 200 ")
        assert b"X-Forwarded-For: 127.0.0.2\r\n" in backend.connections[0].received
        await eventually(lambda: any(isinstance(r, RequestRecord) for r in records.records))
        request = next(r for r in records.records if isinstance(r, RequestRecord))
        assert request.client == CLIENT

        sock, received = await loopback.run(open_websocket, front)
        assert received.startswith(b"HTTP/1.1 101 ")
        tunnel = next(iter(factory.proxy.tunnels))
        assert tunnel.stats.client == CLIENT
        assert tunnel.spliced == SPLICE, "the header reader leaves the socket to splice(2)"
        assert (await loopback.run(echo_again, sock)).endswith(b"\x81\x03bye")
        await eventually(lambda: any(isinstance(r, TunnelRecord) for r in records.records))
        ended = next(r for r in records.records if isinstance(r, TunnelRecord))
        assert ended.client == CLIENT and ended.client_to_backend == len(FRAME) + 5
    finally:
        output = stop_haproxy(process)
        await service.stopService()
    assert b"ALERT" not in output, output.decode(errors="replace")


def get_and_upgrade(port: int) -> tuple[tuple[str, int], bytes, bytes]:
    """From 127.0.0.2: a GET, then an upgrade that echoes; the socket's address and answers."""
    with connect_from_client(port) as sock:
        address = sock.getsockname()
        sock.sendall(b"GET /page HTTP/1.1\r\nHost: app.example\r\n\r\n")
        page = read_until(sock, b"you asked for /page")
    sock, switched = open_websocket(port)
    with sock:
        echoed = echo_again(sock)
    return address, page, switched + echoed


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_haproxy_behind_reads_the_header_sent(
    haproxy: str, loopback: Loopback, tmp_path: Path, version: str
) -> None:
    backend = loopback.backend(echo_app)
    front = free_port()
    process = start_haproxy(haproxy, tmp_path, front, backend.port_number, HAPROXY_BEHIND)
    try:
        address = BackendAddress(TCP4ClientEndpoint(reactor, HOST, front), b"", "haproxy")
        group = BackendGroup(
            [address], policy=Policy.LEAST_CONN, clock=reactor, settings=BackendSettings(),
            send_proxy=version,
        )  # fmt: skip
        route = Route("r", group, (RFC9110Validator(), WebSocketValidator()))
        listening = loopback.listen(ProxyFactory(routes=[route]))
        await eventually(lambda: _listening(front), what="HAProxy to listen")
        (host, port), page, tunnel = await loopback.run(
            get_and_upgrade, listening.port, timeout=2 * TIMEOUT
        )
        assert page.startswith(b"HTTP/1.1 200 ")
        assert b"HTTP/1.1 101 " in tunnel and tunnel.endswith(b"\x81\x03bye")
        first = bytes(backend.connections[0].received)
        # HAProxy writes header names in lower case.
        assert f"x-source: {host}:{port}\r\n".encode() in first, first
    finally:
        output = stop_haproxy(process)
    assert b"ALERT" not in output, output.decode(errors="replace")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0
