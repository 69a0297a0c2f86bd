"""What the proxy changes in heads as they pass through it, as pure functions.

Hop-by-hop fields are removed in both directions (RFC 9110 §7.6.1); the
proxy then adds what belongs to its own hop: forwarding fields and ``Via``
on requests, its own framing and persistence fields on responses. Nothing
here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from ..http1 import BodyKind, Field, Headers, ProtocolError, RequestHead, ResponseHead
from ._proxyheader import ProxiedAddress

VIA = b"1.1 upgradeproxy"
#: The ``Via`` entry of a request the proxy received over HTTP/2 (RFC 9110 §7.6.3).
VIA_HTTP2 = b"2 upgradeproxy"

_FORWARDING = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
# Fields the proxy sets itself, dropped from what it received.
_REPLACED_ON_REQUESTS = frozenset((*_FORWARDING, b"via"))
_VIA = frozenset((b"via",))


@dataclass(frozen=True, slots=True)
class ClientHop:
    """What the proxy knows about the client's connection."""

    address: str
    scheme: str = "http"
    #: The client's address and port, and the address it connected to (Twisted
    #: addresses), for a PROXY protocol header to the backend; None when unknown.
    peer: object | None = None
    local: object | None = None
    #: What the proxy adds to a request's ``Via``: the protocol it received it with.
    via: bytes = VIA


def client_hop(
    peer: object, host: object, *, secure: bool, scheme: str, via: bytes = VIA
) -> ClientHop:
    """The hop of a client connection from ``peer`` to ``host`` (Twisted addresses).

    ``peer`` is a :class:`~upgradeproxy.core._proxyheader.ProxiedAddress` for
    a client behind a load balancer speaking the PROXY protocol: the client's
    address, and the one it connected to, are then the header's.
    """
    address = str(getattr(peer, "host", None) or peer)
    local = peer.destination if isinstance(peer, ProxiedAddress) else None
    return ClientHop(
        address, "https" if secure else scheme, peer=peer, local=local or host, via=via
    )


def without_h2c(head: RequestHead) -> RequestHead:
    """``head`` with any offer to upgrade to ``h2c`` taken out.

    An ``h2c`` upgrade through a proxy gives the client an HTTP/2 connection
    straight to the backend, past every routing and access rule the proxy
    applies to later requests (h2c smuggling). So ``h2c`` is removed from
    ``Upgrade``, ``HTTP2-Settings`` is dropped, and ``Connection`` loses the
    tokens that named them; other offered protocols stay.
    """
    headers = head.headers
    if b"h2c" not in headers.tokens(b"upgrade"):
        return head
    remaining = [p for p in headers.elements(b"upgrade") if p.lower() != b"h2c"]
    dropped = {b"http2-settings"} | (set() if remaining else {b"upgrade"})
    connection = [t for t in headers.elements(b"connection") if t.lower() not in dropped]
    kept = headers.without((b"upgrade", b"connection", b"http2-settings"))
    added: list[Field] = []
    if connection:
        added.append((b"Connection", b", ".join(connection)))
    if remaining:
        added.append((b"Upgrade", b", ".join(remaining)))
    return RequestHead(head.method, head.target, head.version, kept.plus(added))


def split_target(target: bytes) -> tuple[bytes, bytes | None]:
    """A request target in origin-form, and the authority it named, if any.

    An absolute-form target (``http://host/path``) is reduced to its path
    and query, and its authority returned (RFC 9112 §3.2.2); ``*`` (for
    ``OPTIONS *``) and origin-form targets stay as they are.
    """
    if target == b"*" or target.startswith(b"/"):
        return target, None
    parts = urlsplit(target.decode("latin-1"))
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ProtocolError("request target is neither a path nor an absolute URL")
    if "@" in parts.netloc:
        raise ProtocolError("userinfo in the request target (RFC 9110 §4.2.4)")
    path = (parts.path or "/").encode("latin-1")
    if parts.query:
        path += b"?" + parts.query.encode("latin-1")
    return path, parts.netloc.encode("latin-1")


def _behind(prefix: bytes, path: bytes) -> bytes:
    """``path`` under the backend URL's path ``prefix``."""
    return prefix.rstrip(b"/") + path if prefix and path != b"*" else path


