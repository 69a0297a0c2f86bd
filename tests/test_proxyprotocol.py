"""Listening behind a PROXY protocol load balancer, in memory: trusted sources only, the
header read exactly, and the real client's address everywhere the proxy uses one."""

from __future__ import annotations

from typing import Any

from support import GET, OK, SWITCH, UPGRADE, Cluster, messages, status_of
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import capturedLogs
from zope.interface import implementer

from upgradeproxy import IUpgradeValidator, ProxySettings, Refusal, UpgradeAttempt
from upgradeproxy.core._clientlimits import ClientLimits
from upgradeproxy.core._proxyheader import encode
from upgradeproxy.core._side import Side
from upgradeproxy.core.accesslog import AccessLog, RequestRecord
from upgradeproxy.core.balancer import Policy
from upgradeproxy.core.proxyprotocol import ProxyProtocolFactory, parse_network
from upgradeproxy.testing import connect_client

BALANCER = "10.0.0.5"
CLIENT = IPv4Address("TCP", "198.51.100.7", 51234)
FRONT = IPv4Address("TCP", "203.0.113.1", 443)
V1 = encode("v1", CLIENT, FRONT)
V2 = encode("v2", CLIENT, FRONT)


class Records(AccessLog):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[Any] = []

    def emit(self, record: Any) -> None:
        self.records.append(record)


def behind_balancer(settings: ProxySettings | None = None) -> tuple[Cluster, ProxyProtocolFactory]:
    cluster = Cluster(settings=settings, access_log=Records())
    factory = ProxyProtocolFactory(
        cluster.factory, [parse_network("10.0.0.0/8")], clock=cluster.clock
    )
    return cluster, factory


def connect(factory: ProxyProtocolFactory, host: str = BALANCER, port: int = 40000) -> Any:
    protocol, transport = connect_client(factory, host, port)  # type: ignore[arg-type]
    return protocol, transport


def records(cluster: Cluster) -> list[Any]:
    return cluster.proxy.access_log.records  # type: ignore[attr-defined, no-any-return]


def test_the_real_client_is_in_the_access_log_and_x_forwarded_for() -> None:
    c, factory = behind_balancer()
    protocol, transport = connect(factory)
    protocol.dataReceived(V1 + GET)
    backend = c.last("a")
    assert b"X-Forwarded-For: 198.51.100.7\r\n" in backend.received
    backend.send(OK)
    assert transport.value().endswith(b"hello")
    record = records(c)[-1]
    assert isinstance(record, RequestRecord) and record.client == "198.51.100.7"


def test_a_header_split_at_every_byte_loses_nothing_after_it() -> None:
    c, factory = behind_balancer()
    protocol, transport = connect(factory)
    for byte in V2 + GET:
        protocol.dataReceived(bytes([byte]))
    c.last("a").send(OK)
    assert transport.value().endswith(b"hello")
    assert records(c)[-1].client == "198.51.100.7"


def test_a_websocket_tunnel_gets_the_bytes_behind_the_header_and_its_switch() -> None:
    c, factory = behind_balancer()
    protocol, transport = connect(factory)
    protocol.dataReceived(V1 + UPGRADE + b"\x81\x05early")
    backend = c.last("a")
    backend.send(SWITCH)
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    assert backend.received.endswith(b"\r\n\r\n\x81\x05early")
    protocol.dataReceived(b"more")
    assert backend.received.endswith(b"early" + b"more")
    tunnel = next(iter(c.proxy.tunnels))
    assert tunnel.stats.client == "198.51.100.7"
    assert tunnel.transport(Side.CLIENT) is transport, "the real transport, unwrapped"


def test_the_wrapped_protocol_gets_the_real_transport() -> None:
    c, factory = behind_balancer()
    protocol, transport = connect(factory)
    protocol.dataReceived(V1)
    connection = next(iter(c.proxy.connections))
    assert connection.transport is transport  # type: ignore[attr-defined]


def test_half_close_is_passed_on() -> None:
    c, factory = behind_balancer()
    protocol, transport = connect(factory)
    protocol.dataReceived(V1 + UPGRADE)
    backend = c.last("a")
    backend.send(SWITCH)
    transport.eof()
    assert backend.transport.write_closed, "the client's EOF half-closes the backend side"


def test_a_trusted_source_without_a_header_is_closed_and_logged() -> None:
    c, factory = behind_balancer()
    protocol, transport = connect(factory)
    with capturedLogs() as logs:
        protocol.dataReceived(GET)
    assert transport.value() == b"" and not transport.connected
    assert c.proxy.stats.connections_total == 0, "the proxy never saw the connection"
    text = messages(logs)
    assert "closed a connection from 10.0.0.5, a trusted proxy" in text
    assert "does not start with a PROXY protocol header" in text


