"""Message body framing (RFC 9112 §6) and incremental body decoders.

:func:`request_framing` and :func:`response_framing` decide how long a body
is from its head; a decoder then takes body bytes off the front of a buffer
and says when the body is complete, so that whatever follows -- the next
request, or the bytes of a switched protocol -- stays in the buffer for its
next owner.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._abnf import CHUNK_SIZE_LINE, CONTENT_LENGTH, FIELD_LINE
from ._errors import ProtocolError
from ._headers import Field
from ._heads import RequestHead, ResponseHead


class BodyKind(enum.Enum):
    """How the end of a body is found."""

    NONE = "none"  # no body at all
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # chunked transfer coding
    CLOSE = "close"  # everything until the connection closes (responses only)


@dataclass(frozen=True, slots=True)
class Framing:
    kind: BodyKind
    length: int = 0

    def decoder(self) -> BodyDecoder:
        """A fresh decoder for a body framed this way."""
        if self.kind is BodyKind.LENGTH:
            return LengthDecoder(self.length)
        if self.kind is BodyKind.CHUNKED:
            return ChunkedDecoder()
        if self.kind is BodyKind.CLOSE:
            return CloseDelimitedDecoder()
        return LengthDecoder(0)


NO_BODY = Framing(BodyKind.NONE)


def _content_length(values: list[bytes], status: int) -> Framing:
    if len(values) > 1:
        raise ProtocolError("more than one Content-Length header field", status)
    if CONTENT_LENGTH.fullmatch(values[0]) is None:
        raise ProtocolError("Content-Length is not a decimal number", status)
    length = int(values[0])
    return Framing(BodyKind.LENGTH, length) if length else NO_BODY


def _transfer_codings(values: list[bytes], status: int) -> list[bytes]:
    codings = [c.strip(b" \t").lower() for v in values for c in v.split(b",")]
    if not all(codings):
        raise ProtocolError("empty element in Transfer-Encoding", status)
    return codings


def request_framing(head: RequestHead) -> Framing:
    """How the body of this request is framed (RFC 9112 §6.1-6.3).

    Rejects every ambiguity that enables request smuggling: Content-Length
    together with Transfer-Encoding, more than one Content-Length, a
    Transfer-Encoding whose final coding is not ``chunked``, and
    Transfer-Encoding in an HTTP/1.0 request.
    """
    te = head.headers.get_all(b"transfer-encoding")
    cl = head.headers.get_all(b"content-length")
    if te and cl:
        raise ProtocolError(
            "both Content-Length and Transfer-Encoding in the request (RFC 9112 §6.1)"
        )
    if te:
        if head.version < (1, 1):
            raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1)")
        codings = _transfer_codings(te, 400)
        if codings[-1] != b"chunked":
            raise ProtocolError(
                "the final transfer coding of the request is not chunked (RFC 9112 §6.3)"
            )
        # Chunking twice is forbidden to senders (RFC 9112 §6.1), so this is a
        # malformed request (400), not a coding the server lacks (501).
        if codings.count(b"chunked") > 1:
            raise ProtocolError("chunked applied more than once to the request (RFC 9112 §6.1)")
        if len(codings) > 1:
            raise ProtocolError(
                "transfer codings other than a single chunked are not supported", 501
            )
        return Framing(BodyKind.CHUNKED)
    if cl:
        return _content_length(cl, 400)
    return NO_BODY


def response_framing(head: ResponseHead, request_method: bytes) -> Framing:
    """How the body of this response to ``request_method`` is framed (RFC 9112 §6.3)."""
    status = head.status
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    if request_method == b"CONNECT" and status < 300:
        return NO_BODY
    te = head.headers.get_all(b"transfer-encoding")
    cl = head.headers.get_all(b"content-length")
    if te and cl:
        raise ProtocolError("both Content-Length and Transfer-Encoding in the response")
    if te:
        if _transfer_codings(te, 502)[-1] == b"chunked":
            return Framing(BodyKind.CHUNKED)
        return Framing(BodyKind.CLOSE)
    if cl:
        return _content_length(cl, 502)
    return Framing(BodyKind.CLOSE)


class BodyDecoder:
    """Takes body bytes off the front of a buffer.

    :meth:`decode` returns the body data found (with chunked framing
    removed) and how many bytes of the buffer it used; the caller deletes
    those. ``done`` turns true when the body is complete; bytes after it
    are not used. ``trailers`` then holds the trailer fields a chunked body
    ended with, as received.
    """

    done: bool = False
    trailers: tuple[Field, ...] = ()

    def decode(self, buf: bytes | bytearray) -> tuple[list[bytes], int]:
        raise NotImplementedError

    def eof(self) -> None:
        """The connection closed; raise :class:`ProtocolError` if the body is cut short."""
        if not self.done:
            raise ProtocolError("connection closed before the end of the body")


class LengthDecoder(BodyDecoder):
    """A body of exactly ``length`` bytes."""

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.done = length == 0

    def decode(self, buf: bytes | bytearray) -> tuple[list[bytes], int]:
        take = min(self.remaining, len(buf))
        if not take:
            return [], 0
        self.remaining -= take
        self.done = self.remaining == 0
        return [bytes(buf[:take])], take


class CloseDelimitedDecoder(BodyDecoder):
    """A body that ends when the connection does."""

    def decode(self, buf: bytes | bytearray) -> tuple[list[bytes], int]:
        if not buf:
            return [], 0
        return [bytes(buf)], len(buf)

    def eof(self) -> None:
        self.done = True


class _Chunked(enum.Enum):
    SIZE = enum.auto()
    DATA = enum.auto()
    DATA_END = enum.auto()
    TRAILER = enum.auto()


class ChunkedDecoder(BodyDecoder):
    """The chunked transfer coding (RFC 9112 §7.1), decoded incrementally.

    Chunk extensions are checked and dropped; trailer fields are checked and
    kept (``trailers``). A chunk-size line or a trailer section that grows
    past its limit is an error, so a peer cannot make the decoder buffer
    without bound.
    """

    MAX_LINE = 4096

    def __init__(self, max_trailer_size: int = 16 * 1024) -> None:
        self._state = _Chunked.SIZE
        self._remaining = 0
        self._trailer_budget = max_trailer_size

    def _line(self, buf: bytes | bytearray, pos: int, what: str) -> int:
        """The offset of the CRLF ending the line at ``pos``, or -1."""
        end = buf.find(b"\r\n", pos, pos + self.MAX_LINE + 2)
        # A line of MAX_LINE bytes whose CR has come but not its LF is still
        # within the limit; rejecting it would make the answer depend on how
        # the bytes were split between reads.
        if end < 0 and len(buf) - pos > self.MAX_LINE + 1:
            raise ProtocolError(f"{what} longer than {self.MAX_LINE} bytes")
        bare = buf.find(b"\n", pos, end if end >= 0 else len(buf))
        if bare >= 0:
            raise ProtocolError(f"bare LF in {what}")
        return end

    def decode(self, buf: bytes | bytearray) -> tuple[list[bytes], int]:
        pos = 0
        data: list[bytes] = []
        size = len(buf)
        while not self.done and pos < size:
            state = self._state
            if state is _Chunked.DATA:
                take = min(self._remaining, size - pos)
                data.append(bytes(buf[pos : pos + take]))
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _Chunked.DATA_END
            elif state is _Chunked.DATA_END:
                if size - pos < 2:
                    if buf[pos : pos + 1] != b"\r":
                        raise ProtocolError("chunk data not followed by CRLF")
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                self._state = _Chunked.SIZE
            elif state is _Chunked.SIZE:
                end = self._line(buf, pos, "chunk-size line")
                if end < 0:
                    break
                match = CHUNK_SIZE_LINE.fullmatch(buf, pos, end)
                if match is None:
                    raise ProtocolError("malformed chunk-size line")
                self._remaining = int(match.group(1), 16)
                pos = end + 2
                self._state = _Chunked.DATA if self._remaining else _Chunked.TRAILER
            else:
                end = self._line(buf, pos, "trailer field")
                if end < 0:
                    break
                self._trailer_budget -= end + 2 - pos
                if self._trailer_budget < 0:
                    raise ProtocolError("trailer section too large")
                if end > pos:
                    match = FIELD_LINE.fullmatch(buf, pos, end)
                    if match is None:
                        raise ProtocolError("malformed trailer field")
                    self.trailers += ((match.group(1), match.group(2)),)
                self.done = end == pos
                pos = end + 2
        return data, pos


def encode_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of the chunked transfer coding.

    Empty ``data`` encodes as nothing at all: a chunk of size zero is the
    last-chunk (RFC 9112 §7.1), and would end the body early -- whatever was
    sent after it would be read as the next message.
    """
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
