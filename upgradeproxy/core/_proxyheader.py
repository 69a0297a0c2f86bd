"""The PROXY protocol header (HAProxy's, versions 1 and 2), as bytes in and data out.

A load balancer that forwards TCP connections puts one header in front of
the client's bytes to say who the client is: version 1 is one text line,
version 2 a binary block. This module parses such a header from the start
of a buffer, returning the addresses and the exact offset of the first
byte after it (what follows belongs to the client, and is never lost), and
builds headers for backends that want one. No sockets, no reactor.

Parsing is strict, as the specification asks: a header that is not exactly
right is an error, never guessed at. The specification is
https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt; the section
numbers below are its.

- v1 (§2.1): ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n``, or
  ``PROXY UNKNOWN`` followed by anything up to ``\\r\\n``; at most 107 bytes.
  Addresses are checked for their family, ports are decimal 0-65535 without
  leading zeros, and fields are separated by exactly one space.
- v2 (§2.2): the 12-byte signature, version 2, command ``LOCAL`` or
  ``PROXY``, a family and protocol, a length, and an address block (TLVs
  after the addresses are skipped). ``LOCAL`` (the balancer's own health
  checks) and families other than TCP over IPv4 or IPv6 (``UNSPEC``, UNIX,
  UDP) carry no client address: the connection's own is used (§2.2: "the
  receiver must ... use the real connection endpoints").
- A header longer than :data:`MAX_HEADER` bytes is refused: the bound is on
  what is held before anything else happens.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import struct
from collections.abc import Hashable
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from zope.interface import implementer

#: The signature a v2 header starts with (§2.2).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
#: The longest v1 line, CRLF included (§2.1).
V1_MAX = 107
#: The longest header accepted (v2 TLVs included).
MAX_HEADER = 4096
#: The versions a route can send to its backends.
VERSIONS = ("v1", "v2")

_PORT = rb"(0|[1-9][0-9]{0,4})"
_V1_LINE = re.compile(
    rb"PROXY (?:(TCP4|TCP6) ([0-9A-Fa-f.:]+) ([0-9A-Fa-f.:]+) " + _PORT + rb" " + _PORT
    + rb"|UNKNOWN(?: [^\r\n]*)?)\r\n"
)  # fmt: skip

_LOCAL, _PROXY = 0x0, 0x1
_TCP4, _TCP6 = 0x11, 0x21
_ADDRESS_BLOCK = {_TCP4: struct.Struct("!4s4sHH"), _TCP6: struct.Struct("!16s16sHH")}

Address = IPv4Address | IPv6Address
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class HeaderError(ValueError):
    """Bytes that are not a correct PROXY protocol header; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header: the client's addresses (None when it names none), and its length."""

    #: The client's address and port, as the balancer saw them; None for
    #: ``LOCAL``, ``UNKNOWN`` and families without one.
    source: Address | None
    #: The address the client connected to (the balancer's).
    destination: Address | None
    #: Bytes the header took: the client's own bytes start there.
    length: int
    #: 1 or 2.
    version: int


@implementer(IAddress)
@dataclass(frozen=True, slots=True)
class ProxiedAddress:
    """The peer of a connection that came through a load balancer speaking the PROXY protocol.

    A factory behind :class:`~upgradeproxy.core.proxyprotocol.ProxyProtocolFactory`
    gets one in ``buildProtocol``: ``host`` and ``port`` are the client's
    (as on Twisted's own addresses), ``destination`` is what the client
    connected to, and ``balancer`` the address the connection really came from.
    """

    source: Address
    destination: Address | None
    balancer: object

    @property
    def host(self) -> str:
        return self.source.host

    @property
    def port(self) -> int:
        return self.source.port


