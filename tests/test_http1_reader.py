"""HeadReader: one head at a time from a growing buffer, however the bytes are split."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import pytest
from http1_helpers import head, rejects

from upgradeproxy.http1 import HeadReader, ProtocolError, RequestHead, ResponseHead

GET = head(b"GET /a HTTP/1.1", b"Host: example.com")
POST = head(b"POST /b HTTP/1.1", b"Host: example.com", b"Content-Length: 2")
OK = head(b"HTTP/1.1 200 OK", b"Content-Length: 2")


def trickle(reader: HeadReader[Any], pieces: Iterable[bytes], buf: bytearray) -> list[Any]:
    """Append each piece to ``buf`` and read; every head the reader returns, in order."""
    heads = []
    for piece in pieces:
        buf += piece
        while (found := reader.read(buf)) is not None:
            heads.append(found)
    return heads


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize(
    ("data", "targets", "left"),
    [
        (GET, [b"/a"], b""),
        (GET + b"body", [b"/a"], b"body"),
        (GET + POST + b"ok", [b"/a", b"/b"], b"ok"),
        # RFC 9112 §2.2: empty lines before a request line are ignored.
        (b"\r\n\r\n" + GET + b"\r\n" + POST, [b"/a", b"/b"], b""),
        (b"\r\n", [], b""),
        (GET[:-2], [], GET[:-2]),
    ],
)
@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_request_heads_are_taken_off_the_buffer_and_the_rest_stays(
    data: bytes, targets: list[bytes], left: bytes, split: str
) -> None:
    reader = HeadReader.requests(1024)
    buf = bytearray()
    pieces = [data] if split == "whole" else one_byte_at_a_time(data)
    heads = trickle(reader, pieces, buf)
    assert [h.target for h in heads] == targets
    assert all(isinstance(h, RequestHead) for h in heads)
    assert bytes(buf) == left


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_a_response_head_is_taken_off_and_its_body_stays(split: str) -> None:
    reader = HeadReader.responses(1024)
    buf = bytearray()
    pieces = [OK] if split == "whole" else one_byte_at_a_time(OK)
    heads = trickle(reader, pieces, buf)
    buf += b"ok"
    assert [h.status for h in heads] == [200]
    assert isinstance(heads[0], ResponseHead)
    assert bytes(buf) == b"ok"
    # The next response on the connection is read as the first was.
    del buf[:]
    assert [h.status for h in trickle(reader, one_byte_at_a_time(OK), buf)] == [200]


def test_a_response_does_not_skip_empty_lines() -> None:
    buf = bytearray(b"\r\n" + OK)
    rejects(HeadReader.responses(1024).read, buf, status=400, mentions="malformed status line")


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_a_head_exactly_at_the_limit_is_read(split: str) -> None:
    reader = HeadReader.requests(len(GET))
    pieces = [GET] if split == "whole" else one_byte_at_a_time(GET)
    assert len(trickle(reader, pieces, bytearray())) == 1


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_a_head_over_the_limit_is_refused_as_soon_as_the_limit_is_reached(split: str) -> None:
    reader = HeadReader.requests(len(GET) - 1)
    buf = bytearray()
    with pytest.raises(ProtocolError) as info:
        trickle(reader, [GET] if split == "whole" else one_byte_at_a_time(GET), buf)
    assert info.value.status == 431
    assert len(buf) == len(GET) - (1 if split == "bytes" else 0)


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_empty_lines_count_towards_the_limit_and_the_error_names_the_whole_limit(
    split: str,
) -> None:
    reader = HeadReader.requests(len(GET) + 1)
    data = b"\r\n" + GET
    buf = bytearray()
    with pytest.raises(ProtocolError) as info:
        trickle(reader, [data] if split == "whole" else one_byte_at_a_time(data), buf)
    assert info.value.status == 431
    assert str(info.value) == f"request head larger than {len(GET) + 1} bytes"


def test_endless_empty_lines_are_refused_at_the_limit() -> None:
    reader = HeadReader.requests(64)
    buf = bytearray()
    with pytest.raises(ProtocolError) as info:
        trickle(reader, [b"\r\n"] * 40, buf)
    assert str(info.value) == "request head larger than 64 bytes"


def test_the_limit_starts_again_with_each_head() -> None:
    reader = HeadReader.requests(len(GET) + 2)
    buf = bytearray()
    assert len(trickle(reader, [b"\r\n" + GET] * 3, buf)) == 3


def test_a_malformed_head_is_refused_with_its_reason() -> None:
    buf = bytearray(b"GET / HTTP/1.1\nHost: x\r\n\r\n")
    rejects(HeadReader.requests(1024).read, buf, status=400, mentions="bare CR or LF")


@pytest.mark.parametrize(
    "filler", [b"X-Filler: " + b"a" * 200_000 + b"\r\n", b"\r\n" * 100_000], ids=["field", "crlf"]
)
def test_a_head_trickling_in_costs_linear_time(filler: bytes) -> None:
    # Quadratic rescanning of 200 kB, a byte at a time, would take minutes.
    data = filler + GET if filler.startswith(b"\r\n") else GET[:-2] + filler + b"\r\n"
    reader = HeadReader.requests(len(data) + 1)
    buf = bytearray()
    started = time.perf_counter()
    assert len(trickle(reader, one_byte_at_a_time(data), buf)) == 1
    assert time.perf_counter() - started < 5
