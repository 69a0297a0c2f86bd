"""Smoke test of the benchmark in ``bench/``: its C programs build and work together.

It compiles the backend and the load generator (skipped without a C
compiler), checks the backend's ``101`` against Python's own SHA-1 and
base64, and runs the load generator against the backend directly for a very
short round-trip run and handshake run. It also checks the helpers the
``http-workers`` scenario relies on: counting each process's connections,
waiting until every process answers, metering CPU with nothing pinned, and
starting upgradeproxy with ``--workers``; and what the all-cores scenarios
and the Python peers rely on: two load generators on separate source
addresses, programs run side by side, each proxy's one-worker and all-cores
configuration, proxy.py's route plugin, and installing the peers (reused when
there, skipped with the reason when pip fails). For the HTTP/2 scenarios it
runs ``h2ws`` (WebSocket over HTTP/2, and over TLS HTTP/1.1) and ``h2load``
through HAProxy configured as they configure it, where HAProxy is installed.
upgradeproxy is not run: this only proves that ``python3 bench/run.py`` still
has working tools.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from benchkit import (  # noqa: E402 (bench/ is not on the path)
    allcores,
    build,
    http2,
    peers,
    procs,
    report,
    scenarios,
    targets,
)

pytestmark = pytest.mark.loopback

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> build.Programs:
    if build.find_compiler() is None:
        pytest.skip("no C compiler (cc or gcc, or $CC): the benchmark's programs cannot be built")
    return build.build(tmp_path_factory.mktemp("bench-build"), force=True)


@pytest.fixture
def backend(programs: build.Programs, tmp_path: Path) -> Iterator[targets.Backend]:
    process = procs.Process(
        "backend",
        [str(programs.backend), "--port", "0"],
        log_path=tmp_path / "backend.log",
        pipe_stdout=True,
    )
    with process:
        line = process.read_line(timeout=10)
        assert line.startswith("listening ")
        yield targets.Backend(int(line.split()[1]), process)
        assert process.exited() is None, process.log_tail()
    assert process.log_text() == ""


@pytest.fixture
def backend_port(backend: targets.Backend) -> int:
    return backend.port


def loadgen(programs: build.Programs, mode: str, port: int, *options: str) -> dict[str, Any]:
    argv = [str(programs.loadgen), mode, "--port", str(port), *options]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_compiles_without_warnings(programs: build.Programs) -> None:
    if os.path.basename(programs.compiler) not in ("cc", "gcc"):
        pytest.skip(f"warnings are only checked with gcc, not {programs.compiler}")
    assert programs.warnings == []


def test_backend_101_is_valid(backend_port: int) -> None:
    key = base64.b64encode(os.urandom(16))
    request = (
        b"GET /echo HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
        b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\nearly bytes"
    )
    with socket.create_connection((procs.HOST, backend_port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while not data.endswith(b"early bytes"):
            chunk = s.recv(4096)
            assert chunk, f"closed after {data!r}"
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert fields[b"upgrade"] == b"websocket"
    assert b"upgrade" in fields[b"connection"].lower()
    assert fields[b"sec-websocket-accept"] == accept
    assert rest == b"early bytes"  # bytes behind the head belong to the tunnel: echoed


def test_round_trips(programs: build.Programs, backend_port: int) -> None:
    result = loadgen(
        programs, "rtt", backend_port, "--conns", "4", "--warmup", "0.1", "--duration", "0.5"
    )
    assert result["failures"] == 0, result["first_error"]
    assert result["open"] == 4
    assert result["round_trips"] > 100
    assert 0 < result["p50_us"] <= result["p99_us"] <= result["max_us"]


def test_handshakes(programs: build.Programs, backend_port: int) -> None:
    result = loadgen(
        programs,
        "handshake",
        backend_port,
        "--conns",
        "4",
        "--src-ips",
        "4",
        "--warmup",
        "0.1",
        "--duration",
        "0.5",
    )
    assert result["failures"] == 0, result["first_error"]
    assert result["handshakes"] > 10
    assert result["per_s"] > 0


def test_connections_per_process_counts_accepted_connections() -> None:
    with socket.create_server((procs.HOST, 0)) as server:
        port = server.getsockname()[1]
        clients = [socket.create_connection((procs.HOST, port), timeout=5) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        try:
            # The clients' ends (remote port = port) and the listener are not counted.
            assert procs.connections_per_process([os.getpid()], port) == {os.getpid(): 3}
        finally:
            for sock in clients + accepted:
                sock.close()


def test_wait_answering_returns_once_every_connection_is_answered(backend_port: int) -> None:
    procs.wait_answering(backend_port, connections=4, timeout=5)


def test_wait_answering_fails_when_nothing_answers() -> None:
    with socket.create_server((procs.HOST, 0)) as silent:  # listens, never accepts
        started = time.monotonic()
        with pytest.raises(procs.StartError, match="did not answer connection 1 of 2"):
            procs.wait_answering(silent.getsockname()[1], connections=2, timeout=0.3)
        assert time.monotonic() - started < 5


def test_cpu_meter_without_pinning_reads_the_whole_machine() -> None:
    with procs.cpu_meter(None, None, None, None) as cpu:
        time.sleep(0.2)
    assert 0 <= cpu["all_cores_steal"] <= cpu["all_cores"] <= 1
    assert "load_core" not in cpu and "proxy_core" not in cpu


def test_http_workers_pins_nothing_and_passes_workers_to_upgradeproxy(
    programs: build.Programs, tmp_path: Path
) -> None:
    ctx = targets.Context(
        programs=programs,
        workdir=tmp_path,
        load_cpu=0,
        proxy_cpu=1,
        nofile=1024,
        twistd="twistd",
        upgradeproxy_args=["--workers", "3"],  # overridden: the scenario decides
    )
    chosen = {s.name: s for s in scenarios.all_scenarios(scenarios.Settings.quick(), 1024)}
    workers = chosen["http-workers"]
    assert workers.runs_on("upgradeproxy") and not workers.runs_on("nginx")
    unpinned = workers.context(ctx)
    assert (unpinned.load_cpu, unpinned.proxy_cpu, unpinned.workers) == (None, None, 1)
    assert chosen["http"].context(ctx) == replace(ctx, keep_alive=True)

    def argv(context: targets.Context) -> list[str]:
        return targets.UpgradeProxy().prepare(context, 8080, 9000, tmp_path).argv

    assert argv(unpinned)[-2:] == ["--workers", "1"]
    assert argv(replace(unpinned, workers=scenarios.SCALED_WORKERS))[-2:] == ["--workers", "2"]
    assert "--workers" not in argv(chosen["http"].context(replace(ctx, upgradeproxy_args=[])))


# -- the HTTP/2 scenarios ------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> targets.TLSFiles:
    try:
        return targets.TLSFiles.create(tmp_path_factory.mktemp("bench-tls"))
    except procs.StartError as e:
        pytest.skip(str(e))


@pytest.fixture
def haproxy_over_tls(
    programs: build.Programs, backend_port: int, tls_files: targets.TLSFiles, tmp_path: Path
) -> Iterator[targets.Running]:
    """HAProxy as the HTTP/2 scenarios configure it (TLS, ALPN h2 and http/1.1)."""
    haproxy = targets.HAProxy()
    ctx = targets.Context(
        programs=programs,
        workdir=tmp_path,
        load_cpu=None,
        proxy_cpu=None,
        nofile=1024,
        twistd=None,
        certificate=tls_files,
    )
    reason = haproxy.unavailable(ctx)
    if reason:
        pytest.skip(reason)
    scenario = {s.name: s for s in http2.http2_scenarios(ctx)}["h2-rtt"]
    with haproxy.run(scenario.context(ctx), backend_port) as running:
        yield running


def h2ws(programs: build.Programs, mode: str, port: int, *options: str) -> dict[str, Any]:
    if programs.h2ws is None:
        pytest.skip(programs.missing["h2ws"])
    argv = [str(programs.h2ws), mode, "--port", str(port), "--warmup", "0.1", "--duration", "0.4"]
    done = subprocess.run([*argv, *options], capture_output=True, text=True, timeout=20, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_http2_scenarios_listen_with_tls(programs: build.Programs, tmp_path: Path) -> None:
    certificate = targets.TLSFiles(tmp_path / "c", tmp_path / "k", tmp_path / "ck")
    ctx = targets.Context(programs, tmp_path, 0, 1, 1024, "twistd", certificate=certificate)
    chosen = {s.name: s for s in http2.http2_scenarios(ctx)}
    assert set(chosen) == set(http2.SCENARIO_NAMES)
    assert not chosen["h2-rtt"].runs_on("nginx") and chosen["h2-http"].runs_on("nginx")
    assert chosen["h2-rtt"].context(ctx).tls == certificate
    argv = targets.UpgradeProxy().prepare(chosen["h2-http"].context(ctx), 8080, 9000, tmp_path).argv
    assert argv[argv.index("--listen") + 1].startswith("ssl:8080:interface=127.0.0.1:")


def test_h2ws_bridges_websockets_over_http2_through_haproxy(
    programs: build.Programs, haproxy_over_tls: targets.Running
) -> None:
    config = next(Path(haproxy_over_tls.log_files[0]).parent.glob("haproxy.cfg")).read_text()
    assert "alpn h2,http/1.1" in config  # without it HAProxy's TLS speaks HTTP/1.1 only
    port = haproxy_over_tls.port
    for mode, options in (("handshake", ["--conns", "2", "--streams", "4"]),
                          ("rtt", ["--conns", "2", "--streams", "5"]),
                          ("handshake", ["--h1", "--conns", "2"]),
                          ("rtt", ["--h1", "--conns", "4"])):  # fmt: skip
        result = h2ws(programs, mode, port, *options)
        assert result["failures"] == 0, (mode, options, result["first_error"])
        assert result["unsupported"] is None
        assert result["per_s"] > 0
        if mode == "rtt":
            assert result["open"] == result["tunnels"]


def test_h2ws_says_when_a_server_has_no_http2(
    programs: build.Programs, backend_port: int, tls_files: targets.TLSFiles
) -> None:
    """A TLS server that answers ALPN with http/1.1: the run says it is not supported."""
    import ssl
    import threading

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_server((procs.HOST, 0)) as server:

        def serve_one() -> None:
            connection, _ = server.accept()
            with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True):
                pass

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        result = h2ws(programs, "rtt", server.getsockname()[1], "--conns", "1", "--streams", "1")
        thread.join(5)
    assert result["unsupported"] == "the server did not choose h2 by ALPN (http/1.1)"


def test_h2load_output_is_read(haproxy_over_tls: targets.Running) -> None:
    h2load = shutil.which("h2load")
    if h2load is None:
        pytest.skip("h2load is not installed (apt-get install nghttp2-client)")
    url = f"https://{procs.HOST}:{haproxy_over_tls.port}/"
    done = subprocess.run(
        [h2load, "-n", "200", "-c", "2", "-m", "8", url], capture_output=True, text=True, timeout=20
    )
    result = http2.parse_h2load(done.stdout)
    assert result["protocol"] == "h2", done.stdout
    assert result["requests"]["succeeded"] == 200 and result["per_s"] > 0
    assert result["status"]["2xx"] == 200
    assert http2._h2load_problems(result, done.stdout, "h2", "h2") == []


def test_report_shows_what_a_proxy_does_not_support(tmp_path: Path) -> None:
    metric = scenarios.Metric("h2rt_h2_rate", "round trips over HTTP/2", "rt/s")
    scenario = scenarios.Scenario("h2-rtt", "title", [metric], http2.run_h2_rtt)
    results = report.Results(
        "cmd", report.machine_info(), {}, [scenario], ["upgradeproxy", "caddy"]
    )
    results.outcomes["h2-rtt"] = {
        "upgradeproxy": scenarios.Outcome(values={"h2rt_h2_rate": 1000.0}),
        "caddy": scenarios.Outcome(values={"h2rt_h2_rate": None}, unsupported="HTTP/2: no"),
    }
    (row,) = report._rows(results)[1]
    assert row == ["round trips over HTTP/2", "rt/s", "1,000", "n/s", "—"]
    assert report.unsupported_lines(results) == ["h2-rtt / caddy: HTTP/2: no"]


def test_a_rate_per_second_of_proxy_cpu_is_what_a_whole_core_would_reach() -> None:
    assert http2.per_cpu_second(1000.0, {"proxy_cpu": 0.4}) == 2500.0
    assert http2.per_cpu_second(None, {"proxy_cpu": 0.4}) is None
    assert http2.per_cpu_second(1000.0, {}) is None  # no proxy process: nothing to divide by


def test_the_http2_scenarios_measure_through_haproxy(
    programs: build.Programs,
    backend: targets.Backend,
    haproxy_over_tls: targets.Running,
    tls_files: targets.TLSFiles,
    tmp_path: Path,
) -> None:
    """h2-http and h2-rtt as ``--quick`` runs them, shorter: every value there, no problem."""
    if shutil.which("h2load") is None or programs.h2ws is None:
        pytest.skip("h2load or h2ws is missing (nghttp2-client, libnghttp2-dev)")
    ctx = targets.Context(programs, tmp_path, None, None, 1024, None, certificate=tls_files)
    settings = scenarios.Settings(warmup=0.1, duration=0.3)
    for run in (http2.run_h2_http, http2.run_h2_rtt):
        outcome = run(ctx, settings, haproxy_over_tls, backend)
        assert (outcome.problems, outcome.unsupported) == ([], None)
        assert outcome.values and all(value for value in outcome.values.values()), outcome.values


def test_two_load_generators_use_separate_source_addresses(programs: build.Programs) -> None:
    with socket.create_server((procs.HOST, 0)) as server:
        server.settimeout(5)
        argv = [str(programs.loadgen), "handshake", "--port", str(server.getsockname()[1])]
        argv += ["--conns", "1", "--src-ips", "1", "--src-ip-first", "17"]
        argv += ["--warmup", "0", "--duration", "0.2", "--timeout", "1"]
        with subprocess.Popen(argv, stdout=subprocess.DEVNULL) as loadgen:
            accepted, (address, _) = server.accept()
            accepted.close()
            assert loadgen.wait(timeout=10) == 0
    assert address == "127.0.0.17"


def test_run_json_all_returns_each_programs_object_in_order() -> None:
    argvs = [[sys.executable, "-c", f"print('noise'); print('{{\"n\": {n}}}')"] for n in (1, 2)]
    assert procs.run_json_all(argvs, cpu=None, timeout=20) == [{"n": 1}, {"n": 2}]
    with pytest.raises(RuntimeError, match="failed \\(status 3\\)"):
        procs.run_json_all([argvs[0], [sys.executable, "-c", "exit(3)"]], cpu=None, timeout=20)


@pytest.fixture
def ctx(programs: build.Programs, tmp_path: Path) -> targets.Context:
    return targets.Context(
        programs=programs,
        workdir=tmp_path,
        load_cpu=0,
        proxy_cpu=1,
        nofile=4096,
        twistd="twistd",
        peers=tmp_path / "peers",
    )


def test_all_cores_scenarios_pin_nothing_and_start_with_one_worker(ctx: targets.Context) -> None:
    chosen = {s.name: s for s in allcores.all_cores_scenarios()}
    assert set(chosen) == {"http-all-cores", "handshake-all-cores"}
    for scenario in chosen.values():
        one = scenario.context(ctx)
        assert (one.load_cpu, one.proxy_cpu, one.workers, one.all_cores) == (None, None, 1, False)
        assert scenario.runs_on("nginx") and scenario.runs_on("proxy.py")
    assert chosen["http-all-cores"].context(ctx).keep_alive
    assert not chosen["handshake-all-cores"].context(ctx).keep_alive


def _launch(target: targets.Target, context: targets.Context, rundir: Path) -> targets.Launch:
    rundir.mkdir(exist_ok=True)
    return target.prepare(context, 8080, 9000, rundir)


def test_each_proxy_has_a_one_worker_and_an_all_cores_configuration(
    ctx: targets.Context, tmp_path: Path
) -> None:
    every = replace(ctx, all_cores=True, workers=None)
    one = replace(ctx, workers=1)
    by_name = {target.name: target for target in peers.ALL}

    def nginx(context: targets.Context) -> str:
        _launch(by_name["nginx"], context, tmp_path / "nginx")
        return (tmp_path / "nginx" / "nginx.conf").read_text()

    assert "worker_processes 1;" in nginx(one)
    assert "worker_processes auto;" in nginx(every)

    def haproxy(context: targets.Context) -> str:
        _launch(by_name["haproxy"], context, tmp_path / "haproxy")
        return (tmp_path / "haproxy" / "haproxy.cfg").read_text()

    assert "nbthread 1" in haproxy(one)
    assert "nbthread" not in haproxy(every)

    def gomaxprocs(context: targets.Context) -> str | None:
        env = _launch(by_name["caddy"], context, tmp_path / "caddy").env
        assert env is not None
        return env.get("GOMAXPROCS")

    assert gomaxprocs(one) == "1"
    assert gomaxprocs(every) is None

    def upgradeproxy(context: targets.Context) -> list[str]:
        return _launch(by_name["upgradeproxy"], context, tmp_path / "up").argv

    assert upgradeproxy(one)[-2:] == ["--workers", "1"]
    assert upgradeproxy(every)[-2:] == ["--workers", "auto"]

    def proxy_py(context: targets.Context) -> list[str]:
        return _launch(by_name["proxy.py"], context, tmp_path / "proxy.py").argv

    assert proxy_py(one)[-4:] == ["--num-acceptors", "1", "--num-workers", "1"]
    assert proxy_py(one)[-6:-4] == ["--timeout", "3600"]  # idle tunnels stay open
    assert "--num-acceptors" not in proxy_py(every)
    mitmproxy = _launch(by_name["mitmproxy"], every, tmp_path / "mitmproxy").argv
    assert mitmproxy[1:3] == ["--mode", "reverse:http://127.0.0.1:9000"]


def test_proxy_py_routes_every_path_to_the_backend_and_runs_threaded_for_keep_alive(
    ctx: targets.Context, tmp_path: Path
) -> None:
    launch = _launch(peers.ProxyPy(), ctx, tmp_path)
    assert "--threaded" not in launch.argv  # its default, threadless, for tunnels
    assert "--threaded" in _launch(peers.ProxyPy(), replace(ctx, keep_alive=True), tmp_path).argv
    plugin = (tmp_path / "benchroute.py").read_text()
    assert 'UPSTREAM = b"http://127.0.0.1:9000"' in plugin
    assert "UPSTREAM + request.path" in plugin
    assert launch.env is not None and launch.env["PYTHONPATH"] == str(tmp_path)
    assert launch.argv[launch.argv.index("--plugins") + 1] == "benchroute.BackendRoute"


def _fake_venv(venv: Path, version: str | None, pip_exit: int) -> Path:
    """A virtualenv whose python reports ``version`` installed (None: not) and whose pip fails."""
    (venv / "bin").mkdir(parents=True)
    log = venv / "calls"
    found = f"echo {version}; exit 0" if version else "exit 1"
    (venv / "bin" / "python").write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'if [ "$1" = "-c" ]; then {found}; fi\n'
        'echo "ERROR: Could not find a version that satisfies the requirement" >&2\n'
        f"exit {pip_exit}\n"
    )
    (venv / "bin" / "python").chmod(0o755)
    return log


def test_python_peers_are_reused_when_installed_at_their_version(tmp_path: Path) -> None:
    requirement = peers.Mitmproxy.requirement
    log = _fake_venv(tmp_path / "peers", requirement.version, pip_exit=1)
    assert peers.ensure(tmp_path / "peers", requirement) is None
    assert "pip" not in log.read_text()


def test_python_peers_that_cannot_be_installed_are_skipped_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requirement = peers.ProxyPy.requirement
    log = _fake_venv(tmp_path / "peers", None, pip_exit=1)
    reason = peers.ensure(tmp_path / "peers", requirement)
    assert reason == (
        "cannot install proxy.py==2.4.10 from PyPI (no network?): "
        "ERROR: Could not find a version that satisfies the requirement"
    )
    assert "-m pip install" in log.read_text() and "proxy.py==2.4.10" in log.read_text()
    assert "installing proxy.py==2.4.10" in capsys.readouterr().err
