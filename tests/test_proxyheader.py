"""The PROXY protocol header, parsed and built in memory (versions 1 and 2)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from upgradeproxy.core._proxyheader import (
    MAX_HEADER,
    V2_SIGNATURE,
    HeaderError,
    encode,
    parse,
)

CLIENT = IPv4Address("TCP", "198.51.100.7", 51234)
FRONT = IPv4Address("TCP", "203.0.113.1", 443)
CLIENT6 = IPv6Address("TCP", "2001:db8::7", 51234)
FRONT6 = IPv6Address("TCP", "2001:db8::1", 443)
V1 = b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\r\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def v2(command: int, family: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes((0x20 | command, family)) + len(block).to_bytes(2, "big") + block


def test_v1_gives_the_addresses_and_where_the_client_bytes_start() -> None:
    header = parse(V1 + REQUEST)
    assert header is not None
    assert header.source == CLIENT and header.destination == FRONT
    assert (V1 + REQUEST)[header.length :] == REQUEST
    assert header.version == 1


def test_v1_tcp6() -> None:
    header = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n")
    assert header is not None and header.source == CLIENT6 and header.destination == FRONT6


def test_v1_unknown_names_no_client() -> None:
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN whatever 1 2\r\n"):
        header = parse(line + REQUEST)
        assert header is not None and header.source is None and header.length == len(line)


def test_v2_tcp4_and_tcp6() -> None:
    data = encode("v2", CLIENT, FRONT) + REQUEST
    header = parse(data)
    assert header is not None and header.source == CLIENT and header.destination == FRONT
    assert data[header.length :] == REQUEST and header.version == 2
    header = parse(encode("v2", CLIENT6, FRONT6))
    assert header is not None and header.source == CLIENT6


def test_v2_tlvs_after_the_addresses_are_skipped() -> None:
    tlv = b"\x05\x00\x04abcd"  # PP2_TYPE_UNIQUE_ID
    block = bytes((198, 51, 100, 7, 203, 0, 113, 1)) + (51234).to_bytes(2, "big") + b"\x01\xbb"
    data = v2(1, 0x11, block + tlv) + REQUEST
    header = parse(data)
    assert header is not None and header.source == CLIENT
    assert data[header.length :] == REQUEST


def test_v2_local_and_other_families_use_the_connection_itself() -> None:
    for data in (v2(0, 0x11, b"\0" * 12), v2(1, 0x00, b""), v2(1, 0x31, b"\0" * 216)):
        header = parse(data + REQUEST)
        assert header is not None and header.source is None and header.length == len(data)


@pytest.mark.parametrize("data", [V1 + REQUEST, encode("v2", CLIENT6, FRONT6) + REQUEST])
def test_every_split_needs_more_bytes_then_parses(data: bytes) -> None:
    full = parse(data)
    assert full is not None
    for cut in range(full.length):
        assert parse(data[:cut]) is None
    assert parse(data[: full.length]) == full


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (REQUEST, "does not start with a PROXY protocol header"),
        (b"G", "does not start with a PROXY protocol header"),
        (b"\r\n\r\nX", "does not start with a PROXY protocol header"),
        (b"PROXY TCP4 198.51.100.7 203.0.113.1 51234 443\n", "does not end with CRLF"),
        (b"PROXY TCP4 198.51.100.7  203.0.113.1 51234 443\r\n", "malformed"),
        (b"PROXY TCP4 198.51.100.7 203.0.113.1 051234 443\r\n", "malformed"),
        (b"PROXY TCP4 198.51.100.7 203.0.113.1 65536 443\r\n", "above 65535"),
        (b"PROXY TCP4 2001:db8::7 203.0.113.1 1 443\r\n", "says TCP4"),
        (b"PROXY TCP6 198.51.100.7 203.0.113.1 1 443\r\n", "says TCP6"),
        (b"PROXY TCP4 198.51.100.999 203.0.113.1 1 443\r\n", "malformed address"),
        (b"PROXY UDP4 198.51.100.7 203.0.113.1 1 443\r\n", "malformed"),
        (b"PROXY " + b"U" * 120, "longer than 107"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\0" * 12, "version 1"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\0" * 12, "unknown command"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\0" * 4, "too short"),
        (V2_SIGNATURE + b"\x21\x11" + (MAX_HEADER).to_bytes(2, "big"), f"longer than {MAX_HEADER}"),
    ],
)
def test_anything_else_is_refused_with_a_reason(data: bytes, words: str) -> None:
    with pytest.raises(HeaderError, match=words):
        parse(data)


def test_nothing_yet_needs_more() -> None:
    assert parse(b"") is None
    assert parse(b"PRO") is None
    assert parse(V2_SIGNATURE[:5]) is None


def test_v1_sent_is_what_haproxy_and_twisted_read() -> None:
    assert encode("v1", CLIENT, FRONT) == V1
    info, rest = V1Parser().feed(encode("v1", CLIENT6, FRONT6) + REQUEST)
    assert info is not None and info.source == CLIENT6 and rest == REQUEST


def test_v2_sent_is_what_twisted_reads() -> None:
    info, rest = V2Parser().feed(encode("v2", CLIENT, FRONT) + REQUEST)
    assert info is not None and info.source == CLIENT and info.destination == FRONT
    assert rest == REQUEST


def test_mixed_families_are_sent_as_ipv6() -> None:
    header = parse(encode("v1", CLIENT6, FRONT))
    assert header is not None and isinstance(header.destination, IPv6Address)
    mapped = ipaddress.IPv6Address(header.destination.host).ipv4_mapped
    assert str(mapped) == FRONT.host and header.destination.port == FRONT.port


def test_without_tcp_addresses_the_header_says_unknown_or_local() -> None:
    assert encode("v1", None, None) == b"PROXY UNKNOWN\r\n"
    local = encode("v2", None, None)
    assert local == V2_SIGNATURE + b"\x20\x00\x00\x00"
    header = parse(local)
    assert header is not None and header.source is None


# -- properties ------------------------------------------------------------------------

PROPERTIES = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda ip: str(ip))
ports = st.integers(0, 65535)


@PROPERTIES
@given(
    version=st.sampled_from(["v1", "v2"]),
    family=st.sampled_from([(ipv4, IPv4Address), (ipv6, IPv6Address)]),
    data=st.data(),
    rest=st.binary(max_size=64),
)
def test_what_is_sent_parses_back_to_the_same_addresses(
    version: str, family: tuple[st.SearchStrategy[str], type], data: st.DataObject, rest: bytes
) -> None:
    hosts, kind = family
    source = kind("TCP", data.draw(hosts), data.draw(ports))
    destination = kind("TCP", data.draw(hosts), data.draw(ports))
    sent = encode(version, source, destination)
    header = parse(sent + rest)
    assert header is not None and header.length == len(sent)
    assert header.source is not None and header.destination is not None
    assert ipaddress.ip_address(header.source.host) == ipaddress.ip_address(source.host)
    assert header.source.port == source.port
    assert ipaddress.ip_address(header.destination.host) == ipaddress.ip_address(destination.host)
    assert (sent + rest)[header.length :] == rest


@PROPERTIES
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda b: b"PROXY " + b),
        st.binary(max_size=200).map(lambda b: V2_SIGNATURE + b),
    )
)
def test_any_bytes_give_a_header_more_needed_or_an_error_never_a_crash(data: bytes) -> None:
    try:
        header = parse(data)
    except HeaderError:
        return
    if header is not None:
        assert 0 < header.length <= len(data)
        # A prefix of a header never parses as one.
        assert parse(data[: header.length - 1]) is None
