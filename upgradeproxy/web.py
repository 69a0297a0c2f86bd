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
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from . import _twistedweb
from .address import BackendAddress
from .backend import BackendConnection, BackendFailure
from .balancer import Backend, describe_connect_failure
from .http1 import (
    BodyKind,
    Framing,
    Headers,
    ProtocolError,
    RequestHead,
    ResponseHead,
    is_upgrade_request,
)
from .interfaces import IUpgradeValidator, Refusal, UpgradeAttempt
from .proxy import ProxyFactory, ProxySettings
from .rewrite import VIA, ClientHop, request_for_backend, without_h2c
from .routing import Route
from .switch import complete_switch, log_refused_switch
from .tunnel import Side, Tunnel

log = Logger()


class ProxyResource(Resource):
    """A twisted.web resource that proxies everything under it to one backend."""

    isLeaf = True

    def __init__(
        self,
        backend: IStreamClientEndpoint | BackendAddress,
        validators: Iterable[IUpgradeValidator] | None = None,
        *,
        clock: IReactorTime | None = None,
        settings: ProxySettings | None = None,
    ) -> None:
        super().__init__()
        #: The proxy logic, pool and bookkeeping this resource shares with a
        #: listening :class:`ProxyFactory`.
        self.proxy = ProxyFactory(backend, validators, clock=clock, settings=settings)

    def render(self, request: Request) -> int:
        # The backend's fields only: no twisted.web default type or banner.
        request.defaultContentType = None
        request.responseHeaders.removeHeader(b"server")
        _ResourceExchange(self.proxy, request).start()
        return NOT_DONE_YET


