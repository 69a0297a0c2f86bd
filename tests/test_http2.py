"""The HTTP/2 front door, in memory: the h2 library as the client, scripted HTTP/1.1 backends."""

from __future__ import annotations

from typing import Any

import pytest
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    InformationalResponseReceived,
    ResponseReceived,
    TrailersReceived,
)
from h2.settings import SettingCodes
from h2_support import LAX, H2Client, h2_cluster, request, websocket, without_goaway
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame
from support import GET, OK, SWITCH, Cluster
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import formatEvent
from zope.interface import directlyProvides, implementer

from upgradeproxy import ProxySettings, rfc6455
from upgradeproxy.core._client import ClientConnection
from upgradeproxy.core._http2 import (
    FLOOD_LIMIT,
    INTERVAL,
    PREFACE,
    RESET_LIMIT,
    STREAM_CEILING,
    HTTP2Connection,
)
from upgradeproxy.core._proxyheader import ProxiedAddress
from upgradeproxy.core.accesslog import AccessLog
from upgradeproxy.interfaces import IUpgradeValidator, UpgradeAttempt
from upgradeproxy.testing import MemoryTransport


def test_a_get_over_prior_knowledge_reaches_the_backend_as_http_1_1() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request(b"/page?q=1", b"GET", b"app.example", (b"accept", b"*/*")))
    assert cluster.last("a").received == (
        b"GET /page?q=1 HTTP/1.1\r\nhost: app.example\r\naccept: */*\r\n"
        b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: app.example\r\nVia: 2 upgradeproxy\r\n\r\n"
    )
    cluster.last("a").send(OK)
    client.pump()
    response = client.response(stream)
    assert (response.status, response.body, response.ended) == (200, b"hello", True)
    assert response.headers[b"content-length"] == b"5"


def test_an_extended_connect_becomes_a_websocket_upgrade_checked_against_the_proxy_s_key() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(websocket(b"/chat", (b"sec-websocket-protocol", b"chat")), end=False)
    received = cluster.last("a").received
    head = dict(line.split(b": ", 1) for line in received.split(b"\r\n\r\n")[0].split(b"\r\n")[1:])
    assert received.startswith(b"GET /chat HTTP/1.1\r\n")
    assert (head[b"Upgrade"], head[b"Connection"]) == (b"websocket", b"upgrade")
    assert head[b"sec-websocket-version"] == b"13"
    assert head[b"sec-websocket-protocol"] == b"chat"
    key = head[b"sec-websocket-key"]
    assert rfc6455.is_valid_key(key)
    cluster.last("a").send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + rfc6455.accept_for(key) + b"\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n\r\nearly"
    )
    client.pump()
    response = client.response(stream)
    assert response.status == 200
    assert response.headers[b"sec-websocket-protocol"] == b"chat"
    assert b"sec-websocket-accept" not in response.headers
    assert response.body == b"early"
    client.send(stream, b"frame")
    assert cluster.last("a").received.endswith(b"\r\n\r\nframe")


def test_a_backend_answering_the_wrong_accept_gets_a_502_on_the_stream() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(websocket(), end=False)
    cluster.last("a").send(SWITCH)  # the RFC's sample accept, not for the proxy's key
    client.pump()
    response = client.response(stream)
    assert response.status == 502
    assert b"Sec-WebSocket-Accept" in response.body
    assert response.reset == ErrorCodes.NO_ERROR
    assert cluster.last("a").closed


# -- what the proxy tells every client ----------------------------------------------------


def test_the_settings_advertise_extended_connect_and_the_limits() -> None:
    client = H2Client(h2_cluster(http2_max_concurrent_streams=7).factory)
    assert client.advertised[SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
    assert client.advertised[SettingCodes.MAX_CONCURRENT_STREAMS] == 7
    assert client.advertised[SettingCodes.MAX_HEADER_LIST_SIZE] == 32 * 1024


def test_without_cleartext_http2_a_listening_factory_builds_only_http_1_1_connections() -> None:
    cluster = Cluster()
    connection = cluster.factory.buildProtocol(None)
    assert type(connection) is ClientConnection
    client = cluster.client()
    client.send(PREFACE)
    assert client.received.startswith(b"HTTP/1.1 505 ")


def test_with_cleartext_http2_an_http_1_1_client_is_served_as_before() -> None:
    cluster = h2_cluster()
    client = cluster.client()
    client.send(GET[:1])
    client.send(GET[1:])
    cluster.last("a").send(OK)
    assert client.received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert client.received.endswith(b"hello")


def test_a_part_of_the_preface_and_then_silence_is_closed_after_the_head_timeout() -> None:
    cluster = h2_cluster(request_head_timeout=5)
    client = cluster.client()
    client.send(PREFACE[:10])
    cluster.clock.advance(5)
    assert client.closed


# -- plain requests -------------------------------------------------------------------------


def backend_head(received: bytes) -> list[bytes]:
    return received.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_a_body_of_known_length_goes_with_its_content_length() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(
        request(b"/up", b"POST", b"app.example", (b"content-length", b"6")), end=False
    )
    client.send(stream, b"abc")
    client.send(stream, b"def", end=True)
    received = cluster.last("a").received
    assert b"content-length: 6" in backend_head(received)
    assert b"Transfer-Encoding: chunked" not in received
    assert received.endswith(b"\r\n\r\nabcdef")


def test_a_body_of_unknown_length_is_chunked_to_the_backend() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request(b"/up", b"POST"), end=False)
    client.send(stream, b"abc")
    client.send(stream, b"", end=True)
    received = cluster.last("a").received
    assert b"Transfer-Encoding: chunked" in backend_head(received)
    assert received.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    cluster.last("a").send(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    client.pump()
    assert (client.response(stream).body, client.response(stream).ended) == (b"ok", True)


def test_cookies_split_by_the_client_are_joined_for_the_backend() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    client.get(request(b"/", b"GET", b"app.example", (b"cookie", b"a=1"), (b"cookie", b"b=2")))
    assert b"cookie: a=1; b=2" in backend_head(cluster.last("a").received)


def test_connection_specific_fields_of_the_backend_s_response_are_not_forwarded() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request())
    cluster.last("a").send(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n"
        b"X-Hop: 1\r\nProxy-Connection: x\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok"
    )
    client.pump()
    headers = client.response(stream).headers
    assert headers[b"x-kept"] == b"yes"
    assert not {b"connection", b"keep-alive", b"x-hop", b"proxy-connection"} & set(headers)


