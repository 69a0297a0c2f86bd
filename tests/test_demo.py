"""Tests for the demo backend: in memory with StringTransport, plus real loopback clients."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import ParamSpec, TypeVar

import pytest
import pytest_twisted
from support import KEY
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as websocket_connect
from websockets.typing import Subprotocol

from upgradeproxy.demo import (
    ECHO_PROTOCOL,
    MAX_BODY_SIZE,
    MAX_HEAD_SIZE,
    MAX_MESSAGE_SIZE,
    PAGE,
    DemoBackendFactory,
    DemoBackendProtocol,
)
from upgradeproxy.http1 import ResponseHead, parse_response_head
from upgradeproxy.rfc6455 import accept_for

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0

# The example handshake of RFC 6455 §1.3.
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\n"
    b"Host: backend\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: chat, superchat\r\n"
    b"\r\n"
)
ECHO_UPGRADE = (
    b"GET /echo HTTP/1.1\r\nHost: backend\r\nUpgrade: upgradeproxy-echo\r\n"
    b"Connection: Upgrade\r\n\r\n"
)
MASK = b"\x37\xfa\x21\x3d"

P = ParamSpec("P")
R = TypeVar("R")


class HalfCloseableStringTransport(StringTransport):
    """A StringTransport that records a half-close."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def connect() -> tuple[DemoBackendProtocol, HalfCloseableStringTransport]:
    protocol = DemoBackendFactory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert isinstance(protocol, DemoBackendProtocol)
    transport = HalfCloseableStringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def get(path: bytes, *headers: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: backend\r\n%s\r\n" % (
        path,
        b"".join(h + b"\r\n" for h in headers),
    )


def split_response(data: bytes, *, head_only: bool = False) -> tuple[ResponseHead, bytes, bytes]:
    """The first response in ``data``: its head, its body, and the bytes after it."""
    parsed = parse_response_head(data)
    assert parsed is not None, data
    head, end = parsed
    length = head.headers.get(b"content-length")
    size = 0 if head_only or length is None else int(length)
    assert len(data) - end >= size
    return head, data[end : end + size], data[end + size :]


def client_frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        header = bytes((first, mask_bit | size))
    elif size < 1 << 16:
        header = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")
    if not masked:
        return header + payload
    return header + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """``(opcode, payload)`` of each frame; each must be final, unmasked, without RSV bits."""
    frames = []
    pos = 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1]
        assert first & 0xF0 == 0x80, "not FIN, or RSV bits set"
        assert not second & 0x80, "masked frame from the server"
        size, pos = second & 0x7F, pos + 2
        if size >= 126:
            width = 2 if size == 126 else 8
            size, pos = int.from_bytes(data[pos : pos + width], "big"), pos + width
        frames.append((first & 0x0F, data[pos : pos + size]))
        pos += size
    assert pos == len(data), "truncated frame"
    return frames


def open_websocket(
    first_bytes: bytes = b"",
) -> tuple[DemoBackendProtocol, HalfCloseableStringTransport, bytes]:
    """A WebSocket connection, and what the server sent after its 101 response."""
    protocol, transport = connect()
    protocol.dataReceived(HANDSHAKE + first_bytes)
    head, _, rest = split_response(transport.value(), head_only=True)
    assert head.status == 101
    transport.clear()
    return protocol, transport, rest


def assert_half_closed(transport: HalfCloseableStringTransport) -> None:
    """The server has sent FIN after its last bytes and waits for the client's."""
    assert transport.write_closed
    assert not transport.disconnecting
    assert transport.producer is None


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big")


# HTTP


def test_page_is_served() -> None:
    protocol, transport = connect()
    protocol.dataReceived(get(b"/"))
    head, body, rest = split_response(transport.value())
    assert head.status == 200
    assert head.headers.get(b"content-type") == b"text/html; charset=utf-8"
    assert body == PAGE
    assert rest == b""
    assert not transport.disconnecting
    assert b"/ws" in PAGE
    assert b'id="result"' in PAGE


def test_head_of_page_has_length_but_no_body() -> None:
    protocol, transport = connect()
    protocol.dataReceived(b"HEAD / HTTP/1.1\r\nHost: backend\r\n\r\n")
    head, _, rest = split_response(transport.value(), head_only=True)
    assert head.status == 200
    assert head.headers.get(b"content-length") == b"%d" % len(PAGE)
    assert rest == b""


