"""What the in-memory tests share: requests and answers, and proxies with scripted backends.

:class:`Cluster` builds a proxy with routes over scripted backends behind
either front door: the listening :class:`~upgradeproxy.ProxyFactory`
(``door="listening"``) or a twisted.web site with a
:class:`~upgradeproxy.web.ProxyResource` at its root (``door="web"``). The
exchange's behaviour is tested once, against both.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.web.resource import Resource
from twisted.web.server import Site

from upgradeproxy import BackendSettings, ProxyFactory, ProxySettings
from upgradeproxy.core.accesslog import AccessLog
from upgradeproxy.core.address import BackendAddress
from upgradeproxy.core.balancer import BackendGroup, Policy
from upgradeproxy.core.proxy import Configuration, Proxy, Reconfigured
from upgradeproxy.core.routing import Route
from upgradeproxy.testing import ScriptedBackend, ScriptedBackendEndpoint
from upgradeproxy.testing import connect_client as _connect_client
from upgradeproxy.validators import RFC9110Validator, WebSocketValidator
from upgradeproxy.web import ProxyResource

#: The sample key of RFC 6455 §1.3, and the accept value it gets.
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
GET = b"GET /page HTTP/1.1\r\nHost: app.example\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

#: The two front doors an exchange is driven through.
DOORS = ("listening", "web")


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def messages(logs: list[dict[str, Any]]) -> str:
    return "\n".join(formatEvent(e) for e in logs)


class MountedProxy:
    """A twisted.web site with a ProxyResource at /app, one in-memory client connection."""

    def __init__(self, validators: list[object] | None = None) -> None:
        self.endpoint = ScriptedBackendEndpoint()
        root = Resource()
        root.putChild(
            b"app",
            ProxyResource(
                BackendAddress(self.endpoint, b"", "scripted backend"),
                validators,  # type: ignore[arg-type]
                clock=Clock(),
            ),
        )
        self.site = Site(root)
        address = IPv4Address("TCP", "192.0.2.9", 40000)
        self.protocol = self.site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def backend(self) -> ScriptedBackend:
        return self.endpoint.connections[-1]

    def heads(self) -> list[bytes]:
        """Every response head the client received."""
        return re.findall(rb"HTTP/1\.1 \d{3} .*?\r\n\r\n", self.transport.value(), re.S)


class Client:
    """One in-memory client connection."""

    def __init__(self, factory: IProtocolFactory, host: str = "192.0.2.7", port: int = 50000):
        self.protocol, self.transport = _connect_client(factory, host, port)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def received(self) -> bytes:
        return bytes(self.transport.value())

    @property
    def closed(self) -> bool:
        return not self.transport.connected


class Cluster:
    """A proxy with routes over several scripted backends."""

    def __init__(
        self,
        routes: dict[str, dict[str, Any]] | None = None,
        *,
        settings: ProxySettings | None = None,
        access_log: AccessLog | None = None,
        door: str = "listening",
    ) -> None:
        self.clock = Clock()
        self.endpoints: dict[str, ScriptedBackendEndpoint] = {}
        built = self.routes(routes or {"default": {"backends": ["a"]}})
        proxy = Proxy(routes=built, clock=self.clock, settings=settings, access_log=access_log)
        #: The proxy behind the door.
        self.proxy = proxy
        #: What a client connects to: the listening factory, or a twisted.web site.
        self.factory: IProtocolFactory
        if door == "listening":
            self.factory = ProxyFactory(proxy=proxy)
        else:
            self.factory = Site(ProxyResource(proxy=proxy), reactor=self.clock)
        self.factory.doStart()

    def routes(self, routes: dict[str, dict[str, Any]]) -> list[Route]:
        """Routes over the scripted backends named in ``routes`` (made on first mention)."""
        built = []
        for name, spec in routes.items():
            spec = dict(spec)
            addresses = []
            for backend in spec.pop("backends"):
                endpoint = self.endpoints.setdefault(backend, ScriptedBackendEndpoint())
                addresses.append(BackendAddress(endpoint, b"", backend))
            group = BackendGroup(
                addresses,
                policy=spec.pop("policy", Policy.LEAST_CONN),
                clock=self.clock,
                settings=BackendSettings(),
                fail_timeout=spec.pop("fail_timeout", 10.0),
                route=name,
                send_proxy=spec.pop("send_proxy", None),
                health=spec.pop("health", None),
            )
            validators = (RFC9110Validator(), WebSocketValidator())
            built.append(Route(name, group, validators, **spec))
        return built

    def reconfigure(
        self, routes: dict[str, dict[str, Any]], settings: ProxySettings | None = None
    ) -> Reconfigured:
        """Give the running proxy new routes (and settings), as a reload does."""
        current = self.proxy.configuration
        return self.proxy.reconfigure(
            Configuration(
                tuple(self.routes(routes)), settings or current.settings, current.access_log
            )
        )

    def client(self, host: str = "192.0.2.7", port: int = 50000) -> Client:
        return Client(self.factory, host, port)

    def last(self, backend: str) -> Any:
        return self.endpoints[backend].connections[-1]

    def count(self, backend: str) -> int:
        """Connections made to ``backend``."""
        return len(self.endpoints[backend].connections)

    def requests(self, backend: str) -> int:
        """Requests ``backend`` received, over all its connections."""
        return sum(c.received.count(b" HTTP/1.1\r\n") for c in self.endpoints[backend].connections)
