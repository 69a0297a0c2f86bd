"""The proxy's configuration: plain data, and the TOML file reader that fills it.

Every value here is already checked and resolved: a route carries its own
timeouts and limits, with the file's top-level values filled in where the
route says nothing. Nothing in this module opens a socket or starts a timer;
the twistd glue (:mod:`upgradeproxy.cli.tap`) turns a :class:`ProxyConfig` into
running services.

The file (``examples/upgradeproxy.toml`` shows every key, with comments)::

    listen = ["tcp:8080"]           # Twisted server endpoints; absent: tcp:8080:interface=127.0.0.1
    workers = 1                     # or "auto": one per CPU it may run on
    metrics = "tcp:9100:interface=127.0.0.1"
    forward_h2c = false
    splice = true

    [timeouts]                      # seconds; tunnel_idle and tunnel_lifetime: 0 or false is off
    client_head = 60
    keep_alive = 60
    backend_connect = 10            # this and the next three can be set per route too
    response_head = 60
    tunnel_idle = 0
    tunnel_lifetime = 0
    shutdown_grace = 30

    [limits]                        # 0 or false: no limit (except max_request_head)
    max_connections = 10000
    max_tunnels = 10000
    max_request_head = "32KiB"
    max_request_body = 0            # can be set per route too
    client_connections = 0          # per client address; the next three per route too
    client_tunnels = 0
    client_upgrade_rate = 0         # upgrade attempts per second
    client_upgrade_burst = 0        # attempts at once; absent: the rate rounded up
    client_ipv6_prefix = 64         # an IPv6 client is its /64

    [proxy_protocol]                # listeners behind a load balancer that sends the header
    listen = ["tcp:8081"]
    trusted_proxies = ["10.0.0.0/8"]   # only these may (and must) send it
    header_timeout = 5

    [http2]
    enabled = true                  # offer h2 to TLS clients over ALPN
    cleartext = false               # accept the prior-knowledge preface on cleartext listeners
    max_concurrent_streams = 100
    stall_timeout = 60              # a stream whose window stays shut is reset after this

    [access_log]
    format = "text"                 # or "json"
    path = "-"                      # "-" is standard output; absent: the main log

    [[route]]                       # one per route, at least one
    name = "chat"
    hosts = ["chat.example.com", "*.chat.example.com"]    # or host = "..."; absent: any host
    path = "/ws"
    backends = ["http://10.0.0.1:9000", "http://10.0.0.2:9000"]
    policy = "least-conn"           # round-robin, least-conn or client-hash
    validators = ["rfc9110", "websocket"]
    fail_timeout = 10
    max_request_body = "10MiB"
    send_proxy = "v2"               # a PROXY protocol header to every backend connection
    [route.timeouts]                # backend_connect, response_head, tunnel_idle, tunnel_lifetime
    tunnel_idle = 3600
    [route.limits]                  # max_request_body, and per-client limits of this route
    client_tunnels = 10             # counted on this route, on top of [limits]
    client_upgrade_rate = 1
    [route.health]                  # an active health check
    path = "/healthz"
    interval = 10
    timeout = 5
    expect_status = 200
    [route.tls]                     # for https:// backends
    ca = "ca.pem"
    verify = true

Sizes are a whole number of bytes, or a string with a unit: ``KiB``, ``MiB``
and ``GiB`` are 1024, 1024² and 1024³ bytes; ``KB``, ``MB`` and ``GB`` are
1000, 1000² and 1000³ (``"32KiB"``, ``"10 MB"``; case does not matter).
Relative file paths (``ca``, the access log's ``path``) start from the
directory of the configuration file, not from the current directory.

Every mistake is reported, not only the first, each on its own line as
``FILE:LINE: KEY: what is wrong; what to write instead``. In KEY, routes are
numbered from 1, as their default names are (``route[1]`` is "route 1"), and
the items of a list from 0 (``route[1].backends[0]`` is the first route's first
backend).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from ..core._proxyheader import VERSIONS
from ..core.address import BadBackend, parse_backend
from ..core.balancer import HealthCheck, Policy
from ..core.proxyprotocol import HEADER_TIMEOUT, parse_network
from ..interfaces import IValidatorPlugin
from ..registry import DEFAULT_CHAIN, BadValidator, build_chain, installed_validators
from . import _values
from ._endpoints import ENDPOINT_USAGE, NotAnEndpoint, check_server_endpoint
from ._tomllines import BARE_KEY, KeyLines, Path

#: Loopback, like everything else unless another interface is named: a proxy
#: is put in front of the world on purpose, never by default.
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"

_show = _values.show


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Where requests for some hosts and a path prefix go, and how."""

    #: A name for logs, metrics and the status page ("route 1" when not given).
    name: str
    #: Host names this route serves (``*.example.com`` allowed); empty for any host.
    hosts: tuple[str, ...]
    #: Path prefix this route serves; ``/`` serves every path.
    path: str
    #: Backend URLs or Twisted client endpoint strings, at least one.
    backends: tuple[str, ...]
    policy: Policy = Policy.LEAST_CONN
    #: Validator specs (``NAME`` or ``NAME:ARG``), as ``--validator`` takes them.
    validators: tuple[str, ...] = DEFAULT_CHAIN
    backend_connect_timeout: float = 10.0
    response_timeout: float = 60.0
    #: Seconds without a byte in either direction before a tunnel is closed; None: never.
    tunnel_idle_timeout: float | None = None
    #: Seconds after which a tunnel is closed whatever it does; None: never.
    tunnel_lifetime: float | None = None
    #: Largest request body accepted (413 beyond); None: no limit.
    max_request_body: int | None = None
    #: Seconds a backend that refused a connection stays out of rotation.
    fail_timeout: float = 10.0
    health: HealthCheck | None = None
    #: CA bundle (PEM) to verify https:// backends with; None: the system's.
    tls_ca: str | None = None
    #: Verify https:// backends' certificates (turning it off logs a warning).
    tls_verify: bool = True
    #: A PROXY protocol header ("v1" or "v2") first on every backend connection; None: none.
    send_proxy: str | None = None
    #: Per-client limits counted on this route alone, on top of the proxy's; None: none.
    route_client_tunnels: int | None = None
    route_client_upgrade_rate: float | None = None
    route_client_upgrade_burst: int | None = None


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """Where the access log goes and in which format."""

    #: "text" (one readable line) or "json" (one JSON object per line).
    format: str = "text"
    #: A file to write the access log to, "-" for standard output; None: the main log.
    path: str | None = None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything the proxy needs to run, from the command line or a file."""

    routes: tuple[RouteConfig, ...]
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    #: Server endpoint for Prometheus metrics and the status page; None: off.
    metrics: str | None = None
    #: Worker processes (see :mod:`upgradeproxy.cli.workers`).
    workers: int = 1
    access_log: AccessLogConfig = AccessLogConfig()
    #: Seconds a client may take to send a request head (408 after).
    client_head_timeout: float = 60.0
    #: Seconds a kept-alive client connection may stay idle between requests.
    keep_alive_timeout: float = 60.0
    #: Seconds open tunnels are given to finish at shutdown before they are closed.
    shutdown_grace: float = 30.0
    #: Client connections served at once (503 beyond); None: no limit.
    max_connections: int | None = 10_000
    #: Tunnels open at once (503 for new upgrades beyond); None: no limit.
    max_tunnels: int | None = 10_000
    max_request_head: int = 32 * 1024
    #: Per client address, over all routes: connections (503 beyond), tunnels
    #: (429), upgrade attempts per second and at once (429); None: no limit.
    client_connections: int | None = None
    client_tunnels: int | None = None
    client_upgrade_rate: float | None = None
    client_upgrade_burst: int | None = None
    #: The leading bits of an IPv6 client address that make one client.
    client_ipv6_prefix: int = 64
    #: Listeners whose connections from ``trusted_proxies`` start with a PROXY protocol header.
    proxy_protocol_listen: tuple[str, ...] = ()
    #: Networks (CIDR) of the load balancers allowed, and required, to send that header.
    trusted_proxies: tuple[str, ...] = ()
    #: Seconds a trusted connection has to send its header.
    proxy_protocol_timeout: float = HEADER_TIMEOUT
    forward_h2c: bool = False
    splice: bool = True
    #: Offer HTTP/2 to TLS clients over ALPN.
    http2: bool = True
    #: Accept HTTP/2 with prior knowledge on cleartext listeners.
    http2_cleartext: bool = False
    #: Streams one HTTP/2 connection may have open at once.
    http2_max_concurrent_streams: int = 100
    #: Seconds an HTTP/2 stream may wait on a shut flow-control window.
    http2_stall_timeout: float = 60.0
    #: Where the file was read from, for messages; None when built from flags.
    source: str | None = None


class ConfigError(ValueError):
    """A configuration file with mistakes.

    ``str()`` lists every mistake, one per line, in the order of the file, each
    as ``FILE:LINE: KEY: what is wrong; what to write instead``.
    """

    #: The mistakes, one line each.
    problems: list[str]

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_config(path: str) -> ProxyConfig:
    """Read, check and resolve the configuration file at ``path``.

    Raises :class:`ConfigError` listing every mistake; a file that cannot be
    read or is not TOML gives a single line.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as e:
        reason = e.strerror or e
        raise ConfigError([f"{path}: cannot read the configuration file: {reason}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text; save the file as UTF-8"]) from None
    return parse_config(text, path)