def test_the_access_record_says_http_2() -> None:
    lines: list[str] = []
    cluster = h2_cluster(access_log=AccessLog(observer=lambda e: lines.append(formatEvent(e))))
    client = H2Client(cluster.factory)
    client.get(request(b"/page"))
    cluster.last("a").send(OK)
    client.pump()
    assert '192.0.2.7 "GET /page HTTP/2" 200 5 ' in lines[-1]


def test_a_head_request_gets_its_head_only() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request(b"/", b"HEAD"))
    cluster.last("a").send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    client.pump()
    response = client.response(stream)
    assert (response.status, response.body, response.ended) == (200, b"", True)
    assert cluster.last("a").protocol.is_idle


def test_streams_share_a_connection_each_with_its_own_backend_connection() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    first, second = client.get(request(b"/1")), client.get(request(b"/2"))
    one, two = cluster.endpoints["a"].connections
    two.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
    client.pump()
    assert client.response(second).body == b"two"
    assert client.response(first).status is None
    one.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    client.pump()
    assert client.response(first).body == b"one"


def test_a_body_over_the_route_s_limit_gets_413_and_never_reaches_the_backend() -> None:
    cluster = h2_cluster({"default": {"backends": ["a"], "max_request_body": 4}})
    client = H2Client(cluster.factory)
    stream = client.get(
        request(b"/", b"POST", b"app.example", (b"content-length", b"5")), end=False
    )
    assert client.response(stream).status == 413
    assert cluster.count("a") == 0


def test_a_streamed_body_over_the_limit_gets_413_and_the_backend_connection_is_dropped() -> None:
    cluster = h2_cluster({"default": {"backends": ["a"], "max_request_body": 4}})
    client = H2Client(cluster.factory)
    stream = client.get(request(b"/", b"POST"), end=False)
    client.send(stream, b"abcdef")
    response = client.response(stream)
    assert response.status == 413
    assert response.reset == ErrorCodes.NO_ERROR
    assert cluster.last("a").closed
    # The connection goes on, and its window was given back.
    assert client.h2.outbound_flow_control_window > 65_535
    later = client.get(request(b"/later"))
    assert cluster.last("a").received.startswith(b"GET /later ")
    assert later == 3


def test_an_unreachable_backend_gets_502_on_the_stream() -> None:
    cluster = h2_cluster()
    cluster.endpoints["a"].refuse = True
    client = H2Client(cluster.factory)
    stream = client.get(request())
    response = client.response(stream)
    assert response.status == 502
    assert response.body.startswith(b"the backend (a) could not be reached: ")


# -- flow control, tied to backpressure --------------------------------------------------------


def test_a_full_backend_keeps_the_client_s_window_shut_until_it_drains() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request(b"/up", b"POST"), end=False)
    backend = cluster.last("a")
    backend.transport.producer.pauseProducing()  # its send buffer is full
    client.send(stream, b"x" * 65_535)
    assert client.h2.local_flow_control_window(stream) == 0
    assert backend.received.split(b"\r\n\r\n", 1)[1].count(b"x") == 65_535
    backend.transport.producer.resumeProducing()
    client.pump()
    assert client.h2.local_flow_control_window(stream) > 0


def test_a_body_that_comes_before_its_backend_connection_waits_within_the_window() -> None:
    cluster = h2_cluster()
    cluster.endpoints["a"].hold_connections = True
    client = H2Client(cluster.factory)
    stream = client.get(
        request(b"/up", b"POST", b"app.example", (b"content-length", b"3")), end=False
    )
    client.send(stream, b"abc", end=True)
    assert client.h2.local_flow_control_window(stream) == 65_535 - 3, "not acknowledged yet"
    cluster.endpoints["a"].complete_connection()
    assert cluster.last("a").received.endswith(b"\r\n\r\nabc")


