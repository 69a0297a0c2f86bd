"""The one place that reaches into Twisted's private state.

Twisted has no public API for what the proxy needs at a few points, so these
functions use its internals. Each says which attribute it relies on and why.
They were checked against the Twisted releases that ``pyproject.toml`` allows
(``TWISTED_RANGE``); :func:`check_supported` runs at import and fails loudly
if a relied-on attribute is gone, and ``tests/test_twisted_internals.py``
exercises every function against the installed Twisted, so moving to a new
release is a review of this one file and that one test file.

What is used:

* ``twisted.internet.abstract.FileDescriptor`` write buffers (``dataBuffer``,
  ``offset``, ``_tempDataBuffer``, ``_tempDataLen``) and ``tcp.Connection``'s
  ``socket`` and ``_writeDisconnected``: to send at once where nothing is
  queued (:func:`send_now`), and to take a socket and its unsent output over
  for ``splice(2)`` (:func:`take_pending_output`, :func:`writes_open`);
* ``EPollReactor``'s ``_reads`` and ``_selectables``: to hand a socket that is
  registered for reading to another reader in place, with no system call
  (:func:`hand_over_reads`);
* ``TCP4ClientEndpoint``/``TCP6ClientEndpoint``'s ``_reactor``, ``_host``,
  ``_port``, ``_timeout``, ``_bindAddress``: to connect with ``connectTCP``
  directly (:func:`tcp_client_parts`);
* the client endpoints' ``_hostText``/``_host``, ``_port`` and ``_path``: to
  name a backend in logs (:func:`client_endpoint_location`);
* ``TCP4ServerEndpoint``/``TCP6ServerEndpoint``'s ``_interface``, ``_port``,
  ``_backlog`` (and ``SSL4ServerEndpoint``'s, the same names): to open the same
  address in worker processes, or under a PROXY protocol reader beneath TLS
  (:func:`tcp_server_parts`), and any server endpoint's ``_port``: to refuse a
  port out of range before anything listens (:func:`endpoint_port`);
* ``SSL4ServerEndpoint._sslContextFactory``: to choose the application
  protocol over ALPN on an ``ssl:`` listener's context (:func:`tls_server_options`);
* the ``protocol`` a ``tcp.Connection`` (or any ``FileDescriptor`` transport)
  delivers to, and the ``wrappedProtocol`` of a ``ProtocolWrapper`` (TLS
  included): to hand a connection from one front door to another once the
  client's first bytes or its ALPN choice say which (:func:`switch_protocol`);
* ``twisted.web.http.HTTPChannel``'s ``_buffer``, ``_dataBuffer``,
  ``_networkProducer`` and ``_handlingRequest``: to take a connection over
  from twisted.web with the bytes it holds (:func:`detach`). Twisted's own
  ``WebSocketResource`` never replays those bytes, so a first frame sent in
  the same packet as the handshake is lost; :func:`detach` keeps them. It
  also relies on the channel's ``dataReceived`` and ``connectionLost`` being
  looked up on the instance each time (``_GenericHTTPChannelProtocol``
  delegates to them), as Twisted's own ``_protocolUpgradeForWebsockets`` does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import abstract, tcp
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.interfaces import IProtocol, ITransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request

import twisted

#: The Twisted releases these internals were checked against (as pinned in pyproject.toml).
TWISTED_RANGE = ">=26.10,<27"

_PLAIN_TCP = (tcp.Server, tcp.Client)
_CHANNEL_STATE = ("_buffer", "_dataBuffer", "_networkProducer", "_handlingRequest")
_WRITE_BUFFERS = ("dataBuffer", "offset", "_tempDataBuffer", "_tempDataLen")
_CLIENT_ENDPOINT = ("_reactor", "_host", "_port", "_timeout", "_bindAddress")
_SERVER_ENDPOINT = ("_interface", "_port", "_backlog")


class UnsupportedTwisted(RuntimeError):
    """Twisted changed in a way upgradeproxy cannot work with."""


def _unsupported(what: str) -> UnsupportedTwisted:
    return UnsupportedTwisted(
        f"upgradeproxy does not support Twisted {twisted.__version__} ({what}); "
        f"it was checked with Twisted {TWISTED_RANGE}"
    )


def check_supported() -> None:
    """Raise :class:`UnsupportedTwisted` unless the internals relied on are where expected."""
    descriptor = abstract.FileDescriptor()
    missing = [name for name in _WRITE_BUFFERS if not hasattr(descriptor, name)]
    if missing:
        raise _unsupported(f"FileDescriptor has no {', '.join(missing)}")
    # Endpoints only store their arguments: no reactor is needed to make one.
    client = TCP4ClientEndpoint(None, "localhost", 1)
    missing = [name for name in _CLIENT_ENDPOINT if not hasattr(client, name)]
    for server in (TCP4ServerEndpoint(None, 1), SSL4ServerEndpoint(None, 1, None)):
        missing += [name for name in _SERVER_ENDPOINT if not hasattr(server, name)]
    if missing:
        raise _unsupported(f"TCP endpoints keep no {', '.join(missing)}")


# -- plain TCP transports ------------------------------------------------------------


def send_now(transport: ITransport, data: bytes) -> None:
    """Write ``data`` to ``transport``, with one ``send()`` at once where possible.

    ``transport.write`` only queues: it registers the socket with the reactor
    for writing, and the reactor sends on its next turn and unregisters it,
    which is two more system calls and a reactor event per write. On a plain
    TCP transport with nothing queued, sending straight away gives the same
    bytes in the same order; what the socket does not take is queued as usual.
    This reaches into ``twisted.internet.abstract.FileDescriptor``'s buffers,
    as :func:`take_pending_output` does.
    """
    if (
        type(transport) in _PLAIN_TCP
        and not transport.TLS  # type: ignore[attr-defined]
        and transport.connected  # type: ignore[attr-defined]
        and not transport.disconnecting  # type: ignore[attr-defined]
        and not transport._tempDataBuffer  # type: ignore[attr-defined]
        and transport.offset >= len(transport.dataBuffer)  # type: ignore[attr-defined]
    ):
        try:
            sent = transport.socket.send(data)  # type: ignore[attr-defined]
        except OSError:
            sent = 0  # EAGAIN, or an error that the queued write will meet and report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def switch_protocol(transport: ITransport, protocol: IProtocol, received: bytes = b"") -> None:
    """From now on, ``transport`` delivers its events to ``protocol``, a new one.

    Twisted has no call for it: a wrapping transport (TLS, the PROXY
    protocol) delivers to its ``wrappedProtocol``, a socket's transport to
    its ``protocol``; both are read on every event. ``protocol`` is then
    connected, and given ``received``, what the transport delivered already.
    """
    if hasattr(transport, "wrappedProtocol"):
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    if received:
        protocol.dataReceived(received)


def writes_open(transport: tcp.Connection) -> bool:
    """True unless ``transport``'s write side was shut down (``_writeDisconnected``)."""
    return not transport._writeDisconnected


