"""``parse_backend``: backend URLs and endpoint strings, https included, in memory.

TLS against real servers (verification, SNI, failures) is in ``test_tls.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from upgradeproxy import BackendAddress, BadBackend, parse_backend
from upgradeproxy.core.address import describe_tls_failure


def parse(
    text: str, *, tls_ca: str | None = None, tls_verify: bool = True, warn: bool = True
) -> BackendAddress:
    return parse_backend(
        MemoryReactorClock(), text, tls_ca=tls_ca, tls_verify=tls_verify, warn=warn
    )


def first_bytes(address: BackendAddress, reactor: MemoryReactorClock) -> tuple[str, int, bytes]:
    """Connect ``address`` in memory: where it goes, and what it sends first."""
    address.endpoint.connect(Factory.forProtocol(Protocol))
    host, port, factory, _timeout, _bind = reactor.tcpClients[0]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return host, port, transport.value()


@pytest.mark.parametrize(
    ("url", "name", "prefix"),
    [
        ("https://app.example", "app.example:443", b""),
        ("https://app.example/api/", "app.example:443", b"/api"),
        ("https://10.0.0.5:8443/a/b", "10.0.0.5:8443", b"/a/b"),
        ("https://[::1]:8443", "::1:8443", b""),
    ],
)
def test_https_url(url: str, name: str, prefix: bytes) -> None:
    address = parse(url)
    assert (address.tls, address.name, address.prefix) == (True, name, prefix)


def test_http_url_is_not_tls() -> None:
    address = parse("http://127.0.0.1:9000/app")
    assert (address.tls, address.name, address.prefix) == (False, "127.0.0.1:9000", b"/app")
    assert isinstance(address.endpoint, TCP4ClientEndpoint)


def test_endpoint_string_is_not_tls() -> None:
    assert not parse("tcp:host=127.0.0.1:port=9000").tls


@pytest.mark.parametrize("verify", [True, False])
def test_https_backend_speaks_tls_over_tcp_to_its_host(verify: bool) -> None:
    reactor = MemoryReactorClock()
    address = parse_backend(reactor, "https://127.0.0.1:8443", tls_verify=verify, warn=False)
    host, port, sent = first_bytes(address, reactor)
    assert (host, port) == ("127.0.0.1", 8443)
    assert sent[:1] == b"\x16", "no TLS handshake record"


def test_http_backend_sends_nothing_on_connecting() -> None:
    reactor = MemoryReactorClock()
    assert first_bytes(parse_backend(reactor, "http://127.0.0.1:9000"), reactor)[2] == b""


# -- the CA bundle -----------------------------------------------------------------------


def test_ca_bundle_with_several_certificates_is_read(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(trustme.CA().cert_pem.bytes() + trustme.CA().cert_pem.bytes())
    assert parse("https://app.example", tls_ca=str(bundle)).tls


def test_ca_bundle_that_cannot_be_read(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(BadBackend) as info:
        parse("https://app.example", tls_ca=str(missing))
    message = str(info.value)
    assert f"cannot read the CA bundle {missing} for backend 'https://app.example'" in message
    assert "No such file or directory" in message and "readable PEM file" in message


@pytest.mark.parametrize(
    "content", [b"", b"not a certificate\n", trustme.CA().private_key_pem.bytes()]
)
def test_ca_bundle_without_a_certificate(tmp_path: Path, content: bytes) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(content)
    with pytest.raises(BadBackend) as info:
        parse("https://app.example", tls_ca=str(bundle))
    assert f"the CA bundle {bundle} for backend 'https://app.example' holds no readable" in str(
        info.value
    )
    assert "-----BEGIN CERTIFICATE-----" in str(info.value)


@pytest.mark.parametrize("text", ["http://127.0.0.1:9000", "unix:path=/run/app.sock"])
def test_ca_bundle_for_a_backend_without_tls_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(BadBackend) as info:
        parse(text, tls_ca=str(tmp_path / "ca.pem"))
    assert "does not use TLS" in str(info.value) and "https://" in str(info.value)


def test_ca_bundle_with_verification_off_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadBackend) as info:
        parse("https://app.example", tls_ca=str(tmp_path / "ca.pem"), tls_verify=False)
    assert "verification is off: drop one of the two" in str(info.value)


# -- verification off -------------------------------------------------------------------------


def test_verification_off_is_a_warning_at_parse_time() -> None:
    with capturedLogs() as events:
        assert parse("https://app.example:8443", tls_verify=False).tls
    assert [(e["log_level"], formatEvent(e)) for e in events] == [
        (
            LogLevel.warn,
            "certificate verification is OFF for backend https://app.example:8443: anyone on "
            "the path can read and change its traffic",
        )
    ]


@pytest.mark.parametrize(
    ("text", "warn"), [("https://app.example", False), ("http://127.0.0.1:9000", True)]
)
def test_no_warning_when_not_asked_for_or_without_tls(text: str, warn: bool) -> None:
    with capturedLogs() as events:
        parse(text, tls_verify=False, warn=warn)
    assert events == []


# -- wrong values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "no backend given"),
        ("ftp://app.example", "must start with http:// or https://"),
        ("https://user:pw@app.example", "carries credentials"),
        ("https://app.example:99999", "has an invalid port"),
        ("http://app.example:0", "has an invalid port"),
        ("https:///app", "has no host"),
        ("https://[::1/", "has an invalid host"),
        ("http://app.example/?a=b", "may not carry a query or fragment"),
        ("https://app.example/#top", "may not carry a query or fragment"),
        ("https://a..example", "has a host name that TLS cannot use"),
        ("nonsense:x", "cannot use backend"),
    ],
)
def test_bad_backend_says_what_to_write(text: str, words: str) -> None:
    with pytest.raises(BadBackend) as info:
        parse(text)
    assert words in str(info.value)
    assert "write --backend as http://HOST:PORT[/PATH] or https://HOST[:PORT][/PATH]" in str(
        info.value
    )


# -- naming TLS failures ------------------------------------------------------------------------


@pytest.mark.parametrize("error", [ConnectionDone(), ConnectionRefusedError(), ValueError("x")])
def test_other_failures_are_not_tls_failures(error: Exception) -> None:
    assert describe_tls_failure(Failure(error)) is None