def test_a_malformed_header_is_refused_at_once() -> None:
    _, factory = behind_balancer()
    protocol, transport = connect(factory)
    with capturedLogs() as logs:
        protocol.dataReceived(b"PROXY TCP4 198.51.100.7 203.0.113.1 51234\r\n")
    assert not transport.connected
    assert "malformed" in messages(logs)


def test_a_header_that_does_not_come_in_time_closes_the_connection() -> None:
    c, factory = behind_balancer()
    protocol, transport = connect(factory)
    protocol.dataReceived(V1[:10])
    c.clock.advance(4.9)
    assert transport.connected
    with capturedLogs() as logs:
        c.clock.advance(0.2)
    assert not transport.connected
    assert "no complete PROXY protocol header within 5 seconds" in messages(logs)


def test_the_log_of_refused_connections_is_rate_limited() -> None:
    _, factory = behind_balancer()
    with capturedLogs() as logs:
        for port in range(5):
            protocol, _ = connect(factory, port=port)
            protocol.dataReceived(GET)
    assert messages(logs).count("closed a connection") == 1


def test_an_untrusted_source_is_a_direct_client_and_its_header_is_not_accepted() -> None:
    c, factory = behind_balancer()
    protocol, transport = connect(factory, host="192.0.2.50")
    protocol.dataReceived(V1 + GET)
    assert status_of(transport.value()) == 400
    assert c.count("a") == 0
    other, transport = connect(factory, host="192.0.2.50", port=2)
    other.dataReceived(GET)
    c.last("a").send(OK)
    assert records(c)[-1].client == "192.0.2.50"


def test_local_and_unknown_headers_use_the_balancers_address() -> None:
    c, factory = behind_balancer()
    for header in (encode("v2", None, None), b"PROXY UNKNOWN\r\n"):
        protocol, _transport = connect(factory)
        protocol.dataReceived(header + GET)
        c.last("a").send(OK)
        assert records(c)[-1].client == BALANCER


def test_ipv6_clients_and_mapped_trusted_addresses() -> None:
    c, factory = behind_balancer()
    client6 = IPv6Address("TCP", "2001:db8::7", 5000)
    protocol, _ = connect(factory, host="::ffff:10.0.0.5")
    protocol.dataReceived(encode("v2", client6, IPv6Address("TCP", "2001:db8::1", 80)) + GET)
    c.last("a").send(OK)
    assert records(c)[-1].client == "2001:db8::7"


def test_per_client_limits_count_the_real_clients() -> None:
    settings = ProxySettings(client_limits=ClientLimits(connections=1))
    _c, factory = behind_balancer(settings)
    first, _ = connect(factory, port=1)
    first.dataReceived(V1)
    other, other_transport = connect(factory, port=2)
    other.dataReceived(encode("v1", IPv4Address("TCP", "198.51.100.8", 1), FRONT))
    assert other_transport.value() == b"", "another client behind the same balancer"
    same, same_transport = connect(factory, port=3)
    same.dataReceived(V2)
    assert status_of(same_transport.value()) == 503
    assert "client 198.51.100.7" in same_transport.value().decode()


def test_validators_see_the_real_client() -> None:
    seen: list[str] = []

    @implementer(IUpgradeValidator)
    class Watch:
        name = "watch"

        def check_request(self, attempt: UpgradeAttempt) -> Refusal | None:
            seen.append(attempt.client)
            return None

        def check_response(self, attempt: UpgradeAttempt) -> Refusal | None:
            return None

    c, factory = behind_balancer()
    c.proxy.router.routes[0].validators = (Watch(),)
    protocol, _ = connect(factory)
    protocol.dataReceived(V1 + UPGRADE)
    assert seen == ["198.51.100.7"]


def test_client_hash_balances_on_the_real_client() -> None:
    cluster = Cluster(
        {"r": {"backends": ["a", "b", "c", "d"], "policy": Policy.CLIENT_HASH}},
        access_log=Records(),
    )
    factory = ProxyProtocolFactory(
        cluster.factory, [parse_network("10.0.0.0/8")], clock=cluster.clock
    )
    group = cluster.proxy.router.routes[0].group
    chosen = set()
    for n in range(8):
        client = IPv4Address("TCP", f"198.51.100.{n}", 1000 + n)
        protocol, _transport = connect(factory, port=40000 + n)
        protocol.dataReceived(encode("v2", client, FRONT) + GET)
        expected = group.choose(client.host).name
        chosen.add(expected)
        assert cluster.count(expected) >= 1
        cluster.last(expected).send(OK)
        assert records(cluster)[-1].backend == expected
    assert len(chosen) > 1, "the clients behind one balancer are spread, not all on one backend"
