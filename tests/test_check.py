"""``upgradeproxy check``: the words it prints for each way a backend can answer.

The first half judges canned answers with :func:`diagnose` and :func:`render`,
without sockets. The second half runs the real command (``main([...])``, and
once as ``python -m upgradeproxy``) against scripted backends: small threaded
socket servers on 127.0.0.1 that answer a canned response. Every socket
operation has a timeout, and every server is closed by its fixture.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from upgradeproxy import rfc6455
from upgradeproxy.__main__ import main
from upgradeproxy.cli.check import (
    Diagnosis,
    Target,
    Verdict,
    _write,
    build_request,
    diagnose,
    head_complete,
    parse_target,
    render,
)
from upgradeproxy.http1 import RequestHead, encode_chunk, parse_request_head

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = rfc6455.accept_for(KEY)
URL = "http://backend.test:9000/ws"
TARGET = parse_target(URL)
WS_REQUEST = build_request(TARGET, websocket_key=KEY)
PBS = "proxmox-backup-protocol-v1"
PBS_REQUEST = build_request(TARGET, PBS)
TIMEOUT = 5.0


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"


def ws_switch(*extra: str, accept: bytes = ACCEPT, connection: bool = True) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket"]
    if connection:
        lines.append("Connection: Upgrade")
    lines.append("Sec-WebSocket-Accept: " + accept.decode())
    return head(*lines, *extra)


def judge(raw: bytes, request: RequestHead = WS_REQUEST) -> tuple[Diagnosis, str]:
    diagnosis = diagnose(request, raw)
    return diagnosis, render(diagnosis, URL)


def rules(diagnosis: Diagnosis) -> list[str]:
    return [f.rule for f in diagnosis.findings]


# -- the request ------------------------------------------------------------------------


def test_the_websocket_request_is_a_correct_handshake() -> None:
    parsed = parse_request_head(WS_REQUEST.serialize())
    assert parsed is not None
    request, _ = parsed
    assert (request.method, request.target, request.version) == (b"GET", b"/ws", (1, 1))
    assert list(request.headers) == [
        (b"Host", b"backend.test:9000"),
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Key", KEY),
    ]


def test_each_websocket_request_has_a_fresh_valid_key() -> None:
    keys = {build_request(TARGET).headers.get(b"sec-websocket-key") for _ in range(5)}
    assert len(keys) == 5
    assert all(k is not None and rfc6455.is_valid_key(k) for k in keys)


def test_another_protocol_offers_only_its_token() -> None:
    assert list(PBS_REQUEST.headers) == [
        (b"Host", b"backend.test:9000"),
        (b"Connection", b"Upgrade"),
        (b"Upgrade", PBS.encode()),
    ]


def test_extra_headers_come_last_and_replace_defaults_of_the_same_name() -> None:
    request = build_request(
        TARGET,
        extra_headers=[("Origin", "https://chat.example"), ("host", "chat.example")],
        websocket_key=KEY,
    )
    assert request.headers.get_all(b"host") == [b"chat.example"]
    assert list(request.headers)[-2:] == [
        (b"Origin", b"https://chat.example"),
        (b"host", b"chat.example"),
    ]


@pytest.mark.parametrize(
    ("url", "authority", "path"),
    [
        ("http://127.0.0.1:9000/ws", "127.0.0.1:9000", "/ws"),
        ("http://app.example", "app.example", "/"),
        ("ws://app.example/chat?room=a b", "app.example", "/chat?room=a%20b"),
        ("http://[::1]:8080/söcket#frag", "[::1]:8080", "/s%C3%B6cket"),
        ("http://bücher.example:81/", "xn--bcher-kva.example:81", "/"),
    ],
)
def test_parse_target(url: str, authority: str, path: str) -> None:
    target = parse_target(url)
    assert (target.authority, target.path) == (authority, path)
    assert parse_request_head(build_request(target).serialize()) is not None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://app.example/ws", "TLS backends cannot be checked"),
        ("ftp://app.example/", "is not an http:// URL"),
        ("127.0.0.1:9000", "is not an http:// URL"),
        ("http://user:pw@app.example/", "--header 'Authorization: ...'"),
        ("http://app.example:99999/", "invalid port"),
        ("http:///ws", "has no host"),
        ("http://a b/ws", "has an invalid host"),
        ("http://app.example:0/", "invalid port"),
        ("http://[::1/ws", "has an invalid host"),
    ],
)
def test_parse_target_says_what_to_write(url: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_target(url)
    assert words in str(info.value)


# -- a 101 that breaks rules --------------------------------------------------------------


def test_a_correct_websocket_switch() -> None:
    diagnosis, text = judge(ws_switch())
    assert diagnosis.verdict is Verdict.SWITCHED and diagnosis.ok
    assert diagnosis.findings == ()
    assert text == (
        f"upgradeproxy check: websocket upgrade to {URL}\n"
        "  → HTTP/1.1 101 Switching Protocols\n"
        "✓ correct switch to websocket\n"
    )


def test_a_correct_switch_to_another_protocol() -> None:
    raw = head("HTTP/1.1 101 Switching Protocols", f"Upgrade: {PBS}", "Connection: upgrade")
    diagnosis, text = judge(raw, PBS_REQUEST)
    assert diagnosis.ok
    assert f"upgradeproxy check: {PBS} upgrade to" in text
    assert f"✓ correct switch to {PBS}\n" in text


def test_101_without_connection_upgrade() -> None:
    diagnosis, text = judge(ws_switch(connection=False))
    assert diagnosis.verdict is Verdict.BAD_SWITCH and not diagnosis.ok
    assert rules(diagnosis) == ["connection_lists_upgrade"]
    assert text == (
        f"upgradeproxy check: websocket upgrade to {URL}\n"
        "  → HTTP/1.1 101 Switching Protocols\n"
        "✗ the backend answered 101 without 'Connection: upgrade' (RFC 9110 §7.6.1)\n"
        "    fix: add 'Connection: upgrade' to the 101: Upgrade is a connection option, so "
        "Connection must list it\n"
        "    or: if the backend cannot be changed, run upgradeproxy with "
        "--validator rfc9110:lenient-connection --validator websocket\n"
        "1 problem: this backend's switch would be refused by upgradeproxy's default "
        "validators (rfc9110, websocket), and clients would get 502 Bad Gateway\n"
    )


def test_101_without_connection_upgrade_for_another_protocol() -> None:
    _, text = judge(head("HTTP/1.1 101 Switching Protocols", f"Upgrade: {PBS}"), PBS_REQUEST)
    assert "✗ the backend answered 101 without 'Connection: upgrade'" in text
    assert "or: if the backend cannot be changed, run upgradeproxy with " in text
    assert "--validator rfc9110:lenient-connection\n" in text


def test_101_naming_another_protocol() -> None:
    raw = head("HTTP/1.1 101 Switching Protocols", "Upgrade: h2c", "Connection: Upgrade")
    diagnosis, text = judge(raw)
    # The WebSocket rules do not apply to a switch to h2c: one problem, not two.
    assert rules(diagnosis) == ["only_offered_protocols"]
    assert (
        "✗ the backend switched to 'h2c', which the client did not offer "
        "(it offered websocket) (RFC 9110 §7.8)\n"
        "    fix: name in the 101's Upgrade exactly one of the protocols the request offered\n"
    ) in text
    assert text.endswith(
        "1 problem: this backend's switch would be refused by upgradeproxy's "
        "default validators (rfc9110, websocket), and clients would get 502 "
        "Bad Gateway\n"
    )


def test_101_with_a_wrong_accept() -> None:
    wrong = rfc6455.accept_for(b"x3JJHMbDL1EzLkh9GBhXDw==")
    diagnosis, text = judge(ws_switch(accept=wrong))
    assert rules(diagnosis) == ["websocket_accept_matches"]
    assert (
        f"✗ the backend's 101 has Sec-WebSocket-Accept {wrong.decode()}, but the key calls "
        f"for {ACCEPT.decode()} (RFC 6455 §4.2.2)\n"
        "    fix: answer with base64(SHA-1(Sec-WebSocket-Key + "
        "'258EAFA5-E914-47DA-95CA-C5AB0DC85B11')), computed from the request's own key\n"
    ) in text


@pytest.mark.parametrize("framing", ["Content-Length: 0", "Transfer-Encoding: chunked"])
def test_101_with_body_framing(framing: str) -> None:
    diagnosis, text = judge(ws_switch(framing))
    assert rules(diagnosis) == ["no_content_framing"]
    title = framing.split(":")[0]
    assert (
        f"✗ the backend's 101 carries {title}, but a 1xx response has no content "
        "(RFC 9110 §8.6, RFC 9112 §6.1)\n"
        f"    fix: remove {title} from the 101\n"
    ) in text


def test_every_broken_rule_is_reported_not_only_the_first() -> None:
    raw = ws_switch("Content-Length: 0", accept=b"bm9wZQ==", connection=False)
    diagnosis, text = judge(raw)
    assert rules(diagnosis) == [
        "connection_lists_upgrade",
        "no_content_framing",
        "websocket_accept_matches",
    ]
    assert text.count("✗ ") == 3 and text.count("    fix: ") == 3
    assert "\n3 problems: this backend's switch would be refused" in text


def test_101_naming_no_protocol_is_also_judged_as_websocket() -> None:
    diagnosis, text = judge(head("HTTP/1.1 101 Switching Protocols", "Connection: upgrade"))
    assert rules(diagnosis) == ["upgrade_is_named", "websocket_accept_matches"]
    assert "✗ the backend answered 101 without an Upgrade header naming the new protocol" in text
    assert "Sec-WebSocket-Accept none, but the key calls for" in text


def test_101_with_a_subprotocol_and_extension_not_offered() -> None:
    raw = ws_switch("Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Extensions: permessage-deflate")
    diagnosis, text = judge(raw)
    assert rules(diagnosis) == ["websocket_subprotocol_offered", "websocket_extensions_offered"]
    assert "✗ the backend selected the subprotocol chat, but the client offered nothing" in text
    assert "✗ the backend enabled the extension permessage-deflate" in text


def test_101_to_a_request_that_did_not_offer_to_upgrade() -> None:
    request = build_request(TARGET, extra_headers=[("Connection", "keep-alive")])
    diagnosis, text = judge(ws_switch(), request)
    assert "unsolicited_switch" in rules(diagnosis)
    assert "✗ the backend answered 101 to a request that did not ask to upgrade" in text


def test_interim_responses_before_the_101_are_shown_and_skipped() -> None:
    raw = head("HTTP/1.1 103 Early Hints", "Link: </a.css>") + ws_switch()
    diagnosis, text = judge(raw)
    assert diagnosis.ok
    assert [h.status for h in diagnosis.interim] == [103]
    assert "  → HTTP/1.1 103 Early Hints (interim)\n  → HTTP/1.1 101 Switching Protocols\n" in text


def test_bytes_after_the_101_head_belong_to_the_new_protocol() -> None:
    diagnosis, _ = judge(ws_switch() + b"\x81\x02hi")
    assert diagnosis.ok


# -- no 101 -------------------------------------------------------------------------------


NO_SWITCH_CASES = [
    (
        head("HTTP/1.1 200 OK", "Content-Length: 2"),
        "the backend treated it as a plain request: is WebSocket enabled on this path (/ws)?",
    ),
    (
        head("HTTP/1.1 426 Upgrade Required", "Sec-WebSocket-Version: 8, 7"),
        "the backend speaks WebSocket version 8, 7, not 13 (RFC 6455 §4.4)",
    ),
    (
        head("HTTP/1.1 426 Upgrade Required", "Upgrade: TLS/1.2", "Connection: Upgrade"),
        "the backend wants an upgrade to TLS/1.2: check it with --protocol TLS/1.2",
    ),
    (
        head("HTTP/1.1 426 Upgrade Required"),
        "the backend requires an upgrade but did not accept this one",
    ),
    (
        head("HTTP/1.1 400 Bad Request"),
        "the backend refused the request as bad: check that /ws is a WebSocket endpoint",
    ),
    (head("HTTP/1.1 401 Unauthorized"), "--header 'Authorization: ...'"),
    (head("HTTP/1.1 403 Forbidden"), "it may check Origin (add --header 'Origin: "),
    (
        head("HTTP/1.1 404 Not Found"),
        "nothing is served at /ws on this backend: check the path in the URL",
    ),
    (head("HTTP/1.1 405 Method Not Allowed"), "the backend does not accept GET at /ws"),
    (
        head("HTTP/1.1 301 Moved Permanently", "Location: /ws/"),
        "the backend redirects to http://backend.test:9000/ws/: use that path in the URL "
        "(a missing or extra trailing slash is a common cause), and check it with: "
        "upgradeproxy check http://backend.test:9000/ws/",
    ),
    (
        head("HTTP/1.1 308 Permanent Redirect", "Location: https://backend.test/ws"),
        "the backend redirects to https://backend.test/ws: it wants TLS",
    ),
    (head("HTTP/1.1 302 Found"), "the backend redirects, but sends no Location"),
    (head("HTTP/1.1 500 Internal Server Error"), "the backend failed while handling the request"),
    (head("HTTP/1.1 501 Not Implemented"), "it may not support upgrades at all"),
    (head("HTTP/1.1 418 I'm a teapot"), "see the backend's documentation"),
]


@pytest.mark.parametrize(("raw", "hint"), NO_SWITCH_CASES)
def test_no_switch_says_what_came_instead(raw: bytes, hint: str) -> None:
    diagnosis, text = judge(raw)
    assert diagnosis.verdict is Verdict.NO_SWITCH and rules(diagnosis) == ["status"]
    status_line = raw.split(b"\r\n")[0].decode()
    assert f"  → {status_line}\n" in text
    assert (
        f"✗ the backend did not switch protocols: it answered {status_line[9:]} "
        "instead of 101 Switching Protocols\n" in text
    )
    [fix] = [line for line in text.splitlines() if line.startswith("    fix: ")]
    assert hint in fix
    status = diagnosis.response.status if diagnosis.response else 0
    assert text.endswith(
        f"1 problem: no switch; upgradeproxy would pass this {status} on to clients, "
        "and their websocket connection would fail\n"
    )


def test_200_to_another_protocol_names_it() -> None:
    _, text = judge(head("HTTP/1.1 200 OK"), PBS_REQUEST)
    assert f"is {PBS} enabled on this path (/ws)?" in text


# -- no readable answer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"garbage\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\n\n", "bare CR or LF"),
        (head("HTTP/1.1 101 Switching Protocols", "Upgrade : websocket"), "whitespace between"),
        (head("HTTP/2.0 101 Switching Protocols"), "response in HTTP version 2.0"),
    ],
)
def test_a_malformed_head_says_what_is_wrong(raw: bytes, reason: str) -> None:
    diagnosis, text = judge(raw)
    assert diagnosis.verdict is Verdict.MALFORMED and rules(diagnosis) == ["malformed"]
    assert "✗ the backend's response is not a valid HTTP/1.1 response head: " in text
    assert reason in text
    assert f"  → {len(raw)} bytes: '" in text
    assert text.endswith("1 problem: upgradeproxy would answer 502 Bad Gateway to clients\n")


def test_tls_bytes_say_the_backend_wants_https() -> None:
    alert = b"\x15\x03\x01\x00\x02\x02\x46"
    diagnosis, text = judge(alert)
    assert diagnosis.verdict is Verdict.NO_RESPONSE
    assert "the backend expects https on this port" in text
    assert "  → 7 bytes: '\\x15\\x03\\x01\\x00\\x02\\x02F'\n" in text


def test_closed_without_answering() -> None:
    diagnosis, text = judge(b"")
    assert diagnosis.verdict is Verdict.NO_RESPONSE and rules(diagnosis) == ["closed"]
    assert text == (
        f"upgradeproxy check: websocket upgrade to {URL}\n"
        "  → nothing (the connection closed)\n"
        "✗ the backend closed the connection without answering\n"
        "    fix: see the backend's logs: it may have failed on this request, or it may expect "
        "TLS (https) on this port\n"
        "1 problem: upgradeproxy would answer 502 Bad Gateway to clients\n"
    )


def test_closed_in_the_middle_of_the_head() -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    diagnosis, text = judge(raw)
    assert diagnosis.verdict is Verdict.NO_RESPONSE
    assert (
        "✗ the backend closed the connection in the middle of its response head, "
        f"after {len(raw)} bytes\n" in text
    )
    assert (
        "  → 54 bytes: 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\n'\n" in text
    )


def test_closed_after_an_interim_response() -> None:
    diagnosis, text = judge(head("HTTP/1.1 100 Continue"))
    assert diagnosis.verdict is Verdict.NO_RESPONSE
    assert "  → HTTP/1.1 100 Continue (interim)\n" in text
    assert "✗ the backend closed the connection after an interim 100 response" in text


def test_head_complete() -> None:
    assert not head_complete(b"")
    assert not head_complete(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert not head_complete(head("HTTP/1.1 103 Early Hints"))
    assert head_complete(ws_switch())
    assert head_complete(head("HTTP/1.1 404 Not Found"))
    assert head_complete(b"garbage\r\n\r\n")
    assert head_complete(b"HTTP/1.1 200 OK\n")  # a bare LF is an answer at once


# -- the words themselves --------------------------------------------------------------------


def test_backend_bytes_cannot_drive_the_terminal() -> None:
    raw = head("HTTP/1.1 200 O\x9b2J\x85K", "Content-Length: 0")
    _, text = judge(raw)
    assert "\x9b" not in text and "\x85" not in text
    assert "200 O\\x9b2J\\x85K" in text


def test_verbose_shows_both_heads() -> None:
    text = render(diagnose(WS_REQUEST, ws_switch()), URL, verbose=True)
    assert "  > GET /ws HTTP/1.1\n  > Host: backend.test:9000\n" in text
    assert f"  > Sec-WebSocket-Key: {KEY.decode()}\n" in text
    assert "  < HTTP/1.1 101 Switching Protocols\n  < Upgrade: websocket\n" in text


def test_an_ascii_stream_gets_plain_symbols() -> None:
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    _write(stream, render(diagnose(WS_REQUEST, ws_switch(connection=False)), URL))
    written = stream.buffer.getvalue().decode("ascii")
    assert "  -> HTTP/1.1 101 Switching Protocols\n" in written
    assert "X the backend answered 101 without 'Connection: upgrade' (RFC 9110 S.7.6.1)" in written


# -- the real command against scripted backends ---------------------------------------------

Responder = Callable[[RequestHead], bytes]


class CannedServer:
    """A threaded TCP server on 127.0.0.1 that answers each request with ``respond(head)``.

    The answer is sent in pieces of ``chunk`` bytes (all at once by default);
    then the connection is closed, or with ``hold`` kept open and silent until
    the server is closed. Every request head received is parsed with
    upgradeproxy's own strict parser and kept in ``requests``.
    """

    def __init__(self, respond: Responder, *, chunk: int = 0, hold: bool = False) -> None:
        self.respond = respond
        self.chunk = chunk
        self.hold = hold
        self.requests: list[RequestHead] = []
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, path: str = "/ws") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(TIMEOUT)
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
        parsed = parse_request_head(buf)
        assert parsed is not None
        self.requests.append(parsed[0])
        answer = self.respond(parsed[0])
        step = self.chunk or len(answer) or 1
        for i in range(0, len(answer), step):
            conn.sendall(answer[i : i + step])
            if self.chunk:
                time.sleep(0.001)
        if self.hold:
            self.stopped.wait(TIMEOUT)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(TIMEOUT)
        self.listener.close()


Start = Callable[..., CannedServer]


@pytest.fixture
def backend() -> Iterator[Start]:
    """Start scripted backends (``backend(respond, chunk=..., hold=...)``); all closed after."""
    servers: list[CannedServer] = []

    def start(respond: Responder, **options: Any) -> CannedServer:
        server = CannedServer(respond, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def accepting(request: RequestHead) -> bytes:
    """A correct WebSocket 101, its accept computed from the key received."""
    key = request.headers.get(b"sec-websocket-key") or b""
    return ws_switch(accept=rfc6455.accept_for(key))


def canned(raw: bytes) -> Responder:
    return lambda request: raw


CLI_CASES = [
    ("correct", accepting, 0, ["✓ correct switch to websocket"]),
    (
        "no Connection",
        lambda r: ws_switch(
            accept=rfc6455.accept_for(r.headers.get(b"sec-websocket-key") or b""), connection=False
        ),
        1,
        [
            "✗ the backend answered 101 without 'Connection: upgrade' (RFC 9110 §7.6.1)",
            "    fix: add 'Connection: upgrade' to the 101",
            "1 problem: this backend's switch would be refused",
        ],
    ),
    (
        "h2c",
        canned(head("HTTP/1.1 101 Switching Protocols", "Upgrade: h2c", "Connection: Upgrade")),
        1,
        ["✗ the backend switched to 'h2c', which the client did not offer"],
    ),
    (
        "wrong accept",
        canned(ws_switch()),  # computed from KEY, not from the fresh key sent
        1,
        ["(RFC 6455 §4.2.2)", "computed from the request's own key"],
    ),
    (
        "Content-Length",
        lambda r: accepting(r)[:-2] + b"Content-Length: 0\r\n\r\n",
        1,
        [
            "✗ the backend's 101 carries Content-Length",
            "    fix: remove Content-Length from the 101",
        ],
    ),
    (
        "200",
        canned(head("HTTP/1.1 200 OK", "Content-Length: 5") + b"hello"),
        1,
        [
            "  → HTTP/1.1 200 OK",
            "✗ the backend did not switch protocols: it answered 200 OK instead of 101",
            "is WebSocket enabled on this path (/ws)?",
        ],
    ),
    (
        "garbage",
        canned(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
        1,
        ["not a valid HTTP/1.1 response head: malformed status line"],
    ),
    ("close", canned(b""), 1, ["✗ the backend closed the connection without answering"]),
]


@pytest.mark.loopback
@pytest.mark.parametrize(
    ("respond", "status", "words"),
    [case[1:] for case in CLI_CASES],
    ids=[case[0] for case in CLI_CASES],
)
def test_cli_against_a_scripted_backend(
    backend: Start,
    capsys: pytest.CaptureFixture[str],
    respond: Responder,
    status: int,
    words: list[str],
) -> None:
    server = backend(respond)
    assert main(["check", server.url(), "--timeout", str(TIMEOUT)]) == status
    out = capsys.readouterr().out
    assert out.startswith(f"upgradeproxy check: websocket upgrade to {server.url()}\n")
    for line in words:
        assert line in out
    [request] = server.requests
    assert request.headers.get(b"host") == f"127.0.0.1:{server.port}".encode()


@pytest.mark.loopback
def test_cli_sends_extra_headers_and_another_protocol(
    backend: Start, capsys: pytest.CaptureFixture[str]
) -> None:
    server = backend(
        canned(head("HTTP/1.1 101 Switching Protocols", f"Upgrade: {PBS}", "Connection: upgrade"))
    )
    argv = ["check", server.url("/api2/json/backup?store=a"), "--protocol", PBS]
    argv += ["-H", "Authorization: PBSAPIToken=x", "--header", "Host: pbs.example"]
    assert main(argv) == 0
    assert f"✓ correct switch to {PBS}\n" in capsys.readouterr().out
    [request] = server.requests
    assert request.target == b"/api2/json/backup?store=a"
    assert list(request.headers) == [
        (b"Connection", b"Upgrade"),
        (b"Upgrade", PBS.encode()),
        (b"Authorization", b"PBSAPIToken=x"),
        (b"Host", b"pbs.example"),
    ]


@pytest.mark.loopback
def test_cli_reads_a_head_that_comes_byte_by_byte(
    backend: Start, capsys: pytest.CaptureFixture[str]
) -> None:
    server = backend(canned(head("HTTP/1.1 404 Not Found", "Content-Length: 0")), chunk=1)
    assert main(["check", server.url(), "--timeout", str(TIMEOUT)]) == 1
    assert "nothing is served at /ws on this backend" in capsys.readouterr().out


@pytest.mark.loopback
def test_cli_verbose(backend: Start, capsys: pytest.CaptureFixture[str]) -> None:
    server = backend(accepting)
    assert main(["check", "-v", server.url()]) == 0
    out = capsys.readouterr().out
    assert "  > GET /ws HTTP/1.1\n" in out
    assert "  < Sec-WebSocket-Accept: " in out


@pytest.mark.loopback
def test_cli_against_a_real_websocket_server(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(connection: ServerConnection) -> None:
        connection.close()

    with ws_serve(handler, "127.0.0.1", 0, compression=None) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.socket.getsockname()[1]
            assert main(["check", f"http://127.0.0.1:{port}/", "--timeout", str(TIMEOUT)]) == 0
        finally:
            server.shutdown()
            thread.join(TIMEOUT)
    assert "✓ correct switch to websocket\n" in capsys.readouterr().out


@pytest.mark.loopback
def test_cli_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # A bound socket that does not listen: its port is ours, and connecting is refused.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        assert main(["check", f"http://127.0.0.1:{port}/ws", "--timeout", str(TIMEOUT)]) == 2
    out = capsys.readouterr().out
    assert f"✗ connection refused by 127.0.0.1:{port}: is the backend running" in out
    assert out.endswith("not checked: the backend could not be reached\n")


@pytest.mark.loopback
def test_cli_backend_that_never_answers(backend: Start, capsys: pytest.CaptureFixture[str]) -> None:
    server = backend(canned(b""), hold=True)
    started = time.monotonic()
    assert main(["check", server.url(), "--timeout", "0.5"]) == 2
    assert time.monotonic() - started < 3
    out = capsys.readouterr().out
    assert (
        f"✗ the backend at 127.0.0.1:{server.port} accepted the connection but sent no "
        "complete response head within 0.5 s"
    ) in out


@pytest.mark.loopback
def test_cli_backend_that_sends_half_a_head_then_nothing(
    backend: Start, capsys: pytest.CaptureFixture[str]
) -> None:
    server = backend(canned(b"HTTP/1.1 101 Swi"), hold=True)
    assert main(["check", server.url(), "--timeout", "0.5"]) == 2
    assert "(only 16 bytes of one came)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["check"], "the following arguments are required: URL"),
        (["check", "https://a/ws"], "TLS backends cannot be checked yet"),
        (["check", "http://a/", "--header", "NoColon"], "write it as 'Name: value'"),
        (["check", "http://a/", "-H", "Bad Name: x"], "is not a header"),
        (["check", "http://a/", "-H", "X: caf\u20ac"], "only Latin-1"),
        (["check", "http://a/", "--protocol", "web socket"], "is not a protocol token"),
        (["check", "http://a/", "--timeout", "0"], "is not a timeout"),
        (["check", "http://a/", "--timeout", "soon"], "is not a timeout"),
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_and_say_why(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_help_lists_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "check     ask a backend to switch protocols, and say what it gets wrong" in out


def test_check_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    assert "examples:\n  upgradeproxy check http://127.0.0.1:9000/ws\n" in out
    assert "exit status:" in out


# -- as a separate process ------------------------------------------------------------------


def run_module(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "upgradeproxy", *args],
        capture_output=True,
        timeout=30,
        env={**os.environ, **env},
        check=False,
    )


@pytest.mark.loopback
def test_python_m_upgradeproxy_check(backend: Start) -> None:
    server = backend(accepting)
    result = run_module("check", server.url(), "--timeout", str(TIMEOUT), PYTHONIOENCODING="utf-8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == (
        f"upgradeproxy check: websocket upgrade to {server.url()}\n"
        "  → HTTP/1.1 101 Switching Protocols\n"
        "✓ correct switch to websocket\n"
    )


@pytest.mark.loopback
def test_python_m_upgradeproxy_check_in_an_ascii_terminal(
    backend: Start,
) -> None:
    server = backend(canned(head("HTTP/1.1 101 Switching Protocols", "Upgrade: websocket")))
    result = run_module("check", server.url(), PYTHONIOENCODING="ascii")
    assert result.returncode == 1, result.stderr
    out = result.stdout.decode("ascii")
    assert "X the backend answered 101 without 'Connection: upgrade' (RFC 9110 S.7.6.1)\n" in out
    assert "2 problems:" in out  # no Connection, and no Sec-WebSocket-Accept


@pytest.mark.loopback
def test_python_m_upgradeproxy_check_unreachable() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        result = run_module("check", f"http://127.0.0.1:{port}/", PYTHONIOENCODING="utf-8")
    assert result.returncode == 2
    assert b"connection refused" in result.stdout


def test_target_is_a_value() -> None:
    assert parse_target("http://a:1/x") == Target("http://a:1/x", "a", 1, "a:1", "/x")


def test_h2c_gets_a_note_on_forward_h2c() -> None:
    request = build_request(TARGET, "h2c")
    raw = head("HTTP/1.1 101 Switching Protocols", "Upgrade: h2c", "Connection: Upgrade")
    diagnosis, text = judge(raw, request)
    assert diagnosis.ok
    assert "note: upgradeproxy removes 'Upgrade: h2c' from requests unless it runs with " in text
    assert text.endswith(
        "--forward-h2c, so clients can switch this backend to h2c only then\n"
        "✓ correct switch to h2c\n"
    )


# -- an answer that explains itself ------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        head("HTTP/1.1 404 Not Found", "Content-Type: text/plain", "Content-Length: 93")
        + b"no route serves host backend.test and path /ws; the proxy's configuration lists "
        b"the hosts\n",
        head("HTTP/1.1 401 Unauthorized", "Transfer-Encoding: chunked")
        + encode_chunk(b"no route serves host backend.te")
        + encode_chunk(b"st and path /ws; the proxy's configuration lists the hosts")
        + b"0\r\n\r\n",
    ],
)
def test_an_error_with_a_body_is_shown_as_the_backend_wrote_it_with_no_guess(raw: bytes) -> None:
    diagnosis, text = judge(raw)
    assert diagnosis.verdict is Verdict.NO_SWITCH
    assert "    it said: no route serves host backend.test and path /ws; the proxy's" in text
    assert "fix:" not in text, "no guess at the cause where the answer gives its own"


def test_a_long_body_is_cut_to_its_start() -> None:
    raw = head("HTTP/1.1 403 Forbidden", "Content-Length: 2000") + b"x" * 2000
    _, text = judge(raw)
    (said,) = [line for line in text.splitlines() if line.startswith("    it said: ")]
    assert said == "    it said: " + "x" * 300 + "…"


def test_cli_waits_briefly_for_the_body_behind_the_head(
    backend: Start, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = (
        head("HTTP/1.1 401 Unauthorized", "Content-Length: 30") + b"upgrade refused: bad token 42\n"
    )
    server = backend(canned(answer), chunk=len(answer) - 30)  # head first, then the body
    assert main(["check", server.url(), "--timeout", str(TIMEOUT)]) == 1
    out = capsys.readouterr().out
    assert "    it said: upgrade refused: bad token 42\n" in out
    assert "Authorization" not in out


def test_cli_method_sends_the_upgrade_with_that_method(
    backend: Start, capsys: pytest.CaptureFixture[str]
) -> None:
    server = backend(accepting)
    assert main(["check", server.url(), "--method", "post", "--timeout", str(TIMEOUT)]) == 0
    (request,) = server.requests
    assert request.method == b"POST"
    assert request.headers.get(b"upgrade") == b"websocket"


def test_cli_method_connect_is_refused_with_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["check", "http://127.0.0.1:9/ws", "--method", "CONNECT"])
    assert exited.value.code == 2
    assert "CONNECT cannot carry an upgrade" in capsys.readouterr().err
