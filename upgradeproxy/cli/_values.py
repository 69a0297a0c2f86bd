"""The values of settings: seconds, counts, sizes, worker counts, on and off.

One parser per kind of value, used by the configuration file and the
command line alike, so that both accept and refuse the same things and say
so in the same words. A parser takes what a TOML file holds (numbers,
booleans, text); :func:`from_text` turns a command-line value into the same.
Each raises :class:`ValueError` whose message says what the value must be,
ready to follow the name of the key or the option.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any


def show(value: object) -> str:
    """A value as the file would spell it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(value)


def from_text(text: str) -> Any:
    """A command-line value as the file would hold it: a number, false for "off", or text."""
    if text.strip().lower() in ("off", "none"):
        return False
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_off(value: object) -> bool:
    """0 and false both mean "off" or "no limit"."""
    return value is False or (_is_number(value) and value == 0)


def seconds(value: Any) -> float:
    """A duration above 0."""
    if _is_number(value) and value > 0:
        return float(value)
    raise ValueError(f"must be a number of seconds above 0, not {show(value)}")


def seconds_or_off(value: Any) -> float | None:
    """A duration above 0, or None for 0 and false (off)."""
    if _is_off(value):
        return None
    if _is_number(value) and value > 0:
        return float(value)
    raise ValueError(
        f"must be a number of seconds above 0, or 0 or false for off, not {show(value)}"
    )


def count_or_off(value: Any) -> int | None:
    """A whole number above 0, or None for 0 and false (no limit)."""
    if _is_off(value):
        return None
    if _is_whole(value) and value > 0:
        return int(value)
    raise ValueError(
        f"must be a whole number above 0, or 0 or false for no limit, not {show(value)}"
    )


def count(value: Any) -> int:
    """A whole number above 0."""
    if _is_whole(value) and value > 0:
        return int(value)
    raise ValueError(f"must be a whole number above 0, not {show(value)}")


def rate_or_off(value: Any) -> float | None:
    """Events per second above 0, or None for 0 and false (no limit)."""
    if _is_off(value):
        return None
    if _is_number(value) and value > 0:
        return float(value)
    raise ValueError(
        f"must be a number per second above 0 (0.5: one every two seconds), "
        f"or 0 or false for no limit, not {show(value)}"
    )


def ipv6_prefix(value: Any) -> int:
    """The length of an IPv6 prefix: a whole number from 1 to 128."""
    if _is_whole(value) and 1 <= value <= 128:
        return int(value)
    raise ValueError(
        f"must be a prefix length from 1 to 128 (64: a client's /64; 128: its whole "
        f"address), not {show(value)}"
    )


def proxy_protocol_version(value: Any) -> str:
    """The PROXY protocol version to send: "v1" or "v2"."""
    if value in ("v1", "v2"):
        return str(value)
    raise ValueError(
        f'must be "v1" or "v2" (HAProxy\'s send-proxy or send-proxy-v2), not {show(value)}'
    )


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (taskset, a cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def workers(value: Any) -> int:
    """A number of processes, or "auto" for one per core this process may run on."""
    if value == "auto":
        return usable_cpus()
    if _is_whole(value) and value > 0:
        return int(value)
    raise ValueError(f'must be a number of processes (1 or more) or "auto", not {show(value)}')


def flag(value: Any) -> bool:
    """true or false."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, not {show(value)}")


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
_UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3})
_SIZE = re.compile(r"(\d+) *([a-z]*)")
#: How to write a size, for messages.
SIZE_USAGE = 'a number of bytes or text such as "32KiB" or "32KB" (KiB: 1024 bytes, KB: 1000)'


def parse_size(text: str) -> int:
    """The bytes a size such as ``"4096"``, ``"32KiB"`` or ``"10 MB"`` stands for (0 included).

    ``KiB``, ``MiB``, ``GiB`` count 1024s; ``KB``, ``MB``, ``GB`` 1000s; case does
    not matter. Raises :class:`ValueError` saying what to write.
    """
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match[2] not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write {SIZE_USAGE}")
    return int(match[1]) * _UNITS[match[2]]


def _bytes(value: Any) -> int | None:
    """A size in bytes, 0 included; None if ``value`` is not one."""
    if _is_whole(value) and value >= 0:
        return int(value)
    try:
        return parse_size(value) if isinstance(value, str) else None
    except ValueError:
        return None


def size(value: Any) -> int:
    """A size above 0."""
    found = _bytes(value)
    if not found:
        raise ValueError(f"must be a size above 0: {SIZE_USAGE}, not {show(value)}")
    return found


def size_or_off(value: Any) -> int | None:
    """A size above 0, or None for 0 and false (no limit)."""
    found = _bytes(value)
    if value is False or found == 0:
        return None
    if found is None:
        raise ValueError(
            f"must be a size: {SIZE_USAGE}; or 0 or false for no limit, not {show(value)}"
        )
    return found
