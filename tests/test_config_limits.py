"""Per-client limits and the PROXY protocol in the configuration file and on the
command line: what they resolve to, and the mistakes they report."""

from __future__ import annotations

from textwrap import dedent

import pytest
from twisted.internet.task import Clock

from upgradeproxy.cli.config import (
    ConfigError,
    ProxyConfig,
    describe_config,
    dump_config,
    parse_config,
    undump_config,
)
from upgradeproxy.cli.service import build_route, listeners, settings_for
from upgradeproxy.cli.tap import Options
from upgradeproxy.core._clientlimits import ClientLimits

ROUTE = '[[route]]\nbackends = ["http://127.0.0.1:9000"]\n'
BACKEND = ["--backend", "http://127.0.0.1:9000"]


def parse(text: str) -> ProxyConfig:
    return parse_config(dedent(text), "proxy.toml")


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse(text)
    return raised.value.problems


FULL = """\
    [limits]
    client_connections = 50
    client_tunnels = 20
    client_upgrade_rate = 2.5
    client_upgrade_burst = 10
    client_ipv6_prefix = 56

    [proxy_protocol]
    listen = ["tcp:8081:interface=127.0.0.1"]
    trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]
    header_timeout = 3

    [[route]]
    name = "chat"
    backends = ["http://127.0.0.1:9000"]
    send_proxy = "v2"
    [route.limits]
    client_tunnels = 2
    client_upgrade_rate = 0.5
    max_request_body = "1MiB"
"""


def test_the_keys_resolve_to_the_proxys_settings_and_the_routes() -> None:
    config = parse(FULL)
    settings = settings_for(config)
    assert settings.client_limits == ClientLimits(50, 20, 2.5, 10)
    assert settings.client_ipv6_prefix == 56
    assert config.proxy_protocol_listen == ("tcp:8081:interface=127.0.0.1",)
    assert config.trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32")
    assert config.proxy_protocol_timeout == 3
    assert [(lst.description, lst.proxy_protocol) for lst in listeners(config)] == [
        ("tcp:8080:interface=127.0.0.1", False),
        ("tcp:8081:interface=127.0.0.1", True),
    ]
    route = build_route(config.routes[0], Clock())
    assert route.client_limits == ClientLimits(tunnels=2, upgrade_rate=0.5)
    assert route.max_request_body == 1024 * 1024
    assert route.group.send_proxy == "v2"


def test_limits_are_off_by_default() -> None:
    config = parse(ROUTE)
    assert not settings_for(config).client_limits.enforced
    assert build_route(config.routes[0], Clock()).client_limits is None
    assert config.proxy_protocol_listen == () and listeners(config)[0].proxy_protocol is False


def test_a_worker_gets_them_too() -> None:
    config = parse(FULL)
    assert undump_config(dump_config(config)) == config


def test_check_shows_them() -> None:
    text = describe_config(parse(FULL))
    assert "with the PROXY protocol on tcp:8081:interface=127.0.0.1" in text
    assert (
        "per client (IPv4 address, IPv6 /56): max connections 50, max tunnels 20, "
        "upgrade attempts 2.5/s, 10 at once"
    ) in text
    assert "PROXY protocol (v1 and v2) required from 10.0.0.0/8, 127.0.0.1/32, within 3 s" in text
    assert "per client on this route: max tunnels 2, upgrade attempts 0.5/s, 1 at once" in text
    assert "sends PROXY protocol v2 to backends" in text


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "[limits]\nclient_upgrade_rate = -1\n" + ROUTE,
            "proxy.toml:2: limits.client_upgrade_rate: must be a number per second above 0",
        ),
        (
            "[limits]\nclient_connections = 1.5\n" + ROUTE,
            "proxy.toml:2: limits.client_connections: must be a whole number above 0",
        ),
        (
            "[limits]\nclient_ipv6_prefix = 129\n" + ROUTE,
            "proxy.toml:2: limits.client_ipv6_prefix: must be a prefix length from 1 to 128",
        ),
        (
            "[limits]\nclient_upgrade_burst = 5\n" + ROUTE,
            "proxy.toml:2: limits.client_upgrade_burst: a burst needs a rate",
        ),
        (
            ROUTE + "[route.limits]\nclient_upgrade_burst = 5\n",
            "proxy.toml:4: route[1].limits.client_upgrade_burst: a burst needs a rate",
        ),
        (
            ROUTE + "[route.limits]\nclient_connections = 5\n",
            "proxy.toml:4: route[1].limits.client_connections: unknown key here; "
            "it belongs in [limits]",
        ),
        (
            ROUTE + 'send_proxy = "v3"\n',
            "proxy.toml:3: route[1].send_proxy: unknown PROXY protocol version 'v3'; "
            "use one of v1, v2",
        ),
        (
            '[[route]]\nbackends = ["https://127.0.0.1:9443"]\nsend_proxy = "v1"\n',
            "proxy.toml:3: route[1].send_proxy: cannot be used with https:// backends",
        ),
        (
            '[proxy_protocol]\nlisten = ["tcp:8081"]\n' + ROUTE,
            "proxy.toml:1: proxy_protocol: listen is given but trusted_proxies is not",
        ),
        (
            '[proxy_protocol]\ntrusted_proxies = ["10.0.0.0/8"]\n' + ROUTE,
            "proxy.toml:1: proxy_protocol: no listen",
        ),
        (
            '[proxy_protocol]\nlisten = ["tcp:8081"]\ntrusted_proxies = ["10.0.0.0/33"]\n' + ROUTE,
            "proxy.toml:3: proxy_protocol.trusted_proxies[0]: '10.0.0.0/33' is not a network",
        ),
        (
            'listen = ["tcp:8081"]\n[proxy_protocol]\nlisten = ["tcp:8081"]\n'
            'trusted_proxies = ["10.0.0.0/8"]\n' + ROUTE,
            "proxy.toml:3: proxy_protocol.listen: tcp:8081 is in the top-level listen too",
        ),
    ],
)
def test_mistakes_name_the_file_line_and_key(text: str, line: str) -> None:
    found = errors(text)
    assert len(found) == 1 and found[0].startswith(line), found


