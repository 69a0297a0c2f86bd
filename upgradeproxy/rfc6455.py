"""The WebSocket opening handshake of RFC 6455 §4, as pure functions."""

from __future__ import annotations

import base64
import binascii
import hashlib

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_for(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value that answers ``key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def is_valid_key(key: bytes) -> bool:
    """True when ``key`` is the base64 encoding of 16 bytes (RFC 6455 §4.1)."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def extension_names(values: list[bytes]) -> list[bytes]:
    """The extension names in ``Sec-WebSocket-Extensions`` values, lowercased.

    ``permessage-deflate; client_max_window_bits`` names
    ``permessage-deflate`` (RFC 6455 §9.1).
    """
    return [
        element.split(b";", 1)[0].strip(b" \t").lower()
        for value in values
        for element in value.split(b",")
        if element.strip(b" \t")
    ]
