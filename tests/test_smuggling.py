"""Hostile requests in memory: request smuggling, desync and header injection.

Every case states three things and checks them exactly:

* what the client gets: the status, a body that names the problem, and
  nothing after that one response;
* whether the client connection is closed (after any error it must be:
  the proxy cannot know where the next request would start);
* what the backend received, compared byte for byte: nothing, one clean
  request, or a request head whose body was cut off by closing the
  connection (a backend can never read that as a complete request).

The proxy forwards a request head as soon as it is valid and streams the
body after it, so an error found in the body comes after the head has gone
out: the backend connection is then closed without the rest of the body
(no last chunk), which no backend can mistake for a complete request.
"""

from __future__ import annotations

import re

import pytest
from http1_helpers import no_hang
from support import MountedProxy

from upgradeproxy.testing import ProxyHarness

# What the proxy appends to every request from 192.0.2.7 with ``Host: a``.
FORWARDING = (
    b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
    b"X-Forwarded-Host: a\r\nVia: 1.1 upgradeproxy\r\n\r\n"
)
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
FOO_SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n"
FOO_UPGRADE = b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n"
FOO_UPGRADE_FORWARDED = (
    b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo\r\n" + FORWARDING
)
GET_PAGE = b"GET /page HTTP/1.1\r\nHost: a\r\n\r\n"
GET_PAGE_FORWARDED = b"GET /page HTTP/1.1\r\nHost: a\r\n" + FORWARDING


