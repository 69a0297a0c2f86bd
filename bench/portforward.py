"""Twisted's own raw relay, the floor under every Twisted proxy in the benchmark.

``python portforward.py PORT BACKEND_PORT`` listens on 127.0.0.1:PORT and
forwards every connection to 127.0.0.1:BACKEND_PORT with
``twisted.protocols.portforward.ProxyFactory``: bytes both ways, unchanged,
no HTTP parsing and no validation. It runs on the epoll reactor, as ``twistd``
does on Linux, and logs warnings and errors only (``ProxyClientFactory`` logs
a line per connection at info level, which no proxy here does).
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402 (after the reactor is installed)
from twisted.logger import (  # noqa: E402
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.portforward import ProxyFactory  # noqa: E402

HOST = "127.0.0.1"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(arg.isdigit() for arg in argv):
        print("usage: portforward.py PORT BACKEND_PORT", file=sys.stderr)
        return 2
    port, backend_port = (int(arg) for arg in argv)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.stdout), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    reactor.listenTCP(port, ProxyFactory(HOST, backend_port), interface=HOST)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
