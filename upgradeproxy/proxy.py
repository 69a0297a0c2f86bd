"""The public factory: what an application listens with to run the proxy."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from .address import BackendAddress, describe_endpoint
from .backend import BackendPool, BackendSettings
from .client import ClientConnection
from .interfaces import IUpgradeValidator, Refusal, UpgradeAttempt
from .tunnel import Tunnel
from .validators import RFC9110Validator, WebSocketValidator, unsolicited_switch


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Limits and timeouts of the proxy; the defaults suit most deployments."""

    max_request_head: int = 32 * 1024
    max_held_bytes: int = 64 * 1024
    #: Seconds a client may take to send a request head, and may stay idle
    #: between requests on a kept-alive connection.
    request_head_timeout: float = 60.0
    #: Forward ``Upgrade: h2c`` offers to the backend (off: see ``rewrite.without_h2c``).
    forward_h2c: bool = False
    #: Move tunnel bytes with splice(2) where both sides are plain sockets (Linux).
    splice: bool = True
    backend: BackendSettings = field(default_factory=BackendSettings)


class ProxyFactory(ServerFactory):
    """A reverse proxy to one backend, as a Twisted server factory.

    Listen with it on any server endpoint::

        from twisted.internet import endpoints, reactor
        from upgradeproxy import ProxyFactory

        backend = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", 9000)
        factory = ProxyFactory(backend)
        endpoints.serverFromString(reactor, "tcp:8080").listen(factory)

    ``validators`` is the chain of :class:`~upgradeproxy.interfaces.IUpgradeValidator`
    providers asked about every upgrade; the default is strict RFC 9110 plus
    the RFC 6455 handshake rules for WebSocket.
    """

    log = Logger()
    noisy = False  # startFactory logs a line that says more

    def __init__(
        self,
        backend: IStreamClientEndpoint | BackendAddress,
        validators: Iterable[IUpgradeValidator] | None = None,
        *,
        clock: IReactorTime | None = None,
        settings: ProxySettings | None = None,
        scheme: str = "http",
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        if not isinstance(backend, BackendAddress):
            backend = BackendAddress(backend, b"", describe_endpoint(backend))
        endpoint, self.prefix, self.backend_name = backend.endpoint, backend.prefix, backend.name
        self.clock = clock
        self.settings = settings or ProxySettings()
        self.scheme = scheme
        self.validators: tuple[IUpgradeValidator, ...] = tuple(
            (RFC9110Validator(), WebSocketValidator()) if validators is None else validators
        )
        for validator in self.validators:
            if not IUpgradeValidator.providedBy(validator):
                raise TypeError(f"{validator!r} does not provide IUpgradeValidator")
        self.pool = BackendPool(endpoint, clock, self.settings.backend)
        self.connections: set[ClientConnection] = set()
        self.tunnels: set[Tunnel] = set()

    def startFactory(self) -> None:
        names = ", ".join(str(getattr(v, "name", v)) for v in self.validators) or "none"
        self.log.info(
            "proxying to {backend}; upgrade validators: {validators}",
            backend=self.backend_name,
            validators=names,
        )

    def buildProtocol(self, addr: object) -> ClientConnection:
        return ClientConnection(self)

    # -- validators --------------------------------------------------------------

    def check_request(self, attempt: UpgradeAttempt) -> Refusal | None:
        """The first refusal of the chain for an upgrade request, or ``None``."""
        return self._ask("check_request", attempt)

    def check_response(self, attempt: UpgradeAttempt) -> Refusal | None:
        """The first refusal of the chain for a backend's ``101``, or ``None``."""
        refusal = self._ask("check_response", attempt)
        return refusal if refusal is not None else unsolicited_switch(attempt)

    def _ask(self, method: str, attempt: UpgradeAttempt) -> Refusal | None:
        for validator in self.validators:
            try:
                refusal: Refusal | None = getattr(validator, method)(attempt)
            except Exception:
                name = getattr(validator, "name", repr(validator))
                self.log.failure("upgrade validator {name} raised", name=name)
                return Refusal(f"upgrade validator {name} failed", 500)
            if refusal is not None:
                return refusal
        return None

    # -- bookkeeping ---------------------------------------------------------------

    def connection_opened(self, connection: ClientConnection) -> None:
        self.connections.add(connection)

    def connection_closed(self, connection: ClientConnection) -> None:
        self.connections.discard(connection)

    def tunnel_started(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)

    def tunnel_ended(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
