"""The HTTP/2 front door: one client connection speaking HTTP/2 (RFC 9113).

An :class:`HTTP2Connection` runs the ``h2`` library (sans-IO) on a client
connection; each stream is one :class:`~upgradeproxy.core._exchange.Exchange`,
driven through its :class:`~upgradeproxy.core._h2stream.H2Stream` (the
exchange's :class:`~upgradeproxy.core._exchange.ClientSide`),
so a stream gets every rule the HTTP/1.1 door applies: routes, limits,
validators, retries, timeouts, access records. Backends stay HTTP/1.1: the
request head is made by :mod:`upgradeproxy.core._h2heads`.

Flow control is tied to backpressure both ways. Request DATA is
acknowledged (its window given back) only once the backend connection took
it, so a slow backend stops the client by its window; a response is sent
as far as the client's window allows, and the backend connection is paused
while the rest waits, as it is while the client connection's own send
buffer is full. No stream holds more than one backend read, or than its
window of the client's bytes. The connection's window is that of every
stream together, so a stalled stream never stalls the others.

An extended CONNECT (RFC 8441) becomes an HTTP/1.1 upgrade; once the
backend's ``101`` passes the validators, the client gets ``:status 200``
and the stream's :class:`~upgradeproxy.core._h2stream.StreamTransport` is
the client side of an ordinary :class:`~upgradeproxy.core._tunnel.Tunnel`:
DATA is tunnel bytes, END_STREAM is a half-close, RST_STREAM a reset.

Hostile clients are bounded: more streams than advertised are refused
(REFUSED_STREAM), streams reset faster than :data:`RESET_LIMIT` per
:data:`INTERVAL` (rapid reset, CVE-2023-44487), or PING, SETTINGS, empty
DATA and unknown frames faster than :data:`FLOOD_LIMIT`, end the connection with
GOAWAY ENHANCE_YOUR_CALM; header lists are bounded (431 over the advertised
size, GOAWAY over :data:`HEADER_LIST_CEILING` times it: an HPACK bomb); ``h2``
ends a header block after 64 CONTINUATION frames; a stream whose window stays
closed is reset after ``http2_stall_timeout``; a connection without streams
closes after ``keep_alive_timeout``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame, SettingsFrame
from twisted.internet import error
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._twisted import send_now
from ._exchange import refuse_request
from ._flow import no_delay
from ._h2heads import (
    stream_request,
)
from ._h2stream import CLIENT_FULL, H2Stream, code_name
from ._rewrite import VIA_HTTP2, ClientHop, client_hop
from ._timers import cancel
from .proxy import FrontConnection, LimitRefusal, Proxy

#: The prior-knowledge connection preface of a client (RFC 9113 §3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: The window of each stream (the protocol's initial window size).
STREAM_WINDOW = 65_535
#: Seconds over which resets and floods are counted.
INTERVAL = 10.0
#: Streams the client may reset (or have refused) per interval before GOAWAY.
RESET_LIMIT = 200
#: PING, SETTINGS, empty DATA and unknown frames the client may send per interval.
FLOOD_LIMIT = 500
#: ``h2`` itself refuses more open streams than this many times the advertised
#: limit: up to there, a stream over the limit is refused on its own.
STREAM_CEILING = 4
#: A header list up to this many times the advertised size is decoded and
#: answered with 431; a larger one ends the connection (an HPACK bomb).
HEADER_LIST_CEILING = 4

_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,
    # The door checks requests itself (see _h2heads): as stream errors, and
    # as strictly as an HTTP/1.1 backend needs. Responses are built valid.
    validate_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    # The door joins a request's cookie fields itself (see _h2heads), in the
    # pass it makes over them anyway.
    normalize_inbound_headers=False,
)

#: The largest window, and the largest value of a setting (RFC 9113 §6.9.1).
_LARGEST = 2**31 - 1


def _new_key() -> bytes:
    """A fresh ``Sec-WebSocket-Key`` (RFC 6455 §4.1)."""
    return base64.b64encode(os.urandom(16))


class _Rate:
    """Counts events in fixed intervals; :meth:`spend` says when one had too many."""

    __slots__ = ("_count", "_limit", "_start")

    def __init__(self, limit: int, now: float) -> None:
        self._limit = limit
        self._start = now
        self._count = 0

    def spend(self, now: float) -> bool:
        """Count one event; True when the current interval had more than the limit."""
        if now - self._start >= INTERVAL:
            self._start, self._count = now, 0
        self._count += 1
        return self._count > self._limit


@implementer(IPushProducer)
class HTTP2Connection(Protocol):
    """One HTTP/2 connection from a client."""

    log = Logger()

    def __init__(self, proxy: Proxy, peer: object | None = None) -> None:
        """``peer`` is the client's address, as the factory was given it (a
        :class:`~upgradeproxy.core._proxyheader.ProxiedAddress` behind a
        balancer); None: the transport's peer."""
        #: The proxy, and its settings when the connection was made.
        self.proxy = proxy
        self._peer = peer
        self.settings = proxy.settings
        self._h2 = H2Connection(_CONFIG)
        self._streams: dict[int, H2Stream] = {}
        self.address = "unknown"
        self.hop = ClientHop("unknown")
        #: Nested calls that hold the output until the outermost one is done.
        self.corked = 0
        #: Why every request on this connection is refused (a limit, a shutdown).
        self._refusal: LimitRefusal | None = None
        #: True once the client's transport paused this connection as its producer.
        self.paused = False
        #: GOAWAY was sent or received: no new stream is served.
        self._going_away = False
        self._ended = False
        #: Closes the connection once it has had no stream until the deadline
        #: (None: it has streams). A stream opening leaves the timer to fire;
        #: it finds the connection busy, or sets itself for the new deadline: one
        #: timer for many streams rather than one cancelled and made for each.
        self._idle_timer: IDelayedCall | None = None
        self._idle_deadline: float | None = None
        self._replacing: FrontConnection | None = None
        now = proxy.clock.seconds()
        self._resets = _Rate(RESET_LIMIT, now)
        self._floods = _Rate(FLOOD_LIMIT, now)

    # -- taking a connection over ----------------------------------------------------

    def replace(self, previous: FrontConnection, refusal: LimitRefusal | None = None) -> None:
        """Serve what was ``previous``'s connection, without counting it again.

        ``refusal`` is why the proxy refused it when it was counted. Call
        before :meth:`makeConnection`.
        """
        self._replacing = previous
        self._refusal = refusal

    # -- Twisted protocol events -----------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        no_delay(transport)
        peer, self._peer = self._peer or transport.getPeer(), None
        secure = ISSLTransport.providedBy(transport)
        self.hop = client_hop(
            peer, transport.getHost(), secure=secure, scheme=self.proxy.scheme, via=VIA_HTTP2
        )
        self.address = self.hop.address
        if self._replacing is not None:
            self.proxy.connection_replaced(self._replacing, self)
            self._replacing = None
        else:
            self._refusal = self.proxy.connection_opened(self)
        settings = self.settings
        streams = settings.http2_max_concurrent_streams
        h2 = self._h2
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: min(streams * STREAM_CEILING, _LARGEST),
                SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_request_head,
                SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
            },
        )
        h2.decoder.max_header_list_size = settings.max_request_head * HEADER_LIST_CEILING
        h2.initiate_connection()
        # The window of every stream together: one stalled stream (its bytes
        # unacknowledged) cannot take the window of the others.
        h2.increment_flow_control_window(min(streams * STREAM_WINDOW, _LARGEST - STREAM_WINDOW))
        # The limit the client is told comes in a second SETTINGS frame: h2
        # enforces the first, a higher ceiling, as a connection error, so that
        # below it a stream over the limit is refused on its own (RFC 9113 §5.1.2).
        advertised = SettingsFrame(
            0, settings={SettingCodes.MAX_CONCURRENT_STREAMS: min(streams, _LARGEST)}
        )
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        transport.write(h2.data_to_send() + advertised.serialize())
        self._wait_idle(settings.request_head_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._ended:
            return
        try:
            events = self._h2.receive_data(data)
        except H2ProtocolError as e:
            self._connection_error(e)
            return
        self.corked += 1
        try:
            for event in events:
                handler = _HANDLERS.get(type(event))
                if handler is not None:
                    handler(self, event)
                    if self._ended:
                        break
        finally:
            self.corked -= 1
            self.flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._ended = True
        self._stop_idle()
        for stream in list(self._streams.values()):
            stream.gone(reason)
        self._streams.clear()
        self.proxy.connection_closed(self)

    # -- IPushProducer: the client's transport says its send buffer is full -------------

    def pauseProducing(self) -> None:
        self.paused = True
        for stream in list(self._streams.values()):
            stream.pause(CLIENT_FULL)

    def resumeProducing(self) -> None:
        self.paused = False
        for stream in list(self._streams.values()):
            stream.resume(CLIENT_FULL)

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    # -- output --------------------------------------------------------------------

    @property
    def h2(self) -> H2Connection:
        return self._h2

    def flush(self) -> None:
        """Send what ``h2`` has queued, unless a caller up the stack will."""
        if self.corked or self.transport is None:
            return
        data = self._h2.data_to_send()
        if data:
            send_now(self.transport, data)

    # -- frames from the client ---------------------------------------------------------

    def _on_request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        h2 = self._h2
        opened = h2.streams.get(stream_id)
        if opened is None or opened.closed:
            # Reset in the same read that opened it (rapid reset): it costs
            # nothing, not even an exchange, but it counts.
            if self._resets.spend(self.proxy.clock.seconds()):
                self._calm_down("too many streams reset (rapid reset, CVE-2023-44487)")
            return
        if self._going_away or len(self._streams) >= self.settings.http2_max_concurrent_streams:
            h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            if self._resets.spend(self.proxy.clock.seconds()):
                self._calm_down("too many streams over the limit")
            return
        self._idle_deadline = None
        stream = H2Stream(self, stream_id)
        self._streams[stream_id] = stream
        ended = event.stream_ended is not None
        refusal = self._refusal
        if refusal is not None:
            stream.client_done = ended
            self._go_away()
            refuse_request(
                self.proxy, stream, None, None, refusal.status, refusal.reason,
                retry_after=refusal.retry_after, logged=refusal.logged,
            )  # fmt: skip
            return
        parsed = stream_request(
            event.headers,
            ended=ended,
            connect_protocol=True,  # advertised in the first SETTINGS
            max_size=self.settings.max_request_head,
            key=_new_key,
        )
        stream.start(parsed, ended)

    def _on_data(self, event: DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if not event.data and not event.stream_ended and self._flooded():
            return
        if stream is None:
            # A stream already answered: its bytes are dropped, its window given back.
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.data(event.data, event.flow_controlled_length)

    def _on_stream_ended(self, event: StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.client_ended()

    def _on_stream_reset(self, event: StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        stream.reset_by_client(event.error_code)
        if self._resets.spend(self.proxy.clock.seconds()):
            self._calm_down("too many streams reset (rapid reset, CVE-2023-44487)")

    def _on_window_updated(self, event: WindowUpdated) -> None:
        if event.stream_id:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.window_opened()
        else:
            self._windows_opened()

    def _on_settings_changed(self, event: RemoteSettingsChanged) -> None:
        if self._flooded():
            return
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._windows_opened()

    def _on_ping(self, event: PingReceived | UnknownFrameReceived) -> None:
        self._flooded()

    def _on_terminated(self, event: ConnectionTerminated) -> None:
        """The client sent GOAWAY: it opens no more streams.

        With NO_ERROR, those already open go on to completion (RFC 9113 §6.8),
        and the connection closes after the last; with an error, it closes now.
        """
        self._going_away = True
        if event.error_code != ErrorCodes.NO_ERROR:
            self.log.info(
                "HTTP/2 client {client} ended the connection with {code}, "
                "{streams} streams still open",
                client=self.address,
                code=code_name(event.error_code),
                streams=len(self._streams),
            )
            self._close(f"the client ended the connection ({code_name(event.error_code)})")
        elif not self._streams:
            self._close()
        else:
            # h2 sends nothing more once it has received GOAWAY (its connection
            # is CLOSED): back to open for the streams that go on; a new
            # stream is refused (_going_away).
            self._h2.state_machine.state = ConnectionState.SERVER_OPEN

    def _windows_opened(self) -> None:
        for stream in list(self._streams.values()):
            stream.window_opened()

    # -- streams -------------------------------------------------------------------------

    def stream_closed(self, stream: H2Stream) -> None:
        """``stream`` is over on both sides."""
        if self._streams.pop(stream.id, None) is None or self._streams:
            return
        if self._going_away or self.proxy.draining:
            self._close()
        elif not self._ended:
            self._wait_idle(self.settings.keep_alive_timeout)

    # -- limits ---------------------------------------------------------------------------

    def _flooded(self) -> bool:
        if self._floods.spend(self.proxy.clock.seconds()):
            self._calm_down("too many PING, SETTINGS, empty DATA or unknown frames")
            return True
        return False

    def _calm_down(self, why: str) -> None:
        """End the connection of a client that abuses the protocol (GOAWAY ENHANCE_YOUR_CALM)."""
        self.log.warn(
            "HTTP/2 client {client}: {why} within {interval:g} seconds; closing its connection",
            client=self.address,
            why=why,
            interval=INTERVAL,
        )
        self._h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, additional_data=why.encode())
        self._close(f"the client's connection was closed: {why}")

    def _connection_error(self, e: H2ProtocolError) -> None:
        """A frame broke the protocol: ``h2`` has queued its GOAWAY, except for a bad preface."""
        code = getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR)
        if self._h2.state_machine.state is not ConnectionState.CLOSED:
            # h2 raised before it could queue a GOAWAY (a bad preface): send one here.
            frame = GoAwayFrame(0, error_code=code)
            self.transport.write(self._h2.data_to_send() + frame.serialize())  # type: ignore[union-attr]
        self.log.info(
            "HTTP/2 protocol error from client {client}: {error}; closing with GOAWAY {code}",
            client=self.address,
            error=str(e) or type(e).__name__,
            code=code_name(code),
        )
        self._close("the client broke the HTTP/2 protocol")

    def _wait_idle(self, timeout: float) -> None:
        """Close the connection if it opens no stream within ``timeout`` seconds."""
        clock = self.proxy.clock
        deadline = clock.seconds() + timeout
        self._idle_deadline = deadline
        timer = self._idle_timer
        if timer is None:
            self._idle_timer = clock.callLater(timeout, self._idle_check)
        elif timer.getTime() > deadline:
            timer.reset(timeout)

    def _stop_idle(self) -> None:
        self._idle_deadline = None
        cancel(self._idle_timer)
        self._idle_timer = None

    def _idle_check(self) -> None:
        self._idle_timer = None
        deadline = self._idle_deadline
        if deadline is None:
            return  # streams are open: the last to close sets the next deadline
        clock = self.proxy.clock
        left = deadline - clock.seconds()
        if left > 0:
            self._idle_timer = clock.callLater(left, self._idle_check)
            return
        self._go_away()
        self._close()

    # -- shutdown -----------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a request is in flight on this connection (tunnels are the proxy's)."""
        return any(stream.in_flight for stream in self._streams.values())

    def drain(self) -> None:
        """The proxy is shutting down: GOAWAY, then close once the streams are done."""
        if self._ended:
            return
        self._go_away()
        if not self._streams:
            self._close()

    def abort(self) -> None:
        """Close at once, whatever is in flight."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _go_away(self) -> None:
        """Tell the client no new stream will be served; those it opened go on.

        The frame is written here, not by ``h2``: after ``h2`` sends GOAWAY it
        sends nothing more, not even the rest of the streams already open.
        """
        if self._going_away or self._ended or self.transport is None:
            return
        self._going_away = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._h2.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self.transport.write(self._h2.data_to_send() + frame.serialize())

    def _close(self, why: str = "the HTTP/2 connection closed") -> None:
        """Send what is queued, then close; streams still open end now.

        They cannot wait for the close to complete: after its GOAWAY, ``h2``
        sends nothing more on them.
        """
        if self._ended:
            return
        self._ended = True
        self._stop_idle()
        transport = self.transport
        assert transport is not None
        data = self._h2.data_to_send()
        if data:
            transport.write(data)
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.gone(Failure(error.ConnectionClosed(why)))
        transport.loseConnection()


_HANDLERS: dict[type, Callable[[HTTP2Connection, Any], None]] = {
    RequestReceived: HTTP2Connection._on_request,
    DataReceived: HTTP2Connection._on_data,
    StreamEnded: HTTP2Connection._on_stream_ended,
    StreamReset: HTTP2Connection._on_stream_reset,
    WindowUpdated: HTTP2Connection._on_window_updated,
    RemoteSettingsChanged: HTTP2Connection._on_settings_changed,
    PingReceived: HTTP2Connection._on_ping,
    UnknownFrameReceived: HTTP2Connection._on_ping,
    ConnectionTerminated: HTTP2Connection._on_terminated,
}
