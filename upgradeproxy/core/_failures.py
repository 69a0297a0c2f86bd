"""How a connection ended, in a few words for the log."""

from __future__ import annotations

from twisted.internet import error
from twisted.python.failure import Failure


def describe_close(reason: Failure) -> str:
    """A few words saying how a connection ended, for the log."""
    if reason.check(error.ConnectionDone):
        return "closed"
    if reason.check(error.ConnectionLost):
        return "connection lost (reset)"
    return reason.getErrorMessage()
