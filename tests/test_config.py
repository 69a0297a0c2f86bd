"""The TOML configuration file: what it resolves to, and every mistake it reports, with its line."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from textwrap import dedent

import pytest
import trustme
from twisted.internet import reactor

from upgradeproxy.cli._tomllines import KeyLines
from upgradeproxy.cli._values import parse_size
from upgradeproxy.cli.config import (
    AccessLogConfig,
    ConfigError,
    ProxyConfig,
    RouteConfig,
    describe_config,
    dump_config,
    load_config,
    parse_config,
    undump_config,
)
from upgradeproxy.cli.service import settings_for
from upgradeproxy.core.address import BadBackend, parse_backend
from upgradeproxy.core.balancer import HealthCheck, Policy
from upgradeproxy.registry import BadValidator, build_chain

EXAMPLE = Path(__file__).parent.parent / "examples" / "upgradeproxy.toml"
ROUTE = '[[route]]\nbackends = ["http://127.0.0.1:9000"]\n'


def parse(text: str) -> ProxyConfig:
    return parse_config(dedent(text), "proxy.toml")


def errors(text: str, source: str = "proxy.toml") -> list[str]:
    """The lines of the ConfigError that ``text`` raises."""
    with pytest.raises(ConfigError) as info:
        parse_config(dedent(text), source)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def backend_message(url: str, tls_ca: str | None = None, tls_verify: bool = True) -> str:
    with pytest.raises(BadBackend) as info:
        parse_backend(reactor, url, tls_ca=tls_ca, tls_verify=tls_verify, warn=False)
    return str(info.value)


def validator_message(spec: str) -> str:
    with pytest.raises(BadValidator) as info:
        build_chain([spec])
    return str(info.value)


def write_ca(path: Path) -> Path:
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


# -- What a file resolves to ------------------------------------------------------------


def test_a_route_with_backends_is_enough_and_everything_else_is_the_default() -> None:
    config = parse(ROUTE)
    assert config == ProxyConfig(
        routes=(RouteConfig("route 1", (), "/", ("http://127.0.0.1:9000",)),),
        source="proxy.toml",
    )


def test_top_level_keys_and_tables_fill_the_proxy_config() -> None:
    config = parse(
        """\
        listen = ["tcp:8080", "tcp:8081:interface=127.0.0.1"]
        workers = 3
        metrics = "tcp:9100:interface=127.0.0.1"
        forward_h2c = true
        splice = false
        [timeouts]
        client_head = 5
        keep_alive = 7.5
        shutdown_grace = 2
        [limits]
        max_connections = 100
        max_tunnels = false
        max_request_head = "16KiB"
        [http2]
        enabled = false
        cleartext = true
        max_concurrent_streams = 20
        stall_timeout = 15
        [access_log]
        format = "json"
        path = "-"
        """
        + ROUTE
    )
    assert dataclasses.replace(config, routes=()) == ProxyConfig(
        routes=(),
        listen=("tcp:8080", "tcp:8081:interface=127.0.0.1"),
        workers=3,
        metrics="tcp:9100:interface=127.0.0.1",
        forward_h2c=True,
        splice=False,
        client_head_timeout=5.0,
        keep_alive_timeout=7.5,
        shutdown_grace=2.0,
        max_connections=100,
        max_tunnels=None,
        max_request_head=16384,
        http2=False,
        http2_cleartext=True,
        http2_max_concurrent_streams=20,
        http2_stall_timeout=15.0,
        access_log=AccessLogConfig("json", "-"),
        source="proxy.toml",
    )


def test_listen_may_be_one_string() -> None:
    assert parse('listen = "tcp:9000"\n' + ROUTE).listen == ("tcp:9000",)


def test_workers_auto_is_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert parse('workers = "auto"\n' + ROUTE).workers == 6


def test_workers_auto_counts_the_cores_it_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under "taskset -c 1" (or in a container given two of the host's 64 CPUs)
    # one worker per core of the machine would crowd onto the allowed ones.
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 5})
    assert parse('workers = "auto"\n' + ROUTE).workers == 2


def test_routes_take_the_global_timeouts_and_limits_unless_they_set_their_own() -> None:
    config = parse(
        """\
        [timeouts]
        backend_connect = 3
        response_head = 30
        tunnel_idle = 600
        tunnel_lifetime = 86400
        [limits]
        max_request_body = "1MiB"
        [[route]]
        name = "inherits"
        path = "/a"
        backends = ["http://127.0.0.1:9000"]
        [[route]]
        name = "overrides"
        path = "/b"
        backends = ["http://127.0.0.1:9001"]
        max_request_body = false
        fail_timeout = 2.5
        [route.timeouts]
        backend_connect = 1
        response_head = 5
        tunnel_idle = 0
        tunnel_lifetime = 60
        """
    )
    inherits, overrides = config.routes
    assert (
        inherits.backend_connect_timeout,
        inherits.response_timeout,
        inherits.tunnel_idle_timeout,
        inherits.tunnel_lifetime,
        inherits.max_request_body,
        inherits.fail_timeout,
    ) == (3.0, 30.0, 600.0, 86400.0, 1024 * 1024, 10.0)
    assert (
        overrides.backend_connect_timeout,
        overrides.response_timeout,
        overrides.tunnel_idle_timeout,
        overrides.tunnel_lifetime,
        overrides.max_request_body,
        overrides.fail_timeout,
    ) == (1.0, 5.0, None, 60.0, None, 2.5)


def test_a_route_override_with_no_global_value_replaces_the_default() -> None:
    (route,) = parse(ROUTE + "[route.timeouts]\ntunnel_idle = 3600\n").routes
    assert route.tunnel_idle_timeout == 3600.0
    assert route.response_timeout == RouteConfig.__dataclass_fields__["response_timeout"].default


def test_a_route_resolves_every_key() -> None:
    (route,) = parse(
        """\
        [[route]]
        name = "chat"
        hosts = ["Chat.Example.COM", "*.chat.example.com", "chat.example.com", "[::1]"]
        path = "/ws"
        backends = ["http://10.0.0.1:9000", "http://10.0.0.2:9000"]
        policy = "client-hash"
        validators = ["rfc9110", "origin:https://chat.example.com"]
        [route.health]
        path = "/healthz?full=1"
        interval = 2
        """
    ).routes
    assert route == RouteConfig(
        name="chat",
        hosts=("chat.example.com", "*.chat.example.com", "[::1]"),
        path="/ws",
        backends=("http://10.0.0.1:9000", "http://10.0.0.2:9000"),
        policy=Policy.CLIENT_HASH,
        validators=("rfc9110", "origin:https://chat.example.com"),
        health=HealthCheck(path="/healthz?full=1", interval=2.0),
    )


def test_one_host_can_be_written_as_host() -> None:
    (route,) = parse(ROUTE + 'host = "WWW.Example.com"\n').routes
    assert route.hosts == ("www.example.com",)


def test_an_empty_validator_list_means_no_validators() -> None:
    (route,) = parse(ROUTE + "validators = []\n").routes
    assert route.validators == ()


def test_routes_whose_hosts_overlap_with_different_paths_are_fine() -> None:
    config = parse(
        """\
        [[route]]
        hosts = ["a.example", "b.example"]
        backends = ["http://127.0.0.1:9000"]
        [[route]]
        hosts = ["b.example"]
        backends = ["http://127.0.0.1:9001"]
        [[route]]
        hosts = ["a.example", "b.example"]
        path = "/ws"
        backends = ["http://127.0.0.1:9002"]
        """
    )
    assert [route.name for route in config.routes] == ["route 1", "route 2", "route 3"]


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("4096", 4096),
        ('"4096"', 4096),
        ('"100B"', 100),
        ('"32KiB"', 32 * 1024),
        ('"32KB"', 32_000),
        ('"5kb"', 5000),
        ('"10 MiB"', 10 * 1024**2),
        ('"10MB"', 10_000_000),
        ('"1GiB"', 1024**3),
        ('"2GB"', 2_000_000_000),
    ],
)
def test_sizes_are_bytes_or_text_with_a_unit(written: str, size: int) -> None:
    assert parse(f"[limits]\nmax_request_head = {written}\n" + ROUTE).max_request_head == size


def test_parse_size_reads_the_text_of_command_line_flags_too() -> None:
    assert parse_size(" 10 MiB ") == 10 * 1024**2
    assert parse_size("0") == 0
    with pytest.raises(ValueError) as info:
        parse_size("10 megs")
    assert str(info.value) == f"'10 megs' is not a size; write {SIZE}"


@pytest.mark.parametrize("written", ["0", "false", '"0"', '"0MiB"'])
def test_a_body_size_of_zero_or_false_is_no_limit(written: str) -> None:
    (route,) = parse(f"[limits]\nmax_request_body = {written}\n" + ROUTE).routes
    assert route.max_request_body is None


def test_a_ca_path_starts_from_the_configuration_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "etc"
    directory.mkdir()
    ca = write_ca(directory / "ca.pem")
    source = directory / "proxy.toml"
    source.write_text('[[route]]\nbackends = ["https://app.example"]\n[route.tls]\nca = "ca.pem"\n')
    monkeypatch.chdir(tmp_path)
    (route,) = load_config("etc/proxy.toml").routes
    assert route.tls_ca == str(ca)
    assert route.tls_verify is True


def test_an_access_log_path_starts_from_the_configuration_files_directory(
    tmp_path: Path,
) -> None:
    config = parse_config('[access_log]\npath = "access.log"\n' + ROUTE, str(tmp_path / "p.toml"))
    assert config.access_log == AccessLogConfig("text", str(tmp_path / "access.log"))


# -- Mistakes, each with its file, line and key ------------------------------------------


def test_an_unknown_policy_names_the_choices() -> None:
    assert errors(ROUTE * 2 + 'path = "/b"\npolicy = "fastest"\n') == [
        "proxy.toml:6: route[2].policy: unknown policy 'fastest'; "
        "use one of round-robin, least-conn, client-hash"
    ]


def test_a_timeout_that_is_not_a_number() -> None:
    assert errors('[timeouts]\nkeep_alive = 5\nclient_head = "soon"\n' + ROUTE) == [
        "proxy.toml:3: timeouts.client_head: must be a number of seconds above 0, not 'soon'"
    ]


SECONDS = "must be a number of seconds above 0"
SECONDS_OR_OFF = "must be a number of seconds above 0, or 0 or false for off"
COUNT = "must be a whole number above 0, or 0 or false for no limit"
SIZE = 'a number of bytes or text such as "32KiB" or "32KB" (KiB: 1024 bytes, KB: 1000)'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("workers = 0", 'workers: must be a number of processes (1 or more) or "auto", not 0'),
        (
            "workers = true",
            'workers: must be a number of processes (1 or more) or "auto", not true',
        ),
        (
            'workers = "all"',
            "workers: must be a number of processes (1 or more) or \"auto\", not 'all'",
        ),
        ('forward_h2c = "yes"', "forward_h2c: must be true or false, not 'yes'"),
        ("splice = 1", "splice: must be true or false, not 1"),
        ('[http2]\nenabled = "no"', "http2.enabled: must be true or false, not 'no'"),
        ("[http2]\ncleartext = 0", "http2.cleartext: must be true or false, not 0"),
        (
            "[http2]\nmax_concurrent_streams = 0",
            "http2.max_concurrent_streams: must be a whole number above 0, not 0",
        ),
        ("[http2]\nstall_timeout = 0", f"http2.stall_timeout: {SECONDS}, not 0"),
        (
            "listen = []",
            'listen: must be a list of endpoints, such as ["tcp:8080"], not an empty list',
        ),
        ("listen = 8080", 'listen: must be a list of endpoints, such as ["tcp:8080"], not 8080'),
        ("[timeouts]\nkeep_alive = -1", f"timeouts.keep_alive: {SECONDS}, not -1"),
        ("[timeouts]\nshutdown_grace = 0", f"timeouts.shutdown_grace: {SECONDS}, not 0"),
        ("[timeouts]\nresponse_head = nan", f"timeouts.response_head: {SECONDS}, not nan"),
        ("[timeouts]\nbackend_connect = inf", f"timeouts.backend_connect: {SECONDS}, not inf"),
        ("[timeouts]\ntunnel_idle = true", f"timeouts.tunnel_idle: {SECONDS_OR_OFF}, not true"),
        ("[timeouts]\ntunnel_lifetime = -5", f"timeouts.tunnel_lifetime: {SECONDS_OR_OFF}, not -5"),
        ("[limits]\nmax_connections = -1", f"limits.max_connections: {COUNT}, not -1"),
        ("[limits]\nmax_tunnels = 1.5", f"limits.max_tunnels: {COUNT}, not 1.5"),
        ("[limits]\nmax_tunnels = true", f"limits.max_tunnels: {COUNT}, not true"),
        (
            "[limits]\nmax_request_head = 0",
            f"limits.max_request_head: must be a size above 0: {SIZE}, not 0",
        ),
        (
            "[limits]\nmax_request_head = false",
            f"limits.max_request_head: must be a size above 0: {SIZE}, not false",
        ),
        (
            '[limits]\nmax_request_head = "32k"',
            f"limits.max_request_head: must be a size above 0: {SIZE}, not '32k'",
        ),
        (
            '[limits]\nmax_request_head = "1.5MiB"',
            f"limits.max_request_head: must be a size above 0: {SIZE}, not '1.5MiB'",
        ),
        (
            "[limits]\nmax_request_head = -1",
            f"limits.max_request_head: must be a size above 0: {SIZE}, not -1",
        ),
        (
            '[limits]\nmax_request_body = "lots"',
            f"limits.max_request_body: must be a size: {SIZE}; "
            "or 0 or false for no limit, not 'lots'",
        ),
        (
            "[limits]\nmax_request_body = 2.5",
            f"limits.max_request_body: must be a size: {SIZE}; or 0 or false for no limit, not 2.5",
        ),
        (
            '[access_log]\nformat = "xml"',
            "access_log.format: unknown format 'xml'; use one of text, json",
        ),
        ("[access_log]\npath = 1", "access_log.path: must be a file path in quotes, not 1"),
        (
            "timeouts = 5",
            "timeouts: must be a table (write [timeouts] and its keys below it), not 5",
        ),
    ],
)
def test_top_level_mistakes(line: str, message: str) -> None:
    """Each mistake is on the file's second line, after a first line that is fine."""
    assert errors(f"# the settings\n{line}\n" + ROUTE) == [
        f"proxy.toml:{line.count(chr(10)) + 2}: {message}"
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("name = 5", "name: must be non-empty text in quotes, not 5"),
        ('name = " "', "name: must be non-empty text in quotes, not ' '"),
        ('path = "ws"', 'path: must be a path starting with "/", such as "/ws", not \'ws\''),
        (
            'path = "/ws?x=1"',
            "path: '/ws?x=1' is a path prefix: write it without what follows '?' or '#'",
        ),
        (
            'path = "/a b"',
            "path: '/a b' is not a request path; remove spaces and non-ASCII characters",
        ),
        ("policy = 1", "policy: unknown policy 1; use one of round-robin, least-conn, client-hash"),
        ("fail_timeout = 0", f"fail_timeout: {SECONDS}, not 0"),
        (
            'validators = "websocket"',
            "validators: must be a list of validator specs, "
            """such as ["rfc9110", "websocket"], not 'websocket'""",
        ),
        ("validators = [1]", 'validators[0]: must be a validator spec such as "websocket", not 1'),
        (
            "hosts = []",
            'hosts: must be a list of host names, such as ["example.com", "*.example.com"] '
            "(or no hosts key), not an empty list",
        ),
        ("host = 1", "host: must be a host name such as 'chat.example.com', not 1"),
        ('timeouts = { response_head = "x" }', f"timeouts.response_head: {SECONDS}, not 'x'"),
        (
            "health = { expect_status = 700 }",
            "health.expect_status: must be an HTTP status code from 100 to 599, not 700",
        ),
        ("health = { interval = 0 }", f"health.interval: {SECONDS}, not 0"),
        (
            'health = { path = "healthz" }',
            'health.path: must be a path starting with "/", such as "/ws", not \'healthz\'',
        ),
        ('tls = { verify = "no" }', "tls.verify: must be true or false, not 'no'"),
        ("tls = true", "tls: must be a table (write [route.tls] and its keys below it), not true"),
    ],
)
def test_route_mistakes(line: str, message: str) -> None:
    """Each mistake is on line 3, in the only route."""
    assert errors(f"{ROUTE}{line}\n") == [f"proxy.toml:3: route[1].{message}"]


