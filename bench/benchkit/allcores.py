"""The all-cores scenarios: each proxy as it runs on every core, and what that buys it.

``http-all-cores`` (plain GETs with keep-alive) and ``handshake-all-cores``
(upgrade handshakes) pin nothing. For each proxy they measure twice, under the
same load, in front of the same backend: first its one-worker configuration
(the one of the pinned rows; upgradeproxy ``--workers 1``), then a fresh
start of its all-cores configuration (nginx ``worker_processes auto``,
HAProxy's default threads, Caddy without ``GOMAXPROCS``, upgradeproxy
``--workers auto``, proxy.py's default acceptors and workers, mitmproxy as
it is: see :mod:`benchkit.targets` and :mod:`benchkit.peers`). The direct
connection is measured once; the raw-relay floor (``portforward``), one
process either way, is left out.

On a machine with two cores the load generator cannot have one of its own
any more. So that neither side is held to one core, the load runs on both
too: ``wrk`` with two threads, and two handshake load generators side by
side (separate source addresses), their rates added. Everything --
proxy, load, backend, the kernel's loopback work -- then shares every CPU,
and "all CPUs busy" says how much of the machine was used: near 100 % the
machine, not the proxy, set the limit.

Reported per proxy: the all-cores rate (compared across proxies), its CPU
summed over all its processes (up to 100 % per core), the one-worker rate
under the same load, and all cores ÷ one worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .procs import run_json_all, wait_answering
from .scenarios import (
    HANDSHAKE_CONCURRENCY,
    TIMES,
    Metric,
    Outcome,
    Scenario,
    Settings,
    WrkLoad,
    _check,
    _measured,
    _percent,
    _wrk_measured,
    cpu_metric,
    loadgen_argv,
    loadgen_timeout,
    no_wrk,
)
from .targets import Backend, Context, Running

#: wrk's load: a thread per core of a two-core machine.
HTTP_LOAD = WrkLoad(threads=2, connections=100)
#: Handshake load generators side by side, each with the pinned row's concurrency.
LOADGENS = 2
#: Source addresses per load generator (127.0.0.1-16, 127.0.0.17-32).
SOURCE_ADDRESSES = 16

Measure = Callable[[Context, Settings, Running, Backend, Outcome, str, list[str]], dict[str, Any]]


def _http(
    ctx: Context,
    settings: Settings,
    running: Running,
    backend: Backend,
    outcome: Outcome,
    name: str,
    keys: list[str],
) -> dict[str, Any]:
    return _wrk_measured(ctx, settings, outcome, name, keys, running, backend, HTTP_LOAD)


def _handshakes(
    ctx: Context,
    settings: Settings,
    running: Running,
    backend: Backend,
    outcome: Outcome,
    name: str,
    keys: list[str],
) -> dict[str, Any]:
    argvs = [
        loadgen_argv(
            ctx,
            settings,
            running,
            "handshake",
            conns=HANDSHAKE_CONCURRENCY,
            src_ips=SOURCE_ADDRESSES,
            src_ip_first=1 + n * SOURCE_ADDRESSES,
        )
        for n in range(LOADGENS)
    ]

    def measure() -> dict[str, Any]:
        each = run_json_all(argvs, cpu=None, timeout=loadgen_timeout(settings))
        return {
            "per_s": sum(r["per_s"] for r in each),
            "handshakes": sum(r["handshakes"] for r in each),
            "loadgens": each,
        }

    result = _measured(ctx, outcome, name, keys, running, backend, measure)
    for n, each in enumerate(result["loadgens"], start=1):
        _check(each, f"{name}, load generator {n}", outcome)
    if not result["handshakes"]:
        result["per_s"] = None
    return result


@dataclass(frozen=True)
class _Load:
    """One of the two scenarios: its name, its table rows' key prefix and label, its load."""

    name: str
    key: str
    label: str
    unit: str
    measure: Measure

    def metrics(self) -> list[Metric]:
        k = self.key
        return [
            Metric(f"{k}_rate", self.label, self.unit),
            cpu_metric(f"{k}_cpu", "  proxy CPU, all its processes"),
            Metric(f"{k}_machine", "  all CPUs busy, whoever kept them busy", "%", False, False),
            Metric(f"{k}_one_rate", "  one worker, same load", self.unit),
            cpu_metric(f"{k}_one_cpu", "  proxy CPU, one worker"),
            Metric(f"{k}_scale", "  all cores ÷ one worker", TIMES, compare=False),
        ]

    def run(self, ctx: Context, settings: Settings, running: Running, backend: Backend) -> Outcome:
        """``running`` is the one-worker configuration; a fresh all-cores one follows it."""
        outcome = Outcome()
        k = self.key
        if running.process is None:  # direct: nothing to configure, measured once
            self._into(outcome, k, self._measure(ctx, settings, running, backend, outcome, ""))
            return outcome
        one = self._measure(ctx, settings, running, backend, outcome, "_one")
        every_ctx = replace(ctx, all_cores=True, workers=None)
        with running.target.run(every_ctx, backend.port) as every:
            result = self._measure(every_ctx, settings, every, backend, outcome, "")
        outcome.findings += every.findings()
        self._into(outcome, k, result)
        self._into(outcome, f"{k}_one", one)
        rate, one_rate = outcome.values[f"{k}_rate"], outcome.values[f"{k}_one_rate"]
        outcome.values[f"{k}_scale"] = rate / one_rate if rate and one_rate else None
        for flags in (outcome.load_bound, outcome.disturbed):
            reasons = [
                f"{what}: {flags[key]}"
                for what, key in (("all cores", f"{k}_rate"), ("one worker", f"{k}_one_rate"))
                if key in flags
            ]
            if reasons:
                flags[f"{k}_scale"] = "; ".join(reasons)
        return outcome

    def _measure(
        self,
        ctx: Context,
        settings: Settings,
        running: Running,
        backend: Backend,
        outcome: Outcome,
        suffix: str,
    ) -> dict[str, Any]:
        # Every process (or thread) of a proxy with several must serve before the load starts.
        wait_answering(running.port)
        keys = [f"{self.key}{suffix}_rate", f"{self.key}{suffix}_cpu"]
        if not suffix:
            keys.append(f"{self.key}_machine")
        name = "one_worker" if suffix else "all_cores"
        return self.measure(ctx, settings, running, backend, outcome, name, keys)

    @staticmethod
    def _into(outcome: Outcome, prefix: str, result: dict[str, Any]) -> None:
        outcome.values[f"{prefix}_rate"] = result["per_s"]
        outcome.values[f"{prefix}_cpu"] = _percent(result.get("proxy_cpu"))
        if not prefix.endswith("_one"):
            outcome.values[f"{prefix}_machine"] = _percent(result.get("all_cores"))