def test_a_response_goes_as_far_as_the_client_s_window_and_pauses_the_backend() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory, window=10)
    stream = client.get(request())
    backend = cluster.last("a")
    backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" + b"y" * 25)
    client.pump()
    assert client.response(stream).body == b"y" * 10
    assert backend.transport.producerState == "paused"
    client.h2.acknowledge_received_data(10, stream)
    client.pump()
    assert backend.transport.producerState == "paused", "15 bytes still wait"
    client.h2.acknowledge_received_data(10, stream)
    client.pump()
    assert backend.transport.producerState == "producing"
    backend.send(b"y" * 5)
    client.h2.acknowledge_received_data(10, stream)
    client.pump()
    response = client.response(stream)
    assert (response.body, response.ended) == (b"y" * 30, True)


def _frames(data: bytes) -> list[tuple[str, frozenset[str]]]:
    """The type and flags of each frame in ``data``."""
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frames.append((type(frame).__name__, frozenset(frame.flags)))
        data = data[9 + length :]
    return frames


def test_a_body_of_known_length_ends_the_stream_with_its_last_data_frame() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory, window=10)
    stream = client.get(request())
    backend = cluster.last("a")
    backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n" + b"y" * 15)
    assert _frames(client.transport.value()) == [
        ("HeadersFrame", frozenset({"END_HEADERS"})),
        ("DataFrame", frozenset()),
    ]
    client.pump()
    client.h2.acknowledge_received_data(10, stream)
    client.h2.increment_flow_control_window(10)
    client.transport.protocol.dataReceived(client.h2.data_to_send())
    assert _frames(client.transport.value()) == [("DataFrame", frozenset({"END_STREAM"}))]
    client.pump()
    response = client.response(stream)
    assert (response.body, response.ended) == (b"y" * 15, True)


def test_a_client_that_keeps_its_window_shut_has_the_stream_reset_after_the_stall_timeout() -> None:
    cluster = h2_cluster(http2_stall_timeout=30)
    client = H2Client(cluster.factory, window=0)
    stream = client.get(request())
    backend = cluster.last("a")
    backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n" + b"z" * 65_536)
    cluster.clock.advance(29)
    client.pump()
    assert client.response(stream).reset is None
    cluster.clock.advance(1)
    client.pump()
    assert client.response(stream).reset == ErrorCodes.CANCEL
    assert backend.closed


def test_a_client_connection_with_a_full_send_buffer_pauses_its_backends() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    client.get(request())
    backend = cluster.last("a")
    backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    client.transport.producer.pauseProducing()
    assert backend.transport.producerState == "paused"
    client.transport.producer.resumeProducing()
    assert backend.transport.producerState == "producing"


# -- WebSockets and other protocols over extended CONNECT (RFC 8441) ------------------------------


def accept_from(received: bytes) -> bytes:
    """The 101 that accepts the WebSocket upgrade the backend received."""
    key = next(
        line.split(b": ", 1)[1]
        for line in backend_head(received)
        if line.lower().startswith(b"sec-websocket-key:")
    )
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + rfc6455.accept_for(key) + b"\r\n\r\n"
    )


def open_websocket(cluster: Cluster, client: H2Client, path: bytes = b"/chat") -> tuple[int, Any]:
    stream = client.get(websocket(path), end=False)
    backend = cluster.last("a")
    backend.send(accept_from(backend.received))
    client.pump()
    assert client.response(stream).status == 200
    return stream, backend


def test_bytes_sent_before_the_backend_s_101_reach_it_after_the_switch() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(websocket(), end=False)
    client.send(stream, b"first frame")
    backend = cluster.last("a")
    assert not backend.received.endswith(b"first frame")
    backend.send(accept_from(backend.received))
    client.pump()
    assert backend.received.endswith(b"\r\n\r\nfirst frame")


def test_the_client_s_end_stream_half_closes_the_backend_and_its_fin_ends_the_stream() -> None:
    lines: list[str] = []
    cluster = h2_cluster(access_log=AccessLog(observer=lambda e: lines.append(formatEvent(e))))
    client = H2Client(cluster.factory)
    stream, backend = open_websocket(cluster, client)
    client.send(stream, b"bye", end=True)
    assert backend.transport.write_closed
    assert not backend.closed
    backend.send(b"last words")
    backend.transport.eof()
    client.pump()
    response = client.response(stream)
    assert (response.body, response.ended, response.reset) == (b"last words", True, None)
    assert backend.closed
    assert not cluster.proxy.tunnels
    assert '192.0.2.7 "TUNNEL /chat websocket HTTP/2" ' in lines[-1]
    assert "up=3 down=10 closed_by=client" in lines[-1]


def test_a_client_s_reset_closes_the_backend_connection() -> None:
    lines: list[str] = []
    cluster = h2_cluster(access_log=AccessLog(observer=lambda e: lines.append(formatEvent(e))))
    client = H2Client(cluster.factory)
    stream, backend = open_websocket(cluster, client)
    client.h2.reset_stream(stream, ErrorCodes.CANCEL)
    client.pump()
    assert backend.closed
    assert not cluster.proxy.tunnels
    assert not client.closed
    assert 'closed_by=client reason="the client reset the stream (CANCEL)"' in lines[-1]


def test_a_backend_that_resets_ends_the_stream() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream, backend = open_websocket(cluster, client)
    backend.transport.reset()
    client.pump()
    response = client.response(stream)
    assert response.ended
    assert response.reset == ErrorCodes.NO_ERROR
    assert not cluster.proxy.tunnels


