"""The protocol facing a backend (client role), and the pool of its connections.

A :class:`BackendConnection` sends one request at a time, parses the
response head knowing the request method, and streams the body to a
:class:`ResponseSink` (the client side). When the backend answers ``101``,
the connection hands the sink every byte that followed the ``101`` head and
stops parsing for good.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._twisted import send_now, tcp_client_parts
from ..http1 import (
    BodyDecoder,
    BodyKind,
    Field,
    Framing,
    HeadReader,
    ProtocolError,
    ResponseHead,
    response_framing,
    response_keeps_alive,
)
from ._failures import describe_close
from ._flow import no_delay
from ._side import Side
from ._timers import cancel, rearm
from ._tunnel import Tunnel


@dataclass(frozen=True, slots=True)
class BackendFailure:
    """Why an exchange with the backend failed, in words for the client and the log.

    ``retryable`` is true when the request may safely be sent again on a new
    connection: the connection was reused from the pool and the backend sent
    nothing before it closed (it closed an idle connection as we reused it).
    """

    status: int
    reason: str
    retryable: bool = False


class ResponseSink(TypingProtocol):
    """What a backend connection reports to, for the exchange in progress."""

    def cork(self) -> None:
        """Hold what the next calls write to the client, until :meth:`uncork`."""

    def uncork(self) -> None:
        """Write what was held."""

    def interim_response(self, head: ResponseHead) -> None: ...

    def response_head(self, head: ResponseHead, framing: Framing) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_trailers(self, fields: tuple[Field, ...]) -> None:
        """The trailer fields a chunked response ended with; :meth:`response_end` follows."""

    def response_end(self) -> None:
        """The response is complete; the connection may already be back in the pool.

        A sink that made the connection the producer of its client must
        unregister it *and then resume it*: a slow client may have paused
        it, and a paused idle connection would never read again.
        """

    def switch_protocols(self, head: ResponseHead, early_data: bytes) -> None: ...

    def backend_failed(self, failure: BackendFailure) -> None: ...


#: What a backend that speaks only HTTP/2 on the port was told, and what to change.
SPEAKS_HTTP2 = (
    "the backend answered in HTTP/2: it speaks only HTTP/2 on that port, and the proxy "
    "speaks HTTP/1.1 to backends; point the backend URL at a port that serves HTTP/1.1, "
    "or enable HTTP/1.1 on the backend"
)

# RFC 9113 §3.4: the client's connection preface, and a frame header's parts.
_PREFACE = b"PRI * HTTP/2.0\r\n"
_FRAME_HEADER = 9
_SETTINGS = 0x04
_ACK = 0x01


def speaks_http2(data: bytes | bytearray) -> bool:
    """True when ``data``, the start of a backend's answer, is HTTP/2, not HTTP/1.x.

    An HTTP/2 server's first frame is SETTINGS (RFC 9113 §3.4): a
    ``PRI * HTTP/2.0`` request line, or such a frame on stream 0 whose length
    is a whole number of settings, is never the start of an HTTP/1.x response.
    """
    if data.startswith(_PREFACE):
        return True
    if len(data) < _FRAME_HEADER or data[3] != _SETTINGS or data[4] & ~_ACK:
        return False
    return data[5:9] == b"\0\0\0\0" and int.from_bytes(data[:3], "big") % 6 == 0


class _State(enum.Enum):
    IDLE = enum.auto()
    HEAD = enum.auto()
    BODY = enum.auto()
    SWITCHING = enum.auto()  # a 101 arrived; the client side decides
    TUNNEL = enum.auto()
    CLOSED = enum.auto()


@implementer(IHalfCloseableProtocol)
class BackendConnection(Protocol):
    """One connection to the backend, used by one exchange at a time."""

    log = Logger()

    def __init__(self, pool: BackendPool, header: bytes | None = None) -> None:
        """``header``: a PROXY protocol header, sent before anything else."""
        self.pool = pool
        #: The PROXY protocol header this connection began with: it serves
        #: only the client connection it names (None: any).
        self.owner = header
        self._settings = pool.settings
        self._buf = bytearray()
        self._state = _State.IDLE
        self._sink: ResponseSink | None = None
        self._method = b""
        self._decoder: BodyDecoder | None = None
        self._keep_alive = False
        # A request body is still to come: the connection must not be reused.
        self._body_pending = False
        # One timer for the connection's life: the response head's timeout
        # while a request waits, the idle timeout while pooled (see _time_up).
        self._timer: IDelayedCall | None = None
        self._tunnel: Tunnel | None = None
        self.reused = False
        self._received = False
        # Let go of at the switch: an idle tunnel keeps only what it uses.
        self._heads: HeadReader[ResponseHead] | None = HeadReader.responses(
            self._settings.max_response_head
        )
        # Set while a TLS connection waits for its handshake (see TLSBackendConnection).
        self._handshake: Deferred[BackendConnection] | None = None

    # -- used by the client side -------------------------------------------

    @property
    def is_idle(self) -> bool:
        """True while the connection is open and carries no exchange."""
        return self._state is _State.IDLE

    def send_request(
        self, head: bytes, method: bytes, sink: ResponseSink, *, body: bool = False
    ) -> None:
        """Write a request head and start waiting for the response head.

        ``body`` says a request body follows (:meth:`send_body`, then
        :meth:`end_body`): until it has ended, the connection is never reused.
        """
        self._sink = sink
        self._method = method
        self._body_pending = body
        self._state = _State.HEAD
        self._received = False
        self._set_timer(self._settings.response_timeout)
        send_now(self.transport, head)  # type: ignore[arg-type]

    def send_body(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def end_body(self) -> None:
        """The request body is complete."""
        self._body_pending = False

    def enter_tunnel(self, tunnel: Tunnel) -> None:
        """From now on every byte goes to ``tunnel``, unparsed."""
        self._state = _State.TUNNEL
        self._tunnel = tunnel
        self._sink = None
        self._heads = self._decoder = None

    def abandon(self) -> None:
        """The exchange is over on the client's side: drop this connection."""
        self._sink = None
        self._cancel_timer()
        self._state = _State.CLOSED
        self.transport.loseConnection()  # type: ignore[union-attr]

    # -- Twisted protocol events ---------------------------------------------

    #: Called with this connection once it is made (see ``_DirectConnection``).
    on_connected: Callable[[BackendConnection], object] | None = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        if self.owner is not None:
            # Below TLS would be right, but this is above it: TLS backends
            # are refused with send_proxy (see BackendGroup).
            send_now(self.transport, self.owner)  # type: ignore[arg-type]
        if self.on_connected is not None:
            connected, self.on_connected = self.on_connected, None
            connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.data(Side.BACKEND, data)
            return
        if self._state is _State.IDLE:
            self.log.info("backend sent bytes on an idle connection; closing it")
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._received = True
        self._buf += data
        # Whatever this read makes the client side write (a head and a body,
        # say) goes out as one write.
        sink = self._sink
        if sink is None:
            self._advance()
            return
        sink.cork()
        try:
            self._advance()
        finally:
            sink.uncork()

    def readConnectionLost(self) -> None:
        if self._tunnel is not None:
            self._tunnel.read_closed(Side.BACKEND)
            return
        self._ended("the backend closed the connection")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self.pool.forget(self)
        waiting, self._handshake = self._handshake, None
        if waiting is not None:
            self._state = _State.CLOSED
            waiting.errback(reason)
            return
        if self._tunnel is not None:
            self._state = _State.CLOSED
            self._tunnel.lost(Side.BACKEND, reason)
            return
        self._ended(f"the backend connection ended: {describe_close(reason)}")
        self._state = _State.CLOSED

    # -- internals -------------------------------------------------------------

    def _ended(self, why: str) -> None:
        """The backend's input is over; finish or fail the exchange in progress."""
        state = self._state
        if state is _State.BODY and self._decoder is not None:
            try:
                self._decoder.eof()
            except ProtocolError:
                self._fail(BackendFailure(502, f"{why} in the middle of the response body"))
            else:
                self._keep_alive = False
                self._finish()
        elif state is _State.HEAD:
            retryable = self.reused and not self._received
            reason = self._head_failure(f"{why} before sending a response head")
            self._fail(BackendFailure(502, reason, retryable))
        self._state = _State.CLOSED

    def _advance(self) -> None:
        while self._sink is not None:
            if self._state is _State.HEAD:
                if not self._parse_head():
                    return
            elif self._state is _State.BODY:
                assert self._decoder is not None
                try:
                    chunks, used = self._decoder.decode(self._buf)
                except ProtocolError as e:
                    self._fail(BackendFailure(502, f"malformed response body: {e.reason}"))
                    return
                del self._buf[:used]
                for chunk in chunks:
                    if self._sink is None:
                        return
                    self._sink.response_body(chunk)
                if not self._decoder.done:
                    return
                self._finish()
            else:
                return

    def _parse_head(self) -> bool:
        """Parse one response head; False when more bytes are needed or all is done."""
        try:
            heads = self._heads
            assert heads is not None, "no head is read after a switch"
            head = heads.read(self._buf)
        except ProtocolError as e:
            reason = self._head_failure(f"malformed response from the backend: {e.reason}")
            self._fail(BackendFailure(502, reason))
            return False
        if head is None:
            return False
        sink = self._sink
        assert sink is not None
        if head.status == 101:
            self._cancel_timer()
            early = bytes(self._buf)
            self._buf.clear()
            self._state = _State.SWITCHING
            sink.switch_protocols(head, early)
            return False
        if head.status < 200:
            self._set_timer(self._settings.response_timeout)
            sink.interim_response(head)
            return True
        # The timer runs on, doing nothing while the body comes: the pool sets
        # it again for the idle timeout, or the connection's end cancels it.
        try:
            framing = response_framing(head, self._method)
        except ProtocolError as e:
            self._fail(BackendFailure(502, f"malformed response from the backend: {e.reason}"))
            return False
        self._keep_alive = response_keeps_alive(head) and framing.kind is not BodyKind.CLOSE
        self._decoder = framing.decoder()
        self._state = _State.BODY
        sink.response_head(head, framing)
        return True

    def _head_failure(self, reason: str) -> str:
        """``reason``, unless what came instead of a head says better why there is none."""
        return SPEAKS_HTTP2 if speaks_http2(self._buf) else reason

    def _finish(self) -> None:
        sink = self._sink
        self._sink = None
        decoder, self._decoder = self._decoder, None
        # A response that overtook its request body leaves the backend
        # waiting for the rest: the next request on it would be read as body.
        if (
            self._keep_alive
            and not self._buf
            and not self._body_pending
            and self._state is not _State.CLOSED
        ):
            self._state = _State.IDLE
            self.pool.release(self)
        else:
            self._state = _State.CLOSED
            self.transport.loseConnection()  # type: ignore[union-attr]
        if sink is not None:
            if decoder is not None and decoder.trailers:
                sink.response_trailers(decoder.trailers)
            sink.response_end()

    def _fail(self, failure: BackendFailure) -> None:
        sink = self._sink
        self._sink = None
        self._cancel_timer()
        self._state = _State.CLOSED
        self.transport.loseConnection()  # type: ignore[union-attr]
        if sink is not None:
            sink.backend_failed(failure)

    def close_if_idle_for(self, seconds: float) -> None:
        """Close this pooled connection if it is still idle ``seconds`` from now."""
        self._set_timer(seconds)

    def _set_timer(self, seconds: float) -> None:
        self._timer = rearm(self.pool.clock, self._timer, seconds, self._time_up)

    def _cancel_timer(self) -> None:
        cancel(self._timer)
        self._timer = None

    def _time_up(self) -> None:
        self._timer = None
        if self._state is _State.HEAD:
            self._timed_out()
        elif self._state is _State.IDLE:
            self.pool.idle_too_long(self)

    def _timed_out(self) -> None:
        timeout = self._settings.response_timeout
        if speaks_http2(self._buf):
            failure = BackendFailure(502, SPEAKS_HTTP2)
        else:
            failure = BackendFailure(
                504, f"the backend sent no response head within {timeout:g} seconds"
            )
        self._fail(failure)
        self.transport.abortConnection()  # type: ignore[union-attr]


