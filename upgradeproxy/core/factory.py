"""The listening door: a Twisted server factory around a :class:`~upgradeproxy.core.proxy.Proxy`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from twisted.internet.interfaces import (
    IProtocolNegotiationFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, ServerFactory
from zope.interface import implementer

from ..interfaces import IUpgradeValidator
from ._client import ClientConnection
from ._preface import PrefaceSniffer
from .accesslog import AccessLog
from .address import BackendAddress
from .proxy import Proxy, ProxySettings
from .routing import Route
from .tls import application_protocols


@implementer(IProtocolNegotiationFactory)
class ProxyFactory(ServerFactory):
    """A reverse proxy, as a Twisted server factory.

    With one backend, listen with it on any server endpoint::

        from twisted.internet import endpoints, reactor
        from upgradeproxy import ProxyFactory

        backend = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", 9000)
        factory = ProxyFactory(backend)
        endpoints.serverFromString(reactor, "tcp:8080").listen(factory)

    The arguments are those of :class:`~upgradeproxy.core.proxy.Proxy`, which the
    factory builds and keeps as :attr:`proxy` (give ``proxy`` instead to
    listen with one you built). The proxy starts with the factory (its
    health checks run) and stops with it.
    """

    noisy = False  # startFactory logs a line that says more

    def __init__(
        self,
        backend: IStreamClientEndpoint | BackendAddress | None = None,
        validators: Iterable[IUpgradeValidator] | None = None,
        *,
        routes: Sequence[Route] | None = None,
        clock: IReactorTime | None = None,
        settings: ProxySettings | None = None,
        scheme: str = "http",
        access_log: AccessLog | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        if proxy is None:
            proxy = Proxy(
                backend, validators, routes=routes, clock=clock, settings=settings,
                scheme=scheme, access_log=access_log,
            )  # fmt: skip
        elif backend is not None or routes is not None:
            raise TypeError("give either a proxy, or what to build one with")
        #: The proxy this factory's connections go through.
        self.proxy = proxy

    def startFactory(self) -> None:
        self.proxy.start()

    def stopFactory(self) -> None:
        self.proxy.stop()

    @property
    def protocols(self) -> tuple[bytes, ...]:
        """The application protocols offered to TLS clients over ALPN, in order of
        preference: ``h2`` then ``http/1.1``, or only ``http/1.1`` with HTTP/2 off."""
        return application_protocols(self.proxy.settings.http2)

    def acceptableProtocols(self) -> list[bytes]:
        return list(self.protocols)

    def buildProtocol(self, addr: object) -> Protocol:
        """The connection's protocol; for a client far over its limit, one that closes at once.

        ``addr`` is the client's: a :class:`~upgradeproxy.core._proxyheader.ProxiedAddress`
        behind a load balancer speaking the PROXY protocol.
        """
        proxy = self.proxy
        if not proxy.accepts(addr):
            # Not None, which only a bare listening port takes: a TLS
            # factory around this one would wrap None and fail.
            return _Unanswered()
        # Only where cleartext HTTP/2 is on do a connection's first bytes
        # choose its door; otherwise HTTP/1.1 pays nothing for HTTP/2.
        if proxy.settings.http2_cleartext:
            return PrefaceSniffer(proxy, addr)
        return ClientConnection(proxy, addr)


class _Unanswered(Protocol):
    """A connection closed as soon as it is made, with no response and nothing read."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]
