"""Built-in upgrade validators.

Each one is a small class providing :class:`~upgradeproxy.interfaces.IUpgradeValidator`;
:mod:`upgradeproxy.plugins.upgradeproxy_validators` makes them available by
name to ``--validator``.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase

from twisted.logger import Logger
from zope.interface import implementer

from . import rfc6455
from .interfaces import IUpgradeValidator, Refusal, UpgradeAttempt


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _listing(values: list[bytes]) -> str:
    return ", ".join(_text(v) for v in values) or "nothing"


def unsolicited_switch(attempt: UpgradeAttempt) -> Refusal | None:
    """Refuse a ``101`` to a request that did not ask to upgrade.

    The proxy applies this rule itself whatever the validator chain says: a
    client that did not ask for a switch cannot speak the new protocol.
    """
    if attempt.is_upgrade:
        return None
    return Refusal(
        "the backend answered 101 to a request that did not ask to upgrade (RFC 9110 §15.2.2)",
        hint="answer 101 only to requests that send Upgrade and list 'upgrade' in Connection",
    )


Rule = Callable[[UpgradeAttempt], Refusal | None]


# -- the rules of a switch in RFC 9110, one function each ----------------------------
# Each looks at an attempt whose response is a 101 to an upgrade request.


def upgrade_is_named(attempt: UpgradeAttempt) -> Refusal | None:
    if attempt.selected:
        return None
    return Refusal(
        "the backend answered 101 without an Upgrade header naming the new protocol "
        "(RFC 9110 §7.8)",
        hint="send 'Upgrade: <protocol>' with the 101, naming the protocol switched to",
    )


def connection_lists_upgrade(attempt: UpgradeAttempt) -> Refusal | None:
    assert attempt.response is not None
    if b"upgrade" in attempt.response.headers.tokens(b"connection"):
        return None
    return Refusal(
        "the backend answered 101 without 'Connection: upgrade' (RFC 9110 §7.6.1)",
        hint="add 'Connection: upgrade' to the 101: Upgrade is a connection option, so "
        "Connection must list it",
    )


def only_offered_protocols(attempt: UpgradeAttempt) -> Refusal | None:
    offered = {p.lower() for p in attempt.offered}
    for protocol in attempt.selected:
        if protocol.lower() not in offered:
            return Refusal(
                f"the backend switched to {_text(protocol)!r}, which the client did not "
                f"offer (it offered {_listing(attempt.offered)}) (RFC 9110 §7.8)",
                hint="name in the 101's Upgrade exactly one of the protocols the request offered",
            )
    return None


def no_content_framing(attempt: UpgradeAttempt) -> Refusal | None:
    assert attempt.response is not None
    for name in (b"content-length", b"transfer-encoding"):
        if attempt.response.headers.has(name):
            title = name.decode().title()
            return Refusal(
                f"the backend's 101 carries {title}, but a 1xx response has no content "
                "(RFC 9110 §8.6, RFC 9112 §6.1)",
                hint=f"remove {title} from the 101",
            )
    return None


def request_body_complete(attempt: UpgradeAttempt) -> Refusal | None:
    if attempt.request_body_complete:
        return None
    return Refusal(
        "the backend answered 101 before the whole request body was sent (RFC 9110 §7.8)",
        hint="read the whole request body before switching protocols",
    )


RFC9110_RULES: tuple[Rule, ...] = (
    upgrade_is_named,
    connection_lists_upgrade,
    only_offered_protocols,
    no_content_framing,
    request_body_complete,
)


# -- the rules of a WebSocket switch in RFC 6455 -----------------------------------------


def _offers_websocket(attempt: UpgradeAttempt) -> bool:
    return b"websocket" in (p.lower() for p in attempt.offered)


def websocket_accept_matches(attempt: UpgradeAttempt) -> Refusal | None:
    assert attempt.response is not None
    key = attempt.request.headers.get(b"sec-websocket-key") or b""
    expected = rfc6455.accept_for(key)
    accepts = attempt.response.headers.get_all(b"sec-websocket-accept")
    if accepts == [expected]:
        return None
    got = _listing(accepts) if accepts else "none"
    return Refusal(
        f"the backend's 101 has Sec-WebSocket-Accept {got}, but the key calls for "
        f"{_text(expected)} (RFC 6455 §4.2.2)",
        hint="answer with base64(SHA-1(Sec-WebSocket-Key + "
        "'258EAFA5-E914-47DA-95CA-C5AB0DC85B11')), computed from the request's own key",
    )


def websocket_subprotocol_offered(attempt: UpgradeAttempt) -> Refusal | None:
    assert attempt.response is not None
    offered = [p.lower() for p in attempt.request.headers.elements(b"sec-websocket-protocol")]
    chosen = attempt.response.headers.elements(b"sec-websocket-protocol")
    if len(chosen) > 1 or (chosen and chosen[0].lower() not in offered):
        return Refusal(
            f"the backend selected the subprotocol {_listing(chosen)}, but the client "
            f"offered {_listing(offered)} (RFC 6455 §4.2.2)",
            hint="select at most one of the subprotocols the client offered, or none",
        )
    return None


def websocket_extensions_offered(attempt: UpgradeAttempt) -> Refusal | None:
    assert attempt.response is not None
    offered = set(
        rfc6455.extension_names(attempt.request.headers.get_all(b"sec-websocket-extensions"))
    )
    for extension in rfc6455.extension_names(
        attempt.response.headers.get_all(b"sec-websocket-extensions")
    ):
        if extension not in offered:
            return Refusal(
                f"the backend enabled the extension {_text(extension)}, which the client "
                "did not offer (RFC 6455 §9.1)",
                hint="enable only extensions the client offered in Sec-WebSocket-Extensions",
            )
    return None


WEBSOCKET_RULES: tuple[Rule, ...] = (
    websocket_accept_matches,
    websocket_subprotocol_offered,
    websocket_extensions_offered,
)


def _first(rules: tuple[Rule, ...], attempt: UpgradeAttempt) -> Refusal | None:
    for rule in rules:
        refusal = rule(attempt)
        if refusal is not None:
            return refusal
    return None


@implementer(IUpgradeValidator)
class RFC9110Validator:
    """The rules of RFC 9110 §7.6.1 and §7.8 for a switch, applied strictly.

    A ``101`` must carry ``Upgrade`` naming only protocols the client offered,
    must list ``upgrade`` in ``Connection`` (``Upgrade`` is a connection
    option), must have no body framing fields, and may only come after the
    whole request body (:data:`RFC9110_RULES`).

    With ``lenient_connection``, a ``101`` that forgets ``Connection: upgrade``
    is accepted (the client still receives a correct one), and a warning is
    logged once per backend: some backends (Proxmox Backup Server among them)
    omit it, and an operator may choose to let them.
    """

    name = "rfc9110"
    log = Logger()

    def __init__(self, *, lenient_connection: bool = False) -> None:
        self.lenient_connection = lenient_connection
        self._warned: set[str] = set()

    def check_request(self, attempt: UpgradeAttempt) -> Refusal | None:
        return None

    def check_response(self, attempt: UpgradeAttempt) -> Refusal | None:
        refusal = unsolicited_switch(attempt)
        if refusal is not None:
            return refusal
        rules = RFC9110_RULES
        if self.lenient_connection:
            if connection_lists_upgrade(attempt) is not None:
                self._warn_lenient(attempt.backend)
            rules = tuple(r for r in rules if r is not connection_lists_upgrade)
        return _first(rules, attempt)

    def _warn_lenient(self, backend: str) -> None:
        if backend in self._warned:
            return
        self._warned.add(backend)
        self.log.warn(
            "backend {backend} answers 101 without 'Connection: upgrade' (RFC 9110 §7.6.1); "
            "accepted because of rfc9110:lenient-connection. This is logged once per backend.",
            backend=backend or "(unnamed)",
        )


@implementer(IUpgradeValidator)
class WebSocketValidator:
    """The WebSocket opening handshake of RFC 6455 §4, for ``websocket`` upgrades.

    The request must have ``Sec-WebSocket-Version: 13`` and one
    ``Sec-WebSocket-Key`` that is base64 of 16 bytes (otherwise ``400``, and
    the backend is never contacted). The ``101`` must carry the
    ``Sec-WebSocket-Accept`` computed from that key, may select only a
    subprotocol the client offered, and only extensions the client offered
    (:data:`WEBSOCKET_RULES`). Upgrades to other protocols pass untouched.
    """

    name = "websocket"

    def check_request(self, attempt: UpgradeAttempt) -> Refusal | None:
        if not _offers_websocket(attempt):
            return None
        headers = attempt.request.headers
        if headers.get_all(b"sec-websocket-version") != [b"13"]:
            return Refusal(
                "a WebSocket upgrade needs 'Sec-WebSocket-Version: 13' (RFC 6455 §4.1)", 400
            )
        keys = headers.get_all(b"sec-websocket-key")
        if len(keys) != 1 or not rfc6455.is_valid_key(keys[0]):
            return Refusal(
                "a WebSocket upgrade needs one Sec-WebSocket-Key that is the base64 "
                "encoding of 16 bytes (RFC 6455 §4.1)",
                400,
            )
        return None

    def check_response(self, attempt: UpgradeAttempt) -> Refusal | None:
        if b"websocket" not in (p.lower() for p in attempt.selected):
            return None
        return _first(WEBSOCKET_RULES, attempt)


@implementer(IUpgradeValidator)
class AllowValidator:
    """Only upgrades to the listed protocols pass; any other gets ``403``.

    The backend never sees a refused request. Every protocol a request
    offers must be on the list.
    """

    name = "allow"

    def __init__(self, protocols: list[str]) -> None:
        self.protocols = frozenset(p.lower().encode("latin-1") for p in protocols)

    def check_request(self, attempt: UpgradeAttempt) -> Refusal | None:
        refused = [p for p in attempt.offered if p.lower() not in self.protocols]
        if not refused:
            return None
        allowed = ", ".join(sorted(_text(p) for p in self.protocols))
        return Refusal(
            f"upgrades to {_listing(refused)} are not allowed here (allowed: {allowed})", 403
        )

    def check_response(self, attempt: UpgradeAttempt) -> Refusal | None:
        return None


@implementer(IUpgradeValidator)
class OriginValidator:
    """WebSocket upgrades from an ``Origin`` that matches no pattern get ``403``.

    This stops cross-site WebSocket hijacking: a browser always sends
    ``Origin`` with a WebSocket handshake, so a page on another site cannot
    open a WebSocket with the user's cookies. Patterns are shell-style and
    matched against the whole origin, case-insensitively
    (``https://*.example.com``). Requests without ``Origin`` come from
    non-browser clients and pass.
    """

    name = "origin"

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = [p.lower() for p in patterns]

    def check_request(self, attempt: UpgradeAttempt) -> Refusal | None:
        if not _offers_websocket(attempt):
            return None
        origins = attempt.request.headers.get_all(b"origin")
        if not origins:
            return None
        origin = _text(origins[0]).lower()
        if len(origins) == 1 and any(fnmatchcase(origin, p) for p in self.patterns):
            return None
        return Refusal(
            f"WebSocket connections from origin {_listing(origins)} are not allowed here "
            f"(allowed: {', '.join(self.patterns)})",
            403,
        )

    def check_response(self, attempt: UpgradeAttempt) -> Refusal | None:
        return None