@implementer(IHandshakeListener)
class TLSBackendConnection(BackendConnection):
    """A backend connection over TLS, ready for requests once its handshake is done.

    A TLS endpoint reports the connection as made before the handshake; a
    failed handshake must count as a failed connection (no byte of a request
    sent), so that it is retried elsewhere and explained as such.

    A separate class because Twisted's endpoint wrapper, for a protocol that
    provides both ``IHalfCloseableProtocol`` and ``IHandshakeListener``, keeps
    only the last: plain TCP connections would lose their half-close.
    """

    _handshaken = False

    def wait_for_handshake(self) -> Deferred[BackendConnection]:
        """Fires with this connection once its handshake is done, or with why it failed."""
        if self._handshaken:
            return succeed(self)
        self._handshake = Deferred()
        return self._handshake

    def handshakeCompleted(self) -> None:
        self._handshaken = True
        waiting, self._handshake = self._handshake, None
        if waiting is not None:
            waiting.callback(self)


class _BackendConnectionFactory(Factory):
    noisy = False  # one log line per backend connection would drown the access log

    def __init__(self, pool: BackendPool, header: bytes | None = None) -> None:
        self.pool = pool
        self._header = header
        self._protocol = TLSBackendConnection if pool.tls else BackendConnection

    def buildProtocol(self, addr: object) -> BackendConnection:
        return self._protocol(self.pool, self._header)


