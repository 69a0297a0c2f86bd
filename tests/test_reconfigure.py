"""Proxy.reconfigure in memory: new requests take the new configuration; nothing in flight moves."""

from __future__ import annotations

from dataclasses import replace

import pytest
from support import DOORS, GET, OK, SWITCH, UPGRADE, Cluster, status_of

from upgradeproxy import ProxySettings
from upgradeproxy.core.accesslog import AccessLog
from upgradeproxy.core.proxy import Configuration


def backend_states(c: Cluster) -> dict[tuple[str, str], dict[str, object]]:
    return {(b["route"], b["backend"]): b for b in c.proxy.snapshot()["backends"]}


@pytest.mark.parametrize("door", DOORS)
def test_new_requests_go_to_the_new_backend(door: str) -> None:
    c = Cluster({"r": {"backends": ["a"]}}, door=door)
    done = c.reconfigure({"r": {"backends": ["b"]}})
    assert (done.added, done.kept, done.removed) == (("r/b",), (), ("r/a",))
    client = c.client()
    client.send(GET)
    c.last("b").send(OK)
    assert status_of(client.received) == 200
    assert c.count("a") == 0


def test_a_request_in_flight_keeps_its_backend_and_route() -> None:
    # The listening door: twisted.web reads a whole body before the exchange starts.
    c = Cluster({"r": {"backends": ["a"], "max_request_body": 100}})
    client = c.client()
    client.send(b"POST /up HTTP/1.1\r\nHost: app.example\r\nContent-Length: 50\r\n\r\n")
    c.reconfigure({"r": {"backends": ["b"], "max_request_body": 10}})
    # The body is over the new limit, not over the one the request started with.
    client.send(b"x" * 50)
    assert c.last("a").received.endswith(b"x" * 50)
    assert backend_states(c)[("r", "a")]["draining"] is True
    c.last("a").send(OK)
    assert status_of(client.received) == 200
    assert ("r", "a") not in backend_states(c), "drained once its last request ended"
    assert c.count("b") == 0


def test_an_open_tunnel_keeps_its_backend_and_stays_counted_on_it() -> None:
    c = Cluster({"r": {"backends": ["a"]}})
    client = c.client()
    client.send(UPGRADE)
    c.last("a").send(SWITCH)
    assert client.received.startswith(b"HTTP/1.1 101 ")
    c.reconfigure({"r": {"backends": ["b"]}})
    client.send(b"ping")
    assert c.last("a").received.endswith(b"ping")
    c.last("a").send(b"pong")
    assert client.received.endswith(b"pong")
    snapshot = c.proxy.snapshot()
    assert [t["backend"] for t in snapshot["tunnels"]] == ["a"]
    assert backend_states(c)[("r", "a")] == {
        "route": "r",
        "backend": "a",
        "healthy": True,
        "active": 1,
        "failures": 0,
        "last_error": "",
        "draining": True,
        "in_rotation": True,
        "failures_in_a_row": 0,
    }
    # The next upgrade goes to the new backend.
    second = c.client(port=50001)
    second.send(UPGRADE)
    c.last("b").send(SWITCH)
    assert second.received.startswith(b"HTTP/1.1 101 ")
    assert backend_states(c)[("r", "b")]["active"] == 1
    c.last("a").transport.loseConnection()
    assert ("r", "a") not in backend_states(c)
    assert len(c.proxy.tunnels) == 1


def test_a_removed_backend_s_idle_pooled_connections_close_and_busy_ones_are_not_pooled() -> None:
    c = Cluster({"r": {"backends": ["a"]}})
    first = c.client()
    first.send(GET)
    idle = c.last("a")
    busy_client = c.client(port=50001)
    busy_client.send(GET)
    busy = c.last("a")
    idle.send(OK)
    assert busy is not idle and not idle.closed
    c.reconfigure({"r": {"backends": ["b"]}})
    assert idle.closed, "an idle connection to a removed backend closes at once"
    busy.send(OK)
    assert status_of(busy_client.received) == 200
    assert busy.closed, "not pooled for a backend nobody can use any more"


