"""Turning the ``--backend`` value into a Twisted client endpoint."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
)
from twisted.internet.interfaces import IStreamClientEndpoint

_USAGE = (
    "write --backend as http://HOST:PORT[/PATH] (for example http://127.0.0.1:9000) "
    "or as a Twisted client endpoint (for example unix:path=/run/app.sock)"
)


class BadBackend(ValueError):
    """A ``--backend`` value that cannot be used; the message says what to write."""


@dataclass(frozen=True, slots=True)
class BackendAddress:
    """Where the backend is: an endpoint, a path prefix, and a name for logs."""

    endpoint: IStreamClientEndpoint
    prefix: bytes
    name: str


def describe_endpoint(endpoint: IStreamClientEndpoint) -> str:
    """A short name for a client endpoint, for logs: ``host:port``, a path, or its type."""
    host = getattr(endpoint, "_hostText", None) or getattr(endpoint, "_host", None)
    port = getattr(endpoint, "_port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    path = getattr(endpoint, "_path", None)
    if path is not None:
        return f"unix:{path}"
    return type(endpoint).__name__


def parse_backend(reactor: object, text: str, *, connect_timeout: float = 10.0) -> BackendAddress:
    """Parse ``http://host:port[/prefix]`` or a client endpoint string.

    Raises :class:`BadBackend` with a message that says what to write instead.
    """
    if not text:
        raise BadBackend(f"no backend given; {_USAGE}")
    if "://" in text:
        return _parse_url(reactor, text, connect_timeout)
    try:
        endpoint = clientFromString(reactor, text)
    except Exception as e:  # clientFromString raises many types for bad strings
        raise BadBackend(f"cannot use backend {text!r} ({e}); {_USAGE}") from None
    return BackendAddress(endpoint, b"", describe_endpoint(endpoint))


def _tcp_endpoint(reactor: object, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A plain TCP endpoint for an IP address; a resolving one for a name.

    ``HostnameEndpoint`` resolves in a thread even for an address, which
    would cost every new backend connection a thread round trip.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


def _parse_url(reactor: object, text: str, connect_timeout: float) -> BackendAddress:
    parts = urlsplit(text)
    if parts.scheme == "https":
        raise BadBackend(f"https backends are not supported yet ({text!r}); {_USAGE}")
    if parts.scheme != "http":
        raise BadBackend(f"backend URL {text!r} must start with http://; {_USAGE}")
    try:
        port = parts.port or 80
    except ValueError:
        raise BadBackend(f"backend URL {text!r} has an invalid port; {_USAGE}") from None
    if not parts.hostname:
        raise BadBackend(f"backend URL {text!r} has no host; {_USAGE}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise BadBackend(
            f"backend URL {text!r} may not carry a query, fragment or credentials; {_USAGE}"
        )
    endpoint = _tcp_endpoint(reactor, parts.hostname, port, connect_timeout)
    prefix = parts.path.rstrip("/").encode("utf-8")
    return BackendAddress(endpoint, prefix, f"{parts.hostname}:{port}")
