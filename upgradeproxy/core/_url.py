"""Splitting an ``http://``-like URL into what a connection needs.

``--backend`` URLs (:mod:`upgradeproxy.core.address`) and ``upgradeproxy check``
URLs (:mod:`upgradeproxy.cli.check`) share these checks; each caller turns a
:class:`BadUrl` into its own message, with its own advice on what to write.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


class UrlProblem(enum.Enum):
    """What is wrong with a URL; the value reads after the URL in a message."""

    SCHEME = "has an unsupported scheme"
    CREDENTIALS = "carries credentials"
    PORT = "has an invalid port"
    NO_HOST = "has no host"
    BAD_HOST = "has an invalid host"


class BadUrl(ValueError):
    """A URL :func:`split_http_url` cannot use; ``problem`` says why."""

    def __init__(self, problem: UrlProblem) -> None:
        super().__init__(problem.value)
        self.problem = problem


@dataclass(frozen=True, slots=True)
class HttpUrl:
    """The parts of a URL, checked.

    ``host`` is the host as ``urllib.parse`` gives it: lower case, an IPv6
    address without its brackets. ``netloc`` is the authority as written.
    """

    scheme: str
    host: str
    port: int
    port_given: bool
    netloc: str
    path: str
    query: str
    fragment: str


def split_http_url(text: str, default_ports: Mapping[str, int]) -> HttpUrl:
    """Split ``text``, whose scheme must be one of ``default_ports``' keys.

    A URL without a port gets its scheme's default port. Raises
    :class:`BadUrl` for another scheme, credentials (``user:pw@``), a port
    that is not a number from 1 to 65535, or a missing or malformed host.
    """
    try:
        parts = urlsplit(text)
    except ValueError:  # an unbalanced "[" in the authority, or odd Unicode in it
        raise BadUrl(UrlProblem.BAD_HOST) from None
    if parts.scheme not in default_ports:
        raise BadUrl(UrlProblem.SCHEME)
    if parts.username is not None or parts.password is not None:
        raise BadUrl(UrlProblem.CREDENTIALS)
    try:
        port = parts.port
    except ValueError:
        raise BadUrl(UrlProblem.PORT) from None
    if port == 0:
        raise BadUrl(UrlProblem.PORT)
    if not parts.hostname:
        raise BadUrl(UrlProblem.NO_HOST)
    return HttpUrl(
        scheme=parts.scheme,
        host=parts.hostname,
        port=default_ports[parts.scheme] if port is None else port,
        port_given=port is not None,
        netloc=parts.netloc,
        path=parts.path,
        query=parts.query,
        fragment=parts.fragment,
    )