def parse_config(text: str, source: str) -> ProxyConfig:
    """Check and resolve configuration ``text`` read from the file named ``source``.

    ``source`` names the file in messages, and relative paths in the text
    start from its directory.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_error(source, text, str(e))]) from None
    from twisted.internet import reactor  # here: importing it installs the default reactor

    context = _Context(
        directory=os.path.dirname(os.path.abspath(source)),
        reactor=reactor,
        validators=installed_validators(),
    )
    try:
        config = _proxy_config(document, context)
    except _Bad as bad:
        locator = KeyLines(text)
        located = sorted((locator.line(path), _key_name(path), why) for path, why in bad.problems)
        raise ConfigError(
            [f"{source}:{line}: {key}: {why}" for line, key, why in located]
        ) from None
    return dataclasses.replace(config, source=source)


def dump_config(config: ProxyConfig) -> str:
    """``config`` as JSON, for :func:`undump_config` in a worker process."""
    return json.dumps(
        dataclasses.asdict(config),
        default=lambda value: value.value,  # the policy enum
    )


def undump_config(text: str) -> ProxyConfig:
    """The configuration that :func:`dump_config` wrote, already checked."""
    data = json.loads(text)
    routes = tuple(
        RouteConfig(
            **{
                **route,
                "hosts": tuple(route["hosts"]),
                "backends": tuple(route["backends"]),
                "validators": tuple(route["validators"]),
                "policy": Policy(route["policy"]),
                "health": None if route["health"] is None else HealthCheck(**route["health"]),
            }
        )
        for route in data.pop("routes")
    )
    return ProxyConfig(
        **{
            **data,
            "routes": routes,
            "listen": tuple(data["listen"]),
            "proxy_protocol_listen": tuple(data["proxy_protocol_listen"]),
            "trusted_proxies": tuple(data["trusted_proxies"]),
            "access_log": AccessLogConfig(**data["access_log"]),
        }
    )


def describe_config(config: ProxyConfig) -> str:
    """What a configuration that passed its checks sets up, for ``--check`` and the start-up log.

    The first line says what the proxy listens on, how much it routes and
    its proxy-wide settings; then one line per route, with its validators
    (arguments included), timeouts, limits and health check.
    """
    # A route with no backends listed is the built-in demo's, which is one.
    backends = sum(len(route.backends) or 1 for route in config.routes)
    summary = [
        f"listening on {', '.join(config.listen)}",
        *(
            [f"with the PROXY protocol on {', '.join(config.proxy_protocol_listen)}"]
            if config.proxy_protocol_listen
            else []
        ),
        f"{_plural(len(config.routes), 'route')}, {_plural(backends, 'backend')}",
    ]
    if config.workers > 1:
        summary.append(f"{config.workers} workers")
    if config.metrics is not None:
        summary.append(f"metrics on {config.metrics}")
    settings = [
        _describe_access_log(config.access_log),
        f"client head timeout {config.client_head_timeout:g} s",
        f"keep-alive timeout {config.keep_alive_timeout:g} s",
        f"shutdown grace {config.shutdown_grace:g} s",
        f"max connections {_limit(config.max_connections)}",
        f"max tunnels {_limit(config.max_tunnels)}",
        _describe_http2(config),
    ]
    lines = [f"{config.source or 'configuration'}: OK: {'; '.join(summary)}"]
    lines.append(f"  {'; '.join(settings)}")
    client = _describe_client_limits(
        config.client_connections, config.client_tunnels,
        config.client_upgrade_rate, config.client_upgrade_burst,
    )  # fmt: skip
    if client:
        lines.append(f"  per client ({_describe_client_key(config)}): {client}")
    if config.proxy_protocol_listen:
        lines.append(
            f"  PROXY protocol (v1 and v2) required from {', '.join(config.trusted_proxies)}, "
            f"within {config.proxy_protocol_timeout:g} s; not accepted from other sources"
        )
    for route in config.routes:
        lines += [f"  {_describe_route(route)}", f"    {_describe_route_settings(route)}"]
    return "\n".join(lines)


def _describe_http2(config: ProxyConfig) -> str:
    if not config.http2 and not config.http2_cleartext:
        return "HTTP/2 off"
    where = " and ".join(
        name
        for name, on in (("over TLS", config.http2), ("cleartext", config.http2_cleartext))
        if on
    )
    return (
        f"HTTP/2 {where}, {config.http2_max_concurrent_streams} streams per connection, "
        f"stall timeout {config.http2_stall_timeout:g} s"
    )


def _describe_client_key(config: ProxyConfig) -> str:
    prefix = config.client_ipv6_prefix
    return "IPv4 address, IPv6 " + ("address" if prefix == 128 else f"/{prefix}")


def _describe_client_limits(
    connections: int | None, tunnels: int | None, rate: float | None, burst: int | None
) -> str:
    parts = []
    if connections is not None:
        parts.append(f"max connections {connections}")
    if tunnels is not None:
        parts.append(f"max tunnels {tunnels}")
    if rate is not None:
        at_once = burst if burst is not None else max(1, math.ceil(rate))
        parts.append(f"upgrade attempts {rate:g}/s, {at_once} at once")
    return ", ".join(parts)


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _limit(value: int | None) -> str:
    return "none" if value is None else str(value)


def _size_text(value: int | None) -> str:
    """A size as it would be written: ``10MiB`` rather than 10485760."""
    if value is None:
        return "none"
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value % factor == 0:
            return f"{value // factor}{unit}"
    return f"{value} bytes"


def _duration(value: float | None) -> str:
    return "off" if value is None else f"{value:g} s"


def _describe_access_log(access: AccessLogConfig) -> str:
    where = {None: "the main log", "-": "standard output"}.get(access.path, access.path)
    return f"access log ({access.format}) to {where}"


def _describe_route(route: RouteConfig) -> str:
    parts = [
        f"hosts {', '.join(route.hosts)}" if route.hosts else "any host",
        f"path {route.path}",
        # Only --demo leaves a route without backends: the demo is put in at start.
        f"{route.policy.value} over {', '.join(route.backends) or 'the built-in demo backend'}",
    ]
    if route.health is not None:
        parts.append(f"health check GET {route.health.path} every {route.health.interval:g} s")
    if not route.tls_verify and any(url.startswith("https://") for url in route.backends):
        parts.append("certificate verification OFF")
    return f"{route.name}: {'; '.join(parts)}"


def _describe_route_settings(route: RouteConfig) -> str:
    parts = [
        f"validators {', '.join(route.validators) or 'none'}",
        f"connect timeout {route.backend_connect_timeout:g} s",
        f"response timeout {route.response_timeout:g} s",
        f"tunnel idle timeout {_duration(route.tunnel_idle_timeout)}",
        f"tunnel lifetime {_duration(route.tunnel_lifetime)}",
        f"max body {_size_text(route.max_request_body)}",
    ]
    client = _describe_client_limits(
        None, route.route_client_tunnels,
        route.route_client_upgrade_rate, route.route_client_upgrade_burst,
    )  # fmt: skip
    if client:
        parts.append(f"per client on this route: {client}")
    if route.send_proxy is not None:
        parts.append(f"sends PROXY protocol {route.send_proxy} to backends")
    if len(route.backends) > 1:
        parts.append(f"fail timeout {route.fail_timeout:g} s")
    if route.health is not None:
        parts.append(
            f"health check timeout {route.health.timeout:g} s, "
            f"expecting {route.health.expect_status}"
        )
    return "; ".join(parts)


def _syntax_error(source: str, text: str, message: str) -> str:
    """``FILE:LINE: TOML syntax error: ...`` from tomllib's message, which ends with where."""
    match = re.fullmatch(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)", message)
    if match is None:
        return f"{source}: TOML syntax error: {message}"
    what, line, column = match.groups()
    what = what[0].lower() + what[1:]
    if line is None:
        last_line = text.rstrip().count("\n") + 1
        return f"{source}:{last_line}: TOML syntax error: {what} at the end of the file"
    hint = _SYNTAX_HINTS.get(what, "")
    return f"{source}:{line}: TOML syntax error: {what} at column {column}{hint}"


