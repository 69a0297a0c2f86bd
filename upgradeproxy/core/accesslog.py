"""The access log: one record per request and one per tunnel, as text or JSON lines.

Records are ``twisted.logger`` events in the ``upgradeproxy.access``
namespace whose ``access`` field is the record itself, so an observer can
read the fields, and whose message is the record as one line of text or of
JSON. They go to the main log unless a file is given, like nginx's
``access_log``. The line is only formatted when an observer asks for it.

A file is the faster destination: its lines start with a timestamp formatted
once per second, where twistd's main log formats one per line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import implementer

NAMESPACE = "upgradeproxy.access"
FORMATS = ("text", "json")


@dataclass(slots=True)
class RequestRecord:
    """A request the proxy answered (or refused)."""

    client: str
    method: str
    target: str
    version: str
    status: int
    #: Bytes of the response body sent to the client.
    bytes: int
    #: Seconds from the request head to the end of the response.
    duration: float
    route: str
    #: The backend that answered, or "-" when none did.
    backend: str
    #: When the record was written (Unix time).
    time: float = 0.0

    @property
    def text(self) -> str:
        return (
            f'{self.client} "{self.method} {self.target} {self.version}" {self.status} '
            f"{self.bytes} {self.duration:.3f}s route={self.route} backend={self.backend}"
        )

    @property
    def json(self) -> str:
        return json.dumps({"type": "request", **asdict(self)}, ensure_ascii=False)


@dataclass(slots=True)
class TunnelRecord:
    """A tunnel that ended."""

    client: str
    target: str
    protocol: str
    route: str
    backend: str
    duration: float
    client_to_backend: int
    backend_to_client: int
    #: "client", "backend" or "proxy".
    closed_by: str
    #: Why that side closed: "EOF", "connection lost (reset)", "idle for 300 seconds"…
    reason: str
    #: The protocol the client opened the tunnel with: "HTTP/1.1", or "HTTP/2"
    #: (an extended CONNECT, RFC 8441).
    client_protocol: str = "HTTP/1.1"
    #: When the record was written (Unix time).
    time: float = 0.0

    @property
    def text(self) -> str:
        # An HTTP/1.1 tunnel's line is as it always was; others name their door.
        door = "" if self.client_protocol == "HTTP/1.1" else f" {self.client_protocol}"
        return (
            f'{self.client} "TUNNEL {self.target} {self.protocol}{door}" {self.duration:.3f}s '
            f"up={self.client_to_backend} down={self.backend_to_client} "
            f'closed_by={self.closed_by} reason="{self.reason}" '
            f"route={self.route} backend={self.backend}"
        )

    @property
    def json(self) -> str:
        return json.dumps({"type": "tunnel", **asdict(self)}, ensure_ascii=False)


class AccessLog:
    """Emits access records to ``observer`` (the main log by default), as ``format``."""

    def __init__(self, format: str = "text", observer: ILogObserver | None = None) -> None:
        if format not in FORMATS:
            raise ValueError(
                f"access log format must be one of {', '.join(FORMATS)}, not {format!r}"
            )
        self.format = format
        self._message = "{access.json}" if format == "json" else "{access.text}"
        self._observer = observer if observer is not None else globalLogPublisher

    def emit(self, record: RequestRecord | TunnelRecord) -> None:
        # Built by hand rather than through Logger.emit: this runs for every
        # request, and only these keys are needed.
        now = record.time = time.time()
        event: dict[str, Any] = {
            "log_namespace": NAMESPACE,
            "log_level": LogLevel.info,
            "log_format": self._message,
            "log_time": now,
            "log_source": None,
            "access": record,
        }
        self._observer(event)


class _Stamp:
    """ISO 8601 UTC timestamps to the second, formatted once per second.

    Formatting a time is a real share of a request's cost; a busy proxy
    writes thousands of lines within the same second.
    """

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        return self._text


@implementer(ILogObserver)
class _LineWriter:
    """Writes each access record to ``stream`` as one line: text lines start with the time.

    An observer of its own rather than a ``FileLogObserver`` behind a
    ``LogPublisher``: two calls less per request, and no flush after a line
    that a line-buffered file has written out already.
    """

    def __init__(self, stream: IO[str], format: str) -> None:
        self._write = stream.write
        # Standard output into a pipe is not line-buffered: each line is flushed.
        line_buffered = getattr(stream, "line_buffering", False)
        self._flush: Callable[[], None] | None = None if line_buffered else stream.flush
        self._json = format == "json"
        self._stamp = _Stamp()

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") != NAMESPACE:
            return
        record = event["access"]
        if self._json:
            self._write(record.json + "\n")
        else:
            self._write(f"{self._stamp(event['log_time'])} {record.text}\n")
        if self._flush is not None:
            self._flush()


def access_log_to(path: str, format: str) -> tuple[AccessLog, IO[str]]:
    """An access log that writes one line per record to ``path`` ("-": standard output).

    Returns the log and the open file, which the caller closes at shutdown.
    """
    stream: IO[str] = (
        sys.stdout if path == "-" else open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    )
    return AccessLog(format, _LineWriter(stream, format)), stream