def test_every_wrong_item_of_a_list_is_reported_on_its_own_line() -> None:
    assert errors(
        """\
        [[route]]
        backends = [
            "http://127.0.0.1:9000",
            5,
            "ftp://127.0.0.1",
        ]
        """
    ) == [
        "proxy.toml:4: route[1].backends[1]: must be non-empty text in quotes, not 5",
        "proxy.toml:5: route[1].backends[2]: " + backend_message("ftp://127.0.0.1"),
    ]


@pytest.mark.parametrize(
    ("host", "message"),
    [
        (
            "chat.example.com:8080",
            "'chat.example.com:8080' has a port; write the host name alone: 'chat.example.com'",
        ),
        ("[::1]:8080", "'[::1]:8080' has a port; write the host name alone: '[::1]'"),
        (
            "chat.example.com/ws",
            "'chat.example.com/ws' has a path; "
            "write 'chat.example.com' and put the path in path = \"/ws\"",
        ),
        (
            "https://Chat.example.com/",
            "'https://Chat.example.com/' is a URL; write the host name alone: 'chat.example.com'",
        ),
        (
            "chat.*.example.com",
            "'chat.*.example.com': only a leading '*.' wildcard is allowed, as in '*.example.com'",
        ),
        (
            "*example.com",
            "'*example.com': only a leading '*.' wildcard is allowed, as in '*.example.com'",
        ),
        ("*", "'*' is not a host name; leave hosts out to serve every host"),
        (
            "chat_room.example.com",
            "'chat_room.example.com' is not a host name; use letters, digits, '-' and '.'",
        ),
        (
            "-chat.example.com",
            "'-chat.example.com' is not a host name; use letters, digits, '-' and '.'",
        ),
        (
            "chat..example.com",
            "'chat..example.com' is not a host name; use letters, digits, '-' and '.'",
        ),
        (
            " chat.example.com",
            "' chat.example.com' is not a host name; use letters, digits, '-' and '.'",
        ),
        ("[zz::1]", "'[zz::1]' is not a host name; use letters, digits, '-' and '.'"),
    ],
)
def test_bad_hosts_say_what_to_write(host: str, message: str) -> None:
    assert errors(f'{ROUTE}hosts = ["example.com", "{host}"]\n') == [
        f"proxy.toml:3: route[1].hosts[1]: {message}"
    ]


