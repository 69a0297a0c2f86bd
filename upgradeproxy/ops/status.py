"""The status page: one small HTML view of the proxy's snapshots, for people.

It shows a summary, the live tunnels, the backends' health, what the limits
turned away, the upgrades refused in the last 15 minutes and the
configuration in use (when it was loaded, its hash, and how its reloads
went). It is plain HTML with inline CSS, reloading itself every few
seconds; no script.

Every string that comes from a snapshot is HTML-escaped: clients choose
request targets, and refusal reasons can quote their headers.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Refusals younger than this many seconds are listed.
REFUSAL_WINDOW = 15 * 60
#: At most this many tunnels are listed (the oldest); the rest are counted.
MAX_TUNNEL_ROWS = 500
#: Seconds between reloads of the page.
REFRESH = 5

_Snapshots = Sequence[tuple[str | None, Mapping[str, Any]]]

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 0.3em; }
h2 { font-size: 1.1em; margin: 1.6em 0 0.4em; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 0.2em 0.8em 0.2em 0; border-bottom: 1px solid #ddd;
         vertical-align: top; }
th { font-weight: 600; }
td { overflow-wrap: anywhere; max-width: 40em; }
tr.down td { color: #b00020; }
.summary b { font-size: 1.15em; }
.note, footer { color: #666; }
footer { margin-top: 2em; font-size: 0.9em; }
@media (prefers-color-scheme: dark) {
  body { color: #e6e6e6; background: #161616; }
  th, td { border-color: #333; }
  tr.down td { color: #ff6b81; }
  .note, footer { color: #999; }
}
"""


