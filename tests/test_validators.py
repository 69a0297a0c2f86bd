"""The built-in validators, each accepting and refusing, through the real proxy logic in memory."""

from __future__ import annotations

import pytest
from support import KEY
from twisted.logger import capturedLogs, formatEvent

from upgradeproxy import ProxySettings, rfc6455
from upgradeproxy.registry import BadValidator, build_chain, describe_installed
from upgradeproxy.testing import ProxyHarness, upgrade_outcome
from upgradeproxy.validators import (
    AllowValidator,
    OriginValidator,
    RFC9110Validator,
    WebSocketValidator,
)

ACCEPT = rfc6455.accept_for(KEY)


def ws_request(*extra: bytes, key: bytes = KEY, version: bytes = b"13") -> bytes:
    lines = [
        b"GET /chat HTTP/1.1",
        b"Host: app.example",
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"Sec-WebSocket-Version: " + version,
        b"Sec-WebSocket-Key: " + key,
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def ws_switch(*extra: bytes, accept: bytes = ACCEPT) -> bytes:
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept,
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def token_request(token: bytes, *extra: bytes) -> bytes:
    lines = [b"GET /x HTTP/1.1", b"Host: a", b"Connection: upgrade", b"Upgrade: " + token, *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def token_switch(token: bytes, connection: bool = True) -> bytes:
    lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: " + token]
    if connection:
        lines.append(b"Connection: upgrade")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def logged(logs: list[dict[str, object]]) -> str:
    return "\n".join(formatEvent(e) for e in logs)


# -- rfc9110 ------------------------------------------------------------------------


def test_rfc9110_accepts_a_correct_switch() -> None:
    outcome = upgrade_outcome(token_request(b"foo"), token_switch(b"foo"), [RFC9110Validator()])
    assert outcome.status == 101


def test_rfc9110_lenient_connection_accepts_fixes_and_warns_once_per_backend() -> None:
    validator = RFC9110Validator(lenient_connection=True)
    with capturedLogs() as logs:
        for _ in range(3):
            outcome = upgrade_outcome(
                token_request(b"proxmox-backup-protocol-v1"),
                token_switch(b"proxmox-backup-protocol-v1", connection=False),
                [validator],
            )
            assert outcome.status == 101
            assert b"\r\nConnection: upgrade\r\n" in outcome.head + b"\r\n"
    warnings = [e for e in logs if e["log_level"].name == "warn"]
    assert len(warnings) == 1
    text = formatEvent(warnings[0])
    assert "without 'Connection: upgrade'" in text
    assert "lenient-connection" in text


def test_rfc9110_lenient_still_refuses_a_protocol_that_was_not_offered() -> None:
    outcome = upgrade_outcome(
        token_request(b"foo"),
        token_switch(b"bar", connection=False),
        [RFC9110Validator(lenient_connection=True)],
    )
    assert outcome.status == 502
    assert "switched to 'bar', which the client did not offer (it offered foo)" in outcome.body


# -- websocket ------------------------------------------------------------------------


def test_websocket_accepts_a_correct_handshake_with_subprotocol_and_extension() -> None:
    outcome = upgrade_outcome(
        ws_request(
            b"Sec-WebSocket-Protocol: chat, superchat",
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        ),
        ws_switch(
            b"Sec-WebSocket-Protocol: superchat",
            b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover",
        ),
        [WebSocketValidator()],
    )
    assert outcome.status == 101


@pytest.mark.parametrize(
    ("request_bytes", "words"),
    [
        (ws_request(version=b"8"), "needs 'Sec-WebSocket-Version: 13' (RFC 6455 §4.1)"),
        (ws_request(key=b"not-base64!"), "base64 encoding of 16 bytes (RFC 6455 §4.1)"),
        (ws_request(key=b"c2hvcnQ="), "base64 encoding of 16 bytes"),
        (ws_request(b"Sec-WebSocket-Key: " + KEY), "needs one Sec-WebSocket-Key"),
    ],
)
def test_websocket_refuses_a_bad_request_with_400_before_any_backend(
    request_bytes: bytes, words: str
) -> None:
    with capturedLogs() as logs:
        outcome = upgrade_outcome(request_bytes, b"", [WebSocketValidator()])
    assert outcome.status == 400
    assert words in outcome.body
    assert not outcome.backend_contacted
    assert words in logged(logs)


@pytest.mark.parametrize(
    ("request_extra", "switch", "words"),
    [
        (
            (),
            ws_switch(accept=b"AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            f"Sec-WebSocket-Accept AAAAAAAAAAAAAAAAAAAAAAAAAAA=, but the key calls for "
            f"{ACCEPT.decode()} (RFC 6455 §4.2.2)",
        ),
        (
            (b"Sec-WebSocket-Protocol: chat",),
            ws_switch(b"Sec-WebSocket-Protocol: admin"),
            "selected the subprotocol admin, but the client offered chat",
        ),
        (
            (),
            ws_switch(b"Sec-WebSocket-Protocol: chat"),
            "selected the subprotocol chat, but the client offered nothing",
        ),
        (
            (b"Sec-WebSocket-Extensions: permessage-deflate",),
            ws_switch(b"Sec-WebSocket-Extensions: x-webkit-deflate-frame"),
            "enabled the extension x-webkit-deflate-frame, which the client did not offer",
        ),
    ],
)
def test_websocket_refuses_a_bad_101_with_502_naming_the_rule(
    request_extra: tuple[bytes, ...], switch: bytes, words: str
) -> None:
    with capturedLogs() as logs:
        outcome = upgrade_outcome(ws_request(*request_extra), switch, [WebSocketValidator()])
    assert outcome.status == 502
    assert words in outcome.body
    assert outcome.client_closed
    assert words in logged(logs)


def test_websocket_ignores_other_protocols() -> None:
    outcome = upgrade_outcome(token_request(b"foo"), token_switch(b"foo"), [WebSocketValidator()])
    assert outcome.status == 101


# -- allow -------------------------------------------------------------------------------


def test_allow_lets_listed_protocols_through() -> None:
    outcome = upgrade_outcome(
        ws_request(), ws_switch(), [AllowValidator(["websocket", "proxmox-backup-protocol-v1"])]
    )
    assert outcome.status == 101


def test_allow_refuses_other_protocols_with_403_and_never_contacts_the_backend() -> None:
    with capturedLogs() as logs:
        outcome = upgrade_outcome(
            token_request(b"foo/2, websocket"), b"", [AllowValidator(["websocket"])]
        )
    assert outcome.status == 403
    assert "upgrades to foo/2 are not allowed here (allowed: websocket)" in outcome.body
    assert not outcome.backend_contacted
    assert "upgrades to foo/2 are not allowed here" in logged(logs)


# -- origin --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin", [b"https://app.example.com", b"https://EU.app.example.com", None]
)
def test_origin_accepts_matching_origins_and_non_browser_clients(origin: bytes | None) -> None:
    extra = (b"Origin: " + origin,) if origin else ()
    outcome = upgrade_outcome(
        ws_request(*extra),
        ws_switch(),
        [OriginValidator(["https://app.example.com", "https://*.app.example.com"])],
    )
    assert outcome.status == 101


def test_origin_refuses_other_origins_with_403() -> None:
    with capturedLogs() as logs:
        outcome = upgrade_outcome(
            ws_request(b"Origin: https://evil.example"),
            b"",
            [OriginValidator(["https://app.example.com"])],
        )
    assert outcome.status == 403
    assert (
        "WebSocket connections from origin https://evil.example are not allowed here "
        "(allowed: https://app.example.com)" in outcome.body
    )
    assert not outcome.backend_contacted
    assert "https://evil.example" in logged(logs)


def test_origin_ignores_non_websocket_upgrades() -> None:
    outcome = upgrade_outcome(
        token_request(b"foo", b"Origin: https://evil.example"),
        token_switch(b"foo"),
        [OriginValidator(["https://app.example.com"])],
    )
    assert outcome.status == 101


# -- h2c ---------------------------------------------------------------------------------

H2C_OFFER = (
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)


def test_h2c_offers_are_removed_and_the_request_proceeds_as_http11() -> None:
    h = ProxyHarness()
    h.client_sends(H2C_OFFER)
    sent = h.backend.received.lower()
    assert b"h2c" not in sent and b"http2-settings" not in sent
    assert b"\r\nupgrade:" not in sent and b"\r\nconnection:" not in sent
    h.backend.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
    )
    assert h.client_received.startswith(b"HTTP/1.1 502")


def test_other_protocols_offered_beside_h2c_stay() -> None:
    h = ProxyHarness()
    h.client_sends(token_request(b"h2c, foo", b"HTTP2-Settings: AAMAAABk"))
    sent = h.backend.received
    assert b"Upgrade: foo\r\n" in sent and b"h2c" not in sent
    assert b"Connection: upgrade\r\n" in sent


# -- the registry ---------------------------------------------------------------------------


def test_an_unknown_name_lists_every_installed_validator() -> None:
    with pytest.raises(BadValidator) as caught:
        build_chain(["nope"])
    for name in ("allow", "origin", "rfc9110", "websocket"):
        assert name in str(caught.value)


def test_every_builtin_is_installed_and_described() -> None:
    listing = describe_installed()
    for usage in ("allow:TOKEN[,TOKEN...]", "origin:PATTERN", "rfc9110[:lenient-connection]"):
        assert usage in listing
    assert "\nwebsocket " in listing


def test_build_chain_makes_validators_in_order() -> None:
    chain = build_chain(["websocket", "rfc9110:lenient-connection", "allow:websocket"])
    assert [type(v) for v in chain] == [WebSocketValidator, RFC9110Validator, AllowValidator]
    assert chain[1].lenient_connection  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("nope", "unknown validator 'nope'; installed: allow, "),
        ("allow", "allow needs a list, for example --validator allow:A,B"),
        ("origin:", "origin needs a list"),
        ("websocket:x", "websocket takes no argument"),
        ("rfc9110:lax", "rfc9110 takes no argument or 'lenient-connection', not 'lax'"),
    ],
)
def test_build_chain_explains_bad_specs(spec: str, words: str) -> None:
    with pytest.raises(BadValidator) as caught:
        build_chain([spec])
    assert words in str(caught.value)


def test_with_forward_h2c_the_offer_keeps_its_http2_settings() -> None:
    h = ProxyHarness(settings=ProxySettings(forward_h2c=True))
    h.client_sends(H2C_OFFER)
    sent = h.backend.received
    assert b"\r\nUpgrade: h2c\r\n" in sent
    assert b"\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n" in sent
    assert b"\r\nConnection: upgrade, HTTP2-Settings\r\n" in sent


def test_a_426_reaches_the_client_with_the_protocol_it_requires() -> None:
    h = ProxyHarness()
    h.client_sends(b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n")
    h.backend.send(
        b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    received = h.client_received
    assert received.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nUpgrade: websocket\r\n" in received
    assert b"\r\nConnection: upgrade\r\n" in received


def test_a_426_through_the_resource_keeps_the_protocol_it_requires_too() -> None:
    from support import MountedProxy

    m = MountedProxy()
    m.send(b"GET /app/ws HTTP/1.1\r\nHost: a\r\n\r\n")
    m.backend.send(
        b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    (head,) = m.heads()
    assert head.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nUpgrade: websocket\r\n" in head
    assert b"upgrade" in head.lower().partition(b"\r\nconnection: ")[2].split(b"\r\n")[0]
