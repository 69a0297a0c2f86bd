"""The PROXY protocol and per-client limits through ``twistd -n upgradeproxy``, with
one process and with workers (each worker reads the header on its own socket)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from loopback import HOST, Loopback, echo_app, eventually, free_port
from twistd_support import TWISTD, Running, check_get, start, stop_cleanly

pytestmark = pytest.mark.loopback

HEADER = b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\r\n"


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest_twisted.ensureDeferred
async def test_a_proxy_protocol_listener_beside_a_direct_one(
    loopback: Loopback, processes: list[Running], tmp_path: Path, workers: str
) -> None:
    backend = loopback.backend(echo_app)
    direct, behind = free_port(), free_port()
    access = tmp_path / "access.jsonl"
    running = await start(
        processes,
        [
            TWISTD, "-n", "--pidfile=", "upgradeproxy",
            "--backend", f"http://{HOST}:{backend.port_number}",
            "--listen", f"tcp:{direct}:interface={HOST}",
            "--proxy-protocol-listen", f"tcp:{behind}:interface={HOST}",
            "--trusted-proxy", f"{HOST}/32",
            "--max-client-connections", "10",
            "--workers", workers,
            "--access-log", str(access), "--access-log-format", "json",
        ],
        tmp_path,
        direct,
    )  # fmt: skip
    await running.wait_until_listening(behind)
    await check_get(loopback, direct, running)
    client = loopback.client(behind)
    client.send_once(HEADER + b"GET /hello HTTP/1.1\r\nHost: app.example\r\n\r\n")
    reply = await loopback.run(client.read_response)
    assert (reply.status, reply.body) == (200, b"you asked for /hello"), running.log
    assert b"X-Forwarded-For: 198.51.100.7\r\n" in backend.connections[-1].received

    def clients() -> list[str]:
        lines = access.read_text().splitlines() if access.exists() else []
        return [json.loads(line)["client"] for line in lines]

    await eventually(lambda: len(clients()) == 2, what="two access records")
    assert sorted(clients()) == sorted([HOST, "198.51.100.7"])
    assert "with the PROXY protocol on" in running.log
    await stop_cleanly(loopback, running)
