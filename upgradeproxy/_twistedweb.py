"""The one place that reaches into twisted.web's private state.

twisted.web has no public way to take a connection over after a request:
``HTTPChannel`` keeps the bytes that arrived after the request head in
private buffers, and Twisted's own ``WebSocketResource`` never replays
them, so a first frame sent in the same packet as the handshake is lost.
:func:`detach` takes the connection over *with* those bytes.

It relies on these details of ``twisted.web.http.HTTPChannel`` (checked by
:func:`check_supported`, and by ``tests/test_web.py``, which fail loudly when
Twisted changes them):

* ``_buffer`` (from ``LineReceiver``): bytes not yet parsed;
* ``_dataBuffer``: bytes received while a request is being handled;
* ``_networkProducer``: the transport as a push producer, with the channel
  registered on it as producer;
* the channel's ``dataReceived`` and ``connectionLost`` are looked up on the
  instance each time (``_GenericHTTPChannelProtocol`` delegates to them), as
  Twisted's own ``_protocolUpgradeForWebsockets`` also assumes.

The versions of Twisted this was checked against are pinned in pyproject.toml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import ITransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request

_RELIED_ON = ("_buffer", "_dataBuffer", "_networkProducer", "_handlingRequest")


class ConnectionEvents(Protocol):
    """Where a detached connection's events go."""

    def dataReceived(self, data: bytes) -> None: ...

    def connectionLost(self, reason: Failure) -> None: ...


class UnsupportedTwisted(RuntimeError):
    """twisted.web changed in a way the takeover cannot work with."""


def check_supported(channel: HTTPChannel) -> None:
    """Raise :class:`UnsupportedTwisted` unless ``channel`` has what :func:`detach` needs."""
    missing = [name for name in _RELIED_ON if not hasattr(channel, name)]
    if missing:
        import twisted

        raise UnsupportedTwisted(
            f"upgradeproxy's twisted.web takeover does not support Twisted "
            f"{twisted.__version__}: HTTPChannel has no {', '.join(missing)}"
        )


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
    check_supported(channel)
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
