"""Reports: the text table, the Markdown for README.md, and the JSON.

Rows are metrics, columns are targets, and when upgradeproxy ran, one more
column per other target holds upgradeproxy's value divided by that target's
(0.42 times: upgradeproxy reaches 42 % of it; for latency and memory, where
lower is better, 2.0 times means twice as slow or twice as big). A value whose
run had problems (failed handshakes, broken tunnels, wrong bytes, non-2xx
answers) is marked ``!`` and the problems are listed under the table.
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from .scenarios import TIMES, Metric, Outcome, Scenario

LEGEND = (
    "up vs X: upgradeproxy's value divided by X's; for µs and KiB lower is better.",
    "proxy CPU: the share of one core that the proxy's processes used during that run.",
    "*: the load CPU was saturated and the proxy's was not: the load side set the limit.",
    "~: other processes, or the hypervisor, took a good share of a CPU meanwhile.",
    "!: the run had failures (listed below).",
    "n/s: the proxy does not support it (the reason is below).",
)


@dataclass
class Results:
    """Everything one invocation produced."""

    command: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    scenarios: list[Scenario]
    targets: list[str]
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    outcomes: dict[str, dict[str, Outcome]] = field(default_factory=dict)
    findings: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    startup: dict[str, list[str]] = field(default_factory=dict)

    def outcome(self, scenario: str, target: str) -> Outcome | None:
        return self.outcomes.get(scenario, {}).get(target)


def machine_info() -> dict[str, Any]:
    """Date, CPU count and model, kernel, OS, memory, Python."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = "unknown"
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    distro = platform.system()
    try:
        release = platform.freedesktop_os_release()
        distro = release.get("PRETTY_NAME", distro)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "os": distro,
        "memory": memory,
        "python": platform.python_version(),
    }


# -- cells -----------------------------------------------------------------------


def format_value(metric: Metric, value: float | None) -> str:
    if value is None:
        return "—"
    if metric.unit == "% core":
        return f"{value:.0f}"
    if metric.unit in ("fds", TIMES):
        return f"{value:.2f}"
    if metric.unit == "KiB":
        return f"{value:.1f}"
    if metric.unit == "µs":
        return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    if metric.unit == "MB/s":
        return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,.0f}"


def format_ratio(mine: float | None, theirs: float | None) -> str:
    if mine is None or theirs is None or theirs == 0:
        return "—"
    ratio = mine / theirs
    return f"{ratio:.2f}{TIMES}" if ratio < 10 else f"{ratio:.0f}{TIMES}"