def test_unknown_path_is_404_and_keeps_alive() -> None:
    protocol, transport = connect()
    protocol.dataReceived(get(b"/missing?x=1"))
    head, body, _ = split_response(transport.value())
    assert head.status == 404
    assert head.headers.get(b"content-type") == b"text/plain; charset=utf-8"
    assert body == b"no such page: /missing\n"
    assert not transport.disconnecting


def test_absolute_form_target_is_routed_by_its_path() -> None:
    protocol, transport = connect()
    protocol.dataReceived(get(b"http://backend/?q"))
    assert split_response(transport.value())[0].status == 200


def test_wrong_method_on_page_is_405() -> None:
    protocol, transport = connect()
    protocol.dataReceived(b"DELETE / HTTP/1.1\r\nHost: backend\r\n\r\n")
    head, _, _ = split_response(transport.value())
    assert head.status == 405
    assert head.headers.get(b"allow") == b"GET, HEAD"


def test_two_requests_in_one_packet_get_two_responses_in_order() -> None:
    protocol, transport = connect()
    protocol.dataReceived(get(b"/") + get(b"/missing"))
    first, body, rest = split_response(transport.value())
    second, _, rest = split_response(rest)
    assert (first.status, second.status) == (200, 404)
    assert body == PAGE
    assert rest == b""


def test_request_arriving_byte_by_byte() -> None:
    protocol, transport = connect()
    for byte in get(b"/missing"):
        protocol.dataReceived(bytes((byte,)))
    head, _, rest = split_response(transport.value())
    assert head.status == 404
    assert rest == b""


def test_connection_close_is_honoured_and_later_bytes_ignored() -> None:
    protocol, transport = connect()
    protocol.dataReceived(get(b"/missing", b"Connection: close") + get(b"/"))
    head, _, rest = split_response(transport.value())
    assert head.headers.get(b"connection") == b"close"
    assert rest == b""
    assert_half_closed(transport)


@pytest.mark.parametrize(
    ("request_bytes", "connection", "closes"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", b"close", True),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", b"keep-alive", False),
    ],
)
def test_http_1_0_persistence(request_bytes: bytes, connection: bytes, closes: bool) -> None:
    protocol, transport = connect()
    protocol.dataReceived(request_bytes)
    head, _, _ = split_response(transport.value())
    assert head.headers.get(b"connection") == connection
    assert transport.write_closed is closes


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\nHost: backend\n\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: backend\r\n\r\n", 505),
        (
            b"POST /echo-body HTTP/1.1\r\nHost: backend\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            b"POST /echo-body HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n",
            400,
        ),
        (b"GET /" + b"a" * MAX_HEAD_SIZE + b" HTTP/1.1\r\n", 431),
    ],
    ids=["bare-lf", "no-host", "http-2", "cl-and-te", "bad-chunk", "head-too-large"],
)
def test_malformed_request_is_rejected_and_closed(request_bytes: bytes, status: int) -> None:
    protocol, transport = connect()
    protocol.dataReceived(request_bytes)
    protocol.dataReceived(get(b"/"))
    head, body, rest = split_response(transport.value())
    assert head.status == status
    assert head.headers.get(b"connection") == b"close"
    assert body.endswith(b"\n")
    assert rest == b""
    assert_half_closed(transport)


def test_echo_body_with_content_length_then_next_request() -> None:
    protocol, transport = connect()
    protocol.dataReceived(
        b"POST /echo-body HTTP/1.1\r\nHost: backend\r\nContent-Length: 5\r\n"
        b"Content-Type: text/x-greeting\r\n\r\nhello" + get(b"/missing")
    )
    head, body, rest = split_response(transport.value())
    assert head.status == 200
    assert head.headers.get(b"content-type") == b"text/x-greeting"
    assert body == b"hello"
    assert split_response(rest)[0].status == 404


def test_echo_body_chunked_across_packets() -> None:
    protocol, transport = connect()
    message = (
        b"POST /echo-body HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: yes\r\n\r\n"
    )
    for i in range(0, len(message), 7):
        protocol.dataReceived(message[i : i + 7])
    head, body, rest = split_response(transport.value())
    assert head.headers.get(b"content-type") == b"application/octet-stream"
    assert body == b"hello, world"
    assert rest == b""


