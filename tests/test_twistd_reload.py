"""Reloading the configuration of a running twistd proxy: SIGHUP and ``upgradeproxy reload``."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from loopback import (
    HOST,
    BackendServer,
    Head,
    Loopback,
    LoopbackBackendConnection,
    echo_app,
    eventually,
    free_port,
    switching_response,
    upgrade_request,
)
from twistd_support import BIN, TWISTD, Running, http_get, start

pytestmark = pytest.mark.loopback

UPGRADEPROXY = os.path.join(BIN, "upgradeproxy")
ECHO = b"proxmox-backup-protocol-v1"


def write_config(path: Path, listen: list[int], metrics: int, *backends: BackendServer) -> None:
    listeners = ", ".join(f'"tcp:{port}:interface={HOST}"' for port in listen)
    urls = ", ".join(f'"http://{HOST}:{b.port_number}"' for b in backends)
    path.write_text(
        f'listen = [{listeners}]\nmetrics = "tcp:{metrics}:interface={HOST}"\n'
        "[timeouts]\nshutdown_grace = 1\n\n"
        f'[[route]]\nname = "app"\nbackends = [{urls}]\n'
    )


def twistd(config: Path, *extra: str) -> list[str]:
    pidfile = config.parent / "proxy.pid"
    return [TWISTD, "-n", f"--pidfile={pidfile}", "upgradeproxy", "--config", str(config), *extra]


async def reloaded(running: Running, count: int, *, failed: bool = False) -> None:
    """Wait until the log shows ``count`` reloads that ended (applied, or failed)."""
    pattern = r"reload of \S+ failed" if failed else r"reloaded \S+"
    await eventually(
        lambda: len(re.findall(pattern, running.log)) >= count,
        timeout=10,
        what=f"reload {count} in the log:\n{running.log}",
    )


async def metrics_text(loopback: Loopback, port: int) -> str:
    status, body = await loopback.run(http_get, port, "/metrics")
    assert status == 200
    return body.decode()


def config_hash(text: str) -> set[str]:
    return set(re.findall(r'upgradeproxy_config_info\{hash="(\w+)"', text))


@pytest_twisted.ensureDeferred
async def test_a_reload_moves_a_route_and_its_listener_and_the_open_tunnel_still_echoes(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    before, after = loopback.backend(echo_app), loopback.backend(echo_app)
    port, new_port, metrics = free_port(), free_port(), free_port()
    config = tmp_path / "proxy.toml"
    write_config(config, [port], metrics, before)
    running = await start(processes, twistd(config), tmp_path, port)
    tunnel = loopback.client(port)
    tunnel.send_once(upgrade_request(ECHO))
    assert (await loopback.run(tunnel.recv_head)).status == 101
    first_hash = config_hash(await metrics_text(loopback, metrics))

    write_config(config, [new_port], metrics, after)
    result = await loopback.run(
        lambda: subprocess.run(
            [UPGRADEPROXY, "reload", "--pidfile", str(tmp_path / "proxy.pid")],
            capture_output=True, text=True, timeout=20,
        ),
        timeout=25,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"sent SIGHUP to upgradeproxy (pid {running.process.pid})" in result.stdout
    await reloaded(running, 1)

    tunnel.send_once(b"still there")
    assert await loopback.run(tunnel.recv_exactly, 11) == b"still there"
    assert len(before.connections) == 1
    second = loopback.client(new_port)
    second.send_once(upgrade_request(ECHO))
    assert (await loopback.run(second.recv_head)).status == 101
    assert len(after.connections) == 1 and len(before.connections) == 1
    with pytest.raises(ConnectionRefusedError):
        loopback.client(port)

    text = await metrics_text(loopback, metrics)
    assert 'upgradeproxy_config_reloads_total{result="ok"} 1.0' in text
    assert "upgradeproxy_config_last_reload_success 1.0" in text
    assert config_hash(text) and config_hash(text) != first_hash
    old_backend = f'backend="{HOST}:{before.port_number}",route="app"'
    assert f"upgradeproxy_backend_draining{{{old_backend}}} 1.0" in text
    assert f"upgradeproxy_backend_active{{{old_backend}}} 1.0" in text
    log = running.log
    assert f"no longer listening on tcp:{port}:interface={HOST}; its open connections stay" in log
    assert "Traceback" not in log


@pytest_twisted.ensureDeferred
async def test_a_broken_file_on_reload_changes_nothing_and_the_metrics_say_so(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    backend = loopback.backend(echo_app)
    port, metrics = free_port(), free_port()
    config = tmp_path / "proxy.toml"
    write_config(config, [port], metrics, backend)
    good = config.read_text()
    running = await start(processes, twistd(config), tmp_path, port)
    first_hash = config_hash(await metrics_text(loopback, metrics))

    config.write_text(good + 'policy = "fastest"\n[limits]\nmax_tunnels = -1\n')
    running.process.send_signal(signal.SIGHUP)
    await reloaded(running, 1, failed=True)

    log = running.log
    assert f"{config}:9: route[1].policy: unknown policy 'fastest'" in log
    assert f"{config}:11: limits.max_tunnels:" in log
    assert f"reload of {config} failed (2 mistakes); nothing changed" in log
    status, body = await loopback.run(http_get, port, "/still")
    assert (status, body) == (200, b"you asked for /still")
    text = await metrics_text(loopback, metrics)
    assert 'upgradeproxy_config_reloads_total{result="failed"} 1.0' in text
    assert "upgradeproxy_config_last_reload_success 0.0" in text
    assert config_hash(text) == first_hash
    _, page = await loopback.run(http_get, metrics, "/")
    assert b"failed: the configuration above serves" in page

    # Fixed, it applies; the metrics say the last reload worked.
    config.write_text(good.replace('name = "app"', 'name = "app"\npolicy = "round-robin"'))
    running.process.send_signal(signal.SIGHUP)
    await reloaded(running, 1)
    text = await metrics_text(loopback, metrics)
    assert "upgradeproxy_config_last_reload_success 1.0" in text
    assert "Traceback" not in running.log


@pytest_twisted.ensureDeferred
async def test_without_a_config_file_sighup_says_there_is_nothing_to_reload(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    backend = loopback.backend(echo_app)
    port = free_port()
    args = [TWISTD, "-n", "--pidfile=", "upgradeproxy", "--listen", f"tcp:{port}:interface={HOST}"]
    running = await start(
        processes, [*args, "--backend", f"http://{HOST}:{backend.port_number}"], tmp_path, port
    )
    running.process.send_signal(signal.SIGHUP)
    await eventually(lambda: "there is nothing to reload" in running.log, what="the log line")
    status, _ = await loopback.run(http_get, port, "/")
    assert status == 200 and running.process.poll() is None


@pytest_twisted.ensureDeferred
async def test_with_workers_a_reload_reaches_every_worker(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    before, after = loopback.backend(echo_app), loopback.backend(echo_app)
    port, metrics = free_port(), free_port()
    config = tmp_path / "proxy.toml"
    write_config(config, [port], metrics, before)
    running = await start(processes, twistd(config, "--workers", "2"), tmp_path, port)
    write_config(config, [port], metrics, after)
    running.process.send_signal(signal.SIGHUP)
    await reloaded(running, 1)

    async def both_reloaded() -> bool:
        text = await metrics_text(loopback, metrics)
        found = re.findall(
            r'upgradeproxy_config_reloads_total\{result="ok",worker="(\d)"\} 1', text
        )
        return sorted(found) == ["0", "1"]

    for _ in range(100):
        if await both_reloaded():
            break
        await loopback.run(lambda: threading.Event().wait(0.1))
    else:
        raise AssertionError(f"not every worker reloaded:\n{running.log}")
    text = await metrics_text(loopback, metrics)
    assert len(config_hash(text)) == 1, "both workers run the same configuration"
    for _ in range(6):
        status, _ = await loopback.run(http_get, port, "/x")
        assert status == 200
    assert len(after.connections) == 6 and not before.connections
    assert "Traceback" not in running.log


def ok_or_echo(conn: LoopbackBackendConnection, data: bytes) -> None:
    """A script: ``200 ok`` to each plain request, kept alive; an upgrade switches and echoes."""
    assert conn.transport is not None
    if conn.state.get("tunnel"):
        conn.transport.write(data)
        return
    while (end := conn.received.find(b"\r\n\r\n", conn.state.get("answered", 0))) >= 0:
        head = bytes(conn.received[conn.state.get("answered", 0) : end + 4])
        conn.state["answered"] = end + 4
        if b"upgrade" in Head.parse(head).tokens(b"connection"):
            conn.state["tunnel"] = True
            conn.transport.write(switching_response(head) + bytes(conn.received[end + 4 :]))
            return
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def upgrade_and_echo(port: int) -> str | None:
    """An upgrade on a new connection and one echo through its tunnel; what went wrong, if any."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(upgrade_request(ECHO) + b"ping")
        data = b""
        while not data.endswith(b"ping") and len(data) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1.1 101 ") or not data.endswith(b"\r\n\r\nping"):
        return f"upgrade: {data[:200]!r}"
    return None