def test_validators_see_the_door_and_the_snapshot_shows_it() -> None:
    seen: list[UpgradeAttempt] = []

    @implementer(IUpgradeValidator)
    class Recorder:
        name = "recorder"

        def check_request(self, attempt: UpgradeAttempt) -> None:
            seen.append(attempt)

        def check_response(self, attempt: UpgradeAttempt) -> None:
            seen.append(attempt)

    cluster = h2_cluster()
    route = cluster.proxy.router.routes[0]
    cluster.proxy.router.routes[0].validators = (*route.validators, Recorder())  # type: ignore[misc]
    client = H2Client(cluster.factory)
    open_websocket(cluster, client)
    assert [a.client_protocol for a in seen] == ["HTTP/2", "HTTP/2"]
    assert seen[0].request.method == b"GET"
    assert seen[1].response is not None and seen[1].response.status == 101
    [tunnel] = cluster.proxy.snapshot()["tunnels"]
    assert (tunnel["protocol"], tunnel["client_protocol"]) == ("websocket", "HTTP/2")


def test_another_protocol_token_becomes_its_upgrade_without_a_websocket_key() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    headers = websocket(b"/socket")
    headers[1] = (b":protocol", b"proxmox-backup-protocol-v1")
    stream = client.get(headers[:5], end=False)
    backend = cluster.last("a")
    head = backend_head(backend.received)
    assert b"Upgrade: proxmox-backup-protocol-v1" in head
    assert not any(line.lower().startswith(b"sec-websocket") for line in head)
    backend.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: proxmox-backup-protocol-v1\r\n"
        b"Connection: upgrade\r\n\r\n"
    )
    client.pump()
    assert client.response(stream).status == 200
    client.send(stream, b"raw")
    assert backend.received.endswith(b"raw")


def test_several_websockets_and_plain_streams_share_a_connection_independently() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    one, first = open_websocket(cluster, client)
    two, second = open_websocket(cluster, client)
    page = client.get(request(b"/page"))
    cluster.last("a").send(OK)
    client.pump()
    assert client.response(page).body == b"hello"
    client.send(two, b"to two")
    first.send(b"from one")
    client.pump()
    assert second.received.endswith(b"to two") and not first.received.endswith(b"to two")
    assert client.response(one).body == b"from one"
    client.h2.reset_stream(one, ErrorCodes.CANCEL)
    client.pump()
    assert first.closed and not second.closed
    second.send(b"still here")
    client.pump()
    assert client.response(two).body == b"still here"


def test_a_tunnel_s_idle_timeout_closes_its_stream_only() -> None:
    cluster = h2_cluster({"default": {"backends": ["a"], "tunnel_idle_timeout": 10}})
    client = H2Client(cluster.factory)
    idle, quiet = open_websocket(cluster, client)
    busy, talking = open_websocket(cluster, client)
    for _ in range(6):
        cluster.clock.advance(2.5)
        talking.send(b".")
    client.pump()
    assert quiet.closed and not talking.closed
    assert client.response(idle).ended
    assert not client.response(busy).ended


def test_a_refused_upgrade_request_gets_its_status_and_the_backend_is_never_asked() -> None:
    cluster = h2_cluster(max_tunnels=0)
    client = H2Client(cluster.factory)
    stream = client.get(websocket(), end=False)
    response = client.response(stream)
    assert response.status == 503
    assert b"limit of 0 tunnels" in response.body
    assert cluster.count("a") == 0


# -- shutdown, idleness, admission ----------------------------------------------------------------


def test_a_drain_sends_goaway_refuses_new_streams_and_waits_for_the_one_in_flight() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request())
    [connection] = cluster.proxy.connections
    assert type(connection) is HTTP2Connection and connection.busy
    drained = cluster.proxy.drain(30)
    client.pump()
    goaway = client.goaway()
    assert goaway is not None
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, stream)
    late = client.get(request(b"/late"))
    assert client.response(late).reset == ErrorCodes.REFUSED_STREAM
    assert not drained.called
    cluster.last("a").send(OK)
    client.pump()
    assert client.response(stream).body == b"hello"
    assert client.closed
    assert drained.called


def test_a_drain_gives_a_tunnel_its_grace_period_then_closes_it() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream, backend = open_websocket(cluster, client)
    drained = cluster.proxy.drain(30)
    cluster.clock.advance(29)
    assert not backend.closed and not drained.called
    cluster.clock.advance(1)
    client.pump()
    assert backend.closed and client.closed
    assert client.response(stream).ended
    assert drained.called


def test_a_preface_and_then_silence_is_closed_after_the_head_timeout() -> None:
    cluster = h2_cluster(request_head_timeout=5)
    client = H2Client(cluster.factory)
    cluster.clock.advance(4.9)
    assert not client.closed
    cluster.clock.advance(0.1)
    client.pump()
    assert client.closed
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.NO_ERROR


def test_a_connection_without_streams_is_closed_after_the_keep_alive_timeout() -> None:
    cluster = h2_cluster(keep_alive_timeout=7)
    client = H2Client(cluster.factory)
    client.get(request())
    cluster.last("a").send(OK)
    cluster.clock.advance(6.9)
    assert not client.closed
    cluster.clock.advance(0.1)
    assert client.closed