def test_body_of_an_unrouted_request_is_consumed_not_parsed() -> None:
    protocol, transport = connect()
    smuggled = get(b"/")
    protocol.dataReceived(
        b"POST /missing HTTP/1.1\r\nHost: backend\r\nContent-Length: %d\r\n\r\n%s%s"
        % (len(smuggled), smuggled, get(b"/missing"))
    )
    first, _, rest = split_response(transport.value())
    second, _, rest = split_response(rest)
    assert (first.status, second.status) == (404, 404)
    assert rest == b""


def test_expect_100_continue() -> None:
    protocol, transport = connect()
    protocol.dataReceived(
        b"POST /echo-body HTTP/1.1\r\nHost: backend\r\nContent-Length: 3\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    transport.clear()
    protocol.dataReceived(b"abc")
    head, body, _ = split_response(transport.value())
    assert (head.status, body) == (200, b"abc")


def test_echo_body_too_large_is_413_and_closes() -> None:
    protocol, transport = connect()
    protocol.dataReceived(
        b"POST /echo-body HTTP/1.1\r\nHost: backend\r\nContent-Length: %d\r\n\r\n"
        % (MAX_BODY_SIZE + 1)
    )
    protocol.dataReceived(bytes(MAX_BODY_SIZE + 1))
    head, _, _ = split_response(transport.value())
    assert head.status == 413
    assert_half_closed(transport)


def test_eof_between_requests_half_closes_then_closes() -> None:
    protocol, transport = connect()
    protocol.dataReceived(get(b"/missing"))
    protocol.readConnectionLost()
    assert_half_closed(transport)
    protocol.writeConnectionLost()
    assert transport.disconnecting


def test_client_eof_after_our_half_close_closes() -> None:
    protocol, transport = connect()
    protocol.dataReceived(get(b"/missing", b"Connection: close"))
    protocol.writeConnectionLost()
    assert not transport.disconnecting
    protocol.dataReceived(b"ignored")
    protocol.readConnectionLost()
    assert transport.disconnecting


def test_closing_resumes_reading_paused_by_a_full_write_buffer() -> None:
    protocol, transport = connect()
    transport.pauseProducing()
    protocol.dataReceived(get(b"/", b"Connection: close"))
    assert transport.producerState == "producing"
    assert_half_closed(transport)


# WebSocket


def test_websocket_without_upgrade_is_426() -> None:
    protocol, transport = connect()
    protocol.dataReceived(get(b"/ws"))
    head, _, _ = split_response(transport.value())
    assert head.status == 426
    assert head.headers.get(b"upgrade") == b"websocket"
    assert head.headers.tokens(b"connection") == [b"upgrade"]
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "change",
    [
        (b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"),
        (b"Sec-WebSocket-Version: 13\r\n", b""),
        (b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""),
        (KEY, b"not base64!"),
        (KEY, b"AAAAAAAAAAAAAAAAAAAA"),  # 15 bytes
        (KEY, KEY + b"\r\nSec-WebSocket-Key: " + KEY),
        (b"GET", b"PUT"),
    ],
    ids=["version-8", "no-version", "no-key", "key-not-base64", "short-key", "two-keys", "put"],
)
def test_bad_websocket_handshake_is_400(change: tuple[bytes, bytes]) -> None:
    protocol, transport = connect()
    protocol.dataReceived(HANDSHAKE.replace(*change))
    head, _, _ = split_response(transport.value())
    assert head.status == 400
    assert head.headers.get(b"sec-websocket-version") == b"13"
    assert not transport.disconnecting


def test_handshake_and_first_frame_in_one_packet() -> None:
    protocol, transport = connect()
    protocol.dataReceived(HANDSHAKE + client_frame(TEXT, "héllo".encode()))
    head, _, rest = split_response(transport.value(), head_only=True)
    assert head.status == 101
    assert head.headers.get(b"upgrade") == b"websocket"
    assert head.headers.get(b"connection") == b"Upgrade"
    assert head.headers.get(b"sec-websocket-accept") == ACCEPT == accept_for(KEY)
    assert not head.headers.has(b"sec-websocket-protocol")
    assert not head.headers.has(b"content-length")
    assert server_frames(rest) == [(TEXT, "héllo".encode())]


def test_frames_arriving_byte_by_byte() -> None:
    data = HANDSHAKE + client_frame(BINARY, b"\x00\xff" * 100) + client_frame(PING, b"p")
    protocol, transport = connect()
    for byte in data:
        protocol.dataReceived(bytes((byte,)))
    _, _, rest = split_response(transport.value(), head_only=True)
    assert server_frames(rest) == [(BINARY, b"\x00\xff" * 100), (PONG, b"p")]


@pytest.mark.parametrize(
    ("size", "header_size"), [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)]
)
def test_payload_length_encodings(size: int, header_size: int) -> None:
    payload = os.urandom(size)
    _, _, echoed = open_websocket(client_frame(BINARY, payload))
    assert len(echoed) == header_size + size
    assert server_frames(echoed) == [(BINARY, payload)]


