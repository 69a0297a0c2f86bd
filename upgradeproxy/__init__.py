"""upgradeproxy: an HTTP/1.1 reverse proxy on Twisted that gets protocol upgrades right.

The names most applications need are re-exported here.
"""

from .address import BackendAddress, BadBackend, parse_backend
from .backend import BackendSettings
from .interfaces import IUpgradeValidator, Refusal, UpgradeAttempt
from .proxy import ProxyFactory, ProxySettings
from .validators import RFC9110Validator

__all__ = [
    "BackendAddress",
    "BackendSettings",
    "BadBackend",
    "IUpgradeValidator",
    "ProxyFactory",
    "ProxySettings",
    "RFC9110Validator",
    "Refusal",
    "UpgradeAttempt",
    "parse_backend",
]
