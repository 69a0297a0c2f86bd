"""Backend groups: the policies, passive and active health, and their log lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from loopback import HOST, eventually
from support import DOORS, GET, Cluster, status_of
from support import OK as HELLO
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionRefusedError,
    DNSLookupError,
    getConnectError,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from upgradeproxy.core._backend import SPEAKS_HTTP2, BackendConnection, BackendSettings
from upgradeproxy.core.address import BackendAddress
from upgradeproxy.core.balancer import (
    Backend,
    BackendGroup,
    FailedConnection,
    HealthCheck,
    Policy,
    connect_advice,
    describe_connect_failure,
    no_backend_reason,
    unreachable_answer,
)
from upgradeproxy.testing import MemoryTransport

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
# An HTTP/2 server's first frame: SETTINGS on stream 0, max concurrent streams 100.
H2_SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"
CHECK = HealthCheck(path="/healthz", interval=10.0, timeout=5.0)


# -- a scripted endpoint ----------------------------------------------------------------


@dataclass(eq=False)
class Attempt:
    """One connection attempt to a :class:`FakeEndpoint`, driven by the test."""

    factory: IProtocolFactory
    result: Deferred[IProtocol] = field(init=False)
    transport: MemoryTransport | None = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.result = Deferred(self._cancel)

    def accept(self) -> None:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 9000))
        assert protocol is not None
        self.transport = MemoryTransport()
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        self.result.callback(protocol)

    def refuse(self) -> None:
        self.result.errback(getConnectError((111, "Connection refused")))

    def reply(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.protocol.dataReceived(data)

    @property
    def sent(self) -> bytes:
        assert self.transport is not None
        return bytes(self.transport.value())

    @property
    def open(self) -> bool:
        """Connecting, or connected and not closed."""
        if self.transport is None:
            return not self.result.called
        return bool(self.transport.connected)

    def _cancel(self, result: Deferred[IProtocol]) -> None:
        # As Twisted's own endpoints do.
        self.cancelled = True
        result.errback(ConnectingCancelledError(IPv4Address("TCP", "10.0.0.1", 9000)))


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Records connection attempts; answers them at once when ``answer`` is set."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        #: Accept each attempt and send these bytes.
        self.answer: bytes | None = None
        #: Refuse each attempt.
        self.refusing = False

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt = Attempt(factory)
        self.attempts.append(attempt)
        if self.refusing:
            attempt.refuse()
        elif self.answer is not None:
            attempt.accept()
            attempt.reply(self.answer)
        return attempt.result

    @property
    def last(self) -> Attempt:
        return self.attempts[-1]

    @property
    def open_count(self) -> int:
        return sum(attempt.open for attempt in self.attempts)


@dataclass
class Setup:
    group: BackendGroup
    clock: Clock
    endpoints: list[FakeEndpoint]

    @property
    def a(self) -> Backend:
        return self.group.backends[0]

    @property
    def b(self) -> Backend:
        return self.group.backends[1]

    @property
    def c(self) -> Backend:
        return self.group.backends[2]


def make_group(
    count: int = 3, policy: Policy = Policy.ROUND_ROBIN, prefix: bytes = b"", **kwargs: Any
) -> Setup:
    clock = Clock()
    endpoints = [FakeEndpoint() for _ in range(count)]
    addresses = [
        BackendAddress(endpoint, prefix, f"10.0.0.{i + 1}:9000")
        for i, endpoint in enumerate(endpoints)
    ]
    kwargs.setdefault("route", "api")
    group = BackendGroup(
        addresses, policy=policy, clock=clock, settings=BackendSettings(), **kwargs
    )
    return Setup(group, clock, endpoints)


def names(backends: Sequence[Backend | None]) -> list[str]:
    return ["-" if backend is None else backend.name[:8] for backend in backends]


def lines(logs: Sequence[LogEvent]) -> list[tuple[str, str]]:
    return [(event["log_level"].name, formatEvent(event)) for event in logs]


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def refused(setup: Setup, backend: Backend) -> None:
    setup.group.connect_failed(backend, "Connection refused")


# -- round robin ------------------------------------------------------------------------


def test_round_robin_takes_each_backend_in_turn() -> None:
    s = make_group()
    chosen = [s.group.choose("192.0.2.1") for _ in range(6)]
    assert names(chosen) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


def test_round_robin_skips_unhealthy_and_excluded_backends() -> None:
    s = make_group()
    refused(s, s.b)
    assert names([s.group.choose("c") for _ in range(4)]) == ["10.0.0.1", "10.0.0.3"] * 2
    assert s.group.choose_retry("c", {s.a}) is s.c
    assert s.group.choose_retry("c", {s.a, s.c}) is None


# -- least connections -------------------------------------------------------------------


def test_least_conn_picks_the_least_busy_backend() -> None:
    s = make_group(policy=Policy.LEAST_CONN)
    s.a.active, s.b.active, s.c.active = 3, 1, 2
    assert s.group.choose("c") is s.b
    assert s.group.choose_retry("c", {s.b}) is s.c


def test_least_conn_spreads_equal_load_by_rotating() -> None:
    s = make_group(policy=Policy.LEAST_CONN)
    chosen = [s.group.choose("c") for _ in range(6)]
    assert names(chosen) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


def test_least_conn_balances_requests_in_flight() -> None:
    s = make_group(policy=Policy.LEAST_CONN)
    for _ in range(9):
        backend = s.group.choose("c")
        assert backend is not None
        backend.active += 1
    assert [backend.active for backend in s.group.backends] == [3, 3, 3]


def test_least_conn_steers_new_requests_away_from_a_backend_holding_tunnels() -> None:
    s = make_group(policy=Policy.LEAST_CONN)
    s.a.active = 40  # open tunnels
    chosen = []
    for _ in range(20):
        backend = s.group.choose("c")
        assert backend is not None
        chosen.append(backend)
        backend.active += 1
        backend.active -= 1  # a short request, over at once
    assert Counter(names(chosen)) == {"10.0.0.2": 10, "10.0.0.3": 10}


def test_least_conn_skips_unhealthy_backends_even_when_idle() -> None:
    s = make_group(policy=Policy.LEAST_CONN)
    s.b.active, s.c.active = 5, 7
    refused(s, s.a)
    assert s.group.choose("c") is s.b


# -- client hash -----------------------------------------------------------------------

CLIENTS = [f"198.51.100.{i}" for i in range(256)] + [f"2001:db8::{i:x}" for i in range(256)]


def hash_mapping(setup: Setup) -> dict[str, str]:
    mapping = {}
    for client in CLIENTS:
        backend = setup.group.choose(client)
        assert backend is not None
        mapping[client] = backend.name
    return mapping


def test_client_hash_sends_a_client_to_the_same_backend_every_time() -> None:
    s = make_group(4, Policy.CLIENT_HASH)
    first = hash_mapping(s)
    assert hash_mapping(s) == first
    assert hash_mapping(make_group(4, Policy.CLIENT_HASH)) == first


def test_client_hash_spreads_clients_over_all_backends() -> None:
    counts = Counter(hash_mapping(make_group(4, Policy.CLIENT_HASH)).values())
    assert len(counts) == 4
    assert all(len(CLIENTS) / 4 * 0.7 < n < len(CLIENTS) / 4 * 1.3 for n in counts.values())


def test_client_hash_moves_only_the_clients_of_a_backend_that_goes_down() -> None:
    s = make_group(4, Policy.CLIENT_HASH)
    before = hash_mapping(s)
    refused(s, s.c)
    during = hash_mapping(s)
    moved = {client for client in CLIENTS if during[client] != before[client]}
    assert moved == {client for client in CLIENTS if before[client] == s.c.name}
    assert len({during[client] for client in moved}) == 3  # spread over the others
    s.clock.advance(s.group.fail_timeout)
    assert hash_mapping(s) == before


def test_client_hash_tells_apart_backends_listed_twice() -> None:
    endpoint = FakeEndpoint()
    address = BackendAddress(endpoint, b"", "10.0.0.1:9000")
    group = BackendGroup(
        [address, address], policy=Policy.CLIENT_HASH, clock=Clock(), settings=BackendSettings()
    )
    chosen = Counter(group.choose(client) for client in CLIENTS)
    assert set(chosen) == set(group.backends)


_PRINT_MAPPING = """
import json
from twisted.internet.task import Clock
from upgradeproxy.core.address import BackendAddress
from upgradeproxy.core._backend import BackendConnection, BackendSettings
from upgradeproxy.core.balancer import BackendGroup, Policy
addresses = [BackendAddress(None, b"", f"10.0.0.{i}:9000") for i in range(1, 5)]
group = BackendGroup(
    addresses, policy=Policy.CLIENT_HASH, clock=Clock(), settings=BackendSettings()
)
print(json.dumps([group.choose(f"198.51.100.{i}").name for i in range(64)]))
"""


def test_client_hash_agrees_across_processes() -> None:
    """Workers are separate processes: string hashing differs between them, the choice may not."""

    def mapping(seed: str) -> list[str]:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", _PRINT_MAPPING],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        result: list[str] = json.loads(done.stdout)
        return result

    assert mapping("1") == mapping("2")


# -- passive health ----------------------------------------------------------------------


def test_a_failed_backend_is_skipped_until_its_fail_timeout_has_passed() -> None:
    s = make_group(fail_timeout=10.0)
    refused(s, s.b)
    assert not s.b.healthy and s.b.last_error == "Connection refused"
    s.clock.advance(9.9)
    assert s.b not in {s.group.choose("c") for _ in range(6)}
    s.clock.advance(0.1)
    assert s.b.healthy and s.b.last_error == ""
    assert s.b in {s.group.choose("c") for _ in range(3)}


def test_a_backend_failing_again_on_its_retry_stays_out_for_another_fail_timeout() -> None:
    s = make_group(fail_timeout=10.0)
    refused(s, s.b)
    s.clock.advance(10)
    refused(s, s.b)
    s.clock.advance(9)
    assert not s.b.healthy
    assert s.b.failures == 2


def test_connect_succeeded_puts_a_backend_back_at_once() -> None:
    s = make_group()
    refused(s, s.b)
    s.group.connect_succeeded(s.b)
    assert s.b.healthy and not s.b.down and s.b.last_error == ""
    assert s.b in {s.group.choose("c") for _ in range(3)}


@pytest.mark.parametrize("policy", list(Policy))
def test_when_all_are_down_the_one_that_failed_longest_ago_is_the_last_resort(
    policy: Policy,
) -> None:
    s = make_group(policy=policy)
    for backend in (s.b, s.c, s.a):
        refused(s, backend)
        s.clock.advance(1)
    assert not any(backend.healthy for backend in s.group.backends)
    assert s.group.choose("192.0.2.1") is s.b
    refused(s, s.b)
    assert s.group.choose("192.0.2.1") is s.c, "b failed again: c has waited longest now"


@pytest.mark.parametrize("policy", list(Policy))
def test_a_retry_gets_no_last_resort(policy: Policy) -> None:
    s = make_group(policy=policy)
    for backend in s.group.backends:
        refused(s, backend)
    assert s.group.choose_retry("192.0.2.1", (s.a,)) is None


def test_a_backend_failing_its_check_is_a_last_resort_too() -> None:
    s = checked_group(2)
    s.endpoints[0].last.refuse()
    s.clock.advance(1)
    s.endpoints[1].last.refuse()
    assert not s.a.healthy and not s.b.healthy
    assert s.group.choose("c") is s.a


def test_a_single_backend_is_chosen_unless_excluded() -> None:
    s = make_group(1, Policy.LEAST_CONN)
    only = s.group.backends[0]
    assert s.group.choose("c") is only
    assert s.group.choose_retry("c", (only,)) is None
    refused(s, only)
    assert s.group.choose("c") is only
    assert s.group.choose_retry("c", (only,)) is None


def test_a_sole_backend_stays_in_rotation_after_a_failed_connection(
    logs: Sequence[LogEvent],
) -> None:
    s = make_group(1)
    for _ in range(3):
        refused(s, s.a)
    assert s.a.healthy and s.a.down and s.a.failures == 3
    assert lines(logs) == [
        (
            "warn",
            "backend 10.0.0.1:9000 of route api failed: Connection refused; "
            "it is the route's only backend, so it stays in use",
        )
    ]
    s.group.connect_succeeded(s.a)
    assert not s.a.down
    assert lines(logs)[1:] == [("info", "backend 10.0.0.1:9000 of route api is back in use")]


def test_failed_connections_in_a_row_are_counted_until_a_connection_or_check_works() -> None:
    s = checked_group(1)
    for _ in range(3):
        refused(s, s.a)
    assert s.a.failures_in_a_row == 3 and s.a.error == "Connection refused"
    assert s.a.last_error == "", "still in use: it is the route's only backend"
    s.group.connect_succeeded(s.a)
    assert s.a.failures_in_a_row == 0 and s.a.error == ""
    refused(s, s.a)
    s.endpoints[0].last.accept()
    s.endpoints[0].last.reply(OK)
    assert s.a.failures_in_a_row == 0 and s.a.failures == 4 and not s.a.down
    s.group.stop()


def test_a_sole_backend_failing_its_check_is_down_but_still_tried() -> None:
    s = checked_group(1)
    s.endpoints[0].last.accept()
    s.endpoints[0].last.reply(UNAVAILABLE)
    assert not s.a.healthy and "answered 503" in s.a.last_error
    assert s.group.choose("c") is s.a


def test_passive_failures_log_once_going_down_and_once_coming_back(
    logs: Sequence[LogEvent],
) -> None:
    s = make_group()
    for _ in range(3):
        refused(s, s.b)
        s.clock.advance(10)
    s.group.connect_succeeded(s.b)
    s.group.connect_succeeded(s.b)
    assert lines(logs) == [
        (
            "warn",
            "backend 10.0.0.2:9000 of route api is down: Connection refused; "
            "retrying it in 10 seconds",
        ),
        ("info", "backend 10.0.0.2:9000 of route api is back in use"),
    ]
    assert s.b.failures == 3
    assert logs[0]["backend"] == "10.0.0.2:9000" and logs[0]["route"] == "api"


def test_a_group_without_a_route_name_logs_the_backend_alone(logs: Sequence[LogEvent]) -> None:
    s = make_group(route="", fail_timeout=2.5)
    refused(s, s.a)
    assert lines(logs) == [
        ("warn", "backend 10.0.0.1:9000 is down: Connection refused; retrying it in 2.5 seconds")
    ]


def test_connect_succeeded_on_a_healthy_backend_logs_nothing(logs: Sequence[LogEvent]) -> None:
    s = make_group()
    s.group.connect_succeeded(s.a)
    assert logs == []


def test_a_group_needs_a_backend() -> None:
    with pytest.raises(ValueError, match="route 'api' has no backend"):
        BackendGroup(
            [], policy=Policy.LEAST_CONN, clock=Clock(), settings=BackendSettings(), route="api"
        )


# -- active health checks -----------------------------------------------------------------


def checked_group(count: int = 1, check: HealthCheck = CHECK, **kwargs: Any) -> Setup:
    s = make_group(count, health=check, **kwargs)
    s.group.start()
    return s


def test_a_health_check_sends_one_get_to_the_path_under_the_backend_prefix() -> None:
    s = make_group(1, prefix=b"/base", health=CHECK)
    endpoint = s.endpoints[0]
    s.group.start()
    endpoint.last.accept()
    assert endpoint.last.sent == (
        b"GET /base/healthz HTTP/1.1\r\nHost: 10.0.0.1:9000\r\n"
        b"User-Agent: upgradeproxy-health-check\r\nConnection: close\r\n\r\n"
    )
    s.group.stop()


def test_the_expected_status_keeps_a_backend_healthy_and_closes_the_connection(
    logs: Sequence[LogEvent],
) -> None:
    s = make_group(2, health=CHECK)
    for endpoint in s.endpoints:
        endpoint.answer = OK
    s.group.start()
    assert [len(endpoint.attempts) for endpoint in s.endpoints] == [1, 1]
    assert s.a.healthy and s.b.healthy
    assert [endpoint.open_count for endpoint in s.endpoints] == [0, 0]
    assert logs == []
    s.group.stop()


def test_another_expected_status_can_be_asked_for() -> None:
    s = make_group(1, health=HealthCheck(path="/", expect_status=204))
    s.endpoints[0].answer = OK
    s.group.start()
    assert s.a.last_error == "health check GET / answered 200, expected 204"
    s.group.stop()


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        pytest.param(
            lambda attempt: (attempt.accept(), attempt.reply(UNAVAILABLE)),
            "health check GET /healthz answered 503, expected 200",
            id="other-status",
        ),
        pytest.param(
            lambda attempt: attempt.refuse(),
            "health check could not connect: Connection refused",
            id="refused",
        ),
        pytest.param(
            lambda attempt: (attempt.accept(), attempt.reply(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")),
            "health check GET /healthz got a malformed response: malformed status line",
            id="garbage",
        ),
        pytest.param(
            lambda attempt: (attempt.accept(), attempt.reply(b"HTTP/1.1 200 OK\n\n")),
            "health check GET /healthz got a malformed response: "
            "line ending other than CRLF (bare CR or LF) in the head",
            id="bare-lf",
        ),
        pytest.param(
            lambda attempt: (attempt.accept(), attempt.transport.loseConnection()),
            "health check GET /healthz got no response: the connection ended (closed)",
            id="closed",
        ),
        pytest.param(
            lambda attempt: (
                attempt.accept(),
                attempt.reply(H2_SETTINGS),
                attempt.transport.loseConnection(),
            ),
            f"health check GET /healthz: {SPEAKS_HTTP2}",
            id="http2",
        ),
        pytest.param(
            lambda attempt: attempt.accept(),
            "health check timed out after 5 seconds",
            id="timeout-after-connecting",
        ),
        pytest.param(
            lambda attempt: None,
            "health check timed out after 5 seconds",
            id="timeout-while-connecting",
        ),
    ],
)
def test_a_failed_health_check_marks_the_backend_down_with_its_reason(
    script: Any, reason: str, logs: Sequence[LogEvent]
) -> None:
    s = make_group(2, policy=Policy.LEAST_CONN, health=CHECK)
    s.endpoints[1].answer = OK
    s.group.start()
    attempt = s.endpoints[0].last
    script(attempt)
    s.clock.advance(CHECK.timeout)
    assert not s.a.healthy and s.a.down
    assert s.a.last_error == reason
    assert [s.group.choose("c") for _ in range(3)] == [s.b] * 3
    assert not attempt.open
    assert lines(logs) == [("warn", f"backend 10.0.0.1:9000 of route api is down: {reason}")]
    s.group.stop()


def test_a_response_head_that_trickles_in_is_read_whole() -> None:
    s = checked_group()
    attempt = s.endpoints[0].last
    attempt.accept()
    for i in range(len(UNAVAILABLE)):
        attempt.reply(UNAVAILABLE[i : i + 1])
    assert s.a.last_error == "health check GET /healthz answered 503, expected 200"
    s.group.stop()


def test_a_backend_that_passes_its_check_again_is_back_in_use(logs: Sequence[LogEvent]) -> None:
    s = checked_group()
    endpoint = s.endpoints[0]
    endpoint.answer = UNAVAILABLE
    endpoint.last.accept()
    endpoint.last.reply(UNAVAILABLE)
    for _ in range(3):
        s.clock.advance(CHECK.interval)
    assert not s.a.healthy
    endpoint.answer = OK
    s.clock.advance(CHECK.interval)
    s.clock.advance(CHECK.interval)
    assert s.a.healthy and s.group.choose("c") is s.a
    assert len(endpoint.attempts) == 6
    assert [line for line, _ in lines(logs)] == ["warn", "info"]
    assert lines(logs)[1] == ("info", "backend 10.0.0.1:9000 of route api is back in use")
    s.group.stop()


def test_checks_run_every_interval_and_a_slow_one_does_not_overlap_the_next() -> None:
    check = HealthCheck(path="/healthz", interval=1.0, timeout=3.5)
    s = checked_group(check=check)
    endpoint = s.endpoints[0]
    endpoint.last.accept()  # and never answers
    for _ in range(34):
        s.clock.advance(0.1)
        assert endpoint.open_count == 1 and len(endpoint.attempts) == 1
    s.clock.advance(0.1)  # the timeout, at 3.5 s
    assert endpoint.open_count == 0
    assert s.a.last_error == "health check timed out after 3.5 seconds"
    s.clock.advance(0.5)  # the next round interval
    assert len(endpoint.attempts) == 2
    endpoint.last.accept()
    endpoint.last.reply(OK)
    s.clock.advance(1.0)
    assert len(endpoint.attempts) == 3
    s.group.stop()


@pytest.mark.parametrize("stage", ["connecting", "waiting-for-the-response", "between-checks"])
def test_stop_leaves_no_timer_and_no_connection(stage: str, logs: Sequence[LogEvent]) -> None:
    s = checked_group(2)
    for endpoint in s.endpoints:
        if stage != "connecting":
            endpoint.last.accept()
        if stage == "between-checks":
            endpoint.last.reply(OK)
    s.group.stop()
    assert s.clock.getDelayedCalls() == []
    assert [endpoint.open_count for endpoint in s.endpoints] == [0, 0]
    assert s.a.healthy and s.b.healthy and logs == []
    s.clock.advance(3 * CHECK.interval)
    assert [len(endpoint.attempts) for endpoint in s.endpoints] == [1, 1]


def test_a_stopped_group_can_start_its_checks_again() -> None:
    s = checked_group()
    s.group.stop()
    s.group.start()
    s.group.start()
    assert len(s.endpoints[0].attempts) == 2
    s.group.stop()
    assert s.clock.getDelayedCalls() == []


def test_without_a_health_check_start_does_nothing() -> None:
    s = make_group(2)
    s.group.start()
    assert s.clock.getDelayedCalls() == []
    assert [endpoint.attempts for endpoint in s.endpoints] == [[], []]
    s.group.stop()


def test_a_passing_check_clears_a_passive_failure(logs: Sequence[LogEvent]) -> None:
    s = checked_group(fail_timeout=60.0)
    endpoint = s.endpoints[0]
    endpoint.last.accept()
    endpoint.last.reply(OK)
    refused(s, s.a)
    endpoint.answer = OK
    s.clock.advance(CHECK.interval)
    assert s.a.healthy and not s.a.down
    assert [level for level, _ in lines(logs)] == ["warn", "info"]
    s.group.stop()


def test_a_backend_down_both_ways_is_reported_once(logs: Sequence[LogEvent]) -> None:
    s = checked_group()
    refused(s, s.a)
    s.endpoints[0].last.refuse()
    s.group.connect_succeeded(s.a)  # the check still fails: not back yet
    assert not s.a.healthy
    assert s.a.last_error == "health check could not connect: Connection refused"
    assert [level for level, _ in lines(logs)] == ["warn"]
    s.group.stop()


def test_a_health_check_over_a_tcp_endpoint_that_times_out_stops_connecting() -> None:
    """Twisted's TCP endpoint fails a cancelled attempt with its own error, not a timeout."""
    reactor = MemoryReactorClock()
    address = BackendAddress(TCP4ClientEndpoint(reactor, "10.0.0.9", 9000), b"", "10.0.0.9:9000")
    group = BackendGroup(
        [address], policy=Policy.LEAST_CONN, clock=reactor, settings=BackendSettings(), health=CHECK
    )
    group.start()
    reactor.advance(CHECK.timeout)
    assert group.backends[0].last_error == "health check timed out after 5 seconds"
    assert reactor.connectors[0].stoppedConnecting
    reactor.advance(CHECK.interval - CHECK.timeout)
    factory = reactor.tcpClients[1][2]
    factory.clientConnectionFailed(
        reactor.connectors[1], Failure(getConnectError((111, "Connection refused")))
    )
    assert group.backends[0].last_error == "health check could not connect: Connection refused"
    group.stop()
    assert reactor.getDelayedCalls() == []