#: What to write instead, for tomllib's commonest complaints.
_SYNTAX_HINTS = {"invalid value": '; if it is text, put it in quotes, as in policy = "least-conn"'}


# -- Checking and converting values -------------------------------------------------------

#: A mistake: where, and what is wrong and what to write instead.
_Problem = tuple[Path, str]


@dataclass(frozen=True, slots=True)
class _Context:
    """What some checks need beyond the value itself."""

    #: Relative file paths start here: the configuration file's directory.
    directory: str
    #: Endpoint strings are parsed against it (nothing listens or connects).
    reactor: object
    validators: dict[str, IValidatorPlugin]


class _Bad(Exception):
    """A value that cannot be used; each problem's path is relative to that value."""

    def __init__(self, *problems: _Problem) -> None:
        super().__init__(problems)
        self.problems = problems


def _bad(message: str) -> _Bad:
    return _Bad(((), message))


#: Turns one value from the document into what the dataclass field holds, or raises _Bad.
_Convert = Callable[[Any, _Context], Any]


@dataclass(frozen=True, slots=True)
class _Key:
    """A key a table may hold: the dataclass field it fills, and how its value is checked."""

    field: str
    convert: _Convert


@dataclass(frozen=True, slots=True)
class _Table:
    """The keys of one kind of table, and how it is written (to say where a stray key belongs)."""

    header: str
    keys: Mapping[str, _Key]


