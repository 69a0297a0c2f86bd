"""The twistd/twist glue: command-line options and the service they build."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from .. import __version__
from ..core.accesslog import FORMATS
from ..core.address import BackendAddress, BadBackend
from ..core.proxyprotocol import parse_network
from ..ops.metrics import read_snapshots
from ..registry import DEFAULT_CHAIN, BadValidator, build_chain, describe_installed
from . import _values
from ._endpoints import (
    ListenAddress,
    NotAnEndpoint,
    WorkersUnsupported,
    check_server_endpoint,
    listen_address,
)
from ._reloader import Reloader
from .config import (
    AccessLogConfig,
    ConfigError,
    ProxyConfig,
    RouteConfig,
    check_ca_file,
    check_log_file,
    describe_config,
    dump_config,
    load_config,
)
from .service import (
    ConfiguredProxy,
    ProxyService,
    StartFailed,
    fail_while_running,
    listeners,
    local_snapshots,
    metrics_service,
    parse_backends,
)
from .workers import STOP_MARGIN, WorkerPool, open_sockets

log = Logger()


def _exit_usage(message: str) -> NoReturn:
    """Leave with one line that says what to change (one per mistake), and exit status 2.

    twistd would print the whole usage text and exit with 1, burying the one
    line that matters.
    """
    message = message.replace("\n", "\nupgradeproxy: ")
    sys.stderr.write(f"upgradeproxy: {message}\n")
    raise SystemExit(2)


@dataclass(frozen=True, slots=True)
class _Setting:
    """An option that sets one field of the configuration."""

    #: The field of :class:`RouteConfig` or :class:`ProxyConfig` it sets.
    field: str
    parse: Callable[[Any], Any]
    #: Where a configuration file sets it, for an option that the file replaces:
    #: set for a route's settings, None for those applied over the file.
    file_key: str | None
    help: str


_ROUTE_DEFAULTS = {f.name: f.default for f in fields(RouteConfig)}
_PROXY_DEFAULTS = {f.name: f.default for f in fields(ProxyConfig)}

#: The options that take a value of a kind :mod:`upgradeproxy.cli._values` parses.
_SETTINGS = {
    "response-timeout": _Setting(
        "response_timeout",
        _values.seconds,
        "[timeouts] response_head",
        "Seconds to wait for the backend's response head (and so for an upgrade "
        "handshake) before answering 504",
    ),
    "connect-timeout": _Setting(
        "backend_connect_timeout",
        _values.seconds,
        "[timeouts] backend_connect",
        "Seconds to wait for a backend connection",
    ),
    "tunnel-idle-timeout": _Setting(
        "tunnel_idle_timeout",
        _values.seconds_or_off,
        "[timeouts] tunnel_idle",
        "Close a tunnel after this many seconds without a byte either way (0: never)",
    ),
    "tunnel-lifetime": _Setting(
        "tunnel_lifetime",
        _values.seconds_or_off,
        "[timeouts] tunnel_lifetime",
        "Close a tunnel this many seconds after it started (0: never)",
    ),
    "max-body": _Setting(
        "max_request_body",
        _values.size_or_off,
        "[limits] max_request_body",
        "Largest request body, like 10MiB; beyond, 413 (0: no limit)",
    ),
    "head-timeout": _Setting(
        "client_head_timeout",
        _values.seconds,
        None,
        "Seconds a client may take to send a request head (408 after)",
    ),
    "keep-alive-timeout": _Setting(
        "keep_alive_timeout",
        _values.seconds,
        None,
        "Seconds an idle kept-alive client connection stays open",
    ),
    "max-connections": _Setting(
        "max_connections",
        _values.count_or_off,
        None,
        "Client connections served at once; beyond, 503 (0: no limit)",
    ),
    "max-tunnels": _Setting(
        "max_tunnels",
        _values.count_or_off,
        None,
        "Tunnels open at once; beyond, new upgrades get 503 (0: no limit)",
    ),
    "http2-max-streams": _Setting(
        "http2_max_concurrent_streams",
        _values.count,
        None,
        "Streams one HTTP/2 client connection may have open at once; more are refused",
    ),
    "http2-stall-timeout": _Setting(
        "http2_stall_timeout",
        _values.seconds,
        None,
        "Seconds an HTTP/2 stream may wait on a client's shut flow-control window "
        "before it is reset",
    ),
    "max-client-connections": _Setting(
        "client_connections",
        _values.count_or_off,
        None,
        "Connections one client address may have open; beyond, 503, and at twice as "
        "many, new ones are closed unanswered (0: no limit)",
    ),
    "max-client-tunnels": _Setting(
        "client_tunnels",
        _values.count_or_off,
        None,
        "Tunnels one client address may have open; beyond, new upgrades get 429 (0: no limit)",
    ),
    "client-upgrade-rate": _Setting(
        "client_upgrade_rate",
        _values.rate_or_off,
        None,
        "Upgrade attempts per second one client address may make; beyond, 429 (0: no limit)",
    ),
    "client-upgrade-burst": _Setting(
        "client_upgrade_burst",
        _values.count_or_off,
        None,
        "Upgrade attempts one client address may make at once, under --client-upgrade-rate "
        "(0: the rate rounded up)",
    ),
    "client-ipv6-prefix": _Setting(
        "client_ipv6_prefix",
        _values.ipv6_prefix,
        None,
        "Leading bits of an IPv6 address that make one client for the per-client limits",
    ),
    "send-proxy": _Setting(
        "send_proxy",
        _values.proxy_protocol_version,
        "send_proxy in a [[route]]",
        "Send a PROXY protocol header, v1 or v2, first on every backend connection",
    ),
    "shutdown-grace": _Setting(
        "shutdown_grace",
        _values.seconds,
        None,
        "Seconds open tunnels get to end by themselves at shutdown before they are closed",
    ),
    "workers": _Setting(
        "workers",
        _values.workers,
        None,
        "Processes serving the --listen addresses (tcp: endpoints), or 'auto' for one per "
        "CPU it may run on. With more than one, a parent process starts, watches and restarts them",
    ),
}


def _shown_default(value: object) -> str:
    if value is None:
        return "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _setting_help(name: str, setting: _Setting) -> str:
    defaults = _ROUTE_DEFAULTS if setting.file_key is not None else _PROXY_DEFAULTS
    return f"{setting.help} (default: {_shown_default(defaults[setting.field])})."


#: Flags that only describe a route; a configuration file describes its routes itself.
_ROUTE_FLAGS = {
    "backend": "backends in a [[route]]",
    "demo": "backends in a [[route]]",
    "backend-ca": "ca in a route's [route.tls]",
    "backend-insecure": "verify = false in a route's [route.tls]",
}


class Options(usage.Options):
    """``twistd upgradeproxy`` / ``twist upgradeproxy`` options."""

    synopsis = "[--listen ENDPOINT]... (--backend URL | --demo | --config FILE [--check])"
    longdesc = (
        "An HTTP/1.1 reverse proxy that gets protocol upgrades (WebSocket and any "
        "other Upgrade token) right. One backend is given with --backend; several "
        "backends, routes by host and path, and every setting, with --config FILE."
    )
    optFlags = [
        [
            "no-splice",
            None,
            "Move tunnel bytes through Python even where splice(2) could move them.",
        ],
        [
            "forward-h2c",
            None,
            "Forward 'Upgrade: h2c' offers to the backend (by default they are removed, "
            "so that h2c cannot smuggle requests past the proxy).",
        ],
        [
            "no-http2",
            None,
            "Offer TLS clients only HTTP/1.1 over ALPN (by default h2 comes first).",
        ],
        [
            "http2-cleartext",
            None,
            "Accept HTTP/2 with prior knowledge (the 'PRI * HTTP/2.0' preface) on "
            "cleartext listeners, as behind a load balancer that terminates TLS.",
        ],
        [
            "demo",
            None,
            "Run a built-in demo backend behind the proxy (an HTML page, "
            "a WebSocket echo at /ws, a raw echo for 'Upgrade: upgradeproxy-echo' at /echo).",
        ],
        [
            "check",
            None,
            "Check the configuration (the file given with --config, or these options), "
            "print what it describes, and exit: 0 when it is correct, 2 when not.",
        ],
        [
            "backend-insecure",
            None,
            "Do not verify the certificate of an https:// backend (a warning is logged).",
        ],
        ["version", None, "Print the version of upgradeproxy and exit."],
    ]
    optParameters = [
        [
            "backend",
            "b",
            None,
            "The backend: http://HOST:PORT[/PATH], https://HOST[:PORT][/PATH], or a Twisted "
            "client endpoint string such as unix:path=/run/app.sock.",
        ],
        ["config", "c", None, "Read routes, backends and settings from this TOML file."],
        ["metrics", None, None, "Serve Prometheus metrics and a status page on this endpoint."],
        ["access-log", None, None, "Write the access log to this file ('-': standard output)."],
        [
            "access-log-format",
            None,
            None,
            f"Access log lines as {' or '.join(FORMATS)} (default: {AccessLogConfig().format}).",
        ],
        ["backend-ca", None, None, "Verify an https:// backend with this CA bundle (PEM)."],
        *([name, None, None, _setting_help(name, setting)] for name, setting in _SETTINGS.items()),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["validators"] = []
        self["proxy_protocol_listen"] = []
        self["trusted_proxies"] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            _exit_usage(f"{e} (see --help)")

    def opt_version(self) -> None:
        """Print the version of upgradeproxy and exit."""
        sys.stdout.write(f"upgradeproxy {__version__}\n")
        raise SystemExit(0)

    def opt_validator(self, spec: str) -> None:
        """NAME or NAME:ARG; repeatable; replaces the default chain (rfc9110, websocket)."""
        self["validators"].append(spec)

    def opt_list_validators(self) -> None:
        """Print every installed validator and exit."""
        sys.stdout.write(describe_installed() + "\n")
        raise SystemExit(0)

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this Twisted server endpoint (repeatable; default
        tcp:8080:interface=127.0.0.1, loopback only)."""
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def opt_proxy_protocol_listen(self, endpoint: str) -> None:
        """Also listen on this endpoint, for a load balancer that sends a PROXY protocol
        header (v1 or v2) from a --trusted-proxy network (repeatable)."""
        self["proxy_protocol_listen"].append(endpoint)

    def opt_trusted_proxy(self, network: str) -> None:
        """A network (CIDR) whose connections to --proxy-protocol-listen endpoints must
        start with a PROXY protocol header (repeatable)."""
        try:
            self["trusted_proxies"].append(str(parse_network(network)))
        except ValueError as e:
            _exit_usage(f"--trusted-proxy {e}")

    def postOptions(self) -> None:
        from twisted.internet import reactor

        try:
            config = self.read_config(check=bool(self["check"]))
        except ConfigError as e:
            _exit_usage(str(e))
        if self["check"]:
            sys.stdout.write(describe_config(config) + "\n")
            raise SystemExit(0)
        self["proxy_config"] = config
        if config.workers > 1:
            try:
                self["listen_addresses"] = [
                    listen_address(reactor, listener.description) for listener in listeners(config)
                ]
            except WorkersUnsupported as e:
                _exit_usage(str(e))

    def read_config(self, *, check: bool = True) -> ProxyConfig:
        """The configuration these options describe; the file (``--config``) is read again.

        Raises :class:`~upgradeproxy.cli.config.ConfigError` listing every
        mistake, each line as ``--check`` prints it. ``--check``, the start and
        every reload (SIGHUP) go through here; ``check=False`` leaves a port
        out of range to fail when it is bound, with the other reasons a port
        cannot be used.
        """
        from twisted.internet import reactor

        settings = self._settings()
        config = self._from_file(settings) if self["config"] else self._from_flags(settings)
        config = self._over_file_or_flags(config, settings)
        problems = _combination_problems(config)
        endpoints = [("--listen", description) for description in config.listen]
        endpoints += [("--proxy-protocol-listen", d) for d in config.proxy_protocol_listen]
        if config.metrics is not None:
            endpoints.append(("--metrics", config.metrics))
        for flag, description in endpoints:
            try:
                check_server_endpoint(reactor, description, port_range=check)
            except NotAnEndpoint as e:
                problems.append(f"{flag}: {e}")
        if problems:
            raise ConfigError(problems)
        return config

    def _settings(self) -> dict[str, Any]:
        """The options of :data:`_SETTINGS` that were given, parsed, by option name."""
        given = {}
        for name, setting in _SETTINGS.items():
            text = self[name]
            if text is None:
                continue
            try:
                given[name] = setting.parse(_values.from_text(text))
            except ValueError as e:
                _exit_usage(f"--{name} {e}")
        return given

    def _from_file(self, settings: dict[str, Any]) -> ProxyConfig:
        refused = [(f"--{name}", where) for name, where in _ROUTE_FLAGS.items() if self[name]]
        refused += [
            (f"--{name}", key) for name in settings if (key := _SETTINGS[name].file_key) is not None
        ]
        if self["validators"]:
            refused.append(("--validator", "validators in a [[route]]"))
        if refused:
            _exit_usage(
                f"--config {self['config']} describes the routes; leave out "
                + ", ".join(f"{flag} (write {where} in the file)" for flag, where in refused)
            )
        return load_config(self["config"])

    def _over_file_or_flags(self, config: ProxyConfig, settings: dict[str, Any]) -> ProxyConfig:
        """``config`` with the proxy-wide options given on the command line applied over it."""
        changes: dict[str, Any] = {
            _SETTINGS[name].field: value
            for name, value in settings.items()
            if _SETTINGS[name].file_key is None
        }
        if self["listen"]:
            changes["listen"] = tuple(self["listen"])
        if self["metrics"] is not None:
            changes["metrics"] = self["metrics"]
        if self["forward-h2c"]:
            changes["forward_h2c"] = True
        if self["no-splice"]:
            changes["splice"] = False
        if self["no-http2"]:
            changes["http2"] = False
        if self["http2-cleartext"]:
            changes["http2_cleartext"] = True
        if self["proxy_protocol_listen"]:
            changes["proxy_protocol_listen"] = tuple(self["proxy_protocol_listen"])
        if self["trusted_proxies"]:
            changes["trusted_proxies"] = tuple(self["trusted_proxies"])
        access = config.access_log
        if self["access-log-format"] is not None:
            if self["access-log-format"] not in FORMATS:
                _exit_usage(
                    f"--access-log-format takes {' or '.join(FORMATS)}, "
                    f"not {self['access-log-format']!r}"
                )
            access = replace(access, format=self["access-log-format"])
        if self["access-log"] is not None:
            try:
                access = replace(access, path=check_log_file(self["access-log"]))
            except ValueError as e:
                _exit_usage(f"--access-log: {e}")
        changes["access_log"] = access
        return replace(config, **changes)

    def _from_flags(self, settings: dict[str, Any]) -> ProxyConfig:
        if self["demo"] and self["backend"]:
            _exit_usage("give either --backend or --demo, not both")
        if not self["demo"] and not self["backend"]:
            _exit_usage(
                "no backend given: add --backend http://HOST:PORT (for example "
                "--backend http://127.0.0.1:9000), --demo to try the built-in demo, "
                "or --config FILE"
            )
        from twisted.internet import reactor

        tls_ca = None
        if self["backend-ca"] is not None:
            try:
                tls_ca = check_ca_file(self["backend-ca"])
            except ValueError as e:
                _exit_usage(f"--backend-ca: {e}")
        route = RouteConfig(
            name="default",
            hosts=(),
            path="/",
            backends=(self["backend"],) if self["backend"] else (),
            validators=tuple(self["validators"]) or DEFAULT_CHAIN,
            tls_ca=tls_ca,
            tls_verify=not self["backend-insecure"],
            **{
                _SETTINGS[name].field: value
                for name, value in settings.items()
                if _SETTINGS[name].file_key is not None
            },
        )
        if self["backend"]:
            try:
                # The one parse: a single process proxies with them (see makeService).
                self["backends"] = parse_backends(route, reactor)
            except BadBackend as e:
                _exit_usage(str(e))
        try:
            build_chain(route.validators)
        except BadValidator as e:
            _exit_usage(str(e))
        return ProxyConfig(routes=(route,))


