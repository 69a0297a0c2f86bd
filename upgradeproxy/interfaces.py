"""The public contracts of upgradeproxy.

An upgrade validator decides whether a protocol switch may go ahead. The
proxy asks every validator in its chain twice: once when an upgrade request
arrives (before any backend is contacted), and once when the backend answers
``101 Switching Protocols``. The first refusal wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from zope.interface import Attribute, Interface

from .http1 import RequestHead, ResponseHead, is_upgrade_request, offered_protocols


@dataclass(frozen=True, slots=True)
class Refusal:
    """A validator's "no", with the words the client and the log will show.

    ``status`` is the HTTP status the client receives. For a refused request
    it is a 4xx of the validator's choosing; for a refused ``101`` the proxy
    always answers ``502`` (the backend is at fault, not the client), and
    ``status`` is ignored. ``reason`` is one plain sentence naming the broken
    rule, e.g. ``"the backend answered 101 without 'Connection: upgrade'
    (RFC 9110 §7.6.1)"``.
    """

    reason: str
    status: int = 502
    #: What the party at fault can change, in a sentence (optional). Shown by
    #: ``upgradeproxy check``; never sent to clients.
    hint: str = ""


_T = TypeVar("_T")


class _cached(Generic[_T]):
    """Like :func:`functools.cached_property`, without its lock.

    Python 3.11's takes a lock on every first access, a real share of what
    an upgrade costs; each attempt lives in one thread anyway. The value
    goes into the instance's ``__dict__``, where later lookups find it first.
    """

    def __init__(self, compute: Callable[[Any], _T]) -> None:
        self._compute = compute
        self._name = compute.__name__
        self.__doc__ = compute.__doc__

    @overload
    def __get__(self, instance: None, owner: type) -> _cached[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type) -> _T: ...

    def __get__(self, instance: object, owner: type) -> _T | _cached[_T]:
        if instance is None:
            return self
        value = self._compute(instance)
        instance.__dict__[self._name] = value
        return value


@dataclass(frozen=True)
class UpgradeAttempt:
    """What a validator looks at: the client's request and, later, the ``101``.

    ``request`` is the head exactly as the client sent it (before hop-by-hop
    fields were removed). ``response`` is the backend's ``101`` head as
    received, or ``None`` while the request is being checked.
    ``request_body_complete`` tells whether the whole request body had been
    forwarded when the ``101`` arrived. ``backend`` names the backend chosen
    for the request, ``route`` the route that serves it, and ``client`` is
    the client's address. ``client_protocol`` names the front door the
    client came through: ``"HTTP/1.1"``, or ``"HTTP/2"`` for a WebSocket (or
    other protocol) opened with an extended CONNECT (RFC 8441); there,
    ``request`` is the HTTP/1.1 upgrade request the proxy made of it, with
    the proxy's own ``Sec-WebSocket-Key``.
    """

    request: RequestHead
    response: ResponseHead | None = None
    request_body_complete: bool = True
    #: The backend's name, as in the logs (for example ``127.0.0.1:9000``).
    backend: str = ""
    #: The client's address, as in the logs.
    client: str = ""
    #: The name of the route serving the request (see :mod:`upgradeproxy.core.routing`).
    route: str = ""
    #: The protocol the client spoke to the proxy: "HTTP/1.1" or "HTTP/2".
    client_protocol: str = "HTTP/1.1"

    @_cached
    def is_upgrade(self) -> bool:
        """True when the request asked to switch protocols (RFC 9110 §7.8)."""
        return is_upgrade_request(self.request)

    @_cached
    def offered(self) -> list[bytes]:
        """The protocols the client offered in ``Upgrade``, in order."""
        return offered_protocols(self.request) if self.is_upgrade else []

    @_cached
    def selected(self) -> list[bytes]:
        """The protocols the backend's ``101`` names in ``Upgrade``, in order."""
        if self.response is None:
            return []
        return self.response.headers.elements(b"upgrade")


class IUpgradeValidator(Interface):
    """Checks an upgrade request and the backend's answer to it.

    Both methods are called in the reactor thread and must return at once:
    no blocking I/O, no Deferreds. Return ``None`` to accept, or a
    :class:`Refusal` to refuse. A validator that raises is treated as a
    refusal, and the exception is logged.
    """

    name = Attribute("A short name for logs, such as 'rfc9110'.")

    def check_request(attempt: UpgradeAttempt) -> Refusal | None:
        """Called for every upgrade request, before a backend is contacted.

        ``attempt.response`` is ``None``. A refusal is sent to the client
        with its ``status`` (a 4xx) and ``reason``, and the connection is
        closed; the backend never sees the request.
        """

    def check_response(attempt: UpgradeAttempt) -> Refusal | None:
        """Called for every ``101`` a backend sends, before anything reaches the client.

        This includes a ``101`` to a request that did not ask to upgrade.
        A refusal makes the proxy answer ``502`` with the refusal's reason,
        log it at warning level, and close both connections.
        """


class IValidatorPlugin(Interface):
    """Makes validators by name: what ``--validator NAME[:ARG]`` finds.

    Providers are Twisted plugins (they also provide
    :class:`twisted.plugin.IPlugin`) found with :func:`twisted.plugin.getPlugins`
    in the :mod:`upgradeproxy.plugins` package, which any installed
    distribution can add a drop-in module to.
    """

    name = Attribute("The short name used with --validator, such as 'origin'.")
    description = Attribute("One line for --list-validators, saying what it checks.")
    argument = Attribute(
        "How to write the argument after the colon, such as 'PATTERN[,PATTERN...]', "
        "or None when the validator takes none."
    )

    def make(argument: str | None) -> IUpgradeValidator:
        """A validator configured by ``argument`` (the text after the colon, or None).

        Raise :class:`ValueError` with a message that says what to write
        instead when the argument is missing, unexpected or malformed.
        """
