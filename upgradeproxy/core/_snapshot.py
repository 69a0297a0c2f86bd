"""What the proxy counts, and its state as plain data for metrics and the status page.

:class:`ProxyStats` holds the counters since the start; :func:`take_snapshot`
turns them and the live tunnels and backends into the JSON-ready dictionary
that :mod:`upgradeproxy.ops.metrics` and :mod:`upgradeproxy.ops.status` read (with
``--workers``, each worker's snapshot crosses a pipe as JSON).
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ._clientlimits import ClientLimits
from ._side import Side
from ._tunnel import Tunnel
from .balancer import Backend
from .routing import Route

#: Refusals kept for the status page.
RECENT_REFUSALS = 100


@dataclass(slots=True)
class ProxyStats:
    """Counters since the start, for metrics and the status page."""

    started: float = field(default_factory=time.time)
    connections_total: int = 0
    #: (route, status) -> requests answered.
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    #: (route, validator, stage) -> upgrades refused.
    refusals: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    recent_refusals: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=RECENT_REFUSALS)
    )
    #: limit name -> requests or connections turned away by it.
    limit_rejections: Counter[str] = field(default_factory=Counter)
    tunnels_total: Counter[str] = field(default_factory=Counter)
    #: Bytes of tunnels that ended, per direction.
    ended_tunnel_bytes: dict[Side, int] = field(
        default_factory=lambda: {Side.CLIENT: 0, Side.BACKEND: 0}
    )
    #: Unix time the configuration in use was applied, and what names its content.
    config_loaded: float = field(default_factory=time.time)
    config_digest: str = ""
    #: "ok" or "failed" -> reconfigurations (reloads) with that result.
    reloads: Counter[str] = field(default_factory=Counter)
    #: False while the last reload failed (the configuration before it serves).
    last_reload_ok: bool = True

    def reconfigured(self, digest: str) -> None:
        """A new configuration was applied."""
        self.config_loaded = time.time()
        self.config_digest = digest
        self.reloads["ok"] += 1
        self.last_reload_ok = True

    def reload_failed(self) -> None:
        """A new configuration was refused; the one in use stays."""
        self.reloads["failed"] += 1
        self.last_reload_ok = False


@dataclass(frozen=True, slots=True)
class TunnelState:
    """One open tunnel."""

    protocol: str
    client: str
    backend: str
    route: str
    #: Seconds since it opened.
    age: float
    client_to_backend: int
    backend_to_client: int
    spliced: bool
    #: The protocol the client opened it with: "HTTP/1.1" or "HTTP/2".
    client_protocol: str = "HTTP/1.1"


@dataclass(frozen=True, slots=True)
class BackendState:
    """One backend of one route."""

    route: str
    backend: str
    #: False from a failed connection or health check until one works again,
    #: even while the backend is still in use (a route's only backend stays).
    healthy: bool
    #: Requests in flight plus tunnels open.
    active: int
    failures: int
    #: Why it is not healthy; "" while it is.
    last_error: str
    #: True for a backend a reload removed, kept until its last request or tunnel ends.
    draining: bool = False
    #: False while new requests skip it (see ``Backend.healthy``).
    in_rotation: bool = True
    #: Connections to it that failed since the last one that worked.
    failures_in_a_row: int = 0


def tunnel_state(tunnel: Tunnel, now: float) -> TunnelState:
    t = tunnel.stats
    return TunnelState(
        t.protocol, t.client, t.backend, t.route, now - t.started,
        t.sent[Side.CLIENT], t.sent[Side.BACKEND], tunnel.spliced, t.client_protocol,
    )  # fmt: skip


def backend_state(route: str, b: Backend, draining: bool = False) -> BackendState:
    return BackendState(
        route, b.name, not b.down, b.active, b.failures, b.error, draining, b.healthy,
        b.failures_in_a_row,
    )  # fmt: skip


def backend_states(
    routes: Iterable[Route], draining: Iterable[tuple[str, Backend]] = ()
) -> list[BackendState]:
    """The backends of ``routes``, then those drained after a reload."""
    states = [backend_state(route.name, b) for route in routes for b in route.group.backends]
    states += (backend_state(route, b, draining=True) for route, b in draining)
    return states


def take_snapshot(
    stats: ProxyStats,
    connections: int,
    tunnels: Mapping[Tunnel, Backend],
    routes: Iterable[Route],
    draining: Iterable[tuple[str, Backend]],
    max_connections: int | None,
    max_tunnels: int | None,
    now: float,
    *,
    client_limits: ClientLimits | None = None,
    client_entries: int = 0,
) -> dict[str, Any]:
    """The proxy's state as a JSON-ready dictionary (``now`` on the proxy's clock).

    ``client_entries`` is how many client addresses the per-client limits track.
    """
    client_limits = client_limits or ClientLimits()
    live = [tunnel_state(tunnel, now) for tunnel in tunnels]
    ended = stats.ended_tunnel_bytes
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "started": stats.started,
        "connections": connections,
        "connections_total": stats.connections_total,
        "requests": [{"route": r, "status": s, "count": n} for (r, s), n in stats.requests.items()],
        "refusals": [
            {"route": r, "validator": v, "stage": s, "count": n}
            for (r, v, s), n in stats.refusals.items()
        ],
        "recent_refusals": list(stats.recent_refusals),
        "limit_rejections": [
            {"limit": name, "count": n} for name, n in stats.limit_rejections.items()
        ],
        "tunnels": [asdict(t) for t in live],
        "tunnels_total": [{"protocol": p, "count": n} for p, n in stats.tunnels_total.items()],
        "tunnel_bytes": {
            "client_to_backend": ended[Side.CLIENT] + sum(t.client_to_backend for t in live),
            "backend_to_client": ended[Side.BACKEND] + sum(t.backend_to_client for t in live),
        },
        "backends": [asdict(b) for b in backend_states(routes, draining)],
        "limits": {
            "max_connections": max_connections,
            "max_tunnels": max_tunnels,
            "client_connections": client_limits.connections,
            "client_tunnels": client_limits.tunnels,
            "client_upgrade_rate": client_limits.upgrade_rate,
        },
        "client_entries": client_entries,
        "config": {
            "loaded": stats.config_loaded,
            "digest": stats.config_digest,
            "reloads": {"ok": stats.reloads["ok"], "failed": stats.reloads["failed"]},
            "last_reload_ok": stats.last_reload_ok,
        },
    }
