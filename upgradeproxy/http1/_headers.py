"""Header fields as received: order, repeats and spelling preserved.

Names are compared case-insensitively (RFC 9110 §5.1); lists are split on
commas (§5.6.1). Nothing here validates syntax: the head parser already did.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

Field = tuple[bytes, bytes]

# RFC 9110 §7.6.1 plus the fields that RFC 9112 and common practice treat as
# belonging to one connection only.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


@dataclass(frozen=True, slots=True)
class Headers:
    """An ordered sequence of ``(name, value)`` pairs, exactly as received."""

    fields: tuple[Field, ...] = ()
    # Values by lowercase name, built on the first lookup: a head is looked
    # up many times on its way through the proxy.
    _index: dict[bytes, list[bytes]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    # List elements by (lowercase name, lowercased?), split on first use: the
    # same fields (Connection, Upgrade) are split again and again otherwise.
    _lists: dict[tuple[bytes, bool], tuple[bytes, ...]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def _values(self) -> dict[bytes, list[bytes]]:
        index = self._index
        if index is None:
            index = {}
            for name, value in self.fields:
                index.setdefault(name.lower(), []).append(value)
            object.__setattr__(self, "_index", index)
        return index

    @classmethod
    def of(cls, fields: Iterable[Field]) -> Headers:
        return cls(tuple(fields))

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def get_all(self, name: bytes) -> list[bytes]:
        """Every value of the field ``name`` (lowercase), in order."""
        index = self._index
        if index is None:
            index = self._values()
        return list(index.get(name, ()))

    def get(self, name: bytes) -> bytes | None:
        """The first value of ``name`` (lowercase), or ``None``."""
        index = self._index
        if index is None:
            index = self._values()
        values = index.get(name)
        return values[0] if values else None

    def has(self, name: bytes) -> bool:
        index = self._index
        if index is None:
            index = self._values()
        return name in index

    def tokens(self, name: bytes) -> list[bytes]:
        """The comma-separated list elements of every ``name`` field, lowercased.

        Empty elements (``a, , b``) are skipped, as RFC 9110 §5.6.1 asks.
        """
        return list(self._split(name, True))

    def elements(self, name: bytes) -> list[bytes]:
        """Like :meth:`tokens`, keeping the case of each element."""
        return list(self._split(name, False))

    def _split(self, name: bytes, lower: bool) -> tuple[bytes, ...]:
        lists = self._lists
        if lists is None:
            lists = {}
            object.__setattr__(self, "_lists", lists)
        key = (name, lower)
        found = lists.get(key)
        if found is None:
            index = self._index
            if index is None:
                index = self._values()
            found = lists[key] = _list_elements(index.get(name, ()), lower)
        return found

    def without(self, names: Iterable[bytes]) -> Headers:
        """These headers less every field whose lowercase name is in ``names``."""
        drop = names if isinstance(names, frozenset) else frozenset(names)
        index = self._index
        if index is None:
            index = self._values()
        if drop.isdisjoint(index):
            return self
        return Headers(tuple(f for f in self.fields if f[0].lower() not in drop))

    def plus(self, fields: Iterable[Field]) -> Headers:
        return Headers(self.fields + tuple(fields))

    def end_to_end(self) -> Headers:
        """These headers less every hop-by-hop field (RFC 9110 §7.6.1).

        That is the fixed set of connection-specific fields, and every field
        that ``Connection`` names.
        """
        listed = self._split(b"connection", True)
        return self.without(HOP_BY_HOP.union(listed) if listed else HOP_BY_HOP)

    def serialize(self) -> bytes:
        """The field lines as HTTP/1.1 bytes, each ending with CRLF."""
        if not self.fields:
            return b""
        # Joined in C, whatever the number of fields.
        return b"\r\n".join(map(b": ".join, self.fields)) + b"\r\n"


def _list_elements(values: list[bytes] | tuple[()], lower: bool) -> tuple[bytes, ...]:
    """The non-empty elements of comma-separated list field ``values`` (RFC 9110 §5.6.1)."""
    if not values:
        return ()
    if len(values) == 1 and b"," not in values[0]:
        # The common case, one value naming one element, without the loops.
        element = values[0].strip(b" \t")
        if not element:
            return ()
        return (element.lower() if lower else element,)
    return tuple(
        element.lower() if lower else element
        for value in values
        for element in (e.strip(b" \t") for e in value.split(b","))
        if element
    )
