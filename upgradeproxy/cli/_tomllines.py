"""Where each key of a TOML document is written: the line numbers tomllib does not give.

:mod:`upgradeproxy.cli.config` names the line of every mistake it reports; this
module finds those lines. It reads only documents that tomllib accepted.
"""

from __future__ import annotations

import bisect
import re
import tomllib

#: A key's path in a document: table and key names, and array indexes.
Path = tuple[str | int, ...]
#: A bare TOML key (TOML 1.0 §Keys).
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

_BLANK = re.compile(r"(?:[ \t\r\n]|#[^\n]*)*")
_SPACE = re.compile(r"[ \t]*")
_STRING = re.compile(
    r'"""(?:[^"\\]|\\.|"{1,2}(?!"))*"{3,5}'
    r"|'''(?:[^']|'{1,2}(?!'))*'{3,5}"
    r'|"(?:[^"\\\n]|\\.)*"'
    r"|'[^'\n]*'",
    re.DOTALL,
)
#: Numbers, booleans and dates: up to the next separator.
_SCALAR = re.compile(r"[^,\]}#\n]*")


class KeyLines:
    """The line on which each table, key and array item of a TOML document is written.

    tomllib reports no positions, so this reads the text again. It only reads
    documents that tomllib accepted, so it follows TOML's structure (headers,
    dotted and quoted keys, strings, arrays, inline tables) and never checks it.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._at = 0
        self._line_starts = [0, *(match.end() for match in re.finditer("\n", text))]
        self._lines: dict[Path, int] = {}
        #: The index of the last table of each array of tables, such as ("route",).
        self._table_arrays: dict[Path, int] = {}
        self._document()

    def line(self, path: Path) -> int:
        """Where ``path`` is written; for a key not written there, where its table is."""
        while path and path not in self._lines:
            path = path[:-1]
        return self._lines.get(path, 1)

    def _line(self) -> int:
        return bisect.bisect_right(self._line_starts, self._at)

    def _consume(self, pattern: re.Pattern[str]) -> str:
        """Move past what ``pattern`` matches here, and return it."""
        match = pattern.match(self._text, self._at)
        assert match is not None, "tomllib accepted the text, so the pattern matches"
        self._at = match.end()
        return match.group()

    def _skip(self, pattern: re.Pattern[str]) -> str:
        """Move past blanks that ``pattern`` matches; return the next character ("" at the end)."""
        self._consume(pattern)
        return self._text[self._at : self._at + 1]

    def _document(self) -> None:
        table: Path = ()
        while next_char := self._skip(_BLANK):
            if next_char == "[":
                table = self._header()
            else:
                self._key_value(table)

    def _header(self) -> Path:
        line = self._line()
        array = self._text.startswith("[[", self._at)
        self._at += 2 if array else 1
        names = self._key()
        self._at += 2 if array else 1
        if not array:
            table = self._table(names, line)
        else:
            tables = (*self._table(names[:-1], line), names[-1])
            self._lines.setdefault(tables, line)
            self._table_arrays[tables] = self._table_arrays.get(tables, -1) + 1
            table = (*tables, self._table_arrays[tables])
        self._lines[table] = line
        return table

    def _table(self, names: list[str], line: int) -> Path:
        """The path of a header's keys, each array of tables standing for its last table."""
        path: Path = ()
        for name in names:
            path += (name,)
            self._lines.setdefault(path, line)
            if path in self._table_arrays:
                path += (self._table_arrays[path],)
        return path

    def _key(self) -> list[str]:
        """A dotted key's names, quoted ones decoded; stops before the "=" or "]"."""
        names = []
        while True:
            if self._skip(_SPACE) in "\"'":
                names.append(tomllib.loads(f"k = {self._consume(_STRING)}")["k"])
            else:
                names.append(self._consume(BARE_KEY))
            if self._skip(_SPACE) != ".":
                return names
            self._at += 1

    def _key_value(self, table: Path) -> None:
        line = self._line()
        path = table
        for name in self._key():
            path += (name,)
            self._lines.setdefault(path, line)
        self._at += 1  # the "="
        self._value(path)

    def _value(self, path: Path) -> None:
        first = self._skip(_SPACE)
        if first == "[":
            self._items(path, "]")
        elif first == "{":
            self._items(path, "}")
        else:
            self._consume(_STRING if first in "\"'" else _SCALAR)

    def _items(self, path: Path, end: str) -> None:
        """An array's items (numbered from 0) or an inline table's keys."""
        self._at += 1
        index = 0
        while (next_char := self._skip(_BLANK)) != end:
            if next_char == ",":
                self._at += 1
            elif end == "}":
                self._key_value(path)
            else:
                self._lines.setdefault((*path, index), self._line())
                self._value((*path, index))
                index += 1
        self._at += 1
