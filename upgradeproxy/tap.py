"""The twistd plugin's options and service maker, kept at this name for compatibility.

They live in :mod:`upgradeproxy.cli.tap`.
"""

from .cli.tap import Options, makeService

__all__ = ["Options", "makeService"]
