"""The six scenarios: what each one runs, and the metrics (table rows) it yields.

Each scenario gets a fresh backend and a freshly started target (see
:func:`benchkit.cli.run_one`), runs the load generator pinned to the load
CPU (all but ``http-workers``, which pins nothing), and returns an
:class:`Outcome`: the metric values, the raw numbers behind them
(``details``, kept in the JSON, with the CPU use of every run), and
``problems`` -- failed handshakes, broken tunnels, wrong bytes -- which
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
6. ``http-workers``: the same through upgradeproxy with ``--workers 1`` and
   then ``--workers 2``, nothing pinned, so that two workers can use both
   CPUs (which wrk and the backend share with them); the ratio of the two
   rates against the target of 1.7.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from .procs import (
    HOST,
    Process,
    StartError,
    connections_per_process,
    cpu_each,
    cpu_meter,
    pinned,
    run_json,
    wait_answering,
)
from .targets import Backend, Context, Running

THROUGHPUT_TUNNELS = (1, 16)
RTT_TUNNELS = (1, 100)
HANDSHAKE_CONCURRENCY = 16
WRITE_SIZE = 64 * 1024
MESSAGE_SIZE = 64
TIMES = "\N{MULTIPLICATION SIGN}"
#: The worker count ``http-workers`` compares with one process, and the ratio it should reach.
SCALED_WORKERS = 2
WORKERS_TARGET = 1.7
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


def cpu_metric(key: str, label: str = "  proxy CPU") -> Metric:
    return Metric(key, label, "% core", higher_is_better=False, compare=False)


@dataclass(frozen=True)
class WrkLoad:
    """How ``wrk`` loads a target: its threads and its keep-alive connections."""

    threads: int
    connections: int

    def __str__(self) -> str:
        return f"wrk -t{self.threads} -c{self.connections}"


#: The ``http`` scenario's load: one wrk thread is far from its limit at these rates.
HTTP_LOAD = WrkLoad(threads=1, connections=50)
#: The ``http-workers`` load: more connections, so that SO_REUSEPORT's hashing
#: of them gives both workers close to half; one thread leaves more CPU to the
#: proxy than two.
WORKERS_LOAD = WrkLoad(threads=1, connections=100)


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
    #: Warnings and errors logged under load by proxies that the scenario
    #: started itself (those of the target it was given are read by the driver).
    findings: list[str] = field(default_factory=list)
    #: Why the target cannot take this load at all (its cells say "n/s").
    unsupported: str | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    metrics: list[Metric]
    run: Callable[[Context, Settings, Running, Backend], Outcome]
    #: None if it can run here, else why not.
    unavailable: Callable[[], str | None] = lambda: None
    #: The targets it runs against, by name; None for all of them.
    targets: tuple[str, ...] | None = None
    #: False: nothing is pinned -- the proxy, the load generator and the
    #: backend share every CPU.
    pinned: bool = True
    #: ``--workers`` for the upgradeproxy it is given; None leaves the default.
    workers: int | None = None
    #: Its load is plain requests on kept-alive connections.
    keep_alive: bool = False
    #: True: the targets listen with TLS (the run's certificate) and offer HTTP/2.
    tls: bool = False

    def runs_on(self, target: str) -> bool:
        return self.targets is None or target in self.targets

    def context(self, ctx: Context) -> Context:
        """``ctx`` as this scenario's runs see it: without CPUs if it pins nothing, its
        workers, TLS if it needs it."""
        if not self.pinned:
            ctx = replace(ctx, load_cpu=None, proxy_cpu=None)
        tls = ctx.certificate if self.tls else None
        return replace(ctx, workers=self.workers, keep_alive=self.keep_alive, tls=tls)


def loadgen_argv(
    ctx: Context, settings: Settings, running: Running, mode: str, **options: object
) -> list[str]:
    """The load generator's command line: ``src_ips=16`` becomes ``--src-ips 16``."""
    argv = [str(ctx.programs.loadgen), mode, "--host", HOST, "--port", str(running.port)]
    options.setdefault("warmup", settings.warmup)
    options.setdefault("duration", settings.duration)
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def loadgen_timeout(settings: Settings) -> float:
    return settings.warmup + settings.duration + 60


def _loadgen(
    ctx: Context, settings: Settings, running: Running, mode: str, **options: object
) -> dict[str, Any]:
    argv = loadgen_argv(ctx, settings, running, mode, **options)
    return run_json(argv, cpu=ctx.load_cpu, timeout=loadgen_timeout(settings))