def format_duration(seconds: float) -> str:
    """``seconds`` in its two largest units: ``"12s"``, ``"3m 12s"``, ``"2h 5m"``, ``"4d 1h"``."""
    remaining = max(0, int(seconds))
    days, remaining = divmod(remaining, 86400)
    hours, remaining = divmod(remaining, 3600)
    minutes, secs = divmod(remaining, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    first = next((i for i, (amount, _) in enumerate(parts) if amount), len(parts) - 1)
    return " ".join(f"{amount}{unit}" for amount, unit in parts[first : first + 2])


def format_bytes(count: int) -> str:
    """A byte count in binary units: ``"512 B"``, ``"1.2 MiB"``."""
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _clock_time(timestamp: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(timestamp))


@dataclass(frozen=True, slots=True)
class _Row:
    cells: Sequence[object]
    #: Shown as a problem (a backend that is down).
    alarm: bool = False


def _table(headings: Sequence[str], rows: Iterable[_Row], empty: str) -> str:
    lines: list[str] = []
    for row in rows:
        cells = "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row.cells)
        lines.append(f'<tr class="down">{cells}</tr>' if row.alarm else f"<tr>{cells}</tr>")
    if not lines:
        return f'<p class="note">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(heading)}</th>" for heading in headings)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _headings(by_worker: bool, *headings: str) -> list[str]:
    return ["worker", *headings] if by_worker else list(headings)


def _cells(by_worker: bool, worker: str | None, *cells: object) -> list[object]:
    return [worker or "", *cells] if by_worker else list(cells)


def _summary(snapshots: _Snapshots, now: float) -> str:
    if not snapshots:
        return '<p class="summary">No process is reporting: the workers may be (re)starting.</p>'
    connections = sum(snapshot["connections"] for _, snapshot in snapshots)
    tunnels = sum(len(snapshot["tunnels"]) for _, snapshot in snapshots)
    requests = sum(entry["count"] for _, snapshot in snapshots for entry in snapshot["requests"])
    uptime = now - min(snapshot["started"] for _, snapshot in snapshots)
    parts = [
        f"<b>{connections:,}</b> client connections",
        f"<b>{tunnels:,}</b> live tunnels",
        f"<b>{requests:,}</b> requests served",
        f"up <b>{format_duration(uptime)}</b>",
    ]
    if any(worker is not None for worker, _ in snapshots):
        parts.append(f"<b>{len(snapshots)}</b> workers")
    return f'<p class="summary">{" · ".join(parts)}</p>'


def _tunnels(snapshots: _Snapshots, now: float, by_worker: bool) -> str:
    # An age is as of its snapshot; a worker's snapshot can be a second old.
    live = sorted(
        (
            (worker, tunnel, tunnel["age"] + max(0.0, now - snapshot["time"]))
            for worker, snapshot in snapshots
            for tunnel in snapshot["tunnels"]
        ),
        key=lambda item: item[2],
        reverse=True,
    )
    rows = (
        _Row(
            _cells(
                by_worker,
                worker,
                tunnel["protocol"],
                tunnel["client_protocol"],
                tunnel["client"],
                tunnel["route"],
                tunnel["backend"],
                format_duration(age),
                format_bytes(tunnel["client_to_backend"]),
                format_bytes(tunnel["backend_to_client"]),
                "yes" if tunnel["spliced"] else "no",
            )
        )
        for worker, tunnel, age in live[:MAX_TUNNEL_ROWS]
    )
    headings = _headings(
        by_worker,
        "protocol",
        "opened over",
        "client",
        "route",
        "backend",
        "age",
        "client → backend",
        "backend → client",
        "spliced",
    )
    table = _table(headings, rows, "No live tunnels.")
    hidden = len(live) - MAX_TUNNEL_ROWS
    if hidden > 0:
        table += f'<p class="note">and {hidden:,} more</p>'
    return table


def _backends(snapshots: _Snapshots, by_worker: bool) -> str:
    rows = (
        _Row(
            _cells(
                by_worker,
                worker,
                backend["route"],
                backend["backend"],
                _health(backend),
                backend["active"],
                backend["failures"],
                backend["last_error"],
            ),
            alarm=not backend["healthy"],
        )
        for worker, snapshot in snapshots
        for backend in snapshot["backends"]
    )
    headings = _headings(
        by_worker, "route", "backend", "health", "active", "failures", "last error"
    )
    return _table(headings, rows, "No backends.")


def _limits(snapshots: _Snapshots) -> str:
    """What the limits turned away since the start, summed over the workers."""
    totals: dict[str, int] = {}
    for _, snapshot in snapshots:
        for entry in snapshot["limit_rejections"]:
            totals[entry["limit"]] = totals.get(entry["limit"], 0) + entry["count"]
    tracked = sum(snapshot["client_entries"] for _, snapshot in snapshots)
    rows = (_Row((limit, f"{count:,}")) for limit, count in sorted(totals.items()))
    table = _table(["limit", "turned away"], rows, "Nothing turned away by a limit.")
    return table + f'<p class="note">{tracked:,} client addresses tracked by per-client limits</p>'


def _health(backend: Mapping[str, Any]) -> str:
    if backend["healthy"]:
        health = "healthy"
    elif backend["in_rotation"]:
        # A route's only backend, or one tried again after its fail timeout.
        failed = backend["failures_in_a_row"]
        health = f"failing ({failed} failed connection{'s' * (failed != 1)} in a row), still in use"
    else:
        health = "down"
    return f"{health}, draining (removed by a reload)" if backend["draining"] else health


def _configuration(snapshots: _Snapshots, by_worker: bool) -> str:
    rows = (
        _Row(
            _cells(
                by_worker,
                worker,
                _clock_time(config["loaded"]),
                config["digest"] or "-",
                config["reloads"]["ok"],
                config["reloads"]["failed"],
                "ok" if config["last_reload_ok"] else "failed: the configuration above serves",
            ),
            alarm=not config["last_reload_ok"],
        )
        for worker, snapshot in snapshots
        for config in (snapshot["config"],)
    )
    headings = _headings(
        by_worker, "loaded at", "hash", "reloads ok", "reloads failed", "last reload"
    )
    return _table(headings, rows, "No process is reporting.")


def _refusals(snapshots: _Snapshots, now: float, by_worker: bool) -> str:
    recent = sorted(
        (
            (worker, refusal)
            for worker, snapshot in snapshots
            for refusal in snapshot["recent_refusals"]
            if now - refusal["time"] <= REFUSAL_WINDOW
        ),
        key=lambda item: item[1]["time"],
        reverse=True,
    )
    rows = (
        _Row(
            _cells(
                by_worker,
                worker,
                _clock_time(refusal["time"]),
                refusal["route"],
                refusal["client"],
                refusal["target"],
                refusal["validator"],
                refusal["status"],
                refusal["reason"],
            )
        )
        for worker, refusal in recent
    )
    headings = _headings(
        by_worker, "time", "route", "client", "target", "validator", "status", "reason"
    )
    return _table(headings, rows, "No upgrade refused in the last 15 minutes.")


def render_status(snapshots: _Snapshots, now: float) -> bytes:
    """The status page for ``(worker, snapshot)`` pairs, drawn at unix time ``now``, as UTF-8."""
    by_worker = any(worker is not None for worker, _ in snapshots)
    body = "\n".join(
        (
            "<h1>upgradeproxy</h1>",
            _summary(snapshots, now),
            "<h2>Live tunnels, oldest first</h2>",
            _tunnels(snapshots, now, by_worker),
            "<h2>Backends</h2>",
            _backends(snapshots, by_worker),
            "<h2>Turned away by limits, since the start</h2>",
            _limits(snapshots),
            "<h2>Upgrades refused in the last 15 minutes, newest first</h2>",
            _refusals(snapshots, now, by_worker),
            "<h2>Configuration</h2>",
            _configuration(snapshots, by_worker),
            f"<footer>Drawn at {_clock_time(now)}; reloads every {REFRESH} s. "
            '<a href="metrics">Metrics for Prometheus</a> · '
            '<a href="status.json">the same as JSON</a></footer>',
        )
    )
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>upgradeproxy status</title><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )
    return page.encode("utf-8")
