"""Helpers for the tests that run over real loopback sockets (127.0.0.1 only).

The pieces:

- :class:`Loopback` (the ``loopback`` fixture in ``conftest.py``) starts
  scripted backends and proxies, opens client sockets, and closes all of
  them when the test ends.
- :class:`BackendServer` / :class:`LoopbackBackendConnection`: a backend written as a
  Twisted protocol that records every byte it receives. A test either drives
  each connection by hand (``conn.transport.write(...)`` -- one call, one
  ``send()``) or gives the server a *script*, called after every read.
- :class:`Client`: a plain blocking socket with a read buffer, for precise
  control of what goes into each ``send()``. Its blocking calls run in a
  thread through :meth:`Loopback.run`, never in the reactor thread (except
  small sends, which the kernel buffers at once).

Every wait is bounded: :func:`wait` and :meth:`Loopback.run` time out, and
client sockets have socket timeouts so that no thread can hang.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import h11
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from upgradeproxy import ProxyFactory

HOST = "127.0.0.1"
TIMEOUT = 5.0
HEAD_END = b"\r\n\r\n"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

T = TypeVar("T")


async def wait(d: Deferred[T], timeout: float = TIMEOUT) -> T:
    """Wait for ``d``, failing with ``TimeoutError`` after ``timeout`` seconds."""
    return await d.addTimeout(timeout, reactor)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def eventually(
    condition: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition"
) -> None:
    """Poll ``condition`` every 10 ms until it holds; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(0.01)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- parsing heads in the tests (independent of the proxy's own parser) ----------


@dataclass
class Head:
    """A request or response head as bytes, split into its parts."""

    raw: bytes
    start_line: bytes
    fields: list[tuple[bytes, bytes]]

    @classmethod
    def parse(cls, raw: bytes) -> Head:
        assert raw.endswith(HEAD_END), raw
        lines = raw[: -len(HEAD_END)].split(b"\r\n")
        fields = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields.append((name, value.strip(b" \t")))
        return cls(raw, lines[0], fields)

    @property
    def status(self) -> int:
        return int(self.start_line.split(b" ")[1])

    @property
    def method(self) -> bytes:
        return self.start_line.split(b" ")[0]

    @property
    def target(self) -> bytes:
        return self.start_line.split(b" ")[1]

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.fields if n.lower() == name.lower()]

    def get(self, name: bytes) -> bytes | None:
        values = self.get_all(name)
        assert len(values) <= 1, f"{name!r} appears {len(values)} times in {self.raw!r}"
        return values[0] if values else None

    def tokens(self, name: bytes) -> list[bytes]:
        return [
            t.strip(b" \t").lower() for v in self.get_all(name) for t in v.split(b",") if t.strip()
        ]

    def has(self, name: bytes) -> bool:
        return bool(self.get_all(name))


def dechunk(body: bytes) -> bytes:
    """Decode a complete chunked body (no trailers expected)."""
    out = bytearray()
    pos = 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            assert body[pos:] == b"\r\n", f"unexpected trailer or junk: {body[pos:]!r}"
            return bytes(out)
        out += body[pos : pos + size]
        assert body[pos + size : pos + size + 2] == b"\r\n"
        pos += size + 2


def upgrade_request(
    protocol: bytes = b"websocket", target: bytes = b"/socket", extra: bytes = b""
) -> bytes:
    """An upgrade request head; a WebSocket one carries a valid key and version."""
    head = (
        b"GET " + target + b" HTTP/1.1\r\n"
        b"Host: app.example\r\n"
        b"Connection: Upgrade\r\n"
        b"Upgrade: " + protocol + b"\r\n"
    )
    if protocol == b"websocket":
        head += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    return head + extra + b"\r\n"


def switching_response(
    request_head: bytes,
    *,
    protocol: bytes | None = None,
    connection: bytes | None = b"Upgrade",
) -> bytes:
    """A ``101`` head for ``request_head``; ``connection=None`` leaves Connection out."""
    request = Head.parse(request_head)
    if protocol is None:
        protocol = request.get_all(b"upgrade")[0].split(b",")[0].strip()
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + protocol + b"\r\n"
    if connection is not None:
        head += b"Connection: " + connection + b"\r\n"
    key = request.get(b"sec-websocket-key")
    if key is not None:
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        head += b"Sec-WebSocket-Accept: " + accept + b"\r\n"
    return head + b"\r\n"


