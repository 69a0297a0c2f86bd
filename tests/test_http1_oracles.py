"""The HTTP/1.1 module against two independent parsers, and under fuzzing.

Oracles: h11 (pure Python, ``h11.Connection(h11.SERVER)``) and httptools
(llhttp, the parser of Node.js). Both must read every valid head the way
this module does. Neither is as strict as this module, and each is lenient
in different places, so rejections are compared only where an oracle is
known to be strict; the table below records which one is, case by case.

Known leniencies, so nobody "fixes" a test to match them:

* h11 accepts bare LF line ends, unfolds obs-fold, accepts control bytes
  other than NUL in values, merges identical or listed Content-Length
  values (RFC 9110 §8.6 allows that), lets Transfer-Encoding win over
  Content-Length, and accepts Transfer-Encoding in HTTP/1.0. It lowercases
  the value of Transfer-Encoding.
* h11 refuses empty lines before the request line (RFC 9112 §2.2 only says
  a server SHOULD skip them), so generated heads never start with one.
* httptools only knows a fixed list of methods, does not require Host,
  accepts several Host fields, extra spaces in the request line, and
  ``gzip, chunked``; it keeps trailing OWS in field values. It checks the
  form of the request-target, which this module leaves to the proxy, and
  it refuses whitespace after a chunk size, as this module does.

The fuzz tests only require that nothing but :class:`ProtocolError` ever
escapes, that nothing hangs, and that what is accepted is self-consistent.
"""

from __future__ import annotations

import contextlib

import h11
import httptools
import pytest
from http1_helpers import feed, head, no_hang
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from upgradeproxy.http1 import (
    LAST_CHUNK,
    NO_BODY,
    BodyKind,
    ChunkedDecoder,
    Framing,
    Headers,
    ProtocolError,
    RequestHead,
    ResponseHead,
    encode_chunk,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
)

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)

# --- Generating valid request heads ---------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The methods llhttp knows; CONNECT is left out, as llhttp then wants an
# authority-form target.
KNOWN_METHODS = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"MKCOL",
    b"M-SEARCH",
    b"PURGE",
]
# Fields whose meaning goes beyond their bytes are generated on purpose,
# never by chance.
SPECIAL = {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade"}

VCHAR = "".join(map(chr, [*range(0x21, 0x7F), *range(0x80, 0x100)]))


def latin1(text: str) -> bytes:
    return text.encode("latin-1")


tokens = st.text(TCHAR, min_size=1, max_size=10).map(latin1)
names = st.one_of(
    st.sampled_from([b"Accept", b"X-Repeated", b"x-repeated", b"Set-Cookie", b"Via", b"X"]),
    tokens.filter(lambda n: n.lower() not in SPECIAL),
)
# field-value = *field-content, which begins and ends with a field-vchar:
# VCHAR or obs-text, with SP and HTAB only inside (RFC 9110 §5.5). OWS
# around it is not part of it.
values = st.text(VCHAR + " \t", max_size=30).map(lambda v: latin1(v.strip(" \t")))
ows = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t"])
targets = st.one_of(
    st.text(VCHAR[:94], max_size=30).map(lambda t: b"/" + latin1(t)),
    st.just(b"*"),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789/", max_size=20).map(
        lambda t: b"http://example.com/" + latin1(t)
    ),
)


@st.composite
def request_heads(draw, methods=tokens):
    """A valid request head as bytes, and the fields it must parse to."""
    method = draw(methods)
    target = draw(targets)
    version = draw(st.sampled_from([b"1.1", b"1.0"]))
    fields = draw(st.lists(st.tuples(names, values), max_size=8))
    if version == b"1.1" or draw(st.booleans()):
        host = (draw(st.sampled_from([b"Host", b"host", b"HOST"])), draw(values))
        fields.insert(draw(st.integers(0, len(fields))), host)
    lines = [method + b" " + target + b" HTTP/" + version]
    for name, value in fields:
        lines.append(name + b":" + draw(ows) + value + draw(ows))
    expected = RequestHead(
        method, target, (int(version[:1]), int(version[2:])), Headers(tuple(fields))
    )
    return head(*lines), expected


