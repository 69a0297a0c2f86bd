"""``upgradeproxy check``: ask a backend to switch protocols, and say what it gets wrong.

An operator points it at a backend directly: it sends one correct
upgrade request, reads the backend's response head, and judges that head with
the very rules upgradeproxy applies (:data:`~upgradeproxy.validators.RFC9110_RULES`
and :data:`~upgradeproxy.validators.WEBSOCKET_RULES`). Where the proxy stops at
the first broken rule, this reports every one, each with its fix.

Data flows one way: :func:`build_request` makes the head, :func:`exchange`
(the only function here that touches a socket) sends it and returns the bytes
received, :func:`diagnose` judges them, :func:`render` writes the words. Only
:func:`run` and :func:`exchange` do I/O; everything else is pure and is tested
without sockets. This module is never used by the proxy itself.

Exit status: 0 for a correct switch, 1 when the backend answered wrongly (or
not at all), 2 when it could not be reached in time or the arguments are bad.
"""

from __future__ import annotations

import argparse
import base64
import enum
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from typing import TextIO
from urllib.parse import quote, urljoin

from twisted.internet.address import IPv4Address, IPv6Address

from ..core._proxyheader import VERSIONS
from ..core._proxyheader import encode as proxy_header
from ..core._url import BadUrl, UrlProblem, split_http_url
from ..http1 import (
    BodyKind,
    Headers,
    ProtocolError,
    RequestHead,
    ResponseHead,
    is_token,
    parse_request_head,
    parse_response_head,
    response_framing,
)
from ..interfaces import Refusal, UpgradeAttempt
from ..registry import DEFAULT_CHAIN
from ..validators import (
    RFC9110_RULES,
    WEBSOCKET_RULES,
    Rule,
    connection_lists_upgrade,
    unsolicited_switch,
)

#: Exit statuses of ``upgradeproxy check``.
EXIT_SWITCHED = 0
EXIT_WRONG = 1
EXIT_UNREACHABLE = 2

WEBSOCKET = "websocket"
DEFAULT_TIMEOUT = 10.0
#: The largest response head read, as the proxy's own default limit.
MAX_HEAD = 64 * 1024
#: Characters of a non-``101`` answer's body shown in the report.
PREVIEW = 300
#: Seconds to wait for that body once the head has come.
BODY_WAIT = 1.0

# RFC 3986 pchar plus "/" for the path, plus "?" for the query: what need not
# be percent-encoded. Anything else (spaces, non-ASCII) is encoded as UTF-8.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
# host [ ":" port ] with host a reg-name, an IPv4 address or an IP literal (RFC 3986 §3.2.2).
_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~%!$&'()*+,;=]+)(?::[0-9]*)?")


# -- what is checked ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """The backend to check: where to connect, and what goes in the request line."""

    url: str
    host: str
    port: int
    #: The ``Host`` header value: the URL's authority, as written.
    authority: str
    #: The request target: the URL's path and query, percent-encoded.
    path: str


def parse_target(url: str) -> Target:
    """Parse ``http://host[:port][/path][?query]``.

    Raises :class:`ValueError` with a message that says what to write instead.
    ``ws://`` is taken as ``http://``; a fragment is dropped (it is never sent).
    """
    usage = (
        "write the backend's URL as http://HOST:PORT/PATH (for example http://127.0.0.1:9000/ws)"
    )
    text = url.strip()
    if text.lower().startswith(("https:", "wss:")):
        raise ValueError(
            f"{url!r}: TLS backends cannot be checked yet (upgradeproxy check speaks plain "
            f"HTTP); {usage}"
        )
    try:
        parts = split_http_url(text, {"http": 80, "ws": 80})
    except BadUrl as e:
        if e.problem is UrlProblem.SCHEME:
            raise ValueError(f"{url!r} is not an http:// URL; {usage}") from None
        if e.problem is UrlProblem.CREDENTIALS:
            raise ValueError(
                f"{url!r} carries credentials; send them with --header 'Authorization: ...' instead"
            ) from None
        raise ValueError(f"{url!r} {e.problem.value}; {usage}") from None
    host, authority = parts.host, parts.netloc
    if not authority.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{url!r} has an invalid host name; {usage}") from None
        authority = f"{host}:{parts.port}" if parts.port_given else host
    if _AUTHORITY.fullmatch(authority) is None:
        raise ValueError(f"{url!r} {UrlProblem.BAD_HOST.value}; {usage}")
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_QUERY_SAFE)
    return Target(url, host, parts.port, authority, path)


