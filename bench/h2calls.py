"""Python function calls per HTTP/2 request, counted in memory.

Wall-clock figures move with whatever else runs on the machine; the number
of function calls the proxy makes for one request does not. This drives the
real proxy (the listening door with HTTP/2 by prior knowledge, its default
validators, an access log file) with an ``h2`` client through in-memory
connections (``upgradeproxy.testing``), backends answering ``200`` with a
small body, and counts under ``cProfile`` only what the proxy runs: the
client's own ``h2`` work is outside the count, and so are Twisted's reactor
and sockets. Every request is a GET ending with its HEADERS frame; the
client gives the window back as a real one does, so its WINDOW_UPDATE
frames are part of what the proxy reads.

    .venv/bin/python bench/h2calls.py             # both scenarios
    .venv/bin/python bench/h2calls.py get --top 30

``get`` has one stream in flight at a time; ``get16`` sends 16 streams in
one read, as ``h2load -m16`` does, each answered by its own backend
connection in a read of its own.

Needs the project installed (``.venv``); unlike ``run.py``, not the C tools.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from collections.abc import Callable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, StreamEnded
from twisted.internet.task import Clock

from upgradeproxy import ProxySettings
from upgradeproxy.core.accesslog import access_log_to
from upgradeproxy.core.address import BackendAddress
from upgradeproxy.core.factory import ProxyFactory
from upgradeproxy.testing import ScriptedBackend, ScriptedBackendEndpoint, connect_client

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"app.example"),
    (b":path", b"/page?q=1"),
    (b"user-agent", b"bench"),
    (b"accept", b"*/*"),
]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\nhello, world!\n"


class _Run:
    """One client connection; :meth:`round` sends ``streams`` GETs and waits for their answers."""

    def __init__(self, profile: cProfile.Profile) -> None:
        self._profile = profile
        endpoint = ScriptedBackendEndpoint()
        access_log, _ = access_log_to(os.devnull, "text")
        factory = ProxyFactory(
            BackendAddress(endpoint, b"", "bench backend"),
            clock=Clock(),
            access_log=access_log,
            settings=ProxySettings(http2_cleartext=True),
        )
        factory.doStart()
        self._endpoint = endpoint
        self._answered: dict[int, int] = {}
        _, self._transport = connect_client(factory)
        self._h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self._h2.initiate_connection()
        self._ended = 0
        self._client_reads()

    def _proxy(self, call: Callable[[bytes], None], data: bytes) -> None:
        self._profile.enable()
        call(data)
        self._profile.disable()

    def _client_reads(self) -> None:
        """What the proxy sent, read by the client, which answers (settings, windows)."""
        back = self._transport.value()
        self._transport.clear()
        if back:
            for event in self._h2.receive_data(back):
                if isinstance(event, DataReceived):
                    self._h2.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, StreamEnded):
                    self._ended += 1
        out = self._h2.data_to_send()
        if out:
            self._proxy(self._transport.protocol.dataReceived, out)

    def _waiting(self) -> list[ScriptedBackend]:
        """Backend connections with a request not yet answered."""
        waiting = []
        for connection in self._endpoint.connections:
            requests = connection.received.count(b" HTTP/1.1\r\n")
            if requests > self._answered.get(id(connection), 0):
                self._answered[id(connection)] = requests
                waiting.append(connection)
        return waiting

    def round(self, streams: int) -> None:
        ended = self._ended + streams
        for _ in range(streams):
            self._h2.send_headers(self._h2.get_next_available_stream_id(), REQUEST, True)
        self._proxy(self._transport.protocol.dataReceived, self._h2.data_to_send())
        for backend in self._waiting():
            self._proxy(backend.send, OK)
            self._client_reads()
        self._client_reads()
        assert self._ended == ended, "a response did not end"


def gets(streams: int) -> Callable[[cProfile.Profile, int], None]:
    """``count`` GETs on one client connection, ``streams`` at a time."""

    def run(profile: cProfile.Profile, count: int) -> None:
        connection = _Run(profile)
        connection.round(streams)  # the backend connections are made: count the steady state
        profile.clear()  # type: ignore[attr-defined]
        for _ in range(count // streams):
            connection.round(streams)

    return run


SCENARIOS = {"get": gets(1), "get16": gets(16)}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench/h2calls.py", description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="get, get16 (both)")
    parser.add_argument("--count", type=int, default=992, help="requests per scenario")
    parser.add_argument("--top", type=int, default=15, help="functions to list (0: none)")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; choose from get, get16")
    for name in args.scenarios or SCENARIOS:
        profile = cProfile.Profile()
        SCENARIOS[name](profile, args.count)
        stats = pstats.Stats(profile)
        count = args.count // 16 * 16 if name == "get16" else args.count
        print(f"{name}: {stats.total_calls / count:.1f} calls per request")  # type: ignore[attr-defined]
        if args.top:
            stats.sort_stats("ncalls").print_stats(args.top)


if __name__ == "__main__":
    main(sys.argv[1:])