def _combination_problems(config: ProxyConfig) -> list[str]:
    """What options given over a file (or alone) leave incomplete, one line each.

    A file is checked on its own; these are what only the options, or the
    options and the file together, can get wrong.
    """
    problems = []
    if config.client_upgrade_burst is not None and config.client_upgrade_rate is None:
        problems.append("--client-upgrade-burst needs --client-upgrade-rate (attempts per second)")
    if config.proxy_protocol_listen and not config.trusted_proxies:
        problems.append(
            "--proxy-protocol-listen needs --trusted-proxy NETWORK: the networks your load "
            "balancers connect from (for example --trusted-proxy 10.0.0.0/8)"
        )
    if config.trusted_proxies and not config.proxy_protocol_listen:
        problems.append(
            "--trusted-proxy needs --proxy-protocol-listen ENDPOINT: where the load "
            "balancers connect to"
        )
    return problems


@implementer(IStreamClientEndpoint)
class _DemoEndpoint:
    """Connects to the in-process demo backend once it is listening."""

    def __init__(self, service: _DemoBackendService) -> None:
        self._service = service

    def connect(self, factory: Any) -> Deferred[Any]:
        from twisted.internet import reactor

        port = self._service.port
        assert port is not None, "the demo backend starts before the proxy listens"
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        return TCP4ClientEndpoint(reactor, address.host, address.port).connect(factory)


