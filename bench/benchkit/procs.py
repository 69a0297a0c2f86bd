"""Processes: started pinned to a CPU, watched, measured, and always stopped.

Every server the benchmark starts is a :class:`Process`: its own session (so
its process group is everything it forks, such as nginx's worker), killed
with the driver if the driver dies (``PR_SET_PDEATHSIG``), and stopped by
PID -- ``SIGTERM``, then ``SIGKILL`` for whatever is left of its group -- in
``finally`` blocks. Nothing is ever killed by name.

Also here: raising ``RLIMIT_NOFILE`` (children inherit it), finding a free
port, waiting until a server accepts connections, and reading RSS and CPU
time from ``/proc``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

HOST = "127.0.0.1"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
_TCP_ESTABLISHED = "01"  # the "st" column of /proc/net/tcp
#: Session ids of everything the benchmark started (each Process is a session leader).
_OUR_SESSIONS: set[int] = {os.getsid(0)}


class StartError(Exception):
    """A server did not come up; the message carries the end of its log."""


def raise_nofile(target: int = 65536) -> int:
    """Raise the limit on open files towards ``target``; return the new soft limit.

    The soft limit goes up to the hard limit; the hard limit itself only goes
    up where that is permitted (as root, up to ``fs.nr_open``). Whatever the
    driver gets, everything it starts inherits.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return target if soft == resource.RLIM_INFINITY else soft
    if hard == resource.RLIM_INFINITY or hard >= target:
        attempts = [(target, hard)]
    else:
        attempts = [(target, target), (hard, hard)]  # the first needs CAP_SYS_RESOURCE
    for limits in attempts:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` run under ``taskset -c CPU`` (unchanged when ``cpu`` is None)."""
    if cpu is None:
        return list(argv)
    taskset = shutil.which("taskset")
    if taskset is None:
        return list(argv)
    return [taskset, "-c", str(cpu), *argv]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL if the benchmark driver dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 is index 0)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()


def group_members(pgid: int) -> list[int]:
    """PIDs of every process in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def rss_kib(pid: int) -> int:
    """VmRSS of one process, in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class Process:
    """One started program (and whatever it forks), with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        cpu: int | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        pipe_stdin: bool = False,
        pipe_stdout: bool = False,
    ) -> None:
        self.name = name
        self.argv = pinned(argv, cpu)
        self.log_path = log_path
        self._cwd = cwd
        self._env = env
        self._pipe_stdin = pipe_stdin
        self._pipe_stdout = pipe_stdout
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._pending = b""

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Process:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if self._pipe_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if self._pipe_stdout else self._log,
            stderr=self._log,
            cwd=self._cwd,
            env=self._env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # no threads in the driver, so this is safe
        )
        _OUR_SESSIONS.add(self._popen.pid)
        return self

    def stop(self, timeout: float = 3.0) -> None:
        """Stop it by PID: SIGTERM, a grace period, then SIGKILL for its whole group."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout)
        # Whatever is left of its process group (a stubborn main process, or
        # workers that outlived it). The group id is the PID we started; the
        # kernel keeps it reserved while any member lives.
        if group_members(popen.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout)
        for stream in (popen.stdin, popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Process:
        return self.start() if self._popen is None else self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- state -----------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self._popen is not None, "not started"
        return self._popen.pid

    def exited(self) -> int | None:
        """The exit status if it has ended, else None."""
        return None if self._popen is None else self._popen.poll()

    def rss_kib(self) -> int:
        """Resident memory of the whole process group (master and workers), KiB."""
        return sum(rss_kib(pid) for pid in group_members(self.pid))

    def members(self) -> list[int]:
        """PIDs of its whole process group: itself and whatever it forked (workers)."""
        return group_members(self.pid)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_seconds_each().values())

    def cpu_seconds_each(self) -> dict[int, float]:
        """CPU time so far of each process of its group, by PID."""
        return {pid: cpu_seconds(pid) for pid in self.members()}

    def open_files(self) -> int:
        """Descriptors open in the whole process group."""
        total = 0
        for pid in group_members(self.pid):
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- talking to it ---------------------------------------------------------

    def read_line(self, timeout: float) -> str:
        """The next line of its stdout; StartError if none comes in time."""
        assert self._popen is not None and self._popen.stdout is not None
        fd = self._popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise StartError(f"{self.name}: no output after {timeout:.0f} s")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise StartError(
                        f"{self.name} exited (status {self._popen.wait()}): {self.log_tail()}"
                    )
                self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode(errors="replace")

    def write(self, data: bytes) -> None:
        assert self._popen is not None and self._popen.stdin is not None
        self._popen.stdin.write(data)
        self._popen.stdin.flush()


def wait_listening(process: Process, port: int, timeout: float = 20.0) -> None:
    """Return once ``port`` accepts connections; StartError if ``process`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        status = process.exited()
        if status is not None:
            raise StartError(
                f"{process.name} exited with status {status} before listening:\n"
                f"{process.log_tail()}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise StartError(
                    f"{process.name} was not listening on {HOST}:{port} after {timeout:.0f} s:\n"
                    f"{process.log_tail()}"
                ) from None
            time.sleep(0.05)


