"""The protocol facing the client (server role).

A :class:`ClientConnection` owns its input buffer. It parses one request
head at a time and leaves every later byte in the buffer, unparsed, until it
knows who owns it: the request body goes to the backend as it is decoded;
anything after the body is either the next request (when the backend
answers with a final response) or the first bytes of a switched protocol
(when it answers ``101``), which are replayed into the backend in the same
reactor turn as the switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .accesslog import RequestRecord
from .backend import BackendConnection, BackendFailure
from .balancer import describe_connect_failure
from .flow import ReadGate, no_delay, send_now, unregister_producer
from .http1 import (
    LAST_CHUNK,
    BodyDecoder,
    BodyKind,
    Framing,
    ProtocolError,
    RequestHead,
    ResponseHead,
    encode_chunk,
    is_upgrade_request,
    parse_request_head,
    request_framing,
    request_keeps_alive,
)
from .interfaces import Refusal, UpgradeAttempt
from .rewrite import (
    ClientHop,
    error_response,
    interim_for_client,
    request_for_backend,
    response_for_client,
    split_target,
    without_h2c,
)
from .routing import Route, host_name
from .switch import complete_switch, log_refused_switch
from .tunnel import Side, Tunnel

if TYPE_CHECKING:
    from .balancer import Backend
    from .proxy import ProxyFactory

#: Seconds a refused client may go on sending before the proxy closes anyway.
LINGER_SECONDS = 2.0

# Reasons for which the client's reads are paused.
_BACKEND_FULL = "backend send buffer full"
_HOLDING = "holding early bytes"


@dataclass(slots=True)
class _Exchange:
    """One request from the client and the backend's answer to it."""

    request: RequestHead
    forwarded: RequestHead
    framing: Framing
    decoder: BodyDecoder
    upgrade: bool
    keep_alive: bool
    started: float
    route: Route
    #: The backend chosen for this request; it counts the request as active.
    upstream: Backend | None = None
    #: Backends whose connection failed for this request.
    tried: list[Backend] = field(default_factory=list)
    backend: BackendConnection | None = None
    attempts: int = 0
    body_bytes: int = 0
    #: The name of the backend that answered (or last tried), for the access log.
    backend_name: str = "-"
    body_done: bool = False
    response_kind: BodyKind | None = None
    status: int = 0
    response_bytes: int = 0


