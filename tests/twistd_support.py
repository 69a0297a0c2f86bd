"""Shared test helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import (
    HOST,
    Loopback,
    sleep,
)
from twisted.internet import reactor

BIN = os.path.dirname(sys.executable)


TWISTD = os.path.join(BIN, "twistd")


TWIST = os.path.join(BIN, "twist")


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


class Running:
    """A proxy subprocess; its output goes to a log file, shown when a test fails."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.log_path = cwd / "proxy.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_until_listening(self, port: int, timeout: float = 20.0) -> None:
        """Poll until the proxy accepts connections, without blocking the reactor."""
        deadline = reactor.seconds() + timeout
        while True:
            assert self.process.poll() is None, f"proxy exited early:\n{self.log}"
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                return
            except OSError:
                pass
            assert reactor.seconds() < deadline, (
                f"proxy not listening after {timeout}s:\n{self.log}"
            )
            await sleep(0.05)

    def stop(self) -> None:
        """Terminate by PID and reap; kill if it does not go."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[Running]]:
    started: list[Running] = []
    try:
        yield started
    finally:
        for running in started:
            running.stop()


async def start(processes: list[Running], args: list[str], cwd: Path, port: int) -> Running:
    running = Running(args, cwd)
    processes.append(running)
    await running.wait_until_listening(port)
    return running


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """A blocking GET with Connection: close; the status and the body."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def check_get(loopback: Loopback, port: int, running: Running) -> None:
    client = loopback.client(port)
    client.send_once(b"GET /hello HTTP/1.1\r\nHost: app.example\r\n\r\n")
    reply = await loopback.run(client.read_response)
    assert (reply.status, reply.body) == (200, b"you asked for /hello"), running.log
    assert reply.get_all(b"via") == [b"1.1 upgradeproxy"]


async def stop_cleanly(loopback: Loopback, running: Running) -> None:
    """SIGTERM stops the proxy at once, without an error logged."""
    running.process.terminate()
    code = await loopback.run(running.process.wait, 10, timeout=15)
    # Twisted (twistd and twist alike) re-raises the signal it stopped on.
    assert code in (0, -signal.SIGTERM), running.log
    assert "Main loop terminated" in running.log
    assert "Traceback" not in running.log
    assert '"isError": 1' not in running.log
