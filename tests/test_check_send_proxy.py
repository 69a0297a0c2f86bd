"""``upgradeproxy check --send-proxy``: the header goes first, as a route's send_proxy sends it."""

from __future__ import annotations

import socket
import threading

import pytest

from upgradeproxy import rfc6455
from upgradeproxy.cli.check import build_request, diagnose, exchange, parse_target
from upgradeproxy.core._proxyheader import parse

TIMEOUT = 5.0


def serve_once(listener: socket.socket, received: list[bytes]) -> None:
    """Accept one connection: record what came (header and head), answer a correct 101."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        data = b""
        # The v2 header itself starts with CRLF CRLF: wait for the whole request.
        while not (b"GET " in data and data.endswith(b"\r\n\r\n")):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        received.append(data)
        key = data.split(b"Sec-WebSocket-Key: ", 1)[1].split(b"\r\n", 1)[0]
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + rfc6455.accept_for(key) + b"\r\n\r\n"
        )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_header_names_this_end_then_the_request_follows(version: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        received: list[bytes] = []
        thread = threading.Thread(target=serve_once, args=(listener, received), daemon=True)
        thread.start()
        target = parse_target(f"http://127.0.0.1:{listener.getsockname()[1]}/ws")
        request = build_request(target)
        raw = exchange(target, request, TIMEOUT, send_proxy=version)
        thread.join(TIMEOUT)
    assert diagnose(request, raw).ok
    header = parse(received[0])
    assert header is not None and header.source is not None
    assert header.source.host == "127.0.0.1"
    assert header.destination is not None and header.destination.port == target.port
    assert received[0][header.length :] == request.serialize()
