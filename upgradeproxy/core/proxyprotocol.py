"""Listening behind a load balancer that speaks the PROXY protocol (v1 and v2).

:class:`ProxyProtocolFactory` wraps a server factory (a
:class:`~upgradeproxy.ProxyFactory`, or a TLS factory around one). A
connection from a *trusted* network must start with a PROXY protocol
header; the wrapped factory's protocol is then built for the client the
header names (``buildProtocol`` gets a
:class:`~upgradeproxy.core._proxyheader.ProxiedAddress`) and gets the bytes
after the header, none lost. A connection from a trusted network without a
correct header in time is closed with a log line. A connection from any
other network is served as a direct client: its header, if it sent one, is
not accepted (it reaches the HTTP parser, which refuses it).

Why not Twisted's ``haproxy:`` endpoint (``twisted.protocols.haproxy``):
its wrapper makes itself the transport of the protocol it wraps, so a
tunnel can no longer take the socket over for ``splice(2)`` and every write
goes through one more call; it does not forward half-close (a WebSocket or
``Upgrade: tcp`` client's EOF becomes a full close); it accepts a header
from any source, with no time limit; and it drops a connection whose first
read is shorter than 8 bytes. Here the receiver only reads the header:
once it has, the wrapped protocol gets the *real* transport
(``makeConnection(transport)``), so the socket, its write path and
``splice(2)`` are exactly those of a direct connection, and only reads and
ends pass through one forwarding call. From an untrusted network nothing
is wrapped at all.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._lograte import LogWindows
from ._proxyheader import HeaderError, ProxiedAddress, parse
from ._timers import cancel

#: Seconds a trusted connection has to send its header.
HEADER_TIMEOUT = 5.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = Logger()


def parse_network(text: str) -> Network:
    """``10.0.0.0/8``, ``2001:db8::/32`` or one address; else :class:`ValueError` saying why."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a network; write an address or a network in CIDR form, "
            'such as "10.0.0.0/8" or "127.0.0.1"'
        ) from None


@implementer(IProtocolFactory)
class ProxyProtocolFactory:
    """Reads a PROXY protocol header from trusted sources, then hands over to ``wrapped``.

    ``trusted`` are the networks the load balancers connect from;
    ``timeout`` the seconds a trusted connection has to send its header.
    """

    noisy = False

    def __init__(
        self,
        wrapped: IProtocolFactory,
        trusted: Iterable[Network],
        *,
        timeout: float = HEADER_TIMEOUT,
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.wrapped = wrapped
        self.trusted = tuple(trusted)
        self.timeout = timeout
        self.clock = clock
        self._failures = LogWindows()
        # The balancers are a few addresses that connect over and over.
        self._trusted_host = functools.lru_cache(maxsize=1024)(self._host_is_trusted)

    def trust(self, trusted: Iterable[Network], timeout: float) -> None:
        """From now on, trust ``trusted`` and give them ``timeout`` (a reload)."""
        self.trusted = tuple(trusted)
        self.timeout = timeout
        self._trusted_host.cache_clear()

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def is_trusted(self, address: object) -> bool:
        """True when ``address`` (a listening socket's peer) is in a trusted network."""
        host = getattr(address, "host", None)
        return isinstance(host, str) and self._trusted_host(host)

    def _host_is_trusted(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted)

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        if not self.is_trusted(addr):
            return self.wrapped.buildProtocol(addr)
        return HeaderReceiver(self, addr)

    def refused(self, balancer: object, why: str) -> None:
        """Log that a trusted connection was closed for want of a correct header."""
        source = str(getattr(balancer, "host", balancer))
        notes = self._failures.note(source, self.clock.seconds())
        if notes is not None:
            log.info(
                "closed a connection from {source}, a trusted proxy: {why}; a connection "
                "from a trusted_proxies network must start with a PROXY protocol header{notes}",
                source=source,
                why=why,
                notes=notes,
            )


@implementer(IHalfCloseableProtocol)
class HeaderReceiver(Protocol):
    """The first protocol of a trusted connection: reads the header, then forwards."""

    def __init__(self, factory: ProxyProtocolFactory, balancer: IAddress) -> None:
        self._factory = factory
        self._balancer = balancer
        self._buf = b""
        self._inner: IProtocol | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._factory.clock.callLater(self._factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        inner = self._inner
        if inner is not None:
            inner.dataReceived(data)
            return
        if self._timer is None:
            return  # refused already; the close is under way
        self._buf += data
        try:
            header = parse(self._buf)
        except HeaderError as e:
            self._refuse(str(e))
            return
        if header is None:
            return
        self._stop_timer()
        rest, self._buf = self._buf[header.length :], b""
        address: IAddress = self._balancer
        if header.source is not None:
            address = ProxiedAddress(header.source, header.destination, self._balancer)
        inner = self._factory.wrapped.buildProtocol(address)
        if inner is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._inner = inner
        assert self.transport is not None
        inner.makeConnection(self.transport)
        if rest and self._inner is not None:  # it may have closed at once
            inner.dataReceived(rest)

    def readConnectionLost(self) -> None:
        inner = self._inner
        if inner is None:
            if self._timer is not None:
                self._refuse("it closed its side before sending a PROXY protocol header")
        elif IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()
        else:
            # What Twisted does for a protocol that cannot be half-closed.
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        inner = self._inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.connectionLost(reason)

    def _timed_out(self) -> None:
        self._timer = None
        self._factory.refused(
            self._balancer,
            f"it sent no complete PROXY protocol header within {self._factory.timeout:g} seconds",
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _refuse(self, why: str) -> None:
        self._stop_timer()
        self._factory.refused(self._balancer, why)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        cancel(timer)