def request_for_backend(
    head: RequestHead,
    hop: ClientHop,
    *,
    upgrade: bool,
    framing: BodyKind,
    prefix: bytes = b"",
) -> RequestHead:
    """The request head the backend receives for the client's ``head``.

    The backend always gets HTTP/1.1. ``X-Forwarded-For`` and ``Via`` are
    appended to; ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are set by
    the proxy, replacing what the client sent, since the backend must be able
    to trust them. For an upgrade, ``Upgrade`` and ``Connection: upgrade``
    are put back after the hop-by-hop fields were removed.
    """
    headers = head.headers
    prior_xff = headers.elements(b"x-forwarded-for")
    prior_via = headers.get_all(b"via")
    path, authority = split_target(head.target)
    host = authority if authority is not None else headers.get(b"host")
    kept = headers.end_to_end().without(_REPLACED_ON_REQUESTS)
    if authority is not None or host is None:
        # The backend gets HTTP/1.1, which must carry Host: the target's
        # authority wins over a received Host (RFC 9112 §3.2.2), and a
        # request that named no host gets an empty one (§3.2).
        kept = Headers(((b"Host", host or b""), *kept.without((b"host",)).fields))
    added: list[Field] = []
    if framing is BodyKind.CHUNKED:
        added.append((b"Transfer-Encoding", b"chunked"))
    if upgrade:
        offers = headers.get_all(b"upgrade")
        settings = (
            headers.get_all(b"http2-settings") if b"h2c" in headers.tokens(b"upgrade") else []
        )
        # An h2c offer (forwarded only when the operator asked for it) is
        # void without its HTTP2-Settings, a connection option too (RFC 9113 §3.2).
        added.append((b"Connection", b"upgrade, HTTP2-Settings" if settings else b"upgrade"))
        added.extend((b"Upgrade", v) for v in offers)
        added.extend((b"HTTP2-Settings", v) for v in settings)
    added.append((b"X-Forwarded-For", b", ".join([*prior_xff, hop.address.encode("latin-1")])))
    added.append((b"X-Forwarded-Proto", hop.scheme.encode("ascii")))
    if host:
        added.append((b"X-Forwarded-Host", host))
    added.append((b"Via", b", ".join([*prior_via, hop.via])))
    return RequestHead(head.method, _behind(prefix, path), (1, 1), kept.plus(added))


def response_for_client(
    head: ResponseHead,
    *,
    framing: BodyKind,
    keep_alive: bool,
    client_version: tuple[int, int],
) -> ResponseHead:
    """The response head the client receives for the backend's ``head``.

    ``framing`` is how the proxy frames the body towards the client (which
    may differ from the backend's: a close-delimited body is sent chunked to
    an HTTP/1.1 client so its connection can stay open). ``keep_alive`` says
    whether the client connection stays open after this response.
    """
    headers = head.headers
    prior_via = headers.get_all(b"via")
    kept = headers.end_to_end().without(_VIA)
    added: list[Field] = []
    if framing is BodyKind.CHUNKED:
        added.append((b"Transfer-Encoding", b"chunked"))
    connection = []
    # A 426 must say which protocol is required (RFC 9110 §15.5.22), and an
    # Upgrade field is a connection option (§7.8).
    upgrades = headers.get_all(b"upgrade") if head.status == 426 else []
    if upgrades:
        connection.append(b"upgrade")
    if not keep_alive:
        connection.append(b"close")
    elif client_version < (1, 1):
        connection.append(b"keep-alive")
    if connection:
        added.append((b"Connection", b", ".join(connection)))
    added.extend((b"Upgrade", v) for v in upgrades)
    added.append((b"Via", b", ".join([*prior_via, VIA])))
    return ResponseHead(head.status, head.reason, (1, 1), kept.plus(added))


def interim_for_client(head: ResponseHead) -> ResponseHead:
    """A ``1xx`` (other than ``101``) as relayed to the client."""
    return ResponseHead(head.status, head.reason, (1, 1), head.headers.end_to_end())


def switch_for_client(head: ResponseHead) -> ResponseHead:
    """The backend's ``101`` as the client receives it.

    Hop-by-hop fields are removed like on any response, then ``Upgrade`` (as
    the backend named it) and ``Connection: upgrade`` are put back, so the
    client always gets a well-formed switch.
    """
    headers = head.headers
    kept = headers.end_to_end().without(_VIA)
    added: list[Field] = [(b"Connection", b"upgrade")]
    added.extend((b"Upgrade", v) for v in headers.get_all(b"upgrade"))
    added.append((b"Via", b", ".join([*headers.get_all(b"via"), VIA])))
    return ResponseHead(101, head.reason or b"Switching Protocols", (1, 1), kept.plus(added))


def error_body(reason: str) -> bytes:
    """The body of the proxy's own error response: the reason, as a line of text."""
    return reason.encode("utf-8") + b"\n"


def error_response(
    status: int, reason: str, *, head_only: bool = False, retry_after: int | None = None
) -> bytes:
    """A complete response that tells the client, in plain words, what went wrong.

    The connection is always closed after it. ``head_only`` (for a ``HEAD``
    request) leaves the body out but keeps its ``Content-Length``;
    ``retry_after`` adds a ``Retry-After`` of that many seconds (RFC 9110 §10.2.3).
    """
    body = error_body(reason)
    phrase = HTTPStatus(status).phrase.encode("ascii")
    fields: list[Field] = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
        (b"Connection", b"close"),
    ]
    if retry_after is not None:
        fields.append((b"Retry-After", b"%d" % retry_after))
    headers = Headers(tuple(fields))
    return ResponseHead(status, phrase, (1, 1), headers).serialize() + (b"" if head_only else body)
