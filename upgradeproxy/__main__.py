"""The ``upgradeproxy`` command (also ``python -m upgradeproxy``): tools around the proxy.

The proxy itself runs under twistd (``twistd -n upgradeproxy``); this command
holds the tools that need no reactor. Each subcommand lives in its own module,
which adds its parser with ``add_parser`` and sets ``run`` to the function
that carries it out and returns the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .cli import check, reload

DESCRIPTION = """\
Tools for running upgradeproxy, the HTTP/1.1 reverse proxy that gets protocol
upgrades right. The proxy itself runs with: twistd -n upgradeproxy --backend URL"""

EPILOG = """\
examples:
  upgradeproxy check http://127.0.0.1:9000/ws
  upgradeproxy check --help
  upgradeproxy reload                  (SIGHUP to the proxy named by ./twistd.pid)
  upgradeproxy reload --pidfile /run/upgradeproxy.pid"""


def build_parser() -> argparse.ArgumentParser:
    """The ``upgradeproxy`` argument parser, with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="upgradeproxy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"upgradeproxy {__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    check.add_parser(subparsers)
    reload.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``upgradeproxy`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status; bad arguments exit with status 2 (through
    :class:`SystemExit`, as :mod:`argparse` does).
    """
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
