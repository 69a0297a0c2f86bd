"""The backend side: what the client is told when a backend answers in HTTP/2."""

from __future__ import annotations

import pytest
from support import GET, OK

from upgradeproxy import BackendSettings, ProxySettings
from upgradeproxy.core._backend import SPEAKS_HTTP2, speaks_http2
from upgradeproxy.testing import ProxyHarness


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """An HTTP/2 frame (RFC 9113 §4.1)."""
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


def setting(identifier: int, value: int) -> bytes:
    return identifier.to_bytes(2, "big") + value.to_bytes(4, "big")


# What an HTTP/2-only server (nghttpd without TLS, an h2c gRPC server) sends to
# an HTTP/1.1 request: its SETTINGS (max concurrent streams, initial window,
# max header list size), then GOAWAY with PROTOCOL_ERROR, then it closes.
SETTINGS = frame(4, 0, 0, setting(3, 100) + setting(4, 65535) + setting(6, 65536))
GOAWAY = frame(7, 0, 0, (0).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"SETTINGS expected")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "http2"),
    [
        (SETTINGS + GOAWAY, True),
        (SETTINGS, True),
        (frame(4, 1, 0, b""), True),  # an empty SETTINGS acknowledgement
        (PREFACE, True),
        (PREFACE[:16], True),
        (OK, False),
        (b"HTTP/1.1 200 OK\r\n", False),
        (b"", False),
        (SETTINGS[:8], False),  # too short to tell
        (frame(0, 0, 1, b"data"), False),  # a DATA frame comes after SETTINGS, never first
        (frame(4, 0, 1, setting(3, 100)), False),  # SETTINGS belong to stream 0
        (frame(4, 0, 0, b"12345"), False),  # not a whole number of settings
        (frame(4, 8, 0, setting(3, 100)), False),  # SETTINGS have no such flag
    ],
)
def test_speaks_http2_knows_the_first_bytes_of_an_http2_server(data: bytes, http2: bool) -> None:
    assert speaks_http2(data) is http2
    assert speaks_http2(bytearray(data)) is http2


def answer_of(h: ProxyHarness) -> tuple[int, str]:
    head, _, body = h.client_received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


@pytest.mark.parametrize("pieces", [[SETTINGS + GOAWAY], [SETTINGS[:4], SETTINGS[4:], GOAWAY]])
def test_an_http2_backend_that_closes_is_named_as_such(pieces: list[bytes]) -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    for piece in pieces:
        h.backend.send(piece)
    h.backend.transport.eof()
    assert answer_of(h) == (502, SPEAKS_HTTP2 + "\n")
    assert h.backend.closed


def test_an_http2_backend_that_waits_is_named_as_such_when_the_response_times_out() -> None:
    h = ProxyHarness(settings=ProxySettings(backend=BackendSettings(response_timeout=5)))
    h.client_sends(GET)
    h.backend.send(SETTINGS)
    h.clock.advance(5)
    assert answer_of(h) == (502, SPEAKS_HTTP2 + "\n")


def test_an_http2_preface_is_named_as_such() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(PREFACE)
    assert answer_of(h) == (502, SPEAKS_HTTP2 + "\n")


def test_other_garbage_keeps_its_own_reason() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    assert answer_of(h) == (502, "malformed response from the backend: malformed status line\n")


# -- one timer per backend connection -------------------------------------------------


def _pooled_harness() -> ProxyHarness:
    settings = ProxySettings(backend=BackendSettings(response_timeout=20, idle_timeout=30))
    h = ProxyHarness(settings=settings)
    h.client_sends(GET)
    h.backend.send(OK)
    assert h.factory.proxy.pool.idle_count == 1
    return h


def test_a_pooled_connection_idle_for_its_idle_timeout_is_closed() -> None:
    h = _pooled_harness()
    h.clock.advance(29.9)
    assert not h.backend.closed
    h.clock.advance(0.2)
    assert h.backend.closed and h.factory.proxy.pool.idle_count == 0


def test_a_reused_connection_is_timed_by_its_response_timeout_not_its_idle_timeout() -> None:
    # The connection's one timer is moved from the idle timeout to the
    # response timeout when the pool hands it out again.
    h = _pooled_harness()
    h.clock.advance(25)
    h.client_sends(GET)
    assert len(h.endpoint.connections) == 1, "reused"
    h.clock.advance(10)  # past the idle deadline, within the response timeout
    assert not h.backend.closed
    h.clock.advance(10.1)  # 20 seconds after the request
    assert h.backend.closed
    assert h.client_received.count(b"HTTP/1.1 504 ") == 1


def test_a_connection_taken_from_the_pool_is_not_closed_by_its_idle_timeout() -> None:
    h = _pooled_harness()
    taken = h.factory.proxy.pool.take_idle()
    assert taken is h.backend.protocol
    h.clock.advance(60)
    assert not h.backend.closed
