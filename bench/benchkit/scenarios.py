"""The five scenarios: what each one runs, and the metrics (table rows) it yields.

Each scenario gets a fresh backend and a freshly started target (see
:func:`benchkit.cli.run_one`), runs the load generator pinned to the load
CPU, and returns an :class:`Outcome`: the metric values, the raw numbers
behind them (``details``, kept in the JSON, with the CPU use of every run),
and ``problems`` -- failed handshakes, broken tunnels, wrong bytes -- which
mark the cells in the table.

1. ``throughput``: 1 and 16 tunnels to the backend's ``/duplex``; the client
   writes 64 KiB chunks as fast as it can while the backend does the same the
   other way. MB/s (10^6 bytes) each way, counted where the bytes arrive.
2. ``rtt``: 1 and 100 tunnels to ``/echo``, each with one 64-byte message in
   flight: round trips per second, p50 and p99 latency.
3. ``handshake``: 16 concurrent loops of new connection, upgrade request,
   complete and valid ``101``, close.
4. ``idle``: growth of the proxy's RSS and open descriptors (all its
   processes) for N idle tunnels, per tunnel.
5. ``http``: ``wrk -t1 -c50`` plain GETs with keep-alive, requests per second.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .procs import HOST, Process, StartError, cpu_meter, pinned, run_json
from .targets import Backend, Context, Running

THROUGHPUT_TUNNELS = (1, 16)
RTT_TUNNELS = (1, 100)
HANDSHAKE_CONCURRENCY = 16
WRITE_SIZE = 64 * 1024
MESSAGE_SIZE = 64
WRK_CONNECTIONS = 50
#: Other processes using more than this share of a CPU during a measurement mark it "~".
OTHER_CPU_LIMIT = 0.10
#: So does a hypervisor stealing more than this share of either CPU.
STEAL_LIMIT = 0.10


@dataclass(frozen=True)
class Settings:
    """Durations and sizes; ``--quick`` shortens them."""

    warmup: float = 1.0
    duration: float = 5.0
    idle_tunnels: int = 5000
    wrk_seconds: int = 5
    wrk_warmup_seconds: int = 1

    @classmethod
    def quick(cls) -> Settings:
        return cls(warmup=0.2, duration=1.0, idle_tunnels=1000, wrk_seconds=1, wrk_warmup_seconds=0)


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    #: Whether upgradeproxy's value is divided by the others' in the table.
    compare: bool = True


def cpu_metric(key: str) -> Metric:
    return Metric(key, "  proxy CPU", "% core", higher_is_better=False, compare=False)


@dataclass
class Outcome:
    """What one scenario measured on one target."""

    values: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    #: Failures seen by the load generator; they mark every value with "!".
    problems: list[str] = field(default_factory=list)
    #: Metric keys measured while the load CPU was saturated and the proxy was
    #: not: those values say more about the load side than about the proxy ("*").
    load_bound: dict[str, str] = field(default_factory=dict)
    #: Metric keys measured while other processes on the machine, or the
    #: hypervisor, took a good share of a CPU: those values may be low ("~").
    disturbed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    metrics: list[Metric]
    run: Callable[[Context, Settings, Running, Backend], Outcome]
    #: None if it can run here, else why not.
    unavailable: Callable[[], str | None] = lambda: None


def _loadgen(
    ctx: Context, settings: Settings, running: Running, mode: str, **options: object
) -> dict[str, Any]:
    argv = [str(ctx.programs.loadgen), mode, "--host", HOST, "--port", str(running.port)]
    options.setdefault("warmup", settings.warmup)
    options.setdefault("duration", settings.duration)
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    timeout = settings.warmup + settings.duration + 60
    return run_json(argv, cpu=ctx.load_cpu, timeout=timeout)


def _measured(
    ctx: Context,
    outcome: Outcome,
    name: str,
    keys: list[str],
    running: Running,
    backend: Backend,
    measure: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``measure`` while metering CPU; keep its result in the details under ``name``."""
    with cpu_meter(running.process, backend.process, ctx.load_cpu, ctx.proxy_cpu) as cpu:
        result = measure()
    result.update(cpu)
    outcome.details[name] = result
    load = cpu.get("load_core", cpu.get("load_cpu", 0.0))
    proxy = cpu.get("proxy_core", cpu.get("proxy_cpu", 0.0))
    if running.process is not None and load >= 0.95 and proxy < 0.9:
        for key in keys:
            outcome.load_bound[key] = f"load CPU {load:.0%} busy, proxy CPU {proxy:.0%} busy"
    other = cpu.get("other_cpu", 0.0)
    steal = max(cpu.get("load_core_steal", 0.0), cpu.get("proxy_core_steal", 0.0))
    reasons = []
    if other >= OTHER_CPU_LIMIT:
        reasons.append(f"other processes used {other:.0%} of a CPU")
    if steal >= STEAL_LIMIT:
        reasons.append(f"the hypervisor stole {steal:.0%} of a CPU")
    for key in keys if reasons else []:
        outcome.disturbed[key] = " and ".join(reasons) + " meanwhile"
    return result


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else fraction * 100