def new_websocket_key() -> bytes:
    """A fresh random ``Sec-WebSocket-Key``: base64 of 16 random bytes (RFC 6455 §4.1)."""
    return base64.b64encode(secrets.token_bytes(16))


def build_request(
    target: Target,
    protocol: str = WEBSOCKET,
    extra_headers: list[tuple[str, str]] | None = None,
    *,
    websocket_key: bytes | None = None,
    method: str = "GET",
) -> RequestHead:
    """A correct upgrade request for ``target`` offering ``protocol``.

    ``method`` (``GET`` by default; Docker-style attach endpoints take
    ``POST``), then always ``Host``, ``Connection: Upgrade`` and ``Upgrade: protocol``;
    for ``websocket`` also ``Sec-WebSocket-Version: 13`` and a
    ``Sec-WebSocket-Key`` (``websocket_key``, or a fresh random one). An extra
    header replaces every default header of the same name, so that
    ``Host`` or ``Connection`` can be changed; extra headers are sent in order,
    after the defaults.

    Raises :class:`ValueError` when the result is not a well-formed request
    head, as judged by upgradeproxy's own parser.
    """
    extra = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in extra_headers or []]
    defaults = [
        (b"Host", target.authority.encode("ascii", "strict")),
        (b"Connection", b"Upgrade"),
        (b"Upgrade", protocol.encode("ascii")),
    ]
    if protocol.lower() == WEBSOCKET:
        key = new_websocket_key() if websocket_key is None else websocket_key
        defaults += [(b"Sec-WebSocket-Version", b"13"), (b"Sec-WebSocket-Key", key)]
    replaced = {name.lower() for name, _ in extra}
    fields = [f for f in defaults if f[0].lower() not in replaced] + extra
    request = RequestHead(
        method.encode("ascii"), target.path.encode("ascii"), (1, 1), Headers.of(fields)
    )
    try:
        parse_request_head(request.serialize())
    except ProtocolError as e:
        raise ValueError(f"the request would not be valid HTTP/1.1: {e.reason}") from None
    return request


# -- judging the answer (pure) ----------------------------------------------------------


