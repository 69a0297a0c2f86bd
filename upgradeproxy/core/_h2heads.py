"""The heads of the HTTP/2 door, as pure functions.

:func:`stream_request` turns the header list of an HTTP/2 request into the
HTTP/1.1 request head an :class:`~upgradeproxy.core._exchange.Exchange`
sees, or says why the request is malformed. The list is checked here, not
by the ``h2`` library (whose checks make every mistake a connection error):
RFC 9113 makes a malformed request a *stream* error, and what is forwarded
to an HTTP/1.1 backend must be valid HTTP/1.1, so names must be lowercase
tokens, values must hold no control characters, and no connection-specific
field may come through (§8.2). An extended CONNECT (RFC 8441) becomes the
HTTP/1.1 upgrade it stands for: ``GET`` with ``Upgrade: <protocol>`` and
``Connection: upgrade``, plus, for ``websocket``, the proxy's own
``Sec-WebSocket-Key``, so the validators check the backend's answer
exactly as they do for an HTTP/1.1 client.

The functions ending in ``_fields`` turn the backend's answers into the
header lists the client gets. Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..http1 import HOP_BY_HOP, Field, Headers, RequestHead, ResponseHead, is_token
from ._rewrite import VIA

#: A field name as HTTP/2 allows it and HTTP/1.1 can carry it: a lowercase token.
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-z]+")
#: A field value without control characters (RFC 9110 §5.5), and without
#: whitespace at either end (RFC 9113 §8.2.1).
_FIELD_VALUE = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)
#: An origin-form target as an HTTP/1.1 request line carries it (RFC 9112 §3.2.1).
_PATH = re.compile(rb"/[\x21-\x7e]*")
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*")
_DIGITS = re.compile(rb"[0-9]+")

_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
#: Fields that belong to one HTTP/1.1 connection: malformed in HTTP/2 (RFC 9113 §8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: What the proxy writes itself into the HTTP/1.1 request (``te: trailers`` is hop-by-hop).
_MADE_BY_PROXY = frozenset({b"host", b"content-length", b"te"})

#: The overhead RFC 9113 §6.5.2 counts for each field of a header list.
FIELD_OVERHEAD = 32


@dataclass(frozen=True, slots=True)
class Malformed:
    """Why an HTTP/2 request is refused before any backend sees it."""

    reason: str
    status: int = 400


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """An HTTP/2 request as the HTTP/1.1 request the exchange carries out.

    An extended CONNECT is an upgrade request: once it is answered, the
    stream carries the tunnel's bytes.
    """

    head: RequestHead


def header_list_size(fields: list[Field]) -> int:
    """The size of a header list as ``SETTINGS_MAX_HEADER_LIST_SIZE`` counts it."""
    # map and join run in C: a generator would be one call per field.
    return len(b"".join(map(b"".join, fields))) + FIELD_OVERHEAD * len(fields)


def joined_cookies(fields: list[Field]) -> list[Field]:
    """``fields`` with the cookie fields a client split joined into one, last
    (RFC 9113 §8.2.3: an HTTP/1.1 request carries one), as ``h2`` would."""
    cookies = [value for name, value in fields if name == b"cookie"]
    if not cookies:
        return fields
    kept = [field for field in fields if field[0] != b"cookie"]
    kept.append((b"cookie", b"; ".join(cookies)))
    return kept


def _text(value: bytes) -> str:
    return value[:100].decode("latin-1")


def _field_problem(name: bytes, value: bytes) -> str:
    """Why a field that failed the checks of :func:`stream_request` is malformed."""
    if not _FIELD_VALUE.fullmatch(value):
        return (
            f"the value of {_text(name)} has a control character (CR, LF or NUL among them) "
            "or whitespace at an end (RFC 9113 §8.2.1)"
        )
    if name.lower() != name and _FIELD_NAME.fullmatch(name.lower()):
        return f"the field name {_text(name)} has uppercase letters (RFC 9113 §8.2.1)"
    return f"the field name {_text(name)!r} is not a token (RFC 9113 §8.2.1, RFC 9110 §5.1)"


def stream_request(
    fields: list[Field],
    *,
    ended: bool,
    connect_protocol: bool,
    max_size: int,
    key: Callable[[], bytes],
) -> StreamRequest | Malformed:
    """The HTTP/1.1 request for an HTTP/2 request's header list, or why it is malformed.

    ``ended`` says the HEADERS frame ended the stream (no body follows).
    ``connect_protocol`` says this side advertised
    ``SETTINGS_ENABLE_CONNECT_PROTOCOL`` (without it, ``:protocol`` is
    malformed: RFC 8441 §4). A list larger than ``max_size`` (as
    :func:`header_list_size` counts) gets ``431``. ``key`` makes the
    ``Sec-WebSocket-Key`` for the backend, for a WebSocket's extended CONNECT.
    """
    fields = joined_cookies(fields)
    if header_list_size(fields) > max_size:
        return Malformed(f"request header list larger than {max_size} bytes", 431)
    pseudo: dict[bytes, bytes] = {}
    regular: list[Field] = []
    for name, value in fields:
        # The usual field passes both checks here; _field_problem says why not.
        if not _FIELD_VALUE.fullmatch(value) or (
            name[:1] != b":" and not _FIELD_NAME.fullmatch(name)
        ):
            return Malformed(_field_problem(name, value))
        if name[:1] == b":":
            if regular:
                return Malformed(
                    f"the pseudo-header field {_text(name)} comes after a regular field "
                    "(RFC 9113 §8.3)"
                )
            if name not in _PSEUDO:
                return Malformed(
                    f"{_text(name)} is not a request pseudo-header field (RFC 9113 §8.3.1)"
                )
            if name in pseudo:
                return Malformed(f"more than one {_text(name)} (RFC 9113 §8.3)")
            pseudo[name] = value
            continue
        if name in _CONNECTION_SPECIFIC:
            return Malformed(
                f"the connection-specific field {_text(name)} in an HTTP/2 request "
                "(RFC 9113 §8.2.2)"
            )
        if name == b"te" and value != b"trailers":
            return Malformed("TE other than 'trailers' in an HTTP/2 request (RFC 9113 §8.2.2)")
        regular.append((name, value))
    return _request(pseudo, regular, ended=ended, connect_protocol=connect_protocol, key=key)


def _request(
    pseudo: dict[bytes, bytes],
    regular: list[Field],
    *,
    ended: bool,
    connect_protocol: bool,
    key: Callable[[], bytes],
) -> StreamRequest | Malformed:
    method = pseudo.get(b":method")
    if method is None or not is_token(method):
        return Malformed("a request needs a :method that is a token (RFC 9113 §8.3.1)")
    protocol = pseudo.get(b":protocol")
    scheme, path = pseudo.get(b":scheme"), pseudo.get(b":path")
    if protocol is not None:
        if method != b"CONNECT":
            return Malformed(":protocol in a request that is not a CONNECT (RFC 8441 §4)")
        if not connect_protocol:
            return Malformed(
                ":protocol, but this connection did not enable extended CONNECT (RFC 8441 §4)"
            )
        if scheme is None or path is None or b":authority" not in pseudo:
            return Malformed(
                "an extended CONNECT needs :scheme, :path and :authority (RFC 8441 §4)"
            )
        if not is_token(protocol):
            return Malformed(f"the :protocol {_text(protocol)!r} is not a token (RFC 8441 §4)")
    elif method == b"CONNECT":
        if scheme is not None or path is not None:
            return Malformed("a CONNECT without :protocol has no :scheme or :path (RFC 9113 §8.5)")
        authority = pseudo.get(b":authority")
        if not authority:
            return Malformed("a CONNECT needs an :authority (RFC 9113 §8.5)")
        return StreamRequest(RequestHead(b"CONNECT", authority, (1, 1), Headers(tuple(regular))))
    elif scheme is None or path is None:
        return Malformed("a request needs :scheme and :path (RFC 9113 §8.3.1)")
    if not _SCHEME.fullmatch(scheme):
        return Malformed(f"the :scheme {_text(scheme)!r} is not a URI scheme (RFC 3986 §3.1)")
    if not (_PATH.fullmatch(path) or (path == b"*" and method == b"OPTIONS")):
        return Malformed(
            f"the :path {_text(path)!r} is neither an absolute path nor '*' for OPTIONS "
            "(RFC 9113 §8.3.1)"
        )
    host = _host(pseudo.get(b":authority"), [v for n, v in regular if n == b"host"])
    if isinstance(host, Malformed):
        return host
    lengths = {v for n, v in regular if n == b"content-length"}
    if len(lengths) > 1 or not all(_DIGITS.fullmatch(v) for v in lengths):
        return Malformed("content-length is not one decimal number (RFC 9110 §8.6)")
    length = lengths.pop() if lengths else None
    if protocol is not None and length is not None:
        return Malformed("content-length in an extended CONNECT, whose stream is a tunnel")
    if ended and length is not None and int(length) != 0:
        return Malformed(
            f"content-length is {_text(length)}, but the request ended without content "
            "(RFC 9113 §8.1.1)"
        )
    kept = [(n, v) for n, v in regular if n not in _MADE_BY_PROXY]
    head_fields: list[Field] = [(b"host", host)]
    if protocol is not None:
        head_fields += [(b"connection", b"upgrade"), (b"upgrade", protocol)]
        if protocol.lower() == b"websocket":
            kept = [(n, v) for n, v in kept if n != b"sec-websocket-key"]
            head_fields.append((b"sec-websocket-key", key()))
            if not any(n == b"sec-websocket-version" for n, _ in kept):
                head_fields.append((b"sec-websocket-version", b"13"))
        method = b"GET"
    head_fields += kept
    if length is not None:
        head_fields.append((b"content-length", length))
    elif not ended and protocol is None:
        # The body's length is unknown: the HTTP/1.1 request is chunked.
        head_fields.append((b"transfer-encoding", b"chunked"))
    return StreamRequest(RequestHead(method, path, (1, 1), Headers(tuple(head_fields))))


def _host(authority: bytes | None, hosts: list[bytes]) -> bytes | Malformed:
    """The ``Host`` of the HTTP/1.1 request (RFC 9113 §8.3.1)."""
    if len(hosts) > 1:
        return Malformed("more than one host field (RFC 9110 §7.2)")
    if authority is not None:
        if b"@" in authority:
            return Malformed("userinfo in the :authority (RFC 9113 §8.3.1)")
        if hosts and hosts[0] != authority:
            return Malformed(
                "the host field names another host than the :authority (RFC 9113 §8.3.1)"
            )
        return authority
    if hosts and hosts[0]:
        return hosts[0]
    return Malformed("a request needs an :authority or a host field (RFC 9113 §8.3.1)")


# -- answers -----------------------------------------------------------------------------


def _with_end_to_end(
    status: bytes, headers: Headers, drop: frozenset[bytes] = frozenset()
) -> list[Field]:
    """``:status``, then the backend's end-to-end fields (RFC 9110 §7.6.1) less
    ``drop``, named as HTTP/2 requires (lowercase), ``Via`` last.

    One pass over the fields, as :meth:`~upgradeproxy.http1.Headers.end_to_end`
    would choose them: it is every response's header list.
    """
    listed = headers.tokens(b"connection")
    skip = HOP_BY_HOP.union(listed, drop) if listed or drop else HOP_BY_HOP
    fields = [(b":status", status)]
    vias = []
    for name, value in headers.fields:
        name = name.lower()
        if name == b"via":
            vias.append(value)
        elif name not in skip:
            fields.append((name, value))
    vias.append(VIA)
    fields.append((b"via", b", ".join(vias)))
    return fields


def response_fields(head: ResponseHead) -> list[Field]:
    """The header list of the backend's final (or interim) response, for the client."""
    return _with_end_to_end(b"%d" % head.status, head.headers)


