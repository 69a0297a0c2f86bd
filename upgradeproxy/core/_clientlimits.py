"""Limits per client address: counts and token buckets, in bounded memory.

The proxy asks this table, for a client, whether one more connection or
one more upgrade is allowed; the table keeps, per client and *scope* (the
whole proxy, or one route), the connections and tunnels it has open and a
token bucket of upgrade attempts. Nothing here does I/O or reads a clock:
the caller gives the time, writes the responses and the log lines.

Who a client is: an IPv4 address, or an IPv6 network of ``ipv6_prefix``
bits (``/64`` by default: one subscriber or one host gets a whole /64 and
can pick any address in it, so keying on the full address would let one
client pass as 2^64). An IPv4-mapped IPv6 address (``::ffff:192.0.2.7``,
what a dual-stack socket reports) is its IPv4 address. Anything else (a
UNIX socket's peer) is its own key.

Memory: an entry with connections or tunnels open stays (there are as
many of those as open sockets, which ``max_connections`` and the
descriptor limit bound); the others are *idle*. An idle entry whose bucket
has filled up again knows nothing worth keeping and is dropped; and at most
``max_idle`` idle entries are kept at all: beyond, the one idle the longest
is forgotten, which gives that client a full bucket again. So a flood of
distinct addresses costs at most ``max_idle`` entries, and it fails open
(a forgotten client is allowed), never closed (an honest client is never
refused because others flooded the table).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

#: A client with this many times its connection limit open is closed at
#: accept, without a response: it is not reading the 503s it was sent.
FAR_OVER = 2
#: Seconds a client over a count (connections, tunnels) is told to wait.
BUSY_RETRY_AFTER = 5
#: Idle entries kept at most (see the module's docstring).
MAX_IDLE = 10_000


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one client address may use at once; ``None``: no limit.

    ``upgrade_rate`` is upgrade attempts per second, sustained;
    ``upgrade_burst`` how many may come at once (the bucket's size; by
    default the rate rounded up, at least 1).
    """

    connections: int | None = None
    tunnels: int | None = None
    upgrade_rate: float | None = None
    upgrade_burst: int | None = None

    @property
    def enforced(self) -> bool:
        """True when any limit is set."""
        return (
            self.connections is not None
            or self.tunnels is not None
            or self.upgrade_rate is not None
        )

    @property
    def burst(self) -> float:
        """The bucket's size (meaningful only with an ``upgrade_rate``)."""
        if self.upgrade_burst is not None:
            return float(self.upgrade_burst)
        return float(max(1, math.ceil(self.upgrade_rate or 1)))


