"""The twistd/twist glue: command-line options and the service they build."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.python import usage
from zope.interface import implementer

from .address import BackendAddress, BadBackend, parse_backend
from .backend import BackendSettings
from .proxy import ProxyFactory, ProxySettings
from .registry import DEFAULT_CHAIN, BadValidator, build_chain, describe_installed
from .workers import WorkerPool, WorkersUnsupported, listen_address, open_sockets

DEFAULT_LISTEN = "tcp:8080"


def _exit_usage(message: str) -> None:
    """Leave with one line that says what to change, and exit status 2.

    twistd would print the whole usage text and exit with 1, burying the one
    line that matters.
    """
    sys.stderr.write(f"upgradeproxy: {message}\n")
    raise SystemExit(2)


class Options(usage.Options):
    """``twistd upgradeproxy`` / ``twist upgradeproxy`` options."""

    synopsis = "[--listen ENDPOINT]... (--backend URL | --demo)"
    longdesc = (
        "An HTTP/1.1 reverse proxy that gets protocol upgrades (WebSocket and any "
        "other Upgrade token) right."
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
    ]
    optParameters = [
        [
            "backend",
            "b",
            None,
            "The backend: http://HOST:PORT[/PATH], or a Twisted client "
            "endpoint string such as unix:path=/run/app.sock.",
        ],
        [
            "workers",
            None,
            "1",
            "Processes serving the --listen addresses (tcp: endpoints), or 'auto' for one "
            "per core. With more than one, a parent process starts, watches and restarts them.",
        ],
        [
            "response-timeout",
            None,
            60.0,
            "Seconds to wait for the backend's response head "
            "(and so for an upgrade handshake) before answering 504.",
            float,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["validators"] = []

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
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["demo"] and self["backend"]:
            _exit_usage("give either --backend or --demo, not both")
        if not self["demo"] and not self["backend"]:
            _exit_usage(
                "no backend given: add --backend http://HOST:PORT (for example "
                "--backend http://127.0.0.1:9000), or --demo to try the built-in demo"
            )
        if self["backend"]:
            from twisted.internet import reactor

            try:
                self["backend_address"] = parse_backend(reactor, self["backend"])
            except BadBackend as e:
                _exit_usage(str(e))
        try:
            self["validator_chain"] = build_chain(self["validators"] or DEFAULT_CHAIN)
        except BadValidator as e:
            _exit_usage(str(e))
        from twisted.internet import reactor

        for description in self["listen"]:
            try:
                serverFromString(reactor, description)
            except Exception as e:
                _exit_usage(
                    f"cannot listen on {description!r} ({e}); write --listen as a Twisted "
                    "server endpoint, for example tcp:8080 or tcp:8080:interface=127.0.0.1"
                )
        self["worker_count"] = _worker_count(self["workers"])
        if self["worker_count"] > 1:
            try:
                self["listen_addresses"] = [listen_address(reactor, d) for d in self["listen"]]
            except WorkersUnsupported as e:
                _exit_usage(str(e))


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


def build_factory(options: Options, backend: BackendAddress | None = None) -> ProxyFactory:
    """The proxy factory that ``options`` describe (``backend`` overrides ``--backend``)."""
    settings = ProxySettings(
        forward_h2c=bool(options["forward-h2c"]),
        splice=not options["no-splice"],
        backend=BackendSettings(response_timeout=options["response-timeout"]),
    )
    if backend is None:
        backend = options["backend_address"]
    return ProxyFactory(backend, options["validator_chain"], settings=settings)


def _worker_args(options: Options, backend: str) -> list[str]:
    """The proxy options a worker process is started with."""
    args = ["--backend", backend, "--response-timeout", repr(options["response-timeout"])]
    for spec in options["validators"]:
        args += ["--validator", spec]
    for flag in ("forward-h2c", "no-splice"):
        if options[flag]:
            args.append(f"--{flag}")
    return args


def makeService(options: Options) -> IService:
    """The proxy as a service: one listener per --listen, and the demo backend if asked.

    With ``--workers N`` above 1, listening and proxying happen in N worker
    processes instead (see :mod:`upgradeproxy.workers`).
    """
    from twisted.internet import reactor

    top = MultiService()
    demo: _DemoBackendService | None = None
    if options["demo"]:
        demo = _DemoBackendService()
        demo.setServiceParent(top)
    if options["worker_count"] > 1:

        def worker_args() -> list[str]:
            backend = options["backend"] or demo.url  # type: ignore[union-attr]
            return _worker_args(options, backend)

        sockets = open_sockets(options["listen_addresses"], options["worker_count"])
        WorkerPool(reactor, sockets, worker_args).setServiceParent(top)
        return top
    backend = None
    if demo is not None:
        backend = BackendAddress(_DemoEndpoint(demo), b"", "built-in demo backend")
    factory = build_factory(options, backend)
    for description in options["listen"]:
        endpoint = serverFromString(reactor, description)
        StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    return top
