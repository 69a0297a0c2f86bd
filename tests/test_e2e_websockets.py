"""End to end: the Python ``websockets`` library as client *and* server through the proxy.

A thousand messages of mixed sizes (1 to 1 Mi bytes or characters, text and
binary, in a fixed pseudo-random order) go through the tunnel while the
client keeps sending, and every echo must be exactly what was sent; pings go
both ways; the close handshake carries code 1000 and its reason to both
ends. The same runs again with permessage-deflate negotiated end to end
(RFC 7692: the proxy forwards the offer and the answer untouched, and the
compressed frames, with RSV1 set, pass through the tunnel as they are).

The websockets server and client run in threads with their own sockets; the
proxy runs on the reactor.
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from loopback import Loopback, eventually
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import Server, ServerConnection
from websockets.sync.server import serve as ws_serve

pytestmark = pytest.mark.loopback

MESSAGES = 1000
MAX_SIZE = 2**20
# A text message of 1 Mi characters is a little more than 1 MiB in UTF-8.
FRAME_LIMIT = 4 * MAX_SIZE
CLOSE_REASON = "e2e done"
COMPRESSION = [None, "deflate"]
COMPRESSION_IDS = ["no-extension", "permessage-deflate"]

Message = str | bytes


@functools.cache
def messages() -> tuple[Message, ...]:
    """The messages, the same on every run: sizes from 1 byte to 1 MiB, mostly small.

    Sizes are log-uniform up to 64 KiB, with one message in a hundred between
    256 KiB and 1 MiB, so the whole set is about 16 MB each way. Text is
    words with multi-byte characters (compressible); binary is random.
    """
    rng = random.Random(6455)
    vocabulary = ["proxy", "upgrade", "héllo", "wörld", "✓", "𝄞", "日本語", "tunnel", "101", "\n"]
    text = " ".join(rng.choices(vocabulary, k=500_000))
    text_size = len(text)
    assert text_size > 2 * MAX_SIZE
    sizes = [
        rng.randint(MAX_SIZE // 4, MAX_SIZE) if i % 100 == 50 else int(2 ** rng.uniform(0, 16))
        for i in range(MESSAGES)
    ]
    # The extremes, as binary: one byte first, and 1 MiB in the middle of the traffic.
    extremes = {0: 1, MESSAGES // 2: MAX_SIZE}
    out: list[Message] = []
    for i, size in enumerate(sizes):
        if i in extremes or rng.random() < 0.5:
            out.append(rng.randbytes(extremes.get(i, size)))
        else:
            start = rng.randrange(text_size - size)
            out.append(text[start : start + size])
    return tuple(out)


def describe(message: Message) -> str:
    kind = "text" if isinstance(message, str) else "binary"
    return f"{kind} of {len(message)}"


# -- the server ----------------------------------------------------------------------


@dataclass
class Seen:
    """What the server saw of one connection."""

    request_extensions: str | None = None
    extensions: list[Any] = field(default_factory=list)
    pong_from_client: bool = False
    close_code: int | None = None
    close_reason: str | None = None


@contextlib.asynccontextmanager
async def echo_server(compression: str | None) -> AsyncIterator[tuple[int, list[Seen]]]:
    """A websockets echo server on 127.0.0.1, in a thread; yields (port, connections seen).

    Each connection starts with a ping from the server (the client answers
    it by itself), then every message is sent back as it came.
    """
    seen: list[Seen] = []

    def handler(ws: ServerConnection) -> None:
        record = Seen(
            request_extensions=ws.request.headers.get("Sec-WebSocket-Extensions"),
            extensions=list(ws.protocol.extensions),
        )
        seen.append(record)
        record.pong_from_client = ws.ping(b"from the server").wait(5)
        try:
            for message in ws:
                ws.send(message)
        except ConnectionClosed:
            pass
        if ws.protocol.close_rcvd is not None:
            record.close_code = ws.protocol.close_rcvd.code
            record.close_reason = ws.protocol.close_rcvd.reason

    server: Server = ws_serve(
        handler,
        "127.0.0.1",
        0,
        compression=compression,
        max_size=FRAME_LIMIT,
        ping_interval=None,
        close_timeout=5,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.socket.getsockname()[1], seen
    finally:
        # shutdown() waits for the handlers, which wait for the proxy: keep the reactor running.
        await deferToThread(server.shutdown).addTimeout(15, reactor)
        await deferToThread(thread.join, 5)
        assert not thread.is_alive(), "the websockets server did not stop"


# -- the client ----------------------------------------------------------------------


@dataclass
class Outcome:
    """What the client saw."""

    mismatches: list[str]
    pong_from_server: bool
    pong_after_traffic: bool
    extensions: list[Any]
    response_extensions: str | None
    close_code: int | None
    close_reason: str | None


def exchange(port: int, compression: str | None) -> Outcome:
    """Connect through the proxy and send every message while reading the echoes."""
    sent = messages()
    mismatches: list[str] = []
    with ws_connect(
        f"ws://127.0.0.1:{port}/e2e",
        proxy=None,
        compression=compression,
        max_size=FRAME_LIMIT,
        open_timeout=5,
        close_timeout=5,
        ping_interval=None,
    ) as ws:
        pong_from_server = ws.ping(b"from the client").wait(5)
        sender = Sender(ws, sent)
        sender.start()
        for index, expected in enumerate(sent):
            try:
                got = ws.recv(timeout=10)
            except TimeoutError:
                mismatches.append(f"no echo of message {index} ({describe(expected)})")
                break
            if type(got) is not type(expected) or got != expected:
                mismatches.append(
                    f"echo of message {index} ({describe(expected)}) is {describe(got)}"
                )
        sender.join(10)
        assert not sender.is_alive(), "the client's sender thread is stuck"
        assert sender.error is None, sender.error
        pong_after_traffic = ws.ping(b"after the traffic").wait(5)
        ws.close(1000, CLOSE_REASON)
    close = ws.protocol.close_rcvd
    return Outcome(
        mismatches=mismatches,
        pong_from_server=pong_from_server,
        pong_after_traffic=pong_after_traffic,
        extensions=list(ws.protocol.extensions),
        response_extensions=ws.response.headers.get("Sec-WebSocket-Extensions"),
        close_code=None if close is None else close.code,
        close_reason=None if close is None else close.reason,
    )


class Sender(threading.Thread):
    """Sends the messages while the main thread reads the echoes."""

    def __init__(self, ws: ClientConnection, messages: tuple[Message, ...]) -> None:
        super().__init__(daemon=True)
        self.ws = ws
        self.messages = messages
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for message in self.messages:
                self.ws.send(message)
        except BaseException as error:  # reported by the main thread
            self.error = error


# -- the tests -----------------------------------------------------------------------


def test_the_messages_span_1_byte_to_1_mib_text_and_binary() -> None:
    sent = messages()
    assert len(sent) == MESSAGES
    assert min(map(len, sent)) == 1
    assert max(len(m) for m in sent if isinstance(m, bytes)) == MAX_SIZE
    assert sum(isinstance(m, str) for m in sent) > MESSAGES // 3
    assert sum(isinstance(m, bytes) for m in sent) > MESSAGES // 3
    assert any(not m.isascii() for m in sent if isinstance(m, str))
    assert sum(map(len, sent)) < 20 * MAX_SIZE


@pytest.mark.parametrize("compression", COMPRESSION, ids=COMPRESSION_IDS)
@pytest_twisted.ensureDeferred
async def test_websockets_client_and_server_exchange_1000_messages_through_the_proxy(
    loopback: Loopback, compression: str | None
) -> None:
    messages()  # built outside the timed part
    async with echo_server(compression) as (backend_port, seen):
        proxy = loopback.proxy(backend_port)
        outcome = await loopback.run(exchange, proxy.port, compression, timeout=60)

        assert outcome.mismatches == []
        assert outcome.pong_from_server, "no pong for the client's ping"
        assert outcome.pong_after_traffic, "no pong for the client's ping after the traffic"
        assert (outcome.close_code, outcome.close_reason) == (1000, CLOSE_REASON)
        await eventually(lambda: seen and seen[0].close_code is not None, what="the server's close")
        assert len(seen) == 1
        server = seen[0]
        assert server.pong_from_client, "no pong for the server's ping"
        assert (server.close_code, server.close_reason) == (1000, CLOSE_REASON)

        if compression is None:
            assert outcome.extensions == [] and server.extensions == []
            assert outcome.response_extensions is None
            assert server.request_extensions is None
        else:
            assert [type(e) for e in outcome.extensions] == [PerMessageDeflate]
            assert [type(e) for e in server.extensions] == [PerMessageDeflate]
            assert server.request_extensions is not None
            assert server.request_extensions.startswith("permessage-deflate")
            assert outcome.response_extensions is not None
            assert outcome.response_extensions.startswith("permessage-deflate")

        await eventually(lambda: not proxy.factory.proxy.tunnels, what="the tunnel to end")
        await eventually(
            lambda: not proxy.factory.proxy.connections, what="the client connection to end"
        )
