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

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorFDSet,
    IReactorTime,
    ISSLTransport,
    ITransport,
)
from twisted.python.failure import Failure

from ._failures import describe_close
from ._flow import unregister_producer
from ._side import ByteCounts, Side
from ._splice import SplicePump, can_splice
from ._timers import cancel

#: The idle check runs this often, as a share of the idle timeout.
_IDLE_CHECK = 0.25


def _can_half_close(transport: ITransport) -> bool:
    return hasattr(transport, "loseWriteConnection") and not ISSLTransport.providedBy(transport)


@dataclass(slots=True)
class TunnelStats:
    """What the access record at the end of a tunnel reports."""

    protocol: str
    client: str
    started: float
    target: str = ""
    route: str = ""
    backend: str = ""
    ended: float = 0.0
    sent: ByteCounts = field(default_factory=ByteCounts)
    #: Who ended the tunnel first: "client", "backend" or "proxy".
    closed_by: str = ""
    close_reason: str = ""
    #: The protocol the client spoke before the switch: "HTTP/1.1" or "HTTP/2".
    client_protocol: str = "HTTP/1.1"

    @property
    def duration(self) -> float:
        return self.ended - self.started

    @property
    def moved(self) -> int:
        """Bytes moved so far, both directions together."""
        sent = self.sent
        return sent.client + sent.backend


class Tunnel:
    """Copies bytes both ways between two connected transports.

    The owning protocols forward their events: :meth:`data` for bytes,
    :meth:`read_closed` for an EOF (``IHalfCloseableProtocol.readConnectionLost``)
    and :meth:`lost` for ``connectionLost``. ``on_end`` is called once, when
    both connections are gone; ``stats`` then holds the whole story.

    ``idle_timeout`` closes the tunnel when no byte moved either way for that
    long (checked every quarter of it, so it closes between 1 and 1.25 times
    the timeout after the last byte; counting bytes costs nothing per chunk).
    ``lifetime`` closes it that long after it started, whatever it does.
    """

    # An idle tunnel lives as long as its peers like: slots, not a dict.
    __slots__ = (
        "_backend", "_client", "_clock", "_eof", "_idle_checks", "_idle_seen", "_idle_timeout",
        "_idle_timer", "_lifetime_timer", "_lost", "_on_end", "_pump", "_splice", "stats",
    )  # fmt: skip

    def __init__(
        self,
        client: ITransport,
        backend: ITransport,
        *,
        stats: TunnelStats,
        clock: IReactorTime,
        on_end: Callable[[Tunnel], None] | None = None,
        splice: bool = False,
        idle_timeout: float | None = None,
        lifetime: float | None = None,
    ) -> None:
        # Two fields rather than a dict by side: an idle tunnel keeps them all its life.
        self._client = client
        self._backend = backend
        self._clock = clock
        # Tuples of at most two sides: an idle tunnel holds nothing for them.
        self._eof: tuple[Side, ...] = ()
        self._lost: tuple[Side, ...] = ()
        self._on_end = on_end
        self._splice = splice
        self._pump: SplicePump | None = None
        self.stats = stats
        self._idle_timeout = idle_timeout
        self._idle_timer: IDelayedCall | None = None
        self._idle_seen = 0
        self._idle_checks = 0
        self._lifetime_timer: IDelayedCall | None = None
        if lifetime:
            self._lifetime_timer = clock.callLater(
                lifetime, self.close, f"reached its maximum lifetime of {lifetime:g} seconds"
            )
        if idle_timeout:
            self._idle_timer = clock.callLater(idle_timeout * _IDLE_CHECK, self._check_idle)

    @property
    def spliced(self) -> bool:
        """True when the kernel moves this tunnel's bytes (see :mod:`upgradeproxy.core._splice`)."""
        return self._pump is not None

    def transport(self, side: Side) -> ITransport:
        return self._client if side is Side.CLIENT else self._backend

    def start(self) -> None:
        """Start moving bytes: with ``splice(2)`` where possible, otherwise in Python.

        The Python relay wires flow control by making each transport the
        producer of the other: a side's reads pause while the other's send
        buffer is full.
        """
        client, backend = self._client, self._backend
        if (
            self._splice
            and IReactorFDSet.providedBy(self._clock)
            and can_splice(client)
            and can_splice(backend)
        ):
            self._pump = SplicePump(
                {Side.CLIENT: client, Side.BACKEND: backend},  # type: ignore[dict-item]
                self.stats.sent,
                self._note_first,
                self._clock,
            )
            self._pump.start()
            return
        client.registerProducer(backend, True)  # type: ignore[attr-defined]
        backend.registerProducer(client, True)  # type: ignore[attr-defined]

    def data(self, side: Side, data: bytes) -> None:
        """Bytes arrived from ``side``: pass them on unchanged."""
        self.stats.sent.add(side, len(data))
        self.transport(side.peer).write(data)

    def _note_first(self, who: Side | str, why: str) -> None:
        stats = self.stats
        if not stats.closed_by:
            stats.closed_by = who.value if isinstance(who, Side) else who
            stats.close_reason = why

    def read_closed(self, side: Side) -> None:
        """``side`` sent EOF: nothing more will come from it."""
        if self._pump is not None:
            return  # the pump reads the EOF from the socket itself
        if side in self._eof or side in self._lost:
            return
        self._eof += (side,)
        self._note_first(side, "EOF")
        peer = side.peer
        if peer in self._lost:
            return
        peer_transport = self.transport(peer)
        unregister_producer(peer_transport)
        if len(self._eof) == 2:
            self._close_both()
        elif _can_half_close(peer_transport) and _can_half_close(self.transport(side)):
            peer_transport.loseWriteConnection()  # type: ignore[attr-defined]
        else:
            self._close_both()

    def lost(self, side: Side, reason: Failure) -> None:
        """``side``'s connection is gone: close the other one, keeping what it was sent."""
        if side in self._lost:
            return
        self._lost += (side,)
        self._note_first(side, describe_close(reason))
        peer = side.peer
        if peer not in self._lost:
            peer_transport = self.transport(peer)
            unregister_producer(peer_transport)
            peer_transport.loseConnection()
            return
        self._end()

    def close(self, why: str = "closed by the proxy") -> None:
        """Close both connections from the proxy's side (a timeout, a shutdown)."""
        self._note_first("proxy", why)
        if self._pump is not None:
            self._pump.close()
        else:
            self._close_both()

    def _check_idle(self) -> None:
        timeout = self._idle_timeout
        assert timeout is not None
        moved = self.stats.moved
        if moved != self._idle_seen:
            self._idle_seen, self._idle_checks = moved, 0
        else:
            self._idle_checks += 1
            if self._idle_checks * _IDLE_CHECK >= 1:
                self._idle_timer = None
                self.close(f"idle for {timeout:g} seconds")
                return
        self._idle_timer = self._clock.callLater(timeout * _IDLE_CHECK, self._check_idle)

    def _stop_timers(self) -> None:
        cancel(self._idle_timer)
        cancel(self._lifetime_timer)
        self._idle_timer = self._lifetime_timer = None

    def _close_both(self) -> None:
        for side, transport in ((Side.CLIENT, self._client), (Side.BACKEND, self._backend)):
            if side not in self._lost:
                unregister_producer(transport)
                transport.loseConnection()

    def _end(self) -> None:
        self._stop_timers()
        self.stats.ended = self._clock.seconds()
        if self._on_end is not None:
            self._on_end(self)
