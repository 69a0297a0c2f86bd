#!/usr/bin/env python3
"""upgradeproxy's benchmark, in one command: ``python3 bench/run.py``.

Builds the C load generator and backend (``bench/c``, into ``bench/build``),
runs every scenario against a direct connection, upgradeproxy, whichever
of nginx, HAProxy and Caddy are installed, and mitmproxy and proxy.py (from
PyPI, into ``bench/build/peers``), and prints one table.
``python3 bench/run.py --help`` lists the options; ``bench/README.md``
explains the scenarios and how to read the table. The work is done by
:mod:`benchkit` (next to this file).
"""

import sys

from benchkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
