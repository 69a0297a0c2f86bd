"""SIGHUP in the running proxy: read the configuration file again, check it, apply it.

The file is read and checked by the very code ``--check`` and the start use
(:meth:`~upgradeproxy.cli.tap.Options.read_config`); a file with mistakes
changes nothing, and each mistake is logged as ``--check`` prints it. What a
correct file changes is applied by whoever runs the proxy: the single
process swaps its proxy's configuration and its listeners, the parent of
``--workers`` passes the configuration on to every worker. A few settings
belong to the process itself and need a restart (:data:`RESTART_ONLY`):
they are kept as they started, with a warning.

``upgradeproxy reload`` (:mod:`upgradeproxy.cli.reload`) sends the signal.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from .config import ConfigError, ProxyConfig, describe_config

log = Logger()

#: Settings a reload cannot change in a running process, and why.
RESTART_ONLY = {
    "workers": "the number of workers is fixed at the start",
    "metrics": "the metrics endpoint is opened once, at the start",
}
#: With --workers, the parent opened the listening sockets for the workers at the start.
WORKERS_LISTEN = "with --workers, the listening sockets are opened once, at the start"


def kept_for_restart(running: ProxyConfig, new: ProxyConfig) -> ProxyConfig:
    """``new``, with the settings a reload cannot change put back as they run, each warned of."""
    restart_only = dict(RESTART_ONLY)
    if running.workers > 1:
        restart_only["listen"] = WORKERS_LISTEN
        restart_only["proxy_protocol_listen"] = WORKERS_LISTEN
    changes = {}
    for name, why in restart_only.items():
        if getattr(new, name) != getattr(running, name):
            log.warn(
                "reload: {name} stays {old!r} until a restart ({why}); the file now says {new!r}",
                name=name,
                old=getattr(running, name),
                new=getattr(new, name),
                why=why,
            )
            changes[name] = getattr(running, name)
    return dataclasses.replace(new, **changes)


class Reloader(Service):
    """Reloads the configuration on SIGHUP (see the module's description).

    ``read`` reads and checks the configuration again (None when it came
    from the command line alone); ``running`` is the configuration in use;
    ``apply`` puts a checked configuration in place, raising to refuse it
    with the exception's message; ``refused`` counts a failed reload.
    """

    def __init__(
        self,
        reactor: Any,
        read: Callable[[], ProxyConfig] | None,
        *,
        running: Callable[[], ProxyConfig],
        apply: Callable[[ProxyConfig], None],
        refused: Callable[[], None],
    ) -> None:
        self._reactor = reactor
        self._read = read
        self._running = running
        self._apply = apply
        self._refused = refused
        self._stopped = False

    def install(self) -> None:
        """Reload on SIGHUP from now on.

        Called when the service is made, not when it starts: the proxy
        listens before the reactor runs, and a SIGHUP in between must not
        end the process (its default action); a reload signalled then waits
        for the reactor to run. The handler stays to the end: a SIGHUP during
        the graceful shutdown is ignored, not fatal.
        """
        signal.signal(signal.SIGHUP, self._signalled)

    def stopService(self) -> None:
        super().stopService()
        self._stopped = True

    def _signalled(self, number: int, frame: object) -> None:
        # The handler runs between two bytecodes of whatever was running:
        # the reload waits for the reactor's next turn.
        self._reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Read, check and apply the configuration file; True when it was applied."""
        if self._stopped:
            log.info("SIGHUP: ignored, the proxy is shutting down")
            return False
        if self._read is None:
            log.info(
                "SIGHUP: the configuration comes from the command line alone (no --config), "
                "so there is nothing to reload; changing it needs a restart"
            )
            return False
        running = self._running()
        source = running.source or "the configuration file"
        log.info("SIGHUP: reloading {source}", source=source)
        try:
            config = self._read()
        except ConfigError as e:
            for problem in e.problems:
                log.error("{problem}", problem=problem)
            count = len(e.problems)
            return self._failed(source, "1 mistake" if count == 1 else f"{count} mistakes")
        config = kept_for_restart(running, config)
        log.info("{description}", description=describe_config(config))
        try:
            self._apply(config)
        except Exception as e:
            return self._failed(source, str(e) or repr(e))
        log.info("reloaded {source}", source=source)
        return True

    def _failed(self, source: str, why: str) -> bool:
        self._refused()
        log.error(
            "reload of {source} failed ({why}); nothing changed: the configuration "
            "before it keeps serving",
            source=source,
            why=why,
        )
        return False