def test_fragmented_message_with_ping_in_between() -> None:
    protocol, transport, _ = open_websocket()
    protocol.dataReceived(
        client_frame(TEXT, b"hel", fin=False)
        + client_frame(PING, b"are you there")
        + client_frame(CONTINUATION, b"lo ", fin=False)
        + client_frame(CONTINUATION, b"")
    )
    protocol.dataReceived(client_frame(BINARY, b"next", fin=False))
    protocol.dataReceived(client_frame(CONTINUATION, b"!"))
    assert server_frames(transport.value()) == [
        (PONG, b"are you there"),
        (TEXT, b"hello "),
        (BINARY, b"next!"),
    ]


def test_unsolicited_pong_is_ignored() -> None:
    protocol, transport, _ = open_websocket()
    protocol.dataReceived(client_frame(PONG, b"x") + client_frame(TEXT, b"a"))
    assert server_frames(transport.value()) == [(TEXT, b"a")]


@pytest.mark.parametrize("payload", [b"", b"\x03\xe8", b"\x0f\xa0bye"])
def test_close_is_echoed_with_its_code_then_connection_closed(payload: bytes) -> None:
    protocol, transport, _ = open_websocket()
    protocol.dataReceived(client_frame(CLOSE, payload) + client_frame(TEXT, b"too late"))
    assert server_frames(transport.value()) == [(CLOSE, payload[:2])]
    assert_half_closed(transport)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (client_frame(TEXT, b"hi", masked=False), 1002),
        (client_frame(TEXT, b"hi", rsv=0x40), 1002),
        (client_frame(0x3, b"hi"), 1002),
        (client_frame(0xB, b"hi"), 1002),
        (client_frame(CONTINUATION, b"hi"), 1002),
        (client_frame(TEXT, b"a", fin=False) + client_frame(TEXT, b"b"), 1002),
        (client_frame(PING, b"hi", fin=False), 1002),
        (client_frame(PING, bytes(126)), 1002),
        (client_frame(CLOSE, b"\x03"), 1002),
        (client_frame(CLOSE, (1005).to_bytes(2, "big")), 1002),
        (client_frame(CLOSE, (2000).to_bytes(2, "big")), 1002),
        (client_frame(CLOSE, b"\x03\xe8\xff"), 1007),
        (client_frame(TEXT, b"\xc3"), 1007),
        (client_frame(TEXT, b"\xc3", fin=False) + client_frame(CONTINUATION, b"("), 1007),
        (bytes((0x82, 0xFF)) + (MAX_MESSAGE_SIZE + 1).to_bytes(8, "big"), 1009),
        (bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big"), 1002),
        (
            client_frame(BINARY, b"a", fin=False)
            + bytes((0x00, 0xFF))
            + MAX_MESSAGE_SIZE.to_bytes(8, "big"),
            1009,
        ),
    ],
    ids=[
        "unmasked",
        "rsv1",
        "opcode-3",
        "opcode-b",
        "continuation-first",
        "new-message-mid-fragments",
        "fragmented-ping",
        "long-ping",
        "one-byte-close",
        "close-1005",
        "close-2000",
        "close-reason-not-utf8",
        "text-not-utf8",
        "fragmented-text-not-utf8",
        "too-big",
        "length-top-bit",
        "too-big-fragmented",
    ],
)
def test_bad_frames_fail_the_connection(frames: bytes, code: int) -> None:
    protocol, transport, _ = open_websocket()
    protocol.dataReceived(frames + client_frame(TEXT, b"ignored"))
    [(opcode, payload)] = server_frames(transport.value())
    assert opcode == CLOSE
    assert close_code(payload) == code
    assert_half_closed(transport)


def test_eof_without_close_frame_half_closes() -> None:
    protocol, transport, _ = open_websocket()
    protocol.readConnectionLost()
    assert_half_closed(transport)


# The raw echo protocol


