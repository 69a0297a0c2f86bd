"""Several processes serving the same addresses: ``--workers N``.

The parent process opens one listening socket per worker and address, all
bound to the same address with ``SO_REUSEPORT`` (the kernel then spreads new
connections evenly over them), starts each worker with
``python -m upgradeproxy.cli.workers`` and hands it its sockets and the
configuration, already checked (workers do not read the command line). The parent
serves nothing itself: it re-emits its workers' log events (they write them
to it as JSON lines, tagged with their PID), restarts a worker that dies, and
passes SIGTERM on when it is stopped. It checks a reload (SIGHUP) itself and
passes the new configuration on to every worker as one line on its standard
input, in the form ``--config`` takes (:meth:`WorkerPool.reload`): a worker
swaps its proxy's configuration in place, as a single process does, so no
tunnel is closed and no worker is replaced. A worker that cannot start at all
(its exit status is :data:`CANNOT_START`) is not restarted: the parent ends,
with the worker's reason. A worker exits when the parent goes away (its
standard input closes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessTerminated, ReactorNotRunning
from twisted.internet.interfaces import IProtocolFactory, IReactorProcess, IReactorTime
from twisted.logger import Logger, LogLevel, eventFromJSON, formatEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from ..core.accesslog import NAMESPACE
from ._endpoints import ListenAddress
from .service import ConfiguredProxy, StartFailed, listeners

log = Logger()

#: Starts a line a worker sends its parent that holds a formatted access record.
ACCESS_MARK = b"\x1daccess "

#: Seconds before a worker that died is started again.
RESTART_DELAY = 1.0
#: Seconds a worker gets to exit after SIGTERM, beyond its shutdown grace
#: period, before it is killed.
STOP_MARGIN = 10.0
#: The exit status of a worker that cannot start; it is not started again.
CANNOT_START = 3
#: Starts the line a parent writes to a worker's standard input to reload it:
#: the configuration follows, as ``--config`` takes it.
RELOAD = b"reload "
#: The line that tells a worker a reload was refused (the parent logged why).
RELOAD_FAILED = b"reload-failed"
#: The longest line a worker reads from its parent.
MAX_CONFIG_LINE = 64 * 1024 * 1024


def open_sockets(addresses: Sequence[ListenAddress], count: int) -> list[list[socket.socket]]:
    """``count`` lists of listening sockets, one socket per address in each.

    All sockets of one address share it with ``SO_REUSEPORT``; port 0 is
    resolved once, by the first, and reused by the others. An address that
    cannot be bound raises :class:`~upgradeproxy.cli.service.StartFailed`.
    """
    per_worker: list[list[socket.socket]] = [[] for _ in range(count)]
    for address in addresses:
        port = address.port
        for sockets in per_worker:
            sock = socket.socket(address.family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((address.host, port))
                sock.listen(address.backlog)
            except (OSError, OverflowError) as e:
                sock.close()
                for opened in per_worker:
                    for other in opened:
                        other.close()
                why = getattr(e, "strerror", None) or str(e)
                raise StartFailed(f"cannot listen on {address.description}: {why}") from None
            sock.setblocking(False)
            sock.set_inheritable(True)
            port = sock.getsockname()[1]
            sockets.append(sock)
    return per_worker


class _WorkerProcess(protocol.ProcessProtocol):
    """The parent's end of one worker: its log events, and its end."""

    def __init__(self, pool: WorkerPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = b""
        #: How the worker's lines are tagged in the log, once it is known.
        self.system = f"worker slot {slot}"
        #: The last critical line the worker logged: why it could not start.
        self.last_error: str | None = None

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._publish(line)

    def _publish(self, line: bytes) -> None:
        if line.startswith(ACCESS_MARK):
            # An access record, already formatted by the worker: the cheap path.
            globalLogPublisher(
                {
                    "log_namespace": NAMESPACE,
                    "log_level": LogLevel.info,
                    "log_format": "{access}",
                    "access": line[len(ACCESS_MARK) :].decode("utf-8", "replace"),
                    "log_time": time.time(),
                    "log_source": None,
                    "log_system": self.system,
                }
            )
            return
        try:
            # jsonFileLogObserver starts each record with an RS character.
            event = eventFromJSON(line.decode("utf-8").lstrip("\x1e"))
        except ValueError:
            log.info("worker {slot}: {line}", slot=self.slot, line=line.decode("utf-8", "replace"))
            return
        if event.get("log_level") == LogLevel.critical:
            self.last_error = formatEvent(event)
        globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.pool.worker_ended(self, reason)


class WorkerPool(Service):
    """Starts, watches and stops the worker processes."""

    def __init__(
        self,
        reactor: IReactorProcess,
        sockets: list[list[socket.socket]],
        config: Callable[[], str],
        *,
        stop_timeout: float = STOP_MARGIN,
        snapshots: str | None = None,
        cannot_start: Callable[[str], None],
    ) -> None:
        """``config`` gives the configuration a worker is started with, as
        :func:`~upgradeproxy.cli.config.dump_config` writes it; ``snapshots`` is a
        directory where workers write their state for metrics; ``cannot_start``
        is called with one line when a worker cannot start."""
        self._reactor = reactor
        self._sockets = sockets
        self._config = config
        self._cannot_start = cannot_start
        self._stop_timeout = stop_timeout
        self._snapshots = snapshots
        self._workers: dict[int, _WorkerProcess] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        for slot in range(len(self._sockets)):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        fds = [sock.fileno() for sock in self._sockets[slot]]
        argv = [sys.executable, "-m", "upgradeproxy.cli.workers"]
        for fd, sock in zip(fds, self._sockets[slot], strict=True):
            argv += ["--fd", f"{fd}:{int(sock.family)}"]
        if self._snapshots is not None:
            argv += ["--snapshots", self._snapshots, "--slot", str(slot)]
        argv += ["--config", self._config()]
        worker = _WorkerProcess(self, slot)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: 2}
        child_fds.update({fd: fd for fd in fds})
        process = self._reactor.spawnProcess(
            worker, sys.executable, argv, env=os.environ.copy(), childFDs=child_fds
        )
        self._workers[slot] = worker
        worker.system = f"worker {process.pid}"
        log.info("started worker {slot} (pid {pid})", slot=slot, pid=process.pid)

    def worker_ended(self, worker: _WorkerProcess, reason: Failure) -> None:
        if self._workers.get(worker.slot) is not worker:
            return
        del self._workers[worker.slot]
        if self._stopping:
            return
        if isinstance(reason.value, ProcessTerminated) and reason.value.exitCode == CANNOT_START:
            self._cannot_start(
                f"worker {worker.slot} cannot start: {worker.last_error or 'see its log lines'}"
            )
            return
        log.warn(
            "worker {slot} ended ({why}); starting a new one in {delay:g}s",
            slot=worker.slot,
            why=reason.getErrorMessage(),
            delay=RESTART_DELAY,
        )
        clock: IReactorTime = self._reactor  # type: ignore[assignment]
        clock.callLater(RESTART_DELAY, self._restart, worker.slot)

    def reload(self, config: str) -> None:
        """Pass a checked configuration (as ``config`` gives them) on to every worker.

        Each worker swaps its proxy's configuration, keeping its connections
        and tunnels; a worker started later starts with the newest one,
        which ``config`` must give from now on.
        """
        self._tell_workers(RELOAD + config.encode("utf-8") + b"\n")
        log.info("reload passed on to {count} workers", count=len(self._workers))

    def reload_failed(self) -> None:
        """Tell every worker that a reload was refused, for their metrics."""
        self._tell_workers(RELOAD_FAILED + b"\n")

    def _tell_workers(self, line: bytes) -> None:
        for worker in self._workers.values():
            if worker.transport is not None:
                worker.transport.write(line)

    def _restart(self, slot: int) -> None:
        if not self._stopping and slot not in self._workers:
            self._spawn(slot)

    def stopService(self) -> defer.Deferred[object]:
        """Pass SIGTERM on to every worker; kill the ones still running after a while."""
        super().stopService()
        self._stopping = True
        workers = list(self._workers.values())
        for worker in workers:
            _signal(worker, "TERM")
        clock: IReactorTime = self._reactor  # type: ignore[assignment]
        killer = clock.callLater(self._stop_timeout, _signal_all, workers, "KILL")
        done = defer.DeferredList([w.ended for w in workers])

        def finished(result: object) -> object:
            if killer.active():
                killer.cancel()
            for sockets in self._sockets:
                for sock in sockets:
                    sock.close()
            if self._snapshots is not None:
                shutil.rmtree(self._snapshots, ignore_errors=True)
            return result

        return done.addBoth(finished)


