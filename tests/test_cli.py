"""The command line: option errors, options beside --config, what --check shows, --version."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import upgradeproxy
from upgradeproxy.__main__ import main
from upgradeproxy.cli import service, tap
from upgradeproxy.cli.config import DEFAULT_LISTEN, ProxyConfig
from upgradeproxy.cli.tap import Options
from upgradeproxy.core import address
from upgradeproxy.registry import BadValidator, ValidatorPlugin, build_chain
from upgradeproxy.validators import WebSocketValidator

BACKEND = ["--backend", "http://127.0.0.1:9000"]
PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def parsed(*args: str) -> ProxyConfig:
    options = Options()
    options.parseOptions(list(args))
    config: ProxyConfig = options["proxy_config"]
    return config


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line that refusing ``args`` printed; the exit status was 2."""
    with pytest.raises(SystemExit) as exited:
        parsed(*args)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("upgradeproxy: ")
    return lines[0]


# -- malformed values -------------------------------------------------------------------

SECONDS = "must be a number of seconds above 0"
OFF = "must be a number of seconds above 0, or 0 or false for off"
COUNT = "must be a whole number above 0, or 0 or false for no limit"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--response-timeout", "abc", f"{SECONDS}, not 'abc'"),
        ("--response-timeout", "-1", f"{SECONDS}, not -1"),
        ("--response-timeout", "0", f"{SECONDS}, not 0"),
        ("--connect-timeout", "nan", f"{SECONDS}, not nan"),
        ("--head-timeout", "soon", f"{SECONDS}, not 'soon'"),
        ("--keep-alive-timeout", "inf", f"{SECONDS}, not inf"),
        ("--shutdown-grace", "-3", f"{SECONDS}, not -3"),
        ("--tunnel-idle-timeout", "-5", f"{OFF}, not -5"),
        ("--tunnel-lifetime", "forever", f"{OFF}, not 'forever'"),
        ("--max-connections", "1.5", f"{COUNT}, not 1.5"),
        ("--max-tunnels", "-1", f"{COUNT}, not -1"),
        ("--max-body", "lots", "must be a size: a number of bytes or text such as"),
        ("--workers", "many", 'must be a number of processes (1 or more) or "auto"'),
        ("--workers", "0", 'must be a number of processes (1 or more) or "auto", not 0'),
    ],
)
def test_a_malformed_value_is_named_in_one_line(
    capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    line = refused(capsys, *BACKEND, option, value)
    assert line.startswith(f"upgradeproxy: {option} {message}"), line


def test_a_bad_access_log_format_or_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    line = refused(capsys, *BACKEND, "--access-log-format", "xml")
    assert line == "upgradeproxy: --access-log-format takes text or json, not 'xml'"
    line = refused(capsys, *BACKEND, "--access-log", str(tmp_path / "missing" / "access.log"))
    assert line.startswith("upgradeproxy: --access-log: the directory of ")


def test_a_bad_ca_bundle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    line = refused(
        capsys, "--backend", "https://app.example", "--backend-ca", str(tmp_path / "ca.pem")
    )
    assert line.startswith("upgradeproxy: --backend-ca: the CA bundle ")


def test_bad_endpoints_and_unknown_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert refused(capsys, *BACKEND, "--listen", "carrier-pigeon:1").startswith(
        "upgradeproxy: --listen: cannot listen on 'carrier-pigeon:1'"
    )
    assert refused(capsys, *BACKEND, "--metrics", "tcp:x").startswith(
        "upgradeproxy: --metrics: cannot listen on 'tcp:x'"
    )
    assert refused(capsys, *BACKEND, "--bogus") == (
        "upgradeproxy: option --bogus not recognized (see --help)"
    )
    assert refused(capsys, "--backend") == (
        "upgradeproxy: option --backend requires argument (see --help)"
    )


def test_a_validator_that_takes_no_argument_refuses_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert refused(capsys, *BACKEND, "--validator", "websocket:strict") == (
        "upgradeproxy: --validator websocket:strict: websocket takes no argument "
        "(write --validator websocket)"
    )


def test_any_validator_declaring_no_argument_refuses_one() -> None:
    # A plugin whose maker would ignore the text after the colon: the
    # registry refuses it on the plugin's word that it takes none.
    quiet = ValidatorPlugin("quiet", "takes nothing", lambda argument: WebSocketValidator())
    with pytest.raises(BadValidator) as raised:
        build_chain(["quiet:loud"], {"quiet": quiet})
    assert str(raised.value) == (
        "--validator quiet:loud: quiet takes no argument (write --validator quiet)"
    )
    assert len(build_chain(["quiet"], {"quiet": quiet})) == 1


def test_check_refuses_a_port_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(capsys, *BACKEND, "--check", "--listen", "tcp:99999")
    assert line == (
        "upgradeproxy: --listen: cannot listen on 'tcp:99999': port 99999 is out of range; "
        "write a port from 1 to 65535 (0: any free port)"
    )
    line = refused(capsys, *BACKEND, "--check", "--metrics", "tcp:70000:interface=127.0.0.1")
    assert "port 70000 is out of range" in line


def test_values_are_read_as_the_file_reads_them() -> None:
    config = parsed(
        *BACKEND,
        "--response-timeout", "2.5", "--tunnel-idle-timeout", "0", "--tunnel-lifetime", "off",
        "--max-connections", "0", "--max-tunnels", "12", "--max-body", "10MiB",
        "--workers", "1", "--head-timeout", "7",
    )  # fmt: skip
    (route,) = config.routes
    assert route.response_timeout == 2.5
    assert route.tunnel_idle_timeout is None and route.tunnel_lifetime is None
    assert route.max_request_body == 10 * 1024**2
    assert config.max_connections is None and config.max_tunnels == 12
    assert config.client_head_timeout == 7.0


def test_without_options_the_defaults_are_the_configurations() -> None:
    config = parsed(*BACKEND)
    assert config == ProxyConfig(routes=config.routes)
    assert config.routes[0] == type(config.routes[0])(
        name="default", hosts=(), path="/", backends=("http://127.0.0.1:9000",)
    )


# -- options beside --config ------------------------------------------------------------

FILE = '[[route]]\nbackends = ["http://127.0.0.1:9000"]\n[access_log]\nformat = "text"\n'


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "proxy.toml"
    path.write_text(FILE)
    return str(path)


def test_proxy_wide_options_apply_over_the_file(config_file: str, tmp_path: Path) -> None:
    access = str(tmp_path / "access.log")
    config = parsed(
        "--config", config_file,
        "--listen", "tcp:8081:interface=127.0.0.1",
        "--metrics", "tcp:9100:interface=127.0.0.1",
        "--access-log", access, "--access-log-format", "json",
        "--head-timeout", "5", "--keep-alive-timeout", "6", "--shutdown-grace", "7",
        "--max-connections", "8", "--max-tunnels", "9",
        "--forward-h2c", "--no-splice",
        "--no-http2", "--http2-cleartext", "--http2-max-streams", "12",
        "--http2-stall-timeout", "4",
    )  # fmt: skip
    assert config.listen == ("tcp:8081:interface=127.0.0.1",)
    assert config.metrics == "tcp:9100:interface=127.0.0.1"
    assert (config.access_log.format, config.access_log.path) == ("json", access)
    assert (config.client_head_timeout, config.keep_alive_timeout) == (5.0, 6.0)
    assert (config.shutdown_grace, config.max_connections, config.max_tunnels) == (7.0, 8, 9)
    assert config.forward_h2c and not config.splice
    assert (config.http2, config.http2_cleartext) == (False, True)
    assert (config.http2_max_concurrent_streams, config.http2_stall_timeout) == (12, 4.0)


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (["--response-timeout", "5"], "[timeouts] response_head"),
        (["--connect-timeout", "5"], "[timeouts] backend_connect"),
        (["--tunnel-idle-timeout", "5"], "[timeouts] tunnel_idle"),
        (["--tunnel-lifetime", "5"], "[timeouts] tunnel_lifetime"),
        (["--max-body", "1MiB"], "[limits] max_request_body"),
        (["--validator", "websocket"], "validators in a [[route]]"),
        (["--backend", "http://x:1"], "backends in a [[route]]"),
        (["--demo"], "backends in a [[route]]"),
        (["--backend-insecure"], "verify = false in a route's [route.tls]"),
    ],
)
def test_route_options_beside_a_file_are_refused_naming_the_key(
    capsys: pytest.CaptureFixture[str], config_file: str, args: list[str], where: str
) -> None:
    line = refused(capsys, "--config", config_file, *args)
    assert line == (
        f"upgradeproxy: --config {config_file} describes the routes; leave out {args[0]} "
        f"(write {where} in the file)"
    )


