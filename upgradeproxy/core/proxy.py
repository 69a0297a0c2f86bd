"""The proxy itself, apart from any front door: :class:`Proxy`.

It owns its :class:`Configuration` (routes, backends, validators,
timeouts, limits, access log), admission, the registries of client
connections and tunnels, the moment of a switch
(:meth:`Proxy.start_tunnel`), swapping the configuration while it runs
(:meth:`Proxy.reconfigure`), graceful shutdown and the snapshot that
metrics and the status page read. It never reads or writes a client
connection: the front doors (:mod:`upgradeproxy.core._client`,
:mod:`upgradeproxy.web`) do, each through an
:class:`~upgradeproxy.core._exchange.Exchange` per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from ..http1 import RequestHead
from ..interfaces import IUpgradeValidator, Refusal, UpgradeAttempt
from ..validators import RFC9110Validator, WebSocketValidator, unsolicited_switch
from ._backend import BackendConnection, BackendPool, BackendSettings
from ._clientlimits import ClientLimits, ClientTable, Key, OverLimit, client_key
from ._handover import Handover
from ._lograte import LogWindows
from ._side import Side
from ._snapshot import ProxyStats, take_snapshot
from ._tunnel import Tunnel, TunnelStats
from .accesslog import AccessLog, RequestRecord, TunnelRecord
from .address import BackendAddress, describe_endpoint
from .balancer import Backend, BackendGroup, Policy
from .routing import Route, Router
from .tls import HandshakeFailures

#: Seconds given to connections still closing after the shutdown grace period.
CLOSE_MARGIN = 2.0


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Limits and timeouts of the proxy; the defaults suit most deployments.

    The limits on connections and tunnels default to none for an embedded
    factory; the twistd plugin sets 10,000 each.
    """

    max_request_head: int = 32 * 1024
    max_held_bytes: int = 64 * 1024
    #: Seconds a client may take to send a request head (408 after).
    request_head_timeout: float = 60.0
    #: Seconds a kept-alive client connection may stay idle between requests.
    keep_alive_timeout: float = 60.0
    #: Client connections served at once; beyond, new connections get 503.
    max_connections: int | None = None
    #: Tunnels open at once; beyond, new upgrade requests get 503.
    max_tunnels: int | None = None
    #: Seconds a refused client may go on sending before the proxy closes
    #: anyway (so that a reset cannot destroy the error response); 0 closes at once.
    error_linger: float = 2.0
    #: Forward ``Upgrade: h2c`` offers to the backend (off: see ``rewrite.without_h2c``).
    forward_h2c: bool = False
    #: Move tunnel bytes with splice(2) where both sides are plain sockets (Linux).
    splice: bool = True
    #: For a factory built with one backend: its limits and timeouts.
    backend: BackendSettings = field(default_factory=BackendSettings)
    #: For a factory built with one backend: the largest request body (413 beyond).
    max_request_body: int | None = None
    #: For a factory built with one backend: tunnel idle timeout and lifetime.
    tunnel_idle_timeout: float | None = None
    tunnel_lifetime: float | None = None
    #: Limits per client address, over all routes (a route may add its own); off by default.
    client_limits: ClientLimits = field(default_factory=ClientLimits)
    #: The leading bits of an IPv6 client address that name one client (64: its /64).
    client_ipv6_prefix: int = 64
    #: Offer HTTP/2 (``h2``, then ``http/1.1``) to TLS clients over ALPN.
    http2: bool = True
    #: Accept HTTP/2 with prior knowledge (the ``PRI * HTTP/2.0`` preface) on
    #: cleartext connections, as behind a load balancer that terminates TLS.
    http2_cleartext: bool = False
    #: Streams one HTTP/2 client connection may have open at once
    #: (``SETTINGS_MAX_CONCURRENT_STREAMS``; more are refused with ``REFUSED_STREAM``).
    http2_max_concurrent_streams: int = 100
    #: Seconds an HTTP/2 stream may wait on a client that keeps its flow-control
    #: window closed before the stream is reset.
    http2_stall_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class LimitRefusal:
    """Why a connection or request is turned away by a limit, as the door must answer it."""

    status: int
    reason: str
    #: Seconds for ``Retry-After``; None: no such field.
    retry_after: int | None = None
    #: The proxy has logged it already (or chose not to, to keep the log readable).
    logged: bool = False