@implementer(IHalfCloseableProtocol)
class ClientConnection(Protocol):
    """One connection from a client."""

    log = Logger()

    def __init__(self, proxy: ProxyFactory) -> None:
        self._proxy = proxy
        self._settings = proxy.settings
        self._buf = bytearray()
        self._exchange: _Exchange | None = None
        self._tunnel: Tunnel | None = None
        self._closing = False
        self._read_eof = False
        self._gate: ReadGate
        self._hop: ClientHop
        self._head_timer: IDelayedCall | None = None
        # What the backend's answer wrote to the client in one read, sent as
        # one write when that read is done (see cork).
        self._out: list[bytes] | None = None
        # True while the head timer measures an idle keep-alive connection.
        self._idle = False
        self._linger: IDelayedCall | None = None
        # How much of the buffer was searched for a head end already.
        self._checked = 0
        # Bytes of empty lines dropped before the head now awaited.
        self._empty_lines = 0
        self.address = "unknown"

    # -- Twisted protocol events ---------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        no_delay(self.transport)
        self._gate = ReadGate(self.transport)
        peer = self.transport.getPeer()
        self.address = str(getattr(peer, "host", None) or peer)
        secure = ISSLTransport.providedBy(self.transport)
        self._hop = ClientHop(self.address, "https" if secure else self._proxy.scheme)
        proxy = self._proxy
        proxy.connection_opened(self)
        if proxy.over_connection_limit or proxy.draining:
            why = (
                "the proxy is shutting down"
                if proxy.draining
                else f"the proxy is serving its limit of {self._settings.max_connections} "
                "connections; try again later"
            )
            if not proxy.draining:
                proxy.stats.limit_rejections["max_connections"] += 1
            self._reject(503, why)
            return
        self._wait_for_head(self._settings.request_head_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.data(Side.CLIENT, data)
            return
        if self._closing:
            return
        self._buf += data
        self._advance()

    def readConnectionLost(self) -> None:
        if self._tunnel is not None:
            self._tunnel.read_closed(Side.CLIENT)
            return
        self._read_eof = True
        exchange = self._exchange
        if exchange is None or self._closing:
            self._close()
        elif exchange.backend is not None and not exchange.body_done:
            self._body_cut_short(exchange)
        # Otherwise the answer is still coming (and may be a switch, which
        # will carry this EOF into the tunnel), or the body still waits in the
        # buffer for its backend connection, which decides when it comes.

    def _body_cut_short(self, exchange: _Exchange) -> None:
        self.log.info(
            "client {client} closed its side before the end of the request body",
            client=self.address,
        )
        self._abandon_backend(exchange)
        self._end_exchange(exchange)
        self._close()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._stop_head_timer()
        self._stop_linger()
        if self._tunnel is not None:
            self._tunnel.lost(Side.CLIENT, reason)
        else:
            exchange = self._exchange
            if exchange is not None:
                self._abandon_backend(exchange)
                self._end_exchange(exchange)
        self._proxy.connection_closed(self)

    # -- reading requests ------------------------------------------------------

    def _advance(self) -> None:
        """Move the bytes in the buffer to whoever owns them now."""
        exchange = self._exchange
        if exchange is None:
            if self._closing or not self._buf:
                return
            self._drop_empty_lines()
            limit = self._settings.max_request_head
            try:
                # Empty lines already dropped count towards the head's size.
                parsed = parse_request_head(self._buf, 0, limit - self._empty_lines, self._checked)
            except ProtocolError as e:
                if e.status == 431:
                    e = ProtocolError(f"request head larger than {limit} bytes", 431)
                self._reject(e.status, e.reason)
                return
            if parsed is None:
                self._checked = len(self._buf)
                if self._idle and self._buf and self._head_timer is not None:
                    # A new head started on a kept-alive connection: from
                    # now on it is a head that must arrive in time.
                    self._idle = False
                    self._head_timer.reset(self._settings.request_head_timeout)
                return
            head, end = parsed
            del self._buf[:end]
            self._checked = 0
            self._empty_lines = 0
            self._stop_head_timer()
            exchange = self._begin(head)
            if exchange is None:
                return
        if exchange.backend is not None and not exchange.body_done:
            self._forward_body(exchange)
        self._limit_held_bytes()

    def _drop_empty_lines(self) -> None:
        """Discard empty lines before a request (RFC 9112 §2.2 lets a server ignore them).

        Done here, once, rather than by every parse attempt: a client that
        trickles empty lines would otherwise cost quadratic time.
        """
        buf = self._buf
        start = 0
        while buf.startswith(b"\r\n", start):
            start += 2
        if start:
            del buf[:start]
            self._checked = max(0, self._checked - start)
            self._empty_lines += start

    def _limit_held_bytes(self) -> None:
        """Stop reading while too many bytes wait for their owner.

        They are the bytes beyond the request in flight (the next request,
        or the first bytes of a switched protocol), or a body waiting for its
        backend connection. They are kept; only reading more waits.
        """
        if self._exchange is not None and len(self._buf) > self._settings.max_held_bytes:
            self._gate.pause(_HOLDING)
        else:
            self._gate.resume(_HOLDING)

    def _begin(self, head: RequestHead) -> _Exchange | None:
        """Start an exchange for ``head``, or refuse the request."""
        if head.method == b"CONNECT":
            self._reject(501, "CONNECT is not supported by this reverse proxy")
            return None
        proxy = self._proxy
        if not self._settings.forward_h2c:
            head = without_h2c(head)
        try:
            framing = request_framing(head)
            upgrade = is_upgrade_request(head)
            route = proxy.route_for(head)
        except ProtocolError as e:
            self._reject(e.status, e.reason)
            return None
        if route is None:
            self._reject(404, self._no_route(head), request=head)
            return None
        if upgrade and proxy.at_tunnel_limit:
            proxy.stats.limit_rejections["max_tunnels"] += 1
            self._reject(
                503,
                f"the proxy has its limit of {self._settings.max_tunnels} tunnels open; "
                "try again later",
                route=route,
                request=head,
            )
            return None
        limit = route.max_request_body
        if limit is not None and framing.kind is BodyKind.LENGTH and framing.length > limit:
            self._refuse_large_body(route, head, limit)
            return None
        upstream = route.group.choose(self.address)
        if upstream is None:
            self._no_backend(route, head)
            return None
        try:
            forwarded = request_for_backend(
                head,
                self._hop,
                upgrade=upgrade,
                framing=framing.kind,
                prefix=upstream.address.prefix,
            )
        except ProtocolError as e:
            self._reject(e.status, e.reason, route=route, request=head)
            return None
        if upgrade:
            refusal = proxy.check_request(
                UpgradeAttempt(head, backend=upstream.name, client=self.address, route=route.name),
                route,
            )
            if refusal is not None:
                self._reject(refusal.status, refusal.reason, route=route, request=head)
                return None
        upstream.active += 1
        exchange = _Exchange(
            request=head,
            forwarded=forwarded,
            framing=framing,
            decoder=framing.decoder(),
            upgrade=upgrade,
            keep_alive=request_keeps_alive(head) and not self._read_eof and not proxy.draining,
            started=proxy.clock.seconds(),
            route=route,
            upstream=upstream,
            backend_name=upstream.name,
        )
        self._exchange = exchange
        self._connect(exchange)
        return exchange

    def _no_route(self, head: RequestHead) -> str:
        path, authority = split_target(head.target)
        host = host_name(authority or head.headers.get(b"host")) or "(none)"
        return (
            f"no route serves host {host} and path {path.decode('latin-1')[:200]}; "
            "the proxy's configuration lists the hosts and paths it serves"
        )

    def _refuse_large_body(self, route: Route, head: RequestHead, limit: int) -> None:
        self._proxy.stats.limit_rejections["max_request_body"] += 1
        self._reject(
            413,
            f"the request body is larger than this route's limit of {limit} bytes",
            route=route,
            request=head,
        )

    def _no_backend(self, route: Route, head: RequestHead) -> None:
        self._proxy.stats.limit_rejections["no_healthy_backend"] += 1
        down = "; ".join(
            f"{b.name}: {b.last_error or 'down'}" for b in route.group.backends if not b.healthy
        )
        self._reject(
            503,
            f"no healthy backend for route {route.name}" + (f" ({down})" if down else ""),
            route=route,
            request=head,
        )

    def _connect(self, exchange: _Exchange) -> None:
        exchange.attempts += 1
        upstream = exchange.upstream
        assert upstream is not None
        pooled = upstream.pool.take_idle()
        if pooled is not None:
            self._backend_ready(pooled, exchange)
            return
        d = upstream.pool.connect()
        d.addCallbacks(
            self._backend_ready,
            self._backend_unreachable,
            callbackArgs=(exchange,),
            errbackArgs=(exchange, upstream),
        )
        d.addErrback(self._unexpected)

    def _backend_ready(self, backend: BackendConnection, exchange: _Exchange) -> None:
        upstream = exchange.upstream
        if exchange is not self._exchange or upstream is None:
            # The client went away while we were connecting.
            backend.pool.release(backend)
            return
        if not backend.reused:
            exchange.route.group.connect_succeeded(upstream)
        exchange.backend = backend
        backend.send_request(exchange.forwarded.serialize(), exchange.request.method, self)
        if not exchange.body_done:
            backend.transport.registerProducer(  # type: ignore[union-attr]
                self._gate.producer(_BACKEND_FULL), True
            )
            self._forward_body(exchange)
            self._limit_held_bytes()

    def _backend_unreachable(self, reason: Failure, exchange: _Exchange, upstream: Backend) -> None:
        """The connection to ``upstream`` failed: no byte of the request was sent.

        So the request may go to another backend of the route, if one is left.
        """
        why = describe_connect_failure(reason)
        group = exchange.route.group
        group.connect_failed(upstream, why)
        if exchange is not self._exchange:
            return
        self._release_upstream(exchange)
        exchange.tried.append(upstream)
        retry = group.choose(self.address, exchange.tried)
        if retry is not None:
            self.log.info(
                "retrying {method} {target} on {retry}: {failed} could not be reached ({why})",
                method=exchange.request.method.decode("latin-1"),
                target=exchange.request.target.decode("latin-1"),
                retry=retry.name,
                failed=upstream.name,
                why=why,
            )
            if retry.address.prefix != upstream.address.prefix:
                exchange.forwarded = request_for_backend(
                    exchange.request,
                    self._hop,
                    upgrade=exchange.upgrade,
                    framing=exchange.framing.kind,
                    prefix=retry.address.prefix,
                )
            retry.active += 1
            exchange.upstream = retry
            exchange.backend_name = retry.name
            self._connect(exchange)
            return
        self._reject(502, f"the backend ({upstream.name}) could not be reached: {why}")

    def _release_upstream(self, exchange: _Exchange) -> None:
        """The exchange no longer occupies its backend."""
        upstream = exchange.upstream
        if upstream is not None:
            exchange.upstream = None
            upstream.active -= 1

    def _unexpected(self, reason: Failure) -> None:
        self.log.failure("unexpected error in the proxy", reason)
        if self._tunnel is None:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _forward_body(self, exchange: _Exchange) -> None:
        backend = exchange.backend
        assert backend is not None
        try:
            chunks, used = exchange.decoder.decode(self._buf)
        except ProtocolError as e:
            self._abandon_backend(exchange)
            self._reject(e.status, f"malformed request body: {e.reason}")
            return
        del self._buf[:used]
        limit = exchange.route.max_request_body
        if limit is not None and chunks:
            exchange.body_bytes += sum(map(len, chunks))
            if exchange.body_bytes > limit:
                self._abandon_backend(exchange)
                self._refuse_large_body(exchange.route, exchange.request, limit)
                return
        chunked = exchange.framing.kind is BodyKind.CHUNKED
        for chunk in chunks:
            backend.send_body(encode_chunk(chunk) if chunked else chunk)
        if exchange.decoder.done:
            if chunked:
                backend.send_body(LAST_CHUNK)
            exchange.body_done = True
            unregister_producer(backend.transport)
            self._gate.resume(_BACKEND_FULL)
        elif self._read_eof:
            self._body_cut_short(exchange)

    # -- the backend's answer (ResponseSink) -------------------------------------

    def cork(self) -> None:
        """Hold what is written to the client until :meth:`uncork`."""
        if self._out is None:
            self._out = []

    def uncork(self) -> None:
        """Send what was held, at once (see :func:`~upgradeproxy.flow.send_now`)."""
        out, self._out = self._out, None
        if out:
            send_now(self.transport, out[0] if len(out) == 1 else b"".join(out))  # type: ignore[arg-type]

    def _send(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        else:
            send_now(self.transport, data)  # type: ignore[arg-type]

    def interim_response(self, head: ResponseHead) -> None:
        exchange = self._exchange
        # A 1xx must not be sent to an HTTP/1.0 client (RFC 9110 §15.2).
        if exchange is not None and exchange.request.version >= (1, 1):
            self._send(interim_for_client(head).serialize())

    def response_head(self, head: ResponseHead, framing: Framing) -> None:
        exchange = self._exchange
        assert exchange is not None and exchange.backend is not None
        kind = framing.kind
        if kind in (BodyKind.CHUNKED, BodyKind.CLOSE):
            kind = BodyKind.CHUNKED if exchange.request.version >= (1, 1) else BodyKind.CLOSE
        exchange.response_kind = kind
        exchange.status = head.status
        # A response that overtakes its request body ends the connection:
        # the rest of the body cannot be told from a next request.
        exchange.keep_alive = (
            exchange.keep_alive and exchange.body_done and kind is not BodyKind.CLOSE
        )
        out = response_for_client(
            head,
            framing=kind,
            keep_alive=exchange.keep_alive,
            client_version=exchange.request.version,
        )
        transport = self.transport
        assert transport is not None
        self._send(out.serialize())
        if kind is not BodyKind.NONE:
            transport.registerProducer(exchange.backend.transport, True)  # type: ignore[attr-defined]

    def response_body(self, data: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None
        exchange.response_bytes += len(data)
        if exchange.response_kind is BodyKind.CHUNKED:
            data = encode_chunk(data)
        self._send(data)

    def response_end(self) -> None:
        exchange = self._exchange
        assert exchange is not None
        transport = self.transport
        assert transport is not None
        if exchange.response_kind is BodyKind.CHUNKED:
            self._send(LAST_CHUNK)
        unregister_producer(transport)
        if exchange.backend is not None and exchange.backend.transport is not None:
            exchange.backend.transport.resumeProducing()  # type: ignore[attr-defined]
        self._log_access(exchange)
        self._end_exchange(exchange)
        if not exchange.keep_alive or self._read_eof or self._proxy.draining:
            self._close()
            return
        self._gate.resume(_HOLDING)
        self._wait_for_head(self._settings.keep_alive_timeout, idle=True)
        self._advance()

    # -- waiting for a request head ---------------------------------------------------

    def _wait_for_head(self, timeout: float, *, idle: bool = False) -> None:
        self._idle = idle
        self._head_timer = self._proxy.clock.callLater(timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._buf:
            self._reject(
                408,
                f"the request head did not arrive within "
                f"{self._settings.request_head_timeout:g} seconds",
            )
        else:
            # An idle keep-alive connection: closing it is routine.
            self._close()

    # -- shutdown ----------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a request is in flight on this connection."""
        return self._exchange is not None

    def drain(self) -> None:
        """The proxy is shutting down: close now if idle, else after the response."""
        exchange = self._exchange
        if self._tunnel is not None:
            return  # the proxy gives tunnels their grace period itself
        if exchange is None:
            self._close()
        else:
            exchange.keep_alive = False

    def abort(self) -> None:
        """Close at once, whatever is in flight."""
        self.transport.abortConnection()  # type: ignore[union-attr]

    def switch_protocols(self, head: ResponseHead, early_data: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None and exchange.backend is not None
        backend = exchange.backend
        upstream = exchange.upstream
        assert upstream is not None
        route = exchange.route
        attempt = UpgradeAttempt(
            exchange.request, head, exchange.body_done, upstream.name, self.address, route.name
        )
        refusal = self._proxy.check_response(attempt, route)
        if refusal is not None:
            self._refuse_switch(exchange, attempt, refusal)
            return
        held = bytes(self._buf)
        self._buf.clear()
        self._gate.resume_all()
        self._exchange = None
        # The backend stays busy for as long as the tunnel lives.
        exchange.upstream = None
        assert self.transport is not None
        self.uncork()  # a 1xx relayed before the switch goes first
        tunnel = complete_switch(
            self._proxy,
            attempt,
            route=route,
            upstream=upstream,
            client=self.transport,
            backend=backend,
            early_data=early_data,
            held=held,
            attach=self._attach,
        )
        if self._read_eof:
            tunnel.read_closed(Side.CLIENT)

    def _attach(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def _refuse_switch(
        self, exchange: _Exchange, attempt: UpgradeAttempt, refusal: Refusal
    ) -> None:
        log_refused_switch(attempt, refusal, self.address)
        self._abandon_backend(exchange)
        self._reject(502, refusal.reason, quiet=True)

    def backend_failed(self, failure: BackendFailure) -> None:
        exchange = self._exchange
        assert exchange is not None
        if (
            failure.retryable
            and exchange.attempts == 1
            and exchange.framing.kind is BodyKind.NONE
            and exchange.response_kind is None
        ):
            self.log.debug("retrying on a new backend connection: {reason}", reason=failure.reason)
            exchange.backend = None
            self._connect(exchange)
            return
        if exchange.response_kind is None:
            self._reject(failure.status, failure.reason)
            return
        # The response head is already out: there is no way to tell the
        # client but to cut the response short.
        self.log.warn(
            "response to {client} cut short: {reason}", client=self.address, reason=failure.reason
        )
        self._log_access(exchange)
        self._end_exchange(exchange)
        unregister_producer(self.transport)
        self._close()

    # -- endings -----------------------------------------------------------------

    def _reject(
        self,
        status: int,
        reason: str,
        *,
        quiet: bool = False,
        route: Route | None = None,
        request: RequestHead | None = None,
    ) -> None:
        """Answer with an error that says what went wrong, then close.

        ``route`` and ``request`` name what is refused when no exchange
        started yet, for the access log.
        """
        if not quiet:
            level = self.log.warn if status >= 500 else self.log.info
            level(
                "{status} to {client}: {reason}",
                status=status,
                client=self.address,
                reason=reason,
            )
        exchange = self._exchange
        transport = self.transport
        assert transport is not None
        unregister_producer(transport)
        if exchange is not None:
            self._end_exchange(exchange)
            if exchange.response_kind is not None:
                # A response is already on its way: an error response now
                # would be read as part of its body. Cutting it short is the
                # only honest signal left.
                self._log_access(exchange)
                self._close()
                return
            route, request = exchange.route, exchange.request
        response = error_response(
            status, reason, head_only=request is not None and request.method == b"HEAD"
        )
        if request is not None:
            self._log_request(request, route, status, len(response), exchange)
        self.uncork()
        transport.write(response)
        self._close_after_error()

    def _close(self) -> None:
        self.uncork()
        self._closing = True
        self._stop_linger()
        self._gate.resume_all()
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _close_after_error(self) -> None:
        """Close after an error response, without letting a reset destroy it.

        A client may still be sending (a huge head, a body) when it is
        refused. Closing a socket with unread input makes the kernel send a
        reset, which can discard the response before the client reads it. So
        on TCP the proxy ends its side, reads and drops what still comes for
        a short while, and closes on the client's EOF or when that time is up.
        """
        transport = self.transport
        if not ITCPTransport.providedBy(transport) or ISSLTransport.providedBy(transport):
            self._close()
            return
        self.uncork()
        self._closing = True
        self._gate.resume_all()
        transport.loseWriteConnection()
        self._linger = self._proxy.clock.callLater(LINGER_SECONDS, self._close)

    def _stop_linger(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None

    def _abandon_backend(self, exchange: _Exchange) -> None:
        backend = exchange.backend
        exchange.backend = None
        if backend is not None:
            backend.abandon()

    def _end_exchange(self, exchange: _Exchange) -> None:
        """``exchange`` is over: the connection and the backend are free of it."""
        if self._exchange is exchange:
            self._exchange = None
        self._release_upstream(exchange)

    def _log_access(self, exchange: _Exchange) -> None:
        self._log_request(
            exchange.request, exchange.route, exchange.status, exchange.response_bytes, exchange
        )

    def _log_request(
        self,
        request: RequestHead,
        route: Route | None,
        status: int,
        sent: int,
        exchange: _Exchange | None,
    ) -> None:
        proxy = self._proxy
        duration = proxy.clock.seconds() - exchange.started if exchange is not None else 0.0
        version = request.version
        proxy.request_done(
            route,
            RequestRecord(
                client=self.address,
                method=request.method.decode("latin-1"),
                target=request.target.decode("latin-1"),
                version=f"HTTP/{version[0]}.{version[1]}",
                status=status,
                bytes=sent,
                duration=duration,
                route=route.name if route is not None else "-",
                backend=exchange.backend_name if exchange is not None else "-",
            ),
        )
