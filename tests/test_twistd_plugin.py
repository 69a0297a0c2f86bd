"""The twistd/twist plugin, run as real subprocesses.

An import error inside the drop-in only shows as "Unknown command", and a
default editable install can hide the plugin from discovery: only running
the commands proves that ``twistd upgradeproxy`` works.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import pytest_twisted
from loopback import (
    HOST,
    Loopback,
    echo_app,
    free_port,
    sleep,
    upgrade_request,
)
from twistd_support import TWIST, TWISTD, Running, check_get, run, start, stop_cleanly
from twisted.internet import reactor

pytestmark = pytest.mark.loopback


def test_twistd_help_lists_the_options(tmp_path: Path) -> None:
    result = run([TWISTD, "-n", "upgradeproxy", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--backend" in result.stdout
    assert "--listen" in result.stdout
    assert "Unknown command" not in result.stdout + result.stderr


def test_twistd_without_a_backend_exits_2_with_one_line(tmp_path: Path) -> None:
    result = run([TWISTD, "-n", "--pidfile=", "upgradeproxy"], tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--backend" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_twistd_with_a_non_http_backend_url_exits_2(tmp_path: Path) -> None:
    result = run([TWISTD, "-n", "--pidfile=", "upgradeproxy", "--backend", "ftp://x"], tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "ftp://x" in lines[0] and "http://" in lines[0]


# -- a running proxy ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_twistd_proxies_a_get_and_an_upgrade(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    backend = loopback.backend(echo_app)
    port = free_port()
    running = await start(
        processes,
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "upgradeproxy",
            "--listen",
            f"tcp:{port}:interface={HOST}",
            "--backend",
            f"http://{HOST}:{backend.port_number}",
        ],
        tmp_path,
        port,
    )

    await check_get(loopback, port, running)

    client = loopback.client(port)
    client.send_once(upgrade_request(b"proxmox-backup-protocol-v1") + b"early ")
    head = await loopback.run(client.recv_head)
    assert head.status == 101, running.log
    assert head.get_all(b"upgrade") == [b"proxmox-backup-protocol-v1"]
    client.send_once(b"ping")
    assert await loopback.run(client.recv_exactly, 10) == b"early ping"
    client.close()

    await stop_cleanly(loopback, running)
    assert '127.0.0.1 "TUNNEL /socket proxmox-backup-protocol-v1"' in running.log
    assert not (tmp_path / "twistd.pid").exists()


@pytest_twisted.ensureDeferred
async def test_twist_proxies_a_get(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    backend = loopback.backend(echo_app)
    port = free_port()
    running = await start(
        processes,
        [
            TWIST,
            "upgradeproxy",
            "--listen",
            f"tcp:{port}:interface={HOST}",
            "--backend",
            f"http://{HOST}:{backend.port_number}",
        ],
        tmp_path,
        port,
    )
    await check_get(loopback, port, running)
    await stop_cleanly(loopback, running)


# -- several worker processes ----------------------------------------------------------


def _worker_pids(log: str, slot: int) -> list[int]:
    return [int(pid) for pid in re.findall(rf"started worker {slot} \(pid (\d+)\)", log)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_workers_share_the_load_and_a_killed_one_is_replaced(
    loopback: Loopback, processes: list[Running], tmp_path: Path
) -> None:
    backend = loopback.backend(echo_app)
    port = free_port()
    running = await start(
        processes,
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "upgradeproxy",
            "--workers",
            "2",
            "--listen",
            f"tcp:{port}:interface={HOST}",
            "--backend",
            f"http://{HOST}:{backend.port_number}",
        ],
        tmp_path,
        port,
    )
    for _ in range(40):
        await check_get(loopback, port, running)
    serving = set(re.findall(r"\[worker (\d+)\] 127\.0\.0\.1 \"GET /hello", running.log))
    assert len(serving) == 2, running.log

    (first,) = _worker_pids(running.log, 0)
    os.kill(first, signal.SIGKILL)
    deadline = reactor.seconds() + 15
    while len(_worker_pids(running.log, 0)) < 2:
        assert reactor.seconds() < deadline, f"worker 0 was not replaced:\n{running.log}"
        await sleep(0.1)
    assert "worker 0 ended" in running.log
    (_, replacement) = _worker_pids(running.log, 0)
    assert replacement != first and _alive(replacement)
    for _ in range(10):
        await check_get(loopback, port, running)

    (other,) = _worker_pids(running.log, 1)
    running.process.terminate()
    code = await loopback.run(running.process.wait, 15, timeout=20)
    assert code in (0, -signal.SIGTERM), running.log
    assert not _alive(replacement) and not _alive(other), "workers outlived their parent"


def test_workers_need_tcp_listen_endpoints(tmp_path: Path) -> None:
    result = run(
        [TWISTD, "-n", "--pidfile=", "upgradeproxy", "--workers", "2", "--listen",
         f"unix:{tmp_path}/s.sock", "--backend", "http://127.0.0.1:9"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--workers needs tcp: or tcp6: listen endpoints" in result.stderr


def test_workers_must_be_a_count(tmp_path: Path) -> None:
    result = run(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "upgradeproxy",
            "--workers",
            "many",
            "--backend",
            "http://a:1",
        ],
        tmp_path,
    )
    assert result.returncode == 2
    assert (
        "--workers must be a number of processes (1 or more) or \"auto\", not 'many'"
        in result.stderr
    )
