"""One HTTP/2 stream: the exchange's client side, and the tunnel's transport.

An :class:`H2Stream` is the :class:`~upgradeproxy.core._exchange.ClientSide`
of one request on an HTTP/2 connection (:mod:`upgradeproxy.core._http2`,
its :class:`StreamOwner`). It holds the client's DATA until the backend
connection takes it, acknowledging it (giving its window back) only then;
it sends the response within the client's window, pausing the backend
connection while the rest waits; and it resets the stream whose window
stays shut for ``http2_stall_timeout``.

After an extended CONNECT is accepted, its :class:`StreamTransport` is the
client side of an ordinary :class:`~upgradeproxy.core._tunnel.Tunnel`: DATA
is tunnel bytes, END_STREAM a half-close, RST_STREAM a reset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any
from typing import Protocol as TypingProtocol

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError
from twisted.internet import error
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProducer,
    IPushProducer,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..http1 import BodyKind, Field, Framing, ResponseHead
from ._backend import BackendConnection
from ._exchange import Exchange, refuse_request
from ._flow import unregister_producer
from ._h2heads import (
    Malformed,
    StreamRequest,
    error_fields,
    response_fields,
    trailer_fields,
    tunnel_fields,
)
from ._handover import Handover
from ._rewrite import ClientHop, error_body
from ._side import Side
from ._timers import cancel
from ._tunnel import Tunnel
from .proxy import Proxy, ProxySettings

# Why a stream's producer (the backend connection) is paused: bits of one int.
#: The client's window for the stream is shut.
WINDOW_SHUT = 1
#: The client connection's own send buffer is full.
CLIENT_FULL = 2


def code_name(code: object) -> str:
    """An HTTP/2 error code as the log shows it."""
    return code.name if isinstance(code, ErrorCodes) else str(code)


class StreamOwner(TypingProtocol):
    """What a stream needs of the HTTP/2 connection it belongs to."""

    proxy: Proxy
    settings: ProxySettings
    #: The client's address and hop, as for an HTTP/1.1 connection.
    address: str
    hop: ClientHop
    #: The client connection's transport (None once it is gone).
    transport: ITransport | None
    #: True while the client connection's transport pauses its producer.
    paused: bool
    #: Above zero, frames are held until the count is back to zero.
    corked: int

    @property
    def h2(self) -> H2Connection:
        """The connection's state machine."""

    def flush(self) -> None:
        """Write the frames the state machine holds."""

    def stream_closed(self, stream: H2Stream) -> None:
        """``stream`` is over, both ways."""


