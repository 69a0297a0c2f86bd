"""Request and response heads, header fields, and connection semantics.

Each table cites the part of RFC 9112 (HTTP/1.1) or RFC 9110 (HTTP
Semantics) it checks. Every rejection asserts the status a server would
answer with and that the reason names the rule that was broken.
"""

from __future__ import annotations

import time

import pytest
from http1_helpers import head, rejects, request, splits

from upgradeproxy.http1 import (
    HOP_BY_HOP,
    Headers,
    ProtocolError,
    RequestHead,
    ResponseHead,
    is_upgrade_request,
    offered_protocols,
    parse_request_head,
    parse_response_head,
    request_keeps_alive,
    response_keeps_alive,
)

GET = head(b"GET /index.html?q=1 HTTP/1.1", b"Host: example.com", b"Accept: */*")


def response(*lines: bytes) -> ResponseHead:
    raw = head(*lines)
    parsed = parse_response_head(raw)
    assert parsed is not None
    assert parsed[1] == len(raw)
    return parsed[0]


# --- Request heads: what is accepted (RFC 9112 §2-§5) -------------------------


def test_simple_get():
    parsed = parse_request_head(GET)
    assert parsed == (
        RequestHead(
            b"GET",
            b"/index.html?q=1",
            (1, 1),
            Headers(((b"Host", b"example.com"), (b"Accept", b"*/*"))),
        ),
        len(GET),
    )


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(b"hello", id="body"),
        pytest.param(head(b"GET /next HTTP/1.1", b"Host: a"), id="pipelined-request"),
        pytest.param(b"\x81\x85\x00\r\n\r\nbinary", id="switched-protocol-bytes"),
        pytest.param(b"\r\n", id="a-stray-crlf"),
        pytest.param(b"x", id="one-byte"),
        pytest.param(b"\n\r\x00 body bytes are not head bytes\n", id="bare-lf-and-cr-after"),
    ],
)
def test_end_is_the_first_byte_after_the_empty_line(after):
    # RFC 9112 §2.1: the head ends at the empty line; what follows belongs to
    # the body, the next request, or the protocol switched to.
    buf = GET + after
    parsed = parse_request_head(buf)
    assert parsed is not None
    assert parsed[1] == len(GET)
    assert buf[parsed[1] :] == after


def test_pipelined_requests_parse_one_after_the_other_from_start():
    second = head(b"POST /two HTTP/1.1", b"Host: b")
    buf = bytearray(GET + second + b"rest")
    first, end = parse_request_head(buf)
    assert first.target == b"/index.html?q=1"
    parsed = parse_request_head(buf, end)
    assert parsed is not None
    assert parsed[0].method == b"POST"
    assert parsed[0].headers.fields == ((b"Host", b"b"),)
    assert parsed[1] == len(GET) + len(second)


VALID_REQUESTS = [
    pytest.param(GET, id="get"),
    pytest.param(head(b"GET / HTTP/1.0"), id="http-1.0-no-fields"),
    pytest.param(
        head(b"POST /upload HTTP/1.1", b"Host: a", b"Content-Length: 3", b"X-Empty:"),
        id="post",
    ),
    pytest.param(
        head(b"GET /chat HTTP/1.1", b"Host: a", b"Connection: Upgrade", b"Upgrade: websocket"),
        id="upgrade",
    ),
]


@pytest.mark.parametrize("raw", VALID_REQUESTS)
def test_every_proper_prefix_of_a_request_head_is_incomplete(raw):
    # A parser must wait for the empty line (RFC 9112 §2.1) and must not
    # mistake any prefix for a complete or a broken head.
    for prefix, _ in splits(raw[:-1]):
        assert parse_request_head(prefix) is None, prefix
    assert parse_request_head(raw)[1] == len(raw)


@pytest.mark.parametrize(
    "leading",
    [b"\r\n", b"\r\n\r\n", b"\r\n" * 5],
    ids=["one", "two", "five"],
)
def test_empty_lines_before_the_request_line_are_skipped(leading):
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line (CRLF)
    # received prior to the request-line.
    buf = leading + GET + b"tail"
    head_, end = parse_request_head(buf)
    assert head_ == parse_request_head(GET)[0]
    assert end == len(leading) + len(GET)


@pytest.mark.parametrize("buf", [b"", b"\r", b"\r\n", b"\r\n\r", b"\r\n\r\n", b"\r\nGE"])
def test_empty_lines_and_a_partial_request_line_are_incomplete(buf):
    assert parse_request_head(buf) is None


