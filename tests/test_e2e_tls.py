"""End to end over TLS: the clients people use, through an ``ssl:`` listener, to the demo backend.

Every one of them offers application protocols over ALPN (curl and Chromium
``h2`` and ``http/1.1``, curl ``--http1.1`` only the latter), which Python's
``ssl`` never does: the proxy must choose ``http/1.1``. The certificate
comes from a fresh ``trustme`` CA; curl and Node are given that CA, Chromium
is told to ignore certificate errors.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from e2e_support import (
    E2E_DIR,
    RESULT_TIMEOUT,
    START_TIMEOUT,
    ServerCertificate,
    demo_behind_proxy,
    run_bounded,
    run_curl,
    self_test_outcome,
    transfer,
)
from loopback import Loopback, Proxy, eventually
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from upgradeproxy.demo import PAGE

pytestmark = [
    pytest.mark.loopback,
    # Twisted's ssl: server endpoint still hands pyOpenSSL objects to OpenSSL.
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning"),
]


@pytest.fixture
def certificate(tmp_path: Path) -> ServerCertificate:
    return ServerCertificate(tmp_path / "tls")


@pytest_twisted.async_yield_fixture
async def tls_proxy(loopback: Loopback, certificate: ServerCertificate) -> AsyncIterator[Proxy]:
    """The demo backend behind a proxy that listens with TLS on 127.0.0.1."""
    async with demo_behind_proxy(loopback, tls=certificate) as proxy:
        yield proxy


@pytest.mark.parametrize(
    ("options", "chosen"), [([], "h2"), (["--http1.1"], "http/1.1")], ids=["defaults", "http1.1"]
)
@pytest_twisted.ensureDeferred
async def test_curl_gets_the_demo_page_through_a_tls_listener(
    curl: str,
    tls_proxy: Proxy,
    certificate: ServerCertificate,
    tmp_path: Path,
    options: list[str],
    chosen: str,
) -> None:
    page = tmp_path / "page"
    url = f"https://localhost:{tls_proxy.port}/"
    lines, log = await run_curl(
        curl, transfer(url, "--cacert", certificate.ca, "--output", page, *options)
    )

    assert lines == [f"1 200 {len(PAGE)}"], log
    assert page.read_bytes() == PAGE
    assert f"ALPN: server accepted {chosen}" in log, log


@pytest_twisted.ensureDeferred
async def test_chromium_runs_the_demo_pages_self_test_over_https_and_wss(
    chromium: str, tls_proxy: Proxy, tmp_path: Path
) -> None:
    url = f"https://127.0.0.1:{tls_proxy.port}/"
    state = await deferToThread(
        self_test_outcome, chromium, url, tmp_path, ["--ignore-certificate-errors"]
    ).addTimeout(START_TIMEOUT + RESULT_TIMEOUT + 15, reactor)

    assert state["result"] == "ok: 3 echoes", state
    log = state["log"].splitlines()
    assert log[0] == f"connected wss://127.0.0.1:{tls_proxy.port}/ws"
    await eventually(lambda: not tls_proxy.factory.proxy.tunnels, what="the tunnel to end")


@pytest_twisted.ensureDeferred
async def test_node_ws_client_over_wss_through_a_tls_listener(
    node: Path, tls_proxy: Proxy, certificate: ServerCertificate
) -> None:
    url = f"wss://localhost:{tls_proxy.port}/ws"
    result = await deferToThread(
        run_bounded,
        [node, E2E_DIR / "ws_client.mjs", url],
        30,
        env={"NODE_EXTRA_CA_CERTS": str(certificate.ca), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)

    assert report["error"] is None
    assert report["received"] == report["sent"]
    assert report["close"] == {"code": 1000, "reason": ""}
    await eventually(lambda: not tls_proxy.factory.proxy.tunnels, what="the tunnel to end")