def test_host_and_hosts_together() -> None:
    assert errors(ROUTE + 'hosts = ["a.example"]\nhost = "b.example"\n') == [
        'proxy.toml:4: route[1].host: write either host = "..." or hosts = [...], not both'
    ]


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("tcp:abc", "invalid literal for int() with base 10: 'abc'"),
        ("nope:1", "Unknown endpoint type: 'nope'"),
    ],
)
def test_bad_endpoint_strings(endpoint: str, reason: str) -> None:
    usage = "write a Twisted server endpoint, such as tcp:8080 or tcp:8080:interface=127.0.0.1"
    assert errors(
        f'listen = [\n  "tcp:8080",\n  "{endpoint}",\n]\nmetrics = "{endpoint}"\n' + ROUTE
    ) == [
        f"proxy.toml:3: listen[1]: cannot listen on {endpoint!r} ({reason}); {usage}",
        f"proxy.toml:5: metrics: cannot listen on {endpoint!r} ({reason}); {usage}",
    ]


def test_an_ssl_endpoint_whose_key_is_missing(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    problems = errors(f'listen = ["ssl:8443:privateKey={key}"]\n' + ROUTE)
    assert problems == [
        f"proxy.toml:1: listen[0]: cannot listen on 'ssl:8443:privateKey={key}' "
        f"([Errno 2] No such file or directory: '{key}'); write a Twisted server endpoint, "
        "such as tcp:8080 or tcp:8080:interface=127.0.0.1"
    ]


def test_routes_are_numbered_from_1_and_list_items_from_0() -> None:
    assert errors(ROUTE + '[[route]]\npath = "/b"\nbackends = ["http://:80"]\n') == [
        "proxy.toml:5: route[2].backends[0]: " + backend_message("http://:80")
    ]


def test_a_bad_backend_gives_parse_backends_message() -> None:
    assert errors('[[route]]\nbackends = ["http://127.0.0.1:9000", "http://:80"]\n') == [
        "proxy.toml:2: route[1].backends[1]: " + backend_message("http://:80")
    ]


def test_an_unknown_or_misused_validator_gives_the_registrys_message() -> None:
    assert errors(ROUTE + 'validators = ["websocket", "nope", "origin:"]\n') == [
        "proxy.toml:3: route[1].validators[1]: " + validator_message("nope"),
        "proxy.toml:3: route[1].validators[2]: " + validator_message("origin:"),
    ]


def test_unknown_keys_suggest_the_closest_known_one() -> None:
    assert errors(
        """\
        listne = ["tcp:8080"]
        [[route]]
        backends = ["http://127.0.0.1:9000"]
        [[route]]
        path = "/b"
        backends = ["http://127.0.0.1:9000"]
        [[route]]
        path = "/c"
        backend = ["http://127.0.0.1:9000"]
        """
    ) == [
        "proxy.toml:1: listne: unknown key; did you mean 'listen'?",
        'proxy.toml:7: route[3]: no backends; add backends = ["http://HOST:PORT"]',
        "proxy.toml:9: route[3].backend: unknown key; did you mean 'backends'?",
    ]


def test_a_key_written_in_the_wrong_table_says_where_it_belongs() -> None:
    assert errors(
        """\
        max_connections = 5
        [timeouts]
        max_request_body = 0
        [[route]]
        backends = ["http://127.0.0.1:9000"]
        tunnel_idle = 60
        [route.timeouts]
        client_head = 5
        """
    ) == [
        "proxy.toml:1: max_connections: unknown key here; it belongs in [limits]",
        "proxy.toml:3: timeouts.max_request_body: unknown key here; "
        "it belongs in [limits] or [[route]] or [route.limits]",
        "proxy.toml:6: route[1].tunnel_idle: unknown key here; "
        "it belongs in [timeouts] or [route.timeouts]",
        "proxy.toml:8: route[1].timeouts.client_head: unknown key here; it belongs in [timeouts]",
    ]


def test_an_unknown_key_with_no_close_match_lists_the_keys() -> None:
    assert errors("[access_log]\ncolour = true\n" + ROUTE) == [
        "proxy.toml:2: access_log.colour: unknown key; the keys here are format, path"
    ]


def test_a_route_without_backends_is_reported_at_its_header() -> None:
    assert errors(ROUTE + '\n[[route]]\nname = "second"\npath = "/x"\n') == [
        'proxy.toml:4: route[2]: no backends; add backends = ["http://HOST:PORT"]'
    ]


def test_no_routes() -> None:
    assert errors('listen = ["tcp:8080"]\n') == [
        'proxy.toml:1: route: no routes; add a [[route]] table with backends = ["http://HOST:PORT"]'
    ]


def test_a_route_written_with_one_bracket() -> None:
    assert errors('splice = true\n[route]\nbackends = ["http://127.0.0.1:9000"]\n') == [
        "proxy.toml:2: route: write each route as a [[route]] table, with two brackets"
    ]


def test_two_routes_with_one_name() -> None:
    assert errors(
        """\
        [[route]]
        name = "chat"
        backends = ["http://127.0.0.1:9000"]
        [[route]]
        name = "route 3"
        path = "/b"
        backends = ["http://127.0.0.1:9000"]
        [[route]]
        path = "/c"
        backends = ["http://127.0.0.1:9000"]
        [[route]]
        name = "chat"
        path = "/d"
        backends = ["http://127.0.0.1:9000"]
        """
    ) == [
        "proxy.toml:8: route[3].name: 'route 3' is already the name of route[2]; "
        "give each route its own name",
        "proxy.toml:12: route[4].name: 'chat' is already the name of route[1]; "
        "give each route its own name",
    ]


def test_two_routes_for_the_same_hosts_and_path() -> None:
    assert errors(
        """\
        [[route]]
        hosts = ["a.example", "B.example"]
        path = "/ws"
        backends = ["http://127.0.0.1:9000"]
        [[route]]
        hosts = ["b.example", "a.example"]
        path = "/ws/"
        backends = ["http://127.0.0.1:9001"]
        """
    ) == [
        "proxy.toml:5: route[2]: serves the same hosts and path as route[1]; change its hosts "
        "or path, or put both routes' backends in one route"
    ]


def test_routes_whose_hosts_are_wrong_are_not_compared() -> None:
    problems = errors(
        """\
        [[route]]
        backends = ["http://127.0.0.1:9000"]
        [[route]]
        hosts = ["a.example:80"]
        backends = ["http://127.0.0.1:9000"]
        """
    )
    assert problems == [
        "proxy.toml:4: route[2].hosts[0]: 'a.example:80' has a port; "
        "write the host name alone: 'a.example'"
    ]


def test_a_missing_ca_file_is_named_with_its_full_path(tmp_path: Path) -> None:
    source = str(tmp_path / "proxy.toml")
    text = '[[route]]\nbackends = ["https://app.example"]\n[route.tls]\nca = "nowhere/ca.pem"\n'
    assert errors(text, source) == [
        f"{source}:4: route[1].tls.ca: cannot read the CA bundle {tmp_path}/nowhere/ca.pem "
        "(No such file or directory); give the path of a readable PEM file "
        "(a relative path starts from this file's directory)"
    ]


def test_a_ca_file_without_certificates(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    source = str(tmp_path / "proxy.toml")
    text = '[[route]]\nbackends = ["https://app.example"]\n[route.tls]\nca = "ca.pem"\n'
    assert errors(text, source) == [
        f"{source}:4: route[1].tls.ca: the CA bundle {tmp_path}/ca.pem holds no readable "
        "certificate; give a PEM file of one or more '-----BEGIN CERTIFICATE-----' blocks"
    ]


def test_tls_settings_are_checked_with_each_backend_as_the_proxy_will_use_them(
    tmp_path: Path,
) -> None:
    ca = write_ca(tmp_path / "ca.pem")
    source = str(tmp_path / "proxy.toml")
    text = dedent(
        """\
        [[route]]
        backends = ["https://app.example", "http://127.0.0.1:9000"]
        [route.tls]
        ca = "ca.pem"
        """
    )
    plain = backend_message("http://127.0.0.1:9000", tls_ca=str(ca))
    assert errors(text, source) == [f"{source}:2: route[1].backends[1]: {plain}"]
    off = text + "verify = false\n"
    unverified = backend_message("https://app.example", tls_ca=str(ca), tls_verify=False)
    assert errors(off, source)[0] == f"{source}:2: route[1].backends[0]: {unverified}"


def test_an_access_log_in_a_missing_directory(tmp_path: Path) -> None:
    source = str(tmp_path / "proxy.toml")
    assert errors('[access_log]\npath = "logs/access.log"\n' + ROUTE, source) == [
        f"{source}:2: access_log.path: the directory of {tmp_path}/logs/access.log does not "
        "exist; create it or write another path"
    ]
    assert errors('[access_log]\npath = "."\n' + ROUTE, source) == [
        f"{source}:2: access_log.path: {tmp_path} is a directory; write the path of a file in it"
    ]


def test_every_mistake_is_reported_in_the_order_of_the_file() -> None:
    assert errors(
        """\
        [[route]]
        policy = "fastest"
        backends = ["http://127.0.0.1:9000"]
        [route.timeouts]
        tunnel_idle = "long"
        [timeouts]
        client_head = "soon"
        [limits]
        max_request_head = "big"
        """
    ) == [
        "proxy.toml:2: route[1].policy: unknown policy 'fastest'; "
        "use one of round-robin, least-conn, client-hash",
        f"proxy.toml:5: route[1].timeouts.tunnel_idle: {SECONDS_OR_OFF}, not 'long'",
        "proxy.toml:7: timeouts.client_head: must be a number of seconds above 0, not 'soon'",
        f"proxy.toml:9: limits.max_request_head: must be a size above 0: {SIZE}, not 'big'",
    ]


def test_keys_in_inline_tables_and_dotted_keys_are_found_on_their_line() -> None:
    assert errors(
        """\
        [[route]]
        backends = ["http://127.0.0.1:9000"]
        timeouts.tunnel_idle = "x"
        health = { path = "/", interval = "y" }
        """
    ) == [
        f"proxy.toml:3: route[1].timeouts.tunnel_idle: {SECONDS_OR_OFF}, not 'x'",
        f"proxy.toml:4: route[1].health.interval: {SECONDS}, not 'y'",
    ]


# -- Files that cannot be read or are not TOML ---------------------------------------------


def test_a_toml_syntax_error_gives_its_line() -> None:
    assert errors("splice = true\n\n[[route]]\npolicy = least-conn\n") == [
        "proxy.toml:4: TOML syntax error: invalid value at column 10; "
        'if it is text, put it in quotes, as in policy = "least-conn"'
    ]
    assert errors("[[route]]\nbackends = [1,\n  2\n\n") == [
        "proxy.toml:3: TOML syntax error: unclosed array at the end of the file"
    ]
    assert errors("[[route]]\n[route]\n") == [
        "proxy.toml:2: TOML syntax error: cannot declare ('route',) twice at column 7"
    ]


def test_a_missing_file_is_one_line_naming_it(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}: cannot read the configuration file: No such file or directory"
    ]
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read the configuration file: Is a directory"


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"splice = true\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}:2: not UTF-8 text; save the file as UTF-8"


def test_a_config_error_is_a_value_error() -> None:
    error = ConfigError(["a.toml:1: x: wrong", "a.toml:2: y: wrong"])
    assert isinstance(error, ValueError)
    assert str(error) == "a.toml:1: x: wrong\na.toml:2: y: wrong"


# -- The example file and describe_config ----------------------------------------------------


def test_the_example_file_loads_and_describes_itself() -> None:
    config = load_config(str(EXAMPLE))
    assert describe_config(config) == "\n".join(
        [
            f"{EXAMPLE}: OK: listening on tcp:8080:interface=127.0.0.1; 2 routes, 5 backends; "
            "metrics on tcp:9100:interface=127.0.0.1",
            "  access log (text) to standard output; client head timeout 60 s; keep-alive "
            "timeout 60 s; shutdown grace 30 s; max connections 10000; max tunnels 10000; "
            "HTTP/2 over TLS, 100 streams per connection, stall timeout 60 s",
            "  chat: hosts chat.example.com, *.chat.example.com; path /ws; least-conn over "
            "http://10.0.0.11:9000, http://10.0.0.12:9000, http://10.0.0.13:9000; "
            "health check GET /healthz every 10 s",
            "    validators rfc9110, websocket, "
            "origin:https://chat.example.com,https://*.chat.example.com; connect timeout 10 s; "
            "response timeout 60 s; tunnel idle timeout 3600 s; tunnel lifetime off; "
            "max body none; fail timeout 10 s; health check timeout 5 s, expecting 200",
            "  app: any host; path /; round-robin over https://app1.internal.example:8443, "
            "https://app2.internal.example:8443; health check GET /healthz every 10 s",
            "    validators rfc9110, websocket; connect timeout 10 s; response timeout 60 s; "
            "tunnel idle timeout off; tunnel lifetime off; max body 10MiB; fail timeout 10 s; "
            "health check timeout 5 s, expecting 200",
        ]
    )
    chat, app = config.routes
    assert chat.tunnel_idle_timeout == 3600.0
    assert app.tunnel_idle_timeout is None
    assert app.max_request_body == 10 * 1024 * 1024


def test_the_example_files_commented_ca_line_works_once_the_file_exists(tmp_path: Path) -> None:
    ca = write_ca(tmp_path / "internal-ca.pem")
    text = EXAMPLE.read_text()
    assert text.count('# ca = "internal-ca.pem"') == 1
    copy = tmp_path / "upgradeproxy.toml"
    copy.write_text(text.replace('# ca = "internal-ca.pem"', 'ca = "internal-ca.pem"'))
    assert load_config(str(copy)).routes[1].tls_ca == str(ca)


def test_describe_config_mentions_workers_and_unverified_tls() -> None:
    config = parse(
        """\
        workers = 4
        [[route]]
        name = "secure"
        host = "app.example"
        backends = ["https://app.example"]
        [route.tls]
        verify = false
        """
    )
    assert describe_config(config) == (
        "proxy.toml: OK: listening on tcp:8080:interface=127.0.0.1; 1 route, 1 backend; "
        "4 workers\n"
        "  access log (text) to the main log; client head timeout 60 s; keep-alive timeout 60 s; "
        "shutdown grace 30 s; max connections 10000; max tunnels 10000; "
        "HTTP/2 over TLS, 100 streams per connection, stall timeout 60 s\n"
        "  secure: hosts app.example; path /; least-conn over https://app.example; "
        "certificate verification OFF\n"
        "    validators rfc9110, websocket; connect timeout 10 s; response timeout 60 s; "
        "tunnel idle timeout off; tunnel lifetime off; max body none"
    )


def test_describe_config_of_a_configuration_built_without_a_file() -> None:
    route = RouteConfig("all", (), "/", ("http://a:1", "http://b:2"), policy=Policy.ROUND_ROBIN)
    config = ProxyConfig(routes=(route,), listen=("tcp:1", "tcp:2"))
    assert describe_config(config) == (
        "configuration: OK: listening on tcp:1, tcp:2; 1 route, 2 backends\n"
        "  access log (text) to the main log; client head timeout 60 s; keep-alive timeout 60 s; "
        "shutdown grace 30 s; max connections 10000; max tunnels 10000; "
        "HTTP/2 over TLS, 100 streams per connection, stall timeout 60 s\n"
        "  all: any host; path /; round-robin over http://a:1, http://b:2\n"
        "    validators rfc9110, websocket; connect timeout 10 s; response timeout 60 s; "
        "tunnel idle timeout off; tunnel lifetime off; max body none; fail timeout 10 s"
    )


def test_describe_config_shows_validator_arguments_and_every_setting() -> None:
    config = parse(
        """\
        [timeouts]
        tunnel_idle = 90
        [access_log]
        format = "json"
        path = "access.log"
        [[route]]
        backends = ["http://127.0.0.1:9000"]
        validators = ["rfc9110:lenient-connection", "allow:websocket"]
        max_request_body = "64KiB"
        [route.timeouts]
        response_head = 5
        """
    )
    lines = describe_config(config).splitlines()
    assert lines[1].startswith(f"  access log (json) to {os.path.abspath('access.log')}; ")
    assert lines[3] == (
        "    validators rfc9110:lenient-connection, allow:websocket; connect timeout 10 s; "
        "response timeout 5 s; tunnel idle timeout 90 s; tunnel lifetime off; max body 64KiB"
    )


def test_a_dumped_configuration_comes_back_equal() -> None:
    config = load_config(str(EXAMPLE))
    assert undump_config(dump_config(config)) == config


# -- The locator ----------------------------------------------------------------------------

LOCATOR_TEXT = '''\
# a comment [not = a header]
a = 1
"quoted.key" = "x = 2"
multi = """
b = 3
[fake]
""" # c = 1
lit = \'\'\'
[[fake]] \'\'\'
arr = [
  1, # c = 4
  [2,
   3],
  {x = 1, y = { z = "}" }},
]
dotted.inner . deeper = 5
when = 1979-05-27 07:32:00Z
[ t . "u v" ]
k = 'v'
[[route]]
name = "one"
[route.timeouts]
tunnel_idle = 3
[[route]]

[route.tls]
ca = "x"
[[route.sub]]
w = 1
[[route.sub]]
w = 2
'''


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (("a",), 2),
        (("quoted.key",), 3),
        (("multi",), 4),
        (("lit",), 8),
        (("arr",), 10),
        (("arr", 0), 11),
        (("arr", 1), 12),
        (("arr", 1, 1), 13),
        (("arr", 2, "y", "z"), 14),
        (("dotted", "inner", "deeper"), 16),
        (("when",), 17),
        (("t", "u v"), 18),
        (("t", "u v", "k"), 19),
        (("route", 0), 20),
        (("route", 0, "name"), 21),
        (("route", 0, "timeouts", "tunnel_idle"), 23),
        (("route", 1), 24),
        (("route", 1, "tls", "ca"), 27),
        (("route", 1, "sub", 1, "w"), 31),
        # Keys that are not written fall back to their table, then to line 1.
        (("route", 1, "backends"), 24),
        (("route", 1, "tls", "verify"), 26),
        (("t", "other"), 18),
        (("nothing",), 1),
        ((), 1),
    ],
)
def test_the_locator_finds_the_line_of_each_key(path: tuple[str | int, ...], line: int) -> None:
    assert KeyLines(LOCATOR_TEXT).line(path) == line