def test_field_order_repeats_and_spelling_are_preserved():
    # RFC 9110 §5.3: the order of field lines with the same name is
    # significant; §5.1: names are case-insensitive, so keep them as sent.
    parsed = request(
        b"GET / HTTP/1.1",
        b"X-B: 1",
        b"HOST: a",
        b"x-b: 2",
        b"Set-Cookie: a=1",
        b"X-b: 3",
        b"set-cookie: b=2",
    )
    assert parsed.headers.fields == (
        (b"X-B", b"1"),
        (b"HOST", b"a"),
        (b"x-b", b"2"),
        (b"Set-Cookie", b"a=1"),
        (b"X-b", b"3"),
        (b"set-cookie", b"b=2"),
    )
    assert parsed.headers.get_all(b"x-b") == [b"1", b"2", b"3"]


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"X:a", b"a"),
        (b"X: a", b"a"),
        (b"X:\ta", b"a"),
        (b"X: \t a \t ", b"a"),
        (b"X:  a  b\tc  ", b"a  b\tc"),
        (b"X:", b""),
        (b"X:   ", b""),
        (b"X: \x80caf\xc3\xa9\xff", b"\x80caf\xc3\xa9\xff"),
        (b'X: "quoted, string"', b'"quoted, string"'),
    ],
    ids=[
        "no-ows",
        "one-space",
        "tab",
        "ows-both-sides",
        "inner-whitespace-kept",
        "empty",
        "only-ows",
        "obs-text",
        "quoted",
    ],
)
def test_ows_around_a_field_value_is_not_part_of_it(line, value):
    # RFC 9112 §5: field-line = field-name ":" OWS field-value OWS, and
    # RFC 9110 §5.5 allows obs-text (0x80-0xFF) inside the value.
    assert request(b"GET / HTTP/1.1", b"Host: a", line).headers.fields[1] == (b"X", value)


@pytest.mark.parametrize(
    ("line", "method", "target"),
    [
        (b"OPTIONS * HTTP/1.1", b"OPTIONS", b"*"),
        (b"CONNECT example.com:443 HTTP/1.1", b"CONNECT", b"example.com:443"),
        (b"GET http://example.com/a?b HTTP/1.1", b"GET", b"http://example.com/a?b"),
        (b"M-SEARCH /%7E/~!$&'()*+,;=:@ HTTP/1.1", b"M-SEARCH", b"/%7E/~!$&'()*+,;=:@"),
        (b"get / HTTP/1.1", b"get", b"/"),
    ],
    ids=["asterisk-form", "authority-form", "absolute-form", "extension-method", "lowercase"],
)
def test_request_line_forms(line, method, target):
    # RFC 9112 §3.2: the four forms of request-target; RFC 9110 §9.1: a method
    # is any token, and it is case-sensitive, so "get" is kept as sent.
    parsed = request(line, b"Host: example.com")
    assert (parsed.method, parsed.target, parsed.version) == (method, target, (1, 1))


def test_http_1_0_request_without_host_is_fine():
    # RFC 9112 §3.2 requires Host only of HTTP/1.1 requests.
    parsed = request(b"GET / HTTP/1.0", b"Accept: */*")
    assert parsed.version == (1, 0)
    assert parsed.headers.get(b"host") is None


def test_empty_host_is_a_host():
    # RFC 9112 §3.2: with no authority, a client sends an empty Host.
    assert request(b"GET / HTTP/1.1", b"Host:").headers.get(b"host") == b""


def test_bytearray_input():
    parsed = parse_request_head(bytearray(GET + b"x"))
    assert parsed is not None
    assert parsed[0] == parse_request_head(GET)[0]
    assert parsed[1] == len(GET)


def test_serialize_writes_the_head_back():
    parsed = request(b"GET /a HTTP/1.1", b"Host:  a ", b"X-Y:b")
    assert parsed.serialize() == b"GET /a HTTP/1.1\r\nHost: a\r\nX-Y: b\r\n\r\n"
    assert parse_request_head(parsed.serialize()) == (parsed, len(parsed.serialize()))


# --- Request heads: what is rejected ------------------------------------------


def test_http_1_1_request_without_host_is_400():
    # RFC 9112 §3.2: a server MUST respond with 400 to an HTTP/1.1 request
    # that lacks a Host header field.
    rejects(
        parse_request_head, head(b"GET / HTTP/1.1", b"Accept: */*"), status=400, mentions="Host"
    )


