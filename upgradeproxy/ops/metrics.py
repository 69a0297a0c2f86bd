"""Prometheus metrics, a status page and their endpoint, all built from snapshots.

A *snapshot* is a plain, JSON-serialisable dict describing one proxy process
(``Proxy.snapshot()``). This module only reads snapshots, so one process
and ``--workers N`` are served the same way: a worker writes its snapshot to a
file every second (:class:`SnapshotWriter`), and the parent reads the files of
the workers still alive (:func:`read_snapshots`). It never touches the proxy's
live objects and never changes the proxy's state.

A *source* returns ``(worker, snapshot)`` pairs. With one process the worker is
``None`` and the series carry no ``worker`` label; when any worker is named,
every series gets a ``worker`` label (``""`` for an unnamed one), so a
worker's counters reset on their own when it is replaced, as Prometheus
expects.

The metrics (counters are cumulative since the process started):

``upgradeproxy_requests_total{route, status}``
    Responses sent to clients, by route and HTTP status.
``upgradeproxy_upgrade_refusals_total{route, validator, stage}``
    Upgrades refused, by the validator that refused and the stage it refused at:
    ``request`` (before any backend was contacted) or ``response`` (the
    backend's ``101`` broke a rule; the client got a ``502``).
``upgradeproxy_limit_rejections_total{limit}``
    Requests or connections turned away by a limit: ``max_connections``,
    ``max_tunnels``, ``max_request_body``, ``no_healthy_backend``, or a
    per-client limit: ``client_connections`` (503),
    ``client_connections_closed_at_accept`` (closed unanswered),
    ``client_tunnels`` and ``client_upgrade_rate`` (429).
``upgradeproxy_tunnels_active{protocol}`` (gauge)
    Tunnels open now, by upgrade protocol (``websocket``, ...). Protocols seen
    since the start stay listed with 0.
``upgradeproxy_tunnels_total{protocol}``
    Tunnels opened, by upgrade protocol.
``upgradeproxy_tunnel_bytes_total{direction}``
    Bytes moved through tunnels, live ones included; ``direction`` is
    ``client_to_backend`` or ``backend_to_client``.
``upgradeproxy_backend_up{route, backend}`` (gauge)
    1 while the backend is considered healthy, 0 while it is down: from a
    failed connection or health check until one works again, also while a
    route's only backend is still in use.
``upgradeproxy_backend_active{route, backend}`` (gauge)
    Requests and tunnels using the backend now.
``upgradeproxy_backend_failures_total{route, backend}``
    Failed attempts to use the backend (connection errors, timeouts).
``upgradeproxy_client_connections_open`` (gauge)
    Client connections open now.
``upgradeproxy_client_connections_total``
    Client connections accepted.
``upgradeproxy_limit{name}`` (gauge)
    The configured ``max_connections`` and ``max_tunnels``, and the proxy-wide
    per-client ``client_connections``, ``client_tunnels`` and
    ``client_upgrade_rate`` (per second); absent when unlimited.
``upgradeproxy_client_limit_entries`` (gauge)
    Client addresses the per-client limits keep state for (bounded: see
    ``upgradeproxy.core._clientlimits``).
``upgradeproxy_started_time_seconds`` (gauge)
    Unix time the process started proxying.
``upgradeproxy_backend_draining{route, backend}`` (gauge)
    1 for a backend a reload removed while requests or tunnels still use it
    (it takes no new request; it is listed until they end), 0 otherwise.
``upgradeproxy_config_reloads_total{result}``
    Reloads of the configuration (SIGHUP), by result: ``ok`` or ``failed``.
``upgradeproxy_config_last_reload_success`` (gauge)
    0 while the last reload failed (the configuration before it still
    serves), 1 otherwise.
``upgradeproxy_config_loaded_timestamp_seconds`` (gauge)
    Unix time the configuration in use was applied.
``upgradeproxy_config_info{hash}`` (gauge)
    Always 1; ``hash`` names the content of the configuration in use.

The open-connections gauge is not named ``upgradeproxy_client_connections``:
that is the family name of the ``_total`` counter, and OpenMetrics parsers
would see two families under one name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .status import render_status

log = Logger()

#: One process's state, as ``Proxy.snapshot()`` returns it.
Snapshot = Mapping[str, Any]
#: Returns the snapshots to report, each with its worker's name (``None`` for a lone process).
SnapshotSource = Callable[[], Sequence[tuple[str | None, Snapshot]]]

#: The keys every snapshot has; a worker file without them is ignored.
_SNAPSHOT_KEYS = frozenset(
    {
        "pid",
        "time",
        "started",
        "connections",
        "connections_total",
        "requests",
        "refusals",
        "recent_refusals",
        "limit_rejections",
        "tunnels",
        "tunnels_total",
        "tunnel_bytes",
        "backends",
        "limits",
        "client_entries",
        "config",
    }
)

_DIRECTIONS = ("client_to_backend", "backend_to_client")

# -- metrics -------------------------------------------------------------------

_Samples = Iterable[tuple[Sequence[str], float]]


def _entries(
    key: str, labels: Sequence[str], value: str = "count"
) -> Callable[[Snapshot], _Samples]:
    """Samples from a list of dicts in the snapshot: labels and value are fields of each."""

    def samples(snapshot: Snapshot) -> _Samples:
        return (
            ([str(entry[label]) for label in labels], float(entry[value]))
            for entry in snapshot[key]
        )

    return samples


def _scalar(key: str) -> Callable[[Snapshot], _Samples]:
    def samples(snapshot: Snapshot) -> _Samples:
        return [((), float(snapshot[key]))]

    return samples


def _tunnels_active(snapshot: Snapshot) -> _Samples:
    active = {entry["protocol"]: 0 for entry in snapshot["tunnels_total"]}
    for tunnel in snapshot["tunnels"]:
        active[tunnel["protocol"]] = active.get(tunnel["protocol"], 0) + 1
    return (([protocol], count) for protocol, count in active.items())


def _tunnel_bytes(snapshot: Snapshot) -> _Samples:
    return (([direction], snapshot["tunnel_bytes"][direction]) for direction in _DIRECTIONS)


def _reloads(snapshot: Snapshot) -> _Samples:
    return (([result], count) for result, count in snapshot["config"]["reloads"].items())


def _config(key: str) -> Callable[[Snapshot], _Samples]:
    def samples(snapshot: Snapshot) -> _Samples:
        return [((), float(snapshot["config"][key]))]

    return samples


def _config_info(snapshot: Snapshot) -> _Samples:
    return [([snapshot["config"]["digest"]], 1.0)]


def _limits(snapshot: Snapshot) -> _Samples:
    return (([name], value) for name, value in snapshot["limits"].items() if value is not None)


@dataclass(frozen=True, slots=True)
class _Metric:
    """One metric family: how to name, describe and read it from a snapshot."""

    name: str
    counter: bool
    documentation: str
    labels: tuple[str, ...]
    samples: Callable[[Snapshot], _Samples]

    def family(self, snapshots: Sequence[tuple[str | None, Snapshot]], by_worker: bool) -> Metric:
        kind = CounterMetricFamily if self.counter else GaugeMetricFamily
        labels = ("worker", *self.labels) if by_worker else self.labels
        family = kind(self.name, self.documentation, labels=labels)
        for worker, snapshot in snapshots:
            prefix = [worker or ""] if by_worker else []
            for values, value in self.samples(snapshot):
                family.add_metric([*prefix, *values], value)
        return family


_METRICS = (
    _Metric(
        "upgradeproxy_requests_total",
        True,
        "Responses sent to clients, by route and HTTP status.",
        ("route", "status"),
        _entries("requests", ("route", "status")),
    ),
    _Metric(
        "upgradeproxy_upgrade_refusals_total",
        True,
        "Upgrades refused, by the validator that refused and the stage (request or response).",
        ("route", "validator", "stage"),
        _entries("refusals", ("route", "validator", "stage")),
    ),
    _Metric(
        "upgradeproxy_limit_rejections_total",
        True,
        "Requests or connections turned away, by the limit that applied.",
        ("limit",),
        _entries("limit_rejections", ("limit",)),
    ),
    _Metric(
        "upgradeproxy_tunnels_active",
        False,
        "Tunnels open now, by upgrade protocol.",
        ("protocol",),
        _tunnels_active,
    ),
    _Metric(
        "upgradeproxy_tunnels_total",
        True,
        "Tunnels opened, by upgrade protocol.",
        ("protocol",),
        _entries("tunnels_total", ("protocol",)),
    ),
    _Metric(
        "upgradeproxy_tunnel_bytes_total",
        True,
        "Bytes moved through tunnels, by direction.",
        ("direction",),
        _tunnel_bytes,
    ),
    _Metric(
        "upgradeproxy_backend_up",
        False,
        "1 while the backend is considered healthy, 0 while it is down.",
        ("route", "backend"),
        _entries("backends", ("route", "backend"), "healthy"),
    ),
    _Metric(
        "upgradeproxy_backend_active",
        False,
        "Requests and tunnels using the backend now.",
        ("route", "backend"),
        _entries("backends", ("route", "backend"), "active"),
    ),
    _Metric(
        "upgradeproxy_backend_failures_total",
        True,
        "Failed attempts to use the backend.",
        ("route", "backend"),
        _entries("backends", ("route", "backend"), "failures"),
    ),
    _Metric(
        "upgradeproxy_client_connections_open",
        False,
        "Client connections open now.",
        (),
        _scalar("connections"),
    ),
    _Metric(
        "upgradeproxy_client_connections_total",
        True,
        "Client connections accepted.",
        (),
        _scalar("connections_total"),
    ),
    _Metric(
        "upgradeproxy_limit",
        False,
        "Configured limits (max_connections, max_tunnels, per-client); absent when unlimited.",
        ("name",),
        _limits,
    ),
    _Metric(
        "upgradeproxy_client_limit_entries",
        False,
        "Client addresses the per-client limits keep state for.",
        (),
        _scalar("client_entries"),
    ),
    _Metric(
        "upgradeproxy_started_time_seconds",
        False,
        "Unix time the process started proxying.",
        (),
        _scalar("started"),
    ),
    _Metric(
        "upgradeproxy_backend_draining",
        False,
        "1 for a backend a reload removed that requests or tunnels still use.",
        ("route", "backend"),
        _entries("backends", ("route", "backend"), "draining"),
    ),
    _Metric(
        "upgradeproxy_config_reloads_total",
        True,
        "Reloads of the configuration, by result (ok or failed).",
        ("result",),
        _reloads,
    ),
    _Metric(
        "upgradeproxy_config_last_reload_success",
        False,
        "0 while the last reload failed (the configuration before it serves), else 1.",
        (),
        _config("last_reload_ok"),
    ),
    _Metric(
        "upgradeproxy_config_loaded_timestamp_seconds",
        False,
        "Unix time the configuration in use was applied.",
        (),
        _config("loaded"),
    ),
    _Metric(
        "upgradeproxy_config_info",
        False,
        "Always 1; hash names the content of the configuration in use.",
        ("hash",),
        _config_info,
    ),
)


class SnapshotCollector:
    """A Prometheus collector that reports the snapshots ``source`` returns.

    Register it with a registry of its own (``CollectorRegistry()``), never
    with ``prometheus_client``'s global one: an embedding application, or
    several proxies in one process, must not collide.
    """

    def __init__(self, source: SnapshotSource) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        """Every metric family, read from the snapshots of this moment."""
        snapshots = self._source()
        by_worker = any(worker is not None for worker, _ in snapshots)
        for metric in _METRICS:
            yield metric.family(snapshots, by_worker)


# -- worker files --------------------------------------------------------------

_WORKER_NAME = re.compile(r"[A-Za-z0-9_-]+")
_WORKER_FILE = re.compile(rf"worker-({_WORKER_NAME.pattern})\.json")


def _replace_file(path: str, data: bytes) -> None:
    """Write ``path`` so that a reader sees either the old content or the new, never a part."""
    directory, name = os.path.split(path)
    # The temporary name does not match _WORKER_FILE, so readers never open it.
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


class SnapshotWriter:
    """Writes one worker's snapshot to ``directory/worker-{worker}.json`` every ``interval``.

    Each write replaces the file atomically, so a reader never sees half of
    one. :meth:`stop` removes the file: a worker that exits cleanly leaves the
    merged view at once, while the file of one that died goes stale and is
    ignored by :func:`read_snapshots`.
    """

    def __init__(
        self,
        source: Callable[[], Snapshot],
        directory: str,
        worker: str,
        clock: IReactorTime,
        interval: float = 1.0,
    ) -> None:
        if not _WORKER_NAME.fullmatch(worker):
            raise ValueError(
                f"worker name {worker!r} cannot name a snapshot file: "
                "use only letters, digits, '-' and '_'"
            )
        self._source = source
        #: The file this worker's snapshot is written to.
        self.path = os.path.join(directory, f"worker-{worker}.json")
        self._interval = interval
        self._loop = task.LoopingCall(self._write)
        self._loop.clock = clock
        self._failing = False

    def start(self) -> None:
        """Write a snapshot now, then every ``interval`` seconds."""
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        """Stop writing and remove the file."""
        if self._loop.running:
            self._loop.stop()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def _write(self) -> None:
        try:
            _replace_file(self.path, json.dumps(dict(self._source())).encode("utf-8"))
        except Exception:
            # Keep trying every interval (the disk may free up), but say so
            # once per run of failures, not every second.
            if not self._failing:
                log.failure(
                    "Cannot write the metrics snapshot {path} (retrying every {interval} s); "
                    "until a write succeeds, this worker drops out of the metrics endpoint "
                    "once its last snapshot is stale",
                    path=self.path,
                    interval=self._interval,
                )
            self._failing = True
        else:
            self._failing = False


def _natural_order(worker: str) -> list[Any]:
    """Sorts worker names with numbers by value: 2 before 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", worker)]