def test_a_backend_that_stays_keeps_its_health_and_load() -> None:
    c = Cluster({"r": {"backends": ["a", "b"]}})
    c.endpoints["a"].refuse = True
    client = c.client()
    client.send(GET)  # least-conn tries a first, which refuses; b answers
    c.last("b").send(OK)
    assert status_of(client.received) == 200
    tunnel_client = c.client(port=50001)
    tunnel_client.send(UPGRADE)
    c.last("b").send(SWITCH)
    before = backend_states(c)
    assert before[("r", "a")]["healthy"] is False and before[("r", "b")]["active"] == 1
    done = c.reconfigure({"r": {"backends": ["a", "b", "c"]}})
    assert (done.added, done.kept, done.removed) == (("r/c",), ("r/a", "r/b"), ())
    after = backend_states(c)
    assert after[("r", "a")] == before[("r", "a")], "still down, same failure count"
    assert after[("r", "b")]["active"] == 1, "the tunnel is still counted on b"
    # least-conn: a is down, b holds a tunnel, so c gets the next request.
    third = c.client(port=50002)
    third.send(GET)
    assert c.count("c") == 1 and c.endpoints["a"].attempts == 1


def test_a_route_that_goes_drains_and_a_new_route_serves() -> None:
    c = Cluster({"old": {"backends": ["a"], "path": "/old"}, "r": {"backends": ["b"]}})
    done = c.reconfigure({"new": {"backends": ["c"], "path": "/page"}, "r": {"backends": ["b"]}})
    assert (done.added, done.kept, done.removed) == (("new/c",), ("r/b",), ("old/a",))
    client = c.client()
    client.send(GET)
    c.last("c").send(OK)
    assert status_of(client.received) == 200
    gone = c.client(port=50001)
    gone.send(b"GET /old HTTP/1.1\r\nHost: app.example\r\n\r\n")
    c.last("b").send(OK)
    assert c.count("a") == 0, "/old now falls to route r"


def test_new_limits_apply_to_new_upgrades_and_tunnels_stay_counted() -> None:
    c = Cluster({"r": {"backends": ["a"]}}, settings=ProxySettings(max_tunnels=5))
    client = c.client()
    client.send(UPGRADE)
    c.last("a").send(SWITCH)
    c.reconfigure({"r": {"backends": ["a"]}}, settings=ProxySettings(max_tunnels=1))
    second = c.client(port=50001)
    second.send(UPGRADE)
    assert status_of(second.received) == 503
    assert "its limit of 1 tunnels" in second.received.decode()
    assert c.proxy.snapshot()["limits"]["max_tunnels"] == 1


def test_a_new_connection_gets_the_new_head_limit_and_an_open_one_keeps_its_own() -> None:
    c = Cluster({"r": {"backends": ["a"]}})
    kept = c.client()
    c.reconfigure({"r": {"backends": ["a"]}}, settings=ProxySettings(max_request_head=64))
    fresh = c.client(port=50001)
    long_get = b"GET /page HTTP/1.1\r\nHost: app.example\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n"
    fresh.send(long_get)
    assert status_of(fresh.received) == 431
    kept.send(long_get)
    c.last("a").send(OK)
    assert status_of(kept.received) == 200


def test_the_access_log_is_swapped_for_what_ends_after() -> None:
    c = Cluster({"r": {"backends": ["a"]}})
    old: list[dict[str, object]] = []
    new: list[dict[str, object]] = []
    proxy = c.proxy
    proxy.reconfigure(replace(proxy.configuration, access_log=AccessLog("text", old.append)))
    client = c.client()
    client.send(GET)
    proxy.reconfigure(replace(proxy.configuration, access_log=AccessLog("text", new.append)))
    c.last("a").send(OK)
    assert (len(old), len(new)) == (0, 1)


def test_the_snapshot_says_when_the_configuration_was_loaded_and_how_reloads_went() -> None:
    c = Cluster({"r": {"backends": ["a"]}})
    config = c.proxy.snapshot()["config"]
    assert config["reloads"] == {"ok": 0, "failed": 0} and config["last_reload_ok"] is True
    c.proxy.reconfigure_failed()
    assert c.proxy.snapshot()["config"]["last_reload_ok"] is False
    proxy = c.proxy
    proxy.reconfigure(replace(proxy.configuration, digest="abc123"))
    config = c.proxy.snapshot()["config"]
    assert config["reloads"] == {"ok": 1, "failed": 1}
    assert config["last_reload_ok"] is True and config["digest"] == "abc123"
    assert config["loaded"] >= config["loaded"] - 1


def test_a_configuration_refuses_a_validator_that_is_not_one() -> None:
    c = Cluster({"r": {"backends": ["a"]}})
    (route,) = c.routes({"r": {"backends": ["a"]}})
    with pytest.raises(TypeError, match="does not provide IUpgradeValidator"):
        Configuration((replace(route, validators=(object(),)),))  # type: ignore[arg-type]
