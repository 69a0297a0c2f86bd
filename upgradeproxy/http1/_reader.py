"""Reading one head at a time from a buffer that grows as bytes arrive.

A :class:`HeadReader` keeps what a connection must remember between reads
to find a head without searching the same bytes twice: how far the search
got, and how many empty lines it dropped before a request (they count
towards the head's size limit). It never touches a socket; the buffer is
its owner's, and the reader only removes the head it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from ._errors import ProtocolError
from ._heads import RequestHead, ResponseHead, parse_request_head, parse_response_head

Head = TypeVar("Head", RequestHead, ResponseHead)
_Parse = Callable[[bytearray, int, int, int], "tuple[Head, int] | None"]


class HeadReader(Generic[Head]):
    """Finds the next head at the start of a buffer, in linear time however it trickles in.

    Use :meth:`requests` or :meth:`responses` to make one.
    """

    __slots__ = ("_checked", "_max_size", "_parse", "_skip_empty_lines", "_skipped")

    def __init__(
        self,
        parse: _Parse[Head],
        max_size: int,
        *,
        skip_empty_lines: bool = False,
    ) -> None:
        self._parse: _Parse[Head] = parse
        self._max_size = max_size
        self._skip_empty_lines = skip_empty_lines
        # How much of the buffer was searched for a head end already.
        self._checked = 0
        # Bytes of empty lines dropped before the head now awaited.
        self._skipped = 0

    @staticmethod
    def requests(max_size: int) -> HeadReader[RequestHead]:
        """A reader of request heads of at most ``max_size`` bytes.

        Empty lines before a request are dropped (RFC 9112 §2.2 lets a server
        ignore them) and count towards its ``max_size``.
        """
        return HeadReader(parse_request_head, max_size, skip_empty_lines=True)

    @staticmethod
    def responses(max_size: int) -> HeadReader[ResponseHead]:
        """A reader of response heads of at most ``max_size`` bytes."""
        return HeadReader(parse_response_head, max_size)

    def read(self, buf: bytearray) -> Head | None:
        """The head at the start of ``buf``, removed from it; None until it is complete.

        ``buf`` must be the same buffer, only appended to, from one call to the
        next until a head comes. Raises :class:`ProtocolError` for a malformed
        head, and for one over the size limit as soon as that many bytes came.
        """
        if self._skip_empty_lines and buf.startswith(b"\r\n"):
            self._drop_empty_lines(buf)
        try:
            parsed = self._parse(buf, 0, self._max_size - self._skipped, self._checked)
        except ProtocolError as e:
            if e.status == 431 and self._skipped:
                # The limit given to the parser was shortened by the empty lines.
                raise ProtocolError(f"request head larger than {self._max_size} bytes", 431) from e
            raise
        if parsed is None:
            self._checked = len(buf)
            return None
        head, end = parsed
        del buf[:end]
        self._checked = 0
        self._skipped = 0
        return head

    def _drop_empty_lines(self, buf: bytearray) -> None:
        # Dropped here, once, rather than skipped by every parse: a client
        # that trickles empty lines would otherwise cost quadratic time.
        start = 0
        while buf.startswith(b"\r\n", start):
            start += 2
        del buf[:start]
        self._checked = max(0, self._checked - start)
        self._skipped += start
