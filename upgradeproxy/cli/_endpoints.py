"""What a server endpoint string names, read without listening on it.

Twisted's endpoint classes keep the port and interface they were given in
private attributes and offer no public way to read them; this module is the
one place that reads them, for the checks done before anything listens and
for the sockets ``--workers`` opens itself.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString

from .._twisted import endpoint_port, tcp_server_parts

#: How to write a server endpoint, for messages.
ENDPOINT_USAGE = "write a Twisted server endpoint, such as tcp:8080 or tcp:8080:interface=127.0.0.1"


class NotAnEndpoint(ValueError):
    """A server endpoint string that cannot be used; the message says why and what to write."""


class WorkersUnsupported(ValueError):
    """A ``--listen`` endpoint that several workers cannot share."""


def check_server_endpoint(reactor: object, description: str, *, port_range: bool = True) -> object:
    """The endpoint ``description`` names, with its port in range; nothing listens yet.

    ``port_range=False`` leaves a port out of range to fail when it is bound.

    Raises :class:`NotAnEndpoint` saying what is wrong and what to write.
    """
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as e:  # serverFromString raises many types for bad strings
        raise NotAnEndpoint(f"cannot listen on {description!r} ({e}); {ENDPOINT_USAGE}") from None
    port = endpoint_port(endpoint)
    if port_range and isinstance(port, int) and not 0 <= port <= 65535:
        raise NotAnEndpoint(
            f"cannot listen on {description!r}: port {port} is out of range; "
            "write a port from 1 to 65535 (0: any free port)"
        )
    return endpoint


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A TCP address to listen on, as ``--workers`` binds it."""

    family: socket.AddressFamily
    host: str
    port: int
    backlog: int
    #: The endpoint string it was read from, for messages.
    description: str


def listen_address(reactor: object, description: str) -> ListenAddress:
    """The TCP address a ``--listen`` endpoint string names.

    Raises :class:`WorkersUnsupported` for other kinds of endpoints.
    """
    endpoint = serverFromString(reactor, description)
    if isinstance(endpoint, TCP6ServerEndpoint):
        family = socket.AF_INET6
    elif isinstance(endpoint, TCP4ServerEndpoint):
        family = socket.AF_INET
    else:
        raise WorkersUnsupported(
            f"--workers needs tcp: or tcp6: listen endpoints, not {description!r}"
        )
    parts = tcp_server_parts(endpoint)
    host = parts.interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return ListenAddress(family, host, parts.port, parts.backlog, description)
