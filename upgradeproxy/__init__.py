"""upgradeproxy: an HTTP/1.1 reverse proxy on Twisted that gets protocol upgrades right.

The names most applications need are re-exported here.
"""

from .address import BackendAddress, BadBackend, parse_backend
from .backend import BackendSettings
from .factory import ProxyFactory
from .interfaces import IUpgradeValidator, IValidatorPlugin, Refusal, UpgradeAttempt
from .proxy import Proxy, ProxySettings
from .validators import AllowValidator, OriginValidator, RFC9110Validator, WebSocketValidator

__all__ = [
    "__version__",
    "AllowValidator",
    "IValidatorPlugin",
    "OriginValidator",
    "WebSocketValidator",
    "BackendAddress",
    "BackendSettings",
    "BadBackend",
    "IUpgradeValidator",
    "Proxy",
    "ProxyFactory",
    "ProxySettings",
    "RFC9110Validator",
    "Refusal",
    "UpgradeAttempt",
    "parse_backend",
]


def __getattr__(name: str) -> str:
    """``__version__``: the installed version, from pyproject.toml, the one place it is written.

    Read on first use: importlib.metadata costs more to import than the rest
    of what a validator plugin needs.
    """
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("upgradeproxy")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
