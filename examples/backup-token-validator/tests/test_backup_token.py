"""The example validator: in memory with upgradeproxy.testing, and inside a real twistd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "backup_token_validator",
    reason="the example is not installed (README's test command installs it)",
)

from backup_token_validator import BackupTokenValidator

from upgradeproxy.registry import BadValidator, build_chain, installed_validators
from upgradeproxy.testing import upgrade_outcome

SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
    b"Upgrade: proxmox-backup-protocol-v1\r\n\r\n"
)


def backup_request(*extra: bytes) -> bytes:
    lines = [
        b"GET /api2/json/backup HTTP/1.1",
        b"Host: pbs.example",
        b"Connection: upgrade",
        b"Upgrade: proxmox-backup-protocol-v1",
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_a_known_token_lets_the_backup_upgrade_through() -> None:
    outcome = upgrade_outcome(
        backup_request(b"X-Backup-Token: s3cret"), SWITCH, [BackupTokenValidator([b"s3cret"])]
    )
    assert outcome.status == 101


@pytest.mark.parametrize(
    "extra",
    [(), (b"X-Backup-Token: wrong",), (b"X-Backup-Token: s3cret", b"X-Backup-Token: s3cret")],
)
def test_a_missing_or_unknown_token_gets_401_and_never_reaches_the_backend(
    extra: tuple[bytes, ...],
) -> None:
    outcome = upgrade_outcome(backup_request(*extra), SWITCH, [BackupTokenValidator([b"s3cret"])])
    assert outcome.status == 401
    assert "a backup upgrade needs a valid X-Backup-Token header" in outcome.body
    assert not outcome.backend_contacted


def test_the_plugin_is_found_and_reads_its_token_file(tmp_path: Path) -> None:
    assert "backup-token" in installed_validators()
    tokens = tmp_path / "tokens"
    tokens.write_text("# backup clients\ns3cret\n\nother\n")
    (validator,) = build_chain([f"backup-token:{tokens}"])
    assert validator.tokens == [b"s3cret", b"other"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("backup-token", "backup-token needs a token file"),
        ("backup-token:/nonexistent/tokens", "cannot read the token file"),
    ],
)
def test_bad_arguments_say_what_to_write(spec: str, words: str) -> None:
    with pytest.raises(BadValidator, match=words):
        build_chain([spec])


# -- inside a real twistd, over loopback ------------------------------------------------


class EchoingBackupServer:
    """Answers every upgrade request with a correct 101, then echoes bytes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(SWITCH)
                while chunk := conn.recv(4096):
                    conn.sendall(chunk)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exchange(port: int, request: bytes, then: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            received += s.recv(4096)
        if then:
            s.sendall(then)
            while not received.endswith(then):
                received += s.recv(4096)
        else:
            while chunk := s.recv(4096):
                received += chunk
        return received


@pytest.fixture
def backend() -> Iterator[EchoingBackupServer]:
    server = EchoingBackupServer()
    yield server
    server.close()


def test_twistd_applies_the_validator_to_real_requests(
    tmp_path: Path, backend: EchoingBackupServer
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    port = _free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    log = (tmp_path / "twistd.log").open("wb")
    process = subprocess.Popen(
        [
            twistd, "-n", "--pidfile=", "upgradeproxy",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--backend", f"http://127.0.0.1:{backend.port}",
            "--validator", "rfc9110",
            "--validator", f"backup-token:{tokens}",
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "twistd.log").read_text()
                assert time.monotonic() < deadline, "twistd did not start listening"
                time.sleep(0.1)

        refused = _exchange(port, backup_request())
        assert refused.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
        assert b"a backup upgrade needs a valid X-Backup-Token header" in refused
        assert backend.connections == 0

        switched = _exchange(port, backup_request(b"X-Backup-Token: s3cret"), then=b"chunk-1")
        assert switched.startswith(b"HTTP/1.1 101 ")
        assert switched.endswith(b"\r\n\r\nchunk-1")
        assert backend.connections == 1
    finally:
        process.terminate()
        process.wait(10)
        log.close()
    assert (
        "a backup upgrade needs a valid X-Backup-Token header"
        in (tmp_path / "twistd.log").read_text()
    )