@pytest.mark.parametrize(
    "fields",
    [
        (b"Host: a", b"Host: b"),
        (b"Host: a", b"Host: a"),
        (b"Host: a", b"host: a"),
    ],
    ids=["different", "identical", "different-case"],
)
@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
def test_more_than_one_host_is_400(fields, version):
    # RFC 9112 §3.2: ... or more than one Host header field line.
    rejects(
        parse_request_head,
        head(b"GET / " + version, *fields),
        status=400,
        mentions="more than one Host",
    )


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/3.0"])
def test_unsupported_http_version_is_505(version):
    # RFC 9110 §15.6.6: 505 (HTTP Version Not Supported) for a major version
    # the server does not support; a well-formed 1.2 is refused the same way.
    rejects(
        parse_request_head,
        head(b"GET / " + version, b"Host: a"),
        status=505,
        mentions="version",
    )


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"GET  / HTTP/1.1", id="two-spaces-after-method"),
        pytest.param(b"GET /  HTTP/1.1", id="two-spaces-after-target"),
        pytest.param(b" GET / HTTP/1.1", id="space-before-method"),
        pytest.param(b"GET / HTTP/1.1 ", id="space-after-version"),
        pytest.param(b"GET\t/\tHTTP/1.1", id="tabs-not-sp"),
        pytest.param(b"GET /", id="missing-version"),
        pytest.param(b"GET HTTP/1.1", id="missing-target"),
        pytest.param(b"/ HTTP/1.1", id="missing-method"),
        pytest.param(b"GET / http/1.1", id="lowercase-http-name"),
        pytest.param(b"GET / HTTPS/1.1", id="wrong-http-name"),
        pytest.param(b"GET / HTTP/1", id="version-without-minor"),
        pytest.param(b"GET / HTTP/1.10", id="two-digit-minor"),
        pytest.param(b"GET / HTTP/1.1.1", id="three-part-version"),
        pytest.param(b"GET / HTTP/ 1.1", id="space-in-version"),
        pytest.param(b"G(T / HTTP/1.1", id="method-not-a-token"),
        pytest.param(b"GET /a b HTTP/1.1", id="space-in-target"),
        pytest.param(b"GET /\x7f HTTP/1.1", id="del-in-target"),
        pytest.param(b"GET /\x80 HTTP/1.1", id="obs-text-in-target"),
        pytest.param(b"GET /\x00 HTTP/1.1", id="nul-in-target"),
        pytest.param(b"Host: a", id="a-field-line-instead"),
    ],
)
def test_malformed_request_line_is_400(line):
    # RFC 9112 §3: request-line = method SP request-target SP HTTP-version,
    # with exactly one SP each; §2.3: HTTP-name is case-sensitive "HTTP".
    rejects(parse_request_head, head(line, b"Host: a"), status=400, mentions="request line")


@pytest.mark.parametrize(
    "lines",
    [
        (b"Host: a", b"X: a", b" b"),
        (b"Host: a", b"X: a", b"\tb"),
        (b"Host: a", b"X: a", b"  "),
        (b" Host: a",),
        (b"\tHost: a",),
    ],
    ids=["space-fold", "tab-fold", "fold-of-whitespace", "space-before-first", "tab-before-first"],
)
def test_obs_fold_is_400(lines):
    # RFC 9112 §5.2: a server MUST either reject a message containing obs-fold
    # with 400 or replace it; §2.2: whitespace between the start-line and the
    # first field line likewise. This module rejects.
    rejects(parse_request_head, head(b"GET / HTTP/1.1", *lines), status=400, mentions="obs-fold")


@pytest.mark.parametrize("line", [b"X : a", b"X\t: a", b"Host : a", b"X  :a"])
def test_whitespace_before_the_colon_is_400(line):
    # RFC 9112 §5.1: a server MUST reject, with 400, any received request
    # message that contains whitespace between a header field name and colon.
    rejects(
        parse_request_head,
        head(b"GET / HTTP/1.1", b"Host: a", line),
        status=400,
        mentions="between a header name and its colon",
    )


