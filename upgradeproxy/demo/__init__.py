"""The built-in demo backend: a small HTTP/1.1 server that switches protocols.

``--demo`` runs it on 127.0.0.1 behind the proxy, so that a newcomer sees a
WebSocket work through the proxy in a browser; tests use it as a backend that
behaves exactly as they expect. It owns these routes:

* ``GET /`` (and ``HEAD``): ``page.html``, whose script opens a WebSocket back
  through the proxy and checks that its messages come back;
* ``/ws``: WebSocket echo (RFC 6455), with the server side of the framing
  implemented here;
* ``/echo``: the :data:`ECHO_PROTOCOL` upgrade, after which every byte is
  echoed until the client half-closes, and then the server half-closes too;
* ``POST /echo-body``: the request body, sent back;
* anything else: ``404``.

Request heads and bodies are parsed by :mod:`upgradeproxy.http1`. Bytes that
arrive after a head -- a body, a pipelined request, the first frames of the
new protocol -- stay in the connection's buffer for whoever reads next.

The server never closes a connection outright: it half-closes after its last
response or Close frame and closes fully when the client has closed too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from importlib import resources
from typing import Protocol as _Interface
from typing import cast

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from upgradeproxy.http1 import (
    BodyDecoder,
    Field,
    Headers,
    ProtocolError,
    RequestHead,
    ResponseHead,
    is_upgrade_request,
    parse_request_head,
    request_framing,
    request_keeps_alive,
)
from upgradeproxy.rfc6455 import accept_for, is_valid_key

__all__ = [
    "ECHO_BODY_PATH",
    "ECHO_PATH",
    "ECHO_PROTOCOL",
    "MAX_BODY_SIZE",
    "MAX_HEAD_SIZE",
    "MAX_MESSAGE_SIZE",
    "PAGE",
    "PAGE_PATH",
    "WEBSOCKET_PATH",
    "DemoBackendFactory",
    "DemoBackendProtocol",
]

_log = Logger()

ECHO_PROTOCOL = "upgradeproxy-echo"
"""The ``Upgrade`` token of the raw echo protocol served at :data:`ECHO_PATH`."""

PAGE_PATH = "/"
WEBSOCKET_PATH = "/ws"
ECHO_PATH = "/echo"
ECHO_BODY_PATH = "/echo-body"

MAX_HEAD_SIZE = 32 * 1024
"""Larger request heads are answered with ``431`` and the connection is closed."""

MAX_BODY_SIZE = 16 * 1024 * 1024
"""Larger bodies sent to :data:`ECHO_BODY_PATH` are answered with ``413``."""

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
"""Larger WebSocket messages close the connection with status 1009."""

PAGE = resources.files(__name__).joinpath("page.html").read_bytes()
"""The HTML page served at :data:`PAGE_PATH`."""

_ECHO_TOKEN = ECHO_PROTOCOL.encode()
_PLAIN_TEXT = b"text/plain; charset=utf-8"

# WebSocket opcodes (RFC 6455 §5.2).
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPCODES = frozenset({_CONTINUATION, _TEXT, _BINARY})
_CONTROL_OPCODES = frozenset({_CLOSE, _PING, _PONG})

# WebSocket close codes (RFC 6455 §7.4.1).
_PROTOCOL_ERROR = 1002
_INVALID_PAYLOAD = 1007
_MESSAGE_TOO_BIG = 1009


class _Transport(_Interface):
    """What this module needs of a TCP transport.

    Twisted's zope interfaces are opaque to mypy without its zope plugin;
    this spells out the methods used, and every TCP transport has them.
    """

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: Sequence[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def loseWriteConnection(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


def _path(target: bytes) -> str:
    """The path of an origin-form or absolute-form request target (RFC 9112 §3.2)."""
    if not target.startswith(b"/"):
        _, scheme_end, rest = target.partition(b"://")
        if scheme_end:
            target = b"/" + rest.partition(b"/")[2]
    # The head parser admits only visible ASCII in a target.
    return target.partition(b"?")[0].decode("ascii")


def _offers(head: RequestHead, protocol: bytes) -> bool:
    return is_upgrade_request(head) and protocol in head.headers.tokens(b"upgrade")


def _handshake_accept(head: RequestHead) -> bytes:
    """The ``Sec-WebSocket-Accept`` for a WebSocket opening handshake (RFC 6455 §4.2.1).

    Raises :class:`ValueError` saying what is wrong with the handshake.
    """
    if head.method != b"GET":
        raise ValueError("a WebSocket handshake must be a GET request")
    if head.headers.get_all(b"sec-websocket-version") != [b"13"]:
        raise ValueError("Sec-WebSocket-Version must be 13")
    keys = head.headers.get_all(b"sec-websocket-key")
    if len(keys) != 1:
        raise ValueError("a WebSocket handshake needs exactly one Sec-WebSocket-Key")
    if not is_valid_key(keys[0]):
        raise ValueError("Sec-WebSocket-Key must be 16 bytes in base64")
    return accept_for(keys[0])


def _response_head(status: int, fields: Sequence[Field]) -> bytes:
    reason = HTTPStatus(status).phrase.encode()
    return ResponseHead(status, reason, headers=Headers.of(fields)).serialize()


def _frame_header(opcode: int, length: int) -> bytes:
    """The header of an unmasked final frame (RFC 6455 §5.2), as a server sends it."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def _unmask(payload: bytes | bytearray, mask: bytes) -> bytes:
    # XOR as one big integer: linear, and far faster than a loop over bytes.
    size = len(payload)
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(size, "little")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _valid_close_code(code: int) -> bool:
    # Codes a peer may send (RFC 6455 §7.4 and the IANA registry): not the
    # ones reserved for reporting a closure locally (1005, 1006, 1015), nor
    # the unassigned rest of 1000-2999.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class _WebSocketEcho:
    """The server side of one WebSocket connection, echoing every message.

    :meth:`feed` takes whole frames off the connection's buffer and leaves a
    partial frame where it is, so a frame is copied out once however many
    packets it came in. Replies go to ``send``; ``close`` ends the connection.
    """

    def __init__(self, send: Callable[[Sequence[bytes]], None], close: Callable[[], None]) -> None:
        self._send = send
        self._close = close
        self._closed = False
        # The fragments of a message whose final frame has not come yet.
        self._fragments: list[bytes] = []
        self._message_size = 0
        self._message_opcode = _BINARY

    def feed(self, buf: bytearray, pos: int) -> int:
        """Handle every complete frame in ``buf[pos:]``; return the offset after them."""
        end = len(buf)
        while not self._closed and end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            offset = pos + 2
            if length >= 126:
                size = 2 if length == 126 else 8
                if end - offset < size:
                    break
                length = int.from_bytes(buf[offset : offset + size], "big")
                offset += size
            # Checked before the payload arrives, so that an oversized frame
            # is refused without buffering it.
            problem = self._problem(first, second, length)
            if problem is not None:
                self._fail(*problem)
                break
            if end - offset < 4 + length:
                break
            mask = bytes(buf[offset : offset + 4])
            offset += 4
            pos = offset + length
            self._frame(bool(first & 0x80), first & 0x0F, _unmask(buf[offset:pos], mask))
        return end if self._closed else pos

    def _problem(self, first: int, second: int, length: int) -> tuple[int, str] | None:
        """The close code and reason a frame with this header fails, or ``None``."""
        opcode = first & 0x0F
        if first & 0x70:
            return _PROTOCOL_ERROR, "reserved bits set, but no extension was negotiated"
        if not second & 0x80:
            return _PROTOCOL_ERROR, "unmasked frame from a client"
        if length >> 63:
            return _PROTOCOL_ERROR, "64-bit payload length with its top bit set"
        if opcode in _CONTROL_OPCODES:
            if not first & 0x80:
                return _PROTOCOL_ERROR, "fragmented control frame"
            if length > 125:
                return _PROTOCOL_ERROR, "control frame longer than 125 bytes"
            return None
        if opcode not in _DATA_OPCODES:
            return _PROTOCOL_ERROR, f"unknown opcode {opcode:#x}"
        if opcode == _CONTINUATION and not self._fragments:
            return _PROTOCOL_ERROR, "continuation frame without a message to continue"
        if opcode != _CONTINUATION and self._fragments:
            return _PROTOCOL_ERROR, "new message before the previous one's final frame"
        if self._message_size + length > MAX_MESSAGE_SIZE:
            return _MESSAGE_TOO_BIG, f"message larger than {MAX_MESSAGE_SIZE} bytes"
        return None

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode == _PING:
            self._send_frame(_PONG, payload)
        elif opcode == _CLOSE:
            self._close_received(payload)
        elif opcode != _PONG:  # a pong needs no answer, solicited or not
            self._data(fin, opcode, payload)

    def _data(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode != _CONTINUATION:
            self._message_opcode = opcode
        self._fragments.append(payload)
        self._message_size += len(payload)
        if not fin:
            return
        message = b"".join(self._fragments)
        self._fragments.clear()
        self._message_size = 0
        if self._message_opcode == _TEXT and not _is_utf8(message):
            self._fail(_INVALID_PAYLOAD, "text message that is not UTF-8")
        else:
            self._send_frame(self._message_opcode, message)

    def _close_received(self, payload: bytes) -> None:
        if payload:
            if len(payload) == 1 or not _valid_close_code(int.from_bytes(payload[:2], "big")):
                self._fail(_PROTOCOL_ERROR, "invalid close code")
                return
            if not _is_utf8(payload[2:]):
                self._fail(_INVALID_PAYLOAD, "close reason that is not UTF-8")
                return
        # Echoing the Close completes the closing handshake, after which the
        # server is the one to close TCP (RFC 6455 §7.1.1).
        self._finish(payload[:2])

    def _fail(self, code: int, reason: str) -> None:
        _log.info("Failing a WebSocket connection ({code}): {reason}", code=code, reason=reason)
        self._finish(code.to_bytes(2, "big") + reason.encode())

    def _finish(self, close_payload: bytes) -> None:
        self._send_frame(_CLOSE, close_payload)
        self._closed = True
        self._close()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        self._send([_frame_header(opcode, len(payload)), payload])


@dataclass(slots=True)
class _Pending:
    """A request whose head has arrived and whose body is being read."""

    head: RequestHead
    path: str
    decoder: BodyDecoder
    body: list[bytes] | None  # None: the route has no use for the body
    body_size: int = 0


@implementer(IHalfCloseableProtocol)
class DemoBackendProtocol(Protocol):
    """One connection to the demo backend: HTTP/1.1 requests, then perhaps another protocol.

    Whatever owns the connection at the moment -- the head parser, a body
    decoder, the WebSocket framing, the raw echo -- is ``_state``: it takes
    what it can from the buffer and says whether the next owner should look
    at what is left.
    """

    _transport: _Transport

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # the bytes of _buf before this offset are handled
        self._state: Callable[[], bool] = self._read_head
        self._read_closed = False

    def connectionMade(self) -> None:
        self._transport = cast(_Transport, self.transport)
        # An echo goes only as fast as its client reads it: when the write
        # buffer fills up, the transport pauses itself, which stops reading.
        self._transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self._state == self._echo:
            self._transport.write(data)
            return
        self._buf += data
        while self._state():
            pass
        del self._buf[: self._pos]
        self._pos = 0

    def readConnectionLost(self) -> None:
        """The client sends no more: half-close back, or finish closing if we already did."""
        self._read_closed = True
        if self._state == self._discard:
            self._transport.loseConnection()
        else:
            self._close()

    def writeConnectionLost(self) -> None:
        """Our half-close is done; so is the connection if the client's is too."""
        if self._read_closed:
            self._transport.loseConnection()

    def _read_head(self) -> bool:
        try:
            parsed = parse_request_head(self._buf, self._pos, MAX_HEAD_SIZE)
            if parsed is None:
                return False
            head, self._pos = parsed
            decoder = request_framing(head).decoder()
        except ProtocolError as error:
            self._reject(error)
            return False
        path = _path(head.target)
        wants_body = path == ECHO_BODY_PATH and head.method == b"POST"
        pending = _Pending(head, path, decoder, [] if wants_body else None)
        if (
            not decoder.done
            and head.version >= (1, 1)
            and b"100-continue" in head.headers.tokens(b"expect")
        ):
            self._transport.write(_response_head(HTTPStatus.CONTINUE, ()))
        self._state = partial(self._read_body, pending)
        return True

    def _read_body(self, pending: _Pending) -> bool:
        # Body decoders read from the front of the buffer.
        del self._buf[: self._pos]
        self._pos = 0
        try:
            data, used = pending.decoder.decode(self._buf)
        except ProtocolError as error:
            self._reject(error)
            return False
        self._pos = used
        if pending.body is not None:
            pending.body += data
            pending.body_size += sum(map(len, data))
            if pending.body_size > MAX_BODY_SIZE:
                body = b"body larger than %d bytes\n" % MAX_BODY_SIZE
                self._respond(pending.head, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, body, close=True)
                return False
        if not pending.decoder.done:
            return False
        # An upgrade takes effect after the whole request, body included
        # (RFC 9110 §7.8), so routing waits for the body.
        self._state = self._read_head
        self._route(pending)
        return True

    def _route(self, request: _Pending) -> None:
        head, path = request.head, request.path
        if path == PAGE_PATH:
            self._page(head)
        elif path == WEBSOCKET_PATH:
            self._accept_websocket(head)
        elif path == ECHO_PATH:
            self._accept_echo(head)
        elif path == ECHO_BODY_PATH:
            self._echo_body(head, b"".join(request.body or ()))
        else:
            self._respond(head, HTTPStatus.NOT_FOUND, f"no such page: {path}\n".encode())

    def _page(self, head: RequestHead) -> None:
        if head.method in (b"GET", b"HEAD"):
            content_type = b"text/html; charset=utf-8"
            self._respond(head, HTTPStatus.OK, PAGE, content_type=content_type)
        else:
            allow = [(b"Allow", b"GET, HEAD")]
            self._respond(head, HTTPStatus.METHOD_NOT_ALLOWED, b"use GET\n", allow)

    def _echo_body(self, head: RequestHead, body: bytes) -> None:
        if head.method == b"POST":
            content_type = head.headers.get(b"content-type") or b"application/octet-stream"
            self._respond(head, HTTPStatus.OK, body, content_type=content_type)
        else:
            allow = [(b"Allow", b"POST")]
            self._respond(head, HTTPStatus.METHOD_NOT_ALLOWED, b"use POST\n", allow)

    def _accept_websocket(self, head: RequestHead) -> None:
        if not _offers(head, b"websocket"):
            body = b"this is a WebSocket endpoint\n"
            self._respond(head, HTTPStatus.UPGRADE_REQUIRED, body, upgrade=b"websocket")
            return
        try:
            accept = _handshake_accept(head)
        except ValueError as problem:
            # RFC 6455 §4.4: say which version this server speaks.
            version = [(b"Sec-WebSocket-Version", b"13")]
            self._respond(head, HTTPStatus.BAD_REQUEST, f"{problem}\n".encode(), version)
            return
        # No Sec-WebSocket-Protocol and no extensions: offered subprotocols
        # are declined by not naming one (RFC 6455 §4.2.2).
        fields = [
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Accept", accept),
        ]
        self._transport.write(_response_head(HTTPStatus.SWITCHING_PROTOCOLS, fields))
        websocket = _WebSocketEcho(self._transport.writeSequence, self._close)
        self._state = partial(self._feed_websocket, websocket)

    def _feed_websocket(self, websocket: _WebSocketEcho) -> bool:
        self._pos = websocket.feed(self._buf, self._pos)
        return False

    def _accept_echo(self, head: RequestHead) -> None:
        if not _offers(head, _ECHO_TOKEN):
            body = f"this endpoint speaks {ECHO_PROTOCOL}\n".encode()
            self._respond(head, HTTPStatus.UPGRADE_REQUIRED, body, upgrade=_ECHO_TOKEN)
            return
        fields = [(b"Upgrade", _ECHO_TOKEN), (b"Connection", b"Upgrade")]
        self._transport.write(_response_head(HTTPStatus.SWITCHING_PROTOCOLS, fields))
        self._state = self._echo

    def _echo(self) -> bool:
        if self._pos < len(self._buf):
            self._transport.write(bytes(self._buf[self._pos :]))
        self._pos = len(self._buf)
        return False

    def _discard(self) -> bool:
        self._pos = len(self._buf)
        return False

    def _respond(
        self,
        head: RequestHead,
        status: HTTPStatus,
        body: bytes,
        fields: Sequence[Field] = (),
        *,
        content_type: bytes = _PLAIN_TEXT,
        upgrade: bytes | None = None,
        close: bool = False,
    ) -> None:
        """Send a complete response to ``head``; close if either side wants to.

        ``upgrade`` names the protocol a ``426`` response asks for.
        """
        keep_alive = not close and request_keeps_alive(head)
        out = [
            (b"Content-Type", content_type),
            (b"Content-Length", b"%d" % len(body)),
            *fields,
        ]
        connection = []
        if upgrade is not None:
            out.append((b"Upgrade", upgrade))
            connection.append(b"Upgrade")
        if not keep_alive:
            connection.append(b"close")
        elif head.version < (1, 1):
            connection.append(b"keep-alive")
        if connection:
            out.append((b"Connection", b", ".join(connection)))
        response_head = _response_head(status, out)
        self._transport.writeSequence(
            [response_head] if head.method == b"HEAD" else [response_head, body]
        )
        if not keep_alive:
            self._close()

    def _reject(self, error: ProtocolError) -> None:
        _log.info("Rejecting a malformed request: {reason}", reason=error.reason)
        body = f"{error.reason}\n".encode()
        fields = [
            (b"Content-Type", _PLAIN_TEXT),
            (b"Content-Length", b"%d" % len(body)),
            (b"Connection", b"close"),
        ]
        self._transport.writeSequence([_response_head(error.status, fields), body])
        self._close()

    def _close(self) -> None:
        """Send what is buffered and then FIN, and discard input until the client's FIN.

        Closing outright while the client's bytes are unread would make the
        kernel send a reset, which can destroy the last response or Close
        frame before the client reads it. There is no timer: the connection
        ends when the client closes its side.
        """
        if self._state == self._discard:
            return
        self._state = self._discard
        self._transport.unregisterProducer()
        # Reading may be paused by a full write buffer; the client's FIN must get through.
        self._transport.resumeProducing()
        self._transport.loseWriteConnection()


class DemoBackendFactory(ServerFactory):
    """Makes a :class:`DemoBackendProtocol` for each connection.

    For example ``reactor.listenTCP(0, DemoBackendFactory(), interface="127.0.0.1")``,
    then ``port.getHost().port`` is where the backend listens.
    """

    protocol = DemoBackendProtocol
    noisy = False  # "Starting factory <object at 0x...>" tells a newcomer nothing
