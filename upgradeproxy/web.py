"""Mount the proxy under a path of an existing twisted.web site.

::

    root = Resource()
    root.putChild(b"app", ProxyResource(TCP4ClientEndpoint(reactor, "127.0.0.1", 9000)))
    reactor.listenTCP(8080, Site(root))

Requests under ``/app/`` go to the backend with the mount path removed
(``/app/chat`` becomes ``/chat``), upgrades included: after the validators
accept a ``101``, the connection is taken over from twisted.web together
with every byte the client sent behind its request, so a first frame sent in
the same packet as the handshake is not lost (as it is with Twisted's own
``WebSocketResource``).

What twisted.web decides for itself here: it reads a request body whole
before the resource sees it (so bodies are not streamed to the backend),
it merges repeated request header fields, and it cannot send ``1xx``
interim responses (they are dropped). For a proxy without those limits,
listen with :class:`~upgradeproxy.ProxyFactory` instead.

twisted.web owns the connections between requests; the proxy counts each
request in :attr:`~upgradeproxy.core.proxy.Proxy.connections` from its start
to its end (to its tunnel's end after a switch), so that limits, the
snapshot and a graceful shutdown see it as they see a listening door's
connection.

Everything else is the listening proxy's: the resource drives each request
through the same :class:`~upgradeproxy.core._exchange.Exchange` (routes, limits,
validators, retries, access records), and its :class:`~upgradeproxy.core.proxy.Proxy`
runs its health checks from the moment the resource is made until the
reactor stops.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from twisted.internet.interfaces import IReactorCore, IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ._twisted import detach
from .core._backend import BackendConnection
from .core._exchange import Exchange, refuse_request
from .core._handover import Handover
from .core._rewrite import VIA, ClientHop, error_body, switch_for_client
from .core._side import Side
from .core._tunnel import Tunnel
from .core.accesslog import AccessLog
from .core.address import BackendAddress
from .core.proxy import Proxy, ProxySettings
from .core.routing import Route
from .http1 import BodyKind, Field, Framing, Headers, RequestHead, ResponseHead
from .interfaces import IUpgradeValidator

#: Request fields that twisted.web consumed: it has decoded the body already.
_FRAMING_FIELDS = (b"content-length", b"transfer-encoding")


class ProxyResource(Resource):
    """A twisted.web resource that proxies everything under it.

    The arguments are those of :class:`~upgradeproxy.core.proxy.Proxy` (one
    ``backend`` with its ``validators``, or ``routes``); give ``proxy``
    instead to share one with a listening factory.
    """

    isLeaf = True

    def __init__(
        self,
        backend: IStreamClientEndpoint | BackendAddress | None = None,
        validators: Iterable[IUpgradeValidator] | None = None,
        *,
        routes: Sequence[Route] | None = None,
        clock: IReactorTime | None = None,
        settings: ProxySettings | None = None,
        access_log: AccessLog | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        super().__init__()
        if proxy is None:
            proxy = Proxy(
                backend, validators, routes=routes, clock=clock, settings=settings,
                access_log=access_log,
            )  # fmt: skip
        elif backend is not None or routes is not None:
            raise TypeError("give either a proxy, or what to build one with")
        #: The proxy this resource's requests go through.
        self.proxy = proxy
        proxy.start()
        if IReactorCore.providedBy(proxy.clock):
            proxy.clock.addSystemEventTrigger("before", "shutdown", proxy.stop)

    def render(self, request: Request) -> int:
        # The backend's fields only: no twisted.web default type or banner.
        request.defaultContentType = None
        request.responseHeaders.removeHeader(b"server")
        _WebClientSide(request).begin(self.proxy)
        return NOT_DONE_YET


class _TrackedConnection:
    """A request's client connection as the proxy counts it in ``proxy.connections``.

    It is there from the request's start to the end of its response or, after
    a switch, until the connection is lost; from the switch on, it receives
    the connection's events for the tunnel. It is not the exchange's client
    side on purpose: a backend connection kept private to that (the PROXY
    protocol) is reused by the next request on twisted.web's connection, so
    the proxy must not close it when one request leaves.
    """

    def __init__(self, request: Request, address: str, proxy: Proxy) -> None:
        self._request = request
        self.address = address
        self._proxy = proxy
        self.tunnel: Tunnel | None = None

    def closed(self) -> None:
        self._proxy.connection_closed(self)

    # -- FrontConnection ---------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True until the request is answered or becomes a tunnel."""
        return self.tunnel is None

    def drain(self) -> None:
        """The proxy is shutting down: twisted.web closes the connection after this response."""
        request = self._request
        if self.busy and request.channel is not None:
            request.channel.persistent = False
            if not request.startedWriting:
                request.setHeader(b"connection", b"close")

    def abort(self) -> None:
        transport = self._request.channel.transport
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    # -- the connection's events, once twisted.web has let go of it --------------------

    def dataReceived(self, data: bytes) -> None:
        assert self.tunnel is not None
        self.tunnel.data(Side.CLIENT, data)

    def connectionLost(self, reason: Failure) -> None:
        if self.tunnel is not None:
            self.tunnel.lost(Side.CLIENT, reason)
        self.closed()


