"""Per-client limits as plain data: keys, counts, token buckets and the memory bound."""

from __future__ import annotations

from upgradeproxy.core._clientlimits import (
    FAR_OVER,
    MAX_IDLE,
    ClientLimits,
    ClientTable,
    Limit,
    client_key,
)


def test_ipv4_clients_are_their_address() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"


def test_ipv6_clients_are_their_slash_64_by_default() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:bbbb::9") == client_key("2001:db8:1:2:aaaa::1")
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")


def test_the_ipv6_prefix_can_be_the_full_address() -> None:
    assert client_key("2001:db8::1", 128) == "2001:db8::1"
    assert client_key("2001:db8::1", 48) == "2001:db8::/48"


def test_an_ipv4_mapped_address_is_the_ipv4_client() -> None:
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"


def test_a_peer_that_is_no_ip_address_is_its_own_key() -> None:
    assert client_key("unknown") == "unknown"


def test_connections_beyond_the_limit_are_refused_and_stay_counted() -> None:
    table = ClientTable()
    key = ("", "192.0.2.7")
    assert table.open_connection(key, 2, 0.0) is None
    assert table.open_connection(key, 2, 0.0) is None
    over = table.open_connection(key, 2, 0.0)
    assert over is not None and over.limit is Limit.CONNECTIONS and over.retry_after > 0
    assert "limit of 2 connections" in over.reason("192.0.2.7")
    assert table.open_count(key) == (3, 0)
    table.close_connection(key, 0.0)
    table.close_connection(key, 0.0)
    assert table.open_connection(key, 2, 0.0) is None


def test_far_over_is_twice_the_limit() -> None:
    table = ClientTable()
    key = ("", "192.0.2.7")
    for _ in range(FAR_OVER * 3 - 1):
        table.open_connection(key, 3, 0.0)
    assert not table.far_over(key, 3)
    table.open_connection(key, 3, 0.0)
    assert table.far_over(key, 3)
    assert not table.far_over(("", "192.0.2.8"), 3)


def test_a_client_with_nothing_open_is_forgotten() -> None:
    table = ClientTable()
    key = ("", "192.0.2.7")
    table.open_connection(key, 5, 0.0)
    assert len(table) == 1
    table.close_connection(key, 0.0)
    assert len(table) == 0


def test_tunnels_are_reserved_at_admission_and_released() -> None:
    table = ClientTable()
    key = ("", "192.0.2.7")
    limits = ClientLimits(tunnels=2)
    assert table.admit_upgrade([(key, limits)], 0.0) is None
    assert table.admit_upgrade([(key, limits)], 0.0) is None
    refused = table.admit_upgrade([(key, limits)], 0.0)
    assert refused is not None and refused[1].limit is Limit.TUNNELS
    table.release_tunnel(key, 0.0)
    assert table.admit_upgrade([(key, limits)], 0.0) is None


def test_the_upgrade_rate_is_a_token_bucket() -> None:
    table = ClientTable()
    key = ("", "192.0.2.7")
    limits = ClientLimits(upgrade_rate=2, upgrade_burst=3)
    for _ in range(3):
        assert table.admit_upgrade([(key, limits)], 10.0) is None
    refused = table.admit_upgrade([(key, limits)], 10.0)
    assert refused is not None
    over = refused[1]
    assert over.limit is Limit.UPGRADE_RATE and over.retry_after == 1
    # Half a second later, one token (2 a second) is back, and only one.
    assert table.admit_upgrade([(key, limits)], 10.5) is None
    assert table.admit_upgrade([(key, limits)], 10.5) is not None


def test_a_slow_rate_says_how_long_to_wait() -> None:
    table = ClientTable()
    key = ("", "192.0.2.7")
    limits = ClientLimits(upgrade_rate=0.1)  # one every ten seconds, burst 1
    assert table.admit_upgrade([(key, limits)], 0.0) is None
    refused = table.admit_upgrade([(key, limits)], 3.0)
    assert refused is not None and refused[1].retry_after == 7


def test_a_refused_attempt_is_not_charged_in_any_scope() -> None:
    table = ClientTable()
    proxy, route = ("", "192.0.2.7"), ("chat", "192.0.2.7")
    scopes = [
        (proxy, ClientLimits(upgrade_rate=1, upgrade_burst=5)),
        (route, ClientLimits(tunnels=1)),
    ]
    assert table.admit_upgrade(scopes, 0.0) is None
    refused = table.admit_upgrade(scopes, 0.0)
    assert refused is not None and refused[0] == route
    # Only the admitted attempt took a token: four are left.
    for _ in range(4):
        assert table.admit_upgrade([(proxy, scopes[0][1])], 0.0) is None
    assert table.admit_upgrade([(proxy, scopes[0][1])], 0.0) is not None


def test_an_entry_expires_once_its_bucket_is_full_again() -> None:
    table = ClientTable()
    limits = ClientLimits(upgrade_rate=1, upgrade_burst=2)
    table.admit_upgrade([(("", "192.0.2.7"), limits)], 0.0)
    assert len(table) == 1
    # One token spent, back after a second: the entry then goes on the next call.
    table.admit_upgrade([(("", "192.0.2.8"), limits)], 1.5)
    table.admit_upgrade([(("", "192.0.2.9"), limits)], 1.5)
    assert table.open_count(("", "192.0.2.7")) == (0, 0)
    assert len(table) == 2


def test_a_flood_of_distinct_addresses_is_bounded() -> None:
    table = ClientTable()
    limits = ClientLimits(upgrade_rate=0.001, tunnels=10)
    for n in range(100_000):
        key = ("", f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        assert table.admit_upgrade([(key, limits)], 0.0) is None
        table.release_tunnel(key, 0.0)  # the upgrade failed: nothing stays open
        assert len(table) <= MAX_IDLE
    assert len(table) == MAX_IDLE


def test_a_flood_of_connections_is_bounded_by_what_is_open() -> None:
    table = ClientTable()
    limits = ClientLimits(upgrade_rate=0.001)
    for n in range(100_000):
        key = ("", f"2001:db8:{n >> 16:x}:{n & 0xFFFF:x}::1")
        table.open_connection(key, 4, 0.0)
        table.admit_upgrade([(key, limits)], 0.0)
        table.close_connection(key, 0.0)
    assert len(table) == MAX_IDLE


def test_open_entries_are_never_forgotten() -> None:
    table = ClientTable(max_idle=10)
    held = ("", "192.0.2.1")
    table.open_connection(held, 1, 0.0)
    limits = ClientLimits(upgrade_rate=0.001)
    for n in range(1_000):
        table.admit_upgrade([(("", f"10.0.{n >> 8}.{n & 255}"), limits)], 0.0)
    assert table.open_count(held) == (1, 0)
    assert len(table) == 11