class _DemoBackendService(Service):
    """Runs the demo backend on an ephemeral loopback port."""

    port: IListeningPort | None = None

    def startService(self) -> None:
        from twisted.internet import reactor

        from ..demo import DemoBackendFactory

        super().startService()
        self.port = reactor.listenTCP(0, DemoBackendFactory(), interface="127.0.0.1")

    @property
    def url(self) -> str:
        """The demo backend's address, once it listens."""
        assert self.port is not None
        return f"http://127.0.0.1:{self.port.getHost().port}"  # type: ignore[attr-defined]

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


def _worker_config(config: ProxyConfig, demo: _DemoBackendService | None) -> str:
    """What each worker is started with: the configuration, with the demo backend's address."""
    if demo is not None:
        route = replace(config.routes[0], backends=(demo.url,))
        config = replace(config, routes=(route,))
    return dump_config(config)


def makeService(options: Options) -> IService:
    """The proxy as a service: its listeners, the metrics endpoint, the demo backend if asked.

    Every address is bound here, before twistd writes its PID file or
    daemonizes: one that cannot be used ends the start with one line and
    exit status 1, rather than leaving a process that listens on nothing.

    With more than one worker, listening and proxying happen in worker
    processes instead (see :mod:`upgradeproxy.cli.workers`); this process then
    serves the metrics of all of them.
    """
    try:
        return _make_service(
            options["proxy_config"],
            demo=bool(options["demo"]),
            backends=options.get("backends"),
            addresses=options.get("listen_addresses"),
            read=options.read_config if options["config"] else None,
        )
    except StartFailed as e:
        sys.stderr.write(f"upgradeproxy: {e}\n")
        raise SystemExit(1) from None


