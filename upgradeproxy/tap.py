"""The twistd/twist glue: command-line options and the service they build."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.python import usage
from zope.interface import implementer

from .accesslog import FORMATS
from .address import BackendAddress, BadBackend, parse_backend
from .config import (
    DEFAULT_LISTEN,
    AccessLogConfig,
    ConfigError,
    ProxyConfig,
    RouteConfig,
    describe_config,
    load_config,
    parse_size,
)
from .metrics import read_snapshots
from .registry import DEFAULT_CHAIN, BadValidator, build_chain, describe_installed
from .service import (
    ProxyService,
    build_factory,
    local_snapshots,
    metrics_service,
    open_access_log,
)
from .workers import (
    STOP_MARGIN,
    WorkerPool,
    WorkersUnsupported,
    listen_address,
    open_sockets,
)

T = TypeVar("T")


def _exit_usage(message: str) -> None:
    """Leave with one line that says what to change, and exit status 2.

    twistd would print the whole usage text and exit with 1, burying the one
    line that matters.
    """
    sys.stderr.write(f"upgradeproxy: {message}\n")
    raise SystemExit(2)


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a number of seconds above 0")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be a whole number above 0, or 0 for no limit")
    return value


def _or_off(convert: Callable[[str], T]) -> Callable[[str], T | None]:
    """``convert``, except that 0 or "off" means none (no timeout, no limit)."""

    def coerce(text: str) -> T | None:
        return None if text.lower() in ("0", "off", "none") else convert(text)

    return coerce


_optional_seconds = _or_off(_seconds)
_optional_count = _or_off(_count)
_optional_size = _or_off(parse_size)


#: The flags that a configuration file replaces; giving both is a mistake.
_FILE_REPLACES = ("backend", "demo", "backend-ca", "backend-insecure")


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
        [
            "workers",
            None,
            None,
            "Processes serving the --listen addresses (tcp: endpoints), or 'auto' for one "
            "per core (default 1). With more than one, a parent process starts, watches "
            "and restarts them.",
        ],
        ["metrics", None, None, "Serve Prometheus metrics and a status page on this endpoint."],
        ["access-log", None, None, "Write the access log to this file ('-': standard output)."],
        ["access-log-format", None, "text", "Access log lines as 'text' or 'json'."],
        ["backend-ca", None, None, "Verify an https:// backend with this CA bundle (PEM)."],
        [
            "response-timeout",
            None,
            60.0,
            "Seconds to wait for the backend's response head "
            "(and so for an upgrade handshake) before answering 504.",
            _seconds,
        ],
        ["connect-timeout", None, 10.0, "Seconds to wait for a backend connection.", _seconds],
        [
            "head-timeout",
            None,
            60.0,
            "Seconds a client may take to send a request head (408 after).",
            _seconds,
        ],
        [
            "keep-alive-timeout",
            None,
            60.0,
            "Seconds an idle kept-alive client connection stays open.",
            _seconds,
        ],
        [
            "tunnel-idle-timeout",
            None,
            None,
            "Close a tunnel after this many seconds without a byte either way (default: never).",
            _optional_seconds,
        ],
        [
            "tunnel-lifetime",
            None,
            None,
            "Close a tunnel this many seconds after it started (default: never).",
            _optional_seconds,
        ],
        [
            "max-connections",
            None,
            10_000,
            "Client connections served at once; beyond, 503 (0: no limit).",
            _optional_count,
        ],
        [
            "max-tunnels",
            None,
            10_000,
            "Tunnels open at once; beyond, new upgrades get 503 (0: no limit).",
            _optional_count,
        ],
        [
            "max-body",
            None,
            None,
            "Largest request body, like 10MiB; beyond, 413 (default: no limit).",
            _optional_size,
        ],
        [
            "shutdown-grace",
            None,
            30.0,
            "Seconds open tunnels get to end by themselves at shutdown before they are closed.",
            _seconds,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["validators"] = []
        self.argv: list[str] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        # Kept to start workers with the same command line.
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_validator(self, spec: str) -> None:
        """NAME or NAME:ARG; repeatable; replaces the default chain (rfc9110, websocket)."""
        self["validators"].append(spec)

    def opt_list_validators(self) -> None:
        """Print every installed validator and exit."""
        sys.stdout.write(describe_installed() + "\n")
        raise SystemExit(0)

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this Twisted server endpoint (repeatable; default tcp:8080)."""
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def postOptions(self) -> None:
        config = self._from_file() if self["config"] else self._from_flags()
        if self["check"]:
            sys.stdout.write(describe_config(config) + "\n")
            raise SystemExit(0)
        self["proxy_config"] = config
        if config.workers > 1:
            from twisted.internet import reactor

            try:
                self["listen_addresses"] = [listen_address(reactor, d) for d in config.listen]
            except WorkersUnsupported as e:
                _exit_usage(str(e))

    def _from_file(self) -> ProxyConfig:
        given = [f"--{name}" for name in _FILE_REPLACES if self[name]]
        if self["validators"]:
            given.append("--validator")
        if given:
            _exit_usage(
                f"--config {self['config']} describes the backends; leave out {', '.join(given)}"
            )
        try:
            config = load_config(self["config"])
        except ConfigError as e:
            _exit_usage(f"{e}".replace("\n", "\nupgradeproxy: "))
        if self["listen"]:
            config = replace(config, listen=tuple(self["listen"]))
        if self["workers"] is not None:
            config = replace(config, workers=_worker_count(self["workers"]))
        return config

    def _from_flags(self) -> ProxyConfig:
        if self["demo"] and self["backend"]:
            _exit_usage("give either --backend or --demo, not both")
        if not self["demo"] and not self["backend"]:
            _exit_usage(
                "no backend given: add --backend http://HOST:PORT (for example "
                "--backend http://127.0.0.1:9000), --demo to try the built-in demo, "
                "or --config FILE"
            )
        from twisted.internet import reactor

        route = RouteConfig(
            name="default",
            hosts=(),
            path="/",
            backends=(self["backend"],) if self["backend"] else (),
            validators=tuple(self["validators"]) or DEFAULT_CHAIN,
            backend_connect_timeout=self["connect-timeout"],
            response_timeout=self["response-timeout"],
            tunnel_idle_timeout=self["tunnel-idle-timeout"],
            tunnel_lifetime=self["tunnel-lifetime"],
            max_request_body=self["max-body"],
            tls_ca=self["backend-ca"],
            tls_verify=not self["backend-insecure"],
        )
        if self["backend"]:
            try:
                parse_backend(
                    reactor,
                    self["backend"],
                    tls_ca=route.tls_ca,
                    tls_verify=route.tls_verify,
                    warn=False,  # the factory's build warns, once
                )
            except BadBackend as e:
                _exit_usage(str(e))
        try:
            build_chain(route.validators)
        except BadValidator as e:
            _exit_usage(str(e))
        listen = tuple(self["listen"]) or (DEFAULT_LISTEN,)
        for description in listen:
            _check_endpoint(reactor, description, "--listen")
        if self["metrics"]:
            _check_endpoint(reactor, self["metrics"], "--metrics")
        if self["access-log-format"] not in FORMATS:
            _exit_usage(
                f"--access-log-format takes {' or '.join(FORMATS)}, "
                f"not {self['access-log-format']!r}"
            )
        return ProxyConfig(
            routes=(route,),
            listen=listen,
            metrics=self["metrics"],
            workers=_worker_count(self["workers"] or "1"),
            access_log=AccessLogConfig(self["access-log-format"], self["access-log"]),
            client_head_timeout=self["head-timeout"],
            keep_alive_timeout=self["keep-alive-timeout"],
            shutdown_grace=self["shutdown-grace"],
            max_connections=self["max-connections"],
            max_tunnels=self["max-tunnels"],
            forward_h2c=bool(self["forward-h2c"]),
            splice=not self["no-splice"],
        )