# --- The oracles ---------------------------------------------------------------


def _h11_head(event: h11.Request) -> RequestHead:
    version = tuple(int(d) for d in event.http_version.split(b"."))
    return RequestHead(event.method, event.target, version, Headers.of(event.headers.raw_items()))


def h11_request(raw: bytes) -> RequestHead:
    """The request h11 reads from ``raw``; raises h11.RemoteProtocolError."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    return _h11_head(event)


def h11_message(raw: bytes) -> tuple[RequestHead, bytes, bytes]:
    """The request, its body, and the bytes after it, as h11 reads them."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    request = conn.next_event()
    assert isinstance(request, h11.Request), request
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return _h11_head(request), body, bytes(conn.trailing_data[0])
        else:
            raise AssertionError(f"h11 wants more than the module did: {event}")


class _Collector:
    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.body = b""
        self.message_complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:  # llhttp reports trailer fields here too
            self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.message_complete = True


def _httptools_parse(raw: bytes) -> tuple[_Collector, httptools.HttpRequestParser]:
    collector = _Collector()
    parser = httptools.HttpRequestParser(collector)
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(raw)
    return collector, parser


def _httptools_head(collector: _Collector, parser: httptools.HttpRequestParser) -> RequestHead:
    # llhttp keeps trailing OWS in a value, so it is stripped here.
    assert collector.complete
    version = tuple(int(d) for d in parser.get_http_version().split("."))
    fields = tuple((n, v.rstrip(b" \t")) for n, v in collector.fields)
    return RequestHead(parser.get_method(), collector.url, version, Headers(fields))


def httptools_request(raw: bytes) -> RequestHead:
    """The request llhttp reads from ``raw``; raises httptools.HttpParserError."""
    return _httptools_head(*_httptools_parse(raw))


def h11_rejects(raw: bytes) -> bool:
    try:
        h11_request(raw)
    except h11.RemoteProtocolError:
        return True
    return False


def httptools_rejects(raw: bytes) -> bool:
    try:
        httptools_request(raw)
    except httptools.HttpParserError:
        return True
    return False


# --- Valid heads: all three parsers agree ----------------------------------------


@SETTINGS
@given(request_heads())
def test_h11_reads_valid_heads_the_same_way(case):
    raw, expected = case
    assert h11_request(raw) == expected == parse_request_head(raw)[0]


@SETTINGS
@given(request_heads(methods=st.sampled_from(KNOWN_METHODS)))
def test_httptools_reads_valid_heads_the_same_way(case):
    raw, expected = case
    assert httptools_request(raw) == expected == parse_request_head(raw)[0]