def split_response(data: bytes) -> tuple[int, bytes, bytes, bytes]:
    """One Content-Length response off the front of ``data``: status, head, body, rest."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data!r}"
    assert head.startswith(b"HTTP/1.1 "), data
    status = int(head.split(b" ", 2)[1])
    lengths = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    ]
    assert len(lengths) == 1, head
    length = int(lengths[0])
    assert len(rest) >= length, f"response body cut short: {data!r}"
    return status, head, rest[:length], rest[length:]


def only_error(data: bytes) -> tuple[int, str]:
    """``data`` is exactly one error response that closes: its status and body text."""
    status, head, body, rest = split_response(data)
    assert rest == b"", f"bytes after the error response: {rest!r}"
    assert b"\r\nConnection: close" in head, head
    return status, body.decode("utf-8")


def assert_refused(h: ProxyHarness, status: int, words: str) -> None:
    got, text = only_error(h.client_received)
    assert got == status, h.client_received
    assert words in text, text
    assert h.client_closed


# -- refused at the head: no backend is ever contacted --------------------------------


HEAD_REJECTIONS = [
    # CL.TE and TE.CL: both framings at once, in either order, smuggled request behind.
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nX" + SMUGGLED,
        400,
        "both Content-Length and Transfer-Encoding",
        id="CL.TE",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        b"5c\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
        400,
        "both Content-Length and Transfer-Encoding",
        id="TE.CL",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: xchunked\r\n\r\n",
        400,
        "both Content-Length and Transfer-Encoding",
        id="CL.TE-with-unknown-coding",
    ),
    # TE.TE: a Transfer-Encoding one parser might take for chunked and another not.
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n" + SMUGGLED,
        400,
        "final transfer coding of the request is not chunked",
        id="TE-xchunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        400,
        "final transfer coding of the request is not chunked",
        id="TE-chunked-identity",
    ),
    pytest.param(
        b'POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "chunked"\r\n\r\n',
        400,
        "final transfer coding of the request is not chunked",
        id="TE-quoted-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
        400,
        "final transfer coding of the request is not chunked",
        id="TE-repeated-last-not-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        400,
        "chunked applied more than once",
        id="TE-repeated-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        400,
        "chunked applied more than once",
        id="TE-chunked-twice-in-one-line",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        501,
        "transfer codings other than a single chunked are not supported",
        id="TE-repeated-identity-then-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        501,
        "transfer codings other than a single chunked are not supported",
        id="TE-gzip-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        400,
        "whitespace between a header name and its colon",
        id="TE-space-before-colon",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding\t: chunked\r\n\r\n",
        400,
        "whitespace between a header name and its colon",
        id="TE-tab-before-colon",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\n\r\n",
        400,
        "obs-fold",
        id="TE-leading-space",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\tidentity\r\n\r\n",
        400,
        "obs-fold",
        id="TE-obs-fold",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n",
        400,
        "control character",
        id="TE-vertical-tab",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\x00\r\n\r\n",
        400,
        "control character",
        id="TE-trailing-NUL",
    ),
    pytest.param(
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "Transfer-Encoding in an HTTP/1.0 request",
        id="TE-in-HTTP/1.0",
    ),
    # Content-Length that two parsers could read differently.
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
        "more than one Content-Length",
        id="CL-duplicate-same",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
        400,
        "more than one Content-Length",
        id="CL-duplicate-different",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
        400,
        "Content-Length is not a decimal number",
        id="CL-list",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
        400,
        "Content-Length is not a decimal number",
        id="CL-plus-sign",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nhello",
        400,
        "Content-Length is not a decimal number",
        id="CL-negative",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello",
        400,
        "Content-Length is not a decimal number",
        id="CL-hex",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\nhello",
        400,
        "Content-Length is not a decimal number",
        id="CL-inner-space",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\nhello",
        400,
        "Content-Length is not a decimal number",
        id="CL-empty",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\nhello",
        400,
        "Content-Length is not a decimal number",
        id="CL-20-digits",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello",
        400,
        "whitespace between a header name and its colon",
        id="CL-space-before-colon",
    ),
    # obs-fold anywhere.
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n two\r\n\r\n",
        400,
        "obs-fold",
        id="obs-fold-space",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n\ttwo\r\n\r\n",
        400,
        "obs-fold",
        id="obs-fold-tab",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
        400,
        "obs-fold",
        id="obs-fold-first-field",
    ),
    # Line endings other than CRLF.
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", 400, "bare CR or LF", id="bare-LF-everywhere"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n", 400, "bare CR or LF", id="bare-LF-in-field"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\rTransfer-Encoding: chunked\r\n\r\n",
        400,
        "bare CR or LF",
        id="bare-CR-in-field",
    ),
    pytest.param(
        b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400, "bare CR or LF", id="bare-CR-after-request-line"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400, "bare CR or LF", id="bare-LF-ending-the-head"
    ),
    # NUL and other control bytes in names, values and the request line.
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A\x00B: 1\r\n\r\n",
        400,
        "control character",
        id="NUL-in-name",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        400,
        "control character",
        id="NUL-in-value",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
        400,
        "control character",
        id="DEL-in-value",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x1bb\r\n\r\n",
        400,
        "control character",
        id="ESC-in-value",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\x00.evil\r\n\r\n",
        400,
        "control character",
        id="NUL-in-host",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX(y): 1\r\n\r\n",
        400,
        "malformed header field",
        id="separator-in-name",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\n: no-name\r\n\r\n",
        400,
        "malformed header field",
        id="empty-name",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nno-colon\r\n\r\n",
        400,
        "header line without a colon",
        id="no-colon",
    ),
    pytest.param(
        b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "malformed request line",
        id="NUL-in-target",
    ),
    pytest.param(
        b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "malformed request line",
        id="DEL-in-target",
    ),
    pytest.param(
        b"GET /a\x80b HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "malformed request line",
        id="obs-text-in-target",
    ),
    pytest.param(
        b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed request line", id="space-in-target"
    ),
    pytest.param(
        b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed request line", id="tab-in-target"
    ),
    pytest.param(
        b"G\x00T / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed request line", id="NUL-in-method"
    ),
    pytest.param(
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed request line", id="double-space"
    ),
    pytest.param(
        b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400, "malformed request line", id="trailing-space"
    ),
    pytest.param(
        b"\x00GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed request line", id="leading-NUL"
    ),
    # Host: none, or two (RFC 9112 §3.2).
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, "without a Host", id="no-host"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: evil\r\n\r\n",
        400,
        "more than one Host",
        id="two-hosts",
    ),
    # Size limits on the head.
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 33_000 + b"\r\n\r\n",
        431,
        "request head larger than 32768 bytes",
        id="oversized-field",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 6000 + b"\r\n",
        431,
        "request head larger than 32768 bytes",
        id="too-many-fields",
    ),
    pytest.param(b"\r\n" * 20_000, 431, "request head larger than", id="endless-empty-lines"),
]
# Trickling the empty lines one byte at a time has a test of its own, with a time limit.
TRICKLED = [p for p in HEAD_REJECTIONS if p.id != "endless-empty-lines"]


@pytest.mark.parametrize(("request_bytes", "status", "words"), HEAD_REJECTIONS)
def test_a_hostile_head_is_refused_before_any_backend_is_contacted(
    request_bytes: bytes, status: int, words: str
) -> None:
    h = ProxyHarness()
    h.client_sends(request_bytes)
    assert_refused(h, status, words)
    assert h.endpoint.connections == [], "the backend must never be contacted"
    assert h.factory.proxy.connections == set()
    assert h.clock.getDelayedCalls() == []


@pytest.mark.parametrize(("request_bytes", "status", "words"), TRICKLED)
def test_a_hostile_head_gets_the_same_answer_when_it_trickles_in_byte_by_byte(
    request_bytes: bytes, status: int, words: str
) -> None:
    h = ProxyHarness()
    for i in range(len(request_bytes)):
        if h.client_closed:
            break
        h.client_sends(request_bytes[i : i + 1])
    assert_refused(h, status, words)
    assert h.endpoint.connections == []


# -- refused in the body: the head went out, the body is cut off ---------------------


CHUNKED_POST = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED_POST_FORWARDED = (
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n" + FORWARDING
)

BODY_REJECTIONS = [
    pytest.param(
        b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n",
        "chunk-size line longer than 4096 bytes",
        id="oversized-chunk-size-line",
    ),
    pytest.param(
        b"0" * 5000, "chunk-size line longer than 4096 bytes", id="endless-chunk-size-digits"
    ),
    pytest.param(
        b"00000000000000005\r\nhello\r\n0\r\n\r\n",
        "malformed chunk-size line",
        id="17-hex-digits-leading-zeros",
    ),
    pytest.param(
        b"10000000000000000\r\nhello\r\n0\r\n\r\n",
        "malformed chunk-size line",
        id="17-hex-digits-2**64",
    ),
    pytest.param(
        b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        "malformed chunk-size line",
        id="21-hex-digits",
    ),
    pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line", id="negative-size"),
    pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line", id="0x-prefix"),
    pytest.param(b"+5\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line", id="plus-sign"),
    pytest.param(b"5 \r\nhello\r\n0\r\n\r\n", "malformed chunk-size line", id="space-after-size"),
    pytest.param(b" 5\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line", id="space-before-size"),
    pytest.param(b"\r\nhello\r\n0\r\n\r\n", "malformed chunk-size line", id="empty-size"),
    pytest.param(b"5\nhello\r\n0\r\n\r\n", "bare LF in chunk-size line", id="bare-LF-after-size"),
    pytest.param(
        b"5\r\nhelloXX\r\n0\r\n\r\n", "chunk data not followed by CRLF", id="chunk-longer-than-size"
    ),
    pytest.param(
        b"5\r\nhello\n0\r\n\r\n", "chunk data not followed by CRLF", id="bare-LF-after-data"
    ),
    pytest.param(b"0\r\nX: a\x00b\r\n\r\n", "malformed trailer field", id="NUL-in-trailer"),
    pytest.param(
        b"0\r\nX : 1\r\n\r\n", "malformed trailer field", id="space-before-colon-in-trailer"
    ),
    pytest.param(
        b"0\r\n" + (b"X: " + b"a" * 4000 + b"\r\n") * 5 + b"\r\n",
        "trailer section too large",
        id="oversized-trailers",
    ),
]


@pytest.mark.parametrize(("body", "words"), BODY_REJECTIONS)
def test_a_malformed_chunked_body_gets_400_and_the_backend_never_gets_a_complete_request(
    body: bytes, words: str
) -> None:
    h = ProxyHarness()
    h.client_sends(CHUNKED_POST + body + SMUGGLED)
    assert_refused(h, 400, f"malformed request body: {words}")
    assert len(h.endpoint.connections) == 1
    # The head went out before the body was read; the body never did.
    assert h.backend.received == CHUNKED_POST_FORWARDED
    assert h.backend.closed
    assert h.factory.proxy.connections == set()
    assert h.clock.getDelayedCalls() == []


def test_a_trailer_section_is_limited_even_when_it_trickles_in() -> None:
    h = ProxyHarness()
    h.client_sends(CHUNKED_POST + b"0\r\n")
    for _ in range(2000):
        if h.client_closed:
            break
        h.client_sends(b"X-Trailer: 0123456789\r\n")
    assert_refused(h, 400, "trailer section too large")
    assert h.backend.received == CHUNKED_POST_FORWARDED
    assert h.backend.closed


def test_chunk_data_already_forwarded_stays_framed_and_the_body_is_cut_off() -> None:
    h = ProxyHarness()
    h.client_sends(CHUNKED_POST + b"3\r\nabc\r\n")
    h.client_sends(b"5\r\nhelloXX\r\n0\r\n\r\n" + SMUGGLED)
    assert_refused(h, 400, "chunk data not followed by CRLF")
    assert h.backend.received == CHUNKED_POST_FORWARDED + b"3\r\nabc\r\n"
    assert h.backend.closed


# -- legal but unusual: accepted, and the backend gets one clean request --------------


LEGAL = [
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        + FORWARDING
        + b"5\r\nhello\r\n0\r\n\r\n",
        id="TE-tab-after-colon-is-OWS",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:chunked \t\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        + FORWARDING
        + b"5\r\nhello\r\n0\r\n\r\n",
        id="TE-no-space-and-trailing-OWS",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ChUnKeD\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        + FORWARDING
        + b"5\r\nhello\r\n0\r\n\r\n",
        id="TE-coding-names-are-case-insensitive",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        b"0000000000000005;name=value\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        + FORWARDING
        + b"5\r\nhello\r\n0\r\n\r\n",
        id="16-hex-digits-extension-and-trailer-dropped",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\t005 \r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 005\r\n" + FORWARDING + b"hello",
        id="CL-OWS-and-leading-zeros",
    ),
    pytest.param(
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n" + FORWARDING,
        id="empty-lines-before-the-request-line",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9 \x80\xff\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9 \x80\xff\r\n" + FORWARDING,
        id="obs-text-in-a-value-passes-unchanged",
    ),
]


@pytest.mark.parametrize(("request_bytes", "forwarded"), LEGAL)
def test_legal_variants_reach_the_backend_as_one_clean_request(
    request_bytes: bytes, forwarded: bytes
) -> None:
    h = ProxyHarness()
    h.client_sends(request_bytes)
    assert h.client_received == b""
    assert h.backend.received == forwarded
    h.backend.send(OK)
    status, _, body, rest = split_response(h.client_received)
    assert (status, body, rest) == (200, b"ok", b"")
    assert not h.client_closed


# -- requests pipelined behind an upgrade that the backend declines ------------------


def test_a_request_behind_a_declined_upgrade_waits_and_goes_alone_after_the_response() -> None:
    h = ProxyHarness(validators=[])
    h.client_sends(FOO_UPGRADE + GET_PAGE)
    backend = h.backend
    assert backend.received == FOO_UPGRADE_FORWARDED, "nothing may be glued to the upgrade"
    backend.send(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope")
    status, _, body, rest = split_response(h.client_received)
    assert (status, body, rest) == (426, b"nope", b"")
    assert backend.received == FOO_UPGRADE_FORWARDED + GET_PAGE_FORWARDED
    assert len(h.endpoint.connections) == 1
    backend.send(OK)
    assert h.client_received.endswith(b"\r\n\r\nok")
    assert not h.client_closed


def test_a_request_trickling_in_behind_a_declined_upgrade_is_forwarded_once_whole() -> None:
    h = ProxyHarness(validators=[])
    h.client_sends(FOO_UPGRADE + GET_PAGE[:7])
    h.client_sends(GET_PAGE[7:20])
    backend = h.backend
    assert backend.received == FOO_UPGRADE_FORWARDED
    backend.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    h.client_sends(GET_PAGE[20:])
    assert backend.received == FOO_UPGRADE_FORWARDED, "not before the first response is complete"
    backend.send(b"abc")
    assert backend.received == FOO_UPGRADE_FORWARDED + GET_PAGE_FORWARDED


def test_a_request_behind_an_upgrade_declined_with_close_goes_to_a_new_connection() -> None:
    h = ProxyHarness(validators=[])
    h.client_sends(FOO_UPGRADE + GET_PAGE)
    first = h.backend
    first.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")
    assert first.closed
    assert first.received == FOO_UPGRADE_FORWARDED
    assert len(h.endpoint.connections) == 2
    assert h.backend.received == GET_PAGE_FORWARDED
    h.backend.send(OK)
    assert h.client_received.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize(
    ("frames", "status", "words"),
    [
        # Not a line yet: it waits for the end of a head, then times out.
        (b"\x81\x85\x00\x00\x00\x00hello", 408, "did not arrive within 60 seconds"),
        (b"\x81\x85\x00\x00\x00\x00hello\r\n\r\n", 400, "malformed request line"),
        (b"\x81\x05hel\nlo", 400, "bare CR or LF"),
    ],
    ids=["no-line-end", "looks-like-a-head", "bare-LF"],
)
def test_tunnel_bytes_behind_a_declined_upgrade_are_parsed_as_http_and_refused(
    frames: bytes, status: int, words: str
) -> None:
    # A client that sends its first frames optimistically, and a backend that
    # says no: those bytes are not HTTP, so they get an error and reach nobody.
    h = ProxyHarness(validators=[])
    h.client_sends(FOO_UPGRADE + frames)
    h.backend.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    h.clock.advance(60)
    first, _, _, rest = split_response(h.client_received)
    assert first == 404
    got, text = only_error(rest)
    assert (got, words in text) == (status, True), text
    assert h.client_closed
    assert h.backend.received == FOO_UPGRADE_FORWARDED


def test_a_request_smuggled_behind_a_declined_upgrade_is_checked_like_any_other() -> None:
    # "WebSocket smuggling": the backend declines, the client carries on as
    # if the tunnel were open. The next bytes are an HTTP request and get
    # all of the proxy's rules; this one is CL.TE, so it is refused.
    h = ProxyHarness(validators=[])
    h.client_sends(
        FOO_UPGRADE
        + b"POST /internal HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    h.backend.send(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    status, _, _, rest = split_response(h.client_received)
    assert status == 426
    assert only_error(rest)[0] == 400
    assert h.backend.received == FOO_UPGRADE_FORWARDED


def test_a_request_smuggled_behind_a_refused_101_never_reaches_the_backend() -> None:
    h = ProxyHarness()  # strict rfc9110: the 101 below lacks Connection: upgrade
    h.client_sends(FOO_UPGRADE + SMUGGLED)
    h.backend.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\n\r\n")
    assert_refused(h, 502, "Connection: upgrade")
    assert h.backend.received == FOO_UPGRADE_FORWARDED
    assert h.backend.closed


def test_after_an_accepted_switch_the_bytes_behind_are_tunnelled_not_parsed() -> None:
    h = ProxyHarness(validators=[])
    h.client_sends(FOO_UPGRADE + SMUGGLED)
    h.backend.send(FOO_SWITCH)
    # Now it is the backend's protocol: the bytes go through unchanged,
    # without forwarding fields (the proxy did not read them as a request).
    assert h.backend.received == FOO_UPGRADE_FORWARDED + SMUGGLED


# -- a request pipelined after a body of the wrong length ----------------------------


def test_bytes_beyond_content_length_are_the_next_request_and_get_400() -> None:
    h = ProxyHarness()
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello world" + GET_PAGE)
    forwarded = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n" + FORWARDING + b"hello"
    assert h.backend.received == forwarded
    h.backend.send(OK)
    status, _, body, rest = split_response(h.client_received)
    assert (status, body) == (200, b"ok")
    assert only_error(rest) == (400, "malformed request line\n")
    assert h.client_closed
    assert h.backend.received == forwarded, "the pipelined request must not be forwarded"


def test_a_content_length_that_swallows_the_next_request_sends_it_as_body_only() -> None:
    h = ProxyHarness()
    body = b"hello" + GET_PAGE[:10]
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 15\r\n\r\nhello" + GET_PAGE)
    forwarded = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 15\r\n" + FORWARDING + body
    assert h.backend.received == forwarded
    h.backend.send(OK)
    status, _, _, rest = split_response(h.client_received)
    assert status == 200
    assert only_error(rest)[0] == 400  # what is left of the GET is no request line
    assert h.backend.received == forwarded


def test_a_chunk_shorter_than_its_size_line_gets_400_and_the_next_request_reaches_nobody() -> None:
    h = ProxyHarness()
    h.client_sends(CHUNKED_POST + b"3\r\nhello\r\n0\r\n\r\n" + GET_PAGE)
    assert_refused(h, 400, "chunk data not followed by CRLF")
    assert h.backend.received == CHUNKED_POST_FORWARDED
    assert h.backend.closed
    assert len(h.endpoint.connections) == 1


def test_a_chunk_longer_than_its_data_swallows_the_next_request_as_chunk_data() -> None:
    h = ProxyHarness()
    # Size 0x40 takes "hello\r\n0\r\n\r\n" and the start of the GET as data;
    # what follows is then no chunk-size line.
    h.client_sends(CHUNKED_POST + b"40\r\nhello\r\n0\r\n\r\n")
    h.client_sends(GET_PAGE + b"GET /more HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_refused(h, 400, "malformed request body")
    received = h.backend.received
    assert received.startswith(CHUNKED_POST_FORWARDED)
    assert not received.endswith(b"0\r\n\r\n"), "the body must not look complete"
    assert received.count(b"GET /page") <= 1
    assert h.backend.closed


# -- Host: the backend must see one, and the right one ---------------------------------


def test_an_http10_request_without_host_reaches_the_backend_with_an_empty_host() -> None:
    # The backend always gets HTTP/1.1, which MUST carry Host (RFC 9112 §3.2);
    # without one, strict servers (Go's net/http, h11) answer 400. When the
    # target has no authority, the field is sent empty.
    h = ProxyHarness()
    h.client_sends(b"GET /old HTTP/1.0\r\n\r\n")
    assert h.backend.received == (
        b"GET /old HTTP/1.1\r\nHost: \r\n"
        b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nVia: 1.1 upgradeproxy\r\n\r\n"
    )


def test_an_absolute_form_target_replaces_the_host_header() -> None:
    # RFC 9112 §3.2.2: a proxy MUST ignore the received Host of an
    # absolute-form request and generate it from the target; otherwise the
    # proxy and the backend disagree on which host was asked for.
    h = ProxyHarness()
    h.client_sends(b"GET http://b.example:8080/x?q HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.backend.received == (
        b"GET /x?q HTTP/1.1\r\nHost: b.example:8080\r\n"
        b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: b.example:8080\r\nVia: 1.1 upgradeproxy\r\n\r\n"
    )


def test_userinfo_in_an_absolute_form_target_is_refused() -> None:
    # RFC 9110 §4.2.4: a recipient SHOULD treat userinfo in an http(s) URI as
    # an error. Taken as the Host, "user:pw@b.example" would hand the backend
    # credentials and an authority that parsers read differently.
    h = ProxyHarness()
    h.client_sends(b"GET http://user:pw@b.example/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_refused(h, 400, "userinfo")
    assert h.endpoint.connections == []


# -- what the proxy says about itself ----------------------------------------------------


def test_the_proxy_adds_no_server_header_to_its_own_responses() -> None:
    refused = ProxyHarness()
    refused.client_sends(b"GET / HTTP/1.1\r\n\r\n")
    unreachable = ProxyHarness()
    unreachable.endpoint.refuse = True
    unreachable.client_sends(GET_PAGE)
    for h in (refused, unreachable):
        _, head, _, _ = split_response(h.client_received)
        assert b"\r\nserver:" not in head.lower(), head


def test_the_backends_server_header_passes_through_unchanged_and_none_is_added() -> None:
    h = ProxyHarness(validators=[])
    h.client_sends(GET_PAGE)
    h.backend.send(b"HTTP/1.1 200 OK\r\nServer: app/1.2\r\nContent-Length: 2\r\n\r\nok")
    h.client_sends(GET_PAGE)
    h.backend.send(OK)
    h.client_sends(FOO_UPGRADE)
    h.backend.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n"
        b"Server: app/1.2\r\n\r\n"
    )
    heads = re.findall(rb"HTTP/1\.1 \d{3} .*?\r\n\r\n", h.client_received, re.S)
    assert len(heads) == 3
    servers = [
        [line for line in head.split(b"\r\n") if line.lower().startswith(b"server:")]
        for head in heads
    ]
    assert servers == [[b"Server: app/1.2"], [], [b"Server: app/1.2"]]
    assert b"upgradeproxy/" not in h.client_received, "no version banner anywhere"


def test_a_mounted_proxy_resource_adds_no_server_banner_to_its_own_errors() -> None:
    # twisted.web puts "Server: TwistedWeb/<version>" on every response;
    # ProxyResource removes it from relayed responses, and must from its own.
    m = MountedProxy()
    m.endpoint.refuse = True
    m.send(b"GET /app/x HTTP/1.1\r\nHost: a\r\n\r\n")
    (head,) = m.heads()
    assert head.startswith(b"HTTP/1.1 502 ")
    assert b"\r\nserver:" not in head.lower(), head


def test_a_mounted_proxy_resource_relays_no_content_type_the_backend_did_not_send() -> None:
    # A response without Content-Type is for the client to sniff (or not);
    # twisted.web's default "text/html" would turn it into HTML.
    m = MountedProxy()
    m.send(b"GET /app/x HTTP/1.1\r\nHost: a\r\n\r\n")
    m.endpoint.connections[-1].send(
        b"HTTP/1.1 200 OK\r\nServer: app/1.2\r\nContent-Length: 2\r\n\r\nok"
    )
    (head,) = m.heads()
    assert head.startswith(b"HTTP/1.1 200 ")
    lines = [line.lower() for line in head.split(b"\r\n")]
    assert [line for line in lines if line.startswith(b"server:")] == [b"server: app/1.2"]
    assert not any(line.startswith(b"content-type:") for line in lines), head


def test_an_h2c_upgrade_is_never_forwarded_and_a_101_to_h2c_is_refused() -> None:
    h = ProxyHarness(validators=[])
    h.client_sends(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n" + SMUGGLED
    )
    assert h.backend.received == b"GET / HTTP/1.1\r\nHost: a\r\n" + FORWARDING
    h.backend.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
    )
    assert_refused(h, 502, "did not ask to upgrade")
    assert h.backend.received == b"GET / HTTP/1.1\r\nHost: a\r\n" + FORWARDING


# -- the backend side: a response that could desynchronise the pool -----------------


def test_bytes_after_a_complete_response_keep_the_backend_connection_out_of_the_pool() -> None:
    h = ProxyHarness()
    h.client_sends(GET_PAGE)
    first = h.backend
    first.send(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nspoof!")
    assert first.closed, "a backend that says more than asked may not be reused"
    assert h.factory.proxy.pool.idle_count == 0
    status, _, body, rest = split_response(h.client_received)
    assert (status, body, rest) == (200, b"ok", b"")
    h.client_sends(GET_PAGE)
    assert len(h.endpoint.connections) == 2
    h.backend.send(OK)
    assert b"spoof" not in h.client_received


def test_bytes_on_an_idle_pooled_connection_close_it() -> None:
    h = ProxyHarness()
    h.client_sends(GET_PAGE)
    first = h.backend
    first.send(OK)
    assert h.factory.proxy.pool.idle_count == 1
    first.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nspoof!")
    assert first.closed
    assert h.factory.proxy.pool.idle_count == 0
    assert h.clock.getDelayedCalls() != [] and len(h.clock.getDelayedCalls()) == 1  # head timer
    h.client_sends(GET_PAGE)
    assert len(h.endpoint.connections) == 2


@pytest.mark.parametrize(
    ("response", "words"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
            "both Content-Length and Transfer-Encoding",
            id="CL+TE",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            "more than one Content-Length",
            id="two-CL",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok", "obs-fold", id="fold"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX: a\rContent-Length: 2\r\n\r\nok", "bare CR or LF", id="bare-CR"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok", "not a decimal number", id="CL-neg"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a\x00b\r\nContent-Length: 2\r\n\r\nok",
            "control character",
            id="NUL",
        ),
    ],
)
def test_a_malformed_response_gets_502_and_the_backend_connection_is_dropped(
    response: bytes, words: str
) -> None:
    h = ProxyHarness()
    h.client_sends(GET_PAGE)
    h.backend.send(response)
    assert_refused(h, 502, words)
    assert h.backend.closed
    assert h.factory.proxy.pool.idle_count == 0
    assert h.clock.getDelayedCalls() == []


def test_empty_lines_trickled_before_a_request_cost_linear_time() -> None:
    # RFC 9112 §2.2 lets a server skip empty lines before a request line. A
    # client sending them one byte per read must not cost time quadratic in
    # their number: 32 KiB of CRLF one byte at a time is refused at once.
    h = ProxyHarness()
    data = b"\r\n" * 16_400
    with no_hang(3.0):
        for i in range(len(data)):
            if h.client_closed:
                break
            h.client_sends(data[i : i + 1])
    assert_refused(h, 431, "request head larger than 32768 bytes")