@pytest.mark.parametrize("path", ["healthz", "/health z", "/gesundheit\u00e4", "/a\r\nX: y"])
def test_a_health_check_path_must_be_a_request_path(path: str) -> None:
    with pytest.raises(ValueError, match="starts with / and has no spaces"):
        make_group(1, health=HealthCheck(path=path))


def test_describe_connect_failure_gives_the_systems_words() -> None:
    assert describe_connect_failure(Failure(getConnectError((111, "Connection refused")))) == (
        "Connection refused"
    )
    assert describe_connect_failure(Failure(ValueError("odd"))) == "odd"


def test_close_idle_closes_the_idle_connections_of_every_backend() -> None:
    s = make_group(2)
    pooled = []
    for backend, endpoint in zip(s.group.backends, s.endpoints, strict=True):
        connecting = backend.pool.acquire()
        endpoint.last.accept()
        connection = connecting.result
        assert isinstance(connection, BackendConnection)
        backend.pool.release(connection)
        pooled.append(endpoint.last)
    s.group.close_idle()
    assert not any(attempt.open for attempt in pooled)


# -- over loopback ----------------------------------------------------------------------


class FixedResponse(Protocol):
    """Answers the first request head with the factory's current response, then closes."""

    def __init__(self, factory: FixedResponseFactory) -> None:
        self.factory = factory
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received:
            self.factory.requests.append(self.received)
            self.transport.write(self.factory.response)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]


