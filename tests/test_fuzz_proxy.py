"""The whole proxy under property-based fuzzing, in memory.

Two properties:

1. **Packet boundaries do not matter.** A client pipelines requests (no
   body, Content-Length, chunked; HEAD among them), then asks to upgrade and
   talks through the tunnel; the backend answers each request (Content-Length,
   chunked, 1xx before some), switches, and talks back. Hypothesis chooses
   how each side's bytes are cut into reads and how the two sides interleave.
   Whatever it chooses, the backend receives the same requests and the
   client the same responses (heads byte for byte, bodies decoded: the proxy
   re-chunks, so chunk boundaries may differ) and the tunnel bytes are
   identical both ways.

2. **Hostile input never crashes, hangs or leaks.** Random bytes and
   mutations of valid heads, cut into random reads, against a backend that
   answers, switches, sends junk, closes, resets or says nothing. No event
   is logged with a failure or at error level, every backend connection
   receives only well-formed requests (read by h11, an independent parser:
   nothing malformed is ever passed on), after the fake clock passes
   every timeout the connection is closed or answered, and once the client
   is gone nothing is left: no client connection, no open backend connection
   outside the idle pool, no timer but the pool's idle timers.
"""

from __future__ import annotations

import gc
import itertools
import re
from dataclasses import dataclass

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs, formatEvent

from upgradeproxy import BackendSettings, ProxySettings
from upgradeproxy.testing import ProxyHarness

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

UPGRADE = b"GET /tunnel HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n"


# -- an independent reader of HTTP/1.1 message streams ---------------------------------