def _rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table, as strings."""
    others = [t for t in results.targets if t != "upgradeproxy"]
    with_ratios = "upgradeproxy" in results.targets and others
    header = ["metric", "unit", *results.targets]
    if with_ratios:
        header += [f"up vs {t}" for t in others]
    rows = []
    for scenario in results.scenarios:
        for metric in scenario.metrics:
            cells = [metric.label, metric.unit]
            values: dict[str, float | None] = {}
            for target in results.targets:
                outcome = results.outcome(scenario.name, target)
                value = outcome.values.get(metric.key) if outcome else None
                values[target] = value
                mark = ""
                if outcome is not None and value is not None:
                    mark += "*" if metric.key in outcome.load_bound else ""
                    mark += "~" if metric.key in outcome.disturbed else ""
                    mark += "!" if outcome.problems else ""
                shown = format_value(metric, value)
                if value is None and outcome is not None and outcome.unsupported:
                    shown = "n/s"
                cells.append(shown + mark)
            if with_ratios:
                cells += [
                    format_ratio(values["upgradeproxy"], values[t]) if metric.compare else ""
                    for t in others
                ]
            rows.append(cells)
    return header, rows


def text_table(results: Results) -> str:
    header, rows = _rows(results)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(widths[i]) for i, cell in enumerate(row[2:], start=2)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown_cell(cell: str) -> str:
    indent = len(cell) - len(cell.lstrip(" "))
    cell = cell.replace("|", "\\|").replace("~", "\\~").replace("*", "\\*")
    return "&emsp;" * (indent // 2) + cell.lstrip(" ")


def markdown_table(results: Results) -> str:
    header, rows = _rows(results)
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in row) + " |")
    return "\n".join(lines)


# -- notes -----------------------------------------------------------------------


def problem_lines(results: Results) -> list[str]:
    lines = []
    for scenario in results.scenarios:
        for target in results.targets:
            outcome = results.outcome(scenario.name, target)
            for problem in outcome.problems if outcome else []:
                lines.append(f"{scenario.name} / {target}: {problem}")
    return lines


def unsupported_lines(results: Results) -> list[str]:
    return [
        f"{scenario.name} / {target}: {outcome.unsupported}"
        for scenario in results.scenarios
        for target in results.targets
        if (outcome := results.outcome(scenario.name, target)) and outcome.unsupported
    ]


def flag_lines(results: Results, flag: str) -> list[str]:
    """The reasons behind the ``load_bound`` or ``disturbed`` marks, one line per run."""
    lines = []
    for scenario in results.scenarios:
        for target in results.targets:
            outcome = results.outcome(scenario.name, target)
            flags: dict[str, str] = getattr(outcome, flag) if outcome else {}
            by_reason: dict[str, list[str]] = {}
            for key, reason in flags.items():
                by_reason.setdefault(reason, []).append(key)
            for reason, keys in by_reason.items():
                lines.append(f"{scenario.name} / {target} ({', '.join(keys)}): {reason}")
    return lines


def finding_lines(results: Results) -> list[str]:
    lines = []
    for scenario, by_target in results.findings.items():
        for target, found in by_target.items():
            lines += [f"{scenario} / {target}: {line}" for line in found]
    return lines


def _unpinned(results: Results) -> str:
    names = [scenario.name for scenario in results.scenarios if not scenario.pinned]
    return f" (nothing pinned in {', '.join(names)}: see the notes)" if names else ""


def text_report(results: Results) -> str:
    m = results.machine
    s = results.settings
    repeat = f", median of {s['repeat']} runs" if s["repeat"] > 1 else ""
    out = [
        f"upgradeproxy benchmark, {m['date']}: {m['nproc']} CPUs ({m['cpu']}), "
        f"Linux {m['kernel']}, {m['os']}",
        f"load on CPU {s['load_cpu']}, proxy on CPU {s['proxy_cpu']}{_unpinned(results)}; "
        f"{s['warmup']} s warm-up, {s['duration']} s measured{repeat}",
        "",
        text_table(results),
        "",
        *LEGEND,
    ]
    for title, lines in (
        ("notes", results.notes),
        ("problems (cells marked !)", problem_lines(results)),
        ("not supported (cells marked n/s)", unsupported_lines(results)),
        ("limited by the load CPU (cells marked *)", flag_lines(results, "load_bound")),
        (
            "disturbed by other processes or the hypervisor (cells marked ~)",
            flag_lines(results, "disturbed"),
        ),
        ("warnings and errors the proxies logged under load", finding_lines(results)),
    ):
        if lines:
            out += ["", f"{title}:", *(f"  - {line}" for line in lines)]
    return "\n".join(out)


def markdown_report(results: Results) -> str:
    m = results.machine
    s = results.settings
    out = [
        f"Measured {m['date']} with `{results.command}`",
        f"on {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, Linux {m['kernel']}, {m['os']}.",
        f"Load generator and backend on CPU {s['load_cpu']}, the proxy on CPU {s['proxy_cpu']}"
        f"{_unpinned(results)}; {s['warmup']} s warm-up, {s['duration']} s measured"
        + (f"; median of {s['repeat']} runs." if s["repeat"] > 1 else "."),
        "",
        markdown_table(results),
        "",
        " ".join(LEGEND).replace("*", "\\*").replace("~", "\\~"),
        "",
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in results.versions.items()) + ".",
    ]
    problems = problem_lines(results)
    if problems:
        out += ["", "Problems (cells marked !):", "", *(f"- {line}" for line in problems)]
    unsupported = unsupported_lines(results)
    if unsupported:
        out += ["", "Not supported (cells marked n/s):", "", *(f"- {line}" for line in unsupported)]
    for title, flag in (
        ("Limited by the load CPU (cells marked \\*)", "load_bound"),
        ("Disturbed by other processes or the hypervisor (cells marked \\~)", "disturbed"),
    ):
        lines = flag_lines(results, flag)
        if lines:
            out += ["", f"{title}:", "", *(f"- {line}" for line in lines)]
    if results.notes:
        out += ["", *(f"- {line}" for line in results.notes)]
    return "\n".join(out) + "\n"


def to_json(results: Results) -> dict[str, Any]:
    return {
        "command": results.command,
        "machine": results.machine,
        "settings": results.settings,
        "versions": results.versions,
        "notes": results.notes,
        "targets": results.targets,
        "metrics": [
            {
                "scenario": scenario.name,
                "key": metric.key,
                "label": metric.label.strip(),
                "unit": metric.unit,
                "higher_is_better": metric.higher_is_better,
            }
            for scenario in results.scenarios
            for metric in scenario.metrics
        ],
        "results": {
            scenario: {
                target: {
                    "values": outcome.values,
                    "problems": outcome.problems,
                    "unsupported": outcome.unsupported,
                    "load_bound": outcome.load_bound,
                    "disturbed": outcome.disturbed,
                    "log_findings": results.findings.get(scenario, {}).get(target, []),
                    "details": outcome.details,
                }
                for target, outcome in by_target.items()
            }
            for scenario, by_target in results.outcomes.items()
        },
        "startup_log_warnings": results.startup,
    }
