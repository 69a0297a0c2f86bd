"""Sending the PROXY protocol to backends (HAProxy's send-proxy), in memory: a scripted
backend checks exactly what it received, header first, then the request."""

from __future__ import annotations

import pytest
from support import DOORS, GET, OK, SWITCH, UPGRADE, Cluster
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from upgradeproxy import BackendSettings
from upgradeproxy.core._proxyheader import encode, parse
from upgradeproxy.core.address import BackendAddress
from upgradeproxy.core.balancer import BackendGroup, HealthCheck, Policy
from upgradeproxy.core.proxyprotocol import ProxyProtocolFactory, parse_network
from upgradeproxy.testing import ScriptedBackendEndpoint, connect_client

PROXY = IPv4Address("TCP", "127.0.0.1", 8080)


def sending(version: str, door: str = "listening") -> Cluster:
    return Cluster({"r": {"backends": ["a"], "send_proxy": version}}, door=door)


def header_for(version: str, host: str = "192.0.2.7", port: int = 50000) -> bytes:
    return encode(version, IPv4Address("TCP", host, port), PROXY)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_backend_gets_the_header_then_the_request(version: str) -> None:
    c = sending(version)
    client = c.client()
    client.send(GET)
    backend = c.last("a")
    header = header_for(version)
    assert backend.received.startswith(header)
    assert backend.received[len(header) :].startswith(b"GET /page HTTP/1.1\r\n")
    if version == "v1":
        assert header == b"PROXY TCP4 192.0.2.7 127.0.0.1 50000 8080\r\n"
    backend.send(OK)
    assert client.received.endswith(b"hello")


def test_without_send_proxy_the_request_comes_first() -> None:
    c = Cluster()
    c.client().send(GET)
    assert c.last("a").received.startswith(b"GET /page HTTP/1.1\r\n")


def test_the_twisted_web_door_sends_it_too() -> None:
    c = sending("v1", door="web")
    c.client().send(GET)
    assert c.last("a").received.startswith(b"PROXY TCP4 192.0.2.7 ")


def test_an_upgrade_sends_it_before_its_request_and_the_tunnel_follows() -> None:
    c = sending("v2")
    client = c.client()
    client.send(UPGRADE + b"\x81\x02hi")
    backend = c.last("a")
    header = header_for("v2")
    assert backend.received == header + backend.received[len(header) :]
    backend.send(SWITCH)
    client.send(b"more")
    rest = backend.received[len(header) :]
    assert rest.startswith(b"GET /chat HTTP/1.1\r\n") and rest.endswith(b"\x81\x02himore")
    assert rest.count(b"PROXY") == 0 and backend.received.count(header) == 1


@pytest.mark.parametrize("door", DOORS)
def test_a_pooled_connection_serves_only_the_client_connection_it_names(door: str) -> None:
    c = sending("v1", door=door)
    first = c.client(port=1)
    first.send(GET)
    c.last("a").send(OK)
    first.send(GET)
    assert c.count("a") == 1, "the same client connection reuses its backend connection"
    c.last("a").send(OK)
    other = c.client(port=2)
    other.send(GET)
    assert c.count("a") == 2, "another client connection never gets it"
    assert c.last("a").received.startswith(header_for("v1", port=2))
    c.last("a").send(OK)
    pool = c.proxy.router.routes[0].group.backends[0].pool
    assert pool.idle_count == 2


def test_a_private_idle_connection_closes_with_its_client_connection() -> None:
    c = sending("v1")
    pool = c.proxy.router.routes[0].group.backends[0].pool
    client = c.client()
    client.send(GET)
    backend = c.last("a")
    backend.send(OK)
    assert pool.idle_count == 1 and not backend.closed
    client.transport.loseConnection()
    assert backend.closed and pool.idle_count == 0


def test_at_most_one_idle_connection_is_kept_per_client_connection() -> None:
    c = sending("v1")
    pool = c.proxy.router.routes[0].group.backends[0].pool
    client = c.client()
    client.send(GET)
    first = c.last("a")
    # While the first answer is pending, nothing else can use that connection.
    assert pool.take_idle(header_for("v1")) is None
    first.send(OK)
    assert pool.idle_count == 1
    connection = pool.take_idle(header_for("v1"))
    assert connection is not None
    second = pool.take_idle(None)
    assert second is None, "an owned connection never serves a request without a header"


def test_behind_a_balancer_the_header_names_the_real_client() -> None:
    c = sending("v1")
    factory = ProxyProtocolFactory(c.factory, [parse_network("10.0.0.0/8")], clock=c.clock)
    protocol, _ = connect_client(factory, "10.0.0.5", 40000)  # type: ignore[arg-type]
    incoming = b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\r\n"
    protocol.dataReceived(incoming + GET)
    backend = c.last("a")
    assert backend.received.startswith(incoming), "source and destination as the balancer said"


def test_health_checks_send_it_as_local() -> None:
    health = HealthCheck(path="/healthz", interval=10)
    for version, expected in (("v1", b"PROXY UNKNOWN\r\n"), ("v2", encode("v2", None, None))):
        c = Cluster({"r": {"backends": ["a"], "send_proxy": version, "health": health}})
        probe = c.last("a")
        assert probe.received.startswith(expected + b"GET /healthz HTTP/1.1\r\n")
        header = parse(probe.received)
        assert header is not None and header.source is None


def test_an_https_backend_is_refused() -> None:
    address = BackendAddress(ScriptedBackendEndpoint(), b"", "app:443", tls=True)
    with pytest.raises(ValueError, match="send_proxy cannot be used with https:// backends"):
        BackendGroup(
            [address], policy=Policy.LEAST_CONN, clock=Clock(), settings=BackendSettings(),
            send_proxy="v1",
        )  # fmt: skip


@pytest.mark.parametrize("door", DOORS)
def test_a_client_behind_ipv6_is_sent_as_tcp6(door: str) -> None:
    c = sending("v1", door=door)
    c.client("2001:db8::7", 4000).send(GET)
    received = c.last("a").received
    assert received.startswith(b"PROXY TCP6 2001:db8::7 ")