# -- the scripted backend ------------------------------------------------------------

Script = Callable[["LoopbackBackendConnection", bytes], None]


@implementer(IHalfCloseableProtocol)
class LoopbackBackendConnection(Protocol):
    """One backend connection: records what it receives, writes what it is told to.

    ``head`` is the first request head received; ``head_received`` fires with
    it. ``eof`` fires when the proxy closes (or half-closes) towards it
    (``readConnectionLost``); the connection then closes too, unless the
    server has an ``on_eof`` handler. ``closed`` fires when the connection is
    gone, with ``close_reason`` set.
    """

    def __init__(self, server: BackendServer) -> None:
        self.server = server
        self.received = bytearray()
        self.head: bytes | None = None
        self.head_received: Deferred[bytes] = Deferred()
        self.eof: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.close_reason: Failure | None = None
        self.state: dict[str, Any] = {}  # for scripts
        #: True once an EOF came through ``readConnectionLost`` (a FIN, the
        #: connection still open for writing) rather than with ``connectionLost``.
        self.half_closed = False
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def connectionMade(self) -> None:
        self.server.connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.head is None:
            end = self.received.find(HEAD_END)
            if end >= 0:
                self.head = bytes(self.received[: end + len(HEAD_END)])
                self.head_received.callback(self.head)
        self._check_waiters()
        if self.server.script is not None and self.transport is not None:
            self.server.script(self, data)

    def readConnectionLost(self) -> None:
        self.half_closed = True
        self.eof.callback(None)
        if self.server.on_eof is not None:
            self.server.on_eof(self)
        else:  # like most servers: the peer is done, so are we
            assert self.transport is not None
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if not self.eof.called:
            self.eof.callback(None)
        self.close_reason = reason
        self.closed.callback(None)
        self._check_waiters()

    @property
    def after_head(self) -> bytes:
        """Every byte received after the first request head."""
        assert self.head is not None
        return bytes(self.received[len(self.head) :])

    def wait_for(self, marker: bytes, timeout: float = TIMEOUT) -> Deferred[None]:
        """Fires once ``marker`` has been received (anywhere)."""
        return self._wait(lambda: marker in self.received, timeout)

    def wait_for_bytes(self, n: int, timeout: float = TIMEOUT) -> Deferred[None]:
        """Fires once ``n`` bytes have been received after the first head."""
        return self._wait(
            lambda: self.head is not None and len(self.received) - len(self.head) >= n, timeout
        )

    def _wait(self, condition: Callable[[], bool], timeout: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if condition():
            d.callback(None)
        else:
            self._waiters.append((condition, d))
        return d.addTimeout(timeout, reactor)

    def _check_waiters(self) -> None:
        for waiter in list(self._waiters):
            condition, d = waiter
            if d.called:
                self._waiters.remove(waiter)
            elif condition():
                self._waiters.remove(waiter)
                d.callback(None)
            elif self.closed.called:
                self._waiters.remove(waiter)
                d.errback(
                    AssertionError(f"backend connection closed; it received {self.received!r}")
                )

    def reset(self) -> None:
        """Close with RST: SO_LINGER 0, then close."""
        assert self.transport is not None
        handle = self.transport.getHandle()  # type: ignore[attr-defined]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abortConnection()  # type: ignore[attr-defined]


class BackendServer(Factory):
    """A listening scripted backend; ``connections`` in the order they were accepted."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script
        self.on_eof: Callable[[LoopbackBackendConnection], None] | None = None
        self.connections: list[LoopbackBackendConnection] = []
        self._connection_waiters: list[tuple[int, Deferred[LoopbackBackendConnection]]] = []
        self.port: IListeningPort | None = None

    def buildProtocol(self, addr: object) -> LoopbackBackendConnection:
        return LoopbackBackendConnection(self)

    @property
    def port_number(self) -> int:
        assert self.port is not None
        return int(self.port.getHost().port)

    def connection_made(self, connection: LoopbackBackendConnection) -> None:
        self.connections.append(connection)
        for waiter in list(self._connection_waiters):
            index, d = waiter
            if index < len(self.connections):
                self._connection_waiters.remove(waiter)
                d.callback(self.connections[index])

    def connection(
        self, index: int = 0, timeout: float = TIMEOUT
    ) -> Deferred[LoopbackBackendConnection]:
        """Fires with the ``index``-th accepted connection (counting from 0)."""
        d: Deferred[LoopbackBackendConnection] = Deferred()
        if index < len(self.connections):
            d.callback(self.connections[index])
        else:
            self._connection_waiters.append((index, d))
        return d.addTimeout(timeout, reactor)


def reply_to_each_head(respond: Callable[[Head], bytes]) -> Script:
    """A script for requests without bodies: answer every complete head, in order.

    ``respond`` gets the parsed head and returns the whole response, which is
    written in one ``transport.write``.
    """

    def script(conn: LoopbackBackendConnection, data: bytes) -> None:
        done = conn.state.setdefault("answered_up_to", 0)
        while True:
            end = conn.received.find(HEAD_END, done)
            if end < 0:
                break
            head = Head.parse(bytes(conn.received[done : end + len(HEAD_END)]))
            done = end + len(HEAD_END)
            conn.state["answered_up_to"] = done
            assert conn.transport is not None
            conn.transport.write(respond(head))

    return script


def echo_app(conn: LoopbackBackendConnection, data: bytes) -> None:
    """A script: answers a plain request with a short page naming its target; answers
    an upgrade request with ``101`` and then echoes every byte back."""
    assert conn.transport is not None
    if conn.state.get("tunnel"):
        conn.transport.write(data)
        return
    if conn.head is None or conn.state.get("answered"):
        return
    head = Head.parse(conn.head)
    if b"upgrade" in head.tokens(b"connection"):
        conn.state["tunnel"] = True
        conn.transport.write(switching_response(conn.head) + conn.after_head)
        return
    conn.state["answered"] = True
    body = b"you asked for " + head.target
    conn.transport.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body)
    )
    conn.transport.loseConnection()


# -- the blocking client ------------------------------------------------------------


@dataclass
class Response:
    """A response read by :meth:`Client.read_response`."""

    status: int
    headers: list[tuple[bytes, bytes]]  # as sent, in order, spelling kept
    body: bytes
    raw: bytes  # every byte of the response, interim responses included
    interim: list[int] = field(default_factory=list)

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def get(self, name: bytes) -> bytes | None:
        values = self.get_all(name)
        assert len(values) <= 1, f"{name!r} appears {len(values)} times"
        return values[0] if values else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class Client:
    """A blocking client socket with a read buffer. Call its methods in a thread."""

    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False

    def send_once(self, data: bytes) -> None:
        """Send ``data`` in exactly one ``send()`` call."""
        sent = self.sock.send(data)
        assert sent == len(data), f"send() took {sent} of {len(data)} bytes"

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Read once into the buffer; False at EOF."""
        if self.eof:
            return False
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def peek_until(self, marker: bytes) -> bytes:
        """Read until ``marker`` is in the buffer; return the buffer, consuming nothing."""
        while marker not in self.buf:
            if not self._fill():
                raise AssertionError(f"EOF before {marker!r}; received {bytes(self.buf)!r}")
        return bytes(self.buf)

    def recv_until(self, marker: bytes) -> bytes:
        """Read and consume everything up to and including ``marker``."""
        self.peek_until(marker)
        end = self.buf.index(marker) + len(marker)
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def recv_head(self) -> Head:
        return Head.parse(self.recv_until(HEAD_END))

    def recv_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise AssertionError(
                    f"EOF after {len(self.buf)} of {n} bytes: {bytes(self.buf)[:200]!r}"
                )
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv_to_eof(self, allow_reset: bool = False) -> bytes:
        """Everything until the peer closes; a reset is an error unless allowed."""
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            if not allow_reset:
                raise
            self.eof = True
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with RST: SO_LINGER 0, then close."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def read_response(self, method: bytes = b"GET") -> Response:
        """Read one response (with any interim ones before it), framed by h11.

        Bytes after the response stay in the buffer for the next read.
        """
        conn = h11.Connection(h11.CLIENT)
        # h11 needs the request to know the response's framing; only the
        # method matters for that.
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "proxy")]))
        conn.send(h11.EndOfMessage())
        fed = bytearray(self.buf)
        if self.buf:  # (h11 takes b"" for EOF)
            conn.receive_data(bytes(self.buf))
        if self.eof:
            conn.receive_data(b"")
        self.buf.clear()
        interim: list[int] = []
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise AssertionError(f"bad response ({e}); received {bytes(fed)!r}") from None
            if event is h11.NEED_DATA:
                data = b"" if self.eof else self.sock.recv(65536)
                if not data:
                    self.eof = True
                fed += data
                conn.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                interim.append(event.status_code)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = list(event.headers.raw_items())
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}; received {bytes(fed)!r}")
        leftover, _closed = conn.trailing_data
        self.buf += leftover
        raw = bytes(fed[: len(fed) - len(leftover)])
        return Response(status, headers, bytes(body), raw, interim)