class Verdict(enum.Enum):
    """What the backend did with the upgrade request."""

    #: A ``101`` that breaks no rule: upgradeproxy would let it through.
    SWITCHED = "switched"
    #: A ``101`` that breaks at least one rule: upgradeproxy would answer ``502``.
    BAD_SWITCH = "bad switch"
    #: A final response other than ``101``: the backend declined to switch.
    NO_SWITCH = "no switch"
    #: Bytes that are not a well-formed HTTP/1.1 response head.
    MALFORMED = "malformed"
    #: The connection closed before a complete final response head.
    NO_RESPONSE = "no response"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the backend got wrong, in words a person can act on."""

    #: One sentence naming what is wrong (for a broken rule, the validator's reason).
    reason: str
    #: What to change in the backend, when something can be said.
    hint: str = ""
    #: Another way out when the backend cannot be changed (optional).
    workaround: str = ""
    #: What was judged: the name of the rule function from
    #: :mod:`upgradeproxy.validators`, or ``"status"``, ``"malformed"``, ``"closed"``.
    rule: str = ""
    #: For an answer other than a switch: the start of its body, as the backend wrote it.
    said: str = ""


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The verdict on one backend answer, with every problem found in it."""

    request: RequestHead
    verdict: Verdict
    findings: tuple[Finding, ...] = ()
    #: The final response head (the ``101`` or what came instead), if one was parsed.
    response: ResponseHead | None = None
    #: Interim ``1xx`` heads that came before it (upgradeproxy passes them on).
    interim: tuple[ResponseHead, ...] = ()
    #: Every byte received, as received.
    received: bytes = field(default=b"", repr=False)
    #: Things worth knowing that are not the backend's fault.
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the backend switched correctly."""
        return self.verdict is Verdict.SWITCHED

    @property
    def offered(self) -> str:
        """The protocols the request offered, as text (``"websocket"``)."""
        return ", ".join(_text(p) for p in self.request.headers.elements(b"upgrade")) or "nothing"


def split_heads(raw: bytes | bytearray) -> tuple[list[ResponseHead], bool, int]:
    """:func:`read_heads`, and the offset of the first byte after the last head."""
    heads: list[ResponseHead] = []
    start = 0
    while True:
        parsed = parse_response_head(raw, start, MAX_HEAD)
        if parsed is None:
            return heads, False, start
        head, start = parsed
        heads.append(head)
        if head.status == 101 or head.status >= 200:
            return heads, True, start


def read_heads(raw: bytes | bytearray) -> tuple[list[ResponseHead], bool]:
    """The response heads at the start of ``raw``, and whether they are complete.

    They are complete with a ``101`` or a final (``2xx``..``5xx``) head; interim
    ``1xx`` heads before it are returned too, as upgradeproxy passes them on.
    Raises :class:`~upgradeproxy.http1.ProtocolError` for a malformed head.
    """
    heads, complete, _ = split_heads(raw)
    return heads, complete


def body_preview(raw: bytes | bytearray) -> bytes:
    """The start of the body behind a final response head other than ``101``; ``b""`` otherwise.

    De-chunked where it is chunked; one byte more than :data:`PREVIEW` at most,
    so that the report can say it was cut.
    """
    try:
        heads, complete, end = split_heads(raw)
    except ProtocolError:
        return b""
    if not complete or heads[-1].status == 101:
        return b""
    body = bytes(raw[end : end + 4 * PREVIEW])
    try:
        chunks, _ = response_framing(heads[-1], b"GET").decoder().decode(bytearray(body))
        body = b"".join(chunks)
    except ProtocolError:
        pass  # show it as it came
    return body[: PREVIEW + 1]


def head_complete(raw: bytes | bytearray) -> bool:
    """True when ``raw`` holds enough to judge: a final head, or a malformed one."""
    try:
        return read_heads(raw)[1]
    except ProtocolError:
        return True


def diagnose(request: RequestHead, raw_response: bytes) -> Diagnosis:
    """Judge ``raw_response``, everything a backend sent to ``request`` up to EOF.

    A ``101`` is checked against every rule of
    :data:`~upgradeproxy.validators.RFC9110_RULES` (and
    :func:`~upgradeproxy.validators.unsolicited_switch`), and of
    :data:`~upgradeproxy.validators.WEBSOCKET_RULES` when the switch is to
    WebSocket; each broken rule is one :class:`Finding`, where the proxy would
    stop at the first. Anything else -- another status, a malformed head, a
    connection closed early -- is one finding that says what came instead.
    """
    diagnosis = _judge(request, raw_response)
    return replace(diagnosis, notes=_notes(request))


def _judge(request: RequestHead, raw_response: bytes) -> Diagnosis:
    try:
        heads, complete = read_heads(raw_response)
    except ProtocolError as e:
        return Diagnosis(
            request, Verdict.MALFORMED, (_malformed(e, raw_response),), received=raw_response
        )
    if not complete:
        finding = _closed_early(raw_response, tuple(heads))
        return Diagnosis(
            request, Verdict.NO_RESPONSE, (finding,), interim=tuple(heads), received=raw_response
        )
    *interim, response = heads
    if response.status != 101:
        finding = _no_switch(request, response, body_preview(raw_response))
        return Diagnosis(
            request, Verdict.NO_SWITCH, (finding,), response, tuple(interim), raw_response
        )
    findings = tuple(_broken_rules(UpgradeAttempt(request, response)))
    verdict = Verdict.BAD_SWITCH if findings else Verdict.SWITCHED
    return Diagnosis(request, verdict, findings, response, tuple(interim), raw_response)


def _notes(request: RequestHead) -> tuple[str, ...]:
    if b"h2c" in request.headers.tokens(b"upgrade"):
        return (
            "upgradeproxy removes 'Upgrade: h2c' from requests unless it runs with "
            "--forward-h2c, so clients can switch this backend to h2c only then",
        )
    return ()


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _offers_websocket(attempt: UpgradeAttempt) -> bool:
    return WEBSOCKET.encode() in (p.lower() for p in attempt.offered)


def _websocket_rules_apply(attempt: UpgradeAttempt) -> bool:
    """When a ``101`` is judged as a WebSocket switch.

    Whenever it names ``websocket`` (as the proxy's websocket validator does),
    and also when it names no protocol at all in answer to a WebSocket offer:
    once its ``Upgrade`` is fixed it will be judged so, and every fix it needs
    is better told at once.
    """
    selected = [p.lower() for p in attempt.selected]
    if WEBSOCKET.encode() in selected:
        return True
    return not selected and _offers_websocket(attempt)


def _broken_rules(attempt: UpgradeAttempt) -> list[Finding]:
    rules: list[Rule] = [unsolicited_switch, *RFC9110_RULES]
    if _websocket_rules_apply(attempt):
        rules += WEBSOCKET_RULES
    findings = []
    for rule in rules:
        refusal = rule(attempt)
        if refusal is not None:
            findings.append(_finding(rule, refusal, attempt))
    return findings


def _finding(rule: Rule, refusal: Refusal, attempt: UpgradeAttempt) -> Finding:
    workaround = ""
    if rule is connection_lists_upgrade:
        chain = "--validator rfc9110:lenient-connection"
        if _offers_websocket(attempt):
            chain += " --validator websocket"
        workaround = f"if the backend cannot be changed, run upgradeproxy with {chain}"
    return Finding(refusal.reason, refusal.hint, workaround, rule.__name__)


def _malformed(error: ProtocolError, raw: bytes) -> Finding:
    hint = "fix the backend's response head: it must be HTTP/1.1 (RFC 9112)"
    if _looks_like_tls(raw):
        hint = _TLS_HINT
    return Finding(
        f"the backend's response is not a valid HTTP/1.1 response head: {error.reason}",
        hint,
        rule="malformed",
    )


_TLS_HINT = (
    "these bytes look like TLS: the backend expects https on this port, and upgradeproxy "
    "speaks plain HTTP to backends; use a plain-HTTP port of the backend"
)


def _looks_like_tls(raw: bytes) -> bool:
    # A TLS record starts with its content type (alert 21, handshake 22) and version 3.x.
    return len(raw) >= 2 and raw[0] in (21, 22) and raw[1] == 3


def _closed_early(raw: bytes, interim: tuple[ResponseHead, ...]) -> Finding:
    if not raw:
        return Finding(
            "the backend closed the connection without answering",
            "see the backend's logs: it may have failed on this request, or it may expect "
            "TLS (https) on this port",
            rule="closed",
        )
    if _looks_like_tls(raw):
        return Finding(
            f"the backend closed the connection after {len(raw)} bytes that are not HTTP",
            _TLS_HINT,
            rule="closed",
        )
    if interim:
        last = interim[-1]
        return Finding(
            f"the backend closed the connection after an interim {last.status} response, "
            "without a final response",
            "after a 1xx interim response the backend must still send a final response or "
            "101 (RFC 9110 §15.2)",
            rule="closed",
        )
    return Finding(
        f"the backend closed the connection in the middle of its response head, after "
        f"{len(raw)} bytes",
        "the backend must send the whole head, ending with an empty line (CRLF CRLF), "
        "before it closes (RFC 9112 §2.1)",
        rule="closed",
    )


def _no_switch(request: RequestHead, response: ResponseHead, body: bytes) -> Finding:
    """What came instead of a switch: its status, and what its body says.

    The body of an error is the backend's (or a proxy's, or a validator's) own
    words about what went wrong: when there is one it is shown instead of a
    guess at the cause. What a 2xx, a redirect or a 426 means is read from
    the head itself, so those keep their advice.
    """
    status = f"{response.status} {_text(response.reason)}".rstrip()
    said = " ".join(body.decode("utf-8", "replace").split())
    explained_by_head = response.status < 400 or response.status == 426
    return Finding(
        f"the backend did not switch protocols: it answered {status} instead of "
        "101 Switching Protocols",
        _why_no_switch(request, response) if explained_by_head or not said else "",
        rule="status",
        said=said[:PREVIEW] + ("…" if len(said) > PREVIEW else ""),
    )


def _why_no_switch(request: RequestHead, response: ResponseHead) -> str:
    """A likely cause of a non-``101`` answer to an upgrade, for the common statuses."""
    status = response.status
    path = _text(request.target)
    offered = request.headers.elements(b"upgrade")
    name = _text(offered[0]) if offered else "the protocol"
    if name.lower() == WEBSOCKET:
        name = "WebSocket"
    if 200 <= status < 300:
        return (
            f"the backend treated it as a plain request: is {name} enabled on this path ({path})?"
        )
    if 300 <= status < 400:
        return _why_redirect(request, response)
    if status == 400:
        return (
            f"the backend refused the request as bad: check that {path} is a {name} endpoint, "
            "and whether the backend wants a header this check does not send (an Origin, a "
            "subprotocol, a token): add it with --header"
        )
    if status == 401:
        return "the backend wants credentials: send them with --header 'Authorization: ...'"
    if status == 403:
        return (
            "the backend refuses this client: it may check Origin (add --header 'Origin: "
            "https://your.site') or want credentials (--header 'Authorization: ...')"
        )
    if status == 404:
        return f"nothing is served at {path} on this backend: check the path in the URL"
    if status == 405:
        method = _text(request.method)
        return (
            f"the backend does not accept {method} at {path}: check that this is the {name} "
            "endpoint, or offer the upgrade with another --method"
        )
    if status == 426:
        return _why_upgrade_required(request, response)
    if status == 501:
        return "the backend does not implement this request: it may not support upgrades at all"
    if 500 <= status < 600:
        return "the backend failed while handling the request: see its logs"
    return f"see the backend's documentation for how it accepts {name} upgrades"


def _why_redirect(request: RequestHead, response: ResponseHead) -> str:
    location = response.headers.get(b"location")
    if location is None:
        return "the backend redirects, but sends no Location: see its configuration"
    host = _text(request.headers.get(b"host") or b"")
    absolute = urljoin(f"http://{host}{_text(request.target)}", _text(location))
    advice = f"the backend redirects to {absolute}: "
    if absolute.startswith("https:"):
        return advice + (
            "it wants TLS, and upgradeproxy speaks plain HTTP to backends; point upgradeproxy "
            "at a plain-HTTP port of the backend, or turn the redirect off"
        )
    return advice + (
        "use that path in the URL (a missing or extra trailing slash is a common cause), "
        f"and check it with: upgradeproxy check {absolute}"
    )


def _why_upgrade_required(request: RequestHead, response: ResponseHead) -> str:
    wanted = response.headers.elements(b"upgrade")
    versions = response.headers.elements(b"sec-websocket-version")
    offered = [p.lower() for p in request.headers.elements(b"upgrade")]
    if versions and WEBSOCKET.encode() in offered:
        return (
            f"the backend speaks WebSocket version {', '.join(_text(v) for v in versions)}, "
            "not 13 (RFC 6455 §4.4): upgradeproxy and browsers speak only 13"
        )
    if wanted and not any(p.lower() in offered for p in wanted):
        names = ", ".join(_text(p) for p in wanted)
        return (
            f"the backend wants an upgrade to {names}: check it with --protocol {_text(wanted[0])}"
        )
    return (
        "the backend requires an upgrade but did not accept this one: check the protocol "
        "(--protocol) and the handshake headers it expects (--header)"
    )


# -- the words ----------------------------------------------------------------------------


def render(diagnosis: Diagnosis, url: str, *, verbose: bool = False) -> str:
    """The report of ``upgradeproxy check``: a title, what came, each problem, a verdict.

    With ``verbose``, the request sent and every response head received are
    shown in full. Bytes from the backend are shown with control characters
    escaped, so that a hostile backend cannot drive the terminal.
    """
    lines = [_title(diagnosis.request, url)]
    if verbose:
        lines += _request_lines(diagnosis.request)
    lines += _received_lines(diagnosis, verbose)
    for finding in diagnosis.findings:
        lines.append(f"✗ {finding.reason}")
        if finding.said:
            lines.append(f"    it said: {finding.said}")
        if finding.hint:
            lines.append(f"    fix: {finding.hint}")
        if finding.workaround:
            lines.append(f"    or: {finding.workaround}")
    lines += [f"note: {note}" for note in diagnosis.notes]
    lines.append(_conclusion(diagnosis))
    return "".join(_printable(line) + "\n" for line in lines)


def render_unreachable(request: RequestHead, url: str, why: str, *, verbose: bool = False) -> str:
    """The report when the backend could not be asked (exit status 2)."""
    lines = [_title(request, url)]
    if verbose:
        lines += _request_lines(request)
    lines += [f"✗ {why}", "not checked: the backend could not be reached"]
    return "".join(_printable(line) + "\n" for line in lines)


def _title(request: RequestHead, url: str) -> str:
    offered = ", ".join(_text(p) for p in request.headers.elements(b"upgrade")) or "no"
    return f"upgradeproxy check: {offered} upgrade to {url}"


def _request_lines(request: RequestHead) -> list[str]:
    return ["  > " + _text(line) for line in request.serialize().split(b"\r\n")[:-2]]


def _status_line(head: ResponseHead) -> str:
    major, minor = head.version
    return f"HTTP/{major}.{minor} {head.status} {_text(head.reason)}".rstrip()


def _received_lines(diagnosis: Diagnosis, verbose: bool) -> list[str]:
    heads = [*diagnosis.interim, *([diagnosis.response] if diagnosis.response else [])]
    if heads and verbose:
        return [
            "  < " + _text(line) for head in heads for line in head.serialize().split(b"\r\n")[:-2]
        ]
    if heads:
        interim = [f"  → {_status_line(h)} (interim)" for h in diagnosis.interim]
        final = [f"  → {_status_line(diagnosis.response)}"] if diagnosis.response else []
        return interim + final
    raw = diagnosis.received
    if not raw:
        return ["  → nothing (the connection closed)"]
    preview = repr(raw[:72])[1:] + ("…" if len(raw) > 72 else "")
    return [f"  → {len(raw)} bytes: {preview}"]


def _conclusion(diagnosis: Diagnosis) -> str:
    verdict = diagnosis.verdict
    if verdict is Verdict.SWITCHED:
        assert diagnosis.response is not None
        selected = ", ".join(_text(p) for p in diagnosis.response.headers.elements(b"upgrade"))
        return f"✓ correct switch to {selected}"
    count = len(diagnosis.findings)
    problems = f"{count} problem{'s' if count != 1 else ''}"
    if verdict is Verdict.BAD_SWITCH:
        chain = ", ".join(DEFAULT_CHAIN)
        return (
            f"{problems}: this backend's switch would be refused by upgradeproxy's default "
            f"validators ({chain}), and clients would get 502 Bad Gateway"
        )
    if verdict is Verdict.NO_SWITCH:
        assert diagnosis.response is not None
        return (
            f"{problems}: no switch; upgradeproxy would pass this {diagnosis.response.status} "
            f"on to clients, and their {diagnosis.offered} connection would fail"
        )
    return f"{problems}: upgradeproxy would answer 502 Bad Gateway to clients"


def _printable(line: str) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in line)


# -- the one function that touches the network ------------------------------------------


class Unreachable(Exception):
    """The backend could not be asked: no connection, or no complete answer in time.

    The message says what happened and what to look at, in a sentence.
    """


def exchange(
    target: Target,
    request: RequestHead,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    send_proxy: str | None = None,
) -> bytes:
    """Send ``request`` to ``target`` and return what came back, up to the end of the head.

    ``send_proxy`` ("v1" or "v2") puts a PROXY protocol header before the
    request, naming this end of the connection, as the proxy does for a
    route with ``send_proxy``.

    Reads until a complete final (or ``101``) response head, a malformed one,
    or EOF. Connecting, sending and reading share one deadline of ``timeout``
    seconds (name resolution is left to the system resolver's own limits).
    A reset connection counts as closed: what came before it is judged.
    Raises :class:`Unreachable` when there is no connection, or no answer in time.
    """
    host = f"[{target.host}]" if ":" in target.host else target.host
    where = f"{host}:{target.port}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
    except socket.gaierror as e:
        raise Unreachable(f"cannot resolve the host {target.host!r}: {e.strerror}") from None
    except ConnectionRefusedError:
        raise Unreachable(
            f"connection refused by {where}: is the backend running, and listening on this port?"
        ) from None
    except TimeoutError:
        raise Unreachable(
            f"no connection to {where} within {timeout:g} s: is the host up, and does a "
            "firewall let the connection through?"
        ) from None
    except OSError as e:
        raise Unreachable(f"cannot connect to {where}: {e.strerror or e}") from None
    received = bytearray()
    with sock:
        header = b"" if send_proxy is None else _proxy_header(send_proxy, sock)
        try:
            try:
                sock.settimeout(_remaining(deadline))
                sock.sendall(header + request.serialize())
            except (BrokenPipeError, ConnectionResetError):
                pass  # it may still have answered before closing: read what came
            while not head_complete(received):
                sock.settimeout(_remaining(deadline))
                data = sock.recv(65536)
                if not data:
                    break
                received += data
            _read_body_preview(sock, received, min(deadline, time.monotonic() + BODY_WAIT))
        except ConnectionResetError:
            pass
        except TimeoutError:
            came = f" (only {len(received)} bytes of one came)" if received else ""
            raise Unreachable(
                f"the backend at {where} accepted the connection but sent no complete "
                f"response head within {timeout:g} s{came}: is it an HTTP server, and is it "
                "overloaded?"
            ) from None
    return bytes(received)


def _read_body_preview(sock: socket.socket, received: bytearray, deadline: float) -> None:
    """Read on, until ``deadline`` at the latest, for the start of a non-``101`` answer's body.

    The head has come: whatever happens now (a timeout, a reset) only cuts the
    preview short.
    """
    while _wants_more_body(received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        received += data


def _wants_more_body(received: bytes | bytearray) -> bool:
    """True while the body of a non-``101`` answer could still grow towards its preview."""
    try:
        heads, complete, end = split_heads(received)
    except ProtocolError:
        return False
    if not complete or heads[-1].status == 101:
        return False
    framing = response_framing(heads[-1], b"GET")
    if framing.kind is BodyKind.NONE:
        return False
    wanted = min(framing.length, PREVIEW) if framing.kind is BodyKind.LENGTH else PREVIEW
    return len(received) - end < wanted and len(body_preview(received)) < wanted


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    return remaining


# -- the command line -----------------------------------------------------------------

DESCRIPTION = """\
Ask a backend directly (not through the proxy) to switch protocols, and say in
plain words whether its answer is a correct switch -- and if not, every rule it
breaks and how to fix it. The answer is judged by the same rules that
upgradeproxy's default validators (rfc9110, websocket) apply.

By default the request is a WebSocket handshake (GET, Host, Connection: Upgrade,
Upgrade: websocket, Sec-WebSocket-Version: 13, a fresh random
Sec-WebSocket-Key); with --protocol TOKEN it offers 'Upgrade: TOKEN' instead."""

EPILOG = """\
examples:
  upgradeproxy check http://127.0.0.1:9000/ws
  upgradeproxy check http://127.0.0.1:8007/api2/json/backup \\
      --protocol proxmox-backup-protocol-v1 -H 'Authorization: PBSAPIToken=...'
  upgradeproxy check http://10.0.0.5:3000/socket -H 'Origin: https://chat.example.com'
  upgradeproxy check http://10.0.0.5:3000/socket -H 'Host: chat.example.com' -v

exit status:
  0  the backend switched correctly
  1  it did not (each problem is listed, with how to fix it)
  2  it could not be reached in time, or the arguments are bad"""


def _proxy_header(version: str, sock: socket.socket) -> bytes:
    kind = IPv6Address if sock.family == socket.AF_INET6 else IPv4Address
    here, there = sock.getsockname(), sock.getpeername()
    return proxy_header(version, kind("TCP", here[0], here[1]), kind("TCP", there[0], there[1]))


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``check`` subcommand to the ``upgradeproxy`` command line."""
    parser = subparsers.add_parser(
        "check",
        help="ask a backend to switch protocols, and say what it gets wrong",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "url",
        type=_url_argument,
        metavar="URL",
        help="the backend itself, as http://HOST:PORT/PATH",
    )
    parser.add_argument(
        "--protocol",
        "-p",
        type=_token_argument,
        default=WEBSOCKET,
        metavar="TOKEN",
        help="the protocol to offer in Upgrade (default: websocket, with its handshake headers)",
    )
    parser.add_argument(
        "--method",
        "-X",
        type=_method_argument,
        default="GET",
        metavar="METHOD",
        help="the request method (default GET; Docker-style attach endpoints take POST)",
    )
    parser.add_argument(
        "--header",
        "-H",
        type=_header_argument,
        action="append",
        default=[],
        dest="headers",
        metavar="'NAME: VALUE'",
        help="send this header too; repeatable; replaces a default header of the same name "
        "(Host, Connection, Upgrade, Sec-WebSocket-*)",
    )
    parser.add_argument(
        "--send-proxy",
        choices=VERSIONS,
        default=None,
        help="send a PROXY protocol header first, for a backend that wants one (as a route's "
        "send_proxy does)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds_argument,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="give up when no complete response head has come by then "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show the request sent and the whole response head",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Carry out ``upgradeproxy check`` as parsed by :func:`add_parser`; return the exit status."""
    target: Target = args.url
    try:
        request = build_request(target, args.protocol, args.headers, method=args.method)
    except ValueError as e:
        sys.stderr.write(f"upgradeproxy check: {e}\n")
        return EXIT_UNREACHABLE
    try:
        raw = exchange(target, request, args.timeout, send_proxy=args.send_proxy)
    except Unreachable as e:
        _write(sys.stdout, render_unreachable(request, target.url, str(e), verbose=args.verbose))
        return EXIT_UNREACHABLE
    diagnosis = diagnose(request, raw)
    _write(sys.stdout, render(diagnosis, target.url, verbose=args.verbose))
    return EXIT_SWITCHED if diagnosis.ok else EXIT_WRONG


# For terminals and pipes that cannot show them (an ASCII locale, a Windows console).
_PLAIN = str.maketrans({"✓": "OK", "✗": "X", "→": "->", "…": "...", "§": "S."})


def _write(stream: TextIO, text: str) -> None:
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        text = text.translate(_PLAIN).encode(encoding, "replace").decode(encoding)
    stream.write(text)
    stream.flush()


def _url_argument(text: str) -> Target:
    try:
        return parse_target(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _token_argument(text: str) -> str:
    if not is_token(text.encode("latin-1", "replace")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a protocol token (letters, digits and !#$%&'*+-.^_`|~, "
            "for example websocket or proxmox-backup-protocol-v1)"
        )
    return text


def _method_argument(text: str) -> str:
    if not is_token(text.encode("latin-1", "replace")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a request method (for example POST)")
    if text.upper() == "CONNECT":
        raise argparse.ArgumentTypeError("CONNECT cannot carry an upgrade: use GET or POST")
    return text.upper()


def _header_argument(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not is_token(name.encode("latin-1", "replace")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a header: write it as 'Name: value' (for example "
            "'Origin: https://chat.example.com')"
        )
    value = value.strip(" \t")
    if any(c in value for c in "\r\n\0"):
        raise argparse.ArgumentTypeError(f"the value of {name} may not contain CR, LF or NUL")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"the value of {name} has characters that HTTP/1.1 headers cannot carry "
            "(only Latin-1): percent-encode or base64 it"
        ) from None
    return name, value


def _seconds_argument(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 86400:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a timeout: write a number of seconds, such as 10 or 0.5"
        )
    return seconds