def _request_head(request: Request) -> tuple[RequestHead, bytes]:
    """The request as the proxy sees it, with the mount path removed, and its body."""
    path = b"/" + b"/".join(request.postpath or [])
    uri, question, query = request.uri.partition(b"?")
    scheme, absolute, rest = uri.partition(b"://")
    # An absolute-form target keeps its authority: it names the host to route by.
    authority = scheme + absolute + rest.partition(b"/")[0] if absolute else b""
    target = authority + path + question + query
    version = (1, 1) if request.clientproto == b"HTTP/1.1" else (1, 0)
    fields = [
        (name, value)
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
        if name.lower() not in _FRAMING_FIELDS
    ]
    body = b""
    content = request.content
    if content is not None:
        content.seek(0)
        body = content.read()
    if body:
        fields.append((b"Content-Length", b"%d" % len(body)))
    return RequestHead(request.method, target, version, Headers(tuple(fields))), body


class _WebClientSide:
    """One request through a :class:`ProxyResource`: the exchange's client side, on twisted.web."""

    protocol = "HTTP/1.1"

    def __init__(self, request: Request) -> None:
        self._request = request
        address = request.getClientAddress()
        self.address = str(getattr(address, "host", address))
        scheme = "https" if request.isSecure() else "http"
        self.hop = ClientHop(self.address, scheme, peer=address, local=request.getHost())
        self._body = b""
        self._finished = False
        self._exchange: Exchange | None = None
        self._connection: _TrackedConnection

    def begin(self, proxy: Proxy) -> None:
        head, self._body = _request_head(self._request)
        self._connection = _TrackedConnection(self._request, self.address, proxy)
        refusal = proxy.connection_opened(self._connection)
        if refusal is not None:
            refuse_request(
                proxy, self, head, None, refusal.status, refusal.reason,
                retry_after=refusal.retry_after, logged=refusal.logged,
            )  # fmt: skip
            return
        exchange = Exchange.start(proxy, self, head)
        if exchange is None:
            return
        self._exchange = exchange
        self._request.notifyFinish().addErrback(self._client_gone)
        exchange.connect()

    def _client_gone(self, reason: Failure) -> None:
        self._finished = True
        if self._exchange is not None:
            self._exchange.client_gone()
        self._connection.closed()

    # -- ClientSide ------------------------------------------------------------------

    def body_wanted(self, exchange: Exchange, backend: BackendConnection) -> None:
        if exchange.body_data((self._body,)):
            exchange.body_end()

    def cork(self) -> None:
        pass  # twisted.web's Request buffers for itself

    def uncork(self) -> None:
        pass

    def send_interim(self, head: ResponseHead) -> None:
        pass  # twisted.web has no way to send a 1xx

    def send_head(self, exchange: Exchange, head: ResponseHead, framing: Framing) -> None:
        request = self._request
        request.setResponseCode(head.status, head.reason)
        headers = request.responseHeaders
        for name in (b"server", b"date"):  # twisted.web's own; the backend's win
            headers.removeHeader(name)
        for name, value in head.headers.end_to_end().without((b"via",)):
            headers.addRawHeader(name, value)
        headers.setRawHeaders(b"via", [b", ".join([*head.headers.get_all(b"via"), VIA])])
        required = head.headers.get_all(b"upgrade") if head.status == 426 else []
        if required:  # what a 426 requires, a connection option (RFC 9110 §15.5.22, §7.8)
            headers.setRawHeaders(b"upgrade", required)
            headers.setRawHeaders(b"connection", [b"upgrade"])
        backend = exchange.backend
        if framing.kind is not BodyKind.NONE and backend is not None:
            request.registerProducer(backend.transport, True)

    def send_body(self, data: bytes) -> None:
        self._request.write(data)

    def send_trailers(self, fields: tuple[Field, ...]) -> None:
        pass  # twisted.web has no way to send trailers

    def send_end(self, exchange: Exchange) -> None:
        request = self._request
        if request.producer is not None:
            request.unregisterProducer()
            backend = exchange.backend
            if backend is not None and backend.transport is not None:
                backend.transport.resumeProducing()  # type: ignore[attr-defined]
        self._finish()

    def refuse(
        self, exchange: Exchange | None, status: int, reason: str, *, retry_after: int | None = None
    ) -> int:
        if self._finished:
            return 0
        request = self._request
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if retry_after is not None:
            request.setHeader(b"retry-after", b"%d" % retry_after)
        body = error_body(reason)
        if request.method != b"HEAD":
            request.write(body)
        channel = request.channel  # finishing lets go of it
        self._finish()
        # As on the listening door, nothing more is read after an error: what
        # the client sent behind a refused upgrade is not a next request.
        if channel is not None:
            channel.loseConnection()
        return 0 if request.method == b"HEAD" else len(body)

    def cut_short(self) -> None:
        self._finished = True
        transport = self._request.channel.transport
        if transport is not None:
            transport.loseConnection()

    def hand_over(self, response: ResponseHead) -> Handover:
        self._finished = True
        detached = detach(self._request, self._connection)
        detached.transport.write(switch_for_client(response).serialize())
        return Handover(detached.transport, detached.held)

    def attach(self, tunnel: Tunnel) -> None:
        self._connection.tunnel = tunnel

    def abort(self) -> None:
        self._connection.abort()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._request.finish()
            self._connection.closed()
