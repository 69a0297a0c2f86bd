"""The Python peers: mitmproxy and proxy.py, the proxies a Python user might pick instead.

Both come from PyPI, at the versions pinned here, into the benchmark's own
virtualenv (``peers`` in the build directory): created and filled on the
first run, reused afterwards. Without a network (or without ``venv``), the
first run cannot install them: they are skipped with a line saying why,
and everything else runs.

- ``mitmproxy``: ``mitmdump --mode reverse:http://BACKEND``, quiet
  (``--quiet``: no line per flow), keeping no flows on disk. Its default
  parses WebSocket messages after a ``101``; the tunnels here carry raw
  bytes (a proxy never looks inside a tunnel), which that parser refuses, so
  it runs with ``websocket=false``: its raw TCP layer relays the bytes after
  the ``101`` instead (and, as an interceptor does, keeps each chunk in the
  flow's message list until the tunnel closes). One process, one core: it has
  no workers, so its all-cores configuration is the same.
- ``proxy.py``: ``proxy --enable-reverse-proxy`` with a route plugin
  generated into the run directory (proxy.py reverse-proxies only the routes
  a ``ReverseProxyBasePlugin`` names; the one it ships points at
  httpbingo.org) that sends every path to the backend, path kept. It passes
  WebSocket upgrades through and then relays raw bytes. Its default,
  threadless mode serves one request per connection: the second request on a
  kept-alive connection kills its event loop (``FileNotFoundError`` from
  ``selector.modify``, proxy.py issue 1483), after which it answers nothing.
  So for plain requests with keep-alive it runs ``--threaded`` (a thread per
  connection), the mode in which they work; everything else runs in its
  default mode. One acceptor and one worker process (``--num-acceptors 1
  --num-workers 1``) except in the all-cores configuration, where it starts
  its default of one of each per CPU. ``--timeout 3600``: its default closes a
  connection idle for 10 s, idle tunnels included (nginx and HAProxy are given
  an hour too). It logs at its default level (INFO:
  one line per request, as nginx and upgradeproxy write an access log).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import HOST
from .targets import NATIVE, Context, Launch, Target

#: Where the virtualenv goes, inside the build directory.
PEERS_DIR = "peers"
#: Seconds pip may take to install one package (downloads included).
INSTALL_TIMEOUT = 900


@dataclass(frozen=True)
class Requirement:
    """A package from PyPI at a pinned version, and the program of it that is run."""

    package: str
    version: str
    program: str

    def __str__(self) -> str:
        return f"{self.package}=={self.version}"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_version(venv: Path, package: str) -> str | None:
    """The version of ``package`` installed in ``venv``, or None."""
    if not _python(venv).exists():
        return None
    done = subprocess.run(
        [
            str(_python(venv)),
            "-c",
            "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))",
            package,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and "WARNING" not in line]
    return lines[-1].strip() if lines else "no output"


def ensure(venv: Path, requirement: Requirement) -> str | None:
    """Install ``requirement`` into ``venv`` (created if need be); None once it is there.

    Otherwise one line saying why it could not be installed.
    """
    if installed_version(venv, requirement.package) == requirement.version:
        return None
    if not _python(venv).exists():
        done = subprocess.run(
            [sys.executable, "-m", "venv", str(venv)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            return f"cannot create a virtualenv in {venv}: {_last_line(done.stderr + done.stdout)}"
    print(f"bench: installing {requirement} from PyPI into {venv}", file=sys.stderr, flush=True)
    command = [str(_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # Without a network, fail in seconds rather than after pip's minutes of retries.
    command += ["--timeout", "15", "--retries", "1", str(requirement)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return f"installing {requirement} from PyPI took more than {INSTALL_TIMEOUT} s"
    if done.returncode != 0:
        why = _last_line(done.stderr + done.stdout)
        return f"cannot install {requirement} from PyPI (no network?): {why}"
    return None


class PythonPeer(Target):
    """A proxy installed from PyPI into the peers' virtualenv."""

    requirement: Requirement

    def unavailable(self, ctx: Context) -> str | None:
        if ctx.peers is None:
            return "no virtualenv for the Python peers"
        return ensure(ctx.peers, self.requirement)

    def version(self, ctx: Context) -> str:
        python = ".".join(map(str, sys.version_info[:3]))
        return f"{self.requirement} from PyPI, on Python {python}"

    def program(self, ctx: Context) -> str:
        assert ctx.peers is not None
        return str(ctx.peers / "bin" / self.requirement.program)


class Mitmproxy(PythonPeer):
    name = "mitmproxy"
    requirement = Requirement("mitmproxy", "11.0.2", "mitmdump")
    notable = re.compile(r"(?i)\berror\b|\bwarn|traceback|exception")

    def prepare(self, ctx: Context, port: int, backend_port: int, rundir: Path) -> Launch:
        assert ctx.peers is not None
        argv = [
            self.program(ctx),
            "--mode",
            f"reverse:http://{HOST}:{backend_port}",
            "--listen-host",
            HOST,
            "--listen-port",
            str(port),
            "--quiet",
            # Raw bytes after the 101, not WebSocket frames: see the module docstring.
            "--set",
            "websocket=false",
            # Its CA (made on first use) is kept with the virtualenv, not in ~/.mitmproxy.
            "--set",
            f"confdir={ctx.peers / 'mitmproxy-conf'}",
        ]
        return Launch(argv)


ROUTE_PLUGIN = '''\
"""Generated by bench/benchkit/peers.py: every path to the benchmark's backend, path kept."""

from proxy.http import Url
from proxy.http.server import ReverseProxyBasePlugin

UPSTREAM = b"http://{host}:{backend_port}"


class BackendRoute(ReverseProxyBasePlugin):
    def routes(self):
        return [r"/.*"]

    def handle_route(self, request, pattern):
        return Url.from_bytes(UPSTREAM + request.path)
'''


class ProxyPy(PythonPeer):
    name = "proxy.py"
    requirement = Requirement("proxy.py", "2.4.10", "proxy")
    # "2026-12-01 23:34:00,748 - pid:10043 [E] module.function:line - message"
    notable = re.compile(r"\[[WEC]\]|Traceback")

    def prepare(self, ctx: Context, port: int, backend_port: int, rundir: Path) -> Launch:
        (rundir / "benchroute.py").write_text(
            ROUTE_PLUGIN.format(host=HOST, backend_port=backend_port)
        )
        argv = [
            self.program(ctx),
            "--hostname",
            HOST,
            "--port",
            str(port),
            "--enable-reverse-proxy",
            "--disable-http-proxy",
            "--plugins",
            "benchroute.BackendRoute",
            # Its idle-connection timeout, 10 s by default, would close idle
            # tunnels; an hour, as nginx and HAProxy are given.
            "--timeout",
            "3600",
        ]
        if not ctx.all_cores:
            argv += ["--num-acceptors", "1", "--num-workers", "1"]
        if ctx.keep_alive:
            argv.append("--threaded")  # see the module docstring
        env = dict(os.environ, PYTHONPATH=str(rundir), HOME=str(rundir))
        return Launch(argv, env)


#: Every target: the native ones, then the Python peers.
ALL: list[Target] = [*NATIVE, Mitmproxy(), ProxyPy()]
PROXIES = [target.name for target in ALL if target.name != "direct"]