class _TunnelClientSide:
    """Receives the client connection's events once twisted.web has let go of it."""

    def __init__(self) -> None:
        self.tunnel: Tunnel | None = None

    def attach(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def dataReceived(self, data: bytes) -> None:
        assert self.tunnel is not None
        self.tunnel.data(Side.CLIENT, data)

    def connectionLost(self, reason: Failure) -> None:
        if self.tunnel is not None:
            self.tunnel.lost(Side.CLIENT, reason)


def _request_head(request: Request) -> RequestHead:
    """The request as the proxy sees it, with the mount path removed from its target."""
    path = b"/" + b"/".join(request.postpath or [])
    _, question, query = request.uri.partition(b"?")
    target = path + question + query
    version = (1, 1) if request.clientproto == b"HTTP/1.1" else (1, 0)
    fields = [
        (name, value)
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
        if name.lower() != b"content-length"
    ]
    return RequestHead(request.method, target, version, Headers(tuple(fields)))


class _ResourceExchange:
    """One request through a :class:`ProxyResource`: a ResponseSink over twisted.web."""

    def __init__(self, proxy: ProxyFactory, request: Request) -> None:
        self._proxy = proxy
        self._request = request
        self._head = _request_head(request)
        self._backend: BackendConnection | None = None
        self._route: Route | None = None
        self._upstream: Backend | None = None
        self._responded = False
        self._done = False
        address = request.getClientAddress()
        self._client = str(getattr(address, "host", address))

    def start(self) -> None:
        head = self._head
        if not self._proxy.settings.forward_h2c:
            head = self._head = without_h2c(head)
        upgrade = is_upgrade_request(head)
        try:
            route = self._route = self._proxy.route_for(head)
        except ProtocolError as e:
            self._error(e.status, e.reason)
            return
        if route is None:
            self._error(404, "no route serves this request")
            return
        upstream = route.group.choose(self._client)
        if upstream is None:
            self._error(503, f"no healthy backend for route {route.name}")
            return
        if upgrade:
            attempt = UpgradeAttempt(
                head, backend=upstream.name, client=self._client, route=route.name
            )
            refusal = self._proxy.check_request(attempt, route)
            if refusal is not None:
                self._error(refusal.status, refusal.reason)
                return
        content = self._request.content
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read()
        if body:
            head = RequestHead(
                head.method,
                head.target,
                head.version,
                head.headers.plus([(b"Content-Length", b"%d" % len(body))]),
            )
        scheme = "https" if self._request.isSecure() else "http"
        forwarded = request_for_backend(
            head,
            ClientHop(self._client, scheme),
            upgrade=upgrade,
            framing=BodyKind.LENGTH if body else BodyKind.NONE,
            prefix=upstream.address.prefix,
        )
        self._request.notifyFinish().addErrback(self._client_gone)
        upstream.active += 1
        self._upstream = upstream
        d = upstream.pool.acquire()
        d.addCallbacks(
            self._send,
            self._unreachable,
            callbackArgs=(forwarded.serialize() + body,),
        )

    def _send(self, backend: BackendConnection, data: bytes) -> None:
        if self._done:
            backend.pool.release(backend)
            return
        self._backend = backend
        backend.send_request(data, self._head.method, self)

    def _unreachable(self, reason: Failure) -> None:
        upstream = self._upstream
        assert upstream is not None and self._route is not None
        why = describe_connect_failure(reason)
        self._route.group.connect_failed(upstream, why)
        self._error(502, f"the backend ({upstream.name}) could not be reached: {why}")

    def _release_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.active -= 1

    def _client_gone(self, reason: Failure) -> None:
        self._done = True
        self._release_upstream()
        if self._backend is not None:
            self._backend.abandon()

    def _error(self, status: int, reason: str) -> None:
        log.info(
            "{status} to {client}: {reason}", status=status, client=self._client, reason=reason
        )
        self._release_upstream()
        if self._done:
            return
        self._done = True
        request = self._request
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.write(reason.encode("utf-8") + b"\n")
        request.finish()

    # -- ResponseSink ---------------------------------------------------------------

    def cork(self) -> None:
        pass  # twisted.web's Request buffers for itself

    def uncork(self) -> None:
        pass

    def interim_response(self, head: ResponseHead) -> None:
        pass  # twisted.web has no way to send a 1xx

    def response_head(self, head: ResponseHead, framing: Framing) -> None:
        self._responded = True
        request = self._request
        request.setResponseCode(head.status, head.reason)
        headers = request.responseHeaders
        for name in (b"server", b"date"):  # twisted.web's own; the backend's win
            headers.removeHeader(name)
        for name, value in head.headers.end_to_end().without((b"via",)):
            headers.addRawHeader(name, value)
        headers.setRawHeaders(b"via", [b", ".join([*head.headers.get_all(b"via"), VIA])])
        if framing.kind is not BodyKind.NONE and self._backend is not None:
            request.registerProducer(self._backend.transport, True)

    def response_body(self, data: bytes) -> None:
        self._request.write(data)

    def response_end(self) -> None:
        self._done = True
        self._release_upstream()
        request = self._request
        if request.producer is not None:
            request.unregisterProducer()
            if self._backend is not None and self._backend.transport is not None:
                self._backend.transport.resumeProducing()  # type: ignore[attr-defined]
        request.finish()

    def switch_protocols(self, head: ResponseHead, early_data: bytes) -> None:
        backend, route, upstream = self._backend, self._route, self._upstream
        assert backend is not None and route is not None and upstream is not None
        attempt = UpgradeAttempt(self._head, head, True, upstream.name, self._client, route.name)
        refusal: Refusal | None = self._proxy.check_response(attempt, route)
        if refusal is not None:
            log_refused_switch(attempt, refusal, self._client)
            backend.abandon()
            self._error(502, refusal.reason)
            return
        self._done = True
        self._upstream = None  # busy until the tunnel ends
        client_side = _TunnelClientSide()
        detached = _twistedweb.detach(self._request, client_side)
        complete_switch(
            self._proxy,
            attempt,
            route=route,
            upstream=upstream,
            client=detached.transport,
            backend=backend,
            early_data=early_data,
            held=detached.held,
            attach=client_side.attach,
        )

    def backend_failed(self, failure: BackendFailure) -> None:
        if not self._responded:
            self._error(failure.status, failure.reason)
            return
        log.warn(
            "response to {client} cut short: {reason}", client=self._client, reason=failure.reason
        )
        self._done = True
        self._release_upstream()
        transport = self._request.channel.transport
        if transport is not None:
            transport.loseConnection()
