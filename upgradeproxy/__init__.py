"""upgradeproxy: a reverse proxy on Twisted (HTTP/1.1 and HTTP/2) that gets protocol upgrades right.

The names most applications need are re-exported here. They are imported on
first use, so that a validator plugin's ``import upgradeproxy.interfaces``
loads neither the proxy, TLS, metrics nor the twistd glue.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core._backend import BackendSettings
    from .core._clientlimits import ClientLimits
    from .core.accesslog import AccessLog
    from .core.address import BackendAddress, BadBackend, parse_backend
    from .core.balancer import BackendGroup, HealthCheck, Policy
    from .core.factory import ProxyFactory
    from .core.proxy import Configuration, Proxy, ProxySettings, Reconfigured
    from .core.proxyprotocol import ProxyProtocolFactory
    from .core.routing import Route
    from .interfaces import IUpgradeValidator, IValidatorPlugin, Refusal, UpgradeAttempt
    from .registry import ValidatorPlugin
    from .validators import AllowValidator, OriginValidator, RFC9110Validator, WebSocketValidator
    from .web import ProxyResource

#: Where each public name lives (relative to this package).
_PUBLIC = {
    "AccessLog": ".core.accesslog",
    "AllowValidator": ".validators",
    "BackendAddress": ".core.address",
    "BackendGroup": ".core.balancer",
    "BackendSettings": ".core._backend",
    "BadBackend": ".core.address",
    "ClientLimits": ".core._clientlimits",
    "Configuration": ".core.proxy",
    "HealthCheck": ".core.balancer",
    "IUpgradeValidator": ".interfaces",
    "IValidatorPlugin": ".interfaces",
    "OriginValidator": ".validators",
    "Policy": ".core.balancer",
    "Proxy": ".core.proxy",
    "ProxyFactory": ".core.factory",
    "ProxyProtocolFactory": ".core.proxyprotocol",
    "ProxyResource": ".web",
    "ProxySettings": ".core.proxy",
    "RFC9110Validator": ".validators",
    "Reconfigured": ".core.proxy",
    "Refusal": ".interfaces",
    "Route": ".core.routing",
    "UpgradeAttempt": ".interfaces",
    "ValidatorPlugin": ".registry",
    "WebSocketValidator": ".validators",
    "parse_backend": ".core.address",
}

__all__ = [
    "__version__",
    "AccessLog",
    "AllowValidator",
    "BackendAddress",
    "BackendGroup",
    "BackendSettings",
    "BadBackend",
    "ClientLimits",
    "Configuration",
    "HealthCheck",
    "IUpgradeValidator",
    "IValidatorPlugin",
    "OriginValidator",
    "Policy",
    "Proxy",
    "ProxyFactory",
    "ProxyProtocolFactory",
    "ProxyResource",
    "ProxySettings",
    "RFC9110Validator",
    "Reconfigured",
    "Refusal",
    "Route",
    "UpgradeAttempt",
    "ValidatorPlugin",
    "WebSocketValidator",
    "parse_backend",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'upgradeproxy' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC, "__version__"])


def _version() -> str:
    """The installed version, from pyproject.toml, the one place it is written.

    Read on first use: importlib.metadata costs more to import than the rest
    of what a validator plugin needs.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("upgradeproxy")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
