"""Faults at every stage of an exchange, and what each side sees.

For each fault: what the other side gets (an error response that names the
problem, a response cut short, an EOF, nothing HTTP inside a tunnel), and
that the proxy keeps nothing behind: no client connection, no tunnel, no
backend connection outside the idle pool, no timer but the pool's idle
timers, and no reference to the dead connections (they are garbage once the
test drops its own references: their buffers go with them).

Most faults run in memory (``ProxyHarness``). Those where a real socket
matters -- resets, half-close, a backend that stops reading a large upload
-- run over loopback, with both tunnel relays (splice and Python) where a
tunnel is involved, and a clock that records the proxy's own timers.
"""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from loopback import (
    Client,
    Loopback,
    LoopbackBackendConnection,
    eventually,
    sleep,
    switching_response,
    upgrade_request,
    wait,
)
from twisted.internet import reactor
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from twisted.logger import globalLogBeginner, globalLogPublisher
from zope.interface import implementer

from upgradeproxy import BackendSettings, ProxyFactory, ProxySettings
from upgradeproxy.core import _splice as splice
from upgradeproxy.testing import ProxyHarness

GET = b"GET /page HTTP/1.1\r\nHost: a\r\n\r\n"
UPGRADE = b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n"


def error_body(received: bytes, status: int) -> str:
    """The body of the one error response in ``received``, checking its status."""
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), received
    assert b"\r\nConnection: close" in head, head
    return body.decode()


@pytest.fixture(autouse=True)
def no_log_history() -> Iterator[None]:
    """Keep Twisted from holding on to this test's log events.

    Until logging begins (twistd begins it at start-up; pytest never does),
    Twisted keeps the last 64 Ki events in memory, and every event references
    the object that logged it: a dead connection would look alive. The
    attribute is private, hence the care.
    """
    history = getattr(globalLogBeginner, "_temporaryObserver", None)
    if history is None:
        yield
        return
    globalLogPublisher.removeObserver(history)
    try:
        yield
    finally:
        globalLogPublisher.addObserver(history)


def assert_nothing_left(h: ProxyHarness) -> None:
    """No connection, tunnel, open backend (but idle pooled ones) or timer is left.

    Then every dead connection must be garbage: the proxy keeps no
    reference to it, nor to its buffers. (The calling test must hold no
    reference of its own either: it deletes its locals first.)
    """
    assert h.factory.proxy.connections == set()
    assert not h.factory.proxy.tunnels
    idle = h.factory.proxy.pool.idle_count
    open_backends = sum(not b.closed for b in h.endpoint.connections)
    assert open_backends == idle, "a backend connection outside the pool is still open"
    assert len(h.clock.getDelayedCalls()) == idle, h.clock.getDelayedCalls()
    h.clock.advance(h.factory.proxy.pool.settings.idle_timeout)
    assert all(b.closed for b in h.endpoint.connections)
    assert h.clock.getDelayedCalls() == []

    refs = [weakref.ref(h.client)] + [weakref.ref(b.protocol) for b in h.endpoint.connections]
    factory, clock = h.factory, h.clock
    h.endpoint.connections.clear()  # the test's own references
    h.client = h.client_transport = None  # type: ignore[assignment]
    del h
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert alive == [], f"the proxy still references {alive} ({factory}, {clock})"


# -- the backend cannot be reached -------------------------------------------------------


def test_a_refused_backend_gets_502_naming_it_and_nothing_is_left() -> None:
    h = ProxyHarness()
    h.endpoint.refuse = True
    h.client_sends(GET)
    text = error_body(h.client_received, 502)
    assert "the backend (scripted backend) could not be reached" in text
    assert "scripted refusal" in text
    assert h.client_closed
    assert_nothing_left(h)


def test_a_client_gone_while_the_backend_connects_leaves_only_an_idle_connection() -> None:
    h = ProxyHarness()
    h.endpoint.hold_connections = True
    h.client_sends(GET)
    h.client_transport.loseConnection()
    h.endpoint.complete_connection()
    assert h.backend.received == b"", "no request for a client that is gone"
    assert h.factory.proxy.pool.idle_count == 1
    assert_nothing_left(h)


