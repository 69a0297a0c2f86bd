"""The twistd drop-in: makes ``twistd upgradeproxy`` and ``twist upgradeproxy`` work.

Kept tiny on purpose: an import error here would only show as "Unknown
command", so everything real lives in :mod:`upgradeproxy.cli.tap`.
"""

from twisted.application.service import ServiceMaker

upgradeproxy = ServiceMaker(
    "upgradeproxy",
    "upgradeproxy.cli.tap",
    "HTTP/1.1 reverse proxy that gets protocol upgrades (WebSocket and others) right",
    "upgradeproxy",
)
