"""The proxy's logic in memory: scripted client and backend, a fake clock, no sockets."""

from __future__ import annotations

import pytest
from support import GET, OK, SWITCH, UPGRADE, messages
from twisted.logger import capturedLogs

from upgradeproxy import BackendSettings, ProxySettings, Refusal
from upgradeproxy.testing import ProxyHarness


def after_head(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


def head_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[0]


# -- the switch: every byte exactly once, in order ---------------------------------


def test_bytes_behind_the_upgrade_request_reach_the_backend_after_the_switch() -> None:
    h = ProxyHarness()
    h.client_sends(UPGRADE + b"\x81\x05early")
    forwarded = h.backend.received
    assert b"early" not in forwarded, "held bytes must wait for the switch"
    h.backend.send(SWITCH)
    assert h.backend.received == forwarded + b"\x81\x05early"


def test_bytes_sent_while_the_backend_answers_are_held_then_replayed_in_order() -> None:
    h = ProxyHarness()
    h.client_sends(UPGRADE + b"one,")
    h.client_sends(b"two,")
    h.client_sends(b"three")
    before = h.backend.received
    h.backend.send(SWITCH)
    assert h.backend.received == before + b"one,two,three"
    h.client_sends(b",four")
    assert h.backend.received == before + b"one,two,three,four"


def test_bytes_behind_the_backends_101_reach_the_client_right_after_it() -> None:
    h = ProxyHarness()
    h.client_sends(UPGRADE)
    h.backend.send(SWITCH + b"\x81\x05hello")
    received = h.client_received
    assert received.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert after_head(received) == b"\x81\x05hello"


def test_the_101_sent_to_the_client_is_well_formed() -> None:
    h = ProxyHarness()
    h.client_sends(UPGRADE)
    h.backend.send(SWITCH)
    head = head_of(h.client_received).lower()
    assert b"\r\nconnection: upgrade" in head
    assert b"\r\nupgrade: websocket" in head
    assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head


def test_the_backend_gets_upgrade_and_connection_upgrade_back_but_no_other_hop_fields() -> None:
    h = ProxyHarness()
    h.client_sends(
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nUpgrade: proxmox-backup-protocol-v1\r\n\r\n"
    )
    head = h.backend.received
    assert b"Connection: upgrade\r\n" in head
    assert b"Upgrade: proxmox-backup-protocol-v1\r\n" in head
    assert b"X-Secret" not in head
    assert b"Keep-Alive" not in head


def test_after_the_switch_bytes_flow_both_ways_unchanged() -> None:
    h = ProxyHarness()
    h.client_sends(UPGRADE)
    h.backend.send(SWITCH)
    base_client, base_backend = h.client_received, h.backend.received
    h.client_sends(b"GET / HTTP/1.1\r\n\r\n")  # not HTTP any more: passed through as is
    h.backend.send(b"\x00\xffraw")
    assert h.backend.received == base_backend + b"GET / HTTP/1.1\r\n\r\n"
    assert h.client_received == base_client + b"\x00\xffraw"


def test_the_tunnel_wires_each_transport_as_the_others_producer() -> None:
    h = ProxyHarness()
    h.client_sends(UPGRADE)
    h.backend.send(SWITCH)
    assert h.client_transport.producer is h.backend.transport
    assert h.backend.transport.producer is h.client_transport


# -- refusals of a 101 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_head", "response", "words"),
    [
        pytest.param(
            UPGRADE,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "without 'Connection: upgrade' (RFC 9110 §7.6.1)",
            id="no-connection-upgrade",
        ),
        pytest.param(
            UPGRADE,
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n",
            "without an Upgrade header",
            id="no-upgrade-field",
        ),
        pytest.param(
            UPGRADE,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
            "switched to 'h2c', which the client did not offer",
            id="protocol-not-offered",
        ),
        pytest.param(
            GET,
            SWITCH,
            "to a request that did not ask to upgrade",
            id="unsolicited",
        ),
        pytest.param(
            UPGRADE,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
            b"Content-Length: 0\r\n\r\n",
            "carries Content-Length",
            id="framing-on-101",
        ),
    ],
)
def test_a_bad_101_gets_502_naming_the_rule_and_closes_both(
    request_head: bytes, response: bytes, words: str
) -> None:
    h = ProxyHarness()
    with capturedLogs() as logs:
        h.client_sends(request_head + b"early")
        h.backend.send(response + b"late")
    received = h.client_received
    assert received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert words in after_head(received).decode()
    assert b"late" not in received and not h.backend.received.endswith(b"early")
    assert h.client_closed and h.backend.closed
    assert words in messages(logs)
    assert any(e["log_level"].name == "warn" for e in logs)


