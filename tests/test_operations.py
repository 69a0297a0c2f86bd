"""Operating the proxy, in memory: routes, several backends, limits, timeouts,
graceful shutdown, the access log and the state behind the metrics."""

from __future__ import annotations

import io
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import DOORS, GET, OK, SWITCH, UPGRADE, Client, Cluster, messages, status_of
from twisted.internet import error
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from upgradeproxy import BackendSettings, ProxySettings
from upgradeproxy.core._backend import BackendConnection, BackendPool
from upgradeproxy.core.accesslog import (
    NAMESPACE,
    AccessLog,
    RequestRecord,
    TunnelRecord,
    access_log_to,
)
from upgradeproxy.core.balancer import Policy, describe_connect_failure
from upgradeproxy.core.routing import Router, host_name
from upgradeproxy.testing import MemoryTransport, ProxyHarness


def _tunnel(cluster: Cluster, backend: str = "a", port: int = 50000) -> Client:
    client = cluster.client(port=port)
    client.send(UPGRADE)
    cluster.last(backend).send(SWITCH)
    assert client.received.startswith(b"HTTP/1.1 101 ")
    return client


# -- routes ------------------------------------------------------------------------


def test_host_names_are_compared_without_port_or_case() -> None:
    assert host_name(b"App.Example:8080") == "app.example"
    assert host_name(b"[::1]:8080") == "[::1]"
    assert host_name(None) == ""


def _router_cluster(door: str = "listening") -> Cluster:
    return Cluster(
        {
            "api": {"backends": ["api"], "hosts": ("app.example",), "path": "/api"},
            "app": {"backends": ["app"], "hosts": ("app.example",)},
            "wild": {"backends": ["wild"], "hosts": ("*.example",)},
            "ws": {"backends": ["ws"], "path": "/ws"},
        },
        door=door,
    )


def _route_of(cluster: Cluster, host: bytes, target: bytes) -> str | None:
    router: Router = cluster.factory.proxy.router
    route = router.match(host, target)
    return route.name if route else None


def test_the_longest_path_prefix_of_the_best_host_match_wins() -> None:
    c = _router_cluster()
    assert _route_of(c, b"app.example", b"/api/users") == "api"
    assert _route_of(c, b"app.example", b"/api") == "api"
    assert _route_of(c, b"app.example", b"/api?x=1") == "api"
    assert _route_of(c, b"app.example", b"/apis") == "app", "a prefix ends at a segment"
    assert _route_of(c, b"APP.example:443", b"/") == "app"
    assert _route_of(c, b"chat.example", b"/x") == "wild"
    assert _route_of(c, b"example", b"/x") is None, "*.example needs a subdomain"
    assert _route_of(c, b"other.test", b"/ws/room") == "ws"
    assert _route_of(c, b"other.test", b"/") is None


