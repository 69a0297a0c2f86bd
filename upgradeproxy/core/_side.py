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