# -- the command line -----------------------------------------------------------------


def parsed(*args: str) -> ProxyConfig:
    options = Options()
    options.parseOptions(list(args))
    config: ProxyConfig = options["proxy_config"]
    return config


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        parsed(*args)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_the_options_set_the_same_settings() -> None:
    config = parsed(
        *BACKEND,
        "--max-client-connections", "5", "--max-client-tunnels", "3",
        "--client-upgrade-rate", "0.5", "--client-upgrade-burst", "2",
        "--client-ipv6-prefix", "128", "--send-proxy", "v1",
        "--proxy-protocol-listen", "tcp:8081:interface=127.0.0.1",
        "--trusted-proxy", "127.0.0.1", "--trusted-proxy", "10.0.0.0/8",
    )  # fmt: skip
    assert settings_for(config).client_limits == ClientLimits(5, 3, 0.5, 2)
    assert config.client_ipv6_prefix == 128
    assert config.routes[0].send_proxy == "v1"
    assert config.proxy_protocol_listen == ("tcp:8081:interface=127.0.0.1",)
    assert config.trusted_proxies == ("127.0.0.1/32", "10.0.0.0/8")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--client-upgrade-rate", "fast"], "--client-upgrade-rate must be a number per second"),
        (["--max-client-tunnels", "-2"], "--max-client-tunnels must be a whole number above 0"),
        (["--send-proxy", "v3"], '--send-proxy must be "v1" or "v2"'),
        (["--trusted-proxy", "ten"], "--trusted-proxy 'ten' is not a network"),
        (["--client-upgrade-burst", "4"], "--client-upgrade-burst needs --client-upgrade-rate"),
        (["--proxy-protocol-listen", "tcp:8081"], "needs --trusted-proxy NETWORK"),
        (["--trusted-proxy", "10.0.0.0/8"], "needs --proxy-protocol-listen ENDPOINT"),
        (
            ["--proxy-protocol-listen", "nonsense:", "--trusted-proxy", "10.0.0.0/8"],
            "--proxy-protocol-listen: cannot listen on",
        ),
    ],
)
def test_malformed_options_are_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert message in refused(capsys, *BACKEND, *args)


def test_send_proxy_belongs_to_the_routes_of_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "proxy.toml"
    path.write_text(ROUTE)
    line = refused(capsys, "--config", str(path), "--send-proxy", "v2")
    assert "--send-proxy (write send_proxy in a [[route]] in the file)" in line


def test_the_client_options_apply_over_a_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "proxy.toml"
    path.write_text("[limits]\nclient_tunnels = 9\n" + ROUTE)
    config = parsed("--config", str(path), "--max-client-connections", "4")
    assert (config.client_connections, config.client_tunnels) == (4, 9)


def test_the_example_shows_the_keys_commented_out_and_they_load(tmp_path: object) -> None:
    from pathlib import Path

    from upgradeproxy.cli.config import load_config

    example = Path(__file__).parent.parent / "examples" / "upgradeproxy.toml"
    text = example.read_text()
    for line in (
        "# [proxy_protocol]\n",
        '# listen = ["tcp:8081:interface=10.0.0.5"]\n',
        '# trusted_proxies = ["10.0.0.0/8"]\n',
        "# header_timeout = 5 ",
        '# send_proxy = "v2"\n',
    ):
        assert text.count(line) == 1, line
        text = text.replace(line, line[2:])
    copy = Path(str(tmp_path)) / "upgradeproxy.toml"
    copy.write_text(text)
    config = load_config(str(copy))
    assert config.proxy_protocol_listen == ("tcp:8081:interface=10.0.0.5",)
    assert config.routes[0].send_proxy == "v2"