def _measured(
    ctx: Context,
    outcome: Outcome,
    name: str,
    keys: list[str],
    running: Running,
    backend: Backend,
    measure: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``measure`` while metering CPU; keep its result in the details under ``name``.

    The CPU readings join the result, with ``proxy_cpu_each``: each proxy
    process's share of a core, by PID.
    """
    with (
        cpu_meter(running.process, backend.process, ctx.load_cpu, ctx.proxy_cpu) as cpu,
        cpu_each(running.process) as each,
    ):
        result = measure()
    result.update(cpu, proxy_cpu_each=each)
    outcome.details[name] = result
    load = cpu.get("load_core", cpu.get("load_cpu", 0.0))
    proxy = cpu.get("proxy_core", cpu.get("proxy_cpu", 0.0))
    # Only pinned runs have a load CPU of their own to saturate.
    pinned_run = "load_core" in cpu
    if pinned_run and running.process is not None and load >= 0.95 and proxy < 0.9:
        for key in keys:
            outcome.load_bound[key] = f"load CPU {load:.0%} busy, proxy CPU {proxy:.0%} busy"
    other = cpu.get("other_cpu", 0.0)
    steal = max(value for key, value in [("", 0.0), *cpu.items()] if key.endswith("_steal"))
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


def _wrk(
    ctx: Context,
    port: int,
    seconds: int,
    load: WrkLoad,
    while_running: Callable[[], None] | None = None,
) -> str:
    """wrk's output for ``seconds`` of ``load``; ``while_running`` is called halfway through."""
    wrk = shutil.which("wrk")
    assert wrk is not None
    argv = [wrk, f"-t{load.threads}", f"-c{load.connections}", f"-d{seconds}s", "--latency"]
    argv.append(f"http://{HOST}:{port}/")
    with subprocess.Popen(
        pinned(argv, ctx.load_cpu), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            if while_running is not None:
                time.sleep(seconds / 2)
                while_running()
            output, errors = process.communicate(timeout=seconds + 60)
        except BaseException:
            process.kill()
            raise
    if process.returncode != 0:
        raise StartError(f"wrk failed: {errors.strip()}")
    return output


def _wrk_measured(
    ctx: Context,
    settings: Settings,
    outcome: Outcome,
    name: str,
    keys: list[str],
    running: Running,
    backend: Backend,
    load: WrkLoad,
    while_running: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """A wrk warm-up, then a wrk run measured as ``name`` (see :func:`_measured`).

    Responses other than 2xx/3xx, socket errors and output that cannot be
    read become problems.
    """
    if settings.wrk_warmup_seconds:
        _wrk(ctx, running.port, settings.wrk_warmup_seconds, load)
    output = ""

    def measure() -> dict[str, Any]:
        nonlocal output
        output = _wrk(ctx, running.port, settings.wrk_seconds, load, while_running)
        return parse_wrk(output)

    result = _measured(ctx, outcome, name, keys, running, backend, measure)
    if result["non_2xx"]:
        outcome.problems.append(f"{name}: {result['non_2xx']} responses were not 2xx/3xx")
    if any(result["socket_errors"].values()):
        outcome.problems.append(f"{name}: socket errors {result['socket_errors']}")
    if result["per_s"] is None:
        outcome.problems.append(f"{name}: wrk output not understood: {output.strip()[:300]}")
    return result


def run_http(ctx: Context, settings: Settings, running: Running, backend: Backend) -> Outcome:
    outcome = Outcome()
    result = _wrk_measured(ctx, settings, outcome, "wrk", ["http_rps"], running, backend, HTTP_LOAD)
    outcome.values["http_rps"] = result["per_s"]
    outcome.values["http_cpu"] = _percent(result.get("proxy_cpu"))
    return outcome


def no_wrk() -> str | None:
    """None if wrk is installed, else why the HTTP scenarios cannot run."""
    return None if shutil.which("wrk") else "wrk is not installed (apt-get install wrk)"


# -- 6. plain HTTP with worker processes -------------------------------------------


def _share_metric(key: str, label: str) -> Metric:
    return Metric(key, label, "%", higher_is_better=False, compare=False)


def _workers_metrics() -> list[Metric]:
    rows = []
    for n in (1, SCALED_WORKERS):
        label = f"HTTP GET keep-alive, --workers {n}, unpinned"
        rows += [
            Metric(f"hw{n}_rps", label, "req/s", compare=False),  # no other target runs it
            cpu_metric(f"hw{n}_cpu", "  proxy CPU, all its processes"),
        ]
        if n > 1:
            rows += [
                cpu_metric(f"hw{n}_parent_cpu", "  of which the parent"),
                _share_metric(f"hw{n}_busiest", "  busiest worker's share of connections"),
            ]
        rows.append(_share_metric(f"hw{n}_machine", "  all CPUs busy, whoever kept them busy"))
    ratio = f"  --workers {SCALED_WORKERS} ÷ --workers 1 (target {WORKERS_TARGET}{TIMES})"
    return [*rows, Metric("hw_ratio", ratio, TIMES, compare=False)]


WORKERS_KEYS = [metric.key for metric in _workers_metrics()]


def run_http_workers(
    ctx: Context, settings: Settings, running: Running, backend: Backend
) -> Outcome:
    """Plain GETs through ``running`` (``--workers 1``), then through a fresh ``--workers 2``.

    Both run in front of the same backend, one after the other, with nothing
    pinned (see :meth:`Scenario.context`); the first stays up, idle, until the
    driver stops it after this returns.
    """
    outcome = Outcome()
    single = _http_through_workers(ctx, settings, running, backend, outcome, 1)
    scaled_ctx = replace(ctx, workers=SCALED_WORKERS)
    with running.target.run(scaled_ctx, backend.port) as scaled:
        several = _http_through_workers(ctx, settings, scaled, backend, outcome, SCALED_WORKERS)
    outcome.findings += scaled.findings()
    outcome.values["hw_ratio"] = several / single if several and single else None
    for flags in (outcome.load_bound, outcome.disturbed):
        reasons = [
            f"--workers {n}: {flags[key]}"
            for n in (1, SCALED_WORKERS)
            if (key := f"hw{n}_rps") in flags
        ]
        if reasons:
            flags["hw_ratio"] = "; ".join(reasons)
    return outcome


def _http_through_workers(
    ctx: Context,
    settings: Settings,
    running: Running,
    backend: Backend,
    outcome: Outcome,
    workers: int,
) -> float | None:
    """Measure plain GETs through upgradeproxy started with ``--workers``; return its req/s.

    Before the load, every worker must answer and the process group must hold
    them all (the parent and its workers, or the one process), so that their
    CPU is counted. Halfway through, it counts each serving process's
    connections: SO_REUSEPORT hashes each new connection to one worker.
    """
    process = running.process
    assert process is not None
    name = f"workers_{workers}"
    wait_answering(running.port)
    pids = process.members()
    expected = 1 + workers if workers > 1 else 1
    if len(pids) != expected:
        outcome.problems.append(f"{name}: {len(pids)} proxy processes, expected {expected}")
    serving = [pid for pid in pids if pid != process.pid] or [process.pid]
    connections: dict[int, int] = {}

    def count_connections() -> None:
        connections.update(connections_per_process(serving, running.port))

    keys = [key for key in WORKERS_KEYS if key.startswith(f"hw{workers}_")]
    result = _wrk_measured(
        ctx, settings, outcome, name, keys, running, backend, WORKERS_LOAD, count_connections
    )
    result["connections_each"] = connections
    outcome.values[f"hw{workers}_rps"] = result["per_s"]
    outcome.values[f"hw{workers}_cpu"] = _percent(result.get("proxy_cpu"))
    # Near 100 % the machine, not the proxy, set the limit; a single process
    # that already keeps it X % busy leaves room for at most 1/X times its rate.
    outcome.values[f"hw{workers}_machine"] = _percent(result.get("all_cores"))
    if workers > 1:
        parent: float | None = result["proxy_cpu_each"].get(process.pid)
        outcome.values[f"hw{workers}_parent_cpu"] = _percent(parent)
        total = sum(connections.values())
        busiest = 100 * max(connections.values()) / total if total else None
        outcome.values[f"hw{workers}_busiest"] = busiest
    per_s: float | None = result["per_s"]
    return per_s


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
            f"plain GET with keep-alive, {HTTP_LOAD}",
            [
                Metric("http_rps", f"HTTP GET keep-alive, wrk -c{HTTP_LOAD.connections}", "req/s"),
                cpu_metric("http_cpu"),
            ],
            run_http,
            no_wrk,
            keep_alive=True,
        ),
        Scenario(
            "http-workers",
            f"plain GET with keep-alive, {WORKERS_LOAD}, through upgradeproxy --workers 1, "
            f"then --workers {SCALED_WORKERS}; nothing pinned: wrk and the backend share "
            "the CPUs with the proxy",
            _workers_metrics(),
            run_http_workers,
            no_wrk,
            targets=("upgradeproxy",),
            pinned=False,
            workers=1,
            keep_alive=True,
        ),
    ]
