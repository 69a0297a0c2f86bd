"""HTTP/2 header lists to the HTTP/1.1 heads the exchange carries out, and back (pure functions)."""

from __future__ import annotations

from h2_support import request, websocket

from upgradeproxy.core._h2heads import (
    Malformed,
    StreamRequest,
    header_list_size,
    response_fields,
    stream_request,
    tunnel_fields,
)
from upgradeproxy.http1 import Headers, ResponseHead, is_upgrade_request

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def parse(
    fields: list[tuple[bytes, bytes]], *, ended: bool = True, connect_protocol: bool = True
) -> StreamRequest | Malformed:
    return stream_request(
        fields, ended=ended, connect_protocol=connect_protocol, max_size=32 * 1024, key=lambda: KEY
    )


def test_an_extended_connect_is_malformed_where_extended_connect_was_not_advertised() -> None:
    parsed = parse(websocket(), ended=False, connect_protocol=False)
    assert parsed == Malformed(
        ":protocol, but this connection did not enable extended CONNECT (RFC 8441 §4)"
    )
    assert isinstance(parse(websocket(), ended=False), StreamRequest)


def test_a_websocket_keeps_the_client_s_version_and_gets_the_proxy_s_key_only() -> None:
    fields = [*websocket(), (b"sec-websocket-key", b"the client's own")]
    fields = [(n, b"8" if n == b"sec-websocket-version" else v) for n, v in fields]
    parsed = parse(fields, ended=False)
    assert isinstance(parsed, StreamRequest) and is_upgrade_request(parsed.head)
    headers = parsed.head.headers
    assert headers.get_all(b"sec-websocket-key") == [KEY]
    assert headers.get_all(b"sec-websocket-version") == [b"8"]
    assert parsed.head.method == b"GET"


def test_only_a_websocket_gets_a_key() -> None:
    made: list[bytes] = []

    def key() -> bytes:
        made.append(KEY)
        return KEY

    fields = [(n, b"tcp" if n == b":protocol" else v) for n, v in websocket()]
    parsed = stream_request(fields, ended=False, connect_protocol=True, max_size=1 << 15, key=key)
    assert isinstance(parsed, StreamRequest)
    assert parsed.head.headers.get_all(b"upgrade") == [b"tcp"]
    assert made == []


def test_a_plain_connect_is_left_for_the_exchange_to_refuse() -> None:
    parsed = parse([(b":method", b"CONNECT"), (b":authority", b"example.com:443")], ended=False)
    assert isinstance(parsed, StreamRequest)
    assert (parsed.head.method, parsed.head.target) == (b"CONNECT", b"example.com:443")


def test_cookie_fields_are_joined_into_one_after_the_others() -> None:
    fields = [(b"cookie", b"a=1"), *request(), (b"accept", b"*/*"), (b"cookie", b"b=2")]
    parsed = parse(fields)
    assert isinstance(parsed, StreamRequest)
    assert list(parsed.head.headers)[-2:] == [(b"accept", b"*/*"), (b"cookie", b"a=1; b=2")]


def test_the_header_list_size_counts_32_bytes_a_field() -> None:
    fields = request()
    assert header_list_size(fields) == sum(len(n) + len(v) + 32 for n, v in fields)
    too_big = stream_request(
        fields, ended=True, connect_protocol=True, max_size=header_list_size(fields) - 1,
        key=lambda: KEY,
    )  # fmt: skip
    assert isinstance(too_big, Malformed) and too_big.status == 431


def test_answers_are_lowercase_without_connection_specific_fields_and_carry_via() -> None:
    head = ResponseHead(
        200, b"OK", (1, 1),
        Headers(((b"Content-Type", b"text/plain"), (b"Connection", b"close"), (b"Via", b"1.0 a"))),
    )  # fmt: skip
    assert response_fields(head) == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"via", b"1.0 a, 1.1 upgradeproxy"),
    ]


def test_answers_leave_out_what_connection_names_and_join_every_via_in_order() -> None:
    head = ResponseHead(
        200, b"OK", (1, 1),
        Headers((
            (b"VIA", b"1.0 a"), (b"Connection", b"X-Hop, keep-alive"), (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"X-Kept", b"2"),
            (b"connection", b"X-Other"), (b"x-other", b"3"), (b"Via", b"1.1 b"),
        )),
    )  # fmt: skip
    assert response_fields(head) == [
        (b":status", b"200"),
        (b"x-kept", b"2"),
        (b"via", b"1.0 a, 1.1 b, 1.1 upgradeproxy"),
    ]


def test_a_tunnel_s_answer_is_200_without_the_accept_value() -> None:
    head = ResponseHead(
        101, b"Switching Protocols", (1, 1),
        Headers((
            (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Accept", b"x"), (b"Sec-WebSocket-Protocol", b"chat"),
        )),
    )  # fmt: skip
    assert tunnel_fields(head) == [
        (b":status", b"200"),
        (b"sec-websocket-protocol", b"chat"),
        (b"via", b"1.1 upgradeproxy"),
    ]