class FixedResponseFactory(Factory):
    def __init__(self) -> None:
        self.response = UNAVAILABLE
        self.requests: list[bytes] = []

    def buildProtocol(self, addr: object) -> FixedResponse:
        return FixedResponse(self)


def _checked_on_loopback(
    server: FixedResponseFactory, interval: float
) -> tuple[IListeningPort, BackendGroup]:
    """``server`` listening on loopback, and a group health-checking it every ``interval``."""
    port = reactor.listenTCP(0, server, interface=HOST)
    number = port.getHost().port  # type: ignore[attr-defined]
    endpoint = TCP4ClientEndpoint(reactor, HOST, number, timeout=2)
    group = BackendGroup(
        [BackendAddress(endpoint, b"", f"{HOST}:{number}")],
        policy=Policy.LEAST_CONN,
        clock=reactor,
        settings=BackendSettings(),
        health=HealthCheck(path="/healthz", interval=interval, timeout=2.0),
    )
    return port, group


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_health_checks_against_a_real_server_on_loopback() -> None:
    server = FixedResponseFactory()
    port, group = _checked_on_loopback(server, interval=0.1)
    listening = True
    backend = group.backends[0]
    group.start()
    try:
        await eventually(lambda: not backend.healthy, what="the 503 to be seen")
        assert backend.last_error == "health check GET /healthz answered 503, expected 200"
        assert server.requests[0].startswith(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:")
        server.response = OK
        await eventually(lambda: backend.healthy, what="the 200 to be seen")
        await port.stopListening()
        listening = False
        await eventually(lambda: not backend.healthy, what="the refusal to be seen")
        assert backend.last_error == "health check could not connect: Connection refused"
    finally:
        group.stop()
        if listening:
            await port.stopListening()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_health_checks_log_nothing_per_probe() -> None:
    server = FixedResponseFactory()
    server.response = OK
    port, group = _checked_on_loopback(server, interval=0.05)
    try:
        with capturedLogs() as events:
            group.start()
            await eventually(lambda: len(server.requests) >= 4, what="four probes")
        assert [formatEvent(e) for e in events] == []
    finally:
        group.stop()
        await port.stopListening()


# -- what the client is told when no backend could be reached ----------------------------

REFUSED_ADVICE = "check that the backend is running and listens on the host and port of its URL"


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (ConnectionRefusedError("Connection refused"), REFUSED_ADVICE),
        (ConnectTimeout(), "check that the host is up and that no firewall drops the port, "
         "or raise --connect-timeout"),
        (DNSLookupError("nowhere.invalid"), "check the host name in the backend URL"),
        (ValueError("something else"), ""),
    ],
)  # fmt: skip
def test_connect_advice_says_what_to_change(error: Exception, advice: str) -> None:
    assert connect_advice(Failure(error)) == advice