class BackendPool:
    """Keep-alive connections to one backend, reused most recently used first.

    A connection that began with a PROXY protocol header told the backend
    who its client is, and so serves only that client connection (the
    header names its address and port, as HAProxy keeps such connections
    private): :meth:`take_idle` hands it only to a request with the same
    header, and at most one such connection per header is kept idle.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        settings: BackendSettings,
        *,
        tls: bool = False,
    ) -> None:
        """``tls``: connections are ready for requests only after their TLS handshake."""
        self.endpoint = endpoint
        self.tls = tls
        self.clock = clock
        self.settings = settings
        self._idle: list[BackendConnection] = []
        self._factory = _BackendConnectionFactory(self)
        self._direct = _DirectTCP.of(endpoint)
        # Set by retire(): a newer configuration has a pool of its own.
        self._retired = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def acquire(self) -> Deferred[BackendConnection]:
        """A connection ready for a request: an idle one, or a new one."""
        idle = self.take_idle()
        return succeed(idle) if idle is not None else self.connect()

    def take_idle(self, owner: bytes | None = None) -> BackendConnection | None:
        """The most recently used idle connection opened with ``owner``'s header, or None.

        The proxy asks this first, without a Deferred: reusing a connection
        is the common case, and it is synchronous.
        """
        if owner is not None:
            return self._take_owned(owner)
        while self._idle:
            connection = self._idle.pop()
            if connection.owner is not None:
                # Opened for one client before its route stopped sending the header.
                connection.transport.loseConnection()  # type: ignore[union-attr]
            elif connection.is_idle:
                connection.reused = True
                return connection
        return None

    def _take_owned(self, owner: bytes) -> BackendConnection | None:
        for index in range(len(self._idle) - 1, -1, -1):
            connection = self._idle[index]
            if connection.owner == owner and connection.is_idle:
                del self._idle[index]
                connection.reused = True
                return connection
        return None

    def connect(self, header: bytes | None = None) -> Deferred[BackendConnection]:
        """A new connection, ready for a request once it fires; ``header`` is sent first."""
        if self._direct is not None:
            connected: Deferred[BackendConnection] = Deferred()
            self._direct.connect(self, header, connected.callback, connected.errback)
            return connected
        factory = self._factory if header is None else _BackendConnectionFactory(self, header)
        # The factory builds only BackendConnection protocols.
        connecting: Deferred[TLSBackendConnection] = self.endpoint.connect(factory)  # type: ignore[assignment]
        if self.tls:
            return connecting.addCallback(TLSBackendConnection.wait_for_handshake)
        return connecting  # type: ignore[return-value]

    def open(
        self,
        ready: Callable[[BackendConnection], object],
        failed: Callable[[Failure], object],
        *,
        header: bytes | None = None,
    ) -> None:
        """Make a new connection (``header`` sent first, as for :meth:`connect`).

        ``ready`` is called with it, or ``failed`` with why not. Where the
        backend is plain TCP this costs no Deferred: an upgrade makes a
        connection every time, and the proxy asks this, not :meth:`connect`.
        """
        if self._direct is not None:
            self._direct.connect(self, header, ready, failed)
        else:
            self.connect(header).addCallbacks(ready, failed)

    def release(self, connection: BackendConnection) -> None:
        """``connection`` finished an exchange and may carry another."""
        owner = connection.owner
        if (
            self._retired
            or len(self._idle) >= self.settings.max_idle
            or (owner is not None and any(idle.owner == owner for idle in self._idle))
        ):
            connection.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._idle.append(connection)
        connection.close_if_idle_for(self.settings.idle_timeout)

    def idle_too_long(self, connection: BackendConnection) -> None:
        """``connection``'s idle timeout ran out: close it, unless it was taken meanwhile."""
        if connection in self._idle:
            connection.transport.loseConnection()  # type: ignore[union-attr]

    def forget(self, connection: BackendConnection) -> None:
        """``connection`` closed; never hand it out again."""
        if connection in self._idle:
            self._idle.remove(connection)

    def close_idle(self) -> None:
        """Close every idle connection (at shutdown)."""
        for connection in list(self._idle):
            connection.transport.loseConnection()  # type: ignore[union-attr]

    def retire(self) -> None:
        """A reload replaced this pool: close its idle connections, and each busy one when done.

        Connections in a tunnel are not the pool's any more; they live on.
        """
        self._retired = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.transport.loseConnection()  # type: ignore[union-attr]