# -- the harness --------------------------------------------------------------------


@dataclass
class Proxy:
    factory: ProxyFactory
    port: int


class Loopback:
    """Starts backends, proxies and clients for one test, and closes them all."""

    def __init__(self) -> None:
        #: Keyword arguments every :meth:`proxy` gets unless it is given its own.
        self.proxy_defaults: dict[str, Any] = {}
        self._ports: list[IListeningPort] = []
        self.backends: list[BackendServer] = []
        self.proxies: list[Proxy] = []
        self.clients: list[Client] = []

    def backend(self, script: Script | None = None) -> BackendServer:
        server = BackendServer(script)
        server.port = reactor.listenTCP(0, server, interface=HOST)
        self._ports.append(server.port)
        self.backends.append(server)
        return server

    def proxy(self, backend_port: int, **kwargs: Any) -> Proxy:
        """A :class:`ProxyFactory` to ``127.0.0.1:backend_port``, listening on 127.0.0.1."""
        kwargs = {**self.proxy_defaults, **kwargs}
        factory = ProxyFactory(TCP4ClientEndpoint(reactor, HOST, backend_port), **kwargs)
        port = reactor.listenTCP(0, factory, interface=HOST)
        self._ports.append(port)
        proxy = Proxy(factory, port.getHost().port)
        self.proxies.append(proxy)
        return proxy

    def listen(self, proxy: ProxyFactory, factory: Any = None) -> Proxy:
        """Listen on 127.0.0.1 with ``factory`` (a wrapper around ``proxy``, or ``proxy``)."""
        port = reactor.listenTCP(0, factory or proxy, interface=HOST)
        self._ports.append(port)
        listening = Proxy(proxy, port.getHost().port)
        self.proxies.append(listening)
        return listening

    def client(self, port: int, timeout: float = TIMEOUT) -> Client:
        """A connected client socket (connecting to a loopback listener does not block)."""
        client = Client(port, timeout)
        self.clients.append(client)
        return client

    def run(self, f: Callable[..., T], *args: Any, timeout: float = TIMEOUT) -> Deferred[T]:
        """Run a blocking call in a thread, bounded by ``timeout`` seconds."""
        return deferToThread(f, *args).addTimeout(timeout, reactor)

    async def close(self) -> None:
        """Close every socket, connection and listener this test opened."""
        for client in self.clients:
            client.close()
        for proxy in self.proxies:
            for tunnel in list(proxy.factory.proxy.tunnels):
                tunnel.close()
            for connection in list(proxy.factory.proxy.connections):
                if connection.transport is not None:
                    connection.transport.abortConnection()  # type: ignore[attr-defined]
            proxy.factory.proxy.pool.close_idle()
        pending = []
        for server in self.backends:
            for conn in server.connections:
                if not conn.closed.called:
                    assert conn.transport is not None
                    conn.transport.abortConnection()  # type: ignore[attr-defined]
                    pending.append(conn.closed)
        pending.extend(port.stopListening() for port in self._ports)
        await DeferredList(pending).addTimeout(TIMEOUT, reactor)
        # The proxies' backend connections close once their client side has:
        # wait for that here, while the reactor runs, so that no backend
        # outside this harness is left waiting for a FIN.
        await eventually(
            lambda: all(
                not p.factory.proxy.connections and not p.factory.proxy.tunnels
                for p in self.proxies
            ),
            what="the proxies' connections and tunnels to close",
        )
