"""An in-memory HTTP/2 client for the HTTP/2 door's tests: the ``h2`` library, pumped by hand.

:class:`H2Client` connects to a proxy factory through a memory transport
and exchanges frames with it whenever :meth:`H2Client.pump` is called;
what the proxy sent comes back as ``h2`` events. :func:`h2_cluster` is a
:class:`~support.Cluster` that accepts HTTP/2 with prior knowledge.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame
from support import Cluster
from twisted.internet.interfaces import IProtocolFactory

from upgradeproxy import ProxySettings
from upgradeproxy.testing import connect_client


def h2_cluster(routes: dict[str, dict[str, Any]] | None = None, **settings: Any) -> Cluster:
    """A :class:`Cluster` whose listening door takes HTTP/2 with prior knowledge."""
    access_log = settings.pop("access_log", None)
    return Cluster(
        routes,
        settings=ProxySettings(http2_cleartext=True, **settings),
        access_log=access_log,
    )


#: A client that sends what it is told: the proxy's checks are under test, not h2's.
LAX = H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
)


def request(
    path: bytes = b"/page",
    method: bytes = b"GET",
    authority: bytes = b"app.example",
    *extra: tuple[bytes, bytes],
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", authority),
        (b":path", path),
        *extra,
    ]


def websocket(path: bytes = b"/chat", *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """An RFC 8441 extended CONNECT for a WebSocket."""
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"https"),
        (b":authority", b"app.example"),
        (b":path", path),
        (b"sec-websocket-version", b"13"),
        *extra,
    ]


class H2Client:
    """One in-memory HTTP/2 client connection to ``factory``."""

    def __init__(
        self,
        factory: IProtocolFactory,
        *,
        host: str = "192.0.2.7",
        port: int = 50000,
        window: int | None = None,
    ) -> None:
        _, self.transport = connect_client(factory, host, port)  # type: ignore[arg-type]
        self.h2 = H2Connection(LAX)
        if window is not None:
            self.h2.local_settings = Settings(
                client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        self.h2.initiate_connection()
        self.events: list[Event] = []
        self.pump()

    def pump(self) -> list[Event]:
        """Exchange frames until neither side has more to say; the new events."""
        new: list[Event] = []
        for _ in range(100):
            out = self.h2.data_to_send()
            if out and self.transport.connected:
                self.transport.protocol.dataReceived(out)
            back = self.transport.value()
            self.transport.clear()
            if back:
                back, goaways = without_goaway(back)
                if back:
                    new += self.h2.receive_data(back)
                new += goaways
            if not out and not back:
                break
        self.events += new
        return new

    def ignore_stream_limit(self) -> None:
        """Open streams past the proxy's advertised limit, as an abusive client does."""
        values = dict(self.h2.remote_settings.items())
        values[SettingCodes.MAX_CONCURRENT_STREAMS] = 2**31 - 1
        self.h2.remote_settings = Settings(client=False, initial_values=values)

    def send_raw(self, data: bytes) -> None:
        self.transport.protocol.dataReceived(data)

    @property
    def closed(self) -> bool:
        return not self.transport.connected

    @property
    def advertised(self) -> dict[int, int]:
        return dict(self.h2.remote_settings.items())

    def get(self, headers: list[tuple[bytes, bytes]], *, end: bool = True) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=end)
        self.pump()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        size = self.h2.max_outbound_frame_size
        for start in range(0, max(len(data), 1), size):
            last = start + size >= len(data)
            self.h2.send_data(stream_id, data[start : start + size], end_stream=end and last)
        self.pump()

    def of(self, stream_id: int) -> list[Event]:
        return [e for e in self.events if getattr(e, "stream_id", None) == stream_id]

    def response(self, stream_id: int) -> Response:
        return Response.of(self.of(stream_id))

    def goaway(self) -> ConnectionTerminated | None:
        found = [e for e in self.events if isinstance(e, ConnectionTerminated)]
        return found[-1] if found else None


def without_goaway(data: bytes) -> tuple[bytes, list[Event]]:
    """``data`` less its GOAWAY frames, and those as events.

    After h2 receives GOAWAY it takes no more frames, even of the streams
    that GOAWAY lets finish; real clients do take them.
    """
    kept, goaways, at = b"", [], 0
    while at < len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[at : at + 9]))
        end = at + 9 + length
        if isinstance(frame, GoAwayFrame):
            frame.parse_body(memoryview(data[at + 9 : end]))
            event = ConnectionTerminated()
            event.error_code = ErrorCodes(frame.error_code)
            event.last_stream_id = frame.last_stream_id
            event.additional_data = frame.additional_data
            goaways.append(event)
        else:
            kept += data[at:end]
        at = end
    return kept, goaways


@dataclasses.dataclass
class Response:
    """What one stream brought back."""

    headers: dict[bytes, bytes]
    status: int | None
    body: bytes
    ended: bool
    reset: int | None

    @classmethod
    def of(cls, events: list[Event]) -> Response:
        headers: dict[bytes, bytes] = {}
        body = b""
        reset = None
        for event in events:
            if isinstance(event, ResponseReceived):
                headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, DataReceived):
                body += event.data
            elif isinstance(event, StreamReset):
                reset = event.error_code
        status = int(headers[b":status"]) if b":status" in headers else None
        ended = any(isinstance(e, StreamEnded) for e in events)
        return cls(headers, status, body, ended, reset)


__all__ = [
    "H2Client",
    "Response",
    "SettingCodes",
    "h2_cluster",
    "request",
    "websocket",
    "without_goaway",
]
