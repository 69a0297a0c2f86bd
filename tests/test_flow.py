"""Writing to the client: what the backend's answer writes in one read goes out as one write."""

from __future__ import annotations

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