def test_the_keep_alive_timeout_counts_from_the_end_of_the_last_stream() -> None:
    cluster = h2_cluster(keep_alive_timeout=7)
    client = H2Client(cluster.factory)
    client.get(request())
    cluster.last("a").send(OK)
    cluster.clock.advance(5)
    client.get(request())  # open across the first deadline
    cluster.clock.advance(5)
    client.pump()
    assert not client.closed
    cluster.last("a").send(OK)
    client.pump()
    cluster.clock.advance(6.9)
    assert not client.closed
    cluster.clock.advance(0.1)
    assert client.closed


def test_a_connection_over_the_limit_gets_503_saying_why() -> None:
    cluster = h2_cluster(max_connections=0)
    client = H2Client(cluster.factory)
    stream = client.get(request())
    response = client.response(stream)
    assert response.status == 503
    assert b"limit of 0 connections" in response.body
    assert cluster.count("a") == 0
    assert client.closed


# -- hostile input (RFC 9113 and the published attacks) ----------------------------------------


def test_streams_opened_and_reset_at_once_cost_no_backend_connection_and_end_with_goaway() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    for _ in range(RESET_LIMIT * 3):
        stream = client.h2.get_next_available_stream_id()
        client.h2.send_headers(stream, request(), end_stream=True)
        client.h2.reset_stream(stream, ErrorCodes.CANCEL)
    client.pump()
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.closed
    assert cluster.endpoints["a"].attempts == 0


def test_streams_reset_one_read_later_cost_a_bounded_number_of_backend_connections() -> None:
    cluster = h2_cluster()
    cluster.endpoints["a"].hold_connections = True
    client = H2Client(cluster.factory)
    while not client.closed:
        stream = client.get(request())
        client.h2.reset_stream(stream, ErrorCodes.CANCEL)
        client.pump()
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert cluster.endpoints["a"].attempts == RESET_LIMIT + 1


def test_a_stream_answered_and_reset_within_one_read_ends_quietly() -> None:
    cluster = h2_cluster({"default": {"backends": ["a"], "max_request_body": 4}})
    client = H2Client(cluster.factory)
    stream = client.get(request(b"/", b"POST"), end=False)
    client.h2.send_data(stream, b"over the limit")  # answered with 413 at once...
    client.h2.reset_stream(stream, ErrorCodes.CANCEL)  # ...which h2 knows is reset
    client.pump()
    assert not client.closed
    assert client.response(stream).status is None
    assert cluster.last("a").closed
    assert client.get(request(b"/next")) == stream + 2


def test_resets_spread_over_time_are_not_an_attack() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    for _ in range(3):
        for _ in range(RESET_LIMIT):
            stream = client.h2.get_next_available_stream_id()
            client.h2.send_headers(stream, request(), end_stream=True)
            client.h2.reset_stream(stream, ErrorCodes.CANCEL)
        client.pump()
        cluster.clock.advance(INTERVAL)
    assert client.goaway() is None and not client.closed


def test_streams_over_the_advertised_limit_are_refused_one_by_one() -> None:
    cluster = h2_cluster(http2_max_concurrent_streams=3)
    cluster.endpoints["a"].hold_connections = True
    client = H2Client(cluster.factory)
    client.ignore_stream_limit()
    streams = [client.get(request()) for _ in range(5)]
    assert [client.response(s).reset for s in streams] == [None] * 3 + [
        ErrorCodes.REFUSED_STREAM
    ] * 2
    assert cluster.endpoints["a"].attempts == 3
    assert not client.closed


def test_a_continuation_flood_ends_the_connection_after_a_bounded_header_block() -> None:
    client = H2Client(h2_cluster().factory)
    start = HeadersFrame(1)
    start.data = b"\x82"  # :method GET, and the block goes on
    client.send_raw(start.serialize())
    sent = 0
    while not client.closed and sent < 200:
        more = ContinuationFrame(1)
        more.data = b"\x00" * 16_000
        client.send_raw(more.serialize())
        sent += 1
    assert client.closed
    assert sent <= 65, "h2 refuses more than 64 CONTINUATION frames"
    client.pump()
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.PROTOCOL_ERROR


def test_an_oversized_header_list_gets_431_and_the_connection_goes_on() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request(b"/", b"GET", b"app.example", (b"x-big", b"v" * 40_000)))
    response = client.response(stream)
    assert response.status == 431
    assert b"larger than 32768 bytes" in response.body
    assert cluster.count("a") == 0
    client.get(request(b"/next"))
    assert cluster.last("a").received.startswith(b"GET /next ")


def test_an_hpack_bomb_ends_the_connection_with_enhance_your_calm() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    # One 4000-byte field, indexed once and then named by one byte 200 times: a
    # small block that inflates to 800 KB.
    bomb = request(b"/", b"GET", b"app.example", *[(b"x-bomb", b"b" * 4000)] * 200)
    assert len(Encoder().encode(bomb)) < 5000
    client.get(bomb)
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.closed
    assert cluster.count("a") == 0


def test_a_ping_flood_ends_the_connection_with_enhance_your_calm() -> None:
    client = H2Client(h2_cluster().factory)
    for number in range(FLOOD_LIMIT - 1):  # the client's first SETTINGS counts too
        client.h2.ping(b"%08d" % number)
    client.pump()
    assert client.goaway() is None
    client.h2.ping(b"one more")
    client.pump()
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.closed


def test_a_settings_flood_ends_the_connection_with_enhance_your_calm() -> None:
    client = H2Client(h2_cluster().factory)
    for _ in range(FLOOD_LIMIT + 1):
        client.h2.update_settings({SettingCodes.HEADER_TABLE_SIZE: 4096})
    client.pump()
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_flood_of_unknown_frames_ends_the_connection() -> None:
    client = H2Client(h2_cluster().factory)
    unknown = b"\x00\x00\x00\xfa\x00\x00\x00\x00\x00"  # type 0xfa, empty, stream 0
    for _ in range(FLOOD_LIMIT):
        client.send_raw(unknown)
    client.pump()
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_flood_of_empty_data_frames_ends_the_connection() -> None:
    client = H2Client(h2_cluster().factory)
    stream = client.get(request(b"/", b"POST"), end=False)
    for _ in range(FLOOD_LIMIT + 1):
        client.h2.send_data(stream, b"")
    client.pump()
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_an_invalid_preface_is_closed_with_goaway_protocol_error() -> None:
    cluster = h2_cluster()
    connection = HTTP2Connection(cluster.proxy)
    transport = MemoryTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
        peerAddress=IPv4Address("TCP", "192.0.2.7", 50000),
    )
    transport.protocol = connection
    connection.makeConnection(transport)
    connection.dataReceived(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    reader = H2Connection(LAX)
    reader.initiate_connection()
    events = reader.receive_data(transport.value())
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == ErrorCodes.PROTOCOL_ERROR
    assert not transport.connected
    assert not cluster.proxy.connections


MALFORMED = {
    "CR in a value": request(b"/", b"GET", b"app.example", (b"x-a", b"a\rb")),
    "LF in a value": request(b"/", b"GET", b"app.example", (b"x-a", b"a\r\nx-smuggled: 1")),
    "NUL in a value": request(b"/", b"GET", b"app.example", (b"x-a", b"a\x00b")),
    "a value starting with a space": request(b"/", b"GET", b"app.example", (b"x-a", b" a")),
    "an uppercase name": request(b"/", b"GET", b"app.example", (b"X-A", b"1")),
    "a colon in a name": request(b"/", b"GET", b"app.example", (b"x:a", b"1")),
    "a space in a name": request(b"/", b"GET", b"app.example", (b"x a", b"1")),
    "Connection": request(b"/", b"GET", b"app.example", (b"connection", b"close")),
    "Keep-Alive": request(b"/", b"GET", b"app.example", (b"keep-alive", b"5")),
    "Proxy-Connection": request(b"/", b"GET", b"app.example", (b"proxy-connection", b"x")),
    "Transfer-Encoding": request(b"/", b"GET", b"app.example", (b"transfer-encoding", b"chunked")),
    "Upgrade": request(b"/", b"GET", b"app.example", (b"upgrade", b"websocket")),
    "TE other than trailers": request(b"/", b"GET", b"app.example", (b"te", b"gzip")),
    ":protocol without CONNECT": request(
        b"/", b"GET", b"app.example", (b":protocol", b"websocket")
    ),
    "an extended CONNECT without :path": [f for f in websocket() if f[0] != b":path"],
    "an extended CONNECT without :scheme": [f for f in websocket() if f[0] != b":scheme"],
    "a :path without a slash": request(b"page"),
    "a :path with a space": request(b"/a b"),
    "an empty :path": request(b""),
    "a pseudo-header after a field": [(b"accept", b"*/*"), *request()],
    "an unknown pseudo-header": request(b"/", b"GET", b"app.example", (b":status", b"200")),
    "two :path": request(b"/", b"GET", b"app.example", (b":path", b"/admin")),
    "no :method": request()[1:],
    "a host other than the :authority": request(
        b"/", b"GET", b"a.example", (b"host", b"b.example")
    ),
    "userinfo in the :authority": request(b"/", b"GET", b"user@app.example"),
    "no host at all": [f for f in request() if f[0] != b":authority"],
    "a content-length with no content": request(
        b"/", b"POST", b"app.example", (b"content-length", b"5")
    ),
}


@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_request_is_a_stream_error_and_never_reaches_the_backend(
    fields: list[tuple[bytes, bytes]],
) -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(fields)
    response = client.response(stream)
    assert response.status == 400, response
    assert cluster.count("a") == 0
    assert not client.closed
    assert client.get(request(b"/next")) == stream + 2
    assert cluster.last("a").received.startswith(b"GET /next ")


def test_a_malformed_request_still_sending_is_reset_with_protocol_error() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(MALFORMED["Transfer-Encoding"], end=False)
    response = client.response(stream)
    assert (response.status, response.reset) == (400, ErrorCodes.PROTOCOL_ERROR)


def test_a_plain_connect_is_refused_as_on_http_1_1() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get([(b":method", b"CONNECT"), (b":authority", b"example.com:443")], end=False)
    response = client.response(stream)
    assert response.status == 501
    assert b"CONNECT is not supported" in response.body
    assert cluster.count("a") == 0


def test_more_data_than_the_content_length_never_reaches_the_backend() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(
        request(b"/up", b"POST", b"app.example", (b"content-length", b"3")), end=False
    )
    head = cluster.last("a").received
    client.send(stream, b"abcGET /smuggled HTTP/1.1\r\nHost: app.example\r\n\r\n")
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert cluster.last("a").received == head
    assert cluster.last("a").closed
    assert cluster.count("a") == 1


def test_less_data_than_the_content_length_never_completes_a_request_to_the_backend() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(
        request(b"/up", b"POST", b"app.example", (b"content-length", b"10")), end=False
    )
    head = cluster.last("a").received
    client.send(stream, b"abc")
    client.send(stream, b"de", end=True)
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert cluster.last("a").received == head + b"abc"
    assert cluster.last("a").closed


def test_a_content_length_that_is_no_number_ends_the_connection_before_the_backend() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    client.get(request(b"/", b"POST", b"app.example", (b"content-length", b"1e3")))
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert cluster.count("a") == 0


def test_a_tunnel_s_lifetime_closes_its_stream_only() -> None:
    cluster = h2_cluster({"default": {"backends": ["a"], "tunnel_lifetime": 30}})
    client = H2Client(cluster.factory)
    old, first = open_websocket(cluster, client)
    cluster.clock.advance(20)
    young, second = open_websocket(cluster, client)
    cluster.clock.advance(10)
    client.pump()
    assert first.closed and not second.closed
    assert client.response(old).ended and not client.response(young).ended
    assert not client.closed


def test_a_client_that_chose_h2_over_alpn_is_handed_to_the_http2_door() -> None:
    cluster = Cluster()
    client = cluster.client()
    client.transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
    client.protocol.handshakeCompleted()  # type: ignore[attr-defined]
    [connection] = cluster.proxy.connections
    assert type(connection) is HTTP2Connection
    assert client.transport.protocol is connection
    assert cluster.proxy.stats.connections_total == 1
    h2 = H2Connection(LAX)
    h2.initiate_connection()
    h2.send_headers(1, request(), end_stream=True)
    connection.dataReceived(h2.data_to_send())
    assert cluster.last("a").received.startswith(b"GET /page HTTP/1.1\r\n")


def test_a_protocol_error_ends_the_streams_and_tunnels_of_the_connection_at_once() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    _, tunnel = open_websocket(cluster, client)
    client.get(request(b"/slow"))
    slow = cluster.last("a")
    client.transport.loseConnection = lambda: None  # type: ignore[method-assign]  # a slow close
    client.send_raw(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # WINDOW_UPDATE of 0
    assert tunnel.closed and slow.closed
    assert not cluster.proxy.tunnels
    slow.send(OK)  # a backend that answers late writes nothing into the closed connection


def test_interim_responses_are_relayed_before_the_final_one() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(
        request(b"/", b"POST", b"app.example", (b"expect", b"100-continue")), end=False
    )
    cluster.last("a").send(b"HTTP/1.1 100 Continue\r\n\r\n")
    client.pump()
    client.send(stream, b"body", end=True)
    cluster.last("a").send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK)
    client.pump()
    statuses = [
        int(dict(e.headers)[b":status"])
        for e in client.of(stream)
        if isinstance(e, (InformationalResponseReceived, ResponseReceived))
    ]
    assert statuses == [100, 103, 200]
    assert client.response(stream).body == b"hello"


def test_a_very_large_stream_limit_keeps_the_window_and_settings_in_range() -> None:
    client = H2Client(h2_cluster(http2_max_concurrent_streams=10**9).factory)
    assert client.advertised[SettingCodes.MAX_CONCURRENT_STREAMS] == 10**9
    assert client.h2.outbound_flow_control_window == 2**31 - 1


def test_a_response_the_backend_cuts_short_resets_the_stream() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request())
    cluster.last("a").send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    cluster.last("a").transport.reset()
    client.pump()
    response = client.response(stream)
    assert (response.status, response.body) == (200, b"abc")
    assert response.reset == ErrorCodes.INTERNAL_ERROR
    assert not client.closed