def take_pending_output(transport: tcp.Connection) -> bytes:
    """Remove and return what ``transport`` has buffered but not yet sent.

    The ``101`` head and the replayed bytes are there, and must go out
    before anything the kernel moves once the socket is spliced.
    """
    pending = bytes(transport.dataBuffer[transport.offset :]) + b"".join(transport._tempDataBuffer)
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    return pending


def hand_over_reads(reactor: object, transport: tcp.Connection, reader: object) -> bool:
    """Make ``reader`` the reader of ``transport``'s socket, keeping its registration.

    On the epoll reactor, a socket that is registered for reading (and not
    for writing) gets ``reader`` as the object its read events go to
    (``_selectables``), where ``stopReading`` and ``addReader`` would cost two
    ``epoll_ctl`` calls. Returns False, changing nothing, anywhere else: the
    caller then stops the transport's reads and adds ``reader`` itself.
    """
    epoll = sys.modules.get("twisted.internet.epollreactor")
    if epoll is None or type(reactor) is not epoll.EPollReactor:
        return False
    r: Any = reactor
    fd = transport.fileno()
    if fd not in r._reads or fd in r._writes or r._selectables.get(fd) is not transport:
        return False
    r._selectables[fd] = reader
    return True


# -- endpoints ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TCPClientParts:
    """What a TCP client endpoint connects to, and how."""

    reactor: Any
    host: str
    port: int
    timeout: float
    bind: Any