def _checked(parse: Callable[[Any], Any]) -> _Convert:
    """A converter from one of :mod:`upgradeproxy.cli._values`' parsers."""

    def convert(value: Any, context: _Context) -> Any:
        try:
            return parse(value)
        except ValueError as e:
            raise _bad(str(e)) from None

    return convert


_seconds = _checked(_values.seconds)
_seconds_or_off = _checked(_values.seconds_or_off)
_count_or_off = _checked(_values.count_or_off)
_count = _checked(_values.count)
_workers = _checked(_values.workers)
_flag = _checked(_values.flag)
_size = _checked(_values.size)
_size_or_off = _checked(_values.size_or_off)


def _server_endpoint(value: Any, context: _Context) -> str:
    if not isinstance(value, str):
        raise _bad(f"must be a text value; {ENDPOINT_USAGE}, not {_show(value)}")
    try:
        check_server_endpoint(context.reactor, value)
    except NotAnEndpoint as e:
        raise _bad(str(e)) from None
    return value


def _list_of(convert: _Convert, what: str) -> _Convert:
    """A converter for a non-empty list whose items ``convert`` checks, every item reported."""

    def convert_list(value: Any, context: _Context) -> tuple[Any, ...]:
        if not isinstance(value, list) or not value:
            found = "an empty list" if value == [] else _show(value)
            raise _bad(f"must be {what}, not {found}")
        items, problems = [], []
        for index, item in enumerate(value):
            try:
                items.append(convert(item, context))
            except _Bad as bad:
                problems += [((index, *path), why) for path, why in bad.problems]
        if problems:
            raise _Bad(*problems)
        return tuple(items)

    return convert_list