def test_every_route_option_beside_a_file_is_named(
    capsys: pytest.CaptureFixture[str], config_file: str
) -> None:
    line = refused(capsys, "--config", config_file, "--backend-ca", "ca.pem", "--max-body", "1")
    assert line.endswith(
        "leave out --backend-ca (write ca in a route's [route.tls] in the file), "
        "--max-body (write [limits] max_request_body in the file)"
    )


# -- the backend ---------------------------------------------------------------------------


def test_a_backend_given_on_the_command_line_is_parsed_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    urls: list[str] = []
    split = address._split_url

    def counted(text: str) -> Any:
        urls.append(text)
        return split(text)

    monkeypatch.setattr(address, "_split_url", counted)  # where every backend URL is parsed
    monkeypatch.setattr(tap.Reloader, "install", lambda self: None)  # no SIGHUP handler here
    options = Options()
    options.parseOptions([*BACKEND, "--listen", "tcp:0:interface=127.0.0.1"])
    top = tap.makeService(options)
    try:
        assert urls == ["http://127.0.0.1:9000"]
    finally:
        for child in top:
            if isinstance(child, service.ProxyService):
                child.close_listeners([])
    assert refused(capsys, "--backend", "ftp://x").startswith(
        "upgradeproxy: backend URL 'ftp://x' must start with http:// or https://"
    ), "a mistake is reported once, in one line"


