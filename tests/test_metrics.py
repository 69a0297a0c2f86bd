"""Metrics, the status page and their endpoint, fed with known snapshots (all in memory)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import GET, OK, Cluster
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.web.server import Site

from upgradeproxy.ops.metrics import (
    SnapshotCollector,
    SnapshotSource,
    SnapshotWriter,
    metrics_site,
    read_snapshots,
)
from upgradeproxy.ops.status import MAX_TUNNEL_ROWS, format_bytes, format_duration, render_status

NOW = 1_000_000.0


def make_snapshot(**changes: Any) -> dict[str, Any]:
    """A snapshot of a process up for 10 minutes at ``NOW``, with every section filled."""
    snapshot: dict[str, Any] = {
        "pid": 4242,
        "time": NOW,
        "started": NOW - 600,
        "connections": 3,
        "connections_total": 17,
        "requests": [
            {"route": "chat", "status": 101, "count": 5},
            {"route": "chat", "status": 200, "count": 9},
            {"route": "api", "status": 502, "count": 1},
        ],
        "refusals": [
            {"route": "chat", "validator": "origin", "stage": "request", "count": 2},
            {"route": "chat", "validator": "websocket", "stage": "response", "count": 1},
        ],
        "recent_refusals": [
            {
                "time": NOW - 3600,
                "route": "chat",
                "client": "10.0.0.9",
                "target": "/an-hour-ago",
                "validator": "origin",
                "stage": "request",
                "status": 403,
                "reason": "too old to show",
            },
            {
                "time": NOW - 61,
                "route": "chat",
                "client": "10.0.0.7",
                "target": "/chat?room=1",
                "validator": "origin",
                "stage": "request",
                "status": 403,
                "reason": "Origin https://evil.example is not allowed",
            },
        ],
        "limit_rejections": [
            {"limit": "max_connections", "count": 4},
            {"limit": "client_upgrade_rate", "count": 3},
        ],
        "tunnels": [
            {
                "protocol": "websocket",
                "client": "10.0.0.2",
                "backend": "127.0.0.1:9000",
                "route": "chat",
                "age": 5.0,
                "client_to_backend": 10,
                "backend_to_client": 20,
                "spliced": False,
                "client_protocol": "HTTP/2",
            },
            {
                "protocol": "websocket",
                "client": "10.0.0.1",
                "backend": "127.0.0.1:9000",
                "route": "chat",
                "age": 192.0,
                "client_to_backend": 1_258_291,
                "backend_to_client": 512,
                "spliced": True,
                "client_protocol": "HTTP/1.1",
            },
        ],
        "tunnels_total": [
            {"protocol": "websocket", "count": 7},
            {"protocol": "proxmox-backup-protocol-v1", "count": 1},
        ],
        "tunnel_bytes": {"client_to_backend": 5_000_000, "backend_to_client": 1234},
        "backends": [
            {
                "route": "chat",
                "backend": "127.0.0.1:9000",
                "healthy": True,
                "active": 2,
                "failures": 0,
                "last_error": "",
                "draining": False,
                "in_rotation": True,
                "failures_in_a_row": 0,
            },
            {
                "route": "chat",
                "backend": "127.0.0.1:9001",
                "healthy": False,
                "active": 0,
                "failures": 6,
                "last_error": "connection refused",
                "draining": False,
                "in_rotation": False,
                "failures_in_a_row": 6,
            },
            {
                "route": "old",
                "backend": "127.0.0.1:8000",
                "healthy": True,
                "active": 1,
                "failures": 0,
                "last_error": "",
                "draining": True,
                "in_rotation": True,
                "failures_in_a_row": 0,
            },
        ],
        "limits": {
            "max_connections": 1000,
            "max_tunnels": None,
            "client_connections": 50,
            "client_tunnels": None,
            "client_upgrade_rate": 2.5,
        },
        "client_entries": 12,
        "config": {
            "loaded": NOW - 60,
            "digest": "3f2a9c0d1e4b5a67",
            "reloads": {"ok": 2, "failed": 1},
            "last_reload_ok": False,
        },
    }
    snapshot.update(changes)
    return snapshot


def alone(snapshot: dict[str, Any]) -> SnapshotSource:
    return lambda: [(None, snapshot)]


# -- the collector -------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def exposition(source: SnapshotSource) -> str:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(source))
    return generate_latest(registry).decode("utf-8")


def samples_of(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(metric: str, /, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (metric, frozenset(labels.items()))


def test_collector_reports_every_metric_of_one_process() -> None:
    assert samples_of(exposition(alone(make_snapshot()))) == {
        key("upgradeproxy_requests_total", route="chat", status="101"): 5,
        key("upgradeproxy_requests_total", route="chat", status="200"): 9,
        key("upgradeproxy_requests_total", route="api", status="502"): 1,
        key(
            "upgradeproxy_upgrade_refusals_total", route="chat", validator="origin", stage="request"
        ): 2,
        key(
            "upgradeproxy_upgrade_refusals_total",
            route="chat",
            validator="websocket",
            stage="response",
        ): 1,
        key("upgradeproxy_limit_rejections_total", limit="max_connections"): 4,
        key("upgradeproxy_limit_rejections_total", limit="client_upgrade_rate"): 3,
        key("upgradeproxy_tunnels_active", protocol="websocket"): 2,
        key("upgradeproxy_tunnels_active", protocol="proxmox-backup-protocol-v1"): 0,
        key("upgradeproxy_tunnels_total", protocol="websocket"): 7,
        key("upgradeproxy_tunnels_total", protocol="proxmox-backup-protocol-v1"): 1,
        key("upgradeproxy_tunnel_bytes_total", direction="client_to_backend"): 5_000_000,
        key("upgradeproxy_tunnel_bytes_total", direction="backend_to_client"): 1234,
        key("upgradeproxy_backend_up", route="chat", backend="127.0.0.1:9000"): 1,
        key("upgradeproxy_backend_up", route="chat", backend="127.0.0.1:9001"): 0,
        key("upgradeproxy_backend_active", route="chat", backend="127.0.0.1:9000"): 2,
        key("upgradeproxy_backend_active", route="chat", backend="127.0.0.1:9001"): 0,
        key("upgradeproxy_backend_failures_total", route="chat", backend="127.0.0.1:9000"): 0,
        key("upgradeproxy_backend_failures_total", route="chat", backend="127.0.0.1:9001"): 6,
        key("upgradeproxy_backend_up", route="old", backend="127.0.0.1:8000"): 1,
        key("upgradeproxy_backend_active", route="old", backend="127.0.0.1:8000"): 1,
        key("upgradeproxy_backend_failures_total", route="old", backend="127.0.0.1:8000"): 0,
        key("upgradeproxy_backend_draining", route="chat", backend="127.0.0.1:9000"): 0,
        key("upgradeproxy_backend_draining", route="chat", backend="127.0.0.1:9001"): 0,
        key("upgradeproxy_backend_draining", route="old", backend="127.0.0.1:8000"): 1,
        key("upgradeproxy_config_reloads_total", result="ok"): 2,
        key("upgradeproxy_config_reloads_total", result="failed"): 1,
        key("upgradeproxy_config_last_reload_success"): 0,
        key("upgradeproxy_config_loaded_timestamp_seconds"): NOW - 60,
        key("upgradeproxy_config_info", hash="3f2a9c0d1e4b5a67"): 1,
        key("upgradeproxy_client_connections_open"): 3,
        key("upgradeproxy_client_connections_total"): 17,
        key("upgradeproxy_limit", name="max_connections"): 1000,
        key("upgradeproxy_limit", name="client_connections"): 50,
        key("upgradeproxy_limit", name="client_upgrade_rate"): 2.5,
        key("upgradeproxy_client_limit_entries"): 12,
        key("upgradeproxy_started_time_seconds"): NOW - 600,
    }


def test_collector_declares_counters_and_gauges() -> None:
    types = {
        family.name: family.type
        for family in text_string_to_metric_families(exposition(alone(make_snapshot())))
    }
    assert types == {
        "upgradeproxy_requests": "counter",
        "upgradeproxy_upgrade_refusals": "counter",
        "upgradeproxy_limit_rejections": "counter",
        "upgradeproxy_tunnels_active": "gauge",
        "upgradeproxy_tunnels": "counter",
        "upgradeproxy_tunnel_bytes": "counter",
        "upgradeproxy_backend_up": "gauge",
        "upgradeproxy_backend_active": "gauge",
        "upgradeproxy_backend_failures": "counter",
        "upgradeproxy_client_connections_open": "gauge",
        "upgradeproxy_client_connections": "counter",
        "upgradeproxy_limit": "gauge",
        "upgradeproxy_client_limit_entries": "gauge",
        "upgradeproxy_started_time_seconds": "gauge",
        "upgradeproxy_backend_draining": "gauge",
        "upgradeproxy_config_reloads": "counter",
        "upgradeproxy_config_last_reload_success": "gauge",
        "upgradeproxy_config_loaded_timestamp_seconds": "gauge",
        "upgradeproxy_config_info": "gauge",
    }


def test_collector_labels_every_series_with_its_worker() -> None:
    first = make_snapshot(connections=3, limits={"max_connections": None, "max_tunnels": 50})
    second = make_snapshot(connections=8, started=NOW - 5)
    samples = samples_of(exposition(lambda: [("0", first), ("1", second)]))

    assert all(dict(labels).get("worker") in {"0", "1"} for _, labels in samples)
    assert samples[key("upgradeproxy_client_connections_open", worker="0")] == 3
    assert samples[key("upgradeproxy_client_connections_open", worker="1")] == 8
    assert samples[key("upgradeproxy_started_time_seconds", worker="1")] == NOW - 5
    assert samples[key("upgradeproxy_requests_total", worker="1", route="api", status="502")] == 1
    limits = {
        labels: value for (name, labels), value in samples.items() if name == "upgradeproxy_limit"
    }
    assert limits == {
        frozenset({("worker", "0"), ("name", "max_tunnels")}): 50,
        frozenset({("worker", "1"), ("name", "max_connections")}): 1000,
        frozenset({("worker", "1"), ("name", "client_connections")}): 50,
        frozenset({("worker", "1"), ("name", "client_upgrade_rate")}): 2.5,
    }


def test_collector_with_no_worker_reporting_has_no_series() -> None:
    assert samples_of(exposition(lambda: [])) == {}


def test_collector_reads_the_source_at_each_scrape() -> None:
    snapshot = make_snapshot()
    source = alone(snapshot)
    exposition(source)
    snapshot["connections_total"] = 18
    assert samples_of(exposition(source))[key("upgradeproxy_client_connections_total")] == 18


# -- worker files --------------------------------------------------------------


def test_writer_and_reader_round_trip(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(NOW)
    writes = iter(range(1, 100))
    writer = SnapshotWriter(
        lambda: make_snapshot(time=clock.seconds(), connections_total=next(writes)),
        str(tmp_path),
        "3",
        clock,
    )
    writer.start()
    try:
        [(worker, snapshot)] = read_snapshots(str(tmp_path), clock.seconds())
        assert worker == "3"
        assert snapshot == make_snapshot(connections_total=1)

        clock.advance(1.0)
        [(_, snapshot)] = read_snapshots(str(tmp_path), clock.seconds())
        assert snapshot == make_snapshot(time=NOW + 1, connections_total=2)
    finally:
        writer.stop()


def test_writer_replaces_the_file_instead_of_rewriting_it(tmp_path: Path) -> None:
    clock = Clock()
    writer = SnapshotWriter(lambda: make_snapshot(time=clock.seconds()), str(tmp_path), "0", clock)
    writer.start()
    try:
        first = os.stat(writer.path).st_ino
        clock.advance(1.0)
        # A new inode: readers holding the old file read it whole, never a mix.
        assert os.stat(writer.path).st_ino != first
        assert os.listdir(tmp_path) == ["worker-0.json"]
    finally:
        writer.stop()


def test_writer_stop_removes_the_file_and_writes_no_more(tmp_path: Path) -> None:
    clock = Clock()
    writer = SnapshotWriter(lambda: make_snapshot(time=clock.seconds()), str(tmp_path), "0", clock)
    writer.start()
    writer.stop()
    clock.advance(10.0)
    assert os.listdir(tmp_path) == []
    writer.stop()  # a second stop is harmless


def test_writer_keeps_the_last_good_file_and_logs_once_while_the_source_fails(
    tmp_path: Path,
) -> None:
    clock = Clock()
    failing = False

    def source() -> dict[str, Any]:
        if failing:
            raise RuntimeError("state unavailable")
        return make_snapshot(time=clock.seconds())

    writer = SnapshotWriter(source, str(tmp_path), "0", clock)
    writer.start()
    try:
        failing = True
        with capturedLogs() as events:
            clock.advance(1.0)
            clock.advance(1.0)
        assert [event["log_level"] for event in events] == [LogLevel.critical]
        assert "Cannot write the metrics snapshot" in events[0]["log_format"]
        assert os.listdir(tmp_path) == ["worker-0.json"]
        [(_, snapshot)] = read_snapshots(str(tmp_path), clock.seconds())
        assert snapshot["time"] == 0.0

        failing = False
        clock.advance(1.0)
        [(_, snapshot)] = read_snapshots(str(tmp_path), clock.seconds())
        assert snapshot["time"] == 3.0
    finally:
        writer.stop()


@pytest.mark.parametrize("worker", ["", "../escape", "a/b", "x.json"])
def test_writer_refuses_a_worker_name_that_is_not_a_plain_file_name(
    tmp_path: Path, worker: str
) -> None:
    with pytest.raises(ValueError, match="use only letters, digits"):
        SnapshotWriter(make_snapshot, str(tmp_path), worker, Clock())


def write(directory: Path, name: str, content: bytes | dict[str, Any]) -> None:
    data = json.dumps(content).encode() if isinstance(content, dict) else content
    (directory / name).write_bytes(data)


def test_reader_ignores_files_that_are_not_whole_snapshots(tmp_path: Path) -> None:
    good = make_snapshot()
    write(tmp_path, "worker-0.json", good)
    write(tmp_path, "worker-1.json", json.dumps(good).encode()[:100])
    write(tmp_path, "worker-2.json", b"\xff\xfe not utf-8")
    write(tmp_path, "worker-3.json", b"[1, 2]")
    write(tmp_path, "worker-4.json", {"time": NOW})
    write(tmp_path, "worker-5.json", make_snapshot(time="now"))
    write(tmp_path, ".worker-6.json.x1y2.tmp", good)
    write(tmp_path, "notes.txt", b"not a worker")
    (tmp_path / "worker-7.json").mkdir()

    assert read_snapshots(str(tmp_path), NOW) == [("0", good)]


def test_reader_ignores_the_files_of_dead_workers(tmp_path: Path) -> None:
    write(tmp_path, "worker-0.json", make_snapshot(time=NOW - 5.0))
    write(tmp_path, "worker-1.json", make_snapshot(time=NOW - 5.5))

    assert [worker for worker, _ in read_snapshots(str(tmp_path), NOW)] == ["0"]
    assert [worker for worker, _ in read_snapshots(str(tmp_path), NOW, max_age=6.0)] == ["0", "1"]


def test_reader_orders_numbered_workers_by_number(tmp_path: Path) -> None:
    for worker in ["10", "2", "1", "b", "a"]:
        write(tmp_path, f"worker-{worker}.json", make_snapshot())

    assert [worker for worker, _ in read_snapshots(str(tmp_path), NOW)] == [
        "1",
        "2",
        "10",
        "a",
        "b",
    ]


# -- the status page -----------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (12.9, "12s"),
        (60, "1m 0s"),
        (192, "3m 12s"),
        (2 * 3600 + 5 * 60 + 7, "2h 5m"),
        (4 * 86400 + 3600 + 59, "4d 1h"),
        (-3, "0s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1_258_291, "1.2 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5 * 1024**4, "5.0 TiB"),
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


def page(snapshots: Sequence[tuple[str | None, dict[str, Any]]], now: float = NOW) -> str:
    return render_status(snapshots, now).decode("utf-8")


def test_status_page_summary() -> None:
    text = page([(None, make_snapshot())])
    assert text.startswith("<!DOCTYPE html>")
    assert '<meta http-equiv="refresh" content="5">' in text
    assert "<b>3</b> client connections" in text
    assert "<b>2</b> live tunnels" in text
    assert "<b>15</b> requests served" in text
    assert "up <b>10m 0s</b>" in text
    assert "worker" not in text


def test_status_page_lists_live_tunnels_oldest_first() -> None:
    text = page([(None, make_snapshot())])
    assert (
        "<tr><td>websocket</td><td>HTTP/1.1</td><td>10.0.0.1</td><td>chat</td><td>127.0.0.1:9000</td>"
        "<td>3m 12s</td><td>1.2 MiB</td><td>512 B</td><td>yes</td></tr>"
        "<tr><td>websocket</td><td>HTTP/2</td><td>10.0.0.2</td><td>chat</td><td>127.0.0.1:9000</td>"
        "<td>5s</td><td>10 B</td><td>20 B</td><td>no</td></tr>"
    ) in text


def test_status_page_ages_tunnels_from_an_older_snapshot() -> None:
    assert "<td>3m 22s</td>" in page([(None, make_snapshot())], now=NOW + 10)


def test_status_page_caps_the_tunnel_list() -> None:
    tunnel = make_snapshot()["tunnels"][0]
    tunnels = [dict(tunnel, age=float(age)) for age in range(MAX_TUNNEL_ROWS + 2)]
    text = page([(None, make_snapshot(tunnels=tunnels))])
    assert text.count("<td>websocket</td>") == MAX_TUNNEL_ROWS
    assert "and 2 more" in text
    assert f"<td>{format_duration(MAX_TUNNEL_ROWS + 1)}</td>" in text
    assert "<td>0s</td>" not in text


def test_status_page_shows_backend_health() -> None:
    text = page([(None, make_snapshot())])
    assert (
        "<tr><td>chat</td><td>127.0.0.1:9000</td><td>healthy</td><td>2</td><td>0</td><td></td></tr>"
    ) in text
    assert (
        '<tr class="down"><td>chat</td><td>127.0.0.1:9001</td><td>down</td><td>0</td><td>6</td>'
        "<td>connection refused</td></tr>"
    ) in text
    assert (
        "<tr><td>old</td><td>127.0.0.1:8000</td><td>healthy, draining (removed by a reload)</td>"
        "<td>1</td><td>0</td><td></td></tr>"
    ) in text


def test_a_route_s_only_backend_that_fails_is_shown_failing_not_healthy() -> None:
    # A route's only backend stays in use while it fails: the status and the
    # metrics must still say that it fails, and since when.
    c = Cluster()
    c.endpoints["a"].refuse = True
    for port in (1, 2):
        c.client(port=port).send(GET)
    snapshot = c.proxy.snapshot()
    text = page([(None, snapshot)])
    assert (
        '<tr class="down"><td>default</td><td>a</td>'
        "<td>failing (2 failed connections in a row), still in use</td><td>0</td><td>2</td>"
        "<td>Connection was refused by other side: scripted refusal.</td></tr>"
    ) in text
    metrics = samples_of(exposition(alone(snapshot)))
    assert metrics[key("upgradeproxy_backend_up", route="default", backend="a")] == 0
    c.endpoints["a"].refuse = False
    client = c.client(port=3)
    client.send(GET)
    c.last("a").send(OK)
    snapshot = c.proxy.snapshot()
    text = page([(None, snapshot)])
    assert "<tr><td>default</td><td>a</td><td>healthy</td><td>0</td><td>2</td><td></td></tr>" in (
        text
    )
    metrics = samples_of(exposition(alone(snapshot)))
    assert metrics[key("upgradeproxy_backend_up", route="default", backend="a")] == 1


def test_status_page_shows_the_configuration_and_its_reloads() -> None:
    text = page([(None, make_snapshot())])
    assert (
        '<tr class="down"><td>13:45:40 UTC</td><td>3f2a9c0d1e4b5a67</td><td>2</td><td>1</td>'
        "<td>failed: the configuration above serves</td></tr>"
    ) in text
    config = dict(make_snapshot()["config"], last_reload_ok=True)
    assert "<td>ok</td></tr>" in page([(None, make_snapshot(config=config))])


def test_status_page_shows_what_the_limits_turned_away_summed_over_workers() -> None:
    text = page([("0", make_snapshot()), ("1", make_snapshot(client_entries=3))])
    assert "<tr><td>client_upgrade_rate</td><td>6</td></tr>" in text
    assert "<tr><td>max_connections</td><td>8</td></tr>" in text
    assert "15 client addresses tracked by per-client limits" in text
    quiet = page([(None, make_snapshot(limit_rejections=[]))])
    assert "Nothing turned away by a limit." in quiet


def test_status_page_lists_refusals_of_the_last_15_minutes() -> None:
    text = page([(None, make_snapshot())])
    assert (
        "<tr><td>13:45:39 UTC</td><td>chat</td><td>10.0.0.7</td><td>/chat?room=1</td>"
        "<td>origin</td><td>403</td><td>Origin https://evil.example is not allowed</td></tr>"
    ) in text
    assert "/an-hour-ago" not in text


def test_status_page_escapes_every_string_from_a_snapshot() -> None:
    hostile = "<script>alert('x')</script>"
    snapshot = make_snapshot()
    refusal = dict(snapshot["recent_refusals"][1], target=f"/{hostile}", reason=f'"{hostile}" & co')
    tunnel = dict(snapshot["tunnels"][0], client=hostile, protocol=hostile)
    backend = dict(snapshot["backends"][1], last_error=hostile)
    config = dict(snapshot["config"], digest=hostile)
    text = page(
        [
            (
                hostile,
                make_snapshot(
                    recent_refusals=[refusal], tunnels=[tunnel], backends=[backend], config=config
                ),
            )
        ]
    )
    assert "<script" not in text
    # Four worker cells, a tunnel's client and protocol, an error, a target, a reason
    # and the configuration's hash.
    assert text.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") == 10
    assert "&quot;&lt;script&gt;" in text
    assert "&amp; co" in text


def test_status_page_shows_each_row_s_worker() -> None:
    text = page([("0", make_snapshot()), ("1", make_snapshot(connections=4, tunnels=[]))])
    assert "<b>7</b> client connections" in text
    assert "<b>2</b> workers" in text
    assert "<th>worker</th><th>protocol</th>" in text
    assert "<tr><td>0</td><td>websocket</td><td>HTTP/1.1</td><td>10.0.0.1</td>" in text
    assert "<tr><td>1</td><td>chat</td><td>127.0.0.1:9000</td><td>healthy</td>" in text
    assert "<tr><td>1</td><td>13:45:39 UTC</td>" in text


def test_status_page_with_no_worker_reporting() -> None:
    text = page([])
    assert "No process is reporting" in text
    assert "No live tunnels." in text
    assert "No backends." in text
    assert "No upgrade refused in the last 15 minutes." in text


# -- the endpoint --------------------------------------------------------------


def get(site: Site, path: str, method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes]:
    """Send one request through the site's real HTTP channel; the status, fields and body."""
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        f"{method} {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n".encode()
    )
    channel.connectionLost(Failure(ConnectionDone()))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    fields = {name.lower(): value for name, value in (line.split(b": ", 1) for line in lines)}
    expected_length = int(fields[b"content-length"])
    assert len(body) == (0 if method == "HEAD" else expected_length)
    return int(status_line.split()[1]), fields, body


