"""Test the proxy, or a validator, in memory: the real proxy logic, no sockets.

:class:`ProxyHarness` puts a :class:`~upgradeproxy.ProxyFactory` between an
in-memory client connection and scripted in-memory backend connections, with
a fake clock. :func:`upgrade_outcome` runs one upgrade in a single call::

    from upgradeproxy.testing import upgrade_outcome

    outcome = upgrade_outcome(
        b"GET /chat HTTP/1.1\\r\\nHost: a\\r\\nConnection: upgrade\\r\\n"
        b"Upgrade: websocket\\r\\n\\r\\n",
        b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\n\\r\\n",
        validators=[MyValidator()],
    )
    assert outcome.status == 502
    assert "Connection: upgrade" in outcome.body
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from zope.interface import implementer

from .core.address import BackendAddress
from .core.factory import ProxyFactory
from .core.proxy import ProxySettings
from .interfaces import IUpgradeValidator


class MemoryTransport(StringTransportWithDisconnection):
    """A string transport that also supports half-close and resets, like TCP."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        if not self.write_closed and self.connected:
            self.write_closed = True
            self.protocol.writeConnectionLost()  # type: ignore[attr-defined]

    def reset(self) -> None:
        """The peer reset the connection."""
        if self.connected:
            self.connected = False
            self.protocol.connectionLost(Failure(error.ConnectionLost("reset by peer")))

    def eof(self) -> None:
        """The peer shut down its write side.

        As with TCP, a protocol that cannot be half-closed is told the
        connection is gone.
        """
        if IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
        elif self.connected:
            self.connected = False
            self.protocol.connectionLost(Failure(error.ConnectionDone()))


def _connect(protocol: IProtocol, host: str, port: int) -> MemoryTransport:
    transport = MemoryTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
        peerAddress=IPv4Address("TCP", host, port),
    )
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return transport


class ScriptedBackend:
    """One in-memory connection to the backend, driven by the test."""

    def __init__(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        self.transport = _connect(protocol, "127.0.0.1", 9000)

    @property
    def received(self) -> bytes:
        """Everything the proxy has written to this backend connection."""
        return bytes(self.transport.value())

    def send(self, data: bytes) -> None:
        """The backend sends ``data`` to the proxy."""
        self.protocol.dataReceived(data)

    @property
    def closed(self) -> bool:
        return not self.transport.connected


@implementer(IStreamClientEndpoint)
class ScriptedBackendEndpoint:
    """A client endpoint whose connections are :class:`ScriptedBackend` objects."""

    def __init__(self) -> None:
        self.connections: list[ScriptedBackend] = []
        #: Refuse every connection attempt.
        self.refuse = False
        #: Leave connection attempts pending until :meth:`complete_connection`.
        self.hold_connections = False
        self._pending: list[tuple[IProtocolFactory, Deferred[IProtocol]]] = []
        #: Connection attempts, refused ones included.
        self.attempts = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        self.attempts += 1
        if self.refuse:
            return fail(error.ConnectionRefusedError("scripted refusal"))
        if self.hold_connections:
            pending: Deferred[IProtocol] = Deferred()
            self._pending.append((factory, pending))
            return pending
        return succeed(self._build(factory))

    def complete_connection(self) -> None:
        """Let the oldest pending connection attempt succeed."""
        factory, pending = self._pending.pop(0)
        pending.callback(self._build(factory))

    def _build(self, factory: IProtocolFactory) -> IProtocol:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9000))
        assert protocol is not None
        self.connections.append(ScriptedBackend(protocol))
        return protocol


def connect_client(
    factory: ProxyFactory, host: str = "192.0.2.7", port: int = 50000
) -> tuple[IProtocol, MemoryTransport]:
    """A new in-memory client connection to ``factory``, from ``host:port``."""
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    assert protocol is not None
    return protocol, _connect(protocol, host, port)


class ProxyHarness:
    """A proxy with one in-memory client connection and scripted backends."""

    def __init__(
        self,
        validators: Iterable[IUpgradeValidator] | None = None,
        settings: ProxySettings | None = None,
    ) -> None:
        self.clock = Clock()
        self.endpoint = ScriptedBackendEndpoint()
        backend = BackendAddress(self.endpoint, b"", "scripted backend")
        self.factory = ProxyFactory(backend, validators, clock=self.clock, settings=settings)
        self.client, self.client_transport = connect_client(self.factory)

    @property
    def backend(self) -> ScriptedBackend:
        """The most recent backend connection."""
        return self.endpoint.connections[-1]

    def client_sends(self, data: bytes) -> None:
        self.client.dataReceived(data)

    @property
    def client_received(self) -> bytes:
        return bytes(self.client_transport.value())

    @property
    def client_closed(self) -> bool:
        return not self.client_transport.connected


@dataclass(frozen=True)
class Outcome:
    """What the client saw of one exchange, and what the backend was sent."""

    status: int | None
    head: bytes
    body: str
    client_received: bytes
    backend_received: bytes
    client_closed: bool
    backend_contacted: bool


def upgrade_outcome(
    request: bytes,
    response: bytes,
    validators: Iterable[IUpgradeValidator] | None = None,
) -> Outcome:
    """Send ``request`` through a proxy whose backend answers ``response``.

    Returns what the client received (status, head, body as text) and what
    the backend received. ``validators`` defaults to the proxy's default chain.
    """
    harness = ProxyHarness(validators)
    harness.client_sends(request)
    contacted = bool(harness.endpoint.connections)
    backend_received = b""
    if contacted:
        harness.backend.send(response)
        backend_received = harness.backend.received
    received = harness.client_received
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
    return Outcome(
        status=status,
        head=head,
        body=body.decode("utf-8", "replace"),
        client_received=received,
        backend_received=backend_received,
        client_closed=harness.client_closed,
        backend_contacted=contacted,
    )