class H2Stream:
    """One stream: the exchange's client side, on an HTTP/2 connection."""

    log = Logger()
    protocol = "HTTP/2"

    def __init__(self, connection: StreamOwner, stream_id: int) -> None:
        self._conn = connection
        self._h2 = connection.h2
        self.id = stream_id
        self.address = connection.address
        self.hop = connection.hop
        self._exchange: Exchange | None = None
        self._tunnel: Tunnel | None = None
        self._transport: StreamTransport | None = None
        #: Client bytes nobody took yet (a body before its backend connection is
        #: ready, a tunnel's first bytes), and their flow-controlled size.
        self._held: list[bytes] = []
        self._held_size = 0
        #: The connection the request body goes to, once it wants it.
        self._body_to: BackendConnection | None = None
        #: Flow-controlled bytes taken but not yet acknowledged (the backend is full).
        self._unacked = 0
        self.reads_paused = False
        #: What feeds this stream's output (a backend connection), and why it is paused.
        self._producer: IPushProducer | None = None
        self._pausing = CLIENT_FULL if connection.paused else 0
        #: Output waiting for the client's window.
        self._out = bytearray()
        #: Bytes of a response body of known length not yet given to ``h2``:
        #: its last DATA frame carries END_STREAM (None: another framing).
        self._unsent: int | None = None
        self._stall_timer: IDelayedCall | None = None
        self.client_done = False
        self._local_done = False
        self._end_pending = False
        #: Reset the stream once its output ended, if the client's side is still
        #: open, with this code.
        self._then_reset = False
        self._reset_code = ErrorCodes.NO_ERROR
        self._closed = False
        #: The response's trailer fields, sent with END_STREAM.
        self._trailers: list[Field] = []

    @property
    def in_flight(self) -> bool:
        exchange = self._exchange
        return exchange is not None and not exchange.ended

    # -- the request ------------------------------------------------------------------

    def start(self, parsed: StreamRequest | Malformed, ended: bool) -> None:
        self.client_done = ended
        if isinstance(parsed, Malformed):
            # RFC 9113 §8.1.1: a stream error; the response says why first.
            self._then_reset = True
            self._reset_code = ErrorCodes.PROTOCOL_ERROR
            refuse_request(self._conn.proxy, self, None, None, parsed.status, parsed.reason)
            return
        exchange = Exchange.start(self._conn.proxy, self, parsed.head)
        if exchange is None:
            return
        self._exchange = exchange
        exchange.connect()

    def data(self, data: bytes, size: int) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.data(Side.CLIENT, data)
            self._taken(size)
            return
        exchange = self._exchange
        if exchange is None or exchange.ended:
            self._acknowledge(size)  # answered already: dropped
            return
        if self._body_to is None:
            if data:
                self._held.append(data)
            self._held_size += size
            return
        if data and not exchange.body_data((data,)):
            self._acknowledge(size)  # refused: dropped
            return
        self._taken(size)

    def client_ended(self) -> None:
        self.client_done = True
        if self._tunnel is not None:
            self._tunnel.read_closed(Side.CLIENT)
        else:
            exchange = self._exchange
            if exchange is not None and not exchange.ended and self._body_to is not None:
                self._body_complete(exchange)
        self._maybe_closed()

    def reset_by_client(self, code: object) -> None:
        self._closed_by(f"the client reset the stream ({code_name(code)})")

    def _taken(self, size: int) -> None:
        """``size`` flow-controlled bytes went on: acknowledge them, unless the backend is full."""
        if self.reads_paused:
            self._unacked += size
        else:
            self._acknowledge(size)

    def _acknowledge(self, size: int) -> None:
        # Of a closed stream too: the connection's window is given back.
        if size:
            self._h2.acknowledge_received_data(size, self.id)
            self._conn.flush()

    def pause_reads(self) -> None:
        """The backend's send buffer is full: the client's window stays shut."""
        self.reads_paused = True

    def resume_reads(self) -> None:
        self.reads_paused = False
        size, self._unacked = self._unacked, 0
        self._acknowledge(size)

    # -- ClientSide: the request body --------------------------------------------------------

    def body_wanted(self, exchange: Exchange, backend: BackendConnection) -> None:
        self._body_to = backend
        backend.transport.registerProducer(self._stream_transport(), True)  # type: ignore[union-attr]
        held, size = self._held, self._held_size
        self._held, self._held_size = [], 0
        if held and not exchange.body_data(held):
            self._acknowledge(size)  # refused: dropped
            return
        self._taken(size)
        if self.client_done:
            self._body_complete(exchange)

    def _body_complete(self, exchange: Exchange) -> None:
        if exchange.body_done:
            return
        exchange.body_end()
        backend = self._body_to
        if backend is not None:
            unregister_producer(backend.transport)
        self.resume_reads()

    # -- ClientSide: the answer ----------------------------------------------------------------

    def cork(self) -> None:
        self._conn.corked += 1

    def uncork(self) -> None:
        self._conn.corked -= 1
        self._conn.flush()

    def send_interim(self, head: ResponseHead) -> None:
        if not self._closed:
            self._headers(response_fields(head))
            self._conn.flush()

    def _headers(self, fields: list[tuple[bytes, bytes]], *, end: bool = False) -> None:
        # The client may have reset the stream in the read being handled:
        # h2 knows, and the reset's event, handled next, ends the stream.
        # (A try costs nothing unless it raises; contextlib.suppress is three
        # calls on every response.)
        try:  # noqa: SIM105
            self._h2.send_headers(self.id, fields, end_stream=end)
        except StreamClosedError:
            pass

    def send_head(self, exchange: Exchange, head: ResponseHead, framing: Framing) -> None:
        if self._closed:
            return
        body = framing.kind is not BodyKind.NONE
        self._headers(response_fields(head), end=not body)
        if body:
            if framing.kind is BodyKind.LENGTH:
                self._unsent = framing.length
            backend = exchange.backend
            assert backend is not None
            self._set_producer(backend.transport)  # type: ignore[arg-type]
        else:
            self._local_done = True
        self._conn.flush()

    def send_body(self, data: bytes) -> None:
        self.write(data)

    def send_trailers(self, fields: tuple[Field, ...]) -> None:
        self._trailers = trailer_fields(fields)

    def send_end(self, exchange: Exchange) -> None:
        self._exchange = None
        self._producer = None  # the exchange resumes its backend connection itself
        self._end_output(reset=True)

    def refuse(
        self, exchange: Exchange | None, status: int, reason: str, *, retry_after: int | None = None
    ) -> int:
        self._exchange = None
        self._producer = None
        self._held, size, self._held_size = [], self._held_size, 0
        self._acknowledge(size)  # what was held is dropped
        if self._closed or self._local_done:
            return 0
        body = error_body(reason)
        head_only = exchange is not None and exchange.request.method == b"HEAD"
        self._headers(error_fields(status, len(body), retry_after))
        if not head_only:
            self.write(body)
        self._end_output(reset=True)
        return 0 if head_only else len(body)

    def cut_short(self) -> None:
        self._exchange = None
        self._reset(ErrorCodes.INTERNAL_ERROR, "the response was cut short")

    def hand_over(self, response: ResponseHead) -> Handover:
        self._exchange = None
        self._headers(tunnel_fields(response))
        self._conn.flush()
        held = b"".join(self._held)
        self._held = []
        return Handover(self._stream_transport(), held, self.client_done)

    def attach(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel
        size, self._held_size = self._held_size, 0
        self._taken(size)

    def abort(self) -> None:
        self._reset(ErrorCodes.INTERNAL_ERROR, "the proxy failed")

    # -- output, within the client's window -------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closed or self._local_done or self._end_pending:
            return
        if self._out:
            self._out += data
            return
        sent = self._send(data)
        if sent < len(data):
            self._out += data[sent:]
            self._blocked()

    def _send(self, data: bytes | bytearray) -> int:
        """Send as much of ``data`` as the client's window takes; how much that was."""
        h2 = self._h2
        size = min(h2.local_flow_control_window(self.id), len(data))
        frame = h2.max_outbound_frame_size
        # The rest of a body of known length: END_STREAM goes with it, not
        # in a DATA frame of its own when the exchange ends the response.
        last = size == self._unsent
        try:
            for start in range(0, size, frame):
                stop = min(start + frame, size)
                h2.send_data(self.id, bytes(data[start:stop]), end_stream=last and stop == size)
        except StreamClosedError:
            return len(data)  # reset in the read being handled: dropped, as it ends
        if self._unsent is not None:
            self._unsent -= size
            self._local_done = last
        if size:
            self._conn.flush()
        return size

    def window_opened(self) -> None:
        out = self._out
        if not out or self._closed:
            return
        del out[: self._send(out)]
        if out:
            return
        self._stop_stall_timer()
        self.resume(WINDOW_SHUT)
        if self._end_pending:
            self._finish_output()

    def _blocked(self) -> None:
        self.pause(WINDOW_SHUT)
        if self._stall_timer is None:
            timeout = self._conn.settings.http2_stall_timeout
            self._stall_timer = self._conn.proxy.clock.callLater(timeout, self._stalled, timeout)

    def _stalled(self, timeout: float) -> None:
        self._stall_timer = None
        self.log.info(
            "reset HTTP/2 stream {stream} of client {client}: its flow-control window "
            "stayed shut for {timeout:g} seconds",
            stream=self.id,
            client=self.address,
            timeout=timeout,
        )
        self._reset(ErrorCodes.CANCEL, f"the client's window stayed shut for {timeout:g} seconds")

    def _stop_stall_timer(self) -> None:
        cancel(self._stall_timer)
        self._stall_timer = None

    def _end_output(self, *, reset: bool) -> None:
        """END_STREAM once what waits for the window is sent; then, with ``reset``,
        RST_STREAM (NO_ERROR) if the client is still sending (RFC 9113 §8.1)."""
        self._then_reset = self._then_reset or reset
        if self._out:
            self._end_pending = True
            return
        self._finish_output()

    def _finish_output(self) -> None:
        self._end_pending = False
        if self._closed:
            return
        if not self._local_done:
            self._local_done = True
            try:
                if self._trailers:
                    self._h2.send_headers(self.id, self._trailers, end_stream=True)
                else:
                    self._h2.end_stream(self.id)
            except StreamClosedError:
                pass
            self._conn.flush()
        if not self.client_done and self._then_reset:
            self._reset(self._reset_code, "answered before the request ended")
            return
        self._maybe_closed()

    # -- pausing the producer ---------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        if not self._pausing and self._producer is not None:
            self._producer.pauseProducing()
        self._pausing |= reason

    def resume(self, reason: int) -> None:
        if self._pausing & reason:
            self._pausing &= ~reason
            if not self._pausing and self._producer is not None:
                self._producer.resumeProducing()

    def _set_producer(self, producer: IPushProducer | None) -> None:
        self._producer = producer
        if producer is not None and self._pausing:
            producer.pauseProducing()

    # -- endings -----------------------------------------------------------------------------------

    def _stream_transport(self) -> StreamTransport:
        if self._transport is None:
            self._transport = StreamTransport(self, self._conn.transport)  # type: ignore[arg-type]
        return self._transport

    def lose_connection(self) -> None:
        """The tunnel closes the stream: the rest of its output, END_STREAM, then RST_STREAM."""
        self._end_output(reset=True)

    def lose_write_connection(self) -> None:
        """The tunnel half-closes the stream: the rest of its output, then END_STREAM."""
        self._end_output(reset=False)

    def _reset(self, code: ErrorCodes, why: str) -> None:
        if self._closed:
            return
        with contextlib.suppress(StreamClosedError):  # h2 closed it already
            self._h2.reset_stream(self.id, code)
        self._conn.flush()
        self._closed_by(why)

    def _maybe_closed(self) -> None:
        if self._local_done and self.client_done and not self._closed:
            self._closed = True
            self._cleanup(None)

    def _closed_by(self, why: str) -> None:
        if self._closed:
            return
        self._closed = True
        # Neither a clean close nor a lost connection: the words say which end.
        self._cleanup(Failure(error.ConnectionClosed(why)))

    def gone(self, reason: Failure) -> None:
        """The client connection is gone."""
        if not self._closed:
            self._closed = True
            self._cleanup(reason, notify=False)

    def _cleanup(self, reason: Failure | None, *, notify: bool = True) -> None:
        """The stream is over: ``reason`` says why to a tunnel (None: a clean close)."""
        self._stop_stall_timer()
        self._out.clear()
        self._held = []
        self._producer = None
        if notify:
            # What nobody took still counts against the connection's window.
            size, self._held_size, self._unacked = self._held_size + self._unacked, 0, 0
            self._acknowledge(size)
        exchange = self._exchange
        self._exchange = None
        if exchange is not None and not exchange.ended:
            exchange.client_gone()
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.lost(Side.CLIENT, reason or Failure(error.ConnectionDone()))
        if notify:
            self._conn.stream_closed(self)


@implementer(ITransport, IConsumer, IPushProducer)
class StreamTransport:
    """An HTTP/2 stream as a tunnel sees it: a transport like a TCP connection's.

    ``write`` sends DATA within the client's window; ``loseWriteConnection``
    is END_STREAM (a half-close), ``loseConnection`` is END_STREAM and then
    RST_STREAM if the client still sends, ``abortConnection`` is RST_STREAM.
    As a producer, pausing it keeps the client's window shut; its own
    producer (the backend connection) is paused while the client's window is
    shut or its connection's send buffer is full.
    """

    def __init__(self, stream: H2Stream, connection: ITransport) -> None:
        self._stream = stream
        self._connection = connection
        self.producer: IPushProducer | None = None

    # -- ITransport ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._stream.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._stream.write(b"".join(data))

    def loseConnection(self) -> None:
        self._stream.lose_connection()

    def loseWriteConnection(self) -> None:
        self._stream.lose_write_connection()

    def abortConnection(self) -> None:
        self._stream._reset(ErrorCodes.CANCEL, "closed by the proxy")

    def getPeer(self) -> Any:
        return self._connection.getPeer()

    def getHost(self) -> Any:
        return self._connection.getHost()

    # -- IConsumer -----------------------------------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        # Only push producers (transports) are registered here, by the tunnel.
        self.producer = producer  # type: ignore[assignment]
        self._stream._set_producer(producer)  # type: ignore[arg-type]

    def unregisterProducer(self) -> None:
        self.producer = None
        self._stream._set_producer(None)

    # -- IPushProducer ---------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._stream.pause_reads()

    def resumeProducing(self) -> None:
        self._stream.resume_reads()

    def stopProducing(self) -> None:
        self._stream.resume_reads()