def parse(data: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes are needed.

    Raises :class:`HeaderError` as soon as the bytes cannot become a
    correct header (so a client speaking HTTP is refused at its first bytes,
    not after a timeout).
    """
    if not data:
        return None
    if data[:1] == b"\r":
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    if not data.startswith(_V1_PREFIX[: len(data)]):
        raise HeaderError(f"it does not start with a PROXY protocol header (it sent {_show(data)})")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise HeaderError(f"its PROXY protocol v1 line is longer than {V1_MAX} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise HeaderError("its PROXY protocol v1 line does not end with CRLF")
        return None
    line = bytes(data[: end + 2])
    match = _V1_LINE.fullmatch(line)
    if match is None:
        raise HeaderError(f"its PROXY protocol v1 line is malformed: {_show(line)}")
    family, source, destination, source_port, destination_port = match.groups()
    if family is None:
        return ProxyHeader(None, None, len(line), 1)
    kind = IPv4Address if family == b"TCP4" else IPv6Address
    return ProxyHeader(
        _v1_address(kind, source, source_port),
        _v1_address(kind, destination, destination_port),
        len(line),
        1,
    )


def _v1_address(kind: type[Address], host: bytes, port: bytes) -> Address:
    text = host.decode("ascii")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise HeaderError(f"its PROXY protocol v1 line has a malformed address {text!r}") from None
    expected = 4 if kind is IPv4Address else 6
    if ip.version != expected:
        raise HeaderError(f"its PROXY protocol v1 line says TCP{expected} but has {text!r}")
    number = int(port)
    if number > 65535:
        raise HeaderError(f"its PROXY protocol v1 line has port {number}, above 65535")
    return kind("TCP", str(ip), number)


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    if not V2_SIGNATURE.startswith(bytes(data[:12])):
        raise HeaderError(f"it does not start with a PROXY protocol header (it sent {_show(data)})")
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise HeaderError(f"its PROXY protocol v2 header says version {version}")
    if command not in (_LOCAL, _PROXY):
        raise HeaderError(f"its PROXY protocol v2 header has unknown command {command:#x}")
    family = data[13]
    length = 16 + int.from_bytes(data[14:16], "big")
    if length > MAX_HEADER:
        raise HeaderError(f"its PROXY protocol v2 header is longer than {MAX_HEADER} bytes")
    if len(data) < length:
        return None
    block = _ADDRESS_BLOCK.get(family)
    if command == _LOCAL or block is None:
        return ProxyHeader(None, None, length, 2)
    if length - 16 < block.size:
        raise HeaderError(
            f"its PROXY protocol v2 header is too short for its addresses ({length - 16} bytes)"
        )
    source, destination, source_port, destination_port = block.unpack_from(data, 16)
    kind, af = (IPv4Address, socket.AF_INET) if family == _TCP4 else (IPv6Address, socket.AF_INET6)
    return ProxyHeader(
        kind("TCP", socket.inet_ntop(af, source), source_port),
        kind("TCP", socket.inet_ntop(af, destination), destination_port),
        length,
        2,
    )


def _show(data: bytes | bytearray) -> str:
    return repr(bytes(data[:24])) + ("..." if len(data) > 24 else "")


# -- sending ------------------------------------------------------------------------------


def _ip(address: Address) -> _IP:
    return ipaddress.ip_address(address.host.split("%", 1)[0])


def _same_family(source: Address, destination: Address) -> tuple[_IP, _IP]:
    """Both addresses in one family: IPv4 becomes IPv4-mapped IPv6 when the other is IPv6."""
    a, b = _ip(source), _ip(destination)
    if a.version != b.version:
        a, b = (ipaddress.IPv6Address(f"::ffff:{x}") if x.version == 4 else x for x in (a, b))
    return a, b


def encode(version: str, source: object | None, destination: object | None) -> bytes:
    """The header to send first to a backend for a client at ``source``.

    Cached for addresses that can be (Twisted's are immutable and hashable):
    a keep-alive client connection asks for its header on every request.

    ``version`` is ``"v1"`` or ``"v2"``. Without a TCP ``source`` and
    ``destination`` (a UNIX socket's client, the proxy's own health check),
    the header says so: ``PROXY UNKNOWN`` in v1, the ``LOCAL`` command in v2.
    """
    if isinstance(source, Hashable) and isinstance(destination, Hashable):
        return _cached(version, source, destination)
    return _encode(version, source, destination)


def _encode(version: str, source: object | None, destination: object | None) -> bytes:
    if isinstance(source, ProxiedAddress):
        source = source.source
    if not isinstance(source, Address) or not isinstance(destination, Address):
        return b"PROXY UNKNOWN\r\n" if version == "v1" else _v2(_LOCAL, 0x00, b"")
    a, b = _same_family(source, destination)
    if version == "v1":
        return b"PROXY TCP%d %s %s %d %d\r\n" % (
            a.version, str(a).encode(), str(b).encode(), source.port, destination.port,
        )  # fmt: skip
    family = _TCP4 if a.version == 4 else _TCP6
    block = _ADDRESS_BLOCK[family].pack(a.packed, b.packed, source.port, destination.port)
    return _v2(_PROXY, family, block)


_cached = functools.lru_cache(maxsize=4096)(_encode)


def _v2(command: int, family: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes((0x20 | command, family)) + len(block).to_bytes(2, "big") + block