@functools.lru_cache(maxsize=4096)
def client_key(address: str, ipv6_prefix: int = 64) -> str:
    """Who ``address`` is for the limits: the IPv4 address, or the IPv6 network.

    Cached: parsing an address costs more than the rest of a limit check,
    and a client asks for each of its connections and upgrades.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if ipv6_prefix < 128:
            return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


class Limit(enum.Enum):
    """A per-client limit, named as the metrics and the configuration name it."""

    CONNECTIONS = "client_connections"
    TUNNELS = "client_tunnels"
    UPGRADE_RATE = "client_upgrade_rate"


@dataclass(frozen=True, slots=True)
class OverLimit:
    """Why a client is refused: which limit, its value, and when to try again."""

    limit: Limit
    allowed: float
    #: Whole seconds, for ``Retry-After``.
    retry_after: int

    def reason(self, client: str, where: str = "") -> str:
        """The sentence the client and the log get; ``where`` names a route, if any."""
        on = f" on {where}" if where else ""
        if self.limit is Limit.CONNECTIONS:
            what = f"has its limit of {self.allowed:g} connections open"
        elif self.limit is Limit.TUNNELS:
            what = f"has its limit of {self.allowed:g} tunnels open{on}"
        else:
            what = f"made more than {self.allowed:g} upgrade attempts a second{on}"
        wait = self.retry_after
        return f"client {client} {what}; try again in {wait} second{'' if wait == 1 else 's'}"


class _Entry:
    """One client in one scope."""

    __slots__ = ("connections", "full_at", "refilled", "tokens", "tunnels")

    def __init__(self) -> None:
        self.connections = 0
        self.tunnels = 0
        #: Tokens in the bucket at ``refilled``; -1: never used (a full bucket).
        self.tokens = -1.0
        self.refilled = 0.0
        #: When the bucket is full again: an idle entry past it can go.
        self.full_at = 0.0

    @property
    def live(self) -> bool:
        return bool(self.connections or self.tunnels)


#: (scope, client key): scope "" is the whole proxy, otherwise a route's name.
Key = tuple[str, str]


class ClientTable:
    """Connections, tunnels and upgrade buckets per client and scope."""

    def __init__(self, *, max_idle: int = MAX_IDLE) -> None:
        self._max_idle = max_idle
        self._entries: dict[Key, _Entry] = {}
        # Idle entries, the longest idle first.
        self._idle: OrderedDict[Key, None] = OrderedDict()

    def __len__(self) -> int:
        """Entries held, live and idle."""
        return len(self._entries)

    @property
    def idle(self) -> int:
        """Entries with nothing open (see the module's docstring)."""
        return len(self._idle)

    def open_count(self, key: Key) -> tuple[int, int]:
        """The connections and tunnels ``key`` has open."""
        entry = self._entries.get(key)
        return (entry.connections, entry.tunnels) if entry is not None else (0, 0)

    # -- connections ----------------------------------------------------------------

    def far_over(self, key: Key, limit: int) -> bool:
        """True when ``key`` already has :data:`FAR_OVER` times ``limit`` connections open."""
        entry = self._entries.get(key)
        return entry is not None and entry.connections >= FAR_OVER * limit

    def open_connection(self, key: Key, limit: int, now: float) -> OverLimit | None:
        """Count a connection in; say why it must be refused when it is one too many.

        A refused connection stays counted until :meth:`close_connection`,
        as it still holds a socket.
        """
        entry = self._touch(key, now)
        entry.connections += 1
        self._set_live(key)
        if entry.connections > limit:
            return OverLimit(Limit.CONNECTIONS, limit, BUSY_RETRY_AFTER)
        return None

    def close_connection(self, key: Key, now: float) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.connections:
            entry.connections -= 1
            self._set_idle_if_done(key, entry, now)

    # -- upgrades and tunnels ----------------------------------------------------------

    def admit_upgrade(
        self, scopes: list[tuple[Key, ClientLimits]], now: float
    ) -> tuple[Key, OverLimit] | None:
        """One upgrade attempt, checked in every scope: all admit it, or none is charged.

        On admission, each scope with an ``upgrade_rate`` spends a token and
        each with a ``tunnels`` limit reserves a tunnel, which
        :meth:`release_tunnel` gives back (when the upgrade fails, or its
        tunnel ends). Returns the first scope that refuses, and why.
        """
        for key, limits in scopes:
            over = self._refusal(key, limits, now)
            if over is not None:
                return key, over
        for key, limits in scopes:
            entry = self._touch(key, now)
            if limits.upgrade_rate is not None:
                rate, burst = limits.upgrade_rate, limits.burst
                entry.tokens = self._tokens(entry, rate, burst, now) - 1
                entry.refilled = now
                entry.full_at = now + (burst - entry.tokens) / rate
            if limits.tunnels is not None:
                entry.tunnels += 1
                self._set_live(key)
            else:
                self._set_idle_if_done(key, entry, now)
        return None

    def release_tunnel(self, key: Key, now: float) -> None:
        """A tunnel reserved by :meth:`admit_upgrade` ended, or never started."""
        entry = self._entries.get(key)
        if entry is not None and entry.tunnels:
            entry.tunnels -= 1
            self._set_idle_if_done(key, entry, now)

    def _refusal(self, key: Key, limits: ClientLimits, now: float) -> OverLimit | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if limits.tunnels is not None and entry.tunnels >= limits.tunnels:
            return OverLimit(Limit.TUNNELS, limits.tunnels, BUSY_RETRY_AFTER)
        rate = limits.upgrade_rate
        if rate is not None:
            tokens = self._tokens(entry, rate, limits.burst, now)
            if tokens < 1:
                wait = max(1, math.ceil((1 - tokens) / rate))
                return OverLimit(Limit.UPGRADE_RATE, rate, wait)
        return None

    @staticmethod
    def _tokens(entry: _Entry, rate: float, burst: float, now: float) -> float:
        if entry.tokens < 0:
            return burst
        return min(burst, entry.tokens + (now - entry.refilled) * rate)

    # -- memory ---------------------------------------------------------------------------

    def _touch(self, key: Key, now: float) -> _Entry:
        """The entry for ``key``, made if needed; expired idle entries go first."""
        self._expire(now)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        elif key in self._idle:
            self._idle.move_to_end(key)
        return entry

    def _set_live(self, key: Key) -> None:
        self._idle.pop(key, None)

    def _set_idle_if_done(self, key: Key, entry: _Entry, now: float) -> None:
        if entry.live:
            return
        if entry.full_at <= now:
            self._idle.pop(key, None)
            del self._entries[key]
            return
        self._idle[key] = None
        self._idle.move_to_end(key)
        while len(self._idle) > self._max_idle:
            self._forget_oldest()

    def _expire(self, now: float) -> None:
        """Drop idle entries whose bucket is full again, from the longest idle.

        Two at most per call: the cost of a call stays constant, and entries
        are touched more often than they expire.
        """
        for _ in range(2):
            if not self._idle:
                return
            oldest = next(iter(self._idle))
            if self._entries[oldest].full_at > now:
                return
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        key, _ = self._idle.popitem(last=False)
        del self._entries[key]