@SETTINGS
@given(
    request_heads(),
    st.integers(0, 3),
    st.binary(max_size=20),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_any_split_of_a_valid_head_gives_the_same_result(case, empty_lines, after, cuts):
    # Bytes arrive in arbitrary pieces; until the empty line has come the
    # answer is "not yet", then it is the head and where it ends. Empty lines
    # before the request line are skipped (RFC 9112 §2.2).
    raw, expected = case
    raw = b"\r\n" * empty_lines + raw
    stream = raw + after
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        parsed = parse_request_head(stream[:cut])
        if cut < len(raw):
            assert parsed is None
        else:
            assert parsed == (expected, len(raw))


# --- Smuggling-relevant bytes: this module rejects; a strict oracle agrees ------

POST = b"POST / HTTP/1.1\r\nHost: a\r\n"
# (bytes, status, words of the reason, h11 rejects too, httptools rejects too)
SMUGGLING = [
    pytest.param(
        POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "both Content-Length and Transfer-Encoding",
        False,  # h11 lets Transfer-Encoding win (RFC 9112 §6.3 item 3)
        True,
        id="cl-and-te",
    ),
    pytest.param(
        POST + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\n",
        400,
        "more than one Content-Length",
        False,  # h11 merges identical values (RFC 9110 §8.6 allows it)
        True,
        id="duplicate-identical-cl",
    ),
    pytest.param(
        POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
        400,
        "more than one Content-Length",
        True,
        True,
        id="duplicate-different-cl",
    ),
    pytest.param(
        POST + b"Content-Length: 1, 1\r\n\r\n",
        400,
        "decimal",
        False,  # h11 merges a list of identical values too
        True,
        id="cl-list",
    ),
    pytest.param(POST + b"Content-Length: +1\r\n\r\n", 400, "decimal", True, True, id="cl-plus"),
    pytest.param(POST + b"Content-Length: 0x1\r\n\r\n", 400, "decimal", True, True, id="cl-hex"),
    pytest.param(
        POST + b"Content-Length: 1 1\r\n\r\n", 400, "decimal", True, True, id="cl-inner-space"
    ),
    pytest.param(
        POST + b"Transfer-Encoding: chunked, identity\r\n\r\n",
        400,
        "final transfer coding",
        True,
        True,
        id="te-chunked-identity",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: xchunked\r\n\r\n",
        400,
        "final transfer coding",
        True,
        True,
        id="te-xchunked",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: identity\r\n\r\n",
        400,
        "final transfer coding",
        True,
        True,
        id="te-identity",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "chunked applied more than once",
        True,
        True,
        id="te-chunked-twice",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
        501,
        "single chunked",
        True,
        False,  # llhttp decodes the chunked framing and leaves gzip to the app
        id="te-gzip-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "HTTP/1.0",
        False,  # both oracles read HTTP/1.0 chunked bodies
        False,
        id="te-in-http-1.0",
    ),
    pytest.param(
        POST + b"X: a\r\n b\r\n\r\n",
        400,
        "obs-fold",
        False,  # h11 unfolds obs-fold (RFC 9112 §5.2 allows replacing it)
        True,
        id="obs-fold",
    ),
    pytest.param(
        POST + b"Transfer-Encoding : chunked\r\n\r\n",
        400,
        "colon",
        True,
        True,
        id="space-before-colon",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\nContent-Length: 5\r\n\r\n",
        400,
        "bare CR or LF",
        False,  # h11 accepts bare LF (RFC 9112 §2.2 allows it)
        True,
        id="bare-lf",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\n\n",
        400,
        "bare CR or LF",
        False,
        True,
        id="head-ends-lf-lf",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\rContent-Length: 5\r\n\r\n",
        400,
        "bare CR or LF",
        True,
        True,
        id="bare-cr",
    ),
    pytest.param(
        POST + b"X: a\x00b\r\n\r\n", 400, "control character", True, True, id="nul-in-value"
    ),
    pytest.param(
        POST + b"X: a\x01b\r\n\r\n",
        400,
        "control character",
        False,  # h11 only refuses NUL, CR and LF in values
        True,
        id="ctl-in-value",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        400,
        "more than one Host",
        True,
        False,  # llhttp does not look at Host
        id="two-hosts",
    ),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, "without a Host", True, False, id="no-host"),
    pytest.param(
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
        "malformed request line",
        True,
        False,  # llhttp skips extra spaces in the request line
        id="two-spaces",
    ),
    pytest.param(
        b"GET / http/1.1\r\nHost: a\r\n\r\n",
        400,
        "malformed request line",
        True,
        True,
        id="lowercase-version",
    ),
]


