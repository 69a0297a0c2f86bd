"""The processes of the soak tests (``tests/test_soak.py``).

Run as ``python tests/soak_peers.py ROLE JSON-PARAMETERS``, each in its own
process with its own epoll reactor, driven by the test over standard input
and output, one JSON object per line: a command ``{"cmd": ..., "args": {...}}``
in, one reply ``{"ok": ...}`` or ``{"error": ...}`` out. The first line out
is ``{"ready": {...}}``.

Roles:

``proxy``
    A :class:`~upgradeproxy.ProxyFactory` to the backend, listening on
    127.0.0.1, as ``twistd -n upgradeproxy`` would run it, plus a ``stats``
    command that reports the proxy's own counts (client connections,
    tunnels, idle backend connections, pending timers), the process's file
    descriptors and memory, and every log event with a failure or at error
    level or above.

``backend``
    A scripted backend: answers upgrades with ``101`` and a greeting, then
    echoes (``/t/ID``) or floods (``/flood/ID``, on command); answers plain
    requests; misbehaves on request (``act=`` in the query) for the chaos run.

``clients``
    The load generator: opens tunnels, sends traffic and checks every byte,
    reads slowly, and runs the random-abort scenarios.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import os
import random
import resource
import socket
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import defer, reactor, stdio  # noqa: E402
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer  # noqa: E402
from twisted.internet.protocol import ClientFactory, Factory, Protocol  # noqa: E402
from twisted.logger import LogLevel, formatEvent, globalLogBeginner  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402
from zope.interface import implementer  # noqa: E402

HOST = "127.0.0.1"
BLOCK = 64 * 1024


def raise_nofile() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure() -> dict[str, int]:
    """File descriptors and memory, after a full collection and giving freed memory back.

    ``malloc_trim`` returns what glibc holds free to the system, so that RSS
    shows what is in use rather than what the allocator keeps in reserve.
    """
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "rss": rss(),
        "blocks": sys.getallocatedblocks(),
    }


def small_buffers(transport: Any, option: int) -> None:
    transport.getHandle().setsockopt(socket.SOL_SOCKET, option, 64 * 1024)


def flood_block(ident: int) -> bytes:
    return hashlib.sha256(b"%d" % ident).digest() * (BLOCK // 32)


class LogWatch:
    """Counts log events by level and keeps those that show a problem."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        self.counts[level.name if level is not None else "none"] += 1
        failure = event.get("log_failure")
        if failure is not None or level in (LogLevel.error, LogLevel.critical):
            if len(self.problems) < 50:
                text = formatEvent(event)
                if failure is not None:
                    text += "\n" + failure.getTraceback()
                self.problems.append(text)
        elif level is LogLevel.warn and len(self.warnings) < 20:
            self.warnings.append(formatEvent(event))

    def report(self) -> dict[str, Any]:
        return {"log": dict(self.counts), "problems": self.problems, "warnings": self.warnings}


class Control(LineReceiver):
    """The command channel on standard input and output."""

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self, commands: dict[str, Callable[..., Any]], ready: dict[str, Any]) -> None:
        self.commands = commands
        self.ready = ready

    def connectionMade(self) -> None:
        self.send({"ready": self.ready})

    def lineReceived(self, line: bytes) -> None:
        message = json.loads(line)
        d = defer.maybeDeferred(self.commands[message["cmd"]], **message.get("args", {}))
        d.addCallbacks(
            lambda result: self.send({"ok": result}),
            lambda failure: self.send({"error": failure.getTraceback()}),
        )

    def send(self, message: dict[str, Any]) -> None:
        self.sendLine(json.dumps(message).encode())

    def connectionLost(self, reason: object = None) -> None:
        if reactor.running:
            reactor.stop()


