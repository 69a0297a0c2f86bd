"""A reload and the per-client limits and PROXY protocol: what changes, what is kept."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest
from twisted.internet import reactor

from upgradeproxy.cli._reloader import kept_for_restart
from upgradeproxy.cli.config import ProxyConfig, RouteConfig
from upgradeproxy.cli.service import ConfiguredProxy, Listener, ProxyService, StartFailed, listeners
from upgradeproxy.core._clientlimits import ClientLimits

RUNNING = ProxyConfig(
    routes=(RouteConfig("app", (), "/", ("http://127.0.0.1:9000",)),),
    listen=(),
    proxy_protocol_listen=("tcp:0:interface=127.0.0.1",),
    trusted_proxies=("10.0.0.0/8",),
    client_connections=5,
)


def test_a_reload_swaps_the_limits_and_keeps_the_counts() -> None:
    configured = ConfiguredProxy(RUNNING, reactor)
    proxy = configured.proxy
    proxy.clients.open_connection(("", "192.0.2.7"), 5, 0.0)
    new_route = replace(RUNNING.routes[0], route_client_tunnels=3)
    configured.apply(replace(RUNNING, client_connections=2, routes=(new_route,)))
    assert proxy.settings.client_limits == ClientLimits(connections=2)
    assert proxy.router.routes[0].client_limits == ClientLimits(tunnels=3)
    assert proxy.clients.open_count(("", "192.0.2.7")) == (1, 0), "what is open stays counted"
    configured.proxy.stop()


def test_a_reload_changes_whom_the_listeners_trust() -> None:
    configured = ConfiguredProxy(RUNNING, reactor)
    reader = configured.behind(configured.factory)
    assert reader.is_trusted(_peer("10.1.2.3")) and not reader.is_trusted(_peer("192.0.2.1"))
    configured.apply(replace(RUNNING, trusted_proxies=("192.0.2.0/24",), proxy_protocol_timeout=2))
    assert not reader.is_trusted(_peer("10.1.2.3")) and reader.is_trusted(_peer("192.0.2.1"))
    assert reader.timeout == 2
    configured.proxy.stop()


def test_an_endpoint_cannot_move_between_direct_and_proxy_protocol_on_a_reload() -> None:
    port = _free_port()
    endpoint = f"tcp:{port}:interface=127.0.0.1"
    configured = ConfiguredProxy(replace(RUNNING, listen=(endpoint,)), reactor)
    service = ProxyService(
        configured.factory, [Listener(endpoint)], reactor=reactor, grace=0,
        behind=configured.behind,
    )  # fmt: skip
    try:
        with pytest.raises(StartFailed, match="moved between listen and \\[proxy_protocol\\]"):
            service.open_listeners([Listener(endpoint, proxy_protocol=True)])
        service.open_listeners([Listener(endpoint)])  # the same: nothing to do
    finally:
        service.close_listeners([])
        configured.proxy.stop()


def test_with_workers_the_proxy_protocol_listeners_stay_until_a_restart() -> None:
    running = replace(RUNNING, workers=2)
    new = replace(running, proxy_protocol_listen=("tcp:9999",), client_tunnels=4)
    kept = kept_for_restart(running, new)
    assert kept.proxy_protocol_listen == running.proxy_protocol_listen
    assert kept.client_tunnels == 4
    assert [lst.proxy_protocol for lst in listeners(kept)] == [True]


def _peer(host: str) -> object:
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", host, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
