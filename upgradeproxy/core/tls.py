"""TLS from clients: the application protocol chosen over ALPN, and handshakes that fail.

Browsers and curl offer application protocols over ALPN (RFC 7301) in every
handshake. Twisted builds the context of an ``ssl:`` server endpoint with an
ALPN callback that picks from what the listening factory declares through
``IProtocolNegotiationFactory``; with nothing in common it answers with an
empty protocol, which OpenSSL turns into an ``internal_error`` alert, and the
application only learns of it as an ``OpenSSL.SSL.Error`` in
``connectionLost`` that does not say what the client offered.

:func:`choose_protocols_on` replaces that callback on an ``ssl:`` endpoint's
context with :func:`select_protocol`, which picks the same way
but refuses a client with nothing in common with the ``no_application_protocol``
alert RFC 7301 §3.2 asks for, and raises :class:`NoApplicationProtocol`,
which names the offer and reaches ``connectionLost`` as the reason.
:class:`HandshakeFailures` logs every handshake that fails, at most one line
per client address per interval.

The endpoint's TLS options are reached through
:func:`upgradeproxy._twisted.tls_server_options`, the one module that
touches Twisted's private state. The callback relies, as Twisted's own ALPN
callback does, on ``TLSMemoryBIOProtocol`` making itself the app data of its
OpenSSL connection.
"""

from __future__ import annotations

from collections.abc import Sequence

from OpenSSL import SSL
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import (
    IProtocolNegotiationFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._twisted import tls_server_options
from ._lograte import LogWindows
from .address import openssl_reasons

log = Logger()

HTTP_1_1 = b"http/1.1"
H2 = b"h2"

#: What a listening proxy speaks over TLS, in order of preference, with HTTP/2 on.
APPLICATION_PROTOCOLS: tuple[bytes, ...] = (H2, HTTP_1_1)


def application_protocols(http2: bool) -> tuple[bytes, ...]:
    """What to offer TLS clients over ALPN, in order of preference."""
    return APPLICATION_PROTOCOLS if http2 else (HTTP_1_1,)


# A client chooses how much it offers: the log shows a bounded part of it.
_SHOWN_OFFERS = 8
_SHOWN_BYTES = 40


class NoApplicationProtocol(SSL.Error):
    """The client offered over ALPN only application protocols this side does not speak."""

    def __init__(self, offered: Sequence[bytes], spoken: Sequence[bytes]) -> None:
        # Shaped as OpenSSL's errors are, a list of (library, function, reason):
        # Twisted's TLS reads the reason of the last one.
        super().__init__([("SSL routines", "", "no application protocol")])
        #: What the client offered, in its order.
        self.offered = tuple(offered)
        #: What this side speaks, in its order of preference.
        self.spoken = tuple(spoken)


def describe_protocols(protocols: Sequence[bytes]) -> str:
    """ALPN protocol names for a log line, bounded in length whatever a client sent."""
    shown = [p[:_SHOWN_BYTES].decode("ascii", "backslashreplace") for p in protocols]
    more = len(shown) - _SHOWN_OFFERS
    text = ", ".join(shown[:_SHOWN_OFFERS]) or "nothing"
    return f"{text} and {more} more" if more > 0 else text


def select_protocol(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    """The ALPN select callback: the first protocol the factory speaks that the client offered.

    With none in common it raises :class:`NoApplicationProtocol`; pyOpenSSL
    then has OpenSSL send the ``no_application_protocol`` alert, and raises
    the exception again from the handshake.
    """
    tls = connection.get_app_data()
    declared = IProtocolNegotiationFactory(tls.factory.wrappedFactory, None)
    spoken: Sequence[bytes] = declared.acceptableProtocols() if declared is not None else ()
    for protocol in spoken:
        if protocol in offered:
            return protocol
    raise NoApplicationProtocol(offered, spoken)


def choose_protocols_on(endpoint: IStreamServerEndpoint) -> None:
    """Have :func:`select_protocol` answer the ALPN offers of clients of a TLS ``endpoint``.

    Call it before listening: pyOpenSSL refuses to change a context that
    has made a connection. Endpoints other than Twisted's ``ssl:`` one are
    left as they are (the factory's ``IProtocolNegotiationFactory`` still
    gives their clients ``http/1.1``, through Twisted's own callback).
    """
    if not isinstance(endpoint, SSL4ServerEndpoint):
        return
    options = tls_server_options(endpoint)
    if isinstance(options, CertificateOptions):
        # Cached: the context the endpoint's connections are made with.
        options.getContext().set_alpn_select_callback(select_protocol)


def describe_handshake_failure(reason: Failure) -> str | None:
    """Why a client's TLS handshake failed, in words; ``None`` if it was not a TLS failure.

    A client that goes away without a word (a TCP health check, a port
    scan) is no TLS failure.
    """
    failure = reason.value
    if isinstance(failure, NoApplicationProtocol):
        return (
            f"it offered only {describe_protocols(failure.offered)} over ALPN, and this proxy "
            f"speaks {describe_protocols(failure.spoken)} (alert no_application_protocol sent)"
        )
    if not reason.check(SSL.Error):
        return None
    reasons = openssl_reasons(reason)
    said = ", ".join(reasons) or "no reason given"
    if "http request" in reasons:
        return "it sent plain HTTP to a TLS port: it should use https://"
    if "unsupported protocol" in reasons:
        return f"it offered only TLS versions this proxy does not accept ({said})"
    if "wrong version number" in reasons:
        return f"it did not start a TLS handshake ({said})"
    if any(r.startswith(("sslv3 alert", "tlsv1 alert")) for r in reasons):
        return f"the client refused the handshake ({said})"
    return f"TLS failed ({said})"


class HandshakeFailures:
    """Logs failed TLS handshakes from clients, at info level, rate-limited.

    A client address gets at most one line per ``interval`` seconds; the next
    line says how many were not logged. At most ``addresses`` addresses are
    remembered: when that many have had a line within the interval, failures
    from other addresses are only counted, and the next line says how many.
    """

    def __init__(
        self, clock: IReactorTime, *, interval: float = 60.0, addresses: int = 1024
    ) -> None:
        self._clock = clock
        self._windows = LogWindows(interval=interval, addresses=addresses)

    def failed(self, address: str, reason: Failure) -> None:
        """The handshake of a client connection from ``address`` ended with ``reason``."""
        why = describe_handshake_failure(reason)
        if why is None:
            return
        notes = self._windows.note(address, self._clock.seconds())
        if notes is None:
            return
        log.info(
            "TLS handshake with client {client} failed: {why}{notes}",
            client=address,
            why=why,
            notes=notes,
        )