def test_a_client_s_goaway_with_an_error_ends_the_connection_and_its_streams() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    _, tunnel = open_websocket(cluster, client)
    client.get(request())
    client.h2.close_connection(ErrorCodes.INTERNAL_ERROR)
    client.pump()
    assert client.closed
    assert cluster.last("a").closed and tunnel.closed
    assert not cluster.proxy.connections


def test_a_client_s_goaway_lets_its_streams_finish_then_the_connection_closes() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request())
    client.send_raw(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
    assert not client.closed
    cluster.last("a").send(OK)
    client.pump()
    assert client.response(stream).body == b"hello"
    assert client.closed


def test_an_eof_before_the_first_bytes_closes_a_cleartext_connection() -> None:
    cluster = h2_cluster()
    client = cluster.client()
    client.transport.eof()
    assert client.closed


def test_the_backend_s_trailers_end_the_stream_without_framing_fields() -> None:
    cluster = h2_cluster()
    client = H2Client(cluster.factory)
    stream = client.get(request())
    cluster.last("a").send(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
        b"2\r\nok\r\n0\r\nGrpc-Status: 0\r\nContent-Length: 2\r\n\r\n"
    )
    client.pump()
    [trailers] = [e for e in client.of(stream) if isinstance(e, TrailersReceived)]
    assert trailers.headers == [(b"grpc-status", b"0")]
    assert client.response(stream).body == b"ok"
    assert cluster.last("a").protocol.is_idle


def test_behind_a_proxy_protocol_balancer_a_stream_names_the_client_the_header_named() -> None:
    cluster = h2_cluster()
    client = IPv4Address("TCP", "198.51.100.4", 40000)
    address = ProxiedAddress(client, IPv4Address("TCP", "203.0.113.1", 443), "balancer")
    protocol = cluster.factory.buildProtocol(address)
    assert protocol is not None
    transport = MemoryTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
        peerAddress=IPv4Address("TCP", "10.0.0.9", 50000),
    )
    transport.protocol = protocol
    protocol.makeConnection(transport)
    h2 = H2Connection(LAX)
    h2.initiate_connection()
    h2.send_headers(1, request(), end_stream=True)
    transport.protocol.dataReceived(h2.data_to_send())
    assert b"\r\nX-Forwarded-For: 198.51.100.4\r\n" in cluster.last("a").received