class _DirectTCP:
    """Connects straight with ``connectTCP`` where a plain TCP endpoint was given.

    Twisted's TCP endpoints put a wrapping protocol between the transport and
    ours, which costs a call on every read and a Deferred on every connect:
    a real share of a new connection's cost, paid on every upgrade.
    """

    def __init__(self, reactor: Any, host: str, port: int, timeout: float, bind: Any) -> None:
        self._reactor = reactor
        self._host, self._port, self._timeout, self._bind = host, port, timeout, bind

    @classmethod
    def of(cls, endpoint: IStreamClientEndpoint) -> _DirectTCP | None:
        parts = tcp_client_parts(endpoint)
        if parts is None:
            return None
        return cls(parts.reactor, parts.host, parts.port, parts.timeout, parts.bind)

    def connect(
        self,
        pool: BackendPool,
        header: bytes | None,
        ready: Callable[[BackendConnection], object],
        failed: Callable[[Failure], object],
    ) -> None:
        factory = _DirectConnection(pool, header, ready, failed)
        self._reactor.connectTCP(
            self._host, self._port, factory, timeout=self._timeout, bindAddress=self._bind
        )


class _DirectConnection(ClientFactory):
    """One connection attempt: calls ``ready`` with the protocol, or ``failed`` with why not."""

    noisy = False

    def __init__(
        self,
        pool: BackendPool,
        header: bytes | None,
        ready: Callable[[BackendConnection], object],
        failed: Callable[[Failure], object],
    ) -> None:
        self._pool = pool
        self._header = header
        self._ready: Callable[[BackendConnection], object] | None = ready
        self._failed: Callable[[Failure], object] | None = failed

    def buildProtocol(self, addr: object) -> BackendConnection:
        connection = BackendConnection(self._pool, self._header)
        connection.on_connected = self._connected
        return connection

    def _connected(self, connection: BackendConnection) -> None:
        # The connector keeps this factory for the connection's life: keep
        # nothing more in it than needed.
        ready = self._ready
        self._ready = self._failed = None
        assert ready is not None
        ready(connection)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        failed = self._failed
        self._ready = self._failed = None
        if failed is not None:
            failed(reason)


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """Limits on the backend side of the proxy."""

    response_timeout: float = 60.0
    max_response_head: int = 64 * 1024
    max_idle: int = 256
    idle_timeout: float = 60.0