def tcp_client_parts(endpoint: object) -> TCPClientParts | None:
    """The parts of a plain ``TCP4ClientEndpoint``/``TCP6ClientEndpoint``; None for others."""
    if type(endpoint) not in (TCP4ClientEndpoint, TCP6ClientEndpoint):
        return None
    e: Any = endpoint
    return TCPClientParts(e._reactor, e._host, e._port, e._timeout, e._bindAddress)


def client_endpoint_location(endpoint: object) -> str | None:
    """Where a client endpoint connects: ``host:port``, ``unix:PATH``; None when unknown.

    Read from what Twisted's own endpoints keep (``_hostText`` or ``_host``
    and ``_port``, or ``_path``), for log lines and backend names.
    """
    host = getattr(endpoint, "_hostText", None) or getattr(endpoint, "_host", None)
    port = getattr(endpoint, "_port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    path = getattr(endpoint, "_path", None)
    return f"unix:{path}" if path is not None else None


@dataclass(frozen=True, slots=True)
class TCPServerParts:
    """What a TCP server endpoint listens on."""

    interface: str
    port: int
    backlog: int


def tcp_server_parts(
    endpoint: TCP4ServerEndpoint | TCP6ServerEndpoint | SSL4ServerEndpoint,
) -> TCPServerParts:
    """The interface (``""`` for all), port and backlog a TCP or TLS server endpoint uses."""
    e: Any = endpoint
    return TCPServerParts(e._interface, e._port, e._backlog)


def endpoint_port(endpoint: object) -> int | None:
    """The port a server endpoint (TCP, TLS) will listen on, or None for others (UNIX)."""
    port = getattr(endpoint, "_port", None)
    return port if isinstance(port, int) else None


def tls_server_options(endpoint: SSL4ServerEndpoint) -> object:
    """The TLS options (usually ``CertificateOptions``) an ``ssl:`` server endpoint listens with.

    Their ``getContext()`` is the cached context its connections use
    (``SSL4ServerEndpoint._sslContextFactory``).
    """
    options = getattr(endpoint, "_sslContextFactory", None)
    if options is None:
        raise _unsupported("SSL4ServerEndpoint has no _sslContextFactory")
    return options


# -- the twisted.web takeover ---------------------------------------------------------------


class ConnectionEvents(Protocol):
    """Where a detached connection's events go."""

    def dataReceived(self, data: bytes) -> None: ...

    def connectionLost(self, reason: Failure) -> None: ...


def check_channel(channel: HTTPChannel) -> None:
    """Raise :class:`UnsupportedTwisted` unless ``channel`` has what :func:`detach` needs."""
    missing = [name for name in _CHANNEL_STATE if not hasattr(channel, name)]
    if missing:
        raise _unsupported(f"HTTPChannel has no {', '.join(missing)}")


@dataclass(frozen=True, slots=True)
class Detached:
    """A connection taken from twisted.web: its transport and the bytes held for it."""

    transport: ITransport
    held: bytes


def detach(request: Request, protocol: ConnectionEvents) -> Detached:
    """Take the connection under ``request`` away from twisted.web.

    Every byte the client sent after the request, which ``HTTPChannel`` kept
    unparsed, is returned in ``held``; from now on the connection's data and
    its end go to ``protocol``. The channel stops reading requests, timing out
    and acting as the transport's producer, and reading is resumed in case it
    had paused it.
    """
    channel = request.channel
    check_channel(channel)
    transport = channel.transport
    assert transport is not None, "the client connection is already gone"
    held = channel._buffer + b"".join(channel._dataBuffer)
    channel._buffer = b""
    channel._dataBuffer = []
    channel.setTimeout(None)
    channel._networkProducer.unregisterProducer()  # type: ignore[attr-defined]
    channel.dataReceived = protocol.dataReceived  # type: ignore[method-assign]
    channel.connectionLost = protocol.connectionLost  # type: ignore[method-assign]
    transport.resumeProducing()  # type: ignore[attr-defined]
    return Detached(transport, held)


check_supported()
