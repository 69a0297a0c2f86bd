"""The machinery behind ``bench/run.py``, upgradeproxy's own benchmark.

Each module owns one piece:

- :mod:`benchkit.build` compiles the C backend and load generator (``bench/c``).
- :mod:`benchkit.procs` starts, watches and always stops processes: CPU
  pinning, free ports, waiting until a server listens, RSS and CPU time.
- :mod:`benchkit.targets` knows the things under test -- a direct connection,
  upgradeproxy, nginx, HAProxy, Caddy -- how to find them, write their
  configuration (one worker, or all cores), start them, and read their logs.
- :mod:`benchkit.peers` adds the Python peers, mitmproxy and proxy.py,
  installed from PyPI into a virtualenv of the benchmark's own.
- :mod:`benchkit.scenarios` defines the scenarios and the metrics (table
  rows) each one produces; :mod:`benchkit.allcores` the two that run each
  proxy with one worker and then on all cores.
- :mod:`benchkit.report` turns results into the text table, Markdown and JSON.
- :mod:`benchkit.cli` parses options and runs the matrix of scenarios and targets.

Only the standard library is used, so that ``python3 bench/run.py`` works
with any Python 3.11 or newer (the Python peers get a virtualenv of their own).
"""
