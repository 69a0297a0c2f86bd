"""Operating the proxy as people run it: twistd with a configuration file,
graceful shutdown on SIGTERM, metrics and the status page, the access log."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import pytest_twisted
from loopback import (
    HOST,
    Loopback,
    LoopbackBackendConnection,
    echo_app,
    eventually,
    free_port,
    upgrade_request,
)
from twistd_support import TWISTD, Running, check_get, http_get, run, start
from twisted.internet import reactor

pytestmark = pytest.mark.loopback


def proxy_args(port: int, *extra: str) -> list[str]:
    return [
        TWISTD,
        "-n",
        "--pidfile=",
        "upgradeproxy",
        "--listen",
        f"tcp:{port}:interface={HOST}",
        *extra,
    ]


# -- the configuration file ------------------------------------------------------------


def test_check_accepts_a_good_file_and_describes_it(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        'listen = ["tcp:8080"]\n\n[[route]]\nname = "chat"\nhosts = ["chat.example"]\n'
        'backends = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]\npolicy = "round-robin"\n'
    )
    result = run([TWISTD, "-n", "upgradeproxy", "--config", str(config), "--check"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "chat" in result.stdout
    assert "round-robin" in result.stdout


def test_check_names_the_file_the_line_and_the_key_of_each_mistake(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        "[timeouts]\nclient_head = -1\n\n"
        '[[route]]\nbackends = ["ftp://nowhere"]\npolicy = "fastest"\n'
    )
    result = run([TWISTD, "-n", "upgradeproxy", "--config", str(config), "--check"], tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = result.stderr
    assert f"{config}:2: timeouts.client_head:" in errors
    assert f"{config}:5: route[1].backends[0]:" in errors and "ftp://nowhere" in errors
    assert f"{config}:6: route[1].policy: unknown policy 'fastest'" in errors
    assert "Traceback" not in errors


def test_a_config_file_and_backend_flags_do_not_mix(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[[route]]\nbackends = ["http://127.0.0.1:9"]\n')
    result = run(
        [TWISTD, "-n", "upgradeproxy", "--config", str(config), "--backend", "http://a:1"],
        tmp_path,
    )
    assert result.returncode == 2
    assert "leave out --backend" in result.stderr


@pytest_twisted.ensureDeferred
async def test_a_config_file_routes_by_host_and_skips_a_dead_backend(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    app = loopback.backend(echo_app)
    other = loopback.backend(echo_app)
    dead = free_port()
    port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'listen = ["tcp:{port}:interface={HOST}"]\n\n'
        f'[[route]]\nname = "app"\nhosts = ["app.example"]\npolicy = "round-robin"\n'
        f'backends = ["http://{HOST}:{dead}", "http://{HOST}:{app.port_number}"]\n\n'
        f'[[route]]\nname = "other"\nbackends = ["http://{HOST}:{other.port_number}"]\n'
    )
    running = await start(
        processes,
        [TWISTD, "-n", "--pidfile=", "upgradeproxy", "--config", str(config)],
        tmp_path,
        port,
    )
    for _ in range(4):
        await check_get(loopback, port, running)  # Host: app.example
    assert len(app.connections) >= 1 and not other.connections
    assert re.search(rf"backend {HOST}:{dead} of route app is down", running.log)
    status, _ = await loopback.run(http_get, port, "/x")  # Host: x
    assert status == 200 and len(other.connections) == 1


# -- graceful shutdown ------------------------------------------------------------------


def slow_then_echo(conn: LoopbackBackendConnection, data: bytes) -> None:
    """Answers /slow after a second; everything else as echo_app does."""
    if (
        conn.head is not None
        and conn.head.startswith(b"GET /slow ")
        and "answered" not in conn.state
    ):
        conn.state["answered"] = True
        transport = conn.transport
        assert transport is not None
        reactor.callLater(
            1.0, transport.write, b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nfinished"
        )
        return
    echo_app(conn, data)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest_twisted.ensureDeferred
async def test_a_stop_signal_lets_a_request_finish_and_closes_a_tunnel_after_the_grace(
    loopback: Loopback, processes: list[Running], tmp_path: Path, stop: signal.Signals
) -> None:
    backend = loopback.backend(slow_then_echo)
    port = free_port()
    running = await start(
        processes,
        proxy_args(
            port, "--backend", f"http://{HOST}:{backend.port_number}", "--shutdown-grace", "3"
        ),
        tmp_path,
        port,
    )
    tunnel = loopback.client(port, timeout=15)
    tunnel.send_once(upgrade_request(b"proxmox-backup-protocol-v1"))
    assert (await loopback.run(tunnel.recv_head)).status == 101
    slow = loopback.client(port, timeout=15)
    slow.send_once(b"GET /slow HTTP/1.1\r\nHost: app.example\r\n\r\n")
    await eventually(lambda: len(backend.connections) == 2, what="the slow request to arrive")

    started = reactor.seconds()
    running.process.send_signal(stop)
    reply = await loopback.run(slow.read_response, timeout=10)
    assert (reply.status, reply.body) == (200, b"finished"), running.log
    tunnel.send_once(b"still open")
    assert await loopback.run(tunnel.recv_exactly, 10) == b"still open"
    assert await loopback.run(tunnel.recv_to_eof, timeout=10) == b""
    code = await loopback.run(running.process.wait, 15, timeout=20)
    elapsed = reactor.seconds() - started
    assert code in (0, -stop), running.log
    assert 2.5 < elapsed < 3 + 2 + 2, f"exited after {elapsed:.1f}s:\n{running.log}"
    log = running.log
    assert "shutting down: 1 requests in flight, 1 tunnels open" in log
    assert "1 of 1 requests finished, 0 of 1 tunnels ended by themselves" in log
    assert 'closed_by=proxy reason="the proxy is shutting down"' in log
    assert "Traceback" not in log


# -- metrics, the status page, the access log -------------------------------------------


async def start_with_metrics(
    loopback: Loopback, processes: list[Running], tmp_path: Path, *extra: str
) -> tuple[Running, int, int]:
    """A proxy to an echo backend with --metrics; it, its port and the metrics port."""
    backend = loopback.backend(echo_app)
    port, metrics = free_port(), free_port()
    running = await start(
        processes,
        proxy_args(
            port,
            "--backend", f"http://{HOST}:{backend.port_number}",
            "--metrics", f"tcp:{metrics}:interface={HOST}",
            *extra,
        ),
        tmp_path,
        port,
    )  # fmt: skip
    return running, port, metrics


@pytest_twisted.ensureDeferred
async def test_metrics_and_status_page_after_known_traffic(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    running, port, metrics = await start_with_metrics(
        loopback, processes, tmp_path,
        "--access-log", str(tmp_path / "access.jsonl"), "--access-log-format", "json",
    )  # fmt: skip
    for _ in range(3):
        await check_get(loopback, port, running)
    tunnel = loopback.client(port)
    tunnel.send_once(upgrade_request(b"proxmox-backup-protocol-v1"))
    assert (await loopback.run(tunnel.recv_head)).status == 101
    tunnel.send_once(b"12345")
    assert await loopback.run(tunnel.recv_exactly, 5) == b"12345"

    status, body = await loopback.run(http_get, metrics, "/metrics")
    text = body.decode()
    assert status == 200
    assert 'upgradeproxy_requests_total{route="default",status="200"} 3.0' in text
    assert 'upgradeproxy_tunnels_active{protocol="proxmox-backup-protocol-v1"} 1.0' in text
    assert re.search(r'upgradeproxy_tunnel_bytes_total\{direction="client_to_backend"\} 5\.0', text)
    assert 'upgradeproxy_backend_up{backend="127.0.0.1:' in text

    status, page = await loopback.run(http_get, metrics, "/")
    assert status == 200 and b"proxmox-backup-protocol-v1" in page

    lines = [json.loads(line) for line in (tmp_path / "access.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines if line["type"] == "request"] == [200, 200, 200]
    assert all(line["target"] == "/hello" and line["backend"].startswith(HOST) for line in lines)


@pytest_twisted.ensureDeferred
async def test_metrics_cover_every_worker(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    running, port, metrics = await start_with_metrics(
        loopback, processes, tmp_path, "--workers", "2"
    )
    for _ in range(30):
        await check_get(loopback, port, running)

    def served() -> dict[str, float]:
        _, body = http_get(metrics, "/metrics")
        found = re.findall(
            r'upgradeproxy_requests_total\{route="default",status="200",worker="(\d+)"\} (\S+)',
            body.decode(),
        )
        return {worker: float(count) for worker, count in found}

    deadline = reactor.seconds() + 10
    counts: dict[str, float] = {}
    while sum(counts.values()) != 30:
        assert reactor.seconds() < deadline, f"metrics never showed 30 requests: {counts}"
        counts = await loopback.run(served)
    assert len(counts) == 2, "both workers served and report"