@pytest.mark.parametrize("held", [True, False], ids=["held", "streamed"])
def test_bodies_refused_give_the_connection_s_window_back(held: bool) -> None:
    cluster = h2_cluster({"default": {"backends": ["a"], "max_request_body": 10}})
    endpoint = cluster.endpoints["a"]
    endpoint.hold_connections = held
    client = H2Client(cluster.factory)
    body = b"x" * 60_000
    # More than the connection's window in all, even counting only the first
    # DATA frame of each: it must come back stream after stream.
    for _ in range(450):
        stream = client.get(request(b"/up", b"POST"), end=False)
        client.send(stream, body)
        if held:
            assert client.h2.local_flow_control_window(stream) == 65_535 - len(body)
            endpoint.complete_connection()
            client.pump()
        assert client.response(stream).status == 413
    assert client.h2.outbound_flow_control_window >= 65_535


def test_streams_far_over_the_limit_in_one_read_end_the_connection() -> None:
    cluster = h2_cluster(http2_max_concurrent_streams=2)
    cluster.endpoints["a"].hold_connections = True
    client = H2Client(cluster.factory)
    client.ignore_stream_limit()
    for _ in range(2 * STREAM_CEILING + 1):
        client.h2.send_headers(client.h2.get_next_available_stream_id(), request())
    client.pump()
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert client.closed


def test_a_tunnel_whose_client_keeps_its_window_shut_is_closed_after_the_stall_timeout() -> None:
    cluster = h2_cluster(http2_stall_timeout=20)
    client = H2Client(cluster.factory, window=5)
    stream, backend = open_websocket(cluster, client)
    backend.send(b"more than five bytes")
    assert backend.transport.producerState == "paused"
    cluster.clock.advance(20)
    client.pump()
    assert client.response(stream).reset == ErrorCodes.CANCEL
    assert backend.closed
    assert not cluster.proxy.tunnels


def tls_client_connection(cluster: Cluster) -> tuple[Any, MemoryTransport]:
    """A client connection whose transport says it is TLS, its handshake not done yet."""
    transport = MemoryTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
        peerAddress=IPv4Address("TCP", "192.0.2.7", 50000),
    )
    directlyProvides(transport, ISSLTransport)
    transport.setTcpNoDelay = lambda enabled: None  # type: ignore[attr-defined]
    protocol = cluster.factory.buildProtocol(transport.getPeer())
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_tls_client_over_the_limit_that_chose_h2_gets_its_503_in_http2() -> None:
    cluster = Cluster(settings=ProxySettings(max_connections=0))
    protocol, transport = tls_client_connection(cluster)
    assert transport.value() == b"", "the answer waits for ALPN"
    transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
    protocol.handshakeCompleted()
    h2 = H2Connection(LAX)
    h2.initiate_connection()
    h2.send_headers(1, request(), end_stream=True)
    transport.protocol.dataReceived(h2.data_to_send())
    frames, goaways = without_goaway(transport.value())
    [response] = [e for e in h2.receive_data(frames) if isinstance(e, ResponseReceived)]
    assert dict(response.headers)[b":status"] == b"503"
    assert len(goaways) == 1
    assert cluster.count("a") == 0


def test_a_tls_client_over_the_limit_that_chose_http_1_1_gets_its_503_after_the_handshake() -> None:
    cluster = Cluster(settings=ProxySettings(max_connections=0))
    protocol, transport = tls_client_connection(cluster)
    assert transport.value() == b""
    transport.negotiatedProtocol = b"http/1.1"  # type: ignore[attr-defined]
    protocol.handshakeCompleted()
    assert transport.value().startswith(b"HTTP/1.1 503 ")


def test_a_tls_client_that_never_finishes_its_handshake_is_closed_after_the_head_timeout() -> None:
    cluster = Cluster(settings=ProxySettings(max_connections=0, request_head_timeout=5))
    _, transport = tls_client_connection(cluster)
    cluster.clock.advance(5)
    assert not transport.connected