def _field(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip(b" \t")
    return None


def _dechunk(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """A chunked body starting at ``pos``: (body, end), or None if incomplete."""
    out = bytearray()
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(data[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailer fields, then the empty line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return bytes(out), pos + 2
                pos = eol + 2
        if len(data) < pos + size + 2:
            return None
        out += data[pos : pos + size]
        assert data[pos + size : pos + size + 2] == b"\r\n", data
        pos += size + 2


@dataclass(frozen=True)
class Stream:
    """A byte stream read as HTTP messages up to a switch."""

    messages: list[tuple[bytes, bytes]]  # (head, decoded body)
    tunnel: bytes | None  # the bytes after a switch, once there was one
    rest: bytes  # an incomplete message at the end


def read_requests(data: bytes) -> Stream:
    messages: list[tuple[bytes, bytes]] = []
    pos = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return Stream(messages, None, data[pos:])
        head = data[pos : end + 4]
        body_at = end + 4
        if _field(head, b"transfer-encoding") is not None:
            decoded = _dechunk(data, body_at)
            if decoded is None:
                return Stream(messages, None, data[pos:])
            body, pos = decoded
        else:
            length = int(_field(head, b"content-length") or b"0")
            if len(data) < body_at + length:
                return Stream(messages, None, data[pos:])
            body, pos = data[body_at : body_at + length], body_at + length
        messages.append((head, body))
        if _field(head, b"upgrade") is not None:
            return Stream(messages, data[pos:], b"")


def read_responses(data: bytes, methods: list[bytes]) -> Stream:
    """Responses to requests with ``methods``, in order; 1xx heads count as messages."""
    messages: list[tuple[bytes, bytes]] = []
    pos = 0
    index = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return Stream(messages, None, data[pos:])
        head = data[pos : end + 4]
        status = int(head.split(b" ", 2)[1])
        body_at = end + 4
        if status == 101:
            messages.append((head, b""))
            return Stream(messages, data[body_at:], b"")
        if status < 200 or status in (204, 304) or methods[index] == b"HEAD":
            body, pos = b"", body_at
        elif _field(head, b"transfer-encoding") is not None:
            decoded = _dechunk(data, body_at)
            if decoded is None:
                return Stream(messages, None, data[pos:])
            body, pos = decoded
        else:
            length = int(_field(head, b"content-length") or b"0")
            if len(data) < body_at + length:
                return Stream(messages, None, data[pos:])
            body, pos = data[body_at : body_at + length], body_at + length
        if status >= 200:
            index += 1
        messages.append((head, body))


# -- generating valid traffic ------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    request: bytes  # as the client sends it
    method: bytes
    body: bytes
    response: bytes  # as the backend sends it
    response_body: bytes


def _chunked(body: bytes, cuts: list[int], extension: bool) -> bytes:
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    out = bytearray()
    for start, end in itertools.pairwise(points):
        if end > start:
            ext = b";x=1" if extension else b""
            out += b"%x%s\r\n%s\r\n" % (end - start, ext, body[start:end])
    return bytes(out) + b"0\r\n\r\n"


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE"]))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b"" if framing == "none" else draw(st.binary(max_size=120))
    head = b"%s /r%d HTTP/1.1\r\nHost: a\r\nX-N: %d\r\n" % (method, len(body), len(body))
    if framing == "length":
        request = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    elif framing == "chunked":
        cuts = draw(st.lists(st.integers(0, 200), max_size=4))
        request = (
            head + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(body, cuts, draw(st.booleans()))
        )
    else:
        request = head + b"\r\n"

    status = draw(st.sampled_from([200, 201, 404, 500, 204, 304]))
    reply = draw(st.binary(max_size=120)) if status not in (204, 304) else b""
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" if draw(st.booleans()) else b""
    status_line = b"HTTP/1.1 %d Whatever\r\nServer: app\r\n" % status
    if status in (204, 304):
        response = status_line + b"\r\n"
    elif draw(st.booleans()):
        response = status_line + b"Content-Length: %d\r\n\r\n" % len(reply)
        response += b"" if method == b"HEAD" else reply
    else:
        cuts = draw(st.lists(st.integers(0, 200), max_size=4))
        response = status_line + b"Transfer-Encoding: chunked\r\n\r\n"
        response += b"" if method == b"HEAD" else _chunked(reply, cuts, False)
    return Exchange(request, method, body, interim + response, reply)


@dataclass
class Traffic:
    exchanges: list[Exchange]
    client_tunnel: bytes
    backend_tunnel: bytes

    @property
    def client_stream(self) -> bytes:
        return b"".join(e.request for e in self.exchanges) + UPGRADE + self.client_tunnel

    @property
    def methods(self) -> list[bytes]:
        return [e.method for e in self.exchanges] + [b"GET"]


traffic = st.builds(
    Traffic,
    st.lists(exchanges(), max_size=5),
    st.binary(max_size=300),
    st.binary(max_size=300),
)


# -- running traffic through the proxy ------------------------------------------------------


def backend_may_send(t: Traffic, received: bytes) -> int:
    """How many of the backend's bytes it may have sent, given what it received.

    It answers a request once it has received the whole of it (the proxy
    forwards one request at a time), and switches once it has the upgrade.
    """
    seen = read_requests(received)
    allowed = sum(len(e.response) for e in t.exchanges[: len(seen.messages)])
    if seen.tunnel is not None:  # the upgrade request has arrived
        allowed += len(SWITCH) + len(t.backend_tunnel)
    return allowed


# One step of a schedule: which side goes first if both may send, and how many bytes.
steps = st.lists(
    st.tuples(
        st.booleans(),
        st.one_of(st.integers(1, 3), st.integers(1, 64), st.integers(1, 2000)),
    ),
    max_size=300,
)


def run(t: Traffic, schedule: list[tuple[bool, int]]) -> ProxyHarness:
    """Send ``t`` through a proxy, cut and interleaved by ``schedule``.

    Once the schedule runs out, each side sends all it may in one read.
    """
    h = ProxyHarness()
    client = t.client_stream
    backend = b"".join(e.response for e in t.exchanges) + SWITCH + t.backend_tunnel
    sent_c = sent_b = 0
    step = 0
    while sent_c < len(client) or sent_b < len(backend):
        may = backend_may_send(t, h.backend.received) if h.endpoint.connections else 0
        client_may = sent_c < len(client) and h.client_transport.producerState != "paused"
        assert client_may or sent_b < may, (
            f"stuck: client sent {sent_c}/{len(client)}, backend {sent_b}/{may}"
        )
        client_first, size = schedule[step] if step < len(schedule) else (False, 1 << 30)
        step += 1
        if client_may and (client_first or sent_b >= may):
            size = min(size, len(client) - sent_c)
            h.client_sends(client[sent_c : sent_c + size])
            sent_c += size
        else:
            size = min(size, may - sent_b)
            h.backend.send(backend[sent_b : sent_b + size])
            sent_b += size
    return h


def outcome(t: Traffic, h: ProxyHarness) -> tuple[Stream, Stream]:
    assert len(h.endpoint.connections) == 1, "every request on one kept-alive connection"
    return read_requests(h.backend.received), read_responses(h.client_received, t.methods)


@given(t=traffic, schedule=steps)
@SETTINGS
def test_the_same_bytes_arrive_whatever_the_packet_boundaries(
    t: Traffic, schedule: list[tuple[bool, int]]
) -> None:
    reference = outcome(t, run(t, []))
    # The reference itself is right: every body and tunnel byte unchanged.
    to_backend, to_client = reference
    assert [body for _, body in to_backend.messages] == [e.body for e in t.exchanges] + [b""]
    assert to_backend.tunnel == t.client_tunnel and to_backend.rest == b""
    finals = [
        (head, body) for head, body in to_client.messages if not head.startswith(b"HTTP/1.1 1")
    ]
    expected = [b"" if e.method == b"HEAD" else e.response_body for e in t.exchanges]
    assert [body for _, body in finals] == expected
    assert to_client.messages[-1][0].startswith(b"HTTP/1.1 101 ")
    assert to_client.tunnel == t.backend_tunnel and to_client.rest == b""

    h = run(t, schedule)
    assert outcome(t, h) == reference
    assert not h.client_closed and len(h.factory.proxy.tunnels) == 1

    h.client_transport.loseConnection()
    assert h.backend.closed
    assert h.factory.proxy.connections == set() and not h.factory.proxy.tunnels
    assert h.clock.getDelayedCalls() == []


# -- hostile input: never crash, hang or leak -----------------------------------------------


WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;e=1\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    UPGRADE + b"tunnel bytes",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
    + WS_KEY
    + b"\r\n\r\n\x81\x80\x00\x00\x00\x00",
    b"POST /u HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo, h2c\r\n"
    b"HTTP2-Settings: AAMAAABk\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://a/abs?q=1 HTTP/1.1\r\nHost: a\r\n"
    b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
]
INSERTS = [
    b"\x00", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b",", b"\x7f", b"\x80", b"\xff", b"0",
    b"f" * 17, b"chunked", b"\r\n\r\n", b"\r\n ", b"Content-Length: 5\r\n",
    b"Content-Length: -1\r\n", b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: x\r\n",
    b"Connection: upgrade\r\nUpgrade: foo\r\n", b"Host: b\r\n", b"HTTP/1.1",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if op == "insert":
            data[at:at] = draw(
                st.one_of(st.sampled_from(INSERTS), st.binary(min_size=1, max_size=4))
            )
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "duplicate":
            size = draw(st.integers(1, 40))
            data[at:at] = data[at : at + size]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


BEHAVIOURS = ["ok", "chunked", "switch", "junk", "close", "reset", "silent", "stall-mid-body"]


def answer(behaviour: str, junk: bytes) -> bytes:
    return {
        "ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "switch": SWITCH + b"from the backend",
        "junk": junk,
        "stall-mid-body": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart",
    }.get(behaviour, b"")


def act(h: ProxyHarness, behaviour: str, junk: bytes, answered: set[int]) -> None:
    """Each backend connection answers once it has a complete head."""
    for index, backend in enumerate(h.endpoint.connections):
        if index in answered or backend.closed or b"\r\n\r\n" not in backend.received:
            continue
        answered.add(index)
        if behaviour == "close":
            backend.transport.loseConnection()
        elif behaviour == "reset":
            backend.transport.reset()
        elif behaviour != "silent":
            backend.send(answer(behaviour, junk))


def clean_requests(received: bytes) -> int:
    """Read what a backend connection received with h11; return how many requests.

    Every byte must be part of a well-formed request, except for a last
    request cut short (the proxy closed the connection) and the bytes after
    an upgrade request (a tunnel, if the switch happened).
    """
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(received)
    count = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise AssertionError(f"the backend got a malformed request ({e}): {received!r}") from e
        if event is h11.NEED_DATA:
            return count
        if isinstance(event, h11.Request):
            count += 1
        elif event is h11.PAUSED:
            if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                return count  # what follows belongs to the switched protocol
            conn.send(h11.Response(status_code=204, headers=[]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()


def problems(logs: list[dict[str, object]]) -> list[str]:
    return [
        formatEvent(e) + (f"\n{e['log_failure']}" if e.get("log_failure") else "")
        for e in logs
        if e.get("log_failure") is not None
        or e.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]


@given(
    data=mutated(),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    behaviour=st.sampled_from(BEHAVIOURS),
    junk=st.binary(max_size=80),
    ending=st.sampled_from(["close", "eof", "stay"]),
)
@settings(SETTINGS, max_examples=400)
def _hostile_exchange(
    data: bytes, cuts: list[int], behaviour: str, junk: bytes, ending: str
) -> None:
    settings_ = ProxySettings(
        request_head_timeout=10, backend=BackendSettings(response_timeout=20, idle_timeout=30)
    )
    with capturedLogs() as logs:
        h = ProxyHarness(settings=settings_)
        answered: set[int] = set()
        for piece in split(data, cuts):
            if h.client_closed:
                break
            h.client_sends(piece)
            act(h, behaviour, junk, answered)
        if ending == "eof" and not h.client_closed:
            h.client_transport.eof()
        act(h, behaviour, junk, answered)
        # Past every timeout: the head timeout, the response timeout, and again.
        for _ in range(3):
            h.clock.advance(21)
            act(h, behaviour, junk, answered)

        received = h.client_received
        tunnel = len(h.factory.proxy.tunnels) == 1
        answered_with_head = re.match(rb"HTTP/1\.1 [1-5]\d\d ", received) is not None
        assert h.client_closed or tunnel or answered_with_head, (
            f"neither closed nor answered: sent {data!r}, got {received!r}"
        )
        if not (h.client_closed or tunnel):
            # Left open only while a response body is still coming: the
            # backend stalled mid-body, and bodies have no idle timeout.
            assert behaviour == "stall-mid-body", received

        # Whatever came in, each backend saw only well-formed requests.
        for backend in h.endpoint.connections:
            clean_requests(backend.received)

        # The client goes away: nothing may be left behind.
        if ending != "stay" or not h.client_closed:
            h.client_transport.loseConnection()
        assert h.factory.proxy.connections == set()
        assert not h.factory.proxy.tunnels
        open_backends = [b for b in h.endpoint.connections if not b.closed]
        assert len(open_backends) == h.factory.proxy.pool.idle_count, "only pooled ones stay open"
        assert len(h.clock.getDelayedCalls()) == h.factory.proxy.pool.idle_count, (
            h.clock.getDelayedCalls()
        )
        h.clock.advance(30)
        assert all(b.closed for b in h.endpoint.connections)
        assert h.clock.getDelayedCalls() == []
    assert problems(logs) == []


def test_hostile_input_never_crashes_hangs_or_leaks() -> None:
    _hostile_exchange()
    # A Deferred that failed with nobody to handle the failure logs it when
    # it is garbage-collected: collect once, after every example ran.
    with capturedLogs() as logs:
        gc.collect()
    assert problems(logs) == []