def test_a_101_before_the_request_body_is_complete_is_refused() -> None:
    h = ProxyHarness()
    h.client_sends(
        b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
        b"Content-Length: 10\r\n\r\n12345"
    )
    h.backend.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n"
    )
    assert h.client_received.startswith(b"HTTP/1.1 502")
    assert "before the whole request body" in h.client_received.decode()


def test_a_request_body_before_the_switch_is_forwarded_and_the_switch_allowed() -> None:
    h = ProxyHarness()
    h.client_sends(
        b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
        b"Content-Length: 5\r\n\r\nhelloTUNNEL"
    )
    assert h.backend.received.endswith(b"\r\n\r\nhello")
    h.backend.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n"
    )
    assert h.client_received.startswith(b"HTTP/1.1 101")
    assert h.backend.received.endswith(b"\r\n\r\nhelloTUNNEL")


def test_an_unsolicited_101_is_refused_even_with_no_validators() -> None:
    h = ProxyHarness(validators=[])
    h.client_sends(GET)
    h.backend.send(SWITCH)
    assert h.client_received.startswith(b"HTTP/1.1 502")


class _Refuse:
    name = "refuse"

    def __init__(self, on_request: Refusal | None = None, on_response: Refusal | None = None):
        self.on_request = on_request
        self.on_response = on_response

    def check_request(self, attempt):  # type: ignore[no-untyped-def]
        return self.on_request

    def check_response(self, attempt):  # type: ignore[no-untyped-def]
        return self.on_response


def _provide(validator: object) -> object:
    from zope.interface import directlyProvides

    from upgradeproxy import IUpgradeValidator

    directlyProvides(validator, IUpgradeValidator)
    return validator


def test_a_validator_refusing_the_request_answers_its_status_and_never_contacts_the_backend():
    h = ProxyHarness(validators=[_provide(_Refuse(on_request=Refusal("origin not allowed", 403)))])
    h.client_sends(UPGRADE)
    assert h.client_received.startswith(b"HTTP/1.1 403 Forbidden")
    assert b"origin not allowed" in h.client_received
    assert h.endpoint.connections == []
    assert h.client_closed


def test_a_validator_that_raises_refuses_and_is_logged() -> None:
    class Broken(_Refuse):
        def check_response(self, attempt):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    h = ProxyHarness(validators=[_provide(Broken())])
    with capturedLogs() as logs:
        h.client_sends(UPGRADE)
        h.backend.send(SWITCH)
    assert h.client_received.startswith(b"HTTP/1.1 502")
    assert "upgrade validator refuse failed" in h.client_received.decode()
    assert any(e.get("log_failure") is not None for e in logs)


def test_validators_must_provide_the_interface() -> None:
    with pytest.raises(TypeError, match="IUpgradeValidator"):
        ProxyHarness(validators=[object()])  # type: ignore[list-item]


# -- a declined upgrade stays HTTP ---------------------------------------------------


def test_a_declined_upgrade_is_relayed_and_held_bytes_become_the_next_request() -> None:
    h = ProxyHarness()
    h.client_sends(UPGRADE + GET)
    first = h.backend
    first.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
    assert h.client_received.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert h.client_received.endswith(b"\r\n\r\nno")
    # The held GET went to the backend as the next request, on the same connection.
    assert first.received.count(b"GET /page HTTP/1.1\r\n") == 1
    first.send(OK)
    assert h.client_received.endswith(b"hello")
    assert not h.client_closed


# -- tunnel endings ----------------------------------------------------------------------


def _tunnel() -> ProxyHarness:
    h = ProxyHarness()
    h.client_sends(UPGRADE)
    h.backend.send(SWITCH)
    return h


def test_client_eof_half_closes_the_backend_and_the_reply_still_reaches_the_client() -> None:
    h = _tunnel()
    h.client_transport.eof()
    assert h.backend.transport.write_closed
    assert not h.backend.closed
    h.backend.send(b"reply")
    assert h.client_received.endswith(b"reply")
    h.backend.transport.eof()
    assert h.client_closed and h.backend.closed