def wait_answering(port: int, connections: int = 16, timeout: float = 20.0) -> None:
    """Return once ``connections`` fresh connections each got an HTTP response to ``GET /``.

    A server whose processes share one address with ``SO_REUSEPORT`` accepts
    connections into every process's backlog as soon as the first socket is
    bound, before each process serves: the kernel spreads the connections
    over the sockets, so when all of them are answered every process (of two:
    with a probability of 1 - 2^-15 for 16 connections) serves.
    """
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.create_connection((HOST, port), timeout=timeout))
            for _ in range(connections)
        ]
        for sock in socks:
            sock.sendall(request)
        for n, sock in enumerate(socks, start=1):
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                answer = sock.recv(64)
            except TimeoutError:
                raise StartError(
                    f"{HOST}:{port} did not answer connection {n} of {connections} "
                    f"within {timeout:.0f} s"
                ) from None
            if not answer.startswith(b"HTTP/1."):
                raise StartError(f"{HOST}:{port} answered GET / with {answer!r}")


def connections_per_process(pids: Sequence[int], port: int) -> dict[int, int]:
    """How many established TCP connections to local ``port`` each process holds (IPv4).

    Read from ``/proc/net/tcp`` (the connections and their socket inodes) and
    ``/proc/PID/fd`` (which process holds which inode).
    """
    inodes = set()
    with open("/proc/net/tcp") as f:
        next(f)  # the header
        for line in f:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == _TCP_ESTABLISHED:
                inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in pids:
        held = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    held += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
        counts[pid] = held
    return counts


def run_json(argv: Sequence[str], *, cpu: int | None, timeout: float) -> dict[str, Any]:
    """Run a program that prints a JSON object as its last line; return that object."""
    return run_json_all([argv], cpu=cpu, timeout=timeout)[0]


def run_json_all(
    argvs: Sequence[Sequence[str]], *, cpu: int | None, timeout: float
) -> list[dict[str, Any]]:
    """Run programs side by side, each printing a JSON object as its last line; return those."""
    with contextlib.ExitStack() as stack:
        running = []
        for argv in argvs:
            popen = subprocess.Popen(
                pinned(argv, cpu), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            stack.callback(_reap, popen)
            running.append(popen)
        deadline = time.monotonic() + timeout
        results = []
        for argv, popen in zip(argvs, running, strict=True):
            try:
                out, err = popen.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as e:
                name = Path(argv[0]).name
                raise RuntimeError(f"{name} did not finish within {timeout:.0f} s") from e
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if popen.returncode != 0 or not lines:
                raise RuntimeError(
                    f"{' '.join(argv)} failed (status {popen.returncode}): "
                    f"{err.strip() or out.strip()}"
                )
            results.append(json.loads(lines[-1]))
        return results


def _reap(popen: subprocess.Popen[str]) -> None:
    """Kill a program that is still running (after a failure or timeout), then wait for it."""
    if popen.poll() is None:
        popen.kill()
    popen.wait()


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def core_times(cpu: int | None) -> tuple[int, int, int]:
    """(busy, steal, total) clock ticks of one CPU (None: of all CPUs) so far, from /proc/stat.

    Busy counts user, nice, system, irq, softirq and steal time: on loopback
    much of the network work is softirq time that no process is charged for.
    Steal is time a hypervisor gave this virtual CPU's host CPU to someone else.
    """
    prefix = "cpu " if cpu is None else f"cpu{cpu} "
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(prefix):
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, line.split()[1:9])
                busy = user + nice + system + irq + softirq + steal
                return busy, steal, busy + idle + iowait
    return 0, 0, 0