def _read_snapshot(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as file:
            snapshot = json.load(file)
    except (OSError, ValueError):
        # Removed since it was listed (its worker stopped), or not a snapshot.
        return None
    if (
        not isinstance(snapshot, dict)
        or not _SNAPSHOT_KEYS.issubset(snapshot)
        or not isinstance(snapshot["time"], int | float)
    ):
        return None
    return snapshot


def read_snapshots(
    directory: str, now: float, max_age: float = 5.0
) -> list[tuple[str, dict[str, Any]]]:
    """The ``(worker, snapshot)`` pairs of the workers alive in ``directory``.

    A snapshot taken more than ``max_age`` seconds before ``now`` belongs to a
    worker that died; it is left out, as are files that are not snapshots.
    """
    found = []
    for name in os.listdir(directory):
        match = _WORKER_FILE.fullmatch(name)
        if match is None:
            continue
        snapshot = _read_snapshot(os.path.join(directory, name))
        if snapshot is not None and now - snapshot["time"] <= max_age:
            found.append((match[1], snapshot))
    return sorted(found, key=lambda pair: _natural_order(pair[0]))


# -- the endpoint --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Page:
    content_type: bytes
    body: bytes


_ALLOWED_METHODS = (b"GET", b"HEAD")


class _MetricsResource(Resource):
    """``/``, ``/metrics`` and ``/status.json``; nothing else, and only GET and HEAD."""

    isLeaf = True

    def __init__(self, source: SnapshotSource, clock: IReactorTime) -> None:
        super().__init__()
        self._source = source
        self._clock = clock
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(SnapshotCollector(source))
        self._pages: dict[bytes, Callable[[], _Page]] = {
            b"/": self._status_page,
            b"/metrics": self._metrics,
            b"/status.json": self._status_json,
        }

    def render(self, request: Request) -> bytes:
        # Whoever can reach this port learns nothing about the server software.
        request.responseHeaders.removeHeader(b"server")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        # The page shows strings clients chose; if escaping ever failed, no script runs.
        request.setHeader(
            b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'"
        )
        page = self._page(request)
        request.setHeader(b"content-type", page.content_type)
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(page.body))
            return b""
        return page.body

    def _page(self, request: Request) -> _Page:
        if request.method not in _ALLOWED_METHODS:
            request.setResponseCode(405)
            request.setHeader(b"allow", b", ".join(_ALLOWED_METHODS))
            return _text(f"{request.method.decode('latin-1')} is not allowed here: use GET.\n")
        render = self._pages.get(request.path)
        if render is None:
            request.setResponseCode(404)
            return _text("Not found: this endpoint serves /, /metrics and /status.json.\n")
        return render()

    def _metrics(self) -> _Page:
        return _Page(CONTENT_TYPE_LATEST.encode("ascii"), generate_latest(self._registry))

    def _status_page(self) -> _Page:
        body = render_status(self._source(), self._clock.seconds())
        return _Page(b"text/html; charset=utf-8", body)

    def _status_json(self) -> _Page:
        merged = {
            "time": self._clock.seconds(),
            "workers": [
                {"worker": worker, "snapshot": dict(snapshot)}
                for worker, snapshot in self._source()
            ],
        }
        return _Page(b"application/json", json.dumps(merged).encode("utf-8"))


def _text(message: str) -> _Page:
    return _Page(b"text/plain; charset=utf-8", message.encode("utf-8"))


class _QuietSite(Site):
    # A scraper connects every few seconds: neither its connections nor its
    # requests belong in the proxy's log.
    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def metrics_site(source: SnapshotSource, *, clock: IReactorTime | None = None) -> Site:
    """A twisted.web site for the metrics endpoint (``--metrics``).

    ``/metrics`` is the Prometheus text exposition, ``/`` the status page and
    ``/status.json`` the snapshots, as ``{"time": ..., "workers": [{"worker":
    ..., "snapshot": {...}}]}``. Anything else is 404; methods other than GET
    and HEAD are 405. ``clock`` (the global reactor by default) gives the time
    the status page is drawn at, and runs the site's timeouts.
    """
    if clock is None:
        from twisted.internet import reactor

        clock = reactor
    assert clock is not None
    site = _QuietSite(_MetricsResource(source, clock), reactor=clock)
    site.displayTracebacks = False
    return site
