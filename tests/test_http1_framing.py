"""Message body framing (RFC 9112 §6) and the body decoders (§6.3, §7.1).

The framing tables follow the numbered list of RFC 9112 §6.3; every
decoder test checks both the data and how many bytes were consumed, since
whatever follows a body belongs to someone else.
"""

from __future__ import annotations

import pytest
from http1_helpers import feed, head, rejects, request, splits

from upgradeproxy.http1 import (
    LAST_CHUNK,
    NO_BODY,
    BodyKind,
    ChunkedDecoder,
    CloseDelimitedDecoder,
    Framing,
    LengthDecoder,
    ProtocolError,
    ResponseHead,
    encode_chunk,
    parse_response_head,
    request_framing,
    response_framing,
)

CHUNKED = Framing(BodyKind.CHUNKED)
CLOSE = Framing(BodyKind.CLOSE)


def length(n: int) -> Framing:
    return Framing(BodyKind.LENGTH, n)


def response(line: bytes, *fields: bytes) -> ResponseHead:
    parsed = parse_response_head(head(line, *fields))
    assert parsed is not None
    return parsed[0]


# --- Request framing (RFC 9112 §6.1, §6.3) ------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param((), NO_BODY, id="none"),
        pytest.param((b"Content-Length: 0",), NO_BODY, id="cl-0"),
        pytest.param((b"Content-Length: 10",), length(10), id="cl-10"),
        pytest.param((b"Content-Length:   10  ",), length(10), id="cl-with-ows"),
        pytest.param((b"Content-Length: 007",), length(7), id="cl-leading-zeros"),
        pytest.param(
            (b"Content-Length: 9999999999999999999",),
            length(9999999999999999999),
            id="cl-19-digits",
        ),
        pytest.param((b"Transfer-Encoding: chunked",), CHUNKED, id="chunked"),
        pytest.param((b"Transfer-Encoding: Chunked",), CHUNKED, id="chunked-any-case"),
        pytest.param((b"transfer-encoding:  chunked ",), CHUNKED, id="chunked-with-ows"),
    ],
)
def test_request_framing(fields, expected):
    # §6.3 item 4: chunked final coding -> chunked; item 6: Content-Length;
    # item 7: neither -> the request has no body.
    assert request_framing(request(b"POST / HTTP/1.1", b"Host: a", *fields)) == expected