def _make_service(
    config: ProxyConfig,
    *,
    demo: bool,
    backends: list[BackendAddress] | None,
    addresses: list[ListenAddress] | None,
    read: Callable[[], ProxyConfig] | None,
) -> IService:
    """``backends`` are the route's, parsed already (from the command line), or None."""
    from twisted.internet import reactor

    log.info("{description}", description=describe_config(config))
    top = MultiService()
    demo_service: _DemoBackendService | None = None
    if demo:
        demo_service = _DemoBackendService()
        demo_service.setServiceParent(top)
    if config.workers > 1:
        assert addresses is not None
        _workers_service(config, addresses, demo_service, read).setServiceParent(top)
        return top
    if demo_service is not None:
        backends = [BackendAddress(_DemoEndpoint(demo_service), b"", "built-in demo backend")]
    configured = ConfiguredProxy(config, reactor, backends=backends)
    factory = configured.factory
    service = ProxyService(
        factory,
        listeners(config),
        reactor=reactor,
        grace=config.shutdown_grace,
        on_stopped=configured.close,
        behind=configured.behind,
    )
    service.setServiceParent(top)

    def apply(new: ProxyConfig) -> None:
        configured.apply(new, before=lambda: service.open_listeners(listeners(new)))
        service.close_listeners(listeners(new))
        service.grace = new.shutdown_grace

    reloader = Reloader(
        reactor,
        read,
        running=lambda: configured.config,
        apply=apply,
        refused=configured.proxy.reconfigure_failed,
    )
    reloader.install()
    reloader.setServiceParent(top)
    if config.metrics:
        metrics_service(config.metrics, reactor, local_snapshots(factory)).setServiceParent(top)
    return top


