"""The Twisted internals upgradeproxy relies on (upgradeproxy/_twisted.py), checked live.

When one of these fails after a Twisted upgrade, review upgradeproxy/_twisted.py:
it is the only module that touches Twisted's private state.
"""

from __future__ import annotations

import ast
import re
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    serverFromString,
)
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

import twisted
from upgradeproxy import _twisted
from upgradeproxy._twisted import hand_over_reads, send_now


def test_the_installed_twisted_has_every_internal_relied_on() -> None:
    _twisted.check_supported()


@pytest.fixture
def plain_tcp() -> Iterator[tuple[tcp.Server, socket.socket, MemoryReactor]]:
    """A real Twisted TCP transport over a socket pair, on a reactor that records."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.settimeout(5)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, protocol.Protocol(), ("127.0.0.1", 1), None, 1, reactor)
    transport.protocol.makeConnection(transport)
    try:
        yield transport, peer, reactor
    finally:
        ours.close()
        peer.close()


def test_send_now_sends_without_registering_for_writes(plain_tcp) -> None:  # type: ignore[no-untyped-def]
    transport, peer, reactor = plain_tcp
    send_now(transport, b"hello")
    assert peer.recv(100) == b"hello"
    assert transport not in reactor.writers, "no reactor round trip for a write"
    assert not transport._tempDataBuffer


def test_send_now_queues_behind_bytes_already_queued(plain_tcp) -> None:  # type: ignore[no-untyped-def]
    transport, _peer, reactor = plain_tcp
    transport.write(b"first ")
    send_now(transport, b"second")
    assert transport._tempDataBuffer == [b"first ", b"second"], "order kept"
    assert transport in reactor.writers


def test_send_now_queues_what_the_socket_does_not_take(plain_tcp) -> None:  # type: ignore[no-untyped-def]
    transport, _peer, reactor = plain_tcp
    data = b"x" * (16 * 1024 * 1024)
    send_now(transport, data)
    queued = b"".join(transport._tempDataBuffer)
    assert 0 < len(queued) < len(data)
    assert data.endswith(queued)
    assert transport in reactor.writers


def test_send_now_on_other_transports_is_a_plain_write() -> None:
    transport = StringTransport()
    send_now(transport, b"data")
    assert transport.value() == b"data"


def test_pending_output_is_taken_whole_and_the_transport_left_empty(plain_tcp) -> None:  # type: ignore[no-untyped-def]
    transport, _peer, _reactor = plain_tcp
    transport.write(b"queued ")
    transport.write(b"twice")
    assert _twisted.writes_open(transport)
    assert _twisted.take_pending_output(transport) == b"queued twice"
    assert _twisted.take_pending_output(transport) == b""
    transport.loseWriteConnection()
    transport.doWrite()  # what the reactor does next: nothing is left, so the write side shuts
    assert not _twisted.writes_open(transport)


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="the epoll reactor needs Linux")
def test_reads_are_handed_over_in_place_on_the_epoll_reactor() -> None:
    from twisted.internet.epollreactor import EPollReactor

    ours, peer = socket.socketpair()
    ours.setblocking(False)
    reactor = EPollReactor()
    try:
        transport = tcp.Server(ours, protocol.Protocol(), ("127.0.0.1", 1), None, 1, reactor)
        reader = _Reader(ours.fileno())
        reactor.addReader(transport)
        reactor.addWriter(transport)
        assert not hand_over_reads(reactor, transport, reader), "not while it writes"
        reactor.removeWriter(transport)
        assert hand_over_reads(reactor, transport, reader)
        assert reader in reactor.getReaders() and transport not in reactor.getReaders()
        peer.send(b"x")
        reactor.doIteration(1)
        assert reader.reads == 1, "the read event went to the new reader"
        reactor.removeReader(reader)
        assert reader not in reactor.getReaders()
        transport.stopReading()  # what the transport does when it closes: nothing left to do
    finally:
        reactor.removeAll()
        reactor._poller.close()
        ours.close()
        peer.close()


def test_reads_are_not_handed_over_on_other_reactors(plain_tcp) -> None:  # type: ignore[no-untyped-def]
    transport, _peer, reactor = plain_tcp
    reactor.addReader(transport)
    assert not hand_over_reads(reactor, transport, _Reader(transport.fileno()))
    assert reactor.getReaders() == [transport]


class _Reader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reads = 0

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self) -> None:
        self.reads += 1

    def connectionLost(self, reason: object) -> None:
        pass


def test_a_tcp_client_endpoint_gives_its_parts_and_other_endpoints_none() -> None:
    reactor = MemoryReactor()
    parts = _twisted.tcp_client_parts(
        TCP4ClientEndpoint(reactor, "192.0.2.1", 9000, timeout=7, bindAddress=("127.0.0.1", 0))
    )
    assert parts == _twisted.TCPClientParts(reactor, "192.0.2.1", 9000, 7, ("127.0.0.1", 0))
    six = _twisted.tcp_client_parts(TCP6ClientEndpoint(reactor, "::1", 9001))
    assert six is not None and (six.host, six.port) == ("::1", 9001)
    assert _twisted.tcp_client_parts(UNIXClientEndpoint(reactor, "/run/x.sock")) is None


def test_a_tcp_server_endpoint_gives_what_it_listens_on() -> None:
    reactor = MemoryReactor()
    endpoint = serverFromString(reactor, "tcp:8080:interface=127.0.0.1:backlog=77")
    assert _twisted.tcp_server_parts(endpoint) == _twisted.TCPServerParts("127.0.0.1", 8080, 77)  # type: ignore[arg-type]
    everywhere = serverFromString(reactor, "tcp6:8081")
    assert _twisted.tcp_server_parts(everywhere).interface == "::"  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # trustme and Twisted, not ours
def test_an_ssl_endpoint_gives_its_tls_options(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    endpoint = serverFromString(MemoryReactor(), f"ssl:0:privateKey={pem}:certKey={pem}")
    options = _twisted.tls_server_options(endpoint)  # type: ignore[arg-type]
    assert options.getContext() is options.getContext(), "one cached context"  # type: ignore[attr-defined]


# -- the twisted.web takeover -------------------------------------------------------------


class _Pending(Resource):
    isLeaf = True

    def render(self, request):  # type: ignore[no-untyped-def]
        return NOT_DONE_YET


def test_twisted_web_keeps_bytes_after_a_request_where_the_takeover_looks() -> None:
    site = Site(_Pending())
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    protocol.makeConnection(StringTransport())
    channel = protocol._channel
    assert isinstance(channel, HTTPChannel), "twisted.web changed how Site wraps HTTPChannel"
    _twisted.check_channel(channel)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nsame-packet")
    protocol.dataReceived(b"later")
    held = channel._buffer + b"".join(channel._dataBuffer)
    assert held == b"same-packetlater", "HTTPChannel no longer buffers bytes where expected"
    assert channel.transport.producer is channel, "HTTPChannel is no longer the producer"


def test_check_supported_fails_loudly_on_a_channel_without_the_buffers() -> None:
    with pytest.raises(_twisted.UnsupportedTwisted, match="does not support Twisted"):
        _twisted.check_channel(object())  # type: ignore[arg-type]


# -- nowhere else ---------------------------------------------------------------------------

_PACKAGE = Path(__file__).resolve().parent.parent / "upgradeproxy"


def test_the_checked_range_is_the_pinned_range() -> None:
    pyproject = (_PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    (pin,) = re.findall(r'"twisted\[tls\](.*?)"', pyproject)
    assert pin == _twisted.TWISTED_RANGE


def _twisted_private_names() -> set[str]:
    """The private attributes Twisted's own classes set on themselves."""
    root = Path(twisted.__file__).parent
    names: set[str] = set()
    for part in ("internet", "web", "protocols", "application", "python"):
        for source in (root / part).glob("*.py"):
            names.update(re.findall(r"self\.(_[A-Za-z]\w*)", source.read_text(errors="replace")))
    return names


def test_no_module_but_the_internals_module_reaches_into_twisted() -> None:
    private = _twisted_private_names()
    found = []
    for source in sorted(_PACKAGE.rglob("*.py")):
        if source.name == "_twisted.py":
            continue
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private:
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    found.append(f"{source.relative_to(_PACKAGE)}:{node.lineno}: .{node.attr}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in private
            ):
                found.append(f"{source.relative_to(_PACKAGE)}:{node.lineno}: {node.args[1].value}")
            elif isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] == "twisted" and any(p.startswith("_") for p in parts):
                    found.append(f"{source.relative_to(_PACKAGE)}:{node.lineno}: {node.module}")
    assert found == [], "reach Twisted's private state only through upgradeproxy/_twisted.py"


def test_client_endpoints_say_where_they_connect() -> None:
    reactor = MemoryReactor()
    assert _twisted.client_endpoint_location(TCP4ClientEndpoint(reactor, "h", 1)) == "h:1"
    assert _twisted.client_endpoint_location(UNIXClientEndpoint(reactor, "/s")) == "unix:/s"
    assert _twisted.client_endpoint_location(object()) is None