def _module_rejects(raw: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parsed = parse_request_head(raw)
        assert parsed is not None
        request_framing(parsed[0])
    return info.value


@pytest.mark.parametrize(("raw", "status", "mentions", "h11_strict", "llhttp_strict"), SMUGGLING)
def test_smuggling_relevant_heads(raw, status, mentions, h11_strict, llhttp_strict):
    error = _module_rejects(raw)
    assert error.status == status
    assert mentions.lower() in error.reason.lower(), error.reason
    # Where an oracle is strict, it must agree; where it is lenient, record
    # that it still is, so this table stays true.
    assert h11_rejects(raw) is h11_strict
    assert httptools_rejects(raw) is llhttp_strict


def _space_before_colon(lines: list[bytes], i: int) -> None:
    lines[i] = lines[i].replace(b":", b" :", 1)


def _cr_without_lf(lines: list[bytes], i: int) -> None:
    lines[i - 1 : i + 1] = [lines[i - 1] + b"\r" + lines[i]]


def _lowercase_http(lines: list[bytes], i: int) -> None:
    lines[0] = lines[0].replace(b" HTTP/", b" http/")


# Not pytest.mark.parametrize: pytest-twisted wraps a hypothesis test once per
# item, and the items of one parametrized function share it.
@SETTINGS
@given(
    edit=st.sampled_from([_space_before_colon, _cr_without_lf, _lowercase_http]),
    case=request_heads(methods=st.sampled_from(KNOWN_METHODS)),
    which=st.integers(0, 100),
)
def test_edits_that_every_parser_rejects(edit, case, which):
    # Edits of a valid head that break it in a smuggling-relevant way, and
    # that both oracles refuse as well: whitespace before a colon (RFC 9112
    # §5.1), a line ended by CR alone (§2.2), and a lowercase HTTP-name (§2.3).
    raw, _ = case
    lines = raw[:-4].split(b"\r\n")
    assume(len(lines) > 1)
    edit(lines, 1 + which % (len(lines) - 1))
    broken = head(*lines)
    with pytest.raises(ProtocolError):
        parse_request_head(broken)
    assert h11_rejects(broken)
    assert httptools_rejects(broken)


# --- Fuzzing: only ProtocolError, never a hang ---------------------------------

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.0 204\r\n\r\n",
    b"5;e=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
]
INTERESTING = b'\r\n \t:,;0aF\x00\x7f\x80-+"\\'


def _mutate(draw, data: bytes, most: int) -> bytes:
    """``data`` with up to ``most`` random insertions, deletions and changes."""
    out = bytearray(data)
    byte = st.sampled_from(INTERESTING) | st.integers(0, 255)
    for _ in range(draw(st.integers(0, most))):
        at = draw(st.integers(0, len(out)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        if op == "insert":
            out[at:at] = bytes([draw(byte)])
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 4))]
        elif op == "replace" and at < len(out):
            out[at] = draw(byte)
        elif op == "repeat":
            out[at:at] = out[at : at + draw(st.integers(1, 8))] * draw(st.integers(1, 4))
    return bytes(out)


@st.composite
def mutated(draw, seeds=SEEDS):
    """A seed message with a few random insertions, deletions and changes."""
    return _mutate(draw, draw(st.sampled_from(seeds)), 6)


