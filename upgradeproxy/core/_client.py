"""The HTTP/1.1 front door: the protocol facing a listening proxy's clients.

A :class:`ClientConnection` owns the wire: its input buffer, the request
head reader, request body decoding, response re-framing for this client,
timers, and the linger after an error. It parses one request head at a time
and leaves every later byte in the buffer, unparsed, until it knows who owns
it: the request body goes to the backend as it is decoded; anything after
the body is either the next request (when the backend answers with a final
response) or the first bytes of a switched protocol (when it answers
``101``), which are replayed into the backend in the same reactor turn as
the switch.

The rules of each request live in its :class:`~upgradeproxy.core._exchange.Exchange`;
this module only carries them out on an HTTP/1.1 connection.
"""

from __future__ import annotations

import enum

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._twisted import send_now, switch_protocol
from ..http1 import (
    LAST_CHUNK,
    BodyDecoder,
    BodyKind,
    Field,
    Framing,
    HeadReader,
    ProtocolError,
    RequestHead,
    ResponseHead,
    encode_chunk,
    request_keeps_alive,
)
from ._backend import BackendConnection
from ._exchange import Exchange, log_error_response
from ._flow import ReadGate, no_delay, unregister_producer
from ._handover import Handover
from ._http2 import HTTP2Connection
from ._rewrite import (
    ClientHop,
    client_hop,
    error_body,
    error_response,
    interim_for_client,
    response_for_client,
    switch_for_client,
)
from ._side import Side
from ._timers import cancel, rearm
from ._tunnel import Tunnel
from .proxy import LimitRefusal, Proxy
from .tls import H2

# Reasons for which the client's reads are paused.
_BACKEND_FULL = "backend send buffer full"
_HOLDING = "holding early bytes"


