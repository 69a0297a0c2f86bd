"""The SIGHUP side of a reload, in memory: what is logged, applied, counted and kept."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from upgradeproxy.cli._reloader import Reloader, kept_for_restart
from upgradeproxy.cli.config import (
    AccessLogConfig,
    ConfigError,
    ProxyConfig,
    RouteConfig,
    dump_config,
)
from upgradeproxy.cli.service import ConfiguredProxy, ProxyService, StartFailed
from upgradeproxy.cli.workers import RELOAD, RELOAD_FAILED, _FromParent

RUNNING = ProxyConfig(
    routes=(RouteConfig("app", (), "/", ("http://127.0.0.1:9000",)),),
    metrics="tcp:9100",
    source="proxy.toml",
)


class Harness:
    def __init__(self, read: Callable[[], ProxyConfig] | None) -> None:
        self.applied: list[ProxyConfig] = []
        self.refused = 0
        self.fail_apply: Exception | None = None
        self.reloader = Reloader(
            MemoryReactorClock(),
            read,
            running=lambda: RUNNING,
            apply=self.apply,
            refused=self.refuse,
        )

    def apply(self, config: ProxyConfig) -> None:
        if self.fail_apply is not None:
            raise self.fail_apply
        self.applied.append(config)

    def refuse(self) -> None:
        self.refused += 1

    def reload(self) -> tuple[bool, list[str]]:
        with capturedLogs() as events:
            result = self.reloader.reload()
        return result, [formatEvent(e) for e in events]


def test_a_correct_file_is_applied() -> None:
    new = replace(RUNNING, shutdown_grace=5.0)
    h = Harness(lambda: new)
    ok, lines = h.reload()
    assert ok and h.applied == [new] and h.refused == 0
    assert lines[0] == "SIGHUP: reloading proxy.toml"
    assert lines[1].startswith("proxy.toml: OK: listening on ")
    assert "shutdown grace 5 s" in lines[1]
    assert lines[2:] == ["reloaded proxy.toml"]


def test_every_mistake_is_logged_as_check_prints_it_and_nothing_is_applied() -> None:
    problems = ["proxy.toml:3: route[1].policy: unknown policy 'x'", "proxy.toml:9: listen: bad"]

    def read() -> ProxyConfig:
        raise ConfigError(problems)

    h = Harness(read)
    ok, lines = h.reload()
    assert not ok and h.applied == [] and h.refused == 1
    assert lines[1:3] == problems
    assert lines[3] == (
        "reload of proxy.toml failed (2 mistakes); nothing changed: "
        "the configuration before it keeps serving"
    )


def test_a_configuration_that_cannot_be_applied_is_counted_as_failed() -> None:
    h = Harness(lambda: RUNNING)
    h.fail_apply = ValueError("cannot listen on tcp:80: Permission denied")
    ok, lines = h.reload()
    assert not ok and h.refused == 1
    assert "failed (cannot listen on tcp:80: Permission denied); nothing changed" in lines[-1]


def test_without_a_file_there_is_nothing_to_reload() -> None:
    h = Harness(None)
    ok, lines = h.reload()
    assert not ok and h.refused == 0 and h.applied == []
    assert "there is nothing to reload" in lines[0]


def test_settings_of_the_process_are_kept_until_a_restart() -> None:
    new = replace(RUNNING, workers=4, metrics="tcp:9200", listen=("tcp:8081",))
    with capturedLogs() as events:
        kept = kept_for_restart(RUNNING, new)
    assert (kept.workers, kept.metrics, kept.listen) == (1, "tcp:9100", ("tcp:8081",))
    lines = [formatEvent(e) for e in events]
    assert lines == [
        "reload: workers stays 1 until a restart (the number of workers is fixed at the "
        "start); the file now says 4",
        "reload: metrics stays 'tcp:9100' until a restart (the metrics endpoint is opened "
        "once, at the start); the file now says 'tcp:9200'",
    ]
    with_workers = replace(RUNNING, workers=2)
    assert kept_for_restart(with_workers, replace(new, workers=2)).listen == RUNNING.listen


def test_sighup_reloads_at_the_reactor_s_next_turn_and_is_ignored_once_stopping() -> None:
    h = Harness(lambda: RUNNING)
    reactor = h.reloader._reactor
    called: list[Callable[[], object]] = []
    reactor.callFromThread = lambda f, *a: called.append(f)  # type: ignore[method-assign]
    before = signal.getsignal(signal.SIGHUP)
    h.reloader.install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert called == [h.reloader.reload], "even before the service starts"
        h.reloader.startService()
        h.reloader.stopService()
        os.kill(os.getpid(), signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) == h.reloader._signalled, "not fatal at the end"
    finally:
        signal.signal(signal.SIGHUP, before)
    ok, lines = h.reload()
    assert not ok and h.applied == [] and h.refused == 0
    assert lines == ["SIGHUP: ignored, the proxy is shutting down"]


# -- applying, in a single process ----------------------------------------------------------


def test_a_listener_that_cannot_be_bound_fails_the_reload_and_changes_nothing() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
    config = replace(RUNNING, listen=("tcp:0:interface=127.0.0.1",), metrics=None)
    configured = ConfiguredProxy(config, reactor)
    service = ProxyService(configured.factory, config.listen, reactor=reactor, grace=0)
    new_route = replace(RUNNING.routes[0], backends=("http://127.0.0.1:9001",))
    new = replace(config, listen=("tcp:0:interface=127.0.0.2", taken), routes=(new_route,))
    before = configured.proxy.configuration
    try:
        with pytest.raises(StartFailed, match=f"cannot listen on {taken}: "):
            configured.apply(new, before=lambda: service.open_listeners(new.listen))
        assert configured.proxy.configuration is before and configured.config is config
        assert list(service._listeners) == list(config.listen), "the one opened is closed again"
        configured.apply(replace(new, listen=config.listen))
        assert configured.proxy.configuration is not before
        assert [b.name for b in configured.proxy.router.routes[0].group.backends] == [
            "127.0.0.1:9001"
        ]
    finally:
        service.close_listeners([])
        busy.close()
        configured.proxy.stop()


def test_a_reload_opens_the_access_log_again_so_that_it_follows_log_rotation(
    tmp_path: Path,
) -> None:
    log = tmp_path / "access.log"
    config = replace(RUNNING, access_log=AccessLogConfig(path=str(log)), metrics=None)
    configured = ConfiguredProxy(config, reactor)
    record = configured.proxy.access_log
    log.rename(log.with_name("access.log.1"))
    configured.apply(config)
    assert configured.proxy.access_log is not record
    assert log.exists(), "a new file where the old one was"
    configured.close()


def test_the_proxy_adds_no_description_of_its_own_at_the_start_or_a_reload() -> None:
    # The start and each reload log the fuller description that --check prints
    # (the Reloader's is tested above); a line per route from the proxy would repeat it.
    config = replace(RUNNING, metrics=None)
    configured = ConfiguredProxy(config, MemoryReactorClock())
    with capturedLogs() as events:
        configured.factory.doStart()
        configured.apply(replace(config, shutdown_grace=5.0))
        configured.factory.doStop()
    lines = [formatEvent(e) for e in events]
    assert lines == ["configuration applied: 1 routes; backends kept app/127.0.0.1:9000"]


# -- in a worker --------------------------------------------------------------------------


def test_a_worker_applies_what_its_parent_sends_and_counts_what_it_cannot(
    tmp_path: Path,
) -> None:
    config = replace(RUNNING, metrics=None)
    configured = ConfiguredProxy(config, reactor)
    parent = _FromParent(configured)
    moved = replace(config, routes=(replace(RUNNING.routes[0], backends=("http://[::1]:9",)),))
    parent.lineReceived(RELOAD + dump_config(moved).encode())
    assert configured.config == moved
    assert configured.proxy.snapshot()["config"]["reloads"] == {"ok": 1, "failed": 0}
    parent.lineReceived(RELOAD_FAILED)
    assert configured.proxy.snapshot()["config"]["last_reload_ok"] is False
    gone = replace(moved, access_log=AccessLogConfig(path=str(tmp_path / "gone" / "access.log")))
    before = configured.proxy.configuration
    with capturedLogs() as events:
        parent.lineReceived(RELOAD + dump_config(gone).encode())
    assert configured.proxy.configuration is before and configured.config == moved
    assert configured.proxy.snapshot()["config"]["reloads"] == {"ok": 1, "failed": 2}
    (line,) = [formatEvent(e) for e in events]
    assert line.startswith("reload failed in this worker (") and "keeps its configuration" in line
    configured.close()