LENGTH_FIELDS = [b"Content-Length: 3", b"Content-Length: 0", b"content-length:  10 "]
CHUNKED_FIELDS = [b"Transfer-Encoding: chunked", b"transfer-encoding: Chunked"]
BAD_FRAMING_FIELDS = [
    b"Content-Length: 3, 3",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, identity",
]
CHUNKED_BODIES = [
    b"3\r\nabc\r\n0\r\n\r\n",
    b"3;x=y\r\nabc\r\na\r\n0123456789\r\n0\r\nT: v\r\n\r\n",
    b"0\r\n\r\n",
]
BODIES = [b"abc", b"abcdefghij", b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n", *CHUNKED_BODIES]


@st.composite
def request_messages(draw):
    """A request with framing fields and a body, valid or a little broken."""
    raw, _ = draw(request_heads(methods=st.sampled_from(KNOWN_METHODS)))
    lines = raw[:-4].split(b"\r\n")
    fields = draw(
        st.one_of(
            st.just([]),
            st.sampled_from(LENGTH_FIELDS).map(lambda f: [f]),
            st.sampled_from(CHUNKED_FIELDS).map(lambda f: [f]),
            st.lists(
                st.sampled_from(LENGTH_FIELDS + CHUNKED_FIELDS + BAD_FRAMING_FIELDS),
                min_size=1,
                max_size=2,
            ),
        )
    )
    for field in fields:
        lines.insert(draw(st.integers(1, len(lines))), field)
    chunked = any(f in CHUNKED_FIELDS for f in fields)
    body = draw(st.sampled_from(CHUNKED_BODIES if chunked else BODIES))
    message = head(*lines) + body + draw(st.sampled_from(BODIES))
    return _mutate(draw, message, 2)


messages = st.one_of(mutated(), request_messages(), st.binary(max_size=200))


def _check_request(buf: bytes) -> None:
    try:
        parsed = parse_request_head(buf, max_size=256)
    except ProtocolError as error:
        assert error.status in (400, 431, 505)
        return
    if parsed is None:
        return
    head_, end = parsed
    assert buf[end - 4 : end] == b"\r\n\r\n"
    # What is accepted writes back out as a head that parses the same.
    assert parse_request_head(head_.serialize()) == (head_, len(head_.serialize()))
    try:
        framing = request_framing(head_)
    except ProtocolError as error:
        assert error.status in (400, 501)
        return
    _check_request_framing(head_.headers, framing)


def _check_request_framing(headers: Headers, framing: Framing) -> None:
    """What an accepted request's framing must follow from (RFC 9112 §6.3)."""
    te = headers.get_all(b"transfer-encoding")
    cl = headers.get_all(b"content-length")
    if framing.kind is BodyKind.CHUNKED:
        assert not cl
        assert [t.lower() for t in te] == [b"chunked"]
    elif framing.kind is BodyKind.LENGTH:
        assert not te
        assert len(cl) == 1
        assert int(cl[0]) == framing.length > 0
    else:
        assert framing == NO_BODY
        assert not te
        assert cl == [] or (len(cl) == 1 and int(cl[0]) == 0)


def _module_message(buf: bytes) -> tuple[RequestHead, bytes, int] | None:
    """The request, its body and where it ends; None if refused or incomplete."""
    try:
        parsed = parse_request_head(buf)
        if parsed is None:
            return None
        head_, end = parsed
        decoder = request_framing(head_).decoder()
        data, used = decoder.decode(buf[end:])
    except ProtocolError:
        return None
    if not decoder.done:
        return None
    return head_, b"".join(data), end + used


def _without_empty_lines(buf: bytes) -> bytes:
    # h11 refuses the empty lines before a request line that RFC 9112 §2.2
    # asks a server to skip; they are no part of the message.
    while buf.startswith(b"\r\n"):
        buf = buf[2:]
    return buf


requests = st.one_of(mutated(seeds=SEEDS[:3]), request_messages())


@SETTINGS
@given(requests)
def test_what_the_module_accepts_h11_reads_and_frames_the_same_way(buf):
    # The property that rules out request smuggling between the proxy and a
    # backend: a message the module accepts is, for h11 too, the same head
    # and the same body, and ends at the same byte.
    accepted = _module_message(buf)
    if accepted is None:
        return
    head_, body, end = accepted
    # h11 lowercases the value of Transfer-Encoding.
    fields = tuple(
        (n, v.lower() if n.lower() == b"transfer-encoding" else v) for n, v in head_.headers
    )
    expected = RequestHead(head_.method, head_.target, head_.version, Headers(fields))
    assert h11_message(_without_empty_lines(buf)) == (expected, body, buf[end:])


@SETTINGS
@given(requests)
def test_what_the_module_accepts_httptools_reads_and_frames_the_same_way(buf):
    # llhttp checks the form of the target, which this module leaves to the
    # proxy, and knows only its own methods: those messages are left out.
    accepted = _module_message(buf)
    if accepted is None:
        return
    head_, body, end = accepted
    if head_.method not in KNOWN_METHODS or head_.target[:1] not in (b"/", b"*"):
        return
    collector, parser = _httptools_parse(buf[:end])
    assert (_httptools_head(collector, parser), collector.body) == (head_, body)
    assert collector.message_complete
    assert not _httptools_parse(buf[: end - 1])[0].message_complete


@SETTINGS
@given(messages)
def test_fuzz_parse_request_head(buf):
    with no_hang():
        _check_request(buf)


@SETTINGS
@given(messages, st.sampled_from([b"GET", b"HEAD", b"CONNECT", b"POST"]))
def test_fuzz_parse_response_head_and_framing(buf, method):
    with no_hang():
        try:
            parsed = parse_response_head(buf, max_size=256)
            if parsed is None:
                return
            head_, end = parsed
            assert 100 <= head_.status <= 999
            assert buf[end - 4 : end] == b"\r\n\r\n"
            assert parse_response_head(head_.serialize())[0] == head_
            framing = response_framing(head_, method)
        except ProtocolError:
            return
        assert isinstance(framing, Framing)


field_names = st.sampled_from(
    [b"Content-Length", b"content-length", b"Transfer-Encoding", b"TRANSFER-ENCODING", b"X"]
)
field_values = st.lists(st.sampled_from([b"chunked", b"gzip", b"1", b"0", b",", b" ", b"-"])).map(
    b"".join
)


@SETTINGS
@given(
    st.lists(st.tuples(field_names, field_values), max_size=4),
    st.sampled_from([(1, 0), (1, 1)]),
    st.integers(100, 999),
    st.sampled_from([b"GET", b"HEAD", b"CONNECT"]),
)
def test_fuzz_framing_of_arbitrary_fields(fields, version, status, method):
    headers = Headers(tuple(fields))
    try:
        framing = request_framing(RequestHead(b"POST", b"/", version, headers))
    except ProtocolError as error:
        assert error.status in (400, 501)
    else:
        _check_request_framing(headers, framing)
    try:
        framing = response_framing(ResponseHead(status, b"", version, headers), method)
    except ProtocolError:
        return
    if framing.kind is BodyKind.LENGTH:
        cl = headers.get_all(b"content-length")
        assert len(cl) == 1
        assert int(cl[0]) == framing.length > 0
    if framing != NO_BODY:
        # RFC 9112 §6.3 items 1 and 2.
        assert method != b"HEAD"
        assert status >= 200 and status not in (204, 304)
        assert not (method == b"CONNECT" and status < 300)


@SETTINGS
@given(st.one_of(mutated(), st.binary(max_size=200)), st.lists(st.integers(0, 300), max_size=6))
def test_fuzz_chunked_decoder(body, cuts):
    pieces = []
    last = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        pieces.append(body[last:cut])
        last = cut
    pieces.append(body[last:])
    decoder = ChunkedDecoder()
    with no_hang():
        try:
            data, rest = feed(decoder, pieces)
        except ProtocolError as error:
            assert error.status == 400
            return
    if decoder.done:
        # The same bytes in one piece end at the same place.
        whole = ChunkedDecoder()
        out, used = whole.decode(body)
        assert (b"".join(out), body[used:]) == (data, rest)


chunk_lists = st.lists(st.binary(max_size=40), max_size=6)
extensions = st.sampled_from([b"", b";a", b";a=b", b' ; q="x;y"', b"\t;z"])
trailers = st.lists(st.tuples(names, values), max_size=3)


@SETTINGS
@given(chunk_lists, extensions, trailers, st.binary(max_size=10), st.lists(st.integers(0, 500)))
def test_chunked_body_in_any_split_decodes_to_its_data(chunks, ext, fields, after, cuts):
    wire = b"".join(
        b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks if c
    ) + b"0%s\r\n%s\r\n" % (ext, b"".join(n + b": " + v + b"\r\n" for n, v in fields))
    stream = wire + after
    pieces = []
    last = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        pieces.append(stream[last:cut])
        last = cut
    pieces.append(stream[last:])
    decoder = ChunkedDecoder()
    assert feed(decoder, pieces) == (b"".join(chunks), after)
    assert decoder.done
    if not ext and not fields:
        # encode_chunk writes the same bytes, and nothing for an empty chunk.
        assert b"".join(encode_chunk(c) for c in chunks) + LAST_CHUNK == wire
