"""Writing to the client: what the backend's answer writes in one read goes out as one write."""

from __future__ import annotations

from upgradeproxy import ProxySettings
from upgradeproxy.testing import ProxyHarness


def test_a_response_read_in_one_piece_is_written_to_the_client_in_one_piece() -> None:
    h = ProxyHarness()
    writes: list[bytes] = []
    real_write = h.client_transport.write

    def write(data: bytes) -> None:
        writes.append(data)
        real_write(data)

    h.client_transport.write = write  # type: ignore[method-assign]
    h.client_sends(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    h.backend.send(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert len(writes) == 1, writes
    assert writes[0].startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert writes[0].endswith(b"5\r\nhello\r\n0\r\n\r\n")


def _producers(h: ProxyHarness) -> list[object]:
    """Record every producer registered on the client's transport."""
    registered: list[object] = []
    real_register = h.client_transport.registerProducer

    def register(producer: object, streaming: bool) -> None:
        registered.append(producer)
        real_register(producer, streaming)

    h.client_transport.registerProducer = register  # type: ignore[method-assign]
    return registered


def test_a_body_that_comes_whole_with_its_head_needs_no_flow_control() -> None:
    h = ProxyHarness()
    registered = _producers(h)
    h.client_sends(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    h.backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert h.client_received.endswith(b"\r\n\r\nhello")
    assert registered == []
    assert h.client_transport.producer is None


def test_a_body_that_goes_on_past_its_first_read_makes_the_backend_the_clients_producer() -> None:
    h = ProxyHarness()
    registered = _producers(h)
    h.client_sends(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    h.backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    assert registered == [h.backend.transport]
    assert h.client_transport.producer is h.backend.transport
    h.backend.send(b"world")
    assert h.client_received.endswith(b"helloworld")
    assert h.client_transport.producer is None, "unregistered at the end of the body"


def test_the_head_timer_lets_a_slow_answer_finish_then_times_the_idle_connection() -> None:
    # The head timer keeps running through a request (it is moved, not
    # replaced, for the next head): it must not cut the answer short, and
    # the idle time counts from the end of the answer.
    h = ProxyHarness(settings=ProxySettings(request_head_timeout=10, keep_alive_timeout=5))
    h.client_sends(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    h.clock.advance(30)
    assert not h.client_closed
    h.backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.client_received.endswith(b"\r\n\r\nok")
    h.clock.advance(4.9)
    assert not h.client_closed
    h.clock.advance(0.2)
    assert h.client_closed