def test_a_reset_on_one_side_closes_the_other_quietly_and_logs_the_tunnel() -> None:
    h = _tunnel()
    h.client_sends(b"abc")
    h.backend.send(b"defgh")
    h.clock.advance(2.5)
    before = h.client_received
    with capturedLogs() as logs:
        h.backend.transport.reset()
    assert h.client_closed
    assert h.client_received == before, "nothing HTTP is written into a switched connection"
    text = messages(logs)
    assert '"TUNNEL /chat websocket" 2.500s' in text
    assert "up=3 down=5" in text
    assert 'closed_by=backend reason="connection lost (reset)"' in text
    assert all(e["log_level"].name == "info" for e in logs)
    assert not h.factory.proxy.tunnels
    assert h.factory.proxy.connections == set()


def test_a_backend_closing_inside_a_tunnel_writes_no_http_to_the_client() -> None:
    h = _tunnel()
    before = h.client_received
    h.backend.transport.loseConnection()
    assert h.client_received == before


# -- plain HTTP ------------------------------------------------------------------------


def test_keep_alive_reuses_the_backend_connection() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(OK)
    h.client_sends(GET)
    h.backend.send(OK)
    assert len(h.endpoint.connections) == 1
    assert h.client_received.count(b"hello") == 2
    assert not h.client_closed


def test_forwarding_fields_are_added_and_client_supplied_ones_not_trusted() -> None:
    h = ProxyHarness()
    h.client_sends(
        b"GET /a HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"X-Forwarded-Proto: https\r\nVia: 1.0 edge\r\n\r\n"
    )
    head = h.backend.received
    assert b"X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n" in head
    assert b"X-Forwarded-Proto: http\r\n" in head
    assert b"https" not in head
    assert b"X-Forwarded-Host: app.example\r\n" in head
    assert b"Via: 1.0 edge, 1.1 upgradeproxy\r\n" in head


def test_header_order_and_repeats_are_kept() -> None:
    h = ProxyHarness()
    h.client_sends(b"GET / HTTP/1.1\r\nHost: a\r\nB: 1\r\nA: 2\r\nB: 3\r\n\r\n")
    assert b"Host: a\r\nB: 1\r\nA: 2\r\nB: 3\r\n" in h.backend.received
    h.backend.send(b"HTTP/1.1 204 No Content\r\nSet-Cookie: x=1\r\nSet-Cookie: y=2\r\n\r\n")
    assert b"Set-Cookie: x=1\r\nSet-Cookie: y=2\r\n" in h.client_received