def load(port: int, stop: threading.Event, progress: list[int]) -> tuple[int, list[str]]:
    """GETs on keep-alive connections, on a new connection every tenth, and an upgrade with
    an echo every tenth, until ``stop``. ``progress[0]`` counts the exchanges so far."""
    done, errors = 0, []
    connections = [http.client.HTTPConnection(HOST, port, timeout=5) for _ in range(4)]
    while not stop.is_set():
        for index in range(len(connections)):
            if done % 10 == 5:
                try:
                    wrong = upgrade_and_echo(port)
                except OSError as e:
                    wrong = f"upgrade: {e!r}"
                if wrong is not None:
                    errors.append(wrong)
            if done % 10 == 0:
                connections[index].close()
                connections[index] = http.client.HTTPConnection(HOST, port, timeout=5)
            try:
                connections[index].request("GET", f"/{done}")
                response = connections[index].getresponse()
                body = response.read()
                if (response.status, body) != (200, b"ok"):
                    errors.append(f"{response.status} {body[:200]!r}")
            except (OSError, http.client.HTTPException) as e:
                errors.append(repr(e))
                connections[index] = http.client.HTTPConnection(HOST, port, timeout=5)
            done += 1
            progress[0] = done
    for connection in connections:
        connection.close()
    return done, errors


