"""The HTTP/2 door when the client sends GOAWAY (NO_ERROR) with streams still open.

RFC 9113 §6.8: GOAWAY says the sender opens no new stream; the streams
already open go on to completion. h2load ends every run so, with requests in
flight, and so does nghttp2's client whenever it is done; the ``h2`` library
sends nothing after it has received GOAWAY unless the door lets it. A plain
response in flight is tested in ``test_http2.py``; here, a tunnel and a
stream opened after the GOAWAY.
"""

from __future__ import annotations

from h2_support import H2Client, h2_cluster, request, websocket
from hyperframe.frame import GoAwayFrame
from support import OK

from upgradeproxy import rfc6455


def client_goaway(client: H2Client) -> None:
    """A GOAWAY NO_ERROR from the client, as bytes (the test's own h2 stays open to read)."""
    client.send_raw(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())


def test_a_tunnel_goes_on_after_the_client_s_goaway() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(websocket(), end=False)
    backend = cluster.last("a")
    head = backend.received.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    key = next(
        line.split(b": ", 1)[1] for line in head if line.lower().startswith(b"sec-websocket-key:")
    )
    backend.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + rfc6455.accept_for(key) + b"\r\n\r\n"
    )
    client.pump()
    assert client.response(stream).status == 200
    client_goaway(client)
    backend.send(b"news")
    client.send(stream, b"reply")
    client.pump()
    assert client.response(stream).body == b"news"
    assert backend.received.endswith(b"\r\n\r\nreply")


def test_a_stream_opened_after_the_client_s_goaway_is_refused() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    first = client.get(request(b"/1"))
    client_goaway(client)
    second = client.get(request(b"/2"))
    assert client.response(second).reset == 7  # REFUSED_STREAM
    assert len(cluster.endpoints["a"].connections) == 1
    cluster.last("a").send(OK)
    client.pump()
    assert client.response(first).body == b"hello"
    assert client.closed  # nothing left open after the client's GOAWAY