def _workers_service(
    config: ProxyConfig,
    addresses: list[ListenAddress],
    demo: _DemoBackendService | None,
    read: Callable[[], ProxyConfig] | None,
) -> IService:
    """The parent of ``--workers``: the pool of workers, their metrics, and reloads.

    A reload is checked here and passed on to every worker, which swaps its
    proxy's configuration as a single process does: no worker is replaced,
    so no tunnel is closed, and health state stays where it is.
    """
    from twisted.internet import reactor

    top = MultiService()
    running = [config]
    snapshots = tempfile.mkdtemp(prefix="upgradeproxy-metrics-") if config.metrics else None
    pool = WorkerPool(
        reactor,
        open_sockets(addresses, config.workers),
        lambda: _worker_config(running[0], demo),
        stop_timeout=config.shutdown_grace + STOP_MARGIN,
        snapshots=snapshots,
        cannot_start=fail_while_running,
    )
    pool.setServiceParent(top)

    def apply(new: ProxyConfig) -> None:
        running[0] = new
        pool.reload(_worker_config(new, demo))

    reloader = Reloader(
        reactor, read, running=lambda: running[0], apply=apply, refused=pool.reload_failed
    )
    reloader.install()
    reloader.setServiceParent(top)
    if config.metrics and snapshots is not None:
        directory = snapshots

        def source() -> list[tuple[str | None, dict[str, Any]]]:
            return list(read_snapshots(directory, time.time()))

        metrics_service(config.metrics, reactor, source).setServiceParent(top)
    return top
