"""End to end with curl: plain HTTP/1.1 through the proxy, in front of the demo backend.

curl is strict about framing and says in its verbose output what it did with
the connection, so it checks what a browser or an API client relies on:
keep-alive (two URLs over one connection), chunked uploads (with and without
``Expect: 100-continue``) echoed byte for byte and the connection still
usable afterwards, and ``HEAD`` responses that carry no body.

The proxy's backend response timeout is 5 seconds here (the demo answers at
once), so that a request the proxy never answers fails in seconds.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from e2e_support import RESPONSE_TIMEOUT, demo_behind_proxy, run_curl, transfer
from loopback import Loopback, Proxy, free_port

from upgradeproxy import ProxySettings
from upgradeproxy.core._backend import BackendSettings
from upgradeproxy.demo import PAGE

pytestmark = pytest.mark.loopback

EXPECT = ["Expect: 100-continue", "Expect:"]
EXPECT_IDS = ["expect-100-continue", "no-expect"]
UPLOAD_SIZE = 2 * 2**20 + 17


@pytest_twisted.async_yield_fixture
async def demo_proxy(loopback: Loopback) -> AsyncIterator[Proxy]:
    """The demo backend behind a proxy, on 127.0.0.1."""
    settings = ProxySettings(backend=BackendSettings(response_timeout=RESPONSE_TIMEOUT))
    async with demo_behind_proxy(loopback, settings=settings) as proxy:
        yield proxy


def request_headers(log: str) -> list[str]:
    return [line[2:] for line in log.splitlines() if line.startswith("> ")]


def response_lines(log: str) -> list[str]:
    return [line[2:] for line in log.splitlines() if line.startswith("< ")]


def upload_body() -> bytes:
    return random.Random(9112).randbytes(UPLOAD_SIZE)


# -- keep-alive ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_curl_fetches_two_urls_over_one_connection(
    curl: str, demo_proxy: Proxy, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{demo_proxy.port}"
    page, missing = tmp_path / "page", tmp_path / "missing"
    lines, log = await run_curl(
        curl, transfer(f"{base}/", "-o", page), transfer(f"{base}/nope", "-o", missing)
    )

    assert lines == [f"1 200 {len(PAGE)}", "0 404 20"], log
    assert re.search(r"Re-?using existing connection", log), log
    assert page.read_bytes() == PAGE
    assert missing.read_bytes() == b"no such page: /nope\n"


# -- chunked uploads -------------------------------------------------------------------


@pytest.mark.parametrize("expect", EXPECT, ids=EXPECT_IDS)
@pytest_twisted.ensureDeferred
async def test_curl_chunked_upload_is_echoed_exactly(
    curl: str, demo_proxy: Proxy, tmp_path: Path, expect: str
) -> None:
    body = upload_body()
    (tmp_path / "body").write_bytes(body)
    url = f"http://127.0.0.1:{demo_proxy.port}/echo-body"
    lines, log = await run_curl(
        curl,
        transfer(
            url,
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            expect,
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            f"@{tmp_path / 'body'}",
            "-o",
            tmp_path / "echo",
        ),
    )

    assert lines == [f"1 200 {UPLOAD_SIZE}"], log
    sent = request_headers(log)
    assert "Transfer-Encoding: chunked" in sent
    assert not any(h.lower().startswith("content-length") for h in sent)
    interim = [line for line in response_lines(log) if line.startswith("HTTP/1.1 1")]
    if expect == "Expect:":
        assert not any(h.lower().startswith("expect") for h in sent)
        assert interim == []
    else:
        assert interim == ["HTTP/1.1 100 Continue"], log
    assert (tmp_path / "echo").read_bytes() == body


@pytest.mark.parametrize("expect", EXPECT, ids=EXPECT_IDS)
@pytest_twisted.ensureDeferred
async def test_curl_connection_carries_another_request_after_a_large_chunked_upload(
    curl: str, demo_proxy: Proxy, tmp_path: Path, expect: str
) -> None:
    body = upload_body()
    (tmp_path / "body").write_bytes(body)
    base = f"http://127.0.0.1:{demo_proxy.port}"
    lines, log = await run_curl(
        curl,
        transfer(
            f"{base}/echo-body",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            expect,
            "--data-binary",
            f"@{tmp_path / 'body'}",
            "-o",
            tmp_path / "echo",
        ),
        transfer(f"{base}/", "-o", tmp_path / "page"),
    )

    assert lines == [f"1 200 {UPLOAD_SIZE}", f"0 200 {len(PAGE)}"], log
    assert (tmp_path / "echo").read_bytes() == body
    assert (tmp_path / "page").read_bytes() == PAGE


# -- HEAD ------------------------------------------------------------------------------


def head_fields(raw: bytes) -> tuple[str, dict[str, str]]:
    """The status line and the fields (lower-case names) of a head curl saved."""
    lines = raw.decode("latin-1").split("\r\n")
    assert lines[-2:] == ["", ""], raw
    fields = dict(line.split(": ", 1) for line in lines[1:-2])
    return lines[0], {name.lower(): value for name, value in fields.items()}


@pytest_twisted.ensureDeferred
async def test_curl_head_gets_the_page_head_without_a_body_and_the_connection_goes_on(
    curl: str, demo_proxy: Proxy, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{demo_proxy.port}/"
    lines, log = await run_curl(
        curl, transfer(url, "-I", "-o", tmp_path / "head"), transfer(url, "-o", tmp_path / "page")
    )

    # Had the proxy sent a body after the HEAD response, curl would have
    # reported it, and the GET behind it would have read it as its response.
    assert "Excess found" not in log, log
    assert lines == ["1 200 0", f"0 200 {len(PAGE)}"], log
    status, fields = head_fields((tmp_path / "head").read_bytes())
    assert status == "HTTP/1.1 200 OK"
    assert fields["content-type"] == "text/html; charset=utf-8"
    assert fields["content-length"] == str(len(PAGE))
    assert (tmp_path / "page").read_bytes() == PAGE


@pytest_twisted.ensureDeferred
async def test_curl_head_answered_by_the_proxy_itself_has_no_body(
    curl: str, loopback: Loopback, tmp_path: Path
) -> None:
    """A 502 for an unreachable backend, to a HEAD: the head alone (RFC 9110 §9.3.2)."""
    proxy = loopback.proxy(free_port())
    lines, log = await run_curl(
        curl, transfer(f"http://127.0.0.1:{proxy.port}/", "-I", "-o", tmp_path / "head")
    )

    assert lines == ["1 502 0"], log
    status, fields = head_fields((tmp_path / "head").read_bytes())
    assert status == "HTTP/1.1 502 Bad Gateway"
    assert fields["connection"] == "close"
    assert "Excess found" not in log, log
