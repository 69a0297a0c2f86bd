"""A small, strict, sans-IO HTTP/1.1 module.

It parses request and response heads from buffers (returning the exact
offset of the first byte after the head, or, with a :class:`HeadReader`,
removing the head from a buffer that grows as bytes arrive), decides body framing
(RFC 9112 §6), decodes bodies incrementally, and knows which fields are
hop-by-hop. It never touches a socket, a reactor, or a clock.

Strictness is deliberate: anything that lets two parsers disagree about where
a message ends -- Content-Length with Transfer-Encoding, duplicate
Content-Length, obs-fold, bare CR or LF, whitespace before a colon -- is a
:class:`ProtocolError`.
"""

from ._connection import (
    is_token,
    is_upgrade_request,
    offered_protocols,
    request_keeps_alive,
    response_keeps_alive,
)
from ._errors import ProtocolError
from ._framing import (
    LAST_CHUNK,
    NO_BODY,
    BodyDecoder,
    BodyKind,
    ChunkedDecoder,
    CloseDelimitedDecoder,
    Framing,
    LengthDecoder,
    encode_chunk,
    request_framing,
    response_framing,
)
from ._headers import HOP_BY_HOP, Field, Headers
from ._heads import RequestHead, ResponseHead, parse_request_head, parse_response_head
from ._reader import HeadReader

__all__ = [
    "HOP_BY_HOP",
    "LAST_CHUNK",
    "NO_BODY",
    "BodyDecoder",
    "BodyKind",
    "ChunkedDecoder",
    "CloseDelimitedDecoder",
    "Field",
    "Framing",
    "HeadReader",
    "Headers",
    "LengthDecoder",
    "ProtocolError",
    "RequestHead",
    "ResponseHead",
    "encode_chunk",
    "is_token",
    "is_upgrade_request",
    "offered_protocols",
    "parse_request_head",
    "parse_response_head",
    "request_framing",
    "request_keeps_alive",
    "response_framing",
    "response_keeps_alive",
]
