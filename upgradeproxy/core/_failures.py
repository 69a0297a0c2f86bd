"""How a connection ended, in a few words for the log."""

from __future__ import annotations

from twisted.internet import error
from twisted.python.failure import Failure


def describe_close(reason: Failure) -> str:
    """A few words saying how a connection ended, for the log."""
    # isinstance, not Failure.check: this runs twice for every tunnel, and
    # check() computes the qualified names of the whole class hierarchy.
    value = reason.value
    if isinstance(value, error.ConnectionDone):
        return "closed"
    if isinstance(value, error.ConnectionLost):
        return "connection lost (reset)"
    return reason.getErrorMessage()
