"""Request and response heads: parse them from a buffer, write them back out.

A parse function takes the bytes received so far and returns either ``None``
(the head is not complete yet) or the head together with the offset of the
first byte after it. That offset is what lets the proxy hand every later byte
-- a body, a pipelined request, or a switched protocol -- to its next owner
exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._abnf import (
    BARE_LINE_END,
    FIELD_LINE,
    FIELD_LINE_CRLF,
    FIELD_LINES,
    REQUEST_LINE,
    STATUS_LINE,
)
from ._errors import ProtocolError
from ._headers import Headers

_END = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request line and its header fields."""

    method: bytes
    target: bytes
    version: tuple[int, int]
    headers: Headers = field(default_factory=Headers)

    def serialize(self) -> bytes:
        """The head as HTTP/1.1 bytes, ending with the empty line."""
        return b"%s %s HTTP/%d.%d\r\n%s\r\n" % (
            self.method, self.target, *self.version, self.headers.serialize(),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A status line and its header fields."""

    status: int
    reason: bytes
    version: tuple[int, int] = (1, 1)
    headers: Headers = field(default_factory=Headers)

    def serialize(self) -> bytes:
        """The head as bytes, ending with the empty line."""
        return b"HTTP/%d.%d %d %s\r\n%s\r\n" % (
            *self.version, self.status, self.reason, self.headers.serialize(),
        )  # fmt: skip


def _locate_head(buf: bytes | bytearray, start: int, max_size: int, checked: int) -> int:
    """The offset just past the head's empty line; -1 if it has not come yet, -2 if too large.

    The head, its empty line included, may be at most ``max_size`` bytes:
    -2 as soon as ``max_size`` bytes have come without one ending, and never
    earlier (the answer must not depend on how the bytes were split between
    reads). The caller raises its own error then; building one that is
    rarely raised would cost every head.

    Rejects a bare CR or LF as soon as one arrives, so that a client that
    ends its lines with LF alone gets an answer instead of a timeout.
    """
    # Bytes before ``checked`` were searched already; a terminator or a
    # CR-LF pair may straddle that point, hence the small step back.
    end = buf.find(_END, max(start, checked - 3), start + max_size)
    scan_end = end + len(_END) if end >= 0 else min(len(buf), start + max_size)
    if _has_bare_line_end(buf, max(start, checked - 1), scan_end):
        raise ProtocolError("line ending other than CRLF (bare CR or LF) in the head")
    if end < 0:
        return -2 if len(buf) - start >= max_size else -1
    return end + len(_END)


def _has_bare_line_end(buf: bytes | bytearray, start: int, end: int) -> bool:
    """True when ``buf[start:end]`` has a CR or LF that is not part of a CRLF.

    Counting is three quick scans in C; the regular expression, much slower
    per byte, only decides the rare cases where the counts disagree (a bare
    line end, a CRLF cut at ``start``, or a CR at the end still awaiting its LF).
    """
    pairs = buf.count(b"\r\n", start, end)
    if buf.count(b"\r", start, end) == pairs and buf.count(b"\n", start, end) == pairs:
        return False
    return BARE_LINE_END.search(buf, start, end) is not None


def _parse_fields(buf: bytes | bytearray, start: int, end: int, who: str) -> Headers:
    """The header fields in ``buf[start:end]``: field lines, each ending with CRLF."""
    if FIELD_LINES.fullmatch(buf, start, end) is None:
        for line in bytes(buf[start:end]).split(b"\r\n"):
            if FIELD_LINE.fullmatch(line) is None:
                raise ProtocolError(_describe_bad_field(line, who))
    return Headers(tuple(FIELD_LINE_CRLF.findall(buf, start, end)))


def _describe_bad_field(line: bytes, who: str) -> str:
    if line[:1] in (b" ", b"\t"):
        return f"obsolete line folding (obs-fold) in the {who} head (RFC 9112 §5.2)"
    name, colon, _ = line.partition(b":")
    if not colon:
        return f"header line without a colon in the {who} head"
    if name != name.rstrip(b" \t"):
        return f"whitespace between a header name and its colon in the {who} head (RFC 9112 §5.1)"
    if any((b < 0x20 and b != 0x09) or b == 0x7F for b in line):
        return f"control character in a header field of the {who} head"
    return f"malformed header field in the {who} head"


def _request_too_large(max_size: int) -> ProtocolError:
    return ProtocolError(f"request head larger than {max_size} bytes", 431)


def parse_request_head(
    buf: bytes | bytearray, start: int = 0, max_size: int = 32 * 1024, checked: int = 0
) -> tuple[RequestHead, int] | None:
    """Parse one request head from ``buf[start:]``.

    Returns ``(head, end)`` where ``end`` is the offset of the first byte
    after the head, or ``None`` if more bytes are needed. A caller that
    keeps appending to ``buf`` after ``None`` passes the length ``buf`` had
    then as ``checked``, so those bytes are not searched again (a head
    trickling in byte by byte then costs linear time, not quadratic). Empty lines before
    the request line are skipped (RFC 9112 §2.2). Raises
    :class:`ProtocolError` for anything that is not a well-formed HTTP/1.x
    request head, and with status 431 when the head, counting those empty
    lines, is larger than ``max_size`` bytes.
    """
    # The skipped empty lines count towards the limit: otherwise a client
    # could send CRLFs for ever, and every one would stay buffered.
    limit = start + max_size
    while start < limit and buf[start : start + 2] == b"\r\n":
        start += 2
    if start >= limit:
        raise _request_too_large(max_size)
    if len(buf) - start < 2 and buf[start:] in (b"", b"\r"):
        return None
    end = _locate_head(buf, start, limit - start, checked)
    if end == -1:
        return None
    if end == -2:
        raise _request_too_large(max_size)
    line_end = buf.find(b"\r\n", start)
    match = REQUEST_LINE.fullmatch(buf, start, line_end)
    if match is None:
        raise ProtocolError("malformed request line")
    method, target, major, minor = match.groups()
    version = (int(major), int(minor))
    if version not in ((1, 0), (1, 1)):
        raise ProtocolError(f"HTTP version {version[0]}.{version[1]} is not supported", 505)
    headers = _parse_fields(buf, line_end + 2, end - 2, "request")
    hosts = headers.get_all(b"host")
    if len(hosts) > 1:
        raise ProtocolError("more than one Host header field (RFC 9112 §3.2)")
    if version == (1, 1) and not hosts:
        raise ProtocolError("HTTP/1.1 request without a Host header field (RFC 9112 §3.2)")
    return RequestHead(method, target, version, headers), end


def parse_response_head(
    buf: bytes | bytearray, start: int = 0, max_size: int = 64 * 1024, checked: int = 0
) -> tuple[ResponseHead, int] | None:
    """Parse one response head from ``buf[start:]``.

    Returns ``(head, end)`` or ``None`` if more bytes are needed (``checked``
    as for :func:`parse_request_head`); raises
    :class:`ProtocolError` for a malformed or oversized head.
    """
    end = _locate_head(buf, start, max_size, checked)
    if end == -1:
        return None
    if end == -2:
        raise ProtocolError(f"response head larger than {max_size} bytes")
    line_end = buf.find(b"\r\n", start)
    match = STATUS_LINE.fullmatch(buf, start, line_end)
    if match is None:
        raise ProtocolError("malformed status line")
    major, minor, status, reason = match.groups()
    if major != b"1":
        raise ProtocolError(f"response in HTTP version {major.decode()}.{minor.decode()}")
    headers = _parse_fields(buf, line_end + 2, end - 2, "response")
    return ResponseHead(int(status), reason or b"", (1, int(minor)), headers), end
