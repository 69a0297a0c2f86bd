"""Python function calls per request and per handshake, counted in memory.

Wall-clock figures move with whatever else runs on the machine; the number
of function calls the proxy makes for one request does not. This drives the
real proxy (the listening door, its default validators, an access log file)
between in-memory connections (``upgradeproxy.testing``) under ``cProfile``
and prints the calls per operation, then the functions that make most of
them. Twisted's reactor and sockets are not in it: what it counts is the
proxy's own work, the part a change to the proxy can cut.

    .venv/bin/python bench/callcount.py             # both scenarios
    .venv/bin/python bench/callcount.py get --top 30

Needs the project installed (``.venv``); unlike ``run.py``, not the C tools.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from collections.abc import Callable

from twisted.internet.task import Clock

from upgradeproxy.core.accesslog import access_log_to
from upgradeproxy.core.address import BackendAddress
from upgradeproxy.core.factory import ProxyFactory
from upgradeproxy.testing import ScriptedBackendEndpoint, connect_client

GET = b"GET /page?q=1 HTTP/1.1\r\nHost: app.example\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\nhello, world!\n"
UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def _factory() -> tuple[ProxyFactory, ScriptedBackendEndpoint]:
    endpoint = ScriptedBackendEndpoint()
    access_log, _ = access_log_to(os.devnull, "text")
    factory = ProxyFactory(
        BackendAddress(endpoint, b"", "bench backend"), clock=Clock(), access_log=access_log
    )
    factory.doStart()
    return factory, endpoint


def keep_alive_gets(count: int) -> Callable[[], None]:
    """``count`` GETs on one kept-alive client connection and one pooled backend connection."""
    factory, endpoint = _factory()
    client, transport = connect_client(factory)

    def one() -> None:
        client.dataReceived(GET)
        endpoint.connections[-1].send(OK)

    one()  # the connections are made; what is counted is the steady state
    transport.clear()

    def run() -> None:
        for _ in range(count):
            one()
            transport.clear()

    assert len(endpoint.connections) == 1
    return run


def handshakes(count: int) -> Callable[[], None]:
    """``count`` upgrades on new connections: request, ``101``, a message each way, close."""
    factory, endpoint = _factory()

    def one(port: int) -> None:
        client, transport = connect_client(factory, port=port)
        client.dataReceived(UPGRADE)
        backend = endpoint.connections[-1]
        backend.send(SWITCH + b"hi")
        client.dataReceived(b"hello")
        assert transport.value().endswith(b"hi") and backend.received.endswith(b"hello")
        transport.loseConnection()

    one(40000)

    def run() -> None:
        for i in range(count):
            one(40001 + i)

    return run


SCENARIOS = {"get": keep_alive_gets, "handshake": handshakes}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench/callcount.py", description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="get, handshake (both)")
    parser.add_argument("--count", type=int, default=1000, help="operations per scenario")
    parser.add_argument("--top", type=int, default=15, help="functions to list (0: none)")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; choose from get, handshake")
    for name in args.scenarios or SCENARIOS:
        run = SCENARIOS[name](args.count)
        profile = cProfile.Profile()
        profile.runcall(run)
        stats = pstats.Stats(profile)
        print(f"{name}: {stats.total_calls / args.count:.1f} calls per operation")  # type: ignore[attr-defined]
        if args.top:
            stats.sort_stats("ncalls").print_stats(args.top)


if __name__ == "__main__":
    main(sys.argv[1:])