def _check_endpoint(reactor: object, description: str, flag: str) -> None:
    try:
        serverFromString(reactor, description)
    except Exception as e:
        _exit_usage(
            f"cannot listen on {description!r} ({e}); write {flag} as a Twisted "
            "server endpoint, for example tcp:8080 or tcp:8080:interface=127.0.0.1"
        )


def _worker_count(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        _exit_usage(f"--workers takes a number of processes or 'auto', not {text!r}")
    return count


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

        from .demo import DemoBackendFactory

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


def _worker_argv(argv: list[str], demo_url: str | None) -> list[str]:
    """The command line of a worker: the parent's, as one process, with the demo's address.

    Relative paths in it (a configuration file, a CA bundle, an access log)
    stay right: workers start in the parent's directory.
    """
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name == "--workers":
            skip = "=" not in arg
            continue
        if name == "--demo":
            continue
        args.append(arg)
    if demo_url is not None:
        args += ["--backend", demo_url]
    return [*args, "--workers", "1"]


def makeService(options: Options) -> IService:
    """The proxy as a service: its listeners, the metrics endpoint, the demo backend if asked.

    With more than one worker, listening and proxying happen in worker
    processes instead (see :mod:`upgradeproxy.workers`); this process then
    serves the metrics of all of them.
    """
    from twisted.internet import reactor

    config: ProxyConfig = options["proxy_config"]
    top = MultiService()
    demo: _DemoBackendService | None = None
    if options["demo"]:
        demo = _DemoBackendService()
        demo.setServiceParent(top)
    if config.workers > 1:
        snapshots = tempfile.mkdtemp(prefix="upgradeproxy-metrics-") if config.metrics else None

        def worker_args() -> list[str]:
            return _worker_argv(options.argv, demo.url if demo is not None else None)

        sockets = open_sockets(options["listen_addresses"], config.workers)
        pool = WorkerPool(
            reactor,
            sockets,
            worker_args,
            stop_timeout=config.shutdown_grace + STOP_MARGIN,
            snapshots=snapshots,
        )
        pool.setServiceParent(top)
        if config.metrics and snapshots is not None:
            directory = snapshots

            def source() -> list[tuple[str | None, dict[str, Any]]]:
                return list(read_snapshots(directory, time.time()))

            metrics_service(config.metrics, reactor, source).setServiceParent(top)
        return top
    access_log, stream = open_access_log(config)
    backends = None
    if demo is not None:
        backends = [BackendAddress(_DemoEndpoint(demo), b"", "built-in demo backend")]
    factory = build_factory(config, reactor, access_log=access_log, backends=backends)
    on_stopped = stream.close if stream is not None and stream is not sys.stdout else None
    ProxyService(
        factory, config.listen, reactor=reactor, grace=config.shutdown_grace, on_stopped=on_stopped
    ).setServiceParent(top)
    if config.metrics:
        metrics_service(config.metrics, reactor, local_snapshots(factory)).setServiceParent(top)
    return top
