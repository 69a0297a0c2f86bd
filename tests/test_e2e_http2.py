"""End to end over HTTP/2: real HTTP/2 clients through the proxy's HTTP/2 door.

- curl ``--http2`` over TLS (``h2`` chosen by ALPN): a GET, two on one
  connection, and a POST of several megabytes that the backend receives byte
  for byte, with its ``Content-Length``; curl ``--http2-prior-knowledge``
  against a cleartext listener that accepts the preface (``http2_cleartext``).
- Python's ``httpx`` with ``http2=True``: concurrent GETs and POSTs as streams
  of one connection.
- Headless Chromium loads the demo page over ``https://``; its WebSocket goes
  over the same HTTP/2 connection (RFC 8441), which the access records show,
  and echoes. With HTTP/2 off the same page works over HTTP/1.1.
- ``h2load`` (nghttp2): a short run of multiplexed GETs, none failed.

Each client is skipped, with the reason, where it is not installed (see
``.ci/install-e2e``). The certificate comes from a fresh ``trustme`` CA.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import pytest
import pytest_twisted
from e2e_support import (
    RESULT_TIMEOUT,
    START_TIMEOUT,
    ServerCertificate,
    demo_behind_proxy,
    proxy_over_tls,
    run_bounded,
    run_curl,
    self_test_outcome,
    transfer,
)
from loopback import HOST, Loopback, LoopbackBackendConnection, Proxy, eventually
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from upgradeproxy import ProxySettings
from upgradeproxy.core.accesslog import AccessLog, RequestRecord, TunnelRecord
from upgradeproxy.demo import PAGE

pytestmark = [
    pytest.mark.loopback,
    # Twisted's ssl: server endpoint still hands pyOpenSSL objects to OpenSSL.
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning"),
]

UPLOAD_SIZE = 5 * 2**20 + 7
Record = RequestRecord | TunnelRecord


@pytest.fixture
def certificate(tmp_path: Path) -> ServerCertificate:
    return ServerCertificate(tmp_path / "tls")


@pytest.fixture
def records() -> list[Record]:
    """The access records of the proxy under test (``access_log=`` fills it)."""
    return []


def access_log(records: list[Record]) -> AccessLog:
    return AccessLog("text", lambda event: records.append(event["access"]))


@pytest_twisted.async_yield_fixture
async def h2_proxy(
    loopback: Loopback, certificate: ServerCertificate, records: list[Record]
) -> AsyncIterator[Proxy]:
    """The demo backend behind a proxy on an ``ssl:`` listener, HTTP/2 on (the default)."""
    async with demo_behind_proxy(
        loopback, tls=certificate, access_log=access_log(records)
    ) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def h2load() -> str:
    path = shutil.which("h2load")
    if path is None:
        pytest.skip("h2load is not installed (Debian's nghttp2-client; see .ci/install-e2e)")
    return path


def response_lines(log: str) -> list[str]:
    return [line[2:].rstrip() for line in log.splitlines() if line.startswith("< ")]


def versions(records: list[Record], target: str) -> list[str]:
    """What each record for ``target`` says its protocol was (its text names it)."""
    found = []
    for record in records:
        if record.target == target:
            found.append("HTTP/2" if re.search(r"HTTP/2\b(?!\.)", record.text) else record.text)
    return found


# -- curl ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_curl_http2_gets_the_page_twice_over_one_tls_connection(
    curl: str,
    h2_proxy: Proxy,
    certificate: ServerCertificate,
    records: list[Record],
    tmp_path: Path,
) -> None:
    url = f"https://localhost:{h2_proxy.port}/"
    lines, log = await run_curl(
        curl,
        transfer(url, "--http2", "--cacert", certificate.ca, "-o", tmp_path / "one"),
        transfer(url, "--http2", "--cacert", certificate.ca, "-o", tmp_path / "two"),
    )

    assert "ALPN: server accepted h2" in log, log
    assert lines == [f"1 200 {len(PAGE)}", f"0 200 {len(PAGE)}"], log
    assert "HTTP/2 200" in response_lines(log), log
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes() == PAGE
    assert [r.text.split('"')[1] for r in records] == ["GET / HTTP/2"] * 2
    assert h2_proxy.factory.proxy.stats.connections_total == 1


def body_recorder(conn: LoopbackBackendConnection, data: bytes) -> None:
    """A backend script: each request's body is kept (``conn.state["bodies"]``), with its
    head (``conn.state["requests"]``), and answered with its length and SHA-256."""
    parser: h11.Connection = conn.state.setdefault("parser", h11.Connection(h11.SERVER))
    parser.receive_data(data)
    while True:
        event = parser.next_event()
        if event in (h11.NEED_DATA, h11.PAUSED):
            return
        if isinstance(event, h11.Request):
            conn.state.setdefault("requests", []).append(event)
            conn.state.setdefault("bodies", []).append(bytearray())
        elif isinstance(event, h11.Data):
            conn.state["bodies"][-1] += event.data
        elif isinstance(event, h11.EndOfMessage):
            body = conn.state["bodies"][-1]
            answer = b"%d %s\n" % (len(body), hashlib.sha256(body).hexdigest().encode())
            head = h11.Response(status_code=200, headers=[("Content-Length", str(len(answer)))])
            assert conn.transport is not None
            conn.transport.write(parser.send(head) + parser.send(h11.Data(data=answer)))
            conn.transport.write(parser.send(h11.EndOfMessage()))
            parser.start_next_cycle()


@pytest_twisted.ensureDeferred
async def test_curl_http2_posts_megabytes_that_reach_the_backend_byte_for_byte(
    curl: str, loopback: Loopback, certificate: ServerCertificate, tmp_path: Path
) -> None:
    body = random.Random(9113).randbytes(UPLOAD_SIZE)
    (tmp_path / "body").write_bytes(body)
    backend = loopback.backend(body_recorder)
    async with proxy_over_tls(loopback, backend.port_number, certificate) as proxy:
        lines, log = await run_curl(
            curl,
            transfer(
                f"https://localhost:{proxy.port}/upload",
                "--http2",
                "--cacert",
                certificate.ca,
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                f"@{tmp_path / 'body'}",
                "-o",
                tmp_path / "answer",
            ),
        )

    assert "ALPN: server accepted h2" in log, log
    assert lines[0].split(" ")[1] == "200", log
    received = [b for c in backend.connections for b in c.state.get("bodies", [])]
    assert len(received) == 1
    assert bytes(received[0]) == body  # (not compared in the assertion message: 5 MB)
    expected = b"%d %s\n" % (len(body), hashlib.sha256(body).hexdigest().encode())
    assert (tmp_path / "answer").read_bytes() == expected
    (request,) = [r for c in backend.connections for r in c.state.get("requests", [])]
    assert request.method == b"POST" and request.target == b"/upload"
    assert request.http_version == b"1.1"
    fields = dict(request.headers)
    assert fields[b"content-length"] == str(UPLOAD_SIZE).encode()
    assert fields[b"host"] == f"localhost:{proxy.port}".encode()
    assert b"transfer-encoding" not in fields


@pytest_twisted.ensureDeferred
async def test_curl_http2_prior_knowledge_on_a_cleartext_listener(
    curl: str, loopback: Loopback, records: list[Record], tmp_path: Path
) -> None:
    # One transfer: curl 7.88 fails a second one on a prior-knowledge connection it
    # reuses ("Error in the HTTP2 framing layer"), in front of HAProxy's too.
    async with demo_behind_proxy(
        loopback, settings=ProxySettings(http2_cleartext=True), access_log=access_log(records)
    ) as proxy:
        url = f"http://{HOST}:{proxy.port}/"
        lines, log = await run_curl(
            curl, transfer(url, "--http2-prior-knowledge", "-o", tmp_path / "page")
        )

    assert lines == [f"1 200 {len(PAGE)}"], log
    assert "HTTP/2 200" in response_lines(log), log
    assert (tmp_path / "page").read_bytes() == PAGE
    assert versions(records, "/") == ["HTTP/2"]


# -- httpx -----------------------------------------------------------------------


async def _httpx_streams(url: str, ca: Path) -> list[tuple[str, int, bytes, bytes, int]]:
    """Eight GETs and four POSTs at once over one httpx client; per response: its
    version, status, what was sent, what came back, and which connection carried it."""
    import httpx  # (imported here: only this test needs it)

    context = ssl.create_default_context(cafile=str(ca))
    # Bodies within a stream's first window (65,535 bytes): httpcore's HTTP/2
    # can hang one of several concurrent uploads that wait for WINDOW_UPDATE
    # (its _wait_for_outgoing_flow reads again after another stream read the
    # update). Large bodies are curl's test above.
    bodies = [b""] * 8 + [bytes([n]) * (30_000 + n) for n in range(1, 5)]
    async with httpx.AsyncClient(http2=True, verify=context, timeout=20) as client:

        async def one(body: bytes) -> tuple[str, int, bytes, bytes, int]:
            if body:
                response = await client.post(f"{url}echo-body", content=body)
            else:
                response = await client.get(url)
            stream = id(response.extensions["network_stream"])
            return response.http_version, response.status_code, body, response.content, stream

        return list(await asyncio.gather(*(one(body) for body in bodies)))


@pytest_twisted.ensureDeferred
async def test_httpx_http2_sends_concurrent_requests_as_streams_of_one_connection(
    h2_proxy: Proxy, certificate: ServerCertificate, records: list[Record]
) -> None:
    pytest.importorskip("h2", reason="httpx's HTTP/2 needs h2: pip install 'httpx[http2]'")
    url = f"https://localhost:{h2_proxy.port}/"
    results = await deferToThread(asyncio.run, _httpx_streams(url, certificate.ca)).addTimeout(
        30, reactor
    )

    for version, status, sent, got, _ in results:
        assert (version, status) == ("HTTP/2", 200)
        assert got == (sent or PAGE)
    assert len({stream for *_, stream in results}) == 1
    assert h2_proxy.factory.proxy.stats.connections_total == 1
    assert versions(records, "/") == ["HTTP/2"] * 8
    assert versions(records, "/echo-body") == ["HTTP/2"] * 4


# -- Chromium --------------------------------------------------------------------


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "no-http2"])
@pytest_twisted.ensureDeferred
async def test_chromium_runs_the_demo_over_https_with_its_websocket_over_http2(
    chromium: str,
    loopback: Loopback,
    certificate: ServerCertificate,
    records: list[Record],
    tmp_path: Path,
    http2: bool,
) -> None:
    settings = ProxySettings(http2=http2)
    async with demo_behind_proxy(
        loopback, tls=certificate, settings=settings, access_log=access_log(records)
    ) as proxy:
        url = f"https://127.0.0.1:{proxy.port}/"
        screenshot = tmp_path / "page.png"
        state: dict[str, Any] = await deferToThread(
            self_test_outcome,
            chromium,
            url,
            tmp_path,
            ["--ignore-certificate-errors"],
            screenshot,
        ).addTimeout(START_TIMEOUT + RESULT_TIMEOUT + 15, reactor)
        await eventually(lambda: not proxy.factory.proxy.tunnels, what="the tunnel to end")

    assert state["result"] == "ok: 3 echoes", state
    assert state["resultClass"] == "ok"
    log = state["log"].splitlines()
    assert log[0] == f"connected wss://127.0.0.1:{proxy.port}/ws"
    assert [line.split(" ")[0] for line in log[1:4]] == ["sent"] * 3
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    expected = "HTTP/2" if http2 else 'GET / HTTP/1.1"'
    page = versions(records, "/")
    assert page and all(expected in v for v in page), records
    ws = versions(records, "/ws")
    assert ws, records
    if http2:
        assert set(ws) == {"HTTP/2"}, records
    else:
        assert "HTTP/2" not in ws, records


# -- h2load ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_h2load_multiplexed_gets_all_succeed(h2load: str, h2_proxy: Proxy) -> None:
    url = f"https://localhost:{h2_proxy.port}/"
    result = await deferToThread(run_bounded, [h2load, "-n", "400", "-c", "4", "-m", "16", url], 30)
    output = result.stdout.decode(errors="replace")

    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    assert "Application protocol: h2" in output, output
    assert re.search(r"requests: 400 total, 400 started, 400 done, 400 succeeded, 0 failed", output)
    assert re.search(r"status codes: 400 2xx, 0 3xx, 0 4xx, 0 5xx", output), output