# -- where it listens ----------------------------------------------------------------------


def test_check_of_the_demo_names_its_backend(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parsed("--demo", "--check")
    out = capsys.readouterr().out
    assert "least-conn over the built-in demo backend" in out
    assert "1 route, 1 backend" in out


def test_everything_listens_on_loopback_unless_told_otherwise(config_file: str) -> None:
    assert DEFAULT_LISTEN == "tcp:8080:interface=127.0.0.1"
    assert parsed("--demo").listen == (DEFAULT_LISTEN,)
    assert parsed(*BACKEND).listen == (DEFAULT_LISTEN,)
    assert parsed("--config", config_file).listen == (DEFAULT_LISTEN,)
    assert parsed("--demo", "--listen", "tcp:9000").listen == ("tcp:9000",)


# -- what --check shows ------------------------------------------------------------------


def test_check_shows_validator_arguments_and_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parsed(
            *BACKEND, "--check", "--validator", "rfc9110:lenient-connection",
            "--validator", "allow:websocket", "--tunnel-idle-timeout", "90",
            "--access-log-format", "json",
        )  # fmt: skip
    assert exited.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("  access log (json) to the main log; client head timeout 60 s; ")
    assert out[3] == (
        "    validators rfc9110:lenient-connection, allow:websocket; connect timeout 10 s; "
        "response timeout 60 s; tunnel idle timeout 90 s; tunnel lifetime off; max body none"
    )


# -- the version -----------------------------------------------------------------------------


def test_the_version_is_the_one_in_pyproject(capsys: pytest.CaptureFixture[str]) -> None:
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    assert upgradeproxy.__version__ == version
    with pytest.raises(SystemExit) as exited:
        parsed("--version")
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"upgradeproxy {version}\n"
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"upgradeproxy {version}\n"


def test_importing_the_package_leaves_the_command_line_and_the_version_lookup_out() -> None:
    # A validator plugin imports upgradeproxy; the version is read on first use.
    heavy = ("importlib.metadata", "prometheus_client", "upgradeproxy.cli.tap", "twisted.scripts")
    script = f"import sys, upgradeproxy; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout == "[]\n"


def test_workers_auto_is_one_per_usable_cpu_and_check_shows_how_many(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    with pytest.raises(SystemExit) as exited:
        parsed(*BACKEND, "--listen", "tcp:8080:interface=127.0.0.1", "--workers", "auto", "--check")
    assert exited.value.code == 0
    assert "; 3 workers" in capsys.readouterr().out.splitlines()[0]
    # Given one CPU (taskset -c 1), "auto" serves in this one process, as --workers 1 does.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    assert parsed(*BACKEND, "--workers", "auto").workers == 1
