"""At most one log line per client address per interval, in bounded memory.

A client that fails over and over (a TLS handshake, a limit) must not fill
the log: :class:`LogWindows` says whether a line may be written now, and
what the line should add about those that were not. It remembers at most
``addresses`` addresses; when that many have had a line within the interval,
events from other addresses are only counted, and the next line says how
many. Pure: the caller gives the time and writes the line.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class _Window:
    """One address's current interval: when it began, and the lines not logged since."""

    start: float
    unlogged: int = 0


class LogWindows:
    """Decides which events get a log line: one per address per ``interval`` seconds."""

    def __init__(self, *, interval: float = 60.0, addresses: int = 1024) -> None:
        self._interval = interval
        self._capacity = addresses
        # In the order their windows began: the oldest is the first to go.
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._elsewhere = 0

    def __len__(self) -> int:
        return len(self._windows)

    def note(self, address: str, now: float) -> str | None:
        """An event from ``address`` at ``now``: None when it gets no line, else the line's notes.

        The notes (``""`` when there is nothing to add) say how many events
        from this address, and from addresses not remembered, were not logged.
        """
        window = self._windows.get(address)
        if window is not None and now - window.start < self._interval:
            window.unlogged += 1
            return None
        unlogged = 0
        if window is not None:
            unlogged = window.unlogged
            del self._windows[address]
        elif not self._make_room(now):
            self._elsewhere += 1
            return None
        self._windows[address] = _Window(now)
        notes = ""
        if unlogged:
            notes += f"; {unlogged} more from this address not logged"
        if self._elsewhere:
            notes += f"; {self._elsewhere} from other addresses not logged"
            self._elsewhere = 0
        return notes

    def _make_room(self, now: float) -> bool:
        """Forget the oldest address if the table is full and its window is over."""
        if len(self._windows) < self._capacity:
            return True
        oldest = next(iter(self._windows.values()))
        if now - oldest.start < self._interval:
            return False
        self._windows.popitem(last=False)
        return True
