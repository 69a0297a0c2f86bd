"""Limits per client address, in memory, through both front doors: connections,
tunnels, the rate of upgrade attempts, the log and the counters."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from support import DOORS, GET, OK, SWITCH, UPGRADE, Client, Cluster, messages, status_of
from twisted.internet.address import IPv4Address
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory

from upgradeproxy import ProxySettings
from upgradeproxy.core._clientlimits import ClientLimits
from upgradeproxy.testing import MemoryTransport

BOB = "198.51.100.20"


def limited(door: str = "listening", routes: dict | None = None, **limits: float) -> Cluster:
    settings = ProxySettings(client_limits=ClientLimits(**limits))  # type: ignore[arg-type]
    return Cluster(routes, settings=settings, door=door)


def upgrade(c: Cluster, host: str = "192.0.2.7", port: int = 1, backend: str = "a") -> Client:
    client = c.client(host, port)
    client.send(UPGRADE)
    return client


def switched(c: Cluster, host: str = "192.0.2.7", port: int = 1, backend: str = "a") -> Client:
    client = upgrade(c, host, port)
    c.last(backend).send(SWITCH)
    assert client.received.startswith(b"HTTP/1.1 101 "), client.received
    return client


def retry_after(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return int(head.lower().split("retry-after: ", 1)[1].split("\r\n", 1)[0])


# -- connections ----------------------------------------------------------------------------


def test_connections_beyond_a_clients_limit_get_503_with_retry_after() -> None:
    c = limited(connections=2)
    first, second = c.client(port=1), c.client(port=2)
    third = c.client(port=3)
    assert status_of(third.received) == 503
    assert retry_after(third.received) == 5
    assert "client 192.0.2.7 has its limit of 2 connections open" in third.received.decode()
    # Another client is not affected, and the first two are served.
    c.client(BOB).send(GET)
    c.last("a").send(OK)
    first.send(GET)
    c.last("a").send(OK)
    assert first.received.endswith(b"hello") and not second.closed
    assert c.proxy.stats.limit_rejections["client_connections"] == 1


def test_a_closed_connection_frees_its_place() -> None:
    c = limited(connections=1)
    first = c.client(port=1)
    first.transport.loseConnection()
    second = c.client(port=2)
    assert not second.closed and second.received == b""


def test_through_the_web_door_a_clients_requests_and_tunnels_are_its_connections() -> None:
    c = limited("web", connections=1)
    tunnel = switched(c, port=1)
    refused = c.client(port=2)
    refused.send(GET)
    assert status_of(refused.received) == 503 and retry_after(refused.received) == 5
    assert "client 192.0.2.7 has its limit of 1 connections open" in refused.received.decode()
    tunnel.transport.loseConnection()
    served = c.client(port=3)
    served.send(GET)
    c.last("a").send(OK)
    assert served.received.endswith(b"hello")


def test_without_limits_a_client_may_open_many_connections() -> None:
    c = Cluster()
    clients = [c.client(port=n) for n in range(50)]
    assert not any(client.closed for client in clients)
    assert len(c.proxy.clients) == 0


def test_a_client_far_over_its_limit_is_closed_at_accept_unanswered() -> None:
    c = limited(connections=2)
    factory = c.factory
    address = IPv4Address("TCP", "192.0.2.7", 0)
    # Refused connections stay open while they linger (as on TCP): count them in.
    held = []
    for port in range(4):
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", port))
        assert protocol is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", port))
        protocol.makeConnection(transport)
        held.append(transport)
    assert [status_of(t.value()) for t in held[2:]] == [503, 503]
    with capturedLogs() as logs:
        assert closed_at_accept(factory, address)
    assert messages(logs) == "", "the client's 503 was logged less than a minute ago"
    assert not closed_at_accept(factory, IPv4Address("TCP", BOB, 1))
    c.clock.advance(61)
    with capturedLogs() as logs:
        assert closed_at_accept(factory, address)
        assert closed_at_accept(factory, address)
    assert c.proxy.stats.limit_rejections["client_connections_closed_at_accept"] == 3
    text = messages(logs)
    assert "twice its limit of 2 connections" in text and text.count("\n") == 0


def closed_at_accept(factory: object, address: IPv4Address) -> bool:
    """True when a new connection from ``address`` was closed at once, with no HTTP written.

    (Under TLS, the TLS layer's own close alert is written before the abort.)
    """
    protocol = factory.buildProtocol(address)  # type: ignore[attr-defined]
    transport = MemoryTransport(peerAddress=address)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return not transport.connected and b"HTTP/" not in transport.value()


def test_closing_at_accept_works_under_tls_too(tmp_path: Path) -> None:
    c = limited(connections=1)
    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    key = issued.private_key_pem.bytes()
    cert = issued.cert_chain_pems[0].bytes()
    options = PrivateCertificate.loadPEM(key + cert).options()
    tls = TLSMemoryBIOFactory(options, False, c.factory)
    address = IPv4Address("TCP", "192.0.2.7", 1)
    # Held open on another listener: the count is the client's, wherever it connects.
    for _ in range(2):
        c.factory.buildProtocol(address).makeConnection(StringTransport(peerAddress=address))
    assert closed_at_accept(tls, address), "a TLS factory is handed a protocol that closes"


def test_ipv6_clients_of_one_slash_64_share_a_limit() -> None:
    c = limited(connections=1)
    c.client("2001:db8:1:2::10")
    same = c.client("2001:db8:1:2::99")
    other = c.client("2001:db8:1:3::10")
    assert status_of(same.received) == 503 and "2001:db8:1:2::99" in same.received.decode()
    assert other.received == b""


def test_the_ipv6_prefix_can_be_the_full_address() -> None:
    settings = ProxySettings(client_limits=ClientLimits(connections=1), client_ipv6_prefix=128)
    c = Cluster(settings=settings)
    c.client("2001:db8:1:2::10")
    assert c.client("2001:db8:1:2::99").received == b""


# -- upgrades, on either door ---------------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
def test_upgrade_attempts_beyond_the_rate_get_429_before_any_backend(door: str) -> None:
    c = limited(door, upgrade_rate=1, upgrade_burst=2)
    switched(c, port=1)
    switched(c, port=2)
    third = upgrade(c, port=3)
    assert status_of(third.received) == 429
    assert retry_after(third.received) == 1
    assert "more than 1 upgrade attempts a second" in third.received.decode()
    assert c.count("a") == 2, "the backend never heard of the third"
    # Plain requests are not upgrade attempts.
    plain = c.client(port=4)
    plain.send(GET)
    c.last("a").send(OK)
    assert plain.received.endswith(b"hello")
    c.clock.advance(1)
    switched(c, port=5)
    assert c.proxy.stats.limit_rejections["client_upgrade_rate"] == 1


@pytest.mark.parametrize("door", DOORS)
def test_tunnels_beyond_a_clients_limit_get_429_until_one_ends(door: str) -> None:
    c = limited(door, tunnels=1)
    tunnel = switched(c, port=1)
    second = upgrade(c, port=2)
    assert status_of(second.received) == 429
    assert "has its limit of 1 tunnels open" in second.received.decode()
    switched(c, BOB, port=3)
    tunnel.transport.reset()
    switched(c, port=4)
    assert c.proxy.stats.limit_rejections["client_tunnels"] == 1


@pytest.mark.parametrize("door", DOORS)
def test_an_upgrade_that_does_not_switch_gives_its_place_back(door: str) -> None:
    c = limited(door, tunnels=1)
    declined = upgrade(c, port=1)
    c.last("a").send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert status_of(declined.received) == 403
    gone = upgrade(c, port=2)
    gone.transport.reset()  # before the backend answered
    switched(c, port=3)
    assert c.proxy.clients.open_count(("", "192.0.2.7")) == (0, 1)


def test_parallel_upgrades_cannot_pass_the_tunnel_limit() -> None:
    c = limited(tunnels=2)
    pending = [upgrade(c, port=n) for n in range(3)]
    assert [status_of(p.received) for p in pending if p.received] == [429]
    assert c.count("a") == 2


def test_a_route_can_limit_its_own_tunnels_per_client() -> None:
    routes = {
        "chat": {"backends": ["a"], "client_limits": ClientLimits(tunnels=1)},
        "other": {"backends": ["b"], "path": "/other"},
    }
    c = Cluster(routes)
    switched(c, port=1)
    second = upgrade(c, port=2)
    assert status_of(second.received) == 429
    assert "tunnels open on route chat" in second.received.decode()
    other = c.client(port=3)
    other.send(UPGRADE.replace(b"GET /chat", b"GET /other/chat"))
    c.last("b").send(SWITCH)
    assert other.received.startswith(b"HTTP/1.1 101 ")


def test_a_route_limit_adds_to_the_proxys() -> None:
    routes = {"chat": {"backends": ["a"], "client_limits": ClientLimits(upgrade_rate=100)}}
    c = limited(routes=routes, tunnels=1)
    switched(c, port=1)
    assert status_of(upgrade(c, port=2).received) == 429


def test_refusals_are_logged_once_per_client_per_minute() -> None:
    c = limited(upgrade_rate=0.01)
    switched(c, port=1)
    with capturedLogs() as logs:
        for port in range(2, 7):
            assert status_of(upgrade(c, port=port).received) == 429
        upgrade(c, BOB, port=9)  # its first: allowed
        assert status_of(upgrade(c, BOB, port=10).received) == 429
    text = messages(logs)
    assert text.count("429 to 192.0.2.7: ") == 1
    assert text.count(f"429 to {BOB}: ") == 1
    c.clock.advance(61)
    with capturedLogs() as logs:
        upgrade(c, port=11)
    assert "4 more from this address not logged" in messages(logs)


def test_the_snapshot_shows_the_limits_and_the_clients_tracked() -> None:
    c = limited(connections=10, upgrade_rate=2.5)
    c.client(port=1)
    snapshot = c.proxy.snapshot()
    assert snapshot["limits"]["client_connections"] == 10
    assert snapshot["limits"]["client_upgrade_rate"] == 2.5
    assert snapshot["client_entries"] == 1