def test_a_port_out_of_range_is_a_mistake_in_the_file() -> None:
    assert errors('listen = ["tcp:99999"]\nmetrics = "tcp:70000"\n' + ROUTE) == [
        "proxy.toml:1: listen[0]: cannot listen on 'tcp:99999': port 99999 is out of range; "
        "write a port from 1 to 65535 (0: any free port)",
        "proxy.toml:2: metrics: cannot listen on 'tcp:70000': port 70000 is out of range; "
        "write a port from 1 to 65535 (0: any free port)",
    ]


@pytest.mark.parametrize(
    ("table", "said"),
    [
        ("enabled = false", "HTTP/2 off"),
        (
            "cleartext = true\nmax_concurrent_streams = 8",
            "HTTP/2 over TLS and cleartext, 8 streams per connection, stall timeout 60 s",
        ),
        (
            "enabled = false\ncleartext = true",
            "HTTP/2 cleartext, 100 streams per connection, stall timeout 60 s",
        ),
    ],
)
def test_describe_config_says_where_http2_is_spoken(table: str, said: str) -> None:
    config = parse("[http2]\n" + table + "\n" + ROUTE)
    assert describe_config(config).splitlines()[1].endswith(f"max tunnels 10000; {said}")
    settings = settings_for(config)
    assert (settings.http2, settings.http2_cleartext) == (config.http2, config.http2_cleartext)
    assert settings.http2_max_concurrent_streams == config.http2_max_concurrent_streams