def _check(result: dict[str, Any], what: str, outcome: Outcome, expected_open: int = 0) -> None:
    """Turn the load generator's failure counts into problems."""
    if result.get("failures"):
        kinds = ", ".join(f"{n} {kind}" for kind, n in result["errors"].items() if n)
        outcome.problems.append(
            f"{what}: {result['failures']} failures ({kinds}); first: {result['first_error']}"
        )
    if expected_open and result.get("open", expected_open) < expected_open:
        outcome.problems.append(f"{what}: only {result['open']} of {expected_open} tunnels opened")


# -- 1. throughput ---------------------------------------------------------------


def run_throughput(ctx: Context, settings: Settings, running: Running, backend: Backend) -> Outcome:
    outcome = Outcome()
    for n in THROUGHPUT_TUNNELS:
        keys = [f"tp{n}_up", f"tp{n}_down"]
        result = _measured(
            ctx,
            outcome,
            f"{n}_tunnels",
            keys,
            running,
            backend,
            partial(
                _loadgen,
                ctx,
                settings,
                running,
                "throughput",
                conns=n,
                size=WRITE_SIZE,
                stats_port=backend.port,
            ),
        )
        outcome.values[keys[0]] = result.get("up_MBps")
        outcome.values[keys[1]] = result.get("down_MBps")
        outcome.values[f"tp{n}_cpu"] = _percent(result.get("proxy_cpu"))
        _check(result, f"{n} tunnel(s)", outcome, n)
    return outcome


# -- 2. round trips --------------------------------------------------------------


def run_rtt(ctx: Context, settings: Settings, running: Running, backend: Backend) -> Outcome:
    outcome = Outcome()
    for n in RTT_TUNNELS:
        keys = [f"rt{n}_rate", f"rt{n}_p50", f"rt{n}_p99"]
        result = _measured(
            ctx,
            outcome,
            f"{n}_tunnels",
            keys,
            running,
            backend,
            partial(_loadgen, ctx, settings, running, "rtt", conns=n, size=MESSAGE_SIZE),
        )
        got = bool(result["round_trips"])
        outcome.values[keys[0]] = result["per_s"] if got else None
        outcome.values[keys[1]] = result["p50_us"] if got else None
        outcome.values[keys[2]] = result["p99_us"] if got else None
        outcome.values[f"rt{n}_cpu"] = _percent(result.get("proxy_cpu"))
        _check(result, f"{n} tunnel(s)", outcome, n)
    return outcome


# -- 3. handshakes ---------------------------------------------------------------


