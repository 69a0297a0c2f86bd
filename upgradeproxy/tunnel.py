"""Raw pass-through between a client and a backend after a protocol switch.

The tunnel never parses and never writes HTTP: after ``101`` there is no HTTP
on either connection. It copies each side's bytes to the other unchanged,
with each transport registered as the producer of the other so that a slow
reader pauses the fast writer (memory stays bounded by the transports'
buffers). An EOF on one side half-closes the other where the transports can
(plain TCP and UNIX sockets, not TLS); any other end of either connection
closes both, after what was already written has been flushed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import error
from twisted.internet.interfaces import IReactorFDSet, IReactorTime, ISSLTransport, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from .flow import unregister_producer
from .splice import SplicePump, can_splice


class Side(enum.Enum):
    """One of the two connections of a tunnel."""

    CLIENT = "client"
    BACKEND = "backend"

    @property
    def peer(self) -> Side:
        return Side.BACKEND if self is Side.CLIENT else Side.CLIENT


def _can_half_close(transport: ITransport) -> bool:
    return hasattr(transport, "loseWriteConnection") and not ISSLTransport.providedBy(transport)


def describe_close(reason: Failure) -> str:
    """A few words saying how a connection ended, for the log."""
    if reason.check(error.ConnectionDone):
        return "closed"
    if reason.check(error.ConnectionLost):
        return "connection lost (reset)"
    return reason.getErrorMessage()


@dataclass(slots=True)
class TunnelStats:
    """What the log line at the end of a tunnel reports."""

    protocol: str
    client: str
    started: float
    ended: float = 0.0
    sent: dict[Side, int] = field(default_factory=lambda: {Side.CLIENT: 0, Side.BACKEND: 0})
    first_closed: Side | None = None
    first_close_reason: str = ""

    @property
    def duration(self) -> float:
        return self.ended - self.started


class Tunnel:
    """Copies bytes both ways between two connected transports.

    The owning protocols forward their events: :meth:`data` for bytes,
    :meth:`read_closed` for an EOF (``IHalfCloseableProtocol.readConnectionLost``)
    and :meth:`lost` for ``connectionLost``. ``on_end`` is called once, with
    the tunnel's statistics, when both connections are gone.
    """

    log = Logger()

    def __init__(
        self,
        client: ITransport,
        backend: ITransport,
        *,
        protocol: str,
        client_address: str,
        clock: IReactorTime,
        on_end: Callable[[Tunnel], None] | None = None,
        splice: bool = False,
    ) -> None:
        self._transports = {Side.CLIENT: client, Side.BACKEND: backend}
        self._clock = clock
        self._eof: set[Side] = set()
        self._lost: set[Side] = set()
        self._on_end = on_end
        self._splice = splice
        self._pump: SplicePump | None = None
        self.stats = TunnelStats(protocol, client_address, clock.seconds())

    @property
    def spliced(self) -> bool:
        """True when the kernel moves this tunnel's bytes (see :mod:`upgradeproxy.splice`)."""
        return self._pump is not None

    def transport(self, side: Side) -> ITransport:
        return self._transports[side]

    def start(self) -> None:
        """Start moving bytes: with ``splice(2)`` where possible, otherwise in Python.

        The Python relay wires flow control by making each transport the
        producer of the other: a side's reads pause while the other's send
        buffer is full.
        """
        client, backend = self._transports[Side.CLIENT], self._transports[Side.BACKEND]
        if (
            self._splice
            and IReactorFDSet.providedBy(self._clock)
            and can_splice(client)
            and can_splice(backend)
        ):
            self._pump = SplicePump(self, self._clock)
            self._pump.start()
            return
        client.registerProducer(backend, True)  # type: ignore[attr-defined]
        backend.registerProducer(client, True)  # type: ignore[attr-defined]

    def note_end(self, side: Side, why: str) -> None:
        """``side`` stopped sending (EOF) or failed; the first such event is logged."""
        self._note_first(side, why)

    def data(self, side: Side, data: bytes) -> None:
        """Bytes arrived from ``side``: pass them on unchanged."""
        self.stats.sent[side] += len(data)
        self._transports[side.peer].write(data)

    def _note_first(self, side: Side, why: str) -> None:
        if self.stats.first_closed is None:
            self.stats.first_closed = side
            self.stats.first_close_reason = why

    def read_closed(self, side: Side) -> None:
        """``side`` sent EOF: nothing more will come from it."""
        if self._pump is not None:
            return  # the pump reads the EOF from the socket itself
        if side in self._eof or side in self._lost:
            return
        self._eof.add(side)
        self._note_first(side, "EOF")
        peer = side.peer
        if peer in self._lost:
            return
        peer_transport = self._transports[peer]
        unregister_producer(peer_transport)
        if len(self._eof) == 2:
            self._close_both()
        elif _can_half_close(peer_transport) and _can_half_close(self._transports[side]):
            peer_transport.loseWriteConnection()  # type: ignore[attr-defined]
        else:
            self._close_both()

    def lost(self, side: Side, reason: Failure) -> None:
        """``side``'s connection is gone: close the other one, keeping what it was sent."""
        if side in self._lost:
            return
        self._lost.add(side)
        self._note_first(side, describe_close(reason))
        peer = side.peer
        if peer not in self._lost:
            peer_transport = self._transports[peer]
            unregister_producer(peer_transport)
            peer_transport.loseConnection()
            return
        self._end()

    def close(self) -> None:
        """Close both connections from the proxy's side (for example, at shutdown)."""
        self._note_first(Side.CLIENT, "closed by the proxy")
        if self._pump is not None:
            self._pump.close()
        else:
            self._close_both()

    def _close_both(self) -> None:
        for side, transport in self._transports.items():
            if side not in self._lost:
                unregister_producer(transport)
                transport.loseConnection()

    def _end(self) -> None:
        stats = self.stats
        stats.ended = self._clock.seconds()
        first = stats.first_closed.value if stats.first_closed else "unknown"
        self.log.info(
            "tunnel closed: {protocol} for {client}, {duration:.3f}s, "
            "{up} bytes client→backend, {down} bytes backend→client, "
            "{first} closed first ({why})",
            protocol=stats.protocol,
            client=stats.client,
            duration=stats.duration,
            up=stats.sent[Side.CLIENT],
            down=stats.sent[Side.BACKEND],
            first=first,
            why=stats.first_close_reason,
        )
        if self._on_end is not None:
            self._on_end(self)