@pytest.mark.parametrize(
    ("fields", "status", "mentions"),
    [
        pytest.param(
            (b"Content-Length: 5", b"Transfer-Encoding: chunked"),
            400,
            "both Content-Length and Transfer-Encoding",
            id="cl-and-te",
        ),
        pytest.param(
            (b"Transfer-Encoding: chunked", b"Content-Length: 5"),
            400,
            "both Content-Length and Transfer-Encoding",
            id="te-and-cl",
        ),
        pytest.param(
            (b"Content-Length: 0", b"Transfer-Encoding: chunked"),
            400,
            "both Content-Length and Transfer-Encoding",
            id="cl-0-and-te",
        ),
        pytest.param(
            (b"Content-Length: 5", b"Content-Length: 5"),
            400,
            "more than one Content-Length",
            id="duplicate-identical-cl",
        ),
        pytest.param(
            (b"Content-Length: 5", b"Content-Length: 6"),
            400,
            "more than one Content-Length",
            id="duplicate-different-cl",
        ),
        pytest.param((b"Content-Length: 1, 1",), 400, "decimal", id="cl-list"),
        pytest.param((b"Content-Length: 1,",), 400, "decimal", id="cl-trailing-comma"),
        pytest.param((b"Content-Length: +1",), 400, "decimal", id="cl-plus"),
        pytest.param((b"Content-Length: -1",), 400, "decimal", id="cl-minus"),
        pytest.param((b"Content-Length: 1 1",), 400, "decimal", id="cl-inner-space"),
        pytest.param((b"Content-Length: 0x1",), 400, "decimal", id="cl-hex"),
        pytest.param((b"Content-Length: 1.0",), 400, "decimal", id="cl-fraction"),
        pytest.param((b"Content-Length: 1e3",), 400, "decimal", id="cl-exponent"),
        pytest.param((b"Content-Length:",), 400, "decimal", id="cl-empty"),
        pytest.param((b"Content-Length: \xd9\xa1",), 400, "decimal", id="cl-arabic-indic-one"),
        pytest.param((b"Content-Length: 10000000000000000000",), 400, "decimal", id="cl-20-digits"),
        pytest.param(
            (b"Transfer-Encoding: chunked, identity",),
            400,
            "final transfer coding",
            id="te-chunked-identity",
        ),
        pytest.param(
            (b"Transfer-Encoding: xchunked",), 400, "final transfer coding", id="te-xchunked"
        ),
        pytest.param(
            (b"Transfer-Encoding: identity",), 400, "final transfer coding", id="te-identity"
        ),
        pytest.param((b"Transfer-Encoding: gzip",), 400, "final transfer coding", id="te-gzip"),
        pytest.param(
            (b"Transfer-Encoding: chunked;x=1",), 400, "final transfer coding", id="te-params"
        ),
        pytest.param(
            (b'Transfer-Encoding: "chunked"',), 400, "final transfer coding", id="te-quoted"
        ),
        pytest.param(
            (b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"),
            400,
            "final transfer coding",
            id="te-lines-end-in-gzip",
        ),
        pytest.param(
            (b"Transfer-Encoding: gzip, chunked",), 501, "single chunked", id="te-gzip-chunked"
        ),
        pytest.param(
            (b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"),
            501,
            "single chunked",
            id="te-lines-gzip-then-chunked",
        ),
        pytest.param(
            (b"Transfer-Encoding: chunked, chunked",),
            400,
            "chunked applied more than once",
            id="te-chunked-twice",
        ),
        pytest.param(
            (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
            400,
            "chunked applied more than once",
            id="te-lines-chunked-twice",
        ),
        pytest.param(
            (b"Transfer-Encoding: chunked, gzip, chunked",),
            400,
            "chunked applied more than once",
            id="te-chunked-gzip-chunked",
        ),
        pytest.param(
            (b"Transfer-Encoding: chunked,",), 400, "empty element", id="te-trailing-comma"
        ),
        pytest.param(
            (b"Transfer-Encoding: , chunked",), 400, "empty element", id="te-leading-comma"
        ),
        pytest.param((b"Transfer-Encoding:",), 400, "empty element", id="te-empty"),
    ],
)
def test_request_framing_rejects(fields, status, mentions):
    # §6.1: a sender MUST NOT send Content-Length with Transfer-Encoding, and
    # MUST NOT apply chunked more than once (so "chunked, chunked" is a broken
    # request, 400, not an unknown coding, 501); §6.3 item 3: CL with TE
    # "ought to be handled as an error"; item 4: a request whose final coding
    # is not chunked MUST get 400; item 5: an invalid Content-Length, or a list
    # of them, is unrecoverable -- even a list of identical values, which
    # RFC 9110 §8.6 lets a recipient merge, is refused here. RFC 9112 §6.1: a
    # server SHOULD answer 501 to a coding it does not understand.
    rejects(
        request_framing,
        request(b"POST / HTTP/1.1", b"Host: a", *fields),
        status=status,
        mentions=mentions,
    )


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [
        ((b"Transfer-Encoding: chunked",), "Transfer-Encoding in an HTTP/1.0 request"),
        (
            (b"Transfer-Encoding: chunked", b"Content-Length: 5"),
            "both Content-Length and Transfer-Encoding",
        ),
    ],
    ids=["te", "te-and-cl"],
)
def test_transfer_encoding_in_an_http_1_0_request_is_400(fields, mentions):
    # §6.1: a server that receives an HTTP/1.0 message with Transfer-Encoding
    # MUST treat its framing as faulty, even with a Content-Length.
    rejects(request_framing, request(b"POST / HTTP/1.0", *fields), status=400, mentions=mentions)


def test_content_length_in_an_http_1_0_request():
    assert request_framing(request(b"POST / HTTP/1.0", b"Content-Length: 3")) == length(3)


# --- Response framing (RFC 9112 §6.3 items 1-2, 4, 6, 8) ----------------------


@pytest.mark.parametrize(
    ("method", "line", "fields", "expected"),
    [
        pytest.param(b"HEAD", b"HTTP/1.1 200 OK", (b"Content-Length: 10",), NO_BODY, id="head"),
        pytest.param(
            b"HEAD", b"HTTP/1.1 200 OK", (b"Transfer-Encoding: chunked",), NO_BODY, id="head-te"
        ),
        pytest.param(b"HEAD", b"HTTP/1.1 404 No", (), NO_BODY, id="head-404"),
        pytest.param(b"GET", b"HTTP/1.1 100 Continue", (), NO_BODY, id="100"),
        pytest.param(
            b"GET", b"HTTP/1.1 101 Switching", (b"Content-Length: 5",), NO_BODY, id="101-with-cl"
        ),
        pytest.param(b"GET", b"HTTP/1.1 103 Early Hints", (), NO_BODY, id="103"),
        pytest.param(b"GET", b"HTTP/1.1 199 x", (), NO_BODY, id="199"),
        pytest.param(
            b"GET", b"HTTP/1.1 204 No Content", (b"Content-Length: 5",), NO_BODY, id="204"
        ),
        pytest.param(
            b"GET", b"HTTP/1.1 304 Not Modified", (b"Content-Length: 5",), NO_BODY, id="304"
        ),
        pytest.param(
            b"GET",
            b"HTTP/1.1 304 Not Modified",
            (b"Transfer-Encoding: chunked",),
            NO_BODY,
            id="304-te",
        ),
        pytest.param(b"CONNECT", b"HTTP/1.1 200 OK", (), NO_BODY, id="connect-200"),
        pytest.param(
            b"CONNECT",
            b"HTTP/1.1 299 x",
            (b"Content-Length: 5",),
            NO_BODY,
            id="connect-2xx-ignores-cl",
        ),
        pytest.param(
            b"CONNECT", b"HTTP/1.1 407 Auth", (b"Content-Length: 5",), length(5), id="connect-407"
        ),
        pytest.param(b"CONNECT", b"HTTP/1.1 300 x", (), CLOSE, id="connect-3xx-close"),
        pytest.param(b"GET", b"HTTP/1.1 200 OK", (b"Content-Length: 5",), length(5), id="cl"),
        pytest.param(b"GET", b"HTTP/1.1 200 OK", (b"Content-Length: 0",), NO_BODY, id="cl-0"),
        pytest.param(b"POST", b"HTTP/1.1 205 Reset", (b"Content-Length: 0",), NO_BODY, id="205"),
        pytest.param(
            b"GET", b"HTTP/1.1 200 OK", (b"Transfer-Encoding: chunked",), CHUNKED, id="chunked"
        ),
        pytest.param(
            b"GET",
            b"HTTP/1.1 200 OK",
            (b"Transfer-Encoding: gzip, chunked",),
            CHUNKED,
            id="gzip-chunked",
        ),
        pytest.param(b"GET", b"HTTP/1.1 200 OK", (), CLOSE, id="close-delimited"),
        pytest.param(b"GET", b"HTTP/1.0 200 OK", (), CLOSE, id="http-1.0-close-delimited"),
        pytest.param(
            b"GET", b"HTTP/1.1 200 OK", (b"Transfer-Encoding: gzip",), CLOSE, id="te-gzip"
        ),
        pytest.param(
            b"GET",
            b"HTTP/1.1 200 OK",
            (b"Transfer-Encoding: chunked, gzip",),
            CLOSE,
            id="te-chunked-gzip",
        ),
        pytest.param(b"GET", b"HTTP/1.1 500 Oops", (b"Content-Length: 2",), length(2), id="500"),
    ],
)
def test_response_framing(method, line, fields, expected):
    # §6.3 item 1: HEAD, 1xx, 204 and 304 responses end at the head; item 2:
    # a 2xx to CONNECT switches to a tunnel; item 4: in a response, TE whose
    # final coding is not chunked is read until close; item 8: no length at
    # all means close-delimited.
    assert response_framing(response(line, *fields), method) == expected


@pytest.mark.parametrize(
    ("fields", "status", "mentions"),
    [
        pytest.param(
            (b"Content-Length: 5", b"Transfer-Encoding: chunked"),
            400,
            "both Content-Length and Transfer-Encoding",
            id="cl-and-te",
        ),
        pytest.param(
            (b"Content-Length: 5", b"Content-Length: 5"),
            502,
            "more than one Content-Length",
            id="duplicate-cl",
        ),
        pytest.param((b"Content-Length: 1, 1",), 502, "decimal", id="cl-list"),
        pytest.param((b"Content-Length: -1",), 502, "decimal", id="cl-minus"),
        pytest.param((b"Transfer-Encoding: chunked,",), 502, "empty element", id="te-empty"),
    ],
)
def test_response_framing_rejects(fields, status, mentions):
    # §6.3 item 3 (CL with TE "ought to be handled as an error") and item 5
    # (invalid Content-Length: the response is unrecoverable). Whatever the
    # status, the proxy answers 502 to a bad backend; the reason is what counts.
    rejects(
        response_framing,
        response(b"HTTP/1.1 200 OK", *fields),
        b"GET",
        status=status,
        mentions=mentions,
    )


@pytest.mark.parametrize(
    ("framing", "kind"),
    [
        (length(3), LengthDecoder),
        (CHUNKED, ChunkedDecoder),
        (CLOSE, CloseDelimitedDecoder),
        (NO_BODY, LengthDecoder),
    ],
    ids=["length", "chunked", "close", "none"],
)
def test_framing_makes_the_matching_decoder(framing, kind):
    decoder = framing.decoder()
    assert type(decoder) is kind
    assert decoder.done is (framing is NO_BODY)
    assert framing.decoder() is not decoder


# --- LengthDecoder -------------------------------------------------------------


def test_length_decoder_takes_exactly_its_length():
    decoder = LengthDecoder(5)
    assert decoder.decode(b"hel") == ([b"hel"], 3)
    assert not decoder.done
    assert decoder.decode(b"lo, GET / HTTP/1.1") == ([b"lo"], 2)
    assert decoder.done
    assert decoder.decode(b", GET / HTTP/1.1") == ([], 0)
    decoder.eof()


def test_length_decoder_in_every_split():
    body = b"0123456789"
    for first, second in splits(body + b"NEXT"):
        assert feed(LengthDecoder(10), [first, second]) == (body, b"NEXT")


def test_length_decoder_empty_input():
    decoder = LengthDecoder(2)
    assert decoder.decode(b"") == ([], 0)
    assert decoder.decode(bytearray(b"ab")) == ([b"ab"], 2)


def test_zero_length_is_done_from_the_start():
    decoder = LengthDecoder(0)
    assert decoder.done
    assert decoder.decode(b"next") == ([], 0)
    decoder.eof()


def test_length_decoder_eof_before_the_end():
    # RFC 9112 §8: a message whose body is cut short is incomplete.
    decoder = LengthDecoder(5)
    decoder.decode(b"abc")
    rejects(decoder.eof, status=400, mentions="closed before the end of the body")


# --- CloseDelimitedDecoder -----------------------------------------------------


def test_close_delimited_takes_everything_until_eof():
    decoder = CloseDelimitedDecoder()
    assert decoder.decode(b"abc") == ([b"abc"], 3)
    assert decoder.decode(bytearray(b"\r\n0\r\n\r\n")) == ([b"\r\n0\r\n\r\n"], 7)
    assert decoder.decode(b"") == ([], 0)
    assert not decoder.done
    decoder.eof()
    assert decoder.done


# --- ChunkedDecoder (RFC 9112 §7.1) -------------------------------------------

VALID_CHUNKED = [
    pytest.param(b"5\r\nhello\r\n0\r\n\r\n", b"hello", id="one-chunk"),
    pytest.param(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world", id="two-chunks"),
    pytest.param(b"0\r\n\r\n", b"", id="no-chunks"),
    pytest.param(b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", id="uppercase-hex"),
    pytest.param(b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789", id="lowercase-hex"),
    pytest.param(b"005\r\nhello\r\n000\r\n\r\n", b"hello", id="leading-zeros"),
    pytest.param(b"0000000000000005\r\nhello\r\n0\r\n\r\n", b"hello", id="sixteen-hex-digits"),
    pytest.param(b"5;name=value\r\nhello\r\n0;last\r\n\r\n", b"hello", id="extensions"),
    pytest.param(b"5 ; a=b ;c\r\nhello\r\n0\t;x\r\n\r\n", b"hello", id="extensions-with-bws"),
    pytest.param(b'5;a="x;\\"y"\r\nhello\r\n0\r\n\r\n', b"hello", id="quoted-extension"),
    pytest.param(b"5\r\nhello\r\n0\r\nExpires: never\r\nX-Sum: 1\r\n\r\n", b"hello", id="trailers"),
    pytest.param(b"0\r\nX-Empty:\r\n\r\n", b"", id="empty-trailer-value"),
    pytest.param(b"2\r\n\r\n\r\n0\r\n\r\n", b"\r\n", id="data-that-is-crlf"),
    pytest.param(b"5\r\n0\r\n\r\n\r\n0\r\n\r\n", b"0\r\n\r\n", id="data-that-looks-like-the-end"),
]


@pytest.mark.parametrize(("body", "data"), VALID_CHUNKED)
@pytest.mark.parametrize(
    "after",
    [b"", b"GET / HTTP/1.1\r\n", b"\r\n", b"0\r\n\r\n"],
    ids=["end", "next", "crlf", "more"],
)
def test_chunked_decodes_and_leaves_what_follows(body, data, after):
    # Extensions and trailers are dropped; the last-chunk and the empty line
    # after the trailers end the body, and not one byte more is consumed.
    decoder = ChunkedDecoder()
    out, used = decoder.decode(body + after)
    assert b"".join(out) == data
    assert used == len(body)
    assert decoder.done
    assert decoder.decode(after) == ([], 0)
    decoder.eof()


@pytest.mark.parametrize(("body", "data"), VALID_CHUNKED)
def test_chunked_in_every_split_and_byte_by_byte(body, data):
    stream = body + b"NEXT"
    for first, second in splits(stream):
        decoder = ChunkedDecoder()
        assert feed(decoder, [first, second]) == (data, b"NEXT")
        assert decoder.done
    decoder = ChunkedDecoder()
    assert feed(decoder, [stream[i : i + 1] for i in range(len(stream))]) == (data, b"NEXT")
    assert decoder.done


def test_chunked_returns_data_as_it_arrives():
    decoder = ChunkedDecoder()
    assert decoder.decode(b"a\r\n01234") == ([b"01234"], 8)
    assert not decoder.done
    assert decoder.decode(b"56789\r") == ([b"56789"], 5)
    assert decoder.decode(b"\r\n0\r\n") == ([], 5)
    assert not decoder.done
    rejects(decoder.eof, status=400, mentions="closed before the end of the body")
    assert decoder.decode(b"\r\nrest") == ([], 2)
    assert decoder.done


INVALID_CHUNKED = [
    pytest.param(b"1;" + b"x" * 4095 + b"\r\nx\r\n", "chunk-size line longer than 4096", id="long"),
    pytest.param(b"1" + b" " * 5000, "chunk-size line longer than 4096", id="long-no-crlf"),
    pytest.param(b"00000000000000005\r\nhello\r\n", "malformed chunk-size line", id="17-digits"),
    pytest.param(b"10000000000000000\r\n", "malformed chunk-size line", id="over-64-bits"),
    pytest.param(b"\r\n", "malformed chunk-size line", id="empty-size"),
    pytest.param(b"0x5\r\nhello\r\n", "malformed chunk-size line", id="0x-prefix"),
    pytest.param(b"-5\r\nhello\r\n", "malformed chunk-size line", id="negative"),
    pytest.param(b"+5\r\nhello\r\n", "malformed chunk-size line", id="plus"),
    pytest.param(b" 5\r\nhello\r\n", "malformed chunk-size line", id="leading-space"),
    pytest.param(b"5 x\r\nhello\r\n", "malformed chunk-size line", id="junk-after-size"),
    pytest.param(b"5 \r\nhello\r\n", "malformed chunk-size line", id="bws-without-extension"),
    pytest.param(b"5\t\r\nhello\r\n", "malformed chunk-size line", id="tab-without-extension"),
    pytest.param(b"g\r\n", "malformed chunk-size line", id="not-hex"),
    pytest.param(b";x\r\n", "malformed chunk-size line", id="only-extension"),
    pytest.param(b"5;a\x00\r\nhello\r\n", "malformed chunk-size line", id="nul-in-extension"),
    pytest.param(b"5\r;a\r\nhello\r\n", "malformed chunk-size line", id="bare-cr-in-size-line"),
    pytest.param(b"3\nabc\r\n", "bare LF in chunk-size line", id="bare-lf-size-line"),
    pytest.param(b"3;x\nabc\r\n0\r\n\r\n", "bare LF in chunk-size line", id="bare-lf-extension"),
    pytest.param(b"3\r\nabc\n0\r\n\r\n", "chunk data not followed by CRLF", id="lf-after-data"),
    pytest.param(b"3\r\nabcX\r\n", "chunk data not followed by CRLF", id="junk-after-data"),
    pytest.param(b"3\r\nabcd\r\n", "chunk data not followed by CRLF", id="data-too-long"),
    pytest.param(b"3\r\nabc\rX", "chunk data not followed by CRLF", id="cr-then-junk"),
    pytest.param(b"3\r\nabc\r\r\n", "chunk data not followed by CRLF", id="cr-cr-lf"),
    pytest.param(b"3\r\nabcX\n0\r\n\r\n", "chunk data not followed by CRLF", id="junk-lf"),
    pytest.param(b"3\r\nabc\n\n0\r\n\r\n", "chunk data not followed by CRLF", id="lf-lf"),
    pytest.param(b"0\r\nX: a\n\r\n", "bare LF in trailer field", id="bare-lf-trailer"),
    pytest.param(b"0\r\n\n", "bare LF in trailer field", id="bare-lf-ends-trailers"),
    pytest.param(b"0\r\nX : a\r\n\r\n", "malformed trailer field", id="space-before-colon"),
    pytest.param(b"0\r\nX: a\r\n b\r\n\r\n", "malformed trailer field", id="obs-fold"),
    pytest.param(b"0\r\nX: a\x00\r\n\r\n", "malformed trailer field", id="nul-in-trailer"),
    pytest.param(b"0\r\nX: a\rb\r\n\r\n", "malformed trailer field", id="bare-cr-in-trailer"),
    pytest.param(b"0\r\nno colon\r\n\r\n", "malformed trailer field", id="no-colon"),
    pytest.param(b"0\r\nX: " + b"a" * 5000, "trailer field longer than 4096", id="long-trailer"),
]


@pytest.mark.parametrize(("body", "mentions"), INVALID_CHUNKED)
def test_chunked_rejects(body, mentions):
    rejects(ChunkedDecoder().decode, body, status=400, mentions=mentions)


@pytest.mark.parametrize(("body", "mentions"), INVALID_CHUNKED)
def test_chunked_rejects_byte_by_byte_too(body, mentions):
    # However the bytes arrive, the error is the same, and it comes no later
    # than the byte that makes the input invalid.
    decoder = ChunkedDecoder()
    with pytest.raises(ProtocolError) as info:
        feed(decoder, [body[i : i + 1] for i in range(len(body))])
    assert mentions.lower() in info.value.reason.lower()


def test_chunk_size_line_exactly_at_the_limit():
    line = b"1;" + b"x" * (ChunkedDecoder.MAX_LINE - 2)
    assert len(line) == ChunkedDecoder.MAX_LINE
    body = line + b"\r\nz\r\n0\r\n\r\n"
    assert feed(ChunkedDecoder(), [body]) == (b"z", b"")
    # Regression: with the CR of a line of MAX_LINE bytes in one read and its
    # LF in the next, the line used to be refused as too long.
    for first, second in splits(body):
        assert feed(ChunkedDecoder(), [first, second]) == (b"z", b"")


def test_trailer_section_budget():
    # The budget counts every trailer line with its CRLF, and the final CRLF.
    trailers = b"X: " + b"a" * 15 + b"\r\n" + b"\r\n"
    assert len(trailers) == 22
    decoder = ChunkedDecoder(max_trailer_size=22)
    assert feed(decoder, [b"0\r\n" + trailers + b"next"]) == (b"", b"next")
    assert decoder.done
    rejects(
        ChunkedDecoder(max_trailer_size=21).decode,
        b"0\r\n" + trailers,
        status=400,
        mentions="trailer section too large",
    )


def test_default_trailer_budget_is_16_kib():
    many = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(17))
    rejects(
        ChunkedDecoder().decode,
        b"0\r\n" + many + b"\r\n",
        status=400,
        mentions="trailer section too large",
    )


def test_chunked_eof_before_the_last_chunk():
    for cut in [b"", b"5", b"5\r\n", b"5\r\nhel", b"5\r\nhello\r\n", b"0\r\n", b"0\r\nX: y\r\n"]:
        decoder = ChunkedDecoder()
        decoder.decode(cut)
        rejects(decoder.eof, status=400, mentions="closed before the end of the body")


def test_huge_chunk_size_is_read_as_a_number():
    decoder = ChunkedDecoder()
    assert decoder.decode(b"ffffffffffffffff\r\nabc") == ([b"abc"], 21)
    assert not decoder.done


# --- Writing chunks ------------------------------------------------------------


def test_encode_chunk():
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_an_empty_chunk_is_not_written():
    # Regression: encode_chunk(b"") was "0\r\n\r\n", the last-chunk, which
    # ends the body early and turns the rest into a smuggled message.
    assert encode_chunk(b"") == b""


def test_encoded_chunks_round_trip_through_the_decoder():
    payloads = [b"a", b"", b"hello", bytes(range(256)), b"\r\n0\r\n\r\n", b"", b"x" * 0x1234]
    wire = b"".join(encode_chunk(p) for p in payloads) + LAST_CHUNK
    decoder = ChunkedDecoder()
    assert feed(decoder, [wire + b"NEXT"]) == (b"".join(payloads), b"NEXT")
    assert decoder.done


def test_a_chunked_body_keeps_its_trailer_fields_as_received() -> None:
    decoder = ChunkedDecoder()
    raw = bytearray(b"2\r\nok\r\n0\r\nGrpc-Status: 0\r\nX-Sum:  ab \r\n\r\n")
    chunks, used = decoder.decode(raw)
    assert (chunks, used, decoder.done) == ([b"ok"], len(raw), True)
    assert decoder.trailers == ((b"Grpc-Status", b"0"), (b"X-Sum", b"ab"))
    assert ChunkedDecoder().trailers == ()