# -- the backend closes before, in the middle of, and after its response head ------------


@pytest.mark.parametrize("how", ["eof", "close", "reset"])
@pytest.mark.parametrize("request_bytes", [GET, UPGRADE], ids=["get", "upgrade"])
def test_a_backend_that_closes_before_its_head_gets_502(request_bytes: bytes, how: str) -> None:
    h = ProxyHarness(validators=[])
    h.client_sends(request_bytes)
    backend = h.backend
    {"eof": backend.transport.eof, "close": backend.transport.loseConnection}.get(
        how, backend.transport.reset
    )()
    text = error_body(h.client_received, 502)
    assert "before sending a response head" in text
    words = {"eof": "closed the connection", "close": "closed", "reset": "connection lost"}
    assert words[how] in text
    assert h.client_closed and backend.closed
    assert len(h.endpoint.connections) == 1, "a fresh connection is not retried"
    del backend
    assert_nothing_left(h)


@pytest.mark.parametrize("cut", [1, 9, 17, 30])
def test_a_backend_that_closes_in_the_middle_of_its_head_gets_502_and_no_partial_head(
    cut: int,
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(head[:cut])
    h.backend.transport.loseConnection()
    text = error_body(h.client_received, 502)
    assert "before sending a response head" in text
    assert h.client_received.count(b"HTTP/1.1") == 1, "nothing of the partial head is relayed"
    assert_nothing_left(h)


@pytest.mark.parametrize(
    ("response", "relayed_body"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"", id="length-none"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n1234", b"1234", id="length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n1234\r\n2\r\n56",
            b"4\r\n1234\r\n2\r\n56\r\n",
            id="chunked",
        ),
    ],
)
@pytest.mark.parametrize("how", ["eof", "reset"])
def test_a_backend_that_closes_after_its_head_cuts_the_response_short(
    response: bytes, relayed_body: bytes, how: str
) -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(response)
    if how == "eof":
        h.backend.transport.eof()
    else:
        h.backend.transport.reset()
    head, _, body = h.client_received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    # Exactly what the backend sent, re-framed: no error text, no last chunk.
    assert body == relayed_body
    assert h.client_closed, "closing is the only honest signal left"
    assert_nothing_left(h)


