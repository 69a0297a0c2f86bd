"""The two ways the proxy handles its delayed calls: moving one that runs, and cancelling one."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


def rearm(
    clock: IReactorTime, timer: IDelayedCall | None, seconds: float, call: Callable[[], object]
) -> IDelayedCall:
    """``timer`` moved to fire ``seconds`` from now if it still runs, else a new call of ``call``.

    Moving a running timer costs far less than cancelling it and making
    another, which a timer set again on every request would do.
    """
    if timer is not None and timer.active():
        timer.reset(seconds)
        return timer
    return clock.callLater(seconds, call)


def cancel(timer: IDelayedCall | None) -> None:
    """Cancel ``timer`` if it has not fired (or been cancelled) yet."""
    if timer is not None and timer.active():
        timer.cancel()
