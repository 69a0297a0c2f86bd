"""Smoke test of the benchmark in ``bench/``: its C programs build and work together.

It compiles the backend and the load generator (skipped without a C
compiler), checks the backend's ``101`` against Python's own SHA-1 and
base64, and runs the load generator against the backend directly for a very
short round-trip run and handshake run. The proxy is not involved: this only
proves that ``python3 bench/run.py`` still has working tools.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from benchkit import build, procs  # noqa: E402 (bench/ is not a package on the path)

pytestmark = pytest.mark.loopback

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> build.Programs:
    if build.find_compiler() is None:
        pytest.skip("no C compiler (cc or gcc, or $CC): the benchmark's programs cannot be built")
    return build.build(tmp_path_factory.mktemp("bench-build"), force=True)


@pytest.fixture
def backend_port(programs: build.Programs, tmp_path: Path) -> Iterator[int]:
    backend = procs.Process(
        "backend",
        [str(programs.backend), "--port", "0"],
        log_path=tmp_path / "backend.log",
        pipe_stdout=True,
    )
    with backend:
        line = backend.read_line(timeout=10)
        assert line.startswith("listening ")
        yield int(line.split()[1])
        assert backend.exited() is None, backend.log_tail()
    assert backend.log_text() == ""


def loadgen(programs: build.Programs, mode: str, port: int, *options: str) -> dict[str, Any]:
    argv = [str(programs.loadgen), mode, "--port", str(port), *options]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_compiles_without_warnings(programs: build.Programs) -> None:
    if os.path.basename(programs.compiler) not in ("cc", "gcc"):
        pytest.skip(f"warnings are only checked with gcc, not {programs.compiler}")
    assert programs.warnings == []


def test_backend_101_is_valid(backend_port: int) -> None:
    key = base64.b64encode(os.urandom(16))
    request = (
        b"GET /echo HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
        b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\nearly bytes"
    )
    with socket.create_connection((procs.HOST, backend_port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while not data.endswith(b"early bytes"):
            chunk = s.recv(4096)
            assert chunk, f"closed after {data!r}"
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert fields[b"upgrade"] == b"websocket"
    assert b"upgrade" in fields[b"connection"].lower()
    assert fields[b"sec-websocket-accept"] == accept
    assert rest == b"early bytes"  # bytes behind the head belong to the tunnel: echoed


def test_round_trips(programs: build.Programs, backend_port: int) -> None:
    result = loadgen(
        programs, "rtt", backend_port, "--conns", "4", "--warmup", "0.1", "--duration", "0.5"
    )
    assert result["failures"] == 0, result["first_error"]
    assert result["open"] == 4
    assert result["round_trips"] > 100
    assert 0 < result["p50_us"] <= result["p99_us"] <= result["max_us"]


def test_handshakes(programs: build.Programs, backend_port: int) -> None:
    result = loadgen(
        programs,
        "handshake",
        backend_port,
        "--conns",
        "4",
        "--src-ips",
        "4",
        "--warmup",
        "0.1",
        "--duration",
        "0.5",
    )
    assert result["failures"] == 0, result["first_error"]
    assert result["handshakes"] > 10
    assert result["per_s"] > 0