def test_a_close_delimited_body_ends_normally_at_the_backends_eof() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.backend.send(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    h.backend.transport.eof()
    assert h.client_received.endswith(b"9\r\nall of it\r\n0\r\n\r\n")
    assert not h.client_closed
    h.client_transport.loseConnection()
    assert_nothing_left(h)


def test_a_backend_closing_an_idle_pooled_connection_leaves_no_timer() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    first = h.backend
    first.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.factory.proxy.pool.idle_count == 1
    first.transport.loseConnection()
    assert h.factory.proxy.pool.idle_count == 0
    h.client_sends(GET)
    assert len(h.endpoint.connections) == 2
    h.backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    h.client_transport.loseConnection()
    del first
    assert_nothing_left(h)


def test_a_backend_that_never_answers_gets_504_and_its_connection_is_aborted() -> None:
    h = ProxyHarness(settings=ProxySettings(backend=BackendSettings(response_timeout=3)))
    h.client_sends(UPGRADE)
    h.clock.advance(3)
    assert "no response head within 3 seconds" in error_body(h.client_received, 504)
    assert h.backend.closed
    assert_nothing_left(h)


# -- the client goes away while the backend answers -----------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("stage", ["before-head", "mid-body", "mid-upload"])
def test_a_client_that_disappears_mid_exchange_drops_the_backend_connection(
    stage: str, how: str
) -> None:
    h = ProxyHarness()
    if stage == "mid-upload":
        h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
    else:
        h.client_sends(GET)
    backend = h.backend
    if stage == "mid-body":
        backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
    if how == "close":
        h.client_transport.loseConnection()
    else:
        h.client_transport.reset()
    assert backend.closed, "a half-done exchange cannot go back to the pool"
    assert h.factory.proxy.pool.idle_count == 0
    del backend
    assert_nothing_left(h)


def test_a_client_that_half_closes_after_a_complete_request_still_gets_its_answer() -> None:
    h = ProxyHarness()
    h.client_sends(GET)
    h.client_transport.eof()
    h.backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.client_received.endswith(b"\r\n\r\nok")
    assert h.client_closed
    assert_nothing_left(h)


# -- faults inside a tunnel (in memory) ------------------------------------------------


def tunnel() -> ProxyHarness:
    h = ProxyHarness()
    h.client_sends(UPGRADE + b"early")
    h.backend.send(SWITCH + b"hello")
    assert len(h.factory.proxy.tunnels) == 1
    return h


@pytest.mark.parametrize("side", ["client", "backend"])
def test_a_reset_inside_a_tunnel_closes_the_other_side_with_no_http(side: str) -> None:
    h = tunnel()
    to_client, to_backend = h.client_received, h.backend.received
    if side == "client":
        h.client_transport.reset()
        assert h.backend.closed
    else:
        h.backend.transport.reset()
        assert h.client_closed
    assert h.client_received == to_client and h.backend.received == to_backend
    assert_nothing_left(h)


@pytest.mark.parametrize("side", ["client", "backend"])
def test_a_half_close_inside_a_tunnel_reaches_the_other_side_which_may_still_talk(
    side: str,
) -> None:
    h = tunnel()
    if side == "client":
        h.client_transport.eof()
        assert h.backend.transport.write_closed and not h.backend.closed
        h.backend.send(b"reply")
        assert h.client_received.endswith(b"reply")
        h.backend.transport.eof()
    else:
        h.backend.transport.eof()
        assert h.client_transport.write_closed and not h.client_closed
        h.client_sends(b"reply")
        assert h.backend.received.endswith(b"reply")
        h.client_transport.eof()
    assert h.client_closed and h.backend.closed
    assert_nothing_left(h)


def test_a_backend_that_switches_and_closes_at_once_still_delivers_its_bytes() -> None:
    h = ProxyHarness()
    h.client_sends(UPGRADE)
    h.backend.send(SWITCH + b"last words")
    h.backend.transport.loseConnection()
    assert h.client_received.endswith(b"\r\n\r\nlast words")
    assert h.client_closed
    assert_nothing_left(h)


# -- over loopback: real resets, real half-close, real backpressure -------------------


@implementer(IReactorTime, IReactorFDSet)
class TrackingClock:
    """The reactor, as the proxy's clock, recording every timer the proxy starts."""

    def __init__(self) -> None:
        self.calls: list[IDelayedCall] = []

    def callLater(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> IDelayedCall:
        call = reactor.callLater(delay, f, *args, **kwargs)
        self.calls.append(call)
        return call

    def pending(self) -> list[IDelayedCall]:
        return [c for c in self.calls if c.active()]

    def __getattr__(self, name: str) -> Any:
        # seconds, getDelayedCalls, addReader, removeReader, addWriter, ...
        return getattr(reactor, name)


@pytest.fixture(params=["splice", "python"])
def relay(request: pytest.FixtureRequest, loopback: Loopback) -> str:
    if request.param == "splice" and not splice.AVAILABLE:
        pytest.skip("splice(2) is not available here")
    loopback.proxy_defaults["settings"] = ProxySettings(splice=request.param == "splice")
    return str(request.param)


async def proxy_is_empty(factory: ProxyFactory, clock: TrackingClock) -> None:
    """The proxy's own counts return to zero, and it has no timer left but idle ones."""
    await eventually(
        lambda: not factory.proxy.connections and not factory.proxy.tunnels,
        timeout=3,
        what="the proxy's connections and tunnels to close",
    )
    assert len(clock.pending()) == factory.proxy.pool.idle_count


async def switched(
    loopback: Loopback,
) -> tuple[Client, LoopbackBackendConnection, ProxyFactory, Any]:
    clock = TrackingClock()
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number, clock=clock, validators=[])
    client = loopback.client(proxy.port)
    client.send_once(upgrade_request(b"foo"))
    conn = await backend.connection()
    head = await wait(conn.head_received)
    conn.transport.write(switching_response(head))
    assert (await loopback.run(client.recv_head)).status == 101
    await eventually(lambda: len(proxy.factory.proxy.tunnels) == 1, what="the tunnel")
    return client, conn, proxy.factory, clock


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_loopback_client_reset_in_a_tunnel_closes_the_backend(
    loopback: Loopback, relay: str
) -> None:
    client, conn, factory, clock = await switched(loopback)
    client.send_once(b"ping")
    await conn.wait_for(b"ping")
    client.reset()
    await wait(conn.closed)
    assert conn.after_head == b"ping"
    await proxy_is_empty(factory, clock)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_loopback_backend_reset_in_a_busy_tunnel_writes_no_http_to_the_client(
    loopback: Loopback, relay: str
) -> None:
    client, conn, factory, clock = await switched(loopback)
    conn.transport.write(b"y" * 200_000)
    await sleep(0.01)
    conn.reset()
    after = await loopback.run(client.recv_to_eof, True)
    assert set(after) <= {ord("y")}, "only tunnel bytes, never HTTP"
    await proxy_is_empty(factory, clock)


@pytest.mark.loopback
@pytest.mark.parametrize("first", ["client", "backend"])
@pytest_twisted.ensureDeferred
async def test_loopback_half_close_either_way_then_the_other_side_finishes(
    loopback: Loopback, relay: str, first: str
) -> None:
    client, conn, factory, clock = await switched(loopback)
    if first == "client":
        conn.server.on_eof = lambda c: None  # keep talking after the client's EOF
        client.send_once(b"request")
        client.shutdown_write()
        await wait(conn.eof)
        assert conn.half_closed and conn.after_head == b"request"
        conn.transport.write(b"answer after EOF")
        conn.transport.loseConnection()
        assert await loopback.run(client.recv_to_eof) == b"answer after EOF"
    else:
        conn.transport.write(b"all from the backend")
        conn.transport.loseWriteConnection()
        assert await loopback.run(client.recv_to_eof) == b"all from the backend"
        client.sendall(b"the client still talks")
        await conn.wait_for(b"the client still talks")
        client.shutdown_write()
        await wait(conn.closed)
    await proxy_is_empty(factory, clock)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_loopback_backend_reset_mid_body_cuts_the_response_short(
    loopback: Loopback,
) -> None:
    clock = TrackingClock()
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number, clock=clock)
    client = loopback.client(proxy.port)
    client.send_once(GET)
    conn = await backend.connection()
    await wait(conn.head_received)
    conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"z" * 1000)
    await sleep(0.05)
    conn.reset()
    received = await loopback.run(client.recv_to_eof, True)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert set(body) <= {ord("z")} and len(body) <= 1000, "no error text in a started body"
    await proxy_is_empty(proxy.factory, clock)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_loopback_client_reset_mid_response_closes_the_backend_connection(
    loopback: Loopback,
) -> None:
    clock = TrackingClock()
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number, clock=clock)
    client = loopback.client(proxy.port)
    client.send_once(GET)
    conn = await backend.connection()
    await wait(conn.head_received)
    conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
    for _ in range(20):
        conn.transport.write(b"w" * 65536)
    await loopback.run(client.recv_exactly, 1000)
    client.reset()
    await wait(conn.closed)
    assert proxy.factory.proxy.pool.idle_count == 0
    await proxy_is_empty(proxy.factory, clock)