def test_one_backend_tried_gets_a_502_naming_it_why_and_what_to_change() -> None:
    s = make_group(1)
    tried = [FailedConnection(s.a, "Connection refused", REFUSED_ADVICE)]
    assert unreachable_answer("api", s.group.backends, tried) == (
        502,
        f"the backend (10.0.0.1:9000) could not be reached: Connection refused; {REFUSED_ADVICE}",
    )


def test_several_backends_tried_are_each_named_with_why_and_what_to_change() -> None:
    s = make_group(3)
    tried = [
        FailedConnection(s.a, "Connection refused", REFUSED_ADVICE),
        FailedConnection(s.b, "its TLS certificate could not be verified (...)"),
    ]
    assert unreachable_answer("api", s.group.backends, tried) == (
        502,
        "none of the 2 backends tried could be reached ("
        f"10.0.0.1:9000: Connection refused ({REFUSED_ADVICE}); "
        "10.0.0.2:9000: its TLS certificate could not be verified (...))",
    )


def test_a_last_resort_that_fails_gets_the_503_with_every_reason() -> None:
    s = make_group(2)
    refused(s, s.a)
    refused(s, s.b)
    tried = [FailedConnection(s.a, "Connection refused", REFUSED_ADVICE, in_rotation=False)]
    assert unreachable_answer("api", s.group.backends, tried) == (
        503,
        "no healthy backend for route api (10.0.0.1:9000: Connection refused; "
        "10.0.0.2:9000: Connection refused); tried 10.0.0.1:9000, down the longest, anyway: "
        f"Connection refused; {REFUSED_ADVICE}",
    )