class Phase(enum.Enum):
    """Where a client connection is in its life."""

    #: Waiting for a request head (a new connection, or kept alive between requests).
    HEAD = "head"
    #: A request is in flight: its exchange owns what happens next.
    EXCHANGE = "exchange"
    #: Switched: every byte goes through the tunnel, and there is no HTTP any more.
    TUNNEL = "tunnel"
    #: Closing (perhaps lingering after an error response): input is dropped.
    CLOSING = "closing"


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class ClientConnection(Protocol):
    """One HTTP/1.1 connection from a client."""

    log = Logger()
    protocol = "HTTP/1.1"
    #: Why a TLS connection is refused, until its handshake says in which protocol.
    _refusal: LimitRefusal | None = None
    # The backend transport to register as this one's producer when the held
    # writes go out, if the response body goes on past that read. A class
    # default: a connection that only ever switches never stores one.
    _body_source: object | None = None

    def __init__(self, proxy: Proxy, peer: object | None = None) -> None:
        """``peer`` is the client's address, as the factory was given it (a
        :class:`~upgradeproxy.core._proxyheader.ProxiedAddress` behind a load
        balancer); None: the transport's peer."""
        self._proxy = proxy
        self._peer = peer
        self._settings = proxy.settings
        self._phase = Phase.HEAD
        self._buf = bytearray()
        self._exchange: Exchange | None = None
        self._decoder: BodyDecoder | None = None
        self._keep_alive = False
        self._chunked_response = False
        self._tunnel: Tunnel | None = None
        self._read_eof = False
        self._gate: ReadGate
        self.hop: ClientHop
        self._head_timer: IDelayedCall | None = None
        # What the backend's answer wrote to the client in one read, sent as
        # one write when that read is done (see cork).
        self._out: list[bytes] | None = None
        # True while the head timer measures an idle keep-alive connection.
        self._idle = False
        self._linger: IDelayedCall | None = None
        # Let go of at the switch: an idle tunnel keeps only what it uses.
        self._heads: HeadReader[RequestHead] | None = HeadReader.requests(
            self._settings.max_request_head
        )
        self.address = "unknown"
        # True from a TLS connection's start to the end of its handshake.
        self._handshaking = False

    # -- Twisted protocol events ---------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        no_delay(self.transport)
        self._gate = ReadGate(self.transport)
        peer = self._peer or self.transport.getPeer()
        self._peer = None
        secure = ISSLTransport.providedBy(self.transport)
        self._handshaking = secure
        self.hop = client_hop(
            peer, self.transport.getHost(), secure=secure, scheme=self._proxy.scheme
        )
        self.address = self.hop.address
        refusal = self._proxy.connection_opened(self)
        if refusal is not None and not secure:
            self._refuse(refusal)
            return
        # Over TLS, a refusal waits for the handshake: ALPN says whether it
        # must be answered in HTTP/2. The head timer bounds the wait.
        self._refusal = refusal
        self._wait_for_head(self._settings.request_head_timeout)

    def dataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase is Phase.TUNNEL:
            self._tunnel.data(Side.CLIENT, data)  # type: ignore[union-attr]
        elif phase is not Phase.CLOSING:
            self._buf += data
            self._advance()

    def readConnectionLost(self) -> None:
        if self._tunnel is not None:
            self._tunnel.read_closed(Side.CLIENT)
            return
        self._read_eof = True
        exchange = self._exchange
        if exchange is None:
            self._close()
        elif exchange.backend is not None and not exchange.body_done:
            self._body_cut_short(exchange)
        # Otherwise the answer is still coming (and may be a switch, which
        # will carry this EOF into the tunnel), or the body still waits in the
        # buffer for its backend connection, which decides when it comes.

    def writeConnectionLost(self) -> None:
        pass

    def handshakeCompleted(self) -> None:
        self._handshaking = False
        refusal, self._refusal = self._refusal, None
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated == H2 and self._phase is Phase.HEAD:
            self._become_http2(refusal)
        elif refusal is not None:
            self._refuse(refusal)

    def _become_http2(self, refusal: LimitRefusal | None) -> None:
        """The client chose ``h2`` over ALPN: the HTTP/2 door serves this connection."""
        self._stop_head_timer()
        self._phase = Phase.CLOSING
        received = bytes(self._buf)
        self._buf.clear()
        connection = HTTP2Connection(self._proxy, self.hop.peer)
        connection.replace(self, refusal)
        switch_protocol(self.transport, connection, received)  # type: ignore[arg-type]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._phase = Phase.CLOSING
        self._stop_head_timer()
        self._stop_linger()
        if self._handshaking:
            self._proxy.tls_failures.failed(self.address, reason)
        if self._tunnel is not None:
            self._tunnel.lost(Side.CLIENT, reason)
        elif self._exchange is not None:
            self._exchange.client_gone()
            self._exchange = None
        self._proxy.connection_closed(self)

    # -- reading requests ------------------------------------------------------

    def _advance(self) -> None:
        """Move the bytes in the buffer to whoever owns them now."""
        exchange = self._exchange
        if exchange is None:
            if self._phase is not Phase.HEAD or not self._buf:
                return
            exchange = self._read_head()
            if exchange is None:
                return
        if exchange.backend is not None and not exchange.body_done:
            self._forward_body(exchange)
        self._limit_held_bytes()

    def _read_head(self) -> Exchange | None:
        """Parse a request head from the buffer and start its exchange."""
        try:
            heads = self._heads
            assert heads is not None, "no head is read after a switch"
            head = heads.read(self._buf)
        except ProtocolError as e:
            self._refuse_connection(e.status, e.reason)
            return None
        if head is None:
            if self._idle and self._buf and self._head_timer is not None:
                # A new head started on a kept-alive connection: from now on
                # it is a head that must arrive in time.
                self._idle = False
                self._head_timer.reset(self._settings.request_head_timeout)
            return None
        # The head timer is left to run: it does nothing outside the HEAD
        # phase, and is set again for the next head (see _wait_for_head).
        exchange = Exchange.start(self._proxy, self, head)
        if exchange is None:
            return None
        self._phase = Phase.EXCHANGE
        self._exchange = exchange
        self._decoder = exchange.framing.decoder()
        self._keep_alive = (
            request_keeps_alive(head) and not self._read_eof and not self._proxy.draining
        )
        exchange.connect()
        return None if exchange.ended else exchange

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

    # -- the request body -----------------------------------------------------------

    def body_wanted(self, exchange: Exchange, backend: BackendConnection) -> None:
        backend.transport.registerProducer(  # type: ignore[union-attr]
            self._gate.producer(_BACKEND_FULL), True
        )
        if exchange is self._exchange:
            self._forward_body(exchange)
            self._limit_held_bytes()

    def _forward_body(self, exchange: Exchange) -> None:
        decoder = self._decoder
        assert decoder is not None
        try:
            chunks, used = decoder.decode(self._buf)
        except ProtocolError as e:
            exchange.abandon_backend()
            exchange.refuse(e.status, f"malformed request body: {e.reason}")
            return
        del self._buf[:used]
        if chunks and not exchange.body_data(chunks):
            return
        if decoder.done:
            exchange.body_end()
            backend = exchange.backend
            assert backend is not None
            unregister_producer(backend.transport)
            self._gate.resume(_BACKEND_FULL)
        elif self._read_eof:
            self._body_cut_short(exchange)

    def _body_cut_short(self, exchange: Exchange) -> None:
        self.log.info(
            "client {client} closed its side before the end of the request body",
            client=self.address,
        )
        exchange.client_gone()
        self._exchange = None
        self._close()

    # -- the backend's answer (ClientSide) -------------------------------------------

    def cork(self) -> None:
        """Hold what is written to the client until :meth:`uncork`."""
        if self._out is None:
            self._out = []

    def uncork(self) -> None:
        """Send what was held, at once (see :func:`~upgradeproxy._twisted.send_now`)."""
        out, self._out = self._out, None
        source = self._body_source
        if source is not None:
            self._body_source = None
            self.transport.registerProducer(source, True)  # type: ignore[union-attr]
        if out:
            send_now(self.transport, out[0] if len(out) == 1 else b"".join(out))  # type: ignore[arg-type]

    def _send(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        else:
            send_now(self.transport, data)  # type: ignore[arg-type]

    def send_interim(self, head: ResponseHead) -> None:
        exchange = self._exchange
        # A 1xx must not be sent to an HTTP/1.0 client (RFC 9110 §15.2).
        if exchange is not None and exchange.request.version >= (1, 1):
            self._send(interim_for_client(head).serialize())

    def send_head(self, exchange: Exchange, head: ResponseHead, framing: Framing) -> None:
        kind = framing.kind
        version = exchange.request.version
        if kind in (BodyKind.CHUNKED, BodyKind.CLOSE):
            kind = BodyKind.CHUNKED if version >= (1, 1) else BodyKind.CLOSE
        self._chunked_response = kind is BodyKind.CHUNKED
        # A response that overtakes its request body ends the connection:
        # the rest of the body cannot be told from a next request.
        self._keep_alive = self._keep_alive and exchange.body_done and kind is not BodyKind.CLOSE
        out = response_for_client(
            head, framing=kind, keep_alive=self._keep_alive, client_version=version
        )
        self._send(out.serialize())
        if kind is not BodyKind.NONE:
            backend = exchange.backend
            assert backend is not None
            if self._out is None:
                self.transport.registerProducer(backend.transport, True)  # type: ignore[union-attr]
            else:
                # Registered when this read's writes go out (uncork), unless the
                # whole body came in the same read: it then needs no flow control.
                self._body_source = backend.transport

    def send_body(self, data: bytes) -> None:
        self._send(encode_chunk(data) if self._chunked_response else data)

    def send_trailers(self, fields: tuple[Field, ...]) -> None:
        pass  # dropped: the response is re-framed for this client, trailers are not kept

    def send_end(self, exchange: Exchange) -> None:
        if self._chunked_response:
            self._send(LAST_CHUNK)
        if self._body_source is not None:
            self._body_source = None  # never registered: nothing to undo
        else:
            unregister_producer(self.transport)
            backend = exchange.backend
            if backend is not None and backend.transport is not None:
                # It may have been paused as this transport's producer.
                backend.transport.resumeProducing()  # type: ignore[attr-defined]
        self._exchange = None
        if not self._keep_alive or self._read_eof or self._proxy.draining:
            self._close()
            return
        self._phase = Phase.HEAD
        self._gate.resume(_HOLDING)
        self._wait_for_head(self._settings.keep_alive_timeout, idle=True)
        self._advance()

    def refuse(
        self, exchange: Exchange | None, status: int, reason: str, *, retry_after: int | None = None
    ) -> int:
        request = exchange.request if exchange is not None else None
        self._exchange = None
        self._stop_body_flow()
        head_only = request is not None and request.method == b"HEAD"
        self.uncork()
        response = error_response(status, reason, head_only=head_only, retry_after=retry_after)
        self.transport.write(response)  # type: ignore[union-attr]
        self._close_after_error()
        return 0 if head_only else len(error_body(reason))

    def cut_short(self) -> None:
        self._exchange = None
        self._stop_body_flow()
        self._close()

    def _stop_body_flow(self) -> None:
        """The response body stops: the backend is no longer this transport's producer."""
        self._body_source = None
        unregister_producer(self.transport)

    def hand_over(self, response: ResponseHead) -> Handover:
        self._stop_head_timer()
        held = bytes(self._buf)
        self._buf.clear()
        self._heads = self._decoder = None
        self._gate.resume_all()
        self._exchange = None
        self.uncork()  # a 1xx relayed before the switch goes first
        assert self.transport is not None
        # At once: a spliced tunnel would otherwise take it back out of the
        # transport's buffer to send it itself.
        send_now(self.transport, switch_for_client(response).serialize())
        return Handover(self.transport, held, self._read_eof)

    def attach(self, tunnel: Tunnel) -> None:
        self._phase = Phase.TUNNEL
        self._tunnel = tunnel
        # What only HTTP uses goes with it: an idle tunnel would keep the
        # forwarding details (and two address objects) and the read gate for
        # its whole life.
        del self.hop, self._gate

    # -- waiting for a request head ---------------------------------------------------

    def _wait_for_head(self, timeout: float, *, idle: bool = False) -> None:
        self._idle = idle
        # The timer of the last head, if it still runs, is moved.
        self._head_timer = rearm(self._proxy.clock, self._head_timer, timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        cancel(self._head_timer)
        self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._phase is not Phase.HEAD:
            return  # a request was in flight, or the connection is closing
        if self._buf:
            self._refuse_connection(
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
        if self._phase in (Phase.HEAD, Phase.CLOSING):
            self._close()  # idle, or lingering after an error: nothing is lost
        elif self._phase is Phase.EXCHANGE:
            self._keep_alive = False
        # A tunnel gets its grace period from the proxy itself.

    def abort(self) -> None:
        """Close at once, whatever is in flight."""
        self.transport.abortConnection()  # type: ignore[union-attr]

    # -- endings -----------------------------------------------------------------

    def _refuse(self, refusal: LimitRefusal) -> None:
        """Refuse the connection for a limit, before any request was read."""
        self._refuse_connection(
            refusal.status, refusal.reason, retry_after=refusal.retry_after, logged=refusal.logged
        )

    def _refuse_connection(
        self, status: int, reason: str, *, retry_after: int | None = None, logged: bool = False
    ) -> None:
        """Refuse what came before any request could be read (a bad head, a limit)."""
        self._stop_head_timer()
        if not logged:
            log_error_response(status, self.address, reason)
        self.refuse(None, status, reason, retry_after=retry_after)

    def _close(self) -> None:
        self.uncork()
        self._phase = Phase.CLOSING
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
        linger = self._settings.error_linger
        if (
            not linger
            or not ITCPTransport.providedBy(transport)
            or ISSLTransport.providedBy(transport)
        ):
            self._close()
            return
        self._phase = Phase.CLOSING
        self._gate.resume_all()
        transport.loseWriteConnection()
        self._linger = self._proxy.clock.callLater(linger, self._close)

    def _stop_linger(self) -> None:
        cancel(self._linger)
        self._linger = None