def run_handshake(ctx: Context, settings: Settings, running: Running, backend: Backend) -> Outcome:
    outcome = Outcome()
    result = _measured(
        ctx,
        outcome,
        "handshake",
        ["hs_rate"],
        running,
        backend,
        # 16 source addresses: closed connections wait in TIME_WAIT, and at tens of
        # thousands of handshakes a second one address would run out of ports.
        partial(
            _loadgen, ctx, settings, running, "handshake", conns=HANDSHAKE_CONCURRENCY, src_ips=16
        ),
    )
    outcome.values["hs_rate"] = result["per_s"] if result["handshakes"] else None
    outcome.values["hs_cpu"] = _percent(result.get("proxy_cpu"))
    _check(result, "handshakes", outcome)
    return outcome


# -- 4. idle tunnel memory -------------------------------------------------------


def idle_tunnel_count(settings: Settings, nofile: int) -> int:
    """As many tunnels as asked, if the file limit allows (a proxy holds two sockets each)."""
    return max(100, min(settings.idle_tunnels, (nofile - 256) // 2))


def _hold_tunnels(ctx: Context, running: Running, count: int, outcome: Outcome) -> Process:
    """Start a load generator that opens ``count`` tunnels and holds them; wait for 'ready'."""
    argv = [
        str(ctx.programs.loadgen),
        "idle",
        "--host",
        HOST,
        "--port",
        str(running.port),
        "--conns",
        str(count),
        "--size",
        str(MESSAGE_SIZE),
    ]
    log = ctx.workdir / f"loadgen-idle-{running.target.name}-{count}.log"
    holder = Process(
        "loadgen idle", argv, log_path=log, cpu=ctx.load_cpu, pipe_stdin=True, pipe_stdout=True
    )
    holder.start()
    ready = _json_line(holder.read_line(timeout=120 + count / 50))
    _check(ready, f"opening {count} tunnels", outcome, count)
    outcome.details[f"ready_{count}"] = ready
    return holder


def _release(holder: Process, outcome: Outcome, count: int) -> None:
    try:
        holder.write(b"\n")
        done = _json_line(holder.read_line(timeout=30))
        outcome.details[f"done_{count}"] = done
        if done.get("alive", 0) < outcome.details[f"ready_{count}"].get("verified", 0):
            outcome.problems.append(
                f"{count} idle tunnels: {done['alive']} still open after the measurement"
            )
    finally:
        holder.stop()


def _json_line(line: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(line)
    return result


def run_idle(ctx: Context, settings: Settings, running: Running, backend: Backend) -> Outcome:
    outcome = Outcome()
    process = running.process
    count = idle_tunnel_count(settings, ctx.nofile)
    outcome.details["tunnels"] = count
    if process is None:
        outcome.details["note"] = "no proxy process to measure"
        outcome.values["idle_kib"] = None
        return outcome
    # Warm up (first connections load code and fill caches), then let go.
    _release(_hold_tunnels(ctx, running, 100, outcome), outcome, 100)
    time.sleep(0.5)
    before, files_before = process.rss_kib(), process.open_files()
    holder = _hold_tunnels(ctx, running, count, outcome)
    try:
        time.sleep(1.0)
        after, files_after = process.rss_kib(), process.open_files()
        opened = outcome.details[f"ready_{count}"].get("open", 0)
    finally:
        _release(holder, outcome, count)
    outcome.details.update(
        rss_before_kib=before,
        rss_after_kib=after,
        open_files_before=files_before,
        open_files_after=files_after,
    )
    outcome.values["idle_kib"] = (after - before) / opened if opened else None
    outcome.values["idle_fds"] = (files_after - files_before) / opened if opened else None
    return outcome


# -- 5. plain HTTP ---------------------------------------------------------------

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _wrk_latency_us(output: str, percentile: str) -> float | None:
    match = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


def parse_wrk(output: str) -> dict[str, Any]:
    """The numbers in ``wrk --latency`` output."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    requests = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    return {
        "per_s": float(rate.group(1)) if rate else None,
        "requests": int(requests.group(1)) if requests else None,
        "p50_us": _wrk_latency_us(output, "50"),
        "p99_us": _wrk_latency_us(output, "99"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": dict(
            zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        )
        if errors
        else {},
    }


def _wrk(ctx: Context, port: int, seconds: int) -> str:
    wrk = shutil.which("wrk")
    assert wrk is not None
    argv = [wrk, "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--latency"]
    argv.append(f"http://{HOST}:{port}/")
    done = subprocess.run(
        pinned(argv, ctx.load_cpu), capture_output=True, text=True, timeout=seconds + 60
    )
    if done.returncode != 0:
        raise StartError(f"wrk failed: {done.stderr.strip()}")
    return done.stdout


def run_http(ctx: Context, settings: Settings, running: Running, backend: Backend) -> Outcome:
    outcome = Outcome()
    if settings.wrk_warmup_seconds:
        _wrk(ctx, running.port, settings.wrk_warmup_seconds)
    output = ""

    def measure() -> dict[str, Any]:
        nonlocal output
        output = _wrk(ctx, running.port, settings.wrk_seconds)
        return parse_wrk(output)

    result = _measured(ctx, outcome, "wrk", ["http_rps"], running, backend, measure)
    outcome.values["http_rps"] = result["per_s"]
    outcome.values["http_cpu"] = _percent(result.get("proxy_cpu"))
    if result["non_2xx"]:
        outcome.problems.append(f"wrk: {result['non_2xx']} responses were not 2xx/3xx")
    if any(result["socket_errors"].values()):
        outcome.problems.append(f"wrk: socket errors {result['socket_errors']}")
    if result["per_s"] is None:
        outcome.problems.append(f"wrk output not understood: {output.strip()[:300]}")
    return outcome


def _no_wrk() -> str | None:
    return None if shutil.which("wrk") else "wrk is not installed (apt-get install wrk)"


# -- the list --------------------------------------------------------------------


def all_scenarios(settings: Settings, nofile: int) -> list[Scenario]:
    idle = idle_tunnel_count(settings, nofile)
    throughput = []
    for n in THROUGHPUT_TUNNELS:
        tunnels = f"{n} tunnel{'s' * (n > 1)}"
        throughput += [
            Metric(f"tp{n}_up", f"throughput, {tunnels}, client→backend", "MB/s"),
            Metric(f"tp{n}_down", f"throughput, {tunnels}, backend→client", "MB/s"),
            cpu_metric(f"tp{n}_cpu"),
        ]
    rtt = []
    for n in RTT_TUNNELS:
        rtt += [
            Metric(f"rt{n}_rate", f"round trips, {n} tunnel{'s' * (n > 1)}", "rt/s"),
            Metric(f"rt{n}_p50", "  latency p50", "µs", higher_is_better=False),
            Metric(f"rt{n}_p99", "  latency p99", "µs", higher_is_better=False),
            cpu_metric(f"rt{n}_cpu"),
        ]
    return [
        Scenario(
            "throughput",
            "tunnel throughput, 64 KiB writes, both directions at once",
            throughput,
            run_throughput,
        ),
        Scenario("rtt", "64-byte round trips, one message in flight per tunnel", rtt, run_rtt),
        Scenario(
            "handshake",
            "upgrade handshakes: connect, request, full 101, close",
            [
                Metric("hs_rate", f"handshakes, {HANDSHAKE_CONCURRENCY} concurrent", "/s"),
                cpu_metric("hs_cpu"),
            ],
            run_handshake,
        ),
        Scenario(
            "idle",
            f"memory per idle tunnel ({idle} tunnels, RSS growth)",
            [
                Metric("idle_kib", f"memory per idle tunnel ({idle})", "KiB", False),
                Metric("idle_fds", "  open files per tunnel", "fds", False),
            ],
            run_idle,
        ),
        Scenario(
            "http",
            f"plain GET with keep-alive, wrk -t1 -c{WRK_CONNECTIONS}",
            [
                Metric("http_rps", f"HTTP GET keep-alive, wrk -c{WRK_CONNECTIONS}", "req/s"),
                cpu_metric("http_cpu"),
            ],
            run_http,
            _no_wrk,
        ),
    ]
