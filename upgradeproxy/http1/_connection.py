"""Connection-level meaning of a head: persistence and protocol upgrades.

RFC 9112 §9.3 decides whether a connection stays open after a message;
RFC 9110 §7.8 decides whether a request asks to switch protocols.
"""

from __future__ import annotations

from ._abnf import TOKEN
from ._heads import RequestHead, ResponseHead


def is_token(value: bytes) -> bool:
    """True when ``value`` is an RFC 9110 token (a header name, a protocol name, ...)."""
    return TOKEN.fullmatch(value) is not None


def offered_protocols(head: RequestHead) -> list[bytes]:
    """The protocols a request offers in ``Upgrade``, as sent, in order."""
    return head.headers.elements(b"upgrade")


def is_upgrade_request(head: RequestHead) -> bool:
    """True when the request asks to switch protocols (RFC 9110 §7.8).

    That takes HTTP/1.1, a non-empty ``Upgrade`` field, and ``upgrade``
    listed in ``Connection``; tokens are case-insensitive. An HTTP/1.0
    request cannot upgrade: its ``Upgrade`` is ignored.
    """
    return (
        head.version >= (1, 1)
        and b"upgrade" in head.headers.tokens(b"connection")
        and bool(offered_protocols(head))
    )


def request_keeps_alive(head: RequestHead) -> bool:
    """True when the client intends to send more requests on this connection."""
    tokens = head.headers.tokens(b"connection")
    if b"close" in tokens:
        return False
    return head.version >= (1, 1) or b"keep-alive" in tokens


def response_keeps_alive(head: ResponseHead) -> bool:
    """True when the backend leaves its connection open after this response."""
    tokens = head.headers.tokens(b"connection")
    if b"close" in tokens:
        return False
    return head.version >= (1, 1) or b"keep-alive" in tokens