HTTP = _Load(
    "http-all-cores",
    "ach",
    f"HTTP GET keep-alive, all cores, {HTTP_LOAD}",
    "req/s",
    _http,
)
HANDSHAKES = _Load(
    "handshake-all-cores",
    "acs",
    f"handshakes, all cores, {LOADGENS}{TIMES}{HANDSHAKE_CONCURRENCY} concurrent",
    "/s",
    _handshakes,
)
NAMES = (HTTP.name, HANDSHAKES.name)


def all_cores_scenarios() -> list[Scenario]:
    """The two scenarios, after the pinned ones."""
    return [
        Scenario(
            HTTP.name,
            f"plain GET with keep-alive, {HTTP_LOAD}, each proxy with one worker and then on "
            "all cores; nothing pinned",
            HTTP.metrics(),
            HTTP.run,
            no_wrk,
            pinned=False,
            workers=1,
            # One process whatever the cores: no all-cores configuration to compare.
            floor=False,
            keep_alive=True,
        ),
        Scenario(
            HANDSHAKES.name,
            f"upgrade handshakes from {LOADGENS} load generators, each proxy with one worker "
            "and then on all cores; nothing pinned",
            HANDSHAKES.metrics(),
            HANDSHAKES.run,
            pinned=False,
            workers=1,
            # One process whatever the cores: no all-cores configuration to compare.
            floor=False,
        ),
    ]