@dataclass(frozen=True, slots=True)
class Configuration:
    """Everything a :class:`Proxy` is told to do, as one value it swaps whole.

    New requests and new connections read the configuration of the moment;
    a request or tunnel keeps the route (and with it the backends,
    validators, timeouts and limits) it started with. A setting added here,
    to :class:`ProxySettings` or to :class:`~upgradeproxy.core.routing.Route`
    is swapped by :meth:`Proxy.reconfigure` with no further work.
    """

    routes: tuple[Route, ...]
    settings: ProxySettings = field(default_factory=ProxySettings)
    access_log: AccessLog = field(default_factory=AccessLog)
    #: Names this configuration's content, for metrics; the twistd plugin
    #: sets a hash of the checked configuration. "" when nobody named it.
    digest: str = ""
    #: Log a line per route (its backends and validators) when the proxy
    #: starts and when it is reconfigured; the twistd plugin, which logs a
    #: fuller description of its configuration, turns it off.
    log_routes: bool = True
    router: Router = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for route in self.routes:
            for validator in route.validators:
                if not IUpgradeValidator.providedBy(validator):
                    raise TypeError(f"{validator!r} does not provide IUpgradeValidator")
        object.__setattr__(self, "routes", tuple(self.routes))
        object.__setattr__(self, "router", Router(self.routes))


@dataclass(frozen=True, slots=True)
class Reconfigured:
    """What :meth:`Proxy.reconfigure` did to the backends, by ``route/backend`` name."""

    #: Backends of the new configuration that the old one did not have.
    added: tuple[str, ...]
    #: Backends that stayed (same route, same name): their health and counts live on.
    kept: tuple[str, ...]
    #: Backends that left: no new requests; those still busy are drained.
    removed: tuple[str, ...]

    def describe(self) -> str:
        """One line for the log."""
        changes = (("added", self.added), ("kept", self.kept), ("removed", self.removed))
        parts = [f"{label} {', '.join(names)}" for label, names in changes if names]
        return "backends " + "; ".join(parts) if parts else "no backends"


class FrontConnection(TypingProtocol):
    """A client connection as the proxy tracks it, whatever door it came through."""

    #: The client's address (from the PROXY protocol when it is used), for limits and logs.
    address: str

    @property
    def busy(self) -> bool:
        """True while a request is in flight on it."""

    def drain(self) -> None:
        """The proxy is shutting down: close when idle, or after the response in flight."""

    def abort(self) -> None:
        """Close at once, whatever is in flight."""


def _validator_name(validator: IUpgradeValidator) -> str:
    return str(getattr(validator, "name", type(validator).__name__))


