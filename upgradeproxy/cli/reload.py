"""``upgradeproxy reload``: ask the running proxy to reload its configuration file.

It sends SIGHUP to the process named by a PID file (twistd's ``twistd.pid``
by default, or ``--pidfile``) or by a PID given on the command line, after
checking that the process exists and is an upgradeproxy. The proxy does the
rest (:mod:`upgradeproxy.cli._reloader`): it reads and checks the file as
``--check`` does and applies it, or logs every mistake and changes nothing.
Whether the reload succeeded is in the proxy's log and its metrics
(``upgradeproxy_config_last_reload_success``), not in this command's status:
the signal carries no answer.

Exit status: 0 when the signal was sent, 1 when it could not be.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass

#: Where twistd writes its PID file unless told otherwise (``twistd --pidfile``).
DEFAULT_PIDFILE = "twistd.pid"


@dataclass(frozen=True, slots=True)
class CannotSignal(Exception):
    """Why the signal cannot be sent: one line that says what to do."""

    message: str

    def __str__(self) -> str:
        return self.message


def read_pidfile(path: str) -> int:
    """The PID in the file at ``path``."""
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            text = file.read().strip()
    except FileNotFoundError:
        raise CannotSignal(
            f"no PID file {path}: is the proxy running from this directory? "
            "Give --pidfile FILE (as given to twistd --pidfile) or the PID"
        ) from None
    except OSError as e:
        raise CannotSignal(f"cannot read the PID file {path}: {e.strerror or e}") from None
    if not text.isdigit() or int(text) <= 0:
        raise CannotSignal(f"the PID file {path} holds no PID ({text[:40]!r})")
    return int(text)


def process_id(text: str) -> int:
    """A PID from the command line: a whole number above 0 (0 and below name process groups)."""
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"a process ID is a whole number above 0, not {text!r}")
    return int(text)


def _command_line(pid: int) -> str | None:
    """The process's command line, or None where the system does not say (no /proc)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return None


def check_process(pid: int, where: str, fix: str) -> None:
    """Raise :class:`CannotSignal` unless ``pid`` is a running upgradeproxy we may signal."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise CannotSignal(
            f"no process {pid} ({where}): the proxy is not running; "
            "a PID file left behind is stale and can be removed"
        ) from None
    except PermissionError:
        raise CannotSignal(
            f"process {pid} ({where}) belongs to another user; run this as that user"
        ) from None
    command = _command_line(pid)
    if command is not None and "upgradeproxy" not in command:
        raise CannotSignal(
            f"process {pid} ({where}) is not an upgradeproxy ({command.strip()[:80]}); {fix}"
        )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``reload`` to the ``upgradeproxy`` command."""
    parser = subparsers.add_parser(
        "reload",
        help="make the running proxy reload its configuration file (sends SIGHUP)",
        description=(
            "Send SIGHUP to the running proxy, which reads its --config file again, checks "
            "it as --check does and applies it; a file with mistakes changes nothing, and "
            "the proxy logs each one. Open connections and tunnels are kept."
        ),
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--pidfile",
        default=DEFAULT_PIDFILE,
        help=f"the proxy's PID file, as twistd wrote it (default: {DEFAULT_PIDFILE})",
    )
    where.add_argument("pid", nargs="?", type=process_id, help="the proxy's process ID")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Send the signal; print one line saying what happened."""
    try:
        if args.pid is not None:
            pid, where = args.pid, "given on the command line"
            fix = "give the PID of the proxy (twistd's PID file has it)"
        else:
            pid, where = read_pidfile(args.pidfile), f"from {args.pidfile}"
            fix = "the PID file is stale or names another program"
        check_process(pid, where, fix)
        os.kill(pid, signal.SIGHUP)
    except CannotSignal as e:
        sys.stderr.write(f"upgradeproxy reload: {e}\n")
        return 1
    except OSError as e:  # it ended between the check and the signal
        sys.stderr.write(f"upgradeproxy reload: cannot signal process {pid}: {e.strerror}\n")
        return 1
    sys.stdout.write(
        f"sent SIGHUP to upgradeproxy (pid {pid}); its log and metrics say how the reload went\n"
    )
    return 0
