"""A client connection at the moment its door hands it to a tunnel."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import ITransport


@dataclass(frozen=True, slots=True)
class Handover:
    """What a front door gives up when its connection switches protocols.

    ``held`` is every byte the client sent after its upgrade request, which
    nobody parsed: it belongs to the tunnel. ``read_closed`` says the client
    already ended its side (its EOF goes into the tunnel once it runs).
    """

    transport: ITransport
    held: bytes
    read_closed: bool = False
