"""The command line: options, and the loop over scenarios and targets.

For each scenario, every target runs in turn (so that the figures of one row
are measured close together in time), each time with a fresh backend and a
freshly started proxy that are stopped afterwards whatever happens.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType

from . import allcores, report
from .build import DEFAULT_BUILD_DIR, BuildError, build
from .http2 import SCENARIO_NAMES as HTTP2_SCENARIO_NAMES
from .http2 import http2_scenarios
from .peers import ALL, PEERS_DIR, PROXIES
from .procs import Process, StartError, raise_nofile
from .scenarios import Outcome, Scenario, Settings, all_scenarios, no_wrk
from .targets import REPO, Backend, Context, Running, Target, TLSFiles, first_line

SCENARIO_NAMES = (
    "throughput",
    "rtt",
    "handshake",
    "idle",
    "http",
    "http-workers",
    *allcores.NAMES,
    *HTTP2_SCENARIO_NAMES,
)
_RUN_NUMBERS = itertools.count(1)


def _names(value: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}"
        )
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark upgradeproxy against a direct connection, nginx, HAProxy and "
        "Caddy (those installed), mitmproxy and proxy.py (installed from PyPI into the build "
        "directory): tunnel throughput, round trips, handshakes, idle memory, plain HTTP, "
        "and all cores. Builds its C load generator and backend first.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs (about a minute in all): a smoke test"
    )
    parser.add_argument(
        "--only",
        type=lambda v: _names(v, SCENARIO_NAMES, "scenario"),
        metavar="SCENARIO[,...]",
        help=f"run only these scenarios ({', '.join(SCENARIO_NAMES)})",
    )
    parser.add_argument(
        "--proxies",
        type=lambda v: _names(v, PROXIES, "proxy"),
        metavar="NAME[,...]",
        help=f"compare only these ({', '.join(PROXIES)}); a direct connection always runs",
    )
    parser.add_argument(
        "--upgradeproxy-args",
        default="",
        metavar="'ARGS'",
        help="extra arguments for 'twistd -n upgradeproxy', e.g. '--no-splice'",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every cell N times and report the median (all runs are in the JSON)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        metavar="FILE",
        help="also print (or write to FILE) a Markdown table for README.md",
    )
    parser.add_argument(
        "--twistd", help="the twistd to run upgradeproxy with (default: .venv/bin/twistd)"
    )
    parser.add_argument("--load-cpu", type=int, default=0, help="CPU for load generator+backend")
    parser.add_argument("--proxy-cpu", type=int, default=1, help="CPU for the proxy under test")
    parser.add_argument(
        "--build-dir",
        type=Path,
        default=DEFAULT_BUILD_DIR,
        help=f"where the C programs and the Python peers' virtualenv ({PEERS_DIR}/) go",
    )
    parser.add_argument(
        "--keep-temp", action="store_true", help="keep configurations and logs, print where"
    )
    # Let "--upgradeproxy-args '--no-splice'" through: argparse would take the
    # value, which starts with a dash, for an option of its own.
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] == "--upgradeproxy-args":
            joined[-1] = f"--upgradeproxy-args={arg}"
        else:
            joined.append(arg)
    return parser.parse_args(joined)


def _find_twistd(option: str | None) -> str | None:
    if option:
        return option
    local = REPO / ".venv" / "bin" / "twistd"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("twistd")


def _choose_cpus(args: argparse.Namespace, notes: list[str]) -> tuple[int | None, int | None]:
    allowed = os.sched_getaffinity(0)
    if shutil.which("taskset") is None:
        notes.append("taskset not found: nothing is pinned to a CPU")
        return None, None
    if args.load_cpu == args.proxy_cpu or not {args.load_cpu, args.proxy_cpu} <= allowed:
        notes.append(
            f"CPUs {args.load_cpu} and {args.proxy_cpu} are not two distinct usable CPUs "
            f"(usable: {sorted(allowed)}): nothing is pinned"
        )
        return None, None
    return args.load_cpu, args.proxy_cpu


def _no_target(scenario: Scenario, targets: list[Target]) -> str | None:
    if any(scenario.runs_on(target.name) for target in targets):
        return None
    names = ", ".join(scenario.targets or ())
    return f"it measures only {names}, which is not among the targets here (see --proxies)"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(scenario: Scenario, outcome: Outcome) -> str:
    parts = []
    for metric in scenario.metrics:
        value = outcome.values.get(metric.key)
        if value is not None:
            shown = report.format_value(metric, value)
            parts.append(f"{metric.label.strip()} {shown} {metric.unit}")
    loads = [d.get("load_cpu") for d in outcome.details.values() if isinstance(d, dict)]
    loads = [c for c in loads if c is not None]
    if loads:
        parts.append("load CPU " + "/".join(f"{c:.0%}" for c in loads))
    if outcome.problems:
        parts.append(f"{len(outcome.problems)} problem(s)")
    return "; ".join(parts)


def run_one(
    ctx: Context, settings: Settings, scenario: Scenario, target: Target
) -> tuple[Outcome, list[str], list[str]]:
    """One scenario against one target, with a fresh backend and proxy.

    Returns the outcome, the warnings/errors the proxy logged under load, and
    those it logged at start-up. The scenario decides whether anything is
    pinned, and upgradeproxy's ``--workers`` (see :meth:`Scenario.context`).
    """
    ctx = scenario.context(ctx)
    log = ctx.workdir / f"backend-{scenario.name}-{target.name}-{next(_RUN_NUMBERS)}.log"
    backend = Process(
        "backend",
        [str(ctx.programs.backend), "--port", "0"],
        log_path=log,
        cpu=ctx.load_cpu,
        pipe_stdout=True,
    )
    running: Running | None = None
    with backend:
        port = int(backend.read_line(timeout=10).split()[1])
        with target.run(ctx, port) as running:
            outcome = scenario.run(ctx, settings, running, Backend(port, backend))
            process = running.process
            if process is not None and process.exited() is not None:
                outcome.problems.append(f"{target.name} exited during the run: {process.exited()}")
        if backend.exited() is not None:
            outcome.problems.append(f"the backend exited during the run: {backend.log_tail()}")
    backend_errors = backend.log_text().strip()
    if backend_errors:
        outcome.problems.append(f"the backend said: {backend_errors[:300]}")
    findings = [*running.findings(), *outcome.findings]
    return outcome, findings, target.notable_lines(running.startup_log())


def combine(outcomes: list[Outcome]) -> Outcome:
    """One outcome from repeated runs: the median of each value; every problem and mark."""
    if len(outcomes) == 1:
        return outcomes[0]
    combined = Outcome()
    for key in outcomes[0].values:
        values = [v for o in outcomes if (v := o.values.get(key)) is not None]
        combined.values[key] = statistics.median(values) if values else None
    combined.details = {"runs": [{"values": o.values, **o.details} for o in outcomes]}
    combined.unsupported = next((o.unsupported for o in outcomes if o.unsupported), None)
    for n, outcome in enumerate(outcomes, start=1):
        combined.problems += [f"run {n}: {problem}" for problem in outcome.problems]
        for key, reason in outcome.load_bound.items():
            combined.load_bound[key] = _joined(combined.load_bound.get(key), n, reason)
        for key, reason in outcome.disturbed.items():
            combined.disturbed[key] = _joined(combined.disturbed.get(key), n, reason)
    return combined


def _joined(before: str | None, run: int, reason: str) -> str:
    return f"{before}; run {run}: {reason}" if before else f"run {run}: {reason}"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: all processes stop


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _say("bench: interrupted; everything it started has been stopped")
        return 130


def _main(argv: list[str] | None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if args.repeat < 1:
        _say("bench: --repeat needs a number of runs, 1 or more")
        return 2
    settings = Settings.quick() if args.quick else Settings()
    notes: list[str] = []

    nofile = raise_nofile()
    try:
        programs = build(args.build_dir)
    except BuildError as e:
        _say(f"bench: {e}")
        return 1
    for warning in programs.warnings:
        _say(f"bench: compiler warning: {warning}")
    load_cpu, proxy_cpu = _choose_cpus(args, notes)

    workdir = Path(tempfile.mkdtemp(prefix="upgradeproxy-bench-"))
    ctx = Context(
        programs=programs,
        workdir=workdir,
        load_cpu=load_cpu,
        proxy_cpu=proxy_cpu,
        nofile=nofile,
        twistd=_find_twistd(args.twistd),
        upgradeproxy_args=shlex.split(args.upgradeproxy_args),
        peers=args.build_dir.resolve() / PEERS_DIR,
    )

    wanted = set(args.proxies or PROXIES) | {"direct"}
    targets: list[Target] = []
    for target in ALL:
        if target.name not in wanted:
            continue
        reason = target.unavailable(ctx)
        if reason:
            _say(f"bench: skipping {target.name}: {reason}")
            notes.append(f"skipped {target.name}: {reason}")
        else:
            targets.append(target)
    scenarios: list[Scenario] = []
    every = [*all_scenarios(settings, nofile), *allcores.all_cores_scenarios()]
    for scenario in [*every, *http2_scenarios(ctx)]:
        if args.only and scenario.name not in args.only:
            continue
        reason = scenario.unavailable() or _no_target(scenario, targets)
        if not reason and scenario.tls and ctx.certificate is None:
            try:
                ctx.certificate = TLSFiles.create(workdir / "tls")
            except StartError as e:
                reason = str(e)
        if reason:
            _say(f"bench: skipping scenario {scenario.name}: {reason}")
            notes.append(f"skipped scenario {scenario.name}: {reason}")
            continue
        scenarios.append(scenario)
        if not scenario.pinned:
            notes.append(
                f"{scenario.name}: nothing pinned; the load generator and the backend share "
                f"the {len(os.sched_getaffinity(0))} CPUs with the proxy, whose CPU is summed "
                "over all its processes (parent and workers), in % of one core"
            )
    targets = [t for t in targets if any(s.runs_on(t.name) for s in scenarios)]
    if nofile < 2 * settings.idle_tunnels + 256 and any(s.name == "idle" for s in scenarios):
        notes.append(f"open-file limit {nofile}: the idle scenario holds fewer tunnels")
    if ctx.upgradeproxy_args:
        notes.append(f"upgradeproxy ran with extra arguments: {args.upgradeproxy_args}")

    results = report.Results(
        command=shlex.join(["python3", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        machine=report.machine_info(),
        settings={
            "warmup": settings.warmup,
            "duration": settings.duration,
            "idle_tunnels": settings.idle_tunnels,
            "wrk_seconds": settings.wrk_seconds,
            "repeat": args.repeat,
            "load_cpu": load_cpu,
            "proxy_cpu": proxy_cpu,
            "nofile": nofile,
            "compiler": programs.compiler,
        },
        scenarios=scenarios,
        targets=[t.name for t in targets],
        versions={t.name: t.version(ctx) for t in targets},
        notes=notes,
    )
    if any(s.unavailable is no_wrk for s in scenarios):
        results.versions["wrk"] = first_line(["wrk", "-v"]).split(" Copyright")[0]

    started = time.monotonic()
    try:
        for scenario in scenarios:
            _say(f"== {scenario.name}: {scenario.title}")
            chosen = [target for target in targets if scenario.runs_on(target.name)]
            runs: dict[str, list[Outcome]] = {target.name: [] for target in chosen}
            for repeat in range(args.repeat):
                for target in chosen:  # target after target, so that a row is measured together
                    try:
                        outcome, findings, startup = run_one(ctx, settings, scenario, target)
                    except Exception as e:
                        outcome, findings, startup = Outcome(), [], []
                        outcome.problems.append(f"the run failed: {e}")
                        if not isinstance(e, StartError):
                            _say(traceback.format_exc().rstrip())
                    runs[target.name].append(outcome)
                    if findings:
                        found = results.findings.setdefault(scenario.name, {})
                        found.setdefault(target.name, []).extend(findings)
                    if startup:
                        results.startup[target.name] = startup
                    run = f" (run {repeat + 1})" if args.repeat > 1 else ""
                    _say(f"   {target.name:>12}{run}: {_summary(scenario, outcome)}")
            for name, outcomes in runs.items():
                results.outcomes.setdefault(scenario.name, {})[name] = combine(outcomes)
    finally:
        if args.keep_temp:
            _say(f"bench: configurations and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _say(f"bench: done in {time.monotonic() - started:.0f} s")

    print(report.text_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(results), indent=2) + "\n")
        _say(f"bench: JSON written to {args.json}")
    if args.markdown:
        text = report.markdown_report(results)
        if args.markdown == "-":
            print("\n" + text)
        else:
            Path(args.markdown).write_text(text)
            _say(f"bench: Markdown written to {args.markdown}")
    return 0