def _signal_all(workers: list[_WorkerProcess], name: str) -> None:
    for worker in workers:
        _signal(worker, name)


def _signal(worker: _WorkerProcess, name: str) -> None:
    transport = worker.transport
    if transport is not None and getattr(transport, "pid", None) is not None:
        with contextlib.suppress(Exception):  # the process ended meanwhile
            transport.signalProcess(name)


# -- the worker side ----------------------------------------------------------------------


class _FromParent(LineReceiver):
    """The worker's standard input: reloads from the parent, and its end.

    The worker stops when its parent goes away (standard input closes).
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_CONFIG_LINE

    def __init__(self, configured: ConfiguredProxy) -> None:
        self._configured = configured

    def lineReceived(self, line: bytes) -> None:
        from .config import undump_config

        if line == RELOAD_FAILED:
            self._configured.proxy.reconfigure_failed()
            return
        if not line.startswith(RELOAD):
            log.error("unknown line from the parent process: {line!r}", line=line[:80])
            return
        try:
            self._configured.apply(undump_config(line[len(RELOAD) :].decode("utf-8")))
        except Exception as e:
            self._configured.proxy.reconfigure_failed()
            log.error(
                "reload failed in this worker ({why}); it keeps its configuration",
                why=str(e) or repr(e),
            )

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        from twisted.internet import reactor

        with contextlib.suppress(ReactorNotRunning):  # already stopping
            reactor.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Run one worker: ``--fd FD:FAMILY``... and ``--config`` (a dumped configuration)."""
    import argparse

    from twisted.internet import reactor, stdio

    from ..ops.metrics import SnapshotWriter
    from .config import undump_config

    parser = argparse.ArgumentParser(prog="python -m upgradeproxy.cli.workers")
    parser.add_argument("--fd", action="append", default=[], help="FD:FAMILY to serve on")
    parser.add_argument("--snapshots", help="directory to write this worker's state to")
    parser.add_argument("--slot", default="0", help="this worker's number")
    parser.add_argument("--config", required=True, help="the configuration, as JSON")
    args = parser.parse_args(argv)
    config = undump_config(args.config)

    _log_to_parent()
    # The parent decides: it sends SIGTERM, and passes reloads on through standard input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        configured = ConfiguredProxy(config, reactor)
        factory = configured.factory
        factory.doStart()
        # The parent passes one socket per listener, in the order of listeners().
        ports = [
            _adopt(reactor, spec, configured.behind(factory) if proxied.proxy_protocol else factory)
            for spec, proxied in zip(args.fd, listeners(config), strict=True)
        ]
    except Exception as e:  # whatever it is, restarting would meet it again
        log.critical("{why}", why=str(e) or repr(e))
        sys.stdout.flush()
        raise SystemExit(CANNOT_START) from None
    writer = None
    if args.snapshots is not None:
        writer = SnapshotWriter(factory.proxy.snapshot, args.snapshots, args.slot, reactor)
        writer.start()

    async def shut_down() -> None:
        """SIGTERM: stop accepting, then finish gracefully within the grace period."""
        for port in ports:
            await port.stopListening()
        await factory.proxy.drain(configured.config.shutdown_grace)
        factory.doStop()
        if writer is not None:
            writer.stop()
        configured.close()

    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.Deferred.fromCoroutine(shut_down())
    )
    stdio.StandardIO(  # type: ignore[call-arg]
        _FromParent(configured), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY)
    )
    reactor.run()


