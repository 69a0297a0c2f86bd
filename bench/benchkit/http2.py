"""The HTTP/2 scenarios: every proxy listens with TLS and offers ``h2`` by ALPN.

The backend stays the C backend over cleartext HTTP/1.1. Each scenario also
measures the same load through the proxy's HTTP/1.1 over TLS (ALPN
``http/1.1``: what a client without HTTP/2 gets), so the table shows each
proxy's HTTP/2 figure divided by its own HTTP/1.1 one next to the ``up vs X``
columns.

1. ``h2-http``: plain GETs with ``h2load -c16 -m16`` (16 connections, 16
   streams each), then ``h2load --h1 -c16`` (16 keep-alive connections).
   Requests per second. nginx takes part (its HTTP/2 serves plain requests).
2. ``h2-handshake``: ``h2ws handshake``: 4 TLS connections with 25 streams
   each, each stream looping: extended CONNECT (RFC 8441, ``:protocol
   websocket``) to ``/echo``, ``:status 200``, END_STREAM, the stream ends,
   again. Then ``h2ws handshake --h1``: 16 loops of a new TLS connection, an
   upgrade request, a checked ``101``, close. Handshakes per second.
3. ``h2-rtt``: ``h2ws rtt``: 100 tunnels as 25 streams on each of 4 TLS
   connections, one 64-byte message in flight on each; then the same over
   100 TLS connections (``--h1``, one tunnel each). Round trips per second.

nginx does not bridge RFC 8441, so it is not in the last two. A proxy that
does not advertise ``SETTINGS_ENABLE_CONNECT_PROTOCOL`` (Caddy 2.6) is shown
as not supported there, with the reason ``h2ws`` found: it is asked, not
assumed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import partial
from typing import Any

from .procs import HOST, StartError, pinned, run_json
from .scenarios import (
    TIMES,
    Metric,
    Outcome,
    Scenario,
    Settings,
    _check,
    _measured,
    _percent,
    cpu_metric,
)
from .targets import Backend, Context, Running

SCENARIO_NAMES = ("h2-http", "h2-handshake", "h2-rtt")
#: h2load's load: connections, and streams in flight on each.
H2LOAD_CONNECTIONS, H2LOAD_STREAMS = 16, 16
#: WebSocket over HTTP/2: tunnels as streams on a few connections.
H2WS_CONNECTIONS, H2WS_STREAMS = 4, 25
#: The HTTP/1.1 handshake loops (a new TLS connection each, like ``handshake``'s 16).
H1_HANDSHAKE_LOOPS = 16
MESSAGE_SIZE = 64
EXTENDED_CONNECT_PROXIES = ("upgradeproxy", "haproxy", "caddy")
PROTOCOLS = {"h2": "HTTP/2", "h1": "HTTP/1.1"}


def _ratio_metric(key: str) -> Metric:
    return Metric(key, "  HTTP/2 ÷ HTTP/1.1, same proxy", TIMES, compare=False)


# -- h2load ------------------------------------------------------------------------


def parse_h2load(output: str) -> dict[str, Any]:
    """The numbers in h2load's output: rate, request counts, status classes, protocol."""
    rate = re.search(r"^finished in [\d.]+m?s, ([\d.]+) req/s", output, re.MULTILINE)
    counts = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        output,
        re.MULTILINE,
    )
    statuses = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output, re.M)
    protocol = re.search(r"^Application protocol: (\S+)", output, re.MULTILINE)
    names = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    return {
        "per_s": float(rate.group(1)) if rate else None,
        "requests": dict(zip(names, map(int, counts.groups()), strict=True)) if counts else {},
        "status": dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, statuses.groups()), strict=True))
        if statuses
        else {},
        "protocol": protocol.group(1) if protocol else None,
    }