#: What the ``200`` answering an extended CONNECT leaves out of the backend's ``101``.
_NOT_IN_TUNNEL_ANSWER = frozenset({b"sec-websocket-accept", b"content-length"})


def tunnel_fields(head: ResponseHead) -> list[Field]:
    """The ``:status 200`` answering an extended CONNECT whose ``101`` was accepted.

    It carries what the backend selected (subprotocol, extensions) and its
    other end-to-end fields, but never ``Sec-WebSocket-Accept``: the key it
    answers was the proxy's (RFC 8441 §5).
    """
    return _with_end_to_end(b"200", head.headers, _NOT_IN_TUNNEL_ANSWER)


#: Fields a trailer section must not carry (RFC 9110 §6.5.1): framing, routing, content.
_NOT_IN_TRAILERS = frozenset(
    {
        b"content-length", b"content-encoding", b"content-range", b"content-type",
        b"host", b"trailer", b"authorization", b"set-cookie", b"cache-control",
    }
)  # fmt: skip


def trailer_fields(fields: tuple[Field, ...]) -> list[Field]:
    """The backend's trailer fields that may go to the client, named as HTTP/2 requires."""
    trailers = Headers(fields).end_to_end().without(_NOT_IN_TRAILERS)
    return [(name.lower(), value) for name, value in trailers]


def error_fields(status: int, length: int, retry_after: int | None = None) -> list[Field]:
    """The header list of the proxy's own error response, whose body has ``length`` bytes.

    ``retry_after`` adds a ``retry-after`` of that many seconds (RFC 9110 §10.2.3).
    """
    fields = [
        (b":status", b"%d" % status),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % length),
    ]
    if retry_after is not None:
        fields.append((b"retry-after", b"%d" % retry_after))
    return fields