_endpoint_list = _list_of(_server_endpoint, 'a list of endpoints, such as ["tcp:8080"]')


def _listen(value: Any, context: _Context) -> tuple[str, ...]:
    """One server endpoint string or a list of them."""
    if isinstance(value, str):
        return (_server_endpoint(value, context),)
    return tuple(_endpoint_list(value, context))


def _text(value: Any, context: _Context) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise _bad(f"must be non-empty text in quotes, not {_show(value)}")


def _unchecked(value: Any, context: _Context) -> Any:
    return value


def _choice(choices: Iterable[str], what: str) -> _Convert:
    """A converter accepting one of ``choices``."""
    allowed = tuple(choices)

    def convert(value: Any, context: _Context) -> str:
        if value in allowed:
            return str(value)
        raise _bad(f"unknown {what} {_show(value)}; use one of {', '.join(allowed)}")

    return convert


_policy_name = _choice((policy.value for policy in Policy), "policy")


def _policy(value: Any, context: _Context) -> Policy:
    return Policy(_policy_name(value, context))


def _validator(value: Any, context: _Context) -> str:
    if not isinstance(value, str):
        raise _bad(f'must be a validator spec such as "websocket", not {_show(value)}')
    try:
        build_chain([value], context.validators)
    except BadValidator as e:
        raise _bad(str(e)) from None
    return value


_validator_list = _list_of(
    _validator, 'a list of validator specs, such as ["rfc9110", "websocket"]'
)


def _validators(value: Any, context: _Context) -> tuple[str, ...]:
    if value == []:
        return ()  # explicitly no validators
    return tuple(_validator_list(value, context))


def _request_path(value: Any, context: _Context) -> str:
    """What a request line can carry: starts with "/", printable ASCII, no spaces."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise _bad(f'must be a path starting with "/", such as "/ws", not {_show(value)}')
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise _bad(f"{value!r} is not a request path; remove spaces and non-ASCII characters")
    return value


def _route_path(value: Any, context: _Context) -> str:
    path = _request_path(value, context)
    if "?" in path or "#" in path:
        raise _bad(f"{path!r} is a path prefix: write it without what follows '?' or '#'")
    return path


_HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


def _host(value: Any, context: _Context) -> str:
    """A host name, lowercased, with at most a leading ``*.`` wildcard."""
    if not isinstance(value, str):
        raise _bad(f"must be a host name such as 'chat.example.com', not {_show(value)}")
    host = value.lower()
    if "://" in host:
        raise _bad(f"{value!r} is a URL; write the host name alone: {urlsplit(host).hostname!r}")
    name, slash, path = host.partition("/")
    if slash:
        raise _bad(f'{value!r} has a path; write {name!r} and put the path in path = "/{path}"')
    if ":" in host.rpartition("]")[2]:
        name = host.rpartition(":")[0]
        raise _bad(f"{value!r} has a port; write the host name alone: {name!r}")
    if host == "*":
        raise _bad("'*' is not a host name; leave hosts out to serve every host")
    if "*" in host.removeprefix("*."):
        raise _bad(f"{value!r}: only a leading '*.' wildcard is allowed, as in '*.example.com'")
    if not (_HOST_NAME.fullmatch(host.removeprefix("*.")) or _is_ipv6_literal(host)):
        raise _bad(f"{value!r} is not a host name; use letters, digits, '-' and '.'")
    return host


def _is_ipv6_literal(host: str) -> bool:
    """``[::1]``, as a Host header carries an IPv6 address."""
    if not (host.startswith("[") and host.endswith("]")):
        return False
    try:
        ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        return False
    return True


_host_list = _list_of(
    _host, 'a list of host names, such as ["example.com", "*.example.com"] (or no hosts key)'
)


def _hosts(value: Any, context: _Context) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_host_list(value, context)))


def _single_host(value: Any, context: _Context) -> tuple[str, ...]:
    return (_host(value, context),)


def _status(value: Any, context: _Context) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    raise _bad(f"must be an HTTP status code from 100 to 599, not {_show(value)}")


def _file_path(value: Any, context: _Context) -> str:
    """A path resolved against the configuration file's directory."""
    if not isinstance(value, str) or not value:
        raise _bad(f"must be a file path in quotes, not {_show(value)}")
    return os.path.normpath(os.path.join(context.directory, os.path.expanduser(value)))


def check_ca_file(path: str) -> str:
    """``path``, once it is known to be a readable PEM bundle; else :class:`ValueError`.

    Checked once here rather than for each backend that uses it.
    """
    try:
        with open(path, "rb") as file:
            x509.load_pem_x509_certificates(file.read())
    except OSError as e:
        raise ValueError(
            f"cannot read the CA bundle {path} ({e.strerror}); give the path of a readable "
            "PEM file (a relative path starts from this file's directory)"
        ) from None
    except ValueError:
        raise ValueError(
            f"the CA bundle {path} holds no readable certificate; give a PEM file of one or "
            "more '-----BEGIN CERTIFICATE-----' blocks"
        ) from None
    return path


def check_log_file(path: str) -> str:
    """``path`` ("-": standard output), once a file can be made there; else :class:`ValueError`."""
    if path == "-":
        return path
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; write the path of a file in it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"the directory of {path} does not exist; create it or write another path")
    return path