def _log_to_parent() -> None:
    """Send every log event to the parent, on standard output, tagged with this worker's PID."""
    from twisted.logger import ILogObserver, globalLogBeginner, jsonFileLogObserver
    from zope.interface import provider

    to_parent = jsonFileLogObserver(sys.stdout)
    system = f"worker {os.getpid()}"

    @provider(ILogObserver)
    def tagged(event: dict[str, object]) -> None:
        if event.get("log_namespace") == NAMESPACE:
            # Access records are most of the log: sent as the line they
            # print as, which costs a fraction of a JSON event both here and
            # in the parent.
            sys.stdout.buffer.write(ACCESS_MARK + formatEvent(event).encode("utf-8") + b"\n")
            sys.stdout.flush()
            return
        event.setdefault("log_system", system)
        to_parent(event)

    globalLogBeginner.beginLoggingTo([tagged], redirectStandardIO=False, discardBuffer=True)


def _adopt(reactor: Any, spec: str, factory: IProtocolFactory) -> Any:
    """Serve on the listening socket the parent passed as ``FD:FAMILY``."""
    fd, family = (int(part) for part in spec.split(":"))
    try:
        os.set_blocking(fd, False)  # adoptStreamPort expects it, and does not do it
        try:
            return reactor.adoptStreamPort(fd, socket.AddressFamily(family), factory)
        finally:
            os.close(fd)
    except OSError as e:
        raise StartFailed(f"cannot listen on the socket passed as fd {fd}: {e.strerror}") from None


if __name__ == "__main__":
    main()
