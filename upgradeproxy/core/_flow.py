"""Pausing a transport's reads for more than one reason at a time.

Before a switch, a client connection may have to stop reading because the
backend's send buffer is full, and also because the proxy is holding enough
of the client's early bytes. Each reason pauses and resumes independently;
reading resumes only when no reason is left.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer, ITCPTransport, ITransport
from zope.interface import implementer


def no_delay(transport: object) -> None:
    """Turn Nagle's algorithm off on a TCP transport.

    The proxy relays what it receives at once, often a head and then a body
    in separate writes; with Nagle the second waits for the peer's delayed
    ACK (40 ms on Linux).
    """
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)


def unregister_producer(transport: object) -> None:
    """Unregister ``transport``'s producer, if it has one.

    Transports differ on whether unregistering nothing is an error.
    """
    if transport is not None and getattr(transport, "producer", True) is not None:
        transport.unregisterProducer()  # type: ignore[attr-defined]


class ReadGate:
    """Pauses ``transport`` while any named reason holds."""

    def __init__(self, transport: ITransport) -> None:
        self._transport = transport
        # A tuple, not a set: most connections never pause, and the empty
        # tuple costs nothing, where an empty set costs every connection 216 bytes.
        self._reasons: tuple[str, ...] = ()

    def pause(self, reason: str) -> None:
        if not self._reasons:
            self._transport.pauseProducing()  # type: ignore[attr-defined]
        if reason not in self._reasons:
            self._reasons += (reason,)

    def resume(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons = tuple(r for r in self._reasons if r != reason)
            if not self._reasons:
                self._transport.resumeProducing()  # type: ignore[attr-defined]

    def resume_all(self) -> None:
        if self._reasons:
            self._reasons = ()
            self._transport.resumeProducing()  # type: ignore[attr-defined]

    def producer(self, reason: str) -> IPushProducer:
        """A push producer to register on a consumer whose buffer should pause us."""
        return _GateProducer(self, reason)


@implementer(IPushProducer)
class _GateProducer:
    def __init__(self, gate: ReadGate, reason: str) -> None:
        self._gate = gate
        self._reason = reason

    def pauseProducing(self) -> None:
        self._gate.pause(self._reason)

    def resumeProducing(self) -> None:
        self._gate.resume(self._reason)

    def stopProducing(self) -> None:
        # The consumer went away; its connectionLost is handled by the
        # protocols, which close this side themselves.
        self._gate.resume(self._reason)