def _ca_file(value: Any, context: _Context) -> str:
    return _checked(check_ca_file)(_file_path(value, context), context)


def _log_path(value: Any, context: _Context) -> str:
    if value == "-":
        return value
    return _checked(check_log_file)(_file_path(value, context), context)


def _sub_table(table: _Table, make: Callable[..., Any] = dict) -> _Convert:
    """A converter for a nested table: ``make(**fields)`` once every key in it is correct."""

    def convert(value: Any, context: _Context) -> Any:
        if not isinstance(value, dict):
            raise _bad(
                f"must be a table (write {table.header} and its keys below it), not {_show(value)}"
            )
        fields, problems = _read_table(value, table, context)
        if problems:
            raise _Bad(*problems)
        return make(**fields)

    return convert


def _read_table(
    value: dict[str, Any], table: _Table, context: _Context
) -> tuple[dict[str, Any], list[_Problem]]:
    """The dataclass fields that a table's keys give, and every problem with them."""
    fields: dict[str, Any] = {}
    problems: list[_Problem] = []
    for key, item in value.items():
        known = table.keys.get(key)
        if known is None:
            problems.append(((key,), _unknown_key(key, table)))
            continue
        try:
            fields[known.field] = known.convert(item, context)
        except _Bad as bad:
            problems += [((key, *path), why) for path, why in bad.problems]
    return fields, problems