def test_echo_upgrade_with_bytes_in_the_same_packet() -> None:
    protocol, transport = connect()
    protocol.dataReceived(ECHO_UPGRADE + b"first bytes")
    head, _, rest = split_response(transport.value(), head_only=True)
    assert head.status == 101
    assert head.headers.get(b"upgrade") == ECHO_PROTOCOL.encode()
    assert head.headers.get(b"connection") == b"Upgrade"
    assert rest == b"first bytes"
    transport.clear()
    protocol.dataReceived(get(b"/"))
    assert transport.value() == get(b"/")


def test_echo_half_closes_after_the_client_does() -> None:
    protocol, transport = connect()
    protocol.dataReceived(ECHO_UPGRADE + b"data")
    protocol.readConnectionLost()
    assert_half_closed(transport)
    assert transport.value().endswith(b"\r\n\r\ndata")
    protocol.writeConnectionLost()
    assert transport.disconnecting


def test_echo_upgrade_waits_for_the_request_body() -> None:
    protocol, transport = connect()
    protocol.dataReceived(
        b"POST /echo HTTP/1.1\r\nHost: backend\r\nUpgrade: h2c, UpgradeProxy-Echo\r\n"
        b"Connection: keep-alive, UPGRADE\r\nContent-Length: 4\r\n\r\nbody" + b"raw"
    )
    head, _, rest = split_response(transport.value(), head_only=True)
    assert head.status == 101
    assert rest == b"raw"


@pytest.mark.parametrize(
    "request_bytes",
    [
        get(b"/echo"),
        get(b"/echo", b"Upgrade: websocket", b"Connection: Upgrade"),
        b"GET /echo HTTP/1.0\r\nUpgrade: upgradeproxy-echo\r\nConnection: Upgrade\r\n\r\n",
    ],
    ids=["no-upgrade", "other-protocol", "http-1.0"],
)
def test_echo_without_its_upgrade_is_426(request_bytes: bytes) -> None:
    protocol, transport = connect()
    protocol.dataReceived(request_bytes)
    head, _, _ = split_response(transport.value())
    assert head.status == 426
    assert head.headers.get(b"upgrade") == ECHO_PROTOCOL.encode()


# Loopback


@pytest_twisted.async_yield_fixture
async def backend_port() -> AsyncIterator[int]:
    port = reactor.listenTCP(0, DemoBackendFactory(), interface="127.0.0.1")
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    try:
        yield address.port
    finally:
        await defer.maybeDeferred(port.stopListening)


async def in_thread(function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run a blocking client in a thread, bounded in time."""
    d = deferToThread(function, *args, **kwargs)
    d.addTimeout(30, reactor)
    return await d


def websocket_client(port: int, big: bytes) -> tuple[str | bytes, str | bytes, bool, str | None]:
    with websocket_connect(
        f"ws://127.0.0.1:{port}/ws",
        subprotocols=[Subprotocol("chat")],
        proxy=None,
        open_timeout=10,
        close_timeout=10,
        max_size=None,
    ) as ws:
        ws.send("héllo")
        text = ws.recv(timeout=10)
        ws.send(big)
        binary = ws.recv(timeout=10)
        pong = ws.ping(b"ping").wait(10)
        return text, binary, pong, ws.subprotocol


def oversized_message_client(port: int) -> int | None:
    with websocket_connect(f"ws://127.0.0.1:{port}/ws", proxy=None, max_size=None) as ws:
        try:
            ws.send(bytes(MAX_MESSAGE_SIZE + 1))
            ws.recv(timeout=10)
        except ConnectionClosed as closed:
            return None if closed.rcvd is None else closed.rcvd.code
    raise AssertionError("the server echoed an oversized message")


def raw_echo_client(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(ECHO_UPGRADE + data)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
        return bytes(received)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_websockets_library_client_over_loopback(backend_port: int) -> None:
    big = os.urandom(1024 * 1024)
    result = await in_thread(websocket_client, backend_port, big)
    assert result == ("héllo", big, True, None)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_oversized_message_close_frame_reaches_the_client(backend_port: int) -> None:
    # The client is still sending when the server refuses the message: the
    # Close frame must not be lost to a reset.
    for _ in range(3):
        assert await in_thread(oversized_message_client, backend_port) == 1009


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_raw_echo_half_close_over_loopback(backend_port: int) -> None:
    data = os.urandom(256 * 1024)
    received = await in_thread(raw_echo_client, backend_port, data)
    head, _, rest = split_response(received, head_only=True)
    assert head.status == 101
    assert rest == data