def _h2load(
    ctx: Context, settings: Settings, running: Running, http1: bool
) -> tuple[dict[str, Any], str]:
    h2load = shutil.which("h2load")
    assert h2load is not None
    argv = [h2load, f"-c{H2LOAD_CONNECTIONS}", "-t1"]
    argv += ["--h1", "-m1"] if http1 else [f"-m{H2LOAD_STREAMS}"]
    # h2load reads a duration with a unit, and whole numbers only.
    argv += [f"-D{round(settings.duration * 1000)}ms"]
    if settings.warmup:
        argv += [f"--warm-up-time={round(settings.warmup * 1000)}ms"]
    argv.append(f"https://{HOST}:{running.port}/")
    try:
        done = subprocess.run(
            pinned(argv, ctx.load_cpu),
            capture_output=True,
            text=True,
            timeout=settings.warmup + settings.duration + 60,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise StartError(f"h2load did not finish: {e}") from None
    if done.returncode != 0 and "finished in" not in done.stdout:
        raise StartError(f"h2load failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return parse_h2load(done.stdout), done.stdout


def _h2load_problems(result: dict[str, Any], output: str, name: str, protocol: str) -> list[str]:
    problems = []
    requests, status = result["requests"], result["status"]
    if result["per_s"] is None or not requests:
        return [f"{name}: h2load output not understood: {output.strip()[:300]}"]
    if result["protocol"] != protocol:
        problems.append(f"{name}: h2load spoke {result['protocol']}, not {protocol}")
    if requests["failed"] or requests["errored"] or requests["timeout"]:
        problems.append(f"{name}: h2load requests {requests}")
    if sum(status.values()) != status.get("2xx"):
        problems.append(f"{name}: status codes {status}")
    return problems


def run_h2_http(ctx: Context, settings: Settings, running: Running, backend: Backend) -> Outcome:
    outcome = Outcome()
    rates: dict[str, float | None] = {}
    for name, http1, protocol in (("h2", False, "h2"), ("h1", True, "http/1.1")):
        output = ""

        def measure(http1: bool = http1) -> dict[str, Any]:
            nonlocal output
            result, output = _h2load(ctx, settings, running, http1)
            return result

        keys = [f"h2http_{name}_rps"]
        result = _measured(ctx, outcome, name, keys, running, backend, measure)
        if protocol == "h2" and result["protocol"] == "http/1.1":
            # (h2load falls back when the server chooses http/1.1 by ALPN)
            outcome.unsupported = "HTTP/2: the server did not choose h2 by ALPN (http/1.1)"
            outcome.load_bound.pop(keys[0], None)
            outcome.disturbed.pop(keys[0], None)
            rates[name] = None
            continue
        outcome.problems += _h2load_problems(result, output, name, protocol)
        rates[name] = result["per_s"]
        outcome.values[f"h2http_{name}_rps"] = result["per_s"]
        outcome.values[f"h2http_{name}_cpu"] = _percent(result.get("proxy_cpu"))
        outcome.values[f"h2http_{name}_eff"] = per_cpu_second(result["per_s"], result)
    outcome.values["h2http_ratio"] = _ratio(rates["h2"], rates["h1"])
    return outcome


def per_cpu_second(rate: float | None, result: dict[str, Any]) -> float | None:
    """``rate`` per second of the proxy's CPU: what one core would do, were it all the proxy's.

    The benchmark's machine may be shared: where other processes take part of
    the proxy's core, its rate drops, but what each operation costs does not.
    """
    cpu = result.get("proxy_cpu")
    return rate / cpu if rate and cpu else None


def _ratio(h2: float | None, h1: float | None) -> float | None:
    return h2 / h1 if h2 and h1 else None


# -- h2ws ----------------------------------------------------------------------------


def _h2ws(
    ctx: Context, settings: Settings, running: Running, mode: str, *options: str
) -> dict[str, Any]:
    assert ctx.programs.h2ws is not None
    argv = [str(ctx.programs.h2ws), mode, "--host", HOST, "--port", str(running.port)]
    # The authority h2load sends too: Caddy answers other names with an empty 200.
    argv += ["--authority", f"{HOST}:{running.port}"]
    argv += ["--warmup", f"{settings.warmup:g}", "--duration", f"{settings.duration:g}"]
    argv += [*options]
    return run_json(argv, cpu=ctx.load_cpu, timeout=settings.warmup + settings.duration + 60)


def _h2ws_pair(
    ctx: Context,
    settings: Settings,
    running: Running,
    backend: Backend,
    mode: str,
    prefix: str,
    h1_options: list[str],
) -> Outcome:
    """``h2ws MODE`` over HTTP/2, then with ``--h1``; values ``PREFIX_h2_rate`` and so on."""
    outcome = Outcome()
    h2_options = ["--conns", str(H2WS_CONNECTIONS), "--streams", str(H2WS_STREAMS)]
    per_s = {}
    for name, options in (("h2", h2_options), ("h1", ["--h1", *h1_options])):
        keys = [f"{prefix}_{name}_rate", f"{prefix}_{name}_p50", f"{prefix}_{name}_p99"]
        measure = partial(
            _h2ws, ctx, settings, running, mode, "--size", str(MESSAGE_SIZE), *options
        )
        result = _measured(ctx, outcome, name, keys, running, backend, measure)
        if result.get("unsupported"):
            outcome.unsupported = f"{PROTOCOLS[name]}: {result['unsupported']}"
            for key in keys:  # nothing was measured: no marks about how it was measured
                outcome.load_bound.pop(key, None)
                outcome.disturbed.pop(key, None)
            continue
        counted = result["handshakes" if mode == "handshake" else "round_trips"]
        per_s[name] = result["per_s"] if counted else None
        outcome.values[keys[0]] = per_s[name]
        outcome.values[keys[1]] = result["p50_us"] if counted else None
        outcome.values[keys[2]] = result["p99_us"] if counted else None
        outcome.values[f"{prefix}_{name}_cpu"] = _percent(result.get("proxy_cpu"))
        outcome.values[f"{prefix}_{name}_eff"] = per_cpu_second(per_s[name], result)
        expected = result["tunnels"] if mode == "rtt" else 0
        _check(result, f"{name} {mode}", outcome, expected)
    outcome.values[f"{prefix}_ratio"] = _ratio(per_s.get("h2"), per_s.get("h1"))
    return outcome


def run_h2_handshake(
    ctx: Context, settings: Settings, running: Running, backend: Backend
) -> Outcome:
    loops = ["--conns", str(H1_HANDSHAKE_LOOPS)]
    return _h2ws_pair(ctx, settings, running, backend, "handshake", "h2hs", loops)


def run_h2_rtt(ctx: Context, settings: Settings, running: Running, backend: Backend) -> Outcome:
    tunnels = ["--conns", str(H2WS_CONNECTIONS * H2WS_STREAMS)]
    return _h2ws_pair(ctx, settings, running, backend, "rtt", "h2rt", tunnels)


# -- availability and the list ---------------------------------------------------------


def _no_h2load() -> str | None:
    if shutil.which("h2load") is None:
        return "h2load is not installed (apt-get install nghttp2-client)"
    return None


def _no_h2ws(ctx: Context) -> str | None:
    if ctx.programs.h2ws is None:
        return ctx.programs.missing.get("h2ws", "h2ws was not built")
    return None


def _cpu_rows(key: str, unit: str) -> list[Metric]:
    """The proxy's CPU, and the rate per second of it (``KEY_cpu``, ``KEY_eff``)."""
    return [cpu_metric(f"{key}_cpu"), Metric(f"{key}_eff", "  per second of proxy CPU", unit)]


def _latency_rows(prefix: str, name: str, unit: str) -> list[Metric]:
    return [
        Metric(f"{prefix}_{name}_p50", "  latency p50", "µs", higher_is_better=False),
        Metric(f"{prefix}_{name}_p99", "  latency p99", "µs", higher_is_better=False),
        *_cpu_rows(f"{prefix}_{name}", unit),
    ]


def http2_scenarios(ctx: Context) -> list[Scenario]:
    """The three HTTP/2 scenarios, over TLS; unavailable without h2load or h2ws."""
    h2ws_missing = _no_h2ws(ctx)
    tunnels = H2WS_CONNECTIONS * H2WS_STREAMS
    shared = f"{H2WS_CONNECTIONS} conns {TIMES} {H2WS_STREAMS} streams"
    return [
        Scenario(
            "h2-http",
            f"plain GET over TLS: h2load -c{H2LOAD_CONNECTIONS} -m{H2LOAD_STREAMS} (HTTP/2), "
            f"then h2load --h1 -c{H2LOAD_CONNECTIONS} (HTTP/1.1)",
            [
                Metric(
                    "h2http_h2_rps",
                    f"HTTP/2 GET, h2load -c{H2LOAD_CONNECTIONS} -m{H2LOAD_STREAMS}, TLS",
                    "req/s",
                ),
                *_cpu_rows("h2http_h2", "req/s"),
                Metric(
                    "h2http_h1_rps",
                    f"HTTP/1.1 GET, h2load --h1 -c{H2LOAD_CONNECTIONS}, TLS",
                    "req/s",
                ),
                *_cpu_rows("h2http_h1", "req/s"),
                _ratio_metric("h2http_ratio"),
            ],
            run_h2_http,
            _no_h2load,
            targets=("upgradeproxy", "nginx", "haproxy", "caddy"),
            tls=True,
        ),
        Scenario(
            "h2-handshake",
            f"WebSocket handshakes over TLS: extended CONNECT on {shared} (HTTP/2), then "
            f"{H1_HANDSHAKE_LOOPS} loops of new TLS connection, upgrade, 101, close (HTTP/1.1)",
            [
                Metric("h2hs_h2_rate", f"WebSocket/HTTP/2 handshakes, {shared}", "/s"),
                *_latency_rows("h2hs", "h2", "/s"),
                Metric(
                    "h2hs_h1_rate",
                    f"WebSocket/HTTP/1.1 handshakes, {H1_HANDSHAKE_LOOPS} TLS conns",
                    "/s",
                ),
                *_latency_rows("h2hs", "h1", "/s"),
                _ratio_metric("h2hs_ratio"),
            ],
            run_h2_handshake,
            lambda: h2ws_missing,
            targets=EXTENDED_CONNECT_PROXIES,
            tls=True,
        ),
        Scenario(
            "h2-rtt",
            f"64-byte round trips over TLS on {tunnels} WebSocket tunnels: {shared} "
            f"(HTTP/2), then {tunnels} TLS connections (HTTP/1.1)",
            [
                Metric("h2rt_h2_rate", f"round trips, {tunnels} tunnels on {shared}", "rt/s"),
                *_latency_rows("h2rt", "h2", "rt/s"),
                Metric("h2rt_h1_rate", f"round trips, {tunnels} tunnels on HTTP/1.1", "rt/s"),
                *_latency_rows("h2rt", "h1", "rt/s"),
                _ratio_metric("h2rt_ratio"),
            ],
            run_h2_rtt,
            lambda: h2ws_missing,
            targets=EXTENDED_CONNECT_PROXIES,
            tls=True,
        ),
    ]