def test_no_backend_reason_names_only_the_backends_that_are_down() -> None:
    s = make_group(2)
    assert no_backend_reason("api", s.group.backends) == "no healthy backend for route api"
    refused(s, s.b)
    assert no_backend_reason("api", s.group.backends) == (
        "no healthy backend for route api (10.0.0.2:9000: Connection refused)"
    )


# -- through the proxy ------------------------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
def test_a_sole_backend_that_restarts_costs_only_the_requests_it_refused(door: str) -> None:
    c = Cluster({"r": {"backends": ["a"]}}, door=door)
    c.endpoints["a"].refuse = True
    client = c.client()
    client.send(GET)
    assert status_of(client.received) == 502
    text = client.received.decode()
    assert "the backend (a) could not be reached: " in text
    assert f"scripted refusal.; {REFUSED_ADVICE}" in text
    # Back a moment later, well within its fail timeout: the next request reaches it.
    c.endpoints["a"].refuse = False
    c.clock.advance(1)
    client = c.client(port=50001)
    client.send(GET)
    c.last("a").send(HELLO)
    assert status_of(client.received) == 200


@pytest.mark.parametrize("door", DOORS)
def test_with_every_backend_down_a_request_still_tries_the_one_down_longest(door: str) -> None:
    c = Cluster({"r": {"backends": ["a", "b"], "policy": Policy.ROUND_ROBIN}}, door=door)
    c.endpoints["a"].refuse = c.endpoints["b"].refuse = True
    client = c.client()
    client.send(GET)
    assert status_of(client.received) == 502
    assert "none of the 2 backends tried could be reached" in client.received.decode()
    assert c.endpoints["a"].attempts == c.endpoints["b"].attempts == 1
    # a went down first; it is back.
    c.endpoints["a"].refuse = False
    client = c.client(port=50001)
    client.send(GET)
    c.last("a").send(HELLO)
    assert status_of(client.received) == 200
    assert c.endpoints["b"].attempts == 1, "one try, on the backend down the longest"


