"""upgradeproxy: an HTTP/1.1 reverse proxy on Twisted that gets protocol upgrades right.

The names most applications need are re-exported here.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    #: The installed version, from pyproject.toml: the one place it is written.
    __version__ = version("upgradeproxy")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

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