def more_than(progress: list[int], count: int) -> Callable[[], bool]:
    return lambda: progress[0] >= count


@pytest_twisted.ensureDeferred
async def test_twenty_reloads_under_load_lose_no_request(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    one = loopback.backend(ok_or_echo)
    two = loopback.backend(ok_or_echo)
    port, metrics = free_port(), free_port()
    config = tmp_path / "proxy.toml"
    write_config(config, [port], metrics, one)
    running = await start(processes, twistd(config), tmp_path, port)
    stop, progress = threading.Event(), [0]
    loading = loopback.run(load, port, stop, progress, timeout=60)
    # The backends alternate: every reload removes the backend in use and drains it.
    for count in range(1, 21):
        write_config(config, [port], metrics, *([two] if count % 2 else [one]))
        running.process.send_signal(signal.SIGHUP)
        await reloaded(running, count)
        await eventually(more_than(progress, progress[0] + 20), what="requests between reloads")
    stop.set()
    done, errors = await loading
    assert errors == [], f"{len(errors)} of {done} requests failed: {errors[:5]}\n{running.log}"
    assert done > 100 and one.connections and two.connections
    text = await metrics_text(loopback, metrics)
    assert 'upgradeproxy_config_reloads_total{result="ok"} 20.0' in text
    tunnels = r'upgradeproxy_tunnels_total\{protocol="proxmox-backup-protocol-v1"\} [1-9]'
    assert re.search(tunnels, text), "upgrades went through too"
    assert "Traceback" not in running.log
