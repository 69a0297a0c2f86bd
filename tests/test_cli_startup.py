"""A start that cannot succeed fails at once: exit status 1 and one line that says why.

Run as people run the proxy (twistd, twist, --workers), as subprocesses on
127.0.0.1; the worker pool's decision is also tested in memory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from upgradeproxy.cli.config import ProxyConfig, RouteConfig, dump_config
from upgradeproxy.cli.workers import CANNOT_START, RESTART_DELAY, WorkerPool

pytestmark = pytest.mark.loopback

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
TWIST = os.path.join(BIN, "twist")
BACKEND = ["--backend", "http://127.0.0.1:9"]


@pytest.fixture
def taken() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", [[TWISTD, "-n", "upgradeproxy"], [TWIST, "upgradeproxy"]])
def test_a_listen_port_in_use_ends_the_start(
    command: list[str], taken: int, tmp_path: Path
) -> None:
    listen = f"tcp:{taken}:interface=127.0.0.1"
    line = one_line(run([*command, "--listen", listen, *BACKEND], tmp_path))
    assert line == f"upgradeproxy: cannot listen on {listen}: Address already in use"
    assert list(tmp_path.iterdir()) == []  # no twistd.pid left behind


def test_a_metrics_port_in_use_ends_the_start(taken: int, tmp_path: Path) -> None:
    metrics = f"tcp:{taken}:interface=127.0.0.1"
    args = [TWISTD, "-n", "upgradeproxy", "--listen", "tcp:0:interface=127.0.0.1"]
    line = one_line(run([*args, "--metrics", metrics, *BACKEND], tmp_path))
    assert line == f"upgradeproxy: cannot listen on {metrics}: Address already in use"


def test_a_port_out_of_range_ends_the_start(tmp_path: Path) -> None:
    line = one_line(
        run([TWISTD, "-n", "upgradeproxy", "--listen", "tcp:99999", *BACKEND], tmp_path)
    )
    assert line.startswith("upgradeproxy: cannot listen on tcp:99999: "), line
    assert "0-65535" in line


def test_workers_whose_port_is_in_use_end_the_start(taken: int, tmp_path: Path) -> None:
    listen = f"tcp:{taken}:interface=127.0.0.1"
    args = [TWISTD, "-n", "--pidfile=", "upgradeproxy", "--workers", "2", "--listen", listen]
    line = one_line(run([*args, *BACKEND], tmp_path))
    assert line == f"upgradeproxy: cannot listen on {listen}: Address already in use"


def test_a_worker_that_cannot_serve_exits_with_its_reason(tmp_path: Path) -> None:
    config = dump_config(ProxyConfig(routes=(RouteConfig("r", (), "/", ("http://127.0.0.1:9",)),)))
    unused_fd = 987
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "upgradeproxy.cli.workers",
            "--fd",
            f"{unused_fd}:2",
            "--config",
            config,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == CANNOT_START, result
    # Not splitlines(): the record separator that starts each event is a line break to it.
    events = [json.loads(line.lstrip("\x1e")) for line in result.stdout.split("\n") if line]
    (why,) = [event["why"] for event in events if event["log_level"]["name"] == "critical"]
    assert why == f"cannot listen on the socket passed as fd {unused_fd}: Bad file descriptor"


def test_a_failure_once_running_exits_with_status_1(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from twisted.internet import reactor\n"
        "from twisted.logger import globalLogBeginner, textFileLogObserver\n"
        "from upgradeproxy.cli.service import fail_while_running\n"
        "globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])\n"
        "reactor.callWhenRunning(fail_while_running, 'cannot listen on x: no')\n"
        "reactor.run()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert result.returncode == 1, result
    assert "cannot listen on x: no; stopping" in result.stdout


def test_the_start_up_log_shows_validator_arguments_and_settings(tmp_path: Path) -> None:
    log_path = tmp_path / "proxy.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "upgradeproxy", "--listen", "tcp:0:interface=127.0.0.1",
             *BACKEND, "--validator", "rfc9110:lenient-connection", "--tunnel-lifetime", "60"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "Main loop" not in (text := log_path.read_text()) and "reactor class" not in text:
            assert process.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(10)
    assert (
        "validators rfc9110:lenient-connection; connect timeout 10 s; response timeout 60 s; "
        "tunnel idle timeout off; tunnel lifetime 60 s; max body none"
    ) in text
    assert "access log (text) to the main log; client head timeout 60 s" in text
    assert text.count("listening on tcp:0:interface=127.0.0.1; 1 route, 1 backend") == 1
    assert "proxying" not in text, "the start is described once"


# -- the pool's decision, in memory --------------------------------------------------------


class FakeProcesses(Clock):
    """Records the workers started instead of starting them."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[Any] = []

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> Any:
        self.started.append(protocol)
        return type("Process", (), {"pid": 4000 + len(self.started)})()


def test_a_worker_that_cannot_start_ends_the_pool_instead_of_being_restarted() -> None:
    reactor = FakeProcesses()
    fatal: list[str] = []
    pool = WorkerPool(reactor, [[]], lambda: "{}", cannot_start=fatal.append)  # type: ignore[arg-type]
    pool.startService()
    (worker,) = reactor.started
    line = json.dumps(
        {"log_level": {"__class_uuid__": "02E59486-F24D-46AD-8224-3ACDF2A5732A",
                       "name": "critical"},
         "log_format": "{why}", "why": "cannot listen: no", "log_namespace": "x"}
    )  # fmt: skip
    worker.outReceived(b"\x1e" + line.encode() + b"\n")
    worker.processEnded(Failure(ProcessTerminated(exitCode=CANNOT_START)))
    reactor.advance(RESTART_DELAY)
    assert fatal == ["worker 0 cannot start: cannot listen: no"]
    assert len(reactor.started) == 1


def test_a_worker_that_dies_is_restarted() -> None:
    reactor = FakeProcesses()
    fatal: list[str] = []
    pool = WorkerPool(reactor, [[]], lambda: "{}", cannot_start=fatal.append)  # type: ignore[arg-type]
    pool.startService()
    reactor.started[0].processEnded(Failure(ProcessTerminated(exitCode=1)))
    reactor.advance(RESTART_DELAY)
    assert len(reactor.started) == 2 and fatal == []
    reactor.started[1].processEnded(Failure(ProcessDone(0)))
    reactor.advance(RESTART_DELAY)
    assert len(reactor.started) == 3
