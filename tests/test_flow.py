"""Writing to transports: sending at once where nothing is queued, and corking."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactor, StringTransport

from upgradeproxy.flow import send_now
from upgradeproxy.testing import ProxyHarness


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


def test_a_response_read_in_one_piece_is_written_to_the_client_in_one_piece() -> None:
    h = ProxyHarness()
    writes: list[bytes] = []
    real_write = h.client_transport.write

    def write(data: bytes) -> None:
        writes.append(data)
        real_write(data)

    h.client_transport.write = write  # type: ignore[method-assign]
    h.client_sends(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    h.backend.send(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert len(writes) == 1, writes
    assert writes[0].startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert writes[0].endswith(b"5\r\nhello\r\n0\r\n\r\n")
