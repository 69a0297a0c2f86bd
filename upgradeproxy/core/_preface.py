"""Which door serves a cleartext connection: HTTP/2 with prior knowledge, or HTTP/1.1.

Behind a load balancer that terminates TLS, a client (or the balancer) may
speak HTTP/2 straight away, starting with the connection preface
(RFC 9113 §3.3). A :class:`PrefaceSniffer` reads the first bytes, hands the
connection to :class:`~upgradeproxy.core._http2.HTTP2Connection` when they
are the preface or to :class:`~upgradeproxy.core._client.ClientConnection`
as soon as they cannot be, together with every byte it read, and is gone.
It is only used where cleartext HTTP/2 is turned on; over TLS, ALPN decides
(see ``ClientConnection.handshakeCompleted``).
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from .._twisted import switch_protocol
from ._client import ClientConnection
from ._http2 import PREFACE, HTTP2Connection
from ._timers import cancel
from .proxy import Proxy


@implementer(IHalfCloseableProtocol)
class PrefaceSniffer(Protocol):
    """Reads a connection's first bytes, and gives it to the door they call for."""

    def __init__(self, proxy: Proxy, peer: object | None = None) -> None:
        """``peer`` is the client's address, as the factory was given it (a
        :class:`~upgradeproxy.core._proxyheader.ProxiedAddress` behind a
        balancer); None: the transport's peer."""
        self._proxy = proxy
        self._peer = peer
        self._buf = b""
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if ISSLTransport.providedBy(self.transport):
            self._choose(ClientConnection(self._proxy, self._peer))
            return
        timeout = self._proxy.settings.request_head_timeout
        self._timer = self._proxy.clock.callLater(timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf + data
        if not PREFACE.startswith(buf[: len(PREFACE)]):
            self._choose(ClientConnection(self._proxy, self._peer), buf)
        elif len(buf) >= len(PREFACE):
            self._choose(HTTP2Connection(self._proxy, self._peer), buf)
        else:
            self._buf = buf

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()

    def _timed_out(self) -> None:
        # A client that sent a part of the preface and then nothing.
        self._timer = None
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _stop_timer(self) -> None:
        cancel(self._timer)
        self._timer = None

    def _choose(self, protocol: Protocol, received: bytes = b"") -> None:
        self._stop_timer()
        self._buf = b""
        switch_protocol(self.transport, protocol, received)  # type: ignore[arg-type]
