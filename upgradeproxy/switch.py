"""The moment of a protocol switch, shared by every front end of the proxy.

After the validators accept a ``101``, :func:`complete_switch` does, in one
reactor turn so that no byte can slip in between: write the ``101`` to the
client, then the bytes that followed the backend's ``101`` head, then replay
the client's held bytes into the backend, then hand both connections to a
:class:`~upgradeproxy.tunnel.Tunnel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import ITransport
from twisted.logger import Logger

from .interfaces import Refusal, UpgradeAttempt
from .rewrite import switch_for_client
from .tunnel import Side, Tunnel, TunnelStats

if TYPE_CHECKING:
    from .backend import BackendConnection
    from .balancer import Backend
    from .proxy import ProxyFactory
    from .routing import Route

log = Logger()


def _describe(attempt: UpgradeAttempt) -> tuple[str, str]:
    return attempt.request.method.decode("latin-1"), attempt.request.target.decode("latin-1")


def log_refused_switch(attempt: UpgradeAttempt, refusal: Refusal, client_address: str) -> None:
    """The warning that says exactly why a backend's ``101`` was refused."""
    method, target = _describe(attempt)
    log.warn(
        "refused the backend's switch for {client} {method} {target}: {reason}",
        client=client_address,
        method=method,
        target=target,
        reason=refusal.reason,
    )


def complete_switch(
    proxy: ProxyFactory,
    attempt: UpgradeAttempt,
    *,
    route: Route,
    upstream: Backend,
    client: ITransport,
    backend: BackendConnection,
    early_data: bytes,
    held: bytes,
    attach: Callable[[Tunnel], None],
) -> Tunnel:
    """Switch an accepted upgrade to raw pass-through; return the running tunnel.

    ``early_data`` is what the backend sent right behind its ``101`` head;
    ``held`` is what the client sent after its request, which nobody has
    parsed. ``upstream`` is the backend the tunnel keeps busy until it ends.
    ``attach`` routes the client connection's events to the tunnel;
    it is called before the tunnel starts, because starting may already end
    it (a client that reset while its bytes were held).
    """
    response = attempt.response
    assert response is not None and backend.transport is not None
    client.write(switch_for_client(response).serialize())
    protocol = b", ".join(attempt.selected).decode("latin-1")
    target = attempt.request.target.decode("latin-1")
    clock = proxy.clock
    stats = TunnelStats(
        protocol, attempt.client, clock.seconds(), target, route.name, upstream.name
    )
    tunnel = Tunnel(
        client,
        backend.transport,
        stats=stats,
        clock=clock,
        on_end=proxy.tunnel_ended,
        splice=proxy.settings.splice,
        idle_timeout=route.tunnel_idle_timeout,
        lifetime=route.tunnel_lifetime,
    )
    if early_data:
        tunnel.data(Side.BACKEND, early_data)
    if held:
        tunnel.data(Side.CLIENT, held)
    backend.enter_tunnel(tunnel)
    attach(tunnel)
    proxy.tunnel_started(tunnel, upstream)
    tunnel.start()
    return tunnel
