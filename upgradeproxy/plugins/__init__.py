"""The plugin package for upgrade validators.

Any installed distribution can add validators by shipping a drop-in module
in an ``upgradeproxy/plugins/`` directory of its own, *without* an
``__init__.py``; Twisted's plugin system then finds it here. See
``examples/backup-token-validator`` for a complete package.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