def _unknown_key(key: str, table: _Table) -> str:
    elsewhere = [other.header for other in _TABLES if key in other.keys and other is not table]
    if elsewhere:
        return f"unknown key here; it belongs in {' or '.join(elsewhere)}"
    close = difflib.get_close_matches(key, list(table.keys), n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; the keys here are {', '.join(table.keys)}"


_rate_or_off = _checked(_values.rate_or_off)
_ipv6_prefix = _checked(_values.ipv6_prefix)
_send_proxy = _choice(VERSIONS, "PROXY protocol version")


def _network(value: Any, context: _Context) -> str:
    if not isinstance(value, str):
        raise _bad(f'must be a network in quotes, such as "10.0.0.0/8", not {_show(value)}')
    try:
        return str(parse_network(value))
    except ValueError as e:
        raise _bad(str(e)) from None


_networks = _list_of(_network, 'a list of networks, such as ["10.0.0.0/8", "127.0.0.1/32"]')


# -- The tables ---------------------------------------------------------------------------

#: The timeouts a route can set for itself; [timeouts] gives the default for every route.
_ROUTE_TIMEOUT_KEYS = {
    "backend_connect": _Key("backend_connect_timeout", _seconds),
    "response_head": _Key("response_timeout", _seconds),
    "tunnel_idle": _Key("tunnel_idle_timeout", _seconds_or_off),
    "tunnel_lifetime": _Key("tunnel_lifetime", _seconds_or_off),
}
_TIMEOUTS = _Table(
    "[timeouts]",
    {
        "client_head": _Key("client_head_timeout", _seconds),
        "keep_alive": _Key("keep_alive_timeout", _seconds),
        **_ROUTE_TIMEOUT_KEYS,
        "shutdown_grace": _Key("shutdown_grace", _seconds),
    },
)
_LIMITS = _Table(
    "[limits]",
    {
        "max_connections": _Key("max_connections", _count_or_off),
        "max_tunnels": _Key("max_tunnels", _count_or_off),
        "max_request_head": _Key("max_request_head", _size),
        "max_request_body": _Key("max_request_body", _size_or_off),
        "client_connections": _Key("client_connections", _count_or_off),
        "client_tunnels": _Key("client_tunnels", _count_or_off),
        "client_upgrade_rate": _Key("client_upgrade_rate", _rate_or_off),
        "client_upgrade_burst": _Key("client_upgrade_burst", _count_or_off),
        "client_ipv6_prefix": _Key("client_ipv6_prefix", _ipv6_prefix),
    },
)
_PROXY_PROTOCOL = _Table(
    "[proxy_protocol]",
    {
        "listen": _Key("proxy_protocol_listen", _listen),
        "trusted_proxies": _Key("trusted_proxies", _networks),
        "header_timeout": _Key("proxy_protocol_timeout", _seconds),
    },
)
_HTTP2 = _Table(
    "[http2]",
    {
        "enabled": _Key("http2", _flag),
        "cleartext": _Key("http2_cleartext", _flag),
        "max_concurrent_streams": _Key("http2_max_concurrent_streams", _count),
        "stall_timeout": _Key("http2_stall_timeout", _seconds),
    },
)
_ACCESS_LOG = _Table(
    "[access_log]",
    {
        "format": _Key("format", _choice(("text", "json"), "format")),
        "path": _Key("path", _log_path),
    },
)
_TOP = _Table(
    "the top level (before any [table])",
    {
        "listen": _Key("listen", _listen),
        "workers": _Key("workers", _workers),
        "metrics": _Key("metrics", _server_endpoint),
        "forward_h2c": _Key("forward_h2c", _flag),
        "splice": _Key("splice", _flag),
        "timeouts": _Key("timeouts", _sub_table(_TIMEOUTS)),
        "limits": _Key("limits", _sub_table(_LIMITS)),
        "http2": _Key("http2", _sub_table(_HTTP2)),
        "proxy_protocol": _Key("proxy_protocol", _sub_table(_PROXY_PROTOCOL)),
        "access_log": _Key("access_log", _sub_table(_ACCESS_LOG, AccessLogConfig)),
        # Routes are read on their own: they need the defaults the tables above give.
        "route": _Key("route", _unchecked),
    },
)
_ROUTE_TIMEOUTS = _Table("[route.timeouts]", _ROUTE_TIMEOUT_KEYS)
_ROUTE_LIMITS = _Table(
    "[route.limits]",
    {
        "max_request_body": _Key("max_request_body", _size_or_off),
        "client_tunnels": _Key("route_client_tunnels", _count_or_off),
        "client_upgrade_rate": _Key("route_client_upgrade_rate", _rate_or_off),
        "client_upgrade_burst": _Key("route_client_upgrade_burst", _count_or_off),
    },
)
_HEALTH = _Table(
    "[route.health]",
    {
        "path": _Key("path", _request_path),
        "interval": _Key("interval", _seconds),
        "timeout": _Key("timeout", _seconds),
        "expect_status": _Key("expect_status", _status),
    },
)
_TLS = _Table(
    "[route.tls]",
    {"ca": _Key("tls_ca", _ca_file), "verify": _Key("tls_verify", _flag)},
)
_ROUTE = _Table(
    "[[route]]",
    {
        "name": _Key("name", _text),
        "hosts": _Key("hosts", _hosts),
        "host": _Key("host", _single_host),
        "path": _Key("path", _route_path),
        "backends": _Key(
            "backends", _list_of(_text, 'a list of backends, such as ["http://HOST:PORT"]')
        ),
        "policy": _Key("policy", _policy),
        "validators": _Key("validators", _validators),
        "fail_timeout": _Key("fail_timeout", _seconds),
        "max_request_body": _Key("max_request_body", _size_or_off),
        "send_proxy": _Key("send_proxy", _send_proxy),
        "timeouts": _Key("timeouts", _sub_table(_ROUTE_TIMEOUTS)),
        "limits": _Key("limits", _sub_table(_ROUTE_LIMITS)),
        "health": _Key("health", _sub_table(_HEALTH, HealthCheck)),
        "tls": _Key("tls", _sub_table(_TLS)),
    },
)
#: Every kind of table, to tell where a key written in the wrong one belongs.
_TABLES = (
    _TOP, _TIMEOUTS, _LIMITS, _HTTP2, _PROXY_PROTOCOL, _ACCESS_LOG,
    _ROUTE, _ROUTE_TIMEOUTS, _ROUTE_LIMITS, _HEALTH, _TLS,
)  # fmt: skip

#: A route's settings and their defaults: those the top-level tables give too are
#: handed down to every route that does not set its own.
_ROUTE_FIELDS = {field.name: field.default for field in dataclasses.fields(RouteConfig)}


def _proxy_config(document: dict[str, Any], context: _Context) -> ProxyConfig:
    """The configuration a parsed document describes; raises _Bad with every problem."""
    fields, problems = _read_table(document, _TOP, context)
    problems += _proxy_protocol_problems(fields.get("proxy_protocol", {}), fields)
    problems += _burst_problems(fields.get("limits", {}), ("limits",), "client_")
    shared = {
        **fields.pop("timeouts", {}),
        **fields.pop("limits", {}),
        **fields.pop("proxy_protocol", {}),
    }
    route_defaults = {key: value for key, value in shared.items() if key in _ROUTE_FIELDS}
    fields.update((key, value) for key, value in shared.items() if key not in _ROUTE_FIELDS)
    fields.update(fields.pop("http2", {}))
    routes, route_problems = _routes(fields.pop("route", None), route_defaults, context)
    problems += [(("route", *path), why) for path, why in route_problems]
    if problems:
        raise _Bad(*problems)
    return ProxyConfig(routes=routes, **fields)


def _routes(
    value: Any, defaults: dict[str, Any], context: _Context
) -> tuple[tuple[RouteConfig, ...], list[_Problem]]:
    """Every route, and the problems with each and between them (paths below ``route``)."""
    if value is None:
        return (), [((), 'no routes; add a [[route]] table with backends = ["http://HOST:PORT"]')]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        return (), [((), "write each route as a [[route]] table, with two brackets")]
    routes, problems = [], []
    for index, table in enumerate(value):
        fields, route_problems = _route(table, index, defaults, context)
        routes.append(fields)
        problems += [((index, *path), why) for path, why in route_problems]
    problems += _clashes(routes, {path[:2] for path, _ in problems})
    if problems:
        return (), problems
    return tuple(RouteConfig(**fields) for fields in routes), []


def _route(
    table: dict[str, Any], index: int, defaults: dict[str, Any], context: _Context
) -> tuple[dict[str, Any], list[_Problem]]:
    """A route's fields, defaults filled in (``index`` counts from 0), and its problems."""
    fields, problems = _read_table(table, _ROUTE, context)
    if "host" in table and "hosts" in table:
        problems.append((("host",), 'write either host = "..." or hosts = [...], not both'))
    fields["hosts"] = fields.pop("host", ()) or fields.get("hosts", ())
    problems += _burst_problems(fields.get("limits", {}), ("limits",), "route_client_")
    fields = {
        **defaults,
        **fields.pop("timeouts", {}),
        **fields.pop("limits", {}),
        **fields.pop("tls", {}),
        **fields,
    }
    fields.setdefault("name", f"route {index + 1}")
    fields.setdefault("path", "/")
    if "backends" not in table:
        problems.append(((), 'no backends; add backends = ["http://HOST:PORT"]'))
    problems += _backend_problems(table.get("backends"), {**_ROUTE_FIELDS, **fields}, context)
    backends = table.get("backends")
    if fields.get("send_proxy") and isinstance(backends, list):
        tls = [b for b in backends if isinstance(b, str) and b.startswith("https://")]
        if tls:
            problems.append(
                (
                    ("send_proxy",),
                    f"cannot be used with https:// backends ({', '.join(tls)}): the header "
                    "would go before the TLS handshake, which this proxy does not do; use "
                    "http:// backends, or leave send_proxy out",
                )
            )
    return fields, problems


def _proxy_protocol_problems(table: dict[str, Any], top: dict[str, Any]) -> list[_Problem]:
    """A [proxy_protocol] table needs both its listeners and its trusted networks."""
    if not table:
        return []
    listen, trusted = table.get("proxy_protocol_listen"), table.get("trusted_proxies")
    where = ("proxy_protocol",)
    if listen and not trusted:
        return [
            (
                where,
                "listen is given but trusted_proxies is not: name the networks your load "
                'balancers connect from, such as trusted_proxies = ["10.0.0.0/8"]',
            )
        ]
    if not listen:
        return [
            (
                where,
                "no listen: list the endpoints the load balancers connect to, such as "
                'listen = ["tcp:8081"] (they are listened on besides the top-level listen)',
            )
        ]
    both = set(listen) & set(top.get("listen", ()))
    if both:
        return [
            (
                (*where, "listen"),
                f"{', '.join(sorted(both))} is in the top-level listen too: a listener either "
                "expects the header or never accepts it; list it in one place",
            )
        ]
    return []


def _burst_problems(table: dict[str, Any], where: Path, prefix: str) -> list[_Problem]:
    """An upgrade burst without a rate means nothing: say so rather than ignore it."""
    burst, rate = table.get(f"{prefix}upgrade_burst"), table.get(f"{prefix}upgrade_rate")
    if burst is not None and rate is None:
        return [
            (
                (*where, "client_upgrade_burst"),
                "a burst needs a rate: add client_upgrade_rate (attempts per second) "
                "beside it, or leave the burst out",
            )
        ]
    return []


def _backend_problems(backends: Any, settings: dict[str, Any], context: _Context) -> list[_Problem]:
    """What :func:`parse_backend` refuses, given a route's settings as the proxy will.

    ``backends`` is the list as written: items that are not text were reported
    already, and the others are checked all the same.
    """
    problems: list[_Problem] = []
    for number, backend in enumerate(backends if isinstance(backends, list) else ()):
        if not isinstance(backend, str) or not backend.strip():
            continue
        try:
            parse_backend(
                context.reactor,
                backend,
                connect_timeout=settings["backend_connect_timeout"],
                tls_ca=settings["tls_ca"],
                tls_verify=settings["tls_verify"],
                warn=False,  # describe_config says so; the proxy warns when it starts
            )
        except BadBackend as e:
            problems.append((("backends", number), str(e)))
    return problems


def _clashes(routes: list[dict[str, Any]], unsure: set[Path]) -> list[_Problem]:
    """Routes that share a name, or serve the same hosts and path.

    ``unsure`` holds the ``(index, key)`` of values already reported as wrong,
    which are left out rather than compared.
    """
    problems: list[_Problem] = []
    names: dict[str, int] = {}
    places: dict[tuple[frozenset[str], str], int] = {}
    for index, fields in enumerate(routes):
        name = fields["name"]
        if (index, "name") not in unsure and names.setdefault(name, index) != index:
            problems.append(
                (
                    (index, "name"),
                    f"{name!r} is already the name of route[{names[name] + 1}]; "
                    "give each route its own name",
                )
            )
        if unsure.isdisjoint({(index, "host"), (index, "hosts"), (index, "path")}):
            # The router reads "/ws/" as "/ws".
            place = (frozenset(fields["hosts"]), fields["path"].rstrip("/"))
            if places.setdefault(place, index) != index:
                problems.append(
                    (
                        (index,),
                        f"serves the same hosts and path as route[{places[place] + 1}]; change "
                        "its hosts or path, or put both routes' backends in one route",
                    )
                )
    return problems


def _key_name(path: Path) -> str:
    """A path as messages show it, such as ``route[2].backends[0]``.

    Routes are numbered from 1, as their default names are ("route 1"); the
    items of lists from 0.
    """
    name = ""
    for position, part in enumerate(path):
        if isinstance(part, int):
            name += f"[{part + 1 if path[:position] == ('route',) else part}]"
        else:
            key = part if BARE_KEY.fullmatch(part) else f'"{part}"'
            name += f".{key}" if name else key
    return name
