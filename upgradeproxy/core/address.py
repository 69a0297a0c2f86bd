"""Turning the ``--backend`` value into a Twisted client endpoint.

An ``https://`` backend gets TLS with its certificate verified (the system's
trust store, or a CA bundle given as ``tls_ca``) and its host name checked;
verification can be turned off, which is logged as a warning.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .._twisted import client_endpoint_location
from ._url import BadUrl, HttpUrl, UrlProblem, split_http_url

_USAGE = (
    "write --backend as http://HOST:PORT[/PATH] or https://HOST[:PORT][/PATH] (for example "
    "http://127.0.0.1:9000) or as a Twisted client endpoint (for example unix:path=/run/app.sock)"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}

log = Logger()


class BadBackend(ValueError):
    """A ``--backend`` value that cannot be used; the message says what to write."""


@dataclass(frozen=True, slots=True)
class BackendAddress:
    """Where the backend is: an endpoint, a path prefix, and a name for logs.

    ``tls`` is true when the endpoint speaks TLS (an ``https://`` backend).
    """

    endpoint: IStreamClientEndpoint
    prefix: bytes
    name: str
    tls: bool = False


def describe_endpoint(endpoint: IStreamClientEndpoint) -> str:
    """A short name for a client endpoint, for logs: ``host:port``, a path, or its type."""
    return client_endpoint_location(endpoint) or type(endpoint).__name__


def parse_backend(
    reactor: object,
    text: str,
    *,
    connect_timeout: float = 10.0,
    tls_ca: str | None = None,
    tls_verify: bool = True,
    warn: bool = True,
) -> BackendAddress:
    """Parse ``http://host:port[/prefix]``, ``https://host[:port][/prefix]`` or a client endpoint.

    For ``https://``, the backend's certificate must chain to the system's
    trust store, or to the PEM bundle in the file ``tls_ca`` when given, and
    must name the URL's host. ``tls_verify=False`` accepts any certificate
    and logs a warning, here, unless ``warn`` is false (for a value that is
    only checked, or whose user warns when it uses it: see
    :func:`warn_unverified`). ``tls_verify`` means nothing without
    TLS and is ignored for other backends; ``tls_ca`` there is refused,
    because a CA bundle that is never used means the URL is not what was meant.

    Raises :class:`BadBackend` with a message that says what to write instead.
    """
    if not text:
        raise BadBackend(f"no backend given; {_USAGE}")
    if "://" not in text:
        _refuse_unused_ca(text, tls_ca)
        return _endpoint_backend(reactor, text)
    url = _split_url(text)
    endpoint = _tcp_endpoint(reactor, url.host, url.port, connect_timeout)
    tls = url.scheme == "https"
    if tls:
        creator = _client_tls(text, url.host, tls_ca, tls_verify, warn)
        endpoint = wrapClientTLS(creator, endpoint, clock=IReactorTime(reactor))
    else:
        _refuse_unused_ca(text, tls_ca)
    prefix = url.path.rstrip("/").encode("utf-8")
    return BackendAddress(endpoint, prefix, f"{url.host}:{url.port}", tls=tls)


def _endpoint_backend(reactor: object, text: str) -> BackendAddress:
    try:
        endpoint = clientFromString(reactor, text)
    except Exception as e:  # clientFromString raises many types for bad strings
        raise BadBackend(f"cannot use backend {text!r} ({e}); {_USAGE}") from None
    return BackendAddress(endpoint, b"", describe_endpoint(endpoint))


def _split_url(text: str) -> HttpUrl:
    try:
        url = split_http_url(text, _DEFAULT_PORTS)
    except BadUrl as e:
        if e.problem is UrlProblem.SCHEME:
            raise BadBackend(
                f"backend URL {text!r} must start with http:// or https://; {_USAGE}"
            ) from None
        raise BadBackend(f"backend URL {text!r} {e.problem.value}; {_USAGE}") from None
    if url.query or url.fragment:
        raise BadBackend(f"backend URL {text!r} may not carry a query or fragment; {_USAGE}")
    return url


def _refuse_unused_ca(text: str, tls_ca: str | None) -> None:
    if tls_ca is not None:
        raise BadBackend(
            f"a CA bundle ({tls_ca}) is given for backend {text!r}, which does not use TLS: "
            "write the backend as https://HOST[:PORT] if it serves TLS, or drop the CA bundle"
        )


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


def _client_tls(
    text: str, host: str, tls_ca: str | None, tls_verify: bool, warn: bool
) -> IOpenSSLClientConnectionCreator:
    try:
        if tls_verify:
            return _verifying_tls(text, host, tls_ca)
        if tls_ca is not None:
            raise BadBackend(
                f"a CA bundle ({tls_ca}) is given for backend {text!r}, but certificate "
                "verification is off: drop one of the two"
            )
        creator = _UnverifiedClientTLS(_server_name(host))
    except UnicodeError as e:  # IDNA refuses the name
        raise BadBackend(
            f"backend URL {text!r} has a host name that TLS cannot use ({e}); {_USAGE}"
        ) from None
    if warn:
        warn_unverified(text)
    return creator


def warn_unverified(url: str) -> None:
    """Log that the certificate of the backend at ``url`` is not verified."""
    log.warn(
        "certificate verification is OFF for backend {url}: anyone on the path can read "
        "and change its traffic",
        url=url,
    )


def _verifying_tls(text: str, host: str, tls_ca: str | None) -> IOpenSSLClientConnectionCreator:
    if tls_ca is None:
        trust = platformTrust()
    else:
        trust = trustRootFromCertificates(_read_ca_bundle(text, tls_ca))
    # Sends the host as SNI and checks the certificate against it with
    # service_identity. For an IP-literal host no SNI is sent (RFC 6066
    # allows only names there), and the certificate must list that very
    # address as an IP subjectAltName: a name that resolves to it is not enough.
    return optionsForClientTLS(host, trustRoot=trust)


def _read_ca_bundle(text: str, path: str) -> list[Certificate]:
    """The certificates in the PEM file ``path``."""
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise BadBackend(
            f"cannot read the CA bundle {path} for backend {text!r}: {e.strerror}; "
            "give the path of a readable PEM file"
        ) from None
    try:
        authorities = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise BadBackend(
            f"the CA bundle {path} for backend {text!r} holds no readable certificate: give a "
            "PEM file of one or more '-----BEGIN CERTIFICATE-----' blocks, with the CA that "
            "signed the backend's certificate"
        ) from None
    return [Certificate(X509.from_cryptography(c)) for c in authorities]


def _server_name(host: str) -> bytes | None:
    """The SNI for ``host``: its IDNA form, or ``None`` for an IP address (RFC 6066 §3)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host.encode("idna")
    return None


#: OpenSSL's reasons when the peer answered a TLS hello with something else.
_NOT_TLS = ("wrong version number", "packet length too long", "http request")


def describe_tls_failure(reason: Failure) -> str | None:
    """What went wrong in TLS with a backend, and what to change; ``None`` for other failures.

    The words follow "the backend (NAME) could not be reached: ". A TLS
    endpoint reports its connection as made before the handshake, so these
    failures arrive as the connection's ``connectionLost`` reason.
    """
    if reason.check(VerificationError):
        return (
            "its TLS certificate does not name the host in the backend URL: write the URL "
            "with a host name or IP address the certificate lists, or give the backend a "
            "certificate for this one"
        )
    if not reason.check(SSL.Error):
        return None
    reasons = openssl_reasons(reason)
    if "certificate verify failed" in reasons:
        return (
            "its TLS certificate could not be verified (it is not signed by a trusted CA, or "
            "it has expired): if a private CA signed it, give that CA's certificate as the "
            "backend's CA bundle"
        )
    if any(r in reasons for r in _NOT_TLS):
        return "it did not answer in TLS: if it serves plain HTTP, write its URL with http://"
    return f"TLS failed ({', '.join(reasons) or 'no reason given'})"


def openssl_reasons(reason: Failure) -> list[str]:
    """The reason strings of an ``OpenSSL.SSL.Error``: its error queue, or its arguments."""
    args = reason.value.args if reason.value is not None else ()
    if args and isinstance(args[0], list):  # [(library, function, reason), ...]
        return [str(entry[-1]) for entry in args[0]]
    return [str(arg) for arg in args]


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Client TLS that accepts any certificate, still naming the host with SNI."""

    def __init__(self, server_name: bytes | None) -> None:
        self._options = CertificateOptions()  # verify=False: no peer check at all
        self._server_name = server_name

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection
