"""Small helpers shared by the tests of :mod:`upgradeproxy.http1`."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from upgradeproxy.http1 import BodyDecoder, ProtocolError, RequestHead, parse_request_head


def head(*lines: bytes) -> bytes:
    """A head made of ``lines``, each ended by CRLF, then the empty line."""
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def request(*lines: bytes) -> RequestHead:
    """The request head made of ``lines``, which must parse completely."""
    raw = head(*lines)
    parsed = parse_request_head(raw)
    assert parsed is not None
    assert parsed[1] == len(raw)
    return parsed[0]


def rejects(
    call: Callable[..., Any], *args: Any, status: int, mentions: str, **kwargs: Any
) -> ProtocolError:
    """Assert that ``call(*args)`` raises :class:`ProtocolError` with ``status``.

    ``mentions`` must appear in the reason (case-insensitively): the error has
    to name the rule that was broken, not only fail.
    """
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    error = info.value
    assert error.status == status, error.reason
    assert mentions.lower() in error.reason.lower(), error.reason
    return error


def feed(decoder: BodyDecoder, pieces: Iterable[bytes]) -> tuple[bytes, bytes]:
    """Feed ``pieces`` to ``decoder`` the way a protocol does.

    Each piece is appended to a buffer, the decoder takes what it uses off
    the front, and the rest waits for the next piece. Returns the decoded
    data and the bytes the decoder left in the buffer.
    """
    buf = bytearray()
    out = []
    for piece in pieces:
        buf += piece
        data, used = decoder.decode(buf)
        assert 0 <= used <= len(buf)
        out.extend(data)
        del buf[:used]
    return b"".join(out), bytes(buf)


def splits(raw: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every way of cutting ``raw`` in two."""
    for i in range(len(raw) + 1):
        yield raw[:i], raw[i:]


class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds: float = 2.0) -> Iterator[None]:
    """Fail with :class:`Hang` if the body takes longer than ``seconds``."""

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