def _foreign_processes() -> dict[tuple[int, int], int]:
    """CPU ticks so far of every user-space process the benchmark did not start.

    Keyed by (pid, start time), so that a reused PID is a new process.
    Kernel threads (session 0) are left out: they do the benchmark's own
    network work too.
    """
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        session = int(fields[3])
        if session == 0 or session in _OUR_SESSIONS:
            continue
        found[(int(entry), int(fields[19]))] = int(fields[11]) + int(fields[12])
    return found


def foreign_cpu_seconds(before: dict[tuple[int, int], int]) -> float:
    """CPU seconds that other processes used since ``before`` (a :func:`_foreign_processes`).

    Processes that started and ended in between are missed, so this is a
    lower bound: enough to tell a quiet machine from a busy one.
    """
    now = _foreign_processes()
    ticks = sum(total - before.get(key, 0) for key, total in now.items())
    return max(0, ticks) / _CLOCK_TICKS


@contextlib.contextmanager
def cpu_meter(
    proxy: Process | None, backend: Process | None, load_core: int | None, proxy_core: int | None
) -> Iterator[dict[str, float]]:
    """CPU use over the ``with`` block, as fractions of one core.

    The dict it yields gets, when the block ends: ``proxy_cpu`` (the proxy's
    process group, if there is a proxy); ``load_cpu`` (the backend plus every
    child of the driver that finished inside the block: the load generator or
    wrk); when pinned, ``load_core`` and ``proxy_core``: how busy each of
    the two CPUs was, whoever kept it busy, and ``load_core_steal`` and
    ``proxy_core_steal``, the part of that a hypervisor took away -- when
    nothing is pinned, ``all_cores`` and ``all_cores_steal``, the same for
    the machine as a whole (averaged over its CPUs); ``other_cpu``: what
    processes the benchmark did not start used meanwhile.
    """
    reading: dict[str, float] = {}
    start_wall = time.monotonic()
    start_proxy = proxy.cpu_seconds() if proxy is not None else 0.0
    start_load = (backend.cpu_seconds() if backend is not None else 0.0) + _children_cpu_seconds()
    cores: dict[str, int | None] = {
        name: core
        for name, core in (("load_core", load_core), ("proxy_core", proxy_core))
        if core is not None
    } or {"all_cores": None}
    start_cores = {name: core_times(core) for name, core in cores.items()}
    start_other = _foreign_processes()
    try:
        yield reading
    finally:
        wall = time.monotonic() - start_wall
        if wall > 0:
            if proxy is not None:
                reading["proxy_cpu"] = (proxy.cpu_seconds() - start_proxy) / wall
            load = (backend.cpu_seconds() if backend is not None else 0.0) + _children_cpu_seconds()
            reading["load_cpu"] = (load - start_load) / wall
            reading["other_cpu"] = foreign_cpu_seconds(start_other) / wall
            for name, (busy0, steal0, total0) in start_cores.items():
                busy1, steal1, total1 = core_times(cores[name])
                if total1 > total0:
                    reading[name] = (busy1 - busy0) / (total1 - total0)
                    reading[f"{name}_steal"] = (steal1 - steal0) / (total1 - total0)


@contextlib.contextmanager
def cpu_each(process: Process | None) -> Iterator[dict[int, float]]:
    """CPU use of each process of ``process``'s group over the ``with`` block, by PID.

    In fractions of one core; a process that started inside the block (a
    restarted worker) counts from its start. Empty without a process.
    """
    reading: dict[int, float] = {}
    start_wall = time.monotonic()
    start = process.cpu_seconds_each() if process is not None else {}
    try:
        yield reading
    finally:
        wall = time.monotonic() - start_wall
        if process is not None and wall > 0:
            for pid, seconds in process.cpu_seconds_each().items():
                reading[pid] = (seconds - start.get(pid, 0.0)) / wall
