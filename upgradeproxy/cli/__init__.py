"""The command line: twistd options, the configuration file, the services it starts,
``--workers``, and the ``upgradeproxy check`` tool."""