@pytest.mark.parametrize(
    ("line", "mentions"),
    [
        (b"X a", "without a colon"),
        (b": a", "malformed header field"),
        (b"X(Y): a", "malformed header field"),
        (b"X\x80: a", "malformed header field"),
        (b"X\x01: a", "control character"),
    ],
    ids=["no-colon", "empty-name", "name-not-a-token", "obs-text-in-name", "ctl-in-name"],
)
def test_malformed_field_line_is_400(line, mentions):
    # RFC 9110 §5.1: field-name = token.
    rejects(
        parse_request_head,
        head(b"GET / HTTP/1.1", b"Host: a", line),
        status=400,
        mentions=mentions,
    )


CONTROLS = [bytes([c]) for c in range(0x20) if c not in b"\t\r\n"] + [b"\x7f"]


@pytest.mark.parametrize("ctl", CONTROLS, ids=[f"0x{c[0]:02x}" for c in CONTROLS])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_control_characters_in_a_value_are_400(ctl, where):
    # RFC 9110 §5.5: field values are VCHAR, SP, HTAB and obs-text; CTLs,
    # NUL above all, are not allowed.
    value = {"start": ctl + b"ab", "middle": b"a" + ctl + b"b", "end": b"ab" + ctl}[where]
    rejects(
        parse_request_head,
        head(b"GET / HTTP/1.1", b"Host: a", b"X: " + value),
        status=400,
        mentions="control character",
    )