@pytest.mark.parametrize("door", DOORS)
def test_the_last_resort_failing_too_gets_the_503(door: str) -> None:
    c = Cluster({"r": {"backends": ["a", "b"], "policy": Policy.ROUND_ROBIN}}, door=door)
    c.endpoints["a"].refuse = c.endpoints["b"].refuse = True
    c.client().send(GET)
    client = c.client(port=50001)
    client.send(GET)
    assert status_of(client.received) == 503
    text = client.received.decode()
    assert "no healthy backend for route r (a: " in text
    assert "; tried a, down the longest, anyway: " in text and REFUSED_ADVICE in text
    assert (c.endpoints["a"].attempts, c.endpoints["b"].attempts) == (2, 1)


# -- across a reload -----------------------------------------------------------------------


def test_a_reload_keeps_the_health_of_backends_that_stay_and_moves_the_checks() -> None:
    from upgradeproxy.core.proxy import Configuration, Proxy
    from upgradeproxy.core.routing import Route

    before = make_group(2, health=CHECK)
    before.endpoints[0].refusing = True
    before.endpoints[1].answer = OK
    proxy = Proxy(routes=[Route("api", before.group, ())], clock=before.clock)
    proxy.start()
    a = before.a
    assert not a.healthy and a.last_error.startswith("health check could not connect")
    # The same name for a (at a new endpoint), b gone, c new.
    endpoints = [FakeEndpoint(), FakeEndpoint()]
    addresses = [
        BackendAddress(endpoints[0], b"", "10.0.0.1:9000"),
        BackendAddress(endpoints[1], b"", "10.0.0.3:9000"),
    ]
    group = BackendGroup(
        addresses, policy=Policy.ROUND_ROBIN, clock=before.clock, settings=BackendSettings(),
        health=CHECK, route="api",
    )  # fmt: skip
    proxy.reconfigure(Configuration((Route("api", group, ()),)))
    assert group.backends[0] is a, "the backend that stays is the same, with its state"
    assert not a.healthy and a.failures == 0
    # The new checks start at once, against the new addresses; b's stop.
    assert [len(e.attempts) for e in endpoints] == [1, 1]
    checks_of_b = len(before.endpoints[1].attempts)
    for endpoint in endpoints:
        endpoint.answer = OK
    before.clock.pump([CHECK.interval] * 3)
    assert len(before.endpoints[1].attempts) == checks_of_b
    assert len(before.endpoints[0].attempts) == 1, "a's old endpoint is not checked any more"
    assert all(len(e.attempts) >= 3 for e in endpoints)
    assert a.healthy
    proxy.stop()