@pytest.mark.parametrize("door", DOORS)
def test_requests_go_to_their_routes_backend_and_no_route_answers_404(door: str) -> None:
    c = _router_cluster(door)
    client = c.client()
    client.send(b"GET /api/users HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert c.count("api") == 1 and c.count("app") == 0
    c.last("api").send(OK)
    client.send(b"GET http://chat.example/x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert c.count("wild") == 1, "an absolute-form target's authority picks the route"
    c.last("wild").send(OK)
    with capturedLogs() as logs:
        client.send(b"GET /nothing HTTP/1.1\r\nHost: other.test\r\n\r\n")
    assert b"HTTP/1.1 404 Not Found" in client.received
    assert "no route serves host other.test and path /nothing" in client.received.decode()
    assert any(e.get("log_namespace") == NAMESPACE for e in logs)


# -- several backends ----------------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
def test_a_refused_connection_is_retried_on_another_backend_and_the_dead_one_skipped(
    door: str,
) -> None:
    c = Cluster({"r": {"backends": ["a", "b"], "policy": Policy.ROUND_ROBIN}}, door=door)
    c.endpoints["a"].refuse = True
    with capturedLogs() as logs:
        client = c.client()
        client.send(GET)
    assert c.count("b") == 1, "retried on b"
    c.last("b").send(OK)
    assert client.received.endswith(b"hello")
    text = messages(logs)
    assert "retrying GET /page on b: a could not be reached (" in text
    assert "scripted refusal" in text
    # a is out of rotation for its fail timeout: every request goes to b at once.
    for _ in range(3):
        client.send(GET)
        c.last("b").send(OK)
    assert c.requests("b") == 4 and c.endpoints["a"].attempts == 1
    c.endpoints["a"].refuse = False
    c.clock.advance(10.1)
    assert c.proxy.router.routes[0].group.backends[0].healthy
    for _ in range(2):
        client.send(GET)
        connection = c.last("a") if c.count("a") else c.last("b")
        connection.send(OK)
    assert c.requests("a") == 1, "back in rotation after its fail timeout"


@pytest.mark.parametrize("door", DOORS)
def test_when_every_backend_is_down_the_client_gets_503_with_the_reasons(door: str) -> None:
    c = Cluster({"r": {"backends": ["a", "b"]}}, door=door)
    for endpoint in c.endpoints.values():
        endpoint.refuse = True
    client = c.client()
    client.send(GET)
    assert status_of(client.received) == 502, "the last try answers what went wrong"
    client = c.client(port=50001)
    client.send(GET)
    body = client.received.decode()
    assert status_of(client.received) == 503
    assert "no healthy backend for route r" in body
    assert "scripted refusal" in body
    assert c.proxy.stats.limit_rejections["no_healthy_backend"] == 1


@pytest.mark.parametrize("door", DOORS)
def test_least_conn_steers_new_tunnels_away_from_the_busy_backend(door: str) -> None:
    c = Cluster({"r": {"backends": ["a", "b"], "policy": Policy.LEAST_CONN}}, door=door)
    first = c.client(port=1)
    first.send(UPGRADE)
    busy = "a" if c.count("a") else "b"
    idle = "b" if busy == "a" else "a"
    c.last(busy).send(SWITCH)
    # The tunnel holds its backend: the next three requests all go elsewhere.
    for port in (2, 3, 4):
        client = c.client(port=port)
        client.send(GET)
        c.last(idle).send(OK)
    assert c.requests(busy) == 1 and c.requests(idle) == 3
    backends = {b.name: b for b in c.proxy.router.routes[0].group.backends}
    assert backends[busy].active == 1 and backends[idle].active == 0
    first.transport.reset()
    assert backends[busy].active == 0, "the tunnel's end frees its backend"


@pytest.mark.parametrize("door", DOORS)
def test_client_hash_keeps_a_client_on_one_backend(door: str) -> None:
    c = Cluster({"r": {"backends": ["a", "b", "c"], "policy": Policy.CLIENT_HASH}}, door=door)
    for port in range(5):
        client = c.client(host="198.51.100.9", port=port)
        client.send(GET)
    assert sorted(c.count(b) for b in "abc") == [0, 0, 5]


# -- limits ----------------------------------------------------------------------------


def test_connections_beyond_the_limit_get_503_and_existing_ones_are_unharmed() -> None:
    c = Cluster(settings=ProxySettings(max_connections=2))
    first, second = c.client(port=1), c.client(port=2)
    third = c.client(port=3)
    assert status_of(third.received) == 503
    assert "limit of 2 connections" in third.received.decode()
    first.send(GET)
    c.last("a").send(OK)
    assert first.received.endswith(b"hello") and not second.closed
    assert c.proxy.stats.limit_rejections["max_connections"] == 1


@pytest.mark.parametrize("door", DOORS)
def test_upgrades_beyond_the_tunnel_limit_get_503_and_plain_requests_still_pass(door: str) -> None:
    c = Cluster(settings=ProxySettings(max_tunnels=1), door=door)
    tunnel = _tunnel(c, port=1)
    client = c.client(port=2)
    client.send(UPGRADE)
    assert status_of(client.received) == 503
    assert "limit of 1 tunnels open" in client.received.decode()
    other = c.client(port=3)
    other.send(GET)
    c.last("a").send(OK)
    assert other.received.endswith(b"hello")
    tunnel.send(b"still here")
    assert c.endpoints["a"].connections[0].received.endswith(b"still here")


@pytest.mark.parametrize("door", DOORS)
def test_a_declared_body_above_the_limit_gets_413_before_any_backend_is_contacted(
    door: str,
) -> None:
    c = Cluster({"r": {"backends": ["a"], "max_request_body": 10}}, door=door)
    client = c.client()
    # twisted.web reads a body whole before the resource sees the request.
    client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n12345678901")
    assert status_of(client.received) == 413
    assert "larger than this route's limit of 10 bytes" in client.received.decode()
    assert c.count("a") == 0


def test_a_chunked_body_growing_above_the_limit_is_cut_with_413() -> None:
    c = Cluster({"r": {"backends": ["a"], "max_request_body": 10}})
    client = c.client()
    client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(b"8\r\n12345678\r\n")
    assert c.last("a").received.endswith(b"8\r\n12345678\r\n")
    client.send(b"8\r\n12345678\r\n")
    assert status_of(client.received) == 413
    assert c.last("a").closed, "the backend connection with half a body is dropped"
    assert c.last("a").received.count(b"12345678") == 1


# -- tunnel timeouts ---------------------------------------------------------------------


def advance(clock: Clock, seconds: float) -> None:
    """Let ``seconds`` pass one at a time, as a real clock would, for periodic timers."""
    clock.pump([1.0] * int(seconds))


def test_an_idle_tunnel_is_closed_after_its_idle_timeout_and_activity_keeps_it_open() -> None:
    c = Cluster({"r": {"backends": ["a"], "tunnel_idle_timeout": 100}})
    client = _tunnel(c)
    for _ in range(5):
        advance(c.clock, 60)
        client.send(b"ping")
    advance(c.clock, 60)
    c.last("a").send(b"pong")
    advance(c.clock, 99)
    assert not client.closed
    with capturedLogs() as logs:
        advance(c.clock, 30)
    assert client.closed and c.last("a").closed
    record = next(e["access"] for e in logs if e.get("log_namespace") == NAMESPACE)
    assert record.closed_by == "proxy" and record.reason == "idle for 100 seconds"


def test_tunnels_have_no_idle_timeout_by_default() -> None:
    c = Cluster()
    client = _tunnel(c)
    c.clock.advance(7 * 24 * 3600)
    assert not client.closed


def test_a_tunnel_is_closed_at_its_maximum_lifetime() -> None:
    c = Cluster({"r": {"backends": ["a"], "tunnel_lifetime": 3600}})
    client = _tunnel(c)
    c.clock.advance(3599)
    client.send(b"busy")
    assert not client.closed
    with capturedLogs() as logs:
        c.clock.advance(2)
    assert client.closed
    record = next(e["access"] for e in logs if e.get("log_namespace") == NAMESPACE)
    assert record.reason == "reached its maximum lifetime of 3600 seconds"
    assert not c.clock.getDelayedCalls()


# -- graceful shutdown ------------------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
def test_a_graceful_shutdown_lets_a_request_finish_and_closes_a_tunnel_after_the_grace(
    door: str,
) -> None:
    c = Cluster(door=door)
    tunnel = _tunnel(c, port=1)
    busy = c.client(port=2)
    busy.send(GET)
    idle = c.client(port=3)
    with capturedLogs() as logs:
        drained = c.proxy.drain(30)
        if door == "listening":  # an idle twisted.web connection is its site's to close
            assert idle.closed, "an idle connection closes at once"
        assert not busy.closed and not tunnel.closed
        c.last("a").send(OK)
        assert busy.received.endswith(b"hello") and b"Connection: close" in busy.received
        assert busy.closed, "closed after its response"
        tunnel.send(b"still flowing")
        c.clock.advance(29)
        assert not tunnel.closed and not drained.called
        c.clock.advance(2)
        assert tunnel.closed
    assert drained.called
    text = messages(logs)
    assert "shutting down: 1 requests in flight, 1 tunnels open" in text
    assert "1 of 1 requests finished, 0 of 1 tunnels ended by themselves" in text
    assert "closed 0 requests and 1 tunnels at the end of the grace period" in text


def test_a_shutdown_with_nothing_open_is_immediate() -> None:
    c = Cluster()
    assert c.proxy.drain(30).called


@pytest.mark.parametrize("door", DOORS)
def test_a_request_still_running_at_the_end_of_the_grace_is_cut(door: str) -> None:
    c = Cluster(door=door)
    busy = c.client()
    busy.send(GET)
    drained = c.proxy.drain(5)
    c.clock.advance(5.1)
    assert busy.closed
    c.clock.advance(2.1)
    assert drained.called


def test_a_request_through_the_web_door_during_a_shutdown_gets_503() -> None:
    c = Cluster(door="web")
    client = c.client()
    client.send(GET)
    c.last("a").send(OK)
    assert c.proxy.drain(30).called, "an idle twisted.web connection holds no request"
    client.send(GET)
    assert status_of(client.received.partition(b"hello")[2]) == 503
    assert b"the proxy is shutting down" in client.received
    assert client.closed and not c.proxy.connections


# -- the access log ---------------------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
def test_the_access_log_has_a_record_per_request_and_per_tunnel(door: str) -> None:
    events: list[dict[str, Any]] = []
    c = Cluster(access_log=AccessLog("text", events.append), door=door)
    client = c.client()
    client.send(GET)
    c.clock.advance(0.25)
    c.last("a").send(OK)
    tunnel = _tunnel(c, port=2)
    tunnel.send(b"12345")
    c.last("a").send(b"123")
    c.clock.advance(2)
    tunnel.transport.eof()
    c.last("a").transport.eof()
    assert [type(e["access"]) for e in events] == [RequestRecord, TunnelRecord]
    request, closed = (formatEvent(e) for e in events)
    assert request == ('192.0.2.7 "GET /page HTTP/1.1" 200 5 0.250s route=default backend=a')
    assert closed == (
        '192.0.2.7 "TUNNEL /chat websocket" 2.000s up=5 down=3 closed_by=client '
        f'reason="{"EOF" if door == "listening" else "closed"}" route=default backend=a'
    )
    assert all(e["log_level"] is LogLevel.info for e in events)


@pytest.mark.parametrize("door", DOORS)
def test_the_access_log_in_json_lines(door: str) -> None:
    events: list[dict[str, Any]] = []
    c = Cluster(access_log=AccessLog("json", events.append), door=door)
    client = c.client()
    client.send(b"GET /q?a=%C3%A9 HTTP/1.1\r\nHost: h\r\n\r\n")
    c.last("a").send(OK)
    line = json.loads(formatEvent(events[0]))
    assert abs(line.pop("time") - time.time()) < 60
    assert line == {
        "type": "request",
        "client": "192.0.2.7",
        "method": "GET",
        "target": "/q?a=%C3%A9",
        "version": "HTTP/1.1",
        "status": 200,
        "bytes": 5,
        "duration": 0.0,
        "route": "default",
        "backend": "a",
    }


@pytest.mark.parametrize("door", DOORS)
def test_refused_requests_are_in_the_access_log_too(door: str) -> None:
    events: list[dict[str, Any]] = []
    c = Cluster(access_log=AccessLog("text", events.append), door=door)
    client = c.client()
    client.send(UPGRADE.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"))
    assert [e["access"].status for e in events] == [400]


# -- the state behind metrics -------------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
def test_the_snapshot_counts_known_traffic(door: str) -> None:
    c = Cluster(door=door)
    client = c.client()
    for _ in range(3):
        client.send(GET)
        c.last("a").send(OK)
    client.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    c.last("a").send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    tunnel = _tunnel(c, port=2)
    tunnel.send(b"1234567")
    refused = c.client(port=3)
    refused.send(UPGRADE)
    c.last("a").send(SWITCH.replace(b"Connection: Upgrade\r\n", b""))
    snapshot = c.proxy.snapshot()
    json.dumps(snapshot)  # plain data only
    assert sorted((r["route"], r["status"], r["count"]) for r in snapshot["requests"]) == [
        ("default", 200, 3),
        ("default", 404, 1),
        ("default", 502, 1),
    ]
    assert snapshot["refusals"] == [
        {"route": "default", "validator": "rfc9110", "stage": "response", "count": 1}
    ]
    (recent,) = snapshot["recent_refusals"]
    assert recent["client"] == "192.0.2.7" and recent["target"] == "/chat"
    assert "Connection" in recent["reason"]
    (live,) = snapshot["tunnels"]
    assert live["protocol"] == "websocket" and live["client_to_backend"] == 7
    assert snapshot["tunnel_bytes"] == {"client_to_backend": 7, "backend_to_client": 0}
    assert snapshot["tunnels_total"] == [{"protocol": "websocket", "count": 1}]
    if door == "listening":
        assert snapshot["connections"] == 2 and snapshot["connections_total"] == 3
    else:  # a request counts from its start to its end, or to its tunnel's end
        assert snapshot["connections"] == 1 and snapshot["connections_total"] == 6
    (backend,) = snapshot["backends"]
    assert backend["healthy"] and backend["active"] == 1


def test_a_single_backend_factory_keeps_its_simple_interface() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(OK)
    assert h.factory.proxy.pool.idle_count == 1
    assert h.factory.proxy.backend_name == "scripted backend"
    assert isinstance(h.client_transport, MemoryTransport)


def test_an_access_log_file_has_timestamped_text_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log, stream = access_log_to(str(path), "text")
    c = Cluster(access_log=log)
    client = c.client()
    client.send(GET)
    c.last("a").send(OK)
    stream.close()
    (line,) = path.read_text().splitlines()
    stamp, _, rest = line.partition(" ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    assert rest.startswith('192.0.2.7 "GET /page HTTP/1.1" 200 5 ')


@pytest.mark.parametrize("format", ["text", "json"])
def test_access_lines_to_standard_output_are_written_out_at_once(
    format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Into a pipe, standard output is block-buffered: a line must not wait
    # there for the buffer to fill, nor a file's line be flushed twice.
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8"))
    log, stream = access_log_to("-", format)
    assert stream is sys.stdout
    c = Cluster(access_log=log)
    c.client().send(GET)
    c.last("a").send(OK)
    assert b"/page" in raw.getvalue() and raw.getvalue().endswith(b"\n")


# -- connecting to backends ----------------------------------------------------------


def test_plain_tcp_backends_are_connected_without_the_endpoint_wrapper() -> None:
    reactor = MemoryReactorClock()
    endpoint = TCP4ClientEndpoint(reactor, "192.0.2.1", 9000, timeout=3)
    pool = BackendPool(endpoint, reactor, BackendSettings())
    ready = pool.connect()
    ((host, port, factory, timeout, _),) = reactor.tcpClients
    assert (host, port, timeout) == ("192.0.2.1", 9000, 3)
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, BackendConnection), "our protocol is the transport's own"
    assert not ready.called
    protocol.makeConnection(StringTransport())
    assert ready.result is protocol


def test_a_plain_tcp_connection_that_fails_fails_the_attempt() -> None:
    reactor = MemoryReactorClock()
    pool = BackendPool(TCP4ClientEndpoint(reactor, "192.0.2.1", 9000), reactor, BackendSettings())
    failures: list[Failure] = []
    pool.connect().addErrback(failures.append)
    ((_, _, factory, _, _),) = reactor.tcpClients
    factory.clientConnectionFailed(None, Failure(error.TimeoutError()))
    (failure,) = failures
    assert failure.check(error.TimeoutError)
    assert describe_connect_failure(failure) == "no connection within the connect timeout"


def test_a_plain_tcp_connection_is_opened_with_callbacks_and_no_deferred() -> None:
    reactor = MemoryReactorClock()
    pool = BackendPool(TCP4ClientEndpoint(reactor, "192.0.2.1", 9000), reactor, BackendSettings())
    ready: list[BackendConnection] = []
    failed: list[Failure] = []
    pool.open(ready.append, failed.append)
    pool.open(ready.append, failed.append)
    (_, _, made, _, _), (_, _, refused, _, _) = reactor.tcpClients
    protocol = made.buildProtocol(None)
    assert ready == [] and failed == []
    protocol.makeConnection(StringTransport())
    assert ready == [protocol]
    refused.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    (failure,) = failed
    assert failure.check(error.ConnectionRefusedError)
    assert ready == [protocol], "each attempt reports once"


@pytest.mark.parametrize("door", DOORS)
def test_after_a_refused_switch_the_bytes_behind_the_request_are_not_read_as_a_request(
    door: str,
) -> None:
    c = Cluster(door=door)
    client = c.client()
    client.send(UPGRADE + b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")
    c.last("a").send(SWITCH.replace(b"Connection: Upgrade\r\n", b""))
    assert status_of(client.received) == 502
    assert client.closed or client.transport.disconnecting
    assert client.received.count(b"HTTP/1.1 ") == 1