UPLOAD = 64 * 1024 * 1024
#: The most the proxy may hold of an upload its backend does not read: about
#: one read from the client (64 KiB) plus the backend transport's buffer
#: before it pauses its producer (64 KiB), with room for transient copies.
UPLOAD_BOUND = 1024 * 1024


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_loopback_a_backend_that_stops_reading_pauses_the_client_in_bounded_memory(
    loopback: Loopback,
) -> None:
    clock = TrackingClock()
    backend = loopback.backend()
    proxy = loopback.proxy(backend.port_number, clock=clock)
    client = loopback.client(proxy.port, timeout=30)
    payload = os.urandom(UPLOAD)
    client.send_once(b"PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % UPLOAD)
    conn = await backend.connection()
    await wait(conn.head_received)
    conn.transport.pauseProducing()  # the backend stops reading

    sent = [0]
    done = threading.Event()

    def upload() -> None:
        view = memoryview(payload)
        while sent[0] < UPLOAD:
            sent[0] += client.sock.send(view[sent[0] : sent[0] + 65536])
        done.set()

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        uploading = loopback.run(upload, timeout=60)
        # Wait until the client is stuck: no progress for half a second.
        last, stalled_since = -1, time.monotonic()
        while time.monotonic() - stalled_since < 0.5:
            await sleep(0.05)
            if sent[0] != last:
                last, stalled_since = sent[0], time.monotonic()
        growth = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    stuck_at = sent[0]
    assert stuck_at < UPLOAD / 2, f"the client was not paused: it sent {stuck_at} bytes"
    assert growth < UPLOAD_BOUND, f"the proxy held {growth} bytes of the upload"
    print(f"upload paused after {stuck_at} bytes; proxy memory grew by at most {growth} bytes")

    conn.transport.resumeProducing()
    await uploading
    assert done.is_set()
    await conn.wait_for_bytes(UPLOAD, timeout=30)
    assert hashlib.sha256(conn.after_head).digest() == hashlib.sha256(payload).digest()
    conn.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert (await loopback.run(client.read_response, b"PUT")).status == 204
    client.close()
    await proxy_is_empty(proxy.factory, clock)


@pytest.mark.loopback
@pytest.mark.skipif(not splice.AVAILABLE, reason="splice(2) is not available here")
@pytest_twisted.ensureDeferred
async def test_loopback_a_client_reset_just_before_a_spliced_switch_ends_the_tunnel(
    loopback: Loopback,
) -> None:
    # The proxy stops reading a client whose early bytes pass max_held_bytes,
    # so it cannot see that client's reset; the backend's 101 then starts a
    # spliced tunnel whose first send (the 101 itself) fails at once.
    clock = TrackingClock()
    backend = loopback.backend()
    proxy = loopback.proxy(
        backend.port_number,
        clock=clock,
        validators=[],
        settings=ProxySettings(splice=True, max_held_bytes=1000),
    )
    client = loopback.client(proxy.port)
    client.send_once(upgrade_request(b"foo") + b"x" * 5000)
    conn = await backend.connection()
    head = await wait(conn.head_received)
    await sleep(0.1)  # the proxy has read it all and stopped reading
    client.reset()
    await sleep(0.1)
    conn.transport.write(switching_response(head))
    await wait(conn.closed)
    try:
        await proxy_is_empty(proxy.factory, clock)
    finally:
        # A leaked tunnel would also fail the fixture's clean-up.
        proxy.factory.proxy.tunnels.clear()


@pytest.mark.loopback
@pytest.mark.skipif(not splice.AVAILABLE, reason="splice(2) is not available here")
@pytest_twisted.ensureDeferred
async def test_loopback_an_eof_read_in_the_last_round_of_a_splice_wake_up_is_passed_on(
    loopback: Loopback, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The splice relay moves at most _ROUNDS chunks per wake-up. An EOF read
    # in the last round must still end that direction; found by the
    # slow-reader soak test, where it left tunnels open for ever. With one
    # round per wake-up every EOF is read in a last round.
    monkeypatch.setattr(splice, "_ROUNDS", 1)
    loopback.proxy_defaults["settings"] = ProxySettings(splice=True)
    client, conn, factory, clock = await switched(loopback)
    conn.transport.write(b"last words")
    conn.transport.loseWriteConnection()
    assert await loopback.run(client.recv_to_eof) == b"last words"
    client.shutdown_write()
    await wait(conn.closed)
    await proxy_is_empty(factory, clock)
