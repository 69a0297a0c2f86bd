"""What an idle tunnel keeps alive, counted in memory (tracemalloc), not timed."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

from support import SWITCH, UPGRADE

import upgradeproxy
from upgradeproxy.core._client import ClientConnection
from upgradeproxy.core._flow import ReadGate
from upgradeproxy.core._rewrite import ClientHop
from upgradeproxy.testing import ProxyHarness, connect_client

TUNNELS = 200
#: Bytes that upgradeproxy's own code allocates and keeps per idle tunnel in
#: memory (the transports here are test doubles, not counted). Measured on
#: Python 3.11: about 1,830 before the tunnel used slots, counted bytes in
#: two fields and the client connection let go of its HTTP-only objects;
#: 1,190 after.
PER_TUNNEL_BOUND = 1500

_PACKAGE = str(Path(upgradeproxy.__file__).parent / "*")
_DOUBLES = str(Path(upgradeproxy.__file__).parent / "testing.py")


def _open_tunnel(h: ProxyHarness) -> ClientConnection:
    client, transport = connect_client(h.factory)
    client.dataReceived(UPGRADE)
    h.backend.send(SWITCH)
    transport.clear()  # the 101 the test double keeps
    h.backend.transport.clear()
    assert isinstance(client, ClientConnection)
    return client


def test_an_idle_tunnel_keeps_no_http_only_objects() -> None:
    h = ProxyHarness()
    client = _open_tunnel(h)
    kept = gc.get_referents(*gc.get_referents(client))
    assert not [o for o in kept if isinstance(o, (ClientHop, ReadGate))]


def test_memory_per_idle_tunnel_is_bounded() -> None:
    h = ProxyHarness()
    _open_tunnel(h)  # the first one builds what all share (pools, caches)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        clients = [_open_tunnel(h) for _ in range(TUNNELS)]
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    ours = [tracemalloc.Filter(True, _PACKAGE), tracemalloc.Filter(False, _DOUBLES)]
    grown = sum(
        stat.size_diff
        for stat in after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
    )
    assert len(h.factory.proxy.tunnels) == TUNNELS + 1 and clients
    per_tunnel = grown / TUNNELS
    print(f"upgradeproxy keeps {per_tunnel:.0f} bytes per idle tunnel")
    assert per_tunnel < PER_TUNNEL_BOUND
