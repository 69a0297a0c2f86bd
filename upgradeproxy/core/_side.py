"""The two sides of a tunnel."""

from __future__ import annotations

import enum


class Side(enum.Enum):
    """One of the two connections of a tunnel."""

    CLIENT = "client"
    BACKEND = "backend"

    # Members are singletons, so identity hashing is right, and it is done in
    # C: Enum's own __hash__ is Python code, run for every chunk a tunnel
    # moves (the per-side dicts of byte counts and transports).
    __hash__ = object.__hash__

    @property
    def peer(self) -> Side:
        return Side.BACKEND if self is Side.CLIENT else Side.CLIENT


class ByteCounts:
    """Bytes sent from each side, looked up by :class:`Side` like a dict.

    Two slots rather than a dict: every tunnel keeps one for its whole life,
    and a dict of two entries costs about 200 bytes more.
    """

    __slots__ = ("backend", "client")

    def __init__(self) -> None:
        self.client = 0
        self.backend = 0

    def __getitem__(self, side: Side) -> int:
        return self.client if side is Side.CLIENT else self.backend

    def __setitem__(self, side: Side, count: int) -> None:
        if side is Side.CLIENT:
            self.client = count
        else:
            self.backend = count

    def add(self, side: Side, count: int) -> None:
        """Count ``count`` more bytes from ``side``: one call per chunk, not two."""
        if side is Side.CLIENT:
            self.client += count
        else:
            self.backend += count

    def items(self) -> tuple[tuple[Side, int], tuple[Side, int]]:
        return ((Side.CLIENT, self.client), (Side.BACKEND, self.backend))
