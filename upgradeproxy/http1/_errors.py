"""The one error type of the HTTP/1.1 module."""

from __future__ import annotations


class ProtocolError(Exception):
    """Bytes that break HTTP/1.1, with a reason a person can read.

    ``status`` is the response a server should give when the bytes came from
    a client (400, 431, 501 or 505). When they came from a backend the proxy
    answers ``502`` whatever ``status`` says, and keeps ``reason``.
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
