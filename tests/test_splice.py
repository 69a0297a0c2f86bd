"""The splice(2) pump, over real sockets: what the shared tunnel tests do not pin down."""

from __future__ import annotations

import os
import socket

import pytest
import pytest_twisted
from loopback import Loopback, switching_response, upgrade_request, wait

from upgradeproxy import ProxySettings
from upgradeproxy.core import _splice as splice
from upgradeproxy.core._side import ByteCounts, Side

pytestmark = [
    pytest.mark.loopback,
    pytest.mark.skipif(not splice.AVAILABLE, reason="splice(2) is Linux-only"),
]


@pytest_twisted.ensureDeferred
async def test_a_burst_larger_than_many_pipes_arrives_whole_with_nothing_behind_it(
    loopback: Loopback,
) -> None:
    # The pump works in bounded rounds; bytes read in the last round must not
    # wait for the source to send more, because here it never does.
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number, settings=ProxySettings(splice=True))
    client = loopback.client(proxy.port)
    client.send_once(upgrade_request(b"bulk"))
    conn = await backend.connection()
    head = await wait(conn.head_received)
    conn.transport.write(switching_response(head))
    await loopback.run(client.recv_head)
    (tunnel,) = proxy.factory.proxy.tunnels
    assert tunnel.spliced

    burst = os.urandom(24 * splice.PIPE_SIZE + 1234)
    await loopback.run(client.sendall, burst)
    await wait(conn.wait_for_bytes(len(burst), timeout=20), timeout=25)
    assert conn.after_head == burst

    conn.transport.write(burst)
    assert await loopback.run(client.recv_exactly, len(burst), timeout=20) == burst


@pytest_twisted.ensureDeferred
async def test_idle_tunnels_hold_no_pipes(loopback: Loopback) -> None:
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number, settings=ProxySettings(splice=True))
    before = len(os.listdir("/proc/self/fd"))
    clients = []
    for _ in range(20):
        client = loopback.client(proxy.port)
        client.send_once(upgrade_request(b"idle"))
        clients.append(client)
    for index, client in enumerate(clients):
        conn = await backend.connection(index)
        head = await wait(conn.head_received)
        conn.transport.write(switching_response(head))
        await loopback.run(client.recv_head)
    assert len(proxy.factory.proxy.tunnels) == 20
    # Each tunnel: a client socket (the test's and the proxy's end), a backend
    # socket (both ends, both in this process); no pipes beyond the shared few.
    opened = len(os.listdir("/proc/self/fd")) - before
    assert opened <= 20 * 4 + 2 * 4, opened


# -- the pump alone, over socket pairs, with a reactor that only records -----------------


class _RecordingReactor:
    def __init__(self) -> None:
        self.readers: set[object] = set()
        self.writers: set[object] = set()

    def addReader(self, r: object) -> None:
        self.readers.add(r)

    def removeReader(self, r: object) -> None:
        self.readers.discard(r)

    def addWriter(self, w: object) -> None:
        self.writers.add(w)

    def removeWriter(self, w: object) -> None:
        self.writers.discard(w)


class _Transport:
    """The parts of a Twisted TCP transport the pump touches."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0

    def stopReading(self) -> None:
        pass

    def stopWriting(self) -> None:
        pass


def test_bytes_read_in_the_last_round_are_not_left_waiting_for_more_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One splice call per wake-up: the read is the last thing the round does.
    monkeypatch.setattr(splice, "_ROUNDS", 1)
    client_app, client_proxy = socket.socketpair()
    backend_proxy, backend_app = socket.socketpair()
    for sock in (client_proxy, backend_proxy):
        sock.setblocking(False)
    reactor = _RecordingReactor()
    transports = {Side.CLIENT: _Transport(client_proxy), Side.BACKEND: _Transport(backend_proxy)}
    pump = splice.SplicePump(transports, ByteCounts(), lambda side, why: None, reactor)  # type: ignore[arg-type]
    try:
        pump.start()
        client_app.sendall(b"the only message")
        to_backend = pump._to[Side.BACKEND]
        to_backend.src.doRead()  # what the reactor calls: the client's socket is readable
        assert to_backend.in_pipe == len(b"the only message")
        assert to_backend.dst in reactor.writers, "bytes stranded until more input"
        to_backend.dst.doWrite()
        backend_app.settimeout(5)
        assert backend_app.recv(100) == b"the only message"
    finally:
        for sock in (client_app, client_proxy, backend_proxy, backend_app):
            sock.close()


def test_a_stream_of_messages_asks_the_reactor_for_reads_once() -> None:
    # The reactor watches a socket for reads until told otherwise: asking it
    # again for every message would be work for nothing.
    client_app, client_proxy = socket.socketpair()
    backend_proxy, backend_app = socket.socketpair()
    for sock in (client_proxy, backend_proxy):
        sock.setblocking(False)
    reactor = _RecordingReactor()
    asked: list[object] = []
    add_reader = reactor.addReader

    def counting_add_reader(r: object) -> None:
        asked.append(r)
        add_reader(r)

    reactor.addReader = counting_add_reader  # type: ignore[method-assign]
    transports = {Side.CLIENT: _Transport(client_proxy), Side.BACKEND: _Transport(backend_proxy)}
    pump = splice.SplicePump(transports, ByteCounts(), lambda side, why: None, reactor)  # type: ignore[arg-type]
    try:
        pump.start()
        to_backend = pump._to[Side.BACKEND]
        backend_app.settimeout(5)
        for n in range(5):
            client_app.sendall(b"message %d" % n)
            to_backend.src.doRead()
            assert backend_app.recv(100) == b"message %d" % n
        assert asked.count(to_backend.src) == 1
        assert to_backend.src in reactor.readers
    finally:
        for sock in (client_app, client_proxy, backend_proxy, backend_app):
            sock.close()