class Proxy:
    """The proxy itself: its routes, validators, limits, connections and tunnels.

    Every front door drives its requests through one :class:`Proxy`: the
    listening :class:`~upgradeproxy.ProxyFactory` and the twisted.web
    :class:`~upgradeproxy.web.ProxyResource` each hold one. It decides who
    is admitted, asks the validators, starts tunnels and keeps count; it
    never reads or writes a connection itself.

    With one backend, give ``backend`` (and optionally ``validators``, the
    chain of :class:`~upgradeproxy.interfaces.IUpgradeValidator` providers
    asked about every upgrade; the default is strict RFC 9110 plus the
    RFC 6455 handshake rules). For several backends by host and path, give
    ``routes`` instead; each route carries its own validators.
    """

    log = Logger()

    def __init__(
        self,
        backend: IStreamClientEndpoint | BackendAddress | None = None,
        validators: Iterable[IUpgradeValidator] | None = None,
        *,
        routes: Sequence[Route] | None = None,
        clock: IReactorTime | None = None,
        settings: ProxySettings | None = None,
        scheme: str = "http",
        access_log: AccessLog | None = None,
        configuration: Configuration | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.clock = clock
        self.scheme = scheme
        if configuration is None:
            settings = settings or ProxySettings()
            if (backend is None) == (routes is None):
                raise TypeError("give either a backend, routes or a configuration")
            if routes is None:
                assert backend is not None
                routes = [self._only_route(backend, validators, settings)]
            elif validators is not None:
                raise TypeError("with routes, each route carries its own validators")
            configuration = Configuration(tuple(routes), settings, access_log or AccessLog())
        elif (backend, validators, routes, settings, access_log) != (None,) * 5:
            raise TypeError("give either a configuration, or what to build one with")
        self._configuration = configuration
        #: Backends that a reconfiguration removed while requests or tunnels
        #: still used them, with their route's name: drained, still counted.
        self._retired: dict[Backend, str] = {}
        self.connections: set[FrontConnection] = set()
        self.tunnels: dict[Tunnel, Backend] = {}
        self.stats = ProxyStats(config_digest=configuration.digest)
        #: What each client address has open and its upgrade buckets (see ClientLimits).
        self.clients = ClientTable()
        # The entries that connections and tunnels hold there, to give back the same ones.
        self._connection_keys: dict[FrontConnection, Key] = {}
        self._tunnel_keys: dict[Tunnel, tuple[Key, ...]] = {}
        self._limit_log = LogWindows()
        # Idle backend connections that named one client connection in a PROXY
        # protocol header: no other may use them, so they close with it.
        self._private: dict[object, BackendConnection] = {}
        #: Where the front doors report TLS handshakes with clients that failed.
        self.tls_failures = HandshakeFailures(clock)
        self.draining = False
        self.running = False
        self._drained: Deferred[None] | None = None

    def _only_route(
        self,
        backend: IStreamClientEndpoint | BackendAddress,
        validators: Iterable[IUpgradeValidator] | None,
        settings: ProxySettings,
    ) -> Route:
        if not isinstance(backend, BackendAddress):
            backend = BackendAddress(backend, b"", describe_endpoint(backend))
        group = BackendGroup(
            [backend], policy=Policy.LEAST_CONN, clock=self.clock, settings=settings.backend,
            route="default",
        )  # fmt: skip
        return Route(
            "default",
            group,
            tuple((RFC9110Validator(), WebSocketValidator()) if validators is None else validators),
            max_request_body=settings.max_request_body,
            tunnel_idle_timeout=settings.tunnel_idle_timeout,
            tunnel_lifetime=settings.tunnel_lifetime,
        )

    # -- the configuration ---------------------------------------------------------

    @property
    def configuration(self) -> Configuration:
        """What new requests and connections follow (see :meth:`reconfigure`)."""
        return self._configuration

    @property
    def settings(self) -> ProxySettings:
        """The limits and timeouts of the current configuration."""
        return self._configuration.settings

    @property
    def router(self) -> Router:
        """The router of the current configuration."""
        return self._configuration.router

    @property
    def access_log(self) -> AccessLog:
        """Where requests and tunnels are recorded, the current configuration's."""
        return self._configuration.access_log

    def reconfigure(self, configuration: Configuration) -> Reconfigured:
        """Serve new requests and new connections with ``configuration``; drop nothing.

        Everything the configuration holds changes at once, for what starts
        from now on: routes, backends and their policies, validators,
        timeouts, limits, the access log and health checks. Requests in flight
        and open tunnels keep the route and backend they started with (a
        client connection keeps the head limits and timeouts it was accepted
        with) and stay counted on their backend.

        Backends are matched by route name and backend name. One that stays
        keeps its health, failure count and load; it gets the new connection
        settings, so its idle pooled connections are closed. One that leaves
        takes no new request, its idle connections are closed, and its tunnels
        live on, counted on it, which the snapshot lists as draining until
        they end. Health checks of the old routes stop and those of the new
        ones start.

        Returns what happened to the backends, which is also logged. Raises
        nothing once ``configuration`` exists: whatever could be wrong with it
        was refused when it was built.
        """
        old = self._configuration
        self.draining_backends()  # forgets those that have drained
        previous = {route.name: route for route in old.routes}
        added: list[str] = []
        kept: list[str] = []
        removed: list[str] = []
        taken: set[Route] = set()
        for route in configuration.routes:
            before = previous.pop(route.name, None)
            kept_here: tuple[Backend, ...] = ()
            if before is not None:
                taken.add(before)
                if before.group is route.group:
                    kept_here = route.group.backends
                else:
                    kept_here = route.group.take_over(before.group)
                    left = [b for b in before.group.backends if b not in kept_here]
                    self._retire(route.name, left, removed)
            kept += (f"{route.name}/{b.name}" for b in kept_here)
            added += (f"{route.name}/{b.name}" for b in route.group.backends if b not in kept_here)
        for route in old.routes:
            if route not in taken:
                self._retire(route.name, route.group.backends, removed)
        for route in old.routes:
            route.group.stop()
        self._configuration = configuration
        self.stats.reconfigured(configuration.digest)
        done = Reconfigured(tuple(added), tuple(kept), tuple(removed))
        self.log.info(
            "configuration applied: {routes} routes; {backends}",
            routes=len(configuration.routes),
            backends=done.describe(),
        )
        if self.running:
            self._start_routes(configuration.routes)
        return done

    def _retire(self, route: str, backends: Iterable[Backend], names: list[str]) -> None:
        for backend in backends:
            names.append(f"{route}/{backend.name}")
            backend.pool.retire()
            self._retired[backend] = route

    def reconfigure_failed(self) -> None:
        """Count a reconfiguration that was refused before it reached the proxy.

        Whoever checks new configurations (the twistd plugin, on SIGHUP)
        calls it, so that the metrics say the last reload failed.
        """
        self.stats.reload_failed()

    def draining_backends(self) -> list[tuple[str, Backend]]:
        """Backends a reconfiguration removed that requests or tunnels still use, by route.

        Those no request or tunnel uses any more are forgotten here.
        """
        for backend in [b for b in self._retired if not b.active]:
            del self._retired[backend]
        return [(route, backend) for backend, route in self._retired.items()]

    # -- single-backend conveniences ------------------------------------------------

    @property
    def _first_backend(self) -> Backend:
        return self.router.routes[0].group.backends[0]

    @property
    def pool(self) -> BackendPool:
        """The connection pool of the first backend (the only one, with one backend)."""
        return self._first_backend.pool

    @property
    def backend_name(self) -> str:
        """The name of the first backend (the only one, with one backend)."""
        return self._first_backend.name

    @property
    def validators(self) -> tuple[IUpgradeValidator, ...]:
        """The validators of the first route (the only one, with one backend)."""
        return self.router.routes[0].validators

    # -- start and stop ---------------------------------------------------------------

    def start(self) -> None:
        """Say what is proxied where, and start the backends' health checks."""
        if self.running:
            return
        self.running = True
        self._start_routes(self.router.routes)

    def _start_routes(self, routes: Sequence[Route]) -> None:
        for route in routes:
            if self._configuration.log_routes:
                self._log_route(route, len(routes) > 1)
            route.group.start()

    def _log_route(self, route: Route, several: bool) -> None:
        names = ", ".join(str(getattr(v, "name", v)) for v in route.validators) or "none"
        backends = ", ".join(b.name for b in route.group.backends)
        where = " ".join([*route.hosts, route.path]) if several else ""
        self.log.info(
            "proxying {where}to {backends}; upgrade validators: {validators}",
            where=f"{where} " if where else "",
            backends=backends,
            validators=names,
        )

    def stop(self) -> None:
        """Stop the health checks and close idle backend connections."""
        if not self.running:
            return
        self.running = False
        for route in self.router.routes:
            route.group.stop()
            route.group.close_idle()

    # -- routing and validators -------------------------------------------------------

    def route_for(self, head: RequestHead) -> Route | None:
        """The route that serves ``head``, or None when no route does."""
        return self.router.route_for(head)

    def check_request(self, attempt: UpgradeAttempt, route: Route) -> Refusal | None:
        """The first refusal of ``route``'s chain for an upgrade request, or ``None``."""
        return self._ask("check_request", attempt, route)

    def check_response(self, attempt: UpgradeAttempt, route: Route) -> Refusal | None:
        """The first refusal of ``route``'s chain for a backend's ``101``, or ``None``."""
        refusal = self._ask("check_response", attempt, route)
        if refusal is None:
            refusal = unsolicited_switch(attempt)
            if refusal is not None:
                self._count_refusal(route, attempt, "rfc9110", "response", refusal)
        return refusal

    def _ask(self, method: str, attempt: UpgradeAttempt, route: Route) -> Refusal | None:
        for validator in route.validators:
            try:
                refusal: Refusal | None = getattr(validator, method)(attempt)
            except Exception:
                name = _validator_name(validator)
                self.log.failure("upgrade validator {name} raised", name=name)
                refusal = Refusal(f"upgrade validator {name} failed", 500)
            if refusal is not None:
                stage = method.removeprefix("check_")
                self._count_refusal(route, attempt, _validator_name(validator), stage, refusal)
                return refusal
        return None

    def _count_refusal(
        self, route: Route, attempt: UpgradeAttempt, validator: str, stage: str, refusal: Refusal
    ) -> None:
        stats = self.stats
        stats.refusals[route.name, validator, stage] += 1
        stats.recent_refusals.append(
            {
                "time": time.time(),
                "route": route.name,
                "client": attempt.client,
                "target": attempt.request.target.decode("latin-1"),
                "validator": validator,
                "stage": stage,
                "status": 502 if stage == "response" else refusal.status,
                "reason": refusal.reason,
            }
        )

    # -- bookkeeping ---------------------------------------------------------------

    def client_key(self, address: str) -> str:
        """Who ``address`` is for the per-client limits (an IPv6 client is its network)."""
        return client_key(address, self.settings.client_ipv6_prefix)

    def accepts(self, peer: object) -> bool:
        """False when a new connection from ``peer`` is to be closed at once, unanswered.

        That is when the client already has twice its connection limit open
        (:data:`~upgradeproxy.core._clientlimits.FAR_OVER`): the 503 responses it
        was sent did not slow it down, and answering more costs more than it tells.
        """
        limit = self.settings.client_limits.connections
        if limit is None:
            return True
        address = str(getattr(peer, "host", None) or peer)
        if not self.clients.far_over(("", self.client_key(address)), limit):
            return True
        self.stats.limit_rejections["client_connections_closed_at_accept"] += 1
        self._log_limit(
            address,
            f"closed a new connection from {address} unanswered: it has twice its limit "
            f"of {limit} connections open",
        )
        return False

    def connection_opened(self, connection: FrontConnection) -> LimitRefusal | None:
        """Count ``connection`` in; return why it must be refused (503), or ``None``."""
        self.connections.add(connection)
        self.stats.connections_total += 1
        if self.draining:
            return LimitRefusal(503, "the proxy is shutting down")
        settings = self.settings
        limit = settings.max_connections
        if limit is not None and len(self.connections) > limit:
            self.stats.limit_rejections["max_connections"] += 1
            return LimitRefusal(
                503, f"the proxy is serving its limit of {limit} connections; try again later"
            )
        per_client = settings.client_limits.connections
        if per_client is None:
            return None
        key = ("", self.client_key(connection.address))
        self._connection_keys[connection] = key
        over = self.clients.open_connection(key, per_client, self.clock.seconds())
        return None if over is None else self._over_limit(503, over, connection.address, "")

    def connection_replaced(self, old: FrontConnection, new: FrontConnection) -> None:
        """``new`` serves what was ``old``'s connection (an HTTP/2 door chosen over ALPN)."""
        self.connections.discard(old)
        self.connections.add(new)
        key = self._connection_keys.pop(old, None)
        if key is not None:
            self._connection_keys[new] = key
        private = self._private.pop(old, None)
        if private is not None:
            self._private[new] = private

    def connection_closed(self, connection: FrontConnection) -> None:
        self.connections.discard(connection)
        # Most proxies use neither: a test of the dicts costs less than a pop.
        if self._connection_keys:
            key = self._connection_keys.pop(connection, None)
            if key is not None:
                self.clients.close_connection(key, self.clock.seconds())
        if self._private:
            private = self._private.pop(connection, None)
            if private is not None and private.is_idle:
                private.transport.loseConnection()  # type: ignore[union-attr]
        self._check_drained()

    def keep_private(self, client: object, backend: BackendConnection) -> None:
        """``backend``, idle in its pool, serves only ``client``: close it when ``client`` closes.

        Only for connections the proxy tracks (the twisted.web door tracks each
        request apart from its client side, since twisted.web's connection
        outlives it: its private connections close at the pool's idle timeout).
        """
        if client in self.connections:
            self._private[client] = backend

    def tunnel_refusal(self) -> str | None:
        """Why a new upgrade must be refused now (503), or ``None``."""
        limit = self.settings.max_tunnels
        if limit is not None and len(self.tunnels) >= limit:
            self.stats.limit_rejections["max_tunnels"] += 1
            return f"the proxy has its limit of {limit} tunnels open; try again later"
        return None

    def admit_upgrade(
        self, address: str, route: Route
    ) -> tuple[LimitRefusal | None, tuple[Key, ...]]:
        """Check an upgrade attempt from ``address`` against the per-client limits.

        Returns the refusal (429), or the tunnel reservations the attempt
        holds, which :meth:`release_client` gives back when it fails, or
        :meth:`start_tunnel` takes over for the tunnel's life.
        """
        scopes: list[tuple[Key, ClientLimits]] = []
        client = None
        if self.settings.client_limits.enforced:
            client = self.client_key(address)
            scopes.append((("", client), self.settings.client_limits))
        if route.client_limits is not None and route.client_limits.enforced:
            client = client or self.client_key(address)
            scopes.append(((route.name, client), route.client_limits))
        if not scopes:
            return None, ()
        refused = self.clients.admit_upgrade(scopes, self.clock.seconds())
        if refused is not None:
            (scope, _), over = refused
            where = f"route {scope}" if scope else ""
            return self._over_limit(429, over, address, where), ()
        return None, tuple(key for key, limits in scopes if limits.tunnels is not None)

    def release_client(self, keys: tuple[Key, ...]) -> None:
        """Give back tunnel reservations of :meth:`admit_upgrade` that no tunnel uses."""
        now = self.clock.seconds()
        for key in keys:
            self.clients.release_tunnel(key, now)

    def _over_limit(self, status: int, over: OverLimit, address: str, where: str) -> LimitRefusal:
        """The refusal for a client over a limit: counted, logged at most once a minute."""
        self.stats.limit_rejections[over.limit.value] += 1
        reason = over.reason(address, where)
        self._log_limit(address, f"{status} to {address}: {reason}")
        return LimitRefusal(status, reason, over.retry_after, logged=True)

    def _log_limit(self, address: str, line: str) -> None:
        notes = self._limit_log.note(self.client_key(address), self.clock.seconds())
        if notes is not None:
            self.log.info("{line}{notes}", line=line, notes=notes)

    def request_done(self, route: Route | None, record: RequestRecord) -> None:
        """A request was answered: count it and log it."""
        self.stats.requests[route.name if route else "-", record.status] += 1
        self.access_log.emit(record)

    def start_tunnel(
        self,
        attempt: UpgradeAttempt,
        *,
        route: Route,
        upstream: Backend,
        backend: BackendConnection,
        early_data: bytes,
        client: Handover,
        attach: Callable[[Tunnel], None],
        client_keys: tuple[Key, ...] = (),
    ) -> Tunnel:
        """Switch an accepted upgrade to raw pass-through; return the running tunnel.

        In one reactor turn, so that no byte can slip in between: the door
        has answered the client already (``101``, or ``:status 200`` on an
        HTTP/2 stream) when it handed ``client`` over; write ``early_data``
        (what the backend sent right behind its ``101`` head) to the client,
        then replay the client's held bytes
        (``client.held``, which nobody parsed) into the backend, then hand
        both connections to a :class:`~upgradeproxy.core._tunnel.Tunnel`.
        ``upstream`` stays busy until the tunnel ends. ``attach`` routes the
        client connection's events to the tunnel; it is called before the
        tunnel starts, because starting may already end it (a client that
        reset while its bytes were held). ``client_keys`` are the tunnel
        reservations of :meth:`admit_upgrade`, held until the tunnel ends.
        """
        response = attempt.response
        assert response is not None and backend.transport is not None
        transport = client.transport
        protocol = b", ".join(attempt.selected).decode("latin-1")
        target = attempt.request.target.decode("latin-1")
        clock = self.clock
        stats = TunnelStats(
            protocol, attempt.client, clock.seconds(), target, route.name, upstream.name,
            client_protocol=attempt.client_protocol,
        )  # fmt: skip
        tunnel = Tunnel(
            transport,
            backend.transport,
            stats=stats,
            clock=clock,
            on_end=self.tunnel_ended,
            splice=self.settings.splice,
            idle_timeout=route.tunnel_idle_timeout,
            lifetime=route.tunnel_lifetime,
        )
        if early_data:
            tunnel.data(Side.BACKEND, early_data)
        if client.held:
            tunnel.data(Side.CLIENT, client.held)
        backend.enter_tunnel(tunnel)
        attach(tunnel)
        self.tunnels[tunnel] = upstream
        if client_keys:
            self._tunnel_keys[tunnel] = client_keys
        self.stats.tunnels_total[protocol] += 1
        tunnel.start()
        if client.read_closed:
            tunnel.read_closed(Side.CLIENT)
        return tunnel

    def tunnel_ended(self, tunnel: Tunnel) -> None:
        backend = self.tunnels.pop(tunnel, None)
        if backend is not None:
            backend.active -= 1
        if self._tunnel_keys:
            keys = self._tunnel_keys.pop(tunnel, None)
            if keys is not None:
                self.release_client(keys)
        stats = tunnel.stats
        ended = self.stats.ended_tunnel_bytes
        ended[Side.CLIENT] += stats.sent[Side.CLIENT]
        ended[Side.BACKEND] += stats.sent[Side.BACKEND]
        self.access_log.emit(
            TunnelRecord(
                client=stats.client,
                target=stats.target,
                protocol=stats.protocol,
                route=stats.route,
                backend=stats.backend,
                duration=stats.duration,
                client_to_backend=stats.sent[Side.CLIENT],
                backend_to_client=stats.sent[Side.BACKEND],
                closed_by=stats.closed_by or "unknown",
                reason=stats.close_reason,
                client_protocol=stats.client_protocol,
            )
        )
        self._check_drained()

    # -- shutdown ----------------------------------------------------------------------

    def drain(self, grace: float) -> Deferred[None]:
        """Finish gracefully: fires when every connection and tunnel is gone.

        Call it once the listeners stopped. Idle client connections close at
        once; requests in flight finish, and their connections close after
        the response. Open tunnels get ``grace`` seconds to end by
        themselves; then they, and any request still running, are closed.
        """
        self.draining = True
        requests = sum(1 for c in self.connections if c.busy)
        tunnels = len(self.tunnels)
        self.log.info(
            "shutting down: {requests} requests in flight, {tunnels} tunnels open; "
            "waiting up to {grace:g} seconds for them",
            requests=requests,
            tunnels=tunnels,
            grace=grace,
        )
        for connection in list(self.connections):
            connection.drain()
        if self._idle_now():
            self._log_drained(requests, tunnels, 0, 0)
            return succeed(None)
        self._drained = Deferred()
        timer = self.clock.callLater(grace, self._grace_over, requests, tunnels)

        def done(result: None) -> None:
            if timer.active():
                timer.cancel()
                self._log_drained(requests, tunnels, 0, 0)

        self._drained.addCallback(done)
        return self._drained

    def _idle_now(self) -> bool:
        return not self.connections and not self.tunnels

    def _check_drained(self) -> None:
        if self._drained is not None and self._idle_now():
            drained, self._drained = self._drained, None
            drained.callback(None)

    def _grace_over(self, requests: int, tunnels: int) -> None:
        cut_tunnels = len(self.tunnels)
        cut_requests = sum(1 for c in self.connections if c.busy)
        self._log_drained(requests, tunnels, cut_requests, cut_tunnels)
        for tunnel in list(self.tunnels):
            tunnel.close("the proxy is shutting down")
        for connection in list(self.connections):
            if connection.busy:
                connection.abort()
        self.clock.callLater(CLOSE_MARGIN, self._give_up)

    def _give_up(self) -> None:
        """Whatever still has not closed is reset, and the shutdown goes on."""
        for connection in list(self.connections):
            connection.abort()
        if self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def _log_drained(
        self, requests: int, tunnels: int, cut_requests: int, cut_tunnels: int
    ) -> None:
        self.log.info(
            "shutdown: {finished} of {requests} requests finished, {ended} of {tunnels} "
            "tunnels ended by themselves; closed {cut_requests} requests and "
            "{cut_tunnels} tunnels at the end of the grace period",
            finished=requests - cut_requests,
            requests=requests,
            ended=tunnels - cut_tunnels,
            tunnels=tunnels,
            cut_requests=cut_requests,
            cut_tunnels=cut_tunnels,
        )

    # -- observation ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The proxy's state as plain data (JSON-ready), for metrics and the status page."""
        settings = self.settings
        return take_snapshot(
            self.stats, len(self.connections), self.tunnels, self.router.routes,
            self.draining_backends(), settings.max_connections, settings.max_tunnels,
            self.clock.seconds(),
            client_limits=settings.client_limits, client_entries=len(self.clients),
        )  # fmt: skip