def sleep(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


# -- the proxy ------------------------------------------------------------------------


def run_proxy(params: dict[str, Any], watch: LogWatch) -> tuple[dict[str, Any], dict[str, Any]]:
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from upgradeproxy import ProxyFactory, ProxySettings
    from upgradeproxy.core import _splice as splice_module
    from upgradeproxy.core._side import Side

    factory = ProxyFactory(
        TCP4ClientEndpoint(reactor, HOST, params["backend_port"]),
        settings=ProxySettings(splice=params["splice"]),
    )
    port = reactor.listenTCP(0, factory, backlog=4096, interface=HOST)

    def pooled_pipes() -> int:
        # Empty pipes the splice relay keeps for reuse (two descriptors each).
        pool = getattr(splice_module, "_pipes", None)
        return len(getattr(pool, "_free", ()))

    def stats() -> dict[str, Any]:
        return {
            **measure(),
            "connections": len(factory.proxy.connections),
            "tunnels": len(factory.proxy.tunnels),
            "spliced": sum(1 for t in factory.proxy.tunnels if getattr(t, "spliced", False)),
            "idle": factory.proxy.pool.idle_count,
            "delayed": len(reactor.getDelayedCalls()),
            "pooled_pipes": pooled_pipes(),
            **watch.report(),
        }

    def close_idle() -> None:
        factory.proxy.pool.close_idle()

    def describe(transport: Any) -> dict[str, Any]:
        readers, writers = set(reactor.getReaders()), set(reactor.getWriters())
        return {
            "connected": bool(getattr(transport, "connected", None)),
            "disconnecting": bool(getattr(transport, "disconnecting", None)),
            "write_disconnecting": bool(getattr(transport, "_writeDisconnecting", None)),
            "write_disconnected": bool(getattr(transport, "_writeDisconnected", None)),
            "reading": transport in readers,
            "writing": transport in writers,
            "buffered": len(getattr(transport, "dataBuffer", b""))
            + getattr(transport, "_tempDataLen", 0),
            "producer": type(getattr(transport, "producer", None)).__name__,
            "protocol": type(getattr(transport, "protocol", None)).__name__,
        }

    def describe_pump(pump: Any) -> dict[str, Any] | None:
        if pump is None:
            return None
        readers, writers = set(reactor.getReaders()), set(reactor.getWriters())
        out: dict[str, Any] = {"finished": getattr(pump, "_finished", None)}
        for side, d in getattr(pump, "_to", {}).items():
            out[f"to_{side.value}"] = {
                name: getattr(d, name, None) for name in ("in_pipe", "eof", "done", "blocked")
            } | {
                "pending": len(getattr(d, "pending", b"") or b""),
                "src_reading": d.src in readers,
                "dst_writing": d.dst in writers,
            }
        return out

    def leftovers() -> list[dict[str, Any]]:
        """What each remaining tunnel looks like (for diagnosing a leak)."""
        out = []
        for tunnel in list(factory.proxy.tunnels)[:10]:
            out.append(
                {
                    "eof": sorted(s.value for s in getattr(tunnel, "_eof", ())),
                    "lost": sorted(s.value for s in getattr(tunnel, "_lost", ())),
                    "first": str(tunnel.stats.first_closed),
                    "why": tunnel.stats.first_close_reason,
                    "sent": {k.value: v for k, v in tunnel.stats.sent.items()},
                    "spliced": tunnel.spliced,
                    "client": describe(tunnel.transport(Side.CLIENT)),
                    "backend": describe(tunnel.transport(Side.BACKEND)),
                    "pump": describe_pump(getattr(tunnel, "_pump", None)),
                }
            )
        return out

    return (
        {"stats": stats, "close_idle": close_idle, "leftovers": leftovers},
        {"port": port.getHost().port},
    )


# -- the backend ----------------------------------------------------------------------


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: soak\r\nConnection: upgrade\r\n\r\n"


@implementer(IPushProducer)
class Flood:
    """Writes a tunnel's block pattern as fast as the connection takes it."""

    def __init__(self, backend: BackendConnection, ident: int) -> None:
        self.backend = backend
        self.block = flood_block(ident)
        self.sent = 0
        self.paused = False
        self.running = False

    def start(self) -> None:
        self.running = True
        self.resumeProducing()

    def stop(self) -> None:
        self.running = False
        transport = self.backend.transport
        if transport is not None and self.backend.open:
            transport.unregisterProducer()
            transport.loseWriteConnection()

    def resumeProducing(self) -> None:
        self.paused = False
        while self.running and not self.paused and self.backend.open:
            self.backend.transport.write(self.block)  # type: ignore[union-attr]
            self.sent += len(self.block)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.running = False


@implementer(IHalfCloseableProtocol)
class BackendConnection(Protocol):
    def __init__(self, server: BackendServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.mode = "http"
        self.body_left = 0
        self.flood: Flood | None = None
        self.abort_after: int | None = None
        self.received = 0
        self.open = False

    def connectionMade(self) -> None:
        self.open = True
        self.server.open.add(self)

    def connectionLost(self, reason: object = None) -> None:
        self.open = False
        self.server.open.discard(self)
        if self.flood is not None:
            self.flood.running = False

    def readConnectionLost(self) -> None:
        # The proxy carried the client's EOF through: finish our side too.
        if self.flood is None:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.server.bytes_in += len(data)
        if self.mode == "echo":
            self.echo(data)
            return
        if self.mode == "flood":
            return
        self.buf += data
        while self.mode == "http" and self.open:
            if self.body_left:
                take = min(self.body_left, len(self.buf))
                del self.buf[:take]
                self.body_left -= take
                if self.body_left:
                    return
                self.respond_plain(self.pending)
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[: end + 4])
            del self.buf[: end + 4]
            self.request(head)

    def echo(self, data: bytes) -> None:
        self.received += len(data)
        if self.abort_after is not None and self.received >= self.abort_after:
            self.transport.write(data[: len(data) - (self.received - self.abort_after)])  # type: ignore[union-attr]
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.transport.write(data)  # type: ignore[union-attr]

    def request(self, head: bytes) -> None:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        _, target, _ = line.split(" ", 2)
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        ident = int(url.path.rsplit("/", 1)[1])
        act = query.get("act", "")
        lower = head.lower()
        if b"\r\nupgrade:" in lower:
            if act == "abort-before-101":
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            if act == "delay-101":
                reactor.callLater(random.uniform(0.02, 0.2), self.switch, ident, url.path, query)
                self.mode = "waiting"
                return
            self.switch(ident, url.path, query)
            return
        length = 0
        for field in lower.split(b"\r\n")[1:]:
            if field.startswith(b"content-length:"):
                length = int(field.split(b":", 1)[1])
        self.pending = (ident, query)
        if length:
            self.body_left = length
            take = min(length, len(self.buf))
            del self.buf[:take]
            self.body_left -= take
            if self.body_left:
                return
        self.respond_plain((ident, query))

    def respond_plain(self, pending: tuple[int, dict[str, str]]) -> None:
        ident, query = pending
        size = int(query.get("size", "16"))
        body = (b"%d:" % ident + b"x" * size)[:size] if size else b""
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        if query.get("act") == "abort-mid-body" and len(body) > 1:
            # Reset once the proxy has had time to read what was sent
            # (abortConnection at once would drop it unsent).
            self.transport.write(head + body[: len(body) // 2])  # type: ignore[union-attr]
            reactor.callLater(0.05, self.transport.abortConnection)  # type: ignore[union-attr]
            self.mode = "aborting"
            return
        self.transport.write(head + body)  # type: ignore[union-attr]

    def switch(self, ident: int, path: str, query: dict[str, str]) -> None:
        if not self.open:
            return
        rest = bytes(self.buf)
        self.buf.clear()
        self.transport.write(SWITCH + b"hello %d\n" % ident)  # type: ignore[union-attr]
        if path.startswith("/flood/"):
            # Small kernel buffers at both ends of a flood, so that a
            # thousand stalled tunnels do not push the machine into TCP
            # memory pressure (which stalls every socket on it).
            small_buffers(self.transport, socket.SO_SNDBUF)
            self.mode = "flood"
            self.flood = Flood(self, ident)
            self.transport.registerProducer(self.flood, True)  # type: ignore[union-attr]
            self.server.floods[ident] = self.flood
            if self.server.flooding:
                self.flood.start()
            return
        self.mode = "echo"
        if "abort-after" in query:
            self.abort_after = int(query["abort-after"])
        if rest:
            self.echo(rest)


class BackendServer(Factory):
    def __init__(self) -> None:
        self.open: set[BackendConnection] = set()
        self.floods: dict[int, Flood] = {}
        self.flooding = False
        self.bytes_in = 0

    def buildProtocol(self, addr: object) -> BackendConnection:
        return BackendConnection(self)


def run_backend(params: dict[str, Any], watch: LogWatch) -> tuple[dict[str, Any], dict[str, Any]]:
    server = BackendServer()
    port = reactor.listenTCP(0, server, backlog=4096, interface=HOST)

    def stats() -> dict[str, Any]:
        return {
            **measure(),
            "open": len(server.open),
            "bytes_in": server.bytes_in,
            "floods": len(server.floods),
            **watch.report(),
        }

    def start_flood() -> int:
        server.flooding = True
        for flood in server.floods.values():
            flood.start()
        return len(server.floods)

    def stop_flood() -> dict[str, int]:
        server.flooding = False
        sent = {}
        for ident, flood in server.floods.items():
            flood.stop()
            sent[str(ident)] = flood.sent
        server.floods.clear()
        return sent

    return (
        {"stats": stats, "start_flood": start_flood, "stop_flood": stop_flood},
        {"port": port.getHost().port},
    )


# -- the load generator ---------------------------------------------------------------


def upgrade(path: str, host: str = "soak") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: upgrade\r\nUpgrade: soak\r\n\r\n" % (
        path.encode(),
        host.encode(),
    )


class TunnelClient(Protocol):
    """One tunnel: the upgrade with early bytes, the 101, then echoed traffic."""

    def __init__(self, ident: int, generator: Generator) -> None:
        self.ident = ident
        self.generator = generator
        self.buf = bytearray()
        self.switched = False
        self.expect = bytearray()  # echo still owed to us
        self.waiter: defer.Deferred[None] | None = None
        self.ready: defer.Deferred[TunnelClient] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.checked = 0

    def connectionMade(self) -> None:
        early = b"early %d\n" % self.ident
        self.expect += b"hello %d\n" % self.ident + early
        self.transport.write(upgrade(f"/t/{self.ident}") + early)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.switched:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[: end + 4])
            data = bytes(self.buf[end + 4 :])
            self.buf.clear()
            if not head.startswith(b"HTTP/1.1 101 "):
                self.fail(f"no 101: {head[:100]!r}")
                return
            self.switched = True
        self.take(data)

    def take(self, data: bytes) -> None:
        if bytes(self.expect[: len(data)]) != data:
            self.fail(f"tunnel {self.ident}: unexpected bytes {data[:60]!r}")
            return
        del self.expect[: len(data)]
        self.checked += len(data)
        if not self.expect:
            if not self.ready.called:
                self.ready.callback(self)
            elif self.waiter is not None:
                waiter, self.waiter = self.waiter, None
                waiter.callback(None)

    def exchange(self, payload: bytes) -> defer.Deferred[None]:
        self.waiter = defer.Deferred()
        self.expect += payload
        self.transport.write(payload)  # type: ignore[union-attr]
        return self.waiter

    def fail(self, why: str) -> None:
        self.generator.violations.append(why)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        for d in (self.ready, self.waiter):
            if d is not None and not d.called:
                d.errback(ConnectionError(f"tunnel {self.ident} lost"))
        self.closed.callback(None)


@implementer(IHalfCloseableProtocol)
class FloodClient(Protocol):
    """One flooded tunnel, read slowly (one read per interval) or at full speed."""

    def __init__(self, ident: int, generator: Generator, interval: float) -> None:
        self.ident = ident
        self.generator = generator
        self.interval = interval
        self.block = flood_block(ident)
        self.buf = bytearray()
        self.state = "head"
        self.offset = 0
        self.received = 0
        self.ok = True
        self.ready: defer.Deferred[FloodClient] = defer.Deferred()
        self.done: defer.Deferred[int] = defer.Deferred()
        self.timer: Any = None

    def connectionMade(self) -> None:
        small_buffers(self.transport, socket.SO_RCVBUF)
        self.transport.write(upgrade(f"/flood/{self.ident}"))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.state == "head":
            self.buf += data
            greeting = b"hello %d\n" % self.ident
            end = self.buf.find(b"\r\n\r\n")
            if end < 0 or len(self.buf) < end + 4 + len(greeting):
                return
            if not self.buf.startswith(b"HTTP/1.1 101 ") or (
                self.buf[end + 4 : end + 4 + len(greeting)] != greeting
            ):
                self.generator.violations.append(f"flood {self.ident}: bad start")
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            data = bytes(self.buf[end + 4 + len(greeting) :])
            self.buf.clear()
            self.state = "flood"
            self.ready.callback(self)
        self.check(data)
        if self.interval and self.state == "flood":
            self.transport.pauseProducing()  # type: ignore[union-attr]
            if self.timer is None or not self.timer.active():
                self.timer = reactor.callLater(self.interval, self.resume)

    def resume(self) -> None:
        if self.transport is not None and self.state == "flood":
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def full_speed(self) -> None:
        self.interval = 0
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.resume()

    def check(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view) and self.ok:
            n = min(len(view) - pos, BLOCK - self.offset)
            if view[pos : pos + n] != self.block[self.offset : self.offset + n]:
                self.ok = False
                self.generator.violations.append(
                    f"flood {self.ident}: wrong bytes at {self.received + pos}"
                )
            pos += n
            self.offset = (self.offset + n) % BLOCK
        self.received += len(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self.state = "closed"
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.ready.called:
            self.ready.errback(ConnectionError(f"flood {self.ident} lost before its 101"))
        self.done.callback(self.received)


class OneShot(ClientFactory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self.protocol_instance

    def clientConnectionFailed(self, connector: object, reason: Any) -> None:
        p = self.protocol_instance
        for name in ("ready", "done", "closed"):
            d = getattr(p, name, None)
            if d is not None and not d.called:
                d.errback(reason)


class Generator:
    def __init__(self) -> None:
        self.tunnels: list[TunnelClient] = []
        self.floods: list[FloodClient] = []
        self.violations: list[str] = []
        self.rng = random.Random(1234)

    def connect(self, port: int, protocol: Protocol) -> None:
        reactor.connectTCP(HOST, port, OneShot(protocol), timeout=30)

    async def open(self, ports: list[int], n: int, concurrency: int = 256) -> dict[str, Any]:
        started = time.monotonic()
        failures: list[str] = []
        sem = defer.DeferredSemaphore(concurrency)

        async def one(ident: int) -> None:
            tunnel = TunnelClient(ident, self)
            self.connect(ports[ident % len(ports)], tunnel)
            try:
                await tunnel.ready
                self.tunnels.append(tunnel)
            except Exception as e:
                failures.append(f"{ident}: {e}")

        base = len(self.tunnels)
        await defer.gatherResults(
            [sem.run(lambda i=i: defer.ensureDeferred(one(i))) for i in range(base, base + n)]
        )
        return {
            "opened": len(self.tunnels) - base,
            "failed": failures[:20],
            "seconds": time.monotonic() - started,
            "checked": sum(t.checked for t in self.tunnels),
        }

    async def traffic(self, sample: int, size: int) -> dict[str, Any]:
        started = time.monotonic()
        chosen = self.rng.sample(self.tunnels, min(sample, len(self.tunnels)))
        before = sum(t.checked for t in chosen)
        results = await defer.DeferredList(
            [t.exchange(os.urandom(size)) for t in chosen], consumeErrors=True
        )
        failed = [str(r[1].value) for r in results if not r[0]]
        return {
            "tunnels": len(chosen),
            "bytes_checked": sum(t.checked for t in chosen) - before,
            "failed": failed[:20],
            "seconds": time.monotonic() - started,
        }

    async def close(self) -> dict[str, Any]:
        started = time.monotonic()
        tunnels, self.tunnels = self.tunnels, []
        waits = [t.closed for t in tunnels]
        for t in tunnels:
            t.transport.loseConnection()  # type: ignore[union-attr]
        await defer.DeferredList(waits)
        return {"closed": len(tunnels), "seconds": time.monotonic() - started}

    async def open_floods(self, port: int, n: int, interval: float) -> dict[str, Any]:
        started = time.monotonic()
        sem = defer.DeferredSemaphore(128)
        failures: list[str] = []

        async def one(ident: int) -> None:
            client = FloodClient(ident, self, interval)
            self.connect(port, client)
            try:
                await client.ready
                self.floods.append(client)
            except Exception as e:
                failures.append(f"{ident}: {e}")

        await defer.gatherResults(
            [sem.run(lambda i=i: defer.ensureDeferred(one(i))) for i in range(n)]
        )
        return {
            "opened": len(self.floods),
            "failed": failures[:20],
            "seconds": time.monotonic() - started,
        }

    def flood_progress(self) -> dict[str, Any]:
        return {"received": sum(f.received for f in self.floods), **measure()}

    async def drain_floods(self, sent: dict[str, int], timeout: float = 120) -> dict[str, Any]:
        """Read everything at full speed until each tunnel's EOF; compare with what was sent."""
        started = time.monotonic()
        floods, self.floods = self.floods, []
        for f in floods:
            f.full_speed()
        deadline = time.monotonic() + timeout
        while not all(f.done.called for f in floods):
            if time.monotonic() > deadline:
                stuck = [f for f in floods if not f.done.called]
                self.floods = stuck
                return {
                    "stuck": [
                        {"ident": f.ident, "received": f.received, "sent": sent.get(str(f.ident))}
                        for f in stuck[:20]
                    ],
                    "stuck_count": len(stuck),
                    "seconds": time.monotonic() - started,
                }
            await sleep(0.2)
        received = [f.received for f in floods]
        wrong = [
            f"{f.ident}: got {got} of {sent.get(str(f.ident))}"
            for f, got in zip(floods, received, strict=True)
            if got != sent.get(str(f.ident)) or not f.ok
        ]
        return {
            "tunnels": len(floods),
            "bytes_checked": sum(received),
            "wrong": wrong[:20],
            "seconds": time.monotonic() - started,
        }

    async def chaos(self, port: int, seconds: float, concurrency: int, seed: int) -> dict[str, Any]:
        chaos = Chaos(self, port, random.Random(seed))
        return await chaos.run(seconds, concurrency)

    def stats(self) -> dict[str, Any]:
        return {**measure(), "tunnels": len(self.tunnels), "violations": self.violations[:50]}


# -- random aborts at random moments ----------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Scripted(Protocol):
    """A client connection whose steps are driven by a scenario coroutine."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.lost = False
        self.changed: defer.Deferred[None] | None = None
        self.connected_d: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.connected_d.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        self.poke()

    def readConnectionLost(self) -> None:
        self.eof = True
        self.poke()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True
        self.eof = True
        if not self.connected_d.called:
            self.connected_d.errback(ConnectionError("connection failed"))
        self.closed.callback(None)
        self.poke()

    def poke(self) -> None:
        if self.changed is not None and not self.changed.called:
            d, self.changed = self.changed, None
            d.callback(None)

    async def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``condition`` holds (True) or the connection ends first (False)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.eof:
                return condition()
            if time.monotonic() > deadline:
                raise TimeoutError("scenario step timed out")
            self.changed = defer.Deferred()
            await self.changed.addTimeout(max(0.01, deadline - time.monotonic()), reactor)
        return True

    def abort(self) -> None:
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[union-attr]


class ClientFactoryFor(ClientFactory):
    def __init__(self, protocol: Scripted) -> None:
        self.p = protocol

    def buildProtocol(self, addr: object) -> Scripted:
        return self.p

    def clientConnectionFailed(self, connector: object, reason: Any) -> None:
        if not self.p.connected_d.called:
            self.p.connected_d.errback(reason.value)


class Chaos:
    SCENARIOS = (
        "abort-at-once",
        "partial-head-then-abort",
        "abort-while-waiting-for-101",
        "tunnel-then-client-abort",
        "tunnel-then-backend-abort",
        "backend-aborts-before-101",
        "keep-alive-requests",
        "abort-mid-response",
        "backend-aborts-mid-body",
        "abort-mid-upload",
        "tunnel-half-close",
    )

    def __init__(self, generator: Generator, port: int, rng: random.Random) -> None:
        self.generator = generator
        self.port = port
        self.rng = rng
        self.counts: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.violations: list[str] = []
        self.next_id = 0

    def violation(self, name: str, why: str) -> None:
        self.outcomes["violation"] += 1
        if len(self.violations) < 50:
            self.violations.append(f"{name}: {why}")

    async def run(self, seconds: float, concurrency: int) -> dict[str, Any]:
        stop_at = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < stop_at:
                await self.one()

        started = time.monotonic()
        await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)])
        return {
            "scenarios": sum(self.counts.values()),
            "by_scenario": dict(self.counts),
            "outcomes": dict(self.outcomes),
            "violations": self.violations,
            "seconds": time.monotonic() - started,
        }

    async def one(self) -> None:
        name = self.rng.choice(self.SCENARIOS)
        self.counts[name] += 1
        self.next_id += 1
        ident = self.next_id
        p = Scripted()
        reactor.connectTCP(HOST, self.port, ClientFactoryFor(p), timeout=10)
        try:
            await p.connected_d
            await getattr(self, "s_" + name.replace("-", "_"))(p, ident)
        except (TimeoutError, defer.TimeoutError):
            self.violation(name, "hung (no progress within 10 s)")
        except ConnectionError:
            self.outcomes["connect-failed"] += 1
        except Exception:
            self.violation(name, traceback.format_exc(limit=3))
        finally:
            p.abort()
            if p.transport is not None and not p.closed.called:
                await p.closed

    async def pause(self, most: float) -> None:
        await sleep(self.rng.uniform(0, most))

    def head_of(self, p: Scripted) -> bytes | None:
        end = p.buf.find(b"\r\n\r\n")
        return bytes(p.buf[: end + 4]) if end >= 0 else None

    # Each scenario: what the client does, and what it must (not) see.

    async def s_abort_at_once(self, p: Scripted, ident: int) -> None:
        p.abort()
        self.outcomes["aborted"] += 1

    async def s_partial_head_then_abort(self, p: Scripted, ident: int) -> None:
        head = b"GET /c/%d HTTP/1.1\r\nHost: soak\r\nX-Pad: 1234567890\r\n" % ident
        p.transport.write(head[: self.rng.randrange(1, len(head))])  # type: ignore[union-attr]
        await self.pause(0.1)
        if p.buf:
            self.violation("partial-head-then-abort", f"answer to half a head: {bytes(p.buf)!r}")
        self.outcomes["aborted"] += 1

    async def s_abort_while_waiting_for_101(self, p: Scripted, ident: int) -> None:
        p.transport.write(upgrade(f"/t/{ident}?act=delay-101") + b"early")  # type: ignore[union-attr]
        await self.pause(0.25)
        if p.buf and not p.buf.startswith(b"HTTP/1.1 101 "):
            self.violation("abort-while-waiting-for-101", f"not a 101: {bytes(p.buf[:80])!r}")
        self.outcomes["aborted"] += 1

    async def tunnel(self, p: Scripted, ident: int, query: str = "") -> bool:
        p.transport.write(upgrade(f"/t/{ident}{query}"))  # type: ignore[union-attr]
        await p.until(lambda: self.head_of(p) is not None)
        head = self.head_of(p)
        if head is None or not head.startswith(b"HTTP/1.1 101 "):
            self.violation("tunnel", f"no 101: {bytes(p.buf[:100])!r}")
            return False
        del p.buf[: len(head)]
        greeting = b"hello %d\n" % ident
        await p.until(lambda: len(p.buf) >= len(greeting))
        if bytes(p.buf[: len(greeting)]) != greeting:
            self.violation("tunnel", f"bad greeting {bytes(p.buf[:40])!r}")
            return False
        del p.buf[: len(greeting)]
        return True

    async def s_tunnel_then_client_abort(self, p: Scripted, ident: int) -> None:
        if not await self.tunnel(p, ident):
            return
        for _ in range(self.rng.randrange(0, 4)):
            payload = os.urandom(self.rng.randrange(1, 20000))
            p.transport.write(payload)  # type: ignore[union-attr]
            size = len(payload)
            if not await p.until(lambda size=size: len(p.buf) >= size):
                self.violation("tunnel-then-client-abort", "tunnel ended early")
                return
            if bytes(p.buf) != payload:
                self.violation("tunnel-then-client-abort", "echo differs")
                return
            p.buf.clear()
        p.transport.write(os.urandom(self.rng.randrange(1, 50000)))  # type: ignore[union-attr]
        await self.pause(0.05)
        self.outcomes["aborted in tunnel"] += 1

    async def s_tunnel_then_backend_abort(self, p: Scripted, ident: int) -> None:
        limit = self.rng.randrange(1, 30000)
        if not await self.tunnel(p, ident, f"?abort-after={limit}"):
            return
        sent = bytearray()
        for _ in range(2000):
            if p.eof:
                break
            payload = os.urandom(self.rng.randrange(1, 8000))
            sent += payload
            p.transport.write(payload)  # type: ignore[union-attr]
            await self.pause(0.01)
        await p.until(lambda: False, timeout=10)
        if bytes(p.buf) != bytes(sent[: len(p.buf)]) or len(p.buf) > limit:
            self.violation(
                "tunnel-then-backend-abort", f"not an echo prefix: {bytes(p.buf[:60])!r}"
            )
        else:
            self.outcomes["backend aborted tunnel"] += 1

    async def s_backend_aborts_before_101(self, p: Scripted, ident: int) -> None:
        p.transport.write(upgrade(f"/t/{ident}?act=abort-before-101"))  # type: ignore[union-attr]
        await p.until(lambda: False)
        if not p.buf.startswith(b"HTTP/1.1 502 "):
            self.violation("backend-aborts-before-101", f"expected 502: {bytes(p.buf[:80])!r}")
        else:
            self.outcomes["502"] += 1

    async def read_response(self, p: Scripted) -> bytes | None:
        await p.until(lambda: self.head_of(p) is not None)
        head = self.head_of(p)
        if head is None:
            return None
        length = 0
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await p.until(lambda: len(p.buf) >= len(head) + length)
        if len(p.buf) < len(head) + length:
            return None
        body = bytes(p.buf[len(head) : len(head) + length])
        del p.buf[: len(head) + length]
        return head + body

    async def s_keep_alive_requests(self, p: Scripted, ident: int) -> None:
        for _ in range(self.rng.randrange(1, 4)):
            size = self.rng.choice([0, 16, 5000])
            request = b"GET /c/%d?size=%d HTTP/1.1\r\nHost: soak\r\n\r\n" % (ident, size)
            p.transport.write(request)  # type: ignore[union-attr]
            response = await self.read_response(p)
            if response is None or not response.startswith(b"HTTP/1.1 200 "):
                self.violation("keep-alive-requests", f"bad response {response!r:.80}")
                return
            if not response.endswith((b"%d:" % ident + b"x" * size)[:size]):
                self.violation("keep-alive-requests", "wrong body")
                return
        self.outcomes["200"] += 1

    async def s_abort_mid_response(self, p: Scripted, ident: int) -> None:
        request = b"GET /c/%d?size=3000000 HTTP/1.1\r\nHost: soak\r\n\r\n" % ident
        p.transport.write(request)  # type: ignore[union-attr]
        await p.until(lambda: len(p.buf) > self.rng.randrange(1, 200000))
        self.outcomes["aborted mid-response"] += 1

    async def s_backend_aborts_mid_body(self, p: Scripted, ident: int) -> None:
        request = b"GET /c/%d?size=100000&act=abort-mid-body HTTP/1.1\r\nHost: soak\r\n\r\n" % ident
        p.transport.write(request)  # type: ignore[union-attr]
        await p.until(lambda: False)
        head = self.head_of(p)
        if head is not None and head.startswith(b"HTTP/1.1 502 ") and b"before" in p.buf:
            # The reset overtook the head: the proxy answered 502 "before
            # sending a response head", which is right too.
            self.outcomes["502"] += 1
        elif head is None or not head.startswith(b"HTTP/1.1 200 "):
            self.violation("backend-aborts-mid-body", f"expected a 200 head: {bytes(p.buf[:80])!r}")
        elif len(p.buf) - len(head) >= 100000 or b"HTTP/1.1" in p.buf[len(head) :]:
            self.violation(
                "backend-aborts-mid-body", "the cut body was completed or had HTTP in it"
            )
        else:
            self.outcomes["cut short"] += 1

    async def s_abort_mid_upload(self, p: Scripted, ident: int) -> None:
        size = 2_000_000
        head = b"POST /c/%d HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n" % (ident, size)
        p.transport.write(head + os.urandom(self.rng.randrange(0, size)))  # type: ignore[union-attr]
        await self.pause(0.05)
        self.outcomes["aborted mid-upload"] += 1

    async def s_tunnel_half_close(self, p: Scripted, ident: int) -> None:
        if not await self.tunnel(p, ident):
            return
        payload = os.urandom(self.rng.randrange(1, 30000))
        p.transport.write(payload)  # type: ignore[union-attr]
        p.transport.loseWriteConnection()  # type: ignore[union-attr]
        await p.until(lambda: False)
        if bytes(p.buf) != payload:
            self.violation("tunnel-half-close", f"echo after EOF: {len(p.buf)} of {len(payload)}")
        else:
            self.outcomes["half-closed cleanly"] += 1


def run_clients(params: dict[str, Any], watch: LogWatch) -> tuple[dict[str, Any], dict[str, Any]]:
    g = Generator()

    def wrap(f: Callable[..., Any]) -> Callable[..., defer.Deferred[Any]]:
        return lambda **kw: defer.ensureDeferred(f(**kw))

    return (
        {
            "open": wrap(g.open),
            "traffic": wrap(g.traffic),
            "close": wrap(g.close),
            "open_floods": wrap(g.open_floods),
            "flood_progress": g.flood_progress,
            "drain_floods": wrap(g.drain_floods),
            "chaos": wrap(g.chaos),
            "stats": lambda: {**g.stats(), **watch.report()},
        },
        {},
    )


ROLES = {"proxy": run_proxy, "backend": run_backend, "clients": run_clients}


def main() -> None:
    role, params = sys.argv[1], json.loads(sys.argv[2])
    limit = raise_nofile()
    watch = LogWatch()
    globalLogBeginner.beginLoggingTo([watch], redirectStandardIO=False)
    commands, ready = ROLES[role](params, watch)
    commands["measure"] = measure
    stdio.StandardIO(Control(commands, {**ready, "pid": os.getpid(), "nofile": limit}))
    reactor.run()


if __name__ == "__main__":
    main()