@pytest.fixture
def snapshot() -> dict[str, Any]:
    return make_snapshot()


@pytest.fixture
def site(snapshot: dict[str, Any]) -> Site:
    clock = Clock()
    clock.advance(NOW)
    return metrics_site(alone(snapshot), clock=clock)


def test_site_serves_metrics(site: Site) -> None:
    status, fields, body = get(site, "/metrics")
    assert status == 200
    assert fields[b"content-type"] == CONTENT_TYPE_LATEST.encode()
    assert samples_of(body.decode())[key("upgradeproxy_client_connections_open")] == 3


def test_site_serves_the_status_page(site: Site) -> None:
    status, fields, body = get(site, "/")
    assert status == 200
    assert fields[b"content-type"] == b"text/html; charset=utf-8"
    assert fields[b"content-security-policy"] == b"default-src 'none'; style-src 'unsafe-inline'"
    assert b"<b>3</b> client connections" in body
    assert b"up <b>10m 0s</b>" in body


def test_site_serves_the_snapshots_as_json(site: Site, snapshot: dict[str, Any]) -> None:
    status, fields, body = get(site, "/status.json")
    assert status == 200
    assert fields[b"content-type"] == b"application/json"
    assert json.loads(body) == {
        "time": NOW,
        "workers": [{"worker": None, "snapshot": copy.deepcopy(snapshot)}],
    }