BARE_LINE_ENDS = [
    pytest.param(b"GET / HTTP/1.1\nHost: a\r\n\r\n", id="lf-after-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", id="lf-between-fields"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\n\n", id="head-ends-lf-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\n", id="head-ends-crlf-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\n\r\n", id="head-ends-lf-crlf"),
    pytest.param(b"GET / HTTP/1.1\r\nX: a\nb\r\nHost: a\r\n\r\n", id="lf-inside-a-value"),
    pytest.param(b"GET / HTTP/1.1\rHost: a\r\n\r\n", id="cr-after-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", id="cr-between-fields"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", id="cr-cr-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n", id="cr-in-empty-line"),
    pytest.param(b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n", id="cr-in-target"),
    pytest.param(b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", id="leading-lf"),
    pytest.param(b"\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", id="leading-crlf-lf"),
    pytest.param(b"\n", id="only-lf"),
]


@pytest.mark.parametrize("raw", BARE_LINE_ENDS)
def test_bare_cr_or_lf_anywhere_in_the_head_is_400(raw):
    # RFC 9112 §2.2: a bare CR must be rejected or replaced; a recipient MAY
    # accept a bare LF, but two parsers disagreeing about line ends is what
    # smuggling is made of, so this module rejects both.
    rejects(parse_request_head, raw, status=400, mentions="bare CR or LF")


@pytest.mark.parametrize("raw", BARE_LINE_ENDS)
def test_bare_cr_or_lf_is_rejected_as_soon_as_it_is_known(raw):
    # The LF-only client must get its 400 now, not wait for a CRLFCRLF that
    # will never come: the shortest prefix that shows the bad byte is enough.
    # A CR is known to be bare once the byte after it has come.
    bare_lf = next((i for i, b in enumerate(raw) if b == 0x0A and raw[i - 1 : i] != b"\r"), None)
    bare_cr = next(
        (i + 1 for i, b in enumerate(raw[:-1]) if b == 0x0D and raw[i + 1] != 0x0A), None
    )
    first = min(i for i in (bare_lf, bare_cr) if i is not None)
    for prefix, _ in splits(raw[:first]):
        assert parse_request_head(prefix) is None
    rejects(parse_request_head, raw[: first + 1], status=400, mentions="bare CR or LF")


def test_a_cr_at_the_end_of_the_buffer_may_still_get_its_lf():
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r") is None
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r") is None


# --- Size limits --------------------------------------------------------------


def _sized_head(size: int) -> bytes:
    """A valid request head of exactly ``size`` bytes, empty line included."""
    start = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: "
    raw = start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(raw) == size
    return raw


def test_head_exactly_at_the_limit_parses():
    raw = _sized_head(200)
    assert parse_request_head(raw + b"body", max_size=200)[1] == 200


def test_head_one_byte_over_the_limit_is_431():
    # RFC 6585 §5: 431 (Request Header Fields Too Large).
    rejects(parse_request_head, _sized_head(201), max_size=200, status=431, mentions="larger than")


def test_oversized_head_is_refused_once_the_limit_is_reached_without_an_end():
    raw = _sized_head(1000)
    assert parse_request_head(raw[:199], max_size=200) is None
    rejects(parse_request_head, raw[:200], max_size=200, status=431, mentions="larger than 200")


@pytest.mark.parametrize("size", range(195, 206))
def test_the_limit_does_not_depend_on_how_the_bytes_were_split(size):
    # Regression: a head a few bytes over the limit used to parse when it
    # came in one read and be refused with 431 when it came in two.
    raw = _sized_head(size)
    if size <= 200:
        assert parse_request_head(raw, max_size=200) == (parse_request_head(raw)[0], size)
        for prefix, _ in splits(raw[:-1]):
            assert parse_request_head(prefix, max_size=200) is None
    else:
        rejects(parse_request_head, raw, max_size=200, status=431, mentions="larger than")
        for prefix, _ in splits(raw):
            if len(prefix) < 200:
                assert parse_request_head(prefix, max_size=200) is None
            else:
                rejects(parse_request_head, prefix, max_size=200, status=431, mentions="larger")


def test_default_limit_is_32_kib():
    assert parse_request_head(_sized_head(32 * 1024))[1] == 32 * 1024
    rejects(parse_request_head, _sized_head(32 * 1024 + 1), status=431, mentions="larger than")


def test_empty_lines_before_the_head_count_towards_the_limit():
    # Regression: CRLFs before the request line were skipped without limit,
    # so a client could make the proxy buffer them for ever.
    rejects(parse_request_head, b"\r\n" * 100, max_size=200, status=431, mentions="larger than")
    rejects(parse_request_head, b"\r\n" * 100_000, status=431, mentions="larger than")
    assert parse_request_head(b"\r\n" * 99, max_size=200) is None
    assert parse_request_head(b"\r\n" + _sized_head(198), max_size=200)[1] == 200
    rejects(
        parse_request_head, b"\r\n" + _sized_head(199), max_size=200, status=431, mentions="larger"
    )


def test_whitespace_then_a_bad_byte_is_rejected_in_linear_time():
    # Regression: backtracking between the two OWS of a field line was
    # quadratic; this head took about five seconds to refuse.
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX:" + b" " * 30_000 + b"\x01\r\n\r\n"
    started = time.perf_counter()
    rejects(parse_request_head, raw, status=400, mentions="control character")
    assert time.perf_counter() - started < 0.5


# --- Response heads (RFC 9112 §4) ---------------------------------------------


@pytest.mark.parametrize(
    ("line", "status", "reason", "version"),
    [
        (b"HTTP/1.1 200 OK", 200, b"OK", (1, 1)),
        (b"HTTP/1.1 404 Not Found", 404, b"Not Found", (1, 1)),
        (b"HTTP/1.1 101 Switching Protocols", 101, b"Switching Protocols", (1, 1)),
        (b"HTTP/1.0 200 OK", 200, b"OK", (1, 0)),
        (b"HTTP/1.1 204 ", 204, b"", (1, 1)),
        (b"HTTP/1.1 204", 204, b"", (1, 1)),
        (b"HTTP/1.1 200 \tok\t ", 200, b"\tok\t ", (1, 1)),
        (b"HTTP/1.1 200 caf\xc3\xa9 \x80", 200, b"caf\xc3\xa9 \x80", (1, 1)),
        (b"HTTP/1.1 100 Continue", 100, b"Continue", (1, 1)),
        (b"HTTP/1.1 599 Custom", 599, b"Custom", (1, 1)),
        (b"HTTP/1.1 999 x", 999, b"x", (1, 1)),
    ],
    ids=[
        "ok",
        "reason-with-spaces",
        "switching-protocols",
        "http-1.0",
        "empty-reason-with-space",
        "empty-reason-without-space",
        "reason-whitespace-kept",
        "obs-text-reason",
        "lowest-code",
        "unregistered-code",
        "highest-code",
    ],
)
def test_status_line_variants(line, status, reason, version):
    # RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ];
    # a client SHOULD accept a status line without the SP before an empty reason.
    assert response(line, b"Server: x") == ResponseHead(
        status, reason, version, Headers(((b"Server", b"x"),))
    )


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"HTTP/1.1 000 Zero", id="status-000"),
        pytest.param(b"HTTP/1.1 099 Low", id="status-099"),
        pytest.param(b"HTTP/1.1 20 OK", id="two-digits"),
        pytest.param(b"HTTP/1.1 2000 OK", id="four-digits"),
        pytest.param(b"HTTP/1.1 20x OK", id="not-a-number"),
        pytest.param(b"HTTP/1.1 200OK", id="no-space-before-reason"),
        pytest.param(b"HTTP/1.1  200 OK", id="two-spaces"),
        pytest.param(b"HTTP/1.1\t200 OK", id="tab-not-sp"),
        pytest.param(b"HTTP/1.1 OK", id="missing-status"),
        pytest.param(b"HTTP/1.1", id="version-only"),
        pytest.param(b"http/1.1 200 OK", id="lowercase-http-name"),
        pytest.param(b"HTTP/11 200 OK", id="version-without-dot"),
        pytest.param(b"ICY 200 OK", id="not-http"),
        pytest.param(b" HTTP/1.1 200 OK", id="leading-space"),
        pytest.param(b"HTTP/1.1 200 O\x00K", id="nul-in-reason"),
        pytest.param(b"HTTP/1.1 200 OK\x7f", id="del-in-reason"),
        pytest.param(b"", id="empty"),
    ],
)
def test_malformed_status_line(line):
    # RFC 9112 §4: status-code = 3DIGIT; RFC 9110 §15: its first digit is the
    # class, 1 to 5 for those defined, so "000" and "099" are not codes.
    rejects(parse_response_head, head(line), status=400, mentions="malformed status line")


@pytest.mark.parametrize("line", [b"HTTP/2.0 200 OK", b"HTTP/0.9 200 OK", b"HTTP/3.0 200 OK"])
def test_response_in_another_major_version(line):
    rejects(parse_response_head, head(line), status=400, mentions="HTTP version")


@pytest.mark.parametrize(
    ("lines", "mentions"),
    [
        ((b"X: a", b" b"), "obs-fold"),
        ((b"X : a",), "colon"),
        ((b"X: a\x00",), "control character"),
        ((b"X",), "without a colon"),
    ],
    ids=["obs-fold", "space-before-colon", "nul", "no-colon"],
)
def test_response_fields_follow_the_same_rules(lines, mentions):
    rejects(parse_response_head, head(b"HTTP/1.1 200 OK", *lines), status=400, mentions=mentions)


@pytest.mark.parametrize(
    "raw",
    [b"HTTP/1.1 200 OK\nServer: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n\n", b"HTTP/1.1 200 OK\r\rX"],
    ids=["lf-after-status-line", "crlf-lf", "cr-cr"],
)
def test_bare_cr_or_lf_in_a_response_head(raw):
    rejects(parse_response_head, raw, status=400, mentions="bare CR or LF")


def test_response_end_offset_and_every_prefix():
    raw = head(b"HTTP/1.1 200 OK", b"Content-Length: 4", b"Server: x")
    for prefix, _ in splits(raw[:-1]):
        assert parse_response_head(prefix) is None
    parsed = parse_response_head(raw + b"body" + head(b"HTTP/1.1 204"))
    assert parsed[1] == len(raw)
    assert parsed[0].headers.fields == ((b"Content-Length", b"4"), (b"Server", b"x"))
    second = parse_response_head(raw + head(b"HTTP/1.1 204"), len(raw))
    assert second == (ResponseHead(204, b""), len(raw) + len(head(b"HTTP/1.1 204")))


def test_response_head_size_limit():
    start = b"HTTP/1.1 200 OK\r\nX-Pad: "
    at_limit = start + b"p" * (300 - len(start) - 4) + b"\r\n\r\n"
    assert parse_response_head(at_limit, max_size=300)[1] == 300
    over = at_limit[:-4] + b"p\r\n\r\n"
    rejects(parse_response_head, over, max_size=300, status=400, mentions="larger than 300")
    assert parse_response_head(over[:299], max_size=300) is None
    rejects(parse_response_head, over[:300], max_size=300, status=400, mentions="larger than")


def test_default_response_limit_is_64_kib():
    over = b"HTTP/1.1 200 OK\r\nX: " + b"p" * (64 * 1024)
    rejects(parse_response_head, over, status=400, mentions="larger than 65536")


def test_response_serialize_round_trip():
    parsed = response(b"HTTP/1.1 204", b"Server:  x")
    assert parsed.serialize() == b"HTTP/1.1 204 \r\nServer: x\r\n\r\n"
    assert parse_response_head(parsed.serialize())[0] == parsed


# --- Headers (RFC 9110 §5) ----------------------------------------------------

FIELDS = Headers.of(
    [
        (b"Host", b"a"),
        (b"Connection", b"Keep-Alive, X-Private"),
        (b"Accept", b"text/html, ,  */* "),
        (b"x-private", b"secret"),
        (b"accept", b"image/png"),
        (b"Upgrade", b"WebSocket"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"Expires"),
        (b"Via", b"1.1 p"),
    ]
)


def test_get_and_get_all_compare_names_case_insensitively():
    assert FIELDS.get(b"accept") == b"text/html, ,  */* "
    assert FIELDS.get_all(b"accept") == [b"text/html, ,  */* ", b"image/png"]
    assert FIELDS.get(b"missing") is None
    assert FIELDS.get_all(b"missing") == []
    assert FIELDS.has(b"x-private")
    assert not FIELDS.has(b"x-public")
    assert len(FIELDS) == 12
    assert next(iter(FIELDS)) == (b"Host", b"a")


def test_elements_split_lists_and_skip_empty_elements():
    # RFC 9110 §5.6.1: a recipient MUST parse and ignore empty list elements,
    # and lists may be split across field lines.
    assert FIELDS.elements(b"accept") == [b"text/html", b"*/*", b"image/png"]
    assert FIELDS.elements(b"connection") == [b"Keep-Alive", b"X-Private"]
    assert FIELDS.tokens(b"connection") == [b"keep-alive", b"x-private"]
    assert FIELDS.tokens(b"upgrade") == [b"websocket"]
    assert FIELDS.elements(b"missing") == []


def test_end_to_end_removes_hop_by_hop_fields_and_those_connection_names():
    # RFC 9110 §7.6.1: a proxy MUST remove Connection, every field it names,
    # and the other connection-specific fields, before forwarding.
    assert FIELDS.end_to_end().fields == (
        (b"Host", b"a"),
        (b"Accept", b"text/html, ,  */* "),
        (b"accept", b"image/png"),
        (b"Via", b"1.1 p"),
    )


def test_end_to_end_honours_every_connection_line_case_insensitively():
    fields = Headers.of(
        [
            (b"connection", b"X-A"),
            (b"X-B", b"2"),
            (b"x-a", b"1"),
            (b"CONNECTION", b" , x-b,"),
            (b"X-C", b"3"),
            (b"X-A", b"4"),
        ]
    )
    assert fields.end_to_end().fields == ((b"X-C", b"3"),)


def test_hop_by_hop_set():
    assert {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    } == HOP_BY_HOP


def test_without_and_plus_keep_order():
    fields = Headers.of([(b"A", b"1"), (b"B", b"2"), (b"a", b"3")])
    assert fields.without([b"a"]).fields == ((b"B", b"2"),)
    assert fields.plus([(b"C", b"4")]).fields == (
        (b"A", b"1"),
        (b"B", b"2"),
        (b"a", b"3"),
        (b"C", b"4"),
    )


# --- Connection semantics (RFC 9110 §7.8, RFC 9112 §9.3) ----------------------


@pytest.mark.parametrize(
    ("fields", "version", "expected"),
    [
        ((b"Connection: Upgrade", b"Upgrade: websocket"), b"HTTP/1.1", True),
        ((b"Connection: keep-alive, Upgrade", b"Upgrade: websocket"), b"HTTP/1.1", True),
        ((b"Connection: keep-alive", b"Connection: upgrade", b"Upgrade: h2c"), b"HTTP/1.1", True),
        ((b"connection: UPGRADE", b"upgrade: foo/2, bar"), b"HTTP/1.1", True),
        ((b"Connection: Upgrade", b"Upgrade: websocket"), b"HTTP/1.0", False),
        ((b"Connection: Upgrade",), b"HTTP/1.1", False),
        ((b"Connection: Upgrade", b"Upgrade:"), b"HTTP/1.1", False),
        ((b"Connection: Upgrade", b"Upgrade: , ,"), b"HTTP/1.1", False),
        ((b"Upgrade: websocket",), b"HTTP/1.1", False),
        ((b"Connection: keep-alive", b"Upgrade: websocket"), b"HTTP/1.1", False),
        ((b"Connection: Upgraded", b"Upgrade: websocket"), b"HTTP/1.1", False),
    ],
    ids=[
        "websocket",
        "keep-alive-and-upgrade",
        "token-on-second-connection-line",
        "tokens-are-case-insensitive",
        "http-1.0-never",
        "no-upgrade-field",
        "empty-upgrade-field",
        "upgrade-field-of-empty-elements",
        "upgrade-without-connection",
        "connection-without-upgrade-token",
        "not-the-upgrade-token",
    ],
)
def test_is_upgrade_request(fields, version, expected):
    # RFC 9110 §7.8: a sender of Upgrade MUST also send the "upgrade"
    # connection option, and a server MUST ignore Upgrade received in an
    # HTTP/1.0 request.
    hosted = (b"Host: a", *fields) if version == b"HTTP/1.1" else fields
    assert is_upgrade_request(request(b"GET /chat " + version, *hosted)) is expected


def test_offered_protocols_in_order_as_sent():
    parsed = request(b"GET / HTTP/1.1", b"Host: a", b"Upgrade: WebSocket, h2c", b"Upgrade: foo/2")
    assert offered_protocols(parsed) == [b"WebSocket", b"h2c", b"foo/2"]


@pytest.mark.parametrize(
    ("version", "fields", "expected"),
    [
        (b"HTTP/1.1", (), True),
        (b"HTTP/1.1", (b"Connection: close",), False),
        (b"HTTP/1.1", (b"Connection: Close",), False),
        (b"HTTP/1.1", (b"Connection: keep-alive, close",), False),
        (b"HTTP/1.1", (b"Connection: keep-alive", b"Connection: close"), False),
        (b"HTTP/1.1", (b"Connection: closed",), True),
        (b"HTTP/1.0", (), False),
        (b"HTTP/1.0", (b"Connection: keep-alive",), True),
        (b"HTTP/1.0", (b"Connection: Keep-Alive",), True),
        (b"HTTP/1.0", (b"Connection: keep-alive, close",), False),
        (b"HTTP/1.0", (b"Keep-Alive: timeout=5",), False),
    ],
    ids=[
        "1.1-default",
        "1.1-close",
        "1.1-close-any-case",
        "1.1-close-wins-in-a-list",
        "1.1-close-on-a-second-line",
        "1.1-not-the-close-token",
        "1.0-default",
        "1.0-keep-alive",
        "1.0-keep-alive-any-case",
        "1.0-close-wins",
        "1.0-keep-alive-field-is-not-the-option",
    ],
)
def test_keep_alive(version, fields, expected):
    # RFC 9112 §9.3: "close" ends it; otherwise HTTP/1.1 persists, and
    # HTTP/1.0 persists only with the "keep-alive" connection option.
    hosted = (b"Host: a", *fields)
    assert request_keeps_alive(request(b"GET / " + version, *hosted)) is expected
    status_line = version + b" 200 OK"
    assert response_keeps_alive(response(status_line, *fields)) is expected


def test_a_higher_minor_version_response_persists_like_1_1():
    # RFC 9110 §2.5: process a higher minor version as the highest one known.
    assert response_keeps_alive(response(b"HTTP/1.2 200 OK"))
    assert not response_keeps_alive(response(b"HTTP/1.2 200 OK", b"Connection: close"))


# -- resuming a search: ``checked`` -------------------------------------------------------


def _feed_with_checked(data: bytes, sizes: list[int], parse):  # type: ignore[no-untyped-def]
    """Feed ``data`` in pieces, passing ``checked`` as a caller that appends would."""
    buf = bytearray()
    checked = 0
    pos = 0
    for size in sizes:
        buf += data[pos : pos + size]
        pos += size
        result = parse(buf, 0, 64 * 1024, checked)
        if result is not None:
            return result
        checked = len(buf)
    return None


@pytest.mark.parametrize("split", range(1, 60))
def test_checked_gives_the_same_head_at_every_split(split: int) -> None:
    data = b"GET /x HTTP/1.1\r\nHost: a\r\nB: c\r\n\r\nrest"
    whole = parse_request_head(data)
    assert _feed_with_checked(data, [split, len(data)], parse_request_head) == whole


def test_checked_still_sees_a_bare_cr_split_from_what_follows() -> None:
    with pytest.raises(ProtocolError, match="bare CR or LF"):
        _feed_with_checked(
            b"GET / HTTP/1.1\r\nHost: a\rX\r\n\r\n", [24, 1, 100], parse_request_head
        )


def test_checked_finds_a_terminator_split_across_reads_one_byte_at_a_time() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nnext"
    result = _feed_with_checked(data, [1] * len(data), parse_response_head)
    assert result is not None and result[1] == len(data) - 4
