"""``upgradeproxy reload``: which process it signals, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from upgradeproxy.__main__ import main


def reload(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["reload", *args])
    out, err = capsys.readouterr()
    return status, out, err


def _wait_for_exec(process: subprocess.Popen[bytes], program: bytes) -> None:
    """Wait until ``process`` runs ``program``: until then its command line is its parent's."""
    cmdline = Path(f"/proc/{process.pid}/cmdline")
    deadline = time.monotonic() + 10
    while not cmdline.read_bytes().startswith(program):
        assert time.monotonic() < deadline, f"{program!r} did not start"
        time.sleep(0.01)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not an upgradeproxy."""
    process = subprocess.Popen(["sleep", "30"])
    _wait_for_exec(process, b"sleep")
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def fake_proxy() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line names upgradeproxy, and that exits 7 on SIGHUP."""
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGHUP, lambda *a: sys.exit(7))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, "upgradeproxy"], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_it_sends_sighup_to_the_process_in_the_pid_file(
    tmp_path: Path, fake_proxy: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    pidfile = tmp_path / "proxy.pid"
    pidfile.write_text(f"{fake_proxy.pid}\n")
    status, out, err = reload("--pidfile", str(pidfile), capsys=capsys)
    assert (status, err) == (0, "")
    assert out == (
        f"sent SIGHUP to upgradeproxy (pid {fake_proxy.pid}); "
        "its log and metrics say how the reload went\n"
    )
    assert fake_proxy.wait(10) == 7


def test_it_reads_twistd_pid_by_default(
    tmp_path: Path,
    fake_proxy: subprocess.Popen[bytes],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "twistd.pid").write_text(str(fake_proxy.pid))
    monkeypatch.chdir(tmp_path)
    assert reload(capsys=capsys)[0] == 0
    assert fake_proxy.wait(10) == 7


def test_a_pid_can_be_given(
    fake_proxy: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    assert reload(str(fake_proxy.pid), capsys=capsys)[0] == 0
    assert fake_proxy.wait(10) == 7


def test_no_pid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.pid"
    status, out, err = reload("--pidfile", str(missing), capsys=capsys)
    assert (status, out) == (1, "")
    assert err == (
        f"upgradeproxy reload: no PID file {missing}: is the proxy running from this "
        "directory? Give --pidfile FILE (as given to twistd --pidfile) or the PID\n"
    )


def test_a_pid_file_without_a_pid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pidfile = tmp_path / "proxy.pid"
    pidfile.write_text("not a pid\n")
    status, _, err = reload("--pidfile", str(pidfile), capsys=capsys)
    assert status == 1
    assert err == f"upgradeproxy reload: the PID file {pidfile} holds no PID ('not a pid')\n"


def test_a_stale_pid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    pidfile = tmp_path / "proxy.pid"
    pidfile.write_text(str(ended.pid))
    status, _, err = reload("--pidfile", str(pidfile), capsys=capsys)
    assert status == 1
    assert err == (
        f"upgradeproxy reload: no process {ended.pid} (from {pidfile}): the proxy is not "
        "running; a PID file left behind is stale and can be removed\n"
    )


def test_a_process_that_is_not_ours_gets_no_signal(
    sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = reload(str(sleeper.pid), capsys=capsys)
    assert status == 1
    assert err == (
        f"upgradeproxy reload: process {sleeper.pid} (given on the command line) is not an "
        "upgradeproxy (sleep 30); give the PID of the proxy (twistd's PID file has it)\n"
    )
    assert sleeper.poll() is None, "no signal was sent"


def test_a_pid_file_naming_another_program(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    pidfile = tmp_path / "proxy.pid"
    pidfile.write_text(str(sleeper.pid))
    status, _, err = reload("--pidfile", str(pidfile), capsys=capsys)
    assert status == 1
    assert err.endswith("(sleep 30); the PID file is stale or names another program\n")
    assert sleeper.poll() is None


@pytest.mark.parametrize("pid", ["0", "x"])
def test_a_pid_that_names_no_single_process_is_refused(
    pid: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        reload(pid, capsys=capsys)
    assert exit.value.code == 2
    assert f"a process ID is a whole number above 0, not '{pid}'" in capsys.readouterr().err