def test_site_answers_head_with_the_length_of_get(site: Site) -> None:
    _, get_fields, _ = get(site, "/")
    with capturedLogs() as events:
        status, fields, body = get(site, "/", method="HEAD")
    assert (status, body) == (200, b"")
    assert events == []  # twisted.web logs a warning when a resource answers HEAD with a body
    assert fields[b"content-length"] == get_fields[b"content-length"]


@pytest.mark.parametrize("path", ["/nothing", "/metrics/", "/index.html", "/status.json/x"])
def test_site_has_nothing_else(site: Site, path: str) -> None:
    status, fields, body = get(site, path)
    assert status == 404
    assert fields[b"content-type"] == b"text/plain; charset=utf-8"
    assert body == b"Not found: this endpoint serves /, /metrics and /status.json.\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_site_allows_only_get_and_head(site: Site, method: str) -> None:
    status, fields, body = get(site, "/metrics", method=method)
    assert status == 405
    assert fields[b"allow"] == b"GET, HEAD"
    assert body == f"{method} is not allowed here: use GET.\n".encode()


def test_site_does_not_name_the_server_software(site: Site) -> None:
    for path in ("/", "/metrics", "/nothing"):
        _, fields, _ = get(site, path)
        assert b"server" not in fields


def test_site_hides_the_details_of_a_failure() -> None:
    def broken() -> list[tuple[str | None, dict[str, Any]]]:
        raise RuntimeError("secret internals")

    site = metrics_site(broken, clock=Clock())
    with capturedLogs() as events:
        status, _, body = get(site, "/metrics")
    assert status == 500
    assert b"secret internals" not in body
    assert any(event.get("log_failure") for event in events)


def test_site_logs_neither_connections_nor_requests(site: Site) -> None:
    with capturedLogs() as events:
        site.doStart()
        try:
            get(site, "/metrics")
        finally:
            site.doStop()
    assert events == []
