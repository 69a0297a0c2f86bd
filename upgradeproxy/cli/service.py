"""From a :class:`~upgradeproxy.cli.config.ProxyConfig` to running Twisted services.

:func:`build_configuration` builds the routes, backend groups and validators
a configuration describes; :class:`ConfiguredProxy` holds the proxy built
from it with its access log file, and swaps both on a reload;
:class:`ProxyService` listens with the factory, opens and closes listeners on
a reload, and, when stopped, shuts down gracefully: it stops accepting, lets
requests in flight finish, gives tunnels their grace period, then closes what
is left.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from .._twisted import tcp_server_parts, tls_server_options
from ..core._backend import BackendSettings
from ..core._clientlimits import ClientLimits
from ..core.accesslog import AccessLog, access_log_to
from ..core.address import BackendAddress, parse_backend, warn_unverified
from ..core.balancer import BackendGroup
from ..core.factory import ProxyFactory
from ..core.proxy import Configuration, Proxy, ProxySettings
from ..core.proxyprotocol import ProxyProtocolFactory, parse_network
from ..core.routing import Route
from ..core.tls import choose_protocols_on
from ..registry import build_chain
from .config import ProxyConfig, RouteConfig, dump_config

log = Logger()


def settings_for(config: ProxyConfig) -> ProxySettings:
    """The proxy-wide settings of ``config``."""
    return ProxySettings(
        max_request_head=config.max_request_head,
        request_head_timeout=config.client_head_timeout,
        keep_alive_timeout=config.keep_alive_timeout,
        max_connections=config.max_connections,
        max_tunnels=config.max_tunnels,
        forward_h2c=config.forward_h2c,
        splice=config.splice,
        http2=config.http2,
        http2_cleartext=config.http2_cleartext,
        http2_max_concurrent_streams=config.http2_max_concurrent_streams,
        http2_stall_timeout=config.http2_stall_timeout,
        client_limits=ClientLimits(
            config.client_connections,
            config.client_tunnels,
            config.client_upgrade_rate,
            config.client_upgrade_burst,
        ),
        client_ipv6_prefix=config.client_ipv6_prefix,
    )


@dataclass(frozen=True, slots=True)
class Listener:
    """One endpoint to listen on, and whether its trusted clients send a PROXY header."""

    description: str
    proxy_protocol: bool = False


def listeners(config: ProxyConfig) -> list[Listener]:
    """Every endpoint ``config`` listens on: ``listen``, then ``[proxy_protocol] listen``."""
    return [Listener(d) for d in config.listen] + [
        Listener(d, proxy_protocol=True) for d in config.proxy_protocol_listen
    ]


#: Puts a PROXY protocol reader under a factory (see :meth:`ConfiguredProxy.behind`).
Behind = Callable[[IProtocolFactory], IProtocolFactory]


def parse_backends(route: RouteConfig, reactor: object) -> list[BackendAddress]:
    """The addresses of ``route``'s backends, with its connect timeout and TLS settings.

    Raises :class:`~upgradeproxy.core.address.BadBackend` for the first that
    cannot be used. An unverified backend is warned of by :func:`build_route`.
    """
    return [
        parse_backend(
            reactor,
            url,
            connect_timeout=route.backend_connect_timeout,
            tls_ca=route.tls_ca,
            tls_verify=route.tls_verify,
            warn=False,
        )
        for url in route.backends
    ]


def build_route(
    route: RouteConfig, reactor: IReactorTime, *, backends: Sequence[BackendAddress] | None = None
) -> Route:
    """The running route for ``route``; ``backends``, parsed already, replace its backend list.

    An ``https://`` backend whose certificate is not verified is warned of here,
    once for each proxy built with it.
    """
    if backends is None:
        backends = parse_backends(route, reactor)
    if not route.tls_verify:
        # The demo's backend is given without a URL in the route.
        for url, backend in zip(route.backends, backends, strict=False):
            if backend.tls:
                warn_unverified(url)
    group = BackendGroup(
        backends,
        policy=route.policy,
        clock=reactor,
        settings=BackendSettings(response_timeout=route.response_timeout),
        fail_timeout=route.fail_timeout,
        health=route.health,
        route=route.name,
        send_proxy=route.send_proxy,
    )
    client_limits = ClientLimits(
        tunnels=route.route_client_tunnels,
        upgrade_rate=route.route_client_upgrade_rate,
        upgrade_burst=route.route_client_upgrade_burst,
    )
    return Route(
        route.name,
        group,
        tuple(build_chain(route.validators)),
        hosts=route.hosts,
        path=route.path,
        max_request_body=route.max_request_body,
        tunnel_idle_timeout=route.tunnel_idle_timeout,
        tunnel_lifetime=route.tunnel_lifetime,
        client_limits=client_limits if client_limits.enforced else None,
    )


def config_digest(config: ProxyConfig) -> str:
    """A short hash of what ``config`` sets up, for metrics: equal for equal settings.

    Where the file was read from is left out; every worker computes the same.
    """
    text = dump_config(dataclasses.replace(config, source=None))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def build_configuration(
    config: ProxyConfig,
    reactor: IReactorTime,
    *,
    access_log: AccessLog | None = None,
    backends: Sequence[BackendAddress] | None = None,
) -> Configuration:
    """What the proxy runs with for ``config``: its routes, backends, settings and access log.

    ``backends`` replaces the backends of a configuration with one route
    (the built-in demo backend is one such).
    """
    routes = tuple(
        build_route(route, reactor, backends=backends if len(config.routes) == 1 else None)
        for route in config.routes
    )
    access_log = access_log or AccessLog(config.access_log.format)
    # describe_config's lines say it all, logged at the start and on each reload.
    return Configuration(
        routes, settings_for(config), access_log, config_digest(config), log_routes=False
    )


def build_factory(
    config: ProxyConfig,
    reactor: IReactorTime,
    *,
    access_log: AccessLog | None = None,
    backends: Sequence[BackendAddress] | None = None,
) -> ProxyFactory:
    """The proxy that ``config`` describes (see :func:`build_configuration`)."""
    configuration = build_configuration(config, reactor, access_log=access_log, backends=backends)
    return ProxyFactory(proxy=Proxy(configuration=configuration, clock=reactor))


def open_access_log(config: ProxyConfig) -> tuple[AccessLog, IO[str] | None]:
    """The access log ``config`` asks for, and the file to close at the end, if any."""
    access = config.access_log
    if access.path is None:
        return AccessLog(access.format), None
    log, stream = access_log_to(access.path, access.format)
    return log, stream


class ConfiguredProxy:
    """A proxy built from a :class:`ProxyConfig`, and the access log file it writes to.

    :meth:`apply` swaps both for a new configuration (a reload); the access
    log file is opened again even when its path stays, so that a reload
    after log rotation writes to the new file. The PROXY protocol readers of
    its listeners (:meth:`behind`) follow the configuration too.
    """

    def __init__(
        self,
        config: ProxyConfig,
        reactor: IReactorTime,
        *,
        backends: Sequence[BackendAddress] | None = None,
    ) -> None:
        self._reactor = reactor
        #: The configuration in use.
        self.config = config
        access_log, self._stream = open_access_log(config)
        self.factory = build_factory(config, reactor, access_log=access_log, backends=backends)
        self._readers: list[ProxyProtocolFactory] = []

    def behind(self, factory: IProtocolFactory) -> IProtocolFactory:
        """``factory`` behind a PROXY protocol reader that trusts what the configuration says."""
        config = self.config
        reader = ProxyProtocolFactory(
            factory,
            [parse_network(network) for network in config.trusted_proxies],
            timeout=config.proxy_protocol_timeout,
            clock=self._reactor,
        )
        self._readers.append(reader)
        return reader

    @property
    def proxy(self) -> Proxy:
        return self.factory.proxy

    def apply(self, config: ProxyConfig, *, before: Callable[[], object] = lambda: None) -> None:
        """Serve new requests and connections with ``config`` (see :meth:`Proxy.reconfigure`).

        ``config`` was checked already; what can still fail (the access log
        file cannot be opened, ``before`` raises) raises, and changes nothing.
        ``before`` runs once everything else is ready (the service opens new
        listeners there).
        """
        access_log, stream = open_access_log(config)
        try:
            configuration = build_configuration(config, self._reactor, access_log=access_log)
            before()
        except BaseException:
            _close(stream)
            raise
        self.proxy.reconfigure(configuration)
        trusted = [parse_network(network) for network in config.trusted_proxies]
        for reader in self._readers:
            reader.trust(trusted, config.proxy_protocol_timeout)
        previous, self._stream = self._stream, stream
        self.config = config
        _close(previous)

    def close(self) -> None:
        """Close the access log file, if it is one (at the end)."""
        stream, self._stream = self._stream, None
        _close(stream)


def _close(stream: IO[str] | None) -> None:
    if stream is not None and stream is not sys.stdout:
        stream.close()


class StartFailed(Exception):
    """The proxy cannot start; the message is the one line that says why."""


def listen_now(
    reactor: Any,
    description: str,
    factory: IProtocolFactory,
    *,
    failed_later: Callable[[str], None] | None = None,
    behind: Behind | None = None,
) -> Deferred[IListeningPort]:
    """Listen on the endpoint ``description`` at once.

    ``behind`` puts a factory under everything the endpoint itself adds (a
    PROXY protocol reader comes before TLS on the wire): an ``ssl:``
    endpoint then listens as plain TCP with the TLS layer above it.

    The endpoints that ship with Twisted bind before they return: a failure
    among them raises :class:`StartFailed` naming the endpoint and the
    reason. An endpoint that binds later calls ``failed_later`` with that
    line; by default it ends a running process (see :func:`fail_while_running`).
    """
    endpoint = serverFromString(reactor, description)
    choose_protocols_on(endpoint)
    if behind is not None:
        endpoint, factory = beneath_tls(reactor, endpoint, factory)
        factory = behind(factory)
    listening = endpoint.listen(factory)
    failed: list[Failure] = []
    listening.addErrback(failed.append)
    if failed:
        raise StartFailed(_cannot_listen(description, failed[0]))
    if not listening.called:
        report = failed_later or fail_while_running
        listening.addErrback(lambda reason: report(_cannot_listen(description, reason)))
    return listening


def beneath_tls(
    reactor: Any, endpoint: Any, factory: IProtocolFactory
) -> tuple[Any, IProtocolFactory]:
    """For an ``ssl:`` endpoint: its TCP endpoint, and ``factory`` with its TLS around it.

    So that something can be put between the socket and TLS. Other endpoints
    are returned as they are.
    """
    if not isinstance(endpoint, SSL4ServerEndpoint):
        return endpoint, factory
    parts = tcp_server_parts(endpoint)
    options: Any = tls_server_options(endpoint)
    tls = TLSMemoryBIOFactory(options, False, factory)
    return TCP4ServerEndpoint(reactor, parts.port, parts.backlog, parts.interface), tls


def _cannot_listen(description: str, reason: Failure) -> str:
    error = reason.value
    socket_error = getattr(error, "socketError", None)
    why = getattr(socket_error, "strerror", None) or str(error)
    return f"cannot listen on {description}: {why}"


def fail_while_running(message: str) -> None:
    """End a process that has started with ``message`` logged and exit status 1.

    twistd and twist end with status 0 whatever stopped the reactor, after
    they have cleaned up (the PID file among others); the status is set last,
    once they are done.
    """
    from twisted.internet import reactor

    log.critical("{message}; stopping", message=message)
    atexit.register(_exit, 1)
    with contextlib.suppress(ReactorNotRunning):
        reactor.stop()


def _exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(status)


class _Listening(Service):
    """A port that is already listening; stopping the service closes it."""

    def __init__(self, listening: Deferred[IListeningPort]) -> None:
        self._listening = listening

    def stopService(self) -> Deferred[None]:
        super().stopService()
        done: Deferred[None] = Deferred()

        def stop(port: IListeningPort) -> None:
            stopped = port.stopListening()
            if stopped is None:
                done.callback(None)
            else:
                stopped.chainDeferred(done)

        self._listening.addCallbacks(stop, lambda reason: done.callback(None))
        return done


class ProxyService(MultiService):
    """Listens with a proxy factory and shuts it down gracefully.

    The addresses are bound when the service is made (see :func:`listen_now`).
    Stopping (SIGTERM or SIGINT under twistd) closes the listeners first,
    then waits for :meth:`~upgradeproxy.core.proxy.Proxy.drain`, so the
    process exits within the grace period plus a short margin.
    """

    def __init__(
        self,
        factory: ProxyFactory,
        listen: Sequence[str | Listener],
        *,
        reactor: Any,
        grace: float,
        on_stopped: Callable[[], None] | None = None,
        behind: Behind | None = None,
    ) -> None:
        """``behind`` puts the PROXY protocol reader under the listeners that expect it."""
        super().__init__()
        self.factory = factory
        self.grace = grace
        self._reactor = reactor
        self._on_stopped = on_stopped
        self._behind = behind
        self._listeners: dict[str, _Listening] = {}
        self._proxied: set[str] = set()
        for listener in listen:
            self._listen(_listener(listener), failed_later=None)

    def _listen(self, listener: Listener, failed_later: Callable[[str], None] | None) -> None:
        description = listener.description
        behind = None
        if listener.proxy_protocol:
            assert self._behind is not None, "a PROXY protocol listener needs its reader"
            behind = self._behind
            self._proxied.add(description)
        listening = listen_now(
            self._reactor, description, self.factory, failed_later=failed_later, behind=behind
        )
        self._listeners[description] = _Listening(listening)
        self._listeners[description].setServiceParent(self)

    def open_listeners(self, listen: Sequence[str | Listener]) -> None:
        """Listen on the endpoints of ``listen`` not listened on yet (a reload).

        Raises :class:`StartFailed` when one cannot be bound, or when an
        endpoint moved between ``listen`` and ``[proxy_protocol] listen``
        (its socket is bound already: that takes a restart); those opened
        by this call are closed again first.
        """
        opened: list[str] = []
        try:
            for listener in map(_listener, listen):
                description = listener.description
                if description not in self._listeners:
                    self._listen(listener, failed_later=_log_late_listen_failure)
                    opened.append(description)
                elif listener.proxy_protocol != (description in self._proxied):
                    raise StartFailed(
                        f"{description} moved between listen and [proxy_protocol] listen; "
                        "a listener's socket stays what it was until a restart"
                    )
        except StartFailed:
            for description in opened:
                self._stop_listening(description)
            raise
        for description in opened:
            log.info("listening on {endpoint}", endpoint=description)

    def close_listeners(self, keep: Sequence[str | Listener]) -> None:
        """Stop listening on every endpoint not in ``keep``; their connections stay open."""
        kept = {_listener(listener).description for listener in keep}
        for description in [d for d in self._listeners if d not in kept]:
            self._stop_listening(description)
            log.info(
                "no longer listening on {endpoint}; its open connections stay",
                endpoint=description,
            )

    def _stop_listening(self, description: str) -> None:
        self._proxied.discard(description)
        listener = self._listeners.pop(description)
        running = listener.running
        listener.disownServiceParent()  # which stops it, if it runs
        if not running:
            listener.stopService()

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[Any] = Deferred.fromCoroutine(self._stop())
        return stopped

    async def _stop(self) -> None:
        await super().stopService()
        await self.factory.proxy.drain(self.grace)
        if self._on_stopped is not None:
            self._on_stopped()


def _listener(item: str | Listener) -> Listener:
    return item if isinstance(item, Listener) else Listener(item)


def _log_late_listen_failure(message: str) -> None:
    log.error("{message}; the other listeners serve on", message=message)


def metrics_service(
    description: str, reactor: Any, source: Callable[[], list[tuple[str | None, dict[str, Any]]]]
) -> Service:
    """A service serving metrics and the status page on ``description``, bound at once."""
    from ..ops.metrics import metrics_site

    return _Listening(listen_now(reactor, description, metrics_site(source)))


def local_snapshots(factory: ProxyFactory) -> Callable[[], list[tuple[str | None, dict[str, Any]]]]:
    """The snapshot source of a single process."""
    return lambda: [(None, factory.proxy.snapshot())]