def test_an_http10_request_never_upgrades() -> None:
    h = ProxyHarness()
    h.client_sends(b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert b"Upgrade" not in h.backend.received
    h.backend.send(SWITCH)
    assert h.client_received.startswith(b"HTTP/1.1 502")


def test_a_chunked_request_body_is_streamed_as_it_arrives() -> None:
    h = ProxyHarness()
    h.client_sends(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    assert h.backend.received.endswith(b"\r\n\r\n3\r\nhel\r\n")
    h.client_sends(b"lo\r\n0\r\n\r\n")
    assert h.backend.received.endswith(b"2\r\nlo\r\n0\r\n\r\n")


def test_a_close_delimited_response_is_sent_chunked_to_an_http11_client() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(b"HTTP/1.1 200 OK\r\n\r\npart1")
    h.backend.send(b"part2")
    h.backend.transport.eof()
    received = h.client_received
    assert b"Transfer-Encoding: chunked" in received
    assert received.endswith(b"5\r\npart1\r\n5\r\npart2\r\n0\r\n\r\n")
    assert not h.client_closed


def test_a_chunked_response_to_an_http10_client_is_close_delimited() -> None:
    h = ProxyHarness()
    h.client_sends(b"GET / HTTP/1.0\r\n\r\n")
    h.backend.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    received = h.client_received
    assert b"Transfer-Encoding" not in received
    assert b"Connection: close" in received
    assert received.endswith(b"\r\n\r\nabc")
    assert h.client_closed


def test_interim_responses_are_relayed_as_they_come_but_not_to_http10_clients() -> None:
    h = ProxyHarness()
    h.client_sends(
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    h.backend.send(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert h.client_received == b"HTTP/1.1 100 Continue\r\n\r\n"
    h.client_sends(b"ok")
    h.backend.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK)
    assert b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK" in h.client_received

    old = ProxyHarness()
    old.client_sends(b"GET / HTTP/1.0\r\n\r\n")
    old.backend.send(b"HTTP/1.1 103 Early Hints\r\n\r\n" + OK)
    assert old.client_received.startswith(b"HTTP/1.1 200 OK")


def test_head_and_304_responses_have_no_body() -> None:
    h = ProxyHarness()
    h.client_sends(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert h.client_received.endswith(b"Content-Length: 100\r\nVia: 1.1 upgradeproxy\r\n\r\n")
    h.client_sends(GET)
    h.backend.send(b"HTTP/1.1 304 Not Modified\r\n\r\n" + OK)
    assert h.client_received.count(b"HTTP/1.1 ") == 2
    assert len(h.endpoint.connections) == 1 or h.backend.closed


def test_a_response_that_overtakes_the_request_body_closes_the_client_connection() -> None:
    h = ProxyHarness()
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n123")
    h.backend.send(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert b"Connection: close" in h.client_received
    assert h.client_closed


@pytest.mark.parametrize(
    ("request_bytes", "status", "words"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "both Content-Length and Transfer-Encoding",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            400,
            "more than one Content-Length",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400, "obs-fold"),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400, "bare CR or LF"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "without a Host"),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501, "CONNECT"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "not supported"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 40000 + b"\r\n\r\n", 431, "larger than"),
    ],
)
def test_bad_requests_get_a_status_with_a_reason_close_and_reach_no_backend(
    request_bytes: bytes, status: int, words: str
) -> None:
    h = ProxyHarness()
    h.client_sends(request_bytes)
    assert h.client_received.startswith(b"HTTP/1.1 %d " % status)
    assert words in after_head(h.client_received).decode()
    assert b"Connection: close" in h.client_received
    assert h.client_closed
    assert h.endpoint.connections == []


def test_an_unreachable_backend_gets_502() -> None:
    h = ProxyHarness()
    h.endpoint.refuse = True
    h.client_sends(GET)
    assert h.client_received.startswith(b"HTTP/1.1 502")
    assert "could not be reached" in h.client_received.decode()


def test_a_backend_that_does_not_answer_in_time_gets_504() -> None:
    h = ProxyHarness(settings=ProxySettings(backend=BackendSettings(response_timeout=5)))
    h.client_sends(UPGRADE)
    h.clock.advance(4.9)
    assert h.client_received == b""
    h.clock.advance(0.2)
    assert h.client_received.startswith(b"HTTP/1.1 504 Gateway Timeout")
    assert "no response head within 5 seconds" in h.client_received.decode()
    assert h.backend.closed


def test_a_malformed_backend_response_gets_502() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert h.client_received.startswith(b"HTTP/1.1 502")
    assert "more than one Content-Length" in h.client_received.decode()


def test_a_backend_dying_mid_body_cuts_the_response_short_without_adding_bytes() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    h.backend.transport.reset()
    assert h.client_received.endswith(b"\r\n\r\n12345")
    assert h.client_closed


def test_a_reused_connection_closed_by_the_backend_is_retried_once_on_a_new_one() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(OK)
    first = h.backend
    h.client_sends(GET)
    first.transport.loseConnection()  # the backend closed its idle end just as we reused it
    assert len(h.endpoint.connections) == 2
    h.backend.send(OK)
    assert h.client_received.count(b"hello") == 2


def test_absolute_form_targets_become_origin_form() -> None:
    h = ProxyHarness()
    h.client_sends(b"GET http://app.example/x?y=1 HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert h.backend.received.startswith(b"GET /x?y=1 HTTP/1.1\r\n")


# -- flow control ----------------------------------------------------------------------


def test_a_full_backend_buffer_pauses_reading_the_request_body() -> None:
    h = ProxyHarness()
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
    producer = h.backend.transport.producer
    assert producer is not None
    producer.pauseProducing()
    assert h.client_transport.producerState == "paused"
    producer.resumeProducing()
    assert h.client_transport.producerState == "producing"


def test_a_slow_client_pauses_reading_the_response_body() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n123")
    assert h.client_transport.producer is h.backend.transport
    h.backend.send(b"4567890")
    assert h.client_transport.producer is None


def test_holding_many_early_bytes_pauses_the_client_until_the_switch() -> None:
    h = ProxyHarness(settings=ProxySettings(max_held_bytes=1000))
    h.client_sends(UPGRADE + b"x" * 600)
    assert h.client_transport.producerState == "producing"
    h.client_sends(b"y" * 600)
    assert h.client_transport.producerState == "paused"
    h.backend.send(SWITCH)
    assert h.client_transport.producerState == "producing"
    assert h.backend.received.endswith(b"x" * 600 + b"y" * 600)


# -- clients that do not finish -----------------------------------------------------


def test_a_client_that_never_finishes_its_head_gets_408() -> None:
    h = ProxyHarness(settings=ProxySettings(request_head_timeout=10))
    h.client_sends(b"GET / HTTP/1.1\r\nHost: a\r\n")
    h.clock.advance(9.9)
    assert h.client_received == b""
    h.clock.advance(0.2)
    assert h.client_received.startswith(b"HTTP/1.1 408 Request Timeout")
    assert "did not arrive within 10 seconds" in h.client_received.decode()
    assert h.client_closed


def test_an_idle_keep_alive_connection_is_closed_quietly() -> None:
    h = ProxyHarness(settings=ProxySettings(request_head_timeout=10, keep_alive_timeout=20))
    h.client_sends(GET)
    h.clock.advance(30)  # waiting on the backend is not the client's fault
    assert not h.client_closed
    h.backend.send(OK)
    h.clock.advance(19.9)
    assert not h.client_closed, "idle, but within the keep-alive timeout"
    h.clock.advance(0.2)
    assert h.client_closed
    assert h.client_received.endswith(b"hello")


def test_a_head_started_on_a_kept_alive_connection_must_arrive_within_the_head_timeout() -> None:
    h = ProxyHarness(settings=ProxySettings(request_head_timeout=10, keep_alive_timeout=60))
    h.client_sends(GET)
    h.backend.send(OK)
    h.clock.advance(30)
    h.client_sends(b"GET /next HTTP/1.1\r\nHo")
    h.clock.advance(9.9)
    assert not h.client_closed
    h.clock.advance(0.2)
    assert b"408 Request Timeout" in h.client_received
    assert h.client_closed


def test_a_tunnel_is_not_cut_by_the_head_timeout() -> None:
    h = _tunnel()
    h.clock.advance(3600)
    assert not h.client_closed


def test_a_malformed_request_body_after_the_response_started_adds_no_http() -> None:
    h = ProxyHarness()
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    h.backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npart")
    before = h.client_received
    h.client_sends(b"zz\r\n")  # not a chunk-size line
    assert h.client_received == before
    assert h.client_closed


def test_reading_resumes_once_a_held_body_reaches_its_backend() -> None:
    h = ProxyHarness(settings=ProxySettings(max_held_bytes=100))
    h.endpoint.hold_connections = True
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 300\r\n\r\n" + b"x" * 300)
    assert h.client_transport.producerState == "paused"
    h.endpoint.complete_connection()
    assert h.backend.received.endswith(b"\r\n\r\n" + b"x" * 300)
    assert h.client_transport.producerState == "producing"


def test_a_backend_connection_paused_by_a_slow_client_reads_again_once_pooled() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    backend = h.backend
    backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    h.client_transport.producer.pauseProducing()  # the client's send buffer is full
    backend.send(b"67890")
    assert backend.transport.producerState == "producing"
    assert h.factory.proxy.pool.idle_count == 1


def test_an_error_answer_to_head_has_no_body() -> None:
    h = ProxyHarness()
    h.endpoint.refuse = True
    h.client_sends(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = h.client_received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Content-Length: " in head and body == b""


def test_an_eof_right_behind_an_upgrade_request_is_carried_into_the_tunnel() -> None:
    h = ProxyHarness()
    h.endpoint.hold_connections = True  # the EOF comes before the backend connection
    h.client_sends(UPGRADE + b"hello")
    h.client_transport.eof()
    assert not h.client_closed
    h.endpoint.complete_connection()
    h.backend.send(SWITCH)
    assert h.backend.received.endswith(b"\r\n\r\nhello")
    assert h.backend.transport.write_closed, "the client's EOF reaches the backend"
    h.backend.send(b"bye")
    assert h.client_received.endswith(b"bye")


def test_an_eof_inside_a_body_waiting_for_its_backend_still_ends_the_exchange() -> None:
    h = ProxyHarness()
    h.endpoint.hold_connections = True
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n123")
    h.client_transport.eof()
    h.endpoint.complete_connection()
    assert h.client_closed
    assert h.backend.closed
    assert h.factory.proxy.connections == set()


# -- after an error response -------------------------------------------------------------


def test_the_access_record_of_an_error_response_counts_its_body_bytes() -> None:
    from dataclasses import replace

    from upgradeproxy.core.accesslog import AccessLog

    events: list[dict[str, object]] = []
    h = ProxyHarness()
    proxy = h.factory.proxy
    proxy.reconfigure(replace(proxy.configuration, access_log=AccessLog("text", events.append)))
    h.client_sends(UPGRADE)
    h.backend.send(SWITCH.replace(b"Connection: Upgrade\r\n", b""))
    received = h.client_received
    body = received.partition(b"\r\n\r\n")[2]
    assert received.startswith(b"HTTP/1.1 502 ")
    (record,) = (e["access"] for e in events)
    assert record.status == 502 and record.bytes == len(body) > 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(("linger", "open_at"), [(2.0, 1.9), (0.5, 0.4)])
def test_after_an_error_the_proxy_reads_on_for_error_linger_seconds_then_closes(
    linger: float, open_at: float
) -> None:
    from twisted.internet.address import IPv4Address
    from twisted.internet.interfaces import ITCPTransport
    from zope.interface import alsoProvides

    from upgradeproxy.testing import MemoryTransport

    h = ProxyHarness(settings=None if linger == 2.0 else ProxySettings(error_linger=linger))
    client = h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 1))
    transport = MemoryTransport(peerAddress=IPv4Address("TCP", "192.0.2.8", 1))
    transport.setTcpNoDelay = lambda enabled: None  # type: ignore[attr-defined]
    alsoProvides(transport, ITCPTransport)  # so the proxy lingers as on TCP
    transport.protocol = client
    client.makeConnection(transport)
    client.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # no Host: 400
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert transport.write_closed and transport.connected, "our side ended; still reading"
    client.dataReceived(b"the rest of what the client was sending")
    h.clock.advance(open_at)
    assert transport.connected
    h.clock.advance(0.2)
    assert not transport.connected


def _tcp_client(h: ProxyHarness) -> tuple[object, object]:
    """A client connection on a transport that says it is TCP, so that errors linger."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.interfaces import ITCPTransport
    from zope.interface import alsoProvides

    from upgradeproxy.testing import MemoryTransport

    client = h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 1))
    transport = MemoryTransport(peerAddress=IPv4Address("TCP", "192.0.2.8", 1))
    transport.setTcpNoDelay = lambda enabled: None  # type: ignore[attr-defined]
    alsoProvides(transport, ITCPTransport)
    transport.protocol = client
    client.makeConnection(transport)
    return client, transport


def test_a_response_that_overtakes_its_body_leaves_its_backend_connection_out_of_the_pool() -> None:
    h = ProxyHarness()
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n123")
    first = h.backend
    first.send(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert first.closed, "the backend still waits for 7 bytes of body"
    from upgradeproxy.testing import connect_client

    client, _ = connect_client(h.factory, port=50001)  # another client of the same proxy
    client.dataReceived(GET)
    assert len(h.endpoint.connections) == 2, "a new connection, not the one with half a body"
    assert not first.received.endswith(GET)


def test_a_drain_closes_a_connection_lingering_after_an_error_at_once() -> None:
    h = ProxyHarness()
    client, transport = _tcp_client(h)
    client.dataReceived(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n")  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.1 501 ")  # type: ignore[attr-defined]
    assert transport.connected  # type: ignore[attr-defined]
    h.client_transport.loseConnection()
    fired: list[object] = []
    h.factory.proxy.drain(30).addCallback(fired.append)
    assert not transport.connected and fired  # type: ignore[attr-defined]


def test_a_refused_head_gets_one_answer_even_when_its_timer_runs_out_during_the_linger() -> None:
    h = ProxyHarness(settings=ProxySettings(request_head_timeout=1, error_linger=5))
    client, transport = _tcp_client(h)
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n")  # type: ignore[attr-defined]
    h.clock.advance(1.5)
    assert transport.value().count(b"HTTP/1.1 ") == 1  # type: ignore[attr-defined]
