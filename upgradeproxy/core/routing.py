"""Which route serves a request: by ``Host`` and by path prefix.

A route owns a group of backends and the rules of its requests: validators,
a body size limit, tunnel timeouts. The router picks, for a request, the
route whose host pattern matches the request's host and whose path prefix is
the longest one that matches its path. Routes that name hosts win over
routes for any host, exact names over wildcards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..http1 import RequestHead
from ..interfaces import IUpgradeValidator
from ._clientlimits import ClientLimits
from ._rewrite import split_target
from .balancer import BackendGroup


@dataclass(eq=False, slots=True)
class Route:
    """Where some requests go and the rules they follow."""

    name: str
    group: BackendGroup
    validators: tuple[IUpgradeValidator, ...]
    #: Lower-case host names, ``*.example.com`` wildcards allowed; empty: any host.
    hosts: tuple[str, ...] = ()
    #: Path prefix; ``/`` matches every path.
    path: str = "/"
    #: Largest request body accepted (413 beyond); None: no limit.
    max_request_body: int | None = None
    #: Seconds without a byte either way before a tunnel is closed; None: never.
    tunnel_idle_timeout: float | None = None
    #: Seconds after which a tunnel is closed whatever it does; None: never.
    tunnel_lifetime: float | None = None
    #: Tunnels and upgrade attempts per client address on this route, counted
    #: apart from the proxy's own per-client limits; None: only those.
    client_limits: ClientLimits | None = None
    _prefix: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._prefix = self.path.encode("utf-8").rstrip(b"/")

    def matches_path(self, path: bytes) -> bool:
        """True when ``path`` is this route's prefix or lies under it.

        ``/api`` serves ``/api``, ``/api/x`` and ``/api?q``, not ``/apis``.
        """
        prefix = self._prefix
        if not prefix:
            return True
        if not path.startswith(prefix):
            return False
        rest = path[len(prefix) : len(prefix) + 1]
        return rest in (b"", b"/", b"?")


def host_name(authority: bytes | None) -> str:
    """The lower-case host of a ``Host`` value or target authority, without its port."""
    if not authority:
        return ""
    text = authority.decode("latin-1").lower()
    if text.startswith("["):
        return text[: text.find("]") + 1]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _host_rank(pattern: str, host: str) -> int:
    """How well ``pattern`` matches ``host``: 2 exact, 1 wildcard, 0 not at all."""
    if pattern == host:
        return 2
    if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
        return 1
    return 0


class Router:
    """Picks the route for each request."""

    def __init__(self, routes: Sequence[Route]) -> None:
        if not routes:
            raise ValueError("a router needs at least one route")
        self.routes = tuple(routes)
        # The common deployment, one route for everything, needs no matching.
        only = self.routes[0]
        catch_all = len(self.routes) == 1 and not only.hosts and not only._prefix
        self._catch_all = only if catch_all else None

    def route_for(self, head: RequestHead) -> Route | None:
        """The route for a request head: by its target's authority or ``Host``, and its path.

        Raises :class:`~upgradeproxy.http1.ProtocolError` for a target that is
        neither a path nor an absolute URL.
        """
        if self._catch_all is not None:
            return self._catch_all  # no need to look at the target
        path, authority = split_target(head.target)
        return self.match(authority or head.headers.get(b"host"), path)

    def match(self, host: bytes | None, path: bytes) -> Route | None:
        """The route for a request to ``host`` (its ``Host`` value) and ``path``, or None."""
        if self._catch_all is not None:
            return self._catch_all
        name = host_name(host)
        best: Route | None = None
        best_key = (-1, -1)
        for route in self.routes:
            if route.hosts:
                rank = max(_host_rank(pattern, name) for pattern in route.hosts)
                if not rank:
                    continue
            else:
                rank = 0
            if not route.matches_path(path):
                continue
            key = (rank, len(route._prefix))
            if key > best_key:
                best, best_key = route, key
        return best
